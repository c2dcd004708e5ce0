"""grading.py -- what the grader asks of a student's cdm.py, and the only wire it is asked over.

Grading a unit is a differential test whose verdict forms where the student's code never runs:

  1. the grader (assign.py, a trusted process) draws fresh inputs for each of the unit's cases
     from a secret seed (prepare: schedules, states of diffusions, weights, noise, indices);
  2. it runs the cases on the reference cdm.py in its own process (apply), and sends the same
     inputs, as plain numbers, to the student's process (sandbox.py);
  3. there, `worker` loads the student's cdm.py, applies each case to it, and sends back what
     the functions returned, as plain numbers;
  4. the grader compares (compare) and gives the unit its points times the share of its cases
     that agree. A case that raises, hangs, is never answered or answers in another shape fails.

So nothing the student's code does in its own process decides anything: a patched comparison,
a conftest.py, a fake report or an early exit only changes (or withholds) numbers that must
still equal the reference's on inputs it could not know in advance. The reference never enters
that process: when a unit's functions call another unit's (training_losses calls q_sample),
those calls come back here and the reference answers them (an "oracle"), gradients included,
so a mistake in an early unit is not charged again in a later one. Only the calls the
reference itself makes are answered (ORACLES): q_sample cannot be had from noise_augment.

The wire is a length-prefixed JSON message whose arrays are raw bytes of a few plain dtypes:
no pickle, so what comes back can never run code in the grader.

This file holds no reference answer: it is safe in the student's process, and the suite checks
that no line of a unit's reference body appears in it.
"""
import base64
import json
import os
import sys
import traceback

import numpy as np
import torch

MAX_MESSAGE = 16 << 20            # the largest job (a U-Net's weights) is ~1 MB; answers are smaller
DTYPES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}


# --- the wire -----------------------------------------------------------------------------------
class WireError(Exception):
    """A message that is not one this protocol sends."""


def _array(a):
    a = np.ascontiguousarray(a)
    if str(a.dtype) not in DTYPES:
        raise TypeError(f"cannot send an array of dtype {a.dtype}")
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def encode(x):
    """Plain JSON for tensors, arrays, numbers, strings, None, lists, tuples, dicts with string
    keys, and a GaussianDiffusion (as the arguments that rebuild it)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return {"__tensor__": _array(t.contiguous().numpy())}
    if isinstance(x, np.ndarray):
        return {"__array__": _array(x)}
    if isinstance(x, np.generic):
        return encode(x.item())
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, tuple):
        return {"__tuple__": [encode(v) for v in x]}
    if isinstance(x, list):
        return [encode(v) for v in x]
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise TypeError("only dicts with string keys can be sent")
        return {"__dict__": {k: encode(v) for k, v in x.items()}}
    if type(x).__name__ == "GaussianDiffusion":
        return {"__diffusion__": {"betas": encode(np.asarray(x.betas, dtype=np.float64)),
                                  "variance": encode(x.variance), "lambda_vlb": encode(float(x.lambda_vlb)),
                                  "timesteps": encode(np.asarray(x.timesteps, dtype=np.int64)),
                                  "prediction": encode(x.prediction)}}
    raise TypeError(f"cannot send a {type(x).__name__}")


def _from_array(d):
    if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data"} or d["dtype"] not in DTYPES:
        raise WireError("malformed array")
    shape = d["shape"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and 0 <= n < 2 ** 31 for n in shape):
        raise WireError("malformed array shape")
    raw = base64.b64decode(d["data"], validate=True)
    if len(raw) != int(np.prod(shape, dtype=np.int64)) * np.dtype(d["dtype"]).itemsize:
        raise WireError("array size does not match its shape")
    return np.frombuffer(raw, dtype=d["dtype"]).reshape(shape).copy()


def decode(x, diffusion=None):
    """The inverse of encode. `diffusion(betas, variance, lambda_vlb, timesteps, prediction)`
    rebuilds a GaussianDiffusion (the grader's: the reference class)."""
    if isinstance(x, list):
        return [decode(v, diffusion) for v in x]
    if not isinstance(x, dict):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise WireError("malformed value")
    if len(x) != 1:
        raise WireError("malformed value")
    (kind, v), = x.items()
    if kind == "__tensor__":
        return torch.from_numpy(_from_array(v))
    if kind == "__array__":
        return _from_array(v)
    if kind == "__tuple__" and isinstance(v, list):
        return tuple(decode(e, diffusion) for e in v)
    if kind == "__dict__" and isinstance(v, dict):
        return {k: decode(e, diffusion) for k, e in v.items()}
    if kind == "__diffusion__" and isinstance(v, dict) and diffusion is not None:
        return diffusion(**{k: decode(e) for k, e in v.items()})
    raise WireError(f"malformed value {kind!r}")


def send(f, message):
    data = json.dumps(encode(message)).encode()
    f.write(len(data).to_bytes(8, "little") + data)
    f.flush()


def read_message(read_exact, diffusion=None):
    """One message, through read_exact(n) -> bytes (which raises at end of input or timeout)."""
    n = int.from_bytes(read_exact(8), "little")
    if n > MAX_MESSAGE:
        raise WireError(f"a message of {n} bytes (the limit is {MAX_MESSAGE})")
    try:
        return decode(json.loads(read_exact(n)), diffusion)
    except (ValueError, RecursionError, TypeError) as e:
        raise WireError(f"unreadable message: {type(e).__name__}") from None


# --- the inputs, drawn by the grader ------------------------------------------------------------
def _t(rng, *shape, scale=1.0):
    return torch.from_numpy((rng.standard_normal(shape) * scale).astype(np.float32))


def _steps(rng, T, B):
    """B steps in 0..T with both ends among them (t = 0 and t = T are where mistakes show)."""
    t = rng.integers(0, T + 1, size=B)
    t[0], t[-1] = 0, T
    return torch.from_numpy(t.astype(np.int64))


def _state(d):
    """What a GaussianDiffusion holds (its arrays and settings), for the student's process to
    rebuild it without running any unit of its own (its __init__ calls posterior_coefficients)."""
    return {k: v for k, v in vars(d).items() if k != "_cache"}


def _diffusion(ref, rng, **kw):
    T = int(rng.integers(30, 300))
    betas = ref.cosine_schedule(T) if rng.random() < 0.5 else ref.linear_schedule(T)
    return ref.GaussianDiffusion(betas, **kw)


def diffusion(cdm, state):
    """A GaussianDiffusion of the module `cdm` holding `state` (see _state)."""
    d = cdm.GaussianDiffusion.__new__(cdm.GaussianDiffusion)
    d.__dict__.update(state)
    d._cache = {}
    return d


def _random_weights(model, rng, scale=0.3):
    return {k: torch.from_numpy((rng.standard_normal(tuple(v.shape)) * scale).astype(np.float32))
            if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}


class TinyNet(torch.nn.Module):
    """A stand-in network for the loss cases: a 1x1 convolution of x_t whose output depends on t,
    C channels of prediction and, for learned variances, C of iDDPM's v from separate weights."""

    def __init__(self, C, learned):
        super().__init__()
        self.pred = torch.nn.Conv2d(C, C, 1)
        self.var = torch.nn.Conv2d(C, C, 1) if learned else None

    def forward(self, x_t, t, **_):
        scale = 1 + t.float().view(-1, 1, 1, 1) / 1000
        out = self.pred(x_t) * scale
        if self.var is None:
            return out
        return torch.cat([out, torch.tanh(self.var(x_t))], dim=1)


def prepare(ref, unit, rng):
    """The inputs of `unit`'s cases (a list of dicts), drawn with `rng` and the reference module
    `ref` (for schedules and states only: never a unit's own answer)."""
    cases = []
    if unit == "schedules":
        for T in (1000, int(rng.integers(20, 100)), int(rng.integers(100, 4001))):    # T >= 20: linear betas <= 1
            cases += [{"fn": "cosine", "T": T}, {"fn": "linear", "T": T}]
    elif unit == "q_sample":
        for _ in range(3):
            d = _diffusion(ref, rng)
            cases.append({"d": _state(d), "x0": _t(rng, 5, 3, 4, 4), "t": _steps(rng, d.T, 5),
                          "eps": _t(rng, 5, 3, 4, 4)})
    elif unit == "posterior":
        for kind in ("cosine", "linear", "random"):
            T = int(rng.integers(20, 200))
            betas = (ref.cosine_schedule(T) if kind == "cosine" else ref.linear_schedule(T) if kind == "linear"
                     else np.concatenate([[0.0], np.sort(rng.uniform(1e-4, 0.3, T))]))
            cases.append({"betas": betas})
    elif unit == "target":
        for prediction in ref.PREDICTIONS:
            d = _diffusion(ref, rng, prediction=prediction)
            cases.append({"d": _state(d), "x0": _t(rng, 4, 3, 3, 3), "eps": _t(rng, 4, 3, 3, 3),
                          "t": _steps(rng, d.T, 4).clamp(min=1), "x_t": _t(rng, 4, 3, 3, 3),
                          "pred": _t(rng, 4, 3, 3, 3)})
    elif unit == "hybrid":
        for variance in ("learned", "fixed"):
            d = _diffusion(ref, rng, variance=variance)
            cases.append({"fn": "log_variance", "d": _state(d), "v": torch.from_numpy(
                rng.uniform(-1, 1, (4, 3, 2, 2)).astype(np.float32)), "t": _steps(rng, d.T, 4).clamp(min=1),
                "x": _t(rng, 4, 3, 2, 2)})
        for variance, prediction in (("learned", "eps"), ("learned", "velocity"), ("fixed", "eps")):
            d = _diffusion(ref, rng, variance=variance, prediction=prediction)
            net = TinyNet(3, variance == "learned")
            t = torch.from_numpy(rng.integers(1, d.T + 1, size=6).astype(np.int64))
            t[0] = 1                                   # the decoder term L_0
            cases.append({"fn": "losses", "d": _state(d), "weights": _random_weights(net, rng),
                          "learned": variance == "learned", "x0": _t(rng, 6, 3, 4, 4, scale=0.5).clamp(-1, 1),
                          "t": t, "eps": _t(rng, 6, 3, 4, 4)})
    elif unit == "respacing":
        for _ in range(2):
            T = int(rng.integers(20, 400))
            for K in (1, 2, int(rng.integers(3, T)), T):
                cases.append({"fn": "spaced", "T": T, "K": K, "include": [int(rng.integers(1, T + 1))]})
        cases.append({"fn": "spaced", "T": 50, "K": 0, "include": []})
        for spacing in ("uniform", "karras"):
            d = _diffusion(ref, rng, variance="learned", prediction="velocity")
            cases.append({"fn": "respace", "d": _state(d), "K": int(rng.integers(2, 20)),
                          "include": [int(rng.integers(1, d.T + 1))], "spacing": spacing})
    elif unit in ("ancestral", "ddim"):
        d = _diffusion(ref, rng, prediction=str(rng.choice(ref.PREDICTIONS)))
        for i, eta in ((int(rng.integers(2, d.T + 1)), 0.0), (int(rng.integers(2, d.T + 1)), rng.uniform(0.2, 1)),
                       (1, rng.uniform(0.2, 1))):
            cases.append({"d": _state(d), "i": i, "x": _t(rng, 2, 3, 3, 3), "noise": _t(rng, 2, 3, 3, 3),
                          "out": [_t(rng, 2, 3, 3, 3, scale=s) for s in (1.0, 0.5, 0.7, 1.0)],
                          "pred": _t(rng, 2, 3, 3, 3, scale=1.5), "eta": float(eta) if unit == "ddim" else 0.0})
    elif unit == "dpmpp_2m":
        for _ in range(2):
            d = _diffusion(ref, rng)
            i0 = int(rng.integers(4, d.T + 1))
            chain = [i0, int(rng.integers(3, i0)), 2, 1]    # down to the last step, t' = 0
            cases.append({"fn": "steps", "d": _state(d), "chain": chain, "x": _t(rng, 2, 3, 3, 3),
                          "x0_hats": [_t(rng, 2, 3, 3, 3, scale=0.6).clamp(-1, 1) for _ in chain]})
        cases.append({"fn": "data_term", "x0_hats": [_t(rng, 2, 3, 3, 3) for _ in range(3)],
                      "hs": [float(h) for h in rng.uniform(0.05, 1.5, 3)]})
    elif unit == "distillation":
        for prediction in ref.PREDICTIONS:
            d = _diffusion(ref, rng, prediction=prediction)
            N = int(rng.integers(1, 5))
            chain = d.on_steps(ref.distillation_grid(d.T, 2 * N)[1:])     # the teacher's 2N steps
            i = torch.from_numpy(2 * rng.integers(1, N + 1, size=4))
            i[0], i[-1] = 2, 2 * N                         # the last student step (t'' = 0) and the first
            net = TinyNet(3, False)
            cases.append({"fn": "target", "d": _state(chain), "weights": _random_weights(net, rng, 1.0),
                          "z": _t(rng, 4, 3, 3, 3), "i": i})
        abar = torch.from_numpy(np.sort(rng.uniform(0.01, 0.99, (2, 4)), axis=0).astype(np.float32))
        cases.append({"fn": "step", "x0_hat": _t(rng, 4, 3, 2, 2), "z": _t(rng, 4, 3, 2, 2),
                      "abar_t": abar[0].view(-1, 1, 1, 1), "abar_s": abar[1].view(-1, 1, 1, 1)})
    elif unit == "noise_augment":
        for _ in range(2):
            d = _diffusion(ref, rng)
            cases.append({"fn": "augment", "d": _state(d), "z0": _t(rng, 5, 3, 4, 4), "s": _steps(rng, d.T, 5),
                          "eps": _t(rng, 5, 3, 4, 4)})
        for s_max in (int(rng.integers(1, 20)), int(rng.integers(100, 2000))):
            u = rng.random(200)
            u[:3] = [0.0, np.nextafter(1.0, 0.0), 0.5]
            cases.append({"fn": "aug_time", "u": torch.from_numpy(u.astype(np.float32)), "s_max": s_max})
    elif unit == "blur":
        cases.append({"fn": "kernel", "sigma": torch.from_numpy(rng.uniform(0.2, 3.0, 7).astype(np.float32))})
        for _ in range(2):
            lo = float(rng.uniform(0.2, 1.0))
            p, u = float(rng.uniform(0.2, 0.8)), rng.random((6, 2))
            u[0, 0], u[1, 0] = p / 2, (1 + p) / 2          # one example blurred, one not, at least
            cases.append({"fn": "augment", "z": _t(rng, 6, 3, 5, 5), "sigma_range": (lo, lo + float(rng.uniform(0.1, 1))),
                          "p": p, "u": torch.from_numpy(u.astype(np.float32))})
    elif unit == "handover":
        for truncated in (False, True):
            T = int(rng.integers(20, 400))
            aug = {"type": "noise", "schedule": str(rng.choice(["cosine", "linear"])), "T": T, "s_max": T}
            cases.append({"z": _t(rng, 3, 3, 4, 4), "aug": aug, "s": int(rng.integers(1, T + 1)),
                          "truncated": truncated, "seed": int(rng.integers(2 ** 31))})
        cases.append({"z": _t(rng, 3, 3, 4, 4), "aug": {"type": "blur", "sigma": [0.4, 0.6], "p": 0.5},
                      "s": 0, "truncated": False, "seed": 0})
        cases.append({"z": _t(rng, 3, 3, 4, 4), "aug": {"type": "none"}, "s": 0, "truncated": False, "seed": 0})
    elif unit == "conditioning":
        for cfg in (dict(resolution=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(4,), num_heads=2, num_classes=3, low_res=4, aug_time=True),
                    dict(resolution=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(4,), num_heads=2, num_classes=4)):
            model = ref.UNet(**cfg)
            B = 3
            cases.append({"fn": "unet", "cfg": cfg, "weights": _random_weights(model, rng, 0.2),
                          "x_t": _t(rng, B, 3, 8, 8), "t": torch.from_numpy(rng.integers(0, 1000, B)),
                          "c": torch.from_numpy(rng.integers(0, cfg["num_classes"], B)),
                          "z": _t(rng, B, 3, 4, 4) if cfg.get("low_res") else None,
                          "s": torch.from_numpy(rng.integers(0, 500, B)) if cfg.get("aug_time") else None})
        for skip_rescale in (False, True):
            block = ref.ResBlock(8, 16, 32, 0.0, skip_rescale)
            cases.append({"fn": "resblock", "args": [8, 16, 32, 0.0, skip_rescale],
                          "weights": _random_weights(block, rng, 0.3), "x": _t(rng, 2, 8, 4, 4), "emb": _t(rng, 2, 32)})
    else:
        raise KeyError(f"no cases for unit {unit!r}")
    return cases


# --- the cases, applied to a module: the reference here, the student's there ------------------
def _np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _known_mean_variance(outs):
    """A stand-in for GaussianDiffusion.p_mean_variance with given values that move with the
    step t it is asked about (so a step that asks about the wrong t is caught)."""
    def p_mean_variance(model, x, t, model_kwargs, clip=True):
        shift = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1))) / 100
        mean, logvar, x0_hat, eps = outs
        return mean + shift, -2.0 + 0.5 * torch.tanh(logvar) - shift, (x0_hat + shift).clamp(-1, 1), eps - shift
    return p_mean_variance


def apply(cdm, unit, inp):
    """Run one case of `unit` on the module `cdm`; returns what its functions gave, as arrays."""
    if unit == "schedules":
        return {"betas": _np(getattr(cdm, f"{inp['fn']}_schedule")(inp["T"])).astype(np.float64)}
    if unit == "q_sample":
        return {"x_t": _np(diffusion(cdm, inp["d"]).q_sample(inp["x0"], inp["t"], inp["eps"]))}
    if unit == "posterior":
        var, cx0, cxt = cdm.posterior_coefficients(inp["betas"])
        return {"variance": _np(var), "coef_x0": _np(cx0), "coef_xt": _np(cxt)}
    if unit == "target":
        d = diffusion(cdm, inp["d"])
        x0_hat, eps_hat = d.x0_and_eps(inp["x_t"], inp["t"], inp["pred"])
        return {"target": _np(d.target(inp["x0"], inp["eps"], inp["t"])), "x0_hat": _np(x0_hat), "eps_hat": _np(eps_hat)}
    if unit == "hybrid":
        d = diffusion(cdm, inp["d"])
        if inp["fn"] == "log_variance":
            return {"log_variance": _np(d.model_log_variance(inp["v"], inp["t"], inp["x"]))}
        net = TinyNet(3, inp["learned"])
        net.load_state_dict(inp["weights"])
        with torch.enable_grad():
            terms = d.training_losses(net, inp["x0"], inp["t"], {}, eps=inp["eps"])
            terms["loss"].sum().backward()
        out = {k: _np(v) for k, v in sorted(terms.items())}
        out.update({f"grad {k}": _np(p.grad if p.grad is not None else torch.zeros_like(p))
                    for k, p in net.named_parameters()})
        return out
    if unit == "respacing":
        try:
            if inp["fn"] == "spaced":
                return {"kept": np.asarray(cdm.spaced_timesteps(inp["T"], inp["K"], inp["include"]), dtype=np.int64)}
            r = diffusion(cdm, inp["d"]).respace(inp["K"], inp["include"], inp["spacing"])
        except ValueError:
            return {"raises": "ValueError"}
        return {"T": int(r.T), "betas": _np(r.betas), "alphas_cumprod": _np(r.alphas_cumprod),
                "timesteps": _np(r.timesteps).astype(np.int64), "posterior_variance": _np(r.posterior_variance),
                "variance": r.variance, "prediction": r.prediction}
    if unit in ("ancestral", "ddim"):
        d = diffusion(cdm, inp["d"])
        draws = []
        fresh = lambda: draws.append(1) or inp["noise"].clone()
        if unit == "ancestral":
            d.p_mean_variance = _known_mean_variance(inp["out"])
            x = cdm.sample_ancestral(d, None, inp["x"], {}, [inp["i"]], fresh)
        else:   # a network whose prediction moves with the t it is told
            net = lambda x_t, t, **kw: inp["pred"] + t.float().reshape(-1, 1, 1, 1) / 100
            x = cdm.sample_ddim(d, net, inp["x"], {}, [inp["i"]], fresh, inp["eta"])
        return {"x": _np(x), "noise drawn": len(draws)}
    if unit == "dpmpp_2m":
        if inp["fn"] == "data_term":
            (a, b, c), (h0, h1, h2) = inp["x0_hats"], inp["hs"]
            return {"D0": _np(cdm.dpmpp_2m_data_term(a, None, h0, None)),
                    "D1": _np(cdm.dpmpp_2m_data_term(b, a, h1, h0)),
                    "D2": _np(cdm.dpmpp_2m_data_term(c, b, h2, h1))}
        d = diffusion(cdm, inp["d"])
        hats = {i: x0_hat for i, x0_hat in zip(inp["chain"], inp["x0_hats"])}

        def denoise(model, x_t, i, model_kwargs):
            abar = float(d.alphas_cumprod[i])
            return hats[i], (x_t - abar ** 0.5 * hats[i]) / (1 - abar) ** 0.5
        d.denoise = denoise
        chain = inp["chain"]            # x after each step: the whole chain's first k steps
        return {f"x{k}": _np(cdm.sample_dpmpp_2m(d, None, inp["x"], {}, chain[:k + 1])) for k in range(len(chain))}
    if unit == "distillation":
        if inp["fn"] == "step":
            return {"z_s": _np(cdm.ddim_step(inp["x0_hat"], inp["z"], inp["abar_t"], inp["abar_s"]))}
        net = TinyNet(3, False)
        net.load_state_dict(inp["weights"])
        with torch.no_grad():
            return {"x_tilde": _np(cdm.distillation_target(diffusion(cdm, inp["d"]), net, inp["z"], inp["i"], {}))}
    if unit == "noise_augment":
        if inp["fn"] == "aug_time":
            return {"s": _np(cdm.sample_aug_time(inp["u"], inp["s_max"])).astype(np.int64)}
        return {"z_s": _np(cdm.noise_augment(inp["z0"], inp["s"], diffusion(cdm, inp["d"]), inp["eps"]))}
    if unit == "blur":
        if inp["fn"] == "kernel":
            return {"kernel": _np(cdm.gaussian_kernel3(inp["sigma"]))}
        z, applied = cdm.blur_augment(inp["z"], inp["sigma_range"], inp["p"], inp["u"])
        return {"z": _np(z), "applied": _np(applied).astype(bool)}
    if unit == "handover":
        g = torch.Generator().manual_seed(inp["seed"])
        got = cdm.handover(inp["z"], inp["aug"], inp["s"], inp["truncated"], g)
        return {k: _np(v) for k, v in sorted(got.items())}
    if unit == "conditioning":
        if inp["fn"] == "resblock":
            block = cdm.ResBlock(*inp["args"])
            block.load_state_dict(inp["weights"])
            with torch.no_grad():
                return {"h": _np(block(inp["x"], inp["emb"]))}
        model = cdm.UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in inp["cfg"].items()})
        model.load_state_dict(inp["weights"])
        model.eval()
        with torch.no_grad():
            x_in, emb = model.conditioning(inp["x_t"], inp["t"], inp["c"], inp["z"], inp["s"])
            out = model(inp["x_t"], inp["t"], inp["c"], inp["z"], inp["s"])
        return {"x_in": _np(x_in), "emb": _np(emb), "output": _np(out)}
    raise KeyError(f"no cases for unit {unit!r}")


# --- the oracles: another unit's function, answered by the reference in the grader ------------
# For each unit, the other units' functions its reference body calls (directly or through code
# that is not a unit). Nothing else is answered.
ORACLES = {
    "hybrid": ("GaussianDiffusion.q_sample", "GaussianDiffusion.target", "GaussianDiffusion.x0_and_eps"),
    "ddim": ("GaussianDiffusion.x0_and_eps",),
    "distillation": ("GaussianDiffusion.x0_and_eps",),
    "respacing": ("posterior_coefficients",),
    "noise_augment": ("GaussianDiffusion.q_sample",),
    "handover": ("noise_augment", "cosine_schedule", "linear_schedule", "posterior_coefficients"),
}


class _Differentiable(torch.autograd.Function):
    """An oracle call whose tensor arguments need gradients: the value from the grader, and in
    backward the grader's vector-Jacobian product of the reference at the same point."""

    @staticmethod
    def forward(ctx, ask, name, args, kwargs, where, *tensors):
        ctx.meta = (ask, name, args, kwargs, where)
        out = ask({"type": "oracle", "fn": name, "args": args, "kwargs": kwargs})
        ctx.n_out = len(out) if isinstance(out, tuple) else 0
        return out

    @staticmethod
    def backward(ctx, *grads):
        ask, name, args, kwargs, where = ctx.meta
        g = ask({"type": "vjp", "fn": name, "args": args, "kwargs": kwargs, "where": where, "grads": list(grads)})
        return (None, None, None, None, None, *g)


def oracle_stub(name, ask):
    """A stand-in for `name` (a qualified name in cdm.py) that asks the grader through `ask`."""
    def stub(*args, **kwargs):
        where = [["arg", k] for k, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        where += [["kw", k] for k, a in kwargs.items() if isinstance(a, torch.Tensor) and a.requires_grad]
        if not where or not torch.is_grad_enabled():
            return ask({"type": "oracle", "fn": name, "args": list(args), "kwargs": kwargs})
        tensors = [args[k] if kind == "arg" else kwargs[k] for kind, k in where]
        return _Differentiable.apply(ask, name, list(args), kwargs, where, *tensors)
    stub.__name__ = name.rpartition(".")[2]
    return stub


def owner_of(cdm, name):
    """(the object holding `name`'s function, its own name) for a qualified name of cdm.py:
    (cdm, "cosine_schedule"), (cdm.GaussianDiffusion, "q_sample")."""
    owner, _, leaf = name.rpartition(".")
    return (getattr(cdm, owner) if owner else cdm), leaf


def install(cdm, names, make):
    """Put make(name) in place of each qualified name's function in the module `cdm`, and in the
    module's tables of functions (make_betas looks schedules up in SCHEDULES), wherever a function
    of that name stands (a file may define one twice: the table holds the first)."""
    for name in names:
        holder, leaf = owner_of(cdm, name)
        new = make(name)
        setattr(holder, leaf, new)
        if holder is not cdm:
            continue
        for global_name, table in list(vars(cdm).items()):
            if isinstance(table, dict) and not global_name.startswith("__"):
                for key, value in list(table.items()):
                    if callable(value) and getattr(value, "__name__", None) == leaf and value is not new:
                        table[key] = new


def answer(ref, unit, message):
    """The grader's reply to an oracle or vjp request from the student's process of `unit`."""
    name = message.get("fn")
    if name not in ORACLES.get(unit, ()):
        raise PermissionError(f"{name} is not answered while grading {unit}")
    fn = getattr(*owner_of(ref, name))
    args, kwargs = list(message["args"]), dict(message["kwargs"])
    _check_size(args, kwargs)
    if message["type"] == "oracle":
        with torch.no_grad():
            return fn(*args, **kwargs)
    inputs = []
    for kind, k in message["where"]:
        holder = args if kind == "arg" else kwargs
        holder[k] = holder[k].detach().clone().requires_grad_(True)
        inputs.append(holder[k])
    with torch.enable_grad():
        out = fn(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    pairs = [(o, g) for o, g in zip(outs, message["grads"]) if g is not None and isinstance(o, torch.Tensor)
             and o.requires_grad]
    if not pairs:
        return tuple(torch.zeros_like(x) for x in inputs)
    got = torch.autograd.grad([o for o, _ in pairs], inputs, [g.to(o.dtype) for o, g in pairs], allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, got))


def _check_size(*values, limit=1 << 24):
    """Refuse oracle requests that would make the grader do unbounded work."""
    total = 0
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, (torch.Tensor, np.ndarray)):
            total += int(np.prod(v.shape))
        elif isinstance(v, (list, tuple)):
            stack += list(v)
        elif isinstance(v, dict):
            stack += list(v.values())
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > 100_000:
            raise ValueError(f"an argument of {v} is out of range for grading")
        elif type(v).__name__ == "GaussianDiffusion":
            total += len(v.betas)
    if total > limit:
        raise ValueError("the arguments are too large for grading")


# --- comparing ----------------------------------------------------------------------------------
def compare(expected, got, rtol=1e-4):
    """'' when `got` agrees with `expected` (same keys, shapes, exact integers and booleans,
    floats within rtol of the reference's scale), else what differs, in one line."""
    if not isinstance(got, dict) or set(got) != set(expected):
        return f"returned {sorted(got) if isinstance(got, dict) else type(got).__name__}, expected {sorted(expected)}"
    for key, want in expected.items():
        have = got[key]
        if isinstance(want, (str, bool, int)) and not isinstance(want, np.ndarray):
            if have != want:
                return f"{key}: {have!r}, expected {want!r}"
            continue
        w = np.asarray(want)
        try:
            h = np.asarray(have)
        except Exception:
            return f"{key}: not an array"
        if h.shape != w.shape:
            return f"{key}: shape {h.shape}, expected {w.shape}"
        if w.dtype.kind in "biu":
            if h.dtype.kind not in "biu" or not np.array_equal(h, w):
                return f"{key}: {int(np.sum(h != w)) if h.dtype.kind in 'biuf' else 'all'} of {w.size} entries differ"
            continue
        if h.dtype.kind not in "fiu":
            return f"{key}: not numbers"
        h, w = h.astype(np.float64), w.astype(np.float64)
        finite = np.isfinite(w)
        if not np.array_equal(np.isfinite(h), finite) or not np.array_equal(h[~finite], w[~finite], equal_nan=True):
            return f"{key}: infinite or NaN where the reference is not (or the other way round)"
        scale = float(np.abs(w[finite]).max()) if finite.any() else 1.0
        bad = ~np.isclose(h[finite], w[finite], rtol=rtol, atol=rtol * max(scale, 1e-3))
        if bad.any():
            k = int(np.argmax(bad))
            return f"{key}: {int(bad.sum())} of {w.size} entries differ (e.g. {h[finite][k]:.6g}, expected {w[finite][k]:.6g})"
    return ""


def judge(expected, results, errors):
    """The verdict on each case: '' when what came back (results: {case: outputs}) agrees with the
    reference's, else why not (it raised: errors {case: text}; no answer; or what differs)."""
    out = []
    for k, want in enumerate(expected):
        if k in results:
            out.append(compare(want, results[k]))
        elif k in errors:
            out.append("raised " + (str(errors[k]).strip().splitlines() or ["?"])[-1][:300])
        else:
            out.append("no answer")
    return out


# --- the student's side -----------------------------------------------------------------------
def load_module(path):
    """The student's cdm.py as the module `cdm`, loaded from its file alone (nothing else of the
    student's folder is on the import path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("cdm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cdm"] = module
    spec.loader.exec_module(module)
    return module


def worker(fd_in, fd_out):
    """The process that runs the student's code (confined by sandbox.py before it started): read
    the job, load cdm.py, apply each case, send back what came out; answer nothing else."""
    rx, tx = os.fdopen(fd_in, "rb", buffering=0), os.fdopen(fd_out, "wb")

    def read_exact(n):
        data = b""
        while len(data) < n:
            chunk = rx.read(n - len(data))
            if not chunk:
                raise EOFError("the grader closed the pipe")
            data += chunk
        return data

    def ask(message):
        send(tx, message)
        reply = read_message(read_exact)
        if reply.get("type") != "answer":
            raise RuntimeError(f"the grader could not answer: {reply.get('error')}")
        return reply["value"]

    job = read_message(read_exact)
    try:
        cdm = load_module(os.path.join(os.getcwd(), "cdm.py"))
        install(cdm, ORACLES.get(job["unit"], ()), lambda name: oracle_stub(name, ask))
    except BaseException:
        send(tx, {"type": "error", "k": -1, "error": traceback.format_exc(limit=-3)[-2000:]})
        send(tx, {"type": "done"})
        return
    for k, inp in enumerate(job["cases"]):
        try:
            send(tx, {"type": "result", "k": k, "value": apply(cdm, job["unit"], inp)})
        except BaseException:
            send(tx, {"type": "error", "k": k, "error": traceback.format_exc(limit=-3)[-2000:]})
    send(tx, {"type": "done"})


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit("grading.py is run by assign.py's grader, not by hand")
