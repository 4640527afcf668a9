"""The classroom exercises prove themselves: every entry of the catalogue applies to the code as it is now, every
blanked function and every planted bug makes its grading tests fail (so the suite, which runs those tests, catches
it too), and the command line does what docs/exercises.md says, the way a class uses it: each exercise graded alone,
every failure in plain words, a messy class graded into a gradebook, bug drills drawn per student.

The catch test runs every exercise's grading tests in two worker processes (torch imported once in each), on
the "exercises" hypothesis profile: CI's derandomized examples, so a catch is never luck, without shrinking.
"""

import ast
import csv
import functools
import json
import os
import re
import subprocess
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
sys.path.insert(0, TESTS_DIR)

import exercise_report  # noqa: E402
import exercises  # noqa: E402
from exercise_catalogue import CHAPTERS, EXERCISES, SLOTS  # noqa: E402

CLI = [sys.executable, os.path.join("tests", "exercises.py")]
BY_ID = {ex["id"]: ex for ex in EXERCISES}


def run_cli(*args, env=None):
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def edit(folder, qualname, new_body, file="nanogpt2.py"):
    """A student's edit: the function's body (after its docstring) replaced by `new_body` (indented lines)."""
    path = os.path.join(folder, file)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    node = exercises.find_function(ast.parse(text), qualname)
    lines = text.splitlines(keepends=True)
    start = node.body[0].end_lineno if ast.get_docstring(node) else node.body[0].lineno - 1
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(lines[:start]) + new_body + "".join(lines[node.end_lineno:]))


def put_reference_back(folder, qualnames, file="nanogpt2.py"):
    path = os.path.join(folder, file)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(exercises.restore(text, exercises.read_repo_file(file), qualnames))


# --- The catalogue ---------------------------------------------------------------------------------------------


def test_the_ladder_has_enough_exercises_of_each_kind_in_every_file():
    rows = json.loads(run_cli("list", "--json").stdout)
    assert {"id", "kind", "file", "title", "slot", "weight"} <= set(rows[0])
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


def test_ids_slots_and_chapters_are_unique_and_each_slot_is_one_chapters():
    ids = [ex["id"] for ex in EXERCISES]
    assert len(ids) == len(set(ids))
    assert {ex["chapter"] for ex in EXERCISES} == set(CHAPTERS)
    names = ids + list(SLOTS) + list(CHAPTERS) + [f"{c}-bugs" for c in CHAPTERS]
    assert len(names) == len(set(names)), "an id, a slot and a chapter may not share a name (start takes all three)"
    for slot, entry in SLOTS.items():
        variants = [BY_ID[v] for v in entry["variants"]]
        assert len(variants) >= 2 and all(v["kind"] == "bug" and v.get("slot") == slot for v in variants), slot
        assert len({v["chapter"] for v in variants}) == 1, f"{slot}: its variants are in different chapters"
    # The floor: at least three chapters with a slot of at least three variants.
    assert len({BY_ID[e["variants"][0]]["chapter"] for e in SLOTS.values() if len(e["variants"]) >= 3}) >= 3


def code_quoted_by(ex):
    """Pieces of a hint that are the solution's code: 12 characters or more, with a bracket or an operator among
    them, found in a line of the reference function (a write exercise) or in the fix (a bug). Names alone
    (scale_attn_weights, CheckpointError) may be mentioned. (Every such shared run holds a 12-character window
    with its bracket or operator, so looking at the windows finds them all.)"""
    source = exercises.read_repo_file(ex["file"])
    if ex["kind"] == "bug":
        code = [old for _, old, _ in ex["edits"]]
    else:
        code, lines = [], source.splitlines()
        for qualname in ex["functions"]:
            node = exercises.find_function(exercises.parse(source), qualname)
            first = (node.body[1] if ast.get_docstring(node) else node.body[0]).lineno
            code += [line.split("  #")[0].strip() for line in lines[first - 1:node.end_lineno]
                     if not line.lstrip().startswith("#")]
    code = "\n".join(" ".join(line.split()) for line in code)
    quoted = []
    for hint in ex["hints"]:
        hint = " ".join(hint.split())
        quoted += [hint[i:i + 12] for i in range(len(hint) - 11)
                   if re.search(r"[()\[\]=*/+<>]", hint[i:i + 12]) and hint[i:i + 12] in code]
    return quoted


def test_no_hint_is_the_code():
    """Hints name the symptom, then the idea; `solution` is where the code is. (The catalogue before this test
    quoted code in 23 exercises: `torch.cat((past_key, k), dim=-2)`, `cumsum(-1) - 1`, ...)"""
    quoting = {ex["id"]: code_quoted_by(ex) for ex in EXERCISES}
    assert not {k: v for k, v in quoting.items() if v}
    leaky = dict(BY_ID["kv-cache"], hints=["The cached keys come first: torch.cat((past_key, k), dim=-2)."])
    assert code_quoted_by(leaky), "the check itself must see code in a hint"


def test_the_ladder_in_docs_is_what_list_prints():
    with open(os.path.join(REPO, "docs", "exercises.md"), encoding="utf-8") as f:
        doc = f.read()
    m = re.search(r"<!-- the output of `python tests/exercises\.py list` -->\n```text\n(.*?)```", doc, re.S)
    assert m, "docs/exercises.md's ladder block (after its marker comment) is missing"
    assert m.group(1).rstrip("\n") == exercises.ladder_text(), \
        "docs/exercises.md's ladder is stale: paste the output of `python tests/exercises.py list`"
    assert run_cli("list").stdout.rstrip("\n") == exercises.ladder_text()


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


# --- Each exercise graded alone ------------------------------------------------------------------------------


def test_graded_copy_puts_the_reference_back_in_every_other_exercise_only(tmp_path):
    folder = tmp_path / "s"
    assert run_cli("start", "heads", "kv-cache", "--out", str(folder)).returncode == 0
    written = ("        # mine\n        B, T, _ = x.shape\n"
               "        return x.view(B, T, -1, self.head_dim).transpose(1, 2)\n")
    edit(folder, "GPT2Attention.split_heads", written)
    state = exercises.load_folder(str(folder))
    reference = exercises.read_repo_file("nanogpt2.py")
    student = state["texts"]["nanogpt2.py"]

    def source(text, qualname):
        return exercises.function_source(text, qualname)

    texts, origins, notes = exercises.graded_copy(state, "heads")
    heads = texts["nanogpt2.py"]
    assert source(heads, "GPT2Attention.forward") == source(reference, "GPT2Attention.forward")  # put back
    assert source(heads, "GPT2Attention.split_heads") == source(student, "GPT2Attention.split_heads")  # theirs
    texts, origins, notes = exercises.graded_copy(state, "kv-cache")
    kv = texts["nanogpt2.py"]
    assert source(kv, "GPT2Attention.split_heads") == source(reference, "GPT2Attention.split_heads")
    assert "exercise kv-cache: write GPT2Attention.forward" in source(kv, "GPT2Attention.forward")
    # Lines of the copy point at the student's lines (None where the reference was put back).
    stub = next(i for i, line in enumerate(kv.splitlines()) if "exercise kv-cache" in line)
    assert "exercise kv-cache" in student.splitlines()[origins["nanogpt2.py"][stub] - 1]
    first, _ = exercises.function_span(kv, "GPT2Attention.split_heads")
    assert origins["nanogpt2.py"][first] is None and not notes
    assert exercises.graded_copy(state, "heads", together=True)[0]["nanogpt2.py"] == student

    # kv-cache taken out of exercises.json by hand: its stub is still put back when heads is graded.
    manifest = json.loads((folder / "exercises.json").read_text())
    manifest["exercises"].remove("kv-cache")
    (folder / "exercises.json").write_text(json.dumps(manifest))
    heads = exercises.graded_copy(exercises.load_folder(str(folder)), "heads")[0]["nanogpt2.py"]
    assert source(heads, "GPT2Attention.forward") == source(reference, "GPT2Attention.forward")

    # Bugs that share a function: the others' planted text is put back, this one's stays.
    bugs = tmp_path / "bugs"
    assert run_cli("start", "attention-bugs", "--out", str(bugs)).returncode == 0
    state = exercises.load_folder(str(bugs))
    core = source(exercises.graded_copy(state, "bug-missing-scale")[0]["nanogpt2.py"],
                  "GPT2Attention.explicit_attention")
    for ex_id, present in (("bug-missing-scale", True), ("bug-cache-mask", False), ("bug-upcast-scale", False)):
        _, old, new = BY_ID[ex_id]["edits"][0]
        assert (new in core and old not in core) == present, ex_id


def test_one_exercise_written_and_the_next_not_reports_pass_then_fail(tmp_path):
    """Issue 16's first case: heads written, kv-cache not. heads passes on its own code, kv-cache fails with its
    own message and its own hint; --only grades one exercise; --gradescope writes Gradescope's results.json."""
    folder = tmp_path / "s"
    assert run_cli("start", "heads", "kv-cache", "--out", str(folder)).returncode == 0
    put_reference_back(folder, ["GPT2Attention.split_heads", "GPT2Attention.merge_heads"])
    result = run_cli("check", str(folder), "--hint")
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^PASS  heads: ", out, re.M) and re.search(r"^FAIL  kv-cache: ", out, re.M), out
    assert "still not written: GPT2Attention.forward raises NotImplementedError" in out
    words = " ".join(out.split())  # hints are folded to the terminal's width
    assert out.count("hint 1 of") == 1 and BY_ID["kv-cache"]["hints"][0] in words
    assert not any(" ".join(h.split()) in words for h in BY_ID["heads"]["hints"])
    manifest = json.loads((folder / "exercises.json").read_text())
    assert manifest["hints_shown"] == {"heads": 0, "kv-cache": 1}

    results = tmp_path / "results.json"
    result = run_cli("check", str(folder), "--only", "heads", "--gradescope", str(results))
    assert result.returncode == 0 and "kv-cache" not in result.stdout, result.stdout + result.stderr
    report = json.loads(results.read_text())
    assert report["score"] == 1 and len(report["tests"]) == 1
    test = report["tests"][0]
    assert test["name"].startswith("heads: ") and test["status"] == "passed"
    assert test["score"] == test["max_score"] == BY_ID["heads"]["difficulty"]
    assert "2 of 2 grading tests pass" in test["output"]


# --- Failures in plain words ------------------------------------------------------------------------------------


def test_a_failing_check_shows_the_smallest_example_and_the_students_line_in_plain_words(tmp_path):
    """A wrong write-exercise body and a planted bug: each failure says what went wrong, where in the student's
    file, and the failing example, with config fields at their defaults left out; no traceback, no pytest, pluggy
    or hypothesis text, no exception group, whichever hypothesis is installed."""
    folder = tmp_path / "s"
    assert run_cli("start", "lm-loss", "bug-top-k", "--out", str(folder)).returncode == 0
    edit(folder, "shifted_lm_loss", "    return F.cross_entropy(logits, labels, ignore_index=-100)  # no shift\n")
    line = next(i + 1 for i, text in enumerate((folder / "nanogpt2.py").read_text().splitlines())
                if text.endswith("# no shift"))
    result = run_cli("check", str(folder))
    assert result.returncode == 1
    out = result.stdout
    lm, top_k = out.split("FAIL  bug-top-k")
    assert "RuntimeError: Expected target size" in lm
    assert f"raised in your nanogpt2.py, line {line}, in shifted_lm_loss:" in lm
    assert "return F.cross_entropy(logits, labels, ignore_index=-100)" in lm
    example = lm.split("smallest failing example:\n")[1]
    assert re.search(r"^ +config=GPT2Config\(vocab_size=\d+, ", example, re.M) and re.search(r"^ +seed=\d+$", example,
                                                                                              re.M)
    assert "n_inner=" not in example and "layer_norm_epsilon=" not in example  # left at their defaults
    assert "top_k_filter(" in top_k and "expected" in top_k  # the test's own words
    assert re.search(r"smallest failing example:\n +rows=\[\[.*\]\]\n +k=\d+\n", top_k), top_k
    assert "found by the test's check" in top_k
    for noise in ("Traceback", "_pytest", "pluggy", "site-packages", "ExceptionGroup", "Exception Group",
                  "Falsifying example", "Failing test case", "hypothesis"):
        assert noise not in out + result.stderr, noise


def test_comparisons_say_which_output_differs_where_first_and_by_how_much():
    import torch

    expected = torch.zeros(2, 3)
    actual = expected.clone()
    actual[1, 2], actual[0, 1] = 3.0, 0.5
    message = exercise_report.comparison_message(
        actual, expected, {"atol": 1e-5, "rtol": 1e-5, "msg": lambda m: f"output logits differs: {m}"})
    assert message.startswith("output logits differs: 2 of 6 values differ; the first at index (0, 1): got 0.5, "
                              "expected 0; the greatest difference is 3, at index (1, 2)"), message
    assert "shapes differ: got (2, 3), expected (3, 2)" in exercise_report.comparison_message(
        actual, torch.zeros(3, 2), {})
    assert exercise_report.comparison_message(expected, expected, {}) is None
    error = ExceptionGroup("two", [ValueError("the first"), KeyError("the second")])
    assert exercise_report.innermost(ExceptionGroup("outer", [error])).args == ("the first",)


# --- A class --------------------------------------------------------------------------------------------------


def test_grading_a_messy_class_gives_every_folder_a_row(tmp_path):
    """Five folders as a class leaves them: two that started different exercises (one a per-student drill), one
    untouched, one without exercises.json, one whose file does not parse; an endless loop and a huge allocation
    in someone's function. grade exits 0 and writes five rows, one CSV, written once, and a results.json each."""
    root = tmp_path / "class"
    alice, bob, carol, dave, erin = (root / n for n in ("alice", "bob", "carol", "dave", "erin"))
    for folder, names in ((alice, ["lm-loss", "top-k"]), (bob, ["tensorflow-bugs", "--student", "Bob"]),
                          (carol, ["gelu"]), (erin, ["conv1d"])):
        assert run_cli("start", *names, "--out", str(folder)).returncode == 0
    put_reference_back(alice, ["shifted_lm_loss"])
    edit(alice, "top_k_filter", "    while True:  # an endless loop\n        pass\n")
    drawn = exercises.drill("protobuf", "Bob")
    qualname = BY_ID[drawn]["edits"][0][0]
    tf = (bob / "convert_tf.py").read_text()
    node = exercises.find_function(ast.parse(tf), qualname)
    lines = tf.splitlines(keepends=True)
    at = node.body[1].lineno - 1
    (bob / "convert_tf.py").write_text("".join(lines[:at]) + " " * node.body[1].col_offset +
                                       "hoard = bytearray(2**31)  # 2 GiB\n" + "".join(lines[at:]))
    manifest = json.loads((carol / "exercises.json").read_text())
    manifest["hints_shown"]["gelu"] = 2
    (carol / "exercises.json").write_text(json.dumps(manifest))
    dave.mkdir()
    (dave / "nanogpt2.py").write_text(exercises.read_repo_file("nanogpt2.py"))
    (erin / "nanogpt2.py").write_text((erin / "nanogpt2.py").read_text().replace("class Conv1D(nn.Module):",
                                                                                 "class Conv1D(nn.Module)", 1))
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"top-k": 4}))
    grades, gradescope = tmp_path / "out" / "grades.csv", tmp_path / "gradescope"
    grades.parent.mkdir()
    result = run_cli("grade", *(str(f) for f in (alice, bob, carol, dave, erin)), "--csv", str(grades), "--jobs", "2",
                     "--time-limit", "20", "--memory-limit", "2", "--weights", str(weights), "--gradescope-dir",
                     str(gradescope))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(5 rows)" in result.stdout
    assert os.listdir(grades.parent) == ["grades.csv"]  # no temporary file left beside it
    with open(grades, newline="") as f:
        table = list(csv.DictReader(f))
    rows = {os.path.basename(r["folder"]): r for r in table}
    assert len(table) == 5 and set(rows) == {"alice", "bob", "carol", "dave", "erin"}

    a = rows["alice"]
    assert (a["lm-loss"], a["top-k"], a["points"], a["total"]) == ("pass", "error", "1", "5")
    assert "stopped after 20 s" in a["notes"] and "in top_k_filter" in a["notes"] and "endless loop" in a["notes"]
    b = rows["bob"]
    assert b["protobuf"] in ("fail", "error") and b["sstable"] == "fail" and b["lm-loss"] == "not started"
    assert "MemoryError" in b["notes"] or "memory" in b["notes"], b["notes"]
    c = rows["carol"]
    assert (c["gelu"], c["hints used"], c["points"], c["total"]) == ("fail", "2", "0", "1")
    assert "still not written" in c["notes"]
    assert int(a["tests passed"]) >= 1 and int(a["tests"]) > int(a["tests passed"])
    assert "no exercises.json" in rows["dave"]["notes"] and rows["dave"]["gelu"] == "error"
    assert rows["erin"]["conv1d"] == "error" and "nanogpt2.py does not parse: line" in rows["erin"]["notes"]

    assert sorted(os.listdir(gradescope)) == ["alice", "bob", "carol", "dave", "erin"]
    report = json.loads((gradescope / "alice" / "results.json").read_text())
    assert report["score"] == 1 and [t["max_score"] for t in report["tests"]] == [1, 4]
    assert [t["status"] for t in report["tests"]] == ["passed", "failed"]
    assert "endless loop" in report["tests"][1]["output"]


def test_the_gradebook_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    grades = tmp_path / "grades.csv"
    grades.write_text("last week's grades\n")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(exercises.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        exercises.grade([str(tmp_path / "empty")], str(grades), log=open(os.devnull, "w"))
    assert grades.read_text() == "last week's grades\n" and sorted(os.listdir(tmp_path)) == ["empty", "grades.csv"]
    monkeypatch.undo()
    exercises.grade([str(tmp_path / "empty")], str(grades), assignment=["blocks"], log=open(os.devnull, "w"))
    with open(grades, newline="") as f:
        (row,) = csv.DictReader(f)
    assert (row["gelu"], row["points"], row["total"]) == ("error", "0", "3") and "no exercises.json" in row["notes"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(grades).st_mode & 0o777 == 0o666 & ~umask  # a gradebook a teacher can share, as any new file


# --- Drills ------------------------------------------------------------------------------------------------------


def test_drills_give_the_same_name_the_same_bugs_and_different_names_different_ones(tmp_path):
    names = [f"student {i}" for i in range(40)]
    for slot, entry in SLOTS.items():
        picks = [exercises.drill(slot, n) for n in names]
        assert set(picks) == set(entry["variants"]), f"{slot}: some variant is never drawn"
        assert exercises.drill(slot, "Ada  Lovelace") == exercises.drill(slot, " ada lovelace")
    # The same name through the command line twice, so each start is its own process (Python's hash() would
    # differ between them).
    for out, name in (("a1", "Ada Lovelace"), ("a2", "ada  lovelace")):
        result = run_cli("start", "attention-bugs", "--student", name, "--out", str(tmp_path / out))
        assert result.returncode == 0, result.stderr
    told = exercises.start(["attention-bugs"], str(tmp_path / "b"), "Alan Turing")
    manifests = {out: json.loads((tmp_path / out / "exercises.json").read_text()) for out in ("a1", "a2", "b")}
    assert manifests["a1"]["drills"] == manifests["a2"]["drills"]
    assert (tmp_path / "a1" / "nanogpt2.py").read_text() == (tmp_path / "a2" / "nanogpt2.py").read_text()
    assert manifests["a1"]["drills"] != manifests["b"]["drills"]
    assert set(manifests["b"]["drills"]) == {s for s in SLOTS if BY_ID[SLOTS[s]["variants"][0]]["chapter"] ==
                                             "attention"}
    assert "bug-padding-axis" in manifests["b"]["exercises"]  # a bug in no slot: planted for everyone
    for slot, variant in manifests["b"]["drills"].items():
        _, _, planted = BY_ID[variant]["edits"][0]
        assert planted in (tmp_path / "b" / "nanogpt2.py").read_text()
        assert SLOTS[slot]["title"] in told and BY_ID[variant]["title"] not in told

    # grade knows the draw: a manifest edited to another variant is an error in that cell, not a free pass.
    state = exercises.load_folder(str(tmp_path / "b"))
    state["manifest"]["drills"]["attention-scale"] = next(v for v in SLOTS["attention-scale"]["variants"]
                                                          if v != manifests["b"]["drills"]["attention-scale"])
    units = {column: (ex_id, problem) for column, ex_id, problem in exercises.units_of(state)}
    assert "was it edited?" in units["attention-scale"][1]
    assert units["attention-cache"] == (manifests["b"]["drills"]["attention-cache"], None)


# --- The command line's other paths -------------------------------------------------------------------------------


def test_bad_input_is_one_line_naming_the_argument(tmp_path):
    started = tmp_path / "s"
    assert run_cli("start", "gelu", "--out", str(started)).returncode == 0
    (tmp_path / "bad.json").write_text("{not json")
    cases = [
        (["check", str(started), "--jobs", "0"], "--jobs must be at least 1, got 0"),
        (["check", str(started), "--time-limit", "soon"], "--time-limit expects a number, got 'soon'"),
        (["check", str(started), "--only", "kv-cache"], "--only kv-cache: not among the exercises graded in"),
        (["check", str(tmp_path)], "no exercises.json"),
        (["check", str(started), "--assignment", "nope"], "unknown exercise, slot or chapter 'nope'"),
        (["grade", str(started), "--weights", str(tmp_path / "bad.json")], "--weights"),
        (["grade", str(tmp_path / "missing")], "no such folder: "),
        (["grade", str(started), "--csv", str(tmp_path / "no" / "g.csv")], "--csv"),
        (["start", "gelu", "--out", str(started)], "already holds started exercises"),
        (["start", "attention-bugs", "--student", " ", "--out", str(tmp_path / "x")], "--student must be a name"),
    ]
    for args, words in cases:
        result = run_cli(*args)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) <= (1 if "usage" not in result.stderr else 8), result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()
    # Gradescope's autograder still gets a results.json for a submission it cannot grade: zero, and why.
    result = run_cli("check", str(tmp_path), "--assignment", "gelu", "--gradescope", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    assert result.returncode == 2 and report["score"] == 0 and "no exercises.json" in report["tests"][0]["output"]


def test_a_bug_is_placed_by_section_and_its_solution_is_the_diff_that_fixes_it(tmp_path):
    result = run_cli("start", "bug-top-k", "--out", str(tmp_path / "s"))
    # top_k_filter sits with the logits processors that call it (Part II), not in Part I's Sampling.
    assert "section 'Generation: the reference's options and logits processors'" in result.stdout
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
