"""FSDP2 (``fully_shard``): adapters sharded as DTensors train with rank allocation exactly as one
process training on the whole batch does (two CPU processes, gloo), save_adapter gathers them
on every rank and rank 0 writes, and the calls that need the whole model on one process refuse
with one clear error naming the module, before touching the model or the disk.

Shapes are odd on purpose: r_max 5 over 2 ranks shards λ and Q's rows 3 + 2, P's 9 rows 5 + 4
(FSDP2 shards dim 0), so slot writes land on one rank or the other or both.
"""

import copy
import json
import os

import pytest
import torch
import torch.nn as nn

from _ddp import run_workers

WORLD = 2
STEPS = 8


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 9)
        self.b = nn.Linear(9, 6)
        self.head = nn.Linear(6, 3)  # modules_to_save: a trained plain Linear, sharded too

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _write_results(out_dir, rank, results):
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _read_results(out_dir, rank):
    return json.loads((out_dir / f"rank{rank}.json").read_text())


def _config(**kw):
    from flexlora import FlexLoRAConfig

    base = dict(r_init=2, r_max=5, alpha=2.0, target_modules=["a", "b"], modules_to_save=["head"], total_steps=STEPS,
                t_warmup=1, t_final=1, delta_t=1, b0=1, orth_reg=0.1)
    base.update(kw)
    return FlexLoRAConfig(**base)


def _build(cfg):
    import flexlora

    torch.manual_seed(0)
    model = flexlora.wrap(MLP(), cfg)
    with torch.no_grad():  # uneven spectra, so the scores rank the modules apart
        model.a.lam[:2] = torch.tensor([1.0, 0.05])
        model.b.lam[:2] = torch.tensor([0.7, 0.6])
    return model


def _train(model, allocator, data, grad_form, steps, shard_rank=None):
    """`steps` steps of AdamW; shard_rank: this rank's half of each batch (FSDP2), else all of it.
    grad_form "grad": the orthogonality gradient added after backward, else as a loss term;
    "loss" also runs an evaluation forward between the optimizer and allocator steps (after it
    the root unit holds whole copies of b's P, λ, Q, which it discards at its next reshard)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.01)
    events = []
    for t in range(1, steps + 1):
        x, y = data[t - 1]
        if shard_rank is not None:
            half = x.shape[0] // WORLD
            x, y = x[shard_rank * half:(shard_rank + 1) * half], y[shard_rank * half:(shard_rank + 1) * half]
        loss = (model(x) - y).square().mean()
        if grad_form != "grad":
            loss = loss + allocator.orthogonal_loss()
        loss.backward()
        if grad_form == "grad":
            allocator.add_orthogonal_grad_()
        opt.step()
        if grad_form == "loss":
            with torch.no_grad():
                model(x)
        ev = allocator.step(t, opt)
        events.append(None if ev is None else [list(map(list, ev.pruned)), list(map(list, ev.expanded))])
        opt.zero_grad()
    return opt, events


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train_body(rank, out_dir):
    from torch.distributed.fsdp import fully_shard

    import flexlora

    gen = torch.Generator().manual_seed(11)
    data = [(torch.randn(8, 7, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(STEPS)]
    results = {}
    # The orthogonal init runs two steps only: its unit-norm direction, orthogonal to the others,
    # gets an orthogonality gradient of pure rounding noise, which Adam scales to full steps, so
    # one process and two drift apart by rounding alone after a few steps.
    for grad_form, expand_init, steps in (("loss", "zero_impact", STEPS), ("grad", "zero_impact", STEPS),
                                          ("orth-init", "orthogonal", 2)):
        cfg = _config(expand_init=expand_init, b0=3, t_final=0)
        ref = _build(cfg)
        model = copy.deepcopy(ref)
        ref_alloc = flexlora.RankAllocator(ref)
        ref_opt, ref_events = _train(ref, ref_alloc, data, grad_form, steps)

        fully_shard(model.a)
        fully_shard(model.head)
        fully_shard(model)  # holds b: whole from forward to backward (orthogonal_loss reads it so)
        alloc = flexlora.RankAllocator(model)  # built on the sharded model
        opt, events = _train(model, alloc, data, grad_form, steps, shard_rank=rank)

        diffs = {}
        for name in ("a", "b"):
            m, r = getattr(model, name), getattr(ref, name)
            for key in ("P", "lam", "Q"):
                got, want = _whole(getattr(m, key)).detach(), getattr(r, key).detach()
                diffs[f"{name}.{key}"] = [float((got - want).abs().max()), float(want.abs().max())]
                for moment in ("exp_avg", "exp_avg_sq"):
                    g, w = _whole(opt.state[getattr(m, key)][moment]), ref_opt.state[getattr(r, key)][moment]
                    diffs[f"{name}.{key}.{moment}"] = [float((g - w).abs().max()), float(w.abs().max())]
            # inactive slots exactly zero on this rank's part (values and moments)
            off = ~m.mask
            results.setdefault("inactive_nonzero", 0)
            for t in (m.P.to_local()[:, off], opt.state[m.P]["exp_avg"].to_local()[:, off]):
                results["inactive_nonzero"] += int(t.count_nonzero())
        with torch.no_grad():
            head_diff = float((_whole(model.head.weight) - ref.head.weight).abs().max())
        results[grad_form] = {
            "events": events,
            "ref_events": ref_events,
            "masks": [model.a.mask.tolist(), model.b.mask.tolist()],
            "ref_masks": [ref.a.mask.tolist(), ref.b.mask.tolist()],
            "history": alloc.history,
            "ref_history": ref_alloc.history,
            "diffs": diffs,
            "head_diff": head_diff,
            "sharded": type(model.a.lam).__name__,
        }

        # save_adapter gathers on every rank, rank 0 writes; a fresh unsharded model loads it
        target = os.path.join(out_dir, f"adapter-{grad_form}")
        returned = flexlora.save_adapter(model, target, allocator=alloc)
        torch.distributed.barrier()
        torch.manual_seed(0)  # the base weights _build started from
        fresh = flexlora.load_adapter(MLP(), target)
        x = data[0][0]
        with torch.no_grad():
            results[grad_form]["reload_max_diff"] = float((fresh(x) - ref(x)).abs().max())
        results[grad_form]["returned"] = str(returned)
    _write_results(out_dir, rank, results)


def test_fsdp2_rank_allocation_and_save_match_one_process_on_the_whole_batch(tmp_path):
    run_workers(_train_body, tmp_path, WORLD)
    for rank in range(WORLD):
        res = _read_results(tmp_path, rank)
        assert res["inactive_nonzero"] == 0
        for grad_form in ("loss", "grad", "orth-init"):
            r = res[grad_form]
            assert r["sharded"] == "DTensor"
            assert r["events"] == r["ref_events"], (grad_form, r["events"], r["ref_events"])
            moved = [e for e in r["events"] if e and (e[0] or e[1])]
            assert len(moved) >= (2 if grad_form == "orth-init" else 3), r["events"]  # rank moved, more than once
            assert r["masks"] == r["ref_masks"]
            assert len(r["history"]) == len(r["ref_history"])
            for got, want in zip(r["history"], r["ref_history"]):
                assert {k: got[k] for k in ("step", "module", "rank")} == {k: want[k] for k in ("step", "module", "rank")}
                assert abs(got["score"] - want["score"]) <= 1e-5 * max(1.0, abs(want["score"])), (got, want)
            for key, (diff, scale) in r["diffs"].items():
                assert diff <= 1e-5 * max(1.0, scale), (grad_form, key, diff, scale)
            assert r["head_diff"] <= 1e-5
            assert r["reload_max_diff"] <= 1e-5, r["reload_max_diff"]
            assert r["returned"] == str(tmp_path / f"adapter-{grad_form}")


def _refuse_body(rank, out_dir):
    from torch.distributed.fsdp import fully_shard

    import flexlora
    from flexlora import RankAllocator
    from flexlora.checkpoint import _write_adapter

    model = _build(_config())
    ref = copy.deepcopy(model)
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    want = model(x).detach()
    previous = os.path.join(out_dir, "adapter")
    unsharded_ckpt = os.path.join(out_dir, "unsharded-ckpt")
    if rank == 0:
        flexlora.save_adapter(model, previous)  # before sharding: must survive the refused calls
        flexlora.save_checkpoint(unsharded_ckpt, model, optimizer=torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad]))
    torch.distributed.barrier()
    before = open(os.path.join(previous, "adapter_model.safetensors"), "rb").read()

    fully_shard(model.a)
    fully_shard(model)
    out = model(x)  # the root keeps whole parameters until backward: refused all the same
    results = {"forward_max_diff": float((out.detach() - want).abs().max()), "root_P": type(model.b.P).__name__}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    calls = {
        "load_adapter": lambda: flexlora.load_adapter(model, previous),
        "merge": lambda: flexlora.merge(model),
        "unmerge": lambda: flexlora.unmerge(model),
        "merge_and_unload": lambda: flexlora.merge_and_unload(model),
        "unload": lambda: flexlora.unload(model),
        "export_peft": lambda: flexlora.export_peft(model, os.path.join(out_dir, f"peft{rank}")),
        "save_checkpoint": lambda: flexlora.save_checkpoint(os.path.join(out_dir, "ckpt"), model, optimizer=opt),
        "load_checkpoint": lambda: flexlora.load_checkpoint(unsharded_ckpt, model, optimizer=opt),
        # its state is saved by parameter name: a parameter that is not the model's has none
        "stray_optimizer": lambda: flexlora.save_checkpoint(
            os.path.join(out_dir, "ckpt"), model, distributed=True,
            optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + [nn.Parameter(torch.zeros(2))])),
        "sensitivity": lambda: RankAllocator(model, _config(importance="sensitivity")),
    }
    for name, call in calls.items():
        try:
            call()
            results[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the test reads type and message
            results[name] = f"{type(e).__name__}: {e}"

    # a save between forward and backward: the units go back to their shards first (the root's
    # whole copies would be freed under the gather), and backward gathers them again
    mid = os.path.join(out_dir, "midstep")
    flexlora.save_adapter(model, mid)
    out.square().sum().backward()  # now every parameter is a shard again
    ref(x).square().sum().backward()
    results["grad_diffs"] = [float((_whole(getattr(m, k).grad) - getattr(r, k).grad).abs().max())
                             for m, r in ((model.a, ref.a), (model.b, ref.b), (model.head, ref.head))
                             for k in (("P", "lam", "Q") if hasattr(r, "P") else ("weight",))]
    torch.distributed.barrier()
    torch.manual_seed(0)
    with torch.no_grad():
        results["midstep_reload_diff"] = float((flexlora.load_adapter(MLP(), mid)(x) - want).abs().max())
    results["wrap_sharded"] = ""
    plain = MLP()
    fully_shard(plain)  # wrap after fully_shard built FlexLinears over DTensor weights: addmm failed
    try:
        flexlora.wrap(plain, _config())
    except ValueError as e:
        results["wrap_sharded"] = str(e)
    for name, call in calls.items():
        try:
            call()
            results[name + " (between steps)"] = "no error"
        except Exception as e:  # noqa: BLE001
            results[name + " (between steps)"] = f"{type(e).__name__}: {e}"

    # a save that fails on rank 0 (the writer) fails on every rank, and keeps the previous one
    import flexlora.checkpoint as ck

    def broken(tmp, collected):
        _write_adapter(tmp, collected)
        raise OSError("disk full (injected)")

    if rank == 0:
        ck._write_adapter = broken
    try:
        flexlora.save_adapter(model, previous)
        results["failed_save"] = "no error"
    except Exception as e:  # noqa: BLE001
        results["failed_save"] = f"{type(e).__name__}: {e}"
    results["previous_intact"] = open(os.path.join(previous, "adapter_model.safetensors"), "rb").read() == before
    results["peft_dir_made"] = os.path.exists(os.path.join(out_dir, f"peft{rank}"))
    results["ckpt_made"] = os.path.exists(os.path.join(out_dir, "ckpt"))
    results["still_flex"] = type(model.a).__name__
    _write_results(out_dir, rank, results)


@pytest.mark.parametrize("unused", [None], ids=["gloo2"])
def test_fsdp2_whole_model_apis_refuse_clearly_and_a_failed_save_fails_everywhere(tmp_path, unused):
    run_workers(_refuse_body, tmp_path, WORLD)
    for rank in range(WORLD):
        res = _read_results(tmp_path, rank)
        assert res["forward_max_diff"] <= 1e-6, res["forward_max_diff"]
        assert res["root_P"] == "Parameter"  # the state a type check alone would miss
        advice = {
            "load_adapter": "before fully_shard",
            "merge": "save_adapter",
            "unmerge": "save_adapter",
            "merge_and_unload": "save_adapter",
            "unload": "save_adapter",
            "export_peft": "save_adapter",
        }
        for caller, hint in advice.items():
            for msg in (res[caller], res[caller + " (between steps)"]):
                assert msg.startswith("NotImplementedError: "), (caller, msg)
                assert "'a'" in msg and "DTensor" in msg and hint in msg, (caller, msg)
                assert msg.startswith(f"NotImplementedError: {caller}: "), (caller, msg)
        assert max(res["grad_diffs"]) <= 1e-6, res["grad_diffs"]  # the mid-step save did not disturb backward
        assert res["midstep_reload_diff"] <= 1e-6, res["midstep_reload_diff"]
        assert "already sharded by fully_shard" in res["wrap_sharded"], res["wrap_sharded"]
        for suffix in ("", " (between steps)"):
            msg = res["stray_optimizer" + suffix]
            assert msg.startswith("ValueError: save_checkpoint: the optimizer holds 1 parameter(s) that are not the "
                                  "model's"), msg
            msg = res["save_checkpoint" + suffix]
            assert msg.startswith("ValueError: save_checkpoint: the model is sharded by fully_shard: call "
                                  "save_checkpoint(..., distributed=True) on every rank"), msg
            msg = res["load_checkpoint" + suffix]
            assert msg.startswith("ValueError: checkpoint ") and "was saved without fully_shard" in msg, msg
        for msg in (res["sensitivity"], res["sensitivity (between steps)"]):
            assert msg.startswith("NotImplementedError: ") and "'sensitivity'" in msg, msg
        assert res["previous_intact"] and not res["peft_dir_made"] and not res["ckpt_made"]
        assert res["still_flex"].endswith("FlexLinear")  # merge_and_unload replaced nothing
        if rank == 0:
            assert res["failed_save"] == "OSError: disk full (injected)", res["failed_save"]
        else:
            assert res["failed_save"].startswith("RuntimeError: save_adapter to "), res["failed_save"]
            assert "failed on rank 0: OSError: disk full (injected)" in res["failed_save"]


def _post_forward_mesh_body(rank, out_dir):
    # reshard_after_forward=2 on 4 ranks: after forward a unit holds P, Q as DTensors on a 2-rank
    # mesh, FSDP's copies and not its parameters; orthogonal_loss differentiated through them and
    # the penalty's gradient never reached P.grad (0.98 off), and a save gathered other values
    from torch.distributed.fsdp import fully_shard

    import flexlora

    cfg = _config(orth_reg=1.0)
    model = _build(cfg)
    with torch.no_grad():  # far from orthonormal: a large penalty gradient
        for m in (model.a, model.b):
            m.P.mul_(20)
            m.Q.mul_(20)
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 7, generator=gen), torch.randn(8, 3, generator=gen)
    ref_alloc = flexlora.RankAllocator(ref)
    ((ref(x) - y).square().mean() + ref_alloc.orthogonal_loss()).backward()

    for unit in (model.a, model.b, model.head, model):
        fully_shard(unit, reshard_after_forward=2)
    alloc = flexlora.RankAllocator(model)
    part = x.shape[0] // 4
    rows = slice(rank * part, (rank + 1) * part)
    out = model(x[rows])
    post_forward = type(model.a.P).__name__
    ((out - y[rows]).square().mean() + alloc.orthogonal_loss()).backward()
    grads = {(n, k): _whole(getattr(getattr(model, n), k).grad) for n in ("a", "b") for k in ("P", "lam", "Q")}
    # the same where FSDP's internals are laid out otherwise (no map of its sharded parameters):
    # orthogonal_loss reshards all the same
    import flexlora.alloc.allocator as allocator_module

    model.zero_grad()
    found, allocator_module.registered_shards = allocator_module.registered_shards, lambda units: None
    try:
        out = model(x[rows])
        ((out - y[rows]).square().mean() + alloc.orthogonal_loss()).backward()
    finally:
        allocator_module.registered_shards = found
    blind = {(n, k): _whole(getattr(getattr(model, n), k).grad) for n in ("a", "b") for k in ("P", "lam", "Q")}
    # a save between another forward and its backward (the smaller-mesh copies are held again)
    model.zero_grad()
    out = model(x[rows])
    flexlora.save_adapter(model, os.path.join(out_dir, "adapter"))
    out.sum().backward()
    results = {
        "post_forward": post_forward,
        "grad_diffs": {f"{label}{n}.{k}": [float((got[n, k] - getattr(getattr(ref, n), k).grad).abs().max()),
                                           float(getattr(getattr(ref, n), k).grad.abs().max())]
                       for label, got in (("", grads), ("no internals: ", blind))
                       for n in ("a", "b") for k in ("P", "lam", "Q")},
    }
    torch.distributed.barrier()
    from safetensors.torch import load_file

    saved = load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))
    results["saved_diff"] = max(float((saved[f"{n}.{k}"] - getattr(getattr(ref, n), k)).abs().max())
                                for n in ("a", "b") for k in ("P", "lam", "Q"))
    _write_results(out_dir, rank, results)


def test_fsdp2_reshard_after_forward_to_a_smaller_mesh_keeps_the_penalty_gradient_and_saves(tmp_path):
    run_workers(_post_forward_mesh_body, tmp_path, 4)
    for rank in range(4):
        res = _read_results(tmp_path, rank)
        assert res["post_forward"] == "DTensor"
        for key, (diff, scale) in res["grad_diffs"].items():
            assert diff <= 1e-5 * max(1.0, scale), (key, diff, scale)
        assert res["saved_diff"] == 0.0, res["saved_diff"]


def _run_steps(model, allocator, opt, sched, data, first, last, rank):
    """Steps first..last (1-based) on this rank's half of each batch (rank None: all of it),
    allocation after each. b's base bias, unfrozen by hand, is frozen for steps 3-5: it keeps
    its Adam state meanwhile, which must survive a resume at step 4."""
    for t in range(first, last + 1):
        model.b.bias.requires_grad_(not 3 <= t <= 5)
        x, y = data[t - 1]
        if rank is not None:
            half = x.shape[0] // WORLD
            x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        ((model(x) - y).square().mean() + allocator.orthogonal_loss()).backward()
        opt.step()
        sched.step()
        allocator.step(t, opt)
        opt.zero_grad()


def _sharded_run(rank, load_from=None, save_to=None, save_at=4, shard=True):
    """A fresh FSDP2 model (shard False: a plain one, trained on whole batches), allocator,
    AdamW and LR schedule (b's base bias unfrozen by hand: a trained parameter outside the
    adapter); trains to STEPS, saving or loading at `save_at`."""
    from torch.distributed.fsdp import fully_shard

    import flexlora

    gen = torch.Generator().manual_seed(11)
    data = [(torch.randn(8, 7, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(STEPS)]
    model = _build(_config(b0=3, t_final=0))
    model.b.bias.requires_grad_(True)
    if shard:
        fully_shard(model.a)
        fully_shard(model.head)
        fully_shard(model)
    else:
        rank = None
    allocator = flexlora.RankAllocator(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    if load_from is not None:
        model.b.bias.requires_grad_(not 3 <= save_at <= 5)  # as the saving run left it
        start = flexlora.load_checkpoint(load_from, model, allocator, opt, sched) + 1
    else:
        _run_steps(model, allocator, opt, sched, data, 1, save_at, rank)
        flexlora.save_checkpoint(save_to, model, allocator, opt, sched, step=save_at, distributed=True)
        start = save_at + 1
    _run_steps(model, allocator, opt, sched, data, start, STEPS, rank)
    with torch.no_grad():
        values = {f"{n}.{k}": _whole(getattr(getattr(model, n), k)).clone()
                  for n in ("a", "b") for k in ("P", "lam", "Q", "mask")}
        values.update({"head.weight": _whole(model.head.weight).clone(), "b.bias": _whole(model.b.bias).clone()})
        values.update({f"{n}.{k}.{m}": _whole(opt.state[getattr(getattr(model, n), k)][m]).clone()
                       for n in ("a", "b") for k in ("P", "lam", "Q") for m in ("exp_avg", "exp_avg_sq")})
    if shard:  # what a save gathers: only rank 0, the writer, keeps a CPU copy
        from flexlora.checkpoint import _gather_sharded_training_state

        collected, trained, optim_state = _gather_sharded_training_state(model, allocator, opt)
        values["kept"] = torch.tensor([len(collected[0]), len(trained), len(optim_state["state"])])
    return values, allocator.history, sched.get_last_lr()


def _resume_body(rank, out_dir):
    import flexlora

    ckpt = os.path.join(out_dir, "ckpt")
    straight, history, lr = _sharded_run(rank, save_to=ckpt)
    resumed, history2, lr2 = _sharded_run(rank, load_from=ckpt)
    # a save before the first step must not move the run (torch's gather of an optimizer without
    # state ran a zero-lr step: every Adam step count one ahead)
    early, _, _ = _sharded_run(rank, save_to=os.path.join(out_dir, "ckpt0"), save_at=0)
    # an optimizer other than the saving run's is refused before anything changes
    from torch.distributed.fsdp import fully_shard

    model = _build(_config(b0=3, t_final=0))
    for unit in (model.a, model.head, model):
        fully_shard(unit)
    allocator = flexlora.RankAllocator(model)
    refusals = {}
    trained = [p for p in model.parameters() if p.requires_grad]  # b.bias not unfrozen: one fewer
    for label, opt in (("missing", torch.optim.AdamW(trained)),
                       ("groups", torch.optim.AdamW([{"params": trained[:2]}, {"params": trained[2:] + [model.b.bias]}]))):
        before = [p.detach().clone() for p in trained]
        try:
            flexlora.load_checkpoint(ckpt, model, allocator, opt)
            refusals[label] = "no error"
        except ValueError as e:
            refusals[label] = str(e)
        refusals[label + " untouched"] = all(torch.equal(a, b.detach()) for a, b in zip(before, trained)) and not opt.state
    # the same checkpoint resumed by one process on whole batches (a plain model)
    alone, history3, _ = _sharded_run(rank, load_from=ckpt, shard=False)
    resumed.pop("kept")
    early.pop("kept")
    kept = straight.pop("kept").tolist()
    results = {
        "refusals": refusals,
        "early_diffs": {k: float((early[k].double() - v.double()).abs().max()) for k, v in straight.items()},
        "kept": kept,
        "diffs": {k: float((resumed[k].double() - v.double()).abs().max()) for k, v in straight.items()},
        "alone_diffs": {k: float((alone[k].double() - v.double()).abs().max()) for k, v in straight.items()},
        "same_history": history == history2,
        "alone_history": [(r["step"], r["module"], r["rank"]) for r in history3] == [
            (r["step"], r["module"], r["rank"]) for r in history],
        "events": len({r["step"] for r in history}),
        "lr": [lr, lr2],
    }
    _write_results(out_dir, rank, results)


def test_fsdp2_checkpoint_resumes_exactly(tmp_path):
    # save_checkpoint(distributed=True) gathers the adapter, trained values and the optimizer's
    # state by parameter name; load_checkpoint gives every rank its parts back
    run_workers(_resume_body, tmp_path, WORLD)
    for rank in range(WORLD):
        res = _read_results(tmp_path, rank)
        assert res["same_history"] and res["events"] > 3
        assert res["lr"][0] == res["lr"][1]
        for key, diff in res["diffs"].items():
            assert diff <= 1e-6, (key, diff)
        assert res["alone_history"]
        # adapter tensors, trained values, optimizer states kept by the gather: rank 0 only
        if rank == 0:
            assert min(res["kept"]) > 0, res["kept"]
        else:
            assert res["kept"] == [0, 0, 0], res["kept"]
        for key, diff in res["early_diffs"].items():
            assert diff <= 1e-6, ("saved at step 0", key, diff)
        assert "group 0 holds" in res["refusals"]["missing"] and "missing here: ['b.bias']" in res["refusals"]["missing"]
        assert "2 parameter groups, the optimizer given has 1" in res["refusals"]["groups"] or \
            "1 parameter groups, the optimizer given has 2" in res["refusals"]["groups"], res["refusals"]["groups"]
        assert res["refusals"]["missing untouched"] and res["refusals"]["groups untouched"]
        for key, diff in res["alone_diffs"].items():
            assert diff <= 1e-5, (key, diff)
