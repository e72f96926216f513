"""The OpenAI API's request bodies (with vLLM's sampling extras), as pydantic models.

Only types are checked here; ranges are SamplingParams' business, so that each rule lives once.
A field this server does not use is one of two kinds:

    refused   it would change the answer and is not implemented: a 400 naming it
              (UNSUPPORTED_FIELDS, ``modalities`` other than text, image and audio content
              parts, vLLM's removed ``guided_*`` fields, unknown keys of
              ``structured_outputs``): a client must never get an answer to a question it
              did not ask, with a 200
    ignored   it cannot change the answer here (``user``, ``store``, ``metadata``, any unknown
              field): accepted, and named in one log line per request (``ignored_fields``), as
              OpenAI's own server and vLLM accept what they do not use
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from pagedserve.structured.tool_parsers import check_tool_name

NonEmptyText = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[int], Field(min_length=1)]


def tool_name(name: str) -> str:
    """A function name as OpenAI checks it; pydantic's error without its "Value error, "."""
    try:
        return check_tool_name(name)
    except ValueError as exc:
        raise PydanticCustomError("string_pattern_mismatch", str(exc)) from None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaFormat(_Body):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` extra: one of json, regex, choice, grammar, json_object."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


# vLLM's guided decoding fields, removed there in favour of structured_outputs: refused here
REMOVED_GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                         "guided_json_object", "guided_decoding_backend",
                         "guided_whitespace_pattern")


class _ConstraintFields(_Body):
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Any = Field(None, description="Removed (as in vLLM): use structured_outputs.")
    guided_regex: Any = Field(None, description="Removed: use structured_outputs.regex.")
    guided_choice: Any = Field(None, description="Removed: use structured_outputs.choice.")
    guided_grammar: Any = Field(None, description="Removed: use structured_outputs.grammar.")
    guided_json_object: Any = Field(None, description="Removed: use response_format.")
    guided_decoding_backend: Any = Field(None, description="Removed: llguidance is used.")
    guided_whitespace_pattern: Any = Field(None, description="Removed: whitespace is capped.")


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return tool_name(name)


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: FunctionName


class MessageFunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: MessageFunctionCall


# refused with these reasons when a request asks for them (any value but null, false, empty)
UNSUPPORTED_FIELDS: dict[str, str] = {
    "functions": "deprecated by OpenAI and not supported here; send tools",
    "function_call": "deprecated by OpenAI and not supported here; send tool_choice",
    "audio": "this model answers in text only",
    "web_search_options": "this server does not search the web",
    "use_beam_search": "beam search is not implemented",
    "chat_template": "not supported: the model's own chat template is used",
    "chat_template_kwargs": "not supported: the chat template is given the messages and "
                            "tools only",
    "continue_final_message": "not supported: an answer always starts a new assistant turn",
    "documents": "not supported: the chat template is given the messages and tools only",
    "bad_words": "not implemented",
    "allowed_token_ids": "not implemented",
    "logits_processors": "not supported",
}
# fields declared below and accepted, that change nothing here
_IGNORED_DECLARED = ("user",)


def _asked(value: Any) -> bool:
    return value is not None and value is not False and value != "" and value != [] \
        and value != {}


class _SamplingFields(_ConstraintFields):
    """Fields both completion kinds share, named as on the wire."""

    model_config = ConfigDict(extra="allow")  # see ignored_fields and refused

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # OpenAI's: token id (a decimal string, as JSON keys are) -> a bias added to its logit
    logit_bias: dict[str, float] | None = None
    prompt_logprobs: int | None = None  # vLLM's: the prompt's logprobs, with this many top ones

    def sampling_values(self) -> dict[str, Any]:
        """The sampling fields the client set (non-null), under SamplingParams' names."""
        names = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k",
                 "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids",
                 "include_stop_str_in_output", "skip_special_tokens", "stop", "logit_bias",
                 "prompt_logprobs")
        values = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        return values

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def refused(self) -> tuple[str, str] | None:
        """The first field asked for that would change the answer and is not implemented:
        (its name, why), for a 400."""
        extra = self.model_extra or {}
        for name, reason in UNSUPPORTED_FIELDS.items():
            if _asked(extra.get(name)):
                return name, reason
        effort = extra.get("reasoning_effort")
        if _asked(effort) and effort != "none":
            return "reasoning_effort", "this model has no reasoning mode"
        modalities = extra.get("modalities")
        if isinstance(modalities, list) and set(modalities) - {"text"}:
            return "modalities", "this model answers in text only"
        return None

    def ignored_fields(self) -> list[str]:
        """The fields the request set that change nothing here, for the log."""
        names = [n for n in _IGNORED_DECLARED if getattr(self, n) is not None]
        return sorted(names + [n for n in self.model_extra or {} if n not in UNSUPPORTED_FIELDS])


class CompletionRequest(_SamplingFields):
    prompt: (NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1)])
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None  # only best_of == n: ranking n of best_of draws is not done

    def refused(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "not supported: this server does not fill in the middle"
        return super().refused()


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result's call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[ContentPart] | None):
        for index, part in enumerate(content if isinstance(content, list) else ()):
            if part.type != "text":  # OpenAI's words for an image sent to a text model
                raise PydanticCustomError(
                    "invalid_type", "Invalid content type. {kind} is only supported by "
                    "certain models; this one reads text only (content part {index})",
                    {"kind": part.type, "index": index})
        return content


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    echo: bool = False  # vLLM's: the last message echoed in the answer
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def refused(self) -> tuple[str, str] | None:
        if not self.add_generation_prompt:
            return "add_generation_prompt", "only true is supported: an answer always starts " \
                "a new assistant turn"
        if self.echo:
            return "echo", "not supported on chat completions"
        return super().refused()


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
