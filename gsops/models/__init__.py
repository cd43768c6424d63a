"""Model families built from gsops layers (LipConvnet)."""
from .lipconvnet import LipConvnet, certified_accuracy

__all__ = ["LipConvnet", "certified_accuracy"]
