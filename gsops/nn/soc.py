"""GS-SOC layers: skew orthogonal convolutions with groups, channel shuffles, MaxMin activations.

Section 6 and Appendix F of Gorbunov et al. (NeurIPS 2024), after SOC (Singla
and Feizi, ICML 2021):

* :class:`SOCConv2d`: ``y = exp(L) * x + b`` with the grouped skew kernel
  ``L = M - ConvTranspose(M)``, each group scaled by its own power-iteration
  spectral bound (SOC's bound, per group as in the GS paper) so the truncated
  Taylor series converges; stride 2 by space-to-depth.
* :class:`ChShuffle`: the paired channel permutation of Appendix F
  (:func:`gsops.paired_perm`), or ``perm(k, n)`` when ``paired=False``.
* :class:`GSSOC`: ``GrExpConv_2(ChShuffle_2(GrExpConv_1(ChShuffle_1(x))))``,
  ``ChShuffle_1`` on the input channels (before space-to-depth and zero
  channels), the second exponential 1x1 (exact matrix exponential; the GS
  paper's code uses the normalised truncated series there instead).
* :class:`MaxMinPermuted` (Definition F.2) and :class:`MaxMin` (Definition F.1).
"""
from __future__ import annotations

import torch
from torch import nn

from ..checks import check_divides, check_int, check_tensor
from ..ops import conv_exp as cops
from ..perm import invert, paired_perm, perm

__all__ = ["SOCConv2d", "ChShuffle", "GSSOC", "MaxMinPermuted", "MaxMin", "check_state_format"]

# Version of what a grouped SOCConv2d / GSSOC computes from its state: stored in the
# state_dict as the buffer ``format_version`` (see :func:`check_state_format`).
# 2: each group normalised by its own spectral bound; ChShuffle_1 on the input channels.
FORMAT_VERSION = 2
_FORMAT_1 = (
    "it has no 'format_version' key: it was saved by an earlier gsops, which normalised a grouped "
    "exponential by the largest spectral bound over its groups and applied GSSOC's first ChShuffle "
    "after space-to-depth and zero channels; this version normalises each group by its own bound "
    "and shuffles the input channels (the GS paper's definition), so the same weights would compute "
    "a different function. Retrain, or load it with the gsops version that saved it"
)


def _format_error(kind: str, prefix: str, found) -> RuntimeError:
    where = f"{kind} state at {prefix!r}" if prefix else f"{kind} state"
    if found is None:
        return RuntimeError(f"cannot load {where}: {_FORMAT_1}")
    return RuntimeError(f"cannot load {where}: format_version={found}, this gsops reads format_version={FORMAT_VERSION}")


def check_state_format(module: nn.Module, state_dict, prefix: str = "") -> None:
    """Refuse (``RuntimeError``) a state_dict whose grouped SOC/GSSOC layers were saved in another format.

    Walks ``module``'s grouped :class:`SOCConv2d` and :class:`GSSOC` layers; for
    each whose weight is in ``state_dict`` the key ``format_version`` must be
    present and equal :data:`FORMAT_VERSION`. Called by ``load_state_dict`` of
    these layers and of :class:`~gsops.models.LipConvnet` before anything is
    copied, so a refused load leaves the module unchanged.
    """
    for name, m in module.named_modules():
        check = getattr(m, "_format_check", None)
        if check is None:
            continue
        p = prefix + (name + "." if name else "")
        weight_key, kind = check
        if p + weight_key not in state_dict:
            continue  # this layer is not being loaded (e.g. a partial state_dict with strict=False)
        v = state_dict.get(p + "format_version")
        if v is None:
            raise _format_error(kind, p, None)
        if isinstance(v, torch.Tensor):
            if v.is_meta:
                continue
            v = int(v)
        if v != FORMAT_VERSION:
            raise _format_error(kind, p, v)


def _check_groups_fit(name: str, groups: int, channels_name: str, channels: int, paired: bool) -> None:
    check_divides(name, groups, channels_name, channels)
    if paired and groups > 1:
        if channels % 2:
            raise ValueError(f"{channels_name}={channels} must be even for a paired ChShuffle")
        check_divides(name, groups, f"{channels_name} // 2", channels // 2)


class ChShuffle(nn.Module):
    """Channel permutation ``out[:, sigma(i)] = x[:, i]`` (matrix convention of SPEC).

    ``paired=True``: ``sigma = paired_perm(groups, channels)`` (Appendix F), which
    keeps the pairs ``(2j, 2j+1)`` of :class:`MaxMinPermuted` together;
    ``paired=False``: ``sigma = perm(groups, channels)`` (Definition 5.2).
    """

    def __init__(self, channels: int, groups: int, paired: bool = True):
        super().__init__()
        self.channels = check_int("channels", channels)
        self.groups = check_int("groups", groups)
        self.paired = bool(paired)
        _check_groups_fit("groups", self.groups, "channels", self.channels, self.paired)
        # Index tensors are built on the CPU even under a ``torch.device(...)`` context (e.g. meta):
        # perm.py caches them, and a meta tensor in that cache would have no data.
        with torch.device("cpu"):
            if self.paired:
                sigma = paired_perm(self.groups, self.channels)
            else:
                check_divides("groups", self.groups, "channels", self.channels)
                sigma = perm(self.groups, self.channels)
            index = invert(sigma)
        self.register_buffer("sigma", sigma, persistent=False)
        self.register_buffer("index", index, persistent=False)  # out = x[:, index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, min_dim=2)
        if x.shape[1] != self.channels:
            raise ValueError(f"x.shape[1]={x.shape[1]} must equal channels={self.channels}")
        return x.index_select(1, self.index.to(x.device))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, paired={self.paired}"


def _check_pairs(x: torch.Tensor) -> None:
    check_tensor("x", x, min_dim=2)
    if x.shape[1] % 2:
        raise ValueError(f"x.shape[1]={x.shape[1]} must be even (channels are taken in pairs)")


class MaxMinPermuted(nn.Module):
    """Definition F.2: pairs ``(2i, 2i+1)``; ``out[2i] = max``, ``out[2i+1] = min``. 1-Lipschitz, GNP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_pairs(x)
        a, b = x[:, 0::2], x[:, 1::2]
        return torch.stack((torch.maximum(a, b), torch.minimum(a, b)), dim=2).reshape(x.shape)


class MaxMin(nn.Module):
    """Definition F.1 (SOC's MaxMin): pairs ``(i, i + C/2)``; first half max, second half min."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_pairs(x)
        a, b = x.chunk(2, dim=1)
        return torch.cat((torch.maximum(a, b), torch.minimum(a, b)), dim=1)


class SOCConv2d(nn.Module):
    """Skew orthogonal convolution with ``groups`` groups (SOC; GrExpConv of the GS paper).

    ``y = slice_out(exp(L) * pad(s2d(x))) + bias`` where ``s2d`` is space-to-depth
    by ``stride`` (channels x stride^2), ``pad`` appends zero channels up to
    ``max(in, out)``, and ``L_g = c * (M - ConvTranspose(M))_g / sigma_g`` for each
    group ``g`` with SOC's power-iteration bound ``sigma_g`` of that group and
    correction ``c`` (0.7 for k > 1). The
    exponential is the Taylor series with ``train_terms`` / ``eval_terms``
    convolutions. ``exact=True`` (1x1 kernels only) uses the exact matrix
    exponential of the block-diagonal channel matrix instead (no normalisation,
    no series): GSSOC's second exponential. With
    ``out_channels == channels * stride**2`` (the default) the Jacobian is
    orthogonal; otherwise the layer is 1-Lipschitz.
    Parameters: ``M`` of shape (work, work/groups, k, k) and a bias of ``out_channels``.
    A grouped layer (``groups > 1``, not ``exact``) stores ``format_version`` in its
    state_dict and refuses state saved without it (:func:`check_state_format`).
    """

    def __init__(self, channels: int, kernel_size: int = 3, groups: int = 1, train_terms: int = 5,
                 eval_terms: int = 12, *, out_channels: int | None = None, stride: int = 1, bias: bool = True,
                 correction: float | None = None, init_iters: int = 50, update_iters: int = 1,
                 update_freq: int = 200, exact: bool = False):
        super().__init__()
        self.channels = check_int("channels", channels)
        self.kernel_size = check_int("kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be odd")
        self.groups = check_int("groups", groups)
        self.train_terms = check_int("train_terms", train_terms)
        self.eval_terms = check_int("eval_terms", eval_terms)
        self.stride = check_int("stride", stride)
        self.in_work = self.channels * self.stride ** 2
        self.out_channels = self.in_work if out_channels is None else check_int("out_channels", out_channels)
        self.work = max(self.in_work, self.out_channels)
        check_divides("groups", self.groups, "max(channels*stride**2, out_channels)", self.work)
        self.init_iters = check_int("init_iters", init_iters, minimum=0)
        self.update_iters = check_int("update_iters", update_iters, minimum=0)
        self.update_freq = check_int("update_freq", update_freq)
        if correction is None:
            correction = 0.7 if self.kernel_size > 1 else 1.0
        if not correction > 0:
            raise ValueError(f"correction={correction} must be > 0")
        self.correction = float(correction)

        c = self.work // self.groups
        self.weight = nn.Parameter(torch.empty(self.work, c, self.kernel_size, self.kernel_size))
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        self.exact = bool(exact)
        if self.exact and self.kernel_size != 1:
            raise ValueError(f"exact=True needs kernel_size=1 (a matrix exponential), got kernel_size={kernel_size}")
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        if self.groups > 1 and not self.exact:
            self.register_buffer("format_version", torch.tensor(FORMAT_VERSION, dtype=torch.long))
            self._format_check = ("weight", "grouped SOCConv2d")
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        check_state_format(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        c = self.work // self.groups
        nn.init.normal_(self.weight, std=1.0 / (c ** 0.5))
        if self.bias is not None:
            bound = 1.0 / (self.out_channels ** 0.5)
            nn.init.uniform_(self.bias, -bound, bound)
        if not self.exact:
            with torch.no_grad():
                L = cops.skew_kernel(self.weight, self.groups)
                us, vs = cops.power_iteration_vectors(L, self.groups)
                cops.power_iterate(L, self.groups, us, vs, self.init_iters)
            for i in range(4):
                self.register_buffer(f"pi_u{i}", us[i])
                self.register_buffer(f"pi_v{i}", vs[i])
        self.steps.zero_()

    def _vectors(self):
        return ([getattr(self, f"pi_u{i}") for i in range(4)], [getattr(self, f"pi_v{i}") for i in range(4)])

    def skew_kernel(self) -> torch.Tensor:
        """The (unnormalised) grouped skew kernel ``M - ConvTranspose(M)``."""
        return cops.skew_kernel(self.weight, self.groups)

    def normalised_kernel(self) -> torch.Tensor:
        """``L`` as used in the exponential; updates the power iteration when training."""
        L = self.skew_kernel()
        if self.exact:
            return L
        us, vs = self._vectors()
        if self.training:
            iters = self.init_iters if int(self.steps) % self.update_freq == 0 else self.update_iters
            cops.power_iterate(L, self.groups, us, vs, iters)
            self.steps += 1
        sigma = cops.spectral_bound(L, self.groups, us, vs)  # (groups,): one bound per group
        return cops.normalise_per_group(L, self.groups, self.correction / sigma)

    def terms(self) -> int:
        return self.train_terms if self.training else self.eval_terms

    def _lift(self, x: torch.Tensor) -> torch.Tensor:
        """Space-to-depth and zero channels: (N, channels, H, W) -> (N, work, H/s, W/s)."""
        check_tensor("x", x, dim=4)
        if x.shape[1] != self.channels:
            raise ValueError(f"x.shape[1]={x.shape[1]} must equal channels={self.channels}")
        if self.stride > 1:
            for name, size in (("x.shape[2]", x.shape[2]), ("x.shape[3]", x.shape[3])):
                check_divides("stride", self.stride, name, size)
            x = cops.space_to_depth(x, self.stride)
        if self.work > self.in_work:
            x = torch.cat((x, x.new_zeros(x.shape[0], self.work - self.in_work, *x.shape[2:])), dim=1)
        return x

    def _exp(self, x: torch.Tensor) -> torch.Tensor:
        L = self.normalised_kernel().to(x.dtype)
        if self.exact:
            return cops.conv_exp_1x1(x, L, self.groups)
        return cops.conv_exp(x, L, self.terms(), self.groups)

    def _finish(self, z: torch.Tensor) -> torch.Tensor:
        if self.out_channels < self.work:
            z = z[:, : self.out_channels]
        if self.bias is not None:
            z = z + self.bias.to(z.dtype).view(1, -1, 1, 1)
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(self._exp(self._lift(x)))

    def extra_repr(self) -> str:
        s = f"{self.channels}, kernel_size={self.kernel_size}, groups={self.groups}"
        if self.stride != 1:
            s += f", stride={self.stride}"
        if self.out_channels != self.in_work:
            s += f", out_channels={self.out_channels}"
        return s + f", terms={self.train_terms}/{self.eval_terms}" + (", exact" if self.exact else "")


class GSSOC(nn.Module):
    """GS orthogonal convolution: ``GrExpConv_2(ChShuffle_2(GrExpConv_1(ChShuffle_1(x))))`` (Section 6).

    ``groups=(g1, g2)``: the first exponential has ``kernel_size`` and ``g1``
    groups, each group normalised by its own spectral bound. ``ChShuffle_1 =
    ChShuffle(channels, g1)`` permutes the input channels before the first
    layer's space-to-depth and zero channels, and is left out when ``channels``
    is not a multiple of ``g1`` (e.g. a 3-channel image with 4 groups), as in
    the GS paper's code. The second is a 1x1 exponential with ``g2`` groups,
    shuffled before it with ``ChShuffle(out, g2)``; ``g2=None`` (or 0) leaves it
    out: Table 3's ``(4, -)``. Each exponential has its own bias. Stride and
    channel change are those of :class:`SOCConv2d`.

    The 1x1 exponential is exact (``torch.linalg.matrix_exp`` of each skew
    channel block, no normalisation). The GS paper's code computes it as the
    truncated Taylor series (its train/eval terms, 5/12 by default) of the
    kernel divided by its spectral bound (correction 1): for the same weights
    a different map, ``exp(L / sigma)`` truncated instead of ``exp(L)``.

    With ``g1 > 1`` the state_dict holds ``format_version``; state saved without
    it is refused (:func:`check_state_format`).
    """

    def __init__(self, channels: int, kernel_size: int = 3, groups=(4, None), train_terms: int = 5,
                 eval_terms: int = 12, *, out_channels: int | None = None, stride: int = 1, bias: bool = True,
                 paired: bool = True):
        super().__init__()
        if not isinstance(groups, (tuple, list)) or len(groups) != 2:
            raise ValueError(f"groups={groups!r} must be a pair (g1, g2) with g2 an int or None")
        g1 = check_int("groups[0]", groups[0])
        g2 = groups[1]
        if g2 is not None:
            g2 = check_int("groups[1]", g2, minimum=0) or None
        self.groups = (g1, g2)
        in_work = check_int("channels", channels) * check_int("stride", stride) ** 2
        out = in_work if out_channels is None else check_int("out_channels", out_channels)
        _check_groups_fit("groups[0]", g1, "max(channels*stride**2, out_channels)", max(in_work, out), paired)
        if g2 is not None:
            _check_groups_fit("groups[1]", g2, "out_channels", out, paired)
        self.conv1 = SOCConv2d(channels, kernel_size, g1, train_terms, eval_terms,
                               out_channels=out_channels, stride=stride, bias=bias)
        shuffle_in = g1 > 1 and channels % g1 == 0
        if shuffle_in:
            _check_groups_fit("groups[0]", g1, "channels", channels, paired)
        self.shuffle1 = ChShuffle(channels, g1, paired) if shuffle_in else nn.Identity()
        if g1 > 1:
            self.register_buffer("format_version", torch.tensor(FORMAT_VERSION, dtype=torch.long))
            self._format_check = ("conv1.weight", "GSSOC")
        self.out_channels = self.conv1.out_channels
        if g2 is None:
            self.shuffle2 = None
            self.conv2 = None
        else:
            self.shuffle2 = ChShuffle(self.out_channels, g2, paired) if g2 > 1 else nn.Identity()
            self.conv2 = SOCConv2d(self.out_channels, 1, g2, train_terms, eval_terms, bias=bias, exact=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        check_state_format(self, state_dict, prefix)  # this layer and conv1, before either is loaded
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.shuffle1(x))
        if self.conv2 is not None:
            y = self.conv2(self.shuffle2(y))
        return y

    def extra_repr(self) -> str:
        return f"groups={self.groups}"
