"""Embeddings from a decoder (Llama, Qwen2): the final hidden states of a prompt, pooled.

Ollama and llama.cpp embed with any generative model this way: run the prompt as a prefill,
take the hidden states after the final norm (what the LM head would read), pool them: the
last token's by default (with causal attention only it has seen the whole text), or the mean.

The prompts run as one step of prefill chunks through the model's unchanged forward pass
(:meth:`LlamaForCausalLM.forward`), with a KV cache of their own that lives for this call
only: each prompt gets the blocks ``[first, first + ceil(n / block_size))`` of it, in order.
Nothing of the engine's cache is touched, so this can run between engine steps.
"""

from __future__ import annotations

import torch

from pagedserve.models.llama import LlamaForCausalLM
from pagedserve.models.pooling import PoolingType, pool
from pagedserve.ops.attention import TORCH_BACKEND, AttentionBackend, AttentionDims
from pagedserve.worker.step_inputs import StepChunk, StepInputs

BLOCK_SIZE = 16


@torch.inference_mode()
def prompt_hidden_states(model: LlamaForCausalLM, prompts: list[list[int]],
                         backend: AttentionBackend = TORCH_BACKEND
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of each prompt: ((N, H) rows packed prompt after prompt, in the
    model's dtype; cu_seqlens (B + 1,) int64). `backend` must be the one the model was built
    with (its ``paged_attention`` is bound into the layers)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("input must hold at least one token per text")
    config = model.config
    device, dtype = model.embed.device, model.embed.dtype
    chunks, next_block = [], 0
    for ids in prompts:
        table = list(range(next_block, next_block + -(-len(ids) // BLOCK_SIZE)))
        next_block += len(table)
        chunks.append(StepChunk(list(ids), 0, table, samples=False))
    shape = (next_block, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype, device=device),
               torch.zeros(shape, dtype=dtype, device=device)) for _ in range(config.num_layers)]
    inputs = StepInputs(sum(len(p) for p in prompts), len(prompts),
                        max(len(c.block_table) for c in chunks), BLOCK_SIZE, device)
    batch = inputs.prepare(chunks)
    num_tokens = batch.input_ids.shape[0]
    if model.decoder_layers.uses_attention_backend(batch.meta, num_tokens):
        backend.prepare(batch.meta, AttentionDims(config.num_heads, config.num_kv_heads,
                                                  config.head_dim))
    hidden = model.forward(batch.input_ids, batch.positions, caches, batch.meta)
    cu_seqlens = torch.tensor(batch.meta.query_start_loc_host, dtype=torch.int64)
    return hidden, cu_seqlens


def pooled_hidden_states(model: LlamaForCausalLM, prompts: list[list[int]],
                         pooling: PoolingType = "last",
                         backend: AttentionBackend = TORCH_BACKEND) -> torch.Tensor:
    """(B, H) float32: each prompt's final hidden states pooled (see the module docstring)."""
    hidden, cu_seqlens = prompt_hidden_states(model, prompts, backend)
    return pool(hidden, cu_seqlens, pooling)
