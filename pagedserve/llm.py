"""The offline API: ``LLM(model).generate(prompts, params)`` and ``LLM.chat(messages)``.

It drives the same :class:`~pagedserve.engine.Engine` as the server, in the caller's thread:
all prompts are submitted at once and batched continuously, like vLLM's offline ``LLM``.
Engine knobs go in as keywords (``LLM(dtype="float32", kv_cache_memory=256 << 20)``); the dtype
is ``"auto"`` by default, as for ``run`` and ``serve``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams

Messages = list[dict[str, Any]]
_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        engine_config: EngineConfig | None = None,
        load_format: str = "auto",
        progress: bool = False,
        **engine_kwargs: Any,
    ):
        from pagedserve.hub.registry import resolve

        if engine_config is None:
            engine_config = EngineConfig(**engine_kwargs)
        elif engine_kwargs:
            engine_config = dataclasses.replace(engine_config, **engine_kwargs)
        if load_format == "dummy" or (isinstance(model, str) and model.startswith("dummy:")):
            path, name, self.model_defaults, self.system = model, str(model), {}, None
        else:
            resolved = resolve(None if model is None else str(model))
            path, name = resolved.path, resolved.name
            self.model_defaults = dict(resolved.sampling_defaults)
            self.system = resolved.system
            engine_config = engine_config.with_model_defaults(self.model_defaults)
        self.engine = Engine.from_model(path, engine_config, model_name=name,
                                        load_format=load_format, progress=progress)
        self.tokenizer = self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """Tokens one sequence may hold: prompt and answer together."""
        return self.engine.max_model_len

    def default_params(self, **overrides: Any) -> SamplingParams:
        """The model's own defaults (Ollama params, generation_config.json) under overrides.

        Like Ollama (and unlike a bare ``SamplingParams``), the answer runs until EOS or the
        end of the context unless a max_tokens is given here or by the model.
        """
        values: dict[str, Any] = {"max_tokens": None}
        values.update({k: v for k, v in self.model_defaults.items() if k in _PARAM_FIELDS})
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**values)

    # -- prompts -------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | list[int] | Sequence[str] | Sequence[list[int]],
        params: SamplingParams | None = None,
    ) -> list[CompletionOutput]:
        """Complete every prompt; with ``params.n > 1``, n results per prompt, prompt-major."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = params or self.default_params()
        results: dict[str, _Accumulator] = {}
        for prompt in prompts:
            for i in range(params.n):
                one = dataclasses.replace(
                    params, n=1, seed=None if params.seed is None else params.seed + i
                )
                request = self.engine.make_request(prompt, one)
                self.engine.add(request)
                results[request.request_id] = _Accumulator(request.request_id, prompt,
                                                            request.prompt_token_ids)
        for out in self._run_until_done(set(results)):
            results[out.request_id].add(out)
        return [acc.result() for acc in results.values()]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None
               ) -> Iterator[RequestOutput]:
        """Deltas of one request as they are produced; closing the iterator aborts it."""
        request_id = self.engine.add_request(prompt, params or self.default_params())
        try:
            yield from self._run_until_done({request_id})
        finally:
            self.engine.abort_request(request_id)

    # -- chat ----------------------------------------------------------------------------
    def render_chat(self, messages: Messages) -> list[int]:
        """The model's chat template applied (with its default system prompt if none given)."""
        if self.tokenizer is None:
            raise ValueError("messages: this model has no tokenizer, so it cannot chat")
        if self.system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system}, *messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        params: SamplingParams | None = None,
    ) -> list[CompletionOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.render_chat(list(c)) for c in conversations], params)

    def stream_chat(self, messages: Messages, params: SamplingParams | None = None
                    ) -> Iterator[RequestOutput]:
        return self.stream(self.render_chat(messages), params)

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)

    def _run_until_done(self, request_ids: set[str]) -> Iterator[RequestOutput]:
        pending = set(request_ids)
        while pending:
            if not self.engine.has_unfinished_requests():
                return
            for out in self.engine.step():
                if out.request_id in pending:
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out


class _Accumulator:
    def __init__(self, request_id: str, prompt: str | list[int], prompt_token_ids: list[int]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.prompt_logprobs: list | None = None
        self.last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.delta_text)
        self.token_ids.extend(out.delta_token_ids)
        if out.delta_logprobs:
            self.logprobs.extend(out.delta_logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.last = out

    def result(self) -> CompletionOutput:
        last = self.last
        assert last is not None and last.finished
        return CompletionOutput(
            request_id=self.request_id,
            prompt=self.prompt if isinstance(self.prompt, str) else None,
            prompt_token_ids=self.prompt_token_ids,
            text="".join(self.text),
            token_ids=self.token_ids,
            finish_reason=last.finish_reason,
            stop_reason=last.stop_reason,
            num_prompt_tokens=last.num_prompt_tokens,
            num_output_tokens=last.num_output_tokens,
            num_cached_tokens=last.num_cached_tokens,
            logprobs=self.logprobs or None,
            metrics=last.metrics,
            prompt_logprobs=self.prompt_logprobs,
        )
