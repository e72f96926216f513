"""Configuration value objects: the model's shape and the engine's knobs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from pagedserve.structured.limits import GrammarLimits

KVLayout = Literal["paged", "static"]
AttentionBackendName = Literal["auto", "torch", "triton"]
# the element types weights, compute and the KV cache may take; "auto" lets the engine choose
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPES)


@dataclass(slots=True)
class ModelConfig:
    """The architecture hyper-parameters a loader reads from config.json or GGUF metadata."""

    architecture: str  # "llama" (Llama 2/3, SmolLM, Mistral) or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF form, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def num_parameters(self) -> int:
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_layers
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        embed = self.vocab_size * h
        return layers * per_layer + embed * (1 if self.tie_word_embeddings else 2) + h


SUPPORTED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2"})


@dataclass(slots=True)
class EngineConfig:
    """The engine's knobs, with vLLM's names where vLLM has one."""

    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # None: the model's context, capped by the KV pool
    # prompt texts longer than this are refused before tokenizing; None: as many characters
    # as max_model_len tokens of the vocabulary's longest entry can hold
    max_prompt_chars: int | None = None
    kv_cache_memory: int | None = None  # bytes; None: sized by the knobs below
    kv_cache_fraction: float = 0.25  # CPU: share of available memory (capped at 2 GiB)
    # CUDA: share of the GPU's total memory this process may use; the KV cache gets what the
    # weights and a profiling pass at max_num_batched_tokens leave (vLLM's meaning)
    gpu_memory_utilization: float = 0.9
    # None: the whole share above (a server); N: at most N sequences of max_model_len, as
    # Ollama sizes num_ctx x num_parallel (`run`, one user)
    kv_cache_sequences: int | None = None
    enable_prefix_caching: bool = True
    kv_layout: KVLayout = "paged"
    max_parallel: int = 4  # static layout: number of slots
    num_ctx: int = 4096  # static layout: tokens reserved per slot
    # "auto": bf16 where the hardware computes it natively, else fp32 (fp16 on CUDA without
    # bf16), as run, serve and vLLM default; "float32" is exact (the correctness tests use it)
    dtype: str = "auto"
    # the KV cache's element type (vLLM's --kv-cache-dtype). "auto": the dtype above, except
    # float16 where dtype "auto" chose float32 on a CPU (llama.cpp's f16 cache: half the memory,
    # half of attention's reads; the native decoder converts with F16C and computes in float32).
    # An explicit dtype="float32" keeps a float32 cache: exact, as the correctness tests want.
    kv_cache_dtype: str = "auto"
    # CPU: decode steps of <= 8 tokens read int4/int8 copies of the weights (bandwidth-bound).
    # None: in bf16, and in float32 when dtype "auto" chose it; an explicit dtype="float32"
    # stays exact. True: in either dtype. False: never.
    low_bit_small_steps: bool | None = None
    # CPU: those copies are Q4_1/Q8_0 tiles for pagedserve's CPU kernels (cpu_kernels/:
    # llama.cpp's arithmetic, int8-rounded activations; every step in float32, through the
    # native decoder), compiled with the package per instruction set. None: where they are
    # built and pass their self-test; where they are not, they are compiled in the background
    # and the engine switches to them between two steps. True: build them now, an error where
    # they cannot be. False: torch's int4 kernel.
    native_kernels: bool | None = None
    device: str = "cpu"
    # ranks the model is split across (vLLM's --tensor-parallel-size): rank 0 is this engine,
    # the others worker processes (engine/workers.py); 1 starts nothing and imports no
    # torch.distributed
    tensor_parallel_size: int = 1
    # attention kernels: auto = Triton on CUDA (when importable), plain torch elsewhere
    attention_backend: AttentionBackendName = "auto"
    # the decoder's norms, residual adds, rotary and SwiGLU as fused Triton kernels (see
    # fused_ops.py): None = on CUDA only; True on CPU runs them under the Triton interpreter
    fused_ops: bool | None = None
    enforce_eager: bool = False  # CUDA: no graphs for decode steps (vLLM's flag)
    # schedule and prepare step N+1 while the device runs step N, reading N's tokens one step
    # late (vLLM's --async-scheduling); None: on CUDA, off on a CPU (which runs the step itself)
    async_scheduling: bool | None = None
    seed: int | None = None  # unseeded requests: None draws differently every start
    # None: what this process's CPU affinity and cgroup quota allow (cpu_kernels/threads.py)
    num_threads: int | None = None
    # structured outputs: what compiling and following one client's grammar may cost
    grammar_limits: GrammarLimits = field(default_factory=GrammarLimits)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_parallel",
                     "num_ctx", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_threads is not None and (
                isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int)
                or self.num_threads < 1):
            raise ValueError(f"num_threads must be a positive integer, got {self.num_threads!r}")
        for name in ("max_model_len", "max_prompt_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if self.kv_cache_sequences is not None and (
                isinstance(self.kv_cache_sequences, bool) or self.kv_cache_sequences < 1):
            raise ValueError(
                f"kv_cache_sequences must be a positive integer, got {self.kv_cache_sequences!r}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.kv_layout not in ("paged", "static"):
            raise ValueError(f"kv_layout must be 'paged' or 'static', got {self.kv_layout!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError("attention_backend must be auto, torch or triton, got "
                             f"{self.attention_backend!r}")
        for name in ("dtype", "kv_cache_dtype"):
            if getattr(self, name) not in DTYPE_CHOICES:
                raise ValueError(f"{name} must be {', '.join(DTYPE_CHOICES[:-1])} or "
                                 f"{DTYPE_CHOICES[-1]}, got {getattr(self, name)!r}")

    def with_model_defaults(self, defaults: dict) -> EngineConfig:
        """Apply a model's own context length (Ollama's ``num_ctx`` parameter) unless set."""
        num_ctx = defaults.get("num_ctx")
        if self.max_model_len is None and isinstance(num_ctx, int) and num_ctx > 0:
            return dataclasses.replace(self, max_model_len=num_ctx)
        return self
