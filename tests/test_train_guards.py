"""train.py's guards: the training prompts a real backbone needs (and their metadata, which must
reach the reward), updates whose loss or gradient is not finite, checkpoints that survive a
SIGKILL (also in the middle of a save) and resume exactly, and checkpoints that carry code."""
import json
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import acdmd
import models
import train
from checks import assert_checkpoints_equal
from test_run_files import Payload
from test_train import run_dir, toy_base  # noqa: F401  (pytest fixture)
from test_train_real import new_run
from tiny import PROMPT_FILE, tiny_dir  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch-size", "64", "--log-every", "5"]


def exit_line(run):
    """The message of the SystemExit that `run()` raises; it must be a single line."""
    with pytest.raises(SystemExit) as e:
        run()
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


# --- prompts ----------------------------------------------------------------------------------


def test_read_training_prompts_required_for_real_backbones(tmp_path):
    """A real-backbone family (the tiny twin stands in) without --prompts stops in one line naming
    the paper's prompt set of that stage, before anything is written."""
    d = tmp_path / "run"
    msg = exit_line(lambda: train.main(["--stage", "1", "--model", "tiny-sd3", "--out", str(d)]))
    assert "--prompts is required" in msg and "dataset/pickscore/train.txt" in msg and "25,432" in msg, msg
    assert not d.exists(), "nothing may be written before the prompts are known"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model": "tiny-flux2"}))
    (d / "stage1.pt").write_bytes(b"stand-in")  # stage 2 checks that stage 1 exists first
    msg = exit_line(lambda: train.main(["--stage", "2", "--model", "tiny-flux2", "--out", str(d)]))
    assert "--prompts is required" in msg and "dataset/geneval/train_metadata.jsonl" in msg, msg
    msg = exit_line(lambda: train.main(["--stage", "1", "--model", "tiny-sd3", "--out", str(tmp_path / "x"),
                                        "--prompts", str(tmp_path / "none.txt")]))
    assert "none.txt not found" in msg, msg
    msg = exit_line(lambda: train.main(["--stage", "1", "--out", str(tmp_path / "y"), "--prompts", PROMPT_FILE]))
    assert "own prompts" in msg, msg  # the toy knows its prompts


def test_stage2_rollouts_jsonl_metadata_reaches_the_reward(tiny_dir, tmp_path, capsys):
    """Stage 1 on a .txt, stage 2 on a GenEval-style .jsonl: every image is scored with its own
    prompt's metadata; config.json records both files (sha256, count) under their stage."""
    d = new_run(tiny_dir, str(tmp_path), "run", "tiny-sd3")
    common = ["--model", "tiny-sd3", "--out", d, "--resolution", "32", "--bf16", "0", "--grad-ckpt", "0"]
    train.main(["--stage", "1", "--prompts", PROMPT_FILE, "--steps", "1", "--batch-size", "2"] + common)
    records = [{"prompt": "a photo of two cats", "tag": "counting", "include": [{"class": "cat", "count": 2}]},
               {"prompt": "a photo of a red bench", "tag": "colors",
                "include": [{"class": "bench", "count": 1, "color": "red"}]},
               {"prompt": "a photo of a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]}]
    jl = tmp_path / "train_metadata.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in records))
    want = {r["prompt"]: {k: v for k, v in r.items() if k != "prompt"} for r in records}
    calls = []

    def reward(images, prompts, metadata=None):
        calls.append((list(prompts), metadata))
        return {"r": images.float().mean((1, 2, 3))}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "make_reward", lambda args, device=None, metadata=None: (reward, reward, {"r": 1.0}))
        train.main(["--stage", "2", "--prompts", str(jl), "--steps", "2", "--batch-size", "4", "--group-size", "2",
                    "--num-batches-per-epoch", "2", "--w-bp", "0"] + common)
    assert len(calls) == 2 * 2, "one reward call per sampling iteration"
    for prompts, metadata in calls:
        assert metadata == [want[p] for p in prompts], "an image was scored with another prompt's metadata"
        assert len(set(prompts)) == 2, "M = 2 distinct prompts per iteration (drawn without replacement)"
    cfg = json.load(open(os.path.join(d, "config.json")))
    files = cfg["prompt_files"]
    assert files["stage1"] == {"file": PROMPT_FILE, "sha256": models.file_sha256(PROMPT_FILE), "count": 4}
    assert files["stage2"] == {"file": str(jl), "sha256": models.file_sha256(str(jl)), "count": 3}
    assert f"stage 2 prompts: {jl} (3 prompts, sha256 {files['stage2']['sha256']})" in capsys.readouterr().out


# --- non-finite updates -------------------------------------------------------------------------


def nan_fake_loss(monkeypatch, bad_calls):
    """acdmd.fake_score_loss returns NaN (with its graph, so the gradient is NaN too) on the
    1-based calls in bad_calls: one call per stage-1 iteration."""
    real, n = acdmd.fake_score_loss, [0]

    def loss(*a, **k):
        n[0] += 1
        value, stats = real(*a, **k)
        return (value * float("nan"), stats) if n[0] in bad_calls else (value, stats)
    monkeypatch.setattr(acdmd, "fake_score_loss", loss)


def test_update_guard_nan_loss_is_skipped_and_logged(tmp_path, toy_base, monkeypatch):  # noqa: F811
    """A NaN fake loss at iterations 6 and 7 skips those two fake updates (AdamW counts 8 of 10
    steps), is counted in the log, and the checkpoint holds finite weights only."""
    d = run_dir(tmp_path, "nan", toy_base)
    nan_fake_loss(monkeypatch, {6, 7})
    train.main(["--stage", "1", "--out", d, "--steps", "10", "--save-every", "5"] + SMALL)
    log = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
    assert [r["step"] for r in log if r.get("skipped")] == [6, 7]
    assert all(r["skipped"] == ["fake score"] for r in log if r.get("skipped")) and log[-1]["skipped_total"] == 2
    ck = models.load_checkpoint(os.path.join(d, "stage1.pt"))
    assert all(torch.isfinite(v).all() for key in ("generator", "fake", "ema") for v in ck[key].values())
    steps = {int(s["step"]) for s in ck["opt_f"]["state"].values()}
    assert steps == {8}, f"the fake optimiser should have taken 8 steps, took {steps}"


def test_update_guard_stops_and_never_touches_the_last_checkpoint(tmp_path, toy_base, monkeypatch):  # noqa: F811
    """NaN from iteration 7 on: three skipped updates in a row stop the run with one line; the
    checkpoint of iteration 5 is what stays on disk, bit for bit."""
    d = run_dir(tmp_path, "stuck", toy_base)
    nan_fake_loss(monkeypatch, set(range(7, 100)))
    saved = {}
    real_save = train.save_checkpoint

    def save(path, counter, *a, **k):
        real_save(path, counter, *a, **k)
        saved[counter["step"]] = open(path, "rb").read()
    monkeypatch.setattr(train, "save_checkpoint", save)
    msg = exit_line(lambda: train.main(["--stage", "1", "--out", d, "--steps", "20", "--save-every", "5"] + SMALL))
    assert "3 fake score updates in a row" in msg and "iteration 9" in msg and "stage1.pt" in msg, msg
    assert list(saved) == [5], "nothing may be saved after the trouble started"
    assert open(os.path.join(d, "stage1.pt"), "rb").read() == saved[5]


# --- SIGKILL and resume -------------------------------------------------------------------------

# Run train.main in a child process that kills itself with SIGKILL: "save" = in the middle of
# writing the checkpoint of iteration AT (half the bytes written), "train" = inside iteration AT.
KILLER = """
import io, os, signal, sys
sys.path.insert(0, {root!r})
import torch
import acdmd, train
mode, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if mode == "save":
    real = torch.save
    def save(obj, f, *a, **k):
        if obj.get("step", obj.get("epoch")) == at:
            buf = io.BytesIO()
            real(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *a, **k)
    torch.save = save
else:
    real, n = acdmd.fake_score_loss, [0]
    def loss(*a, **k):
        n[0] += 1
        if n[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    acdmd.fake_score_loss = loss
train.main(argv)
"""


@pytest.mark.parametrize("mode,at,resumes_from", [("save", 20, 10), ("train", 25, 20)])
def test_save_checkpoint_survives_sigkill_and_resume_is_exact(tmp_path, toy_base, mode, at, resumes_from):  # noqa: F811
    """SIGKILL while iteration `at`'s checkpoint is half written, or in the middle of iteration
    `at`: stage1.pt is still a complete checkpoint (the previous one sits beside it), and
    --resume then ends bitwise where an uninterrupted run ends."""
    args = ["--stage", "1", "--steps", "30", "--save-every", "10"] + SMALL
    ref = run_dir(tmp_path, "ref", toy_base)
    train.main(args + ["--out", ref])
    d = run_dir(tmp_path, "killed", toy_base)
    r = subprocess.run([sys.executable, "-c", KILLER.format(root=ROOT), mode, str(at)] + args + ["--out", d],
                       capture_output=True, text=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ck = models.load_checkpoint(os.path.join(d, "stage1.pt"))
    assert ck["step"] == resumes_from, "stage1.pt must be the last completely written checkpoint"
    if resumes_from > 10:  # the one before stays beside it
        assert models.load_checkpoint(os.path.join(d, "stage1.prev.pt"))["step"] == resumes_from - 10
    train.main(args + ["--out", d, "--resume"])
    assert_checkpoints_equal(os.path.join(ref, "stage1.pt"), os.path.join(d, "stage1.pt"))
    logs = [[{k: v for k, v in json.loads(line).items() if k != "time"} for line in open(os.path.join(f, "log.jsonl"))]
            for f in (ref, d)]
    assert logs[0] == logs[1], "the resumed log must read as the uninterrupted run's, record for record"


# --- checkpoints that carry code ----------------------------------------------------------------


def test_load_checkpoint_refuses_a_malicious_pickle_on_resume(tmp_path, toy_base):  # noqa: F811
    """--resume (stage 1) and stage 2 (which reads stage1.pt) refuse a checkpoint whose pickle
    would run code, in one line, and the code never runs."""
    marker = str(tmp_path / "code_ran")
    d = run_dir(tmp_path, "evil", toy_base)
    train.main(["--stage", "1", "--out", d, "--steps", "2"] + SMALL)
    good = models.load_checkpoint(os.path.join(d, "stage1.pt"))
    torch.save(good | {"rng": Payload(marker)}, os.path.join(d, "stage1.pt"))
    msg = exit_line(lambda: train.main(["--stage", "1", "--out", d, "--steps", "4", "--resume"] + SMALL))
    assert "refusing to load" in msg and "stage1.pt" in msg, msg
    msg = exit_line(lambda: train.main(["--stage", "2", "--out", d, "--steps", "1"]))
    assert "refusing to load" in msg, msg
    assert not os.path.exists(marker), "the pickle's code ran"


def test_make_reward_geneval_needs_geneval_metadata(monkeypatch):
    """The paper's stage-2 reward has geneval, which scores against each prompt's GenEval record:
    it trains when every prompt has one ("include"); a prompt file without them stops with one
    line naming the fix, unless --rewards leaves geneval out."""
    seen = []
    monkeypatch.setattr(train.rewards, "training_rewards", lambda sources, weights: seen.append(weights) or (1, 2))
    monkeypatch.setattr(train.rewards, "preflight", lambda reward, device: None)
    args = train.get_args(["--stage", "2", "--model", "tiny-sd3"])
    geneval = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]}] * 2
    assert train.make_reward(args, None, geneval)[2] == train.rewards.GRPO_WEIGHTS
    for metadata in ([{}, {}], [geneval[0], {}], None):
        with pytest.raises(SystemExit) as e:
            train.make_reward(args, None, metadata)
        assert "GenEval metadata record" in str(e.value) and "--rewards clipscore,hpsv2,pickscore" in str(e.value), str(e.value)
    args = train.get_args(["--stage", "2", "--model", "tiny-sd3", "--rewards", "clipscore,hpsv2,pickscore"])
    assert train.make_reward(args, None, [{}, {}])[2] == {"clipscore": 1.0, "hpsv2": 1.0, "pickscore": 1.0}
    assert seen[-1] == {"clipscore": 1.0, "hpsv2": 1.0, "pickscore": 1.0}


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    """A backstop behind the guard: weights that are not finite are never written (rank_state,
    which every rank runs before the checkpoint is gathered, stops the run), and the checkpoint
    already on disk stays as it was."""
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    ctx = train.run_context(train.get_args(["--stage", "1", "--out", str(tmp_path)]), torch.device("cpu"))
    m = SimpleNamespace(generator=net, fake=net, ema=train.ema_copy(net), opt_g=opt, opt_f=opt)

    def save(counter):
        ranks = train.gather_objects(train.rank_state(ctx, m, counter), 1)
        train.save_checkpoint(ctx.ckpt_path, counter, m, ranks, ctx.args, ctx.shared_rng)
    save({"step": 1})
    before = open(ctx.ckpt_path, "rb").read()
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    msg = exit_line(lambda: save({"step": 2}))
    assert "generator, fake weights are not finite at step 2" in msg and "nothing was saved" in msg, msg
    assert open(ctx.ckpt_path, "rb").read() == before and not os.path.exists(ctx.ckpt_path + ".tmp")


def test_save_checkpoint_stage2_survives_sigkill_mid_save(tmp_path, toy_base):  # noqa: F811
    """Stage 2 (its EMA schedule, shared prompt draws and zero-advantage picks all restart from the
    checkpoint): SIGKILL while epoch 4's checkpoint is half written, --resume, and the run ends
    bitwise where an uninterrupted one ends."""
    s1 = run_dir(tmp_path, "s1", toy_base)
    train.main(["--stage", "1", "--out", s1, "--steps", "4", "--batch-size", "32"])
    args = ["--stage", "2", "--steps", "6", "--save-every", "2", "--batch-size", "16", "--group-size", "8",
            "--num-batches-per-epoch", "2", "--log-every", "1"]
    ref, d = str(tmp_path / "ref"), str(tmp_path / "killed")
    shutil.copytree(s1, ref)
    shutil.copytree(s1, d)
    train.main(args + ["--out", ref])
    r = subprocess.run([sys.executable, "-c", KILLER.format(root=ROOT), "save", "4"] + args + ["--out", d],
                       capture_output=True, text=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert models.load_checkpoint(os.path.join(d, "stage2.pt"))["epoch"] == 2
    train.main(args + ["--out", d, "--resume"])
    assert_checkpoints_equal(os.path.join(ref, "stage2.pt"), os.path.join(d, "stage2.pt"))
