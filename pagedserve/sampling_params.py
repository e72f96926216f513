"""What a caller asks of one generation: the knobs of the OpenAI and Ollama APIs, validated once.

Every field is checked in ``__post_init__``; a bad value raises :class:`ValueError` whose message
starts with the field's name, so that the HTTP layers can answer 400 naming the field. Every
number has a range: integers fit the 64-bit tensors they end up in (a seed may be any unsigned
64-bit value too), floats are finite, and the lists a request brings (stop strings, stop token
ids, logit biases) are bounded, since each costs work on every step. What depends on the model (token ids
against the vocabulary, lengths against the context) is checked by the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pagedserve.structured.constraint import Constraint

MAX_LOGPROBS = 20
MAX_INT = 2**63 - 1  # int64, what every count and id becomes in a tensor
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1  # a seed may be signed or unsigned 64-bit
MAX_STOP_STRINGS = 16  # each is searched for in the text of every step
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300  # entries, OpenAI's limit
MAX_BIAS = 100.0  # a bias is in [-MAX_BIAS, MAX_BIAS], as OpenAI's


@dataclass(frozen=True, slots=True)
class Range:
    """The values one number may take: bounds are inclusive unless ``low_open``; None is none.

    The same table checks values (``SamplingParams.__post_init__``) and documents them (the
    OpenAPI document's minimum and maximum), so each rule lives once.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    integer: bool = False

    def check(self, name: str, value: object) -> None:
        if self.integer:
            _check_int(name, value)
        else:
            _check_number(name, value)
        too_low = self.low is not None and (value <= self.low if self.low_open
                                            else value < self.low)
        too_high = self.high is not None and value > self.high
        if not (too_low or too_high):
            return
        if self.low is not None and self.high is not None and self.high < MAX_INT:
            opening = "(" if self.low_open else "["
            rule = f"in {opening}{_num(self.low)}, {_num(self.high)}]"
        elif too_low:
            rule = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            rule = f"<= {_num(self.high)}"
        raise ValueError(f"{name} must be {rule}, got {_short(value)}")

    def json_schema(self) -> dict[str, float]:
        bounds: dict[str, float] = {}
        if self.low is not None:
            bounds["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high is not None:
            bounds["maximum"] = self.high
        return bounds


# SamplingParams field -> its range (for a list field: the range of each item)
RANGES: dict[str, Range] = {
    "n": Range(1, MAX_INT, integer=True),
    "temperature": Range(0),
    "top_p": Range(0, 1, low_open=True),
    "top_k": Range(-1, MAX_INT, integer=True),  # 0 and -1: no limit
    "min_p": Range(0, 1),
    "repetition_penalty": Range(0, low_open=True),
    "presence_penalty": Range(-2, 2),
    "frequency_penalty": Range(-2, 2),
    "seed": Range(MIN_SEED, MAX_SEED, integer=True),
    "max_tokens": Range(0, MAX_INT, integer=True),  # 0: the prompt's prefill only
    "min_tokens": Range(0, MAX_INT, integer=True),
    "logprobs": Range(0, MAX_LOGPROBS, integer=True),
    "prompt_logprobs": Range(0, MAX_LOGPROBS, integer=True),
    "stop_token_ids": Range(0, MAX_INT, integer=True),
    "repeat_last_n": Range(0, MAX_INT, integer=True),
}
# list field -> (most items, longest string item)
LIST_LIMITS: dict[str, tuple[int, int | None]] = {
    "stop": (MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS),
    "stop_token_ids": (MAX_STOP_TOKEN_IDS, None),
}


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Penalty window: None: repetition over prompt + output, presence/frequency over the output
    # (vLLM, OpenAI); N > 0: all three over the last N tokens of prompt + output (llama.cpp's
    # penalty_last_n, Ollama's repeat_last_n); 0: no penalties.
    repeat_last_n: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    # None: until the context is full; 0: no answer, the prompt is only computed (for
    # prompt_logprobs); the request ends with finish_reason "length"
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives per sampled token
    # the prompt's own logprobs (vLLM's name): None: not wanted; k: each prompt token's logprob
    # and its k most likely alternatives (the first token, predicted by nothing, has none)
    prompt_logprobs: int | None = None
    # token id -> a bias added to its logit before sampling (OpenAI's logit_bias); logprobs
    # stay those of the raw distribution
    logit_bias: dict[int, float] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # the answer must match it (JSON schema, regex, choice, grammar): structured outputs
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(f"constraint must be a Constraint, got {self.constraint!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        for name, (most, _) in LIST_LIMITS.items():
            items = getattr(self, name)
            if len(items) > most:
                raise ValueError(f"{name} must hold at most {most} items, got {len(items)}")
        for name, allowed in RANGES.items():
            value = getattr(self, name)
            for item in value if isinstance(value, list) else (value,):
                if item is not None:
                    allowed.check(name, item)
        if self.top_k == -1:
            self.top_k = 0
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got {self.min_tokens} > {self.max_tokens}"
            )
        longest = LIST_LIMITS["stop"][1]
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
            if len(s) > longest:
                raise ValueError(f"stop strings must be at most {longest} characters, got one "
                                 f"of {len(s)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _logit_bias(bias: object) -> dict[int, float] | None:
    """``logit_bias`` as {token id: bias}: keys are token ids, as integers or as the decimal
    strings JSON gives them; values are finite numbers in [-MAX_BIAS, MAX_BIAS]."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to biases, got {_short(bias)}")
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias must hold at most {MAX_LOGIT_BIAS} items, got {len(bias)}")
    checked: dict[int, float] = {}
    for key, value in bias.items():
        digits = isinstance(key, str) and 0 < len(key) <= 19 and key.isascii() and key.isdigit()
        token = int(key) if digits else key
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= MAX_INT:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got "
                             f"{_short(key)}")
        Range(-MAX_BIAS, MAX_BIAS).check(f"logit_bias[{token}]", value)
        checked[token] = float(value)
    return checked or None


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {_short(value)}")


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {_short(value)}")


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _short(value: object, limit: int = 40) -> str:
    """A value for an error message, cut so that a megabyte of digits stays out of it."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
