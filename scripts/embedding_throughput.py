"""Encoder embedding throughput: a batch of texts in one Embedder.embed call vs one at a time.

Random weights at a real model's shape (no file needed): ``minilm`` is all-MiniLM-L6-v2's
(6 layers, hidden 384), ``bge-base`` bge-base-en-v1.5's (12 layers, 768), ``nomic``
nomic-embed-text v1.5's (12 layers, 768, rotary, SwiGLU). Texts are random token ids of
random lengths between --min-len and --max-len tokens, [CLS] ... [SEP] included.

    PYTHONPATH=. python scripts/embedding_throughput.py --shape minilm --texts 64
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from pagedserve.models.bert import BertEncoder, EncoderConfig, encoder_weight_names
from pagedserve.models.pooling import finish
from pagedserve.worker.embedder import EmbeddingSpec, EncoderModel

SHAPES = {
    "minilm": dict(architecture="bert", vocab_size=30522, hidden_size=384,
                   intermediate_size=1536, num_layers=6, num_heads=12,
                   max_position_embeddings=512),
    "bge-base": dict(architecture="bert", vocab_size=30522, hidden_size=768,
                     intermediate_size=3072, num_layers=12, num_heads=12,
                     max_position_embeddings=512),
    "nomic": dict(architecture="nomic-bert", vocab_size=30528, hidden_size=768,
                  intermediate_size=3072, num_layers=12, num_heads=12,
                  max_position_embeddings=2048),
}


def random_weights(config: EncoderConfig) -> dict[str, torch.Tensor]:
    h, i = config.hidden_size, config.intermediate_size

    def shape(name: str) -> tuple[int, ...]:
        if "word_embeddings" in name:
            return (config.vocab_size, h)
        if "position_embeddings" in name:
            return (config.max_position_embeddings, h)
        if "LayerNorm" in name or name.endswith(".bias"):
            return (i,) if "intermediate" in name else (h,)
        if "intermediate" in name:
            return (i, h)
        return (h, i) if ".output.dense" in name and "attention" not in name else (h, h)

    return {name: torch.randn(shape(name)) * 0.05 for name in encoder_weight_names(config)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="minilm")
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EncoderConfig(**SHAPES[args.shape])
    encoder = BertEncoder(config, random_weights(config), dtype=getattr(torch, args.dtype))
    model = EncoderModel(encoder)
    spec = EmbeddingSpec(config.architecture, config.hidden_size, config.max_position_embeddings,
                         config.max_position_embeddings, "mean", True)
    rng = random.Random(0)
    texts = [[101] + [rng.randrange(1000, config.vocab_size)
                      for _ in range(rng.randint(args.min_len, args.max_len) - 2)] + [102]
             for _ in range(args.texts)]
    tokens = sum(map(len, texts))

    def batched() -> None:
        finish(model.pooled(texts, spec.pooling), normalize=True)

    def one_by_one() -> None:
        for ids in texts:
            finish(model.pooled([ids], spec.pooling), normalize=True)

    print(f"{args.shape} ({config.num_layers} layers, hidden {config.hidden_size}, "
          f"{args.dtype}, {torch.get_num_threads()} threads): {args.texts} texts, {tokens} "
          f"tokens ({args.min_len}-{args.max_len} each)")
    batched()  # warm-up
    results = {}
    for name, run in (("one call", batched), ("one text per call", one_by_one)):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        results[name] = statistics.median(times)
        print(f"  {name:18s} {results[name] * 1000:8.1f} ms   {args.texts / results[name]:7.1f} "
              f"texts/s   {tokens / results[name]:8.0f} tokens/s")
    print(f"  batching speed-up: {results['one text per call'] / results['one call']:.2f}x")


if __name__ == "__main__":
    main()
