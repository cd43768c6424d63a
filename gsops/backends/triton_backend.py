"""Triton kernels from ``triton_kernels/`` (not written yet: see the Triton issue)."""
from . import BackendUnavailable

# --- conv_exp (GS-SOC issue): registration of triton_kernels.conv_exp goes here ---

raise BackendUnavailable("the Triton kernels are not implemented yet")
