"""scripts/random_gguf.py: a real model's metadata, tokenizer and tensor types, random weights.

What the timing runs on other machines rely on: the skeleton is small, the filled file has the
source's tensors (names, types, shapes) and metadata, loads like the source, and two fills are
equal."""

import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGUFReader

from pagedserve.llm import LLM
from pagedserve.sampling_params import SamplingParams

SCRIPT = Path(__file__).parent.parent / "scripts" / "random_gguf.py"


def _run(*args) -> None:
    subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=True)


def _tensors(path: Path) -> list[tuple[str, int, list[int]]]:
    return [(t.name, int(t.tensor_type), [int(d) for d in t.shape])
            for t in GGUFReader(path).tensors]


@pytest.fixture(scope="module")
def random_copy(smollm_gguf, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("random-gguf")
    _run(smollm_gguf, out / "skeleton.gguf", "--metadata-only")
    _run(out / "skeleton.gguf", out / "random.gguf")
    return out / "skeleton.gguf", out / "random.gguf"


def test_skeleton_holds_metadata_and_no_weights(smollm_gguf, random_copy):
    skeleton, _ = random_copy
    assert skeleton.stat().st_size < 4 << 20
    reader = GGUFReader(skeleton)
    assert not reader.tensors
    source = GGUFReader(smollm_gguf)
    for key in ("tokenizer.ggml.tokens", "tokenizer.chat_template", "llama.block_count"):
        assert reader.fields[key].contents() == source.fields[key].contents()


def test_fill_has_the_source_tensors_and_loads(smollm_gguf, random_copy):
    _, filled = random_copy
    assert _tensors(filled) == _tensors(smollm_gguf)
    llm = LLM(str(filled), dtype="float32")
    out = llm.generate(["Hello there, how are"],
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert out[0].prompt_token_ids == [19556, 665, 28, 638, 359]  # SmolLM2's own tokenizer
    assert len(out[0].token_ids) == 4


def test_two_fills_are_equal(random_copy, tmp_path):
    skeleton, filled = random_copy
    _run(skeleton, tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == filled.read_bytes()


def test_unsupported_types_are_refused(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "q6.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_array("pagedserve.random.tensors", ["w|Q6_K|256,4"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = subprocess.run([sys.executable, str(SCRIPT), str(path), str(tmp_path / "o.gguf")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "Q6_K" in result.stderr
