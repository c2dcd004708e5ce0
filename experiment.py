"""experiment.py -- the paper's conditioning-augmentation findings (CDM §4.3, §4.4), in miniature.

  python experiment.py                  # ~50 min on 2 CPU cores; writes results/
  python experiment.py --quick          # a 2-minute smoke run of the same pipeline (tiny, noisy)
  python experiment.py --solvers        # time-to-quality of the samplers on the demo cascade in runs/
  python experiment.py --guidance       # classifier-free guidance on top of a cascade (~20 min)

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
re-noised to z_s. Spread: every FID is computed for --seeds independent sets of samples (fresh
noise, fresh real low-res images); tables and plots show the mean and the standard deviation.
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
import safety

HERE = os.path.dirname(os.path.abspath(__file__))


# The demo presets (velocity prediction, SDE-DPM-Solver++(2M) at 20 steps per stage; docs/choices.md,
# docs/samplers.md), trained longer than the demo (about twice: its training lengths of 2026-11-25),
# on the first 16384 training images. The 8->16 stage is trained on s ~ U{0..250}, not the demo's
# T/10, so that the s sweep stays inside the augmentation it was trained on.
DEMO = ["--n_train", "16384"]
BASE = [*DEMO, "--steps", "1000"]
SR16 = [*DEMO, "--steps", "800", "--s_max", "250", "--sample_s", "100"]
SR32 = [*DEMO, "--preset", "demo32", "--steps", "550"]


def train(script, args, out, quick, log):
    """Run one of the training scripts (skipped if its checkpoint exists); returns its wall time."""
    ckpt = os.path.join(out, "ckpt.pt")
    if os.path.exists(ckpt):
        return json.load(open(os.path.join(out, "wall.json")))["seconds"]
    extra = ["--steps", "10", "--n_train", "256", "--sample_steps", "4"] if quick else []
    t0 = time.time()
    # --overwrite: a run killed before its checkpoint (none is there, or it would be reused above)
    # left only its log and previews in `out`, this experiment's own folder
    cmd = [sys.executable, os.path.join(HERE, script), *args, *extra, "--out", out, "--no_progress",
           "--log_every", "100", "--overwrite"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    if p.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    seconds = time.time() - t0
    safety.write_json(os.path.join(out, "wall.json"), {"seconds": seconds})
    log(f"trained {os.path.basename(out)} in {seconds / 60:.1f} min")
    return seconds


class Scorer:
    """FID of uint8 samples against real held-out images at one resolution, on the features of
    a classifier trained on real images (evaluate.py)."""

    def __init__(self, res, out, seed, n_real):
        cache = os.path.join(out, f"classifier_shapes_{res}px.pt")
        real = data.load_dataset("shapes", res, "test", n=n_real, seed=seed)
        self.clf = evaluate.get_classifier("shapes", res, cache, real.num_classes, seed)
        self.real_feats = evaluate.embed_and_probs(self.clf, real.x)[0]

    def __call__(self, x_float):
        return evaluate.fid(evaluate.embed_and_probs(self.clf, data.to_uint8(x_float))[0], self.real_feats)

    def fid_and_accuracy(self, x_float, labels):
        u8 = data.to_uint8(x_float)
        feats = evaluate.embed_and_probs(self.clf, u8)[0]
        return evaluate.fid(feats, self.real_feats), (evaluate.predict(self.clf, u8) == labels).float().mean().item()


def aggregate(runs):
    """Per-seed results (same nested keys, float leaves) -> {"fid": mean, "std": sample std
    over seeds, "runs": [...]} at every leaf."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: aggregate([r[key] for r in runs]) for key in first}
    return {"fid": float(np.mean(runs)), "std": float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0,
            "runs": [float(v) for v in runs]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results", help="output folder (trained models go to OUT/runs)")
    p.add_argument("--n", type=int, default=512, help="samples per setting")
    p.add_argument("--s", default="0,25,50,100,150,200,250", help="augmentation times to sweep")
    p.add_argument("--seed", type=int, default=0, help="seed for training, sampling and bootstrap")
    p.add_argument("--seeds", type=int, default=2,
                   help="independent sampling runs (noise and real images); the spread is over these")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (minutes; numbers are noise)")
    p.add_argument("--runs", default="runs", help="--solvers: the folder with base/, sr16/, sr32/")
    p.add_argument("--grid", default=None, help=argparse.SUPPRESS)   # --solvers: a smaller grid (JSON)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)   # --solvers: results file name
    p.add_argument("--guidance", action="store_true",
                   help="instead: class accuracy, FID and IS against the guidance weight w, guiding the "
                        "base only or every stage, of demo cascades trained with and without --p_uncond "
                        "(writes OUT/guidance.json, guidance.png, guidance.md)")
    p.add_argument("--solvers", action="store_true",
                   help="instead: FID and accuracy against network evaluations for each sampler, per "
                        "stage of the demo cascade in runs/ (writes OUT/solvers.json, fid_vs_nfe.png)")
    args = p.parse_args(argv)
    if args.solvers:
        return solvers(args)
    if args.guidance:
        return guidance(args)
    if args.quick:
        args.n, args.s = 32, "0,100"
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
        "base": train("train_base.py", [*seed, *BASE], r("base"), args.quick, log),
        "sr_aug": train("train_sr.py", [*seed, *SR16], r("sr_aug"), args.quick, log),
        "sr_none": train("train_sr.py", [*seed, *SR16, "--aug", "none"], r("sr_none"), args.quick, log),
        # one 16x16 model: the SR stage's network without z, trained for as many steps as make
        # its wall time about that of base + sr_aug together (both are reported)
        "single": train("train_base.py", [*seed, *DEMO, "--res", "16", "--ch", "32", "--mult", "1,1,2",
                                          "--attn", "4", "--lr", "2e-3", "--steps", "1900"],
                        r("single"), args.quick, log),
        "sr32_blur": train("train_sr.py", [*seed, *SR32], r("sr32_blur"), args.quick, log),
        "sr32_none": train("train_sr.py", [*seed, *SR32, "--aug", "none"],
                           r("sr32_none"), args.quick, log),
    }
    st = {k: safety.load_stage(os.path.join(r(k), "ckpt.pt")) for k in wall}
    fid16 = Scorer(16, args.out, args.seed, 2048)
    fid32 = Scorer(32, args.out, args.seed, 2048)
    log("classifiers ready")

    N = args.n
    c = torch.arange(N) % 8
    # Held-out real images (not the FID reference), one for each entry of c: class k where c = k;
    # each sampling seed takes fresh ones.
    pool = data.load_dataset("shapes", 16, "test", n=(2 + args.seeds) * N, seed=args.seed + 1)
    by_class = [torch.nonzero(pool.y == k)[:, 0].tolist() for k in range(8)]

    def class_matched(pool, by_class):
        """Unused real images of `pool`, the i-th of class c[i]; consumed from by_class."""
        return data.to_float(pool.x[[by_class[k].pop() for k in c.tolist()]])
    def draw(stage, seed, z=None, s=None, stop_at=0):
        """N samples of one stage with the sampler and steps it was trained to preview with (its
        checkpoint's), stopped at step stop_at (truncated) or run to x0."""
        kwargs = {"c": c}
        if z is not None:
            kwargs["z"] = z
        if s is not None:
            kwargs["s"] = torch.full((N,), s, dtype=torch.long)
        sampler = stage.config.get("sampler", "ancestral")
        chain = stage.diffusion.sampling_chain(sampler, stage.config["sample_steps"], stop_at)
        shape = (N, stage.channels, stage.resolution, stage.resolution)
        return chain.sample(stage.model, shape, kwargs, sampler=sampler, stop_at=stop_at,
                            generator=torch.Generator().manual_seed(seed))

    def sr(stage, z, s, seed):
        return draw(stage, seed, z=z, s=s)

    aug16 = st["sr_aug"].config["augment"]

    # Every FID once per sampling seed: fresh noise everywhere and fresh real images.
    runs, base_z0 = [], {}
    with torch.no_grad():
        for k in range(args.seeds):
            seed_k = args.seed + 1000 * k
            real16 = class_matched(pool, by_class)
            real_z0 = cdm.downsample(real16, 8)  # ground-truth low-res images with matching classes
            base_z0[k] = draw(st["base"], seed_k)
            run = {"sweep": {}}
            for s in s_values:
                row = {"non_truncated": fid16(sr(st["sr_aug"], renoise(base_z0[k], s, aug16, seed_k), s, seed_k)),
                       "ground_truth": fid16(sr(st["sr_aug"], renoise(real_z0, s, aug16, seed_k), s, seed_k))}
                if s:
                    z_s = draw(st["base"], seed_k, stop_at=s)
                    row["truncated"] = fid16(sr(st["sr_aug"], z_s, s, seed_k))
                else:
                    row["truncated"] = row["non_truncated"]     # s = 0: the same computation
                run["sweep"][s] = row
                log(f"seed {k}, s = {s:4d}: FID non-truncated {row['non_truncated']:.2f}, truncated "
                    f"{row['truncated']:.2f}, ground-truth z {row['ground_truth']:.2f}")
            run["no_aug"] = {"generated": fid16(sr(st["sr_none"], base_z0[k], None, seed_k)),
                             "ground_truth": fid16(sr(st["sr_none"], real_z0, None, seed_k))}
            run["single"] = fid16(draw(st["single"], seed_k))
            run["real_16"] = fid16(real16)     # the floor: real images that are not the reference
            log(f"seed {k}: no augmentation {run['no_aug']['generated']:.2f} (generated z), "
                f"{run['no_aug']['ground_truth']:.2f} (ground-truth z); single 16x16 model "
                f"{run['single']:.2f}; real images {run['real_16']:.2f}")
            runs.append(run)
        mean_nt = {s: np.mean([r["sweep"][s]["non_truncated"] for r in runs]) for s in s_values}
        best = min(s_values, key=mean_nt.get)
        pool32 = data.load_dataset("shapes", 32, "test", n=(2 + args.seeds) * N, seed=args.seed + 1)
        by_class32 = [torch.nonzero(pool32.y == j)[:, 0].tolist() for j in range(8)]
        for k, run in enumerate(runs):
            seed_k = args.seed + 1000 * k
            z16 = sr(st["sr_aug"], renoise(base_z0[k], best, aug16, seed_k), best, seed_k)
            run["blur"] = {"on": fid32(sr(st["sr32_blur"], z16, None, seed_k)),
                           "off": fid32(sr(st["sr32_none"], z16, None, seed_k))}
            run["real_32"] = fid32(class_matched(pool32, by_class32))
            log(f"seed {k}, 16->32 on generated 16x16 (s = {best}): FID blur {run['blur']['on']:.2f}, "
                f"no blur {run['blur']['off']:.2f}")
    results = aggregate(runs)
    results.update(wall_seconds=wall, n=N, s=s_values, seed=args.seed, seeds=args.seeds, best_s=best,
                   sampling={k: f"{v.config.get('sampler', 'ancestral')}, {v.config['sample_steps']} steps"
                             for k, v in st.items()})
    results["minutes"] = (time.time() - t_start) / 60
    results["log"] = lines
    safety.write_json(os.path.join(args.out, "experiment.json"), results, allow_nan=True)
    plot(results, args.out)
    write_table(results, args.out)
    log(f"done in {results['minutes']:.1f} min; wrote {args.out}/experiment.json, fid_vs_s.png, "
        f"fid_vs_s_lowres.png, table.md")


# Time-to-quality (the samplers issue): each stage on inputs that do not depend on the sampler.
# The base alone, scored at 8x8; each SR stage on real low-res images of held-out data (for the
# 8->16 stage re-noised to its own s, with fixed noise), scored at its resolution. NFE: network
# evaluations per sample; Heun's steps are (NFE + 1) // 2. Stage -> sampler -> (NFEs, seeds). On
# 2 cores a 512-sample NFE of the demo cascade costs ~0.6 s (base), ~0.9 s (8->16) and ~5.5 s
# (16->32), so the SR stages get fewer settings and seeds, and the 16->32 stage's reference is 50
# ancestral steps (~40 min in all).
SOLVER_GRID = {
    "base": {"ancestral": ([5, 10, 20, 50, 250], 2), "dpm++2m": ([5, 10, 20, 50], 2),
             "dpm++2m-sde": ([5, 10, 20, 50], 2), "heun": ([5, 10, 20, 50], 2)},
    "sr16": {"ancestral": ([5, 10, 20, 50, 250], 2), "dpm++2m": ([5, 10, 20, 50], 2),
             "dpm++2m-sde": ([5, 10, 20, 50], 2), "heun": ([5, 10, 20], 1)},
    "sr32": {"ancestral": ([10, 20, 50], 2), "dpm++2m": ([10, 20], 1), "dpm++2m-sde": ([5, 10, 20], 2),
             "heun": ([10, 20], 1)},
}


def resumable(out, name):
    """A study's results file OUT/name and what it holds already (a re-run skips the rows done),
    and a log function stamping each line with the minutes since this call."""
    t_start = time.time()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)

    def log(msg):
        print(f"[{(time.time() - t_start) / 60:5.1f} min] {msg}", flush=True)
    return path, results, log


def solvers(args):
    path, results, log = resumable(args.out, args.json or "solvers.json")
    stages = {k: safety.load_stage(os.path.join(args.runs, k, "ckpt.pt")) for k in ("base", "sr16", "sr32")}
    N = args.n
    c = torch.arange(N) % 8
    score = {res: Scorer(res, args.out, args.seed, 2048) for res in (8, 16, 32)}
    pool = data.load_dataset("shapes", 32, "test", n=4 * N, seed=args.seed + 1)
    by_class = [torch.nonzero(pool.y == k)[:, 0].tolist() for k in range(8)]
    log("classifiers ready")
    for name, grid in (json.loads(args.grid) if args.grid else SOLVER_GRID).items():
        st = stages[name]
        for k in range(max(seeds for _, seeds in grid.values())):
            seed_k = args.seed + 1000 * k
            real32 = data.to_float(pool.x[[by_class[j][k * N // 8 + i // 8] for i, j in enumerate(c.tolist())]])
            kwargs = {"c": c}
            if name != "base":
                z = cdm.downsample(real32, st.config["low_res"])
                aug = st.config["augment"]
                if st.sample_s is not None:
                    s = st.sample_s
                    z = renoise(z, s, aug, seed_k)
                    kwargs["s"] = torch.full((N,), s, dtype=torch.long)
                kwargs["z"] = z
            for sampler, (nfes, seeds) in grid.items():
                for nfe in nfes if k < seeds else []:
                    key = f"{name}/{sampler}/{nfe}/{k}"
                    if key in results:
                        continue
                    steps = (nfe + 1) // 2 if sampler == "heun" else nfe
                    d = st.diffusion.sampling_chain(sampler, steps)
                    t0 = time.time()
                    with torch.no_grad():
                        x = d.sample(st.model, (N, st.channels, st.resolution, st.resolution), kwargs,
                                     sampler=sampler, generator=torch.Generator().manual_seed(seed_k))
                    secs = time.time() - t0
                    fid, acc = score[st.resolution].fid_and_accuracy(x, c)
                    results[key] = {"fid": fid, "accuracy": acc, "nfe": d.nfe(sampler), "seconds": secs}
                    safety.write_json(path, results, allow_nan=True)
                    log(f"{key}: NFE {d.nfe(sampler)}, FID {fid:.2f}, accuracy {acc:.3f}, {secs:.0f} s")
            if f"{name}/real/{k}" not in results:
                results[f"{name}/real/{k}"] = dict(zip(("fid", "accuracy"), score[st.resolution].fid_and_accuracy(
                    cdm.downsample(real32, st.resolution), c)))
    safety.write_json(path, results, allow_nan=True)
    if not args.grid:
        plot_solvers(results, args.out, N)
    log(f"done; wrote {path}")


# Classifier-free guidance on a cascade (issue 23): two demo cascades, trained as the README's
# demo commands train them (same presets and lengths), one of them with every stage dropping its
# label with probability 0.1 (--p_uncond, the value Ho & Salimans 2022 found to work well). The
# guided cascade is sampled at each w with guidance on the base only and on every stage; both
# cascades at w = 0 show what training with p_uncond costs unguided. Scored at 32x32 on the
# classifier's features against held-out real images: class accuracy (does the sample show its
# class?), FID (quality and diversity together) and IS (confident and even over the classes).
GUIDANCE_W = [0.0, 0.5, 1.0, 2.0, 4.0]
P_UNCOND = 0.1


def guidance(args):
    path, results, log = resumable(args.out, "guidance.json")
    quick = args.quick
    runs = os.path.join(args.out, "runs_guidance")
    cascades = {}
    for name, extra in (("plain", []), ("cfg", ["--p_uncond", str(P_UNCOND)])):
        r = lambda stage: os.path.join(runs, name, stage)
        seed = ["--seed", str(args.seed)]
        train("train_base.py", [*seed, *extra], r("base"), quick, log)
        train("train_sr.py", [*seed, *extra], r("sr16"), quick, log)
        train("train_sr.py", [*seed, *extra, "--preset", "demo32"], r("sr32"), quick, log)
        cascades[name] = [safety.load_stage(os.path.join(r(k), "ckpt.pt")) for k in ("base", "sr16", "sr32")]
    N = 64 if quick else args.n
    score = Scorer(32, args.out, args.seed, 2048)
    log("classifier ready")
    c = torch.arange(N) % 8
    settings = [("plain", "none", 0.0)] + [("cfg", "none", 0.0)] + [
        ("cfg", mode, w) for mode in ("base", "all") for w in GUIDANCE_W if w]
    for k in range(args.seeds):
        for name, mode, w in settings:
            key = f"{name}/{mode}/{w:g}/{k}"
            if key in results:
                continue
            stages = cascades[name]
            ws = [w] + [w if mode == "all" else 0.0] * (len(stages) - 1)
            s = [st.sample_s for st in stages]
            t0 = time.time()
            x = cdm.sample_cascade(stages, c, steps=[st.config["sample_steps"] for st in stages],
                                   sampler=[st.config.get("sampler", "ancestral") for st in stages],
                                   s=s, guidance=ws, generator=torch.Generator().manual_seed(args.seed + 1000 * k),
                                   progress=False)[-1]
            u8 = data.to_uint8(x)
            feats, probs = evaluate.embed_and_probs(score.clf, u8)
            results[key] = {"fid": evaluate.fid(feats, score.real_feats),
                            "accuracy": (evaluate.predict(score.clf, u8) == c).float().mean().item(),
                            "is": evaluate.inception_score(probs), "seconds": time.time() - t0}
            safety.write_json(path, results, allow_nan=True)
            r = results[key]
            log(f"{key}: accuracy {r['accuracy']:.3f}, FID {r['fid']:.2f}, IS {r['is']:.2f} ({r['seconds']:.0f} s)")
    plot_guidance(results, args.out, N)
    log(f"done; wrote {path}, guidance.png, guidance.md")


def guidance_rows(results):
    """{(cascade, mode, w): {metric: [per-seed values]}}; w = 0 of the guided cascade belongs to
    both of its modes."""
    table = {}
    for key, r in results.items():
        name, mode, w, _ = key.split("/")
        for m in (("base", "all") if mode == "none" and name == "cfg" else (mode,)):
            row = table.setdefault((name, m, float(w)), {})
            for metric in ("accuracy", "fid", "is"):
                row.setdefault(metric, []).append(r[metric])
    return table


def plot_guidance(results, out, n):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = guidance_rows(results)
    metrics = (("accuracy", "class accuracy (higher: more like its class)"),
               ("fid", "FID, classifier features (lower is better)"),
               ("is", "IS, classifier (higher: confident, even)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (metric, label) in zip(axes, metrics):
        for mode, style in (("base", "o-"), ("all", "s-")):
            ws = sorted(w for (name, m, w) in table if name == "cfg" and m == mode)
            ys = [np.mean(table[("cfg", mode, w)][metric]) for w in ws]
            es = [np.std(table[("cfg", mode, w)][metric], ddof=1) if len(table[("cfg", mode, w)][metric]) > 1
                  else 0 for w in ws]
            ax.errorbar(ws, ys, yerr=es, fmt=style, capsize=3,
                        label=f"p_uncond {P_UNCOND}, guidance on {'the base only' if mode == 'base' else 'every stage'}")
        plain = table.get(("plain", "none", 0.0))
        if plain:
            ax.axhline(np.mean(plain[metric]), color="gray", ls="--", label="trained without p_uncond, w = 0")
        ax.set(xlabel="guidance weight w", ylabel=label)
        ax.legend(fontsize=8)
    fig.suptitle(f"Classifier-free guidance on the demo cascade (8->16->32), {n} samples per setting, "
                 "mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    safety.save_figure(fig, os.path.join(out, "guidance.png"), dpi=120)
    plt.close(fig)
    lines = [f"Class accuracy, FID and IS (classifier features, 32×32, against held-out real images), "
             f"{n} samples per setting; each cell lists the seeds' values.", "",
             "| cascade | guided stages | w | accuracy | FID | IS |", "|---|---|---|---|---|---|"]
    for (name, mode, w), row in sorted(table.items(), key=lambda kv: (kv[0][0] != "plain", kv[0][1], kv[0][2])):
        cells = [", ".join(f"{v:.3f}" if metric == "accuracy" else f"{v:.2f}" for v in row[metric])
                 for metric in ("accuracy", "fid", "is")]
        who = "without p_uncond" if name == "plain" else f"p_uncond {P_UNCOND}"
        stages = "—" if name == "plain" else ("base only" if mode == "base" else "every stage")
        lines.append(f"| {who} | {stages} | {w:g} | " + " | ".join(cells) + " |")
    safety.write_text(os.path.join(out, "guidance.md"), "\n".join(lines) + "\n")


def renoise(z0, s, aug, seed):
    """z0 noised to z_s ~ q(z_s | z0) of the noise augmentation `aug`, with noise fixed by `seed`:
    every setting sampled with one seed gets the same z_s."""
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + 7))
    return cdm.noise_augment(z0, torch.full((z0.shape[0],), s, dtype=torch.long), cdm.aug_diffusion(aug), eps)


def solver_rows(results):
    """{stage: {sampler: [(nfe, fid mean, fid std, accuracy mean, seeds)]}} from solvers.json."""
    table = {}
    for key, r in results.items():
        if "/real/" in key:
            continue
        stage, sampler, nfe, _ = key.split("/")
        table.setdefault(stage, {}).setdefault(sampler, {}).setdefault(int(nfe), []).append(r)
    return {stage: {sampler: [(runs[0]["nfe"], float(np.mean([r["fid"] for r in runs])),
                               float(np.std([r["fid"] for r in runs], ddof=1)) if len(runs) > 1 else float("nan"),
                               float(np.mean([r["accuracy"] for r in runs])), len(runs))
                              for nfe, runs in sorted(by_nfe.items())]
                    for sampler, by_nfe in samplers.items()} for stage, samplers in table.items()}


def plot_solvers(results, out, n):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = solver_rows(results)
    titles = {"base": "base 8x8 (alone)", "sr16": "8->16 (real low-res input)", "sr32": "16->32 (real low-res input)"}
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4.2))
    lines = ["FID on classifier features at the stage's resolution, mean ± std over sampling seeds "
             f"({n} samples each); class accuracy of the samples.", ""]
    for ax, (stage, samplers) in zip(np.atleast_1d(axes), rows.items()):
        lines += [f"**{titles[stage]}**", "", "| sampler | NFE | FID | accuracy | seeds |", "|---|---|---|---|---|"]
        for sampler, pts in samplers.items():
            x, y, e = [p[0] for p in pts], [p[1] for p in pts], [0 if np.isnan(p[2]) else p[2] for p in pts]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=sampler)
            lines += [f"| {sampler} | {p[0]} | {p[1]:.2f}" + (f" ± {p[2]:.2f}" if not np.isnan(p[2]) else "")
                      + f" | {p[3]:.3f} | {p[4]} |" for p in pts]
        real = [r["fid"] for key, r in results.items() if key.startswith(f"{stage}/real/")]
        ax.axhline(np.mean(real), color="gray", ls="--", label="real held-out images")
        lines += [f"| real held-out images | — | {np.mean(real):.2f} | — | {len(real)} |", ""]
        ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample (NFE)",
               ylabel="FID (classifier features)", title=titles[stage])
        ax.legend(fontsize=8)
    fig.tight_layout()
    safety.save_figure(fig, os.path.join(out, "fid_vs_nfe.png"), dpi=120)
    plt.close(fig)
    safety.write_text(os.path.join(out, "solvers.md"), "\n".join(lines) + "\n")


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
        safety.save_figure(fig, os.path.join(out, name), dpi=120)
        plt.close(fig)


def write_table(results, out):
    f = lambda d: f"{d['fid']:.2f} ± {d['std']:.2f}"
    sampling = "; ".join(f"{k}: {v}" for k, v in results.get("sampling", {}).items())
    rows = [f"FID on classifier features, mean ± standard deviation over {results['seeds']} sampling seeds, "
            f"{results['n']} samples each. Sampling: {sampling}.", "",
            "| s | non-truncated (generated z) | truncated (generated z) | ground-truth z |",
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
    safety.write_text(os.path.join(out, "table.md"), "\n".join(rows) + "\n")


if __name__ == "__main__":
    safety.run_script(main)
