"""DDP and FSDP2 (gloo, 2 CPU processes) fine-tuning equals one process with the doubled batch.

Runs ``examples/ddp_finetune.py`` under ``torchrun --nproc_per_node 2`` once (both engines in one
process group, to pay the start-up once); rank 0 repeats the run in one process and reports the
largest parameter difference, which must be within the float32 tolerance while the parameters
themselves moved by far more.
"""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "ddp_finetune.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("ddp") / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
           "--engine", "both", "--steps", "6", "--batch", "16", "--backend", "gloo", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_process_finetune_equals_single_process_double_batch(report, engine):
    if engine in report.get("unavailable", {}):
        pytest.skip(report["unavailable"][engine])
    assert report["world_size"] == 2 and report["global_batch"] == 2 * report["batch_per_process"]
    r = report["engines"][engine]
    assert r["max_abs_param_diff_vs_single_process"] <= report["tol"]
    # training moved the parameters by orders of magnitude more than the tolerance
    assert r["max_abs_param_change_from_init"] > 1000 * report["tol"]
