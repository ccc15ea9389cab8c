"""
eval.py -- measure a run.

    python eval.py --run runs/toy                 # table on stdout, runs/toy/eval_stage*.json
    python eval.py --run runs/sd3 --prompts dataset/drawbench/test.txt --teacher \
        --reward-paths clip_l=ckpt/...,...        # reward checkpoints: README "Rewards"
    python eval.py --model tiny-sd3 --rewards clipscore --max-prompts 4    # base model, smoke run

1. Toy, stage 1 (`eval_toy`): per prompt, the 4-step EMA generator against exact samples of the
teacher p(x|c) (models.py, section 2), and ED/floor of every intermediate state x_{sigma_k} against
the exact marginal p_{sigma_k}(x|c), AC-DMD's defining property (plain DMD matches only the last).
2. Toy, stage 2 (`eval_stage2`, `--tilted`): against the exact reward-tilted mixture at the beta
that fits the run best (the section's comment below).
3. Toy ablation (`ablation`, `--ablation DIR`): every stage-2 ablation row, and a stage-1 run on
the exact tilted teacher, against the same tilted target.
4. Images (`eval_images`): the official inference protocol (official code: rtdmd/inference.py,
configs/inference/*.yaml): one image per prompt with the 4-NFE sampler (optionally the teacher's
multi-step CFG sampler), every reward on the 8-bit image; a table like the paper's, eval.json
(every knob, per-image scores) and eval.png.
"""
import argparse
import json
import hashlib
import math
import os
import random
import sys
import time

import torch

import models
import rewards
import sample

# --- Metrics (sections 1-3) ------------------------------------------------------------------


def energy_distance(x, y):
    """ED = 2 E|X-Y| - E|X-X'| - E|Y-Y'| with V-statistics (self pairs included): positive, with an
    O(1/n) bias, so two exact sets give a stable positive noise floor."""
    # --- exercise energy_distance: begin ---
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()
    # --- exercise energy_distance: end ---


def occupancy(x, means):
    """Fraction of samples whose nearest component mean is j, for every j."""
    j = torch.cdist(x.double(), means.double()).argmin(1)
    return torch.bincount(j, minlength=len(means)).double() / len(x)


# One definition of "how close to the exact law" for every toy number (tables, pictures, tests):
#   ED        the mean, over REF_SETS independent pairs, of the energy distance between n samples
#             and n exact samples (V-statistic, above): a row draws REF_SETS * n samples;
#   floor     what ED is in expectation for an exact sampler. For independent sets of sizes n and
#             m from one law the V-statistic has E[ED] = E|X-X'| (1/n + 1/m) (each self term
#             includes its n zero diagonal pairs), so the floor is 2 E|X-X'| / n, with E|X-X'|
#             from 200k exact pairs: it does not depend on one lucky reference draw;
#   ED/floor  1 in expectation for a perfect sampler. One pair alone scatters as a weighted sum
#             of chi-square(1) variables (0.2-3.5 measured at n 2000); the mean of 8 reads
#             0.5-2 (tests/test_eval_toy.py). Only the ratio compares across n;
#   occ err   max_j |fraction of samples nearest to mean j - pi_cj|;
#   outliers  fraction of samples farther than 3 standard deviations from every mode; for an
#             isolated 2-D Gaussian P(|z| > 3) = exp(-9/2) = 1.1%; neighbouring modes catch a few
#             of those, so an exact set of the toy reads 0.4-0.8%;
#   gap       fraction of samples more than 3 pi/32 in angle from every mode of the prompt: the
#             outlier test cannot see mass smeared along the circle (the point halfway between two
#             modes is 0.77 from both, within 3 stds), the gap can: exact 0.05, uniform 0.25.
# occ err, outliers and gap use all REF_SETS * n samples.
DEFAULT_N = 4000
REF_SETS = 8
GAP_ANGLE = 3 * math.pi / 32


def noise_floor(mixture, ci, n, gen, sigma=0.0, pairs=200_000):
    """2 E|X-X'| / n for exact X, X' ~ p_sigma(x|c = ci): the expected ED of two exact sets of n."""
    c = torch.full((pairs,), ci, dtype=torch.long)
    d = (mixture.sample(c, sigma, generator=gen) - mixture.sample(c, sigma, generator=gen)).norm(dim=1)
    return 2 * d.mean().item() / n


def outlier_fraction(x, mixture, sigma=0.0, k=3.0):
    """Fraction of x beyond k stds of every mode of p_sigma: (1 - sigma) mu_j, std sqrt(V_j(sigma))."""
    s = float(sigma)
    centres = (1 - s) * mixture.means
    std = ((1 - s) ** 2 * mixture.stds ** 2 + s ** 2).sqrt()
    z = torch.cdist(x.double(), centres) / std[None]
    return (z.min(1).values > k).double().mean().item()


def angular_gap(x, mixture, weights_row, width=GAP_ANGLE):
    """Fraction of x whose angle is more than `width` from the angle of every mode with pi_cj > 0."""
    modes = mixture.means[weights_row > 0]
    mode_ang = torch.atan2(modes[:, 1], modes[:, 0])
    ang = torch.atan2(x[:, 1].double(), x[:, 0].double())
    d = (ang[:, None] - mode_ang[None]).remainder(2 * math.pi)
    return (torch.minimum(d, 2 * math.pi - d).min(1).values > width).double().mean().item()


class ExactReference:
    """The exact side of every comparison for one prompt, drawn once per sigma and shared by all rows
    (common random numbers): REF_SETS exact sets of p_sigma(x|c) of size n, self terms, floor."""

    def __init__(self, mixture, ci, n, seed):
        self.mixture, self.ci, self.n, self.seed = mixture, ci, n, seed
        self.sets, self.floors = {}, {}

    def at(self, sigma):
        s = round(float(sigma), 6)
        if s not in self.sets:
            gen = torch.Generator().manual_seed(self.seed + int(s * 1e6))
            c = torch.full((self.n,), self.ci, dtype=torch.long)
            sets = [self.mixture.sample(c, s, generator=gen).double() for _ in range(REF_SETS)]
            self.sets[s] = [(y, torch.cdist(y, y).mean().item()) for y in sets]
            self.floors[s] = noise_floor(self.mixture, self.ci, self.n, gen, sigma=s)
        return self.sets[s], self.floors[s]

    def ed(self, x, sigma):
        """The metric's ED of x (REF_SETS * n samples) against p_sigma, and the floor."""
        sets, floor = self.at(sigma)
        x = x.double()
        eds = [2 * torch.cdist(xr, y).mean().item() - torch.cdist(xr, xr).mean().item() - yy
               for xr, (y, yy) in zip(x.split(self.n), sets)]
        return sum(eds) / len(eds), floor


def toy_metrics(states, sigmas, ref, weights_row):
    """ED and ED/floor of every state vs the exact marginal at its sigma (ref: ExactReference;
    every state holds REF_SETS * ref.n samples); occupancy error, outliers and gap of the last one."""
    eds = [ref.ed(states[k], sigmas[k]) for k in range(1, len(states))]
    out = {"ed_steps": [e for e, _ in eds], "floor_steps": [f for _, f in eds], "ratio_steps": [e / f for e, f in eds]}
    out["ed"], out["floor"], out["ratio"] = out["ed_steps"][-1], out["floor_steps"][-1], out["ratio_steps"][-1]
    return out | mode_metrics(states[-1], ref.mixture, weights_row)


def mode_metrics(x, mixture, weights_row):
    """Occupancy (nearest component mean), its error against weights_row, outliers and angular gap of x."""
    occ = occupancy(x, mixture.means)
    return {"occupancy": occ.tolist(), "occ_err": (occ - weights_row).abs().max().item(),
            "outliers": outlier_fraction(x, mixture), "gap": angular_gap(x, mixture, weights_row)}


def print_table(head, rows, widths):
    """The one table printer: header, rule, rows of strings; width w > 0 right-aligns, w < 0 left."""
    line = lambda cells: " ".join(f"{c:>{w}}" if w > 0 else f"{c:<{-w}}" for c, w in zip(cells, widths))
    print(line(head))
    print("-" * len(line(head)))
    for r in rows:
        print(line(r))


# --- 1. Toy evaluation -----------------------------------------------------------------------


@torch.no_grad()
def eval_toy(bb, net, n=DEFAULT_N, seed=0, others=None, keep=None, base_ode=False):
    """Per prompt, every row against the exact teacher (toy_metrics, same noise, same exact sets):
    "generator" (`net`'s 4-step CPS, every state), each of `others` ({name: net}), "teacher_euler4"
    (Euler on the same 4 sigmas), "teacher_ode50" (50 Euler steps), "exact" (another exact set:
    what a perfect sampler reads) and, with base_ode, "base_ode50" (the pretrained base MLP: how well
    the network class fits). keep[prompt][row] receives the states (pictures)."""
    mix, P = bb.mixture, len(bb.prompts)
    fine = models.sd3_sigmas(step_list=torch.linspace(1000, 20, 50).tolist())
    gens = [torch.Generator().manual_seed(1000 * seed + ci) for ci in range(P)]
    nets = {"generator": net} | (others or {}) | {"teacher_euler4": None}
    runs = sample.toy_rollouts(bb, nets, REF_SETS * n, gens.__getitem__, lambda ci: 10_000 * (seed + 1) + ci)
    results = {}
    for ci, (prompt, (x, cond, states)) in enumerate(runs.items()):
        states["teacher_ode50"] = [x, sample.euler_sample(bb, bb.teacher, x, fine, cond)]
        states["exact"] = [x, mix.sample(torch.full((len(x),), ci, dtype=torch.long), generator=gens[ci])]
        if base_ode:
            states["base_ode50"] = [x, sample.euler_sample(bb, bb.base, x, fine, cond)]
        ref = ExactReference(mix, ci, n, seed=10_000 * (seed + 1) + 100 * ci)
        results[prompt] = {name: toy_metrics(st, bb.sigmas if len(st) == len(bb.sigmas) else [1.0, 0.0],
                                             ref, mix.weights[ci]) for name, st in states.items()}
        if keep is not None:
            keep[prompt] = states
    return results


def last_step_ceiling(steps=3000, width=128, angles=8, n=DEFAULT_N, seed=0):
    """What the toy generator's network class can do on the last step, with no DMD involved: regress the exact
    probability-flow map x_{sigma_{K-1}} -> x_0 (the exact velocity, 100 Euler steps) into a fresh ToyMLP by MSE,
    in the generator's own form x_0 = x - sigma G(x, sigma, c), then score both maps on exact inputs with the
    final-state metric of eval_toy. A ceiling for `train.py --toy-exact-prefix` (README, "what limits")."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    mix, s = models.toy_mixture(), float(models.sd3_sigmas()[-2])
    fine = torch.linspace(s, 0.0, 101).tolist()

    def exact_map(x, c):  # dx = v dsigma with the exact mixture velocity, in float64
        x = x.double()
        for a, b in zip(fine[:-1], fine[1:]):
            x = x + (b - a) * mix.velocity(x, torch.full((len(x),), a, dtype=torch.float64), c)
        return x.float()

    net = models.ToyMLP(num_cond=mix.weights.shape[0] + 1, width=width, angles=angles)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched, gen = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps), torch.Generator().manual_seed(seed + 1)
    for _ in tqdm(range(steps), desc="regress the last step"):
        c = torch.randint(0, mix.weights.shape[0], (512,), generator=gen)
        x = mix.sample(c, s, generator=gen).float()
        loss = ((x - s * net(x, sample.full(s, x), c) - exact_map(x, c)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    rows = []
    with torch.no_grad():
        for ci, prompt in enumerate(models.TOY_PROMPTS):
            c = torch.full((REF_SETS * n,), ci, dtype=torch.long)
            x = mix.sample(c, s, generator=torch.Generator().manual_seed(1000 * seed + ci)).float()
            ref = ExactReference(mix, ci, n, seed=10_000 * (seed + 1) + 100 * ci)
            for name, y in (("exact map", exact_map(x, c)), ("regressed MLP", x - s * net(x, sample.full(s, x), c))):
                ed, floor = ref.ed(y, 0.0)
                m = mode_metrics(y, mix, mix.weights[ci])
                rows.append([prompt, name, f"{ed / floor:.2f}", f"{m['occ_err']:.3f}", f"{m['outliers']:.3f}",
                             f"{m['gap']:.3f}"])
    print(f"last step from exact x at sigma {s}: {steps} MSE steps of batch 512, width {width}, angles {angles}; "
          f"n = {n} x {REF_SETS} sets per prompt")
    print_table(["prompt", "map", "ED/floor", "occ err", "outliers", "gap"], rows, [-7, -14, 10, 10, 10, 10])
    return rows


def summarize_runs(per_run):
    """(mean, spread = half the range) over runs of every number, in the results' nesting."""
    def agg(vals):
        if isinstance(vals[0], dict):
            return {k: agg([v[k] for v in vals]) for k in vals[0]}
        if isinstance(vals[0], list):
            return [agg([v[i] for v in vals]) for i in range(len(vals[0]))]
        return (sum(vals) / len(vals), (max(vals) - min(vals)) / 2)
    return agg(per_run)


# --- Toy pictures: scatter panels (sample.scatter_png) titled with their ED/floor ------------

STAGE1_COLUMNS = (("exact", "exact teacher"), ("teacher_euler4", "teacher 4-step Euler"),
                  ("plain_dmd", "plain DMD"), ("generator", "AC-DMD"))


def toy_figure_stage1(bb, results, keep, path):
    """One row per prompt (the STAGE1_COLUMNS, titled with ED/floor); then per generator the state
    after every sampler step (colour) over exact samples of that marginal (grey)."""
    C, P = sample.PALETTE, bb.prompts
    grid = [[{"title": f"{p}: {label} {results[p][key]['ratio']:.1f}x", "layers": [(keep[p][key][-1], C[ci])]}
             for key, label in STAGE1_COLUMNS if key in keep[p]] for ci, p in enumerate(P)]
    gen = torch.Generator().manual_seed(1)
    for key, label in (("generator", "AC-DMD"), ("plain_dmd", "plain DMD")):
        if key not in keep[P[0]]:
            continue
        row = []
        for k, s in enumerate(bb.sigmas.tolist()[1:], 1):
            exact = torch.cat([bb.mixture.sample(torch.full((500,), ci, dtype=torch.long), s, generator=gen)
                               for ci in range(len(P))])
            ratio = sum(results[p][key]["ratio_steps"][k - 1] for p in P) / len(P)
            row.append({"title": f"{label}, step {k} (sigma {s:.2f}): {ratio:.1f}x", "layers": [(exact, sample.GREY)]
                        + [(keep[p][key][k][:500], C[ci]) for ci, p in enumerate(P)]})
        grid.append(row)
    return sample.scatter_png(grid, path, size=200, max_points=1500)


# --- 4. Image evaluation ---------------------------------------------------------------------

# The official inference protocol (configs/inference/*.yaml): 4 steps [1000, 750, 500, 250]
# (shifted), CPS eta 0.9, no CFG, seed 42 set once, batch 4, one image per prompt, 1024 px for all
# three backbones (even those trained at 512), the first 64 prompts (num_media_images): --protocol
# official; full: every prompt. Explicit options override it (eval.json's protocol.overrides).
# Teachers (official README: "standard multi-step settings"; SD3-M at 100 NFE): 50 Euler steps x
# CFG's 2 forwards at the backbone's scale (7.0 / 4.5 / 4.0); FLUX.2's "50 NFE": --teacher-steps 25.
EVAL_RESOLUTION = 1024  # tiny twins keep their own (32 px)
TEACHER_STEPS = 50
CPS_ETA = 0.9
PROTOCOLS = {name: dict(max_prompts=m, seed=42, batch_size=4, n_per_prompt=1, resolution=EVAL_RESOLUTION)
             for name, m in (("official", 64), ("full", 0))}
TABLE_SCALE = {"pickscore": rewards.PICKSCORE_TABLE_SCALE}  # the code scores PickScore / 26

# A small, varied prompt set written for this project (objects, counts, colours, positions,
# text, styles, people, animals, scenes): `--prompts builtin`, for smoke runs, not for numbers.
BUILTIN_PROMPTS = [
    "a photo of a corgi wearing sunglasses on a beach",
    "three red apples and one green pear on a wooden table",
    "a watercolor painting of a lighthouse in a storm",
    'a neon sign that says "OPEN LATE" above a diner door',
    "an astronaut reading a newspaper on the moon, film photograph",
    "a blue cube on top of a yellow sphere",
    "a close-up portrait of an elderly fisherman, dramatic lighting",
    "a bowl of ramen with a soft-boiled egg, studio food photography",
    "an isometric pixel-art city at night",
    "a cat to the left of a dog, both asleep on a sofa",
    "a medieval castle made of glass on a mountain top",
    "a child flying a kite in a field of sunflowers",
    "an impressionist oil painting of a fox in a snowy forest",
    "a vintage bicycle leaning against a brick wall",
    "a macro photo of a dewdrop on a spider web at sunrise",
    "a futuristic train crossing a bridge over a canyon",
]

# Each metric's prompt set as the official evaluation pairs them (configs/inference/*.yaml,
# reward_dataset_map; the official dataset/); the others score --prompts (officially DrawBench).
OFFICIAL_PROMPT_SETS = {"geneval": "dataset/geneval/test_metadata.jsonl", "ocr": "dataset/ocr/test.txt",
                        "hpsv3": "dataset/hpsv3/test.txt", "geneval2": "dataset/geneval2/test.jsonl"}


def read_prompt_records(path, max_prompts=0):
    """(prompts, records (.jsonl: each line's record, else None), count in file, sha256) of a prompt
    file or "builtin"; max_prompts > 0 keeps the first N (the official num_media_images)."""
    if path == "builtin":
        prompts, records = list(BUILTIN_PROMPTS), None
        sha = hashlib.sha256("\n".join(BUILTIN_PROMPTS).encode()).hexdigest()
    else:
        prompts, metadata = models.read_prompt_file(path)
        sha = models.file_sha256(path)
        records = [{"prompt": p, **m} for p, m in zip(prompts, metadata)] if path.endswith(".jsonl") else None
    n, keep = len(prompts), (max_prompts if max_prompts > 0 else len(prompts))
    return prompts[:keep], records and records[:keep], n, sha


def prompt_sets(reward_names, default, routes):
    """{prompt file: [reward names]}: each reward on its --reward-prompts file, else on `default`."""
    table = {}
    for item in filter(None, (routes or "").split(",")):
        name, sep, path = item.partition("=")
        if not sep or name not in reward_names:
            raise ValueError(f"--reward-prompts {item!r}: expected NAME=FILE with NAME one of {reward_names}")
        table[name] = path
    sets = {}
    for name in reward_names:
        sets.setdefault(table.get(name, default), []).append(name)
    return sets


@torch.no_grad()
def eval_images(bb, net, prompts, scorer, n_per_prompt=1, batch_size=4, seed=42, teacher=False,
                steps=TEACHER_STEPS, cfg=None, keep=16, progress=True, metadata=None):
    """n_per_prompt images per prompt, scored by `scorer` (rewards.MultiReward, on uint8 images):
    the generator `net` (4-step CPS, eta 0.9, no CFG), or with teacher=True the stock pipeline's
    `steps`-step Euler ODE with CFG `cfg`. One generator seeded once draws every batch's noise in
    order: an image depends on its position and batch_size, as in rtdmd/inference.py.
    Returns {"prompts": [N], "scores": {reward: [N]}, "images": uint8 [<=keep, 3, H, W], "tags"}."""
    from tqdm import tqdm
    gen = torch.Generator().manual_seed(seed)
    items = [p for p in prompts for _ in range(n_per_prompt)]
    metas = None if metadata is None else [m for m in metadata for _ in range(n_per_prompt)]
    scores, kept = {}, []
    for i in tqdm(range(0, len(items), batch_size), desc="teacher" if teacher else "generator",
                  disable=not progress, dynamic_ncols=True):
        batch = items[i:i + batch_size]
        x = bb.noise(len(batch), gen)
        if teacher:
            images = sample.teacher_batch(bb, x, batch, steps, cfg)
        else:
            noises = [bb.noise(len(batch), gen) for _ in range(len(bb.sigmas) - 1)]
            images = bb.decode(sample.rollout(bb, net, x, bb.encode(batch), eta=CPS_ETA, noises=noises)[-1])
        for name, v in scorer(images, batch, None if metas is None else metas[i:i + batch_size]).items():
            if name in scorer.weights or name in GENEVAL_EXTRA:  # not the "weighted" sum
                scores.setdefault(name, []).append(v.float().cpu())
        kept += list((images[:keep - len(kept)] * 255).round().to(torch.uint8).cpu())
    return {"prompts": items, "scores": {k: torch.cat(v) for k, v in scores.items()},
            "images": torch.stack(kept), "tags": None if metas is None else [m.get("tag") for m in metas]}


GENEVAL_EXTRA = ("geneval_strict", "geneval_accuracy")  # rewards.GenEval's verdicts besides its score


def shapes_energy(images, prompts, seed=0, scale=10.0):
    """mini-sd3 (models.py, section 7): (ED, floor) of the toy's definition, carried to pictures:
    the energy distance between samples (prompt, detector features of its picture), the prompt as
    scale x (colour, shape, count, position) one-hot, the picture as rewards.shapes_features. The
    large scale makes pairs of different prompts cancel, so ED compares per-prompt laws (a sampler
    that draws the wrong prompt's picture is far). ED: the mean over REF_SETS drawn sets of the same
    prompts (fresh layouts); floor: the mean ED between REF_SETS other pairs of drawn sets."""
    def spec(p):
        n, colour, shape, pos = models.parse_mini_prompt(p)
        return [float(colour == c) for c in models.MINI_COLOURS] + [float(shape == s) for s in models.MINI_SHAPES] + \
            [float(n)] + [float(pos == q) for q in models.MINI_POSITIONS]
    cond = scale * torch.tensor([spec(p) for p in prompts])
    feats = lambda ims: torch.cat([cond, torch.tensor(  # noqa: E731
        [rewards.shapes_features(rewards.shapes_objects(im)) for im in ims], dtype=cond.dtype)], 1)
    rng = random.Random(seed)
    drawn = [feats((models.mini_batch(prompts, rng) + 1) / 2) for _ in range(3 * REF_SETS)]
    x = feats(images)  # the detector once per image, not once per drawn set
    ed = sum(energy_distance(x, d) for d in drawn[:REF_SETS]) / REF_SETS
    return ed, sum(energy_distance(a, b) for a, b in zip(drawn[REF_SETS::2], drawn[REF_SETS + 1::2])) / REF_SETS


def geneval_by_tag(scores, tags):
    """Per-tag means of GenEval's verdicts (official code: rtdmd/inference.py,
    _score_details_to_mean_metrics), and "overall", the mean of the per-tag accuracies: GenEval's
    "Overall score (avg. over tasks)" (its evaluation/summary_scores.py), not the mean over images."""
    if "geneval_accuracy" not in scores or not tags:
        return None
    out = {"accuracy": {}, "strict_accuracy": {}, "n": {}}
    for tag in dict.fromkeys(tags):  # GenEval's order of first appearance
        keep = torch.tensor([t == tag for t in tags])
        out["accuracy"][tag] = scores["geneval_accuracy"][keep].double().mean().item()
        out["strict_accuracy"][tag] = scores["geneval_strict"][keep].double().mean().item()
        out["n"][tag] = int(keep.sum())
    out["overall"] = sum(out["accuracy"].values()) / len(out["accuracy"])
    return out


def summarize(scores):
    """{reward: {"mean", "std" (over images)}} in the paper's table units (PickScore x 26)."""
    scaled = {name: v.double() * TABLE_SCALE.get(name, 1.0) for name, v in scores.items()}
    return {name: {"mean": v.mean().item(), "std": v.std(correction=0).item()} for name, v in scaled.items()}


def load_generator(args, device, dtype):
    """(backbone, generator, stage): a run's, or --model's base (FLUX.2: klein; SD3.x: the teacher)."""
    name = args.model or args.run_model
    res = models.SPECS[name][4] if name.startswith(("tiny-", "mini-")) and "resolution" not in args.overrides \
        else args.resolution
    kw = dict(resolution=res, device=device, dtype=dtype)
    if args.run:
        return models.load_run(args.run, args.stage, **kw)
    bb = models.load(args.model, cache_dir=args.cache_dir, pretrained=args.pretrained, **kw)
    if args.lora:
        return bb, models.merged_generator(bb, args.lora), "lora"
    return bb, bb.generator_base, None


def main_images(args):
    t0 = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # paper: bf16 weights
    weights = {n: 1.0 for n in args.rewards.split(",")}  # eval: every metric with weight 1
    sources = rewards.sources_from_args(args)
    out_dir = args.out or args.run or os.path.join("runs", f"eval_{args.model}")
    try:  # everything that can be missing is looked up before the (slow) generation
        scorer = rewards.eval_rewards(sources, weights)
        sets = {}  # prompt file -> (prompts, records, n in file, sha256, scorer of its rewards)
        for path, names in prompt_sets(list(weights), args.prompts, args.reward_prompts).items():
            ps, recs, n, sha = read_prompt_records(path, args.max_prompts)
            for name in names:  # what each reward needs of its prompt set
                rewards.check_metadata([name], recs, where=repr(path), fix=f"pass --reward-prompts "
                                       f"{name}={OFFICIAL_PROMPT_SETS.get(name)} (official repo)")
            if "ocr" in names:
                [rewards.ocr_target(p) for p in ps]
            sets[path] = (ps, recs, n, sha, rewards.eval_rewards(sources, dict.fromkeys(names, 1.0), share=scorer))
        rewards.preflight(scorer, device)  # loads every reward model
        bb, net, stage = load_generator(args, device, dtype)
    except (FileNotFoundError, NotImplementedError, ValueError, RuntimeError) as e:
        die(e)
    print(f"protocol {args.protocol}" + (f" with {args.overrides}" if args.overrides else ""))
    for path, (ps, *_, sc) in sets.items():
        print(f"{path}: {len(ps)} prompts x {args.n_per_prompt} for {', '.join(sc.weights)}")
    print(f"{bb.resolution} px, seed {args.seed}")
    steps = len(bb.sigmas) - 1  # the table's rows: the sampler knobs, then images and scores
    rows = {"generator": dict(sampler="CPS", steps=steps, nfe=steps, eta=CPS_ETA, cfg=1.0, sigmas=bb.sigmas)}
    gen = f"{os.path.basename(os.path.abspath(args.run))} stage {stage}" if args.run else \
        f"{args.model} + {len(args.lora)} LoRA(s)" if args.lora else f"{args.model} base"
    labels = {"generator": f"{gen} ({steps} NFE)"}
    if args.teacher:
        cfg = bb.guidance if args.teacher_cfg is None else args.teacher_cfg
        nfe = args.teacher_steps * (1 if cfg == 1.0 else 2)  # CFG: 2 forwards
        rows["teacher"] = dict(sampler="Euler ODE (stock pipeline)", steps=args.teacher_steps, cfg=cfg, nfe=nfe,
                               sigmas=bb.teacher_sigmas(args.teacher_steps))
        labels["teacher"] = f"teacher ({nfe} NFE, CFG {cfg:g})"
    res, table, tag_lines, mini = {}, [], [], bb.name == "mini-sd3"  # res: row -> prompt file -> eval_images output
    for name, r in rows.items():
        res[name] = {path: eval_images(bb, net, ps, sc, args.n_per_prompt, args.batch_size, args.seed,
                                       teacher=name == "teacher", steps=r["steps"], cfg=r["cfg"], metadata=recs,
                                       keep=len(ps) * args.n_per_prompt if mini else 16)
                     for path, (ps, recs, _, _, sc) in sets.items()}
        if mini:  # every image kept: the detector-feature energy distance to drawn pictures
            out = res[name][next(iter(sets))]
            ed, floor = shapes_energy(out["images"].float() / 255, out["prompts"], args.seed)
            r["shapes_energy"] = dict(ed=ed, floor=floor, ed_over_floor=ed / floor, n=len(out["prompts"]))
            tag_lines.append(f"{labels[name]}: detector-feature ED/floor {ed / floor:.2f} "
                             f"(ED {ed:.4f}, floor {floor:.4f}; {len(out['prompts'])} images, {REF_SETS} drawn sets)")
        r["sigmas"] = [round(s, 6) for s in r["sigmas"].tolist()]
        s = r["summary_table_units"] = summarize({k: v for out in res[name].values() for k, v in out["scores"].items()})
        table.append([labels[name]] + [f"{s[c]['mean']:.4f} ± {s[c]['std']:.4f}" for c in s])
        by_tag = [t for out in res[name].values() if (t := geneval_by_tag(out["scores"], out["tags"]))]
        if by_tag:
            t = r["geneval_by_tag"] = by_tag[0]
            tag_lines.append(f"{labels[name]}: GenEval overall (mean over tags, the benchmark figure) "
                             f"{t['overall']:.4f}; " + ", ".join(f"{k} {v:.4f} (n {t['n'][k]})"
                                                                 for k, v in t["accuracy"].items()))
    print_table(["model"] + [c + (f" (x{TABLE_SCALE[c]:g})" if c in TABLE_SCALE else "") for c in s], table,
                [-30] + [19] * len(s))  # one column per reward, "mean ± std"
    for line in tag_lines:
        print(line)
    per_image = [{"prompt": p, **({} if path == args.prompts else {"prompt_file": path}),
                  **{n: {k: v[i].item() for k, v in res[n][path]["scores"].items()} for n in res}}
                 for path in sets for i, p in enumerate(res["generator"][path]["prompts"])]
    first = next(iter(sets))  # the grids show the first prompt set's images
    grids = {n: sample.save_grid(r[first]["images"][:16].float() / 255, os.path.join(
        out_dir, "eval.png" if n == "generator" else f"eval_{n}.png")) for n, r in res.items()}
    out = {"protocol": {"name": args.protocol, "overrides": args.overrides},
           "model": bb.name, "run": args.run, "lora": args.lora, "stage": stage, "device": device, "dtype": str(dtype),
           "resolution": bb.resolution, "seed": args.seed, "batch_size": args.batch_size,
           "n_per_prompt": args.n_per_prompt, "rows": rows,
           "prompts": {"file": first, "sha256": sets[first][3], "n_in_file": sets[first][2],
                       "n_used": len(sets[first][0]), "max_prompts": args.max_prompts},
           "prompt_sets": {path: {"rewards": list(sc.weights), "sha256": sha, "n_in_file": n, "n_used": len(ps)}
                           for path, (ps, _, n, sha, sc) in sets.items()},
           "rewards": {"weights": weights, "quantize_uint8": True, "table_scale": TABLE_SCALE,
                       "sources": {**rewards.DEFAULT_SOURCES, **sources}},
           "scores_units": "per_image: raw scorer outputs (PickScore / 26); summaries: table units",
           "per_image": per_image, "grids": grids, "time_s": round(time.time() - t0, 1)}
    return write_json(out, os.path.join(out_dir, "eval.json"), f"and {', '.join(grids.values())}", t0)


def die(e):
    """Bad input: one line on stderr, no traceback, exit status 1."""
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


def write_json(out, path, also, t0):
    """Write `out` to `path`, say so (with `also` and the seconds since t0), return `out`."""
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path} {also} ({time.time() - t0:.1f}s)")
    return out


# --- 2. Stage 2: against the exact reward-tilted target (rewards.py, section 1) --------------
#
# The stage-2 loss has no beta of its own (subgrpo.py, section 6): the normalised DM direction and
# the standardised advantages set an implicit tilt. So a run meets p~_beta at the beta that fits it
# best (prompt-summed ED over a grid), and there: ED/floor against p~_beta (the tilted target?),
# occupancy error against pi~_cj (modes re-weighted right?), mean reward next to the exact
# E_{p~_beta}[r] (overshoot = reward hacking), and the per-prompt reward gaps at the beta with the
# run's prompt-averaged reward (fit_beta_reward).


def toy_reward(run):
    """The toy reward a run trained with (its config.json's --reward)."""
    return rewards.toy_reward(models.read_run_config(run).get("reward", "quadratic"))


def toy_samples(bb, net, n, seed, euler=False):
    """{prompt: final samples [REF_SETS * n, 2]} of the generator (or euler: the teacher's 4-step
    Euler), from the same noise for every row."""
    gen = torch.Generator().manual_seed(seed)
    runs = sample.toy_rollouts(bb, {"x": None if euler else net}, REF_SETS * n, lambda ci: gen, lambda ci: seed + ci)
    return {p: states["x"][-1] for p, (_, _, states) in runs.items()}


@torch.no_grad()
def tilted_metrics(samples, mixture, reward, beta, seed=1):
    """Per prompt, the stage-1 metrics against p~_beta (occupancy by the *tilted* means, outliers and
    gap of the tilted modes) and the mean reward vs the exact tilted mean."""
    tilt = reward.tilt(mixture, beta)
    exact_r = reward.exact_mean(tilt)
    rows = {}
    for ci, (prompt, x) in enumerate(samples.items()):
        ed, floor = ExactReference(tilt, ci, len(x) // REF_SETS, seed=1000 * seed + ci).ed(x, 0.0)
        modes, r = mode_metrics(x, tilt, tilt.weights[ci]), reward(x.double())[reward.name].mean().item()
        modes.pop("occupancy")
        rows[prompt] = {"ed": ed, "floor": floor, "ratio": ed / floor, **modes, "reward": r,
                        "reward_exact": exact_r[ci].item(), "reward_gap": r - exact_r[ci].item()}
    return rows


@torch.no_grad()
def fit_beta(samples, mixture, reward, grid=None, n=2000, seed=1):
    """A run's effective tilt: argmin of the prompt-summed ED between its first n samples and exact
    ones of p~_beta, over a log grid (ratio 1.33), refined 8x around the best point."""
    def ed(b):  # the same exact draws (seed) at every beta
        g, tilt = torch.Generator().manual_seed(seed), reward.tilt(mixture, b)
        return sum(energy_distance(x[:n], tilt.sample(torch.full((min(n, len(x)),), ci, dtype=torch.long),
                                                      generator=g)) for ci, x in enumerate(samples.values()))
    grid = grid if grid is not None else [0.0] + torch.logspace(-2, 1, 25).tolist()
    i = min(range(len(grid)), key=lambda j: ed(grid[j]))
    return min(torch.linspace(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], 17).tolist(), key=ed)


def fit_beta_reward(samples, mixture, reward):
    """The beta whose tilted target has the samples' prompt-averaged mean reward (E_{p~_beta}[r]
    rises with beta: d/dbeta = Var[r]), by bisection on log beta. There the per-prompt gaps sum to
    zero, so their spread says whether ONE tilt fits every prompt, whatever the shape errors."""
    P = len(samples)
    target = sum(reward(x.double())[reward.name].mean().item() for x in samples.values()) / P
    mean_at = lambda b: reward.exact_mean(reward.tilt(mixture, b))[:P].mean().item()
    if target <= mean_at(0.0):
        return 0.0
    lo, hi = -6.0, 3.0  # log10 beta
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_at(10 ** mid) < target else (lo, mid)
    return 10 ** ((lo + hi) / 2)


def eval_stage2(run, n=DEFAULT_N, seed=0, beta=None, others=None, keep=None):
    """The EMA generator of `run` against p~_beta at `beta` (default: fitted), next to "stage 1"
    (when stage2.pt exists), each of `others` ({name: run folder}) and "exact" (another exact set)."""
    (bb, net, stage), reward = models.load_run(run), toy_reward(run)
    first = "RTDMD" if stage == 2 else "generator"
    xs = {first: toy_samples(bb, net, n, seed)}
    fitted = fit_beta(xs[first], bb.mixture, reward)
    beta = fitted if beta is None else beta
    rest = ({"stage 1": (run, 1)} if stage == 2 else {}) | {k: (o, None) for k, o in (others or {}).items()}
    xs |= {name: toy_samples(bb, models.load_run(*where)[1], n, seed) for name, where in rest.items()}
    gen = torch.Generator().manual_seed(seed + 7)
    tilt = reward.tilt(bb.mixture, beta)
    xs["exact"] = {p: tilt.sample(torch.full((REF_SETS * n,), ci, dtype=torch.long), generator=gen)
                   for ci, p in enumerate(bb.prompts)}
    rows = {name: tilted_metrics(x, bb.mixture, reward, beta) for name, x in xs.items()}
    beta_r = fit_beta_reward(xs[first], bb.mixture, reward)
    exact_r = reward.exact_mean(reward.tilt(bb.mixture, beta_r))
    gaps_r = {p: rows[first][p]["reward"] - exact_r[ci].item() for ci, p in enumerate(bb.prompts)}
    if keep is not None:
        keep.update(xs)
    return {"stage": stage, "beta_fit": fitted, "beta": beta, "n": n, "ref_sets": REF_SETS,
            "reward": reward.name, "rows": rows, "beta_reward": beta_r, "reward_gaps_at_beta_reward": gaps_r}


def toy_figure_stage2(bb, res, keep, reward, path):
    """One row per prompt: exact p~ | stage 1 | RTDMD | without DM, titled with ED/floor, over the
    reward's contours (quadratic: reward -1/2, -2, -9/2 around its optimum, a cross)."""
    order = [("exact", "exact p~"), ("stage 1", "stage 1"), ("RTDMD", "RTDMD"), ("without DM", "without DM")]
    deco = {}
    if hasattr(reward, "m"):
        cross = tuple(reward.m.tolist())
        deco = {"cross": cross, "circles": [(cross, r / reward.gamma ** 0.5) for r in (1.0, 2.0, 3.0)]}
    grid = [[{"title": f"{p}: {label} {res['rows'][key][p]['ratio']:.1f}x",
              "layers": [(keep[key][p], sample.PALETTE[ci])]} | deco for key, label in order if key in keep]
            for ci, p in enumerate(bb.prompts)]
    return sample.scatter_png(grid, path, size=200, max_points=1500)


def main_tilted(args, t0):
    others = {"without DM": args.no_dm_run} if args.no_dm_run else None
    runs = [args.run] + (args.runs or [])
    keep, all_res = {}, []
    for i, run in enumerate(runs):
        res = eval_stage2(run, args.n, args.seed, args.beta, others if i == 0 else None, keep if i == 0 else None)
        all_res.append(res)
        print(f"run {run}: stage-{res['stage']} EMA generator vs the exact tilted target p~_beta at beta "
              f"{res['beta']:.3g} (fitted {res['beta_fit']:.3g}); n = {args.n} per set, {REF_SETS} sets "
              f"per prompt, floor = 2 E|X-X'| / n of p~_beta")
        print_table(["row", "prompt", "ED/floor", "occ err", "outliers", "ang gap", "reward", "exact E_p~[r]", "gap"],
                    [[name, p, f"{r['ratio']:.2f}", f"{r['occ_err']:.3f}", f"{r['outliers']:.3f}", f"{r['gap']:.3f}",
                      f"{r['reward']:.3f}", f"{r['reward_exact']:.3f}", f"{r['reward_gap']:+.3f}"]
                     for name, rows in res["rows"].items() for p, r in rows.items()], [-12, -7] + [8] * 5 + [13, 7])
        print(f"one beta for every prompt? at beta {res['beta_reward']:.3g} (the exact tilt with the generator's "
              f"prompt-averaged mean reward) the per-prompt reward gaps are "
              + ", ".join(f"{p} {g:+.3f}" for p, g in res["reward_gaps_at_beta_reward"].items()))
        with open(os.path.join(run, "eval_tilted.json"), "w") as f:
            json.dump(res, f, indent=1)
    if len(runs) > 1:  # the headline: mean +- spread (half range) over the runs, each at its own beta
        key = next(iter(all_res[0]["rows"]))
        s = summarize_runs([{"beta": r["beta"], "rows": r["rows"][key], "gaps": r["reward_gaps_at_beta_reward"]}
                            for r in all_res])
        print(f"{key} over {len(runs)} runs (mean +- spread), n = {args.n}: fitted beta {s['beta'][0]:.3g} +- "
              f"{s['beta'][1]:.2g}")
        ms = lambda v, fmt: f"{v[0]:{fmt}} +- {v[1]:.3f}"
        print_table(["prompt", "ED/floor", "occ err", "outliers", "reward gap", "gap at the reward-fitted beta"],
                    [[p, ms(r["ratio"], ".2f"), ms(r["occ_err"], ".3f"), ms(r["outliers"], ".3f"),
                      ms(r["reward_gap"], "+.3f"), ms(s["gaps"][p], "+.3f")] for p, r in s["rows"].items()],
                    [-7, 14, 14, 14, 15, 30])
    png = toy_figure_stage2(models.load_run(args.run)[0], all_res[0], keep, toy_reward(args.run),
                            args.png or os.path.join(args.run, "eval_tilted.png"))
    print(f"wrote eval_tilted.json in {', '.join(runs)} and {png} ({time.time() - t0:.1f}s)")
    return all_res[0] if len(runs) == 1 else all_res


# --- 3. The toy ablation table: every row trained, all against the same tilted target ----------

ABLATION_ROWS = [  # (row name, extra stage-2 flags)
    ("RTDMD", []),
    ("without DM", ["--w-dm", "0"]),
    ("without back-prop", ["--w-bp", "0"]),
    ("without policy gradient", ["--w-pg", "0"]),
    ("without SubGRPO", ["--all-steps", "--no-shared-noise"]),
]


def ablation(root, seed=0, n=DEFAULT_N):
    """Train stage 1 once, every stage-2 row from it, and the reference row (stage 1 on the exact
    tilted teacher at RTDMD's fitted beta*: its fixed point is p~); all against p~_{beta*}."""
    import shutil
    import train
    torch.set_num_threads(1)  # 2-D points: threads only add overhead
    t0, s1 = time.time(), os.path.join(root, "stage1")

    def trained(d, stage, files=None, flags=()):  # train into d once; files of s1 (+ its cached base) first
        if not os.path.exists(os.path.join(d, f"stage{stage}.pt")):
            if files is not None:
                shutil.rmtree(d, ignore_errors=True)
                os.makedirs(d)
                for f in (f for f in os.listdir(s1) if f in files or f.startswith("toy_base_")):
                    shutil.copy(os.path.join(s1, f), d)
            train.main(["--stage", str(stage), "--out", d, "--seed", str(seed), *flags])
        return models.load_run(d)[1]

    nets = {"stage 1 (AC-DMD)": trained(s1, 1)} | {name: trained(os.path.join(root, name.replace(" ", "_")), 2, (
        "stage1.pt", "config.json"), flags) for name, flags in ABLATION_ROWS}  # every row trained first
    bb, reward = models.load_run(s1)[0], rewards.toy_reward()
    samples = {"teacher 4-step Euler": toy_samples(bb, None, n, seed, euler=True)} | {
        name: toy_samples(bb, net, n, seed) for name, net in nets.items()}
    beta = fit_beta(samples["RTDMD"], bb.mixture, reward)
    samples[f"reference: stage 1 on p~ (beta {beta:.3g})"] = toy_samples(
        bb, trained(os.path.join(root, "reference"), 1, (), ["--tilt-teacher", str(beta)]), n, seed)
    rows = {}
    for name, x in samples.items():  # the mean over prompts of every metric
        per = tilted_metrics(x, bb.mixture, reward, beta)
        m = {k: sum(r[k] for r in per.values()) / len(per) for k in next(iter(per.values()))}
        rows[name] = m | {"beta_fit": fit_beta(x, bb.mixture, reward)}
    exact = rows["RTDMD"]["reward_exact"]
    table = "\n".join([
        f"Toy ablation (quadratic reward r = -|x - (2,0)|^2 / 2), every row against the exact tilted "
        f"target p~ at beta* = {beta:.3g} (fitted to the RTDMD row); means over the 3 prompts, "
        f"{n} samples each.", "",
        "| row | fitted beta | ED / noise floor vs p~ | occupancy error vs p~ | mean reward | "
        "exact E_p~[r] | overshoot |", "|---|---|---|---|---|---|---|"] + [
        f"| {name} | {m['beta_fit']:.3g} | {m['ratio']:.1f} | {m['occ_err']:.3f} | "
        f"{m['reward']:.3f} | {exact:.3f} | {m['reward'] - exact:+.3f} |" for name, m in rows.items()] + [
        "", f"(overshoot > 0: more reward than the tilted target has = reward hacking; "
        f"{time.time() - t0:.0f}s in total)"])
    print(table)
    with open(os.path.join(root, "ablation.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(root, "ablation.json"), "w") as f:
        json.dump({"beta": beta, "rows": rows}, f, indent=1)
    return rows


# --- CLI -------------------------------------------------------------------------------------


def main_toy(args):
    t0 = time.time()
    if args.tilted:
        return main_tilted(args, t0)
    runs, plain = [args.run] + (args.runs or []), args.plain_dmd_run or []
    per_run, keep = [], {}
    for i, run in enumerate(runs):
        try:
            bb, net, stage = models.load_run(run, args.stage)
            others = {"plain_dmd": models.load_run(plain[min(i, len(plain) - 1)], 1)[1]} if plain else None
        except (FileNotFoundError, ValueError) as e:  # e.g. a checkpoint that is not plain tensors
            die(e)
        per_run.append(eval_toy(bb, net, n=args.n, seed=args.seed, others=others, keep=keep if i == 0 else None,
                                base_ode=args.base_ode))
    summary, R = summarize_runs(per_run), len(runs)
    f = lambda ms, d: f"{ms[0]:.{d}f}" + (f"+-{ms[1]:.{d}f}" if R > 1 else "")  # mean +- spread
    print(f"stage-{stage} EMA generator of {', '.join(runs)}" + (f"; plain DMD: {', '.join(plain)}" if plain else ""))
    print(f"ED/floor: mean ED of {REF_SETS} pairs of n = {args.n} samples and n exact ones per prompt, floor = "
          f"2 E|X-X'| / n; {f'mean +- spread (half range) over {R} runs' if R > 1 else 'one run'}")
    mids = " ".join(f"{float(s):.2f}" for s in bb.sigmas[1:-1])  # final samples, then every inner sigma
    print_table(["prompt", "row", "ED/floor", "occ err", "outliers", "gap", f"  ED/floor at sigma {mids}"],
                [[p, name, f(r["ratio"], 2), f(r["occ_err"], 3), f(r["outliers"], 3), f(r["gap"], 3),
                  "  " + " ".join(f(v, 2) for v in r["ratio_steps"][:-1])]
                 for p, rows in summary.items() for name, r in rows.items()], [-7, -15, 12, 12, 12, 12, -1])
    png = toy_figure_stage1(bb, per_run[0], keep, args.png or os.path.join(args.run, f"eval_stage{stage}.png"))
    return write_json({"runs": runs, "plain_dmd_runs": plain, "stage": stage, "n": args.n, "ref_sets": REF_SETS,
                       "seed": args.seed, "per_run": per_run, "summary": summary},
                      os.path.join(args.run, f"eval_stage{stage}.json"), f"and {png}", t0)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a run (toy: against the exact target; "
                                "images: reward models), or a base --model.")
    p.add_argument("--run", help="run folder written by train.py")
    p.add_argument("--model", choices=list(models.SPECS), help="evaluate this base model instead")
    p.add_argument("--stage", type=int, help="1 or 2 (default: the latest)")
    p.add_argument("--seed", type=int, help="toy: 0; images: 42 (official inference seed)")
    p.add_argument("--n", type=int, default=DEFAULT_N, help="toy: samples per prompt and set")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="toy: more runs of the same setting (other "
                   "--seed): rows show mean +- spread")
    p.add_argument("--plain-dmd-run", nargs="+", metavar="RUN", help="toy stage 1: --plain-dmd run(s), "
                   "one more row and picture column")
    p.add_argument("--no-dm-run", metavar="RUN", help="toy --tilted: a --w-dm 0 stage-2 run, one more "
                   "row and picture column")
    p.add_argument("--base-ode", action="store_true", help="toy stage 1: add the base MLP as a 50-step ODE")
    p.add_argument("--png", help="toy: the picture's path (default RUN/eval_stage*.png)")
    p.add_argument("--tilted", action="store_true", help="toy stage 2: against the exact tilted target")
    p.add_argument("--beta", type=float, help="with --tilted: this beta instead of the fit")
    p.add_argument("--ablation", metavar="DIR", help="toy: train and evaluate the ablation rows")
    p.add_argument("--last-step-ceiling", type=int, metavar="STEPS", help="toy: regress the exact last-step map "
                   "into the generator's MLP for STEPS steps and score it (no DMD)")
    g = p.add_argument_group("images")
    g.add_argument("--prompts", default="builtin",
                   help=".txt (a prompt a line), .jsonl (\"prompt\" field) or 'builtin' (16 prompts, smoke runs)")
    g.add_argument("--protocol", default="official", choices=tuple(PROTOCOLS),
                   help="official: the first 64 prompts, seed 42, batch 4, 1024 px, 4 NFE, no CFG (the official "
                   "inference configs); full: every prompt, otherwise the same")
    g.add_argument("--max-prompts", type=int, help="first N prompts, 0 = all (default: protocol's)")
    g.add_argument("--n-per-prompt", type=int, help="images per prompt (paper: 1)")
    g.add_argument("--rewards", default=",".join(rewards.EVAL_WEIGHTS), help="comma-separated, each with "
                   "weight 1; also geneval, geneval2, ocr, hpsv3 (each on its own --reward-prompts)")
    g.add_argument("--reward-prompts", metavar="NAME=FILE,...", help="score these rewards on their own "
                   "prompt file; the official pairs: " + ",".join(f"{k}={v}" for k, v in OFFICIAL_PROMPT_SETS.items()))
    g.add_argument("--batch-size", type=int, help="images depend on it (one seed); default 4")
    g.add_argument("--resolution", type=int, help=f"default {EVAL_RESOLUTION} (tiny twins: theirs)")
    g.add_argument("--teacher", action="store_true", help="add the teacher's row")
    g.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS,
                   help="Euler steps; x2 forwards with CFG (SD3-M in the paper: 100 NFE)")
    g.add_argument("--teacher-cfg", type=float, help="default: the backbone's g")
    g.add_argument("--out", help="output folder (default: --run, else runs/eval_MODEL)")
    g.add_argument("--pretrained", help="--model: hub id or local diffusers folder")
    g.add_argument("--lora", nargs="+", metavar="PATH", help="--model: merge these LoRAs into its generator "
                   "base, in order (a released model: its stage-1, then stage-2 generator_ema.pt; .pt, "
                   ".safetensors or peft folders)")
    g.add_argument("--cache-dir", help="--model tiny-*: where the twin is built")
    g.add_argument("--device", help="default: cuda if available (bf16), else cpu")
    rewards.add_source_args(p.add_argument_group("reward checkpoints"))  # --reward-paths
    args = p.parse_args(argv)
    if args.ablation is None and args.last_step_ceiling is None and (args.run is None) == (args.model is None):
        p.error("give exactly one of --run and --model (or --ablation DIR)")
    if args.lora and args.model is None:
        p.error("--lora merges into a base model: pass --model NAME --lora PATH [PATH ...]")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.ablation:
        return ablation(args.ablation, seed=args.seed or 0)
    if args.last_step_ceiling:
        return last_step_ceiling(args.last_step_ceiling, n=args.n, seed=args.seed or 0)
    try:
        args.run_model = models.read_run_config(args.run)["model"] if args.run else None
    except FileNotFoundError as e:
        die(e)
    if (args.run_model or "").startswith("toy"):
        args.seed = 0 if args.seed is None else args.seed
        return main_toy(args)
    return main_images(apply_protocol(args))


def apply_protocol(args):
    """Unset image knobs from PROTOCOLS[args.protocol]; args.overrides: the ones set otherwise."""
    args.overrides = {}
    for k, v in PROTOCOLS[args.protocol].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
        elif getattr(args, k) != v:
            args.overrides[k] = getattr(args, k)
    return args


if __name__ == "__main__":
    main()
