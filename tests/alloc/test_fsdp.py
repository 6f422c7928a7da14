"""FSDP2 (``fully_shard``) leaves P, λ, Q as DTensor shards. The forward and backward work on
them (FSDP gathers whole tensors for the op), but rank events, save, load, merge and export
need whole tensors on every rank: each must refuse with one clear error naming the module,
before touching the model or the disk (two CPU processes, gloo)."""

import json
import os

import torch
import torch.nn as nn

from _ddp import run_workers

WORLD = 2


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _body(rank, out_dir):
    from torch.distributed.fsdp import fully_shard

    import flexlora
    from flexlora import FlexLoRAConfig, RankAllocator

    torch.manual_seed(0)
    cfg = FlexLoRAConfig(r_init=2, r_max=4, alpha=2.0, target_modules=["a", "b"], total_steps=10,
                         t_warmup=1, t_final=1, delta_t=1, b0=1)
    model = flexlora.wrap(MLP(), cfg)
    with torch.no_grad():
        for _, m in flexlora.flex_modules(model):
            m.lam.normal_()  # a non-zero adapter, so the forward check below sees ΔW
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    want = model(x).detach()
    previous = os.path.join(out_dir, f"adapter{rank}")
    flexlora.save_adapter(model, previous)  # before sharding: must survive the refused save
    before = open(os.path.join(previous, "adapter_model.safetensors"), "rb").read()

    fully_shard(model)
    got = model(x)
    got.square().sum().backward()  # the op's backward runs on the gathered tensors
    results = {
        "sharded": type(model.a.lam).__name__,
        "forward_max_diff": float((got.detach() - want).abs().max()),
        "grad_finite": bool(torch.isfinite(model.a.P.grad.full_tensor()).all()),
    }
    calls = {
        "RankAllocator": lambda: RankAllocator(model),
        "save_adapter": lambda: flexlora.save_adapter(model, previous),
        "load_adapter": lambda: flexlora.load_adapter(model, previous),
        "merge": lambda: flexlora.merge(model),
        "unmerge": lambda: flexlora.unmerge(model),
        "merge_and_unload": lambda: flexlora.merge_and_unload(model),
        "export_peft": lambda: flexlora.export_peft(model, os.path.join(out_dir, f"peft{rank}")),
    }
    for name, call in calls.items():
        try:
            call()
            results[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the test reads type and message
            results[name] = f"{type(e).__name__}: {e}"
    results["previous_intact"] = open(os.path.join(previous, "adapter_model.safetensors"), "rb").read() == before
    results["peft_dir_made"] = os.path.exists(os.path.join(out_dir, f"peft{rank}"))
    results["still_flex"] = type(model.a).__name__
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_fsdp2_sharded_adapters_train_but_whole_tensor_apis_refuse_clearly(tmp_path):
    run_workers(_body, tmp_path, WORLD)
    for rank in range(WORLD):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["sharded"] == "DTensor"
        assert res["forward_max_diff"] <= 1e-6, res["forward_max_diff"]
        assert res["grad_finite"]
        for caller in ("RankAllocator", "save_adapter", "load_adapter", "merge", "unmerge", "merge_and_unload",
                       "export_peft"):
            msg = res[caller]
            assert msg.startswith("NotImplementedError: "), (caller, msg)
            assert "'a'" in msg and "DTensor" in msg and "DistributedDataParallel" in msg, (caller, msg)
        assert res["previous_intact"] and not res["peft_dir_made"]
        assert res["still_flex"].endswith("FlexLinear")  # merge_and_unload replaced nothing
