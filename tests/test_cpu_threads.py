"""The thread count the engine computes with follows what this process may use: its CPU
affinity and its cgroup's CPU quota (cgroup v2 cpu.max, v1 cfs_quota_us), read from fake cgroup
trees here, and from a real cgroup where this machine lets a test create one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.ops.cpu_kernels.threads import cgroup_cpu_quota, cpu_budget, parse_cpu_max


def test_cpu_max_in_cpus():
    assert parse_cpu_max("max 100000") is None
    assert parse_cpu_max("100000 100000") == 1.0
    assert parse_cpu_max("150000 100000") == 1.5
    assert parse_cpu_max("50000") == 0.5  # the period defaults to 100 ms
    assert parse_cpu_max("") is None and parse_cpu_max("lots 1") is None


def v2_tree(root: Path, limits: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    for group, cpu_max in limits.items():
        directory = root / group.strip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.max").write_text(cpu_max + "\n")
    return root


def test_a_quota_of_one_cpu_gives_one_thread(tmp_path):
    root = v2_tree(tmp_path, {"/": "max 100000", "/pods/a": "100000 100000"})
    budget = cpu_budget(root, "0::/pods/a\n", cpus=8)
    assert budget.threads == 1
    assert "quota is 1 CPUs" in budget.reason and "8 CPUs in this process's affinity" in budget.reason
    assert "pods/a/cpu.max: 100000 100000" in budget.reason


def test_the_smallest_quota_on_the_path_counts(tmp_path):
    root = v2_tree(tmp_path, {"/": "max 100000", "/kubepods": "250000 100000",
                              "/kubepods/pod": "max 100000", "/kubepods/pod/c": "400000 100000"})
    assert cpu_budget(root, "0::/kubepods/pod/c", cpus=16).threads == 2  # 2.5 CPUs: 2 threads
    assert cgroup_cpu_quota(root, "0::/kubepods/pod/c")[0] == 2.5
    half = v2_tree(tmp_path / "half", {"/": "50000 100000"})
    assert cpu_budget(half, "0::/", cpus=4).threads == 1  # at least one


def test_inside_a_containers_namespace_the_root_is_its_own(tmp_path):
    root = v2_tree(tmp_path, {"/": "200000 100000"})
    assert cpu_budget(root, "0::/\n", cpus=64).threads == 2
    # a group path that does not exist under the mount (not in the namespace) counts as root
    assert cpu_budget(root, "0::/system.slice/other", cpus=64).threads == 2


def test_no_quota_leaves_the_affinity(tmp_path):
    root = v2_tree(tmp_path, {"/": "max 100000"})
    budget = cpu_budget(root, "0::/", cpus=3)
    assert budget.threads == 3 and budget.reason == "3 CPUs in this process's affinity"
    roomy = v2_tree(tmp_path / "roomy", {"/": "800000 100000"})
    assert cpu_budget(roomy, "0::/", cpus=3).threads == 3
    assert cpu_budget(tmp_path / "nothing", "", cpus=5).threads == 5  # no cgroup file system


def test_cgroup_v1_quota(tmp_path):
    cpu = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    cpu.mkdir(parents=True)
    (tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    (cpu / "cpu.cfs_quota_us").write_text("100000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    proc = "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n"
    budget = cpu_budget(tmp_path, proc, cpus=4)
    assert budget.threads == 1 and "cfs_quota_us 100000" in budget.reason


def test_the_affinity_limits_the_threads(every_cpu):
    """taskset: the budget is the CPUs this process may run on, not the host's."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs sched_setaffinity and two CPUs")
    cpu = min(os.sched_getaffinity(0))
    code = ("import os; from pagedserve.ops.cpu_kernels.threads import cpu_budget; "
            f"os.sched_setaffinity(0, {{{cpu}}}); print(cpu_budget().threads)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "1"


def make_cgroup_with_one_cpu(name: str) -> Path:
    """A new cgroup under this process's own with a CPU quota of one CPU (v2 cpu.max, or v1's
    cpu controller); skips where this machine does not allow it."""
    own = Path("/proc/self/cgroup").read_text() if Path("/proc/self/cgroup").exists() else ""
    lines = [line.split(":", 2) for line in own.splitlines() if line.count(":") >= 2]
    v2 = Path("/sys/fs/cgroup")
    v1 = next((v2 / d for d in ("cpu,cpuacct", "cpu") if (v2 / d / "cpu.cfs_quota_us").exists()),
              None)
    if (v2 / "cgroup.controllers").exists():
        path = next((p for n, c, p in lines if n == "0" and c == ""), "/")
        group, quota_file, quota = v2 / path.strip("/") / name, "cpu.max", "100000 100000"
    elif v1 is not None:
        path = next((p for n, c, p in lines if "cpu" in c.split(",")), "/")
        group, quota_file, quota = v1 / path.strip("/") / name, "cpu.cfs_quota_us", "100000"
    else:
        pytest.skip("no cgroup file system here")
    try:
        group.mkdir()
        (group / quota_file).write_text(quota + "\n")
    except OSError as exc:
        if group.exists():
            group.rmdir()
        pytest.skip(f"cannot create a cgroup with a CPU quota here: {exc}")
    return group


def test_a_real_cgroup_with_a_quota_of_one_cpu(every_cpu):
    """Where this machine lets a test make a cgroup (root, or a delegated subtree), a process
    moved into one with a quota of one CPU computes with one thread, and says why."""
    group = make_cgroup_with_one_cpu(f"pagedserve-test-{os.getpid()}")
    try:
        code = ("import logging, os, sys\n"
                "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
                f"open('{group}/cgroup.procs', 'w').write(str(os.getpid()))\n"
                "from pagedserve.config import EngineConfig\n"
                "from pagedserve.worker.execution_plan import Machine, resolve_execution_plan\n"
                "plan = resolve_execution_plan(EngineConfig(), Machine(build_kernels=False))\n"
                "print('computing with', plan.threads, 'threads:', plan.why['threads'])\n"
                "print(plan.threads)\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        if done.returncode != 0 and "cgroup.procs" in done.stderr:
            pytest.skip(f"cannot move a process into the cgroup: {done.stderr.strip()[-200:]}")
        assert done.returncode == 0, done.stderr
        log, threads = done.stdout.strip().rsplit("\n", 1)
        assert threads == "1"
        assert "computing with 1 threads: the cgroup's CPU quota is 1 CPUs" in log
    finally:
        group.rmdir()
