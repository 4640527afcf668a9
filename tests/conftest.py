"""Shared test set-up: the repository root on sys.path, the device parameter, and the hypothesis profiles.

Every test that runs a model takes the `device` fixture: it runs once on "cpu" and once on "cuda",
and the cuda run is skipped on machines without a GPU (CI has none; the GPU runs are reported in the
closing notes and README).
"""

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# "ci" keeps the suite inside its time budget on 2 cores; "thorough" is for a local deep run:
#   HYPOTHESIS_PROFILE=thorough python -m pytest -q
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
