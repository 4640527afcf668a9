"""Classroom exercises: rebuild GPT-2 piece by piece, and hunt planted bugs, graded by the project's own tests.

Run from the repository root:

    python tests/exercises.py list                    # the ladder: id, kind, file, difficulty, title
    python tests/exercises.py start gelu --out ~/ex   # a student folder: nanogpt2.py with gelu_new blanked
    python tests/exercises.py start attention --out ~/ex   # a whole chapter at once
    python tests/exercises.py start attention-bugs --student "Ada L" --out ~/ex   # this student's own bugs
    python tests/exercises.py check ~/ex              # grade each exercise alone; --hint for the next hint
    python tests/exercises.py check ~/ex --only heads # just these exercises
    python tests/exercises.py check ~/ex --together   # the whole folder as it stands (the end of a chapter)
    python tests/exercises.py solution gelu           # the reference code (for a bug: the diff that fixes it)
    python tests/exercises.py grade ~/class/* --csv grades.csv --assignment attention   # a gradebook

Two kinds of exercise (the catalogue is tests/exercise_catalogue.py):
    write   a function's body is replaced by `raise NotImplementedError(...)`; its docstring is the task.
    bug     one subtle fault is planted in a section of the file; the student is told the section, not the line.

How grading works: each exercise is graded alone. `check` copies the student's files into a temporary folder,
puts the reference's code back into every OTHER started exercise's functions, and runs the exercise's grading
tests (a focused handful of the suite's tests) against that copy, in a subprocess with a time limit and a
memory cap. tests/conftest.py puts the copy first on sys.path (NANOGPT2_STUDENT_DIR), so `import nanogpt2` in
the tests imports it, never the repository's file; tests/exercise_report.py reports each test as JSON, with the
failing example, so nothing here reads pytest's or hypothesis's text. Functions are found by their qualified
name in the syntax tree, never by line number, so the exercises follow the code as it moves.
"""

import argparse
import ast
import csv
import difflib
import functools
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
sys.path.insert(0, TESTS_DIR)

from exercise_catalogue import CHAPTERS, EXERCISES, SLOTS  # noqa: E402

MANIFEST = "exercises.json"
BY_ID = {ex["id"]: ex for ex in EXERCISES}
VARIANTS = {slot: [ex["id"] for ex in EXERCISES if ex.get("slot") == slot] for slot in SLOTS}
STUDENT_FILES = ("nanogpt2.py", "imagegpt.py", "convert_tf.py")
TIME_LIMIT = 120.0  # seconds per exercise (--time-limit)
MEMORY_LIMIT = 4.0  # GiB of address space per exercise (--memory-limit); the tests need under 1


class ExerciseError(Exception):
    """A mistake in using the tool (unknown id, bad folder or option) or a stale catalogue entry."""


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


BANNER = re.compile(r"^# --- (.+?) -{3,}$")  # "# --- Attention -----", "# --- 2. Protobuf by hand -----"
RULE = re.compile(r"^# -{10,}$")  # a part's title stands between two of these


def section_of(source, qualname):
    """The title of the last section banner above the function ('Attention', '2. Protobuf by hand', "GPT-2's
    byte-pair encoding, written out"), or of the part it is in ('Tokenizer'); a comment is never a banner."""
    first, _ = function_span(source, qualname)
    lines = [line.rstrip() for line in source.splitlines()]
    for i in range(first - 1, -1, -1):
        m = BANNER.match(lines[i])
        if m:
            return m.group(1).strip()
        if 0 < i < len(lines) - 1 and lines[i].startswith("# ") and RULE.match(lines[i - 1]) and \
                RULE.match(lines[i + 1]):
            return lines[i][2:].strip()
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


def follow(old_lines, old_origin, new_lines):
    """Where each of `new_lines` came from, for lines also in `old_lines` (None for the others)."""
    origin = [None] * len(new_lines)
    matcher = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
    for a, b, n in matcher.get_matching_blocks():
        origin[b:b + n] = old_origin[a:a + n]
    return origin


# --- Exercises, chapters and drills -----------------------------------------------------------------------------


def expand(names, student=None):
    """Exercise ids, chapter names and slots -> exercise ids, in ladder order, without repeats. A chapter's name
    starts its `write` exercises; CHAPTER-bugs starts its bugs (a bug may sit in a function a write exercise
    blanks). With a student's name, each bug slot that CHAPTER-bugs or the slot's name brings in gives one of
    its variants, drawn from the name (`drill`); a bug named by its own id is always that bug.
    Returns (ids, {slot: the drawn id})."""
    wanted, drills = set(), {}

    def add_bugs(ids):
        for ex_id in ids:
            slot = BY_ID[ex_id].get("slot")
            if student is not None and slot is not None:
                drills[slot] = drill(slot, student)
                wanted.add(drills[slot])
            else:
                wanted.add(ex_id)

    for name in names:
        if name in BY_ID:
            wanted.add(name)
        elif name in SLOTS:
            add_bugs(VARIANTS[name])
        elif name in CHAPTERS:
            wanted.update(ex["id"] for ex in EXERCISES if ex["chapter"] == name and ex["kind"] == "write")
        elif name.endswith("-bugs") and name[:-5] in CHAPTERS:
            add_bugs(ex["id"] for ex in EXERCISES if ex["chapter"] == name[:-5] and ex["kind"] == "bug")
        else:
            raise ExerciseError(f"unknown exercise or chapter {name!r}; `python tests/exercises.py list` shows "
                                f"them all (chapters: {', '.join(CHAPTERS)}, each also as CHAPTER-bugs)")
    return [ex["id"] for ex in EXERCISES if ex["id"] in wanted], drills


def drill(slot, student):
    """The variant of a bug slot that a student gets: a stable hash of the name (the same name, whatever its
    case or spacing, always gets the same bug; Python's hash() changes from run to run)."""
    name = " ".join(student.split()).casefold()
    digest = hashlib.sha256(f"{slot}\0{name}".encode()).digest()
    variants = VARIANTS[slot]
    return variants[int.from_bytes(digest[:8], "big") % len(variants)]


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
        except ExerciseError:
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


def write_atomically(path, text):
    """Write the whole file or nothing: PATH.tmp<PID> beside it (opened like any new file, so the umask sets its
    mode), renamed over it in one step; a leftover of a run that was killed is removed first (as nanogpt2.py's
    saves do)."""
    folder, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(folder):
        found = re.fullmatch(re.escape(name) + r"\.tmp(\d+)", entry)
        if found and not process_alive(int(found.group(1))):
            try:
                os.remove(os.path.join(folder, entry))
            except FileNotFoundError:
                pass
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start(names, out, student=None):
    if student is not None and not student.strip():
        raise ExerciseError(f"--student must be a name, got {student!r}")
    ids, drills = expand(names, student)
    manifest_path = os.path.join(out, MANIFEST)
    if os.path.exists(manifest_path):
        raise ExerciseError(f"--out {out} already holds started exercises; choose a new folder")
    files = student_files(ids)
    os.makedirs(out, exist_ok=True)
    for name, text in files.items():
        write_atomically(os.path.join(out, name), text)
    manifest = {"exercises": ids, "files": sorted(files), "hints_shown": {ex_id: 0 for ex_id in ids},
                "student": student, "drills": drills}
    write_atomically(manifest_path, json.dumps(manifest, indent=1) + "\n")
    lines = [f"Started in {out}" + (f" for {student}:" if student else ":")]
    drilled = set(drills.values())
    for ex_id in ids:
        ex = BY_ID[ex_id]
        task = describe_task(ex, read_repo_file(ex["file"]))
        if ex_id in drilled:  # the slot's title: the variant's own would give the bug away
            lines.append(f"  {ex['slot']:24} {SLOTS[ex['slot']]['title']}\n  {'':24} -> {task}")
        else:
            lines.append(f"  {ex_id:24} {ex['title']}\n  {'':24} -> {task}")
    lines.append(f"Edit the files there, then: python tests/exercises.py check {out}")
    return "\n".join(lines)


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


# --- A student's folder ----------------------------------------------------------------------------------------


def load_folder(folder):
    """What grading needs from a folder, read once. The folder's own problems are never raised: they become its
    `error` (no manifest, not a folder) or a file's entry in `broken` (missing, unreadable, does not parse), so
    that grading a class goes on."""
    state = {"folder": folder, "manifest": None, "texts": {}, "broken": {}, "error": None}
    if not os.path.isdir(folder):
        state["error"] = "not a folder"
        return state
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        state["error"] = f"no {MANIFEST}: this folder was not made by `python tests/exercises.py start`"
        return state
    except (OSError, UnicodeDecodeError, ValueError) as e:
        state["error"] = f"{MANIFEST} cannot be read ({e})"
        return state
    if not (isinstance(manifest, dict) and isinstance(manifest.get("exercises"), list)
            and all(isinstance(i, str) for i in manifest["exercises"])):
        state["error"] = f"{MANIFEST} is not one that `start` wrote (it has no list of exercise ids)"
        return state
    for key, empty in (("hints_shown", {}), ("drills", {})):
        if not isinstance(manifest.get(key), dict):
            manifest[key] = empty
    if not isinstance(manifest.get("student"), str):
        manifest["student"] = None
    state["manifest"] = manifest
    for name in sorted({BY_ID[i]["file"] for i in manifest["exercises"] if i in BY_ID}):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                text = f.read()
            compile(text, name, "exec", dont_inherit=True)
        except FileNotFoundError:
            state["broken"][name] = f"{name} is missing from the folder"
        except SyntaxError as e:
            state["broken"][name] = f"{name} does not parse: line {e.lineno}: {e.msg}"
        except (OSError, UnicodeDecodeError, ValueError) as e:
            state["broken"][name] = f"{name} cannot be read ({e})"
        else:
            state["texts"][name] = text
    return state


def graded_copy(state, ex_id, together=False):
    """The files exercise `ex_id` is graded on: ({name: text}, {name: origin}, notes). Graded alone (the default),
    every other started exercise's functions hold the reference's code, so the exercise passes or fails on its
    own code; a planted bug that shares a function with this exercise has its text put back instead. `origin`
    maps each line to the student's line number (None for code put back), to point at the student's line.
    Each file is parsed once: the functions are replaced from the bottom up, so that no span moves."""
    texts = dict(state["texts"])
    origins = {name: list(range(1, len(text.splitlines()) + 1)) for name, text in texts.items()}
    notes = []
    if together:
        return texts, origins, notes
    mine = set(BY_ID[ex_id]["functions"])
    plans = {}  # file -> {qualname: "reference" or [(old, new) of planted bugs to undo]}
    started = list(state["manifest"]["exercises"])
    # A write exercise taken out of exercises.json by hand still leaves its stub, which would fail this one.
    started += [other for other, ex in BY_ID.items() if ex["kind"] == "write" and other not in started
                and f'NotImplementedError("exercise {other}:' in texts.get(ex["file"], "")]
    for other in started:
        if other == ex_id or other not in BY_ID or BY_ID[other]["file"] not in texts:
            continue
        ex = BY_ID[other]
        plan = plans.setdefault(ex["file"], {})
        for qualname, old, new in [(q, None, None) for q in ex["functions"]] if ex["kind"] == "write" else ex["edits"]:
            if qualname not in mine:
                plan[qualname] = "reference"
            elif old is not None:
                plan.setdefault(qualname, []).append((old, new))
    for name, plan in plans.items():
        text, reference = texts[name], read_repo_file(name)
        lines, origin, spans = text.splitlines(keepends=True), origins[name], []
        for qualname, action in plan.items():
            try:
                first, last = function_span(text, qualname)
                if action == "reference":
                    new_lines = function_source(reference, qualname).splitlines(keepends=True)
                    spans.append((first, last, new_lines, [None] * len(new_lines)))
                    continue
            except ExerciseError:
                notes.append(f"{qualname} is not in your {name}, so the reference's could not be put back")
                continue
            body = "".join(lines[first:last + 1])
            for old, new in action:
                if new and body.count(new) == 1:
                    body = body.replace(new, old)
            new_lines = body.splitlines(keepends=True)
            spans.append((first, last, new_lines, follow(lines[first:last + 1], origin[first:last + 1], new_lines)))
        for first, last, new_lines, new_origin in sorted(spans, key=lambda span: span[0], reverse=True):
            lines[first:last + 1], origin[first:last + 1] = new_lines, new_origin
        texts[name] = "".join(lines)
    return texts, origins, notes


def units_of(state, names=None):
    """What is graded in one folder: [(column, exercise id or None when not started, problem or None)], in
    ladder order. `names` is the teacher's list (ids, chapters, CHAPTER-bugs, slots); without it, the folder's
    own manifest. In a drill folder (started with --student), a bug slot is one column, graded on the variant
    the student's name draws."""
    manifest = state["manifest"] or {"exercises": [], "drills": {}, "student": None}
    started, drills, student = set(manifest["exercises"]), manifest["drills"], manifest["student"]
    units = {}

    def add(ex_id, as_slot=False):
        slot = BY_ID[ex_id].get("slot")
        if slot in drills:
            if slot not in units:
                drawn = drill(slot, student) if student else drills[slot]
                problem = None if drills[slot] == drawn else \
                    f"{MANIFEST} says drill {slot} is {drills[slot]}, but {student!r} draws {drawn} (was it edited?)"
                units[slot] = (drawn if drawn in started else None, problem)
        elif as_slot and slot is not None and not started & set(VARIANTS[slot]):
            units[slot] = (None, None)  # a slot due, started by none of its variants: one column, as in a drill
        elif ex_id not in units:
            units[ex_id] = (ex_id if ex_id in started else None, None)

    for name in (names if names is not None else manifest["exercises"]):
        if name in BY_ID:
            add(name)
        elif name in SLOTS:
            for ex_id in VARIANTS[name]:
                add(ex_id, as_slot=True)
        elif name in CHAPTERS or name.endswith("-bugs") and name[:-5] in CHAPTERS:
            kind, chapter = ("bug", name[:-5]) if name.endswith("-bugs") else ("write", name)
            for ex in EXERCISES:
                if ex["chapter"] == chapter and ex["kind"] == kind:
                    add(ex["id"], as_slot=True)
        elif names is None:  # the folder's manifest names an exercise the catalogue no longer has
            units[name] = (None, f"{name} is not in the catalogue (any more?)")
        else:
            raise ExerciseError(f"unknown exercise, slot or chapter {name!r}; `python tests/exercises.py list` "
                                "shows them all")
    return sorted(((column, ex_id, problem) for column, (ex_id, problem) in units.items()), key=lambda u: order(u[0]))


def order(column):
    ids = VARIANTS.get(column) or [column]
    return min((i for i, ex in enumerate(EXERCISES) if ex["id"] in ids), default=len(EXERCISES))


def weight_of(column, weights):
    """Points for passing: --weights FILE's value, else the catalogue's weight, else the difficulty (1 to 3)."""
    if column in weights:
        return weights[column]
    if column in SLOTS:
        return SLOTS[column].get("weight", max(BY_ID[i]["difficulty"] for i in VARIANTS[column]))
    if column in BY_ID:
        return BY_ID[column].get("weight", BY_ID[column]["difficulty"])
    return 1


def title_of(column):
    return SLOTS[column]["title"] if column in SLOTS else BY_ID[column]["title"] if column in BY_ID else column


# --- Running one exercise's grading tests -----------------------------------------------------------------------


class Limits:
    """What one exercise's tests may use: seconds of wall time and GiB of address space."""

    def __init__(self, time=TIME_LIMIT, memory=MEMORY_LIMIT):
        self.time, self.memory = time, memory


def pytest_command(tests):
    # Every grading test runs (no -x), so that the gradebook can count them; the report shows the first failure.
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "exercise_report", "--tb=no",
            "--no-header", "-rN", "-W", "ignore", *tests]


def cap_memory(gib):
    """In the child before it starts: a cap on its address space, so a huge allocation fails there, as a
    MemoryError or torch's "can't allocate memory", instead of stalling the machine."""
    cap = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def launch(task, limits):
    """Start the exercise's grading tests on its graded copy, in a subprocess of its own (its own session, so a
    timeout ends whatever it started too)."""
    tmp = tempfile.mkdtemp(prefix="exercise-")
    src = os.path.join(tmp, "src")
    os.mkdir(src)
    for name, text in task["texts"].items():
        with open(os.path.join(src, name), "w", encoding="utf-8") as f:
            f.write(text)
    # CUDA_VISIBLE_DEVICES="": grading runs on the CPU, the same on every machine (a CUDA context would also
    # reserve more address space than the memory cap allows).
    env = dict(os.environ, NANOGPT2_STUDENT_DIR=src, EXERCISE_SOURCES=src, HYPOTHESIS_PROFILE="grading",
               CUDA_VISIBLE_DEVICES="",
               EXERCISE_REPORT=os.path.join(tmp, "report.jsonl"), EXERCISE_TIME_LIMIT=str(limits.time),
               PYTHONPATH=os.pathsep.join([TESTS_DIR, *filter(None, [os.environ.get("PYTHONPATH")])]))
    output = open(os.path.join(tmp, "output.txt"), "w", encoding="utf-8")
    task.update(tmp=tmp, output=output, began=time.monotonic(), killed=False)
    task["proc"] = subprocess.Popen(pytest_command(BY_ID[task["ex_id"]]["tests"]), cwd=REPO, env=env,
                                    stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=lambda: cap_memory(limits.memory))


def stop(task):
    try:
        os.killpg(task["proc"].pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    task["proc"].wait()


def run_tasks(tasks, jobs, limits, done=None):
    """Run the tasks, `jobs` at a time, from this one thread (subprocesses, polled: no threads, so the memory cap
    can be set in the child safely). Each task gets its "result"; done(task) is called as each one ends."""
    pending, running = list(tasks), []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                task = pending.pop(0)
                launch(task, limits)
                running.append(task)
            time.sleep(0.05)
            for task in list(running):
                # The child stops itself at the limit (faulthandler, with its stack); this is the backstop.
                if task["proc"].poll() is None and time.monotonic() - task["began"] > limits.time + 15:
                    task["killed"] = True
                    stop(task)
                if task["proc"].poll() is not None:
                    running.remove(task)
                    task["result"] = summarise(task, limits)
                    if done is not None:
                        done(task)
    finally:
        for task in running:
            stop(task)
            task["output"].close()
            shutil.rmtree(task["tmp"], ignore_errors=True)


def read_back(task):
    """The child's JSON lines, its stack dump (if the time limit stopped it) and the end of its output."""
    task["output"].close()
    records = []
    try:
        with open(os.path.join(task["tmp"], "report.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:  # the last line of a process that was killed mid-write
                    pass
    except FileNotFoundError:
        pass

    def read(name):
        try:
            with open(os.path.join(task["tmp"], name), encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    stack, output = read("report.jsonl.stack"), read("output.txt")
    shutil.rmtree(task["tmp"], ignore_errors=True)
    return records, stack, output


def summarise(task, limits):
    """{status: pass | fail | error, message, passed, total, seconds, test} from what the child reported."""
    records, stack, output = read_back(task)
    code = task["proc"].returncode
    seconds = time.monotonic() - task["began"]
    results = [r for r in records if r["event"] == "result"]
    ran = [r for r in results if r["outcome"] != "skipped"]
    collected = next((r["tests"] for r in records if r["event"] == "collected"), [])
    skipped = sum(r["outcome"] == "skipped" for r in results)
    result = {"status": "fail", "message": "", "passed": sum(r["outcome"] == "passed" for r in ran),
              "total": max(len(collected) - skipped, len(ran)), "seconds": seconds, "test": None}
    finished = {r["test"] for r in results}
    running = next((r["test"] for r in reversed(records) if r["event"] == "start" and r["test"] not in finished),
                   None)
    problem = next((r for r in records if r["event"] in ("import-error", "collect-error")), None)
    failed = next((r for r in ran if r["outcome"] == "failed"), None)
    stopped = task["killed"] or stack.strip()
    if problem is not None and problem["event"] == "import-error":
        result["message"] = [f"your {problem['module']}.py fails when it is imported:",
                             *explain(problem["failure"], task)]
    elif problem is not None:
        result["message"] = ["the grading tests could not be loaded with your files:", *explain(problem["failure"],
                                                                                                task)]
    elif failed is not None:
        result["test"] = failed["test"]
        result["message"] = [f"{test_label(failed['test'])} failed:", *explain(failed["failure"], task)]
    elif stopped:
        result["status"] = "error"
        during = f", while running {test_label(running)}" if running else ""
        result["message"] = [f"stopped after {limits.time:g} s{during}: {where_stuck(stack, task)}"]
    elif code < 0 or running:
        try:
            how = f"died ({signal.Signals(-code).name})" if code < 0 else f"exited with code {code}"
        except ValueError:
            how = f"died (signal {-code})"
        why = f"over the {limits.memory:g} GiB memory cap, or a crash inside torch?" if code < 0 else \
            "does your code end the process (os._exit)?"
        result["status"] = "error"
        result["message"] = [f"the test process {how}" + (f" while running {test_label(running)}" if running else "")
                             + f": {why}"]
    elif not ran:
        reasons = sorted({r["skip"] for r in results if r.get("skip")})
        result["status"] = "error"
        result["message"] = ["its grading tests did not run" + (": " + "; ".join(reasons) if reasons else "") +
                             ("" if reasons else f" (pytest exit code {code}: {last_line(output)})")]
    elif code != 0:
        result["status"] = "error"
        result["message"] = [f"pytest exit code {code}: {last_line(output)}"]
    else:
        result["status"] = "pass"
    if failed is not None and stopped:
        result["message"].append(f"(then it was stopped after {limits.time:g} s: {where_stuck(stack, task)})")
    if result["status"] != "pass" and task["notes"]:
        result["message"] += [f"(note: {note})" for note in task["notes"]]
    result["message"] = "\n".join(result["message"])
    return result


def last_line(output):
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "no output"


def test_label(node_id):
    """'test_x[cpu] (tests/test_y.py)'."""
    path, _, name = node_id.partition("::")
    return f"{name} ({path})"


# --- Failures in plain words -----------------------------------------------------------------------------------

COMMON_MISTAKES = [
    (r"view size is not compatible with input tensor's size and stride",
     "a view of a tensor that a transpose (or a slice) left non-contiguous: its memory is no longer in order"),
    (r"shapes cannot be multiplied", "the two sides of a matrix product do not line up: print both shapes"),
    (r"must match the size of tensor b", "two tensors whose shapes do not broadcast together: print both shapes"),
    (r"can't allocate memory|out of memory|MemoryError|Cannot allocate memory",
     "it ran out of memory (each exercise may use {memory:g} GiB): is a tensor far bigger than it should be?"),
    (r"'NoneType' object", "a value is None where something else was expected: is a `return` missing?"),
    (r"Expected all tensors to be on the same device", "a new tensor made without device=... of the inputs"),
    (r"failed to map segment|cannot allocate memory in static TLS",
     "the memory cap ({memory:g} GiB) is too small for torch on this machine: raise --memory-limit"),
]


def student_line(task, file, line):
    """(line number in the student's file, its text) of a line of the graded copy, or None for code put back."""
    origin = task["origins"].get(file)
    if origin is None or not 1 <= line <= len(origin) or origin[line - 1] is None:
        return None
    number = origin[line - 1]
    return number, task["student_texts"][file].splitlines()[number - 1].strip()


def where(frames, task, assertion):
    """Where it was raised, in the student's terms: their file, function and line."""
    ours = [f for f in frames if f[3]]
    if ours:
        file, line, function, _ = ours[-1]
        found = student_line(task, file, line)
        if found:
            return [f"raised in your {file}, line {found[0]}, in {function}:", f"    {found[1]}"]
        caller = next(((f, student_line(task, f[0], f[1])) for f in reversed(ours) if student_line(task, f[0], f[1])),
                      None)
        put = f"raised in {function} (the reference's code, put back while this exercise is graded alone)"
        if caller:
            (file2, _, function2, _), (number, text) = caller
            return [f"{put}, called from your {file2}, line {number}, in {function2}:", f"    {text}"]
        return [f"{put}: what your code gave it was probably wrong"]
    tests = [f for f in frames if not f[3]]
    if tests and assertion:
        return [f"found by the test's check ({tests[-1][0]}, line {tests[-1][1]}): your code ran without an error, "
                "but what it gave was wrong"]
    if tests:
        return [f"raised in the test ({tests[-1][0]}, line {tests[-1][1]}, in {tests[-1][2].split('.')[-1]})"]
    return []


def explain(failure, task):
    """A failure record from tests/exercise_report.py -> lines of plain words: what went wrong, where in the
    student's file, and the failing example (config fields at their defaults already dropped)."""
    kind, message = failure["type"], failure["message"]
    if kind == "NotImplementedError" and message.startswith("exercise "):
        qualname = message.split("write ", 1)[-1]
        return [f"still not written: {qualname} raises NotImplementedError"]
    assertion = kind == "AssertionError"
    text = message if assertion and message else f"{kind}: {message}" if message else kind
    lines = text.splitlines() or [kind]
    lines += where(failure["frames"], task, assertion)
    for pattern, words in COMMON_MISTAKES:
        if re.search(pattern, f"{kind}: {message}"):
            lines.append("what this usually means: " + words.format(memory=task["memory"]))
            break
    shown = [(k, v) for k, v in failure.get("params") or [] if k != "device"]
    if shown:
        lines.append("with " + ", ".join(f"{k}={v}" for k, v in shown))
    if failure.get("example"):
        lines.append("smallest failing example:" if failure.get("shrunk") else "failing example:")
        for name, value in failure["example"]:
            lines += textwrap.wrap(f"{name}={value}", 110, initial_indent="    ",
                                   subsequent_indent=" " * (5 + len(name)), break_on_hyphens=False)
    return lines


def where_stuck(stack, task):
    """The innermost frame of the student's files in faulthandler's dump of the stopped process."""
    for m in re.finditer(r'File "([^"]+)", line (\d+) in (\S+)', stack):  # most recent call first
        path, line, function = m.group(1), int(m.group(2)), m.group(3)
        if os.path.basename(os.path.dirname(path)) == "src" and os.path.basename(path) in task["origins"]:
            found = student_line(task, os.path.basename(path), line)
            if found:
                return f"still running your {os.path.basename(path)}, line {found[0]}, in {function} (an endless " \
                       f"loop?):\n    {found[1]}"
            return f"still running {function} of {os.path.basename(path)} (the reference's code): is something " \
                   "your code gave it far too big?"
    return "not inside your files: the machine may be too busy (try a longer --time-limit)"


# --- check: one folder ------------------------------------------------------------------------------------------


def make_task(state, column, ex_id, together, limits):
    texts, origins, notes = graded_copy(state, ex_id, together)
    return {"folder": state["folder"], "column": column, "ex_id": ex_id, "texts": texts, "origins": origins,
            "notes": notes, "student_texts": state["texts"], "memory": limits.memory}


def grade_folder(state, names, together, limits, only=None):
    """The columns of one folder (all, or those --only picks), the tasks that will grade them, and the cells
    that need no run, filled now."""
    cells, tasks = {}, []
    if state["error"] is not None:
        return [], tasks, cells
    units = units_of(state, names)
    columns = [u[0] for u in units]
    if only:
        columns = parse_only(only, state, columns)
    for column, ex_id, problem in units:
        if column not in columns:
            continue
        if problem is not None:
            cells[column] = {"status": "error", "message": problem, "passed": 0, "total": 0}
        elif ex_id is None:
            cells[column] = {"status": "not started", "message": "", "passed": 0, "total": 0}
        elif BY_ID[ex_id]["file"] in state["broken"]:
            cells[column] = {"status": "error", "message": state["broken"][BY_ID[ex_id]["file"]], "passed": 0,
                             "total": 0, "broken": True}
        elif missing_functions(state, ex_id):
            cells[column] = {"status": "fail", "message": f"your {BY_ID[ex_id]['file']} has no "
                             f"{', '.join(missing_functions(state, ex_id))} (renamed or deleted?)", "passed": 0,
                             "total": 0}
        else:
            tasks.append(make_task(state, column, ex_id, together, limits))
    return columns, tasks, cells


def missing_functions(state, ex_id):
    ex = BY_ID[ex_id]
    text = state["texts"][ex["file"]]
    missing = []
    for qualname in ex["functions"]:
        try:
            find_function(parse(text), qualname)
        except ExerciseError:
            missing.append(qualname)
    return missing


def parse_only(only, state, columns):
    """--only's names -> the columns of this folder they pick; a name that picks nothing is refused."""
    manifest = state["manifest"]
    picked = []
    for name in only:
        if name in CHAPTERS or name.endswith("-bugs") and name[:-5] in CHAPTERS:
            ids = {i for i in expand([name])[0]}
            hits = [c for c in columns if c in ids or c in SLOTS and set(VARIANTS[c]) & ids]
        elif name in BY_ID:
            slot = BY_ID[name].get("slot")
            hits = [c for c in columns if c == name or c == slot and manifest["drills"].get(slot) == name]
        else:
            hits = [c for c in columns if c == name]
        if not hits:
            raise ExerciseError(f"--only {name}: not among the exercises graded in {state['folder']} (they are: "
                                f"{', '.join(columns) or 'none'})")
        picked += [c for c in hits if c not in picked]
    return [c for c in columns if c in picked]


def check(folder, only=None, together=False, hint=False, jobs=None, limits=None, assignment=None,
          gradescope=None, out=sys.stdout):
    """Grade one folder and print the report. Returns {column: cell}."""
    limits = limits or Limits()
    state = load_folder(folder)
    if state["error"] is not None:
        if gradescope:  # the autograder still gets its results.json: zero, and why
            write_atomically(gradescope, json.dumps(gradescope_results(state, assigned_columns(assignment), {}, {}),
                                                    indent=1) + "\n")
        raise ExerciseError(f"{folder}: {state['error']}")
    columns, tasks, cells = grade_folder(state, assignment, together, limits, only)
    if not columns:
        raise ExerciseError(f"{folder}: nothing to grade (its {MANIFEST} lists no exercises)")
    for name, reason in state["broken"].items():
        hit = [c for c in columns if cells.get(c, {}).get("broken") and BY_ID[unit_id(state, c)]["file"] == name]
        if hit:
            print(f"{reason}\n  fix it first: until it parses, {', '.join(hit)} cannot be graded", file=out)
    printed = []

    def show():  # print the cells in ladder order as soon as every one before them is known
        for column in columns[len(printed):]:
            if column not in cells:
                return
            report_cell(state, column, cells[column], hint, out)
            printed.append(column)
            out.flush()  # each result as it comes, even through a pipe

    def done(task):
        cells[task["column"]] = task["result"]
        show()

    show()
    run_tasks(tasks, jobs or default_jobs(len(tasks)), limits, done=done)
    if hint:
        write_atomically(os.path.join(folder, MANIFEST), json.dumps(state["manifest"], indent=1) + "\n")
    n_pass = sum(cells[c]["status"] == "pass" for c in columns)
    alone = "" if together or len(columns) < 2 else \
        " (each graded alone, with the reference's code in the others; --together grades your files as they stand)"
    print(f"{n_pass} of {len(columns)} exercises pass{alone}", file=out)
    if gradescope:
        write_atomically(gradescope, json.dumps(gradescope_results(state, columns, cells, {}), indent=1) + "\n")
    return {c: cells[c] for c in columns}


def unit_id(state, column):
    """The exercise a column grades in this folder (a drill's variant for a slot)."""
    if column in SLOTS and state["manifest"] is not None:
        return state["manifest"]["drills"].get(column) or VARIANTS[column][0]
    return column


def report_cell(state, column, cell, hint, out):
    ex_id = unit_id(state, column) if column in BY_ID or column in SLOTS else None
    status = {"pass": "PASS", "fail": "FAIL", "error": "ERROR", "not started": "NOT STARTED"}[cell["status"]]
    counts = f"{cell['passed']} of {cell['total']} tests pass, " if cell.get("total") else ""
    seconds = f"{cell['seconds']:.0f} s" if "seconds" in cell else ""
    extra = f"  ({counts}{seconds})" if counts or seconds else ""
    print(f"{status:5} {column}: {title_of(column)}{extra}", file=out)
    if cell["status"] in ("pass", "not started") or cell.get("broken"):
        return
    for line in cell["message"].splitlines():
        print(wrap(line), file=out)
    if hint and cell["status"] == "fail" and ex_id in BY_ID:
        hints = BY_ID[ex_id]["hints"]
        shown = state["manifest"]["hints_shown"].get(ex_id, 0)
        if shown < len(hints):
            print(wrap(f"hint {shown + 1} of {len(hints)}: {hints[shown]}"), file=out)
            state["manifest"]["hints_shown"][ex_id] = shown + 1
        else:
            print(f"      no more hints; `python tests/exercises.py solution {ex_id}` shows the answer", file=out)


def wrap(line, width=116):
    """A line of a report, indented under its exercise and folded at the width; code (indented) is never folded."""
    if line.startswith(" ") or len(line) + 6 <= width:
        return "      " + line
    return "\n".join(textwrap.wrap(line, width, initial_indent="      ", subsequent_indent="        ",
                                   break_on_hyphens=False, break_long_words=False))


def default_jobs(n):
    return max(1, min(n, len(os.sched_getaffinity(0))))


# --- grade: a class ---------------------------------------------------------------------------------------------


def read_weights(path):
    """--weights FILE: a JSON object {exercise id or slot: points}."""
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            weights = json.load(f)
    except (OSError, ValueError) as e:
        raise ExerciseError(f"--weights {path}: cannot be read as JSON ({e})") from None
    if not isinstance(weights, dict):
        raise ExerciseError(f"--weights {path}: expected a JSON object {{\"id\": points}}, got a "
                            f"{type(weights).__name__}")
    for key, value in weights.items():
        if key not in BY_ID and key not in SLOTS:
            raise ExerciseError(f"--weights {path}: {key!r} is not an exercise id or slot (see `list`)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ExerciseError(f"--weights {path}: {key}'s weight must be a number >= 0, got {value!r}")
    return weights


def row_of(state, columns, cells, weights):
    """One gradebook row: cells, points, total, hints used, tests passed and run, and the notes."""
    notes = [state["error"]] if state["error"] else []
    notes += [reason for _, reason in sorted(state["broken"].items())]
    for column in columns:
        cell = cells.get(column)
        if cell and cell["status"] in ("fail", "error") and cell["message"] and not cell.get("broken"):
            notes.append(f"{column}: {reason(cell)}")
    points = sum(weight_of(c, weights) for c in columns if cells.get(c, {}).get("status") == "pass")
    total = sum(weight_of(c, weights) for c in columns)
    shown = state["manifest"]["hints_shown"] if state["manifest"] else {}
    hints = sum(shown.get(unit_id(state, c), 0) for c in columns if isinstance(shown.get(unit_id(state, c)), int))
    return {"cells": {c: cells.get(c, {}).get("status", "") for c in columns}, "points": points, "total": total,
            "hints": hints, "tests passed": sum(cells.get(c, {}).get("passed", 0) for c in columns),
            "tests": sum(cells.get(c, {}).get("total", 0) for c in columns), "notes": "; ".join(notes)}


def reason(cell):
    """A cell's message in one line for the gradebook's notes: why it failed, without the test's name."""
    lines = [line.strip() for line in cell["message"].splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(" failed:"):
        lines = lines[1:]
    text = " ".join(lines[:2])
    return text if len(text) <= 240 else text[:230] + "..."


def number(x):
    return f"{x:g}"


def gradescope_results(state, columns, cells, weights):
    """Gradescope's autograder results.json: the score, and one test per exercise with its own score."""
    tests = []
    for column in columns:
        cell = cells.get(column, {"status": "error", "message": state["error"] or "", "passed": 0, "total": 0})
        w = weight_of(column, weights)
        passed = cell["status"] == "pass"
        words = {"pass": "passed", "fail": "failed", "error": "could not be graded", "not started": "not started"}
        output = words[cell["status"]] + (f":\n{cell['message']}" if cell["message"] else ".")
        if cell.get("total"):
            output = f"{cell['passed']} of {cell['total']} grading tests pass; {output}"
        tests.append({"name": f"{column}: {title_of(column)}", "score": w if passed else 0, "max_score": w,
                      "status": "passed" if passed else "failed", "output": output, "visibility": "visible"})
    result = {"score": sum(t["score"] for t in tests), "tests": tests}
    if state["error"]:
        result["output"] = state["error"]
    return result


def assigned_columns(assignment):
    """The columns a teacher's list gives a folder that started nothing; unknown names are refused here, before
    any work."""
    if assignment is None:
        return []
    return [u[0] for u in units_of({"manifest": None}, assignment)]


def grade(folders, csv_path, assignment=None, weights_path=None, jobs=None, limits=None, gradescope_dir=None,
          together=False, log=sys.stderr):
    """Grade every folder into one CSV, written once, atomically, at the end; a row for each folder, always."""
    limits = limits or Limits()
    weights = read_weights(weights_path)
    assigned = assigned_columns(assignment)
    missing = [f for f in folders if not os.path.exists(f)]
    if missing:
        raise ExerciseError(f"no such folder: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                else ""))
    if csv_path and not os.path.isdir(os.path.dirname(os.path.abspath(csv_path))):
        raise ExerciseError(f"--csv {csv_path}: its folder does not exist")
    states = [load_folder(f) for f in folders]
    plans = [grade_folder(state, assignment, together, limits) for state in states]
    for state, plan in zip(states, plans):
        if state["error"] is not None:  # a row of errors: for the teacher's list, or nothing without one
            plan[0].extend(assigned)
            plan[2].update({c: {"status": "error", "message": "", "passed": 0, "total": 0} for c in assigned})
    every_column = sorted({c for columns, _, _ in plans for c in columns}, key=order)
    waiting = [len(tasks) for _, tasks, _ in plans]

    def report(i):
        state, (columns, _, cells) = states[i], plans[i]
        if state["error"]:
            print(f"{state['folder']}: {state['error']}", file=log)
            return
        row = row_of(state, columns, cells, weights)
        print(f"{state['folder']}: {sum(v == 'pass' for v in row['cells'].values())} of {len(columns)} pass, "
              f"{number(row['points'])} of {number(row['total'])} points", file=log)

    for i, n in enumerate(waiting):
        if n == 0:
            report(i)
    owner = {id(t): i for i, (_, tasks, _) in enumerate(plans) for t in tasks}

    def done(task):
        i = owner[id(task)]
        plans[i][2][task["column"]] = task["result"]
        waiting[i] -= 1
        if waiting[i] == 0:
            report(i)

    all_tasks = [t for _, tasks, _ in plans for t in tasks]
    run_tasks(all_tasks, jobs or default_jobs(len(all_tasks)), limits, done=done)
    table = [["folder", *every_column, "points", "total", "hints used", "tests passed", "tests", "notes"]]
    for state, (columns, _, cells) in zip(states, plans):
        row = row_of(state, columns, cells, weights)
        outside = "error" if state["error"] else "not started"  # columns other folders have
        table.append([state["folder"], *[row["cells"].get(c, outside) for c in every_column], number(row["points"]),
                      number(row["total"]), row["hints"], row["tests passed"], row["tests"], row["notes"]])
    if csv_path:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(table)
        write_atomically(csv_path, buffer.getvalue())
    if gradescope_dir:
        write_gradescope_dir(gradescope_dir, states, plans, weights)
    return table


def write_gradescope_dir(gradescope_dir, states, plans, weights):
    """DIR/<folder's name>/results.json for each folder (a name used twice gets -2, -3, ...)."""
    os.makedirs(gradescope_dir, exist_ok=True)
    used = set()
    for state, (columns, _, cells) in zip(states, plans):
        name = re.sub(r"[^\w.-]", "_", os.path.basename(os.path.normpath(state["folder"]))) or "folder"
        unique, k = name, 2
        while unique in used:
            unique, k = f"{name}-{k}", k + 1
        used.add(unique)
        os.makedirs(os.path.join(gradescope_dir, unique), exist_ok=True)
        write_atomically(os.path.join(gradescope_dir, unique, "results.json"),
                         json.dumps(gradescope_results(state, columns, cells, weights), indent=1) + "\n")


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
             "chapter": ex["chapter"], "title": ex["title"], "slot": ex.get("slot"),
             "weight": weight_of(ex["id"], {}),
             "functions": ex["functions"] if ex["kind"] == "write" else [],
             "tests": ex["tests"]} for ex in EXERCISES]


def ladder_text():
    """What `list` prints (docs/exercises.md's ladder is this text, and a test keeps it so)."""
    lines, chapter = [], None
    for row in ladder():
        if row["chapter"] != chapter:
            chapter = row["chapter"]
            lines.append(f"\n[{chapter}] {CHAPTERS[chapter]}")
        slot = f"  (drill {row['slot']})" if row["slot"] else ""
        lines.append(f"  {row['id']:26} {row['kind']:5}  {row['file']:13} {'*' * row['difficulty']:3}  "
                     f"{row['title']}{slot}")
    n_write = sum(ex["kind"] == "write" for ex in EXERCISES)
    lines.append(f"\n{n_write} write and {len(EXERCISES) - n_write} bug exercises; {len(SLOTS)} drill slots, each "
                 "one bug of several drawn from the student's name (start CHAPTER-bugs --student NAME)")
    return "\n".join(lines).lstrip("\n")


def positive(kind, option, minimum):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} expects a number, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{option} must be at least {minimum}, got {text}")
        return value
    return parse


def add_limits(p):
    p.add_argument("--jobs", type=positive(int, "--jobs", 1), metavar="N",
                   help="exercises graded at once (default: the number of CPU cores)")
    p.add_argument("--time-limit", type=positive(float, "--time-limit", 1), default=TIME_LIMIT, metavar="S",
                   help=f"seconds each exercise's tests may run (default {TIME_LIMIT:g})")
    p.add_argument("--memory-limit", type=positive(float, "--memory-limit", 1), default=MEMORY_LIMIT, metavar="GIB",
                   help=f"GiB of memory each exercise's tests may map (default {MEMORY_LIMIT:g})")
    p.add_argument("--together", action="store_true",
                   help="grade the files as they stand (the whole model), not each exercise alone")
    p.add_argument("--assignment", nargs="+", metavar="NAME",
                   help="what is graded: exercise ids, chapters, CHAPTER-bugs, drill slots (default: the folder's "
                        f"{MANIFEST})")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python tests/exercises.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("list", help="the ladder of exercises")
    p.add_argument("--json", action="store_true", help="as a JSON list of objects")
    p = commands.add_parser("start", help="write a student folder for exercises or chapters")
    p.add_argument("names", nargs="+", metavar="ID", help="exercise ids, chapters, CHAPTER-bugs or drill slots")
    p.add_argument("--out", required=True, help="the student folder to create")
    p.add_argument("--student", metavar="NAME", help="draw this student's own bug of each drill slot from the name")
    p = commands.add_parser("check", help="grade a student folder, each exercise alone")
    p.add_argument("folder")
    p.add_argument("--only", nargs="+", metavar="ID", help="grade only these exercises (ids, slots or chapters)")
    p.add_argument("--hint", action="store_true", help="show the next hint of each failing exercise")
    p.add_argument("--gradescope", metavar="FILE", help="also write Gradescope's results.json there")
    add_limits(p)
    p = commands.add_parser("grade", help="grade many student folders into one gradebook")
    p.add_argument("folders", nargs="+")
    p.add_argument("--csv", default="grades.csv", help="where to write the gradebook (default grades.csv)")
    p.add_argument("--weights", metavar="FILE", help="a JSON object {exercise id or slot: points}")
    p.add_argument("--gradescope-dir", metavar="DIR", help="also write DIR/<folder>/results.json for Gradescope")
    add_limits(p)
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
            print(json.dumps(ladder(), indent=1) if args.json else ladder_text())
            return 0
        if args.command == "start":
            print(start(args.names, args.out, args.student))
            return 0
        if args.command == "solution":
            print(solution(args.id))
            return 0
        limits = Limits(args.time_limit, args.memory_limit)
        if args.command == "check":
            assigned_columns(args.assignment)  # unknown names: refused before any work
            cells = check(args.folder, only=args.only, together=args.together, hint=args.hint, jobs=args.jobs,
                          limits=limits, assignment=args.assignment, gradescope=args.gradescope)
            return 0 if all(cell["status"] == "pass" for cell in cells.values()) else 1
        if args.command == "grade":
            grade(args.folders, args.csv, assignment=args.assignment, weights_path=args.weights, jobs=args.jobs,
                  limits=limits, gradescope_dir=args.gradescope_dir, together=args.together)
            print(f"wrote {args.csv} ({len(args.folders)} rows)" +
                  (f" and {args.gradescope_dir}/*/results.json" if args.gradescope_dir else ""))
            return 0
    except ExerciseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped (nothing was written)", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
