"""
rewards.py -- r(samples, prompts): what stage 2 maximises.

Every reward is a callable  reward(samples, prompts) -> {name: Tensor[B]}  and is differentiable
in `samples` where the method back-propagates through it (ALGORITHM.md 5.7, 6).

    1. toy rewards of a 2-D point, each with its exact reward-tilted mixture (ALGORITHM.md 9.5)
    2. image rewards: CLIPScore, PickScore, Aesthetic, HPSv2.1, ImageReward (REWARDS.md)
    3. the weighted multi-reward
"""
import torch

# ---------------------------------------------------------------------------------------------
# 1. Toy rewards and their exact tilts
# ---------------------------------------------------------------------------------------------

# (toy rewards go here)

# ---------------------------------------------------------------------------------------------
# 2. Image rewards
# ---------------------------------------------------------------------------------------------

# (image rewards go here)

# ---------------------------------------------------------------------------------------------
# 3. Weighted multi-reward
# ---------------------------------------------------------------------------------------------

# (multi-reward goes here)
