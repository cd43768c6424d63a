"""The reference backend: pure PyTorch, any device."""
from .. import reference as ref
from ..ops import dispatch

DESCRIPTION = "pure PyTorch reference path"

dispatch.register("torch", "block_diag_mm", ref.block_diag_mm)
dispatch.register("torch", "gs_chain", ref.gs_chain)
dispatch.register("torch", "gs_apply", ref.gs_apply)
dispatch.register("torch", "cayley_exact", ref.cayley_exact)
dispatch.register("torch", "cayley_neumann", ref.cayley_neumann)
