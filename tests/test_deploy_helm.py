"""The Helm chart: rendered offline by Helm's own engine for every values file in ci/, each
object validated (core kinds by kubernetes-validate --strict against Kubernetes 1.31 to 1.34, the
custom resources against schemas derived from their projects' released CRDs), and the rules
that keep users' requests alive, the perimeter closed and the autoscaler loud checked on what is
rendered. Each gap of issue 23 has a test that renders the bad values and expects the refusal
or the fix."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_chart import (
    CHART,
    DASHBOARD,
    VALUES_FILES,
    by_kind,
    one,
    render,
    render_file,
    render_raw,
    values,
)

helm_python = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = Path(__file__).parent / "deploy_schemas"
sys.path.insert(0, str(SCHEMAS))
import crd_schema  # noqa: E402  (tests/deploy_schemas/crd_schema.py)

KUBERNETES_VERSIONS = ("1.31.0", "1.32.0", "1.33.0", "1.34.0")

ids = [p.name.removesuffix("-values.yaml") for p in VALUES_FILES]

# The least a release needs to render: a decision about the API key.
BASE = {"apiKey": {"allowAnonymous": True}}
# ... and for autoscaling, the seats and the Prometheus Operator objects it depends on.
AUTOSCALED = {"server": {"maxNumSeqs": 8},
              "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
              "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
              "autoscaling": {"enabled": True}}
PINNED = "989aa7980e4cf806f80c7fef2b1adb7bc71aa306"


def merged(*layers: dict) -> dict:
    """Values layered as `helm -f a -f b` layers them (maps merge, the rest replaces)."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def test_every_profile_has_a_values_file():
    assert set(ids) >= {"cpu", "gpu", "keda", "hpa", "scale-to-zero", "gateway"}


@pytest.mark.parametrize("kube", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_helm_lint_strict(path, kube):
    report = helm_python.lint(CHART, values(path), strict=True, kube_version=f"v{kube}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def _crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(crd_schema.load(kind))


@pytest.mark.parametrize("kube", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_every_object_validates(path, kube):
    """Core kinds against Kubernetes' OpenAPI schemas with unknown fields refused; the custom
    resources, which kubernetes-validate skips (it has no schema for them), against the
    schemas derived from their CRDs."""
    for obj in render_file(path):
        kind = obj["kind"]
        if kind in crd_schema.SOURCES:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, kube, strict=True)
            _crd_validator(kind).validate(obj)
        else:
            kubernetes_validate.validate(obj, kube, strict=True)


def test_every_custom_resource_kind_is_rendered_somewhere():
    rendered = {o["kind"] for path in VALUES_FILES for o in render_file(path)}
    assert set(crd_schema.SOURCES) <= rendered


def _rendered(kind: str, path: str) -> dict:
    return json.loads(json.dumps(one(render_file(CHART / "ci" / path), kind)))


def test_crd_schemas_refuse_what_the_api_server_refuses():
    """The derived schemas are not vacuous: a number in trigger metadata (KEDA's CRD wants
    strings), a misspelt field, a bad duration, an unknown fallback behaviour, a path match
    of an unknown type, a pool without its picker fail."""
    obj = _rendered("ScaledObject", "keda-values.yaml")
    for mutate in (lambda o: o["spec"]["triggers"][0]["metadata"].update(threshold=4),
                   lambda o: o["spec"].update(minReplicas=1),
                   lambda o: o["spec"]["fallback"].update(behavior="sometimes")):
        bad = copy.deepcopy(obj)
        mutate(bad)
        assert not _crd_validator("ScaledObject").is_valid(bad)
    monitor = _rendered("ServiceMonitor", "cpu-values.yaml")
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert not _crd_validator("ServiceMonitor").is_valid(monitor)
    rule = _rendered("PrometheusRule", "cpu-values.yaml")
    rule["spec"]["groups"][0]["rules"][0]["fore"] = "5m"
    assert not _crd_validator("PrometheusRule").is_valid(rule)
    route = _rendered("HTTPRoute", "gateway-values.yaml")
    route["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Prefix"
    assert not _crd_validator("HTTPRoute").is_valid(route)
    pool = _rendered("InferencePool", "gateway-values.yaml")
    del pool["spec"]["endpointPickerRef"]
    assert not _crd_validator("InferencePool").is_valid(pool)


def test_crd_conversion_keeps_the_structural_rules():
    """What derive() makes of each construct of a structural schema."""
    node = {"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"a": {"type": "string"}}},
        "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
        "mode": {"type": "string", "pattern": "^(?i)(a|b)$", "description": "prose",
                 "default": "a", "x-kubernetes-validations": [{"rule": "self != ''"}]},
        "count": {"type": "integer", "nullable": True}}}
    v = jsonschema.Draft202012Validator(crd_schema.convert(node))
    assert v.is_valid({"port": 8, "labels": {"x": "y"}, "free": {"b": 1}, "tags": ["x"],
                       "count": None})
    assert v.is_valid({"port": "http", "mode": "A"})
    for bad in ({"port": 1.5}, {"labels": {"x": 1}}, {"tags": ["x", "x"]}, {"mode": "c"},
                {"count": "1"}, {"other": 1}):
        assert not v.is_valid(bad), bad
    assert "description" not in json.dumps(crd_schema.convert(node))


# -- what the objects say ----------------------------------------------------------------------


def _server(objects) -> dict:
    [deployment] = [d for d in by_kind(objects, "Deployment")
                    if not d["metadata"]["name"].endswith("-epp")]
    return deployment


def _pod(objects) -> dict:
    return _server(objects)["spec"]["template"]["spec"]


def _main(objects) -> dict:
    [c] = [c for c in _pod(objects)["containers"] if c["name"] == "pagedserve"]
    return c


def _arg(container: dict, flag: str) -> str | None:
    args = container["args"]
    return args[args.index(flag) + 1] if flag in args else None


@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_upgrades_never_lower_capacity_and_pods_drain_in_time(path):
    objects = render_file(path)
    vals = values(path)
    deployment = _server(objects)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    container = _main(objects)
    shutdown = int(_arg(container, "--shutdown-timeout"))
    assert shutdown == vals.get("server", {}).get("shutdownTimeout", 30)
    [sleep, seconds] = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(seconds) + shutdown
    # probes: startup and liveness on /health, readiness on /ready
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "room to load a model"
    # HA: spread over nodes and zones, a disruption budget
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"] == deployment["spec"]["selector"]
    # /dev/shm in memory, not root, read-only root file system
    shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_gpu_request_equals_limit(path):
    objects = render_file(path)
    vals = values(path)
    resources = _main(objects)["resources"]
    gpu = vals.get("gpu", {}).get("resourceName", "nvidia.com/gpu")
    if vals.get("profile") == "gpu":
        count = vals.get("gpu", {}).get("count", 1)
        assert resources["requests"][gpu] == resources["limits"][gpu] == count
        assert "--device" in _main(objects)["args"]
    else:
        assert gpu not in resources.get("requests", {}) and gpu not in resources.get("limits", {})


def test_gpu_resource_name_is_configurable():
    objects = render(merged(BASE, {"profile": "gpu",
                                   "gpu": {"resourceName": "amd.com/gpu", "count": 2}}))
    resources = _main(objects)["resources"]
    assert resources["requests"]["amd.com/gpu"] == resources["limits"]["amd.com/gpu"] == 2
    assert "nvidia.com/gpu" not in resources["limits"]


@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_autoscaler_owns_the_replicas(path):
    objects = render_file(path)
    auto = values(path).get("autoscaling", {})
    deployment = _server(objects)
    scaled, hpas = by_kind(objects, "ScaledObject"), by_kind(objects, "HorizontalPodAutoscaler")
    if not auto.get("enabled"):
        assert not scaled and not hpas and deployment["spec"]["replicas"] >= 1
        return
    # helm upgrade must not reset what the autoscaler chose
    assert "replicas" not in deployment["spec"]
    name = deployment["metadata"]["name"]
    if auto.get("keda", {}).get("enabled", True):
        assert len(scaled) == 1 and not hpas
        spec = scaled[0]["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        assert spec["maxReplicaCount"] == auto["maxReplicas"]
        # the HPA KEDA makes is named as PagedserveReplicasAtMax looks for it
        assert spec["advanced"]["horizontalPodAutoscalerConfig"]["name"] == name
        waiting = spec["triggers"][0]
        assert waiting["metricType"] == "AverageValue"
        assert waiting["metadata"]["threshold"] == str(auto.get("targetRequestsWaitingPerReplica", 4))
        assert "activationThreshold" in waiting["metadata"]
        if auto.get("scaleToZero", {}).get("enabled"):
            assert spec["minReplicaCount"] == 0
            assert spec["triggers"][1]["metadata"]["query"] == auto["scaleToZero"]["wakeQuery"]
        else:
            assert spec["minReplicaCount"] == auto["minReplicas"] >= 1
    else:
        assert len(hpas) == 1 and not scaled
        assert hpas[0]["metadata"]["name"] == name
        [metric] = hpas[0]["spec"]["metrics"]
        assert metric["pods"]["target"] == {
            "type": "AverageValue", "averageValue": str(auto.get("targetRequestsWaitingPerReplica", 4))}


# -- gap 2: autoscaling that cannot go silent --------------------------------------------------


@pytest.mark.parametrize("path", [p for p in VALUES_FILES if values(p).get("autoscaling", {})
                                  .get("keda", {}).get("enabled", True)
                                  and values(p).get("autoscaling", {}).get("enabled")],
                         ids=lambda p: p.name)
def test_keda_errs_instead_of_reading_zero_and_falls_back(path):
    """No series is an error (ignoreNullValues "false"), not a 0 that scales down; after
    failureThreshold errors KEDA holds at least the fallback replicas."""
    spec = one(render_file(path), "ScaledObject")["spec"]
    assert {t["metadata"]["ignoreNullValues"] for t in spec["triggers"]} == {"false"}
    fallback = spec["fallback"]
    minimum = values(path)["autoscaling"]["minReplicas"]
    assert fallback["replicas"] >= max(1, minimum) and fallback["failureThreshold"] >= 1
    assert fallback["behavior"] == "currentReplicasIfHigher"


@pytest.mark.parametrize("vals, message", [
    (merged(AUTOSCALED, {"server": {"maxNumSeqs": None}}), "autoscaling needs server.maxNumSeqs"),
    (merged(AUTOSCALED, {"serviceMonitor": {"enabled": False}}),
     "autoscaling needs serviceMonitor.enabled"),
    (merged(AUTOSCALED, {"serviceMonitor": {"labels": None}}), "serviceMonitor.labels is empty"),
    (merged(AUTOSCALED, {"prometheusRule": {"labels": None}}), "prometheusRule.labels is empty"),
    (merged(AUTOSCALED, {"prometheusRule": {"enabled": False}}),
     "autoscaling needs prometheusRule.enabled"),
], ids=["no-seats", "no-scrape", "monitor-unlabelled", "rules-unlabelled", "no-alerts"])
def test_autoscaling_refuses_to_render_without_what_it_depends_on(vals, message):
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render_raw(merged(BASE, vals))
    assert render(merged(BASE, AUTOSCALED))  # the same, complete, renders


def test_a_prometheus_that_selects_everything_needs_no_labels():
    vals = merged(BASE, AUTOSCALED, {"serviceMonitor": {"labels": None},
                                     "prometheusRule": {"labels": None},
                                     "prometheus": {"selectsAllObjects": True}})
    monitor = one(render(vals), "ServiceMonitor")
    assert "release" not in monitor["metadata"]["labels"]


def _alerts(objects) -> dict[str, dict]:
    rules = one(objects, "PrometheusRule")["spec"]["groups"][0]["rules"]
    return {r["alert"]: r for r in rules}


def test_absent_alerts_watch_the_targets_and_the_queue_keda_reads():
    alerts = _alerts(render(merged(BASE, AUTOSCALED)))
    selector = 'namespace="llm",service="pagedserve"'
    assert alerts["PagedserveTargetAbsent"]["expr"] == f"absent(up{{{selector}}})"
    keda_query = one(render(merged(BASE, AUTOSCALED)), "ScaledObject")["spec"]["triggers"][0]
    waiting = re.search(r"sum\((.*)\)", keda_query["metadata"]["query"])[1]
    assert alerts["PagedserveAutoscalingMetricAbsent"]["expr"] == f"absent({waiting})"
    # scaled to zero, no target is normal while the Deployment wants no replica
    zero = merged(BASE, AUTOSCALED, {"autoscaling": {"scaleToZero": {"enabled": True,
                                                                      "wakeQuery": "sum(x)"}}})
    guarded = _alerts(render(zero))["PagedserveTargetAbsent"]["expr"]
    assert guarded.endswith('and on () (max(kube_deployment_spec_replicas{namespace="llm",'
                            'deployment="pagedserve"}) > 0)')
    assert "PagedserveAutoscalingMetricAbsent" not in _alerts(render(BASE | {
        "prometheusRule": {"enabled": True, "labels": {"release": "kps"}}}))


# -- gap 7: alerts that see what a scrape misses -----------------------------------------------


def test_alerts_on_restarts_oom_pending_and_max_replicas():
    alerts = _alerts(render(merged(BASE, AUTOSCALED, {"model": {
        "pull": {"source": "Qwen/Qwen2.5-1.5B-Instruct", "revision": PINNED}}})))
    assert {"PagedserveContainerRestarted", "PagedserveOOMKilled", "PagedservePodPending",
            "PagedserveReplicasAtMax", "PagedserveTargetAbsent", "PagedserveEngineDown",
            "PagedserveReplicaDown"} <= set(alerts)
    pod = 'pod=~"pagedserve-[a-z0-9]+-[a-z0-9]+"'
    restarts = alerts["PagedserveContainerRestarted"]["expr"]
    assert "kube_pod_container_status_restarts_total" in restarts and pod in restarts
    assert 'container="pagedserve"' in restarts
    assert 'reason="OOMKilled"' in alerts["PagedserveOOMKilled"]["expr"]
    assert 'phase="Pending"' in alerts["PagedservePodPending"]["expr"]
    # Pending covers the image and the model pull: not before their budget is spent
    assert alerts["PagedservePodPending"]["for"] == f"{600 + 1800 + 300}s"
    at_max = alerts["PagedserveReplicasAtMax"]["expr"]
    assert 'horizontalpodautoscaler="pagedserve"' in at_max and ">=" in at_max
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_every_alert_has_a_runbook_section():
    docs = (CHART.parent.parent.parent / "docs" / "deployment.md").read_text()
    names = {name for path in VALUES_FILES for name in _alerts(render_file(path))}
    for name in names:
        assert re.search(rf"^#### `{name}`$", docs, re.M), f"docs/deployment.md: no runbook for {name}"


# -- gap 3: model supply ------------------------------------------------------------------------


def test_pull_gets_its_env_and_revision():
    env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]
    env_from = [{"secretRef": {"name": "proxy-settings"}}]
    objects = render(merged(BASE, {"model": {"pull": {
        "source": "Qwen/Qwen2.5-1.5B-Instruct", "revision": PINNED, "env": env,
        "envFrom": env_from}}}))
    [init] = _pod(objects)["initContainers"]
    assert env[0] in init["env"] and init["envFrom"] == env_from
    assert _arg(init, "--revision") == PINNED
    # the server gets its own extra env, not the pull's
    assert not [e for e in _main(objects)["env"] if e["name"] == "HF_TOKEN"]


def test_a_hub_source_without_revision_is_refused():
    with pytest.raises(helm_python.HelmError, match="model.pull.revision is empty"):
        render_raw(merged(BASE, {"model": {"pull": {"source": "Qwen/Qwen2.5-1.5B-Instruct"}}}))
    # a path has no revision to pin
    assert render(merged(BASE, {"model": {"pull": {"source": "/data/model.gguf"}}}))


def test_chart_managed_claim_keeps_the_models():
    objects = render(merged(BASE, {"model": {"volume": {"persistentVolumeClaim": {
        "create": True, "size": "40Gi", "storageClassName": "fast"}}}}))
    claim = one(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["resources"]["requests"]["storage"] == "40Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    [volume] = [v for v in _pod(objects)["volumes"] if v["name"] == "models"]
    assert volume == {"name": "models",
                      "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}


def test_scale_from_zero_does_not_download_into_an_empty_dir():
    zero = merged(BASE, AUTOSCALED, {
        "autoscaling": {"scaleToZero": {"enabled": True, "wakeQuery": "sum(x)"}},
        "model": {"pull": {"source": "Qwen/Qwen2.5-1.5B-Instruct", "revision": PINNED}}})
    with pytest.raises(helm_python.HelmError, match="downloads the model at every wake"):
        render_raw(zero)
    fixed = merged(zero, {"model": {"volume": {"persistentVolumeClaim": {"create": True}}}})
    assert one(render(fixed), "PersistentVolumeClaim")


def test_a_claim_one_node_mounts_is_refused_for_several_replicas():
    with pytest.raises(helm_python.HelmError, match="cannot be mounted by 2 replicas"):
        render_raw(merged(BASE, {"model": {"volume": {"persistentVolumeClaim": {
            "create": True, "accessModes": ["ReadWriteOnce"]}}}}))
    assert render(merged(BASE, {"replicaCount": 1, "model": {"volume": {
        "persistentVolumeClaim": {"create": True, "accessModes": ["ReadWriteOnce"]}}}}))


# -- gap 4: the perimeter -----------------------------------------------------------------------


def test_api_key_comes_from_a_secret():
    for vals, secret in (({"apiKey": {"existingSecret": "mine", "secretKey": "k"}}, "mine"),
                         ({"apiKey": {"value": "s3cret"}}, "pagedserve-api-key")):
        objects = render(vals)
        [env] = [e for e in _main(objects)["env"] if e["name"] == "PAGEDSERVE_API_KEY"]
        assert env["valueFrom"]["secretKeyRef"]["name"] == secret
        assert "--api-key" not in _main(objects)["args"], "a key in args shows in ps"
        secrets = by_kind(objects, "Secret")
        assert len(secrets) == (0 if secret == "mine" else 1)
    assert not [e for e in _main(render(BASE))["env"] if e["name"] == "PAGEDSERVE_API_KEY"]


def test_no_key_is_refused_unless_anonymous_is_said():
    with pytest.raises(helm_python.HelmError, match="apiKey.allowAnonymous: true"):
        render_raw({})
    assert "apiKey.allowAnonymous: the API answers without a key" in \
        render_raw(BASE)["pagedserve/templates/NOTES.txt"]


def test_no_pod_annotation_carries_the_key_or_its_hash():
    key = "s3cret-key"
    objects = render({"apiKey": {"value": key}, "podAnnotations": {"team": "llm"}})
    annotations = _server(objects)["spec"]["template"]["metadata"]["annotations"]
    digest = hashlib.sha256(key.encode()).hexdigest()
    text = json.dumps(_server(objects))
    assert key not in text and digest[:8] not in text
    assert annotations == {"team": "llm"}


def test_network_policy_admits_the_listed_peers_on_the_api_port():
    objects = render_file(CHART / "ci" / "gateway-values.yaml")
    policy = one(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == \
        _server(objects)["spec"]["selector"]["matchLabels"]
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    peers = rule["from"]
    vals = values(CHART / "ci" / "gateway-values.yaml")
    assert vals["networkPolicy"]["ingressFrom"][0] in peers  # the gateway
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} \
        in peers  # Prometheus
    epp = one([d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-epp")],
              "Deployment")
    assert {"podSelector": {"matchLabels": epp["spec"]["selector"]["matchLabels"]}} in peers
    # egress: DNS, and HTTPS for the model pull
    ports = [p for r in policy["spec"]["egress"] for p in r["ports"]]
    assert {"port": 53, "protocol": "UDP"} in ports and {"port": 443, "protocol": "TCP"} in ports
    no_pull = one(render(BASE), "NetworkPolicy")
    assert {p["port"] for r in no_pull["spec"]["egress"] for p in r["ports"]} == {53}


def test_public_routes_carry_the_api_only_over_tls():
    ingress = one(render_file(CHART / "ci" / "cpu-values.yaml"), "Ingress")
    [rule] = ingress["spec"]["rules"]
    paths = {p["path"] for p in rule["http"]["paths"]}
    assert paths == {"/v1", "/api", "/tokenize", "/detokenize"}
    assert not paths & {"/metrics", "/health", "/ready", "/"}
    assert ingress["spec"]["tls"][0]["hosts"] == [rule["host"]]
    route = one(render_file(CHART / "ci" / "gateway-values.yaml"), "HTTPRoute")
    assert all(ref["sectionName"] for ref in route["spec"]["parentRefs"])
    assert {m["path"]["value"] for m in route["spec"]["rules"][0]["matches"]} == paths


@pytest.mark.parametrize("vals, message", [
    ({"ingress": {"enabled": True, "hosts": ["x.example"]}}, "ingress.tls is empty"),
    ({"httpRoute": {"enabled": True}}, "httpRoute.parentRefs is empty"),
    ({"httpRoute": {"enabled": True, "parentRefs": [{"name": "gw"}]}}, "has no sectionName"),
], ids=["ingress-no-tls", "route-no-parent", "route-no-https-listener"])
def test_plaintext_routes_are_refused(vals, message):
    with pytest.raises(helm_python.HelmError, match=message):
        render_raw(merged(BASE, vals))
    key = next(iter(vals))
    fix = {"allowPlaintext": True} | ({"parentRefs": [{"name": "gw"}]} if key == "httpRoute" else {})
    assert render(merged(BASE, vals, {key: fix}))


# -- gap 5: rollouts that outlast a slow load ---------------------------------------------------


@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_progress_deadline_covers_the_budgets(path):
    objects = render_file(path)
    vals = merged(yaml.safe_load((CHART / "values.yaml").read_text()), values(path))
    startup = vals["probes"]["startup"]
    budget = (vals["rollout"]["imagePullSeconds"] + startup["periodSeconds"]
              * startup["failureThreshold"] + vals["probes"]["readiness"]["periodSeconds"]
              + vals["rollout"]["marginSeconds"])
    if vals["model"]["pull"]["source"]:
        budget += vals["model"]["pull"]["deadlineSeconds"]
    deadline = _server(objects)["spec"]["progressDeadlineSeconds"]
    assert deadline == budget > 600  # Kubernetes' default would fail a 15-minute load
    notes = render_raw(values(path))["pagedserve/templates/NOTES.txt"]
    assert f"--timeout {deadline}s" in notes


def test_a_progress_deadline_shorter_than_the_budget_is_refused():
    with pytest.raises(helm_python.HelmError, match="rollout.progressDeadlineSeconds"):
        render_raw(merged(BASE, {"rollout": {"progressDeadlineSeconds": 600}}))
    deployment = _server(render(merged(BASE, {"rollout": {"progressDeadlineSeconds": 5000}})))
    assert deployment["spec"]["progressDeadlineSeconds"] == 5000


# -- gap 6: values.schema.json ------------------------------------------------------------------


@pytest.mark.parametrize("vals, where", [
    ({"serverr": {"maxNumSeqs": 4}}, "additional properties 'serverr'"),
    ({"server": {"shutdownTimeout": "30s"}}, "/server/shutdownTimeout"),
    ({"server": {"maxNumSeqs": 0}}, "/server/maxNumSeqs"),
    ({"autoscaling": {"maxReplicas": -1}}, "/autoscaling/maxReplicas"),
    ({"prometheusRule": {"absentFor": "ten minutes"}}, "/prometheusRule/absentFor"),
    ({"image": {"cpu": {"digest": "latest"}}}, "/image/cpu/digest"),
    ({"autoscaling": {"keda": {"fallback": {"behavior": "sometimes"}}}},
     "/autoscaling/keda/fallback/behavior"),
], ids=["misspelt", "duration-string", "zero-seats", "negative", "bad-duration", "bad-digest",
        "bad-enum"])
def test_schema_refuses_what_the_templates_would_misread(vals, where):
    with pytest.raises(helm_python.HelmError, match=re.escape(where)):
        render_raw(merged(BASE, vals))


def test_schema_is_closed_and_covers_every_value():
    """Every object of the schema that lists properties refuses others, and every key of
    values.yaml has a place in it (a key the schema forgot would be refused by default)."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def closed(node, where):
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, where
            for key, child in node.get("properties", {}).items():
                closed(child, f"{where}.{key}")
            closed(node.get("items"), f"{where}[]")

    closed(schema, "values")
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def covered(value, node, where):
        if isinstance(value, dict) and "properties" in node:
            for key, child in value.items():
                assert key in node["properties"], f"{where}.{key} is not in values.schema.json"
                covered(child, node["properties"][key], f"{where}.{key}")

    covered(defaults, schema, "values")
    jsonschema.Draft7Validator(schema).validate(defaults)


# -- gap 8: threads and images ------------------------------------------------------------------


@pytest.mark.parametrize("request_, threads", [("4", "4"), ("2500m", "3"), ("500m", "1"),
                                               (3, "3"), (None, None)])
def test_threads_follow_the_cpu_request(request_, threads):
    # null removes the chart's default request, as `--set resources.cpu.requests.cpu=null`
    objects = render(merged(BASE, {"resources": {"cpu": {"requests": {"cpu": request_}}}}))
    assert _arg(_main(objects), "--threads") == threads
    assert _arg(_main(render(merged(BASE, {"server": {"threads": 7}}))), "--threads") == "7"


def test_image_digest_pins_the_image():
    digest = "sha256:" + "ab" * 32
    objects = render(merged(BASE, {"image": {"cpu": {"repository": "r/pagedserve-cpu",
                                                     "tag": "0.2.0", "digest": digest}}}))
    assert _main(objects)["image"] == f"r/pagedserve-cpu:0.2.0@{digest}"


# -- many replicas: the Gateway API Inference Extension -----------------------------------------


def _epp(objects) -> dict:
    [deployment] = [d for d in by_kind(objects, "Deployment")
                    if d["metadata"]["name"].endswith("-epp")]
    return deployment


def epp_config(objects) -> dict:
    [config] = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-epp")]
    return yaml.safe_load(config["data"]["epp.yaml"])


def test_inference_pool_selects_the_servers_and_its_picker():
    objects = render_file(CHART / "ci" / "gateway-values.yaml")
    pool = one(objects, "InferencePool")["spec"]
    server = _server(objects)
    assert pool["selector"]["matchLabels"] == server["spec"]["selector"]["matchLabels"]
    assert pool["targetPorts"] == [{"number": _main(objects)["ports"][0]["containerPort"]}]
    epp = _epp(objects)
    [service] = [s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("-epp")]
    assert pool["endpointPickerRef"]["name"] == service["metadata"]["name"]
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert pool["endpointPickerRef"]["port"]["number"] in ports
    container = epp["spec"]["template"]["spec"]["containers"][0]
    assert _arg(container, "--pool-name") == one(objects, "InferencePool")["metadata"]["name"]
    assert _arg(container, "--config-file") == "/config/epp.yaml"
    # nothing that selects the servers selects the picker
    epp_labels = epp["spec"]["template"]["metadata"]["labels"]
    for selector in (server["spec"]["selector"]["matchLabels"], pool["selector"]["matchLabels"],
                     one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert not selector.items() <= epp_labels.items()
    route = one(objects, "HTTPRoute")["spec"]["rules"][0]["backendRefs"]
    assert route == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                      "name": one(objects, "InferencePool")["metadata"]["name"]}]


def test_picker_reads_pagedserve_metric_names():
    """The extractor is told pagedserve's names for the protocol's three gauges (that the
    server exports them, as gauges, is checked in test_deploy_promql.py), LoRA and cache-info
    extraction are off (pagedserve serves no adapters), and every plugin a profile or the data
    layer references is declared."""
    config = epp_config(render_file(CHART / "ci" / "gateway-values.yaml"))
    assert config["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    extractor = plugins["core-metrics-extractor"]["parameters"]
    [engine] = extractor["engineConfigs"]
    assert extractor["defaultEngine"] == engine["name"]
    assert engine == {"name": "pagedserve",
                      "queuedRequestsSpec": "pagedserve:num_requests_waiting",
                      "runningRequestsSpec": "pagedserve:num_requests_running",
                      "kvUsageSpec": "pagedserve:kv_cache_usage_perc",
                      "loraSpec": "", "cacheInfoSpec": ""}
    refs = {p["pluginRef"] for prof in config["schedulingProfiles"] for p in prof["plugins"]}
    refs |= {s["pluginRef"] for s in config["dataLayer"]["sources"]}
    refs |= {e["pluginRef"] for s in config["dataLayer"]["sources"] for e in s["extractors"]}
    assert refs <= set(plugins)
    assert plugins["metrics-data-source"]["parameters"]["path"] == "/metrics"


def test_picker_restarts_with_its_configuration_and_scales_with_leader_election():
    one_picker = _epp(render(merged(BASE, {"inferencePool": {"enabled": True}})))
    weights = {"inferencePool": {"enabled": True, "endpointPicker": {"scorerWeights": {"queue": 5}}}}
    changed = _epp(render(merged(BASE, weights)))
    assert one_picker["spec"]["template"]["metadata"]["annotations"] != \
        changed["spec"]["template"]["metadata"]["annotations"]
    two = render(merged(BASE, {"inferencePool": {"enabled": True,
                                                 "endpointPicker": {"replicas": 2}}}))
    assert "--ha-enable-leader-election" in _epp(two)["spec"]["template"]["spec"]["containers"][0]["args"]
    [role] = by_kind(two, "Role")
    assert any("leases" in r["resources"] for r in role["rules"])


def test_dashboard_configmap_carries_the_dashboard_file():
    objects = render_file(CHART / "ci" / "cpu-values.yaml")
    [cm] = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["pagedserve.json"]) == json.loads(DASHBOARD.read_text())
    assert (CHART / "dashboards" / "pagedserve-dashboard.json").resolve() == DASHBOARD.resolve()


def test_service_and_monitor_reach_the_pods():
    objects = render_file(CHART / "ci" / "cpu-values.yaml")
    deployment, service = _server(objects), one(objects, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == "http" == _main(objects)["ports"][0]["name"]
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("vals, message", [
    ({"lifecycle": {"terminationGracePeriodSeconds": 40}}, "terminationGracePeriodSeconds"),
    ({"lifecycle": {"preStopSleepSeconds": 30, "terminationGracePeriodSeconds": 60}},
     "terminationGracePeriodSeconds"),
    (merged(AUTOSCALED, {"autoscaling": {"scaleToZero": {"enabled": True}}}), "wakeQuery"),
    (merged(AUTOSCALED, {"autoscaling": {"keda": {"enabled": False},
                                         "scaleToZero": {"enabled": True, "wakeQuery": "sum(x)"}}}),
     "KEDA"),
    (merged(AUTOSCALED, {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}), "minReplicas"),
    ({"profile": "tpu"}, "profile"),
], ids=["grace-below-drain", "grace-equals-drain", "zero-without-wake", "zero-with-hpa",
        "min-over-max", "profile"])
def test_values_that_cannot_work_fail_rendering(vals, message):
    with pytest.raises(helm_python.HelmError, match=message):
        render_raw(merged(BASE, vals))


def test_grace_period_is_computed_from_drain():
    pod = _pod(render(merged(BASE, {"lifecycle": {"preStopSleepSeconds": 7, "exitMarginSeconds": 3},
                                    "server": {"shutdownTimeout": 90}})))
    assert pod["terminationGracePeriodSeconds"] == 7 + 90 + 3


# -- the commands the pods run are pagedserve's --------------------------------------------------

def _parse_cli(argv: list[str]):
    """Parse a pod's arguments with pagedserve's own parser: every flag the chart passes must be
    one that command knows (argparse would also accept a unique prefix of one)."""
    from pagedserve.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[argv[0]]
    known = set(sub._option_string_actions)
    flags = {a for a in argv if a.startswith("--")}
    assert flags <= known, f"unknown {argv[0]} flags: {flags - known}"
    return parser.parse_args(argv)


@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_pod_commands_parse_with_pagedserve_cli(path):
    objects = render_file(path)
    pod = _pod(objects)
    container = _main(objects)
    assert container["command"] == ["pagedserve"]
    args = _parse_cli(container["args"])
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert args.port == container["ports"][0]["containerPort"]
    vals = values(path)
    assert args.model == vals.get("model", {}).get("name", "smollm2:135m")
    if vals.get("profile") == "gpu":
        assert args.device == "cuda"
    for init in pod.get("initContainers", []):
        assert init["command"] == ["pagedserve"]
        pull = _parse_cli(init["args"])
        assert pull.command == "pull" and pull.name == args.model
        assert pull.revision == vals["model"]["pull"].get("revision")
    threads = _arg(container, "--threads")
    assert threads is None or args.threads == int(threads) >= 1


def test_gpu_knobs_reach_the_engine_config():
    from pagedserve.engine_args import engine_config_from_args

    objects = render(merged(BASE, {"profile": "gpu",
                                   "server": {"gpuMemoryUtilization": 0.8, "enforceEager": True}}))
    config = engine_config_from_args(_parse_cli(_main(objects)["args"]))
    assert (config.device, config.gpu_memory_utilization, config.enforce_eager,
            config.num_threads) == ("cuda", 0.8, True, 4)


def test_init_container_fills_the_store_the_server_reads(tmp_path, smollm_gguf):
    """Run the rendered init container's command here: the model lands in $PAGEDSERVE_HOME under
    the name the server container is given."""
    objects = render(merged(BASE, {"model": {"name": "smol:q4",
                                             "pull": {"source": str(smollm_gguf)}}}))
    pod = _pod(objects)
    [init] = pod["initContainers"]
    env = {e["name"]: e["value"] for e in init["env"]}
    home = tmp_path / "models"
    code = ("import sys; from pagedserve.cli import main; sys.exit(main(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, *init["args"]], check=True, timeout=120,
                   env={"PATH": "/usr/bin:/bin", "PAGEDSERVE_HOME": str(home),
                        "HF_HOME": str(home / ".huggingface"), "HF_HUB_OFFLINE": "1",
                        "HOME": str(tmp_path)},
                   cwd=Path(__file__).parent.parent)
    assert env["PAGEDSERVE_HOME"] == pod["containers"][0]["env"][0]["value"]
    resolved = subprocess.run(
        [sys.executable, "-c", "from pagedserve.hub.registry import resolve; r = resolve('smol:q4');"
         "print(r.source)"], check=True, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PAGEDSERVE_HOME": str(home), "HOME": str(tmp_path)},
        cwd=Path(__file__).parent.parent)
    assert resolved.stdout.strip() == "pagedserve"
