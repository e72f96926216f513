"""The engine in one thread: input processor -> engine core -> output processor.

What the offline :class:`~pagedserve.llm.LLM` drives, and what tests reach into: the same three
parts as the server's (tokenizing in, the core's step, detokenizing out), called one after the
other in the caller's thread, so a step's stop strings are aborted in the core before the next
step begins. ``scheduler``, ``kv``, ``runner`` and ``grammars`` are the core's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pagedserve.config import EngineConfig
from pagedserve.engine.core import EngineCore
from pagedserve.engine.input_processor import InputProcessor
from pagedserve.engine.messages import EngineCoreRequest, EngineStats, StepStats
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.loader import LoadedModel

logger = logging.getLogger(__name__)

GRAMMAR_WAIT_S = 0.02  # an engine with nothing to run but compiling grammars naps this long


class EngineObserver:
    """Hooks called after each step; override what you need."""

    def on_step(self, stats: StepStats) -> None:
        pass

    def on_output(self, output: RequestOutput) -> None:
        pass


def notify(observers: list[EngineObserver], stats: StepStats | None,
           outputs: list[RequestOutput]) -> None:
    """Observers see every step and output; one that raises is logged, never fatal."""
    for observer in observers:
        try:
            if stats is not None:
                observer.on_step(stats)
            for out in outputs:
                observer.on_output(out)
        except Exception:  # noqa: BLE001 - metrics must not take the engine down
            logger.exception("engine observer %r failed", observer)


class Engine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.info = core.info()
        self.inputs = InputProcessor(self.info)
        self.outputs = OutputProcessor(core.tokenizer)
        self.observers: list[EngineObserver] = []

    @classmethod
    def from_model(
        cls,
        model: str | Path | LoadedModel,
        config: EngineConfig | None = None,
        model_name: str | None = None,
        load_format: str = "auto",
        progress: bool = False,
        consume_weights: bool | None = None,
    ) -> Engine:
        return cls(EngineCore.from_model(model, config, model_name, load_format, progress,
                                         consume_weights))

    # -- what the core knows -------------------------------------------------------------------
    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def model_config(self):
        return self.core.model_config

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def model_info(self):
        return self.core.model_info

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def max_prompt_chars(self) -> int:
        return self.core.max_prompt_chars

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def kv(self):
        return self.core.kv

    @property
    def runner(self):
        return self.core.runner

    @property
    def grammars(self):
        return self.core.grammars

    # -- requests ------------------------------------------------------------------------------
    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> EngineCoreRequest:
        """Validate and tokenize without touching engine state (safe from another thread)."""
        return self.inputs.make_request(prompt, params, request_id, arrival_time)

    def add(self, request: EngineCoreRequest) -> str:
        """Queue a request made by :meth:`make_request`; nothing is registered if this raises."""
        self.core.add_request(request)
        self.outputs.add_request(request)
        return request.request_id

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Make and queue a request; a constraint that does not compile raises ValueError here
        (it waits for the compilation)."""
        request = self.make_request(prompt, params, request_id)
        constraint = request.params.constraint
        grammar = None
        if constraint is not None:
            grammar = self.core.grammar_for(constraint)
            grammar.wait()
        self.core.add_request(request, grammar)
        self.outputs.add_request(request)
        return request.request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output, if it was live."""
        self.core.abort_requests([request_id])
        out = self.outputs.abort(request_id)
        if out is not None:
            notify(self.observers, None, [out])
        return out

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if not self.core.has_runnable_requests() and self.core.has_unfinished_requests():
            self.core.wait_for_grammars(GRAMMAR_WAIT_S)
        core_outputs = self.core.step()
        processed = self.outputs.process(core_outputs)
        if processed.to_abort:  # stop strings: their blocks are freed before the next step
            self.core.abort_requests(processed.to_abort)
        notify(self.observers, core_outputs.step, processed.outputs)
        return processed.outputs

    # -- introspection -------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return self.core.stats()

    def check_integrity(self) -> None:
        self.core.check_integrity()
        assert self.outputs.request_ids() == self.core.request_ids(), \
            "front end and core disagree on live requests"

