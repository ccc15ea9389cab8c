"""Stage 2 (RTDMD) end to end on the toy: refusal without stage 1, a tiny run, exact resume,
two gloo ranks, and the exact-decomposition mode against its closed-form stationary point."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as evaluation
import models
import subgrpo
import train
from checks import assert_checkpoints_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "16", "--group-size", "8", "--num-batches-per-epoch", "2", "--toy-width", "32",
        "--log-every", "1"]


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
    """A (badly) trained tiny stage-1 run to start stage 2 from: only the plumbing is tested."""
    torch.set_num_threads(1)
    d = str(tmp_path_factory.mktemp("s1"))
    train.main(["--stage", "1", "--out", d, "--steps", "10", "--batch-size", "32", "--toy-width", "32"])
    return d


def fresh(stage1_dir, tmp_path, name):
    d = str(tmp_path / name)
    shutil.copytree(stage1_dir, d)
    for f in ("log.jsonl", "samples_stage1.png"):
        if os.path.exists(os.path.join(d, f)):
            os.remove(os.path.join(d, f))
    return d


def stage2_log(d):
    return [r for r in map(json.loads, open(os.path.join(d, "log.jsonl"))) if r["stage"] == 2]


def test_train_stage2_refuses_without_stage1(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "2", "--out", str(tmp_path / "empty")])
    assert "stage1.pt" in str(e.value) and "--stage 1" in str(e.value)


def test_train_stage2_runs_and_logs(stage1_dir, tmp_path):
    d = fresh(stage1_dir, tmp_path, "tiny")
    train.main(["--stage", "2", "--out", d, "--steps", "3"] + TINY)
    log = stage2_log(d)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "adv_mean", "adv_std", "ratio_mean", "ratio_min", "ratio_max",
                "clip_frac", "grad_norm", "fake_grad_norm", "fake_loss", "loss_pg", "loss_dm", "loss_bp", "steps"):
        assert key in log[-1], key
    assert abs(log[-1]["adv_mean"]) < 1e-4 and abs(log[-1]["adv_std"] - 1) < 1e-2  # standardised (5.5)
    assert abs(log[-1]["ratio_mean"] - 1) < 1e-5  # on-policy: the ratio is 1 at the sampling weights
    s1 = models.load_checkpoint(os.path.join(d, "stage1.pt"))
    s2 = models.load_checkpoint(os.path.join(d, "stage2.pt"))
    assert s2["epoch"] == 3
    assert any(not torch.equal(s1["ema"][k], s2["generator"][k]) for k in s2["generator"])
    assert any(not torch.equal(s1["fake"][k], s2["fake"][k]) for k in s2["fake"])


def test_train_stage2_reward_gradient_reaches_generator(stage1_dir, tmp_path):
    # Back-prop alone (no PG, no DM): a non-zero generator gradient can only come from the reward,
    # through x0_hat = x_3 - sigma_3 G(x_3).
    d = fresh(stage1_dir, tmp_path, "bp")
    train.main(["--stage", "2", "--out", d, "--steps", "2", "--w-pg", "0", "--w-dm", "0"] + TINY)
    log = stage2_log(d)
    assert all(r["grad_norm"] > 0 and r["loss_pg"] == 0 and r["loss_dm"] == 0 for r in log)
    # and PG alone also moves the generator (through the stochastic steps' log-probs)
    d = fresh(stage1_dir, tmp_path, "pg")
    train.main(["--stage", "2", "--out", d, "--steps", "2", "--w-bp", "0", "--w-dm", "0"] + TINY)
    assert all(r["grad_norm"] > 0 for r in stage2_log(d))


def test_train_stage2_resume_is_bitwise_identical(stage1_dir, tmp_path):
    a, b = fresh(stage1_dir, tmp_path, "a"), fresh(stage1_dir, tmp_path, "b")
    train.main(["--stage", "2", "--out", a, "--steps", "4"] + TINY)
    train.main(["--stage", "2", "--out", b, "--steps", "2"] + TINY)
    train.main(["--stage", "2", "--out", b, "--steps", "4", "--resume"] + TINY)
    assert_checkpoints_equal(os.path.join(a, "stage2.pt"), os.path.join(b, "stage2.pt"))
    assert [r["reward_mean"] for r in stage2_log(a)] == [r["reward_mean"] for r in stage2_log(b)]


def test_train_stage2_two_gloo_ranks_keep_identical_replicas(stage1_dir, tmp_path):
    d = fresh(stage1_dir, tmp_path, "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), "--stage", "2", "--out", d, "--steps", "2"] + TINY
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "world 2" in out.stdout
    ck = models.load_checkpoint(os.path.join(d, "stage2.pt"))
    assert len(ck["replica_checksums"]) == 2
    assert ck["replica_checksums"][0] == ck["replica_checksums"][1]
    assert len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])


@pytest.mark.slow
def test_train_stage2_exact_decomposition_lands_on_stationary_mean_gauss(tmp_path):
    # subgrpo.py, section 7, on toy-gauss (single Gaussian teacher, shift-only generator, linear
    # reward, PG + DM + BP all on): the learned output mean vs subgrpo.stationary_mean_gauss.
    # --no-shared-noise: with toy-gauss's single prompt the shared SubGRPO noise would be shared by
    # the whole epoch, making each epoch's gradient very noisy; the closed form holds either way.
    # --ema-schedule once: the measured mean is that of the EMA, and the raw weights jitter by ~0.007
    # at lr 3e-3; one EMA update per 8 epochs (decay 0.9, a window of ~80 epochs) averages that
    # out, the official schedule (0.9^4 per 8 epochs here, ~24 epochs) does not: the raw weights
    # and the official EMA land at 0.632-0.633, the longer average at 0.628.
    # Measured: 0.6284 learned vs 0.6251 closed form (lr 3e-3 jitter and fake-score lag remain).
    torch.set_num_threads(1)
    d = str(tmp_path / "gauss")
    train.main(["--model", "toy-gauss", "--stage", "1", "--out", d, "--steps", "100", "--reward", "linear"])
    w = dict(w_pg=0.1, w_dm=1.0, w_bp=0.02)
    train.main(["--model", "toy-gauss", "--stage", "2", "--out", d, "--reward", "linear", "--exact-decomposition",
                "--weight-decay", "0", "--steps", "800", "--lr-gen", "3e-3", "--log-every", "100", "--no-shared-noise", "--ema-schedule", "once",
                "--w-pg", str(w["w_pg"]), "--w-dm", str(w["w_dm"]), "--w-bp", str(w["w_bp"])])
    bb, net, _ = models.load_run(d)
    m_star, parts = subgrpo.stationary_mean_gauss(bb, N=48 * 4, f=2 / 3, **w)
    m = evaluation.toy_samples(bb, net, 400_000 // evaluation.REF_SETS, 0)["gauss"].double().mean(0)
    print(f"exact decomposition: learned mean {m.tolist()}, closed form {m_star.tolist()}, "
          f"beta_eff {parts['beta_eff']:.3f}")
    assert float(m[0]) == pytest.approx(float(m_star[0]), abs=0.005)  # 2 significant digits of 0.6x
    assert float(m[1]) == pytest.approx(float(m_star[1]), abs=0.005)
