"""
train.py -- both stages of RTDMD, one process or many.

    python train.py --stage 1                                  # toy, one process (CPU)
    torchrun --standalone --nproc_per_node 2 train.py --stage 1 --out runs/toy
    torchrun --standalone --nproc_per_node 2 train.py --stage 2 --out runs/toy
    torchrun --nproc_per_node 8 train.py --stage 1 --model sd3.5-medium --out runs/sd35 \
        --prompts dataset/pickscore/train.txt
    python train.py --stage 1 --model tiny-sd3 --out runs/tiny --steps 20 --batch-size 2 \
        --prompts tests/prompts/train.txt                                   # CPU, tiny twin
    torchrun --nproc_per_node 8 train.py --stage 2 --model sd3.5-medium --out runs/sd35 \
        --prompts dataset/geneval/train_metadata.jsonl --clip-l-path ckpt/clip-vit-large-patch14 ...
    python train.py --stage 1 --out runs/prof --profile 20       # where a step's time goes

Defaults are the paper's for the real backbones (official code: configs/cold_start/*.yaml for
stage 1, configs/rtdmd/*.yaml for stage 2) and CPU-sized for the toy. Each run folder holds
config.json, log.jsonl, stage{1,2}.pt (atomic, resumable with --resume) and samples.

+------------------------------------------------------------------------------------------+
| Stage 1, AC-DMD (acdmd.py), one iteration                                    train_stage1 |
|   fake-score step, every iteration                                    stage1_fake_step    |
|     k ~ U{1..4}; x_s = output of sampler step k-1 (no grad), s its level                  |
|     t > s;  x_t = a_ts x_s + sigma_ts n;  regress fake(x_t, t) on the ambient target      |
|     + consistency regulariser; one AdamW step                                             |
|   generator step, every fake_update_ratio-th iteration (TTUR)   stage1_generator_step     |
|     k ~ U{1..4}; x_s = output of step k-1, with grad through that one step                |
|     t > s;  g = kappa (v_fake - v_teacher) at x_t, projected back to s;  one AdamW step   |
|   EMA of the generator, every iteration                                   ema_update      |
|                                                                                          |
| Stage 2, RTDMD (subgrpo.py), one epoch = one generator step                train_stage2 |
|   rollouts: num_batches x (M prompts x K copies), 4-step CPS; states, log-probs,          |
|     rewards; steps not trained this epoch use noise shared per prompt   stage2_rollouts   |
|   advantages: per prompt mean, global std, over all ranks           stage2_advantages     |
|   fake-score step on the epoch's samples (s = 0)                      stage2_fake_step    |
|   generator step, accumulated over sub-batches and steps j      stage2_generator_step     |
|     j in S (2 of the 3 stochastic steps): w_pg * clipped PPO surrogate                    |
|     j = 3 (deterministic): w_dm * AC-DMD at s = 0  +  w_bp * reward back-prop             |
|   EMA of the generator: every 8th epoch, one update per sub-batch (official)  ema_update  |
+------------------------------------------------------------------------------------------+

Reading order (the order of this file): arguments -> set-up (DDP, backbone) -> stage 1 (the
loop, then its two phases) -> stage 2 (the loop, then its four phases and their helpers) ->
shared helpers (EMA, checkpoints, update guard, logging, exported files) -> profiling (--profile).
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

# Paper values per backbone (official code: configs/cold_start/{sd3m,sd35m,flux2_4b}.yaml for stage 1,
# configs/rtdmd/{sd3m,sd35m,flux2_4b}.yaml for stage 2) and CPU-sized values for the toy.
DEFAULTS = {
    "toy": dict(steps=9000, batch_size=512, lr_gen=1e-3, lr_fake=1e-3, fake_update_ratio=5,
                ema_decay=0.999, log_every=50),
    "real": dict(steps=15000, batch_size=72, lr_gen=3e-5, lr_fake=3e-5, fake_update_ratio=10,
                 ema_decay=0.99, log_every=10),
    # stage 2: steps = epochs, batch_size = images per sampling iteration (prompts x K, global).
    # Real: configs/rtdmd/sd35m.yaml. Toy: tuned to be stable (the paper's loss weights assume
    # D ~ 65k latent numbers per sample, the toy has D = 2; subgrpo.py, section 6, explains the balance).
    "toy2": dict(steps=400, batch_size=48, lr_gen=3e-5, lr_fake=1e-3, fake_update_ratio=1,
                 ema_decay=0.9, log_every=10, group_size=16, num_batches_per_epoch=4,
                 w_pg=1.0, w_dm=3.0, w_bp=0.1),
    # real2 = SD3.5-M; the other backbones differ only as in STAGE2_PER_BACKBONE.
    "real2": dict(steps=1000, batch_size=72, lr_gen=3e-6, lr_fake=3e-5, fake_update_ratio=1,
                  ema_decay=0.9, log_every=1, group_size=24, num_batches_per_epoch=16,
                  w_pg=1.0, w_dm=1e-3, w_bp=1e-4, fake_batch_size=8, bp_batch_size=0),
}
# Stage-2 differences between the real backbones (configs/rtdmd/*.yaml). batch_size is the global
# number of images per sampling iteration (prompts x K): SD3-M 16 GPUs x 2 = 2 prompts x 16,
# SD3.5-M 8 x 9 = 3 x 24, FLUX.2 16 x 6 = 4 x 24. Chunk sizes are per rank; bp_batch_size 0 = the
# whole sub-batch at once, whose VAE decode alone saves ~4 GiB per 512-px image (train.py
# --memory-plan), so the real SD3 backbones decode one image at a time (the same gradient). The tiny twins take their family's values.
STAGE2_PER_BACKBONE = {
    "sd3-medium": dict(group_size=16, batch_size=32, fake_batch_size=2, bp_batch_size=1),
    "sd3.5-medium": dict(bp_batch_size=1),
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
    p.add_argument("--prompts", default=None, help="real backbones, required: the training prompts, .txt "
                   "(one a line) or .jsonl (a \"prompt\" field a line, the other fields kept as that prompt's "
                   "metadata); the paper's: stage 1 pickscore/train.txt, stage 2 geneval/train_metadata.jsonl")
    p.add_argument("--out", default="runs/toy", help="run folder (config, log, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--steps", type=int, default=None, help="total iterations (stage 1) / epochs (stage 2)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (split across ranks x --grad-accum); stage 2: "
                   "images per sampling iteration = prompts x K (default SD3-M 32, SD3.5-M 72, FLUX.2 96)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="stage 1: N micro-batches per update, so that per-rank batch x ranks x N = "
                        "--batch-size (the paper's global batch on fewer GPUs)")
    p.add_argument("--lr-gen", type=float, default=None)
    p.add_argument("--lr-fake", type=float, default=None)
    p.add_argument("--fake-update-ratio", type=int, default=None, help="TTUR: fake steps per generator step")
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--lr-cosine", action="store_true",
                   help="stage 1: both learning rates follow a cosine from their value to 0 over --steps")
    p.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: backbone's)")
    p.add_argument("--eta", type=float, default=0.9, help="CPS stochasticity")
    p.add_argument("--consistency-weight", type=float, default=1e-2)
    p.add_argument("--no-move-scale-out", dest="move_scale_out", action="store_false",
                   help="unweighted fake loss instead of the official min(1, 10 sigma_ts^2) weight")
    p.add_argument("--plain-dmd", action="store_true",
                   help="ablation: match x0_hat of every step at s = 0 (DMD2), not the sub-interval")
    p.add_argument("--no-grad-norm", dest="grad_norm", action="store_false",
                   help="do not normalise the DMD direction per sample")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--max-bad-updates", type=int, default=3,
                   help="stop the run after this many non-finite (skipped) updates of one network in a row")
    p.add_argument("--toy-width", type=int, default=128, help="toy: hidden width of the velocity MLPs")
    p.add_argument("--toy-angles", type=int, default=None, metavar="K",
                   help="toy: add polar features of x (r, cos k phi, sin k phi, k = 1..K) to the MLPs' input "
                   "(default: toy 8, toy-gauss 0; 0 = none)")
    p.add_argument("--toy-exact-prefix", action="store_true",
                   help="toy diagnostic: only the last step learns, its input drawn from the exact marginal "
                   "p_sigma(x|c) (eval.py samples the same way)")
    p.add_argument("--toy-per-step", action="store_true",
                   help="toy diagnostic: the generator is one MLP per sampler step (models.ToySteps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="time N steps (after 2 warm-up steps) phase by phase against bare network passes; "
                   "prints a table and writes profile_stage{1,2}.json (use a fresh --out)")
    p.add_argument("--bf16", type=int, default=None,
                   help="bf16 autocast, plus bf16 frozen weights on CUDA (default: on with CUDA)")
    p.add_argument("--cache-text-embeddings", action="store_true",
                   help="real backbones: encode the --prompts once, then move the text encoders to the CPU "
                        "(models.DiffusersBackbone.cache_text_embeddings; host memory: MiBs per prompt)")
    p.add_argument("--timeout-hours", type=float, default=3.0,
                   help="process-group timeout (the official code's NCCL_TIMEOUT_SEC, 3 h): covers a "
                        "rank loading or building alone while the others wait")
    p.add_argument("--grad-ckpt", type=int, default=None, help="gradient checkpointing (default: on with CUDA)")
    p.add_argument("--lora-dtype", default=None, choices=("bf16", "fp32"),
                   help="dtype of the trainable master weights (LoRA A/B, or the full copy with --lora-rank "
                   "0), hence of AdamW's updates and the EMA (default: bf16 on CUDA for real backbones, the "
                   "official precision; fp32 on CPU and for the toy)")
    add_stage2_args(p)
    m = p.add_argument_group("memory plan (train.py --memory-plan: offline, meta device, nothing trained)")
    m.add_argument("--memory-plan", action="store_true", help="print the planned memory per GPU and exit; "
                   "non-zero if the peak exceeds --gpu-memory")
    m.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default: the paper's count, "
                   "SD3-M 16, SD3.5-M 8, FLUX.2 16)")
    m.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU the plan must fit in")
    return p.parse_args(argv)


def add_stage2_args(p):
    """Stage-2 options (subgrpo.py); None = the backbone's default (DEFAULTS "toy2" / "real2")."""
    p.add_argument("--group-size", type=int, default=None, help="K: images per prompt (a GRPO group); "
                   "default toy 16, SD3-M 16, SD3.5-M and FLUX.2 24")
    p.add_argument("--num-batches-per-epoch", type=int, default=None,
                   help="sampling iterations per epoch = sub-batches of the one optimiser step")
    p.add_argument("--rewards", default=None, metavar="NAME,NAME",
                   help="stage 2, real backbones: the GRPO rewards, weight 1 each (default: the paper's "
                   "clipscore,hpsv2,pickscore,geneval; geneval needs the GenEval .jsonl as --prompts)")
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
                   "0 = the whole sub-batch (default: SD3-M, SD3.5-M 1, FLUX.2 2, toy and tiny SD3 twins 0; "
                   "the gradient is the same)")
    p.add_argument("--fake-batch-size", type=int, default=None,
                   help="stage-2 fake-score step: chunk size of the epoch's rollouts (memory); "
                   "0 = all at once (default: toy 0, SD3-M 2, SD3.5-M 8, FLUX.2 2)")
    p.add_argument("--ema-schedule", default="official", choices=("official", "once"),
                   help="stage-2 EMA: official = the decay applied after every sub-batch when it fires ("
                   "--num-batches-per-epoch times per firing, subgrpo.stage2_ema_decays); once = once per firing (a longer average)")
    p.add_argument("--logprob", default="official", choices=("official", "exact"), help="CPS log-probability form (subgrpo.cps_log_prob)")
    p.add_argument("--no-dm", action="store_true", help="ablation: drop the final-step DM term")
    p.add_argument("--no-bp", action="store_true", help="ablation: drop reward back-prop")
    p.add_argument("--no-pg", action="store_true", help="ablation: drop the policy gradient")
    p.add_argument("--all-steps", action="store_true", help="train all stochastic steps, not 2 of 3")
    p.add_argument("--no-shared-noise", dest="shared_noise", action="store_false",
                   help="independent noise on the untrained steps too")
    p.add_argument("--exact-decomposition", action="store_true",
                   help="toy check of the hybrid gradient: unnormalised DM, REINFORCE with group-mean baseline, "
                   "exact log-prob, no clipping (use with --model toy-gauss --reward linear)")
    p.add_argument("--tilt-teacher", type=float, default=None, metavar="BETA",
                   help="toy, stage 1: replace the teacher by the exact tilted teacher p exp(BETA r) "
                   "(reference mode: stage 1 alone must then land on the tilted target)")
    # Stage 2 on a real backbone scores images with clipscore + hpsv2 + pickscore + geneval (GRPO,
    # weight 1 each, per-reward advantages) and back-propagates the first three
    # (rewards.training_rewards); only the slots of the rewards in use are loaded.
    rewards.add_source_args(p.add_argument_group(
        "stage-2 reward checkpoints (real backbones; hub id or local path, rewards.DEFAULT_SOURCES)"))


def resolve_defaults(args, cuda):
    d = DEFAULTS[("toy" if args.model.startswith("toy") else "real") + ("2" if args.stage == 2 else "")]
    if args.model.startswith("toy"):
        d = d | dict(fake_batch_size=0, bp_batch_size=0)
    elif args.stage == 2:
        family = models.SPECS[args.model][0]
        d = d | STAGE2_PER_BACKBONE.get(args.model, STAGE2_PER_BACKBONE.get(family, {}))
    elif models.SPECS[args.model][0] == "flux2":
        # FLUX.2-klein: stage-1 lr 1e-6 for both nets (configs/cold_start/flux2_4b.yaml); stage 2 above
        d = d | dict(lr_gen=1e-6, lr_fake=1e-6)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.toy_angles is None:  # polar input features for the mixture on a circle (models.ToyMLP)
        args.toy_angles = 8 if args.model == "toy" else 0
    if args.bf16 is None:
        args.bf16 = int(cuda)
    if args.grad_ckpt is None:
        args.grad_ckpt = int(cuda)
    if args.lora_dtype is None:
        # bf16 on CUDA: the official code's LoRA is created in the bf16 base's dtype (diffusers
        # add_adapter), so its masters, AdamW steps and EMA are bf16, and the paper's learning rates
        # were tuned so (an update below half a bf16 step is lost). fp32 on CPU, where bf16 matmuls
        # are slow, and for the toy, whose learning rates were tuned in fp32.
        args.lora_dtype = "bf16" if cuda and not args.model.startswith("toy") else "fp32"
    return args


# ---------------------------------------------------------------------------------------------
# Set-up: DDP, backbone, run folder
# ---------------------------------------------------------------------------------------------


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def setup(argv=None):
    """Arguments, process group and device. DDP is on when torchrun sets RANK (nanoGPT's rule)."""
    args = get_args(argv)
    if args.model not in models.BACKBONES:
        sys.exit(f"error: unknown --model {args.model!r}; choose one of: {', '.join(models.BACKBONES)}")
    if args.cache_text_embeddings and args.model.startswith("toy"):
        sys.exit(f"error: --model {args.model} has no text encoders; drop --cache-text-embeddings")
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(hours=args.timeout_hours))
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        # TF32 matmuls and convolutions, as the official trainer sets them (official code:
        # rtdmd/trainers/base_trainer.py): the float32 parts (LoRA branches, CPS and log-prob math)
        # run on tensor cores with a 10-bit mantissa, still finer than the bf16 of the autocast.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args = resolve_defaults(args, cuda)
    master = rank == 0
    if args.grad_accum < 1 or args.batch_size % (world * args.grad_accum):
        sys.exit(f"error: --batch-size {args.batch_size} does not divide across {world} ranks x --grad-accum "
                 f"{args.grad_accum}; use a multiple of {world * args.grad_accum}")
    check_run_folder(args, master)
    return args, ddp, rank, world, device, master


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


# GPUs of the paper's stage-2 recipes (STAGE2_PER_BACKBONE); stage 1 plans its 72 samples on 8 x 9
PAPER_GPUS = {"sd3-medium": 16, "sd3.5-medium": 8, "flux2-klein-4b": 16}


def main(argv=None):
    plan = get_args(argv)
    if plan.memory_plan:
        if plan.model not in PAPER_GPUS:
            sys.exit(f"error: --memory-plan needs a real backbone, one of {', '.join(PAPER_GPUS)}")
        plan.gpus = plan.gpus or (PAPER_GPUS[plan.model] if plan.stage == 2 else 8)
        sys.exit(memory_plan(plan))
    args, ddp, rank, world, device, master = setup(argv)
    prompts, metadata, prompt_files = read_training_prompts(args)  # one error line, nothing written
    # Stage 2 loads its reward models first: a missing checkpoint fails here, in one line, before
    # the backbone loads and before anything in the run folder is written.
    reward = make_reward(args, device, metadata) if args.stage == 2 else None
    os.makedirs(args.out, exist_ok=True)
    # Draws that every rank must agree on (random stop, renoise levels, consistency deltas, stage-2
    # prompts) come from this generator, seeded identically everywhere: the same numbers as a
    # broadcast from rank 0, without the communication (README, "Deviations and choices").
    shared_rng = torch.Generator().manual_seed(args.seed + 12345)

    # The toy's base model (and a tiny twin) is made once by rank 0 and cached in the run folder;
    # the other ranks load after it, at a barrier under the --timeout-hours process-group timeout.
    # Frozen weights are bf16 on CUDA with --bf16 (the paper's precision), float32 on CPU; the
    # trainable masters (LoRA, or the full copy) are --lora-dtype (models.LoRALinear).
    dtype = torch.bfloat16 if args.bf16 and device.type == "cuda" else torch.float32
    load_kw = dict(cache_dir=args.out, device=device, dtype=dtype, pretrained=args.pretrained,
                   generator_pretrained=args.generator_pretrained, resolution=args.resolution,
                   lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank,  # scale 2, as the paper
                   gradient_checkpointing=bool(args.grad_ckpt),
                   width=args.toy_width, angles=args.toy_angles, exact_prefix=args.toy_exact_prefix,
                   per_step=args.toy_per_step)
    if prompts is not None:
        load_kw |= dict(prompts=prompts, prompt_metadata=metadata)
    if not args.model.startswith("toy"):
        load_kw["lora_dtype"] = torch.bfloat16 if args.lora_dtype == "bf16" else torch.float32
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
            json.dump(vars(args) | {"world_size": world, "prompt_files": prompt_files}, f, indent=2)
        if prompts is not None:
            rec = prompt_files[f"stage{args.stage}"]
            print(f"stage {args.stage} prompts: {rec['file']} ({rec['count']:,} prompts, sha256 {rec['sha256']})")
    if args.tilt_teacher is not None:
        tilt_toy_teacher(bb, args)
    if args.cache_text_embeddings:
        size = bb.cache_text_embeddings()
        print0(f"text embeddings cached: {len(bb.text_rows):,} prompts, {size / 2**30:.2f} GiB in host memory; "
               "text encoders moved to the CPU")
    # Per-rank noise, seeded after loading (which may draw), so the stream of rank r is exactly
    # "seeded seed + r" when the loop starts: what --grad-accum's micro-batch streams reproduce.
    torch.manual_seed(args.seed + rank)
    if args.stage == 1:
        nets = train_stage1(args, bb, ddp, rank, world, device, master, shared_rng)
    else:
        nets = train_stage2(args, bb, rank, world, device, master, shared_rng, reward)
    if ddp:
        # rank 0 still draws the samples and writes the exports: wait for it, so that no rank
        # tears down its process group while another is still using its own
        dist.barrier()
        dist.destroy_process_group()
    return nets  # the trained modules (tests compare them across ranks and runs)


# The prompt sets the paper trains on (official code: the dataset/ folder, read by
# rtdmd/data/prompt_dataset.py): stage 1 the PickScore prompts, stage 2 the GenEval training
# metadata, whose per-prompt fields the GenEval reward scores against.
PAPER_PROMPTS = {1: "the PickScore prompt set, dataset/pickscore/train.txt (25,432 prompts)",
                 2: "the GenEval training metadata, dataset/geneval/train_metadata.jsonl"}


def read_training_prompts(args):
    """Real backbones: the --prompts file (models.read_prompt_file), which is required, as
    (prompts, metadata, prompt_files); prompt_files = the run's record of the prompt file of each
    stage, {"stage1": {file, sha256, count}, "stage2": {...}}, this stage's entry added to the one
    config.json already holds. --resume refuses a file whose sha256 differs from the one the stage
    started with. The toy backbones know their own prompts: (None, None, {}). Every problem exits
    with one line, before anything is written."""
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
    this_file = {"file": args.prompts, "sha256": models.file_sha256(args.prompts), "count": len(prompts)}
    cfg_path, key = os.path.join(args.out, "config.json"), f"stage{args.stage}"
    files = {}
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            files = json.load(f).get("prompt_files") or {}
    old = files.get(key)
    if args.resume and old and old["sha256"] != this_file["sha256"]:
        sys.exit(f"error: --resume with --prompts {args.prompts} (sha256 {this_file['sha256'][:12]}), but stage "
                 f"{args.stage} of {args.out} started with {old['file']} (sha256 {old['sha256'][:12]}); "
                 "pass that file to continue this run")
    return prompts, metadata, files | {key: this_file}


def tilt_toy_teacher(bb, args):
    """Reference mode: the toy teacher becomes the exact tilted teacher p(x|c) exp(beta r(x)) /
    Z_beta(c), in closed form (rewards.py). Stage 1 then converges to the tilted target with no
    reward term at all, since the DMD fixed point is "generator = teacher"."""
    if not args.model.startswith("toy") or args.stage != 1:
        sys.exit("error: --tilt-teacher is a toy, stage-1 option (the tilt is closed-form only there)")
    bb.mixture = make_reward(args)[0].tilt(bb.mixture, args.tilt_teacher)
    bb.teacher = models.ExactVelocity(bb.mixture).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Stage 1: AC-DMD (acdmd.py; the official code's rtdmd/trainers/ac_dmd_trainer.py)
# ---------------------------------------------------------------------------------------------


def stage1_prompts(n, B, world, rank, step, seed):
    """This rank's B prompt indices at iteration `step`, as torch's DistributedSampler(shuffle,
    seed) under a DataLoader with drop_last (official code: rtdmd/data/prompt_dataset.py,
    create_prompt_dataloader): epoch e is torch.randperm(n) seeded with seed + e, padded with its
    own head to a multiple of `world`; rank r reads every world-th index from r, in batches of B,
    and drops its tail that fills no batch. Stateless in `step`, so a resume is exact. A prompt
    set smaller than one global batch (the toy's 3) is drawn with replacement from the per-rank
    stream instead."""
    per_epoch = -(-n // world) // B
    if per_epoch == 0:
        return torch.randint(0, n, (B,))
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    perm = torch.cat([perm, perm[:-n % world]])
    return perm[rank::world][k * B:(k + 1) * B]


def train_stage1(args, bb, ddp, rank, world, device, master, shared_rng):
    """The stage-1 loop (box at the top of this file): a fake-score step every iteration, a
    generator step every fake_update_ratio-th, the EMA every iteration."""
    A = args.grad_accum  # micro-batches per update: B x world x A = the global batch
    B = args.batch_size // (world * A)
    streams = micro_batch_streams(args.seed, rank, A, device)
    # Every rank must start from the same LoRA init (random A): draw it from the same seed
    # everywhere, in a side RNG, so the per-rank streams below stay as they were.
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        generator = bb.make_student("generator")
        fake = bb.make_student("fake")
    ema = ema_copy(generator)
    opt_g = torch.optim.AdamW(trainable(generator), lr=args.lr_gen, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0.0)
    opt_f = torch.optim.AdamW(trainable(fake), lr=args.lr_fake, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0.0)
    nets, opts = dict(generator=generator, fake=fake, ema=ema), dict(opt_g=opt_g, opt_f=opt_f)
    ckpt_path = os.path.join(args.out, "stage1.pt")
    if args.resume:
        ck = load_checkpoint(ckpt_path, nets, opts, shared_rng, rank)
        step, streams = ck["step"], ck["rng"][rank].get("streams", streams)
    else:
        step = 0
    if ddp:
        # broadcast_buffers=False: the buffers (SD3.5's 432 MiB pos_embed) are frozen and equal on
        # every rank; DDP would re-send them on every forward (the official stage 2 turns it off too)
        kw = dict(device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        generator, fake = DDP(generator, **kw), DDP(fake, **kw)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16))
    null_cond = bb.encode([""] * B)

    PROF.attach(args, profiled_networks(bb, generator, fake), device, step)

    print0(f"stage 1 (AC-DMD{', plain-DMD ablation' if args.plain_dmd else ''}) | model {args.model} | "
           f"world {world} x {B}{f' x grad-accum {A}' if A > 1 else ''} = {args.batch_size} samples/iter | sigmas {[round(float(s), 5) for s in bb.sigmas]}\n"
           f"  fake step every iter, generator step every {args.fake_update_ratio} "
           f"-> {args.steps // args.fake_update_ratio} generator updates in {args.steps} iters | "
           f"lr G {args.lr_gen} F {args.lr_fake} | CFG {args.guidance} | eta {args.eta} | "
           f"bf16 {bool(args.bf16)} | grad ckpt {bool(args.grad_ckpt)} | start at {step}\n"
           f"  trainable params: generator {count(raw(generator)):,} of {count(raw(generator), False):,}, "
           f"fake {count(raw(fake)):,} of {count(raw(fake), False):,}"
           + (f" (LoRA rank {args.lora_rank})" if uses_lora(bb) else ""))

    log, guard = RunLog(args, master, "stage 1", step), UpdateGuard(args, ckpt_path)
    per_step = [0] * (len(bb.sigmas) - 1)  # generator updates of each sampler step, this session
    while step < args.steps:
        with PROF.step(step):
            rec = {"stage": 1, "step": step + 1}
            if args.lr_cosine:  # a function of the step alone, so --resume continues it exactly
                for opt, lr in ((opt_g, args.lr_gen), (opt_f, args.lr_fake)):
                    for group in opt.param_groups:
                        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            with PROF.phase("prompts"):
                conds = []  # one per micro-batch: micro-batch a of rank r reads as rank r A + a
                for a in range(A):
                    with on_stream(streams, a, device):
                        idx = stage1_prompts(len(bb.prompts), B, world * A, rank * A + a, step, args.seed)
                        conds.append(bb.encode([bb.prompts[i] for i in idx]))
            micro = (conds, streams, device)
            rec |= stage1_fake_step(args, bb, generator, fake, opt_f, micro, shared_rng, autocast, guard)
            if (step + 1) % args.fake_update_ratio == 0:  # TTUR: the fake score runs ahead
                rec |= stage1_generator_step(args, bb, generator, fake, opt_g, micro, null_cond, shared_rng,
                                             autocast, guard)
                per_step[rec["gen_stop"] - 1] += 1
            with PROF.phase("EMA"):
                ema_update(ema, generator, args.ema_decay)  # every iteration, not every generator step
            step += 1
            log.record(guard.note(rec), step, fake="fake_loss")
            guard.stop_if_stuck(f"iteration {step}")
            if step % args.save_every == 0 or step == args.steps:
                with PROF.phase("checkpoint"):
                    save_checkpoint(ckpt_path, {"step": step}, nets, opts, shared_rng, args, world, master,
                                    streams=streams)
    log.close()
    print0(f"generator updates per sampler step (this session): {per_step}")
    PROF.report(1, autocast, master)
    write_samples_and_exports(args, bb, ema, 1, master)
    return {"generator": raw(generator), "fake": raw(fake), "ema": ema}


def simulate_subinterval(args, bb, generator, cond, shared_rng, autocast, with_grad):
    """The sample both stage-1 updates train on: run the generator's sampler from noise up to a
    random step (sample.random_stop; with grad through that last step only when with_grad, for
    the generator update), take its output x_s at level s (subinterval_start) and renoise it to a
    level t > s (acdmd.make_subinterval). The stop and the renoise levels come from shared_rng, so
    every rank trains the same step. Returns (stop, x_s, s, t, n, x_t)."""
    B = len(next(iter(cond.values())))
    stop = sample.random_stop(len(bb.sigmas) - 1, shared_rng)
    x, sigmas = bb.noise(B), bb.sigmas
    if getattr(bb, "exact_prefix", False):  # diagnostic: train the last step alone, on exact inputs
        stop, x, sigmas = len(bb.sigmas) - 1, bb.prefix_state(cond), bb.sigmas[-2:]
    with PROF.phase("backward simulation"):
        with torch.set_grad_enabled(with_grad), autocast:
            net = generator if with_grad else raw(generator)  # DDP only where gradients flow
            sim = sample.backward_simulation(bb, net, x, cond, stop - (len(bb.sigmas) - len(sigmas)),
                                             sigmas=sigmas, eta=args.eta)
        x_s, s = subinterval_start(sim, args.plain_dmd)
        tau = acdmd.sample_renoise_timesteps(s, B, generator=shared_rng)
        t, n, x_t = acdmd.make_subinterval(x_s, s, tau)
    return stop, x_s, s, t, n, x_t


def subinterval_start(sim, plain_dmd):
    """(x_s, s) for the losses. AC-DMD: the CPS output of the last executed step, at its level
    s = sigma_{k+1}. Plain DMD (ablation): x0_hat of that step at s = 0, as in DMD2."""
    if plain_dmd:
        return sim["x0_hat"], 0.0
    return sim["x_next"].float(), sim["sigma_next"]


def stage1_fake_step(args, bb, generator, fake, opt_f, micro, shared_rng, autocast, guard):
    """Fake-score phase (acdmd.py, sections 4-5): simulate the generator without grad up to a
    random step, renoise its output x_s to t > s, and regress the fake velocity on the ambient
    target, plus the consistency regulariser. One optimiser step. Returns the logged numbers."""
    def loss_fn(cond):
        stop, x_s, s, t, n, x_t = simulate_subinterval(args, bb, generator, cond, shared_rng, autocast, False)
        with PROF.phase("fake-score update"), autocast:
            return stop, *acdmd.fake_score_loss(bb, fake, x_s.detach(), s, t, n, x_t, cond, args.move_scale_out,
                                                args.consistency_weight, args.eta, generator=shared_rng)
    return accumulated_step("fake", fake, opt_f, micro, shared_rng, guard, args.grad_clip, loss_fn)


def stage1_generator_step(args, bb, generator, fake, opt_g, micro, null_cond, shared_rng, autocast, guard):
    """Generator phase (acdmd.py, section 3): simulate up to a random step with grad through
    that step only, renoise x_s to t > s, and descend the DMD direction kappa (v_fake - v_teacher)
    projected back to s with shared noise. One optimiser step. Returns the logged numbers."""
    def loss_fn(cond):
        stop, x_s, s, t, _, x_t = simulate_subinterval(args, bb, generator, cond, shared_rng, autocast, True)
        with PROF.phase("generator update"), autocast:
            return stop, *acdmd.generator_loss(bb, raw(fake), x_s, s, t, x_t, cond, null_cond, args.guidance,
                                               args.eta, args.grad_norm)
    return accumulated_step("gen", generator, opt_g, micro, shared_rng, guard, args.grad_clip, loss_fn)


def accumulated_step(key, net, opt, micro, shared_rng, guard, grad_clip, loss_fn):
    """One optimiser step of `net` on --grad-accum micro-batches: loss_fn(cond) -> (stop, loss,
    stats) per micro-batch, each backward divided by their count, so the gradient is the mean
    over ranks x micro-batches, as one rank-mean of a batch that many times larger. Each
    micro-batch re-reads shared_rng from the same state (the same stop and renoise levels, as
    every rank draws them) and its own per-rank stream (on_stream); DDP all-reduces on the last
    backward only (no_sync). With one micro-batch this is the plain step."""
    conds, streams, device = micro
    opt.zero_grad(set_to_none=True)
    start, losses, stats = shared_rng.get_state(), [], {}
    for a, cond in enumerate(conds):
        shared_rng.set_state(start)
        quiet = isinstance(net, DDP) and a < len(conds) - 1
        with on_stream(streams, a, device), net.no_sync() if quiet else contextlib.nullcontext():
            stop, loss, st = loss_fn(cond)
            (loss / len(conds)).backward()
        losses.append(loss.detach())
        stats = {k: stats.get(k, 0.0) + v / len(conds) for k, v in st.items()}
    loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
    name = "fake score" if key == "fake" else "generator"
    grad_norm = guard.step(name, opt, trainable(net), loss, grad_clip)
    return {f"{key}_grad_norm": grad_norm, f"{key}_loss": loss, f"{key}_stop": stop} | stats


def micro_batch_streams(seed, rank, accum, device):
    """The per-rank random streams of --grad-accum micro-batches. Ranks draw their noise and
    prompts from the global RNG seeded seed + rank (main); with accum micro-batches, micro-batch
    a of rank r gets its own state seeded seed + r accum + a, the stream that rank r accum + a of
    a run with accum x the ranks and no accumulation has. So 1 rank x 2 micro-batches sees the
    same samples as 2 ranks x 1 (the grad-accum test). None for accum 1: the global RNG as is.
    Each entry: [CPU state, CUDA state or None], updated in place by on_stream."""
    if accum == 1:
        return None
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        out = []
        for a in range(accum):
            torch.manual_seed(seed + rank * accum + a)
            out.append([torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None])
    return out


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
        streams[a] = [torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None]


# ---------------------------------------------------------------------------------------------
# Stage 2: RTDMD (subgrpo.py; the official code's rtdmd/trainers/rtdmd_trainer.py)
# ---------------------------------------------------------------------------------------------


def train_stage2(args, bb, rank, world, device, master, shared_rng, reward=None):
    """The stage-2 loop (box at the top of this file): per epoch, rollouts -> advantages -> one
    fake-score step -> one generator step accumulated over the whole epoch, with the parameter
    EMA on the official schedule around it (subgrpo.stage2_ema_decays)."""
    if args.exact_decomposition:  # every term an exact multiple of a gradient (subgrpo.py, section 7)
        args.grad_norm, args.logprob, args.clip_range, args.adv_clip = False, "exact", float("inf"), float("inf")
    group, num_batches = args.group_size, args.num_batches_per_epoch
    final = len(bb.sigmas) - 2  # index of the deterministic last step (3 for the 4-step sampler)
    if args.batch_size % group or args.batch_size % world:
        sys.exit(f"error: --batch-size {args.batch_size} (images per sampling iteration) must be a multiple "
                 f"of --group-size {group} and of the {world} ranks")
    B = args.batch_size // world  # this rank's images per sampling iteration
    # Built from stage1.pt, also on --resume (the stage-2 checkpoint holds only the new LoRA).
    ck1 = read_checkpoint(os.path.join(args.out, "stage1.pt"))
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + 2)  # the same fresh LoRA init on every rank, side RNG
        generator, fake = init_stage2_models(bb, ck1)
    ema = ema_copy(generator)
    opt_g = torch.optim.AdamW(trainable(generator), lr=args.lr_gen, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=args.weight_decay)
    opt_f = torch.optim.AdamW(trainable(fake), lr=args.lr_fake, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    reward_fn, bp_fn, weights = reward or make_reward(args, device)
    w_pg, w_dm, w_bp = (0.0 if off else w for off, w in
                        ((args.no_pg, args.w_pg), (args.no_dm, args.w_dm), (args.no_bp, args.w_bp)))
    # LoRA backbones: the merged stage-1 weights go into stage2.pt too, so that load_run and
    # --resume know what the stage-2 LoRA sits on (models.load_run's stage-2 contract).
    stage1 = {"stage1_ema": ck1["ema"], "stage1_fake": ck1["fake"]} if uses_lora(bb) else {}
    nets, opts = dict(generator=generator, fake=fake, ema=ema), dict(opt_g=opt_g, opt_f=opt_f)
    ckpt_path, epoch = os.path.join(args.out, "stage2.pt"), 0
    if args.resume:
        ck = load_checkpoint(ckpt_path, nets, opts, shared_rng, rank)
        check_same_stage1(args, ck, stage1)
        epoch = ck["epoch"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16))
    null_cond = bb.encode([""] * B)  # the teacher's unconditional branch (CFG) in the DM term
    trained_per_epoch = (final if args.all_steps else 2) + 1  # |S u {final}|
    # One optimiser step accumulates num_batches x |S u {final}| backward calls; each is divided by
    # this fixed count, also when a term is ablated, so the ablations keep the weights' scale.
    accumulation = num_batches * trained_per_epoch

    PROF.attach(args, profiled_networks(bb, generator, fake), device, epoch)

    print_stage2_banner(args, bb, generator, fake, weights, (w_pg, w_dm, w_bp), accumulation, world, epoch)

    log, guard = RunLog(args, master, "stage 2", epoch), UpdateGuard(args, ckpt_path)
    while epoch < args.steps:
        with PROF.step(epoch):
            steps = list(range(final)) if args.all_steps else subgrpo.select_steps(epoch, args.seed, final)
            rollouts = stage2_rollouts(args, bb, generator, reward_fn, steps, epoch, shared_rng, rank, world,
                                       autocast)
            rec = {"stage": 2, "epoch": epoch + 1, "steps": steps}
            with PROF.phase("advantages"):
                rec |= stage2_advantages(args, rollouts, weights, rank, world)
            with PROF.phase("fake-score step"):
                rec |= stage2_fake_step(args, bb, fake, opt_f, rollouts, world, autocast, guard)
            rec |= stage2_generator_step(args, bb, generator, fake, rollouts, steps, null_cond, (w_pg, w_dm, w_bp),
                                         bp_fn, weights, accumulation, epoch, rank, world, autocast)
            before, after = stage2_ema_schedule(args, epoch)
            with PROF.phase("EMA"):
                for d in before:
                    ema_update(ema, generator, d)
            with PROF.phase("optimiser step"):
                loss = rec["loss_pg"] + rec["loss_dm"] + rec["loss_bp"]
                rec["grad_norm"] = guard.step("generator", opt_g, trainable(generator), loss, args.grad_clip)
            with PROF.phase("EMA"):
                for d in after:
                    ema_update(ema, generator, d)
            epoch += 1
            log.record(guard.note(rec), epoch, reward="reward_mean")
            guard.stop_if_stuck(f"epoch {epoch}")
            if epoch % args.save_every == 0 or epoch == args.steps:
                with PROF.phase("checkpoint"):
                    save_checkpoint(ckpt_path, {"epoch": epoch}, nets, opts, shared_rng, args, world, master,
                                    stage1)
    log.close()
    PROF.report(2, autocast, master)
    write_samples_and_exports(args, bb, ema, 2, master)
    return {"generator": generator, "fake": fake, "ema": ema}


def check_same_stage1(args, ck, stage1):
    """On --resume: the stage-2 LoRA is meaningless on another stage-1 merge, so the stage-1
    weights stored in stage2.pt must equal those of stage1.pt now."""
    for key in stage1:
        if ck[key].keys() != stage1[key].keys() or any(not torch.equal(ck[key][k], stage1[key][k])
                                                        for k in stage1[key]):
            sys.exit(f"error: {os.path.join(args.out, 'stage1.pt')} is not the stage-1 checkpoint "
                     f"this stage-2 run started from ({key} differs); restore it or start stage 2 anew")


def stage2_ema_schedule(args, epoch):
    """The EMA decays to apply before and after this epoch's optimiser step. The official trainer
    calls its EMA after every sub-batch; the calls that fire apply ema <- d ema + (1 - d) theta,
    num_batches times in all every 8th step, so the stage-2 EMA trails the weights by ~d^16 = 0.19 per firing,
    not 0.9 (subgrpo.stage2_ema_decays). The epoch's one optimiser step sits between its calls
    1..num_batches-1 and its last one. --ema-schedule once: the nominal reading, one update per firing."""
    if args.ema_schedule == "once":
        return [], [subgrpo.ema_decay(epoch, args.ema_decay)] if (epoch + 1) % 8 == 0 else []
    return subgrpo.stage2_ema_decays(epoch, args.num_batches_per_epoch, max_decay=args.ema_decay)


def print_stage2_banner(args, bb, generator, fake, weights, loss_weights, accumulation, world, epoch):
    """The derived quantities of a stage-2 run, printed once at the start (as nanoGPT prints its
    tokens per iteration): images per sampling iteration and per epoch, the trained steps, the
    gradient accumulation, the loss weights and what trains."""
    (w_pg, w_dm, w_bp), group, num_batches = loss_weights, args.group_size, args.num_batches_per_epoch
    final = len(bb.sigmas) - 2
    print0(f"stage 2 (RTDMD{', exact decomposition' if args.exact_decomposition else ''}) | model {args.model} | "
           f"reward {', '.join(weights)} | world {world}\n"
           f"  per sampling iter: {args.batch_size // group} prompts x K {group} = {args.batch_size} images "
           f"({args.batch_size // world}/rank) | {num_batches} iters/epoch -> {num_batches * args.batch_size} "
           f"images/epoch, one generator + one fake step per epoch\n"
           f"  trained steps: {'all of' if args.all_steps else '2 of'} 0..{final - 1} + {final} | accumulation "
           f"{num_batches} x {accumulation // num_batches} = {accumulation} | weights PG {w_pg} DM {w_dm} BP {w_bp} | "
           f"log-prob {args.logprob} | DM normalised {args.grad_norm} | shared noise {args.shared_noise}\n"
           f"  lr G {args.lr_gen} (wd {args.weight_decay}) F {args.lr_fake} | clip {args.clip_range} | "
           f"epochs {args.steps} | bf16 {bool(args.bf16)} | start at {epoch}\n"
           f"  chunks: fake {args.fake_batch_size or 'all'}, BP {args.bp_batch_size or 'all'} | trainable: "
           f"generator {count(generator):,} of {count(generator, False):,}, fake {count(fake):,} of "
           f"{count(fake, False):,}" + (f" (fresh LoRA rank {args.lora_rank} on the merged stage-1 LoRA)"
                                         if uses_lora(bb) else ""))


def stage2_rollouts(args, bb, generator, reward_fn, steps, epoch, shared_rng, rank, world, autocast):
    """Rollout phase (subgrpo.rollout_with_logprob): num_batches sampling iterations of M prompts
    x K copies, 4-step CPS without grad; the steps not in `steps` use noise shared by a prompt's
    copies. The prompts come from `shared_rng`, so every rank knows the whole epoch's order and a
    group's K copies are spread over the ranks. Returns this rank's part of the epoch:
        latents, next_latents [N, 4, ...], log_probs [N, 4], x0 [N, ...], cond (N rows),
        prompts (N strings), rewards {name: [N]}, and all_prompts: every rank's, in rank order,
    where N = num_batches x B and B = batch_size / world."""
    group, B = args.group_size, args.batch_size // world
    M = args.batch_size // group  # prompts per sampling iteration
    parts, per_iteration = [], []  # per_iteration: the global prompt list of each iteration
    metadata = getattr(bb, "prompt_metadata", None)  # real backbones: a dict per prompt
    for _ in range(args.num_batches_per_epoch):
        # M distinct prompts (a permutation's first M) x K copies, shuffled over the ranks
        idx = subgrpo.draw_prompts(len(bb.prompts), M, group, shared_rng)
        per_iteration.append(idx.tolist())
        rank_idx = per_iteration[-1][rank * B:(rank + 1) * B]
        prompts = [bb.prompts[i] for i in rank_idx]
        with PROF.phase("rollouts"):
            cond = bb.encode(prompts)
            with torch.no_grad(), autocast:
                out = subgrpo.rollout_with_logprob(bb, raw(generator), bb.noise(B), cond, prompts, steps,
                                                   epoch, args.eta, args.shared_noise, args.logprob)
        with PROF.phase("rewards"), torch.no_grad():
            images = bb.decode(out["x0"])
            out["rewards"] = reward_fn(images, prompts) if metadata is None else \
                reward_fn(images, prompts, metadata=[metadata[i] for i in rank_idx])
        parts.append(out | {"cond": cond})
    data = {k: torch.cat([p[k] for p in parts]) for k in ("latents", "next_latents", "log_probs", "x0")}
    data["cond"] = {k: torch.cat([p["cond"][k] for p in parts]) for k in parts[0]["cond"]}
    data["rewards"] = {n: torch.cat([p["rewards"][n] for p in parts]) for n in parts[0]["rewards"]}
    data["prompts"] = [bb.prompts[i] for ps in per_iteration for i in ps[rank * B:(rank + 1) * B]]
    data["all_prompts"] = [bb.prompts[i] for r in range(world) for ps in per_iteration for i in ps[r * B:(r + 1) * B]]
    return data


def stage2_advantages(args, rollouts, weights, rank, world):
    """Advantage phase (subgrpo.group_advantages): gather every rank's rewards in rank order,
    centre each reward per prompt, divide by its global std, sum with the weights, standardise;
    keep this rank's shard, clipped. Stores rollouts["advantages"]; returns the logged numbers."""
    gathered = {n: all_gather_cat(rollouts["rewards"][n].float(), world) for n in weights}
    adv_all = subgrpo.group_advantages(gathered, rollouts["all_prompts"], weights,
                                       normalize=not args.exact_decomposition)
    device = rollouts["x0"].device
    rollouts["advantages"] = subgrpo.clip_advantages(adv_all.view(world, -1)[rank], args.adv_clip).to(device)
    total = sum(w * gathered[n] for n, w in weights.items())
    rec = {"reward_mean": total.mean().item(), "reward_std": total.std(unbiased=False).item(),
           "adv_mean": adv_all.mean().item(), "adv_std": adv_all.std(unbiased=False).item(),
           "adv_absmax": adv_all.abs().max().item()}
    if len(weights) > 1:  # each reward's own mean (the advantages are per reward)
        rec |= {f"reward_{n}": gathered[n].mean().item() for n in weights}
    return rec


def stage2_fake_step(args, bb, fake, opt_f, rollouts, world, autocast, guard):
    """Fake-score phase: one step of the ambient fake-score loss on the epoch's clean samples
    (s = 0, so the ambient target is plain flow matching), renoise levels drawn per rank, in
    chunks of --fake-batch-size (memory), each chunk weighted by its share of the samples."""
    x0, cond = rollouts["x0"], rollouts["cond"]
    t, n, x_t = acdmd.make_subinterval(x0, 0.0, acdmd.sample_renoise_timesteps(0.0, len(x0)))
    opt_f.zero_grad(set_to_none=True)
    rec = {"fake_loss": 0.0}
    for i in chunks(len(x0), args.fake_batch_size):
        share = len(i) / len(x0)
        i = i.to(x0.device)
        with autocast:
            loss_f, stats = acdmd.fake_score_loss(bb, fake, x0[i], 0.0, t[i], n[i], x_t[i],
                                                  models.cond_select(cond, i), args.move_scale_out,
                                                  args.consistency_weight, args.eta)
        (loss_f * share).backward()
        rec["fake_loss"] += loss_f.detach() * share
        for k, v in stats.items():
            rec[k] = rec.get(k, 0.0) + v * share
    params = trainable(fake)
    with PROF.phase("gradient all-reduce"):
        allreduce_grads(params, world)
    rec["fake_grad_norm"] = guard.step("fake score", opt_f, params, rec["fake_loss"], args.grad_clip)
    return rec


def stage2_generator_step(args, bb, generator, fake, rollouts, steps, null_cond, loss_weights, bp_fn,
                          weights, accumulation, epoch, rank, world, autocast):
    """Generator phase: the gradient of the epoch's one optimiser step (the caller takes the step),
    accumulated over the epoch's sub-batches and, in each, over the trained steps j (the hybrid
    gradient, subgrpo.py, section 2):
        j in steps (stochastic):   w_pg * clipped PPO surrogate of log pi(x_{j+1} | x_j)
        j = final (deterministic): w_dm * AC-DMD at s = 0 on x0_hat  +  w_bp * reward back-prop
    Samples whose advantage is exactly 0 are dropped first and the rest padded back to a multiple
    of the sub-batch count (subgrpo.drop_zero_advantages, as the official trainer does). Every
    backward is divided by `accumulation`; the gradient is averaged over the ranks. Returns the
    logged numbers."""
    w_pg, w_dm, w_bp = loss_weights
    final, sigmas = len(bb.sigmas) - 2, [float(s) for s in bb.sigmas]
    adv, num_batches = rollouts["advantages"], args.num_batches_per_epoch
    generator.zero_grad(set_to_none=True)
    keep = subgrpo.drop_zero_advantages(adv, num_batches, epoch, rank)
    order, B = keep[torch.randperm(len(keep))], len(keep) // num_batches  # sub-batches, in a fresh order
    rec, ppo_stats = {"loss_pg": 0.0, "loss_dm": 0.0, "loss_bp": 0.0, "kept": len(keep)}, []
    for b in range(num_batches):
        # --grad-accum A: each sub-batch in A micro-batches, each weighted by its share (the same
        # gradient up to float rounding, a 1/A of the activations)
        for i in order[b * B:(b + 1) * B].tensor_split(args.grad_accum):
            share, n = len(i) / B, len(i)
            null_b = models.cond_select(null_cond, torch.arange(n, device=adv.device))
            cond, prompts = models.cond_select(rollouts["cond"], i.to(adv.device)), [rollouts["prompts"][k] for k in i]
            for j in sorted(set(steps) | {final}):
                x_j, x_next = rollouts["latents"][i, j], rollouts["next_latents"][i, j]
                loss = 0.0
                with autocast:
                    if j != final and w_pg:  # score-function part: PPO on a stochastic step
                        with PROF.phase("PPO terms"):
                            log_prob = subgrpo.transition_log_prob(bb, generator, x_j, x_next, sigmas[j],
                                                                   sigmas[j + 1], cond, args.eta, args.logprob)
                            l_pg, stats = subgrpo.ppo_loss(log_prob, rollouts["log_probs"][i, j], adv[i],
                                                           args.clip_range)
                            loss = w_pg * l_pg
                            ppo_stats.append(stats)
                            rec["loss_pg"] += loss.detach() * share / num_batches
                    elif j == final and (w_dm or w_bp):  # deterministic last step: DM + path-wise BP
                        with PROF.phase("final step + DM term"):
                            x0_hat = subgrpo.final_step_x0(bb, generator, x_j, sigmas[j], cond)
                            if w_dm:
                                t, _, x_t = acdmd.make_subinterval(x0_hat, 0.0, acdmd.sample_renoise_timesteps(0.0, n))
                                l_dm, _ = acdmd.generator_loss(bb, raw(fake), x0_hat, 0.0, t, x_t, cond, null_b,
                                                               args.guidance, args.eta, args.grad_norm)
                                loss = loss + w_dm * l_dm
                                rec["loss_dm"] += w_dm * l_dm.detach() * share / num_batches
                        if w_bp:  # path-wise part: decode x0_hat, score, hinge, in chunks (memory)
                            with PROF.phase("back-prop term"):
                                l_bp, value = bp_surrogate(bb, bp_fn, weights, x0_hat, prompts, args.bp_margin,
                                                           args.bp_batch_size)
                                loss = loss + w_bp * l_bp
                                rec["loss_bp"] += w_bp * value * share / num_batches
                if torch.is_tensor(loss):  # the generator's backward of this step's terms
                    with PROF.phase("PPO terms" if j != final else "final-step backward"):
                        (loss * share / accumulation).backward()
    with PROF.phase("gradient all-reduce"):
        allreduce_grads(trainable(generator), world)
    if ppo_stats:
        n = len(ppo_stats)
        rec |= {"ratio_mean": sum(s["ratio_mean"] for s in ppo_stats) / n,
                "ratio_min": min(s["ratio_min"] for s in ppo_stats),
                "ratio_max": max(s["ratio_max"] for s in ppo_stats),
                "clip_frac": sum(s["clip_frac"] for s in ppo_stats) / n}
    return rec


def make_reward(args, device=None, metadata=None):
    """(reward, bp_reward, weights). reward(images, prompts, metadata) -> {name: Tensor[B]} scores
    the rollouts (advantages); bp_reward is its differentiable part, back-propagated through the
    last step; weights {name: w} says which names count and how much.
    Real backbones: the paper's set (rewards.GRPO_WEIGHTS: clipscore, hpsv2, pickscore, geneval,
    weight 1 each; configs/rtdmd/*.yaml), or --rewards, from the --<slot>-path checkpoints, every
    model loaded now; a missing one exits with one line. geneval scores each image against its
    prompt's GenEval record ("include"), so it needs --prompts to be the GenEval .jsonl: any other
    prompt file stops here with one line saying what to pass."""
    if args.model.startswith("toy"):  # the "images" are the 2-D points themselves
        r = rewards.QuadraticReward(1.0, (2.0, 0.0)) if args.reward == "quadratic" else rewards.LinearReward((1.0, 0.0))
        return r, r, {r.name: 1.0}
    weights = dict(rewards.GRPO_WEIGHTS)
    if args.rewards:
        weights = {name.strip(): 1.0 for name in args.rewards.split(",") if name.strip()}
    if "geneval" in weights and not (metadata and all("include" in m for m in metadata)):
        sys.exit(f"error: the stage-2 reward geneval scores each image against its prompt's GenEval record, "
                 f"but --prompts {args.prompts} carries none; pass the GenEval training prompts (the official "
                 f"code's dataset/geneval/train_metadata.jsonl) or leave geneval out with --rewards "
                 f"{','.join(n for n in weights if n != 'geneval')}")
    try:
        grpo, bp = rewards.training_rewards(rewards.sources_from_args(args), weights)
        rewards.preflight(grpo, device)  # bp shares grpo's models: this loads both
    except (FileNotFoundError, NotImplementedError, ValueError, RuntimeError) as e:
        sys.exit(f"error: stage-2 reward model: {' '.join(str(e).split())}")
    return grpo, bp, weights


def init_stage2_models(bb, ck):
    """Stage 2 starts from stage 1's EMA generator and its fake score.
    Toy and full fine-tuning (lora_rank 0): every parameter is trainable and simply loaded.
    LoRA backbones: the stage-1 LoRA (generator: its EMA; fake: the fake score's) is merged into
    a copy of the base weights, and a fresh trainable LoRA is injected on top (A ~ N(0, 1), B = 0,
    so the product starts at zero), so both nets start as their stage-1 functions and only the new
    LoRA trains (official code: rtdmd/trainers/rtdmd_trainer.py, setup_models).
    The caller seeds the RNG: every rank must draw the same fresh A."""
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


def bp_surrogate(bb, bp_fn, weights, x0_hat, prompts, margin, chunk):
    """Reward back-prop through the VAE and the reward models (subgrpo.bp_loss), `chunk` images at
    a time (0: all at once). Each chunk is decoded and scored with grad w.r.t. a detached copy of
    x0_hat, and its backward runs at once, freeing that chunk's VAE and reward activations; the
    collected g = dL_BP/dx0_hat then enters the generator's graph through the surrogate g . x0_hat,
    whose gradient w.r.t. theta is exactly dL_BP/dtheta by the chain rule. One path for every chunk
    size: only the memory changes with it.
    Returns (surrogate, L_BP value)."""
    x = x0_hat.detach().requires_grad_(True)
    value, B = 0.0, len(x)
    for i in chunks(B, chunk):
        out = bp_fn(bb.decode(x[i]), [prompts[k] for k in i])
        l_bp, _ = subgrpo.bp_loss(sum(w * out[k] for k, w in weights.items() if k in out), margin)
        (l_bp * len(i) / B).backward()  # mean over the sub-batch = size-weighted chunk means
        value += l_bp.detach() * len(i) / B
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
    would do this on every backward; one stage-2 step accumulates many backward calls.)"""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if world > 1:
            dist.all_reduce(p.grad)
            p.grad /= world


# ---------------------------------------------------------------------------------------------
# Shared helpers: parameters, EMA, checkpoints, logging, exported files
# ---------------------------------------------------------------------------------------------


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


def ema_copy(net):
    """The EMA model: a copy of `net` whose trainable tensors are new and whose frozen ones are
    shared (a LoRA student's base weights are the teacher's; copying them would double memory)."""
    frozen = [p for p in net.parameters() if not p.requires_grad] + list(net.buffers())
    ema = copy.deepcopy(net, {id(t): t for t in frozen})
    return ema.eval().requires_grad_(False)


@torch.no_grad()
def ema_update(ema, net, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta, on the trainable tensors only."""
    for p_ema, p in zip(ema.parameters(), raw(net).parameters()):
        if p.requires_grad:
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)


def rng_state():
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def gather_objects(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank (a collective: every rank calls it)."""
    out = [None] * world
    if world > 1:
        dist.all_gather_object(out, obj)
    else:
        out[0] = obj
    return out


def save_checkpoint(path, counter, nets, opts, shared_rng, args, world, master, extra=None, streams=None):
    """Everything an exact --resume needs, in one dict: the trainable tensors of each net (LoRA,
    or all for the toy), the optimiser states, the counter ({"step": n} or {"epoch": n}), every
    rank's RNG state (each rank draws its own noise), the shared generator's state, the config,
    and one checksum per rank of the generator's weights (the replicas must stay bitwise
    identical; the DDP tests compare them). Only tensors and plain types, so that it loads with
    torch.load(weights_only=True) (models.load_checkpoint). Every rank calls it; rank 0 writes.

    A run is never lost: weights that are not finite are never written (the run stops instead);
    the new file is written and synced under a temporary name first, and the previous checkpoint
    stays beside it as stage{1,2}.prev.pt (a hard link made before the rename), so at every
    moment `path` is one complete checkpoint, even if the process is killed mid-save."""
    states = gather_objects(rng_state() | ({"streams": streams} if streams else {}), world)
    weights = trainable(nets["generator"])
    checksum = sum(float((p.detach().double().flatten() * torch.arange(1, p.numel() + 1, device=p.device)).sum())
               for p in weights)
    sums = gather_objects(checksum, world)
    gen_names = [n for n, p in raw(nets["generator"]).named_parameters() if p.requires_grad]
    # the tensors saved per net: its trainable ones (the EMA copy has requires_grad off: the
    # generator's trainable names)
    names = {key: gen_names if key == "ema" else [n for n, p in raw(net).named_parameters() if p.requires_grad]
             for key, net in nets.items()}
    bad = [key for key, net in nets.items()
           if not all(torch.isfinite(raw(net).get_parameter(n)).all() for n in names[key])]
    if bad:  # every rank holds the same weights, so every rank stops here
        at = " ".join(f"{k} {v}" for k, v in counter.items())
        sys.exit(f"error: the {', '.join(bad)} weights are not finite at {at}; nothing was saved, "
                 f"{path} still holds the last good checkpoint: resume from it with a lower learning rate")
    if not master:
        return
    ck = {"replica_checksums": sums}
    for key, net in nets.items():
        sd = raw(net).state_dict()
        ck[key] = {k: sd[k].detach().cpu().clone() for k in names[key]}
    ck |= {k: opt.state_dict() for k, opt in opts.items()}
    ck |= counter | {"rng": states, "shared_rng": shared_rng.get_state(), "config": vars(args)}
    tmp, prev = path + ".tmp", previous_checkpoint(path)
    with open(tmp, "wb") as f:
        torch.save(ck | (extra or {}), f)
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


def load_checkpoint(path, nets, opts, shared_rng, rank):
    """Restore what save_checkpoint wrote, into the given nets and optimisers, this rank's RNG
    state and the shared generator. Read with models.load_checkpoint (weights_only: a checkpoint
    holding anything but tensors and plain types is refused with one line, never executed).
    Returns the checkpoint dict (for the counter)."""
    ck = read_checkpoint(path)
    for key, net in nets.items():
        raw(net).load_state_dict(ck[key], strict=False)
    for key, opt in opts.items():
        opt.load_state_dict(ck[key])
    torch.set_rng_state(ck["rng"][rank]["torch"])
    if "cuda" in ck["rng"][rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state(ck["rng"][rank]["cuda"])
    shared_rng.set_state(ck["shared_rng"])
    return ck


def previous_checkpoint(path):
    """Where save_checkpoint keeps the checkpoint that `path` replaced: stage1.pt -> stage1.prev.pt."""
    return path[:-len(".pt")] + ".prev.pt"


def read_checkpoint(path):
    """models.load_checkpoint, with its refusal (or an unreadable file) as one error line."""
    try:
        return models.load_checkpoint(path)
    except (ValueError, RuntimeError, EOFError) as e:
        prev = previous_checkpoint(path)
        hint = f"; the previous checkpoint is {prev}" if os.path.exists(prev) else ""
        sys.exit(f"error: {' '.join(str(e).split())}{hint}")


class UpdateGuard:
    """Guarded optimiser updates. A loss or gradient that is not finite (on any rank) skips that
    update: its gradient is dropped, the weights and the optimiser state stay as they were, and
    the log records it ("skipped" this iteration, "skipped_total" so far). --max-bad-updates such
    updates of one network in a row stop the run with one line, before anything is saved, so the
    last checkpoint (written before the trouble) is untouched."""

    def __init__(self, args, ckpt_path):
        self.limit, self.ckpt_path = args.max_bad_updates, ckpt_path
        self.total, self.in_a_row, self.now = 0, {}, []

    def step(self, name, opt, params, loss, grad_clip):
        """Clip the gradient of `params` to grad_clip and take opt's step, unless the loss or the
        gradient norm is not finite. Returns the gradient norm (a tensor, before clipping). The
        one host sync of an update is `if ok` (a skip must be decided before the step)."""
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
        """Exit (one line) once a network has had --max-bad-updates skipped updates in a row.
        where: "iteration 57" / "epoch 3", for the message."""
        for name, n in self.in_a_row.items():
            if n >= self.limit:
                sys.exit(f"error: {n} {name} updates in a row had a non-finite loss or gradient (the last at "
                         f"{where}); each was skipped and nothing was saved since, so {self.ckpt_path} "
                         "holds the last good state: resume from it with --resume and a lower learning rate")


class RunLog:
    """Rank 0's progress bar and log.jsonl; on other ranks every call does nothing."""

    def __init__(self, args, master, desc, start):
        self.args, self.master, self.desc, self.t0 = args, master, desc, time.time()
        if master:
            from tqdm import tqdm
            path = os.path.join(args.out, "log.jsonl")
            if start and os.path.exists(path):
                self.drop_records_after(path, args.stage, start)
            self.file = open(path, "a")
            self.bar = tqdm(total=args.steps, initial=start, desc=desc, dynamic_ncols=True)

    @staticmethod
    def drop_records_after(path, stage, start):
        """A resumed run continues from its checkpoint at `start`: the records this stage wrote
        after it (a killed run's last ones, maybe a half-written line) are dropped, so that the
        log reads as one uninterrupted run. Rewritten under a temporary name, then renamed."""
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
        """After every iteration / epoch: advance the bar; every log_every-th (and the last)
        appends the record to log.jsonl and shows `postfix` ({label: key of rec}) on the bar.
        The loops leave their numbers as device tensors; they reach the host here, on log steps
        only, in one transfer."""
        if not self.master:
            return
        self.bar.update(1)
        if step % self.args.log_every == 0 or step == self.args.steps or rec.get("skipped"):
            keys = [k for k, v in rec.items() if torch.is_tensor(v)]
            if keys:
                rec |= dict(zip(keys, torch.stack([rec[k].float().reshape(()) for k in keys]).tolist()))
            rec["time"] = round(time.time() - self.t0, 2)
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
            self.bar.set_postfix({label: f"{rec[key]:.4f}" for label, key in postfix.items()})

    def close(self):
        if self.master:
            self.bar.close()
            self.file.close()
            print0(f"{self.desc} done in {time.time() - self.t0:.1f}s -> {self.args.out}")


def write_samples_and_exports(args, bb, ema, stage, master):
    """Rank 0, after the last step: a picture of the EMA generator's samples (toy: a scatter plot of
    every sampler step; images: a grid, one row per prompt) and, for the real backbones, the EMA
    generator as a file a stock diffusers pipeline loads:
        stage 1: generator_ema_lora.safetensors (pipe.load_lora_weights, on the generator's base:
                 for FLUX.2 the distilled klein-4B, not the teacher)
        stage 2: generator_ema_stage2_lora.safetensors, the stage-2 LoRA only. It was trained on
                 top of the stage-1 EMA LoRA *merged* into the base, so inference merges stage 1,
                 then stage 2: bb.make_student("generator", stage=2, merge=[stage1_file,
                 stage2_file]) (models.load_run(run, 2) does the same from stage2.pt).
    A full fine-tune (lora_rank 0) is saved with save_pretrained instead."""
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


# ---------------------------------------------------------------------------------------------
# Profiling (--profile N): where the time of a training step goes
# ---------------------------------------------------------------------------------------------


class Profiler:
    """With --profile N, after a warm-up of PROFILE_WARMUP steps, N steps are timed phase by phase
    (PROF.phase: self time, so nested phases never count twice) and every forward call of the
    networks (generator, fake score, teacher, VAE decoder) is counted per phase. Then the same
    calls are replayed bare, on the inputs they saw, in the same process: the step time divided
    by that bare time says how much the training code adds to the network passes it needs.
    Without --profile, phase() is an empty context and no hook is installed."""

    def __init__(self):
        self.on = self.recording = False

    def attach(self, args, nets, device, start):
        """Start profiling if --profile: install the forward hooks, and end the run after the
        warm-up and N profiled steps (args.steps is set accordingly)."""
        if not args.profile:
            return
        self.on, self.args, self.device, self.start = True, args, device, start
        self.stack, self.time, self.calls, self.step_times, self.inputs = [], {}, {}, [], {}
        args.steps = start + PROFILE_WARMUP + args.profile
        for name, net in nets.items():
            if isinstance(net, torch.nn.Module):
                net.register_forward_hook(self._hook(name), with_kwargs=True)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            if not self.recording:
                return
            tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
            grad = torch.is_grad_enabled() and (any(p.requires_grad for p in module.parameters())
                                                or any(a.requires_grad for a in tensors))
            shapes = tuple(tuple(a.shape) for a in tensors)
            key = (name, grad, shapes)
            if key not in self.inputs:  # keep one copy of each kind of call, for the bare replay
                keep = lambda a: a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
                self.inputs[key] = (module, [keep(a) for a in args], {k: keep(v) for k, v in kwargs.items()})
            phase = self.stack[-1][0] if self.stack else "other"
            self.calls.setdefault(phase, {}).setdefault(key, 0)
            self.calls[phase][key] += 1
        return hook

    @contextlib.contextmanager
    def phase(self, name):
        """Time the block as phase `name`, excluding the phases nested inside it."""
        if not self.recording:
            yield
            return
        self._sync()
        now = time.perf_counter()
        if self.stack:  # pause the enclosing phase
            parent, since = self.stack[-1]
            self.time[parent] = self.time.get(parent, 0.0) + now - since
        self.stack.append([name, now])
        try:
            yield
        finally:
            self._sync()
            now = time.perf_counter()
            _, since = self.stack.pop()
            self.time[name] = self.time.get(name, 0.0) + now - since
            if self.stack:
                self.stack[-1][1] = now

    @contextlib.contextmanager
    def step(self, step):
        """One loop iteration; recorded once the warm-up is over."""
        self.recording = self.on and step >= self.start + PROFILE_WARMUP
        if not self.recording:
            yield
            return
        if step == self.start + PROFILE_WARMUP and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        t0 = time.perf_counter()
        with self.phase("other"):  # whatever no named phase covers (prompt draw, logging, ...)
            yield
        self._sync()
        self.step_times.append(time.perf_counter() - t0)

    def bare_seconds(self, key, autocast, repeats=5):
        """Seconds per bare call of one recorded kind: forward only, or forward + backward of the
        output's sum when the call was made with grad (as in training). The fastest of `repeats`
        runs after a warm-up run: the least disturbed by whatever else the machine is doing."""
        module, args, kwargs = self.inputs[key]
        best = float("inf")
        with torch.set_grad_enabled(key[1]):
            for i in range(repeats + 1):  # run 0 is the warm-up
                self._sync()
                t0 = time.perf_counter()
                with autocast:
                    out = module(*args, **kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                if key[1]:
                    out.float().sum().backward()
                self._sync()
                if i:
                    best = min(best, time.perf_counter() - t0)
                module.zero_grad(set_to_none=True)
                for a in list(args) + list(kwargs.values()):
                    if torch.is_tensor(a):
                        a.grad = None
        return best

    def report(self, stage, autocast, master):
        """Print the table and write profile_stage{stage}.json in the run folder (rank 0)."""
        if not self.on:
            return
        self.recording = False
        n = len(self.step_times)
        step_time = sum(self.step_times) / n
        bare = {key: self.bare_seconds(key, autocast) for key in self.inputs}
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            peak_what = "CUDA max_memory_allocated"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
            peak_what = "peak resident set of this process"
        rows = []
        for phase in sorted(self.time, key=self.time.get, reverse=True):
            calls = self.calls.get(phase, {})
            rows.append(dict(phase=phase, seconds_per_step=self.time[phase] / n,
                             share=self.time[phase] / n / step_time,
                             forward_calls=sum(calls.values()) / n,
                             backward_calls=sum(c for k, c in calls.items() if k[1]) / n,
                             bare_seconds_per_step=sum(c * bare[k] for k, c in calls.items()) / n))
        bare_total = sum(r["bare_seconds_per_step"] for r in rows)
        # The reward models are not replayed (their calls are not forward() calls of one module):
        # the second ratio leaves out the two phases that run them.
        backbone = [r for r in rows if r["phase"] not in ("rewards", "back-prop term")]
        backbone_time = sum(r["seconds_per_step"] for r in backbone)
        backbone_bare = sum(r["bare_seconds_per_step"] for r in backbone)
        out = dict(stage=stage, model=self.args.model, world_size=dist.get_world_size() if dist.is_initialized() else 1,
                   batch_size=self.args.batch_size, steps_profiled=n, warmup=PROFILE_WARMUP,
                   step_seconds=step_time, phases_sum_seconds=sum(r["seconds_per_step"] for r in rows),
                   bare_seconds=bare_total, step_over_bare=step_time / bare_total if bare_total else None,
                   backbone_phases_over_bare=backbone_time / backbone_bare if backbone_bare else None,
                   peak_memory_gib=peak, peak_memory_is=peak_what, device=str(self.device),
                   bf16=bool(self.args.bf16), grad_ckpt=bool(self.args.grad_ckpt), phases=rows,
                   bare_calls={f"{k[0]} {'fwd+bwd' if k[1] else 'fwd'} {list(k[2][:1])}": v for k, v in bare.items()})
        if not master:
            return out
        print0(f"\nprofile, stage {stage}, {self.args.model}: {n} steps after {PROFILE_WARMUP} warm-up, "
               f"{out['step_seconds']:.4f} s/step on {self.device}\n"
               f"{'phase':<26}{'s/step':>10}{'share':>8}{'fwd':>7}{'bwd':>7}{'bare s/step':>13}")
        for r in rows:
            print0(f"{r['phase']:<26}{r['seconds_per_step']:>10.4f}{r['share']:>8.1%}{r['forward_calls']:>7.1f}"
                   f"{r['backward_calls']:>7.1f}{r['bare_seconds_per_step']:>13.4f}")
        print0(f"{'sum of phases':<26}{out['phases_sum_seconds']:>10.4f}\n"
               f"step time / bare network passes: {step_time:.4f} / {bare_total:.4f} = "
               f"{out['step_over_bare'] or float('nan'):.2f}x"
               + (f" (without the reward-model phases: {backbone_time:.4f} / {backbone_bare:.4f} = "
                  f"{out['backbone_phases_over_bare']:.2f}x)" if len(backbone) < len(rows) else "")
               + f"\npeak memory {peak:.2f} GiB ({peak_what})")
        with open(os.path.join(self.args.out, f"profile_stage{stage}.json"), "w") as f:
            json.dump(out, f, indent=2)
        return out


def profiled_networks(bb, generator, fake):
    """The networks whose calls the profiler counts and replays bare: the two students, the
    teacher and, for the image backbones, the text encoders (every batch of prompts is encoded)
    and the VAE decoder (reward back-prop decodes with grad)."""
    nets = dict(generator=raw(generator), fake=raw(fake), teacher=bb.teacher)
    if hasattr(bb, "pipe"):
        nets |= {name: m for name, m in bb.pipe.components.items() if name.startswith("text_encoder")}
        nets["vae decoder"] = bb.pipe.vae.decoder
    return nets


PROFILE_WARMUP = 2  # steps run before timing starts (allocator, caches, lazy initialisation)
PROF = Profiler()   # module-level so that the phase functions can mark their parts


# ---------------------------------------------------------------------------------------------
# Memory plan (--memory-plan): every network built on the meta device from configs/architectures.json
# (shapes, no weights, offline); activations counted as the bytes autograd saves, by running the
# same bb.velocity / bb.decode / reward-tower calls as training under saved_tensors_hooks.
# ---------------------------------------------------------------------------------------------

GiB = 2 ** 30
ARCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "architectures.json")


def build_meta(cfg, dtype, device="meta"):
    """A diffusers / transformers module from a config dict {"class": ..., **kwargs}, on meta (or,
    random-init, on `device`: tests/test_cuda.py)."""
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


class SavedBytes:
    """Sums numel * element_size of the unique storages autograd saves (parameters excluded).
    Installed as the students' gradient-checkpointing function, it runs each block plainly but
    books it apart, so one forward gives both figures: without checkpointing, outside + all blocks;
    with it, outside + the kept block inputs + the largest block (recomputed during backward)."""

    def __init__(self, *nets):
        self.skip = {t.untyped_storage()._cdata for n in nets for t in list(n.parameters()) + list(n.buffers())}
        self.outside = self.inputs = self.blocks = self.largest = 0
        self.seen, self.block = set(), None

    def pack(self, t):
        key = t.untyped_storage()._cdata
        if key not in self.skip and key not in self.seen:
            self.seen.add(key)
            n = t.untyped_storage().nbytes()
            if self.block is None:
                self.outside += n
            else:
                self.block += n
        return t

    def checkpoint(self, module, *a):
        self.inputs += sum(x.untyped_storage().nbytes() for x in a if torch.is_tensor(x) and x.requires_grad)
        self.block = 0
        out = module(*a)
        self.blocks, self.largest, self.block = self.blocks + self.block, max(self.largest, self.block), None
        return out

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        return self.ctx.__enter__()

    def __exit__(self, *e):
        return self.ctx.__exit__(*e)

    def total(self, ckpt):
        return self.outside + (self.inputs + self.largest if ckpt else self.blocks)


class FlashAttention(torch.autograd.Function):
    """On meta, F.scaled_dot_product_attention takes the math path and would count the L x L
    scores; the CUDA (and CPU) fused kernels save q, k, v, the output and a float32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def plan_sdpa(*a, **kw):
    q, k, v = (list(a) + [kw.get(n) for n in ("query", "key", "value")[len(a):]])[:3]
    return FlashAttention.apply(q, k, v)


def meta_backbone(name, arch, resolution, dtype, lora_rank, device="meta", text=True, lora_dtype=torch.float32):
    """A backbone without pipeline or text encoders' use: enough for make_student, velocity,
    decode, noise and the sampler (the conditioning comes from meta_cond)."""
    family = models.SPECS[name][0]
    bb = object.__new__(models.SD3Backbone if family == "sd3" else models.Flux2Backbone)
    vae = build_meta(arch["vae-" + family], dtype, device)
    bb.pipe = argparse.Namespace(vae=vae)
    bb.name, bb.device, bb.dtype, bb.resolution = name, torch.device(device), dtype, resolution
    bb.lora_rank, bb.lora_alpha, bb.gradient_checkpointing = lora_rank, 2 * lora_rank, False
    bb.lora_dtype = lora_dtype
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


def memory_plan(args, arch=None):
    """Print the per-GPU plan; return 0 if the peak fits in --gpu-memory GiB, else a message."""
    resolve_defaults(args, cuda=True)
    arch = arch or json.load(open(ARCH))
    res, world = args.resolution or models.SPECS[args.model][4], args.gpus
    if args.batch_size % (world * args.grad_accum):
        return f"error: --batch-size {args.batch_size} does not split over --gpus {world} x --grad-accum {args.grad_accum}"
    b = args.batch_size // (world * args.grad_accum)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    F_sdpa, torch.nn.functional.scaled_dot_product_attention = torch.nn.functional.scaled_dot_product_attention, plan_sdpa
    try:
        lora_dtype = torch.bfloat16 if args.lora_dtype == "bf16" else torch.float32
        bb = meta_backbone(args.model, arch, res, dtype, args.lora_rank, text=not args.cache_text_embeddings,
                           lora_dtype=lora_dtype)
        gen, fake = bb.make_student("generator", stage=args.stage), bb.make_student("fake", stage=args.stage)
        names = [n for n, w in (dict(rewards.GRPO_WEIGHTS) if not args.rewards else
                                {k: 1 for k in args.rewards.split(",")}).items()]
        tower_cfg = {"clipscore": "clip-vit-l-14", "hpsv2": "clip-vit-h-14", "pickscore": "clip-vit-h-14"}
        towers = [build_meta(arch[tower_cfg[n]], torch.float32) for n in names if n in tower_cfg] \
            if args.stage == 2 else []
        size = lambda *nets: sum(t.numel() * t.element_size() for t in {
            id(t): t for n in nets for t in list(n.parameters()) + list(n.buffers())}.values())
        lora = sum(p.numel() for p in trainable(gen))
        ck = bool(args.grad_ckpt)
        fwd = lambda net, n: velocity_bytes(bb, net, n, ck)
        if args.stage == 1:  # fake: v at b + the consistency pair at 2b; generator: its last step
            phases = {"fake-score step": fwd(fake, b) + (fwd(fake, 2 * b) if args.consistency_weight else 0),
                      "generator step": fwd(gen, b)}
        else:
            fb, chunk = args.fake_batch_size or b * args.num_batches_per_epoch, args.bp_batch_size or b
            phases = {"rollouts (no grad)": 0,
                      "fake-score step": fwd(fake, fb) + (fwd(fake, 2 * fb) if args.consistency_weight else 0),
                      "generator step (PPO)": fwd(gen, b),
                      "generator step (DM + back-prop)": fwd(gen, b) + (0 if args.no_bp else bp_bytes(bb, towers, chunk))}
    finally:
        torch.nn.functional.scaled_dot_product_attention = F_sdpa
    merged = 0
    if args.stage == 2:  # stage-1 LoRA merged: new weight tensors for the targeted Linears, per student
        merged = 2 * sum(m.weight.numel() * m.weight.element_size() for m in models.lora_layers(gen).values())
    rows = {"weights: transformer(s) + VAE": size(bb.teacher, bb.generator_base, bb.pipe.vae) + merged,
            "weights: text encoders" + (" (cached: off GPU)" if args.cache_text_embeddings else ""):
                size(*bb.text_encoders),
            "weights: reward towers (float32)": size(*towers) if towers else 0,
            # per net: master, grad and AdamW's two moments, all in the master dtype; one EMA
            f"LoRA (2 nets) + grads + AdamW + EMA, {args.lora_dtype}": lora * (2 if args.lora_dtype == "bf16" else 4) * (2 * 4 + 1)}
    static = sum(rows.values())
    print(f"memory plan per GPU | {args.model} stage {args.stage} | {world} GPU(s) x {b} samples"
          f" x grad-accum {args.grad_accum} = batch {args.batch_size} | {res} px | LoRA r {args.lora_rank}"
          f" ({lora / 1e6:.2f} M per net) | grad ckpt {ck} | {str(dtype)[6:]}")
    for k, v in rows.items():
        print(f"  {k:<48} {v / GiB:7.2f} GiB")
    for k, v in phases.items():
        print(f"  activations: {k:<35} {v / GiB:7.2f} GiB  -> {(static + v) / GiB:6.2f} GiB")
    peak = max(phases, key=phases.get)
    total = (static + phases[peak]) / GiB
    print(f"  peak: {peak}, {total:.2f} GiB of --gpu-memory {args.gpu_memory:g} GiB")
    args.planned_gib = total
    if total <= args.gpu_memory:
        return 0
    batch = "raise --grad-accum (or lower --batch-size)"
    fix = {"fake-score step": "lower --fake-batch-size to 1" if args.stage == 2 else batch,
           "generator step (DM + back-prop)": "lower --bp-batch-size to 1, then " + batch}
    return (f"error: the plan's peak ({total:.1f} GiB, {peak}) exceeds --gpu-memory {args.gpu_memory:g}; "
            f"{fix.get(peak, batch)}"
            + ("" if ck else ", or turn on --grad-ckpt 1") + ("" if args.cache_text_embeddings else
                                                           ", or pass --cache-text-embeddings"))


if __name__ == "__main__":
    main()
