{{/* Chart name, overridable. */}}
{{- define "bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name, at most 63 characters (a DNS label). */}}
{{- define "bridge.fullname" -}}
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

{{- define "bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "bridge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "bridge.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
Mapping files by path relative to mappings.dir: files under the chart's mappings/ folder,
overridden by .Values.mappings.files. Rendered as YAML; read back with fromYaml.
*/}}
{{- define "bridge.mappingFiles" -}}
{{- $files := dict }}
{{- range $path, $bytes := .Files.Glob "mappings/**" }}
{{- $_ := set $files (trimPrefix "mappings/" $path) (toString $bytes) }}
{{- end }}
{{- range $path, $content := .Values.mappings.files }}
{{- $_ := set $files $path $content }}
{{- end }}
{{- toYaml $files }}
{{- end }}

{{/* ConfigMap keys cannot hold "/": nested mapping paths are encoded with "__". */}}
{{- define "bridge.mappingKey" -}}
{{- replace "/" "__" . }}
{{- end }}

{{/* The Secret holding admin.metrics_token: metrics.token.existingSecret, else the chart's. */}}
{{- define "bridge.metricsTokenSecret" -}}
{{- .Values.metrics.token.existingSecret | default .Values.secrets.existingSecret }}
{{- end }}
