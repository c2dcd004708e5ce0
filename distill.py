"""distill.py -- progressive distillation (PD Alg. 2) of any stage of the cascade, base or SR.

A student, initialised from its teacher, learns to take one deterministic DDIM step where the
teacher takes two (cdm.distillation_loss); it then teaches the next round. Each round halves the
steps -- 32 -> 16 -> 8 -> 4 -> 2 -> 1 -- and is an ordinary training run of trainer.py (EMA,
--resume, torchrun, bf16, atomic checkpoints), written to OUT/steps<N>/ckpt.pt. A distilled
checkpoint says what it is (its config's "distill": teacher, rounds, steps, the steps' grid), so
sample.py samples it at its own step count, mixed freely with undistilled stages:

  python distill.py runs/base/ckpt.pt            # -> runs/base_pd/steps16 ... steps1 (~4 min)
  python distill.py runs/sr16/ckpt.pt            # an SR stage: the student sees z and s as well
  python distill.py runs/sr32/ckpt.pt
  python sample.py runs/base_pd/steps4/ckpt.pt runs/sr16_pd/steps4/ckpt.pt runs/sr32_pd/steps4/ckpt.pt

Measured against the solvers at the same number of network evaluations: docs/samplers.md.
"""
import argparse
import copy
import math
import os
import shutil
import time


import cdm
import safety
import train_base
import trainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", help="the checkpoint to distil: a trained stage, or a distilled one "
                                   "(then its rounds continue from its own step count)")
    p.add_argument("--out", default=None, help="folder for the rounds, OUT/steps<N>/ (default: the "
                                               "teacher's folder + '_pd', e.g. runs/base_pd)")
    p.add_argument("--from", dest="start", type=int, default=None,
                   help="the undistilled teacher's DDIM steps in the first round (default 32, or the "
                        "largest power of two up to a smaller T; a distilled teacher: its own)")
    p.add_argument("--to", type=int, default=1, help="the last round's step count (default 1)")
    p.add_argument("--round_steps", type=int, default=None,
                   help="training steps per round (default: the stage's, see ROUND_STEPS)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the teacher's / 4)")
    p.add_argument("--warmup", type=int, default=20, help="linear learning-rate warm-up steps per round")
    p.add_argument("--batch_size", type=int, default=None, help="images per step (default: the teacher's)")
    p.add_argument("--micro_batch", type=int, default=0, help="as in training (0: the whole batch)")
    p.add_argument("--data", default=None, help="training images (default: the teacher's); their "
                                                "classes must be the teacher's")
    p.add_argument("--n_train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--seed", type=int, default=0, help="seed for the data order and noise")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast of the student's and teacher's forward passes")
    p.add_argument("--log_every", type=int, default=50, help="steps between log lines")
    p.add_argument("--resume", action="store_true", help="continue the rounds in OUT")
    p.add_argument("--overwrite", action="store_true", help="delete the rounds OUT holds and start again")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for flag in ("to", "round_steps", "batch_size", "log_every", "n_train", "start"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise SystemExit(f"error: --{'from' if flag == 'start' else flag} {v}: must be at least 1")
    if args.lr is not None and not 0 < args.lr < 1:
        raise SystemExit(f"error: --lr {args.lr}: a learning rate in (0, 1)")
    if args.warmup < 0 or args.micro_batch < 0:
        raise SystemExit("error: --warmup and --micro_batch must not be negative")
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume continues the rounds in --out, --overwrite deletes them: give one")
    trainer.pick_device(args.device)              # one line if there is no such device
    return args


# Training steps per round (ours, measured on the demo cascade: docs/samplers.md), by the stage's
# output resolution; other resolutions take the nearest's.
ROUND_STEPS = {8: 400, 16: 300, 32: 120}


def round_counts(start, to):
    """The student step counts of the rounds from a `start`-step teacher down to `to`: start/2,
    start/4, ..., to. Refuses (one line) a chain that never lands on `to` by halving."""
    if to >= start:
        raise SystemExit(f"error: a {start}-step teacher: --to {to} must be fewer steps")
    counts, n = [], start
    while n > to:
        if n % 2:
            raise SystemExit(f"error: a {n}-step teacher cannot be halved (PD halves the steps each "
                             f"round): from {start} steps, --to {to} is not reached; use --from and "
                             "--to with --from = --to x a power of two, e.g. --from 32 --to 4")
        n //= 2
        counts.append(n)
    if n != to:
        raise SystemExit(f"error: from {start} steps, halving gives {counts}, not --to {to}: "
                         "use --from = --to x a power of two, e.g. --from 32 --to 4")
    return counts


def make_kwargs_for(config):
    """The conditioning a stage's training loop gives it: the class, and an SR stage's augmented
    low-res z (and s), made from each batch as train_sr.py makes them."""
    if config["low_res"] is None:
        return lambda x0, c, train, rng: {"c": c}
    import train_sr
    return train_sr.conditioning(config["low_res"], config["augment"])


def main(argv=None):
    args = parse_args(argv)
    try:
        ckpt = safety.load_checkpoint(args.teacher)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    config = ckpt["config"]
    T = config["diffusion"]["T"]
    done = config.get("distill")
    if done is not None:
        if args.start is not None and args.start != done["steps"]:
            raise SystemExit(f"error: {args.teacher} is distilled to {done['steps']} steps: its rounds "
                             f"continue from there; drop --from")
        start = done["steps"]
    else:
        start = min(32, 2 ** int(math.log2(T))) if args.start is None else args.start
    if start > T:
        raise SystemExit(f"error: --from {start}: the teacher's schedule has only T = {T} steps")
    counts = round_counts(start, args.to)
    out = args.out or os.path.normpath(os.path.dirname(os.path.abspath(args.teacher))) + "_pd"
    main_rank = int(os.environ.get("RANK", 0)) == 0
    say = print if main_rank else (lambda *a, **k: None)     # under torchrun, rank 0 speaks
    if main_rank:                                 # and claims OUT for all
        claim(out, counts, args)

    teacher_args = dict(vars(train_base.parse_args([])), **ckpt["args"])
    base = argparse.Namespace(**teacher_args)
    base.data = args.data or teacher_args["data"]
    base.n_train, base.seed, base.device, base.precision = args.n_train, args.seed, args.device, args.precision
    base.batch_size = args.batch_size or teacher_args["batch_size"]
    base.micro_batch, base.log_every, base.no_progress = args.micro_batch, args.log_every, args.no_progress
    base.lr = args.lr or teacher_args["lr"] / 4
    base.warmup, base.compile, base.resume_inexact = args.warmup, False, False
    res = config["resolution"]
    base.steps = args.round_steps or ROUND_STEPS[min(ROUND_STEPS, key=lambda r: abs(r - res))]
    base.save_every, base.keep_every, base.sample_every = base.steps, 0, 0
    base.sampler, base.resume, base.overwrite = "ddim", False, False
    origin = done["teacher"] if done else os.path.abspath(args.teacher)
    rounds_before = done["rounds"] if done else 0
    plan = []                                     # (round, N, its --out, what it holds, its config)
    for k, N in enumerate(counts, start=rounds_before + 1):
        path = os.path.join(out, f"steps{N}", "ckpt.pt")
        try:      # (--overwrite: rank 0 deleted the rounds; under torchrun another rank must not see them)
            there = safety.load_checkpoint(path) if os.path.exists(path) and not args.overwrite else None
        except ValueError as e:
            raise SystemExit(f"error: {e}; replace the rounds with --overwrite") from None
        theirs = there and there["config"].get("distill", {}).get("teacher")
        if there is not None and theirs != origin:     # e.g. a base's rounds over an SR stage's
            raise SystemExit(f"error: {path} was distilled from {theirs}, not {origin}: choose another --out, "
                             "or replace its rounds with --overwrite")
        plan.append((k, N, path, there, dict(config, sampler="ddim", sample_steps=N, distill={
            "teacher": origin, "from": done["from"] if done else start, "rounds": k, "steps": N,
            "grid": cdm.distillation_grid(T, N)})))
    finished = [t is not None and t["step"] >= base.steps and t["config"].get("distill") == c["distill"]
                for _, _, _, t, c in plan]
    for j in range(len(plan) - 1):                # a round trained further would leave the next stale
        if not finished[j] and plan[j + 1][3] is not None:
            raise SystemExit(f"error: round {plan[j][0]} ({plan[j][2]}) is to be trained further, but round "
                             f"{plan[j + 1][0]} was distilled from it as it was: replace the rounds with "
                             "--overwrite, or choose a new --out")
    dataset = trainer.load_training_data(base, res)
    if list(dataset.class_names) != list(config.get("class_names", dataset.class_names)):
        raise SystemExit(f"error: --data {base.data} has the classes {list(dataset.class_names)[:5]}..., the "
                         f"teacher {list(config['class_names'])[:5]}...: distil on the teacher's data")
    make_kwargs = make_kwargs_for(config)

    diffusion = cdm.diffusion_from_config(config["diffusion"])
    # read on the CPU: each round's run moves the teacher to its process's device
    teacher = safety.load_stage(args.teacher, "cpu").model.requires_grad_(False)
    times = {}
    for (k, N, path, there, round_config), finished_k in zip(plan, finished):
        round_args = copy.copy(base)
        round_args.out = os.path.dirname(path)
        round_args.sample_steps = N
        if finished_k:
            say(f"round {k}: {path} is done ({N} steps); next round")
            teacher = safety.load_stage(path, "cpu").model.requires_grad_(False)
            continue
        round_args.resume = there is not None
        trainer.claim_out(round_args)
        say(f"round {k}: {2 * N} -> {N} steps, {round_args.steps} training steps, into {round_args.out}")
        t0 = time.time()
        distill = trainer.Distillation(
            teacher=teacher.eval(), chain=diffusion.on_steps(cdm.distillation_grid(T, 2 * N)[1:]),
            student_chain=diffusion.on_steps(cdm.distillation_grid(T, N)[1:]),
            init=copy.deepcopy(teacher.state_dict()))
        _, ema = trainer.train(round_args, round_config, dataset, make_kwargs, distill)
        times[N] = time.time() - t0
        say(f"round {k} took {times[N]:.0f} s")
        teacher = ema.requires_grad_(False)
    if times:
        say("distilled: " + ", ".join(f"{N} step{'s' * (N > 1)} in {s:.0f} s" for N, s in times.items())
              + f"; total {sum(times.values()) / 60:.1f} min")
    say(f"sample with: python sample.py {os.path.join(out, f'steps{counts[-1]}', 'ckpt.pt')} ...")


def claim(out, counts, args):
    """Before any work: OUT writable and locked; a folder holding other things, or earlier rounds
    without --resume or --overwrite, refused; --overwrite deletes the rounds it holds (only those)."""
    safety.prepare_output_folder(out)
    there = safety.visible_entries(out)
    rounds = [n for n in there if n.startswith("steps") and n[5:].isdigit()
              and os.path.isdir(os.path.join(out, n))]
    other = [n for n in there if n not in rounds]
    if other:
        raise SystemExit(f"error: --out {out} holds files that are not distillation rounds "
                         f"({', '.join(other[:4])}): choose another --out")
    if rounds and not (args.resume or args.overwrite):
        raise SystemExit(f"error: --out {out} already holds distillation rounds ({', '.join(rounds[:4])}): "
                         "continue them with --resume, replace them with --overwrite, or choose a new --out")
    if args.resume and not rounds:
        raise SystemExit(f"error: --resume: {out} holds no rounds to continue; drop --resume")
    if args.overwrite:
        for n in rounds:
            folder = os.path.join(out, n)
            if any(not trainer.RUN_FILES.fullmatch(f) for f in safety.visible_entries(folder)):
                raise SystemExit(f"error: --overwrite: {folder} holds files no run wrote; move them first")
        for n in rounds:
            shutil.rmtree(os.path.join(out, n))
        if rounds:
            print(f"--overwrite: deleted the rounds in {out} ({', '.join(rounds)})")


if __name__ == "__main__":
    safety.run_script(main)
