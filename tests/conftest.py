"""Test set-up: Triton runs under its CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be set before any ``@triton.jit`` is imported.

The ``device`` fixture is where the kernel tests put their tensors: a CUDA device when one is
present (and TRITON_INTERPRET is not set), else the CPU (the Triton interpreter, tiny shapes).
The same test functions thus run the Triton kernels on CUDA tensors on a GPU machine and
under the interpreter elsewhere.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

KERNEL_DEVICE = torch.device(
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu")


@pytest.fixture
def device() -> torch.device:
    """The device the kernel tests run on (CUDA when present, else the CPU under the Triton interpreter)."""
    return KERNEL_DEVICE


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny-matrix tests: much faster than several threads
    contending for few cores (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
