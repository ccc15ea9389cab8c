"""
eval.py -- measure a run against the exact target.

    python eval.py --run runs/toy                 # table on stdout, runs/toy/eval.json, eval.png

Toy (ALGORITHM.md 9.3): for each prompt, the 4-step EMA generator's samples are compared with
exact samples of the teacher p(x|c):
  - energy distance (ED), next to the noise floor: the ED between two independent exact sample
    sets of the same size (a perfect generator sits at the floor);
  - mode occupancy: each sample goes to its nearest component mean; the largest absolute gap to
    the exact weights pi_cj;
  - the same ED at every intermediate sampler state x_{sigma_k} against the exact marginal
    p_{sigma_k}(x|c): the defining property of AC-DMD (plain DMD matches only the last one).
Reference rows: the teacher's own 4-step Euler and its 50-step ODE from the same noise.
"""
import argparse
import json
import os
import time

import torch

import models
import sample

# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def energy_distance(x, y):
    """ED = 2 E|X-Y| - E|X-X'| - E|Y-Y'| with V-statistics (pairs with themselves included).
    The V-statistic is positive with a small O(1/n) bias, so two exact sets give a stable
    positive noise floor to compare against."""
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def occupancy(x, means):
    """Fraction of samples whose nearest component mean is j, for every j."""
    j = torch.cdist(x.double(), means.double()).argmin(1)
    return torch.bincount(j, minlength=len(means)).double() / len(x)


def toy_metrics(states, mixture, sigmas, c, weights_row, gen):
    """ED of every state vs the exact marginal at its sigma, occupancy error of the last one."""
    n = len(c)
    out = {"ed_steps": []}
    for k in range(1, len(states)):
        exact = mixture.sample(c, float(sigmas[k]), generator=gen)
        out["ed_steps"].append(energy_distance(states[k], exact))
    out["ed"] = out["ed_steps"][-1]
    occ = occupancy(states[-1], mixture.means)
    out["occupancy"] = occ.tolist()
    out["occ_err"] = (occ - weights_row).abs().max().item()
    return out


def noise_floor(mixture, c, gen, repeats=4):
    """Mean ED between two independent exact sample sets of size len(c)."""
    eds = [energy_distance(mixture.sample(c, generator=gen), mixture.sample(c, generator=gen))
           for _ in range(repeats)]
    return sum(eds) / len(eds)


# ---------------------------------------------------------------------------------------------
# Toy evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def eval_toy(bb, net, n=4000, seed=0):
    """Rows: generator (4-step CPS), teacher 4-step Euler, teacher 50-step ODE; per prompt."""
    gen = torch.Generator().manual_seed(seed)
    mix = bb.mixture
    results = {}
    for ci, prompt in enumerate(bb.prompts):
        c = torch.full((n,), ci, dtype=torch.long)
        cond = bb.encode([prompt] * n)
        x = torch.randn(n, *bb.latent_shape, generator=gen)
        w = mix.weights[ci]
        torch.manual_seed(seed + ci)
        rows = {"generator": toy_metrics(sample.rollout(bb, net, x, cond), mix, bb.sigmas, c, w, gen)}
        euler4 = [x]
        for k in range(len(bb.sigmas) - 1):  # keep intermediate states of the 4-step Euler
            euler4.append(sample.euler_sample(bb, bb.teacher, euler4[-1], bb.sigmas[k:k + 2], cond))
        rows["teacher_euler4"] = toy_metrics(euler4, mix, bb.sigmas, c, w, gen)
        fine = models.sd3_sigmas(step_list=torch.linspace(1000, 20, 50).tolist())
        x50 = sample.euler_sample(bb, bb.teacher, x, fine, cond)
        rows["teacher_ode50"] = toy_metrics([x, x50], mix, fine[[0, -1]], c, w, gen)
        rows["noise_floor"] = noise_floor(mix, c, gen)
        results[prompt] = rows
    return results


def print_toy_table(results, sigmas):
    head = f"{'prompt':8s} {'row':16s} {'ED':>8s} {'ED/floor':>9s} {'occ err':>8s}   ED at sigma " + \
        " ".join(f"{float(s):.2f}" for s in sigmas[1:])
    print(head)
    print("-" * len(head))
    for prompt, rows in results.items():
        floor = rows["noise_floor"]
        for name in ("generator", "teacher_euler4", "teacher_ode50"):
            r = rows[name]
            steps = " ".join(f"{e:.4f}" for e in r["ed_steps"]) if len(r["ed_steps"]) > 1 else ""
            print(f"{prompt:8s} {name:16s} {r['ed']:8.4f} {r['ed'] / floor:9.2f} {r['occ_err']:8.3f}   {steps}")
        print(f"{prompt:8s} {'noise floor':16s} {floor:8.4f}")


# ---------------------------------------------------------------------------------------------
# Stage 2: against the exact reward-tilted target (ALGORITHM.md 9.5, 9.6)
# ---------------------------------------------------------------------------------------------
#
# The stage-2 loss has no beta of its own (ALGORITHM.md 2.2): the normalised DM direction and the
# standardised advantages set an implicit tilt. So a run is compared with p~_beta at the beta that
# fits it best (the energy distance summed over prompts, minimised over a grid of beta), and
# three things are reported there:
#   - ED / noise floor against exact samples of p~_beta(x|c)     (is it the tilted target?)
#   - occupancy error against the tilted weights pi~_cj          (are the modes re-weighted right?)
#   - mean reward next to the exact E_{p~_beta}[r]               (overshoot = reward hacking: the
#     run bought reward by leaving the tilted target, e.g. collapsing onto the reward's optimum)


@torch.no_grad()
def toy_samples(bb, net, n, seed, euler=False):
    """{prompt: final samples [n, 2]} of the 4-step generator (CPS), or of the teacher's 4-step
    Euler ODE when euler=True, from the same initial noise for every row."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for ci, prompt in enumerate(bb.prompts):
        cond = bb.encode([prompt] * n)
        x = torch.randn(n, *bb.latent_shape, generator=gen)
        torch.manual_seed(seed + ci)
        if euler:
            out[prompt] = sample.euler_sample(bb, bb.teacher, x, bb.sigmas, cond)
        else:
            out[prompt] = sample.rollout(bb, net, x, cond)[-1]
    return out


@torch.no_grad()
def tilted_metrics(samples, mixture, reward, beta, seed=1):
    """Per prompt and averaged: ED/floor vs p~_beta, occupancy error vs pi~_beta (components
    assigned by their *tilted* means), mean reward vs the exact tilted mean reward."""
    gen = torch.Generator().manual_seed(seed)
    tilt = reward.tilt(mixture, beta)
    exact_r = reward.exact_mean(tilt)
    rows = {}
    for ci, (prompt, x) in enumerate(samples.items()):
        c = torch.full((len(x),), ci, dtype=torch.long)
        ed = energy_distance(x, tilt.sample(c, generator=gen))
        floor = noise_floor(tilt, c, gen, repeats=2)
        occ = occupancy(x, tilt.means)
        r = reward(x.double())[reward.name].mean().item()
        rows[prompt] = {"ed": ed, "ed_floor": ed / floor, "occ_err": (occ - tilt.weights[ci]).abs().max().item(),
                        "reward": r, "reward_exact": exact_r[ci].item()}
    rows["mean"] = {k: sum(v[k] for v in rows.values()) / len(samples) for k in rows[next(iter(samples))]}
    return rows


@torch.no_grad()
def fit_beta(samples, mixture, reward, grid=None, n=1000, seed=1):
    """The effective tilt of a run: argmin over a log grid of the prompt-summed ED between (the
    first n of) its samples and exact samples of p~_beta."""
    grid = grid if grid is not None else [0.0] + torch.logspace(-2, 1, 25).tolist()
    eds = []
    for b in grid:
        gen, tilt = torch.Generator().manual_seed(seed), reward.tilt(mixture, b)
        eds.append(sum(energy_distance(x[:n], tilt.sample(torch.full((n,), ci, dtype=torch.long), generator=gen))
                       for ci, x in enumerate(samples.values())))
    return grid[min(range(len(grid)), key=eds.__getitem__)]


def run_reward(cfg):
    """The toy reward a run used (train.make_reward's toy branch)."""
    import rewards
    return rewards.QuadraticReward(1.0, (2.0, 0.0)) if cfg.get("reward", "quadratic") == "quadratic" \
        else rewards.LinearReward((1.0, 0.0))


def eval_stage2(run, n=2000, seed=0, beta=None):
    """Stage-2 (or tilted-teacher) run vs p~ at `beta` (default: the run's fitted beta)."""
    bb, net, stage = models.load_run(run)
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    reward = run_reward(cfg)
    xs = toy_samples(bb, net, n, seed)
    fitted = fit_beta(xs, bb.mixture, reward)
    beta = fitted if beta is None else beta
    return {"stage": stage, "beta_fit": fitted, "beta": beta, **tilted_metrics(xs, bb.mixture, reward, beta)}


# ---------------------------------------------------------------------------------------------
# The exact-decomposition mode's stationary point, in closed form (ALGORITHM.md 9.6, mode 2)
# ---------------------------------------------------------------------------------------------
#
# Set-up ("toy-gauss", train.py --exact-decomposition): teacher p = N(mu, s^2 I) in D = 2 dims,
# linear reward r = a^T x, generator G = v_T + b (models.ShiftVelocity: it can only move its
# output mean), un-normalised DM direction, exact Gaussian log-prob, advantages A = r - (group
# mean), no clipping. Weights w_pg, w_dm, w_bp; N = samples per prompt per epoch (one prompt:
# the whole epoch); f = probability that a stochastic step is trained in an epoch (2/3 for
# SubGRPO's 2 of 3, 1 with --all-steps).
#
# 1. How b moves the output mean. The exact velocity of a Gaussian is affine in x:
#        v_T(x, sigma) = (x - E[x0|x]) / sigma,   slope lambda = (1 - (1-sigma) s^2 / V) / sigma,
#    V = (1-sigma)^2 s^2 + sigma^2. The CPS mean  (1-s')(x - sigma v) + s' cos(theta)(x + (1-sigma) v)
#    (sample.cps_mean_std; s' = next sigma) moves by  c_k b  for a velocity shift b and by
#    A_k delta for an input shift delta:
#        c_k = -(1-s') sigma + s' cos(theta) (1-sigma),
#        A_k = (1-s')(1 - sigma lambda) + s' cos(theta) (1 + (1-sigma) lambda).
#    So the output mean is  m = mu + sum_k kappa_k b,  kappa_k = c_k prod_{j>k} A_j  (the exact
#    velocity keeps the mean exact, so b = 0 gives m = mu). The last step has kappa_3 = -sigma_3.
# 2. The expected gradient in b of each term (the accumulation divisor is common and drops out):
#    - BP, w_bp mean relu(M - a^T x0_hat), hinge active:        -w_bp kappa_3 a
#    - DM, surrogate 1/2 mean_{b,d}(x0_hat - sg(x0_hat - g))^2:   w_dm kappa_3 E[g] / D.  With the
#      fake equal to the velocity of the generator's output law N(m, s_g^2), the tower rule gives
#      E[x0_hat_fake] = m while E[x0_hat_real] = mu + (1-t)^2 s^2 / V(t) (m - mu), so
#          E[g] = C (m - mu),   C = E_t[ t^2 / ((1-t)^2 s^2 + t^2) ]
#      over the stage-2 law of t (tau = 10 + 990 u clamped to [20, 980], with its point masses);
#      s_g does not enter.
#    - PG, -w_pg mean_i A_i sum_{k in S} grad_b log pi_k(i): the score identity gives
#      E[r grad log pi_k] = d E[r] / d b_k = kappa_k a (b_k: the copy of b used at step k), and a
#      group mean that includes sample i itself scales it by (1 - 1/N):
#          -w_pg (1 - 1/N) f sum_{k<3} kappa_k a    (averaged over the epochs' step subsets).
# 3. Setting the sum to zero:
#        m* = mu + (D / (w_dm C)) [ w_bp + w_pg (1 - 1/N) f sum_{k<3} kappa_k / kappa_3 ] a,
#    i.e. the tilt mu + beta_eff s^2 a of section 9.5 with beta_eff = |m* - mu| / s^2 (|a| = 1).
#    With PG off this is ALGORITHM.md 9.6's  m* = mu + D w_bp a / (w_dm C).  The kappa_k of the
#    earlier steps have the sign of kappa_3, so the policy gradient strengthens the tilt: it moves
#    x_3, and the final step, which alone feels the DM pull, has to hold the balance.


def stationary_mean_gauss(bb, w_pg, w_dm, w_bp, N, f=2 / 3, a=(1.0, 0.0), eta=0.9):
    """m* of the exact-decomposition mode on toy-gauss (derivation above). Returns (m*, parts)
    with parts = {C, kappa, beta_eff}."""
    import math
    mu, s2 = bb.mixture.means[0], float(bb.mixture.stds[0]) ** 2
    D, cos = mu.numel(), math.cos(eta * math.pi / 2)
    sig = [float(x) for x in bb.sigmas]
    c, A = [], []
    for sg, sn in zip(sig[:-1], sig[1:]):
        V = (1 - sg) ** 2 * s2 + sg ** 2
        lam = (1 - (1 - sg) * s2 / V) / sg
        c.append(-(1 - sn) * sg + sn * cos * (1 - sg))
        A.append((1 - sn) * (1 - sg * lam) + sn * cos * (1 + (1 - sg) * lam))
    kappa = [c[k] * math.prod(A[k + 1:]) for k in range(len(c))]
    u = (torch.arange(1_000_000, dtype=torch.float64) + 0.5) / 1_000_000
    t = ((10 + 990 * u).clamp(20, 980)) / 1000  # acdmd.sample_renoise_timesteps(0.0)
    C = (t ** 2 / ((1 - t) ** 2 * s2 + t ** 2)).mean().item()
    push = w_bp + w_pg * (1 - 1 / N) * f * sum(kappa[:-1]) / kappa[-1]
    shift = D / (w_dm * C) * push
    m = mu + shift * torch.tensor(a, dtype=torch.float64)
    return m, {"C": C, "kappa": kappa, "beta_eff": shift / s2}


# ---------------------------------------------------------------------------------------------
# The ablation table (toy): train every row, evaluate all of them against the same tilted target
# ---------------------------------------------------------------------------------------------

ABLATION_ROWS = [  # (row name, extra stage-2 flags)
    ("RTDMD", []),
    ("without DM", ["--no-dm"]),
    ("without back-prop", ["--no-bp"]),
    ("without policy gradient", ["--no-pg"]),
    ("without SubGRPO", ["--all-steps", "--no-shared-noise"]),
]


def ablation(root, seed=0, n=2000):
    """Train stage 1 once, every stage-2 row from it (train.main with argv lists), and the
    reference-mode row (stage 1 against the exact tilted teacher at the RTDMD row's fitted beta*,
    ALGORITHM.md 9.6 mode 1). Evaluate every row against p~_{beta*}; write ablation.md/json."""
    import shutil
    import train
    torch.set_num_threads(1)  # 2-D points: threads only add overhead
    t0 = time.time()
    s1 = os.path.join(root, "stage1")
    if not os.path.exists(os.path.join(s1, "stage1.pt")):
        train.main(["--stage", "1", "--out", s1, "--seed", str(seed)])
    runs = {"stage 1 (AC-DMD)": s1}
    for name, flags in ABLATION_ROWS:
        d = os.path.join(root, name.replace(" ", "_"))
        if not os.path.exists(os.path.join(d, "stage2.pt")):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            for f in ("stage1.pt", "config.json", "toy_base_w128.pt"):
                shutil.copy(os.path.join(s1, f), d)
            train.main(["--stage", "2", "--out", d, "--seed", str(seed)] + flags)
        runs[name] = d
    bb, _, _ = models.load_run(s1)
    reward = run_reward({})
    samples = {name: toy_samples(bb, models.load_run(d)[1], n, seed) for name, d in runs.items()}
    samples["teacher 4-step Euler"] = toy_samples(bb, None, n, seed, euler=True)
    beta = fit_beta(samples["RTDMD"], bb.mixture, reward)
    ref = os.path.join(root, "reference")
    if not os.path.exists(os.path.join(ref, "stage1.pt")):
        shutil.rmtree(ref, ignore_errors=True)
        os.makedirs(ref)
        shutil.copy(os.path.join(s1, "toy_base_w128.pt"), ref)
        train.main(["--stage", "1", "--out", ref, "--seed", str(seed), "--tilt-teacher", str(beta)])
    samples[f"reference: stage 1 on p~ (beta {beta:.3g})"] = toy_samples(bb, models.load_run(ref)[1], n, seed)
    order = ["teacher 4-step Euler", "stage 1 (AC-DMD)"] + [r for r, _ in ABLATION_ROWS] + list(samples)[-1:]
    rows = {}
    for name in order:
        m = tilted_metrics(samples[name], bb.mixture, reward, beta)["mean"]
        rows[name] = m | {"beta_fit": fit_beta(samples[name], bb.mixture, reward)}
    exact = rows["RTDMD"]["reward_exact"]
    lines = [f"Toy ablation (quadratic reward r = -|x - (2,0)|^2 / 2), every row against the exact tilted "
             f"target p~ at beta* = {beta:.3g} (fitted to the RTDMD row); means over the 3 prompts, "
             f"{n} samples each.", "",
             "| row | fitted beta | ED / noise floor vs p~ | occupancy error vs p~ | mean reward | "
             "exact E_p~[r] | overshoot |", "|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['beta_fit']:.3g} | {m['ed_floor']:.1f} | {m['occ_err']:.3f} | "
                     f"{m['reward']:.3f} | {exact:.3f} | {m['reward'] - exact:+.3f} |")
    lines += ["", f"(overshoot > 0: more reward than the tilted target has = reward hacking; "
              f"{time.time() - t0:.0f}s in total)"]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(root, "ablation.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(root, "ablation.json"), "w") as f:
        json.dump({"beta": beta, "rows": rows}, f, indent=1)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a run against the exact target.")
    p.add_argument("--run", default=None)
    p.add_argument("--stage", type=int, default=None)
    p.add_argument("--n", type=int, default=4000, help="toy: samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tilted", action="store_true",
                   help="stage 2: compare with the exact tilted target at the fitted beta")
    p.add_argument("--beta", type=float, default=None, help="with --tilted: this beta instead of the fit")
    p.add_argument("--ablation", default=None, metavar="DIR",
                   help="train and evaluate the ablation rows in DIR (toy, a few minutes)")
    args = p.parse_args(argv)
    if args.ablation:
        return ablation(args.ablation, seed=args.seed)
    if args.run is None:
        p.error("--run or --ablation is required")
    t0 = time.time()
    if args.tilted:
        res = eval_stage2(args.run, min(args.n, 2000), args.seed, args.beta)
        print(f"run {args.run}, stage-{res['stage']} EMA generator vs p~_beta, beta {res['beta']:.3g} "
              f"(fitted {res['beta_fit']:.3g})")
        for k, r in res.items():
            if isinstance(r, dict):
                print(f"  {k:8s} ED/floor {r['ed_floor']:7.2f}  occ err {r['occ_err']:.3f}  "
                      f"reward {r['reward']:.3f} (exact tilted {r['reward_exact']:.3f})")
        with open(os.path.join(args.run, "eval_tilted.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(f"({time.time() - t0:.1f}s)")
        return res
    bb, net, stage = models.load_run(args.run, args.stage)
    results = eval_toy(bb, net, n=args.n, seed=args.seed)
    print(f"run {args.run}, stage-{stage} EMA generator, {args.n} samples per prompt")
    print_toy_table(results, bb.sigmas)
    out = {"run": args.run, "stage": stage, "n": args.n, "seed": args.seed, "toy": results}
    with open(os.path.join(args.run, f"eval_stage{stage}.json"), "w") as f:
        json.dump(out, f, indent=1)
    png = sample.toy_scatter_png(bb, net, os.path.join(args.run, f"eval_stage{stage}.png"))
    print(f"wrote {os.path.join(args.run, f'eval_stage{stage}.json')} and {png} ({time.time() - t0:.1f}s)")
    return out


if __name__ == "__main__":
    main()
