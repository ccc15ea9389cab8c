"""Grading tests of the course exercises (tests/assignments.py), one group per exercise.

Rules every test here keeps:
  - it calls the exercise's own functions; where it needs a neighbour (the CPS mean of
    sample.cps_mean_std), it only uses the neighbour consistently on both sides of a comparison;
  - it compares against a closed form or a hand computation, or against a Monte-Carlo estimate
    with the bound stated next to it;
  - the inputs come from the test's own torch.Generator, and a function that draws noise is judged
    by the law of its output, never by seeds or by how many numbers it draws;
  - a plausible wrong answer fails it (tests/wrong_answers holds at least two per exercise,
    tests/test_assignments.py checks that each fails exactly its exercise).

GRADING maps each exercise to its tests; assignments.py reads it without importing this file.
"""
import math
import random
import statistics

import pytest
import torch
import torch.nn as nn

import acdmd
import eval as evaluation
import models
import rewards
import sample
import subgrpo

torch.set_num_threads(1)  # small tensors: threads only spin on a shared machine

GRADING = {
    "cps_step": ["test_cps_mean_std_matches_closed_form",
                 "test_cps_step_adds_rho_times_the_given_noise",
                 "test_cps_step_preserves_the_marginal_of_a_known_x0"],
    "renoise": ["test_subinterval_coeffs_closed_form",
                "test_renoise_gives_the_forward_marginal_at_t"],
    "ambient_target": ["test_ambient_target_by_hand_per_sample_levels",
                       "test_ambient_target_conditional_mean_is_exact_velocity"],
    "dmd_direction": ["test_shared_projection_noise_cancels_in_the_difference",
                      "test_dmd_direction_per_sample_normalisation",
                      "test_dmd_direction_unnormalised_and_degenerate"],
    "consistency_two_sample": ["test_consistency_two_sample_by_hand",
                               "test_consistency_two_sample_is_unbiased"],
    "energy_distance": ["test_energy_distance_by_hand",
                        "test_energy_distance_matches_gaussian_closed_form"],
    "cps_log_prob": ["test_cps_log_prob_official_form",
                     "test_cps_log_prob_exact_form_is_gaussian_density",
                     "test_cps_log_prob_deterministic_steps_and_gradient_path"],
    "group_advantages": ["test_group_advantages_normalised_by_hand",
                         "test_group_advantages_unnormalised_keeps_weights"],
    "select_steps": ["test_select_steps_deterministic_sorted_subset",
                     "test_select_steps_uniform_over_subsets",
                     "test_shared_noise_shared_within_a_prompt_only",
                     "test_shared_noise_is_standard_normal_and_independent"],
    "ppo_loss": ["test_ppo_loss_clipping_by_hand",
                 "test_ppo_loss_on_policy_gradient_is_reinforce"],
    "final_step_x0": ["test_final_step_x0_value_and_gradient_path",
                      "test_bp_loss_hinge_by_hand"],
    "tilt_linear": ["test_tilt_linear_is_p_times_exp_beta_r_normalised",
                    "test_tilt_linear_single_gaussian_closed_form"],
}


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# cps_step: sample.cps_mean_std, sample.cps_step
# ---------------------------------------------------------------------------------------------


def test_cps_mean_std_matches_closed_form():
    g = gen(0)
    x, v = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    sigma = torch.tensor([1.0, 0.9, 0.75, 0.5])
    sigma_next = torch.tensor([0.9, 0.75, 0.5, 0.3])
    eta = 0.7
    th = eta * math.pi / 2
    mu, rho = sample.cps_mean_std(x, v, sigma, sigma_next, eta)
    for i in range(4):  # one sample at a time, with plain floats: no broadcasting to get wrong
        s, sn = float(sigma[i]), float(sigma_next[i])
        x0_hat, eps_hat = x[i] - s * v[i], x[i] + (1 - s) * v[i]
        want_mu = (1 - sn) * x0_hat + sn * math.cos(th) * eps_hat
        assert torch.allclose(mu[i], want_mu, atol=1e-5), \
            f"cps_mean_std's mean of sample {i} is not (1-s') x0_hat + s' cos(theta) eps_hat"
        got_rho = torch.broadcast_to(torch.as_tensor(rho), mu.shape)[i]
        assert torch.allclose(got_rho, torch.full_like(got_rho, sn * math.sin(th)), atol=1e-6), \
            f"cps_mean_std's std of sample {i} is not sigma' sin(eta pi / 2)"
    mu_f, rho_f = sample.cps_mean_std(x, v, 0.75, 0.5, eta)  # float levels
    want = 0.5 * (x - 0.75 * v) + 0.5 * math.cos(th) * (x + 0.25 * v)
    assert torch.allclose(mu_f, want, atol=1e-5), "cps_mean_std is wrong for float levels"
    assert abs(float(rho_f) - 0.5 * math.sin(th)) < 1e-6, "cps_mean_std's rho is wrong for float levels"


def test_cps_step_adds_rho_times_the_given_noise():
    g = gen(1)
    x, v, z = (torch.randn(6, 2, generator=g) for _ in range(3))
    mu, rho = sample.cps_mean_std(x, v, 0.9, 0.75, 0.9)
    out = sample.cps_step(x, v, 0.9, 0.75, 0.9, z)
    assert torch.allclose(out, mu + rho * z, atol=1e-6), "cps_step with a given noise is not mu + rho z"
    assert out.dtype == x.dtype, "cps_step must return x's dtype"
    # the last step (sigma' = 0) and eta = 0 are deterministic: x0_hat and an Euler step
    assert torch.allclose(sample.cps_step(x, v, 0.5, 0.0, 0.9, z), x - 0.5 * v, atol=1e-6), \
        "cps_step to sigma' = 0 is not x0_hat = x - sigma v"
    assert torch.allclose(sample.cps_step(x, v, 0.75, 0.5, 0.0, z), x - 0.25 * v, atol=1e-6), \
        "cps_step with eta = 0 is not the Euler step x + (sigma' - sigma) v"


def test_cps_step_preserves_the_marginal_of_a_known_x0():
    # With the true x0 and eps behind x (so v = eps - x0 exactly), one CPS step must give
    # x' ~ N((1-s') x0, s'^2 I) for every eta (sample.py, section 1). N = 200 000 draws of the fresh
    # noise: the standard error of the mean is s'/447 < 0.001 and that of the std < 0.0007; the
    # bounds below are more than 7 of them, and a wrong step is off by 0.05 or more.
    g = gen(2)
    N = 200_000
    x0 = torch.full((N, 1), 1.5)
    eps = torch.randn(N, 1, generator=g)
    x = 0.2 * x0 + 0.8 * eps
    v = eps - x0
    for eta in (0.3, 0.9):
        out = sample.cps_step(x, v, 0.8, 0.4, eta)
        assert abs(out.mean().item() - 0.6 * 1.5) < 0.01, \
            f"cps_step (eta {eta}) moves the mean away from (1 - sigma') x0"
        assert abs(out.std().item() - 0.4) < 0.005, \
            f"cps_step (eta {eta}) does not keep the total noise std at sigma'"


# ---------------------------------------------------------------------------------------------
# renoise: acdmd.subinterval_coeffs, acdmd.renoise
# ---------------------------------------------------------------------------------------------


def test_subinterval_coeffs_closed_form():
    s = torch.tensor([0.0, 0.5, 0.75, 0.9], dtype=torch.float64)
    t = torch.tensor([0.3, 0.7, 0.9, 0.95], dtype=torch.float64)
    a, sig = acdmd.subinterval_coeffs(s, t)
    for i in range(4):
        si, ti = float(s[i]), float(t[i])
        ai = (1 - ti) / (1 - si)
        assert abs(float(a[i]) - ai) < 1e-12, f"a_ts at (s, t) = ({si}, {ti}) is not (1-t)/(1-s)"
        assert abs(float(sig[i]) - math.sqrt(ti ** 2 - ai ** 2 * si ** 2)) < 1e-9, \
            f"sigma_ts at (s, t) = ({si}, {ti}) is not sqrt(t^2 - a_ts^2 s^2)"
    _, sig0 = acdmd.subinterval_coeffs(torch.tensor(0.5), torch.tensor(0.5))
    assert 0 < float(sig0) < 1e-5, "sigma_ts at t = s must be floored at sqrt(1e-12), not 0 or NaN"


def test_renoise_gives_the_forward_marginal_at_t():
    # x_s = (1-s) x0 + s eps0 for a fixed x0; renoise to t must give x_t ~ N((1-t) x0, t^2 I).
    # Per-sample levels (three (s, t) pairs in one batch) check the broadcasting. 100 000 samples
    # per pair: standard errors t/316 < 0.003 (mean) and < 0.0022 (std); bounds 0.015 and 0.012.
    g = gen(3)
    pairs = [(0.0, 0.3), (0.5, 0.8), (0.9, 0.95)]
    N = 100_000
    s = torch.tensor([p[0] for p in pairs], dtype=torch.float64).repeat_interleave(N)
    t = torch.tensor([p[1] for p in pairs], dtype=torch.float64).repeat_interleave(N)
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x_s = (1 - s)[:, None] * x0 + s[:, None] * torch.randn(3 * N, 2, generator=g, dtype=torch.float64)
    x_t = acdmd.renoise(x_s, s, t, torch.randn(3 * N, 2, generator=g, dtype=torch.float64))
    assert x_t.shape == x_s.shape, "renoise must keep x_s's shape"
    for k, (sk, tk) in enumerate(pairs):
        part = x_t[k * N:(k + 1) * N]
        assert (part.mean(0) - (1 - tk) * x0).abs().max() < 0.015, \
            f"renoise from s={sk} to t={tk}: the mean is not (1 - t) x0 (is a_ts applied?)"
        assert (part.std(0) - tk).abs().max() < 0.012, \
            f"renoise from s={sk} to t={tk}: the noise std is not t (is sigma_ts right?)"


# ---------------------------------------------------------------------------------------------
# ambient_target: acdmd.ambient_target
# ---------------------------------------------------------------------------------------------


def ambient_by_hand(x_s, n, s, t):
    a = (1 - t) / (1 - s)
    sig = math.sqrt(t ** 2 - a ** 2 * s ** 2)
    return -x_s / (1 - s) + (t + (1 - t) * s ** 2 / (1 - s) ** 2) / sig * n


def test_ambient_target_by_hand_per_sample_levels():
    g = gen(4)
    x_s, n = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    s = torch.tensor([0.0, 0.5, 0.75, 0.9])
    t = torch.tensor([0.4, 0.7, 0.95, 0.97])
    T = acdmd.ambient_target(x_s, n, s, t)
    for i in range(4):
        want = ambient_by_hand(x_s[i], n[i], float(s[i]), float(t[i]))
        assert torch.allclose(T[i], want, rtol=1e-5, atol=1e-5), \
            f"ambient_target of sample {i} (s={float(s[i])}, t={float(t[i])}) differs from the formula"
    # s = 0 is ordinary flow matching: T = n - x0
    assert torch.allclose(acdmd.ambient_target(x_s, n, 0.0, torch.full((4,), 0.6)), n - x_s, atol=1e-5), \
        "ambient_target at s = 0 is not the flow-matching target n - x0"


@pytest.mark.parametrize("s,t", [(0.5, 0.7), (0.75, 0.95)])
def test_ambient_target_conditional_mean_is_exact_velocity(s, t):
    # x_s ~ p_s exactly (toy mixture), x_t = a x_s + sigma_ts n, so law(x_t) = p_t and its velocity
    # is the mixture's exact velocity v. E[(T - v(x_t)) phi(x_t)] must vanish for every phi; checked
    # for phi = 1, x_1, x_2, tanh(x_1 x_2) with 200 000 samples, bound 5 standard errors + 1e-3.
    mix = models.toy_mixture()
    g = gen(5)
    N = 200_000
    c = torch.randint(0, 3, (N,), generator=g)
    x_s = mix.sample(c, s, generator=g).double()
    n = torch.randn(N, 2, generator=g, dtype=torch.float64)
    a = (1 - t) / (1 - s)
    x_t = a * x_s + math.sqrt(t ** 2 - a ** 2 * s ** 2) * n
    T = acdmd.ambient_target(x_s, n, s, t).double()
    R = T - mix.velocity(x_t, torch.full((N,), t, dtype=torch.float64), c).double()
    for name, phi in [("1", torch.ones(N, dtype=torch.float64)), ("x_1", x_t[:, 0]), ("x_2", x_t[:, 1]),
                      ("tanh(x_1 x_2)", torch.tanh(x_t[:, 0] * x_t[:, 1]))]:
        m = (R * phi[:, None]).mean(0)
        se = (R * phi[:, None]).std(0) / math.sqrt(N)
        assert (m.abs() < 5 * se + 1e-3).all(), \
            (f"ambient_target's conditional mean differs from the exact velocity at s={s}, t={t}: "
             f"E[(T - v) {name}] = {m.tolist()}, standard error {se.tolist()}")


# ---------------------------------------------------------------------------------------------
# dmd_direction: acdmd.shared_projection, acdmd.dmd_direction
# ---------------------------------------------------------------------------------------------


def test_shared_projection_noise_cancels_in_the_difference():
    # Both projections x_s = mu(v) + rho z must use ONE z, so x_s^fake - x_s^real = mu_f - mu_r
    # exactly, and the common noise part has the CPS std rho: its mean square over 8192 elements
    # is rho^2 (1 +- 0.016 per standard error); accepted within [0.8, 1.2] rho^2.
    g = gen(6)
    B, s, eta = 4096, 0.5, 0.9
    x_t, v_r, v_f = (torch.randn(B, 2, generator=g) for _ in range(3))
    t = torch.full((B,), 0.8)
    x_r, x_f = acdmd.shared_projection(x_t, v_r, v_f, t, s, eta)
    mu_r, rho = sample.cps_mean_std(x_t, v_r, t, s, eta)
    mu_f, _ = sample.cps_mean_std(x_t, v_f, t, s, eta)
    gap = ((x_f - x_r) - (mu_f - mu_r)).abs().max().item()
    assert gap < 1e-5, \
        f"x_s^fake - x_s^real keeps noise (up to {gap:.3f}): the two projections must share one z"
    noise = x_r - mu_r
    ms = (noise ** 2).mean().item() / float(torch.as_tensor(rho).flatten()[0]) ** 2
    assert 0.8 < ms < 1.2, f"the projection noise has {ms:.2f} rho^2 mean square, not rho^2 (a CPS step)"


def test_dmd_direction_per_sample_normalisation():
    g = gen(7)
    x_s = torch.randn(5, 3, 2, 2, generator=g, requires_grad=True)
    x_r = torch.randn(5, 3, 2, 2, generator=g)
    x_f = x_r + torch.randn(5, 3, 2, 2, generator=g) * torch.tensor([0.1, 1, 2, 5, 10]).view(5, 1, 1, 1)
    x_r[3] *= 10  # very different per-sample scales: a batch-wide mean would be visibly wrong
    got = acdmd.dmd_direction(x_s, x_r, x_f)
    assert got.dtype == torch.float64, "dmd_direction must return float64 (it feeds dmd_surrogate)"
    for i in range(5):
        scale = (x_s[i].detach().double() - x_r[i].double()).abs().mean()
        want = (x_f[i] - x_r[i]).double() / scale
        assert torch.allclose(got[i], want, rtol=1e-9), \
            (f"dmd_direction of sample {i} is not (x_s^fake - x_s^real) / mean|x_s - x_s^real| over "
             "that sample's elements")


def test_dmd_direction_unnormalised_and_degenerate():
    g = gen(8)
    x_s, x_r, x_f = (torch.randn(3, 4, generator=g) for _ in range(3))
    got = acdmd.dmd_direction(x_s, x_r, x_f, normalize=False)
    assert torch.allclose(got, (x_f - x_r).double()), "dmd_direction with normalize=False is not x_s^fake - x_s^real"
    x_r[1] = x_s[1]  # x_s already on the teacher's projection: scale 0
    got = acdmd.dmd_direction(x_s, x_r, x_f)
    assert torch.isfinite(got).all(), "dmd_direction must map the 0/0 and x/0 of a zero scale to finite numbers"


# ---------------------------------------------------------------------------------------------
# consistency_two_sample: acdmd.consistency_two_sample
# ---------------------------------------------------------------------------------------------


def test_consistency_two_sample_by_hand():
    h0 = torch.zeros(1, 2)
    h1 = torch.tensor([[1.0, -2.0]])
    h2 = torch.tensor([[1.0, 1.0]])
    got = float(acdmd.consistency_two_sample(h0, h1, h2))
    assert got == pytest.approx(-0.5), \
        f"consistency_two_sample gave {got}, not mean[(h1-h0)(h2-h0)] = -0.5 (it may be negative)"
    nan = torch.tensor([[float("nan"), 0.0]])
    assert torch.isfinite(torch.as_tensor(acdmd.consistency_two_sample(h0, nan, h2))), \
        "consistency_two_sample must map NaN to a finite number"


def test_consistency_two_sample_is_unbiased():
    # h_1, h_2 = m + independent N(0, 1) noise, h_0 = m - 0.3: the squared defect is 0.09.
    # One call on 400 000 elements: the estimate's standard error is sqrt(1.18 / 4e5) = 0.0017;
    # bound 0.012. A one-sample MSE is off by Var = 1, the squared mean of h_1, h_2 by 0.5.
    g = gen(9)
    m = torch.randn(1000, 400, generator=g, dtype=torch.float64)
    h0 = m - 0.3
    h1 = m + torch.randn(1000, 400, generator=g, dtype=torch.float64)
    h2 = m + torch.randn(1000, 400, generator=g, dtype=torch.float64)
    got = float(acdmd.consistency_two_sample(h0, h1, h2))
    assert abs(got - 0.09) < 0.012, \
        f"consistency_two_sample averages to {got:.4f}, not the squared defect 0.09: it is biased"


# ---------------------------------------------------------------------------------------------
# energy_distance: eval.energy_distance
# ---------------------------------------------------------------------------------------------


def test_energy_distance_by_hand():
    x = [[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]]
    y = [[0.0, 1.0], [2.0, 2.0]]

    def mean_dist(a, b):
        return sum(math.dist(p, q) for p in a for q in b) / (len(a) * len(b))

    want = 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)  # V-statistics
    got = evaluation.energy_distance(torch.tensor(x), torch.tensor(y))
    assert isinstance(got, float), "energy_distance must return a Python float"
    assert got == pytest.approx(want, abs=1e-9), \
        f"energy_distance gave {got}, the V-statistic 2 E|X-Y| - E|X-X'| - E|Y-Y'| is {want}"
    assert evaluation.energy_distance(torch.tensor(x), torch.tensor(x)) == pytest.approx(0, abs=1e-12), \
        "energy_distance of a set with itself must be exactly 0 (V-statistics)"


def test_energy_distance_matches_gaussian_closed_form():
    # 1-D, X ~ N(0, 1), Y ~ N(1, 1): E|X-Y| = E|N(1, 2)|, E|X-X'| = E|Y-Y'| = 2/sqrt(pi); the
    # V-statistic of n-point sets averages 2 E|X-Y| - 2 (1 - 1/n) 2/sqrt(pi). 40 repeats of
    # n = 500 points: the mean's standard error is about 0.002; bound 0.012.
    def e_abs(mean, var):
        sd = math.sqrt(var)
        return sd * math.sqrt(2 / math.pi) * math.exp(-mean ** 2 / (2 * var)) + mean * math.erf(mean / (sd * math.sqrt(2)))

    n = 500
    want = 2 * e_abs(1.0, 2.0) - 2 * (1 - 1 / n) * 2 / math.sqrt(math.pi)
    g = gen(10)
    eds = [evaluation.energy_distance(torch.randn(n, 1, generator=g), 1 + torch.randn(n, 1, generator=g))
           for _ in range(40)]
    assert abs(statistics.mean(eds) - want) < 0.012, \
        f"energy_distance averages {statistics.mean(eds):.4f} on two unit Gaussians 1 apart, not {want:.4f}"


# ---------------------------------------------------------------------------------------------
# cps_log_prob: subgrpo.cps_log_prob
# ---------------------------------------------------------------------------------------------


def test_cps_log_prob_official_form():
    g = gen(11)
    x, v, x_next = (torch.randn(4, 3, 2, 2, generator=g) for _ in range(3))
    sigma, sigma_next = torch.tensor([1.0, 0.9, 0.75, 0.9]), torch.tensor([0.9, 0.75, 0.5, 0.5])
    got = subgrpo.cps_log_prob(x_next, x, v, sigma, sigma_next, 0.9)
    mu, _ = sample.cps_mean_std(x, v, sigma, sigma_next, 0.9)
    want = -((x_next - mu) ** 2).mean(dim=(1, 2, 3))
    assert got.shape == (4,) and got.dtype == torch.float32, "cps_log_prob must return float32 [B]"
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), \
        "the official cps_log_prob is not -mean over a sample's elements of (x' - mu)^2"


def test_cps_log_prob_exact_form_is_gaussian_density():
    g = gen(12)
    x, v, x_next = (torch.randn(3, 3, 2, 2, generator=g) for _ in range(3))
    sigma, sigma_next = torch.tensor([1.0, 0.9, 0.75]), torch.tensor([0.9, 0.75, 0.5])
    got = subgrpo.cps_log_prob(x_next, x, v, sigma, sigma_next, 0.9, form="exact")
    mu, rho = sample.cps_mean_std(x, v, sigma, sigma_next, 0.9)
    rho = torch.broadcast_to(torch.as_tensor(rho), mu.shape)
    for i in range(3):
        want = torch.distributions.Normal(mu[i], rho[i]).log_prob(x_next[i]).sum()
        assert abs(float(got[i]) - float(want)) < 1e-3, \
            f"the exact cps_log_prob of sample {i} is {float(got[i]):.4f}, the Gaussian density gives {float(want):.4f}"


def test_cps_log_prob_deterministic_steps_and_gradient_path():
    g = gen(13)
    x, x_next = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    v = torch.randn(3, 2, generator=g, requires_grad=True)
    for form in ("official", "exact"):
        for s_next, eta in ((0.0, 0.9), (0.5, 0.0)):
            if float(torch.as_tensor(sample.cps_mean_std(x, v, 0.75, s_next, eta)[1]).max()) != 0:
                continue  # the CPS step itself is not deterministic here: that is cps_step's grade
            lp = subgrpo.cps_log_prob(x_next, x, v, 0.75, s_next, eta, form)
            assert torch.equal(lp, torch.zeros(3)), f"cps_log_prob ({form}) of a deterministic step must be 0"
            (gv,) = torch.autograd.grad(lp.sum(), v)
            assert torch.isfinite(gv).all() and gv.abs().max() == 0, \
                f"cps_log_prob ({form}) of a deterministic step must have a zero, finite gradient"
    # the action x' is data: no gradient reaches it, and the gradient in v is that of the formula
    x_next.requires_grad_(True)
    lp = subgrpo.cps_log_prob(x_next, x, v, 0.9, 0.75, 0.9)
    lp.sum().backward()
    assert x_next.grad is None or x_next.grad.abs().max() == 0, "cps_log_prob must detach x_next"
    v2 = v.detach().clone().requires_grad_(True)
    mu, _ = sample.cps_mean_std(x, v2, 0.9, 0.75, 0.9)
    (-((x_next.detach() - mu) ** 2).mean(1)).sum().backward()
    assert torch.allclose(v.grad, v2.grad, atol=1e-6), "cps_log_prob's gradient in v is not the formula's"


# ---------------------------------------------------------------------------------------------
# group_advantages: subgrpo.group_advantages
# ---------------------------------------------------------------------------------------------

PROMPTS = ["p", "q", "p", "r", "q", "p", "r", "q"]
RA = [1.0, 2.0, 4.0, 0.5, -1.0, 3.0, 2.5, 9.0]
RB = [0.1, 0.0, 0.3, 0.9, 0.4, -0.2, 0.6, 0.2]


def centred(r):
    means = {p: statistics.mean(r[i] for i in range(len(r)) if PROMPTS[i] == p) for p in set(PROMPTS)}
    return [r[i] - means[PROMPTS[i]] for i in range(len(r))]


def test_group_advantages_normalised_by_hand():
    rew = {"a": torch.tensor(RA), "b": torch.tensor(RB), "unused": torch.tensor(RA) ** 3}
    got = subgrpo.group_advantages(rew, PROMPTS, {"a": 1.0, "b": 0.5})
    # per-prompt mean, GLOBAL population std of each reward, weighted sum, then standardised
    A = [1.0 * a / (statistics.pstdev(RA) + 1e-4) + 0.5 * b / (statistics.pstdev(RB) + 1e-4)
         for a, b in zip(centred(RA), centred(RB))]
    m, sd = statistics.mean(A), statistics.pstdev(A)
    want = torch.tensor([(a - m) / (sd + 1e-4) for a in A])
    assert got.dtype == torch.float32 and got.shape == (8,), "group_advantages must return float32 [N]"
    assert torch.allclose(got, want, atol=1e-5), \
        ("group_advantages differs from: per-prompt mean, global population std per reward, "
         f"weighted sum, standardised. Got {got.tolist()}, want {want.tolist()}")


def test_group_advantages_unnormalised_keeps_weights():
    rew = {"a": torch.tensor(RA), "b": torch.tensor(RB)}
    got = subgrpo.group_advantages(rew, PROMPTS, {"a": 2.0, "b": -3.0}, normalize=False)
    want = torch.tensor([2.0 * a - 3.0 * b for a, b in zip(centred(RA), centred(RB))])
    assert torch.allclose(got, want, atol=1e-5), \
        ("group_advantages(normalize=False) is not sum_k w_k (r_k - per-prompt mean): "
         f"got {got.tolist()}, want {want.tolist()}")


# ---------------------------------------------------------------------------------------------
# select_steps: subgrpo.select_steps, subgrpo.shared_noise
# ---------------------------------------------------------------------------------------------


def test_select_steps_deterministic_sorted_subset():
    for num_stochastic, num_train in ((3, 2), (5, 3)):
        for epoch in range(30):
            random.seed(epoch)  # the global RNG's state must not matter (other ranks have others)
            torch.manual_seed(epoch)
            S = subgrpo.select_steps(epoch, 7, num_stochastic, num_train)
            random.seed(epoch + 1000)
            torch.manual_seed(epoch + 1000)
            assert S == subgrpo.select_steps(epoch, 7, num_stochastic, num_train), \
                "select_steps must depend on (epoch, seed) only, so that every rank picks the same steps"
            assert isinstance(S, list) and len(S) == num_train and S == sorted(set(S)), \
                f"select_steps must return {num_train} distinct steps, sorted, as a list (got {S})"
            assert set(S) <= set(range(num_stochastic)), f"select_steps returned a step out of range: {S}"


def test_select_steps_uniform_over_subsets():
    # 3000 epochs: each of the 3 pairs of {0,1,2} has frequency 1/3 (standard error 0.0086; bound
    # 0.04), and consecutive epochs agree 1/3 of the time (a fixed cycle never or always does).
    for seed in (0, 1):
        picks = [tuple(subgrpo.select_steps(e, seed)) for e in range(3000)]
        for pair in ((0, 1), (0, 2), (1, 2)):
            f = picks.count(pair) / len(picks)
            assert abs(f - 1 / 3) < 0.04, f"select_steps picks {pair} in {f:.3f} of epochs, not 1/3"
        same = sum(a == b for a, b in zip(picks, picks[1:])) / (len(picks) - 1)
        assert abs(same - 1 / 3) < 0.05, \
            f"consecutive epochs pick the same pair {same:.3f} of the time, not 1/3: the choice is not random"
    runs = [[tuple(subgrpo.select_steps(e, seed)) for e in range(30)] for seed in (0, 1)]
    assert runs[0] != runs[1], "select_steps must depend on the seed"


def test_shared_noise_shared_within_a_prompt_only():
    torch.manual_seed(0)
    rank0 = subgrpo.shared_noise(["top", "bottom", "top", "ring", "top"], 1, 2, (2,))
    torch.manual_seed(1)  # another rank: another global RNG state, another batch order
    rank1 = subgrpo.shared_noise(["ring", "top"], 1, 2, (2,))
    assert rank0.shape == (5, 2) and rank0.dtype == torch.float32, "shared_noise must return float32 [B, *shape]"
    assert torch.equal(rank0[0], rank0[2]) and torch.equal(rank0[0], rank0[4]), \
        "shared_noise must give every copy of a prompt the same noise"
    assert torch.equal(rank1[1], rank0[0]) and torch.equal(rank1[0], rank0[3]), \
        "shared_noise must give a prompt the same noise on every rank and at any batch position"
    assert not torch.equal(rank0[0], rank0[1]), "shared_noise must differ between prompts"
    assert not torch.equal(subgrpo.shared_noise(["top"], 2, 2, (2,))[0], rank0[0]), \
        "shared_noise must differ between steps"
    assert not torch.equal(subgrpo.shared_noise(["top"], 1, 3, (2,))[0], rank0[0]), \
        "shared_noise must differ between epochs"
    big = subgrpo.shared_noise(["a", "a"], 0, 0, (3, 4, 4))
    assert big.shape == (2, 3, 4, 4) and torch.equal(big[0], big[1]), "shared_noise must handle image shapes"


def test_shared_noise_is_standard_normal_and_independent():
    # 2000 prompts x 8 numbers: mean 0 and variance 1 (standard errors 0.008 and 0.011; bounds
    # 0.04 and 0.06); the same prompt's noise at another step or epoch is uncorrelated (bound 0.04).
    prompts = [f"prompt {i}" for i in range(2000)]
    z = subgrpo.shared_noise(prompts, 0, 5, (8,)).double()
    assert abs(z.mean().item()) < 0.04 and abs(z.var().item() - 1) < 0.06, \
        f"shared_noise is not N(0, 1): mean {z.mean().item():.3f}, variance {z.var().item():.3f}"
    for other in (subgrpo.shared_noise(prompts, 1, 5, (8,)), subgrpo.shared_noise(prompts, 0, 6, (8,))):
        corr = torch.corrcoef(torch.stack([z.flatten(), other.double().flatten()]))[0, 1].item()
        assert abs(corr) < 0.04, f"shared_noise at another step or epoch is correlated ({corr:.3f})"


# ---------------------------------------------------------------------------------------------
# ppo_loss: subgrpo.ppo_loss
# ---------------------------------------------------------------------------------------------


def test_ppo_loss_clipping_by_hand():
    A = torch.tensor([1.0, 1.0, -1.0, -1.0])
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    loss, st = subgrpo.ppo_loss(new, torch.zeros(4), A, clip_range=0.2)
    # max(-A r, -A clip r): A>0: max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5;
    #                       A<0: max(1.5, 1.2) = 1.5, max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4), \
        f"ppo_loss is {loss.item():.4f}, not mean max(-A r, -A clip(r)) = 0.15"
    loss.backward()  # clipped entries get no gradient; d(-A r)/dl = -A r
    assert torch.allclose(new.grad, torch.tensor([0.0, -0.5, 1.5, 0.0]) / 4), \
        f"ppo_loss's gradient is {new.grad.tolist()}: clipped entries must get none, the others -A r / B"
    log_r = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    want = dict(ratio_mean=1.0, ratio_min=0.5, ratio_max=1.5, clip_frac=1.0,
                approx_kl=float((0.5 * log_r ** 2).mean()))
    for k, w in want.items():
        assert st[k] == pytest.approx(w, rel=1e-5), f"ppo_loss's statistic {k} is {st[k]}, not {w}"


def test_ppo_loss_on_policy_gradient_is_reinforce():
    g = gen(14)
    old = torch.randn(6, generator=g)
    new = old.clone().requires_grad_(True)
    A = torch.randn(6, generator=g)
    loss, st = subgrpo.ppo_loss(new, old, A)
    loss.backward()
    assert torch.allclose(new.grad, -A / 6, atol=1e-6), \
        "on-policy (ratio 1), ppo_loss's gradient must be REINFORCE's: -A / B per sample"
    assert st["ratio_min"] == st["ratio_max"] == 1.0 and st["clip_frac"] == 0.0 and st["approx_kl"] == 0.0, \
        "on-policy ppo_loss statistics must be ratio 1, no clipping, approx_kl 0"


# ---------------------------------------------------------------------------------------------
# final_step_x0: subgrpo.final_step_x0, subgrpo.bp_loss
# ---------------------------------------------------------------------------------------------


class AffineHead(nn.Module):
    """v = x W^T + b + sigma u + e_c: the sigma each sample gets is visible in the output."""

    def __init__(self):
        super().__init__()
        g = gen(15)
        self.W = nn.Parameter(0.3 * torch.randn(2, 2, generator=g))
        self.b = nn.Parameter(0.3 * torch.randn(2, generator=g))
        self.u = nn.Parameter(torch.randn(2, generator=g))
        self.e = nn.Parameter(0.3 * torch.randn(4, 2, generator=g))

    def forward(self, x, sigma, c):
        assert sigma.shape == (len(x),), "the network takes one sigma per sample"
        return x @ self.W.T + self.b + sigma[:, None] * self.u + self.e[c]


class TinyBackbone:
    def velocity(self, net, x, sigma, cond):
        return net(x, sigma, cond["c"])


def test_final_step_x0_value_and_gradient_path():
    net = AffineHead()
    x3 = torch.randn(6, 2, generator=gen(16)).requires_grad_(True)
    cond = {"c": torch.tensor([0, 1, 2, 0, 1, 2])}
    x0 = subgrpo.final_step_x0(TinyBackbone(), net, x3, 0.5, cond)
    with torch.no_grad():
        want = x3 - 0.5 * net(x3, torch.full((6,), 0.5), cond["c"])
    assert x0.dtype == torch.float32, "final_step_x0 must return float32"
    assert torch.allclose(x0, want, atol=1e-6), "final_step_x0 is not x_3 - sigma_3 G(x_3, sigma_3, c)"
    x0.sum().backward()
    assert x3.grad is None or x3.grad.abs().max() == 0, \
        "final_step_x0 must treat x_3 as a constant: no gradient may reach it (nor steps 0-2)"
    assert torch.allclose(net.b.grad, torch.full((2,), -0.5 * 6)), \
        "the gradient of sum x0_hat in the network's bias is not -sigma_3 B"


def test_bp_loss_hinge_by_hand():
    R = torch.tensor([1.0, 2.0, 5.0], requires_grad=True)
    loss, st = subgrpo.bp_loss(R, margin=3.0)
    assert loss.item() == pytest.approx(1.0), f"bp_loss is {loss.item()}, not mean relu(3 - R) = 1"
    loss.backward()
    assert torch.allclose(R.grad, torch.tensor([-1.0, -1.0, 0.0]) / 3), \
        "bp_loss's gradient is not -1/B where R < margin and 0 elsewhere"
    assert st["reward_mean"] == pytest.approx(8 / 3) and st["hinge_active"] == pytest.approx(2 / 3), \
        f"bp_loss's statistics are {st}, not reward_mean 8/3 and hinge_active 2/3"


# ---------------------------------------------------------------------------------------------
# tilt_linear: rewards.tilt_linear
# ---------------------------------------------------------------------------------------------


def mixture_log_density(mix, x, c):
    """log p(x | c) of an isotropic mixture at sigma = 0, float64."""
    d = x.shape[1]
    s2 = mix.stds ** 2
    sq = ((x[:, None, :] - mix.means[None]) ** 2).sum(-1)
    return torch.logsumexp(torch.log(mix.weights[c]) - 0.5 * sq / s2 - 0.5 * d * torch.log(2 * math.pi * s2), 1)


def test_tilt_linear_is_p_times_exp_beta_r_normalised():
    # p~ = p exp(beta r) / Z exactly  <=>  log p~ - log p - beta r is the same constant at every x
    # (and p~ is a normalised mixture). Unequal stds make every std-dependent term matter.
    base = models.toy_mixture()
    mix = models.Mixture(base.means, 0.2 + 0.05 * torch.arange(8.0), base.weights)
    a = torch.tensor([1.0, 0.5], dtype=torch.float64)
    x = 3 * torch.randn(400, 2, generator=gen(17), dtype=torch.float64)
    for beta in (0.3, 1.5, -0.7):
        tilted = rewards.tilt_linear(mix, a, beta)
        assert torch.allclose(tilted.weights.sum(1), torch.ones(4, dtype=torch.float64)), \
            "tilt_linear's weights must sum to 1 in every row"
        assert torch.allclose(tilted.stds, mix.stds), "tilt_linear must keep the component stds"
        for c in range(4):
            gap = mixture_log_density(tilted, x, c) - mixture_log_density(mix, x, c) - beta * (x @ a)
            spread = (gap.max() - gap.min()).item()
            assert spread < 1e-8, \
                (f"tilt_linear (beta {beta}, row {c}) is not p exp(beta r) / Z: log p~ - log p - beta r "
                 f"varies by {spread:.3g} over x")


def test_tilt_linear_single_gaussian_closed_form():
    mix = models.Mixture([[0.5, -1.0]], [0.7], [[1.0]])
    tilted = rewards.tilt_linear(mix, (2.0, 1.0), 0.4)
    want = torch.tensor([[0.5 + 0.4 * 0.49 * 2.0, -1.0 + 0.4 * 0.49 * 1.0]], dtype=torch.float64)
    assert torch.allclose(tilted.means, want), \
        f"tilt_linear moves a Gaussian's mean to {tilted.means.tolist()}, not mu + beta s^2 a = {want.tolist()}"
