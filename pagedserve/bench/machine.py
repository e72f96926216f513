"""A description of the machine a benchmark ran on, for the result file and the report.

Read from /proc where it exists; torch's version comes from the package metadata so the client
never imports torch, and the CPU kernels the engine would choose here come from a process of
their own (``python -m pagedserve.ops.cpu_kernels --json``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from pagedserve.device import cpu_flags

# /proc/cpuinfo's names of the instruction sets that decide how fast the CPU path runs
INSTRUCTION_SETS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                    "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd",
                    "asimddp", "sve")


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def instruction_sets() -> list[str]:
    flags = cpu_flags()
    return [name for name in INSTRUCTION_SETS if name in flags]


def cpu_kernels_here() -> dict:
    """What ``python -m pagedserve.ops.cpu_kernels --json`` says: the variant an engine started
    here uses (``kernels``, None with a ``reason`` where none)."""
    try:
        done = subprocess.run([sys.executable, "-m", "pagedserve.ops.cpu_kernels", "--json"],
                              capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return {"kernels": None, "reason": f"could not ask: {exc}"}


def describe_machine() -> dict:
    memory = memory_bytes()
    kernels = cpu_kernels_here()
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "pagedserve": package_version("pagedserve"),
        "instruction_sets": instruction_sets(),
        "cpu_kernels": kernels.get("kernels"),
        "cpu_kernels_reason": kernels.get("reason"),
    }


def machine_summary(machine: dict) -> str:
    """One line: '2 cores of AMD EPYC, 23.4 GiB RAM, Linux 6.1, Python 3.11.9, torch 2.4.1,
    instruction sets avx2 fma ..., CPU kernels avx512vnni'."""
    parts = [f"{machine.get('cores')} cores of {machine.get('cpu')}"]
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']} GiB RAM")
    parts.append(str(machine.get("os")))
    parts.append(f"Python {machine.get('python')}")
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    if machine.get("instruction_sets"):
        parts.append(f"instruction sets {' '.join(machine['instruction_sets'])}")
    if "cpu_kernels" in machine:  # results from before the kernels were recorded have neither
        parts.append(f"CPU kernels {machine['cpu_kernels']}" if machine["cpu_kernels"]
                     else "no CPU kernels")
    return ", ".join(parts)
