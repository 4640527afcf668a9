"""Classroom exercises: rebuild GPT-2 piece by piece, and hunt planted bugs, graded by the project's own tests.

Run from the repository root:

    python tests/exercises.py list                    # the ladder: id, kind, file, difficulty, title
    python tests/exercises.py list --json             # the same, as JSON
    python tests/exercises.py start gelu --out ~/ex   # a student folder: nanogpt2.py with gelu_new blanked
    python tests/exercises.py start attention --out ~/ex   # a whole chapter at once
    python tests/exercises.py check ~/ex              # grade it; add --hint for the next hint
    python tests/exercises.py solution gelu           # the reference code (for a bug: the diff that fixes it)
    python tests/exercises.py grade ~/class/* --csv grades.csv   # many folders -> one CSV

Two kinds of exercise (the catalogue is tests/exercise_catalogue.py):
    write   a function's body is replaced by `raise NotImplementedError(...)`; its docstring is the task.
    bug     one subtle fault is planted in a section of the file; the student is told the section, not the line.

How grading works: `check` runs the exercise's grading tests (a focused handful of tests of the suite) with
the student's folder first on sys.path (tests/conftest.py honours NANOGPT2_STUDENT_DIR), so `import nanogpt2`
in the tests imports the student's copy, never the repository's. Functions are found by their qualified name
in the syntax tree, never by line number, so the exercises follow the code as it moves.
"""

import argparse
import ast
import csv
import difflib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
sys.path.insert(0, TESTS_DIR)

from exercise_catalogue import CHAPTERS, EXERCISES  # noqa: E402

MANIFEST = "exercises.json"
BY_ID = {ex["id"]: ex for ex in EXERCISES}


class ExerciseError(Exception):
    """A mistake in using the tool (unknown id, bad folder) or a stale catalogue entry."""


# --- Finding and rewriting functions -----------------------------------------------------------------------


def find_function(tree, qualname):
    """The FunctionDef of `qualname` ("top_k_filter", "GPT2Attention.forward") in a module's syntax tree."""
    nodes = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise ExerciseError(f"{qualname}: no {part!r} found (was it renamed or moved?)")
        nodes = node.body
    if not isinstance(node, ast.FunctionDef):
        raise ExerciseError(f"{qualname} is a class, not a function")
    return node


@functools.lru_cache(maxsize=64)
def parse(source):
    return ast.parse(source)


def function_span(source, qualname):
    """(first line, last line), 0-based and inclusive, of the function with its decorators."""
    node = find_function(parse(source), qualname)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    return first, node.end_lineno - 1


def function_source(source, qualname):
    first, last = function_span(source, qualname)
    return "".join(source.splitlines(keepends=True)[first:last + 1])


def blank_function(source, qualname, exercise_id):
    """The body replaced by a NotImplementedError naming the exercise; the signature and docstring kept."""
    node = find_function(parse(source), qualname)
    body = node.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
        isinstance(body[0].value.value, str)
    if has_doc and len(body) == 1:
        raise ExerciseError(f"{qualname} has nothing but a docstring to blank")
    first_stmt = body[1] if has_doc else body[0]
    lines = source.splitlines(keepends=True)
    indent = " " * first_stmt.col_offset
    start = first_stmt.lineno - 1
    # Comments between the docstring and the first statement belong to the body too.
    if has_doc:
        start = body[0].end_lineno
    stub = f'{indent}raise NotImplementedError("exercise {exercise_id}: write {qualname}")\n'
    return "".join(lines[:start]) + stub + "".join(lines[node.end_lineno:])


def plant_bug(source, qualname, old, new):
    """Replace the one occurrence of `old` inside the code of the function `qualname` (not its docstring)."""
    first, last = function_span(source, qualname)
    node = find_function(parse(source), qualname)
    if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) and len(node.body) > 1:
        first = node.body[0].end_lineno  # the line after the docstring
    lines = source.splitlines(keepends=True)
    body = "".join(lines[first:last + 1])
    count = body.count(old)
    if count != 1:
        raise ExerciseError(f"stale bug in {qualname}: the snippet {old!r} occurs {count} times in it, expected "
                            "once (the code changed: update the catalogue entry)")
    return "".join(lines[:first]) + body.replace(old, new) + "".join(lines[last + 1:])


BANNER = re.compile(r"^# (?:--- )?((?:\d+\. )?[A-Z][^-\n]*?)(?: -+)?$")


def section_of(source, qualname):
    """The title of the last section banner above the function ('Attention', 'Protobuf by hand', ...)."""
    first, _ = function_span(source, qualname)
    for line in reversed(source.splitlines()[:first]):
        m = BANNER.match(line.rstrip())
        if m and not line.startswith("# ---------"):
            return m.group(1).strip()
    return "the top of the file"


def restore(text, reference, qualnames):
    """`text` with each function in `qualnames` replaced by its version in `reference` (the answer put back)."""
    for qualname in qualnames:
        first, last = function_span(text, qualname)
        lines = text.splitlines(keepends=True)
        text = "".join(lines[:first]) + function_source(reference, qualname) + "".join(lines[last + 1:])
    return text


def read_repo_file(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


# --- Exercises -----------------------------------------------------------------------------------------------


def expand(names):
    """Exercise ids and chapter names -> exercise ids, in ladder order, without repeats. A chapter's name starts
    its `write` exercises; CHAPTER-bugs starts its bugs (a bug may sit in a function a write exercise blanks)."""
    wanted = set()
    for name in names:
        if name in BY_ID:
            wanted.add(name)
        elif name in CHAPTERS:
            wanted.update(ex["id"] for ex in EXERCISES if ex["chapter"] == name and ex["kind"] == "write")
        elif name.endswith("-bugs") and name[:-5] in CHAPTERS:
            wanted.update(ex["id"] for ex in EXERCISES if ex["chapter"] == name[:-5] and ex["kind"] == "bug")
        else:
            raise ExerciseError(f"unknown exercise or chapter {name!r}; `python tests/exercises.py list` shows "
                                f"them all (chapters: {', '.join(CHAPTERS)}, each also as CHAPTER-bugs)")
    return [ex["id"] for ex in EXERCISES if ex["id"] in wanted]


def apply_exercise(source, ex):
    """The file's text with this exercise applied: its functions blanked, or its bug planted."""
    if ex["kind"] == "write":
        for qualname in ex["functions"]:
            source = blank_function(source, qualname, ex["id"])
    else:
        for qualname, old, new in ex["edits"]:
            source = plant_bug(source, qualname, old, new)
    return source


def student_files(ids):
    """{file name: text} for the exercises `ids` applied together to fresh copies of the repository's files."""
    files = {}
    for ex_id in ids:
        ex = BY_ID[ex_id]
        if ex["file"] not in files:
            files[ex["file"]] = read_repo_file(ex["file"])
        try:
            files[ex["file"]] = apply_exercise(files[ex["file"]], ex)
        except ExerciseError as e:
            earlier = [i for i in ids[:ids.index(ex_id)] if set(BY_ID[i]["functions"]) & set(ex["functions"])]
            if not earlier:
                raise
            raise ExerciseError(f"{ex_id} changes the same function as {', '.join(earlier)}: start them in "
                                f"separate folders") from None
    return files


def describe_task(ex, source):
    if ex["kind"] == "write":
        return f"write {', '.join(ex['functions'])} in {ex['file']} (the docstring is the task)"
    sections = sorted({section_of(source, qualname) for qualname, _, _ in ex["edits"]})
    return f"find and fix the bug in {ex['file']}, section '{' / '.join(sections)}'"


def start(names, out):
    ids = expand(names)
    os.makedirs(out, exist_ok=True)
    manifest_path = os.path.join(out, MANIFEST)
    if os.path.exists(manifest_path):
        raise ExerciseError(f"{out} already holds started exercises; choose a new --out folder")
    files = student_files(ids)
    for name, text in files.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text)
    manifest = {"exercises": ids, "files": sorted(files), "hints_shown": {ex_id: 0 for ex_id in ids}}
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    lines = [f"Started in {out}:"]
    for ex_id in ids:
        ex = BY_ID[ex_id]
        lines.append(f"  {ex_id:24} {ex['title']}\n  {'':24} -> {describe_task(ex, read_repo_file(ex['file']))}")
    lines.append(f"Edit the files there, then: python tests/exercises.py check {out}")
    return "\n".join(lines)


def load_manifest(folder):
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise ExerciseError(f"{folder} has no {MANIFEST}: make it with `python tests/exercises.py start ID --out "
                            f"{folder}`")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --- Running the grading tests --------------------------------------------------------------------------------


def pytest_command(tests, junit, stop_at_first=True):
    # --tb=native: pytest's own traceback styles re-parse every source file of every frame, and hypothesis
    # formats a traceback for each failing example while it shrinks (minutes for a failure inside nanogpt2.py).
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=native", "-rN", "-W", "ignore",
            *(["-x"] if stop_at_first else []), f"--junitxml={junit}", *tests]


def run_tests(folder, tests, timeout=300):
    """Run the tests against the files in `folder`. Returns (passed, first failure as plain words or None)."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        env = dict(os.environ, NANOGPT2_STUDENT_DIR=os.path.abspath(folder), HYPOTHESIS_PROFILE="grading")
        try:
            proc = subprocess.run(pytest_command(tests, junit), cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"the tests ran for more than {timeout} s (an endless loop?)"
        if not os.path.exists(junit):  # a crash before pytest could report
            return False, "the tests could not run:\n" + (proc.stdout + proc.stderr)[-2000:]
        return parse_junit(junit, proc)


def parse_junit(junit, proc):
    root = ET.parse(junit).getroot()
    ran = 0
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                name = case.get("name")
                text = node.text or node.get("message") or ""
                return False, f"{name} ({case.get('classname', '').replace('.', '/')}.py) failed:\n" + \
                    explain(text)
        if case.find("skipped") is None:
            ran += 1
    if proc.returncode not in (0,) or ran == 0:
        return False, "the tests did not run:\n" + (proc.stdout + proc.stderr)[-2000:]
    return True, None


def explain(text):
    """The useful part of a pytest failure (--tb=native): the exception's own lines, where it was raised, and
    hypothesis's falsifying example, with config fields left at their defaults dropped."""
    if "NotImplementedError: exercise" in text:
        m = re.search(r"NotImplementedError: (exercise [^\n\"']+)", text)
        return f"  still not written: NotImplementedError({m.group(1) if m else ''})"
    lines = text.splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("Falsifying example")), len(lines))
    frames = [i for i, line in enumerate(lines[:end]) if line.startswith('  File "')]
    start = frames[-1] + 1 if frames else 0
    while start < end and (lines[start].startswith(" ") or not lines[start].strip()):
        start += 1  # the last frame's source line and its ^^^ markers
    errors = [line.rstrip() for line in lines[start:end] if line.strip()]
    out = ["  " + "\n  ".join(errors[:15])] if errors else []
    ours = [i for i in frames if "site-packages" not in lines[i] and "/lib/python" not in lines[i]]
    if ours:  # the last frame in the tests or the student's files, not inside torch or pytest
        m = re.match(r'  File "(.+)", line (\d+), in (.+)', lines[ours[-1]])
        if m:
            out.append(f"  (raised in {os.path.basename(m.group(1))}, line {m.group(2)}, in {m.group(3)})")
    example = []
    for line in lines[end:]:
        example.append(line.rstrip())
        if line.strip() == ")":
            break
    if example:
        example = drop_default_fields(example)
        out.append("  smallest falsifying example:\n    " + "\n    ".join(example[:25]))
    return "\n".join(out) if out else "  " + text.strip()[-1500:]


def drop_default_fields(example):
    """Hypothesis prints a drawn config with every field; keep the ones that differ from the defaults."""
    text = "\n".join(example)
    if "Config(" not in text:
        return example
    defaults = {}
    try:
        import dataclasses
        sys.path.insert(0, REPO)
        import imagegpt
        import nanogpt2
        for cls in (nanogpt2.GPT2Config, imagegpt.ImageGPTConfig):
            for f in dataclasses.fields(cls):
                if f.default is not dataclasses.MISSING:
                    defaults.setdefault(cls.__name__, {})[f.name] = repr(f.default)
                elif f.default_factory is not dataclasses.MISSING:
                    defaults.setdefault(cls.__name__, {})[f.name] = repr(f.default_factory())
    except Exception:  # the student's file may not even import: show everything
        return example
    kept, inside = [], None
    for line in example:
        m = re.match(r"\s*(?:\w+=)?(\w+Config)\((\w+)=(.*?),?$", line)
        if m and m.group(1) in defaults:
            inside = defaults[m.group(1)]
            first = f"{m.group(2)}={m.group(3)}"
            kept.append(line[:line.index("(") + 1] + ("" if inside.get(m.group(2)) == m.group(3) else first + ","))
            continue
        if inside is not None:
            m = re.match(r"\s*(\w+)=(.*?)(,|\)\),?|\),?)$", line)
            if m:
                closing = line.rstrip().endswith("),") or line.rstrip().endswith(")")
                if inside.get(m.group(1)) != m.group(2):
                    kept.append(f"      {m.group(1)}={m.group(2)},")
                if closing:
                    kept.append("    ),  (other fields: their defaults)")
                    inside = None
                continue
        kept.append(line)
    return kept


def check(folder, hint=False, quiet=False):
    """Grade one folder: {exercise id: (passed, message)}, and print the report unless quiet."""
    manifest = load_manifest(folder)
    results = {}
    for ex_id in manifest["exercises"]:
        ex = BY_ID.get(ex_id)
        if ex is None:
            results[ex_id] = (False, "this exercise is no longer in the catalogue")
            continue
        t0 = time.time()
        passed, message = run_tests(folder, ex["tests"])
        results[ex_id] = (passed, message)
        if quiet:
            continue
        print(f"{'PASS' if passed else 'FAIL'}  {ex_id}: {ex['title']}  ({time.time() - t0:.0f} s)")
        if not passed:
            print(message)
            if hint:
                shown = manifest["hints_shown"].get(ex_id, 0)
                if shown < len(ex["hints"]):
                    print(f"  hint {shown + 1} of {len(ex['hints'])}: {ex['hints'][shown]}")
                    manifest["hints_shown"][ex_id] = shown + 1
                else:
                    print(f"  no more hints; `python tests/exercises.py solution {ex_id}` shows the answer")
    if hint:
        with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
    if not quiet:
        n_pass = sum(p for p, _ in results.values())
        print(f"{n_pass} of {len(results)} exercises pass")
    return results


def grade(folders, csv_path):
    ids = []
    rows = {}
    for folder in folders:
        results = check(folder, quiet=True)
        rows[folder] = results
        ids += [ex_id for ex_id in results if ex_id not in ids]
        print(f"{folder}: {sum(p for p, _ in results.values())} of {len(results)} pass", file=sys.stderr)
    ids = [ex["id"] for ex in EXERCISES if ex["id"] in ids]
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["folder", *ids, "passed"])
        for folder, results in rows.items():
            cells = ["pass" if results[i][0] else "fail" if i in results else "" for i in ids]
            writer.writerow([folder, *cells, sum(p for p, _ in results.values())])
    return csv_path


def solution(ex_id):
    if ex_id not in BY_ID:
        raise ExerciseError(f"unknown exercise {ex_id!r}; `python tests/exercises.py list` shows them all")
    ex = BY_ID[ex_id]
    source = read_repo_file(ex["file"])
    if ex["kind"] == "write":
        return "\n".join(function_source(source, q) for q in ex["functions"])
    buggy = apply_exercise(source, ex)
    diff = difflib.unified_diff(buggy.splitlines(keepends=True), source.splitlines(keepends=True),
                                f"a/{ex['file']}", f"b/{ex['file']}", n=2)
    return "".join(diff)


# --- The self-check: every exercise is caught by its grading tests ---------------------------------------------


class _Recorder:
    """A pytest plugin that notes the first failing test and how many passed."""

    def __init__(self):
        self.failed, self.passed = [], 0

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(report.nodeid)
        elif report.passed and report.when == "call":
            self.passed += 1


def selfcheck(ids, workdir):
    """For each exercise, alone: start it in a fresh folder and run its grading tests against it, stopping at the
    first failure, in this one process (torch is imported once). {id: (caught, what caught it or why not)}.

    A `write` exercise's blanked copy and a `bug` exercise's planted fault must both make a grading test fail.
    Hypothesis runs the "exercises" profile: the CI examples, without shrinking (only the catch matters here)."""
    import pytest

    os.environ["HYPOTHESIS_PROFILE"] = "exercises"
    results = {}
    for ex_id in ids:
        ex = BY_ID[ex_id]
        folder = os.path.join(workdir, ex_id)
        os.makedirs(folder)
        try:
            files = student_files([ex_id])
        except ExerciseError as e:
            results[ex_id] = (False, str(e), 0.0)
            continue
        for name, text in files.items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
        os.environ["NANOGPT2_STUDENT_DIR"] = folder
        for name in list(sys.modules):  # the student's modules, and every test module that imported them
            module_file = getattr(sys.modules[name], "__file__", None) or ""
            if name in ("nanogpt2", "imagegpt", "convert_tf", "conftest", "helpers") or \
                    module_file.startswith(TESTS_DIR + os.sep) and name != __name__ and name != "exercise_catalogue":
                del sys.modules[name]
        sys.path[:] = [p for p in sys.path if not p.startswith(workdir)]
        recorder = _Recorder()
        t0 = time.process_time()
        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:unraisableexception", "-p",
                                "no:threadexception", "--assert=plain", "--tb=no", "--no-header", "-W", "ignore",
                                "-o", "console_output_style=classic", *ex["tests"]], plugins=[recorder])
        finally:
            os.chdir(cwd)
        spent = time.process_time() - t0
        if code == 1 and recorder.failed:
            results[ex_id] = (True, recorder.failed[0], round(spent, 2))
        elif code == 0:
            results[ex_id] = (False, f"every grading test passed ({recorder.passed} ran): the "
                                     f"{'blanked function' if ex['kind'] == 'write' else 'planted bug'} got through",
                              round(spent, 2))
        else:
            results[ex_id] = (False, f"pytest exit code {int(code)} (a grading test renamed or missing?)",
                              round(spent, 2))
    return results


# --- The command line -----------------------------------------------------------------------------------------


def ladder():
    return [{"id": ex["id"], "kind": ex["kind"], "file": ex["file"], "difficulty": ex["difficulty"],
             "chapter": ex["chapter"], "title": ex["title"],
             "functions": ex["functions"] if ex["kind"] == "write" else [],
             "tests": ex["tests"]} for ex in EXERCISES]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python tests/exercises.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("list", help="the ladder of exercises")
    p.add_argument("--json", action="store_true", help="as a JSON list of objects")
    p = commands.add_parser("start", help="write a student folder for exercises or chapters")
    p.add_argument("names", nargs="+", metavar="ID", help="exercise ids or chapter names")
    p.add_argument("--out", required=True, help="the student folder to create")
    p = commands.add_parser("check", help="grade a student folder")
    p.add_argument("folder")
    p.add_argument("--hint", action="store_true", help="show the next hint of each failing exercise")
    p = commands.add_parser("grade", help="grade many student folders into a CSV")
    p.add_argument("folders", nargs="+")
    p.add_argument("--csv", default="grades.csv", help="where to write the table (default grades.csv)")
    p = commands.add_parser("solution", help="the reference code, or the diff that fixes a bug")
    p.add_argument("id")
    p = commands.add_parser("_selfcheck", help=argparse.SUPPRESS)  # for tests/test_exercises.py
    p.add_argument("ids", nargs="*")
    p.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "_selfcheck":
            with tempfile.TemporaryDirectory() as tmp:
                results = selfcheck(args.ids or [ex["id"] for ex in EXERCISES], tmp)
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
            return 0
        if args.command == "list":
            rows = ladder()
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                chapter = None
                for row in rows:
                    if row["chapter"] != chapter:
                        chapter = row["chapter"]
                        print(f"\n[{chapter}] {CHAPTERS[chapter]}")
                    print(f"  {row['id']:26} {row['kind']:5}  {row['file']:13} {'*' * row['difficulty']:3}  "
                          f"{row['title']}")
                n_write = sum(r["kind"] == "write" for r in rows)
                print(f"\n{n_write} write and {len(rows) - n_write} bug exercises")
            return 0
        if args.command == "start":
            print(start(args.names, args.out))
            return 0
        if args.command == "check":
            results = check(args.folder, hint=args.hint)
            return 0 if all(p for p, _ in results.values()) else 1
        if args.command == "grade":
            print(f"wrote {grade(args.folders, args.csv)}")
            return 0
        if args.command == "solution":
            print(solution(args.id))
            return 0
    except ExerciseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
