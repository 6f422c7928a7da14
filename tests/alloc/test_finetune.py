"""200 CPU optimizer steps of a tiny config-built LLaMA with FlexLoRA adapters and the allocator
in a plain training loop: the loss falls, ranks really move, and the budget never changes."""

import torch

import flexlora
from flexlora import FlexLoRAConfig, RankAllocator
from _tiny_hf import llama_model

STEPS = 200



def tiny_llama(seed=0):
    return llama_model(seed=seed, vocab=32, intermediate=64, max_positions=64, initializer_range=0.3)


def batch(g, n=16, length=12, vocab=32):
    """Arithmetic sequences mod vocab: token t+1 = token t + step, step in {1, 2, 3} per row —
    learnable from context, not from unigram statistics."""
    start = torch.randint(0, vocab, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(length)) % vocab


def test_plain_loop_finetune_moves_ranks_and_keeps_budget():
    model = tiny_llama()
    cfg = FlexLoRAConfig(
        r_init=4, r_max=8, alpha=16.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        total_steps=STEPS, t_warmup=20, t_final=40, delta_t=10, b0=3, orth_reg=0.01, seed=0,
    )
    flexlora.wrap(model, cfg)
    allocator = RankAllocator(model)
    budget = allocator.total_rank
    assert budget == 14 * 4
    start_ranks = allocator.ranks()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    losses, moved = [], 0
    for step in range(1, STEPS + 1):
        ids = batch(g)
        loss = model(input_ids=ids, labels=ids).loss
        (loss + allocator.orthogonal_loss()).backward()
        opt.step()
        event = allocator.step(step, opt)
        opt.zero_grad()
        losses.append(loss.item())
        if event is not None:
            moved += len(event.pruned) + len(event.expanded)
            assert event.total_rank == budget
        assert allocator.total_rank == budget
        assert flexlora.count_parameters(model).total_rank == budget

    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    end_ranks = allocator.ranks()
    assert end_ranks != start_ranks and moved >= 10
    assert max(end_ranks.values()) > 4 and min(end_ranks.values()) < 4
    assert allocator.num_events == len(range(20, STEPS - 40 + 1, 10))
    # Frozen ranks in the final phase: no history rows after T - t_final.
    assert max(r["step"] for r in allocator.history) == STEPS - 40
