"""The engine, in three parts and two places.

    front end     InputProcessor    prompt -> token ids, checked against the model
                  OutputProcessor   token ids -> text deltas, stop strings, logprobs
    engine core   EngineCore        scheduler + KV cache + model runner: one step at a time

Offline (:class:`Engine`, under :class:`pagedserve.LLM`) the three run in one thread. The
server's front end (:class:`AsyncEngine`) reaches its core through a client: in a process of
its own (``serve``: :mod:`core_process`, msgpack over ZeroMQ) or in a thread (tests).
"""

from pagedserve.engine.core import MAX_FAILED_STEPS
from pagedserve.engine.llm_engine import Engine, EngineObserver
from pagedserve.engine.messages import EngineStats, StepStats
from pagedserve.errors import (
    ContextLengthError,
    EngineDeadError,
    EngineStepError,
    PromptTooLongError,
)

__all__ = [
    "MAX_FAILED_STEPS",
    "ContextLengthError",
    "Engine",
    "EngineDeadError",
    "EngineObserver",
    "EngineStats",
    "EngineStepError",
    "PromptTooLongError",
    "StepStats",
]
