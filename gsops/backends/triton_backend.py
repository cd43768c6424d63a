"""Triton kernels from ``triton_kernels/`` (not written yet: see the Triton issue)."""
from . import BackendUnavailable

raise BackendUnavailable("the Triton kernels are not implemented yet")
