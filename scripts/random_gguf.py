"""A GGUF file with a real model's metadata and tokenizer, and random weights of its tensor types.

For timing on machines the real file cannot reach (the lent GPU machine takes 64 MiB, the
bundled model is 93 MB): the metadata-only skeleton is small, and the machine fills it with
random blocks of the same quantization types, so every kernel, tokenizer and chat template runs
as on the real file; only the text is nonsense. Weights are seeded: two fills are equal.

    python scripts/random_gguf.py MODEL.gguf skeleton.gguf --metadata-only   # here: ~2 MB
    python scripts/random_gguf.py skeleton.gguf random.gguf                   # there
"""

from __future__ import annotations

import argparse

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

TENSORS_KEY = "pagedserve.random.tensors"  # "name|type|dim0,dim1" for each tensor of the source
SKIPPED = ("GGUF.", "general.architecture")  # the writer adds these itself


def copy_metadata(reader: GGUFReader, writer: GGUFWriter) -> None:
    for key, field in reader.fields.items():
        if key.startswith(SKIPPED) or key == TENSORS_KEY:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def tensor_list(reader: GGUFReader) -> list[tuple[str, GGMLQuantizationType, list[int]]]:
    if reader.tensors:
        return [(t.name, GGMLQuantizationType(t.tensor_type), [int(d) for d in t.shape])
                for t in reader.tensors]
    listed = reader.fields[TENSORS_KEY].contents()
    out = []
    for entry in listed:
        name, qtype, dims = entry.split("|")
        out.append((name, GGMLQuantizationType[qtype], [int(d) for d in dims.split(",")]))
    return out


def random_blocks(qtype: GGMLQuantizationType, dims: list[int], rng: np.random.Generator
                  ) -> np.ndarray:
    """Raw bytes of a tensor whose dequantized values are spread like trained weights (|w| about
    0.02), or float values for unquantized tensors (norm weights: ones)."""
    n = int(np.prod(dims))
    if qtype == GGMLQuantizationType.F32:
        return np.ones(n, dtype=np.float32) if len(dims) == 1 else (
            rng.standard_normal(n, dtype=np.float32) * 0.02)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    nblocks = n // block
    raw = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
    if qtype == GGMLQuantizationType.Q4_1:  # fp16 scale, fp16 minimum, 16 bytes of nibbles
        raw[:, 0:2] = np.frombuffer(np.float16(0.04 / 15).tobytes(), np.uint8)
        raw[:, 2:4] = np.frombuffer(np.float16(-0.02).tobytes(), np.uint8)
    elif qtype == GGMLQuantizationType.Q4_0:  # fp16 scale, nibbles around 8
        raw[:, 0:2] = np.frombuffer(np.float16(0.02 / 8).tobytes(), np.uint8)
    elif qtype == GGMLQuantizationType.Q8_0:  # fp16 scale, 32 int8
        raw[:, 0:2] = np.frombuffer(np.float16(0.02 / 127).tobytes(), np.uint8)
    else:
        raise SystemExit(f"random blocks of {qtype.name} are not supported")
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a GGUF file, or a skeleton written by --metadata-only")
    parser.add_argument("out")
    parser.add_argument("--metadata-only", action="store_true",
                        help="write the metadata and the list of tensors, no weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    reader = GGUFReader(args.source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(args.out, arch)
    copy_metadata(reader, writer)
    tensors = tensor_list(reader)
    if args.metadata_only:
        writer.add_array(TENSORS_KEY, [f"{name}|{qtype.name}|{','.join(map(str, dims))}"
                                       for name, qtype, dims in tensors])
    else:
        rng = np.random.default_rng(args.seed)
        for name, qtype, dims in tensors:
            data = random_blocks(qtype, dims, rng)
            if qtype == GGMLQuantizationType.F32:
                writer.add_tensor(name, data.reshape(list(reversed(dims))))
            else:
                block, nbytes = GGML_QUANT_SIZES[qtype]  # rows of bytes, as the writer wants
                rows = list(reversed(dims))[:-1] + [dims[0] // block * nbytes]
                writer.add_tensor(name, data.reshape(rows), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
