"""Builds every op's ``torch.library`` custom ops, fake rules and autograd from one :class:`OpSpec`.

For an op ``name`` the spec gives its forward arguments, what its backward
reads (``save``), the reference forward and backward (the torch backend's
kernels, registered here), the forward's fake rule, and which tensors the
gradients take their dtype and shape from (``grad_like``: it is also the
backward's fake rule). :func:`define` then registers

* ``gsops::<name>(<inputs>, str backend) -> <returns>``: the kernel of that backend;
* ``gsops::<name>_backward(Tensor grad, <saved>, str backend) -> <grads>``: the
  gradients of the tensor inputs (in their order), cast to the dtypes of ``grad_like``;
* the forward's autograd formula, which calls the backward op on the same backend.

Every output is a fresh contiguous tensor; nothing is mutated. A forward with
several outputs returns the result first and then what its backward reads
(no gradient flows into those). Backend kernels
have the signatures of the ops without ``backend``; a backward kernel may return
its gradients nested (``(dx, [dB_1, ...])``): they are flattened in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import backends


@dataclass
class OpSpec:
    name: str
    inputs: str                      # forward arguments without the backend, schema syntax
    returns: str                     # forward returns, schema syntax
    grads: str                       # the backward's returns: "Tensor", "Tensor[]" or "(Tensor, ...)"
    reference: Callable              # the torch backend's forward kernel
    reference_backward: Callable     # the torch backend's backward kernel: (grad, *saved) -> grads
    saved: Optional[str] = None      # the backward's arguments after ``grad``, schema syntax; default: inputs
    save: Optional[Callable] = None  # (forward args, forward output) -> tuple in ``saved`` order; default: args
    fake: Optional[Callable] = None  # (*forward args, backend) -> outputs; default: one like the first input
    grad_like: Optional[Callable] = None  # (*saved) -> the tensors the grads take dtype and shape from;
    #                                  default: the tensors (and tensor lists) among ``saved``
    eager: Optional[Callable] = None  # reference path for eager unchecked calls (plain torch autograd)
    op: object = field(default=None, init=False)
    backward_op: object = field(default=None, init=False)

    def __post_init__(self):
        if self.saved is None:
            self.saved = self.inputs
        if self.save is None:
            self.save = lambda args, out: tuple(args)
        if self.fake is None:
            self.fake = lambda first, *rest: first.new_empty(first.shape)
        if self.grad_like is None:
            self.grad_like = lambda *saved: [t for t in saved if not isinstance(t, (int, float, bool, str))]


def _flatten(obj) -> list:
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _flatten(item)]
    return [obj]


def _pack(returns: str, tensors: list):
    if returns == "Tensor":
        return tensors[0]
    if returns == "Tensor[]":
        return list(tensors)
    return tuple(tensors)


def _fresh(obj):
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fresh(t) for t in obj)
    return obj.contiguous()


def _split_saved(saved: tuple):
    """Tensors (for save_for_backward) and the layout that rebuilds ``saved`` from them."""
    tensors, layout = [], []
    for item in saved:
        if isinstance(item, torch.Tensor):
            tensors.append(item)
            layout.append(("tensor", None))
        elif isinstance(item, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in item):
            tensors.extend(item)
            layout.append(("list", len(item)))
        else:
            layout.append(("value", item))
    return tensors, layout


def _join_saved(tensors, layout) -> tuple:
    out, i = [], 0
    for kind, v in layout:
        if kind == "tensor":
            out.append(tensors[i])
            i += 1
        elif kind == "list":
            out.append(list(tensors[i:i + v]))
            i += v
        else:
            out.append(v)
    return tuple(out)


def _kinds(args) -> list:
    """Per forward argument: 0 (not a tensor), -1 (a tensor) or n (a list of n tensors)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(-1)
        elif isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
            out.append(len(a))
        else:
            out.append(0)
    return out


def _input_grads(kinds, grads: list) -> list:
    """One gradient per tensor argument (lists get a list), None for the others."""
    out, i = [], 0
    for k in kinds:
        if k == -1:
            out.append(grads[i])
            i += 1
        elif k > 0:
            out.append(list(grads[i:i + k]))
            i += k
        else:
            out.append(None)
    return out


def _cast_grads(spec: OpSpec, raw, saved) -> list:
    like = _flatten(spec.grad_like(*saved))
    return [g.to(t.dtype).contiguous() for g, t in zip(_flatten(raw), like)]


def _only_first_output_differentiable(ctx, output) -> None:
    """Further outputs are what the backward reads (conv_exp's stacked terms): no gradient flows in."""
    if isinstance(output, (list, tuple)) and len(output) > 1:
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)


def define(spec: OpSpec) -> OpSpec:
    """Register ``spec``'s custom ops, fake rules, autograd and reference kernels; returns ``spec``."""
    name = spec.name
    bname = name + "_backward"
    backends.register("torch", name, spec.reference)
    backends.register("torch", bname, spec.reference_backward)

    def forward(*args):
        *inputs, backend = args
        return _fresh(backends.kernel(backend, name)(*inputs))

    def backward(grad, *args):
        *saved, backend = args
        raw = backends.kernel(backend, bname)(grad, *saved)
        return _pack(spec.grads, _cast_grads(spec, raw, saved))

    def backward_fake(grad, *args):
        *saved, backend = args
        return _pack(spec.grads, [t.new_empty(t.shape) for t in _flatten(spec.grad_like(*saved))])

    fwd = torch.library.custom_op(f"gsops::{name}", forward, mutates_args=(),
                                  schema=f"({spec.inputs}, str backend) -> {spec.returns}")
    fwd.register_fake(spec.fake)
    bwd = torch.library.custom_op(f"gsops::{bname}", backward, mutates_args=(),
                                  schema=f"(Tensor grad, {spec.saved}, str backend) -> {spec.grads}")
    bwd.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        *args, backend = inputs
        tensors, ctx.layout = _split_saved(spec.save(tuple(args), output))
        ctx.save_for_backward(*tensors)
        ctx.backend = backend
        ctx.kinds = _kinds(args)
        _only_first_output_differentiable(ctx, output)

    def autograd_backward(ctx, *grad_outputs):
        if grad_outputs[0] is None:  # no gradient reaches the result (grads are not materialised)
            return (None,) * (len(ctx.kinds) + 1)
        saved = _join_saved(ctx.saved_tensors, ctx.layout)
        grads = _flatten(bwd(grad_outputs[0], *saved, ctx.backend))
        return (*_input_grads(ctx.kinds, grads), None)

    fwd.register_autograd(autograd_backward, setup_context=setup_context)
    spec.op, spec.backward_op = fwd, bwd
    return spec


class _EagerReference(torch.autograd.Function):
    """The reference kernels of a spec under plain autograd: the custom op's formulas without the
    ``torch.library`` layer, which costs more than the op itself on small layers. For ops whose
    arguments are tensors and constants (no tensor lists)."""

    @staticmethod
    def forward(ctx, spec, *args):
        out = spec.reference(*args)
        saved = spec.save(args, out)
        ctx.save_for_backward(*[t for t in saved if isinstance(t, torch.Tensor)])
        ctx.consts = [None if isinstance(t, torch.Tensor) else t for t in saved]
        ctx.spec, ctx.is_tensor = spec, [isinstance(a, torch.Tensor) for a in args]
        _only_first_output_differentiable(ctx, out)
        return out

    @staticmethod
    def backward(ctx, *grad_outputs):
        if grad_outputs[0] is None:  # no gradient reaches the result (grads are not materialised)
            return (None,) * (len(ctx.is_tensor) + 1)
        tensors = iter(ctx.saved_tensors)
        saved = [next(tensors) if c is None else c for c in ctx.consts]
        raw = ctx.spec.reference_backward(grad_outputs[0], *saved)
        raw = (raw,) if isinstance(raw, torch.Tensor) else raw
        grads = iter([g if g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(raw, ctx.spec.grad_like(*saved))])
        return (None, *[next(grads) if is_t else None for is_t in ctx.is_tensor])


def call(spec: OpSpec, backend: str, *args):
    """The custom op of ``spec`` on ``backend``."""
    return spec.op(*args, backend)


def call_unchecked(spec: OpSpec, backend: str, *args):
    """As :func:`call`; in eager mode the reference backend runs under plain autograd instead."""
    if backend == "torch" and not torch.compiler.is_compiling():
        if spec.eager is not None:
            return spec.eager(*args)
        return _EagerReference.apply(spec, *args)
    return spec.op(*args, backend)
