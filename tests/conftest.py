"""Test set-up: Triton runs under its CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be set before any ``@triton.jit`` is imported.

The ``device`` fixture is where the kernel tests put their tensors: a CUDA device when one is
present (and TRITON_INTERPRET is not set), else the CPU (the Triton interpreter, tiny shapes).
The same test functions thus run the Triton kernels on CUDA tensors on a GPU machine and
under the interpreter elsewhere.

The files are named by the layer they test, lowest first: ``test_checks``, ``test_flags``,
``test_perm`` (base modules); ``test_reference_*`` (the op references against float64 loops);
``test_ops_*`` (custom ops, dispatch, fuzzing of the public ops); ``test_triton_*`` (Triton
kernels); ``test_csrc_*`` / ``test_cuda_*`` (CUDA sources, build, emulator, backend); ``test_nn_*``
(layers); ``test_methods_*``; ``test_adapters_*`` (model verbs, files, PEFT); ``test_models_*``;
``test_perf_*`` (the harness and its tools); ``test_e2e_*`` (whole workflows); ``test_layers`` and
``test_packaging`` (the import layers and the installed package).
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
def _environment_restored():
    """Every test leaves os.environ as it found it. PEFT's BOFT sets CC=gcc and CXX=gcc while it tries
    to build its CUDA extension and leaves them set when the build fails (no CUDA): a later C++ build
    (cmake, the CUDA emulator) would then link C++ with gcc."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


_EMPTY = (torch.empty, torch.empty_like, torch.Tensor.new_empty)


def _poisoned(fn):
    def empty(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.is_floating_point() and t.device.type != "meta":
            t.fill_(float("nan"))
        return t
    return empty


@pytest.fixture(autouse=True)
def _nan_poisoned_empty(monkeypatch):
    """``torch.empty`` / ``torch.empty_like`` / ``Tensor.new_empty`` return NaN-filled floating tensors in
    every test (flash-linear-attention's habit), so a kernel or launcher that leaves part of an output
    unwritten fails loudly instead of reading stale memory."""
    monkeypatch.setattr(torch, "empty", _poisoned(_EMPTY[0]))
    monkeypatch.setattr(torch, "empty_like", _poisoned(_EMPTY[1]))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(_EMPTY[2]))
    yield
