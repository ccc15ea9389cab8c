"""Learning outcomes on the toy world, measured against its closed-form targets: a short stage-1
run beats the teacher's own 4-step Euler sampler on every prompt, and a short stage-2 run raises
the mean reward while staying near the exact reward-tilted target. With the sign of the DMD
direction flipped the first fails (the generator diverges); with the advantages flipped the second
fails (the reward falls, fitted beta 0)."""
import shutil

import pytest
import torch

import eval as evaluation
import models
import train

N = 2000  # samples per prompt for every energy distance below
STAGE1 = ["--steps", "600", "--batch-size", "256", "--log-every", "50", "--seed", "0", "--ema-decay", "0.99"]
STAGE2 = ["--steps", "100", "--lr-gen", "1e-4", "--log-every", "10", "--seed", "0"]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """A short stage-1 run (600 iterations of 256 samples, default base model; the EMA decay of
    0.99 because the default 0.999 would still hold half the base after 600 iterations)."""
    out = str(tmp_path_factory.mktemp("learn") / "s1")
    torch.manual_seed(0)
    train.main(["--stage", "1", "--out", out] + STAGE1)
    return out


@pytest.mark.slow
def test_train_stage1_beats_teacher_euler(stage1_run):
    bb, net, _ = models.load_run(stage1_run, 1)
    res = evaluation.eval_toy(bb, net, n=N, seed=0)
    for prompt, rows in res.items():
        gen, euler = rows["generator"]["ed"], rows["teacher_euler4"]["ed"]
        assert gen < 0.5 * euler, (
            f"prompt {prompt!r}: after stage 1 the 4-step generator's energy distance to the exact "
            f"teacher ({gen:.4f}) should be under half that of the teacher's own 4-step Euler ({euler:.4f})")


@pytest.mark.slow
def test_train_stage2_raises_reward_near_tilted_target(stage1_run, tmp_path):
    out = str(tmp_path / "s2")
    shutil.copytree(stage1_run, out)
    torch.manual_seed(0)
    train.main(["--stage", "2", "--out", out] + STAGE2)
    res = evaluation.eval_stage2(out, n=N, seed=0)
    rows, beta = res["rows"], res["beta"]
    assert beta > 0.03, f"the stage-2 generator should be tilted toward the reward (fitted beta {beta:.3g})"
    for prompt, r in rows["RTDMD"].items():
        gain = r["reward"] - rows["stage 1"][prompt]["reward"]
        assert gain > 0.3, (f"prompt {prompt!r}: stage 2 should raise the mean reward by more than 0.3 "
                            f"over stage 1; it moved by {gain:+.3f}")
        assert abs(r["reward_gap"]) < 0.4, (
            f"prompt {prompt!r}: mean reward {r['reward']:.3f} should stay within 0.4 of the exact tilted "
            f"target's {r['reward_exact']:.3f} at the fitted beta {beta:.3g} (no reward hacking)")
