{{/* Names and labels. */}}
{{- define "pagedserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pagedserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "pagedserve.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "pagedserve.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "pagedserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pagedserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pagedserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pagedserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pagedserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pagedserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pagedserve.image" -}}
{{- $image := ternary .Values.image.gpu .Values.image.cpu (eq .Values.profile "gpu") -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- with $image.digest }}@{{ . }}{{ end }}
{{- end }}

{{/* The endpoint picker's name and labels: not the server's, so that nothing selecting the
server's pods (Service, PodDisruptionBudget, NetworkPolicy, InferencePool) selects it. */}}
{{- define "pagedserve.eppName" -}}
{{- printf "%s-epp" (include "pagedserve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pagedserve.eppSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-epp" (include "pagedserve.name" .) }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The model volume's claim: one the user has, or the chart's, or none (emptyDir). */}}
{{- define "pagedserve.modelClaimName" -}}
{{- if .Values.model.volume.existingClaim }}
{{- .Values.model.volume.existingClaim }}
{{- else if .Values.model.volume.persistentVolumeClaim.create }}
{{- printf "%s-models" (include "pagedserve.fullname" .) }}
{{- end }}
{{- end }}

{{/* A pull source that is a Hugging Face repository ORG/NAME (not a path, not an Ollama name). */}}
{{- define "pagedserve.hubSource" -}}
{{- if regexMatch "^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+(:[A-Za-z0-9._-]+)?$" .Values.model.pull.source }}true{{ end }}
{{- end }}

{{/* --threads: server.threads, else the container's CPU request rounded up (torch would
otherwise start a thread per core of the node, far more than the pod may use). */}}
{{- define "pagedserve.threads" -}}
{{- if .Values.server.threads }}
{{- .Values.server.threads }}
{{- else }}
{{- $resources := ternary .Values.resources.gpu .Values.resources.cpu (eq .Values.profile "gpu") }}
{{- $cpu := toString (dig "requests" "cpu" "" (default dict $resources)) }}
{{- if hasSuffix "m" $cpu }}
{{- max 1 (int (ceil (divf (float64 (trimSuffix "m" $cpu)) 1000))) }}
{{- else if $cpu }}
{{- max 1 (int (ceil (float64 $cpu))) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Seconds a new pod may take to become ready: image pull, model pull, the startup probe's
budget (the model load), one readiness period, and a margin. */}}
{{- define "pagedserve.rolloutBudgetSeconds" -}}
{{- $pull := ternary (int .Values.model.pull.deadlineSeconds) 0 (not (empty .Values.model.pull.source)) }}
{{- $startup := mul (int .Values.probes.startup.periodSeconds) (int .Values.probes.startup.failureThreshold) }}
{{- add (int .Values.rollout.imagePullSeconds) $pull $startup (int .Values.probes.readiness.periodSeconds) (int .Values.rollout.marginSeconds) }}
{{- end }}

{{- define "pagedserve.progressDeadlineSeconds" -}}
{{- $budget := int (include "pagedserve.rolloutBudgetSeconds" .) }}
{{- with .Values.rollout.progressDeadlineSeconds }}
{{- if lt (int .) $budget }}
{{- fail (printf "rollout.progressDeadlineSeconds (%d) is shorter than a new pod may need (%d s: rollout.imagePullSeconds + model.pull.deadlineSeconds + the startup probe's periodSeconds x failureThreshold + readiness + rollout.marginSeconds): every slow model load would fail the rollout" (int .) $budget) }}
{{- end }}
{{- . }}
{{- else }}
{{- $budget }}
{{- end }}
{{- end }}

{{/* Seconds before a Pending pod is worth an alert: what scheduling, the image and the model
pull may take. */}}
{{- define "pagedserve.pendingFor" -}}
{{- if .Values.prometheusRule.pendingFor }}
{{- .Values.prometheusRule.pendingFor }}
{{- else }}
{{- $pull := ternary (int .Values.model.pull.deadlineSeconds) 0 (not (empty .Values.model.pull.source)) }}
{{- printf "%ds" (add (int .Values.rollout.imagePullSeconds) $pull 300) }}
{{- end }}
{{- end }}

{{/* kube-state-metrics' series of this release's server containers (they carry no service
label): the namespace, the Deployment's pod names, the container. */}}
{{- define "pagedserve.kubePodSelector" -}}
{{- printf "namespace=%q,pod=~%q,container=\"pagedserve\"" .Release.Namespace (printf "%s-[a-z0-9]+-[a-z0-9]+" (include "pagedserve.fullname" .)) }}
{{- end }}

{{/* The Secret holding the API key, or nothing when the server runs open. */}}
{{- define "pagedserve.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- printf "%s-api-key" (include "pagedserve.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The label matchers that pick this release's series in Prometheus: the labels the Prometheus
Operator adds to every target of the ServiceMonitor (namespace, service), unless
prometheus.selector names others. KEDA's trigger and the alerts use the same ones.
*/}}
{{- define "pagedserve.promSelector" -}}
{{- if .Values.prometheus.selector }}
{{- .Values.prometheus.selector }}
{{- else }}
{{- printf "namespace=%q,service=%q" .Release.Namespace (include "pagedserve.fullname" .) }}
{{- end }}
{{- end }}

{{/* Autoscaling: who owns spec.replicas. */}}
{{- define "pagedserve.autoscaled" -}}
{{- if .Values.autoscaling.enabled }}true{{ end }}
{{- end }}

{{/*
Seconds Kubernetes waits between the start of preStop and SIGKILL. It must cover the preStop
sleep plus the server's drain (--shutdown-timeout) plus the time to exit; given explicitly, it
is checked, otherwise it is computed.
*/}}
{{- define "pagedserve.terminationGracePeriodSeconds" -}}
{{- $drain := add (int .Values.lifecycle.preStopSleepSeconds) (int .Values.server.shutdownTimeout) -}}
{{- if .Values.lifecycle.terminationGracePeriodSeconds -}}
{{- if le (int .Values.lifecycle.terminationGracePeriodSeconds) $drain -}}
{{- fail (printf "lifecycle.terminationGracePeriodSeconds (%d) must be larger than lifecycle.preStopSleepSeconds + server.shutdownTimeout (%d): the kubelet would kill requests the server is still draining" (int .Values.lifecycle.terminationGracePeriodSeconds) $drain) -}}
{{- end -}}
{{- .Values.lifecycle.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add $drain (int .Values.lifecycle.exitMarginSeconds) -}}
{{- end -}}
{{- end }}

{{/* Values that cannot work together: fail at render time, not in the cluster. */}}
{{- define "pagedserve.validate" -}}
{{- if not (has .Values.profile (list "cpu" "gpu")) }}
{{- fail (printf "profile must be cpu or gpu, not %q" .Values.profile) }}
{{- end }}
{{- if not (or .Values.apiKey.existingSecret .Values.apiKey.value .Values.apiKey.allowAnonymous) }}
{{- fail "apiKey: set apiKey.existingSecret (a Secret holding the key) or apiKey.value; to serve without a key, say so with apiKey.allowAnonymous: true" }}
{{- end }}
{{- $operator := not .Values.prometheus.selectsAllObjects }}
{{- if and .Values.serviceMonitor.enabled $operator (empty .Values.serviceMonitor.labels) }}
{{- fail "serviceMonitor.labels is empty: the Prometheus Operator picks ServiceMonitors by label (kube-prometheus-stack: release: <its release name>) and ignores one without them, silently; set them, or prometheus.selectsAllObjects: true if your Prometheus selects every object" }}
{{- end }}
{{- if and .Values.prometheusRule.enabled $operator (empty .Values.prometheusRule.labels) }}
{{- fail "prometheusRule.labels is empty: the Prometheus Operator picks PrometheusRules by label (kube-prometheus-stack: release: <its release name>) and loads none of these alerts without them; set them, or prometheus.selectsAllObjects: true" }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- if not .Values.server.maxNumSeqs }}
{{- fail "autoscaling needs server.maxNumSeqs: requests wait (the series autoscaling reads) only once the batch is full, and with the default of 128 seats the queue never forms; measure the seats your SLO allows (docs/deployment.md)" }}
{{- end }}
{{- if not .Values.serviceMonitor.enabled }}
{{- fail "autoscaling needs serviceMonitor.enabled: KEDA (or the metrics adapter) reads pagedserve's queue from Prometheus, which scrapes nothing without it" }}
{{- end }}
{{- if not .Values.prometheusRule.enabled }}
{{- fail "autoscaling needs prometheusRule.enabled: its alerts (PagedserveAutoscalingMetricAbsent, PagedserveReplicasAtMax) are what make a scaler that reads nothing, or cannot add replicas, loud" }}
{{- end }}
{{- end }}
{{- if and .Values.model.pull.source (include "pagedserve.hubSource" .) (not .Values.model.pull.revision) }}
{{- fail (printf "model.pull.revision is empty: %s is a Hugging Face repository, and without a revision each new pod pulls whatever its main branch holds that day; set a commit hash (or a branch or tag)" .Values.model.pull.source) }}
{{- end }}
{{- if and .Values.model.pull.source .Values.autoscaling.enabled .Values.autoscaling.scaleToZero.enabled (not (include "pagedserve.modelClaimName" .)) }}
{{- fail "autoscaling.scaleToZero with model.pull.source and an emptyDir model volume downloads the model at every wake: set model.volume.persistentVolumeClaim.create (or model.volume.existingClaim)" }}
{{- end }}
{{- if .Values.model.volume.persistentVolumeClaim.create }}
{{- $most := ternary (int .Values.autoscaling.maxReplicas) (int .Values.replicaCount) (.Values.autoscaling.enabled | default false) }}
{{- $shared := or (has "ReadWriteMany" .Values.model.volume.persistentVolumeClaim.accessModes) (has "ReadOnlyMany" .Values.model.volume.persistentVolumeClaim.accessModes) }}
{{- if and (gt $most 1) (not $shared) }}
{{- fail (printf "model.volume.persistentVolumeClaim.accessModes %v cannot be mounted by %d replicas on several nodes: use ReadWriteMany" .Values.model.volume.persistentVolumeClaim.accessModes $most) }}
{{- end }}
{{- end }}
{{- if and .Values.ingress.enabled (empty .Values.ingress.tls) (not .Values.ingress.allowPlaintext) }}
{{- fail "ingress.tls is empty: the API key would cross the network in clear text; give a TLS secret, or ingress.allowPlaintext: true" }}
{{- end }}
{{- if .Values.httpRoute.enabled }}
{{- if empty .Values.httpRoute.parentRefs }}
{{- fail "httpRoute.parentRefs is empty: name the Gateway (and its HTTPS listener) the route attaches to" }}
{{- end }}
{{- if not .Values.httpRoute.allowPlaintext }}
{{- range .Values.httpRoute.parentRefs }}
{{- if not .sectionName }}
{{- fail (printf "httpRoute.parentRefs %s has no sectionName: name the Gateway's HTTPS listener (TLS terminates there), or httpRoute.allowPlaintext: true" .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq .Values.profile "gpu") (lt (int .Values.gpu.count) 1) }}
{{- fail "profile gpu needs gpu.count >= 1" }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.autoscaling.scaleToZero.enabled }}
{{- if not .Values.autoscaling.keda.enabled }}
{{- fail "autoscaling.scaleToZero needs KEDA (autoscaling.keda.enabled): a HorizontalPodAutoscaler cannot scale to zero" }}
{{- end }}
{{- if not .Values.autoscaling.scaleToZero.wakeQuery }}
{{- fail "autoscaling.scaleToZero needs autoscaling.scaleToZero.wakeQuery: with no replica there is no queue to measure, so only traffic seen in front of the pods (ingress, gateway) can wake the deployment" }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

{{/* HPA behavior, shared by KEDA's HPA and the plain one. */}}
{{- define "pagedserve.scalingBehavior" -}}
scaleUp:
  stabilizationWindowSeconds: {{ .Values.autoscaling.behavior.scaleUp.stabilizationWindowSeconds }}
  policies:
    - type: Pods
      value: {{ .Values.autoscaling.behavior.scaleUp.podsPerMinute }}
      periodSeconds: 60
scaleDown:
  stabilizationWindowSeconds: {{ .Values.autoscaling.behavior.scaleDown.stabilizationWindowSeconds }}
  policies:
    - type: Pods
      value: {{ .Values.autoscaling.behavior.scaleDown.podsPerMinute }}
      periodSeconds: 60
{{- end }}
