"""Draw the Grafana dashboard as a picture, filled with series measured on a real server.

    python deploy/grafana/render_dashboard.py                 # bundled model -> docs/dashboard.png
    python deploy/grafana/render_dashboard.py MODEL --out x.png --serve-args "--max-num-seqs 4"

Starts `pagedserve serve`, scrapes its /metrics every SCRAPE_S seconds while a load generator
walks through phases (light load, a queue, a burst with clients that go away, bad requests,
idle), then evaluates every panel's PromQL from pagedserve-dashboard.json over those scrapes
(promql_eval.py, Prometheus's semantics for the functions the dashboard uses) and draws the
panels where their gridPos puts them. Nothing in the picture is made up: a panel with no
data stays empty.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import re
import shlex
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import promql_eval  # noqa: E402

log = logging.getLogger("render_dashboard")
SCRAPE_S = 2.0
RATE_INTERVAL = "20s"  # what Grafana's $__rate_interval is for a 5 s scrape at this zoom

SYSTEM = ("You are a helpful assistant who answers in short sentences. Be precise and friendly, "
          "and explain the reasoning in one or two lines at most.")
QUESTIONS = ["Why is the sky blue?", "What is a KV cache?", "Name three prime numbers.",
             "How do bees make honey?", "What is paged attention?", "Why do cats purr?",
             "What is the capital of France?", "Explain rain to a child.",
             "What does a compiler do?", "How far is the moon?"]

# (seconds, concurrent clients, share of clients that disconnect early, bad requests per second)
PHASES = [(30, 2, 0.0, 0.0), (50, 8, 0.0, 0.0), (40, 14, 0.25, 0.3), (25, 3, 0.0, 0.0),
          (15, 0, 0.0, 0.0)]


class Scraper(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.scrapes, self.stop = url, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                now = time.time()
                try:
                    text = client.get(f"{self.url}/metrics").text
                    self.scrapes.append((now, promql_eval.parse_scrape(text)))
                except httpx.HTTPError as exc:
                    log.warning("scrape failed: %s", exc)
                self.stop.wait(max(0.0, SCRAPE_S - (time.time() - now)))


async def _client(http: httpx.AsyncClient, model: str, until: float, abort_share: float,
                  rng: random.Random) -> None:
    while time.time() < until:
        body = {"model": model, "stream": True, "temperature": 0.8,
                "max_tokens": rng.choice([16, 32, 64, 96]),
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": rng.choice(QUESTIONS)}]}
        if rng.random() < 0.3:
            body["stop"] = ["."]  # ends at the first sentence: finish_reason stop
        leave_after = rng.randint(2, 6) if rng.random() < abort_share else None
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                chunks = 0
                async for _ in response.aiter_lines():
                    chunks += 1
                    if leave_after is not None and chunks >= leave_after:
                        break  # the client goes away: the server aborts the request
        except httpx.HTTPError as exc:
            log.debug("request failed: %s", exc)


async def _bad_requests(http: httpx.AsyncClient, model: str, until: float, rate: float) -> None:
    while rate and time.time() < until:
        await http.post("/v1/chat/completions", json={"model": model, "temperature": -1,
                                                      "messages": []})
        await http.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"})
        await asyncio.sleep(1 / rate)


async def drive(url: str, model: str, seed: int = 0) -> None:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        for seconds, clients, abort_share, bad_rate in PHASES:
            log.info("phase: %d s, %d clients, %.0f%% leave early", seconds, clients,
                     100 * abort_share)
            until = time.time() + seconds
            tasks = [_client(http, model, until, abort_share, rng) for _ in range(clients)]
            tasks.append(_bad_requests(http, model, until, bad_rate))
            await asyncio.gather(*tasks)
            await asyncio.sleep(max(0.0, until - time.time()))


# -- drawing ------------------------------------------------------------------------------------

def _legend(fmt: str, labels: tuple) -> str:
    d = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: d.get(m.group(1), ""), fmt).strip() or "value"


def _format(value: float, unit: str) -> str:
    if value is None or math.isnan(value):
        return "no data"
    if unit == "percentunit":
        return f"{100 * value:.1f}%"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def draw(dashboard: dict, evaluator, times: list[float], out: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width_in, row_in = 22.0, 0.42
    fig = plt.figure(figsize=(width_in, rows * row_in + 1.0), facecolor="#111217")
    top = 1 - 0.9 / (rows * row_in + 1.0)
    fig.text(0.01, 1 - 0.25 / (rows * row_in + 1.0), dashboard["title"], color="white",
             fontsize=16, weight="bold", va="top")
    fig.text(0.01, 1 - 0.55 / (rows * row_in + 1.0), subtitle, color="#aaaaaa", fontsize=9,
             va="top", wrap=True)
    t0 = times[0]
    for panel in panels:
        g = panel["gridPos"]
        unit = panel["fieldConfig"]["defaults"].get("unit", "none")
        # the panel's frame where gridPos puts it, and the plot inside with room for its ticks
        x0, x1 = g["x"] / 24 + 0.003, (g["x"] + g["w"]) / 24 - 0.003
        y1 = top - g["y"] / rows * top - 0.004
        y0 = top - (g["y"] + g["h"]) / rows * top + 0.004
        frame = fig.add_axes((x0, y0, x1 - x0, y1 - y0), facecolor="#181b1f")
        frame.set_xticks([])
        frame.set_yticks([])
        for spine in frame.spines.values():
            spine.set_color("#2c3235")
        frame.text(0.01, 0.97, panel["title"], color="white", fontsize=10, va="top",
                   transform=frame.transAxes)
        title_h = 0.024 * 30 / rows
        if panel["type"] == "stat":
            ax = fig.add_axes((x0, y0, x1 - x0, y1 - y0 - title_h), facecolor="none")
        else:
            ax = fig.add_axes((x0 + 0.035, y0 + 0.022 * 30 / rows, x1 - x0 - 0.045,
                               y1 - y0 - title_h - 0.03 * 30 / rows), facecolor="none")
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.tick_params(colors="#aaaaaa", labelsize=7)
        series = []
        for target in panel["targets"]:
            expr = promql_eval.substitute(target["expr"], RATE_INTERVAL, {"model_name": ".*"})
            for labels, points in sorted(evaluator.query_range(expr, times).items()):
                series.append((_legend(target.get("legendFormat", ""), labels), points))
        if panel["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
            # the panel's reducer, lastNotNull
            last = next((v for _, v in reversed(series[0][1]) if not math.isnan(v)),
                        None) if series else None
            peak = max((v for _, pts in series for _, v in pts if not math.isnan(v)),
                       default=None)
            if series:
                xs = [t - t0 for t, _ in series[0][1]]
                ys = [0 if math.isnan(v) else v for _, v in series[0][1]]
                ax.fill_between(xs, ys, color="#73bf69", alpha=0.25, lw=0)
            ax.text(0.5, 0.45, _format(last, unit), color="#73bf69", fontsize=20,
                    ha="center", va="center", transform=ax.transAxes, weight="bold")
            if peak is not None:
                ax.text(0.98, 0.06, f"peak {_format(peak, unit)}", color="#aaaaaa", fontsize=7,
                        ha="right", transform=ax.transAxes)
            continue
        for name, points in series:
            ax.plot([t - t0 for t, _ in points], [v for _, v in points], lw=1.2, label=name)
        if unit == "percentunit":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.0f}%"))
        elif unit == "s":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _format(v, "s")))
        ax.set_xlim(0, times[-1] - t0)
        ax.set_ylim(bottom=0)
        ax.grid(color="#2c3235", lw=0.5)
        ax.set_xlabel("seconds", color="#aaaaaa", fontsize=7, labelpad=1)
        if series:
            ax.legend(fontsize=7, loc="upper left", frameon=False, labelcolor="#dddddd",
                      ncol=min(4, len(series)))
        else:
            ax.text(0.5, 0.5, "no data", color="#aaaaaa", ha="center", transform=ax.transAxes)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor())
    log.info("wrote %s", out)


def main(argv: list[str] | None = None) -> int:
    from pagedserve.bench.machine import describe_machine, machine_summary
    from pagedserve.bench.server_process import ServerProcess

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model (default: the bundled one)")
    p.add_argument("--out", type=Path, default=HERE.parent.parent / "docs" / "dashboard.png")
    p.add_argument("--serve-args", default="--max-num-seqs 4 --kv-cache-memory 12MiB",
                   help="extra `pagedserve serve` arguments (default: %(default)s, a small "
                   "batch and KV cache so that queueing and preemption show)")
    p.add_argument("--scrapes", type=Path, help="also save the scrapes here (JSON)")
    p.add_argument("--replay", type=Path,
                   help="draw from scrapes saved by --scrapes instead of running the server")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    dashboard = json.loads((HERE / "pagedserve-dashboard.json").read_text())
    if args.replay:
        saved = json.loads(args.replay.read_text())
        scrapes = [(t, {tuple(map(tuple, k)): v for k, v in samples})
                   for t, samples in saved["scrapes"]]
        draw(dashboard, promql_eval.Evaluator(scrapes), [t for t, _ in scrapes], args.out,
             saved["subtitle"])
        return 0
    serve_args = shlex.split(args.serve_args) + ["--served-model-name", "demo"]
    with ServerProcess(args.model, serve_args) as server:
        scraper = Scraper(server.url)
        scraper.start()
        started = time.time()
        asyncio.run(drive(server.url, "demo"))
        scraper.stop.set()
        scraper.join()
    evaluator = promql_eval.Evaluator(scraper.scrapes)
    times = [t for t, _ in scraper.scrapes]
    subtitle = (f"Measured: {args.model or 'the bundled smollm2:135m'} served by `pagedserve serve "
                f"{args.serve_args}`, {time.time() - started:.0f} s of load in phases of "
                f"{', '.join(f'{c} clients for {s} s' for s, c, _, _ in PHASES)}; scraped every "
                f"{SCRAPE_S:.0f} s, rate window {RATE_INTERVAL}. "
                f"{machine_summary(describe_machine())}")
    if args.scrapes:
        args.scrapes.write_text(json.dumps({"subtitle": subtitle, "scrapes": [
            [t, [[list(map(list, k)), v] for k, v in s.items()]] for t, s in scraper.scrapes]}))
    draw(dashboard, evaluator, times, args.out, subtitle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
