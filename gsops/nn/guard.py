"""Value checks of adapter layers that never stall the device.

A layer computes a few numbers about its own parameters on the device (a float64 sum of each
adapter parameter, finite exactly when the parameter is; the orthogonality error of a
Cayley–Neumann ``Q``) and hands them to a
:class:`DeferredReadout`. The host reads them without a device sync:

* CPU tensors are read at once (there is no device to wait for), so a bad value is refused in the
  same call, before the layer's output is used;
* CUDA tensors are copied to pinned host memory with ``non_blocking=True`` behind an event, and
  read at the layer's next call (by then the device has long finished them): a bad value is
  refused at the latest one call later.

Nothing here calls ``.item()``, ``bool()``, ``float()`` or ``.tolist()`` on a device tensor.
"""
from __future__ import annotations

import itertools
import weakref

import torch


class DeferredReadout:
    """Numbers computed on the device, read by the host without a device sync (see module docstring)."""

    def __init__(self, immediate_on_cpu: bool = True):
        self._pending = None  # (host tensor, cuda event or None, context)
        self.immediate_on_cpu = immediate_on_cpu  # False: CPU values wait one call too, as on CUDA

    def submit(self, values: torch.Tensor, context=None) -> list:
        """Queue ``values`` (a small 1-D float tensor); return the readouts that are ready now.

        Each readout is ``(numpy array, context)``: on CPU the values just submitted, on CUDA
        those of the previous call (if any).
        """
        ready = self.collect()
        values = values.detach()
        if values.device.type == "cpu":
            if self.immediate_on_cpu:
                ready.append((values.numpy().copy(), context))
            else:
                self._pending = (values.clone(), None, context)
            return ready
        host = torch.empty(values.shape, dtype=values.dtype, device="cpu", pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(values.device))
        self._pending = (host, event, context)
        return ready

    def collect(self) -> list:
        """The readout queued by the previous call, waiting for its (long finished) copy if needed."""
        if self._pending is None:
            return []
        host, event, context = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return [(host.numpy().copy(), context)]

    def discard(self) -> None:
        self._pending = None


def finite_probe(params: list) -> torch.Tensor:
    """One number per tensor that is finite exactly when the tensor is: its sum in float64
    (NaN or inf propagate; float64 cannot overflow on a sum of float32/16 values), one op each."""
    if not params:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([p.detach().sum(dtype=torch.float64) for p in params])


# ----------------------------------------------------------------------------- under torch.compile
# A compiled graph cannot run the layer's Python checks, so the layer hands its numbers to this
# custom op, which runs at run time inside the compiled code and calls the layer's own judge
# (raising there, as in eager mode). The op "mutates" a token so the graph keeps the call.
_TOKEN = torch.zeros(1)
_OWNERS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def register(owner) -> int:
    """A key under which the compiled-graph op finds ``owner`` (held weakly)."""
    key = next(_KEYS)
    _OWNERS[key] = owner
    return key


@torch.library.custom_op("gsops::adapter_readout", mutates_args=("token",))
def adapter_readout(values: torch.Tensor, token: torch.Tensor, key: int, n_params: int, series_mask: int) -> None:
    owner = _OWNERS.get(key)
    if owner is not None:
        owner._judge_compiled(values, n_params, series_mask)


@adapter_readout.register_fake
def _(values, token, key, n_params, series_mask):
    return None


def compiled_readout(values: torch.Tensor, key: int, n_params: int, series_mask: int) -> None:
    torch.ops.gsops.adapter_readout(values, _TOKEN, key, n_params, series_mask)
