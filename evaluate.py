"""evaluate.py -- is a sampled cascade right? Measurements that need no Inception network.

1. Class accuracy: a small classifier trained only on *real* images of the dataset labels the
   final-stage samples; the fraction labelled with the class they were conditioned on says
   whether class conditioning survived the whole cascade (a miniature of CAS, CDM §4.1, but
   with the roles reversed: here the classifier is trained on real data and tested on samples).
2. Low-res consistency of each SR stage: its output, downsampled back to its input resolution,
   against the clean low-res image it was conditioned on (before augmentation), as PSNR in dB.
   A stage that ignores z, or invents a different image, scores low.
3. FID and IS (CDM §4.1) computed on the features and class probabilities of that same small
   classifier instead of Inception-v3: the formulas are the standard ones, the numbers are NOT
   comparable with published Inception FIDs. For ImageNet samples, run the ADM evaluation suite
   (openai/guided-diffusion, evaluations/) on sample.py's samples.npz, which uses its layout.
4. CAS (CDM §4.1, --cas): a classifier trained from scratch on the samples only, tested on real
   held-out images; top-1 and top-5.

  python evaluate.py                      # scores samples/ (written by sample.py) on 'shapes'
  python evaluate.py --samples other/ --data shapes
"""
import argparse
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cdm
import data
import safety


class Classifier(nn.Module):
    """A small all-convolutional classifier: three stride-2 stages, global average pooling."""

    def __init__(self, num_classes, width=32):
        super().__init__()
        layers, ch = [], 3
        for mult in (1, 2, 4):
            layers += [nn.Conv2d(ch, width * mult, 3, padding=1), nn.GroupNorm(8, width * mult), nn.SiLU(),
                       nn.Conv2d(width * mult, width * mult, 3, stride=2, padding=1), nn.SiLU()]
            ch = width * mult
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(ch, num_classes)

    def embed(self, x):
        """The pooled penultimate features: what FID compares (Inception's pool3, in miniature)."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.embed(x))


def train_classifier(dataset, steps=200, batch_size=64, lr=2e-3, seed=0, progress=False, flip=False):
    """Train on real images only, float inputs in [-1, 1]; with random flips only where the
    classes are mirror-symmetric (data.default_flip), so that it can tell a '2' from its mirror."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    clf = Classifier(dataset.num_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    for step in range(steps):
        idx = torch.randint(0, len(dataset.y), (batch_size,), generator=gen)
        x = data.to_float(data.to_rgb(dataset.x[idx]))
        if flip:
            x = data.random_flip(x, torch.rand(batch_size, generator=gen))
        loss = F.cross_entropy(clf(x), dataset.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and (step + 1) % 100 == 0:
            print(f"classifier step {step + 1}: loss {loss.item():.4f}")
    return clf.eval()


@torch.no_grad()
def logits(clf, images_uint8_nchw, batch_size=256):
    return torch.cat([clf(data.to_float(images_uint8_nchw[i:i + batch_size]))
                      for i in range(0, len(images_uint8_nchw), batch_size)])


def predict(clf, images_uint8_nchw):
    return logits(clf, images_uint8_nchw).argmax(1)


@torch.no_grad()
def embed_and_probs(clf, images_uint8_nchw, batch_size=256):
    """Features (N, D) and class probabilities (N, K) of uint8 images, float64 numpy."""
    feats, probs = [], []
    for i in range(0, len(images_uint8_nchw), batch_size):
        f = clf.embed(data.to_float(images_uint8_nchw[i:i + batch_size]))
        feats.append(f.double())
        probs.append(torch.softmax(clf.head(f).double(), dim=1))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; the
    formula of FID, Heusel et al. 2017):
        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).
    Tr (sigma1 sigma2)^(1/2) = sum of sqrt(eigenvalues of sigma1^(1/2) sigma2 sigma1^(1/2)), a
    symmetric PSD matrix, so plain symmetric eigendecompositions suffice (no scipy)."""
    w, V = np.linalg.eigh(sigma1)
    root1 = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def fid(feats_a, feats_b):
    """FID between two sets of features (N, D): the Frechet distance of their Gaussian fits."""
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (feats_a, feats_b)]
    return frechet_distance(*stats[0], *stats[1])


def inception_score(probs, splits=1):
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), with our classifier's p(y|x):
    high when each sample is confidently one class and the classes are used evenly. Ranges
    from 1 to the number of classes."""
    scores = []
    for part in np.array_split(probs, splits):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(1).mean()
        scores.append(float(np.exp(kl)))
    return float(np.mean(scores))


def classification_accuracy_score(samples, labels, real, steps=300, seed=0):
    """CAS (Ravuri & Vinyals 2019; CDM §4.1): train a classifier from scratch on generated
    samples only, report its top-1 and top-5 accuracy on held-out *real* images."""
    train_set = data.ImageData(samples, labels, real.num_classes, real.class_names)
    clf = train_classifier(train_set, steps=steps, seed=seed)
    top = logits(clf, real.x).topk(min(5, real.num_classes), dim=1).indices
    top1 = (top[:, 0] == real.y).float().mean().item()
    top5 = (top == real.y[:, None]).any(1).float().mean().item()
    return top1, top5


def mirror_rate(clf, samples, labels, real):
    """How many samples came out mirror-imaged, on the classes that are not mirror-symmetric.

    A class counts as mirror-symmetric when the classifier (trained without flips) still labels
    most of its *real* held-out images, mirrored, with their class (a '0', an '8'; not a '2' or
    a 'b'). A sample of another class counts as mirrored when the classifier labels its mirror
    image with the sample's class and the sample itself with another: a 'b' drawn where a 'd' was
    asked for. Real images score near 0%, real images mirrored near 100%; a model that learned
    mirrored classes, about half its samples. Returns (rate, samples counted, asymmetric classes)."""
    real_mirrored_ok = predict(clf, real.x.flip(-1)) == real.y
    asym = [k for k in range(real.num_classes)
            if (real.y == k).any() and real_mirrored_ok[real.y == k].float().mean() < 0.5]
    keep = torch.isin(labels, torch.tensor(asym, dtype=labels.dtype))
    if not keep.any():
        return float("nan"), 0, asym
    x, y = samples[keep], labels[keep]
    mirrored = (predict(clf, x.flip(-1)) == y) & (predict(clf, x) != y)
    return mirrored.float().mean().item(), int(keep.sum()), asym


def channel_difference(images_uint8_nchw):
    """Mean |R - G| and |G - B| in 1/255 units: 0 for gray images, which must stay gray."""
    x = images_uint8_nchw.float()
    return ((x[:, 0] - x[:, 1]).abs().mean().item() + (x[:, 1] - x[:, 2]).abs().mean().item()) / 2


def border_mean(images_uint8_nchw, width=3):
    """Mean brightness (0..255) of the `width`-pixel frame of each image: where flat backgrounds
    are, so samples whose background drifted from the data's stand out."""
    x = images_uint8_nchw.float()
    inner = torch.zeros(x.shape[-2:], dtype=torch.bool)
    inner[width:-width, width:-width] = True
    return x[:, :, ~inner].mean().item()


def psnr(a, b):
    """PSNR in dB of images in [0, 255] (any float tensors of equal shape), over the whole set."""
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def lowres_consistency(stages_npz):
    """PSNR of downsample(stage k output) against stage k-1 output, for each SR stage k."""
    f = np.load(stages_npz)
    imgs = [torch.from_numpy(f[f"stage_{k}"]).permute(0, 3, 1, 2).float()
            for k in range(1, len([n for n in f.files if n.startswith("stage_")]) + 1)]
    return [(imgs[k - 1].shape[-1], imgs[k].shape[-1], psnr(cdm.downsample(imgs[k], imgs[k - 1].shape[-1]),
                                                            imgs[k - 1]))
            for k in range(1, len(imgs))]


def read_classifier_cache(path):
    """The contents of a classifier cache file ({"state", "meta"}), or None if there is no file.
    Anything else at that path -- a model checkpoint, a truncated or foreign file -- is refused
    with one line: a cache is replaced when it is stale, but nothing else is ever written over."""
    if not os.path.exists(path):
        return None
    why = "it is a folder" if os.path.isdir(path) else None
    if why is None:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if not (isinstance(saved, dict) and set(saved) == {"state", "meta"}
                    and isinstance(saved["meta"], dict) and {"source", "res"} <= set(saved["meta"])):
                why = "it is not a classifier cache written by evaluate.py" + (
                    " (it looks like a model checkpoint)" if isinstance(saved, dict) and "config" in saved else "")
        except Exception:        # truncated zip, random bytes, pickled objects ...
            why = "it cannot be read as a classifier cache"
    if why:
        raise SystemExit(f"error: --classifier {path}: {why}, so it is never overwritten; choose "
                         "another path for the cache (or delete the file)")
    return saved


def get_classifier(source, res, cache, num_classes, seed=0):
    """Train the real-data classifier once and keep it in `cache` (a plain state dict, and what it
    was trained on: a cache made for other data or settings is retrained and replaced, never
    reused; a file that is no cache is never replaced, see read_classifier_cache)."""
    meta = {"source": os.path.abspath(source) if os.path.exists(source) else source, "res": res,
            "num_classes": num_classes, "seed": seed, "flip": data.default_flip(source)}
    saved = read_classifier_cache(cache)
    if saved is not None and saved["meta"] == meta:
        clf = Classifier(num_classes)
        clf.load_state_dict(saved["state"])
        return clf.eval()
    if saved is not None:
        print(f"the classifier cache {cache} was made for other data or settings: retraining it")
    train = data.load_dataset(source, res, "train", seed=seed)
    clf = train_classifier(train, seed=seed, progress=True, flip=meta["flip"])
    safety.save_checkpoint({"state": clf.state_dict(), "meta": meta}, cache)
    return clf


def read_samples(path):
    """The samples of an ADM-convention .npz, checked: arr_0 uint8 (N, H, H, C) with C = 3 or 1
    (or (N, H, H): gray), arr_1 N non-negative integer labels, N >= 2 (FID needs a covariance).
    Returns x uint8 (N, C, H, H) and y int64 (N,); anything else is one error line."""
    def bad(why):
        raise SystemExit(f"error: {path}: {why}; expected the samples sample.py writes (arr_0 uint8 "
                         "images N x H x H x 3, arr_1 N integer labels)")
    try:
        data.check_npz_headers(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        with np.load(path) as f:
            if "arr_0" not in f.files or "arr_1" not in f.files:
                bad(f"it holds {', '.join(f.files) or 'no arrays'}, not arr_0 and arr_1")
            x, y = f["arr_0"], f["arr_1"]
    except SystemExit:
        raise
    except Exception as e:   # not a zip, truncated, pickled objects ...
        bad(f"cannot be read ({type(e).__name__}: {str(e)[:100]})")
    if x.ndim == 3:
        x = x[..., None]
    if x.dtype != np.uint8:
        bad(f"arr_0 is {x.dtype}, not uint8 (convert float images with data.to_uint8)")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        bad(f"arr_0 has shape {x.shape}, not N x H x W x 3 (or x 1)")
    if x.shape[1] != x.shape[2]:
        bad(f"arr_0's images are {x.shape[1]}x{x.shape[2]}, not square")
    if len(x) < 2:
        bad(f"it holds {len(x)} sample{'s' if len(x) != 1 else ''}; scoring needs at least 2")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        bad(f"arr_1 is {y.dtype} {y.shape}, not {len(x)} non-negative integer labels")
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y.astype(np.int64))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", default="samples",
                   help="folder written by sample.py, or one .npz (e.g. from sample.py --s_sweep)")
    p.add_argument("--data", default=None,
                   help="dataset the cascade was trained on (default: the one sample.py recorded "
                        "in stages.npz, else 'shapes')")
    p.add_argument("--classifier", default=None, help="cache file for the real-data classifier")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier's training")
    p.add_argument("--cas", action="store_true", help="also train a classifier on the samples (CAS)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    if not 0 <= args.seed < 2 ** 63:
        raise SystemExit(f"error: --seed {args.seed}: must lie in 0..2^63-1")
    if args.json is not None:
        safety.writable_file(args.json, "--json", overwrite=args.overwrite)
    path = args.samples if args.samples.endswith(".npz") else os.path.join(args.samples, "samples.npz")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist; run sample.py first")
    x, y = read_samples(path)
    stages = os.path.join(os.path.dirname(path), "stages.npz")
    stages = stages if os.path.exists(stages) and not args.samples.endswith(".npz") else None
    recorded, consistency = {}, []           # what sample.py recorded of the cascade's data
    if stages:                               # read whole now: a corrupt file is one line, before any work
        try:
            with np.load(stages) as f:
                recorded = {k: f[k].tolist() for k in ("data", "class_names") if k in f.files}
            consistency = lowres_consistency(stages)
        except Exception as e:   # not a zip, truncated, pickled objects, stages of mismatched sizes ...
            raise SystemExit(f"error: {stages}: cannot be read ({type(e).__name__}: {str(e)[:100]}); it should "
                             f"be the stages.npz sample.py writes beside samples.npz: re-run sample.py, or "
                             f"score samples.npz alone (--samples {path})") from None
    if args.data is None:
        args.data = recorded.get("data", "shapes")
    res = x.shape[-1]
    cache = args.classifier or os.path.join("runs", f"classifier_{os.path.basename(os.path.normpath(args.data))}_{res}px.pt")
    read_classifier_cache(cache)             # refused now, not after the work, if it is no cache
    safety.writable_file(cache, "--classifier", overwrite=True)
    try:
        count, need = data.load_size(args.data, res, "test")
        safety.check_memory(need + 4 * x.numel(), f"scoring {len(x)} samples against {count} images "
                            f"of {args.data} at {res}px")
        test = data.load_dataset(args.data, res, "test", seed=args.seed)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    gray = test.channels == 1
    if x.shape[1] == 1 and not gray:
        raise SystemExit(f"error: {path} holds 1-channel (gray) samples, but {args.data} is in colour: "
                         "were the samples made from another dataset? (--data)")
    x = data.to_rgb(x).contiguous()
    names = recorded.get("class_names")
    if names and names != list(test.class_names):
        raise SystemExit(f"error: the samples were made by a cascade trained on {recorded.get('data')} "
                         f"(classes {', '.join(map(str, names[:4]))}, ...), but --data {args.data} has classes "
                         f"{', '.join(test.class_names[:4])}, ...: score them against their own data")
    # In memory and as 3 channels, like the samples (a prepared folder's images are read from disk)
    test = data.ImageData(test.rgb()[:], test.y, test.num_classes, test.class_names)
    if y.max() >= test.num_classes:
        raise SystemExit(f"error: {path} has labels {y.min().item()}..{y.max().item()}, but {args.data} "
                         f"has {test.num_classes} classes: were the samples made from another dataset?")
    clf = get_classifier(args.data, res, cache, test.num_classes, args.seed)
    out = {"data": args.data, "n": len(y), "res": res}
    out["real_accuracy"] = (predict(clf, test.x) == test.y).float().mean().item()
    out["accuracy"] = (predict(clf, x) == y).float().mean().item()
    print(f"classifier accuracy on real held-out images: {100 * out['real_accuracy']:.1f}% ({len(test.y)} images)")
    print(f"samples labelled with their conditioning class: {100 * out['accuracy']:.1f}% ({len(y)} samples, {res}px)")
    feats, probs = embed_and_probs(clf, x)
    real_feats, real_probs = embed_and_probs(clf, test.x)
    note = " (few samples: FID is biased upwards; compare only at equal N)" if len(y) < 2 * feats.shape[1] else ""
    out["fid"], out["is"], out["is_real"] = fid(feats, real_feats), inception_score(probs), inception_score(real_probs)
    print(f"FID against {len(test.y)} real held-out images, on this classifier's features: {out['fid']:.2f}{note}")
    print(f"IS on this classifier: {out['is']:.2f} (real images: {out['is_real']:.2f}; at most {test.num_classes})")
    if not data.default_flip(args.data):
        rate, counted, asym = mirror_rate(clf, x, y, test)
        if counted:
            out["mirrored"] = rate
            print(f"mirror-imaged samples: {100 * rate:.1f}% of the {counted} samples of the classes "
                  f"that are not mirror-symmetric ({', '.join(test.class_names[k] for k in asym)})")
        else:
            print("mirror-imaged samples: not measured (to the classifier, every class sampled looks "
                  "the same mirrored)")
    out["border"], out["border_real"] = border_mean(x), border_mean(test.x)
    print(f"3-pixel border brightness: samples {out['border']:.1f}, real images {out['border_real']:.1f} (of 255)")
    if gray:
        out["channel_difference"] = channel_difference(x)
        print(f"gray data: the samples' mean |R-G|, |G-B| is {out['channel_difference']:.2f}/255 (real: 0)")
    if args.cas:
        out["cas_top1"], out["cas_top5"] = classification_accuracy_score(x, y, test, seed=args.seed)
        print(f"CAS (a classifier trained on the samples only, tested on real images): "
              f"top-1 {100 * out['cas_top1']:.1f}%, top-5 {100 * out['cas_top5']:.1f}%")
    if stages:
        out["lowres_psnr"] = []
        for lo, hi, db in consistency:
            out["lowres_psnr"].append(db)
            print(f"SR stage {lo}->{hi}: downsampled output vs its clean input: PSNR {db:.1f} dB")
    if args.json:
        try:
            safety.write_json(args.json, out)
        except OSError as e:
            raise SystemExit(f"error: could not write {args.json}: {e.strerror or e}") from None
    return out


if __name__ == "__main__":
    safety.run_script(main)
