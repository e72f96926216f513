"""Run an engine until its requests finish and collect each one's answer (tests' helper)."""

from __future__ import annotations


def drain(engine, ids: list[str]) -> list[dict]:
    """Step ``engine`` until nothing is left, checking its integrity after every step; one
    record per id: text, tokens, finish reason, stop reason and error. Every block is free after."""
    res = {i: {"text": "", "tokens": [], "reason": None, "stop": None, "error": None}
           for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            r = res[out.request_id]
            r["text"] += out.delta_text
            r["tokens"] += out.delta_token_ids
            if out.finished:
                r["reason"], r["stop"], r["error"] = out.finish_reason, out.stop_reason, out.error
        engine.check_integrity()
    assert engine.kv.all_free()
    return [res[i] for i in ids]
