"""
train.py -- both stages of RTDMD, one process or many.

    python train.py --stage 1                                  # toy, one process (CPU)
    torchrun --standalone --nproc_per_node 2 train.py --stage 1 --out runs/toy
    torchrun --standalone --nproc_per_node 2 train.py --stage 2 --out runs/toy
    torchrun --nproc_per_node 8 train.py --stage 1 --model sd3.5-medium --out runs/sd35
    python train.py --stage 1 --model tiny-sd3 --out runs/tiny --steps 20 --batch-size 2  # CPU

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
import sample

# ---------------------------------------------------------------------------------------------
# Arguments. None means "the backbone's default" (resolved in resolve_defaults).
# ---------------------------------------------------------------------------------------------

# Paper values per backbone (ALGORITHM.md 4.7, 5.10) and CPU-sized values for the toy.
DEFAULTS = {
    "toy": dict(steps=3000, batch_size=512, lr_gen=1e-3, lr_fake=1e-3, fake_update_ratio=5,
                ema_decay=0.99, log_every=50),
    "real": dict(steps=15000, batch_size=72, lr_gen=3e-5, lr_fake=3e-5, fake_update_ratio=10,
                 ema_decay=0.99, log_every=10),
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
    p.add_argument("--batch-size", type=int, default=None, help="global batch (split across ranks)")
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
    return p.parse_args(argv)


def resolve_defaults(args, cuda):
    d = DEFAULTS["toy" if args.model == "toy" else "real"]
    if args.model != "toy" and models.SPECS[args.model][0] == "flux2":
        d = d | dict(lr_gen=1e-6, lr_fake=1e-6)  # FLUX.2-klein's stage-1 lr (ALGORITHM.md 4.7)
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
    if args.stage == 1:
        nets = train_stage1(args, bb, ddp, rank, world, device, master, shared)
    else:
        sys.exit("error: stage 2 is not implemented yet")
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
            pbar.update(1)
            if step % args.log_every == 0 or step == args.steps:
                rec["time"] = round(time.time() - t0, 2)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                pbar.set_postfix(fake=f"{rec['fake_loss']:.4f}")
        if step % args.save_every == 0 or step == args.steps:
            save(step)
    if master:
        pbar.close()
        log.close()
        print0(f"stage 1 done in {time.time() - t0:.1f}s -> {ckpt_path}")
        if args.model == "toy":
            sample.toy_scatter_png(bb, ema, os.path.join(args.out, "samples_stage1.png"))
        else:
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


if __name__ == "__main__":
    main()
