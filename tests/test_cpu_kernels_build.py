"""How the CPU kernels get built and chosen: the package build leaves a library per variant,
a fresh install computes with them from its first step, a start without them switches to them
between two steps once a background build lands, and a variant whose instructions the CPU or
the OS refuses is passed over, not run into a crash."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.llm import LLM
from pagedserve.ops import cpu_kernels
from pagedserve.ops.cpu_kernels import build, isa
from pagedserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def built(cpu_kernels_built) -> Path:
    """The suite's build of this machine's kernels (conftest: setup.py's, once per source
    version)."""
    if cpu_kernels_built is None:
        pytest.skip("no CPU kernels for this machine (no compiler, or no variant for it)")
    return build.cache_dir()


def install_into(root: Path, built: Path) -> None:
    """The libraries of `built` where the engine looks under PAGEDSERVE_KERNEL_DIR=root."""
    target = root / build.source_hash()
    target.mkdir(parents=True, exist_ok=True)
    for path in built.iterdir():
        shutil.copy(path, target / path.name)


def test_the_package_build_leaves_a_library_per_variant(built):
    """setup.py builds the probe and every variant of the architecture, each from the sources'
    hash (a stale library is recognized by it); the engine loads the best this CPU allows."""
    names = {build.library_name(t) for t in [build.PROBE, *(v.name for v in isa.variants_for())]}
    assert names <= {p.name for p in built.iterdir()}
    for name in names:
        assert build.source_hash().encode() in (built / name).read_bytes()
    kernels = cpu_kernels.load()
    assert kernels.library.path.parent == built
    assert isa.allowed(next(v for v in isa.VARIANTS if v.name == kernels.isa),
                       kernels.cpu_features)


def test_the_probe_agrees_with_what_linux_lists():
    """CPUID and XGETBV, read by csrc/probe.c, against /proc/cpuinfo's flags (Linux leaves
    out what it does not save the registers of)."""
    if isa.machine() != "x86_64" or not Path("/proc/cpuinfo").exists():
        pytest.skip("an x86 Linux check")
    from pagedserve.device import cpu_flags

    probe = cpu_kernels._find(build.PROBE, cpu_kernels._load_probe)
    linux_names = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f",
                   "avx512bw": "avx512bw", "avx512vl": "avx512vl",
                   "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni"}
    features, flags = probe.features(), cpu_flags()
    for ours, linux in linux_names.items():
        assert (ours in features) == (linux in flags), ours


def record_native_steps(model) -> list[bool]:
    """A list that gets, for each forward of `model` from now on, whether it took the native
    decoder."""
    steps: list[bool] = []
    forward = model.forward

    def recording(input_ids, positions, kv_caches, meta):
        steps.append(not model.decoder_layers.uses_attention_backend(meta, input_ids.shape[0]))
        return forward(input_ids, positions, kv_caches, meta)

    model.forward = recording
    return steps


def test_a_fresh_install_computes_with_the_kernels_from_its_first_step(built, tmp_path,
                                                                       monkeypatch,
                                                                       tiny_llama_dir):
    """An empty kernel cache beside an install that carries the libraries: the first engine
    uses them (dtype auto: float32 around them, the native decoder) from its first step, and
    builds nothing."""
    monkeypatch.setenv("PAGEDSERVE_KERNEL_DIR", str(tmp_path))
    install_into(tmp_path, built)
    monkeypatch.setattr(build, "build_in_background", lambda: pytest.fail("built again"))
    monkeypatch.setattr(build, "compile_library", lambda *a: pytest.fail("compiled again"))
    llm = LLM(str(tiny_llama_dir))
    runner = llm.engine.runner
    assert llm.engine.config.dtype == "float32" and llm.engine.config.kv_cache_dtype == "float16"
    assert runner.model.decoder_layers.name == "native" and runner._kernel_watch is None
    native_steps = record_native_steps(runner.model)
    llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert native_steps == [True] * 4


class FakeBuild:
    """Stands in for the background build's process: done when the test says so."""

    def __init__(self):
        self.returncode = None

    def poll(self):
        return self.returncode


def test_a_start_without_kernels_switches_to_them_between_steps(built, tmp_path, monkeypatch,
                                                                tiny_llama_dir):
    monkeypatch.setenv("PAGEDSERVE_KERNEL_DIR", str(tmp_path))  # nothing built there
    process = FakeBuild()
    monkeypatch.setattr(build, "build_in_background", lambda: process)
    monkeypatch.setattr(cpu_kernels.KernelWatch, "POLL_INTERVAL_S", 0.0)
    config = EngineConfig(dtype="float32", low_bit_small_steps=True)  # native_kernels None
    llm = LLM(str(tiny_llama_dir), engine_config=config)
    engine, runner = llm.engine, llm.engine.runner
    assert runner._kernel_watch is not None and runner.model.kernels is None
    assert runner.model.layers[0].mlp.down._int4 is not None  # torch's int4 meanwhile
    native_steps = record_native_steps(runner.model)
    engine.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=8,
                                                    ignore_eos=True), request_id="a")
    tokens = []
    for _ in range(3):
        tokens += [t for out in engine.step() for t in out.delta_token_ids]
    assert native_steps == [False] * 3
    install_into(tmp_path, built)  # what the build leaves ...
    process.returncode = 0  # ... when it exits
    while engine.has_unfinished_requests():
        tokens += [t for out in engine.step() for t in out.delta_token_ids]
    assert len(tokens) == 8 and native_steps == [False] * 3 + [True] * 5
    model = runner.model
    assert model.kernels is not None and model.decoder_layers.name == "native"
    assert model.layers[0].mlp.down._int4 is None and model.layers[0].mlp.down._q4 is not None
    assert runner._kernel_watch is None


def test_a_start_with_no_compiler_stays_on_torchs_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(build, "compiler", lambda: None)
    monkeypatch.setattr(build, "build_in_background", lambda: pytest.fail("no compiler"))
    resolution = cpu_kernels.resolve(None)
    assert resolution.kernels is None and resolution.watch is None
    assert cpu_kernels.resolve(False).kernels is None
    with pytest.raises(build.KernelBuildError, match="no C\\+\\+ compiler"):
        cpu_kernels.resolve(True)


def test_a_library_of_other_sources_is_not_loaded(built, monkeypatch):
    """An editable install whose kernel sources changed since `pip install -e .`: its
    libraries are stale and a build is due (the engine starts one in the background)."""
    monkeypatch.setattr(build, "source_hash", lambda: "0123456789ab")
    monkeypatch.setenv("PAGEDSERVE_KERNEL_DIR", str(built.parent))
    shutil.copytree(built, built.parent / "0123456789ab", dirs_exist_ok=True)
    try:
        with pytest.raises(cpu_kernels.KernelsNotBuilt, match="built from other sources"):
            cpu_kernels.load()
    finally:
        shutil.rmtree(built.parent / "0123456789ab")


def test_a_variant_whose_instructions_fault_is_passed_over(built, monkeypatch):
    """A CPU that lists an instruction set its OS does not enable (a virtual machine, say):
    the variant's self-test faults with SIGILL, the guard turns that into an error code, and
    the next variant serves; the process lives on."""
    features = cpu_kernels._find(build.PROBE, cpu_kernels._load_probe).features()
    missing = [v for v in isa.variants_for() if not isa.allowed(v, features)
               and (built / build.library_name(v.name)).exists()]
    if not missing:
        pytest.skip("this CPU runs every variant: none to fault")
    variant, baseline = missing[0], isa.variants_for()[-1]
    claimed = variant.requires | baseline.requires  # the faulting one is the best left
    monkeypatch.setattr(isa.Probe, "features", lambda self: claimed)
    assert cpu_kernels.load().isa == baseline.name  # passed over for the baseline ...
    assert cpu_kernels._verdicts[built / build.library_name(variant.name)] == -1004  # SIGILL
    monkeypatch.setenv(isa.FORCE_ENV, variant.name)
    with pytest.raises(cpu_kernels.KernelUnavailable, match="self-test failed"):
        cpu_kernels.load()


def test_forcing_a_variant_by_name(built, monkeypatch):
    monkeypatch.setenv(isa.FORCE_ENV, "avx2")
    if isa.machine() == "x86_64":
        assert cpu_kernels.load().isa == "avx2"
    monkeypatch.setenv(isa.FORCE_ENV, "sse2")
    with pytest.raises(ValueError, match="PAGEDSERVE_CPU_ISA must be one of avx512vnni"):
        cpu_kernels.load()


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(build.KernelBuildError, match="did not compile"):
        build.compile_library("avx2", tmp_path / "lib.so")
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(build.KernelBuildError, match="could not run"):
        build.compile_library(build.PROBE, tmp_path / "probe.so")
    assert not list(tmp_path.iterdir())


def test_the_engine_takes_its_thread_count_from_the_cpu_budget(built, monkeypatch, caplog,
                                                               tiny_llama_dir):
    """No --threads: the count the affinity and the cgroup quota allow, for torch and the
    kernels' pool alike, logged with the reason."""
    from pagedserve.ops.cpu_kernels.threads import CpuBudget
    from pagedserve.worker import execution_plan

    monkeypatch.setattr(execution_plan, "cpu_budget",
                        lambda: CpuBudget(1, "the cgroup's CPU quota is 1 CPUs (test)"))
    threads = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="pagedserve.engine.core"):
            llm = LLM(str(tiny_llama_dir))
        assert llm.engine.runner.threads == 1
        assert llm.engine.runner.model.kernels.library.threads == 1
        assert "computing with 1 threads: the cgroup's CPU quota is 1 CPUs" in caplog.text
    finally:
        torch.set_num_threads(threads)
        cpu_kernels.load().set_threads(threads)


def test_torch_keeps_one_thread_while_the_native_decoder_runs(built, monkeypatch, tiny_llama_dir):
    """OpenMP's workers spin after each torch op; with the native decoder carrying the layers
    they would spin on the cores the kernels' pool uses, so torch gets one thread then, and the
    whole budget where torch runs the layers."""
    from pagedserve.ops.cpu_kernels.threads import CpuBudget
    from pagedserve.worker import execution_plan

    monkeypatch.setattr(execution_plan, "cpu_budget", lambda: CpuBudget(2, "two CPUs (test)"))
    threads = torch.get_num_threads()
    try:
        native = LLM(str(tiny_llama_dir))
        assert native.engine.runner.model.decoder_layers.name == "native"
        assert torch.get_num_threads() == 1 and native.engine.runner.threads == 2
        assert native.engine.runner.model.kernels.library.threads == 2
        plain = LLM(str(tiny_llama_dir), native_kernels=False)
        assert plain.engine.runner.model.decoder_layers.name == "torch"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
        cpu_kernels.load().set_threads(threads)


def test_workers_block_when_the_pool_is_idle(built):
    """Between steps no thread of the pool burns a core: after a loop, workers spin for at
    most their budget (50 us) and then sleep."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("reads per-thread CPU time from /proc")
    kernels = cpu_kernels.load()
    blocks = kernels.pack(torch.randn(256, 512))
    x = torch.randn(4, 512)
    threads = kernels.library.threads
    kernels.set_threads(2)
    try:
        kernels.matmul(x, blocks)  # the worker exists and has just worked

        def cpu_seconds() -> float:
            ticks = 0
            for task in Path("/proc/self/task").iterdir():
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
            return ticks / os.sysconf("SC_CLK_TCK")

        import time

        time.sleep(0.05)
        before = cpu_seconds()
        time.sleep(0.5)
        assert cpu_seconds() - before < 0.1  # a spinning worker would take ~0.5 s
    finally:
        kernels.set_threads(threads)


def test_the_benchmark_report_names_the_instruction_sets_and_the_kernels(built):
    """`pagedserve bench` records what the CPU offers and which variant an engine here uses,
    asked of a process of its own (the load generator never imports torch)."""
    from pagedserve.bench.machine import describe_machine, machine_summary
    from pagedserve.device import cpu_flags

    machine = describe_machine()
    assert machine["cpu_kernels"] == cpu_kernels.load().isa
    assert "avx2" in machine["instruction_sets"] or "avx2" not in cpu_flags()
    summary = machine_summary(machine)
    assert f"CPU kernels {machine['cpu_kernels']}" in summary
    assert "instruction sets " + " ".join(machine["instruction_sets"]) in summary
    assert "CPU kernels" not in machine_summary({"cpu": "old result", "cores": 2})
