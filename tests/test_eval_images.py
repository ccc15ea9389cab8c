"""eval.py on images, offline: tiny reward models (tests/reward_assets.py) and tiny twin
backbones. The CLI runs end to end through eval.main(argv); its numbers are checked against the
scorer called directly on images re-generated here, the teacher row against the stock diffusers
pipeline, and a missing checkpoint against the one-line error that leaves the run untouched."""
import contextlib
import hashlib
import io
import json
import os

import pytest
import torch
from PIL import Image

from reward_assets import build_reward_assets, cli_args
from tiny import PROMPT_FILE, load_tiny, tiny_dir  # noqa: F401  (pytest fixtures)
import eval as E
import models
import rewards
import sample
import train

NAMES = ["clipscore", "pickscore", "hpsv2", "aesthetic", "imagereward"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_reward_assets(tmp_path_factory.mktemp("rewards"))


def run_cli(argv):
    """eval.main(argv) with its stdout captured: (returned dict, printed text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = E.main(argv)
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def smoke(assets, tiny_dir, tmp_path_factory):  # noqa: F811
    """--model tiny-sd3 on 5 built-in prompts, batch 2, with a 3-step teacher row."""
    out_dir = str(tmp_path_factory.mktemp("eval_out"))
    argv = ["--model", "tiny-sd3", "--cache-dir", tiny_dir, "--out", out_dir, "--max-prompts", "5",
            "--batch-size", "2", "--teacher", "--teacher-steps", "3"] + cli_args(assets["paths"])
    out, text = run_cli(argv)
    return dict(out=out, text=text, dir=out_dir)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny-sd3 stage-1 run folder written by train.py (2 iterations)."""
    d = str(tmp_path_factory.mktemp("runs") / "tiny")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--stage", "1", "--model", "tiny-sd3", "--out", d, "--steps", "2", "--prompts", PROMPT_FILE,
                    "--batch-size", "2", "--fake-update-ratio", "1"])
    return d


def snapshot(folder):
    """{relative path: sha256} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def error_line(stderr):
    """The one "error: ..." line of stderr (loaders' progress bars may share stderr); no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- the CLI end to end -----------------------------------------------------------------------


def test_main_images_eval_json_table_and_grid(smoke):
    out, text, d = smoke["out"], smoke["text"], smoke["dir"]
    with open(os.path.join(d, "eval.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(out))  # what main returns is what it wrote
    assert saved["protocol"] == {"name": "official", "overrides": {"max_prompts": 5, "batch_size": 2}}
    assert {"model", "run", "stage", "resolution", "seed", "batch_size", "n_per_prompt", "rows",
            "prompts", "rewards", "per_image", "grids"} <= set(saved)
    knobs = (saved["model"], saved["resolution"], saved["seed"], saved["batch_size"])
    assert knobs == ("tiny-sd3", 32, 42, 2)
    g, t = saved["rows"]["generator"], saved["rows"]["teacher"]
    assert (g["steps"], g["nfe"], g["eta"], g["cfg"]) == (4, 4, 0.9, 1.0)
    assert g["sigmas"] == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert (t["steps"], t["nfe"], t["cfg"], len(t["sigmas"])) == (3, 6, 7.0, 4)  # tiny-sd3's g
    pr = saved["prompts"]
    assert (pr["file"], pr["n_in_file"], pr["n_used"], pr["max_prompts"]) == ("builtin", 16, 5, 5)
    assert pr["sha256"] == hashlib.sha256("\n".join(E.BUILTIN_PROMPTS).encode()).hexdigest()
    assert saved["rewards"]["weights"] == {n: 1.0 for n in NAMES}
    assert saved["rewards"]["sources"]["hpsv2"].endswith("hps")
    assert [r["prompt"] for r in saved["per_image"]] == E.BUILTIN_PROMPTS[:5]
    for row in ("generator", "teacher"):  # summaries = per-image scores, PickScore x 26
        for n in NAMES:
            v = torch.tensor([r[row][n] for r in saved["per_image"]], dtype=torch.float64)
            v = v * (26 if n == "pickscore" else 1)
            summ = saved["rows"][row]["summary_table_units"][n]
            assert summ["mean"] == pytest.approx(v.mean().item())
            assert summ["std"] == pytest.approx(v.std(correction=0).item())
    # the table: a header with every reward, one line per row, "mean ± std" cells
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert all(n in lines[head] for n in NAMES) and "pickscore (x26)" in lines[head]
    assert lines[head + 2].startswith("tiny-sd3 base (4 NFE)") and lines[head + 2].count("±") == 5
    assert lines[head + 3].startswith("teacher (6 NFE, CFG 7)")
    # the grids: 5 images of 32 px, 3 per row (diffusers' make_image_grid, the 6th cell white)
    for name in ("eval.png", "eval_teacher.png"):
        assert Image.open(os.path.join(d, name)).size == (3 * 32, 2 * 32)


def test_eval_images_scores_equal_the_scorer_on_regenerated_images(smoke, assets, load_tiny):  # noqa: F811
    """Redo the first batch by hand (seed 42 once: initial noise, then 4 CPS noises) for the
    generator, and with the STOCK pipeline for the teacher; score with a fresh scorer."""
    bb = load_tiny("tiny-sd3")
    per_image = smoke["out"]["per_image"]
    prompts = E.BUILTIN_PROMPTS[:2]
    scorer = rewards.eval_rewards(assets["sources"])
    gen = torch.Generator().manual_seed(42)
    x = bb.noise(2, gen)
    noises = [bb.noise(2, gen) for _ in range(4)]
    with torch.no_grad():
        img = bb.decode(sample.rollout(bb, bb.generator_base, x, bb.encode(prompts), noises=noises)[-1])
        ref = scorer(img, prompts)
        x = bb.noise(2, torch.Generator().manual_seed(42))
        lat = bb.pipe(prompt=prompts, num_inference_steps=3, guidance_scale=7.0, height=32, width=32,
                      latents=x, output_type="latent", max_sequence_length=bb.max_sequence_length).images
        ref_t = scorer(bb.decode(lat), prompts)
    for i in range(2):
        for n in NAMES:
            assert per_image[i]["generator"][n] == pytest.approx(ref[n][i].item(), rel=1e-5, abs=1e-6)
            assert per_image[i]["teacher"][n] == pytest.approx(ref_t[n][i].item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux2"])
def test_teacher_batch_is_euler_on_teacher_sigmas_decoded(load_tiny, name):  # noqa: F811
    """sample.teacher_batch (the stock pipeline, output_type="latent", decoded) = Euler with CFG
    over bb.teacher_sigmas(N), decoded by bb.decode: the same images."""
    bb = load_tiny(name)
    prompts = ["a red cat", "two dogs"]
    x = bb.noise(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = sample.teacher_batch(bb, x, prompts, 5)
        sig = bb.teacher_sigmas(5)
        ours = bb.decode(sample.euler_sample(bb, bb.teacher, x, sig, bb.encode(prompts), bb.encode(["", ""]),
                                             guidance=bb.guidance))
    assert len(sig) == 6 and sig[0] == 1 and sig[-1] == 0
    assert ref.shape == (2, 3, 32, 32) and torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_main_images_run_folder_and_jsonl_prompts(assets, tiny_run, tmp_path):
    """--run on a tiny-sd3 stage-1 run: eval.json lands in the run, checkpoints are untouched."""
    before = snapshot(tiny_run)
    pfile = tmp_path / "p.jsonl"
    pfile.write_text('{"prompt": "a red cat", "tag": "x"}\n\n{"prompt": "two dogs"}\n')
    out, text = run_cli(["--run", tiny_run, "--prompts", str(pfile), "--rewards", "clipscore,aesthetic",
                         "--seed", "7"] + cli_args(assets["paths"]))
    assert (out["model"], out["stage"], out["seed"]) == ("tiny-sd3", 1, 7)
    assert out["prompts"]["sha256"] == hashlib.sha256(pfile.read_bytes()).hexdigest()
    assert [r["prompt"] for r in out["per_image"]] == ["a red cat", "two dogs"]
    assert set(out["per_image"][0]["generator"]) == {"clipscore", "aesthetic"}
    assert "tiny stage 1 (4 NFE)" in text
    after = snapshot(tiny_run)
    assert {k: v for k, v in after.items() if k not in ("eval.json", "eval.png")} == before
    assert Image.open(os.path.join(tiny_run, "eval.png")).size == (2 * 32, 32)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("slot,needle", [
    ("hpsv2", r"HPS_v2.1_compressed.pt' not found at '{}'.*xswu/HPSv2.*--reward-paths hpsv2=PATH"),
    ("clip_l", r"CLIP model not found at '{}'.*openai/clip-vit-large-patch14.*--reward-paths clip_l=PATH"),
])
def test_main_images_missing_checkpoint_is_one_line(assets, tiny_run, tmp_path, capsys, slot, needle):
    import re
    before = snapshot(tiny_run)
    missing = str(tmp_path / "nowhere")
    paths = dict(assets["paths"], **{slot: missing})
    with pytest.raises(SystemExit) as e:
        E.main(["--run", tiny_run] + cli_args(paths))
    assert e.value.code != 0
    err = error_line(capsys.readouterr().err)
    assert re.search(needle.format(re.escape(missing)), err), err
    assert snapshot(tiny_run) == before  # nothing written, deleted or overwritten


def test_main_images_other_errors_are_one_line(assets, tmp_path, capsys):
    for argv, needle in (
            (["--model", "tiny-sd3", "--rewards", "geneval"], "geneval"),
            (["--model", "tiny-sd3", "--prompts", str(tmp_path / "none.txt")], "none.txt"),
            (["--run", str(tmp_path)], "config.json not found")):
        with pytest.raises(SystemExit) as e:
            E.main(argv + ["--out", str(tmp_path / "out")] + cli_args(assets["paths"]))
        assert e.value.code != 0 and needle in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# --- prompt files -----------------------------------------------------------------------------


def test_read_prompt_records_builtin_truncation_and_sha(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"a cat\n\n  a dog on a log  \nthird\n")
    prompts, records, n, sha = E.read_prompt_records(str(txt))
    assert prompts == ["a cat", "a dog on a log", "third"] and n == 3 and records is None
    assert sha == hashlib.sha256(txt.read_bytes()).hexdigest()
    assert E.read_prompt_records(str(txt), max_prompts=2)[::2] == (["a cat", "a dog on a log"], 3)
    jl = tmp_path / "m.jsonl"
    jl.write_text('{"tag": "counting", "prompt": "two cats"}\n{"prompt": "a \\"quoted\\" sign"}\n')
    prompts, records, _, _ = E.read_prompt_records(str(jl))
    assert prompts == ["two cats", 'a "quoted" sign']
    assert records == [{"prompt": "two cats", "tag": "counting"}, {"prompt": 'a "quoted" sign'}]
    jl.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="line 2"):
        E.read_prompt_records(str(jl))
    prompts, _, n, _ = E.read_prompt_records("builtin")
    assert n == len(set(prompts)) == 16


def test_apply_protocol_official_and_full():
    """official = the shipped inference YAMLs: first 64 prompts, seed 42, batch 4, one image per
    prompt, 1024 px; full = every prompt. An explicit other value is recorded as an override."""
    off = E.apply_protocol(E.get_args(["--model", "tiny-sd3"]))
    assert (off.max_prompts, off.seed, off.batch_size, off.n_per_prompt, off.resolution) == (64, 42, 4, 1, 1024)
    assert off.overrides == {}
    full = E.apply_protocol(E.get_args(["--model", "tiny-sd3", "--protocol", "full", "--seed", "42"]))
    assert full.max_prompts == 0 and full.overrides == {}, "full keeps every prompt; seed 42 is no override"
    mine = E.apply_protocol(E.get_args(["--model", "tiny-sd3", "--max-prompts", "8", "--seed", "1"]))
    assert mine.overrides == {"max_prompts": 8, "seed": 1}


# --- the toy path is unchanged ----------------------------------------------------------------


def test_eval_toy_cli_writes_table_json_and_picture(tmp_path):
    d = tmp_path / "toy"
    models.ToyBackbone(cache_dir=str(d), pretrain_steps=50, angles=8)  # the toy's default features
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--stage", "1", "--out", str(d), "--steps", "3", "--batch-size", "32"])
    out, text = run_cli(["--run", str(d), "--n", "200"])
    assert out["seed"] == 0 and out["n"] == 200 and set(out["summary"]) == set(models.TOY_PROMPTS)
    assert "n = 200 samples" in text and "floor" in text, "the toy table must state n and the floor"
    assert (d / "eval_stage1.json").exists() and (d / "eval_stage1.png").exists()
