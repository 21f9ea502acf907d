{{/* Names and labels. */}}
{{- define "aimesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aimesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "aimesh.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "aimesh.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<component>; the component names stay short enough for a StatefulSet pod name. */}}
{{- define "aimesh.component" -}}
{{- printf "%s-%s" (include "aimesh.fullname" .root | trunc 45 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "aimesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aimesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "aimesh.labels" -}}
{{ include "aimesh.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: aimesh
{{- end -}}

{{- define "aimesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "aimesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "aimesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Most workers autoscaling may ask for: one per tasks partition. */}}
{{- define "aimesh.maxWorkers" -}}
{{- $partitions := int .Values.topics.tasks.partitions -}}
{{- $max := .Values.autoscaling.maxReplicas | default $partitions | int -}}
{{- if gt $max $partitions -}}
{{- fail (printf "autoscaling.maxReplicas (%d) may not exceed the partitions of %s (%d): the extra workers would get no partition" $max .Values.topics.tasks.name $partitions) -}}
{{- end -}}
{{- if lt $max (int .Values.autoscaling.minReplicas) -}}
{{- fail "autoscaling.maxReplicas may not be below autoscaling.minReplicas" -}}
{{- end -}}
{{- $max -}}
{{- end -}}

{{- define "aimesh.autoscaled" -}}
{{- if and .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled -}}
{{- fail "autoscaling.keda.enabled and autoscaling.hpa.enabled: choose one" -}}
{{- end -}}
{{- if or .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}true{{ end -}}
{{- end -}}

{{/*
AIMESH_TRITON_URL: 127.0.0.1 in sidecar mode; otherwise a comma-separated endpoint list, or dns:/// over a
headless Service (the worker balances over its ready addresses with gRPC round_robin).
*/}}
{{- define "aimesh.tritonUrl" -}}
{{- $t := .Values.triton -}}
{{- if eq $t.mode "sidecar" -}}
{{- printf "127.0.0.1:%d" (int $t.grpcPort) -}}
{{- else if ne $t.mode "pool" -}}
{{- fail (printf "triton.mode must be pool or sidecar, not %q" $t.mode) -}}
{{- else if $t.endpoints -}}
{{- join "," $t.endpoints -}}
{{- else -}}
{{- $svc := $t.headlessService | default (include "aimesh.component" (dict "root" . "component" "triton")) -}}
{{- printf "dns:///%s.%s.svc.%s:%d" $svc .Release.Namespace .Values.clusterDomain (int $t.grpcPort) -}}
{{- end -}}
{{- end -}}

{{/* Whether the chart runs its own Triton pool. */}}
{{- define "aimesh.tritonPool" -}}
{{- if and (eq .Values.triton.mode "pool") (not .Values.triton.endpoints) (not .Values.triton.headlessService) }}true{{ end -}}
{{- end -}}

{{/*
AIMESH_KAFKA_CONFIG, as env entries. The SASL credentials come from the Secret into KAFKA_SASL_USERNAME and
KAFKA_SASL_PASSWORD first; the JSON names them as $(VAR), which the kubelet expands, so no secret is in the manifest.
*/}}
{{- define "aimesh.kafkaEnv" -}}
{{- $k := .Values.kafka -}}
{{- if $k.configSecret.name }}
- name: AIMESH_KAFKA_CONFIG
  valueFrom:
    secretKeyRef:
      name: {{ $k.configSecret.name }}
      key: {{ $k.configSecret.key }}
{{- else }}
{{- $config := deepCopy $k.extraConfig -}}
{{- if ne $k.securityProtocol "PLAINTEXT" }}
{{- $_ := set $config "security.protocol" $k.securityProtocol -}}
{{- end }}
{{- if hasPrefix "SASL_" $k.securityProtocol }}
{{- if not $k.sasl.existingSecret }}{{ fail "kafka.securityProtocol SASL_* needs kafka.sasl.existingSecret" }}{{ end }}
{{- $_ := set $config "sasl.mechanisms" $k.sasl.mechanism -}}
{{- $_ := set $config "sasl.username" "$(KAFKA_SASL_USERNAME)" -}}
{{- $_ := set $config "sasl.password" "$(KAFKA_SASL_PASSWORD)" }}
- name: KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.existingSecret }}
      key: {{ $k.sasl.usernameKey }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.existingSecret }}
      key: {{ $k.sasl.passwordKey }}
{{- end }}
{{- if $k.tls.caSecret }}
{{- $_ := set $config "ssl.ca.location" (printf "/etc/aimesh/kafka-ca/%s" $k.tls.caKey) -}}
{{- end }}
{{- if $k.tls.clientSecret }}
{{- $_ := set $config "ssl.certificate.location" "/etc/aimesh/kafka-client/tls.crt" -}}
{{- $_ := set $config "ssl.key.location" "/etc/aimesh/kafka-client/tls.key" -}}
{{- end }}
{{- if $config }}
- name: AIMESH_KAFKA_CONFIG
  value: {{ toJson $config | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
The object store of large tensor contents (the claim check), as env entries; none while objectStore.endpoint is empty.
Its credentials reach the pods as the standard AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from a Secret; without one,
boto3's default chain applies (an IRSA or workload-identity role of the service account, say).
*/}}
{{- define "aimesh.objectStoreEnv" -}}
{{- $o := .Values.objectStore -}}
{{- if $o.endpoint }}
- name: AIMESH_OBJECT_STORE_URL
  value: {{ $o.endpoint | quote }}
- name: AIMESH_OBJECT_STORE_BUCKET
  value: {{ $o.bucket | quote }}
- name: AIMESH_OBJECT_STORE_REGION
  value: {{ $o.region | quote }}
- name: AIMESH_INLINE_LIMIT_BYTES
  value: {{ int64 $o.inlineLimitBytes | quote }}
- name: AIMESH_MAX_OBJECT_BYTES
  value: {{ int64 $o.maxObjectBytes | quote }}
- name: AIMESH_OBJECT_RETENTION_S
  value: {{ $o.retentionSeconds | quote }}
{{- with $o.credentials.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $o.credentials.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $o.credentials.secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The volumes and mounts of the Kafka CA and client certificate, for the services and the topics job. */}}
{{- define "aimesh.kafkaVolumes" -}}
{{- if .Values.kafka.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.tls.caSecret }}
{{- end }}
{{- if .Values.kafka.tls.clientSecret }}
- name: kafka-client
  secret:
    secretName: {{ .Values.kafka.tls.clientSecret }}
{{- end }}
{{- end -}}

{{- define "aimesh.kafkaMounts" -}}
{{- if .Values.kafka.tls.caSecret }}
- name: kafka-ca
  mountPath: /etc/aimesh/kafka-ca
  readOnly: true
{{- end }}
{{- if .Values.kafka.tls.clientSecret }}
- name: kafka-client
  mountPath: /etc/aimesh/kafka-client
  readOnly: true
{{- end }}
{{- end -}}

{{/* What every service sets: the broker, the topics, JSON logs, metrics on every interface, tracing. */}}
{{- define "aimesh.commonEnv" -}}
{{- $root := .root -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: AIMESH_KAFKA_BOOTSTRAP
  value: {{ required "kafka.bootstrap is required" $root.Values.kafka.bootstrap | quote }}
- name: AIMESH_TASKS_TOPIC
  value: {{ $root.Values.topics.tasks.name | quote }}
- name: AIMESH_BATCH_TASKS_TOPIC
  value: {{ $root.Values.topics.batchTasks.name | quote }}
- name: AIMESH_CANCEL_TOPIC
  value: {{ $root.Values.topics.cancel.name | quote }}
- name: AIMESH_RESULTS_TOPIC
  value: {{ $root.Values.topics.results.name | quote }}
- name: AIMESH_DEAD_LETTER_TOPIC
  value: {{ $root.Values.topics.deadLetter.name | quote }}
- name: AIMESH_LOG_FORMAT
  value: json
- name: AIMESH_METRICS_HOST
  value: 0.0.0.0
- name: AIMESH_METRICS_PORT
  value: {{ index $root.Values.metrics.ports .component | quote }}
{{- include "aimesh.kafkaEnv" $root }}
{{- include "aimesh.objectStoreEnv" $root }}
- name: OTEL_SERVICE_NAME
  value: aimesh-{{ .component }}
{{- if $root.Values.otel.enabled }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $root.Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $root.Values.otel.protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $root.Values.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $root.Values.otel.samplerArg | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.namespace.name=%s,k8s.pod.name=$(POD_NAME)" $root.Release.Namespace }}{{ with $root.Values.otel.resourceAttributes }},{{ . }}{{ end }}
{{- else }}
- name: OTEL_TRACES_EXPORTER
  value: none
{{- end }}
{{- end -}}

{{/* Auth and TLS of a gRPC server (ingest, notifier). */}}
{{- define "aimesh.serverEnv" -}}
- name: AIMESH_AUTH
  value: {{ ternary "on" "off" .Values.auth.enabled | quote }}
{{- if .Values.auth.enabled }}
- name: AIMESH_API_KEYS_FILE
  value: /etc/aimesh/api-keys/{{ .Values.auth.key }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: AIMESH_TLS_CERT_FILE
  value: /etc/aimesh/tls/tls.crt
- name: AIMESH_TLS_KEY_FILE
  value: /etc/aimesh/tls/tls.key
{{- if .Values.tls.clientCA.enabled }}
- name: AIMESH_TLS_CLIENT_CA_FILE
  value: /etc/aimesh/client-ca/{{ .Values.tls.clientCA.key }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "aimesh.serverVolumes" -}}
{{- if .Values.auth.enabled }}
- name: api-keys
  secret:
    secretName: {{ .Values.auth.existingSecret | default (printf "%s-api-keys" (include "aimesh.fullname" .)) }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.secretName is required while tls.enabled" .Values.tls.secretName }}
- name: probe
  configMap:
    name: {{ include "aimesh.component" (dict "root" . "component" "probe") }}
{{- if .Values.tls.clientCA.enabled }}
- name: client-ca
  secret:
    secretName: {{ required "tls.clientCA.secretName is required while tls.clientCA.enabled" .Values.tls.clientCA.secretName }}
{{- end }}
{{- end }}
{{- include "aimesh.kafkaVolumes" . }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "aimesh.serverMounts" -}}
{{- if .Values.auth.enabled }}
- name: api-keys
  mountPath: /etc/aimesh/api-keys
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/aimesh/tls
  readOnly: true
- name: probe
  mountPath: /etc/aimesh/probe
  readOnly: true
{{- if .Values.tls.clientCA.enabled }}
- name: client-ca
  mountPath: /etc/aimesh/client-ca
  readOnly: true
{{- end }}
{{- end }}
{{- include "aimesh.kafkaMounts" . }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/*
The health check of a gRPC server: the kubelet's own grpc probe (grpc.health.v1, overall status "") in plaintext;
with TLS, files/health_probe.py in the container, as the kubelet's probe cannot speak TLS.
*/}}
{{- define "aimesh.grpcHealth" -}}
{{- $root := .root -}}
{{- if $root.Values.tls.enabled -}}
exec:
  command:
    - python
    - /etc/aimesh/probe/health_probe.py
    - --ca-file=/etc/aimesh/tls/{{ $root.Values.tls.probe.caKey }}
    - --server-name={{ required "tls.probe.serverName (a name in the server certificate) is required while tls.enabled" $root.Values.tls.probe.serverName }}
    {{- if $root.Values.tls.clientCA.enabled }}
    - --cert-file=/etc/aimesh/tls/tls.crt
    - --key-file=/etc/aimesh/tls/tls.key
    {{- end }}
    - 127.0.0.1:{{ .port }}
{{- else -}}
grpc:
  port: {{ .port }}
{{- end }}
{{- end -}}

{{- define "aimesh.metricsAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ index .root.Values.metrics.ports .component | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}
