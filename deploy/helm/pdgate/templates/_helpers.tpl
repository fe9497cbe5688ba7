{{/* Names, labels and the values the templates share. */}}

{{- define "pdgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-pdgate, or the release name when it already holds the chart's name; at most 45
characters so that "<fullname>-sglang-prefill" stays a valid name. */}}
{{- define "pdgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pdgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pdgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pdgate.labels" -}}
helm.sh/chart: {{ include "pdgate.chart" . }}
{{ include "pdgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pdgate
{{- end }}

{{- define "pdgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pdgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pdgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The pdgate.io/pool label of the chart's engine pods, which discovery selects on. */}}
{{- define "pdgate.pool" -}}
{{- default (printf "%s-engines" .Release.Name) .Values.engines.pool }}
{{- end }}

{{- define "pdgate.discoveryNamespace" -}}
{{- default .Release.Namespace .Values.discovery.namespace }}
{{- end }}

{{/* The NATS URL the gateway shares state through: the external one, the chart's, or none. */}}
{{- define "pdgate.natsUrl" -}}
{{- if .Values.nats.external.url }}
{{- .Values.nats.external.url }}
{{- else if .Values.nats.enabled }}
{{- printf "nats://%s-nats.%s.svc.%s:%d" (include "pdgate.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.nats.port) }}
{{- end }}
{{- end }}

{{/* Whether the chart runs its own NATS. */}}
{{- define "pdgate.natsInChart" -}}
{{- if and .Values.nats.enabled (not .Values.nats.external.url) }}true{{ end }}
{{- end }}

{{/* terminationGracePeriodSeconds of a gateway pod: the preStop sleep, then the gateway's grace
after SIGTERM, then a margin. */}}
{{- define "pdgate.gatewayTermination" -}}
{{- $s := .Values.gateway.shutdown }}
{{- add (int $s.readyDelaySeconds) (int $s.graceSeconds) (int $s.marginSeconds) }}
{{- end }}

{{/* The gateway's config file: the values' config, with the sections the chart owns. */}}
{{- define "pdgate.gatewayConfig" -}}
{{- $cfg := deepCopy .Values.config }}
{{- range $key := list "host" "port" "discovery" "shutdown" }}
{{- if hasKey $cfg $key }}
{{- fail (printf "config.%s is set by the chart (gateway.port, discovery.*, gateway.shutdown.*); leave it out of config" $key) }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "host" "0.0.0.0" }}
{{- $_ := set $cfg "port" (int .Values.gateway.port) }}
{{- $sharing := deepCopy (default dict $cfg.sharing) }}
{{- if hasKey $sharing "nats_url" }}
{{- fail "config.sharing.nats_url is set by the chart: use nats.enabled or nats.external.url" }}
{{- end }}
{{- $nats := include "pdgate.natsUrl" . }}
{{- if $nats }}
{{- $_ := set $sharing "nats_url" $nats }}
{{- /* the chart's 3-server cluster keeps every shared bucket on all three: one server may go */}}
{{- if and .Values.nats.enabled (not .Values.nats.external.url) (eq (int .Values.nats.replicas) 3) (not (hasKey $sharing "stream_replicas")) }}
{{- $_ := set $sharing "stream_replicas" 3 }}
{{- end }}
{{- end }}
{{- if $sharing }}
{{- $_ := set $cfg "sharing" $sharing }}
{{- end }}
{{- /* the preStop hook waits readyDelaySeconds before SIGTERM, so the gateway waits no more after it */}}
{{- $_ := set $cfg "shutdown" (dict "ready_delay_s" 0 "grace_s" (int .Values.gateway.shutdown.graceSeconds)) }}
{{- if .Values.discovery.enabled }}
{{- $d := .Values.discovery }}
{{- $selector := default (printf "pdgate.io/pool=%s" (include "pdgate.pool" .)) $d.labelSelector }}
{{- $kube := dict
      "namespace" (include "pdgate.discoveryNamespace" .)
      "label_selector" $selector
      "role_label" "pdgate.io/role"
      "engine_label" "pdgate.io/engine"
      "model_label" "pdgate.io/model"
      "model_annotation" "pdgate.io/model"
      "port" (int $d.port)
      "port_annotation" "pdgate.io/port"
      "instance_annotation" "pdgate.io/instance"
      "instance" (default dict $d.instance)
      "drain_timeout_s" $d.drainTimeoutSeconds
      "unready_grace_s" $d.unreadyGraceSeconds }}
{{- $_ := set $cfg "discovery" (dict "kubernetes" $kube) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Checks across values that the schema cannot express. */}}
{{- define "pdgate.validate" -}}
{{- if and (gt (int .Values.gateway.replicas) 1) (not (include "pdgate.natsUrl" .)) }}
{{- fail "gateway.replicas > 1: the replicas share their state through NATS; set nats.enabled or nats.external.url" }}
{{- end }}
{{- $actuator := dig "scaling" "actuator" "type" "none" .Values.config }}
{{- if and .Values.discovery.enabled (eq $actuator "kubernetes") }}
{{- fail "config.scaling.actuator.type kubernetes finds its pools' pods itself: set discovery.enabled to false (the gateway refuses both)" }}
{{- end }}
{{- if and (eq $actuator "kubernetes") (not .Values.rbac.scaling) }}
{{- fail "config.scaling.actuator.type kubernetes scales Deployments: set rbac.scaling to true" }}
{{- end }}
{{- if and (not .Values.discovery.enabled) (not .Values.config.instances) }}
{{- fail "discovery.enabled is false and config.instances is empty: the gateway would have no engine" }}
{{- end }}
{{- $models := list }}
{{- range .Values.config.models }}{{ $models = append $models .name }}{{ end }}
{{- range $engine := list "vllm" "sglang" }}
{{- range $role, $spec := include "pdgate.engineSpecs" (dict "root" $ "engine" $engine) | fromYaml }}
{{- if not (has $spec.model.name $models) }}
{{- fail (printf "engines.%s.%s serves model %q, which is not one of config.models %v" $engine $role $spec.model.name $models) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The NATS server's config file. */}}
{{- define "pdgate.natsConf" -}}
{{- $n := .Values.nats }}
{{- $name := printf "%s-nats" (include "pdgate.fullname" .) }}
{{- $headless := printf "%s-nats-headless" (include "pdgate.fullname" .) -}}
server_name: $SERVER_NAME
port: {{ int $n.port }}
http_port: {{ int $n.monitorPort }}
pid_file: "/var/run/nats/nats.pid"
lame_duck_duration: "{{ int $n.lameDuckSeconds }}s"
lame_duck_grace_period: "5s"
jetstream {
  store_dir: "/data"
  max_memory_store: {{ $n.jetstream.maxMemory }}
  max_file_store: {{ $n.jetstream.maxFile }}
}
{{- if gt (int $n.replicas) 1 }}
cluster {
  name: "{{ $name }}"
  port: {{ int $n.clusterPort }}
  routes: [
    {{- range $i := until (int $n.replicas) }}
    "nats://{{ $name }}-{{ $i }}.{{ $headless }}.{{ $.Release.Namespace }}.svc.{{ $.Values.clusterDomain }}:{{ int $n.clusterPort }}"
    {{- end }}
  ]
}
{{- end }}
{{- end }}
