"""Build and run the CUDA kernels of csrc/ on the CPU under the gsops CUDA emulator.

    python tools/cuda_emu/run.py                  # build (g++, AddressSanitizer + UBSan), run the GPU test driver 3 ways
    python tools/cuda_emu/run.py --modes mma      # one way only (mma | fma | reverse)
    python tools/cuda_emu/run.py --no-sanitize    # faster build, no out-of-bounds / overflow detection
    python tools/cuda_emu/run.py cayley           # one group of the driver (gs | cayley | conv)
    python tools/cuda_emu/run.py --extension      # csrc/bindings.cpp over the emulated kernels (see loader.py)

The kernels and ``csrc/tests/gpu_test_driver.cu`` are compiled as written, after two
source rewrites that plain C++ cannot express (``k<<<grid, block, smem, stream>>>(args)``
-> ``gsops_emu::launch(k, "k", __FILE__, __LINE__, grid, block, smem, stream)(args)`` and
``extern __shared__ T name[];`` -> ``T* name = gsops_emu::dynamic_smem<T>();``), against
the headers in ``tools/cuda_emu/include`` (see ``gsops_emu.h`` for what is modelled and checked).

Modes (the driver is the same binary; what changes is its environment):
  mma      sm_90 model, fp16/bf16 with b % 16 == 0 on the WMMA tensor-core path
  fma      GSOPS_CUDA_NO_MMA=1: every dtype on the fp32-FMA path
  reverse  GSOPS_EMU_ORDER=reverse: threads of a block run last-to-first between barriers,
           so a missing __syncthreads() shows up whichever thread writes the data

This executes the kernels' logic; it says nothing about speed, and a GPU run
(``./build/gsops_gpu_test``) is still the final word.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
EMU_INCLUDE = HERE / "include"
# the emulator's gsops/device.h (CPU tensors, CPU dispatch key), ahead of csrc/include for bindings.cpp
BINDING_INCLUDE = HERE / "binding"

MODES = {
    "mma": {},
    "fma": {"GSOPS_CUDA_NO_MMA": "1"},
    "reverse": {"GSOPS_EMU_ORDER": "reverse"},
}

# callee: an identifier, optionally with one template argument list (load_kernel<T>)
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_DYN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;")


def translate(text: str, origin: str) -> str:
    """Rewrite the two CUDA-only constructs; every other line is kept (line numbers too)."""

    def launch(m: re.Match) -> str:
        callee, cfg = m.group(1), m.group(2)
        return f'::gsops_emu::launch({callee}, "{callee}", __FILE__, __LINE__, {cfg})('

    def smem(m: re.Match) -> str:
        ctype, name = " ".join(m.group(1).split()), m.group(2)
        return f"{ctype}* {name} = ::gsops_emu::dynamic_smem<{ctype}>();"

    out = _DYN_SMEM.sub(smem, _LAUNCH.sub(launch, text))
    if "<<<" in out or re.search(r"\bextern\s+__shared__", out):
        raise ValueError(f"{origin}: a kernel launch or extern __shared__ declaration the emulator cannot rewrite")
    return f'#line 1 "{origin}"\n' + out


def _sources(csrc: Path) -> list[Path]:
    return sorted(csrc.glob("*.cu")) + [csrc / "tests" / "gpu_test_driver.cu"]


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    return cxx


def _flags(csrc: Path, sanitize: bool) -> list[str]:
    """Compiler flags; with ``sanitize`` the file is built with AddressSanitizer and UBSan."""
    flags = [
        "-std=c++17", "-g", "-O1", "-fno-omit-frame-pointer", "-Wall", "-Wno-unused-function",
        "-D__CUDACC__", "-D__CUDA_ARCH__=900",
        f"-I{EMU_INCLUDE}", f"-I{csrc}", f"-I{csrc / 'tests'}",
        "-include", str(EMU_INCLUDE / "gsops_emu.h"),
    ]
    if sanitize:
        flags += ["-fsanitize=address,signed-integer-overflow,shift,bounds", "-fno-sanitize-recover=all"]
    return flags


def _compile(jobs, csrc: Path, obj_dir: Path) -> list[Path]:
    """Translates and compiles ``jobs`` (source, flags) in parallel; returns the objects.

    Objects are cached in ``obj_dir`` by the hash of the translated text, the headers and the
    flags, so a rebuild after a change recompiles only the files that changed (and a copy of
    csrc/ with one edited file, as the mutation tests make, reuses the rest)."""
    obj_dir.mkdir(parents=True, exist_ok=True)
    cxx = _compiler()
    emu_hash = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(EMU_INCLUDE.iterdir()))).hexdigest()
    headers = b"".join(p.read_bytes() for p in sorted((csrc / "include").rglob("*")) if p.is_file())
    procs, objects = [], []
    for src, flags in jobs:
        try:
            origin = str(src.relative_to(csrc.parent))
        except ValueError:
            origin = str(src)
        text = translate(src.read_text(), origin)
        # the key ignores where the tree is (a copy of csrc/ reuses the objects of files it did not change)
        portable = [f.replace(str(EMU_INCLUDE), "<emu>").replace(str(csrc), "<csrc>") for f in flags]
        key = hashlib.sha256("\0".join([text, cxx, *portable, emu_hash]).encode() + headers).hexdigest()[:16]
        cpp = obj_dir / f"{src.stem}.{key}.cpp"
        obj = cpp.with_suffix(".o")
        objects.append(obj)
        if obj.exists():
            os.utime(obj)  # recently used: kept by _prune
            continue
        # private names, renamed into place when complete: builds running at once (the test's mutants)
        # may compile the same object, and none may link a half-written one
        tmp = f".{os.getpid()}.{threading.get_ident()}"
        cpp_tmp, obj_tmp = Path(str(cpp) + tmp), Path(str(obj) + tmp)
        cpp_tmp.write_text(text)
        cmd = [cxx, *flags, "-x", "c++", "-c", str(cpp_tmp), "-o", str(obj_tmp)]
        procs.append((cmd, cpp_tmp, obj_tmp, cpp, obj,
                      subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    errors = []
    for cmd, cpp_tmp, obj_tmp, cpp, obj, proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append("$ " + " ".join(cmd) + "\n" + out)
            cpp_tmp.unlink(missing_ok=True)
            obj_tmp.unlink(missing_ok=True)
            continue
        os.replace(cpp_tmp, cpp)
        os.replace(obj_tmp, obj)
    if errors:
        raise RuntimeError("emulator build failed:\n" + "\n".join(errors))
    _prune(obj_dir, {src.stem for src, _ in jobs})
    return objects


def _prune(obj_dir: Path, stems, keep: int = 8) -> None:
    """Keeps the ``keep`` most recently used cached objects of each source (the driver, its
    sanitizer variants and the mutants need a few each); removes older ones and their .cpp."""
    for stem in stems:
        objs = sorted(obj_dir.glob(f"{stem}.*.o"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in objs[keep:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".cpp").unlink(missing_ok=True)


def _build_dir(build_dir) -> Path:
    return Path(build_dir or (ROOT / "build" / "emu")).resolve()


def build(csrc: Path = CSRC, build_dir: Path | None = None, sanitize: bool = True, sources=None,
          exe_name: str | None = None) -> Path:
    """Translates and compiles the kernels and the driver (or ``sources``) and links them; returns
    the executable. ``csrc`` may be a copy of csrc/ (the mutation tests edit one)."""
    csrc = Path(csrc).resolve()
    build_dir = _build_dir(build_dir)
    # The kernels get the sanitizers; the driver's host-side oracles (plain loops) do not need them.
    jobs = [(src, _flags(csrc, sanitize and src.name != "gpu_test_driver.cu")) for src in sources or _sources(csrc)]
    objects = _compile(jobs, csrc, build_dir)
    exe = build_dir / (exe_name or ("gsops_emu_test" + ("" if sanitize else "_nosan")))
    link = [_compiler(), *[f for f in _flags(csrc, sanitize) if f.startswith("-fsanitize") or f == "-g"],
            *map(str, objects), "-o", str(exe)]
    res = subprocess.run(link, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        raise RuntimeError("emulator link failed:\n$ " + " ".join(link) + "\n" + res.stdout)
    return exe


def build_extension(build_dir: Path | None = None, name: str | None = None, verbose: bool = False,
                    traffic: bool = False):
    """Builds csrc/bindings.cpp over the kernels compiled for the emulator, loads it and returns the
    module: ``torch.ops.gsops_cuda.*`` then run the real binding and kernels on CPU tensors, and the
    module's ``device_type`` is ``"cpu"``. The binding is compiled as written; only its device header
    differs (``binding/gsops/device.h`` is found ahead of ``csrc/include/gsops/device.h``). Needs torch
    (any build; a CPU one is enough). :func:`loader.install` makes the module ``gsops._C``.

    With ``traffic`` (module ``gsops_emu_traffic_C``) the kernels are compiled with ThreadSanitizer's
    instrumentation, at -O1 without vectorization (one hook call per element access, as written), and
    ``traffic.cpp`` adds ``torch.ops.gsops_emu.traffic_*``: global-memory sectors and bytes per
    warp-wide access (``include/gsops_emu_traffic.h``; :func:`perf.traffic.measure_cuda` reads them)."""
    import torch.utils.cpp_extension as ce

    build_dir = _build_dir(build_dir)
    name = name or ("gsops_emu_traffic_C" if traffic else "gsops_emu_C")
    if traffic:
        flags = _flags(CSRC, False) + ["-fno-tree-vectorize", "-fPIC", "-fsanitize=thread"]
    else:
        flags = [f for f in _flags(CSRC, False) if f != "-O1"] + ["-O2", "-fPIC"]
    tag = "traffic" if traffic else "ext"
    objects = _compile([(src, flags) for src in sorted(CSRC.glob("*.cu"))], CSRC, build_dir / f"{tag}_objects")
    ext_dir = build_dir / tag
    ext_dir.mkdir(parents=True, exist_ok=True)
    return ce.load(
        name=name,
        sources=[str(CSRC / "bindings.cpp")] + ([str(HERE / "traffic.cpp")] if traffic else []),
        extra_cflags=["-O1"],
        extra_include_paths=[str(BINDING_INCLUDE), str(CSRC / "include"), str(EMU_INCLUDE)],
        extra_ldflags=[str(o) for o in objects],
        build_directory=str(ext_dir),
        verbose=verbose,
    )


def run(exe: Path, mode: str = "mma", args=(), timeout: float = 900, env_extra=None) -> subprocess.CompletedProcess:
    """Runs the driver (with ``args``, e.g. its groups) in one mode; output (stdout + stderr) in .stdout."""
    env = dict(os.environ)
    for k in ("GSOPS_CUDA_NO_MMA", "GSOPS_EMU_ORDER", "GSOPS_EMU_SM", "GSOPS_EMU_STATS"):
        env.pop(k, None)
    env.update(MODES[mode])
    env.update(env_extra or {})
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0")
    return subprocess.run([str(exe), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["mma", "fma", "reverse"])
    ap.add_argument("--no-sanitize", action="store_true", help="build without AddressSanitizer/UBSan")
    ap.add_argument("--build-dir", type=Path, default=None)
    ap.add_argument("--extension", action="store_true",
                    help="build the emulator build of csrc/bindings.cpp (a torch extension) and print its path")
    ap.add_argument("groups", nargs="*", help="driver groups to run (gs, cayley, conv); all by default")
    args = ap.parse_args(argv)
    if args.extension:
        mod = build_extension(build_dir=args.build_dir)
        print(f"extension: {mod.__file__}")
        print(f"then e.g.: python tools/cuda_emu/loader.py {mod.__file__} -m pytest tests/test_cuda_kernels.py")
        return 0
    exe = build(build_dir=args.build_dir, sanitize=not args.no_sanitize)
    status = 0
    for mode in args.modes:
        res = run(exe, mode, args.groups)
        print(f"== mode {mode} ({' '.join(f'{k}={v}' for k, v in MODES[mode].items()) or 'defaults'}): "
              f"exit {res.returncode}")
        print(res.stdout.rstrip())
        status = status or res.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
