"""Shared test set-up: the repository root on sys.path, the device parameter, and the hypothesis profiles.

Every test that runs a model takes the `device` fixture: it runs once on "cpu" and once on "cuda",
and the cuda run is skipped on machines without a GPU (CI has none; the GPU runs are reported in the
closing notes and README).
"""

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A student's folder of exercises (python tests/exercises.py check DIR sets this): its copies of nanogpt2.py,
# imagegpt.py and convert_tf.py come first on sys.path, so the tests import them, never the repository's.
STUDENT_DIR = os.environ.get("NANOGPT2_STUDENT_DIR")
if STUDENT_DIR:
    STUDENT_DIR = os.path.abspath(STUDENT_DIR)
    sys.path.insert(0, STUDENT_DIR)
    for _name in ("nanogpt2", "imagegpt", "convert_tf"):
        if os.path.exists(os.path.join(STUDENT_DIR, _name + ".py")):
            _module = __import__(_name)
            assert os.path.dirname(os.path.abspath(_module.__file__)) == STUDENT_DIR, (_name, _module.__file__)

# "ci" keeps the suite inside its time budget on 2 cores, and is derandomized: the same examples every run, so
# a failure in CI (or a planted bug that the suite catches) is never luck. "thorough" is random and deeper,
# for a local run that looks for new failures:
#   HYPOTHESIS_PROFILE=thorough python -m pytest -q
# "exercises" is "ci" without shrinking, for the exercises' self-check, which needs to know only that a test
# fails, not its smallest example.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("exercises", settings.get_profile("ci"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
# "grading" is what `exercises.py check` runs: "ci", shrinking to the smallest failing example to show the
# student, one failure only (never an exception group), without the explain phase (it writes patch files and
# costs seconds).
settings.register_profile("grading", settings.get_profile("ci"), report_multiple_bugs=False,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# tiktoken downloads GPT-2's BPE files on first use. The suite ships them (tests/fixtures/tiktoken) and always
# reads its own copy, so it needs no network and no cache from outside; CLI tests inherit this variable.
os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiktoken")


# The test models are tiny: with several threads, each small matmul spends more time handing work between
# threads than computing (seen: 2.6 s against 37 s for test_reference.py on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    return torch.device(request.param)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running extras (training runs, big models); CI skips them")
