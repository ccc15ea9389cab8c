"""
subgrpo.py -- Stage 2 math (RTDMD): the reward half of the tilted KL, the hybrid policy gradient,
SubGRPO's step subsets with shared noise, and reward back-propagation through the final step.
The epoch bookkeeping after section 7 (draw_prompts, drop_zero_advantages, stage2_ema_decays)
reproduces the official sampler and trainer; each function cites its source.

Paper sections cited: App. G (hybrid policy gradient), App. H (GRPO background), App. I (the
algorithm). "Official code" is github.com/Harahan/RTDMD (README); its stage-2 trainer is
rtdmd/trainers/rtdmd_trainer.py on top of rtdmd/trainers/grpo_trainer.py, with
rtdmd/trainers/bp_mixin.py (reward back-prop) and rtdmd/trainers/ac_dmd_mixin.py (final-step DM).
Its settings are in configs/rtdmd/*.yaml.

1. The reward term of the reward-tilted KL
   For the tilted teacher p~(x|c) = p(x|c) exp(beta r(x,c)) / Z_beta(c) (derived in acdmd.py,
   section 1),  KL(p_theta || p~) = KL(p_theta || p) - beta E_{p_theta}[r] + log Z_beta(c),  and
   log Z_beta does not depend on theta: the gradient splits into distribution matching (stage 1,
   acdmd.py; in stage 2 applied to the final step only) and  -beta grad E_{p_theta}[r],  the part
   this file implements. beta has no knob of its own: the loss weights set it (section 6).
   tests/test_rewards_toy.py checks the split numerically.

2. The hybrid policy gradient (paper App. G)                           `final_step_x0`, `bp_loss`
   The 4-step sampler draws x^(0) ~ N(0, I) (no theta), takes three stochastic CPS steps
       pi_theta(x^(k+1) | x^(k)) = N(x^(k+1); mu_theta(x^(k)), rho_k^2 I),     k = 0, 1, 2,
   (x^(k): the state at sigma_k; x0: the clean sample) and ends with the deterministic step
       x0 = F_theta(x^(3)) = x^(3) - sigma_3 G_theta(x^(3), sigma_3, c)           (rho_3 = 0).
   With the path density q_theta(x^(0..3)) = N(x^(0)) prod_k pi_theta(x^(k+1)|x^(k)),
       E[r] = integral q_theta(x^(0..3)) r(F_theta(x^(3))),
   and the product rule gives two terms:
       grad E[r] = E[ r(x0) sum_{k=0..2} grad log pi_theta(x^(k+1) | x^(k)) ]    score-function part
                 + E[ grad_theta r(F_theta(x^(3))), x^(3) held fixed ]             path-wise part
   - The score-function identity needs a density, which steps 0-2 have and step 3 (a delta) has
     not: there the log-prob is constant, the PPO ratio is 1 and PPO gives no gradient.
   - Step 3 is a differentiable map of a fixed x^(3), so the path-wise term is plain back-prop of a
     differentiable reward through x0_hat = x^(3) - sigma_3 v with x^(3) a stored constant: no
     gradient flows into steps 0-2 through x^(3). The hinge relu(3 - R_w) of the official code
     (rtdmd/trainers/bp_mixin.py, margin 3.0) is always active for its rewards (R_w ~ 1.5), so it
     is plain reward maximisation.
   - A baseline does not move the mean (E[grad log pi] = 0), so r is replaced by the group
     advantage A (group_advantages), and the on-policy PPO surrogate (ppo_loss; ratio = 1 at the
     sampling parameters) has gradient  -mean_b A grad log pi: GRPO (App. H).
   The two parts are disjoint pieces of one gradient: PG credits how steps 0-2 move x^(3), BP how
   step 3 maps a fixed x^(3). Dropping either biases the estimate (tests/test_subgrpo.py checks the
   sum against a finite difference of E[r]).

3. SubGRPO: two of the three stochastic steps per epoch, shared noise on the third
   Each epoch trains only S = select_steps(epoch) (2 of {0, 1, 2}):
       g = mean_i A_i sum_{k in S} grad log pi(x^(k+1)_i | x^(k)_i).
   Each step is in S with probability 2/3, so over epochs g estimates 2/3 of the PG part. On the
   steps not in S, all K copies of a prompt use the same noise z_k.
   (Official code: rtdmd/trainers/grpo_trainer.py, `_sample_selected_steps` and
   `_make_shared_noise`; the seeds below are theirs, so every rank agrees without communication.)
   - No bias: each sample's path still has its usual law (shared z_k is still N(0, I)); the
     score grad log pi_k(i) for k in S is zero-mean given everything except sample i's own fresh
     z_k, which stays independent, so E[(r_i - rbar) grad log pi(i)] is unchanged.
   - Less variance (usually): the group mean rbar now shares z_k with r_i, so r_i - rbar
     subtracts (an estimate of) E[r | prompt, shared z] instead of E[r | prompt]: a control
     variate that removes the reward spread the untrained steps cause, which carries no
     information about the trained ones.
   - Not a free lunch: sharing also correlates the K copies' gradient terms through
     grad E[r | shared z]. It pays off when the shared noise acts on the reward roughly
     additively and after the trained steps; in the toy with a quadratic reward, or with the
     shared step before a trained one, the variance went up 1.3-2x (tests/test_subgrpo.py).

4. Which log-probability (paper App. H; official code: rtdmd/diffusers_patch/sde_with_logprob.py)
   exact:     log pi = -|x' - mu|^2 / (2 rho^2) - D log rho - (D/2) log(2 pi)
   official:  l      = -|x' - mu|^2 / D           (mean over the D non-batch elements; no 1/2rho^2)
   For a fixed stored transition, log-ratios relate by
       l_new - l_old = (2 rho^2 / D) (log pi_new - log pi_old),
   so "official" rescales each step's policy gradient by 2 rho_k^2 / D (larger weight for early,
   noisier steps) and keeps ratios near 1. "official" reproduces the official PPO-vs-aux balance;
   "exact" is the unbiased estimator of section 2. On real latents (D ~ 65k) the exact log-prob
   is ~ -D/2 in float32, so its log-ratios resolve only ~1e-2 and any bf16/train-eval mismatch
   in v is amplified D/(2 rho^2) times: use "exact" for the toy and for derivations.

5. Advantages and the clipped surrogate (paper App. H)
   Per reward R, A_R(i) = (r_R(i) - mean of i's prompt group) / (std over the whole epoch + 1e-4);
   then A = sum_R w_R A_R is standardised once more over the epoch and clipped to [-5, 5]. The
   surrogate L = mean_b max(-A r, -A clip(r, 1 - eps, 1 + eps)) with eps = 1e-5 and one optimiser
   step per epoch is evaluated at the sampling parameters, where r = 1: on-policy REINFORCE with
   a group baseline. (Official code: rtdmd/trainers/grpo_trainer.py, `_grpo_compute_advantages`;
   rtdmd/trainers/grpo_utils.py, `PerPromptStatTracker`.)

6. How the loss weights PG : DM : BP set the effective beta
   The stage-2 generator loss is  w_pg L_PPO(steps in S) + w_dm L_DM(final step) + w_bp L_BP(final
   step),  1 : 1e-3 : 1e-4 in configs/rtdmd/*.yaml (`last_step_loss.weight`, `bp_grad_scale`).
   Divide it by w_dm: the DM term then stands for grad KL(p_theta || p) and the two reward terms
   for -beta grad E[r]. Each term's expected gradient is a known multiple of the exact one:
   - DM: the surrogate's gradient is g / (B D) (acdmd.py, section 3), and E[g] is a positive
     multiple of the data-space KL gradient: for the final step of a Gaussian generator
     N(m, sd^2 I) against a teacher N(m_T, sd^2 I), E[g] = C (m - m_T) = C sd^2 grad_m KL with
     C = E_t[ t^2 / ((1-t)^2 sd^2 + t^2) ] (section 7b): the DM term is (w_dm C sd^2 / D) grad KL.
   - BP: with the hinge active, exactly -w_bp times the path-wise part of grad E[r].
   - PG: with the exact log-prob and un-normalised advantages r - (group mean), -w_pg (1 - 1/N) f
     times the score-function part (N = group size: the group mean includes the sample itself;
     f = the fraction of epochs that train a given step, 2/3 for SubGRPO). The official log-prob
     multiplies step k's share by 2 rho_k^2 / D and the standardised advantages divide by the
     reward's std.
   When the two reward parts get the same multiple w_r, the update is proportional to
   grad KL - beta_eff grad E[r] with   beta_eff = D w_r / (w_dm C sd^2).
   So beta_eff is not a property of the weights alone: it scales with D (16 x 64 x 64 for SD3.5-M
   latents at 512 px, 2 in the toy) and with the teacher's spread through C sd^2, and the official
   log-prob and standardised advantages add the factors 2 rho_k^2 / D and 1 / std(r). Weights
   tuned for SD3 latents therefore do not carry over to the 2-D toy, which has its own (train.py).
   With gradient normalisation (official) g is further divided by the per-sample mean|x - x_real|,
   which changes during training: beta_eff is then defined only up to that scale, and a run's beta
   is read off by fitting (eval.py, fit_beta).

7. The stage-2 stationary point on toy-gauss, in closed form                `stationary_mean_gauss`
   Set-up ("toy-gauss", train.py --exact-decomposition): teacher p = N(m_T, sd^2 I) in D = 2 dims,
   linear reward r = a^T x, generator G = v_T + b (models.ShiftVelocity: it can only move its
   output mean), un-normalised DM direction, exact Gaussian log-prob, advantages A = r - (group
   mean), no clipping. Weights w_pg, w_dm, w_bp; N and f as in section 6 (one prompt: N is the
   whole epoch; f = 1 with --all-steps).
   a. How b moves the output mean. The exact velocity of a Gaussian is affine in x:
          v_T(x, sigma) = (x - E[x0|x]) / sigma,  slope lambda = (1 - (1-sigma) sd^2 / V) / sigma,
      V = (1-sigma)^2 sd^2 + sigma^2. The CPS mean
      (1-s')(x - sigma v) + s' cos(theta)(x + (1-sigma) v)  (sample.cps_mean_std; s' = next sigma)
      moves by  c_k b  for a velocity shift b and by  J_k delta  for an input shift delta:
          c_k = -(1-s') sigma + s' cos(theta) (1-sigma),
          J_k = (1-s')(1 - sigma lambda) + s' cos(theta) (1 + (1-sigma) lambda).
      So the output mean is  m = m_T + sum_k gamma_k b,  gamma_k = c_k prod_{j>k} J_j  (the exact
      velocity keeps the mean exact, so b = 0 gives m = m_T). The last step has gamma_3 = -sigma_3.
   b. The expected gradient in b of each term (the accumulation divisor is common and drops out):
      - BP, w_bp mean relu(M - a^T x0_hat), hinge active:        -w_bp gamma_3 a
      - DM, surrogate 1/2 mean_{b,d}(x0_hat - sg(x0_hat - g))^2:   w_dm gamma_3 E[g] / D.  With the
        fake equal to the velocity of the generator's output law N(m, sd_g^2), the tower rule gives
        E[x0_hat_fake] = m while E[x0_hat_real] = m_T + (1-t)^2 sd^2 / V(t) (m - m_T), so
            E[g] = C (m - m_T),   C = E_t[ t^2 / ((1-t)^2 sd^2 + t^2) ]
        over the stage-2 law of t (tau = 10 + 990 u clamped to [20, 980], point masses included;
        sd_g does not enter).
      - PG, -w_pg mean_i A_i sum_{k in S} grad_b log pi_k(i): the score identity gives
        E[r grad log pi_k] = d E[r] / d b_k = gamma_k a (b_k: the copy of b used at step k), and a
        group mean that includes sample i itself scales it by (1 - 1/N):
            -w_pg (1 - 1/N) f sum_{k<3} gamma_k a    (averaged over the epochs' step subsets).
   c. Setting the sum to zero:
          m* = m_T + (D / (w_dm C)) [ w_bp + w_pg (1 - 1/N) f sum_{k<3} gamma_k / gamma_3 ] a,
      i.e. the exact tilt m_T + beta_eff sd^2 a of a Gaussian by exp(beta a^T x) (rewards.py,
      section 1) with beta_eff = |m* - m_T| / sd^2 (|a| = 1). With PG off this is section 6's
      beta_eff = D w_bp / (w_dm C sd^2). The gamma_k of the earlier steps have the sign of
      gamma_3, so the policy gradient strengthens the tilt: it moves x^(3), and the final step,
      which alone feels the DM pull, has to hold the balance. tests/test_train_stage2.py trains
      this set-up and lands on m*.
"""
import hashlib
import math
import random

import torch

from models import timestep_to_sigma, x0_from_velocity
from sample import cps_mean_std, cps_step, full

# --- Transition log-probability (section 4) --------------------------------------------------


def cps_log_prob(x_next, x, v, sigma, sigma_next, eta, form="official"):
    """Log-probability of a stored CPS transition x -> x_next under the policy with velocity v.

    x_next, x, v: [B, ...]; sigma, sigma_next: float or Tensor[B]; eta in [0, 1].
    mu, rho = sample.cps_mean_std(x, v, sigma, sigma_next, eta) and, with D = numel per sample,
        form "official":  l = -mean_{non-batch}(x_next - mu)^2
        form "exact":     l = -|x_next - mu|^2 / (2 rho^2) - D log rho - (D/2) log(2 pi)
    (their log-ratios differ by the factor 2 rho^2 / D, section 4). x_next is detached (the action
    is data); gradient flows through v only. Float32. Deterministic steps (rho = 0: sigma_next = 0
    or eta = 0) return 0. Returns Tensor[B]."""
    # --- exercise cps_log_prob: begin ---
    assert form in ("official", "exact"), form
    assert x.dim() >= 2, "x must be [B, ...] with at least one non-batch dim"
    mu, rho = cps_mean_std(x, v, sigma, sigma_next, eta)  # float32
    x_next = x_next.detach().float()
    dims = tuple(range(1, x.dim()))
    D = x[0].numel()
    rho = torch.as_tensor(rho, dtype=torch.float32, device=mu.device).expand(len(x), *mu.shape[1:])
    rho = rho.reshape(len(x), -1)[:, 0]  # [B]: rho is the same for all elements of a sample
    stochastic = rho > 0
    sq = ((x_next - mu) ** 2).sum(dims)  # [B]
    if form == "official":
        lp = -sq / D
    else:
        rho_safe = torch.where(stochastic, rho, torch.ones_like(rho))  # no inf/nan in grads
        lp = -sq / (2 * rho_safe ** 2) - D * torch.log(rho_safe) - 0.5 * D * math.log(2 * math.pi)
    return torch.where(stochastic, lp, torch.zeros_like(lp))
    # --- exercise cps_log_prob: end ---


def transition_log_prob(bb, net, x, x_next, sigma, sigma_next, cond, eta=0.9, form="official"):
    """Recompute the log-probability of stored transitions x -> x_next with the current network:
    v = G_theta(x, sigma, c) with grad (section 4), then cps_log_prob. x, x_next: [B, ...]
    (constants); sigma, sigma_next: floats. Returns Tensor[B], differentiable in net's params."""
    v = bb.velocity(net, x, full(sigma, x), cond)
    return cps_log_prob(x_next, x, v, sigma, sigma_next, eta, form)


# --- SubGRPO: step selection and shared noise (section 3), the stage-2 rollout ---------------


def select_steps(epoch, seed, num_stochastic=3, num_train=2):
    """The PPO steps of this epoch: `num_train` distinct steps of {0 .. num_stochastic-1}, sorted.
    A local RNG seeded by  seed + 100000 epoch + 104729  makes every rank choose the same steps
    without communicating (section 3). Returns list[int]."""
    # --- exercise select_steps: begin ---
    rng = random.Random(seed + 100000 * epoch + 104729)
    return sorted(rng.sample(range(num_stochastic), num_train))
    # --- exercise select_steps: end ---


def prompt_seed(prompt, step, epoch):
    """(first 4 bytes of sha256(prompt), read big-endian, + 10007 step + 100000 epoch) mod 2^31."""
    head = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big")
    return (head + 10007 * step + 100000 * epoch) % (2 ** 31)


def shared_noise(prompts, step, epoch, shape, device="cpu"):
    """Noise of a non-selected stochastic step, shared by every copy of a prompt (section 3).
    Drawn on the CPU from a generator seeded by prompt_seed(prompt, step, epoch), so all copies of
    a prompt, on every rank and at any batch position, get the same tensor.
    prompts: list[str] of length B; shape: one sample's shape. Returns float32 [B, *shape]."""
    # --- exercise select_steps: begin ---
    cache = {}
    for p in prompts:
        if p not in cache:
            g = torch.Generator().manual_seed(prompt_seed(p, step, epoch))
            cache[p] = torch.randn(*shape, generator=g)
    return torch.stack([cache[p] for p in prompts]).to(device)
    # --- exercise select_steps: end ---


@torch.no_grad()
def rollout_with_logprob(bb, net, x, cond, prompts, train_steps, epoch, eta=0.9, share_noise=True,
                         form="official", sigmas=None, generator=None):
    """Run the few-step CPS sampler from x = x_{sigma_0} [B, ...] without grad and store what the
    policy update needs. At step k the CPS noise is
        k in train_steps           -> fresh, independent per sample (from `generator` if given);
        other stochastic k         -> shared_noise(prompts, k, epoch) if share_noise, else fresh;
        deterministic k (sigma'=0) -> none (rho = 0).
    Returns a dict (N = number of steps, 4):
        latents      [B, N, ...]  x_{sigma_k}          next_latents [B, N, ...]  x_{sigma_{k+1}}
        velocities   [B, N, ...]  v_k (the fake score's stage-2 step uses them)
        log_probs    [B, N]       l_old, at the sampling parameters (0 on deterministic steps)
        sigmas       [N + 1]      the sampler sigmas
        x0           [B, ...]     the sample = next_latents[:, -1]"""
    sigmas = bb.sigmas if sigmas is None else sigmas
    x = x.float()
    steps = []  # (x, x_next, v, l_old) of every step
    for k in range(len(sigmas) - 1):
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        v = bb.velocity(net, x, full(s, x), cond).float()
        if s_next == 0 or eta == 0:
            z = torch.zeros_like(x)
        elif k not in train_steps and share_noise:
            z = shared_noise(prompts, k, epoch, x.shape[1:], x.device)
        else:
            z = torch.randn_like(x) if generator is None else torch.randn(
                x.shape, generator=generator, device=generator.device).to(x.device)
        x_next = cps_step(x, v, s, s_next, eta, z)
        steps.append((x, x_next, v, cps_log_prob(x_next, x, v, s, s_next, eta, form)))
        x = x_next
    latents, next_latents, velocities, log_probs = (torch.stack(t, 1) for t in zip(*steps))
    return dict(latents=latents, next_latents=next_latents, velocities=velocities,
                log_probs=log_probs, sigmas=torch.as_tensor(sigmas).float(), x0=x)


# --- Advantages and PPO (section 5), reward back-prop on the final step (section 2) ----------


def group_advantages(rewards, prompts, weights, eps=1e-4, normalize=True):
    """GRPO advantages with a per-prompt mean and a global std (section 5).

    rewards: {name: Tensor[N]} for the whole epoch (gathered over ranks); prompts: list[str], N;
    weights: {name: w}, the rewards that count (other keys of `rewards` are ignored).
        A_R(i) = (r_R(i) - mean_{j: prompt j = prompt i} r_R(j)) / (std_{all j} r_R(j) + eps)
        A      = sum_R w_R A_R,      then   A <- (A - mean A) / (std A + eps)
    std is the population std (divide by N). normalize=False skips both std divisions, giving
    A = sum_R w_R (r_R - per-prompt mean): plain REINFORCE with a group baseline, whose expected
    update is an exact multiple of grad E[r] (sections 6, 7: "exact decomposition mode").
    Returns float32 [N]."""
    # --- exercise group_advantages: begin ---
    N = len(prompts)
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    A = torch.zeros(N, dtype=torch.float64)
    for name, w in weights.items():
        r = rewards[name].detach().double().cpu().reshape(N)
        centred = torch.empty_like(r)
        for idx in groups.values():
            centred[idx] = r[idx] - r[idx].mean()
        A += w * (centred / (r.std(unbiased=False) + eps) if normalize else centred)
    if normalize:
        A = (A - A.mean()) / (A.std(unbiased=False) + eps)
    return A.float()
    # --- exercise group_advantages: end ---


def clip_advantages(advantages, clip_max=5.0):
    """A clipped to [-clip_max, clip_max] before the policy loss (section 5; adv_clip_max = 5)."""
    return advantages.clamp(-clip_max, clip_max)


def ppo_loss(log_prob_new, log_prob_old, advantages, clip_range=1e-5):
    """Clipped surrogate of one step j in S (section 5):
        r = exp(l_new - l_old),    L = mean_b max(-A r, -A clip(r, 1 - eps, 1 + eps)).
    log_prob_new [B] (with grad), log_prob_old [B] and advantages [B] (constants).
    At the sampling parameters r = 1 and grad L = -mean_b A grad l_new (REINFORCE with a baseline).
    Returns (scalar loss, {ratio_mean, ratio_min, ratio_max, clip_frac, approx_kl} as floats)."""
    # --- exercise ppo_loss: begin ---
    A = advantages.detach().float()
    log_ratio = log_prob_new.float() - log_prob_old.detach().float()
    ratio = torch.exp(log_ratio)
    unclipped = -A * ratio
    clipped = -A * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = dict(ratio_mean=ratio.mean().item(), ratio_min=ratio.min().item(),
                     ratio_max=ratio.max().item(),
                     clip_frac=((ratio - 1).abs() > clip_range).float().mean().item(),
                     approx_kl=(0.5 * log_ratio ** 2).mean().item())
    return loss, stats
    # --- exercise ppo_loss: end ---


def final_step_x0(bb, net, x3, sigma3, cond):
    """The deterministic last step (section 2): x0_hat = x^(3) - sigma_3 G_theta(x^(3), sigma_3, c),
    with grad through the network only; x^(3) [B, ...] is a stored rollout state (a constant), so
    reward gradients reach the generator through this one call, never through steps 0-2. float32."""
    # --- exercise final_step_x0: begin ---
    x3 = x3.detach()
    v = bb.velocity(net, x3, full(sigma3, x3), cond)
    return x0_from_velocity(x3.float(), v.float(), sigma3)
    # --- exercise final_step_x0: end ---


def bp_loss(rewards_weighted_sum, margin=3.0):
    """Reward back-prop hinge of the final step (section 2):  L_BP = mean_b relu(margin - R_w),
    R_w [B] = sum_k w_k r_k(decode(x0_hat)), differentiable. While R_w < margin (always, in
    practice) grad L_BP = -mean_b grad R_w: the path-wise part of the hybrid gradient. The caller
    applies the weight bp_grad_scale = 1e-4. Returns (loss, {reward_mean, hinge_active} floats)."""
    # --- exercise final_step_x0: begin ---
    R = rewards_weighted_sum.float()
    loss = torch.relu(margin - R).mean()
    stats = dict(reward_mean=R.mean().item(), hinge_active=(R < margin).float().mean().item())
    return loss, stats
    # --- exercise final_step_x0: end ---


# --- Epoch bookkeeping: which prompts, which samples, when the EMA moves (official trainer) ---


def draw_prompts(num_prompts, m, k, generator):
    """Prompt indices of one sampling iteration, for all ranks at once [m k]: the first m of a
    random permutation, each repeated k times (a GRPO group), then shuffled so that a group's
    copies spread over the ranks (official code: rtdmd/trainers/grpo_utils.py,
    DistributedKRepeatSampler). `generator` is seeded alike on every rank: every rank draws the
    same list and knows every group without communicating. Without replacement, because two
    groups of one prompt would merge into one 2k-sample group; only when m > num_prompts (a toy
    with few prompts) are permutations concatenated (each prompt at most ceil(m / num_prompts)
    times)."""
    perms = [torch.randperm(num_prompts, generator=generator) for _ in range(-(-m // num_prompts))]
    idx = torch.cat(perms)[:m].repeat_interleave(k)
    return idx[torch.randperm(m * k, generator=generator)]


def drop_zero_advantages(advantages, num_batches, epoch, rank=0):
    """Indices (sorted) of the local samples the policy update keeps (official code:
    rtdmd/trainers/grpo_trainer.py, _grpo_compute_advantages):
      1. every sample with A != 0 (a group with equal rewards has A = 0 and no policy gradient: it
         would only dilute the sub-batches);
      2. if none is left, num_batches random samples (an update is never empty);
      3. random dropped samples added back (if enough exist) up to a multiple of num_batches, so
         the kept samples split into equal sub-batches; these carry A = 0: no PPO gradient, but
         their final-step DM and back-prop terms still count.
    The random picks use CPU generators seeded 1000003 epoch + rank (step 2) and + 17 (step 3),
    as the official trainer does, so a resumed run repeats them.
    advantages: Tensor[N] (this rank's). Returns LongTensor[<= N]."""
    keep = advantages.detach().cpu() != 0
    n = len(keep)
    if n and not keep.any():
        g = torch.Generator().manual_seed(epoch * 1_000_003 + rank)
        keep[torch.randperm(n, generator=g)[:min(n, num_batches)]] = True
    short = -int(keep.sum()) % num_batches  # how many are missing to the next multiple
    dropped = torch.nonzero(~keep).flatten()
    if short and len(dropped) >= short:
        g = torch.Generator().manual_seed(epoch * 1_000_003 + rank + 17)
        keep[dropped[torch.randperm(len(dropped), generator=g)[:short]]] = True
    return torch.nonzero(keep).flatten()


def ema_decay(step, max_decay=0.9):
    """Warm-up decay of the stage-2 parameter EMA: min((1 + step) / (10 + step), max_decay)
    (official code: rtdmd/utils/ema.py, get_current_decay)."""
    return min((1 + step) / (10 + step), max_decay)


def stage2_ema_decays(step, num_batches, every=8, max_decay=0.9):
    """The EMA updates of the epoch that starts after `step` optimiser steps, as the official
    trainer makes them: an EMA call after EVERY one of the num_batches sub-batches (official code:
    rtdmd/trainers/rtdmd_trainer.py, _grpo_dmd_training_stage) with the step counter of that
    moment, which updates only when (counter + 1) % every == 0 (rtdmd/utils/ema.py):
      calls 1 .. nb-1, before the optimiser step: counter = step,    fire if (step + 1) % every == 0
      call nb, after it:                         counter = step + 1, fire if (step + 2) % every == 0
    Returns (before, after): the decays to apply, in order, before and after this epoch's
    optimiser step (ema <- d ema + (1 - d) theta each). Net effect, with g = 8j + 7 and theta_g
    the parameters after g steps (the last call of one epoch and the first nb - 1 of the next see
    the same theta_g and the same d):
        ema <- d^nb ema + (1 - d^nb) theta_g,     d = min((1 + g) / (10 + g), 0.9),
    once every 8 steps: d^16 ~ 0.19 at steady state, not the nominal 0.9."""
    fire = lambda counter: (counter + 1) % every == 0  # noqa: E731
    before = [ema_decay(step, max_decay)] * (num_batches - 1) if fire(step) else []
    after = [ema_decay(step + 1, max_decay)] if fire(step + 1) else []
    return before, after


# --- The stage-2 stationary point on toy-gauss (sections 6, 7) -------------------------------


def stationary_mean_gauss(bb, w_pg, w_dm, w_bp, N, f=2 / 3, a=(1.0, 0.0), eta=0.9):
    """m* of the exact-decomposition mode on toy-gauss (derivation: section 7). bb: the toy-gauss
    backbone (its single-Gaussian mixture and sampler sigmas); w_pg, w_dm, w_bp: loss weights;
    N: samples per group; f: fraction of epochs a stochastic step is trained; a: the linear
    reward's direction. Returns (m* float64 [D], parts) with parts = {C, gamma, beta_eff}."""
    m_T, sd2 = bb.mixture.means[0], float(bb.mixture.stds[0]) ** 2
    D, cos = m_T.numel(), math.cos(eta * math.pi / 2)
    sig = [float(x) for x in bb.sigmas]
    c, J = [], []
    for sg, sn in zip(sig[:-1], sig[1:]):
        V = (1 - sg) ** 2 * sd2 + sg ** 2
        lam = (1 - (1 - sg) * sd2 / V) / sg
        c.append(-(1 - sn) * sg + sn * cos * (1 - sg))
        J.append((1 - sn) * (1 - sg * lam) + sn * cos * (1 + (1 - sg) * lam))
    gamma = [c[k] * math.prod(J[k + 1:]) for k in range(len(c))]
    # C = E_t[t^2 / ((1-t)^2 sd^2 + t^2)] on a fine midpoint grid of u: the law of t of
    # acdmd.sample_renoise_timesteps(0.0), point masses at the clamps included
    u = (torch.arange(1_000_000, dtype=torch.float64) + 0.5) / 1_000_000
    t = timestep_to_sigma((10 + 990 * u).clamp(20, 980))
    C = (t ** 2 / ((1 - t) ** 2 * sd2 + t ** 2)).mean().item()
    push = w_bp + w_pg * (1 - 1 / N) * f * sum(gamma[:-1]) / gamma[-1]
    shift = D / (w_dm * C) * push
    m = m_T + shift * torch.tensor(a, dtype=torch.float64)
    return m, {"C": C, "gamma": gamma, "beta_eff": shift / sd2}
