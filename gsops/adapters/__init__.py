"""Model-level adapter verbs: ``AdapterConfig``, ``apply_``, ``merge_``, ``unmerge_``, ``revert_``, save/load.

Layering: adapters -> methods (one registry entry per method) -> nn (the adapter layers) -> ops.
"""
from .config import AdapterConfig, METHODS
from .model import (
    AdapterSummary, adapter_layers, adapter_parameters, adapter_summary, apply_, merge_, revert_,
    trainable_parameters, unmerge_,
)
from .io import load_adapter, save_adapter
from .workflow import disable_adapters, merge_and_unload, print_trainable_parameters
from .peft_io import load_peft_adapter, save_peft_adapter
from ..nn.sorsa import sorsa_regularizer

__all__ = [
    "AdapterConfig", "METHODS", "AdapterSummary", "adapter_layers", "adapter_parameters", "adapter_summary",
    "apply_", "merge_", "unmerge_", "revert_", "trainable_parameters", "save_adapter", "load_adapter",
    "sorsa_regularizer", "merge_and_unload", "disable_adapters", "print_trainable_parameters",
    "load_peft_adapter", "save_peft_adapter",
]
