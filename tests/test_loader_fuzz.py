"""Fuzzing the GGUF loader: hundreds of mutated files, each a good load or one ModelLoadError.

The base is the bundled SmolLM2's metadata and vocabulary over a small model
(tests/gguf_image.py), so that a good load takes milliseconds. The mutations are seeded and
fixed: integer values made 0, huge or negative-as-unsigned; values of another type; arrays
nested deep or claiming huge lengths; strings running past the end; counts that lie; tensor
dimensions, types, offsets and alignments that make no sense; keys left out; cuts at random
offsets; random bytes flipped in the header.

A child process loads every case (`read_model_info`, then `load_model`) under an address-space
limit (RLIMIT_AS: what it holds after its imports plus FUZZ_MEMORY_HEADROOM) and reports each
outcome, its time and the process's peak RSS as JSON lines. Anything but a load or a one-line
ModelLoadError, a case slower than CASE_SECONDS, or a child that dies fails the test.

    python tests/test_loader_fuzz.py CASE_DIR     # the child, on files the test wrote
"""

from __future__ import annotations

import json
import os
import random
import resource
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from gguf_image import (
    ARRAY,
    BOOL,
    FLOAT32,
    FLOAT64,
    INT32,
    INTEGERS,
    STRING,
    UINT8,
    UINT32,
    UINT64,
    GGUFImage,
    TensorInfo,
    Value,
    encode_string,
    encode_value,
    nested_array,
    shrink,
)

SEED = 27
FUZZ_MEMORY_HEADROOM = 1536 << 20  # bytes the child may map beyond its imports
CASE_SECONDS = 5.0  # a good load takes ~10 ms; an error ~1 ms (a loaded CI machine: 100x)
TOTAL_SECONDS = 120

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------
# The mutations


_INTEGER_RANGES = {0: (0, 255), 1: (-128, 127), 2: (0, 65535), 3: (-32768, 32767),
                   4: (0, 2**32 - 1), 5: (-(2**31), 2**31 - 1), 10: (0, 2**64 - 1),
                   11: (-(2**63), 2**63 - 1)}  # value type -> (min, max)


def _int_edits(image: GGUFImage, rng: random.Random):
    """Each integer key set to 0, 1, its type's extremes (-1 as unsigned is the maximum), its
    middle and a random value."""
    for key, value in image.fields.items():
        if value.type not in INTEGERS:
            continue
        lo, hi = _INTEGER_RANGES[value.type]
        for n in sorted({0, 1, -1 if lo else hi, lo, hi, (hi + 1) // 2, rng.randint(lo, hi)}):
            yield f"int {key}={n}", _with(image, key, Value(value.type, n))


def _model_edits(image: GGUFImage):
    """Values that pass a type check but not the model's arithmetic."""
    arch = "llama"
    for suffix, values in {
        "attention.head_count": [3, 5, 8, 64, 65],
        "attention.head_count_kv": [3, 4, 8],
        "embedding_length": [63, 65, 128, 32],
        "feed_forward_length": [127, 256],
        "attention.key_length": [15, 16, 32, 0],
        "attention.value_length": [8, 16],
        "rope.dimension_count": [15, 8, 32, 0],
        "vocab_size": [399, 401, 1],
        "context_length": [0, 1, 1 << 26, (1 << 26) + 1],
        "block_count": [1, 3, 0],
    }.items():
        for n in values:
            yield f"model {arch}.{suffix}={n}", _with(image, f"{arch}.{suffix}",
                                                      Value(UINT32, n))
    for key in ("llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
                "llama.rope.scaling.factor"):
        for x in (0.0, -1.0, float("nan"), float("inf"), 1.0, 3e38):
            yield f"float {key}={x}", _with(image, key, Value(FLOAT32, x))
    yield "rope linear", _with(_with(image, "llama.rope.scaling.type", Value(STRING, "linear")),
                               "llama.rope.scaling.factor", Value(FLOAT32, 2.0))
    yield "rope yarn no factor", _with(image, "llama.rope.scaling.type", Value(STRING, "yarn"))
    yield "architecture qwen2", _with(image, "general.architecture", Value(STRING, "qwen2"))
    yield "architecture gemma", _with(image, "general.architecture", Value(STRING, "gemma"))
    yield "architecture newline", _with(image, "general.architecture", Value(STRING, "ll\nama"))


_OTHER_VALUES = [
    Value(UINT32, 7), Value(INT32, -7), Value(FLOAT32, 1.5), Value(FLOAT64, float("nan")),
    Value(BOOL, True), Value(STRING, "forty-two"), Value(STRING, ""),
    Value(ARRAY, [1, 2, 3], UINT32), Value(ARRAY, [], UINT8), Value(ARRAY, ["a", "b"], STRING),
    Value(ARRAY, [Value(ARRAY, [1], UINT8)], ARRAY),
]


def _type_edits(image: GGUFImage, rng: random.Random):
    """Every key given two values of other types."""
    for key, value in image.fields.items():
        others = [v for v in _OTHER_VALUES
                  if (v.type, v.item_type) != (value.type, value.item_type)]
        for other in rng.sample(others, 2):
            yield f"type {key} -> {other.type}/{other.item_type}", _with(image, key, other)


def _array_edits(image: GGUFImage):
    size = len(image.encode())
    for key, value in image.fields.items():
        if value.type != ARRAY:
            continue
        items = encode_value(value)[12:]
        for count in (len(value.value) + 1, size, 1 << 32, (1 << 64) - 1):
            raw = struct.pack("<IQ", value.item_type, count) + items
            yield f"array {key} count={count}", _with(image, key, Value(ARRAY, None, raw=raw))
        yield f"array {key} item type 13", _with(image, key, Value(
            ARRAY, None, raw=struct.pack("<IQ", 13, len(value.value)) + items))
    tokens = image.fields["tokenizer.ggml.tokens"].value
    types = image.fields["tokenizer.ggml.token_type"]
    yield "token_type short", _with(image, "tokenizer.ggml.token_type",
                                    Value(ARRAY, types.value[:-1], types.item_type))
    yield "tokens as ints", _with(image, "tokenizer.ggml.tokens",
                                  Value(ARRAY, list(range(len(tokens))), UINT32))
    yield "tokens empty", _with(image, "tokenizer.ggml.tokens", Value(ARRAY, [], STRING))
    yield "tokens duplicated", _with(image, "tokenizer.ggml.tokens",
                                     Value(ARRAY, ["a"] * len(tokens), STRING))
    yield "merge without space", _with(image, "tokenizer.ggml.merges",
                                       Value(ARRAY, ["ab"], STRING))
    yield "merge of unknown tokens", _with(image, "tokenizer.ggml.merges",
                                           Value(ARRAY, ["\u2603 \u2604"], STRING))
    yield "scores nan", _with(image, "tokenizer.ggml.scores",
                              Value(ARRAY, [float("nan")] * len(tokens), FLOAT32))
    yield "sentencepiece vocabulary", _with(image, "tokenizer.ggml.model", Value(STRING, "llama"))
    yield "unknown vocabulary", _with(image, "tokenizer.ggml.model", Value(STRING, "bert"))
    yield "token id huge", _with(image, "tokenizer.ggml.eos_token_id", Value(UINT64, 1 << 63))
    for depth in (2, 4, 5, 64, 200_000):
        yield f"nested {depth}", _with(image, "general.tags",
                                       Value(ARRAY, None, raw=nested_array(depth)))
    yield "nested huge inner count", _with(image, "general.tags", Value(
        ARRAY, None, raw=struct.pack("<IQIQ", ARRAY, 1, UINT8, 1 << 62)))


def _string_edits(image: GGUFImage):
    size = len(image.encode())
    for key in ("general.architecture", "general.name", "tokenizer.chat_template"):
        text = image.fields[key].value.encode()
        for n in (len(text) + 1, size, (1 << 64) - 1):
            yield f"string {key} length={n}", _with(
                image, key, Value(STRING, None, raw=struct.pack("<Q", n) + text))
        yield f"string {key} not utf-8", _with(image, key,
                                               Value(STRING, None, raw=encode_string(b"\xff\xfe")))
    header = image.header()
    for name in ("general.name", "tokenizer.ggml.tokens", "blk.0.attn_q.weight",
                 "output_norm.weight"):
        at = header.find(encode_string(name))
        for n in (len(name) + 3, size, (1 << 64) - 1):
            yield f"name {name} length={n}", _patched(image, at, struct.pack("<Q", n))
    for key in ("llama.block_count", "general.alignment"):
        yield f"unknown type {key}", _with(image, key, Value(13, None, raw=b"\0" * 8))


def _tensor_edits(image: GGUFImage, rng: random.Random):
    picks = rng.sample(range(len(image.tensors)), 6)
    for i in picks:
        t = image.tensors[i]
        tried = [t.dims]
        for dims in ([0, *t.dims[1:]], [*t.dims[:-1], 0], [1 << 40, *t.dims[1:]],
                     [(1 << 64) - 1], [1 << 32, 1 << 32], [*t.dims, 1, 1, 1], [], [33]):
            if dims not in tried:
                tried.append(dims)
                yield f"dims {t.name}={dims}", _tensor(image, i, dims=dims)
        for type_id in (1, 2, 4, 5, 12, 14, 30, 39, 99, (1 << 32) - 1):
            yield f"type {t.name}={type_id}", _tensor(image, i, type_id=type_id)
        for offset in (t.offset + 1, len(image.data), (1 << 64) - 32, 1 << 63, 0):
            yield f"offset {t.name}={offset}", _tensor(image, i, offset=offset)
    first = image.tensors[0]
    yield "duplicate tensor", _tensors(image, [*image.tensors, first])
    yield "no tensors", _tensors(image, [])
    yield "tensor named badly", _tensor(image, 3, name="blk.x")
    yield "tensor of layer 99", _tensor(image, 3, name="blk.99.attn_q.weight")
    yield "rope_freqs of no use", _tensors(image, [*image.tensors, TensorInfo(
        "rope_freqs.weight", [8], 0, 0)])
    yield "rope_freqs wrong length", _tensors(image, [*image.tensors, TensorInfo(
        "rope_freqs.weight", [3], 0, 0)])


def _header_edits(image: GGUFImage):
    for version in (0, 1, 2, 4, 1 << 24):
        yield f"version {version}", _attr(image, version=version)
    n_kv, n_tensors = len(image.fields), len(image.tensors)
    for count in (0, n_kv - 1, n_kv + 1, 1 << 32, (1 << 64) - 1):
        yield f"key count {count}", _attr(image, key_count=count)
    for count in (0, n_tensors - 1, n_tensors + 1, 1 << 40, (1 << 64) - 1):
        yield f"tensor count {count}", _attr(image, tensor_count=count)
    for alignment in (Value(UINT32, 0), Value(UINT32, 1), Value(UINT32, 3), Value(UINT32, 64),
                      Value(UINT32, 1 << 31), Value(UINT32, (1 << 32) - 1),
                      Value(INT32, -32), Value(STRING, "32"), Value(FLOAT32, 32.0),
                      Value(BOOL, True), Value(ARRAY, [32], UINT32)):
        yield f"alignment {alignment.type}:{alignment.value}", _with(
            image, "general.alignment", alignment)
    duplicate = image.copy()
    last = list(duplicate.fields)[-1]
    extra = encode_string("general.name") + struct.pack("<I", STRING) + encode_string("again")
    duplicate.fields[last] = Value(duplicate.fields[last].type, None,
                                   raw=encode_value(duplicate.fields[last]) + extra)
    duplicate.key_count = len(duplicate.fields) + 1
    yield "duplicate key", duplicate.encode()
    for key in ("general.architecture", "llama.block_count", "llama.embedding_length",
                "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.feed_forward_length", "llama.context_length", "llama.vocab_size",
                "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type"):
        without = image.copy()
        del without.fields[key]
        yield f"without {key}", without.encode()


def _byte_edits(image: GGUFImage, rng: random.Random):
    good = image.encode()
    header = len(image.header())
    for cut in sorted(rng.sample(range(4, header + 64), 60)):
        yield f"cut at {cut}", good[:cut]
    for cut in sorted(rng.sample(range(header + 64, len(good)), 6)):
        yield f"cut in the data at {cut}", good[:cut]
    for n in range(70):
        raw = bytearray(good)
        spots = [rng.randrange(4, header) for _ in range(rng.randint(1, 4))]
        for at in spots:
            raw[at] = rng.randrange(256)
        yield f"flip {n} at {spots}", bytes(raw)


def mutations(base: GGUFImage, seed: int = SEED):
    """(name, file bytes) for every case; the same list for the same seed."""
    rng = random.Random(seed)
    yield "unchanged", base.encode()
    yield from _int_edits(base, rng)
    yield from _model_edits(base)
    yield from _type_edits(base, rng)
    yield from _array_edits(base)
    yield from _string_edits(base)
    yield from _tensor_edits(base, rng)
    yield from _header_edits(base)
    yield from _byte_edits(base, rng)


def _with(image: GGUFImage, key: str, value: Value) -> GGUFImage:
    out = image.copy()
    out.fields[key] = value
    return out


def _attr(image: GGUFImage, **changes) -> GGUFImage:
    out = image.copy()
    for name, value in changes.items():
        setattr(out, name, value)
    return out


def _tensor(image: GGUFImage, i: int, **changes) -> GGUFImage:
    out = image.copy()
    for name, value in changes.items():
        setattr(out.tensors[i], name, value)
    return out


def _tensors(image: GGUFImage, tensors: list[TensorInfo]) -> GGUFImage:
    out = image.copy()
    out.tensors = [TensorInfo(t.name, list(t.dims), t.type_id, t.offset) for t in tensors]
    return out


def _patched(image: GGUFImage, at: int, raw: bytes) -> bytes:
    good = bytearray(image.encode())
    good[at : at + len(raw)] = raw
    return bytes(good)


# ---------------------------------------------------------------------------------------------
# The test


@pytest.fixture(scope="module")
def base_image(smollm_gguf) -> GGUFImage:
    return shrink(GGUFImage.read(smollm_gguf))


def test_mutations_are_deterministic(base_image):
    first = [(name, len(_bytes(data))) for name, data in mutations(base_image)]
    again = [(name, len(_bytes(data))) for name, data in mutations(base_image)]
    assert first == again and len(first) >= 300
    assert len({name for name, _ in first}) == len(first)


def _bytes(data: bytes | GGUFImage) -> bytes:
    return data.encode() if isinstance(data, GGUFImage) else data


def test_every_mutation_loads_or_fails_with_one_line(base_image, tmp_path):
    names = []
    for i, (name, data) in enumerate(mutations(base_image)):
        (tmp_path / f"case-{i:03d}.gguf").write_bytes(_bytes(data))
        names.append(name)
    (tmp_path / "cases.json").write_text(json.dumps(names))
    env = {**os.environ, "PAGEDSERVE_WEIGHT_CACHE": "0", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    child = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True,
                           text=True, timeout=TOTAL_SECONDS, env=env)
    elapsed = time.monotonic() - started
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    summary = lines[-1] if lines and "summary" in lines[-1] else None
    assert child.returncode == 0 and summary, (
        f"the child died after {len(lines)} cases (status {child.returncode}): "
        f"{child.stderr[-3000:]}")
    results = lines[:-1]
    assert [r["case"] for r in results] == names
    bad = [r for r in results if r["outcome"] not in ("ok", "error")]
    slow = [r for r in results if r["seconds"] > CASE_SECONDS]
    assert not bad, "\n".join(f"{r['case']}: {r['outcome']}: {r['message']}" for r in bad[:20])
    assert not slow, [(r["case"], r["seconds"]) for r in slow]
    outcomes = Counter(r["outcome"] for r in results)
    assert results[0]["outcome"] == "ok", results[0]  # the unchanged base
    assert outcomes["ok"] >= 20 and outcomes["error"] >= 200, outcomes
    memory = summary["summary"]
    print(f"\n{len(results)} cases: {dict(outcomes)}; child peak RSS "
          f"{memory['peak_rss_mib']:.0f} MiB ({memory['rss_before_mib']:.0f} MiB after its "
          f"imports) under an address-space limit of {memory['limit_mib']:.0f} MiB; "
          f"{elapsed:.1f} s in all, slowest case "
          f"{max(r['seconds'] for r in results) * 1000:.0f} ms")


# ---------------------------------------------------------------------------------------------
# The child


def _address_space() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited across exec
    from the forking parent)."""
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _load(path: Path) -> tuple[str, str]:
    """(outcome, message): "ok", "error" (a one-line ModelLoadError), or what went wrong."""
    from pagedserve.loader import ModelLoadError, load_model, read_model_info

    refused = None
    try:
        read_model_info(path)
    except ModelLoadError as exc:
        refused = str(exc)
    try:
        load_model(path)
    except ModelLoadError as exc:
        message = str(exc)
        one_line = message and "\n" not in message and len(message) < 500
        return ("error" if one_line else "not one line"), message
    if refused is not None:  # a load must refuse what the metadata read refused
        return "loaded what read_model_info refused", refused
    return "ok", ""


def _run_cases(folder: Path) -> None:
    import logging

    import torch

    logging.disable(logging.CRITICAL)
    torch.set_num_threads(1)
    _load(folder / "case-000.gguf")  # imports the loaders' modules before the limit is set
    before = _peak_rss()
    limit = _address_space() + FUZZ_MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    names = json.loads((folder / "cases.json").read_text())
    for i, name in enumerate(names):
        started = time.monotonic()
        try:
            outcome, message = _load(folder / f"case-{i:03d}.gguf")
        except Exception as exc:  # what the test looks for: report it and go on
            outcome, message = type(exc).__name__, str(exc)[:300]
        print(json.dumps({"case": name, "outcome": outcome, "message": message,
                          "seconds": round(time.monotonic() - started, 4)}), flush=True)
    print(json.dumps({"summary": {"peak_rss_mib": _peak_rss() / 2**20,
                                  "rss_before_mib": before / 2**20,
                                  "limit_mib": limit / 2**20}}))


if __name__ == "__main__":
    _run_cases(Path(sys.argv[1]))
