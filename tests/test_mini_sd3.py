"""mini-sd3 (models.py section 7, rewards.py section 4): the drawn shapes world, its detector and
soft rewards, a seconds-long pretraining through the same code as the 10-minute one, the saved
folder in the stock StableDiffusion3Pipeline, and train.py stages 1 and 2 on that folder."""
import json
import os
import random

import pytest
import torch

import models
import rewards
import train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A mini-sd3 folder pretrained for 3 CPU seconds (untrained in effect, but every line runs)."""
    folder = str(tmp_path_factory.mktemp("mini") / "mini-sd3")
    report = models.pretrain_mini(folder, minutes=0.05, log=lambda *_: None)
    return folder, report


def picture(prompt, seed=0):
    """One clean drawing [3, H, W] in [0, 1]."""
    return (models.mini_batch([prompt], random.Random(seed))[0] + 1) / 2


def test_prompts_grammar_and_word_level_tokenizers():
    assert len(models.MINI_PROMPTS) == 105 and len(set(models.MINI_PROMPTS)) == 105
    assert models.parse_mini_prompt("two blue squares") == (2, "blue", "square", None)
    assert models.parse_mini_prompt("a red circle on the left") == (1, "red", "circle", "on the left")
    assert models.parse_mini_prompt("a photo of a dog") is None
    parts = models.mini_parts()
    for p in models.MINI_PROMPTS:  # one token a word: nothing is truncated at 8 tokens
        assert len(parts["tokenizer"](p).input_ids) == len(p.split()) + 2 <= 8
        assert len(parts["tokenizer_3"](p).input_ids) == len(p.split()) + 1 <= 8


def test_detector_is_exact_on_clean_drawings():
    """Every prompt, 3 random layouts each: strict verdict and full partial credit; blanks empty."""
    for seed in range(3):
        for p in models.MINI_PROMPTS:
            assert rewards.shapes_verdict(rewards.shapes_objects(picture(p, seed)), p) == (True, 1.0), (p, seed)
    assert rewards.shapes_objects(picture("")) == []


def test_detector_partial_credit_by_hand():
    objs = rewards.shapes_objects(picture("two blue squares"))
    assert rewards.shapes_verdict(objs, "three blue squares") == (False, pytest.approx(2 / 3))  # 3 terms of 1 - 1/3
    assert rewards.shapes_verdict(objs, "two red squares") == (False, pytest.approx(1 / 3))  # count only
    assert rewards.shapes_verdict(objs, "two blue circles") == (False, pytest.approx(2 / 3))  # shape wrong
    one = rewards.shapes_objects(picture("a green triangle on the right"))
    assert rewards.shapes_verdict(one, "a green triangle on the left") == (False, 0.75)  # position wrong
    assert rewards.shapes_verdict(one, "a dog") == (False, 0.0)


def test_scorers_registered_and_soft_score_differentiable():
    prompts = ["two blue squares", "a red circle on the left"]
    images = torch.stack([picture(p) for p in prompts]).requires_grad_(True)
    grpo, bp = rewards.training_rewards(weights={"shapes": 1.0, "shapes_soft": 1.0})
    assert list(bp.weights) == ["shapes_soft"]  # the detector is GRPO only
    with torch.no_grad():
        out = grpo(images, prompts)
    assert out["shapes"].tolist() == [1.0, 1.0]
    soft = bp(images, prompts)["shapes_soft"]
    assert soft.min() > 0.8  # a clean drawing of the prompt
    wrong = bp(images, ["three green squares", "a red circle on the right"])["shapes_soft"]
    assert (wrong < soft - 0.5).all()
    soft.sum().backward()
    assert images.grad.abs().sum() > 0
    assert rewards.make_scorers(["shapes_strict"])["shapes_strict"](images.detach(), prompts)["shapes_strict"].tolist() == [1.0, 1.0]


def test_soft_score_sees_the_shape_and_fills_a_squares_corners():
    """A square with cut corners reads as a circle (fill < 0.9). The soft score's area term barely
    moves, so its corner term must tell; every clean drawing scores 1."""
    for seed in range(3):
        scores = rewards.ShapesSoft()(torch.stack([picture(p, seed) for p in models.MINI_PROMPTS]), models.MINI_PROMPTS)
        assert scores["shapes_soft"].min() > 0.999, seed
    square = picture("a red square")
    (colour, shape, _, _, (x0, y0, x1, y1)), = rewards.shapes_objects(square, boxes=True)
    assert (colour, shape) == ("red", "square")
    cut = square.clone()
    for y in (y0, y0 + 1, y1 - 1, y1):  # a white 2 x 2 block in each corner
        cut[:, y, [x0, x0 + 1, x1 - 1, x1]] = 1.0
    assert rewards.shapes_objects(cut)[0][1] == "circle"
    # the area term (SHAPE_AREA, 16 pixels fewer) and all 8 corner pixels white: SHAPE_CORNER_WEIGHT x 1
    area = (x1 - x0 + 1) * (y1 - y0 + 1) - 16
    lo, hi = rewards.SHAPE_AREA["square"]
    area_term = 1 - max(0, lo - area) / ((lo + hi) / 2)
    lo_c, hi_c = rewards.SHAPE_AREA["circle"]  # the clean square as a circle: every corner full
    as_circle = 1 - max(0, area + 16 - hi_c) / ((lo_c + hi_c) / 2) - rewards.SHAPE_CORNER_WEIGHT
    cut.requires_grad_(True)
    soft = rewards.ShapesSoft()(torch.stack([cut, square]), ["a red square", "a red circle"])["shapes_soft"]
    assert soft.tolist() == pytest.approx([area_term - rewards.SHAPE_CORNER_WEIGHT, as_circle], abs=1e-4)
    soft[0].backward()
    red = torch.tensor(models.MINI_COLOURS["red"]) / 255
    for y, x in rewards.corner_pixels((x0, y0, x1, y1)):  # ascent paints the corners red
        assert (cut.grad[:, y, x] * (red - 1)).sum() > 0


def test_pretraining_writes_a_folder_the_stock_pipeline_draws_from(mini):
    from diffusers import StableDiffusion3Pipeline
    folder, report = mini
    assert report["vae_steps"] > 0 and report["transformer_steps"] > 0
    assert json.load(open(os.path.join(folder, "pretrain.json"))) == report
    assert open(os.path.join(folder, "prompts.txt")).read().split("\n")[:-1] == models.MINI_PROMPTS
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("two blue squares", num_inference_steps=2, height=32, width=32, guidance_scale=2.0,
               max_sequence_length=8, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    bb = models.load("mini-sd3", pretrained=folder)
    assert bb.latent_shape == (8, 8, 8) and bb.resolution == 32 and bb.guidance == 2.0


def test_missing_folder_names_the_command(tmp_path):
    with pytest.raises(SystemExit, match="python models.py --pretrain mini-sd3"):
        models.load("mini-sd3", pretrained=str(tmp_path / "nowhere"))


def test_train_stage1_and_stage2_on_mini(mini, tmp_path):
    folder, _ = mini
    common = ["--model", "mini-sd3", "--pretrained", folder, "--prompts", os.path.join(folder, "prompts.txt"),
              "--out", str(tmp_path / "run"), "--log-every", "1"]
    train.main(["--stage", "1", "--steps", "2", "--batch-size", "2", "--fake-update-ratio", "1"] + common)
    train.main(["--stage", "2", "--steps", "1", "--batch-size", "4", "--group-size", "2",
                "--num-batches-per-epoch", "1", "--rewards", "shapes,shapes_soft"] + common)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    s2 = [r for r in log if r["stage"] == 2]
    assert s2 and all(torch.isfinite(torch.tensor(v)) for r in s2 for v in r.values() if isinstance(v, float))
    assert os.path.isfile(tmp_path / "run" / "stage2.pt")


def test_detector_energy_distance_reads_one_on_drawings_and_far_on_wrong_prompts():
    """eval.shapes_energy, the toy's ED/floor on (prompt, detector features): a fresh set of
    drawings of the prompts reads about 1; the same drawings one prompt off read far above."""
    import eval as E
    prompts = models.MINI_PROMPTS[::4]  # 27 prompts: counts, colours, shapes and positions
    drawn = lambda ps, seed: (models.mini_batch(ps, random.Random(seed)) + 1) / 2  # noqa: E731
    ed, floor = E.shapes_energy(drawn(prompts, 7), prompts, seed=0)
    assert 0.5 < ed / floor < 2
    ed, floor = E.shapes_energy(drawn(prompts[1:] + prompts[:1], 7), prompts, seed=0)
    assert ed / floor > 10


def test_readme_table_names_the_mini_defaults():
    """The README's mini-sd3 table reports its stage rows at the defaults: the stage-1 iterations
    and stage-2 epochs it names are what resolve_defaults gives mini-sd3, and the stage-2 back-prop
    weight is the paper's 1e-4 scaled by the latent-size ratio (train.PER_BACKBONE's comment)."""
    import re
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8") as f:
        section = f.read().split("## The mini-sd3 world", 1)[1].split("\n## ", 1)[0]
    resolved = lambda st: train.resolve_defaults(train.get_args(["--stage", st, "--model", "mini-sd3"]), False)  # noqa: E731
    s1, s2 = resolved("1"), resolved("2")
    assert re.search(r"\| stage 1 \(AC-DMD, ([\d,]+) iterations\)", section).group(1).replace(",", "") == str(s1.steps)
    assert re.search(r"\| stage 2 \(RTDMD, (\d+) epochs", section).group(1) == str(s2.steps)
    ratio = (16 * 64 * 64) / (8 * (models.MINI_SIZE // 4) ** 2)  # SD3.5-M at 512 px over mini-sd3's 8 x 8 x 8
    assert ratio == 128 and 0.5 < s2.w_bp / (1e-4 * ratio) < 1.5
    # the pretraining command's comment names the split that models.pretrain_mini and its flag default to
    share = models.MINI_VAE_SHARE
    said = re.search(r"--pretrain mini-sd3 +# [^\n]*VAE (\d+)%, transformer (\d+)%", section)
    assert (int(said.group(1)), int(said.group(2))) == (round(100 * share), round(100 * (1 - share)))
