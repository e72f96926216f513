"""The front end's own ceiling: CPU per streamed token with a model that costs nothing.

A tiny random model (2 layers, width 64) with the bundled model's real tokenizer (49,152 tokens,
its chat template) is served by ``pagedserve serve``; C closed-loop clients stream
``/v1/completions`` (SSE, ``ignore_eos``) for a fixed time. The script reads the CPU time
(utime + stime, /proc) of every process of the server, front ends apart from the engine core,
while every user sends a fixed number of requests (after one warm-up request each), and the
tokens the clients received (the final ``usage`` of each stream). With the model this cheap, the front end's microseconds per token bound what one
front-end process can stream: 1e6 / (us per token) tokens per second.

The clients speak HTTP/1.1 over raw asyncio streams (no HTTP library): on a 2-core machine
the load generator shares the cores with the server, and a heavy client would starve it.

    python scripts/frontend_ceiling.py                       # 128 users, one front end
    python scripts/frontend_ceiling.py --api-server-count 2  # two front ends
    python scripts/frontend_ceiling.py --server-args "--dtype float32" --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_tiny_model(out: Path) -> Path:
    """config.json + random safetensors + the bundled GGUF's tokenizer and chat template."""
    import torch
    from safetensors.torch import save_file

    from pagedserve.config import ModelConfig
    from pagedserve.hub.bundled import bundled_model_path
    from pagedserve.loader import expected_weight_names
    from pagedserve.loader.dummy import dummy_weights
    from pagedserve.loader.gguf import GGUFFile, tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(GGUFFile(bundled_model_path()))
    # one head of 64: torch's CPU attention is slow for small head sizes
    config = ModelConfig("llama", vocab_size=tokenizer.vocab_size, hidden_size=64,
                         intermediate_size=128, num_layers=2, num_heads=1, num_kv_heads=1,
                         head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True)
    out.mkdir(parents=True, exist_ok=True)
    weights = dummy_weights(config, torch.float32)
    save_file({k: weights[k].contiguous() for k in expected_weight_names(config)},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
        "head_dim": 64, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_ids[0]}))
    tokenizer.backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tokenizer.chat_template,
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "add_bos_token": tokenizer.add_bos}))
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def server_processes(root: int) -> dict[str, list[int]]:
    """The server's processes by role: the engine core, the front ends (the root itself when it
    serves HTTP; with --api-server-count > 1 a supervisor without HTTP)."""
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            queue.extend(int(c) for c in (task / "children").read_text().split())
    roles: dict[str, list[int]] = {"core": [], "frontend": [], "supervisor": []}
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "pagedserve.engine.core_process" in cmdline:
            roles["core"].append(pid)
        elif "pagedserve.server.frontend_process" in cmdline:
            roles["frontend"].append(pid)
    roles["supervisor" if roles["frontend"] else "frontend"].append(root)
    return roles


class Client:
    """One closed-loop user: a request, its whole SSE stream, the next request."""

    def __init__(self, port: int, body: bytes) -> None:
        self.port = port
        self.request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.tokens = self.events = self.requests = 0

    async def run(self, requests: int, counting: bool) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            for _ in range(requests):
                writer.write(self.request)
                tokens, events = await self._read_response(reader)
                if counting:
                    self.tokens += tokens
                    self.events += events
                    self.requests += 1
        finally:
            writer.close()

    async def _read_response(self, reader: asyncio.StreamReader) -> tuple[int, int]:
        status = await reader.readuntil(b"\r\n")
        if b" 200 " not in status:
            raise RuntimeError(f"server answered {status!r}")
        while (await reader.readuntil(b"\r\n")) != b"\r\n":
            pass  # headers; the body is chunked
        buffer, tokens, events = b"", 0, 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return tokens, events
            buffer += chunk[:-2]
            *complete, buffer = buffer.split(b"\n\n")
            for event in complete:
                if event == b"data: [DONE]":
                    continue
                events += 1
                if b'"usage"' in event:  # the last event: choices empty, the counts
                    usage = json.loads(event[6:]).get("usage") or {}
                    tokens = usage.get("completion_tokens", tokens)


async def drive(port: int, users: int, requests_per_user: int, max_tokens: int,
                roles: dict[str, list[int]]) -> dict:
    body = json.dumps({"prompt": "Tell me a story about a paged KV cache.", "stream": True,
                       "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                       "stream_options": {"include_usage": True}}).encode()
    clients = [Client(port, body) for _ in range(users)]
    await asyncio.gather(*(c.run(1, counting=False) for c in clients))  # warm-up
    pids = [p for ps in roles.values() for p in ps]
    cpu_before = {p: cpu_seconds(p) for p in pids}
    own_before = time.process_time()
    t0 = time.monotonic()
    await asyncio.gather(*(c.run(requests_per_user, counting=True) for c in clients))
    wall = time.monotonic() - t0
    cpu = {p: cpu_seconds(p) - cpu_before[p] for p in pids}
    tokens = sum(c.tokens for c in clients)
    events = sum(c.events for c in clients)
    role_cpu = {role: sum(cpu[p] for p in ps) for role, ps in roles.items()}
    return {
        "users": users, "seconds": round(wall, 2), "tokens": tokens, "events": events,
        "requests": sum(c.requests for c in clients),
        "tok_s": round(tokens / wall, 1),
        "frontend_processes": len(roles["frontend"]),
        "cpu_s": {role: round(v, 2) for role, v in role_cpu.items()},
        "frontend_us_per_token": round(role_cpu["frontend"] / tokens * 1e6, 1),
        "frontend_us_per_token_each": [round(cpu[p] / tokens * 1e6 * len(roles["frontend"]), 1)
                                       for p in roles["frontend"]],
        "core_us_per_token": round(role_cpu["core"] / tokens * 1e6, 1),
        "loadgen_us_per_token": round((time.process_time() - own_before) / tokens * 1e6, 1),
        "tokens_per_event": round(tokens / max(events, 1), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument("--requests-per-user", type=int, default=2,
                        help="measured requests per user, after one warm-up request each")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--api-server-count", type=int, default=1)
    parser.add_argument("--server-args", default="", help="more `pagedserve serve` flags")
    parser.add_argument("--model-dir", help="reuse a tiny model made earlier (default: new)")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    args = parser.parse_args()

    from pagedserve.bench.server_process import ServerProcess

    model = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp()) / "tiny"
    if not (model / "config.json").exists():
        make_tiny_model(model)
    # one engine thread: the model is too small to share, and OpenMP threads that wait at
    # barriers for a descheduled partner would charge the core, not the front end, anyway
    server_args = ["--max-num-seqs", str(max(args.users, 1)), "--max-model-len", "4096",
                   "--kv-cache-memory", "256MiB", "--threads", "1", "--dtype", "float32",
                   *shlex.split(args.server_args)]
    if args.api_server_count > 1:
        server_args += ["--api-server-count", str(args.api_server_count)]
    with ServerProcess(str(model), server_args) as server:
        roles = server_processes(server.proc.pid)
        result = asyncio.run(drive(server.port, args.users, args.requests_per_user,
                                   args.max_tokens, roles))
    result["server_args"] = " ".join(server_args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
