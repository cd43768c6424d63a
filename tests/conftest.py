"""Test set-up: Triton runs under its CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be set before any ``@triton.jit`` is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
