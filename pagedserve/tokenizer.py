"""Text <-> token ids, and chat messages -> prompt text.

`Tokenizer` wraps a `tokenizers.Tokenizer` (built by a loader from tokenizer.json or from GGUF
metadata) and adds what the backend does not know: which ids end a sequence, whether a BOS is
prepended, and the Jinja chat template, rendered the way transformers renders it.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

logger = logging.getLogger(__name__)

_LONG_TEXT_CHARS = 16_384  # from this length on, encode without holding the GIL

# Used only when the model ships no chat template (see `Tokenizer.apply_chat_template`).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """encode/decode over a `tokenizers` backend, plus BOS/EOS policy and the chat template.

    The backend is always called with `add_special_tokens=False`; BOS is prepended here, from
    `add_bos`, so that a tokenizer.json post-processor and a GGUF flag cannot both add one.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        # Template variables such as bos_token / eos_token, by name.
        self.special_tokens: dict[str, str] = {
            name: text for name, text in (special_tokens or {}).items() if text is not None
        }
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        special.update(self.eos_token_ids)
        if bos_token_id is not None:
            special.add(bos_token_id)
        self.all_special_ids: set[int] = special

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) < _LONG_TEXT_CHARS:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        else:  # encode_batch releases the GIL (encode does not): other threads keep running
            ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens and self.add_bos:
            assert self.bos_token_id is not None
            ids.insert(0, self.bos_token_id)
        return ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: the longest entry of the vocabulary.

        Each character of a text is covered by at least one token, and a token covers at most
        this many, so a text of C characters encodes to at least C / max_token_chars tokens:
        a bound that turns an overlong prompt away before tokenizing it.
        """
        return max((len(token) for token in self.backend.get_vocab(with_added_tokens=True)),
                   default=1)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The token's text decoded on its own (a lone byte token decodes to '\\ufffd')."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` to prompt text with the model's Jinja chat template.

        Rendering follows transformers: a sandboxed environment with trim_blocks and
        lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML,
        the special tokens (bos_token, eos_token, ...) as variables, and `tools`, `documents` and
        any other keyword passed through. A message's content may be a string or a list of
        `{"type": "text", "text": ...}` parts; parts are joined with newlines before rendering.

        A model without a template gets a plain ChatML layout (`FALLBACK_CHAT_TEMPLATE`):
        `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.
        """
        template = self.chat_template
        if template is None:
            logger.debug("model has no chat template; using the ChatML fallback")
            template = FALLBACK_CHAT_TEMPLATE
        variables = {**self.special_tokens, **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            return _compile(template).render(
                messages=[_flatten_content(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"messages: the chat template rejected them: {exc}") from exc

    @functools.cached_property
    def template_renders_tools(self) -> bool:
        """Whether the chat template shows the model the tools it is given.

        Probed, not guessed from the template's text: a chat is rendered with one tool, whose
        name must appear in the prompt. A template without a ``tools`` variable (SmolLM2's,
        Gemma's) renders the same prompt with tools or without.
        """
        probe = {"type": "function", "function": {
            "name": _PROBE, "description": "Probe.",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
        try:
            prompt = self.apply_chat_template([{"role": "user", "content": "Hi."}],
                                              tools=[probe])
        except ValueError:
            return False
        return _PROBE in prompt

    @functools.cached_property
    def template_takes_system(self) -> bool:
        """Whether the chat template renders a system message (Gemma's refuses one)."""
        try:
            prompt = self.apply_chat_template([{"role": "system", "content": _PROBE},
                                               {"role": "user", "content": "Hi."}])
        except ValueError:
            return False
        return _PROBE in prompt


_PROBE = "pagedserve_template_probe"


def _flatten_content(message: Mapping[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type", "text") == "text":
            texts.append(str(part.get("text", "")))
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"messages: content part of type {kind!r} is not supported")
    return {**message, "content": "\n".join(texts)}


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): the body
    renders unchanged; we do not compute assistant masks."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat_template: not valid Jinja: {exc}") from exc
