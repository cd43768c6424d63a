"""Argument rules and their messages, in one place.

Every public entry point validates its arguments here before any computation
or kernel launch. Messages name the argument and the rule it breaks, e.g.
``block_size=12 must divide in_features=1000``.
"""
from __future__ import annotations

import torch

from .flags import env_flag

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every op accumulates in: float32 for float16/bfloat16 inputs, else the input's own."""
    return torch.float32 if dtype in HALF_DTYPES else dtype

# Two switches, each read from its environment variable at import (the values a flag takes:
# gsops.flags) and settable at run time. Checking parameters for NaN/inf is on by default and can
# be switched off for production runs (GSOPS_CHECK_FINITE=0 or set_check_finite(False)); inputs
# (activations) are scanned only on opt-in (GSOPS_CHECK_INPUTS=1 or set_check_inputs(True)).
_SWITCHES = {"finite": env_flag("GSOPS_CHECK_FINITE", True), "inputs": env_flag("GSOPS_CHECK_INPUTS", False)}


def set_check_finite(enabled: bool) -> None:
    """Turn the non-finite scan of parameters (blocks, skew matrices) on or off."""
    _SWITCHES["finite"] = bool(enabled)


def check_finite_enabled() -> bool:
    return _SWITCHES["finite"]


def set_check_inputs(enabled: bool) -> None:
    """Turn the opt-in non-finite scan of adapter layer inputs on or off."""
    _SWITCHES["inputs"] = bool(enabled)


def check_inputs_enabled() -> bool:
    return _SWITCHES["inputs"]


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        # accept numpy / torch integer scalars, refuse floats and bools
        try:
            import numbers

            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def check_divides(name_b: str, b: int, name_n: str, n: int) -> None:
    if n % b != 0:
        raise ValueError(f"{name_b}={b} must divide {name_n}={n}")


def check_tensor(name: str, x, *, min_dim: int = 1, dim: int | None = None) -> torch.Tensor:
    """A floating-point tensor of the right rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}"
        )
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def has_values(t: torch.Tensor) -> bool:
    """False for meta tensors and while torch.compile traces (no values to scan)."""
    return t.device.type != "meta" and not torch.compiler.is_compiling()


def check_finite(name: str, t: torch.Tensor) -> None:
    if _SWITCHES["finite"] and t.numel() and has_values(t) and not torch.isfinite(t).all():
        raise ValueError(
            f"{name} contains NaN or inf values; refusing to continue (they would poison training). "
            "Set GSOPS_CHECK_FINITE=0 to skip this check."
        )


def check_blocks(name: str, B, *, r: int | None = None, b: int | None = None) -> torch.Tensor:
    """A stack of square blocks of shape (r, b, b)."""
    check_tensor(name, B, dim=3)
    if B.shape[1] != B.shape[2]:
        raise ValueError(f"{name} must have shape (r, b, b) with square blocks, got {tuple(B.shape)}")
    if B.shape[0] == 0 or B.shape[1] == 0:
        raise ValueError(f"{name} must have at least one block of size >= 1, got {tuple(B.shape)}")
    if r is not None and B.shape[0] != r:
        raise ValueError(f"{name} has {B.shape[0]} blocks, expected r={r}")
    if b is not None and B.shape[1] != b:
        raise ValueError(f"{name} has block size {B.shape[1]}, expected b={b}")
    check_finite(name, B)
    return B


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device: {desc}")


def check_features(name_x: str, x: torch.Tensor, n: int, what: str) -> None:
    if x.shape[-1] != n:
        raise ValueError(f"{name_x}.shape[-1]={x.shape[-1]} must equal {what}={n}")
