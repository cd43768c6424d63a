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
