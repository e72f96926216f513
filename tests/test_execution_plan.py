"""The execution plan: every decision about how the engine computes, made once from the config
and what the hardware allows (worker/execution_plan.py), and ``pagedserve show --plan``.

Most cases describe a machine (:class:`FakeHardware`, tests/fake_hardware.py): a CPU with or without the CPU kernels or
native bfloat16, a GPU that is not here. One resolves on this machine, only looking."""

from __future__ import annotations

import pytest
from fake_hardware import FakeHardware, plan_of

from pagedserve.cli import main
from pagedserve.config import EngineConfig
from pagedserve.ops import cpu_kernels
from pagedserve.ops.cpu_kernels.threads import CpuBudget
from pagedserve.worker.execution_plan import (
    GRAPH_BACKENDS,
    KV_SIZINGS,
    Machine,
    resolve_config_dtype,
    resolve_execution_plan,
    resolve_kv_cache_dtype,
    resolve_low_bit,
)


def test_auto_on_a_cpu_with_the_kernels_runs_them_in_float32_with_a_float16_cache():
    plan = plan_of()
    assert (plan.device, plan.dtype, plan.kv_cache_dtype) == ("cpu", "float32", "float16")
    assert (plan.attention_backend, plan.fused_ops, plan.cuda_graphs, plan.async_scheduling) == (
        "torch", False, False, False)
    assert plan.low_bit_small_steps and plan.cpu_kernels == "avx2" and plan.native_decoder
    assert plan.linear_kernel == "cpu-q4_1 avx2, every step"
    assert plan.threads == 3 and plan.why["threads"] == (
        "3 CPUs in this process's affinity (the kernels' pool; torch's own small ops on one)")
    assert plan.why["dtype"].startswith("auto: float32 because the CPU kernels run")
    assert plan.kernels.isa == "avx2"


def test_every_decision_says_why():
    for plan in (plan_of(), plan_of(dtype="float32"), plan_of(device="cuda"),
                 plan_of(FakeHardware(kernels_isa=None, native_bf16=True))):
        rows = plan.rows()
        assert [name for name, _, _ in rows][:3] == ["device", "dtype", "kv_cache_dtype"]
        assert all(why for _, _, why in rows), rows
        assert plan.summary().startswith(f"device {plan.device}, dtype {plan.dtype}, ")


def test_native_kernels_off_names_the_torch_path():
    plan = plan_of(native_kernels=False)  # a CPU without native bf16: auto is float32
    assert (plan.dtype, plan.low_bit_small_steps, plan.cpu_kernels) == ("float32", True, None)
    assert not plan.native_decoder and plan.kernels is None
    assert plan.linear_kernel == "torch int4 + dense"
    assert plan.why["linear_kernel"].startswith("decode steps of up to 8 tokens read int4")
    assert plan.why["cpu_kernels"] == "native_kernels False: torch's int4 kernel"
    bf16 = plan_of(FakeHardware(native_bf16=True), native_kernels=False)
    assert (bf16.dtype, bf16.kv_cache_dtype, bf16.low_bit_small_steps) == (
        "bfloat16", "bfloat16", True)
    assert bf16.why["dtype"] == "auto: this CPU computes bfloat16 natively"
    assert bf16.linear_kernel == "torch int4 + dense"
    with_kernels = plan_of(FakeHardware(native_bf16=True), dtype="bfloat16")
    assert with_kernels.linear_kernel == "cpu-q4_1 avx2 + dense"
    assert with_kernels.why["linear_kernel"].endswith("keep dense bfloat16")


def test_no_low_bit_steps_means_dense_and_no_kernels():
    plan = plan_of(low_bit_small_steps=False)
    # the kernels serve only the low-bit steps: without them, auto is not float32 for them
    assert plan.dtype == "float32" and plan.why["dtype"].startswith("auto: this CPU has no")
    assert (plan.low_bit_small_steps, plan.cpu_kernels, plan.linear_kernel) == (
        False, None, "dense")
    assert plan.why["cpu_kernels"] == "they serve the low-bit steps, which are off"


def test_an_explicit_float32_stays_the_exact_reference():
    plan = plan_of(dtype="float32")
    assert (plan.dtype, plan.kv_cache_dtype, plan.low_bit_small_steps) == (
        "float32", "float32", False)
    assert plan.linear_kernel == "dense" and not plan.native_decoder
    assert plan.why["dtype"] == "--dtype float32"
    assert plan.why["low_bit_small_steps"] == ("auto: off in an explicit float32, the exact "
                                               "reference")
    forced = plan_of(dtype="float32", low_bit_small_steps=True)
    assert forced.low_bit_small_steps and forced.native_decoder and forced.cpu_kernels == "avx2"


def test_a_bfloat16_cache_keeps_the_native_decoder_off():
    plan = plan_of(dtype="float32", kv_cache_dtype="bfloat16", low_bit_small_steps=True)
    assert plan.cpu_kernels == "avx2" and not plan.native_decoder
    assert "float32 or float16 KV caches" in plan.why["native_decoder"]
    assert plan.why["kv_cache_dtype"] == "--kv-cache-dtype bfloat16"


def test_kernels_building_in_the_background_are_planned_for():
    plan = plan_of(FakeHardware(building=True))
    assert plan.cpu_kernels is None and plan.kernel_watch is not None
    assert plan.native_decoder  # once they land, between two steps
    assert plan.why["cpu_kernels"].startswith("not built: compiling in the background")
    assert plan.linear_kernel.startswith("torch int4")
    unusable = plan_of(FakeHardware(kernels_isa=None), native_kernels=None, dtype="bfloat16")
    assert unusable.why["cpu_kernels"] == "unusable here: no CPU kernels for riscv64 yet"


def test_the_plan_agrees_with_the_resolve_functions():
    """The resolve_* functions the plan is made of keep their rules (test_low_bit.py and
    test_kv_cache_dtype.py test them alone)."""
    hw = FakeHardware()
    for config in (EngineConfig(), EngineConfig(dtype="float32"),
                   EngineConfig(dtype="bfloat16", kv_cache_dtype="float16"),
                   EngineConfig(low_bit_small_steps=True, dtype="float32"),
                   EngineConfig(native_kernels=False)):
        plan = resolve_execution_plan(config, hw)
        assert plan.dtype == resolve_config_dtype(config, hw)
        assert plan.kv_cache_dtype == resolve_kv_cache_dtype(config.kv_cache_dtype, config.dtype,
                                                             plan.dtype, config.device)
        assert plan.low_bit_small_steps == resolve_low_bit(config.low_bit_small_steps,
                                                           config.dtype, plan.dtype)


def test_cuda_takes_triton_graphs_and_overlapped_steps():
    plan = plan_of(device="cuda")
    assert (plan.dtype, plan.kv_cache_dtype, plan.attention_backend) == (
        "bfloat16", "bfloat16", "triton")
    assert plan.fused_ops and plan.cuda_graphs and plan.async_scheduling
    assert not plan.low_bit_small_steps and plan.cpu_kernels is None and plan.threads is None
    assert plan.linear_kernel == "dense"
    assert plan.why["attention_backend"] == "auto: Triton's kernels launch on this GPU"
    assert plan_of(FakeHardware(gpu_bf16=False), device="cuda:1").dtype == "float16"
    assert plan_of(device="cuda", num_threads=4).threads == 4


def test_cuda_without_triton_falls_back_to_torch_and_runs_eagerly():
    hw = FakeHardware(triton="no C compiler: CC is unset")
    plan = plan_of(hw, device="cuda")
    assert (plan.attention_backend, plan.fused_ops, plan.cuda_graphs) == ("torch", False, False)
    assert plan.why["attention_backend"] == "auto: torch, since no C compiler: CC is unset"
    assert plan.why["cuda_graphs"].startswith("CUDA graphs need the triton attention backend")
    with pytest.raises(ValueError, match="^attention_backend triton: no C compiler"):
        plan_of(hw, device="cuda", attention_backend="triton")
    with pytest.raises(ValueError, match="^fused_ops: no C compiler"):
        plan_of(hw, device="cuda", fused_ops=True)


def test_cuda_flags_turn_decisions_off():
    plan = plan_of(device="cuda", enforce_eager=True, async_scheduling=False)
    assert not plan.cuda_graphs and plan.why["cuda_graphs"] == "--enforce-eager"
    assert not plan.async_scheduling and plan.why["async_scheduling"] == "--no-async-scheduling"
    with pytest.raises(ValueError, match="needs attention_backend torch"):
        plan_of(device="cuda", dtype="bfloat16", kv_cache_dtype="float16")
    torch_cache = plan_of(device="cuda", dtype="bfloat16", kv_cache_dtype="float16",
                          attention_backend="torch")
    assert torch_cache.kv_cache_dtype == "float16" and not torch_cache.cuda_graphs


def test_tensor_parallelism_runs_the_torch_path_eagerly():
    cpu = plan_of(tensor_parallel_size=2)
    assert not cpu.low_bit_small_steps and cpu.linear_kernel == "dense"
    assert "tensor parallelism" in cpu.why["low_bit_small_steps"]
    gpu = plan_of(device="cuda", tensor_parallel_size=2)
    assert not gpu.cuda_graphs and not gpu.async_scheduling
    assert "tensor parallelism" in gpu.why["cuda_graphs"]


def test_float32_matmuls_on_a_cpu_are_row_variant():
    """MKL's float32 GEMM rounds a row by the rows beside it (the runner then runs a prompt's
    tail in a pass of its own); bfloat16 and the GPU's matmuls do not."""
    exact = plan_of(dtype="float32")
    assert exact.row_variant_matmuls
    assert exact.why["row_variant_matmuls"].startswith("MKL's float32 GEMM rounds a row")
    native = plan_of()  # float32 on the CPU kernels: torch's matmuls until the decoder runs
    assert native.native_decoder and native.row_variant_matmuls
    assert native.why["row_variant_matmuls"].endswith(
        "(not while the native decoder runs: each row alone)")
    bf16 = plan_of(FakeHardware(native_bf16=True, kernels_isa=None))
    assert bf16.dtype == "bfloat16" and not bf16.row_variant_matmuls
    assert bf16.why["row_variant_matmuls"] == (
        "bfloat16 matmuls on a CPU round a row alike in any batch")
    gpu = plan_of(device="cuda", dtype="float32")
    assert not gpu.row_variant_matmuls and "GPU" in gpu.why["row_variant_matmuls"]


def test_tensor_parallel_ranks_share_this_hosts_threads():
    """Without --threads the ranks on one host split its budget (each computing with all of
    it, they would fight over the cores at every collective); --threads is each rank's."""
    budget = CpuBudget(8, "8 CPUs in this process's affinity")
    shared = plan_of(FakeHardware(budget=budget), tensor_parallel_size=4)
    assert shared.threads == 2
    assert shared.why["threads"] == ("8 CPUs in this process's affinity, shared by the 4 "
                                     "tensor-parallel ranks on this host")
    two_here = plan_of(FakeHardware(budget=budget, host_ranks=2), tensor_parallel_size=4)
    assert two_here.threads == 4
    assert plan_of(FakeHardware(budget=CpuBudget(3, "3 CPUs")), tensor_parallel_size=4
                   ).threads == 1  # never none
    assert plan_of(FakeHardware(budget=budget), tensor_parallel_size=4, num_threads=5
                   ).threads == 5
    assert plan_of(FakeHardware(budget=budget)).threads == 8  # one rank: the whole budget
    gpu = plan_of(FakeHardware(budget=budget), device="cuda", tensor_parallel_size=2)
    assert gpu.threads is None


def test_the_kv_cache_is_sized_by_a_gpu_profile_or_a_cpu_share():
    cpu = plan_of()
    assert cpu.kv_sizing == "share"
    assert cpu.why["kv_sizing"] == ("kv_cache_fraction 0.25 of the memory available, at most "
                                    "2 GiB")
    gpu = plan_of(device="cuda", gpu_memory_utilization=0.8)
    assert gpu.kv_sizing == "profile"
    assert gpu.why["kv_sizing"] == ("what a profiling pass leaves of gpu_memory_utilization 0.8 "
                                    "of the GPU's memory")
    run = plan_of(kv_cache_sequences=4)  # `pagedserve run`: room for a few sequences
    assert run.kv_sizing == "share" and run.why["kv_sizing"].endswith(
        ", at most 4 sequences of full length")
    fixed = plan_of(device="cuda", kv_cache_memory=1 << 30)
    assert (fixed.kv_sizing, fixed.why["kv_sizing"]) == (
        "fixed", "--kv-cache-memory 1073741824 bytes")
    slots = plan_of(device="cuda", kv_layout="static", max_parallel=2, num_ctx=512)
    assert (slots.kv_sizing, slots.why["kv_sizing"]) == (
        "slots", "kv_layout static: 2 slots of num_ctx 512 tokens")
    assert {p.kv_sizing for p in (cpu, gpu, fixed, slots)} == set(KV_SIZINGS)


def test_the_engine_sizes_its_kv_cache_as_the_plan_says(tiny_llama_dir, monkeypatch):
    """A plan that says "profile" runs the GPU's profiling pass, whatever the device (here a
    CPU, the pass's result given); "share" takes the CPU's share, kv_cache_sequences capping
    both."""
    import dataclasses

    from pagedserve.core import kv_sizing
    from pagedserve.engine.core import EngineCore
    from pagedserve.loader import load_model
    from pagedserve.worker.model_runner import ModelRunner

    MiB = 1 << 20
    asked = []

    def profile(runner, num_tokens, num_seqs, model_len):
        asked.append((num_tokens, num_seqs, model_len))
        return kv_sizing.GpuMemory(total=16 * MiB, free=12 * MiB, torch_peak=4 * MiB,
                                   torch_reserved=3 * MiB)

    monkeypatch.setattr(ModelRunner, "profile_gpu_memory", profile)
    monkeypatch.setattr(kv_sizing, "cpu_kv_cache_bytes", lambda fraction: 2 * MiB)
    loaded = load_model(tiny_llama_dir)
    config = EngineConfig(dtype="float32", max_num_batched_tokens=64, max_num_seqs=4,
                          max_model_len=128, gpu_memory_utilization=0.5)

    def core(sizing: str, **more) -> EngineCore:
        c = dataclasses.replace(config, **more)
        plan = dataclasses.replace(resolve_execution_plan(c), kv_sizing=sizing)
        return EngineCore(loaded.config, dict(loaded.weights), loaded.tokenizer, c, plan=plan)

    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads x 16, fp32
    # 16 MiB x 0.5 - 4 MiB of torch's peak - 1 MiB outside torch (16 - 12 - 3)
    assert core("profile").kv.num_blocks == 3 * MiB // per_block
    assert asked == [(64, 4, 128)]
    assert core("share").kv.num_blocks == 2 * MiB // per_block and len(asked) == 1
    # two sequences of 128 tokens: 8 blocks each
    assert core("profile", kv_cache_sequences=2).kv.num_blocks == 16


def test_graph_backends_are_those_whose_kernels_a_graph_can_capture():
    from pagedserve.ops.attention import TORCH_BACKEND
    from pagedserve.ops.attention_triton import TRITON_BACKEND

    assert {b.name for b in (TORCH_BACKEND, TRITON_BACKEND) if b.supports_cuda_graphs} == (
        GRAPH_BACKENDS)


def test_this_machine_is_resolved_without_building_anything():
    config = EngineConfig()
    plan = resolve_execution_plan(config, Machine(build_kernels=False))
    assert plan.dtype == resolve_config_dtype(config) and plan.kernel_watch is None
    assert plan.cpu_kernels == (cpu_kernels.load().isa if cpu_kernels.available() and
                                plan.low_bit_small_steps else None)
    assert plan.threads is not None and plan.threads >= 1


def test_the_engine_builds_its_runner_and_model_from_one_plan(tiny_llama_dir, caplog):
    """The runner computes as the engine's plan says: torch's int4 kernel in each matmul when
    the CPU kernels are off, no native decoder; the plan is logged once."""
    from pagedserve.engine import Engine
    from pagedserve.models.linear_kernels import Dense, TorchInt4, TorchInt8

    config = EngineConfig(dtype="float32", low_bit_small_steps=True, native_kernels=False,
                          kv_cache_memory=8 << 20)
    with caplog.at_level("INFO", logger="pagedserve.engine.core"):
        core = Engine.from_model(str(tiny_llama_dir), config).core
    assert core.runner.plan is core.plan
    assert (core.config.dtype, core.config.kv_cache_dtype) == ("float32", "float32")
    assert core.plan.linear_kernel.startswith("torch int4") and not core.plan.native_decoder
    model = core.runner.model
    assert model.decoder_layers.name == "torch" and model.kernels is None
    assert all(type(linear.kernel) is TorchInt4 for layer in model.layers
               for linear in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down))
    assert type(model.lm_head.kernel) is TorchInt8
    logged = [r.message for r in caplog.records if r.message.startswith("execution plan: ")]
    assert logged == [f"execution plan: {core.plan.summary()}"]
    dense = Engine.from_model(str(tiny_llama_dir), EngineConfig(dtype="float32",
                                                                kv_cache_memory=8 << 20)).core
    assert type(dense.runner.model.layers[0].mlp.down.kernel) is Dense


# -- pagedserve show --plan -------------------------------------------------------------------


def plan_table(out: str) -> dict[str, tuple[str, str]]:
    """decision -> (value, why), from the table `show --plan` prints."""
    lines = out.splitlines()
    assert lines[0].startswith("  Execution plan: smollm2:135m on cpu"), out
    header = lines[1]
    value_at, why_at = header.index("value"), header.index("why")
    return {line[:value_at].strip(): (line[value_at:why_at].strip(), line[why_at:].strip())
            for line in lines[2:]}


def test_show_plan_prints_each_decision_under_the_engine_flags(capsys):
    rc = main(["show", "--plan", "--dtype", "float32", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    table = plan_table(out)
    assert table["dtype"] == ("float32", "--dtype float32")
    assert table["kv_cache_dtype"] == ("float32", "auto: the compute dtype")
    assert table["linear_kernel"][0] == "dense"
    assert table["threads"] == ("1", "--threads")
    assert table["cuda_graphs"] == ("off", "CUDA only")
    assert list(table) == [name for name, _, _ in plan_of().rows()]


def test_show_plan_refuses_what_cannot_run_here(capsys):
    rc = main(["show", "--plan", "--threads", "0"])
    assert rc == 1
    assert capsys.readouterr().err.startswith("Error: --threads must be a positive integer")
    import torch

    if not torch.cuda.is_available():
        assert main(["show", "--plan", "--device", "cuda"]) == 1
        assert "device 'cuda'" in capsys.readouterr().err
