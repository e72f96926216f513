"""The limits that keep one client from hurting the others (``pagedserve serve --max-*``).

    max_request_body  413 for a larger body (app.py's middleware): Content-Length is checked
                      before reading, a chunked body as it arrives, so memory never holds more
    max_json_depth    400 for JSON nested deeper (request_body.py)
    max_n             400 when one call would start more engine requests (n x prompts)
    max_embedding_inputs  400 when one embedding call brings more inputs (texts or token lists)
    max_queue         503 + Retry-After when more requests would have to wait for a seat

Per connection (connection_guard.py, around uvicorn's HTTP protocol):

    timeout_request_read  close a connection whose request headers do not all arrive within
                          this long, or whose body not within this long after the headers,
    min_upload_rate       plus a second per this many bytes of it received
    timeout_keep_alive    close a connection idle this long between requests (uvicorn's)
    limit_concurrency     503 + Retry-After while more connections are open or requests run

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
DEFAULT_TIMEOUT_REQUEST_READ_S = 20.0
DEFAULT_MIN_UPLOAD_RATE = 16 << 10  # bytes/s: 128 kbit/s; an 8 MiB body may take 9 minutes
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 5.0  # uvicorn's
DEFAULT_LIMIT_CONCURRENCY = 1000  # under the usual 1024 open files, so the 503 comes first


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


@dataclass(slots=True)
class ConnectionLimits:
    """``pagedserve serve --timeout-request-read/--min-upload-rate/--timeout-keep-alive/
    --limit-concurrency``; ``limit_concurrency`` None: no limit."""

    timeout_request_read: float = DEFAULT_TIMEOUT_REQUEST_READ_S
    min_upload_rate: int = DEFAULT_MIN_UPLOAD_RATE
    timeout_keep_alive: float = DEFAULT_TIMEOUT_KEEP_ALIVE_S
    limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY

    def __post_init__(self) -> None:
        for name in ("timeout_request_read", "timeout_keep_alive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if isinstance(self.min_upload_rate, bool) or not self.min_upload_rate >= 1:
            raise ValueError(f"min_upload_rate must be >= 1 byte per second, got "
                             f"{self.min_upload_rate}")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError(f"limit_concurrency must be >= 1, got {self.limit_concurrency}")
