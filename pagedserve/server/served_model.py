"""The one model a server process serves, and the policy both APIs share.

Both API modules only translate wire formats; what they have in common lives here: which names
address the model, how the model's own defaults (from its registry entry: Modelfile parameters,
generation_config.json) sit under a request's values, how chat messages become a prompt, and
admission control (the server's limits) before requests reach the engine.

Rendering a chat and tokenizing a prompt cost time in proportion to their length; long ones
run in a worker thread (the tokenizer releases the GIL there), so that the event loop keeps
answering everyone else, health checks included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedserve.engine import ContextLengthError, PromptTooLongError
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.errors import APIError
from pagedserve.server.generation import Generation
from pagedserve.server.limits import ServerLimits
from pagedserve.structured.compiler import GrammarBusy
from pagedserve.structured.tool_parsers import detect_tool_parser

if TYPE_CHECKING:
    from pagedserve.async_engine import AsyncEngine
    from pagedserve.request import Request

logger = logging.getLogger(__name__)

_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
LONG_TEXT_CHARS = 16_384  # chats and prompts from this length on are prepared off the loop


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
                 limits: ServerLimits | None = None, tool_call_parser: str = "auto") -> None:
        self.card = card
        self.tool_call_parser = tool_call_parser  # a parser's name, or "auto": the template's
        self.async_engine = async_engine
        self.limits = limits or ServerLimits()
        self.draining = False  # set at SIGTERM: nothing new is admitted
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

    @property
    def tool_parser_name(self) -> str | None:
        """The tool-call format to read: the server's choice, else the chat template's."""
        if self.tool_call_parser != "auto":
            return self.tool_call_parser
        return detect_tool_parser(self.tokenizer.chat_template if self.tokenizer else None)

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

    async def render_chat(self, messages: Sequence[dict], tools: list[dict] | None = None
                          ) -> str:
        """The chat as prompt text (off the event loop when it is long); 400 if the template
        rejects it or the text cannot fit the context. ``tools`` go to the template."""
        size = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        if size > self.engine.max_prompt_chars:
            raise _too_many_chars(self.max_model_len, "messages", size)
        if size < LONG_TEXT_CHARS:
            return self._render_chat(messages, tools)
        return await asyncio.to_thread(self._render_chat, messages, tools)

    def _render_chat(self, messages: Sequence[dict], tools: list[dict] | None = None) -> str:
        try:
            return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                      tools=tools or None)
        except ValueError as exc:
            message = str(exc)
            if not message.startswith("messages"):
                message = f"messages: {message}"
            raise APIError.bad_request(message, param="messages") from exc

    async def tokenize(self, text: str, add_special_tokens: bool, field: str) -> list[int]:
        """Token ids of ``text`` (for /tokenize): bounded like a prompt, long ones off the loop."""
        if len(text) > self.engine.max_prompt_chars:
            raise _too_many_chars(self.max_model_len, field, len(text))
        if len(text) < LONG_TEXT_CHARS:
            return self.tokenizer.encode(text, add_special_tokens)
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    # -- admission -----------------------------------------------------------------------------

    def check_choices(self, num_prompts: int, n: int) -> None:
        """One call may start at most ``max_n`` engine requests (n choices x prompts)."""
        if isinstance(n, bool) or n < 1:
            raise APIError.bad_request(f"n must be >= 1, got {n}", param="n")
        limit = self.limits.max_n
        if n * num_prompts > limit:
            where = f"n x {num_prompts} prompts = {n * num_prompts}" if num_prompts > 1 else n
            raise APIError.bad_request(
                f"n must be <= {limit} (choices per request; pagedserve serve --max-n), "
                f"got {where}", param="n")

    async def start(self, prompts: Sequence[str | list[int]], params: Sequence[SamplingParams],
                    renames: dict[str, str] | None = None, prompt_field: str = "prompt"
                    ) -> Generation:
        """Submit one engine request per (prompt, params) pair, as one :class:`Generation`.

        Answers 503 when the queue of requests that cannot start is full or the engine is
        dead; a prompt that does not fit the context, or any other bad input, answers 400 and
        leaves nothing behind in the engine (every request is made before any is queued).
        """
        self._admit(len(prompts))
        size = sum(len(p) for p in prompts)
        try:
            if size < LONG_TEXT_CHARS:
                requests = self._make_requests(prompts, params)
            else:
                requests = await asyncio.to_thread(self._make_requests, prompts, params)
        except ContextLengthError as exc:
            raise _context_error(exc, prompt_field) from exc
        except ValueError as exc:
            raise APIError.from_value_error(exc, renames) from exc
        await _compiled(requests)
        streams = [self.async_engine.enqueue(r) for r in requests]
        generation = Generation(streams)
        self._live.add(generation)
        return generation

    def _admit(self, num_requests: int) -> None:
        self.async_engine.check_alive()
        if self.draining:
            raise APIError(503, "The server is shutting down and takes no new requests; please "
                           "retry (another replica may answer).", code="server_shutting_down",
                           headers={"Retry-After": "1"})
        limit = self.limits.max_queue
        if limit is None:
            return
        queued = self.async_engine.num_queued()
        if queued + num_requests > limit:
            raise APIError(503, f"Server busy: {queued} requests are waiting for a seat, the "
                           f"limit is {limit}; please retry.", code="server_busy",
                           headers={"Retry-After": "1"})

    def _make_requests(self, prompts: Sequence[str | list[int]],
                       params: Sequence[SamplingParams]) -> list:
        """One engine request per pair; a text repeated for n choices is tokenized once."""
        token_ids: dict[str, list[int]] = {}
        requests = []
        for prompt, p in zip(prompts, params, strict=True):
            text = prompt if isinstance(prompt, str) else None
            request = self.async_engine.make_request(token_ids.get(text, prompt), p)
            if text is not None:
                token_ids.setdefault(text, request.prompt_token_ids)
            requests.append(request)
        return requests

    # -- stopping (see http_server.py) -----------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether a load balancer should send requests here."""
        return self.async_engine.alive and not self.draining

    def start_draining(self) -> None:
        self.draining = True

    async def drained(self, poll_s: float = 0.05) -> None:
        """Return once every answer in progress has finished."""
        while any(not generation.finished for generation in list(self._live)):
            await asyncio.sleep(poll_s)

    def abort_all(self) -> None:
        """End every answer in progress (at shutdown): streams close with an abort."""
        for generation in list(self._live):
            generation.abort()


async def _compiled(requests: Sequence[Request]) -> None:
    """Wait (off the event loop) for the requests' grammars; 400 naming the field of one that
    does not compile, 503 when no compile thread was free, before anything is queued."""
    for request in requests:
        if request.grammar is not None:
            await asyncio.wait([asyncio.wrap_future(request.grammar.compiled)])
            try:
                request.grammar.wait(0)
            except ValueError as exc:
                field = str(exc).split(":", 1)[0]
                raise APIError.bad_request(str(exc), param=field) from exc
            except GrammarBusy as exc:
                raise APIError(503, f"Server busy compiling grammars: {exc}; please retry.",
                               code="server_busy", headers={"Retry-After": "1"}) from exc


def _with_tag(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _too_many_chars(limit: int, prompt_field: str, num_chars: int) -> APIError:
    return APIError(400, f"This model's maximum context length is {limit} tokens; your "
                    f"{prompt_field} of {num_chars} characters cannot fit in it. Please "
                    "reduce its length.", param=prompt_field, code="context_length_exceeded")


def _context_error(exc: ContextLengthError, prompt_field: str) -> APIError:
    if isinstance(exc, PromptTooLongError):  # turned away by its length before tokenizing
        return _too_many_chars(exc.max_model_len, prompt_field, exc.num_chars)
    limit, prompt_tokens, max_tokens = exc.max_model_len, exc.num_prompt_tokens, exc.max_tokens
    message = (f"This model's maximum context length is {limit} tokens, your request has "
               f"{prompt_tokens} input tokens")
    if max_tokens:
        message += (f" and asks for {max_tokens} output tokens ({prompt_tokens + max_tokens} "
                    "in all)")
    message += ". Please reduce the length of the prompt or of max_tokens."
    return APIError(400, message, param=prompt_field, code="context_length_exceeded")
