{{/*
The engine Deployments' settings and launch commands.

The commands are what `pdgate engine vllm|sglang ... --print` prints for the same settings
(engines/launch/vllm.py, engines/launch/sglang.py; device gpu, host 0.0.0.0, the side-channel host
the pod's IP); tests/test_helm_chart.py renders them and compares them with the CLI's output, so
a change to either side that the other does not follow fails there.
*/}}

{{- define "pdgate.int" -}}
{{- int64 . }}
{{- end }}

{{/* A number as Python's str(float) writes it: 0.85 -> 0.85, 1 -> 1.0. */}}
{{- define "pdgate.pyfloat" -}}
{{- $s := toString . }}
{{- if regexMatch "^-?[0-9]+$" $s }}{{ $s }}.0{{ else }}{{ $s }}{{ end }}
{{- end }}

{{/* The roles an engine kind runs in (SGLang fixes its role at launch: no flex). */}}
{{- define "pdgate.engineRoles" -}}
{{- if eq . "vllm" }}prefill decode both flex{{ else }}prefill decode both{{ end }}
{{- end }}

{{/* {role: settings} of an engine kind's enabled roles, as YAML: the kind's settings with the
role's own over them. Arguments: root, engine. */}}
{{- define "pdgate.engineSpecs" -}}
{{- $kind := index .root.Values.engines .engine }}
{{- $roles := splitList " " (include "pdgate.engineRoles" .engine) }}
{{- $common := omit $kind "prefill" "decode" "both" "flex" }}
{{- $out := dict }}
{{- range $role := $roles }}
{{- $own := default dict (index $kind $role) }}
{{- if $own.enabled }}
{{- $_ := set $out $role (mergeOverwrite (deepCopy $common) (deepCopy $own)) }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* The KV-event endpoints of the chart's engines: the engine binds, every gateway connects. */}}
{{- define "pdgate.kvEvents" -}}
{{- $ev := .Values.engines.kvEvents }}
{{- toYaml (dict "endpoint" (printf "tcp://*:%d" (int $ev.port)) "replay_endpoint" (printf "tcp://*:%d" (int $ev.replayPort)) "topic" $ev.topic) }}
{{- end }}

{{/* vLLM's OTLP/HTTP traces URL, as pdgate.common.runtime.otlp_traces_url makes it. */}}
{{- define "pdgate.otlpTracesUrl" -}}
{{- $u := urlParse . }}
{{- if or (eq $u.path "") (eq $u.path "/") }}
{{- urlJoin (dict "scheme" $u.scheme "host" $u.host "path" "/v1/traces" "query" $u.query "fragment" $u.fragment "userinfo" $u.userinfo) }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* `pdgate engine vllm --device gpu ... --print` for one role: {argv: [...], env: [{name, value}]}.
Arguments: root, role, spec. */}}
{{- define "pdgate.vllm.command" -}}
{{- $s := .spec }}
{{- $l := default dict $s.launch }}
{{- $argv := list $s.python "-m" "vllm.entrypoints.openai.api_server" "--model" $s.model.path "--served-model-name" $s.model.name "--host" "0.0.0.0" "--port" (include "pdgate.int" $s.port) "--seed" (include "pdgate.int" (default 0 $l.seed)) }}
{{- $env := list (dict "name" "HF_HUB_OFFLINE" "value" "1") (dict "name" "TRANSFORMERS_OFFLINE" "value" "1") (dict "name" "VLLM_NO_USAGE_STATS" "value" "1") (dict "name" "DO_NOT_TRACK" "value" "1") }}
{{- if $l.dtype }}{{ $argv = concat $argv (list "--dtype" $l.dtype) }}{{ end }}
{{- if $l.max_model_len }}{{ $argv = concat $argv (list "--max-model-len" (include "pdgate.int" $l.max_model_len)) }}{{ end }}
{{- if $l.block_size }}{{ $argv = concat $argv (list "--block-size" (include "pdgate.int" $l.block_size)) }}{{ end }}
{{- if $l.max_num_seqs }}{{ $argv = concat $argv (list "--max-num-seqs" (include "pdgate.int" $l.max_num_seqs)) }}{{ end }}
{{- if $l.kv_cache_bytes }}{{ $argv = concat $argv (list "--kv-cache-memory-bytes" (include "pdgate.int" $l.kv_cache_bytes)) }}{{ end }}
{{- if ne .role "both" }}
{{- $kvRole := get (dict "prefill" "kv_producer" "decode" "kv_consumer") .role | default "kv_both" }}
{{- $connector := printf "{\"kv_connector\": \"NixlConnector\", \"kv_role\": \"%s\", \"kv_buffer_device\": \"%s\", \"kv_load_failure_policy\": \"%s\"}" $kvRole (default "cuda" $l.kv_buffer_device) (default "recompute" $l.kv_load_failure_policy) }}
{{- $argv = concat $argv (list "--kv-transfer-config" $connector) }}
{{- $env = concat $env (list (dict "name" "VLLM_NIXL_SIDE_CHANNEL_HOST" "value" "$(POD_IP)") (dict "name" "VLLM_NIXL_SIDE_CHANNEL_PORT" "value" (include "pdgate.int" $s.sideChannelPort))) }}
{{- end }}
{{- if .root.Values.engines.kvEvents.enabled }}
{{- $ev := include "pdgate.kvEvents" .root | fromYaml }}
{{- $events := printf "{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", \"endpoint\": %s, \"topic\": %s, \"replay_endpoint\": %s}" (toJson $ev.endpoint) (toJson $ev.topic) (toJson $ev.replay_endpoint) }}
{{- $argv = concat $argv (list "--kv-events-config" $events) }}
{{- end }}
{{- if $l.otlp_traces_endpoint }}
{{- $argv = concat $argv (list "--otlp-traces-endpoint" (include "pdgate.otlpTracesUrl" $l.otlp_traces_endpoint)) }}
{{- $env = append $env (dict "name" "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" "value" "http/protobuf") }}
{{- end }}
{{- $argv = concat $argv (default list $l.extra_args) }}
{{- toYaml (dict "argv" $argv "env" $env) }}
{{- end }}

{{/* `pdgate engine sglang ... --print` for one role: {argv: [...], env: []}. Arguments: root, role, spec. */}}
{{- define "pdgate.sglang.command" -}}
{{- $s := .spec }}
{{- $l := default dict $s.launch }}
{{- $argv := list $s.python "-m" "sglang.launch_server" "--model-path" $s.model.path "--host" "0.0.0.0" "--port" (include "pdgate.int" $s.port) "--tp-size" (include "pdgate.int" (default 1 $l.tp_size)) "--dp-size" (include "pdgate.int" (default 1 $l.dp_size)) "--served-model-name" $s.model.name }}
{{- if hasKey $l "mem_fraction_static" }}{{ $argv = concat $argv (list "--mem-fraction-static" (include "pdgate.pyfloat" $l.mem_fraction_static)) }}{{ end }}
{{- if hasKey $l "context_length" }}{{ $argv = concat $argv (list "--context-length" (include "pdgate.int" $l.context_length)) }}{{ end }}
{{- if hasKey $l "page_size" }}{{ $argv = concat $argv (list "--page-size" (include "pdgate.int" $l.page_size)) }}{{ end }}
{{- if hasKey $l "schedule_policy" }}{{ $argv = concat $argv (list "--schedule-policy" $l.schedule_policy) }}{{ end }}
{{- if hasKey $l "log_level" }}{{ $argv = concat $argv (list "--log-level" $l.log_level) }}{{ end }}
{{- if or (not (hasKey $l "enable_metrics")) $l.enable_metrics }}{{ $argv = append $argv "--enable-metrics" }}{{ end }}
{{- if $l.enable_priority_scheduling }}{{ $argv = append $argv "--enable-priority-scheduling" }}{{ end }}
{{- if $l.trust_remote_code }}{{ $argv = append $argv "--trust-remote-code" }}{{ end }}
{{- if .root.Values.engines.kvEvents.enabled }}
{{- $ev := include "pdgate.kvEvents" .root | fromYaml }}
{{- $events := printf "{\"publisher\": \"zmq\", \"endpoint\": %s, \"topic\": %s, \"replay_endpoint\": %s}" (toJson $ev.endpoint) (toJson $ev.topic) (toJson $ev.replay_endpoint) }}
{{- $argv = concat $argv (list "--kv-events-config" $events) }}
{{- end }}
{{- if ne .role "both" }}
{{- $argv = concat $argv (list "--disaggregation-mode" .role "--disaggregation-transfer-backend" (default "mooncake" $l.transfer_backend)) }}
{{- if eq .role "prefill" }}
{{- $argv = concat $argv (list "--disaggregation-bootstrap-port" (include "pdgate.int" $s.bootstrapPort)) }}
{{- end }}
{{- if $l.ib_device }}{{ $argv = concat $argv (list "--disaggregation-ib-device" $l.ib_device) }}{{ end }}
{{- end }}
{{- $argv = concat $argv (default list $l.extra_args) }}
{{- toYaml (dict "argv" $argv "env" list) }}
{{- end }}

{{/* The pdgate.io/instance annotation of one role's pods: the gateway's instance fields the
chart knows (KV events, the SGLang bootstrap port, the block size), under the role's own
`instance`. Arguments: root, engine, role, spec. */}}
{{- define "pdgate.engineInstance" -}}
{{- $l := default dict .spec.launch }}
{{- $fields := dict }}
{{- if .root.Values.engines.kvEvents.enabled }}
{{- $_ := set $fields "kv_events" (include "pdgate.kvEvents" .root | fromYaml) }}
{{- end }}
{{- if and (eq .engine "vllm") $l.block_size }}
{{- $_ := set $fields "block_size" (int $l.block_size) }}
{{- end }}
{{- if and (eq .engine "sglang") $l.page_size }}
{{- $_ := set $fields "block_size" (int $l.page_size) }}
{{- end }}
{{- if and (eq .engine "sglang") (eq .role "prefill") }}
{{- $_ := set $fields "bootstrap_port" (int .spec.bootstrapPort) }}
{{- end }}
{{- toJson (mergeOverwrite $fields (deepCopy (default dict .spec.instance))) }}
{{- end }}
