"""A real Prometheus over recorded scrapes, for the deploy tests: Debian's `prometheus` and
`promtool` (package `prometheus`), started on 127.0.0.1 and asked over its HTTP API.

The scrapes are backfilled (`promtool tsdb create-blocks-from openmetrics`) rather than served
to a Prometheus that scrapes them: a backfilled block holds each sample at the time it was
recorded, to the millisecond, so Prometheus and the in-repo evaluator read the same points and
a query at a given time has one answer. A live scrape would stamp samples with Prometheus' own
clock and interval, and the test would wait out scrape intervals and race them.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs, __name__ included
OPT_OUT = "PAGEDSERVE_SKIP_PROMETHEUS"
READY_TIMEOUT_S = 30.0

log = logging.getLogger(__name__)


def binaries() -> tuple[str, str]:
    """The paths of `prometheus` and `promtool`. Missing, the test fails: CI installs them
    (.ci/run), and a developer without them opts out with PAGEDSERVE_SKIP_PROMETHEUS=1."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if None not in found:
        return found
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(f"{OPT_OUT}=1: the queries are not checked against a real Prometheus")
    pytest.fail("`prometheus` and `promtool` are not on PATH: `apt-get install prometheus` "
                f"(Debian's package, as .ci/run does), or set {OPT_OUT}=1 to skip these tests")


def millis(t: float) -> int:
    """A scrape's time as Prometheus stores it: whole milliseconds."""
    return round(t * 1000)


def openmetrics(scrapes: Iterable[tuple[float, dict[Labels, float]]]) -> str:
    """The scrapes as one OpenMetrics text with timestamps, each series' samples in time
    order (the backfill drops a sample older than its series' last one). No TYPE lines: the
    TSDB stores no types, and each sample keeps the name it was exposed under."""
    series: dict[Labels, list[tuple[int, float]]] = defaultdict(list)
    for t, samples in scrapes:
        for labels, value in samples.items():
            series[labels].append((millis(t), value))
    lines = []
    for labels, points in sorted(series.items()):
        d = dict(labels)
        name = d.pop("__name__")
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(d.items()))
        for ms, value in sorted(points):
            # The parser reads seconds as a float and truncates seconds * 1000: half a
            # millisecond more lands it on `ms` whatever the float's rounding.
            lines.append(f"{name}{{{text}}} {_number(value)} {(ms + 0.5) / 1000:.4f}")
    return "\n".join(lines) + "\n# EOF\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """`prometheus` serving a TSDB backfilled from scrapes; a context manager that stops it."""

    def __init__(self, scrapes: list[tuple[float, dict[Labels, float]]], workdir: Path):
        self.prometheus, self.promtool = binaries()
        self.workdir = workdir
        self.scrapes = scrapes
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.client: httpx.Client | None = None

    def __enter__(self) -> Prometheus:
        data = self.workdir / "data"
        source = self.workdir / "scrapes.om"
        source.write_text(openmetrics(self.scrapes))
        backfill = subprocess.run(
            [self.promtool, "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)],
            capture_output=True, text=True, timeout=120)
        if backfill.returncode != 0:
            raise RuntimeError(f"promtool backfill failed: {backfill.stderr or backfill.stdout}")
        config = self.workdir / "prometheus.yml"
        config.write_text("scrape_configs: []\n")
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log_path = self.workdir / "prometheus.log"
        with self.log_path.open("w") as log_file:
            self.process = subprocess.Popen(
                [self.prometheus, f"--config.file={config}", f"--storage.tsdb.path={data}",
                 f"--web.listen-address={self.url.removeprefix('http://')}",
                 "--storage.tsdb.retention.time=100y", "--log.level=warn"],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.client = httpx.Client(base_url=self.url, timeout=30)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.process.returncode}): "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready in {READY_TIMEOUT_S:.0f} s: "
                                   f"{self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def query(self, expr: str, t: float) -> dict[Labels, float] | float:
        """An instant query at ``t`` (seconds): {labels: value} for a vector, a float for a
        scalar, in the in-repo evaluator's shapes. A query Prometheus refuses raises
        ValueError with its error."""
        response = self.client.get("/api/v1/query",
                                   params={"query": expr, "time": f"{millis(t) / 1000:.3f}"})
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"query: {expr!r}: {body.get('errorType')}: {body.get('error')}")
        for warning in body.get("warnings", []):
            log.warning("%s: %s", expr, warning)
        data = body["data"]
        if data["resultType"] == "scalar":
            return float(data["value"][1])
        if data["resultType"] != "vector":
            raise ValueError(f"query: {expr!r} gives a {data['resultType']}, not a vector")
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in data["result"]}

    def label_values(self, label: str, metric: str) -> set[str]:
        """What Grafana's ``label_values(metric, label)`` lists."""
        body = self.client.get(f"/api/v1/label/{label}/values",
                               params={"match[]": metric}).json()
        if body.get("status") != "success":
            raise ValueError(f"label_values({metric}, {label}): {body.get('error')}")
        return set(body["data"])
