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
{{- printf "%s://%s:%d" (ternary "tls" "nats" .Values.nats.tls.enabled) (include "wiremesh.componentName" (dict "root" . "component" "nats")) (int .Values.nats.port) }}
{{- else }}
{{- required "nats.url is required when nats.enabled is false" .Values.nats.url }}
{{- end }}
{{- end }}

{{/* The bus roles (wiremesh.core.busauth.ROLES; their permissions: files/nats-permissions.json). */}}
{{- define "wiremesh.natsRoles" -}}
{{- toJson (list "coord" "keys" "derp") }}
{{- end }}

{{/* The Secret holding one role's NATS credential: (dict "root" $ "role" "coord"). */}}
{{- define "wiremesh.natsCredentialsSecret" -}}
{{- $existing := index .root.Values.nats.auth.existingSecrets .role }}
{{- if $existing }}
{{- $existing }}
{{- else if .root.Values.nats.enabled }}
{{- include "wiremesh.componentName" (dict "root" .root "component" (printf "nats-%s" .role)) }}
{{- else }}
{{- fail (printf "with an external NATS (nats.enabled=false) each service needs its credential: set nats.auth.existingSecrets.%s (a Secret with key `credentials`: an NKey seed or USER:PASSWORD whose user has the %s role's permissions, files/nats-permissions.json)" .role .role) }}
{{- end }}
{{- end }}

{{/* The Secret with the bus's CA certificate (ca.crt), or nothing when the bus has no TLS. */}}
{{- define "wiremesh.natsCaSecret" -}}
{{- if .Values.nats.tls.existingSecret }}
{{- .Values.nats.tls.existingSecret }}
{{- else if and .Values.nats.enabled .Values.nats.tls.enabled }}
{{- include "wiremesh.componentName" (dict "root" . "component" "nats-tls") }}
{{- end }}
{{- end }}

{{/* A service's bus credential and CA as files (never values in its environment or argv):
     env, volumeMounts and volumes, each called with (dict "root" $ "role" "coord"). */}}
{{- define "wiremesh.natsEnv" -}}
- name: WIREMESH_NATS_CREDENTIALS
  value: /etc/wiremesh-nats/credentials
{{- if include "wiremesh.natsCaSecret" .root }}
- name: WIREMESH_NATS_CA
  value: /etc/wiremesh-nats-ca/ca.crt
{{- end }}
{{- end }}

{{- define "wiremesh.natsVolumeMounts" -}}
- {name: nats-credentials, mountPath: /etc/wiremesh-nats, readOnly: true}
{{- if include "wiremesh.natsCaSecret" .root }}
- {name: nats-ca, mountPath: /etc/wiremesh-nats-ca, readOnly: true}
{{- end }}
{{- end }}

{{- define "wiremesh.natsVolumes" -}}
- name: nats-credentials
  secret:
    secretName: {{ include "wiremesh.natsCredentialsSecret" . }}
    defaultMode: 0440  # the pod's fsGroup reads it
    items: [{key: credentials, path: credentials}]
{{- with include "wiremesh.natsCaSecret" .root }}
- name: nats-ca
  secret:
    secretName: {{ . }}
    items: [{key: ca.crt, path: ca.crt}]
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

{{/* The namespace of the MeshNodes' auth-key Secrets: the only Secrets the operator may touch
besides the per-node ones (not the admin key, database or bus credentials in the release's). */}}
{{- define "wiremesh.meshNodeKeysNamespace" -}}
{{- default (printf "%s-meshnode-keys" .Release.Namespace) .Values.operator.meshNodeKeysNamespace | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wiremesh.agentServiceAccount" -}}
{{- include "wiremesh.componentName" (dict "root" . "component" "agent") }}
{{- end }}

{{- define "wiremesh.agentAuthKeySecret" -}}
{{- default (include "wiremesh.componentName" (dict "root" . "component" "agent-authkey")) .Values.agent.authKey.existingSecret }}
{{- end }}

{{/* Environment shared by coord and keys: NATS, the database (from its Secret) and the state dir;
     called with (dict "root" $ "role" "coord"). */}}
{{- define "wiremesh.serviceEnv" -}}
{{- $root := .root }}
- name: WIREMESH_NATS_URL
  value: {{ include "wiremesh.natsUrl" $root | quote }}
{{ include "wiremesh.natsEnv" . }}
- name: WIREMESH_STATE_DIR
  value: /var/lib/wiremesh
- name: WIREMESH_REPLICA_ID
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
{{- if $root.Values.database.existingSecret }}
- name: WIREMESH_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.database.existingSecret }}
      key: {{ $root.Values.database.secretKey }}
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

{{/* Non-empty when the operator runs with its own scoped admin key (coord provisions it). */}}
{{- define "wiremesh.operatorScopedKey" -}}
{{- if and .Values.operator.enabled .Values.coord.enabled .Values.operator.scopedAdminKey }}true{{ end }}
{{- end }}

{{- define "wiremesh.operatorKeySecret" -}}
{{- include "wiremesh.componentName" (dict "root" . "component" "operator-key") }}
{{- end }}
