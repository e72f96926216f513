"""`pagedserve bench offline`: the command line of the offline benchmark (offline.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pagedserve.engine_args import add_engine_args, engine_config_from_args

BENCH_ENGINE_FLAGS = ("dtype", "kv_cache_dtype", "max_num_seqs", "max_num_batched_tokens",
                      "kv_cache_memory", "gpu_memory_utilization", "async_scheduling",
                      "enforce_eager", "tensor_parallel_size", "num_threads")

DESCRIPTION = """\
Submits NUM_PROMPTS random prompts of INPUT_LEN tokens at once, each generating exactly
OUTPUT_LEN tokens, and reports output tokens per second (prefill included) and the time of a
decode step with the whole batch. --batch-sizes runs several batches on one engine. MODEL may be
a random-weight shape (dummy:llama-3.1-8b, dummy:llama-3.2-1b, dummy:llama-3.2-3b,
dummy:qwen2.5-7b, dummy:qwen2.5-0.5b), made directly on --device. --peer transformers runs
transformers' batched generate on the same prompts in the same process (for a dummy shape, on
the very same weight tensors), for a ratio.

examples:
  pagedserve bench offline --num-prompts 64 --input-len 80 --output-len 64 --single
  pagedserve bench offline dummy:llama-3.1-8b --device cuda --batch-sizes 1,128,256 \\
      --input-len 128 --output-len 128 --peer transformers --peer-batch-size 128
"""


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,128,256: {text!r}")
    return sizes


def add_parser(sub) -> None:
    """Registered by pagedserve/cli/bench.py."""
    p = sub.add_parser("offline", help="engine throughput without HTTP, beside transformers' "
                       "generate", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="model name, path or dummy:SHAPE (default: the bundled one)")
    add_engine_args(p, ("device",), defaults={"device": "cpu"})
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=80)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--batch-sizes", type=_sizes, default=None, metavar="N,N,...",
                   help="batches to run in turn on one engine (default: NUM_PROMPTS, and 1 "
                   "with --single)")
    p.add_argument("--single", action="store_true", help="also time one sequence alone")
    add_engine_args(p, BENCH_ENGINE_FLAGS, defaults={
        "max_num_seqs": 256, "max_num_batched_tokens": 2048, "gpu_memory_utilization": 0.9,
    }, default_help={
        "max_num_seqs": "256, and at least the largest batch",
        "kv_cache_memory": "1GiB on CPU; on CUDA, what --gpu-memory-utilization leaves"})
    p.add_argument("--peer", choices=["transformers"], default=None,
                   help="run a peer on the same prompts, in the same process")
    p.add_argument("--peer-dtype", default=None, help="the peer's dtype (default: --dtype)")
    p.add_argument("--peer-batch-size", type=int, default=None,
                   help="the peer's batch (default: the first batch size)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.set_defaults(func=cmd_offline)


def engine_config(args) -> object:
    """The engine flags, with a batch of at least the largest batch size and, on CPU, 1GiB of
    KV cache unless --kv-cache-memory."""
    cpu_kv = None if args.device.startswith("cuda") else 1 << 30
    return engine_config_from_args(args, max_num_seqs=max(args.max_num_seqs, *batch_sizes(args)),
                                   kv_cache_memory=args.kv_cache_memory or cpu_kv)


def batch_sizes(args) -> list[int]:
    if args.batch_sizes:
        return args.batch_sizes
    return [args.num_prompts] + ([1] if args.single else [])


def cmd_offline(args) -> int:
    from pagedserve.bench.progress import output_console

    results = run_offline(args)
    console = output_console()  # full width when piped: the table keeps its numbers
    console.print(results_table(results, args))
    if args.out:
        args.out.write_text(json.dumps([r.to_dict() for r in results], indent=2))
        console.print(f"results: {args.out}")
    return 0


def run_offline(args) -> list:
    """Every batch on one engine, then the peer (after the engine's memory is released)."""
    import gc

    from pagedserve.bench import offline
    from pagedserve.engine import Engine
    from pagedserve.loader import load_model
    from pagedserve.loader.shapes import is_dummy_name

    config = engine_config(args)
    sizes = batch_sizes(args)
    peer_size = args.peer_batch_size or sizes[0]
    loaded = path = None
    if config.tensor_parallel_size > 1 and args.peer is not None:
        raise SystemExit("--peer runs on one rank's weights: not with --tensor-parallel-size")
    if is_dummy_name(args.model) and config.tensor_parallel_size > 1:
        from pagedserve.loader.shapes import shape_for

        path, vocab = args.model, shape_for(args.model).vocab_size  # each rank makes its shard
    elif is_dummy_name(args.model):
        from pagedserve.worker.execution_plan import resolve_config_dtype

        loaded = load_model(args.model, dtype=resolve_config_dtype(config),
                            device=config.device)
        vocab = loaded.config.vocab_size
    else:
        from pagedserve.hub.registry import resolve
        from pagedserve.loader import read_model_info

        path = resolve(args.model).path
        metadata = read_model_info(path).metadata
        vocab = next((int(v) for k, v in metadata.items() if k.endswith("vocab_size")), 32000)
    # without a peer, the engine may free the unfused weights as it fuses them
    engine = Engine.from_model(loaded if loaded is not None else path, config,
                               model_name=args.model, consume_weights=args.peer is None)
    offline.warm_up(engine, make(1, args, vocab, seed=10**6)[0])
    results = []
    for n in sizes:
        label = f"pagedserve {n} seq" + ("s" if n > 1 else "")
        results.append(offline.run_batch(engine, make(n, args, vocab, seed=n), args.output_len,
                                         label=label))
    engine.core.close()  # tensor parallel: its workers stop
    del engine
    gc.collect()
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    if args.peer == "transformers":
        from pagedserve.bench import offline_peer
        from pagedserve.worker.execution_plan import resolve_config_dtype

        ours = resolve_config_dtype(config)
        dtype = args.peer_dtype or ours
        prompts = make(peer_size, args, vocab, seed=peer_size)
        label = f"transformers generate, batch {peer_size}"
        if loaded is not None:
            if dtype != ours:
                raise SystemExit("--peer-dtype must equal --dtype for a dummy shape: the peer "
                                 "runs on the engine's own weight tensors")
            model = offline_peer.transformers_on(loaded.config, loaded.weights)
            results.append(offline_peer.run_generate(model, prompts, args.output_len, dtype,
                                                     label))
        else:
            results.append(offline_peer.run_transformers(path, prompts, args.output_len, dtype,
                                                         label, device=args.device))
    return results


def make(n: int, args, vocab: int, seed: int) -> list[list[int]]:
    from pagedserve.bench.offline import make_prompts

    return make_prompts(n, args.input_len, vocab, seed=seed)


def results_table(results: list, args):
    from rich.table import Table

    table = Table(title=f"offline throughput, {args.input_len} in / {args.output_len} out, "
                  f"on {device_name(args.device)}")
    parallel = any(r.tensor_parallel_size > 1 for r in results)
    columns = ["run", "dtype", "seqs", "seconds", "output tok/s", "decode step", "vs first"]
    if parallel:
        columns += ["weights per rank", "all-reduce share"]
    for col in columns:
        table.add_column(col, justify="right" if col != "run" else "left")
    base = results[0].output_tok_s
    for r in results:
        step = f"{r.decode_step_ms:.1f} ms" if r.decode_step_ms is not None else ""
        row = [r.label, r.dtype, str(r.num_prompts), f"{r.duration:.2f}",
               f"{r.output_tok_s:.1f}", step, f"{r.output_tok_s / base:.2f}x"]
        if parallel:
            row += [" / ".join(f"{b / 2**20:.1f} MiB" for b in r.weight_bytes_per_rank or []),
                    f"{r.collective_share:.0%}" if r.collective_share is not None else ""]
        table.add_row(*row)
    return table


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    from pagedserve.bench.machine import cpu_model

    return cpu_model()
