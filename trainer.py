"""trainer.py -- what training a base model and training an SR model have in common.

The flags, the loop (sample t, compute the loss, step Adam, update the EMA), logging, preview
grids and checkpoints live here once. train_base.py and train_sr.py only say what their model
sees: the class c, and for SR also the (augmented) low-resolution image z and its time s.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import signal
import threading
import time
import zlib

import torch
import torch.nn.functional as F

import cdm
import data
import safety

try:
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None


def int_list(text):
    """'1,2,2' -> (1, 2, 2); '' -> () (for --attn with no attention)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# --- presets: every value beside the source it comes from -------------------------------------
# The words of a preset's "from", kept by `preset` under "sources" and shown in docs/paper.md's
# preset table (a test checks that the two agree).
SOURCE_NAMES = {"paper": "paper", "secondary": "paper (secondary source)", "iddpm": "iDDPM",
                "sr3": "SR3", "ours": "ours"}


def preset(**groups):
    """A preset from its values grouped by where each comes from:

        preset(paper={...},      stated in the CDM paper
               secondary={...},  reported for the CDM paper by a secondary source (a summary of
                                 its appendix tables, named in docs/paper.md), not checked against its text
               iddpm={...}, sr3={...},  taken from a predecessor
               ours={...})       our choice
    Returns the flat dict of values the scripts read, plus "sources": {flag: source}."""
    values, sources = {}, {}
    for group, kv in groups.items():
        for key, value in kv.items():
            if key in values:
                raise ValueError(f"preset value {key} given twice")
            values[key], sources[key] = value, SOURCE_NAMES[group]
    return {**values, "sources": sources}


SHORT_SOURCE = {"paper (secondary source)": "secondary"}


def preset_table(presets):
    """A markdown table of presets: a row per flag, a column per preset, each cell the value and
    where it comes from (docs/paper.md shows the tables of both scripts)."""
    names = list(presets)
    flags = sorted({k for d in presets.values() for k in d["sources"]})

    def cell(d, k):
        if k not in d["sources"]:
            return "–"
        v = d[k]
        v = ",".join(map(str, v)) if isinstance(v, (tuple, list)) else ("data's default" if v is None else v)
        v = f"{v:g}" if isinstance(v, float) else v
        return f"{v} ({SHORT_SOURCE.get(d['sources'][k], d['sources'][k])})"
    rows = ["| preset value | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    rows += [f"| `{k}` | " + " | ".join(cell(presets[n], k) for n in names) + " |" for k in flags]
    return "\n".join(rows)


# The CUDA defaults of the speed settings (--channels_last, --norm_precision, --adam,
# --cudnn_benchmark; --compile stays opt-in, for its compile time). Each is the fastest setting
# *measured* so far, or PyTorch's own default where nobody has measured it yet; the numbers are in
# docs/speed.md. `bench.py --tune` measures them all on one GPU and prints the flags of the
# fastest: put its winners here. On the CPU every setting is the CPU path's (NCHW, autocast's
# norm, foreach Adam), whatever this table says.
CUDA_SPEED = {
    "channels_last": "auto",   # measured on an H200: per model width, see channels_last_default
    "norm_precision": "fp32",  # not measured on a GPU yet: autocast's float32
    "adam": "foreach",         # not measured on a GPU yet: foreach, PyTorch's default on CUDA
    "cudnn_benchmark": "off",  # not measured on a GPU yet: PyTorch's default
}
CPU_SPEED = {"channels_last": "auto", "norm_precision": "fp32", "adam": "foreach", "cudnn_benchmark": "off"}
ADAM_KWARGS = {"foreach": dict(foreach=True, fused=None), "fused": dict(foreach=None, fused=True)}
COMPILE_MODES = ["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"]


class FastGroupNorm(torch.nn.GroupNorm):
    """cdm's GroupNorm with two speed options, both the same numbers up to rounding; set_fast_path
    turns a model's nn.GroupNorm layers into these (same parameters, same state dict):
    - fast: PyTorch's CPU kernel is 3-5x slower on channels_last tensors than on NCHW ones
      (bench.py), so on the CPU we normalise an NCHW copy and hand back channels_last;
    - low_precision: autocast runs GroupNorm in float32 (its statistics need the range), which
      on a GPU doubles the memory traffic of every norm. With low_precision the norm runs in the
      autocast dtype (bf16 has float32's range; PyTorch's CUDA kernel accumulates the mean and
      variance in float32 either way) and hands bf16 to the next layer."""
    fast = True
    low_precision = False

    def forward(self, x):
        if self.fast and x.device.type == "cpu" and not x.is_contiguous():
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        if self.low_precision and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype),
                                    self.bias.to(dtype), self.eps)
        return super().forward(x)


def set_fast_path(model, enabled=True, channels_last=None, low_precision_norm=False):
    """The speed-ups (numbers in docs/speed.md, from bench.py):
    - the fused attention kernel (`cdm.attention`) instead of the plain softmax(q k^T) v; on
    - GroupNorm on an NCHW copy for channels_last tensors on the CPU (`FastGroupNorm`); on
    - channels_last memory (NHWC). channels_last=None picks the layout measured faster
      (channels_last_default): on CUDA for narrow models only, never on the CPU;
    - low_precision_norm: GroupNorm in the autocast dtype (`FastGroupNorm`); off unless asked.
    enabled=False gives the plain computation; test_fast_path_matches_plain checks that both
    give the same outputs and gradients. bf16 autocast and torch.compile are separate choices,
    made by the scripts' --precision and --compile flags. Call it after moving the model."""
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.__class__ = FastGroupNorm
            m.low_precision = low_precision_norm
        if isinstance(m, (FastGroupNorm, cdm.AttentionBlock)):
            m.fast = enabled
    if channels_last is None:
        channels_last = channels_last_default(model)
    enabled = enabled and channels_last
    return model.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)


def channels_last_default(model):
    """The memory layout measured faster (bench.py; the numbers are in docs/speed.md): on CUDA,
    channels_last for narrow U-Nets (fewer than 128 base channels, as the CIFAR-sized one) and
    NCHW for the wide ImageNet presets; on CPUs always NCHW. `bench.py --tune` measures both on
    your GPU."""
    if next(model.parameters()).device.type != "cuda":
        return False
    return getattr(model, "model_channels", 0) < 128


def speed_settings(args, device):
    """The speed flags of a run, each unset one from the device's defaults (above)."""
    table = CUDA_SPEED if device.type == "cuda" else CPU_SPEED
    return {k: getattr(args, k, None) or v for k, v in table.items()}


def apply_speed(model, speed):
    """set_fast_path and cuDNN per the speed settings; returns the model."""
    if speed["cudnn_benchmark"] == "on":
        torch.backends.cudnn.benchmark = True
    layout = {"auto": None, "on": True, "off": False}[speed["channels_last"]]
    return set_fast_path(model, channels_last=layout, low_precision_norm=speed["norm_precision"] == "bf16")


class PresetAttention(tuple):
    """--attn's default: the preset's attention resolutions and the --res they belong to. With
    another --res they stay at the same levels of the U-Net (check_args scales them)."""

    def __new__(cls, attn, res):
        self = super().__new__(cls, attn)
        self.res = res
        return self


def preset_parser(doc, presets, default, argv=None):
    """A training script's parser with --preset, and the chosen preset's values (read from argv
    first, so that they can be every other flag's default). Returns (parser, preset values)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(presets), default=default)
    values = presets[pre.parse_known_args(argv)[0].preset]
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets), default=default,
                   help="a named configuration; the flags below override it")
    return p, values


def add_common_args(p, d):
    """Flags shared by both scripts; `d` is the chosen preset (every default comes from it)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d["data"],
                   help="'shapes' (embedded, no download), 'cifar10', an image folder (one "
                        "sub-folder per class) or an .npz (arr_0 uint8 NHWC, arr_1 labels)")
    g.add_argument("--data_root", default="data", help="where cifar-10-python.tar.gz is (or goes)")
    g.add_argument("--download", action="store_true", help="download CIFAR-10 if it is missing")
    g.add_argument("--n_train", type=int, default=None, help="use only the first N training images")
    g.add_argument("--flip", dest="flip", action="store_true", default=d["flip"],
                   help="flip training images left-right at random: only for data whose classes "
                        "are mirror-symmetric (default: on for cifar10 and the ImageNet presets, "
                        "off for shapes, image folders and .npz)")
    g.add_argument("--no_flip", dest="flip", action="store_false", help="never flip (see --flip)")
    g = p.add_argument_group("model (ADM-style U-Net)")
    g.add_argument("--ch", type=int, default=d["ch"], help="base channel count")
    g.add_argument("--mult", type=int_list, default=d["mult"], help="channel multiplier per level")
    g.add_argument("--res_blocks", type=int, default=d["res_blocks"], help="residual blocks per level")
    g.add_argument("--attn", type=int_list, default=PresetAttention(d["attn"], d["res"]),
                   help="resolutions with self-attention, e.g. 16,8 ('' for none); default: the "
                        "preset's levels, which move with --res (the demo base's 4 is 8 at --res 16)")
    g.add_argument("--heads", type=int, default=d["heads"], help="attention heads")
    g.add_argument("--dropout", type=float, default=d["dropout"], help="dropout in residual blocks")
    g.add_argument("--skip_rescale", dest="skip_rescale", action="store_true", default=d["skip_rescale"],
                   help="scale every residual sum by 1/sqrt(2), as SR3 does (its 64->128/256 networks)")
    g.add_argument("--no_skip_rescale", dest="skip_rescale", action="store_false",
                   help="plain residual sums (DDPM, ADM)")
    g = p.add_argument_group("diffusion")
    g.add_argument("--schedule", choices=sorted(cdm.SCHEDULES), default=d["schedule"],
                   help="noise schedule (cosine: iDDPM §3.2; linear: DDPM §4)")
    g.add_argument("--T", type=int, default=d["T"], help="diffusion steps in training")
    g.add_argument("--variance", choices=["learned", "fixed"], default=d["variance"],
                   help="learned: hybrid loss (iDDPM §3.1); fixed: L_simple with Sigma = beta~")
    g.add_argument("--prediction", choices=cdm.PREDICTIONS, default=d["prediction"],
                   help="what the network predicts: eps (DDPM, the paper), x0, or the velocity "
                        "v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)")
    g.add_argument("--sampler", choices=cdm.SAMPLERS, default=d["sampler"],
                   help="how this stage is sampled: the preview grids, and sample.py's default")
    g.add_argument("--sample_steps", type=int, default=d["sample_steps"],
                   help="sampling steps: the preview grids, and sample.py's default (the ImageNet "
                        "presets: all T, as reported for the paper; sample.py --steps 250 is 16x faster)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d["steps"], help="training steps")
    g.add_argument("--batch_size", type=int, default=d["batch_size"],
                   help="images per step, in all processes together (the global batch)")
    g.add_argument("--micro_batch", type=int, default=0,
                   help="most images per process per forward pass; gradients are accumulated over "
                        "the rest (0: the whole per-process batch at once)")
    g.add_argument("--lr", type=float, default=d["lr"], help="Adam learning rate (paper: 1e-4)")
    g.add_argument("--warmup", type=int, default=d["warmup"], help="linear learning-rate warm-up steps")
    g.add_argument("--lr_decay", choices=["none", "cosine"], default=d["lr_decay"],
                   help="after warm-up: constant (the paper) or cosine decay to lr/10 (short runs)")
    g.add_argument("--grad_clip", type=float, default=d["grad_clip"],
                   help="clip the gradient norm (0: off; none is reported for the paper)")
    g.add_argument("--ema", type=float, default=d["ema"], help="EMA decay of the weights (paper: 0.9999)")
    g.add_argument("--ema_warmup", dest="ema_warmup", action="store_true", default=d["ema_warmup"],
                   help="EMA decay min(ema, (1 + step) / (10 + step)): short runs are not dominated by "
                        "the initial weights (our choice; none is reported for the paper)")
    g.add_argument("--no_ema_warmup", dest="ema_warmup", action="store_false", help="the EMA decay from step 0")
    g.add_argument("--p_uncond", type=float, default=0.0,
                   help="classifier-free guidance (Ho & Salimans 2022): train with the class label "
                        "replaced by a learned null class with this probability, so that sample.py "
                        "--guidance can be used; 0 (the paper's setting, CDM needs no guidance): none")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=d["out"], help="folder for the checkpoint, log and preview grids")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, data order and noise")
    g.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast the forward pass to bf16, or to fp16 with a gradient scaler "
                        "(weights and optimizer stay fp32)")
    g = p.add_argument_group("speed (none changes the numbers beyond rounding; CUDA defaults: "
                             "trainer.CUDA_SPEED; `bench.py --tune` finds your GPU's fastest)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model: faster steps on GPUs after a one-off compilation")
    g.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile's mode, with --compile")
    g.add_argument("--channels_last", choices=["auto", "on", "off"], default=None,
                   help="NHWC memory; auto: the layout measured faster (channels_last_default)")
    g.add_argument("--norm_precision", choices=["fp32", "bf16"], default=None,
                   help="GroupNorm under --precision bf16: float32 as autocast does, or bf16")
    g.add_argument("--adam", choices=list(ADAM_KWARGS), default=None,
                   help="Adam's implementation: foreach (one kernel per operation over all "
                        "tensors) or fused (one kernel)")
    g.add_argument("--cudnn_benchmark", choices=["on", "off"], default=None,
                   help="let cuDNN time its convolution algorithms once per shape (CUDA)")
    g.add_argument("--log_every", type=int, default=50, help="steps between log lines")
    g.add_argument("--save_every", type=int, default=d["save_every"],
                   help="steps between saves of OUT/ckpt.pt")
    g.add_argument("--keep_every", type=int, default=d["keep_every"],
                   help="also keep OUT/ckpt_STEP.pt every this many steps (0: only the last)")
    g.add_argument("--sample_every", type=int, default=0, help="steps between preview grids (0: end only)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    g.add_argument("--resume_inexact", action="store_true",
                   help="with --resume: continue even where the run cannot continue exactly (another "
                        "precision; dropout on another number of processes, or on several)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds one, deleting its checkpoints, log and "
                        "preview grids (without it, such an --out is refused)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


# Every flag is checked before any work starts (our choice): a wrong value gets one "error:" line
# that names the flag and what it must be, never a traceback minutes into a run.
SCHEDULE_BYTES = 120   # the float64 arrays of one GaussianDiffusion and their temporaries, per step t
POSITIVE = ["res", "ch", "res_blocks", "heads", "T", "sample_steps", "steps", "batch_size",
            "log_every", "save_every", "n_train"]
NON_NEGATIVE = ["micro_batch", "warmup", "grad_clip", "keep_every", "sample_every"]


def check_args(args):
    """Validate the shared flags and resolve the data-dependent default of --flip. Returns args."""
    def fail(msg):
        raise SystemExit(f"error: {msg}")
    for name in POSITIVE + NON_NEGATIVE:
        v = getattr(args, name, None)
        if v is not None and (not math.isfinite(v) or v < 0 or (v == 0 and name in POSITIVE)):
            fail(f"--{name} {v}: must be {'positive' if name in POSITIVE else '0 or more'}")
    if not (math.isfinite(args.lr) and 0 < args.lr <= 1):
        fail(f"--lr {args.lr}: the learning rate must be a number in (0, 1] (the paper: 1e-4)")
    if not 0 <= args.seed < 2 ** 63:
        fail(f"--seed {args.seed}: must lie in 0..2^63-1")
    if args.resume and args.overwrite:
        fail("--resume continues the run in --out and --overwrite replaces it: choose one")
    if not 0 <= args.ema < 1:
        fail(f"--ema {args.ema}: the EMA decay must lie in [0, 1) (the paper: 0.9999)")
    if not 0 <= args.dropout < 1:
        fail(f"--dropout {args.dropout}: must lie in [0, 1)")
    if not args.mult or min(args.mult) < 1:
        fail(f"--mult {','.join(map(str, args.mult))}: give one positive multiplier per level, e.g. 1,2,2")
    if args.res % 2 ** (len(args.mult) - 1):
        fail(f"--res {args.res} cannot be halved {len(args.mult) - 1} times (one per --mult level "
             f"after the first): use a multiple of {2 ** (len(args.mult) - 1)} or fewer levels")
    levels = [args.res >> level for level in range(len(args.mult))]
    if isinstance(args.attn, PresetAttention):    # the preset's levels, at this --res
        scaled = tuple(a * args.res // args.attn.res for a in args.attn)
        if set(scaled) - set(levels) or any(a * args.res % args.attn.res for a in args.attn):
            fail(f"--attn: the preset's attention at {','.join(map(str, args.attn))} pixels of its "
                 f"--res {args.attn.res} is at no level of this model ({', '.join(map(str, levels))} "
                 "pixels): give --attn ('' for none)")
        args.attn = scaled
    if set(args.attn) - set(levels):
        fail(f"--attn {','.join(map(str, args.attn))}: this model's levels are at "
             f"{', '.join(map(str, levels))} pixels; attention can go only at those ('' for none)")
    widths = {args.ch * m for level, m in enumerate(args.mult)
              if args.res >> level in args.attn or level == len(args.mult) - 1}  # + the middle block
    if any(w % args.heads for w in widths):
        fail(f"--heads {args.heads} must divide the channels of every attention block "
             f"({', '.join(map(str, sorted(widths)))} with --ch {args.ch} --mult "
             f"{','.join(map(str, args.mult))})")
    if args.sample_steps > args.T:
        fail(f"--sample_steps {args.sample_steps}: at most --T ({args.T})")
    if not 0 <= args.p_uncond < 1:
        fail(f"--p_uncond {args.p_uncond}: the probability of dropping the label lies in [0, 1) "
             "(0.1 or 0.2 are usual; 0: no guidance)")
    if args.norm_precision == "bf16" and args.precision != "bf16":
        fail("--norm_precision bf16 runs GroupNorm in bf16 under --precision bf16: add --precision bf16")
    if args.compile_mode != "default" and not args.compile:
        fail(f"--compile_mode {args.compile_mode} is torch.compile's mode: add --compile")
    safety.check_memory(SCHEDULE_BYTES * (args.T + 1), f"--T {args.T}", "the paper's models use T = 4000 or 2000")
    pick_device(args.device)
    if args.flip is None:
        args.flip = data.default_flip(args.data)
    return args


def model_config(args, *, out_channels, num_classes, low_res=None, aug_time=False, in_channels=3):
    return {"resolution": args.res, "model_channels": args.ch, "channel_mult": list(args.mult),
            "num_res_blocks": args.res_blocks, "attention_resolutions": list(args.attn),
            "num_heads": args.heads, "dropout": args.dropout, "out_channels": out_channels,
            "num_classes": num_classes, "low_res": low_res, "aug_time": aug_time,
            "in_channels": in_channels,
            **({"skip_rescale": True} if args.skip_rescale else {}),  # absent: the configs of older checkpoints
            **({"null_class": True} if getattr(args, "p_uncond", 0) else {})}  # and of --p_uncond 0


def make_config(args, dataset, *, low_res=None, augment=None):
    """Everything needed to rebuild and sample the model later, stored in its checkpoint."""
    learned = args.variance == "learned"
    augment = augment or {"type": "none"}
    return {
        "resolution": args.res, "low_res": low_res,
        "num_classes": dataset.num_classes, "class_names": list(dataset.class_names),
        "data": args.data,
        "model": model_config(args, out_channels=dataset.channels * (2 if learned else 1),
                              num_classes=dataset.num_classes, low_res=low_res,
                              aug_time=augment["type"] == "noise", in_channels=dataset.channels),
        "diffusion": {"schedule": args.schedule, "T": args.T, "variance": args.variance,
                      "lambda_vlb": 0.001, "prediction": args.prediction},
        "augment": augment,
        "flip": bool(args.flip),
        "sample_steps": args.sample_steps,
        "sampler": args.sampler,
        **({"p_uncond": args.p_uncond} if args.p_uncond else {}),
    }


def pick_device(name):
    """'auto' (CUDA if present), or a device that exists here; anything else exits with a message."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r} is not a device; use 'auto', 'cpu', 'cuda' or "
                         f"'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {name}: CUDA is not available on this machine; use "
                             f"--device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} "
                             f"GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: --device {name}: cdm runs on 'cpu', 'cuda' or 'mps'")
    return device


# What a training run writes into --out: with --overwrite these are deleted before it starts.
RUN_FILES = re.compile(r"(ckpt(_\d+)?\.pt|log\.jsonl|samples_\d+\.png)")


def claim_out(args):
    """Before any work: make --out and prove it writable, lock it against a second run, remove what
    killed runs left there, and refuse to replace a run that is there unless asked (--overwrite),
    or to --resume one that is not. Under torchrun only rank 0 writes, so only rank 0 claims."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    ckpt = os.path.join(args.out, "ckpt.pt")
    if os.path.isdir(args.data) and os.path.commonpath(
            [os.path.realpath(args.out), os.path.realpath(args.data)]) == os.path.realpath(args.data):
        raise SystemExit(f"error: --out {args.out} is inside --data {args.data}: it would become one "
                         "of the data's class folders; choose an --out outside it")
    if args.resume and not os.path.isfile(ckpt):
        raise SystemExit(f"error: --resume: {ckpt} does not exist, so there is nothing to resume; "
                         "drop --resume to start a new run")
    out = safety.prepare_output_folder(args.out)
    if args.resume:
        return
    there = safety.visible_entries(out)
    if there and not args.overwrite:
        what = "a training run" if any(RUN_FILES.fullmatch(n) for n in there) else "other files"
        raise SystemExit(f"error: --out {out} already holds {what} ({', '.join(there[:4])}"
                         f"{', ...' if len(there) > 4 else ''}): continue it with --resume, replace it "
                         "with --overwrite, or choose a new --out")


def load_training_data(args, res):
    """The training images at the stage's (highest) resolution, or exit with the loader's message;
    refused before loading if they cannot fit in memory."""
    try:
        count, need = data.load_size(args.data, res, "train", args.n_train)
        safety.check_memory(need, f"--data {args.data} at --res {res} ({count} images)",
                            "use a smaller --res or --n_train, or `python data.py prepare` the folder "
                            "(training then reads it from disk)")
        return data.load_dataset(args.data, res, "train", n=args.n_train, seed=args.seed,
                                 download=args.download, root=args.data_root)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def out_of_memory(e):
    """Is this exception an allocation that failed? (CUDA: torch.OutOfMemoryError; the CPU
    allocator raises a plain RuntimeError.)"""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def check_resources(args, config, model, device, micro, main, start):
    """Refuse, before the first step, a run whose memory or disk cannot hold it, with the numbers:
    the weights, their gradients, Adam's two moments and the EMA (20 bytes a parameter) and a lower
    bound of the activations on the device; on rank 0, the checkpoints on the disk of --out."""
    n_params = sum(p.numel() for p in model.parameters())
    need = 20 * n_params + activation_bytes(config["model"], micro)
    what = f"training {n_params / 1e6:.1f}M parameters in micro-batches of {micro}"
    safety.check_memory_on(device, need, what, "use a smaller --micro_batch (gradients are accumulated), "
                                               "--batch_size or model")
    if not main:
        return
    ckpt_bytes = 16 * n_params + (1 << 20)      # weights, EMA, Adam's moments (fp32), and the rest
    kept = len(range((start // args.keep_every + 1) * args.keep_every, args.steps + 1,
                     args.keep_every)) if args.keep_every else 0
    # A save writes the new file before the old one goes: 2 rolling copies at once, 1 if resuming
    # (the old one is on the disk already); then every kept copy; previews and the log are small.
    need = ckpt_bytes * ((1 if args.resume else 2) + kept) + (8 << 20)
    if args.overwrite and not args.resume:        # the previous run's files are deleted first
        need -= sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out)
                    if RUN_FILES.fullmatch(n))
    safety.check_disk(args.out, need, f"this run ({safety.size(ckpt_bytes)} per checkpoint"
                                      + (f", {kept} of them kept by --keep_every" if kept else "") + ")")


def activation_bytes(model_cfg, batch, training=True):
    """A lower bound on the memory a micro-batch of `batch` images takes in the U-Net: in training
    each residual block keeps at least four float32 tensors of its width and resolution for the
    backward pass (its norm, activation, convolution and scale-shift outputs); without gradients
    (sampling), a level holds about four at a time. The real figures are larger."""
    res, ch, blocks = model_cfg["resolution"], model_cfg["model_channels"], model_cfg["num_res_blocks"]
    per_level = (2 * blocks + 1) if training else 1
    per_image = sum(per_level * 4 * mult * ch * (res >> level) ** 2
                    for level, mult in enumerate(model_cfg["channel_mult"]))
    return 4 * batch * per_image


_M32 = 0xFFFFFFFF


def _mul32(x, c):
    """x * c mod 2^32 for int64 x in [0, 2^32) and a 32-bit constant c, without int64 overflow:
    the two 16-bit halves of c each give a product below 2^48."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """A 32-bit integer hash (the 'lowbias32' constants of C. Wellons' hash-prospector): every
    input bit flips about half of the output bits. Works on Python ints and int64 tensors alike."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class ExampleRandom:
    """The training randomness of one step, for the examples at global positions `positions` of
    the global batch -- made on `device` by hashing (seed, step, stream, position, element), with
    no generator state (a "counter-based" random number generator, as Philox is).

    Why: under torchrun each rank makes only its own slice's numbers, on its own GPU, yet every
    number is what a one-process run makes for that example (2 processes == 1 process), and a
    resumed run needs nothing but the step (SIGKILL + resume == uninterrupted). Each `stream` (a
    name: "index", "flip", "t", "eps", ...) is an independent sequence. Every method returns a
    tensor whose first dimension is the examples.
    """

    def __init__(self, seed, step, positions, device):
        self.device = torch.device(device)
        self.key = _mix32((_mix32(seed & _M32) + step) & _M32)   # seed mod 2^32
        self.positions = positions.to(self.device, torch.int64)

    def _bits(self, stream, shape):
        """Independent 32-bit integers, (examples, *shape), as int64 in [0, 2^32): the hash of
        (example's hash XOR element's hash), each keyed by (seed, step, stream)."""
        key = _mix32(self.key ^ zlib.crc32(stream.encode()))
        ex = _mix32(self.positions ^ key)                                 # one per example
        element = torch.arange(math.prod(shape), device=self.device, dtype=torch.int64)
        el = _mix32(element ^ _mix32(key ^ 0x9E3779B9))                   # one per element
        return _mix32(ex[:, None] ^ el[None, :]).reshape(len(ex), *shape)

    def rand(self, stream, *shape):
        """Uniform on (0, 1): 24 random bits, centred in their bin, so never exactly 0 or 1."""
        return ((self._bits(stream, shape) >> 8).float() + 0.5) / 2 ** 24

    def randint(self, stream, low, high):
        """One integer per example, uniform on {low, ..., high - 1} (exact integer arithmetic,
        the same on every device: (bits * n) >> 32 < n for n < 2^31)."""
        return low + ((self._bits(stream, ()) * (high - low)) >> 32)

    def randn(self, stream, *shape):
        """N(0, 1) by the Box-Muller transform: sqrt(-2 ln u1) cos(2 pi u2)."""
        u = self.rand(stream, 2, *shape)
        return torch.sqrt(-2 * torch.log(u[:, 0])) * torch.cos(2 * math.pi * u[:, 1])


def drop_labels(c, u, p_uncond, null):
    """Classifier-free guidance's training (Ho & Salimans 2022): each label replaced by the null
    class `null` (= num_classes, a learned embedding of its own) where its uniform u < p_uncond,
    so that one network learns eps(x, c) and eps(x, null) together."""
    return torch.where(u < p_uncond, torch.full_like(c, null), c)


@torch.no_grad()
def ema_update(ema, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, all tensors in one call."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def grid_image(rows, min_tile=64):
    """rows: list of (B, C, H, W) float tensors in [-1, 1] (C = 1 or 3), one grid row each -> a PIL
    image. Every image is enlarged with nearest-neighbour (so low-res pixels stay visible) to the
    largest H, and to at least min_tile pixels, so low-res inputs and high-res outputs line up. A row
    shorter than the longest is filled up with black."""
    from PIL import Image
    H = max(r.shape[-1] for r in rows)
    H = H * math.ceil(min_tile / H)
    B = max(len(r) for r in rows)
    rows = [torch.nn.functional.interpolate(data.to_rgb(r.float().cpu()), size=(H, H), mode="nearest")
            for r in rows]
    rows = [torch.cat([r, -torch.ones(B - len(r), *r.shape[1:])]) for r in rows]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)   # (3, rows*H, B*H)
    return Image.fromarray(data.to_uint8(grid).permute(1, 2, 0).numpy())


def save_grid(path, rows, min_tile=64):
    """grid_image(rows) written to path as a PNG, atomically."""
    image = grid_image(rows, min_tile)
    safety.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def setup_distributed(device_name):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one process.
    NCCL on GPUs, gloo on CPUs. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


@contextlib.contextmanager
def distributed(device_name):
    """setup_distributed for the length of a `with` block; the process group is destroyed on every
    way out of it (return, error, interrupt). Yields (rank, world_size, device).
    On a normal return every process first waits at a barrier, so that none tears down its
    connections while another still finishes its last collective: one 2-process gloo run in the
    suite trained, agreed, and then aborted at exit ("terminate called without an active
    exception"), which a teardown race of that kind explains (not reproduced in 22 further runs)."""
    import torch.distributed as dist
    rank, world, device = setup_distributed(device_name)
    grouped = lambda: dist.is_available() and dist.is_initialized()   # also with one process: torchrun made a group
    try:
        yield rank, world, device
        if grouped():
            dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
    finally:
        if grouped():
            dist.destroy_process_group()


def all_sum(values, world, device):
    """Element-wise sums of a list of floats over all processes (every rank gets the same list).
    The tensor lives on the training device: NCCL reduces CUDA tensors only."""
    if world == 1:
        return values
    import torch.distributed as dist
    v = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(v)
    return v.tolist()


def replicas_max_difference(model):
    """The largest difference between any weight on any process and rank 0's copy of it. DDP
    keeps the replicas equal by construction; we say so, measured, rather than assume it.
    Every tensor stays on the model's device (NCCL reduces CUDA tensors only)."""
    import torch.distributed as dist
    device = next(model.parameters()).device
    diff = torch.zeros((), device=device)
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        diff = torch.maximum(diff, (p.detach() - ref).abs().max())
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


@dataclasses.dataclass
class Distillation:
    """What turns the training loop into a round of progressive distillation (distill.py):
    teacher  the network taking two DDIM steps (eval mode, no gradients)
    chain    the teacher's chain, its 2N steps (cdm.distillation_grid); the student's t are its
             even indices
    student_chain  the student's chain, N steps
    init     the weights the student starts from (the teacher's): PD Alg. 2, "init student from
             teacher" """
    teacher: torch.nn.Module
    chain: cdm.GaussianDiffusion
    student_chain: cdm.GaussianDiffusion
    init: dict


def train(args, config, dataset, make_kwargs, distill=None):
    """The training loop shared by both stages, and by distill.py's rounds (distill: a
    Distillation; then the loss is cdm.distillation_loss and t the student's steps).

    make_kwargs(x0, c, train, rng) -> the model's conditioning inputs for a batch of clean
    images x0: {"c": c} for a base model; SR adds z (and s), made from x0 with augmentation
    (random numbers from `rng`, an ExampleRandom) when train=True.

    Under torchrun each process makes only its own slice of the global batch of --batch_size
    images, on its device, and trains on it in micro-batches of at most --micro_batch; DDP averages
    the gradients. Every random number (which image, flip, t, eps, augmentation) is a hash of
    (--seed, step, the example's position in the global batch): so N processes take the same steps
    as one process would, to float rounding, and a resumed run continues exactly.
    The process group is destroyed on every way out (return, error, interrupt).
    """
    with distributed(args.device) as (rank, world, device):
        return _train(args, config, dataset, make_kwargs, rank, world, device, distill)


def _train(args, config, dataset, make_kwargs, rank, world, device, distill=None):
    """DDPM Algorithm 1, repeated until --steps (what the rest of this file only prepares):

      x0 ~ q(x0) with its class c; t ~ Uniform({1, ..., T}); eps ~ N(0, I)   (+ an SR stage's z, s)
      take a gradient step on L_hybrid (iDDPM §3.1; L_simple for fixed variances, DDPM Eq. (14))
      update the EMA of the weights, which is what is sampled

    (A distillation round, PD Alg. 2, is the same loop: t is one of the student's N steps and the
    loss is cdm.distillation_loss against the teacher's two DDIM steps: Run.losses.)
    Everything else -- building or resuming the model, micro-batches, logging, checkpoints,
    previews, stopping on signals -- is a named helper of the Run beside it."""
    run = Run(args, config, dataset, make_kwargs, rank, world, device, distill)
    model, net, ema, opt, scaler = run.model, run.net, run.ema, run.opt, run.scaler
    model.train()
    with run.stops_on_signals(), run.explains_failures():
        while run.step < args.steps:
            x0, t, eps, kwargs = run.batch()                  # this process's slice of the batch
            for g in opt.param_groups:
                g["lr"] = learning_rate(args, run.step)
            opt.zero_grad(set_to_none=True)
            loss_sum, mse = torch.zeros((), device=device), []
            for r, sync in run.micro_batches():               # gradients summed over micro-batches
                with (contextlib.nullcontext() if sync else net.no_sync()), run.autocast:
                    cond = {name: value[r] for name, value in kwargs.items()}      # c (and z, s)
                    terms = run.losses(net, x0[r], t[r], cond, eps[r])
                    loss = terms["loss"].mean() / run.accum
                scaler.scale(loss).backward()
                loss_sum += loss.detach().float()
                mse.append(terms["mse"].detach().float())
            if args.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(opt)
            scaler.update()
            ema_update(ema, model, run.ema_decay())
            run.step += 1
            run.after_step(loss_sum, torch.cat(mse), t)       # log, save, preview; stop if signalled
    return run.finish()


class LossStats:
    """What the log reports, summed on the device between log lines (the host reads it once per
    interval): the MSE by quarter of the t range, and whether any loss was non-finite."""

    def __init__(self, device, T):
        self.T = T
        self.sums = torch.zeros(4, device=device, dtype=torch.float64)
        self.counts = torch.zeros(4, device=device, dtype=torch.float64)
        self.bad = torch.zeros((), device=device)
        self.t0, self.seen = time.time(), 0

    def add(self, loss, mse, t, batch_size):
        q = (t - 1) * 4 // self.T               # the quarter of the t range of each example
        self.sums.index_add_(0, q, mse.double())
        self.counts.index_add_(0, q, torch.ones_like(mse, dtype=torch.float64))
        self.bad += (~torch.isfinite(loss)).float()
        self.seen += batch_size


class Run:
    """One training run's state and machinery: the model, its EMA, optimizer and loss scaler (made
    fresh or resumed from --out), the batches, the micro-batches, logging, checkpoints, previews,
    and stopping on Ctrl-C / SIGTERM. Under torchrun there is one Run per process (rank)."""

    def __init__(self, args, config, dataset, make_kwargs, rank, world, device, distill=None):
        self.args, self.config, self.dataset, self.make_kwargs = args, config, dataset, make_kwargs
        self.distill = distill
        self.rank, self.world, self.device, self.main = rank, world, device, rank == 0
        B = self.B = args.batch_size
        if B % world:
            raise SystemExit(f"error: --batch_size {B} (global) must divide evenly over {world} processes")
        per_rank = B // world
        micro = self.micro = min(args.micro_batch or per_rank, per_rank)
        if per_rank % micro:
            raise SystemExit(f"error: {per_rank} images per process cannot be split into micro-batches "
                             f"of {micro}; choose --micro_batch dividing {per_rank}")
        self.accum = per_rank // micro             # gradient accumulation steps, derived
        os.makedirs(args.out, exist_ok=True)
        self.ckpt_path = os.path.join(args.out, "ckpt.pt")  # the rolling "last" checkpoint
        self.N = N = len(dataset.y)
        if N < B:
            raise SystemExit(f"error: the dataset has {N} images, fewer than --batch_size {B}")

        torch.manual_seed(args.seed)               # the same initial weights on every rank
        try:
            speed = speed_settings(args, device)
            model = self.model = apply_speed(cdm.model_from_config(config["model"]).to(device), speed)
        except ValueError as e:                    # e.g. --heads not dividing a level's channels
            raise SystemExit(f"error: {e}") from None
        torch.manual_seed(args.seed + rank)        # dropout differs per rank, as it should
        self.diffusion = cdm.diffusion_from_config(config["diffusion"]) if distill is None else distill.chain
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(model.parameters(), lr=args.lr, **ADAM_KWARGS[speed["adam"]])
        # fp16 needs loss scaling (its range ends at 65504); bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        self.step = self.saved_step = 0            # saved_step: that of the last good checkpoint
        if args.resume and os.path.exists(self.ckpt_path):
            self.resume(speed)
        if distill is not None:
            distill.teacher.to(device)             # this process's device (under torchrun: its GPU)
            if self.step == 0:                     # PD Alg. 2: the student starts as its teacher
                model.load_state_dict(distill.init)
                self.ema.load_state_dict(distill.init)
        check_resources(args, config, model, device, micro, self.main, start=self.step)
        if args.overwrite and self.main and not args.resume:  # asked for: the previous run's files go now
            old = [n for n in os.listdir(args.out) if RUN_FILES.fullmatch(n)]
            for n in old:
                os.remove(os.path.join(args.out, n))
            if old:
                print(f"--overwrite: deleted the previous run in {args.out} ({len(old)} files)")
        self.net = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        # torch.compile fuses the small elementwise ops; it pays on GPUs, hardly on a 2-core CPU,
        # and compiles for a while at the start of every run (docs/speed.md).
        if args.compile:
            self.net = torch.compile(self.net, mode=None if args.compile_mode == "default" else args.compile_mode)
        if self.main:
            print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {N} training "
                  f"images{' (all grayscale: a 1-channel model)' if dataset.channels == 1 else ''}, "
                  f"{args.steps} steps of {B} on {world} x {device}"
                  + (f" ({self.accum} micro-batches of {micro} per process)" if self.accum > 1 else ""))
        # A fixed batch of training images (one per class, cycling) whose classes and low-res
        # copies condition the preview grids.
        idx = torch.cat([torch.nonzero(dataset.y == k)[:1, 0] for k in range(dataset.num_classes)])
        self.preview_idx = idx[torch.arange(min(16, max(8, len(idx)))) % len(idx)]
        self.log = open(os.path.join(args.out, "log.jsonl"), "a") if self.main else None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        self.autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        self.bar = tqdm(total=args.steps, initial=self.step, disable=args.no_progress or not self.main,
                        dynamic_ncols=True) if tqdm else None
        self.positions = torch.arange(rank * per_rank, (rank + 1) * per_rank)  # this rank's slice
        self.stats = LossStats(device, self.diffusion.T)
        self.stop = []

    def resume(self, speed):
        """Continue the run in --out from its checkpoint, refusing one it cannot continue exactly."""
        args, config, ckpt_path = self.args, self.config, self.ckpt_path
        try:
            ckpt = safety.load_checkpoint(ckpt_path)
        except ValueError as e:
            raise SystemExit(f"error: --resume: {e}") from None
        changed = [k for k in ("model", "diffusion", "augment", "flip", "distill")
                   if ckpt["config"].get(k) != config.get(k)]
        if changed:
            old, new = ckpt["config"].get(changed[0]), config[changed[0]]
            if isinstance(old, dict) and isinstance(new, dict):     # name what differs
                keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                what = "; ".join(f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in keys[:3])
            else:
                what = f"{old!r} in the checkpoint, {new!r} now"
            raise SystemExit(f"error: {ckpt_path} was trained with a different {' and '.join(changed)} "
                             f"config ({what}); resume with the same flags, or start a new --out")
        if ckpt["args"].get("batch_size") != self.B:
            raise SystemExit(f"error: {ckpt_path} was trained with --batch_size "
                             f"{ckpt['args'].get('batch_size')}; resume with the same global batch")
        inexact = resume_differences(ckpt, args, self.world, config)
        if inexact and not args.resume_inexact:
            raise SystemExit(f"error: --resume cannot continue {ckpt_path} exactly: {'; '.join(inexact)}; from "
                             f"step {ckpt['step']} on it would differ from the run it continues: resume as it "
                             "ran, or add --resume_inexact to continue anyway")
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        for group in self.opt.param_groups:        # this run's --adam, not the saved run's
            group.update(ADAM_KWARGS[speed["adam"]])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.world == 1:                        # dropout's generator; per-rank ones restart
            torch.set_rng_state(ckpt["rng"]["torch"])
        self.step = self.saved_step = ckpt["step"]
        if self.main:
            done = f"; it has --steps {args.steps} already: nothing to train" if self.step >= args.steps else ""
            print(f"resumed from {ckpt_path} at step {self.step}{done}")

    # --- the batch ------------------------------------------------------------------------------
    def batch(self):
        """This rank's slice of the global batch, made on the device: clean images x0 ~ q(x0)
        (uniform over the training set, with replacement), classes c, steps t ~ U{1..T}, noise
        eps ~ N(0, I), and the stage's conditioning (SR: the augmented low-res z, and s). Only the
        image indices are made on the host, which reads the images; uint8 travels to the device."""
        args, dataset, device = self.args, self.dataset, self.device
        idx = ExampleRandom(args.seed, self.step, self.positions, "cpu").randint("index", 0, self.N)
        rng = ExampleRandom(args.seed, self.step, self.positions, device)
        x0 = data.to_float(dataset.x[idx].to(device, non_blocking=True))
        if self.config["flip"]:
            x0 = data.random_flip(x0, rng.rand("flip"))
        c = dataset.y[idx].to(device, non_blocking=True)
        if args.p_uncond:
            c = drop_labels(c, rng.rand("uncond"), args.p_uncond, dataset.num_classes)
        if self.distill is None:
            t = rng.randint("t", 1, self.diffusion.T + 1)
        else:                                      # the student's steps: even teacher indices
            t = 2 * rng.randint("t", 1, self.diffusion.T // 2 + 1)
        eps = rng.randn("eps", *x0.shape[1:])
        return x0, t, eps, self.make_kwargs(x0, c, train=True, rng=rng)

    def losses(self, net, x0, t, cond, eps):
        """Per-example "loss" and "mse": L_hybrid or L_simple (training_losses), or PD's loss."""
        if self.distill is None:
            return self.diffusion.training_losses(net, x0, t, cond, eps=eps)
        loss = cdm.distillation_loss(self.diffusion, net, self.distill.teacher, x0, t, eps, cond)
        return {"loss": loss, "mse": loss}

    def micro_batches(self):
        """(slice, sync) for each micro-batch of this rank's slice; DDP all-reduces the gradients
        on the last one only (sync)."""
        for m in range(self.accum):
            yield slice(m * self.micro, (m + 1) * self.micro), m == self.accum - 1 or self.world == 1

    def ema_decay(self):
        """--ema, or with --ema_warmup min(--ema, (1 + step) / (10 + step)), so that short CPU runs
        are not dominated by the random initial weights (our choice)."""
        step = self.step
        return min(self.args.ema, (1 + step) / (10 + step)) if self.args.ema_warmup else self.args.ema

    # --- after each step: log, checkpoint, preview, stop ----------------------------------------
    def after_step(self, loss, mse, t):
        args, step = self.args, self.step
        self.stats.add(loss, mse, t, self.B)
        if self.bar:
            self.bar.update(1)
        logging = step % args.log_every == 0 or step == args.steps
        saving = (step % args.save_every == 0 or step == args.steps
                  or (args.keep_every and step % args.keep_every == 0))   # kept even between saves
        stop_now = self.stopping() and step < args.steps
        if logging or saving or stop_now:           # the host reads the device here, and only here
            loss_value = self.check_finite(loss)
            if logging:
                if self.main:
                    self.write_log(loss_value)
                self.stats = LossStats(self.device, self.diffusion.T)
        if saving:
            self.checkpoint()
        if self.main and args.sample_every and step % args.sample_every == 0 and step != args.steps:
            self.preview()
        if stop_now:                                # any rank was signalled: all stop together
            self.checkpoint()
            if self.main:
                print(f"interrupted: saved {self.ckpt_path} at step {step}; continue with --resume", flush=True)
            raise SystemExit(130)

    def last_good(self, then="continue it with --resume", otherwise="run it again"):
        """What a run that has to stop leaves, and what to do next."""
        if self.saved_step:
            return f"the last good checkpoint, {self.ckpt_path} at step {self.saved_step}, is intact: {then}"
        return f"no checkpoint was saved yet: {otherwise}"

    def disk_error(self, e, what):
        """A write that failed (a full disk, a quota, a vanished folder) ends the run in one line."""
        return SystemExit(f"error: could not write {what}: {e.strerror or e}; "
                          f"{self.last_good('free some space, then continue it with --resume')}")

    def check_finite(self, loss):
        """Stop, on every rank, if any loss since the last check was not finite -- before a
        checkpoint could save the damage. Returns the step's loss averaged over the ranks."""
        loss_value, bad = all_sum([loss.item(), self.stats.bad.item()], self.world, self.device)
        if bad or not math.isfinite(loss_value):
            how = "with a lower --lr, or with --precision fp32 or bf16"
            raise SystemExit(f"error: the loss became {loss_value / self.world} by step {self.step}; stopped: "
                             + self.last_good(f"--resume it {how}", f"start again {how}"))
        return loss_value / self.world

    def write_log(self, loss_value):
        stats = self.stats
        rate = stats.seen / (time.time() - stats.t0)
        qm = safety.json_safe((stats.sums / stats.counts).tolist())  # None: a quarter with no example
        line = {"step": self.step, "loss": loss_value, "mse_quarters": qm, "img_per_s": rate,
                "minutes": (time.time() - stats.t0) / 60}
        try:
            self.log.write(json.dumps(line, allow_nan=False) + "\n")
            self.log.flush()
        except OSError as e:
            raise self.disk_error(e, self.log.name) from None
        msg = (f"step {self.step:6d} | loss {loss_value:.4f} | mse by t quarter "
               + " ".join("  -  " if v is None else f"{v:.3f}" for v in qm) + f" | {rate:.0f} img/s")
        if self.bar and not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss_value:.4f}")
            self.bar.write(msg)
        else:
            print(msg, flush=True)  # flushed: logs piped to a file stay current

    def checkpoint(self):
        if not self.main:
            return
        args, step = self.args, self.step
        state = {"format": safety.CHECKPOINT_FORMAT, "config": self.config, "model": self.model.state_dict(),
                 "ema": self.ema.state_dict(), "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                 "step": step, "args": vars_plain(args), "world": self.world,
                 "rng": {"torch": torch.get_rng_state()}}
        try:
            safety.save_checkpoint(state, self.ckpt_path)
            self.saved_step = step
            if args.keep_every and step % args.keep_every == 0:
                safety.save_checkpoint(state, os.path.join(args.out, f"ckpt_{step:07d}.pt"))
        except OSError as e:
            raise self.disk_error(e, f"the checkpoint of step {step}") from None
        safety.remove_stale_temporaries(args.out)    # what a run killed shortly before left

    def preview(self):
        """The EMA model's samples for the preview batch, beside their low-res inputs (SR) and the
        real images, as samples_STEP.png in --out."""
        args, dataset = self.args, self.dataset
        x0 = data.to_float(dataset.x[self.preview_idx]).to(self.device)
        c = dataset.y[self.preview_idx].to(self.device)
        kwargs = self.make_kwargs(x0, c, train=False, rng=None)
        if self.distill is None:
            chain, sampler = self.diffusion.sampling_chain(args.sampler, args.sample_steps), args.sampler
        else:
            chain, sampler = self.distill.student_chain, "ddim"
        x = chain.sample(self.ema, x0.shape, kwargs, sampler=sampler, generator=torch.Generator().manual_seed(0))
        rows = ([kwargs["z"]] if "z" in kwargs else []) + [x, x0]
        path = os.path.join(args.out, f"samples_{self.step:06d}.png")
        try:
            save_grid(path, rows)
        except OSError as e:
            raise self.disk_error(e, path) from None
        return path

    # --- signals and failures ---------------------------------------------------------------------
    @contextlib.contextmanager
    def stops_on_signals(self):
        """Ctrl-C (SIGINT) or a scheduler's SIGTERM: finish the current step, save, exit. A second
        Ctrl-C quits at once. Stopping only between steps keeps the checkpoint exactly resumable."""
        def request_stop(signum, frame):
            if self.stop:
                raise KeyboardInterrupt
            self.stop.append(signum)
            if self.main:
                print("\nstopping after this step to save a checkpoint (Ctrl-C again: quit at once)", flush=True)
        handlers = ({sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
                    if threading.current_thread() is threading.main_thread() else {})
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if self.bar:
                self.bar.close()

    def stopping(self):
        """Was any rank signalled? All ranks must agree, to stop at the same step: with several
        processes that is the one small host sync per step."""
        return all_sum([float(bool(self.stop))], self.world, self.device)[0] > 0 if self.world > 1 else bool(self.stop)

    @contextlib.contextmanager
    def explains_failures(self):
        """The training data that cannot be read any more (a prepared file truncated since the
        start) and a micro-batch that does not fit in memory end the run in one line."""
        try:
            yield
        except OSError as e:
            raise SystemExit(f"error: reading the training data: {safety.describe(e)}; {self.last_good()}") from None
        except (RuntimeError, MemoryError) as e:
            if not out_of_memory(e):
                raise
            raise SystemExit(f"error: out of memory in a micro-batch of {self.micro} images on {self.device} "
                             f"({str(e).splitlines()[0][:80]}): use --micro_batch {max(1, self.micro // 2)}; "
                             f"{self.last_good()}") from None

    def finish(self):
        """The last preview, and under torchrun a check that every process holds the same weights."""
        if self.main:
            path = self.preview()
            print(f"saved {self.ckpt_path} and {path}")
        if self.world > 1:
            diff = replicas_max_difference(self.model)
            if self.main:
                print(f"weights on all {self.world} processes agree (largest difference {diff:.3g})")
        return self.model, self.ema


def resume_differences(ckpt, args, world, config):
    """What would make a resumed run differ from the run it continues: every random number of the
    loop is a function of (seed, step, example) and so the same on any number of processes, but
    dropout draws from each process's own generator, restored only when one process saved and one
    resumes; and another precision rounds differently. [] when it continues exactly."""
    out = []
    saved_world = ckpt.get("world", 1)               # checkpoints before this was recorded: 1
    if config["model"].get("dropout", 0) > 0 and (world > 1 or saved_world != world):
        out.append(f"dropout draws per process, and its random numbers saved on {saved_world} process"
                   f"{'es' if saved_world > 1 else ''} cannot be restored on {world}")
    saved_precision = ckpt["args"].get("precision", "fp32")
    if saved_precision != args.precision:
        out.append(f"it was trained in {saved_precision}, and --precision is {args.precision} now")
    return out


def learning_rate(args, step):
    """Linear warm-up, then constant (the paper's Adam, lr 1e-4) or, for short CPU runs where an
    EMA over 0.9999 has nothing to average, a cosine decay to lr/10 (our choice)."""
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    if args.lr_decay == "none":
        return args.lr * warm
    progress = min(1.0, step / max(1, args.steps))
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def vars_plain(args):
    """argparse namespace -> dict of plain values (a checkpoint holds nothing else)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, (int, float, str, bool, type(None))):
            out[k] = v
        elif isinstance(v, (tuple, list)):
            out[k] = list(v)
    return out
