"""
train.py -- both stages of RTDMD, one process or many.

+------------------------------------------------------------------------------------------+
| Stage 1, AC-DMD (acdmd.py), one iteration                                    train_stage1 |
|   fake-score step, every iteration                                    stage1_fake_step    |
|     stop index k ~ U{1..4}; x_s = output of sampler step k-1 (no grad), s its level       |
|     t > s;  x_t = a_ts x_s + sigma_ts n;  regress fake(x_t, t) on the ambient target      |
|     + consistency regulariser; one AdamW step                                             |
|   generator step, every fake_update_ratio-th iteration (TTUR)   stage1_generator_step     |
|     stop index k ~ U{1..4}; x_s = output of step k-1, with grad through that one step     |
|     t > s;  g = kappa (v_fake - v_teacher) at x_t, projected back to s;  one AdamW step   |
|   EMA of the generator, every iteration                                   ema_update      |
|                                                                                          |
| Stage 2, RTDMD (subgrpo.py), one epoch = one generator step                train_stage2 |
|   rollouts: num_batches x (M prompts x K copies), 4-step CPS; states, log-probs,          |
|     rewards; steps not trained this epoch use noise shared per prompt   stage2_rollouts   |
|   advantages: per prompt mean, global std, over all ranks           stage2_advantages     |
|   fake-score step on the epoch's samples (s = 0)                      stage2_fake_step    |
|   generator step, accumulated over sub-batches and steps j      stage2_generator_step     |
|     j in S (2 of the 3 stochastic steps): w_pg * clipped PPO surrogate  policy_gradient_term |
|     j = 3 (deterministic): w_dm * AC-DMD at s = 0 + w_bp * reward back-prop  final_step_term |
|   EMA of the generator: every 8th epoch, one update per sub-batch (official)  ema_update  |
+------------------------------------------------------------------------------------------+

    torchrun --standalone --nproc_per_node 2 train.py --stage 1 --out runs/toy    # toy, 2 CPU ranks
    torchrun --nproc_per_node 8 train.py --stage 2 --model sd3.5-medium --out runs/sd35 \
        --prompts dataset/geneval/train_metadata.jsonl
    python train.py --stage 1 --out runs/prof --profile 20       # where a step's time goes

Defaults: the paper's for the real backbones (official code: configs/cold_start/*.yaml, stage 1;
configs/rtdmd/*.yaml, stage 2), CPU-sized for the toy. A run folder holds config.json, log.jsonl,
stage{1,2}.pt (atomic, --resume) and samples. Read main, stage 1, stage 2 (each loop, then its
phases); the infrastructure sits at the end.
"""
import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import resource
import shutil
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils import benchmark

import acdmd
import models
import rewards
import sample
import subgrpo

PHASES = []  # the --profile table's rows


def phase(name):
    """Decorator: the function is one phase of a step, a torch.profiler range (recorded only under --profile)."""
    PHASES.append(name)
    return torch.profiler.record_function(name)


def main(argv=None):
    args = get_args(argv)
    if args.memory_plan:
        sys.exit(memory_plan(args))
    ctx = setup(args)  # resolve_defaults: args are fixed from here on
    prompts, metadata, prompt_files = read_training_prompts(args)
    # the reward models load first: a missing one fails in one line before anything is written
    reward = make_reward(args, ctx.device, metadata) if args.stage == 2 else None
    os.makedirs(args.out, exist_ok=True)
    ctx.bb = load_backbone(ctx, prompts, metadata)
    if ctx.master:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(vars(args) | {"world_size": ctx.world, "prompt_files": prompt_files}, f, indent=2)
    if args.tilt_teacher is not None:
        tilt_toy_teacher(ctx.bb, args)
    if args.cache_text_embeddings:
        size = ctx.bb.cache_text_embeddings()
        print0(f"text embeddings cached: {len(ctx.bb.text_rows):,} prompts, {size / 2**30:.2f} GiB in host memory; "
               "text encoders moved to the CPU")
    # per-rank noise, seeded after loading (which may draw): what --grad-accum's streams reproduce
    torch.manual_seed(args.seed + ctx.rank)
    nets = train_stage1(ctx) if args.stage == 1 else train_stage2(ctx, reward)
    if ctx.ddp:  # rank 0 still writes the exports: no rank tears down the group before it is done
        dist.barrier()
        dist.destroy_process_group()
    return nets  # the trained modules (tests compare them across ranks and runs)


# ---------------------------------------------------------------------------------------------
# Stage 1: AC-DMD (acdmd.py; the official code's rtdmd/trainers/ac_dmd_trainer.py)
# ---------------------------------------------------------------------------------------------


def train_stage1(ctx):
    """The stage-1 loop (box at the top of this file): a fake-score step every iteration, a
    generator step every fake_update_ratio-th, the EMA every iteration."""
    args, bb, A = ctx.args, ctx.bb, ctx.args.grad_accum  # A micro-batches: B x world x A = batch
    B = args.batch_size // (ctx.world * A)
    ctx.streams = micro_batch_streams(args.seed, ctx.rank, A, ctx.device)
    with seeded(ctx.device, args.seed):
        m = students(args, bb.make_student("generator"), bb.make_student("fake"), weight_decay=0.0)
    step = 0
    if args.resume:
        ck = load_checkpoint(ctx.ckpt_path, m, ctx.shared_rng, ctx.rank)
        step, ctx.streams = ck["step"], ck["rng"][ctx.rank].get("streams", ctx.streams)
    if ctx.ddp:
        m.generator, m.fake = wrap_ddp(m.generator, ctx.device), wrap_ddp(m.fake, ctx.device)
    ctx.null_cond, end = bb.encode([""] * B), run_end(args, step)
    print0(stage1_banner(ctx, m, B, step))
    log, per_step = RunLog(args, ctx.master, "stage 1", step, end), [0] * (len(bb.sigmas) - 1)
    for step in profiled_steps(ctx, m, step, end):
        rec = {"stage": 1, "step": step + 1}
        if args.lr_cosine:  # a function of the step alone, so --resume continues it exactly
            for opt, lr in ((m.opt_g, args.lr_gen), (m.opt_f, args.lr_fake)):
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        conds = stage1_conds(ctx, B, step)  # one per micro-batch
        rec |= stage1_fake_step(ctx, m, conds)
        if (step + 1) % args.fake_update_ratio == 0:  # TTUR: the fake score runs ahead
            rec |= stage1_generator_step(ctx, m, conds)
            per_step[rec["gen_stop"] - 1] += 1
        ema_update(m.ema, m.generator, args.ema_decay)  # every iteration, not every generator step
        # the fake loss's scale follows the stop (acdmd.py, section 4): the bar shows both
        log.record(ctx.guard.note(rec), step + 1, fake="fake_loss", stop="fake_stop")
        ctx.guard.stop_if_stuck(f"iteration {step + 1}")
        if (step + 1) % args.save_every == 0 or step + 1 == end:
            ranks = gather_objects(rank_state(ctx, m, {"step": step + 1}), ctx.world)  # every rank
            if ctx.master:
                save_checkpoint(ctx.ckpt_path, {"step": step + 1}, m, ranks, args, ctx.shared_rng)
    log.close()
    print0(f"generator updates per sampler step (this session): {per_step}")
    write_samples_and_exports(args, bb, m.ema, 1, ctx.master)
    return {"generator": raw(m.generator), "fake": raw(m.fake), "ema": m.ema}


def stage1_prompts(n, B, world, rank, step, seed):
    """This rank's B prompt indices at iteration `step`, as DistributedSampler(shuffle, seed) with
    drop_last (official code: rtdmd/data/prompt_dataset.py): epoch e is randperm(n) seeded seed + e,
    padded with its head to a multiple of `world`; rank r reads every world-th index from r in
    batches of B. Stateless in `step` (exact resume). Fewer prompts than one global batch (the
    toy's 3): drawn with replacement from the per-rank stream."""
    per_epoch = -(-n // world) // B
    if per_epoch == 0:
        return torch.randint(0, n, (B,))
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    perm = torch.cat([perm, perm[:-n % world]])
    return perm[rank::world][k * B:(k + 1) * B]


@phase("prompts")
def stage1_conds(ctx, B, step):
    """The cond of each --grad-accum micro-batch: micro-batch a of rank r reads rank r A + a's prompts."""
    A, bb, conds = ctx.args.grad_accum, ctx.bb, []
    for a in range(A):
        with on_stream(ctx.streams, a, ctx.device):
            idx = stage1_prompts(len(bb.prompts), B, ctx.world * A, ctx.rank * A + a, step, ctx.args.seed)
            conds.append(bb.encode([bb.prompts[i] for i in idx]))
    return conds


@phase("backward simulation")
def simulate_subinterval(ctx, generator, cond, with_grad):
    """The sample both stage-1 updates train on: the generator's sampler from noise up to a random
    step (with grad through that step only when with_grad), its output x_s at level s, renoised to
    t > s. Stop and levels come from shared_rng: every rank trains the same step.
    Returns (stop, x_s, s, t, n, x_t)."""
    bb, B = ctx.bb, len(next(iter(cond.values())))
    stop = sample.random_stop(len(bb.sigmas) - 1, ctx.shared_rng, ctx.args.last_stop_weight)
    x, sigmas = bb.noise(B), bb.sigmas
    if getattr(bb, "exact_prefix", False):  # diagnostic: train the last step alone, on exact inputs
        stop, x, sigmas = len(bb.sigmas) - 1, bb.prefix_state(cond), bb.sigmas[-2:]
    with torch.set_grad_enabled(with_grad), ctx.autocast:
        net = generator if with_grad else raw(generator)  # DDP only where gradients flow
        sim = sample.backward_simulation(bb, net, x, cond, stop - (len(bb.sigmas) - len(sigmas)),
                                         sigmas=sigmas, eta=ctx.args.eta)
    x_s, s = subinterval_start(sim, ctx.args.plain_dmd)
    tau = acdmd.sample_renoise_timesteps(s, B, generator=ctx.shared_rng)
    t, n, x_t = acdmd.make_subinterval(x_s, s, tau)
    return stop, x_s, s, t, n, x_t


def subinterval_start(sim, plain_dmd):
    """(x_s, s). AC-DMD: the CPS output of the last step run, s = sigma_{k+1}. Plain DMD: x0_hat, s = 0 (DMD2)."""
    if plain_dmd:
        return sim["x0_hat"], 0.0
    return sim["x_next"].float(), sim["sigma_next"]


@phase("fake-score update")
def stage1_fake_step(ctx, m, conds):
    """Fake-score phase (acdmd.py, sections 4-5): x_s without grad, renoised to t > s; regress the
    fake velocity on the ambient target, plus the consistency regulariser. One optimiser step."""
    a = ctx.args

    def loss_fn(cond):
        stop, x_s, s, t, n, x_t = simulate_subinterval(ctx, m.generator, cond, False)
        with ctx.autocast:
            return stop, *acdmd.fake_score_loss(ctx.bb, m.fake, x_s.detach(), s, t, n, x_t, cond, a.move_scale_out,
                                                a.consistency_weight, a.eta, generator=ctx.shared_rng)
    return accumulated_step(ctx, "fake", m.fake, m.opt_f, conds, loss_fn)


@phase("generator update")
def stage1_generator_step(ctx, m, conds):
    """Generator phase (acdmd.py, section 3): x_s with grad through its step, renoised to t > s;
    descend kappa (v_fake - v_teacher) projected back to s with shared noise. One optimiser step."""
    a = ctx.args

    def loss_fn(cond):
        stop, x_s, s, t, _, x_t = simulate_subinterval(ctx, m.generator, cond, True)
        with ctx.autocast:
            return stop, *acdmd.generator_loss(ctx.bb, raw(m.fake), x_s, s, t, x_t, cond, ctx.null_cond,
                                               a.guidance, a.eta, a.grad_norm)
    return accumulated_step(ctx, "gen", m.generator, m.opt_g, conds, loss_fn)


def accumulated_step(ctx, key, net, opt, conds, loss_fn):
    """One optimiser step of `net` on --grad-accum micro-batches (loss_fn(cond) -> (stop, loss,
    stats)), each backward divided by their count. Each re-reads shared_rng from the same state
    (same stop and levels, as every rank) on its own stream; DDP all-reduces on the last backward."""
    opt.zero_grad(set_to_none=True)
    start, losses, stats = ctx.shared_rng.get_state(), [], {}
    for a, cond in enumerate(conds):
        ctx.shared_rng.set_state(start)
        quiet = isinstance(net, DDP) and a < len(conds) - 1
        with on_stream(ctx.streams, a, ctx.device), net.no_sync() if quiet else contextlib.nullcontext():
            stop, loss, st = loss_fn(cond)
            (loss / len(conds)).backward()
        losses.append(loss.detach())
        stats = {k: stats.get(k, 0.0) + v / len(conds) for k, v in st.items()}
    loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
    name = "fake score" if key == "fake" else "generator"
    grad_norm = ctx.guard.step(name, opt, trainable(net), loss, ctx.args.grad_clip)
    return {f"{key}_grad_norm": grad_norm, f"{key}_loss": loss, f"{key}_stop": stop} | stats


def micro_batch_streams(seed, rank, accum, device):
    """Micro-batch a of rank r gets the RNG stream seeded seed + r accum + a: rank r accum + a's of a
    run with accum x the ranks, so 1 rank x 2 micro-batches sees 2 ranks x 1's samples. None for 1."""
    return [rng_now(device, seed + rank * accum + a) for a in range(accum)] if accum > 1 else None


def rng_now(device, seed=None):
    """[CPU state, CUDA state or None] of the global RNG, or with a seed of one seeded so (in a fork)."""
    with seeded(device, seed) if seed is not None else contextlib.nullcontext():
        return [torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None]


@contextlib.contextmanager
def on_stream(streams, a, device):
    """Run the block on micro-batch a's random stream (micro_batch_streams); no-op for None."""
    if streams is None:
        yield
        return
    torch.set_rng_state(streams[a][0])
    if streams[a][1] is not None:
        torch.cuda.set_rng_state(streams[a][1], device)
    try:
        yield
    finally:
        streams[a] = rng_now(device)


def stage1_banner(ctx, m, B, step):
    a = ctx.args
    return (f"stage 1 (AC-DMD{', plain-DMD ablation' if a.plain_dmd else ''}) | model {a.model} | world {ctx.world} x "
            f"{B}{f' x grad-accum {a.grad_accum}' if a.grad_accum > 1 else ''} = {a.batch_size} samples/iter | "
            f"sigmas {[round(float(s), 5) for s in ctx.bb.sigmas]}\n  fake step every iter, generator step every "
            f"{a.fake_update_ratio} -> {a.steps // a.fake_update_ratio} generator updates in {a.steps} iters | "
            f"lr G {a.lr_gen} F {a.lr_fake} | CFG {a.guidance} | eta {a.eta} | bf16 {bool(a.bf16)} | "
            f"grad ckpt {bool(a.grad_ckpt)} | start at {step}\n  " + trainable_line(ctx, m))


def trainable_line(ctx, m):
    g, f = raw(m.generator), raw(m.fake)
    lora = (" (LoRA rank {})" if ctx.args.stage == 1 else " (fresh LoRA rank {} on the merged stage-1 LoRA)")
    return (f"trainable: generator {count(g):,} of {count(g, False):,}, fake {count(f):,} of {count(f, False):,}"
            + (lora.format(ctx.args.lora_rank) if uses_lora(ctx.bb) else ""))


# ---------------------------------------------------------------------------------------------
# Stage 2: RTDMD (subgrpo.py; the official code's rtdmd/trainers/rtdmd_trainer.py)
# ---------------------------------------------------------------------------------------------


def train_stage2(ctx, reward=None):
    """The stage-2 loop (box at the top of this file): per epoch, rollouts -> advantages -> one
    fake-score step -> one generator step accumulated over the epoch, EMA around it."""
    args, bb = ctx.args, ctx.bb
    if args.batch_size % args.group_size or args.batch_size % ctx.world:
        sys.exit(f"error: --batch-size {args.batch_size} (images per sampling iteration) must be a multiple "
                 f"of --group-size {args.group_size} and of the {ctx.world} ranks")
    ck1 = read_checkpoint(os.path.join(args.out, "stage1.pt"))
    with seeded(ctx.device, args.seed + 2):  # the same fresh LoRA init on every rank, side RNG
        m = students(args, *init_stage2_models(bb, ck1), weight_decay=args.weight_decay)
    ctx.reward_fn, ctx.bp_fn, ctx.weights = reward or make_reward(args, ctx.device)
    # LoRA: stage2.pt also holds the stage-1 weights its LoRA sits on (models.load_run, --resume)
    stage1 = {"stage1_ema": ck1["ema"], "stage1_fake": ck1["fake"]} if uses_lora(bb) else {}
    epoch = 0
    if args.resume:
        ck = load_checkpoint(ctx.ckpt_path, m, ctx.shared_rng, ctx.rank)
        check_same_stage1(args, ck, stage1)
        epoch = ck["epoch"]
    ctx.null_cond = bb.encode([""] * (args.batch_size // ctx.world))  # the teacher's CFG branch (DM term)
    ctx.final, ctx.sigmas = len(bb.sigmas) - 2, [float(s) for s in bb.sigmas]  # final: the deterministic step
    # num_batches x |S u {final}| backward calls per step, each divided by this fixed count (also
    # when a weight is 0: the ablations keep the other weights' scale)
    ctx.accumulation = args.num_batches_per_epoch * ((ctx.final if args.all_steps else 2) + 1)
    end = run_end(args, epoch)
    print0(stage2_banner(ctx, m, epoch))
    log = RunLog(args, ctx.master, "stage 2", epoch, end)
    for epoch in profiled_steps(ctx, m, epoch, end):
        steps = list(range(ctx.final)) if args.all_steps else subgrpo.select_steps(epoch, args.seed, ctx.final)
        rollouts = stage2_rollouts(ctx, m, steps, epoch)
        rec = {"stage": 2, "epoch": epoch + 1, "steps": steps}
        rec |= stage2_advantages(ctx, rollouts)
        rec |= stage2_fake_step(ctx, m, rollouts)
        rec |= stage2_generator_step(ctx, m, rollouts, steps, epoch)
        before, after = stage2_ema_schedule(args, epoch)
        for d in before:
            ema_update(m.ema, m.generator, d)
        loss = rec["loss_pg"] + rec["loss_dm"] + rec["loss_bp"]
        rec["grad_norm"] = ctx.guard.step("generator", m.opt_g, trainable(m.generator), loss, args.grad_clip)
        for d in after:
            ema_update(m.ema, m.generator, d)
        log.record(ctx.guard.note(rec), epoch + 1, reward="reward_mean")
        ctx.guard.stop_if_stuck(f"epoch {epoch + 1}")
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == end:
            ranks = gather_objects(rank_state(ctx, m, {"epoch": epoch + 1}), ctx.world)  # every rank
            if ctx.master:
                save_checkpoint(ctx.ckpt_path, {"epoch": epoch + 1} | stage1, m, ranks, args, ctx.shared_rng)
    log.close()
    write_samples_and_exports(args, bb, m.ema, 2, ctx.master)
    return {"generator": m.generator, "fake": m.fake, "ema": m.ema}


def check_same_stage1(args, ck, stage1):
    """On --resume: stage2.pt's stage-1 weights must equal stage1.pt's (its LoRA sits on them)."""
    for key in stage1:
        if ck[key].keys() != stage1[key].keys() or any(not torch.equal(ck[key][k], stage1[key][k])
                                                        for k in stage1[key]):
            sys.exit(f"error: {os.path.join(args.out, 'stage1.pt')} is not the stage-1 checkpoint "
                     f"this stage-2 run started from ({key} differs); restore it or start stage 2 anew")


def stage2_ema_schedule(args, epoch):
    """(before, after): EMA decays around this epoch's optimiser step. Official: every 8th epoch,
    one update per sub-batch, ~d^16 = 0.19 per firing (subgrpo.stage2_ema_decays); once: one."""
    if args.ema_schedule == "once":
        return [], [subgrpo.ema_decay(epoch, args.ema_decay)] if (epoch + 1) % 8 == 0 else []
    return subgrpo.stage2_ema_decays(epoch, args.num_batches_per_epoch, max_decay=args.ema_decay)


def stage2_banner(ctx, m, epoch):
    a, K, nb = ctx.args, ctx.args.group_size, ctx.args.num_batches_per_epoch
    return (f"stage 2 (RTDMD{', exact decomposition' if a.exact_decomposition else ''}) | model {a.model} | "
            f"reward {', '.join(ctx.weights)} | world {ctx.world}\n  per sampling iter: {a.batch_size // K} prompts x "
            f"K {K} = {a.batch_size} images ({a.batch_size // ctx.world}/rank) | {nb} iters/epoch -> "
            f"{nb * a.batch_size} images/epoch, one generator + one fake step per epoch\n  trained steps: "
            f"{'all of' if a.all_steps else '2 of'} 0..{ctx.final - 1} + {ctx.final} | accumulation {nb} x "
            f"{ctx.accumulation // nb} = {ctx.accumulation} | weights PG {a.w_pg} DM {a.w_dm} BP {a.w_bp} | "
            f"log-prob {a.logprob} | DM normalised {a.grad_norm} | shared noise {a.shared_noise}\n  lr G {a.lr_gen} "
            f"(wd {a.weight_decay}) F {a.lr_fake} | clip {a.clip_range} | epochs {a.steps} | bf16 {bool(a.bf16)} | "
            f"start at {epoch}\n  chunks: fake {a.fake_batch_size or 'all'}, BP {a.bp_batch_size or 'all'} | "
            + trainable_line(ctx, m))


@phase("rollouts")
def stage2_rollouts(ctx, m, steps, epoch):
    """Rollout phase (subgrpo.rollout_with_logprob): num_batches iterations of M prompts x K
    copies, 4-step CPS without grad, shared noise off `steps`. Prompts come from shared_rng (every
    rank knows the epoch's order; a group spreads over ranks). This rank's N = num_batches x B:
    latents, next_latents [N, 4, ...], log_probs [N, 4], x0, cond, prompts, rewards {name: [N]},
    and all_prompts (every rank's, in rank order)."""
    args, bb, rank = ctx.args, ctx.bb, ctx.rank
    B, M = args.batch_size // ctx.world, args.batch_size // args.group_size  # M prompts per iteration
    parts, per_iteration = [], []  # per_iteration: the global prompt list of each iteration
    for _ in range(args.num_batches_per_epoch):
        # M distinct prompts (a permutation's first M) x K copies, shuffled over the ranks
        per_iteration.append(subgrpo.draw_prompts(len(bb.prompts), M, args.group_size, ctx.shared_rng).tolist())
        rank_idx = per_iteration[-1][rank * B:(rank + 1) * B]
        prompts = [bb.prompts[i] for i in rank_idx]
        cond = bb.encode(prompts)
        with torch.no_grad(), ctx.autocast:
            out = subgrpo.rollout_with_logprob(bb, raw(m.generator), bb.noise(B), cond, prompts, steps,
                                               epoch, args.eta, args.shared_noise, args.logprob)
        parts.append(out | {"cond": cond, "rewards": score(ctx, out["x0"], prompts, rank_idx)})
    data = {k: torch.cat([p[k] for p in parts]) for k in ("latents", "next_latents", "log_probs", "x0")}
    data["cond"] = {k: torch.cat([p["cond"][k] for p in parts]) for k in parts[0]["cond"]}
    data["rewards"] = {n: torch.cat([p["rewards"][n] for p in parts]) for n in parts[0]["rewards"]}
    rows = lambda r: [bb.prompts[i] for ps in per_iteration for i in ps[r * B:(r + 1) * B]]  # noqa: E731
    data["prompts"], data["all_prompts"] = rows(rank), [p for r in range(ctx.world) for p in rows(r)]
    return data


@phase("rewards")
@torch.no_grad()
def score(ctx, x0, prompts, rank_idx):
    """The rollouts' rewards {name: [B]}, with the prompts' metadata (GenEval) where there is one."""
    images, metadata = ctx.bb.decode(x0), getattr(ctx.bb, "prompt_metadata", None)
    if metadata is None:
        return ctx.reward_fn(images, prompts)
    return ctx.reward_fn(images, prompts, metadata=[metadata[i] for i in rank_idx])


@phase("advantages")
def stage2_advantages(ctx, rollouts):
    """Advantage phase (subgrpo.group_advantages) on every rank's rewards; keeps this rank's
    shard, clipped, as rollouts["advantages"]."""
    weights, world = ctx.weights, ctx.world
    gathered = {n: all_gather_cat(rollouts["rewards"][n].float(), world) for n in weights}
    adv_all = subgrpo.group_advantages(gathered, rollouts["all_prompts"], weights,
                                       normalize=not ctx.args.exact_decomposition)
    adv = subgrpo.clip_advantages(adv_all.view(world, -1)[ctx.rank], ctx.args.adv_clip)
    rollouts["advantages"] = adv.to(rollouts["x0"].device)
    total = sum(w * gathered[n] for n, w in weights.items())
    rec = {"reward_mean": total.mean().item(), "reward_std": total.std(unbiased=False).item(),
           "adv_mean": adv_all.mean().item(), "adv_std": adv_all.std(unbiased=False).item(),
           "adv_absmax": adv_all.abs().max().item()}
    if len(weights) > 1:  # each reward's own mean (the advantages are per reward)
        rec |= {f"reward_{n}": gathered[n].mean().item() for n in weights}
    return rec


@phase("fake-score step")
def stage2_fake_step(ctx, m, rollouts):
    """Fake-score phase: one step of the ambient loss on the epoch's clean samples (s = 0: plain
    flow matching), levels drawn per rank, in --fake-batch-size chunks weighted by their share."""
    args, x0, cond = ctx.args, rollouts["x0"], rollouts["cond"]
    t, n, x_t = acdmd.make_subinterval(x0, 0.0, acdmd.sample_renoise_timesteps(0.0, len(x0)))
    m.opt_f.zero_grad(set_to_none=True)
    rec = {"fake_loss": 0.0}
    for i in chunks(len(x0), args.fake_batch_size):
        share = len(i) / len(x0)
        i = i.to(x0.device)
        with ctx.autocast:
            loss_f, stats = acdmd.fake_score_loss(ctx.bb, m.fake, x0[i], 0.0, t[i], n[i], x_t[i],
                                                  models.cond_select(cond, i), args.move_scale_out,
                                                  args.consistency_weight, args.eta)
        (loss_f * share).backward()
        rec["fake_loss"] += loss_f.detach() * share
        for k, v in stats.items():
            rec[k] = rec.get(k, 0.0) + v * share
    allreduce_grads(trainable(m.fake), ctx.world)
    rec["fake_grad_norm"] = ctx.guard.step("fake score", m.opt_f, trainable(m.fake), rec["fake_loss"], args.grad_clip)
    return rec


def stage2_generator_step(ctx, m, rollouts, steps, epoch):
    """The hybrid gradient of subgrpo.py, section 2, for the epoch's one optimiser step (the caller
    steps), accumulated over sub-batches, their --grad-accum micro-batches (weighted by share) and j:
        j in steps (stochastic):   policy_gradient_term
        j = final (deterministic): final_step_term
    Zero-advantage samples are dropped first (subgrpo.drop_zero_advantages, as the official
    trainer). Every backward is divided by ctx.accumulation; the gradient is averaged over ranks."""
    a, adv, nb = ctx.args, rollouts["advantages"], ctx.args.num_batches_per_epoch
    m.generator.zero_grad(set_to_none=True)
    keep = subgrpo.drop_zero_advantages(adv, nb, epoch, ctx.rank)
    order, B = keep[torch.randperm(len(keep))], len(keep) // nb  # sub-batches, in a fresh order
    rec, ppo = {"loss_pg": 0.0, "loss_dm": 0.0, "loss_bp": 0.0, "kept": len(keep)}, []
    for b in range(nb):
        for i in order[b * B:(b + 1) * B].tensor_split(a.grad_accum):
            dev = adv.device
            mb = SimpleNamespace(i=i, share=len(i) / B, r=rollouts, prompts=[rollouts["prompts"][k] for k in i],
                                 null=models.cond_select(ctx.null_cond, torch.arange(len(i), device=dev)),
                                 cond=models.cond_select(rollouts["cond"], i.to(dev)))
            if a.w_pg:
                ppo += [policy_gradient_term(ctx, m, mb, j, rec) for j in sorted(set(steps))]
            if a.w_dm or a.w_bp:
                final_step_term(ctx, m, mb, rec)
    allreduce_grads(trainable(m.generator), ctx.world)
    if ppo:
        rec |= {"ratio_mean": sum(s["ratio_mean"] for s in ppo) / len(ppo), "ratio_min": min(s["ratio_min"] for s in ppo),
                "ratio_max": max(s["ratio_max"] for s in ppo), "clip_frac": sum(s["clip_frac"] for s in ppo) / len(ppo)}
    return rec


@phase("policy-gradient term")
def policy_gradient_term(ctx, m, mb, j, rec):
    """Score-function part on a stochastic step j (subgrpo.py, sections 3-4), on the stored transition:
        L_PG = w_pg * clipped PPO surrogate of log pi_theta(x_{j+1} | x_j, c) with advantages A."""
    a, r, s, i = ctx.args, mb.r, ctx.sigmas, mb.i
    with ctx.autocast:
        log_prob = subgrpo.transition_log_prob(ctx.bb, m.generator, r["latents"][i, j], r["next_latents"][i, j],
                                               s[j], s[j + 1], mb.cond, a.eta, a.logprob)
        l_pg, stats = subgrpo.ppo_loss(log_prob, r["log_probs"][i, j], r["advantages"][i], a.clip_range)
        loss = a.w_pg * l_pg
        rec["loss_pg"] += loss.detach() * mb.share / a.num_batches_per_epoch
    (loss * mb.share / ctx.accumulation).backward()
    return stats


@phase("final-step term")
def final_step_term(ctx, m, mb, rec):
    """Path-wise part on the deterministic last step (subgrpo.py, section 2), x0_hat with grad:
        L_final = w_dm * AC-DMD at s = 0 on x0_hat (acdmd.generator_loss)
                + w_bp * reward back-prop through decode and the reward models (bp_surrogate)."""
    a, bb, i, terms = ctx.args, ctx.bb, mb.i, []
    with ctx.autocast:
        x0_hat = subgrpo.final_step_x0(bb, m.generator, mb.r["latents"][i, ctx.final], ctx.sigmas[ctx.final], mb.cond)
        if a.w_dm:
            t, _, x_t = acdmd.make_subinterval(x0_hat, 0.0, acdmd.sample_renoise_timesteps(0.0, len(i)))
            l_dm, _ = acdmd.generator_loss(bb, raw(m.fake), x0_hat, 0.0, t, x_t, mb.cond, mb.null, a.guidance,
                                           a.eta, a.grad_norm)
            terms.append(a.w_dm * l_dm)
            rec["loss_dm"] += a.w_dm * l_dm.detach() * mb.share / a.num_batches_per_epoch
        if a.w_bp:  # decode x0_hat, score, hinge, in chunks (memory)
            l_bp, value = bp_surrogate(ctx, x0_hat, mb.prompts)
            terms.append(a.w_bp * l_bp)
            rec["loss_bp"] += a.w_bp * value * mb.share / a.num_batches_per_epoch
    (sum(terms) * mb.share / ctx.accumulation).backward()


@phase("back-prop term")
def bp_surrogate(ctx, x0_hat, prompts):
    """Reward back-prop (subgrpo.bp_loss), --bp-batch-size images at a time (0: all). Each chunk is
    decoded and scored w.r.t. a detached x0_hat, its backward freeing its VAE and reward
    activations; g = dL_BP/dx0_hat enters the generator's graph as the surrogate g . x0_hat, whose
    theta-gradient is dL_BP/dtheta by the chain rule. Returns (surrogate, L_BP)."""
    x = x0_hat.detach().requires_grad_(True)
    value, B = 0.0, len(x)
    for i in chunks(B, ctx.args.bp_batch_size):
        out = ctx.bp_fn(ctx.bb.decode(x[i]), [prompts[k] for k in i])
        l_bp, _ = subgrpo.bp_loss(sum(w * out[k] for k, w in ctx.weights.items() if k in out), ctx.args.bp_margin)
        (l_bp * len(i) / B).backward()  # mean over the sub-batch = size-weighted chunk means
        value += l_bp.detach() * len(i) / B
    return (x.grad * x0_hat).sum(), value


def make_reward(args, device=None, metadata=None):
    """(reward, bp_reward, weights): reward(images, prompts, metadata) -> {name: [B]}, bp_reward its
    differentiable part, weights {name: w}: the paper's set (rewards.GRPO_WEIGHTS; configs/rtdmd/
    *.yaml) or --rewards, loaded now; a missing model or GenEval record exits in one line."""
    if args.model.startswith("toy"):  # the "images" are the 2-D points themselves
        r = rewards.toy_reward(args.reward)
        return r, r, {r.name: 1.0}
    weights = dict(rewards.GRPO_WEIGHTS)
    if args.rewards:
        weights = {name.strip(): 1.0 for name in args.rewards.split(",") if name.strip()}
    others = ",".join(n for n in weights if n not in rewards.METADATA_FIELDS)
    try:
        rewards.check_metadata(weights, metadata, where=f"--prompts {args.prompts}",
                               fix="pass the training prompts with those records (the official code's "
                                   "{official}) as --prompts, or leave {name} out with --rewards " + others)
        grpo, bp = rewards.training_rewards(rewards.sources_from_args(args), weights)
        rewards.preflight(grpo, device)  # bp shares grpo's models: this loads both
    except (FileNotFoundError, NotImplementedError, ValueError, RuntimeError) as e:
        sys.exit(f"error: stage-2 reward: {' '.join(str(e).split())}")
    return grpo, bp, weights


def init_stage2_models(bb, ck):
    """Stage 1's EMA generator and fake score: as they are (toy, full fine-tune), or the stage-1
    LoRA merged into a copy of the base with a fresh LoRA on top (B = 0: both start as their
    stage-1 functions; official code: rtdmd/trainers/rtdmd_trainer.py, setup_models)."""
    if uses_lora(bb):
        return (bb.make_student("generator", stage=2, merge=ck["ema"]),
                bb.make_student("fake", stage=2, merge=ck["fake"]))
    generator, fake = bb.make_student("generator"), bb.make_student("fake")
    generator.load_state_dict(ck["ema"], strict=False)
    fake.load_state_dict(ck["fake"], strict=False)
    return generator, fake


def chunks(n, size):
    """Index ranges [0, n) in pieces of `size` (0 or None: one piece)."""
    size = size or n
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


def all_gather_cat(x, world):
    """Concatenate a tensor from every rank, in rank order."""
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@phase("gradient all-reduce")
def allreduce_grads(params, world):
    """Average the accumulated gradients across ranks once per step (DDP would on every backward)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if world > 1:
            dist.all_reduce(p.grad)
            p.grad /= world


# =============================================================================================
# Infrastructure: arguments, set-up, checkpoints, update guard, log, exports, profiler, memory plan
# =============================================================================================

# Paper values (official code: configs/cold_start/*.yaml, stage 1; configs/rtdmd/*.yaml, stage 2;
# "real2" = SD3.5-M), CPU-sized for the toy. Stage 2: steps = epochs, batch_size = prompts x K per
# sampling iteration. The toy's stage-2 weights suit D = 2, not the paper's ~65k (subgrpo.py, section 6).
DEFAULTS = {
    "toy": dict(steps=9000, batch_size=512, lr_gen=1e-3, lr_fake=1e-3, fake_update_ratio=5, ema_decay=0.999, log_every=50),
    "real": dict(steps=15000, batch_size=72, lr_gen=3e-5, lr_fake=3e-5, fake_update_ratio=10, ema_decay=0.99, log_every=10),
    "toy2": dict(steps=400, batch_size=48, lr_gen=3e-5, lr_fake=1e-3, fake_update_ratio=1, ema_decay=0.9, log_every=10,
                 group_size=16, num_batches_per_epoch=4, w_pg=1.0, w_dm=3.0, w_bp=0.1),
    "real2": dict(steps=1000, batch_size=72, lr_gen=3e-6, lr_fake=3e-5, fake_update_ratio=1, ema_decay=0.9, log_every=1,
                  group_size=24, num_batches_per_epoch=16, w_pg=1.0, w_dm=1e-3, w_bp=1e-4, fake_batch_size=8,
                  bp_batch_size=0),
}
# By (name or family, stage). Stage 2 (configs/rtdmd/*.yaml): SD3-M 16 GPUs x 2 = 2 prompts x 16,
# SD3.5-M 8 x 9 = 3 x 24, FLUX.2 16 x 6 = 4 x 24. Chunks are per rank; a VAE decode saves ~4 GiB per
# 512-px image (--memory-plan), so real SD3 back-propagates one image at a time (same gradient).
PER_BACKBONE = {
    ("sd3-medium", 2): dict(group_size=16, batch_size=32, fake_batch_size=2, bp_batch_size=1),
    ("sd3.5-medium", 2): dict(bp_batch_size=1),
    ("tiny-sd3", 2): dict(group_size=16, batch_size=32, fake_batch_size=2),
    # mini-sd3 (models.py, section 7): CPU-sized, a few minutes per stage on 2 cores. Stage 2's w_bp is
    # the paper's 1e-4 times the latent-size ratio 16*64*64 / (8*8*8) = 128, rounded: beta_eff of the
    # back-prop term grows with D (subgrpo.py, section 6), so the same beta needs a larger weight here.
    ("mini-sd3", 1): dict(steps=1200, batch_size=16, lr_gen=1e-4, lr_fake=1e-4, fake_update_ratio=5, ema_decay=0.95, log_every=20),
    ("mini-sd3", 2): dict(steps=40, batch_size=32, group_size=8, num_batches_per_epoch=2, lr_gen=3e-5, lr_fake=1e-4,
                          w_bp=1e-2),
    ("flux2", 2): dict(group_size=24, batch_size=96, lr_fake=1e-6, fake_batch_size=2, bp_batch_size=2),
    ("flux2", 1): dict(lr_gen=1e-6, lr_fake=1e-6),
}
# --quality (toy, stage 1): the longer recipe of README "Stage 1: what limits the 4-step generator",
# aimed at the three causes measured there. Four times the iterations with a cosine decay and a
# longer EMA; the last step drawn 9 times as often as each other step (3/4 of the generator updates,
# sample.random_stop); and the DMD direction without its per-sample normalisation, which leaves mass
# on the bridges between modes. The last two depart from the paper, so the demo keeps its recipe.
QUALITY = dict(steps=36000, ema_decay=0.9995, last_stop_weight=9.0, lr_cosine=True, grad_norm=False)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PAPER_GPUS = {"sd3-medium": 16, "sd3.5-medium": 8, "flux2-klein-4b": 16}  # stage 2; stage 1 plans 8 x 9
# The paper's prompt sets (official code: dataset/, read by rtdmd/data/prompt_dataset.py)
PAPER_PROMPTS = {1: "the PickScore prompt set, dataset/pickscore/train.txt (25,432 prompts)",
                 2: "the GenEval training metadata, dataset/geneval/train_metadata.jsonl"}


def get_args(argv=None):
    """The options, in --help sections; None = the backbone's default (resolve_defaults)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="toy", help="toy | " + " | ".join(models.BACKBONES[1:]))
    g.add_argument("--pretrained", default=None, help="hub id or local folder (default: paper's)")
    g.add_argument("--generator-pretrained", default=None, help="FLUX.2: the generator's base (default: klein-4B)")
    g.add_argument("--resolution", type=int, default=None, help="image size (default: backbone's)")
    g.add_argument("--lora-rank", type=int, default=32, help="LoRA rank (alpha = 2 rank); 0 = full fine-tune")
    g.add_argument("--lora-dtype", default=None, choices=("bf16", "fp32"), help="trainable masters, AdamW and "
                   "EMA (default: bf16 on CUDA for real backbones, the official precision; else fp32)")
    g.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: backbone's)")
    g.add_argument("--toy-width", type=int, default=128, help="toy: hidden width of the velocity MLPs")
    g.add_argument("--toy-angles", type=int, default=None, metavar="K", help="toy: polar features (r, cos k phi, "
                   "sin k phi, k <= K) in the MLPs' input (default: toy 8, toy-gauss 0)")
    g.add_argument("--toy-exact-prefix", action="store_true", help="toy diagnostic: only the last step learns, "
                   "on exact samples of p_sigma(x|c)")
    g.add_argument("--toy-per-step", action="store_true", help="toy diagnostic: one MLP per step (models.ToySteps)")
    g = p.add_argument_group("both stages")
    g.add_argument("--prompts", default=None, help="real backbones, required: .txt (one a line) or .jsonl (a "
                   "\"prompt\" field, the rest kept as metadata); paper: pickscore/train.txt, geneval/train_metadata.jsonl")
    g.add_argument("--steps", type=int, default=None, help="total iterations (stage 1) / epochs (stage 2)")
    g.add_argument("--batch-size", type=int, default=None, help="global batch (ranks x --grad-accum); stage 2: "
                   "images per sampling iteration = prompts x K (default SD3-M 32, SD3.5-M 72, FLUX.2 96)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="N", help="micro-batches per update")
    g.add_argument("--lr-gen", type=float, default=None)
    g.add_argument("--lr-fake", type=float, default=None)
    g.add_argument("--fake-update-ratio", type=int, default=None, help="TTUR: fake steps per generator step")
    g.add_argument("--ema-decay", type=float, default=None)
    g.add_argument("--eta", type=float, default=0.9, help="CPS stochasticity")
    g.add_argument("--consistency-weight", type=float, default=1e-2)
    g.add_argument("--no-move-scale-out", dest="move_scale_out", action="store_false",
                   help="unweighted fake loss, not the official min(1, 10 sigma_ts^2)")
    g.add_argument("--no-grad-norm", dest="grad_norm", action="store_false", help="unnormalised DMD direction")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g = p.add_argument_group("stage 1 (AC-DMD)")
    g.add_argument("--lr-cosine", action="store_true", help="cosine learning rates, to 0 at --steps")
    g.add_argument("--plain-dmd", action="store_true", help="ablation: x0_hat of every step at s = 0 (DMD2)")
    g.add_argument("--last-stop-weight", type=float, default=None, metavar="W", help="draw the stop with W times "
                   "the others' probability on the last step (default 1: uniform, the paper's)")
    g.add_argument("--quality", action="store_true", help="toy: the longer recipe, train.QUALITY (about 12 "
                   "minutes on one core; flags given beside it still win, except the two switches it sets)")
    g.add_argument("--tilt-teacher", type=float, default=None, metavar="BETA",
                   help="toy: the exact tilted teacher p exp(BETA r) (stage 1 alone must land on the tilted target)")
    add_stage2_args(p)
    add_run_args(p)
    return p.parse_args(argv)


def add_stage2_args(p):
    g = p.add_argument_group("stage 2 (RTDMD)")
    g.add_argument("--group-size", type=int, default=None, help="K: images per prompt (a GRPO group)")
    g.add_argument("--num-batches-per-epoch", type=int, default=None, help="sub-batches of the one optimiser step")
    g.add_argument("--w-pg", type=float, default=None, help="policy-gradient (PPO) weight; paper 1; 0 drops it")
    g.add_argument("--w-dm", type=float, default=None, help="final-step AC-DMD weight; paper 1e-3; 0 drops it")
    g.add_argument("--w-bp", type=float, default=None, help="reward back-prop weight; paper 1e-4; 0 drops it")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="stage-2 generator AdamW")
    g.add_argument("--clip-range", type=float, default=1e-5, help="PPO ratio clip")
    g.add_argument("--adv-clip", type=float, default=5.0)
    g.add_argument("--bp-margin", type=float, default=3.0)
    g.add_argument("--bp-batch-size", type=int, default=None, help="back-prop chunk, images (memory; the same "
                   "gradient); 0 = the sub-batch (default: SD3-M, SD3.5-M 1, FLUX.2 2, toy and SD3 twins 0)")
    g.add_argument("--fake-batch-size", type=int, default=None, help="stage-2 fake-score chunk (memory); 0 = all "
                   "(default: toy 0, SD3-M 2, SD3.5-M 8, FLUX.2 2)")
    g.add_argument("--ema-schedule", default="official", choices=("official", "once"), help="official: the decay "
                   "after every sub-batch when it fires (subgrpo.stage2_ema_decays); once: once per firing")
    g.add_argument("--logprob", default="official", choices=("official", "exact"), help="subgrpo.cps_log_prob")
    g.add_argument("--all-steps", action="store_true", help="train all stochastic steps, not 2 of 3")
    g.add_argument("--no-shared-noise", dest="shared_noise", action="store_false",
                   help="independent noise on the untrained steps too")
    g.add_argument("--exact-decomposition", action="store_true", help="toy check of the hybrid gradient: "
                   "unnormalised DM, exact log-prob, no clipping (--model toy-gauss --reward linear)")
    # A real backbone scores with clipscore + hpsv2 + pickscore + geneval (weight 1 each, per-reward
    # advantages) and back-propagates the first three; only the rewards in use are loaded.
    g = p.add_argument_group("rewards (stage 2; checkpoints: hub id or local path, rewards.DEFAULT_SOURCES)")
    g.add_argument("--rewards", default=None, metavar="NAME,NAME", help="real backbones: the GRPO rewards "
                   "(default: clipscore,hpsv2,pickscore,geneval; geneval needs the GenEval .jsonl as --prompts)")
    g.add_argument("--reward", default="quadratic", choices=("quadratic", "linear"),
                   help="toy reward: -(1/2)|x - (2,0)|^2 or x_1 (rewards.py)")
    rewards.add_source_args(g)


def add_run_args(p):
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/toy", help="run folder (config, log, checkpoints)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=None)
    g.add_argument("--save-every", type=int, default=1000)
    g.add_argument("--max-bad-updates", type=int, default=3, help="stop after this many skipped (non-finite) "
                   "updates of one network in a row")
    g.add_argument("--profile", type=int, default=0, metavar="N", help="2 warm-up steps, N steps under "
                   "torch.profiler, then stop: phase table, profile_stage{1,2}.json, Chrome trace")
    g.add_argument("--bf16", type=int, default=None, help="bf16 autocast (+ frozen weights on CUDA); default: CUDA")
    g.add_argument("--grad-ckpt", type=int, default=None, help="gradient checkpointing (default: on with CUDA)")
    g.add_argument("--cache-text-embeddings", action="store_true", help="encode the --prompts once, then move the "
                   "text encoders to the CPU (models.DiffusersBackbone.cache_text_embeddings)")
    g.add_argument("--timeout-hours", type=float, default=3.0, help="process-group timeout (official "
                   "NCCL_TIMEOUT_SEC): covers a rank loading alone while the others wait")
    g = p.add_argument_group("memory plan (offline, meta device, nothing trained)")
    g.add_argument("--memory-plan", action="store_true", help="print the plan per GPU; non-zero above --gpu-memory")
    g.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default: the paper's)")
    g.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU the plan must fit in")


def resolve_defaults(args, cuda):
    """Fill every None option with its backbone's default; after this, nothing changes args."""
    toy = args.model.startswith("toy")
    d = DEFAULTS[("toy" if toy else "real") + ("2" if args.stage == 2 else "")]
    if toy:
        d = d | dict(fake_batch_size=0, bp_batch_size=0, guidance=1.0)  # g = 1: the CFG teacher is p(x|c)
    else:
        spec = models.SPECS[args.model]  # (family, ..., guidance, resolution)
        d = d | dict(guidance=spec[3], resolution=spec[4])
        d = d | PER_BACKBONE.get((args.model, args.stage), PER_BACKBONE.get((spec[0], args.stage), {}))
    # toy_angles: polar input features (models.ToyMLP). LoRA bf16 on CUDA: the official LoRA takes
    # the bf16 base's dtype (diffusers add_adapter) and the paper's learning rates were tuned so;
    # fp32 on CPU (slow bf16 matmuls) and for the toy (tuned in fp32).
    d |= dict(toy_angles=8 if args.model == "toy" else 0, bf16=int(cuda), grad_ckpt=int(cuda),
              lora_dtype="bf16" if cuda and not toy else "fp32", last_stop_weight=1.0)
    if args.quality:  # two switches (store_true / store_false) are set; the rest fill only what is None
        d |= QUALITY
        args.lr_cosine, args.grad_norm = QUALITY["lr_cosine"], QUALITY["grad_norm"]
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.stage == 2 and args.exact_decomposition:  # every term an exact multiple of a gradient (subgrpo.py, section 7)
        args.grad_norm, args.logprob, args.clip_range, args.adv_clip = False, "exact", float("inf"), float("inf")
    return args


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def setup(args):
    """Process group, device, resolved defaults, the run context. DDP when torchrun sets RANK (nanoGPT)."""
    if args.model not in models.BACKBONES:
        sys.exit(f"error: unknown --model {args.model!r}; choose one of: {', '.join(models.BACKBONES)}")
    if args.last_stop_weight is not None and not args.last_stop_weight > 0:
        sys.exit(f"error: --last-stop-weight {args.last_stop_weight} must be positive (1 draws the stop uniformly)")
    if args.quality and (args.model != "toy" or args.stage != 1):
        sys.exit("error: --quality is the toy's stage-1 recipe; drop it here (stage 2 starts from the stage1.pt "
                 "in --out whatever recipe trained it)")
    if args.cache_text_embeddings and args.model.startswith("toy"):
        sys.exit(f"error: --model {args.model} has no text encoders; drop --cache-text-embeddings")
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()
    rank, world, local = 0, 1, 0
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=args.timeout_hours))
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        # TF32, as the official rtdmd/trainers/base_trainer.py: the float32 parts (LoRA, CPS and
        # log-prob math) on tensor cores with a 10-bit mantissa, still finer than the autocast's bf16
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args = resolve_defaults(args, cuda)
    if args.grad_accum < 1 or args.batch_size % (world * args.grad_accum):
        sys.exit(f"error: --batch-size {args.batch_size} does not divide across {world} ranks x --grad-accum "
                 f"{args.grad_accum}; use a multiple of {world * args.grad_accum}")
    check_run_folder(args, rank == 0)
    return run_context(args, device, rank, world, ddp)


def run_context(args, device, rank=0, world=1, ddp=False):
    """The state every phase function reads (its first parameter). Draws all ranks agree on (stop,
    renoise levels, consistency deltas, stage-2 prompts) come from shared_rng, seeded alike
    everywhere: a broadcast from rank 0 without the communication (README, "Deviations and choices")."""
    return SimpleNamespace(args=args, device=device, rank=rank, world=world, ddp=ddp, master=rank == 0, bb=None,
                           autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16)),
                           shared_rng=torch.Generator().manual_seed(args.seed + 12345), guard=UpdateGuard(args),
                           ckpt_path=os.path.join(args.out, f"stage{args.stage}.pt"), streams=None)


def load_backbone(ctx, prompts, metadata):
    """Rank 0 loads first (building and caching the toy's base or a tiny twin in the run folder);
    the others after a barrier. Frozen weights bf16 on CUDA with --bf16, else float32; the
    trainable masters --lora-dtype (models.LoRALinear)."""
    a = ctx.args
    kw = dict(cache_dir=a.out, device=ctx.device, dtype=torch.bfloat16 if a.bf16 and ctx.device.type == "cuda"
              else torch.float32, pretrained=a.pretrained, generator_pretrained=a.generator_pretrained,
              resolution=a.resolution, lora_rank=a.lora_rank, lora_alpha=2 * a.lora_rank,  # scale 2, as the paper
              gradient_checkpointing=bool(a.grad_ckpt), width=a.toy_width, angles=a.toy_angles,
              exact_prefix=a.toy_exact_prefix, per_step=a.toy_per_step)
    if prompts is not None:
        kw |= dict(prompts=prompts, prompt_metadata=metadata)
    if not a.model.startswith("toy"):
        kw["lora_dtype"] = DTYPES[a.lora_dtype]
    bb = models.load(a.model, progress=True, **kw) if ctx.master else None
    if ctx.ddp:
        dist.barrier()
    return models.load(a.model, **kw) if bb is None else bb


def check_run_folder(args, master):
    """Refuse to mix runs: a folder made by another model, or resuming a missing run."""
    old = models.read_run_config(args.out, required=False)
    if old is not None and old.get("model") != args.model:
        sys.exit(f"error: {args.out} holds a run of --model {old.get('model')}, not {args.model}; "
                 f"pick another --out or pass --model {old.get('model')}")
    ckpt = os.path.join(args.out, f"stage{args.stage}.pt")
    if args.resume and not os.path.exists(ckpt):
        sys.exit(f"error: --resume given but {ckpt} does not exist; drop --resume to start stage {args.stage}")
    if not args.resume and os.path.exists(ckpt):
        sys.exit(f"error: {ckpt} exists; pass --resume to continue it, or choose a new --out "
                 "(nothing was overwritten)")
    if args.stage == 2 and not os.path.exists(os.path.join(args.out, "stage1.pt")):
        sys.exit(f"error: stage 2 starts from stage 1's EMA generator and fake score, but "
                 f"{os.path.join(args.out, 'stage1.pt')} does not exist; run "
                 f"`torchrun train.py --stage 1 --out {args.out}` first")


def read_training_prompts(args):
    """(prompts, metadata, prompt_files) of --prompts (the toy: None, None, {}). prompt_files, in
    config.json, records each stage's {file, sha256, count}; --resume refuses a changed file."""
    if args.model.startswith("toy"):
        if args.prompts:
            sys.exit(f"error: --model {args.model} has its own prompts; drop --prompts")
        return None, None, {}
    if not args.prompts:
        sys.exit(f"error: --prompts is required for --model {args.model}: pass a .txt or .jsonl prompt file; "
                 f"the paper's stage {args.stage} trains on {PAPER_PROMPTS[args.stage]} of the official code")
    try:
        prompts, metadata = models.read_prompt_file(args.prompts)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: --prompts: {e}")
    new, key = {"file": args.prompts, "sha256": models.file_sha256(args.prompts), "count": len(prompts)}, f"stage{args.stage}"
    files = (models.read_run_config(args.out, required=False) or {}).get("prompt_files") or {}
    old = files.get(key)
    if args.resume and old and old["sha256"] != new["sha256"]:
        sys.exit(f"error: --resume with --prompts {args.prompts} (sha256 {new['sha256'][:12]}), but stage "
                 f"{args.stage} of {args.out} started with {old['file']} (sha256 {old['sha256'][:12]}); "
                 "pass that file to continue this run")
    print0(f"stage {args.stage} prompts: {args.prompts} ({len(prompts):,} prompts, sha256 {new['sha256']})")
    return prompts, metadata, files | {key: new}


def tilt_toy_teacher(bb, args):
    """Reference mode: the toy teacher becomes p(x|c) exp(beta r(x)) / Z_beta(c) in closed form
    (rewards.py), so stage 1 alone converges to the tilted target (DMD's fixed point is the teacher)."""
    if not args.model.startswith("toy") or args.stage != 1:
        sys.exit("error: --tilt-teacher is a toy, stage-1 option (the tilt is closed-form only there)")
    bb.mixture = make_reward(args)[0].tilt(bb.mixture, args.tilt_teacher)
    bb.teacher = models.ExactVelocity(bb.mixture).eval().requires_grad_(False)


# --- parameters, students, EMA ---------------------------------------------------------------


def raw(net):
    """The module inside a DDP wrapper (for no-grad calls, EMA and checkpoints)."""
    return net.module if isinstance(net, DDP) else net


def trainable(net):
    """The parameters that train (LoRA, or every weight of the toy and of a full fine-tune)."""
    return [p for p in raw(net).parameters() if p.requires_grad]


def count(net, only_trainable=True):
    return sum(p.numel() for p in raw(net).parameters() if p.requires_grad or not only_trainable)


def uses_lora(bb):
    return getattr(bb, "lora_rank", 0) > 0  # the toy and full fine-tuning (lora_rank 0) do not


def students(args, generator, fake, weight_decay):
    """The trained networks of a stage: generator, fake score, the generator's EMA, their AdamW."""
    adamw = lambda net, lr, wd: torch.optim.AdamW(trainable(net), lr=lr, betas=(0.9, 0.999), eps=1e-8,  # noqa: E731
                                                  weight_decay=wd)
    return SimpleNamespace(generator=generator, fake=fake, ema=ema_copy(generator),
                           opt_g=adamw(generator, args.lr_gen, weight_decay), opt_f=adamw(fake, args.lr_fake, 0.0))


def wrap_ddp(net, device):
    # broadcast_buffers=False: the buffers (SD3.5's 432 MiB pos_embed) are frozen and equal on
    # every rank; DDP would re-send them on every forward (the official stage 2 turns it off too)
    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


@contextlib.contextmanager
def seeded(device, seed):
    """The block draws from the global RNG seeded `seed`, in a fork: the caller's stream is kept."""
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def ema_copy(net):
    """A copy of `net` with new trainable tensors and shared frozen ones (a LoRA base is the teacher's)."""
    frozen = [p for p in net.parameters() if not p.requires_grad] + list(net.buffers())
    ema = copy.deepcopy(net, {id(t): t for t in frozen})
    return ema.eval().requires_grad_(False)


@phase("EMA")
@torch.no_grad()
def ema_update(ema, net, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta, on the trainable tensors only."""
    for p_ema, p in zip(ema.parameters(), raw(net).parameters()):
        if p.requires_grad:
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)


def run_end(args, start):
    """The counter this session stops at: --steps, or with --profile N the warm-up and N steps."""
    return start + PROFILE_WARMUP + args.profile if args.profile else args.steps


# --- checkpoints -----------------------------------------------------------------------------
# What an exact --resume needs: each net's trainable tensors, optimisers, counter, every rank's RNG
# state, shared_rng, config and a generator checksum per rank (the DDP tests compare replicas).
# Tensors and plain types only (torch.load weights_only=True). Rank 0 writes the gathered parts.

NETS, OPTS = ("generator", "fake", "ema"), ("opt_g", "opt_f")


def saved_names(m):
    """The tensors saved per net: its trainable ones (the EMA copy, requires_grad off, takes the generator's)."""
    gen = [n for n, p in raw(m.generator).named_parameters() if p.requires_grad]
    return {k: gen if k == "ema" else [n for n, p in raw(getattr(m, k)).named_parameters() if p.requires_grad]
            for k in NETS}


def rank_state(ctx, m, counter):
    """This rank's part of a checkpoint: RNG states and generator checksum. Non-finite weights are
    never written: every rank stops here, the checkpoint on disk stays the last good one."""
    bad = [k for k, names in saved_names(m).items()
           if not all(torch.isfinite(raw(getattr(m, k)).get_parameter(n)).all() for n in names)]
    if bad:
        at = " ".join(f"{k} {v}" for k, v in counter.items())
        sys.exit(f"error: the {', '.join(bad)} weights are not finite at {at}; nothing was saved, {ctx.ckpt_path} "
                 f"still holds the last good checkpoint: resume from it with a lower learning rate")
    rng = {"torch": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    checksum = sum(float((p.detach().double().flatten() * torch.arange(1, p.numel() + 1, device=p.device)).sum())
                   for p in trainable(m.generator))
    return {"rng": rng | ({"streams": ctx.streams} if ctx.streams else {}), "checksum": checksum}


def gather_objects(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank (a collective: every rank calls it)."""
    out = [obj] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(out, obj)
    return out


@phase("checkpoint")
def save_checkpoint(path, extra, m, ranks, args, shared_rng):
    """Rank 0 writes `extra` (counter; stage 2's stage-1 weights), m's nets and optimisers and the
    gathered rank states, synced under a temporary name, then renamed; the previous one stays as
    stage{1,2}.prev.pt (a hard link). `path` is always one complete checkpoint, even if killed."""
    ck = {"replica_checksums": [r["checksum"] for r in ranks]}
    for key, names in saved_names(m).items():
        sd = raw(getattr(m, key)).state_dict()
        ck[key] = {k: sd[k].detach().cpu().clone() for k in names}
    ck |= {k: getattr(m, k).state_dict() for k in OPTS}
    ck |= {"rng": [r["rng"] for r in ranks], "shared_rng": shared_rng.get_state(), "config": vars(args)}
    tmp, prev = path + ".tmp", previous_checkpoint(path)
    with open(tmp, "wb") as f:
        torch.save(ck | extra, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before it can replace anything
    if os.path.exists(path):
        if os.path.exists(prev):
            os.remove(prev)
        try:
            os.link(path, prev)  # a second name for the current file: the rename below keeps it
        except OSError:  # a filesystem without hard links: a copy, renamed into place
            shutil.copyfile(path, prev + ".tmp")
            os.replace(prev + ".tmp", prev)
    os.replace(tmp, path)


def load_checkpoint(path, m, shared_rng, rank):
    """Restore save_checkpoint's file into m, this rank's RNG and shared_rng; returns the dict."""
    ck = read_checkpoint(path)
    for key in NETS:
        raw(getattr(m, key)).load_state_dict(ck[key], strict=False)
    for key in OPTS:
        getattr(m, key).load_state_dict(ck[key])
    torch.set_rng_state(ck["rng"][rank]["torch"])
    if "cuda" in ck["rng"][rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state(ck["rng"][rank]["cuda"])
    shared_rng.set_state(ck["shared_rng"])
    return ck


def previous_checkpoint(path):
    return path[:-len(".pt")] + ".prev.pt"


def read_checkpoint(path):
    """models.load_checkpoint, with its refusal (or an unreadable file) as one error line."""
    try:
        return models.load_checkpoint(path)
    except (ValueError, RuntimeError, EOFError) as e:
        prev = previous_checkpoint(path)
        hint = f"; the previous checkpoint is {prev}" if os.path.exists(prev) else ""
        sys.exit(f"error: {' '.join(str(e).split())}{hint}")


# --- update guard, log, exported files ------------------------------------------------------


class UpdateGuard:
    """A non-finite loss or gradient (on any rank) skips the update (logged as "skipped");
    --max-bad-updates of one network in a row stop the run in one line, before anything is saved."""

    def __init__(self, args):
        self.limit, self.ckpt_path = args.max_bad_updates, os.path.join(args.out, f"stage{args.stage}.pt")
        self.total, self.in_a_row, self.now = 0, {}, []

    @phase("optimiser step")
    def step(self, name, opt, params, loss, grad_clip):
        """Clip to grad_clip and step, unless loss or norm is not finite; returns the norm before
        clipping. `if ok` is the update's one host sync (a skip is decided before the step)."""
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        loss = torch.as_tensor(loss.detach() if torch.is_tensor(loss) else loss, device=norm.device)
        ok = torch.isfinite(norm) & torch.isfinite(loss)
        if dist.is_initialized():  # a rank-local inf loss with a finite gradient: all ranks skip
            ok = ok.float()
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            ok = ok.bool()
        if ok:
            opt.step()
            self.in_a_row[name] = 0
        else:
            opt.zero_grad(set_to_none=True)
            self.total += 1
            self.in_a_row[name] = self.in_a_row.get(name, 0) + 1
            self.now.append(name)
        return norm.detach()

    def note(self, rec):
        """Add this iteration's skipped updates to its log record (and reset them)."""
        rec["skipped_total"] = self.total
        if self.now:
            rec["skipped"], self.now = self.now, []
        return rec

    def stop_if_stuck(self, where):
        """Exit once a network had --max-bad-updates skipped updates in a row (where: "epoch 3")."""
        for name, n in self.in_a_row.items():
            if n >= self.limit:
                sys.exit(f"error: {n} {name} updates in a row had a non-finite loss or gradient (the last at "
                         f"{where}); each was skipped and nothing was saved since, so {self.ckpt_path} "
                         "holds the last good state: resume from it with --resume and a lower learning rate")


class RunLog:
    """Rank 0's progress bar and log.jsonl; on other ranks every call does nothing."""

    def __init__(self, args, master, desc, start, end):
        self.args, self.master, self.desc, self.t0, self.end = args, master, desc, time.time(), end
        if master:
            from tqdm import tqdm
            path = os.path.join(args.out, "log.jsonl")
            if start and os.path.exists(path):
                self.drop_records_after(path, args.stage, start)
            self.file = open(path, "a")
            self.bar = tqdm(total=end, initial=start, desc=desc, dynamic_ncols=True)

    @staticmethod
    def drop_records_after(path, stage, start):
        """On resume from `start`: drop this stage's later records (a killed run's, maybe a cut
        line), so the log reads as one run. Rewritten under a temporary name, then renamed."""
        key, kept = ("step" if stage == 1 else "epoch"), []
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the line a kill cut short
                    continue
                if rec.get("stage") != stage or rec.get(key, 0) <= start:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)

    def record(self, rec, step, **postfix):
        """Advance the bar; every log_every-th step (and the last) append rec to log.jsonl and show
        `postfix` ({label: key}). Device tensors reach the host here, on log steps, in one transfer."""
        if not self.master:
            return
        self.bar.update(1)
        if step % self.args.log_every == 0 or step == self.end or rec.get("skipped"):
            keys = [k for k, v in rec.items() if torch.is_tensor(v)]
            if keys:
                rec |= dict(zip(keys, torch.stack([rec[k].float().reshape(()) for k in keys]).tolist()))
            rec["time"] = round(time.time() - self.t0, 2)
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
            self.bar.set_postfix({label: rec[key] if isinstance(rec[key], int) else f"{rec[key]:.4f}"
                                  for label, key in postfix.items()})

    def close(self):
        if self.master:
            self.bar.close()
            self.file.close()
            print0(f"{self.desc} done in {time.time() - self.t0:.1f}s -> {self.args.out}")


def write_samples_and_exports(args, bb, ema, stage, master):
    """Rank 0, at the end: samples_stage{1,2}.png of the EMA generator (toy: scatter; images: grid)
    and, for real backbones, a file a stock pipeline loads (pipe.load_lora_weights on the
    generator's base): generator_ema_lora.safetensors (stage 1), generator_ema_stage2_lora
    .safetensors (the stage-2 LoRA alone, on the merged stage 1: models.load_run(run, 2)); a full
    fine-tune (lora_rank 0) uses save_pretrained."""
    if not master or args.model == "toy-gauss":  # toy-gauss: nothing to draw or export
        return
    if args.model == "toy":
        sample.toy_scatter_png(bb, ema, os.path.join(args.out, f"samples_stage{stage}.png"))
        return
    name = "generator_ema" if stage == 1 else "generator_ema_stage2"
    if uses_lora(bb):
        models.save_lora(ema, os.path.join(args.out, f"{name}_lora.safetensors"))
    else:
        ema.save_pretrained(os.path.join(args.out, name))
    images = sample.generator_images(bb, ema, bb.prompts[:4], n=2, seed=42, eta=args.eta)
    sample.save_grid(images, os.path.join(args.out, f"samples_stage{stage}.png"), nrow=2)


# --- profiler (--profile N): where the time of a training step goes ---------------------------

PROFILE_WARMUP = 2  # steps before profiling starts (allocator, caches, lazy initialisation)


def profiled_steps(ctx, m, start, end):
    """The loop's counter. With --profile N: PROFILE_WARMUP steps, then N under torch.profiler,
    timed between device syncs, each forward of a network a range "call K" (K: its kind, whose
    first inputs are kept for the bare replay); then the table (profile_report)."""
    yield from range(start, start + PROFILE_WARMUP if ctx.args.profile else end)
    if not ctx.args.profile:
        return
    nets = dict(generator=raw(m.generator), fake=raw(m.fake), teacher=ctx.bb.teacher)
    if hasattr(ctx.bb, "pipe"):  # image backbones: the text encoders and the VAE decoder too
        nets |= {k: v for k, v in ctx.bb.pipe.components.items() if k.startswith("text_encoder")}
        nets["vae decoder"] = ctx.bb.pipe.vae.decoder
    calls, ranges, times, cuda = {}, [], [], ctx.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda *_: None)
    keep = lambda x: x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x  # noqa: E731

    def enter(name, module, a, kw):  # kind = (net, with grad, input shapes)
        xs = [x for x in (*a, *kw.values()) if torch.is_tensor(x)]
        key = (name, torch.is_grad_enabled() and any(t.requires_grad for t in (*module.parameters(), *xs)),
               tuple(tuple(x.shape) for x in xs))
        calls.setdefault(key, (module, [keep(x) for x in a], {k: keep(v) for k, v in kw.items()}))
        ranges.append(torch.profiler.record_function(f"call {list(calls).index(key)}").__enter__())
    hooks = [h for name, net in nets.items() for h in (
        net.register_forward_pre_hook(lambda *x, name=name: enter(name, *x), with_kwargs=True),
        net.register_forward_hook(lambda *_: ranges.pop().__exit__(None, None, None), with_kwargs=True))]
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    with torch.profiler.profile() as prof:  # CPU, and CUDA where there is one
        for step in range(start + PROFILE_WARMUP, end):
            sync(ctx.device)
            t0 = time.perf_counter()
            yield step
            sync(ctx.device)
            times.append(time.perf_counter() - t0)
    for h in hooks:
        h.remove()
    profile_report(ctx, prof, calls, times)


def bare_seconds(module, a, kw, grad, autocast):
    """One kind of call replayed bare (forward; with grad, backward of its output's sum): the
    median of torch.utils.benchmark's blocked_autorange."""
    def run():
        with torch.set_grad_enabled(grad):
            with autocast:
                out = module(*a, **kw)
            if grad:
                (out[0] if isinstance(out, (tuple, list)) else out).float().sum().backward()
        module.zero_grad(set_to_none=True)
    timer = benchmark.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.1).median


def profile_report(ctx, prof, calls, times):
    """Per phase, from the profiler's event tree: its own time (minus the phases nested in it; the
    rest is "other", so rows add up to the step), share, network calls per step (fwd; bwd: with
    grad) and the seconds those calls take bare. A second ratio leaves out the reward models'
    phases (not replayed). Rank 0 writes profile_stage{1,2}.json and a Chrome trace."""
    a, n, kinds = ctx.args, len(times), list(calls)
    bare = [bare_seconds(*calls[k], k[1], ctx.autocast) for k in kinds]
    own, made = {"other": sum(times)}, {}  # seconds per phase; {phase: [call K, ...]}

    def walk(e, ph):  # ph: the innermost phase around e
        if e.name in PHASES:
            own[e.name], own[ph] = own.get(e.name, 0.0) + e.cpu_time_total / 1e6, own[ph] - e.cpu_time_total / 1e6
            ph = e.name
        elif e.name.startswith("call "):
            made.setdefault(ph, []).append(int(e.name[5:]))
        for c in e.cpu_children:
            walk(c, ph)
    for e in prof.events():
        if e.cpu_parent is None:
            walk(e, "other")
    rows = [dict(phase=p, seconds_per_step=t / n, share=t / sum(times), forward_calls=len(made.get(p, [])) / n,
                 backward_calls=sum(kinds[k][1] for k in made.get(p, [])) / n,
                 bare_seconds_per_step=sum(bare[k] for k in made.get(p, [])) / n)
            for p, t in sorted(own.items(), key=lambda kv: -kv[1])]
    ratio = lambda rs: sum(r["seconds_per_step"] for r in rs) / max(sum(r["bare_seconds_per_step"] for r in rs), 1e-12)  # noqa: E731
    backbone = [r for r in rows if r["phase"] not in ("rewards", "back-prop term")]
    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # on CPU: the peak resident set
    out = dict(stage=a.stage, model=a.model, steps_profiled=n, warmup=PROFILE_WARMUP, step_seconds=sum(times) / n,
               bare_seconds=sum(r["bare_seconds_per_step"] for r in rows), step_over_bare=ratio(rows),
               backbone_phases_over_bare=ratio(backbone), peak_memory_gib=peak / 2 ** 30, phases=rows)
    if not ctx.master:
        return
    print(f"\nprofile, stage {a.stage}, {a.model}: {n} steps after {PROFILE_WARMUP} warm-up, {out['step_seconds']:.4f} "
          f"s/step on {ctx.device}\n{'phase':<26}{'s/step':>10}{'share':>8}{'fwd':>7}{'bwd':>7}{'bare s/step':>13}")
    for r in rows:
        print(f"{r['phase']:<26}{r['seconds_per_step']:>10.4f}{r['share']:>8.1%}{r['forward_calls']:>7.1f}"
              f"{r['backward_calls']:>7.1f}{r['bare_seconds_per_step']:>13.4f}")
    print(f"step time / bare network passes: {out['step_seconds']:.4f} / {out['bare_seconds']:.4f} = "
          f"{out['step_over_bare']:.2f}x (without the reward-model phases: {ratio(backbone):.2f}x)\n"
          f"peak memory {out['peak_memory_gib']:.2f} GiB", flush=True)
    json.dump(out, open(os.path.join(a.out, f"profile_stage{a.stage}.json"), "w"), indent=2)
    prof.export_chrome_trace(os.path.join(a.out, f"profile_stage{a.stage}.trace.json"))  # chrome://tracing, Perfetto


# --- memory plan (--memory-plan) ----------------------------------------------------------------
# Networks on the meta device from configs/architectures.json (offline); activations = the bytes
# autograd saves in the training calls (bb.velocity, bb.decode, reward towers), saved_tensors_hooks.

GiB = 2 ** 30
ARCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "architectures.json")
REWARD_TOWERS = {"clipscore": "clip-vit-l-14", "hpsv2": "clip-vit-h-14", "pickscore": "clip-vit-h-14"}


def build_meta(cfg, dtype, device="meta"):
    """A diffusers / transformers module from {"class": ..., **kwargs}, on meta (or `device`)."""
    import diffusers
    import transformers
    cfg = dict(cfg)
    cls = cfg.pop("class")
    with torch.device(device):
        if hasattr(diffusers, cls):
            net = getattr(diffusers, cls)(**cfg)
        else:
            conf = getattr(transformers, {"CLIPModel": "CLIPConfig", "T5EncoderModel": "T5Config",
                                          "Qwen3ForCausalLM": "Qwen3Config"}.get(cls, "CLIPTextConfig"))
            net = getattr(transformers, cls)(conf(**cfg))
    return net.to(dtype).eval().requires_grad_(False)


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the unique storages autograd saves (not parameters). As the students' checkpointing
    function it runs blocks plainly but books them apart: without checkpointing outside + all
    blocks; with it outside + kept block inputs + the largest block (recomputed in backward)."""

    def __init__(self, *nets):
        super().__init__(self.pack, lambda t: t)
        self.skip = {t.untyped_storage()._cdata for n in nets for t in list(n.parameters()) + list(n.buffers())}
        self.outside = self.inputs = self.blocks = self.largest = 0
        self.seen, self.block = set(), None

    def pack(self, t):
        key = t.untyped_storage()._cdata
        if key not in self.skip and key not in self.seen:
            self.seen.add(key)
            if self.block is None:
                self.outside += t.untyped_storage().nbytes()
            else:
                self.block += t.untyped_storage().nbytes()
        return t

    def checkpoint(self, module, *a):
        self.inputs += sum(x.untyped_storage().nbytes() for x in a if torch.is_tensor(x) and x.requires_grad)
        self.block = 0
        out = module(*a)
        self.blocks, self.largest, self.block = self.blocks + self.block, max(self.largest, self.block), None
        return out

    def total(self, ckpt):
        return self.outside + (self.inputs + self.largest if ckpt else self.blocks)


class FlashAttention(torch.autograd.Function):
    """Fused attention's saved tensors (q, k, v, out, float32 log-sum-exp), not meta's L x L scores."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def plan_sdpa(*a, **kw):
    q, k, v = (list(a) + [kw.get(n) for n in ("query", "key", "value")[len(a):]])[:3]
    return FlashAttention.apply(q, k, v)


def meta_backbone(name, arch, resolution, dtype, lora_rank, device="meta", text=True, lora_dtype=torch.float32):
    """A backbone without pipeline: make_student, velocity, decode, noise, sampler (cond: meta_cond)."""
    family = models.SPECS[name][0]
    bb = object.__new__(models.SD3Backbone if family == "sd3" else models.Flux2Backbone)
    vae = build_meta(arch["vae-" + family], dtype, device)
    bb.pipe = argparse.Namespace(vae=vae)
    bb.name, bb.device, bb.dtype, bb.resolution = name, torch.device(device), dtype, resolution
    bb.lora_rank, bb.lora_alpha, bb.gradient_checkpointing, bb.lora_dtype = lora_rank, 2 * lora_rank, False, lora_dtype
    bb.guidance, bb.prompts = models.SPECS[name][3], list(models.DEFAULT_PROMPTS)
    bb.teacher = build_meta(arch[name], dtype, device)
    bb.generator_base = build_meta(arch[name], dtype, device) if family == "flux2" else bb.teacher
    bb.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for the real VAEs
    side = resolution // (bb.vae_scale * (1 if family == "sd3" else 2))
    bb.latent_shape = (bb.teacher.config.in_channels, side, side)
    bb.sigmas = models.sd3_sigmas(shift=3.0) if family == "sd3" else models.flux2_sigmas(resolution=16 * side)
    names = ("clip-l-text", "clip-g-text", "t5-xxl") if family == "sd3" else ("qwen3-4b",)
    bb.text_encoders = [build_meta(arch[t], dtype, device) for t in names if t in arch and text]
    return bb


def meta_cond(bb, n, length=None):
    """Text conditioning of n prompts with the real shapes (random values off meta)."""
    c, d = bb.teacher.config, dict(device=bb.device, dtype=bb.dtype)
    if bb.family == "sd3":  # CLIP 77 + T5 128 tokens, pooled CLIP-L + CLIP-G
        return {"prompt_embeds": torch.randn(n, length or 205, c.joint_attention_dim, **d),
                "pooled_projections": torch.randn(n, c.pooled_projection_dim, **d)}
    return {"prompt_embeds": torch.randn(n, length or 512, c.joint_attention_dim, **d),
            "txt_ids": torch.zeros(n, length or 512, 4, dtype=torch.long, device=bb.device)}


def velocity_bytes(bb, net, n, ckpt, cond=None, x=None):
    """Bytes saved by one bb.velocity(net, x, sigma, cond) with grad, n samples (meta or real)."""
    count = SavedBytes(net)
    net.enable_gradient_checkpointing(count.checkpoint)
    x = torch.empty(n, *bb.latent_shape, device=bb.device) if x is None else x
    with count, torch.autocast("cuda", torch.bfloat16, enabled=bb.dtype == torch.bfloat16):
        bb.velocity(net, x, torch.full((n,), 0.5, device=bb.device), cond or meta_cond(bb, n))
    net.disable_gradient_checkpointing()
    return count.total(ckpt)


def bp_bytes(bb, towers, n):
    """Bytes saved by the reward back-prop of n images: VAE decode + each BP tower's image side."""
    x = torch.empty(n, *bb.latent_shape, device=bb.device, requires_grad=True)
    count = SavedBytes(bb.pipe.vae, *towers)
    with count:
        img = bb.decode(x)
        for m in towers:
            m.get_image_features(pixel_values=rewards.preprocess(img, 224).to(m.dtype))
    return count.outside


def plan_phases(args, bb, b, towers):
    """Activation bytes per phase of one rank's step, b samples per micro-batch (the fake score at b
    and its consistency pair at 2b, the generator's last step)."""
    gen, fake = bb.make_student("generator", stage=args.stage), bb.make_student("fake", stage=args.stage)
    fwd = lambda net, k: velocity_bytes(bb, net, k, bool(args.grad_ckpt))  # noqa: E731
    fake_bytes = lambda k: fwd(fake, k) + (fwd(fake, 2 * k) if args.consistency_weight else 0)  # noqa: E731
    if args.stage == 1:
        return gen, {"fake-score step": fake_bytes(b), "generator step": fwd(gen, b)}
    bp = bp_bytes(bb, towers, args.bp_batch_size or b) if args.w_bp else 0
    return gen, {"rollouts (no grad)": 0, "fake-score step": fake_bytes(args.fake_batch_size or b * args.num_batches_per_epoch),
                 "generator step (PPO)": fwd(gen, b), "generator step (DM + back-prop)": fwd(gen, b) + bp}


def memory_plan(args, arch=None):
    """Print the per-GPU plan; return 0 if the peak fits in --gpu-memory GiB, else a message."""
    resolve_defaults(args, cuda=True)
    arch, world = arch or json.load(open(ARCH)), args.gpus or (PAPER_GPUS.get(args.model, 8) if args.stage == 2 else 8)
    if args.batch_size % (world * args.grad_accum):
        return f"error: --batch-size {args.batch_size} does not split over --gpus {world} x --grad-accum {args.grad_accum}"
    b, dtype = args.batch_size // (world * args.grad_accum), torch.bfloat16 if args.bf16 else torch.float32
    F_sdpa, torch.nn.functional.scaled_dot_product_attention = torch.nn.functional.scaled_dot_product_attention, plan_sdpa
    try:
        bb = meta_backbone(args.model, arch, args.resolution, dtype, args.lora_rank, text=not args.cache_text_embeddings,
                           lora_dtype=DTYPES[args.lora_dtype])
        names = args.rewards.split(",") if args.rewards else list(rewards.GRPO_WEIGHTS)
        towers = [build_meta(arch[REWARD_TOWERS[n]], torch.float32) for n in names if n in REWARD_TOWERS] \
            if args.stage == 2 else []
        gen, phases = plan_phases(args, bb, b, towers)
    finally:
        torch.nn.functional.scaled_dot_product_attention = F_sdpa
    size = lambda *nets: sum(t.numel() * t.element_size() for t in {  # noqa: E731
        id(t): t for n in nets for t in list(n.parameters()) + list(n.buffers())}.values())
    # stage 2: the stage-1 LoRA merged, new weight tensors for the targeted Linears, per student
    merged = 2 * sum(m.weight.numel() * m.weight.element_size() for m in models.lora_layers(gen).values()) \
        if args.stage == 2 else 0
    lora = sum(p.numel() for p in trainable(gen))
    rows = {"weights: transformer(s) + VAE": size(bb.teacher, bb.generator_base, bb.pipe.vae) + merged,
            "weights: text encoders" + (" (cached: off GPU)" if args.cache_text_embeddings else ""): size(*bb.text_encoders),
            "weights: reward towers (float32)": size(*towers) if towers else 0,
            # per net: master, grad and AdamW's two moments, all in the master dtype; one EMA
            f"LoRA (2 nets) + grads + AdamW + EMA, {args.lora_dtype}": lora * (2 if args.lora_dtype == "bf16" else 4) * (2 * 4 + 1)}
    static, ck = sum(rows.values()), bool(args.grad_ckpt)
    print(f"memory plan per GPU | {args.model} stage {args.stage} | {world} GPU(s) x {b} samples x grad-accum "
          f"{args.grad_accum} = batch {args.batch_size} | {args.resolution} px | LoRA r {args.lora_rank} "
          f"({lora / 1e6:.2f} M per net) | grad ckpt {ck} | {str(dtype)[6:]}")
    for k, v in rows.items():
        print(f"  {k:<48} {v / GiB:7.2f} GiB")
    for k, v in phases.items():
        print(f"  activations: {k:<35} {v / GiB:7.2f} GiB  -> {(static + v) / GiB:6.2f} GiB")
    peak = max(phases, key=phases.get)
    args.planned_gib = total = (static + phases[peak]) / GiB
    print(f"  peak: {peak}, {total:.2f} GiB of --gpu-memory {args.gpu_memory:g} GiB")
    if total <= args.gpu_memory:
        return 0
    batch = "raise --grad-accum (or lower --batch-size)"
    fix = {"fake-score step": "lower --fake-batch-size to 1" if args.stage == 2 else batch,
           "generator step (DM + back-prop)": "lower --bp-batch-size to 1, then " + batch}.get(peak, batch)
    return (f"error: the plan's peak ({total:.1f} GiB, {peak}) exceeds --gpu-memory {args.gpu_memory:g}; {fix}"
            + ("" if ck else ", or turn on --grad-ckpt 1") + ("" if args.cache_text_embeddings else ", or pass --cache-text-embeddings"))


if __name__ == "__main__":
    main()
