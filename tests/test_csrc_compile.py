"""CI for csrc/ without a GPU: the CUDA kernels compile and their shared host logic is right.

* every ``csrc/*.cu`` compiles alone with ``nvcc -arch=sm_90 -c`` (no include flags, no torch);
* the CMake project configures and builds (kernel library, GPU test driver, host test);
* the host test (``csrc/tests/host_logic_test.cpp``) runs the ``__host__ __device__``
  index arithmetic, tiled block-diagonal x permutation, Gauss-Jordan Cayley steps and
  grouped-convolution pieces the kernels run, against dense double oracles;
* the GPU test driver and the GPU bench run: on a machine without a GPU they say so and exit 0;
* ``csrc/bindings.cpp`` parses against the installed torch headers (``g++ -fsyntax-only``).

All compilations start at once (one fixture) so the module takes about one
compile's worth of wall time. Skips (with the reason) only when nvcc / cmake /
a C++ compiler is absent.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNELS = sorted(CSRC.glob("*.cu"))
TIMEOUT = 600


def _nvcc():
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
CMAKE = shutil.which("cmake")
NINJA = shutil.which("ninja")
CXX = shutil.which("g++") or shutil.which("c++")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
needs_cmake = pytest.mark.skipif(NVCC is None or CMAKE is None, reason="cmake or nvcc not found")


class _Job:
    def __init__(self, name, cmds, cwd=ROOT):
        self.name, self.cmds, self.cwd = name, list(cmds), cwd
        self.log = []
        self.returncode = None
        self._proc = None
        self._next()

    def _next(self):
        cmd = self.cmds.pop(0)
        self.log.append("$ " + " ".join(map(str, cmd)))
        self._proc = subprocess.Popen(
            [str(c) for c in cmd], cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def wait(self):
        while self.returncode is None:
            out, _ = self._proc.communicate(timeout=TIMEOUT)
            self.log.append(out)
            if self._proc.returncode != 0 or not self.cmds:
                self.returncode = self._proc.returncode
            else:
                self._next()
        return self

    @property
    def output(self):
        return "\n".join(self.log)


def _torch_include_dirs():
    try:
        import torch.utils.cpp_extension as ce
    except ImportError:
        return None
    dirs = ce.include_paths()
    if not all(Path(d).exists() for d in dirs):
        return None
    return dirs


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Start every compilation at once; tests wait on the one they check."""
    if NVCC is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    tmp = tmp_path_factory.mktemp("csrc")
    jobs = {}
    for cu in KERNELS:
        jobs[cu.name] = _Job(cu.name, [[NVCC, "-arch=sm_90", "-c", cu, "-o", tmp / (cu.stem + ".o")]])
    # a source that cannot compile must make nvcc fail: the check above can go red
    broken = tmp / "broken.cu"
    broken.write_text('#include "' + str(CSRC / "include" / "gsops" / "kernels.h") + '"\n'
                      "__global__ void k(float* p) { p[0] = gsops::no_such_function(); }\n")
    jobs["broken"] = _Job("broken", [[NVCC, "-arch=sm_90", "-c", broken, "-o", tmp / "broken.o"]])
    if CMAKE is not None:
        build = tmp / "build"
        configure = [CMAKE, "-S", ROOT, "-B", build, f"-DCMAKE_CUDA_COMPILER={NVCC}", "-DCMAKE_CUDA_ARCHITECTURES=90"]
        if NINJA:
            configure += ["-G", "Ninja"]
        jobs["cmake"] = _Job("cmake", [configure, [CMAKE, "--build", build, "-j", "2"]])
        jobs["cmake"].build = build
    torch_dirs = _torch_include_dirs()
    if CXX is not None and torch_dirs is not None:
        stub = tmp / "stub"
        # CPU builds of torch ship the c10/cuda headers without their generated macro header
        macros = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        macros.parent.mkdir(parents=True)
        macros.write_text("#pragma once\n")
        cuda_inc = Path(NVCC).resolve().parents[1] / "include"
        cmd = [CXX, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", "-I", cuda_inc,
               "-I", sysconfig.get_paths()["include"]]
        for d in torch_dirs:
            cmd += ["-I", d]
        cmd += ["-I", stub, "-I", CSRC / "include", CSRC / "bindings.cpp"]  # include/: gsops/device.h
        jobs["bindings"] = _Job("bindings", [cmd])
    return jobs


@needs_nvcc
@pytest.mark.parametrize("source", [cu.name for cu in KERNELS])
def test_kernel_compiles_alone_with_nvcc(builds, source):
    job = builds[source].wait()
    assert job.returncode == 0, f"nvcc -arch=sm_90 -c csrc/{source} failed:\n{job.output}"


def test_every_op_has_a_kernel_file():
    assert {cu.name for cu in KERNELS} >= {"gs_apply.cu", "gs_pair.cu", "cayley.cu", "conv_exp.cu"}


@needs_nvcc
def test_broken_source_fails_to_compile(builds):
    job = builds["broken"].wait()
    assert job.returncode != 0 and "no_such_function" in job.output


@needs_cmake
def test_cmake_builds_kernels_driver_and_host_test(builds):
    job = builds["cmake"].wait()
    assert job.returncode == 0, f"CMake build failed:\n{job.output}"
    for target in ("gsops_host_test", "gsops_gpu_test", "gsops_gpu_bench", "libgsops_kernels.a"):
        assert (job.build / target).exists(), f"CMake did not produce {target}:\n{job.output}"


def _run_cmake_target(builds, exe):
    """Wait for the CMake build (which must have succeeded) and run one of its executables."""
    job = builds["cmake"].wait()
    assert job.returncode == 0, f"CMake build failed:\n{job.output}"
    return subprocess.run([str(job.build / exe)], capture_output=True, text=True, timeout=TIMEOUT)


@needs_cmake
def test_host_logic_test_passes(builds):
    res = _run_cmake_target(builds, "gsops_host_test")
    assert res.returncode == 0 and " 0 failures" in res.stdout, res.stdout + res.stderr
    n_checks = int(res.stdout.split("gsops host logic test: ")[1].split(" checks")[0])
    assert n_checks > 500, res.stdout


@needs_cmake
def test_gpu_driver_runs_or_says_no_gpu(builds):
    res = _run_cmake_target(builds, "gsops_gpu_test")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no CUDA device" in res.stdout or " 0 failures" in res.stdout, res.stdout


@needs_cmake
def test_gpu_bench_runs_or_says_no_gpu(builds):
    res = _run_cmake_target(builds, "gsops_gpu_bench")
    assert res.returncode == 0, res.stdout + res.stderr


def test_bindings_parse_against_torch_headers(builds):
    if "bindings" not in builds:
        pytest.skip("no C++ compiler or no torch headers to check csrc/bindings.cpp against")
    job = builds["bindings"].wait()
    assert job.returncode == 0, f"csrc/bindings.cpp does not compile against torch {sys.modules['torch'].__version__}:\n{job.output}"
