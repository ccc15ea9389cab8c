"""Derivation questions of WORKSHEET.md and their answers, (question, answer) per exercise.

tests/assignments.py writes the questions to every copy and the answers only to WORKSHEET_KEY.md
of `make --solution`; `make --derive` withholds each exercise's equation and points to its first
question instead. This file is the key: it stays out of the student copy (assignments.HIDDEN).
"""
WORKSHEET = {
    "cps_step": [
        ("Let x = (1 - sigma) x0 + sigma eps and v = eps - x0 exactly. Show that x' = mu + rho z has "
         "the law N((1 - sigma') x0, sigma'^2 I) for every eta.",
         "Then x0_hat = x0 and eps_hat = eps, so x' = (1 - sigma') x0 + sigma' (cos(theta) eps + "
         "sin(theta) z). eps and z are independent N(0, I), so cos(theta) eps + sin(theta) z is "
         "N(0, (cos^2 + sin^2) I) = N(0, I): the noise keeps std sigma'."),
        ("Show that eta = 0 gives the Euler step x + (sigma' - sigma) v.",
         "theta = 0, rho = 0 and mu = (1 - sigma')(x - sigma v) + sigma'(x + (1 - sigma) v) = x + "
         "(sigma' - sigma) v."),
    ],
    "renoise": [
        ("Derive a_ts and sigma_ts from: if x_s = (1 - s) x0 + s eps0, then a_ts x_s + sigma_ts n "
         "is (1 - t) x0 plus Gaussian noise of std t.",
         "Match the x0 coefficient: a_ts (1 - s) = 1 - t. Match the noise variance (eps0, n "
         "independent): a_ts^2 s^2 + sigma_ts^2 = t^2, so sigma_ts = sqrt(t^2 - a_ts^2 s^2)."),
        ("Why must t >= s, and why the floor 1e-12?",
         "t^2 - a_ts^2 s^2 >= 0 iff t / (1 - t) >= s / (1 - s) iff t >= s. At t = s it is 0, and "
         "the square root's gradient there is infinite; the floor keeps it finite."),
    ],
    "ambient_target": [
        ("Derive T (where omega, the coefficient of n, comes from). Use v_t(x) = (E[eps | x_t = x] - x) "
         "/ (1 - t) for the flow path x_t = (1 - t) x0 + t eps, and Tweedie's formula for the "
         "Gaussian channel x_t = a_ts x_s + sigma_ts n, which holds for any law of x_s: grad log "
         "p_t = -E[n | x_t] / sigma_ts = -E[eps | x_t] / t.",
         "E[eps | x_t] = (t / sigma_ts) E[n | x_t], so v_t(x_t) = E[t n / sigma_ts - x_t | x_t] / "
         "(1 - t). Put x_t = a_ts x_s + sigma_ts n inside: T = -a_ts x_s / (1 - t) + (t - "
         "sigma_ts^2) / ((1 - t) sigma_ts) n. a_ts / (1 - t) = 1 / (1 - s), and t - sigma_ts^2 = "
         "t (1 - t) + (1 - t)^2 s^2 / (1 - s)^2, so omega = [t + (1 - t) s^2 / (1 - s)^2] / sigma_ts."),
        ("Check that s = 0 gives ordinary flow matching.",
         "a_ts = 1 - t, sigma_ts = t and omega = t / t = 1: T = n - x0."),
    ],
    "dmd_direction": [
        ("Show that the two noises cancel in x_s^fake - x_s^real, and write the factor kappa in "
         "x_s^fake - x_s^real = kappa (v_fake - v_real).",
         "Both are mu(v) + rho z with the same z and rho (rho does not depend on v), so the "
         "difference is mu(v_fake) - mu(v_real). mu is affine in v: mu = (1 - s)(x_t - t v) + s "
         "cos(theta)(x_t + (1 - t) v), so kappa = s (1 - t) cos(theta) - t (1 - s). With two "
         "independent noises the difference would carry noise of variance 2 rho^2 per element."),
        ("Why divide by mean |x_s - x_s^real| per sample rather than over the batch?",
         "It is DMD's weighting: each sample's step is measured in units of its own distance to "
         "the teacher's projection, so one far-off sample cannot set the scale of the others."),
    ],
    "consistency_two_sample": [
        ("Show that E[mean (h_1 - h_0)(h_2 - h_0)] = ||E[h(x') | x_t] - h_0||^2 (mean over "
         "elements) when x'_1 and x'_2 are independent given x_t.",
         "Given x_t the two factors are independent, so the expectation of each element's product "
         "is the product of expectations, (m - h_0)^2 with m = E[h(x') | x_t]; then average."),
        ("Why not the one-sample estimate mean (h_1 - h_0)^2?",
         "Its expectation is ||m - h_0||^2 plus the conditional variance of h(x'): it is biased "
         "upward and is not 0 even for an exact martingale."),
    ],
    "energy_distance": [
        ("Compute ED for one point a against one point b (d = 1).",
         "E|X - Y| = |a - b| and the two self terms are 0: ED = 2 |a - b|."),
        ("Two sets of n points from one law: why is the V-statistic positive on average, and by "
         "how much?",
         "V_XX = (n - 1)/n U_XX (the n zero diagonal pairs), so ED_V = ED_U + U_XX / n + U_YY / n. "
         "ED_U is unbiased and has mean 0 for equal laws: the bias is (E|X - X'| + E|Y - Y'|) / n."),
    ],
    "cps_log_prob": [
        ("Show that for a stored transition the official and exact log-ratios satisfy l_new - "
         "l_old = (2 rho^2 / D)(log pi_new - log pi_old).",
         "rho does not depend on the network, so D log rho and (D/2) log(2 pi) cancel in the exact "
         "difference, leaving -(|x' - mu_new|^2 - |x' - mu_old|^2) / (2 rho^2); the official "
         "difference is the same bracket over D."),
        ("Why is the policy gradient of the final, deterministic step zero?",
         "There rho = 0: the step is a delta with no density, its log-prob is a constant (0 here), "
         "the PPO ratio is 1 and its gradient is 0. The final step learns from the reward through "
         "the path-wise term (final_step_x0, bp_loss)."),
    ],
    "group_advantages": [
        ("With normalize=False and G samples per prompt, show that E[A_i grad log pi_i] = (1 - 1/G) "
         "grad E[r] for one sample i.",
         "r_i - mean_group r = (1 - 1/G)(r_i - b_i) with b_i the mean of the other G - 1 samples, "
         "independent of sample i. E[b_i grad log pi_i] = E[b_i] E[grad log pi_i] = 0, and E[r_i "
         "grad log pi_i] = grad E[r]."),
        ("Why a global std and not a per-prompt one?",
         "A prompt whose samples nearly agree has a per-prompt std near 0, which would blow its "
         "tiny reward differences up to unit advantages; the global std keeps one scale for the "
         "epoch (subgrpo.py, section 5)."),
    ],
    "select_steps": [
        ("Why do the steps depend on (epoch, seed) only, and the noise on (prompt, step, epoch) "
         "only?",
         "Every rank must train the same steps and give a prompt's copies the same noise without "
         "communicating; the global RNG differs between ranks and batch positions differ."),
        ("Show that sharing z_k on an untrained step k leaves the policy gradient unbiased.",
         "Each sample's path keeps its law (the shared z_k is still N(0, I)). For a trained step "
         "j, grad log pi_j(i) has mean 0 given everything except sample i's own fresh z_j, so E[b "
         "grad log pi_j(i)] = 0 for any baseline b built without z_j of sample i (subgrpo.py, "
         "section 3)."),
    ],
    "ppo_loss": [
        ("Show that at the sampling parameters (r = 1) grad L = -mean_b A grad l_new.",
         "|r - 1| = 0 <= eps, so clip(r) = r and L = mean_b (-A r); grad r = r grad l_new = grad "
         "l_new."),
        ("Which entries get no gradient?",
         "Those where the clipped branch is the max: A > 0 and r > 1 + eps, or A < 0 and r < 1 - "
         "eps."),
    ],
    "final_step_x0": [
        ("Why is x_3 a constant in x0_hat = x_3 - sigma_3 G(x_3, sigma_3, c)?",
         "The score-function part already credits steps 0-2 for moving x_3 (subgrpo.py, section "
         "2); a gradient through x_3 would count them twice, and costs back-prop through 3 more "
         "network calls."),
        ("What is grad L_BP while R_w < margin, and what when R_w > margin?",
         "-mean_b grad R_w (plain reward maximisation), and 0."),
    ],
    "tilt_linear": [
        ("Complete the square: N(x; mu, s^2 I) exp(beta a^T x) = f N(x; mu + beta s^2 a, s^2 I). "
         "What is log f?",
         "-|x - mu|^2 / (2 s^2) + beta a^T x = -|x - mu - beta s^2 a|^2 / (2 s^2) + beta a^T mu + "
         "beta^2 s^2 |a|^2 / 2, so log f = beta a^T mu + beta^2 s^2 |a|^2 / 2."),
        ("Why do the stds stay the same while the weights change?",
         "A linear tilt leaves the quadratic term -|x|^2 / (2 s_j^2) of each exponent alone: it only "
         "shifts the mean. Each component's mass is multiplied by its own f_j, so the weights "
         "change and are renormalised per row."),
    ],
}

