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
