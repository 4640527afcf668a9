"""The pytest plugin behind `python tests/exercises.py check`: it reports each grading test as one JSON line,
with a failure already put in plain words, so the exercise tool never reads pytest's or hypothesis's text.

tests/exercises.py runs the grading tests in a subprocess (its address space capped by setrlimit before it starts)
with `-p exercise_report` and these variables:
    EXERCISE_REPORT      the file to append the JSON lines to
    EXERCISE_SOURCES     the folder holding the student's files being graded (NANOGPT2_STUDENT_DIR)
    EXERCISE_TIME_LIMIT  seconds; when they run out, every thread's stack goes to EXERCISE_REPORT + ".stack" and
                         the process exits, so the tool can say where an endless loop was

One line per event:
    {"event": "import-error", "failure": F}         a student's module failed to import (before any test ran)
    {"event": "collect-error", "test": ID, "failure": F}
    {"event": "collected", "tests": [ID, ...]}
    {"event": "start", "test": ID}
    {"event": "result", "test": ID, "outcome": "passed" | "failed" | "skipped", "failure": F or null,
     "skip": reason or null, "seconds": S}
where F = {"type", "message", "frames": [[file, line, function, in the student's files?], ...] innermost last,
"example": [[name, value], ...] or null, "shrunk": whether hypothesis searched for it, "params": [[name, value]]}.

The failing example comes from hypothesis's documented hook `test.hypothesis.inner_test`: each call's arguments
(and each `data.draw`) are kept, and the last call that raised is the example hypothesis reports. The grading
profile (tests/conftest.py) sets report_multiple_bugs=False, so there is one failure, never a group.
"""

import dataclasses
import faulthandler
import functools
import json
import os
import sys
import time
import traceback

import pytest

REPORT = os.environ.get("EXERCISE_REPORT")
SOURCES = os.path.abspath(os.environ.get("EXERCISE_SOURCES") or os.environ.get("NANOGPT2_STUDENT_DIR") or ".")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
STUDENT_MODULES = ("nanogpt2", "imagegpt", "convert_tf")
MAX_FRAMES = 40

_out = open(REPORT, "a", encoding="utf-8") if REPORT else None
_stack_file = None


def emit(record):
    if _out is not None:
        _out.write(json.dumps(record) + "\n")
        _out.flush()


# --- Putting values and exceptions in plain words ----------------------------------------------------------


def short(text, limit=300, fold=True):
    """text cut to `limit` characters; one line of it (fold) with its runs of whitespace made one space. A repr is
    never folded: its spaces are the value's ('a   b' is not 'a b')."""
    text = " ".join(str(text).split()) if fold and "\n" not in str(text) else str(text)
    return text if len(text) <= limit else text[:limit - 20] + f"... ({len(text)} characters)"


def same(a, b):
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # tensors compare elementwise
        return False


def render(value):
    """A value as a student should read it: a dataclass with only the fields that differ from their defaults,
    a tensor by its values when small and by its shape otherwise."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        parts = []
        for f in dataclasses.fields(value):
            if not f.repr or not hasattr(value, f.name):
                continue
            v = getattr(value, f.name)
            if f.default is not dataclasses.MISSING and same(v, f.default):
                continue
            if f.default_factory is not dataclasses.MISSING and same(v, f.default_factory()):
                continue
            parts.append(f"{f.name}={render(v)}")
        return f"{type(value).__name__}({', '.join(parts)})"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        kind = str(value.dtype).replace("torch.", "")
        if value.numel() <= 24:
            return f"tensor({value.tolist()}, {kind})"
        return f"tensor of shape {tuple(value.shape)}, {kind}"
    if torch is not None and isinstance(value, torch.device):
        return repr(str(value))
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        return f"array({value.tolist()}, {value.dtype})" if value.size <= 24 else \
            f"array of shape {value.shape}, {value.dtype}"
    return short(repr(value), fold=False)


def innermost(error):
    """One failure: the first of an exception group, at every level (hypothesis's Flaky is a group too)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def message_of(error):
    """The exception's own words: for a failed assert, its message without pytest's re-written expression."""
    text = str(error).strip()
    lines = text.splitlines()
    if isinstance(error, AssertionError) and lines and not lines[0].startswith("assert "):
        cut = next((i for i, line in enumerate(lines) if line.startswith("assert ")), len(lines))
        lines = lines[:cut]
    lines = [line.rstrip() for line in lines if line.strip()][:12]
    return short("\n".join(lines), 2000)


def frames_of(error):
    """[file, line, function, in the student's files] of each frame in the student's files or the tests."""
    frames = []
    for frame, line in traceback.walk_tb(error.__traceback__):
        path = os.path.abspath(frame.f_code.co_filename)
        mine = os.path.dirname(path) == SOURCES
        if mine or (os.path.dirname(path) == TESTS_DIR and path != os.path.abspath(__file__)):
            name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
            frames.append([os.path.basename(path), line, name, mine])
    return frames[-MAX_FRAMES:]


def failure(error, example=None, shrunk=False, params=None):
    error = innermost(error)
    return {"type": type(error).__name__, "message": message_of(error), "frames": frames_of(error),
            "example": example, "shrunk": shrunk, "params": params}


# --- Comparisons say where they differ --------------------------------------------------------------------


def comparison_message(actual, expected, kwargs):
    """torch.testing.assert_close's failure, in our words: which output, where it first differs, by how much."""
    import torch

    if not (isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)):
        return None
    msg = kwargs.get("msg")
    what = msg("").rstrip(": ") if callable(msg) else (msg or "the values")
    if actual.shape != expected.shape:
        return f"{what}: shapes differ: got {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype and kwargs.get("check_dtype", True):
        return f"{what}: dtypes differ: got {actual.dtype}, expected {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_floating_point() or e.is_floating_point() or a.is_complex():
        defaults = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5)}
        rtol, atol = defaults.get(e.dtype, (1e-7, 1e-7))
        rtol, atol = kwargs.get("rtol", rtol), kwargs.get("atol", atol)
        a, e = a.double(), e.double()
        diff = (a - e).abs()
        bad = ~(diff <= atol + rtol * e.abs())
        if kwargs.get("equal_nan", False):
            bad &= ~(a.isnan() & e.isnan())
        allowed = f" (allowed: {atol:g} + {rtol:g} x |expected|)"
    else:
        diff = (a.long() - e.long()).abs().double()
        bad, allowed = a != e, ""
    if not bad.any():
        return None
    first = tuple(int(i) for i in bad.nonzero()[0])
    finite = torch.where(diff.isnan(), torch.full_like(diff, float("inf")), diff)
    worst = tuple(int(i) for i in torch.nonzero(finite == finite.max())[0])
    return (f"{what}: {int(bad.sum())} of {bad.numel()} values differ; the first at index {first}: got "
            f"{a[first].item():.6g}, expected {e[first].item():.6g}; the greatest difference is "
            f"{diff[worst].item():.3g}, at index {worst}{allowed}")


def install_comparison_words():
    import torch.testing

    original = torch.testing.assert_close

    @functools.wraps(original)
    def assert_close(actual, expected, *args, **kwargs):
        try:
            return original(actual, expected, *args, **kwargs)
        except AssertionError:
            try:
                message = comparison_message(actual, expected, kwargs)
            except Exception:
                message = None
            if message is None:
                raise
        raise AssertionError(message)

    torch.testing.assert_close = assert_close


# --- The failing example -------------------------------------------------------------------------------------


def counts_as_failure(error):
    """Hypothesis steers a test with exceptions of its own (assume, running out of data): those are not failures;
    pytest.fail is."""
    if type(error).__module__.startswith("hypothesis"):
        return False
    return isinstance(error, Exception) or type(error).__name__ == "Failed"


class Recorder:
    """Wraps a hypothesis test's inner function: keeps the arguments and draws of the last call that failed."""

    def __init__(self, fixtures):
        self.fixtures = fixtures
        self.example, self.error = None, None

    def wrap(self, test):
        @functools.wraps(test)
        def inner(*args, **kwargs):
            draws = []
            for value in kwargs.values():
                if type(value).__name__ == "DataObject" and hasattr(value, "conjecture_data"):
                    value.draw = self.recording_draw(value.draw, draws)
            try:
                return test(*args, **kwargs)
            except BaseException as error:
                if counts_as_failure(error):
                    try:
                        shown = [[k, render(v)] for k, v in kwargs.items()
                                 if k not in self.fixtures and type(v).__name__ != "DataObject"]
                        shown += [[label or f"draw {i + 1}", render(v)] for i, (label, v) in enumerate(draws)]
                    except Exception as e:  # a value whose repr fails must not hide the failure
                        shown = [["(example)", f"could not be shown: {e!r}"]]
                    self.example, self.error = shown, error
                raise

        return inner

    @staticmethod
    def recording_draw(draw, draws):
        def recording(strategy, label=None):
            value = draw(strategy, label)
            draws.append((label, value))
            return value

        return recording


def params_of(item):
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    return [[k, render(v)] for k, v in callspec.params.items()]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    handle = getattr(getattr(item, "obj", None), "hypothesis", None)
    recorder = None
    if handle is not None and hasattr(handle, "inner_test"):
        original = handle.inner_test
        recorder = Recorder(set(item.fixturenames))
        handle.inner_test = recorder.wrap(original)
    try:
        yield
    finally:
        if recorder is not None:
            handle.inner_test = original
            item._exercise_recorder = recorder


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None:
        recorder = getattr(item, "_exercise_recorder", None)
        error = call.excinfo.value
        example = None
        if recorder is not None and recorder.error is not None:
            error, example = recorder.error, recorder.example
        item._exercise_failure = failure(error, example, shrunk=recorder is not None, params=params_of(item))
    elif report.skipped and call.excinfo is not None:
        item._exercise_skip = message_of(call.excinfo.value)


def pytest_collection_finish(session):
    emit({"event": "collected", "tests": [item.nodeid for item in session.items]})


def pytest_runtest_logstart(nodeid, location):
    emit({"event": "start", "test": nodeid})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0 = time.perf_counter()
    yield
    failed = getattr(item, "_exercise_failure", None)
    skip = getattr(item, "_exercise_skip", None)
    outcome = "failed" if failed else "skipped" if skip is not None else "passed"
    emit({"event": "result", "test": item.nodeid, "outcome": outcome, "failure": failed, "skip": skip,
          "seconds": round(time.perf_counter() - t0, 3)})


def pytest_exception_interact(node, call, report):
    if isinstance(node, pytest.Collector) and report.failed:
        emit({"event": "collect-error", "test": node.nodeid, "failure": failure(call.excinfo.value)})


# --- Before anything else: the time limit, the comparison words, the student's modules --------------------------


def arm_time_limit():
    global _stack_file
    limit = float(os.environ.get("EXERCISE_TIME_LIMIT") or 0)
    if limit > 0 and REPORT:
        _stack_file = open(REPORT + ".stack", "w", encoding="utf-8")
        faulthandler.dump_traceback_later(limit, exit=True, file=_stack_file)


def import_student_modules():
    """Import the student's modules here, before conftest does, so that an error at import is reported with its
    line rather than as pytest's 'ImportError while loading conftest'."""
    if SOURCES not in sys.path:
        sys.path.insert(0, SOURCES)
    for name in STUDENT_MODULES:
        if os.path.exists(os.path.join(SOURCES, name + ".py")) and name not in sys.modules:
            try:
                __import__(name)
            except BaseException as error:
                emit({"event": "import-error", "module": name, "failure": failure(error)})
                return


if REPORT:  # loaded by exercises.py for a student's run (importing this module elsewhere changes nothing)
    arm_time_limit()
    import_student_modules()
    install_comparison_words()
