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
GENERATED_MD = {"ablation.md", "EXERCISES.md"}
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
