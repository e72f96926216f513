"""Offline throughput: the engine alone (no HTTP), side by side with transformers' generate.

Both get the same prompts: ``num_prompts`` unique random token sequences of ``input_len`` tokens,
each asked for exactly ``output_len`` tokens (EOS ignored), all submitted at once. Throughput is
output tokens over wall time, prefill included; the ratio to the peer is what to quote, since
absolute numbers drift with the machine's load.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pagedserve.config import EngineConfig
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class OfflineResult:
    label: str
    num_prompts: int
    input_len: int
    output_len: int
    dtype: str
    duration: float  # seconds, wall clock
    output_tokens: int

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.duration

    def to_dict(self) -> dict:
        return {**asdict(self), "output_tok_s": self.output_tok_s}


def make_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int = 0
                 ) -> list[list[int]]:
    """Unique prompts: random ids from the vocabulary's ordinary range (no special tokens)."""
    rng = random.Random(seed)
    low = min(1000, vocab_size // 4)
    return [[rng.randrange(low, vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def run_pagedserve(model: str | Path | None, prompts: list[list[int]], output_len: int,
                   config: EngineConfig, progress: bool = True, label: str = "pagedserve"
                   ) -> OfflineResult:
    from pagedserve.llm import LLM

    llm = LLM(model, engine_config=config)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    engine.add_request(prompts[0][:8], SamplingParams(max_tokens=2))  # warm-up
    while engine.has_unfinished_requests():
        engine.step()
    total = len(prompts) * output_len
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    done = 0
    with _progress(progress, label, total) as (bar, task):
        while engine.has_unfinished_requests():
            n = sum(len(o.delta_token_ids) for o in engine.step())
            done += n
            bar.advance(task, n)
    duration = time.perf_counter() - start
    return OfflineResult(label, len(prompts), len(prompts[0]), output_len, config.dtype,
                         duration, done)


def run_transformers(model_path: Path, prompts: list[list[int]], output_len: int,
                     dtype: str, label: str = "transformers") -> OfflineResult:
    """The peer: one batched ``generate`` call over every prompt (equal lengths, no padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if model_path.is_file():
        model = AutoModelForCausalLM.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype)
    model.eval()
    ids = torch.tensor(prompts)
    with torch.no_grad():
        model.generate(ids[:1, :8], max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=output_len, min_new_tokens=output_len)
        duration = time.perf_counter() - start
    generated = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return OfflineResult(label, len(prompts), len(prompts[0]), output_len, dtype, duration,
                         generated)


class _progress:  # noqa: N801 (a context manager used like a function)
    def __init__(self, enabled: bool, label: str, total: int):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("tokens"), TimeElapsedColumn(), disable=not enabled,
                            transient=True)
        self.label, self.total = label, total

    def __enter__(self):
        self.bar.start()
        return self.bar, self.bar.add_task(self.label, total=self.total)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def add_parser(sub) -> None:
    """`pagedserve bench offline`: registered by pagedserve/cli/bench.py."""
    p = sub.add_parser(
        "offline", help="engine throughput without HTTP, beside transformers' generate",
        description="Submits NUM_PROMPTS random prompts of INPUT_LEN tokens at once, each "
        "generating exactly OUTPUT_LEN tokens, and reports output tokens per second (prefill "
        "included). --peer transformers runs transformers' batched generate on the same prompts "
        "in the same process, for a ratio. Example: pagedserve bench offline --num-prompts 64 "
        "--input-len 80 --output-len 64 --single --peer transformers",
    )
    p.add_argument("model", nargs="?", default=None, help="model (default: the bundled one)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=80)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="matmul dtype (default: %(default)s; float32 is the exact reference)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--single", action="store_true", help="also time one sequence alone")
    p.add_argument("--peer", choices=["transformers"], default=None,
                   help="run a peer on the same prompts, in the same process")
    p.add_argument("--peer-dtype", default=None, help="the peer's dtype (default: --dtype)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.set_defaults(func=cmd_offline)


def cmd_offline(args) -> int:
    import json

    from rich.table import Table

    from pagedserve.bench.machine import cpu_model
    from pagedserve.bench.progress import output_console
    from pagedserve.registry import resolve

    console = output_console()
    resolved = resolve(args.model)
    config = EngineConfig(dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          kv_cache_memory=1 << 30)
    from pagedserve.loader import read_model_info

    metadata = read_model_info(resolved.path).metadata
    vocab = next((int(v) for k, v in metadata.items() if k.endswith("vocab_size")), 32000)
    prompts = make_prompts(args.num_prompts, args.input_len, vocab)
    results = [run_pagedserve(resolved.path, prompts, args.output_len, config,
                              label=f"pagedserve {args.num_prompts} seqs")]
    if args.single:
        results.append(run_pagedserve(resolved.path, prompts[:1], args.output_len, config,
                                      label="pagedserve 1 seq"))
    if args.peer == "transformers":
        results.append(run_transformers(resolved.path, prompts, args.output_len,
                                        args.peer_dtype or args.dtype,
                                        label=f"transformers generate, batch {len(prompts)}"))
    table = Table(title=f"offline throughput, {args.input_len} in / {args.output_len} out, "
                  f"on {cpu_model()}")
    for col in ("run", "dtype", "seqs", "seconds", "output tok/s", "vs first"):
        table.add_column(col, justify="right" if col != "run" else "left")
    base = results[0].output_tok_s
    for r in results:
        table.add_row(r.label, r.dtype, str(r.num_prompts), f"{r.duration:.2f}",
                      f"{r.output_tok_s:.1f}", f"{r.output_tok_s / base:.2f}x")
    console.print(table)
    if args.out:
        args.out.write_text(json.dumps([r.to_dict() for r in results], indent=2))
        console.print(f"results: {args.out}")
    return 0
