"""
subgrpo.py -- Stage 2 math (RTDMD): hybrid policy gradient, SubGRPO, final-step reward back-prop.
"""
import torch

# (stage-2 math goes here)
