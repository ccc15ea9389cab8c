"""Tests of subgrpo.py: every stage-2 equation against a hand computation or a closed form.

The generator in most tests is a tiny affine velocity head on the 2-D toy,
    v = W_k x + b_k + sigma u_k + e_{k,c}
with per-step parameters (k = the sampler step, found from sigma) or one shared set, so that
which step a gradient reaches is visible in which parameters it touches.
"""
import hashlib
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
import rewards  # noqa: E402
import subgrpo  # noqa: E402
from sample import cps_mean_std  # noqa: E402

ETA = 0.9


class Affine(nn.Module):
    """v = W_k x + b_k + sigma u_k + e_{k,c}; per_step=False uses k = 0 for every sigma."""

    def __init__(self, sigmas, per_step=True, num_cond=4, seed=0, scale=0.3):
        super().__init__()
        n = len(sigmas) - 1 if per_step else 1
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(scale * torch.randn(n, 2, 2, generator=g))
        self.b = nn.Parameter(scale * torch.randn(n, 2, generator=g))
        self.u = nn.Parameter(scale * torch.randn(n, 2, generator=g))
        self.e = nn.Parameter(scale * torch.randn(n, num_cond, 2, generator=g))
        self.per_step = per_step
        self.register_buffer("table", torch.as_tensor(sigmas[:-1]).float())

    def forward(self, x, sigma, c):
        if self.per_step:
            k = (sigma[:, None].float() - self.table[None]).abs().argmin(1)
        else:
            k = torch.zeros(len(x), dtype=torch.long)
        return (torch.einsum("bij,bj->bi", self.W[k], x) + self.b[k]
                + sigma[:, None] * self.u[k] + self.e[k, c])


@pytest.fixture(scope="module")
def bb():
    # the real toy backbone interface; pretrain_steps=0 skips the (unused) base MLP's training
    return models.ToyBackbone(pretrain_steps=0, width=8)


def flat_grad(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def group_centred(r, prompts):
    return subgrpo.group_advantages({"r": r}, prompts, {"r": 1.0}, normalize=False)


# ---------------------------------------------------------------------------------------------
# Log-probabilities (subgrpo.py, section 4)
# ---------------------------------------------------------------------------------------------


def test_cps_log_prob_official_form_by_hand():
    g = torch.Generator().manual_seed(0)
    x, v, x_next = (torch.randn(5, 3, 4, 4, generator=g) for _ in range(3))
    s, s_next = 0.9, 0.75
    th = ETA * math.pi / 2
    x0_hat, eps_hat = x - s * v, x + (1 - s) * v
    mu = (1 - s_next) * x0_hat + s_next * math.cos(th) * eps_hat
    expected = -((x_next - mu) ** 2).mean(dim=(1, 2, 3))
    got = subgrpo.cps_log_prob(x_next, x, v, s, s_next, ETA)
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_cps_log_prob_exact_form_is_gaussian_density():
    g = torch.Generator().manual_seed(1)
    x, v, x_next = (torch.randn(4, 3, 4, 4, generator=g) for _ in range(3))
    sigma = torch.tensor([1.0, 0.9, 0.75, 0.5])
    sigma_next = torch.tensor([0.9, 0.75, 0.5, 0.0])  # per-sample levels; the last is deterministic
    got = subgrpo.cps_log_prob(x_next, x, v, sigma, sigma_next, ETA, form="exact")
    mu, rho = cps_mean_std(x, v, sigma, sigma_next, ETA)
    for i in range(3):
        ref = torch.distributions.Normal(mu[i], rho[i]).log_prob(x_next[i]).sum()
        torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-3)
    assert got[3] == 0  # sigma_next = 0: a delta, returned as 0


def test_cps_log_prob_deterministic_step_is_zero_with_zero_finite_grad():
    x, x_next = torch.randn(3, 2), torch.randn(3, 2)
    v = torch.randn(3, 2, requires_grad=True)
    for form in ("official", "exact"):
        for s_next, eta in ((0.0, ETA), (0.5, 0.0)):
            lp = subgrpo.cps_log_prob(x_next, x, v, 0.75, s_next, eta, form)
            assert torch.equal(lp, torch.zeros(3))
            (gv,) = torch.autograd.grad(lp.sum(), v)
            assert torch.isfinite(gv).all() and gv.abs().max() == 0


def test_cps_log_prob_log_ratio_factor_two_rho_squared_over_D():
    """l_off(new) - l_off(old) = (2 rho^2 / D) (log pi(new) - log pi(old)), fixed transition."""
    g = torch.Generator().manual_seed(2)
    for shape in ((6, 2), (6, 3, 4, 4)):
        x, v_old = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        v_new = v_old + 0.1 * torch.randn(*shape, generator=g)
        s, s_next = 0.75, 0.5
        mu, rho = cps_mean_std(x, v_old, s, s_next, ETA)
        x_next = mu + rho * torch.randn(*shape, generator=g)  # a transition sampled under v_old
        lp = {f: [subgrpo.cps_log_prob(x_next, x, v, s, s_next, ETA, f) for v in (v_old, v_new)]
              for f in ("official", "exact")}
        d_off = lp["official"][1] - lp["official"][0]
        d_ex = lp["exact"][1] - lp["exact"][0]
        D = x[0].numel()
        torch.testing.assert_close(d_off, 2 * float(rho) ** 2 / D * d_ex, rtol=1e-3, atol=1e-6)
        assert d_off.abs().max() > 1e-4  # the check is not 0 == 0


# ---------------------------------------------------------------------------------------------
# SubGRPO: step selection, shared noise, rollout (subgrpo.py, section 3)
# ---------------------------------------------------------------------------------------------


def test_select_steps_deterministic_and_in_range():
    seen = set()
    for epoch in range(60):
        S = subgrpo.select_steps(epoch, seed=42)
        assert S == subgrpo.select_steps(epoch, seed=42)  # every rank computes the same
        assert len(S) == 2 and S == sorted(set(S)) and set(S) <= {0, 1, 2}
        seen.add(tuple(S))
    assert len(seen) == 3  # all three pairs occur
    runs = [[tuple(subgrpo.select_steps(e, seed)) for e in range(20)] for seed in (0, 1)]
    assert runs[0] != runs[1]
    S = subgrpo.select_steps(3, 0, num_stochastic=5, num_train=3)
    assert len(S) == 3 and S == sorted(set(S)) and set(S) <= set(range(5))
    # which RNG draws the steps is the implementation's business (tests/test_exercises.py checks
    # the law of the choice); only "every rank computes the same" is pinned, above


def test_shared_noise_is_one_draw_per_prompt():
    rank0 = subgrpo.shared_noise(["top", "bottom", "top", "ring", "top"], 1, 2, (2,))
    rank1 = subgrpo.shared_noise(["ring", "top"], 1, 2, (2,))  # another rank, another order
    assert rank0.shape == (5, 2) and rank0.dtype == torch.float32
    assert torch.equal(rank0[0], rank0[2]) and torch.equal(rank0[0], rank0[4])
    assert torch.equal(rank1[1], rank0[0]) and torch.equal(rank1[0], rank0[3])
    assert not torch.equal(rank0[0], rank0[1]) and not torch.equal(rank0[0], rank0[3])
    assert not torch.equal(subgrpo.shared_noise(["top"], 2, 2, (2,))[0], rank0[0])  # step
    assert not torch.equal(subgrpo.shared_noise(["top"], 1, 3, (2,))[0], rank0[0])  # epoch
    big = subgrpo.shared_noise(["a", "a"], 0, 0, (3, 4, 4))
    assert big.shape == (2, 3, 4, 4) and torch.equal(big[0], big[1])


def test_prompt_seed_formula():
    # (first 4 bytes of sha256, big-endian, + 10007 step + 100000 epoch) % 2^31, a function of its
    # own: shared_noise may use it or not (its test checks what the noise does, not how it is drawn)
    seed = (int(hashlib.sha256(b"top").hexdigest()[:8], 16) + 10007 * 1 + 100000 * 2) % 2 ** 31
    assert subgrpo.prompt_seed("top", 1, 2) == seed
    assert subgrpo.prompt_seed("top", 1, 2) != subgrpo.prompt_seed("top", 2, 2) != subgrpo.prompt_seed("top", 1, 3)
    assert 0 <= subgrpo.prompt_seed("x" * 1000, 99, 10 ** 6) < 2 ** 31


def recovered_noise(roll, k, eta=ETA):
    s, s_next = float(roll["sigmas"][k]), float(roll["sigmas"][k + 1])
    mu, rho = cps_mean_std(roll["latents"][:, k], roll["velocities"][:, k], s, s_next, eta)
    return (roll["next_latents"][:, k] - mu) / rho


def test_rollout_with_logprob_stores_the_transitions(bb):
    net = Affine(bb.sigmas)
    prompts = ["top", "bottom", "top", "top", "bottom", "ring"]
    cond = bb.encode(prompts)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    roll = subgrpo.rollout_with_logprob(bb, net, x, cond, prompts, [0, 2], epoch=5,
                                        generator=torch.Generator().manual_seed(1))
    for key in ("latents", "next_latents", "velocities"):
        assert roll[key].shape == (6, 4, 2)
    assert roll["log_probs"].shape == (6, 4)
    assert not any(t.requires_grad for t in roll.values())
    assert torch.equal(roll["latents"][:, 0], x)
    assert torch.equal(roll["latents"][:, 1:], roll["next_latents"][:, :-1])
    assert torch.equal(roll["x0"], roll["next_latents"][:, 3])
    # stored log-probs = the official formula at the sampling parameters; 0 on the last step
    for k in range(4):
        s, s_next = float(bb.sigmas[k]), float(bb.sigmas[k + 1])
        mu, _ = cps_mean_std(roll["latents"][:, k], roll["velocities"][:, k], s, s_next, ETA)
        ref = -((roll["next_latents"][:, k] - mu) ** 2).mean(1)
        torch.testing.assert_close(roll["log_probs"][:, k], ref)
    assert torch.equal(roll["log_probs"][:, 3], torch.zeros(6))
    # step 3 is deterministic: x0 = x_3 - sigma_3 v_3
    torch.testing.assert_close(roll["x0"], roll["latents"][:, 3] - 0.5 * roll["velocities"][:, 3])
    # step 1 (not selected) used the shared noise of each prompt; steps 0, 2 fresh noise
    z1 = recovered_noise(roll, 1)
    torch.testing.assert_close(z1, subgrpo.shared_noise(prompts, 1, 5, (2,)), rtol=1e-4, atol=1e-4)
    for k in (0, 2):
        zk = recovered_noise(roll, k)
        assert (zk[0] - zk[2]).abs().max() > 1e-2
    roll_ind = subgrpo.rollout_with_logprob(bb, net, x, cond, prompts, [0, 2], epoch=5,
                                            share_noise=False)
    z1 = recovered_noise(roll_ind, 1)
    assert (z1[0] - z1[2]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Ratio, advantages, PPO (subgrpo.py, section 5)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["official", "exact"])
def test_transition_log_prob_ratio_is_one_at_sampling_parameters_and_moves_after_an_update(bb, form):
    net = Affine(bb.sigmas)
    prompts = ["top", "ring", "bottom", "top"] * 4
    cond = bb.encode(prompts)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    roll = subgrpo.rollout_with_logprob(bb, net, x, cond, prompts, [0, 1], 0, form=form)
    A = torch.randn(16, generator=torch.Generator().manual_seed(4))
    for j in (0, 1):
        s, s_next = float(bb.sigmas[j]), float(bb.sigmas[j + 1])
        lp = subgrpo.transition_log_prob(bb, net, roll["latents"][:, j], roll["next_latents"][:, j],
                                         s, s_next, cond, form=form)
        loss, st = subgrpo.ppo_loss(lp, roll["log_probs"][:, j], A)
        assert st["ratio_min"] == st["ratio_max"] == 1.0 and st["clip_frac"] == 0.0
        # on-policy, the clipped surrogate's gradient is REINFORCE's: -mean A grad l
        net.zero_grad()
        loss.backward()
        g_ppo = flat_grad(net).clone()
        net.zero_grad()
        lp = subgrpo.transition_log_prob(bb, net, roll["latents"][:, j], roll["next_latents"][:, j],
                                         s, s_next, cond, form=form)
        (-(A * lp).mean()).backward()
        torch.testing.assert_close(g_ppo, flat_grad(net))
        assert g_ppo.abs().max() > 1e-4
    with torch.no_grad():
        net.W[0, 0, 0] += 0.05
    lp = subgrpo.transition_log_prob(bb, net, roll["latents"][:, 0], roll["next_latents"][:, 0],
                                     1.0, 0.9, cond, form=form)
    _, st = subgrpo.ppo_loss(lp, roll["log_probs"][:, 0], A)
    assert st["ratio_max"] - st["ratio_min"] > 1e-5 and st["clip_frac"] > 0


def test_ppo_loss_clipping_by_hand():
    A = torch.tensor([1.0, 1.0, -1.0, -1.0])
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    loss, st = subgrpo.ppo_loss(new, old, A, clip_range=0.2)
    # max(-A r, -A clip r): A>0: max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5;
    #                       A<0: max(1.5, 1.2) = 1.5,  max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    loss.backward()  # clipped entries get no gradient; d(-A r)/dl = -A r
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -0.5, 1.5, 0.0]) / 4)
    assert st["clip_frac"] == 1.0 and st["ratio_max"] == pytest.approx(1.5)


def test_group_advantages_by_hand():
    prompts = ["p", "q", "p", "r", "q", "p", "r"]
    ra = [1.0, 2.0, 4.0, 0.5, -1.0, 3.0, 2.5]
    rb = [0.1, 0.0, 0.3, 0.9, 0.4, -0.2, 0.6]
    weights = {"a": 1.0, "b": 0.5}
    rew = {"a": torch.tensor(ra), "b": torch.tensor(rb), "unused": torch.randn(7)}
    got = subgrpo.group_advantages(rew, prompts, weights)

    def per_reward(r):
        sd = statistics.pstdev(r)
        means = {p: statistics.mean(r[i] for i in range(7) if prompts[i] == p)
                 for p in set(prompts)}
        return [(r[i] - means[prompts[i]]) / (sd + 1e-4) for i in range(7)]

    A = [1.0 * a + 0.5 * b for a, b in zip(per_reward(ra), per_reward(rb))]
    m, sd = statistics.mean(A), statistics.pstdev(A)
    expected = torch.tensor([(a - m) / (sd + 1e-4) for a in A])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # normalize=False: sum_k w_k (r_k - per-prompt mean), weights kept, no std anywhere
    raw = subgrpo.group_advantages(rew, prompts, {"a": 2.0, "b": -3.0}, normalize=False)

    def centred(r):
        means = {p: statistics.mean(r[i] for i in range(7) if prompts[i] == p) for p in set(prompts)}
        return [r[i] - means[prompts[i]] for i in range(7)]

    want = torch.tensor([2.0 * a - 3.0 * b for a, b in zip(centred(ra), centred(rb))])
    torch.testing.assert_close(raw, want, rtol=1e-5, atol=1e-5,
                               msg="group_advantages(normalize=False) is not sum_k w_k (r_k - per-prompt mean)")
    clipped = subgrpo.clip_advantages(torch.tensor([-7.0, -2.0, 0.0, 6.0]))
    assert torch.equal(clipped, torch.tensor([-5.0, -2.0, 0.0, 5.0]))


# ---------------------------------------------------------------------------------------------
# Where reward gradients go (subgrpo.py, section 2)
# ---------------------------------------------------------------------------------------------


def test_final_step_x0_bp_loss_gradient_reaches_the_generator_only_through_the_final_step(bb):
    net = Affine(bb.sigmas, per_step=True)
    reward = rewards.QuadraticReward(gamma=1.0, m=(2.0, 0.0))
    prompts = ["top", "bottom", "ring", "top"] * 8
    cond = bb.encode(prompts)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(5))
    roll = subgrpo.rollout_with_logprob(bb, net, x, cond, prompts, [0, 2], 0)
    assert not reward(roll["x0"])["quadratic"].requires_grad  # rollout rewards carry no gradient

    # BP on: grad only on step 3's parameters, and equal to the hand-derived value for b_3
    x0_hat = subgrpo.final_step_x0(bb, net, roll["latents"][:, 3], 0.5, cond)
    torch.testing.assert_close(x0_hat, roll["x0"])
    loss, st = subgrpo.bp_loss(reward(x0_hat)["quadratic"], margin=3.0)
    assert st["hinge_active"] == 1.0
    net.zero_grad()
    loss.backward()
    for p in net.parameters():
        assert p.grad[:3].abs().max() == 0 and p.grad[3].abs().max() > 0
    # L = mean(3 - r(x0_hat)), dL/dx0_hat = gamma (x0_hat - m)/B, dx0_hat/db_3 = -sigma_3 I
    expected_b3 = -0.5 * (x0_hat.detach() - torch.tensor([2.0, 0.0])).mean(0)
    torch.testing.assert_close(net.b.grad[3], expected_b3)

    # BP off: the reward part of the loss (PPO on the selected steps, and even a PPO term on the
    # deterministic step 3 by mistake) leaves steps 3 and the unselected step 1 untouched
    A = subgrpo.group_advantages({"q": reward(roll["x0"])["quadratic"]}, prompts, {"q": 1.0})
    net.zero_grad()
    total = 0.0
    for j in (0, 2, 3):
        s, s_next = float(bb.sigmas[j]), float(bb.sigmas[j + 1])
        lp = subgrpo.transition_log_prob(bb, net, roll["latents"][:, j], roll["next_latents"][:, j],
                                         s, s_next, cond)
        total = total + subgrpo.ppo_loss(lp, roll["log_probs"][:, j], A)[0]
    total.backward()
    for p in net.parameters():
        assert p.grad[1].abs().max() == 0 and p.grad[3].abs().max() == 0
        assert p.grad[0].abs().max() > 0 and p.grad[2].abs().max() > 0


# ---------------------------------------------------------------------------------------------
# The hybrid gradient is unbiased; shared noise lowers its variance (subgrpo.py, sections 2, 3)
# ---------------------------------------------------------------------------------------------


def hybrid_parts(bb, net, reward, x, cond, prompts, seed, baseline):
    """The two halves of one hybrid estimate of grad E[r] (flat vectors, subgrpo.py section 2):
    score function with the exact log-prob on steps 0-2 (advantage r - baseline), and path-wise
    BP through step 3 (bp_loss with a margin that keeps the hinge active)."""
    gen = torch.Generator().manual_seed(seed)
    roll = subgrpo.rollout_with_logprob(bb, net, x, cond, prompts, [0, 1, 2], 0, form="exact",
                                        generator=gen)
    A = reward(roll["x0"])["quadratic"] - baseline
    pg = 0.0
    for j in range(3):
        s, s_next = float(bb.sigmas[j]), float(bb.sigmas[j + 1])
        lp = subgrpo.transition_log_prob(bb, net, roll["latents"][:, j], roll["next_latents"][:, j],
                                         s, s_next, cond, form="exact")
        pg = pg + subgrpo.ppo_loss(lp, roll["log_probs"][:, j], A)[0]
    x0_hat = subgrpo.final_step_x0(bb, net, roll["latents"][:, 3], float(bb.sigmas[3]), cond)
    bp = subgrpo.bp_loss(reward(x0_hat)["quadratic"], margin=1e6)[0]
    params = list(net.parameters())
    g_pg = torch.autograd.grad(pg, params)
    g_bp = torch.autograd.grad(bp, params)
    return -torch.cat([g.reshape(-1) for g in g_pg]), -torch.cat([g.reshape(-1) for g in g_bp])


def test_ppo_loss_plus_bp_loss_hybrid_gradient_matches_finite_difference_of_expected_reward(bb):
    net = Affine(bb.sigmas, per_step=False, num_cond=2, scale=0.4)
    reward = rewards.QuadraticReward(gamma=1.0, m=(1.0, 0.5))
    M, n = 40, 1024  # M independent batches of n samples
    prompts = ["top", "bottom"] * (n // 2)
    cond = bb.encode(prompts)

    def noise(b, size=n):
        return torch.randn(size, 2, generator=torch.Generator().manual_seed(10_000 + b))

    # finite differences with common random numbers: one big batch (M*n samples, fixed x_0 and
    # step noises) rolled out at theta +- h e_i; per-batch means give its Monte-Carlo spread
    big_prompts, big_cond = prompts * M, bb.encode(prompts * M)

    def batch_mean_rewards():
        with torch.no_grad():
            roll = subgrpo.rollout_with_logprob(bb, net, noise(-1, M * n), big_cond, big_prompts,
                                                [0, 1, 2], 0,
                                                generator=torch.Generator().manual_seed(7))
        return reward(roll["x0"].double())["quadratic"].reshape(M, n).mean(1)

    h, fd = 1e-2, []
    for p in net.parameters():
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += h
            up = batch_mean_rewards()
            with torch.no_grad():
                p.view(-1)[i] -= 2 * h
            down = batch_mean_rewards()
            with torch.no_grad():
                p.view(-1)[i] += h
            fd.append((up - down) / (2 * h))
    fd = torch.stack(fd, 1).float()  # [M, P]
    baseline = float(batch_mean_rewards().mean())  # a constant: any baseline leaves the mean as is

    parts = [hybrid_parts(bb, net, reward, noise(b), cond, prompts, b, baseline) for b in range(M)]
    g_pg = torch.stack([p[0] for p in parts])
    g_bp = torch.stack([p[1] for p in parts])

    def z_scores(g):
        se = (g.var(0) / M + fd.var(0) / M).sqrt()
        return (g.mean(0) - fd.mean(0)) / se

    assert fd.mean(0).abs().max() > 0.05  # a non-trivial gradient
    assert z_scores(g_pg + g_bp).abs().max() < 4.5
    # the test has power: either half alone is biased
    assert z_scores(g_pg).abs().max() > 8
    assert z_scores(g_bp).abs().max() > 8


def subgrpo_estimates(bb, net, reward, key, prompts, S, share, num=200):
    """`num` SubGRPO policy-gradient estimates (exact log-prob, group-mean baseline, no std
    division) at fixed theta; estimate i uses epoch i for its shared noise. Returns [num, P]."""
    cond = bb.encode(prompts)
    out = []
    for i in range(num):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(len(prompts), 2, generator=gen)
        roll = subgrpo.rollout_with_logprob(bb, net, x, cond, prompts, S, epoch=i,
                                            share_noise=share, form="exact", generator=gen)
        A = group_centred(reward(roll["x0"])[key], prompts)
        loss = 0.0
        for j in S:
            s, s_next = float(bb.sigmas[j]), float(bb.sigmas[j + 1])
            lp = subgrpo.transition_log_prob(bb, net, roll["latents"][:, j],
                                             roll["next_latents"][:, j], s, s_next, cond,
                                             form="exact")
            loss = loss + subgrpo.ppo_loss(lp, roll["log_probs"][:, j], A)[0]
        net.zero_grad()
        loss.backward()
        out.append(-flat_grad(net).clone())
    return torch.stack(out)


def test_shared_noise_lowers_policy_gradient_variance_at_equal_mean(bb):
    """200 estimates at fixed theta, 3 prompts x K = 16, with and without
    shared noise on the step not trained.

    Sharing is always unbiased. It lowers the variance when the untrained step's noise acts on
    the reward roughly additively and downstream of the trained steps (here: linear reward,
    S = {0, 1}, shared step 2; measured ratio ~0.4). It is not a free lunch: sharing also makes
    the K copies' gradient terms correlated through grad E[r | shared z], and where that varies
    with z (a quadratic reward, or a shared step upstream of a trained one) the variance went
    *up* by 1.3-2x in this toy. So only the favourable case is asserted for the variance."""
    net = Affine(bb.sigmas, per_step=False, num_cond=4, scale=0.4)
    prompts = ["top", "bottom", "ring"] * 16
    cases = ((rewards.LinearReward((1.0, 0.0)), "linear", [0, 1], True),
             (rewards.QuadraticReward(1.0, (1.0, 0.5)), "quadratic", [1, 2], False))
    for reward, key, S, expect_lower in cases:
        g_s = subgrpo_estimates(bb, net, reward, key, prompts, S, share=True)
        g_i = subgrpo_estimates(bb, net, reward, key, prompts, S, share=False)
        var_s, var_i = g_s.var(0), g_i.var(0)
        if expect_lower:
            assert var_s.sum() < 0.7 * var_i.sum()  # trace of the covariance
        used = (var_s + var_i) > 0  # the null condition's embedding never gets a gradient
        z = (g_s.mean(0) - g_i.mean(0))[used] / ((var_s + var_i)[used] / len(g_s)).sqrt()
        assert z.abs().max() < 4.0  # same mean: sharing adds no bias


# --- epoch bookkeeping: prompt draw, zero-advantage dropping, the stage-2 EMA schedule ----------


def test_draw_prompts_without_replacement_grouped_and_shared():
    """m distinct prompts, each exactly k times; the same list from an identically seeded
    generator (every rank); and over many draws every prompt equally often (a permutation)."""
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    idx = subgrpo.draw_prompts(10, 4, 3, g1)
    assert torch.equal(idx, subgrpo.draw_prompts(10, 4, 3, g2)), "ranks with one seed must agree"
    counts = torch.bincount(idx, minlength=10)
    assert sorted(counts.tolist()) == [0] * 6 + [3] * 4, "4 distinct prompts, 3 copies each"
    assert idx.tolist() != sorted(idx.tolist()), "the copies should be shuffled across positions"
    total = sum(torch.bincount(subgrpo.draw_prompts(10, 4, 1, g1), minlength=10) for _ in range(2000))
    assert (total.float() / 2000 - 0.4).abs().max() < 0.05, total  # each prompt in 4/10 of the draws
    few = subgrpo.draw_prompts(2, 3, 2, g1)  # more groups than prompts: at most ceil(3/2) groups each
    assert sorted(torch.bincount(few, minlength=2).tolist()) == [2, 4]


def test_drop_zero_advantages_pads_to_a_multiple_of_the_sub_batches():
    """Official rule: keep A != 0; pad with random dropped samples to a multiple of nb; all-zero
    advantages keep nb random samples; the picks repeat for the same (epoch, rank)."""
    A = torch.tensor([0.5, 0.0, -1.0, 0.0, 0.0, 2.0, 0.0, 0.0])  # 3 non-zero, nb 2 -> 4 kept
    keep = subgrpo.drop_zero_advantages(A, 2, epoch=3, rank=1)
    assert len(keep) == 4 and {0, 2, 5} <= set(keep.tolist()), keep
    assert torch.equal(keep, subgrpo.drop_zero_advantages(A, 2, epoch=3, rank=1))
    assert torch.equal(subgrpo.drop_zero_advantages(A, 1, 0), torch.tensor([0, 2, 5]))  # nb 1: no pad
    assert len(subgrpo.drop_zero_advantages(A, 4, 0)) == 4
    assert len(subgrpo.drop_zero_advantages(A, 8, 0)) == 8  # needs all five zeros back
    zero = subgrpo.drop_zero_advantages(torch.zeros(8), 4, epoch=0)
    assert len(zero) == 4, "all-zero advantages still give nb samples"
    picks = {tuple(subgrpo.drop_zero_advantages(A, 2, epoch=e).tolist()) for e in range(20)}
    assert len(picks) > 1, "the padding sample should be random across epochs"


def test_stage2_ema_decays_official_schedule_by_hand():
    """A one-parameter model, theta = number of optimiser steps taken, 4 sub-batches per epoch,
    20 epochs, the EMA applied exactly as the official trainer calls it. By hand: it fires for
    g = 7 and g = 15, each time nb = 4 times in a row toward theta_g = g:
        d7 = 8/17:              ema = (1 - d7^4) * 7                      = 6.6567...
        d15 = min(16/25, 0.9):  ema = d15^4 ema + (1 - d15^4) * 15        = 13.6002...
    (once per firing, as a nominal "decay every 8 steps" reads, would give 7.77)."""
    nb, theta, ema = 4, 0.0, 0.0
    for step in range(20):  # `step` optimiser steps done when this epoch starts
        before, after = subgrpo.stage2_ema_decays(step, nb)
        for d in before:
            ema = d * ema + (1 - d) * theta
        theta += 1.0  # this epoch's optimiser step
        for d in after:
            ema = d * ema + (1 - d) * theta
    d7, d15 = 8 / 17, 16 / 25
    hand = d15 ** 4 * ((1 - d7 ** 4) * 7) + (1 - d15 ** 4) * 15
    assert ema == pytest.approx(hand, rel=1e-12) and hand == pytest.approx(13.600228, abs=1e-6), (ema, hand)
    assert abs(ema - (d15 * (1 - d7) * 7 + (1 - d15) * 15)) > 1, "must differ from one update per firing"
    assert subgrpo.stage2_ema_decays(7, 16) == ([8 / 17] * 15, [])  # 15 before the step
    assert subgrpo.stage2_ema_decays(6, 16) == ([], [8 / 17])  # the 16th application, after the step
    assert subgrpo.stage2_ema_decays(100, 16) == ([], []) and subgrpo.ema_decay(1000) == 0.9
