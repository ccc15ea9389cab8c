"""train.py --profile and sample.py --speed: the phase table adds up to the step time, the
network calls are counted where the loops make them, and the sampling benchmark counts NFEs."""
import json
import os
import shutil

import pytest
import torch

from test_train import toy_base, run_dir  # noqa: F401  (pytest fixture)
from tiny import tiny_dir  # noqa: F401  (pytest fixture)
import models
import sample
import train


def test_profiler_phases_add_up_and_count_the_calls(tmp_path, toy_base):
    out = run_dir(tmp_path, "prof", toy_base)
    # --fake-update-ratio 1: every iteration runs both updates, so the counts below are exact
    train.main(["--stage", "1", "--out", out, "--batch-size", "64", "--fake-update-ratio", "1",
                "--profile", "5"])
    rep = json.load(open(os.path.join(out, "profile_stage1.json")))
    assert rep["steps_profiled"] == 5 and rep["warmup"] == train.PROFILE_WARMUP
    phases = {r["phase"]: r for r in rep["phases"]}
    own = [r["seconds_per_step"] for r in rep["phases"] if r["phase"] != "other"]
    assert min(own) >= 0 and sum(own) <= rep["step_seconds"] * 1.001, "nested phases counted twice"
    assert sum(r["seconds_per_step"] for r in rep["phases"]) == pytest.approx(rep["step_seconds"])
    # fake-score update: the fake's velocity at x_t and one batched call for the two consistency
    # moves, both with grad; generator update: the teacher (CFG 1: one call) and the fake, no grad
    assert (phases["fake-score update"]["forward_calls"], phases["fake-score update"]["backward_calls"]) == (2, 2)
    assert (phases["generator update"]["forward_calls"], phases["generator update"]["backward_calls"]) == (2, 0)
    # backward simulation: `stop` generator calls per simulation, two simulations an iteration,
    # the generator step's last call with grad: between 2 and 8 calls, exactly one with grad
    sim = phases["backward simulation"]
    assert 2 <= sim["forward_calls"] <= 8 and sim["backward_calls"] == 1
    assert phases["EMA"]["forward_calls"] == phases["optimiser step"]["forward_calls"] == 0
    assert rep["bare_seconds"] > 0 and rep["step_over_bare"] > 1, "a step cannot beat its own network passes"
    assert rep["peak_memory_gib"] > 0
    trace = json.load(open(os.path.join(out, "profile_stage1.trace.json")))
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"fake-score update", "generator update", "backward simulation", "EMA"} <= names
    ck = torch.load(os.path.join(out, "stage1.pt"), weights_only=False)
    assert ck["step"] == train.PROFILE_WARMUP + 5, "--profile N runs the warm-up and N steps, then stops"


def test_no_profiler_line_in_a_loop():
    """The phases are marked by decorators (train.phase), never inside the loops' bodies."""
    src = open(os.path.join(os.path.dirname(train.__file__), "train.py")).read()
    assert "PROF." not in src and src.count("record_function(") == 2  # phase() and call_ranges


@pytest.mark.slow
def test_sampling_speed_counts_nfe_and_reports_both_views(tiny_dir, tmp_path):
    d = os.path.join(tiny_dir, "tiny-sd3")
    if not os.path.isdir(d):
        with torch.random.fork_rng():
            models.build_tiny("tiny-sd3", d)
    out = str(tmp_path / "speed.json")
    r = sample.main(["--speed", "--model", "tiny-sd3", "--pretrained", d, "--resolution", "32", "--n", "2",
                     "--steps", "6", "--out", out])
    assert (r["generator_nfe"], r["teacher_nfe"]) == (4, 12), "4 generator calls; 6 CFG steps = 12 passes"
    for k in ("generator_sampler", "teacher_sampler", "generator_end_to_end", "teacher_end_to_end"):
        assert r[f"{k}_images_per_s"] > 0
    assert r["speedup_sampler"] == pytest.approx(r["generator_sampler_images_per_s"] / r["teacher_sampler_images_per_s"])
    assert json.load(open(out))["teacher_steps"] == 6
