"""eval.py with the paper's other metrics (GenEval, OCR, HPSv3, GenEval2) on a tiny twin: each metric on its
own prompt set (--reward-prompts, the official pairing), tiny random reward models loaded through
the real loaders, and the one-line errors for a prompt set a metric cannot use."""
import contextlib
import io
import json
import math

import pytest

from paper_reward_assets import build_paper_reward_assets
from reward_assets import build_reward_assets, cli_args
from tiny import load_tiny, tiny_dir  # noqa: F401  (pytest fixtures)
import eval as E

GENEVAL = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
           {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"}]


GENEVAL2 = [{"prompt": "two pigs", "vqa_list": [["How many pigs are in the image?", "two"]]},
            {"prompt": "a green backpack", "vqa_list": [["Is the backpack green?", "Yes"],
                                                        ["Are there any backpacks in the image?", "Yes"]]}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("paper")
    paths = dict(build_paper_reward_assets(d / "paper"), clip_l=build_reward_assets(d / "r")["paths"]["clip_l"])
    (d / "geneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENEVAL))
    (d / "ocr.txt").write_text('a sign that says "OPEN"\na cake with "Happy Birthday" on it\n')
    (d / "hpsv3.txt").write_text("a lighthouse in a storm\na bowl of ramen\n")
    (d / "geneval2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENEVAL2))
    return d, paths


def run(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = E.main(argv)
    return out, buf.getvalue()


def test_main_images_paper_metrics_on_their_prompt_sets(setup, tiny_dir, tmp_path):  # noqa: F811
    d, paths = setup
    routes = f"geneval={d / 'geneval.jsonl'},ocr={d / 'ocr.txt'},hpsv3={d / 'hpsv3.txt'},geneval2={d / 'geneval2.jsonl'}"
    out, text = run(["--model", "tiny-sd3", "--cache-dir", tiny_dir, "--out", str(tmp_path), "--max-prompts", "2",
                     "--batch-size", "2", "--rewards", "clipscore,geneval,ocr,hpsv3,geneval2", "--reward-prompts", routes]
                    + cli_args(paths))
    summ = out["rows"]["generator"]["summary_table_units"]
    assert set(summ) == {"clipscore", "geneval", "geneval_strict", "geneval_accuracy", "ocr", "hpsv3", "geneval2"}
    assert all(math.isfinite(v["mean"]) for v in summ.values())
    assert 0 <= summ["ocr"]["mean"] <= 1 and summ["geneval"]["mean"] <= 1
    sets = out["prompt_sets"]
    assert sets["builtin"]["rewards"] == ["clipscore"] and sets[str(d / "geneval.jsonl")]["rewards"] == ["geneval"]
    assert all(s["n_used"] == 2 for s in sets.values())
    # one record per image and prompt set; the GenEval ones carry its prompts and both columns
    ge = [r for r in out["per_image"] if r.get("prompt_file") == str(d / "geneval.jsonl")]
    assert [r["prompt"] for r in ge] == [g["prompt"] for g in GENEVAL]
    assert set(ge[0]["generator"]) == {"geneval", "geneval_strict", "geneval_accuracy"}
    tags = out["rows"]["generator"]["geneval_by_tag"]  # per tag, and the mean over tags
    assert set(tags["n"]) == {g["tag"] for g in GENEVAL} and sum(tags["n"].values()) == 2
    assert tags["overall"] == pytest.approx(sum(tags["accuracy"].values()) / len(tags["accuracy"]))
    assert "GenEval overall" in text
    assert len(out["per_image"]) == 10
    head = next(line for line in text.splitlines() if line.startswith("model"))
    assert all(col in head for col in ("clipscore", "geneval", "geneval_strict", "ocr", "hpsv3", "geneval2")), head


def test_main_images_prompt_set_errors_are_one_line(setup, tiny_dir, tmp_path, capsys):  # noqa: F811
    d, paths = setup
    for argv, needle in ((["--rewards", "geneval"], "geneval needs one GenEval metadata record"),
                         (["--rewards", "ocr"], "double quotes"),
                         (["--rewards", "clipscore", "--reward-prompts", "ocr=x.txt"], "NAME=FILE")):
        with pytest.raises(SystemExit):
            run(["--model", "tiny-sd3", "--cache-dir", tiny_dir, "--out", str(tmp_path / "o")] + argv + cli_args(paths))
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()
