"""What a benchmark measures and writes: one request's timings, one level's summary, one run.

A run is a sweep over load levels (concurrency values, optionally with a Poisson request rate)
against one server. Its JSON file holds the run's metadata and one object per level; latencies
are stored in milliseconds, throughputs per second.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pagedserve.bench.stats import Distribution, summarize, throughput, time_per_output_token

MS = 1000.0
MAX_ERRORS_KEPT = 5


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it; times in seconds (time.perf_counter)."""

    success: bool = False
    start: float = 0.0
    ttft: float | None = None  # send -> first chunk carrying output text
    itl: list[float] = field(default_factory=list)  # gaps between output chunks
    e2e: float | None = None  # send -> last chunk carrying output text (not the done message)
    prompt_tokens: int | None = None  # as the server reported it
    output_tokens: int = 0  # from usage when reported, else chunks with text
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.success or self.e2e is None or self.ttft is None:
            return None
        return time_per_output_token(self.e2e, self.ttft, self.output_tokens)


@dataclass(slots=True)
class KVSnapshot:
    """The server's KV-cache gauges, sampled while a level ran (None: not exported)."""

    samples: int = 0
    usage_perc_max: float | None = None  # fraction of the KV pool in use, 0..1
    waste_perc: float | None = None  # share of reserved slots unused, 0..1, while requests ran
    waste_perc_max: float | None = None
    reserved_tokens_max: float | None = None
    used_tokens_max: float | None = None


@dataclass(slots=True)
class LevelResult:
    """One load level's summary; latency distributions in milliseconds."""

    concurrency: int
    request_rate: float | None  # requests/s of the Poisson arrivals; None: closed loop
    num_prompts: int
    successful: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float  # output tokens/s over the level's wall time
    total_input_tokens: int
    total_output_tokens: int
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    kv: KVSnapshot = field(default_factory=KVSnapshot)
    load_average: float | None = None  # the machine's 1-minute load when the level started
    errors: list[str] = field(default_factory=list)

    @classmethod
    def from_records(
        cls,
        records: list[RequestRecord],
        *,
        concurrency: int,
        duration_s: float,
        request_rate: float | None = None,
        kv: KVSnapshot | None = None,
        load_average: float | None = None,
    ) -> LevelResult:
        ok = [r for r in records if r.success]
        output_tokens = sum(r.output_tokens for r in ok)
        errors = [r.error for r in records if not r.success and r.error][:MAX_ERRORS_KEPT]
        return cls(
            concurrency=concurrency,
            request_rate=request_rate,
            num_prompts=len(records),
            successful=len(ok),
            failed=len(records) - len(ok),
            duration_s=duration_s,
            request_throughput=throughput(len(ok), duration_s),
            output_throughput=throughput(output_tokens, duration_s),
            total_input_tokens=sum(r.prompt_tokens or 0 for r in ok),
            total_output_tokens=output_tokens,
            ttft_ms=summarize([r.ttft for r in ok if r.ttft is not None]).scaled(MS),
            tpot_ms=summarize([t for r in ok if (t := r.tpot) is not None]).scaled(MS),
            itl_ms=summarize([gap for r in ok for gap in r.itl]).scaled(MS),
            e2e_ms=summarize([r.e2e for r in ok if r.e2e is not None]).scaled(MS),
            kv=kv or KVSnapshot(),
            load_average=load_average,
            errors=errors,
        )

    @classmethod
    def from_dict(cls, data: dict) -> LevelResult:
        data = dict(data)
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            data[name] = Distribution(**{k: _nan(v) for k, v in data[name].items()})
        data["kv"] = KVSnapshot(**data.get("kv", {}))
        return cls(**data)

    def to_dict(self) -> dict:
        data = asdict(self)
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            data[name] = {k: _none(v) for k, v in getattr(self, name)._asdict().items()}
        return data


@dataclass(slots=True)
class RunResult:
    """A sweep against one server: what was asked, where it ran, and one result per level."""

    label: str
    url: str
    api: str
    model: str
    input_len: int
    output_len: int
    seed: int
    shared_prefix_len: int = 0
    created: str = ""  # ISO 8601, UTC
    machine: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)  # how the server was started, when we started it
    levels: list[LevelResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["levels"] = [level.to_dict() for level in self.levels]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RunResult:
        data = dict(data)
        data["levels"] = [LevelResult.from_dict(level) for level in data.get("levels", [])]
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def level(self, concurrency: int) -> LevelResult | None:
        return next((lv for lv in self.levels if lv.concurrency == concurrency), None)


def _none(value: float) -> float | None:
    """JSON has no NaN: an undefined statistic is written as null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _nan(value: float | None) -> float:
    return math.nan if value is None else value
