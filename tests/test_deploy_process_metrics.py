"""process_* series for each process of a server (front ends, engine core, supervisor), each
under its own ``process`` label: what the OOMKilled and restart runbooks read to tell which
process held the memory. A real `pagedserve serve` is checked in test_deploy_promql.py."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.engine.messages import EngineStats
from pagedserve.metrics import ServerMetrics, ServingProcesses

FAMILIES = {"process_cpu_seconds", "process_resident_memory_bytes",
            "process_virtual_memory_bytes", "process_start_time_seconds", "process_open_fds",
            "process_max_fds"}

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")


def _process_samples(metrics: ServerMetrics) -> dict[tuple[str, str], float]:
    samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name.startswith("process_"):
                samples[(s.name, s.labels["process"])] = s.value
    return samples


@pytest.fixture
def child():
    """A process standing in for the engine core (or another front end)."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def test_front_end_and_core_each_under_their_label(child):
    metrics = ServerMetrics("m", EngineStats, processes=ServingProcesses(0, child.pid))
    samples = _process_samples(metrics)
    assert {role for _, role in samples} == {"frontend-0", "core"}
    names = {name.removesuffix("_total") for name, _ in samples}
    assert names == FAMILIES
    # this process is the front end: it holds torch, far more than `sleep` does
    assert samples[("process_resident_memory_bytes", "frontend-0")] > samples[
        ("process_resident_memory_bytes", "core")] > 0
    assert samples[("process_start_time_seconds", "core")] > samples[
        ("process_start_time_seconds", "frontend-0")]
    assert samples[("process_cpu_seconds_total", "frontend-0")] > 0


def test_a_core_that_has_gone_drops_out(child):
    metrics = ServerMetrics("m", EngineStats, processes=ServingProcesses(0, child.pid))
    child.kill()
    child.wait()
    assert {role for _, role in _process_samples(metrics)} == {"frontend-0"}


def test_without_processes_there_are_none():
    assert not _process_samples(ServerMetrics("m", EngineStats))


def test_several_front_ends_each_report_all_of_them(tmp_path, child):
    """--api-server-count N: a scrape lands on any front end; each one reports every front end
    (found by the pid files in the shared metrics directory), the core and the supervisor,
    so that a series never jumps between processes from one scrape to the next."""
    core = subprocess.Popen(["sleep", "60"])
    try:
        first = ServerMetrics("m", EngineStats, multiprocess_dir=str(tmp_path),
                              processes=ServingProcesses(0, core.pid))
        (tmp_path / "frontend-1.pid").write_text(str(child.pid))  # what front end 1 writes
        samples = _process_samples(first)
        assert {role for _, role in samples} == {"frontend-0", "frontend-1", "core",
                                                 "supervisor"}
        start = samples[("process_start_time_seconds", "frontend-1")]
        assert abs(start - time.time()) < 120
        assert (tmp_path / "frontend-0.pid").read_text() == str(os.getpid())
    finally:
        core.kill()
        core.wait()


def test_a_pid_file_being_written_is_passed_over(tmp_path):
    """Front ends start together: one may read another's pid file between its creation and its
    write. That front end is left out of this scrape rather than failing the reader's start
    (which had left it answering "loading" for ever)."""
    (tmp_path / "frontend-1.pid").write_text("")
    metrics = ServerMetrics("m", EngineStats, multiprocess_dir=str(tmp_path),
                            processes=ServingProcesses(0, None))
    assert {role for _, role in _process_samples(metrics)} == {"frontend-0", "supervisor"}
    assert not list(tmp_path.glob("*.partial"))
