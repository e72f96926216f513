"""How many threads the engine computes with on a CPU: what this process may actually use,
not the host's core count.

Two limits apply, and the smaller one wins:
- the CPU affinity (``os.sched_getaffinity``: taskset, cpusets, Docker's ``--cpuset-cpus``);
- the cgroup's CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cfs_period_us``:
  Docker's ``--cpus``, Kubernetes' CPU limit), in whole CPUs, rounded down (at least 1). A
  process with more runnable threads than its quota is throttled in every period: all its
  threads stop together until the next, which is where a step's threads waiting at a barrier
  for a throttled one lose most.

A cgroup's quota may be set on any ancestor of the process's own group; the smallest along the
path counts. Imports nothing outside the standard library.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class CpuBudget:
    threads: int
    reason: str  # for the log: which limit decided, and the other


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` ("QUOTA PERIOD", QUOTA "max" for none) -> CPUs, or None."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _own_group(proc_cgroup: str, controller: str | None) -> str:
    """This process's group path from /proc/self/cgroup: the v2 line (``0::/path``), or the
    v1 line that lists `controller`."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if controller is None and parts[0] == "0" and parts[1] == "":
            return parts[2]
        if controller is not None and controller in parts[1].split(","):
            return parts[2]
    return "/"


def _ancestors(root: Path, group: str) -> list[Path]:
    """root/group and each of its parents up to root, innermost first (a group path that is
    not under root, as inside a container's namespace, counts as root itself)."""
    path = (root / group.lstrip("/")) if group.strip("/") else root
    if not path.is_dir():
        path = root
    chain = [path]
    while path != root and root in path.parents:
        path = path.parent
        chain.append(path)
    return chain


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None
                     ) -> tuple[float, str] | None:
    """The smallest CPU quota on this process's cgroup path, in CPUs, with the file that set
    it; None where there is none (or no cgroup file system)."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    quotas = []
    if (root / "cgroup.controllers").exists() or (root / "cpu.max").exists():  # v2
        for directory in _ancestors(root, _own_group(proc_cgroup, None)):
            text = _read(directory / "cpu.max")
            cpus = parse_cpu_max(text) if text else None
            if cpus is not None:
                quotas.append((cpus, f"{directory / 'cpu.max'}: {text}"))
    else:  # v1: the cpu controller's own hierarchy
        base = next((root / name for name in ("cpu,cpuacct", "cpu") if (root / name).is_dir()),
                    None)
        if base is not None:
            for directory in _ancestors(base, _own_group(proc_cgroup, "cpu")):
                quota = _read(directory / "cpu.cfs_quota_us")
                period = _read(directory / "cpu.cfs_period_us")
                cpus = parse_cpu_max(f"{quota} {period}") if quota and period else None
                if cpus is not None and quota != "-1":
                    quotas.append((cpus, f"{directory}: cfs_quota_us {quota}, "
                                         f"cfs_period_us {period}"))
    return min(quotas) if quotas else None


def affinity_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_budget(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None,
               cpus: int | None = None) -> CpuBudget:
    """The threads this process should compute with, and why."""
    cpus = cpus if cpus is not None else affinity_cpus()
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if quota is not None and math.floor(quota[0]) < cpus:
        threads = max(1, math.floor(quota[0]))
        return CpuBudget(threads, f"the cgroup's CPU quota is {quota[0]:g} CPUs ({quota[1]}); "
                                  f"{cpus} CPUs in this process's affinity")
    reason = f"{cpus} CPUs in this process's affinity"
    if quota is not None:
        reason += f" (the cgroup's quota, {quota[0]:g} CPUs, allows them)"
    return CpuBudget(cpus, reason)
