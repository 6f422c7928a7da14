"""`FlexLoRAConfig`: the one configuration dataclass of flexlora.

Every field carries its help text in ``metadata["help"]``; :meth:`FlexLoRAConfig.validate` (run at
construction, and again by ``wrap`` and ``RankAllocator``) checks each field and names it, with the
allowed range, in the error.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

SCHEDULES = ("cubic", "cubic_authors", "constant")
_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch here


def scaling_fits_float32(alpha: float, r_init: int) -> bool:
    """Whether s = alpha / r_init (alpha when r_init = 0) is finite in float32, where the op
    applies it: inf would make every output NaN (s·0)."""
    return alpha / max(int(r_init), 1) <= _FLOAT32_MAX
IMPORTANCE_METRICS = (
    "entropy",
    "nuclear",
    "frobenius",
    "sensitivity",
    "energy_entropy_element",
    "energy_entropy_matrix",
    "exact_entropy",
)
ALLOCATION_MODES = ("prune_expand", "prune_only", "expand_only")
EXPAND_INITS = ("zero_impact", "small", "zero", "orthogonal")

try:  # numpy.bool_ is no numbers.Integral, but guard it like bool all the same
    from numpy import bool_ as _np_bool
except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
    _np_bool = bool


def is_int(v: Any) -> bool:
    """An integer (int, numpy.int64, ...: any numbers.Integral), bool excluded (True would pass
    as 1)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, _np_bool))


def is_finite_number(v: Any) -> bool:
    """A real number (int, float, numpy.float32, ...: any numbers.Real), bool excluded, neither
    NaN nor ±inf (NaN passes no comparison and inf passes "> 0": both would reach the outputs as
    NaN)."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, _np_bool)) and math.isfinite(v)


def _plain(v: Any) -> Any:
    """numpy (or other numbers.Integral / numbers.Real) scalars as Python int / float, so that
    the config stays JSON-ready and compares like the built-in numbers."""
    if type(v) in (int, float) or isinstance(v, bool):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def _is_collection(v: Any) -> bool:
    try:
        iter(v)
    except TypeError:
        return False
    return not isinstance(v, (str, bytes))


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class FlexLoRAConfig:
    """Configuration of the FlexLoRA adapters and of the rank allocator.

    Adapter fields (used by :func:`flexlora.wrap`) come first, allocation fields (used by
    :class:`flexlora.RankAllocator`) after.
    """

    # --- adapters ---------------------------------------------------------------------------
    r_init: int = _help("Initial active rank of every adapted module (>= 0, <= r_max).", default=8)
    r_max: int = _help(
        "Rank of the preallocated buffer P [out, r_max], lam [r_max], Q [r_max, in] (>= 1).",
        default=16,
    )
    alpha: float = _help(
        "LoRA alpha (> 0); the scaling s = alpha / r_init is fixed for the module's life.",
        default=16.0,
    )
    dropout: float = _help("Dropout on the adapter input, in [0, 1).", default=0.0)
    init_std: float = _help(
        "Std of the Gaussian init of P and Q, and of expanded directions (> 0).", default=0.02
    )
    target_modules: Union[Sequence[str], str] = _help(
        "Which nn.Linear modules get an adapter: a list of name suffixes ('q_proj' matches "
        "'model.layers.0.self_attn.q_proj'), or one regex matched against the full name.",
        default=("q_proj", "v_proj"),
    )
    modules_to_save: Sequence[str] = _help(
        "Name suffixes of modules trained in full (e.g. a classifier head); everything else "
        "but the adapters is frozen. None means none.",
        default=(),
    )

    # --- rank allocation ----------------------------------------------------------------------
    total_steps: int = _help("Total optimizer steps T of the run (>= 1).", default=1000)
    t_warmup: int = _help("Steps before the first allocation event (>= 0).", default=100)
    t_final: int = _help(
        "Steps at the end with frozen ranks (>= 0, < total_steps); t_warmup < total_steps - t_final.", default=200
    )
    delta_t: int = _help("Steps between two allocation events (>= 1).", default=10)
    b0: int = _help("Modules pruned (and expanded) per event at the start of the window (>= 0).", default=4)
    schedule: str = _help(f"Decay of b(t), one of {SCHEDULES}.", default="cubic")
    r_min: int = _help("A module is never pruned below this rank (>= 0, <= r_init).", default=1)
    importance: str = _help(f"Module score, one of {IMPORTANCE_METRICS}.", default="entropy")
    allocation_mode: str = _help(f"Ablation switch, one of {ALLOCATION_MODES}.", default="prune_expand")
    expand_init: str = _help(f"Init of a newly activated direction, one of {EXPAND_INITS}.", default="zero_impact")
    orth_reg: float = _help(
        "Weight gamma of the orthogonality penalty: gamma times the mean over modules of "
        "||P^T P - I||^2 + ||Q Q^T - I||^2 on the active slots (>= 0).",
        default=0.1,
    )
    sensitivity_beta: float = _help(
        "EMA factor of the AdaLoRA-style sensitivity metric, in [0, 1).", default=0.85
    )
    uncertainty_beta: float = _help(
        "EMA factor of the sensitivity's uncertainty term, in [0, 1).", default=0.85
    )
    entropy_eps: float = _help("The eps in -sum s log(s + eps) (> 0).", default=1e-12)
    seed: int = _help("Seed of the new directions' Gaussian draws (same on every DDP rank).", default=0)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (ValueError naming the first bad one and its allowed range) and
        normalise them (name lists to tuples, numpy scalars to int / float). Runs at
        construction; :func:`flexlora.wrap` and :class:`flexlora.RankAllocator` run it again,
        so a field changed after construction is checked before it is used."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _plain(getattr(self, f.name)))

        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(
                    f"FlexLoRAConfig.{name} must be {expected}, got {getattr(self, name)!r}"
                )

        need(is_int(self.r_max) and self.r_max >= 1, "r_max", "an int >= 1")
        need(is_int(self.r_init) and 0 <= self.r_init <= self.r_max, "r_init", f"an int in [0, r_max={self.r_max}]")
        need(
            is_int(self.r_min) and 0 <= self.r_min <= self.r_init,
            "r_min",
            f"an int in [0, r_init={self.r_init}]"
            # r_min defaults to 1, so r_init=0 alone fails here: say which field to change
            + (" (r_min defaults to 1: with r_init=0 set r_min=0 as well)" if self.r_init == 0 else ""),
        )
        need(is_finite_number(self.alpha) and self.alpha > 0, "alpha", "a finite number > 0")
        need(scaling_fits_float32(self.alpha, self.r_init), "alpha",
             f"a number whose alpha / r_init fits in float32 (r_init={self.r_init}; the scaling is applied in float32)")
        need(is_finite_number(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", "a number in [0, 1)")
        need(is_finite_number(self.init_std) and self.init_std > 0, "init_std", "a finite number > 0")
        if isinstance(self.target_modules, str):
            need(len(self.target_modules) > 0, "target_modules", "a non-empty regex or list of names")
            try:
                re.compile(self.target_modules)
            except re.error as e:
                # wrap would only fail later, with a bare re.error naming no field
                need(False, "target_modules", f"a valid regex ({e})")
        else:
            need(_is_collection(self.target_modules), "target_modules", "a non-empty regex (str) or list of names")
            self.target_modules = tuple(self.target_modules)
            need(
                len(self.target_modules) > 0 and all(isinstance(t, str) and t for t in self.target_modules),
                "target_modules",
                "a non-empty regex or list of non-empty names",
            )
        if self.modules_to_save is None:
            self.modules_to_save = ()
        elif isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        need(_is_collection(self.modules_to_save), "modules_to_save", "a list of names or None")
        self.modules_to_save = tuple(self.modules_to_save)
        need(all(isinstance(t, str) and t for t in self.modules_to_save), "modules_to_save", "a list of non-empty names")

        need(is_int(self.total_steps) and self.total_steps >= 1, "total_steps", "an int >= 1")
        need(is_int(self.t_warmup) and self.t_warmup >= 0, "t_warmup", "an int >= 0")
        need(
            is_int(self.t_final) and 0 <= self.t_final < self.total_steps,
            "t_final",
            f"an int in [0, total_steps={self.total_steps}) (the final phase must leave steps before it)",
        )
        need(
            self.t_warmup < self.total_steps - self.t_final,
            "t_warmup",
            f"< total_steps - t_final = {self.total_steps} - {self.t_final} = {self.total_steps - self.t_final}"
            " (the adaptation window would be empty)",
        )
        need(is_int(self.delta_t) and self.delta_t >= 1, "delta_t", "an int >= 1")
        need(is_int(self.b0) and self.b0 >= 0, "b0", "an int >= 0")
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(self.importance in IMPORTANCE_METRICS, "importance", f"one of {IMPORTANCE_METRICS}")
        need(self.allocation_mode in ALLOCATION_MODES, "allocation_mode", f"one of {ALLOCATION_MODES}")
        need(self.expand_init in EXPAND_INITS, "expand_init", f"one of {EXPAND_INITS}")
        need(is_finite_number(self.orth_reg) and self.orth_reg >= 0, "orth_reg", "a finite number >= 0")
        for name in ("sensitivity_beta", "uncertainty_beta"):
            v = getattr(self, name)
            need(is_finite_number(v) and 0.0 <= v < 1.0, name, "a number in [0, 1)")
        need(is_finite_number(self.entropy_eps) and self.entropy_eps > 0, "entropy_eps", "a finite number > 0")
        need(is_int(self.seed), "seed", "an int")

    @property
    def scaling(self) -> float:
        """s = alpha / r_init (alpha when r_init is 0), fixed for life."""
        return float(self.alpha) / self.r_init if self.r_init > 0 else float(self.alpha)

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "FlexLoRAConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"FlexLoRAConfig.from_dict: unknown fields {unknown}; known: {sorted(names)}")
        return cls(**d)
