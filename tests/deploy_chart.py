"""The Helm chart in deploy/helm/pagedserve, rendered offline for the deploy tests.

helm-python-sdk binds Helm's own Go SDK (v4) through ctypes: the templates are rendered by the
same engine as `helm template`, with no binary, cluster or network. Each values file in the
chart's ci/ folder is one profile we ship (cpu, gpu, KEDA, HPA, scale to zero).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "pagedserve"
DASHBOARD = ROOT / "deploy" / "grafana" / "pagedserve-dashboard.json"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "pagedserve", "llm"


@functools.cache
def chart():
    import helm_python

    helm_python.disable_logging()  # its INFO line about the dashboard's symlink
    return helm_python.Chart.load(CHART)


def values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render_raw(vals: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template pagedserve CHART -n llm` gives."""
    return chart().render(values=vals or {}, name=RELEASE, namespace=NAMESPACE)


def render(vals: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rendered Kubernetes objects."""
    objects = []
    for path, text in sorted(render_raw(vals).items()):
        if path.endswith((".yaml", ".yml")):
            objects += [obj for obj in yaml.safe_load_all(text) if obj]
    return objects


@functools.cache
def render_file(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(render(values(path)))


def by_kind(objects, kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects, kind: str) -> dict[str, Any]:
    [obj] = by_kind(objects, kind)
    return obj


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def promql_eval():
    """deploy/grafana/promql_eval.py, the evaluator the dashboard's picture is drawn with."""
    import importlib.util
    import sys

    name = "pagedserve_deploy_promql_eval"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "deploy" / "grafana" / "promql_eval.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
