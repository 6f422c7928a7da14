"""merge / unmerge / merge_and_unload against a float64 reference W + s·P·diag(λ⊙mask)·Q."""

import warnings

import pytest
import torch
import torch.nn as nn

import flexlora
from flexlora import FlexLinear, FlexLoRAConfig, flex_modules, wrap
from flexlora.merging import merge, merge_and_unload, unmerge
from _tiny_hf import llama_model

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
MASKS = ["all-on", "all-off", "random"]



def trained_llama(dtype=torch.float32, mask_kind="random"):
    model = llama_model().to(dtype).eval()
    wrap(model, FlexLoRAConfig(r_init=3, r_max=6, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"],
                               total_steps=100, t_warmup=1, t_final=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in flex_modules(model):
            m.P.normal_(generator=g)
            m.Q.normal_(generator=g)
            m.lam.normal_(std=0.5, generator=g)
            mask = {"all-on": torch.ones(6, dtype=torch.bool), "all-off": torch.zeros(6, dtype=torch.bool),
                    "random": torch.rand(6, generator=g) < 0.5}[mask_kind]
            m.mask.copy_(mask)
    return model


def reference_merged(m):
    """W + s·Σ_{j active} λ_j P[:, j] Q[j, :], in float64, written from the math."""
    W = m.weight.detach().double().clone()
    for j in range(m.r_max):
        if m.mask[j]:
            W += m.scaling * m.lam[j].double() * torch.outer(m.P[:, j].double(), m.Q[j].double())
    return W


@pytest.mark.parametrize("mask_kind", MASKS)
def test_merge_fp32_matches_float64_reference_and_forward(mask_kind):
    model = trained_llama(mask_kind=mask_kind)
    refs = {n: reference_merged(m) for n, m in flex_modules(model)}
    with torch.no_grad():
        before = model(IDS).logits
    assert merge(model) is model
    for n, m in flex_modules(model):
        assert m.merged
        err = (m.weight.double() - refs[n]).abs().max().item()
        assert err <= 1e-6 * refs[n].abs().max().item(), f"{n}: merged W off by {err}"
    with torch.no_grad():
        after = model(IDS).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    merge(model)  # idempotent: already merged modules are left alone
    for n, m in flex_modules(model):
        assert (m.weight.double() - refs[n]).abs().max().item() <= 1e-6 * refs[n].abs().max().item()


def test_unmerge_fp32_round_trip():
    model = trained_llama()
    W0 = {n: m.weight.detach().clone() for n, m in flex_modules(model)}
    with torch.no_grad():
        before = model(IDS).logits
    merged_ref = {n: reference_merged(m) for n, m in flex_modules(model)}
    unmerge(merge(model))
    eps = torch.finfo(torch.float32).eps
    for n, m in flex_modules(model):
        assert not m.merged
        # two fp32 roundings (merge, unmerge), each <= eps/2 of the value rounded
        err = (m.weight.double() - W0[n].double()).abs()
        bound = eps / 2 * (merged_ref[n].abs() + W0[n].double().abs()) + 1e-30
        assert (err <= bound).all(), f"{n}: fp32 round trip error {err.max().item()} beyond two roundings"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=1e-5, atol=1e-5)
    W1 = {n: m.weight.detach().clone() for n, m in flex_modules(model)}
    unmerge(model)  # no-op on unmerged modules
    assert all(torch.equal(m.weight, W1[n]) for n, m in flex_modules(model))


def test_unmerge_of_a_hand_marked_merge_subtracts_the_current_delta():
    """merged=True set by hand (no snapshot from merge): unmerge subtracts the current ΔW."""
    model = trained_llama()
    W0 = {n: m.weight.detach().clone() for n, m in flex_modules(model)}
    merged_ref = {n: reference_merged(m) for n, m in flex_modules(model)}
    with torch.no_grad():
        for n, m in flex_modules(model):
            m.weight.copy_(merged_ref[n].float())  # ΔW folded in by the user
            m.merged = True
    # what unmerge subtracts is ΔW computed afresh in fp32 (not a snapshot of what was added): its
    # rounding adds at most (r + 2)·u·Σ_j |s λ_j P[:, j] Q[j, :]| (r products summed, two scalings)
    abs_terms = {n: sum(abs(m.scaling * m.lam[j].double()) * torch.outer(m.P[:, j].double().abs(), m.Q[j].double().abs())
                        for j in range(m.r_max) if m.mask[j]) for n, m in flex_modules(model)}
    unmerge(model)
    u = torch.finfo(torch.float32).eps / 2
    for n, m in flex_modules(model):
        assert not m.merged
        err = (m.weight.double() - W0[n].double()).abs()
        bound = u * (merged_ref[n].abs() + W0[n].double().abs()) + (m.r_max + 2) * u * abs_terms[n] + 1e-30
        assert (err <= bound).all(), f"{n}: hand-marked unmerge off by {err.max().item()}"
        assert err.max() < 1e-4, f"{n}: hand-marked unmerge did not subtract ΔW"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_merge_low_precision_rounds_once(dtype):
    model = trained_llama(dtype)
    refs = {n: reference_merged(m) for n, m in flex_modules(model)}
    merge(model)
    ulp = torch.finfo(dtype).eps  # relative spacing: rounding to nearest errs by <= eps/2 · |x|
    for n, m in flex_modules(model):
        assert m.weight.dtype == dtype
        err = (m.weight.double() - refs[n]).abs()
        assert (err <= ulp / 2 * refs[n].abs() + 1e-30).all(), f"{n}: merged W is not the rounded fp64 value"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_unmerge_low_precision_lossy_by_subtraction_exact_with_keep_original(dtype):
    model = trained_llama(dtype)
    W0 = {n: m.weight.detach().clone() for n, m in flex_modules(model)}
    merged_ref = {n: reference_merged(m) for n, m in flex_modules(model)}
    unmerge(merge(model))
    ulp = torch.finfo(dtype).eps
    worst = 0.0
    for n, m in flex_modules(model):
        err = (m.weight.double() - W0[n].double()).abs()
        # one rounding in merge + one in unmerge: each <= eps/2 of the value rounded
        bound = ulp / 2 * (merged_ref[n].abs() + W0[n].double().abs()) + 1e-30
        assert (err <= bound).all(), f"{n}: {dtype} round trip error beyond two roundings"
        worst = max(worst, err.max().item())
    assert worst > 0, "subtracting ΔW in low precision was expected to be lossy (test premise)"

    model = trained_llama(dtype)
    unmerge(merge(model, keep_original=True))
    for n, m in flex_modules(model):
        assert torch.equal(m.weight, W0[n]), f"{n}: keep_original round trip not bit-exact"
        assert not hasattr(m, "_flexlora_unmerged_weight")


@pytest.mark.parametrize("mask_kind", MASKS)
def test_merge_and_unload_gives_plain_linears_with_same_outputs(mask_kind):
    model = trained_llama(mask_kind=mask_kind)
    with torch.no_grad():
        before = model(IDS).logits
    weights = {n: m.weight for n, m in flex_modules(model)}
    out = merge_and_unload(model)
    assert out is model
    assert not any(isinstance(m, FlexLinear) for m in model.modules())
    assert not hasattr(model, "flexlora_config")
    for n, w in weights.items():
        lin = model.get_submodule(n)
        assert type(lin) is nn.Linear and lin.weight is w and not lin.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=1e-5, atol=1e-5)


def test_merge_rejects_unwrapped_model():
    with pytest.raises(ValueError, match="no FlexLinear"):
        merge(nn.Sequential(nn.Linear(3, 3)))


def test_public_names_are_the_functions():
    # flexlora/__init__ must map merge/unmerge/merge_and_unload to "flexlora.merging"
    assert flexlora.merge is merge and flexlora.unmerge is unmerge and flexlora.merge_and_unload is merge_and_unload


def tied_llama():
    model = llama_model(tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the premise: tied
    with pytest.warns(UserWarning, match="tied"):
        wrap(model, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["lm_head", "q_proj"]))
    with torch.no_grad():
        for _, m in flex_modules(model):
            m.lam.normal_(std=0.5)
    return model


@pytest.mark.parametrize("fn", [merge, merge_and_unload], ids=["merge", "merge_and_unload"])
def test_merge_refuses_a_weight_tied_to_another_module(fn):
    # merging into lm_head.weight would add ΔW to the input embeddings too (the same tensor)
    model = tied_llama()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(IDS).logits
    with pytest.raises(ValueError, match=r"'lm_head'.*\['model\.embed_tokens\.weight'\].*[Uu]ntie"):
        fn(model)
    assert not any(m.merged for _, m in flex_modules(model)), "nothing may be merged (q_proj included)"
    assert len(flex_modules(model)) == 3 and hasattr(model, "flexlora_config")
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


def test_merge_after_untying_matches_the_unmerged_output():
    model = tied_llama()
    with torch.no_grad():
        before = model(IDS).logits
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    want = reference_merged(model.lm_head)
    merge(model)
    assert (model.lm_head.weight.double() - want).abs().max().item() <= 1e-6 * want.abs().max().item()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=1e-5, atol=1e-5)


def test_unmerge_subtracts_what_merge_added_even_after_a_rank_change():
    # a mask flip, a λ edit or an optimizer step between merge and unmerge must not leak into W
    model = trained_llama(mask_kind="random")
    W0 = {n: m.weight.detach().clone() for n, m in flex_modules(model)}
    merged_ref = {n: reference_merged(m) for n, m in flex_modules(model)}
    merge(model)
    with torch.no_grad():
        for _, m in flex_modules(model):
            m.mask[0] = ~m.mask[0]  # a prune or an expansion
            m.lam.mul_(1.5).add_(0.25)
            m.P.add_(0.1)
    unmerge(model)
    eps = torch.finfo(torch.float32).eps
    for n, m in flex_modules(model):
        err = (m.weight.double() - W0[n].double()).abs()
        bound = eps / 2 * (merged_ref[n].abs() + W0[n].double().abs()) + 1e-30
        assert (err <= bound).all(), f"{n}: W off by {err.max().item():.3g} after a change while merged"
        assert not hasattr(m, "_flexlora_merged_adapter")


def test_merge_and_unload_keeps_hooks_and_every_name():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(6, 6)
            self.dec = self.enc

        def forward(self, x):
            return self.dec(torch.relu(self.enc(x)))

    torch.manual_seed(0)
    model = wrap(Shared(), FlexLoRAConfig(r_init=2, r_max=4, target_modules=["dec"]))
    with torch.no_grad():
        model.enc.lam.normal_()
    calls = []
    model.enc.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = model(x)
    merge_and_unload(model)
    assert type(model.enc) is nn.Linear and model.dec is model.enc
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert calls == [1, 1]


def test_state_dict_of_a_merged_model_warns_that_reloading_doubles_delta():
    """A merged model's state_dict holds W + ΔW and P, λ, Q, with nothing saying it is merged:
    loaded into a freshly wrapped model, ΔW applies twice (shown here), so taking it warns."""
    import warnings

    model = trained_llama()
    with torch.no_grad():
        want = model(IDS).logits
    merge(model)
    with pytest.warns(UserWarning, match=r"merged FlexLinear.*applies ΔW twice.*flexlora.unmerge\(model\)"):
        sd = model.state_dict()
    fresh = trained_llama()
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert (fresh(IDS).logits - want).abs().max() > 1e-3  # the hazard the warning names
    unmerge(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = model.state_dict()  # unmerged: silent, and the reload is exact
    fresh = trained_llama()
    fresh.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_merged_state_dict_warning_points_at_the_callers_line():
    model = trained_llama()
    merge(model)
    with pytest.warns(UserWarning, match="merged FlexLinear") as rec:
        model.state_dict()
    assert rec[0].filename == __file__, rec[0].filename


@pytest.mark.parametrize("merged_first", [False, True], ids=["unmerged", "merged"])
def test_unload_gives_the_base_model_back(merged_first):
    torch.manual_seed(0)
    base = llama_model().eval()
    with torch.no_grad():
        plain = base(IDS).logits
    model = trained_llama()  # the same base weights (llama_model is seeded), with adapters
    weights = {n: m.weight.detach().clone() for n, m in flex_modules(model)}
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, plain, atol=1e-4)  # the adapters did change the output
    if merged_first:
        merge(model)
    assert flexlora.unload(model) is model
    assert not any(isinstance(m, FlexLinear) for m in model.modules()) and not hasattr(model, "flexlora_config")
    for n, w in weights.items():
        lin = model.get_submodule(n)
        assert type(lin) is nn.Linear and not lin.weight.requires_grad
        torch.testing.assert_close(lin.weight, w, rtol=1e-6, atol=1e-6)  # merged: subtracted back
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, plain, rtol=1e-5, atol=1e-5)


def test_merge_ignores_non_finite_values_in_inactive_slots():
    model = trained_llama(mask_kind="random")
    refs = {n: reference_merged(m) for n, m in flex_modules(model)}  # inactive slots are not read
    with torch.no_grad():
        for _, m in flex_modules(model):
            off = (~m.mask).nonzero().flatten()
            if len(off):
                m.lam[off[0]] = float("nan")
                m.P[:, off[0]] = float("inf")
    merge(model)
    for n, m in flex_modules(model):
        assert torch.isfinite(m.weight).all(), n
        assert (m.weight.double() - refs[n]).abs().max().item() <= 1e-6 * refs[n].abs().max().item()


def test_two_parameters_over_the_same_memory_are_tied_too():
    # nn.Parameter(a.weight.detach()) (or a tied state loaded with assign=True) is a second
    # Parameter object over the same memory: merging b must not change a
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = nn.Parameter(a.weight.detach())
    model = nn.ModuleDict({"a": a, "b": b})
    with pytest.warns(UserWarning, match=r"'b' is tied to \['a\.weight'\]"):
        wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["b"]))
    with torch.no_grad():
        model["b"].lam.fill_(1.0)
    before = a.weight.detach().clone()
    with pytest.raises(ValueError, match=r"'b'.*shared with \['a\.weight'\]"):
        merge(model)
    assert torch.equal(a.weight, before)
    # distinct memory (a clone) is not tied: no warning, and merge changes b only
    c, d = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    d.weight = nn.Parameter(c.weight.detach().clone())
    model = nn.ModuleDict({"c": c, "d": d})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["d"]))
    with torch.no_grad():
        model["d"].lam.fill_(1.0)
    before = c.weight.detach().clone()
    merge(model)
    assert torch.equal(c.weight, before) and not torch.equal(model["d"].weight, before)


def test_a_weight_over_part_of_another_or_its_transpose_is_tied_too():
    # overlapping memory, not only the same view: merging into it would change the other module
    for make in (lambda w: w.detach().t(), lambda w: w.detach()[:2]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
        w = make(model[0].weight)
        model[1] = nn.Linear(w.shape[1], w.shape[0], bias=False)
        model[1].weight = nn.Parameter(w)
        with pytest.warns(UserWarning, match=r"'1' is tied to \['0\.weight'\]"):
            wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["1"]))
        with pytest.raises(ValueError, match=r"'1'.*shared with \['0\.weight'\]"):
            merge(model)
    # row blocks of one fused buffer do not overlap: not tied
    fused = torch.randn(8, 4)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[0].weight, model[1].weight = nn.Parameter(fused[:4]), nn.Parameter(fused[4:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["1"]))
