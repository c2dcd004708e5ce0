"""assign.py -- a course-assignment kit: blank units of the paper, hand them out, grade them.

  python assign.py make --out hw1                          # every unit blanked, in hw1/
  python assign.py make --units schedules,posterior --out hw1   # only these
  python assign.py grade hw1                               # a table, and hw1/results.json
  python assign.py list                                    # the units and their tests

`make` copies the repository for students with each chosen unit's body replaced by a stub that
keeps its signature and docstring (the formula and the citation) and raises NotImplementedError
naming the exercise, and writes ASSIGNMENT.md: the units in order, each with its paper section,
what to implement and the one command that checks it. Everything that does not call a blanked
unit still runs. The kit itself (this file: its wrong answers are one edit away from the reference
bodies) is not copied.

`grade` runs each unit's tests, from this repository's test_cdm.py (not the copy's), against the
student's code, one process per unit with a timeout: that unit's functions come from the
student, every other unit's from the reference, so a crash, a hang, an import error or a wrong
answer in one unit costs that unit only, and an early mistake is not charged again in every
later unit that calls it. It prints a table (unit, tests passed, points) and writes results.json
in Gradescope's autograder format.
"""
import argparse
import ast
import contextlib
import functools
import json
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

try:                                    # the grader's own dependencies, checked in main()
    import numpy as np
    import torch  # noqa: F401
    MISSING = None
except ImportError as e:
    MISSING = e.name

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = "cdm.py"            # every unit is a function (or two) of the paper's file


@dataclass(frozen=True)
class Unit:
    name: str                # what --units takes
    functions: tuple         # qualified names in cdm.py: "cosine_schedule", "GaussianDiffusion.q_sample"
    section: str             # the paper it implements (docs/paper.md)
    task: str                # what to implement, one line for ASSIGNMENT.md
    tests: tuple             # its tests in test_cdm.py
    points: int = 1


# In the order a course would take them: each unit's reference answers only use units before it.
UNITS = [
    Unit("schedules", ("linear_schedule", "cosine_schedule"), "DDPM §4; iDDPM §3.2, Eq. (17)",
         "the linear and the cosine noise schedules: beta_t for t = 0..T (beta_0 = 0), the cosine one "
         "through abar_t = f(t) / f(0) with its offset and its clip",
         ("test_linear_schedule_closed_form", "test_cosine_schedule_closed_form_and_clip")),
    Unit("q_sample", ("GaussianDiffusion.q_sample",), "DDPM Eq. (4)",
         "the forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps",
         ("test_q_sample_mean_and_variance",)),
    Unit("posterior", ("posterior_coefficients",), "DDPM Eqs. (6)-(7)",
         "the posterior q(x_{t-1} | x_t, x0): its variance beta~_t and the two coefficients of its mean",
         ("test_q_posterior_matches_bayes_rule", "test_posterior_coefficients_closed_form")),
    Unit("target", ("GaussianDiffusion.target", "GaussianDiffusion.x0_and_eps"), "DDPM Eq. (14); PD §4",
         "what the network regresses in L_simple (eps, x0 or the velocity), and (x0_hat, eps_hat) "
         "back from its prediction",
         ("test_prediction_targets_invert_to_x0_and_eps", "test_velocity_target_closed_form")),
    Unit("hybrid", ("GaussianDiffusion.model_log_variance", "GaussianDiffusion.training_losses"),
         "iDDPM §3.1, Eqs. (15)-(16)",
         "the learned variance Sigma = exp(v log beta + (1 - v) log beta~) and the losses: L_simple, and "
         "L_hybrid = L_simple + lambda L_vlb with the mean's gradient stopped inside L_vlb",
         ("test_learned_range_variance_endpoints", "test_hybrid_loss_vlb_trains_only_the_variance",
          "test_initial_l_simple_is_one_with_zero_initialised_output", "test_hybrid_loss_closed_form"), 2),
    Unit("respacing", ("spaced_timesteps", "GaussianDiffusion.respace", "GaussianDiffusion.on_steps"), "iDDPM §4",
         "respaced sampling: K of the T steps, evenly spaced and containing T, betas recomputed from abar, "
         "the network told the original t",
         ("test_respacing_keeps_abar_and_full_respacing_is_identity", "test_respaced_chain_tells_the_network_the_original_t")),
    Unit("ancestral", ("sample_ancestral",), "DDPM Alg. 2",
         "the ancestral sampler: x_{t-1} = mu_theta + Sigma_theta^{1/2} n at every step, no noise on the last",
         ("test_ancestral_sampler_closed_form", "test_ancestral_sampling_with_the_true_prediction_recovers_a_point_mass")),
    Unit("ddim", ("GaussianDiffusion.denoise", "sample_ddim"), "DDIM Eq. (12), Eq. (16)",
         "the samplers' denoiser (x0_hat clipped, eps_hat consistent with it) and the DDIM sampler, eta = 0 "
         "deterministic",
         ("test_ddim_sampler_closed_form", "test_ddim_eta0_is_deterministic_and_ddpm_is_not")),
    Unit("dpmpp_2m", ("dpmpp_2m_data_term", "sample_dpmpp_2m"), "DPM++ Alg. 2",
         "the DPM-Solver++(2M) sampler: h in log-SNR, the second-order data term D, the exponential update",
         ("test_dpmpp_2m_sampler_closed_form", "test_ode_samplers_converge_at_their_order"), 2),
    Unit("noise_augment", ("noise_augment", "sample_aug_time"), "CDM §3",
         "Gaussian conditioning augmentation: z_s with the low-res model's forward process, and s ~ U{0..s_max}",
         ("test_noise_augment_identity_at_zero_and_forward_marginal", "test_sample_aug_time_covers_zero_to_s_max")),
    Unit("blur", ("gaussian_kernel3", "blur_augment"), "CDM §3.1",
         "blur augmentation: normalised 3x3 Gaussian kernels, applied to a fraction p of the examples",
         ("test_blur_kernel_sums_to_one_and_is_symmetric", "test_blur_augment_hits_about_half_and_preserves_mean")),
    Unit("handover", ("handover",), "CDM §3.2, §3.3",
         "what an SR stage is given of the previous stage's output: z_s as it is (truncated), z0 re-noised "
         "(non-truncated), clean z (blur)",
         ("test_handover_closed_form", "test_truncated_sampling_hands_over_z_s_from_the_right_step",
          "test_blur_stage_gets_clean_z_at_sampling")),
    Unit("conditioning", ("UNet.conditioning", "ResBlock.forward"), "ADM §3.1; CDM §3, §3.2",
         "the U-Net's conditioning: the t, class and s embeddings, z upsampled and concatenated, and "
         "each residual block's scale-shift GN(h) (1 + scale) + shift",
         ("test_unet_conditioning_inputs_matter", "test_conditioning_closed_form"), 2),    Unit("distillation", ("ddim_step", "distillation_target"), "PD Alg. 2",
         "progressive distillation's target: the teacher's two DDIM steps t -> t' -> t'', and the x~ that "
         "takes one DDIM step from z_t to the same z_t''",
         ("test_distillation_target_of_an_exact_point_mass_teacher_is_the_point",
          "test_distillation_target_is_the_x0_that_takes_one_ddim_step_to_the_teachers_two"), 2),
]
UNIT_BY_NAME = {u.name: u for u in UNITS}

# --- an assignment graded on results: train and sample a cascade stage -------------------------
# Not a function but a result: the student trains the demo's 8->16 noise-augmented SR stage with
# their own cdm.py; the grader retrains it from the student's flags, inside the sandbox, within a
# CPU budget, and measures the checkpoint with the kit's own code on held-out images it chooses.
# Thresholds from the reference solution (docs/teaching.md, "The stage assignment"): 3 training
# seeds x 3 sampling seeds, 256 images each, gave 29.75-30.06 dB, 99.6-100% and FID 0.43-0.79;
# a quarter of the training steps gave 24.9 dB and FID 4.4-7.2.
STAGE = "stage"
STAGE_POINTS = 5
STAGE_CPU_SECONDS = 300          # the reference trains in 128-135 CPU seconds (2 threads)
STAGE_THRESHOLDS = {"consistency_db": 28.0, "accuracy": 0.95, "fid": 3.0}
STAGE_SAMPLES = 256
STAGE_FIGURES = ("figures/s_sweep.png", "figures/samplers.png")
STAGE_FLAGS_FILE = "stage_flags.txt"
# train_sr.py's flags a student may set (the rest is fixed by the grader: the preset, data, output,
# device, seed); each is one the assignment is about: the model, its training and its sampling.
STAGE_ALLOWED = {"--aug_schedule", "--aug_T", "--s_max", "--sample_s", "--ch", "--mult", "--res_blocks", "--attn",
                 "--heads", "--dropout", "--skip_rescale", "--no_skip_rescale", "--schedule", "--T", "--variance",
                 "--prediction", "--sampler", "--sample_steps", "--steps", "--batch_size", "--micro_batch", "--lr",
                 "--warmup", "--lr_decay", "--grad_clip", "--ema", "--ema_warmup", "--no_ema_warmup"}
STAGE_TASK = f"""Train the cascade's 8->16 super-resolution stage with Gaussian noise conditioning
augmentation (CDM §3), using your own `cdm.py`, and sample it. Put the flags you choose for
`train_sr.py` (the model, its training, its sampler; see `python train_sr.py --help`) on one line
in `{STAGE_FLAGS_FILE}` (empty: the demo's defaults). The grader trains the stage again from those
flags with your `cdm.py`, within {STAGE_CPU_SECONDS} CPU seconds, and scores the checkpoint on
{STAGE_SAMPLES} held-out 8x8 images: low-res consistency >= {STAGE_THRESHOLDS['consistency_db']:g} dB,
class accuracy >= {STAGE_THRESHOLDS['accuracy']:.0%} and FID <= {STAGE_THRESHOLDS['fid']:g} on the kit's
classifier (one point each, one more for training within the budget). Add two figures, half a
point each: `{STAGE_FIGURES[0]}` (low-res consistency or FID against the augmentation time s you
sample at, `sample.py --low_res ... --s_sweep`) and `{STAGE_FIGURES[1]}` (the samplers compared at
a few step counts). Check yourself: `python train_sr.py $(cat {STAGE_FLAGS_FILE})` trains it in about
a minute and a half on 2 cores."""


# --- wrong answers students write: each must fail its unit's tests (tests/test_kit.py proves it) -
# (description, function, the reference text, what the student wrote instead)
WRONG_ANSWERS = {
    "schedules": [
        ("the cosine schedule without its 0.008 offset", "cosine_schedule",
         "(t / T + offset) / (1 + offset)", "(t / T)"),
        ("the cosine schedule without the 0.999 clip of beta", "cosine_schedule",
         "np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)", "1.0 - abar[1:] / abar[:-1]"),
        ("the linear schedule not rescaled by 1000 / T", "linear_schedule", "scale = 1000.0 / T", "scale = 1.0"),
    ],
    "q_sample": [
        ("sqrt(abar_{t-1}) for sqrt(abar_t): the index one off", "GaussianDiffusion.q_sample",
         '_at("alphas_cumprod", t, x0).sqrt() * x0', '_at("alphas_cumprod", (t - 1).clamp(min=0), x0).sqrt() * x0'),
        ("the noise scaled by the variance 1 - abar_t, not its square root", "GaussianDiffusion.q_sample",
         '(1 - self._at("alphas_cumprod", t, x0)).sqrt() * eps', '(1 - self._at("alphas_cumprod", t, x0)) * eps'),
    ],
    "posterior": [
        ("beta_t instead of beta~_t as the posterior variance", "posterior_coefficients",
         "variance = np.where(one_minus > 0, (1 - abar_prev) / one_minus * betas, 0)", "variance = betas.copy()"),
        ("abar_t for abar_{t-1} in the x0 coefficient", "posterior_coefficients",
         "np.sqrt(abar_prev) * betas / one_minus", "np.sqrt(abar) * betas / one_minus"),
        ("the two mean coefficients swapped", "posterior_coefficients",
         "return variance, coef_x0, coef_xt", "return variance, coef_xt, coef_x0"),
    ],
    "target": [
        ("the velocity's sign flipped: sqrt(1 - abar) x0 - sqrt(abar) eps", "GaussianDiffusion.target",
         "return abar.sqrt() * eps - (1 - abar).sqrt() * x0", "return (1 - abar).sqrt() * x0 - abar.sqrt() * eps"),
        ("the velocity with abar for sqrt(abar)", "GaussianDiffusion.target",
         "return abar.sqrt() * eps - (1 - abar).sqrt() * x0", "return abar * eps - (1 - abar) * x0"),
        ("x0 from a velocity with the two terms swapped", "GaussianDiffusion.x0_and_eps",
         "return abar.sqrt() * x_t - (1 - abar).sqrt() * pred, (1 - abar).sqrt() * x_t + abar.sqrt() * pred",
         "return (1 - abar).sqrt() * x_t - abar.sqrt() * pred, abar.sqrt() * x_t + (1 - abar).sqrt() * pred"),
    ],
    "hybrid": [
        ("iDDPM's v used as the interpolation fraction, not (v + 1) / 2", "GaussianDiffusion.model_log_variance",
         "        frac = (v + 1) / 2\n", "        frac = v\n"),
        ("no stop-gradient: L_vlb also trains the mean", "GaussianDiffusion.training_losses",
         "self.x0_and_eps(x_t, t, pred.detach())[0]", "self.x0_and_eps(x_t, t, pred)[0]"),
        ("lambda L_vlb without the T that turns L_t into the bound L_vlb", "GaussianDiffusion.training_losses",
         "self.lambda_vlb * self.T * terms", "self.lambda_vlb * terms"),
    ],
    "respacing": [
        ("the kept steps' betas copied from the original schedule", "GaussianDiffusion.on_steps",
         "betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])", "betas = self.betas[kept]"),
        ("the network told the respaced index instead of the original t", "GaussianDiffusion.on_steps",
         "timesteps=np.concatenate([[0], self.timesteps[kept]])", "timesteps=None"),
        ("steps from 0, not always containing T", "spaced_timesteps",
         "np.linspace(1, T, K) if K > 1 else [T]", "np.arange(1, T + 1, max(1, T // K))[:K]"),
    ],
    "ancestral": [
        ("noise added on the last step too", "sample_ancestral",
         "n = fresh() if i > 1 else torch.zeros_like(x)", "n = fresh()"),
        ("the variance, not the standard deviation, times the noise", "sample_ancestral",
         "torch.exp(0.5 * logvar) * n", "torch.exp(logvar) * n"),
    ],
    "ddim": [
        ("eps_hat from the raw prediction, ignoring the clipping of x0_hat", "GaussianDiffusion.denoise",
         ("x0_hat = self.x0_and_eps(x_t, t, self.split_output(out.float())[0])[0].clamp(-1, 1)",
          "return x0_hat, (x_t - math.sqrt(abar) * x0_hat) / math.sqrt(1 - abar)"),
         ("x0_hat, eps_raw = self.x0_and_eps(x_t, t, self.split_output(out.float())[0]); x0_hat = x0_hat.clamp(-1, 1)",
          "return x0_hat, eps_raw")),
        ("sigma without its square root: eta (1 - abar') / (1 - abar) (1 - abar / abar')", "sample_ddim",
         "sig = eta * math.sqrt((1 - abar[j]) / (1 - abar[i]) * (1 - abar[i] / abar[j]))",
         "sig = eta * (1 - abar[j]) / (1 - abar[i]) * (1 - abar[i] / abar[j])"),
        ("x0_hat weighted by sqrt(abar_t), not sqrt(abar_{t'})", "sample_ddim",
         "x = alpha[j] * x0_hat", "x = alpha[i] * x0_hat"),
    ],
    "dpmpp_2m": [
        ("first order only: D = x0_hat on every step", "dpmpp_2m_data_term",
         "if x0_prev is None:", "if True:"),
        ("r upside down: h / h_previous", "dpmpp_2m_data_term", "r = h_prev / h\n", "r = h / h_prev\n"),
        ("e^{h} for e^{-h}", "sample_dpmpp_2m",
         "alpha[j] * math.expm1(-h) * D", "alpha[j] * math.expm1(h) * D"),
    ],
    "distillation": [
        ("the target is the teacher's z_t'' itself, not the x0 that reaches it", "distillation_target",
         "return (z - ratio * z_t) / (abar(i - 2).sqrt() - ratio * abar(i).sqrt())", "return z"),
        ("alpha = abar, not its square root, in x~'s denominator", "distillation_target",
         "(abar(i - 2).sqrt() - ratio * abar(i).sqrt())", "(abar(i - 2) - ratio * abar(i))"),
        ("the teacher told t on its second step too", "distillation_target",
         "out = teacher(z, when(j), **model_kwargs)", "out = teacher(z, when(i), **model_kwargs)"),
        ("the teacher's x0_hat not clipped to [-1, 1] as the sampler clips it", "distillation_target",
         "[0].clamp(-1, 1)", "[0]"),
        ("DDIM's noise carried over with the variance ratio, not the standard deviations'", "ddim_step",
         "((1 - abar_s) / (1 - abar_t)).sqrt()", "((1 - abar_s) / (1 - abar_t))"),
    ],
    "noise_augment": [
        ("z0 not scaled: z_s = z0 + sqrt(1 - abar_s) eps", "noise_augment",
         "return low_res_diffusion.q_sample(z0, s, eps)",
         'return z0 + (1 - low_res_diffusion._at("alphas_cumprod", s, z0)).sqrt() * eps'),
        ("s drawn from U{0..s_max - 1}: s_max never trained", "sample_aug_time",
         "(u * (int(s_max) + 1))", "(u * int(s_max))"),
        ("s drawn from U{1..s_max}: clean z never trained", "sample_aug_time",
         "(u * (int(s_max) + 1)).long()", "(1 + u * int(s_max)).long()"),
    ],
    "blur": [
        ("blur on every example instead of a fraction p", "blur_augment",
         "applied = u[:, 0] < p", "applied = u[:, 0] < 1.0"),
        ("the kernel not normalised to sum to one", "gaussian_kernel3",
         "return k / k.sum(dim=(1, 2), keepdim=True)", "return k"),
        ("sigma used as the variance: exp(-d^2 / (2 sigma))", "gaussian_kernel3",
         "(2 * sigma[:, None] ** 2)", "(2 * sigma[:, None])"),
    ],
    "handover": [
        ("handing over the clean z0 instead of z_s (non-truncated)", "handover",
         "    if not truncated:\n", "    if False:\n"),
        ("re-noising z_s when truncated too: noise twice", "handover",
         "    if not truncated:\n", "    if True:\n"),
        ("s handed over as 0", "handover",
         "torch.full((z.shape[0],), int(s)", "torch.full((z.shape[0],), 0"),
    ],
    "conditioning": [
        ("s fed through t's embedding", "UNet.conditioning",
         "self.aug_embed(timestep_embedding(s, self.model_channels))",
         "self.time_embed(timestep_embedding(s, self.model_channels))"),
        ("scale-shift without the 1: GN(h) scale + shift", "ResBlock.forward",
         "torch.addcmul(shift, self.out_norm(h), 1 + scale)", "torch.addcmul(shift, self.out_norm(h), scale)"),
        ("the class ignored", "UNet.conditioning", "emb = emb + self.class_embed(c)", "emb = emb"),
        ("z concatenated before x_t", "UNet.conditioning",
         "torch.cat([x_t, upsample(z, self.resolution)], dim=1)", "torch.cat([upsample(z, self.resolution), x_t], dim=1)"),
    ],
}


# --- finding, blanking and splicing functions in a source file ---------------------------------
@functools.lru_cache(maxsize=64)
def function_nodes(source):
    """{qualified name: ast.FunctionDef} for the module-level functions and the methods of
    module-level classes of a file's text (parsed once per text)."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    out[f"{node.name}.{item.name}"] = item
    return out


def _span(node):
    """(first line, last line), 1-based, of a function with its decorators."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return first, node.end_lineno


def replace_functions(source, replacements):
    """source with each function named in `replacements` ({qualified name: its new text, def line
    included}) put in place of the old one."""
    lines = source.splitlines(keepends=True)
    nodes = function_nodes(source)
    for name in replacements:
        if name not in nodes:
            raise KeyError(f"{SOURCE} has no function {name}")
    for name, text in sorted(replacements.items(), key=lambda kv: -_span(nodes[kv[0]])[0]):
        first, last = _span(nodes[name])
        lines[first - 1:last] = [text if text.endswith("\n") else text + "\n"]
    return "".join(lines)


def function_text(source, name):
    """The text of one function (decorators and def line included), or None if it is not there."""
    nodes = function_nodes(source)
    if name not in nodes:
        return None
    first, last = _span(nodes[name])
    return "".join(source.splitlines(keepends=True)[first - 1:last])


def stub_text(source, name, exercise, unit):
    """A function's stub: its decorators, signature and docstring, then NotImplementedError."""
    node = function_nodes(source)[name]
    lines = source.splitlines(keepends=True)
    first, _ = _span(node)
    body = node.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
        and isinstance(body[0].value.value, str)
    keep_to = body[0].end_lineno if has_doc else body[0].lineno - 1
    indent = re.match(r"\s*", lines[body[0].lineno - 1]).group(0)
    head = "".join(lines[first - 1:keep_to])
    return head + (f'{indent}raise NotImplementedError("exercise {exercise} ({unit}): write {name} '
                   f'-- see ASSIGNMENT.md")\n')


def stubbed_source(source, unit_names):
    """The source with every function of the named units blanked (stub_text)."""
    reps = {}
    for k, unit in enumerate(UNITS, 1):
        if unit.name in unit_names:
            for f in unit.functions:
                reps[f] = stub_text(source, f, k, unit.name)
    return replace_functions(source, reps)


def mutated_source(source, function, old, new):
    """The source with one wrong answer put in: `old` replaced by `new` inside `function` only
    (a pair of tuples: several replacements)."""
    text = function_text(source, function)
    for a, b in zip(*((old, new) if isinstance(old, tuple) else ((old,), (new,)))):
        if text is None or text.count(a) != 1:
            raise ValueError(f"{function} contains {a!r} {0 if text is None else text.count(a)} times, "
                             "not once: update the wrong answer")
        text = text.replace(a, b)
    return replace_functions(source, {function: text})


def _cut_by_indentation(source, name):
    """A function's text found by its 'def' line (inside its 'class' line, for a method) and the
    lines indented deeper than it, for a file that does not parse."""
    cls, _, leaf = name.rpartition(".")
    lines = source.splitlines(keepends=True)
    start = 0
    if cls:
        start = next((k for k, line in enumerate(lines) if re.match(rf"class {re.escape(cls)}\b", line)), None)
        if start is None:
            return None
    for k in range(start, len(lines)):
        if k > start and cls and re.match(r"\S", lines[k]):
            return None                                   # past the end of the class
        m = re.match(rf"(\s*)def {re.escape(leaf)}\(", lines[k])
        if m and bool(cls) == bool(m.group(1)):
            indent, end = len(m.group(1)), k + 1
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
                end += 1
            while end > k + 1 and not lines[end - 1].strip():
                end -= 1                                  # not the blank lines after it
            return "".join(lines[k:end])
    return None


def distinctive_lines(source, unit_names):
    """The lines of the named units' reference bodies that appear nowhere else in the reference
    code: what a copy for students must not contain (a line shared with other code, like
    'abar = self._at(...)', gives nothing away)."""
    blank = stubbed_source(source, unit_names)
    elsewhere = set(_norm_lines(blank))
    for name in sorted(os.listdir(HERE)):
        if name.endswith(".py") and name not in (SOURCE, "assign.py", "test_cdm.py"):
            elsewhere |= set(_norm_lines(open(os.path.join(HERE, name), encoding="utf-8").read()))
    body = set()
    for u in UNITS:
        if u.name in unit_names:
            for f in u.functions:
                body |= set(_norm_lines(function_text(source, f)))
    return sorted(line for line in body - elsewhere if len(line) > 12 and not line.startswith("#"))


def _norm_lines(text):
    return [re.sub(r"\s+", " ", line.split("  #")[0]).strip() for line in text.splitlines()]


# --- make ---------------------------------------------------------------------------------------
ASSIGNED = "assignment.json"     # in a copy: the units it blanked, which `grade` grades
NOT_COPIED = {"assign.py", ".git", ".venv", "runs", "samples", "data", "__pycache__", ".pytest_cache",
              ".gl", ".whl", "gpu-check"}


def make(out, unit_names):
    """Write the students' copy to `out` (a new folder, built beside it and renamed into place)."""
    import safety
    unknown = [u for u in unit_names if u not in UNIT_BY_NAME and u != STAGE]
    if unknown:
        safety.fail(f"--units: no unit {', '.join(unknown)}; the units are {', '.join(UNIT_BY_NAME)}, {STAGE}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        safety.fail(f"--out {out} exists and is not empty: choose a new folder")
    if os.path.exists(bundle_path(out)):
        safety.fail(f"{bundle_path(out)} exists (the autograder of an earlier --out {out}): move it away first")
    parent = safety.writable_folder(os.path.dirname(os.path.abspath(out)), "--out")
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-cdm-assign-")
    try:
        for name in sorted(os.listdir(HERE)):
            if name in NOT_COPIED or name.startswith(".tmp-"):
                continue
            src = os.path.join(HERE, name)
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, name))
        reference = open(os.path.join(HERE, SOURCE), encoding="utf-8").read()
        stubbed = stubbed_source(reference, unit_names)
        with open(os.path.join(tmp, SOURCE), "w", encoding="utf-8") as f:
            f.write(stubbed)
        with open(os.path.join(tmp, "ASSIGNMENT.md"), "w", encoding="utf-8") as f:
            f.write(assignment_md(unit_names))
        with open(os.path.join(tmp, ASSIGNED), "w", encoding="utf-8") as f:   # what grade grades
            json.dump({"units": [n for n in list(UNIT_BY_NAME) + [STAGE] if n in unit_names]}, f, indent=1)
        leaked = leaks(tmp, reference, unit_names)
        if leaked:
            raise RuntimeError(f"the copy would contain reference lines: {leaked[:3]}")
        if os.path.isdir(out):
            os.rmdir(out)
        bundle = gradescope_bundle(bundle_path(out), unit_names)
        os.replace(tmp, out)
    except BaseException:
        if "bundle" in locals():
            os.remove(bundle)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- Gradescope ------------------------------------------------------------------------------------
# The packages grading needs, pinned to the versions the kit is tested with (requirements.txt
# pins torch; numpy is the version this kit was last measured with).
GRADER_PACKAGES = ("torch==2.13.0", "numpy==2.4.6", "pillow==13.0.0")
BUNDLE_FILES = ("assign.py", "grading.py", "sandbox.py", "safety.py", SOURCE, "train_sr.py", "trainer.py", "data.py",
                "evaluate.py", "sample.py")

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image.
set -euo pipefail
apt-get update && apt-get install -y python3 python3-pip
pip3 install --break-system-packages {packages} 2>/dev/null || pip3 install {packages}
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this, as root, for every submission: the student's files are in
# $ROOT/submission, the kit in $ROOT/source, and the scores go to $ROOT/results/results.json.
# The units graded are the ones this bundle was made for, never what a submission says.
set -uo pipefail
ROOT=${{AUTOGRADER_ROOT:-/autograder}}
PYTHON=${{PYTHON:-python3}}
chmod -R go-rwx "$ROOT/source"     # the reference solution: for the grader's eyes only
mkdir -p "$ROOT/results"
exec "$PYTHON" "$ROOT/source/assign.py" grade "$ROOT/submission" --units {units} \\
    --results "$ROOT/results/results.json"
"""


def bundle_path(out):
    """Where `make --out hw1` writes the autograder: hw1-autograder.zip, beside the copy."""
    return os.path.abspath(out).rstrip(os.sep) + "-autograder.zip"


def gradescope_bundle(path, unit_names):
    """Write Gradescope's autograder zip: setup.sh (installing exactly what grading needs,
    pinned), run_autograder (grading /autograder/submission into /autograder/results/results.json
    on the units given here) and source/ (the kit: the reference and its cases). It holds the
    reference solution: give it to Gradescope, never to students. Refuses to replace a file."""
    import zipfile
    import safety
    if os.path.exists(path):
        safety.fail(f"{path} exists: move it away, or choose another --out")
    units = ",".join(n for n in list(UNIT_BY_NAME) + [STAGE] if n in unit_names)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, text in (("setup.sh", SETUP_SH.format(packages=" ".join(GRADER_PACKAGES))),
                               ("run_autograder", RUN_AUTOGRADER.format(units=units))):
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o755 << 16
                z.writestr(info, text)
            for name in BUNDLE_FILES:
                z.write(os.path.join(HERE, name), f"source/{name}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def leaks(folder, reference, unit_names):
    """(file, line) of every distinctive reference line (distinctive_lines) found in `folder`."""
    lines = set(distinctive_lines(reference, unit_names))
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith((".py", ".md", ".ipynb", ".txt")):
                path = os.path.join(root, name)
                text = open(path, encoding="utf-8", errors="replace").read()
                found += [(os.path.relpath(path, folder), x) for x in set(_norm_lines(text)) & lines]
    return found


def check_command(unit):
    return "python -m pytest -q " + " ".join(f"test_cdm.py::{t}" for t in unit.tests)


def assignment_md(unit_names):
    rows = []
    for k, unit in enumerate(UNITS, 1):
        if unit.name not in unit_names:
            continue
        where = ", ".join(f"`{f}`" for f in unit.functions)
        rows.append(f"## Exercise {k}: {unit.name} ({unit.points} point{'s' if unit.points > 1 else ''})\n\n"
                    f"*{unit.section}.* Implement {where} in `cdm.py`: {unit.task}. The docstrings give "
                    f"the formulas; each stub raises `NotImplementedError` until you replace it.\n\n"
                    f"Check it:\n\n```bash\n{check_command(unit)}\n```\n")
    if STAGE in unit_names:
        rows.append(f"## Exercise {len(UNITS) + 1}: {STAGE} ({STAGE_POINTS} points)\n\n*CDM §3; the whole "
                    f"pipeline.* {' '.join(STAGE_TASK.split())}\n")
    return ("# Assignment: Cascaded Diffusion Models, unit by unit\n\n"
            "Each exercise below is one piece of the paper in `cdm.py`, in the order the paper builds "
            "them: later exercises call earlier ones, so a later test can fail because of an earlier "
            "unit. The grader does not work that way: where one exercise's function calls another's, "
            "the grader answers that call with its own reference, so a mistake costs only the exercise "
            "it is in. The tests named under each exercise check your work here; the grader checks the "
            "same functions on fresh inputs it draws when it grades, so passing the tests is what to "
            "aim for, not a guarantee. Hand in `cdm.py` (and, for the stage, its flags file and "
            "figures). Set up as the README says, then work through them in order.\n\n" + "\n".join(rows))


# --- grade ----------------------------------------------------------------------------------------
# How a unit is graded (grading.py): the kit draws secret inputs, runs them through the reference
# here and through the student's cdm.py in a confined process (sandbox.py), and compares what came
# back. The verdict forms in this process; the student's code only ever returns numbers.
KIT_FILES = (SOURCE, "grading.py", "sandbox.py")
SOURCE_LIMIT = 5 << 20            # a student's cdm.py (the reference is 72 KB)


class GraderError(Exception):
    """The grader itself cannot grade here: reported in one line, and no scores are written."""


def graded_source(student, unit):
    """What one unit is graded on: the student's file as it is, or, when it does not parse, this
    unit's functions cut out of it by their indentation and put into the *blank* copy (every
    unit a stub: no reference body), so that a syntax error elsewhere costs only the units it is
    in. The other units' functions are never the reference's: where this unit's reference calls
    them, the grader answers those calls (grading.ORACLES)."""
    try:
        ast.parse(student)
        return student
    except (SyntaxError, ValueError):
        pass
    blank = stubbed_source(_reference_text(), set(UNIT_BY_NAME))
    cut = {}
    for f in UNIT_BY_NAME[unit].functions:
        text = _cut_by_indentation(student, f)
        if text is None:
            raise ValueError(f"{f} cannot be found in the student's {SOURCE}")
        cut[f] = text
    return replace_functions(blank, cut)


@functools.lru_cache(maxsize=1)
def _reference_text():
    with open(os.path.join(HERE, SOURCE), encoding="utf-8") as f:
        return f.read()


def _round_trip(value):
    """What the student's process receives: the value through the wire and back."""
    import grading
    return grading.decode(json.loads(json.dumps(grading.encode(value))), _reference_diffusion)


def _reference_diffusion(betas, variance, lambda_vlb, timesteps, prediction):
    import cdm
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not 2 <= len(betas) <= 100_001:
        raise ValueError("a diffusion of 1 to 100,000 steps")
    return cdm.GaussianDiffusion(betas, variance, float(lambda_vlb), timesteps=np.asarray(timesteps),
                                 prediction=prediction)


@functools.lru_cache(maxsize=64)
def unit_cases(unit, seed):
    """(inputs, expected outputs) of a unit's cases for `seed`: the inputs as the student's
    process will see them, the outputs the reference gives on them. (Cached: callers copy the
    inputs before applying anything to them.)"""
    import cdm
    import grading
    inputs = _round_trip(grading.prepare(cdm, unit.name, np.random.default_rng(seed)))
    return inputs, [grading.apply(cdm, unit.name, _round_trip(inp)) for inp in inputs]


def check_in_process(source, unit, seed=0):
    """Grade `source` on one unit in this process, with the same cases, oracles and comparison
    as `grade` but none of its containment: for the kit's own tests of wrong answers (trusted
    code only). Returns (cases agreeing, cases, first difference)."""
    import cdm
    import grading
    module = _module_from(source)

    def oracle(name):
        fn = getattr(*grading.owner_of(cdm, name))

        def call(*args, **kwargs):
            args = [_round_trip(a) if type(a).__name__ == "GaussianDiffusion" else a for a in args]
            return fn(*args, **kwargs)
        return call
    grading.install(module, grading.ORACLES.get(unit.name, ()), oracle)
    inputs, expected = unit_cases(unit, seed)
    results, errors = {}, {}
    for k, inp in enumerate(inputs):
        try:
            results[k] = _round_trip(grading.apply(module, unit.name, _round_trip(inp)))
        except Exception as e:
            errors[k] = f"{type(e).__name__}: {e}"
    diffs = grading.judge(expected, results, errors)
    first = next((f"case {k + 1}: {d}" for k, d in enumerate(diffs) if d), "")
    return diffs.count(""), len(inputs), first


def _module_from(source):
    import types
    module = types.ModuleType("cdm")
    module.__file__ = os.path.join(HERE, SOURCE)
    saved = sys.modules.get("cdm")
    sys.modules["cdm"] = module
    try:
        exec(compile(source, SOURCE, "exec"), module.__dict__)
    finally:
        if saved is not None:
            sys.modules["cdm"] = saved
    return module


def _deadline_read(fd, n, deadline):
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, min(n - len(data), 1 << 20))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _deadline_write(fd, data, deadline):
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [fd], [], left)[1]:
            raise TimeoutError
        view = view[os.write(fd, view[:1 << 16]):]


def _tail(path, n=4000):
    """The last n bytes of a file, as text ('' if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _require_confined(box):
    """After a confined process ended: raise GraderError if it never started confined."""
    why = box.confinement()
    if why:
        raise GraderError(f"the grader could not start a confined process here ({why}): see docs/teaching.md")


class Session:
    """One grading: a private scratch root, the sandbox layers this machine offers, and the
    confined processes of the units (one slot, i.e. one user id when root, per unit at once)."""

    def __init__(self, jobs):
        import sandbox
        self.layers = sandbox.protections()
        self.root = tempfile.mkdtemp(prefix="cdm-grade-")
        os.chmod(self.root, 0o711)                     # its units' users may enter, not list it
        self.slots = list(range(jobs))
        self.lock = threading.Lock()

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)

    @contextlib.contextmanager
    def scratch(self, name):
        """A free slot and a new scratch folder for one confined process, both given back after."""
        with self.lock:
            slot = self.slots.pop()
        folder = tempfile.mkdtemp(dir=self.root, prefix=f"{name}-")
        try:
            yield slot, folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            with self.lock:
                self.slots.append(slot)

    def run(self, unit_name, source, cases, timeout):
        """Run `cases` of a unit on `source` in a confined process. Returns ({case: output},
        {case: error text}, what it printed, how it ended)."""
        import grading
        import sandbox
        with self.scratch(unit_name) as (slot, scratch):
            with open(os.path.join(scratch, SOURCE), "w", encoding="utf-8") as f:
                f.write(source)
            shutil.copy2(os.path.join(HERE, "grading.py"), os.path.join(scratch, "grading.py"))
            to_r, to_w = os.pipe()
            from_r, from_w = os.pipe()
            box = sandbox.Sandbox(scratch, [sys.executable, "-I", "-B", os.path.join(scratch, "grading.py"),
                                            "worker", str(to_r), str(from_w)],
                                  slot=slot, pass_fds=(to_r, from_w), hidden=[HERE], layers=self.layers,
                                  cleanup=self.root, cpu_seconds=max(timeout, 10) + 5)
            results, errors, ended = {}, {}, "finished"
            try:
                box.start()
                os.close(to_r)
                os.close(from_w)
                deadline = time.monotonic() + timeout
                os.set_blocking(to_w, False)
                job = json.dumps(grading.encode({"unit": unit_name, "cases": cases})).encode()
                _deadline_write(to_w, len(job).to_bytes(8, "little") + job, deadline)
                while True:
                    msg = grading.read_message(lambda n: _deadline_read(from_r, n, deadline), _reference_diffusion)
                    kind = msg.get("type") if isinstance(msg, dict) else None
                    if kind == "done":
                        break
                    if kind in ("result", "error") and isinstance(msg.get("k"), int):
                        (results if kind == "result" else errors).setdefault(msg["k"], msg.get("value", msg.get("error")))
                    elif kind in ("oracle", "vjp"):
                        import cdm
                        try:
                            reply = {"type": "answer", "value": grading.answer(cdm, unit_name, msg)}
                        except Exception as e:
                            reply = {"type": "refused", "error": f"{type(e).__name__}: {str(e)[:200]}"}
                        data = json.dumps(grading.encode(reply)).encode()
                        _deadline_write(to_w, len(data).to_bytes(8, "little") + data, deadline)
                    else:
                        raise grading.WireError("an unknown message")
            except TimeoutError:
                ended = f"timed out after {timeout} s (an endless loop?)"
            except EOFError:
                ended = "its process ended before answering every case"
            except (grading.WireError, OSError, KeyError) as e:
                ended = f"its process broke the grading protocol ({e})"
            finally:
                box.stop()
                box.wait()
                for fd in (to_w, from_r):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                _require_confined(box)
            return results, errors, _tail(os.path.join(scratch, "output.txt")), ended

    def command(self, name, files, argv, timeout, cpu_seconds, threads=1, collect=None):
        """Run a command (argv, in a scratch folder holding `files`: {name: text}) confined like a
        unit, for at most `timeout` seconds and `cpu_seconds` of CPU. collect(scratch) picks what
        the grader keeps before the folder goes. Returns (exit status, what it printed, how it
        ended)."""
        import sandbox
        with self.scratch(name) as (slot, scratch):
            for rel, text in files.items():
                with open(os.path.join(scratch, rel), "w", encoding="utf-8") as f:
                    f.write(text)
            box = sandbox.Sandbox(scratch, argv, slot=slot, hidden=[HERE], layers=self.layers, cleanup=self.root,
                                  cpu_seconds=cpu_seconds, threads=threads)
            box.start()
            try:
                code, ended = box.proc.wait(timeout), "finished"
            except subprocess.TimeoutExpired:
                code, ended = None, f"timed out after {timeout} s"
            finally:
                box.stop()
                box.wait()
            _require_confined(box)
            if collect is not None:
                collect(scratch)
            return code, _tail(os.path.join(scratch, "output.txt")), ended

    def canary(self):
        """Prove that a confined process starts here, loads torch and numpy, runs a module and
        answers, before anyone is graded; report what it could reach. A copy with every unit
        blank (no reference body) is graded on the first unit: every case must come back as an
        error, none missing."""
        unit = UNITS[0]
        blank = stubbed_source(_reference_text(), set(UNIT_BY_NAME))
        inputs, _ = unit_cases(unit, 0)
        probe = ("\nimport os as _os, socket as _socket\n"
                 f"for _p in ({os.path.join(HERE, SOURCE)!r}, {os.path.join(HERE, 'assign.py')!r}):\n"
                 "    try:\n        open(_p).read(1); print('CANARY read', _p)\n    except OSError:\n        pass\n"
                 f"try:\n    open({os.path.join(HERE, '.canary-write')!r}, 'w').close(); print('CANARY wrote the kit')\n"
                 "except OSError:\n    pass\n"
                 "try:\n    _s = _socket.create_connection(('127.0.0.1', 9), timeout=1); print('CANARY network')\n"
                 "except OSError as _e:\n    print('CANARY network' if isinstance(_e, ConnectionRefusedError) else '')\n")
        results, errors, printed, ended = self.run(unit.name, blank + probe, inputs, 120)
        try:
            os.remove(os.path.join(HERE, ".canary-write"))
        except OSError:
            pass
        if ended != "finished" or len(errors) != len(inputs) or results:
            raise GraderError(f"a confined process could not run the blank copy here ({ended}; "
                              f"{len(errors)} of {len(inputs)} cases answered): {printed.strip()[-300:]}")
        return {"reference readable": f"CANARY read {os.path.join(HERE, SOURCE)}" in printed,
                "kit writable": "CANARY wrote the kit" in printed, "network": "CANARY network" in printed}


def check_stage_flags(text):
    """The student's flags for train_sr.py, from their flags file: (flags, "") when every one is
    a flag the stage assignment lets them set and train_sr.py accepts them, else (None, why)."""
    import contextlib
    import io
    import shlex
    import train_sr
    try:
        flags = shlex.split(text, comments=True)
    except ValueError as e:
        return None, f"{STAGE_FLAGS_FILE} cannot be read as flags ({e})"
    named = []
    for token in flags:
        if token.startswith("-"):
            try:
                float(token)
            except ValueError:
                named.append(token.split("=")[0])
    refused = [n for n in named if n not in STAGE_ALLOWED]
    if refused:
        return None, (f"{STAGE_FLAGS_FILE}: {', '.join(refused)} may not be set here (the grader fixes the preset, "
                      f"data, output, device and seed); allowed: {', '.join(sorted(STAGE_ALLOWED))}")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = train_sr.parse_args(flags + ["--preset", "demo16", "--out", "run", "--device", "cpu"])
    except SystemExit as e:
        said = (err.getvalue().strip() or str(e.code or "")).splitlines() or ["invalid flags"]
        return None, f"{STAGE_FLAGS_FILE}: train_sr.py refuses them: {said[-1].removeprefix('error: ')[:300]}"
    if args.sample_steps > 100 or args.T > 4000:
        return None, f"{STAGE_FLAGS_FILE}: at most 100 sampling steps and T = 4000, for grading to finish"
    return flags, ""


def load_stage_checkpoint(path):
    """The stage a student's run wrote, loaded by the kit's own code (weights only: no pickle)
    after its configuration is checked to be the assignment's stage, of a size the grader can
    sample: (stage, "") or (None, why)."""
    import cdm
    import safety
    if os.path.getsize(path) > 200 << 20:
        return None, "its checkpoint is larger than 200 MB"
    try:
        ckpt = safety.load_checkpoint(path)
        cfg = ckpt["config"]
        m, aug = cfg["model"], cfg["augment"]
        checks = [(isinstance(m, dict), "its model config is not a table"),   # unknown entries: load_stage
                  (m.get("resolution") == 16 and m.get("low_res") == 8, "it is not an 8->16 stage"),
                  (int(m.get("model_channels", 0)) <= 256 and int(m.get("num_res_blocks", 0)) <= 6
                   and len(m.get("channel_mult", ())) <= 4, "its network is larger than the grader samples"),
                  (isinstance(aug, dict) and aug.get("type") == "noise", "it was not trained with noise augmentation"),
                  (int(cfg["diffusion"]["T"]) <= 4000 and int(cfg["sample_steps"]) <= 100
                   and cfg.get("sampler", "ancestral") in cdm.SAMPLERS, "its diffusion or sampler settings are out of range")]
        for ok, why in checks:
            if not ok:
                return None, why
        return safety.load_stage(path), ""
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        return None, f"its checkpoint cannot be used: {str(e)[:300]}"


def score_stage(stage, seed, classifier_cache, n=STAGE_SAMPLES):
    """The stage's quality on n held-out real images (the shapes test split) that the grader
    picks: their 8x8 copies super-resolved by the stage with its own sampler, steps and s, through
    the kit's own sampling code (sample.py --low_res's path) -> low-res consistency (dB), class
    accuracy and FID on the kit's classifier, against the n real 16x16 images."""
    import cdm
    import data
    import evaluate
    import sample
    test = data.load_dataset("shapes", 16, "test", seed=0)
    pick = torch.from_numpy(np.random.default_rng(seed).choice(len(test.y), n, replace=False))
    real, labels = test.x[pick].contiguous(), test.y[pick].clone()
    given = data.to_uint8(cdm.downsample(data.to_float(real), 8))
    outs = []
    for j, start in enumerate(range(0, n, 64)):
        chunk = slice(start, start + 64)
        xs = cdm.sample_cascade([stage], labels[chunk], steps=[stage.config["sample_steps"]],
                                sampler=[stage.config.get("sampler", "ancestral")], s=[stage.sample_s],
                                truncated=False, eta=0.0, generator=sample.chunk_generator(seed, j, torch.device("cpu")),
                                progress=False, guidance=[0.0], low_res=data.to_float(given[chunk]))
        outs.append(data.to_uint8(xs[-1].float()))
    out = torch.cat(outs)
    if not torch.isfinite(out.float()).all():
        raise ValueError("the stage's samples are not finite")
    clf = evaluate.get_classifier("shapes", 16, classifier_cache, test.num_classes, seed=0)
    f_out, _ = evaluate.embed_and_probs(clf, out)
    f_real, _ = evaluate.embed_and_probs(clf, real)
    return {"consistency_db": sample.consistency([given, out])[0],
            "accuracy": (evaluate.predict(clf, out) == labels).float().mean().item(),
            "fid": evaluate.fid(f_out, f_real)}


def read_submission(folder, name, limit):
    """The bytes of a file a student handed in, read only if it is a regular file inside their
    folder, not through a link (a cdm.py that is a link to /etc/shadow must not be read by a grader
    running as root) and at most `limit` bytes. Raises ValueError saying which it is not."""
    path = os.path.join(folder, name)
    if os.path.realpath(os.path.dirname(path)) != os.path.join(os.path.realpath(folder), os.path.dirname(name)).rstrip("/"):
        raise ValueError(f"{name} is not inside the submission (a linked folder)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ValueError(f"no {name}") from None
    except OSError as e:
        raise ValueError(f"{name} cannot be read ({'it is a link' if e.errno == 40 else e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{name} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{name} is larger than {limit:,} bytes")
    return data


def figure_readable(path):
    """'' when `path` is a PNG a person can read (decodes, at least 200 x 150 pixels, not one
    flat colour), else what is wrong with it."""
    import io
    import warnings
    from PIL import Image
    try:
        raw = read_submission(os.path.dirname(path), os.path.basename(path), 20 << 20)
    except ValueError as e:
        return "missing" if str(e).startswith("no ") else str(e)
    Image.MAX_IMAGE_PIXELS = 50_000_000
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with Image.open(io.BytesIO(raw)) as img:
                if img.format != "PNG":
                    return f"a {img.format} file, not a PNG"
                img.load()
                w, h = img.size
                gray = np.asarray(img.convert("L"), dtype=np.float64)
    except Exception as e:
        return f"cannot be read as an image ({type(e).__name__})"
    if w < 200 or h < 150:
        return f"only {w} x {h} pixels"
    if gray.std() < 2:
        return "a single flat colour"
    return ""


STAGE_FILES = ("train_sr.py", "trainer.py", "data.py", "safety.py")


def grade_stage(folder, session, seed, samples=STAGE_SAMPLES, cpu_seconds=STAGE_CPU_SECONDS, classifier_cache=None):
    """The stage assignment: (points, out of, what was measured). Its flags file is checked, the
    stage trained in the sandbox from those flags with the student's cdm.py (the kit's own
    training scripts), its checkpoint scored by the kit's code here; the figures looked at."""
    points, lines = 0.0, []
    for fig in STAGE_FIGURES:
        inside = os.path.realpath(os.path.join(folder, os.path.dirname(fig))) == os.path.join(
            os.path.realpath(folder), os.path.dirname(fig))
        why = figure_readable(os.path.join(folder, fig)) if inside else "not inside the submission (a linked folder)"
        points += 0.5 * (not why)
        lines.append(f"{fig}: {why or 'present and readable'} ({0.5 * (not why):g} of 0.5)")
    try:
        text = read_submission(folder, STAGE_FLAGS_FILE, 4000).decode("utf-8")
    except ValueError as e:
        if not str(e).startswith("no "):
            return points, STAGE_POINTS, "\n".join(lines + [str(e)])
        text = ""
        lines.append(f"no {STAGE_FLAGS_FILE}: the demo's defaults")
    except UnicodeDecodeError:
        return points, STAGE_POINTS, "\n".join(lines + [f"{STAGE_FLAGS_FILE} is not text"])
    flags, why = check_stage_flags(text)
    if flags is None:
        return points, STAGE_POINTS, "\n".join(lines + [why])
    try:
        student = read_submission(folder, SOURCE, SOURCE_LIMIT).decode("utf-8", "replace")
    except ValueError as e:
        return points, STAGE_POINTS, "\n".join(lines + [f"nothing to train with: {e}"])
    files = {SOURCE: student}
    for name in STAGE_FILES:
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            files[name] = f.read()
    argv = ["--preset", "demo16", *flags, "--out", "run", "--device", "cpu", "--no_progress", "--seed", str(seed % 2 ** 31)]
    launcher = ("import sys, runpy; sys.path.insert(0, '.'); sys.argv = ['train_sr.py'] + " + repr(argv)
                + "; runpy.run_path('train_sr.py', run_name='__main__')")
    kept = tempfile.mkdtemp(prefix="cdm-grade-stage-")
    try:
        def collect(scratch):
            src = os.path.join(scratch, "run", "ckpt.pt")
            if os.path.isfile(src) and not os.path.islink(src) and os.path.getsize(src) <= 200 << 20:
                shutil.copyfile(src, os.path.join(kept, "ckpt.pt"))
        t0 = time.time()
        code, printed, ended = session.command(STAGE, files, [sys.executable, "-I", "-B", "-c", launcher],
                                               timeout=cpu_seconds + 120, cpu_seconds=cpu_seconds, threads=2,
                                               collect=collect)
        if code != 0 or not os.path.isfile(os.path.join(kept, "ckpt.pt")):
            why = ended if ended != "finished" else (
                f"it used up its {cpu_seconds} CPU seconds" if code in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU,
                                                                           128 + signal.SIGKILL) else f"training exited with status {code}")
            return points, STAGE_POINTS, "\n".join(lines + [f"the stage did not train: {why}", printed[-1500:]])
        stage, why = load_stage_checkpoint(os.path.join(kept, "ckpt.pt"))
        if stage is None:
            return points, STAGE_POINTS, "\n".join(lines + [f"the stage trained but {why}"])
        points += 1
        lines.append(f"trained within the budget of {cpu_seconds} CPU seconds ({time.time() - t0:.0f} s): 1 of 1")
        try:
            got = score_stage(stage, seed, classifier_cache or os.path.join(kept, "classifier.pt"), samples)
        except (ValueError, RuntimeError) as e:
            return points, STAGE_POINTS, "\n".join(lines + [f"its samples could not be scored: {e}"])
        for key, what, better in (("consistency_db", "low-res consistency (dB)", "ge"), ("accuracy", "class accuracy", "ge"),
                                  ("fid", "FID on the kit's classifier", "le")):
            want = STAGE_THRESHOLDS[key]
            ok = got[key] >= want if better == "ge" else got[key] <= want
            points += ok
            lines.append(f"{what}: {got[key]:.3g} ({'>=' if better == 'ge' else '<='} {want:g} needed): {int(ok)} of 1")
    finally:
        shutil.rmtree(kept, ignore_errors=True)
    return points, STAGE_POINTS, "\n".join(lines)


def describe_protections(layers, reach):
    on = [k for k in ("user", "landlock", "namespaces", "limits", "supervisor") if layers.get(k)]
    names = {"user": "a separate user", "landlock": "Landlock", "namespaces": "user/PID/network namespaces",
             "limits": "resource limits", "supervisor": "a supervisor that ends every process it starts"}
    text = "student code ran confined by " + ", ".join(names[k] for k in on)
    gaps = [k for k, v in reach.items() if v]
    return text + ("; WARNING, it could still reach: " + ", ".join(gaps) if gaps else
                   "; it could not read the reference, write to the kit, or open a connection")


def preflight(folder, units, seed, stage=False):
    """Everything the grader needs, checked before anyone is graded: raises GraderError. The
    reference's outputs on this grading's cases are computed here (and kept: unit_cases)."""
    for name in KIT_FILES + ((*STAGE_FILES, "evaluate.py", "sample.py") if stage else ()):
        path = os.path.join(HERE, name)
        if not os.access(path, os.R_OK):
            raise GraderError(f"the kit's {path} is missing or unreadable: reinstall the kit")
    if not sys.platform.startswith("linux"):
        raise GraderError("grading runs student code confined by Linux features: grade on Linux "
                          "(Gradescope's containers are)")
    for k, unit in enumerate(units):                     # the reference passes its own cases
        try:
            unit_cases(unit, seed + k)
        except Exception as e:
            raise GraderError(f"the kit's reference fails its own cases for {unit.name} "
                              f"({type(e).__name__}: {e}): a broken install?") from None


def grade(folder, timeout=120, jobs=None, results_path=None, unit_names=None):
    """Grade the units of the copy in `folder` (those it was made with, unless named); print
    the table; write results.json. Nothing is written when the grader cannot grade."""
    import safety
    if not os.path.isdir(folder):
        safety.fail(f"{folder} is not a folder: give the folder `assign.py make` wrote")
    unit_names = unit_names or assigned_units(folder)
    unknown = [u for u in unit_names if u not in UNIT_BY_NAME and u != STAGE]
    if unknown:
        safety.fail(f"--units: no unit {', '.join(unknown)}; the units are {', '.join(UNIT_BY_NAME)}, {STAGE}")
    units = [u for u in UNITS if u.name in unit_names]
    results_path = results_path or os.path.join(folder, "results.json")
    safety.writable_file(results_path, "--results", overwrite=True)
    jobs = max(1, jobs or min(2, os.cpu_count() or 1))
    torch.set_num_threads(1)              # the cores are the confined processes'; this one mostly waits
    t0 = time.time()
    session = None
    seed = secrets.randbits(63)
    try:
        preflight(folder, units, seed, STAGE in unit_names)
        session = Session(jobs)
        if os.geteuid() == 0 and not (session.layers["user"] or session.layers["landlock"]):
            raise GraderError("grading as root here would run student code as root: this machine has no "
                              "Landlock, and Python is not readable by others for a separate user; grade as an "
                              "ordinary user, or install Python where others can read it (docs/teaching.md)")
        reach = session.canary()
        protection = describe_protections(session.layers, reach)
        if any(reach.values()):
            print(f"warning: {protection}", file=sys.stderr)
        try:
            student = read_submission(folder, SOURCE, SOURCE_LIMIT).decode("utf-8", "replace")
        except ValueError as e:
            student, missing = None, f"not graded: {e}"
        graded = [None] * len(units)

        def one(k):
            unit = units[k]
            if student is None:
                graded[k] = (0, 1, missing)
                return
            inputs, expected = unit_cases(unit, seed + k)
            try:
                source = graded_source(student, unit.name)
            except ValueError as e:
                graded[k] = (0, len(inputs), f"not graded: {e}")
                return
            results, errors, printed, ended = session.run(unit.name, source, inputs, timeout)
            import grading
            diffs = grading.judge(expected, results, errors)
            passed = diffs.count("")
            lines = [f"case {i + 1}: {d}" for i, d in enumerate(diffs) if d]
            if ended != "finished":
                lines.append(ended)
            if -1 in errors:
                lines.append(str(errors[-1])[-1500:])
            if printed.strip() and passed < len(expected):
                lines.append("it printed:\n" + printed[-1500:])
            graded[k] = (passed, len(expected), "\n".join(lines))

        failures = []

        def guarded(k):
            try:
                one(k)
            except GraderError as e:
                failures.append(str(e))
            except Exception as e:                      # a fault of the grader, not the student
                failures.append(f"grading {units[k].name} failed inside the grader: {type(e).__name__}: {e}")
        todo = list(range(len(units)))
        threads = []
        for _ in range(min(jobs, len(todo))):
            def loop():
                while True:
                    with session.lock:
                        if not todo:
                            return
                        k = todo.pop(0)
                    guarded(k)
            threads.append(threading.Thread(target=loop, daemon=True))
            threads[-1].start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        if failures:
            raise GraderError(failures[0])
        if STAGE in unit_names:                         # alone: its CPU time is the student's
            stage = grade_stage(folder, session, seed)
    except GraderError as e:
        safety.fail(f"{e}; no scores were written")
    finally:
        if session is not None:
            session.close()
    tests, lines = [], [f"{'unit':<16} {'cases passed':>12} {'points':>8}"]
    for unit, (passed, total, output) in zip(units, graded):
        k = UNITS.index(unit) + 1
        score = round(unit.points * passed / total, 2)
        lines.append(f"{k:>2}. {unit.name:<14} {passed:>4} of {total:<4} {score:>5g} / {unit.points}")
        tests.append({"name": f"{k}. {unit.name} ({unit.section})", "score": score, "max_score": unit.points,
                      "output": output if passed < total else f"{total} of {total} cases agree with the reference"})
    if STAGE in unit_names:
        passed, total, output = stage
        lines.append(f"{len(UNITS) + 1:>2}. {STAGE:<14} {'':>12} {passed:>5g} / {total}")
        tests.append({"name": f"{len(UNITS) + 1}. {STAGE} (train and sample the 8->16 stage)", "score": passed,
                      "max_score": total, "output": output})
    total_score = round(sum(t["score"] for t in tests), 2)
    max_score = sum(t["max_score"] for t in tests)
    lines.append(f"{'total':<16} {'':>12} {total_score:>5g} / {max_score}")
    print("\n".join(lines))
    print(protection)
    safety.write_json(results_path, {"score": total_score, "execution_time": round(time.time() - t0, 1),
                                     "output": protection, "tests": tests})
    print(f"wrote {results_path}")
    return tests


def assigned_units(folder):
    """The units a copy was made with (its assignment.json), or all of them. (On Gradescope the
    list comes from the bundle, never from what a student uploads: see gradescope_bundle.)"""
    try:
        with open(os.path.join(folder, ASSIGNED), encoding="utf-8") as f:
            return [n for n in json.load(f)["units"] if n in UNIT_BY_NAME or n == STAGE]
    except (OSError, ValueError, KeyError, TypeError):
        return list(UNIT_BY_NAME)


def main(argv=None):
    if MISSING:
        raise SystemExit(f"error: the grader cannot run: the Python package {MISSING!r} is not installed "
                         f"for {sys.executable}; install the kit's requirements first "
                         "(pip install -r requirements.txt); nothing was graded or written")
    import safety
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write a copy for students with the chosen units blanked")
    m.add_argument("--units", default=",".join(UNIT_BY_NAME), help="comma-separated units (default: all)")
    m.add_argument("--out", required=True, help="the folder to write (new)")
    g = sub.add_parser("grade", help="grade a copy: a table, and results.json (Gradescope's format)")
    g.add_argument("folder", help="the students' copy, as `make` wrote it and they filled it in")
    g.add_argument("--timeout", type=int, default=120, help="seconds each unit's tests may take")
    g.add_argument("--jobs", type=int, default=None, help="units graded at once (default: the cores, up to 4)")
    g.add_argument("--results", default=None, help="where results.json goes (default: FOLDER/results.json; "
                                                   "Gradescope: /autograder/results/results.json)")
    g.add_argument("--units", default=None, help="comma-separated units to grade (default: those the "
                                                 "copy was made with, from its assignment.json)")
    sub.add_parser("list", help="the units, their paper sections and their tests")
    a = p.parse_args(argv)
    if a.command == "make":
        names = [u.strip() for u in a.units.split(",") if u.strip()]
        out = make(a.out, names)
        blanked = len([n for n in names if n in UNIT_BY_NAME])
        print(f"wrote {out}/ with {blanked} unit{'s' if blanked != 1 else ''} blanked"
              f"{' and the stage assignment' if STAGE in names else ''}; see {out}/ASSIGNMENT.md")
        print(f"wrote {bundle_path(out)}: Gradescope's autograder (it holds the reference: not for students)")
    elif a.command == "grade":
        if a.timeout < 1:
            safety.fail("--timeout must be at least 1 second")
        grade(a.folder, a.timeout, a.jobs, a.results,
              [u.strip() for u in a.units.split(",") if u.strip()] if a.units else None)
    else:
        for k, u in enumerate(UNITS, 1):
            print(f"{k:>2}. {u.name:<14} {u.section:<32} {', '.join(u.functions)}\n    tests: {', '.join(u.tests)}")
        print(f"{len(UNITS) + 1:>2}. {STAGE:<14} {'CDM §3, graded on results':<32} train and sample the 8->16 stage "
              f"({STAGE_POINTS} points)")


if __name__ == "__main__":
    if MISSING:
        main()
    import safety
    safety.run_script(main)
