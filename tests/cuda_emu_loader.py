"""Loads the CPU emulator build of the CUDA extension (``python csrc/emu/run.py --extension``) as
``gsops._C``, so that ``gsops.backends.load("cuda")`` runs the CUDA kernels on CPU tensors.

The product knows nothing of the emulator: its cuda backend imports ``gsops._C`` and runs on
tensors of ``gsops._C.device_type`` (the emulator build says ``"cpu"``). This test tool puts the
emulator build in ``sys.modules["gsops._C"]`` before the backend loads.

* ``install(path)``: load the build at ``path`` (``ImportError`` naming the path otherwise);
* ``install_from_env()``: the same for ``GSOPS_CUDA_EMULATOR=<path>`` when it is set (tests/conftest.py
  calls it, so ``GSOPS_CUDA_EMULATOR=<path> python -m pytest ...`` tests the emulated backend);
* ``python tests/cuda_emu_loader.py -m MODULE ARGS...``: ``install_from_env()``, then run MODULE as
  ``python -m`` would.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import runpy
import sys

ENV = "GSOPS_CUDA_EMULATOR"


def install(path: str):
    """Load the emulator build at ``path`` as ``gsops._C``; returns the module."""
    import torch  # noqa: F401  (the build links against torch's libraries: load them first)

    name = os.path.basename(path).split(".")[0]
    try:
        loader = importlib.machinery.ExtensionFileLoader(name, path)
        spec = importlib.util.spec_from_file_location(name, path, loader=loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
    except (ImportError, OSError) as e:
        raise ImportError(f"{ENV}={path} cannot be loaded ({e}); build it with python csrc/emu/run.py --extension") from None
    if getattr(mod, "device_type", "cuda") != "cpu":
        raise ImportError(f"{ENV}={path} is not an emulator build of csrc/bindings.cpp (device_type is not 'cpu')")
    sys.modules["gsops._C"] = mod
    return mod


def install_from_env():
    path = os.environ.get(ENV, "")
    return install(path) if path else None


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: python tests/cuda_emu_loader.py -m MODULE [ARGS...]")
    install_from_env()
    module = sys.argv[2]
    sys.argv = [module] + sys.argv[3:]
    sys.path.insert(0, os.getcwd())
    runpy.run_module(module, run_name="__main__", alter_sys=True)
