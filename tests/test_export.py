"""export_peft: the folder loads with peft.PeftModel.from_pretrained without missing/unexpected keys
and reproduces FlexLoRA's outputs, with per-module ranks (incl. layers.1 vs layers.11), rank-0
modules skipped with a warning, and modules_to_save."""

import copy
import json
import re
import warnings

import peft  # a test extra (setup.py extras_require["test"]), not a runtime dependency of flexlora
import pytest
import safetensors.torch
import torch
import torch.nn as nn
from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification

from flexlora import FlexLoRAConfig, export_peft, flex_modules, wrap
from _tiny_hf import llama_model

TARGETS = ["q_proj", "v_proj", "down_proj"]



def llama(layers=12):
    return llama_model(layers=layers).eval()


def flex_config(**kw):
    args = dict(r_init=3, r_max=6, alpha=8.0, target_modules=TARGETS, total_steps=100, t_warmup=1, t_final=0)
    args.update(kw)
    return FlexLoRAConfig(**args)


def randomize(model, zero_rank=()):
    """Distinct rank per module (1..r_max, cycling), random slots, random λ; ranks 0 where asked."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, (name, m) in enumerate(flex_modules(model)):
            m.P.normal_(std=0.3, generator=g)
            m.Q.normal_(std=0.3, generator=g)
            m.lam.normal_(generator=g)
            r = 0 if i in zero_rank else 1 + (i + i // 3) % m.r_max
            mask = torch.zeros(m.r_max, dtype=torch.bool)
            mask[torch.randperm(m.r_max, generator=g)[:r]] = True
            m.mask.copy_(mask)
    return model


def load_peft(base, directory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base, str(directory)).eval()
    bad = [str(w.message) for w in caught if re.search(r"missing|unexpected", str(w.message), re.I)]
    assert not bad, f"PEFT reported key problems: {bad}"
    saved = set(safetensors.torch.load_file(str(directory / "adapter_model.safetensors")))
    expected = set(peft.get_peft_model_state_dict(pm))
    assert saved == expected, f"missing {sorted(expected - saved)[:4]}, unexpected {sorted(saved - expected)[:4]}"
    return pm


def test_llama_varied_ranks_reproduces_outputs(tmp_path):
    base = llama()
    model = randomize(wrap(copy.deepcopy(base), flex_config()), zero_rank={4})
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
        plain = base(ids).logits
    with pytest.warns(UserWarning, match=r"rank 0.*'model\.layers\.1\.self_attn\.v_proj'"):
        info = export_peft(model, tmp_path)
    assert info["skipped_rank0"] == ["model.layers.1.self_attn.v_proj"]

    pm = load_peft(base, tmp_path)
    with torch.no_grad():
        got = pm(ids).logits
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"PEFT output differs from FlexLoRA by {err}"
    assert (want - plain).abs().max().item() > 1e-2, "adapters too small for the check to mean anything"

    # every module got its own rank (layers.1.* vs layers.11.* differ) and scaling alpha/r == 1
    ranks = {n: m.rank for n, m in flex_modules(model)}
    assert ranks["model.layers.1.self_attn.q_proj"] != ranks["model.layers.11.self_attn.q_proj"]
    seen = 0
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            assert mod.r["default"] == ranks[name], name
            assert mod.scaling["default"] == 1.0, name
            seen += 1
    assert seen == sum(r > 0 for r in ranks.values())
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    exported = [n for n, r in ranks.items() if r > 0]
    assert all(re.fullmatch(cfg["target_modules"], n) for n in exported)
    assert not re.fullmatch(cfg["target_modules"], "model.layers.1.self_attn.v_proj")
    # one rank_pattern key per rank value, not per module: past 512 modules one key each thrashed
    # Python's regex cache inside PEFT (111 s to load 1 120 modules)
    assert len(cfg["rank_pattern"]) == len({r for r in ranks.values() if r > 0}) <= 6 < len(exported)
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]


def test_rank0_module_named_like_a_suffix_of_an_exported_one_stays_plain(tmp_path):
    # "1.0" ends with ".0", the name of an exported module: a list entry "0" would give it a LoRA
    # layer in PEFT (and a missing-key warning); the full-name regex does not
    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))

    model = wrap(base(), FlexLoRAConfig(r_init=2, r_max=4, alpha=4.0, target_modules=["0"], total_steps=10,
                                        t_warmup=1, t_final=0, r_min=0))
    assert [n for n, _ in flex_modules(model)] == ["0", "1.0"]
    with torch.no_grad():
        model[0].lam[:2] = torch.tensor([0.7, -1.3])
        model[0].P.normal_()
        model[1][0].mask.zero_()
    with pytest.warns(UserWarning, match=r"rank 0.*'1\.0'"):
        export_peft(model, tmp_path, task_type=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing-key warning from PEFT
        pm = peft.PeftModel.from_pretrained(base(), tmp_path)
    lora = [n for n, m in pm.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert lora == ["0"]
    x = torch.randn(5, 8)
    m0, m1 = model[0], model[1][0]
    g = m0.lam.double() * m0.mask.double() * m0.scaling
    w0 = m0.weight.double() + m0.P.double() @ torch.diag(g) @ m0.Q.double()  # ΔW in float64, by hand
    want = (x.double() @ w0.t() + m0.bias.double()) @ m1.weight.double().t() + m1.bias.double()
    with torch.no_grad():
        got = pm(x)
    assert (got.double() - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["adapter-dtype", "bf16"])
def test_weights_are_active_slots_with_scaled_lambda_folded(tmp_path, dtype):
    model = randomize(wrap(llama(layers=2), flex_config()))
    export_peft(model, tmp_path, dtype=dtype)
    t = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {v.dtype for v in t.values()} == {dtype or torch.float32}
    tol = dict(rtol=2 ** -8, atol=1e-30) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
    for name, m in flex_modules(model):
        active = [j for j in range(m.r_max) if m.mask[j]]
        A = t[f"base_model.model.{name}.lora_A.weight"].double()
        B = t[f"base_model.model.{name}.lora_B.weight"].double()
        assert A.shape == (len(active), m.in_features) and B.shape == (m.out_features, len(active))
        for i, j in enumerate(active):
            exact_a = dict(rtol=0, atol=0) if dtype is None else tol
            torch.testing.assert_close(A[i], m.Q[j].double(), **exact_a)
            torch.testing.assert_close(B[:, i], m.P[:, j].double() * m.lam[j].double() * m.scaling, **tol)


@pytest.mark.parametrize("save_head", [True, False], ids=["modules_to_save-classifier", "no-modules_to_save"])
def test_bert_with_modules_to_save(tmp_path, save_head):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=32, num_labels=3)
    base = BertForSequenceClassification(cfg).eval()
    heads = ["classifier"] if save_head else []
    model = randomize(wrap(copy.deepcopy(base), flex_config(target_modules=["query", "value"], modules_to_save=heads)))
    if save_head:
        with torch.no_grad():
            model.classifier.weight.add_(0.5)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    export_peft(model, tmp_path)
    pm = load_peft(base, tmp_path)
    with torch.no_grad():
        got = pm(ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    # PEFT's SEQ_CLS wrapper trains "classifier" by itself: exported either way, so no missing keys
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]


@pytest.mark.parametrize("cls, head", [(BertForTokenClassification, "classifier"), (BertForQuestionAnswering, "qa_outputs")],
                         ids=["TOKEN_CLS", "QUESTION_ANS"])
def test_token_classification_and_qa_heads_are_exported(tmp_path, cls, head):
    # PEFT's TOKEN_CLS and QUESTION_ANS models add their heads to modules_to_save themselves and
    # expect their weights: the folder failed with KeyError 'base_model.model.<head>.weight'
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=32, num_labels=2)  # QA: start, end
    base = cls(cfg).eval()
    model = randomize(wrap(copy.deepcopy(base), flex_config(target_modules=["query", "value"])))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids)
    export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == [head]
    pm = load_peft(base, tmp_path)
    with torch.no_grad():
        got = pm(ids)
    for key in ("logits", "start_logits", "end_logits"):
        if key in want:
            assert (got[key] - want[key]).abs().max().item() <= 1e-5, key


def test_shared_linear_export_warns_that_peft_adapts_one_name(tmp_path):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(8, 8)
            self.dec = self.enc

        def forward(self, x):
            return self.dec(torch.relu(self.enc(x)))

    model = randomize(wrap(Shared(), flex_config(target_modules=["enc"])))
    with pytest.warns(UserWarning, match=r"first: 'enc' as 'dec'.*without the adapter in PEFT"):
        export_peft(model, tmp_path / "shared", task_type=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no alias: no warning
        export_peft(randomize(wrap(llama(layers=1), flex_config())), tmp_path / "plain")


def test_tied_embeddings_in_modules_to_save_export_and_load_in_peft(tmp_path):
    base = llama_model(layers=2, tie_word_embeddings=True).eval()
    model = randomize(wrap(copy.deepcopy(base), flex_config(modules_to_save=["embed_tokens", "lm_head"])))
    with torch.no_grad():
        model.lm_head.weight.normal_(generator=torch.Generator().manual_seed(9))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank-0 notes
        export_peft(model, tmp_path)  # safetensors refused the shared memory before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        err = (pm(ids).logits - want).abs().max().item()
    assert err <= 1e-5, err


def test_export_rejects_merged_and_all_rank_zero(tmp_path):
    from flexlora.merging import merge

    model = randomize(wrap(llama(layers=2), flex_config()))
    merge(model)
    with pytest.raises(ValueError, match="merged"):
        export_peft(model, tmp_path / "a")
    model = wrap(llama(layers=2), flex_config())
    with torch.no_grad():
        for _, m in flex_modules(model):
            m.mask.zero_()
    with pytest.raises(ValueError, match="rank 0"):
        export_peft(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def merged_reference(m):
    """W + s·P·diag(λ⊙mask)·Q in float64, written from the math."""
    g = m.lam.double() * m.mask.double() * m.scaling
    return m.weight.double() + m.P.double() @ torch.diag(g) @ m.Q.double()


def test_flex_linear_inside_modules_to_save_is_written_merged(tmp_path):
    # PEFT loads a modules_to_save module's full state into a plain copy of the base module: the
    # FlexLinear inside it must be written as a plain linear with its ΔW folded in
    base = llama(layers=2)
    model = randomize(wrap(copy.deepcopy(base), flex_config(target_modules=["q_proj", "down_proj"],
                                                            modules_to_save=["layers.1.mlp"])))
    inner = model.model.layers[1].mlp.down_proj
    assert inner.rank > 0
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
    info = export_peft(model, tmp_path)
    assert info["merged_into_modules_to_save"] == ["model.layers.1.mlp.down_proj"]
    assert "model.layers.1.mlp.down_proj" not in info["rank_pattern"]
    t = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    w = t["base_model.model.model.layers.1.mlp.down_proj.weight"]
    with torch.no_grad():
        ref = merged_reference(inner)
    err = (w.double() - ref).abs().max().item()
    assert w.dtype == torch.float32 and err <= 1e-6 * ref.abs().max().item(), f"merged W off by {err}"
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not re.fullmatch(cfg["target_modules"], "model.layers.1.mlp.down_proj")

    pm = load_peft(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        got = pm(ids).logits
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"PEFT output differs from FlexLoRA by {err}"


def test_flex_linear_seq_cls_head_is_exported_merged(tmp_path):
    # PEFT's SEQ_CLS wrapper adds "classifier" to modules_to_save and needs its weight: an adapted
    # classifier head goes there merged (DistilBERT: "pre_classifier" matches too)
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=64, dim=32, hidden_dim=40, n_layers=2, n_heads=4,
                           max_position_embeddings=32, num_labels=3)
    base = DistilBertForSequenceClassification(cfg).eval()
    model = randomize(wrap(copy.deepcopy(base), flex_config(target_modules=["q_lin", "classifier"])))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        plain = base(ids).logits
    assert (want - plain).abs().max() > 1e-3, "the premise: the head's adapter changes the output"
    info = export_peft(model, tmp_path)
    assert info["merged_into_modules_to_save"] == ["classifier"]
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(written["modules_to_save"]) == ["classifier", "pre_classifier"]
    pm = load_peft(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        got = pm(ids).logits
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"PEFT output differs from FlexLoRA by {err}"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task_type="causal_lm"), r"task_type must be .*'CAUSAL_LM'.*got 'causal_lm' \(did you mean 'CAUSAL_LM'\?\)"),
        (dict(task_type="LM"), r"task_type must be"),
        (dict(dtype="bfloat16"), r"dtype must be None or a floating torch\.dtype.*got 'bfloat16'"),
        (dict(dtype=torch.int8), r"dtype must be None or a floating torch\.dtype.*torch\.int8"),
    ],
    ids=["task_type-lowercase", "task_type-unknown", "dtype-str", "dtype-int8"],
)
def test_bad_task_type_or_dtype_is_an_error_before_writing(tmp_path, kwargs, match):
    model = randomize(wrap(llama(layers=2), flex_config()))
    with pytest.raises(ValueError, match=match):
        export_peft(model, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_task_type_given_as_peft_enum_loads(tmp_path):
    base = llama(layers=2)
    model = randomize(wrap(copy.deepcopy(base), flex_config()))
    export_peft(model, tmp_path, task_type=peft.TaskType.CAUSAL_LM)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    load_peft(base, tmp_path)


def test_a_hand_unfrozen_parameter_that_is_not_exported_warns(tmp_path):
    # a norm unfrozen outside modules_to_save trains, but the PEFT folder does not hold it
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=32, num_labels=3)
    model = randomize(wrap(BertForSequenceClassification(cfg), flex_config(target_modules=["query", "value"])))
    model.classifier.requires_grad_(True)  # PEFT's SEQ_CLS exports it by itself: not left out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_peft(model, tmp_path / "a")
    model.bert.embeddings.LayerNorm.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"export_peft: 1 trainable parameter \('bert\.embeddings\.LayerNorm\.weight'\) is neither"):
        export_peft(model, tmp_path / "b")


def test_a_trained_bias_of_an_adapted_head_that_is_exported_merged_does_not_warn(tmp_path):
    # the SEQ_CLS head is itself adapted; PEFT's auto modules_to_save writes it merged, bias included
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                     num_attention_heads=4, max_position_embeddings=32, num_labels=3)
    model = randomize(wrap(BertForSequenceClassification(cfg),
                           flex_config(target_modules=["query", "value", "classifier"])))
    model.classifier.bias.requires_grad_(True)
    with torch.no_grad():
        model.classifier.bias.fill_(7.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_peft(model, tmp_path)
    saved = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.model.classifier.bias"], torch.full((3,), 7.0))


def test_a_module_name_that_is_a_dotted_suffix_of_another_keeps_its_own_rank(tmp_path):
    # "0" is also the tail of "1.0": a rank_pattern key that PEFT could match as a suffix would
    # give "1.0" the rank of "0" (PEFT then failed: size mismatch [3, 8] vs [2, 8])
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8))).eval()
    model = wrap(copy.deepcopy(base), flex_config(target_modules=["0"], r_init=2, r_max=4))
    with torch.no_grad():
        for name, m in flex_modules(model):
            m.P.normal_(std=0.3)
            m.Q.normal_(std=0.3)
            m.lam.normal_()
            m.mask.copy_(torch.tensor([True, True, False, False] if name == "0" else [True, True, True, False]))
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
    info = export_peft(model, tmp_path, task_type=None)
    assert info["rank_pattern"] == {"0": 2, "1.0": 3}
    pm = load_peft(base, tmp_path)
    with torch.no_grad():
        assert (pm(x) - want).abs().max().item() <= 1e-5
