"""Shared fixtures for tests on the tiny real backbones (random-init diffusers pipelines built in
code, models.build_tiny). Each twin is built once per test session into a temporary folder and loaded
through the same `from_pretrained` path as the real checkpoints."""
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

# The tiny models gain nothing from intra-op threads; when other processes hold the cores, two
# threads per op spin-wait on each other, so one thread is also the faster choice under load.
torch.set_num_threads(1)

TINY = ("tiny-sd3", "tiny-sd35", "tiny-flux2")
# Training prompts for the twins (train.py requires --prompts for every non-toy backbone).
PROMPT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "train.txt")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def load_tiny(tiny_dir):
    """load_tiny(name, **kw) -> backbone; the default (no kw) backbone is cached per session."""
    cache = {}

    def load(name, **kw):
        if kw:
            return models.load(name, cache_dir=tiny_dir, **kw)
        if name not in cache:
            cache[name] = models.load(name, cache_dir=tiny_dir)
        return cache[name]
    return load
