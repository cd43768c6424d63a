"""setup.py's CUDA extension switches (GSOPS_SKIP_CUDA / GSOPS_FORCE_CUDA), checked without building.

``python setup.py --name`` evaluates ``cuda_extension()`` (it runs at import of
setup.py) and prints only the name, so each case costs one interpreter start.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _setup(**env):
    full = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("GSOPS_SKIP_CUDA", "GSOPS_FORCE_CUDA"):
        full.pop(k, None)
    full.update(env)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=120)


def test_skip_cuda_skips_and_says_why():
    res = _setup(GSOPS_SKIP_CUDA="1")
    assert res.returncode == 0, res.stderr
    assert "gsops" in res.stdout
    assert "skipping the CUDA extension: GSOPS_SKIP_CUDA=1" in res.stderr


def test_force_cuda_turns_a_skip_into_an_error():
    res = _setup(GSOPS_SKIP_CUDA="1", GSOPS_FORCE_CUDA="1")
    assert res.returncode != 0
    assert "GSOPS_FORCE_CUDA=1 but the CUDA extension cannot be built: GSOPS_SKIP_CUDA=1" in res.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build: the extension would be built")
def test_cpu_torch_skips_with_the_reason():
    res = _setup()
    assert res.returncode == 0, res.stderr
    assert f"torch {torch.__version__} is a CPU build" in res.stderr


def _fake_toolkit(tmp_path):
    """A toolkit in real/ whose nvcc is reached through a wrapper script in wrap/bin (as on machines
    where /usr/local/bin/nvcc execs /usr/local/cuda-X.Y/bin/nvcc)."""
    real = tmp_path / "real"
    (real / "bin").mkdir(parents=True)
    (real / "include").mkdir()
    (real / "include" / "cuda_runtime.h").write_text("/* stand-in */\n")
    nvcc = real / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ _HERE_={real / "bin"}"\n')
    nvcc.chmod(0o755)
    wrap = tmp_path / "wrap" / "bin"
    wrap.mkdir(parents=True)
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    return real, wrap


def _toolkit(env):
    code = "import runpy, sys; sys.argv = ['setup.py', '--name']; print(repr(runpy.run_path('setup.py')['cuda_toolkit']()))"
    full = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    full.update(env, GSOPS_SKIP_CUDA="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return eval(res.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr of a tuple of str


def test_cuda_toolkit_found_through_an_nvcc_wrapper(tmp_path):
    """torch would guess wrap/ (the grandparent of `which nvcc`), whose include/ has no CUDA headers."""
    real, wrap = _fake_toolkit(tmp_path)
    root, how = _toolkit({"PATH": f"{wrap}:{os.environ['PATH']}"})
    assert (root, how) == (str(real), "nvcc --dryrun")


def test_cuda_home_is_respected_or_refused_with_the_reason(tmp_path):
    real, wrap = _fake_toolkit(tmp_path)
    assert _toolkit({"CUDA_HOME": str(real)}) == (str(real), "CUDA_HOME")
    root, why = _toolkit({"CUDA_HOME": str(wrap)})
    assert root is None and why == f"CUDA_HOME={wrap} has no bin/nvcc and include/cuda_runtime.h"
