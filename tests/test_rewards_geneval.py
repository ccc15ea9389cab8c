"""
GenEval in rewards.py: the rules on hand-made detections (every task type, failures included),
the relation geometry, the detection filter, and the whole scorer on a tiny random Mask2Former
and a tiny CLIP loaded through the real loading code (tests/reward_assets.py).
"""
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import rewards as R  # noqa: E402
from reward_assets import build_reward_assets  # noqa: E402
from paper_reward_assets import tiny_mask2former  # noqa: E402


def obj(x1, y1, x2, y2, score=0.95):
    return ([x1, y1, x2, y2, score], None)


def colours(table):
    """colors_of for hand-made detections: every object of a class gets table[class]."""
    return lambda found, name: [table[name]] * len(found)


def no_colours(found, name):
    raise AssertionError("a colour was asked for where the rules must not look at colours")


def verdict(objects, include, colors_of=no_colours, tag=None):
    ok, score, _ = R.geneval_verdict(objects, {"tag": tag, "include": include}, colors_of)
    return ok, score


# --- the rules, one block per GenEval task type -----------------------------------------------

def test_geneval_verdict_single_object():
    inc = [{"class": "dog", "count": 1}]
    assert verdict({"dog": [obj(0, 0, 9, 9)]}, inc) == (True, 1.0)
    assert verdict({}, inc) == (False, 0.0), "no dog: count term 1 - 1/1 = 0"
    assert verdict({"cat": [obj(0, 0, 9, 9)]}, inc) == (False, 0.0), "a cat is not a dog"
    # too many: 1 - |1 - 3| / 1 = -1 (the official partial credit is unbounded below)
    assert verdict({"dog": [obj(0, 0, 9, 9)] * 3}, inc) == (False, -1.0)


def test_geneval_verdict_two_object():
    inc = [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]
    assert verdict({"cat": [obj(0, 0, 5, 5)], "dog": [obj(6, 6, 9, 9)]}, inc) == (True, 1.0)
    assert verdict({"cat": [obj(0, 0, 5, 5)]}, inc) == (False, 0.5), "one of two terms"


def test_geneval_verdict_counting():
    inc = [{"class": "wine glass", "count": 2}]
    glass = obj(0, 0, 5, 5)
    assert verdict({"wine glass": [glass] * 2}, inc, tag="counting") == (True, 1.0)
    assert verdict({"wine glass": [glass] * 3}, inc, tag="counting") == (False, 0.5), "1 - 1/2"
    assert verdict({"wine glass": [glass]}, inc, tag="counting") == (False, 0.5), "1 - 1/2"


def test_geneval_verdict_colors():
    inc = [{"class": "car", "count": 1, "color": "red"}]
    car = {"car": [obj(0, 0, 9, 9)]}
    assert verdict(car, inc, colours({"car": "red"})) == (True, 1.0)
    assert verdict(car, inc, colours({"car": "blue"})) == (False, 0.5), "count right, colour wrong"
    # a wrong count adds one zero for the colour and never classifies a colour
    assert verdict({}, inc) == (False, 0.0)
    two = [{"class": "car", "count": 2, "color": "red"}]
    mixed = lambda found, name: ["red", "green"]  # noqa: E731
    assert verdict({"car": [obj(0, 0, 4, 4), obj(5, 5, 9, 9)]}, two, mixed) == (False, 0.75), \
        "count term 1, colour term 1 - |2 - 1| / 2"


def test_geneval_verdict_position():
    inc = [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}]
    laptop = obj(0, 40, 20, 60)
    assert verdict({"laptop": [laptop], "cow": [obj(80, 40, 100, 60)]}, inc) == (True, 1.0)
    # wrong side: terms laptop 1, cow count 1, then 0 for the failure AND the 1 the official
    # code appends after its loop: (1 + 1 + 0 + 1) / 4
    assert verdict({"laptop": [laptop], "cow": [obj(-80, 40, -60, 60)]}, inc) == (False, 0.75)
    # no laptop: laptop 0, cow 1, position 0 (no reference object)
    ok, score = verdict({"cow": [obj(80, 40, 100, 60)]}, inc)
    assert not ok and math.isclose(score, 1 / 3), score
    # cow missing: laptop 1, cow 0 and one zero for its position entry
    ok, score = verdict({"laptop": [laptop]}, inc)
    assert not ok and math.isclose(score, 1 / 3), score


def test_geneval_verdict_color_attr():
    inc = [{"class": "handbag", "count": 1, "color": "pink"},
           {"class": "scissors", "count": 1, "color": "black"}]
    found = {"handbag": [obj(0, 0, 5, 5)], "scissors": [obj(6, 6, 9, 9)]}
    assert verdict(found, inc, colours({"handbag": "pink", "scissors": "black"})) == (True, 1.0)
    assert verdict(found, inc, colours({"handbag": "pink", "scissors": "white"})) == (False, 0.75)
    # colours swapped between the objects: both colour terms fail
    assert verdict(found, inc, colours({"handbag": "black", "scissors": "pink"})) == (False, 0.5)


def test_geneval_verdict_colour_failure_skips_position():
    """A colour failure ends the entry: no position term, and the entry is no reference."""
    inc = [{"class": "cat", "count": 1},
           {"class": "dog", "count": 1, "color": "red", "position": ["left of", 0]}]
    found = {"cat": [obj(80, 0, 99, 20)], "dog": [obj(0, 0, 19, 20)]}
    assert verdict(found, inc, colours({"dog": "blue"})) == (False, 2 / 3)  # cat 1, dog 1, colour 0
    assert verdict(found, inc, colours({"dog": "red"})) == (True, 1.0)


# --- GenEval's own rule (geneval_correct: the benchmark's `correct`, with `exclude`) -----------

def correct(objects, include, colors_of=no_colours, exclude=()):
    return R.geneval_correct(objects, {"include": include, "exclude": list(exclude)}, colors_of)


def test_geneval_correct_every_tag():
    dog, cat = obj(0, 0, 9, 9), obj(80, 0, 99, 20)
    # single_object / two_object: at least the count, where the strict verdict wants it exact
    assert correct({"dog": [dog] * 3}, [{"class": "dog", "count": 1}])
    assert not verdict({"dog": [dog] * 3}, [{"class": "dog", "count": 1}])[0]
    assert not correct({"cat": [cat]}, [{"class": "dog", "count": 1}])
    assert not correct({"dog": [dog]}, [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    # counting: 2 or more without an exclude entry; with GenEval's exclude {count: 3}, exactly 2
    two = [{"class": "wine glass", "count": 2}]
    assert correct({"wine glass": [dog] * 3}, two)
    assert not correct({"wine glass": [dog] * 3}, two, exclude=[{"class": "wine glass", "count": 3}])
    assert correct({"wine glass": [dog] * 2}, two, exclude=[{"class": "wine glass", "count": 3}])
    assert not correct({"wine glass": [dog]}, two, exclude=[{"class": "wine glass", "count": 3}])
    # colors / color_attr: judged on the first `count` detections only
    red_first = lambda found, name: ["red", "blue"][:len(found)]  # noqa: E731
    assert correct({"car": [dog, cat]}, [{"class": "car", "count": 1, "color": "red"}], red_first)
    assert not correct({"car": [dog]}, [{"class": "car", "count": 1, "color": "red"}], colours({"car": "blue"}))
    attr = [{"class": "handbag", "count": 1, "color": "pink"}, {"class": "scissors", "count": 1, "color": "black"}]
    found = {"handbag": [dog], "scissors": [cat]}
    assert correct(found, attr, colours({"handbag": "pink", "scissors": "black"}))
    assert not correct(found, attr, colours({"handbag": "black", "scissors": "pink"}))
    # position: the first `count` objects against the reference entry's first objects
    pos = [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}]
    laptop, right, left = obj(0, 40, 20, 60), obj(80, 40, 100, 60), obj(-80, 40, -60, 60)
    assert correct({"laptop": [laptop], "cow": [right, left]}, pos), "the second cow is not judged"
    assert not correct({"laptop": [laptop], "cow": [left, right]}, pos)
    assert not correct({"cow": [right]}, pos), "no reference object"


def test_geneval_correct_exclude_fails_on_count_or_more_detections():
    meta = {"include": [{"class": "dog", "count": 1}], "exclude": [{"class": "dog", "count": 2}]}
    assert R.geneval_correct({"dog": [obj(0, 0, 9, 9)]}, meta, no_colours)
    assert not R.geneval_correct({"dog": [obj(0, 0, 9, 9)] * 2}, meta, no_colours)
    # an excluded class that is not in the include list: one detection fails a count-1 exclude
    meta = {"include": [{"class": "cat", "count": 1}], "exclude": [{"class": "dog", "count": 1}]}
    assert not R.geneval_correct({"cat": [obj(0, 0, 9, 9)], "dog": [obj(20, 0, 29, 9)]}, meta, no_colours)
    assert R.geneval_correct({"cat": [obj(0, 0, 9, 9)]}, meta, no_colours)


def test_geneval_by_tag_is_the_mean_per_tag_and_over_tags():
    import eval as E
    tags = ["counting", "counting", "counting", "position"]
    scores = {"geneval_accuracy": torch.tensor([1.0, 1.0, 0.0, 0.0]), "geneval_strict": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    t = E.geneval_by_tag(scores, tags)
    assert t["accuracy"] == {"counting": pytest.approx(2 / 3), "position": 0.0}
    assert t["strict_accuracy"]["counting"] == pytest.approx(1 / 3) and t["n"] == {"counting": 3, "position": 1}
    assert t["overall"] == pytest.approx(1 / 3), "GenEval's overall: mean over tags (0.5 over images)"


# --- geometry and the detection filter ---------------------------------------------------------

def test_relative_position_directions():
    b = [40, 40, 60, 60]
    assert R.relative_position([0, 40, 20, 60], b) == {"left of"}
    assert R.relative_position([80, 40, 100, 60], b) == {"right of"}
    assert R.relative_position([40, 0, 60, 20], b) == {"above"}, "y grows downwards"
    assert R.relative_position([40, 80, 60, 100], b) == {"below"}
    # diagonal: shrunk offset (48, 48) / |(50, 50)| = 0.68 on both axes
    assert R.relative_position([90, 90, 110, 110], [40, 40, 60, 60]) == {"right of", "below"}
    # mostly sideways: (60 - 4, 20 - 4) / |(60, 20)| = (0.89, 0.25)
    assert R.relative_position([100, 60, 120, 80], b) == {"right of"}


def test_relative_position_margin():
    """Offsets within 0.1 x (sum of the box sizes) count as no relation at all."""
    b = [40, 40, 60, 60]  # two 20-px boxes: margin 0.1 * 40 = 4 px per axis
    assert R.relative_position([43.9, 40, 63.9, 60], b) == set()
    # beyond it, the shrunk offset must still be over half the offset: (7.5 - 4) / 7.5 < 0.5
    assert R.relative_position([47.5, 40, 67.5, 60], b) == set()
    assert R.relative_position([48.5, 40, 68.5, 60], b) == {"right of"}, "(8.5 - 4) / 8.5 > 0.5"
    assert R.relative_position(b, b) == set()


def test_geneval_objects_thresholds():
    labels = torch.tensor([16, 16, 16, 15, 0])  # dog, dog, dog, cat, person
    scores = torch.tensor([0.5, 0.95, 0.2, 0.35, 0.3], dtype=torch.float64)
    boxes = torch.arange(20.0).view(5, 4)
    objs = R.geneval_objects(labels, scores, boxes, None, "two_object")
    assert sorted(objs) == ["cat", "dog"], "0.3 itself is not above the threshold"
    assert [o[0][4] for o in objs["dog"]] == pytest.approx([0.95, 0.5]), "highest score first"
    assert objs["dog"][0][0][:4] == [4.0, 5.0, 6.0, 7.0]
    counting = R.geneval_objects(labels, scores, boxes, None, "counting")
    assert list(counting) == ["dog"] and len(counting["dog"]) == 1, "counting keeps only > 0.9"
    many = R.geneval_objects(torch.full((20,), 16), torch.full((20,), 0.8), torch.zeros(20, 4), None, "")
    assert len(many["dog"]) == 16, "at most 16 objects per class"


def test_masks_to_boxes_half_open():
    m = torch.zeros(2, 10, 12, dtype=torch.bool)
    m[0, 2:5, 3:7] = True
    assert R.masks_to_boxes(m).tolist() == [[3, 2, 7, 5], [0, 0, 0, 0]]


def test_check_coco_order_names():
    names = list(R.GENEVAL_OBJECTS)
    names[64:67] = ["mouse", "remote", "keyboard"]  # Detectron2's short names
    names[9] = "Traffic-Light"
    R.check_coco_order(dict(enumerate(names)), "ok")
    R.check_coco_order({str(i): f"LABEL_{i}" for i in range(80)}, "random model")
    with pytest.raises(ValueError, match="COCO-80 order"):
        R.check_coco_order(dict(enumerate(names[1:] + names[:1])), "shifted")


# --- the scorer on tiny random models ---------------------------------------------------------

@pytest.fixture(scope="module")
def geneval_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("geneval")
    assets = build_reward_assets(d / "r")
    return {"clip_l": assets["sources"]["clip_l"], "geneval_detector": tiny_mask2former(d / "m2f")}


def test_geneval_scorer_tiny_models(geneval_sources):
    mr = R.MultiReward({"geneval": 1.0}, geneval_sources, quantize=True)
    scorer = mr.scorers["geneval"]
    scorer.detector.SHORT = scorer.detector.LONG = 128  # mmdet's 800 px works too, only slower
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 48)
    dets = scorer.detector(R.quantize_uint8(images))
    assert all(d[3].shape[1:] == (64, 48) and (d[1] > 0.3).all() for d in dets), "survivors' masks, at the image's size"
    found = [R.geneval_objects(*d, "colors") for d in dets]
    assert all(list(f) == ["dog"] and len(f["dog"]) == 3 for f in found), \
        "the planted class head must give three dogs per image (score = 1 x mean mask prob > 0.3)"
    meta = [{"tag": "colors", "include": [{"class": "dog", "count": 3, "color": "red"}]},
            {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}]
    out = mr(images, ["a photo of three red dogs", "a photo of a dog"], meta)
    s, strict = out["geneval"], out["geneval_strict"]
    assert torch.isfinite(s).all() and s.shape == (2,)
    # image 0: count right (term 1), colour term 1 - |3 - k| / 3 for k red dogs among 3
    assert 0.5 <= s[0] <= 1 and (s[0] * 2 - 1) * 3 == pytest.approx(round(((s[0] * 2 - 1) * 3).item()))
    assert s[1].item() == pytest.approx(-1.0), "three dogs for one expected: 1 - |1 - 3| / 1"
    assert strict[1] == 0 and set(strict.tolist()) <= {0.0, 1.0}
    # GenEval's rule: three dogs pass "at least one dog"; image 0 as strict (3 found, all judged)
    assert out["geneval_accuracy"][1] == 1 and out["geneval_accuracy"][0] == strict[0]
    assert torch.equal(out["weighted"], s)
    # the candidates dropped on the device change nothing: the same numbers with all 100 kept
    scorer.detector.KEEP_ABOVE = -1.0
    assert all(len(d[0]) == R.GENEVAL_TOPK for d in scorer.detector(R.quantize_uint8(images)))
    again = mr(images, ["a photo of three red dogs", "a photo of a dog"], meta)
    assert all(torch.equal(again[k], out[k]) for k in out)


def test_masks_to_boxes():
    m = torch.zeros(3, 5, 6, dtype=torch.bool)
    m[0, 1:3, 2:5] = True
    m[1, 4, 0] = True
    assert R.masks_to_boxes(m).tolist() == [[2, 1, 5, 3], [0, 4, 1, 5], [0, 0, 0, 0]]


def test_geneval_scorer_needs_metadata(geneval_sources):
    mr = R.MultiReward({"geneval": 1.0}, geneval_sources)
    with pytest.raises(ValueError, match="GenEval metadata"):
        mr(torch.rand(1, 3, 32, 32), ["a photo of a dog"])
    with pytest.raises(ValueError, match="GenEval metadata"):
        mr(torch.rand(1, 3, 32, 32), ["a photo of a dog"], [{"prompt": "a photo of a dog"}])


def test_geneval_scorer_missing_checkpoint(tmp_path):
    mr = R.MultiReward({"geneval": 1.0}, {"geneval_detector": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="facebook/mask2former-swin-small-coco-instance"):
        R.preflight(mr, "cpu")
