"""A GGUF file's tokenizer: `tokenizer.ggml.*` metadata -> a `tokenizers` backend.

Two vocabularies are understood, as llama.cpp names them in `tokenizer.ggml.model`: "gpt2"
(byte-level BPE from tokens and merges) and "llama" (SentencePiece BPE with byte fallback, merges
from the file or ranked from the token scores). Every array is checked for its type and its
length against the tokens before the backend is built.
"""

from __future__ import annotations

import logging

from pagedserve.loader.gguf_file import GGUFFile
from pagedserve.loader.loaded_model import ModelLoadError
from pagedserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as in the models' own tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for
    themselves, the other 68 bytes are shifted to code points 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def _byte_level_pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    if pre in _SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre == "smollm":  # SmolLM's tokenizer.json: single digits, then GPT-2's split
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre not in (None, "default", "gpt2", "gpt-2"):
        logger.info("tokenizer.ggml.pre %r is not known; splitting text like GPT-2", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int],
                   pre: str | None):
    """`tokenizer.ggml.model == "gpt2"`: byte-level BPE from the vocabulary and merges."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models

    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, token_types, strict=True)):
        # Normal tokens are spelled in the byte alphabet; a few converters write raw text.
        if kind == _NORMAL and not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tokens, token_types)
    return backend


def sentencepiece_bpe(tokens: list[str], scores: list[float], token_types: list[int],
                      merges: list[str] | None, add_space_prefix: bool = True):
    """`tokenizer.ggml.model == "llama"`: SentencePiece BPE with byte fallback and ▁ spaces.

    Merges, when the file has none, come from the scores: each normal token that splits into
    two vocabulary pieces yields a merge, ranked by the token's score (SentencePiece merges the
    pair whose result scores highest).
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        ranked = []
        for token, score, kind in zip(tokens, scores, token_types, strict=True):
            if kind != _NORMAL:
                continue
            for cut in range(1, len(token)):
                left, right = token[:cut], token[cut:]
                if left in vocab and right in vocab:
                    ranked.append((-float(score), len(ranked), left, right))
        ranked.sort()
        pairs = [(left, right) for _, _, left, right in ranked]
    unk = next((t for t, k in zip(tokens, token_types, strict=True) if k == _UNKNOWN), None)
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True,
                                 byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_special_tokens(backend, tokens, token_types)
    return backend


def _add_special_tokens(backend, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens become special tokens and user-defined ones added tokens, so that
    "<|im_start|>" in text is one token rather than pieces."""
    from tokenizers import AddedToken

    control, user = [], []
    for token, kind in zip(tokens, token_types, strict=True):
        if kind == _CONTROL:
            control.append(AddedToken(token, special=True, normalized=False))
        elif kind == _USER_DEFINED:
            user.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def tokenizer_from_gguf(f: GGUFFile) -> Tokenizer | None:
    """The Tokenizer the metadata describes (None when it has no `tokenizer.ggml.model`).

    EOS ids are eos, then eot/eom when present (chat models end turns with those); BOS is
    prepended when `add_bos_token` says so, by default for SentencePiece vocabularies only
    (llama.cpp's default). Ids outside the vocabulary are ignored.
    """
    kind = f.text("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind not in ("gpt2", "llama"):
        raise ModelLoadError(
            f"{f.name}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)"
        )
    tokens = f.strings("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{f.name}: tokenizer.ggml.model is set but there are no tokens")
    token_types = f.integers("tokenizer.ggml.token_type", len(tokens)) or [_NORMAL] * len(tokens)
    merges = f.strings("tokenizer.ggml.merges")
    for i, merge in enumerate(merges or ()):
        if " " not in merge:
            raise ModelLoadError(f"{f.name}: tokenizer.ggml.merges[{i}] must be two tokens "
                                 f"separated by a space, found {merge[:40]!r}")
    pre = f.text("tokenizer.ggml.pre")
    scores = f.numbers("tokenizer.ggml.scores", len(tokens)) or [0.0] * len(tokens)
    add_space_prefix = f.flag("tokenizer.ggml.add_space_prefix", True)

    def token_id(key: str) -> int | None:
        value = f.integer(f"tokenizer.ggml.{key}", lo=-(1 << 63))
        return value if value is not None and 0 <= value < len(tokens) else None

    bos = token_id("bos_token_id")
    eos_ids = [i for i in (token_id(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id"))
               if i is not None]
    names = {"bos_token": bos, "eos_token": token_id("eos_token_id"),
             "unk_token": token_id("unknown_token_id"), "pad_token": token_id("padding_token_id")}
    add_bos = f.flag("tokenizer.ggml.add_bos_token", kind == "llama")
    chat_template = f.text("tokenizer.chat_template")
    try:
        if kind == "gpt2":
            backend = byte_level_bpe(tokens, merges or [], token_types, pre)
        else:
            backend = sentencepiece_bpe(tokens, scores, token_types, merges,
                                        add_space_prefix=add_space_prefix)
    except Exception as exc:  # the tokenizers library raises plain Exception on bad input
        raise ModelLoadError(f"{f.name}: the tokenizer cannot be built from its metadata: "
                             f"{' '.join(str(exc).split())[:200]}") from exc
    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        add_bos=add_bos,
        chat_template=chat_template,
        special_tokens={name: tokens[i] if i is not None else None for name, i in names.items()},
    )

