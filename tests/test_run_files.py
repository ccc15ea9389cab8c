"""What a run reads from disk: prompt files (models.read_prompt_file) and run-folder
checkpoints (models.load_checkpoint, which never executes code from a pickle)."""
import json
import os

import pytest
import torch

import eval as E
import models


# --- prompt files -----------------------------------------------------------------------------


def test_read_prompt_file_txt_and_jsonl_metadata(tmp_path):
    """.txt: a prompt a line, metadata {} each; .jsonl: "prompt" plus the other fields as that
    prompt's metadata, aligned with the prompts; blank lines skipped in both."""
    txt = tmp_path / "train.txt"
    txt.write_text("a cat\n\n  two dogs  \n")
    assert models.read_prompt_file(str(txt)) == (["a cat", "two dogs"], [{}, {}])
    jl = tmp_path / "train_metadata.jsonl"
    rows = [{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"},
            {"prompt": "a photo of a red bench", "tag": "colors", "include": [{"class": "bench", "color": "red"}]}]
    jl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    prompts, metadata = models.read_prompt_file(str(jl))
    assert prompts == ["a photo of two cats", "a photo of a red bench"]
    assert metadata == [{k: v for k, v in r.items() if k != "prompt"} for r in rows]


@pytest.mark.parametrize("name,content,needle", [
    ("missing.txt", None, "not found"),
    ("empty.txt", "\n  \n", "holds no prompts"),
    ("no_prompt.jsonl", '{"prompt": "ok"}\n{"text": "a cat"}\n', "line 2 has no \"prompt\" field"),
    ("broken.jsonl", '{"prompt": "ok"}\n{"prompt": \n', "line 2 is not valid JSON"),
    ("list.json", '["a cat"]', "use .txt"),
])
def test_read_prompt_file_errors_one_line(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises((FileNotFoundError, ValueError)) as e:
        models.read_prompt_file(str(path))
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg, msg


# --- checkpoints ------------------------------------------------------------------------------


class Payload:
    """Unpickling this object runs code: it writes a marker file (a stand-in for anything)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_load_checkpoint_refuses_malicious_pickle(tmp_path, capsys):
    """A stage1.pt carrying a code-running pickle is refused with one line, by load_checkpoint,
    load_run and eval.py, and its code never runs."""
    marker = str(tmp_path / "code_ran")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "toy"}))
    torch.save({"generator": {"w": torch.zeros(2)}, "ema": Payload(marker)}, run / "stage1.pt")
    for load in (lambda: models.load_checkpoint(str(run / "stage1.pt")), lambda: models.load_run(str(run))):
        with pytest.raises(ValueError, match="refusing to load .*stage1.pt.*could run code"):
            load()
    with pytest.raises(SystemExit):
        E.main(["--run", str(run)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "refusing to load" in err[0], err
    assert not os.path.exists(marker), "the pickle's code ran"


def test_load_checkpoint_reads_plain_state(tmp_path):
    """What train.py stores (tensors, RNG states as uint8 tensors, plain configs) loads as is."""
    state = {"generator": {"w": torch.arange(3.0)}, "rng": [{"torch": torch.get_rng_state()}],
             "shared_rng": torch.Generator().manual_seed(1).get_state(),
             "config": {"model": "toy", "lr": 1e-3, "prompts": None, "steps": [0, 2]}, "epoch": 4}
    torch.save(state, tmp_path / "ck.pt")
    got = models.load_checkpoint(str(tmp_path / "ck.pt"))
    assert torch.equal(got["generator"]["w"], state["generator"]["w"]) and got["config"] == state["config"]
    assert torch.equal(got["rng"][0]["torch"], state["rng"][0]["torch"]) and got["epoch"] == 4
