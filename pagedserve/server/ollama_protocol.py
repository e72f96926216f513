"""The Ollama API's request bodies, as pydantic models.

Only types are checked here; ranges are SamplingParams' business. Options Ollama has and we do
not use (``num_gpu``, ``mirostat``, ...) are accepted and ignored, as Ollama ignores options a
model does not use, and so are fields that change nothing here (``keep_alive``, unknown
ones): ``ignored_fields`` names them for the log. Fields that would change the answer and are
not implemented (``think``, ``images``, ``suffix``, ``template``, ``context``) are refused by
the routes, in Ollama's words where Ollama has some.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from pagedserve.server.openai_protocol import tool_name

# Ollama option -> SamplingParams field
OPTION_FIELDS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "num_predict": "max_tokens",
    "stop": "stop",
    "seed": "seed",
    "repeat_penalty": "repetition_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    # pagedserve's extras, so that a load generator can fix the output length
    "ignore_eos": "ignore_eos",
    "min_tokens": "min_tokens",
}
# SamplingParams field -> Ollama option, to name the client's field in error messages
FIELD_OPTIONS = {v: k for k, v in OPTION_FIELDS.items()} | {"logprobs": "top_logprobs"}

# Ollama's own defaults where they differ from SamplingParams' (llama.cpp's sampler settings)
OLLAMA_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.9,
                                   "max_tokens": None,
                                   "repetition_penalty": 1.1, "repeat_last_n": 64}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    num_predict: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None

    def sampling_values(self) -> dict[str, Any]:
        """The options that were set, under SamplingParams' names."""
        values = {}
        for option, name in OPTION_FIELDS.items():
            value = getattr(self, option)
            if value is None:
                continue
            # 0 and -1: no limit (Ollama's runner limits only a positive num_predict), -2: fill
            # the context
            if option == "num_predict" and value <= 0:
                value = None
            if option == "repeat_last_n" and value == -1:  # the whole context
                value = None
            if option == "seed" and value == -1:  # llama.cpp's "random seed"
                continue
            values[name] = value
        return values


class _GenerationBody(_Body):
    model_config = ConfigDict(extra="allow")  # see ignored_fields

    model: str | None = None
    stream: bool = True
    options: Options | None = None
    format: Literal["", "json"] | dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    think: bool | str | None = None  # true or a level: refused (no model here thinks)

    def sampling_values(self) -> dict[str, Any]:
        values = self.options.sampling_values() if self.options else {}
        if self.logprobs:
            values["logprobs"] = self.top_logprobs or 0
        return values

    def ignored_fields(self) -> list[str]:
        """The fields and options the request set that change nothing here, for the log."""
        names = [n for n in _IGNORED_DECLARED if getattr(self, n, None) is not None]
        names += (self.model_extra or {}).keys()
        if self.options is not None:
            names += [f"options.{n}" for n in _IGNORED_OPTIONS
                      if getattr(self.options, n) is not None]
            names += [f"options.{n}" for n in self.options.model_extra or {}]
        return sorted(names)


_IGNORED_DECLARED = ("keep_alive",)  # the model stays loaded
_IGNORED_OPTIONS = ("num_ctx",)  # the context is fixed at startup


class GenerateRequest(_GenerationBody):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return tool_name(name)


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: ToolFunction


class CallFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arguments: dict[str, Any] = {}


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    function: CallFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_name: str | None = None  # a tool result's function


class ChatRequest(_GenerationBody):
    messages: list[Message] | None = None
    tools: list[ToolSpec] | None = None


class ShowRequest(_Body):
    model: str | None = None
    name: str | None = None  # the field's old name, still sent by older clients
    verbose: bool = False


class PullRequest(_Body):
    model: str | None = None
    name: str | None = None  # the field's old name, still sent by older clients
    insecure: bool = False  # reach the registry over http
    stream: bool = True


class DeleteRequest(_Body):
    model: str | None = None
    name: str | None = None


class CopyRequest(_Body):
    source: str | None = None
    destination: str | None = None
