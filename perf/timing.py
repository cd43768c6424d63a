"""Measuring one training step: time (median, warm-up excluded), saved-activation bytes, CUDA peak memory."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


class Step:
    """Forward + backward of ``module`` on a fixed input that requires grad (a layer inside a network)."""

    def __init__(self, module: nn.Module, x: torch.Tensor, seed: int = 0):
        self.module = module
        self.x = x.detach().clone().requires_grad_(True)
        with torch.no_grad():
            y = module(self.x)
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.grad_out = torch.randn(y.shape, generator=g, dtype=torch.float32).to(device=y.device, dtype=y.dtype)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.device = x.device

    def __call__(self):
        for p in self.params:
            p.grad = None
        self.x.grad = None
        y = self.module(self.x)
        y.backward(self.grad_out)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self) -> float:
        """Seconds for one step, device work included."""
        self.sync()
        t0 = time.perf_counter()
        self()
        self.sync()
        return time.perf_counter() - t0


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def saved_activation_bytes(step: Step) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward.

    Counted with ``torch.autograd.graph.saved_tensors_hooks`` (works on CPU).
    Parameters and buffers are not activations and are left out; a saved view
    counts its whole storage once.
    """
    persistent = {t.untyped_storage().data_ptr() for t in list(step.module.parameters()) + list(step.module.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in persistent and ptr != 0:
                seen[ptr] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without a storage
            seen[id(t)] = t.numel() * t.element_size()
        return t

    step.x.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = step.module(step.x)
    del y
    return int(sum(seen.values()))


def peak_memory_bytes(step: Step) -> int | None:
    """CUDA: peak allocated during one step, above what was allocated before it. None elsewhere."""
    if step.device.type != "cuda":
        return None
    step.sync()
    torch.cuda.reset_peak_memory_stats(step.device)
    before = torch.cuda.memory_allocated(step.device)
    step()
    step.sync()
    return int(torch.cuda.max_memory_allocated(step.device) - before)


class SyncCounter(TorchDispatchMode):
    """Counts device-to-host value reads while active: calls of ``aten::_local_scalar_dense`` (what
    ``.item()``, ``float()``, ``bool()``, ``.tolist()`` reach), each a stall of the device's queue on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_syncs(step: Step) -> int:
    """Device-to-host value reads in one step (see :class:`SyncCounter`)."""
    with SyncCounter() as counter:
        step()
    return counter.count


def median(xs):
    return statistics.median(xs) if xs else float("nan")
