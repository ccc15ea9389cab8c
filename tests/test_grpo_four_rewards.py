"""
GRPO on the official four rewards (rewards.GRPO_WEIGHTS): subgrpo.group_advantages against the
official code's weight_advantages path (official code: rtdmd/trainers/grpo_trainer.py with
per_prompt_stat_tracking and per_prompt_global_std, rtdmd/trainers/grpo_utils.py
PerPromptStatTracker), re-derived here in numpy on rewards tiled over the train timesteps.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import rewards as R  # noqa: E402
import subgrpo  # noqa: E402


def official_advantages(rewards, prompts, weights, timesteps=2):
    """Per reward: tile to [N, T], subtract each prompt's mean, divide by the std over ALL N
    samples (+1e-4); weighted sum; then standardise the sum over everything (+1e-4)."""
    p = np.array(prompts)
    total = 0
    for name, w in weights.items():
        r = np.tile(np.asarray(rewards[name], dtype=np.float64)[:, None], (1, timesteps))
        adv = np.zeros_like(r)
        for q in np.unique(p):
            adv[p == q] = (r[p == q] - r[p == q].mean(axis=0, keepdims=True)) / (r.std(axis=0, keepdims=True) + 1e-4)
        total = total + w * adv
    total = (total - total.mean()) / (total.std() + 1e-4)
    assert np.allclose(total, total[:, :1]), "tiled rewards give the same advantage at every timestep"
    return total[:, 0]


def test_group_advantages_per_reward_like_the_official_code():
    assert R.GRPO_WEIGHTS == {"clipscore": 1.0, "hpsv2": 1.0, "pickscore": 1.0, "geneval": 1.0}
    g = torch.Generator().manual_seed(0)
    prompts = [f"prompt {i // 4}" for i in range(24)]  # 6 prompts x 4 samples each
    # the four scales differ by ~100x (cosines ~0.3 with small spread, GenEval in 0..1 steps):
    # per-reward standardisation is what keeps the small-spread rewards from being drowned out
    rewards = {"clipscore": 0.3 + 0.01 * torch.randn(24, generator=g),
               "hpsv2": 0.28 + 0.02 * torch.randn(24, generator=g),
               "pickscore": 0.88 + 0.01 * torch.randn(24, generator=g),
               "geneval": torch.randint(0, 3, (24,), generator=g) / 2.0}
    ours = subgrpo.group_advantages(rewards, prompts, R.GRPO_WEIGHTS)
    ref = official_advantages({k: v.numpy() for k, v in rewards.items()}, prompts, R.GRPO_WEIGHTS)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-5)
    # not the same as standardising the summed reward (what weight_advantages: false would do)
    summed = sum(rewards.values())
    naive = subgrpo.group_advantages({"sum": summed}, prompts, {"sum": 1.0})
    assert (ours - naive).abs().max() > 0.1, "per-reward advantages must differ from the summed reward's"


def test_training_rewards_four_tiny_rewards_and_their_advantages(tmp_path):
    """The official GRPO set on tiny random models: prompts alone reach geneval through the prompt
    file's records; BP keeps the three differentiable ones; one advantage per sample."""
    from paper_reward_assets import tiny_mask2former
    from reward_assets import build_reward_assets
    sources = dict(build_reward_assets(tmp_path / "r")["sources"], geneval_detector=tiny_mask2former(tmp_path / "m"))
    records = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
               {"tag": "counting", "include": [{"class": "dog", "count": 3}], "prompt": "a photo of three dogs"}]
    grpo, bp = R.training_rewards(sources, R.GRPO_WEIGHTS, records)
    grpo.scorers["geneval"].detector.SHORT = grpo.scorers["geneval"].detector.LONG = 128  # speed only
    assert set(bp.weights) == {"clipscore", "hpsv2", "pickscore"}, "geneval has no gradient: GRPO only"
    prompts = [r["prompt"] for r in records for _ in range(3)]  # 2 prompts x a group of 3
    torch.manual_seed(0)
    with torch.no_grad():
        out = grpo(torch.rand(6, 3, 64, 64), prompts)
    assert all(out[n].shape == (6,) and torch.isfinite(out[n]).all() for n in R.GRPO_WEIGHTS)
    # the planted detector finds three dogs in every image: -1 for "a dog" (1 - 2/1), 0 for
    # "three dogs" (counting needs score > 0.9, which 1 x mean mask probability never reaches)
    assert out["geneval"].tolist() == [-1.0] * 3 + [0.0] * 3
    A = subgrpo.group_advantages({n: out[n] for n in R.GRPO_WEIGHTS}, prompts, R.GRPO_WEIGHTS)
    assert torch.isfinite(A).all() and abs(A.mean()) < 1e-5 and abs(A.std(unbiased=False) - 1) < 1e-3
