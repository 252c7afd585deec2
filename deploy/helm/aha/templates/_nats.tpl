{{/*
The wire names of protocol/names.py, and the NATS users and permissions of each role.
deploy/nats/nats.conf (compose) has the same users and permissions; tests/unit/deploy/
test_helm.py checks both against protocol/names.py, and tests/integration/
test_nats_permissions.py runs aha's code paths against them on a real nats-server.
Each user subscribes only to its own replies, _INBOX_<user>.>: aha connects as <user> with
that inbox prefix (protocol/names.py), so no user receives what another one fetched.
*/}}

{{- define "aha.wire" -}}
tasks: {subject: aha.tasks, stream: AHA_TASKS, consumer: actors}
rollouts: {subject: aha.rollouts, stream: AHA_ROLLOUTS, consumer: rewarders}
scored: {subject: aha.scored.>, train: aha.scored.train, jobs: aha.scored.*, stream: AHA_SCORED, consumer: learner}
dead: {prefix: aha.dead, stream: AHA_DEAD}
kv: aha-policy
kvKey: latest
objectStore: aha-weights
{{- end -}}

{{/* Permissions of one stage consumer: fetch, ack, the max-deliveries advisory (read and
delete the message it names), its output and its dead letters. (dict "stage" $s "name" "tasks") */}}
{{- define "aha.consumerPublish" -}}
- {{ printf "$JS.API.CONSUMER.MSG.NEXT.%s.%s" .stage.stream .stage.consumer | quote }}
- {{ printf "$JS.ACK.%s.%s.>" .stage.stream .stage.consumer | quote }}
- {{ printf "$JS.API.STREAM.MSG.GET.%s" .stage.stream | quote }}
- {{ printf "$JS.API.STREAM.MSG.DELETE.%s" .stage.stream | quote }}
{{- end -}}

{{- define "aha.natsPermissions" -}}
{{- $w := include "aha.wire" . | fromYaml -}}
{{- $kv := printf "KV_%s" $w.kv -}}
{{- $obj := printf "OBJ_%s" $w.objectStore -}}
{{- $advisory := "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES" -}}
learner:
  publish:
    - "$JS.API.>"
    - {{ printf "$JS.ACK.%s.%s.>" $w.scored.stream $w.scored.consumer | quote }}
    - "$JS.FC.>"
    - {{ printf "$KV.%s.>" $w.kv | quote }}
    - {{ printf "$O.%s.>" $w.objectStore | quote }}
    - {{ $w.tasks.subject | quote }}
    - {{ printf "%s.scored" $w.dead.prefix | quote }}
  subscribe:
    - "_INBOX_learner.>"
    - {{ printf "%s.%s.%s" $advisory $w.scored.stream $w.scored.consumer | quote }}
actor:
  publish:
    {{- include "aha.consumerPublish" (dict "stage" $w.tasks) | nindent 4 }}
    - {{ $w.rollouts.subject | quote }}
    - {{ printf "%s.tasks" $w.dead.prefix | quote }}
    - {{ printf "$JS.API.STREAM.INFO.%s" $kv | quote }}
    - {{ printf "$JS.API.STREAM.MSG.GET.%s" $kv | quote }}
    - {{ printf "$JS.API.CONSUMER.CREATE.%s" $kv | quote }}
    - {{ printf "$JS.API.CONSUMER.INFO.%s.*" $kv | quote }}
    - {{ printf "$JS.FC.%s.>" $kv | quote }}
    - "$JS.API.STREAM.NAMES"
    - {{ printf "$JS.API.STREAM.INFO.%s" $obj | quote }}
    - {{ printf "$JS.API.STREAM.MSG.GET.%s" $obj | quote }}
    - {{ printf "$JS.API.CONSUMER.CREATE.%s" $obj | quote }}
    - {{ printf "$JS.FC.%s.>" $obj | quote }}
  subscribe:
    - "_INBOX_actor.>"
    - {{ printf "%s.%s.%s" $advisory $w.tasks.stream $w.tasks.consumer | quote }}
rewarder:
  publish:
    {{- include "aha.consumerPublish" (dict "stage" $w.rollouts) | nindent 4 }}
    - {{ $w.scored.subject | quote }}
    - {{ printf "%s.rollouts" $w.dead.prefix | quote }}
  subscribe:
    - "_INBOX_rewarder.>"
    - {{ printf "%s.%s.%s" $advisory $w.rollouts.stream $w.rollouts.consumer | quote }}
jobs:
  publish:
    - {{ printf "$JS.API.CONSUMER.CREATE.%s.*.%s" $w.scored.stream $w.scored.jobs | quote }}
    - {{ printf "$JS.API.CONSUMER.DELETE.%s.*" $w.scored.stream | quote }}
    - {{ printf "$JS.API.CONSUMER.MSG.NEXT.%s.*" $w.scored.stream | quote }}
    - {{ printf "$JS.ACK.%s.*.>" $w.scored.stream | quote }}
    {{- range $s := list $w.tasks.stream $w.rollouts.stream $w.scored.stream $kv $w.dead.stream }}
    - {{ printf "$JS.API.STREAM.INFO.%s" $s | quote }}
    {{- end }}
    - {{ printf "$JS.API.STREAM.MSG.GET.%s" $w.dead.stream | quote }}
    - {{ $w.tasks.subject | quote }}
    - {{ printf "%s.scored" $w.dead.prefix | quote }}
  deny:
    - {{ printf "$JS.API.CONSUMER.CREATE.%s.%s.>" $w.scored.stream $w.scored.consumer | quote }}
    - {{ printf "$JS.API.CONSUMER.CREATE.%s.*.%s" $w.scored.stream $w.scored.train | quote }}
    - {{ printf "$JS.API.CONSUMER.DELETE.%s.%s" $w.scored.stream $w.scored.consumer | quote }}
    - {{ printf "$JS.API.CONSUMER.MSG.NEXT.%s.%s" $w.scored.stream $w.scored.consumer | quote }}
    - {{ printf "$JS.ACK.%s.%s.>" $w.scored.stream $w.scored.consumer | quote }}
  subscribe:
    - "_INBOX_jobs.>"
exporter:
  publish:
    {{- range $s := list $w.tasks $w.rollouts $w.scored }}
    - {{ printf "$JS.API.STREAM.INFO.%s" $s.stream | quote }}
    {{- end }}
    - {{ printf "$JS.API.STREAM.INFO.%s" $w.dead.stream | quote }}
    {{- range $s := list $w.tasks $w.rollouts $w.scored }}
    - {{ printf "$JS.API.CONSUMER.INFO.%s.%s" $s.stream $s.consumer | quote }}
    {{- end }}
  subscribe:
    - "_INBOX_exporter.>"
{{- end -}}

{{/* auth.conf for nats-server (JSON syntax, which nats-server reads): (dict "root" $ "passwords" $pw). */}}
{{- define "aha.authConf" -}}
{{- $perms := include "aha.natsPermissions" .root | fromYaml -}}
{{- $roles := list "learner" "actor" "rewarder" "jobs" "exporter" -}}
{"authorization": {"users": [
{{- range $i, $role := $roles }}
{{- $p := index $perms $role }}
  {"user": {{ $role | quote }}, "password": {{ index $.passwords $role | quote }}, "permissions": {
    "publish": {"allow": [{{ range $j, $s := $p.publish }}{{ if $j }}, {{ end }}{{ $s | quote }}{{ end }}]
      {{- with $p.deny }}, "deny": [{{ range $j, $s := . }}{{ if $j }}, {{ end }}{{ $s | quote }}{{ end }}]{{ end }}},
    "subscribe": {"allow": [{{ range $j, $s := $p.subscribe }}{{ if $j }}, {{ end }}{{ $s | quote }}{{ end }}]}
  }}{{ if lt $i 4 }},{{ end }}
{{- end }}
]}}
{{- end -}}
