"""Which base layers an adapter wraps, and how it sees them: dimensions, layouts, parameter dtype.

An adapter wraps ``nn.Linear``, ``nn.Conv2d`` or transformers' ``Conv1D``
(GPT-2's linear layer, weight stored transposed as ``in x out``). It sees the
layer as ``d_out x d_in`` (:func:`layer_dims`): Conv2d weights are flattened to
``out x in_channels/groups*kh*kw``.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from ..checks import FLOAT_DTYPES


def conv1d_type():
    """transformers' ``pytorch_utils.Conv1D`` (GPT-2's linear layer, weight stored ``(in, out)``) if imported.

    Only looked up among imported modules: a model holding a Conv1D has imported it already.
    """
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_conv1d(base: nn.Module) -> bool:
    t = conv1d_type()
    return t is not None and isinstance(base, t)


def is_linear_like(base: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D``: ``y = W x + c`` on the last dimension."""
    return isinstance(base, nn.Linear) or is_conv1d(base)


def supported_layer(base: nn.Module) -> bool:
    return isinstance(base, (nn.Linear, nn.Conv2d)) or is_conv1d(base)


SUPPORTED_LAYERS = "nn.Linear, nn.Conv2d or transformers' Conv1D"


def layer_dims(base: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` that an adapter sees.

    Linear (in, out); Conv1D (weight rows, weight columns) = (in, out);
    Conv2d (in_channels/groups*kh*kw, out_channels): the flattened weight is
    ``out x (in_channels/groups*kh*kw)`` whatever ``groups`` is.
    """
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Conv2d):
        kh, kw = base.kernel_size
        return base.in_channels // base.groups * kh * kw, base.out_channels
    if is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"adapters wrap {SUPPORTED_LAYERS}, got {type(base).__name__}")


def in_dim_name(base) -> str:
    """How messages name the dimension Q acts on: ``in_features``, ``in_channels*kh*kw`` or ``in_channels/groups*kh*kw``."""
    if is_linear_like(base):
        return "in_features"
    return "in_channels*kh*kw" if base.groups == 1 else "in_channels/groups*kh*kw"


def check_base_layer(base: nn.Module, name: str = "layer") -> None:
    if not supported_layer(base):
        raise TypeError(f"{name}: adapters wrap {SUPPORTED_LAYERS}, got {type(base).__name__}")
    if base.weight.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: the layer's weight must have a floating dtype (float16, bfloat16, float32, float64), "
            f"got {base.weight.dtype}"
        )


def out_dim_name(base) -> str:
    """How messages name the output dimension: ``out_features`` or ``out_channels``."""
    return "out_features" if is_linear_like(base) else "out_channels"


def adapter_param_dtype(weight_dtype: torch.dtype, adapter_dtype=None) -> torch.dtype:
    """The dtype of an adapter's own parameters: ``adapter_dtype``, else float32 on a half-precision base."""
    if adapter_dtype is not None:
        if adapter_dtype not in FLOAT_DTYPES:
            raise TypeError(f"adapter_dtype must be one of {FLOAT_DTYPES} or None, got {adapter_dtype!r}")
        return adapter_dtype
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


__all__ = [
    "conv1d_type", "is_conv1d", "is_linear_like", "supported_layer", "SUPPORTED_LAYERS", "layer_dims",
    "in_dim_name", "out_dim_name", "check_base_layer", "adapter_param_dtype",
]
