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
