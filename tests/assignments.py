"""Course assignments cut from the real code, graded by the real tests.

Every exercise is one or more function bodies in the project's modules, each wrapped in a pair of
comments

    # --- exercise NAME: begin ---
    ...the solution...
    # --- exercise NAME: end ---

`make` copies the repository (the files git tracks, no history) and replaces each marked body by
`raise NotImplementedError("NAME: ...")`, so the copy still imports and runs up to the first
missing piece. It writes EXERCISES.md (per exercise: what to implement, arguments and helpers,
the equation, which module-docstring section to read first, difficulty, estimated time) and
WORKSHEET.md (derivation questions, tests/worksheet.py) next to it, cuts the instructors' section
from the README and packs the grading tests into tests/grading.zip. `check` runs exactly one
exercise's grading tests (tests/test_exercises.py, its GRADING table) on the code it sits in;
`grade` runs them on temporary copies of returned folders, with the reference body of every
other exercise, and prints a score table and writes feedback files.

    python tests/assignments.py list
    python tests/assignments.py make OUT [--exercises NAME ...] [--derive]  # a student copy
    python tests/assignments.py make OUT --solution [--replace FILE]  # the key, or the key with
                                                                      # one wrong answer swapped in
    python tests/assignments.py check NAME [NAME ...]                 # in the student's copy
    python tests/assignments.py picture cps_step|renoise|tilt_linear  # ... next to the exact law
    python tests/assignments.py grade OUT [OUT ...] [--exercises NAME ...] [--feedback DIR]
                                                                      # exit code 1 if any fails

A wrong answer (tests/wrong_answers/NAME_N.py) redefines one or more of exercise NAME's functions
with a plausible mistake; `make --solution --replace FILE` swaps its bodies into the key.
tests/test_assignments.py grades the key (full marks) and every wrong answer (exactly its exercise
fails, in `grade` and in `check`).

Standard library only, so that it runs before anything is installed; the tests run with
`--python` (default: this interpreter), which must have torch and pytest.
"""
import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRADING_FILE = os.path.join("tests", "test_exercises.py")
GRADING_ZIP = os.path.join("tests", "grading.zip")  # the grading tests in a student copy
# what a student copy leaves out: the wrong answers are near-solutions, and the test of this tool
# needs them
HIDDEN = ("tests/wrong_answers/", "tests/test_assignments.py", "tests/worksheet.py")  # as git lists
PICTURES = ("cps_step", "renoise", "tilt_linear")  # tests/pictures.py draws these
MARK = re.compile(r"^(\s*)# --- exercise (\w+): (begin|end) ---\s*$")

# The exercises in the suggested order (README, "For instructors"). `uses`: the other exercises
# whose functions a solution may call; grading swaps in their reference (`rounds`), and
# tests/test_assignments.py checks that it covers every call in the reference bodies.
EXERCISES = {
    "cps_step": dict(
        difficulty="easy", minutes=30, points=10, uses=[],
        args='x, v: Tensor[B, ...] of one shape; sigma, sigma_next: float or Tensor[B] (reshape a '
             'Tensor[B] with `models.bcast(sigma, x)`, imported here as `bcast`); eta: float in [0, '
             '1]; noise: None or a tensor like x. Helpers: `x0_from_velocity`, `eps_from_velocity`, '
             '`bcast`.',
        read="models.py, section 1 (flow-matching conventions), then sample.py, section 1",
        what="`sample.cps_mean_std` (mean and std of one coefficient-preserving sampling step) "
             "and `sample.cps_step` (one draw from it).",
        equation="x0_hat = x - sigma v,  eps_hat = x + (1 - sigma) v,  theta = eta pi / 2;\n"
                 "mu = (1 - sigma') x0_hat + sigma' cos(theta) eps_hat,  rho = sigma' sin(theta);\n"
                 "x' = mu + rho z,  z ~ N(0, I) (use `noise` when it is given)."),
    "renoise": dict(
        difficulty="easy", minutes=20, points=10, uses=[],
        args='s, t: float or Tensor[B], t >= s (Tensor arithmetic throughout: `subinterval_coeffs` '
             'gets tensors; `renoise` gets x_s, n: Tensor[B, ...] and must reshape s, t with '
             '`bcast(s, x_s)`). Helpers: `bcast`, `torch.clamp`.',
        read="acdmd.py, section 2",
        what="`acdmd.subinterval_coeffs` and `acdmd.renoise`: the exact forward kernel that "
             "pushes a sample at level s to a level t > s.",
        equation="a_ts = (1 - t) / (1 - s),  sigma_ts = sqrt(max(t^2 - a_ts^2 s^2, 1e-12));\n"
                 "x_t = a_ts x_s + sigma_ts n."),
    "ambient_target": dict(
        difficulty="medium", minutes=40, points=15, uses=["renoise"],
        args='x_s, n: Tensor[B, ...]; s, t: float or Tensor[B] (use `bcast(s, x_s)`, `bcast(t, '
             'x_s)`). Helpers: `bcast`, and `subinterval_coeffs` of the renoise exercise.',
        read="acdmd.py, section 4",
        what="`acdmd.ambient_target`: the regression target of the fake score when it only ever "
             "sees x_s, never clean data.",
        equation="T = -x_s / (1 - s) + [t + (1 - t) s^2 / (1 - s)^2] / sigma_ts * n;\n"
                 "E[T | x_t] is the exact flow velocity of the law of x_t."),
    "dmd_direction": dict(
        difficulty="medium", minutes=45, points=15, uses=["cps_step"],
        args='x_t, v_real, v_fake: Tensor[B, ...]; t, s: float or Tensor[B]; eta: float. '
             'dmd_direction: x_s, x_s_real, x_s_fake: Tensor[B, ...], returns float64. Helpers: '
             '`cps_step` of the cps_step exercise, '
             '`torch.randn_like`, `torch.nan_to_num`.',
        read="acdmd.py, section 3",
        what="`acdmd.shared_projection` (project the teacher's and the fake's velocity from t back "
             "to s with one CPS step each, sharing the noise) and `acdmd.dmd_direction` (the "
             "normalised DMD direction).",
        equation="x_s^real = CPS(x_t, v_real; t -> s, z),  x_s^fake = CPS(x_t, v_fake; t -> s, z) "
                 "(the same z);\n"
                 "g = (x_s^fake - x_s^real) / mean_{non-batch} |x_s - x_s^real|, per sample "
                 "(no division when normalize=False), then nan_to_num."),
    "consistency_two_sample": dict(
        difficulty="easy", minutes=20, points=10, uses=[],
        args='h0, h1, h2: tensors of one shape; returns a scalar tensor. Helpers: '
             '`torch.nan_to_num`.',
        read="acdmd.py, section 5",
        what="`acdmd.consistency_two_sample`: an unbiased estimate of the squared martingale "
             "defect from two independent transitions.",
        equation="estimate = mean[(h_1 - h_0)(h_2 - h_0)],  E[estimate] = ||E[h(x') | x_t] - h_0||^2 "
                 "(it may be negative)."),
    "energy_distance": dict(
        difficulty="easy", minutes=20, points=10, uses=[],
        args='x: Tensor[N, d], y: Tensor[M, d]; returns a float or a scalar tensor. Helpers: '
             '`torch.cdist`.',
        read="eval.py, section 1",
        what="`eval.energy_distance`: the toy's distance between two point sets.",
        equation="ED = 2 E|X - Y| - E|X - X'| - E|Y - Y'|, Euclidean norms, V-statistics "
                 "(every pair, a point with itself included)."),
    "cps_log_prob": dict(
        difficulty="medium", minutes=40, points=15, uses=["cps_step"],
        args='x_next, x, v: Tensor[B, ...]; sigma, sigma_next: float or Tensor[B]; eta: float; form:'
             ' "official" or "exact"; returns float32 Tensor[B]. Helpers: `cps_mean_std` of the '
             'cps_step exercise (its rho is a float or a tensor that broadcasts against x: '
             '`torch.as_tensor(rho)` covers both).',
        read="subgrpo.py, section 4",
        what="`subgrpo.cps_log_prob`: the log-probability of a stored CPS transition, in the "
             "official and the exact form.",
        equation="official: l = -mean_{non-batch} (x' - mu)^2;\n"
                 "exact: log pi = -|x' - mu|^2 / (2 rho^2) - D log rho - (D/2) log(2 pi);\n"
                 "0 on deterministic steps (rho = 0); gradient through v only."),
    "group_advantages": dict(
        difficulty="medium", minutes=40, points=15, uses=[],
        args='rewards: {name: Tensor[N]}; prompts: list[str] of length N; weights: {name: float}, a '
             'subset of the keys of rewards; returns float32 Tensor[N]. Plain torch.',
        read="subgrpo.py, section 5",
        what="`subgrpo.group_advantages`: GRPO advantages, per-prompt mean, global std, "
             "weighted over several rewards.",
        equation="A_R(i) = (r_R(i) - mean_{prompt of i} r_R) / (std_all r_R + eps) per reward R,  "
                 "A = sum_R w_R A_R,  A <- (A - mean A) / (std A + eps);\n"
                 "population std; normalize=False: A = sum_R w_R (r_R - per-prompt mean)."),
    "select_steps": dict(
        difficulty="medium", minutes=40, points=15, uses=[],
        args='select_steps: ints, returns list[int]; shared_noise: prompts list[str] of length B, '
             'step and epoch ints, shape a tuple; returns float32 [B, *shape]. Helpers: '
             '`random.Random`, `prompt_seed`, `torch.Generator`.',
        read="subgrpo.py, section 3",
        what="`subgrpo.select_steps` (which stochastic steps an epoch trains, the same on every "
             "rank) and `subgrpo.shared_noise` (one noise tensor per prompt for the steps that "
             "are not trained).",
        equation="S = num_train distinct steps of {0 .. num_stochastic - 1}, sorted, uniformly at "
                 "random, a function of (epoch, seed) only;\n"
                 "z[i] = z[j] whenever prompts[i] = prompts[j]; z ~ N(0, I); a function of "
                 "(prompt, step, epoch) only."),
    "ppo_loss": dict(
        difficulty="medium", minutes=30, points=10, uses=[],
        args='log_prob_new (with grad), log_prob_old, advantages: Tensor[B]; clip_range: float; '
             'returns (scalar tensor, dict of floats). Plain torch.',
        read="subgrpo.py, sections 2 and 5",
        what="`subgrpo.ppo_loss`: the clipped surrogate of one trained step, with its statistics.",
        equation="r = exp(l_new - l_old),  L = mean_b max(-A r, -A clip(r, 1 - eps, 1 + eps));\n"
                 "stats: ratio_mean, ratio_min, ratio_max, clip_frac (|r - 1| > eps), "
                 "approx_kl = mean (l_new - l_old)^2 / 2."),
    "final_step_x0": dict(
        difficulty="medium", minutes=30, points=10, uses=[],
        args='bb: a backbone with `bb.velocity(net, x, sigma_per_sample, cond)`; x3: Tensor[B, ...];'
             ' sigma3: float; bp_loss gets R: Tensor[B]. Helpers: `full(sigma3, x3)` (a Tensor[B] of'
             ' sigma3), `x0_from_velocity`.',
        read="subgrpo.py, section 2",
        what="`subgrpo.final_step_x0` (the deterministic last step, with grad through the network "
             "only) and `subgrpo.bp_loss` (the reward back-prop hinge).",
        equation="x0_hat = x_3 - sigma_3 G(x_3, sigma_3, c) with x_3 held constant;\n"
                 "L_BP = mean_b relu(margin - R_w); stats reward_mean, hinge_active (R_w < margin)."),
    "tilt_linear": dict(
        difficulty="hard", minutes=60, points=15, uses=[],
        args='mixture: a `models.Mixture` with means [J, d], stds [J], weights [C, J] (float64); a: '
             'a sequence or Tensor[d]; beta: float; returns a new `models.Mixture`. Helpers: '
             '`tilted_weights`, `models.Mixture`.',
        read="rewards.py, section 1",
        what="`rewards.tilt_linear`: the exact reward-tilted teacher p(x|c) exp(beta a^T x) / Z "
             "of an isotropic Gaussian mixture, as a new mixture (use `tilted_weights`).",
        equation="mu~_j = mu_j + beta s_j^2 a,  s~_j = s_j,  "
                 "log f_j = beta a^T mu_j + beta^2 s_j^2 |a|^2 / 2,\n"
                 "pi~_cj = pi_cj f_j / sum_j' pi_cj' f_j'."),
}


# ---------------------------------------------------------------------------------------------
# Finding the marked bodies
# ---------------------------------------------------------------------------------------------


def tracked_files(root):
    """The files git tracks or would track under root (relative paths): no history, no runs. A
    student copy is no git checkout: there, every file outside hidden folders and __pycache__."""
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, text=True)
    if out.returncode != 0:
        if not os.path.exists(os.path.join(root, "acdmd.py")):
            sys.exit(f"assignments: {root} is neither a git checkout nor a copy made by `make`")
        found = []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__pycache__"]
            found += [os.path.relpath(os.path.join(d, f), root) for f in files]
        return sorted(found)
    return [p for p in out.stdout.split("\0") if p and os.path.isfile(os.path.join(root, p))]


def find_blocks(path):
    """[(name, function, begin line index, end line index, indent)] of every marked body in a file.
    `function` is the innermost `def` that encloses the marker."""
    lines = open(path, encoding="utf-8").read().splitlines(keepends=True)
    blocks, open_at = [], None
    for i, line in enumerate(lines):
        m = MARK.match(line)
        if not m:
            continue
        indent, name, which = m.groups()
        if which == "begin":
            if open_at is not None:
                sys.exit(f"assignments: {path}:{i + 1}: a begin marker inside another exercise")
            open_at = (name, i, indent)
        else:
            if open_at is None or open_at[0] != name:
                sys.exit(f"assignments: {path}:{i + 1}: end marker of {name} without its begin")
            func = None
            for j in range(open_at[1], -1, -1):
                d = re.match(r"^\s*def (\w+)\(", lines[j])
                if d and len(lines[j]) - len(lines[j].lstrip()) < len(indent):
                    func = d.group(1)
                    break
            blocks.append((name, func, open_at[1], i, open_at[2]))
            open_at = None
    if open_at is not None:
        sys.exit(f"assignments: {path}: exercise {open_at[0]} has no end marker")
    return blocks


def all_blocks(root):
    """{relative path: blocks} for every tracked Python file outside tests/ that has markers."""
    out = {}
    for rel in tracked_files(root):
        if rel.endswith(".py") and not rel.startswith("tests/"):  # tests hold no exercise
            b = find_blocks(os.path.join(root, rel))
            if b:
                out[rel] = b
    return out


def read_wrong_answer(path):
    """A wrong-answer file is valid Python: one `def` per replaced function, same name and
    signature, a docstring saying what is wrong. Returns its exercise (the file name up to the
    last underscore) and {function: body lines at indentation 0, docstring left out}."""
    src = open(path, encoding="utf-8").read()
    lines = src.splitlines(keepends=True)
    bodies = {}
    for node in ast.parse(src).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        stmts = node.body
        if isinstance(stmts[0], ast.Expr) and isinstance(getattr(stmts[0], "value", None), ast.Constant):
            stmts = stmts[1:]  # the docstring
        if not stmts:
            sys.exit(f"assignments: {path}: {node.name} has no body besides its docstring")
        bodies[node.name] = textwrap.dedent("".join(lines[stmts[0].lineno - 1:node.end_lineno]))
        bodies[node.name] = bodies[node.name].splitlines(keepends=True)
    if not bodies:
        sys.exit(f"assignments: {path} defines no function")
    return os.path.basename(path)[:-3].rsplit("_", 1)[0], bodies


# ---------------------------------------------------------------------------------------------
# make
# ---------------------------------------------------------------------------------------------


def stub(name, func, indent):
    return f'{indent}raise NotImplementedError("{name}: write the body of {func} (EXERCISES.md)")\n'


def rewrite(path, blocks, blank, replace):
    """Rewrite one file: bodies of exercises in `blank` become a raise; bodies of functions in
    `replace` ({function: lines}) become those lines. Markers stay, so a copy can be re-graded."""
    lines = open(path, encoding="utf-8").read().splitlines(keepends=True)
    for name, func, b, e, indent in sorted(blocks, key=lambda x: -x[2]):  # bottom-up keeps indices
        if func in replace:
            new = [indent + ln if ln.strip() else ln for ln in replace[func]]
        elif name in blank:
            new = [stub(name, func, indent)]
        else:
            continue
        lines[b + 1:e] = new
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def worksheet_table():
    """WORKSHEET from tests/worksheet.py (the key; absent from a student copy)."""
    path = os.path.join(ROOT, "tests", "worksheet.py")
    if not os.path.exists(path):
        sys.exit("assignments: tests/worksheet.py is missing; make copies from the instructor's "
                 "checkout")
    scope = {}
    exec(compile(open(path, encoding="utf-8").read(), path, "exec"), scope)
    return scope["WORKSHEET"]


def task_statement(blocks, chosen, derive=False):
    where = {}
    for rel, bl in blocks.items():
        for name, func, *_ in bl:
            where.setdefault(name, []).append(f"{rel}: {func}")
    out = ["# Exercises", "",
           "Each exercise is the body of one or more functions of this repository, replaced by",
           "`raise NotImplementedError`. Write the body between its two `# --- exercise` comments,",
           "keep the signature and the docstring, and check your work with",
           "", "    python tests/assignments.py check NAME", "",
           "which runs exactly the tests that grade NAME and prints each failure's message. The",
           "tests compare distributions and closed forms, never random seeds: draw noise the way",
           "you like. Suggested order: the table's. WORKSHEET.md asks the derivations behind them.",
           "", "| exercise | difficulty | estimated time | points |", "|---|---|---|---|"]
    for name in chosen:
        ex = EXERCISES[name]
        out.append(f"| {name} | {ex['difficulty']} | {ex['minutes']} min | {ex['points']} |")
    for name in chosen:
        ex = EXERCISES[name]
        out += ["", f"## {name} ({ex['difficulty']}, about {ex['minutes']} min, "
                    f"{ex['points']} points)", "",
                f"Implement {ex['what']}", "",
                "Where: " + "; ".join(where.get(name, [])) + ".", "",
                "Arguments and helpers: " + ex["args"], ""]
        if derive:  # the equation is withheld; the code's docstrings still state it (README)
            out += ["Derive the equation first: " + worksheet_table()[name][0][0],
                    "(Derive before you read the function's docstring: it states the result.)"]
        else:
            out += ["The equation:", ""] + ["    " + ln for ln in ex["equation"].splitlines()]
        out += ["", f"Read first: {ex['read']}."]
        if name in PICTURES:
            out += ["", f"See it work: `python tests/assignments.py picture {name}` draws your code "
                    "next to the exact answer."]
        if ex["uses"]:
            out += ["", "May call the exercise(s) " + ", ".join(ex["uses"]) + " (do them first; "
                    "grading swaps in their reference solution, so a mistake there costs no "
                    "points here)."]
    return "\n".join(out) + "\n"


def worksheet(chosen, key=False):
    out = ["# Worksheet" + (": answer key" if key else ""), "",
           "Derivations behind the exercises (EXERCISES.md). Short answers, a few lines each.", ""]
    for name in chosen:
        out += [f"## {name}", ""]
        for i, (q, a) in enumerate(worksheet_table()[name], 1):
            out += [f"{i}. {q}", ""] + ([f"   Answer: {a}", ""] if key else [])
    return "\n".join(out)


def student_readme(text):
    """The README without its instructors' section, and a pointer to the handout's files."""
    start = text.find("\n## For instructors")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start + 1] + ("" if end < 0 else text[end + 1:])
    return text.rstrip("\n") + ("\n\n## Course exercises\n\nThe tasks are in `EXERCISES.md`, the "
                                "derivations in `WORKSHEET.md`; check one exercise with `python "
                                "tests/assignments.py check NAME`; `python tests/assignments.py "
                                "picture NAME` draws cps_step, renoise or tilt_linear next to the "
                                "exact answer. This copy holds none of the project's test files "
                                "(they state the answers): `check` is the test to run.\n")


def make(out, exercises=None, solution=False, replace_files=(), derive=False):
    worksheet_table()  # refuses early in a student copy
    blocks = all_blocks(ROOT)
    found = {name for bl in blocks.values() for name, *_ in bl}
    if found != set(EXERCISES):
        sys.exit(f"assignments: markers {sorted(found)} do not match the exercise table "
                 f"{sorted(EXERCISES)}")
    chosen = list(EXERCISES) if exercises is None else exercises
    unknown = [e for e in chosen if e not in EXERCISES]
    if unknown:
        sys.exit(f"assignments: unknown exercise(s) {unknown}; `list` shows the names")
    blank = set() if solution else set(chosen)
    replace = {}
    for f in replace_files:
        name, bodies = read_wrong_answer(f)
        funcs = {func for bl in blocks.values() for n, func, *_ in bl if n == name}
        if not set(bodies) <= funcs:
            sys.exit(f"assignments: {f} replaces {sorted(set(bodies) - funcs)}, which are not "
                     f"bodies of exercise {name} ({sorted(funcs)})")
        replace.update(bodies)
    if os.path.exists(out) and os.listdir(out):
        sys.exit(f"assignments: {out} exists and is not empty; pass a new folder")
    for rel in tracked_files(ROOT):
        # a student copy keeps no test file: they state the answers (the grading tests travel
        # packed, below), and on blank bodies they would fail anyway
        if rel.startswith(HIDDEN) or (not solution and re.match(r"tests/test_\w+\.py$", rel)):
            continue
        dst = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dst)
    for rel, bl in blocks.items():
        rewrite(os.path.join(out, rel), bl, blank, replace)
    def write(path, text):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    write(os.path.join(out, "WORKSHEET.md"), worksheet(chosen))
    if solution:
        write(os.path.join(out, "WORKSHEET_KEY.md"), worksheet(chosen, key=True))
    else:
        write(os.path.join(out, "EXERCISES.md"), task_statement(blocks, chosen, derive))
        write(os.path.join(out, "README.md"),
              student_readme(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()))
        # the grading tests hold every reference formula (the by-hand helpers): they travel
        # packed, for `check` to run, not for reading
        with zipfile.ZipFile(os.path.join(out, GRADING_ZIP), "w", zipfile.ZIP_DEFLATED) as z:
            z.write(os.path.join(ROOT, GRADING_FILE), "test_exercises.py")
    return out


# ---------------------------------------------------------------------------------------------
# check and grade
# ---------------------------------------------------------------------------------------------


def grading_source():
    """The text of this checkout's grading tests: tests/test_exercises.py, or in a student copy
    the packed tests/grading.zip."""
    path = os.path.join(ROOT, GRADING_FILE)
    if os.path.exists(path):
        return open(path, encoding="utf-8").read()
    with zipfile.ZipFile(os.path.join(ROOT, GRADING_ZIP)) as z:
        return z.read("test_exercises.py").decode("utf-8")


def grading_table():
    """GRADING from the grading tests, read without importing them (no torch needed here)."""
    for node in ast.parse(grading_source()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "GRADING"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    sys.exit(f"assignments: {GRADING_FILE} has no GRADING table")


def preflight(python):
    """Refuse in one line when `python` cannot run the grading tests."""
    probe = ("import sys\ntry:\n    import torch, pytest\nexcept ImportError as e:\n"
             "    sys.exit('T' + str(e))\ntry:\n    import acdmd, eval, models, rewards, sample, subgrpo\n"
             "except ImportError as e:\n    sys.exit('P' + str(e))\n")
    try:
        res = subprocess.run([python, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
    except OSError as e:
        sys.exit(f"assignments: cannot run the Python {python} ({e.strerror}); pass --python PATH")
    err = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
    if res.returncode == 0:
        return
    if err.startswith("T") or re.search(r"No module named '(torch|pytest)'", err):
        sys.exit(f"assignments: {python} cannot import torch and pytest ({err.lstrip('T')}); run "
                 f"`{python} -m pip install -r requirements.txt pytest` or pass --python PATH")
    if err.startswith("P"):
        sys.exit(f"assignments: {python} cannot import the project ({err[1:]}); run "
                 f"`{python} -m pip install -r requirements.txt`")
    sys.exit(f"assignments: {python} fails before the tests ({err}); pass --python PATH, a Python "
             "with requirements.txt and pytest installed")


def closure(name):
    """The exercises `name` uses, directly or through another."""
    seen, todo = set(), list(EXERCISES[name]["uses"])
    while todo:
        e = todo.pop()
        if e not in seen:
            seen.add(e)
            todo += EXERCISES[e]["uses"]
    return seen


def rounds(chosen):
    """Split the graded exercises so that none is graded next to one it uses: in a round, every
    exercise outside it carries the reference solution, so a blank or wrong cps_step costs no
    points in dmd_direction."""
    out = []
    for e in chosen:
        for r in out:
            if not any(e in closure(x) or x in closure(e) for x in r):
                r.append(e)
                break
        else:
            out.append([e])
    return out


def run_tests(copy, exercises, python, reference=True):
    """Run the grading tests of `exercises` on a temporary copy of the modules of `copy` (never on
    `copy` itself). reference=True swaps this checkout's bodies into every other exercise.
    Returns {test: message of its first failure, or None when all its cases pass}."""
    table = grading_table()
    marked = all_blocks(ROOT)
    ref = {}
    for rel, bl in marked.items():
        lines = open(os.path.join(ROOT, rel), encoding="utf-8").read().splitlines(keepends=True)
        for name, func, b, e, indent in bl:
            if name not in exercises:
                ref[func] = textwrap.dedent("".join(lines[b + 1:e])).splitlines(keepends=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "tests"))
        for f in os.listdir(copy):
            if f.endswith(".py") and os.path.isfile(os.path.join(copy, f)):
                shutil.copy2(os.path.join(copy, f), os.path.join(tmp, f))
        for rel in marked if reference else ():
            path = os.path.join(tmp, rel)
            try:
                rewrite(path, find_blocks(path), (), ref) if os.path.exists(path) else None
            except SystemExit as e:  # a student broke a marker: grade that file as it is
                why = rel_error(str(e.code).split(": ", 1)[-1], tmp, copy)
                print(f"assignments: {why}; {rel} is graded without the other exercises' "
                      "reference bodies", file=sys.stderr)
        shutil.copy2(os.path.join(ROOT, "tests", "conftest.py"), os.path.join(tmp, "tests"))
        open(os.path.join(tmp, GRADING_FILE), "w", encoding="utf-8").write(grading_source())
        xml = os.path.join(tmp, "grade.xml")
        ids = [f"{GRADING_FILE}::{t}" for e in exercises for t in table[e]]
        res = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
                              "addopts=", f"--junitxml={xml}", *ids], cwd=tmp, capture_output=True,
                             text=True, env=dict(os.environ, HF_HUB_OFFLINE="1",
                                                 PYTHONDONTWRITEBYTECODE="1"))
        if not os.path.exists(xml):
            sys.exit("assignments: pytest wrote no report: " + (res.stdout + res.stderr)[-500:])
        failures = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            base = case.get("name").split("[")[0]
            bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
            msg = (bad[0].get("message") or bad[0].tag).strip().splitlines()[0] if bad else None
            if msg == "collection failure":  # the reason is in the report's text, last E line
                why = re.findall(r"^E\s+(\w*Error\b.*)$", bad[0].text or "", re.M)
                msg = f"{rel_error(why[-1], tmp, copy)}, importing the modules" if why else msg
            failures[base] = failures.get(base) or msg
    # a test missing from the report did not run: the file failed to import (a student's
    # SyntaxError, say), and pytest reported that under the file's name
    other = [m for t, m in failures.items() if m and t not in {x for e in exercises for x in table[e]}]
    missing = "the test did not run" + (f" ({other[0]})" if other else "")
    return {t: failures.get(t, missing) for e in exercises for t in table[e]}


def rel_error(text, tmp, copy):
    return text.replace(tmp, copy.rstrip("/"))


def score(tests, exercises):
    """{exercise: (passed, total, points, max_points)}; points in proportion to tests passed."""
    table, out = grading_table(), {}
    for e in exercises:
        n_ok, n = sum(tests[t] is None for t in table[e]), len(table[e])
        out[e] = (n_ok, n, round(EXERCISES[e]["points"] * n_ok / n, 1), EXERCISES[e]["points"])
    return out


def assigned(copy):
    """The exercises listed in the copy's EXERCISES.md (its `## NAME (` headings), or all."""
    path = os.path.join(copy, "EXERCISES.md")
    if not os.path.exists(path):
        return list(EXERCISES)
    names = re.findall(r"^## (\w+) \(", open(path, encoding="utf-8").read(), re.M)
    unknown = [e for e in names if e not in EXERCISES]
    if unknown or not names:
        sys.exit(f"assignments: {path} lists {unknown or 'no exercise'}; pass --exercises")
    return [e for e in EXERCISES if e in names]


def grade(out, exercises=None, quiet=True, python=sys.executable):
    """Grade one returned copy: each round of `rounds` on its own temporary copy. Returns
    ({exercise: (passed, total, points, max_points)}, {test: failure message or None})."""
    chosen = assigned(out) if exercises is None else exercises
    tests = {}
    for r in rounds(chosen):
        tests.update(run_tests(out, r, python))
    return score(tests, chosen), tests


def feedback(copy, result, tests):
    table = grading_table()
    lines = [f"# Feedback: {os.path.basename(os.path.abspath(copy))}", ""]
    for e, (ok, n, pts, mx) in result.items():
        lines.append(f"## {e}: {ok}/{n} tests, {pts:g}/{mx} points")
        lines += [f"- `{t}`: {tests[t]}" for t in table[e] if tests[t] is not None]
        lines.append("")
    total = sum(r[2] for r in result.values()), sum(r[3] for r in result.values())
    return "\n".join(lines + [f"Total: {total[0]:g}/{total[1]}", ""])


def print_table(result):
    print(f"{'exercise':<24}{'tests passed':>14}{'points':>14}")
    tot, tot_max = 0.0, 0
    for e, (ok, n, pts, mx) in result.items():
        print(f"{e:<24}{f'{ok}/{n}':>14}{f'{pts:g}/{mx}':>14}")
        tot, tot_max = tot + pts, tot_max + mx
    print(f"{'total':<24}{'':>14}{f'{tot:g}/{tot_max}':>14}")


def print_batch(results):
    """One row per student, one column per exercise any of them was graded on."""
    cols = [e for e in EXERCISES if any(e in r for r in results.values())]
    w = max(len(n) for n in results) + 2
    print(f"{'student':<{w}}" + "".join(f"{e:>{len(e) + 2}}" for e in cols) + f"{'total':>10}")
    for name, r in results.items():
        cells = [f"{r[e][2]:g}/{r[e][3]}" if e in r else "-" for e in cols]
        total = f"{sum(x[2] for x in r.values()):g}/{sum(x[3] for x in r.values())}"
        print(f"{name:<{w}}" + "".join(f"{c:>{len(e) + 2}}" for c, e in zip(cells, cols))
              + f"{total:>10}")


def check(names, python):
    """Run exactly the grading tests of `names` on this checkout's own code; print each failure's
    first line. An exercise that fails only on another exercise's blank gets a note, because
    grading swaps the reference of that one in (`rounds`)."""
    table = grading_table()
    tests = run_tests(ROOT, names, python, reference=False)
    for e in names:
        bad = [t for t in table[e] if tests[t] is not None]
        print(f"{e}: {len(table[e]) - len(bad)}/{len(table[e])} grading tests pass")
        for t in bad:
            print(f"  FAIL {t}: {tests[t]}")
            m = re.match(r"NotImplementedError: (\w+):", tests[t])
            if m and m.group(1) != e:
                print(f"       (exercise {m.group(1)} is not written yet; grading uses its "
                      f"reference, so finish it first to check {e})")
    return all(tests[t] is None for e in names for t in table[e])


def main(argv=None):
    p = argparse.ArgumentParser(description="Make and grade course assignments from the code.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the exercises: difficulty, time, points, functions, uses")
    m = sub.add_parser("make", help="write a student copy (or the key) to OUT")
    m.add_argument("out")
    m.add_argument("--exercises", nargs="+", default=None, help="blank only these (default: all)")
    m.add_argument("--solution", action="store_true",
                   help="blank nothing: the key, with WORKSHEET_KEY.md")
    m.add_argument("--derive", action="store_true",
                   help="withhold the equations from EXERCISES.md: derive them (WORKSHEET.md)")
    m.add_argument("--replace", nargs="+", default=(), metavar="FILE",
                   help="swap in the bodies of these wrong-answer files (tests/wrong_answers)")
    c = sub.add_parser("check", help="run exactly the grading tests of these exercises here")
    c.add_argument("names", nargs="+", metavar="NAME")
    g = sub.add_parser("grade", help="grade returned copies: score table, feedback files")
    g.add_argument("out", nargs="+", help="one or more returned copies (returned/*)")
    g.add_argument("--exercises", nargs="+", default=None,
                   help="grade these (default: those in each copy's EXERCISES.md, else all)")
    g.add_argument("--feedback", default=None, metavar="DIR",
                   help="where to write NAME.feedback.txt (default: next to each copy)")
    pic = sub.add_parser("picture", help="draw this checkout's cps_step, renoise or tilt_linear "
                                          "next to the exact answer (tests/pictures.py)")
    pic.add_argument("names", nargs=1, metavar="NAME", choices=PICTURES)
    pic.add_argument("--png", default=None, help="the picture's path (default picture_NAME.png)")
    for q in (c, g, pic):
        q.add_argument("--python", default=sys.executable,
                       help="the interpreter that runs the tests (default: this one)")
    args = p.parse_args(argv)
    if args.cmd == "list":
        funcs = {}
        for rel, bl in all_blocks(ROOT).items():
            for name, func, *_ in bl:
                funcs.setdefault(name, []).append(f"{rel[:-3]}.{func}")
        for name, ex in EXERCISES.items():
            uses = f"  (uses {', '.join(ex['uses'])})" if ex["uses"] else ""
            print(f"{name:<24}{ex['difficulty']:<8}{ex['minutes']:>4} min {ex['points']:>4} points  "
                  + ", ".join(funcs.get(name, [])) + uses)
        return 0
    if args.cmd == "make":
        make(args.out, args.exercises, args.solution, args.replace, args.derive)
        print(f"wrote {args.out}" + (" (the key, WORKSHEET_KEY.md)" if args.solution
                                     else " with EXERCISES.md and WORKSHEET.md"))
        return 0
    names = args.names if args.cmd in ("check", "picture") else (args.exercises or [])
    unknown = [e for e in names if e not in EXERCISES]
    if unknown:
        sys.exit(f"assignments: unknown exercise(s) {unknown}; `list` shows the names")
    preflight(args.python)
    if args.cmd == "check":
        return 0 if check(args.names, args.python) else 1
    if args.cmd == "picture":
        png = os.path.abspath(args.png or f"picture_{args.names[0]}.png")
        return subprocess.run([args.python, os.path.join("tests", "pictures.py"), args.names[0],
                               png], cwd=ROOT).returncode
    copies = []
    for path in args.out:
        if not os.path.isdir(path):
            print(f"skipping {path}: not a folder")
        elif not os.path.exists(os.path.join(path, "acdmd.py")):
            sys.exit(f"assignments: {path} is not a copy made by `make` (no acdmd.py)")
        else:
            copies.append(path)
    labels = [os.path.basename(os.path.abspath(c)) for c in copies]
    if len(set(labels)) < len(labels):
        sys.exit("assignments: two copies share a folder name; grade them in separate calls")
    results, ok = {}, True
    for path, label in zip(copies, labels):
        result, tests = grade(path, args.exercises, python=args.python)
        results[label] = result
        ok = ok and all(r[0] == r[1] for r in result.values())
        where = args.feedback or os.path.dirname(os.path.abspath(path))
        os.makedirs(where, exist_ok=True)
        fb = os.path.join(where, f"{label}.feedback.txt")
        open(fb, "w", encoding="utf-8").write(feedback(path, result, tests))
        print(f"feedback: {fb}")
    if len(results) == 1:
        print_table(next(iter(results.values())))
    else:
        print_batch(results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
