"""evaluate.py -- is a sampled cascade right? Two measurements that need no Inception network.

1. Class accuracy: a small classifier trained only on *real* images of the dataset labels the
   final-stage samples; the fraction labelled with the class they were conditioned on says
   whether class conditioning survived the whole cascade (a miniature of CAS, CDM §4.2, but
   with the roles reversed: here the classifier is trained on real data and tested on samples).
2. Low-res consistency of each SR stage: its output, downsampled back to its input resolution,
   against the clean low-res image it was conditioned on (before augmentation), as PSNR in dB.
   A stage that ignores z, or invents a different image, scores low.

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

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def train_classifier(dataset, steps=200, batch_size=64, lr=2e-3, seed=0, progress=False):
    """Train on real images only (with flips), float inputs in [-1, 1]."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    clf = Classifier(dataset.num_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    for step in range(steps):
        idx = torch.randint(0, len(dataset.y), (batch_size,), generator=gen)
        x = data.random_flip(data.to_float(dataset.x[idx]), generator=gen)
        loss = F.cross_entropy(clf(x), dataset.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and (step + 1) % 100 == 0:
            print(f"classifier step {step + 1}: loss {loss.item():.4f}")
    return clf.eval()


@torch.no_grad()
def predict(clf, images_uint8_nchw, batch_size=256):
    return torch.cat([clf(data.to_float(images_uint8_nchw[i:i + batch_size])).argmax(1)
                      for i in range(0, len(images_uint8_nchw), batch_size)])


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


def get_classifier(source, res, cache, num_classes, seed=0):
    """Train the real-data classifier once and keep it in `cache` (a plain state dict)."""
    if os.path.exists(cache):
        clf = Classifier(num_classes)
        clf.load_state_dict(torch.load(cache, weights_only=True))
        return clf.eval()
    clf = train_classifier(data.load_dataset(source, res, "train", seed=seed), seed=seed, progress=True)
    os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
    cdm.save_checkpoint(clf.state_dict(), cache)
    return clf


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", default="samples", help="folder written by sample.py")
    p.add_argument("--data", default="shapes", help="dataset the cascade was trained on")
    p.add_argument("--classifier", default=None, help="cache file for the real-data classifier")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier's training")
    args = p.parse_args(argv)
    path = os.path.join(args.samples, "samples.npz")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist; run sample.py first")
    f = np.load(path)
    x = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(f["arr_1"]).long()
    res = x.shape[-1]
    cache = args.classifier or os.path.join("runs", f"classifier_{os.path.basename(args.data)}_{res}px.pt")
    test = data.load_dataset(args.data, res, "test", seed=args.seed)
    clf = get_classifier(args.data, res, cache, test.num_classes, args.seed)
    real_acc = (predict(clf, test.x) == test.y).float().mean().item()
    acc = (predict(clf, x) == y).float().mean().item()
    print(f"classifier accuracy on real held-out images: {100 * real_acc:.1f}% ({len(test.y)} images)")
    print(f"samples labelled with their conditioning class: {100 * acc:.1f}% ({len(y)} samples, {res}px)")
    stages = os.path.join(args.samples, "stages.npz")
    if os.path.exists(stages):
        for lo, hi, db in lowres_consistency(stages):
            print(f"SR stage {lo}->{hi}: downsampled output vs its clean input: PSNR {db:.1f} dB")
    return acc


if __name__ == "__main__":
    main()
