"""``python -m gsops.info``: versions and which backends are available (and why not)."""
import platform
import sys

import torch

from . import backends
from ._version import __version__
from .ops import dispatch


def report() -> str:
    lines = [
        f"gsops {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
        f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__} (TRITON_INTERPRET={'1' if backends.triton_interpret() else '0'})")
    except ImportError:
        lines.append("triton: not installed")
    lines.append(f"GSOPS_BACKEND={dispatch.requested()}")
    lines.append(f"auto on CUDA tensors: {' > '.join(dispatch.AUTO_ORDER)} ({dispatch.AUTO_ORDER_REASON})")
    lines.append("backends:")
    for name, (ok, reason) in backends.status().items():
        lines.append(f"  {name:7s} {'available' if ok else 'unavailable'}: {reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
