"""bench.py -- how fast cdm trains and samples on this machine, beside the well-known U-Nets.

  python bench.py                                   # demo stages + CIFAR-sized model, fp32 and bf16
  python bench.py --configs cifar --peers ~/peers   # + guided-diffusion and diffusers, same config
  python bench.py --configs cifar --device cuda --precision bf16 --compile

For each configuration x implementation x precision it measures, in a fresh process (so that
peak memory belongs to that row alone):
  train img/s    images per second through forward + backward + optimizer step (AdamW), batch
                 --batch_size; the fastest of --repeats steps after --warmup steps
  sample NFE/s   network evaluations per second at batch --sample_batch, no gradients, the
                 fastest of --repeats calls. Ours: our real sampler (GaussianDiffusion.sample,
                 respaced to 2 steps); peers: their bare forward pass, which flatters them slightly
                 Fastest, not median: on a shared machine interference only ever adds time, so
                 the fastest repeat is the best estimate of the code's own speed (as Python's
                 timeit advises); every implementation is measured the same way
  peak MiB       memory above what the process held before the first step (CPU: peak resident
                 set growth, from /proc; CUDA: torch.cuda.max_memory_allocated)
  GFLOP/s        the model's FLOPs (counted by torch.utils.flop_counter) per second, and as % of
                 the matmul ceiling this run measures first (a 2048^2 matmul, 8192^2 on CUDA)
--peers DIR: DIR holds a checkout of openai/guided-diffusion and a `pip install --target DIR/site
diffusers`; their U-Nets are built at the same configuration (parameter counts are printed) and
timed in the same run. Their code is only imported, never copied here. See the README.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

import cdm
import safety
import train_base
import train_sr
import trainer


# ---------------------------------------------------------------------------------------------
# configurations: UNet keyword arguments + batch size
# ---------------------------------------------------------------------------------------------

def from_preset(d, res, num_classes, low_res=None, aug_time=False):
    """A training script's preset dict -> UNet keyword arguments (what its checkpoint would hold)."""
    args = SimpleNamespace(**{**d, "res": res})
    return trainer.model_config(args, out_channels=6 if d["variance"] == "learned" else 3,
                                num_classes=num_classes, low_res=low_res, aug_time=aug_time)


CONFIGS = {
    # the three stages of the CPU demo (train_base.py, train_sr.py, train_sr.py --preset demo32)
    "base8": from_preset(train_base.PRESETS["demo"], 8, 8),
    "sr16": from_preset(train_sr.PRESETS["demo16"], 16, 8, low_res=8, aug_time=True),
    "sr32": from_preset(train_sr.PRESETS["demo32"], 32, 8, low_res=16),
    # the CIFAR-sized model of the speed issue: ~7M parameters, like the peers' usual CIFAR U-Net
    "cifar": dict(resolution=32, model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=2,
                  attention_resolutions=[16], num_heads=4, dropout=0.0, out_channels=6,
                  num_classes=10, low_res=None, aug_time=False),
    # the presets of the scripts (GPU-sized; run them with --configs on a machine with the memory)
    "cifar10": from_preset(train_base.PRESETS["cifar10"], 32, 10),
    "imagenet32": from_preset(train_base.PRESETS["imagenet32"], 32, 1000),
    "imagenet64": from_preset(train_sr.PRESETS["imagenet64"], 64, 1000, low_res=32, aug_time=True),
    "imagenet128": from_preset(train_sr.PRESETS["imagenet128"], 128, 1000, low_res=64),
    "imagenet256": from_preset(train_sr.PRESETS["imagenet256"], 256, 1000, low_res=64),
}
DEFAULT_CONFIGS = ["base8", "sr16", "sr32", "cifar"]


# ---------------------------------------------------------------------------------------------
# the implementations: ours, and the peers built at the same configuration
# ---------------------------------------------------------------------------------------------

def build_ours(cfg):
    model = trainer.set_fast_path(cdm.model_from_config(cfg))

    def call(m, x, t, c, z, s):
        return m(x, t, c, z, s)
    return model, call


def build_guided_diffusion(cfg):
    """openai/guided-diffusion's UNetModel (ADM), the architecture ours follows."""
    from guided_diffusion.unet import UNetModel
    model = UNetModel(
        image_size=cfg["resolution"], in_channels=3, model_channels=cfg["model_channels"],
        out_channels=cfg["out_channels"], num_res_blocks=cfg["num_res_blocks"],
        attention_resolutions=[cfg["resolution"] // r for r in cfg["attention_resolutions"]],
        dropout=cfg["dropout"], channel_mult=tuple(cfg["channel_mult"]),
        num_classes=cfg["num_classes"], num_heads=cfg["num_heads"], use_scale_shift_norm=True)

    def call(m, x, t, c, z, s):
        return m(x, t, y=c)
    return model, call


def build_diffusers(cfg):
    """diffusers' UNet2DModel with ADM's choices: scale-shift norm, class embedding, attention at
    the same resolutions, `num_res_blocks` ResNets per level on the way down (+1 on the way up)."""
    from diffusers import UNet2DModel
    res, down, up, widths = cfg["resolution"], [], [], []
    for level, mult in enumerate(cfg["channel_mult"]):
        attn = res // 2 ** level in cfg["attention_resolutions"]
        down.append("AttnDownBlock2D" if attn else "DownBlock2D")
        up.insert(0, "AttnUpBlock2D" if attn else "UpBlock2D")
        widths.append(mult * cfg["model_channels"])
    model = UNet2DModel(
        sample_size=res, in_channels=3, out_channels=cfg["out_channels"],
        layers_per_block=cfg["num_res_blocks"], block_out_channels=tuple(widths),
        down_block_types=tuple(down), up_block_types=tuple(up), resnet_time_scale_shift="scale_shift",
        num_class_embeds=cfg["num_classes"], attention_head_dim=widths[-1] // cfg["num_heads"],
        dropout=cfg["dropout"])

    def call(m, x, t, c, z, s):
        return m(x, t, class_labels=c).sample
    return model, call


IMPLS = {"cdm": build_ours, "guided-diffusion": build_guided_diffusion, "diffusers": build_diffusers}


# ---------------------------------------------------------------------------------------------
# measurements (run in a child process, one row each)
# ---------------------------------------------------------------------------------------------

def rss_reset():
    """Reset the kernel's peak-RSS counter (Linux); returns the current RSS in bytes, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return proc_status("VmRSS")
    except OSError:
        return None


def proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


class Memory:
    """Peak memory of the block above what was held when it began (see the module docstring)."""

    def __init__(self, device):
        self.device, self.peak = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = rss_reset()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = (torch.cuda.max_memory_allocated() - self.start) / 2 ** 20
        elif self.start is not None:
            self.peak = (proc_status("VmHWM") - self.start) / 2 ** 20


def timed(fn, device, warmup, repeats):
    """The fewest seconds fn() took over `repeats` calls after `warmup` calls."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return min(times)


def example_inputs(cfg, B, generator=None, device="cpu"):
    """Random (x_t, t, c, z, s) for a configuration; z and s are None where it takes none."""
    res, low = cfg["resolution"], cfg["low_res"]
    x = torch.randn(B, 3, res, res, generator=generator).to(device)
    t = torch.randint(1, 1000, (B,), generator=generator).to(device)
    c = torch.randint(0, cfg["num_classes"], (B,), generator=generator).to(device)
    z = torch.randn(B, 3, low, low, generator=generator).to(device) if low else None
    s = torch.randint(0, 250, (B,), generator=generator).to(device) if cfg["aug_time"] else None
    return x, t, c, z, s


def model_flops(cfg, B, backward):
    """FLOPs of one forward (+ backward) pass at batch B, counted by PyTorch's FlopCounterMode on
    our network, on the meta device (shapes only: nothing is computed, so a 792M-parameter model
    counts in a second). The peers build the same architecture, so the model FLOPs (the
    numerator of model FLOP utilisation) are the same; work they add, such as recomputation,
    does not count."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = cdm.model_from_config(cfg)
        args = example_inputs(cfg, B, device="meta")
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        out = model(*args)
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops()


def make_step(row, impl):
    """The model of `impl` at row's configuration and a function doing one timed unit of work:
    training, one forward + backward + AdamW step at batch --batch_size; sampling, --sample_batch
    images through 2 network evaluations (ours: our real sampler; peers: their bare forward).
    Returns (step, nfe, batch, model), or a dict with "error"."""
    cfg, precision = CONFIGS[row["config"]], row["precision"]
    device = torch.device(row["device"])
    torch.manual_seed(0)
    if impl != "cdm" and cfg["low_res"]:
        return {"error": "peers are compared on base (non-SR) configurations only"}
    if row.get("peers") and os.path.join(row["peers"], "site") not in sys.path:
        # appended: torch and numpy still come from this environment
        sys.path += [os.path.join(row["peers"], "guided-diffusion"), os.path.join(row["peers"], "site")]
    try:
        model, call = IMPLS[impl](cfg)
    except ImportError as e:
        return {"error": f"cannot import {impl} ({e}); see --peers"}
    model = model.to(device)
    if impl == "cdm":
        trainer.set_fast_path(model)                   # the memory layout depends on the device
    net = torch.compile(model) if row["compile"] else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    B = row["batch_size"] if row["phase"] == "train" else row["sample_batch"]
    g = torch.Generator().manual_seed(1)
    res = cfg["resolution"]
    x, t, c, z, s = example_inputs(cfg, B, g, device)

    if row["phase"] == "train":                    # forward + backward + AdamW step, fixed batch
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        target = torch.randn(B, cfg["out_channels"], res, res, generator=g).to(device)

        def step(m=net):
            with autocast:
                out = call(m, x, t, c, z, s)
            loss = (out.float() - target).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step, 1, B, model
    model.eval()                                   # network evaluations, no gradients
    nfe = 2
    if impl == "cdm":                              # ours: our real sampler, respaced to nfe steps
        variance = "learned" if cfg["out_channels"] == 6 else "fixed"
        sampler = cdm.GaussianDiffusion(cdm.make_betas("cosine", 1000), variance).respace(nfe)
        kwargs = {k: v for k, v in dict(c=c, z=z, s=s).items() if v is not None}

        def step(m=net):
            with autocast:
                sampler.sample(m, x.shape, kwargs, generator=torch.Generator().manual_seed(0))
    else:                                          # peers: their bare forward pass
        def step(m=net):
            with torch.no_grad(), autocast:
                for _ in range(nfe):
                    call(m, x, t, c, z, s)
    return step, nfe, B, model


def run_row(row):
    """In a child process: one phase ("train" or "sample") of one configuration x precision.
    measure "memory": the peak memory of row["impls"][0] alone (its process holds nothing else).
    measure "speed": every implementation in row["impls"], built side by side and timed in turns
    (a round of one call each, --warmup rounds then --repeats), so that whatever slows this
    process or this moment slows all of them alike. Returns {impl: result dict}."""
    device = torch.device(row["device"])
    built, results = {}, {}
    for impl in row["impls"]:
        made = make_step(row, impl)
        if isinstance(made, dict):
            results[impl] = made
        else:
            built[impl] = made
            results[impl] = {"params": sum(p.numel() for p in made[3].parameters())}
    phase = row["phase"]
    if row["measure"] == "memory":
        for impl, (step, *_ ) in built.items():
            try:
                with Memory(device) as mem:
                    for _ in range(2):
                        step()
                results[impl][f"{phase}_mib"] = mem.peak
            except RuntimeError as e:
                results[impl][f"{phase}_error"] = str(e).splitlines()[0][:120]
        return results
    times = {impl: [] for impl in built}
    for i in range(row["warmup"] + row["repeats"]):  # the first round also compiles, when --compile
        for impl, (step, *_ ) in list(built.items()):
            try:
                t0 = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            except RuntimeError as e:
                results[impl][f"{phase}_error"] = str(e).splitlines()[0][:120]
                del built[impl]
                continue
            if i == 0:
                results[impl][f"{phase}_first_s"] = time.perf_counter() - t0
            if i >= row["warmup"]:
                times[impl].append(time.perf_counter() - t0)
    if built:                                      # the same architecture: counted once
        B = next(iter(built.values()))[2]
        flops = model_flops(CONFIGS[row["config"]], B, backward=phase == "train")
    for impl, (step, nfe, B, model) in built.items():
        sec = min(times[impl]) / nfe
        if phase == "train":
            results[impl].update(train_img_s=B / sec, train_gflop_s=flops / sec / 1e9)
        else:
            results[impl].update(sample_nfe_s=1 / sec, sample_img_s=B / sec, sample_gflop_s=flops / sec / 1e9)
    return results


def matmul_ceiling(device, dtype):
    """FLOP/s of one large matmul: what the hardware reaches on the friendliest possible work.
    On a CPU the size grows from 256 to 2048 only while one product takes under 0.05 s: without
    native support for the dtype (bf16 on a CPU without AVX-512) one 2048 product takes ~20 s,
    and the 20 of them took a --tune run past 15 minutes."""
    n = 8192 if device.type == "cuda" else 256
    while device.type != "cuda" and n < 2048:
        a = torch.randn(n, n, dtype=dtype)
        t0 = time.perf_counter()
        a @ a
        if time.perf_counter() - t0 > 0.05:
            break
        n *= 2
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / min(timed(lambda: a @ b, device, 1, 3) for _ in range(5)) / 1e9


# ---------------------------------------------------------------------------------------------
# --tune: the training settings of one GPU, searched in one run
# ---------------------------------------------------------------------------------------------
# The grid is searched a factor at a time, each factor kept at its fastest value before the next
# is tried (a full grid of 3 x 2 x 4 x 2 x 2 x 2 settings would not fit a 15-minute GPU slot):
#   1. layout x GroupNorm precision (NCHW / channels_last x float32 / the autocast dtype), eager;
#   2. cudnn.benchmark on (CUDA only: conv algorithms chosen by timing them once per shape);
#   3. Adam: foreach (one kernel per operation over all tensors) against fused (one kernel);
#   4. the micro-batch: every --tune_batches value the memory holds (out of memory is a row);
#   5. torch.compile at the fastest eager setting: its default mode, then
#      max-autotune-no-cudagraphs; compile time (first step minus a steady step) reported apart.
# Steps 1-4 run in one process per configuration (the model is built once), each compile mode in
# a process of its own. The whole search keeps to --tune_budget seconds: a row that would start
# after it is reported as not reached, and a compiling process is stopped at it.

TUNE_FACTORS = ("layout", "norm", "cudnn_benchmark", "adam", "batch")


def tune_settings_flags(s, precision):
    """The training scripts' flags that select setting s (what the tuning run prints)."""
    flags = [f"--precision {precision}", f"--channels_last {'on' if s['layout'] == 'channels_last' else 'off'}",
             f"--norm_precision {s['norm']}", f"--adam {s['adam']}"]
    if s.get("cudnn_benchmark"):
        flags.append("--cudnn_benchmark on")
    if s["compile"] != "eager":
        flags.append("--compile" + ("" if s["compile"] == "default" else f" --compile_mode {s['compile']}"))
    flags.append(f"--micro_batch {s['batch']}")
    return " ".join(flags)


def tune_child(spec):
    """In a child process: train config spec["config"] at each setting the search reaches, printing
    one RESULT line per setting as soon as it is measured (so a stopped process keeps its rows)."""
    cfg, device = CONFIGS[spec["config"]], torch.device(spec["device"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else None
    torch.manual_seed(0)
    with torch.device(device):                     # built on the device: seconds, not minutes
        model = cdm.model_from_config(cfg)
    variance = "learned" if cfg["out_channels"] == 6 else "fixed"
    diffusion = cdm.GaussianDiffusion(cdm.make_betas("cosine", 1000), variance)
    flops_per_image = model_flops(cfg, 1, backward=True)

    def measure(s):
        torch.backends.cudnn.benchmark = bool(s["cudnn_benchmark"])
        trainer.set_fast_path(model, channels_last=s["layout"] == "channels_last",
                          low_precision_norm=s["norm"] == "bf16")
        net = model if s["compile"] == "eager" else torch.compile(model, mode=s["compile"])
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, **trainer.ADAM_KWARGS[s["adam"]])
        g = torch.Generator().manual_seed(1)
        B = s["batch"]
        x, t, c, z, s_aug = example_inputs(cfg, B, g, device)
        x0 = x.clamp(-1, 1)
        kwargs = {k: v for k, v in dict(c=c, z=z, s=s_aug).items() if v is not None}
        if s["layout"] == "channels_last":
            x0 = x0.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = diffusion.training_losses(net, x0, t, kwargs)["loss"].mean()
            loss.backward()
            opt.step()
        row = dict(s)
        try:
            with Memory(device) as mem:
                t0 = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter() - t0
                sec = timed(step, device, spec["warmup"], spec["repeats"])
            peak = mem.peak / 1024 if device.type == "cuda" else None   # CPU: RSS, shared by the rows
            row.update(img_s=B / sec, tflop_s=flops_per_image * B / sec / 1e12, peak_gib=peak,
                       compile_s=first - sec if s["compile"] != "eager" else None)
        except (RuntimeError, MemoryError) as e:
            if not trainer.out_of_memory(e):
                raise
            row["error"] = "out of memory"
        finally:
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print("RESULT " + json.dumps(row), flush=True)
        return row

    deadline = time.time() + spec["budget_s"]
    best = dict(spec["start"])

    def better(rows):
        ok = [r for r in rows if "img_s" in r]
        return max(ok, key=lambda r: r["img_s"]) if ok else None

    if spec["compile"] != "eager":                 # one compiled row at the given setting
        measure({**best, "compile": spec["compile"]})
        return
    candidates = [{**best, "layout": lay, "norm": norm} for lay in ("nchw", "channels_last")
                  for norm in ("fp32", "bf16") if dtype is not None or norm == "fp32"]
    steps = [candidates]
    if device.type == "cuda":
        steps.append("cudnn_benchmark")
    steps += ["adam", "batch"]
    measured = []
    for stage in steps:
        if isinstance(stage, list):
            todo = stage
        elif stage == "cudnn_benchmark":
            todo = [{**best, "cudnn_benchmark": True}]
        elif stage == "adam":
            todo = [{**best, "adam": "fused"}]
        else:
            todo = [{**best, "batch": b} for b in spec["batches"] if b != best["batch"]]
        for s in todo:
            if time.time() > deadline:
                print("RESULT " + json.dumps({**s, "error": "not reached within --tune_budget"}), flush=True)
                continue
            r = measure(s)
            measured.append(r)
            if stage == "batch" and r.get("error") == "out of memory" and s["batch"] > best["batch"]:
                for b in spec["batches"]:      # larger ones cannot fit either
                    if b > s["batch"]:
                        print("RESULT " + json.dumps({**s, "batch": b, "error": "out of memory (a smaller batch did not fit)"}), flush=True)
                break
        top = better(measured)
        if top:
            best = {k: top[k] for k in best}


def tune(args, device):
    """bench.py --tune: the search above for each of --configs, one table and --json."""
    precision = "bf16" if "bf16" in args.precision.split(",") else "fp32"
    ceiling = matmul_ceiling(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    print(f"{precision} matmul ceiling: {ceiling / 1e3:.1f} TFLOP/s; search budget {args.tune_budget} s")
    deadline = time.time() + args.tune_budget
    start = dict(layout="nchw", norm="fp32", cudnn_benchmark=False, adam="foreach",
                 batch=args.batch_size, compile="eager")
    batches = sorted(set(args.tune_batches) | {args.batch_size})
    rows, head = [], (f"{'config':10} {'compile':26} {'layout':13} {'norm':4} {'cudnn':5} {'adam':7} "
                      f"{'batch':>5} | {'img/s':>8} {'TFLOP/s':>8} {'%ceil':>5} {'peak GiB':>8} {'compile s':>9}")
    print(head + "\n" + "-" * len(head))

    def show(r):
        name = (f"{r['config']:10} {r['compile']:26} {r['layout']:13} {r['norm']:4} "
                f"{'on' if r['cudnn_benchmark'] else 'off':5} {r['adam']:7} {r['batch']:5d} | ")
        if "error" in r:
            print(name + r["error"], flush=True)
        else:
            print(name + f"{r['img_s']:8.1f} {r['tflop_s']:8.3f} {r['tflop_s'] * 1e3 / ceiling * 100:5.1f} "
                  f"{fmt(r['peak_gib'], '8.2f'):>8} {fmt(r['compile_s'], '9.0f'):>9}", flush=True)

    def child(config, mode, best):
        remaining = deadline - time.time()
        spec = dict(config=config, device=str(device), precision=precision, start=best,
                    batches=batches, warmup=args.warmup, repeats=args.repeats,
                    budget_s=max(remaining, 0), compile=mode)
        if remaining <= 0:
            out = [{**best, "compile": mode, "error": "not reached within --tune_budget"}]
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--_tune", json.dumps(spec)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=remaining + 30)
                stdout, failed = proc.stdout, proc.returncode != 0 and proc.stderr.strip().splitlines()
            except subprocess.TimeoutExpired as e:
                stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                failed = ["stopped at the end of --tune_budget"]
            out = [json.loads(l[7:]) for l in stdout.splitlines() if l.startswith("RESULT ")]
            if failed and (mode != "eager" or not out):
                out.append({**best, "compile": mode, "error": failed[-1][:100]})
        for r in out:
            r["config"] = config
            rows.append(r)
            show(r)
        ok = [r for r in out if "img_s" in r]
        return max(ok, key=lambda r: r["img_s"]) if ok else None

    fastest = {}
    for config in args.configs.split(","):              # 1.-4.: eager, a factor at a time
        top = child(config, "eager", start)
        if top:
            fastest[config] = top
    for mode in args.tune_compile:                       # 5.: compiled at each config's best
        for config in list(fastest):
            best = {k: fastest[config][k] for k in start}
            top = child(config, mode, {**best, "compile": "eager"})
            if top and top["img_s"] > fastest[config]["img_s"]:
                fastest[config] = top
    print(f"({args.tune_budget - max(deadline - time.time(), 0):.0f} s of the {args.tune_budget} s budget)")
    for config, r in fastest.items():
        print(f"fastest for {config}: {r['img_s']:.1f} img/s with {tune_settings_flags(r, precision)}")
    if args.json:
        safety.write_json(args.json, {"device": str(device), "name": device_name(device),
                                      "torch": torch.__version__, "precision": precision,
                                      "ceiling_tflop_s": ceiling / 1e3, "rows": rows,
                                      "fastest": fastest,
                                      "flags": {c: tune_settings_flags(r, precision) for c, r in fastest.items()}},
                         allow_nan=True)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--peers", default=None, metavar="DIR",
                   help="also time guided-diffusion and diffusers, found in DIR (see the README)")
    p.add_argument("--peer_configs", default="cifar", help="the configurations the peers run")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--batch_size", type=int, default=32, help="training batch")
    p.add_argument("--sample_batch", type=int, default=64, help="sampling batch")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed steps / sampling calls (the fastest counts)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model first")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--tune", action="store_true",
                   help="search the training settings of this device instead (see TUNE_FACTORS): "
                        "layout, GroupNorm precision, cudnn.benchmark, Adam, micro-batch, torch.compile")
    p.add_argument("--tune_batches", type=trainer.int_list, default=[32, 64, 128, 256],
                   help="--tune: the micro-batches to try (--batch_size is the starting one)")
    p.add_argument("--tune_compile", default="default,max-autotune-no-cudagraphs",
                   help="--tune: torch.compile modes to try at the fastest eager setting ('none': none)")
    p.add_argument("--tune_budget", type=float, default=420,
                   help="--tune: seconds for the whole search; what would start later is reported "
                        "as not reached")
    p.add_argument("--_row", default=None, help=argparse.SUPPRESS)  # internal: one row, in a child
    p.add_argument("--_tune", default=None, help=argparse.SUPPRESS)  # internal: --tune's child
    args = p.parse_args(argv)
    for name in args.configs.split(",") + args.peer_configs.split(","):
        if name not in CONFIGS:
            p.error(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    for prec in args.precision.split(","):
        if prec not in ("fp32", "bf16"):
            p.error(f"unknown precision {prec!r}; choose fp32 or bf16")
    args.tune_compile = [] if args.tune_compile == "none" else args.tune_compile.split(",")
    bad = set(args.tune_compile) - set(trainer.COMPILE_MODES)
    if bad:
        p.error(f"--tune_compile: unknown mode {', '.join(sorted(bad))}; choose from "
                f"{', '.join(trainer.COMPILE_MODES)} or none")
    if args.tune and (not args.tune_batches or min(args.tune_batches) < 1 or args.batch_size < 1):
        p.error("--tune_batches and --batch_size: give positive micro-batches")
    if args.tune and args.peers:
        p.error("--tune tunes cdm's training on this device; --peers is for the comparison table")
    if args.peers and not os.path.isdir(args.peers):
        p.error(f"--peers {args.peers}: no such folder; see the README for how to fill it")
    return args


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and v == v else "-"


def print_row(row, ceiling):
    """One line of the table."""
    name = f"{row['config']:7} {row['impl']:16} {row['precision']:4}"
    if "error" in row:
        print(f"{name} {'':>7} | {row['error']}", flush=True)
        return
    ceil = ceiling[row["precision"]]
    cols = []
    for phase, rate, rate_fmt in (("train", "train_img_s", "11.1f"), ("sample", "sample_nfe_s", "12.2f")):
        if f"{phase}_error" in row:
            cols.append(f"failed: {row[phase + '_error'][:28]:28}")
            continue
        gflop = row.get(f"{phase}_gflop_s", float("nan"))
        extra = f"{fmt(row.get('sample_img_s'), '6.0f')} " if phase == "sample" else ""
        cols.append(f"{fmt(row.get(rate), rate_fmt)} {extra}{fmt(gflop, '8.0f')} "
                    f"{fmt(gflop / ceil * 100, '5.0f')} {fmt(row.get(phase + '_mib'), '8.0f')}")
    print(f"{name} {row['params'] / 1e6:6.2f}M | " + " | ".join(cols), flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args._row:
        print("RESULT " + json.dumps(run_row(json.loads(args._row))))
        return
    if args._tune:
        tune_child(json.loads(args._tune))
        return
    if args.json:                          # checked now, not after the whole benchmark
        safety.writable_file(args.json, "--json", overwrite=True)
    device = trainer.pick_device(args.device)
    print(f"torch {torch.__version__} on {device} ({device_name(device)})")
    if args.tune:
        return tune(args, device)
    ceiling = {p: matmul_ceiling(device, torch.float32 if p == "fp32" else torch.bfloat16)
               for p in args.precision.split(",")}
    print("matmul ceiling: " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in ceiling.items()))
    rows = []
    for config in args.configs.split(","):
        impls = ["cdm"] + (["guided-diffusion", "diffusers"] if args.peers and config in
                           args.peer_configs.split(",") else [])
        for precision in args.precision.split(","):
            for impl in impls:
                rows.append(dict(config=config, impl=impl, precision=precision, device=str(device),
                                 batch_size=args.batch_size, sample_batch=args.sample_batch,
                                 warmup=args.warmup, repeats=args.repeats, compile=args.compile,
                                 peers=args.peers and os.path.abspath(args.peers)))
    head = (f"{'config':7} {'impl':16} {'prec':4} {'params':>7} | {'train img/s':>11} {'GFLOP/s':>8} "
            f"{'%ceil':>5} {'peak MiB':>8} | {'sample NFE/s':>12} {'img/s':>6} {'GFLOP/s':>8} "
            f"{'%ceil':>5} {'peak MiB':>8}")
    print(head + "\n" + "-" * len(head))
    t_start = time.time()

    def child(spec, memory):
        env = dict(os.environ)
        if memory:                           # large blocks straight from/to the OS: RSS = live memory
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_row", json.dumps(spec)],
                              capture_output=True, text=True, env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if lines:
            return json.loads(lines[-1][7:])
        error = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]}
        return {impl: dict(error) for impl in spec["impls"]}

    groups = {}                                    # (config, precision) -> its rows, in order
    for row in rows:
        groups.setdefault((row["config"], row["precision"]), []).append(row)
    for group in groups.values():
        impls = [r["impl"] for r in group]
        res = {impl: {} for impl in impls}
        for phase in ("sample", "train"):
            base = {k: v for k, v in group[0].items() if k != "impl"}
            for impl, r in child({**base, "impls": impls, "phase": phase, "measure": "speed"}, False).items():
                res[impl].update(r)
            for impl in impls:                     # memory: each implementation in its own process
                for k, v in child({**base, "impls": [impl], "phase": phase, "measure": "memory"},
                                  True)[impl].items():
                    res[impl].setdefault(k, v)
        for row in group:
            row.update(res[row["impl"]])
            print_row(row, ceiling)
    print(f"({time.time() - t_start:.0f} s; the fastest of {args.repeats} training steps after "
          f"{args.warmup} warm-up steps, batch {args.batch_size}; sampling at batch {args.sample_batch}; "
          "the implementations of a configuration timed in turns in one process)")
    for config in args.configs.split(","):
        for precision in args.precision.split(","):
            mine = [r for r in rows if r["config"] == config and r["precision"] == precision
                    and r["impl"] == "cdm" and "train_img_s" in r]
            peers = [r for r in rows if r["config"] == config and r["precision"] == precision
                     and r["impl"] != "cdm" and "sample_nfe_s" in r]
            if mine and peers:
                ratios = []
                for key in ("train_img_s", "sample_nfe_s"):
                    best = max((r for r in peers if key in r), key=lambda r: r[key], default=None)
                    if best:
                        ratios.append(f"{key.split('_')[0]} {mine[0][key] / best[key]:.2f}x "
                                      f"the fastest peer ({best['impl']})")
                print(f"{config} {precision}: cdm " + ", ".join(ratios))
    if args.json:
        safety.write_json(args.json, {"device": str(device), "torch": torch.__version__,
                                      "ceiling_gflop_s": ceiling, "rows": rows}, allow_nan=True)


if __name__ == "__main__":
    main()
