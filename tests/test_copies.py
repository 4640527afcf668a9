"""The copies between the files stay copies (tests/copies.py says which are meant to be shared, and why
the others differ).

imagegpt.py and convert_tf.py never import nanogpt2.py, so what they share with it is written out again.
These tests make a drifted copy a failure: change one statement of a shared function in one file only and
the suite goes red (test_one_changed_statement_in_any_shared_function_is_caught proves it for each).
"""

import ast
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import copies  # noqa: E402

NANOGPT2 = os.path.join(copies.ROOT, "nanogpt2.py")
IMAGEGPT = os.path.join(copies.ROOT, "imagegpt.py")
CONVERT_TF = os.path.join(copies.ROOT, "convert_tf.py")


@pytest.fixture(scope="module")
def common():
    return copies.compare(NANOGPT2, IMAGEGPT)


def test_every_shared_function_is_identical_apart_from_the_renaming(common):
    drifted = [copies.unified(name, common[name]) for name in copies.SHARED
               if name in common and common[name][2] != common[name][3]]
    assert not drifted, "shared copies differ (make them the same, or declare the difference in " \
                        "tests/copies.py's DIFFERENT with its reason):\n\n" + "\n\n".join(drifted)


def test_every_name_the_files_share_is_declared_shared_or_different(common):
    undeclared = sorted(set(common) - set(copies.SHARED) - set(copies.DIFFERENT))
    assert not undeclared, f"both files define {undeclared}: add each to SHARED or DIFFERENT in tests/copies.py"
    missing = sorted(name for name in copies.SHARED if name not in common)
    assert not missing, f"SHARED names that are no longer in both files: {missing}"


def test_every_declared_difference_is_still_a_difference(common):
    gone = sorted(set(copies.DIFFERENT) - set(common))
    assert not gone, f"DIFFERENT names that are no longer in both files: {gone}"
    same = sorted(name for name in copies.DIFFERENT if common[name][2] == common[name][3])
    assert not same, f"declared different but identical now: move {same} to SHARED"


def test_convert_tf_has_the_same_safetensors_header_and_downloader():
    ours, theirs = copies.units(NANOGPT2), copies.units(CONVERT_TF)
    for name in copies.SHARED_WITH_CONVERT_TF:
        assert name in theirs, f"convert_tf.py no longer defines {name}"
        assert ours[name][1] == theirs[name][1], f"convert_tf.py's {name} differs from nanogpt2.py's:\n" + \
            copies.unified(name, (ours[name][0], theirs[name][0], ours[name][1], theirs[name][1]))


def test_one_changed_statement_in_any_shared_function_is_caught():
    """The checker itself: for every shared function, imagegpt.py with one statement added to that function
    alone is reported as different (a checker that compared too little, or the wrong function, would miss it)."""
    with open(IMAGEGPT, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    functions = {}

    def visit(body, prefix):
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")
            elif isinstance(node, ast.FunctionDef):
                functions[prefix + node.name] = node

    visit(tree.body, "")
    base = copies.units(NANOGPT2, only=set(copies.SHARED))
    missed = []
    for name in copies.SHARED:
        node = functions.get(copies.rename(name))
        if node is None:
            continue  # a class body or a constant: not a function
        node.body.append(ast.Expr(ast.Constant(0)))  # one statement more, at the end
        theirs = copies.units(tree, only={copies.rename(name)})
        node.body.pop()
        if copies.rename(base[name][1]) == theirs[copies.rename(name)][1]:
            missed.append(name)
    assert not missed, f"a changed statement went unnoticed in {missed}"


def test_the_model_diff_is_short_and_names_the_real_differences():
    result = subprocess.run([sys.executable, os.path.join(copies.ROOT, "tests", "copies.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert 20 < len(lines) < 200, f"{len(lines)} lines"
    for difference in ("ImageGPTLayerNorm", "quick_gelu", "SOS", "vocab_size - 1", "untied"):
        assert difference in result.stdout
