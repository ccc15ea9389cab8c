"""Each AC-DMD equation of acdmd.py against a closed form on the toy mixture (models.py, section 2)."""
import math

import pytest
import torch

import acdmd
import models
import sample


@pytest.fixture(scope="module")
def mix():
    return models.toy_mixture()


def test_kl_split_check_holds_numerically():
    # p_G = N(0.3, 0.8^2), p_T = N(0, 1), r(x) = -(x - 1)^2 / 2 + sin(x): KL(p_G||p~) by quadrature
    # vs KL(p_G||p_T) - beta E[r] + log Z. A wrong sign of beta or of log Z breaks the equality.
    grid = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    normal = lambda m, s: (lambda x: -0.5 * ((x - m) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi)))
    reward = lambda x: -0.5 * (x - 1) ** 2 + torch.sin(x)
    for beta in (0.0, 0.5, 2.0):
        lhs, rhs = acdmd.kl_split_check(normal(0.3, 0.8), normal(0.0, 1.0), reward, beta, grid)
        assert lhs == pytest.approx(rhs, abs=1e-8), f"beta {beta}: KL(p_G||p~) != KL(p_G||p_T) - beta E[r] + log Z"
    lhs, _ = acdmd.kl_split_check(normal(0.3, 0.8), normal(0.0, 1.0), reward, 2.0, grid)
    assert lhs > 0.05, "the tilted KL is trivially zero: the check would prove nothing"


def test_renoise_subinterval_kernel_reproduces_exact_marginal(mix):
    # x_s ~ p_s exactly, pushed to t with the sub-interval kernel, must be distributed as p_t.
    # Compare the first two moments per condition with the closed form of p_t.
    g = torch.Generator().manual_seed(0)
    N = 200_000
    c = torch.zeros(N, dtype=torch.long)
    for s, t in [(0.0, 0.3), (0.5, 0.8), (0.9, 0.95)]:
        x_s = mix.sample(c, s, generator=g).double()
        x_t = acdmd.renoise(x_s, torch.full((N,), s, dtype=torch.float64), torch.full((N,), t, dtype=torch.float64),
                            torch.randn(N, 2, generator=g, dtype=torch.float64))
        w = mix.weights[0]
        mean = (1 - t) * (w[:, None] * mix.means).sum(0)
        second = ((1 - t) ** 2 * (w[:, None, None] * mix.means[:, :, None] * mix.means[:, None, :]).sum(0)
                  + ((1 - t) ** 2 * (w * mix.stds ** 2).sum() + t ** 2) * torch.eye(2, dtype=torch.float64))
        cov = second - mean[:, None] * mean[None, :]
        assert torch.allclose(x_t.mean(0), mean, atol=0.01), f"s {s}, t {t}: renoised mean is not p_t's"
        assert torch.allclose(torch.cov(x_t.T), cov, atol=0.02), f"s {s}, t {t}: renoised covariance is not p_t's"
    # a wrong kernel (forgetting the a_ts rescale) is detectably off
    x_s = mix.sample(c, 0.5, generator=g).double()
    wrong = x_s + math.sqrt(0.8 ** 2 - 0.5 ** 2) * torch.randn(N, 2, generator=g, dtype=torch.float64)
    assert (wrong.mean(0) - (1 - 0.8) * (mix.weights[0][:, None] * mix.means).sum(0)).abs().max() > 0.1, \
        "a kernel without the a_ts rescale passes: the check cannot tell right from wrong"


def ambient_residual_moments(mix, s, t, target_fn, N=400_000, seed=1):
    """E[(T - v_exact(x_t)) phi(x_t)] for a few test functions phi, with standard errors."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 3, (N,), generator=g)
    x_s = mix.sample(c, s, generator=g).double()
    n = torch.randn(N, 2, generator=g, dtype=torch.float64)
    x_t = acdmd.renoise(x_s, s, t, n)
    T = target_fn(x_s, n, s, t)
    # law(x_t) is exactly p_t(.|c) (previous test), so its velocity is the mixture velocity.
    v = mix.velocity(x_t, torch.full((N,), t, dtype=torch.float64), c).double()
    R = T - v
    phis = [torch.ones(N, dtype=torch.float64), x_t[:, 0], x_t[:, 1], torch.tanh(x_t[:, 0] * x_t[:, 1])]
    m = torch.stack([(R * p[:, None]).mean(0) for p in phis])
    se = torch.stack([(R * p[:, None]).std(0) / math.sqrt(N) for p in phis])
    return m, se


@pytest.mark.parametrize("s,t", [(0.0, 0.5), (0.5, 0.7), (0.75, 0.95)])
def test_ambient_target_conditional_mean_is_exact_velocity(mix, s, t):
    m, se = ambient_residual_moments(mix, s, t, acdmd.ambient_target)
    assert (m.abs() < 5 * se + 1e-3).all(), f"E[T | x_t] is not the exact velocity: residual moments {m}, errors {se}"


def test_ambient_target_passes_the_check_that_a_missing_correction_fails(mix):
    # Dropping the (1-t) s^2/(1-s)^2 term (plain flow matching applied to x_s as if it were clean)
    # must fail the conditional-mean check that ambient_target passes, on the same draws: the check
    # can tell a right target from a wrong one, and this test grades ambient_target itself.
    def wrong(x_s, n, s, t):
        _, sig = acdmd.subinterval_coeffs(torch.tensor(s), torch.tensor(t))
        return -x_s / (1 - s) + t / sig * n
    m, se = ambient_residual_moments(mix, 0.5, 0.7, acdmd.ambient_target)
    assert (m.abs() < 5 * se + 1e-3).all(), "ambient_target's conditional mean is not the exact velocity"
    m, se = ambient_residual_moments(mix, 0.5, 0.7, wrong)
    assert (m.abs() > 10 * se).any(), "a target without the correction term passes: the check is blind"


def test_fake_loss_weight_is_min_one_ten_sigma_sq():
    x = torch.zeros(4, 2)
    s = torch.tensor([0.0, 0.0, 0.5, 0.5])
    t = torch.tensor([0.1, 0.9, 0.55, 0.98])
    _, sig = acdmd.subinterval_coeffs(s, t)
    w = acdmd.fake_loss_weight(s, t, x).flatten()
    assert torch.allclose(w, torch.clamp(10 * sig ** 2, max=1.0), atol=1e-6), "weight is not min(1, 10 sigma_ts^2)"
    assert torch.allclose(acdmd.fake_loss_weight(s, t, x, move_scale_out=False).flatten(), torch.ones(4)), \
        "move_scale_out=False does not give the unweighted loss"


def test_dmd_direction_is_kappa_times_velocity_gap_over_scale(mix):
    # x_s^fake - x_s^real = kappa (v_f - v_r), kappa = s cos(theta)(1-t) - (1-s) t < 0 (acdmd.py, section 3)
    torch.manual_seed(0)
    eta = 0.9
    x_t = torch.randn(64, 2)
    v_r, v_f = torch.randn(64, 2), torch.randn(64, 2)
    for s, t in [(0.0, 0.4), (0.5, 0.6), (0.9, 0.98)]:
        z = torch.randn(64, 2)
        tt = torch.full((64,), t)
        xr = sample.cps_step(x_t, v_r, tt, s, eta, z)
        xf = sample.cps_step(x_t, v_f, tt, s, eta, z)
        kappa = s * math.cos(eta * math.pi / 2) * (1 - t) - (1 - s) * t
        assert kappa < 0, "kappa must be negative for t > s"
        assert torch.allclose(xf - xr, kappa * (v_f - v_r), atol=1e-5), "with shared noise the gap is not kappa (v_f - v_r)"
        # normalised direction and the surrogate's gradient g / (B D)
        x_s = torch.randn(64, 2, requires_grad=True)
        g = acdmd.dmd_direction(x_s, xr, xf)
        scale = (x_s.detach() - xr).abs().mean(1, keepdim=True)
        assert torch.allclose(g.float(), (xf - xr) / scale, atol=1e-5), "g is not normalised by mean|x_s - x_s^real|"
        acdmd.dmd_surrogate(x_s, g).backward()
        assert torch.allclose(x_s.grad, (g / g.numel()).float(), atol=1e-7), "the surrogate's gradient is not g / (B D)"


def test_generator_loss_moves_samples_toward_teacher(mix):
    # One gradient step on x_s with an exact fake score (= the exact velocity of a *shifted*
    # mixture that x_s is drawn from) must move x_s toward the teacher: its mean shift shrinks.
    bb = models.ToyBackbone.__new__(models.ToyBackbone)
    bb.teacher = models.ExactVelocity(mix)
    shifted = models.Mixture(mix.means + torch.tensor([0.6, 0.0], dtype=torch.float64), mix.stds, mix.weights)
    fake = models.ExactVelocity(shifted)
    N = 4096
    g = torch.Generator().manual_seed(3)
    c = torch.full((N,), 2, dtype=torch.long)
    cond, null = {"c": c}, {"c": torch.full((N,), 3, dtype=torch.long)}
    x_s = shifted.sample(c, 0.0, generator=g).requires_grad_(True)
    tau = acdmd.sample_renoise_timesteps(0.0, N, generator=g)
    t, n, x_t = acdmd.make_subinterval(x_s, 0.0, tau)
    torch.manual_seed(0)
    loss, _ = acdmd.generator_loss(bb, fake, x_s, 0.0, t, x_t, cond, null, 1.0)
    loss.backward()
    step = -x_s.grad * N * 2  # gradient descent direction, per sample
    assert step[:, 0].mean() < -0.1, "the generator step does not move x_s back toward the teacher"
    assert abs(step[:, 1].mean()) < 0.1, "the generator step moves x_s sideways"


def test_consistency_two_sample_unbiased_for_perturbed_field(mix):
    # Two-sample estimator mean == ||E[h(x')|x_t] - h_0||^2, estimated with many inner samples.
    torch.manual_seed(0)
    bad = models.Mixture(mix.means * 1.15, mix.stds, mix.weights)  # a deliberately wrong f
    f = models.ExactVelocity(bad)
    bb = models.ToyBackbone.__new__(models.ToyBackbone)
    A, inner = 64, 4000
    c = torch.full((A,), 2, dtype=torch.long)
    x_t = mix.sample(c, 0.6).double()
    t = torch.full((A,), 0.6, dtype=torch.float64)
    v = f(x_t, t, c)
    t_p = torch.full((A,), 0.45, dtype=torch.float64)
    h0 = x_t - 0.6 * v
    # exact target: E over many CPS transitions of h(x') - h0, squared
    xs = sample.cps_step(x_t.repeat(inner, 1), v.repeat(inner, 1), t.repeat(inner), t_p.repeat(inner), 0.9)
    h = xs - 0.45 * f(xs, t_p.repeat(inner), c.repeat(inner))
    defect = (h.view(inner, A, 2).mean(0) - h0).pow(2).mean().item()
    # two-sample estimates averaged over repeats
    ests = []
    for _ in range(400):
        x1 = sample.cps_step(x_t, v, t, t_p, 0.9)
        x2 = sample.cps_step(x_t, v, t, t_p, 0.9)
        h1 = x1 - 0.45 * f(x1, t_p, c)
        h2 = x2 - 0.45 * f(x2, t_p, c)
        ests.append(acdmd.consistency_two_sample(h0, h1, h2).item())
    ests = torch.tensor(ests)
    assert defect > 1e-3, "the perturbed field has no defect: the check would prove nothing"
    assert abs(ests.mean().item() - defect) < 4 * ests.std().item() / math.sqrt(len(ests)) + 2e-4, \
        "the two-sample estimator is biased"
    # the one-sample MSE is biased upward by Var[h(x')]
    mse = (h.view(inner, A, 2)[0] - h0).pow(2).mean().item()
    assert mse > 3 * defect, "the one-sample MSE shows no variance bias"


def test_consistency_two_sample_vanishes_for_exact_velocity_under_exact_reverse_kernel(mix):
    # draw x0 ~ p(x0|x_t) exactly, then x_t' from the forward bridge (exact_reverse below); then
    # E[h(x_t')|x_t] = h(x_t) for the exact denoiser h, so the estimator is 0 up to MC error.
    torch.manual_seed(1)
    A, R = 256, 300
    c = torch.full((A,), 2, dtype=torch.long)
    t, tp = 0.6, 0.3
    x_t = mix.sample(c, t).double()
    tt = torch.full((A,), t, dtype=torch.float64)
    h0, w, m, V = mix.posterior_x0(x_t, tt, c)
    post_var = mix.stds[None] ** 2 * t ** 2 / V  # [A, J]: s_j^2 sigma_t^2 / V_j
    a = (1 - t) / (1 - tp)
    b2 = t ** 2 - a ** 2 * tp ** 2

    def exact_reverse():
        j = torch.multinomial(w, 1).squeeze(1)
        idx = torch.arange(A)
        x0 = m[idx, j] + post_var[idx, j].sqrt()[:, None] * torch.randn(A, 2, dtype=torch.float64)
        mean = (1 - tp) * x0 + (a * tp ** 2 / t ** 2) * (x_t - (1 - t) * x0)
        return mean + math.sqrt(tp ** 2 * b2 / t ** 2) * torch.randn(A, 2, dtype=torch.float64)

    def h(x):
        return mix.posterior_x0(x, torch.full((A,), tp, dtype=torch.float64), c)[0]

    exact = torch.tensor([acdmd.consistency_two_sample(h0, h(exact_reverse()), h(exact_reverse())).item()
                          for _ in range(R)])
    assert abs(exact.mean().item()) < 4 * exact.std().item() / math.sqrt(R), \
        "the exact denoiser has a defect under the exact reverse kernel"
    # under the CPS kernel the same exact denoiser has a small but non-zero defect (sample.py, section 1)
    v = mix.velocity(x_t, tt, c)
    cps = torch.tensor([acdmd.consistency_two_sample(
        h0, h(sample.cps_step(x_t, v, tt, tp, 0.9)), h(sample.cps_step(x_t, v, tt, tp, 0.9))).item()
        for _ in range(R)])
    assert cps.mean().item() > 4 * cps.std().item() / math.sqrt(R), \
        "the exact denoiser shows no defect under the CPS kernel"


def test_sample_renoise_timesteps_range_and_clamp():
    g = torch.Generator().manual_seed(0)
    tau = acdmd.sample_renoise_timesteps(0.9, 100_000, generator=g)
    assert tau.min() >= 910 - 1e-3 and tau.max() <= 980 + 1e-3, "s = 0.9: tau outside [910, 980]"
    # s = 0.9: tau ~ U[910, 1000] clamped at 980, so 20/90 of the draws sit on the clamp
    assert (tau == 980).float().mean().item() == pytest.approx(20 / 90, abs=0.01), "wrong mass on the 980 clamp"
    tau = acdmd.sample_renoise_timesteps(0.0, 100_000, generator=g)
    assert tau.min() >= 20 and tau.max() <= 980, "s = 0: tau outside [20, 980]"


def toy_bb(mix):
    """A toy backbone around the exact mixture velocity, without the pretrained MLP."""
    bb = models.ToyBackbone.__new__(models.ToyBackbone)
    bb.teacher = models.ExactVelocity(mix)
    return bb


@pytest.mark.parametrize("normalize", [False, True])
def test_generator_loss_direction_is_kappa_times_velocity_gap(mix, normalize):
    # The surrogate's gradient w.r.t. x_s is g / (B D). With ONE projection noise z shared by the
    # teacher and the fake, g = kappa (v_f - v_r) / scale exactly (acdmd.py, section 3). Two
    # independent draws would add s sin(theta) (z_f - z_r), about 0.7 per element at s = 0.5.
    bb = toy_bb(mix)
    shifted = models.Mixture(mix.means + torch.tensor([0.6, 0.0], dtype=torch.float64), mix.stds, mix.weights)
    fake = models.ExactVelocity(shifted)
    B, s, t, eta = 512, 0.5, 0.7, 0.9
    g = torch.Generator().manual_seed(4)
    c = torch.full((B,), 2, dtype=torch.long)
    cond, null = {"c": c}, {"c": torch.full((B,), 3, dtype=torch.long)}
    x_s = shifted.sample(c, s, generator=g).requires_grad_(True)
    tt = torch.full((B,), t)
    x_t = acdmd.renoise(x_s.detach(), s, tt, torch.randn(B, 2, generator=g))
    loss, _ = acdmd.generator_loss(bb, fake, x_s, s, tt, x_t, cond, null, 1.0, eta, normalize)
    loss.backward()
    v_r, v_f = mix.velocity(x_t, tt, c), shifted.velocity(x_t, tt, c)
    kappa = s * math.cos(eta * math.pi / 2) * (1 - t) - (1 - s) * t
    expected = kappa * (v_f - v_r).double()
    direction = x_s.grad.double() * x_s.numel()
    if normalize:  # the per-sample scale depends on the projection noise, which the test does not
        # replay (however the noise is drawn): each sample's direction is expected's times a
        # positive factor (the scale itself is graded in tests/test_exercises.py)
        factor = (direction * expected).sum(1, keepdim=True) / (expected ** 2).sum(1, keepdim=True)
        assert (factor > 0).all(), "the DMD direction points away from kappa (v_fake - v_real)"
        expected = factor * expected
    assert torch.allclose(direction, expected, rtol=1e-4, atol=1e-5), \
        "the DMD direction is not kappa (v_fake - v_real) / scale: the projection noise is not shared"


def exact_reverse_kernel(mix, c):
    """transition(x_t, v, t, t') -> x_t' drawn from the toy's exact reverse kernel p(x_t' | x_t):
    x0 ~ p(x0 | x_t) (component j with probability w_j, then N(m_j, s_j^2 t^2 / V_j)), then
    x_t' from the forward bridge q(x_t' | x_t, x0). The velocity v is not used."""
    def transition(x_t, v, t, tp):
        t, tp = t.double()[:, None], tp.double()[:, None]
        _, w, m, V = mix.posterior_x0(x_t, t[:, 0], c)
        idx = torch.arange(len(x_t))
        j = torch.multinomial(w, 1).squeeze(1)
        post_std = (mix.stds[None] ** 2 * t ** 2 / V).sqrt()[idx, j][:, None]
        x0 = m[idx, j] + post_std * torch.randn_like(x_t)
        a = (1 - t) / (1 - tp)
        b2 = t ** 2 - a ** 2 * tp ** 2
        mean = (1 - tp) * x0 + (a * tp ** 2 / t ** 2) * (x_t - (1 - t) * x0)
        return mean + (tp ** 2 * b2 / t ** 2).sqrt() * torch.randn_like(x_t)
    return transition


class OffsetVelocity(torch.nn.Module):
    """A deliberately wrong fake score: the exact mixture velocity plus a constant offset."""

    def __init__(self, mix, offset):
        super().__init__()
        self.exact, self.offset = models.ExactVelocity(mix), torch.as_tensor(offset, dtype=torch.float64)

    def forward(self, x, sigma, c):
        return self.exact(x, sigma, c) + self.offset.to(x.dtype)


def offset_defect(t, offset, max_delta=200):
    """Exact consistency defect of OffsetVelocity under the exact reverse kernel: its denoiser is
    h - t offset, h a martingale, so E[h_bad(x_t') | x_t] - h_bad(x_t) = (t - t') offset with
    t - t' = (tau - round(tau) + delta) / 1000, delta ~ U{1..max_delta}. Mean over samples and
    elements of E_delta[(t - t')^2] offset^2."""
    e = t.double() * 1000 - torch.round(t.double() * 1000)
    d = torch.arange(1, max_delta + 1, dtype=torch.float64)
    gap2 = ((e[:, None] + d[None]) ** 2).mean(1) / 1e6
    return (gap2.mean() * (torch.as_tensor(offset, dtype=torch.float64) ** 2).mean()).item()


def consistency_repeats(mix, fake, R=100, A=1024, t=0.6, seed=5):
    """R calls of consistency_loss for the fake score `fake` under the exact reverse kernel, at
    A anchors x_t ~ p_t(. | ring). Returns the R estimates and the anchors' levels."""
    torch.manual_seed(seed)
    c = torch.full((A,), 2, dtype=torch.long)
    x_t = mix.sample(c, t).double()
    tt = torch.full((A,), t, dtype=torch.float64)
    v_hat = fake(x_t, tt, c)
    kernel = exact_reverse_kernel(mix, c)
    est = torch.tensor([acdmd.consistency_loss(toy_bb(mix), fake, x_t, tt, v_hat, {"c": c},
                                               transition=kernel).item() for _ in range(R)])
    return est, tt


def test_consistency_loss_vanishes_for_exact_velocity_under_exact_reverse_kernel(mix):
    # For the exact velocity, h = E[x0 | x_t] is a martingale under the true reverse process
    # (acdmd.py, section 5): the loss is zero up to Monte-Carlo error.
    est, _ = consistency_repeats(mix, models.ExactVelocity(mix))
    se = est.std().item() / math.sqrt(len(est))
    assert abs(est.mean().item()) < 4 * se, \
        f"the exact velocity has a consistency defect {est.mean().item():.2e} (standard error {se:.1e})"


def test_consistency_loss_equals_closed_form_defect_of_perturbed_field(mix):
    offset = (3.0, 0.0)
    est, tt = consistency_repeats(mix, OffsetVelocity(mix, offset))
    se = est.std().item() / math.sqrt(len(est))
    expected = offset_defect(tt, offset)
    assert expected > 10 * se, "the offset's defect is lost in Monte-Carlo noise"
    assert abs(est.mean().item() - expected) < 4 * se, \
        f"the consistency loss of an offset velocity is {est.mean().item():.2e}, not its defect {expected:.2e}"


def fake_score_sub_interval(mix, s, N=200_000, seed=6):
    """x_s ~ p_s(. | c) exactly, one sub-interval to t ~ the official law; returns the tensors."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 3, (N,), generator=g)
    x_s = mix.sample(c, s, generator=g).double()
    tau = acdmd.sample_renoise_timesteps(s, N, generator=g)
    n = torch.randn(N, 2, generator=g, dtype=torch.float64)
    t = models.timestep_to_sigma(tau).double()
    return c, x_s, t, n, acdmd.renoise(x_s, s, t, n)


@pytest.mark.parametrize("s", [0.0, 0.5])
def test_fake_score_loss_excess_of_perturbed_field_is_weighted_square_of_perturbation(mix, s):
    # law(x_t) = p_t, so E[T | x_t] is the exact velocity v (acdmd.py, section 4). Hence for
    # f = v + delta the loss exceeds the exact velocity's by mean(w delta^2), up to Monte-Carlo
    # error in the cross term 2 mean(w delta (v - T)).
    c, x_s, t, n, x_t = fake_score_sub_interval(mix, s)
    delta = (0.2, -0.1)
    bb, cond = toy_bb(mix), {"c": c}
    exact, _ = acdmd.fake_score_loss(bb, models.ExactVelocity(mix), x_s, s, t, n, x_t, cond,
                                     consistency_weight=0)
    worse, _ = acdmd.fake_score_loss(bb, OffsetVelocity(mix, delta), x_s, s, t, n, x_t, cond,
                                     consistency_weight=0)
    w = acdmd.fake_loss_weight(s, t, x_t)
    d = torch.tensor(delta, dtype=torch.float64)
    excess = (w * d ** 2).mean().item()
    v = mix.velocity(x_t, t, c).double()
    cross = 2 * w * d * (v - acdmd.ambient_target(x_s, n, s, t))
    se = cross.sum(1).std().item() / math.sqrt(len(t)) / 2
    assert excess > 10 * se, "the perturbation is lost in Monte-Carlo noise"
    assert abs((worse - exact).item() - excess) < 4 * se, \
        "the fake-score loss is not minimised by the exact velocity of the noised marginal"


def test_fake_score_loss_consistency_term_vanishes_only_for_exact_velocity(mix):
    # The consistency part inside fake_score_loss, under the exact reverse kernel: zero up to
    # Monte-Carlo error for the exact velocity, the closed-form defect for an offset one.
    s, R, offset = 0.5, 100, (3.0, 0.0)
    c, x_s, t, n, x_t = fake_score_sub_interval(mix, s, N=1024)
    kernel = exact_reverse_kernel(mix, c)
    out = {}
    for name, fake in (("exact", models.ExactVelocity(mix)), ("offset", OffsetVelocity(mix, offset))):
        out[name] = torch.tensor([acdmd.fake_score_loss(
            toy_bb(mix), fake, x_s, s, t, n, x_t, {"c": c}, consistency_weight=1.0,
            transition=kernel)[1]["fake_cons"] for _ in range(R)])
    se = {k: v.std().item() / math.sqrt(R) for k, v in out.items()}
    assert abs(out["exact"].mean().item()) < 4 * se["exact"], \
        "the exact velocity shows a consistency defect inside fake_score_loss"
    expected = offset_defect(t, offset)
    assert expected > 10 * se["offset"], "the offset's defect is lost in Monte-Carlo noise"
    assert abs(out["offset"].mean().item() - expected) < 4 * se["offset"], \
        "the consistency term inside fake_score_loss is not the offset velocity's defect"
