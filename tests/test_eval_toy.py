"""The toy metrics of eval.py against numbers known in closed form (eval.py, sections 1-2)."""
import torch

import eval as evaluation
import models
import rewards


def test_energy_distance_of_two_point_masses_is_twice_their_distance():
    # ED = 2 E|X-Y| - E|X-X'| - E|Y-Y'|: for point masses at a and b the last two terms vanish.
    x = torch.tensor([[0.0, 0.0]]).repeat(50, 1)
    y = torch.tensor([[3.0, 4.0]]).repeat(70, 1)
    assert abs(evaluation.energy_distance(x, y) - 10.0) < 1e-9, "ED of two point masses 5 apart is not 10"
    assert evaluation.energy_distance(x, x) == 0.0, "ED of a set with itself is not 0"


def test_noise_floor_is_the_expected_energy_distance_of_two_exact_sets():
    # E[ED_V] of independent sets of sizes n and m from one law is E|X-X'| (1/n + 1/m): the mean of
    # 200 exact-pair EDs at n = 500 must match 2 E|X-X'| / n; a set shifted by 0.3 is far above it.
    mix, gen = models.toy_mixture(), torch.Generator().manual_seed(0)
    n, c = 500, torch.full((500,), 2, dtype=torch.long)
    floor = evaluation.noise_floor(mix, 2, n, gen)
    eds = torch.tensor([evaluation.energy_distance(mix.sample(c, generator=gen), mix.sample(c, generator=gen))
                        for _ in range(200)])
    assert abs(eds.mean().item() / floor - 1) < 0.12, f"exact pairs average {eds.mean() / floor:.3f}x the floor"
    shifted = evaluation.energy_distance(mix.sample(c, generator=gen) + 0.3, mix.sample(c, generator=gen))
    assert shifted / floor > 5, f"a set shifted by 0.3 is only {shifted / floor:.1f}x the noise floor"


def test_exactreference_another_exact_set_reads_between_half_and_twice_the_floor():
    # The metric's ED/floor (REF_SETS pairs, toy_metrics) of an exact set, 5 evaluation seeds x 3
    # prompts: it must not depend on one lucky reference draw (a single pair reads 0.2-3.5).
    # n = 1000: the ratio's spread does not depend on n (n ED tends to a fixed weighted chi-square).
    mix, n = models.toy_mixture(), 1000
    for seed in range(5):
        for ci in range(3):
            gen = torch.Generator().manual_seed(100 + 10 * seed + ci)
            x = mix.sample(torch.full((evaluation.REF_SETS * n,), ci, dtype=torch.long), generator=gen)
            ref = evaluation.ExactReference(mix, ci, n, seed=1000 * seed + ci)
            r = evaluation.toy_metrics([x, x], [1.0, 0.0], ref, mix.weights[ci])["ratio"]
            assert 0.5 < r < 2, f"another exact set reads {r:.2f}x the floor (seed {seed}, prompt {ci})"


def test_angular_gap_of_exact_and_uniform_samples():
    # 3 pi/32 is 1.96 angular stds (0.3 / 2 rad) of a mode: exact ~5%; uniform on the circle 25%
    # (half the 2 pi/8 spacing is pi/8 = 4 pi/32, so 1/4 of each sector lies beyond 3 pi/32).
    mix, gen = models.toy_mixture(), torch.Generator().manual_seed(7)
    c = torch.full((40_000,), 2, dtype=torch.long)
    exact = evaluation.angular_gap(mix.sample(c, generator=gen), mix, mix.weights[2])
    assert 0.04 < exact < 0.065, f"gap of exact ring samples {exact:.3f}, expected ~0.05"
    phi = torch.rand(40_000, generator=gen, dtype=torch.float64) * 2 * torch.pi
    uniform = evaluation.angular_gap(2 * torch.stack([phi.cos(), phi.sin()], 1), mix, mix.weights[2])
    assert abs(uniform - 0.25) < 0.01, f"gap of uniform samples on the circle {uniform:.3f}, not 0.25"
    top = evaluation.angular_gap(mix.sample(torch.full((4000,), 1, dtype=torch.long), generator=gen), mix,
                                 mix.weights[0])
    assert top > 0.9, "samples of 'bottom' judged against the modes of 'top' should be almost all in the gap"


def test_occupancy_counts_the_nearest_component():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[0.1, 0.0], [9.0, 1.0], [8.0, -1.0], [-1.0, 0.5]])
    occ = evaluation.occupancy(x, means)
    assert torch.equal(occ, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)), \
        "occupancy does not assign each point to its nearest mean"


def test_toy_metrics_of_exact_marginals_match_the_exact_weights():
    # States drawn from the exact marginals p_{sigma_k}: every ED sits near its floor and the
    # occupancy error is sampling noise only (~ 1/sqrt(n)).
    mix, gen = models.toy_mixture(), torch.Generator().manual_seed(1)
    n, sigmas = 2000, models.sd3_sigmas()
    c = torch.zeros(evaluation.REF_SETS * n, dtype=torch.long)
    states = [mix.sample(c, float(s), generator=gen) for s in sigmas]
    ref = evaluation.ExactReference(mix, 0, n, seed=5)
    out = evaluation.toy_metrics(states, sigmas, ref, mix.weights[0])
    assert len(out["ed_steps"]) == len(sigmas) - 1, "one ED per sampler step expected"
    assert 0.5 < out["ratio"] < 2, "exact final samples are far from the exact teacher"
    assert max(out["ratio_steps"]) < 2, "an exact intermediate marginal is far from its exact reference"
    assert out["occ_err"] < 0.03, f"occupancy error {out['occ_err']:.3f} for exact samples"
    assert 0.003 < out["outliers"] < 0.013, f"{out['outliers']:.4f} of exact samples are 3 stds out (expected ~0.8%)"


def test_outlier_fraction_of_exact_samples_is_the_gaussian_tail():
    # An isolated 2-D Gaussian has P(|z| > 3) = exp(-9/2) = 1.11% outside 3 stds; on the ring a
    # few of those land within 3 stds of a neighbouring mode, so an exact set reads a bit less.
    mix, gen = models.toy_mixture(), torch.Generator().manual_seed(4)
    c = torch.full((40_000,), 2, dtype=torch.long)
    exact = evaluation.outlier_fraction(mix.sample(c, generator=gen), mix)
    assert 0.006 < exact < 0.0111, f"{exact:.4f} of exact samples are 3 stds out, expected just under 1.11%"
    one = models.Mixture(mix.means[:1], mix.stds[:1], torch.ones(1, 1, dtype=torch.float64))
    alone = evaluation.outlier_fraction(one.sample(torch.zeros(40_000, dtype=torch.long), generator=gen), one)
    assert abs(alone - 0.0111) < 0.0015, f"{alone:.4f} of one Gaussian's samples are 3 stds out, not 1.11%"
    noisy = evaluation.outlier_fraction(mix.sample(c, 0.5, generator=gen), mix, sigma=0.5)
    assert noisy < 0.0111, f"{noisy:.4f} of exact sigma-0.5 samples are 3 stds from every sigma-0.5 mode"
    wrong = evaluation.outlier_fraction(mix.sample(c, 0.5, generator=gen), mix)  # judged at sigma 0
    assert wrong > 0.2, "samples of p_0.5 judged against the sigma-0 modes should mostly be outliers"


def test_fit_beta_recovers_the_tilt_of_exact_tilted_samples():
    mix, reward = models.toy_mixture(), rewards.QuadraticReward(1.0, (2.0, 0.0))
    grid = [0.0, 0.1, 0.3, 1.0, 3.0]
    tilt, gen = reward.tilt(mix, 0.3), torch.Generator().manual_seed(2)
    samples = {p: tilt.sample(torch.full((1000,), ci, dtype=torch.long), generator=gen)
               for ci, p in enumerate(models.TOY_PROMPTS)}
    fitted = evaluation.fit_beta(samples, mix, reward, grid=grid)  # grid point, then refined
    assert abs(fitted - 0.3) < 0.08, f"exact samples of the beta = 0.3 tilt fit best at beta = {fitted:.3f}"


def test_fit_beta_reward_recovers_the_tilt_of_exact_tilted_samples():
    mix, reward = models.toy_mixture(), rewards.QuadraticReward(1.0, (2.0, 0.0))
    tilt, gen = reward.tilt(mix, 0.3), torch.Generator().manual_seed(6)
    samples = {p: tilt.sample(torch.full((20_000,), ci, dtype=torch.long), generator=gen)
               for ci, p in enumerate(models.TOY_PROMPTS)}
    fitted = evaluation.fit_beta_reward(samples, mix, reward)
    assert abs(fitted - 0.3) < 0.02, f"the reward-matched beta of exact beta = 0.3 samples is {fitted:.3f}"


def test_tilted_metrics_of_exact_tilted_samples_match_the_exact_reward():
    mix, reward = models.toy_mixture(), rewards.LinearReward((1.0, 0.0))
    tilt, gen = reward.tilt(mix, 0.5), torch.Generator().manual_seed(3)
    samples = {p: tilt.sample(torch.full((3000,), ci, dtype=torch.long), generator=gen)
               for ci, p in enumerate(models.TOY_PROMPTS)}
    rows = evaluation.tilted_metrics(samples, mix, reward, 0.5)
    for p in models.TOY_PROMPTS:  # the reward's per-sample std is <= 1.5: 0.12 is > 4 errors
        assert abs(rows[p]["reward"] - rows[p]["reward_exact"]) < 0.12, \
            f"mean reward of exact tilted samples for {p!r} is off its closed form"
        assert rows[p]["occ_err"] < 0.04, f"occupancy of exact tilted samples for {p!r} is off"


def test_summarize_reports_pickscore_in_table_units():
    scores = {"pickscore": torch.tensor([0.8, 0.9]), "clipscore": torch.tensor([0.2, 0.4])}
    out = evaluation.summarize(scores)
    assert abs(out["pickscore"]["mean"] - 0.85 * 26) < 1e-5, "PickScore is not reported x 26"
    assert abs(out["clipscore"]["std"] - 0.1) < 1e-6, "std over images is not the population std"


def test_last_step_ceiling_exact_map_reads_at_the_floor_and_regression_learns():
    # the exact probability-flow map from sigma 0.5 carries exact samples of p_0.5 to exact samples of p_0:
    # ED/floor near 1 and the Gaussian-tail outliers (0.4-0.8%); a map off by a sign or a sigma would not.
    # 60 MSE steps already take the regressed MLP to 2.7-5.4x, far from a fresh net's 22-64x (steps=0).
    rows = evaluation.last_step_ceiling(steps=60, n=400)
    exact = [r for r in rows if r[1] == "exact map"]
    net = [r for r in rows if r[1] == "regressed MLP"]
    assert [r[0] for r in exact] == list(models.TOY_PROMPTS)
    assert all(float(r[2]) < 2.5 and float(r[4]) < 0.015 for r in exact), exact
    assert all(float(r[2]) < 10 for r in net), net
