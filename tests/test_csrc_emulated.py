"""The CUDA kernels of csrc/ executed on the CPU under the gsops CUDA emulator (csrc/emu).

No GPU in CI, so ``csrc/tests/gpu_test_driver.cu`` (every launcher against naive double
loops) is compiled with g++ against ``csrc/emu/include`` and run:

* three ways: sm_90 with the WMMA tensor-core path for fp16/bf16, the fp32-FMA path
  (GSOPS_CUDA_NO_MMA=1), and threads run last-to-first between barriers;
* with AddressSanitizer and UBSan on the kernels (out-of-bounds global or shared memory,
  signed overflow in index arithmetic), and the emulator's own checks (barrier divergence,
  launch limits, WMMA alignment and warp uniformity; see csrc/emu/include/gsops_emu.h).

The emulator must be able to fail: its self-test kernels break each rule, and three
mutations of the real kernels (a missing barrier in gs_apply.cu and in cayley.cu, shared
memory one float too small) must be caught by the same driver. A GPU run stays the final word.
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "emu"


def _load_runner():
    spec = importlib.util.spec_from_file_location("gsops_csrc_emu_run", CSRC / "emu" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


emu = _load_runner()
CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not found: the CUDA emulator needs a C++17 compiler")

# (file, text to replace, replacement, driver group, mode, what the driver/emulator must print)
MUTATIONS = {
    "gs_missing_barrier": (
        "gs_apply.cu",
        "  __syncthreads();\n  bdp_store_tile(",
        "  bdp_store_tile(",
        "gs", "fma", "FAIL: block_diag_perm",
    ),
    "cayley_missing_barrier": (
        "cayley.cu",
        "    gj_scale_row(A, col, b, p, threadIdx.x, blockDim.x);\n    __syncthreads();\n",
        "    gj_scale_row(A, col, b, p, threadIdx.x, blockDim.x);\n",
        # in forward order the thread that scaled A[p][j] always ran first: only the reverse order shows it
        "cayley", "reverse", "FAIL: cayley",
    ),
    "gs_smem_too_small": (
        "gs_apply.cu",
        "const size_t smem = sizeof(float) * ((size_t)b * b + (size_t)tile * b);",
        "const size_t smem = sizeof(float) * ((size_t)b * b + (size_t)tile * b - 1);",
        "gs", "fma", "AddressSanitizer",
    ),
}


def _mutated_tree(tmp: Path, name: str) -> Path:
    fname, old, new, *_ = MUTATIONS[name]
    tree = tmp / name / "csrc"
    shutil.copytree(CSRC, tree, ignore=shutil.ignore_patterns("emu"))
    text = (tree / fname).read_text()
    assert text.count(old) == 1, f"mutation {name}: the text to replace is not in csrc/{fname} exactly once"
    (tree / fname).write_text(text.replace(old, new))
    return tree


def _require_sanitizers(tmp):
    """The kernels are built with AddressSanitizer + UBSan: say so and skip where g++ cannot link them."""
    probe = tmp / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    flags = [f for f in emu._flags(CSRC, True) if f.startswith("-fsanitize") or f.startswith("-fno-sanitize")]
    res = subprocess.run([CXX, *flags, str(probe), "-o", str(tmp / "probe")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"g++ cannot build with {' '.join(flags)}: {res.stderr.strip()[:300]}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds the driver, the self-test and the mutants (objects cached in build/emu), then runs
    every driver mode and mutant at once (the runs are independent processes)."""
    tmp = tmp_path_factory.mktemp("emu")
    _require_sanitizers(tmp)
    exe = emu.build(build_dir=BUILD)  # first: the mutants reuse its objects except the mutated file
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        selftest = pool.submit(
            emu.build, build_dir=BUILD, sources=[CSRC / "emu" / "selftest.cu"], exe_name="gsops_emu_selftest"
        )
        mutants = {
            name: pool.submit(emu.build, csrc=_mutated_tree(tmp, name), build_dir=BUILD,
                              exe_name=f"gsops_emu_mutant_{name}")
            for name in MUTATIONS
        }
        selftest = selftest.result()
        mutants = {name: f.result() for name, f in mutants.items()}
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        modes = {m: pool.submit(emu.run, exe, m, (), 900, {"GSOPS_EMU_STATS": "1"}) for m in emu.MODES}
        mut = {n: pool.submit(emu.run, mutants[n], MUTATIONS[n][4], (MUTATIONS[n][3],)) for n in MUTATIONS}
        return {
            "selftest": selftest,
            "modes": {m: f.result() for m, f in modes.items()},
            "mutants": {n: f.result() for n, f in mut.items()},
        }


@pytest.mark.parametrize("mode", sorted(emu.MODES))
def test_driver_passes_under_emulation(built, mode):
    res = built["modes"][mode]
    out = res.stdout
    assert "gsops CPU emulator" in out, out[-2000:]
    m = re.search(r"(\d+) checks, (\d+) failures", out)
    assert m, out[-3000:]
    checks, failures = int(m.group(1)), int(m.group(2))
    assert failures == 0 and res.returncode == 0, out[-6000:]
    assert checks >= 400, f"only {checks} checks ran"
    assert "emulator error" not in out and "AddressSanitizer" not in out.replace("ASan doesn't fully support", "")
    stats = re.search(r"launches=(\d+) blocks=(\d+) barrier_rounds=(\d+) mma_sync=(\d+)", out)
    assert stats, out[-2000:]
    launches, blocks, rounds, mma = map(int, stats.groups())
    assert launches > 100 and blocks > launches and rounds > 0
    # fp16/bf16 with b % 16 == 0 ran on the tensor-core path in the sm_90 modes, never with NO_MMA
    if mode == "fma":
        assert mma == 0
    else:
        assert mma > 0


def test_emulator_selftest_passes(built):
    res = emu.run(built["selftest"], "mma", ("ok",))
    assert res.returncode == 0 and "selftest ok" in res.stdout, res.stdout[-3000:]


@pytest.mark.parametrize(
    "case, message",
    [
        ("divergent", r"32 of 64 threads wait at __syncthreads\(\) \(.*selftest.cu:\d+\) while 32 exited"),
        ("two_sites", r"threads wait at two different __syncthreads\(\)"),
        ("late_barrier", r"in block 1 but not in block 0"),
        ("wmma_divergent", r"lanes of warp 0 issue wmma::mma_sync call 0 with different fragments"),
        ("wmma_misaligned", r"wmma::load_matrix_sync pointer 0x[0-9a-f]+ is not 256-bit aligned"),
    ],
)
def test_emulator_detects(built, case, message):
    res = emu.run(built["selftest"], "mma", (case,))
    assert res.returncode != 0, res.stdout[-3000:]
    assert re.search("gsops emulator error: .*" + message, res.stdout), res.stdout[-3000:]


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutated_kernel_is_caught(built, name):
    res = built["mutants"][name]
    expected = MUTATIONS[name][5]
    assert res.returncode != 0, f"mutant {name} passed the driver:\n{res.stdout[-3000:]}"
    assert expected in res.stdout, res.stdout[-3000:]


def test_translation_rewrites_launches_and_dynamic_shared_memory():
    src = (
        "template <typename T> __global__ void k(T* y) { extern __shared__ __align__(16) unsigned char buf[]; }\n"
        "void f(float* y, cudaStream_t s) {\n"
        "  k<float><<<dim3(2), 64, 128,\n      s>>>(y);\n"
        "  other<<<1, 32>>>(y, 3);\n}\n"
    )
    out = emu.translate(src, "x.cu")
    assert out.startswith('#line 1 "x.cu"\n')
    assert 'unsigned char* buf = ::gsops_emu::dynamic_smem<unsigned char>();' in out
    assert '::gsops_emu::launch(k<float>, "k<float>", __FILE__, __LINE__, dim3(2), 64, 128,\n      s)(y);' in out
    assert '::gsops_emu::launch(other, "other", __FILE__, __LINE__, 1, 32)(y, 3);' in out
    assert out.count("\n") == src.count("\n") + 1  # line numbers kept
    with pytest.raises(ValueError, match="cannot rewrite"):
        emu.translate("extern __shared__ float a[3];\n", "bad.cu")


def test_gpu_test_module_passes_on_the_emulated_extension():
    """csrc/bindings.cpp built for the emulator (CPU tensors) over the same kernels: the whole GPU
    test module (tests/test_cuda_kernels.py: every op, dtype and block size against dense float64,
    the public ops on the cuda backend, the binding's argument checks, opcheck) runs on the CPU.
    Built and run in subprocesses so that this session's torch.ops.gsops_cuda stays unregistered."""
    build = subprocess.run([sys.executable, str(CSRC / "emu" / "run.py"), "--extension"], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    m = re.search(r"GSOPS_CUDA_EMULATOR=(\S+)", build.stdout)
    assert m, build.stdout
    env = dict(os.environ, GSOPS_CUDA_EMULATOR=m.group(1), GSOPS_BACKEND="auto", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda_kernels.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 80, out[-3000:]
    assert "skipped" not in out and "failed" not in out, out[-3000:]


BENCH_TINY = ("--tokens", "64", "--d", "128", "--blocks", "16", "--reps", "1", "--conv-batch", "1", "--cayley-mats", "2")


def test_gpu_bench_checks_its_launches_and_outputs(tmp_path):
    """csrc/bench/gpu_bench.cu on tiny shapes under the emulator: random inputs give finite, nonzero
    outputs and it finishes; a launcher that refuses its arguments (b=256 > 128) stops it with the
    launcher's error instead of a timing."""
    _require_sanitizers(tmp_path)
    exe = emu.build(build_dir=BUILD, sources=sorted(CSRC.glob("*.cu")) + [CSRC / "bench" / "gpu_bench.cu"],
                    exe_name="gsops_emu_bench")
    ok = emu.run(exe, "mma", BENCH_TINY, 600)
    assert ok.returncode == 0 and "gsops GPU bench: done" in ok.stdout, ok.stdout[-3000:]
    rows = [ln.split(",") for ln in ok.stdout.splitlines() if ln.startswith("csv,")]
    assert {r[1] for r in rows} >= {"copy", "block_diag (no permutation)", "block gradient (P P^T)"}, rows
    bad = emu.run(exe, "mma", ("--tokens", "8", "--d", "512", "--blocks", "256", "--reps", "1"), 600)
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "FAIL: block_diag_perm -> invalid argument" in bad.stdout, bad.stdout[-3000:]
    assert "csv,block_diag" not in bad.stdout


def test_a_bad_emulator_path_is_refused_with_the_reason(tmp_path):
    bad = tmp_path / "nothing_here.so"
    env = dict(os.environ, GSOPS_CUDA_EMULATOR=str(bad))
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda_emu_loader.py"), "-m", "gsops.info"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "gsops " not in res.stdout, res.stdout
    assert f"GSOPS_CUDA_EMULATOR={bad} cannot be loaded" in res.stderr, res.stderr
    assert "python csrc/emu/run.py --extension" in res.stderr
