"""Part I of each model file reads as a lesson: short enough to read in a sitting, lines that fit a
screen beside a paper, a body forward that fits on one screen, and only the eager model in it.

Part I is the text from the banner line "# Part I: the model" up to (not including) the banner line
"# Part II: ...". The compiled decoding of generate(compile=True) lives in Part II's "Faster decoding"
section; Part I may not name any of it. The files are read as text and parsed with `ast`, never imported.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"nanogpt2.py": "GPT2Model", "imagegpt.py": "ImageGPTModel"}  # file -> the class of the body

MAX_PART_ONE_LINES = 800  # about three times nanoGPT's whole model.py, for Hugging Face's completeness
MAX_LINE_LENGTH = 100  # two files side by side on a laptop screen, or the file beside the paper
MAX_BODY_FORWARD_LINES = 60  # one screen, docstring included (nanoGPT's forward is 25, HF's 200)

# The compiled-decoding machinery, by the names the issue lists, whatever Part II calls its own defs; the
# names Part II's compiled-decoding section defines are added to these by compiled_decoding_names().
COMPILED_DECODING = {"write_at", "FixedShapeCache", "decode_one_token", "compiled_decode_step", "mark_static",
                     "compile_settings", "fix_shapes", "fixed_shape_step", "fast_decode_step",
                     "next_token_logits", "_check_compile_args", "_COMPILED_STEPS", "compile"}


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def part_one(text):
    """(first line number, the lines) of Part I: its banner line up to the line before Part II's banner."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("# Part I: the model")]
    ends = [i for i, line in enumerate(lines) if line.startswith("# Part II:")]
    assert len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0], \
        'each model file has one "# Part I: the model" banner, then one "# Part II: ..." banner'
    return starts[0] + 1, lines[starts[0]:ends[0]]


def compiled_decoding_names(text):
    """Every name the compiled-decoding section of Part II defines (its functions, classes and constants,
    the classes' methods and the attributes they set), with COMPILED_DECODING."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("# --- ") and "compile=True" in line)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("# --- "))
    names = set(COMPILED_DECODING)
    for node in ast.parse("\n".join(lines[start:end])).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):  # a cache subclass: its own methods and state (write_at, ...)
            for inner in ast.walk(node):
                if isinstance(inner, ast.FunctionDef) and not inner.name.startswith("__"):
                    names.add(inner.name)
                elif isinstance(inner, ast.Attribute) and isinstance(inner.ctx, ast.Store):
                    names.add(inner.attr)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    # What every cache has, Part I's StaticCache included, is not the compiled decoding's own.
    return names - {"keys", "values", "filled", "max_length", "length", "batch_size", "update", "to_tuple"}


def names_used(code):
    """Every identifier the code (not its docstrings or comments) uses or defines."""
    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.keyword) and node.arg:
            found.add(node.arg)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
    return found


@pytest.mark.parametrize("name", FILES)
def test_part_one_is_at_most_800_lines(name):
    _, lines = part_one(read(name))
    assert len(lines) <= MAX_PART_ONE_LINES, \
        f"{name}: Part I is {len(lines)} lines, more than {MAX_PART_ONE_LINES}: move what is not the eager model " \
        "to Part II, or the walk-through out of a docstring"


@pytest.mark.parametrize("name", FILES)
def test_every_part_one_line_is_at_most_100_characters(name):
    first, lines = part_one(read(name))
    long = [f"  line {first + i}: {len(line)} characters" for i, line in enumerate(lines)
            if len(line) > MAX_LINE_LENGTH]
    assert not long, f"{name}: Part I lines over {MAX_LINE_LENGTH} characters:\n" + "\n".join(long)


@pytest.mark.parametrize("name", FILES)
def test_the_body_forward_is_at_most_60_lines(name):
    tree = ast.parse(read(name))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == FILES[name])
    forward = next(n for n in body.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    first = min([forward.lineno] + [d.lineno for d in forward.decorator_list])
    length = forward.end_lineno - first + 1
    assert length <= MAX_BODY_FORWARD_LINES, \
        f"{name}: {FILES[name]}.forward is {length} lines (docstring included), more than " \
        f"{MAX_BODY_FORWARD_LINES}: give a step a well-named helper"


@pytest.mark.parametrize("name", FILES)
def test_part_one_names_none_of_the_compiled_decoding(name):
    text = read(name)
    _, lines = part_one(text)
    named = names_used("\n".join(lines)) & compiled_decoding_names(text)
    assert not named, f"{name}: Part I's code names compiled-decoding machinery {sorted(named)}: it belongs to " \
                      "Part II's compiled-decoding section, reached from Part I only through options.step"
