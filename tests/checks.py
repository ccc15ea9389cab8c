"""Assertions shared by the training tests: two runs (a resumed one and an uninterrupted one, or
two DDP ranks) must hold bitwise the same tensors."""
import torch


def assert_states_equal(a, b, keys=("generator", "fake", "ema")):
    """a[key] and b[key] hold the same tensor names with bitwise equal values, for every key."""
    for key in keys:
        assert a[key], f"{key}: no tensors to compare"
        assert a[key].keys() == b[key].keys(), f"{key}: the two runs hold different tensor names"
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}/{k} differs between the two runs"


def assert_checkpoints_equal(path_a, path_b, keys=("generator", "fake", "ema")):
    """The checkpoint files at path_a and path_b agree bitwise on `keys`; returns both dicts."""
    a = torch.load(path_a, map_location="cpu", weights_only=True)
    b = torch.load(path_b, map_location="cpu", weights_only=True)
    assert_states_equal(a, b, keys)
    return a, b
