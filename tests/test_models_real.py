"""Tests of the real backbones (models.py section 3) and the hand-written LoRA (section 4), on the
tiny random-init twins: shapes, timestep conventions, sigma schedules, samplers against the stock
diffusers pipelines, LoRA merge / re-init / file format, and the error for a wrong --pretrained."""
import json
import math
import os

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tiny import TINY, load_tiny, tiny_dir  # noqa: F401  (pytest fixtures)
import models
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS = ["a red cat", "two dogs"]


def randomize_lora(net, seed=0):
    """Give every LoRA a non-zero B so merges and file round trips are actually tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in models.lora_layers(net).values():
            m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))


def inputs(bb, n=2, seed=0):
    x = bb.noise(n, torch.Generator().manual_seed(seed))
    return x, torch.linspace(0.9, 0.3, n), bb.encode(PROMPTS[:n])


# --- interface: encode / velocity / decode ----------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_load_interface_shapes(load_tiny, name):
    bb = load_tiny(name)
    x, sigma, cond = inputs(bb)
    assert x.shape == (2, *bb.latent_shape) and x.dtype == torch.float32
    null = bb.encode(["", ""])
    assert set(null) == set(cond) and all(null[k].shape == cond[k].shape for k in cond)
    assert not torch.allclose(null["prompt_embeds"], cond["prompt_embeds"])
    assert torch.equal(bb.encode([PROMPTS[1]])["prompt_embeds"][0], cond["prompt_embeds"][1])
    v = bb.velocity(bb.teacher, x, sigma, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    x.requires_grad_(True)
    img = bb.decode(x)
    res = bb.resolution
    assert img.shape == (2, 3, res, res) and img.min() >= 0 and img.max() <= 1
    img.mean().backward()  # decode is differentiable w.r.t. the latents
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert bb.sigmas.shape == (5,) and bb.sigmas[-1] == 0
    assert bb.guidance == {"tiny-sd3": 7.0, "tiny-sd35": 4.5, "tiny-flux2": 4.0}[name]


def test_make_student_flux2_generator_is_not_teacher(load_tiny):
    """FLUX.2's generator starts from the distilled model, not the teacher (pitfall 8.12)."""
    bb = load_tiny("tiny-flux2")
    x, sigma, cond = inputs(bb)
    g = bb.make_student("generator")
    v_g, v_t = bb.velocity(g, x, sigma, cond), bb.velocity(bb.teacher, x, sigma, cond)
    assert torch.allclose(v_g, bb.velocity(bb.generator_base, x, sigma, cond), atol=1e-6)
    assert (v_g - v_t).abs().max() > 1e-2
    f = bb.make_student("fake")
    assert torch.allclose(bb.velocity(f, x, sigma, cond), v_t, atol=1e-6)


def test_velocity_timestep_convention(load_tiny):
    """SD3 gets tau = 1000 sigma, FLUX.2 gets sigma (it multiplies by 1000 inside)."""
    for name, scale in (("tiny-sd3", 1000.0), ("tiny-flux2", 1.0)):
        bb = load_tiny(name)
        seen = []
        h = bb.teacher.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
        x, sigma, cond = inputs(bb)
        bb.velocity(bb.teacher, x, sigma, cond)
        h.remove()
        assert torch.allclose(seen[0].float(), sigma * scale)


# --- sigma schedules (models.py, section 1) ----------------------------------------------------


def test_flux2_sigmas_table():
    table = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
    assert torch.allclose(models.sd3_sigmas(shift=3.0), table, atol=1e-7)
    f512 = torch.tensor([1.0, 0.95809, 0.88398, 0.71750, 0.0])
    f1024 = torch.tensor([1.0, 0.96738, 0.90814, 0.76720, 0.0])
    assert torch.allclose(models.flux2_sigmas(resolution=512), f512, atol=1e-5)
    assert torch.allclose(models.flux2_sigmas(resolution=1024), f1024, atol=1e-5)
    assert abs(models.flux2_empirical_mu(1024, 4) - 2.03069) < 1e-5
    assert abs(models.flux2_empirical_mu(4096, 4) - 2.29118) < 1e-5


@pytest.mark.parametrize("name", TINY)
def test_sd3_sigmas_flux2_sigmas_equal_stock_scheduler(load_tiny, name):
    """The stock scheduler, given the *unshifted* u = step/1000 (and klein's mu), shifts them once
    and lands exactly on bb.sigmas: our shift is diffusers' shift, applied once."""
    bb = load_tiny(name)
    sched = bb.pipe.scheduler
    u = [s / 1000 for s in models.DENOISING_STEP_LIST]
    kw = {}
    if bb.family == "flux2":
        kw["mu"] = models.flux2_empirical_mu(bb.latent_shape[1] * bb.latent_shape[2], 4)
    sched.set_timesteps(sigmas=u, **kw)
    assert torch.allclose(sched.sigmas.float(), bb.sigmas, atol=1e-6)


# --- samplers against the stock pipelines -----------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_euler_sample_teacher_matches_stock_pipeline(load_tiny, name):
    """sample.euler_sample with CFG (guidance g, null = encoded "") reproduces the stock
    StableDiffusion3Pipeline / Flux2KleinPipeline on the paper's 4-step sigmas, from the same
    initial latents; both compared as VAE latents (output_type="latent")."""
    bb = load_tiny(name)
    x = bb.noise(2, torch.Generator().manual_seed(1))
    u = [s / 1000 for s in models.DENOISING_STEP_LIST]
    res = bb.resolution
    with torch.no_grad():
        if bb.family == "sd3":
            ref = bb.pipe(prompt=PROMPTS, sigmas=u, guidance_scale=bb.guidance, height=res,
                          width=res, latents=x, output_type="latent",
                          max_sequence_length=bb.max_sequence_length).images
        else:  # klein computes its mu from num_inference_steps (default 50) even given sigmas
            ref = bb.pipe(prompt=PROMPTS, sigmas=u, num_inference_steps=len(u),
                          guidance_scale=bb.guidance, height=res,
                          width=res, latents=x, output_type="latent",
                          max_sequence_length=bb.max_sequence_length,
                          text_encoder_out_layers=bb.text_layers).images
        assert torch.allclose(bb.pipe.scheduler.sigmas.float(), bb.sigmas, atol=1e-6)
        ours = sample.euler_sample(bb, bb.teacher, x, bb.sigmas, bb.encode(PROMPTS),
                                   bb.encode(["", ""]), guidance=bb.guidance)
        ours = bb.to_vae_latents(ours)
    assert ref.shape == ours.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux2"])
def test_teacher_sigmas_and_pipeline_latents_are_the_stock_pipeline(load_tiny, name):
    """bb.teacher_sigmas(N) is bitwise the schedule the stock pipeline runs for N steps (SD3: 1000
    down to 1000 sigma_min, static shift; klein: linspace(1, 1/N) shifted with mu(tokens, N)), and
    bb.pipeline_latents, fed our embeddings, is bitwise the pipeline fed the prompt strings; Euler +
    CFG over teacher_sigmas lands on it."""
    bb = load_tiny(name)
    for steps in (3, 28):
        sched = type(bb.pipe.scheduler).from_config(bb.pipe.scheduler.config)
        if bb.family == "sd3":
            sched.set_timesteps(steps)
            t_min = 1000 * sched.sigma_min  # the shifted sigma_min (2.994 for shift 3)
            assert torch.allclose(sched.sigmas[:-1].double(), models.sd3_sigmas(
                torch.linspace(1000.0, t_min, steps).tolist(), 3.0)[:-1].double(), atol=1e-6)
        else:
            sched.set_timesteps(sigmas=torch.linspace(1, 1 / steps, steps).tolist(),
                                mu=models.flux2_empirical_mu(bb.latent_shape[1] ** 2, steps))
        assert torch.equal(sched.sigmas.float().cpu(), bb.teacher_sigmas(steps))
    x = bb.noise(2, torch.Generator().manual_seed(3))
    kw = dict(text_encoder_out_layers=bb.text_layers) if bb.family == "flux2" else {}
    with torch.no_grad():
        ref = bb.pipe(prompt=PROMPTS, num_inference_steps=3, guidance_scale=bb.guidance,
                      height=bb.resolution, width=bb.resolution, latents=x, output_type="latent",
                      max_sequence_length=bb.max_sequence_length, **kw).images
        ours = sample.euler_sample(bb, bb.teacher, x, bb.teacher_sigmas(3), bb.encode(PROMPTS),
                                   bb.encode(["", ""]), guidance=bb.guidance)
        assert torch.equal(bb.pipeline_latents(PROMPTS, x, 3), ref)
        assert torch.allclose(bb.to_vae_latents(ours), ref, atol=1e-5)
        assert torch.equal(bb.decode_vae(bb.to_vae_latents(ours)), bb.decode(ours))


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux2"])
def test_cps_step_eta0_matches_stock_euler_scheduler(load_tiny, name):
    """CPS with eta = 0 is the stock FlowMatchEulerDiscreteScheduler at the same sigmas."""
    bb = load_tiny(name)
    x, _, cond = inputs(bb, seed=2)
    g = bb.make_student("generator")
    randomize_lora(g)
    sched = bb.pipe.scheduler
    u = [s / 1000 for s in models.DENOISING_STEP_LIST]
    kw = {}
    if bb.family == "flux2":
        kw["mu"] = models.flux2_empirical_mu(bb.latent_shape[1] ** 2, 4)
    sched.set_timesteps(sigmas=u, **kw)
    with torch.no_grad():
        ours = sample.rollout(bb, g, x, cond, eta=0.0)[-1]
        ref = x
        for i, t in enumerate(sched.timesteps):
            v = bb.velocity(g, ref, sched.sigmas[i].expand(2), cond)
            ref = sched.step(v, t, ref, return_dict=False)[0]
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


# --- students: LoRA, checkpointing, precision -------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_make_student_lora_grads_ckpt_bf16(load_tiny, name):
    """Only LoRA parameters train; gradient checkpointing gives the same grads; a bf16-autocast
    forward/backward is finite; the teacher's (shared) weights get no grads."""
    bb = load_tiny(name)
    bb_ckpt = load_tiny(name, gradient_checkpointing=True)
    x, sigma, cond = inputs(bb)
    grads = []
    for b in (bb, bb_ckpt):
        torch.manual_seed(0)
        net = b.make_student("fake")
        names = {n for n, p in net.named_parameters() if p.requires_grad}
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
        assert b.velocity(net, x, sigma, cond).pow(2).mean().backward() is None
        grads.append({n: p.grad for n, p in net.named_parameters() if p.requires_grad})
        assert all(p.grad is None for n, p in net.named_parameters() if n not in names)
        assert all(p.grad is None for p in b.teacher.parameters())
    assert bb_ckpt.make_student("fake").gradient_checkpointing
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    # lora_B gets a grad at init (B = 0, A != 0); lora_A's grad is 0 there, by construction
    assert any(g.abs().sum() > 0 for n, g in grads[0].items() if "lora_B" in n)
    net = bb_ckpt.make_student("generator")
    randomize_lora(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bb_ckpt.velocity(net, x, sigma, cond).pow(2).mean()
    loss.backward()
    # SD3's last joint block is context_pre_only: its text queries (attn.add_q_proj) only feed
    # the text output, which is dropped, so that LoRA is dead weight (zero grad; the official
    # target list includes it all the same)
    last = f"transformer_blocks.{len(net.transformer_blocks) - 1}.attn.add_q_proj."
    trained = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in trained.values())
    dead = {n for n, p in trained.items() if p.grad.abs().sum() == 0}
    assert dead == ({n for n in trained if n.startswith(last)} if bb.family == "sd3" else set())


@pytest.mark.parametrize("name", ["tiny-sd35", "tiny-flux2"])
def test_load_bf16_weights(load_tiny, name):
    """bf16 weights (the paper's precision) with float32 LoRA: forward/backward finite, and the
    velocity close to the float32 one."""
    bb, bb16 = load_tiny(name), load_tiny(name, dtype=torch.bfloat16)
    x, sigma, cond = inputs(bb)
    net = bb16.make_student("generator")
    v16 = bb16.velocity(net, x, sigma, bb16.encode(PROMPTS))
    assert v16.dtype == torch.float32 and bb16.decode(x).dtype == torch.float32
    v16.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in net.parameters() if p.requires_grad)
    v32 = bb.velocity(bb.generator_base, x, sigma, cond)
    assert (v16 - v32).abs().mean() < 0.05 * v32.abs().mean()


def test_lora_targets_pinned_per_backbone_and_stage():
    """The exact target lists on the module trees diffusers builds, for both families and both
    stages (official code: configs/cold_start/*.yaml, configs/rtdmd/*.yaml): SD3.x the 8 joint-
    attention projections; FLUX.2 9 projection names plus single_transformer_blocks.{0..19}
    .attn.to_out, in stage 2 too (the fresh stage-2 LoRA of generator and fake score)."""
    import diffusers as D
    sd3 = D.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                                  num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                  joint_attention_dim=64, caption_projection_dim=32,
                                  pooled_projection_dim=64, pos_embed_max_size=16,
                                  dual_attention_layers=(0,), qk_norm="rms_norm")
    joint = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    want_sd3 = [f"transformer_blocks.{b}.attn.{n}" for b in range(2) for n in joint
                if not (b == 1 and n == "to_add_out")]  # the last block is context_pre_only
    flux = D.Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2,
                                     num_single_layers=22, attention_head_dim=16,
                                     num_attention_heads=2, joint_attention_dim=48,
                                     timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                     guidance_embeds=False)
    want_flux = ([f"transformer_blocks.{b}.attn.{n}" for b in range(2) for n in joint]
                 + [f"single_transformer_blocks.{b}.attn.to_qkv_mlp_proj" for b in range(22)]
                 + [f"single_transformer_blocks.{b}.attn.to_out" for b in range(20)])  # not 20, 21
    assert sorted(models.lora_targets(sd3, "sd3")) == sorted(want_sd3), "SD3.x LoRA targets: not the official list"
    assert sorted(models.lora_targets(flux, "flux2")) == sorted(want_flux), "FLUX.2 LoRA targets: not the official list"


def test_make_student_flux2_stage2_targets_single_block_out(load_tiny, tmp_path):
    """FLUX.2's fresh stage-2 LoRA of generator and fake score wraps the single blocks'
    attn.to_out, as stage 1 does (official code: configs/rtdmd/flux2_4b.yaml)."""
    bb = load_tiny("tiny-flux2")
    for role in ("generator", "fake"):
        s1 = bb.make_student(role)
        path = str(tmp_path / f"{role}.safetensors")
        models.save_lora(s1, path)
        s2 = models.lora_layers(bb.make_student(role, stage=2, merge=path))
        assert "single_transformer_blocks.0.attn.to_out" in s2, f"{role}: stage 2 lost single-block to_out"
        assert set(s2) == set(models.lora_layers(s1)), f"{role}: stage-2 targets differ from stage 1's"


@pytest.mark.parametrize("name", ["tiny-sd35", "tiny-flux2"])
def test_merge_lora_and_stage2_reinit(load_tiny, name, tmp_path):
    bb = load_tiny(name)
    x, sigma, cond = inputs(bb)
    v_teacher = bb.velocity(bb.teacher, x, sigma, cond).detach()
    g = bb.make_student("fake")
    randomize_lora(g)
    v_lora = bb.velocity(g, x, sigma, cond).detach()
    assert (v_lora - v_teacher).abs().max() > 1e-3  # the LoRA does something
    path = str(tmp_path / "fake_lora.safetensors")
    models.save_lora(g, path)
    # merge equals unmerged, and leaves the shared teacher weights alone
    merged = models.merge_lora(models.shared_copy(g))
    assert not models.lora_layers(merged)
    assert torch.allclose(bb.velocity(merged, x, sigma, cond), v_lora, atol=1e-5)
    assert torch.equal(bb.velocity(bb.teacher, x, sigma, cond), v_teacher)
    # stage 2: merge the saved stage-1 LoRA, then a fresh LoRA with B = 0, A ~ N(0, 1)
    s2 = bb.make_student("fake", stage=2, merge=path)
    assert torch.allclose(bb.velocity(s2, x, sigma, cond), v_lora, atol=1e-5)
    layers = models.lora_layers(s2)
    assert all(m.lora_B.weight.abs().sum() == 0 for m in layers.values())
    A = torch.cat([m.lora_A.weight.flatten() for m in layers.values()])
    assert abs(A.std().item() - 1.0) < 0.05
    A1 = torch.cat([m.lora_A.weight.flatten() for m in models.lora_layers(g).values()])
    assert abs(A1.std().item() * 32 - 1.0) < 0.1  # stage 1: peft's gaussian init, std 1/r
    # inference recipe (official code: rtdmd/inference.py): merge [stage-1 LoRA, stage-2 LoRA] in order
    randomize_lora(s2, seed=1)
    v_s2 = bb.velocity(s2, x, sigma, cond).detach()
    models.save_lora(s2, str(tmp_path / "s2.safetensors"))
    final = bb.make_student("fake", stage=2, merge=[path, str(tmp_path / "s2.safetensors")])
    models.merge_lora(final)  # fold the (zero) fresh LoRA too: a plain transformer is left
    assert not models.lora_layers(final)
    assert torch.allclose(bb.velocity(final, x, sigma, cond), v_s2, atol=1e-5)
    assert set(layers) == set(models.lora_layers(g)), "stage 2 must wrap the same modules as stage 1"


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux2"])
def test_save_lora_file_format_and_export_merged(load_tiny, name, tmp_path):
    """Keys and shapes are what diffusers' LoRA loader expects; alpha/r travel in the metadata;
    the merged export is a plain transformer folder a stock pipeline loads."""
    import diffusers as D
    bb = load_tiny(name)
    g = bb.make_student("generator")
    randomize_lora(g)
    path = str(tmp_path / "lora.safetensors")
    models.save_lora(g, path)
    base_sd = bb.generator_base.state_dict()
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
        for k in keys:
            prefix, rest = k.split(".", 1)
            module, kind = rest.rsplit(".lora_", 1)[0], rest.rsplit(".", 2)[-2]
            assert prefix == "transformer" and kind in ("lora_A", "lora_B")
            W = base_sd[module + ".weight"]
            shape = f.get_slice(k).get_shape()
            assert shape == ([32, W.shape[1]] if kind == "lora_A" else [W.shape[0], 32])
    assert meta["transformer.r"] == 32 and meta["transformer.lora_alpha"] == 64
    assert len(keys) == 2 * len(meta["transformer.target_modules"])
    # diffusers' own parser keeps our keys as they are (no format conversion kicks in)
    cls = type(bb.pipe)
    parsed = cls.lora_state_dict(path)
    assert sorted(parsed) == sorted(keys)
    # round trip into a fresh copy
    x, sigma, cond = inputs(bb)
    v = bb.velocity(g, x, sigma, cond)
    fresh = models.load_lora(models.shared_copy(bb.generator_base), path)
    assert torch.allclose(bb.velocity(fresh, x, sigma, cond), v, atol=1e-6)
    # merged export, loaded back by plain diffusers
    models.export_merged(g, str(tmp_path / "merged"))
    assert models.lora_layers(g)  # exporting does not merge the live student
    tr = type(bb.teacher).from_pretrained(str(tmp_path / "merged"))
    assert torch.allclose(bb.velocity(tr, x, sigma, cond), v, atol=1e-5)
    if bb.family == "flux2":  # a bare transformer folder also works as generator_pretrained
        bb2 = load_tiny(name, generator_pretrained=str(tmp_path / "merged"))
        assert torch.allclose(bb2.velocity(bb2.generator_base, x, sigma, cond), v, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux2"])
def test_save_lora_matches_stock_load_lora_weights(load_tiny, name, tmp_path):
    """With peft installed, a stock pipeline's load_lora_weights applies our file and gives our
    student's output (checks key names *and* the alpha/r = 2 scale). Skipped without peft."""
    pytest.importorskip("peft")
    bb = load_tiny(name)
    g = bb.make_student("generator")
    randomize_lora(g)
    path = str(tmp_path / "lora.safetensors")
    models.save_lora(g, path)
    x, sigma, cond = inputs(bb)
    v = bb.velocity(g, x, sigma, cond)
    folder = bb.pipe.config._name_or_path
    if bb.family == "flux2":  # the generator base is the distilled twin
        folder = os.path.join(os.path.dirname(folder), "distilled")
    pipe = type(bb.pipe).from_pretrained(folder)
    pipe.load_lora_weights(path)

    v_stock = bb.velocity(pipe.transformer, x, sigma, cond)
    assert torch.allclose(v_stock, v, atol=1e-5), (v_stock - v).abs().max()


def test_make_student_full_finetune_switch(tiny_dir):
    bb = models.load("tiny-sd3", cache_dir=tiny_dir, lora_rank=0)
    net = bb.make_student("generator")
    assert not models.lora_layers(net) and all(p.requires_grad for p in net.parameters())
    assert not any(p is q for p, q in zip(net.parameters(), bb.teacher.parameters()))


# --- errors, images ---------------------------------------------------------------------------


def test_load_pipeline_bad_pretrained_is_one_clear_line(tmp_path):
    for name, where in (("sd3-medium", str(tmp_path / "no_such_folder")),
                        ("sd3.5-medium", str(tmp_path)),  # exists but is not a pipeline
                        ("flux2-klein-4b", None)):        # hub id, offline, not downloaded
        with pytest.raises(SystemExit) as e:
            models.load(name, pretrained=where)
        msg = str(e.value)
        assert "\n" not in msg and "--pretrained" in msg and "huggingface-cli download" in msg
        assert (where or "black-forest-labs/FLUX.2-klein-base-4B") in msg
    # from the command line: the one line on stderr, no traceback above it
    (prompts := tmp_path / "p.txt").write_text("a cat\n")
    r = subprocess.run([sys.executable, "train.py", "--stage", "1", "--model", "sd3-medium", "--prompts",
                        str(prompts), "--pretrained", str(tmp_path / "none"),
                        "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                       env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: folder"), r.stderr  # (a library warning may precede it)


def test_save_images_and_grid(load_tiny, tmp_path):
    bb = load_tiny("tiny-sd3")
    with torch.no_grad():
        img = bb.decode(bb.noise(3, torch.Generator().manual_seed(0)))
    files = sample.save_images(img, str(tmp_path / "imgs"))
    from PIL import Image
    assert len(files) == 3 and Image.open(files[0]).size == (32, 32)
    back = torch.tensor(list(Image.open(files[1]).get_flattened_data())).float() / 255
    back = back.T.reshape(3, 32, 32)
    assert (back - img[1]).abs().max() <= 0.5 / 255 + 1e-6
    grid = sample.image_grid(img, nrow=2)  # diffusers' make_image_grid, the 4th cell white
    assert grid.size == (2 * 32, 2 * 32)
    assert os.path.exists(sample.save_grid(img, str(tmp_path / "grid.png")))
