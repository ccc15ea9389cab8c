"""train.py stage 1 and sample.py on the tiny real backbones (random-init diffusers pipelines,
tests/tiny.py): finite losses with gradient checkpointing + bf16 autocast, only LoRA tensors
train (the teacher stays bitwise unchanged), LoRA-only checkpoints, the exported EMA LoRA file,
DDP with 2 gloo ranks, exact resume, and the image CLI (generator and teacher)."""
import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from tiny import PROMPT_FILE, TINY, tiny_dir  # noqa: F401  (pytest fixture)
from test_train import free_port
import models
import sample
import train
from checks import assert_checkpoints_equal, assert_states_equal

pytestmark = pytest.mark.slow
# 32 px, 2 images, 4 iterations with a generator step every 2nd: both updates run twice. A large
# lr and a short EMA make the trained LoRAs differ visibly from their initial values.
ARGS = ["--prompts", PROMPT_FILE, "--steps", "4", "--batch-size", "2", "--fake-update-ratio", "2", "--resolution", "32",
        "--grad-ckpt", "1", "--bf16", "1", "--log-every", "1", "--lr-gen", "1e-3",
        "--lr-fake", "1e-3", "--ema-decay", "0.5"]


def is_lora(k):
    return ".lora_A." in k or ".lora_B." in k


def new_run(tiny_dir, root, name, model):
    """A run folder with the already built twin copied in (train.py caches it there)."""
    if not os.path.isdir(os.path.join(tiny_dir, model)):
        with torch.random.fork_rng():
            models.build_tiny(model, os.path.join(tiny_dir, model))
    d = os.path.join(root, name)
    shutil.copytree(os.path.join(tiny_dir, model), os.path.join(d, model))
    return d


def train_and_capture(argv):
    """train.main, also returning the backbone it loaded."""
    seen, real = {}, models.load

    def load(name, **kw):
        seen["bb"] = real(name, **kw)
        return seen["bb"]
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(models, "load", load)
        nets = train.main(argv)
    return nets, seen["bb"]


def train_twins(tiny_dir, root, names, argv):
    """A stage-1 run of each twin in its own new folder under root, trained with `argv`:
    {name: (run folder, nets, backbone)}."""
    out = {}
    for name in names:
        d = new_run(tiny_dir, root, name, name)
        nets, bb = train_and_capture(argv + ["--model", name, "--out", d])
        out[name] = (d, nets, bb)
    return out


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """Stage 1 on each twin, once: {name: (run folder, nets, backbone)}."""
    return train_twins(tiny_dir, str(tmp_path_factory.mktemp("runs")), TINY, ["--stage", "1"] + ARGS)


@pytest.mark.parametrize("name", TINY)
def test_train_stage1_tiny_twin_trains_only_lora(runs, name):
    d, nets, bb = runs[name]
    recs = [json.loads(l) for l in open(os.path.join(d, "log.jsonl"))]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert sum("gen_loss" in r for r in recs) == 2
    for r in recs:
        for k in ("fake_loss", "gen_loss", "fake_grad_norm", "gen_grad_norm"):
            assert k not in r or torch.isfinite(torch.tensor(r[k])), (k, r)
    # checkpoint: LoRA tensors only, the EMA under the generator's names, and they trained
    ck = models.load_checkpoint(os.path.join(d, "stage1.pt"))
    for key in ("generator", "fake", "ema"):
        assert ck[key] and all(is_lora(k) for k in ck[key]), key
        assert all(v.dtype == torch.float32 for v in ck[key].values())
        moved = max(v.abs().max() for k, v in ck[key].items() if ".lora_B." in k)
        assert moved > 0, key  # B starts at 0
    assert set(ck["ema"]) == set(ck["generator"])
    assert set(ck["generator"]) == set(models.lora_state_dict(nets["generator"]))
    # every frozen tensor (teacher, text encoders, VAE, FLUX.2's generator base, and the
    # students' shared base weights) is bitwise what is on disk
    fresh = models.load(name, cache_dir=d)
    assert not any(m.training for m in bb.teacher.modules())
    assert not any(p.requires_grad for p in bb.teacher.parameters())
    for comp, m in bb.pipe.components.items():
        if isinstance(m, torch.nn.Module):
            ref = fresh.pipe.components[comp].state_dict()
            for k, v in m.state_dict().items():
                assert torch.equal(v, ref[k]), (comp, k)
    bases = {"generator": fresh.generator_base, "ema": fresh.generator_base, "fake": fresh.teacher}
    for role, base in bases.items():
        ref = base.state_dict()
        sd = nets[role].state_dict()
        assert {k for k in sd if not is_lora(k)} == set(ref)
        for k in ref:
            assert torch.equal(sd[k], ref[k]), (role, k)
    assert os.path.exists(os.path.join(d, "samples_stage1.png"))


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux2"])
def test_load_run_rebuilds_stage1_ema_lora(runs, name):
    """generator_ema_lora.safetensors in a fresh copy of the base, and load_run, both give the
    trained EMA generator's velocity."""
    d, nets, _ = runs[name]
    bb = models.load(name, cache_dir=d)
    x = bb.noise(2, torch.Generator().manual_seed(0))
    sigma, cond = torch.tensor([0.9, 0.4]), bb.encode(["a red cat", "two dogs"])
    with torch.no_grad():
        v_ema = bb.velocity(nets["ema"].eval(), x, sigma, cond)
        fresh = models.load_lora(models.shared_copy(bb.generator_base),
                                 os.path.join(d, "generator_ema_lora.safetensors"))
        v_file = bb.velocity(fresh, x, sigma, cond)
        _, net, stage = models.load_run(d)
        v_run = bb.velocity(net, x, sigma, cond)
        v_base = bb.velocity(bb.generator_base, x, sigma, cond)
    assert stage == 1
    assert (v_ema - v_base).abs().max() > 1e-4  # the EMA did move
    assert torch.allclose(v_file, v_ema, atol=1e-6), (v_file - v_ema).abs().max()
    assert torch.allclose(v_run, v_ema, atol=1e-6), (v_run - v_ema).abs().max()


def test_train_stage1_tiny_twin_resume_is_exact(runs, tiny_dir, tmp_path):
    name = "tiny-sd35"
    a = runs[name][0]
    b = new_run(tiny_dir, str(tmp_path), "b", name)
    half = [x if x != "4" else "2" for x in ARGS]
    train.main(["--stage", "1", "--model", name, "--out", b] + half)
    train.main(["--stage", "1", "--model", name, "--out", b, "--resume"] + ARGS)
    _, cb = assert_checkpoints_equal(os.path.join(a, "stage1.pt"), os.path.join(b, "stage1.pt"))
    assert cb["step"] == 4


def _ddp_worker(rank, world, port, out, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    nets = train.main(["--stage", "1", "--model", "tiny-flux2", "--out", out, "--steps", "2", "--prompts", PROMPT_FILE,
                       "--batch-size", "4", "--fake-update-ratio", "2", "--resolution", "32",
                       "--grad-ckpt", "1", "--bf16", "1", "--lr-gen", "1e-3", "--lr-fake", "1e-3"])
    # 2 per rank, one generator step
    torch.save({k: models.lora_state_dict(v) for k, v in nets.items()},
               os.path.join(result_dir, f"rank{rank}.pt"))


def test_train_stage1_tiny_twin_ddp_two_ranks_identical(tiny_dir, tmp_path):
    out = new_run(tiny_dir, str(tmp_path), "ddp", "tiny-flux2")
    mp.spawn(_ddp_worker, args=(2, free_port(), out, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert_states_equal(r0, r1)
    assert max(v.abs().max() for k, v in r0["generator"].items() if ".lora_B." in k) > 0


def test_sample_cli_generator_images(runs, tmp_path, capsys):
    d = runs["tiny-sd3"][0]
    out = str(tmp_path / "imgs")
    sample.main(["--run", d, "--prompt", "a red cat", "--prompt", "two dogs", "--n", "2",
                 "--out", out])
    from PIL import Image
    files = sorted(os.listdir(out))
    assert files == ["000000.png", "000001.png", "000002.png", "000003.png", "grid.png"]
    assert Image.open(os.path.join(out, "000000.png")).size == (32, 32)
    assert Image.open(os.path.join(out, "grid.png")).size == (2 * 32, 2 * 32)  # make_image_grid: no gaps
    assert "4 NFE per image" in capsys.readouterr().out
    # same seed, same pictures
    sample.main(["--run", d, "--prompt", "a red cat", "--prompt", "two dogs", "--n", "2",
                 "--out", out + "2"])
    for f in files:
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(out + "2", f), "rb").read()


def test_sample_cli_teacher_without_run(tiny_dir, tmp_path, monkeypatch, capsys):
    """--model tiny-sd3 --teacher needs no run (the twin comes from ~/.cache/rtdmd)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = tmp_path / ".cache" / "rtdmd"
    cache.mkdir(parents=True)
    new_run(tiny_dir, str(tmp_path), "unused", "tiny-sd3")  # makes sure the twin is built
    os.symlink(os.path.join(tiny_dir, "tiny-sd3"), cache / "tiny-sd3")
    out = str(tmp_path / "teacher")
    sample.main(["--model", "tiny-sd3", "--teacher", "--steps", "3", "--cfg", "4.5", "--n", "1",
                 "--prompt", "a red cat", "--out", out])
    assert sorted(os.listdir(out)) == ["000000.png", "grid.png"]
    assert "3 Euler steps, CFG 4.5: 6 NFE per image" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux2"])
def test_teacher_sampler_matches_stock_pipeline(runs, name):
    """teacher_images' sampler (Euler + CFG on bb.teacher_sigmas(N)) is the stock pipeline run
    with its *default* schedule for num_inference_steps=N."""
    bb = runs[name][2]
    for steps in (3, 28):  # sigmas of the default schedule
        sched = bb.pipe.scheduler
        if bb.family == "sd3":
            sched.set_timesteps(steps)
        else:
            mu = models.flux2_empirical_mu(bb.latent_shape[1] ** 2, steps)
            sched.set_timesteps(sigmas=torch.linspace(1, 1 / steps, steps).tolist(), mu=mu)
        assert torch.allclose(sched.sigmas.float(), bb.teacher_sigmas(steps), atol=1e-6)
    prompts, res = ["a red cat", "two dogs"], bb.resolution
    x = bb.noise(2, torch.Generator().manual_seed(1))
    kw = dict(text_encoder_out_layers=bb.text_layers) if bb.family == "flux2" else {}
    with torch.no_grad():
        ref = bb.pipe(prompt=prompts, num_inference_steps=3, guidance_scale=bb.guidance,
                      height=res, width=res, latents=x, output_type="latent",
                      max_sequence_length=bb.max_sequence_length, **kw).images
        ours = sample.euler_sample(bb, bb.teacher, x, bb.teacher_sigmas(3), bb.encode(prompts),
                                   bb.encode(["", ""]), guidance=bb.guidance)
    ours = bb.to_vae_latents(ours)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
