"""The repository stands on its own: every citation resolves inside it, and README's concept table
names functions and tests that exist."""
import importlib
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A reference to a Markdown file: a name ending in ".md", with an optional relative folder.
MD_REF = re.compile(r"[\w.-]*[\w-]\.md\b(?![\w-])|(?:[\w.-]+/)+[\w.-]*[\w-]\.md\b(?![\w-])")
# An absolute path: a "/" that starts a token (line start, space, quote, bracket, "=" or ",")
# followed by a name and at least one more "/name", or a bare "/name" for a system root. Math such
# as 1/(B D), x_s/(1-s), "a / b" and URLs (https://...) never start a token with "/" + a name.
_START = r"(?:(?<=^)|(?<=[\s'\"`(\[=,]))"
ABS_PATH = re.compile(_START + r"/(?:[A-Za-z_~][\w.+-]*(?:/[\w.*+-]+)+/?|(?:home|root|work|shared|"
                      r"mnt|data|scratch|Users|usr|opt|var|etc|srv)\b)", re.M)
# Files the code writes at run time (not documents a reader should find in the repository):
# eval.py's ablation table, and the task file of a student copy (tests/assignments.py make).
GENERATED_MD = {"ablation.md", "EXERCISES.md", "WORKSHEET.md", "WORKSHEET_KEY.md"}
# The temporary directory is the same on every machine: "/tmp/..." in a help string or a test is
# portable, not a location on the authors' disk.
PORTABLE = ("/tmp",)


def repo_files(exts=(".py", ".md")):
    """Files git tracks plus untracked ones it does not ignore, relative to the repository."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    return sorted(f for f in out if f.endswith(exts) and os.path.isfile(os.path.join(ROOT, f)))


def problems(text, existing_md):
    """[(kind, string)] for every reference to a .md file not in `existing_md` (repository paths
    and their base names) and every absolute path outside PORTABLE."""
    found = []
    for m in MD_REF.finditer(text):
        name = m.group(0)
        if name not in existing_md and os.path.basename(name) not in existing_md | GENERATED_MD:
            found.append(("missing .md", name))
    for m in ABS_PATH.finditer(text):
        if not m.group(0).startswith(PORTABLE):
            found.append(("absolute path", m.group(0)))
    return found


def existing_markdown():
    md = [f for f in repo_files((".md",))]
    return set(md) | {os.path.basename(f) for f in md}


def test_problems_flags_planted_bad_strings():
    existing = {"README.md"}
    # written with placeholders, so that this file itself passes the scan below
    bad = ["see ALGORITHM<MD> section 2", "(FACTS<MD> 2)", "notes/design<MD>", "a copy in <R>work/shared/x",
           'path = "<R>home/alice/ckpt"', "--out <R>shared/runs/sd3m", "cd <R>work"]
    for text in (t.replace("<MD>", ".md").replace("<R>", "/") for t in bad):
        assert problems(text, existing), f"the checker misses the bad reference in {text!r}"
    good = ["see README.md", "dL/dx_s = g / (B D)", "T = -x_s/(1-s) + k n", "1/(2 rho^2)",
            "github.com/Harahan/RTDMD", "https://github.com/x/y", "rtdmd/trainers/bp_mixin.py",
            "configs/rtdmd/*.yaml", "write ablation.md/json", "tau / 1000.0", "runs/toy",
            "help='scratch dir, e.g. /tmp/rtdmd'", "x[..., top:top + size] / std"]
    for text in good:
        assert not problems(text, existing), f"the checker flags the harmless {text!r}: {problems(text, existing)}"


def test_no_reference_to_missing_files():
    existing = existing_markdown()
    bad = []
    for f in repo_files():
        with open(os.path.join(ROOT, f), encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                bad += [f"{f}:{i}: {kind} {s!r}" for kind, s in problems(line, existing)]
    assert not bad, "references a reader cannot follow (cite the paper, the official code or a " \
        "module section instead):\n" + "\n".join(bad)


def test_generated_markdown_is_written_by_the_code():
    # every exception in GENERATED_MD must really be an output of the code, not a document
    code = "".join(open(os.path.join(ROOT, f), encoding="utf-8").read() for f in repo_files((".py",))
                   if not f.startswith("tests/") or f == "tests/assignments.py")  # a tool, not a test
    for name in GENERATED_MD:
        assert re.search(r"os\.path\.join\([^)]*[\"']%s[\"']\)" % re.escape(name), code), \
            f"{name} is excused as a generated file, but no code writes it"


# ---------------------------------------------------------------------------------------------
# The README's concept table
# ---------------------------------------------------------------------------------------------


def concept_rows():
    """[(concept, [file:function], [test node id])] of the README table under "## Reading guide"."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Reading guide", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("concept", "") or set(cells[0]) <= set("-"):
            continue
        code = re.findall(r"`([\w/]+\.py:[\w.]+)`", cells[2])
        tests = re.findall(r"`(tests/[\w/]+\.py::\w+)`", cells[3])
        rows.append((cells[0], code, tests))
    return rows


def test_concept_table_lists_every_concept_of_the_method():
    concepts = " ".join(r[0] for r in concept_rows())
    for word in ("KL split", "CPS step", "sub-interval kernel", "shared projection noise", "ambient target",
                 "consistency", "random stop", "stage-1 loop", "CPS log-probability", "advantages",
                 "shared noise", "clipped surrogate", "final-step back-prop", "stage-2 loop", "EMA",
                 "reward:", "metric:"):
        assert word in concepts, f"the README's concept table has no row for {word!r}"


@pytest.mark.parametrize("row", concept_rows(), ids=lambda r: r[0])
def test_concept_table_functions_and_tests_exist(row):
    concept, code, tests = row
    assert code and tests, f"row {concept!r} names no function or no test"
    for ref in code:
        path, name = ref.split(":")
        module = importlib.import_module(path[:-3].replace("/", "."))
        obj = module
        for part in name.split("."):
            assert hasattr(obj, part), f"row {concept!r}: {path} has no {name}"
            obj = getattr(obj, part)
    for node in tests:
        path, name = node.split("::")
        full = os.path.join(ROOT, path)
        assert os.path.isfile(full), f"row {concept!r}: {path} does not exist"
        with open(full, encoding="utf-8") as f:
            assert re.search(r"^def %s\(" % name, f.read(), re.M), f"row {concept!r}: no test {node}"


def test_every_concept_function_selects_a_test_with_k():
    """`python -m pytest -k NAME` (a case-insensitive substring of the test id) selects at least
    one test for each function of the concept table."""
    ids = []
    for f in repo_files((".py",)):
        if f.startswith("tests/test_"):
            with open(os.path.join(ROOT, f), encoding="utf-8") as fh:
                ids += [f"{f}::{m}".lower() for m in re.findall(r"^def (test_\w+)\(", fh.read(), re.M)]
    for concept, code, _ in concept_rows():
        for ref in code:
            name = ref.split(":")[1].split(".")[-1]
            assert any(name.lower() in i for i in ids), f"row {concept!r}: -k {name} selects no test"


# ---------------------------------------------------------------------------------------------
# The README's deviations table: every flag it names exists, with the stated default
# ---------------------------------------------------------------------------------------------

# `[script.py ]--flag[ VALUE]` in backticks; no script means train.py
FLAG = re.compile(r"`(?:(train|eval|sample)\.py )?(--[\w-]+)(?: ([^`\s]+))?`")


def script_defaults(script):
    """(option names, raw argparse defaults, [resolved defaults]) of one script. Resolved: what a
    None default becomes on the paper recipe (SD3.5-M on CUDA; train.py: stage 1 and stage 2)."""
    import eval as E
    import sample
    import train
    if script == "train":
        parse = lambda st: train.get_args(["--stage", st, "--model", "sd3.5-medium"])  # noqa: E731
        raw = vars(train.get_args(["--stage", "1"]))  # as parsed: only --stage given
        resolved = [vars(train.resolve_defaults(parse(st), True)) for st in ("1", "2")]
    elif script == "eval":
        raw = {k: v for k, v in vars(E.get_args(["--model", "sd3.5-medium"])).items() if k != "model"}
        resolved = [vars(E.apply_protocol(E.get_args(["--model", "sd3.5-medium"])))]
    else:
        raw, resolved = vars(sample.get_parser().parse_args([])), []
    with open(os.path.join(ROOT, f"{script}.py"), encoding="utf-8") as f:
        names = set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)[\"']", f.read()))
    return names, raw, resolved


def flag_problems(text):
    """Problems with the flags of the deviations table in README text `text`: unknown flags and
    stated defaults that differ from the code's."""
    section = text.split("## Deviations and choices", 1)[1].split("\n## ", 1)[0]
    cells = [re.split(r"(?<!\\)\|", line.strip().strip("|"))[-1] for line in section.splitlines()
             if line.startswith("|") and not set(line) <= set("|- ")]
    found, cache = [], {}
    for cell in cells[1:]:  # the first row is the header
        for script, flag, value in FLAG.findall(cell):
            script = script or "train"
            names, raw, resolved = cache.setdefault(script, script_defaults(script))
            if flag not in names:
                found.append(f"{script}.py has no {flag}")
                continue
            if not value:
                continue
            dest = flag[2:].replace("-", "_")
            options = [raw.get(dest)] if raw.get(dest) is not None else [r.get(dest) for r in resolved]
            if not any(str(o) == value or (isinstance(o, float) and o == float(value)) for o in options):
                found.append(f"{script}.py {flag}: the README says {value}, the code {options}")
    return found


def test_deviations_table_flags_exist_with_their_defaults():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert FLAG.search(text.split("## Deviations and choices", 1)[1]), "the deviations table names no flag"
    assert not flag_problems(text), "\n".join(flag_problems(text))


def test_flag_problems_catches_a_planted_wrong_default():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for good, bad in (("`--logprob official`", "`--logprob exact`"), ("`--lora-dtype bf16`", "`--lora-dtype fp32`"),
                      ("`eval.py --max-prompts 64`", "`eval.py --max-prompts 0`"), ("`--lora-rank 32`", "`--lora-rnak 32`")):
        assert good in text, good
        assert flag_problems(text.replace(good, bad)), f"a planted {bad} passes the check"
