"""LipConvnet-n (Singla and Feizi, 2021) with SOC or GS-SOC convolutions (Section 7.3 of the GS paper).

Five levels with ``n/5`` convolution blocks each (conv + MaxMin-type
activation); level ``l`` has ``base_channels * 2**l`` planes and its last
block downsamples by 2 (space-to-depth, doubling the output channels); the
last block of level 5 has a 1x1 kernel. The classifier is a 1x1 SOC layer on
the flattened features, sliced to ``num_classes`` outputs. Every layer is
1-Lipschitz, so the network is too, which :func:`certified_accuracy` uses.

``conv="soc"`` uses :class:`~gsops.nn.soc.SOCConv2d` and MaxMin (Table 3's SOC
row); ``conv="gssoc"`` uses :class:`~gsops.nn.soc.GSSOC` with ``groups`` and
MaxMinPermuted. On 32x32x3 input with ``num_classes=100`` the parameter counts
are those of Table 3 of the GS paper (24.07M for SOC, 6.81M for GS-SOC (4, -)).
A GS-SOC network's state_dict carries each grouped layer's ``format_version``;
``load_state_dict`` refuses, before copying anything, state saved without it
(:func:`~gsops.nn.soc.check_state_format`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_int, check_tensor
from ..nn.soc import GSSOC, MaxMin, MaxMinPermuted, SOCConv2d, check_state_format

__all__ = ["LipConvnet", "certified_accuracy"]

_ACTIVATIONS = {"maxmin": MaxMin, "maxmin_permuted": MaxMinPermuted}


class LipConvnet(nn.Module):
    """LipConvnet-``depth`` (depth a multiple of 5) on ``input_size`` x ``input_size`` images."""

    def __init__(self, depth: int = 15, base_channels: int = 32, conv: str = "soc", groups=(4, None),
                 num_classes: int = 100, *, in_channels: int = 3, input_size: int = 32,
                 activation: str | None = None, train_terms: int = 5, eval_terms: int = 12,
                 paired: bool = True):
        super().__init__()
        depth = check_int("depth", depth)
        if depth % 5:
            raise ValueError(f"depth={depth} must be a multiple of 5 (five levels of depth/5 blocks)")
        base_channels = check_int("base_channels", base_channels)
        num_classes = check_int("num_classes", num_classes)
        in_channels = check_int("in_channels", in_channels)
        input_size = check_int("input_size", input_size)
        if input_size % 32:
            raise ValueError(f"input_size={input_size} must be a multiple of 32 (five stride-2 levels)")
        if conv not in ("soc", "gssoc"):
            raise ValueError(f"conv={conv!r} must be 'soc' or 'gssoc'")
        if activation is None:
            activation = "maxmin" if conv == "soc" else "maxmin_permuted"
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {tuple(_ACTIVATIONS)}")
        self.conv = conv
        self.groups = tuple(groups) if conv == "gssoc" else None
        self.input_size = input_size
        self.in_channels = in_channels

        def make_conv(cin, k, stride, cout):
            kw = dict(out_channels=cout, stride=stride, train_terms=train_terms, eval_terms=eval_terms)
            if conv == "soc":
                return SOCConv2d(cin, k, 1, **kw)
            return GSSOC(cin, k, self.groups, paired=paired, **kw)

        blocks = []
        planes_in = in_channels
        n = depth // 5
        for level in range(5):
            planes = base_channels * 2 ** level
            for i in range(n):
                last = i == n - 1
                stride = 2 if last else 1
                k = 1 if (last and level == 4) else 3
                cout = planes * stride
                blocks.append(nn.Sequential(make_conv(planes_in, k, stride, cout), _ACTIVATIONS[activation]()))
                planes_in = cout
        self.features = nn.Sequential(*blocks)
        side = input_size // 32
        self.flat_features = planes_in * side * side
        self.last_layer = SOCConv2d(self.flat_features, 1, 1, train_terms, eval_terms, out_channels=num_classes)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # every GS-SOC layer's format, before any layer is loaded: a refused load changes nothing
        check_state_format(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, dim=4)
        if tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        z = self.features(x)
        z = z.reshape(z.shape[0], -1, 1, 1)  # flattening is an isometry
        return self.last_layer(z).flatten(1)


@torch.no_grad()
def certified_accuracy(model, x: torch.Tensor, y: torch.Tensor, eps: float, *, lipschitz: float = 1.0,
                       batch_size: int | None = None) -> float:
    """Fraction of ``(x, y)`` certified at l2 radius ``eps``: ``logit_y - max_{j != y} logit_j > sqrt(2) eps Lip``.

    For an ``L``-Lipschitz (l2) network the margin can shrink by at most
    ``sqrt(2) L eps`` under a perturbation of norm ``eps`` (Li et al. 2019;
    Singla and Feizi 2021). ``model`` is evaluated in eval mode and restored.
    A certified input is also correctly classified.
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    check_tensor("x", x)
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError("y must be an integer torch.Tensor of class labels")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape (N,) with N = x.shape[0] = {x.shape[0]}, got {tuple(y.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps={eps!r} must be a finite number >= 0")
    if isinstance(lipschitz, bool) or not isinstance(lipschitz, (int, float)) or not lipschitz > 0:
        raise ValueError(f"lipschitz={lipschitz!r} must be a number > 0")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one input")
    bs = x.shape[0] if batch_size is None else check_int("batch_size", batch_size)
    was_training = getattr(model, "training", None)
    if was_training:
        model.eval()
    try:
        hits = 0
        for s in range(0, x.shape[0], bs):
            logits = model(x[s:s + bs])
            if logits.dim() != 2:
                raise ValueError(f"model must return (N, classes) logits, got shape {tuple(logits.shape)}")
            yy = y[s:s + bs].to(logits.device).long()
            true = logits.gather(1, yy[:, None])[:, 0]
            others = logits.scatter(1, yy[:, None], float("-inf")).amax(1)
            hits += int(((true - others) > math.sqrt(2) * eps * lipschitz).sum())
    finally:
        if was_training:
            model.train()
    return hits / x.shape[0]
