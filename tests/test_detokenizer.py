"""Incremental detokenization: UTF-8 safe deltas, stop strings that never leak."""

from __future__ import annotations

import random

import pytest

from pagedserve.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world, the answer is 42. 😀 Done!",
    "日本語のテキストと emoji 🎉🎉🎉 mixed with English.",
    "def f(x):\n    return x ** 2  # ünïcödé\n",
    "   spaces   and\ttabs\n\nnewlines",
]


@pytest.fixture(scope="module")
def tok(smollm_gguf):
    from pagedserve.loader.gguf import GGUFFile, tokenizer_from_gguf

    return tokenizer_from_gguf(GGUFFile(smollm_gguf))


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")


def _stream(detok, ids, chunk_sizes):
    deltas, stop, i = [], None, 0
    while i < len(ids) and stop is None:
        n = next(chunk_sizes)
        delta = detok.add(ids[i : i + n])
        deltas.append(delta.text)
        stop = delta.stop
        i += n
    if stop is None:
        deltas.append(detok.flush())
    return deltas, stop


def _ones():
    while True:
        yield 1


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode_and_never_split_a_character(tok, prompt_ids, text):
    ids = tok.encode(text)
    assert "\ufffd" in "".join(tok.token_text(i) for i in ids) or text.isascii()
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=[])
    deltas, stop = _stream(detok, ids, _ones())
    assert stop is None
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text


def test_random_chunks_keep_the_concatenation(tok, prompt_ids):
    rng = random.Random(0)
    text = " ".join(TEXTS)
    ids = tok.encode(text)
    for _ in range(10):
        detok = IncrementalDetokenizer(tok, prompt_ids, stop=[])
        chunks = iter(lambda: rng.randint(1, 4), None)
        deltas, _ = _stream(detok, ids, chunks)
        assert "".join(deltas) == text


@pytest.mark.parametrize("stop", ["answer is", "d, the a", "😀 D", "42.", "!"])
def test_stop_string_split_across_tokens_never_leaks(tok, prompt_ids, stop):
    text = TEXTS[0]
    ids = tok.encode(text)
    index = text.index(stop)
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=[stop, "never appears"])
    released = ""
    for token_id in ids:
        delta = detok.add([token_id])
        released += delta.text
        # at no point has any text from the stop string onward been shown
        assert released == text[: len(released)] and len(released) <= index
        if delta.stop is not None:
            break
    assert delta.stop == stop
    assert released == text[:index]
    assert detok.add(ids[:3]).text == "" and detok.flush() == ""


def test_include_stop_str_in_output(tok, prompt_ids):
    text = TEXTS[0]
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["answer"],
                                   include_stop_str_in_output=True)
    deltas, stop = _stream(detok, tok.encode(text), _ones())
    assert stop == "answer"
    assert "".join(deltas) == "Hello world, the answer"


def test_earliest_stop_wins(tok, prompt_ids):
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["42", "world"])
    deltas, stop = _stream(detok, tok.encode(TEXTS[0]), iter(lambda: 50, None))
    assert stop == "world" and "".join(deltas) == "Hello "


def test_partial_stop_is_released_once_it_cannot_match(tok, prompt_ids):
    # "the answer" starts like the stop "the end", then diverges
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["the end"])
    released = ""
    for token_id in tok.encode("Hello world, the answer"):
        released += detok.add([token_id]).text
    assert released == "Hello world, the answer"
    # a trailing prefix of a stop waits for flush()
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["the end"])
    released = "".join(detok.add([t]).text for t in tok.encode("Hello world, the"))
    assert released == "Hello world, "
    assert detok.flush() == "the"


def test_special_tokens_skipped_or_kept(tok, prompt_ids):
    ids = tok.encode("Hi<|im_end|>there")
    skip = IncrementalDetokenizer(tok, prompt_ids, stop=[])
    assert "".join(_stream(skip, ids, _ones())[0]) == "Hithere"
    keep = IncrementalDetokenizer(tok, prompt_ids, stop=[], skip_special_tokens=False)
    assert "".join(_stream(keep, ids, _ones())[0]) == "Hi<|im_end|>there"


@pytest.mark.parametrize("stop", [[], ["never appears"]])
def test_an_answer_cut_inside_a_character_drops_it(tok, prompt_ids, stop):
    """max_tokens ends inside an emoji: the answer ends before it, not with U+FFFD."""
    ids = tok.encode("ok 😀")
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # the emoji spans byte tokens
    for cut in range(len(ids) - 3, len(ids)):
        detok = IncrementalDetokenizer(tok, prompt_ids, stop=stop)
        deltas, _ = _stream(detok, ids[:cut], _ones())
        assert "".join(deltas) == tok.decode(ids[:cut]).rstrip("\ufffd")
        assert not any("\ufffd" in d for d in deltas)


def test_sentencepiece_keeps_the_space_of_the_first_output_token(tiny_llama_gguf):
    from pagedserve.loader.gguf import GGUFFile, tokenizer_from_gguf

    sp = tokenizer_from_gguf(GGUFFile(tiny_llama_gguf))
    prompt = sp.encode("the cat")
    output = sp.encode(" sat on the mat", add_special_tokens=False)
    detok = IncrementalDetokenizer(sp, prompt, stop=["mat"])
    deltas, stop = _stream(detok, output, _ones())
    # decoded after the prompt, " sat" keeps its space (decode(output) alone would strip it)
    assert stop == "mat" and "".join(deltas) == " sat on the "


def test_byte_tokens_that_never_form_utf8_fall_back_to_the_window(tiny_llama_gguf):
    """Random weights sample lone byte tokens: tokenizers' DecodeStream refuses some such
    sequences after a SentencePiece byte fallback ("Invalid prefix encountered"); the request
    goes on with the window decoder, and its text is still the whole decode less incomplete
    characters."""
    from tokenizers.decoders import DecodeStream

    from pagedserve.loader.gguf import GGUFFile, tokenizer_from_gguf

    tok = tokenizer_from_gguf(GGUFFile(tiny_llama_gguf))
    prompt = tok.encode("Hello world")
    rng = random.Random(0)
    for _ in range(2000):  # a sequence DecodeStream refuses (the third one tried, today)
        ids = [rng.randrange(3, tok.vocab_size) for _ in range(rng.randrange(2, 20))]
        stream = DecodeStream(ids=prompt[-5:], skip_special_tokens=True)
        try:
            for i in ids:
                stream.step(tok.backend, i)
        except Exception:  # noqa: BLE001 - the refusal this test needs
            break
    else:
        pytest.fail("no sequence made DecodeStream refuse: the fallback is not exercised")
    detok = IncrementalDetokenizer(tok, prompt, stop=[])
    deltas, stop = _stream(detok, ids, _ones())
    assert stop is None
    # bytes that can never be UTF-8: the whole decode turns every byte of such a run into
    # U+FFFD, a window may show the valid ones among them; everywhere else they agree
    text, whole = "".join(deltas), tok.decode(ids).rstrip("\ufffd")
    assert len(text) == len(whole)
    assert all(a == b for a, b in zip(text, whole, strict=True) if b != "\ufffd")
