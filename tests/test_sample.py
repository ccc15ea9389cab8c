"""Samplers and conventions against closed forms."""
import math

import pytest
import torch

import models
import sample


def test_x0_from_velocity_eps_from_velocity_roundtrip():
    torch.manual_seed(0)
    x0, eps = torch.randn(8, 2), torch.randn(8, 2)
    sigma = torch.rand(8)
    x = models.add_noise(x0, eps, sigma)
    v = models.velocity_target(x0, eps)
    assert torch.allclose(models.x0_from_velocity(x, v, sigma), x0, atol=1e-6), "x0_hat misses x0"
    assert torch.allclose(models.eps_from_velocity(x, v, sigma), eps, atol=1e-6), "eps_hat misses eps"


def test_velocity_from_score_on_mixture():
    mix = models.toy_mixture()
    torch.manual_seed(0)
    x, s, c = torch.randn(64, 2), torch.rand(64) * 0.9 + 0.05, torch.randint(0, 4, (64,))
    v = mix.velocity(x, s, c)
    assert torch.allclose(models.velocity_from_score(x, mix.score(x, s, c), s), v, atol=1e-4), \
        "velocity_from_score does not give the mixture's exact velocity"
    # the score is the gradient of the closed-form log density
    xg = x.double().requires_grad_(True)
    mix.log_prob(xg, s.double(), c).sum().backward()
    assert torch.allclose(xg.grad.float(), mix.score(x, s, c), atol=1e-4), \
        "the mixture's score is not the gradient of its log-density"


def test_sd3_sigmas_flux2_sigmas_match_table():
    # the sigma table of models.py, section 1
    assert torch.allclose(models.sd3_sigmas(), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])), "SD3 sigmas off the table"
    assert torch.allclose(models.flux2_sigmas(resolution=512),
                          torch.tensor([1.0, 0.95809, 0.88398, 0.71750, 0.0]), atol=2e-5), \
        "FLUX.2 sigmas at 512 px off the table"
    assert torch.allclose(models.flux2_sigmas(resolution=1024),
                          torch.tensor([1.0, 0.96738, 0.90814, 0.76720, 0.0]), atol=2e-5), \
        "FLUX.2 sigmas at 1024 px off the table"


def test_cps_step_eta0_is_euler_and_final_step_is_x0_hat():
    torch.manual_seed(0)
    x, v = torch.randn(16, 3, 4, 4), torch.randn(16, 3, 4, 4)
    out = sample.cps_step(x, v, 0.75, 0.5, eta=0.0, noise=torch.randn_like(x))
    assert torch.allclose(out, x + (0.5 - 0.75) * v, atol=1e-6), "CPS with eta 0 is not an Euler step"
    out = sample.cps_step(x, v, 0.5, 0.0, eta=0.9, noise=torch.randn_like(x))
    assert torch.allclose(out, x - 0.5 * v, atol=1e-6), "the CPS step to sigma' = 0 is not x0_hat"


def test_cps_step_preserves_marginal_for_known_x0():
    # With the true x0 and eps behind x, CPS maps x_sigma to a sample of N((1-s')x0, s'^2 I)
    # for any eta ("coefficient preserving", sample.py section 1).
    torch.manual_seed(0)
    N = 200_000
    x0 = torch.full((N, 1), 1.5)
    eps = torch.randn(N, 1)
    x = models.add_noise(x0, eps, 0.8)
    v = models.velocity_target(x0, eps)
    for eta in (0.3, 0.9):
        out = sample.cps_step(x, v, 0.8, 0.4, eta)
        assert out.mean().item() == pytest.approx(0.6 * 1.5, abs=0.01), f"eta {eta}: CPS moves the mean"
        assert out.std().item() == pytest.approx(0.4, abs=0.005), f"eta {eta}: noise std is not sigma'"
    mu, rho = sample.cps_mean_std(x, v, 0.8, 0.4, 0.9)
    assert float(rho) == pytest.approx(0.4 * math.sin(0.9 * math.pi / 2)), "fresh-noise std is not sigma' sin(theta)"


def test_euler_sample_teacher_ode_reaches_exact_distribution():
    bb = models.ToyBackbone(pretrain_steps=1)
    torch.manual_seed(0)
    n = 20_000
    c = torch.zeros(n, dtype=torch.long)
    x = torch.randn(n, 2)
    sig = models.sd3_sigmas(step_list=torch.linspace(1000, 5, 100).tolist())
    out = sample.euler_sample(bb, bb.teacher, x, sig, {"c": c})
    w = bb.mixture.weights[0]
    assert torch.allclose(out.double().mean(0), (w[:, None] * bb.mixture.means).sum(0), atol=0.03), \
        "the teacher ODE's samples miss the exact mixture mean"


def test_backward_simulation_grad_only_on_last_step():
    bb = models.ToyBackbone(pretrain_steps=1)
    net = bb.make_student("generator")
    torch.manual_seed(0)
    cond = bb.encode(["top"] * 8)
    for stop in (1, 2, 3, 4):
        sim = sample.backward_simulation(bb, net, bb.noise(8), cond, stop)
        assert not sim["x_in"].requires_grad, "steps before the last one carry gradient"
        assert sim["x_next"].requires_grad, "the last step's output carries no gradient"
        assert sim["sigma"] == pytest.approx(float(bb.sigmas[stop - 1])), "the last step starts at the wrong level"
        assert sim["sigma_next"] == pytest.approx(float(bb.sigmas[stop])), "the last step ends at the wrong level"
        # the gradient of x_next w.r.t. the net equals that of a single step from x_in
        net.zero_grad()
        sim["x_next"].sum().backward()
        g1 = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        v = bb.velocity(net, sim["x_in"], sample.full(sim["sigma"], sim["x_in"]), cond)
        mu, _ = sample.cps_mean_std(sim["x_in"], v, sim["sigma"], sim["sigma_next"], 0.9)
        mu.sum().backward()
        for a, b in zip(g1, net.parameters()):
            assert torch.allclose(a, b.grad, atol=1e-5), "the gradient is not that of the last step alone"


def test_rollout_returns_all_states():
    bb = models.ToyBackbone(pretrain_steps=1)
    states = sample.rollout(bb, bb.base, bb.noise(5), bb.encode(["ring"] * 5))
    assert len(states) == 5 and all(s.shape == (5, 2) for s in states), "rollout does not return the 5 states"


def test_random_stop_is_uniform_over_steps():
    # 4 steps, 40 000 draws: each stop in {1, 2, 3, 4} has frequency 1/4 (binomial sd 0.0022), and
    # nothing else occurs (0 would train no step, 5 would run past the last level).
    rng = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample.random_stop(4, rng) for _ in range(40_000)])
    assert set(draws.tolist()) == {1, 2, 3, 4}, "random_stop must return 1..num_steps only"
    freq = torch.bincount(draws, minlength=5)[1:].double() / len(draws)
    assert (freq - 0.25).abs().max() < 0.01, f"stop frequencies {freq.tolist()} are not uniform"


def test_random_stop_last_weight_gives_the_last_step_its_share():
    # weights (1, 1, 1, 9): the last stop has probability 9/12 = 0.75, the others 1/12 each
    # (binomial sd 0.0022 at 40 000 draws); weight 1 keeps the uniform draw's numbers exactly.
    rng = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample.random_stop(4, rng, last_weight=9.0) for _ in range(40_000)])
    freq = torch.bincount(draws, minlength=5)[1:].double() / len(draws)
    want = torch.tensor([1, 1, 1, 9], dtype=torch.float64) / 12
    assert (freq - want).abs().max() < 0.01, f"stop frequencies {freq.tolist()}, expected {want.tolist()}"
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [sample.random_stop(4, a) for _ in range(50)] == [sample.random_stop(4, b, 1.0) for _ in range(50)]
