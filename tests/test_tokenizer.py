"""Tokenizers built from GGUF metadata and HF directories agree with transformers."""

from __future__ import annotations

import json
import shutil

import pytest

from pagedserve.tokenizer import FALLBACK_CHAT_TEMPLATE, Tokenizer

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "12345 numbers 3.14159 and 1,000,000.00 $5",
    "😀 emoji 🎉🎉 and CJK 日本語 中文 한국어",
    "ünïcödé café naïve",
    "  lots   of   spaces\n\n\n\ttabs\r\n",
    "I'm here, it's ok. DON'T",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>foo<repo_name>bar",
    "",
    " ",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ],
]


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_gguf) -> Tokenizer:
    from pagedserve.loader.gguf import GGUFFile, tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(GGUFFile(smollm_gguf))
    assert tokenizer is not None
    return tokenizer


@pytest.fixture(scope="module")
def smollm_reference(smollm_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm_gguf.parent), gguf_file=smollm_gguf.name
    )


@pytest.mark.slow
@pytest.mark.parametrize("text", SAMPLES)
def test_smollm_gguf_encodes_like_transformers(smollm_tokenizer, smollm_reference, text):
    ids = smollm_tokenizer.encode(text)
    assert ids == smollm_reference.encode(text)
    assert smollm_tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm_chat_template_like_transformers(smollm_tokenizer, smollm_reference, messages):
    ours = smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    theirs = smollm_reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs


def test_smollm_special_tokens(smollm_tokenizer):
    tok = smollm_tokenizer
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2]
    assert tok.add_bos is False
    assert tok.encode("<|im_start|>") == [1]
    assert {0, 1, 2} <= tok.all_special_ids
    assert tok.decode([1, 4093, 2]) == "user"  # specials skipped by default
    assert tok.decode([1, 4093, 2], skip_special_tokens=False) == "<|im_start|>user<|im_end|>"
    assert tok.token_text(4093) == "user"
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"


def test_sentencepiece_gguf_encodes_like_transformers(tiny_llama_gguf):
    transformers = pytest.importorskip("transformers")
    from pagedserve.loader.gguf import GGUFFile, tokenizer_from_gguf

    tok = tokenizer_from_gguf(GGUFFile(tiny_llama_gguf))
    ref = transformers.AutoTokenizer.from_pretrained(
        str(tiny_llama_gguf.parent), gguf_file=tiny_llama_gguf.name
    )
    for text in ["hello world", " the cat sat on the mat", "Hello World!", "😀 x  y",
                 "<s>the</s>", "the\nnew line", "sitting"]:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)
    assert tok.add_bos and tok.encode("the")[0] == 1
    assert tok.encode("the", add_special_tokens=False)[0] != 1
    assert tok.token_text(3 + 0xE2) == "\ufffd"  # a lone byte token of a 3-byte character


def test_hf_dir_tokenizer_like_transformers(tiny_llama_tokenized_dir):
    transformers = pytest.importorskip("transformers")
    from pagedserve.loader.hf import load_hf_tokenizer, read_generation_config

    tok = load_hf_tokenizer(tiny_llama_tokenized_dir,
                            read_generation_config(tiny_llama_tokenized_dir))
    ref = transformers.AutoTokenizer.from_pretrained(str(tiny_llama_tokenized_dir))
    for text in SAMPLES[:10]:
        assert tok.encode(text) == ref.encode(text), text
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    assert tok.bos_token_id == 1 and set(tok.eos_token_ids) == {2, 3}
    assert tok.encode("<|im_end|>") == [3]


def test_chat_template_in_separate_jinja_file(tiny_llama_tokenized_dir, tmp_path):
    from pagedserve.loader.hf import load_hf_tokenizer

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_llama_tokenized_dir, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tok = load_hf_tokenizer(model_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"


def _byte_level_tokenizer(template: str | None) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.BPE(vocab={c: i for i, c in enumerate("abc")}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, chat_template=template,
                     special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


def test_template_environment_matches_transformers():
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"
        "{% if tools %}{{ tools | tojson }}{% endif %}"
        "{% if strftime_now('%Y') | length != 4 %}{{ raise_exception('bad year') }}{% endif %}"
        "{{ eos_token }}{{ extra }}"
    )
    tok = _byte_level_tokenizer(template)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "<b>é</b>"}],
        tools=[{"name": "f"}],
        extra="!",
    )
    # tojson keeps HTML characters and non-ASCII as they are (jinja's own would escape them)
    assert text == '<s>"<b>é</b>"[{"name": "f"}]</s>!'


def test_template_raise_exception_is_value_error():
    tok = _byte_level_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_content_parts_are_joined_and_fallback_template():
    tok = _byte_level_tokenizer(None)
    assert "ChatML" in (Tokenizer.apply_chat_template.__doc__ or "")
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                              {"type": "text", "text": "b"}]}]
    text = tok.apply_chat_template(messages)
    assert text == "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_template is None and FALLBACK_CHAT_TEMPLATE
    with pytest.raises(ValueError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url"}]}])


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt2"])
def test_byte_level_gguf_pre_tokenizers_like_transformers(tiny_llama_tokenized_dir, tmp_path, pre):
    """Each `tokenizer.ggml.pre` splits text like transformers' tokenizer for that file."""
    transformers = pytest.importorskip("transformers")
    import gguf

    from pagedserve.loader.gguf import GGUFFile, tokenizer_from_gguf

    model = json.loads((tiny_llama_tokenized_dir / "tokenizer.json").read_text())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    path = tmp_path / f"{pre}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", pre)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_array("tokenizer.ggml.token_type", [3 if t.startswith("<") else 1 for t in tokens])
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 3)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = tokenizer_from_gguf(GGUFFile(path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    # (not "<|endoftext|>": transformers appends that token to a vocabulary that lacks it)
    texts = [t for t in SAMPLES if "<|endoftext|>" not in t]
    for text in texts + ["Numbers 12345 and 6789!!\n\n  x", "The cat's hat; it'll DO."]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
