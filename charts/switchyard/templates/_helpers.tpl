{{/* Names, labels and shared pod pieces of the Switchyard chart. */}}

{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "switchyard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "switchyard.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "switchyard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchyard.workers.fullname" -}}
{{- printf "%s-worker" (include "switchyard.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "switchyard.config.fullname" -}}
{{- printf "%s-config" (include "switchyard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchyard.labels" -}}
helm.sh/chart: {{ include "switchyard.chart" . }}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: switchyard
{{- end }}

{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: coordinator, worker or loadtest. */}}
{{- define "switchyard.componentSelectorLabels" -}}
{{ include "switchyard.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "switchyard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image, with the -cuda variant when GPUs are enabled. */}}
{{- define "switchyard.image" -}}
{{- $repository := .Values.image.repository }}
{{- with .Values.image.registry }}
{{- $repository = printf "%s/%s" . $repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.gpu.enabled }}
{{- $tag = printf "%s-cuda" $tag }}
{{- end }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}
{{- end }}

{{/* The coordinator's in-cluster gRPC address. */}}
{{- define "switchyard.coordinator.uri" -}}
{{- printf "http://%s.%s.svc:%d" (include "switchyard.coordinator.fullname" .) .Release.Namespace (int .Values.coordinator.grpcPort) }}
{{- end }}

{{/* Environment every container shares: logs, and the model and routing from the ConfigMap. */}}
{{- define "switchyard.commonEnv" -}}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- end }}

{{/* The checkpoint volume's mount, when a checkpoint is served. */}}
{{- define "switchyard.checkpointMount" -}}
{{- if .Values.model.checkpoint.enabled }}
- name: checkpoint
  mountPath: {{ .Values.model.checkpoint.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "switchyard.checkpointVolume" -}}
{{- if .Values.model.checkpoint.enabled }}
- name: checkpoint
  {{- if .Values.model.checkpoint.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.checkpoint.existingClaim }}
    readOnly: true
  {{- else }}
  hostPath:
    path: {{ .Values.model.checkpoint.hostPath }}
    type: Directory
  {{- end }}
{{- end }}
{{- end }}

{{- /* Who may call a component's gRPC port: the listed components of this release, and clients. */ -}}
{{- define "switchyard.networkPolicy.grpcPeers" -}}
{{- range .components }}
- podSelector:
    matchLabels:
      {{- include "switchyard.componentSelectorLabels" (dict "root" $.root "component" .) | nindent 6 }}
{{- end }}
- podSelector:
    {{- toYaml .root.Values.networkPolicy.clientPodSelector | nindent 4 }}
  {{- with .root.Values.networkPolicy.clientNamespaceSelector }}
  namespaceSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Mutual TLS: the flags' environment, pointing at the mounted Secret of the pod's role. */}}
{{- define "switchyard.tlsEnv" -}}
{{- if .Values.tls.enabled }}
- name: SWITCHYARD_TLS_CERT
  value: {{ printf "%s/tls.crt" .Values.tls.mountPath | quote }}
- name: SWITCHYARD_TLS_KEY
  value: {{ printf "%s/tls.key" .Values.tls.mountPath | quote }}
- name: SWITCHYARD_TLS_CA
  value: {{ printf "%s/ca.crt" .Values.tls.mountPath | quote }}
{{- end }}
{{- end }}

{{- define "switchyard.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The role's Secret as a volume; call with (dict "root" $ "secret" <its name>). Kubernetes
     swaps the files in place when the Secret changes, and the processes re-read them. */}}
{{- define "switchyard.tlsVolume" -}}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .secret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* What a probe checks: the gRPC health service, or under TLS (which the kubelet's gRPC probe
     cannot speak) the metrics server's /healthz. With a "readyService", the readiness that
     service reports instead (/readyz under TLS). Call with (dict "root" $ "port" <gRPC port>
     ["readyService" <name>]). */}}
{{- define "switchyard.probeAction" -}}
{{- if .root.Values.tls.enabled }}
httpGet:
  path: {{ ternary "/readyz" "/healthz" (not (empty .readyService)) }}
  port: metrics
{{- else }}
grpc:
  port: {{ .port }}
  {{- with .readyService }}
  service: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The three probes of a component: the probe action with the chart's timings, each overridable
     from <component>.probes. Call with (dict "root" $ "port" <gRPC port> "defaults" <timings>
     "probes" <component>.probes ["readyService" <gRPC health service of readiness>]); startup and
     liveness ask the unnamed service (the process is up), readiness the named one if given. */}}
{{- define "switchyard.probes" -}}
{{- range $name := list "startup" "readiness" "liveness" }}
{{- $service := ternary ($.readyService | default "") "" (eq $name "readiness") }}
{{- $action := include "switchyard.probeAction" (dict "root" $.root "port" $.port "readyService" $service) | fromYaml }}
{{ $name }}Probe:
  {{- $timings := merge (deepCopy (default dict (get $.probes $name))) (get $.defaults $name) }}
  {{- toYaml (merge $action $timings) | nindent 2 }}
{{- end }}
{{- end }}

