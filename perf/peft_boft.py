"""A torch stand-in for PEFT BOFT's ``fbd_cuda`` extension, so BOFT runs with m > 1 factors anywhere.

Measured fact (peft 0.21): PEFT's BOFT layer builds its block-diagonal factors
with a compiled CUDA extension (``fbd_cuda``, loaded by
``peft.tuners.boft.layer.get_fbd_cuda``). When that build fails, as it always
does without CUDA, ``update_layer`` silently sets the butterfly factor count
to 1, and its torch fallback only handles one factor. Timing BOFT's own
algorithm (Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization", ICLR 2024) at ``m > 1`` on a CPU therefore needs a replacement
for the extension.

The extension's contract (read from PEFT's sources, re-implemented here):
``forward(blocks)`` takes ``blocks`` of shape ``(z, N, b, b)`` and returns a
one-element list holding the ``(z, N*b, N*b)`` block-diagonal matrices (zeros
off the blocks); ``backward(grad_output, blocks)`` returns a one-element list
holding the ``(z, N, b, b)`` gradient, which is the diagonal blocks of
``grad_output`` (block extraction). PEFT calls both through
``get_fbd_cuda()``, which returns a module-level cache when it is set, so
installing an object with those two methods there makes PEFT's
``FastBlockDiag`` autograd Function use it and keeps the requested factor count.

Rows timed with this stand-in must say so (see :data:`STANDIN_LABEL`); use
:func:`check_boft_factors` to make sure a BOFT model really has the factor
count that was asked for.
"""
from __future__ import annotations

import contextlib

import torch

STANDIN_LABEL = "peft BOFT + torch fbd stand-in"
EXTENSION_LABEL = "peft BOFT + fbd_cuda extension"


def _check_blocks4(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4 or t.shape[-1] != t.shape[-2]:
        raise ValueError(f"{name} must have shape (z, N, b, b), got {tuple(t.shape)}")


def block_diag_forward(blocks: torch.Tensor) -> torch.Tensor:
    """``(z, N, b, b)`` blocks -> ``(z, N*b, N*b)`` block-diagonal matrices (zeros elsewhere)."""
    _check_blocks4("blocks", blocks)
    z, n, b, _ = blocks.shape
    out = blocks.new_zeros(z, n * b, n * b)
    # out[z, i*b + p, j*b + q] viewed as (z, i, p, j, q); the diagonal over (i, j) has shape (z, p, q, i)
    out.view(z, n, b, n, b).diagonal(dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))
    return out


def block_diag_backward(grad_output: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`block_diag_forward`: the diagonal ``b x b`` blocks of ``grad_output``."""
    _check_blocks4("blocks", blocks)
    z, n, b, _ = blocks.shape
    if not isinstance(grad_output, torch.Tensor) or tuple(grad_output.shape) != (z, n * b, n * b):
        got = tuple(grad_output.shape) if isinstance(grad_output, torch.Tensor) else type(grad_output).__name__
        raise ValueError(f"grad_output must have shape (z, N*b, N*b)={(z, n * b, n * b)}, got {got}")
    g = grad_output.reshape(z, n, b, n, b).diagonal(dim1=1, dim2=3)  # (z, p, q, i)
    return g.permute(0, 3, 1, 2).contiguous()


class TorchBlockDiagExtension:
    """Same calling convention as PEFT's compiled ``fbd_cuda`` module, in plain torch (any device, any dtype)."""

    is_gsops_standin = True

    @staticmethod
    def forward(blocks: torch.Tensor) -> list:
        return [block_diag_forward(blocks)]

    @staticmethod
    def backward(grad_output: torch.Tensor, blocks: torch.Tensor) -> list:
        return [block_diag_backward(grad_output, blocks)]

    def __repr__(self) -> str:
        return "TorchBlockDiagExtension(stand-in for peft's fbd_cuda)"


def _boft_layer_module():
    try:
        from peft.tuners.boft import layer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the PEFT BOFT baseline needs the 'peft' package ({e}); install it with "
            "`pip install -r requirements-dev.txt`"
        ) from None
    if not hasattr(layer, "_FBD_CUDA") or not hasattr(layer, "get_fbd_cuda"):
        import peft

        raise RuntimeError(
            f"peft {peft.__version__}: peft.tuners.boft.layer has no _FBD_CUDA/get_fbd_cuda; "
            "the stand-in was written against peft 0.21 and must be updated"
        )
    return layer


def enable_cpu_fbd() -> None:
    """Make PEFT's BOFT use :class:`TorchBlockDiagExtension` for its block-diagonal factors.

    Call it BEFORE building the PEFT BOFT model: PEFT decides the factor count
    when the layer is created. Replaces any extension PEFT had loaded.
    """
    _boft_layer_module()._FBD_CUDA = TorchBlockDiagExtension()


def disable_cpu_fbd() -> None:
    """Undo :func:`enable_cpu_fbd` (PEFT tries to build its extension again on the next layer)."""
    layer = _boft_layer_module()
    if getattr(layer._FBD_CUDA, "is_gsops_standin", False):
        layer._FBD_CUDA = None


def standin_enabled() -> bool:
    return bool(getattr(_boft_layer_module()._FBD_CUDA, "is_gsops_standin", False))


@contextlib.contextmanager
def cpu_fbd():
    """``with cpu_fbd(): model = get_peft_model(...)`` -- the stand-in for the duration of the block."""
    layer = _boft_layer_module()
    previous = layer._FBD_CUDA
    layer._FBD_CUDA = TorchBlockDiagExtension()
    try:
        yield
    finally:
        layer._FBD_CUDA = previous


def fbd_implementation(try_extension: bool = True) -> str:
    """Make PEFT BOFT able to use m > 1 factors here and say how.

    On a CUDA machine, first tries PEFT's own extension (``try_extension``);
    anywhere it is not available, installs the stand-in. Returns the label to
    attach to BOFT rows (:data:`EXTENSION_LABEL` or :data:`STANDIN_LABEL`).
    """
    layer = _boft_layer_module()
    if standin_enabled():
        return STANDIN_LABEL
    if try_extension and torch.cuda.is_available():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ext = layer.get_fbd_cuda()
        if ext is not None:
            return EXTENSION_LABEL
    enable_cpu_fbd()
    return STANDIN_LABEL


def boft_layers(model) -> list:
    """``(name, module)`` of every PEFT BOFT layer in ``model``."""
    layer = _boft_layer_module()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, layer.BOFTLayer)]


def check_boft_factors(model, n_factors: int, block_size: int | None = None) -> None:
    """Raise unless every PEFT BOFT layer of ``model`` has ``n_factors`` butterfly factors (and ``block_size``).

    PEFT stores each adapter's parameters as ``boft_R`` of shape
    ``(n_factors, n_blocks, block_size, block_size)``; without its extension it
    silently builds ``n_factors = 1``. This check reads that shape.
    """
    layers = boft_layers(model)
    if not layers:
        raise ValueError("model has no PEFT BOFT layer to check")
    for name, mod in layers:
        for adapter, R in mod.boft_R.items():
            if R.dim() != 4:
                raise ValueError(f"{name}.boft_R[{adapter!r}] has shape {tuple(R.shape)}, expected 4 dimensions")
            if R.shape[0] != n_factors:
                raise ValueError(
                    f"{name}.boft_R[{adapter!r}] has {R.shape[0]} butterfly factor(s) (shape {tuple(R.shape)}), "
                    f"but n_factors={n_factors} was requested: PEFT reduces the count to 1 when its fbd_cuda "
                    "extension is unavailable; call perf.peft_boft.enable_cpu_fbd() first"
                )
            if block_size is not None and R.shape[-1] != block_size:
                raise ValueError(
                    f"{name}.boft_R[{adapter!r}] has block size {R.shape[-1]}, but block_size={block_size} was requested"
                )


__all__ = [
    "STANDIN_LABEL", "EXTENSION_LABEL", "TorchBlockDiagExtension", "block_diag_forward", "block_diag_backward",
    "enable_cpu_fbd", "disable_cpu_fbd", "standin_enabled", "cpu_fbd", "fbd_implementation", "boft_layers",
    "check_boft_factors",
]
