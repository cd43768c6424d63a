"""What installing gsops puts on ``sys.path``: the Triton kernels live inside the gsops namespace."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code, cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


FIND = ("import importlib.util, gsops, gsops.triton_kernels.gs_apply as k; "
        "s = importlib.util.find_spec('triton_kernels'); "
        "print(k.__file__); print(s.origin if s and s.origin else (list(s.submodule_search_locations) if s else None))")


def test_top_level_triton_kernels_is_never_ours_when_installed(tmp_path):
    """From outside the checkout (the installed gsops): ``gsops.triton_kernels`` is ours, ``triton_kernels`` is not."""
    kernels, top = _run(FIND, tmp_path).splitlines()
    assert Path(kernels).resolve().parent == (ROOT / "triton_kernels").resolve() or "site-packages" in kernels
    assert top == "None" or str(ROOT) not in top, top


def test_source_checkout_binds_the_kernel_folder(tmp_path):
    """A checkout on sys.path without an install (as on a GPU node) gets the same name (the checkout's own
    top-level folder is on sys.path then, as any folder of a directory on sys.path is)."""
    kernels, _ = _run(FIND, tmp_path, pythonpath=str(ROOT)).splitlines()
    assert Path(kernels).resolve() == (ROOT / "triton_kernels" / "gs_apply.py").resolve()
