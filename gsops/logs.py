"""gsops's messages: the ``"gsops"`` :mod:`logging` logger, written on rank 0 only under ``torch.distributed``.

Nothing is printed unless the application configures logging, e.g.
``logging.basicConfig(level=logging.INFO)``. Warnings that change what a user
should do still go through :mod:`warnings`.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("gsops")


def is_rank0() -> bool:
    """True outside ``torch.distributed`` or on its rank 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # a broken distributed setup must not stop a log line
        pass
    return True


def info(msg: str, *args) -> None:
    if is_rank0():
        logger.info(msg, *args)


def warning(msg: str, *args) -> None:
    if is_rank0():
        logger.warning(msg, *args)
