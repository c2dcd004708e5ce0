"""test_cdm.py -- the paper's tests: every component of cdm.py checked against numbers, not just shapes.

Run all:   python -m pytest -q test_cdm.py
Run one:   python -m pytest -q test_cdm.py -k posterior

The tests follow cdm.py's sections, 1 (noise schedules) to 7 (checkpoints), one or more per
component. Each test names the function it checks, so a student who re-implements one function
(say cosine_schedule or q_posterior) runs exactly its test. This file stands alone (the teaching
kit's copy for students runs it): it imports cdm, numpy, torch and pytest (and its checkpoint
test safety.py and trainer.py, which that copy holds too). The tests of the scripts, safety, data, the teaching kit, speed and the docs are in tests/; the whole suite is
`python -m pytest -q test_cdm.py tests`.
"""
import copy
import math

import numpy as np
import pytest
import torch

import cdm


def tiny_unet(**kw):
    cfg = dict(resolution=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), num_heads=2, num_classes=3)
    cfg.update(kw)
    return cdm.UNet(**cfg)


def stage_config(**kw):
    model = dict(resolution=8, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                 attention_resolutions=[4], num_heads=2, dropout=0.0, out_channels=6, num_classes=3,
                 low_res=None, aug_time=False)
    return {"resolution": 8, "low_res": None, "num_classes": 3, "class_names": ["a", "b", "c"],
            "data": "shapes", "model": model, "augment": {"type": "none"}, "sample_steps": 5,
            "diffusion": {"schedule": "cosine", "T": 100, "variance": "learned", "lambda_vlb": 0.001}, **kw}


# =============================================================================================
# 1. Noise schedules
# =============================================================================================

def test_cosine_schedule_closed_form_and_clip():
    T = 1000
    betas = cdm.cosine_schedule(T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    assert betas.shape == (T + 1,) and betas[0] == 0
    abar = np.cumprod(1 - betas)
    # Before the clip bites, abar_t = f(t) / f(0) exactly (iDDPM Eq. 17).
    for t in (1, 10, 250, 500, 900, 990):
        assert abar[t] == pytest.approx(f(t) / f(0), rel=1e-9)
    # At t = T the unclipped beta would be 1 (f(T) = 0): it is clipped to 0.999.
    assert betas[T] == pytest.approx(0.999)
    assert np.all(betas[1:] <= 0.999) and np.all(np.diff(betas[1:]) >= -1e-12)


def test_linear_schedule_closed_form():
    betas = cdm.linear_schedule(1000)
    assert betas[1] == pytest.approx(1e-4) and betas[1000] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas[1:]), (0.02 - 1e-4) / 999)
    # T = 2000 rescales the end points by 1000/T: the same continuous process, ~same abar_T.
    b2 = cdm.linear_schedule(2000)
    assert b2[1] == pytest.approx(5e-5) and b2[2000] == pytest.approx(0.01)
    assert np.prod(1 - b2[1:]) == pytest.approx(np.prod(1 - betas[1:]), rel=0.05)


def test_make_betas_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        cdm.make_betas("sigmoid", 100)
    with pytest.raises(ValueError, match="T must be"):
        cdm.make_betas("cosine", 0)


# =============================================================================================
# 2. Gaussian diffusion
# =============================================================================================

def test_q_sample_mean_and_variance():
    d = cdm.GaussianDiffusion(cdm.cosine_schedule(100))
    torch.manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    for t in (0, 1, 30, 99):
        xt = d.q_sample(x0, torch.full((len(x0),), t), torch.randn_like(x0))
        abar = d.alphas_cumprod[t]
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5e-3)
        assert xt.var().item() == pytest.approx(1 - abar, abs=5e-3 + 0.02 * (1 - abar))


def test_q_posterior_matches_bayes_rule():
    # Independently: q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0), a product of Gaussians in
    # x_{t-1}; its precision is the sum of precisions and its mean the precision-weighted mean.
    d = cdm.GaussianDiffusion(cdm.linear_schedule(50))
    x0, xt = torch.tensor([0.3, -0.8]).view(2, 1, 1, 1), torch.tensor([1.1, 0.2]).view(2, 1, 1, 1)
    for t in (2, 17, 50):
        beta, abar_prev = d.betas[t], d.alphas_cumprod[t - 1]
        prec = (1 - beta) / beta + 1 / (1 - abar_prev)
        mean = ((math.sqrt(1 - beta) / beta) * xt + (math.sqrt(abar_prev) / (1 - abar_prev)) * x0) / prec
        m, v, logv = d.q_posterior(x0, xt, torch.full((2,), t))
        assert torch.allclose(m, mean.float(), atol=1e-5)
        assert v.flatten()[0].item() == pytest.approx(1 / prec, rel=1e-5)
        assert logv.flatten()[0].item() == pytest.approx(math.log(1 / prec), rel=1e-5)


def test_posterior_coefficients_closed_form():
    """beta~_t and the two coefficients of mu~_t (DDPM Eq. (7)) against a loop over t on a short
    hand-made schedule: zero at t = 0, and beta~_1 = 0 (given x_1 and x0, x_0 is x0)."""
    betas = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    var, cx0, cxt = cdm.posterior_coefficients(betas)
    a = 1.0                                              # abar_t, running
    for t in range(1, 5):
        a_before, a = a, a * (1 - betas[t])
        assert var[t] == pytest.approx(betas[t] * (1 - a_before) / (1 - a))
        assert cx0[t] == pytest.approx(betas[t] * a_before ** 0.5 / (1 - a))
        assert cxt[t] == pytest.approx((1 - a_before) * (1 - betas[t]) ** 0.5 / (1 - a))
    assert var[0] == cx0[0] == cxt[0] == 0 and var[1] == 0


def test_normal_kl_matches_numerical_integration():
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.4, math.log(1.7)
    x = np.linspace(-12, 12, 200_001)
    p = np.exp(-(x - m1) ** 2 / (2 * math.exp(lv1))) / math.sqrt(2 * math.pi * math.exp(lv1))
    q = np.exp(-(x - m2) ** 2 / (2 * math.exp(lv2))) / math.sqrt(2 * math.pi * math.exp(lv2))
    numeric = np.trapezoid(p * np.log(p / q), x)
    kl = cdm.normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2)))
    assert kl.item() == pytest.approx(numeric, rel=1e-6)


def test_discretized_log_likelihood_matches_integration():
    mean, sd = torch.tensor(0.1, dtype=torch.float64), 0.3
    pdf = lambda u: np.exp(-(u - 0.1) ** 2 / (2 * sd ** 2)) / math.sqrt(2 * math.pi) / sd
    for k in (0, 1, 100, 140, 254, 255):
        x0 = 2 * k / 255 - 1
        lo = -8.0 if k == 0 else x0 - 1 / 255         # the edge bins reach to -inf / +inf
        hi = 8.0 if k == 255 else x0 + 1 / 255
        u = np.linspace(lo, hi, 200_001)
        numeric = np.trapezoid(pdf(u), u)
        ll = cdm.discretized_gaussian_log_likelihood(torch.tensor(x0, dtype=torch.float64), mean,
                                                     torch.tensor(math.log(sd), dtype=torch.float64))
        assert math.exp(ll.item()) == pytest.approx(numeric, rel=2e-3, abs=1e-9)
    # The 256 bins are a distribution: probabilities sum to one.
    x0 = torch.linspace(-1, 1, 256, dtype=torch.float64)
    probs = cdm.discretized_gaussian_log_likelihood(x0, mean, torch.tensor(math.log(sd))).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_learned_range_variance_endpoints():
    d = cdm.GaussianDiffusion(cdm.cosine_schedule(100), variance="learned")
    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([2, 50, 100])
    hi = d.model_log_variance(torch.ones_like(x), t, x)      # v = +1 -> beta_t
    lo = d.model_log_variance(-torch.ones_like(x), t, x)     # v = -1 -> beta~_t
    mid = d.model_log_variance(torch.zeros_like(x), t, x)
    for i, ti in enumerate(t.tolist()):
        assert hi[i, 0, 0, 0].item() == pytest.approx(math.log(d.betas[ti]), rel=1e-5)
        assert lo[i, 0, 0, 0].item() == pytest.approx(math.log(d.posterior_variance[ti]), rel=1e-5)
        assert mid[i, 0, 0, 0].item() == pytest.approx(0.5 * (math.log(d.betas[ti])
                                                              + math.log(d.posterior_variance[ti])), rel=1e-5)


def test_respacing_keeps_abar_and_full_respacing_is_identity():
    d = cdm.GaussianDiffusion(cdm.cosine_schedule(200), variance="learned")
    full = d.respace(200)
    assert np.allclose(full.betas, d.betas, rtol=1e-10, atol=1e-14)
    assert np.array_equal(full.timesteps, d.timesteps)
    r = d.respace(10, include=[37])
    kept = r.timesteps[1:]
    assert len(kept) == 11 and 37 in kept and kept[-1] == 200
    assert np.allclose(r.alphas_cumprod[1:], d.alphas_cumprod[kept], rtol=1e-10)
    with pytest.raises(ValueError, match="sampling steps"):
        d.respace(0)
    for K in (1, 2, 3, 7, 199, 200):                       # every chain starts at T, K steps long
        kept = cdm.spaced_timesteps(200, K)
        assert kept[-1] == 200 and len(kept) == K and kept == sorted(set(kept))
    assert cdm.spaced_timesteps(200, 1) == [200]           # one jump from x_T to x_0, not from x_1


class Spy(torch.nn.Module):
    """A stand-in network that records what it was called with and predicts eps = 0.1 x_t."""

    def __init__(self, out_channels=3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls, self.out_channels = [], out_channels

    def forward(self, x_t, t, c=None, z=None, s=None):
        self.calls.append({"t": t.clone(), "z": None if z is None else z.clone(),
                           "s": None if s is None else s.clone(), "x_t": x_t.clone()})
        eps = 0.1 * x_t
        return eps if self.out_channels == 3 else torch.cat([eps, torch.zeros_like(eps)], 1)


def known_mean_variance(mean, log_variance, x0_hat, eps):
    """A stand-in for GaussianDiffusion.p_mean_variance returning fixed values, so that a sampler
    step can be checked on its own arithmetic."""
    return lambda model, x, t, model_kwargs, clip=True: (torch.full_like(x, mean), torch.full_like(x, log_variance),
                                                         torch.full_like(x, x0_hat), torch.full_like(x, eps))


def test_ancestral_sampler_closed_form():
    """DDPM Alg. 2's step x_{t-1} = mu + sigma n with sigma = exp(log variance / 2), and no noise
    on the last step (t = 1)."""
    d = cdm.GaussianDiffusion(np.concatenate([[0.0], np.full(10, 0.1)]))
    d.p_mean_variance = known_mean_variance(0.5, math.log(0.04), 0.0, 0.0)
    x = torch.zeros(1, 3, 2, 2)
    n = torch.full_like(x, 2.0)
    assert torch.allclose(cdm.sample_ancestral(d, None, x, {}, [5], lambda: n), torch.full_like(x, 0.5 + 0.2 * 2.0))
    last = cdm.sample_ancestral(d, None, x, {}, [1], lambda: pytest.fail("noise drawn on the last step"))
    assert torch.allclose(last, torch.full_like(x, 0.5))
    draws = []
    cdm.sample_ancestral(d, None, x, {}, [3, 2, 1], lambda: draws.append(1) or n)
    assert len(draws) == 2                                      # one draw a step, none on the last


def test_ddim_sampler_closed_form():
    """DDIM Eq. (12) with sigma of Eq. (16), number by number, from index 4 to 3 of a schedule
    with abar_t = 0.7^t, through the shared denoiser: the network predicts x0 = 1.7, which is
    clipped to 1, and eps_hat is the noise consistent with the clipped x0_hat, not the one the
    raw prediction implies."""
    d = cdm.GaussianDiffusion(np.concatenate([[0.0], np.full(6, 0.3)]), prediction="x0")
    net = lambda x_t, t, **kw: torch.full_like(x_t, 1.7)
    x, n = torch.full((1, 1, 2, 2), 1.3), torch.full((1, 1, 2, 2), -0.5)
    a4, a3 = 0.7 ** 4, 0.7 ** 3
    x0_hat, eps_hat = d.denoise(net, x, 4, {})
    e = (1.3 - a4 ** 0.5 * 1.0) / (1 - a4) ** 0.5
    assert torch.allclose(x0_hat, torch.ones_like(x)) and torch.allclose(eps_hat, torch.full_like(x, e))
    for eta in (0.0, 0.6):
        s = eta * ((1 - a3) / (1 - a4)) ** 0.5 * (1 - a4 / a3) ** 0.5
        want = a3 ** 0.5 * 1.0 + (1 - a3 - s ** 2) ** 0.5 * e + s * -0.5
        got = cdm.sample_ddim(d, net, x, {}, [4], lambda: n, eta)
        assert torch.allclose(got, torch.full_like(x, want), atol=1e-5), eta


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
    torch.manual_seed(0)
    model = tiny_unet(out_channels=3)
    with torch.no_grad():  # give the zero-initialised output layer some weights
        for p in model.out.parameters():
            p.normal_(0, 0.05)
    d = cdm.GaussianDiffusion(cdm.cosine_schedule(100)).respace(10)
    xT = torch.randn(2, 3, 8, 8)
    kw = {"c": torch.tensor([0, 2])}
    run = lambda sampler, seed, eta=0.0: d.sample(model, xT.shape, kw, sampler=sampler, eta=eta, noise=xT,
                                                  generator=torch.Generator().manual_seed(seed))
    a = run("ddim", 1)
    assert torch.equal(a, run("ddim", 2))
    assert not torch.allclose(a, run("ddim", 1, eta=1.0)) and not torch.allclose(a, run("ancestral", 2))
    for ode in ("dpm++2m", "heun"):                      # the ODE solvers draw only x_T
        assert torch.equal(run(ode, 1), run(ode, 2))
    assert not torch.allclose(run("dpm++2m-sde", 1), run("dpm++2m-sde", 2))


def test_sample_stops_at_the_requested_step():
    d = cdm.GaussianDiffusion(cdm.cosine_schedule(100)).respace(5, include=[33])
    spy = Spy()
    d.sample(spy, (2, 3, 4, 4), {}, stop_at=33)
    seen = [call["t"][0].item() for call in spy.calls]
    assert seen == [t for t in sorted(d.timesteps[1:], reverse=True) if t > 33]
    with pytest.raises(ValueError, match="not on this sampling chain"):
        cdm.GaussianDiffusion(cdm.cosine_schedule(100)).respace(5).sample(spy, (1, 3, 4, 4), {}, stop_at=33)


@pytest.mark.parametrize("prediction", cdm.PREDICTIONS)
def test_ancestral_sampling_with_the_true_prediction_recovers_a_point_mass(prediction):
    # If the data is a single point x0*, the optimal prediction is known in closed form (eps =
    # (x_t - sqrt(abar) x0*) / sqrt(1 - abar), and target() of it); sampling with it must land on
    # x0*. Checks p_mean_variance, the inversion x0_and_eps and the loop, for each parameterisation.
    target = torch.tensor([0.5, -0.25, 0.0]).view(1, 3, 1, 1)
    base = cdm.GaussianDiffusion(cdm.cosine_schedule(200), variance="fixed", prediction=prediction)
    d = base.respace(20)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x_t, t, **kw):
            abar = torch.as_tensor(base.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
            eps = (x_t - abar.sqrt() * target) / (1 - abar).sqrt()
            return base.target(target.expand_as(x_t), eps, t)

    x = d.sample(Oracle(), (4, 3, 2, 2), {}, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x, target.expand_as(x), atol=1e-4)


@pytest.mark.parametrize("prediction", cdm.PREDICTIONS)
def test_prediction_targets_invert_to_x0_and_eps(prediction):
    # x0_and_eps(x_t, t, target(x0, eps, t)) must give back (x0, eps) exactly, at every t; and the
    # velocity has its closed form v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022).
    d = cdm.GaussianDiffusion(cdm.cosine_schedule(1000), prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(64, 3, 4, 4, generator=g) * 2 - 1, torch.randn(64, 3, 4, 4, generator=g)
    t = torch.linspace(1, 990, 64).long()
    x_t = d.q_sample(x0, t, eps)
    x0_hat, eps_hat = d.x0_and_eps(x_t, t, d.target(x0, eps, t))
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=0)
    abar = torch.as_tensor(d.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    expected = {"eps": eps, "x0": x0, "velocity": abar.sqrt() * eps - (1 - abar).sqrt() * x0}
    torch.testing.assert_close(d.target(x0, eps, t), expected[prediction])


def test_velocity_target_closed_form():
    """The regression targets number by number, on a schedule with abar_t = 0.8^t: eps, x0, and
    PD §4's velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v = eps at t = 0)."""
    betas = np.concatenate([[0.0], np.full(10, 0.2)])
    x0, eps = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), -1.5)
    for prediction, want in (("eps", lambda a: -1.5), ("x0", lambda a: 0.5),
                             ("velocity", lambda a: a ** 0.5 * -1.5 - (1 - a) ** 0.5 * 0.5)):
        d = cdm.GaussianDiffusion(betas, prediction=prediction)
        for t in (0, 1, 5, 10):
            got = d.target(x0, eps, torch.tensor([t])).item()
            assert got == pytest.approx(want(0.8 ** t), rel=1e-5), (prediction, t)


def test_velocity_loss_weights_x0_errors_evenly_across_noise_levels():
    # Why the SR stages predict the velocity: for the same error in x0_hat, the eps loss shrinks
    # like abar / (1 - abar) as the noise grows (it pays ~nothing for a wrong x0 at high noise),
    # while the velocity loss stays ||x0_hat - x0||^2 / (1 - abar) >= ||x0_hat - x0||^2.
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, torch.randn(1, 3, 8, 8, generator=g)
    err = 0.1 * torch.randn(1, 3, 8, 8, generator=g)
    losses = {}
    for prediction in ("eps", "velocity"):
        d = cdm.GaussianDiffusion(cdm.cosine_schedule(1000), prediction=prediction)
        for t in (100, 990):
            tt = torch.tensor([t])
            x_t = d.q_sample(x0, tt, eps)
            # the prediction whose x0_hat is x0 + err, at the same x_t
            wrong = d.target(x0 + err, (x_t - d._at("alphas_cumprod", tt, x_t).sqrt() * (x0 + err))
                             / (1 - d._at("alphas_cumprod", tt, x_t)).sqrt(), tt)
            losses[prediction, t] = ((wrong - d.target(x0, eps, tt)) ** 2).mean().item()
    e2 = (err ** 2).mean().item()
    abar = cdm.cosine_schedule(1000)
    abar = np.cumprod(1 - abar)
    for t in (100, 990):
        assert losses["eps", t] == pytest.approx(e2 * abar[t] / (1 - abar[t]), rel=1e-3)
        assert losses["velocity", t] == pytest.approx(e2 / (1 - abar[t]), rel=1e-3)
    assert losses["eps", 990] < 1e-3 * e2 and losses["velocity", 990] >= e2


def test_initial_l_simple_is_one_with_zero_initialised_output():
    torch.manual_seed(0)
    model = tiny_unet(out_channels=6)
    d = cdm.GaussianDiffusion(cdm.cosine_schedule(100), variance="learned")
    x0 = torch.rand(256, 3, 8, 8) * 2 - 1
    out = d.training_losses(model, x0, torch.randint(1, 101, (256,)), {"c": torch.randint(0, 3, (256,))})
    assert out["mse"].mean().item() == pytest.approx(1.0, abs=0.03)   # eps_hat = 0: E[eps^2] = 1
    assert torch.isfinite(out["vlb"]).all() and (out["vlb"] >= 0).all()


def test_hybrid_loss_vlb_trains_only_the_variance():
    # The stop-gradient of iDDPM §3.1: the VLB term must not move the eps half of the output.
    torch.manual_seed(0)
    d = cdm.GaussianDiffusion(cdm.cosine_schedule(50), variance="learned")
    head = torch.nn.Parameter(torch.randn(1, 6, 1, 1) * 0.1)
    model = lambda x_t, t, **kw: x_t.repeat(1, 2, 1, 1) * head
    x0 = torch.rand(8, 3, 4, 4) * 2 - 1
    terms = d.training_losses(model, x0, torch.randint(1, 51, (8,)), {})
    terms["vlb"].mean().backward()
    assert head.grad[:, :3].abs().max() == 0 and head.grad[:, 3:].abs().max() > 0


def test_hybrid_loss_closed_form():
    """L_simple is the mean squared error of the prediction against its target, and L_hybrid =
    L_simple + lambda L_vlb with L_vlb = T L_t (iDDPM Eq. (16), lambda = 0.001): checked on a
    model whose output is known, at T = 50, where forgetting the T changes the loss 50-fold."""
    torch.manual_seed(0)
    d = cdm.GaussianDiffusion(cdm.linear_schedule(50), variance="learned")
    out = torch.randn(4, 6, 2, 2) * 0.3
    model = lambda x_t, t, **kw: out
    x0, eps, t = torch.rand(4, 3, 2, 2) * 2 - 1, torch.randn(4, 3, 2, 2), torch.tensor([1, 7, 30, 50])
    terms = d.training_losses(model, x0, t, {}, eps=eps)
    mse = ((eps - out[:, :3]) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["mse"], mse, atol=1e-6)
    assert torch.allclose(terms["loss"], mse + 0.001 * 50 * terms["vlb"], atol=1e-6)
    assert (terms["vlb"] > 0).all()
    fixed = cdm.GaussianDiffusion(cdm.linear_schedule(50)).training_losses(lambda x_t, t, **kw: out[:, :3], x0, t, {},
                                                                            eps=eps)
    assert torch.allclose(fixed["loss"], mse, atol=1e-6) and "vlb" not in fixed


def test_respaced_chain_tells_the_network_the_original_t():
    """A chain respaced to K steps calls the network with the training schedule's t at every
    index (iDDPM §4), not with the index itself."""
    d = cdm.GaussianDiffusion(cdm.linear_schedule(100))
    r = d.respace(5)
    kept = cdm.spaced_timesteps(100, 5)
    assert list(r.timesteps) == [0, *kept] and r.T == 5
    spy = Spy()
    r.p_mean_variance(spy, torch.zeros(2, 3, 4, 4), torch.tensor([3, 5]), {})
    assert spy.calls[0]["t"].tolist() == [kept[2], kept[4]]


@pytest.mark.parametrize("prediction", ["eps", "velocity"])
def test_overfitting_one_batch_drives_the_loss_down(prediction):
    torch.manual_seed(0)
    model = tiny_unet(out_channels=6)
    d = cdm.GaussianDiffusion(cdm.cosine_schedule(100), variance="learned", prediction=prediction)
    x0 = torch.rand(8, 3, 8, 8) * 2 - 1
    c = torch.randint(0, 3, (8,))
    t = torch.randint(1, 101, (8,))
    eps = torch.randn_like(x0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = d.training_losses(model, x0, t, {"c": c}, eps=eps)["mse"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# =============================================================================================
# 3. Conditioning augmentation (CDM §3, §3.1) and the low-res <-> high-res maps
# =============================================================================================

def test_noise_augment_identity_at_zero_and_forward_marginal():
    low = cdm.GaussianDiffusion(cdm.cosine_schedule(1000))
    z0 = torch.rand(4, 3, 8, 8) * 2 - 1
    assert torch.equal(cdm.noise_augment(z0, torch.zeros(4, dtype=torch.long), low), z0)
    torch.manual_seed(0)
    z0 = torch.full((100_000, 1, 1, 1), -0.6)
    s = 250
    zs = cdm.noise_augment(z0, torch.full((len(z0),), s), low)
    abar = low.alphas_cumprod[s]
    assert zs.mean().item() == pytest.approx(math.sqrt(abar) * -0.6, abs=0.01)
    assert zs.var().item() == pytest.approx(1 - abar, rel=0.03)


def test_sample_aug_time_covers_zero_to_s_max():
    s = cdm.sample_aug_time(torch.rand(20_000, generator=torch.Generator().manual_seed(0)), 7)
    assert s.min() == 0 and s.max() == 7
    assert cdm.sample_aug_time(torch.tensor([0.0, 0.5, 1 - 2 ** -24]), 7).tolist() == [0, 4, 7]
    assert np.allclose(np.bincount(s.numpy()) / 20_000, 1 / 8, atol=0.015)


def test_blur_kernel_sums_to_one_and_is_symmetric():
    k = cdm.gaussian_kernel3(torch.tensor([0.4, 0.5, 0.6]))
    assert torch.allclose(k.sum(dim=(1, 2)), torch.ones(3))
    assert torch.allclose(k, k.transpose(1, 2)) and torch.allclose(k, k.flip(1)) and torch.allclose(k, k.flip(2))
    assert (k[:, 1, 1] > k[:, 0, 1]).all() and (k[:, 0, 1] > k[:, 0, 0]).all()
    assert (k[0, 1, 1] > k[2, 1, 1])  # smaller sigma, sharper kernel
    # Closed form of the centre weight: 1 / (1 + 2 exp(-1 / (2 sigma^2)))^2.
    assert k[1, 1, 1].item() == pytest.approx(1 / (1 + 2 * math.exp(-1 / 0.5)) ** 2, rel=1e-6)


def test_blur_augment_hits_about_half_and_preserves_mean():
    z = torch.rand(2000, 3, 8, 8)
    out, applied = cdm.blur_augment(z, u=torch.rand(2000, 2, generator=torch.Generator().manual_seed(0)))
    assert 0.45 < applied.float().mean().item() < 0.55
    assert torch.equal(out[~applied], z[~applied])
    changed = (out[applied] - z[applied]).abs().amax(dim=(1, 2, 3))
    assert (changed > 0).all()
    constant = torch.full((4, 3, 8, 8), 0.3)       # a blur leaves a flat image flat
    assert torch.allclose(cdm.blur_augment(constant, p=1.0)[0], constant, atol=1e-6)


def test_downsample_is_area_average():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(cdm.downsample(x, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    with pytest.raises(ValueError, match="integer factor"):
        cdm.downsample(x, 3)


# =============================================================================================
# 4. The U-Net (DDPM App. B, iDDPM, ADM §3), with the SR inputs of CDM §3
# =============================================================================================

def test_unet_shapes_base_and_sr():
    base = tiny_unet(out_channels=6)
    x = torch.randn(2, 3, 8, 8)
    assert base(x, torch.tensor([1, 5]), c=torch.tensor([0, 2])).shape == (2, 6, 8, 8)
    sr = tiny_unet(resolution=16, low_res=8, aug_time=True)
    assert sr.input_conv.in_channels == 6                     # x_t and up(z) concatenated
    out = sr(torch.randn(2, 3, 16, 16), torch.tensor([3, 4]), c=torch.tensor([1, 1]),
             z=torch.randn(2, 3, 8, 8), s=torch.tensor([0, 7]))
    assert out.shape == (2, 3, 16, 16)


def test_unet_conditioning_inputs_matter():
    torch.manual_seed(0)
    sr = tiny_unet(resolution=16, low_res=8, aug_time=True)
    with torch.no_grad():
        for p in sr.parameters():
            p.add_(torch.randn_like(p) * 0.05)          # leave the zero-initialised regime
    x, t, c, z, s = torch.randn(1, 3, 16, 16), torch.tensor([3]), torch.tensor([1]), torch.randn(1, 3, 8, 8), torch.tensor([5])
    ref = sr(x, t, c=c, z=z, s=s)
    for kw in ({"c": torch.tensor([2])}, {"z": torch.randn(1, 3, 8, 8)}, {"s": torch.tensor([300])}):
        args = {"c": c, "z": z, "s": s, **kw}
        assert not torch.allclose(sr(x, t, **args), ref)


def test_conditioning_closed_form():
    """UNet.conditioning: x_in is x_t then upsample(z) along channels, and emb is the sum of t's
    embedding, the class embedding and s's own embedding (CDM §3.2: not t's); a residual block
    scales and shifts GN(h) by (1 + scale, shift) from the embedding (ADM §3.1), so a zero
    embedding projection leaves GN(h) as it is."""
    torch.manual_seed(0)
    sr = tiny_unet(resolution=16, low_res=8, aug_time=True)
    with torch.no_grad():
        for p in sr.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    x, t, c = torch.randn(2, 3, 16, 16), torch.tensor([3, 40]), torch.tensor([1, 2])
    z, s = torch.randn(2, 3, 8, 8), torch.tensor([5, 90])
    x_in, emb = sr.conditioning(x, t, c, z, s)
    assert torch.equal(x_in[:, :3], x) and torch.allclose(x_in[:, 3:], cdm.upsample(z, 16))
    te = lambda v: cdm.timestep_embedding(v, sr.model_channels)
    assert torch.allclose(emb, sr.time_embed(te(t)) + sr.class_embed(c) + sr.aug_embed(te(s)), atol=1e-6)
    block = sr.down[0][0]                                  # the first residual block
    h = torch.randn(2, block.in_layers[2].in_channels, 16, 16)
    inner = block.in_layers(h)
    with torch.no_grad():
        block.emb_layers[1].weight.zero_()
        block.emb_layers[1].bias.copy_(torch.cat([torch.full((inner.shape[1],), 0.5), torch.full((inner.shape[1],), -1.0)]))
    want = block.skip(h) + block.out_layers(block.out_norm(inner) * 1.5 - 1.0)
    assert torch.allclose(block(h, emb), want, atol=1e-5)


def test_unet_rejects_bad_inputs():
    m = tiny_unet(resolution=16, low_res=8, aug_time=True)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([1])
    good = {"c": torch.tensor([0]), "z": torch.randn(1, 3, 8, 8), "s": torch.tensor([0])}
    with pytest.raises(ValueError, match="16x16 images"):
        m(torch.randn(1, 3, 32, 32), t, **good)
    with pytest.raises(ValueError, match=r"class labels must lie in 0\.\.2"):
        m(x, t, **{**good, "c": torch.tensor([3])})
    with pytest.raises(ValueError, match="needs 3-channel z at 8x8"):
        m(x, t, **{**good, "z": torch.randn(1, 3, 4, 4)})
    with pytest.raises(ValueError, match="pass s"):
        m(x, t, **{**good, "s": None})


def test_skip_rescale_divides_every_residual_sum_by_sqrt2():
    """SR3's --skip_rescale: with the residual branches zeroed (the initialisation), each ResBlock
    and AttentionBlock returns its input / sqrt(2) instead of its input."""
    torch.manual_seed(0)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 16)
    for rescale, factor in ((False, 1.0), (True, 1 / math.sqrt(2))):
        block = cdm.ResBlock(8, 8, 16, 0.0, skip_rescale=rescale)
        attn = cdm.AttentionBlock(8, 2, skip_rescale=rescale)
        assert torch.allclose(block(x, emb), x * factor) and torch.allclose(attn(x), x * factor)
    plain, scaled = tiny_unet(), tiny_unet(skip_rescale=True)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in scaled.parameters())


def test_attention_matches_hand_written_softmax():
    torch.manual_seed(0)
    blk = cdm.AttentionBlock(8, 2)
    torch.nn.init.normal_(blk.proj.weight, std=0.2)
    x = torch.randn(2, 8, 3, 3)
    B, C, H, W = x.shape
    qkv = blk.qkv(blk.norm(x)).reshape(B, 3, 2, 4, H * W)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                 # (B, heads, 4, HW)
    w = torch.softmax(torch.einsum("bhcq,bhck->bhqk", q, k) / 2.0, dim=-1)
    h = torch.einsum("bhqk,bhck->bhcq", w, v).reshape(B, C, H, W)
    assert torch.allclose(blk(x), x + blk.proj(h), atol=1e-5)


def test_fused_attention_matches_formula():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    torch.testing.assert_close(cdm.attention(q, k, v, fused=True), w @ v)
    torch.testing.assert_close(cdm.attention(q, k, v, fused=False), w @ v)


# =============================================================================================
# 5. Cascade sampling (CDM §3, Fig. 1): base -> SR -> SR ...
# =============================================================================================

def fake_stage(resolution, low_res=None, augment=None, T=100, schedule="cosine", num_classes=3, spy=None):
    cfg = {"resolution": resolution, "low_res": low_res, "num_classes": num_classes,
           "class_names": [str(i) for i in range(num_classes)],
           "diffusion": {"schedule": schedule, "T": T, "variance": "fixed"},
           "augment": augment or {"type": "none"}, "sample_steps": 5}
    return cdm.Stage(spy or Spy(), cdm.diffusion_from_config(cfg["diffusion"]), cfg)


def test_truncated_sampling_hands_over_z_s_from_the_right_step():
    noise = {"type": "noise", "schedule": "cosine", "T": 100, "s_max": 50}
    base, sr = fake_stage(4), fake_stage(8, 4, noise)
    c = torch.tensor([0, 1])
    outs = cdm.sample_cascade([base, sr], c, steps=[5, 3], s=[None, 40], truncated=True, progress=False)
    base_ts = [call["t"][0].item() for call in base.model.calls]
    kept = cdm.spaced_timesteps(100, 5, include=[40])         # [1, 26, 40, 50, 75, 100]
    assert base_ts == [t for t in reversed(kept) if t > 40]    # the base chain stopped at s = 40
    sr_call = sr.model.calls[0]
    assert torch.equal(sr_call["s"], torch.full((2,), 40))
    assert torch.equal(sr_call["z"], outs[0])                # z_s handed over untouched
    # Non-truncated: the base runs to z0, which is then re-noised to z_s.
    base2, sr2 = fake_stage(4), fake_stage(8, 4, noise)
    outs2 = cdm.sample_cascade([base2, sr2], c, steps=[5, 3], s=[None, 40], progress=False)
    assert min(call["t"][0].item() for call in base2.model.calls) == 1
    assert not torch.equal(sr2.model.calls[0]["z"], outs2[0])


@pytest.mark.parametrize("sampler", cdm.SAMPLERS)
def test_truncated_handover_at_s_with_every_sampler(sampler):
    # The base chain of each sampler (with its own spacing) contains s and stops there; only
    # Heun's corrector asks the network at s itself; the SR stage gets that z_s untouched.
    noise = {"type": "noise", "schedule": "cosine", "T": 100, "s_max": 50}
    base, sr = fake_stage(4), fake_stage(8, 4, noise)
    outs = cdm.sample_cascade([base, sr], torch.tensor([0, 1]), steps=[6, 3], sampler=[sampler, "ancestral"],
                              s=[None, 40], truncated=True, progress=False)
    base_ts = [call["t"][0].item() for call in base.model.calls]
    assert min(base_ts) == 40 if sampler == "heun" else min(base_ts) > 40
    chain = base.diffusion.sampling_chain(sampler, 6, stop_at=40)
    assert len(base_ts) == chain.nfe(sampler, 40)
    assert torch.equal(sr.model.calls[0]["z"], outs[0])
    with pytest.raises(ValueError, match="samplers must be from"):
        cdm.sample_cascade([base, sr], torch.tensor([0]), steps=[2, 2], sampler=[sampler, "euler"], progress=False)


def test_handover_closed_form():
    """What an SR stage gets of z: truncated (CDM §3.2) z itself, which already is z_s, and s;
    non-truncated (CDM §3.3) z re-noised by the low-res schedule, sqrt(abar_s) z + sqrt(1 - abar_s)
    eps with eps the generator's next draw, and s; a blur stage the clean z and no s."""
    aug = {"type": "noise", "schedule": "linear", "T": 100, "s_max": 50, "sample_s": 20}
    z = torch.rand(3, 3, 4, 4) * 2 - 1
    got = cdm.handover(z, aug, 20, truncated=True)
    assert torch.equal(got["z"], z) and got["s"].tolist() == [20, 20, 20]
    got = cdm.handover(z, aug, 20, truncated=False, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    abar = np.cumprod(1 - cdm.linear_schedule(100))[20]
    assert torch.allclose(got["z"], abar ** 0.5 * z + (1 - abar) ** 0.5 * eps, atol=1e-6)
    assert got["s"].tolist() == [20, 20, 20] and got["s"].dtype == torch.long
    blur = cdm.handover(z, {"type": "blur", "sigma": [0.4, 0.6], "p": 0.5}, None, truncated=False)
    assert set(blur) == {"z"} and torch.equal(blur["z"], z)


def test_blur_stage_gets_clean_z_at_sampling():
    blur = {"type": "blur", "sigma": [0.4, 0.6], "p": 0.5}
    base, sr = fake_stage(4), fake_stage(8, 4, blur)
    outs = cdm.sample_cascade([base, sr], torch.tensor([2]), steps=[3, 3], progress=False)
    assert torch.equal(sr.model.calls[0]["z"], outs[0]) and sr.model.calls[0]["s"] is None


def test_cascade_refuses_stages_that_do_not_fit():
    with pytest.raises(ValueError, match="stage 2 is a 8->16 SR model, but stage 1 makes 4x4"):
        cdm.check_cascade([fake_stage(4), fake_stage(16, 8)])
    with pytest.raises(ValueError, match="first stage must be a base model"):
        cdm.check_cascade([fake_stage(8, 4)])
    with pytest.raises(ValueError, match="different data"):
        cdm.check_cascade([fake_stage(4), fake_stage(8, 4, num_classes=5)])


def test_one_channel_models_make_one_channel_cascades():
    # Models of grayscale data: C = 1 in, 2C = 2 out (learned variance); a cascade keeps C = 1,
    # and refuses to chain a 1-channel stage after a 3-channel one.
    base = cdm.Stage(tiny_unet(in_channels=1, out_channels=2).eval(),
                     cdm.GaussianDiffusion(cdm.cosine_schedule(20), variance="learned"),
                     stage_config(resolution=8, model=dict(in_channels=1)))
    sr = cdm.Stage(tiny_unet(resolution=16, in_channels=1, out_channels=2, low_res=8).eval(),
                   cdm.GaussianDiffusion(cdm.cosine_schedule(20), variance="learned"),
                   stage_config(resolution=16, low_res=8, model=dict(in_channels=1)))
    outs = cdm.sample_cascade([base, sr], torch.tensor([0, 2]), steps=[3, 3], progress=False)
    assert [tuple(o.shape) for o in outs] == [(2, 1, 8, 8), (2, 1, 16, 16)]
    rgb = cdm.Stage(tiny_unet(resolution=16, low_res=8).eval(), sr.diffusion,
                    stage_config(resolution=16, low_res=8))
    with pytest.raises(ValueError, match="1-channel"):
        cdm.check_cascade([base, rgb])
    with pytest.raises(ValueError, match="1-channel"):
        base.model(torch.zeros(1, 3, 8, 8), torch.tensor([1]), c=torch.tensor([0]))


# =============================================================================================
# 6. Beyond the paper: ODE solvers, their noise levels, and classifier-free guidance
# =============================================================================================

def test_dpmpp_2m_sampler_closed_form():
    """Two DPM-Solver++(2M) steps (DPM++ Alg. 2), number by number: the first a DDIM step (D =
    x0_hat), the second with D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_before, r = h_before / h,
    h the step in log-SNR lambda = log(sqrt(abar) / sqrt(1 - abar)); the update is
    x' = (sigma' / sigma) x - alpha' (e^{-h} - 1) D; the last step, to t' = 0, gives x0_hat."""
    d = cdm.GaussianDiffusion(np.concatenate([[0.0], np.full(4, 0.5)]))   # abar_t = 0.5^t
    hats = {3: 0.2, 2: -0.4, 1: 0.3}
    d.denoise = lambda model, x, i, model_kwargs: (torch.full((1, 1, 1, 1), hats[i]), None)
    al = lambda t: (0.5 ** t) ** 0.5
    sg = lambda t: (1 - 0.5 ** t) ** 0.5
    lam = lambda t: math.log(al(t) / sg(t))
    x = torch.full((1, 1, 1, 1), 0.9)
    h1 = lam(2) - lam(3)
    x1 = sg(2) / sg(3) * 0.9 - al(2) * math.expm1(-h1) * 0.2
    assert cdm.sample_dpmpp_2m(d, None, x, {}, [3]).item() == pytest.approx(x1, rel=1e-5)
    h2 = lam(1) - lam(2)
    r = h1 / h2
    D = (1 + 1 / (2 * r)) * -0.4 - 1 / (2 * r) * 0.2
    x2 = sg(1) / sg(2) * x1 - al(1) * math.expm1(-h2) * D
    assert cdm.sample_dpmpp_2m(d, None, x, {}, [3, 2]).item() == pytest.approx(x2, rel=1e-5)
    assert cdm.sample_dpmpp_2m(d, None, x, {}, [3, 2, 1]).item() == pytest.approx(0.3)
    assert torch.equal(cdm.dpmpp_2m_data_term(torch.ones(1), None, 0.5, None), torch.ones(1))


# --- samplers with the exact prediction of Gaussian data: right distribution, right order -----

class GaussianOracle(torch.nn.Module):
    """The exact prediction for data x0 ~ N(mu, std^2 I) (std = 0: a point mass at mu). With
    x_t = a x0 + b eps and v = a^2 std^2 + b^2, the posterior means are closed-form:
        E[x0 | x_t] = mu + a std^2 (x_t - a mu) / v,   E[eps | x_t] = b (x_t - a mu) / v
    and the probability-flow ODE maps x_T to x_t' = a' mu + sqrt(v') (x_T - a_T mu) / sqrt(v_T)."""

    def __init__(self, train, mu=0.1, std=0.15):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.train_diffusion, self.mu, self.std = train, mu, std
        self.calls = []

    def ab(self, t):
        abar = torch.as_tensor(self.train_diffusion.alphas_cumprod)[t]
        return abar.sqrt(), (1 - abar).sqrt()

    def forward(self, x_t, t, **kw):
        self.calls.append(int(t[0]))
        a, b = (v.view(-1, 1, 1, 1) for v in self.ab(t))
        x, v = x_t.double(), a ** 2 * self.std ** 2 + b ** 2
        x0, eps = self.mu + a * self.std ** 2 * (x - a * self.mu) / v, b * (x - a * self.mu) / v
        return self.train_diffusion.target(x0, eps, t).float()

    def flow(self, x_top, t_top, t):
        """Where the exact probability-flow ODE takes x_top (at step t_top) by step t."""
        (a1, b1), (a, b) = self.ab(torch.tensor(t_top)), self.ab(torch.tensor(t))
        v1, v = a1 ** 2 * self.std ** 2 + b1 ** 2, a ** 2 * self.std ** 2 + b ** 2
        return a * self.mu + v.sqrt() * (x_top.double() - a1 * self.mu) / v1.sqrt()


@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("dpm++2m", 2), ("heun", 2)])
def test_ode_samplers_converge_at_their_order(sampler, order):
    # Each solver with the exact eps, from the same x_T, down to s = 100 of a cosine T = 1000 chain
    # with its own step spacing (sampling_chain, cdm.SPACING_OF), against the exact ODE solution
    # there: doubling the steps divides the error by about 2^order (4 for the second-order solvers).
    train = cdm.GaussianDiffusion(cdm.cosine_schedule(1000), variance="fixed")
    oracle = GaussianOracle(train)
    x_top = torch.randn(512, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    errors = []
    for K in (20, 40, 80):
        d = train.sampling_chain(sampler, K, stop_at=100)
        x = d.sample(oracle, x_top.shape, {}, sampler=sampler, stop_at=100, noise=x_top)
        exact = oracle.flow(x_top, int(d.timesteps[-1]), 100)
        errors.append((x.double() - exact).pow(2).mean().sqrt().item())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert errors[2] < 2e-3 * 2 ** (2 - order) * 4, errors
    assert all(0.75 * 2 ** order < r < 1.5 * 2 ** order for r in ratios), (errors, ratios)


@pytest.mark.parametrize("sampler", cdm.SAMPLERS)
@pytest.mark.parametrize("stop_at", [0, 100])
def test_every_sampler_lands_on_the_right_distribution_and_on_s(sampler, stop_at):
    # With the exact prediction of N(mu, std^2) data, every sampler's output has the marginal
    # q(x_t) = N(a mu, a^2 std^2 + b^2) of the step it stops at: the data at t = 0, or z_s at the
    # handover step s of truncated sampling, where the network is never asked below s. 100 steps
    # for the second-order solvers; the first-order ones need all 1000 for 2% (at 100 steps their
    # std is 9% (ancestral, which ignores Var[x0 | x_t]) and 4% (DDIM) too small).
    train = cdm.GaussianDiffusion(cdm.cosine_schedule(1000), variance="fixed")
    oracle = GaussianOracle(train)
    K = 1000 if sampler in ("ancestral", "ddim") else 100
    d = train.sampling_chain(sampler, K, stop_at)
    x = d.sample(oracle, (1024, 3, 2, 2), {}, sampler=sampler, stop_at=stop_at,
                 generator=torch.Generator().manual_seed(1)).double()
    a, b = oracle.ab(torch.tensor(stop_at))
    mean, std = (a * oracle.mu).item(), (a ** 2 * oracle.std ** 2 + b ** 2).sqrt().item()
    assert x.mean().item() == pytest.approx(mean, abs=4 * std / math.sqrt(x.numel()) + 2e-3)
    # ancestral with Sigma = beta~ (the lower bound of the true reverse variance, DDPM §3.2) stays
    # 2% under even with all 1000 steps: 3% for it
    assert x.std().item() == pytest.approx(std, rel=0.03 if sampler == "ancestral" else 0.02)
    # the network's last step: s itself for Heun's corrector, else the step above the end
    below = d._index_of(stop_at) if stop_at else 0
    assert min(oracle.calls) == (stop_at if sampler == "heun" and stop_at else int(d.timesteps[below + 1]))
    assert len(oracle.calls) == d.nfe(sampler, stop_at)


# --- classifier-free guidance -----------------------------------------------------------------

def tiny_null_class_unet():
    """A perturbed class-conditional U-Net with a null class, learned variance."""
    torch.manual_seed(0)
    model = cdm.UNet(8, 16, (1, 2), 1, (4,), 2, out_channels=6, num_classes=3, null_class=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_guided_prediction_is_the_classifier_free_combination():
    """GuidedModel: (1 + w) eps(x, c) - w eps(x, null) on the prediction channels, the conditional
    pass's variance channels; w = 0 is the model itself, so sampling is exactly unguided."""
    model = tiny_null_class_unet()
    x, t, c = torch.randn(4, 3, 8, 8), torch.tensor([3, 50, 400, 999]), torch.tensor([0, 1, 2, 1])
    null = torch.full_like(c, 3)
    with torch.no_grad():
        cond, uncond = model(x, t, c=c), model(x, t, c=null)
        guided = cdm.GuidedModel(model, 2.0, 3)(x, t, c=c)
    assert (cond - uncond).abs().max() > 1e-3                        # the class matters here
    torch.testing.assert_close(guided[:, :3], 3 * cond[:, :3] - 2 * uncond[:, :3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided[:, 3:], cond[:, 3:], rtol=1e-4, atol=1e-5)
    assert cdm.guided_model(model, 0.0, 3) is model
    stage = cdm.Stage(model, cdm.GaussianDiffusion(cdm.make_betas("cosine", 50), "learned"),
                      stage_config(model={**stage_config()["model"], "null_class": True}))
    draw = lambda g: cdm.sample_cascade([stage], c, steps=[4], sampler="ancestral", guidance=g,
                                        generator=torch.Generator().manual_seed(0), progress=False)[0]
    assert torch.equal(draw(None), draw([0.0]))
    assert not torch.equal(draw(None), draw([2.0]))
    plain = cdm.UNet(8, 16, (1, 2), 1, (4,), 2, out_channels=6, num_classes=3)
    with pytest.raises(ValueError, match="trained without a null class"):
        cdm.GuidedModel(plain, 1.0, 3)
    with pytest.raises(ValueError, match="class labels must lie in 0..2"):
        plain(x, t, c=null)                                          # no null label without a null class


# --- progressive distillation (PD Alg. 2) ------------------------------------------------------

def test_distillation_grid_halves_onto_itself():
    """distillation_grid: PD's t = i/N on integer steps, 0 and T at the ends; the 2N-step grid's
    every other step is the N-step grid, so a teacher's two steps span one student step."""
    assert cdm.distillation_grid(1000, 4) == [0, 250, 500, 750, 1000]
    assert cdm.distillation_grid(1000, 1) == [0, 1000]
    for T in (20, 1000, 4000):
        for N in (1, 2, 4, 8, 10, 16):
            if 2 * N <= T:
                grid = cdm.distillation_grid(T, 2 * N)
                assert grid[::2] == cdm.distillation_grid(T, N) and len(set(grid)) == 2 * N + 1
    with pytest.raises(ValueError, match="cannot distil to 64 steps"):
        cdm.distillation_grid(20, 64)


def distillation_chain(N=4, T=200, prediction="velocity"):
    """The teacher's chain of a distillation round to N steps: 2N steps of a cosine schedule."""
    base = cdm.GaussianDiffusion(cdm.cosine_schedule(T), variance="fixed", prediction=prediction)
    return base, base.on_steps(cdm.distillation_grid(T, 2 * N)[1:])


@pytest.mark.parametrize("prediction", ["velocity", "x0"])   # eps: ill-conditioned at SNR = 0 (PD §4)
def test_distillation_target_of_an_exact_point_mass_teacher_is_the_point(prediction):
    """Closed form: for data that is one point mu, the exact teacher predicts x0_hat = mu from any
    z_t; two DDIM steps then give z_t'' = alpha'' mu + (sigma''/sigma) (z_t - alpha mu), and
    x~ = (z_t'' - (sigma''/sigma) z_t) / (alpha'' - (sigma''/sigma) alpha) = mu exactly, at every
    step including the last (t'' = 0). The exact student (the same oracle) has loss 0, and one
    DDIM step of the student lands where the teacher's two did."""
    mu = torch.tensor([0.5, -0.25, 0.0]).view(1, 3, 1, 1)
    base, chain = distillation_chain(prediction=prediction)
    oracle = GaussianOracle(base, mu=mu, std=0.0)
    z = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    i = torch.tensor([2, 4, 6, 8, 2, 4, 6, 8])
    x_tilde = cdm.distillation_target(chain, oracle, z, i, {})
    torch.testing.assert_close(x_tilde, mu.expand_as(z), atol=1e-5, rtol=0)
    loss = cdm.distillation_loss(chain, oracle, oracle, mu.expand_as(z), i, z, {})
    assert loss.shape == (8,) and loss.max() < 1e-8
    for j in (1, 4):                      # student DDIM (sample_ddim) over chain indices 2j -> 2j - 2
        student_chain = base.on_steps(cdm.distillation_grid(base.T, 4)[1:])
        one = cdm.sample_ddim(student_chain, oracle, z, {}, [j], lambda: 0.0)
        two = cdm.sample_ddim(chain, oracle, z, {}, [2 * j, 2 * j - 1], lambda: 0.0)
        torch.testing.assert_close(one, two, atol=1e-5, rtol=0)


class Scaled(torch.nn.Module):
    """A network's output times k."""

    def __init__(self, model, k):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, *args, **kwargs):
        return self.k * self.model(*args, **kwargs)


def test_distillation_target_is_the_x0_that_takes_one_ddim_step_to_the_teachers_two():
    """The identity behind PD's target, for a teacher that is no oracle (a perturbed U-Net, so x~
    differs from each of its x0_hat): one DDIM step from z_t with x0_hat = x~ (ddim_step) lands
    exactly on z_t'', the teacher's two DDIM steps as sample_ddim takes them; the loss is
    (1 + SNR) ||x0_hat - x~||^2, the velocity's squared error for a velocity network."""
    torch.manual_seed(0)
    teacher = tiny_unet(out_channels=3).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    teacher = Scaled(teacher, 4.0)              # x0_hat beyond [-1, 1] at places: the clipping counts
    base, chain = distillation_chain()
    z = torch.randn(3, 3, 8, 8)
    c = torch.tensor([0, 1, 2])
    for j in (1, 2, 4):
        i = torch.full((3,), 2 * j)
        with torch.no_grad():
            x_tilde = cdm.distillation_target(chain, teacher, z, i, {"c": c})
            two = cdm.sample_ddim(chain, teacher, z, {"c": c}, [2 * j, 2 * j - 1], lambda: 0.0)
        a_t, a_s = (torch.tensor(chain.alphas_cumprod[k], dtype=torch.float32) for k in (2 * j, 2 * j - 2))
        torch.testing.assert_close(cdm.ddim_step(x_tilde, z, a_t, a_s), two, atol=1e-4, rtol=1e-4)
        if j == 1:                                          # t'' = 0: the teacher's final image
            torch.testing.assert_close(x_tilde, two, atol=1e-6, rtol=0)
    student = copy.deepcopy(teacher)
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    i = torch.tensor([2, 4, 8])
    with torch.no_grad():
        loss = cdm.distillation_loss(chain, student, teacher, x0, i, z, {"c": c})
        z_t = chain.q_sample(x0, i, z)
        x_tilde = cdm.distillation_target(chain, teacher, z_t, i, {"c": c})
        v_hat = student(z_t, torch.as_tensor(chain.timesteps)[i], c=c)
        abar = chain._at("alphas_cumprod", i, z_t)
        v_tilde = abar.sqrt() * (z_t - abar.sqrt() * x_tilde) / (1 - abar).sqrt() - (1 - abar).sqrt() * x_tilde
    torch.testing.assert_close(loss, cdm.mean_flat((v_hat - v_tilde) ** 2), rtol=1e-3, atol=1e-6)


def test_one_distillation_round_shrinks_the_gap_to_the_teachers_two_steps():
    """One round (N = 1: the teacher's 2 DDIM steps into one) on a tiny U-Net: the student's one
    step from the same x_T moves towards the teacher's two, on noise it never trained on."""
    torch.manual_seed(0)
    teacher = tiny_unet(out_channels=3).eval().requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    base, chain = distillation_chain(N=1)
    student_chain = base.on_steps(cdm.distillation_grid(base.T, 1)[1:])
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    x0 = torch.rand(16, 3, 8, 8) * 2 - 1
    c = torch.arange(16) % 3
    test_noise, test_c = torch.randn(8, 3, 8, 8), torch.arange(8) % 3

    def gap():
        with torch.no_grad():
            two = chain.sample(teacher, test_noise.shape, {"c": test_c}, sampler="ddim", noise=test_noise)
            one = student_chain.sample(student.eval(), test_noise.shape, {"c": test_c}, sampler="ddim", noise=test_noise)
        student.train()
        return (one - two).pow(2).mean().item()

    before = gap()
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    for _ in range(60):
        i = torch.full((16,), 2)
        loss = cdm.distillation_loss(chain, student, teacher, x0, i, torch.randn_like(x0), {"c": c}).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = gap()
    assert before > 1e-3 and after < 0.3 * before, (before, after)   # measured: 0.24 * before


def test_a_distilled_stage_samples_on_its_own_steps_only():
    """sample_cascade: a distilled stage takes DDIM on its own grid (a stand-in that records the t
    it is told), refuses another sampler or step count, and a truncated handover at an s off its
    grid, in one line each."""
    spy = Spy()
    grid = cdm.distillation_grid(100, 4)
    stage = fake_stage(8, spy=spy)
    stage.config["distill"] = {"steps": 4, "grid": grid}
    c = torch.tensor([0, 1])
    cdm.sample_cascade([stage], c, steps=[4], sampler="ddim", progress=False)
    assert [int(call["t"][0]) for call in spy.calls] == [100, 75, 50, 25]
    with pytest.raises(ValueError, match="distilled to 4 DDIM steps: sample it with ddim and 4 steps"):
        cdm.sample_cascade([stage], c, steps=[20], sampler="ddim", progress=False)
    sr = fake_stage(16, low_res=8, augment={"type": "noise", "schedule": "cosine", "T": 100, "s_max": 50})
    with pytest.raises(ValueError, match="distilled to the steps"):
        cdm.sample_cascade([stage, sr], c, steps=[4, 2], sampler="ddim", s=[None, 30], truncated=True,
                           progress=False)
    spy.calls.clear()
    out = cdm.sample_cascade([stage, sr], c, steps=[4, 2], sampler="ddim", s=[None, 25], truncated=True,
                             progress=False)
    assert [int(call["t"][0]) for call in spy.calls] == [100, 75, 50] and out[1].shape == (2, 3, 16, 16)


# =============================================================================================
# 7. Checkpoints: save the config and the tensors; load them back
# =============================================================================================

def test_checkpoint_rebuilds_an_identical_model(tmp_path):
    """cdm.stage_from_checkpoint rebuilds the stage a checkpoint was saved from, outputs and
    diffusion alike, through safety.py, which writes the file and reads it back with its checks
    (tests/test_safety.py tries those checks)."""
    import safety                       # in the kit's copy too: it ships every file but assign.py
    import trainer
    cfg = stage_config()
    torch.manual_seed(0)
    model = cdm.model_from_config(cfg["model"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "ckpt.pt"
    safety.save_checkpoint({"config": cfg, "model": model.state_dict(), "ema": model.state_dict()}, str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]   # no temporary file left behind
    stage = safety.load_stage(str(path))
    x, t, c = torch.randn(2, 3, 8, 8), torch.tensor([3, 60]), torch.tensor([0, 2])
    assert torch.equal(stage.model(x, t, c=c), trainer.set_fast_path(model).eval()(x, t, c=c))
    assert stage.diffusion.T == 100 and stage.diffusion.variance == "learned"
