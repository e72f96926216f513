"""An image without a C compiler: Triton cannot build its kernels' launchers there, so the CUDA
engine must take the torch kernels at start-up, with one log line, instead of crashing at its
first forward pass (pagedserve/ops/triton_launch.py).

Each case runs in a fresh interpreter whose PATH holds nothing but Python and whose CC is
unset, as in a slim image; the Triton compiler lookup is the one Triton itself makes. The same
case on a GPU, the whole engine, is a section of scripts/gpu-check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
WARNING = "Triton kernels cannot launch here"

# the execution plan of an engine on a GPU (its dtype named, so that its bfloat16 is not
# asked), this machine's Triton answering; then the kernels the plan's names select
SELECT = """
import logging
logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(levelname)s %(message)s")
from pagedserve.config import EngineConfig
from pagedserve.ops.backends import select_backend, select_ops
from pagedserve.ops.triton_launch import compile_problem
from pagedserve.worker.execution_plan import Machine, resolve_execution_plan
def plan(**config):
    return resolve_execution_plan(EngineConfig(device="cuda", dtype="float16", **config),
                                  Machine(build_kernels=False))
print("compile", compile_problem())
auto = plan()
print("selected", select_backend(auto.attention_backend).name, select_ops(auto.fused_ops).name)
try:
    plan(attention_backend="triton")
except ValueError as exc:
    print("explicit", exc)
"""


def _run(code: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def _bare_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """PATH with only Python on it, no CC, Triton's cache in a fresh directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "TRITON_INTERPRET")}
    return env | {"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
                  "TRITON_CACHE_DIR": str(tmp_path / "triton")} | extra


def test_no_c_compiler_means_torch_kernels_and_one_log_line(tmp_path):
    out = _run(SELECT, tmp_path, _bare_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["compile"].startswith("no C compiler")
    assert lines["selected"] == "torch torch"
    # asked for attention, for the elementwise ops and a third time, said once
    warnings = [line for line in out.stderr.splitlines() if WARNING in line]
    assert len(warnings) == 1, out.stderr
    assert "no C compiler" in warnings[0] and "WARNING" in warnings[0]
    # asked for by name, Triton is an error that says why, not a silent substitute
    assert lines["explicit"].startswith("attention_backend triton: no C compiler")


def test_a_compiler_that_fails_is_a_problem_too(tmp_path):
    out = _run(SELECT, tmp_path, _bare_env(tmp_path, CC="/bin/false"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["compile"].startswith("the C compiler /bin/false failed")
    assert lines["selected"] == "torch torch"


def test_the_probe_compiles_where_a_compiler_is(tmp_path):
    import shutil

    if not (shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler on this machine")
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    out = _run("from pagedserve.ops.triton_launch import compile_problem; print(compile_problem())",
               tmp_path, env | {"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "None"


def test_cpu_and_the_interpreter_never_ask(tmp_path):
    """On a CPU device the probe is not asked: auto is torch, and triton under the
    interpreter compiles nothing, so a missing compiler changes neither."""
    code = """
from pagedserve.config import EngineConfig
from pagedserve.ops.backends import select_backend, select_ops
from pagedserve.worker.execution_plan import Machine, resolve_execution_plan
def plan(**config):
    return resolve_execution_plan(EngineConfig(dtype="float32", **config),
                                  Machine(build_kernels=False))
auto, triton = plan(), plan(attention_backend="triton", fused_ops=True)
print(auto.attention_backend, auto.fused_ops, select_backend(triton.attention_backend).name,
      select_ops(triton.fused_ops).name)
"""
    out = _run(code, tmp_path, _bare_env(tmp_path, TRITON_INTERPRET="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["torch", "False", "triton", "triton"]
    assert WARNING not in out.stderr
