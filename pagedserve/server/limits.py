"""The limits that keep one client from hurting the others (``pagedserve serve --max-*``).

    max_request_body  413 for a larger body (app.py's middleware): Content-Length is checked
                      before reading, a chunked body as it arrives, so memory never holds more
    max_json_depth    400 for JSON nested deeper (request_body.py)
    max_n             400 when one call would start more engine requests (n x prompts)
    max_embedding_inputs  400 when one embedding call brings more inputs (texts or token lists)
    max_queue         503 + Retry-After when more requests would have to wait for a seat

Limits that depend on the model (prompt length in tokens and characters, token ids against the
vocabulary) are the engine's; ranges of sampling values are SamplingParams'.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 8 << 20  # room for a 128k-token prompt several times over
DEFAULT_MAX_JSON_DEPTH = 64
DEFAULT_MAX_N = 128  # OpenAI's own bound on n
DEFAULT_MAX_QUEUE = 512  # Ollama's OLLAMA_MAX_QUEUE
DEFAULT_MAX_EMBEDDING_INPUTS = 2048  # OpenAI's bound on one embeddings call's input array
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0  # how long a SIGTERM lets requests in flight finish


@dataclass(slots=True)
class ServerLimits:
    max_request_body: int = DEFAULT_MAX_BODY_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_n: int = DEFAULT_MAX_N
    max_queue: int | None = DEFAULT_MAX_QUEUE  # None: no limit
    max_embedding_inputs: int = DEFAULT_MAX_EMBEDDING_INPUTS

    def __post_init__(self) -> None:
        for name in ("max_request_body", "max_json_depth", "max_n", "max_embedding_inputs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
