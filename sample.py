"""sample.py -- sample a trained cascade, given only its checkpoints (CDM §3, Fig. 1).

Each checkpoint carries its model, diffusion and augmentation configuration, so the stages are
rebuilt from the files alone; stages that do not fit together are refused with a clear message.

  python sample.py                                           # the demo cascade in runs/
  python sample.py runs/base/ckpt.pt runs/sr16/ckpt.pt --classes 0,3 --n 16 --steps 100,50
  python sample.py ... --s 150 --truncated                   # truncated conditioning augmentation
  python sample.py ... --sampler ancestral --steps 250,250,250   # the paper's kind of sampler
  torchrun --nproc_per_node 8 sample.py ... --num_samples 50000 --batch_size 500  # 8 GPUs
  python sample.py runs/sr16/ckpt.pt runs/sr32/ckpt.pt --low_res my8px/   # SR of your own images
  python sample.py ... --guidance 2,0,0                      # classifier-free guidance, base only
  python sample.py runs/base_pd/steps4/ckpt.pt runs/sr16/ckpt.pt runs/sr32/ckpt.pt   # a distilled base

A distilled stage (distill.py) samples with deterministic DDIM on its own steps, whatever --steps
and --sampler give the others; truncated sampling stops its chain only at an s among those steps.

--low_res PATH (an image, a folder of images or of class sub-folders, or an ADM .npz) runs the given
SR stage(s) alone on those images (--n: the first n only), non-truncated at each stage's s (or
--s / --s_sweep); grid.png then shows each input, enlarged by bicubic interpolation, beside its
output, and each stage's low-res consistency (PSNR of its output, area-downsampled, against its
input) is printed.

Writes to --out: grid.png (final images, one row per class), stages.png (each sample at every stage
of the cascade), samples.npz (final images in the ADM convention: arr_0 uint8 NHWC, arr_1 labels)
and stages.npz (every stage's images, stage_1, stage_2, ...: the inputs and outputs of each SR stage).

The samples come in chunks of --batch_size, chunk j with noise from its own generator seeded by
(--seed, j) on the sampling device. Under torchrun each process samples every world-th chunk and
rank 0 gathers and writes them, so N processes write the same files as one (same device kind).
"""
import argparse
import dataclasses
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import cdm
import data
import evaluate
import safety
from trainer import activation_bytes, distributed, grid_image, int_list, pick_device, set_fast_path


OUTPUT_LIMIT = 1e4


class FiniteWatch(torch.nn.Module):
    """A stage's network, watched: remembers the first diffusion time t at which its output held a
    NaN, an inf or a value beyond +-OUTPUT_LIMIT, so that a broken model is refused and the error
    can say where it broke. Every prediction (eps, x0, the velocity, iDDPM's v) is of order 1 in a
    trained network; the samplers would clip a huge x0_hat to +-1 and write black or white images
    without a word. The check stays on the device (no synchronisation per step); it is read once,
    after sampling."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.null_class = getattr(model, "null_class", False)     # what GuidedModel asks of it
        self.num_classes = getattr(model, "num_classes", None)
        self.first_bad_t = None

    def forward(self, x_t, t, **kwargs):
        out = self.model(x_t, t, **kwargs)
        bad = ~(out.abs() <= OUTPUT_LIMIT).all()                      # NaN compares False
        t_max = t.max().to(torch.long)
        if self.first_bad_t is None:
            self.first_bad_t = torch.full((), -1, dtype=torch.long, device=out.device)
        self.first_bad_t = torch.where(bad & (self.first_bad_t < 0), t_max, self.first_bad_t)
        return out

    def where(self):
        """'; the network's output was first ... at t = ...', or '' if it never was."""
        t = -1 if self.first_bad_t is None else int(self.first_bad_t)
        return (f"; the network's output was first non-finite or beyond +-{OUTPUT_LIMIT:g} (a trained network "
                f"predicts values of order 1) at t = {t}") if t >= 0 else ""


DEMO_CHECKPOINTS = ["runs/base/ckpt.pt", "runs/sr16/ckpt.pt", "runs/sr32/ckpt.pt"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", default=DEMO_CHECKPOINTS,
                   help="one checkpoint per stage, base first (default: the demo cascade)")
    # Under torchrun spell --n and --s as --num_samples and --aug_s: torchrun reads a bare --n or
    # --s after the script as an abbreviation of its own flags, and stops.
    p.add_argument("--n", "--num_samples", dest="n", type=int, default=None,
                   help="number of samples (default 64; with --low_res: upscale only the first n images)")
    p.add_argument("--classes", type=int_list, default=None,
                   help="class labels to cycle through, e.g. 0,3 (default: all classes); with "
                        "--low_res: one for every image, or one per image")
    p.add_argument("--sampler", type=name_list, default=None,
                   help=f"sampler per stage, one or one per stage, from {', '.join(cdm.SAMPLERS)} "
                        "(default: each checkpoint's, chosen in training; with --eta: ddim). "
                        "dpm++2m and heun are ODE solvers (docs/samplers.md)")
    p.add_argument("--steps", type=int_list, default=None,
                   help="sampling steps per stage, e.g. 50,25,25 (default: each checkpoint's); heun "
                        "evaluates the network twice per step")
    p.add_argument("--s", "--aug_s", dest="s", type=int_list, default=None,
                   help="augmentation time s for each noise-augmented stage (default: the stage's "
                        "own, chosen in training, --sample_s); one value, or one per stage")
    p.add_argument("--s_sweep", type=int_list, default=None,
                   help="sample once per value, e.g. 0,100,250, used as s for every noise-augmented "
                        "stage; writes samples_s<value>.npz each (same seed, so only s differs)")
    p.add_argument("--truncated", action="store_true",
                   help="stop the previous stage's chain at s (truncated, CDM §3.2) instead of "
                        "re-noising its z0 (non-truncated, CDM §3.3)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM's eta (0: deterministic; 1: DDPM-like noise); implies --sampler ddim")
    p.add_argument("--guidance", type=float_list, default=None,
                   help="classifier-free guidance weight w per stage, one value or one per stage "
                        "(0: none, the default and the paper's): eps = (1 + w) eps(c) - w eps(null); "
                        "a stage needs a checkpoint trained with --p_uncond")
    p.add_argument("--low_res", default=None, metavar="PATH",
                   help="super-resolve these images with the given SR stage(s): an image, a folder "
                        "(class sub-folders give the labels), or an ADM .npz (arr_1: labels)")
    p.add_argument("--batch_size", type=int, default=64, help="samples generated at once")
    p.add_argument("--seed", type=int, default=0, help="seed for the sampling noise")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 autocast for the networks (~1.7x faster on GPUs and AVX-512 BF16 CPUs)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the samples an earlier run wrote to --out (without it they are kept and "
                        "the run is refused)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def float_list(text):
    """'2,0.5' -> (2.0, 0.5); non-finite or negative values are refused in check_args."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def name_list(text):
    """'dpm++2m,heun' -> ('dpm++2m', 'heun'); checked in check_args."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def per_stage(values, stages, default, what):
    """Expand a flag given once or once per stage into one value per stage."""
    if values is None:
        return [default(st) for st in stages]
    if len(values) == 1:
        return [values[0] if default(st) is not None else None for st in stages]
    if len(values) != len(stages):
        raise SystemExit(f"error: --{what} needs one value or one per stage ({len(stages)}), "
                         f"got {len(values)}")
    return list(values)


def check_args(args):
    """Every flag checked before the checkpoints are loaded: one clear line, no traceback."""
    if args.n is not None and args.n < 1:
        raise SystemExit(f"error: --n {args.n}: the number of samples must be at least 1")
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch_size {args.batch_size}: must be at least 1")
    if args.eta is not None and not 0 <= args.eta <= 1:
        raise SystemExit(f"error: --eta {args.eta}: DDIM's eta lies in [0, 1] (0: deterministic)")
    if args.sampler is not None and not args.sampler:
        raise SystemExit(f"error: --sampler is empty: choose from {', '.join(cdm.SAMPLERS)}")
    try:
        for name in args.sampler or ():
            cdm.check_sampler(name)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.eta is not None and args.sampler is not None and "ddim" not in args.sampler:
        raise SystemExit(f"error: --eta is DDIM's, but --sampler {','.join(args.sampler)} has no "
                         "ddim stage: drop --eta, or use --sampler ddim")
    if not 0 <= args.seed < 2 ** 63:
        raise SystemExit(f"error: --seed {args.seed}: must lie in 0..2^63-1")
    if args.guidance is not None and (not args.guidance or not all(0 <= w < 1e6 for w in args.guidance)):
        raise SystemExit(f"error: --guidance {','.join(map(str, args.guidance))}: give weights w >= 0 "
                         "(0: no guidance; 1 to 4 are usual)")
    if args.low_res is not None:
        if not os.path.exists(args.low_res):
            raise SystemExit(f"error: --low_res {args.low_res}: no such file or folder")
        if args.truncated:
            raise SystemExit("error: --truncated stops a previous stage's chain at s; given low-res "
                             "images have none: drop --truncated (they are re-noised to z_s)")
    pick_device(args.device)                      # exits with one line if there is no such device
    for flag in ("steps", "s", "s_sweep", "classes"):
        values = getattr(args, flag)
        if values is not None and (not values or min(values) < (1 if flag == "steps" else 0)):
            raise SystemExit(f"error: --{flag} {','.join(map(str, values))}: give "
                             f"{'positive' if flag == 'steps' else 'non-negative'} integers")
    return args


OUTPUTS = ("grid.png", "stages.png", "samples.npz", "stages.npz")


def output_paths(args):
    """The files this run will write: the four of a cascade's samples, or one per value of s."""
    names = [f"samples_s{v}.npz" for v in args.s_sweep] if args.s_sweep is not None else OUTPUTS
    return [os.path.join(args.out, n) for n in names]


def claim_out(args):
    """Before any work: --out writable and locked, and no earlier samples replaced unless asked."""
    if int(os.environ.get("RANK", 0)) != 0:      # under torchrun rank 0 writes
        return
    safety.prepare_output_folder(args.out)
    if not args.overwrite:
        safety.refuse_to_replace(output_paths(args), "samples of an earlier run")


def check_resources(args, stages, device):
    """Refuse, before sampling, what this machine cannot hold: every stage's images stay in memory
    until they are written (uint8, and their 3-channel copies), a batch's activations on the
    device, and the files on the disk of --out."""
    pixels = [st.resolution ** 2 for st in stages]
    per_sample = sum(p * (st.channels + 3) for p, st in zip(pixels, stages)) + 8
    runs = len(args.s_sweep) if args.s_sweep is not None else 1
    guided = args.guidance is not None and any(args.guidance)   # a guided stage runs 2 x the batch
    batch = max(activation_bytes(st.config["model"], min(args.batch_size, args.n) * (1 + guided),
                                 training=False) for st in stages)
    what = f"sampling {args.n} images of {' -> '.join(str(st.resolution) for st in stages)} pixels"
    hint = "use a smaller --n (or several runs with other --seed values) or --batch_size"
    if device.type == "cuda":                     # the batch on the GPU, the samples here
        safety.check_memory_on(device, batch, f"{what} in batches of {args.batch_size}", hint)
        batch = 0
    safety.check_memory(args.n * per_sample + batch, what, hint)
    if int(os.environ.get("RANK", 0)) == 0:
        written = args.n * 3 * (pixels[-1] * runs + (sum(pixels) if args.s_sweep is None else 0))
        safety.check_disk(args.out, written + (4 << 20), what)


def main(argv=None):
    args = check_args(parse_args(argv))
    claim_out(args)
    with distributed(args.device) as (rank, world, device):
        run(args, rank, world, device)


def grid_rows(images, labels, classes, per_row_max=32, rows_max=100, max_pixels=64 * 2 ** 20):
    """The rows of grid.png: the samples of each class in a row of their own (at most per_row_max
    samples each, for the first rows_max classes asked for) when every class has as many; else all
    of them sorted by class, 8 to a row. As float images. A preview: at most max_pixels (64 MP)
    of tiles (grid_image shows each at least 64 pixels wide), so 50,000 ImageNet samples at 256
    px make a 16 x 50 grid, not one of 32 x 100 (210 MP)."""
    keys = list(dict.fromkeys(classes))
    counts = {int((labels == k).sum()) for k in keys}
    by_class = len(counts) == 1 and len(keys) * min(counts) == len(labels)
    per_row = min(per_row_max, min(counts)) if by_class else 8
    rows = min(rows_max, len(keys) if by_class else -(-len(labels) // 8))
    while per_row * rows * max(images.shape[-1], 64) ** 2 > max_pixels and rows > 1:
        if rows >= 2 * per_row or per_row <= 8:
            rows //= 2
        else:
            per_row //= 2
    if by_class:
        order = torch.cat([torch.nonzero(labels == k)[:per_row, 0] for k in keys[:rows]])
    else:
        order = torch.argsort(labels, stable=True)[:per_row * rows]
    return list(data.to_float(images[order]).split(per_row))


def load_given(args, stages):
    """--low_res: the images (uint8 (N, C, r, r)) and their labels (or None), checked against
    the first SR stage: its input size, its channels, its classes."""
    first = stages[0]
    r, C = first.config["low_res"], first.channels
    def check_size(size):                         # on the first image, before the others are read
        if size != r:
            raise SystemExit(f"error: --low_res {args.low_res}: the images are {size}x{size}, but stage 1 "
                             f"is a {r}->{first.resolution} SR model and takes {r}x{r} images; resize "
                             f"them to {r}x{r} first (area/box filter, as its training pairs were made)")
    try:
        x, labels, names = data.load_low_res(args.low_res, args.n, check_size)
    except ValueError as e:
        raise SystemExit(f"error: --low_res {e}") from None
    if args.n is not None and len(x) < args.n:
        raise SystemExit(f"error: --n {args.n}, but --low_res {args.low_res} holds {len(x)} image(s): "
                         f"give --n {len(x)} or less, or drop --n (every image is upscaled)")
    if args.classes is not None and len(args.classes) not in (1, len(x)):
        raise SystemExit(f"error: --classes gives {len(args.classes)} labels for {len(x)} image(s): give "
                         "one class for all of them, or one per image")
    if C == 1:
        x = data.keep_gray_as_one_channel(x)
        if x.shape[1] != 1:
            raise SystemExit(f"error: --low_res {args.low_res}: the images have colour, but stage 1 is "
                             "a 1-channel model of grayscale data; convert them to grayscale first")
    known = first.config.get("class_names") or [str(k) for k in range(first.config["num_classes"])]
    if names is not None and args.classes is None:          # sub-folder names -> the model's classes
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"error: --low_res {args.low_res}: sub-folder(s) {', '.join(unknown[:5])} "
                             f"name no class of this model ({', '.join(known[:12])}); rename them, or "
                             "give --classes")
        labels = torch.tensor([known.index(names[k]) for k in labels], dtype=torch.long)
    if labels is not None and args.classes is None and (labels.min() < 0 or labels.max() >= len(known)):
        raise SystemExit(f"error: --low_res {args.low_res}: labels {labels.min().item()}..{labels.max().item()} "
                         f"but this model knows classes 0..{len(known) - 1}; give --classes")
    if labels is None and args.classes is None and len(known) > 1:
        raise SystemExit(f"error: --low_res {args.low_res} has no labels and the model is class-conditional "
                         f"({', '.join(known[:12])}): give --classes (one class for all, or one per image), "
                         "or put the images into sub-folders named by class")
    if labels is None and args.classes is None:
        labels = torch.zeros(len(x), dtype=torch.long)
    return x.contiguous(), labels


def side_by_side(inputs, outputs, max_pairs=64):
    """grid.png for --low_res: each input enlarged to the output size by bicubic interpolation,
    then its output, for the first max_pairs images (the .npz files hold them all); 4 pairs to a
    row, 8 from 32 images on. Float images in [-1, 1]."""
    inputs, outputs = inputs[:max_pairs], outputs[:max_pairs]
    pairs_per_row = 4 if len(inputs) < 32 else 8
    res = outputs.shape[-1]
    big = F.interpolate(data.to_float(data.to_rgb(inputs)), size=(res, res), mode="bicubic",
                        align_corners=False).clamp(-1, 1)
    out = data.to_float(data.to_rgb(outputs))
    tiles = torch.stack([big, out], dim=1).flatten(0, 1)       # input, output, input, output, ...
    return list(tiles.split(2 * pairs_per_row))              # grid_image fills the last row up


def consistency(outs):
    """Low-res consistency of each SR stage (outs[0]: the given images): PSNR in dB of its
    output, area-downsampled to its input's size, against its input (uint8 values)."""
    return [evaluate.psnr(cdm.downsample(hi.double(), lo.shape[-1]), lo) for lo, hi in zip(outs[:-1], outs[1:])]


def chunk_generator(seed, chunk, device):
    """The noise of chunk `chunk` of the samples: its own stream, drawn on the device."""
    state = np.random.SeedSequence([seed, chunk]).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (2 ** 63 - 1))


def run(args, rank, world, device):
    try:
        stages = [safety.load_stage(path, device, ema=not args.no_ema) for path in args.checkpoints]
        for st in stages:
            set_fast_path(st.model)         # the memory layout measured faster on this device
        cdm.check_cascade(stages, given_low_res=args.low_res is not None)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    num_classes = stages[0].config["num_classes"]
    given = given_labels = None
    if args.low_res is not None:                 # the inputs fix n and, maybe, the labels
        given, given_labels = load_given(args, stages)
        args.n = len(given)
    elif args.n is None:
        args.n = 64
    check_resources(args, stages, device)
    classes = args.classes if args.classes is not None else tuple(range(num_classes))
    bad = [k for k in classes if not 0 <= k < num_classes]
    if bad:
        raise SystemExit(f"error: classes {bad} out of range: this cascade knows classes "
                         f"0..{num_classes - 1} ({', '.join(stages[0].config['class_names'])})")
    guidance = per_stage(args.guidance, stages, lambda st: 0.0, "guidance")
    for k, (st, w, path) in enumerate(zip(stages, guidance, args.checkpoints)):
        try:
            cdm.guided_model(st.model, w, st.channels)          # refuses a model without a null class
        except ValueError as e:
            example = ",".join("0" if j == k else "2" for j in range(len(stages)))
            raise SystemExit(f"error: --guidance: stage {k + 1} ({path}): {e}"
                             + (f" (one weight per stage, e.g. --guidance {example})" if len(stages) > 1 else "")) from None
    steps = per_stage(args.steps, stages, lambda st: st.config["sample_steps"], "steps")
    # each checkpoint's own sampler (older checkpoints: ancestral); --eta alone means DDIM
    sampler = per_stage(args.sampler or (("ddim",) if args.eta is not None else None), stages,
                        lambda st: st.config.get("sampler", "ancestral"), "sampler")
    for k, (st, path) in enumerate(zip(stages, args.checkpoints)):   # distilled stages: their own steps
        if st.distilled is None:
            continue
        N = len(st.distilled) - 1
        for flag, given, own in (("steps", args.steps, N), ("sampler", args.sampler, "ddim")):
            if given is not None and len(given) > 1 and given[k] != own:
                raise SystemExit(f"error: --{flag}: stage {k + 1} ({path}) is distilled to {N} DDIM "
                                 f"step{'s' * (N > 1)} and samples with those only: give {own} for it")
            if given is not None and len(given) == 1 and given[0] != own:
                print(f"stage {k + 1} is distilled: it samples with its own {N} DDIM step{'s' * (N > 1)}, "
                      f"not --{flag} {given[0]}")
        steps[k], sampler[k] = N, "ddim"
    for st, k in zip(stages, steps):
        if not 1 <= k <= st.config["diffusion"]["T"]:
            raise SystemExit(f"error: --steps {k} for a stage with T = {st.config['diffusion']['T']}")
    def s_per_stage(values):
        s = per_stage(values, stages, lambda st: st.sample_s, "s")  # default: each stage's own
        try:
            cdm.check_augmentation_times(stages, s)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        return s

    # Labels cycle through the chosen classes, so a grid has whole rows per class; given images
    # keep their own labels unless --classes says otherwise.
    c_all = torch.tensor([classes[i % len(classes)] for i in range(args.n)], dtype=torch.long)
    if given_labels is not None and args.classes is None:
        c_all = given_labels

    def generate(s):
        """Every stage's images, uint8 (n, C, H, W), in sample order; on rank 0 only (else None)."""
        starts = list(range(0, args.n, args.batch_size))
        mine = {}
        for j in range(rank, len(starts), world):            # this process's chunks
            chunk = slice(starts[j], starts[j] + args.batch_size)
            c = c_all[chunk].to(device)
            low = None if given is None else data.to_float(given[chunk].to(device))
            watched = [dataclasses.replace(st, model=FiniteWatch(st.model)) for st in stages]
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                    xs = cdm.sample_cascade(watched, c, steps=steps, sampler=sampler, s=s,
                                            truncated=args.truncated, eta=args.eta or 0.0,
                                            generator=chunk_generator(args.seed, j, device),
                                            progress=not args.no_progress and rank == 0,
                                            guidance=guidance, low_res=low)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
            # to_uint8 would turn NaN into black and the samplers' clipping an inf into +-1, silently
            for k, x in enumerate(xs):
                broke = watched[k].model.where()
                if broke or not torch.isfinite(x).all():
                    what = "broke down" if broke else "sampled non-finite values (NaN or inf)"
                    raise SystemExit(f"error: stage {k + 1} ({args.checkpoints[k]}) {what} in chunk {j + 1}{broke}; "
                                     "nothing was written. With --precision bf16 try fp32; otherwise sample an "
                                     "earlier checkpoint")
            mine[j] = [data.to_uint8(x.float()).cpu() for x in xs]
            if given is not None:                 # stage_1 of the files: the given images
                mine[j].insert(0, given[chunk])
        if world > 1:
            import torch.distributed as dist
            print(f"process {rank} of {world}: sampled chunks {sorted(mine)} "
                  f"({sum(len(v[0]) for v in mine.values())} images)", flush=True)
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(mine, gathered, dst=0)
            if rank != 0:
                return None
            mine = {j: v for part in gathered for j, v in part.items()}
        assert sorted(mine) == list(range(len(starts)))
        return [torch.cat([mine[j][k] for j in range(len(starts))]) for k in range(len(mine[0]))]

    to_nhwc = lambda u8: data.to_rgb(u8).permute(0, 2, 3, 1).numpy()  # gray -> R=G=B
    for flag in ("s", "s_sweep"):                # every value checked before the first is sampled
        if getattr(args, flag) is not None and not any(st.config["augment"]["type"] == "noise" for st in stages):
            raise SystemExit(f"error: --{flag}: no stage of this cascade is noise-augmented (a blur-"
                             f"augmented stage takes no s): drop --{flag}")
    plans = [s_per_stage(args.s)] if args.s_sweep is None else [s_per_stage([v]) for v in args.s_sweep]
    if args.s_sweep is not None:
        for v, s_v in zip(args.s_sweep, plans):
            t0 = time.time()
            outs = generate(s_v)
            if outs is None:
                continue
            path = os.path.join(args.out, f"samples_s{v}.npz")
            try:
                data.save_npz(path, to_nhwc(outs[-1]), c_all.numpy())
            except OSError as e:
                raise SystemExit(f"error: could not write {path}: {e.strerror or e}") from None
            extra = "" if given is None else "; low-res consistency " + ", ".join(
                f"{db:.1f} dB" for db in consistency(outs))
            print(f"s = {v}: sampled {args.n} images in {time.time() - t0:.1f} s; wrote {path}{extra}")
        return
    t0 = time.time()
    outs = generate(plans[0])
    secs = time.time() - t0
    if outs is None:                                      # not rank 0: rank 0 writes
        return

    # The four files are written together: all of them or, on a full disk or an error, none.
    panel = min(args.n, 8)
    grid = grid_image(grid_rows(outs[-1], c_all, classes) if given is None     # a row per class
                      else side_by_side(outs[0], outs[-1]))    # each input, enlarged, beside its output
    stages_png = grid_image([data.to_float(o[:panel]) for o in outs])  # each sample at every stage
    out = lambda name: os.path.join(args.out, name)
    stages_arrays = {"labels": c_all.numpy(), "data": np.array(str(stages[0].config.get("data", "shapes"))),
                     "class_names": np.array(stages[0].config.get("class_names", [])),  # for evaluate.py
                     **{f"stage_{k + 1}": to_nhwc(o) for k, o in enumerate(outs)}}
    def write_stages(tmp):
        with open(tmp, "wb") as f:        # a file object: np.savez would append ".npz" to a name
            np.savez(f, **stages_arrays)
    try:
        safety.atomic_write_many({
            out("grid.png"): lambda tmp: grid.save(tmp, format="PNG"),
            out("stages.png"): lambda tmp: stages_png.save(tmp, format="PNG"),
            out("samples.npz"): lambda tmp: data.write_npz(tmp, to_nhwc(outs[-1]), c_all.numpy()),
            out("stages.npz"): write_stages})
    except OSError as e:
        raise SystemExit(f"error: could not write the samples to {args.out}: {e.strerror or e}; "
                         f"nothing there was replaced") from None
    res = " -> ".join([str(stages[0].config["low_res"])] * (given is not None)
                      + [str(st.resolution) for st in stages])
    how = ", ".join(f"{a} {k}" for a, k in zip(sampler, steps))
    if any(guidance):
        how += " steps; guidance " + ",".join(f"{w:g}" for w in guidance)
    else:
        how += " steps"
    if given is not None:
        for k, db in enumerate(consistency(outs)):
            print(f"stage {k + 1} ({outs[k].shape[-1]} -> {outs[k + 1].shape[-1]}): low-res consistency "
                  f"{db:.1f} dB (PSNR of its output, area-downsampled, against its input)")
    print(f"sampled {args.n} images ({res}; {how}) in {secs:.1f} s on {world} x {device}; wrote grid.png, "
          f"stages.png, samples.npz "
          f"and stages.npz to {args.out}/")


if __name__ == "__main__":
    safety.run_script(main)
