"""The one model a server process serves, and the policy both APIs share.

Both API modules only translate wire formats; what they have in common lives here: which names
address the model, how the model's own defaults (from its registry entry: Modelfile parameters,
generation_config.json) sit under a request's values, how chat messages become a prompt, and
admission control (``--max-queue``) before requests reach the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedserve.engine import ContextLengthError
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.errors import APIError
from pagedserve.server.generation import Generation

if TYPE_CHECKING:
    from pagedserve.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclass(slots=True)
class ModelCard:
    """What the registry says about the served model, for /v1/models and /api/show."""

    name: str
    path: str
    source: str = "path"
    aliases: frozenset[str] = frozenset()
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    template: str | None = None


class ServedModel:
    """The served model: its names, its defaults, and the door to the engine."""

    def __init__(self, card: ModelCard, async_engine: AsyncEngine,
                 max_queue: int | None = None) -> None:
        self.card = card
        self.async_engine = async_engine
        self.max_queue = max_queue
        self.loaded_at = time.time()
        self._live: weakref.WeakSet[Generation] = weakref.WeakSet()
        unknown = set(card.sampling_defaults) - _SAMPLING_FIELDS - {"num_ctx"}  # engine's
        if unknown:
            logger.warning("ignoring unknown sampling defaults of %s: %s", card.name,
                           ", ".join(sorted(unknown)))
        self.sampling_defaults = {k: v for k, v in card.sampling_defaults.items()
                                  if k in _SAMPLING_FIELDS}

    # -- identity ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def engine(self):
        return self.async_engine.engine

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def answers_to(self, name: str | None) -> bool:
        """Whether a request's ``model`` addresses this model (None and "" mean the default)."""
        if not name:
            return True
        names = {self.card.name, *self.card.aliases}
        return name in names or _with_tag(name) in {_with_tag(n) for n in names}

    def check_model(self, name: str | None) -> None:
        if not self.answers_to(name):
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                           f"`{self.name}`.", param="model", code="model_not_found")

    # -- policy --------------------------------------------------------------------------------

    def sampling_params(self, request_values: Mapping[str, Any],
                        api_defaults: Mapping[str, Any] | None = None,
                        renames: dict[str, str] | None = None) -> SamplingParams:
        """API defaults, under the model's defaults, under what the request set.

        ``renames`` maps SamplingParams field names to the wire names, for error messages.
        """
        values = {**(api_defaults or {}), **self.sampling_defaults, **request_values}
        try:
            return SamplingParams(**values)
        except ValueError as exc:
            raise APIError.from_value_error(exc, renames) from exc
        except TypeError as exc:  # a wrong type that slipped past the wire schema
            raise APIError.bad_request(str(exc)) from exc

    def with_system_prompt(self, messages: Sequence[dict], system: str | None = None
                           ) -> list[dict]:
        """Messages with the system prompt in front: ``system`` if given, else the model's own
        default, unless the conversation already starts with a system message."""
        messages = list(messages)
        prompt = system if system is not None else self.card.system
        if messages and messages[0].get("role") == "system":
            if system is not None:
                messages[0] = {**messages[0], "content": system}
            return messages
        if prompt:
            messages.insert(0, {"role": "system", "content": prompt})
        return messages

    def render_chat(self, messages: Sequence[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        except ValueError as exc:
            message = str(exc)
            if not message.startswith("messages"):
                message = f"messages: {message}"
            raise APIError.bad_request(message, param="messages") from exc

    # -- admission -----------------------------------------------------------------------------

    def start(self, prompts: Sequence[str | list[int]], params: Sequence[SamplingParams],
              renames: dict[str, str] | None = None, prompt_field: str = "prompt"
              ) -> Generation:
        """Submit one engine request per (prompt, params) pair, as one :class:`Generation`.

        Answers 503 when the waiting queue is full; a prompt that does not fit the context, or
        any other bad input, answers 400 and leaves nothing behind in the engine.
        """
        if self.max_queue is not None:
            waiting = self.async_engine.num_waiting()
            if waiting + len(prompts) > self.max_queue:
                raise APIError(503, f"Server busy: {waiting} requests are waiting, the limit "
                               f"is {self.max_queue}; please retry.", code="server_busy",
                               headers={"Retry-After": "1"})
        streams = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                streams.append(self.async_engine.submit(prompt, p))
        except ValueError as exc:
            for stream in streams:
                stream.abort()
            if isinstance(exc, ContextLengthError):
                raise _context_error(exc, prompt_field) from exc
            raise APIError.from_value_error(exc, renames) from exc
        generation = Generation(streams)
        self._live.add(generation)
        return generation

    def abort_all(self) -> None:
        """End every answer in progress (at shutdown): streams close with an abort."""
        for generation in list(self._live):
            generation.abort()


def _with_tag(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _context_error(exc: ContextLengthError, prompt_field: str) -> APIError:
    limit, prompt_tokens, max_tokens = exc.max_model_len, exc.num_prompt_tokens, exc.max_tokens
    message = (f"This model's maximum context length is {limit} tokens, your request has "
               f"{prompt_tokens} input tokens")
    if max_tokens:
        message += (f" and asks for {max_tokens} output tokens ({prompt_tokens + max_tokens} "
                    "in all)")
    message += ". Please reduce the length of the prompt or of max_tokens."
    return APIError(400, message, param=prompt_field, code="context_length_exceeded")
