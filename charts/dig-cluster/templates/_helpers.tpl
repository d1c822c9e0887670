{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "dig-cluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: RELEASE-dig-cluster, or the release name alone when it
contains the chart name; fullnameOverride wins. */}}
{{- define "dig-cluster.fullname" -}}
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

{{- define "dig-cluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "dig-cluster.labels" -}}
helm.sh/chart: {{ include "dig-cluster.chart" . }}
{{ include "dig-cluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "dig-cluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dig-cluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels and selector labels of one component: include with
(dict "ctx" $ "component" "api"). */}}
{{- define "dig-cluster.componentLabels" -}}
{{ include "dig-cluster.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dig-cluster.componentSelectorLabels" -}}
{{ include "dig-cluster.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dig-cluster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dig-cluster.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image of the api and the coordinator. */}}
{{- define "dig-cluster.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Image of the workers: worker.image, falling back to image with the
tag suffix (the CUDA build). */}}
{{- define "dig-cluster.workerImage" -}}
{{- $repo := default .Values.image.repository .Values.worker.image.repository }}
{{- $base := printf "%s%s" (default .Chart.AppVersion .Values.image.tag) .Values.worker.image.tagSuffix }}
{{- $tag := default $base .Values.worker.image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* Names of the Secrets (an existing one, or the chart's). */}}
{{- define "dig-cluster.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "dig-cluster.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "dig-cluster.webhookSecretsSecret" -}}
{{- default (printf "%s-webhook-secrets" (include "dig-cluster.fullname" .)) .Values.webhookSecrets.existingSecret }}
{{- end }}

{{- define "dig-cluster.s3Secret" -}}
{{- default (printf "%s-s3" (include "dig-cluster.fullname" .)) .Values.s3Credentials.existingSecret }}
{{- end }}

{{/* Whether S3 credentials are given at all (else the pod's identity). */}}
{{- define "dig-cluster.hasS3Credentials" -}}
{{- if or .Values.s3Credentials.existingSecret .Values.s3Credentials.accessKeyId }}true{{ end }}
{{- end }}

{{/* One TOML value: strings quoted (JSON escapes are valid TOML), numbers
as integers (every numeric setting is one), booleans as they are. */}}
{{- define "dig-cluster.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) }}{{ int64 . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else }}{{ fail (printf "config: %v is not a string, number or boolean" .) }}
{{- end }}
{{- end }}

{{/* Environment shared by the three services: the config file, the log
filter, the URLs (they may carry passwords, so they can come from Secrets;
KEDA also reads DIG_QUEUE_URL from here) and the S3 credentials. */}}
{{- define "dig-cluster.commonEnv" -}}
- name: DIG_CONFIG
  value: /etc/dig/config.toml
- name: DIG_LOG
  value: {{ .Values.logLevel | quote }}
- name: DIG_QUEUE_URL
{{- if .Values.config.queue.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.config.queue.existingSecret }}
      key: {{ .Values.config.queue.existingSecretKey }}
{{- else }}
  value: {{ required "config.queue.url is required" .Values.config.queue.url | quote }}
{{- end }}
- name: DIG_PROGRESS_URL
{{- if .Values.config.progress.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.config.progress.existingSecret }}
      key: {{ .Values.config.progress.existingSecretKey }}
{{- else }}
  value: {{ required "config.progress.url is required" .Values.config.progress.url | quote }}
{{- end }}
{{- if include "dig-cluster.hasS3Credentials" . }}
- name: DIG_STORE_S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "dig-cluster.s3Secret" . }}
      key: {{ .Values.s3Credentials.accessKeyIdKey }}
- name: DIG_STORE_S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "dig-cluster.s3Secret" . }}
      key: {{ .Values.s3Credentials.secretAccessKeyKey }}
{{- end }}
{{- end }}

{{/* Pod annotations that roll the pods when the configuration changes. */}}
{{- define "dig-cluster.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secrets: {{ include (print .Template.BasePath "/secrets.yaml") . | sha256sum }}
{{- end }}

{{/* Volumes every pod has: the config file and a writable /tmp (the root
file system is read-only). */}}
{{- define "dig-cluster.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "dig-cluster.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "dig-cluster.commonVolumeMounts" -}}
- name: config
  mountPath: /etc/dig/config.toml
  subPath: config.toml
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}
