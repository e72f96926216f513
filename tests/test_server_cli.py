"""`pagedserve serve`'s command line: sizes, engine knobs, the API key from the environment."""

from __future__ import annotations

import argparse

import pytest

from pagedserve.arg_types import parse_bytes
from pagedserve.cli import build_parser
from pagedserve.cli.serve import resolve_model
from pagedserve.engine_args import engine_config_from_args


@pytest.mark.parametrize(("text", "size"), [
    ("1024", 1024), ("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5G", 3 << 29),
    ("64 MB", 64 << 20), ("8k", 8192),
])
def test_parse_bytes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "2XB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def test_defaults_bind_ollamas_address(monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model, args.api_key, args.max_queue,
            args.shutdown_timeout) == ("127.0.0.1", 11434, None, None, 512, 30)


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"
    assert build_parser().parse_args(["serve", "--api-key", "given"]).api_key == "given"


def test_engine_knobs_reach_the_engine_config():
    args = build_parser().parse_args([
        "serve", "m.gguf", "--max-num-seqs", "8", "--max-num-batched-tokens", "256",
        "--kv-cache-memory", "256MiB", "--max-model-len", "2048", "--block-size", "32",
        "--no-enable-prefix-caching", "--kv-layout", "static", "--max-parallel", "2",
        "--num-ctx", "1024", "--dtype", "bfloat16", "--kv-cache-dtype", "float16"])
    config = engine_config_from_args(args)
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.kv_cache_memory,
            config.max_model_len, config.block_size, config.enable_prefix_caching,
            config.kv_layout, config.max_parallel, config.num_ctx, config.dtype,
            config.kv_cache_dtype) == (
        8, 256, 256 << 20, 2048, 32, False, "static", 2, 1024, "bfloat16", "float16")


def test_unset_knobs_keep_the_engine_defaults():
    from pagedserve.config import EngineConfig

    config = engine_config_from_args(build_parser().parse_args(["serve"]))
    assert config == EngineConfig(dtype="auto")  # the server picks the fast dtype by default


def test_model_names(smollm_gguf):
    bundled = resolve_model(None, None)
    assert bundled.name == "smollm2:135m" and bundled.source == "bundled"
    assert {"smollm2", "smollm2:latest"} <= bundled.aliases
    by_path = resolve_model(str(smollm_gguf), "smol")
    assert by_path.name == "smol"
    assert {str(smollm_gguf), smollm_gguf.name, smollm_gguf.stem} <= by_path.aliases


@pytest.mark.slow
def test_a_port_in_use_fails_the_start_before_the_model_loads():
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pagedserve", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
    assert done.returncode == 1
    assert "loading" not in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.rstrip().endswith(
        f"ERROR pagedserve.cli.serve: 127.0.0.1:{port} is already in use (another pagedserve or "
        "an Ollama server?): stop it, or choose another port with --port")
    assert elapsed < 30  # about a second on a quiet machine; the model takes longer
