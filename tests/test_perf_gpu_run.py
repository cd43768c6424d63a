"""``./run.sh gpu --dry-run OUTDIR`` (perf/gpu_run.py): the GPU script's steps on the CPU, end to end,
with the Python that runs this suite and package downloads blocked; plus the step runner (a failed or
hung step is recorded and the later steps still run) and the correctness checks (they can fail)."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # perf/ lives at the repo root, beside tests/
from perf import gpu_checks, gpu_run  # noqa: E402
from perf.provenance import Commit, git_commit  # noqa: E402

# build, info, 2 driver modes, tests, correctness, past 2^31, timings, C++ bench, harness, racecheck, ncu
DRY_STEPS = 12


def test_a_failed_and_a_hung_step_are_recorded_and_later_steps_run(tmp_path):
    R = gpu_run.Runner(tmp_path, budget=60, reserve=0)
    py = sys.executable
    bad = R.step("fails", 20, [("fails", [py, "-c", "print('some log line'); raise SystemExit(3)"])])
    hung = R.step("hangs", 2, [("hangs", [py, "-c", "import time; print('started', flush=True); time.sleep(60)"])])
    good = R.step("runs after", 20, [("after", [py, "-c", "print('fine')"])])
    missing = R.step("tool missing", 20, lambda: "compute-sanitizer not found", optional=True)
    assert bad.status == "failed" and "fails exit 3" in bad.detail and "some log line" in bad.tail
    assert hung.status == "timeout" and "killed after 2 s" in hung.detail and hung.seconds < 20
    assert "killed after the step's limit" in (tmp_path / "hangs.log").read_text()
    assert good.status == "passed" and missing.status == "skipped" and missing.ok
    assert not bad.ok and not hung.ok


def test_a_step_beyond_the_budget_is_not_started(tmp_path):
    R = gpu_run.Runner(tmp_path, budget=3, reserve=0)
    st = R.step("late", 60, [("late", [sys.executable, "-c", "print(1)"])], later_min=10)
    assert st.status == "not run" and "budget" in st.detail and not st.ok
    assert not (tmp_path / "late.log").exists()


def test_commit_comes_from_gsops_commit_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("GSOPS_COMMIT", "abc1234 x/y")  # reduced to what a file name may hold
    assert git_commit(tmp_path) == Commit("abc1234xy", False, "GSOPS_COMMIT")
    monkeypatch.delenv("GSOPS_COMMIT")
    assert git_commit(tmp_path).sha == "unknown"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout: its HEAD, whatever GSOPS_COMMIT says
        monkeypatch.setenv("GSOPS_COMMIT", "abc1234")
        assert git_commit(ROOT).sha == head.stdout.strip() and git_commit(ROOT).source.startswith("git")


def test_correctness_case_fails_on_a_wrong_or_racy_kernel(monkeypatch):
    """The same check that passes the real kernels flags a wrong forward and a nondeterministic one."""
    from gsops.ops import dispatch
    from gsops.reference import gs_apply
    from gsops.reference.gs import gs_apply_backward

    def impls(name, bad_fwd):
        return bad_fwd, gs_apply_backward, dispatch.impl("cayley_exact", "torch")

    args = ("torch", torch.float32, 4, 5, 12, torch.device("cpu"))
    monkeypatch.setattr(gpu_checks, "_impls", lambda name: impls(name, gs_apply))
    assert gpu_checks.gs_case(*args)["passed"]
    monkeypatch.setattr(gpu_checks, "_impls", lambda name: impls(name, lambda x, L, R: 1.001 * gs_apply(x, L, R)))
    row = gpu_checks.gs_case(*args)
    assert not row["passed"] and row["checks"]["y"]["ratio"] > 1 and row["checks"]["dx"]["ratio"] <= 1
    monkeypatch.setattr(gpu_checks, "_impls",
                        lambda name: impls(name, lambda x, L, R: gs_apply(x, L, R) + 1e-7 * torch.randn_like(x)))
    row = gpu_checks.gs_case(*args)
    assert row["checks"]["y"]["ratio"] <= 1 and not row["repeat_bitwise_y"] and not row["passed"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="the dry run builds the CUDA emulator: needs g++")
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, GSOPS_VENV=str(tmp_path / "no-venv"),
               PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/blocked")  # any download would fail
    res = subprocess.run(["./run.sh", "gpu", "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    log = res.stdout[-6000:] + res.stderr[-3000:]
    assert res.returncode == 0, log
    assert not (tmp_path / "no-venv").exists()  # the given Python was used as it is
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    sha = git_commit(ROOT).sha
    for stem in ("correctness_cpu-dryrun_bf16-fp16-fp32_", "timings_cpu-dryrun_bf16_", "harness_cpu-dryrun_bf16_"):
        assert f"{stem}{sha}.csv" in files, files
    assert {"summary.md", f"results_cpu-dryrun_{sha}.json", f"logs_cpu-dryrun_{sha}.tar.gz"} <= set(files)

    doc = json.loads((out / f"results_cpu-dryrun_{sha}.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert len(steps) == DRY_STEPS, list(steps)
    assert [s["status"] for s in doc["steps"]].count("passed") == DRY_STEPS - 2, doc["steps"]
    assert all(s["status"] == "skipped" and "dry run" in s["detail"] for n, s in steps.items()
               if n.startswith(("compute-sanitizer", "ncu")))
    tests = next(s for n, s in steps.items() if n.startswith("GPU tests"))
    assert len(re.findall(r"\d+ passed", tests["detail"])) == len(gpu_run.GPU_TEST_FILES), tests["detail"]

    with open(out / f"correctness_cpu-dryrun_bf16-fp16-fp32_{sha}.csv") as f:
        rows = list(csv.DictReader(f))
    gs = [r for r in rows if r["op"] == "gs_apply"]
    assert {(r["backend"], r["dtype"]) for r in gs} == {(b, d) for b in ("cuda", "triton")
                                                        for d in ("bfloat16", "float16", "float32")}
    assert all(r["passed"] == "True" and r["repeat_bitwise_y"] == "True" for r in gs), gs
    assert any(r["tokens"] == "7" for r in gs)  # an odd token count
    with open(out / f"timings_cpu-dryrun_bf16_{sha}.csv") as f:
        trows = list(csv.DictReader(f))
    assert {("gs_apply fwd", "cuda"), ("gs_apply fwd", "triton"), ("copy y <- x", "torch")} <= \
        {(r["op"], r["backend"]) for r in trows}
    assert any(r["source"] == "gpu_bench" for r in trows)
    assert any("float32" in r["note"] for r in trows if r["backend"] == "torch.linalg.solve")

    summary = (out / "summary.md").read_text()
    assert "all steps passed" in summary and f"commit {sha}" in summary and "torch " + torch.__version__ in summary
    with tarfile.open(out / f"logs_cpu-dryrun_{sha}.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"driver-mma.log", "driver-fma.log", "gsops-info.log", "timings.log", "harness.log", "gpu-bench.log",
            "summary.md"} <= names, names
