"""
eval.py -- measure a run.

    python eval.py --run runs/toy                 # table on stdout, runs/toy/eval_stage*.json
    python eval.py --run runs/sd3 --prompts dataset/drawbench/test.txt --teacher \
        --clip-l-path ckpt/clip-vit-large-patch14 --pickscore-path ckpt/PickScore_v1 \
        --pickscore-tokenizer-path ckpt/CLIP-ViT-H-14 --hpsv2-tokenizer-path ckpt/CLIP-ViT-H-14 \
        --hpsv2-path ckpt/HPS_v2.1_compressed.pt --aesthetic-head-path ckpt/sac+logos+ava1-l14-linearMSE.pth \
        --imagereward-path ckpt/ImageReward.pt --imagereward-tokenizer-path ckpt/bert-base-uncased
    python eval.py --model tiny-sd3 --rewards clipscore --max-prompts 4    # base model, smoke run

1. Toy, stage 1 (`eval_toy`): for each prompt, the 4-step EMA generator's samples are compared
with exact samples of the teacher p(x|c) (models.py, section 2):
  - energy distance (ED), next to the noise floor: the ED between two independent exact sample
    sets of the same size (a perfect generator sits at the floor);
  - mode occupancy: each sample goes to its nearest component mean; the largest absolute gap to
    the exact weights pi_cj;
  - the same ED at every intermediate sampler state x_{sigma_k} against the exact marginal
    p_{sigma_k}(x|c): the defining property of AC-DMD (plain DMD matches only the last one).
Reference rows: the teacher's own 4-step Euler and its 50-step ODE from the same noise.

2. Toy, stage 2 (`eval_stage2`, `--tilted`): against the exact reward-tilted mixture
(rewards.py, section 1) at the beta that fits the run best (`fit_beta`): ED / noise floor,
occupancy error against the tilted weights, and mean reward against its exact tilted value.

3. Toy ablation (`ablation`, `--ablation DIR`): every stage-2 ablation row, and a stage-1 run on
the exact tilted teacher, evaluated against the same tilted target.

4. Images (`eval_images`): the official inference protocol (official code: rtdmd/inference.py,
configs/inference/*.yaml). The generator (or, with --model, the base model used as one) draws one
image per prompt line with the 4-NFE inference sampler; every requested reward scores it on the
8-bit image; optionally the teacher does the same with its own multi-step CFG sampler. Prints a
table like the paper's and writes eval.json (every knob + per-image scores) and eval.png.
--protocol official (the official inference configs: first 64 prompts, seed 42, batch 4, 1024 px)
or full (every prompt) sets those knobs; the table's first line and eval.json name it.
"""
import argparse
import json
import hashlib
import os
import sys
import time

import torch

import models
import rewards
import sample
import subgrpo

# ---------------------------------------------------------------------------------------------
# Metrics (sections 1-3)
# ---------------------------------------------------------------------------------------------


def energy_distance(x, y):
    """ED = 2 E|X-Y| - E|X-X'| - E|Y-Y'| with V-statistics (pairs with themselves included).
    The V-statistic is positive with a small O(1/n) bias, so two exact sets give a stable
    positive noise floor to compare against."""
    # --- exercise energy_distance: begin ---
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()
    # --- exercise energy_distance: end ---


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
# 1. Toy evaluation
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
        torch.manual_seed(10_000 * (seed + 1) + ci)  # CPS noise: a stream distinct from `gen`
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
# 4. Image evaluation
# ---------------------------------------------------------------------------------------------

# The official inference protocol (configs/inference/*.yaml): the generator samples 4 steps
# [1000, 750, 500, 250] (shifted), CPS eta 0.9, no CFG, seed 42 set once, batch 4, one image per
# prompt line, at 1024 px for all three backbones (even SD3.5-M and FLUX.2, which trained at 512).
# Teacher rows use "their standard multi-step settings" (the official README): SD3-M is reported at
# 100 NFE with CFG, i.e. 50 Euler steps x 2 forwards (cond + uncond). We use 50 steps and the
# backbone's CFG scale (7.0 / 4.5 / 4.0) for every backbone; FLUX.2's "50 NFE" is ambiguous
# (50 steps with CFG are 100 forwards): pass --teacher-steps 25 for 50 forwards.
EVAL_RESOLUTION = 1024  # tiny twins keep their own (32 px)
TEACHER_STEPS = 50
CPS_ETA = 0.9
# --protocol (official code: configs/inference/*.yaml, the same for all three backbones):
#   official  the first 64 prompts of the set (num_media_images 64), seed 42, batch 4, one image
#             per prompt, 1024 px, the 4-NFE CPS generator without CFG; what the official
#             inference script reports.
#   full      the same, on every prompt of the set (what a paper table presumably averages).
# An option given explicitly (--max-prompts, --seed, ...) overrides its protocol value and is
# listed under eval.json's protocol.overrides, so a table always says what it followed.
PROTOCOLS = {
    "official": dict(max_prompts=64, seed=42, batch_size=4, n_per_prompt=1, resolution=EVAL_RESOLUTION),
    "full": dict(max_prompts=0, seed=42, batch_size=4, n_per_prompt=1, resolution=EVAL_RESOLUTION),
}
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


# Each metric's own prompt set, as the official evaluation pairs them (official code:
# configs/inference/*.yaml, reward_dataset_map; the files live in the official repository's
# dataset/ folder). Metrics not listed here score the --prompts set (DrawBench officially).
# geneval needs the GenEval metadata of its .jsonl, ocr the quoted text of its prompts.
OFFICIAL_PROMPT_SETS = {"geneval": "dataset/geneval/test_metadata.jsonl", "ocr": "dataset/ocr/test.txt",
                        "hpsv3": "dataset/hpsv3/test.txt", "geneval2": "dataset/geneval2/test.jsonl"}


def read_prompt_records(path, max_prompts=0):
    """Prompts of a .txt / .jsonl file (models.read_prompt_file), or the built-in set for path
    "builtin". max_prompts > 0 keeps the first N, as the official `num_media_images` does (64 in
    the shipped YAMLs, official code: configs/inference/*.yaml); 0 keeps all. Returns (prompts, records, number of prompts
    in the file, sha256 of the file's bytes); records: a .jsonl line's whole record (its prompt
    and metadata) per prompt, None for .txt and "builtin"."""
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
    """{prompt file: [reward names]}: each reward on routes[name] ("name=file,..." of
    --reward-prompts), else on the default file."""
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


def teacher_sigmas(bb, steps):
    """The stock pipeline's schedule for `steps` Euler steps (sigma = 0 appended), from a fresh
    copy of its scheduler: SD3 `set_timesteps(steps)` (static shift); FLUX.2-klein the sigmas
    linspace(1, 1/steps) shifted with mu(tokens, steps), as Flux2KleinPipeline does."""
    sched = type(bb.pipe.scheduler).from_config(bb.pipe.scheduler.config)
    if bb.family == "flux2":
        mu = models.flux2_empirical_mu(bb.latent_shape[1] * bb.latent_shape[2], steps)
        sched.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).tolist(), mu=mu)
    else:
        sched.set_timesteps(steps)
    return sched.sigmas.float().cpu()


@torch.no_grad()
def eval_images(bb, net, prompts, scorer, n_per_prompt=1, batch_size=4, seed=42, teacher=False,
                steps=TEACHER_STEPS, cfg=None, keep=16, progress=True, metadata=None):
    """Generate n_per_prompt images for every prompt and score them with `scorer` (a
    rewards.MultiReward; eval_rewards quantises to uint8 first).
      generator (teacher=False): `net`, the 4-step CPS sampler, eta 0.9, no CFG (sample.rollout).
      teacher: bb.teacher, Euler over teacher_sigmas(bb, steps) with CFG `cfg` (default the
               backbone's g) against the empty prompt (sample.euler_sample).
    One torch.Generator, seeded once, draws every batch's initial noise in order (and the
    generator's CPS noises), so an image depends on its position in the list and on batch_size,
    as in the official code (rtdmd/inference.py, seed set once); there the CPS noise comes from
    the global RNG.
    metadata: None, or one record per prompt (a .jsonl's lines), handed to the scorer with them.
    Returns {"prompts": [N], "scores": {reward: Tensor[N]}, "images": uint8 [<=keep, 3, H, W]}."""
    gen = torch.Generator().manual_seed(seed)
    items = [p for p in prompts for _ in range(n_per_prompt)]
    metas = None if metadata is None else [m for m in metadata for _ in range(n_per_prompt)]
    if teacher:
        sigmas, cfg = teacher_sigmas(bb, steps), bb.guidance if cfg is None else cfg
    scores, kept = {}, []
    from tqdm import tqdm
    for i in tqdm(range(0, len(items), batch_size), desc="teacher" if teacher else "generator",
                  disable=not progress, dynamic_ncols=True):
        batch = items[i:i + batch_size]
        x = bb.noise(len(batch), gen)
        cond = bb.encode(batch)
        if teacher:
            null = bb.encode([""] * len(batch))
            x = sample.euler_sample(bb, bb.teacher, x, sigmas, cond, null, guidance=cfg)
        else:
            noises = [bb.noise(len(batch), gen) for _ in range(len(bb.sigmas) - 1)]
            x = sample.rollout(bb, net, x, cond, eta=CPS_ETA, noises=noises)[-1]
        images = bb.decode(x)
        meta = None if metas is None else metas[i:i + batch_size]
        for name, v in scorer(images, batch, meta).items():
            if name in scorer.weights or name == "geneval_strict":  # not the "weighted" sum
                scores.setdefault(name, []).append(v.float().cpu())
        kept += list((images[:keep - len(kept)] * 255).round().to(torch.uint8).cpu())
    return {"prompts": items, "scores": {k: torch.cat(v) for k, v in scores.items()},
            "images": torch.stack(kept)}


def summarize(scores):
    """{reward: {"mean", "std" (over images)}} in the paper's table units (PickScore x 26)."""
    out = {}
    for name, v in scores.items():
        v = v.double() * TABLE_SCALE.get(name, 1.0)
        out[name] = {"mean": v.mean().item(), "std": v.std(correction=0).item()}
    return out


def print_image_table(rows):
    """rows: {row label: summarize(...)}. Columns = rewards, cells "mean +- std"."""
    names = list(next(iter(rows.values())))
    cols = [n + (f" (x{TABLE_SCALE[n]:g})" if n in TABLE_SCALE else "") for n in names]
    head = f"{'model':30s}" + "".join(f"{c:>19s}" for c in cols)
    print(head)
    print("-" * len(head))
    for label, summ in rows.items():
        cells = [f"{summ[n]['mean']:.4f} ± {summ[n]['std']:.4f}" for n in names]
        print(f"{label:30s}" + "".join(f"{c:>19s}" for c in cells))


def load_generator(args, device, dtype):
    """(backbone, generator net, stage): a run's trained generator, or --model's base model
    (FLUX.2: the distilled klein, the generator's starting point; SD3.x: the teacher itself)."""
    name = args.model or args.run_model
    res = models.SPECS[name][4] if name.startswith("tiny-") and "resolution" not in args.overrides \
        else args.resolution
    kw = dict(resolution=res, device=device, dtype=dtype)
    if args.run:
        return models.load_run(args.run, args.stage, **kw)
    bb = models.load(args.model, cache_dir=args.cache_dir, pretrained=args.pretrained, **kw)
    return bb, bb.generator_base, None


def main_images(args):
    t0 = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # paper: bf16 weights
    weights = {n: 1.0 for n in args.rewards.split(",")}  # eval: every metric with weight 1
    sources = rewards.sources_from_args(args)
    out_dir = args.out or args.run or os.path.join("runs", f"eval_{args.model}")
    try:  # everything that can be missing is looked up before the (slow) generation
        sets = {}  # prompt file -> (prompts, records, n in file, sha256, scorer of its rewards)
        scorer = rewards.eval_rewards(sources, weights)
        for path, names in prompt_sets(list(weights), args.prompts, args.reward_prompts).items():
            sets[path] = (*read_prompt_records(path, args.max_prompts),
                          rewards.eval_rewards(sources, {n: 1.0 for n in names}, share=scorer))
        for path, (ps, recs, *_, sc) in sets.items():  # prompt-set needs, checked before any work
            if "geneval" in sc.weights and not (recs and all("include" in r for r in recs)):
                raise ValueError(f"geneval needs GenEval metadata records, which {path!r} lacks: pass "
                                 f"--reward-prompts geneval={OFFICIAL_PROMPT_SETS['geneval']} (official repo)")
            if "geneval2" in sc.weights and not (recs and all("vqa_list" in r for r in recs)):
                raise ValueError(f"geneval2 needs GenEval2 records with a vqa_list, which {path!r} lacks: pass "
                                 f"--reward-prompts geneval2={OFFICIAL_PROMPT_SETS['geneval2']} (official repo)")
            if "ocr" in sc.weights:
                [rewards.ocr_target(p) for p in ps]
        prompts = next(iter(sets.values()))[0]
        rewards.preflight(scorer, device)  # loads every reward model
        bb, net, stage = load_generator(args, device, dtype)
    except (FileNotFoundError, NotImplementedError, ValueError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, no traceback
        sys.exit(1)
    # rows of the table: the sampler knobs, then the images and their scores
    steps = len(bb.sigmas) - 1
    rows = {"generator": dict(sampler="CPS", steps=steps, nfe=steps, eta=CPS_ETA, cfg=1.0,
                              sigmas=bb.sigmas)}
    if args.teacher:
        cfg = bb.guidance if args.teacher_cfg is None else args.teacher_cfg
        rows["teacher"] = dict(sampler="Euler ODE", steps=args.teacher_steps, cfg=cfg,
                               nfe=args.teacher_steps * (1 if cfg == 1.0 else 2),  # CFG: 2 forwards
                               sigmas=teacher_sigmas(bb, args.teacher_steps))
    res = {}  # row -> prompt file -> eval_images output
    for name, r in rows.items():
        res[name] = {path: eval_images(bb, net, ps, sc, args.n_per_prompt, args.batch_size, args.seed,
                                       teacher=name == "teacher", steps=r["steps"], cfg=r["cfg"], metadata=recs)
                     for path, (ps, recs, _, _, sc) in sets.items()}
        r["sigmas"] = [round(s, 6) for s in r["sigmas"].tolist()]
        r["summary_table_units"] = summarize({k: v for out in res[name].values() for k, v in out["scores"].items()})
    print(f"protocol {args.protocol}" + (f" with {args.overrides}" if args.overrides else ""))
    for path, (ps, *_, sc) in sets.items():
        print(f"{path}: {len(ps)} prompts x {args.n_per_prompt} for {', '.join(sc.weights)}")
    print(f"{bb.resolution} px, seed {args.seed}")
    run_name = args.run and os.path.basename(os.path.abspath(args.run))
    gen = f"{run_name} stage {stage}" if args.run else f"{args.model} base"
    labels = [f"{gen} ({steps} NFE)"] + [f"teacher ({r['nfe']} NFE, CFG {r['cfg']:g})"
                                         for n, r in rows.items() if n == "teacher"]
    print_image_table({lab: r["summary_table_units"] for lab, r in zip(labels, rows.values())})
    per_image = [{"prompt": p, **({} if path == args.prompts else {"prompt_file": path}),
                  **{n: {k: v[i].item() for k, v in res[n][path]["scores"].items()} for n in res}}
                 for path in sets for i, p in enumerate(res["generator"][path]["prompts"])]
    os.makedirs(out_dir, exist_ok=True)
    first = next(iter(sets))  # the grids show the first prompt set's images
    grids = {n: sample.save_grid(r[first]["images"].float() / 255, os.path.join(
        out_dir, "eval.png" if n == "generator" else f"eval_{n}.png")) for n, r in res.items()}
    out = {"protocol": {"name": args.protocol, "overrides": args.overrides},
           "model": bb.name, "run": args.run, "stage": stage, "device": device, "dtype": str(dtype),
           "resolution": bb.resolution, "seed": args.seed, "batch_size": args.batch_size,
           "n_per_prompt": args.n_per_prompt, "rows": rows,
           "prompts": {"file": first, "sha256": sets[first][3], "n_in_file": sets[first][2],
                       "n_used": len(prompts), "max_prompts": args.max_prompts},
           "prompt_sets": {path: {"rewards": list(sc.weights), "sha256": sha, "n_in_file": n, "n_used": len(ps)}
                           for path, (ps, _, n, sha, sc) in sets.items()},
           "rewards": {"weights": weights, "quantize_uint8": True, "table_scale": TABLE_SCALE,
                       "sources": {**rewards.DEFAULT_SOURCES, **sources}},
           "scores_units": "per_image: raw scorer outputs (PickScore / 26); summaries: table units",
           "per_image": per_image, "grids": grids, "time_s": round(time.time() - t0, 1)}
    path = os.path.join(out_dir, "eval.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path} and {', '.join(grids.values())} ({time.time() - t0:.1f}s)")
    return out


# ---------------------------------------------------------------------------------------------
# 2. Stage 2: against the exact reward-tilted target (rewards.py, section 1)
# ---------------------------------------------------------------------------------------------
#
# The stage-2 loss has no beta of its own (subgrpo.py, section 6): the normalised DM direction
# and the standardised advantages set an implicit tilt. So a run is compared with p~_beta at the
# beta that fits it best (the energy distance summed over prompts, minimised over a grid of
# beta), and three things are reported there:
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


# The exact-decomposition mode's stationary point lives next to the loss it comes from
# (subgrpo.py, section 7); eval.stationary_mean_gauss is the same function.
stationary_mean_gauss = subgrpo.stationary_mean_gauss


# ---------------------------------------------------------------------------------------------
# 3. The ablation table (toy): train every row, evaluate all of them against the same tilted target
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
    whose fixed point is p~ exactly). Evaluate every row against p~_{beta*}; write ablation.md/json."""
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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main_toy(args):
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
    try:
        bb, net, stage = models.load_run(args.run, args.stage)
    except (FileNotFoundError, ValueError) as e:  # e.g. a checkpoint that is not plain tensors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    results = eval_toy(bb, net, n=args.n, seed=args.seed)
    print(f"run {args.run}, stage-{stage} EMA generator, {args.n} samples per prompt")
    print_toy_table(results, bb.sigmas)
    out = {"run": args.run, "stage": stage, "n": args.n, "seed": args.seed, "toy": results}
    with open(os.path.join(args.run, f"eval_stage{stage}.json"), "w") as f:
        json.dump(out, f, indent=1)
    png = sample.toy_scatter_png(bb, net, os.path.join(args.run, f"eval_stage{stage}.png"))
    print(f"wrote {os.path.join(args.run, f'eval_stage{stage}.json')} and {png} ({time.time() - t0:.1f}s)")
    return out


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a run (toy: against the exact target; "
                                "images: reward models), or a base --model.")
    p.add_argument("--run", default=None, help="run folder written by train.py")
    p.add_argument("--model", default=None, choices=list(models.SPECS),
                   help="evaluate this backbone's base model (as the generator) instead of a run")
    p.add_argument("--stage", type=int, default=None, help="1 or 2 (default: the latest)")
    p.add_argument("--seed", type=int, default=None, help="toy: 0; images: 42 (official inference seed)")
    p.add_argument("--n", type=int, default=4000, help="toy: samples per prompt")
    p.add_argument("--tilted", action="store_true",
                   help="toy stage 2: compare with the exact tilted target at the fitted beta")
    p.add_argument("--beta", type=float, default=None, help="with --tilted: this beta instead of the fit")
    p.add_argument("--ablation", default=None, metavar="DIR",
                   help="toy: train and evaluate the ablation rows in DIR (a few minutes)")
    g = p.add_argument_group("images")
    g.add_argument("--prompts", default="builtin", help=".txt (a prompt a line), .jsonl "
                   "(\"prompt\" field) or 'builtin' (16 prompts, smoke runs)")
    g.add_argument("--protocol", default="official", choices=tuple(PROTOCOLS),
                   help="official: the first 64 prompts, seed 42, batch 4, 1024 px, 4 NFE, no CFG "
                   "(the official inference configs); full: every prompt, otherwise the same")
    g.add_argument("--max-prompts", type=int, default=None, help="first N prompts, 0 = all "
                   "(default: the protocol's, official 64, full 0)")
    g.add_argument("--n-per-prompt", type=int, default=None, help="images per prompt (paper: 1)")
    g.add_argument("--rewards", default=",".join(rewards.EVAL_WEIGHTS), help="comma-separated, "
                   "each with weight 1; also geneval, geneval2, ocr, hpsv3 (each on its own --reward-prompts)")
    g.add_argument("--reward-prompts", default=None, metavar="NAME=FILE,...",
                   help="score these rewards on their own prompt file instead of --prompts; the official "
                   "pairs: " + ",".join(f"{k}={v}" for k, v in OFFICIAL_PROMPT_SETS.items()))
    g.add_argument("--batch-size", type=int, default=None, help="images depend on it (one seed); "
                   "default: the protocol's, 4")
    g.add_argument("--resolution", type=int, default=None, help=f"default {EVAL_RESOLUTION} "
                   "(tiny twins: their own)")
    g.add_argument("--teacher", action="store_true", help="add the teacher's row")
    g.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS, help="Euler steps; x2 "
                   "forwards with CFG (SD3-M in the paper: 100 NFE)")
    g.add_argument("--teacher-cfg", type=float, default=None, help="default: the backbone's g")
    g.add_argument("--out", default=None, help="output folder (default: --run, else runs/eval_MODEL)")
    g.add_argument("--pretrained", default=None, help="--model: hub id or local diffusers folder")
    g.add_argument("--cache-dir", default=None, help="--model tiny-*: where the twin is built")
    g.add_argument("--device", default=None, help="default: cuda if available (bf16), else cpu")
    rewards.add_source_args(g)  # --clip-l-path, --hpsv2-path, ...
    args = p.parse_args(argv)
    if args.ablation is None and (args.run is None) == (args.model is None):
        p.error("give exactly one of --run and --model (or --ablation DIR)")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.ablation:
        return ablation(args.ablation, seed=args.seed or 0)
    args.run_model = None
    if args.run:
        cfg_path = os.path.join(args.run, "config.json")
        if not os.path.exists(cfg_path):
            print(f"error: {cfg_path} not found: is {args.run!r} a run folder written by train.py?",
                  file=sys.stderr)
            sys.exit(1)
        with open(cfg_path) as f:
            args.run_model = json.load(f)["model"]
    if (args.run_model or "").startswith("toy"):
        args.seed = 0 if args.seed is None else args.seed
        return main_toy(args)
    apply_protocol(args)
    return main_images(args)


def apply_protocol(args):
    """Fill every image-evaluation knob left unset from args.protocol (PROTOCOLS) and record in
    args.overrides the ones given explicitly with another value."""
    args.overrides = {}
    for k, v in PROTOCOLS[args.protocol].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
        elif getattr(args, k) != v:
            args.overrides[k] = getattr(args, k)
    return args


if __name__ == "__main__":
    main()
