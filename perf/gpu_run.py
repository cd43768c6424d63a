"""``./run.sh gpu OUTDIR``: build, test and time everything on one GPU in one call (about 8 minutes).

    python -m perf.gpu_run OUTDIR              # on an H100/H200: sm_90 build, tests, correctness, timings
    python -m perf.gpu_run --dry-run OUTDIR    # the same steps on the CPU: Triton interpreter, the CUDA
                                               # emulator build (csrc/emu), tiny shapes; a few minutes

Steps, in order, each a child process with its own hard time limit inside one overall budget
(``--budget``, 480 s), a failure or time-out recorded and the later steps still run:

1. build: ``gsops._C`` for sm_90 only, in place (``setup.py build_ext --inplace``, ``MAX_JOBS`` from
   the core count), and the GPU test driver and bench (nvcc) at the same time;
2. ``python -m gsops.info``; the GPU test driver with and without the tensor-core path;
3. the GPU tests: tests/test_cuda_kernels.py and the Triton tests on CUDA tensors (one pytest
   process per file, in parallel);
4. correctness at real shapes on both backends (:mod:`perf.gpu_checks`), one case past 2^31 elements;
5. timings: the kernels against copy bandwidth and the dense GEMM, batched Cayley against
   ``torch.linalg.solve``, the C++ bench, and a short harness run (bf16, d = 4096);
6. if time remains: ``compute-sanitizer --tool racecheck`` on the test driver, ``ncu`` memory counters.

Nothing is downloaded. OUTDIR gets at most 8 files: ``summary.md``, ``results_<device>_<commit>.json``,
the CSVs (``correctness_<device>_<dtypes>_<commit>.csv``, ``timings_<device>_bf16_<commit>.csv``,
``harness_<device>_bf16_<commit>.csv``) and ``logs_<device>_<commit>.tar.gz`` with every log. The commit
is ``git rev-parse --short HEAD``, or ``GSOPS_COMMIT`` where the tree has no ``.git``.
Exit status 0 when every step that ran passed.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TEST_DEPS = ("pytest", "numpy", "safetensors")  # what the pytest step needs beyond torch
GPU_TEST_FILES = (
    ["tests/test_cuda_kernels.py"],
    ["tests/test_triton_gs_apply.py"],
    ["tests/test_triton_cayley.py", "tests/test_triton_conv_exp.py", "tests/test_triton_device_guard.py",
     "tests/test_ops_custom.py"],
)
# the dry run's subset (the emulator and the interpreter are slow): every file, a few tests each
DRY_RUN_SELECT = {
    "tests/test_cuda_kernels.py": "binding_checks or public_ops or many_tokens",
    "tests/test_triton_gs_apply.py": "matches_dense_float64 and 3-4-9 or batch_of_one or half_activations",
    "tests/test_triton_cayley.py": "identity_at_zero or half_inputs",
    "tests/test_triton_conv_exp.py": "dispatch",
    "tests/test_triton_device_guard.py": "mixed",
    "tests/test_ops_custom.py": "opcheck_cayley_ops and triton",
}
HARNESS_METHODS = ["base", "full", "lora", "peft_oft", "gsoft", "oft"]
NCU_METRICS = "dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sectors_op_read.sum,lts__t_sectors_op_write.sum"


# ----------------------------------------------------------------------------- running steps
@dataclass
class Step:
    name: str
    status: str = "not run"  # passed | failed | timeout | skipped | not run
    seconds: float = 0.0
    limit: float = 0.0
    detail: str = ""
    logs: list = field(default_factory=list)
    tail: str = ""  # last lines of a failed step's log
    optional: bool = False  # run only with time left; its time-out does not fail the run

    @property
    def ok(self) -> bool:
        return self.status in ("passed", "skipped") or (self.optional and self.status == "timeout")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_commands(cmds, limit: float, logdir: Path, env=None, cwd=ROOT) -> list[dict]:
    """Runs ``cmds`` ([(label, argv)]) at once, each in its own process group with its output in
    ``logdir/<label>.log``; kills whatever still runs after ``limit`` seconds.
    Returns per command: label, rc (None when killed), seconds, log, output."""
    procs = []
    for label, argv in cmds:
        log = logdir / f"{label}.log"
        f = open(log, "w")
        f.write("$ " + " ".join(map(str, argv)) + "\n")
        f.flush()
        try:
            p = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        except OSError as e:
            f.write(f"cannot start: {e}\n")
            f.close()
            procs.append((label, None, f, log, time.monotonic(), f"cannot start: {e}"))
            continue
        procs.append((label, p, f, log, time.monotonic(), None))
    deadline = time.monotonic() + limit
    out = []
    for label, p, f, log, t0, err in procs:
        rc = None
        if p is not None:
            try:
                rc = p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(p)
                p.wait()
                f.write(f"\n[gpu_run] killed after the step's limit of {limit:.0f} s\n")
        f.close()
        out.append(dict(label=label, rc=rc if err is None else -1, seconds=time.monotonic() - t0, log=log.name,
                        output=log.read_text(errors="replace"), start_error=err))
    return out


def _tail(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


class Runner:
    """Runs the steps in order inside one budget; records every step's result."""

    def __init__(self, logdir: Path, budget: float, reserve: float = 10.0):
        self.logdir = logdir
        self.t0 = time.monotonic()
        self.budget = budget
        self.reserve = reserve  # seconds kept for writing the results
        self.steps: list[Step] = []

    def remaining(self) -> float:
        return self.budget - self.reserve - (time.monotonic() - self.t0)

    def step(self, name: str, limit: float, cmds, env=None, check=None, optional: bool = False,
             later_min: float = 0.0) -> Step:
        """One step: ``cmds`` run in parallel under ``min(limit, what the budget leaves after
        ``later_min`` seconds for the steps still to come)``; ``check(results) -> (ok, detail)``
        judges the outputs (default: every exit status 0)."""
        st = Step(name, optional=optional)
        self.steps.append(st)
        allowed = min(limit, self.remaining() - later_min)
        if allowed < (min(limit, 30.0) if optional else min(limit, 5.0)):
            st.status = "skipped" if optional else "not run"
            st.detail = f"not run: {max(allowed, 0):.0f} s of the {self.budget:.0f} s budget left for it"
            print(f"[gpu_run] {name}: {st.status} ({st.detail})", flush=True)
            return st
        st.limit = allowed
        if callable(cmds):  # a reason not to run (missing tool or package): str, or the commands
            cmds = cmds()
            if isinstance(cmds, str):
                st.status, st.detail = ("skipped" if optional else "failed"), cmds
                print(f"[gpu_run] {name}: {st.status} ({cmds})", flush=True)
                return st
        t0 = time.monotonic()
        res = run_commands(cmds, allowed, self.logdir, env=env)
        st.seconds = time.monotonic() - t0
        st.logs = [r["log"] for r in res]
        killed = [r["label"] for r in res if r["rc"] is None]
        ok, detail = (check or _default_check)(res)
        if killed:
            st.status = "timeout"
            detail = f"killed after {allowed:.0f} s: {', '.join(killed)}; " + detail
        else:
            st.status = "passed" if ok else "failed"
        st.detail = detail
        if st.status != "passed":
            st.tail = "\n".join(f"[{r['label']}] " + _tail(r["output"]).replace("\n", f"\n[{r['label']}] ")
                                for r in res if r["rc"] != 0)
        print(f"[gpu_run] {name}: {st.status} in {st.seconds:.0f} s (limit {allowed:.0f} s) {detail[:200]}",
              flush=True)
        return st

    def record(self, name: str, status: str, detail: str) -> Step:
        st = Step(name, status=status, detail=detail)
        self.steps.append(st)
        print(f"[gpu_run] {name}: {status} {detail}", flush=True)
        return st


def _default_check(res):
    bad = [f"{r['label']} exit {r['rc']}" for r in res if r["rc"] != 0]
    return (not bad), ("; ".join(bad) if bad else "exit 0")


# ----------------------------------------------------------------------------- environment
def commit() -> tuple[str, str]:
    """(short commit, how it was found)."""
    if (ROOT / ".git").exists():
        try:
            sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                 check=True, timeout=30).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=30).stdout.strip()
            return sha, "git" + (" (uncommitted changes)" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    env = os.environ.get("GSOPS_COMMIT", "").strip()
    if env:
        return re.sub(r"[^A-Za-z0-9._-]", "", env)[:40], "GSOPS_COMMIT"
    return "unknown", "no .git and no GSOPS_COMMIT"


def nvcc_path() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "python_executable": PY, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "platform": platform.platform()}
    for mod in ("triton", "numpy", "pytest", "peft", "transformers"):
        spec = importlib.util.find_spec(mod)
        if spec is None:
            out[mod] = "not installed"
            continue
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"import failed ({type(e).__name__})"
    nv = nvcc_path()
    if nv:
        try:
            v = subprocess.run([nv, "--version"], capture_output=True, text=True, timeout=30).stdout
            out["nvcc"] = (re.findall(r"release [^\n]*", v) or [v.strip()[-60:]])[0]
        except (OSError, subprocess.SubprocessError) as e:
            out["nvcc"] = f"failed: {e}"
    else:
        out["nvcc"] = "not found"
    return out


def device_name(dry_run: bool) -> tuple[str, str]:
    """(name, file-name tag)."""
    import torch

    if dry_run:
        return f"CPU dry run ({platform.processor() or platform.machine()})", "cpu-dryrun"
    if not torch.cuda.is_available():
        return "no CUDA device", "nocuda"
    name = torch.cuda.get_device_name(0)
    return name, re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def missing_modules(names) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def py_module(module: str, env: dict) -> list:
    """``python -m module``; with the dry run's emulator build (``GSOPS_CUDA_EMULATOR`` in ``env``) through
    tests/cuda_emu_loader.py, which loads that build as ``gsops._C`` first (pytest's conftest does the same)."""
    if env.get("GSOPS_CUDA_EMULATOR"):
        return [PY, str(ROOT / "tests" / "cuda_emu_loader.py"), "-m", module]
    return [PY, "-m", module]


def child_env(dry_run: bool, extra=None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("GSOPS_BACKEND", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.pop("TRITON_INTERPRET", None)
        env.pop("GSOPS_CUDA_EMULATOR", None)
    env.update(extra or {})
    return env


# ----------------------------------------------------------------------------- the emulator build (dry run)
def emu_build(out_json: str) -> int:
    """Dry run's build step: the emulator builds of the test driver, the bench and the extension
    (objects cached in build/emu, shared with tests/test_csrc_emulated.py)."""
    spec = importlib.util.spec_from_file_location("gsops_csrc_emu_run", ROOT / "csrc" / "emu" / "run.py")
    emu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu)
    build = ROOT / "build" / "emu"
    csrc = ROOT / "csrc"
    driver = emu.build(build_dir=build)
    bench = emu.build(build_dir=build, sources=sorted(csrc.glob("*.cu")) + [csrc / "bench" / "gpu_bench.cu"],
                      exe_name="gsops_emu_bench")
    ext = emu.build_extension(build_dir=build)
    Path(out_json).write_text(json.dumps({"driver": str(driver), "bench": str(bench), "extension": ext.__file__}))
    print(f"driver {driver}\nbench {bench}\nextension {ext.__file__}")
    return 0


# ----------------------------------------------------------------------------- checks of step outputs
def _pytest_check(res):
    details, ok = [], True
    for r in res:
        m = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped|deselected|errors).*?) in [\d.]+s", r["output"],
                       re.M)
        line = m[-1] if m else "no pytest summary line"
        bad = r["rc"] != 0 or "failed" in line or "error" in line or "passed" not in line
        ok = ok and not bad
        details.append(f"{r['label']}: {line}" + (f" (exit {r['rc']})" if r["rc"] else ""))
    return ok, "; ".join(details)


def _driver_check(res):
    r = res[0]
    m = re.search(r"(\d+) checks, (\d+) failures", r["output"])
    if not m:
        return False, f"exit {r['rc']}, no summary line: {_tail(r['output'], 1)[:200]}"
    return r["rc"] == 0 and m.group(2) == "0", f"{m.group(1)} checks, {m.group(2)} failures, exit {r['rc']}"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.gpu_run", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", nargs="?")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU (interpreter, emulator)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together (default 480)")
    p.add_argument("--emu-build", metavar="JSON", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.emu_build:
        return emu_build(opts.emu_build)
    if not opts.outdir:
        p.error("OUTDIR is required")
    return run_all(Path(opts.outdir), opts.dry_run, opts.budget)


def run_all(outdir: Path, dry_run: bool, budget: float) -> int:
    import torch

    outdir.mkdir(parents=True, exist_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix="gsops-gpu-run-"))
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    sha, sha_how = commit()
    dev_name, tag = device_name(dry_run)
    vers = versions()
    (logdir / "versions.json").write_text(json.dumps(vers, indent=1))
    R = Runner(logdir, budget)
    env = child_env(dry_run)
    ncores = os.cpu_count() or 1
    gpu_build = ROOT / "build" / "gpu"
    if not dry_run and not torch.cuda.is_available():
        R.record("device", "failed", f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device; "
                                     f"use --dry-run on a machine without one")
    print(f"[gpu_run] {dev_name}, commit {sha} ({sha_how}), python {PY}, torch {torch.__version__}, "
          f"{ncores} cores, budget {budget:.0f} s, logs in {logdir}", flush=True)

    # 1. build --------------------------------------------------------------------------------
    emu_paths = {}
    if dry_run:
        R.step("build (emulator: driver, bench, extension)", 240,
               [("build-emulator", [PY, "-m", "perf.gpu_run", "--emu-build", logdir / "emu.json"])], env=env,
               later_min=120)
        if (logdir / "emu.json").exists():
            emu_paths = json.loads((logdir / "emu.json").read_text())
            env["GSOPS_CUDA_EMULATOR"] = emu_paths["extension"]
    else:
        def build_cmds():
            # what an earlier run built must not stand in for a build that fails now
            for old in [*ROOT.glob("gsops/_C*.so"), gpu_build / "gsops_gpu_test", gpu_build / "gsops_gpu_bench"]:
                old.unlink(missing_ok=True)
            nv = nvcc_path()
            # ninja builds with MAX_JOBS processes; without it setuptools' own -j parallelises the build
            ninja = shutil.which("ninja") or importlib.util.find_spec("ninja")
            cmds = [("build-extension", [PY, "setup.py", "build_ext", "--inplace"]
                     + ([] if ninja else ["-j", str(ncores)]))]
            if nv:
                gpu_build.mkdir(parents=True, exist_ok=True)
                script = gpu_build / "build.sh"
                flags = "-O3 -arch=sm_90 -lineinfo -std=c++17 -I" + str(ROOT / "csrc" / "include")
                srcs = {"gs_apply": "csrc/gs_apply.cu", "cayley": "csrc/cayley.cu", "conv_exp": "csrc/conv_exp.cu",
                        "driver": "csrc/tests/gpu_test_driver.cu", "bench": "csrc/bench/gpu_bench.cu"}
                lines = ["set -u", f"cd {ROOT}", "pids=()"]
                for stem, src in srcs.items():
                    lines.append(f"'{nv}' {flags} -c {src} -o {gpu_build}/{stem}.o & pids+=($!)")
                lines += ['st=0; for p in "${pids[@]}"; do wait $p || st=1; done; [ $st = 0 ] || exit 1',
                          f"k='{gpu_build}/gs_apply.o {gpu_build}/cayley.o {gpu_build}/conv_exp.o'",
                          f"'{nv}' -arch=sm_90 $k {gpu_build}/driver.o -o {gpu_build}/gsops_gpu_test || exit 1",
                          f"'{nv}' -arch=sm_90 $k {gpu_build}/bench.o -o {gpu_build}/gsops_gpu_bench || exit 1",
                          "echo built the GPU test driver and bench"]
                script.write_text("\n".join(lines) + "\n")
                cmds.append(("build-driver-bench", ["bash", script]))
            else:
                cmds.append(("build-driver-bench", [PY, "-c", "raise SystemExit('nvcc not found (CUDA_HOME, PATH, "
                                                              "/usr/local/cuda): the driver and bench are not built')"]))
            return cmds
        R.step("build (gsops._C for sm_90, in place; GPU test driver and bench)", 240, build_cmds,
               env=child_env(False, {"GSOPS_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0",
                                     "MAX_JOBS": str(ncores)}), later_min=150)

    # 2. info, test driver ------------------------------------------------------------------
    R.step("python -m gsops.info", 30, [("gsops-info", [*py_module("gsops.info", env)])], env=env,
           check=lambda res: (res[0]["rc"] == 0 and re.search(r"cuda\s+available", res[0]["output"]) is not None,
                              next((ln.strip() for ln in res[0]["output"].splitlines()
                                    if ln.strip().startswith("cuda ")), "no cuda line")), later_min=140)
    if dry_run:
        driver = emu_paths.get("driver")
        asan = {"ASAN_OPTIONS": "detect_leaks=0"}
        for label, extra in (("tensor cores", {}), ("no tensor cores, GSOPS_CUDA_NO_MMA=1", {"GSOPS_CUDA_NO_MMA": "1"})):
            cmds = (lambda e=extra: [("driver-" + ("fma" if e else "mma"), [driver, "gs"])]) if driver else \
                (lambda: "the emulator build of the driver is missing (build step failed)")
            R.step(f"GPU test driver under the emulator, group gs ({label})", 90, cmds,
                   env={**env, **asan, **extra}, check=_driver_check, later_min=120)
    else:
        exe = gpu_build / "gsops_gpu_test"
        for label, extra in (("tensor cores", {}), ("no tensor cores, GSOPS_CUDA_NO_MMA=1", {"GSOPS_CUDA_NO_MMA": "1"})):
            cmds = (lambda e=extra: [("driver-" + ("fma" if e else "mma"), [exe])]) if exe.exists() else \
                (lambda: "build/gpu/gsops_gpu_test is missing (build step failed)")
            R.step(f"GPU test driver ({label})", 60, cmds, env={**env, **extra}, check=_driver_check, later_min=130)

    # 3. GPU tests ----------------------------------------------------------------------------
    def test_cmds():
        miss = missing_modules(TEST_DEPS)
        if miss:
            return f"{PY} lacks {', '.join(miss)} (nothing is installed by this script)"
        cmds = []
        for i, files in enumerate(GPU_TEST_FILES):
            argv = [PY, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *files,
                    f"--junitxml={logdir / f'pytest-{i}.xml'}"]
            if dry_run:
                argv += ["-k", " or ".join(f"({DRY_RUN_SELECT[f]})" for f in files)]
            cmds.append((f"pytest-{i}-" + Path(files[0]).stem, argv))
        return cmds
    R.step("GPU tests (tests/test_cuda_kernels.py, Triton tests on "
           + ("CPU tensors under the interpreter)" if dry_run else "CUDA tensors)"), 180, test_cmds, env=env,
           check=_pytest_check, later_min=100)

    # 4. correctness ------------------------------------------------------------------------------
    corr_files, big_files, cmds, big_cmds = [], [], [], []
    tiny = ["--tiny"] if dry_run else []
    for be in ("cuda", "triton"):
        # one process per backend, dtype and half of the block sizes: Triton compiles in parallel, and a
        # fault (which ends a CUDA context) costs only that process's cases
        groups = [("bf16,fp16,fp32", None)] if dry_run else \
            [(dt, bl) for dt in ("bf16", "fp16", "fp32") for bl in ("8,16,24", "32,64,128")]
        for dt, bl in groups:
            label = f"correctness-{be}-{dt.replace(',', '-')}" + (f"-b{bl.replace(',', '-')}" if bl else "")
            f = logdir / f"{label}.jsonl"
            corr_files.append(f)
            cmds.append((label, [*py_module("perf.gpu_checks", env), "correctness", "--backend", be, "--dtypes", dt,
                                 "--out", f] + (["--blocks", bl] if bl else []) + tiny))
        f = logdir / f"correctness-{be}-big.jsonl"
        big_files.append(f)
        big_cmds.append((f"correctness-{be}-big", [*py_module("perf.gpu_checks", env), "correctness", "--backend", be,
                                                   "--big", "--out", f] + tiny))

    def corr_check(files):
        def check(res):
            every = [r for f in files for r in _read_jsonl(f)]
            skipped = [r for r in every if r.get("skipped")]
            rows = [r for r in every if not r.get("skipped")]
            bad = [r for r in rows if not r.get("passed")]
            ok = all(r["rc"] == 0 for r in res) and every and not bad
            crashed = [f"{r['label']} exit {r['rc']}: {_tail(r['output'], 1)[:150]}" for r in res
                       if r["rc"] not in (0, 1)]
            if not every:
                crashed += [f"{r['label']}: {_tail(r['output'], 1)[:150]}" for r in res[:1]]
            counts = f"{len(rows) - len(bad)} of {len(rows)} cases passed" + (
                f", {len(skipped)} skipped ({skipped[0]['skipped']})" if skipped else "")
            return bool(ok), "; ".join(crashed + [counts]) + (
                "; failed: " + ", ".join(f"{r['op']} {r['backend']} {r['dtype']} b={r['b']} t={r['tokens']}"
                                         for r in bad[:8]) if bad else "")
        return check
    R.step("correctness at real shapes (both backends, bf16/fp16/fp32, NaN-filled outputs, twice)"
           if not dry_run else "correctness (both backends, tiny shapes)", 150, cmds, env=env,
           check=corr_check(corr_files), later_min=100)
    R.step("correctness past 2^31 elements (both backends, bf16, b=32)", 60, big_cmds, env=env,
           check=corr_check(big_files), later_min=70)
    corr_files += big_files

    # 5. timings ------------------------------------------------------------------------------
    timing_json = logdir / "timings.json"
    bench_cmd = None
    if dry_run and emu_paths.get("bench"):
        bench_cmd = [emu_paths["bench"], "--tokens", "64", "--d", "128", "--blocks", "16", "--reps", "1",
                     "--conv-batch", "1", "--cayley-mats", "2"]
    elif not dry_run and (gpu_build / "gsops_gpu_bench").exists():
        bench_cmd = [gpu_build / "gsops_gpu_bench"]
    R.step("timings: GS kernels vs copy and dense GEMM, Cayley vs torch.linalg.solve (CUDA events)", 90,
           [("timings", [*py_module("perf.gpu_checks", env), "timings", "--dtype", "bf16", "--out", timing_json]
             + (["--tiny"] if dry_run else []))], env=env, later_min=60)
    R.step("C++ bench (csrc/bench/gpu_bench.cu)" + (" under the emulator" if dry_run else ""), 45,
           (lambda: [("gpu-bench", bench_cmd)]) if bench_cmd else (lambda: "the bench binary is missing (build step)"),
           env={**env, "ASAN_OPTIONS": "detect_leaks=0"}, later_min=50,
           check=lambda res: (res[0]["rc"] == 0 and "gsops GPU bench: done" in res[0]["output"],
                              f"exit {res[0]['rc']}, " + _tail(res[0]["output"], 1)))
    harness_dir = logdir / "harness"
    methods = list(HARNESS_METHODS)
    no_peft = missing_modules(["peft", "transformers"])
    if no_peft:
        methods = [m for m in methods if m not in ("lora", "peft_oft")]
    hargs = [*py_module("perf.harness", env), "--dtype", "bf16", "--methods", ",".join(methods), "--no-conv", "--no-micro",
             "--no-plot", "--no-density", "--quiet", "--out-dir", harness_dir]
    hargs += ["--device", "cpu", "--tiny"] if dry_run else ["--device", "cuda", "--sizes", "4096", "--tokens", "16384",
                                                            "--quick", "--rounds", "2", "--row-seconds", "0.5"]
    hs = R.step("harness (" + ",".join(methods) + (", tiny CPU shapes)" if dry_run else ", bf16, d=4096)"), 90,
                [("harness", hargs)], env=env, later_min=0)
    if no_peft:
        hs.detail += f"; PEFT rows lora, peft_oft skipped: {', '.join(no_peft)} not installed"

    # 6. sanitizer, ncu: only with time left ----------------------------------------------------------
    def tool_cmds(tool, argv_fn):
        def make():
            if dry_run:
                return "dry run: no GPU"
            path = shutil.which(tool) or next((str(p) for p in [Path(nvcc_path() or "/x").parent / tool]
                                               if p.exists()), None)
            if not path:
                return f"{tool} not found"
            if not (gpu_build / "gsops_gpu_test").exists():
                return "the GPU test driver is missing (build step)"
            return [(tool, [path, *argv_fn()])]
        return make
    R.step("compute-sanitizer --tool racecheck (test driver, gs cayley)", 120,
           tool_cmds("compute-sanitizer", lambda: ["--tool", "racecheck", "--racecheck-report", "hazard",
                                                   "--error-exitcode", "1", gpu_build / "gsops_gpu_test", "gs",
                                                   "cayley"]),
           env=env, optional=True)
    R.step("ncu memory counters (bench, b=32)", 90,
           tool_cmds("ncu", lambda: ["--metrics", NCU_METRICS, "-k", "regex:bdp|block|grad", "-c", "6",
                                     gpu_build / "gsops_gpu_bench", "--blocks", "32", "--reps", "1", "--conv-batch",
                                     "1", "--cayley-mats", "1"]),
           env=env, optional=True)

    return write_results(outdir, logdir, R, dict(
        created_utc=created, commit=sha, commit_source=sha_how, device=dev_name, tag=tag, dry_run=dry_run,
        versions=vers, budget_s=budget, cores=ncores), corr_files, timing_json, harness_dir)


# ----------------------------------------------------------------------------- results
def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def write_results(outdir: Path, logdir: Path, R: Runner, meta: dict, corr_files, timing_json: Path,
                  harness_dir: Path) -> int:
    tag, sha = meta["tag"], meta["commit"]
    corr = [r for f in corr_files for r in _read_jsonl(f)]
    timings = json.loads(timing_json.read_text()) if timing_json.exists() else {}
    bench_log = logdir / "gpu-bench.log"
    bench_rows = [ln.split(",")[1:] for ln in (bench_log.read_text(errors="replace").splitlines()
                                               if bench_log.exists() else []) if ln.startswith("csv,")]
    harness_csv = sorted(harness_dir.glob("harness_*.csv")) if harness_dir.exists() else []
    files = {}
    # correctness CSV
    dts = "bf16-fp16-fp32"
    files["correctness"] = outdir / f"correctness_{tag}_{dts}_{sha}.csv"
    keys = ["op", "backend", "dtype", "b", "tokens", "d", "passed", "max_ratio", "repeat_bitwise_y",
            "repeat_bitwise_dx", "repeat_max_diff_dLdR", "kernel_s", "error", "skipped", "warnings", "checks"]
    with open(files["correctness"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in corr:
            w.writerow({k: json.dumps(r[k]) if isinstance(r.get(k), (dict, list)) else r.get(k, "") for k in keys})
    files["timings"] = outdir / f"timings_{tag}_bf16_{sha}.csv"
    tkeys = ["source", "op", "backend", "dtype", "b", "ms", "gbps", "copy_pct", "x_dense_gemm", "x_solve", "note",
             "error"]
    with open(files["timings"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=tkeys, extrasaction="ignore")
        w.writeheader()
        for r in timings.get("rows", []):
            w.writerow({"source": "perf.gpu_checks", "dtype": r.get("dtype", "bfloat16"), **r})
        for br in bench_rows:
            if len(br) >= 5:
                w.writerow({"source": "gpu_bench", "op": br[0], "backend": "cuda", "dtype": "bf16" if "fp32" not in
                            br[0] else "fp32", "b": br[1], "ms": br[2], "gbps": br[3], "copy_pct": br[4]})
    if harness_csv:
        files["harness"] = outdir / f"harness_{tag}_bf16_{sha}.csv"
        shutil.copyfile(harness_csv[0], files["harness"])
    summary = summarize(R, meta, corr, timings, bench_rows, files.get("harness"))
    files["summary"] = outdir / "summary.md"
    files["summary"].write_text(summary)
    files["results"] = outdir / f"results_{tag}_{sha}.json"
    files["results"].write_text(json.dumps(dict(meta, steps=[asdict(s) for s in R.steps], correctness=corr,
                                                 timings=timings, gpu_bench=bench_rows), indent=1, default=str))
    shutil.copyfile(files["summary"], logdir / "summary.md")
    files["logs"] = outdir / f"logs_{tag}_{sha}.tar.gz"
    with tarfile.open(files["logs"], "w:gz") as tar:
        tar.add(logdir, arcname=f"logs_{tag}_{sha}")
    shutil.rmtree(logdir, ignore_errors=True)
    print(summary)
    print("[gpu_run] wrote " + ", ".join(str(p) for p in files.values()))
    return 0 if all(s.ok for s in R.steps) else 1


def headline(corr, timings, harness_csv) -> list[str]:
    """A few bullets: correctness count, GS forward at b = 32 against copy and GEMM, Cayley against
    solve, GSOFT in the harness against the frozen layer."""
    out = []
    ran = [r for r in corr if not r.get("skipped")]
    if ran:
        out.append(f"- correctness: {sum(bool(r.get('passed')) for r in ran)} of {len(ran)} cases passed")
    rows = [r for r in timings.get("rows", []) if "ms" in r]
    bs = sorted({r["b"] for r in rows if r["op"] == "gs_apply fwd"})
    b = 32 if 32 in bs else (bs[len(bs) // 2] if bs else None)
    for r in rows:
        if r["op"] in ("gs_apply fwd", "gs_apply bwd") and r["b"] == b:
            out.append(f"- {r['op']} {r['backend']} b={b}: {r['ms']:.4f} ms, {r['copy_pct']:.0f}% of copy bandwidth, "
                       f"{r['x_dense_gemm']:.2f}x the dense GEMM" + (" pair" if "bwd" in r["op"] else ""))
        if r["op"].startswith("cayley") and r.get("x_solve") and r.get("dtype") == "float32":
            out.append(f"- {r['op']} b={r['b']} fp32 {r['backend']}: {r['ms']:.4f} ms, {r['x_solve']:.2f}x "
                       f"torch.linalg.solve")
    if harness_csv:
        with open(harness_csv) as f:
            for r in csv.DictReader(f):
                if r["method"].startswith("gsoft") and r["ratio_to_base"]:
                    out.append(f"- harness {r['method']} d={r['d']}: {float(r['ratio_to_base']):.2f}x the frozen layer")
    return (["", "## Headline", ""] + out) if out else []


def summarize(R: Runner, meta: dict, corr, timings, bench_rows, harness_csv) -> str:
    v = meta["versions"]
    n_pass = sum(s.status == "passed" for s in R.steps)
    failed = [s for s in R.steps if not s.ok]
    L = [f"# gsops GPU run{' (dry run on the CPU)' if meta['dry_run'] else ''}: {meta['device']}", "",
         f"- result: **{'all steps passed' if not failed else f'{len(failed)} step(s) failed'}** "
         f"({n_pass} passed, {sum(s.status == 'skipped' for s in R.steps)} skipped, {len(failed)} failed or not run)",
         f"- commit {meta['commit']} ({meta['commit_source']}), {meta['created_utc']}, "
         f"{meta['cores']} cores, budget {meta['budget_s']:.0f} s, total {sum(s.seconds for s in R.steps):.0f} s",
         f"- python {v['python']} ({v['python_executable']}), torch {v['torch']} (CUDA {v['torch_cuda']}), "
         f"triton {v.get('triton')}, nvcc {v.get('nvcc')}, peft {v.get('peft')}, transformers {v.get('transformers')}",
         ]
    L += headline(corr, timings, harness_csv)
    L += ["", "## Steps", "", "| step | status | s | limit | detail |", "|---|---|---|---|---|"]
    for s in R.steps:
        L.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.limit:.0f} | {s.detail.replace('|', '/')[:300]} |")
    if failed:
        L += ["", "## Failures (last log lines)", ""]
        for s in failed:
            L += [f"### {s.name}: {s.status}", "", "```", (s.tail or s.detail)[-2500:], "```", ""]
    L += ["", "## Correctness", ""]
    if corr:
        ran = [r for r in corr if not r.get("skipped")]
        bad = [r for r in ran if not r.get("passed")]
        L.append(f"{len(ran) - len(bad)} of {len(ran)} cases passed (max error / tolerance over all: "
                 f"{_fmt(max([(r.get('max_ratio') or 0) for r in ran] or [0]))}; pass <= 1).")
        races = [r for r in corr if r.get("repeat_bitwise_y") is False or r.get("repeat_bitwise_dx") is False]
        L.append(f"Runs differing bit for bit between the two runs (forward or input gradient): {len(races)}.")
        warned = [r for r in corr if r.get("warnings")]
        if warned:
            L.append(f"Cases where the backend warned (e.g. used the reference path): {len(warned)}; first: "
                     f"{warned[0]['backend']} {warned[0]['dtype']} b={warned[0]['b']}: {warned[0]['warnings'][0][:200]}")
        for r in bad[:20]:
            L.append(f"- FAIL {r['op']} {r['backend']} {r['dtype']} b={r['b']} tokens={r['tokens']} d={r.get('d')}: "
                     f"ratio {_fmt(r.get('max_ratio'))} {r.get('error', '')}")
        for r in corr:
            if r.get("skipped"):
                L.append(f"- skipped {r['op']} {r['backend']}: {r['skipped']}")
        big = [r for r in corr if "2^31" in r["op"] and not r.get("skipped")]
        for r in big:
            L.append(f"- {r['op']} {r['backend']}: {'passed' if r.get('passed') else 'FAILED'} "
                     f"({r.get('elements', '?')} elements, ratio {_fmt(r.get('max_ratio'))}) {r.get('error', '')}")
    else:
        L.append("no correctness rows (see the step above)")
    L += ["", f"## Timings ({timings.get('timing', 'none')}; bf16, {timings.get('tokens', '?')} tokens x "
          f"d={timings.get('d', '?')})", ""]
    rows = timings.get("rows", [])
    if rows:
        L += ["| op | backend | b | ms | GB/s | % of copy | x dense GEMM | note |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                L.append(f"| {r['op']} | {r['backend']} | {r['b']} | error | | | | {r['error'][:120]} |")
                continue
            extra = f"{_fmt(r.get('x_solve'), '.2f')}x solve" if r.get("x_solve") else ""
            op = r["op"] + (f" ({r['dtype']})" if r.get("dtype") else "")
            L.append(f"| {op} | {r['backend']} | {r['b']} | {_fmt(r['ms'], '.4f')} | {_fmt(r.get('gbps'), '.0f')} "
                     f"| {_fmt(r.get('copy_pct'), '.0f')} | {_fmt(r.get('x_dense_gemm'), '.2f')} | "
                     f"{(r.get('note') or '')} {extra} |")
    if bench_rows:
        L += ["", "C++ bench (csrc/bench/gpu_bench.cu, bf16 unless named):", "",
              "| op | b | ms | GB/s | % of copy |", "|---|---|---|---|---|"]
        L += [f"| {' | '.join(br[:5])} |" for br in bench_rows if len(br) >= 5]
    if harness_csv:
        L += ["", "## Harness (one training step of an adapted Linear)", "",
              "| method | ms | x frozen | status |", "|---|---|---|---|"]
        with open(harness_csv) as f:
            for r in csv.DictReader(f):
                ms = f"{float(r['time_ms']):.3f}" if r["time_ms"] else "-"
                ratio = f"{float(r['ratio_to_base']):.2f}" if r["ratio_to_base"] else "-"
                L.append(f"| {r['method']} | {ms} | {ratio} | {r['status'][:100]} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
