"""Where lists become tensors: the scheduler's plan -> one forward pass -> sampled tokens.

The runner owns the model and the KV cache tensors (one K and one V tensor per layer, shaped
``[num_blocks, block_size, num_kv_heads, head_dim]``). For each step it flattens the scheduled
tokens (decodes first, then prefill chunks), computes each token's position and cache slot, runs
the model, and samples one token for every request whose chunk reached its last known token.

    slot of position p = block_table[p // block_size] * block_size + p % block_size
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pagedserve.attention import AttentionDims, AttentionMetadata, select_backend
from pagedserve.config import EngineConfig, ModelConfig
from pagedserve.models.llama import LlamaForCausalLM
from pagedserve.sampler import SampledToken, Sampler
from pagedserve.scheduler import ScheduledRequest

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """``"auto"``: bfloat16 where the hardware computes it natively, else float32."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def kv_bytes_per_token(config: ModelConfig, dtype: str) -> int:
    """Bytes of K and V for one token across all layers."""
    itemsize = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


@dataclass(slots=True)
class StepChunk:
    """One request's share of a step: tokens at positions [start, start + len(token_ids))."""

    token_ids: list[int]
    start: int
    block_table: list[int]  # covers at least positions [0, start + len(token_ids))
    samples: bool  # the chunk ends at the request's last known token: sample after it
    # one sampled token, the input of a decode: attends on the decode path (rows [0, D)). A
    # one-token prompt tail is not one: it attends as a prefill chunk, as it would in a longer one
    is_decode: bool = False


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        engine_config: EngineConfig,
        num_blocks: int,
    ):
        self.config = config
        self.block_size = engine_config.block_size
        self.device = torch.device(engine_config.device)
        self.dtype = DTYPES[engine_config.dtype]
        if engine_config.num_threads:
            torch.set_num_threads(engine_config.num_threads)
        low_bit = (engine_config.low_bit_small_steps and self.dtype == torch.bfloat16
                   and self.device.type == "cpu")
        self.attention = select_backend(engine_config.attention_backend, self.device)
        self.dims = AttentionDims(config.num_heads, config.num_kv_heads, config.head_dim)
        self.model = LlamaForCausalLM(config, weights, self.dtype, self.device, low_bit,
                                      attention=self.attention.paged_attention)
        shape = (num_blocks, self.block_size, config.num_kv_heads, config.head_dim)
        # Zeroed, not empty: masked attention weights are exactly 0, but 0 * NaN garbage is not.
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(config.num_layers)
        ]
        self.sampler = Sampler(engine_config.seed)
        self.align_prefix_tail = engine_config.enable_prefix_caching

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> list[SampledToken | None]:
        """Run one step; returns a sampled token per scheduled request (None mid-prefill)."""
        order = sorted(range(len(scheduled)), key=lambda i: not scheduled[i].is_decode)
        chunks = []
        for i in order:
            s = scheduled[i]
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            pieces = [(start, end)] if s.is_decode else self._prefill_pieces(start, end, s.samples)
            for lo, hi in pieces:
                chunks.append(StepChunk(r.all_token_ids[lo:hi], lo, s.block_table,
                                        samples=s.samples and hi == end, is_decode=s.is_decode))
        input_ids, positions, meta, sample_rows = self._build(chunks)
        hidden = self.model.forward(input_ids, positions, self.kv_caches, meta)
        results: list[SampledToken | None] = [None] * len(scheduled)
        sample_of = [i for i in order if scheduled[i].samples]  # in row order
        if sample_of:
            logits = self.model.logits(hidden[sample_rows])
            sampled = self.sampler(logits, [scheduled[i].request for i in sample_of])
            for i, token in zip(sample_of, sampled, strict=True):
                results[i] = token
        return results

    def _prefill_pieces(self, start: int, end: int, samples: bool) -> list[tuple[int, int]]:
        """The attention chunks of prefill positions [start, end).

        The chunk that reaches the last known token is cut after the last full block before
        it: those tail positions are what a later request with the same tokens recomputes after
        a prefix-cache hit (``find_cached_prefix`` leaves them out), so they attend in the same
        shape either way and a repeated greedy request rounds alike in bf16::

            positions  [start ........ split) [split ...... end)
                       full blocks, cacheable  the tail a hit recomputes
        """
        split = (end - 1) // self.block_size * self.block_size
        if not (samples and self.align_prefix_tail and start < split):
            return [(start, end)]
        return [(start, split), (split, end)]

    def _build(self, chunks: list[StepChunk]):
        """Chunks (decodes first) -> input ids, positions, metadata, sampled rows."""
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        num_decodes = 0
        for i, c in enumerate(chunks):
            n = len(c.token_ids)
            end = c.start + n
            if c.is_decode:
                if n != 1 or i != num_decodes:
                    raise ValueError("is_decode: a decode chunk has one token and comes first")
                num_decodes += 1
            ids.extend(c.token_ids)
            positions.extend(range(c.start, end))
            table = c.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(c.start, end))
            qsl.append(qsl[-1] + n)
            lens.append(end)
            tables.append(table[: -(-end // bs)])
            if c.samples:
                sample_rows.append(qsl[-1] - 1)
        width = max(len(t) for t in tables)
        i32 = torch.int32
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=i32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=i32, device=dev),
            seq_lens=torch.tensor(lens, dtype=i32, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=i32,
                                      device=dev),
            num_decodes=num_decodes, num_actual_tokens=len(ids),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:], strict=False)),
            max_seq_len=max(lens), query_start_loc_host=qsl, seq_lens_host=lens, block_size=bs,
        )
        self.attention.prepare(meta, self.dims)
        return (torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta,
                torch.tensor(sample_rows, device=dev))

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], kv_block_table: list[int]) -> torch.Tensor:
        """All-position logits of one prompt (for correctness tests against a reference)."""
        single = len(token_ids) == 1  # a single token takes the decode path
        input_ids, positions, meta, _ = self._build(
            [StepChunk(token_ids, 0, kv_block_table, True, is_decode=single)])
        hidden = self.model.forward(input_ids, positions, self.kv_caches, meta)
        return self.model.logits(hidden).cpu()
