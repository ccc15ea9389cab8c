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


def test_energy_distance_of_exact_samples_sits_at_the_noise_floor():
    # Two exact sample sets differ only by sampling noise; a shifted set is far above the floor.
    mix, gen = models.toy_mixture(), torch.Generator().manual_seed(0)
    c = torch.full((2000,), 2, dtype=torch.long)
    floor = evaluation.noise_floor(mix, c, gen)
    exact = evaluation.energy_distance(mix.sample(c, generator=gen), mix.sample(c, generator=gen))
    shifted = evaluation.energy_distance(mix.sample(c, generator=gen) + 0.3, mix.sample(c, generator=gen))
    assert 0.3 < exact / floor < 3, f"two exact sets are {exact / floor:.2f}x the noise floor"
    assert shifted / floor > 5, f"a set shifted by 0.3 is only {shifted / floor:.1f}x the noise floor"


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
    n, sigmas = 4000, models.sd3_sigmas()
    c = torch.zeros(n, dtype=torch.long)
    states = [mix.sample(c, float(s), generator=gen) for s in sigmas]
    ref = evaluation.ExactReference(mix, c, seed=5)
    out = evaluation.toy_metrics(states, sigmas, ref, mix.weights[0])
    assert len(out["ed_steps"]) == len(sigmas) - 1, "one ED per sampler step expected"
    assert out["ratio"] < 3, "exact final samples are far from the exact teacher"
    assert max(out["ratio_steps"]) < 4, "an exact intermediate marginal is far from its exact reference"
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
