"""How a model's decoder layers run for a step: one :class:`DecoderLayers` object, chosen when
the model is built and swapped only between steps (when CPU kernels built in the background
arrive: :meth:`~pagedserve.models.llama.LlamaForCausalLM.use_kernels`).

    implementation  runs                                              attention
    TorchLayers     each DecoderLayer in turn, op by op               the backend chosen at
                                                                      start-up (torch, Triton)
    NativeLayers    every layer in one call of the CPU kernels'       its own, inside the call
                    Decoder (a float32 model on Q4_1 tiles); a step
                    it cannot take goes op by op

Both take the embedded tokens x (T, H) float32 and return the residual stream after the last
layer as the pair the final norm adds, ``(x, residual)``. The runner asks the object, not the
device or the model's fields, whether a step goes through the attention backend (which then
needs its per-step preparation), whether a row's result depends on the rows beside it, and
how many threads torch's own ops get beside it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pagedserve.ops.attention import AttentionMetadata
from pagedserve.ops.cpu_kernels import Decoder

# steps of up to this many tokens, prompts included, take the native decoder where it is built:
# in practice every step, since it beats the per-op path at every batch size measured
# (docs/performance.md has the figures)
NATIVE_STEP_TOKENS = 1 << 16

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer its K and V cache


class DecoderLayers(Protocol):
    """The decoder layers of a model, run for one step."""

    name: str  # "torch" or "native", for logs and tests
    # whether a token's result depends only on its own row, never on the other rows of the
    # step (so that a prompt's tail rounds alike alone or within the whole prompt)
    rows_alone: bool

    def uses_attention_backend(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether this step's attention runs through the attention backend, which the caller
        then prepares for the step (``AttentionBackend.prepare``) before calling."""

    def torch_threads(self, budget: int) -> int:
        """How many threads torch's own ops compute with beside these layers, of `budget`."""

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (T, H) float32, the embedded tokens (may be updated in place) -> the residual
        stream after the last layer as (x, residual): their sum, the final norm's input."""


class TorchLayers:
    """Each layer in turn, op by op (``llama.DecoderLayer``): the matmuls through their
    ``Linear``'s kernel, attention through the backend the layers were built with."""

    name = "torch"
    rows_alone = False  # MKL's float32 GEMM rounds a row by the rows beside it

    def __init__(self, layers: list, rotary) -> None:
        """`layers`: the model's DecoderLayers; `rotary`: its Rotary tables."""
        self.layers, self.rotary = layers, rotary

    def uses_attention_backend(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return True

    def torch_threads(self, budget: int) -> int:
        return budget

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        rope = self.rotary.at(positions)  # gathered once for all layers
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, kv_cache, meta)
        return x, residual


class NativeLayers:
    """Every layer of a step in one call of the CPU kernels' :class:`Decoder`, which computes
    each row alone (its matmuls and its attention). Steps it cannot take (more than
    ``NATIVE_STEP_TOKENS`` tokens, or rows padded past the step's tokens) run `per_op`."""

    name = "native"
    rows_alone = True

    def __init__(self, decoder: Decoder, per_op: TorchLayers) -> None:
        self.decoder, self.per_op = decoder, per_op

    def takes_step(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether this step runs as one native call."""
        return num_tokens <= NATIVE_STEP_TOKENS and meta.num_actual_tokens == num_tokens

    def uses_attention_backend(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return not self.takes_step(meta, num_tokens)

    def torch_threads(self, budget: int) -> int:
        # torch's own ops (embedding, final norm, sampling) are small then, and OpenMP's
        # workers spin for a while after each one, on the cores the kernels' pool is about to
        # use (docs/performance.md): torch computes on one thread, the kernels keep the budget
        return 1

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.takes_step(meta, x.shape[0]):
            return self.per_op(x, positions, kv_caches, meta)
        lens, tables = native_rows(positions, meta)
        x = self.decoder.forward(x, positions, meta.slot_mapping, lens, tables,
                                 [c for kv in kv_caches for c in kv])
        return x, None


def native_rows(positions: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's context length and block table row, as the native decoder takes them: a
    prompt's token at position p is a query over the p + 1 tokens up to itself (causal
    attention, row by row), in its request's blocks."""
    if meta.num_prefills == 0:  # one token per request
        return meta.seq_lens, meta.block_tables
    counts = torch.tensor(meta.query_start_loc_host).diff()
    tables = meta.block_tables[: len(counts)].repeat_interleave(counts, dim=0)
    return (positions + 1).to(torch.int32), tables
