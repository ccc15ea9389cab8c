"""Course assignments cut from the real code, graded by the real tests.

Every exercise is one or more function bodies in the project's modules, each wrapped in a pair of
comments

    # --- exercise NAME: begin ---
    ...the solution...
    # --- exercise NAME: end ---

`make` copies the repository (the files git tracks, no history) and replaces each marked body by
`raise NotImplementedError("NAME: ...")`, so the copy still imports and runs up to the first
missing piece. It writes EXERCISES.md next to it: per exercise, what to implement, the equation,
which module-docstring section to read first, difficulty and an estimated time. `grade` runs each
exercise's tests (tests/test_exercises.py, its GRADING table) on a copy and prints a score table.

    python tests/assignments.py list
    python tests/assignments.py make OUT [--exercises NAME ...]      # a student copy
    python tests/assignments.py make OUT --solution [--replace FILE]  # the key, or the key with
                                                                      # one wrong answer swapped in
    python tests/assignments.py grade OUT [--exercises NAME ...]      # exit code 1 if any test fails

A wrong answer (tests/wrong_answers/NAME_N.py) redefines one or more of exercise NAME's functions
with a plausible mistake; `make --solution --replace FILE` swaps its bodies into the key.
tests/test_assignments.py grades the key (full marks) and every wrong answer (exactly its exercise
fails).

Standard library only, so that it runs before anything is installed.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRADING_FILE = os.path.join("tests", "test_exercises.py")
# what a student copy leaves out: the wrong answers are near-solutions, and the test of this tool
# needs them
HIDDEN = ("tests/wrong_answers/", "tests/test_assignments.py")  # as git lists paths
MARK = re.compile(r"^(\s*)# --- exercise (\w+): (begin|end) ---\s*$")

# The exercises in the suggested order (README, "For instructors"). `uses`: the other exercises
# whose functions the solution calls, so a missing one blocks this one in a blanked copy.
EXERCISES = {
    "cps_step": dict(
        difficulty="easy", minutes=30, points=10, uses=[],
        read="models.py, section 1 (flow-matching conventions), then sample.py, section 1",
        what="`sample.cps_mean_std` (mean and std of one coefficient-preserving sampling step) "
             "and `sample.cps_step` (one draw from it).",
        equation="x0_hat = x - sigma v,  eps_hat = x + (1 - sigma) v,  theta = eta pi / 2;\n"
                 "mu = (1 - sigma') x0_hat + sigma' cos(theta) eps_hat,  rho = sigma' sin(theta);\n"
                 "x' = mu + rho z,  z ~ N(0, I) (use `noise` when it is given)."),
    "renoise": dict(
        difficulty="easy", minutes=20, points=10, uses=[],
        read="acdmd.py, section 2",
        what="`acdmd.subinterval_coeffs` and `acdmd.renoise`: the exact forward kernel that "
             "pushes a sample at level s to a level t > s.",
        equation="a_ts = (1 - t) / (1 - s),  sigma_ts = sqrt(max(t^2 - a_ts^2 s^2, 1e-12));\n"
                 "x_t = a_ts x_s + sigma_ts n."),
    "ambient_target": dict(
        difficulty="medium", minutes=40, points=15, uses=[],
        read="acdmd.py, section 4",
        what="`acdmd.ambient_target`: the regression target of the fake score when it only ever "
             "sees x_s, never clean data.",
        equation="T = -x_s / (1 - s) + [t + (1 - t) s^2 / (1 - s)^2] / sigma_ts * n;\n"
                 "E[T | x_t] is the exact flow velocity of the law of x_t."),
    "dmd_direction": dict(
        difficulty="medium", minutes=45, points=15, uses=["cps_step"],
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
        read="acdmd.py, section 5",
        what="`acdmd.consistency_two_sample`: an unbiased estimate of the squared martingale "
             "defect from two independent transitions.",
        equation="estimate = mean[(h_1 - h_0)(h_2 - h_0)],  E[estimate] = ||E[h(x') | x_t] - h_0||^2 "
                 "(it may be negative)."),
    "energy_distance": dict(
        difficulty="easy", minutes=20, points=10, uses=[],
        read="eval.py, section 1",
        what="`eval.energy_distance`: the toy's distance between two point sets.",
        equation="ED = 2 E|X - Y| - E|X - X'| - E|Y - Y'|, Euclidean norms, V-statistics "
                 "(every pair, a point with itself included)."),
    "cps_log_prob": dict(
        difficulty="medium", minutes=40, points=15, uses=["cps_step"],
        read="subgrpo.py, section 4",
        what="`subgrpo.cps_log_prob`: the log-probability of a stored CPS transition, in the "
             "official and the exact form.",
        equation="official: l = -mean_{non-batch} (x' - mu)^2;\n"
                 "exact: log pi = -|x' - mu|^2 / (2 rho^2) - D log rho - (D/2) log(2 pi);\n"
                 "0 on deterministic steps (rho = 0); gradient through v only."),
    "group_advantages": dict(
        difficulty="medium", minutes=40, points=15, uses=[],
        read="subgrpo.py, section 5",
        what="`subgrpo.group_advantages`: GRPO advantages, per-prompt mean, global std, "
             "weighted over several rewards.",
        equation="A_k(i) = (r_k(i) - mean_{prompt of i} r_k) / (std_all r_k + eps),  "
                 "A = sum_k w_k A_k,  A <- (A - mean A) / (std A + eps);\n"
                 "population std; normalize=False: A = sum_k w_k (r_k - per-prompt mean)."),
    "select_steps": dict(
        difficulty="medium", minutes=40, points=15, uses=[],
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
        read="subgrpo.py, sections 2 and 5",
        what="`subgrpo.ppo_loss`: the clipped surrogate of one trained step, with its statistics.",
        equation="r = exp(l_new - l_old),  L = mean_b max(-A r, -A clip(r, 1 - eps, 1 + eps));\n"
                 "stats: ratio_mean, ratio_min, ratio_max, clip_frac (|r - 1| > eps), "
                 "approx_kl = mean (l_new - l_old)^2 / 2."),
    "final_step_x0": dict(
        difficulty="medium", minutes=30, points=10, uses=[],
        read="subgrpo.py, section 2",
        what="`subgrpo.final_step_x0` (the deterministic last step, with grad through the network "
             "only) and `subgrpo.bp_loss` (the reward back-prop hinge).",
        equation="x0_hat = x_3 - sigma_3 G(x_3, sigma_3, c) with x_3 held constant;\n"
                 "L_BP = mean_b relu(margin - R_w); stats reward_mean, hinge_active (R_w < margin)."),
    "tilt_linear": dict(
        difficulty="hard", minutes=60, points=15, uses=[],
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
    """The files git tracks or would track under root (relative paths): no history, no runs."""
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"assignments: {root} is not a git checkout; run this tool from the repository")
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


def task_statement(blocks, chosen):
    where = {}
    for rel, bl in blocks.items():
        for name, func, *_ in bl:
            where.setdefault(name, []).append(f"{rel}: {func}")
    out = ["# Exercises", "",
           "Each exercise is the body of one or more functions of this repository, replaced by",
           "`raise NotImplementedError`. Write the body between its two `# --- exercise` comments,",
           "keep the signature and the docstring, and check your work with",
           "", "    python -m pytest -q tests/test_exercises.py -k NAME", "",
           "The tests compare distributions and closed forms, never random seeds: draw noise the",
           "way you like. Suggested order: the table's.", "",
           "| exercise | difficulty | estimated time | points |", "|---|---|---|---|"]
    for name in chosen:
        ex = EXERCISES[name]
        out.append(f"| {name} | {ex['difficulty']} | {ex['minutes']} min | {ex['points']} |")
    for name in chosen:
        ex = EXERCISES[name]
        out += ["", f"## {name} ({ex['difficulty']}, about {ex['minutes']} min, "
                    f"{ex['points']} points)", "",
                f"Implement {ex['what']}", "",
                "Where: " + "; ".join(where.get(name, [])) + ".", "",
                "The equation:", ""]
        out += ["    " + ln for ln in ex["equation"].splitlines()]
        out += ["", f"Read first: {ex['read']}."]
        if ex["uses"]:
            out += ["", "Needs the exercise(s) " + ", ".join(ex["uses"]) + " done first."]
    return "\n".join(out) + "\n"


def make(out, exercises=None, solution=False, replace_files=()):
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
        if rel.startswith(HIDDEN):
            continue
        dst = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dst)
    for rel, bl in blocks.items():
        rewrite(os.path.join(out, rel), bl, blank, replace)
    if not solution:
        with open(os.path.join(out, "EXERCISES.md"), "w", encoding="utf-8") as f:
            f.write(task_statement(blocks, chosen))
    return out


# ---------------------------------------------------------------------------------------------
# grade
# ---------------------------------------------------------------------------------------------


def grading_table():
    """GRADING from tests/test_exercises.py, read without importing it (no torch needed here)."""
    tree = ast.parse(open(os.path.join(ROOT, GRADING_FILE), encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "GRADING"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    sys.exit(f"assignments: {GRADING_FILE} has no GRADING table")


def grade(out, exercises=None, quiet=False):
    """Run the grading tests of `exercises` (default: all) on the copy at `out`. The copy gets
    this checkout's grading tests first, so edited tests cannot change a grade.
    Returns {exercise: (passed, total, points, max_points)}."""
    table = grading_table()
    chosen = list(EXERCISES) if exercises is None else exercises
    for name in ("conftest.py", "test_exercises.py"):
        shutil.copy2(os.path.join(ROOT, "tests", name), os.path.join(out, "tests", name))
    ids = [f"{GRADING_FILE}::{t}" for e in chosen for t in table[e]]
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "grade.xml")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", f"--junitxml={xml}", *ids],
                       cwd=out, env=env, capture_output=quiet)
        if not os.path.exists(xml):
            sys.exit("assignments: pytest wrote no report; run the command above by hand to see why")
        passed = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            ok = not any(c.tag in ("failure", "error", "skipped") for c in case)
            base = case.get("name").split("[")[0]
            passed.setdefault(base, []).append(ok)
    result = {}
    for e in chosen:  # a test passes when all its parametrised cases pass; a missing one fails
        runs = [all(passed.get(t, [False])) for t in table[e]]
        n_ok, n = sum(runs), len(runs)
        pts = EXERCISES[e]["points"]
        result[e] = (n_ok, n, round(pts * n_ok / n, 1), pts)
    return result


def print_table(result):
    print(f"{'exercise':<24}{'tests passed':>14}{'points':>14}")
    tot, tot_max = 0.0, 0
    for e, (ok, n, pts, mx) in result.items():
        print(f"{e:<24}{f'{ok}/{n}':>14}{f'{pts:g}/{mx}':>14}")
        tot, tot_max = tot + pts, tot_max + mx
    print(f"{'total':<24}{'':>14}{f'{tot:g}/{tot_max}':>14}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Make and grade course assignments from the code.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the exercises, their difficulty and time")
    m = sub.add_parser("make", help="write a student copy (or the key) to OUT")
    m.add_argument("out")
    m.add_argument("--exercises", nargs="+", default=None, help="blank only these (default: all)")
    m.add_argument("--solution", action="store_true", help="blank nothing: the key")
    m.add_argument("--replace", nargs="+", default=(), metavar="FILE",
                   help="swap in the bodies of these wrong-answer files (tests/wrong_answers)")
    g = sub.add_parser("grade", help="run the grading tests on a copy, print the score table")
    g.add_argument("out")
    g.add_argument("--exercises", nargs="+", default=None, help="grade only these")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for name, ex in EXERCISES.items():
            print(f"{name:<24}{ex['difficulty']:<8}{ex['minutes']:>4} min  {ex['points']:>3} points")
        return 0
    if args.cmd == "make":
        make(args.out, args.exercises, args.solution, args.replace)
        print(f"wrote {args.out}" + ("" if args.solution else f" and {args.out}/EXERCISES.md"))
        return 0
    if not os.path.isdir(os.path.join(args.out, "tests")):
        sys.exit(f"assignments: {args.out} is not a copy made by `make` (no tests/ folder)")
    if args.exercises:
        unknown = [e for e in args.exercises if e not in EXERCISES]
        if unknown:
            sys.exit(f"assignments: unknown exercise(s) {unknown}; `list` shows the names")
    result = grade(args.out, args.exercises, quiet=True)
    print_table(result)
    return 0 if all(ok == n for ok, n, _, _ in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
