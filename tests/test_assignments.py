"""The course-assignment tool (tests/assignments.py) end to end: `make` blanks every exercise and
the copy still imports, without the instructors' material; `grade` gives the key full marks, a
blank handout 0 on its own exercises only, and feedback; `check NAME` fails exactly when `grade`
loses points on NAME, for every wrong answer in tests/wrong_answers.

Grading one copy per wrong answer would cost a pytest start (torch import) each, so the wrong
answers go in rounds: round k swaps in wrong answer k of every exercise at once, and `grade` must
fail exactly those exercises. That is a per-answer check because an exercise's grading tests only
call its own functions, except through `uses` (tests/assignments.py): an exercise that uses
another is graded in a round where the one it uses is wrong, and must pass there.
"""
import ast
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

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


def test_uses_names_every_exercise_a_solution_calls():
    # `uses` decides what grading swaps in (assignments.rounds): it must cover every call of
    # another exercise's function in the reference bodies
    funcs = {func: name for bl in assignments.all_blocks(ROOT).values() for name, func, *_ in bl}
    for rel, bl in assignments.all_blocks(ROOT).items():
        lines = open(os.path.join(ROOT, rel), encoding="utf-8").read().splitlines(keepends=True)
        for name, func, b, e, _ in bl:
            body = ast.parse(textwrap.dedent("".join(lines[b + 1:e])))
            called = {n.id for n in ast.walk(body) if isinstance(n, ast.Name)}
            needs = {funcs[f] for f in called & set(funcs)} - {name}
            assert needs <= assignments.closure(name), \
                f"{func} (exercise {name}) calls exercises {sorted(needs)}; add them to its uses"


def test_handout_keeps_the_instructors_material_out(tmp_path):
    out = str(tmp_path / "h")
    assignments.make(out, exercises=["cps_step", "ambient_target"], derive=True)
    plain = {}
    for d, _, files in os.walk(out):
        for f in files:
            if not f.endswith(".zip"):
                plain[os.path.relpath(os.path.join(d, f), out)] = open(os.path.join(d, f), "rb").read()
    assert not [p for p, b in plain.items() if b"ambient_by_hand" in b], "a reference formula of the grading tests is in plain sight"
    assert not [p for p in plain if os.path.basename(p).startswith("test_")], "the project's tests state the answers"
    assert os.path.exists(os.path.join(out, assignments.GRADING_ZIP)), "the handout needs its grading tests (packed) for `check`"
    assert b"For instructors" not in plain["README.md"] and b"assignments.py check NAME" in plain["README.md"]
    ex = plain["EXERCISES.md"].decode()
    assert "assignments.py check NAME" in ex and "-k NAME" not in ex
    assert "The equation:" not in ex and assignments.worksheet_table()["ambient_target"][0][0] in ex, "--derive must withhold the equation"
    assert "Tensor[B]" in ex and "bcast" in ex and "May call the exercise(s) renoise" in ex
    ws = plain["WORKSHEET.md"].decode()
    assert "## cps_step" in ws and "## renoise" not in ws and "Answer:" not in ws, "the worksheet is the assigned exercises' questions only"
    assert "WORKSHEET_KEY.md" not in plain, "the answer key goes only to `make --solution`"
    key = str(tmp_path / "key")
    assignments.make(key, solution=True)
    text = open(os.path.join(key, "WORKSHEET_KEY.md"), encoding="utf-8").read()
    for name, qa in assignments.worksheet_table().items():
        assert f"## {name}" in text and all(f"Answer: {a}" in text for _, a in qa), f"the key lacks {name}'s answers"


def test_grade_refuses_a_python_without_torch(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    pythons = [str(fake), str(tmp_path / "missing")]
    system = shutil.which("python3")  # the system Python, where it lacks torch
    if system and subprocess.run([system, "-c", "import torch"], capture_output=True).returncode:
        pythons.append(system)
    for py in pythons:
        res = subprocess.run([sys.executable, TOOL, "grade", ROOT, "--python", py], capture_output=True, text=True)
        err = res.stderr.strip().splitlines()
        assert res.returncode != 0 and len(err) == 1 and "--python" in err[0], f"{py}: {res.stderr}"
        assert "Traceback" not in res.stderr and "0/150" not in res.stdout


def digest(folder):
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for f in sorted(files):
            h.update(f.encode() + open(os.path.join(d, f), "rb").read())
    return h.hexdigest()


@pytest.mark.slow
def test_grade_dot_grades_this_checkout(tmp_path):
    res = subprocess.run([sys.executable, TOOL, "grade", ".", "--exercises", "energy_distance",
                          "--feedback", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "10/10" in res.stdout.splitlines()[-1], res.stdout + res.stderr[-2000:]


@pytest.mark.slow
def test_batch_grade_blank_handout_scores_0_on_its_exercises_only(tmp_path):
    four = ["cps_step", "renoise", "ambient_target", "dmd_direction"]
    alice, bob = str(tmp_path / "returned" / "alice"), str(tmp_path / "returned" / "bob")
    assignments.make(alice, exercises=four)
    assignments.make(bob, solution=True)
    before = digest(alice)
    fb = str(tmp_path / "fb")
    res = subprocess.run([sys.executable, TOOL, "grade", alice, bob, "--feedback", fb], capture_output=True, text=True)
    assert res.returncode == 1, res.stdout + res.stderr[-2000:]
    assert digest(alice) == before, "grade changed the returned copy"
    rows = {ln.split()[0]: ln.split()[1:] for ln in res.stdout.splitlines() if ln.split()[:1] in (["alice"], ["bob"])}
    header = [ln for ln in res.stdout.splitlines() if ln.startswith("student")][0].split()[1:]
    cells = dict(zip(header, rows["alice"]))
    assert cells["total"] == "0/50" and all(cells[e] == "0/" + str(assignments.EXERCISES[e]["points"]) for e in four)
    assert all(cells[e] == "-" for e in assignments.EXERCISES if e not in four), f"the blank handout lists other exercises: {cells}"
    assert rows["bob"][-1] == "150/150", f"the key does not get full marks: {res.stdout}"
    text = open(os.path.join(fb, "alice.feedback.txt"), encoding="utf-8").read()
    assert [ln for ln in text.splitlines() if ln.startswith("## ")] == [f"## {e}: 0/{len(assignments.grading_table()[e])} tests, 0/{assignments.EXERCISES[e]['points']} points" for e in four]
    assert "`test_shared_projection_noise_cancels_in_the_difference`: NotImplementedError: dmd_direction: write the body of shared_projection" in text


def check_verdicts(copy):
    """{exercise: passed?} from `check` run inside the copy on every exercise."""
    res = subprocess.run([sys.executable, os.path.join("tests", "assignments.py"), "check", *assignments.EXERCISES],
                         cwd=copy, capture_output=True, text=True)
    out = {}
    for ln in res.stdout.splitlines():
        if ": " in ln and ln.endswith("grading tests pass"):
            name, frac = ln.split(": ")[0], ln.split(": ")[1].split()[0]
            out[name] = frac.split("/")[0] == frac.split("/")[1]
    assert set(out) == set(assignments.EXERCISES), res.stdout + res.stderr[-2000:]
    assert res.returncode == (0 if all(out.values()) else 1)
    return out


@pytest.mark.slow
def test_check_fails_exactly_when_grade_loses_points(tmp_path):
    have = wrong_answers()
    users = {n for n, ex in assignments.EXERCISES.items() if ex["uses"]}
    rounds = [{}]  # the key first: full marks, every check passes
    for k in range(max(len(v) for v in have.values())):
        # round k: wrong answer k of every exercise that uses no other (the users are graded,
        # and must pass, next to a wrong version of what they use); then the users on their own
        plain = {n: v[k] for n, v in have.items() if k < len(v) and n not in users}
        used = {n: v[k] for n, v in have.items() if k < len(v) and n in users}
        rounds += [r for r in (plain, used) if r]
    for i, wrong in enumerate(rounds):
        out = str(tmp_path / f"round{i}")
        assignments.make(out, solution=True, replace_files=list(wrong.values()))
        result, tests = assignments.grade(out)
        lost = {e for e, (ok, n, _, _) in result.items() if ok < n}
        names = ", ".join(os.path.basename(f) for f in wrong.values()) or "none (the key)"
        assert lost == set(wrong), \
            f"with the wrong answers {names}, grade failed {sorted(lost)} instead of exactly {sorted(wrong)}"
        checked = check_verdicts(out)
        assert {e for e, ok in checked.items() if not ok} == lost, \
            f"with the wrong answers {names}, check fails {sorted(e for e, ok in checked.items() if not ok)}, grade {sorted(lost)}"


@pytest.mark.slow
def test_an_unfinished_exercise_costs_no_points_in_those_that_use_it(tmp_path):
    out = str(tmp_path / "carol")
    assignments.make(out, exercises=["cps_step"])  # cps_step blank, everything else solved
    result, tests = assignments.grade(out, ["cps_step", "dmd_direction", "cps_log_prob"])
    assert result["cps_step"][2] == 0, result
    for e in ("dmd_direction", "cps_log_prob"):
        assert result[e][0] == result[e][1], f"a blank cps_step costs points in {e}: {tests}"


@pytest.mark.slow
def test_pictures_draw_once_the_exercise_is_done(tmp_path):
    key, blank = str(tmp_path / "key"), str(tmp_path / "blank")
    assignments.make(key, solution=True)
    assignments.make(blank, exercises=["renoise"])
    for name in assignments.PICTURES:
        png = str(tmp_path / f"{name}.png")
        res = subprocess.run([sys.executable, os.path.join("tests", "assignments.py"), "picture", name, "--png", png],
                             cwd=key, capture_output=True, text=True)
        assert res.returncode == 0 and os.path.getsize(png) > 1000, res.stderr[-2000:]
    res = subprocess.run([sys.executable, os.path.join("tests", "assignments.py"), "picture", "renoise", "--png",
                          str(tmp_path / "x.png")], cwd=blank, capture_output=True, text=True)
    assert res.returncode != 0 and res.stderr.strip().splitlines() == \
        ["pictures: renoise: write the body of renoise (EXERCISES.md); the picture needs that exercise done"], res.stderr
