"""The one model a server process serves, and the policy both APIs share.

Both API modules only translate wire formats; what they have in common lives here: which names
address the model, how the model's own defaults (from its registry entry: Modelfile parameters,
generation_config.json) sit under a request's values, how chat messages become a prompt, and
admission control (the server's limits) before requests reach the engine: generation requests
(:meth:`ServedModel.start`) and embedding requests (:meth:`ServedModel.embed`) alike.

Rendering a chat and tokenizing a prompt cost time in proportion to their length; long ones
run in a worker thread (the tokenizer releases the GIL there), so that the event loop keeps
answering everyone else, health checks included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedserve.errors import (
    ContextLengthError,
    EngineBusyError,
    EngineDeadError,
    PromptTooLongError,
)
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.errors import APIError
from pagedserve.server.generation import Generation
from pagedserve.server.limits import ServerLimits
from pagedserve.structured.tool_parsers import detect_tool_parser

if TYPE_CHECKING:
    from pagedserve.engine.async_engine import AsyncEngine, RequestStream
    from pagedserve.engine.info import EngineInfo
    from pagedserve.engine.messages import EmbedResult, EngineCoreRequest

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
        self._embedding: dict[str, asyncio.Future[EmbedResult]] = {}  # answers in progress
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
    def info(self) -> EngineInfo:
        """What the engine core said of itself when it started (config, tokenizer, limits)."""
        return self.async_engine.info

    @property
    def tokenizer(self):
        return self.info.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

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

    def check_generates(self, message: str) -> None:
        """400 with ``message`` (the API's own words) when the model only embeds."""
        if not self.info.generates:
            raise APIError.bad_request(message, param="model", code="model_not_supported")

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
        if size > self.info.max_prompt_chars:
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
        if len(text) > self.info.max_prompt_chars:
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
        streams = [self.async_engine.enqueue(r) for r in requests]
        generation = Generation(streams)
        self._live.add(generation)
        try:
            await _admitted(requests, streams)
        except BaseException:
            generation.abort()
            raise
        return generation

    async def embed(self, inputs: Sequence[str] | Sequence[list[int]], *, truncate: bool = True,
                    normalize: bool = True, dimensions: int | None = None,
                    input_field: str = "input") -> EmbedResult:
        """The vectors of ``inputs`` (texts, or lists of token ids) in one engine request,
        which the core embeds in batches with others'. Answers 400 naming the field for what
        the model cannot take (``input_field`` is the wire name of the inputs: ``input``, or
        ``prompt``), 503 as :meth:`start` does, 500 when the core failed on it."""
        limit = self.limits.max_embedding_inputs
        if len(inputs) > limit:
            raise APIError.bad_request(
                f"{input_field} must hold at most {limit} inputs (pagedserve serve "
                f"--max-embedding-inputs), got {len(inputs)}", param=input_field)
        self._admit(1)
        make = functools.partial(self.async_engine.make_embed_request, inputs,
                                 truncate=truncate, normalize=normalize, dimensions=dimensions)
        try:
            if sum(len(x) for x in inputs if isinstance(x, str)) < LONG_TEXT_CHARS:
                request = make()
            else:
                request = await asyncio.to_thread(make)
        except ValueError as exc:
            raise _embedding_error(str(exc), input_field) from exc
        future = self.async_engine.enqueue_embedding(request)
        self._embedding[request.request_id] = future
        try:
            result = await future
        except EngineDeadError as exc:
            raise APIError.engine_dead(exc) from exc
        finally:
            self._embedding.pop(request.request_id, None)
        if result.error is not None:
            if result.client_error:
                raise _embedding_error(result.error, input_field)
            raise APIError(500, f"The server failed on this request: {result.error}",
                           code="engine_error")
        return result

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
        while self._embedding or any(not generation.finished
                                     for generation in list(self._live)):
            await asyncio.sleep(poll_s)

    def abort_all(self) -> None:
        """End every answer in progress (at shutdown): streams close with an abort, embedding
        requests answer 503."""
        for generation in list(self._live):
            generation.abort()
        for request_id, future in list(self._embedding.items()):
            if not future.done():
                future.set_exception(APIError(
                    503, "The server is shutting down; please retry (another replica may "
                    "answer).", code="server_shutting_down", headers={"Retry-After": "1"}))
            self.async_engine.abort(request_id)


async def _admitted(requests: Sequence[EngineCoreRequest],
                    streams: Sequence[RequestStream]) -> None:
    """Wait for the core to take in the requests whose constraint had to compile: 400 naming
    the field of a constraint that does not compile, 503 when no compile thread was free in
    time, before anything was answered."""
    for request, stream in zip(requests, streams, strict=True):
        if request.params.constraint is not None:
            try:
                await stream.wait_admitted()
            except ValueError as exc:
                field = str(exc).split(":", 1)[0]
                raise APIError.bad_request(str(exc), param=field) from exc
            except EngineBusyError as exc:
                raise APIError(503, f"Server busy compiling grammars: {exc}; please retry.",
                               code="server_busy", headers={"Retry-After": "1"}) from exc


def _embedding_error(message: str, input_field: str) -> APIError:
    """A 400 for an embedding request's bad input, naming the field as the client sent it."""
    if input_field != "input" and message.startswith("input"):
        # one prompt (Ollama's /api/embeddings): "input[0] has ..." -> "prompt has ..."
        message = input_field + message[len("input[0]" if message.startswith("input[0]")
                                            else "input"):]
    return APIError.from_value_error(ValueError(message))


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
