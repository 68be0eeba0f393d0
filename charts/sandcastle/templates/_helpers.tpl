{{- define "sandcastle.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object names are DNS labels, hence the 63-character cap. */}}
{{- define "sandcastle.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sandcastle.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selectors are immutable on a Deployment, so they carry only name and instance. */}}
{{- define "sandcastle.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sandcastle.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sandcastle.labels" -}}
{{ include "sandcastle.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sandcastle
helm.sh/chart: {{ include "sandcastle.chart" . }}
{{- end -}}

{{- define "sandcastle.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sandcastle.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sandcastle.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The embedded provider's sandboxes are processes of one pod; a second replica would
     hold none of them. */}}
{{- define "sandcastle.replicas" -}}
{{- if .Values.provider.embedded.enabled -}}1{{- else -}}{{ int64 .Values.replicaCount }}{{- end -}}
{{- end -}}

{{- define "sandcastle.leaseName" -}}
{{- default (include "sandcastle.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{/* What the operator does in every namespace it watches; shared by the ClusterRole and the
     per-namespace Roles so both modes grant exactly the same. */}}
{{- define "sandcastle.watchRules" -}}
- apiGroups: ["sandcastle.dev"]
  resources: ["agenttasks"]
  # delete: ttlSecondsAfterFinished removes finished tasks.
  verbs: ["get", "list", "watch", "patch", "update", "delete"]
- apiGroups: ["sandcastle.dev"]
  resources: ["sandboxtemplates"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["sandcastle.dev"]
  resources: ["agenttasks/status", "sandboxtemplates/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["sandcastle.dev"]
  resources: ["agenttasks/finalizers", "sandboxtemplates/finalizers"]
  verbs: ["update"]
# Values of referenced keys are read one by one; list and watch serve metadata-only
# watches that notice a Secret appearing or changing.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# Build contexts are read; task transcripts are written with server-side apply.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{- define "sandcastle.subjects" -}}
- kind: ServiceAccount
  name: {{ include "sandcastle.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}

{{/* The sandbox server (sandboxd.enabled): its own name and selector, so that neither
     Deployment's selector matches the other's pods. */}}
{{- define "sandcastle.sandboxd.fullname" -}}
{{- printf "%s-sandboxd" (include "sandcastle.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}

{{- define "sandcastle.sandboxd.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-sandboxd" (include "sandcastle.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sandcastle.sandboxd.labels" -}}
{{ include "sandcastle.sandboxd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sandcastle
app.kubernetes.io/component: sandbox-server
helm.sh/chart: {{ include "sandcastle.chart" . }}
{{- end -}}

{{- define "sandcastle.sandboxd.namespace" -}}
{{- default .Release.Namespace .Values.sandboxd.namespace -}}
{{- end -}}

{{- define "sandcastle.sandboxd.buildNamespace" -}}
{{- default (include "sandcastle.sandboxd.namespace" .) .Values.sandboxd.builder.namespace -}}
{{- end -}}

{{- define "sandcastle.sandboxd.keySecret" -}}
{{- default (include "sandcastle.sandboxd.fullname" .) .Values.sandboxd.apiKeySecretRef.name -}}
{{- end -}}

{{/* In-cluster URLs of the sandbox server, for the operator and the NOTES. */}}
{{- define "sandcastle.sandboxd.host" -}}
{{- printf "%s.%s.svc" (include "sandcastle.sandboxd.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* The MCP server (mcp.enabled): labels of its own, so neither the operator's
     Deployment, PodDisruptionBudget nor NetworkPolicy selects its pods. */}}
{{- define "sandcastle.mcp.fullname" -}}
{{- printf "%s-mcp" (include "sandcastle.fullname" . | trunc 59 | trimSuffix "-") -}}
{{- end -}}

{{- define "sandcastle.mcp.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-mcp" (include "sandcastle.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sandcastle.mcp.labels" -}}
{{ include "sandcastle.mcp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sandcastle
app.kubernetes.io/component: mcp-server
helm.sh/chart: {{ include "sandcastle.chart" . }}
{{- end -}}

{{- define "sandcastle.mcp.namespace" -}}
{{- default .Release.Namespace .Values.mcp.namespace -}}
{{- end -}}
