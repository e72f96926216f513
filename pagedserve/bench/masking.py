"""What constrained decoding costs per engine step: filling and applying the token bitmask.

``python -m pagedserve.bench.masking`` follows a JSON answer token by token with 1 and 32
constrained requests in the batch, on the bundled model's vocabulary (49,152 tokens) and on a
128k one (the same byte-level BPE widened with merges of its own tokens, as wide as Llama 3's),
and times each step's two parts on the CPU:

    fill   llguidance computes the allowed tokens of every constrained row (host)
    apply  the (C, V) logits rows get -inf where a token is not allowed

No model runs: the logits are random, the tokens are those of a valid answer, so each step
sees the grammar states a real answer goes through (object keys, strings, numbers, enums).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from types import SimpleNamespace

import torch

from pagedserve.structured import Constraint
from pagedserve.structured.bitmask import GrammarBatch, _apply_on_host
from pagedserve.structured.compiler import GrammarCompiler
from pagedserve.structured.state import GrammarState

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "score", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "role": "admin", "score": 0.93,
                     "tags": ["math", "engines", "poetry"],
                     "address": {"street": "12 St James's Square", "city": "London",
                                 "zip": "10001"}}, indent=2)


def widened(tokenizer, vocab_size: int, seed: int = 0):
    """The tokenizer with merges of pairs of its own tokens added up to ``vocab_size``."""
    from tokenizers import Tokenizer as BackendTokenizer

    from pagedserve.tokenizer import Tokenizer

    data = json.loads(tokenizer.backend.to_str())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    pieces = [t for t in vocab if not t.startswith("<")]
    rng = random.Random(seed)
    while len(vocab) < vocab_size:
        a, b = rng.choice(pieces), rng.choice(pieces)
        if a + b not in vocab and len(a + b) <= 16:
            vocab[a + b] = len(vocab)
            merges.append([a, b] if merges and isinstance(merges[0], list) else f"{a} {b}")
    return Tokenizer(BackendTokenizer.from_str(json.dumps(data)),
                     eos_token_ids=tokenizer.eos_token_ids)


def measure(tokenizer, batch: int) -> dict[str, float]:
    """Per-step milliseconds (mean, p50, p99) of fill and apply for ``batch`` rows."""
    vocab = tokenizer.vocab_size
    compiler = GrammarCompiler(tokenizer, vocab)
    constraint = Constraint.json_schema(SCHEMA, "bench")
    start = time.perf_counter()
    compiler.compile(constraint).result()
    first_compile = time.perf_counter() - start  # includes preparing the vocabulary
    states = []
    for _ in range(batch):
        state = GrammarState(constraint, compiler.compile(constraint), compiler.vocab_size)
        state.start()
        states.append(state)
    grammars = GrammarBatch.of([SimpleNamespace(grammar=s) for s in states])
    logits = torch.randn(batch, vocab)
    fill, apply = [], []
    tokens = tokenizer.encode(ANSWER, add_special_tokens=False)
    for token in tokens:
        rows = logits.clone()
        t0 = time.perf_counter()
        words = grammars.fill()
        t1 = time.perf_counter()
        _apply_on_host(rows, words, grammars.rows)
        t2 = time.perf_counter()
        fill.append((t1 - t0) * 1e3)
        apply.append((t2 - t1) * 1e3)
        assert rows[0, token] > float("-inf"), "the answer's token was masked"
        for s in states:
            assert s.matcher.consume_token(token)
    compiler.close()
    total = [f + a for f, a in zip(fill, apply, strict=True)]
    out = {"vocab": vocab, "batch": batch, "steps": len(tokens),
           "first_compile_ms": first_compile * 1e3}
    for name, values in (("fill", fill), ("apply", apply), ("total", total)):
        ordered = sorted(values)
        out[f"{name}_mean_ms"] = statistics.mean(values)
        out[f"{name}_p50_ms"] = ordered[len(ordered) // 2]
        out[f"{name}_p99_ms"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return out


def main() -> None:
    from pagedserve.hub.bundled import bundled_model_path
    from pagedserve.loader.gguf import GGUFFile, tokenizer_from_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bundled = tokenizer_from_gguf(GGUFFile(bundled_model_path()))
    print("| vocabulary | constrained rows | fill ms (mean / p99) | apply ms (mean / p99) | "
          "total ms per step (mean / p50) | first compile ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for tokenizer in (bundled, widened(bundled, 128_256)):
        for batch in (int(b) for b in args.batches.split(",")):
            r = measure(tokenizer, batch)
            print(f"| {r['vocab']:,} | {batch} | {r['fill_mean_ms']:.2f} / "
                  f"{r['fill_p99_ms']:.2f} | {r['apply_mean_ms']:.2f} / "
                  f"{r['apply_p99_ms']:.2f} | {r['total_mean_ms']:.2f} / "
                  f"{r['total_p50_ms']:.2f} | {r['first_compile_ms']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
