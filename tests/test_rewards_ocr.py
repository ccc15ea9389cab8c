"""
OCR in rewards.py: the edit distance, the official score rule on hand-made strings, the quoted
target, and the whole scorer on a tiny random Florence-2 loaded through the real loading code.
"""
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import rewards as R  # noqa: E402
from paper_reward_assets import tiny_florence  # noqa: E402


def levenshtein_reference(a, b):
    """The textbook recursion, memoised: the definition the DP must reproduce."""
    from functools import lru_cache

    @lru_cache(None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def test_edit_distance_known_pairs():
    assert R.edit_distance("kitten", "sitting") == 3
    assert R.edit_distance("flaw", "lawn") == 2
    assert R.edit_distance("", "abc") == 3 and R.edit_distance("abc", "") == 3
    assert R.edit_distance("same", "same") == 0


def test_edit_distance_matches_the_recursion():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert R.edit_distance(a, b) == levenshtein_reference(a, b) == R.edit_distance(b, a), (a, b)


def test_ocr_score_official_rule():
    assert R.ocr_score("OPEN LATE 24h", "open late") == 1.0, "target inside what was read, any case"
    assert R.ocr_score("OpenLate", "open late") == 1.0, "spaces are ignored"
    assert R.ocr_score("OPEM LATE", "OPEN LATE") == pytest.approx(1 - 1 / 8), "one substitution in 8"
    assert R.ocr_score("OPN", "OPEN") == pytest.approx(0.75), "one insertion needed"
    assert R.ocr_score("", "OPEN") == 0.0
    assert R.ocr_score("a very long and entirely different text", "hi") == 0.0, "distance capped at length"


def test_ocr_target_first_quotes():
    assert R.ocr_target('a sign that says "Hello World", and "other"') == "Hello World"
    for bad in ("no quotes here", 'one " quote', 'empty "" quotes'):
        with pytest.raises(ValueError, match="double quotes"):
            R.ocr_target(bad)


# --- the scorer on a tiny random Florence-2 -----------------------------------------------------

def test_ocr_scorer_tiny_model(tmp_path):
    mr = R.MultiReward({"ocr": 1.0}, {"ocr": tiny_florence(tmp_path / "florence")}, quantize=True)
    scorer = mr.scorers["ocr"]
    scorer.max_new_tokens = 12
    prompts = ['a neon sign that says "OPEN LATE"', 'a cake with "Happy Birthday" written on it']
    torch.manual_seed(1)
    images = torch.rand(2, 3, 48, 80)
    out = mr(images, prompts)["ocr"]
    assert out.shape == (2,) and torch.isfinite(out).all() and ((0 <= out) & (out <= 1)).all(), out
    assert scorer.processor.image_processor.size["height"] == 64, "the checkpoint's processor sets the input size"
    read = scorer.read(R.quantize_uint8(images))
    assert all(isinstance(r, str) for r in read)
    expected = [R.ocr_score(r, t) for r, t in zip(read, ["OPEN LATE", "Happy Birthday"])]
    assert out.tolist() == pytest.approx(expected), "the score is ocr_score of what the model read"
    with pytest.raises(ValueError, match="double quotes"):
        mr(images, ["no quoted text", "none here either"])


def test_ocr_scorer_missing_checkpoint(tmp_path):
    mr = R.MultiReward({"ocr": 1.0}, {"ocr": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="florence-community/Florence-2-base"):
        R.preflight(mr, "cpu")
