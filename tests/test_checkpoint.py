"""save_adapter / load_adapter: exact round trip of variable-rank adapters, first-mismatch errors,
atomic saves that survive injected failures, clear errors on bad directories."""

import copy
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import BertConfig, BertForSequenceClassification

import flexlora
from flexlora import FlexLoRAConfig, flex_modules, load_adapter, save_adapter, wrap
from flexlora.checkpoint import ALLOCATOR_NAME, CONFIG_NAME, WEIGHTS_NAME
from _tiny_hf import llama_model

TARGETS = ["q_proj", "v_proj", "down_proj"]



def base_llama(hidden=32, layers=2):
    return llama_model(layers=layers, hidden=hidden).eval()


def adapter_config(**kw):
    args = dict(r_init=3, r_max=6, alpha=8.0, target_modules=TARGETS, total_steps=100, t_warmup=1, t_final=0)
    args.update(kw)
    return FlexLoRAConfig(**args)


def randomize(model, seed=1):
    """Trained-looking adapters: random λ, P, Q; masks with ranks 0, r_max and in between."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (_, m) in enumerate(flex_modules(model)):
            m.P.normal_(generator=g)
            m.Q.normal_(generator=g)
            m.lam.normal_(generator=g)
            mask = torch.rand(m.r_max, generator=g) < 0.5
            if i == 0:
                mask[:] = False  # rank 0
            if i == 1:
                mask[:] = True  # rank r_max
            m.mask.copy_(mask)
    return model


def trained_llama(seed=1, **kw):
    return randomize(wrap(base_llama(), adapter_config(**kw)), seed)


def adapter_state(model):
    return {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in flex_modules(model) for k in ("P", "lam", "Q", "mask")}


def file_bytes(d):
    return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("prewrapped", [False, True], ids=["base-model-wrapped-by-load", "prewrapped"])
def test_round_trip_restores_buffers_masks_and_outputs(tmp_path, prewrapped):
    model = trained_llama()
    save_adapter(model, tmp_path / "ad")
    fresh = base_llama()
    if prewrapped:
        wrap(fresh, adapter_config())
    out = load_adapter(fresh, tmp_path / "ad")
    assert out is fresh
    want, got = adapter_state(model), adapter_state(fresh)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k} differs after load"
    ranks = [m.rank for _, m in flex_modules(fresh)]
    assert ranks == [m.rank for _, m in flex_modules(model)] and 0 in ranks and 6 in ranks
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, fresh(IDS).logits)
    assert fresh.flexlora_config.to_dict() == model.flexlora_config.to_dict()


def test_config_json_records_ranks_shapes_and_version(tmp_path):
    model = trained_llama()
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["flexlora_version"] == flexlora.__version__
    assert meta["r_max"] == 6 and meta["config"] == model.flexlora_config.to_dict()
    mods = flex_modules(model)
    assert list(meta["modules"]) == [n for n, _ in mods]
    for n, m in mods:
        info = meta["modules"][n]
        assert (info["rank"], info["in_features"], info["out_features"]) == (m.rank, m.in_features, m.out_features)
        assert info["scaling"] == pytest.approx(8.0 / 3)
    assert meta["total_rank"] == sum(m.rank for _, m in mods)
    tensors = safetensors.torch.load_file(str(tmp_path / WEIGHTS_NAME))
    assert tensors["model.layers.0.self_attn.q_proj.P"].shape == (32, 6)  # full r_max buffer
    assert tensors["model.layers.0.self_attn.q_proj.mask"].dtype == torch.bool


def _tiny_bert_classifier():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=32, num_labels=3)
    base_sd = BertForSequenceClassification(cfg).state_dict()

    def fresh():
        m = BertForSequenceClassification(cfg).eval()
        m.load_state_dict(base_sd)
        return m

    return fresh


def test_modules_to_save_round_trip_bert(tmp_path):
    fresh = _tiny_bert_classifier()
    fc = adapter_config(target_modules=["query", "value"], modules_to_save=["classifier"])
    model = randomize(wrap(fresh(), fc))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    save_adapter(model, tmp_path)
    loaded = load_adapter(fresh(), tmp_path)
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_flexlinear_inside_a_saved_module_is_saved_once_without_its_base_weight(tmp_path):
    """The pooler is in modules_to_save and its dense layer is a FlexLinear: the save holds that
    layer's slots (under its own name) and the classifier, never the frozen pooler weight (a
    base-model tensor), and the round trip reproduces the logits bit for bit."""
    fresh = _tiny_bert_classifier()
    fc = adapter_config(target_modules=["query", "pooler.dense"], modules_to_save=["pooler", "classifier"])
    model = randomize(wrap(fresh(), fc))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    save_adapter(model, tmp_path)
    keys = set(safetensors.torch.load_file(tmp_path / WEIGHTS_NAME))
    assert {k for k in keys if "pooler" in k} == {f"bert.pooler.dense.{t}" for t in ("P", "lam", "Q", "mask")}, keys
    assert {k for k in keys if k.startswith("modules_to_save.")} == {
        "modules_to_save.classifier.weight", "modules_to_save.classifier.bias"}, keys
    loaded = load_adapter(fresh(), tmp_path)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert torch.equal(loaded.bert.pooler.dense.weight, fresh().bert.pooler.dense.weight)


def test_failed_load_puts_modules_to_save_back(tmp_path):
    """A load that fails after the copy (here the optimizer's state) puts back what it copied into
    modules_to_save tensors, not only the adapter slots."""
    fresh = _tiny_bert_classifier()
    fc = adapter_config(target_modules=["query", "value"], modules_to_save=["classifier"])
    model = randomize(wrap(fresh(), fc))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    with pytest.raises(ValueError, match=r"holds no optimizer state, but load_checkpoint was given optimizer=\.\.\.: pass "
                                         r"optimizer=None, or save with save_checkpoint\(\.\.\., optimizer=\.\.\.\)"):
        flexlora.save_checkpoint(tmp_path / "no-opt", model)
        flexlora.load_checkpoint(tmp_path / "no-opt", model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    params = [p for p in model.parameters() if p.requires_grad]
    flexlora.save_checkpoint(tmp_path / "c", model, optimizer=torch.optim.SGD(params, lr=0.1))
    other = randomize(wrap(fresh(), fc), seed=7)
    weight_before, state_before = other.classifier.weight.detach().clone(), adapter_state(other)
    assert not torch.equal(weight_before, model.classifier.weight)

    class Broken(torch.optim.SGD):
        def load_state_dict(self, sd):
            raise RuntimeError("optimizer state does not fit")

    opt = Broken([p for p in other.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(RuntimeError, match="does not fit"):
        flexlora.load_checkpoint(tmp_path / "c", other, optimizer=opt)
    assert torch.equal(other.classifier.weight, weight_before)
    assert all(torch.equal(v, adapter_state(other)[k]) for k, v in state_before.items())


def test_a_model_built_from_flexlinear_layers_saves_once_it_carries_a_config(tmp_path):
    """No wrap: FlexLinear layers used directly. save / load / export say what to set, and with
    model.flexlora_config set the adapter round-trips exactly."""
    from flexlora import FlexLinear

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(FlexLinear(6, 8, r_max=4, r_init=2, alpha=4.0), torch.nn.ReLU(),
                                   FlexLinear(8, 3, r_max=4, r_init=2, alpha=4.0))

    model = build()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lam.normal_()
            layer.mask[3] = True
    hint = r"FlexLinear modules \(\['0', '2'\]\) but no model.flexlora_config: set " \
           r"model.flexlora_config = FlexLoRAConfig\(.*target_modules=\['0', '2'\]"
    for call in (lambda: save_adapter(model, tmp_path / "a"), lambda: flexlora.export_peft(model, tmp_path / "p")):
        with pytest.raises(ValueError, match=hint):
            call()
    cfg = FlexLoRAConfig(r_init=2, r_max=4, alpha=4.0, target_modules=["0", "2"])
    model.flexlora_config = cfg
    save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match=hint):
        load_adapter(build(), tmp_path / "a")
    fresh = build()
    fresh.flexlora_config = cfg
    load_adapter(fresh, tmp_path / "a")
    x = torch.randn(5, 6)
    assert torch.equal(fresh(x), model(x)) and fresh[2].rank == 3


# ---------------------------------------------------------------------------------- mismatches


def test_mismatch_other_base_model_names_first_module(tmp_path):
    save_adapter(trained_llama(), tmp_path)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*\[out, in\] = \[32, 32\].*\[48, 48\]"):
        load_adapter(wrap(base_llama(hidden=48), adapter_config()), tmp_path)


def test_mismatch_missing_module(tmp_path):
    save_adapter(trained_llama(), tmp_path)
    model = wrap(base_llama(), adapter_config(target_modules=["q_proj", "down_proj"]))
    with pytest.raises(ValueError, match=r"saved module 'model\.layers\.0\.self_attn\.v_proj' has no FlexLinear"):
        load_adapter(model, tmp_path)


def test_mismatch_unexpected_module(tmp_path):
    save_adapter(trained_llama(), tmp_path)
    model = wrap(base_llama(), adapter_config(target_modules=TARGETS + ["k_proj"]))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj' is not in the save \(unexpected"):
        load_adapter(model, tmp_path)


def test_mismatch_r_max(tmp_path):
    save_adapter(trained_llama(), tmp_path)
    model = wrap(base_llama(), adapter_config(r_max=8))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj' was saved with r_max=6.*r_max=8"):
        load_adapter(model, tmp_path)


def test_mismatch_scaling(tmp_path):
    save_adapter(trained_llama(), tmp_path)
    model = wrap(base_llama(), adapter_config(alpha=16.0))
    with pytest.raises(ValueError, match=r"scaling"):
        load_adapter(model, tmp_path)


def test_failed_load_leaves_model_untouched(tmp_path):
    save_adapter(trained_llama(seed=1), tmp_path)
    model = trained_llama(seed=2, target_modules=TARGETS + ["k_proj"])
    before = adapter_state(model)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj' is not in the save"):
        load_adapter(model, tmp_path)
    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_failed_load_with_another_allocator_seed_leaves_model_untouched(tmp_path):
    model = trained_llama(seed=1)
    save_adapter(model, tmp_path, allocator=flexlora.RankAllocator(model))
    other = trained_llama(seed=2)
    alloc = flexlora.RankAllocator(other, FlexLoRAConfig.from_dict({**other.flexlora_config.to_dict(), "seed": 5}))
    before = adapter_state(other)
    with pytest.raises(ValueError, match=r"seed"):
        load_adapter(other, tmp_path, allocator=alloc)
    after = adapter_state(other)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_failed_load_with_another_importance_metric_leaves_model_and_allocator_untouched(tmp_path):
    model = trained_llama(seed=1)
    alloc = flexlora.RankAllocator(model)  # entropy
    for step in (1, 2, 3):
        alloc.step(step)
    save_adapter(model, tmp_path, allocator=alloc)
    other = trained_llama(seed=2, importance="sensitivity")
    alloc2 = flexlora.RankAllocator(other)
    before, alloc_before = adapter_state(other), alloc2.state_dict()
    with pytest.raises(ValueError, match=r"importance='sensitivity'.*'entropy'"):
        load_adapter(other, tmp_path, allocator=alloc2)
    after = adapter_state(other)
    assert all(torch.equal(before[k], after[k]) for k in before)
    state = alloc2.state_dict()
    assert state["last_step"] == alloc_before["last_step"] == 0 and state["history"] == alloc_before["history"]
    assert state["num_events"] == 0 and state["importance"]["name"] == "sensitivity"


def test_failed_load_into_a_plain_model_leaves_it_plain(tmp_path):
    save_adapter(trained_llama(), tmp_path)
    plain = base_llama(hidden=48)  # same module names, other shapes: wrap succeeds, the check fails
    flags = {n: p.requires_grad for n, p in plain.named_parameters()}
    linears = {n: m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    with pytest.raises(ValueError, match=r"\[32, 32\].*\[48, 48\]"):
        load_adapter(plain, tmp_path)
    assert not flex_modules(plain) and not hasattr(plain, "flexlora_config")
    assert {n: m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)} == linears
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags


def test_failed_load_puts_a_linear_back_under_each_of_its_names(tmp_path):
    class Shared(torch.nn.Module):  # one Linear registered as both enc and dec
        def __init__(self, out=8):
            super().__init__()
            self.enc = torch.nn.Linear(8, 8)
            self.dec = self.enc
            self.out = torch.nn.Linear(8, out)

    model = Shared()
    wrap(model, FlexLoRAConfig(r_init=2, r_max=4, target_modules=["enc", "out"]))
    save_adapter(model, tmp_path / "a")
    plain = Shared(out=9)  # 'out' has another shape: wrap succeeds, the check fails
    enc = plain.enc
    with pytest.raises(ValueError, match="'out'"):
        load_adapter(plain, tmp_path / "a")
    assert plain.enc is enc and plain.dec is enc and not flex_modules(plain)


# ---------------------------------------------------------------------------------- atomic saves


def test_saved_folders_and_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from flexlora.alloc.history import write_history_csv

    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    old = os.umask(0o022)
    try:
        model = trained_llama()
        save_adapter(model, tmp_path / "new")  # tempfile would leave it 0700
        assert mode(tmp_path / "new") == 0o755
        assert mode(tmp_path / "new" / WEIGHTS_NAME) == 0o644
        (tmp_path / "kept").mkdir(mode=0o750)
        os.chmod(tmp_path / "kept", 0o750)
        save_adapter(model, tmp_path / "kept")  # a re-save keeps the folder's own mode
        save_adapter(model, tmp_path / "kept")
        assert mode(tmp_path / "kept") == 0o750
        csv_path = write_history_csv([], tmp_path / "ranks.csv")  # mkstemp would leave it 0600
        assert mode(csv_path) == 0o644
    finally:
        os.umask(old)



def _partial_then_fail(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\x00" * 100)  # a torn file
    raise OSError(28, "No space left on device (injected)")


def _json_partial_then_fail(obj, f, **kw):
    f.write('{"config": {')  # the weights file is already complete in the temporary folder
    raise RuntimeError("interrupted while writing the config (injected)")


@pytest.mark.parametrize("where", ["safetensors-write", "json-write-after-weights"])
def test_failed_save_keeps_previous_save(tmp_path, monkeypatch, where):
    target = tmp_path / "adapter"
    old_model = trained_llama(seed=1)
    save_adapter(old_model, target)
    (target / "notes.txt").write_text("user file")
    old = file_bytes(target)

    new_model = trained_llama(seed=2)
    if where == "safetensors-write":
        monkeypatch.setattr(safetensors.torch, "save_file", _partial_then_fail)
        with pytest.raises(OSError, match="injected"):
            save_adapter(new_model, target)
    else:
        monkeypatch.setattr(json, "dump", _json_partial_then_fail)
        with pytest.raises(RuntimeError, match="injected"):
            save_adapter(new_model, target)
    monkeypatch.undo()

    assert file_bytes(target) == old, "previous save was modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "temporary directory left behind"
    loaded = load_adapter(base_llama(), target)
    want = adapter_state(old_model)
    assert all(torch.equal(v, adapter_state(loaded)[k]) for k, v in want.items())


@pytest.mark.parametrize("swap", ["renameat2-exchange", "two-renames"])
def test_resave_replaces_flexlora_files_and_keeps_other_files(tmp_path, monkeypatch, swap):
    import flexlora._atomic as atomic

    if swap == "two-renames":  # the path taken where renameat2 is missing (not Linux, old libc)
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    save_adapter(trained_llama(seed=1), tmp_path / "ad", allocator=None)
    (tmp_path / "ad" / ALLOCATOR_NAME).write_bytes(b"stale")
    (tmp_path / "ad" / "notes.txt").write_text("keep me")
    new = trained_llama(seed=2)
    save_adapter(new, tmp_path / "ad")
    assert (tmp_path / "ad" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "ad" / ALLOCATOR_NAME).exists(), "stale allocator state of an older save kept"
    loaded = load_adapter(base_llama(), tmp_path / "ad")
    assert torch.equal(adapter_state(loaded)["model.layers.1.mlp.down_proj.lam"],
                       adapter_state(new)["model.layers.1.mlp.down_proj.lam"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"], "backup or temporary folder left behind"


def test_allocator_state_sidecar_round_trip(tmp_path):
    class Alloc:
        def __init__(self, v):
            self.state = {"step": v, "history": [{"step": v, "module": "a", "rank": 3, "score": 0.5}]}

        def state_dict(self):
            return copy.deepcopy(self.state)

        def load_state_dict(self, sd):
            self.state = sd

    save_adapter(trained_llama(), tmp_path, allocator=Alloc(7))
    assert (tmp_path / ALLOCATOR_NAME).is_file()
    fresh = Alloc(0)
    load_adapter(base_llama(), tmp_path, allocator=fresh)
    assert fresh.state == Alloc(7).state
    save_adapter(trained_llama(), tmp_path / "no_alloc")
    with pytest.raises(FileNotFoundError, match=r"allocator_state\.pt"):
        load_adapter(base_llama(), tmp_path / "no_alloc", allocator=Alloc(0))


# ---------------------------------------------------------------------------------- bad input


def test_unwritable_target_names_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for target in (blocker / "adapter", blocker / "deeper" / "adapter"):  # a file where a folder must be
        with pytest.raises(NotADirectoryError, match=r"'.*a_file' is a file, not a directory"):
            save_adapter(trained_llama(), target)
    with pytest.raises(NotADirectoryError, match="a_file"):
        save_adapter(trained_llama(), blocker)
    assert blocker.read_text() == "x"


def test_read_only_parent_names_path(tmp_path, monkeypatch):
    # root ignores permission bits, so a read-only folder is simulated at the access check
    import flexlora._atomic as atomic

    ro = tmp_path / "read_only"
    ro.mkdir()
    monkeypatch.setattr(atomic.os, "access", lambda path, mode: Path(path) != ro)
    with pytest.raises(PermissionError, match=r"read_only.*not writable"):
        save_adapter(trained_llama(), ro / "adapter")
    assert list(ro.iterdir()) == []


def test_symlinked_target_and_working_directory(tmp_path, monkeypatch):
    real = tmp_path / "real"
    save_adapter(trained_llama(seed=1), real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    new = trained_llama(seed=2)
    save_adapter(new, link)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert torch.equal(adapter_state(load_adapter(base_llama(), real))["model.layers.0.mlp.down_proj.lam"],
                       adapter_state(new)["model.layers.0.mlp.down_proj.lam"])
    monkeypatch.chdir(real)
    with pytest.raises(ValueError, match="current working directory"):
        save_adapter(new, ".")
    # the working directory reached through a symlinked folder above it: refused as well (a
    # save replaces its target folder as a whole, which would delete the working directory)
    (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError, match="current working directory"):
        save_adapter(new, tmp_path / "alias" / "real")
    assert (real / CONFIG_NAME).is_file() and Path.cwd().resolve() == real.resolve()


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_adapter(base_llama(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*flexlora_config\.json"):
        load_adapter(base_llama(), tmp_path / "empty")

    save_adapter(trained_llama(), tmp_path / "bad_json")
    (tmp_path / "bad_json" / CONFIG_NAME).write_text('{"config": ')
    with pytest.raises(ValueError, match=r"bad_json.*flexlora_config\.json.*corrupt"):
        load_adapter(base_llama(), tmp_path / "bad_json")

    save_adapter(trained_llama(), tmp_path / "bad_weights")
    w = tmp_path / "bad_weights" / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"bad_weights.*adapter_model\.safetensors.*corrupt"):
        load_adapter(base_llama(), tmp_path / "bad_weights")

    save_adapter(trained_llama(), tmp_path / "no_weights")
    (tmp_path / "no_weights" / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"no_weights.*adapter_model\.safetensors"):
        load_adapter(base_llama(), tmp_path / "no_weights")


def test_a_refused_object_gets_the_weights_only_hint_and_garbage_does_not(tmp_path):
    model = trained_llama()
    alloc = flexlora.RankAllocator(model)
    save_adapter(model, tmp_path / "a", allocator=alloc)
    torch.save({"not": _Opaque()}, tmp_path / "a" / ALLOCATOR_NAME)  # an object weights_only refuses
    with pytest.raises(ValueError, match=r"(?s)allocator_state\.pt.*if you trust the file, pass weights_only=False"):
        load_adapter(trained_llama(), tmp_path / "a", allocator=flexlora.RankAllocator(trained_llama()))
    (tmp_path / "a" / ALLOCATOR_NAME).write_bytes(b"garbage bytes")
    with pytest.raises(ValueError, match=r"allocator_state\.pt.*corrupt") as info:
        load_adapter(trained_llama(), tmp_path / "a", allocator=flexlora.RankAllocator(trained_llama()))
    assert "weights_only=False" not in str(info.value)


class _Opaque:
    pass


def test_tied_embeddings_both_in_modules_to_save_round_trip(tmp_path):
    def tied():
        return wrap(llama_model(tie_word_embeddings=True).eval(),
                    adapter_config(modules_to_save=["embed_tokens", "lm_head"]))

    model = randomize(tied())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight.normal_(generator=torch.Generator().manual_seed(9))  # trained embedding
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    save_adapter(model, tmp_path / "a")  # safetensors refused the shared memory before
    saved = safetensors.torch.load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    emb, head = saved["modules_to_save.model.embed_tokens.weight"], saved["modules_to_save.lm_head.weight"]
    assert torch.equal(emb, model.lm_head.weight.detach()) and torch.equal(head, emb)
    fresh = tied()
    load_adapter(fresh, tmp_path / "a")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)


def test_shared_linear_loads_whichever_of_its_names_comes_first(tmp_path):
    class Shared(torch.nn.Module):
        def __init__(self, enc_first):
            super().__init__()
            lin = torch.nn.Linear(8, 8)
            if enc_first:
                self.enc, self.dec = lin, lin
            else:
                self.dec, self.enc = lin, lin

        def forward(self, x):
            return self.dec(torch.relu(self.enc(x)))

    cfg = FlexLoRAConfig(r_init=2, r_max=4, target_modules=["enc"])
    torch.manual_seed(0)
    model = randomize(wrap(Shared(enc_first=True), cfg))
    x = torch.randn(3, 8)
    save_adapter(model, tmp_path / "a")  # saved as 'enc'
    torch.manual_seed(0)
    other = load_adapter(Shared(enc_first=False), tmp_path / "a")  # 'dec' is its first name
    assert flex_modules(other)[0][0] == "dec"
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_flexlora_and_peft_folders_are_not_mixed(tmp_path):
    model = trained_llama()
    peft_dir, flex_dir = tmp_path / "peft", tmp_path / "flex"
    with pytest.warns(UserWarning, match="rank 0"):
        flexlora.export_peft(model, peft_dir)
    before = file_bytes(peft_dir)
    with pytest.raises(FileExistsError, match=r"adapter_config\.json.*PEFT"):
        save_adapter(model, peft_dir)
    with pytest.raises(FileExistsError, match=r"adapter_config\.json.*PEFT"):
        flexlora.save_checkpoint(peft_dir, model)
    assert file_bytes(peft_dir) == before
    save_adapter(model, flex_dir)
    before = file_bytes(flex_dir)
    with pytest.raises(FileExistsError, match=r"flexlora_config\.json.*FlexLoRA"):
        flexlora.export_peft(model, flex_dir)
    assert file_bytes(flex_dir) == before


def test_save_rejects_unwrapped_and_merged_models(tmp_path):
    with pytest.raises(ValueError, match="not wrapped"):
        save_adapter(base_llama(), tmp_path / "new_parent" / "a")
    assert not (tmp_path / "new_parent").exists(), "bad input touched the disk"
    model = trained_llama()
    from flexlora.merging import merge

    merge(model)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    save_adapter(trained_llama(seed=3), tmp_path / "c")
    with pytest.raises(ValueError, match=r"merged.*unmerge"):
        load_adapter(model, tmp_path / "c")


@pytest.mark.parametrize("wrapper", ["DataParallel", "torch.compile"])
def test_wrapped_models_save_and_load_under_their_own_names(tmp_path, wrapper):
    def outer(m):
        return torch.nn.DataParallel(m) if wrapper == "DataParallel" else torch.compile(m)

    model = trained_llama()
    save_adapter(outer(model), tmp_path)
    keys = safetensors.torch.load_file(str(tmp_path / WEIGHTS_NAME)).keys()
    assert "model.layers.0.self_attn.q_proj.P" in keys and not any(k.startswith(("module.", "_orig_mod.")) for k in keys)
    fresh = base_llama()
    out = load_adapter(outer(fresh), tmp_path)
    assert isinstance(out, torch.nn.Module) and out is not fresh
    want, got = adapter_state(model), adapter_state(fresh)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_the_same_base_folder_under_another_spelling_does_not_warn(tmp_path, monkeypatch):
    # the base name was recorded as typed ("llama") and compared as a string: loading the same
    # folder by its absolute path, "./llama/" or from another working folder warned "other base model"
    import warnings

    from transformers import AutoModelForCausalLM

    base_llama().save_pretrained(tmp_path / "llama")
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained("llama")
    save_adapter(randomize(wrap(model, adapter_config())), tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert meta["base_model_name_or_path"] == "llama"  # as HF gave it (portable, as PEFT records it)
    assert meta["base_model_folder"] == str((tmp_path / "llama").resolve())  # what it pointed to
    (tmp_path / "elsewhere").mkdir()
    for spelling, cwd in ((str(tmp_path / "llama"), tmp_path), ("./llama/", tmp_path), ("../llama", tmp_path / "elsewhere")):
        monkeypatch.chdir(cwd)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_adapter(AutoModelForCausalLM.from_pretrained(spelling), tmp_path / "ad")
    other = tmp_path / "other"
    base_llama().save_pretrained(other)
    with pytest.warns(UserWarning, match="was saved from base model"):
        load_adapter(AutoModelForCausalLM.from_pretrained(str(other)), tmp_path / "ad")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m, n: m.update(format_version="1"), r"format_version must be an int, got '1'"),
        (lambda m, n: m.update(modules_to_save=None), r"modules_to_save must be a list of module names, got None"),
        (lambda m, n: m["modules"][n].pop("r_max"), r"\['r_max'\] must be an int, got None"),
        (lambda m, n: m["modules"][n].update(scaling="2.0"), r"\['scaling'\] must be a number, got '2.0'"),
        (lambda m, n: m["modules"].update({n: 5}), r"must be an object, got 5"),
        (lambda m, n: m["modules"][n].update(r_max="6"), r"\['r_max'\] must be an int, got '6'"),
    ],
    ids=["version-str", "mts-null", "no-r_max", "scaling-str", "entry-int", "r_max-str"],
)
def test_wrong_typed_config_fields_are_named(tmp_path, edit, message):
    # were TypeError / KeyError from inside the loader, or "saved with r_max=6, the model's has r_max=6"
    save_adapter(trained_llama(), tmp_path / "a")
    path = tmp_path / "a" / CONFIG_NAME
    meta = json.loads(path.read_text())
    edit(meta, next(iter(meta["modules"])))
    path.write_text(json.dumps(meta))
    model = wrap(base_llama(), adapter_config())
    before = adapter_state(model)
    with pytest.raises(ValueError, match=r"flexlora_config\.json' is corrupt: .*" + message):
        load_adapter(model, tmp_path / "a")
    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("key, dtype", [("mask", torch.float32), ("P", torch.int32)])
def test_slot_tensors_of_the_wrong_kind_are_refused(tmp_path, key, dtype):
    save_adapter(trained_llama(), tmp_path / "a")
    path = tmp_path / "a" / WEIGHTS_NAME
    tensors = safetensors.torch.load_file(str(path))
    name = next(k for k in tensors if k.endswith("." + key))
    tensors[name] = tensors[name].to(dtype)
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"{key} has dtype {dtype}, expected"):
        load_adapter(wrap(base_llama(), adapter_config()), tmp_path / "a")


def test_a_newer_format_says_upgrade_even_with_fields_this_version_cannot_read(tmp_path):
    save_adapter(trained_llama(), tmp_path / "a")
    path = tmp_path / "a" / CONFIG_NAME
    meta = json.loads(path.read_text())
    meta.update(format_version=99, modules_to_save={"layout": "of a later version"})
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99, newer than this flexlora.*upgrade flexlora"):
        load_adapter(wrap(base_llama(), adapter_config()), tmp_path / "a")


def test_a_save_into_a_mount_point_replaces_its_files_in_place(tmp_path, monkeypatch):
    # a mount point (a container volume) cannot be renamed away (EBUSY), and a folder staged
    # beside it is on another filesystem: every save into one failed
    import errno
    import os

    target = tmp_path / "volume"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    real_ismount, real_rename = os.path.ismount, os.rename
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p).resolve() == target.resolve() or real_ismount(p))

    def rename(src, dst, *a, **k):
        if target.resolve() in (Path(src).resolve(), Path(dst).resolve()):
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", rename)
    # the folder above a volume may be read-only (a container's root): the save writes inside only
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).resolve() == tmp_path.resolve()
                        else real_access(p, mode))
    import flexlora._atomic as atomic

    real_exchange = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False if target.resolve() in (Path(a).resolve(), Path(b).resolve())
                        else real_exchange(a, b))  # renameat2 on a mount point: EBUSY too
    first = trained_llama(seed=1)
    save_adapter(first, target)
    second = trained_llama(seed=2)
    save_adapter(second, target)
    assert sorted(p.name for p in target.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME, "notes.txt"])
    fresh = load_adapter(base_llama(), target)
    assert all(torch.equal(a, b) for a, b in zip(adapter_state(fresh).values(), adapter_state(second).values()))
    # a save that fails midway leaves the previous one whole, and nothing staged behind
    before = file_bytes(target)

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", fail)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(trained_llama(seed=3), target)
    assert file_bytes(target) == before and sorted(p.name for p in target.iterdir()) == sorted(before)
