"""The adapted layers the harness times: one builder per method, all starting from the same frozen base layer.

Every builder takes a deep copy of the base layer (``nn.Linear`` or ``nn.Conv2d``)
and returns a :class:`Built`: the module to run, and facts for the table. PEFT
baselines come from the installed ``peft`` package (a clear ImportError when it
is missing: those rows are never dropped silently); gsops rows use
``gsops.apply_(model, gsops.AdapterConfig(...))``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import dataclasses
import math

import torch
from torch import nn

LORA_RANK = 16


@dataclasses.dataclass
class Case:
    """One shape: a Linear ``d -> d`` on ``tokens`` rows, a stack of ``layers`` such Linears, or a Conv2d."""
    kind: str  # "linear" | "stack" | "conv"
    d: int  # the dimension Q acts on (in_features, or in_channels * kh * kw)
    tokens: int  # rows of the GEMM (tokens, or batch * H_out * W_out)
    block_size: int
    input_shape: tuple
    conv: dict | None = None  # in_channels, out_channels, kernel, padding
    layers: int = 1  # kind "stack": this many Linear d -> d layers in a row (the fixed cost per layer)

    @property
    def name(self) -> str:
        if self.kind == "linear":
            return f"linear d={self.d} tokens={self.tokens}"
        if self.kind == "stack":
            return f"stack {self.layers}x linear d={self.d} tokens={self.tokens}"
        c = self.conv
        return (f"conv{c['kernel']}x{c['kernel']} {c['in_channels']}->{c['out_channels']} "
                f"x={'x'.join(map(str, self.input_shape))}")

    @property
    def r(self) -> int:
        return self.d // self.block_size

    @property
    def boft_dense_factors(self) -> int:
        """BOFT's dense factor count ``1 + log2(r)`` (SPEC, Theorem 2); r is a power of two by construction."""
        return 1 + int(round(math.log2(self.r)))

    @property
    def target(self) -> str:
        """The module name every method adapts (PEFT's rule: the name or a ``.``-suffix)."""
        return "proj" if self.kind == "stack" else "layer"

    @property
    def base_layers(self) -> int:
        return self.layers if self.kind == "stack" else 1

    def make_base(self, device, dtype) -> nn.Module:
        if self.kind == "linear":
            base = nn.Linear(self.d, self.d, bias=True)
        elif self.kind == "stack":
            base = Stack(self.d, self.layers)
        else:
            c = self.conv
            base = nn.Conv2d(c["in_channels"], c["out_channels"], c["kernel"], padding=c["padding"], bias=True)
        return base.to(device=device, dtype=dtype)


def block_size_for(d: int, requested: int) -> int:
    """The smallest even ``b >= requested`` dividing ``d`` with ``d / b`` a power of two.

    Every method of a case uses the same ``b``; the power of two lets PEFT BOFT
    (which needs ``r`` divisible by ``2^(m-1)``) reach its dense factor count, e.g.
    ``d=1024 -> 32``, ``d=768 -> 48``, ``d=1152 (128 ch x 3x3) -> 36``.
    """
    for b in range(max(2, requested), d + 1):
        r, rem = divmod(d, b)
        if rem == 0 and b % 2 == 0 and r & (r - 1) == 0:
            return b
    raise ValueError(f"no even block_size >= {requested} divides d={d} into a power-of-two number of blocks")


class _Proj(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=True)

    def forward(self, x):
        return self.proj(x)


class Stack(nn.Module):
    """``layers`` Linear ``d -> d`` layers in a row, each named ``layers.<i>.proj``."""

    def __init__(self, d: int, layers: int):
        super().__init__()
        self.layers = nn.Sequential(*[_Proj(d) for _ in range(layers)])

    def forward(self, x):
        return self.layers(x)


@dataclasses.dataclass
class Built:
    module: nn.Module
    impl: str  # where the code comes from, e.g. "peft 0.21.2" or "gsops 0.1.0 [torch]"
    block_size: int | None = None
    n_factors: int | None = None
    orthogonal: bool = False  # has a Q whose density is reported
    note: str = ""


class _Holder(nn.Module):
    """A one-layer model so PEFT can target the layer by name."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _freeze(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _require_peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError(
            f"the PEFT baselines (LoRA, OFT, BOFT) need the installed 'peft' package ({e}); "
            "install it with `pip install -r requirements-dev.txt` (or ./run.sh bench, which does)"
        ) from None
    return peft


def _peft_wrap(base, config) -> nn.Module:
    peft = _require_peft()
    model = peft.get_peft_model(_Holder(_freeze(copy.deepcopy(base))), config)
    return model.base_model.model  # the holder with its layer replaced; skips PeftModel's call overhead


# ----------------------------------------------------------------------------- torch / PEFT rows
def build_base(base, case, **_):
    return Built(_Holder(_freeze(copy.deepcopy(base))), impl=f"torch {torch.__version__}")


def build_full(base, case, **_):
    m = _Holder(copy.deepcopy(base))
    for p in m.parameters():
        p.requires_grad_(True)
    return Built(m, impl=f"torch {torch.__version__}")


def build_lora(base, case, rank=LORA_RANK, **_):
    peft = _require_peft()
    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=[case.target], lora_dropout=0.0)
    return Built(_peft_wrap(base, cfg), impl=f"peft {peft.__version__}", note=f"rank {rank}")


def build_peft_oft(base, case, **_):
    peft = _require_peft()
    cfg = peft.OFTConfig(oft_block_size=case.block_size, r=0, target_modules=[case.target])
    m = _peft_wrap(base, cfg)
    note = "OFTv2 defaults (Cayley-Neumann, %d terms)" % cfg.num_cayley_neumann_terms if cfg.use_cayley_neumann \
        else "exact Cayley"
    return Built(m, impl=f"peft {peft.__version__}", block_size=case.block_size, n_factors=1, orthogonal=True,
                 note=note)


def peft_boft_factors(case, variant: str) -> int:
    return case.boft_dense_factors if variant == "dense" else 2


def build_peft_boft(base, case, variant="dense", **_):
    peft = _require_peft()
    from . import peft_boft

    m_req = peft_boft_factors(case, variant)
    label = peft_boft.fbd_implementation()
    cfg = peft.BOFTConfig(boft_block_size=case.block_size, boft_n_butterfly_factor=m_req,
                          target_modules=[case.target], boft_dropout=0.0)
    m = _peft_wrap(base, cfg)
    peft_boft.check_boft_factors(m, m_req, block_size=case.block_size)  # never report a reduced factor count
    return Built(m, impl=f"peft {peft.__version__}", block_size=case.block_size, n_factors=m_req, orthogonal=True,
                 note=label)


def peft_boft_step_flops(case, variant: str) -> float:
    """Rough fwd+bwd FLOPs of PEFT BOFT: it builds dense ``d x d`` factors with bmm (cost ~ m d^3, any token count)."""
    d, m = case.d, peft_boft_factors(case, variant)
    dense = m * 2 * (2 * d ** 3) + m * 2 * d ** 3  # P B P^T per factor + the chain and identity products
    rows = 2 * case.tokens * d * d  # x @ Q
    return 3.0 * (dense + rows) * case.base_layers


# ----------------------------------------------------------------------------- gsops rows
def gsops_adapters_available() -> tuple[bool, str]:
    import gsops

    if hasattr(gsops, "apply_") and hasattr(gsops, "AdapterConfig"):
        return True, "gsops.apply_"
    return False, "gsops.apply_/AdapterConfig are not available in this checkout"


def gsops_factor_count(spec, case) -> int:
    """The factor count a gsops orthogonal method is timed with: its own, or BOFT's dense ``1 + log2(r)``
    for a method whose count follows ``n_factors``."""
    return spec.factor_count(case.boft_dense_factors)


def follows_n_factors(spec) -> bool:
    """True for an orthogonal method whose factor count is ``AdapterConfig.n_factors`` (BOFT)."""
    return spec.factor_count(2) != spec.factor_count(3)


def gsops_unfit(base, case, method) -> str | None:
    """Why gsops ``method`` cannot wrap the case's layer with the case's block size (the rule of the method's
    registry entry, e.g. Double GSOFT's ``Q_out`` on ``out_channels``), else None. Every method of a case is
    timed with the same block size, so a layer it does not fit is reported, not adjusted."""
    from gsops.methods import registry

    spec = registry.get(method)
    layer = base.layers[0].proj if case.kind == "stack" else base
    return spec.problem(layer, case.block_size, gsops_factor_count(spec, case))


def build_gsops(base, case, method, backend="torch", rank=LORA_RANK, **_):
    import gsops
    from gsops.methods import registry

    ok, reason = gsops_adapters_available()
    if not ok:
        raise RuntimeError(reason)
    model = _Holder(copy.deepcopy(base))
    kw = {}
    if method == "gsoft_noscale":  # GSOFT without the magnitude scale s (which needs W Q x saved for its gradient)
        method = "gsoft"
        kw["scale"] = False
    elif method == "oft_neumann":  # OFT with PEFT OFT's defaults: the Cayley-Neumann series, no scale
        method = "oft"
        kw.update(cayley="neumann", scale=False)
    spec = registry.get(method)
    orth = spec.family == "orthogonal"
    n_factors = None
    if orth:
        n_factors = gsops_factor_count(spec, case)
        kw.update(block_size=case.block_size, n_factors=n_factors)
    else:
        kw.update(rank=rank)
    cfg = gsops.AdapterConfig(method=method, target_modules=[case.target], **kw)
    with contextlib.redirect_stdout(io.StringIO()):  # apply_'s summary would break the progress bar
        res = gsops.apply_(model, cfg)
    model = res if isinstance(res, nn.Module) else model
    if orth:
        _check_gsops_factors(model, method, n_factors, case.block_size)
    return Built(model, impl=f"gsops {gsops.__version__} [{backend}]",
                 block_size=kw.get("block_size"), n_factors=n_factors, orthogonal=orth,
                 note=f"rank {rank}" if not orth else ", ".join(
                     ([f"cayley={kw['cayley']}"] if "cayley" in kw else []) + ([] if kw.get("scale", True) else ["scale=False"])))


def _check_gsops_factors(model, method, n_stack, block_size) -> None:
    """Raise unless every stack of Cayley blocks has the requested factor count and block size (read from shapes)."""
    stacks = [m for m in model.modules() if type(m).__name__ == "CayleyBlocks"]
    if not stacks:
        raise RuntimeError(f"gsops {method}: found no CayleyBlocks in the adapted model; cannot check its factors")
    for st in stacks:
        shape = tuple(st.params.shape)
        if shape[0] != n_stack or st.b != block_size:
            raise RuntimeError(f"gsops {method}: Cayley parameters of shape {shape} (b={st.b}) do not have "
                               f"the requested {n_stack} factor(s) of block size {block_size}")


# ----------------------------------------------------------------------------- density of Q
@torch.no_grad()
def density_of_q(builder, case, device="cpu", **kw) -> float:
    """Fraction of nonzeros of the dense ``Q`` of an orthogonal method, measured on a Linear ``d -> d``.

    The adapted layer computes ``y = s * (W (Q x)) + c``; with ``W = I``, ``c = 0`` and
    random adapter parameters, feeding the identity gives ``diag(s) Q`` (for
    Double GSOFT: ``Q_out Q_in``, the composite map). Structural zeros stay exact
    zeros (products with exact zeros and permutations), so counting ``!= 0``
    gives the density; the dense Cayley blocks are nonzero almost surely.
    """
    d = case.d
    lin_case = dataclasses.replace(case, kind="linear", input_shape=(d, d), conv=None, tokens=d)
    dt = torch.float32
    base = nn.Linear(d, d, bias=True).to(device=device, dtype=dt)
    base.weight.copy_(torch.eye(d, dtype=dt))
    base.bias.zero_()
    built = builder(base, lin_case, **kw)
    mod = built.module.to(dt)
    gen = torch.Generator().manual_seed(0)
    for p in mod.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))
    Y = mod(torch.eye(d, dtype=dt, device=device))
    return float((Y != 0).double().mean())
