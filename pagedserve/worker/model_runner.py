"""Where lists become tensors: the scheduler's plan -> one forward pass -> sampled tokens.

The runner owns the model and the KV cache tensors (one K and one V tensor per layer, shaped
``[num_blocks, block_size, num_kv_heads, head_dim]``). For each step it flattens the scheduled
tokens (decodes first, then prefill chunks) into the persistent buffers of
:class:`~pagedserve.worker.step_inputs.StepInputs` (positions, cache slots, block tables), runs the
model, and samples one token for every request whose chunk reached its last known token; the LM
head runs on those rows only, and on the prompt rows of requests that asked for their prompt's
logprobs (:mod:`pagedserve.worker.prompt_logprobs`; taken by the core with
:meth:`ModelRunner.take_prompt_logprobs` after each step).

    slot of position p = block_table[p // block_size] * block_size + p % block_size

Under tensor parallelism every rank has a runner over its shard of the model and a KV cache of
its heads under the same block tables. Rank 0's runner plans each step (the chunks of each
pass: integers only), broadcasts the plan (:class:`StepPlan`), and every rank runs the same
passes in lockstep, meeting in the model's collectives; only rank 0 samples. Workers take the
plans in :meth:`ModelRunner.follow` (engine/workers.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from pagedserve.config import DTYPES as DTYPE_NAMES
from pagedserve.config import EngineConfig, ModelConfig
from pagedserve.core.kv_sizing import GpuMemory
from pagedserve.core.request import PLACEHOLDER, Request
from pagedserve.core.scheduler import ScheduledRequest
from pagedserve.models.decoder_layers import NATIVE_STEP_TOKENS
from pagedserve.models.llama import SMALL_STEP_TOKENS, LlamaForCausalLM
from pagedserve.ops.attention import AttentionDims
from pagedserve.ops.backends import select_backend
from pagedserve.worker.cuda_graphs import DecodeGraphs, graph_batch_sizes
from pagedserve.worker.execution_plan import ExecutionPlan, resolve_execution_plan
from pagedserve.worker.prompt_logprobs import BLOCK_ELEMENTS, PromptLogprobs, collect
from pagedserve.worker.sampler import PendingSample, SampledToken, Sampler
from pagedserve.worker.step_inputs import StepBatch, StepChunk, StepInputs

logger = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def kv_bytes_per_token(config: ModelConfig, dtype: str) -> int:
    """Bytes of K and V for one token across all layers."""
    itemsize = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


@dataclass(slots=True)
class StepPlan:
    """What a worker runs for one step: the chunks of each forward pass, in order; the
    rows of chunks that sample go through the LM head (whose logits rank 0 samples)."""

    passes: list[list[StepChunk]]


@dataclass(slots=True)
class AllocatePlan:
    """Every rank allocates the KV cache rank 0 sized (the same number of blocks)."""

    num_blocks: int
    max_num_seqs: int
    max_model_len: int


@dataclass(slots=True)
class ProfilePlan:
    """Every rank runs rank 0's memory-profiling pass (CUDA)."""

    num_tokens: int
    num_seqs: int
    model_len: int


class LaunchedStep:
    """A step queued on the device: its sampled ids there (``tokens``, one row per sampling
    request, ``row_of`` maps request ids to rows) and, once read, a token per scheduled
    request (None for a request still prefilling)."""

    def __init__(self, num_scheduled: int, sample_of: list[int], pending: PendingSample | None,
                 row_of: dict[str, int]) -> None:
        self.row_of = row_of
        self._num_scheduled = num_scheduled
        self._sample_of = sample_of  # scheduled index of each sampled row
        self._pending = pending
        self._result: list[SampledToken | None] | None = None

    @classmethod
    def done(cls, tokens: list[SampledToken | None]) -> LaunchedStep:
        """A step whose tokens are on the host already (one run request by request)."""
        step = cls(len(tokens), [], None, {})
        step._result = list(tokens)
        return step

    @property
    def tokens(self) -> torch.Tensor | None:
        return self._pending.tokens if self._pending is not None else None

    @property
    def changed(self) -> list[int]:
        """Scheduled indices whose final id differs from the one the device holds (after
        :meth:`result`; rare: see PendingSample)."""
        if self._pending is None:
            return []
        return [self._sample_of[row] for row in self._pending.changed]

    def result(self) -> list[SampledToken | None]:
        if self._result is None:
            results: list[SampledToken | None] = [None] * self._num_scheduled
            if self._pending is not None:
                for i, token in zip(self._sample_of, self._pending.result(), strict=True):
                    results[i] = token
            self._result = results
        return self._result


class ModelRunner:
    """Built in two phases: the model first (so that, on CUDA, what is left of the memory can
    be measured), then :meth:`allocate` with the KV cache's size and the step limits.

    It computes as its :class:`~pagedserve.worker.execution_plan.ExecutionPlan` says (dtypes,
    attention backend, CPU kernels, native decoder, graphs, threads) and decides none of it."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 engine_config: EngineConfig, consume_weights: bool = False, tp=None,
                 plan: ExecutionPlan | None = None):
        """`tp`: the tensor-parallel group (distributed.py) whose rank's shard `weights`
        are; `config` stays the whole model's. `plan`: how to compute (the engine resolves it
        once; a runner built alone, as a tensor-parallel worker's, resolves its own)."""
        self.tp = tp
        if tp is not None:
            config = tp.shard.local_config(config)
        self.config = config
        self.engine_config = engine_config
        self.plan = plan = plan if plan is not None else resolve_execution_plan(engine_config)
        self.block_size = engine_config.block_size
        self.device = tp.device if tp is not None else torch.device(plan.device)
        self.dtype = DTYPES[plan.dtype]
        self.kv_dtype = DTYPES[plan.kv_cache_dtype]
        self.threads = torch.get_num_threads()
        if plan.threads is not None:
            self.threads = plan.threads
            torch.set_num_threads(self.threads)
        self.attention = select_backend(plan.attention_backend)
        self.dims = AttentionDims(config.num_heads, config.num_kv_heads, config.head_dim)
        # a background build of the CPU kernels, looked at between steps (launch)
        self._kernel_watch = plan.kernel_watch
        if plan.kernels is None and plan.low_bit_small_steps:
            logger.info("decode steps of up to %d tokens read int4 weights with torch's kernel "
                        "(bfloat16 activations)", SMALL_STEP_TOKENS)
        if plan.kernels is not None:
            plan.kernels.set_threads(self.threads)
        self.model = LlamaForCausalLM(config, weights, self.dtype, self.device,
                                      plan.low_bit_small_steps,
                                      attention=self.attention.paged_attention,
                                      consume_weights=consume_weights,
                                      fused_ops=plan.fused_ops, kernels=plan.kernels, tp=tp,
                                      native_decoder=plan.native_decoder)
        self.sampler = Sampler(engine_config.seed)
        self._kernels_changed()
        self.align_prefix_tail = engine_config.enable_prefix_caching
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.inputs: StepInputs | None = None
        self.graphs: DecodeGraphs | None = None
        self.max_model_len = 0  # set by allocate()
        self._previous: LaunchedStep | None = None  # the last step launched, for its ids
        # request id -> the prompt logprobs computed since the core last took them
        self.prompt_logprobs: dict[str, PromptLogprobs] = {}

    def _kernels_changed(self) -> None:
        """After the model took CPU kernels (at start-up or between steps): what they run."""
        kernels, layers = self.model.kernels, self.model.decoder_layers
        if kernels is not None:
            logger.info("every step reads int4 weights (an int8 LM head) with the %s CPU kernels "
                        "(int8-rounded activations); the CPU allows %s", kernels.isa,
                        " ".join(sorted(kernels.cpu_features)))
        if kernels is not None and self.dtype == torch.float32 and not self.plan.native_decoder:
            logger.info("no native decoder: %s", self.plan.why["native_decoder"])
        if layers.name == "native":
            logger.info("every step of up to %d tokens runs the native decoder (%s)",
                        NATIVE_STEP_TOKENS, kernels.isa)
        if kernels is not None:
            self.sampler.use_rows_max(kernels.rows_max)  # torch's reduction: one thread's time
        if self.plan.threads is not None:
            torch.set_num_threads(layers.torch_threads(self.threads))
        # the plan says whether torch's matmuls round a row by the rows beside it; layers that
        # compute each row alone do not need the prompt tails apart
        self._split_prompt_tails = self.plan.row_variant_matmuls and not layers.rows_alone

    def _take_built_kernels(self) -> None:
        """Switch to the CPU kernels once their background build has landed: called between
        steps, in the engine core's thread, so no step sees two kernels."""
        kernels = self._kernel_watch.poll()
        if self._kernel_watch.done:
            self._kernel_watch = None
        if kernels is None:
            return
        start = time.monotonic()
        kernels.set_threads(self.threads)
        self.model.use_kernels(kernels)
        self._kernels_changed()
        logger.info("switched to the %s CPU kernels built in the background (%.1f s to repack "
                    "the weights)", kernels.isa, time.monotonic() - start)

    @property
    def leads(self) -> bool:
        """Rank 0 of several: what this runner does, the workers must do too."""
        return self.tp is not None and self.tp.is_leader

    def follow(self, plan: StepPlan | AllocatePlan | ProfilePlan) -> None:
        """A worker's share of what rank 0's runner does (sent by :meth:`launch`,
        :meth:`allocate`, :meth:`profile_gpu_memory`)."""
        if isinstance(plan, StepPlan):
            self._follow_step(plan)
        elif isinstance(plan, AllocatePlan):
            self.allocate(plan.num_blocks, plan.max_num_seqs, plan.max_model_len)
        elif isinstance(plan, ProfilePlan):
            self.profile_gpu_memory(plan.num_tokens, plan.num_seqs, plan.model_len)
        else:
            raise TypeError(f"a worker cannot follow {type(plan).__name__}")

    @torch.inference_mode()
    def _follow_step(self, plan: StepPlan) -> None:
        rows = []
        for part_chunks in plan.passes:
            batch, hidden = self._run_pass(part_chunks, None)
            num_sampling = sum(c.samples for c in part_chunks)
            if num_sampling:
                rows.append(self._sampling_rows(hidden, batch, num_sampling))
        if rows:
            self.model.logits(torch.cat(rows))  # the gather: rank 0 samples from its copy

    def allocate(self, num_blocks: int, max_num_seqs: int, max_model_len: int) -> None:
        """The KV cache and the persistent step inputs."""
        if self.leads:
            self.tp.broadcast(AllocatePlan(num_blocks, max_num_seqs, max_model_len))
        shape = (num_blocks, self.block_size, self.config.num_kv_heads, self.config.head_dim)
        # Zeroed, not empty: masked attention weights are exactly 0, but 0 * NaN garbage is not.
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
             torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
            for _ in range(self.config.num_layers)
        ]
        max_tokens = max(self.engine_config.max_num_batched_tokens, max_num_seqs)
        # a sampling prefill chunk (>= 2 tokens when cut) may attend as two pieces, two rows of
        # the metadata (see _prefill_pieces)
        max_pieces = max_num_seqs + min(max_num_seqs, max_tokens // 2)
        self.inputs = StepInputs(max_tokens, max_pieces, -(-max_model_len // self.block_size),
                                 self.block_size, self.device)
        self.max_model_len = max_model_len
        if self.plan.cuda_graphs:
            self.graphs = DecodeGraphs()
            self.graphs.capture(graph_batch_sizes(max_num_seqs), self._graph_inputs,
                                self._forward)

    @torch.inference_mode()
    def profile_gpu_memory(self, num_tokens: int, num_seqs: int, model_len: int) -> GpuMemory:
        """Memory after the largest step the engine will run: a forward pass over `num_tokens`
        prompt tokens (requests of at most `model_len`), one block of prompt logprobs (the LM
        head and a log_softmax over a block of those rows), the LM head over `num_seqs` rows and
        a sort of their logits (the sampler's largest scratch). The pass's own temporary KV
        cache is not counted."""
        if self.leads:
            self.tp.broadcast(ProfilePlan(num_tokens, num_seqs, model_len))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        bs = self.block_size
        lens = [model_len] * (num_tokens // model_len) + [num_tokens % model_len] * (
            num_tokens % model_len > 0)
        chunks, next_block = [], 0
        for n in lens:
            table = list(range(next_block, next_block + -(-n // bs)))
            next_block += len(table)
            chunks.append(StepChunk([0] * n, 0, table, True))
        shape = (next_block, bs, self.config.num_kv_heads, self.config.head_dim)
        caches = [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                   torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
                  for _ in range(self.config.num_layers)]
        inputs = StepInputs(num_tokens, len(lens), max(len(c.block_table) for c in chunks), bs,
                            self.device)
        batch = inputs.prepare(chunks)
        self.attention.prepare(batch.meta, self.dims)
        hidden = self.model.forward(batch.input_ids, batch.positions, caches, batch.meta)
        block = max(1, BLOCK_ELEMENTS // self.config.vocab_size)
        prompt_block = self.model.lm_head(hidden[:block], small_step=False).float().log_softmax(-1)
        del prompt_block  # freed before the sampler runs, as in a step
        logits = self.model.logits(hidden[-1:].expand(num_seqs, -1).contiguous())
        logits.sort(dim=-1)
        torch.cuda.synchronize()
        cache_bytes = 2 * len(caches) * caches[0][0].numel() * caches[0][0].element_size()
        free, total = torch.cuda.mem_get_info(self.device)
        memory = GpuMemory(total, free, torch.cuda.max_memory_allocated(self.device) - cache_bytes,
                           torch.cuda.memory_reserved(self.device))
        del caches, hidden, logits, batch, inputs
        torch.cuda.empty_cache()
        return memory

    def _graph_inputs(self, b: int) -> StepBatch:
        batch = self.inputs.prepare([], pad_to=b)
        batch.meta.max_seq_len = self.max_model_len  # split-KV sized for the longest context
        return batch

    def execute(self, scheduled: list[ScheduledRequest]) -> list[SampledToken | None]:
        """Run one step; returns a sampled token per scheduled request (None mid-prefill)."""
        return self.launch(scheduled).result()

    @torch.inference_mode()
    def launch(self, scheduled: list[ScheduledRequest]) -> LaunchedStep:
        """Queue one step on the device and return without waiting for it: the sampled ids
        stay on the device for the next step (a token that is still a PLACEHOLDER on the host
        is fed from there), and :meth:`LaunchedStep.result` reads them once they have landed.

        Called before the scheduled requests are advanced by this step (their
        ``num_computed_tokens`` is where the chunk starts)."""
        if self._kernel_watch is not None:
            self._take_built_kernels()
        previous = self._previous
        order = sorted(range(len(scheduled)), key=lambda i: not scheduled[i].is_decode)
        chunks, owners, tails = [], [], []
        for i in order:
            s = scheduled[i]
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            pieces = [(start, end)] if s.is_decode else self._prefill_pieces(start, end, s.samples)
            for lo, hi in pieces:
                if len(pieces) > 1 and hi == end:
                    tails.append(len(chunks))
                tokens = r.all_token_ids[lo:hi]
                feed_from = -1
                if tokens[-1] == PLACEHOLDER:
                    feed_from = previous.row_of[r.request_id]
                chunks.append(StepChunk(tokens, lo, s.block_table,
                                        samples=s.samples and hi == end, is_decode=s.is_decode,
                                        feed_from=feed_from))
                owners.append(i)
        if tails and self._split_prompt_tails:
            # float32 CPU matmuls round a row differently with the number of rows beside it:
            # the prompt tails go through a pass of their own, the shape a prefix-cache hit
            # gives them later (see _prefill_pieces)
            tail_set = set(tails)
            passes = [[j for j in range(len(chunks)) if j not in tail_set], tails]
        else:
            passes = [list(range(len(chunks)))]
        sample_of, rows = [], []
        fed_by = previous.tokens if previous is not None else None
        owing = self._prompt_logprobs_owed(scheduled)
        if self.leads:
            self.tp.broadcast(StepPlan([[chunks[j] for j in part] for part in passes]))
        for part in passes:
            part_chunks = [chunks[j] for j in part]
            batch, hidden = self._run_pass(part_chunks, fed_by)
            if owing:
                self._collect_prompt_logprobs(hidden, part_chunks,
                                              [scheduled[owners[j]].request for j in part])
            sampling = [owners[j] for j in part if chunks[j].samples]  # in row order
            if sampling:
                sample_of += sampling
                rows.append(self._sampling_rows(hidden, batch, len(sampling)))
        pending = None
        if sample_of:
            logits = self.model.logits(rows[0] if len(rows) == 1 else torch.cat(rows))
            pending = self.sampler.launch(logits, [scheduled[i].request for i in sample_of])
        launched = LaunchedStep(len(scheduled), sample_of, pending,
                                {scheduled[i].request.request_id: row
                                 for row, i in enumerate(sample_of)})
        self._previous = launched if pending is not None else None
        return launched

    def _run_pass(self, chunks: list[StepChunk], fed_by: torch.Tensor | None
                  ) -> tuple[StepBatch, torch.Tensor]:
        """One forward pass over `chunks`: its batch and final hidden states."""
        bucket = None  # a decode-only step replays the CUDA graph of its batch-size bucket
        if self.graphs is not None and chunks[-1].is_decode:  # decodes come first
            bucket = self.graphs.bucket_for(len(chunks))
        batch = self.inputs.prepare(chunks, pad_to=bucket or 0)
        batch.feed(fed_by)
        return batch, self.graphs.replay(bucket, batch) if bucket else self._forward(batch)

    @staticmethod
    def _sampling_rows(hidden: torch.Tensor, batch: StepBatch, n: int) -> torch.Tensor:
        return hidden[:n] if batch.samples_are_prefix else hidden.index_select(0,
                                                                               batch.sample_rows)

    def take_prompt_logprobs(self) -> dict[str, PromptLogprobs]:
        """The prompt logprobs computed since the last call, by request id."""
        taken, self.prompt_logprobs = self.prompt_logprobs, {}
        return taken

    def _prompt_logprobs_owed(self, scheduled: list[ScheduledRequest]) -> bool:
        """Whether the step computes prompt logprobs; those of a request that runs again (each
        request alone, after a step failed) are dropped, to be computed anew."""
        owing = [s.request.request_id for s in scheduled if s.request.owes_prompt_logprobs]
        for request_id in owing:
            self.prompt_logprobs.pop(request_id, None)
        return bool(owing)

    def _collect_prompt_logprobs(self, hidden: torch.Tensor, chunks: list[StepChunk],
                                 requests: list[Request]) -> None:
        lm_head = self.model.lm_head

        def dense_logits(rows: torch.Tensor) -> torch.Tensor:
            return lm_head(rows, small_step=False)

        collect(dense_logits, self.config.vocab_size, hidden, chunks, requests,
                self.prompt_logprobs)

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

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        if self.model.decoder_layers.uses_attention_backend(batch.meta,
                                                            batch.input_ids.shape[0]):
            self.attention.prepare(batch.meta, self.dims)
        return self.model.forward(batch.input_ids, batch.positions, self.kv_caches, batch.meta)

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], kv_block_table: list[int]) -> torch.Tensor:
        """All-position logits of one prompt (for correctness tests against a reference)."""
        if self.tp is not None:
            raise ValueError("prompt_logits: rank 0 alone would wait for the other ranks")
        single = len(token_ids) == 1  # a single token takes the decode path
        chunks = [StepChunk(token_ids, 0, kv_block_table, True, is_decode=single)]
        inputs = self.inputs
        if not inputs.fits(chunks) or len(kv_block_table) > inputs.max_blocks:
            inputs = StepInputs(len(token_ids), 1, len(kv_block_table), self.block_size,
                                self.device)
        hidden = self._forward(inputs.prepare(chunks))
        return self.model.logits(hidden).cpu()
