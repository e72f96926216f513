"""Structured outputs: a request's answer constrained by a grammar, inside the engine's batch.

How a constrained request goes through the engine:

    API layer     response_format / structured_outputs / format / tools  ->  Constraint
    make_request  GrammarCompiler.compile(constraint) -> Future (worker thread, cached by
                  constraint); the server awaits it so that a bad schema is a 400 before
                  anything is queued
    add           a request whose grammar is still compiling waits in GrammarWaitingRoom;
                  the others keep stepping
    each step     GrammarBatch fills one token bitmask for the constrained rows (llguidance,
                  on the host), the sampler applies it to the logits on their device
    postprocess   GrammarState.advance consumes the new output tokens; a grammar that cannot
                  go on ends the request with ``stop``

The matcher state is a function of the request's output tokens (``GrammarState`` counts what
it consumed), so preemption by recompute, prefix-cache hits and a step run again after a
failure need nothing: the tokens it has not seen yet are consumed at the next postprocess.
"""

from pagedserve.structured.constraint import Constraint

__all__ = ["Constraint"]
