"""Every PromQL expression we ship (dashboard panels and variables, alerts, KEDA triggers, for
every values file) parses, names only series a real `pagedserve serve` exports (or, for the
alerts on pods, kube-state-metrics documents), uses each the way its type allows, and gives
data: evaluated over scrapes of that server after real traffic. The KEDA query must come back
as one series however many pods there are. A real Prometheus, given the same scrapes, accepts
every expression and answers each as the in-repo evaluator does. The same server meets the
Gateway API Inference Extension's model-server protocol as the chart's endpoint picker is
configured to read it."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import httpx
import pytest
import yaml
from deploy_chart import (
    VALUES_FILES,
    by_kind,
    dashboard,
    promql_eval,
    render_file,
)
from deploy_prometheus import Prometheus, binaries, millis

pp = pytest.importorskip("promql_parser")
pytest.importorskip("helm_python")

# Series Prometheus makes for every target, and labels it (the Prometheus Operator) adds.
PROMETHEUS_SERIES = {"up"}
# kube-state-metrics' series the pod alerts read: name -> {"type", "labels"}
KUBE_STATE_METRICS = json.loads((Path(__file__).parent / "deploy_schemas" /
                                 "kube_state_metrics.json").read_text())["series"]
TARGET_LABELS = {"namespace", "service", "pod", "job", "instance", "endpoint", "container"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",), "summary": ("", "_sum", "_count")}
VARIABLE = re.compile(r"label_values\((?P<metric>[^,{]+)(?:\{[^}]*\})?,\s*(?P<label>\w+)\)")
RATE_WINDOW = "10m"  # $__rate_interval here: the whole test run
ABANDON_TRIES = 3


def _dashboard_exprs() -> list[tuple[str, str]]:
    return [(f"dashboard: {p['title']} {t['refId']}", t["expr"])
            for p in dashboard()["panels"] for t in p.get("targets", [])]


def _rendered(kind: str) -> list:
    return [obj for path in VALUES_FILES for obj in by_kind(render_file(path), kind)]


def _alert_exprs() -> list[tuple[str, str]]:
    exprs = {}
    for rule_set in _rendered("PrometheusRule"):
        for group in rule_set["spec"]["groups"]:
            for rule in group["rules"]:
                exprs[rule["expr"]] = f"alert: {rule['alert']}"
    return [(where, expr) for expr, where in exprs.items()]


def _keda_triggers() -> list[dict]:
    return [t for obj in _rendered("ScaledObject") for t in obj["spec"]["triggers"]]


def _ours() -> list[tuple[str, str]]:
    """Expressions over pagedserve's series: all but the scale-to-zero wake query, which is the
    user's, over their ingress's series."""
    keda = [(f"keda: {t['name']}", t["metadata"]["query"]) for t in _keda_triggers()
            if t["name"] == "requests-waiting"]
    return _dashboard_exprs() + _alert_exprs() + sorted(set(keda))


def _parse(expr: str):
    return pp.parse(promql_eval().substitute(expr, RATE_WINDOW))


def _nodes(node):
    found = []
    pp.walk(node, lambda n: found.append(n))
    return found


def test_every_expression_parses():
    exprs = _ours() + [("keda wake", t["metadata"]["query"]) for t in _keda_triggers()]
    assert len(_dashboard_exprs()) >= 20 and len(_alert_exprs()) >= 12
    for where, expr in exprs:
        try:
            _parse(expr)
        except Exception as exc:  # the parser's error type is not exported
            pytest.fail(f"{where}: {expr!r} does not parse: {exc}")


def test_wake_queries_read_traffic_in_front_of_the_pods():
    wakes = [t for t in _keda_triggers() if t["name"] != "requests-waiting"]
    assert wakes, "a values file scales to zero"
    for trigger in wakes:
        names = {n.name for n in _nodes(_parse(trigger["metadata"]["query"]))
                 if isinstance(n, pp.VectorSelector)}
        assert names and not any(n.startswith("pagedserve:") for n in names)


def test_keda_query_is_a_single_series_sum():
    """An unaggregated query returns one series per pod, and KEDA's Prometheus scaler then
    fails at two pods: the top level must be a sum without by/without."""
    queries = {t["metadata"]["query"] for t in _keda_triggers() if t["name"] == "requests-waiting"}
    assert queries
    for query in queries:
        node = _parse(query)
        assert isinstance(node, pp.AggregateExpr) and str(node.op) == "sum", query
        assert node.modifier is None, f"{query}: 'by'/'without' gives several series"
        [selector] = [n for n in _nodes(node) if isinstance(n, pp.VectorSelector)]
        assert selector.name == "pagedserve:num_requests_waiting"


# -- against a real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_llama_tokenized_dir):
    """Scrapes of a real server around traffic that reaches every finish reason we can cause
    from outside (stop, length, abort) and 2xx/4xx answers; scraped as two pods of one
    Deployment would be, with the labels the Prometheus Operator adds. Also its exposition at
    a moment when its two seats are taken and two requests wait (the endpoint picker's view)."""
    from pagedserve.bench.server_process import ServerProcess

    ev = promql_eval()
    scrapes, types = [], {}
    with ServerProcess(str(tiny_llama_tokenized_dir), ["--max-num-seqs", "2", "--served-model-name", "tiny"]) as server:
        client = httpx.Client(base_url=server.url, timeout=60)

        def scrape():
            text = client.get("/metrics").text
            now = time.time()
            for line in text.splitlines():
                if line.startswith("# TYPE "):
                    _, _, name, kind = line.split()
                    types[name] = kind
            for pod in ("pagedserve-0", "pagedserve-1"):
                scrapes.append((now, ev.parse_scrape(text, {
                    "namespace": "llm", "service": "pagedserve", "pod": pod, "job": "pagedserve",
                    "instance": f"{pod}:11434", "endpoint": "http"})))
            up = (("__name__", "up"), ("namespace", "llm"), ("pod", "pagedserve-0"),
                  ("service", "pagedserve"))
            scrapes[-1][1][up] = 1.0

        def finished(reason: str | None = None) -> float:
            """The server's request_success_total now, of one finished_reason or of all."""
            return sum(v for k, v in ev.parse_scrape(client.get("/metrics").text).items()
                       if dict(k)["__name__"] == "pagedserve:request_success_total"
                       and reason in (None, dict(k)["finished_reason"]))

        scrape()
        body = {"model": "tiny", "prompt": "The cat sat on the", "max_tokens": 6}
        for _ in range(3):  # no EOS can cut these short: "length" for certain
            assert client.post("/v1/completions",
                               json=body | {"ignore_eos": True}).status_code == 200
        assert client.post("/v1/completions", json=body | {"temperature": -1}).status_code == 400
        assert client.get("/no/such/route").status_code == 404
        _abandon_a_request(client, body, finished)
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        full_batch = _fill_the_batch(client, server.url, body)
        scrape()
        for _ in range(2):
            client.post("/v1/completions", json=body | {"max_tokens": 12, "prompt": "Hello"})
        time.sleep(1.5)
        scrape()
        client.close()
    return ev.Evaluator(scrapes), types, scrapes, full_batch


def _value(text: str, name: str) -> float:
    [value] = [v for k, v in promql_eval().parse_scrape(text).items()
               if dict(k)["__name__"] == name]
    return value


def _fill_the_batch(client: httpx.Client, url: str, body: dict) -> str:
    """Four long requests on a server of two seats: the exposition once two run and two wait.
    The clients then go away (the requests end as aborts)."""
    import threading

    stop = threading.Event()

    def one() -> None:
        with httpx.Client(base_url=url, timeout=120) as c, c.stream(
                "POST", "/v1/completions",
                json=body | {"max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=one, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    try:
        while True:
            text = client.get("/metrics").text
            if (_value(text, "pagedserve:num_requests_running"),
                    _value(text, "pagedserve:num_requests_waiting")) == (2, 2):
                return text
            assert time.monotonic() < deadline, "four requests never filled two seats"
            time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)


def _abandon_a_request(client: httpx.Client, body: dict, finished) -> None:
    """A client that goes away mid-answer: the request ends as "abort", counted before this
    returns, so the next scrape shows it.

    The request must still be running when the server notices the disconnect (a few steps
    after the first event): a random tiny model samples EOS early often enough that a request
    which may stop ends "stop" before that now and then, so this one ignores EOS and has
    hundreds of tokens left to go. Its end is then awaited in /metrics, not slept on. Should
    it still outrun the disconnect on a starved machine, it ends "length" and another try is
    made; every try ending so is a failure."""
    long_answer = body | {"max_tokens": 400, "ignore_eos": True, "stream": True}
    for _ in range(ABANDON_TRIES):
        ended, aborted = finished(), finished("abort")
        with client.stream("POST", "/v1/completions", json=long_answer) as stream:
            next(stream.iter_lines())  # the request is running; then the client closes
        deadline = time.monotonic() + 60
        while finished() == ended:
            assert time.monotonic() < deadline, "the abandoned request never ended"
            time.sleep(0.01)  # between polls, not a guess at how long the abort takes
        if finished("abort") > aborted:
            return
    pytest.fail(f"none of {ABANDON_TRIES} requests abandoned mid-answer ended as an abort")


def _exported(types: dict[str, str]) -> dict[str, str]:
    """Sample name -> family type, by the exposition's suffix rules."""
    names = {}
    for family, kind in types.items():
        base = family.removesuffix("_total") if kind == "counter" else family
        for suffix in SUFFIXES.get(kind, ("",)):
            names[base + suffix] = kind
    return names


def _labels_of(scrapes) -> dict[str, set[str]]:
    labels: dict[str, set[str]] = {}
    for _, samples in scrapes:
        for key in samples:
            d = dict(key)
            labels.setdefault(d.pop("__name__"), set()).update(d)
    return labels


@pytest.mark.slow
def test_names_functions_and_labels_fit_what_the_server_exports(served):
    _, types, scrapes, _ = served
    exported = _exported(types)
    assert {"pagedserve:prompt_tokens_total", "pagedserve:time_to_first_token_seconds_bucket",
            "pagedserve:iteration_tokens_total_bucket"} <= set(exported)
    seen = _labels_of(scrapes)
    assert set(exported) - PROMETHEUS_SERIES <= set(seen) | {n for n in exported
                                                             if n.endswith("_created")}
    for name, series in KUBE_STATE_METRICS.items():
        exported.setdefault(name, series["type"])
        seen.setdefault(name, set()).update(series["labels"])
    for where, expr in _ours():
        root = _parse(expr)
        for node in _nodes(root):
            if isinstance(node, pp.VectorSelector):
                name = node.name
                assert name in exported or name in PROMETHEUS_SERIES, \
                    f"{where}: {name} is not exported by pagedserve serve nor kube-state-metrics"
                for m in node.matchers.matchers:
                    assert m.name in seen.get(name, set()) | TARGET_LABELS, \
                        f"{where}: {name} has no label {m.name}"
            if isinstance(node, pp.Call) and node.func.name in ("rate", "increase", "irate"):
                name = node.args[0].vector_selector.name
                kind = exported.get(name, "unexported series")
                assert kind in ("counter", "histogram"), \
                    f"{where}: {node.func.name}() of the {kind} {name}"
            if isinstance(node, pp.Call) and node.func.name == "histogram_quantile":
                inner = [n for n in _nodes(node.args[1]) if isinstance(n, pp.VectorSelector)]
                assert all(n.name.endswith("_bucket") for n in inner), where
                for agg in (n for n in _nodes(node.args[1]) if isinstance(n, pp.AggregateExpr)):
                    assert agg.modifier and "le" in agg.modifier.labels, \
                        f"{where}: the aggregation inside histogram_quantile drops 'le'"
            if isinstance(node, pp.AggregateExpr) and node.modifier is not None:
                inner = {n.name for n in _nodes(node.expr) if isinstance(n, pp.VectorSelector)}
                for label in node.modifier.labels:
                    assert all(label in seen.get(n, set()) | TARGET_LABELS for n in inner), \
                        f"{where}: no series of {inner} has the label {label}"
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            m = VARIABLE.fullmatch(variable["query"]["query"])
            assert m and m["metric"] in exported and m["label"] in seen[m["metric"]]


@pytest.mark.slow
def test_every_dashboard_panel_and_alert_has_data(served):
    """Evaluated at the last scrape: every panel query returns at least one series (a label
    mismatch in a division would return none), with finite values where traffic happened."""
    evaluator, _, scrapes, _ = served
    ev = promql_eval()
    t = scrapes[-1][0]
    for where, expr in _dashboard_exprs():
        result = evaluator.query(ev.substitute(expr, RATE_WINDOW, {"model_name": ".*"}), t)
        assert result, f"{where}: {expr} returns nothing"
    for where, expr in _alert_exprs():
        condition = _parse(expr)
        names = {n.name for n in _nodes(condition) if isinstance(n, pp.VectorSelector)}
        if names & set(KUBE_STATE_METRICS):
            continue  # kube-state-metrics' series: not in a pagedserve scrape
        absent = [n for n in _nodes(condition)
                  if isinstance(n, pp.Call) and n.func.name == "absent"]
        if absent:  # quiet while the series it watches has data, as it has here
            [call] = absent
            assert evaluator.query(call.args[0].prettify(), t), f"{where}: watches nothing"
            continue
        assert evaluator.query(_quantity(where, condition), t), f"{where}: {expr} measures nothing"
    ttft = evaluator.query(ev.substitute(
        'histogram_quantile(0.5, sum by (le) (rate(pagedserve:time_to_first_token_seconds_bucket'
        '[$__rate_interval])))', RATE_WINDOW), t)
    [value] = ttft.values()
    assert 0 < value < 30 and not math.isnan(value)
    reasons = evaluator.query(
        f"sum by (finished_reason) (rate(pagedserve:request_success_total[{RATE_WINDOW}]))", t)
    got = {dict(k)["finished_reason"] for k, v in reasons.items() if v > 0}
    assert {"length", "abort"} <= got


def _quantity(where: str, condition) -> str:
    """An alert's condition without its threshold, which measures something; of a ratio of
    failures (none happen in the fixture, so no series) the denominator."""
    assert str(condition.op) in ("==", ">"), where
    quantity = condition.lhs
    if isinstance(quantity, pp.BinaryExpr) and str(quantity.op) == "/":
        quantity = quantity.rhs
    return quantity.prettify()


@pytest.mark.slow
def test_keda_query_sums_the_pods(served):
    evaluator, _, scrapes, _ = served
    t = scrapes[-1][0]
    [query] = {t_["metadata"]["query"] for t_ in _keda_triggers()
               if t_["name"] == "requests-waiting" and '"llm"' in t_["metadata"]["query"]}
    assert len(evaluator.query(query, t)) == 1
    unaggregated = query.removeprefix("sum(").removesuffix(")")
    assert len(evaluator.query(unaggregated, t)) == 2, "two pods, two series"


# -- against a real Prometheus --------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(request, tmp_path_factory):
    """Debian's Prometheus over the fixture's scrapes (backfilled, see deploy_prometheus.py),
    and the in-repo evaluator over the same scrapes at the milliseconds Prometheus stores.
    Checked for the binaries before the server is started."""
    binaries()
    _, _, scrapes, _ = request.getfixturevalue("served")
    stored = [(millis(t) / 1000, samples) for t, samples in scrapes]
    with Prometheus(stored, tmp_path_factory.mktemp("prometheus")) as server:
        yield server, promql_eval().Evaluator(stored), [t for t, _ in stored]


def _rate_windows(times: list[float]) -> list[str]:
    """$__rate_interval as the other tests set it (the whole run: Prometheus extrapolates from
    the first sample by half an interval, or to where the counter was 0), and one that starts
    a millisecond before the next-to-last scrape (Prometheus extrapolates to the window's edge,
    a millisecond): both ways its rate() stretches a window's increase."""
    last, before = sorted(set(times))[-2:]
    return [RATE_WINDOW, f"{millis(before) - millis(last) + 1}ms"]


def _compared(where: str, expr: str) -> list[tuple[str, str]]:
    """(where, expr) and, for a threshold alert, what it measures: the expressions whose
    answers both evaluators must give alike."""
    condition = _parse(expr)
    nodes = _nodes(condition)
    if (not where.startswith("alert:")
            or any(isinstance(n, pp.Call) and n.func.name == "absent" for n in nodes)
            or any(isinstance(n, pp.VectorSelector) and n.name in KUBE_STATE_METRICS
                   for n in nodes)):
        return [(where, expr)]
    return [(where, expr), (f"{where} (its quantity)", _quantity(where, condition))]


def _same(a: float, b: float) -> bool:
    """Equal but for rounding: Prometheus reckons time in integer milliseconds, the evaluator
    in float seconds since the epoch, exact to 2.4e-7 s, so its window edges move by that
    much, a relative 1e-7 of a rate over a window of 1.5 s or more."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-12)


@pytest.mark.slow
def test_prometheus_answers_as_the_evaluator_does(prometheus):
    """Every expression we ship, asked of a real Prometheus at the last scrape: it accepts
    it, and where the in-repo evaluator has an answer, Prometheus gives the same series with
    the same values. The evaluator computes rate() as Prometheus does (extrapolated), so the
    values agree to float rounding, not to a tolerance for a different definition; an
    expression it cannot evaluate (absent(), increase(), series of kube-state-metrics) is
    still sent to Prometheus, which must accept it."""
    server, evaluator, times = prometheus
    t = times[-1]
    compared = 0
    for window in _rate_windows(times):
        exprs = [(w, promql_eval().substitute(e, window, {"model_name": ".*"}))
                 for w, e in _ours()]
        for where, expr in [c for w, e in exprs for c in _compared(w, e)]:
            try:
                got = server.query(expr, t)
            except ValueError as exc:
                pytest.fail(f"{where}: Prometheus refuses {expr!r}: {exc}")
            try:
                want = evaluator.query(expr, t)
            except promql_eval().Unsupported:
                continue
            compared += 1
            if where.startswith("dashboard:"):
                assert got, f"{where}: {expr} returns nothing from Prometheus"
            if isinstance(want, float):
                assert isinstance(got, float) and _same(got, want), f"{where}: {expr}"
                continue
            assert set(got) == set(want), f"{where}: {expr}: Prometheus {got}, evaluator {want}"
            for labels, value in want.items():
                assert _same(got[labels], value), \
                    f"{where}: {expr}: {dict(labels)}: Prometheus {got[labels]}, evaluator {value}"
    assert compared >= 2 * (len(_dashboard_exprs()) + 4)


@pytest.mark.slow
def test_prometheus_quiet_alerts_and_wake_queries(prometheus):
    """What the evaluator cannot run, Prometheus can: the "series absent" alerts stay quiet
    over a server that is scraped, and a scale-to-zero wake query with no ingress series
    answers 0 (one series, as KEDA needs), not nothing."""
    server, _, times = prometheus
    t = times[-1]
    absent = [(w, e) for w, e in _alert_exprs() if "absent(" in e]
    assert absent
    for where, expr in absent:
        assert server.query(expr, t) == {}, f"{where}: {expr} fires over a scraped server"
    for trigger in _keda_triggers():
        if trigger["name"] != "requests-waiting":
            assert server.query(trigger["metadata"]["query"], t) == {(): 0.0}, trigger


@pytest.mark.slow
def test_prometheus_lists_the_dashboard_variables(prometheus):
    """Each query variable (`label_values(metric, label)`) lists what the scrapes hold."""
    server, evaluator, _ = prometheus
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        m = VARIABLE.fullmatch(variable["query"]["query"])
        want = {dict(k)[m["label"]] for _, samples in evaluator.scrapes for k in samples
                if dict(k)["__name__"] == m["metric"] and m["label"] in dict(k)}
        assert want and server.label_values(m["label"], m["metric"]) == want


# -- the Gateway API Inference Extension's model-server protocol ---------------------------------


def _picker_engine() -> dict:
    [config] = [c for c in _rendered("ConfigMap") if c["metadata"]["name"].endswith("-epp")]
    plugins = yaml.safe_load(config["data"]["epp.yaml"])["plugins"]
    [extractor] = [p for p in plugins if p["type"] == "core-metrics-extractor"]
    [engine] = extractor["parameters"]["engineConfigs"]
    return engine


@pytest.mark.slow
def test_server_meets_the_inference_extension_protocol(served):
    """The protocol (gateway-api-inference-extension, docs/proposals/003-model-server-protocol)
    wants OpenAI completions and chat (answered in the fixture) and three gauges, under any
    name "with the types and semantics" of vLLM's: queued requests, running requests and the
    KV cache in use as a fraction 0..1. The picker's configuration names pagedserve's; each
    is a gauge, one series per pod, and reads 2 running and 2 waiting when four requests meet
    two seats. No adapters, so no LoRA series, and the picker is told not to look for one."""
    _, types, _, full_batch = served
    engine = _picker_engine()
    for spec in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"):
        name = engine[spec]
        assert types.get(name) == "gauge", f"{spec}: {name} is not a gauge pagedserve exports"
        series = [k for k in promql_eval().parse_scrape(full_batch) if dict(k)["__name__"] == name]
        assert len(series) == 1, f"{name}: {len(series)} series, the picker reads one per pod"
    assert _value(full_batch, engine["runningRequestsSpec"]) == 2
    assert _value(full_batch, engine["queuedRequestsSpec"]) == 2
    assert 0 < _value(full_batch, engine["kvUsageSpec"]) <= 1
    assert engine["loraSpec"] == "" and not [n for n in types if "lora" in n]


@pytest.mark.slow
def test_process_series_of_front_end_and_core(served):
    """A real `pagedserve serve` (front end + engine core process) reports both."""
    _, types, scrapes, full_batch = served
    rss = {dict(k)["process"]: v for k, v in promql_eval().parse_scrape(full_batch).items()
           if dict(k)["__name__"] == "process_resident_memory_bytes"}
    assert set(rss) == {"frontend-0", "core"} and all(v > 0 for v in rss.values())
    assert types["process_cpu_seconds_total"] == "counter"


# -- the evaluator itself, on hand-made samples ------------------------------------------------


def _scrapes(*texts: str, step: float = 10.0):
    ev = promql_eval()
    return ev.Evaluator([(i * step, ev.parse_scrape(text)) for i, text in enumerate(texts)])


def test_evaluator_rate_handles_counter_resets():
    ev = _scrapes("# TYPE c counter\nc_total 10\n", "# TYPE c counter\nc_total 30\n",
                  "# TYPE c counter\nc_total 5\n")  # restarted between the 2nd and 3rd
    # an increase of 25 over the 20 s sampled, stretched back 8 s (where the counter, at this
    # rate, was 0) and divided by the window, as Prometheus does
    assert ev.query("rate(c_total[1m])", 20.0) == {(): pytest.approx(25 * (20 + 8) / 20 / 60)}
    # the window starts 5 s before its first sample, within 1.1 sample intervals: stretched
    # over the whole window, an increase of 5 over 10 s
    assert ev.query("rate(c_total[15s])", 20.0) == {(): pytest.approx(5 / 10)}


def test_evaluator_histogram_quantile_interpolates_like_prometheus():
    text = ('# TYPE h histogram\nh_bucket{le="1"} 0\nh_bucket{le="2"} 10\nh_bucket{le="4"} 20\n'
            'h_bucket{le="+Inf"} 20\nh_sum 40\nh_count 20\n')
    ev = _scrapes(text)
    [value] = ev.query("histogram_quantile(0.75, sum by (le) (h_bucket))", 0).values()
    assert value == pytest.approx(3.0)  # rank 15 of 20: halfway through the (2, 4] bucket
    [value] = ev.query("histogram_quantile(0.25, h_bucket)", 0).values()
    assert value == pytest.approx(1.5)
    empty = "# TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_bucket{le=\"+Inf\"} 0\n"
    [value] = _scrapes(empty).query("histogram_quantile(0.5, h_bucket)", 0).values()
    assert math.isnan(value)


def test_evaluator_matches_vectors_on_labels():
    text = ('# TYPE a gauge\na{m="x",pod="0"} 1\na{m="x",pod="1"} 3\na{m="y",pod="0"} 5\n'
            '# TYPE b gauge\nb{m="x"} 2\n')
    ev = _scrapes(text)
    assert ev.query("sum(a)", 0) == {(): 9.0}
    assert ev.query("sum by (m) (a) / on (m) b", 0) == {(("m", "x"),): 2.0}
    assert ev.query("sum by (m) (a) / sum by (m) (b)", 0) == {(("m", "x"),): 2.0}
    assert ev.query("avg(a) > 2", 0) == {(): 3.0} and ev.query("avg(a) > 4", 0) == {}
    assert len(ev.query('a{m=~"x|y"} or b', 0)) == 4
    assert ev.query('max by (pod) (a{m!="y"})', 0) == {(("pod", "0"),): 1.0, (("pod", "1"),): 3.0}
    with pytest.raises(promql_eval().Unsupported):
        ev.query("topk(1, a)", 0)
