"""Make the emulator build of csrc/bindings.cpp the module ``gsops._C``, for tests without a GPU.

    python tools/cuda_emu/run.py --extension      # builds it, prints the path of the .so
    python tools/cuda_emu/loader.py EXT.so -m pytest -q tests/test_cuda_kernels.py
    python tools/cuda_emu/loader.py EXT.so -m gsops.info

or, in a process that has not loaded the cuda backend yet::

    from tools.cuda_emu.loader import install
    install("build/emu/ext/gsops_emu_C.so")
    gsops.backends.load("cuda")        # the binding and kernels, run on CPU tensors

The product does not know about the emulator: :func:`install` puts the module into
``sys.modules["gsops._C"]``, where ``from gsops import _C`` finds it. The module says which
tensors it takes in ``device_type`` (``"cpu"`` here, ``"cuda"`` for the real build).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import runpy
import sys

BUILD_HINT = "python tools/cuda_emu/run.py --extension"


def load(path) -> object:
    """The emulator build at ``path``, loaded (not installed). Raises ImportError naming the path
    and how to build it when the file cannot be loaded or is not an emulator build."""
    import torch  # noqa: F401  (loads libtorch and libc10, which the extension links against)

    path = os.fspath(path)
    name = os.path.basename(path).split(".")[0]
    try:
        loader = importlib.machinery.ExtensionFileLoader(name, path)
        spec = importlib.util.spec_from_file_location(name, path, loader=loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
    except (ImportError, OSError) as e:
        raise ImportError(f"the CUDA emulator build {path} cannot be loaded ({e}); build it with {BUILD_HINT}") from None
    device_type = getattr(mod, "device_type", None)
    if device_type != "cpu":
        raise ImportError(f"{path} is not an emulator build of csrc/bindings.cpp: its device_type is "
                          f"{device_type!r}, the emulator build's is 'cpu' ({BUILD_HINT})")
    return mod


def install(path) -> object:
    """Loads the emulator build at ``path`` and makes it ``gsops._C``; returns the module.

    Must run before the cuda backend is loaded (``gsops.backends.load("cuda")`` imports ``gsops._C``
    once); raises RuntimeError otherwise, and when another ``gsops._C`` is already imported."""
    backends = sys.modules.get("gsops.backends")
    # gsops.backends remembers a load, successful or not, in its _loaded table
    if "gsops.backends.cuda_backend" in sys.modules or "cuda" in getattr(backends, "_loaded", {}):
        raise RuntimeError("install the CUDA emulator build before the cuda backend is loaded "
                           "(gsops.backends.load('cuda') has already run)")
    current = sys.modules.get("gsops._C")
    if current is not None:
        if getattr(current, "__file__", None) == os.path.abspath(os.fspath(path)):
            return current
        raise RuntimeError(f"gsops._C is already imported ({getattr(current, '__file__', current)})")
    mod = load(os.path.abspath(os.fspath(path)))
    sys.modules["gsops._C"] = mod
    parent = sys.modules.get("gsops")
    if parent is not None:
        parent._C = mod
    return mod


def main(argv=None) -> int:
    """``loader.py EXT -m MODULE ARGS...``: install ``EXT``, then run ``MODULE`` as ``python -m`` would."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "-m":
        print(f"usage: python {os.path.relpath(__file__)} EXT.so -m MODULE [ARGS...]", file=sys.stderr)
        return 2
    ext, module, rest = argv[0], argv[2], argv[3:]
    install(ext)
    sys.argv = [module, *rest]
    sys.path[0] = os.getcwd()  # as under python -m: the working directory, not this file's folder
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
