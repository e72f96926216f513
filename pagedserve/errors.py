"""The engine's own errors: a request that cannot fit, an engine that cannot go on."""

from __future__ import annotations


class ContextLengthError(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context."""

    def __init__(self, max_model_len: int, num_prompt_tokens: int, max_tokens: int):
        self.max_model_len = max_model_len
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        total = num_prompt_tokens + max_tokens
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens, your request has "
            f"{num_prompt_tokens} input tokens. However, you requested {total} tokens "
            f"({num_prompt_tokens} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion."
        )


class PromptTooLongError(ContextLengthError):
    """A prompt text too long to fit the context, turned away before it is tokenized.

    Every character is covered by some token and no token covers more than the vocabulary's
    longest entry, so past ``max_chars`` characters no tokenization can fit ``max_model_len``.
    """

    def __init__(self, max_model_len: int, num_chars: int, max_chars: int):
        ValueError.__init__(
            self,
            f"This model's maximum context length is {max_model_len} tokens; your prompt of "
            f"{num_chars} characters is longer than {max_chars} characters, more than that "
            "many tokens can hold. Please reduce the length of the prompt.",
        )
        self.max_model_len = max_model_len
        self.num_chars = num_chars
        self.max_chars = max_chars


class EngineStepError(RuntimeError):
    """Steps keep failing for every request they hold: the engine cannot go on."""


class EngineDeadError(RuntimeError):
    """The engine core has failed (or its process is gone); the request cannot complete."""


class EngineBusyError(RuntimeError):
    """The core could not take a request in now (e.g. no grammar compile thread was free in
    time); the request may well be fine: retry."""


class TensorParallelError(EngineStepError):
    """A tensor-parallel rank is gone or a collective failed: not one request's fault, so the
    core does not run requests alone to find the bad one; it stops, failing them all."""
