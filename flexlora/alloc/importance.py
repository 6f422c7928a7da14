"""Module importance metrics for the rank allocator: one score per FlexLinear, higher = more
important (its rank grows), batched over modules, float32, never NaN for finite parameters
(NaN parameters give NaN, so that the allocator can report them).

Every metric works on ΔW = s·P·diag(g)·Q with g = λ⊙mask, over the r active slots of the module
(mask = True); "n" below is that number r, and a metric divided by n is 0 when n = 0.

==========================  =================================================================
``entropy`` (default)       −Σ sⱼ log(sⱼ+ε) / log r, sⱼ = λⱼ²/Σλₖ² — λ taken as ΔW's singular
                            values (exact when P, Q are orthonormal); 0 when r < 2 or λ = 0.
``nuclear``                 ‖ΔW‖_* / n = s·Σ|λⱼ| / n  (λ as singular values).
``frobenius``               ‖ΔW‖_F / n = s·sqrt(Σλⱼ²) / n  (λ as singular values).
``sensitivity``             AdaLoRA: per element w of P, λ, Q, Ī = EMA_β₁(|w·∂L/∂w|),
                            Ū = EMA_β₂(|I − Ī|); slot score = Īλ·Ūλ + mean over the P column
                            + mean over the Q row; module score = mean over active slots.
``energy_entropy_element``  normalized entropy of the per-slot energies
                            eⱼ = (s·λⱼ·‖P[:, j]‖·‖Q[j, :]‖)² (each rank-one term on its own,
                            no cross terms).
``energy_entropy_matrix``   normalized entropy of the true σ(ΔW)², from r×r Gram matrices, fp32.
``exact_entropy``           the same quantity as energy_entropy_matrix, in float64 end to end
                            (for when orthogonality is soft and small σ matter).
==========================  =================================================================

True singular values from Grams: with Gp = PᵀP and Gq = QQᵀ (both [R, R]) and G = diag(s·g),
the non-zero eigenvalues of ΔWᵀΔW = QᵀGGpGQ equal those of Gp^{1/2}·G·Gq·G·Gp^{1/2} (cyclic
invariance of the spectrum); that matrix is symmetric PSD and r×r, so one batched ``eigh`` over
all modules of a shape gives every σ². Inactive slots have g = 0 and drop out. P, Q and λ are
divided by their largest |entry| per module first (the entropy does not see the scale), so huge
or tiny finite adapters neither overflow nor underflow the fp32 Grams.

Non-finite input: a module with a NaN or ±inf in an active slot's λ (or, for the metrics that
read them, P and Q) scores NaN, at any rank, so that the allocator reports it. ``sensitivity``
skips an update whose gradients hold a NaN or inf (an fp16 overflow, for which GradScaler skips
``optimizer.step()`` too) instead of folding it into its EMAs.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..kernels.spectral_entropy import spectral_entropy
from ._batch import shape_groups, stack_lam_mask

_F32_MAX = torch.finfo(torch.float32).max


def _finite(x: torch.Tensor) -> torch.Tensor:
    """float32, with +inf clamped to fp32's max, NaN kept. Only for scores of finite inputs whose
    value overflows fp32: callers first turn rows with non-finite inputs into NaN, or a diverged
    module (inf λ) would get the largest score and be expanded instead of reported."""
    return x.double().clamp(max=_F32_MAX).float()


def _nan_where(bad: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """scores with NaN in the rows where ``bad`` [n] is True (a module with a non-finite active
    λ, P or Q), so that the allocator reports it instead of acting on a made-up score."""
    return torch.where(bad, float("nan"), scores)


def _max_normalized(t: torch.Tensor, dims) -> torch.Tensor:
    """t divided, per leading index, by its largest |entry| over ``dims`` (left alone where that
    is 0 or not finite). Entropies of σ² are scale-invariant, and without this the fp32 Grams
    of a huge but finite adapter (λ ~ 1e30) overflow to inf and eigh fails, or those of a tiny
    one (λ ~ 1e-30) underflow to 0 and it scores 0."""
    amax = t.abs().amax(dim=dims, keepdim=True)
    return t / torch.where(amax.isfinite() & (amax > 0), amax, 1.0)


def _scalings(modules: Sequence, device) -> torch.Tensor:
    return torch.tensor([float(m.scaling) for m in modules], dtype=torch.float64, device=device)


def normalized_entropy(energy: torch.Tensor, count: torch.Tensor, eps: float) -> torch.Tensor:
    """−Σ pⱼ log(pⱼ+ε)/log(count), pⱼ = energyⱼ/Σ energy, per row of energy [n, k] (≥ 0, zeros
    for absent entries) with count [n] the number of entries that count; 0 when count < 2 or
    the energy is all 0; NaN when a row holds a NaN or inf (also at count < 2, so a diverged
    module is reported, not scored 0). Computed in energy's dtype."""
    emax = energy.amax(dim=1, keepdim=True)
    x = energy / torch.where(emax > 0, emax, 1.0)
    total = x.sum(dim=1, keepdim=True)
    p = x / torch.where(total > 0, total, 1.0)
    H = (-p * torch.log(p + eps)).sum(dim=1)
    ok = (count >= 2) & (emax[:, 0] > 0)
    ent = torch.where(ok, H / torch.log(count.clamp_min(2).to(energy.dtype)), 0.0)
    return torch.where(energy.isfinite().all(dim=1), ent, float("nan"))


class Importance:
    """Base: a static metric of the current parameters. ``update`` is a no-op, no state."""

    name = "base"
    needs_gradients = False  # whether update() must see the adapters' gradients

    @property
    def fed(self) -> int:
        """Updates that found gradients so far (the allocator warns when none came between two
        events of a metric that needs them)."""
        return 0

    def update(self, modules: Sequence) -> None:
        """Called once per optimizer step while gradients are present (stateful metrics only)."""

    def scores(self, modules: Sequence) -> torch.Tensor:
        """[n] float32 scores of ``modules`` (FlexLinear, flex_modules order)."""
        raise NotImplementedError

    def reset_slot(self, index: int, slot: int) -> None:
        """Forget what the metric holds of slot ``slot`` of module ``index`` (it was just pruned
        or opened: a new direction must not inherit the old one's statistics). No-op here."""

    def state_dict(self) -> dict:
        return {"name": self.name}

    def check_state(self, sd: dict, modules: Optional[Sequence] = None) -> None:
        """Raise ValueError if ``sd`` cannot be loaded into this metric (for ``modules``, the
        FlexLinear list it will score, where given); changes nothing (loads check every part
        before they change any)."""
        if not isinstance(sd, dict):
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected a dict, got {type(sd).__name__}")
        if sd.get("name", self.name) != self.name:
            raise ValueError(f"{type(self).__name__}.load_state_dict: state is for metric {sd.get('name')!r}, expected {self.name!r}")

    def load_state_dict(self, sd: dict, modules: Optional[Sequence] = None) -> None:
        self.check_state(sd, modules)


class EntropyImportance(Importance):
    """Normalized spectral entropy of λ² over active slots (one batched launch)."""

    name = "entropy"

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = float(eps)

    def scores(self, modules):
        lam, mask = stack_lam_mask(modules)
        return spectral_entropy(lam, mask, self.eps)


class NormImportance(Importance):
    """‖ΔW‖_* / n ("nuclear") or ‖ΔW‖_F / n ("frobenius"), λ taken as singular values, n = rank."""

    def __init__(self, kind: str) -> None:
        if kind not in ("nuclear", "frobenius"):
            raise ValueError(f"NormImportance: kind must be 'nuclear' or 'frobenius', got {kind!r}")
        self.name = kind

    @torch.no_grad()
    def scores(self, modules):
        lam, mask = stack_lam_mask(modules)
        # float64: λ² of an fp32 λ near its max does not overflow
        a = torch.where(mask, lam.double().abs(), 0.0) * _scalings(modules, lam.device)[:, None]
        n = mask.sum(dim=1)
        norm = a.sum(dim=1) if self.name == "nuclear" else a.square().sum(dim=1).sqrt()
        bad = (mask & ~lam.isfinite()).any(dim=1)
        return _nan_where(bad, _finite(torch.where(n > 0, norm / n.clamp_min(1), 0.0)))


def _stack_group(modules, idx, dtype):
    """(P [b, out, R], Q [b, R, in], g [b, R], mask [b, R]) of one shape group in ``dtype``, with
    P, Q and λ each divided by its largest |entry| per module (λ: over the active slots), so
    that no product below overflows or underflows. That scales ΔW by one constant per module:
    the entropies (all that uses this) are unchanged. Non-finite entries stay non-finite."""
    P = _max_normalized(torch.stack([modules[i].P.detach() for i in idx]).to(dtype), (1, 2))
    Q = _max_normalized(torch.stack([modules[i].Q.detach() for i in idx]).to(dtype), (1, 2))
    mask = torch.stack([modules[i].mask for i in idx])
    lam = torch.stack([modules[i].lam.detach() for i in idx]).to(dtype)
    lam = _max_normalized(torch.where(mask, lam, 0.0), (1,))
    s = torch.tensor([float(modules[i].scaling) for i in idx], dtype=dtype, device=P.device)
    g = lam * s[:, None]
    return P, Q, g, mask


class ElementEnergyEntropy(Importance):
    """Normalized entropy of eⱼ = (s·λⱼ·‖P[:, j]‖·‖Q[j, :]‖)² over active slots."""

    name = "energy_entropy_element"

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = float(eps)

    @torch.no_grad()
    def scores(self, modules):
        lam_all, mask_all = stack_lam_mask(modules)
        amp = torch.zeros(lam_all.shape, dtype=torch.float32, device=lam_all.device)
        for idx in shape_groups(modules):
            P, Q, g, _ = _stack_group(modules, idx, torch.float32)
            R = g.shape[1]
            a = g.abs() * torch.linalg.vector_norm(P, dim=1) * torch.linalg.vector_norm(Q, dim=2)
            amp[idx, :R] = a
        # the entropy op squares the amplitudes (after a max-normalization: no overflow)
        return spectral_entropy(amp, mask_all, self.eps)


class SpectrumEntropy(Importance):
    """Normalized entropy of the true σ(ΔW)² (Gram-based, batched eigh) in ``dtype``."""

    def __init__(self, name: str, dtype: torch.dtype, eps: float = 1e-12) -> None:
        self.name = name
        self.dtype = dtype
        self.eps = float(eps)

    @torch.no_grad()
    def scores(self, modules):
        n = len(modules)
        dev = modules[0].P.device
        out = torch.zeros(n, dtype=torch.float32, device=dev)
        for idx in shape_groups(modules):
            P, Q, g, mask = _stack_group(modules, idx, self.dtype)
            # eigh fails on NaN/inf input: zero those modules here, report them as NaN below
            bad = ~(P.isfinite().flatten(1).all(1) & Q.isfinite().flatten(1).all(1) & g.isfinite().all(1))
            P = torch.where(bad[:, None, None], 0.0, P)
            Q = torch.where(bad[:, None, None], 0.0, Q)
            g = torch.where(bad[:, None], 0.0, g)
            sig2 = gram_singular_values_sq(P, Q, g)
            ent = normalized_entropy(sig2, mask.sum(dim=1), self.eps)
            out[idx] = _finite(torch.where(bad, float("nan"), ent))
        return out


def gram_singular_values_sq(P: torch.Tensor, Q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """σ² [b, R] (ascending, clamped ≥ 0) of ΔW_b = P_b·diag(g_b)·Q_b for P [b, out, R],
    Q [b, R, in], g [b, R], from r×r Grams only: eig(Gp^{1/2}·G·Gq·G·Gp^{1/2})."""
    Gp = torch.bmm(P.transpose(1, 2), P)
    Gq = torch.bmm(Q, Q.transpose(1, 2))
    w, V = torch.linalg.eigh(Gp)
    root = (V * w.clamp_min(0).sqrt()[:, None, :]) @ V.transpose(1, 2)  # Gp^{1/2}
    A = root * g[:, None, :]  # Gp^{1/2}·G
    M = A @ Gq @ A.transpose(1, 2)
    M = 0.5 * (M + M.transpose(1, 2))  # exact symmetry for eigvalsh
    return torch.linalg.eigvalsh(M).clamp_min(0)


def _non_finite_active_slots(modules, mask_all: torch.Tensor) -> torch.Tensor:
    """[n] bool: whether a module holds a NaN or inf in an active slot's P column, λ or Q row."""
    bad = torch.zeros(mask_all.shape[0], dtype=torch.bool, device=mask_all.device)
    for idx in shape_groups(modules):
        P = torch.stack([modules[i].P.detach() for i in idx])
        Q = torch.stack([modules[i].Q.detach() for i in idx])
        lam = torch.stack([modules[i].lam.detach() for i in idx])
        finite = P.isfinite().all(dim=1) & lam.isfinite() & Q.isfinite().all(dim=2)  # [b, R]
        bad[idx] = (mask_all[idx, : lam.shape[1]] & ~finite).any(dim=1)
    return bad


class SensitivityImportance(Importance):
    """AdaLoRA-style smoothed sensitivity × uncertainty (see the module docstring).

    State: for every module, Ī and Ū (fp32) of the shapes of P, λ and Q, indexed by the module's
    position in ``modules`` (which must stay the same list, in the same order). An update whose
    gradients hold a NaN or inf changes nothing (it counts in ``skipped``, not ``steps``)."""

    name = "sensitivity"
    needs_gradients = True

    @property
    def fed(self) -> int:
        return self.steps + self.skipped

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.ipt: List[torch.Tensor] = []  # [P, λ, Q] per module, flattened in module order
        self.unc: List[torch.Tensor] = []
        self.steps = 0  # updates folded into the EMAs
        self.skipped = 0  # updates skipped for a non-finite gradient

    @staticmethod
    def _params(modules) -> List[torch.Tensor]:
        return [p for m in modules for p in (m.P, m.lam, m.Q)]

    def _ensure_state(self, params) -> None:
        if not self.ipt:
            self.ipt = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            self.unc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        elif len(self.ipt) != len(params) or any(a.shape != p.shape for a, p in zip(self.ipt, params)):
            raise ValueError(
                "SensitivityImportance: the modules differ from those of earlier update() calls "
                f"({len(self.ipt) // 3} modules in the state, {len(params) // 3} given)"
            )
        elif any(a.device != p.device for a, p in zip(self.ipt, params)):  # e.g. state loaded on CPU
            self.ipt = [a.to(p.device) for a, p in zip(self.ipt, params)]
            self.unc = [u.to(p.device) for u, p in zip(self.unc, params)]

    @torch.no_grad()
    def update(self, modules) -> None:
        params = self._params(modules)
        self._ensure_state(params)
        sel = [k for k, p in enumerate(params) if p.grad is not None]
        if not sel:
            return
        grads = [params[k].grad.float() for k in sel]
        # An inf/NaN gradient is an fp16 overflow that GradScaler answers by skipping
        # optimizer.step(); folded into the EMAs it would make them NaN for good, and the next
        # event would report a divergence that never happened. Skip the whole step, as the
        # optimizer did (one host sync per step; the max-norm cannot overflow, and has no value
        # for an empty tensor).
        maxes = torch._foreach_norm([g for g in grads if g.numel()], float("inf"))
        if maxes and not bool(torch.stack(maxes).isfinite().all()):
            self.skipped += 1
            return
        cur = torch._foreach_mul([params[k].detach().float() for k in sel], grads)
        torch._foreach_abs_(cur)
        ipt = [self.ipt[k] for k in sel]
        unc = [self.unc[k] for k in sel]
        torch._foreach_mul_(ipt, self.beta1)
        torch._foreach_add_(ipt, cur, alpha=1.0 - self.beta1)
        diff = torch._foreach_sub(cur, ipt)
        torch._foreach_abs_(diff)
        torch._foreach_mul_(unc, self.beta2)
        torch._foreach_add_(unc, diff, alpha=1.0 - self.beta2)
        self.steps += 1

    @torch.no_grad()
    def reset_slot(self, index: int, slot: int) -> None:
        # An opened slot starts from zero statistics, as every slot did at the first update (an
        # inactive slot's EMAs only decay by beta per step: with a short delta_t a reopened slot
        # would start with much of the pruned direction's importance)
        if not self.ipt:
            return
        for stats in (self.ipt, self.unc):
            stats[3 * index][:, slot] = 0
            stats[3 * index + 1][slot] = 0
            stats[3 * index + 2][slot, :] = 0

    @torch.no_grad()
    def scores(self, modules):
        lam_all, mask_all = stack_lam_mask(modules)
        n, R_all = mask_all.shape
        # Updates with non-finite gradients are skipped, so diverged parameters need not reach
        # the EMAs: look at the parameters themselves.
        bad = _non_finite_active_slots(modules, mask_all)
        if not self.ipt:
            return _nan_where(bad, torch.zeros(n, dtype=torch.float32, device=mask_all.device))
        self._ensure_state(self._params(modules))
        slot = torch.zeros(n, R_all, dtype=torch.float32, device=mask_all.device)
        for idx in shape_groups(modules):
            sP = torch.stack([self.ipt[3 * i] * self.unc[3 * i] for i in idx])  # [b, out, R]
            sl = torch.stack([self.ipt[3 * i + 1] * self.unc[3 * i + 1] for i in idx])  # [b, R]
            sQ = torch.stack([self.ipt[3 * i + 2] * self.unc[3 * i + 2] for i in idx])  # [b, R, in]
            # means as sums / max(count, 1): a module with no inputs or outputs has empty P or Q
            # rows, whose mean would be NaN (a false "diverged")
            mP = sP.sum(dim=1) / max(sP.shape[1], 1)
            mQ = sQ.sum(dim=2) / max(sQ.shape[2], 1)
            slot[idx, : sl.shape[1]] = sl + mP + mQ
        r = mask_all.sum(dim=1)
        total = torch.where(mask_all, slot, 0.0).sum(dim=1)
        return _nan_where(bad, _finite(torch.where(r > 0, total / r.clamp_min(1), 0.0)))

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "steps": self.steps,
            "skipped": self.skipped,
            "ipt": [t.clone() for t in self.ipt],
            "unc": [t.clone() for t in self.unc],
        }

    def check_state(self, sd: dict, modules: Optional[Sequence] = None) -> None:
        super().check_state(sd, modules)
        missing = [k for k in ("steps", "ipt", "unc") if k not in sd]
        if missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state lacks {missing}")
        if len(sd["ipt"]) != len(sd["unc"]):
            raise ValueError(f"{type(self).__name__}.load_state_dict: {len(sd['ipt'])} ipt but {len(sd['unc'])} unc tensors")
        # The shapes the state must have: those of the modules it will score (another r_max or
        # another model would load here and fail at the next step(), after the rest of a resume
        # had been restored), else those of the state already held.
        want = [tuple(p.shape) for p in self._params(modules)] if modules is not None else (
            [tuple(t.shape) for t in self.ipt] if self.ipt and len(sd["ipt"]) == len(self.ipt) else None)
        if want is None or not sd["ipt"]:  # an empty state (no update yet) fits any modules
            return
        if len(sd["ipt"]) != len(want):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state holds {len(sd['ipt']) // 3} modules' "
                f"statistics, expected {len(want) // 3}"
            )
        for i, (shape, src) in enumerate(zip(want + want, list(sd["ipt"]) + list(sd["unc"]))):
            if not torch.is_tensor(src) or tuple(src.shape) != shape:
                got = tuple(src.shape) if torch.is_tensor(src) else type(src).__name__
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: state tensor {i} has shape {got}, expected {shape}"
                )

    def load_state_dict(self, sd: dict, modules: Optional[Sequence] = None) -> None:
        super().load_state_dict(sd, modules)
        self.steps = int(sd["steps"])
        self.skipped = int(sd.get("skipped", 0))  # absent from states saved before it existed
        if self.ipt and len(sd["ipt"]) == len(self.ipt):
            for dst, src in zip(self.ipt + self.unc, list(sd["ipt"]) + list(sd["unc"])):
                dst.copy_(src)
        else:
            self.ipt = [t.clone() for t in sd["ipt"]]
            self.unc = [t.clone() for t in sd["unc"]]


def make_importance(config) -> Importance:
    """The metric named by ``config.importance`` (a FlexLoRAConfig), with its eps / betas."""
    name = config.importance
    eps = config.entropy_eps
    if name == "entropy":
        return EntropyImportance(eps)
    if name in ("nuclear", "frobenius"):
        return NormImportance(name)
    if name == "sensitivity":
        return SensitivityImportance(config.sensitivity_beta, config.uncertainty_beta)
    if name == "energy_entropy_element":
        return ElementEnergyEntropy(eps)
    if name == "energy_entropy_matrix":
        return SpectrumEntropy(name, torch.float32, eps)
    if name == "exact_entropy":
        return SpectrumEntropy(name, torch.float64, eps)
    raise ValueError(f"make_importance: config.importance must be one of the known metrics, got {name!r}")


IMPORTANCE_CLASSES: Dict[str, type] = {
    "entropy": EntropyImportance,
    "nuclear": NormImportance,
    "frobenius": NormImportance,
    "sensitivity": SensitivityImportance,
    "energy_entropy_element": ElementEnergyEntropy,
    "energy_entropy_matrix": SpectrumEntropy,
    "exact_entropy": SpectrumEntropy,
}
