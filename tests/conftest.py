"""Markers: `slow` tests run with FA2LAB_SLOW=1 (or -m slow); `gpu` tests need CUDA and run
whenever it is present (pytest -m gpu on a GPU machine runs only them)."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("FA2LAB_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    skip_slow = pytest.mark.skip(reason="slow: set FA2LAB_SLOW=1 or pass -m slow to run it")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


# Without CUDA, Triton kernels run under Triton's CPU interpreter. The switch must be set before
# fa2lab.kernels is first imported (Triton reads it when a kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
