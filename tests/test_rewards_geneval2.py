"""
GenEval2 (Soft-TIFA) in rewards.py: the answer spellings and the aggregation of the official
scorer, and the whole scorer on a tiny random Qwen3-VL loaded through the real loading code.
"""
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import rewards as R  # noqa: E402
from paper_reward_assets import tiny_qwen3vl  # noqa: E402

RECORDS = [{"prompt": "a green backpack and a pig",
            "vqa_list": [["How many backpacks are in the image?", "one"], ["Is the backpack green?", "Yes"],
                         ["Are there any pigs in the image?", "Yes"]]},
           {"prompt": "seven croissants", "vqa_list": [["How many croissants are in the image?", "seven"]]}]


def test_soft_tifa_answers_official_spellings():
    assert R.soft_tifa_answers("How many pigs are in the image?", "one") == ["one", "One", " one", " One", "1", " 1"]
    assert R.soft_tifa_answers("How many pigs are in the image?", "twelve")[-2:] == ["other", " other"], \
        "beyond ten the official digit lookup falls back to the word 'other'"
    assert R.soft_tifa_answers("Is the backpack green?", "No") == ["Yes", "yes", " Yes", " yes"], \
        "every other question is scored on Yes, whatever the record's answer"


def test_geometric_mean_values():
    assert R.geometric_mean([0.25, 1.0]) == pytest.approx(0.5)
    assert R.geometric_mean([0.2, 0.2, 0.2]) == pytest.approx(0.2)
    assert R.geometric_mean([0.9, 0.0]) == 0.0
    with pytest.raises(ValueError):
        R.geometric_mean([])


@pytest.fixture(scope="module")
def scorer_mr(tmp_path_factory):
    return R.MultiReward({"geneval2": 1.0}, {"geneval2": tiny_qwen3vl(tmp_path_factory.mktemp("q3") / "m")},
                         quantize=True)


def test_geneval2_scorer_tiny_model(scorer_mr):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    s = scorer_mr(images, [r["prompt"] for r in RECORDS], RECORDS)["geneval2"]
    assert s.shape == (2,) and torch.isfinite(s).all() and (s >= 0).all()
    sc = scorer_mr.scorers["geneval2"]
    img = R.quantize_uint8(images)
    atoms = sc.atom_probabilities(img[0], RECORDS[0]["vqa_list"])
    assert s[0].item() == pytest.approx(math.prod(atoms) ** (1 / 3), rel=1e-5), "geometric mean of the atoms"
    # a batch of questions (right-padded) gives each question the probabilities it gets alone
    alone = [sc.atom_probabilities(img[0], [qa])[0] for qa in RECORDS[0]["vqa_list"]]
    assert atoms == pytest.approx(alone, rel=1e-4)
    px, grid, n = sc.image_inputs(img[0])
    assert grid.tolist() == [[1, 4, 4]] and n == 4, "64 px stays 64 px: 4 x 4 patches, merged 2 x 2"


def test_geneval2_scorer_needs_metadata(scorer_mr):
    with pytest.raises(ValueError, match="vqa_list"):
        scorer_mr(torch.rand(1, 3, 64, 64), ["a pig"])
    R.check_metadata(["clipscore", "ocr"], None)  # rewards without metadata never ask for it
    with pytest.raises(ValueError, match="GenEval metadata record with 'include'.*train_metadata.jsonl"):
        R.check_metadata(["geneval2", "geneval"], [{"vqa_list": []}])
    assert scorer_mr(torch.rand(1, 3, 64, 64), ["x"], [{"vqa_list": []}])["geneval2"].item() == -10.0, \
        "a record without atoms scores -10, as the official code does"


def test_geneval2_scorer_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen3-VL-8B-Instruct"):
        R.preflight(R.MultiReward({"geneval2": 1.0}, {"geneval2": str(tmp_path / "nowhere")}), "cpu")


def test_chat_template_from_processor_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "chat_template.json").write_text('{"chat_template": "{{ messages[0][\'content\'] }}"}')
    assert R._chat_template(str(tmp_path / "a")) == "{{ messages[0]['content'] }}"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "chat_template.jinja").write_text("<|im_start|>{{ x }}")
    assert R._chat_template(str(tmp_path / "b")) == "<|im_start|>{{ x }}"
    with pytest.raises(FileNotFoundError, match="chat template"):
        R._chat_template(str(tmp_path))
