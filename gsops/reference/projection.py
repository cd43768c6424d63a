"""Projection onto the GS class (Algorithm 1 of Gorbunov et al., 2024): the reference of
:mod:`gsops.ops.gs_project`."""
from ..ops.gs_project import block_ranks, gs_project_reference as gs_project  # noqa: F401
