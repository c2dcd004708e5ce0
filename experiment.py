"""experiment.py -- the paper's conditioning-augmentation findings (CDM §4.3-4.4), in miniature.

  python experiment.py                  # ~35 min on 2 CPU cores; writes results/
  python experiment.py --quick          # a 2-minute smoke run of the same pipeline (tiny, noisy)

On the embedded `shapes` data it trains, with the repository's own scripts:
  base      8x8 class-conditional base model (train_base.py, the demo preset)
  sr_aug    8->16 SR with Gaussian noise augmentation amortised over s ~ U{0..250} (train_sr.py)
  sr_none   the same SR model without augmentation (--aug none)
  single    one non-cascaded 16x16 model with about the training compute (wall time) of base + sr_aug
  sr32_blur / sr32_none   16->32 SR with and without blur augmentation (the demo's third stage)
then samples N images per setting and scores them with FID on the features of a classifier trained
on real shapes images (evaluate.py; not comparable with Inception FID), against held-out real
images. The s sweep feeds sr_aug (a) generated low-res images, re-noised to z_s (non-truncated),
(b) generated images from a base chain stopped at s (truncated), (c) ground-truth low-res images
re-noised to z_s. Spread: the standard deviation of FID over bootstrap resamples of the samples.
Outputs: results/experiment.json, results/fid_vs_s.png (truncated vs non-truncated),
results/fid_vs_s_lowres.png (generated vs ground-truth z), results/table.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

import cdm
import data
import evaluate

HERE = os.path.dirname(os.path.abspath(__file__))


def train(script, args, out, quick, log):
    """Run one of the training scripts (skipped if its checkpoint exists); returns its wall time."""
    ckpt = os.path.join(out, "ckpt.pt")
    if os.path.exists(ckpt):
        return json.load(open(os.path.join(out, "wall.json")))["seconds"]
    extra = ["--steps", "10", "--n_train", "256", "--sample_steps", "4"] if quick else []
    t0 = time.time()
    cmd = [sys.executable, os.path.join(HERE, script), *args, *extra, "--out", out, "--no_progress",
           "--log_every", "100"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    if p.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    seconds = time.time() - t0
    json.dump({"seconds": seconds}, open(os.path.join(out, "wall.json"), "w"))
    log(f"trained {os.path.basename(out)} in {seconds / 60:.1f} min")
    return seconds


class Scorer:
    """FID (with bootstrap spread) of uint8 samples against real held-out images at one res."""

    def __init__(self, res, out, seed, n_real, boot):
        cache = os.path.join(out, f"classifier_shapes_{res}px.pt")
        real = data.load_dataset("shapes", res, "test", n=n_real, seed=seed)
        self.clf = evaluate.get_classifier("shapes", res, cache, real.num_classes, seed)
        self.real_feats = evaluate.embed_and_probs(self.clf, real.x)[0]
        self.boot, self.rng = boot, np.random.default_rng(seed)

    def __call__(self, x_float):
        feats = evaluate.embed_and_probs(self.clf, data.to_uint8(x_float))[0]
        value = evaluate.fid(feats, self.real_feats)
        spread = [evaluate.fid(feats[self.rng.integers(0, len(feats), len(feats))], self.real_feats)
                  for _ in range(self.boot)]
        return {"fid": value, "std": float(np.std(spread))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results", help="output folder (trained models go to OUT/runs)")
    p.add_argument("--n", type=int, default=512, help="samples per setting")
    p.add_argument("--s", default="0,25,50,100,150,200,250", help="augmentation times to sweep")
    p.add_argument("--seed", type=int, default=0, help="seed for training, sampling and bootstrap")
    p.add_argument("--boot", type=int, default=30, help="bootstrap resamples for the spread")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (minutes; numbers are noise)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.s, args.boot = 32, "0,100", 2
    s_values = [int(v) for v in args.s.split(",")]
    runs = os.path.join(args.out, "runs")
    os.makedirs(runs, exist_ok=True)
    t_start = time.time()
    lines = []

    def log(msg):
        msg = f"[{(time.time() - t_start) / 60:5.1f} min] {msg}"
        print(msg, flush=True)
        lines.append(msg)

    seed = ["--seed", str(args.seed)]
    r = lambda name: os.path.join(runs, name)
    wall = {
        "base": train("train_base.py", seed, r("base"), args.quick, log),
        "sr_aug": train("train_sr.py", seed, r("sr_aug"), args.quick, log),
        "sr_none": train("train_sr.py", [*seed, "--aug", "none"], r("sr_none"), args.quick, log),
        # one 16x16 model: the SR stage's network without z, trained for as many steps as make
        # its wall time about that of base + sr_aug together (both are reported)
        "single": train("train_base.py", [*seed, "--res", "16", "--ch", "32", "--mult", "1,2,2",
                                          "--attn", "4", "--steps", "1600", "--sample_steps", "25"],
                        r("single"), args.quick, log),
        "sr32_blur": train("train_sr.py", [*seed, "--preset", "demo32"], r("sr32_blur"), args.quick, log),
        "sr32_none": train("train_sr.py", [*seed, "--preset", "demo32", "--aug", "none"],
                           r("sr32_none"), args.quick, log),
    }
    st = {k: cdm.load_stage(os.path.join(r(k), "ckpt.pt")) for k in wall}
    fid16 = Scorer(16, args.out, args.seed, 2048, args.boot)
    fid32 = Scorer(32, args.out, args.seed, 2048, args.boot)
    log("classifiers ready")

    N = args.n
    c = torch.arange(N) % 8
    real16 = data.to_float(data.load_dataset("shapes", 16, "test", n=N, seed=args.seed + 1).x)
    real_z0 = cdm.downsample(real16, 8)          # ground-truth low-res images (held-out, unseen)
    aug = st["sr_aug"].config["augment"]
    low_res_diffusion = cdm.aug_diffusion(aug)

    def gen():
        return torch.Generator().manual_seed(args.seed)

    def sr(stage, z, s=None):
        kwargs = {"c": c, "z": z}
        if s is not None:
            kwargs["s"] = torch.full((N,), s, dtype=torch.long)
        diffusion = stage.diffusion.respace(stage.config["sample_steps"])
        return diffusion.sample(stage.model, (N, 3, stage.resolution, stage.resolution), kwargs, generator=gen())

    def renoise(z0, s):
        eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(args.seed + 7))
        return cdm.noise_augment(z0, torch.full((N,), s, dtype=torch.long), low_res_diffusion, eps)

    results = {"wall_seconds": wall, "n": N, "s": s_values, "seed": args.seed, "sweep": {}}
    with torch.no_grad():
        base_steps = st["base"].config["sample_steps"]
        base_z0 = st["base"].diffusion.respace(base_steps).sample(st["base"].model, (N, 3, 8, 8), {"c": c},
                                                          generator=gen())
        for s in s_values:
            row = {"non_truncated": fid16(sr(st["sr_aug"], renoise(base_z0, s), s)),
                   "ground_truth": fid16(sr(st["sr_aug"], renoise(real_z0, s), s))}
            if s:
                chain = st["base"].diffusion.respace(base_steps, include=[s])
                z_s = chain.sample(st["base"].model, (N, 3, 8, 8), {"c": c}, stop_at=s, generator=gen())
                row["truncated"] = fid16(sr(st["sr_aug"], z_s, s))
            else:
                row["truncated"] = row["non_truncated"]         # s = 0: the same computation
            results["sweep"][s] = row
            log(f"s = {s:4d}: FID non-truncated {row['non_truncated']['fid']:.2f}, truncated "
                f"{row['truncated']['fid']:.2f}, ground-truth z {row['ground_truth']['fid']:.2f}")
        results["no_aug"] = {"generated": fid16(sr(st["sr_none"], base_z0)),
                             "ground_truth": fid16(sr(st["sr_none"], real_z0))}
        single = st["single"].diffusion.respace(st["single"].config["sample_steps"]).sample(st["single"].model, (N, 3, 16, 16), {"c": c},
                                                           generator=gen())
        results["single"] = fid16(single)
        results["real_16"] = fid16(real16)   # the floor: real images that were not the reference
        log(f"no augmentation: FID {results['no_aug']['generated']['fid']:.2f} (generated z), "
            f"{results['no_aug']['ground_truth']['fid']:.2f} (ground-truth z); single 16x16 model "
            f"{results['single']['fid']:.2f}; real images {results['real_16']['fid']:.2f}")
        best = min(s_values, key=lambda s: results["sweep"][s]["non_truncated"]["fid"])
        results["best_s"] = best
        z16 = sr(st["sr_aug"], renoise(base_z0, best), best)
        results["blur"] = {"on": fid32(sr(st["sr32_blur"], z16)), "off": fid32(sr(st["sr32_none"], z16))}
        results["real_32"] = fid32(data.to_float(data.load_dataset("shapes", 32, "test", n=N,
                                                                   seed=args.seed + 1).x))
        log(f"16->32 on generated 16x16 (s = {best}): FID blur {results['blur']['on']['fid']:.2f}, "
            f"no blur {results['blur']['off']['fid']:.2f}")
    results["minutes"] = (time.time() - t_start) / 60
    results["log"] = lines
    with open(os.path.join(args.out, "experiment.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.out)
    write_table(results, args.out)
    log(f"done in {results['minutes']:.1f} min; wrote {args.out}/experiment.json, fid_vs_s.png, "
        f"fid_vs_s_lowres.png, table.md")


def plot(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = results["s"]
    get = lambda key: (np.array([results["sweep"][v][key]["fid"] for v in s]),
                       np.array([results["sweep"][v][key]["std"] for v in s]))
    for name, keys, title in [
            ("fid_vs_s.png", [("non_truncated", "non-truncated (re-noise z0)"),
                              ("truncated", "truncated (base chain stopped at s)")],
             "8->16 SR on generated low-res images: truncated vs non-truncated"),
            ("fid_vs_s_lowres.png", [("non_truncated", "generated low-res z"),
                                     ("ground_truth", "ground-truth low-res z")],
             "8->16 SR at augmentation time s: generated vs ground-truth z")]:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for key, label in keys:
            y, e = get(key)
            ax.errorbar(s, y, yerr=e, marker="o", capsize=3, label=label)
        ax.axhline(results["single"]["fid"], color="gray", ls="--", label="single 16x16 model")
        ax.axhline(results["no_aug"]["generated"]["fid"], color="red", ls=":",
                   label="SR trained without augmentation (generated z)")
        ax.set_xlabel("augmentation time s at sampling (of T = 1000)")
        ax.set_ylabel("FID (classifier features; lower is better)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=120)
        plt.close(fig)


def write_table(results, out):
    f = lambda d: f"{d['fid']:.2f} ± {d['std']:.2f}"
    rows = ["| s | non-truncated (generated z) | truncated (generated z) | ground-truth z |",
            "|---|---|---|---|"]
    for s in results["s"]:
        r = results["sweep"][s]
        rows.append(f"| {s} | {f(r['non_truncated'])} | {f(r['truncated'])} | {f(r['ground_truth'])} |")
    rows += ["", "| setting | FID |", "|---|---|",
             f"| SR without augmentation, generated z | {f(results['no_aug']['generated'])} |",
             f"| SR without augmentation, ground-truth z | {f(results['no_aug']['ground_truth'])} |",
             f"| single non-cascaded 16×16 model | {f(results['single'])} |",
             f"| real held-out 16×16 images (floor) | {f(results['real_16'])} |",
             f"| 16→32 with blur augmentation (z from the cascade, s = {results['best_s']}) | {f(results['blur']['on'])} |",
             f"| 16→32 without blur augmentation | {f(results['blur']['off'])} |",
             f"| real held-out 32×32 images (floor) | {f(results['real_32'])} |"]
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
