"""gsops build.

The Python package always installs. The CUDA extension ``gsops._C`` is built
only when a CUDA-enabled torch and nvcc are present and ``csrc/`` has kernels:
- ``GSOPS_SKIP_CUDA=1`` skips it;
- ``GSOPS_FORCE_CUDA=1`` turns a skipped or failed build into an error;
  (both read by the rule of ``gsops/flags.py``: 1/true/yes/on, 0/false/no/off/empty, anything else an error)
- ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default "8.0;9.0");
- ``CUDA_HOME`` names the toolkit; unset, the one whose ``nvcc`` is on PATH is used
  (asked from nvcc itself, so a wrapper script or symlink in /usr/local/bin works).
Install with ``pip install --no-build-isolation -e .`` so the build sees the
torch that is already installed (torch is deliberately not a build requirement).
"""
import ast
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flags_module():
    """gsops/flags.py run on its own (it imports only os): the package, and torch, are not imported at build time."""
    path = os.path.join(HERE, "gsops", "flags.py")
    namespace = {"__name__": "gsops_flags_for_setup"}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)
    return namespace


def _flag(name):
    return _flags_module()["env_flag"](name, False)


def version():
    """``__version__`` of gsops/_version.py, read without importing the package."""
    path = os.path.join(HERE, "gsops", "_version.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{path} assigns no __version__")


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and (
        os.path.exists(os.path.join(root, "bin", "nvcc"))
    )


def cuda_toolkit():
    """(root, how it was found) of a CUDA toolkit with bin/nvcc and include/cuda_runtime.h, or (None, why not).

    torch guesses the root from ``which nvcc`` as its grandparent directory, which is wrong for an
    nvcc reached through a wrapper script or a symlink (e.g. /usr/local/bin/nvcc -> headers looked
    for in /usr/local/include): nvcc's own dry run names the directory it really lives in."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if _is_toolkit(root):
                return root, var
            return None, f"{var}={root} has no bin/nvcc and include/cuda_runtime.h"
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-v", "-c", "gsops_probe.cu"], capture_output=True, text=True,
                                 timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("#$ _HERE_="):
                    candidates.append(("nvcc --dryrun", os.path.dirname(line.split("=", 1)[1].strip())))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(("nvcc on PATH", os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))))
    candidates.append(("default location", "/usr/local/cuda"))
    for how, root in candidates:
        if _is_toolkit(root):
            return os.path.normpath(root), how
    return None, "no nvcc on PATH and no toolkit in /usr/local/cuda (set CUDA_HOME)"


def cuda_extension():
    """(ext_modules, cmdclass), or ([], {}) with a printed reason."""
    def skip(reason):
        if _flag("GSOPS_FORCE_CUDA"):
            raise RuntimeError(f"GSOPS_FORCE_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"gsops: skipping the CUDA extension: {reason}", file=sys.stderr)
        return [], {}

    if _flag("GSOPS_SKIP_CUDA"):
        return skip("GSOPS_SKIP_CUDA=1")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not any(s.endswith(".cpp") for s in sources):
        return skip("csrc/ has no torch binding yet")
    try:
        import torch
    except ImportError as e:
        return skip(f"torch is not importable at build time ({e}); use --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU build")
    root, how = cuda_toolkit()
    if root is None:
        return skip(f"CUDA toolkit not found: {how}")
    os.environ["CUDA_HOME"] = root  # read by torch.utils.cpp_extension at import
    print(f"gsops: building the CUDA extension with the toolkit in {root} ({how})", file=sys.stderr)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        name="gsops._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc", "include")],
        # no -std flag: torch's BuildExtension adds the C++ standard its headers need (c++20 for torch >= 2.10);
        # no --use_fast_math: the Cayley pivots and fp32 tolerances want IEEE division.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="gsops",
    version=version(),
    description="Group-and-Shuffle structured orthogonal matrices: kernels, adapters and orthogonal convolutions",
    # the Triton kernels ship inside the gsops namespace: `import triton_kernels` never finds ours
    packages=find_packages(include=["gsops", "gsops.*"]) + ["gsops.triton_kernels"],
    package_dir={"gsops.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["numpy", "safetensors"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis", "peft"], "perf": ["peft", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
