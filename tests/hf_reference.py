"""transformers' greedy tokens for a saved model directory: the reference (tests' helper)."""

from __future__ import annotations

import torch


def hf_greedy(model_dir, prompts: list[list[int]], n: int) -> list[list[int]]:
    """`n` greedy tokens after each prompt (equal lengths, batched), float32, EOS ignored."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=n, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()
