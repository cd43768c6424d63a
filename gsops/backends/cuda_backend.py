"""The compiled CUDA extension ``gsops._C`` (see the CUDA issue)."""
from . import BackendUnavailable

try:
    from .. import _C  # noqa: F401
except ImportError as e:  # not built: CPU torch, no nvcc, or GSOPS_SKIP_CUDA=1 at install
    raise BackendUnavailable(
        f"the CUDA extension gsops._C is not built ({e}); install on a machine with a CUDA torch and nvcc"
    ) from None
raise BackendUnavailable("the CUDA extension has no registered ops yet")
