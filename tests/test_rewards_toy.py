"""Tests of the toy rewards in rewards.py and of the reward-tilted KL split (acdmd.py section 1; rewards.py section 1):
exact tilted mixtures against Monte-Carlo importance reweighting of exact samples, the pointwise
identity log p~ = log p + beta r - log Z, and KL(p||p~) = KL(p||p_T) - beta E_p[r] + log Z."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
import rewards  # noqa: E402

REWARDS = {
    "linear": (rewards.LinearReward((1.0, 0.5)), 0.8),  # (reward, beta)
    "quadratic": (rewards.QuadraticReward(gamma=1.0, m=(2.0, 0.0)), 1.5),
}


def log_density(mix, x, c):
    """Exact log p(x | c) of an isotropic mixture at sigma = 0 (Mixture.log_prob clamps sigma
    at 1e-4, which is too coarse for identities checked to 1e-9). x [B, d] float64, c int."""
    d = x.shape[1]
    s2 = mix.stds ** 2
    sq = ((x[:, None, :] - mix.means[None]) ** 2).sum(-1)  # [B, J]
    logn = -0.5 * sq / s2 - 0.5 * d * torch.log(2 * math.pi * s2)
    return torch.logsumexp(torch.log(mix.weights[c]) + logn, dim=1)


def varied_mixture():
    """The toy mixture with unequal component stds (0.2 .. 0.55), so that every std-dependent
    term of the tilt formulas matters."""
    mix = models.toy_mixture()
    return models.Mixture(mix.means, 0.2 + 0.05 * torch.arange(8.0), mix.weights)


def sample_with_labels(mix, c, n, gen):
    j = torch.multinomial(mix.weights[c], n, replacement=True, generator=gen)
    x = mix.means[j] + mix.stds[j, None] * torch.randn(n, mix.means.shape[1], generator=gen,
                                                       dtype=torch.float64)
    return x, j


def test_linearreward_quadraticreward_values_and_gradients():
    x = torch.tensor([[1.0, 2.0], [-0.5, 0.0], [2.0, -1.0]], requires_grad=True)
    lin = rewards.LinearReward((1.0, 0.5))(x, ["top"] * 3)
    assert set(lin) == {"linear"} and lin["linear"].shape == (3,)
    torch.testing.assert_close(lin["linear"], torch.tensor([2.0, -0.5, 1.5]))
    (g,) = torch.autograd.grad(lin["linear"].sum(), x)
    torch.testing.assert_close(g, torch.tensor([[1.0, 0.5]] * 3))
    quad = rewards.QuadraticReward(gamma=2.0, m=(2.0, 0.0))(x, ["top"] * 3)
    torch.testing.assert_close(quad["quadratic"], torch.tensor([-5.0, -6.25, -1.0]))
    (g,) = torch.autograd.grad(quad["quadratic"].sum(), x)
    torch.testing.assert_close(g, -2.0 * (x.detach() - torch.tensor([2.0, 0.0])))


@pytest.mark.parametrize("name", ["linear", "quadratic"])
def test_tilt_matches_importance_reweighting(name):
    """Self-normalised importance sampling of exact samples with weights exp(beta r): per-row
    component weights, per-component means and variances, against the closed form of 9.5."""
    reward, beta = REWARDS[name]
    mix = varied_mixture()
    tilted = reward.tilt(mix, beta)
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    for c in range(mix.weights.shape[0]):  # the three prompts and the null row
        x, j = sample_with_labels(mix, c, n, gen)
        logw = beta * reward(x)[reward.name]
        w = torch.exp(logw - logw.max())
        W = w.sum()
        for k in range(mix.means.shape[0]):
            if mix.weights[c, k] == 0:
                assert tilted.weights[c, k] == 0
                continue
            ind = (j == k).double()
            est = (w * ind).sum() / W
            se = ((w ** 2 * (ind - est) ** 2).sum()).sqrt() / W  # delta-method SE of SNIS
            assert abs(est - tilted.weights[c, k]) < 5 * se + 1e-12, (c, k)
            if c == 2:  # the "ring" row uses every component: check means and variances there
                wk = w * ind
                mean = (wk[:, None] * x).sum(0) / wk.sum()
                dev = x - tilted.means[k]
                se_m = ((wk[:, None] ** 2 * dev ** 2).sum(0)).sqrt() / wk.sum()
                assert ((mean - tilted.means[k]).abs() < 5 * se_m).all(), (k, mean, tilted.means[k])
                q = (dev ** 2).sum(1) / 2  # per-dimension variance
                var = (wk * q).sum() / wk.sum()
                se_v = ((wk ** 2 * (q - var) ** 2).sum()).sqrt() / wk.sum()
                assert abs(var - tilted.stds[k] ** 2) < 5 * se_v, (k, var, tilted.stds[k] ** 2)
    # the tilt really moved things (so the checks above are not trivially about p itself)
    assert (tilted.weights - mix.weights).abs().max() > 0.05
    assert (tilted.means - mix.means).abs().max() > 0.05


@pytest.mark.parametrize("name", ["linear", "quadratic"])
def test_tilt_density_is_p_times_exp_beta_r_over_Z(name):
    """Pointwise: log p~(x|c) = log p(x|c) + beta r(x) - log Z_beta(c), for every row c."""
    reward, _ = REWARDS[name]
    mix = varied_mixture()
    x = 3 * torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for beta in (0.0, 0.3, 1.5) + ((-0.7,) if name == "linear" else ()):
        tilted = reward.tilt(mix, beta)
        logZ = reward.log_partition(mix, beta)
        for c in range(mix.weights.shape[0]):
            lhs = log_density(tilted, x, c)
            rhs = log_density(mix, x, c) + beta * reward(x)[reward.name] - logZ[c]
            torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-9)
    # log Z_0 = log sum_j pi_cj = 0 (toy_mixture's rows are float32 constants: sum = 1 +- 3e-8)
    torch.testing.assert_close(reward.log_partition(mix, 0.0), torch.zeros(4, dtype=torch.float64),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["linear", "quadratic"])
def test_exact_mean_matches_monte_carlo(name):
    reward, _ = REWARDS[name]
    mix = models.toy_mixture()
    gen = torch.Generator().manual_seed(2)
    exact = reward.exact_mean(mix)
    assert exact.shape == (4,)
    for c in range(4):
        r = reward(sample_with_labels(mix, c, 100_000, gen)[0])[reward.name]
        assert abs(r.mean() - exact[c]) < 5 * r.std() / math.sqrt(len(r))


@pytest.mark.parametrize("name", ["linear", "quadratic"])
def test_log_partition_kl_split_by_quadrature_1d(name):
    """KL(p||p~) = KL(p||p_T) - beta E_p[r] + log Z_beta, each term computed on its own:
    both KLs and log Z by quadrature on a fine 1-D grid, E_p[r] in closed form."""
    teacher = models.Mixture([[-1.0], [0.5], [2.0]], [0.3, 0.5, 0.4],
                             [[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    gen_p = models.Mixture([[0.4]], [0.7], [[1.0]])  # the "generator": N(0.4, 0.7^2)
    reward, beta = {"linear": (rewards.LinearReward((0.7,)), 0.9),
                    "quadratic": (rewards.QuadraticReward(1.3, (-1.0,)), 1.2)}[name]
    tilted = reward.tilt(teacher, beta)
    x = torch.linspace(-15, 15, 300_001, dtype=torch.float64)[:, None]
    log_p = log_density(gen_p, x, 0)
    p = log_p.exp()
    r = reward(x)[reward.name]
    for c in range(2):
        kl_tilt = torch.trapezoid(p * (log_p - log_density(tilted, x, c)), x[:, 0])
        kl_teacher = torch.trapezoid(p * (log_p - log_density(teacher, x, c)), x[:, 0])
        tilted_mass = log_density(teacher, x, c).exp() * torch.exp(beta * r)
        logZ_quad = torch.log(torch.trapezoid(tilted_mass, x[:, 0]))
        logZ = reward.log_partition(teacher, beta)[c]
        assert abs(logZ - logZ_quad) < 1e-8
        mean_r = reward.exact_mean(gen_p)[0]
        assert abs(mean_r - torch.trapezoid(p * r, x[:, 0])) < 1e-8
        assert abs(kl_tilt - (kl_teacher - beta * mean_r + logZ)) < 1e-8
        assert abs(kl_tilt - kl_teacher) > 0.05  # the reward term matters


def test_log_partition_kl_split_by_monte_carlo_2d():
    """The same split in 2-D on the toy mixture, with independent Monte-Carlo estimates of the
    two KLs (tolerance from their standard errors)."""
    reward, beta = REWARDS["quadratic"]
    mix = models.toy_mixture()
    tilted = reward.tilt(mix, beta)
    gen_p = models.Mixture([[1.0, 0.5]], [0.8], [[1.0]])
    gen = torch.Generator().manual_seed(3)
    n = 200_000
    for c in range(3):
        xa, xb = (sample_with_labels(gen_p, 0, n, gen)[0] for _ in range(2))
        la = log_density(gen_p, xa, 0) - log_density(tilted, xa, c)
        lb = log_density(gen_p, xb, 0) - log_density(mix, xb, c)
        rhs = lb.mean() - beta * reward.exact_mean(gen_p)[0] + reward.log_partition(mix, beta)[c]
        se = math.sqrt(la.var() / n + lb.var() / n)
        assert abs(la.mean() - rhs) < 5 * se, (c, la.mean(), rhs, se)


def test_tilt_keeps_the_mixture_usable():
    mix = models.toy_mixture()
    for reward, beta in REWARDS.values():
        same = reward.tilt(mix, 0.0)
        torch.testing.assert_close(same.weights, mix.weights)
        torch.testing.assert_close(same.means, mix.means)
        torch.testing.assert_close(same.stds, mix.stds)
        tilted = reward.tilt(mix, beta)
        torch.testing.assert_close(tilted.weights.sum(1), torch.ones(4, dtype=torch.float64))
        c = torch.tensor([0, 1, 2, 3] * 8)
        x = tilted.sample(c, sigma=0.3, generator=torch.Generator().manual_seed(0))
        assert x.shape == (32, 2)
        assert torch.isfinite(tilted.velocity(x, torch.full((32,), 0.3), c)).all()
    # the quadratic tilt with the reward's optimum as m concentrates mass and shrinks stds
    quad = REWARDS["quadratic"][0].tilt(mix, 2.0)
    assert (quad.stds < mix.stds).all()
    torch.testing.assert_close(quad.stds ** 2, mix.stds ** 2 / (1 + 2.0 * mix.stds ** 2))
