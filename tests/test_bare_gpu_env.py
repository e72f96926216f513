"""The engine path imports on a bare GPU box: torch, triton and transformers, but no fastapi,
uvicorn, gguf or matplotlib, and no llguidance (loaded only when a request brings a grammar):
what scripts/gpu-check relies on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MISSING = ("fastapi", "uvicorn", "starlette", "pydantic", "gguf", "matplotlib", "openai",
           "ollama", "llguidance")

SCRIPT = f"""
import importlib.machinery, importlib.util, sys
for name in {MISSING!r}:
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import pagedserve.engine, pagedserve.llm, pagedserve.loader.dummy, pagedserve.loader.hf
import pagedserve.ops.attention_triton, pagedserve.bench.offline, pagedserve.bench.offline_peer
from pagedserve.cli import build_parser
build_parser().parse_args(["bench", "offline", "dummy:llama-3.1-8b", "--device", "cuda"])
loader = importlib.machinery.SourceFileLoader("gpu_check", "scripts/gpu-check")
module = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
loader.exec_module(module)
assert not [m for m in {MISSING!r} if sys.modules.get(m) is not None]
print("ok")
"""


def test_engine_path_imports_without_the_server_and_gguf_packages():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
