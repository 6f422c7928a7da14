"""Exact resume: 60 steps straight == 30 steps, save_checkpoint, load into fresh objects, 30 more.

The run has everything whose state a resume must carry: adapter dropout (torch RNG), a data
stream drawn from python ``random``, numpy and torch RNGs, AdamW moments, a warm-up/decay LR
schedule, and a RankAllocator whose prune/expand events fall both before and after step 30.
"""

import random
import warnings

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flexlora import FlexLoRAConfig, RankAllocator, flex_modules, load_checkpoint, save_checkpoint, wrap

LLAMA = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
)
torch.manual_seed(0)
BASE_STATE = LlamaForCausalLM(LLAMA).state_dict()
TOTAL, HALF = 60, 30
CONFIG = dict(
    r_init=3, r_max=6, alpha=8.0, dropout=0.1, target_modules=["q_proj", "v_proj"],
    total_steps=TOTAL, t_warmup=4, delta_t=4, t_final=8, b0=1, orth_reg=0.1,
)



def seed_all(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def build():
    """Fresh model, optimizer, scheduler and allocator, as a new process would build them."""
    model = LlamaForCausalLM(LLAMA)
    model.load_state_dict(BASE_STATE)
    wrap(model, FlexLoRAConfig(**CONFIG))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / (TOTAL + 5)))
    return model, opt, sched, RankAllocator(model)


def saved_run(directory, steps=2):
    """A run seeded 0, trained ``steps`` steps and saved with everything into ``directory``; its
    (model, opt, sched, alloc)."""
    seed_all(0)
    model, opt, sched, alloc = build()
    train(model, opt, sched, alloc, 0, steps)
    save_checkpoint(directory, model, allocator=alloc, optimizer=opt, scheduler=sched, step=steps)
    return model, opt, sched, alloc


def train(model, opt, sched, alloc, start, stop):
    events = []
    for step in range(start + 1, stop + 1):
        seq = random.randint(4, 9)  # python RNG
        weight = 1.0 + 0.1 * float(np.random.rand())  # numpy RNG
        ids = torch.randint(0, LLAMA.vocab_size, (2, seq))  # torch RNG (and dropout below)
        loss = model(input_ids=ids, labels=ids).loss * weight + alloc.orthogonal_loss()
        loss.backward()
        opt.step()
        sched.step()
        if alloc.step(step, opt) is not None:
            events.append(step)
        opt.zero_grad()
    return events


def snapshot(model, opt, alloc):
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    masks = {n: m.mask.clone() for n, m in flex_modules(model)}
    return state, masks, opt.param_groups[0]["lr"], [dict(r) for r in alloc.history]


def assert_same(a, b):
    (pa, ma, lra, ha), (pb, mb, lrb, hb) = a, b
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma), "ranks differ"
    assert pa.keys() == pb.keys()
    for k in pa:
        err = ((pa[k] - pb[k]).abs().max() / pa[k].abs().max().clamp_min(1e-12)).item()
        assert err <= 1e-6, f"{k}: relative difference {err:.3g} after resume"
    assert lra == pytest.approx(lrb, rel=1e-12)
    assert ha == hb, "allocator history differs"


PEEK = HALF + 4  # where the no-RNG-restore run is compared


@pytest.fixture(scope="module")
def straight():
    seed_all(0)
    model, opt, sched, alloc = build()
    initial = {n: m.mask.clone() for n, m in flex_modules(model)}
    events = train(model, opt, sched, alloc, 0, PEEK)
    at_peek = snapshot(model, opt, alloc)
    events += train(model, opt, sched, alloc, PEEK, TOTAL)
    return snapshot(model, opt, alloc), events, initial, at_peek


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("resume") / "ckpt"
    seed_all(0)
    model, opt, sched, alloc = build()
    train(model, opt, sched, alloc, 0, HALF)
    save_checkpoint(directory, model, allocator=alloc, optimizer=opt, scheduler=sched, step=HALF)
    return directory


def fresh_loaded(directory):
    seed_all(1234)  # a new process starts from other RNG states and another adapter init
    model, opt, sched, alloc = build()
    step = load_checkpoint(directory, model, allocator=alloc, optimizer=opt, scheduler=sched)
    return step, (model, opt, sched, alloc)


def test_resume_equals_straight_run(straight, checkpoint):
    want, events, initial, _ = straight
    assert any(e <= HALF for e in events) and any(e > HALF for e in events), f"events {events} must straddle {HALF}"
    assert any(not torch.equal(initial[k], want[1][k]) for k in initial), "no rank ever changed"
    step, (model, opt, sched, alloc) = fresh_loaded(checkpoint)
    assert step == HALF
    train(model, opt, sched, alloc, step, TOTAL)
    assert_same(want, snapshot(model, opt, alloc))


def test_resume_without_rng_restore_differs(straight, checkpoint):
    """The check above can fail: the same resume continued with other RNG states (other dropout
    masks and data) ends elsewhere after a few steps, while the restored one matches."""
    at_peek = straight[3]
    step, (model, opt, sched, alloc) = fresh_loaded(checkpoint)
    train(model, opt, sched, alloc, step, PEEK)
    assert_same(at_peek, snapshot(model, opt, alloc))

    step, (model, opt, sched, alloc) = fresh_loaded(checkpoint)
    seed_all(99)
    train(model, opt, sched, alloc, step, PEEK)
    got = snapshot(model, opt, alloc)[0]
    diff = max((at_peek[0][k] - got[k]).abs().max().item() for k in got)
    assert diff > 1e-4


def test_load_checkpoint_checks_before_modifying(tmp_path):
    seed_all(0)
    model, opt, sched, alloc = build()
    train(model, opt, sched, alloc, 0, 2)
    save_checkpoint(tmp_path / "no_opt", model, allocator=alloc, step=2)
    model2, opt2, sched2, alloc2 = build()
    before = {n: p.detach().clone() for n, p in model2.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=r"no_opt.*no optimizer state"):
        load_checkpoint(tmp_path / "no_opt", model2, allocator=alloc2, optimizer=opt2)
    assert all(torch.equal(before[n], p) for n, p in model2.named_parameters() if p.requires_grad)
    with pytest.raises(FileNotFoundError, match=r"training_state\.pt"):
        from flexlora import save_adapter

        save_adapter(model, tmp_path / "adapter_only")
        load_checkpoint(tmp_path / "adapter_only", model2)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path / "bad", model, step=-1)
    save_checkpoint(tmp_path / "torn", model, allocator=alloc, optimizer=opt, scheduler=sched, step=2)
    (tmp_path / "torn" / "training_state.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(ValueError, match=r"torn.*training_state\.pt.*corrupt"):
        load_checkpoint(tmp_path / "torn", model2, allocator=alloc2, optimizer=opt2, scheduler=sched2)
    assert all(torch.equal(before[n], p) for n, p in model2.named_parameters() if p.requires_grad)


def test_load_checkpoint_failing_late_puts_everything_back(tmp_path):
    model, opt, sched, alloc = saved_run(tmp_path / "c")
    model2, opt2, sched2, alloc2 = build()
    params = [p for p in model2.parameters() if p.requires_grad]
    masks = [m.mask.clone() for _, m in flex_modules(model2)]
    before = [p.detach().clone() for p in params]
    alloc_before = alloc2.state_dict()
    # an optimizer over other parameter groups: refused before anything is copied
    split = torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:]}], lr=1e-3)
    with pytest.raises(ValueError, match=r"2 parameter groups.*1|1 parameter groups.*2"):
        load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=split)
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    # a scheduler whose load fails after the adapter is in: the adapter and allocator go back
    class Broken:
        def load_state_dict(self, sd):
            raise RuntimeError("scheduler state does not fit")

    with pytest.raises(RuntimeError, match="does not fit"):
        load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=opt2, scheduler=Broken())
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(a, m.mask) for a, (_, m) in zip(masks, flex_modules(model2)))
    assert alloc2.state_dict()["history"] == alloc_before["history"]
    assert alloc2.num_events == alloc_before["num_events"]


def test_load_checkpoint_failing_scheduler_puts_optimizer_and_scheduler_back(tmp_path):
    seed_all(0)
    model, opt, sched, alloc = build()
    train(model, opt, sched, alloc, 0, 3)
    save_checkpoint(tmp_path / "c", model, allocator=alloc, optimizer=opt, scheduler=sched, step=3)
    seed_all(1)
    model2, opt2, sched2, alloc2 = build()
    train(model2, opt2, sched2, alloc2, 0, 1)  # state of its own, other than the checkpoint's
    params = [p for p in model2.parameters() if p.requires_grad]
    moments = [{k: v.clone() for k, v in opt2.state[p].items()} for p in params]
    lr = opt2.param_groups[0]["lr"]

    class Failing(torch.optim.lr_scheduler.LambdaLR):  # fails after the optimizer was loaded
        def load_state_dict(self, sd):
            raise KeyError("lr_lambdas")

    failing = Failing(opt2, lambda s: 1.0)
    opt2.param_groups[0]["lr"] = lr  # LambdaLR's constructor set it
    with pytest.raises(KeyError, match="lr_lambdas"):
        load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=opt2, scheduler=failing)
    assert opt2.param_groups[0]["lr"] == lr
    for p, saved in zip(params, moments):
        state = opt2.state[p]
        assert set(state) == set(saved)
        assert all(torch.equal(state[k], saved[k]) for k in saved), "optimizer state not put back"
    assert float(opt2.state[params[0]]["step"]) == 1.0


def test_load_checkpoint_failing_late_hands_a_plain_model_back_plain(tmp_path):
    model, opt, sched, alloc = saved_run(tmp_path / "c")
    plain = LlamaForCausalLM(LLAMA)
    plain.load_state_dict(BASE_STATE)
    linears = {n: m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    flags = {n: p.requires_grad for n, p in plain.named_parameters()}

    class Broken:
        def load_state_dict(self, sd):
            raise RuntimeError("scheduler state does not fit")

    with pytest.raises(RuntimeError, match="does not fit"):
        load_checkpoint(tmp_path / "c", plain, scheduler=Broken())
    assert not flex_modules(plain) and not hasattr(plain, "flexlora_config")
    assert {n: m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)} == linears
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    # the same load without the broken scheduler wraps it and restores the trained adapter
    load_checkpoint(tmp_path / "c", plain)
    trained = dict(flex_modules(model))
    assert all(torch.equal(m.lam, trained[n].lam) and torch.equal(m.mask, trained[n].mask)
               for n, m in flex_modules(plain))


def test_resume_in_a_new_process(tmp_path, straight, checkpoint):
    """The second half really in another interpreter: nothing but the checkpoint carries over."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "final.pt"
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import test_resume as t; "
        "torch.set_num_threads(1); step, objs = t.fresh_loaded(sys.argv[2]); "
        "t.train(*objs, step, t.TOTAL); model, opt, sched, alloc = objs; "
        "torch.save(t.snapshot(model, opt, alloc), sys.argv[3])"
    )
    env = dict(os.environ, FLEXLORA_BACKEND="torch", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(checkpoint), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(straight[0], torch.load(out, weights_only=False))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s.pop("rng"), r"lacks \['rng'\]"),
        (lambda s: s.pop("step"), r"lacks \['step'\]"),
        (lambda s: s.update(step="x"), r"step must be an int, got 'x'"),
        (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), r"RNG states that cannot be restored"),
        (lambda s: s["rng"].update(python=(3, (1, 2), None)), r"RNG states that cannot be restored"),
    ],
    ids=["no-rng", "no-step", "step-str", "torch-rng-size", "python-rng"],
)
@pytest.mark.parametrize("plain", [False, True], ids=["wrapped", "plain"])
def test_a_bad_training_state_is_refused_before_anything_changes(tmp_path, damage, message, plain):
    # found only after the model, optimizer and allocator were overwritten (a KeyError for a
    # missing "rng"), and a plain model was left wrapped
    model, opt, sched, alloc = saved_run(tmp_path / "c")
    state = torch.load(tmp_path / "c" / "training_state.pt", weights_only=True)
    damage(state)
    torch.save(state, tmp_path / "c" / "training_state.pt")
    if plain:
        target = LlamaForCausalLM(LLAMA)
        target.load_state_dict(BASE_STATE)
        with pytest.raises(ValueError, match=message):
            load_checkpoint(tmp_path / "c", target)
        assert not flex_modules(target)
        return
    model2, opt2, sched2, alloc2 = build()
    params = [p for p in model2.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    alloc_before, opt_before = alloc2.state_dict(), opt2.state_dict()
    rng_before = torch.get_rng_state()
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=opt2, scheduler=sched2)
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert alloc2.state_dict() == alloc_before and opt2.state_dict() == opt_before
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_a_training_state_that_is_not_a_dict_is_refused(tmp_path):
    seed_all(0)
    model, opt, sched, alloc = build()
    save_checkpoint(tmp_path / "c", model, step=0)
    torch.save([1, 2], tmp_path / "c" / "training_state.pt")
    target = LlamaForCausalLM(LLAMA)
    with pytest.raises(ValueError, match=r"training_state\.pt' holds a list"):
        load_checkpoint(tmp_path / "c", target)
    assert not flex_modules(target)


def test_an_optimizer_over_the_parameters_in_another_order_is_refused(tmp_path):
    # same group and parameter counts: it loaded, then failed at opt.step() ("size of tensor a (6)
    # must match ... (32)"), or swapped moments silently where shapes coincide
    model, opt, sched, alloc = saved_run(tmp_path / "c")
    model2, _, _, alloc2 = build()
    params = [p for p in model2.parameters() if p.requires_grad]
    reordered = torch.optim.AdamW(params[::-1], lr=2e-2, weight_decay=0.01)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"parameter 0 has shape .*same order"):
        load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=reordered)
    assert all(torch.equal(a, p) for a, p in zip(before, params))


def test_an_optimizer_whose_reordered_parameters_have_the_same_shapes_is_refused(tmp_path):
    # layer 1's adapters listed before layer 0's: every shape matches position by position, so
    # the load went through and layer 1's P took layer 0's moments
    model, opt, sched, alloc = saved_run(tmp_path / "c")
    model2, _, _, alloc2 = build()
    named = [(n, p) for n, p in model2.named_parameters() if p.requires_grad]
    layer0 = [p for n, p in named if ".layers.0." in n]
    layer1 = [p for n, p in named if ".layers.1." in n]
    assert [p.shape for p in layer0] == [p.shape for p in layer1] and len(layer0) + len(layer1) == len(named)
    swapped = torch.optim.AdamW(layer1 + layer0, lr=2e-2, weight_decay=0.01)
    before = [p.detach().clone() for _, p in named]
    with pytest.raises(ValueError, match=r"optimizer parameter group 0 holds 12 parameters in the checkpoint, 12 in the "
                                         r"optimizer given \(same parameters in another order\)"):
        load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=swapped)
    assert all(torch.equal(a, p) for a, (_, p) in zip(before, named)) and not swapped.state
    # the same order loads
    same = torch.optim.AdamW(layer0 + layer1, lr=2e-2, weight_decay=0.01)
    assert load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=same) == 2
    assert torch.equal(same.state[layer1[0]]["exp_avg"], opt.state[[p for n, p in model.named_parameters()
                                                                     if p.requires_grad][len(layer0)]]["exp_avg"])


def test_saving_before_the_allocator_stepped_warns(tmp_path):
    # save_checkpoint(step=2) between opt.step() and alloc.step(2): the resumed run starts at 3 and
    # the step-2 event never happens; only a later gap warning hinted at it
    seed_all(0)
    model, opt, sched, alloc = build()
    train(model, opt, sched, alloc, 0, 1)
    with pytest.warns(UserWarning, match=r"save_checkpoint\(step=2\) but the allocator's last step is 1"):
        save_checkpoint(tmp_path / "c", model, allocator=alloc, optimizer=opt, scheduler=sched, step=2)


def test_loading_into_a_plain_model_does_not_move_the_random_stream(tmp_path):
    seed_all(0)
    model, opt, sched, alloc = build()
    save_checkpoint(tmp_path / "c", model, step=0)
    from flexlora import load_adapter

    plain = LlamaForCausalLM(LLAMA)
    torch.manual_seed(123)
    load_adapter(plain, tmp_path / "c")
    after_load = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_load)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
                                  lambda ps: torch.optim.LBFGS(ps, lr=0.1, max_iter=2)],
                         ids=["torch-adafactor", "lbfgs"])
def test_optimizers_with_factored_or_flat_state_still_resume(tmp_path, make):
    # the parameter-order check refused torch's Adafactor (row_var [m, 1], col_var [1, n]) and an
    # LBFGS whose first parameter is 1-D (flat vectors under it)
    seed_all(0)
    model, _, _, alloc = build()
    params = [p for p in model.parameters() if p.requires_grad]
    params.sort(key=lambda p: p.dim())  # a 1-D parameter (λ) first
    opt = make(params)
    ids = torch.randint(0, LLAMA.vocab_size, (2, 6))

    def closure():
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    opt.step(closure)
    alloc.step(1, opt)
    save_checkpoint(tmp_path / "c", model, allocator=alloc, optimizer=opt, step=1)
    model2, _, _, alloc2 = build()
    params2 = sorted([p for p in model2.parameters() if p.requires_grad], key=lambda p: p.dim())
    opt2 = make(params2)
    assert load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=opt2) == 1


def test_a_late_rng_restore_failure_puts_the_random_streams_back(tmp_path, monkeypatch):
    # e.g. a CUDA device refusing its state after torch's and python's had been set
    import flexlora.checkpoint as ck

    model, opt, sched, alloc = saved_run(tmp_path / "c")
    model2, opt2, sched2, alloc2 = build()
    real, calls = ck._set_rng_state, []

    def failing(state):
        real(state)
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device refused its RNG state")

    monkeypatch.setattr(ck, "_set_rng_state", failing)
    seed_all(7)
    torch_before, py_before = torch.get_rng_state(), random.getstate()
    with pytest.raises(RuntimeError, match="refused"):
        load_checkpoint(tmp_path / "c", model2, allocator=alloc2, optimizer=opt2, scheduler=sched2)
    assert torch.equal(torch.get_rng_state(), torch_before) and random.getstate() == py_before


def _scaled_run(directory, steps, scaler_kw=None):
    """A short run with a GradScaler (growth every 2 steps), saved after ``steps`` steps."""
    seed_all(0)
    model, opt, sched, alloc = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2, **(scaler_kw or {}))
    for step in range(1, steps + 1):
        ids = torch.randint(0, LLAMA.vocab_size, (2, 6))
        scaler.scale(model(input_ids=ids, labels=ids).loss + alloc.orthogonal_loss()).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        alloc.step(step, opt)
        opt.zero_grad()
    save_checkpoint(directory, model, allocator=alloc, optimizer=opt, scheduler=sched, step=steps, scaler=scaler)
    return scaler


def test_a_grad_scaler_resumes_with_its_scale_and_growth_tracker(tmp_path):
    # fp16 training: without its state a resumed GradScaler starts again from init_scale (65536 by
    # default) and an empty growth tracker, so the scale, hence which steps are skipped, differ
    saved = _scaled_run(tmp_path / "c", 3)
    assert saved.state_dict()["_growth_tracker"] == 1 and saved.get_scale() == 2.0**9
    model, opt, sched, alloc = build()
    fresh = torch.amp.GradScaler("cpu")
    load_checkpoint(tmp_path / "c", model, allocator=alloc, optimizer=opt, scheduler=sched, scaler=fresh)
    assert fresh.state_dict() == saved.state_dict()
    # a checkpoint without a scaler state, given a scaler: refused before anything changes
    save_checkpoint(tmp_path / "none", model, allocator=alloc, optimizer=opt, scheduler=sched, step=3)
    model2 = build()[0]
    lam = [m.lam.detach().clone() for _, m in flex_modules(model2)]
    other = torch.amp.GradScaler("cpu", init_scale=4.0)
    with pytest.raises(ValueError, match=r"none.*holds no scaler state.*scaler=None"):
        load_checkpoint(tmp_path / "none", model2, scaler=other)
    assert other.get_scale() == 4.0
    assert all(torch.equal(a, m.lam) for a, (_, m) in zip(lam, flex_modules(model2)))


def test_a_disabled_scaler_state_is_refused_by_an_enabled_scaler_before_anything_changes(tmp_path):
    _scaled_run(tmp_path / "c", 1, scaler_kw=dict(enabled=False))
    model, opt, sched, alloc = build()
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    enabled = torch.amp.GradScaler("cpu", init_scale=4.0)
    with pytest.raises(ValueError, match=r"scaler state is empty \(saved from a disabled GradScaler\)"):
        load_checkpoint(tmp_path / "c", model, allocator=alloc, optimizer=opt, scheduler=sched, scaler=enabled)
    assert all(torch.equal(a, p) for a, p in zip(before, [p for p in model.parameters() if p.requires_grad]))
    assert enabled.get_scale() == 4.0
    # a disabled scaler takes it (there is nothing to restore)
    load_checkpoint(tmp_path / "c", model, allocator=alloc, optimizer=opt, scheduler=sched,
                    scaler=torch.amp.GradScaler("cpu", enabled=False))


def test_a_late_failure_puts_the_scaler_back(tmp_path, monkeypatch):
    import flexlora.checkpoint as ck

    _scaled_run(tmp_path / "c", 3)
    model, opt, sched, alloc = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=7)
    before = scaler.state_dict()
    real, calls = ck._set_rng_state, []

    def failing(state):  # the last restore step fails, after the scaler was loaded
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device refused its RNG state")
        real(state)

    monkeypatch.setattr(ck, "_set_rng_state", failing)
    with pytest.raises(RuntimeError, match="refused"):
        load_checkpoint(tmp_path / "c", model, allocator=alloc, optimizer=opt, scheduler=sched, scaler=scaler)
    assert scaler.state_dict() == before


def test_resuming_training_without_the_saved_scaler_warns(tmp_path):
    _scaled_run(tmp_path / "c", 3)
    model, opt, sched, alloc = build()
    with pytest.warns(UserWarning, match=r"holds a GradScaler state, but load_checkpoint was given no scaler="):
        load_checkpoint(tmp_path / "c", model, allocator=alloc, optimizer=opt, scheduler=sched)
    with warnings.catch_warnings():  # without an optimizer (inference) it is nobody's concern
        warnings.simplefilter("error")
        load_checkpoint(tmp_path / "c", build()[0])
