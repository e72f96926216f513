"""A byte-level BPE tokenizer of any vocabulary size, for random (``dummy:``) weights.

A served benchmark of a real model's shape needs a tokenizer of that vocabulary size: the
front end tokenizes prompts, the core's LM head produces ids over the whole vocabulary, and
detokenizing them costs what it costs in production only if the ids are real tokens of
realistic length. The weights of ``dummy:llama-3.1-8b`` are random, so any vocabulary of 128,256
entries will do. This one is built, not trained (training a BPE of that size takes minutes):

    ids 0-3      <|begin_of_text|>, <|end_of_text|>, <|im_start|>, <|im_end|> (a ChatML
                 template, EOS ids 1 and 3)
    next 256     the byte-level alphabet: any text encodes
    then         merges that make each of common_words.py's English words one token (with
                 its leading space), as in a real vocabulary (bench/prompts.py relies on it), then merges of random earlier tokens until the vocabulary is full: tokens
                 of 2 to ~16 bytes, made of letters, digits and punctuation

It is deterministic (a seeded generator) and takes well under a second for 150k entries.
"""

from __future__ import annotations

import logging
import random

from pagedserve.common_words import WORDS
from pagedserve.tokenizer import FALLBACK_CHAT_TEMPLATE, Tokenizer

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
_SEED = 20261206


def generated_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer whose ids are exactly ``[0, vocab_size)``."""
    if vocab_size < _FIRST_MERGE + 1:
        raise ValueError(f"vocab_size must be > {_FIRST_MERGE} for a byte-level tokenizer, "
                         f"got {vocab_size}")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as BackendTokenizer

    vocab, merges = _vocab_and_merges(vocab_size)
    backend = BackendTokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    return Tokenizer(backend, bos_token_id=0, eos_token_ids=[1, 3], add_bos=True,
                     chat_template=FALLBACK_CHAT_TEMPLATE,
                     special_tokens={"bos_token": SPECIAL_TOKENS[0],
                                     "eos_token": SPECIAL_TOKENS[3]})


_FIRST_MERGE = len(SPECIAL_TOKENS) + 256


def _vocab_and_merges(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    char_of = _byte_level_chars()
    alphabet = [char_of[b] for b in range(256)]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    merges: list[tuple[str, str]] = []

    def merge(left: str, right: str) -> None:
        if left + right not in vocab and len(vocab) < vocab_size:
            vocab[left + right] = len(vocab)
            merges.append((left, right))

    space = char_of[ord(" ")]
    for word in WORDS:  # "Ġtime": Ġ+t, Ġt+i, Ġti+m, Ġtim+e
        piece = space
        for ch in word:
            merge(piece, ch)
            piece += ch
    rng = random.Random(_SEED)
    printable = [char_of[b] for b in range(256)
                 if chr(b).isascii() and (chr(b).isalnum() or chr(b) in " .,;:!?'-()")]
    pool = printable + list(vocab)[_FIRST_MERGE:]
    while len(vocab) < vocab_size:
        left, right = rng.choice(pool), rng.choice(printable if rng.random() < 0.6 else pool)
        if len(left) + len(right) > 16:
            continue
        before = len(vocab)
        merge(left, right)
        if len(vocab) > before:
            pool.append(left + right)
    return vocab, merges


def _byte_level_chars() -> dict[int, str]:
    """Byte -> the character the byte-level pre-tokenizer writes for it (GPT-2's table:
    printable Latin-1 bytes stand for themselves, the others for characters from U+0100)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1),
                 *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
