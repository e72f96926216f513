"""Shared fixtures: the bundled GGUF and tiny random Hugging Face models saved on disk."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _throwaway_home() -> None:
    """pagedserve's own store and caches (the dequantized-weight cache: ~1 GiB a run) go to a
    home of the run's, never the user's ~/.pagedserve, deleted when the process that made it
    exits. Made once: the xdist workers inherit it from the controller's environment (a run
    that left its home behind filled CI's disk after some hundreds of runs)."""
    if "PAGEDSERVE_HOME" in os.environ:
        return
    home = tempfile.mkdtemp(prefix="pagedserve-test-home-")
    os.environ["PAGEDSERVE_HOME"] = home
    atexit.register(shutil.rmtree, home, ignore_errors=True)


_throwaway_home()


ALL_CPUS = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (make test), each worker computes on its own share of the CPUs: two
    workers' OpenMP teams on the same 2 cores spin at each other's barriers (a 12 s test took
    100 s). The worker's engines and servers read the share from the affinity (cpu_budget), torch
    from OMP_NUM_THREADS, set before anything imports it."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(ALL_CPUS)
    index, count = int(worker.removeprefix("gw")), int(count)
    if count > len(cpus):
        return  # more workers than CPUs: sharing is unavoidable
    share = cpus[index::count]
    os.sched_setaffinity(0, share)
    os.environ["OMP_NUM_THREADS"] = str(len(share))


_pin_xdist_worker()


@pytest.fixture
def every_cpu():
    """The whole machine's CPUs for one test (and the processes it starts), where the worker is
    pinned to its share: a test of how the engine reads its CPU budget."""
    if not ALL_CPUS:
        yield
        return
    share, threads = os.sched_getaffinity(0), os.environ.get("OMP_NUM_THREADS")
    os.sched_setaffinity(0, ALL_CPUS)
    os.environ.pop("OMP_NUM_THREADS", None)
    try:
        yield
    finally:
        os.sched_setaffinity(0, share)
        if threads is not None:
            os.environ["OMP_NUM_THREADS"] = threads


# The CPU kernels the suite computes with: built once per version of their sources, by the
# package build (setup.py), into a cache that outlives the run (the engine looks nowhere else
# while PAGEDSERVE_KERNEL_DIR is set). A tree installed with `pip install -e .` already holds
# that build: it is copied, not compiled again.
os.environ.setdefault("PAGEDSERVE_KERNEL_DIR",
                      str(Path.home() / ".cache" / "pagedserve" / "test-kernels"))


def build_cpu_kernels(directory: Path) -> str:
    """The package build's libraries for this machine in `directory`: copied from the source
    tree where `pip install -e .` left current ones, else compiled by `setup.py build_ext`
    (~20 s on 2 cores). Returns which of the two it did (or "cached")."""
    import subprocess
    import sys

    from pagedserve.ops.cpu_kernels import build, isa

    names = [build.library_name(t) for t in [build.PROBE, *(v.name for v in isa.variants_for())]]
    if all((directory / name).exists() for name in names):
        return "cached"
    directory.mkdir(parents=True, exist_ok=True)
    if all(_built_from_these_sources(build.PACKAGE_DIR / name) for name in names):
        _copy_libraries(build.PACKAGE_DIR, directory, names)
        return "copied from the source tree"
    with tempfile.TemporaryDirectory(prefix="pagedserve-kernels-") as scratch:
        root = Path(__file__).resolve().parent.parent
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib",
                        scratch, "--build-temp", str(Path(scratch) / "tmp")], cwd=root,
                       check=True, capture_output=True)
        _copy_libraries(Path(scratch) / "pagedserve" / "ops" / "cpu_kernels", directory, names)
    return "compiled by setup.py"


def _copy_libraries(source: Path, directory: Path, names: list[str]) -> None:
    for name in names:
        if (source / name).exists():  # a variant the compiler could not build is left out
            shutil.copy(source / name, directory / f"{name}.tmp")
            os.replace(directory / f"{name}.tmp", directory / name)


def _built_from_these_sources(path: Path) -> bool:
    from pagedserve.ops.cpu_kernels import build

    return path.exists() and build.source_hash().encode() in path.read_bytes()


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built() -> str | None:
    """The CPU kernels built before the first test, so that every engine of the suite finds the
    same ones; None where they cannot be (no compiler, another architecture)."""
    from pagedserve.ops.cpu_kernels import build, isa

    if not isa.variants_for() or build.compiler() is None:
        return None
    return build_cpu_kernels(build.cache_dir())


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    from pagedserve.hub.bundled import bundled_model_path

    return bundled_model_path()


def _save_tiny(tmp_path_factory, name: str, config) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama with GQA and llama3 rope scaling, untied embeddings."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    return _save_tiny(tmp_path_factory, "tiny-llama", config)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A random 2-layer Qwen2 (q/k/v biases) with tied embeddings."""
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    return _save_tiny(tmp_path_factory, "tiny-qwen2", config)


# ---------------------------------------------------------------------------------------------
# Tiny models with real tokenizers (added by the loader work)

_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. How can I help you today?",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12, 345 and 6789 appear in text; so do emoji 😀 and 日本語.",
    "The cat sat on the mat. The dog sat on the log. It was a sunny day.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
]
TINY_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama_tokenized_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """`tiny_llama_dir` plus a byte-level BPE tokenizer trained on a few sentences (vocab 300,
    under the model's 512): ids 0-3 are <|im_start|>, <s> (BOS, 1), </s> (2), <|im_end|> (3);
    a ChatML chat template; generation_config eos_token_id [2, 3]. Enough to run a server."""
    import json
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("tiny-llama-tokenized") / "model"
    shutil.copytree(tiny_llama_dir, out)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<s>", "</s>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    assert tokenizer.get_vocab_size() <= 512
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "</s>",
        "add_bos_token": False,
        "chat_template": TINY_CHATML_TEMPLATE,
    }, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 1, "eos_token_id": [2, 3],
    }, indent=2))
    return out


def _llama_cpp_permute(w, n_heads: int):
    """llama.cpp's convert script's q/k row order: per head, halves interleaved."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, pieces."""
    words = ["▁the", "▁hello", "▁world", "▁cat", "▁sat", "▁on", "▁mat", "ing", "▁is", "er"]
    pieces = list("▁abcdefghijklmnopqrstuvwxyzTHW.,!?'")
    for word in words:  # every prefix of a word, so BPE can build it merge by merge
        pieces += [word[:n] for n in range(2, len(word) + 1)]
    pieces += ["he", "ll", "llo", "or", "orld", "at"]
    pieces = list(dict.fromkeys(pieces))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


@pytest.fixture(scope="session")
def tiny_llama_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    """`tiny_llama_dir` written as llama.cpp would: F32 tensors under GGUF names, q/k rows
    permuted, llama3 rope scaling as a `rope_freqs` tensor, a SentencePiece vocabulary."""
    import json
    import math

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    state = load_file(str(tiny_llama_dir / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    # transformers 5 writes rope_parameters; 4 wrote rope_theta and rope_scaling
    rope = config.get("rope_parameters") or {**config["rope_scaling"],
                                             "rope_theta": config["rope_theta"]}
    path = tmp_path_factory.mktemp("tiny-llama-gguf") / "tiny-llama.F32.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("general.file_type", 0)
    writer.add_uint32("llama.block_count", config["num_hidden_layers"])
    writer.add_uint32("llama.context_length", config["max_position_embeddings"])
    writer.add_uint32("llama.embedding_length", config["hidden_size"])
    writer.add_uint32("llama.feed_forward_length", config["intermediate_size"])
    writer.add_uint32("llama.attention.head_count", heads)
    writer.add_uint32("llama.attention.head_count_kv", kv_heads)
    writer.add_float32("llama.rope.freq_base", rope["rope_theta"])
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    writer.add_uint32("llama.rope.dimension_count", config["head_dim"])
    writer.add_uint32("llama.vocab_size", config["vocab_size"])
    tokens, scores, types = _sentencepiece_vocab()
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", scores)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)

    # llama3 rope: per-frequency divisors, as llama.cpp's converter computes them
    dim, base = config["head_dim"], rope["rope_theta"]
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    freqs = []
    for i in range(dim // 2):
        wavelen = 2 * math.pi * base ** (2 * i / dim)
        if wavelen < high_wavelen:
            freqs.append(1.0)
        elif wavelen > low_wavelen:
            freqs.append(rope["factor"])
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelen
                      - rope["low_freq_factor"]) / (rope["high_freq_factor"]
                                                    - rope["low_freq_factor"])
            freqs.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    writer.add_tensor("rope_freqs.weight", np.array(freqs, dtype=np.float32))

    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    for hf_name, tensor in state.items():
        if hf_name in names:
            name = names[hf_name]
        else:
            _, _, layer, module = hf_name.split(".", 3)
            module, kind = module.rsplit(".", 1)
            name = f"blk.{layer}.{layer_names[module]}.{kind}"
        if hf_name.endswith("q_proj.weight"):
            tensor = _llama_cpp_permute(tensor, heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = _llama_cpp_permute(tensor, kv_heads)
        writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
