"""wrap / flex_modules / count_parameters on the three model families, built from small configs."""

import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

import flexlora
from flexlora import FlexLinear, FlexLoRAConfig, count_parameters, flex_modules, wrap
from _tiny_hf import llama_model


def tiny_llama():
    return llama_model().eval(), {"input_ids": torch.randint(0, 64, (2, 9))}


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval(), {"input_ids": torch.randint(0, 64, (2, 7))}


def tiny_vit():
    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=40,
        num_hidden_layers=2, num_attention_heads=4, num_labels=5,
    )
    return ViTForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}


# transformers 5 names ViT's attention projections q_proj / v_proj, 4.x query / value
_VIT_QV = ["q_proj", "v_proj"] if any(n.endswith(".q_proj") for n, _ in tiny_vit()[0].named_modules()) else ["query", "value"]


FAMILIES = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], [], 14),
    "bert": (tiny_bert, ["query", "key", "value", "attention.output.dense"], ["classifier"], 8),
    "vit": (tiny_vit, _VIT_QV, ["classifier"], 4),
}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_wrapped_output_equals_base_at_init(family):
    build, targets, save, n_expected = FAMILIES[family]
    model, inputs = build()
    before = logits(model, inputs)
    wrap(model, FlexLoRAConfig(r_init=4, r_max=8, alpha=8.0, target_modules=targets, modules_to_save=save))
    mods = flex_modules(model)
    assert len(mods) == n_expected
    assert torch.equal(logits(model, inputs), before)

    # only adapters (and modules_to_save) train
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in trainable:
        assert n.rsplit(".", 1)[-1] in ("P", "lam", "Q") or any(f"{s}." in n for s in save), n
    assert len([n for n in trainable if n.endswith(".lam")]) == n_expected
    assert model.flexlora_config.r_max == 8


def test_frozen_base_gets_no_gradient_and_adapters_do():
    model, inputs = tiny_llama()
    wrap(model, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.endswith((".P", ".lam", ".Q")):
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # λ starts at 0: only λ moves at the first step; P and Q gradients are exactly zero.
    _, m = flex_modules(model)[0]
    assert m.lam.grad.abs().sum() > 0
    assert torch.count_nonzero(m.P.grad) == 0 and torch.count_nonzero(m.Q.grad) == 0


def test_regex_targets_and_stable_order():
    model, _ = tiny_llama()
    wrap(model, FlexLoRAConfig(target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj"))
    names = [n for n, _ in flex_modules(model)]
    assert names == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_suffix_match_is_by_whole_component():
    model, _ = tiny_bert()
    # "dense" would also match the pooler; "output.dense" matches attention.output.dense and output.dense
    wrap(model, FlexLoRAConfig(target_modules=["attention.output.dense"]))
    names = [n for n, _ in flex_modules(model)]
    assert names == [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]


def test_no_match_lists_existing_modules():
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match=r"matches no nn.Linear.*q_proj"):
        wrap(model, FlexLoRAConfig(target_modules=["query"]))
    assert not flex_modules(model)  # nothing was half-done


def test_entries_that_match_no_linear_warn_while_others_wrap():
    """A typo, or the name of a block rather than a Linear, is ignored with a warning naming it
    (and what it did match), while the other entries are adapted."""
    model, _ = tiny_llama()
    with pytest.warns(UserWarning, match="match no nn.Linear and are ignored") as rec:
        wrap(model, FlexLoRAConfig(target_modules=["q_proj", "up_projj", "self_attn"]))
    msg = str(rec[0].message)
    assert "'up_projj'" in msg and "'self_attn' (matches 'model.layers.0.self_attn', a LlamaAttention" in msg
    assert "'q_proj'" not in msg.split("entries")[1].split("match no")[0]
    assert [n.rsplit(".", 1)[1] for n, _ in flex_modules(model)] == ["q_proj"] * 2
    with warnings.catch_warnings():  # every entry matches: silent; a regex is never checked per entry
        warnings.simplefilter("error")
        wrap(tiny_llama()[0], FlexLoRAConfig(target_modules=["q_proj", "v_proj"]))
        wrap(tiny_llama()[0], FlexLoRAConfig(target_modules=r".*\.(q_proj|nothing)"))


def test_modules_to_save_no_match_is_error():
    model, _ = tiny_bert()
    with pytest.raises(ValueError, match="modules_to_save"):
        wrap(model, FlexLoRAConfig(target_modules=["query"], modules_to_save=["head_that_is_not_there"]))


def test_modules_to_save_entry_that_matches_nothing_warns_while_others_train():
    model, _ = tiny_bert()
    with pytest.warns(UserWarning, match=r"modules_to_save entries \['clasifier'\] match no module"):
        wrap(model, FlexLoRAConfig(target_modules=["query"], modules_to_save=["classifier", "clasifier"]))
    assert all(p.requires_grad for p in model.classifier.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrap(tiny_bert()[0], FlexLoRAConfig(target_modules=["query"], modules_to_save=["classifier"]))


def test_no_linear_match_names_what_did_match_or_that_there_is_no_linear():
    class Conv1DLike(nn.Module):  # GPT-2's attention and MLP projections are Conv1D, not Linear
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 4))

    model = nn.Sequential()
    model.add_module("c_attn", Conv1DLike())
    model.add_module("head", nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"it matches 'c_attn', a Conv1DLike, not an nn.Linear.*\['head'\]"):
        wrap(model, FlexLoRAConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"no nn.Linear submodule.*FlexLinear.from_linear"):
        wrap(nn.Linear(4, 4), FlexLoRAConfig(target_modules=["x"]))


def test_lazy_linear_not_materialized_is_an_error_before_anything_changes():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0' is a lazy Linear.*run one forward pass"):
        wrap(model, FlexLoRAConfig(target_modules=["0", "2"]))
    assert all(p.requires_grad for p in model.parameters()) and not flex_modules(model)
    model(torch.randn(3, 5))  # materialized: now it wraps
    wrap(model, FlexLoRAConfig(target_modules=["0", "2"]))
    assert [n for n, _ in flex_modules(model)] == ["0", "2"]


def test_double_wrap_is_error():
    model, _ = tiny_llama()
    wrap(model, FlexLoRAConfig())
    with pytest.raises(ValueError, match="already"):
        wrap(model, FlexLoRAConfig())


def test_wrap_rejects_non_config():
    model, _ = tiny_llama()
    with pytest.raises(TypeError, match="FlexLoRAConfig"):
        wrap(model, {"r_init": 4})


def test_count_parameters_counts_active_slots_only():
    model, _ = tiny_bert()
    wrap(model, FlexLoRAConfig(r_init=3, r_max=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    mods = flex_modules(model)
    # hand-set varied ranks
    ranks = [0, 1, 5, 8]
    for (_, m), r in zip(mods, ranks):
        m.mask.zero_()
        m.mask[:r] = True
    c = count_parameters(model)
    assert c.total_rank == sum(ranks)
    assert c.adapter_params == sum(r * (32 + 32 + 1) for r in ranks)
    assert c.other_trainable_params == 32 * 3 + 3  # classifier head: Linear(32, 3)
    assert c.trainable_params == c.adapter_params + c.other_trainable_params


def test_wrap_on_plain_module_and_public_api():
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    wrap(model, FlexLoRAConfig(target_modules=r"0|2", r_init=1, r_max=2))
    assert isinstance(model[0], FlexLinear) and isinstance(model[2], FlexLinear)
    assert set(flexlora.__all__) >= {"FlexLinear", "FlexLoRAConfig", "wrap", "flex_modules", "count_parameters"}


def test_wrapping_an_eval_model_keeps_adapter_dropout_off():
    # HF from_pretrained returns eval models and load_adapter wraps them: a FlexLinear that came
    # up in training mode would run dropout at inference
    model, inputs = tiny_llama()
    assert not model.training
    wrap(model, FlexLoRAConfig(r_init=4, r_max=8, dropout=0.5, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, m in flex_modules(model):
            m.lam.normal_()
    assert not any(m.training for _, m in flex_modules(model))
    first, second = logits(model, inputs), logits(model, inputs)
    assert torch.equal(first, second)
    model.train()  # the premise: with dropout running, two forwards differ
    assert not torch.equal(logits(model, inputs), logits(model, inputs))


def test_tied_lm_head_warns_and_stays_frozen_in_modules_to_save():
    model = llama_model(tie_word_embeddings=True).eval()
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb
    with pytest.warns(UserWarning) as record:
        wrap(model, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["lm_head", "q_proj"],
                                   modules_to_save=["embed_tokens"]))
    messages = [str(w.message) for w in record]
    assert any(re.search(r"'lm_head' is tied to \['model\.embed_tokens\.weight'\]", m) for m in messages), messages
    assert any(re.search(r"'model\.embed_tokens\.weight' stays frozen.*'lm_head'", m) for m in messages), messages
    assert isinstance(model.lm_head, FlexLinear) and model.lm_head.weight is emb
    assert not emb.requires_grad, "the FlexLinear's base weight must stay frozen"


def test_untied_target_gives_no_warning():
    model, _ = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrap(model, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["lm_head", "q_proj"],
                                   modules_to_save=["embed_tokens"]))
    assert model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad


def test_multihead_attention_out_proj_is_skipped_with_a_warning():
    # MHA reads out_proj.weight/bias directly and never calls out_proj's forward: a FlexLinear
    # there would get no gradient and change nothing
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    with pytest.warns(UserWarning, match=r"not adapting \['self_attn\.out_proj'\].*MultiheadAttention"):
        wrap(layer, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["out_proj", "linear1"]))
    assert [n for n, _ in flex_modules(layer)] == ["linear1"]
    assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    layer(torch.randn(2, 5, 16)).sum().backward()
    assert layer.linear1.lam.grad.abs().sum() > 0

    only_mha = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    with pytest.raises(ValueError, match=r"matches no nn.Linear.*\['self_attn\.out_proj'\].*MultiheadAttention"):
        wrap(only_mha, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["out_proj"]))
    assert not flex_modules(only_mha)


def test_forward_hooks_of_the_linear_still_fire_after_wrap():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    calls = []
    model[0].register_forward_pre_hook(lambda mod, args: calls.append(("pre", type(mod).__name__)))
    model[0].register_forward_hook(lambda mod, args, out: calls.append(("post", type(mod).__name__)))
    model[0].register_forward_hook(lambda mod, args, kwargs, out: out * 2, with_kwargs=True)
    model[0].register_forward_hook(lambda mod, args, out: calls.append(("always", 0)), always_call=True)
    removable = model[0].register_forward_hook(lambda mod, args, out: calls.append(("removed", 0)))
    x = torch.randn(4, 6)
    with torch.no_grad():
        want = model(x)
    calls.clear()
    wrap(model, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["0"]))
    removable.remove()  # handles taken before wrap still remove the hook
    with torch.no_grad():
        got = model(x)
    assert isinstance(model[0], FlexLinear)
    assert calls == [("pre", "FlexLinear"), ("post", "FlexLinear"), ("always", 0)]
    assert torch.equal(got, want), "the with_kwargs hook doubling the output must still apply"


def test_accelerate_dispatched_linear_is_an_error():
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    add_hook_to_module(model[2], ModelHook())
    with pytest.raises(ValueError, match=r"'2'.*accelerate.*wrap before dispatching with accelerate"):
        wrap(model, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["0", "2"]))
    assert not flex_modules(model), "nothing may be half-wrapped"


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.dec = self.enc  # one module, two names

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


@pytest.mark.parametrize("target", ["enc", "dec"])
def test_linear_registered_under_two_names_is_wrapped_under_both(target):
    torch.manual_seed(0)
    model = _Shared()
    wrap(model, FlexLoRAConfig(r_init=2, r_max=4, target_modules=[target]))
    assert isinstance(model.enc, FlexLinear) and model.dec is model.enc
    assert len(flex_modules(model)) == 1
    with torch.no_grad():
        model.enc.lam.normal_()
    f = model.enc
    x = torch.randn(3, 6, dtype=torch.float64)
    W = f.weight.double() + f.P.double() @ torch.diag(f.lam.double() * f.mask.double() * f.scaling) @ f.Q.double()
    h = torch.relu(x @ W.t() + f.bias.double())
    want = h @ W.t() + f.bias.double()
    with torch.no_grad():
        got = model(x.float())
    assert (got.double() - want).abs().max().item() <= 1e-5


def test_module_graph_with_a_cycle_wraps_merges_and_unloads():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.block.owner = self  # a child registering its parent: named_modules(remove_duplicate=False) never ends

        def forward(self, x):
            return self.block.q_proj(x)

    net = Net()
    flexlora.wrap(net, flexlora.FlexLoRAConfig(r_init=2, r_max=4, target_modules=["q_proj"]))
    assert isinstance(net.block.q_proj, flexlora.FlexLinear)
    with torch.no_grad():
        net.block.q_proj.lam.fill_(0.5)
    x = torch.randn(3, 4, dtype=torch.float64)
    f = net.block.q_proj
    ref = x @ (f.weight.double() + f.scaling * (f.P.double() * (f.lam.double() * f.mask)) @ f.Q.double()).T + f.bias.double()
    flexlora.merge_and_unload(net)
    assert type(net.block.q_proj) is nn.Linear
    torch.testing.assert_close(net(x.float()).double(), ref, rtol=1e-5, atol=1e-6)


def test_a_linear_in_both_target_modules_and_modules_to_save_is_an_error():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="'2' matches both target_modules and modules_to_save"):
        flexlora.wrap(m, flexlora.FlexLoRAConfig(r_init=2, r_max=4, target_modules=["0", "2"], modules_to_save=["2"]))
    assert not flexlora.flex_modules(m)  # refused before anything changed


def test_a_string_target_that_only_matches_as_a_suffix_says_to_pass_a_list():
    # "q_proj" as a string is a full-name regex: the error listed names that visibly held q_proj
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match=r"a string is one regex .* pass a list: target_modules=\['q_proj'\]"):
        wrap(model, FlexLoRAConfig(target_modules="q_proj"))
    with pytest.raises(ValueError) as info:  # "proj" is no suffix of whole name parts: a list would fail too
        wrap(model, FlexLoRAConfig(target_modules="proj"))
    assert "pass a list" not in str(info.value)


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own, as quantized layers have."""

    def forward(self, x):
        return super().forward(x) * 2


class PlainSubclass(nn.Linear):
    pass


def test_a_linear_subclass_with_its_own_forward_is_refused_before_anything_changes():
    # FlexLinear computes x·Wᵀ + b from the weight: the subclass's forward (a dequantization, a
    # scale) would be dropped silently (the output moved by 1.25 at λ = 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), ScaledLinear(4, 3))
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"'1' is a .*ScaledLinear, an nn\.Linear subclass whose forward computes something other"):
        wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["0", "1"]))
    assert type(model[0]) is nn.Linear and type(model[1]) is ScaledLinear
    assert [p.requires_grad for p in model.parameters()] == flags and not hasattr(model, "flexlora_config")
    with pytest.raises(ValueError, match=r"ScaledLinear, an nn\.Linear subclass whose forward computes something other"):
        FlexLinear.from_linear(ScaledLinear(4, 3), r_max=2, r_init=1, alpha=1.0)
    # a subclass that keeps nn.Linear's forward computes what FlexLinear computes: adapted
    model = nn.Sequential(PlainSubclass(4, 3))
    x = torch.randn(2, 4)
    want = model(x)
    wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["0"]))
    assert isinstance(model[0], FlexLinear) and torch.allclose(model(x), want, atol=1e-6)


def test_a_model_holding_peft_layers_is_refused():
    import peft  # a test extra (setup.py extras_require["test"])

    model, _ = tiny_llama()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"holds PEFT adapter layers .*merge_and_unload\(\) or unload\(\)"):
        wrap(pm, FlexLoRAConfig(r_init=1, r_max=2, target_modules=".*q_proj.*"))
    assert not flex_modules(pm)


class MatmulLinear(nn.Linear):
    """A subclass whose forward is x·Wᵀ + b written out (as transformers' FalconLinear)."""

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


def test_a_subclass_whose_forward_is_the_plain_linear_is_adapted():
    # Falcon's every Linear is such a FalconLinear: refusing it refused the whole model family
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    model = nn.Sequential(MatmulLinear(4, 3), MatmulLinear(3, 2, bias=False))
    x = torch.randn(5, 4)
    want = model(x)
    wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["0", "1"]))
    assert all(isinstance(m, FlexLinear) for m in model) and torch.allclose(model(x), want, atol=1e-6)
    falcon = FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            vocab_size=100)).eval()
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        want = falcon(ids).logits
    wrap(falcon, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["query_key_value", "dense"]))
    assert len(flex_modules(falcon)) == 4
    with torch.no_grad():
        assert torch.equal(falcon(ids).logits, want)  # λ = 0: the output does not move


def test_the_forward_probe_leaves_no_trace_in_the_refused_module():
    # a QAT Linear fake-quantizes its weight (refused), and its observers record what they see:
    # wrap's one probing forward must not leave its random input in them
    import torch.ao.nn.qat as qat
    from torch.ao.quantization import get_default_qat_qconfig

    torch.manual_seed(0)
    model = nn.Sequential(qat.Linear(4, 3, qconfig=get_default_qat_qconfig("fbgemm")))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="whose forward computes something other"):
        wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["0"]))
    after = dict(model.named_buffers())
    assert after.keys() == buffers.keys()
    for n, b in buffers.items():
        assert after[n].shape == b.shape and torch.equal(after[n], b), n
    assert torch.equal(torch.get_rng_state(), rng)


class NoBiasLinear(nn.Linear):
    """Drops its bias: differs from x·Wᵀ + b by b only."""

    def forward(self, x):
        return x @ self.weight.T


class NearlyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 1.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_the_forward_probe_tells_the_same_math_from_a_near_miss_in_every_dtype(dtype):
    # a tolerance of 64 ulps let ×1.01 (and ×1.45 in bf16) and a dropped bias through in bf16
    torch.manual_seed(0)
    for cls in (MatmulLinear, NoBiasLinear, NearlyLinear):
        model = nn.Sequential(cls(16, 8).to(dtype))
        if cls is MatmulLinear:
            wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["0"]))
            assert isinstance(model[0], FlexLinear)
        else:
            with pytest.raises(ValueError, match=f"{cls.__name__}, an nn.Linear subclass whose forward"):
                wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["0"]))


def test_float8_meta_and_lazy_subclasses_get_clear_answers():
    # float8 weights are quantized: refused without running them (max() on float8 crashed wrap)
    fp8 = nn.Sequential(MatmulLinear(8, 4))
    fp8[0].weight = nn.Parameter(fp8[0].weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match="MatmulLinear, an nn.Linear subclass whose forward"):
        wrap(fp8, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["0"]))
    # on meta nothing can be checked: an overridden forward is refused, saying why
    with torch.device("meta"):
        meta = nn.Sequential(MatmulLinear(8, 4))
    with pytest.raises(ValueError, match="on the meta device its forward cannot be checked"):
        wrap(meta, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["0"]))

    class LazySub(nn.LazyLinear):
        def forward(self, x):
            return super().forward(x)

    with pytest.raises(ValueError, match="lazy Linear whose weight is not materialized"):
        wrap(nn.Sequential(LazySub(4)), FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["0"]))


class LateColumnsScaled(nn.Linear):
    """Scales the input features from 16 on: beyond the first 16 one-hot columns."""

    def forward(self, x):
        scale = torch.ones(self.in_features, dtype=x.dtype)
        scale[16:] = 1.05
        return F.linear(x * scale, self.weight, self.bias)


def test_the_forward_probe_sees_every_input_range_and_keeps_inf_weights(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(LateColumnsScaled(64, 8).to(torch.bfloat16))
    with pytest.raises(ValueError, match="LateColumnsScaled, an nn.Linear subclass whose forward"):
        wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["0"]))
    # a plain layer holding an inf weight is still plain (0·inf is NaN on both sides)
    model = nn.Sequential(MatmulLinear(32, 8))
    with torch.no_grad():
        model[0].weight[3, 20] = float("inf")
    wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["0"]))
    assert isinstance(model[0], FlexLinear)
    # the one-hot rows are built without a k x k identity
    eyes = []
    real_eye = torch.eye
    monkeypatch.setattr(torch, "eye", lambda *a, **k: eyes.append(a) or real_eye(*a, **k))
    wrap(nn.Sequential(MatmulLinear(4096, 2)), FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["0"]))
    assert not any(a and a[0] >= 4096 for a in eyes), eyes


def test_a_modules_to_save_weight_over_part_of_a_base_weight_stays_frozen():
    # a transposed tie: the exact-key lookup missed it and trained the frozen base weight in place
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(4, 6, bias=False), "emb": nn.Embedding(4, 6)})
    model["emb"].weight = nn.Parameter(model["proj"].weight.detach().t())
    with pytest.warns(UserWarning) as caught:
        wrap(model, FlexLoRAConfig(r_init=1, r_max=2, alpha=1.0, target_modules=["proj"], modules_to_save=["emb"]))
    assert not model["emb"].weight.requires_grad
    assert any("'emb.weight' stays frozen" in str(w.message) and "'proj'" in str(w.message) for w in caught)


@pytest.mark.parametrize("bad, got", [(None, "NoneType"), (nn.Sequential, "the class Sequential"), ("model", "str")])
def test_a_model_that_is_not_a_module_instance_is_refused_by_name(bad, got):
    with pytest.raises(TypeError, match=f"wrap: model must be an nn.Module instance, got {got}"):
        wrap(bad, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["fc"]))


@pytest.mark.parametrize("root", [False, True])
def test_a_linear_compiled_on_its_own_is_refused_before_anything_changes(root):
    # torch.compile(nn.Linear) keeps calling the Linear it was built from: a FlexLinear put in
    # its _orig_mod never ran (the output stayed the base's and P, Q got no gradient)
    compiled = torch.compile(nn.Linear(8, 4), backend="eager")
    model = compiled if root else nn.Sequential(nn.Linear(8, 8), compiled)
    target = "_orig_mod" if root else "1._orig_mod"
    with pytest.raises(ValueError, match=re.escape(f"wrap: module {target!r} is the Linear inside a torch.compile'd "
                                                   f"module ({'the model itself' if root else repr('1')})")):
        wrap(model, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["_orig_mod"]))
    assert not any(isinstance(m, FlexLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_compiled_whole_after_wrap_runs_the_adapters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    wrap(model, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["0", "2"]))
    for _, m in flex_modules(model):
        with torch.no_grad():
            m.lam.fill_(1.0)
    x = torch.randn(3, 8)
    want = model(x)
    got = torch.compile(model, backend="eager")(x)
    assert torch.allclose(got, want) and not torch.allclose(got, model[2].weight.new_zeros(()) + F.linear(
        F.relu(F.linear(x, model[0].weight, model[0].bias)), model[2].weight, model[2].bias))
