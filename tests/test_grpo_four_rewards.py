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
