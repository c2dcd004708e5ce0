"""experiment.py -- the paper's conditioning-augmentation findings (CDM §4.3), in miniature.

  python experiment.py                  # the study (8to32wide): ~2 h 20 min on 2 CPU cores, resumable; results/8to32wide/
  python experiment.py --seeds 5        # the study as committed: 5 training seeds (~4 h)
  python experiment.py --quick          # the same pipeline at toy size, into runs/quick/ (numbers are noise)
  python experiment.py --setting 8to16  # the 2x study, 8x8 -> 16x16 (~1 hour), into results/
  python experiment.py --setting 8to32  # the 4x study at full width (~2.3 h)
  python experiment.py --setting 8to32 --a_samples 4096   # then (a), (b) again on 4096 samples a seed
  python experiment.py --a_samples 4096 # the study with (a)-(c) on 4096 samples a seed, not 8192 (~1 h 40 min)
  python experiment.py --setting 8to32wide1000   # the augmented SR trained over every s (~80 min; worse)
  python experiment.py --n 4096 --seeds 10 --out results_gpu  # more samples and seeds, on a GPU
  python experiment.py --solvers        # time-to-quality of the samplers on the demo cascade in runs/
  python experiment.py --guidance       # classifier-free guidance on top of a cascade (~20 min)
  python experiment.py --distilled      # distilled stages (distill.py) against the solvers, per NFE

The study renders the glyphs (digits and b/d/p/q, data.make_glyphs) at the final resolution and,
for each of --seeds independent training seeds, trains with the repository's own scripts:
  base      an 8x8 class-conditional base model (train_base.py, the demo preset)
  sr_aug    an SR stage to the final resolution with Gaussian noise augmentation over s ~ U{0..s_max}
            (train_sr.py)
  sr_none   the same SR stage without augmentation (--aug none)
  single    one non-cascaded model at the final resolution, trained for about the wall time of
            base + sr_aug
The default setting, 8to32wide, is the paper's 4x upsampling (8x8 -> 32x32, the SR stages and the
single model at half width, sr_aug over s <= 500; STUDY32_WIDE). It then samples --n images per
setting, with fresh sampling noise per training seed: the single model; the unaugmented cascade;
the augmented cascade at every s of the sweep, non-truncated (the base's finished z0, re-noised to
z_s) and truncated (the base chain stopped at s); and both SR stages fed ground-truth low-res
images of held-out glyphs. Each is scored by FID on the features of a classifier trained on real
glyphs (evaluate.py; not comparable with Inception FID) against held-out real glyphs, by class
accuracy, and by the brightness of the background border (where an SR stage's speckle shows).
Findings (a), (b) and (c)'s ends are then scored once more on more samples per seed (--a_samples,
by default 8192 for 8to32wide: 1024, even 4096, leave a sampling noise as large as the differences
at 4x), drawn in chunks of --n with other sampling seeds (and other held-out images); FID on
each half of them too gives each difference's sampling noise, beside its spread over seeds. Every
comparison is a paired difference over the training seeds (findings(): the paper's orderings are
"reproduced" only where the mean difference exceeds three standard deviations and every seed
agrees). Outputs in --out: study.json (every number, written as it is measured: a re-run
resumes), findings.md, fid_vs_s.png and compounding.png (the same base samples through both SR
stages). study.json also records a fingerprint of every model its scores were measured with,
and how they were sampled (MEASURED_WITH): a re-run keeps only the scores of the models it has,
so in a fresh clone the committed scores are measured again, with the models trained there.
The other --settings, each into results/SETTING/ (8to16 into results/): 8to16 the 2x study (8x8
-> 16x16, STUDY); 8to32 the 4x study at full width; 8to32small at half width with SR stages
trained 800 steps (too noisy to settle (a)); 8to32hour those trained twice as long over s <= 250;
8to32wide1000 the default with sr_aug trained over every s <= 1000 (the stage came out worse).
--single_budget F adds to a study the single model trained for F times its steps, compared with
both cascades: where it falls depends on its budget.
docs/experiment.md gives the results of each and the settings tried.
"""
import argparse
import hashlib
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
import sample
import trainer

HERE = os.path.dirname(os.path.abspath(__file__))


# --- The study: glyphs, an 8x8 base and an 8->16 SR stage -------------------------------------
# The paper's 16->64 ablation, scaled to what 2 CPU cores train in an hour: an 8x8 base (the demo
# preset), an 8->16 SR stage trained with Gaussian noise augmentation over s ~ U{0..S_MAX} and the
# same stage trained without it (train_sr.py's demo16 preset: velocity prediction, cosine schedule,
# learned variance), and one non-cascaded 16x16 model (the SR network without its z input) trained
# for about the wall time of base + SR on 2 cores (1650 steps; both walls are recorded). Glyphs,
# not shapes: at 8x8 a glyph's strokes are a few pixels, so the base gets them subtly wrong and an
# SR stage that trusts its input draws those errors at 16x16. The settings tried on the way (4x
# upsampling 8->32 and 4->16, other training lengths) and what each showed: docs/experiment.md.
S_MAX = 400
STUDY = {
    "low_res": 8, "res": 16,
    "base": ["--steps", "1000"],
    "sr": ["--preset", "demo16", "--steps", "800", "--s_max", str(S_MAX)],
    "single": ["--ch", "32", "--mult", "1,1,2", "--attn", "4", "--lr", "2e-3", "--steps", "1650"],
    "s": [0, 50, 100, 200, 400],
    "n": 1024,
}
# --setting 8to32: the paper's 4x upsampling (its 16->64 ablation), 8x8 -> 32x32. The SR stages are
# the demo32 network (train_sr.py) given an 8x8 z and trained with s ~ U{0..250}; the single 32x32
# model is that network without z, trained for about the wall time of base + SR (1150 steps). About
# 46 min per training seed on 2 cores, 2.3x the 8to16 study's time (docs/experiment.md).
STUDY32 = {
    "low_res": 8, "res": 32,
    "base": ["--steps", "1200"],
    "sr": ["--preset", "demo32", "--steps", "800", "--s_max", "250"],
    "single": ["--ch", "32", "--mult", "1,1,2", "--attn", "8", "--lr", "2e-3", "--steps", "1150"],
    "s": [0, 100, 250],
    "n": 1024,
}
# --setting 8to32small: the same 4x study with the SR stages and the single model at half the
# channels (--ch 16), about twice as cheap to train and to sample (about 53 min for 3 seeds on 2
# cores); the single model's 1600 steps match base + SR's wall time. Measured: at 800 steps the
# half-width augmented stage is undertrained in some training seeds (one of three), so this
# hour-long 4x study does not settle finding (a) (docs/experiment.md, "settings tried", item 9).
STUDY32_SMALL = {**STUDY32, "sr": [*STUDY32["sr"], "--ch", "16"],
                 "single": ["--ch", "16", "--mult", "1,1,2", "--attn", "8", "--lr", "2e-3", "--steps", "1600"]}
# --setting 8to32hour: 8to32small with its SR stages trained twice as long (1600 steps), which mends
# the undertrained augmented stage item 9 measured; the single model's 2400 steps match base + SR's
# wall time (docs/experiment.md, "settings tried", item 10).
STUDY32_HOUR = {**STUDY32_SMALL, "sr": ["--preset", "demo32", "--steps", "1600", "--s_max", "250", "--ch", "16"],
                "single": ["--ch", "16", "--mult", "1,1,2", "--attn", "8", "--lr", "2e-3", "--steps", "2400"]}
# --setting 8to32wide: 8to32hour with the augmented stage trained over twice the range of s,
# U{0..500}, and s = 500 added to the sweep: at s* = 250, the end of 8to32hour's sweep, FID was
# still falling, so the U's rising side lay beyond it (docs/experiment.md, "settings tried", item 11).
# Only the augmented stage differs: --s_max does not touch the unaugmented one (its weights are the
# same bits with either value). The study (docs/experiment.md): `python experiment.py` runs it,
# findings (a) and (b) included on 8 x n samples per seed (a_chunks: the default --a_samples, in
# chunks of n; 4096 samples left about 0.3 FID of sampling noise in the single model's values).
STUDY32_WIDE = {**STUDY32_HOUR, "sr": ["--preset", "demo32", "--steps", "1600", "--s_max", "500", "--ch", "16"],
                "s": [0, 100, 250, 500], "a_chunks": 8}
# --setting 8to32wide1000: 8to32wide with the augmented stage trained over the whole range of s,
# U{0..1000}, and s = 750 added to the sweep: at s = 500, the end of 8to32wide's sweep, FID had risen
# from s* = 250 in every seed but inside the spread. Measured: the whole range costs the half-width
# stage at every s, and the single model beats it (docs/experiment.md, "settings tried", item 12).
STUDY32_WIDE1000 = {**STUDY32_HOUR, "sr": ["--preset", "demo32", "--steps", "1600", "--s_max", "1000", "--ch", "16"],
                    "s": [0, 100, 250, 500, 750]}
SETTINGS = {"8to16": STUDY, "8to32": STUDY32, "8to32small": STUDY32_SMALL, "8to32hour": STUDY32_HOUR,
            "8to32wide": STUDY32_WIDE, "8to32wide1000": STUDY32_WIDE1000}
DEFAULT_SETTING = "8to32wide"
s_max = lambda cfg: int(cfg["sr"][cfg["sr"].index("--s_max") + 1])
STUDY_STAGES = ("base", "sr_aug", "sr_none", "single")
single_key = lambda f: f"single_x{f:g}"   # --single_budget f: its run folder and its scores' key
FIGURE_PER_CLASS = 2   # base samples per class carried through both SR stages in the figure
# Samples drawn at once. On 2 CPU cores a 32x32 stage samples 1024 images twice as fast in chunks
# of 64 as in one batch (the activations of a chunk stay in cache; docs/speed.md). Each chunk has
# its own noise, so the chunk size is part of how a score was measured (SAMPLING, recorded).
SAMPLE_BATCH = 64
SAMPLING = f"chunks of {SAMPLE_BATCH}, sample.chunk_generator"


def train(script, args, out, quick, log, budget=1):
    """Run one of the training scripts (skipped if it has finished with the same flags: its
    checkpoint and wall.json, written after it with the flags, are there); returns its wall time.
    --quick trains 10 steps, budget x 10 for a single model given budget x its steps."""
    wall = os.path.join(out, "wall.json")
    extra = ["--steps", str(max(1, round(10 * budget))), "--n_train", "256", "--sample_steps", "4"] if quick else []
    # the flags it is trained with, the data file by its name (rendered the same in any folder)
    flags = [os.path.basename(v) if k and args[k - 1] == "--data" else v for k, v in enumerate(args)] + extra
    if os.path.exists(wall) and os.path.exists(os.path.join(out, "ckpt.pt")):
        done = json.load(open(wall))
        if done.get("flags", flags) == flags:     # a wall.json without flags is older: taken as it is
            return done["seconds"]
        log(f"{os.path.relpath(out)} was trained with other flags ({' '.join(done['flags'])}): training it again")
    t0 = time.time()
    # --overwrite: a run stopped before it finished (no wall.json) left in `out`, this experiment's
    # own folder, at most a checkpoint saved on the way, its log and previews; it is trained again
    # from the start, so that its wall time is the whole run's
    cmd = [sys.executable, os.path.join(HERE, script), *args, *extra, "--out", out, "--no_progress",
           "--log_every", "100", "--overwrite"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    if p.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    seconds = time.time() - t0
    safety.write_json(os.path.join(out, "wall.json"), {"seconds": seconds, "flags": flags})
    log(f"trained {os.path.relpath(out)} in {seconds / 60:.1f} min")
    return seconds


class Scorer:
    """FID, class accuracy and border brightness of samples against real held-out images at one
    resolution, on the features of a classifier trained on the real training images (evaluate.py)."""

    def __init__(self, source, res, cache, num_classes, real_x, seed=0):
        self.clf = evaluate.get_classifier(source, res, cache, num_classes, seed)
        self.real_feats = evaluate.embed_and_probs(self.clf, data.to_rgb(real_x))[0]
        self.width = max(1, res // 8)

    def __call__(self, x_float, labels, halves=False):
        """The scores of samples x_float; with halves=True also "fid_halves", FID on the first and
        on the second half of them (sampling_noise reads them)."""
        u8 = data.to_rgb(data.to_uint8(x_float))      # the classifier reads 3 channels
        feats = evaluate.embed_and_probs(self.clf, u8)[0]
        out = {"fid": evaluate.fid(feats, self.real_feats),
               "accuracy": (evaluate.predict(self.clf, u8) == labels).float().mean().item(),
               "border": evaluate.border_mean(u8, self.width)}
        if halves:
            h = len(feats) // 2
            out["fid_halves"] = [evaluate.fid(feats[:h], self.real_feats), evaluate.fid(feats[h:], self.real_feats)]
        return out

    @classmethod
    def shapes(cls, res, out, seed, n_real):
        """A Scorer against n_real held-out shapes images (--solvers, --guidance); its classifier
        is cached in OUT."""
        real = data.load_dataset("shapes", res, "test", n=n_real, seed=seed)
        return cls("shapes", res, os.path.join(out, f"classifier_shapes_{res}px.pt"), real.num_classes, real.x, seed)


def render_glyphs(folder, res, quick):
    """The study's data: glyphs rendered at `res` as ADM .npz files (written once): a training
    set (700 per class, renderer seed 0) and a held-out set (300 per class, seed 1), half of it
    the FID reference and half the real images given to the SR stages and the real-data floor."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for split, per_class, seed in (("train", 60 if quick else 700, 0), ("test", 40 if quick else 300, 1)):
        paths[split] = os.path.join(folder, f"glyphs{res}_{split}.npz")
        if not os.path.exists(paths[split]):
            x, y = data.make_glyphs(per_class, res, seed)
            data.save_npz(paths[split], np.repeat(x[..., None], 3, axis=-1), y)
    return paths


def study(args):
    """The miniature of the paper's conditioning-augmentation ablation (CDM §4.3): see STUDY and
    docs/experiment.md. Resumable: trained models are reused and every score is written to
    OUT/study.json as soon as it is measured; a re-run with other settings is refused (more
    --seeds or other --s values add to it)."""
    cfg = dict(SETTINGS[args.setting])
    if args.quick:
        cfg.update(s=[0, 100], n=42, a_chunks=min(cfg.get("a_chunks", 0), 2))   # 2 chunks: the same code
    if args.s:
        cfg["s"] = sorted({int(v) for v in args.s.split(",")} | {0})
    n = args.n or cfg["n"]
    if args.a_samples is not None and (args.a_samples % n or args.a_samples < 2 * n):
        raise SystemExit(f"error: --a_samples {args.a_samples}: finding (a)'s samples are drawn in chunks of "
                         f"--n ({n}): give a multiple of it, at least {2 * n}")
    low, res = cfg["low_res"], cfg["res"]
    device = trainer.pick_device(args.device)     # a bad --device is refused before OUT is made
    path, results, log = resumable(args.out, "study.json")
    made = {k: v for k, v in {**cfg, "n": n, "steps_scale": args.steps_scale, "quick": args.quick}.items()
            if k not in ("s", "seeds", "a_chunks")}
    if results.setdefault("made_with", made) != made:
        differ = ", ".join(k for k in made if results["made_with"].get(k) != made[k])
        raise SystemExit(f"error: {path} was measured with other settings ({differ}); give another --out, "
                         "or the flags it was made with")
    t_start, spent = time.time(), results.get("seconds", 0.0)
    paths = render_glyphs(os.path.join(args.out, "data"), res, args.quick)
    test = data.load_dataset(paths["test"], res)
    num_classes = int(test.y.max()) + 1
    rank = torch.zeros_like(test.y)          # each image's place among the held-out images of its class
    for j in range(num_classes):
        rank[test.y == j] = torch.arange(int((test.y == j).sum()))
    half = rank % 2 == 0                     # every other image of each class: the FID reference
    score = Scorer(paths["train"], res, os.path.join(args.out, f"classifier_glyphs{res}.pt"), num_classes,
                   test.x[half], seed=0)
    now = {"classifier": fingerprint(score.clf), "sampling": SAMPLING}
    record = results.setdefault(MEASURED_WITH, {})
    # single models with other budgets: those asked for and those this study has already (a re-run,
    # e.g. with more --seeds, gives the new seeds them too)
    budgets = sorted(set(args.single_budget) | set(results.get("config", {}).get("single_budget", [])))
    keep_extra_seeds(results, args, sweep_keys(cfg["s"], budgets), now, record, device, log)
    # the classifier and the way of sampling are every seed's, so they are checked for all seeds at
    # once (checked with each seed's models, the first seed would record them and the others' scores
    # measured otherwise would be kept); each seed's models are checked below, once it has them
    stale_scores([*results.get("seeds", {}).values(), *results.get("a_samples", {}).get("seeds", {}).values()],
                 lambda key: ["classifier", *sampled(key)], now, record, path, os.path.join(args.out, "runs"), log)
    pool = [torch.nonzero((test.y == j) & ~half)[:, 0].tolist() for j in range(num_classes)]
    c = torch.arange(n) % num_classes
    held_out = lambda j=0: data.to_float(test.x[held_out_index(pool, c, j)])
    real = held_out()
    real_low = cdm.downsample(real, low)              # their ground-truth low-res z0
    scale = lambda flags, f=1: [str(round(int(v) * args.steps_scale * f)) if k and flags[k - 1] == "--steps" else v
                                for k, v in enumerate(flags)]
    log(f"data and classifier ready; {args.seeds} training seeds, {n} samples per setting, s in {cfg['s']}")

    def draw(stage, seed, z=None, s=None, stop_at=0):
        """n samples of one stage with its checkpoint's sampler and steps, stopped at step stop_at
        of the base chain (truncated) or run to x0; drawn in chunks of SAMPLE_BATCH, chunk j with
        its own noise (sample.chunk_generator(seed, j), as sample.py draws its chunks)."""
        sampler = stage.config.get("sampler", "ancestral")
        chain = stage.diffusion.sampling_chain(sampler, stage.config["sample_steps"], stop_at)
        xs = []
        for j, i in enumerate(range(0, n, SAMPLE_BATCH)):
            part = slice(i, i + SAMPLE_BATCH)
            kwargs = {"c": c[part].to(device)}
            if z is not None:
                kwargs["z"] = z[part].to(device)
            if s is not None:
                kwargs["s"] = torch.full((len(kwargs["c"]),), s, dtype=torch.long, device=device)
            shape = (len(kwargs["c"]), stage.channels, stage.resolution, stage.resolution)
            with torch.no_grad():
                xs.append(chain.sample(stage.model, shape, kwargs, sampler=sampler, stop_at=stop_at,
                                       generator=sample.chunk_generator(seed, j, device)).float().cpu())
        return torch.cat(xs)

    def generated(st, key, seed, z0, z_real=None):
        """n samples of a setting, drawn with `seed`: a single model ('single', 'single_x<f>'); the
        unaugmented cascade on the base's samples z0() 'none/generated', the augmented one
        'aug/generated/<s>', or the truncated one 'aug/truncated/<s>' (the base's chain stopped at
        s); or an SR stage given the ground-truth low-res images z_real, 'none/ground_truth' or
        'aug/ground_truth/<s>'."""
        if key.startswith("single"):
            return draw(st[key], seed)
        if key.startswith("none/"):
            return draw(st["sr_none"], seed + 1, z=z_real if key.endswith("/ground_truth") else z0())
        s, aug = int(key.rsplit("/", 1)[1]), st["sr_aug"].config["augment"]
        if key.startswith("aug/truncated/"):
            return draw(st["sr_aug"], seed + 1, s=s, z=draw(st["base"], seed, stop_at=s))
        return draw(st["sr_aug"], seed + 1, s=s,
                    z=renoise(z_real if key.startswith("aug/ground_truth/") else z0(), s, aug, seed))

    # a re-run redraws seed 0's samples for compounding.png (none is kept on disk); where the sweep is
    # complete, s* is known and only its samples and the unaugmented stage's are drawn again
    swept = [f"aug/generated/{v}" for v in cfg["s"]]
    done = all(key in results.get("seeds", {}).get(str(k), {}) for k in range(args.seeds) for key in swept)
    shown = {"none/generated", f"aug/generated/{best_s(results, cfg['s'])}"} if done else set(swept) | {"none/generated"}
    figure = {}
    for k in range(args.seeds):
        seed = ["--seed", str(k), "--data", paths["train"]]
        r = lambda name: os.path.join(args.out, "runs", f"seed{k}", name)
        wall = {
            "base": train("train_base.py", [*seed, *scale(cfg["base"]), "--res", str(low)], r("base"), args.quick, log),
            "sr_aug": train("train_sr.py", [*seed, *scale(cfg["sr"]), "--res", str(res), "--low_res", str(low),
                                            "--aug", "noise"], r("sr_aug"), args.quick, log),
            "sr_none": train("train_sr.py", [*seed, *scale(cfg["sr"]), "--res", str(res), "--low_res", str(low),
                                             "--aug", "none"], r("sr_none"), args.quick, log),
            "single": train("train_base.py", [*seed, *scale(cfg["single"]), "--res", str(res)], r("single"),
                            args.quick, log)}
        for f in budgets:                        # --single_budget: the single model given f x its steps
            wall[single_key(f)] = train("train_base.py", [*seed, *scale(cfg["single"], f), "--res", str(res)],
                                        r(single_key(f)), args.quick, log, budget=f)
        results.setdefault("wall", {})[str(k)] = wall
        st = {name: safety.load_stage(os.path.join(r(name), "ckpt.pt"), device) for name in wall}
        row = results.setdefault("seeds", {}).setdefault(str(k), {})
        # scores of this seed measured with other models (MEASURED_WITH) are measured again
        models = {f"seed{k}/{name}": fingerprint(stage.model) for name, stage in st.items()}
        now.update(models)
        stale_scores([row, results.get("a_samples", {}).get("seeds", {}).get(str(k), {})],
                     lambda key: [f"seed{k}/{m}" for m in study_uses(key)], models, record, path,
                     os.path.join(args.out, "runs"), log, f"seed {k}: ")
        sample_seed = 1000 * (k + 1)             # fresh sampling noise for every training seed
        base_z0 = {}

        def z0():                                # the base's finished samples, drawn once per seed
            if "z0" not in base_z0:
                base_z0["z0"] = draw(st["base"], sample_seed)
            return base_z0["z0"]

        def measure(key, make, keep=False):
            if key in row and not (keep and k == 0 and key in shown and key not in figure):
                return
            t0 = time.time()
            x = make()
            if keep and k == 0:
                figure[key] = x[figure_index(c, num_classes)]
            if key not in row:
                row[key] = score(x, c)
                results["seconds"] = spent + time.time() - t_start
                safety.write_json(path, results, allow_nan=True)
                log(f"seed {k}, {key}: FID {row[key]['fid']:.2f}, accuracy {row[key]['accuracy']:.3f}, "
                    f"border {row[key]['border']:.1f} ({time.time() - t0:.0f} s)")

        if k == 0:
            seed0 = (st, sample_seed)
        measure("real", lambda: real)            # the floor: real images that are not the reference
        measure("single", lambda: generated(st, "single", sample_seed, z0))
        for f in budgets:
            measure(single_key(f), lambda: generated(st, single_key(f), sample_seed, z0))
        measure("none/generated", lambda: generated(st, "none/generated", sample_seed, z0), keep=True)
        measure("none/ground_truth", lambda: generated(st, "none/ground_truth", sample_seed, z0, real_low))
        for s in cfg["s"]:
            measure(f"aug/generated/{s}", lambda: generated(st, f"aug/generated/{s}", sample_seed, z0), keep=True)
            measure(f"aug/ground_truth/{s}", lambda: generated(st, f"aug/ground_truth/{s}", sample_seed, z0,
                                                               real_low))
            if s:
                measure(f"aug/truncated/{s}", lambda: generated(st, f"aug/truncated/{s}", sample_seed, z0))
        if k == 0 and "base" not in figure and figure:
            figure["base"] = torch.nn.functional.interpolate(z0(), scale_factor=res // low)[figure_index(c, num_classes)]

    # --a_samples N: findings (a), (b) and (c)'s ends once more on N samples per training seed, where
    # 1024 leave too much sampling noise (docs/experiment.md). The settings they compare (big_keys:
    # the single model, the unaugmented cascade, the augmented one at each end of the sweep and at
    # s*, the truncated one at its best s, and the augmented stage on ground-truth inputs at both
    # ends) are drawn in N / n chunks of n, each chunk with its own sampling seed and held-out
    # images, and written to OUT/runs/seedK/a_samples/ as soon as it is drawn (a re-run draws only
    # what is missing); FID is then taken on all N at once, and on each half (sampling_noise).
    a_n = args.a_samples or results.get("a_samples", {}).get("n") or cfg.get("a_chunks", 0) * n
    if a_n:
        old = results.get("a_samples", {})       # scores on another N are taken again, from the chunks
        big = results["a_samples"] = {"n": a_n, "seeds": old["seeds"] if old.get("n") == a_n else {}}
        cc = c.repeat(a_n // n)
        for k in sorted(map(int, results["seeds"])):     # the seeds asked for, and those kept beyond them
            row = big["seeds"].setdefault(str(k), {})
            # a score without its halves (measured before they were taken) is taken again from its chunks
            todo = [key for key in big_keys(results, cfg["s"]) if "fid_halves" not in row.get(key, {})]
            if not todo:
                continue
            r = lambda name: os.path.join(args.out, "runs", f"seed{k}", name)
            st = {name: safety.load_stage(os.path.join(r(name), "ckpt.pt"), device)
                  for name in ("base", "sr_aug", "sr_none", "single")}
            chunks = {key: [] for key in todo}
            for j in range(a_n // n):
                t0, file = time.time(), os.path.join(r("a_samples"), f"{j}.pt")
                have = torch.load(file, weights_only=True) if os.path.exists(file) else {}
                models = {name: now[f"seed{k}/{name}"] for name in st}   # what this chunk is drawn with
                forget_stale([have], lambda key: [*study_uses(key), *sampled(key)], {**models, "sampling": SAMPLING},
                             have.setdefault(MEASURED_WITH, {}))
                seed = 1_000_000 * (k + 1) + 1000 * j   # apart from every seed the sweep above uses
                missing = [key for key in todo if key not in have]

                def z0():                            # this chunk's base samples, kept with it
                    if "z0" not in have:
                        have["z0"] = draw(st["base"], seed)
                    return have["z0"]
                # ground-truth inputs: this chunk's own held-out images (chunk 0's are the sweep's)
                z_real = cdm.downsample(held_out(j), low) if any("/ground_truth" in key for key in missing) else None
                for key in missing:   # uint8: all the scorer reads of a sample
                    have[key] = data.to_uint8(generated(st, key, seed, z0, z_real))
                if missing:
                    safety.save_checkpoint(have, file)
                    log(f"seed {k}, (a)-(c) on {a_n} samples: chunk {j + 1} of {a_n // n} drawn "
                        f"({time.time() - t0:.0f} s)")
                for key in todo:
                    chunks[key].append(have[key])
            for key in todo:
                row[key] = score(data.to_float(torch.cat(chunks[key])), cc, halves=True)
                results["seconds"] = spent + time.time() - t_start
                safety.write_json(path, results, allow_nan=True)
                log(f"seed {k}, {key} on {a_n} samples: FID {row[key]['fid']:.2f}, "
                    f"accuracy {row[key]['accuracy']:.3f}")
    results.update(config={**made, "s": cfg["s"], "seeds": len(results["seeds"]), "single_budget": budgets,
                           "a_samples": a_n}, seconds=spent + time.time() - t_start)
    results["findings"] = findings(results)
    safety.write_json(path, results, allow_nan=True)
    best = f"aug/generated/{results['findings']['best_s']}"
    if figure and best not in figure:           # s* moved, its scores measured again: draw its row
        st, seed = seed0
        z = draw(st["base"], seed)
        figure[best] = generated(st, best, seed, lambda: z)[figure_index(c, num_classes)]
    plot_study(results, figure, args.out, low, res)
    write_findings(results, args.out)
    log(f"done: {results['seconds'] / 60:.1f} min in all; wrote {path}, findings.md, fid_vs_s.png"
        + (", compounding.png" if figure else ""))


def held_out_index(pool, c, j=0):
    """Which held-out images are the ground-truth inputs for the classes c: the sweep's (j = 0) and
    chunk j's of --a_samples. pool[y] lists the held-out images of class y that are not the FID
    reference; chunk j takes the next ones of each class after chunk j - 1's, cycling through the
    pool once it is used up, so the chunks' inputs differ as long as the pool lasts."""
    per_chunk = int(torch.bincount(c).max())        # images of a class a chunk takes (at most)
    seen, take = [0] * len(pool), []
    for y in c.tolist():
        take.append(pool[y][(j * per_chunk + seen[y]) % len(pool[y])])
        seen[y] += 1
    return take


def figure_index(c, num_classes):
    """Indices of the first FIGURE_PER_CLASS samples of each class, class by class."""
    return torch.tensor([i for j in range(num_classes) for i in torch.nonzero(c == j)[:FIGURE_PER_CLASS, 0].tolist()])


def study_uses(key):
    """The stages a study's score was measured with (besides the classifier): the real images none,
    the single models themselves, a cascade on ground-truth inputs its SR stage, and on generated
    inputs the base too; the base alone (its samples, kept with --a_samples chunks) for 'z0'."""
    if key == "real":
        return []
    if key == "z0":
        return ["base"]
    if key.startswith("single"):
        return [key]
    stage = "sr_none" if key.startswith("none/") else "sr_aug"
    return [stage] if "/ground_truth" in key else ["base", stage]


def sampled(key):
    """'sampling' for every score of the study drawn by a model (all but the real images): how its
    samples were drawn (SAMPLING) is part of how it was measured."""
    return ["sampling"] if study_uses(key) else []


def sweep_keys(s, budgets):
    """The settings the study scores on every training seed (study(), measure()): the real images,
    the single models, the unaugmented stage on generated and ground-truth inputs, and the augmented
    one at each s of the sweep on generated, ground-truth and (s > 0) truncated inputs."""
    return {"real", "single", *map(single_key, budgets), "none/generated", "none/ground_truth",
            *[f"aug/{kind}/{v}" for v in s for kind in ("generated", "ground_truth", "truncated")
              if v or kind != "truncated"]}


def keep_extra_seeds(results, args, keys, now, record, device, log):
    """Seeds measured before but beyond --seeds now (a study run with more seeds, as the committed
    one): this run neither trains nor measures them, so their scores are kept only where all their
    models are in OUT/runs, every score was measured with those models, this classifier and this
    way of sampling, and the seed has a score for every one of `keys` (the sweep of this run: a seed
    stopped half-way, or swept over other s, has not); otherwise the seed is dropped whole (findings
    pair the seeds setting by setting, so a seed is all in or all out). In a fresh clone the
    committed study's extra seeds are dropped: never mixed with this run's. Their models'
    fingerprints go into `now`."""
    asked = {str(k) for k in range(args.seeds)}
    big = results.get("a_samples", {}).get("seeds", {})
    for key in sorted(set(results.get("seeds", {})) - asked, key=int):
        files = {name: os.path.join(args.out, "runs", f"seed{key}", name, "ckpt.pt")
                 for name in results.get("wall", {}).get(key, {})}
        models = {}
        if files and all(os.path.exists(f) for f in files.values()):
            models = {f"seed{key}/{name}": fingerprint(safety.load_stage(f, device).model) for name, f in files.items()}
        uses = lambda score: ["classifier", *sampled(score), *[f"seed{key}/{m}" for m in study_uses(score)]]
        rows = [results["seeds"][key], big.get(key, {})]
        if models and keys <= set(rows[0]) and all(measured_with(uses(score), {**now, **models}, record)
                                                   for row in rows for score in row if score != MEASURED_WITH):
            now.update(models)
            continue
        for table in (results["seeds"], big, results.get("wall", {})):
            table.pop(key, None)
        log(f"seed {key} (beyond --seeds {args.seeds}): its models are not in {os.path.join(args.out, 'runs')}, "
            f"its scores were measured otherwise, or some are missing: its scores are dropped "
            f"(--seeds {int(key) + 1} measures them)")


def per_seed(results, key, metric="fid"):
    """The metric of one setting, one value per training seed (those measured)."""
    return np.array([row[key][metric] for _, row in sorted(results["seeds"].items()) if key in row])


def paired(results, worse, better, metric="fid"):
    """The paired difference worse - better over training seeds: per-seed values, mean, sample
    standard deviation, and whether it is reproduced (mean > 3 std, positive in every seed) or its
    opposite is (the same, negative)."""
    d = per_seed(results, worse, metric) - per_seed(results, better, metric)
    sd = float(np.std(d, ddof=1)) if len(d) > 1 else float("nan")
    return {"worse": worse, "better": better, "runs": [float(v) for v in d], "mean": float(np.mean(d)),
            "std": sd, "reproduced": bool(len(d) > 1 and (d > 0).all() and np.mean(d) > 3 * sd),
            "opposite": bool(len(d) > 1 and (d < 0).all() and -np.mean(d) > 3 * sd)}


def sampling_noise(results, worse, better=None):
    """How much of a spread over training seeds the draw of samples alone would give: the standard
    deviation of FID(worse) - FID(better) (of FID(worse) alone where better is None) over redraws
    of the n samples from the same models, estimated from FID on each half of every seed's samples
    ("fid_halves"). The halves are two independent draws of n/2, so the difference D1 - D2 of
    their values has variance 2 sigma_{n/2}^2, and FID's bias, the same in both, cancels. FID's
    sampling variance falls as 1/n at leading order, so
        sigma_n^2 = sigma_{n/2}^2 / 2 = E[(D1 - D2)^2] / 4,
    the expectation taken as the mean over the seeds. Near FID 0, where the noise falls as 1/n
    rather than 1/sqrt(n), this overstates sigma_n, by up to sqrt(2). Settings drawn on the same
    base samples (both cascades) share part of their noise; the halves of their difference count
    only what they do not share. None where a seed has no halves."""
    rows = [row for _, row in sorted(results["seeds"].items())]
    if not rows or any("fid_halves" not in row.get(key, {}) for row in rows for key in (worse, better) if key):
        return None
    halves = lambda row: np.subtract(row[worse]["fid_halves"], row[better]["fid_halves"] if better else 0.0)
    return float(np.sqrt(np.mean([np.diff(halves(row))[0] ** 2 for row in rows])) / 2)


def best_s(results, s, kind="generated"):
    """s*: the s of the sweep with the lowest mean FID on generated inputs (as the paper picks s by
    FID); with kind="truncated", the truncated cascade's best s (s = 0 is no truncation)."""
    return min((v for v in s if v or kind == "generated"),
               key=lambda v: float(np.mean(per_seed(results, f"aug/{kind}/{v}"))))


def big_keys(results, s):
    """The settings --a_samples draws again, those findings (a), (b) and (c) compare: the single
    model, the unaugmented cascade, the augmented one at both ends of the sweep and at s*, the
    truncated one at its best s (both s chosen on the sweep's samples), and the augmented stage
    on ground-truth inputs at both ends of the sweep (the rise of (c), end to end)."""
    return ["single", "none/generated", *[f"aug/generated/{v}" for v in sorted({s[0], best_s(results, s), s[-1]})],
            f"aug/truncated/{best_s(results, s, 'truncated')}", f"aug/ground_truth/{s[0]}", f"aug/ground_truth/{s[-1]}"]


def findings(results):
    """The paper's findings (a)-(d) as paired FID differences, each 'worse - better' (positive
    where the paper's ordering holds). s* is the s with the lowest mean FID on generated inputs,
    chosen on the same seeds (as the paper picks s by FID)."""
    s = results["config"]["s"]
    best = best_s(results, s)
    best_t = best_s(results, s, "truncated")
    gen = lambda v: f"aug/generated/{v}"
    gt = lambda v: f"aug/ground_truth/{v}"
    trio = {"no augmentation worse than the single model": ("none/generated", "single"),   # the paper's three
            f"single model worse than augmentation at s* = {best}": ("single", gen(best)),
            f"no augmentation worse than augmentation at s* = {best}": ("none/generated", gen(best))}
    out = {"best_s": best, "best_s_truncated": best_t, "a": {
        **{name: paired(results, *pair) for name, pair in trio.items()},
        "no augmentation worse than augmentation at s = 0": paired(results, "none/generated", gen(0)),
        # truncation (CDM §3.2) is the paper's other form of noise augmentation: its best s too
        f"single model worse than truncated augmentation at its best s = {best_t}": (
            paired(results, "single", f"aug/truncated/{best_t}"))},
        "b": u_shape(results, s, best),
        "c": {f"s = {b} worse than s = {a} (ground-truth inputs)": paired(results, gt(b), gt(a))
              for a, b in zip(s, s[1:])},
        "d": {f"non-truncated worse than truncated at s = {v}": paired(results, gen(v), f"aug/truncated/{v}")
              for v in s if v}}
    for f in results["config"].get("single_budget", []):    # --single_budget: where the single model sits
        key, more = single_key(f), f"single model given {f:g}x its training steps"
        if all(key in row for row in results["seeds"].values()):
            out["a"][f"no augmentation worse than the {more}"] = paired(results, "none/generated", key)
            out["a"][f"{more} worse than augmentation at s* = {best}"] = paired(results, key, gen(best))
    rise = f"s = {s[-1]} worse than s = {s[0]} (ground-truth inputs)"      # (c) end to end
    out["c"][rise] = paired(results, gt(s[-1]), gt(s[0]))
    out["a"]["ground-truth inputs: augmented stage at s = 0 worse than the unaugmented one"] = paired(
        results, gt(0), "none/ground_truth")
    # (a) again in class accuracy, the other metric the ablation is scored by: accuracy of the
    # setting the paper says is better minus the worse one (positive where its ordering holds)
    in_accuracy = lambda src, diffs: {name: paired(src, d["better"], d["worse"], "accuracy")
                                      for name, d in diffs.items()}
    out["a_accuracy"] = in_accuracy(results, out["a"])
    big = results.get("a_samples")    # --a_samples: (a)-(c) again, on more samples per seed
    complete = lambda *keys: big and len(big["seeds"]) == len(results["seeds"]) and all(
        key in row for row in big["seeds"].values() for key in keys)
    if complete(*[key for pair in trio.values() for key in pair]):
        # every comparison of (a) whose two settings were drawn there: the paper's three, and s = 0
        out["a_samples"] = {name: paired(big, d["worse"], d["better"]) for name, d in out["a"].items()
                            if complete(d["worse"], d["better"])}
    if complete(gen(s[0]), gen(best), gen(s[-1])):   # s* stays the sweep's: chosen on other samples
        out["b_samples"] = u_shape(big, s, best)
    if complete(gt(s[0]), gt(s[-1])):
        out["c_samples"] = {rise: paired(big, gt(s[-1]), gt(s[0]))}
    for part in ("a_samples", "b_samples", "c_samples"):
        if part in out:
            for d in out[part].values():             # what of its spread the draw alone would give
                d["sampling_noise"] = sampling_noise(big, d["worse"], d["better"])
            out[f"{part}_accuracy"] = in_accuracy(big, out[part])
    return out


def u_shape(results, s, best):
    """Finding (b), FID against s U-shaped with generated inputs: both sides of the U at s*, each
    'worse - better'. Where s* is an end of the sweep, that side of the U lies outside it and is
    not compared."""
    gen = lambda v: f"aug/generated/{v}"
    out = {}
    if best != s[0]:
        out[f"s = {s[0]} worse than s* = {best}"] = paired(results, gen(s[0]), gen(best))
    if best != s[-1]:
        out[f"s = {s[-1]} worse than s* = {best}"] = paired(results, gen(s[-1]), gen(best))
    return out



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (trained models go to OUT/runs); default "
                   "results/, results/SETTING/ for another --setting, and runs/quick/ with --quick")
    p.add_argument("--seeds", type=int, default=None,
                   help="the study: independent training seeds, each with its own sampling noise (default 3; "
                        "the committed 8to32wide study has 5: seeds beyond --seeds are kept where their "
                        "models are in OUT/runs); "
                        "--solvers/--guidance: sampling seeds (default 2)")
    p.add_argument("--n", type=int, default=None,
                   help=f"samples per setting (default {STUDY['n']} for the study, 512 for --solvers/--guidance)")
    p.add_argument("--s", default=None, help="the study: augmentation times to sweep (default "
                   + ",".join(map(str, SETTINGS[DEFAULT_SETTING]["s"])) + "; 0 is always included)")
    p.add_argument("--setting", default=None, choices=sorted(SETTINGS),
                   help=f"the study (default {DEFAULT_SETTING}): 8to32wide, the paper's 4x upsampling, 8x8 "
                        "base -> 32x32 at half width with the augmented stage trained over s <= 500, (a)-(c) "
                        "on 8 x --n samples a seed (about 2 h 20 min on 2 cores, into results/8to32wide/); 8to16: "
                        "8x8 -> 16x16 (about an hour, into results/); 8to32: 4x at full width (about 2 h 20 "
                        "min); 8to32small: at half width (53 min); 8to32hour: that with SR stages trained "
                        "twice as long (70-80 min); 8to32wide1000: the augmented stage over every s (80 min)")
    p.add_argument("--single_budget", default=None,
                   help="the study: also train the single model for F times its steps, for each F given "
                        "(e.g. 2 or 0.5,2), and compare it with both cascades; adds to an existing OUT")
    p.add_argument("--a_samples", type=int, default=None,
                   help="the study: also score the settings findings (a)-(c) compare (single model, "
                        "cascade without augmentation, with it at s = 0, s* and the last s, truncated at its "
                        "best s, the augmented stage on ground-truth inputs at the first and last s) on N "
                        "samples per training seed, a multiple of --n drawn in chunks (default 8 x --n for "
                        "8to32wide, about 25 min per seed on 2 cores; none for the other settings); "
                        "adds to an existing OUT")
    p.add_argument("--steps_scale", type=float, default=1.0,
                   help="the study: multiply every stage's training steps (e.g. 10 on a GPU)")
    p.add_argument("--device", default="auto", help="the study's sampling: 'auto', 'cpu', 'cuda' "
                   "(training runs on the training scripts' default device)")
    p.add_argument("--seed", type=int, default=0, help="--solvers/--guidance: seed for training and sampling")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (a minute or two; numbers are noise)")
    p.add_argument("--runs", default="runs", help="--solvers: the folder with base/, sr16/, sr32/")
    p.add_argument("--grid", default=None, help=argparse.SUPPRESS)   # --solvers: a smaller grid (JSON)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)   # --solvers: results file name
    p.add_argument("--guidance", action="store_true",
                   help="instead: class accuracy, FID and IS against the guidance weight w, guiding the "
                        "base only or every stage, of demo cascades trained with and without --p_uncond "
                        "(writes OUT/guidance.json, guidance.png, guidance.md)")
    p.add_argument("--distilled", action="store_true",
                   help="instead: class accuracy and FID at 32x32 against network evaluations per stage, "
                        "the whole demo cascade in runs/ distilled (distill.py: runs/<stage>_pd/) and with "
                        "every solver (writes OUT/distilled.json, distilled.png, distilled.md)")
    p.add_argument("--solvers", action="store_true",
                   help="instead: FID and accuracy against network evaluations for each sampler, per "
                        "stage of the demo cascade in runs/ (writes OUT/solvers.json, fid_vs_nfe.png)")
    args = p.parse_args(argv)
    setting_given, args.setting = args.setting is not None, args.setting or DEFAULT_SETTING
    # --quick writes beside the trained models (runs/ is not committed), never into the results/
    # folders that hold the committed study: its toy numbers would be refused there, or mixed in
    mode = "guidance" if args.guidance else "solvers" if args.solvers else "distilled" if args.distilled else None
    if args.out is None and args.quick:
        args.out = os.path.join("runs", "quick", mode or args.setting)
    elif args.out is None:
        args.out = "results" if mode or args.setting == "8to16" else f"results/{args.setting}"
    for flag, v in (("--seeds", args.seeds), ("--n", args.n)):
        if v is not None and v < 2:
            raise SystemExit(f"error: {flag} {v}: give at least 2 (a spread needs two values)")
    if args.steps_scale <= 0:
        raise SystemExit(f"error: --steps_scale {args.steps_scale}: give a positive factor")
    study_only = [f for f, given in (("--setting", setting_given),
                                     ("--single_budget", args.single_budget is not None),
                                     ("--a_samples", args.a_samples is not None)) if given]
    if study_only and (args.solvers or args.guidance or args.distilled):
        raise SystemExit(f"error: {' and '.join(study_only)} {'is' if len(study_only) == 1 else 'are'} the "
                         "study's; --solvers, --guidance and --distilled measure the demo cascade: leave "
                         f"{'it' if len(study_only) == 1 else 'them'} out")
    if args.single_budget is not None:
        given = args.single_budget
        try:
            args.single_budget = sorted({float(v) for v in given.split(",")})
        except ValueError:
            raise SystemExit(f"error: --single_budget {given!r}: give comma-separated factors, e.g. 2 or 0.5,2") from None
        if any(not 0.1 <= f <= 100 or f == 1 for f in args.single_budget):
            raise SystemExit(f"error: --single_budget {given}: give factors from 0.1 to 100, "
                             "other than 1 (1 is the single model itself)")
    args.single_budget = args.single_budget or []
    if args.distilled:
        args.seeds, args.n = args.seeds or 3, args.n or 256
        return distilled(args)
    if args.solvers or args.guidance:
        args.seeds, args.n = args.seeds or 2, args.n or 512
        return solvers(args) if args.solvers else guidance(args)
    args.seeds = args.seeds or (2 if args.quick else 3)
    if args.s:
        try:
            values = [int(v) for v in args.s.split(",")]
        except ValueError:
            raise SystemExit(f"error: --s {args.s!r}: give comma-separated integers, e.g. 0,50,100") from None
        top = s_max(SETTINGS[args.setting])
        if min(values) < 0 or max(values) > top:
            raise SystemExit(f"error: --s {args.s}: the SR stage is trained on s in 0..{top}; sweep inside it")
        if max(values) == 0:     # s* and the truncated cascade need an s > 0 to compare with s = 0
            raise SystemExit(f"error: --s {args.s}: give at least one s > 0 (s = 0 is always swept)")
    return study(args)


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


# --- Which models a score was measured with --------------------------------------------------
# Every results file here records beside its scores a fingerprint of each model they were measured
# with (MEASURED_WITH: the stages, and the classifier whose features FID reads). A re-run keeps a
# score only where those models are still the same bits; every other score is dropped and measured
# again with the models that are here. So a fresh clone, whose results/ hold the scores committed
# with the repository while its models are trained anew, reports its own measurements, never ours;
# and so does a study after a stage was trained again to other weights or a checkpoint replaced. A
# stage trained again to the same bits (the same seed on the same machine) keeps its scores.
MEASURED_WITH = "measured_with"


def fingerprint(net):
    """A short hash of a network's weights (each tensor's name and bytes, in order): the same
    weights give the same string, on any device."""
    h = hashlib.sha256()
    for name, w in net.state_dict().items():
        h.update(name.encode())
        h.update(w.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def measured_with(models, now, record):
    """Whether a score measured with `models` (names) was measured with the ones here now: each is
    here (in `now`, name -> fingerprint) and `record` gives it the same fingerprint."""
    return all(m in now and record.get(m) == now[m] for m in models)


def forget_stale(tables, uses, now, record):
    """Drop from each of `tables` (key -> scores) every score not measured with the models here now:
    uses(key) names the models a score was measured with, now[name] is each one's fingerprint now
    and record[name] its fingerprint when the file's scores were measured (missing from record:
    not recorded, as in a file written elsewhere or before fingerprints were; missing from now:
    not here). Then records `now`. Returns the keys dropped."""
    dropped = []
    for table in tables:
        for key in [k for k in table if k != MEASURED_WITH]:
            if not measured_with(uses(key), now, record):
                del table[key]
                dropped.append(key)
    record.update(now)
    return dropped


def stale_scores(tables, uses, now, record, path, runs, log, prefix=""):
    """forget_stale on the scores of the results file at `path`, saying how many it dropped."""
    stale = forget_stale(tables, uses, now, record)
    if stale:
        log(f"{prefix}{len(stale)} scores in {path} were measured with other models than those in {runs} "
            "(or another classifier, or sampled otherwise): measuring them again")


def scores_only(results):
    """The (key, scores) of a flat results file, without its MEASURED_WITH record."""
    return [(key, r) for key, r in results.items() if key != MEASURED_WITH]


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
    score = {res: Scorer.shapes(res, args.out, args.seed, 2048) for res in (8, 16, 32)}
    pool = data.load_dataset("shapes", 32, "test", n=4 * N, seed=args.seed + 1)
    by_class = [torch.nonzero(pool.y == k)[:, 0].tolist() for k in range(8)]
    log("classifiers ready")
    now = {**{name: fingerprint(st.model) for name, st in stages.items()},
           **{f"classifier{res}": fingerprint(sc.clf) for res, sc in score.items()}}

    def uses(key):      # a stage's real images: only its resolution's classifier
        name = key.split("/")[0]
        if name not in stages:
            return [key]                          # no such stage here: measured again (and refused there)
        return [f"classifier{stages[name].resolution}"] + ([] if "/real/" in key else [name])
    stale_scores([results], uses, now, results.setdefault(MEASURED_WITH, {}), path, args.runs, log)
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
                    m = score[st.resolution](x, c)
                    fid, acc = m["fid"], m["accuracy"]
                    results[key] = {"fid": fid, "accuracy": acc, "nfe": d.nfe(sampler), "seconds": secs}
                    safety.write_json(path, results, allow_nan=True)
                    log(f"{key}: NFE {d.nfe(sampler)}, FID {fid:.2f}, accuracy {acc:.3f}, {secs:.0f} s")
            if f"{name}/real/{k}" not in results:
                m = score[st.resolution](cdm.downsample(real32, st.resolution), c)
                results[f"{name}/real/{k}"] = {"fid": m["fid"], "accuracy": m["accuracy"]}
    safety.write_json(path, results, allow_nan=True)
    if not args.grid:
        plot_solvers(results, args.out, N)
    log(f"done; wrote {path}")


# Progressive distillation against the solvers (issue 32): the demo cascade (README command 1) and
# its stages distilled by distill.py into RUNS/<stage>_pd/steps<N>/. The whole cascade runs at the
# same NFE per stage -- each stage's own samples handed to the next, non-truncated at each stage's
# own s -- and is scored at 32x32 against held-out real images (FID on the classifier's features,
# class accuracy); the reference is the demo's own sampler, SDE-DPM-Solver++(2M) at 20 steps a
# stage. Heun evaluates twice a step but once on the last: its NFE are 1, 3, 7, 15.
PD_NFE = [1, 2, 4, 8, 16]
PD_SAMPLERS = ["distilled", "ddim", "dpm++2m", "dpm++2m-sde", "ancestral", "heun"]
PD_REFERENCE = ("dpm++2m-sde", 20)
PD_FIGURE = ["distilled", "ddim", "dpm++2m-sde"]   # whose samples the figure shows, at every NFE


def distilled(args):
    path, results, log = resumable(args.out, args.json or "distilled.json")
    names = ("base", "sr16", "sr32")
    plain = [safety.load_stage(os.path.join(args.runs, k, "ckpt.pt")) for k in names]
    rounds = {}                                   # NFE -> the distilled cascade, read once
    N = args.n
    c = torch.arange(N) % 8
    score = Scorer.shapes(32, args.out, args.seed, 2048)
    real = data.load_dataset("shapes", 32, "test", n=N, seed=args.seed + 1)
    settings = [(a, n) for a in PD_SAMPLERS for n in PD_NFE if not (a == "heun" and n == 2)] + [PD_REFERENCE]
    figure = os.path.join(args.out, "distilled_samples")
    os.makedirs(figure, exist_ok=True)
    log("classifier ready")
    round_path = lambda n, nfe: os.path.join(args.runs, f"{n}_pd", f"steps{nfe}", "ckpt.pt")

    def load_round(nfe):      # read once; a round that is not there: load_stage's error
        if nfe not in rounds:
            rounds[nfe] = [safety.load_stage(round_path(n, nfe)) for n in names]
        return rounds[nfe]
    for nfe in PD_NFE:                            # the distilled rounds there are, to fingerprint
        if all(os.path.exists(round_path(n, nfe)) for n in names):
            load_round(nfe)
    now = {"classifier": fingerprint(score.clf), **{n: fingerprint(st.model) for n, st in zip(names, plain)},
           **{f"{n}_pd/steps{nfe}": fingerprint(st.model) for nfe, r in rounds.items() for n, st in zip(names, r)}}

    def uses(key):      # the real images, the undistilled cascade, or a distilled round
        if key.startswith("real/"):
            return ["classifier"]
        if key.startswith("distilled/"):
            return ["classifier", *[f"{n}_pd/steps{key.split('/')[1]}" for n in names]]
        return ["classifier", *names]
    stale_scores([results], uses, now, results.setdefault(MEASURED_WITH, {}), path, args.runs, log)
    for k in range(args.seeds):
        seed_k = args.seed + 1000 * k
        if f"real/{k}" not in results:
            idx = torch.randperm(len(real.y), generator=torch.Generator().manual_seed(seed_k))
            m = score(data.to_float(real.x[idx]), real.y[idx])
            results[f"real/{k}"] = {"fid": m["fid"], "accuracy": m["accuracy"]}
        for sampler, nfe in settings:
            key = f"{sampler}/{nfe}/{k}"
            if key in results:
                continue
            if sampler == "distilled":
                stages = load_round(nfe)
                steps, how = [nfe] * 3, "ddim"
            else:
                stages, how = plain, sampler
                steps = [(nfe + 1) // 2 if sampler == "heun" else nfe] * 3
            t0 = time.time()
            xs = cdm.sample_cascade(stages, c, steps=steps, sampler=how, s=[st.sample_s for st in stages],
                                    generator=torch.Generator().manual_seed(seed_k), progress=False)
            secs = time.time() - t0
            m = score(xs[-1], c)
            used = 2 * steps[0] - 1 if sampler == "heun" else steps[0]
            results[key] = {"fid": m["fid"], "accuracy": m["accuracy"], "nfe": used, "seconds": secs}
            safety.write_json(path, results, allow_nan=True)
            if k == 0 and (sampler in PD_FIGURE or (sampler, nfe) == PD_REFERENCE):   # the figure's rows
                first = torch.cat([torch.nonzero(c == j)[:2, 0] for j in range(8)])   # two per class
                data.save_npz(os.path.join(figure, f"{sampler}_{nfe}.npz"),
                              data.to_uint8(xs[-1][first]).permute(0, 2, 3, 1).numpy(), c[first].numpy())
            log(f"{key}: NFE {used} per stage, FID {m['fid']:.2f}, accuracy {m['accuracy']:.3f}, {secs:.0f} s")
    safety.write_json(path, results, allow_nan=True)
    plot_distilled(results, args.out, N)
    log(f"done; wrote {path}")


def distilled_rows(results):
    """{sampler: [(nfe, fid mean, fid std, accuracy mean, accuracy std, seeds)]} from distilled.json."""
    table = {}
    for key, r in scores_only(results):
        sampler, nfe, _ = key.split("/") if key.count("/") == 2 else (key.split("/")[0], 0, 0)
        table.setdefault(sampler, {}).setdefault(int(nfe), []).append(r)
    sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
    return {sampler: [(runs[0].get("nfe", 0), float(np.mean([r["fid"] for r in runs])), sd([r["fid"] for r in runs]),
                       float(np.mean([r["accuracy"] for r in runs])), sd([r["accuracy"] for r in runs]), len(runs))
                      for nfe, runs in sorted(by_nfe.items())] for sampler, by_nfe in table.items()}


def plot_distilled(results, out, n):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = distilled_rows(results)
    ref = {(p[0]): p for p in rows[PD_REFERENCE[0]]}[PD_REFERENCE[1]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for sampler in PD_SAMPLERS:
        pts = [p for p in rows.get(sampler, []) if p[0] <= max(PD_NFE)]
        x = [p[0] for p in pts]
        for ax, (mean, std) in zip(axes, ((1, 2), (3, 4))):
            ax.errorbar(x, [p[mean] for p in pts], yerr=[0 if np.isnan(p[std]) else p[std] for p in pts],
                        marker="o", capsize=3, label=sampler, lw=2.5 if sampler == "distilled" else 1.2)
    real = rows["real"][0]
    for ax, (mean, std), what in zip(axes, ((1, 2), (3, 4)), ("FID (classifier features)", "class accuracy")):
        ax.axhspan(ref[mean] - ref[std], ref[mean] + ref[std], color="gray", alpha=0.25,
                   label=f"{PD_REFERENCE[0]}, {PD_REFERENCE[1]} steps (±std)")
        ax.axhline(real[mean], color="k", ls=":", label="real held-out images")
        ax.set(xscale="log", xlabel="network evaluations per stage (NFE)", ylabel=what,
               xticks=PD_NFE, xticklabels=[str(v) for v in PD_NFE])
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"The demo cascade at 32x32, every stage at the same NFE ({n} samples, mean ± std over seeds)")
    fig.tight_layout()
    safety.save_figure(fig, os.path.join(out, "distilled.png"), dpi=120)
    plt.close(fig)
    lines = [f"FID at 32x32 on the classifier's features (mean ± std over {rows['real'][0][5]} sampling seeds, "
             f"{n} samples each) and class accuracy; NFE per stage (3 stages).", "",
             "| sampler | " + " | ".join(f"NFE {v}" for v in PD_NFE) + " |", "|---|" + "---|" * len(PD_NFE)]
    for sampler in PD_SAMPLERS:
        by = {p[0]: p for p in rows.get(sampler, [])}
        cell = lambda p: "—" if p is None else f"{p[1]:.2f} ± {p[2]:.2f} ({100 * p[3]:.1f}%)"
        got = [by.get(v) or (by.get(v - 1) if sampler == "heun" else None) for v in PD_NFE]
        lines.append(f"| {sampler} | " + " | ".join(cell(p) + (f" [NFE {p[0]}]" if p and p[0] != v else "")
                                                     for p, v in zip(got, PD_NFE)) + " |")
    lines += [f"| {PD_REFERENCE[0]}, {PD_REFERENCE[1]} steps (reference) | {ref[1]:.2f} ± {ref[2]:.2f} "
              f"({100 * ref[3]:.1f}%) at NFE {PD_REFERENCE[1]} |", f"| real held-out images | {real[1]:.2f} ± {real[2]:.2f} "
              f"({100 * real[3]:.1f}%) |"]
    safety.write_text(os.path.join(out, "distilled.md"), "\n".join(lines) + "\n")
    shown = [(a, v) for a in PD_FIGURE for v in PD_NFE] + [PD_REFERENCE]
    grids = [os.path.join(out, "distilled_samples", f"{a}_{v}.npz") for a, v in shown]
    if all(os.path.exists(g) for g in grids):            # a row per setting: one sample per class
        rows = np.concatenate([np.concatenate(list(np.load(g)["arr_0"][::2]), axis=1) for g in grids])
        fig, ax = plt.subplots(figsize=(rows.shape[1] / 40, rows.shape[0] / 40 + 0.6))
        ax.imshow(rows, interpolation="nearest")
        h = rows.shape[0] // len(shown)
        ax.set_yticks([h * (k + 0.5) for k in range(len(shown))],
                      [f"{a}, NFE {v}" + (" (reference)" if (a, v) == PD_REFERENCE else "") for a, v in shown])
        ax.set_xticks([])
        ax.set_title("one sampling seed, each stage at the row's NFE", fontsize=9)
        fig.tight_layout()
        safety.save_figure(fig, os.path.join(out, "distilled_samples.png"), dpi=72, bbox_inches="tight")
        plt.close(fig)


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
    score = Scorer.shapes(32, args.out, args.seed, 2048)
    log("classifier ready")
    now = {"classifier": fingerprint(score.clf),
           **{f"{name}/{k}": fingerprint(st.model) for name, stages in cascades.items()
              for k, st in zip(("base", "sr16", "sr32"), stages)}}
    stale_scores([results], lambda key: ["classifier", *[f"{key.split('/')[0]}/{k}" for k in ("base", "sr16", "sr32")]],
                 now, results.setdefault(MEASURED_WITH, {}), path, runs, log)
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
    for key, r in scores_only(results):
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
    for key, r in scores_only(results):
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
        real = [r["fid"] for key, r in scores_only(results) if key.startswith(f"{stage}/real/")]
        ax.axhline(np.mean(real), color="gray", ls="--", label="real held-out images")
        lines += [f"| real held-out images | — | {np.mean(real):.2f} | — | {len(real)} |", ""]
        ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample (NFE)",
               ylabel="FID (classifier features)", title=titles[stage])
        ax.legend(fontsize=8)
    fig.tight_layout()
    safety.save_figure(fig, os.path.join(out, "fid_vs_nfe.png"), dpi=120)
    plt.close(fig)
    safety.write_text(os.path.join(out, "solvers.md"), "\n".join(lines) + "\n")


def plot_study(results, figure, out, low, res):
    """fid_vs_s.png: FID against s with generated (non-truncated and truncated) and ground-truth
    low-res inputs, with the unaugmented cascade and the single model as lines (mean and std over
    training seeds); compounding.png: the same base samples through both SR stages."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s, f = results["config"]["s"], results["findings"]
    k = len(results["seeds"])
    stat = lambda key, src=results: (np.mean(per_seed(src, key)),
                                     np.std(per_seed(src, key), ddof=1) if k > 1 else 0)
    big = results["a_samples"] if "b_samples" in f else None     # --a_samples: a third panel
    fig, axes = plt.subplots(1, 3 if big else 2, figsize=(18 if big else 12, 4.3))
    panels = [(axes[0], results, [("aug/generated/{}", "augmented SR, generated z (non-truncated)", "o-"),
                                  ("aug/truncated/{}", "augmented SR, generated z (truncated)", "s--")],
               f"{low}->{res} SR on the base's samples"),
              (axes[1], results, [("aug/generated/{}", "augmented SR, generated z", "o-"),
                                  ("aug/ground_truth/{}", "augmented SR, ground-truth z", "^-")],
               "generated vs ground-truth low-res inputs")]
    if big:
        panels.append((axes[2], big, [("aug/generated/{}", "augmented SR, generated z (non-truncated)", "o-"),
                                      ("aug/truncated/{}", "augmented SR, generated z (truncated)", "s--"),
                                      ("aug/ground_truth/{}", "augmented SR, ground-truth z", "^-")],
                       f"{big['n']} samples per training seed"))
    for ax, src, curves, title in panels:
        for key, label, style in curves:
            xs = [v for v in s if key.format(v) in src["seeds"]["0"]]
            ms = [stat(key.format(v), src) for v in xs]
            ax.errorbar(xs, [m for m, _ in ms], yerr=[e for _, e in ms], fmt=style, capsize=3, label=label)
        budgets = [(single_key(f), f"single {res}x{res} model, {f:g}x its steps", (0, (1, 1)))
                   for f in results["config"].get("single_budget", [])]
        for key, label, style in (("single", f"single {res}x{res} model", "--"), *budgets,
                                  ("none/generated", "SR without augmentation, generated z", ":"),
                                  ("none/ground_truth", "SR without augmentation, ground-truth z", "-.")):
            # the left panel: the cascade on generated inputs, against every alternative; the right:
            # generated against ground-truth inputs, with the models of the study itself
            if key in src["seeds"]["0"] and key not in ({"none/ground_truth"} if ax is axes[0]
                                                        else {b[0] for b in budgets}):
                m, e = stat(key, src)
                ax.axhline(m, ls=style, color={"single": "gray", "none/generated": "red",
                                               "none/ground_truth": "purple"}.get(key, "black"),
                           label=f"{label}: {m:.2f} ± {e:.2f}")
        ax.set(xlabel="augmentation time s at sampling (of T = 1000)", ylabel="FID (classifier features)",
               title=title)
        ax.legend(fontsize=7)
    fig.suptitle(f"Conditioning augmentation in miniature: glyphs, {low}x{low} base -> {res}x{res}; "
                 f"mean ± std over {k} training seeds, {results['config']['n']} samples each"
                 + (f" ({big['n']} on the right)" if big else ""), fontsize=10)
    fig.tight_layout()
    safety.save_figure(fig, os.path.join(out, "fid_vs_s.png"), dpi=120)
    plt.close(fig)
    best = f"aug/generated/{f['best_s']}"
    if not figure or best not in figure:
        return
    rows = [("base sample (4x4, shown enlarged)" if low == 4 else "base sample", figure["base"]),
            ("SR trained without augmentation", figure["none/generated"]),
            (f"SR with noise augmentation, s = {f['best_s']}", figure[best])]
    fig, axes = plt.subplots(len(rows), 1, figsize=(len(figure["base"]) * 0.45, len(rows) * 0.75 + 0.4))
    for ax, (label, x) in zip(axes, rows):
        grid = data.to_uint8(x)[:, 0] if x.shape[1] == 1 else data.to_uint8(x).float().mean(1)
        ax.imshow(torch.cat(list(grid), dim=1).numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(label, fontsize=8, loc="left")
        ax.axis("off")
    fig.suptitle("The same base samples carried through both SR stages (training seed 0)", fontsize=9)
    fig.tight_layout()
    safety.save_figure(fig, os.path.join(out, "compounding.png"), dpi=120)
    plt.close(fig)


def write_findings(results, out):
    """findings.md: every setting's FID, accuracy and border (per training seed and mean ± std)
    and the paired differences behind the paper's findings."""
    cfg, f = results["config"], results["findings"]
    seeds = sorted(results["seeds"])
    fmt = lambda v: ", ".join(f"{x:.2f}" for x in v)
    ms = lambda v: f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else f"{np.mean(v):.2f}"
    lines = [f"Glyphs, {cfg['low_res']}×{cfg['low_res']} base → {cfg['res']}×{cfg['res']}, {len(seeds)} training "
             f"seeds (each with its own sampling noise), {cfg['n']} samples per setting; FID on the features of a "
             "classifier trained on real glyphs, against held-out real glyphs (not comparable with Inception FID).",
             "", "| setting | FID per seed | FID mean ± std | accuracy | border |", "|---|---|---|---|---|"]
    keys = ["real", "single", *map(single_key, cfg.get("single_budget", [])),
            "none/generated", "none/ground_truth"] + [
        f"aug/{kind}/{s}" for kind in ("generated", "truncated", "ground_truth") for s in cfg["s"]]
    for key in keys:
        v = per_seed(results, key)
        if len(v):
            lines.append(f"| {key} | {fmt(v)} | {ms(v)} | {np.mean(per_seed(results, key, 'accuracy')):.3f} | "
                         f"{np.mean(per_seed(results, key, 'border')):.1f} |")
    lines += ["", "Paired differences, FID of the worse minus the better setting of each pair (positive where the "
              "paper's ordering holds), per training seed, and mean ± std over seeds. *Reproduced*: the mean "
              "exceeds three standard deviations and every seed agrees (*the opposite holds*: the same, with the sign "
              "reversed).", "",
              "| finding | difference | per seed | mean ± std | reproduced |", "|---|---|---|---|---|"]
    verdict = lambda d: "yes" if d["reproduced"] else "no: the opposite holds" if d.get("opposite") else "no"
    for part in "abcd":
        for name, d in f[part].items():
            lines.append(f"| ({part}) | {name} | {fmt(d['runs'])} | {d['mean']:.2f} ± {d['std']:.2f} | {verdict(d)} |")
    lines += ["", "(a) in class accuracy: accuracy of the better minus the worse setting of each pair, in percentage "
              "points (positive where the paper's ordering holds), with the same rule.", "",
              "| difference | per seed | mean ± std | reproduced |", "|---|---|---|---|"]
    pts = lambda v: ", ".join(f"{100 * x:+.1f}" for x in v)
    for name, d in f.get("a_accuracy", {}).items():
        lines.append(f"| {name} | {pts(d['runs'])} | {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} | {verdict(d)} |")
    if "a_samples" in f:
        big = results["a_samples"]
        parts = [p for p in "abc" if f"{p}_samples" in f]
        which = ", ".join(f"({p})" for p in parts[:-1]) + (" and " if len(parts) > 1 else "") + f"({parts[-1]})"
        lines += ["", f"{which} once more on {big['n']} samples per training seed "
                  f"(--a_samples; chunks of {cfg['n']}, each with its own sampling seed, FID on all of them at "
                  f"once): a smaller sampling noise. s* = {f['best_s']} is the sweep's above. *Sampling noise*: "
                  "the standard deviation that redrawing the samples from the same models alone would give an FID "
                  "or a difference, estimated from FID on the two halves of each seed's samples (sampling_noise); "
                  "where it is well below the std over seeds, that spread is the trained models' own.", "",
                  "| setting | FID per seed | FID mean ± std | sampling noise | accuracy |", "|---|---|---|---|---|"]
        noise = lambda v: "–" if v is None else f"{v:.2f}"
        for key in big_keys(results, cfg["s"]):
            v = per_seed(big, key)
            if len(v) == len(results["seeds"]):
                lines.append(f"| {key} | {fmt(v)} | {ms(v)} | {noise(sampling_noise(big, key))} | "
                             f"{np.mean(per_seed(big, key, 'accuracy')):.3f} |")
        lines += ["", "| finding | difference | FID per seed | FID mean ± std | sampling noise | reproduced | "
                  "accuracy, points | reproduced |", "|---|---|---|---|---|---|---|---|"]
        for part in parts:
            for name, d in f[f"{part}_samples"].items():
                a = f[f"{part}_samples_accuracy"][name]
                lines.append(f"| ({part}) | {name} | {fmt(d['runs'])} | {d['mean']:.2f} ± {d['std']:.2f} | "
                             f"{noise(d.get('sampling_noise'))} | {verdict(d)} | "
                             f"{100 * a['mean']:+.1f} ± {100 * a['std']:.1f} | {verdict(a)} |")
    wall = results.get("wall", {})
    if wall:
        per = {name: np.mean([w[name] for w in wall.values()]) / 60 for name in next(iter(wall.values()))}
        lines += ["", "Training minutes per seed (mean): " + ", ".join(f"{k} {v:.1f}" for k, v in per.items())
                  + f". Whole study: {results['seconds'] / 60:.1f} min."]
    safety.write_text(os.path.join(out, "findings.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    safety.run_script(main)
