"""The reference backend: pure PyTorch, any device, every dtype.

Its kernels are the reference definitions of the ops; each op module of
:mod:`gsops.ops` registers its own (through :func:`gsops.ops.library.define`),
so this module only says that it takes any tensor.
"""
from __future__ import annotations

DESCRIPTION = "pure PyTorch reference path"

KERNELS: dict = {}  # registered by gsops.ops.library from each op's reference


def device_reason(device) -> None:
    return None


def supports(op: str, *tensors) -> None:
    return None
