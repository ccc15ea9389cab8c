"""
train.py -- both stages of RTDMD, one process or many.

    python train.py --stage 1                                  # toy, one process (CPU)
    torchrun --standalone --nproc_per_node 2 train.py --stage 1 --out runs/toy
    torchrun --standalone --nproc_per_node 2 train.py --stage 2 --out runs/toy
    torchrun --nproc_per_node 8 train.py --stage 1 --model sd3.5-medium --out runs/sd35
    python train.py --stage 1 --model tiny-sd3 --out runs/tiny --steps 20 --batch-size 2  # CPU
    torchrun --nproc_per_node 8 train.py --stage 2 --model sd3.5-medium --out runs/sd35 \
        --clip-l-path ckpt/clip-vit-large-patch14 --pickscore-path ckpt/PickScore_v1 ...  # rewards

Stage 1 (AC-DMD, ALGORITHM.md 4.6) trains the 4-step generator to match the teacher on every
sub-interval of the sampler. Stage 2 (RTDMD, ALGORITHM.md 5) adds the reward term.
Defaults are the paper's for the real backbones and CPU-sized for the toy. Each run folder holds
config.json, log.jsonl, stage{1,2}.pt (atomic, resumable with --resume) and samples.

Reading order: set-up (args, DDP, models) -> stage-1 loop -> stage-2 loop.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import acdmd
import models
import rewards
import sample
import subgrpo

# ---------------------------------------------------------------------------------------------
# Arguments. None means "the backbone's default" (resolved in resolve_defaults).
# ---------------------------------------------------------------------------------------------

# Paper values per backbone (ALGORITHM.md 4.7, 5.10) and CPU-sized values for the toy.
DEFAULTS = {
    "toy": dict(steps=3000, batch_size=512, lr_gen=1e-3, lr_fake=1e-3, fake_update_ratio=5,
                ema_decay=0.99, log_every=50),
    "real": dict(steps=15000, batch_size=72, lr_gen=3e-5, lr_fake=3e-5, fake_update_ratio=10,
                 ema_decay=0.99, log_every=10),
    # stage 2: steps = epochs, batch_size = images per sampling iteration (prompts x K, global).
    # Real: the paper's (ALGORITHM.md 5.10, SD3.5-M). Toy: tuned to be stable (ALGORITHM.md 9.4).
    "toy2": dict(steps=400, batch_size=48, lr_gen=3e-5, lr_fake=1e-3, fake_update_ratio=1,
                 ema_decay=0.9, log_every=10, group_size=16, num_batches_per_epoch=4,
                 w_pg=1.0, w_dm=3.0, w_bp=0.1),
    # real2 = SD3.5-M; the other backbones differ only as in STAGE2_PER_BACKBONE.
    "real2": dict(steps=1000, batch_size=72, lr_gen=3e-6, lr_fake=3e-5, fake_update_ratio=1,
                  ema_decay=0.9, log_every=1, group_size=24, num_batches_per_epoch=16,
                  w_pg=1.0, w_dm=1e-3, w_bp=1e-4, fake_batch_size=8, bp_batch_size=0),
}
# Stage-2 differences between the real backbones (ALGORITHM.md 5.3, 5.10). batch_size is the
# global number of images per sampling iteration (prompts x K): SD3-M 16 GPUs x 2 = 2 prompts x 16,
# SD3.5-M 8 x 9 = 3 x 24, FLUX.2 16 x 6 = 4 x 24. Chunk sizes are per rank; bp_batch_size 0 = the
# whole sub-batch at once. The tiny twins take their family's values.
STAGE2_PER_BACKBONE = {
    "sd3-medium": dict(group_size=16, batch_size=32, fake_batch_size=2),
    "tiny-sd3": dict(group_size=16, batch_size=32, fake_batch_size=2),
    "flux2": dict(group_size=24, batch_size=96, lr_fake=1e-6, fake_batch_size=2, bp_batch_size=2),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--model", default="toy", help="toy | " + " | ".join(models.BACKBONES[1:]))
    p.add_argument("--pretrained", default=None, help="hub id or local folder (default: paper's)")
    p.add_argument("--generator-pretrained", default=None,
                   help="FLUX.2: the generator's base (default: the distilled klein-4B)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: backbone's)")
    p.add_argument("--lora-rank", type=int, default=32, help="LoRA rank (alpha = 2 rank); 0 = full fine-tune")
    p.add_argument("--prompts", default=None, help="real backbones: text file, one training prompt "
                   "a line, e.g. the paper's pickscore train.txt (default: 8 built-in prompts)")
    p.add_argument("--out", default="runs/toy", help="run folder (config, log, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--steps", type=int, default=None, help="total iterations (stage 1) / epochs (stage 2)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (split across ranks); stage 2: "
                   "images per sampling iteration = prompts x K (default SD3-M 32, SD3.5-M 72, FLUX.2 96)")
    p.add_argument("--lr-gen", type=float, default=None)
    p.add_argument("--lr-fake", type=float, default=None)
    p.add_argument("--fake-update-ratio", type=int, default=None, help="TTUR: fake steps per generator step")
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: backbone's)")
    p.add_argument("--eta", type=float, default=0.9, help="CPS stochasticity")
    p.add_argument("--consistency-weight", type=float, default=1e-2)
    p.add_argument("--no-move-scale-out", dest="move_scale_out", action="store_false",
                   help="unweighted fake loss instead of the shipped min(1, 10 sigma_ts^2) weight")
    p.add_argument("--plain-dmd", action="store_true",
                   help="ablation: match x0_hat of every step at s = 0 (DMD2), not the sub-interval")
    p.add_argument("--no-grad-norm", dest="grad_norm", action="store_false",
                   help="do not normalise the DMD direction per sample")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--toy-width", type=int, default=128, help="toy: hidden width of the velocity MLPs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--bf16", type=int, default=None,
                   help="bf16 autocast, plus bf16 frozen weights on CUDA (default: on with CUDA)")
    p.add_argument("--grad-ckpt", type=int, default=None, help="gradient checkpointing (default: on with CUDA)")
    # stage 2 (ALGORITHM.md 5); None = the backbone's default (DEFAULTS "toy2" / "real2")
    p.add_argument("--group-size", type=int, default=None, help="K: images per prompt (a GRPO group); "
                   "default toy 16, SD3-M 16, SD3.5-M and FLUX.2 24")
    p.add_argument("--num-batches-per-epoch", type=int, default=None,
                   help="sampling iterations per epoch = sub-batches of the one optimiser step")
    p.add_argument("--reward", default="quadratic", choices=("quadratic", "linear"),
                   help="toy reward: -(1/2)|x - (2,0)|^2 or x_1 (rewards.py)")
    p.add_argument("--w-pg", type=float, default=None, help="policy-gradient (PPO) weight; paper 1")
    p.add_argument("--w-dm", type=float, default=None, help="final-step AC-DMD weight; paper 1e-3")
    p.add_argument("--w-bp", type=float, default=None, help="reward back-prop weight; paper 1e-4")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="stage-2 generator AdamW")
    p.add_argument("--clip-range", type=float, default=1e-5, help="PPO ratio clip")
    p.add_argument("--adv-clip", type=float, default=5.0)
    p.add_argument("--bp-margin", type=float, default=3.0)
    p.add_argument("--bp-batch-size", type=int, default=None,
                   help="reward back-prop: decode + score this many images at a time (memory); "
                   "0 = the whole sub-batch (default: 0, FLUX.2 2)")
    p.add_argument("--fake-batch-size", type=int, default=None,
                   help="stage-2 fake-score step: chunk size of the epoch's rollouts (memory); "
                   "0 = all at once (default: toy 0, SD3-M 2, SD3.5-M 8, FLUX.2 2)")
    p.add_argument("--logprob", default="official", choices=("official", "exact"), help="ALGORITHM.md 5.4")
    p.add_argument("--no-dm", action="store_true", help="ablation: drop the final-step DM term")
    p.add_argument("--no-bp", action="store_true", help="ablation: drop reward back-prop")
    p.add_argument("--no-pg", action="store_true", help="ablation: drop the policy gradient")
    p.add_argument("--all-steps", action="store_true", help="train all stochastic steps, not 2 of 3")
    p.add_argument("--no-shared-noise", dest="shared_noise", action="store_false",
                   help="independent noise on the untrained steps too")
    p.add_argument("--exact-decomposition", action="store_true",
                   help="ALGORITHM.md 9.6 mode 2: unnormalised DM, REINFORCE with group-mean baseline, "
                   "exact log-prob, no clipping (use with --model toy-gauss --reward linear)")
    p.add_argument("--tilt-teacher", type=float, default=None, metavar="BETA",
                   help="toy, stage 1: replace the teacher by the exact tilted teacher p exp(BETA r) "
                   "(ALGORITHM.md 9.6 reference mode)")
    # Stage 2 on a real backbone scores images with clipscore + hpsv2 + pickscore (GRPO, weight 1
    # each, per-reward advantages) and back-propagates the same three (rewards.training_rewards).
    # Only the slots those use matter: clip_l, pickscore(_tokenizer), hpsv2(_tokenizer, _config).
    rewards.add_source_args(p.add_argument_group(
        "stage-2 reward checkpoints (real backbones; hub id or local path, rewards.DEFAULT_SOURCES)"))
    return p.parse_args(argv)


def resolve_defaults(args, cuda):
    d = DEFAULTS[("toy" if args.model.startswith("toy") else "real") + ("2" if args.stage == 2 else "")]
    if args.model.startswith("toy"):
        d = d | dict(fake_batch_size=0, bp_batch_size=0)
    elif args.stage == 2:
        family = models.SPECS[args.model][0]
        d = d | STAGE2_PER_BACKBONE.get(args.model, STAGE2_PER_BACKBONE.get(family, {}))
    elif models.SPECS[args.model][0] == "flux2":
        # FLUX.2-klein: stage-1 lr 1e-6 for both nets (ALGORITHM.md 4.7); stage 2 above
        d = d | dict(lr_gen=1e-6, lr_fake=1e-6)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.bf16 is None:
        args.bf16 = int(cuda)
    if args.grad_ckpt is None:
        args.grad_ckpt = int(cuda)
    return args


# ---------------------------------------------------------------------------------------------
# Small helpers: printing, EMA, checkpoints
# ---------------------------------------------------------------------------------------------


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def raw(net):
    """The module inside a DDP wrapper (for no-grad calls, EMA and checkpoints)."""
    return net.module if isinstance(net, DDP) else net


def ema_copy(net):
    """The EMA model: a copy of `net` whose trainable tensors are new and whose frozen ones are
    shared (a LoRA student's base weights are the teacher's; copying them would double memory)."""
    frozen = [p for p in net.parameters() if not p.requires_grad] + list(net.buffers())
    ema = copy.deepcopy(net, {id(t): t for t in frozen})
    return ema.eval().requires_grad_(False)


def count(net, trainable=True):
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable)


@torch.no_grad()
def ema_update(ema, net, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta, on the trainable tensors only."""
    for p_ema, p in zip(ema.parameters(), raw(net).parameters()):
        if p.requires_grad:
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)


def trainable_state(net, names):
    """State dict restricted to `names` (the trainable tensors: LoRA, or all for the toy)."""
    sd = raw(net).state_dict()
    return {k: sd[k].detach().cpu().clone() for k in names}


def rng_state():
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def gather_rng(world):
    """Every rank's RNG state, gathered to all (each rank draws its own noise)."""
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return states


def log_record(rec, step, args, t0, log, pbar, **postfix):
    """Rank 0, after every iteration / epoch: advance the bar; every log_every-th (and the last)
    appends the record to log.jsonl and shows `postfix` on the bar."""
    pbar.update(1)
    if step % args.log_every == 0 or step == args.steps:
        rec["time"] = round(time.time() - t0, 2)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        pbar.set_postfix(**postfix)


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_run_folder(args, master):
    """Refuse to mix runs: a folder made by another model, or resuming a missing run."""
    cfg_path = os.path.join(args.out, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
        if old.get("model") != args.model:
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


# ---------------------------------------------------------------------------------------------
# Set-up: DDP, backbone, models, optimisers
# ---------------------------------------------------------------------------------------------


def setup(argv=None):
    args = get_args(argv)
    if args.model not in models.BACKBONES:
        sys.exit(f"error: unknown --model {args.model!r}; choose one of: {', '.join(models.BACKBONES)}")
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    args = resolve_defaults(args, cuda)
    master = rank == 0
    if args.batch_size % world:
        sys.exit(f"error: --batch-size {args.batch_size} does not divide across {world} ranks; "
                 f"use a multiple of {world}")
    check_run_folder(args, master)
    return args, ddp, rank, world, device, master


def main(argv=None):
    args, ddp, rank, world, device, master = setup(argv)
    # Stage 2 loads its reward models first: a missing checkpoint fails here, in one line, before
    # the backbone loads and before anything in the run folder is written.
    reward = make_reward(args, device) if args.stage == 2 else None
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed + rank)  # per-rank noise
    # Draws that every rank must agree on (random stop, renoise levels, consistency deltas) come
    # from this generator, seeded identically everywhere: the same numbers as a broadcast from
    # rank 0 (ALGORITHM.md 8.15), without the communication.
    shared = torch.Generator().manual_seed(args.seed + 12345)

    # The toy's base model (and a tiny twin) is made once by rank 0 and cached in the run folder.
    # Frozen weights are bf16 on CUDA with --bf16 (the paper's precision), float32 on CPU; LoRA
    # parameters are always float32 (models.LoRALinear).
    dtype = torch.bfloat16 if args.bf16 and device.type == "cuda" else torch.float32
    load_kw = dict(cache_dir=args.out, device=device, dtype=dtype, pretrained=args.pretrained,
                   generator_pretrained=args.generator_pretrained, resolution=args.resolution,
                   lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank,  # scale 2, as the paper
                   gradient_checkpointing=bool(args.grad_ckpt),
                   width=args.toy_width)
    if args.prompts:
        with open(args.prompts) as f:
            load_kw["prompts"] = [line.strip() for line in f if line.strip()]
    if master:
        bb = models.load(args.model, progress=True, **load_kw)
    if ddp:
        dist.barrier()
    if not master:
        bb = models.load(args.model, **load_kw)
    if args.guidance is None:
        args.guidance = bb.guidance
    if args.resolution is None:
        args.resolution = getattr(bb, "resolution", None)
    if master:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(vars(args) | {"world_size": world}, f, indent=2)
    if args.tilt_teacher is not None:
        tilt_toy_teacher(bb, args)
    if args.stage == 1:
        nets = train_stage1(args, bb, ddp, rank, world, device, master, shared)
    else:
        nets = train_stage2(args, bb, ddp, rank, world, device, master, shared, reward)
    if ddp:
        dist.destroy_process_group()
    return nets  # the trained modules (tests compare them across ranks and runs)


# ---------------------------------------------------------------------------------------------
# Stage 1: AC-DMD (ALGORITHM.md 4.6, pseudocode 4.8)
# ---------------------------------------------------------------------------------------------


def subinterval_start(sim, plain_dmd):
    """(x_s, s) for the losses. AC-DMD: the CPS output of the last executed step, at its level
    s = sigma_{k+1}. Plain DMD (ablation): x0_hat of that step at s = 0, as in DMD2."""
    if plain_dmd:
        return sim["x0_hat"], 0.0
    return sim["x_next"].float(), sim["sigma_next"]


def train_stage1(args, bb, ddp, rank, world, device, master, shared):
    B = args.batch_size // world
    nsteps = len(bb.sigmas) - 1
    # Every rank must start from the same LoRA init (random A): draw it from the same seed
    # everywhere, in a side RNG, so the per-rank streams below stay as they were.
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        generator = bb.make_student("generator")
        fake = bb.make_student("fake")
    gen_names = [n for n, p in generator.named_parameters() if p.requires_grad]
    fake_names = [n for n, p in fake.named_parameters() if p.requires_grad]
    ema = ema_copy(generator)
    opt_g = torch.optim.AdamW([p for p in generator.parameters() if p.requires_grad], lr=args.lr_gen,
                              betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt_f = torch.optim.AdamW([p for p in fake.parameters() if p.requires_grad], lr=args.lr_fake,
                              betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    step = 0
    ckpt_path = os.path.join(args.out, "stage1.pt")
    if args.resume:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        generator.load_state_dict(ck["generator"], strict=False)
        fake.load_state_dict(ck["fake"], strict=False)
        ema.load_state_dict(ck["ema"], strict=False)
        opt_g.load_state_dict(ck["opt_g"])
        opt_f.load_state_dict(ck["opt_f"])
        step = ck["step"]
        set_rng_state(ck["rng"][rank])
        shared.set_state(ck["shared_rng"])
    if ddp:
        generator = DDP(generator, device_ids=[device.index] if device.type == "cuda" else None)
        fake = DDP(fake, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16))
    null_cond = bb.encode([""] * B)

    print0(f"stage 1 (AC-DMD{', plain-DMD ablation' if args.plain_dmd else ''}) | model {args.model} | "
           f"world {world} x {B} = {args.batch_size} samples/iter | sigmas {[round(float(s), 5) for s in bb.sigmas]}\n"
           f"  fake step every iter, generator step every {args.fake_update_ratio} "
           f"-> {args.steps // args.fake_update_ratio} generator updates in {args.steps} iters | "
           f"lr G {args.lr_gen} F {args.lr_fake} | CFG {args.guidance} | eta {args.eta} | "
           f"bf16 {bool(args.bf16)} | grad ckpt {bool(args.grad_ckpt)} | start at {step}\n"
           f"  trainable params: generator {count(raw(generator)):,} of {count(raw(generator), False):,}, "
           f"fake {count(raw(fake)):,} of {count(raw(fake), False):,}"
           + (f" (LoRA rank {args.lora_rank})" if args.model != "toy" and args.lora_rank else ""))

    def save(step):
        states = gather_rng(world)  # collective: every rank calls it
        if master:
            save_atomic({"generator": trainable_state(generator, gen_names),
                         "fake": trainable_state(fake, fake_names),
                         "ema": trainable_state(ema, gen_names),
                         "opt_g": opt_g.state_dict(), "opt_f": opt_f.state_dict(),
                         "step": step, "rng": states, "shared_rng": shared.get_state(),
                         "config": vars(args)}, ckpt_path)

    def draw_batch():
        idx = torch.randint(0, len(bb.prompts), (B,))
        prompts = [bb.prompts[i] for i in idx]
        return prompts, bb.encode(prompts)

    log = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    pbar = None
    if master:
        from tqdm import tqdm
        pbar = tqdm(total=args.steps, initial=step, desc="stage 1", dynamic_ncols=True)
    t0 = time.time()
    while step < args.steps:
        rec = {"stage": 1, "step": step + 1}
        _, cond = draw_batch()

        # --- fake-score update, every iteration (ALGORITHM.md 4.4) ---
        stop = int(torch.randint(1, nsteps + 1, (1,), generator=shared))
        with torch.no_grad(), autocast:
            sim = sample.backward_simulation(bb, raw(generator), bb.noise(B), cond, stop, eta=args.eta)
        x_s, s = subinterval_start(sim, args.plain_dmd)
        tau = acdmd.sample_renoise_timesteps(s, B, generator=shared)
        t, n, x_t = acdmd.make_subinterval(x_s, s, tau)
        with autocast:
            loss_f, st = acdmd.fake_score_loss(bb, fake, x_s.detach(), s, t, n, x_t, cond,
                                               args.move_scale_out, args.consistency_weight, args.eta,
                                               generator=shared)
        opt_f.zero_grad(set_to_none=True)
        loss_f.backward()
        rec["fake_grad_norm"] = torch.nn.utils.clip_grad_norm_(fake.parameters(), args.grad_clip).item()
        opt_f.step()
        rec |= {"fake_loss": loss_f.item(), "fake_stop": stop} | st

        # --- generator update, every fake_update_ratio-th iteration (TTUR, ALGORITHM.md 4.6) ---
        if (step + 1) % args.fake_update_ratio == 0:
            stop = int(torch.randint(1, nsteps + 1, (1,), generator=shared))
            with autocast:
                sim = sample.backward_simulation(bb, generator, bb.noise(B), cond, stop, eta=args.eta)
            x_s, s = subinterval_start(sim, args.plain_dmd)
            tau = acdmd.sample_renoise_timesteps(s, B, generator=shared)
            t, n, x_t = acdmd.make_subinterval(x_s, s, tau)
            with autocast:
                loss_g, st = acdmd.generator_loss(bb, raw(fake), x_s, s, t, x_t, cond, null_cond,
                                                  args.guidance, args.eta, args.grad_norm)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            rec["gen_grad_norm"] = torch.nn.utils.clip_grad_norm_(generator.parameters(), args.grad_clip).item()
            opt_g.step()
            rec |= {"gen_loss": loss_g.item(), "gen_stop": stop} | st

        ema_update(ema, generator, args.ema_decay)  # every iteration, not every G step (8.13)
        step += 1
        if master:
            log_record(rec, step, args, t0, log, pbar, fake=f"{rec['fake_loss']:.4f}")
        if step % args.save_every == 0 or step == args.steps:
            save(step)
    if master:
        pbar.close()
        log.close()
        print0(f"stage 1 done in {time.time() - t0:.1f}s -> {ckpt_path}")
        if args.model == "toy":
            sample.toy_scatter_png(bb, ema, os.path.join(args.out, "samples_stage1.png"))
        elif not args.model.startswith("toy"):  # toy-gauss: nothing to export
            export_stage1(args, bb, ema)
    return {"generator": raw(generator), "fake": raw(fake), "ema": ema}


def export_stage1(args, bb, ema):
    """Real backbones: the EMA generator as a file a stock diffusers pipeline loads
    (`pipe.load_lora_weights(run/generator_ema_lora.safetensors)`, on the generator's base: for
    FLUX.2 the distilled klein-4B, not the teacher; a full fine-tune is saved with save_pretrained
    instead), and a grid of 4-step samples of the EMA generator, one row per prompt."""
    if models.lora_layers(ema):
        models.save_lora(ema, os.path.join(args.out, "generator_ema_lora.safetensors"))
    else:
        ema.save_pretrained(os.path.join(args.out, "generator_ema"))
    images = sample.generator_images(bb, ema, bb.prompts[:4], n=2, seed=42, eta=args.eta)
    sample.save_grid(images, os.path.join(args.out, "samples_stage1.png"), nrow=2)


# ---------------------------------------------------------------------------------------------
# Stage 2: RTDMD (ALGORITHM.md 5, pseudocode 5.11)
# ---------------------------------------------------------------------------------------------


def make_reward(args, device=None):
    """(reward, bp_reward, weights). reward(images, prompts) -> {name: Tensor[B]} scores the
    rollouts (advantages); bp_reward is its differentiable part, back-propagated through the last
    step; weights {name: w} says which names count and how much (ALGORITHM.md 5.5, 5.7).
    Real backbones: the paper's set (rewards.GRPO_WEIGHTS: clipscore, hpsv2, pickscore, weight 1
    each; geneval is not implemented) from the --<slot>-path checkpoints, every model loaded now;
    a missing one exits with one line."""
    if args.model.startswith("toy"):  # the "images" are the 2-D points themselves
        r = rewards.QuadraticReward(1.0, (2.0, 0.0)) if args.reward == "quadratic" else rewards.LinearReward((1.0, 0.0))
        return r, r, {r.name: 1.0}
    try:
        grpo, bp = rewards.training_rewards(rewards.sources_from_args(args))
        rewards.preflight(grpo, device)  # bp shares grpo's models: this loads both
    except (FileNotFoundError, NotImplementedError, ValueError, RuntimeError) as e:
        sys.exit(f"error: stage-2 reward model: {' '.join(str(e).split())}")
    return grpo, bp, dict(rewards.GRPO_WEIGHTS)


def tilt_toy_teacher(bb, args):
    """Reference mode (ALGORITHM.md 9.6, mode 1): the toy teacher becomes the exact tilted teacher
    p(x|c) exp(beta r(x)) / Z_beta(c), closed form (rewards.py). Stage 1 then converges to the tilted
    target with no reward term at all, since the DMD fixed point is "generator = teacher"."""
    if not args.model.startswith("toy") or args.stage != 1:
        sys.exit("error: --tilt-teacher is a toy, stage-1 option (the tilt is closed-form only there)")
    bb.mixture = make_reward(args)[0].tilt(bb.mixture, args.tilt_teacher)
    bb.teacher = models.ExactVelocity(bb.mixture).eval().requires_grad_(False)


def uses_lora(bb):
    return getattr(bb, "lora_rank", 0) > 0  # the toy and full fine-tuning (lora_rank 0) do not


def init_stage2_models(bb, ck):
    """Stage 2 starts from stage 1's EMA generator and its fake score (ALGORITHM.md 5.1).
    Toy and full fine-tuning (lora_rank 0): every parameter is trainable and simply loaded.
    LoRA backbones: the stage-1 LoRA (generator: its EMA; fake: the fake score's) is merged into
    a copy of the base weights, and a fresh trainable LoRA is injected on top (A ~ N(0, 1), B = 0,
    pitfall 8.14), so both nets start as their stage-1 functions and only the new LoRA trains.
    The caller seeds the RNG: every rank must draw the same fresh A."""
    if uses_lora(bb):
        return (bb.make_student("generator", stage=2, merge=ck["ema"]),
                bb.make_student("fake", stage=2, merge=ck["fake"]))
    generator, fake = bb.make_student("generator"), bb.make_student("fake")
    generator.load_state_dict(ck["ema"], strict=False)
    fake.load_state_dict(ck["fake"], strict=False)
    return generator, fake


def export_stage2(args, bb, ema):
    """Real backbones: the stage-2 EMA generator as `generator_ema_stage2_lora.safetensors` (the
    stage-2 LoRA only; a full fine-tune is saved with save_pretrained instead) and a sample grid.
    The stage-2 LoRA was trained on top of the stage-1 EMA LoRA *merged* into the base, so
    inference applies both, in order (ALGORITHM.md 3.4, 7): merge generator_ema_lora.safetensors
    (stage 1) into the generator's base, then generator_ema_stage2_lora.safetensors, e.g.
        net = bb.make_student("generator", stage=2, merge=[stage1_file, stage2_file])
    (models.load_run(run, 2) does the same from stage2.pt)."""
    if uses_lora(bb):
        models.save_lora(ema, os.path.join(args.out, "generator_ema_stage2_lora.safetensors"))
    else:
        ema.save_pretrained(os.path.join(args.out, "generator_ema_stage2"))
    images = sample.generator_images(bb, ema, bb.prompts[:4], n=2, seed=42, eta=args.eta)
    sample.save_grid(images, os.path.join(args.out, "samples_stage2.png"), nrow=2)


def chunks(n, size):
    """Index ranges [0, n) in pieces of `size` (0 or None: one piece)."""
    size = size or n
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


def bp_surrogate(bb, bp_fn, weights, x0_hat, prompts, margin, chunk):
    """Reward back-prop through VAE and reward models, `chunk` images at a time (ALGORITHM.md 5.7).
    Each chunk is decoded and scored with grad w.r.t. a detached copy of x0_hat, and its backward
    runs at once, freeing that chunk's VAE and reward activations; the collected dL/dx0_hat then
    enters the generator's graph through the surrogate (g . x0_hat), whose gradient is exactly
    dL_BP/dtheta. Returns (surrogate, L_BP value)."""
    x = x0_hat.detach().requires_grad_(True)
    value, B = 0.0, len(x)
    for i in chunks(B, chunk):
        out = bp_fn(bb.decode(x[i]), [prompts[k] for k in i])
        l_bp, _ = subgrpo.bp_loss(sum(w * out[k] for k, w in weights.items() if k in out), margin)
        (l_bp * len(i) / B).backward()  # mean over the sub-batch = size-weighted chunk means
        value += l_bp.item() * len(i) / B
    return (x.grad * x0_hat).sum(), value


def all_gather_cat(x, world):
    """Concatenate a tensor from every rank, in rank order."""
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def allreduce_grads(params, world):
    """Average the locally accumulated gradients across ranks, once per optimiser step. (DDP
    would do this on every backward; one stage-2 step accumulates nb x |steps| backward calls.)"""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if world > 1:
            dist.all_reduce(p.grad)
            p.grad /= world


def train_stage2(args, bb, ddp, rank, world, device, master, shared, reward=None):
    if args.exact_decomposition:  # ALGORITHM.md 9.6 mode 2: every term an exact multiple of a gradient
        args.grad_norm, args.logprob, args.clip_range, args.adv_clip = False, "exact", float("inf"), float("inf")
    K, nb, last = args.group_size, args.num_batches_per_epoch, len(bb.sigmas) - 2
    if args.batch_size % K or args.batch_size % world:
        sys.exit(f"error: --batch-size {args.batch_size} (images per sampling iteration) must be a multiple "
                 f"of --group-size {K} and of the {world} ranks")
    M, B = args.batch_size // K, args.batch_size // world  # prompts per iteration, local images
    sig = [float(s) for s in bb.sigmas]
    # Built from stage1.pt, also on --resume (the stage-2 checkpoint holds only the new LoRA).
    ck1 = torch.load(os.path.join(args.out, "stage1.pt"), map_location="cpu", weights_only=False)
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + 2)  # the same fresh LoRA init on every rank, side RNG
        generator, fake = init_stage2_models(bb, ck1)
    gen_names = [n for n, p in generator.named_parameters() if p.requires_grad]
    fake_names = [n for n, p in fake.named_parameters() if p.requires_grad]
    gen_params = [p for p in generator.parameters() if p.requires_grad]
    fake_params = [p for p in fake.parameters() if p.requires_grad]
    ema = ema_copy(generator)
    opt_g = torch.optim.AdamW(gen_params, lr=args.lr_gen, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=args.weight_decay)
    opt_f = torch.optim.AdamW(fake_params, lr=args.lr_fake, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    reward_fn, bp_fn, weights = reward or make_reward(args, device)
    w_pg, w_dm, w_bp = (0.0 if off else w for off, w in
                        ((args.no_pg, args.w_pg), (args.no_dm, args.w_dm), (args.no_bp, args.w_bp)))
    epoch, ckpt_path = 0, os.path.join(args.out, "stage2.pt")
    # LoRA backbones: the merged stage-1 weights go into stage2.pt too, so that load_run and
    # --resume know what the stage-2 LoRA sits on (models.load_run's stage-2 contract).
    stage1 = {"stage1_ema": ck1["ema"], "stage1_fake": ck1["fake"]} if uses_lora(bb) else {}
    if args.resume:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for key in stage1:  # the stage-2 LoRA is meaningless on another stage-1 merge
            if ck[key].keys() != stage1[key].keys() or any(
                    not torch.equal(ck[key][k], stage1[key][k]) for k in stage1[key]):
                sys.exit(f"error: {os.path.join(args.out, 'stage1.pt')} is not the stage-1 checkpoint "
                         f"this stage-2 run started from ({key} differs); restore it or start stage 2 anew")
        for net, key in ((generator, "generator"), (fake, "fake"), (ema, "ema")):
            net.load_state_dict(ck[key], strict=False)
        opt_g.load_state_dict(ck["opt_g"])
        opt_f.load_state_dict(ck["opt_f"])
        epoch = ck["epoch"]
        set_rng_state(ck["rng"][rank])
        shared.set_state(ck["shared_rng"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16))
    null_cond = bb.encode([""] * B)
    n_steps = (last if args.all_steps else 2) + 1  # |S u {last}|
    E = nb * n_steps  # gradient-accumulation divisor, fixed even when a term is ablated (5.9)

    print0(f"stage 2 (RTDMD{', exact decomposition' if args.exact_decomposition else ''}) | model {args.model} | "
           f"reward {', '.join(weights)} | world {world}\n"
           f"  per sampling iter: {M} prompts x K {K} = {args.batch_size} images ({B}/rank) | {nb} iters/epoch "
           f"-> {nb * args.batch_size} images/epoch, one generator + one fake step per epoch\n"
           f"  trained steps: {'all of 0..' + str(last - 1) if args.all_steps else '2 of 0..' + str(last - 1)} + {last} "
           f"| accumulation {nb} x {n_steps} = {E} | weights PG {w_pg} DM {w_dm} BP {w_bp} | "
           f"log-prob {args.logprob} | DM normalised {args.grad_norm} | shared noise {args.shared_noise}\n"
           f"  lr G {args.lr_gen} (wd {args.weight_decay}) F {args.lr_fake} | clip {args.clip_range} | "
           f"epochs {args.steps} | bf16 {bool(args.bf16)} | start at {epoch}\n"
           f"  chunks: fake {args.fake_batch_size or 'all'}, BP {args.bp_batch_size or 'all'} | trainable: "
           f"generator {count(generator):,} of {count(generator, False):,}, fake {count(fake):,} of "
           f"{count(fake, False):,}" + (f" (fresh LoRA rank {args.lora_rank} on the merged stage-1 LoRA)"
                                         if uses_lora(bb) else ""))

    def save(epoch):
        states = gather_rng(world)
        # one checksum per rank: the replicas must stay bitwise identical (tests/test_train_stage2.py)
        sums = [None] * world
        mine = sum(float((p.detach().double().flatten() * torch.arange(1, p.numel() + 1, device=p.device)).sum())
                   for p in gen_params)
        if world > 1:
            dist.all_gather_object(sums, mine)
        else:
            sums[0] = mine
        if master:
            save_atomic({"replica_checksums": sums, "generator": trainable_state(generator, gen_names),
                         "fake": trainable_state(fake, fake_names), "ema": trainable_state(ema, gen_names),
                         "opt_g": opt_g.state_dict(), "opt_f": opt_f.state_dict(), "epoch": epoch,
                         "rng": states, "shared_rng": shared.get_state(), "config": vars(args)}
                        | stage1, ckpt_path)

    log = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    pbar = None
    if master:
        from tqdm import tqdm
        pbar = tqdm(total=args.steps, initial=epoch, desc="stage 2", dynamic_ncols=True)
    t0 = time.time()
    while epoch < args.steps:
        S = list(range(last)) if args.all_steps else subgrpo.select_steps(epoch, args.seed, last)
        # --- 1. rollouts (5.3). Prompts come from `shared`, so every rank knows the whole epoch's ---
        ro, prompts_global = [], []
        for _ in range(nb):
            idx = torch.randint(0, len(bb.prompts), (M,), generator=shared).repeat_interleave(K)
            prompts_global.append([bb.prompts[i] for i in idx[torch.randperm(M * K, generator=shared)]])
            mine = prompts_global[-1][rank * B:(rank + 1) * B]  # a group's K copies span the ranks
            cond = bb.encode(mine)
            with torch.no_grad(), autocast:
                r = subgrpo.rollout_with_logprob(bb, raw(generator), bb.noise(B), cond, mine, S, epoch,
                                                 args.eta, args.shared_noise, args.logprob)
            with torch.no_grad():
                r["rewards"] = reward_fn(bb.decode(r["x0"]), mine)
            ro.append(r | {"cond": cond})
        data = {k: torch.cat([r[k] for r in ro]) for k in ("latents", "next_latents", "log_probs", "x0")}
        cond = {k: torch.cat([r["cond"][k] for r in ro]) for k in ro[0]["cond"]}
        prompts = [p for ps in prompts_global for p in ps[rank * B:(rank + 1) * B]]

        # --- 2. advantages over the epoch (5.5): gather rewards in rank order, keep our shard ---
        gathered = {n: all_gather_cat(torch.cat([r["rewards"][n] for r in ro]).float(), world) for n in weights}
        order = [p for rk in range(world) for ps in prompts_global for p in ps[rk * B:(rk + 1) * B]]
        A_all = subgrpo.group_advantages(gathered, order, weights, normalize=not args.exact_decomposition)
        A = subgrpo.clip_advantages(A_all.view(world, -1)[rank], args.adv_clip).to(device)
        R_all = sum(w * gathered[n] for n, w in weights.items())
        rec = {"stage": 2, "epoch": epoch + 1, "steps": S, "reward_mean": R_all.mean().item(),
               "reward_std": R_all.std(unbiased=False).item(), "adv_mean": A_all.mean().item(),
               "adv_std": A_all.std(unbiased=False).item(), "adv_absmax": A_all.abs().max().item()}
        if len(weights) > 1:  # each reward's own mean (the advantages are per reward, 5.5)
            rec |= {f"reward_{n}": gathered[n].mean().item() for n in weights}

        # --- 3. one fake-score step on the epoch's clean outputs, s = 0, t rank-local (5.8), ---
        # in chunks of --fake-batch-size (memory), each weighted by its share of the samples
        x0 = data["x0"]
        t, n, x_t = acdmd.make_subinterval(x0, 0.0, acdmd.sample_renoise_timesteps(0.0, len(x0)))
        opt_f.zero_grad(set_to_none=True)
        rec["fake_loss"] = 0.0
        for i in chunks(len(x0), args.fake_batch_size):
            w = len(i) / len(x0)
            i_d = i.to(device)
            with autocast:
                loss_f, st = acdmd.fake_score_loss(bb, fake, x0[i_d], 0.0, t[i_d], n[i_d], x_t[i_d],
                                                   models.cond_select(cond, i_d), args.move_scale_out,
                                                   args.consistency_weight, args.eta)
            (loss_f * w).backward()
            rec["fake_loss"] += loss_f.item() * w
            for k, v in st.items():
                rec[k] = rec.get(k, 0.0) + v * w
        allreduce_grads(fake_params, world)
        rec["fake_grad_norm"] = torch.nn.utils.clip_grad_norm_(fake_params, args.grad_clip).item()
        opt_f.step()

        # --- 4. one generator step: sum over sub-batches and j in S u {last} (5.6, 5.7, 5.9) ---
        opt_g.zero_grad(set_to_none=True)
        perm, parts, ppo = torch.randperm(len(A)), {"loss_pg": 0.0, "loss_dm": 0.0, "loss_bp": 0.0}, []
        for b in range(nb):
            i = perm[b * B:(b + 1) * B]
            c_b, p_b = models.cond_select(cond, i.to(device)), [prompts[k] for k in i]
            for j in sorted(set(S) | {last}):
                x_j, x_next = data["latents"][i, j], data["next_latents"][i, j]
                with autocast:
                    if j != last and w_pg:  # score-function part: PPO on a stochastic step
                        lp = subgrpo.transition_log_prob(bb, generator, x_j, x_next, sig[j], sig[j + 1], c_b,
                                                         args.eta, args.logprob)
                        loss, st = subgrpo.ppo_loss(lp, data["log_probs"][i, j], A[i], args.clip_range)
                        loss = w_pg * loss
                        ppo.append(st)
                        parts["loss_pg"] += loss.item() / nb
                    elif j == last and (w_dm or w_bp):  # deterministic last step: DM + path-wise BP
                        x0_hat = subgrpo.final_step_x0(bb, generator, x_j, sig[j], c_b)
                        loss = 0.0
                        if w_dm:
                            t, _, x_t = acdmd.make_subinterval(x0_hat, 0.0, acdmd.sample_renoise_timesteps(0.0, B))
                            l_dm, st = acdmd.generator_loss(bb, raw(fake), x0_hat, 0.0, t, x_t, c_b, null_cond,
                                                            args.guidance, args.eta, args.grad_norm)
                            loss = loss + w_dm * l_dm
                            parts["loss_dm"] += w_dm * l_dm.item() / nb
                        if w_bp and 0 < args.bp_batch_size < B:  # chunked (memory), same gradient
                            l_bp, value = bp_surrogate(bb, bp_fn, weights, x0_hat, p_b, args.bp_margin,
                                                       args.bp_batch_size)
                            loss = loss + w_bp * l_bp
                            parts["loss_bp"] += w_bp * value / nb
                        elif w_bp:  # decode x0_hat with grad through the VAE, score, hinge (5.7)
                            out = bp_fn(bb.decode(x0_hat), p_b)
                            l_bp, st = subgrpo.bp_loss(sum(w * out[k] for k, w in weights.items() if k in out),
                                                       args.bp_margin)
                            loss = loss + w_bp * l_bp
                            parts["loss_bp"] += w_bp * l_bp.item() / nb
                    else:
                        continue
                (loss / E).backward()
        allreduce_grads(gen_params, world)
        rec["grad_norm"] = torch.nn.utils.clip_grad_norm_(gen_params, args.grad_clip).item()
        opt_g.step()
        if (epoch + 1) % 8 == 0:  # parameter EMA with warm-up, every 8 optimiser steps (5.1)
            ema_update(ema, generator, min((1 + epoch) / (10 + epoch), args.ema_decay))
        epoch += 1
        if ppo:
            rec |= {"ratio_mean": sum(s["ratio_mean"] for s in ppo) / len(ppo),
                    "ratio_min": min(s["ratio_min"] for s in ppo), "ratio_max": max(s["ratio_max"] for s in ppo),
                    "clip_frac": sum(s["clip_frac"] for s in ppo) / len(ppo)}
        rec |= parts
        if master:
            log_record(rec, epoch, args, t0, log, pbar, reward=f"{rec['reward_mean']:.3f}")
        if epoch % args.save_every == 0 or epoch == args.steps:
            save(epoch)
    if master:
        pbar.close()
        log.close()
        print0(f"stage 2 done in {time.time() - t0:.1f}s -> {ckpt_path}")
        if args.model == "toy":
            sample.toy_scatter_png(bb, ema, os.path.join(args.out, "samples_stage2.png"))
        elif not args.model.startswith("toy"):
            export_stage2(args, bb, ema)
    return {"generator": generator, "fake": fake, "ema": ema}


if __name__ == "__main__":
    main()
