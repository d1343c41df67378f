"""Tiny Llamas and batches shared by the objective and online-teacher unit tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.tasks.data import Batch

WORDS = 40  # tokenizer ids; models may have more (padding) rows
PAD = 8


def tiny_llama(rows: int, layers: int = 2, seed: int = 0, pad_mass: bool = False) -> LlamaForCausalLM:
    """A tiny Llama with ``rows`` embedding/output rows; ``pad_mass``: output rows ≥ WORDS copy rows 0.. so the
    padding ids carry real probability (what a cache then stores)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64, tie_word_embeddings=not pad_mass))
    if pad_mass:
        with torch.no_grad():
            model.lm_head.weight[WORDS:] = model.lm_head.weight[: rows - WORDS] * 2.0
    return model.eval()


def tiny_batch(b=2, length=6, seed=0) -> Batch:
    ids = torch.randint(0, WORDS, (b, length + 1), generator=torch.Generator().manual_seed(seed))
    return Batch(ids[:, :-1], ids[:, 1:], None)
