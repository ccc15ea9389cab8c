"""GPU check: real-size SD3.5-M with random weights built from configs/architectures.json, one
stage-1 iteration and one stage-2 generator + fake-score step with the one-GPU 80 GB recipe's
settings (bf16, gradient checkpointing, LoRA r 32, 512 px, 9 images per micro-batch, text
embeddings cached), against `train.py --memory-plan`'s figure for the same settings.
    python -m pytest -q -s tests/test_cuda.py
test_steps_on_cpu runs the same code on tiny configs, so that only the device differs."""
import json
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import acdmd
import models
import rewards
import subgrpo
import train

TINY_VAE = dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5035, shift_factor=0.0609)
TINY_CLIP = dict(projection_dim=16, text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2),
                 vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=224, patch_size=14))
TINY = {"tiny-sd35": dict({"class": "SD3Transformer2DModel"}, sample_size=8, patch_size=2, in_channels=4,
                          out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                          joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                          pos_embed_max_size=16, dual_attention_layers=[0], qk_norm="rms_norm"),
        "vae-sd3": dict({"class": "AutoencoderKL"}, **TINY_VAE),
        "clip-vit-l-14": dict({"class": "CLIPModel"}, **TINY_CLIP),
        "clip-vit-h-14": dict({"class": "CLIPModel"}, **TINY_CLIP)}
ONE_GPU_80GB = ["--gpus", "1", "--grad-accum", "8", "--cache-text-embeddings"]


def run_steps(model, arch, device, dtype, stage, extra=()):
    """Plan, then build on `device` and run one step of `stage` as train.py does.
    Returns (losses, planned GiB, peak GiB or None, seconds)."""
    argv = ["--stage", str(stage), "--model", model, "--memory-plan", "--grad-ckpt", "1",
            "--bf16", str(int(dtype == torch.bfloat16)), *ONE_GPU_80GB, *extra]
    args = train.get_args(argv)
    assert train.memory_plan(args, arch) == 0
    b = args.batch_size // (args.gpus * args.grad_accum)
    torch.manual_seed(0)
    bb = train.meta_backbone(model, arch, args.resolution or models.SPECS[model][4], dtype, args.lora_rank,
                             device=device, text=False,
                             lora_dtype=torch.bfloat16 if args.lora_dtype == "bf16" else torch.float32)
    bb.gradient_checkpointing, args.guidance = True, bb.guidance
    merge = models.lora_state_dict(bb.make_student("generator")) if stage == 2 else None
    generator, fake = bb.make_student("generator", stage, merge), bb.make_student("fake", stage, merge)
    ema = train.ema_copy(generator)
    opt_g, opt_f = (torch.optim.AdamW(train.trainable(n), lr=1e-6) for n in (generator, fake))
    towers = [train.build_meta(arch[k], torch.float32, device) for k in ("clip-vit-l-14", "clip-vit-h-14", "clip-vit-h-14")] \
        if stage == 2 else []
    ctx = train.run_context(args, torch.device(device))
    ctx.bb, ctx.autocast = bb, torch.autocast(bb.device.type, torch.bfloat16, enabled=dtype == torch.bfloat16)
    m = SimpleNamespace(generator=generator, fake=fake, opt_g=opt_g, opt_f=opt_f)
    cond, ctx.null_cond = train.meta_cond(bb, b, 16), train.meta_cond(bb, b, 16)
    null, autocast = ctx.null_cond, ctx.autocast
    if device == "cuda":
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if stage == 1:
        rec = train.stage1_fake_step(ctx, m, [cond])
        rec |= train.stage1_generator_step(ctx, m, [cond])
        losses = [rec["fake_loss"], rec["gen_loss"]]
    else:
        texts = [F.normalize(torch.randn(b, m.config.projection_dim, device=device), dim=-1) for m in towers]

        def bp_fn(images, prompts):  # the towers' image side, as rewards.CLIPBackbone.embed
            px = rewards.preprocess(images, 224)
            return {"r": sum((F.normalize(rewards._pooled(m.get_image_features(pixel_values=px)), dim=-1) * t[:len(px)]).sum(-1)
                             for m, t in zip(towers, texts))}
        x0 = bb.noise(b * args.num_batches_per_epoch)
        cond_all = train.meta_cond(bb, len(x0), 16)
        rec = train.stage2_fake_step(ctx, m, {"x0": x0, "cond": cond_all})
        ctx.bp_fn, ctx.weights = bp_fn, {"r": 1.0}
        final = len(bb.sigmas) - 2
        with autocast:
            x0_hat = subgrpo.final_step_x0(bb, generator, bb.noise(b), float(bb.sigmas[final]), cond)
            t, _, x_t = acdmd.make_subinterval(x0_hat, 0.0, acdmd.sample_renoise_timesteps(0.0, b))
            l_dm, _ = acdmd.generator_loss(bb, fake, x0_hat, 0.0, t, x_t, cond, null, bb.guidance, args.eta, True)
            l_bp, _ = train.bp_surrogate(ctx, x0_hat, [""] * b)
        (args.w_dm * l_dm + args.w_bp * l_bp).backward()
        losses = [rec["fake_loss"], l_dm.item(), l_bp.item()]
        opt_g.step()
    train.ema_update(ema, generator, 0.99)
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    seconds = time.perf_counter() - start
    lora = {id(p) for p in train.trainable(generator)}
    assert lora and all((p.grad is not None) == (id(p) in lora) for p in generator.parameters())
    assert all(p.grad is None for n in [bb.teacher, bb.pipe.vae, *towers] for p in n.parameters())
    assert any(p.grad.abs().sum() > 0 for p in train.trainable(generator))
    return losses, args.planned_gib, peak, seconds


def test_steps_on_cpu():
    for stage in (1, 2):
        losses, planned, _, _ = run_steps("tiny-sd35", TINY, "cpu", torch.float32, stage)
        assert all(torch.isfinite(torch.tensor(losses))) and planned > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (about 40 GiB free): real-size "
                    "SD3.5-M, random weights, one step per stage")
def test_sd35_real_size_steps_on_cuda():
    arch = json.load(open(train.ARCH))
    for stage in (1, 2):
        losses, planned, peak, seconds = run_steps("sd3.5-medium", arch, "cuda", torch.bfloat16, stage)
        print(f"stage {stage}: losses {losses}, step {seconds:.1f} s, peak {peak:.2f} GiB, planned {planned:.2f} GiB")
        assert all(torch.isfinite(torch.tensor(losses)))
        assert abs(peak / planned - 1) < 0.15, (stage, peak, planned)
        torch.cuda.empty_cache()
