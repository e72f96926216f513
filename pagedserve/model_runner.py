"""Where lists become tensors: the scheduler's plan -> one forward pass -> sampled tokens.

The runner owns the model and the KV cache tensors (one K and one V tensor per layer, shaped
``[num_blocks, block_size, num_kv_heads, head_dim]``). For each step it flattens the scheduled
tokens (decodes first, then prefill chunks), computes each token's position and cache slot, runs
the model, and samples one token for every request whose chunk reached its last known token.

    slot of position p = block_table[p // block_size] * block_size + p % block_size
"""

from __future__ import annotations

import logging

import torch

from pagedserve.attention import AttentionMetadata, PrefillChunk
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
        self.model = LlamaForCausalLM(config, weights, self.dtype, self.device, low_bit)
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
        batch = [scheduled[i] for i in order]
        input_ids, positions, slots = [], [], []
        bs = self.block_size
        sample_rows: list[int] = []  # flattened index of the last token of each sampling request
        sample_of: list[int] = []  # index into `scheduled` of each sampled row
        meta = AttentionMetadata(slot_mapping=torch.empty(0))
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        for idx, s in zip(order, batch, strict=True):
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            first = len(input_ids)
            input_ids.extend(r.all_token_ids[start:end])
            positions.extend(range(start, end))
            table = s.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if s.is_decode:
                meta.num_decodes += 1
                decode_tables.append(table[: -(-end // bs)])
                decode_lens.append(end)
            else:
                for lo, hi in self._prefill_pieces(start, end, s.samples):
                    mask = None
                    if lo > 0:  # query i sits at position lo + i and sees keys 0..lo + i
                        mask = torch.ones(
                            hi - lo, hi, dtype=torch.bool, device=self.device
                        ).tril(diagonal=lo)
                    meta.prefills.append(PrefillChunk(
                        first + lo - start, hi - lo, hi,
                        torch.tensor(table[: -(-hi // bs)], device=self.device), mask,
                    ))
            if s.samples:
                sample_rows.append(len(input_ids) - 1)
                sample_of.append(idx)
        meta.slot_mapping = torch.tensor(slots, device=self.device)
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            meta.decode_block_tables = torch.tensor(
                [t + [0] * (width - len(t)) for t in decode_tables], device=self.device
            )
            key_pos = torch.arange(width * bs, device=self.device)
            lens = torch.tensor(decode_lens, device=self.device)
            mask = torch.zeros(len(decode_lens), width * bs, device=self.device)
            mask.masked_fill_(key_pos.unsqueeze(0) >= lens.unsqueeze(1), float("-inf"))
            meta.decode_mask = mask.view(len(decode_lens), 1, 1, width * bs)

        hidden = self.model.forward(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_caches,
            meta,
        )
        results: list[SampledToken | None] = [None] * len(scheduled)
        if sample_rows:
            logits = self.model.logits(hidden[torch.tensor(sample_rows, device=self.device)])
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

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], kv_block_table: list[int]) -> torch.Tensor:
        """All-position logits of one prompt (for correctness tests against a reference)."""
        n = len(token_ids)
        bs = self.block_size
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(
                [kv_block_table[p // bs] * bs + p % bs for p in range(n)], device=self.device
            ),
            prefills=[PrefillChunk(0, n, n, torch.tensor(kv_block_table, device=self.device),
                                   None)],
        )
        if n == 1:  # a single token takes the decode path
            meta.prefills = []
            meta.num_decodes = 1
            meta.decode_block_tables = torch.tensor([kv_block_table[:1]], device=self.device)
            meta.decode_mask = torch.zeros(1, 1, 1, bs, device=self.device)
            meta.decode_mask[..., 1:] = float("-inf")
        hidden = self.model.forward(
            torch.tensor(token_ids, device=self.device),
            torch.arange(n, device=self.device),
            self.kv_caches,
            meta,
        )
        return self.model.logits(hidden).cpu()
