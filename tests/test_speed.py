"""Speed without other numbers: trainer.set_fast_path (channels_last, fused attention,
FastGroupNorm), bf16, fused Adam, torch.compile on a GPU, the speed settings, and bench.py.
docs/speed.md has the measurements.

Run:   python -m pytest -q tests/test_speed.py   (the CUDA tests skip without a GPU)
"""
import copy
import json
import os

import torch
import torch.nn.functional as F

from helpers import HERE, TINY, needs_cuda, run  # (it puts the repository's root on sys.path)
import cdm
import safety
import trainer


# --- set_fast_path: channels_last, fused attention, GroupNorm; bf16; on the CPU ---------------

def perturbed_sr_unet():
    """An SR U-Net with every input in use and no zero-initialised layer left at zero, so that
    attention and every residual branch change the output."""
    torch.manual_seed(0)
    model = cdm.UNet(16, 32, (1, 2), 1, (8,), 4, out_channels=6, num_classes=3, low_res=8, aug_time=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    B = 3
    inputs = (torch.randn(B, 3, 16, 16), torch.tensor([1, 500, 999]), torch.tensor([0, 2, 1]),
              torch.randn(B, 3, 8, 8), torch.tensor([0, 10, 200]))
    return model, inputs


def outputs_and_grads(model, inputs):
    model.zero_grad()
    out = model(*inputs)
    (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach().float(), [p.grad.clone() for p in model.parameters()]


def test_fast_path_matches_plain():
    """The speed-ups of set_fast_path (channels_last, fused attention, GroupNorm's NCHW copy)
    change no output and no gradient beyond float32 rounding."""
    fast, inputs = perturbed_sr_unet()
    plain = copy.deepcopy(fast)
    trainer.set_fast_path(fast, True, channels_last=True)
    trainer.set_fast_path(plain, False)
    assert fast.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(m.fast for m in plain.modules() if isinstance(m, (trainer.FastGroupNorm, cdm.AttentionBlock)))
    out_f, grads_f = outputs_and_grads(fast, inputs)
    out_p, grads_p = outputs_and_grads(plain, inputs)
    assert out_p.abs().mean() > 0.1                              # a real, non-trivial output
    torch.testing.assert_close(out_f, out_p, rtol=1e-4, atol=1e-5)
    for gf, gp in zip(grads_f, grads_p):
        torch.testing.assert_close(gf, gp, rtol=1e-3, atol=1e-4 * gp.abs().max().item())


def test_bf16_autocast_stays_close_to_fp32():
    """bf16 keeps 8 bits of mantissa: the outputs and gradients under autocast agree with fp32
    to a few percent of their scale, no more."""
    model, inputs = perturbed_sr_unet()
    trainer.set_fast_path(model)
    out32, g32 = outputs_and_grads(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, g16 = outputs_and_grads(model, inputs)
    assert (out16 - out32).abs().max() < 0.03 * out32.abs().max()
    num = sum((a - b).square().sum() for a, b in zip(g16, g32))
    assert num.sqrt() < 0.05 * sum(b.square().sum() for b in g32).sqrt()


def test_attention_hands_the_fused_kernel_dense_heads(monkeypatch):
    """What slowed CPU sampling (issue 22): q, k, v taken as strided views of an NCHW 1x1-conv
    output have a last-dimension stride of H*W, and PyTorch's CPU flash kernel then silently falls
    back to the plain formula. The block must hand over each head's d channels adjacent in memory,
    and still compute the plain block's numbers."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append([t.stride(-1) for t in (q, k, v)])
        return real(q, k, v, *a, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    block = cdm.AttentionBlock(16, 4)
    torch.nn.init.normal_(block.proj.weight, std=0.2)
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        out = block(x)
        tokens = block.norm(x).flatten(2)                                  # (B, C, HW)
        qkv = torch.einsum("oc,bcn->bon", block.qkv.weight[:, :, 0, 0], tokens) + block.qkv.bias[:, None]
        q, k, v = qkv.reshape(2, 3, 4, 4, 16).unbind(1)                    # (B, heads, d, HW)
        w = torch.softmax(q.transpose(-1, -2) @ k / 2.0, dim=-1)           # (B, heads, HW, HW)
        h = (w @ v.transpose(-1, -2)).transpose(-1, -2).reshape(2, 16, 16)  # (B, C, HW)
        ref = x + (torch.einsum("oc,bcn->bon", block.proj.weight[:, :, 0, 0], h)
                   + block.proj.bias[:, None]).reshape(2, 16, 4, 4)
    assert seen == [[1, 1, 1]]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_low_precision_groupnorm_stays_close():
    """GroupNorm in the autocast dtype (set_fast_path(low_precision_norm=True)): a bf16 output,
    within bf16 rounding of the float32 norm; without autocast it is the float32 norm exactly."""
    torch.manual_seed(0)
    gn = trainer.FastGroupNorm(4, 16)
    torch.nn.init.normal_(gn.weight)
    x = torch.randn(3, 16, 8, 8) * 5 + 2
    ref = gn(x)
    gn.low_precision = True
    assert torch.equal(gn(x), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gn(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()
    model = trainer.set_fast_path(cdm.UNet(8, 16, (1,), 1, (), 2), low_precision_norm=True)
    assert all(m.low_precision for m in model.modules() if isinstance(m, trainer.FastGroupNorm))
    assert not trainer.channels_last_default(model)                         # CPU: NCHW


@needs_cuda
def test_cuda_bf16_compile_matches_cpu():
    """The GPU path: channels_last + bf16 autocast + torch.compile on CUDA gives the CPU fp32
    numbers to bf16 accuracy, for outputs and gradients."""
    model, inputs = perturbed_sr_unet()
    ref_out, ref_grads = outputs_and_grads(trainer.set_fast_path(copy.deepcopy(model)), inputs)
    gpu = trainer.set_fast_path(model.cuda())
    compiled = torch.compile(gpu)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu.zero_grad()
        out = compiled(*[x.cuda() for x in inputs])
        (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").reshape(out.shape)).sum().backward()
    assert (out.float().cpu() - ref_out).abs().max() < 0.03 * ref_out.abs().max()
    err = sum((p.grad.cpu() - g).square().sum() for p, g in zip(gpu.parameters(), ref_grads)).sqrt()
    assert err < 0.05 * sum(g.square().sum() for g in ref_grads).sqrt()


# --- Adam, the speed settings and bench.py --tune ---------------------------------------------

def adam_steps(model, inputs, adam, steps=3):
    """A few Adam steps on the outputs_and_grads objective; returns the parameters after them."""
    model = copy.deepcopy(model)
    # eps large enough that near-zero gradients do not turn rounding into lr-sized sign flips
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-3, **trainer.ADAM_KWARGS[adam])
    for _ in range(steps):
        outputs_and_grads(model, inputs)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_fused_adam_matches_foreach():
    """--adam fused (one kernel) takes the same steps as foreach, to float32 rounding."""
    model, inputs = perturbed_sr_unet()
    for a, b in zip(adam_steps(model, inputs, "fused"), adam_steps(model, inputs, "foreach")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_speed_defaults_leave_the_cpu_path_alone():
    """On the CPU the speed settings are the CPU path's whatever CUDA_SPEED says; on CUDA every
    unset flag comes from CUDA_SPEED, and every CUDA_SPEED entry says where its value comes from."""
    args = trainer.argparse.Namespace(channels_last=None, norm_precision=None, adam=None, cudnn_benchmark=None)
    assert trainer.speed_settings(args, torch.device("cpu")) == trainer.CPU_SPEED
    assert trainer.speed_settings(args, torch.device("cuda")) == trainer.CUDA_SPEED
    args.adam = "fused"
    assert trainer.speed_settings(args, torch.device("cpu"))["adam"] == "fused"
    src = open(os.path.join(HERE, "trainer.py"), encoding="utf-8").read()
    table = src[src.index("CUDA_SPEED = {"):src.index("}", src.index("CUDA_SPEED = {"))]
    for key in trainer.CUDA_SPEED:
        line = next(l for l in table.splitlines() if f'"{key}"' in l)
        assert "measured" in line, f"CUDA_SPEED[{key!r}] does not say whether it was measured"
    model = trainer.apply_speed(cdm.UNet(8, 16, (1,), 1, (), 2), trainer.CPU_SPEED)
    assert model.input_conv.weight.is_contiguous()
    assert not any(m.low_precision for m in model.modules() if isinstance(m, trainer.FastGroupNorm))


def test_tune_searches_a_factor_at_a_time_and_prints_usable_flags(tmp_path):
    """bench.py --tune on the CPU, tiny: every factor's rows, the fastest is the fastest row, and
    its printed flags train (no timing is asserted)."""
    js = tmp_path / "tune.json"
    p = run("bench.py", "--tune", "--configs", "base8", "--device", "cpu", "--tune_batches", "4",
            "--batch_size", "8", "--warmup", "0", "--repeats", "1", "--tune_compile", "none",
            "--json", str(js))
    out = json.loads(js.read_text())
    rows = out["rows"]
    assert all(r["img_s"] > 0 and r["tflop_s"] > 0 for r in rows), rows
    assert {(r["layout"], r["norm"]) for r in rows if r["batch"] == 8 and r["adam"] == "foreach"} == \
        {("nchw", "fp32"), ("nchw", "bf16"), ("channels_last", "fp32"), ("channels_last", "bf16")}
    assert any(r["adam"] == "fused" for r in rows) and any(r["batch"] == 4 for r in rows)
    best = max(rows, key=lambda r: r["img_s"])
    assert out["fastest"]["base8"]["img_s"] == best["img_s"]
    assert f"fastest for base8: {best['img_s']:.1f} img/s with {out['flags']['base8']}" in p.stdout
    flags = out["flags"]["base8"].split()
    run("train_base.py", *TINY, "--res", "8", "--attn", "4", *flags, "--out", str(tmp_path / "run"))
    p = run("bench.py", "--tune", "--configs", "base8", "--device", "cpu", "--tune_budget", "0",
            "--json", str(js))
    assert {r["error"] for r in json.loads(js.read_text())["rows"]} == {"not reached within --tune_budget"}
    p = run("bench.py", "--tune", "--tune_compile", "fastest", ok=False)
    assert p.returncode != 0 and "unknown mode fastest" in p.stderr


def test_tuned_flags_select_the_setting_they_name():
    """The flags bench.py --tune prints for a setting -- every factor off its default, as on a GPU
    where cudnn.benchmark, channels_last, bf16 norms, fused Adam and a compile mode win -- parse
    in train_base.py to exactly that setting."""
    import shlex
    import bench
    import train_base
    s = dict(layout="channels_last", norm="bf16", cudnn_benchmark=True, adam="fused", batch=16,
             compile="max-autotune-no-cudagraphs")
    a = train_base.parse_args(shlex.split(bench.tune_settings_flags(s, "bf16")) + ["--preset", "imagenet32"])
    assert (a.precision, a.channels_last, a.norm_precision, a.cudnn_benchmark, a.adam, a.micro_batch,
            a.compile, a.compile_mode) == ("bf16", "on", "bf16", "on", "fused", 16, True, s["compile"])
    plain = dict(s, layout="nchw", norm="fp32", cudnn_benchmark=False, adam="foreach", compile="eager")
    a = train_base.parse_args(shlex.split(bench.tune_settings_flags(plain, "fp32")) + ["--preset", "imagenet32"])
    assert (a.channels_last, a.norm_precision, a.cudnn_benchmark, a.adam, a.compile) == \
        ("off", "fp32", None, "foreach", False)


# --- on a CUDA GPU ----------------------------------------------------------------------------

@needs_cuda
def test_cuda_fast_paths_match_plain():
    """Each CUDA fast path alone -- channels_last, GroupNorm in bf16, fused Adam, cudnn.benchmark,
    torch.compile -- gives the plain path's loss, gradients and Adam step to bf16 tolerance."""
    model, inputs = perturbed_sr_unet()
    inputs = [x.cuda() for x in inputs]
    weights = None

    def run_path(channels_last=False, norm="fp32", adam="foreach", benchmark=False, compiled=False):
        torch.backends.cudnn.benchmark = benchmark
        m = trainer.apply_speed(copy.deepcopy(model).cuda(), {
            "channels_last": "on" if channels_last else "off", "norm_precision": norm,
            "adam": adam, "cudnn_benchmark": "on" if benchmark else "off"})
        net = torch.compile(m) if compiled else m
        # eps large enough that near-zero gradients do not turn bf16 rounding into sign flips
        opt = torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-2, **trainer.ADAM_KWARGS[adam])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(*inputs)
        nonlocal weights
        if weights is None:
            weights = torch.linspace(-1, 1, out.numel(), device="cuda").reshape(out.shape)
        loss = (out.float() * weights).sum()
        loss.backward()
        grads = [p.grad.clone() for p in m.parameters()]
        opt.step()
        torch.backends.cudnn.benchmark = False
        return loss.item(), grads, [p.detach().clone() for p in m.parameters()]

    ref_loss, ref_grads, ref_params = run_path()
    scale = sum(g.square().sum() for g in ref_grads).sqrt()
    for kw in (dict(channels_last=True), dict(norm="bf16"), dict(adam="fused"), dict(benchmark=True),
               dict(compiled=True)):
        loss, grads, params = run_path(**kw)
        assert abs(loss - ref_loss) < 0.03 * abs(ref_loss) + 1e-3, kw
        assert sum((g - r).square().sum() for g, r in zip(grads, ref_grads)).sqrt() < 0.05 * scale, kw
        for p, r in zip(params, ref_params):   # within 30% of one step of lr = 1e-3
            assert (p - r).abs().max() < 3e-4, kw


@needs_cuda
def test_cuda_compiled_run_checkpoint_samples_like_eager(tmp_path):
    """A checkpoint written by a --compile run holds plain parameter names, loads into an eager
    model, and that model samples the images the compiled model samples (DDIM, same noise)."""
    run("train_base.py", *[a if a != "cpu" else "cuda" for a in TINY], "--res", "8", "--attn", "4",
        "--compile", "--precision", "bf16", "--out", str(tmp_path / "base"), shell=True)   # compiles apart
    ckpt = safety.load_checkpoint(str(tmp_path / "base" / "ckpt.pt"))
    assert not any("_orig_mod" in k for k in ckpt["model"]), list(ckpt["model"])[:3]
    stage = safety.load_stage(str(tmp_path / "base" / "ckpt.pt"), "cuda")
    compiled = torch.compile(stage.model)
    chain = stage.diffusion.sampling_chain("ddim", 5)
    c = torch.arange(8, device="cuda") % stage.config["num_classes"]
    draw = lambda m: chain.sample(m, (8, stage.channels, 8, 8), {"c": c}, sampler="ddim",
                                  generator=torch.Generator("cuda").manual_seed(0))
    eager, again, comp = draw(stage.model), draw(stage.model), draw(compiled)
    assert torch.equal(eager, again)
    assert (eager - comp).abs().max() < 1e-3


# --- bench.py ---------------------------------------------------------------------------------

def test_bench_runs_and_reports(tmp_path):
    """bench.py measures real, positive rates and FLOP counts (no timing is asserted)."""
    js = tmp_path / "bench.json"
    p = run("bench.py", "--configs", "base8", "--precision", "fp32", "--warmup", "1", "--repeats", "1",
            "--batch_size", "4", "--sample_batch", "4", "--json", str(js))
    assert "matmul ceiling" in p.stdout and "base8   cdm" in p.stdout
    row = json.loads(js.read_text())["rows"][0]
    assert row["params"] == sum(q.numel() for q in cdm.model_from_config(bench_config("base8")).parameters())
    for key in ("train_img_s", "train_gflop_s", "sample_nfe_s", "sample_gflop_s"):
        assert row[key] > 0, key
    p = run("bench.py", "--configs", "nope", ok=False)
    assert p.returncode != 0 and "unknown configuration 'nope'" in p.stderr


def bench_config(name):
    import bench
    return bench.CONFIGS[name]
