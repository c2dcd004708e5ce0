"""cdm.py -- Cascaded Diffusion Models, the paper in one file.

Ho, Saharia, Chan, Fleet, Norouzi, Salimans. "Cascaded Diffusion Models for High Fidelity Image
Generation". arXiv 2106.15282 (v3), JMLR 23(47), 2022.  Cited below as "CDM §n": §3 (its opening
text) defines the cascade, the SR model's inputs and Gaussian noise augmentation; §3.1 is blurring
augmentation, §3.2 truncated and §3.3 non-truncated conditioning augmentation; §4 the experiments.
docs/paper.md maps every section, figure and predecessor's equation we cite to the code.
It builds on:
  DDPM  = Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv 2006.11239)
  iDDPM = Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (2102.09672)
  ADM   = Dhariwal, Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis" (2105.05233)
  DDIM  = Song, Meng, Ermon 2020, "Denoising Diffusion Implicit Models" (2010.02502)
  SR3   = Saharia et al. 2021, "Image Super-Resolution via Iterative Refinement" (2104.07636)
  PD    = Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
          (2202.00512): the velocity parameterisation, which our demo stages use (a deviation),
          and progressive distillation (distill.py)
  DPM++ = Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
          Diffusion Probabilistic Models" (2211.01095): the multistep ODE solver DPM-Solver++(2M);
          its SDE variant is Lu's later one, added to the diffusers library in 2023 (pull request
          #3344, "sde-dpmsolver++"), not in the paper
  EDM   = Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
          Generative Models" (2206.00364): Heun's second-order ODE sampler (Algorithm 1)

Read top to bottom:
  1. noise schedules                      (DDPM §4, iDDPM §3.2)
  2. Gaussian diffusion: q, posterior, losses, the denoiser and the samplers of DDPM and DDIM
  3. conditioning augmentation           (CDM §3: Gaussian noise; §3.1: Gaussian blur)
  4. the U-Net                            (DDPM App. B, iDDPM, ADM §3; CDM §3 for the SR inputs)
  5. cascade sampling                     (CDM §3, Fig. 1; §3.2, §3.3: the two handovers)
  6. beyond the paper: ODE solvers (DPM++, EDM), their noise levels, classifier-free guidance,
     progressive distillation (PD)
  7. checkpoints: save the config and the tensors; load them back

Vocabulary (the paper's symbols, used everywhere in this project):
  x0        a clean image at a stage's resolution, in [-1, 1], shape (B, 3, H, W)
  t         diffusion step, an integer in {1, ..., T}; t = 0 means "clean" (x_0)
  x_t       the noised image  sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
  eps       standard Gaussian noise; the paper's network predicts it: eps_theta(x_t, t, ...)
            (or, our option, x0 or the velocity sqrt(abar_t) eps - sqrt(1 - abar_t) x0: see target)
  abar      alphas_cumprod, abar_t = prod_{i<=t} (1 - beta_i), abar_0 = 1
  c         class label, int64 (B,)
  z, z0     the low-resolution conditioning image of a super-resolution (SR) stage; z0 is clean
  s         augmentation time: z_s = sqrt(abar_s) z0 + sqrt(1 - abar_s) eps (CDM §3), s = 0: none
  T         number of diffusion steps of a model

Index convention (a common source of off-by-one bugs): every schedule array here has length T + 1
and is indexed by the paper's t, with entry 0 describing the clean data (abar_0 = 1, beta_0 = 0).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional: without it loops just run silently
    def tqdm(iterable, **kwargs):
        return iterable


# =============================================================================================
# 1. Noise schedules
# =============================================================================================

def linear_schedule(T, beta_1=1e-4, beta_T=0.02):
    """Linear betas, DDPM §4: beta_t rises linearly from 1e-4 to 0.02 over T = 1000 steps.

    For other T the end points are scaled by 1000 / T (as in the iDDPM code), so that the
    schedule describes the same continuous process whatever T is. Returns float64 (T + 1,)
    with beta_0 = 0 by our index convention.
    """
    scale = 1000.0 / T
    betas = np.linspace(scale * beta_1, scale * beta_T, T, dtype=np.float64)
    return np.concatenate([[0.0], betas])


def cosine_schedule(T, offset=0.008, max_beta=0.999):
    """Cosine schedule, iDDPM §3.2, Eq. (17):

        abar_t = f(t) / f(0),   f(t) = cos^2( (t/T + offset) / (1 + offset) * pi/2 ),
        beta_t = min(1 - abar_t / abar_{t-1}, 0.999)

    The clip at 0.999 stops beta_T = 1 (a singularity at t = T). Returns float64 (T + 1,).
    """
    f = lambda t: np.cos((t / T + offset) / (1 + offset) * np.pi / 2) ** 2
    t = np.arange(T + 1, dtype=np.float64)
    abar = f(t) / f(0.0)
    betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
    return np.concatenate([[0.0], betas])


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}
PREDICTIONS = ("eps", "x0", "velocity")  # what the network outputs: GaussianDiffusion.target
SAMPLERS = ("ancestral", "ddim", "dpm++2m", "dpm++2m-sde", "heun")  # GaussianDiffusion.sample
SPACINGS = ("uniform", "karras")                      # GaussianDiffusion.respace
# Each sampler's steps: iDDPM's even spacing in t for the stochastic samplers, EDM's noise levels
# for the ODE solvers (Heun with steps even in t fails on a cosine schedule, whose sigma~_T is
# about 2e4: test_ode_samplers_converge_at_their_order checks them on a Gaussian's exact eps).
SPACING_OF = {"ancestral": "uniform", "ddim": "uniform", "dpm++2m": "karras", "dpm++2m-sde": "karras",
              "heun": "karras"}


def check_sampler(sampler):
    """Refuse a sampler that is not one of SAMPLERS (every entry point asks here)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler}: samplers must be from {', '.join(SAMPLERS)}")


def make_betas(schedule, T):
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    if int(T) < 1:
        raise ValueError(f"the number of diffusion steps T must be >= 1, got {T}")
    return SCHEDULES[schedule](int(T))


# =============================================================================================
# 2. Gaussian diffusion
# =============================================================================================

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL( N(mean1, e^logvar1) || N(mean2, e^logvar2) ), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x0, mean, log_scale):
    """log p(x0 | x_1) for 8-bit data: DDPM §3.3, Eq. (13), the decoder L_0.

    Pixel values {0..255} map to 256 bins of width 2/255 centred on x0 in [-1, 1]; the edge bins
    extend to -inf and +inf so the probabilities sum to one:

        p(x0 | x_1) = Phi((x0 + 1/255 - mean) / sd) - Phi((x0 - 1/255 - mean) / sd)

    with Phi the standard normal CDF. Elementwise, in nats.
    """
    inv_sd = torch.exp(-log_scale)
    upper = (x0 - mean + 1.0 / 255) * inv_sd
    lower = (x0 - mean - 1.0 / 255) * inv_sd
    log_cdf_upper = torch.special.log_ndtr(upper)          # log Phi(upper), for the x0 = -1 bin
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)  # log(1 - Phi(lower)), for x0 = +1
    cdf_delta = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    return torch.where(
        x0 < -0.999, log_cdf_upper,
        torch.where(x0 > 0.999, log_one_minus_cdf_lower, torch.log(cdf_delta.clamp(min=1e-12))))


def mean_flat(x):
    """Mean over every dimension but the batch: per-example losses, (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def spaced_timesteps(T, K, include=()):
    """K of the steps {1..T}, evenly spaced and always containing T (iDDPM §4), plus `include`:
    round(linspace(1, T, K)), and for K = 1 the single step T (one jump from x_T ~ N(0, I) to x_0).

    `include` is how truncated sampling (CDM §3.2) makes the chain pass through step s exactly.
    """
    K = int(K)
    if not 1 <= K <= T:
        raise ValueError(f"cannot take {K} sampling steps from a model with T = {T}; use 1..{T}")
    kept = set(np.round(np.linspace(1, T, K) if K > 1 else [T]).astype(int).tolist()) | {int(i) for i in include}
    if min(kept) < 1 or max(kept) > T:
        raise ValueError(f"steps to include must lie in 1..{T}, got {sorted(include)}")
    return sorted(kept)


def posterior_coefficients(betas):
    """The posterior q(x_{t-1} | x_t, x0) = N(mu~_t(x_t, x0), beta~_t I), DDPM Eqs. (6)-(7), as
    three float64 arrays indexed by t = 0..T (betas: (T + 1,), beta_0 = 0):

        beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t                       (variance)
        mu~_t   = sqrt(abar_{t-1}) beta_t / (1 - abar_t) * x0                     (coef_x0)
                + sqrt(1 - beta_t) (1 - abar_{t-1}) / (1 - abar_t) * x_t          (coef_xt)

    with abar_t = prod_{i<=t} (1 - beta_i), abar_0 = 1. At t = 0 (1 - abar_0 = 0) all three are 0.
    Returns (variance, coef_x0, coef_xt)."""
    betas = np.asarray(betas, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])                     # abar_{t-1}
    with np.errstate(divide="ignore", invalid="ignore"):
        one_minus = 1.0 - abar
        variance = np.where(one_minus > 0, (1 - abar_prev) / one_minus * betas, 0)
        coef_x0 = np.where(one_minus > 0, np.sqrt(abar_prev) * betas / one_minus, 0)
        coef_xt = np.where(one_minus > 0, np.sqrt(1 - betas) * (1 - abar_prev) / one_minus, 0)
    return variance, coef_x0, coef_xt


class GaussianDiffusion:
    """The forward process q, the reverse process p_theta, their losses and samplers.

    betas: float64 array (T + 1,), beta_0 = 0. variance: "fixed" (Sigma = beta~_t, DDPM §3.2) or
    "learned" (the network outputs v and Sigma interpolates beta and beta~, iDDPM §3.1), trained
    with L_simple or L_hybrid respectively. `timesteps[i]` is the step of the *training* schedule
    that index i of this (possibly respaced) schedule stands for: it is what the network is told.
    """

    def __init__(self, betas, variance="fixed", lambda_vlb=0.001, timesteps=None, prediction="eps"):
        if variance not in ("fixed", "learned"):
            raise ValueError(f"variance must be 'fixed' or 'learned', got {variance!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        betas = np.asarray(betas, dtype=np.float64)
        assert betas[0] == 0.0 and np.all(betas[1:] > 0) and np.all(betas <= 1)
        self.T = len(betas) - 1
        self.variance, self.lambda_vlb, self.prediction = variance, lambda_vlb, prediction
        self.timesteps = np.arange(self.T + 1) if timesteps is None else np.asarray(timesteps)
        # Everything below is float64 and indexed by t = 0..T (entry 0: the clean data).
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)                      # abar_t, abar_0 = 1
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)            # x_t = sqrt(abar_t) x0
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1 - self.alphas_cumprod)  # + sqrt(1 - abar_t) eps
        (self.posterior_variance, self.posterior_mean_coef_x0,
         self.posterior_mean_coef_xt) = posterior_coefficients(betas)
        # beta~_1 = 0, so log beta~_1 = -inf: borrow beta~_2 for the log, as iDDPM does. This only
        # matters for the decoder term L_0 and for the learned-variance interpolation at t = 1.
        pv = self.posterior_variance.copy()
        pv[1] = pv[2] if self.T >= 2 else betas[1]
        pv[0] = pv[1]
        self.posterior_log_variance_clipped = np.log(pv)
        self.log_betas = np.log(np.where(betas > 0, betas, betas[1]))
        self._cache = {}

    # --- tiny helper: pick per-example coefficients and broadcast them over (C, H, W) ---------
    def _at(self, name, t, x):
        key = (name, x.device)
        if key not in self._cache:
            self._cache[key] = torch.as_tensor(getattr(self, name), dtype=torch.float32,
                                               device=x.device)
        return self._cache[key][t].view(-1, *([1] * (x.ndim - 1)))

    def respace(self, K, include=(), spacing="uniform"):
        """Respaced schedule, iDDPM §4: keep K of the T steps, recompute beta from abar.
        spacing: "uniform" in t (iDDPM; spaced_timesteps) or "karras" (EDM; karras_timesteps).

        For kept steps t_1 < ... < t_K:  beta_i = 1 - abar_{t_i} / abar_{t_{i-1}},  abar_{t_0} = 1,
        so the new chain's abar at index i equals the old abar at t_i exactly. The network is still
        called with the original t_i (self.timesteps). K = T reproduces the schedule.
        """
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        kept = (spaced_timesteps(self.T, K, include) if spacing == "uniform"
                else karras_timesteps(self.alphas_cumprod, K, include))
        return self.on_steps(kept)

    def on_steps(self, kept):
        """The chain through the given steps t_1 < ... < t_K of this schedule (what respace keeps;
        a distilled model's own steps, distillation_grid)."""
        abar = self.alphas_cumprod[kept]
        betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
        return GaussianDiffusion(np.concatenate([[0.0], betas]), self.variance, self.lambda_vlb,
                                 timesteps=np.concatenate([[0], self.timesteps[kept]]),
                                 prediction=self.prediction)

    def sampling_chain(self, sampler, K, stop_at=0):
        """The respaced chain `sampler` steps down: K steps spaced as that sampler wants them
        (SPACING_OF), containing step stop_at of the training schedule when sampling stops there
        (truncated conditioning augmentation)."""
        check_sampler(sampler)
        return self.respace(K, include=[stop_at] if stop_at else [], spacing=SPACING_OF[sampler])

    # --- the forward process ------------------------------------------------------------------
    def q_sample(self, x0, t, eps):
        """Sample q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I), DDPM Eq. (4). t = 0 -> x0."""
        return self._at("alphas_cumprod", t, x0).sqrt() * x0 \
            + (1 - self._at("alphas_cumprod", t, x0)).sqrt() * eps

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0), DDPM Eqs. (6)-(7)."""
        mean = self._at("posterior_mean_coef_x0", t, x_t) * x0 \
            + self._at("posterior_mean_coef_xt", t, x_t) * x_t
        return (mean, self._at("posterior_variance", t, x_t),
                self._at("posterior_log_variance_clipped", t, x_t))

    def predict_x0(self, x_t, t, eps):
        """Invert DDPM Eq. (4): x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        abar = self._at("alphas_cumprod", t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    # --- what the network predicts: eps (DDPM), x0, or the velocity (Salimans & Ho 2022) ------
    def target(self, x0, eps, t):
        """The regression target of L_simple for this model's parameterisation:

            eps       DDPM Eq. (14): the noise
            x0        the clean image
            velocity  sqrt(abar_t) eps - sqrt(1 - abar_t) x0      (PD §4)

        (PD writes it v; here v is only iDDPM's variance output, model_log_variance.)
        All three give the same x_t -> (x0, eps) map at the optimum; they differ in how errors
        are weighted over t. ||eps_hat - eps||^2 = abar_t / (1 - abar_t) ||x0_hat - x0||^2 pays
        nothing for a wrong x0 at high noise (abar_t -> 0), although the sampler amplifies those
        eps errors by sqrt((1 - abar_t) / abar_t) (predict_x0); the velocity's loss is
        ||x0_hat - x0||^2 / (1 - abar_t), well-conditioned at every noise level.
        """
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        abar = self._at("alphas_cumprod", t, x0)
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0

    def x0_and_eps(self, x_t, t, pred):
        """(x0_hat, eps_hat) from the network's prediction, each parameterisation inverted through
        x_t = sqrt(abar) x0 + sqrt(1 - abar) eps:
            eps:       x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
            x0:        eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
            velocity:  x0 = sqrt(abar) x_t - sqrt(1 - abar) velocity,
                       eps = sqrt(1 - abar) x_t + sqrt(abar) velocity
        """
        if self.prediction == "eps":
            return self.predict_x0(x_t, t, pred), pred
        abar = self._at("alphas_cumprod", t, x_t)
        if self.prediction == "x0":
            return pred, (x_t - abar.sqrt() * pred) / (1 - abar).sqrt()
        return abar.sqrt() * x_t - (1 - abar).sqrt() * pred, (1 - abar).sqrt() * x_t + abar.sqrt() * pred

    # --- the reverse process ------------------------------------------------------------------
    def model_log_variance(self, v, t, x):
        """log Sigma_theta: fixed beta~_t, or iDDPM §3.1 Eq. (15) with v in [-1, 1] mapped to [0, 1]:

            Sigma_theta = exp( frac log beta_t + (1 - frac) log beta~_t ),  frac = (v + 1) / 2
        """
        log_beta_tilde = self._at("posterior_log_variance_clipped", t, x)
        if self.variance == "fixed":
            return log_beta_tilde.expand_as(x)
        frac = (v + 1) / 2
        return frac * self._at("log_betas", t, x) + (1 - frac) * log_beta_tilde

    def split_output(self, out):
        """The network outputs its prediction (C channels: eps, x0 or the velocity, see target),
        and iDDPM's v (C more) if the variance is learned."""
        return out.chunk(2, dim=1) if self.variance == "learned" else (out, None)

    def p_mean_variance(self, model, x_t, t, model_kwargs, clip=True):
        """p_theta(x_{t-1} | x_t) = N(mu_theta, Sigma_theta): mu_theta is the posterior mean at the
        predicted x0 (DDPM Eq. (11) written through x0_hat). Clipping x0_hat to [-1, 1] is the
        usual sampling-time practice (DDPM / iDDPM code), never used in training."""
        out = model(x_t, torch.as_tensor(self.timesteps, device=x_t.device)[t], **model_kwargs)
        pred, v = self.split_output(out.float())
        x0_hat, eps = self.x0_and_eps(x_t, t, pred)
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0_hat, x_t, t)
        return mean, self.model_log_variance(v, t, x_t), x0_hat, eps

    # --- losses -------------------------------------------------------------------------------
    def training_losses(self, model, x0, t, model_kwargs, eps=None):
        """Per-example losses at steps t (B,). Returns a dict with "loss", "mse" and maybe "vlb".

        L_simple = || eps - eps_theta(x_t, t) ||^2            DDPM Eq. (14), mean over pixels
        L_hybrid = L_simple + lambda * L_vlb,  lambda = 0.001  iDDPM §3.1, Eq. (16)
        (for x0 or velocity prediction, L_simple regresses that target instead: see target)

        L_vlb = L_0 + ... + L_T is estimated from the sampled t as T * L_t (bits per dimension),
        which is the same as the iDDPM code's L_t * T / 1000 with lambda folded in. Inside L_vlb
        the mean is built from the prediction with its gradient stopped, so L_vlb only trains the
        variance and L_simple alone trains the mean (iDDPM §3.1).
        """
        eps = torch.randn_like(x0) if eps is None else eps
        x_t = self.q_sample(x0, t, eps)
        out = model(x_t, t, **model_kwargs).float()
        pred, v = self.split_output(out)
        terms = {"mse": mean_flat((self.target(x0, eps, t) - pred) ** 2)}
        if self.variance == "learned":
            terms["vlb"] = self.vlb_term(x0, x_t, t, self.x0_and_eps(x_t, t, pred.detach())[0], v)
            terms["loss"] = terms["mse"] + self.lambda_vlb * self.T * terms["vlb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def vlb_term(self, x0, x_t, t, x0_hat, v):
        """L_t of DDPM Eq. (5), in bits per dimension (B,):

            L_{t-1} = KL( q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t) )   for t >= 2
            L_0     = -log p_theta(x0 | x_1)  (the discretised decoder)       for t = 1
        """
        # x0_hat is not clipped: the loss sees the raw prediction
        mean_p, _, _ = self.q_posterior(x0_hat, x_t, t)
        logvar_p = self.model_log_variance(v, t, x_t)
        mean_q, _, logvar_q = self.q_posterior(x0, x_t, t)
        kl = mean_flat(normal_kl(mean_q, logvar_q, mean_p, logvar_p)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * logvar_p)) / math.log(2.0)
        return torch.where(t == 1, nll, kl)

    # --- sampling: the denoiser every sampler shares, and the choice of sampler ---------------
    def _index_of(self, s):
        where = np.nonzero(self.timesteps == s)[0]
        if len(where) == 0:
            raise ValueError(f"step {s} is not on this sampling chain; respace with include=[{s}]")
        return int(where[0])

    def nfe(self, sampler, stop_at=0):
        """Network evaluations of one run of `sampler` down this chain to step stop_at: one per
        step, except Heun's, which evaluates twice per step but once on a last step to x_0."""
        steps = self.T - (self._index_of(stop_at) if stop_at else 0)
        return 2 * steps - (0 if stop_at else 1) if sampler == "heun" else steps

    def denoise(self, model, x_t, i, model_kwargs):
        """The denoiser the samplers share: (x0_hat, eps_hat) at index i of this chain, the
        network told the training schedule's t. x0_hat is clipped to [-1, 1] (as in
        p_mean_variance) and eps_hat is the noise consistent with the clipped x0_hat,

            eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t),

        not the one the raw prediction implies. The learned variance is unused."""
        t = torch.full((x_t.shape[0],), i, dtype=torch.long, device=x_t.device)
        out = model(x_t, torch.as_tensor(self.timesteps, device=x_t.device)[t], **model_kwargs)
        x0_hat = self.x0_and_eps(x_t, t, self.split_output(out.float())[0])[0].clamp(-1, 1)
        abar = float(self.alphas_cumprod[i])
        return x0_hat, (x_t - math.sqrt(abar) * x0_hat) / math.sqrt(1 - abar)

    @torch.no_grad()
    def sample(self, model, shape, model_kwargs, *, sampler="ancestral", eta=0.0, stop_at=0,
               noise=None, generator=None, progress=False, desc="sampling"):
        """Draw x_{stop_at} from x_T ~ N(0, I) down this (respaced) chain with `sampler`, one of

          ancestral    sample_ancestral: DDPM Alg. 2, the model's variance   1 NFE / step
          ddim         sample_ddim: DDIM Eq. (12); eta = 0 deterministic     1 NFE / step
          dpm++2m      sample_dpmpp_2m: DPM++ Alg. 2 (beyond the paper)      1 NFE / step
          dpm++2m-sde  sample_dpmpp_2m_sde: its SDE variant (beyond)         1 NFE / step
          heun         sample_heun: EDM Alg. 1 (beyond)          2 NFE / step (1 on the last)

        stop_at is a step of the *training* schedule (0: to the clean image); stopping early is
        truncated conditioning augmentation (CDM §3.2): the chain contains s (respace(include=[s]))
        and every sampler lands exactly on it, handing over z_s. Each sampler walks the chain's
        indices i = T, T - 1, ..., from i to i - 1, and draws fresh N(0, I) noise when it needs
        some (from `generator`)."""
        check_sampler(sampler)
        device = next(model.parameters()).device
        x = gaussian(shape, generator, device) if noise is None else noise.to(device)
        end = self._index_of(stop_at) if stop_at else 0
        steps = tqdm(range(self.T, end, -1), desc=desc, disable=not progress, leave=False)
        fresh = lambda: gaussian(shape, generator, device)
        if sampler == "ancestral":
            return sample_ancestral(self, model, x, model_kwargs, steps, fresh)
        if sampler == "ddim":
            return sample_ddim(self, model, x, model_kwargs, steps, fresh, eta)
        if sampler == "dpm++2m":
            return sample_dpmpp_2m(self, model, x, model_kwargs, steps)
        if sampler == "dpm++2m-sde":
            return sample_dpmpp_2m_sde(self, model, x, model_kwargs, steps, fresh)
        return sample_heun(self, model, x, model_kwargs, steps)


# --- the samplers of the paper and its predecessors -------------------------------------------
# Each takes the chain (a respaced GaussianDiffusion), the network and its conditioning, x at the
# first index of `steps`, the indices i to step down from (to i - 1), and fresh() for new N(0, I)
# noise where it needs it; it returns x at the index after the last.

def sample_ancestral(chain, model, x, model_kwargs, steps, fresh):
    """DDPM Algorithm 2, line 4, with the model's variance (learned or fixed):

        x_{t-1} = mu_theta(x_t, t) + Sigma_theta(x_t, t)^{1/2} n,   n ~ N(0, I),

    and n = 0 on the last step (t = 1)."""
    for i in steps:
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        mean, logvar, _, _ = chain.p_mean_variance(model, x, t, model_kwargs)
        n = fresh() if i > 1 else torch.zeros_like(x)
        x = mean + torch.exp(0.5 * logvar) * n
    return x


def sample_ddim(chain, model, x, model_kwargs, steps, fresh, eta=0.0):
    """DDIM Eq. (12) from t to t' = the step before it, with sigma from DDIM Eq. (16):

        x_{t'} = sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'} - sigma^2) eps_hat + sigma n,
        sigma  = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'}),

    (x0_hat, eps_hat) from the shared denoiser. eta = 0: deterministic; eta = 1: the DDPM
    posterior's noise."""
    abar, alpha = chain.alphas_cumprod, chain.sqrt_alphas_cumprod
    for i in steps:
        j = i - 1
        x0_hat, eps_hat = chain.denoise(model, x, i, model_kwargs)
        n = fresh() if i > 1 else torch.zeros_like(x)
        sig = eta * math.sqrt((1 - abar[j]) / (1 - abar[i]) * (1 - abar[i] / abar[j]))
        x = alpha[j] * x0_hat + math.sqrt(max(1 - abar[j] - sig ** 2, 0.0)) * eps_hat + sig * n
    return x


def gaussian(shape, generator, device):
    """N(0, I) noise drawn where `generator` lives (a CUDA generator draws on the GPU, with no
    host-to-device copy), then placed on `device`."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


def diffusion_from_config(cfg):
    """cfg: {"schedule": "cosine"|"linear", "T": int, "variance": "learned"|"fixed", "lambda_vlb",
    "prediction": "eps"|"x0"|"velocity" (absent in older checkpoints: eps)}"""
    return GaussianDiffusion(make_betas(cfg["schedule"], cfg["T"]), cfg["variance"],
                             cfg.get("lambda_vlb", 0.001), prediction=cfg.get("prediction", "eps"))


# =============================================================================================
# 3. Conditioning augmentation (CDM §3, §3.1) and the low-res <-> high-res maps
# =============================================================================================

def downsample(x, res):
    """Anti-aliased (area, i.e. box-filter) downsampling: how z0 is made from x0 for training
    pairs. Area averaging is our choice; the paper does not name the filter."""
    if x.shape[-1] == res:
        return x
    if x.shape[-1] % res:
        raise ValueError(f"cannot area-downsample {x.shape[-1]}px to {res}px: not an integer factor")
    return F.interpolate(x, size=(res, res), mode="area")


def upsample(z, res):
    """Resize z up to the SR model's resolution before it is concatenated with x_t (CDM §3).
    The paper allows bilinear or bicubic; bilinear is our choice (as in the iDDPM SR code)."""
    return F.interpolate(z, size=(res, res), mode="bilinear", align_corners=False)


def sample_aug_time(u, s_max):
    """Training draws s ~ U{0, ..., s_max} per example (CDM §3: super-resolution models "amortized
    over the strength of conditioning augmentation"), here as floor(u (s_max + 1)) from uniforms u
    in [0, 1). The range is not in the paper: s_max = T/4 of the low-res schedule is our default,
    which covers most of the best sampling-time s that a secondary source (named in docs/paper.md)
    reports for the paper's 32->64 stage (501-1251 of T = 4000, s/T = 0.13-0.31; the imagenet64
    preset trains on T/2)."""
    return (u * (int(s_max) + 1)).long().clamp(max=int(s_max))


def noise_augment(z0, s, low_res_diffusion, eps=None):
    """Gaussian conditioning augmentation, CDM §3 ("adding Gaussian noise (forward process noise)"):

        z_s = sqrt(abar_s) z0 + sqrt(1 - abar_s) eps,   with abar from the *low-res model's* schedule.

    This is the low-res model's forward process q(z_s | z0). At s = 0 it returns z0 unchanged.
    s: int64 (B,). Used in training (random s) and in non-truncated sampling (one fixed s).
    """
    eps = torch.randn_like(z0) if eps is None else eps
    return low_res_diffusion.q_sample(z0, s, eps)


def gaussian_kernel3(sigma):
    """3x3 Gaussian kernels for a batch of sigmas (B,) -> (B, 3, 3), each summing to one."""
    d = torch.tensor([-1.0, 0.0, 1.0], device=sigma.device)
    g = torch.exp(-d[None, :] ** 2 / (2 * sigma[:, None] ** 2))             # (B, 3)
    k = g[:, :, None] * g[:, None, :]                                       # separable: (B, 3, 3)
    return k / k.sum(dim=(1, 2), keepdim=True)


def blur_augment(z, sigma_range=(0.4, 0.6), p=0.5, u=None):
    """Gaussian blur conditioning augmentation, CDM §3.1 (the 64->128 and 64->256 stages): sigma
    drawn from a fixed range, the blur applied to 50% of the training examples, "no augmentation"
    at inference; the model is not told sigma. The 3x3 kernel and sigma ~ U(0.4, 0.6) are what a
    secondary source (named in docs/paper.md) reports for the paper's 256x256 stage. Per-example
    sigma and coin flip are our choice; they come from u, (B, 2) uniforms in [0, 1) (drawn here if
    None). Returns (z_aug, applied: bool (B,)).
    """
    B, C, H, W = z.shape
    u = torch.rand(B, 2, device=z.device) if u is None else u
    sigma = sigma_range[0] + (sigma_range[1] - sigma_range[0]) * u[:, 1]
    applied = u[:, 0] < p
    k = gaussian_kernel3(sigma).to(z.dtype)                                # (B, 3, 3)
    weight = k.repeat_interleave(C, dim=0)[:, None]                        # (B*C, 1, 3, 3)
    # One grouped convolution blurs every channel of every example with its own kernel.
    blurred = F.conv2d(F.pad(z.reshape(1, B * C, H, W), (1, 1, 1, 1), mode="reflect"),
                       weight, groups=B * C).reshape(B, C, H, W)
    return torch.where(applied[:, None, None, None], blurred, z), applied


def augment_for_training(z0, aug, low_res_diffusion, rng):
    """Apply a stage's training-time augmentation config to clean z0. Returns (z, s or None).
    rng: the training loop's random numbers (trainer.ExampleRandom): rng.rand / rng.randn(stream,
    *shape) give one row per example."""
    if aug["type"] == "noise":
        s = sample_aug_time(rng.rand("aug_s"), aug["s_max"])
        return noise_augment(z0, s, low_res_diffusion, rng.randn("aug_eps", *z0.shape[1:])), s
    if aug["type"] == "blur":
        return blur_augment(z0, tuple(aug["sigma"]), aug["p"], rng.rand("blur", 2))[0], None
    return z0, None


def aug_diffusion(aug):
    """The low-res forward process that noise augmentation uses (schedule and T of the base)."""
    return GaussianDiffusion(make_betas(aug["schedule"], aug["T"])) if aug["type"] == "noise" else None


# =============================================================================================
# 4. The U-Net (DDPM App. B, iDDPM, ADM §3), with the SR inputs of CDM §3
# =============================================================================================

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) steps t (B,) -> (B, dim), as in the
    Transformer and DDPM App. B: [cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(ch):
    """32 groups as in DDPM/ADM, fewer for the narrow CPU models (our choice)."""
    g = min(32, max(1, ch // 4))
    while ch % g:
        g -= 1
    return nn.GroupNorm(g, ch)


def zero_init(module):
    """Zero the last layer of a residual branch (and of the network): each block starts as the
    identity and the initial eps prediction is 0, so the initial L_simple is E[eps^2] = 1."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def rescale(h, scale):
    """h * scale, skipped when scale is 1: a full pass over h for nothing (docs/speed.md)."""
    return h if scale == 1.0 else h * scale


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> scale-shift by the embedding -> SiLU -> dropout -> conv3x3,
    plus a skip connection. ADM §3.1's adaptive group normalisation, AdaGN(h, y) = y_s GN(h) + y_b,
    written as guided-diffusion's code writes it, GN(h) (1 + scale) + shift (the same with
    y_s = 1 + scale: a zero embedding leaves GN(h) unchanged). The embedding carries t, the class c
    and, for noise-augmented SR models, the augmentation time s ("an extra time embedding input",
    CDM §3.2): this is how every conditioning signal except z enters the network. skip_rescale:
    the residual sum times 1/sqrt(2), as SR3 does."""

    def __init__(self, ch_in, ch_out, emb_dim, dropout, skip_rescale=False):
        super().__init__()
        self.out_scale = 1 / math.sqrt(2) if skip_rescale else 1.0   # SR3's residual rescaling
        self.in_layers = nn.Sequential(group_norm(ch_in), nn.SiLU(), nn.Conv2d(ch_in, ch_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * ch_out))
        self.out_norm = group_norm(ch_out)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(ch_out, ch_out, 3, padding=1)))
        self.skip = nn.Identity() if ch_in == ch_out else nn.Conv2d(ch_in, ch_out, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)  # (B, ch_out, 1, 1)
        h = torch.addcmul(shift, self.out_norm(h), 1 + scale)      # GN(h) (1 + scale) + shift
        return rescale(self.skip(x) + self.out_layers(h), self.out_scale)


def attention(Q, K, V, fused=True):
    """softmax(Q K^T / sqrt(d)) V for queries, keys and values of shape (B, heads, N, d) (Vaswani
    et al. 2017, Eq. 1; written Q, K, V as there: v alone is iDDPM's variance output here). fused:
    PyTorch's scaled_dot_product_attention, one kernel that never stores the N x N weights, several
    times faster on the CPU; the plain lines below compute the same numbers. The exception: the
    CPU backward of the fused kernel is slow in bf16, so bf16 training on the CPU takes the plain
    lines (two bf16 matmuls). Both measured with bench.py: docs/speed.md."""
    slow_backward = Q.device.type == "cpu" and Q.dtype == torch.bfloat16 and Q.requires_grad
    if fused and not slow_backward:
        return F.scaled_dot_product_attention(Q, K, V)
    w = torch.softmax(Q @ K.transpose(-1, -2) / math.sqrt(Q.shape[-1]), dim=-1)  # (B, heads, N, N)
    return w @ V


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions (DDPM App. B; ADM uses several heads)."""
    fast = True

    def __init__(self, ch, num_heads, skip_rescale=False):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"{ch} channels cannot be split into {num_heads} attention heads")
        self.num_heads = num_heads
        self.out_scale = 1 / math.sqrt(2) if skip_rescale else 1.0
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        heads, d = self.num_heads, C // self.num_heads
        # The 1x1 convolutions qkv and proj are matmuls over the H*W positions ("tokens"). Done as
        # F.linear on a (B, HW, C) token tensor, Q, K and V come out with each head's d channels
        # adjacent in memory, which the fused attention kernel needs on the CPU: given the
        # strided views of an NCHW conv output it silently falls back to the slow plain formula
        # (docs/speed.md).
        tokens = self.norm(x).flatten(2).transpose(1, 2)                    # (B, HW, C)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)   # (B, HW, 3C)
        Q, K, V = qkv.view(B, H * W, 3, heads, d).permute(2, 0, 3, 1, 4)   # (B, heads, HW, d) each
        h = attention(Q, K, V, fused=self.fast).transpose(1, 2).reshape(B, H * W, C)
        out = F.linear(h, self.proj.weight.flatten(1), self.proj.bias)      # (B, HW, C)
        return rescale(x + out.transpose(1, 2).view(B, C, H, W), self.out_scale)


class UNet(nn.Module):
    """The improved-DDPM / ADM U-Net, one class for the base and the SR models.

    resolution       image size H = W of x_t
    channel_mult     width multiplier per resolution level (the "mult" of the presets)
    num_res_blocks   residual blocks per level; attention_resolutions: where self-attention goes
    in_channels      C: 3 for RGB images, 1 for grayscale data (data.keep_gray_as_one_channel)
    out_channels     C, or 2C when the variance is learned (the prediction and iDDPM's v)
    num_classes      class-conditional: a learned class embedding is added to the time embedding
    low_res          SR model: z is resized up to `resolution` and concatenated with x_t along
                     channels, so the first conv sees 3 + 3 channels (CDM §3)
    aug_time         noise-augmented SR model: s gets its own sinusoidal embedding + MLP, added
                     into the same conditioning vector ("an extra time embedding input", CDM §3.2)
    skip_rescale     every residual sum times 1/sqrt(2) (SR3's networks; ResBlock)
    null_class       one more class embedding, the label num_classes meaning "no class", learned
                     when training drops labels (--p_uncond): what classifier-free guidance needs
    """

    def __init__(self, resolution, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                 attention_resolutions=(16,), num_heads=4, dropout=0.0, out_channels=3,
                 num_classes=None, low_res=None, aug_time=False, in_channels=3, skip_rescale=False,
                 null_class=False):
        super().__init__()
        ch = model_channels
        emb_dim = 4 * ch
        self.resolution, self.low_res, self.num_classes = resolution, low_res, num_classes
        self.in_channels = in_channels
        self.aug_time, self.model_channels = aug_time, ch
        if resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"resolution {resolution} cannot be halved {len(channel_mult) - 1} times")
        mlp = lambda: nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.time_embed = mlp()
        # null_class: one more row, the learned "no class" label num_classes, for classifier-free
        # guidance (guided_model); models trained with --p_uncond 0 (the paper's) have none
        self.null_class = bool(null_class and num_classes)
        self.class_embed = nn.Embedding(num_classes + self.null_class, emb_dim) if num_classes else None
        self.aug_embed = mlp() if aug_time else None

        self.input_conv = nn.Conv2d(in_channels * (2 if low_res else 1), ch, 3, padding=1)
        self.down, skip_chs, res, cur = nn.ModuleList(), [ch], resolution, ch
        res_block = lambda c_in, c_out: ResBlock(c_in, c_out, emb_dim, dropout, skip_rescale)
        attn_block = lambda c: AttentionBlock(c, num_heads, skip_rescale)
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(cur, mult * ch)]
                cur = mult * ch
                if res in attention_resolutions:
                    layers.append(attn_block(cur))
                self.down.append(nn.ModuleList(layers))
                skip_chs.append(cur)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skip_chs.append(cur)
                res //= 2
        self.middle = nn.ModuleList([res_block(cur, cur), attn_block(cur), res_block(cur, cur)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(cur + skip_chs.pop(), mult * ch)]
                cur = mult * ch
                if res in attention_resolutions:
                    layers.append(attn_block(cur))
                if level and i == num_res_blocks:
                    layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    layers.append(nn.Conv2d(cur, cur, 3, padding=1))
                    res *= 2
                self.up.append(nn.ModuleList(layers))
        self.out = nn.Sequential(group_norm(cur), nn.SiLU(), zero_init(nn.Conv2d(cur, out_channels, 3, padding=1)))

    def check_inputs(self, x_t, t, c, z, s):
        """Clear errors for the mistakes people make when calling a model by hand."""
        if x_t.ndim != 4 or x_t.shape[1:] != (self.in_channels, self.resolution, self.resolution):
            raise ValueError(f"this model makes {self.in_channels}-channel {self.resolution}x"
                             f"{self.resolution} images, got x_t of shape {tuple(x_t.shape)}")
        if self.num_classes:
            if c is None:
                raise ValueError("this model is class-conditional: pass class labels c")
            # checked on the CPU only: on a GPU the check would wait for the device every call
            # (and break torch.compile's graph); a bad label there fails in the embedding
            top = self.num_classes - 1 + self.null_class          # the null label is num_classes
            if c.device.type == "cpu" and (c.min() < 0 or c.max() > top):
                raise ValueError(f"class labels must lie in 0..{top}, got {c.min().item()}..{c.max().item()}")
        if self.low_res:
            if z is None or z.shape[1:] != (self.in_channels, self.low_res, self.low_res):
                got = None if z is None else tuple(z.shape)
                raise ValueError(f"this SR model needs {self.in_channels}-channel z at {self.low_res}x"
                                 f"{self.low_res}, got {got}")
        if self.aug_time and s is None:
            raise ValueError("this SR model was trained with noise augmentation: pass s")

    def conditioning(self, x_t, t, c=None, z=None, s=None):
        """The network's input and its conditioning vector, from everything it is told:

            emb  = MLP_t(embed(t)) + E_class[c] + MLP_s(embed(s))     (B, 4 ch): each term if used
            x_in = concat(x_t, upsample(z)) along channels            (B, C + C, H, W) for SR models

        The class term is the base's and every SR model's; s gets its own sinusoidal embedding and
        MLP, "an extra time embedding input" (CDM §3.2), never t's; z is resized up to x_t's size
        and concatenated with it (CDM §3). A base model's x_in is x_t. Returns (x_in, emb)."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if self.class_embed is not None:
            emb = emb + self.class_embed(c)
        if self.aug_embed is not None:
            emb = emb + self.aug_embed(timestep_embedding(s, self.model_channels))
        if self.low_res:
            x_t = torch.cat([x_t, upsample(z, self.resolution)], dim=1)  # (B, C+C, H, W)
        return x_t, emb

    def forward(self, x_t, t, c=None, z=None, s=None):
        self.check_inputs(x_t, t, c, z, s)
        x_in, emb = self.conditioning(x_t, t, c, z, s)
        h = self.input_conv(x_in)
        hs = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.middle:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layers in self.up:
            h = torch.cat([h, hs.pop()], dim=1)                          # U-Net skip connection
            for layer in layers:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h)


def model_from_config(cfg):
    """cfg: the keyword arguments of UNet, as stored in a checkpoint."""
    cfg = dict(cfg)
    for key in ("channel_mult", "attention_resolutions"):
        cfg[key] = tuple(cfg[key])
    return UNet(**cfg)


# =============================================================================================
# 5. Cascade sampling (CDM §3, Fig. 1): base -> SR -> SR ...
# =============================================================================================

@dataclass
class Stage:
    """One trained model of the cascade, as rebuilt from its checkpoint."""
    model: nn.Module
    diffusion: GaussianDiffusion
    config: dict

    @property
    def resolution(self):
        return self.config["resolution"]

    @property
    def channels(self):  # 3, or 1 for a model of grayscale data (absent in older checkpoints: 3)
        return self.config.get("model", {}).get("in_channels", 3)

    @property
    def distilled(self):
        """A distilled stage's own steps (distillation_grid, 0 first), or None: it is sampled on
        them, with deterministic DDIM, and on no others."""
        return self.config.get("distill", {}).get("grid")

    @property
    def sample_s(self):
        """The augmentation time s this stage was trained to be sampled at (--sample_s; older
        checkpoints: T/10), or None for a stage without noise augmentation."""
        aug = self.config["augment"]
        return aug.get("sample_s", aug["T"] // 10) if aug["type"] == "noise" else None


def check_cascade(stages, given_low_res=False):
    """Refuse cascades whose stages do not fit together, with a message that says why.
    given_low_res: the first stage is an SR stage run on given images (sample.py --low_res)."""
    if not stages:
        raise ValueError("a cascade needs at least one stage")
    if given_low_res and stages[0].config["low_res"] is None:
        raise ValueError(f"the first stage is a {stages[0].resolution}x{stages[0].resolution} base "
                         "model, which takes no low-res images: give the SR stage(s) only")
    if not given_low_res and stages[0].config["low_res"] is not None:
        raise ValueError("the first stage must be a base model, but it is a "
                         f"{stages[0].config['low_res']}->{stages[0].resolution} SR model")
    for k in range(1, len(stages)):
        prev, cur = stages[k - 1], stages[k]
        if cur.config["low_res"] is None:
            raise ValueError(f"stage {k + 1} is a base model; every stage after the first must be SR")
        if cur.config["low_res"] != prev.resolution:
            raise ValueError(f"stage {k + 1} is a {cur.config['low_res']}->{cur.resolution} SR model, "
                             f"but stage {k} makes {prev.resolution}x{prev.resolution} images")
        if cur.channels != prev.channels:
            raise ValueError(f"stage {k + 1} makes {cur.channels}-channel images, stage {k} "
                             f"{prev.channels}-channel ones: they were trained on different data")
        if cur.config["num_classes"] != prev.config["num_classes"]:
            raise ValueError(f"stage {k + 1} knows {cur.config['num_classes']} classes, stage {k} "
                             f"knows {prev.config['num_classes']}: they were trained on different data")
        names = [st.config.get("class_names") for st in (prev, cur)]    # absent in old checkpoints
        if None not in names and names[0] != names[1]:
            diff = next(i for i, (a, b) in enumerate(zip(*names)) if a != b)
            raise ValueError(f"stage {k + 1}'s class {diff} is {names[1][diff]!r}, stage {k}'s is "
                             f"{names[0][diff]!r}: they were trained on different data (stage {k}: "
                             f"{prev.config.get('data')}, stage {k + 1}: {cur.config.get('data')})")


def check_augmentation_times(stages, s):
    """Each noise-augmented SR stage is told its augmentation time s (CDM §3.2: "an extra time
    embedding input"), which must lie in 0..T of its low-res schedule; s[k] is stage k's."""
    for k, (st, s_k) in enumerate(zip(stages, s)):
        aug = st.config["augment"]
        if aug["type"] == "noise" and not (s_k is not None and 0 <= s_k <= aug["T"]):
            raise ValueError(f"stage {k + 1} was trained with noise augmentation: it needs s in 0..{aug['T']}, "
                             f"got {s_k}")


def handover(z, aug, s, truncated, generator=None):
    """What an SR stage is given of the previous stage's output z, as its conditioning inputs:

      noise augmentation, truncated (CDM §3.2): the previous chain was stopped at step s, so z
          already is z_s: hand it over as it is, with s
      noise augmentation, non-truncated (CDM §3.3): z is the finished z0; re-noise it with the
          low-res model's forward process, z_s = sqrt(abar_s) z0 + sqrt(1 - abar_s) eps (the
          schedule of `aug`, through noise_augment), eps ~ N(0, I) from `generator`; with s
      blur or no augmentation (CDM §3.1): the clean z, no s (no blur at sampling)

    aug: the stage's augmentation config; s: its augmentation time (an int). Returns {"z": ...,
    "s": int64 (B,)} for noise-augmented stages, {"z": ...} for the others."""
    if aug["type"] != "noise":
        return {"z": z}
    s_k = torch.full((z.shape[0],), int(s), dtype=torch.long, device=z.device)
    if not truncated:
        z = noise_augment(z, s_k, aug_diffusion(aug), gaussian(z.shape, generator, z.device))
    return {"z": z, "s": s_k}


@torch.no_grad()
def sample_cascade(stages, c, *, steps, sampler="ancestral", s=None, truncated=False, eta=0.0,
                   generator=None, progress=True, guidance=None, low_res=None):
    """Sample p(x0 | c) = int p(x0 | z0, c) p(z0 | c) dz0 through the whole cascade (CDM §3).

    stages   list of Stage, base first
    c        int64 (B,) class labels, shared by every stage
    steps    sampling steps per stage (respaced, iDDPM §4); a distilled stage (Stage.distilled)
             takes exactly its own steps, with sampler "ddim"
    sampler  one of SAMPLERS for every stage, or one per stage (GaussianDiffusion.sample); eta is
             DDIM's
    s        augmentation time per stage (None for stages without noise augmentation)
    truncated  for noise-augmented stages: stop the previous stage's reverse chain at step s and
             hand over its z_s (truncated, CDM §3.2); otherwise run it to z0 and re-noise it with
             q(z_s | z0) (non-truncated, CDM §3.3). Blur-augmented stages get clean z (no blur at
             sampling, CDM §3.1).
    guidance classifier-free guidance weight w per stage (GuidedModel); None or 0: none
    low_res  given low-resolution images (B, C, r, r) in [-1, 1]: then stages[0] is an SR stage
             and they are its z0 (non-truncated handover: there is no chain to stop)
    Returns a list with each stage's output images (B, C, H, W) in [-1, 1] (C = 1 for models of
    grayscale data); for a stage whose successor was truncated this is the handed-over z_s.
    """
    check_cascade(stages, given_low_res=low_res is not None)
    if low_res is not None and truncated:
        raise ValueError("truncated sampling stops a previous stage's chain; given low-res images "
                         "have none: sample them non-truncated")
    B = c.shape[0]
    s = list(s) if s is not None else [None] * len(stages)
    guidance = list(guidance) if guidance is not None else [0.0] * len(stages)
    if len(guidance) != len(stages):
        raise ValueError(f"give one guidance weight per stage ({len(stages)}); got {guidance}")
    samplers = [sampler] * len(stages) if isinstance(sampler, str) else list(sampler)
    if len(samplers) != len(stages):
        raise ValueError(f"give one sampler, or one per stage ({len(stages)}); got {samplers}")
    for a in samplers:
        check_sampler(a)
    check_augmentation_times(stages, s)
    outputs, z = [], low_res
    for k, st in enumerate(stages):
        kwargs = {"c": c}
        if z is not None:
            kwargs.update(handover(z, st.config["augment"], s[k], truncated, generator))
        # Will the next stage want this chain stopped early at its s (truncated augmentation)?
        stop_at = 0
        nxt = stages[k + 1].config["augment"] if k + 1 < len(stages) else None
        if truncated and nxt is not None and nxt["type"] == "noise" and s[k + 1]:
            stop_at = int(s[k + 1])
            if (nxt["schedule"], nxt["T"]) != (st.config["diffusion"]["schedule"], st.config["diffusion"]["T"]):
                raise ValueError(f"truncated sampling needs stage {k + 2}'s augmentation schedule "
                                 f"({nxt['schedule']}, T={nxt['T']}) to be stage {k + 1}'s own "
                                 f"({st.config['diffusion']['schedule']}, T={st.config['diffusion']['T']})")
        if st.distilled is None:
            diffusion = st.diffusion.sampling_chain(samplers[k], steps[k], stop_at)
        else:                                   # a distilled stage: its own steps, DDIM (PD)
            grid, N = st.distilled, len(st.distilled) - 1
            if (samplers[k], steps[k]) != ("ddim", N):
                raise ValueError(f"stage {k + 1} is distilled to {N} DDIM step{'s' * (N > 1)}: sample it with "
                                 f"ddim and {N} step{'s' * (N > 1)}, not {samplers[k]} and {steps[k]}")
            if stop_at not in grid:
                raise ValueError(f"truncated sampling stops stage {k + 1} at s = {stop_at}, but it is distilled "
                                 f"to the steps {grid[1:]} only: sample non-truncated, or with s on those steps")
            diffusion = st.diffusion.on_steps(grid[1:])
        shape = (B, st.channels, st.resolution, st.resolution)
        model = guided_model(st.model, guidance[k], st.channels)
        z = diffusion.sample(model, shape, kwargs, sampler=samplers[k], eta=eta, stop_at=stop_at,
                             generator=generator, progress=progress,
                             desc=f"stage {k + 1} ({st.resolution}px, {samplers[k]})")
        outputs.append(z)
    return outputs


# =============================================================================================
# 6. Beyond the paper: ODE solvers, their noise levels, and classifier-free guidance
# =============================================================================================
# CDM samples every stage with hundreds of ancestral steps. The solvers below, published after
# it, reach similar samples in 10-50 network evaluations; guidance trades diversity for fidelity.
# Our CPU demo uses them; the paper's own path is sample_ancestral, and --sampler ancestral.
#
# Noise level and time: our networks know the *discrete* steps t of their training schedule.
# The ODE's noise level at step t is sigma~_t = sqrt((1 - abar_t) / abar_t) (EDM's sigma for
# x~ = x / sqrt(abar)), equivalently the log-SNR lambda_t = -log sigma~_t (DPM++). Both solvers
# evaluate the network only at points of the chain (Heun's corrector at the next step's t), so no
# fractional t is ever needed. sampling_chain gives the ODE solvers EDM's noise levels
# (karras_timesteps, EDM Eq. (5)) and the others steps evenly spaced in t (spaced_timesteps).

def dpmpp_2m_data_term(x0_hat, x0_prev, h, h_prev):
    """DPM-Solver++(2M)'s second-order data term (DPM++ Alg. 2), from this step's x0_hat and
    log-SNR step h and the previous step's:

        D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_prev,   r = h_prev / h;

    D = x0_hat on the first step, which has no previous one (x0_prev None)."""
    if x0_prev is None:
        return x0_hat
    r = h_prev / h
    return (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * x0_prev


def sample_dpmpp_2m(chain, model, x, model_kwargs, steps):
    """DPM-Solver++(2M), DPM++ Alg. 2: the probability-flow ODE in the data prediction x0_hat,
    from t to t' with the log-SNR lambda = log(alpha / sigma), alpha = sqrt(abar), sigma =
    sqrt(1 - abar):

        h = lambda_{t'} - lambda_t,   x_{t'} = (sigma_{t'} / sigma_t) x_t - alpha_{t'} (e^{-h} - 1) D

    with D from dpmpp_2m_data_term. On the first step (D = x0_hat) this is DDIM with eta = 0; a
    last step to t' = 0 (sigma = 0, h = inf) gives x0_hat: first order."""
    alpha, sigma = chain.sqrt_alphas_cumprod, chain.sqrt_one_minus_alphas_cumprod
    x0_prev = h_prev = None
    for i in steps:
        j = i - 1
        x0_hat, _ = chain.denoise(model, x, i, model_kwargs)
        if j == 0:
            x = x0_hat
        else:
            h = math.log(alpha[j] / sigma[j]) - math.log(alpha[i] / sigma[i])
            D = dpmpp_2m_data_term(x0_hat, x0_prev, h, h_prev)
            x = (sigma[j] / sigma[i]) * x - alpha[j] * math.expm1(-h) * D
            x0_prev, h_prev = x0_hat, h
    return x


def sample_dpmpp_2m_sde(chain, model, x, model_kwargs, steps, fresh):
    """The SDE variant of DPM-Solver++(2M) (Lu 2023, in the diffusers library; not in the DPM++
    paper), with h and D as in sample_dpmpp_2m:

        x_{t'} = (sigma_{t'} / sigma_t) e^{-h} x_t + alpha_{t'} (1 - e^{-2h}) D
                 + sigma_{t'} sqrt(1 - e^{-2h}) n,   n ~ N(0, I)

    On the first step this is DDPM's posterior with variance beta~ (DDIM with eta = 1); a last
    step to t' = 0 gives x0_hat."""
    alpha, sigma = chain.sqrt_alphas_cumprod, chain.sqrt_one_minus_alphas_cumprod
    x0_prev = h_prev = None
    for i in steps:
        j = i - 1
        x0_hat, _ = chain.denoise(model, x, i, model_kwargs)
        if j == 0:
            x = x0_hat
        else:
            h = math.log(alpha[j] / sigma[j]) - math.log(alpha[i] / sigma[i])
            D = dpmpp_2m_data_term(x0_hat, x0_prev, h, h_prev)
            x = (sigma[j] / sigma[i] * math.exp(-h)) * x - alpha[j] * math.expm1(-2 * h) * D \
                + sigma[j] * math.sqrt(-math.expm1(-2 * h)) * fresh()
            x0_prev, h_prev = x0_hat, h
    return x


def sample_heun(chain, model, x, model_kwargs, steps):
    """Heun's method, EDM Algorithm 1 (deterministic), on the ODE dx~/dsigma~ = eps_hat in
    x~ = x / alpha and sigma~ = sigma / alpha, from sigma~_t to sigma~_{t'}:

        d  = eps_hat(x_t, t)                                   the slope dx~/dsigma~ at t
        x~' = x~ + (sigma~_{t'} - sigma~_t) d                   Euler's step (= DDIM, eta = 0)
        if sigma~_{t'} != 0:
            d' = eps_hat(x_{t'}, t')                            the slope at the Euler point
            x~' = x~ + (sigma~_{t'} - sigma~_t) (d + d') / 2    Heun's second-order correction

    Written back in x = alpha x~ = alpha x0_hat + sigma eps_hat so that nothing is divided by
    alpha_T ~ 0: Euler is x' = alpha_{t'} x0_hat + sigma_{t'} eps_hat, and Heun, with
    k = alpha_{t'} sigma_t / alpha_t, x' = alpha_{t'} x0_hat + (sigma_{t'} + k)/2 d + (sigma_{t'} - k)/2 d'."""
    alpha, sigma = chain.sqrt_alphas_cumprod, chain.sqrt_one_minus_alphas_cumprod
    for i in steps:
        j = i - 1
        x0_hat, d = chain.denoise(model, x, i, model_kwargs)
        x_euler = alpha[j] * x0_hat + sigma[j] * d
        if j == 0:
            x = x_euler
        else:
            _, d2 = chain.denoise(model, x_euler, j, model_kwargs)
            k = alpha[j] * sigma[i] / alpha[i]
            x = alpha[j] * x0_hat + (sigma[j] + k) / 2 * d + (sigma[j] - k) / 2 * d2
    return x


def karras_timesteps(alphas_cumprod, K, include=(), sigma_max=80.0, rho=7.0):
    """K steps of {1..T} at the noise levels of EDM Eq. (5), for the ODE samplers, plus `include`:

        sigma_i = ( sigma_max^(1/rho) + i/(K-1) (sigma_min^(1/rho) - sigma_max^(1/rho)) )^rho,  rho = 7

    in the noise level sigma~_t = sqrt((1 - abar_t) / abar_t) of our discrete steps (see
    GaussianDiffusion.sample), with sigma_max = min(80, sigma~_T) as in EDM and sigma_min = sigma~_1.
    Each sigma_i is mapped to the step t whose sigma~_t is nearest in log (sigma~_t grows with t);
    steps that round to the same t are moved apart, so the chain has K distinct steps. The chain
    then starts at the t of sigma_max with x ~ N(0, I), not at T: for a cosine schedule
    sigma~_T ~ 2e4, where one step down to sigma~ ~ 1 is more than Heun's trapezoid can take.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    T, K = len(abar) - 1, int(K)
    if not 1 <= K <= T:
        raise ValueError(f"cannot take {K} sampling steps from a model with T = {T}; use 1..{T}")
    log_sig = 0.5 * np.log((1 - abar[1:]) / abar[1:])                # log sigma~_t, t = 1..T
    lo, hi = log_sig[0], min(math.log(sigma_max), log_sig[-1])
    ramp = np.linspace(0, 1, K) if K > 1 else np.zeros(1)
    sig = (math.exp(hi) ** (1 / rho) + ramp * (math.exp(lo) ** (1 / rho) - math.exp(hi) ** (1 / rho))) ** rho
    t = np.clip(np.round(np.interp(np.log(sig), log_sig, np.arange(1, T + 1))).astype(int), 1, T)
    t = np.sort(t)                                                   # ascending, may repeat
    for k in range(1, K):                                            # distinct, from the bottom
        t[k] = max(t[k], t[k - 1] + 1)
    t[-1] = min(t[-1], T)                                            # pushed past T: from the top
    for k in range(K - 2, -1, -1):
        t[k] = min(t[k], t[k + 1] - 1)
    kept = set(t.tolist()) | {int(i) for i in include}
    if min(kept) < 1 or max(kept) > T:
        raise ValueError(f"steps to include must lie in 1..{T}, got {sorted(include)}")
    return sorted(kept)


class GuidedModel(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"; not
    used by CDM, whose point is a cascade that needs no guidance): the network run with the
    class c and with the learned null class, in one batch of 2B, and the prediction

        eps~(x_t, c) = (1 + w) eps(x_t, c) - w eps(x_t, null)

    w = 0 is the conditional model. For x0 or velocity prediction the same combination of the raw
    predictions is the same guided eps (each is affine in eps at fixed x_t, with weights summing
    to 1). A learned variance (iDDPM's v) is taken from the conditional pass (our choice; GLIDE's
    released sampling code does the same). `channels`: how many output channels are the
    prediction (the image's C)."""

    def __init__(self, model, w, channels):
        super().__init__()
        if not getattr(model, "null_class", False):
            raise ValueError("this model was trained without a null class (--p_uncond 0, the paper's "
                             "setting), so it cannot be guided: train it with --p_uncond 0.1, or "
                             "sample it with guidance 0")
        self.model, self.w, self.channels = model, float(w), channels

    def forward(self, x_t, t, c=None, **kwargs):
        null = torch.full_like(c, self.model.num_classes)
        double = lambda v: torch.cat([v, v]) if torch.is_tensor(v) else v
        out = self.model(double(x_t), double(t), c=torch.cat([c, null]),
                         **{k: double(v) for k, v in kwargs.items()})
        cond, uncond = out.chunk(2)
        C = self.channels
        guided = (1 + self.w) * cond[:, :C] - self.w * uncond[:, :C]
        return torch.cat([guided, cond[:, C:]], dim=1)


def guided_model(model, w, channels):
    """The model to sample with at guidance w: the model itself for w = 0 (exactly unguided),
    else a GuidedModel (which refuses models without a null class)."""
    return model if not w else GuidedModel(model, w, channels)


# --- progressive distillation (PD Alg. 2): a student takes one step where its teacher took two ---
# The step counts the solvers above need are the floor of what a *trained* network allows. PD
# changes the network instead: a student, initialised from its teacher, learns to land in one
# deterministic DDIM step (sample_ddim, eta = 0) where the teacher lands in two; the student then
# teaches the next round, halving the steps again (32 -> 16 -> ... -> 1). The training loop is the
# ordinary one (trainer.py) with distillation_loss in place of L_simple; distill.py runs the rounds.
# (PD's algorithm, target and weights as readers' notes of the paper give them: docs/paper.md.)

def distillation_grid(T, N):
    """The N steps of a distilled sampler on a T-step schedule, with 0 (the clean image) first:
    PD's student times t = i/N, i = 0..N, as integer steps t_i = round(i T / N). Every other
    step of the 2N-step grid is the N-step grid -- distillation_grid(T, 2N)[::2] ==
    distillation_grid(T, N) -- so a teacher's two steps span exactly one of its student's."""
    if not 1 <= N <= T:
        raise ValueError(f"cannot distil to {N} steps on a schedule of T = {T}; use 1..{T}")
    return [round(i * T / N) for i in range(N + 1)]


def ddim_step(x0_hat, z_t, abar_t, abar_s):
    """Deterministic DDIM (eta = 0, DDIM Eq. (12)) from step t to an earlier step s, written with
    alpha = sqrt(abar), sigma = sqrt(1 - abar) as PD does:

        z_s = alpha_s x0_hat + (sigma_s / sigma_t) (z_t - alpha_t x0_hat)

    abar_t, abar_s: per-example tensors broadcast over the image (or numbers)."""
    return abar_s.sqrt() * x0_hat + ((1 - abar_s) / (1 - abar_t)).sqrt() * (z_t - abar_t.sqrt() * x0_hat)


def distillation_target(chain, teacher, z_t, i, model_kwargs):
    """PD Alg. 2's target x~ for a student at index i of the teacher's chain (i even, >= 2; the
    student's one step spans the teacher's i -> i - 1 -> i - 2, t -> t' -> t''):

        z_t'  = DDIM step of the teacher from z_t   to t'    (ddim_step, x0_hat = teacher's)
        z_t'' = DDIM step of the teacher from z_t'  to t''
        x~    = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

    x~ is the x0_hat that takes z_t to z_t'' in *one* DDIM step: ddim_step(x~, z_t, t -> t'') ==
    z_t''. (At t'' = 0, sigma_t'' = 0 and x~ = z_t'': the teacher's final image.) The teacher's
    x0_hat is clipped to [-1, 1] as in every sampler here (denoise), so its two steps are exactly
    sample_ddim's. i: int64 (B,) indices of `chain` (the teacher's respaced chain)."""
    abar = lambda j: chain._at("alphas_cumprod", j, z_t)
    when = lambda j: torch.as_tensor(chain.timesteps, device=z_t.device)[j]
    z = z_t
    for j in (i, i - 1):                                   # the teacher's two DDIM steps
        out = teacher(z, when(j), **model_kwargs).float()
        x0_hat = chain.x0_and_eps(z, j, chain.split_output(out)[0])[0].clamp(-1, 1)
        z = ddim_step(x0_hat, z, abar(j), abar(j - 1))
    ratio = ((1 - abar(i - 2)) / (1 - abar(i))).sqrt()     # sigma_t'' / sigma_t
    return (z - ratio * z_t) / (abar(i - 2).sqrt() - ratio * abar(i).sqrt())


def distillation_loss(chain, student, teacher, x0, i, eps, model_kwargs):
    """PD Alg. 2's loss for clean images x0 at teacher-chain indices i (even), per example (B,):

        z_t = alpha_t x0 + sigma_t eps,    L = w(lambda_t) || x~ - x0_hat_student(z_t) ||^2

    with w = 1 + SNR_t = 1 / sigma_t^2 (PD's "SNR+1" weighting, chosen so that the weight stays
    positive at SNR = 0, t = T). For a velocity-predicting network this *is* the plain squared error
    of the velocity (x0_hat - x~ = -sigma_t (v_hat - v~)), the loss it was trained with. The
    student's x0_hat is not clipped (as in L_simple); a learned variance output is not trained
    (DDIM does not use it). The student sees everything its teacher sees (model_kwargs: class,
    and an SR stage's z and s)."""
    z_t = chain.q_sample(x0, i, eps)
    with torch.no_grad():
        x_tilde = distillation_target(chain, teacher, z_t, i, model_kwargs)
    out = student(z_t, torch.as_tensor(chain.timesteps, device=x0.device)[i], **model_kwargs).float()
    x0_hat = chain.x0_and_eps(z_t, i, chain.split_output(out)[0])[0]
    return mean_flat((x0_hat - x_tilde) ** 2) / (1 - chain._at("alphas_cumprod", i, x0)).flatten()


# =============================================================================================
# 7. Checkpoints: save the config and the tensors; load them back
# =============================================================================================

# A checkpoint is a dict of plain values and tensors, nothing else (so torch.load with
# weights_only=True can read it, and a hostile file cannot run code):
#   config  everything needed to rebuild the stage: model (UNet's arguments), diffusion,
#           augment, resolution, low_res, classes, ...
#   model   the network's weights (state_dict);  ema  their exponential moving average
# plus what training needs to resume (optimizer state, step, random states). Writing it (atomically)
# and reading it (with every check on the file) is safety.py's work; rebuilding is this:

def stage_from_checkpoint(ckpt, device="cpu", ema=True):
    """Rebuild a trained stage from its checkpoint alone: model (EMA weights by default),
    diffusion and augmentation configuration all come from the file."""
    cfg = ckpt["config"]
    model = model_from_config(cfg["model"])
    model.load_state_dict(ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"])
    return Stage(model.to(device).eval(), diffusion_from_config(cfg["diffusion"]), cfg)
