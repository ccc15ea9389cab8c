"""train.py stage 2 (RTDMD) on the tiny real backbones, with the tiny reward models of
tests/reward_assets.py standing in for clipscore / hpsv2 / pickscore: stage 1 (2 iterations),
then stage 2 (2 epochs of 4 images = 2 prompts x K 2, 32 px, bf16 autocast, gradient
checkpointing). Checked: finite losses and per-reward scores, only the fresh stage-2 LoRA trains
(the merged stage-1 weights and the teacher stay bitwise), stage2.pt holds stage1_ema, load_run
and the exported LoRA files rebuild the generator, the reward gradient alone reaches the
generator (chunked BP gives the same step), exact resume, and a missing reward checkpoint stops
the run in one line before any work."""
import json
import os
import shutil

import pytest
import torch

from reward_assets import build_reward_assets, cli_args
from test_train_real import is_lora, train_and_capture, train_twins
from tiny import PROMPT_FILE, tiny_dir  # noqa: F401  (pytest fixture)
import models
import train
from checks import assert_checkpoints_equal

pytestmark = pytest.mark.slow
S1 = ["--stage", "1", "--prompts", PROMPT_FILE, "--steps", "2", "--batch-size", "2", "--fake-update-ratio", "2", "--resolution", "32",
      "--lr-gen", "1e-3", "--lr-fake", "1e-3", "--ema-decay", "0.5"]
S2 = ["--stage", "2", "--prompts", PROMPT_FILE, "--steps", "2", "--batch-size", "4", "--group-size", "2", "--num-batches-per-epoch", "1",
      "--resolution", "32", "--grad-ckpt", "1", "--bf16", "1", "--log-every", "1", "--lr-gen", "1e-3",
      "--lr-fake", "1e-3", "--rewards", "clipscore,hpsv2,pickscore"]  # a .txt: no GenEval records
NAMES = ("tiny-sd3", "tiny-flux2")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny reward checkpoints as the --reward-paths option."""
    return cli_args(build_reward_assets(tmp_path_factory.mktemp("rewards") / "r")["paths"])


@pytest.fixture(scope="module")
def stage1(tiny_dir, tmp_path_factory):
    """{name: a stage-1 run folder (2 iterations)} to copy stage-2 runs from."""
    runs = train_twins(tiny_dir, str(tmp_path_factory.mktemp("s1")), NAMES, S1)
    return {name: d for name, (d, _, _) in runs.items()}


def fresh(stage1, tmp_path, name, tag):
    d = str(tmp_path / tag)
    shutil.copytree(stage1[name], d)
    os.remove(os.path.join(d, "log.jsonl"))
    return d


def stage2_log(d):
    return [r for r in map(json.loads, open(os.path.join(d, "log.jsonl"))) if r["stage"] == 2]


@pytest.fixture(scope="module")
def runs(stage1, assets, tmp_path_factory):
    """Stage 2 on each twin, once: {name: (run folder, nets, backbone)}."""
    root = tmp_path_factory.mktemp("s2")
    out = {}
    for name in NAMES:
        d = fresh(stage1, root, name, name)
        nets, bb = train_and_capture(S2 + ["--model", name, "--out", d] + assets)
        out[name] = (d, nets, bb)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_train_stage2_tiny_twin_trains_only_the_fresh_lora(runs, name):
    d, nets, bb = runs[name]
    log = stage2_log(d)
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        for k in ("reward_mean", "reward_clipscore", "reward_hpsv2", "reward_pickscore", "fake_loss",
                  "grad_norm", "fake_grad_norm", "loss_pg", "loss_dm", "loss_bp"):
            assert torch.isfinite(torch.tensor(r[k])), (k, r)
        assert r["grad_norm"] > 0 and r["loss_bp"] > 0 and r["loss_dm"] > 0
    ck1 = models.load_checkpoint(os.path.join(d, "stage1.pt"))
    ck = models.load_checkpoint(os.path.join(d, "stage2.pt"))
    # stage2.pt: the new LoRA only, plus the stage-1 LoRAs it sits on (models.load_run's contract)
    for key in ("ema", "fake"):
        assert ck["stage1_" + key].keys() == ck1[key].keys()
        assert all(torch.equal(ck["stage1_" + key][k], ck1[key][k]) for k in ck1[key])
    for key in ("generator", "fake", "ema"):
        assert ck[key] and all(is_lora(k) for k in ck[key]), key
    assert set(ck["generator"]) == set(models.lora_state_dict(nets["generator"]))
    if name == "tiny-flux2":  # the fresh stage-2 LoRA keeps the single blocks' to_out (configs/rtdmd/flux2_4b.yaml)
        for key in ("generator", "fake"):
            assert any("single_transformer_blocks.0.attn.to_out" in k for k in ck[key]), key
    for key in ("generator", "fake"):  # the fresh LoRA trained: B starts at 0
        assert max(v.abs().max() for k, v in ck[key].items() if ".lora_B." in k) > 0, key
    # every non-LoRA tensor of the students is the merged stage-1 weight, untouched by training;
    # FLUX.2 merged into its generator base's own tensors (no second copy of the merged Linears)
    if name == "tiny-flux2":
        base = {id(p) for p in bb.generator_base.parameters()}
        assert all(id(p) in base for k, p in nets["generator"].named_parameters() if not is_lora(k))
    fresh_bb = models.load(name, cache_dir=d)
    for role, merge in (("generator", ck1["ema"]), ("fake", ck1["fake"])):
        ref = fresh_bb.make_student(role, stage=2, merge=merge).state_dict()
        sd = nets[role].state_dict()
        assert {k for k in sd if not is_lora(k)} == {k for k in ref if not is_lora(k)}
        for k in ref:
            if not is_lora(k):
                assert torch.equal(sd[k], ref[k]), (role, k)
    # the teacher (and every other pipeline component) is bitwise what is on disk
    assert not any(p.requires_grad for p in bb.teacher.parameters())
    for comp, m in bb.pipe.components.items():
        if isinstance(m, torch.nn.Module):
            ref = fresh_bb.pipe.components[comp].state_dict()
            for k, v in m.state_dict().items():
                assert torch.equal(v, ref[k]), (comp, k)
    assert os.path.exists(os.path.join(d, "samples_stage2.png"))


@pytest.mark.parametrize("name", NAMES)
def test_load_run_stage2_rebuilds_the_generator(runs, name):
    d, nets, _ = runs[name]
    bb = models.load(name, cache_dir=d)
    x = bb.noise(2, torch.Generator().manual_seed(0))
    sigma, cond = torch.tensor([0.9, 0.4]), bb.encode(["a red cat", "two dogs"])
    with torch.no_grad():
        v = {k: bb.velocity(nets[k].eval(), x, sigma, cond) for k in ("ema", "generator")}
        _, net, stage = models.load_run(d, 2)
        v_run = bb.velocity(net, x, sigma, cond)
        _, net_g, _ = models.load_run(d, 2, which="generator")
        v_run_g = bb.velocity(net_g, x, sigma, cond)
        v_base = bb.velocity(bb.generator_base, x, sigma, cond)  # before FLUX.2 merges into it in place
        files = [os.path.join(d, f) for f in ("generator_ema_lora.safetensors",
                                              "generator_ema_stage2_lora.safetensors")]
        v_files = bb.velocity(bb.make_student("generator", stage=2, merge=files).eval(), x, sigma, cond)
    assert stage == 2
    assert (v["ema"] - v_base).abs().max() > 1e-5  # the merged stage-1 EMA is in there
    assert (v["generator"] - v["ema"]).abs().max() > 1e-6  # stage 2 moved the raw weights
    assert torch.allclose(v_run, v["ema"], atol=1e-6), (v_run - v["ema"]).abs().max()
    assert torch.allclose(v_run_g, v["generator"], atol=1e-6), (v_run_g - v["generator"]).abs().max()
    assert torch.allclose(v_files, v["ema"], atol=1e-5), (v_files - v["ema"]).abs().max()


def test_train_stage2_tiny_twin_reward_gradient_alone_reaches_generator(stage1, assets, tmp_path):
    """BP alone (no PG, no DM): a non-zero generator gradient can only come from the rewards,
    through the VAE decode of x0_hat. Chunked BP (--bp-batch-size 1) takes the same step."""
    name, steps = "tiny-sd3", {}
    for chunk in ("0", "1"):
        d = fresh(stage1, tmp_path, name, "bp" + chunk)
        train.main(S2 + ["--model", name, "--out", d, "--w-pg", "0", "--w-dm", "0", "--bf16", "0",
                         "--bp-batch-size", chunk] + assets)
        log = stage2_log(d)
        assert all(r["grad_norm"] > 0 and r["loss_pg"] == 0 and r["loss_dm"] == 0 for r in log)
        steps[chunk] = (log, models.load_checkpoint(os.path.join(d, "stage2.pt"))["generator"])
    for r0, r1 in zip(steps["0"][0], steps["1"][0]):
        assert r1["grad_norm"] == pytest.approx(r0["grad_norm"], rel=1e-4)
        assert r1["loss_bp"] == pytest.approx(r0["loss_bp"], rel=1e-5)
    # AdamW divides each element by its own gradient scale, so a float32 rounding difference in
    # an element whose gradient is ~0 can move it by a visible fraction of lr (1e-3): 1.5e-6 was
    # measured. A wrong chunked gradient flips whole elements (~1e-3), hence atol 1e-5.
    for k, v in steps["0"][1].items():
        diff = (steps["1"][1][k] - v).abs().max()
        assert diff < 1e-5, f"{k}: the chunked back-prop step differs by {diff:.2e}"


def test_train_stage2_tiny_twin_resume_is_exact(runs, stage1, assets, tmp_path):
    name = "tiny-sd3"
    a = runs[name][0]
    b = fresh(stage1, tmp_path, name, "b")
    half = [x if x != "2" or i != S2.index("--steps") + 1 else "1" for i, x in enumerate(S2)]
    train.main(half + ["--model", name, "--out", b] + assets)
    train.main(S2 + ["--model", name, "--out", b, "--resume"] + assets)
    _, cb = assert_checkpoints_equal(os.path.join(a, "stage2.pt"), os.path.join(b, "stage2.pt"),
                                     ("generator", "fake", "ema", "stage1_ema", "stage1_fake"))
    assert cb["epoch"] == 2
    assert [r["reward_mean"] for r in stage2_log(a)] == [r["reward_mean"] for r in stage2_log(b)]


def test_make_reward_missing_checkpoint_stops_before_any_work(stage1, assets, tmp_path):
    name = "tiny-sd3"
    d = fresh(stage1, tmp_path, name, "missing")
    before = {f: open(os.path.join(d, f), "rb").read() for f in ("stage1.pt", "config.json")}
    bad = [assets[0], assets[1] + f",hpsv2={tmp_path / 'nowhere'}"]  # the later entry wins
    with pytest.raises(SystemExit) as e:
        train.main(S2 + ["--model", name, "--out", d] + bad)
    msg = str(e.value)
    assert msg.startswith("error: stage-2 reward:") and "\n" not in msg, msg
    assert "nowhere" in msg and "--reward-paths hpsv2=PATH" in msg, msg
    assert sorted(os.listdir(d)) == sorted(["stage1.pt", "config.json", "generator_ema_lora.safetensors",
                                            "samples_stage1.png", name])
    for f, data in before.items():
        assert open(os.path.join(d, f), "rb").read() == data, f


def test_train_stage2_tiny_twin_trains_on_the_papers_four_rewards(stage1, assets, tmp_path, monkeypatch):
    """The paper's stage-2 reward: clipscore + hpsv2 + pickscore + geneval (the default set), with
    GenEval .jsonl prompts whose records reach the geneval scorer. The tiny detector sees every
    query as a dog: "a photo of a dog" scores its object, the two-cat prompt cannot."""
    from paper_reward_assets import tiny_mask2former
    import rewards
    monkeypatch.setattr(rewards.Mask2FormerDetector, "SHORT", 64)  # the tiny Swin: small inputs
    monkeypatch.setattr(rewards.Mask2FormerDetector, "LONG", 64)
    records = [{"prompt": "a photo of a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]},
               {"prompt": "a photo of two cats", "tag": "counting", "include": [{"class": "cat", "count": 2}]}]
    jl = tmp_path / "geneval.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in records))
    detector = tiny_mask2former(tmp_path / "m2f")
    d = fresh(stage1, tmp_path, "tiny-sd3", "four")
    argv = [a for a in S2 if a not in ("--rewards", "clipscore,hpsv2,pickscore")]
    argv[argv.index("--prompts") + 1] = str(jl)
    train.main(argv + ["--model", "tiny-sd3", "--out", d, assets[0], assets[1] + f",geneval_detector={detector}"])
    log = stage2_log(d)
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        for k in ("reward_clipscore", "reward_hpsv2", "reward_pickscore", "reward_geneval"):
            assert k in r and torch.isfinite(torch.tensor(r[k])), f"{k} missing or not finite in the stage-2 log"
        assert r["grad_norm"] > 0, "the generator did not move"
    # without GenEval records, the default set stops before any work, saying what to pass
    d2 = fresh(stage1, tmp_path, "tiny-sd3", "txt")
    argv = [a for a in S2 if a not in ("--rewards", "clipscore,hpsv2,pickscore")]
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--model", "tiny-sd3", "--out", d2, assets[0], assets[1] + f",geneval_detector={detector}"])
    assert "geneval" in str(e.value) and "--rewards clipscore,hpsv2,pickscore" in str(e.value), str(e.value)
    assert not os.path.exists(os.path.join(d2, "stage2.pt"))
