"""`flexlora train` and the allocator on a GPU (CUDA machines only).

Collected only where CUDA is visible and the Triton interpreter is off (tests/conftest.py):

    TRITON_INTERPRET=0 python -m pytest -q tests/test_train_cuda.py

The CPU runs of the same loop are the reference: one seed gives the same data order, the same
adapter init (drawn on the CPU for every device) and the same allocation draws, so a fp32 run on
the GPU must retrace the CPU run to rounding.
"""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn as nn

import flexlora
from flexlora import FlexLinear, FlexLoRAConfig, RankAllocator
from flexlora.train import TrainOptions, lm_loss, load_model, run, tokenize
from test_train import tiny  # noqa: F401  (the CPU tests' tiny models and data: a fixture)

DEV = torch.device("cuda")


def _opts(out, **kw):
    base = dict(steps=24, batch_size=16, lr=5e-2, r=4, progress=False, output_dir=str(out), log_every=8,
                delta_t=2, b0=2)
    base.update(kw)
    return TrainOptions(**base)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fp32_run_on_the_gpu_retraces_the_cpu_run(tiny, tmp_path):
    kw = dict(model=str(tiny["llama"]), data=str(tiny["lm_jsonl"]))
    cpu = run(_opts(tmp_path / "cpu", device="cpu", **kw))
    gpu = run(_opts(tmp_path / "gpu", device="cuda", **kw))
    assert cpu["device"] == "cpu" and gpu["device"].startswith("cuda") and gpu["device_name"]
    l_cpu = [float(r["loss"]) for r in _csv(tmp_path / "cpu" / "train_log.csv")]
    l_gpu = [float(r["loss"]) for r in _csv(tmp_path / "gpu" / "train_log.csv")]
    assert max(abs(a - b) / a for a, b in zip(l_cpu, l_gpu)) < 1e-4, (l_cpu, l_gpu)
    # the same allocation events: every module's rank at every recorded step
    ranks = [[(r["step"], r["module"], r["rank"]) for r in _csv(tmp_path / d / "rank_history.csv")] for d in ("cpu", "gpu")]
    assert ranks[0] == ranks[1]
    assert {int(r[2]) for r in ranks[0]} != {4}, "no event moved a rank: the comparison saw no allocation"
    assert abs(cpu["test_loss_after"] - gpu["test_loss_after"]) < 1e-4 * cpu["test_loss_after"]


def test_adapter_trained_on_the_gpu_reloads_on_the_cpu(tiny, tmp_path):
    """Saved from CUDA tensors, loaded into a plain CPU model: the same test loss as the GPU run's."""
    m = run(_opts(tmp_path, model=str(tiny["llama"]), data=str(tiny["lm_jsonl"]), device="cuda"))
    model, tok = load_model(tiny["llama"], "causal-lm", None)
    flexlora.load_adapter(model, tmp_path / "adapter")
    assert all(p.device.type == "cpu" for p in model.parameters())
    # the run's test split: the last 10 % of the shuffled file, as split() draws it
    from flexlora.data import load_dataset, split

    _, test = split(load_dataset(str(tiny["lm_jsonl"])), len(load_dataset(str(tiny["lm_jsonl"]))) // 10, 0)
    ids = [x for x in tokenize(tok, test.texts, 64) if len(x) >= 2]
    assert abs(lm_loss(model, ids, tok.pad_token_id) - m["test_loss_after"]) < 1e-4 * m["test_loss_after"]


def test_bf16_run_on_the_gpu(tiny, tmp_path):
    m = run(_opts(tmp_path, model=str(tiny["llama"]), data=str(tiny["lm_jsonl"]), device="cuda", precision="bf16"))
    assert m["precision"] == "bf16" and m["loss_last"] < 0.9 * m["loss_first"], (m["loss_first"], m["loss_last"])
    assert m["test_loss_after"] < m["test_loss_before"]


def test_classifier_and_peft_methods_on_the_gpu(tiny, tmp_path):
    # the classifier in bf16 (the CPU suite, run on a GPU machine, trains it in fp32 there)
    m = run(_opts(tmp_path / "cls", model=str(tiny["bert"]), data=str(tiny["cls_jsonl"]), device="cuda", steps=16,
                  precision="bf16"))
    assert m["task"] == "classify" and m["precision"] == "bf16" and 0.0 <= m["test_accuracy_after"] <= 1.0
    assert (tmp_path / "cls" / "classifier_head.safetensors").is_file()
    for method in ("lora", "adalora"):
        m = run(_opts(tmp_path / method, model=str(tiny["llama"]), data=str(tiny["lm_jsonl"]), device="cuda",
                      method=method, t_warmup=4, t_final=4))
        assert m["loss_last"] < m["loss_first"], method
        assert (tmp_path / method / "adapter" / "adapter_config.json").is_file()


def test_sensitivity_allocator_under_fp16_gradscaler_on_the_gpu():
    """The real setting of a GradScaler skip: fp16 autocast on a GPU, an overflowing first step.
    The sensitivity EMAs skip it as the optimizer does, stay finite, and the next event moves ranks."""
    torch.manual_seed(0)
    bank = nn.ModuleList([FlexLinear(16, 24, r_max=4, r_init=2, alpha=1.0) for _ in range(3)]).to(DEV)
    with torch.no_grad():
        for m in bank:
            m.lam.normal_()
    cfg = FlexLoRAConfig(r_init=2, r_max=4, target_modules=["x"], importance="sensitivity", total_steps=20,
                         t_warmup=2, t_final=0, delta_t=2, b0=1)
    al = RankAllocator(bank, cfg)
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)  # only the 1e30 step overflows fp16
    x = torch.randn(8, 16, device=DEV)
    events = []
    for step in range(1, 5):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = sum(m(x).float().square().mean() for m in bank) * (1e30 if step == 1 else 1.0)
        scaler.scale(loss).backward()
        finite = all(torch.isfinite(p.grad).all() for p in bank.parameters() if p.grad is not None)
        assert finite == (step != 1), step
        scaler.step(opt)
        scaler.update()
        events.append(al.step(step, opt))
        opt.zero_grad()
    assert (al.importance.steps, al.importance.skipped) == (3, 1)
    assert all(torch.isfinite(t).all() for t in al.importance.ipt + al.importance.unc)
    moved = [e for e in events if e is not None and e.pruned and e.expanded]
    assert moved, "no allocation event pruned and expanded"
    assert sum(int(m.mask.sum()) for m in bank) == 6, "the rank budget moved"
