"""A small PromQL evaluator over /metrics scrapes, for the dashboard's picture and its tests.

It answers an instant query at time ``t`` over a list of scrapes ``[(t_i, text_i)]``, with
Prometheus's semantics for the subset the dashboard, the alerts and the KEDA trigger use:

- selectors with ``=``, ``!=``, ``=~``, ``!~`` matchers (regexes anchored, as in Prometheus);
  an instant selector takes each series' latest sample at or before ``t`` (5 minute lookback);
- ``rate(v[r])`` over the samples in ``(t - r, t]``, counter resets handled, extrapolated to
  the window's edges as Prometheus does (:func:`_extrapolated_rate`), so a window wider than
  the samples gives Prometheus' number, not the increase over the sampled span;
- ``sum``, ``avg``, ``min``, ``max``, ``count`` with ``by`` / ``without``;
- ``histogram_quantile`` with Prometheus's linear interpolation inside the bucket;
- arithmetic, comparisons (filtering, or ``bool``), ``and``, ``or`` between vectors matched
  one-to-one on their labels (``on`` / ``ignoring``), and with scalars.

Anything else raises :class:`Unsupported`: a panel that needs more gets a bigger evaluator, not
a silently wrong picture. Grafana's variables are substituted before parsing
(:func:`substitute`).
"""

from __future__ import annotations

import math
import operator
import re
from collections import defaultdict
from collections.abc import Iterable

import promql_parser as pp
from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs, __name__ included
Vector = dict[Labels, float]
LOOKBACK_S = 300.0

ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": lambda a, b: (
    a / b if b else (math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a))),
              "%": math.fmod, "^": operator.pow}
COMPARISON = {"==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt,
              ">=": operator.ge, "<=": operator.le}


class Unsupported(ValueError):
    pass


def substitute(expr: str, rate_interval: str = "1m", variables: dict[str, str] | None = None):
    """Grafana's ``$__rate_interval`` and dashboard variables (``$name``, ``${name}``)."""
    expr = expr.replace("$__rate_interval", rate_interval)
    for name, value in (variables or {}).items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr


def parse_scrape(text: str, extra_labels: dict[str, str] | None = None) -> dict[Labels, float]:
    """Exposition text -> {labels: value}, each sample under its own name (``_total``,
    ``_bucket``...)."""
    samples: dict[Labels, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {**s.labels, **(extra_labels or {}), "__name__": s.name}
            samples[tuple(sorted(labels.items()))] = s.value
    return samples


class Evaluator:
    def __init__(self, scrapes: Iterable[tuple[float, dict[Labels, float]]]):
        self.scrapes = sorted(scrapes, key=lambda s: s[0])

    def query(self, expr: str, t: float) -> Vector | float:
        return self._eval(pp.parse(expr), t)

    def query_range(self, expr: str, times: Iterable[float]) -> dict[Labels, list[tuple]]:
        """{labels: [(t, value), ...]} as a Grafana time series panel draws it."""
        node = pp.parse(expr)
        series: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
        for t in times:
            result = self._eval(node, t)
            if isinstance(result, float):
                result = {(): result}
            for labels, value in result.items():
                series[labels].append((t, value))
        return dict(series)

    # -- nodes -------------------------------------------------------------------------------

    def _eval(self, node, t: float):
        if isinstance(node, pp.NumberLiteral):
            return float(node.val)
        if isinstance(node, pp.ParenExpr):
            return self._eval(node.expr, t)
        if isinstance(node, pp.UnaryExpr):
            inner = self._eval(node.expr, t)
            return -inner if isinstance(inner, float) else {k: -v for k, v in inner.items()}
        if isinstance(node, pp.VectorSelector):
            return self._instant(node, t)
        if isinstance(node, pp.Call):
            return self._call(node, t)
        if isinstance(node, pp.AggregateExpr):
            return self._aggregate(node, t)
        if isinstance(node, pp.BinaryExpr):
            return self._binary(node, t)
        raise Unsupported(f"{type(node).__name__} is not evaluated here")

    def _select(self, selector, samples: dict[Labels, float]) -> dict[Labels, float]:
        matchers = list(selector.matchers.matchers)
        if selector.matchers.or_matchers:
            raise Unsupported("'or' inside a selector")
        out = {}
        for labels, value in samples.items():
            d = dict(labels)
            if selector.name and d.get("__name__") != selector.name:
                continue
            if all(_matches(m, d.get(m.name, "")) for m in matchers):
                out[labels] = value
        return out

    def _instant(self, selector, t: float) -> Vector:
        if selector.offset or selector.at:
            raise Unsupported("offset and @")
        latest: Vector = {}
        for ts, samples in self.scrapes:
            if t - LOOKBACK_S < ts <= t:
                latest.update(self._select(selector, samples))
        return latest

    def _range(self, node, t: float) -> dict[Labels, list[tuple[float, float]]]:
        if not isinstance(node, pp.MatrixSelector):
            raise Unsupported("a range function over something other than a range selector")
        window = node.range.total_seconds()
        points: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
        for ts, samples in self.scrapes:
            if t - window < ts <= t:
                for labels, value in self._select(node.vector_selector, samples).items():
                    points[labels].append((ts, value))
        return points

    def _call(self, node, t: float):
        name, args = node.func.name, list(node.args)
        if name == "rate":
            out = {}
            window = args[0].range.total_seconds()
            for labels, points in self._range(args[0], t).items():
                if len(points) >= 2:
                    out[_drop_name(labels)] = _extrapolated_rate(points, t - window, t)
            return out
        if name == "histogram_quantile":
            return _histogram_quantile(self._eval(args[0], t), self._eval(args[1], t))
        raise Unsupported(f"function {name}")

    def _aggregate(self, node, t: float) -> Vector:
        op = str(node.op)
        if node.param is not None:
            raise Unsupported(f"{op} with a parameter")
        vector = self._eval(node.expr, t)
        groups: dict[Labels, list[float]] = defaultdict(list)
        modifier = node.modifier
        for labels, value in vector.items():
            d = dict(_drop_name(labels))
            if modifier is None:
                key: Labels = ()
            elif modifier.type == pp.AggModifierType.By:
                key = tuple(sorted((k, d[k]) for k in modifier.labels if k in d))
            else:
                key = tuple(sorted((k, v) for k, v in d.items() if k not in modifier.labels))
            groups[key].append(value)
        fold = {"sum": math.fsum, "avg": lambda v: math.fsum(v) / len(v), "min": min, "max": max,
                "count": lambda v: float(len(v))}
        if op not in fold:
            raise Unsupported(f"aggregation {op}")
        return {key: fold[op](values) for key, values in groups.items()}

    def _binary(self, node, t: float):
        op = str(node.op)
        lhs, rhs = self._eval(node.lhs, t), self._eval(node.rhs, t)
        modifier = node.modifier
        return_bool = bool(modifier and modifier.return_bool)
        if isinstance(lhs, float) and isinstance(rhs, float):
            return _apply(op, lhs, rhs, return_bool, scalar=True)
        if isinstance(lhs, float) or isinstance(rhs, float):
            out = {}
            for labels, value in (rhs if isinstance(lhs, float) else lhs).items():
                a, b = (lhs, value) if isinstance(lhs, float) else (value, rhs)
                result = _apply(op, a, b, return_bool)
                if result is not None:
                    keep = op in COMPARISON and not return_bool
                    out[labels if keep else _drop_name(labels)] = result
            return out
        if modifier and (modifier.card != pp.VectorMatchCardinality.OneToOne
                         and op not in ("and", "or", "unless")):
            raise Unsupported("group_left / group_right")
        sig = _signature(modifier)
        right = {sig(k): (k, v) for k, v in rhs.items()}
        if op == "and":
            return {k: v for k, v in lhs.items() if sig(k) in right}
        if op == "unless":
            return {k: v for k, v in lhs.items() if sig(k) not in right}
        if op == "or":
            left = {sig(k) for k in lhs}
            return {**lhs, **{k: v for k, v in rhs.items() if sig(k) not in left}}
        out = {}
        for labels, value in lhs.items():
            match = right.get(sig(labels))
            if match is None:
                continue
            result = _apply(op, value, match[1], return_bool)
            if result is not None:
                keep = op in COMPARISON and not return_bool
                out[labels if keep else _drop_name(labels)] = result
        return out


def _matches(matcher, value: str) -> bool:
    op = matcher.op
    if op == pp.MatchOp.Equal:
        return value == matcher.value
    if op == pp.MatchOp.NotEqual:
        return value != matcher.value
    hit = re.fullmatch(matcher.value, value) is not None
    return hit if op == pp.MatchOp.Re else not hit


def _drop_name(labels: Labels) -> Labels:
    return tuple(kv for kv in labels if kv[0] != "__name__")


def _signature(modifier):
    matching = modifier.matching if modifier else None
    if matching is None:
        return _drop_name
    names = set(matching.labels)
    if matching.type == pp.LabelModifierType.Include:  # on(...)
        return lambda labels: tuple(kv for kv in labels if kv[0] in names)
    return lambda labels: tuple(kv for kv in _drop_name(labels) if kv[0] not in names)


def _apply(op: str, a: float, b: float, return_bool: bool, scalar: bool = False):
    """The value of ``a op b``; for a filtering comparison, ``a`` or None (dropped)."""
    if op in ARITHMETIC:
        return float(ARITHMETIC[op](a, b))
    if op in COMPARISON:
        hit = COMPARISON[op](a, b)
        if return_bool or scalar:
            return 1.0 if hit else 0.0
        return a if hit else None
    raise Unsupported(f"operator {op}")


def _extrapolated_rate(points: list[tuple[float, float]], start: float, end: float) -> float:
    """Prometheus' ``rate``: the increase over the samples (a drop is a reset to 0), stretched
    to the window ``[start, end]`` and divided by its length. An edge within 1.1 average
    sample intervals of the first or last sample is extrapolated to in full; one farther away
    by half an interval (the series may have begun or ended in between); and the start never
    past the moment the counter, run backwards at this rate, would have been 0."""
    increase = 0.0
    for (_, prev), (_, cur) in zip(points, points[1:], strict=False):
        increase += cur - prev if cur >= prev else cur
    (first_t, first_v), (last_t, _) = points[0], points[-1]
    sampled = last_t - first_t
    average = sampled / (len(points) - 1)
    to_start, to_end = first_t - start, end - last_t
    if increase > 0 and first_v >= 0:
        to_start = min(to_start, sampled * first_v / increase)
    threshold = average * 1.1
    covered = sampled + sum(gap if gap < threshold else average / 2 for gap in (to_start, to_end))
    return increase * covered / sampled / (end - start)


def _histogram_quantile(q: float, buckets: Vector) -> Vector:
    groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
    for labels, count in buckets.items():
        d = dict(_drop_name(labels))
        le = d.pop("le", None)
        if le is None:
            continue
        groups[tuple(sorted(d.items()))].append((float(le), count))
    out = {}
    for key, points in groups.items():
        points.sort()
        total = points[-1][1]
        if total == 0 or points[-1][0] != math.inf:
            out[key] = math.nan
            continue
        rank = q * total
        lower, below = 0.0, 0.0
        for upper, count in points:
            if count >= rank:
                if upper == math.inf:
                    value = lower
                elif upper <= 0 or count == below:
                    value = upper
                else:
                    value = lower + (upper - lower) * (rank - below) / (count - below)
                out[key] = value
                break
            lower, below = upper, count
    return out
