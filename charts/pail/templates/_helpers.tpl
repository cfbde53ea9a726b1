{{/*
The driver's name: what kubelet, the CSIDriver object, StorageClasses and PVs call it.
It is fixed in the driver (driver/csi/identity.py, DRIVER_NAME) and answered by
GetPluginInfo, so it is not a value: a different name here would register a driver that
kubelet cannot match to Pail's answers.
*/}}
{{- define "pail.driverName" -}}
s3.csi.pail.dev
{{- end }}

{{- define "pail.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of object names: the release name, unless it lacks the chart name. A release
called "pail" gives "pail-node", the ServiceAccount name docs/CREDENTIALS.md uses.
*/}}
{{- define "pail.fullname" -}}
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

{{- define "pail.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pail.labels" -}}
helm.sh/chart: {{ include "pail.chart" . }}
{{ include "pail.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pail.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pail.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component's objects; call with (dict "root" $ "component" "node"). */}}
{{- define "pail.componentLabels" -}}
{{ include "pail.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pail.componentSelectorLabels" -}}
{{ include "pail.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pail.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* A sidecar's image; call with a sidecars.<name> map. */}}
{{- define "pail.sidecarImage" -}}
{{- printf "%s:%s" .image.repository .image.tag }}
{{- end }}

{{- define "pail.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pail.nodeServiceAccountName" -}}
{{- if .Values.node.serviceAccount.create }}
{{- default (printf "%s-node" (include "pail.fullname" .)) .Values.node.serviceAccount.name }}
{{- else }}
{{- required "node.serviceAccount.name is required when node.serviceAccount.create is false" .Values.node.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pail.controllerServiceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (printf "%s-controller" (include "pail.fullname" .)) .Values.controller.serviceAccount.name }}
{{- else }}
{{- required "controller.serviceAccount.name is required when controller.serviceAccount.create is false" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Host paths of the node plugin, all under kubelet's root directory so that a custom
node.kubeletDir moves every one of them.
- pluginDir: where kubelet looks for the driver's socket (the registration path below).
- registrationDir: kubelet's plugin watcher directory, where the registrar announces it.
- stateDir: the node server's mount records and credentials files. A hostPath, so that a
  restarted node container finds the records of the mounts the old one made and cleans
  them up (docs/ARCHITECTURE.md, "Restarts"); under the plugin directory so it goes where
  kubelet's data goes and needs no host path of its own.
*/}}
{{- define "pail.kubeletDir" -}}
{{- .Values.node.kubeletDir | trimSuffix "/" }}
{{- end }}

{{- define "pail.pluginDir" -}}
{{- printf "%s/plugins/%s" (include "pail.kubeletDir" .) (include "pail.driverName" .) }}
{{- end }}

{{- define "pail.registrationDir" -}}
{{- printf "%s/plugins_registry" (include "pail.kubeletDir" .) }}
{{- end }}

{{- define "pail.stateDir" -}}
{{- printf "%s/state" (include "pail.pluginDir" .) }}
{{- end }}

{{/* The CSI socket inside the containers; the plugin directory is mounted at /csi. */}}
{{- define "pail.socketDir" -}}
/csi
{{- end }}

{{- define "pail.socketPath" -}}
{{- printf "%s/csi.sock" (include "pail.socketDir" .) }}
{{- end }}

{{/*
Environment of the pail container in both components: the default region, and static
keys from credentials.secretName when given (same keys as a volume's secret, so one Secret
format serves both). Values never carry the keys themselves.
*/}}
{{- define "pail.awsEnv" -}}
{{- with .Values.credentials.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.credentials.secretName }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: key_id
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: access_key
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: session_token
      optional: true
{{- end }}
{{- end }}
