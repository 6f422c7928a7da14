"""wrap / flex_modules / count_parameters on the three model families, built from small configs."""

import pytest
import torch
import torch.nn as nn
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


FAMILIES = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], [], 14),
    "bert": (tiny_bert, ["query", "key", "value", "attention.output.dense"], ["classifier"], 8),
    "vit": (tiny_vit, ["q_proj", "v_proj"], ["classifier"], 4),
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


def test_modules_to_save_no_match_is_error():
    model, _ = tiny_bert()
    with pytest.raises(ValueError, match="modules_to_save"):
        wrap(model, FlexLoRAConfig(target_modules=["query"], modules_to_save=["head_that_is_not_there"]))


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
