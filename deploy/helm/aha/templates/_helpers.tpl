{{/* Names, labels, images and the environment every aha container shares. */}}

{{- define "aha.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "aha.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "aha.labels" -}}
{{ include "aha.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* image: (dict "root" $ "kind" "gpu|cpu|rewarder") */}}
{{- define "aha.image" -}}
{{- $img := index .root.Values.images .kind -}}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* The NATS service of the subchart (its fullname rule), or the external URL. */}}
{{- define "aha.natsHost" -}}
{{- if contains "nats" .Release.Name -}}
{{- printf "%s.%s.svc" .Release.Name .Release.Namespace -}}
{{- else -}}
{{- printf "%s-nats.%s.svc" .Release.Name .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* The NATS server pods of the subchart (its selector labels, not nats-box's). */}}
{{- define "aha.natsSelectorLabels" -}}
app.kubernetes.io/name: nats
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: nats
{{- end -}}

{{- define "aha.natsUrl" -}}
{{- if .Values.nats.enabled -}}
{{- printf "%s://%s:4222" (ternary "tls" "nats" .Values.tls.enabled) (include "aha.natsHost" .) -}}
{{- else -}}
{{- required "nats.url is required when nats.enabled=false" .Values.nats.url -}}
{{- end -}}
{{- end -}}

{{- define "aha.natsMonitoringEndpoint" -}}
{{- if .Values.nats.enabled -}}
{{- printf "%s:8222" (include "aha.natsHost" .) -}}
{{- else -}}
{{- required "nats.monitoringEndpoint is required for autoscaling with an external NATS" .Values.nats.monitoringEndpoint -}}
{{- end -}}
{{- end -}}

{{- define "aha.authSecret" -}}
{{- default .Values.auth.secretName .Values.auth.existingSecret -}}
{{- end -}}

{{/* env: (dict "root" $ "role" "learner|actor|rewarder|exporter") — NATS URL and this role's user. */}}
{{- define "aha.busEnv" -}}
- name: NATS_URL
  value: {{ include "aha.natsUrl" .root | quote }}
- name: AHA_BUS__USER
  value: {{ .role }}
- name: AHA_BUS__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "aha.authSecret" .root }}
      key: {{ .role }}-password
{{- if ne .role "learner" }}
# Only the learner (and the set-up job) may create or update streams.
- name: AHA_BUS__SETUP_STREAMS
  value: "false"
{{- end }}
{{- if .root.Values.tls.enabled }}
- name: AHA_BUS__TLS_CA_FILE
  value: /etc/aha/tls/ca/ca.crt
{{- if .root.Values.tls.clientSecret }}
- name: AHA_BUS__TLS_CERT_FILE
  value: /etc/aha/tls/client/tls.crt
- name: AHA_BUS__TLS_KEY_FILE
  value: /etc/aha/tls/client/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{- define "aha.configVolumeMounts" -}}
- name: config
  mountPath: /etc/aha
  readOnly: true
{{- if .Values.tls.enabled }}
- name: tls-ca
  mountPath: /etc/aha/tls/ca
  readOnly: true
{{- if .Values.tls.clientSecret }}
- name: tls-client
  mountPath: /etc/aha/tls/client
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "aha.configVolumes" -}}
- name: config
  configMap:
    name: {{ include "aha.fullname" . }}-config
{{- if .Values.tls.enabled }}
- name: tls-ca
  secret:
    secretName: {{ required "tls.caSecret is required when tls.enabled" .Values.tls.caSecret }}
{{- if .Values.tls.clientSecret }}
- name: tls-client
  secret:
    secretName: {{ .Values.tls.clientSecret }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Pod-level securityContext for the non-root aha images (uid 10001). */}}
{{- define "aha.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Every aha container: read-only root, no capabilities, no setuid gains. */}}
{{- define "aha.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Writable paths of learner and actor under a read-only root: /tmp, and $HOME for the
caches of Triton, torch.compile, vLLM and DeepSpeed's ops (kernels built and loaded there). */}}
{{- define "aha.scratchVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/aha
{{- end -}}

{{- define "aha.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end -}}

{{/* Learner and actor: the HTTP weight server (protocol/weight_server.py), advertised at the
pod's own address. `role` is LEARNER or ACTOR. */}}
{{- define "aha.weightServerEnv" -}}
{{- $w := .root.Values.weightServer -}}
- name: AHA_{{ .role }}__WEIGHT_SERVER__ENABLED
  value: {{ $w.enabled | quote }}
{{- if $w.enabled }}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: AHA_{{ .role }}__WEIGHT_SERVER__PORT
  value: {{ $w.port | quote }}
- name: AHA_{{ .role }}__WEIGHT_SERVER__ADVERTISE
  value: {{ printf "http://$(POD_IP):%d" (int $w.port) | quote }}
- name: AHA_{{ .role }}__WEIGHT_SERVER__FANOUT
  value: {{ $w.fanout | quote }}
{{- end }}
{{- end -}}
