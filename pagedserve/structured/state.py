"""One request's grammar: it waits for compilation, then follows the request's output tokens.

The matcher's state is a function of the output tokens alone: ``num_consumed`` says how many
it has seen, and :meth:`GrammarState.advance` consumes the rest. So whatever happens to the
request's KV cache (preemption by recompute, a prefix-cache hit, a step run again after a
failure), the matcher is never out of step with the tokens the request holds.

Each step's mask is timed (bitmask.py reports it to :meth:`GrammarState.after_mask`). A mask
over the compiled grammar's budget, or a matcher that gave up on a limit of llguidance's,
ends the request at the next :meth:`~GrammarState.advance` with a :class:`GrammarStepError`
naming the constraint's field: the engine fails that request (``finish_reason: "error"``)
and the other streams go on.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TYPE_CHECKING, Any

from pagedserve.structured.compiler import CompiledGrammar, GrammarError, short_reason
from pagedserve.structured.constraint import Constraint

if TYPE_CHECKING:
    from pagedserve.core.request import Request


class GrammarViolation(RuntimeError):
    """A sampled token the grammar does not accept (the mask should have made it impossible)."""


class GrammarStepError(RuntimeError):
    """The grammar's mask went over its time budget, or llguidance gave up on a limit."""


class GrammarState:
    def __init__(self, constraint: Constraint, compiled: Future[CompiledGrammar],
                 vocab_size: int) -> None:
        self.constraint = constraint
        self.compiled = compiled
        self.vocab_size = vocab_size  # bitmask width in tokens
        self.matcher: Any = None  # set by start()
        self.mask_seconds = 0.0  # the budget of one mask, set by start()
        self.num_consumed = 0
        self.failure: str | None = None  # why the next advance() ends the request
        # its last mask was computed with others in parallel, and that took too long: the
        # next one is computed alone, so that the slow row is known
        self.suspect = False

    @property
    def ready(self) -> bool:
        """Compilation has ended (well or not): :meth:`start` will not block."""
        return self.compiled.done()

    def wait(self, timeout: float | None = None) -> None:
        """Block until compiled; raises ValueError naming the field if it does not compile."""
        self._result(timeout)

    def start(self) -> None:
        """Take a fresh matcher from the compiled grammar (raises ValueError if it failed,
        :class:`~pagedserve.structured.compiler.GrammarBusy` if it could not start)."""
        if self.matcher is None:
            compiled = self._result(None)
            self.matcher = compiled.new_matcher()
            self.mask_seconds = compiled.mask_seconds

    def after_mask(self, seconds: float, shared: bool) -> None:
        """This step's mask is computed: in ``seconds``, alone or ``shared`` with other rows
        computed in parallel (whose time it cannot tell apart from its own)."""
        if self.matcher.is_error():
            self.failure = short_reason(self.matcher.get_error())
        elif seconds <= self.mask_seconds:
            if not shared:
                self.suspect = False
        elif shared:
            self.suspect = True
        else:
            self.failure = (f"computing one token's mask took {seconds * 1e3:.0f} ms, over "
                            f"the budget of {self.mask_seconds * 1e3:.0f} ms (pagedserve serve "
                            "--grammar-mask-budget)")

    def advance(self, output_token_ids: list[int]) -> None:
        """Consume the output tokens the matcher has not seen yet."""
        field = self.constraint.field
        if self.failure is not None:
            raise GrammarStepError(f"{field}: {self.failure}")
        for token in output_token_ids[self.num_consumed:]:
            if not self.matcher.consume_token(token):
                raise GrammarViolation(f"{field}: token {token} breaks the "
                                       f"{self.constraint.kind} constraint "
                                       f"({short_reason(self.matcher.get_error())})")
            self.num_consumed += 1

    @property
    def finished(self) -> bool:
        """The grammar admits no more text: the answer is complete."""
        return self.matcher is not None and self.matcher.is_stopped()

    def _result(self, timeout: float | None) -> CompiledGrammar:
        try:
            return self.compiled.result(timeout)
        except GrammarError as exc:
            raise ValueError(f"{self.constraint.field}: {exc.detail}") from None


class GrammarWaitingRoom:
    """Requests whose grammar is still compiling. They join the scheduler once it is done, so
    a slow compilation delays its own request only."""

    def __init__(self) -> None:
        self._requests: dict[str, Request] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def ids(self) -> set[str]:
        return set(self._requests)

    def requests(self) -> list[Request]:
        return list(self._requests.values())

    def add(self, request: Request) -> None:
        self._requests[request.request_id] = request

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def pop_compiled(self) -> list[Request]:
        """The requests whose compilation has ended, in arrival order, out of the room."""
        done = [r for r in self._requests.values() if r.grammar.ready]
        for r in done:
            del self._requests[r.request_id]
        return done

    def wait(self, timeout: float) -> None:
        """Block until one compilation ends or ``timeout`` seconds pass (an idle engine)."""
        if self._requests:
            wait([r.grammar.compiled for r in self._requests.values()], timeout,
                 return_when=FIRST_COMPLETED)
