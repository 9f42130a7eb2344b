{{/* Names, labels and the small pieces every component template shares. */}}

{{- define "wiremesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wiremesh.fullname" -}}
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

{{/* "RELEASE-wiremesh-<component>"; call with (dict "root" $ "component" "coord"). */}}
{{- define "wiremesh.componentName" -}}
{{- printf "%s-%s" (include "wiremesh.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wiremesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wiremesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "wiremesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "wiremesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: wiremesh
{{- end }}

{{/* An image reference: (dict "root" $ "image" .Values.coord.image). */}}
{{- define "wiremesh.image" -}}
{{- $repo := .image.repository }}
{{- if .root.Values.imageRegistry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" .root.Values.imageRegistry) $repo }}
{{- end }}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "wiremesh.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s:%d" (include "wiremesh.componentName" (dict "root" . "component" "nats")) (int .Values.nats.port) }}
{{- else }}
{{- required "nats.url is required when nats.enabled is false" .Values.nats.url }}
{{- end }}
{{- end }}

{{- define "wiremesh.coordUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "wiremesh.componentName" (dict "root" . "component" "coord")) .Release.Namespace (int .Values.coord.service.port) }}
{{- end }}

{{- define "wiremesh.loginServer" -}}
{{- default (include "wiremesh.coordUrl" .) .Values.coord.loginServer }}
{{- end }}

{{- define "wiremesh.adminKeySecret" -}}
{{- default (include "wiremesh.componentName" (dict "root" . "component" "admin-key")) .Values.adminKey.existingSecret }}
{{- end }}

{{/* Per-node keys: the agents take their node's one-off key from the operator's Secret. */}}
{{- define "wiremesh.agentKeysFromOperator" -}}
{{- if and .Values.agent.enabled .Values.agent.authKey.fromOperator }}
{{- if not (and .Values.operator.enabled .Values.operator.mirrorNodes) }}
{{- fail "agent.authKey.fromOperator needs operator.enabled and operator.mirrorNodes (the operator writes each node's key); set it to false to use one shared key from agent.authKey.existingSecret" }}
{{- end }}
{{- "true" }}
{{- end }}
{{- end }}

{{/* The namespace holding only the per-node auth-key Secrets (which the agents may read). */}}
{{- define "wiremesh.nodeKeysNamespace" -}}
{{- default (printf "%s-node-keys" .Release.Namespace) .Values.agent.authKey.nodeKeysNamespace | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wiremesh.agentServiceAccount" -}}
{{- include "wiremesh.componentName" (dict "root" . "component" "agent") }}
{{- end }}

{{- define "wiremesh.agentAuthKeySecret" -}}
{{- default (include "wiremesh.componentName" (dict "root" . "component" "agent-authkey")) .Values.agent.authKey.existingSecret }}
{{- end }}

{{/* Environment shared by coord and keys: NATS, the database (from its Secret) and the state dir. */}}
{{- define "wiremesh.serviceEnv" -}}
- name: WIREMESH_NATS_URL
  value: {{ include "wiremesh.natsUrl" . | quote }}
- name: WIREMESH_STATE_DIR
  value: /var/lib/wiremesh
- name: WIREMESH_REPLICA_ID
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
{{- if .Values.database.existingSecret }}
- name: WIREMESH_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
{{- end }}
{{- end }}

{{- define "wiremesh.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "wiremesh.securityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{- define "wiremesh.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* nodeSelector, tolerations and affinity of one component's values. */}}
{{- define "wiremesh.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
