"""gsops build.

The Python package always installs. The CUDA extension ``gsops._C`` is built
only when a CUDA-enabled torch and nvcc are present and ``csrc/`` has kernels:
- ``GSOPS_SKIP_CUDA=1`` skips it;
- ``GSOPS_FORCE_CUDA=1`` turns a skipped or failed build into an error;
- ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default "8.0;9.0").
Install with ``pip install --no-build-isolation -e .`` so the build sees the
torch that is already installed (torch is deliberately not a build requirement).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


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
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        return skip(f"torch is not importable at build time ({e}); use --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME or "", "bin", "nvcc")):
        return skip("nvcc / CUDA_HOME not found")
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
    version="0.1.0",
    description="Group-and-Shuffle structured orthogonal matrices: kernels, adapters and orthogonal convolutions",
    packages=find_packages(include=["gsops", "gsops.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["numpy", "safetensors"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis", "peft"], "perf": ["peft", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
