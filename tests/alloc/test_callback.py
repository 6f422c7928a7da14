"""FlexLoRACallback inside a real transformers.Trainer (tiny config-built LLaMA, CPU, no downloads)."""

import warnings

import pytest
import torch

import flexlora
from flexlora import FlexLoRACallback, FlexLoRAConfig, RankAllocator
from _tiny_hf import llama_model

transformers = pytest.importorskip("transformers")



class Sequences(torch.utils.data.Dataset):
    def __init__(self, n=512, length=12, vocab=32):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama():
    return llama_model(vocab=32, intermediate=64, max_positions=64, initializer_range=0.3)


def make_trainer(tmp_path, model, callbacks, max_steps, accumulation=1, save_steps=None):
    save = dict(save_strategy="steps", save_steps=save_steps) if save_steps else dict(save_strategy="no")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2, weight_decay=0.01,
        lr_scheduler_type="constant", report_to="none", use_cpu=True, **save,
        logging_steps=1000, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Sequences(), callbacks=callbacks)


def test_trainer_runs_allocation_and_orthogonality(tmp_path):
    model = tiny_llama()
    cfg = FlexLoRAConfig(
        r_init=4, r_max=8, alpha=16.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        total_steps=24, t_warmup=4, t_final=4, delta_t=2, b0=2, orth_reg=0.01,
        importance="sensitivity",  # needs gradients: proves update_importance runs while they exist
    )
    flexlora.wrap(model, cfg)
    allocator = RankAllocator(model)
    budget, start = allocator.total_rank, allocator.ranks()

    calls = {"orth": 0, "importance": 0, "steps": []}
    orig_orth, orig_update, orig_step = allocator.add_orthogonal_grad_, allocator.importance.update, allocator.step

    def orth():
        # before optimizer.step: gradients are present
        assert all(m.P.grad is not None for m in allocator.modules)
        calls["orth"] += 1
        orig_orth()

    def update(modules):
        assert all(m.lam.grad is not None for m in modules)
        calls["importance"] += 1
        orig_update(modules)

    def step(global_step, optimizer=None):
        calls["steps"].append(global_step)
        assert optimizer is not None
        return orig_step(global_step, optimizer)

    allocator.add_orthogonal_grad_, allocator.importance.update, allocator.step = orth, update, step
    trainer = make_trainer(tmp_path, model, [FlexLoRACallback(allocator)], max_steps=24, accumulation=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the never-stepped guard must stay quiet
        trainer.train()

    assert calls["steps"] == list(range(1, 25))
    assert calls["orth"] == 24 and calls["importance"] == 24
    assert allocator.num_events == len(range(4, 21, 2))
    assert allocator.total_rank == budget == sum(allocator.ranks().values())
    assert allocator.ranks() != start
    assert allocator.importance.steps == 24  # one update per optimizer step, not per micro-batch


def _run(tmp_path, steps, save_steps=None, resume=None):
    model = tiny_llama()
    cfg = FlexLoRAConfig(
        r_init=4, r_max=8, alpha=16.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        total_steps=24, t_warmup=2, t_final=2, delta_t=2, b0=2, importance="sensitivity",
    )
    flexlora.wrap(model, cfg)
    allocator = RankAllocator(model)
    trainer = make_trainer(tmp_path, model, [FlexLoRACallback(allocator)], max_steps=steps, save_steps=save_steps)
    trainer.train(resume_from_checkpoint=resume)
    return model, allocator


def test_resumed_trainer_continues_the_allocator_exactly(tmp_path):
    model, straight = _run(tmp_path / "straight", 24)
    _run(tmp_path / "resumed", 24, save_steps=12)  # writes checkpoint-12 (and -24)
    assert (tmp_path / "resumed" / "checkpoint-12" / "flexlora_allocator_state.pt").is_file()
    model2, resumed = _run(tmp_path / "resumed", 24, resume=str(tmp_path / "resumed" / "checkpoint-12"))
    assert resumed.num_events == straight.num_events == len(range(2, 23, 2))
    assert resumed.history == straight.history  # every event, from step 0, with its scores
    assert resumed.importance.steps == straight.importance.steps == 24
    assert resumed.ranks() == straight.ranks()
    for (_, a), (_, b) in zip(flexlora.flex_modules(model), flexlora.flex_modules(model2)):
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.lam, b.lam, rtol=1e-5, atol=1e-6)
    # A checkpoint resumed from outside the run's output_dir (moved, renamed, another run's):
    # the allocator state was looked up in <output_dir>/checkpoint-12 only, and the run went on
    # with a fresh allocator (5 events against 11, another history)
    moved = tmp_path / "kept" / "step-12"
    moved.parent.mkdir()
    (tmp_path / "resumed" / "checkpoint-12").rename(moved)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model3, elsewhere = _run(tmp_path / "elsewhere", 24, resume=str(moved))
    assert elsewhere.history == straight.history and elsewhere.num_events == straight.num_events
    assert elsewhere.importance.steps == 24


def test_resume_without_allocator_state_warns(tmp_path):
    _run(tmp_path, 24, save_steps=12)
    (tmp_path / "checkpoint-12" / "flexlora_allocator_state.pt").unlink()
    with pytest.warns(UserWarning, match="resumes at step 12 but .*flexlora_allocator_state.pt' does not exist"):
        _run(tmp_path, 24, resume=str(tmp_path / "checkpoint-12"))


def test_second_train_with_the_same_allocator_warns(tmp_path):
    # the second run's global_step restarts at 1, below the allocator's last step: every step()
    # was ignored, so the second run trained without any allocation, silently
    model = tiny_llama()
    cfg = FlexLoRAConfig(r_init=4, r_max=8, alpha=16.0, target_modules=["q_proj", "v_proj"], total_steps=8,
                         t_warmup=2, t_final=2, delta_t=2, b0=1)
    flexlora.wrap(model, cfg)
    callback = FlexLoRACallback(RankAllocator(model))
    make_trainer(tmp_path / "a", model, [callback], max_steps=8).train()
    with pytest.warns(UserWarning, match=r"RankAllocator.step\(1\) after step\(8\) is ignored, and so is every step up to 8"):
        make_trainer(tmp_path / "b", model, [callback], max_steps=8).train()


def test_trainer_warns_on_total_steps_mismatch(tmp_path):
    model = tiny_llama()
    cfg = FlexLoRAConfig(r_init=2, r_max=4, target_modules=["q_proj"], total_steps=100, t_warmup=1, t_final=1, delta_t=1)
    flexlora.wrap(model, cfg)
    trainer = make_trainer(tmp_path, model, [FlexLoRACallback(RankAllocator(model))], max_steps=2)
    with pytest.warns(UserWarning, match=r"max_steps=2 .*total_steps=100"):
        trainer.train()


def test_trainer_without_callback_warns_once(tmp_path):
    model = tiny_llama()
    cfg = FlexLoRAConfig(r_init=2, r_max=4, target_modules=["q_proj"], total_steps=12, t_warmup=2, t_final=2, delta_t=2)
    flexlora.wrap(model, cfg)
    allocator = RankAllocator(model)  # noqa: F841  (created, but nobody calls step)
    trainer = make_trainer(tmp_path, model, [], max_steps=12)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.train()
    hits = [w for w in rec if "RankAllocator.step() was never called" in str(w.message)]
    assert len(hits) == 1 and "FlexLoRACallback" in str(hits[0].message)


def test_callback_rejects_non_allocator():
    with pytest.raises(TypeError, match="RankAllocator"):
        FlexLoRACallback(object())


def _wrapped(total_steps=24, **kw):
    model = tiny_llama()
    cfg = FlexLoRAConfig(
        r_init=4, r_max=8, alpha=16.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        total_steps=total_steps, t_warmup=2, t_final=2, delta_t=2, b0=2, importance="sensitivity", **kw,
    )
    flexlora.wrap(model, cfg)
    return model, RankAllocator(model)


def test_load_best_model_at_end_takes_the_allocator_back_too(tmp_path):
    # The Trainer put the best checkpoint's masks back; the allocator stayed at the last step, and
    # save_adapter(..., allocator=) then paired the last step's history with the best model's masks.
    model, allocator = _wrapped()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=8, learning_rate=1e-2,
        lr_scheduler_type="constant", report_to="none", use_cpu=True, logging_steps=1000, disable_tqdm=True,
        seed=0, eval_strategy="steps", eval_steps=6, save_strategy="steps", save_steps=6,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,  # the worst: step 6
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(), eval_dataset=Sequences(n=16),
                                   callbacks=[FlexLoRACallback(allocator)])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-6")
    saved = torch.load(f"{best}/flexlora_allocator_state.pt", weights_only=True)
    state = allocator.state_dict()
    assert state["last_step"] == saved["last_step"] == 6 and state["num_events"] == saved["num_events"] == 3
    assert state["history"] == saved["history"] and allocator.importance.steps == 6
    last = max(r["step"] for r in allocator.history)
    assert {r["module"]: r["rank"] for r in allocator.history if r["step"] == last} == allocator.ranks()
    assert allocator.total_rank == sum(allocator.ranks().values())


def test_an_allocator_of_another_model_is_refused(tmp_path):
    # e.g. Trainer(model_init=...): the allocator moved the ranks of a model nobody trained
    _, allocator = _wrapped()
    other, _ = _wrapped()
    trainer = make_trainer(tmp_path, other, [FlexLoRACallback(allocator)], max_steps=24)
    with pytest.raises(ValueError, match="allocator's FlexLinear modules are not in the model the Trainer trains"):
        trainer.train()


def test_hyperparameter_search_run_folders_get_the_allocator_state(tmp_path):
    # a trial's checkpoints go to output_dir/run-<trial>/; on_save looked in output_dir and wrote
    # nothing, silently
    class TrialTrainer(transformers.Trainer):  # what a search backend's trial makes it return
        def _get_output_dir(self, trial):
            return str(tmp_path / "run-0")

    model, allocator = _wrapped()
    trainer = make_trainer(tmp_path, model, [FlexLoRACallback(allocator)], max_steps=24, save_steps=12)
    trainer.__class__ = TrialTrainer
    trainer.train()
    for step in (12, 24):
        assert (tmp_path / "run-0" / f"checkpoint-{step}" / "flexlora_allocator_state.pt").is_file()


def test_resume_from_a_folder_without_state_does_not_take_another_runs(tmp_path):
    _run(tmp_path / "mine", 24, save_steps=12)  # mine/checkpoint-12 holds this earlier run's state
    _run(tmp_path / "theirs", 24, save_steps=12)
    (tmp_path / "theirs" / "checkpoint-12" / "flexlora_allocator_state.pt").unlink()
    with pytest.warns(UserWarning, match=r"resumes at step 12 but .*theirs/checkpoint-12/flexlora_allocator_state.pt' does not exist"):
        _run(tmp_path / "mine", 24, resume=str(tmp_path / "theirs" / "checkpoint-12"))


def test_one_allocator_in_two_callbacks_runs_once_per_step(tmp_path):
    model, allocator = _wrapped()
    calls = []
    orig = allocator.add_orthogonal_grad_
    allocator.add_orthogonal_grad_ = lambda: (calls.append(1), orig())
    trainer = make_trainer(tmp_path, model, [FlexLoRACallback(allocator), FlexLoRACallback(allocator)], max_steps=24)
    with pytest.warns(UserWarning, match="two callbacks drive the same RankAllocator"):
        trainer.train()
    assert allocator.importance.steps == 24 and len(calls) == 24  # were 48 and 48


def test_a_new_run_with_the_same_callback_does_not_skip_hooks(tmp_path):
    # the hooks' per-step marks outlived the run: the next train() skipped the hooks whose step
    # equalled an old mark (here the save at step 4: no allocator state in b/checkpoint-4), and
    # warned of two callbacks
    model, allocator = _wrapped(total_steps=8)
    callback = FlexLoRACallback(allocator)
    make_trainer(tmp_path / "a", model, [callback], max_steps=4, save_steps=4).train()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        make_trainer(tmp_path / "b", model, [callback], max_steps=4, save_steps=4).train()
    assert (tmp_path / "b" / "checkpoint-4" / "flexlora_allocator_state.pt").is_file()
    assert not [w for w in rec if "two callbacks" in str(w.message)]


def test_train_end_leaves_the_allocator_when_the_model_holds_other_ranks(tmp_path):
    # on_train_end also ends a trial a hyperparameter search pruned: no best model was loaded then
    from types import SimpleNamespace

    model, allocator = _wrapped()
    best = tmp_path / "checkpoint-6"
    best.mkdir()
    saved = allocator.state_dict()
    saved["last_step"] = 6
    saved["history"] = [dict(r, step=6) for r in saved["history"]]
    saved["history"][0]["rank"] -= 1  # the best checkpoint's ranks differ from the model's
    torch.save(saved, best / "flexlora_allocator_state.pt")
    before = allocator.state_dict()
    FlexLoRACallback(allocator).on_train_end(SimpleNamespace(load_best_model_at_end=True),
                                             SimpleNamespace(best_model_checkpoint=str(best), global_step=9), None)
    assert allocator.state_dict() == before


def test_cli_warning_format_touches_only_flexloras_own_warnings(capsys):
    from flexlora import cli

    cli._show_warning("every rank is <= r_min=1 (see runs/b0/x and {'r_max': 8})", UserWarning, cli.__file__, 1)
    cli._show_warning("r_min of another library", FutureWarning, "/elsewhere/lib.py", 3)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "flexlora: warning: every rank is <= --r-min=1 (see runs/b0/x and {'r_max': 8})"
    assert err[1] == "/elsewhere/lib.py:3: FutureWarning: r_min of another library"


def test_steps_the_allocator_ignores_feed_no_importance(tmp_path):
    # a second train() restarts global_step below the allocator's last step: step() ignores those
    # steps, "no importance update and no event", but the callback fed the sensitivity averages
    # at on_optimizer_step all the same (8 -> 16 updates)
    model, allocator = _wrapped(total_steps=8)
    callback = FlexLoRACallback(allocator)
    make_trainer(tmp_path / "a", model, [callback], max_steps=8).train()
    fed = allocator.importance.fed
    before = allocator.importance.state_dict()
    with pytest.warns(UserWarning, match=r"is ignored"):
        make_trainer(tmp_path / "b", model, [callback], max_steps=8).train()
    assert allocator.importance.fed == fed == 8
    after = allocator.importance.state_dict()
    assert len(before["ipt"]) == len(after["ipt"]) > 0
    for key in ("ipt", "unc"):  # the averages are where the first run left them
        assert all(torch.equal(a, b) for a, b in zip(before[key], after[key]))


class _OutOfMemoryAbove:
    """A forward pre-hook that raises CUDA's out-of-memory message for batches above `limit`
    rows from the `after`-th such call on (auto_find_batch_size then retries smaller)."""

    def __init__(self, limit, after):
        self.limit, self.after, self.calls = limit, after, 0

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[0] > self.limit and module.training:
            self.calls += 1
            if self.calls >= self.after:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def _auto_batch_trainer(tmp_path, model, allocator, batch, auto, callback=None, save_steps=None):
    save = dict(save_strategy="steps", save_steps=save_steps) if save_steps else dict(save_strategy="no")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=batch, auto_find_batch_size=auto,
        learning_rate=1e-2, weight_decay=0.01, lr_scheduler_type="constant", report_to="none", use_cpu=True,
        logging_steps=1000, disable_tqdm=True, dataloader_num_workers=0, seed=0, **save,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Sequences(),
                                callbacks=[callback or FlexLoRACallback(allocator)])


def _interrupt_at(model, call):
    """A forward pre-hook raising KeyboardInterrupt at the `call`-th forward; returns its handle."""
    calls = {"n": 0}

    def hook(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _assert_same_run(model, allocator, ref_model, ref_allocator):
    assert allocator.history == ref_allocator.history  # the same events at the same steps
    assert allocator.num_events == ref_allocator.num_events > 0
    got, want = model.state_dict(), ref_model.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_auto_find_batch_size_retry_starts_the_adapters_and_allocator_over(tmp_path):
    # an out-of-memory at the 6th step (batch 10): the Trainer retries at 9, then 8, from step 0
    # but keeps the failed attempt's weights; the allocator had reached step 5, so it ignored the
    # retry's steps 1-5 (its events at 2 and 4 never happened) and mixed both attempts' history
    # (a norm unfrozen by hand trains too: the retry puts it back as well)
    pytest.importorskip("accelerate")
    model, allocator = _wrapped(total_steps=16, modules_to_save=["lm_head"])
    model.model.norm.weight.requires_grad_(True)
    model.register_forward_pre_hook(_OutOfMemoryAbove(limit=8, after=6), with_kwargs=True)
    with pytest.warns(UserWarning, match=r"auto_find_batch_size restarted training at batch size 8"):
        trainer = _auto_batch_trainer(tmp_path / "auto", model, allocator, batch=10, auto=True)
        trainer.train()
    assert trainer._train_batch_size == 8

    ref_model, ref_allocator = _wrapped(total_steps=16, modules_to_save=["lm_head"])
    ref_model.model.norm.weight.requires_grad_(True)
    _auto_batch_trainer(tmp_path / "ref", ref_model, ref_allocator, batch=8, auto=False).train()
    _assert_same_run(model, allocator, ref_model, ref_allocator)


def test_auto_find_batch_size_retry_of_a_resumed_run_ends_as_a_resume_at_that_batch(tmp_path):
    # a resumed run's TrainerState reports the checkpoint's batch size in every attempt, so the
    # retry went unnoticed; and the Trainer reloads the checkpoint's optimizer state before each
    # attempt, which the retry must keep
    pytest.importorskip("accelerate")
    model, allocator = _wrapped(total_steps=16)
    _interrupt_at(model, 6)
    with pytest.raises(KeyboardInterrupt):
        _auto_batch_trainer(tmp_path / "a", model, allocator, batch=10, auto=True, save_steps=4).train()
    checkpoint = str(tmp_path / "a" / "checkpoint-4")

    model, allocator = _wrapped(total_steps=16)
    model.register_forward_pre_hook(_OutOfMemoryAbove(limit=8, after=3), with_kwargs=True)
    with pytest.warns(UserWarning, match=r"auto_find_batch_size restarted training at batch size 8"):
        trainer = _auto_batch_trainer(tmp_path / "b", model, allocator, batch=10, auto=True)
        trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer._train_batch_size == 8

    ref_model, ref_allocator = _wrapped(total_steps=16)
    _auto_batch_trainer(tmp_path / "ref", ref_model, ref_allocator, batch=8, auto=False).train(
        resume_from_checkpoint=checkpoint)
    _assert_same_run(model, allocator, ref_model, ref_allocator)


def test_a_run_that_failed_otherwise_is_not_taken_for_a_retry(tmp_path):
    # the snapshot is for auto_find_batch_size's own retries (a smaller batch): after another
    # error, a new train() at the same batch size continues from the model as it is, as HF does
    model, allocator = _wrapped(total_steps=16)
    calls = {"n": 0, "interrupt_at": 6}

    def interrupt(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == calls["interrupt_at"]:
            raise KeyboardInterrupt

    model.register_forward_pre_hook(interrupt, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        _auto_batch_trainer(tmp_path / "a", model, allocator, batch=8, auto=True).train()
    lam = [m.lam.detach().clone() for m in allocator.modules]
    assert any(bool(t.ne(0).any()) for t in lam)  # the interrupted run trained
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _auto_batch_trainer(tmp_path / "b", model, allocator, batch=8, auto=True).train()
    assert not [w for w in rec if "restarted training" in str(w.message)]
    assert [w for w in rec if "is ignored" in str(w.message)]  # a second run on one allocator, as documented


def test_an_interrupted_run_s_copy_is_not_restored_by_another_trainer(tmp_path):
    # the copy stayed on the callback after the interrupt, and a new Trainer at a smaller batch
    # with the same callback took its start for a retry: adapters and allocator rolled back
    model, allocator = _wrapped(total_steps=16)
    callback = FlexLoRACallback(allocator)
    handle = _interrupt_at(model, 6)
    with pytest.raises(KeyboardInterrupt):
        _auto_batch_trainer(tmp_path / "a", model, allocator, batch=16, auto=True, callback=callback).train()
    handle.remove()
    lam = [m.lam.detach().clone() for m in allocator.modules]
    last = allocator._last_step
    assert last == 5 and set(vars(callback)) == {"allocator", "orthogonal"}  # no copy kept on the callback
    seen = {}

    def first_forward(module, args, kwargs):
        seen.setdefault("lam", [x.lam.detach().clone() for x in allocator.modules])

    hook = model.register_forward_pre_hook(first_forward, with_kwargs=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _auto_batch_trainer(tmp_path / "b", model, allocator, batch=8, auto=True, callback=callback).train()
    hook.remove()
    assert not [w for w in rec if "restarted training" in str(w.message)]
    assert all(torch.equal(a, b) for a, b in zip(lam, seen["lam"]))  # it started from the model as it was
