"""Exact resume of parameters that are neither adapter slots nor in modules_to_save: a norm or a
projection the user unfroze by hand and gave to the optimizer. save_checkpoint keeps their
values (the optimizer state alone would resume them from the base weights), load_checkpoint
checks and restores them, and save_adapter, which does not hold them, says so."""

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flexlora import FlexLoRAConfig, RankAllocator, load_checkpoint, save_adapter, save_checkpoint, wrap

LLAMA = LlamaConfig(
    vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
)
torch.manual_seed(0)
BASE_STATE = LlamaForCausalLM(LLAMA).state_dict()
CONFIG = dict(r_init=2, r_max=4, target_modules=["q_proj", "v_proj"], total_steps=8, t_warmup=1,
              delta_t=2, t_final=2, b0=1)
# unfrozen by hand, outside the adapter: a norm's weight and a whole non-target projection
EXTRA = ("model.norm.weight", "model.layers.0.mlp.gate_proj.weight")


def build(extra=EXTRA):
    model = LlamaForCausalLM(LLAMA)
    model.load_state_dict(BASE_STATE)
    wrap(model, FlexLoRAConfig(**CONFIG))
    for name, p in model.named_parameters():
        if name in extra:
            p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    return model, opt, RankAllocator(model)


def train(model, opt, alloc, start, stop):
    for step in range(start + 1, stop + 1):
        ids = torch.randint(0, LLAMA.vocab_size, (2, 6))
        (model(input_ids=ids, labels=ids).loss + alloc.orthogonal_loss()).backward()
        opt.step()
        alloc.step(step, opt)
        opt.zero_grad()


def saved_run(directory, steps, optimizer=True):
    """Seeded 0, built, trained ``steps`` steps and saved (with the optimizer unless told not)."""
    torch.manual_seed(0)
    model, opt, alloc = build()
    train(model, opt, alloc, 0, steps)
    save_checkpoint(directory, model, allocator=alloc, optimizer=opt if optimizer else None, step=steps)
    return model, opt, alloc


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_hand_unfrozen_parameters_resume_exactly(tmp_path):
    torch.manual_seed(0)
    model, opt, alloc = build()
    train(model, opt, alloc, 0, 8)
    want = trainable(model)
    assert not torch.equal(want[EXTRA[0]], BASE_STATE[EXTRA[0]]), "the extra parameter did not train"

    torch.manual_seed(0)
    model, opt, alloc = build()
    train(model, opt, alloc, 0, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint holds them: nothing to warn about
        save_checkpoint(tmp_path / "c", model, allocator=alloc, optimizer=opt, step=4)
    torch.manual_seed(1234)  # a new process: other RNG states (the checkpoint restores them)
    model2, opt2, alloc2 = build()
    assert load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=opt2) == 4
    for name in EXTRA:  # restored before training goes on
        assert torch.equal(dict(model2.named_parameters())[name], dict(model.named_parameters())[name])
    train(model2, opt2, alloc2, 4, 8)
    got = trainable(model2)
    assert got.keys() == want.keys()
    for name in want:
        err = ((got[name] - want[name]).abs().max() / want[name].abs().max()).item()
        assert err <= 1e-6, f"{name}: relative difference {err:.3g} after resume"


def test_a_plain_model_gets_them_too(tmp_path):
    model, opt, alloc = saved_run(tmp_path / "c", 2, optimizer=False)
    plain = LlamaForCausalLM(LLAMA)
    plain.load_state_dict(BASE_STATE)
    load_checkpoint(tmp_path / "c", plain)
    for name in EXTRA:
        assert torch.equal(dict(plain.named_parameters())[name], dict(model.named_parameters())[name])


def test_a_checkpoint_whose_extra_parameter_the_model_lacks_is_refused_first(tmp_path):
    torch.manual_seed(0)
    model, opt, alloc = build()
    model.extra_scale = torch.nn.Parameter(torch.ones(3))  # trainable, outside everything
    train(model, opt, alloc, 0, 2)
    save_checkpoint(tmp_path / "c", model, allocator=alloc, step=2)
    model2, opt2, alloc2 = build()
    before = {n: p.detach().clone() for n, p in model2.named_parameters()}
    with pytest.raises(ValueError, match=r"training_state\.pt.*'extra_scale'.*not a parameter of the model"):
        load_checkpoint(tmp_path / "c", model2, allocator=alloc2)
    assert all(torch.equal(before[n], p) for n, p in model2.named_parameters()), "changed before the error"


def test_a_checkpoint_whose_extra_parameter_has_another_shape_is_refused_first(tmp_path):
    torch.manual_seed(0)
    model, opt, alloc = build(extra=())
    model.extra_scale = torch.nn.Parameter(torch.ones(3))
    save_checkpoint(tmp_path / "c", model, allocator=alloc, step=0)
    model2, _, alloc2 = build(extra=())
    model2.extra_scale = torch.nn.Parameter(torch.full((4,), 2.0))
    lam = [m.lam.detach().clone() for m in model2.modules() if hasattr(m, "lam")]
    with pytest.raises(ValueError, match=r"'extra_scale'.*shape \(3,\).*model's is \(4,\)"):
        load_checkpoint(tmp_path / "c", model2, allocator=alloc2)
    assert torch.equal(model2.extra_scale, torch.full((4,), 2.0))
    assert all(torch.equal(a, m.lam) for a, m in zip(lam, [m for m in model2.modules() if hasattr(m, "lam")]))


def test_a_late_failure_puts_the_extra_parameters_back(tmp_path):
    model, opt, alloc = saved_run(tmp_path / "c", 2)
    model2, opt2, alloc2 = build()
    before = {n: p.detach().clone() for n, p in model2.named_parameters()}

    class Broken:
        def load_state_dict(self, sd):
            raise RuntimeError("scheduler state does not fit")

    save_checkpoint(tmp_path / "s", model, allocator=alloc, optimizer=opt,
                    scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), step=2)
    with pytest.raises(RuntimeError, match="does not fit"):
        load_checkpoint(tmp_path / "s", model2, allocator=alloc2, optimizer=opt2, scheduler=Broken())
    for name in EXTRA:
        assert torch.equal(dict(model2.named_parameters())[name], before[name]), f"{name} not put back"


def test_a_checkpoint_of_an_older_version_without_them_still_loads(tmp_path):
    model, opt, alloc = saved_run(tmp_path / "c", 2)
    path = tmp_path / "c" / "training_state.pt"
    state = torch.load(path, weights_only=True)
    assert set(state["trainable"]) == set(EXTRA)
    del state["trainable"]  # as flexlora <= this version wrote it
    torch.save(state, path)
    model2, opt2, alloc2 = build()
    assert load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=opt2) == 2


def test_save_adapter_says_which_trained_parameters_it_leaves_out(tmp_path):
    torch.manual_seed(0)
    model, opt, alloc = build()
    with pytest.warns(UserWarning, match=r"2 trainable parameters .*'model\.norm\.weight'.*modules_to_save"):
        save_adapter(model, tmp_path / "a")
    frozen, _, _ = build(extra=())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # adapter slots only: nothing left out
        save_adapter(frozen, tmp_path / "b")
    # in modules_to_save they are saved, and not warned about
    model3 = LlamaForCausalLM(LLAMA)
    wrap(model3, FlexLoRAConfig(**CONFIG, modules_to_save=["norm"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model3, tmp_path / "c")


def test_an_optimizer_parameter_outside_the_model_warns(tmp_path):
    torch.manual_seed(0)
    model, opt, alloc = build(extra=())
    stray = torch.nn.Parameter(torch.ones(5))
    opt.add_param_group({"params": [stray]})
    with pytest.warns(UserWarning, match=r"optimizer holds 1 parameter that is not the model's"):
        save_checkpoint(tmp_path / "c", model, allocator=alloc, optimizer=opt, step=0)


def test_an_optimizer_over_every_parameter_saves_only_those_that_train(tmp_path):
    # AdamW(model.parameters()) holds the frozen base too: it never updates them (no gradient, no
    # state), so the checkpoint must not carry the whole base model
    torch.manual_seed(0)
    model, _, alloc = build(extra=EXTRA[:1])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2)
    train(model, opt, alloc, 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_checkpoint(tmp_path / "c", model, allocator=alloc, optimizer=opt, step=1)
    state = torch.load(tmp_path / "c" / "training_state.pt", weights_only=True)
    assert set(state["trainable"]) == {EXTRA[0]}
    # a parameter frozen after it trained keeps optimizer state: its value is saved too
    model.model.norm.weight.requires_grad_(False)
    save_checkpoint(tmp_path / "d", model, allocator=alloc, optimizer=opt, step=1)
    assert set(torch.load(tmp_path / "d" / "training_state.pt", weights_only=True)["trainable"]) == {EXTRA[0]}


def test_load_checkpoint_does_not_copy_the_extra_parameters_for_a_rollback(tmp_path, monkeypatch):
    # a large unfrozen embedding: the load must not hold a spare copy of it (it restores these
    # values last, once nothing after them can fail)
    model, opt, alloc = saved_run(tmp_path / "c", 1)
    model2, opt2, alloc2 = build()
    ptrs = {p.data_ptr() for n, p in model2.named_parameters() if n in EXTRA}
    cloned = []
    real = torch.Tensor.clone

    def clone(t, *a, **k):
        if t.data_ptr() in ptrs:
            cloned.append(tuple(t.shape))
        return real(t, *a, **k)

    monkeypatch.setattr(torch.Tensor, "clone", clone)
    load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=opt2)
    monkeypatch.undo()
    assert not cloned, f"copies of the extra parameters: {cloned}"
    for name in EXTRA:
        assert torch.equal(dict(model2.named_parameters())[name], dict(model.named_parameters())[name])


def test_a_trained_base_weight_of_an_adapted_module_gets_advice_that_works(tmp_path):
    # modules_to_save cannot hold an adapted module's own weight (wrap refuses a module that is
    # both a target and saved): the warning must not send the user there
    torch.manual_seed(0)
    model, _, _ = build(extra=())
    q = model.model.layers[0].self_attn.q_proj
    q.weight.requires_grad_(True)
    with pytest.warns(UserWarning) as caught:
        save_adapter(model, tmp_path / "a")
    text = " ".join(str(w.message) for w in caught)
    assert "'model.layers.0.self_attn.q_proj.weight'" in text
    assert "base weight" in text and "modules_to_save" not in text, text


def test_an_optimizer_without_a_trained_parameter_is_told_which(tmp_path):
    model, opt, alloc = saved_run(tmp_path / "c", 1)
    model2, _, alloc2 = build()
    narrow = torch.optim.AdamW([p for n, p in model2.named_parameters() if p.requires_grad and n != EXTRA[1]])
    with pytest.raises(ValueError, match=r"holds trained values of 'model\.layers\.0\.mlp\.gate_proj\.weight', which "
                                         r"the optimizer given does not hold"):
        load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=narrow)


def test_the_warning_about_one_parameter_speaks_of_one(tmp_path):
    torch.manual_seed(0)
    model, _, _ = build(extra=EXTRA[:1])
    with pytest.warns(UserWarning, match=r"1 trainable parameter \('model\.norm\.weight'\) is neither an adapter slot "
                                         r"nor in modules_to_save, so the adapter does not hold it: list its module"):
        save_adapter(model, tmp_path / "a")
