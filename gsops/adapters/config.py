"""``AdapterConfig``: which method, which layers, and the method's knobs; validated on creation."""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

from torch import nn

from ..checks import FLOAT_DTYPES, check_int
from ..methods import registry
from ..nn.cayley_param import check_cayley
from .targets import _NOT_IN_NAMES as _NOT_A_NAME, ALL_LINEAR, normalise_targets, rule_matches

METHODS = registry.names()  # the built-in methods; registry.METHODS also holds methods registered later
ADAPTER_DTYPES = {str(d).replace("torch.", ""): d for d in FLOAT_DTYPES}


@dataclasses.dataclass
class AdapterConfig:
    """What :func:`gsops.apply_` does to a model.

    method: a name of :data:`gsops.methods.METHODS`, whose entry checks the method's
        rules and builds its layers: ``"gsoft"`` (Q = P^T L P R), ``"double_gsoft"``
        (Q_out W Q_in), ``"oft"`` (one block-diagonal factor), ``"boft"`` (``n_factors``
        butterfly factors), ``"sorsa"`` or ``"loldu"`` (low-rank, need ``rank``).
    block_size: Cayley block size ``b >= 2`` (orthogonal methods). A layer whose input
        dimension (``in_features``, or ``in_channels/groups*kh*kw`` for Conv2d) it does not
        divide gets the nearest size that fits (ties: the smaller), with a warning naming
        the layer and both sizes, as PEFT's OFT does; ``strict=True`` refuses instead.
    n_factors: number of butterfly factors for ``boft``. ``gsoft``/``double_gsoft``
        always have 2 factors (L and R) and require ``n_factors == 2``; ``oft``,
        ``sorsa`` and ``loldu`` do not read it.
    scale: learn the per-output magnitude ``s`` (init 1) of the orthogonal methods.
    packed: store the ``b(b-1)/2`` free numbers of each skew block (True) or full
        ``b x b`` blocks with ``K = A - A^T`` (False; the GSOFT paper's code and
        PEFT's BOFT use ``K = 0.5 (A - A^T)``, see :mod:`gsops.adapters.convert`).
    cayley: ``"exact"``, ``"neumann"`` (OFTv2's series, ``neumann_terms`` terms) or
        ``"peft_neumann"`` (PEFT's own Cayley–Neumann series, which
        :func:`gsops.load_peft_adapter` sets for PEFT OFT adapters trained with
        ``use_cayley_neumann=True``; see :mod:`gsops.reference.peft_cayley`).
    rank: rank of ``sorsa`` / ``loldu``; must be None for the orthogonal methods.
    target_modules: PEFT's rules (see :mod:`gsops.adapters.targets`): ``"all-linear"``
        (default; every ``nn.Linear`` / ``Conv1D`` but the output layer), a list of module
        names (exact or ``"." + name`` suffix, e.g. ``["q", "v"]``) and/or module types,
        or a single regular expression matched with ``re.fullmatch`` on the full name.
    exclude_modules: None, a list of names or a regex, as ``target_modules``; wins over it.
    strict: refuse (ValueError naming the layer) instead of adjusting ``block_size``.
    adapter_dtype: dtype of the adapter parameters (``"float32"``, ``torch.float32``, ...);
        None gives float32 on a float16/bfloat16 base and the base dtype otherwise.
    modules_to_save: None, or a list of module names trained in full (PEFT's
        ``modules_to_save`` and its rule: a module is selected when its qualified
        name equals an entry or ends with ``"." + entry``, e.g. ``"classifier"``).
        Their parameters get ``requires_grad=True``, they are never wrapped with
        an adapter, their floating-point state is saved and loaded with the
        adapter, and :func:`gsops.revert_` restores the values they had before
        :func:`gsops.apply_`.
    """

    method: str = "gsoft"
    block_size: int = 32
    n_factors: int = 2
    scale: bool = True
    packed: bool = True
    cayley: str = "exact"
    neumann_terms: int = 5
    rank: int | None = None
    target_modules: Any = ALL_LINEAR
    exclude_modules: Any = None
    strict: bool = False
    adapter_dtype: Any = None
    modules_to_save: Any = None

    def __post_init__(self):
        spec = registry.get(self.method)
        self.block_size = check_int("block_size", self.block_size)
        self.n_factors = check_int("n_factors", self.n_factors)
        self.neumann_terms = check_int("neumann_terms", self.neumann_terms)
        for flag in ("scale", "packed", "strict"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        check_cayley(self.cayley)
        if self.rank is not None:
            if "rank" not in spec.params:
                users = [n for n, s in registry.METHODS.items() if "rank" in s.params]
                raise ValueError(f"rank={self.rank!r} is only used by {users}; method={self.method!r} needs rank=None")
            self.rank = check_int("rank", self.rank)
        spec.check_config(self)  # the method's own rules, from its registry entry
        self.target_modules = normalise_targets(self.target_modules, "target_modules")
        self.exclude_modules = normalise_targets(self.exclude_modules, "exclude_modules")
        self.modules_to_save = _normalise_modules_to_save(self.modules_to_save)
        if self.adapter_dtype is not None:
            name = self.adapter_dtype if isinstance(self.adapter_dtype, str) else str(self.adapter_dtype).replace("torch.", "")
            if name not in ADAPTER_DTYPES:
                raise ValueError(f"adapter_dtype={self.adapter_dtype!r} must be None or one of {sorted(ADAPTER_DTYPES)}")
            self.adapter_dtype = name

    @property
    def adapter_torch_dtype(self):
        """``adapter_dtype`` as a torch.dtype (None: chosen per layer, float32 on half-precision layers)."""
        return None if self.adapter_dtype is None else ADAPTER_DTYPES[self.adapter_dtype]

    # ---- matching
    def matches(self, name: str, module: nn.Module) -> bool:
        """The name/type rule alone (``"all-linear"``'s output-layer exclusion needs the model; see apply_)."""
        return rule_matches(self.target_modules, name, module) and not rule_matches(self.exclude_modules, name, module)

    # ---- serialisation (JSON-safe)
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.modules_to_save is None:
            del d["modules_to_save"]  # files without saved modules stay readable by gsops versions before the field
        for key in ("target_modules", "exclude_modules"):
            v = getattr(self, key)
            if isinstance(v, list):
                d[key] = [t if isinstance(t, str) else f"type:{t.__module__}.{t.__qualname__}" for t in v]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown AdapterConfig field(s) {unknown}; known: {sorted(fields)}")
        d = dict(d)
        for key in ("target_modules", "exclude_modules"):
            targets = d.get(key)
            if targets is None or isinstance(targets, str):
                continue
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise TypeError(f"{key} must be a string or a list of strings in a config dict, got {targets!r:.200}")
            if any(_NOT_A_NAME.search(t) for t in targets) and not any(t.startswith("type:") for t in targets):
                # written when list entries were re.search patterns: the same rule as one fullmatch regex
                d[key] = "|".join(f"(?:.*(?:{t}).*)" for t in targets)
                continue
            d[key] = [_type_from_string(t) if t.startswith("type:") else t for t in targets]
        return cls(**d)


def _normalise_modules_to_save(entries):
    if entries is None:
        return None
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, (list, tuple)) or not all(isinstance(e, str) for e in entries):
        raise TypeError(f"modules_to_save must be None or a list of module names (str), got {entries!r:.200}")
    bad = [e for e in entries if not e or e.startswith(".") or e.endswith(".")]
    if bad:
        raise ValueError(f"modules_to_save: {bad!r} are not module names (empty, or a leading/trailing '.')")
    if not entries:
        raise ValueError("modules_to_save must not be empty (use None for no module)")
    return list(dict.fromkeys(entries))


def _type_from_string(s: str):
    """Resolve ``"type:<module>.<qualname>"`` among already imported modules only: a config never imports code."""
    path = s[len("type:"):]
    module, _, name = path.rpartition(".")
    obj = sys.modules.get(module)
    if obj is None:
        raise ValueError(f"target_modules: cannot resolve module type {path!r} (module {module!r} is not imported; "
                         "a config never imports modules, import it first)")
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"target_modules: cannot resolve module type {path!r}")
    return obj
