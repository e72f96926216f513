"""JSON schemas of the custom resources the chart renders, derived from the projects' released
CustomResourceDefinitions.

kubernetes-validate knows the core kinds only; for the custom resources the API server
validates against the CRD's ``openAPIV3Schema``, which is (nearly) JSON Schema. :func:`derive`
turns one CRD version into a draft 2020-12 schema that refuses what a strict API server
(``kubectl apply --validate=strict``, or Helm's server-side apply) refuses: unknown fields
(``additionalProperties: false`` wherever the CRD lists properties and does not preserve
unknown fields), wrong types, values outside enumerations, patterns, lengths and bounds.
``x-kubernetes-int-or-string`` becomes integer-or-string, ``nullable`` admits null, a
``set`` list must not repeat items, and a pattern's inline flags after ``^`` (RE2 allows
``^(?i)...``; Python's re wants them first) move to its start. What JSON Schema cannot say is left out and named here:
CEL rules (``x-kubernetes-validations``) and the uniqueness of a ``map`` list's keys; prose
(descriptions) and defaults are dropped too. ``metadata`` gets the ObjectMeta fields the chart
writes.

The derived files sit beside this one, each recording the CRD it came from (project, release,
path, sha256). To regenerate them, or to check them against the released files:

    python tests/deploy_schemas/crd_schema.py DIR          # DIR holds the CRD files below
    python tests/deploy_schemas/crd_schema.py --check DIR  # exit 1 if a file differs

(A check, not a test: the suite has no network to fetch the releases, and a test that skips
whenever they are absent would never run in CI.)
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent


class Source(NamedTuple):
    file: str  # the CRD's file name in its project
    project: str
    release: str
    path: str  # in the project, at that release
    version: str  # the API version the chart writes
    sha256: str  # of the file at that release


SOURCES: dict[str, Source] = {
    "ScaledObject": Source(
        "keda.sh_scaledobjects.yaml", "kedacore/keda", "v2.20.2",
        "config/crd/bases/keda.sh_scaledobjects.yaml", "v1alpha1",
        "af35555862a83933b074af14ad439c4b4ceabaf4daa3e9338e9b23e36d308d80"),
    "ServiceMonitor": Source(
        "monitoring.coreos.com_servicemonitors.yaml", "prometheus-operator/prometheus-operator",
        "v0.93.0", "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
        "v1", "a99047972c9dd7679ce2050b9968e8a08773492e671b3e17abd476d42aa78a32"),
    "PrometheusRule": Source(
        "monitoring.coreos.com_prometheusrules.yaml", "prometheus-operator/prometheus-operator",
        "v0.93.0", "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
        "v1", "78be98554b9c8506ab2b4f4feb91c5f3a56e536a0a510f3a8e876a459970d56d"),
    "HTTPRoute": Source(
        "gateway.networking.k8s.io_httproutes.yaml", "kubernetes-sigs/gateway-api", "v1.6.1",
        "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml", "v1",
        "a424a0d6c953b162e71d1d97bb7e75012d8f1ac264e7274f2763d1b96ab39852"),
    "InferencePool": Source(
        "inference.networking.k8s.io_inferencepools.yaml",
        "kubernetes-sigs/gateway-api-inference-extension", "v1.5.0",
        "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml", "v1",
        "0bc3ddd94db6f588a5cecc627c39e3d12b4343d51c48d47ffa68c50fa73c290c"),
}

# Keywords whose meaning JSON Schema shares; the children of these are schemas themselves.
_SAME = ("type", "enum", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
         "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "minProperties",
         "maxProperties", "required", "multipleOf")
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": _DNS_SUBDOMAIN, "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    "additionalProperties": False,
}


def convert(node: dict[str, Any]) -> dict[str, Any]:
    """One structural-schema node -> JSON Schema (see the module's docstring)."""
    out: dict[str, Any] = {k: node[k] for k in _SAME if k in node}
    if "pattern" in out:
        out["pattern"] = re.sub(r"^\^\(\?([a-z]+)\)", r"(?\1)^", out["pattern"])
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif "anyOf" in node:
        out["anyOf"] = [convert(n) for n in node["anyOf"]]
    for key in ("allOf", "oneOf"):
        if key in node:
            out[key] = [convert(n) for n in node[key]]
    if "not" in node:
        out["not"] = convert(node["not"])
    if "properties" in node:
        out["properties"] = {name: convert(child) for name, child in node["properties"].items()}
    if "items" in node:
        out["items"] = convert(node["items"])
        if node.get("x-kubernetes-list-type") == "set":
            out["uniqueItems"] = True
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = convert(extra)
    elif extra is not None:
        out["additionalProperties"] = extra
    elif "properties" in node and not preserve:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def derive(crd: dict[str, Any], kind: str) -> dict[str, Any]:
    source = SOURCES[kind]
    group = crd["spec"]["group"]
    assert crd["spec"]["names"]["kind"] == kind, crd["spec"]["names"]["kind"]
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == source.version]
    assert version["served"], f"{kind} {source.version} is not served"
    schema = convert(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{group}/{source.version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata"})
    schema["additionalProperties"] = False
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (f"Derived by tests/deploy_schemas/crd_schema.py from {source.project} "
                     f"{source.release} {source.path} (sha256 {source.sha256}), version "
                     f"{source.version}; do not edit by hand."),
        "title": f"{group}/{source.version} {kind}",
        **schema,
    }


def schema_path(kind: str) -> Path:
    return HERE / f"{kind.lower()}.json"


def load(kind: str) -> dict[str, Any]:
    return json.loads(schema_path(kind).read_text())


def derive_from(directory: Path, kind: str) -> dict[str, Any]:
    """Derive ``kind``'s schema from its CRD file in ``directory``, checking the file is the
    released one."""
    import yaml

    source = SOURCES[kind]
    data = (directory / source.file).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        raise ValueError(f"{source.file}: sha256 {digest}, not that of {source.project} "
                         f"{source.release} ({source.sha256})")
    return derive(yaml.safe_load(data), kind)


def main(argv: list[str]) -> int:
    check = argv[:1] == ["--check"]
    argv = argv[1:] if check else argv
    if len(argv) != 1:
        print(__doc__.split("\n\n")[-2], file=sys.stderr)
        return 2
    differ = []
    for kind in SOURCES:
        text = json.dumps(derive_from(Path(argv[0]), kind), indent=1, sort_keys=True) + "\n"
        if not check:
            schema_path(kind).write_text(text)
            print(f"wrote {schema_path(kind)}")
        elif json.loads(text) != load(kind):
            differ.append(kind)
            print(f"{schema_path(kind)} differs from what {argv[0]} derives", file=sys.stderr)
    if check and not differ:
        print(f"every schema is what the CRDs in {argv[0]} derive")
    return int(bool(differ))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
