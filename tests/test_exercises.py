"""The classroom exercises prove themselves: every entry of the catalogue applies to the code as it is now, every
blanked function and every planted bug makes its grading tests fail (so the suite, which runs those tests, catches
it too), and the command line does a whole exercise from start to a passing check.

The catch test runs every exercise's grading tests in two worker processes (torch imported once in each), on
the "exercises" hypothesis profile: CI's derandomized examples, so a catch is never luck, without shrinking.
"""

import ast
import csv
import functools
import json
import os
import subprocess
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
sys.path.insert(0, TESTS_DIR)

import exercises  # noqa: E402
from exercise_catalogue import CHAPTERS, EXERCISES  # noqa: E402

CLI = [sys.executable, os.path.join("tests", "exercises.py")]


def run_cli(*args, env=None):
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_the_ladder_has_enough_exercises_of_each_kind_in_every_file():
    rows = json.loads(run_cli("list", "--json").stdout)
    assert {"id", "kind", "file", "title"} <= set(rows[0])
    writes = [r for r in rows if r["kind"] == "write"]
    bugs = [r for r in rows if r["kind"] == "bug"]
    assert len(writes) >= 24 and len(bugs) >= 30, (len(writes), len(bugs))
    files = {"nanogpt2.py", "imagegpt.py", "convert_tf.py"}
    assert {r["file"] for r in writes} == files and {r["file"] for r in bugs} == files


@functools.lru_cache(maxsize=None)
def defined_tests(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("ex", EXERCISES, ids=[ex["id"] for ex in EXERCISES])
def test_catalogue_entry_is_complete_and_applies_to_the_code_as_it_is(ex):
    assert ex["kind"] in ("write", "bug") and ex["chapter"] in CHAPTERS and ex["difficulty"] in (1, 2, 3)
    assert ex["title"] and 1 <= len(ex["hints"]) <= 3 and ex["tests"]
    for node_id in ex["tests"]:
        path, name = node_id.split("::")
        assert name.split("[")[0] in defined_tests(path), f"{ex['id']}: grading test {node_id} does not exist"
    source = exercises.read_repo_file(ex["file"])
    changed = exercises.apply_exercise(source, ex)  # raises, naming the entry, when it has gone stale
    compile(changed, ex["file"], "exec")
    assert changed != source
    if ex["kind"] == "write":
        tree = exercises.parse(source)
        for qualname in ex["functions"]:
            doc = ast.get_docstring(exercises.find_function(tree, qualname))
            assert doc and len(doc) >= 40, f"{qualname}: its docstring is the task, and it is missing or too short"
            assert f'exercise {ex["id"]}: write {qualname}' in changed
        # Putting the reference back gives the original file, byte for byte.
        assert exercises.restore(changed, source, ex["functions"]) == source
    else:
        assert exercises.section_of(source, ex["edits"][0][0]) != "the top of the file"


def test_ids_are_unique_and_chapters_are_used():
    ids = [ex["id"] for ex in EXERCISES]
    assert len(ids) == len(set(ids))
    assert {ex["chapter"] for ex in EXERCISES} == set(CHAPTERS)


def test_every_blanked_function_and_planted_bug_fails_its_grading_tests(tmp_path):
    """The heart of the self-check: for each exercise alone, its grading tests fail on the student's starting
    files. Two worker processes share the exercises (CI's two cores; the rest of the suite runs on one)."""
    ids = [ex["id"] for ex in EXERCISES]
    halves = [ids[0::2], ids[1::2]]
    procs = []
    for i, half in enumerate(halves):
        out = tmp_path / f"results{i}.json"
        procs.append((out, subprocess.Popen([*CLI, "_selfcheck", "--json", str(out), *half], cwd=REPO,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    results = {}
    for out, proc in procs:
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0 and out.exists(), log[-3000:]
        results.update(json.loads(out.read_text()))
    missed = {ex_id: why for ex_id, (caught, why, _) in results.items() if not caught}
    assert set(results) == set(ids)
    assert not missed, "exercises the grading tests do not catch:\n" + "\n".join(
        f"  {ex_id}: {why}" for ex_id, why in missed.items())


def test_start_check_fix_check_and_grade_a_class(tmp_path):
    """A whole exercise through the command line: start, a failing check that says why (and gives a hint), the
    reference put back, a passing check; and grade's CSV of two students."""
    failing, fixed = tmp_path / "alice", tmp_path / "bob"
    for folder in (failing, fixed):
        result = run_cli("start", "lm-loss", "--out", str(folder))
        assert result.returncode == 0, result.stderr
        assert "write shifted_lm_loss in nanogpt2.py" in result.stdout
    assert run_cli("start", "lm-loss", "--out", str(failing)).returncode == 2  # never over a started folder
    student = (fixed / "nanogpt2.py").read_text()
    (fixed / "nanogpt2.py").write_text(exercises.restore(student, exercises.read_repo_file("nanogpt2.py"),
                                                         ["shifted_lm_loss"]))

    result = run_cli("check", str(failing), "--hint")
    assert result.returncode == 1
    assert "FAIL  lm-loss" in result.stdout and "still not written" in result.stdout
    assert "hint 1 of 2" in result.stdout

    result = run_cli("grade", str(failing), str(fixed), "--csv", str(tmp_path / "grades.csv"))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "grades.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["folder", "lm-loss", "passed"], [str(failing), "fail", "0"], [str(fixed), "pass", "1"]]


def test_a_bug_is_placed_by_section_and_its_solution_is_the_diff_that_fixes_it(tmp_path):
    result = run_cli("start", "bug-top-k", "--out", str(tmp_path / "s"))
    assert "section 'Sampling'" in result.stdout
    assert "logits <= kth_largest" in (tmp_path / "s" / "nanogpt2.py").read_text()
    diff = run_cli("solution", "bug-top-k").stdout
    assert "-    return logits.masked_fill(logits <= kth_largest" in diff
    assert "+    return logits.masked_fill(logits < kth_largest" in diff
    assert "def gelu_new_formula(x):" in run_cli("solution", "gelu").stdout


def test_a_chapter_starts_all_its_exercises_and_unknown_names_are_refused(tmp_path):
    result = run_cli("start", "tensorflow", "--out", str(tmp_path / "tf"))
    started = json.loads((tmp_path / "tf" / "exercises.json").read_text())["exercises"]
    assert started == [ex["id"] for ex in EXERCISES if ex["chapter"] == "tensorflow" and ex["kind"] == "write"]
    assert sorted(os.listdir(tmp_path / "tf")) == ["convert_tf.py", "exercises.json"]
    result = run_cli("start", "no-such-thing", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "unknown exercise or chapter 'no-such-thing'" in result.stderr


def test_a_stale_bug_is_reported_with_its_function_and_snippet():
    ex = dict(kind="bug", edits=[("top_k_filter", "this text is not there", "x")])
    with pytest.raises(exercises.ExerciseError, match="stale bug in top_k_filter"):
        exercises.apply_exercise(exercises.read_repo_file("nanogpt2.py"), ex)
    with pytest.raises(exercises.ExerciseError, match="no 'not_a_function' found"):
        exercises.find_function(ast.parse("x = 1"), "not_a_function")
