"""Tiny Hugging Face model folders and datasets built offline, for the CLI / training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "movie", "plot", "was", "actors", "film", "story", "quite", "really", "a"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_tokenizer(path: Path) -> int:
    """A lowercase whitespace WordLevel tokenizer over the words above; returns the vocab size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + POSITIVE + NEGATIVE + FILLER)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]",
    )
    fast.save_pretrained(str(path))
    return len(vocab)


def llama_model(layers=2, hidden=32, vocab=64, intermediate=48, max_positions=32, seed=0, **extra):
    """A config-built ``LlamaForCausalLM`` with random weights drawn after ``torch.manual_seed(seed)``
    (4 heads, 2 KV heads; ``extra`` goes to ``LlamaConfig``), for in-memory tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, **extra,
    )
    return LlamaForCausalLM(cfg)


def tiny_bert(path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    path.mkdir(parents=True, exist_ok=True)
    v = save_tokenizer(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                     initializer_range=0.2)
    BertModel(cfg).save_pretrained(str(path))
    return path


def tiny_llama(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    v = save_tokenizer(path)
    model = llama_model(vocab=v, intermediate=64, max_positions=64, pad_token_id=0, bos_token_id=2,
                        eos_token_id=3, initializer_range=0.2)
    model.save_pretrained(str(path))
    return path


def sentiment_rows(n: int, seed: int = 0):
    """Texts of 5-8 words holding one sentiment word; label 1 = positive."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 7))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_run_inputs(root: Path, rows) -> dict:
    """What a `flexlora train` test runs on, under ``root``: the tiny BERT and LLaMA folders,
    ``rows`` as labelled JSON Lines ("data") and their texts alone ("lm")."""
    return {
        "bert": tiny_bert(root / "bert"),
        "llama": tiny_llama(root / "llama"),
        "data": write_jsonl(root / "d.jsonl", rows),
        "lm": write_jsonl(root / "lm.jsonl", [{"text": r["text"]} for r in rows]),
    }


def write_csv(path: Path, rows) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
