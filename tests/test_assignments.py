"""The course-assignment tool (tests/assignments.py) end to end: `make` blanks every exercise and
the copy still imports; `grade` gives the key full marks; every wrong answer in tests/wrong_answers
fails its own exercise and no other.

Grading one copy per wrong answer would cost a pytest start (torch import) each, so the wrong
answers go in rounds: round k swaps in wrong answer k of every exercise at once, and `grade` must
fail exactly those exercises. That is a per-answer check because an exercise's grading tests only
call its own functions, except through `uses` (tests/assignments.py): an exercise that uses
another is graded in a round where the one it uses is wrong, and must pass there.
"""
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOOL = os.path.join(HERE, "assignments.py")

spec = importlib.util.spec_from_file_location("assignments", TOOL)
assignments = importlib.util.module_from_spec(spec)
spec.loader.exec_module(assignments)


def wrong_answers():
    """{exercise: [file, ...]} sorted by number."""
    out = {}
    for path in sorted(glob.glob(os.path.join(HERE, "wrong_answers", "*.py"))):
        name, _ = assignments.read_wrong_answer(path)
        out.setdefault(name, []).append(path)
    return out


def test_wrong_answers_cover_every_exercise_twice():
    have = wrong_answers()
    for name in assignments.EXERCISES:
        assert len(have.get(name, [])) >= 2, f"exercise {name} needs at least two wrong answers in tests/wrong_answers"
    assert set(have) <= set(assignments.EXERCISES), f"wrong answers for unknown exercises: {set(have) - set(assignments.EXERCISES)}"
    table = assignments.grading_table()
    assert set(table) == set(assignments.EXERCISES), "GRADING in tests/test_exercises.py must list every exercise"


def test_make_blanks_every_exercise_and_the_copy_imports(tmp_path):
    out = str(tmp_path / "student")
    assignments.make(out)
    assert os.path.exists(os.path.join(out, "EXERCISES.md"))
    assert not os.path.exists(os.path.join(out, "tests", "wrong_answers")), "the copy must not hold the wrong answers"
    # every marked function raises NotImplementedError naming its exercise; the modules import
    probe = (
        "import inspect, acdmd, sample, subgrpo, rewards, models, eval\n"
        "mods = dict(acdmd=acdmd, sample=sample, subgrpo=subgrpo, rewards=rewards, eval=eval)\n"
        "for line in open('calls.txt'):\n"
        "    name, mod, func = line.split()\n"
        "    f = getattr(mods[mod], func)\n"
        "    args = [None] * len([p for p in inspect.signature(f).parameters.values() if p.default is p.empty])\n"
        "    try:\n"
        "        f(*args)\n"
        "    except NotImplementedError as e:\n"
        "        assert str(e).startswith(name + ':'), (func, str(e))\n"
        "    else:\n"
        "        raise SystemExit(func + ' did not raise')\n"
        "print('ok')\n")
    calls = [f"{name} {rel[:-3]} {func}" for rel, bl in assignments.all_blocks(ROOT).items()
             for name, func, *_ in bl]
    assert len(calls) >= len(assignments.EXERCISES)
    (tmp_path / "student" / "calls.txt").write_text("\n".join(calls) + "\n")
    res = subprocess.run([sys.executable, "-c", probe], cwd=out, capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0 and "ok" in res.stdout, f"the blanked copy misbehaves:\n{res.stderr[-2000:]}"


@pytest.mark.slow
def test_grade_full_marks_for_the_key_and_each_wrong_answer_fails_exactly_its_exercise(tmp_path):
    key = str(tmp_path / "key")
    assignments.make(key, solution=True)
    res = subprocess.run([sys.executable, TOOL, "grade", key], capture_output=True, text=True)
    assert res.returncode == 0, f"the key does not get full marks:\n{res.stdout}\n{res.stderr[-2000:]}"
    got, full = res.stdout.splitlines()[-1].split()[-1].split("/")
    assert float(got) == float(full), f"the key scores {got} of {full}:\n{res.stdout}"

    have = wrong_answers()
    users = {n for n, ex in assignments.EXERCISES.items() if ex["uses"]}
    rounds = []
    for k in range(max(len(v) for v in have.values())):
        # round k: wrong answer k of every exercise that uses no other (the users are graded,
        # and must pass, next to a wrong version of what they use); then the users on their own
        plain = {n: v[k] for n, v in have.items() if k < len(v) and n not in users}
        used = {n: v[k] for n, v in have.items() if k < len(v) and n in users}
        rounds += [r for r in (plain, used) if r]
    for i, wrong in enumerate(rounds):
        out = str(tmp_path / f"round{i}")
        assignments.make(out, solution=True, replace_files=list(wrong.values()))
        result = assignments.grade(out, quiet=True)
        failed = {e for e, (ok, n, _, _) in result.items() if ok < n}
        names = ", ".join(os.path.basename(f) for f in wrong.values())
        assert failed == set(wrong), \
            (f"with the wrong answers {names}, grade failed {sorted(failed)} instead of exactly "
             f"{sorted(wrong)}")
