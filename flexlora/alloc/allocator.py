"""`RankAllocator`: FlexLoRA's entropy-guided prune + expand over all FlexLinear modules of a model.

Call ``allocator.step(global_step, optimizer)`` after every optimizer step. At the event steps of
the schedule (see :mod:`flexlora.alloc.schedule`) with b = b(t):

1. score every module at once (``importance.scores``, one batched op) and find, in the same
   batched pass, each module's smallest-|λ| active slot, first free slot and rank; these four
   [n] vectors come to the host in ONE transfer (and are broadcast from rank 0 under DDP, so
   every process makes the same decisions even if its floating-point scores differ in the
   last bit);
2. prune: the b lowest-scoring modules with rank > r_min each lose their smallest-|λ| slot;
3. expand: the b highest-scoring modules with rank < r_max, disjoint from the pruned ones, each
   gain their first free slot; in ``prune_expand`` mode b is clamped to the smaller eligible
   count on either side, so the total active rank never changes. Ties go by module order
   (stable sorts), so decisions are deterministic.

Why inactive slots are kept at exactly zero (P column, λ entry, Q row and their optimizer
moments): their gradient is exactly zero (λ⊙mask gates every gradient of the slot), and zero is
a fixed point of every usual optimizer update with zero gradient and zero moments — including
AdamW's decoupled weight decay p ← p·(1 − lr·wd), which would otherwise shrink stored values of
inactive slots at every step. So no per-step masking pass is needed: the allocator zeroes a slot
(and its moments) when it prunes it, zeroes the initially inactive slots once when it is built
and again (with their moments) the first time it sees an optimizer.

Parameters are only written in place (never reallocated), so ``data_ptr``s, optimizer state and
compiled graphs stay valid.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .._sharded import (any_sharded, check_placements, fill_slots_, fsdp_units, is_sharded, registered_shards,
                        reshard, set_slot_, whole_views)
from ..config import FlexLoRAConfig
from ..kernels.spectral_entropy import spectral_entropy_and_slots
from ..layers.flex_linear import FlexLinear
from ..layers.wrap import flex_modules, unwrap_model
from ._batch import full_precision, stack_lam_mask
from .history import make_rows, write_history_csv
from .importance import make_importance
from .orthogonal import add_orthogonal_grad_, orthogonal_loss
from .schedule import config_budget_at, config_is_event_step, config_peak_budget, event_steps_between

_STATE_FORMAT = "flexlora.RankAllocator/1"
# The allocator that last stepped each FlexLinear, and a process-wide count of step() calls:
# two live allocators stepping the same modules in turn would both prune and expand them.
_LAST_STEPPED_BY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STEP_CALLS = [0]


@dataclass
class AllocationEvent:
    """What one allocation event did.

    Attributes:
        step: the optimizer step of the event.
        budget: b(t) from the schedule (before clamping to the eligible counts).
        pruned: (module name, slot) of every deactivated slot, in increasing score order.
        expanded: (module name, slot) of every activated slot, in decreasing score order.
        total_rank: total active rank after the event.
    """

    step: int
    budget: int
    pruned: List[Tuple[str, int]] = field(default_factory=list)
    expanded: List[Tuple[str, int]] = field(default_factory=list)
    total_rank: int = 0


def plan_event(
    scores: Sequence[float],
    ranks: Sequence[int],
    r_max: Sequence[int],
    r_min: int,
    b: int,
    mode: str = "prune_expand",
) -> Tuple[List[int], List[int]]:
    """Which modules prune and which expand at one event (pure Python on host lists).

    Args:
        scores, ranks, r_max: per module (length n), in module order.
        r_min: a module with rank <= r_min is never pruned.
        b: requested number of modules on each side.
        mode: ``prune_expand`` (both sides, same count, disjoint), ``prune_only`` or ``expand_only``.

    Returns:
        (pruned module indices in increasing score order, expanded indices in decreasing score
        order); ties are broken by module index, lower first.
    """
    n = len(scores)
    if not (len(ranks) == len(r_max) == n):
        raise ValueError(f"plan_event: scores, ranks, r_max must have equal lengths, got {n}, {len(ranks)}, {len(r_max)}")
    if b <= 0 or n == 0:
        return [], []
    ascending = sorted(range(n), key=lambda i: (scores[i], i))
    descending = sorted(range(n), key=lambda i: (-scores[i], i))
    prune_ok = [i for i in ascending if ranks[i] > r_min]

    def expand_ok(excluded):
        return [i for i in descending if ranks[i] < r_max[i] and i not in excluded]

    if mode == "prune_only":
        return prune_ok[:b], []
    if mode == "expand_only":
        return [], expand_ok(())[:b]
    if mode != "prune_expand":
        raise ValueError(f"plan_event: mode must be prune_expand, prune_only or expand_only, got {mode!r}")
    # The largest k <= b such that the k lowest prunable modules and k expandable modules outside
    # them both exist. Taking more modules on the prune side leaves fewer to expand, so the
    # expandable count left over falls as k grows and the feasible k form a prefix: count up.
    expandable = [ranks[i] < r_max[i] for i in range(n)]
    left, k = sum(expandable), 0
    for i in prune_ok[: min(b, len(prune_ok))]:
        left -= expandable[i]
        if left < k + 1:
            break
        k += 1
    pruned = prune_ok[:k]
    expanded = expand_ok(set(pruned))[:k]
    return pruned, expanded


def event_seed(seed: int, step: int) -> int:
    """Seed of the Gaussian draws of the event at ``step``: a function of (seed, step) only, so
    every DDP rank, and a resumed run, draws the same new directions."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 0x5F3759DF) % (2**63 - 1)




def _warn_if_no_allocation(config: FlexLoRAConfig) -> bool:
    """Warn when the schedule moves no rank at all: such a run trains as fixed-rank LoRA, and
    FlexLoRA promises that never happens silently. (Every allocation_mode moves rank when b > 0,
    the ablations included, so none is exempt.)"""
    first, peak = config_peak_budget(config)
    if peak > 0:
        return False
    c = config
    fields = (
        f"total_steps={c.total_steps}, t_warmup={c.t_warmup}, t_final={c.t_final}, delta_t={c.delta_t}, "
        f"b0={c.b0}, schedule={c.schedule!r}"
    )
    if c.b0 == 0:
        why, fix = "b0=0 moves no module at any event", "set b0 >= 1"
    elif first is None:
        why = (
            f"no allocation event falls in the window: the first would be at step "
            f"{c.t_warmup if c.t_warmup >= 1 else c.delta_t}, after total_steps - t_final = "
            f"{c.total_steps - c.t_final}"
        )
        fix = "lower delta_t or t_final, or raise total_steps"
    else:  # only with t_warmup = 0: an event at t_warmup >= 1 has b = b0
        why = (
            f"b(t) rounds to 0 at every event step (the first is at step {first}; with t_warmup=0 "
            "the window's start, where b = b0, is not an event)"
        )
        fix = "lower delta_t, raise b0, or set t_warmup >= 1"
    warnings.warn(
        f"RankAllocator: no rank will ever be allocated with this config ({fields}): {why}. "
        f"This trains as fixed-rank LoRA; {fix}.",
        UserWarning,
        stacklevel=3,
    )
    return True


def _warn_if_ranks_cannot_move(ranks: Sequence[int], r_max: Sequence[int], config: FlexLoRAConfig) -> None:
    """Warn when the modules' ranks leave no move to make whatever the scores: nothing can be
    pruned (every rank <= r_min), nothing can expand (every rank = r_max), or in prune_expand
    mode the only module that could give is the only one that could take. Ranks change only at
    events, so such a run never moves rank."""
    mode, r_min = config.allocation_mode, config.r_min
    give = [i for i, r in enumerate(ranks) if r > r_min]
    take = [i for i, (r, top) in enumerate(zip(ranks, r_max)) if r < top]
    if mode == "prune_only":
        moves = bool(give)
    elif mode == "expand_only":
        moves = bool(take)
    else:
        moves = any(i != j for i in give for j in take[:2])
    if moves:
        return
    problems = []
    if mode != "expand_only" and not give:
        problems.append(f"no module can be pruned (every rank is <= r_min={r_min}; ranks {sorted(set(ranks))})")
    if mode != "prune_only" and not take:
        problems.append(f"no module can expand (every rank is at its r_max; r_init={config.r_init}, r_max={config.r_max})")
    if not problems:
        problems.append("the only module that could be pruned is the only one that could expand")
    warnings.warn(
        f"RankAllocator: no rank can ever move in allocation_mode={mode!r}: {'; '.join(problems)}. "
        "This trains as fixed-rank LoRA; leave room between r_min, r_init and r_max.",
        UserWarning,
        stacklevel=3,
    )


def _unwrap_optimizer(optimizer):
    """The torch optimizer inside wrappers (accelerate's AcceleratedOptimizer wraps one)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _state_holder(optimizer):
    """The optimizer whose ``state`` is keyed by the parameters: torch's ZeroRedundancyOptimizer
    keeps each rank's Adam state in its local ``.optim``, not in its own (empty) ``state``."""
    optimizer = _unwrap_optimizer(optimizer)
    local = getattr(optimizer, "optim", None)
    return local if isinstance(local, torch.optim.Optimizer) else optimizer


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class RankAllocator:
    """FlexLoRA's rank allocator over every :class:`~flexlora.FlexLinear` of ``model``.

    Args:
        model: a model wrapped by :func:`flexlora.wrap` (plain, or inside DDP / DataParallel /
            torch.compile).
        config: the allocation settings; ``None`` takes ``model.flexlora_config`` (set by wrap).

    Usage (see docs/allocation.md)::

        loss = task_loss + allocator.orthogonal_loss()
        loss.backward(); optimizer.step()
        allocator.step(global_step, optimizer)   # after EVERY optimizer step, global_step 1-based
        optimizer.zero_grad()

    If optimizer steps over the adapters pass ``t_warmup + 2·delta_t`` while :meth:`step` has
    never been called, a warning says so once (a global optimizer step post-hook counts those
    steps until the first :meth:`step` call, then removes itself). A config under which no event
    ever moves rank (no event step in the window, or b(t) = 0 at all of them) warns when the
    allocator is built.
    """

    def __init__(self, model: nn.Module, config: Optional[FlexLoRAConfig] = None) -> None:
        inner = unwrap_model(model)
        if config is None:
            config = getattr(inner, "flexlora_config", None)
            if config is None:
                raise ValueError(
                    "RankAllocator: config is None and the model has no flexlora_config; wrap the "
                    "model with flexlora.wrap(model, config) or pass config=FlexLoRAConfig(...)"
                )
        if not isinstance(config, FlexLoRAConfig):
            raise TypeError(f"RankAllocator: config must be a FlexLoRAConfig, got {type(config).__name__}")
        config.validate()  # fields may have been changed since construction (config.total_steps = ...)
        named = flex_modules(inner)
        if not named:
            raise ValueError("RankAllocator: the model has no FlexLinear modules (call flexlora.wrap first)")
        schedule_warned = _warn_if_no_allocation(config)
        self._config_seen: Optional[tuple] = None  # the config's fields when last validated
        self.config = config
        self.names: List[str] = [n for n, _ in named]
        self.modules: List[FlexLinear] = [m for _, m in named]
        self.r_max: List[int] = [m.r_max for m in self.modules]
        self.importance = make_importance(config)
        self._importance_made = _importance_settings(config)  # the config fields it was made from
        self._model = weakref.ref(inner)
        self._settle_fsdp()
        self._check_sharding()

        self.history: List[Dict[str, Any]] = []
        self.last_event: Optional[AllocationEvent] = None
        self.num_events = 0
        self._last_step = 0
        self._stepped = False
        self._importance_fresh = False
        self._optimizers: Tuple[Any, ...] = ()  # given to step(): their moments of touched slots are reset
        self._adopted: "weakref.WeakSet" = weakref.WeakSet()
        self._warned: Dict[str, bool] = {"never_stepped": False, "no_optimizer": False}
        # optimizer steps counted by a post-hook on every optimizer step() was given, against
        # step() calls that advanced since: catches a call per gradient-accumulation micro-step
        self._opt_steps = 0
        self._seen_opt_steps = 0
        self._calls_in_gap = 0
        self._crowded_gaps = 0
        self._counted: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> hook handle
        self._call_serial: Optional[int] = None  # _STEP_CALLS at this allocator's last step()

        self._zero_inactive_slots()
        self._fed_at_event = self.importance.fed
        scores, _, _, ranks = self._score_bank()
        self.history.extend(make_rows(0, self.names, ranks, scores))
        if not schedule_warned:
            _warn_if_ranks_cannot_move([int(r) for r in ranks], self.r_max, config)
        self._guard_handle = None
        self._guard_counts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._install_guard()

    # ------------------------------------------------------------------ public API
    @property
    def total_rank(self) -> int:
        """Total active rank over all modules (the global budget; constant in prune_expand mode),
        read from the masks (one host transfer): current also after weights were loaded into the
        model by load_adapter or load_state_dict without the allocator."""
        return int(sum(self.ranks().values()))

    def ranks(self) -> Dict[str, int]:
        """{module name: active rank} (one host transfer)."""
        r = torch.stack([m.mask.sum() for m in self.modules]).cpu().tolist()
        return dict(zip(self.names, (int(x) for x in r)))

    def orthogonal_loss(self) -> torch.Tensor:
        """γ·mean over modules of (‖PᵀP − I‖² + ‖QQᵀ − I‖²) over active slots, γ = config.orth_reg:
        a 0-d tensor to add to the task loss before ``backward()`` (a zero tensor when orth_reg is 0)."""
        if self.config.orth_reg > 0:
            self._settle_post_forward_copies()
        return orthogonal_loss(self.modules, float(self.config.orth_reg))

    def add_orthogonal_grad_(self) -> None:
        """Add the gradient of :meth:`orthogonal_loss` to P.grad and Q.grad in place (call after
        ``backward()``, before ``optimizer.step()``; gives the same gradients as the loss term)."""
        if self.config.orth_reg > 0:
            add_orthogonal_grad_(self.modules, float(self.config.orth_reg))

    def update_importance(self) -> None:
        """Feed this step's gradients to the importance metric (no-op for static metrics).

        :meth:`step` calls it itself unless it was already called since the last :meth:`step`;
        call it directly where gradients are gone by the time :meth:`step` runs (the HF Trainer
        zeroes them before ``on_step_end``; :class:`~flexlora.FlexLoRACallback` calls it at
        ``on_optimizer_step``).
        """
        self._check_sharding()
        self.importance.update(self.modules)
        self._importance_fresh = True

    def step(self, global_step: int, optimizer: Optional[torch.optim.Optimizer] = None) -> Optional[AllocationEvent]:
        """Call after every optimizer step.

        Args:
            global_step: optimizer steps done so far (1-based; gradient-accumulation micro-steps
                do not count).
            optimizer: the optimizer of the adapters, or a list of optimizers when P, λ and Q are
                split between several; the moments of every touched slot are reset in each.
                Remembered, so later calls may omit it.

        Returns:
            the :class:`AllocationEvent` when ``global_step`` is an event step (also when b(t) is
            0 there), else ``None``. A step number not larger than the last one seen is ignored:
            no importance update, no event (the optimizer is still remembered).
        """
        try:
            global_step = operator.index(global_step)
        except TypeError:
            raise TypeError(f"RankAllocator.step: global_step must be an int >= 0, got {global_step!r}") from None
        if global_step < 0:
            raise ValueError(f"RankAllocator.step: global_step must be an int >= 0, got {global_step}")
        if not self._stepped:
            self._stepped = True
            self._remove_guard()
        self._check_sole_stepper()
        self._settle_fsdp()
        self._check_sharding()
        if optimizer is not None:
            self._use_optimizers(optimizer)
        fresh, self._importance_fresh = self._importance_fresh, False
        # before the importance update: a repeated step must not feed the same gradients to a
        # stateful metric twice (sensitivity's EMAs would advance two steps for one)
        if global_step <= self._last_step:
            if global_step == 0 and not self._warned.get("step0"):
                self._warned["step0"] = True
                warnings.warn(
                    "RankAllocator.step(0) is ignored: global_step counts the optimizer steps done, so the "
                    "first call after optimizer.step() is step(1) (with enumerate(loader), use start=1); a "
                    "0-based count runs every event one step late and skips step 0's importance update",
                    UserWarning,
                    stacklevel=2,
                )
            elif 0 < global_step < self._last_step and not self._warned.get("back"):
                # not a repeated call: a count that restarted (a step counter per epoch, a second
                # trainer.train() with the same allocator) would switch allocation off silently
                self._warned["back"] = True
                warnings.warn(
                    f"RankAllocator.step({global_step}) after step({self._last_step}) is ignored, and so is every "
                    f"step up to {self._last_step}: no importance update and no event until the count passes it. "
                    "global_step must be the running optimizer-step count of the whole run (not restarted per "
                    "epoch); a new training run needs a new RankAllocator",
                    UserWarning,
                    stacklevel=2,
                )
            return None
        if self._revalidate_config():
            fresh = False  # a metric made just now was not fed by an earlier update_importance()
        if global_step > self._last_step + 1 and not self._warned.get("gap"):
            missed = event_steps_between(self._last_step, global_step, self.config, limit=4)
            if missed:
                self._warned["gap"] = True
                warnings.warn(
                    f"RankAllocator.step({global_step}) after step({self._last_step}): the event step(s) "
                    f"{missed[:3]}{' ...' if len(missed) > 3 else ''} in between were never passed to step(), so those "
                    "allocation events did not happen. Call step() after every optimizer step with the running "
                    "optimizer-step count; when resuming, restore the allocator's state first "
                    "(flexlora.load_checkpoint, or FlexLoRACallback with the Trainer)",
                    UserWarning,
                    stacklevel=2,
                )
        if not fresh:
            self.importance.update(self.modules)
        self._last_step = global_step
        self._check_pace()
        if not config_is_event_step(global_step, self.config):
            return None
        return self._event(global_step, config_budget_at(global_step, self.config))

    def history_csv(self, path) -> str:
        """Write :attr:`history` as CSV (``step,module,rank,score``); returns the path."""
        return write_history_csv(self.history, path)

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed for an exact resume (with the model's own state, which holds the
        masks): last step, history, event count, importance state, warning flags. The new
        directions' RNG is a function of (config.seed, step), so it needs no saved state."""
        return {
            "format": _STATE_FORMAT,
            "modules": list(self.names),
            "seed": int(self.config.seed),
            "last_step": int(self._last_step),
            "num_events": int(self.num_events),
            "stepped": bool(self._stepped),
            "warned": dict(self._warned),
            "total_rank": self.total_rank,
            "history": [dict(r) for r in self.history],
            "importance": self.importance.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the module names must match this model's)."""
        self._check_state(state)
        self._restore(state)

    def _check_state(self, state: Dict[str, Any]) -> None:
        """Raise ValueError if ``state`` cannot be loaded here; changes nothing (load_adapter runs
        it before touching the model)."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"RankAllocator.load_state_dict: expected a dict with format={_STATE_FORMAT!r}, got "
                f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}"
            )
        missing = [k for k in ("modules", "seed", "last_step", "num_events", "stepped", "warned", "history", "importance")
                   if k not in state]
        if missing:
            raise ValueError(f"RankAllocator.load_state_dict: the state lacks {missing}")
        saved = list(state["modules"])
        if saved != self.names:
            diff = [(a, b) for a, b in zip(saved, self.names) if a != b][:1]
            raise ValueError(
                "RankAllocator.load_state_dict: the state was saved for other modules "
                f"({len(saved)} saved, {len(self.names)} here; first difference (saved, here): {diff})"
            )
        if int(state["seed"]) != int(self.config.seed):
            raise ValueError(
                f"RankAllocator.load_state_dict: saved with config.seed={state['seed']}, but this "
                f"allocator has config.seed={self.config.seed}; new directions would differ"
            )
        try:
            self.importance.check_state(state["importance"], self.modules)
        except ValueError as e:
            raise ValueError(
                f"RankAllocator.load_state_dict: config.importance={self.config.importance!r} cannot take the "
                f"saved importance state ({e})"
            ) from None

    def _restore(self, state: Dict[str, Any]) -> None:
        self.importance.load_state_dict(state["importance"], self.modules)  # first: the one part that can still refuse
        self._fed_at_event = self.importance.fed
        self._last_step = int(state["last_step"])
        self.num_events = int(state["num_events"])
        self._stepped = bool(state["stepped"])
        self._warned = dict(state["warned"])
        self.history = [dict(r) for r in state["history"]]
        # The masks came with the model's state (the budget, total_rank, is read from them):
        # restore the zero-inactive-slot invariant for them (moments: the next step() re-adopts
        # the optimizer).
        self._zero_inactive_slots()
        self._adopted = weakref.WeakSet()
        if self._stepped or self._warned.get("never_stepped"):
            self._remove_guard()

    # ------------------------------------------------------------------ events
    def _score_bank(self, views=None):
        """(scores, min_slot, free_slot, ranks) as host lists, from one device->host transfer.
        views: :func:`whole_views` of the modules (gathered once per event by the caller)."""
        views = whole_views(self.modules) if views is None else views
        lam, mask = stack_lam_mask(views)
        with full_precision(lam.device):  # a step() called inside autocast scores as outside
            _, min_slot, free_slot, rank = spectral_entropy_and_slots(lam, mask, float(self.config.entropy_eps))
            scores = self.importance.scores(views)
        packed = torch.stack(
            [scores.to(torch.float64), min_slot.to(torch.float64), free_slot.to(torch.float64), rank.to(torch.float64)]
        )
        if _world_size() > 1:
            # Decisions must be identical on every rank: rank 0's view wins.
            torch.distributed.broadcast(packed, src=0)
        s, mn, fr, rk = packed.cpu().tolist()
        if any(v != v for v in s):  # NaN
            bad = [self.names[i] for i, v in enumerate(s) if v != v]
            raise FloatingPointError(
                f"RankAllocator: importance '{self.config.importance}' gave NaN scores for {bad[:5]} "
                "(training diverged: their λ/P/Q hold NaN or inf)"
            )
        return s, [int(x) for x in mn], [int(x) for x in fr], [int(x) for x in rk]

    def _event(self, step: int, budget: int) -> AllocationEvent:
        self._warn_if_importance_starved()
        views = whole_views(self.modules)  # FSDP2 shards gathered whole where they are read
        scores, min_slot, free_slot, ranks = self._score_bank(views)
        pruned, expanded = plan_event(
            scores, ranks, self.r_max, self.config.r_min, budget, self.config.allocation_mode
        )
        if (pruned or expanded) and not self._optimizers and not self._warned["no_optimizer"]:
            self._warned["no_optimizer"] = True
            warnings.warn(
                "RankAllocator.step: no optimizer was given, so the optimizer moments of pruned and "
                "expanded slots are not reset; pass it: allocator.step(global_step, optimizer)",
                stacklevel=3,
            )
        opts = [_state_holder(o) for o in self._optimizers]
        if pruned or expanded:
            self._warn_if_adapters_outside(opts)
        with torch.no_grad():
            for i in pruned:
                self._prune_slot(self.modules[i], min_slot[i], opts)
                self.importance.reset_slot(i, min_slot[i])
                ranks[i] -= 1
            gen = torch.Generator(device="cpu")
            gen.manual_seed(event_seed(self.config.seed, step))
            # Draw in module order (not score order): the draws of a module do not depend on
            # how the scores ranked it against the others.
            for i in sorted(expanded):
                self._expand_slot(self.modules[i], free_slot[i], opts, gen, views[i])
                self.importance.reset_slot(i, free_slot[i])
                ranks[i] += 1
        self.num_events += 1
        self.history.extend(make_rows(step, self.names, ranks, scores))
        event = AllocationEvent(
            step=step,
            budget=budget,
            pruned=[(self.names[i], min_slot[i]) for i in pruned],
            expanded=[(self.names[i], free_slot[i]) for i in expanded],
            total_rank=int(sum(ranks)),
        )
        self.last_event = event
        return event

    def _prune_slot(self, m: FlexLinear, j: int, opts) -> None:
        m.mask[j] = False
        for t, dim in _slot_dims(m):
            set_slot_(t, dim, j, 0)
        _zero_slot_moments(opts, m, j)

    def _expand_slot(self, m: FlexLinear, j: int, opts, gen: torch.Generator, view=None) -> None:
        """Open slot j of m. view: m, or its whole-tensor view when m is sharded (read by the
        orthogonal init); every rank draws the same vectors and writes the part it holds."""
        view = m if view is None else view
        init = self.config.expand_init
        std = float(self.config.init_std)
        p = torch.randn(m.out_features, generator=gen, dtype=torch.float32)
        q = torch.randn(m.in_features, generator=gen, dtype=torch.float32)
        lam = 0.0
        if init == "zero":
            p.zero_()
            q.zero_()
        elif init == "orthogonal":
            active = m.mask.nonzero().flatten()
            p = _orthonormal_to(p, view.P.detach()[:, active])
            q = _orthonormal_to(q, view.Q.detach()[active, :].t())
        else:
            p.mul_(std)
            q.mul_(std)
            if init == "small":
                lam = std
        set_slot_(m.P, 1, j, p)
        set_slot_(m.Q, 0, j, q)
        set_slot_(m.lam, 0, j, lam)
        m.mask[j] = True
        _zero_slot_moments(opts, m, j)

    def _zero_inactive_slots(self) -> None:
        with torch.no_grad():
            for m in self.modules:
                off = ~m.mask
                for t, dim in _slot_dims(m):
                    fill_slots_(t, dim, off, 0)

    def _use_optimizers(self, optimizer) -> None:
        """Remember the optimizer (or list / tuple of optimizers) given to step() and adopt each
        one seen for the first time."""
        opts = tuple(optimizer) if isinstance(optimizer, (list, tuple)) else (optimizer,)
        if not opts or any(o is None for o in opts):
            raise ValueError(
                "RankAllocator.step: optimizer must be an optimizer or a non-empty list of optimizers, got "
                f"{optimizer!r}"
            )
        for o in opts:
            self._adopt_optimizer(o)
        self._optimizers = opts

    def _adopt_optimizer(self, optimizer) -> None:
        inner = _unwrap_optimizer(optimizer)
        try:
            if inner in self._adopted:
                return
            self._adopted.add(inner)
        except TypeError:  # not weak-referenceable: adopt every time (cheap, idempotent)
            pass
        self._warn_if_not_training(inner)
        self._count_steps_of(inner)
        holder = _state_holder(inner)
        # First sight of this optimizer: inactive slots and their moments to exactly zero, so
        # neither weight decay nor leftover moments can move them (see the module docstring).
        with torch.no_grad():
            self._zero_inactive_slots()
            for m in self.modules:
                off = ~m.mask
                for p, dim in _slot_dims(m):
                    for t, v in _moment_tensors(holder, p):
                        fill_slots_(t, dim, off, v)
        self._warn_if_state_not_per_element(holder)

    def _warn_if_adapters_outside(self, holders) -> None:
        """Warn once when trainable adapter tensors sit in none of the optimizers given to step()
        (P and Q in a second optimizer that was not passed): their moments of the touched slots
        are not reset, so a pruned direction's moments keep moving its zeroed slot and a reopened
        slot inherits them. Judged only when the optimizers hold some of the model's own adapter
        tensors (DeepSpeed's hold flattened copies)."""
        if self._warned.get("outside") or not holders:
            return
        held = set()
        for h in holders:
            ids = _held_ids(h)
            if ids is None:
                return
            held |= ids
        named = [(f"{n}.{attr}", getattr(m, attr)) for n, m in zip(self.names, self.modules) for attr in ("P", "lam", "Q")]
        if not any(id(p) in held for _, p in named):
            return
        outside = [n for n, p in named if p.requires_grad and id(p) not in held]
        if outside:
            self._warned["outside"] = True
            warnings.warn(
                f"RankAllocator.step: {len(outside)} trainable adapter tensors ({', '.join(outside[:3])}"
                f"{' ...' if len(outside) > 3 else ''}) are in none of the optimizers given to step(), so their "
                "moments of pruned and expanded slots are not reset; pass every optimizer that holds adapters: "
                "allocator.step(global_step, [optimizer1, optimizer2])",
                UserWarning,
                stacklevel=4,
            )

    def _warn_if_state_not_per_element(self, optimizer) -> None:
        """Warn when the optimizer keeps adapter state that is not per element (Adafactor's
        factored row/column statistics, flattened ZeRO shards): pruning and expanding reset the
        touched slots' moments only in tensors shaped like the parameter, so such state would
        carry a pruned direction's statistics into the one that reuses its slot."""
        odd = sorted({
            f"{key} {tuple(t.shape)}"
            for m in self.modules for p in (m.P, m.lam, m.Q)
            for key, t in (getattr(optimizer, "state", {}).get(p) or {}).items()
            if torch.is_tensor(t) and t.dim() > 0 and t.shape != p.shape
        })
        if odd:
            warnings.warn(
                f"RankAllocator: the optimizer ({type(optimizer).__name__}) keeps adapter state that is not "
                f"per element ({', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''}); the moments of pruned and "
                "expanded slots are reset only in per-element state (Adam-style exp_avg / exp_avg_sq, momentum), "
                "so factored state (Adafactor's row/column statistics) is left as it is",
                UserWarning,
                stacklevel=4,
            )

    def _count_steps_of(self, optimizer) -> None:
        """Count ``optimizer``'s steps with a step post-hook (one per optimizer, however often it
        is adopted again). Only a real torch optimizer that runs its hooks is counted: accelerate's
        wrapper of a DeepSpeed optimizer has the method but steps inside the engine."""
        if not isinstance(optimizer, torch.optim.Optimizer) or not hasattr(optimizer, "_optimizer_step_post_hooks"):
            return
        try:
            if optimizer in self._counted:
                return
        except TypeError:
            return
        ref = weakref.ref(self)

        def count(opt, args, kwargs):
            allocator = ref()
            if allocator is not None:
                allocator._opt_steps += 1

        try:
            self._counted[optimizer] = optimizer.register_step_post_hook(count)
        except (AttributeError, RuntimeError, TypeError):
            pass

    def _check_sole_stepper(self) -> None:
        """Warn once when another live allocator stepped the same modules since this one last
        did: both would prune and expand them (two allocators kept by mistake, e.g. one in a
        Trainer callback and one called by hand). A replaced allocator that no longer steps
        never warns."""
        _STEP_CALLS[0] += 1
        first = self.modules[0]
        ref = _LAST_STEPPED_BY.get(first)
        other = ref() if ref is not None else None
        if (other is not None and other is not self and self._call_serial is not None
                and (other._call_serial or 0) > self._call_serial and not self._warned.get("shared")):
            self._warned["shared"] = True
            warnings.warn(
                "RankAllocator.step: another RankAllocator also steps these modules (it stepped since this one "
                "last did): both prune and expand them, so ranks move twice as often and the budget is not one "
                "allocator's; keep a single allocator per model",
                UserWarning,
                stacklevel=3,
            )
        self._call_serial = _STEP_CALLS[0]
        _LAST_STEPPED_BY[first] = weakref.ref(self)

    def _settle_fsdp(self) -> None:
        """Under FSDP2, every unit back to its sharded state before the allocator reads or writes
        slots: after an evaluation forward (or with reshard_after_forward=False) a unit keeps
        whole working copies of P, λ, Q registered, which it discards at its next reshard, so
        slot writes into them (and the optimizer, which holds the shards) would be lost."""
        model = self._model()
        if model is not None:
            reshard(fsdp_units(model))

    def _settle_post_forward_copies(self) -> None:
        """orthogonal_loss differentiates through the P and Q the modules hold between forward
        and backward: FSDP's whole working copies pass their gradient on to the shards, but the
        smaller-mesh copies of reshard_after_forward=<int> do not (the penalty's gradient was
        lost). Where a module holds such a copy, the units go back to their shards first, as
        reshard_after_forward=True would have left them (backward gathers them again)."""
        model = self._model()
        units = fsdp_units(model) if model is not None else []
        if not units:
            return
        shards = registered_shards(units)
        if shards is None:  # FSDP's internals laid out otherwise: reshard anyway (one more gather)
            reshard(units)
            return
        for m in self.modules:
            for key in ("P", "Q"):
                t, real = getattr(m, key), shards.get((id(m), key))
                if real is not None and is_sharded(t) and t is not real:
                    reshard(units)
                    return

    def _check_sharding(self) -> None:
        """Adapters sharded by FSDP2 are handled (whole tensors gathered where they are read, slot
        writes applied to each rank's part); refuse what is not: tensor-parallel placements, and
        a gradient-fed importance metric (its per-element statistics would need every step's
        gradients gathered whole)."""
        if not any_sharded(self.modules):
            return
        check_placements(list(zip(self.names, self.modules)), "RankAllocator")
        if self.importance.needs_gradients:
            raise NotImplementedError(
                f"RankAllocator: importance={self.config.importance!r} reads every step's gradients, which FSDP2 "
                f"keeps sharded (the adapter of {self.names[0]!r} is a DTensor); use importance='entropy' (the "
                "default) or another metric of P, lam, Q, or train with DistributedDataParallel"
            )

    def _revalidate_config(self) -> bool:
        """Validate the config again when a field changed since the last check (a field set
        mid-run is then named, not a schedule internal); comparing the fields costs ~0.5 µs,
        validating ~30 µs. Returns whether the importance metric was made anew."""
        seen = tuple(vars(self.config).values())
        if seen != self._config_seen:
            self.config.validate()
            self._config_seen = tuple(vars(self.config).values())
            if _importance_settings(self.config) != self._importance_made:
                return self._remake_importance()
        return False

    def _remake_importance(self) -> bool:
        """Make the metric the config names now (a field changed mid-run takes effect, as the
        schedule's do). Sensitivity with new betas keeps its averages; any other change starts
        the new metric from scratch (a gradient-fed one from its next update)."""
        made, now = self._importance_made, _importance_settings(self.config)
        self._importance_made = now
        if made[0] == now[0] == "sensitivity":
            self.importance.beta1, self.importance.beta2 = float(now[2]), float(now[3])
            return False
        self.importance = make_importance(self.config)
        self._fed_at_event = self.importance.fed
        self._check_sharding()
        return True

    def _warn_if_importance_starved(self) -> None:
        """Warn once when a gradient-fed metric (sensitivity) got no gradients since the last event:
        every update found the gradients None (``optimizer.zero_grad()`` before ``step()``), so it
        scores every module 0 and the event moves rank by module order alone."""
        fed = self.importance.fed
        starved = self.importance.needs_gradients and fed == self._fed_at_event
        self._fed_at_event = fed
        if starved and not self._warned.get("no_grads"):
            self._warned["no_grads"] = True
            warnings.warn(
                f"RankAllocator: importance {self.config.importance!r} received no gradients since "
                f"{'the last event' if self.num_events else 'the allocator was built'} (P, λ and Q had .grad None at "
                "every update), so it scores every module 0 and this event moves rank by module order alone. Call "
                "allocator.step() before optimizer.zero_grad(), or allocator.update_importance() while the "
                "gradients exist (FlexLoRACallback does)",
                UserWarning,
                stacklevel=4,
            )

    def _check_pace(self) -> None:
        """Warn once when step() is called several times between optimizer steps, gap after gap
        (a call per gradient-accumulation micro-step): the schedule then runs k times too fast and
        its window ends early. Eight crowded gaps in a row are needed, so a burst of steps a
        GradScaler skipped (one long gap, at the start of fp16 training) never warns."""
        if not len(self._counted) or self._warned.get("pace"):
            return
        if self._opt_steps != self._seen_opt_steps:  # a gap between optimizer steps closed
            self._crowded_gaps = self._crowded_gaps + 1 if self._calls_in_gap >= 2 else 0
            self._calls_in_gap, self._seen_opt_steps = 0, self._opt_steps
        self._calls_in_gap += 1
        if self._crowded_gaps >= 8:
            self._warned["pace"] = True
            warnings.warn(
                "RankAllocator.step advanced several times between optimizer steps, again and again: call it "
                "once per optimizer step with the optimizer step count (not per gradient-accumulation "
                "micro-step), or the schedule runs too fast and its window ends early",
                UserWarning,
                stacklevel=3,
            )

    def _warn_if_not_training(self, optimizer) -> None:
        """Warn (once per optimizer) when it would leave the adapters untouched: it holds none of
        their parameters (built before flexlora.wrap replaced the Linears), or none of them
        requires grad (frozen by another library wrapping the model afterwards). Either way the
        run would train no adapter while the allocator still moved ranks on scores of nothing."""
        adapters = [p for m in self.modules for p in (m.P, m.lam, m.Q)]
        held = _held_ids(optimizer) or set()
        # only an optimizer over this model's own tensors can be judged: DeepSpeed's holds
        # flattened copies, which are none of the model's parameters
        model = self._model()
        own = {id(p) for p in model.parameters()} if model is not None else set()
        if held & own and not any(id(p) in held for p in adapters):
            warnings.warn(
                f"RankAllocator.step: the optimizer ({type(optimizer).__name__}) holds none of the adapters' "
                "P, lam, Q parameters, so they never train; build the optimizer after flexlora.wrap, from "
                "[p for p in model.parameters() if p.requires_grad]",
                UserWarning,
                stacklevel=4,
            )
        elif not any(p.requires_grad for p in adapters):
            warnings.warn(
                "RankAllocator.step: none of the adapters' P, lam, Q parameters requires grad, so they never "
                "train (did another library, e.g. peft.get_peft_model, freeze them after flexlora.wrap?)",
                UserWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------------ never-stepped guard
    def _install_guard(self) -> None:
        ref = weakref.ref(self)
        limit = self.config.t_warmup + 2 * self.config.delta_t

        def hook(optimizer, args, kwargs):
            allocator = ref()
            if allocator is None or allocator._stepped:
                return
            counts = allocator._guard_counts
            try:
                entry = counts.get(optimizer)
            except TypeError:
                return
            if entry is None:
                # the adapters' parameters as registered now: FSDP2's fully_shard replaces them
                # by DTensor parameters after the allocator may have been built
                adapter_ids = {id(p) for m in allocator.modules for p in (m.P, m.lam, m.Q)}
                holds = any(id(p) in adapter_ids for g in optimizer.param_groups for p in g["params"])
                entry = counts[optimizer] = [holds, 0]
            if not entry[0]:
                return
            entry[1] += 1
            # max over optimizers: a wrapper (accelerate) and the wrapped optimizer both fire.
            if entry[1] > limit and not allocator._warned["never_stepped"]:
                allocator._warned["never_stepped"] = True
                allocator._remove_guard()
                warnings.warn(
                    f"flexlora: {entry[1]} optimizer steps over FlexLoRA adapters have run (past "
                    f"t_warmup + 2*delta_t = {limit}) but RankAllocator.step() was never called: ranks "
                    "are NOT being adapted (this trains as fixed-rank LoRA). Call "
                    "allocator.step(global_step, optimizer) after every optimizer step, or add "
                    "flexlora.FlexLoRACallback(allocator) to the HF Trainer's callbacks.",
                    RuntimeWarning,
                    stacklevel=2,
                )

        self._guard_handle = register_optimizer_step_post_hook(hook)

    def _remove_guard(self) -> None:
        if self._guard_handle is not None:
            self._guard_handle.remove()
            self._guard_handle = None

    def __del__(self):
        try:
            self._remove_guard()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (
            f"RankAllocator(modules={len(self.modules)}, total_rank={self.total_rank}, "
            f"importance={self.config.importance!r}, schedule={self.config.schedule!r}, "
            f"events={self.num_events}, last_step={self._last_step})"
        )


# Per-element optimizer state that does not start at zero: (optimizer class, state key) -> the
# start value, from (optimizer, the parameter's group). A reset slot gets what a fresh optimizer
# would give it: an Adagrad sum of 0 (not initial_accumulator_value) makes its first update
# ~lr·sign(g), and a Rprop step size of 0 is clamped to step_size_min, so the slot would barely
# learn for ~50 steps. torch's Adagrad starts every sum at the constructor's value, also in a
# group given its own initial_accumulator_value.
_START_VALUES = (
    (torch.optim.Adagrad, "sum", lambda opt, group: opt.defaults.get("initial_accumulator_value", 0.0)),
    (torch.optim.Rprop, "step_size", lambda opt, group: group["lr"]),
)


def _moment_tensors(opt, p: torch.Tensor) -> List[Tuple[torch.Tensor, Any]]:
    """The optimizer's per-element state tensors of ``p`` (exp_avg, exp_avg_sq, max_exp_avg_sq,
    momentum_buffer, Adagrad's sum, ...: every state tensor shaped like p), each with the value
    a fresh optimizer starts it at (0 but for :data:`_START_VALUES`). Scalars such as ``step``
    are left."""
    if opt is None:
        return []
    state = opt.state.get(p)
    if not state:
        return []
    starts = {key: start for cls, key, start in _START_VALUES if isinstance(opt, cls)}
    group = None
    if starts:
        group = next((g for g in opt.param_groups if any(q is p for q in g["params"])), None)
    out = []
    for key, t in state.items():
        if torch.is_tensor(t) and t.shape == p.shape:
            start = starts[key](opt, group) if key in starts and group is not None else 0
            out.append((t, float(start) if torch.is_tensor(start) else start))
    return out


def _held_ids(optimizer) -> Optional[set]:
    """ids of the parameters in ``optimizer``'s groups; None where it has no readable groups."""
    try:
        return {id(p) for group in optimizer.param_groups for p in group["params"]}
    except (AttributeError, KeyError, TypeError):
        return None


def _importance_settings(config: FlexLoRAConfig) -> tuple:
    """The config fields an importance metric is made from (:func:`make_importance`)."""
    return (config.importance, config.entropy_eps, config.sensitivity_beta, config.uncertainty_beta)


def _slot_dims(m: FlexLinear) -> Tuple[Tuple[torch.Tensor, int], ...]:
    """(tensor, the dimension that indexes slots) of m's P [out, R], λ [R] and Q [R, in]."""
    return ((m.P, 1), (m.lam, 0), (m.Q, 0))


def _zero_slot_moments(opts, m: FlexLinear, j: int) -> None:
    """Reset slot j's state (P column, λ entry, Q row) in each optimizer of ``opts`` to a fresh
    optimizer's."""
    for opt in opts:
        for p, dim in _slot_dims(m):
            for t, v in _moment_tensors(opt, p):
                set_slot_(t, dim, j, v)


def _orthonormal_to(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """v [d] made orthogonal to the columns of basis [d, r] (two Gram-Schmidt passes in float64
    on the CPU, identical on every rank) and scaled to unit norm. When the columns already span
    the space (r >= d) the plain normalised draw is returned."""
    v = v.to(torch.float64)
    B = basis.detach().to(device="cpu", dtype=torch.float64)
    if B.shape[1] > 0 and B.shape[1] < B.shape[0]:
        Qb, _ = torch.linalg.qr(B)
        for _ in range(2):
            v = v - Qb @ (Qb.t() @ v)
    norm = v.norm()
    if not norm > 1e-8:
        v = v + 1.0  # degenerate draw (d = 1 with r = 1, ...): any unit vector will do
        norm = v.norm()
    return (v / norm).to(torch.float32)
