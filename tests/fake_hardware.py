"""A machine described, not probed, for the execution plan (worker/execution_plan.py): a CPU
with or without the CPU kernels or native bfloat16, a GPU that is not here, Triton that cannot
launch. Tests that assert what the plan decides on such a machine resolve it with
:func:`plan_of`."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from pagedserve.config import EngineConfig
from pagedserve.ops import cpu_kernels
from pagedserve.ops.cpu_kernels.threads import CpuBudget
from pagedserve.worker.execution_plan import ExecutionPlan, resolve_execution_plan


@dataclass
class FakeHardware:
    """A machine described, not probed: what each question of the plan answers."""

    gpu_bf16: bool = True
    native_bf16: bool = False
    kernels_isa: str | None = "avx2"  # the CPU kernels built here, None: none usable
    building: bool = False  # none built, a background build started
    triton: str | None = None  # why Triton cannot run, None: it can
    budget: CpuBudget = CpuBudget(3, "3 CPUs in this process's affinity")
    host_ranks: int | None = None  # the tensor-parallel ranks on this host, None: all

    def cuda_bf16(self) -> bool:
        return self.gpu_bf16

    def cpu_bf16(self) -> bool:
        return self.native_bf16

    def cpu_kernels_available(self) -> bool:
        return self.kernels_isa is not None

    def cpu_kernels(self, setting: bool | None) -> cpu_kernels.Resolution:
        if setting is False:
            return cpu_kernels.Resolution(None)
        if self.building:
            return cpu_kernels.Resolution(None, watch=SimpleNamespace(done=False))
        if self.kernels_isa is None:
            return cpu_kernels.Resolution(None)
        return cpu_kernels.Resolution(SimpleNamespace(isa=self.kernels_isa))

    def cpu_kernels_problem(self) -> str:
        return "no CPU kernels for riscv64 yet"

    def triton_problem(self, device_type: str) -> str | None:
        return self.triton

    def threads(self, setting: int | None) -> CpuBudget:
        return CpuBudget(setting, "--threads") if setting else self.budget

    def ranks_on_this_host(self, world_size: int) -> int:
        return min(world_size, self.host_ranks or world_size)


def plan_of(hardware: FakeHardware | None = None, **config) -> ExecutionPlan:
    """The plan of ``EngineConfig(**config)`` on `hardware` (default: a CPU with the kernels)."""
    return resolve_execution_plan(EngineConfig(**config), hardware or FakeHardware())
