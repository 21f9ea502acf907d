{{/* The tritonserver container, for the pool Deployment and the worker sidecar. */}}
{{- define "aimesh.tritonContainer" -}}
{{- $t := .Values.triton -}}
name: triton
image: {{ printf "%s:%s" $t.image.repository $t.image.tag }}
imagePullPolicy: {{ $t.image.pullPolicy }}
command:
  - tritonserver
  - --model-repository={{ $t.modelRepository }}
  # Not ready until every model is loaded: the worker and the headless Service wait for that.
  - --strict-readiness=true
  - --grpc-port={{ $t.grpcPort }}
  {{- with $t.extraArgs }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  - name: triton-grpc
    containerPort: {{ $t.grpcPort }}
  - name: triton-http
    containerPort: 8000
  - name: triton-metrics
    containerPort: 8002
startupProbe:
  httpGet:
    path: /v2/health/ready
    port: triton-http
  periodSeconds: 10
  failureThreshold: {{ max 1 (div $t.startupSeconds 10) }}
readinessProbe:
  httpGet:
    path: /v2/health/ready
    port: triton-http
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  httpGet:
    path: /v2/health/live
    port: triton-http
  periodSeconds: 10
  failureThreshold: 3
resources:
  {{- toYaml $t.resources | nindent 2 }}
securityContext:
  allowPrivilegeEscalation: false
  capabilities:
    drop: [ALL]
volumeMounts:
  - name: dshm
    mountPath: /dev/shm
  {{- if $t.modelVolume }}
  - name: models
    mountPath: {{ $t.modelRepository }}
    readOnly: true
  {{- end }}
{{- end -}}

{{- define "aimesh.tritonVolumes" -}}
{{- $t := .Values.triton -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $t.shmSize }}
{{- if $t.modelVolume }}
- name: models
  {{- toYaml $t.modelVolume | nindent 2 }}
{{- end }}
{{- end -}}
