r"""
acdmd.py -- Stage 1 math: AC-DMD (distribution matching per sub-interval of the 4-step sampler).

Paper sections cited: appendices B (step-k objective), D (ambient denoising score matching), E and
F (consistency). "Official code" is github.com/Harahan/RTDMD (README); its stage-1 trainer is
rtdmd/trainers/ac_dmd_trainer.py, with helpers in rtdmd/trainers/ac_dmd_utils.py.

1. The objective: a reward-tilted KL, and why stage 1 is its beta -> 0 limit      `kl_split_check`
   RTDMD tilts the (CFG) teacher p_T by a reward r:   p~(x|c) = p_T(x|c) exp(beta r(x,c)) / Z(c).
   Expanding the log of p~ inside the KL to the generator's distribution p_G:

       KL(p_G || p~) = E_pG[log p_G - log p_T - beta r + log Z]
                     = KL(p_G || p_T)  -  beta E_pG[r]  +  log Z(c).

   log Z does not depend on the generator, so

       grad KL(p_G || p~) = grad KL(p_G || p_T)  -  beta grad E_pG[r]
                            \_ distribution matching _/   \_ reward _/

   Stage 1 (this file) trains the first term alone (beta -> 0); stage 2 (subgrpo.py) adds the
   second. `kl_split_check` verifies the identity by quadrature on a 1-D example.

2. The step-k objective and the sub-interval kernel (paper App. B)                     `renoise`
   Step k of the sampler maps level sigma_k to s = sigma_{k+1}. AC-DMD asks that the marginal
   q_k of its output x_s equals the teacher's marginal p_s. It compares the two after noising
   further to a level t > s with the exact forward kernel of the flow:

       x_t = a_ts x_s + sigma_ts n,  a_ts = (1-t)/(1-s),  sigma_ts^2 = t^2 - a_ts^2 s^2,  n ~ N(0, I).

   Why this kernel: if x_s = (1-s) x0 + s e (models.py, section 1), then
   a_ts x_s + sigma_ts n = (1-t) x0 + (a_ts s e + sigma_ts n), and the bracket is Gaussian with
   variance a_ts^2 s^2 + sigma_ts^2 = t^2. So the kernel maps the flow's marginal at s onto its
   marginal at t, for any data law; a_ts is fixed by the x0 coefficient, sigma_ts by the noise
   variance. (sigma_ts^2 > 0 for t > s; the code clamps it at 1e-12.) If q_k = p_s, then
   q_{k,t} := law(x_t) = p_t for every t > s, so AC-DMD minimises E_t KL(q_{k,t} || p_t).
   The reparameterised gradient of that KL w.r.t. x_s is

       a_ts (score_q(x_t) - score_p(x_t)) = -(1-t)^2 / ((1-s) t) (v_q(x_t) - v_p(x_t)),

   using score = -(x + (1-t) v)/t (models.py, section 1): a *velocity difference*. v_p is the
   CFG teacher; v_q, the velocity of the generator's noised marginal, is unknown and is learned by
   the fake score f (section 4). The levels t are drawn unshifted, tau ~ U[1000 s + 10, 1000]
   clamped to [20, 980], t = tau/1000 (`sample_renoise_timesteps`; official code:
   rtdmd/trainers/ac_dmd_trainer.py, `_sample_ac_timesteps`).

3. The generator loss: DMD direction with shared projection noise               `generator_loss`
   Both velocities at x_t are projected back from t to s with one CPS step (sample.py, section 1)
   that uses the *same* noise z. The CPS mean is linear in v with coefficient
   -(1-s) t + s cos(theta_eta) (1-t), so the noise cancels and only the velocity difference
   survives:

       x_s^fake - x_s^real = kappa(s, t) (v_f - v_r),   kappa = s cos(theta_eta)(1-t) - (1-s) t < 0.

   With two independent draws the difference would carry s sin(theta_eta) (z_f - z_r), noise far
   larger than the signal. kappa has the sign of the exact gradient of section 2, so the
   direction g = x_s^fake - x_s^real is the exact KL gradient times a positive (s, t) weight. g
   is normalised per sample by mean|x_s - x_s^real| and applied through the surrogate
   1/2 mean (x_s - sg(x_s - g))^2 (float64), whose gradient w.r.t. x_s is g / (B D) (B samples of
   D numbers). With s = 0 this is DMD2's direction on x0_hat. (Official code:
   rtdmd/trainers/ac_dmd_trainer.py, `_update_generator`; rtdmd/trainers/dmd_trainer.py,
   `dmd_loss`.)

4. The fake score: ambient denoising score matching (paper App. D)              `ambient_target`
   The fake score never sees clean data of intermediate steps, only x_s. It regresses f(x_t, t) on
   the target T with the ambient coefficient omega:

       T = -x_s/(1-s) + omega n,     omega = [t + (1-t) s^2/(1-s)^2] / sigma_ts.

   Derivation (Tweedie on the sub-interval kernel). x_t = a_ts x_s + sigma_ts n with n independent
   of x_s is a Gaussian channel, so for ANY law of x_s, with q_t = law(x_t) and S = grad log q_t:

       E[n | x_t] = -sigma_ts S(x_t),      E[x_s | x_t] = (x_t + sigma_ts^2 S(x_t)) / a_ts.

   With a_ts (1-s) = 1-t:  E[T | x_t] = -(x_t + sigma_ts^2 S)/(1-t) - omega sigma_ts S. The flow
   velocity of q_t is v = -(x_t + t S)/(1-t) (models.py, section 1), so E[T | x_t] = v exactly
   when omega sigma_ts = (t - sigma_ts^2)/(1-t). With sigma_ts^2 = t^2 - a_ts^2 s^2,
   t - sigma_ts^2 = t(1-t) + (1-t)^2 s^2/(1-s)^2, which gives omega above. The L2 minimiser of
   E||f - T||^2 is E[T | x_t]: the velocity of the generator's noised marginal, what section 2
   needs. With s = 0, T = n - x0: ordinary flow matching.
   Weighting: the official configs (configs/cold_start/*.yaml: target_formula_move_scale_out
   true, fake_loss_weight_clamp [0, 10]) compare sigma_ts f with sigma_ts T under the weight
   clamp(1/sigma_ts^2, 0, 10), i.e. min(1, 10 sigma_ts^2) on (f - T)^2 (`fake_loss_weight`). T's
   variance grows like 1/sigma_ts^2 as t -> s, and the weight damps exactly those samples.
   (Official code: rtdmd/trainers/ac_dmd_utils.py, `flow_forward_target_v2`.)

5. The consistency regulariser (paper App. E, F)                               `consistency_loss`
   For the optimal fake score f = v of q_t (the noised law of x_s, section 4), the denoiser
   h(x, t) = x - t f(x, t) = (x + t^2 S_t(x))/(1-t) is a martingale along the reverse process:
   E[h(x_t', t') | x_t] = h(x_t, t) for s < t' < t. At s = 0, h = E[x0 | x_t] and this is the
   tower rule; for any law of x_s it follows from two Gaussian-channel identities. The kernel
   from s to t factors through t' (a_ts = a_tt' a_t's), so x_t = a_tt' x_t' + sigma_tt' n' with n'
   independent of x_t', and with S_t = grad log q_t:
       E[x_t' | x_t] = (x_t + sigma_tt'^2 S_t)/a_tt'        (Tweedie, section 4),
       E[S_t'(x_t') | x_t] = a_tt' S_t(x_t)                  (the score of a Gaussian channel).
   Then E[h(x_t', t') | x_t] = (x_t + (sigma_tt'^2 + a_tt'^2 t'^2) S_t)/(a_tt' (1-t')), and
   sigma_tt'^2 + a_tt'^2 t'^2 = t^2, a_tt' (1-t') = 1-t give h(x_t, t).
   We step from x_t to t' = t - delta/1000 (delta ~ U{1..200}) twice with independent noise,
   using the fake's own (detached) velocity in a CPS step, and use the two-sample estimator
   mean (h_1 - h_0)(h_2 - h_0). Over the two independent moves its mean is the squared defect
   ||E[h(x')|x_t] - h_0||^2 exactly (unbiased; it can be negative, keep it). Under the exact
   reverse kernel the defect of the exact velocity is zero; under the CPS kernel it is small but
   not zero, so the term is a regulariser (weight 1e-2), not an identity of the optimum.
   (Official code: rtdmd/trainers/ac_dmd_trainer.py, `_compute_consistency_loss`.)
"""
import torch

from models import bcast, cfg_velocity, sigma_to_timestep, timestep_to_sigma, x0_from_velocity
from sample import cps_step, full

# --- 1. The reward-tilted KL split, checked by quadrature ------------------------------------


def kl_split_check(log_p_gen, log_p_teacher, reward, beta, grid):
    """Numerically evaluate both sides of  KL(p_G || p~) = KL(p_G || p_T) - beta E_pG[r] + log Z.
    log_p_gen, log_p_teacher, reward: callables of a 1-D grid (normalised log densities and the
    reward); beta: tilt strength. Uses the trapezoid rule on `grid` (float64).
    Returns (lhs, rhs) as floats; they agree to quadrature accuracy."""
    x = grid.double()
    lg, lt, r = log_p_gen(x), log_p_teacher(x), reward(x)
    log_Z = torch.log(torch.trapezoid(torch.exp(lt + beta * r), x))
    log_tilted = lt + beta * r - log_Z
    pg = lg.exp()
    lhs = torch.trapezoid(pg * (lg - log_tilted), x)
    kl_teacher = torch.trapezoid(pg * (lg - lt), x)
    mean_r = torch.trapezoid(pg * r, x)
    rhs = kl_teacher - beta * mean_r + log_Z
    return lhs.item(), rhs.item()


# --- 2. Sub-intervals: the exact forward kernel from s to t > s; unshifted renoising levels --


def subinterval_coeffs(s, t):
    """a_ts = (1-t)/(1-s) and sigma_ts = sqrt(max(t^2 - a_ts^2 s^2, 1e-12)) (section 2).
    If x_s = (1-s) x0 + s eps0 then a_ts x_s + sigma_ts n = (1-t) x0 + (noise of std t)."""
    # --- exercise renoise: begin ---
    a = (1 - t) / (1 - s)
    sigma_ts = torch.sqrt(torch.clamp(t ** 2 - a ** 2 * s ** 2, min=1e-12))
    return a, sigma_ts
    # --- exercise renoise: end ---


def renoise(x_s, s, t, n):
    """x_t = a_ts x_s + sigma_ts n: push a sample at level s forward to level t > s."""
    # --- exercise renoise: begin ---
    a, sigma_ts = subinterval_coeffs(bcast(s, x_s), bcast(t, x_s))
    return a * x_s + sigma_ts * n
    # --- exercise renoise: end ---


def sample_renoise_timesteps(s, batch, generator=None, offset=10.0, end=1000.0, lo=20.0, hi=980.0):
    """Renoising levels inside the losses (section 2), *unshifted*:
    tau ~ U[1000 s + offset, end], clamped to [lo, hi]; t = tau / 1000.
    s: float or Tensor[B]. Returns tau [B] (float32). Pass the same `generator` on every rank
    (seeded identically) to make the draw agree across ranks without communication."""
    s = torch.as_tensor(s, dtype=torch.float32).expand(batch)
    start = sigma_to_timestep(s) + offset
    u = torch.rand(batch, generator=generator)
    tau = start + u * (end - start).clamp(min=1.0)  # empty interval -> end = start + 1
    return tau.clamp(lo, hi)


def make_subinterval(x_s, s, tau, noise=None):
    """Everything the losses need about one sub-interval: t, fresh n, x_t (no grad needed)."""
    t = timestep_to_sigma(tau).to(x_s.device)
    n = torch.randn_like(x_s, dtype=torch.float32) if noise is None else noise
    x_t = renoise(x_s.detach().float(), s, t, n)
    return t, n, x_t


# --- 3. Generator loss (DMD direction with shared projection noise) --------------------------


def dmd_direction(x_s, x_s_real, x_s_fake, normalize=True):
    """g = (x_s^fake - x_s^real) / mean_{C,H,W}|x_s - x_s^real|, per sample, then nan_to_num
    (section 3). Descending along g moves x_s toward the teacher."""
    # --- exercise dmd_direction: begin ---
    g = (x_s_fake - x_s_real).double()
    if normalize:
        dims = tuple(range(1, x_s.dim()))
        scale = (x_s.detach().double() - x_s_real.double()).abs().mean(dim=dims, keepdim=True)
        g = g / scale
    return torch.nan_to_num(g)
    # --- exercise dmd_direction: end ---


def dmd_surrogate(x_s, g):
    """L = 1/2 mean (x_s - sg(x_s - g))^2 in float64. dL/dx_s = g / (B D) (section 3)."""
    x = x_s.double()
    return 0.5 * ((x - (x - g).detach()) ** 2).mean()


def shared_projection(x_t, v_real, v_fake, t, s, eta):
    """Project the teacher's and the fake's velocity at x_t back from t to s with one CPS step
    each, both with the SAME fresh noise z (section 3): then x_s^fake - x_s^real =
    kappa(s, t) (v_fake - v_real) exactly, no noise left. Returns (x_s_real, x_s_fake)."""
    # --- exercise dmd_direction: begin ---
    z = torch.randn_like(x_t, dtype=torch.float32)  # shared: the noise cancels in g
    x_s_real = cps_step(x_t, v_real, t, s, eta, z)
    x_s_fake = cps_step(x_t, v_fake, t, s, eta, z)
    return x_s_real, x_s_fake
    # --- exercise dmd_direction: end ---


def generator_loss(bb, fake, x_s, s, t, x_t, cond, null_cond, guidance, eta=0.9, normalize=True):
    """AC-DMD generator loss for one sub-interval (section 3).
    x_s: generator output at level s, *with grad* [B, ...]; s: float or [B]; t [B] > s;
    x_t = renoise(x_s, s, t, n) (detached). Teacher (CFG, scale `guidance`) and fake (no CFG)
    velocities at x_t are projected back to s with one CPS step that shares the noise z.
    Returns (loss, stats)."""
    with torch.no_grad():
        v_real = cfg_velocity(bb, bb.teacher, x_t, t, cond, null_cond, guidance)
        v_fake = bb.velocity(fake, x_t, t, cond)
        x_s_real, x_s_fake = shared_projection(x_t, v_real, v_fake, t, s, eta)
        g = dmd_direction(x_s, x_s_real, x_s_fake, normalize)
    loss = dmd_surrogate(x_s, g)
    # tensors, not floats: the training loop reads them on the host once per log step
    stats = {"dmd_dir_norm": g.flatten(1).norm(dim=1).mean(),
             "velocity_gap": (v_fake - v_real).float().pow(2).mean().sqrt()}
    return loss, stats


# --- 4. Fake-score loss: ambient target and its weighting ------------------------------------


def ambient_target(x_s, n, s, t):
    """T = -x_s/(1-s) + [t + (1-t) s^2/(1-s)^2] / sigma_ts * n   (section 4, derived there).
    Its conditional mean given x_t is the exact velocity of the noised law of x_s."""
    # --- exercise ambient_target: begin ---
    s, t = bcast(s, x_s), bcast(t, x_s)
    # sigma_ts as in subinterval_coeffs, written out so this exercise stands on its own
    sigma_ts = torch.sqrt(torch.clamp(t ** 2 - ((1 - t) / (1 - s)) ** 2 * s ** 2, min=1e-12))
    return -x_s / (1 - s) + (t + (1 - t) * s ** 2 / (1 - s) ** 2) / sigma_ts * n
    # --- exercise ambient_target: end ---


def fake_loss_weight(s, t, x, move_scale_out=True, clamp_max=10.0):
    """Per-sample weight of the squared error (section 4). move_scale_out (the official configs'):
    the code compares sigma_ts f with sigma_ts T weighted by clamp(1/sigma_ts^2, 0, 10), i.e. an
    effective weight min(1, 10 sigma_ts^2) on (f - T)^2. False: the unweighted loss."""
    if not move_scale_out:
        return torch.ones_like(bcast(t, x))
    _, sigma_ts = subinterval_coeffs(bcast(s, x), bcast(t, x))
    return sigma_ts ** 2 * torch.clamp(1.0 / sigma_ts ** 2, 0.0, clamp_max)


# --- 5. Consistency regulariser, and the whole fake-score loss (sections 4 + 5) --------------


def consistency_two_sample(h0, h1, h2):
    """Two-sample estimator mean[(h_1 - h_0)(h_2 - h_0)] of ||E[h(x')|x_t] - h_0||^2 for two
    independent transitions x'_1, x'_2 (section 5). Unbiased; can be negative."""
    # --- exercise consistency_two_sample: begin ---
    return torch.nan_to_num(((h1 - h0) * (h2 - h0)).mean())
    # --- exercise consistency_two_sample: end ---


def consistency_loss(bb, fake, x_t, t, v_hat, cond, eta=0.9, max_delta=200, generator=None,
                     two_sample=True, transition=None):
    """Consistency regulariser (section 5): delta ~ U{1..max_delta} (in tau units),
    t' = max(tau - delta, 0)/1000; two CPS moves x_t -> t' with the detached fake velocity and
    independent noise; h_0 = x_t - t v_hat (not detached), h_i = x'_i - t' f(x'_i, t').
    One f call evaluates both moves (batched). `generator` draws delta (shared across ranks).
    transition(x_t, v, t, t') -> x' replaces the CPS move (None: the CPS step with `eta`, as the
    official code does); the tests pass the toy's exact reverse kernel, under which the exact
    velocity has zero defect."""
    B = x_t.shape[0]
    tau = sigma_to_timestep(t)
    delta = torch.randint(1, max_delta + 1, (B,), generator=generator).to(t.device)
    t_prime = timestep_to_sigma(torch.clamp(torch.round(tau) - delta, min=0.0))
    move = transition or (lambda x, v, t_from, t_to: cps_step(x, v, t_from, t_to, eta))
    with torch.no_grad():
        v_sg = v_hat.detach()
        x1, x2 = move(x_t, v_sg, t, t_prime), move(x_t, v_sg, t, t_prime)  # independent noise
    h0 = x0_from_velocity(x_t, v_hat, t)
    xx, tt = torch.cat([x1, x2]), torch.cat([t_prime, t_prime])
    cc = {k: torch.cat([c, c]) for k, c in cond.items()}
    h1, h2 = x0_from_velocity(xx, bb.velocity(fake, xx, tt, cc), tt).chunk(2)
    if two_sample:
        return consistency_two_sample(h0, h1, h2)
    return torch.nan_to_num(((h1 - h0) ** 2).mean())  # one-sample MSE: biased by Var[h(x')]


def fake_score_loss(bb, fake, x_s, s, t, n, x_t, cond, move_scale_out=True,
                    consistency_weight=1e-2, eta=0.9, generator=None, transition=None):
    """L_fake = mean(w (f(x_t, t) - T)^2) + lambda_c L_cons (sections 4, 5).
    x_s, n, x_t: the sub-interval (no grad); transition: see consistency_loss.
    Returns (loss, stats)."""
    v_hat = bb.velocity(fake, x_t, t, cond).float()
    target = ambient_target(x_s.float(), n, s, t)
    w = fake_loss_weight(s, t, x_t, move_scale_out)
    loss_ac = (w * (v_hat - target) ** 2).mean()
    loss = loss_ac
    stats = {"fake_ac": loss_ac.detach()}  # a tensor: read on the host once per log step
    if consistency_weight > 0:
        loss_cons = consistency_loss(bb, fake, x_t, t, v_hat, cond, eta, generator=generator,
                                     transition=transition)
        loss = loss + consistency_weight * loss_cons
        stats["fake_cons"] = loss_cons.detach()
    return loss, stats
