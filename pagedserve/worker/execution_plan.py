"""How the engine computes, decided once at start-up: the :class:`ExecutionPlan`.

Every choice that depends on the device and on what this machine allows is made here, from the
:class:`~pagedserve.config.EngineConfig` and a :class:`Hardware` probe, and recorded with the
reason for it:

    EngineConfig + Hardware --resolve_execution_plan--> ExecutionPlan --> EngineCore, ModelRunner,
                                                                          LlamaForCausalLM

- compute dtype ("auto": float32 where the CPU kernels run, else bfloat16 where the hardware
  computes it natively, else float32; on CUDA bfloat16, else float16) and the KV cache's dtype;
- the attention backend and the decoder's elementwise ops (Triton on CUDA when it launches);
- the low-bit small steps, the CPU kernels (which instruction-set variant, or why none), the
  native decoder, and so the kernel each ``Linear`` reads its weights with;
- whether torch's matmuls round a row by the rows beside it (then a prompt's tail runs in a
  pass of its own);
- CUDA graphs, overlapped (async) scheduling, and the CPU threads (shared by the ranks of a
  tensor-parallel group on one host);
- how the KV cache is sized: the bytes asked for, Ollama's static slots, what a GPU's
  profiling pass leaves, or a share of a CPU's memory.

The runner and the model take these as given: nothing downstream asks "is this CUDA?" to decide
how to compute (only to place tensors). ``pagedserve show --plan`` prints the table of
:meth:`ExecutionPlan.rows`; the engine logs :meth:`ExecutionPlan.summary` once.

The plan also carries the handles it chose (the CPU kernels' library, a background build that
may bring them later), so that the runner uses exactly what was decided.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pagedserve.config import EngineConfig
from pagedserve.device import cpu_flags
from pagedserve.models.llama import SMALL_STEP_TOKENS
from pagedserve.ops import cpu_kernels
from pagedserve.ops.cpu_kernels.threads import CpuBudget, cpu_budget
from pagedserve.parallel.tensor_shard import tensor_parallel_config

logger = logging.getLogger(__name__)

# the attention backends whose kernels read only device tensors and per-bucket constants, so
# that a decode step can be captured in a CUDA graph (AttentionBackend.supports_cuda_graphs)
GRAPH_BACKENDS = frozenset({"triton"})
NATIVE_DECODER_KV_DTYPES = ("float32", "float16")  # the caches the native decoder reads
# how the KV cache's size is found (ExecutionPlan.kv_sizing; core/kv_sizing.py computes it):
# kv_cache_memory's bytes, the static layout's slots, what a profiling pass on the GPU leaves
# under gpu_memory_utilization, a CPU's kv_cache_fraction of its available memory
KV_SIZINGS = ("fixed", "slots", "profile", "share")


class Hardware(Protocol):
    """What the plan asks of the machine. :class:`Machine` probes this one; tests describe
    another (a GPU that is not here)."""

    def cuda_bf16(self) -> bool:
        """Whether the GPU computes bfloat16."""

    def cpu_bf16(self) -> bool:
        """Whether the CPU computes bfloat16 natively (AVX-512 BF16, AMX)."""

    def cpu_kernels_available(self) -> bool:
        """Whether pagedserve's CPU kernels are built and pass their self-test here."""

    def cpu_kernels(self, setting: bool | None) -> cpu_kernels.Resolution:
        """The CPU kernels for ``EngineConfig.native_kernels`` (may start a background build)."""

    def cpu_kernels_problem(self) -> str:
        """Why no CPU kernels are usable (asked only where none are)."""

    def triton_problem(self, device_type: str) -> str | None:
        """None where Triton kernels run on ``device_type``, else why not."""

    def threads(self, setting: int | None) -> CpuBudget:
        """How many threads to compute with, and why."""

    def ranks_on_this_host(self, world_size: int) -> int:
        """How many of a tensor-parallel group's `world_size` ranks run on this host."""


class Machine:
    """This machine, probed through the modules that know it: torch.cuda, /proc/cpuinfo,
    :mod:`pagedserve.ops.cpu_kernels`, :mod:`pagedserve.ops.triton_launch`.

    `build_kernels`: whether asking for the CPU kernels may compile them (in the background,
    or now with ``native_kernels=True``); ``pagedserve show --plan`` only looks."""

    def __init__(self, build_kernels: bool = True) -> None:
        self.build_kernels = build_kernels

    def cuda_bf16(self) -> bool:
        return torch.cuda.is_bf16_supported()

    def cpu_bf16(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())

    def cpu_kernels_available(self) -> bool:
        return cpu_kernels.available()

    def cpu_kernels(self, setting: bool | None) -> cpu_kernels.Resolution:
        if self.build_kernels:
            return cpu_kernels.resolve(setting)
        if setting is False:
            return cpu_kernels.Resolution(None)
        try:
            return cpu_kernels.Resolution(cpu_kernels.load())
        except cpu_kernels.KernelUnavailable:
            if setting:
                raise
            return cpu_kernels.Resolution(None)

    def cpu_kernels_problem(self) -> str:
        try:
            cpu_kernels.load()
        except cpu_kernels.KernelsNotBuilt as exc:
            return f"not built ({exc})"
        except cpu_kernels.KernelUnavailable as exc:
            return str(exc)
        return "none"

    def triton_problem(self, device_type: str) -> str | None:
        try:
            from pagedserve.ops.triton_launch import launch_problem
        except ImportError as exc:
            return f"triton is not importable ({exc})"
        return launch_problem(device_type) if device_type == "cuda" else None

    def threads(self, setting: int | None) -> CpuBudget:
        """``--threads``, else what this process's CPU affinity and cgroup quota allow (not
        the host's core count)."""
        return CpuBudget(setting, "--threads") if setting else cpu_budget()

    def ranks_on_this_host(self, world_size: int) -> int:
        """``LOCAL_WORLD_SIZE`` (set by torchrun and the like), else all of them."""
        return min(world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


@dataclass(slots=True, frozen=True)
class ExecutionPlan:
    """Every decision about how the engine computes; ``why`` holds a short reason for each
    (keyed by the field's name)."""

    device: str
    dtype: str  # weights and compute: float32, bfloat16 or float16
    kv_cache_dtype: str
    attention_backend: str  # "torch" or "triton"
    fused_ops: bool  # the decoder's norms, rotary and SwiGLU as Triton kernels
    low_bit_small_steps: bool  # small CPU steps read int4/int8 copies of the weights
    cpu_kernels: str | None  # the instruction-set variant of pagedserve's CPU kernels
    native_decoder: bool  # a float32 model's layers run in one call of the CPU kernels
    linear_kernel: str  # what the matmuls read their weights with
    row_variant_matmuls: bool  # torch's matmuls round a row by the rows beside it
    cuda_graphs: bool  # decode steps replay captured CUDA graphs
    async_scheduling: bool  # step N+1 is prepared while the device runs step N
    threads: int | None  # CPU threads; None: torch's own count (CUDA without --threads)
    kv_sizing: str  # "fixed", "slots", "profile" or "share": see KV_SIZINGS
    why: dict[str, str] = field(compare=False)
    # the handles chosen: the CPU kernels, and a background build that may bring them later
    kernels: cpu_kernels.Kernels | None = field(default=None, compare=False, repr=False)
    kernel_watch: cpu_kernels.KernelWatch | None = field(default=None, compare=False,
                                                         repr=False)

    def rows(self) -> list[tuple[str, str, str]]:
        """(decision, value, why) for each decision, in the order a reader follows them."""
        on = {True: "on", False: "off"}
        values = [
            ("device", self.device),
            ("dtype", self.dtype),
            ("kv_cache_dtype", self.kv_cache_dtype),
            ("attention_backend", self.attention_backend),
            ("fused_ops", on[self.fused_ops]),
            ("low_bit_small_steps", on[self.low_bit_small_steps]),
            ("cpu_kernels", self.cpu_kernels or "none"),
            ("native_decoder", on[self.native_decoder]),
            ("linear_kernel", self.linear_kernel),
            ("row_variant_matmuls", on[self.row_variant_matmuls]),
            ("cuda_graphs", on[self.cuda_graphs]),
            ("async_scheduling", on[self.async_scheduling]),
            ("threads", str(self.threads) if self.threads is not None else "torch's default"),
            ("kv_sizing", self.kv_sizing),
        ]
        return [(name, value, self.why.get(name, "")) for name, value in values]

    def summary(self) -> str:
        """One line of every decision, for the start-up log."""
        return ", ".join(f"{name} {value}" for name, value, _ in self.rows())


def resolve_execution_plan(config: EngineConfig, hardware: Hardware | None = None
                           ) -> ExecutionPlan:
    """Every decision of :class:`ExecutionPlan` for `config` on `hardware` (default: this
    machine). Raises ValueError naming the field where the config asks for what cannot run."""
    hw = hardware if hardware is not None else Machine()
    config = tensor_parallel_config(config)
    why: dict[str, str] = {}
    device, requested = config.device, config.dtype
    cuda = device.startswith("cuda")
    why["device"] = "--device" if device != "cpu" else "the default"

    dtype = resolve_config_dtype(config, hw)
    why["dtype"] = _dtype_reason(config, dtype, cuda, hw)

    kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, requested, dtype, device)
    why["kv_cache_dtype"] = (f"--kv-cache-dtype {kv_dtype}" if config.kv_cache_dtype != "auto"
                             else "auto: the compute dtype" if kv_dtype == dtype else
                             "auto: float16 where dtype auto chose float32 on a CPU (half the "
                             "memory and of attention's reads, as llama.cpp)")

    attention = _attention_backend(config.attention_backend, cuda, hw, why)
    if kv_dtype != dtype and attention != "torch":
        raise ValueError(
            f"kv_cache_dtype {config.kv_cache_dtype} under dtype {dtype} needs "
            f"attention_backend torch: the {attention} kernels read the cache in "
            "the model's dtype")
    fused = _fused_ops(config.fused_ops, cuda, hw, why)

    low_bit = (resolve_low_bit(config.low_bit_small_steps, requested, dtype) and not cuda
               and dtype in ("bfloat16", "float32"))
    why["low_bit_small_steps"] = _low_bit_reason(config.low_bit_small_steps, requested, dtype,
                                                 cuda, low_bit)
    if config.tensor_parallel_size > 1:
        why["low_bit_small_steps"] = "off under tensor parallelism: every rank runs torch's path"
    resolution = hw.cpu_kernels(config.native_kernels) if low_bit else cpu_kernels.Resolution(None)
    kernels, watch = resolution.kernels, resolution.watch
    why["cpu_kernels"] = _cpu_kernels_reason(config.native_kernels, low_bit, resolution, hw)
    native = _native_decoder(low_bit, dtype, kv_dtype, resolution, why)
    linear, why["linear_kernel"] = _linear_kernel(low_bit, dtype, kernels, watch)
    row_variant = _row_variant_matmuls(cuda, dtype, native, why)
    graphs = _cuda_graphs(config, cuda, attention, why)
    overlap = resolve_async_scheduling(config.async_scheduling, device)
    why["async_scheduling"] = _async_reason(config, overlap)

    threads = _threads(config, cuda, native, hw, why)
    kv_sizing = _kv_sizing(config, cuda, why)

    return ExecutionPlan(
        device=device, dtype=dtype, kv_cache_dtype=kv_dtype, attention_backend=attention,
        fused_ops=fused, low_bit_small_steps=low_bit,
        cpu_kernels=kernels.isa if kernels is not None else None, native_decoder=native,
        linear_kernel=linear, row_variant_matmuls=row_variant, cuda_graphs=graphs,
        async_scheduling=overlap, threads=threads, kv_sizing=kv_sizing,
        why=why, kernels=kernels, kernel_watch=watch)


# -- the decisions, one function each ---------------------------------------------------------


def _cpu_kernels_reason(setting: bool | None, low_bit: bool,
                        resolution: cpu_kernels.Resolution, hw: Hardware) -> str:
    if resolution.kernels is not None:
        return ("native_kernels True" if setting
                else "auto: the best variant this CPU allows, built and self-tested")
    if not low_bit:
        return "they serve the low-bit steps, which are off"
    if setting is False:
        return "native_kernels False: torch's int4 kernel"
    if resolution.watch is not None:
        return "not built: compiling in the background; the engine switches to them between steps"
    return f"unusable here: {hw.cpu_kernels_problem()}"


def _native_decoder(low_bit: bool, dtype: str, kv_dtype: str,
                    resolution: cpu_kernels.Resolution, why: dict[str, str]) -> bool:
    """Whether a step's layers run in one call of the CPU kernels (those there, or those a
    background build brings): a float32 model over a cache the decoder reads."""
    on_kernels = resolution.kernels is not None or resolution.watch is not None
    if not (low_bit and on_kernels):
        why["native_decoder"] = "it runs on the CPU kernels, which are off"
    elif dtype != "float32":
        why["native_decoder"] = "it runs a float32 model on the CPU kernels"
    elif kv_dtype not in NATIVE_DECODER_KV_DTYPES:
        why["native_decoder"] = (f"it reads float32 or float16 KV caches; with a {kv_dtype} "
                                 "cache the layers run op by op")
    else:
        why["native_decoder"] = ("a float32 model on the CPU kernels: every layer of a step in "
                                 "one call, where each matmul fits the kernels' tiles")
        return True
    return False


def _row_variant_matmuls(cuda: bool, dtype: str, native: bool, why: dict[str, str]) -> bool:
    """Whether torch's matmuls give a row other last bits with other rows beside it: MKL's
    float32 GEMM does with 1-3 rows (on 2 threads also 5-7, 9-11) against more; bfloat16,
    CUDA and the native decoder's kernels do not (measured; tests/test_cpu_kernels.py)."""
    if cuda:
        why["row_variant_matmuls"] = "the GPU's matmuls round a row alike in any batch"
        return False
    if dtype != "float32":
        why["row_variant_matmuls"] = (f"{dtype} matmuls on a CPU round a row alike in any "
                                      "batch")
        return False
    why["row_variant_matmuls"] = ("MKL's float32 GEMM rounds a row by the rows beside it: a "
                                  "prompt's tail runs in a pass of its own, the shape a "
                                  "prefix-cache hit gives it")
    if native:
        why["row_variant_matmuls"] += " (not while the native decoder runs: each row alone)"
    return True


def _threads(config: EngineConfig, cuda: bool, native: bool, hw: Hardware,
             why: dict[str, str]) -> int | None:
    """The CPU threads to compute with (None: torch's own count, on CUDA without --threads):
    ``--threads``, else the process's budget, shared by the ranks of a tensor-parallel group
    on this host (each computing with all of them, they would fight over the cores at every
    collective)."""
    if cuda and not config.num_threads:
        why["threads"] = "torch's own count: the GPU computes"
        return None
    budget = hw.threads(config.num_threads)
    threads, why["threads"] = budget.threads, budget.reason
    if config.num_threads is None and config.tensor_parallel_size > 1:
        ranks = hw.ranks_on_this_host(config.tensor_parallel_size)
        threads = max(1, budget.threads // ranks)
        why["threads"] = (f"{budget.reason}, shared by the {ranks} tensor-parallel ranks on "
                          "this host")
    if native:
        why["threads"] += " (the kernels' pool; torch's own small ops on one)"
    return threads


def _kv_sizing(config: EngineConfig, cuda: bool, why: dict[str, str]) -> str:
    """How the KV cache's size is found (:data:`KV_SIZINGS`)."""
    if config.kv_layout == "static":
        why["kv_sizing"] = (f"kv_layout static: {config.max_parallel} slots of num_ctx "
                            f"{config.num_ctx} tokens")
        return "slots"
    if config.kv_cache_memory is not None:
        why["kv_sizing"] = f"--kv-cache-memory {config.kv_cache_memory} bytes"
        return "fixed"
    if cuda:
        sizing = "profile"
        why["kv_sizing"] = (f"what a profiling pass leaves of gpu_memory_utilization "
                            f"{config.gpu_memory_utilization} of the GPU's memory")
    else:
        sizing = "share"
        why["kv_sizing"] = (f"kv_cache_fraction {config.kv_cache_fraction} of the memory "
                            "available, at most 2 GiB")
    if config.kv_cache_sequences is not None:
        why["kv_sizing"] += f", at most {config.kv_cache_sequences} sequences of full length"
    return sizing


def _cuda_graphs(config: EngineConfig, cuda: bool, attention: str, why: dict[str, str]) -> bool:
    if not cuda:
        why["cuda_graphs"] = "CUDA only"
    elif config.tensor_parallel_size > 1:
        why["cuda_graphs"] = "off under tensor parallelism: no graph captures the all-reduce"
    elif config.enforce_eager:
        why["cuda_graphs"] = "--enforce-eager"
    elif attention not in GRAPH_BACKENDS:
        why["cuda_graphs"] = "CUDA graphs need the triton attention backend; running eagerly"
    else:
        why["cuda_graphs"] = "decode steps replay a graph per batch-size bucket"
        return True
    return False


def _async_reason(config: EngineConfig, overlap: bool) -> str:
    if config.tensor_parallel_size > 1:
        return "off under tensor parallelism: a worker feeds no ids"
    if config.async_scheduling is not None:
        return "--async-scheduling" if overlap else "--no-async-scheduling"
    return ("auto: on CUDA the host prepares a step while the device runs the one before"
            if overlap else "auto: on a CPU the host runs the step itself")


def resolve_low_bit(setting: bool | None, requested_dtype: str, dtype: str) -> bool:
    """Whether small CPU steps read low-bit weights (``EngineConfig.low_bit_small_steps``):
    ``None`` means in bfloat16, and in float32 only when ``"auto"`` chose it, so that an
    explicit ``float32`` stays the exact reference."""
    if setting is not None:
        return setting
    return dtype == "bfloat16" or (dtype == "float32" and requested_dtype == "auto")


def resolve_dtype(dtype: str, device: str = "cpu", native_kernels: bool | None = False,
                  hardware: Hardware | None = None) -> str:
    """``"auto"``: on a CPU, float32 where the CPU kernels are usable (`native_kernels` not
    False, EngineConfig's): their decoder computes in float32 around int4 weights and int8
    activations, faster than bfloat16 at every batch size measured (docs/performance.md);
    else bfloat16 where the hardware computes it natively, else float32."""
    if dtype != "auto":
        return dtype
    hw = hardware if hardware is not None else Machine()
    if device.startswith("cuda"):
        return "bfloat16" if hw.cuda_bf16() else "float16"
    if native_kernels is not False and hw.cpu_kernels_available():
        return "float32"
    return "bfloat16" if hw.cpu_bf16() else "float32"


def resolve_config_dtype(config: EngineConfig, hardware: Hardware | None = None) -> str:
    """The dtype an engine of `config` computes in and loads its weights in: resolve_dtype
    with the CPU kernels counted unless the config turns them (or the low-bit small steps
    they serve) off."""
    native = config.native_kernels if config.low_bit_small_steps is not False else False
    return resolve_dtype(config.dtype, config.device, native, hardware)


def resolve_kv_cache_dtype(setting: str, requested_dtype: str, dtype: str, device: str) -> str:
    """``EngineConfig.kv_cache_dtype``: ``"auto"`` is the compute dtype, except float16 where
    ``"auto"`` chose float32 on a CPU (as llama.cpp caches K and V), so that an explicit
    ``float32`` stays the exact reference."""
    if setting != "auto":
        return setting
    if dtype == "float32" and requested_dtype == "auto" and not device.startswith("cuda"):
        return "float16"
    return dtype


def resolve_async_scheduling(setting: bool | None, device: str) -> bool:
    """``EngineConfig.async_scheduling``: None means on CUDA (where the device runs a step
    while the host prepares the next); on a CPU the host computes the step itself, so
    reading its tokens one step late gains nothing."""
    return device.startswith("cuda") if setting is None else setting


def _dtype_reason(config: EngineConfig, dtype: str, cuda: bool, hw: Hardware) -> str:
    if config.dtype != "auto":
        return f"--dtype {dtype}"
    if cuda:
        return ("auto: this GPU computes bfloat16" if dtype == "bfloat16"
                else "auto: float16, since this GPU has no bfloat16")
    if dtype == "bfloat16":
        return "auto: this CPU computes bfloat16 natively"
    native = config.native_kernels if config.low_bit_small_steps is not False else False
    if native is not False and hw.cpu_kernels_available():
        return ("auto: float32 because the CPU kernels run (int4 weights, float32 around them); "
                "--dtype float32 keeps the exact dense model")
    return "auto: this CPU has no native bfloat16, and no CPU kernels run"


def _low_bit_reason(setting: bool | None, requested: str, dtype: str, cuda: bool,
                    low_bit: bool) -> str:
    if cuda:
        return "CPU only: the GPU reads the dense weights"
    if dtype not in ("bfloat16", "float32"):
        return f"bfloat16 and float32 models only, not {dtype}"
    if setting is not None:
        return f"low_bit_small_steps {setting}"
    if low_bit:
        return ("auto: in bfloat16" if dtype == "bfloat16"
                else "auto: in the float32 that dtype auto chose")
    return "auto: off in an explicit float32, the exact reference"


def _attention_backend(choice: str, cuda: bool, hw: Hardware, why: dict[str, str]) -> str:
    """``EngineConfig.attention_backend``: auto is Triton on CUDA when its kernels launch
    there, else torch; triton asked for on a CPU runs under the Triton interpreter (tests)."""
    if choice == "torch":
        why["attention_backend"] = "attention_backend torch"
        return "torch"
    if choice == "auto" and not cuda:
        why["attention_backend"] = "auto: torch's kernels on a CPU"
        return "torch"
    problem = hw.triton_problem("cuda" if cuda else "cpu")
    if problem is not None:
        if choice == "triton":
            raise ValueError(f"attention_backend triton: {problem}")
        logger.warning("attention runs in plain torch: %s", problem)
        why["attention_backend"] = f"auto: torch, since {problem}"
        return "torch"
    why["attention_backend"] = ("attention_backend triton" if choice == "triton"
                                else "auto: Triton's kernels launch on this GPU")
    return "triton"


def _fused_ops(setting: bool | None, cuda: bool, hw: Hardware, why: dict[str, str]) -> bool:
    """``EngineConfig.fused_ops``: None is the Triton kernels on CUDA when they launch there;
    True insists on them (on a CPU: the interpreter), False keeps torch's."""
    if setting is False:
        why["fused_ops"] = "fused_ops False"
        return False
    if setting is None and not cuda:
        why["fused_ops"] = "auto: torch's ops on a CPU"
        return False
    problem = hw.triton_problem("cuda" if cuda else "cpu")
    if problem is not None:
        if setting:
            raise ValueError(f"fused_ops: {problem}")
        why["fused_ops"] = f"auto: torch's ops, since {problem}"
        return False
    why["fused_ops"] = "fused_ops True" if setting else "auto: Triton kernels on CUDA"
    return True


def _linear_kernel(low_bit: bool, dtype: str, kernels: cpu_kernels.Kernels | None,
                   watch: cpu_kernels.KernelWatch | None) -> tuple[str, str]:
    """What the matmuls read (``models/linear_kernels.py``), and why."""
    if not low_bit:
        return "dense", "the low-bit small steps are off: every step reads the dense weights"
    small = f"decode steps of up to {SMALL_STEP_TOKENS} tokens"
    if kernels is not None and dtype == "float32":
        return (f"cpu-q4_1 {kernels.isa}, every step",
                "Q4_1 tiles (a Q8_0 LM head): faster than dense float32 at every size, and a "
                "row rounds alike in any batch")
    if kernels is not None:
        return (f"cpu-q4_1 {kernels.isa} + dense",
                f"{small} read Q4_1 tiles (a Q8_0 LM head); larger ones are compute-bound and "
                f"keep dense {dtype}")
    later = "; the CPU kernels once built" if watch is not None else ""
    return ("torch int4 + dense",
            f"{small} read int4 (an int8 LM head) with torch's weight-only kernels; larger "
            f"ones dense{later}")


def with_plan(config: EngineConfig, plan: ExecutionPlan) -> EngineConfig:
    """`config` with the plan's choices in place of its "auto"s (what the engine reports)."""
    return dataclasses.replace(config, dtype=plan.dtype, kv_cache_dtype=plan.kv_cache_dtype,
                               low_bit_small_steps=plan.low_bit_small_steps)
