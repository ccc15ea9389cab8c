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


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a run against the exact target.")
    p.add_argument("--run", required=True)
    p.add_argument("--stage", type=int, default=None)
    p.add_argument("--n", type=int, default=4000, help="toy: samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.time()
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
