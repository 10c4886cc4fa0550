{{/* ---------------------------------------------------------------------------------------
Names and labels
--------------------------------------------------------------------------------------------- */}}

{{- define "rlhf-loop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, prefixed to the chart name unless it contains it. */}}
{{- define "rlhf-loop.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rlhf-loop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every pod of the release (NetworkPolicies select on them). */}}
{{- define "rlhf-loop.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf-loop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rlhf-loop.labels" -}}
helm.sh/chart: {{ include "rlhf-loop.chart" . }}
{{ include "rlhf-loop.releaseSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf-loop
{{- end }}

{{/* Selector labels of one component. Argument: (dict "root" $ "name" "inference"). */}}
{{- define "rlhf-loop.selectorLabels" -}}
{{ include "rlhf-loop.releaseSelectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* Labels of one component. Argument: (dict "root" $ "name" "inference"). */}}
{{- define "rlhf-loop.componentLabels" -}}
{{ include "rlhf-loop.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* Name of one component's resources. Argument: (dict "root" $ "name" "inference"). */}}
{{- define "rlhf-loop.componentName" -}}
{{- printf "%s-%s" (include "rlhf-loop.fullname" .root) .name }}
{{- end }}

{{/* The release's service components that are enabled, in order: a YAML list. The canary group of
inference replicas (inference-canary) and the rollout service run with rollout.enabled. */}}
{{- define "rlhf-loop.components" -}}
{{- $out := list }}
{{- range $name := list "gateway" "inference" "inference-canary" "feedback" "reward" "trainer" "rollout" }}
{{- if include "rlhf-loop.componentEnabled" (dict "root" $ "name" $name) }}
{{- $out = append $out $name }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* "true" when a component runs. Argument: (dict "root" $ "name" NAME). */}}
{{- define "rlhf-loop.componentEnabled" -}}
{{- $v := .root.Values }}
{{- if eq .name "inference-canary" }}
{{- if and $v.rollout.enabled $v.inference.enabled }}true{{ end }}
{{- else if eq .name "kafka-topics" }}true
{{- else if (index $v .name).enabled }}true
{{- end }}
{{- end }}

{{/* A component's values, as JSON: .Values.<name>, except the canary inference group, which is the
inference values with its own replica count and no autoscaling. Argument: (dict "root" $ "name" NAME). */}}
{{- define "rlhf-loop.componentValues" -}}
{{- $v := .root.Values }}
{{- if eq .name "inference-canary" }}
{{- $canary := dict "replicas" (int $v.inference.canary.replicas) "autoscaling" (dict "enabled" false) }}
{{- toJson (merge $canary (omit (deepCopy $v.inference) "canary" "autoscaling")) }}
{{- else }}
{{- toJson (index $v .name) }}
{{- end }}
{{- end }}

{{- define "rlhf-loop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlhf-loop.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rlhf-loop.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "rlhf-loop.secretName" -}}
{{- default (printf "%s-secrets" (include "rlhf-loop.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{- define "rlhf-loop.modelStoreClaim" -}}
{{- default (printf "%s-model-store" (include "rlhf-loop.fullname" .)) .Values.modelStore.existingClaim }}
{{- end }}

{{/* The shared ConfigMaps, by the settings they carry (each service reads a subset). */}}
{{- define "rlhf-loop.configMapName" -}}
{{- printf "%s-env-%s" (include "rlhf-loop.fullname" .root) .name }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------
Kafka
--------------------------------------------------------------------------------------------- */}}

{{/* "true" when the chart runs Kafka through Strimzi. */}}
{{- define "rlhf-loop.strimziEnabled" -}}
{{- if and .Values.kafka.strimzi.enabled (not .Values.externalKafka.bootstrapServers) }}true{{ end }}
{{- end }}

{{- define "rlhf-loop.kafkaClusterName" -}}
{{- default (printf "%s-kafka" (include "rlhf-loop.fullname" .)) .Values.kafka.strimzi.clusterName }}
{{- end }}

{{- define "rlhf-loop.kafkaBootstrapServers" -}}
{{- if .Values.externalKafka.bootstrapServers }}
{{- .Values.externalKafka.bootstrapServers }}
{{- else if .Values.kafka.strimzi.enabled }}
{{- printf "%s-kafka-bootstrap.%s.svc:%d" (include "rlhf-loop.kafkaClusterName" .) .Release.Namespace (int .Values.kafka.strimzi.listener.port) }}
{{- else }}
{{- fail "Kafka: set externalKafka.bootstrapServers, or enable kafka.strimzi (needs the Strimzi operator)" }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------
Pods
--------------------------------------------------------------------------------------------- */}}

{{/* Settings every pod of the chart shares. Argument: the root context. */}}
{{- define "rlhf-loop.podCommon" -}}
serviceAccountName: {{ include "rlhf-loop.serviceAccountName" . }}
automountServiceAccountToken: false
{{- /* Service links would inject <SERVICE>_PORT=tcp://... variables, e.g. RLHF_GATEWAY_PORT for a
Service named rlhf-gateway, which the configs would read (or reject). */}}
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* envFrom of the shared ConfigMaps. Argument: (dict "root" $ "configs" (list "logging" ...)). */}}
{{- define "rlhf-loop.envFrom" -}}
{{- $root := .root }}
{{- range .configs }}
- configMapRef:
    name: {{ include "rlhf-loop.configMapName" (dict "root" $root "name" .) }}
{{- end }}
{{- end }}

{{/* Writable scratch space (the root filesystem is read-only): /tmp and $HOME (caches). */}}
{{- define "rlhf-loop.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end }}

{{- define "rlhf-loop.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/rlhf
{{- end }}

{{/* Intra-op threads of torch (RLHF_<SERVICE>_TORCH_THREADS) for a component's values: its
torchThreads when set, else its CPU request rounded up ("500m" -> 1, "2" -> 2, "2.5" -> 3), else 0
(torch's default). torch's default is one thread per core of the node, not of the pod, so on a
large node an unset value oversubscribes the CPUs the pod was scheduled for. */}}
{{- define "rlhf-loop.torchThreads" -}}
{{- $threads := int (default 0 .torchThreads) }}
{{- if not $threads }}
{{- $cpu := toString (dig "requests" "cpu" "" (default dict .resources)) }}
{{- if hasSuffix "m" $cpu }}
{{- $threads = int (ceil (divf (float64 (trimSuffix "m" $cpu)) 1000)) }}
{{- else if $cpu }}
{{- $threads = int (ceil (float64 $cpu)) }}
{{- end }}
{{- end }}
{{- max $threads 0 }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------
One service: Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget (its NetworkPolicies are in networkpolicy.yaml).

Arguments (a dict):
  root        the root context ($)
  name        the component: its values key and the suffix of its resource names
  envPrefix   the ENV_PREFIX of its config class, e.g. RLHF_INFERENCE_
  protocol    "grpc": a gRPC server with grpc.health.v1 on <grpcPort> and /metrics on
              <metricsPort>; "http": the gateway (<port> serves the API, /healthz and /metrics)
  configs     the shared ConfigMaps whose settings its config reads ("logging", "kafka",
              "model-store")
  modelStore  "" (not mounted), "ro" or "rw"
  env         its own environment variables: a YAML list (string), may be empty
  singleton   true: at most one replica, strategy Recreate, no autoscaling (trainer; reward with
              its continual learner)
  volumes     optional: more pod volumes, a YAML list (string)
  mounts      optional: their mounts in the main container, a YAML list (string)
  ownToken    optional: the key of its gRPC bearer token in the credentials Secret (callers:
              gateway-token, trainer-token)
  values      optional: its values (default: .Values.<name>), e.g. the canary inference group's
              (rlhf-loop.componentValues)
  versionKeys optional: the version-line keys it holds, a dict RLHF_VERSIONS_* variable -> key of
              the versionSigning Secret (only those: a service gets no private key it does not use)
  secretKeys  the keys of the chart's secret data its environment uses (rlhf-loop.secretData):
              their checksum is a pod annotation, so a changed value restarts the pods
An init container waits for the Kafka topics it reads and writes (services reading "kafka",
kafka.waitForTopics) and for a published policy (<name>.waitForPolicy) and reward model
(<name>.waitForRewardModel) before the service starts. gRPC services serve TLS (tls.enabled) with
the certificate of their Secret mounted at /etc/rlhf/tls, and accept the release's credentials;
Kafka clients get their Kafka user's credentials and the brokers' CA.
--------------------------------------------------------------------------------------------- */}}
{{- define "rlhf-loop.component" -}}
{{- $root := .root }}
{{- $v := .values | default (index $root.Values .name) }}
{{- $fullName := include "rlhf-loop.componentName" . }}
{{- $sel := dict "root" $root "name" .name }}
{{- $grpc := eq .protocol "grpc" }}
{{- $mainPort := ternary $v.grpcPort $v.port $grpc | int }}
{{- $mainPortName := ternary "grpc" "http" $grpc }}
{{- $hasMetricsPort := and $grpc (gt (int $v.metricsPort) 0) }}
{{- $autoscaling := and (not .singleton) $v.autoscaling (($v.autoscaling | default dict).enabled) }}
{{- $waitPolicy := and .modelStore $v.waitForPolicy }}
{{- $waitRewardModel := and .modelStore $v.waitForRewardModel }}
{{- $kafka := has "kafka" .configs }}
{{- $waitTopics := and $kafka $root.Values.kafka.waitForTopics }}
{{- $waitFor := or $waitPolicy $waitRewardModel $waitTopics }}
{{- $tls := $root.Values.tls.enabled }}
{{- $healthPort := and $grpc $tls }}
{{- $access := index (include "rlhf-loop.kafkaAccess" $root | fromYaml) .name | default dict }}
{{- $topics := concat ($access.read | default list) ($access.write | default list) | uniq | sortAlpha }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "rlhf-loop.componentLabels" $sel | nindent 4 }}
spec:
  {{- if not $autoscaling }}
  replicas: {{ $v.replicas | int }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "rlhf-loop.selectorLabels" $sel | nindent 6 }}
  strategy:
    {{- if .singleton }}
    type: Recreate
    {{- else }}
    {{- toYaml $v.strategy | nindent 4 }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "rlhf-loop.selectorLabels" $sel | nindent 8 }}
        app.kubernetes.io/part-of: rlhf-loop
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmaps.yaml") $root | sha256sum }}
        checksum/secrets: {{ include "rlhf-loop.secretChecksum" (dict "root" $root "keys" (.secretKeys | default list)) }}
        {{- if $root.Values.metrics.podAnnotations }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ ternary $v.metricsPort $v.port $grpc | int | quote }}
        prometheus.io/path: /metrics
        {{- end }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- include "rlhf-loop.podCommon" $root | nindent 6 }}
      terminationGracePeriodSeconds: {{ add (int $v.drainSeconds) 15 }}
      {{- if $waitFor }}
      initContainers:
        # Waits for what the service needs at start (files/wait_for.py), instead of crash-looping.
        - name: wait-for
          image: {{ include "rlhf-loop.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command:
            - python
            - /etc/rlhf/scripts/wait_for.py
            {{- if $waitPolicy }}
            - --policy
            - {{ $root.Values.modelStore.mountPath }}
            {{- end }}
            {{- if $waitRewardModel }}
            - --reward-model
            - {{ $root.Values.modelStore.mountPath }}
            {{- end }}
            {{- if $waitTopics }}
            - --topics
            - {{ $topics | join "," }}
            {{- end }}
          {{- if $waitTopics }}
          envFrom:
            {{- include "rlhf-loop.envFrom" (dict "root" $root "configs" (list "kafka")) | trim | nindent 12 }}
          {{- with include "rlhf-loop.kafkaUserEnv" $sel }}
          env:
            {{- . | nindent 12 }}
          {{- end }}
          {{- end }}
          resources:
            requests:
              cpu: 10m
              memory: 64Mi
            limits:
              memory: 256Mi
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: scripts
              mountPath: /etc/rlhf/scripts
              readOnly: true
            - name: tmp
              mountPath: /tmp
            {{- if $waitPolicy }}
            - name: model-store
              mountPath: {{ $root.Values.modelStore.mountPath }}
              readOnly: true
            {{- end }}
            {{- if $waitTopics }}
            {{- include "rlhf-loop.kafkaMounts" $sel | nindent 12 }}
            {{- end }}
      {{- end }}
      containers:
        - name: {{ .name }}
          image: {{ include "rlhf-loop.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command:
            {{- toYaml $v.command | nindent 12 }}
          {{- with $v.args }}
          args:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - name: {{ $mainPortName }}
              containerPort: {{ $mainPort }}
              protocol: TCP
            {{- if $hasMetricsPort }}
            - name: metrics
              containerPort: {{ $v.metricsPort | int }}
              protocol: TCP
            {{- end }}
            {{- if $healthPort }}
            - name: health
              containerPort: {{ $root.Values.tls.healthPort | int }}
              protocol: TCP
            {{- end }}
          {{- with .configs }}
          envFrom:
            {{- include "rlhf-loop.envFrom" (dict "root" $root "configs" .) | trim | nindent 12 }}
          {{- end }}
          env:
            - name: {{ .envPrefix }}HOST
              value: "0.0.0.0"
            {{- if $grpc }}
            - name: {{ .envPrefix }}GRPC_PORT
              value: {{ $mainPort | quote }}
            - name: {{ .envPrefix }}METRICS_PORT
              value: {{ $v.metricsPort | int | quote }}
            {{- else }}
            - name: {{ .envPrefix }}PORT
              value: {{ $mainPort | quote }}
            {{- end }}
            - name: {{ .envPrefix }}GRACE_PERIOD_S
              value: {{ $v.drainSeconds | int | quote }}
            {{- include "rlhf-loop.authEnv" (dict "root" $root "grpc" $grpc "ownToken" (.ownToken | default "") "envPrefix" .envPrefix) | nindent 12 }}
            {{- if $kafka }}
            {{- include "rlhf-loop.kafkaUserEnv" $sel | nindent 12 }}
            {{- end }}
            {{- include "rlhf-loop.versionKeyEnv" (dict "root" $root "keys" (.versionKeys | default dict)) | nindent 12 }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- /* gRPC services: grpc.health.v1, SERVING once the model is loaded. The gateway:
          ready while /healthz is 200 (it answers 503 while inference is unavailable); alive and
          started while its port accepts connections, so that an inference outage does not
          restart every gateway. */}}
          {{- $ready := dict }}
          {{- $alive := dict }}
          {{- if $grpc }}
          {{- $probePort := ternary (int $root.Values.tls.healthPort) $mainPort $healthPort }}
          {{- $_ := set $ready "grpc" (dict "port" $probePort) }}
          {{- $_ := set $alive "grpc" (dict "port" $probePort) }}
          {{- else }}
          {{- $_ := set $ready "httpGet" (dict "path" "/healthz" "port" "http") }}
          {{- $_ := set $alive "tcpSocket" (dict "port" "http") }}
          {{- end }}
          startupProbe:
            {{- toYaml (merge (dict) $alive $v.probes.startup) | nindent 12 }}
          readinessProbe:
            {{- toYaml (merge (dict) $ready $v.probes.readiness) | nindent 12 }}
          livenessProbe:
            {{- toYaml (merge (dict) $alive $v.probes.liveness) | nindent 12 }}
          lifecycle:
            preStop:
              # Let endpoints drop the pod before the server starts draining.
              exec:
                command: ["sleep", "5"]
          resources:
            {{- $res := deepCopy (default dict $v.resources) }}
            {{- if gt (int $v.gpu) 0 }}
            {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" (int $v.gpu)) (default dict $res.requests)) }}
            {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int $v.gpu)) (default dict $res.limits)) }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "rlhf-loop.scratchMounts" . | nindent 12 }}
            {{- if $v.shmSize }}
            - name: shm
              mountPath: /dev/shm
            {{- end }}
            {{- if .modelStore }}
            - name: model-store
              mountPath: {{ $root.Values.modelStore.mountPath }}
              readOnly: {{ eq .modelStore "ro" }}
            {{- end }}
            {{- with .mounts }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- if $tls }}
            - name: tls
              mountPath: /etc/rlhf/tls
              readOnly: true
            {{- end }}
            {{- if $kafka }}
            {{- include "rlhf-loop.kafkaMounts" $sel | nindent 12 }}
            {{- end }}
            {{- if and .versionKeys $root.Values.versionSigning.existingSecret }}
            - name: version-keys
              mountPath: /etc/rlhf/version-keys
              readOnly: true
            {{- end }}
      volumes:
        {{- include "rlhf-loop.scratchVolumes" . | nindent 8 }}
        {{- if $waitFor }}
        - name: scripts
          configMap:
            name: {{ include "rlhf-loop.fullname" $root }}-scripts
        {{- end }}
        {{- if $v.shmSize }}
        - name: shm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $v.shmSize }}
        {{- end }}
        {{- if .modelStore }}
        - name: model-store
          persistentVolumeClaim:
            claimName: {{ include "rlhf-loop.modelStoreClaim" $root }}
            readOnly: {{ eq .modelStore "ro" }}
        {{- end }}
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- if $tls }}
        - name: tls
          secret:
            secretName: {{ include "rlhf-loop.tlsSecret" $sel }}
        {{- end }}
        {{- if $kafka }}
        {{- include "rlhf-loop.kafkaVolumes" $sel | nindent 8 }}
        {{- end }}
        {{- include "rlhf-loop.versionKeyVolume" (dict "root" $root "keys" (.versionKeys | default dict)) | nindent 8 }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "rlhf-loop.componentLabels" $sel | nindent 4 }}
  {{- with $v.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $v.service.type }}
  {{- if $v.service.headless }}
  clusterIP: None
  {{- end }}
  selector:
    {{- include "rlhf-loop.selectorLabels" $sel | nindent 4 }}
  ports:
    - name: {{ $mainPortName }}
      port: {{ $v.service.port | int }}
      targetPort: {{ $mainPortName }}
      protocol: TCP
      {{- if $grpc }}
      appProtocol: kubernetes.io/h2c
      {{- else }}
      appProtocol: http
      {{- end }}
    {{- if $hasMetricsPort }}
    - name: metrics
      port: {{ $v.metricsPort | int }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
    {{- end }}
{{- if $autoscaling }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "rlhf-loop.componentLabels" $sel | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $fullName }}
  minReplicas: {{ $v.autoscaling.minReplicas | int }}
  maxReplicas: {{ $v.autoscaling.maxReplicas | int }}
  metrics:
    {{- if $v.autoscaling.metrics }}
    {{- toYaml $v.autoscaling.metrics | nindent 4 }}
    {{- else }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $v.autoscaling.targetCPUUtilizationPercentage | int }}
    {{- end }}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: {{ $v.autoscaling.scaleDownStabilizationSeconds | int }}
{{- end }}
{{- if $v.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "rlhf-loop.componentLabels" $sel | nindent 4 }}
spec:
  {{- if hasKey $v.pdb "minAvailable" }}
  minAvailable: {{ $v.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $v.pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "rlhf-loop.selectorLabels" $sel | nindent 6 }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------
Secrets: stable across renders
--------------------------------------------------------------------------------------------- */}}

{{/* "true" when templates can read the cluster (helm install/upgrade); "" in offline renders (helm
template, --dry-run=client, Argo CD), where `lookup` returns nothing. Every namespace has the
ConfigMap kube-root-ca.crt (Kubernetes >= 1.20). */}}
{{- define "rlhf-loop.clusterReadable" -}}
{{- if lookup "v1" "ConfigMap" .Release.Namespace "kube-root-ca.crt" }}true{{ end }}
{{- end }}

{{/* One value of a Secret the chart manages, stable across renders. Argument: (dict "root" $
"secret" NAME "key" KEY "value" EXPLICIT "what" "the values key to set"). The explicit value wins;
else the value already in the cluster's Secret (upgrades keep it); else, when the cluster can be
read (a first install), a new random one; else (an offline render) the render fails: a random
value there would differ at every render, and replicas rendered apart would disagree. */}}
{{- define "rlhf-loop.stableSecretValue" -}}
{{- if .value }}
{{- .value }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret }}
{{- if and $existing $existing.data (index $existing.data .key) }}
{{- index $existing.data .key | b64dec }}
{{- else if include "rlhf-loop.clusterReadable" .root }}
{{- randAlphaNum 43 }}
{{- else }}
{{- fail (printf "%s is empty and the cluster cannot be read (an offline render: helm template, --dry-run=client, Argo CD): set it, or name an existing Secret, so that every render gives the same value" .what) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rlhf-loop.grpcCredentialsSecret" -}}
{{- default (printf "%s-grpc-credentials" (include "rlhf-loop.fullname" .)) .Values.grpcAuth.existingSecret }}
{{- end }}

{{- define "rlhf-loop.operatorSecret" -}}
{{- default (printf "%s-operator-credential" (include "rlhf-loop.fullname" .)) .Values.grpcAuth.operator.existingSecret }}
{{- end }}

{{/* Every secret value the chart renders, computed once per render (random values must be the same
in the Secrets and in the checksums of the pods that use them): a dict, as JSON. */}}
{{- define "rlhf-loop.secretData" -}}
{{- if not (hasKey .Values "__secretData") }}
{{- $data := dict }}
{{- if not .Values.secrets.existingSecret }}
{{- $name := include "rlhf-loop.secretName" . }}
{{- $_ := set $data "feedback-token-secret" (include "rlhf-loop.stableSecretValue" (dict "root" . "secret" $name "key" "feedback-token-secret" "value" .Values.secrets.feedbackTokenSecret "what" "secrets.feedbackTokenSecret")) }}
{{- $_ := set $data "gateway-api-keys" (join "," .Values.secrets.gatewayApiKeys) }}
{{- end }}
{{- $operator := "" }}
{{- if not .Values.grpcAuth.operator.existingSecret }}
{{- $operator = include "rlhf-loop.stableSecretValue" (dict "root" . "secret" (include "rlhf-loop.operatorSecret" .) "key" "token" "value" .Values.grpcAuth.operator.token "what" "grpcAuth.operator.token") }}
{{- $_ := set $data "operator-token" $operator }}
{{- end }}
{{- if not .Values.grpcAuth.existingSecret }}
{{- $creds := include "rlhf-loop.grpcCredentialsSecret" . }}
{{- $accepted := list }}
{{- range $caller := list "gateway" "trainer" }}
{{- $token := include "rlhf-loop.stableSecretValue" (dict "root" $ "secret" $creds "key" (printf "%s-token" $caller) "value" (index $.Values.grpcAuth (printf "%sToken" $caller)) "what" (printf "grpcAuth.%sToken" $caller)) }}
{{- $_ := set $data (printf "%s-token" $caller) $token }}
{{- $accepted = append $accepted (printf "%s:%s" $caller (sha256sum $token)) }}
{{- end }}
{{- if $operator }}
{{- $accepted = append $accepted (printf "operator:%s" (sha256sum $operator)) }}
{{- end }}
{{- $_ := set $data "accepted" (join "," (concat $accepted .Values.grpcAuth.extraAccepted)) }}
{{- end }}
{{- $_ := set .Values "__secretData" $data }}
{{- end }}
{{- toJson (get .Values "__secretData") }}
{{- end }}

{{/* Checksum of the secret values a component uses (its pods restart when one changes). Argument:
(dict "root" $ "keys" (list ...)). Values held in existing Secrets are not known to the chart: their
Secret names go in instead. */}}
{{- define "rlhf-loop.secretChecksum" -}}
{{- $data := include "rlhf-loop.secretData" .root | fromJson }}
{{- $used := dict }}
{{- range .keys }}
{{- $_ := set $used . (get $data .) }}
{{- end }}
{{- $_ := set $used "existing" (list .root.Values.secrets.existingSecret .root.Values.grpcAuth.existingSecret .root.Values.grpcAuth.operator.existingSecret) }}
{{- toJson $used | sha256sum }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------
gRPC TLS and credentials of a component
--------------------------------------------------------------------------------------------- */}}

{{/* The Secret with a component's tls.crt, tls.key and ca.crt. Argument: (dict "root" $ "name" NAME). */}}
{{- define "rlhf-loop.tlsSecret" -}}
{{- $existing := index (.root.Values.tls.existingSecrets | default dict) .name | default "" }}
{{- if .root.Values.tls.certManager.enabled }}
{{- printf "%s-tls" (include "rlhf-loop.componentName" .) }}
{{- else if $existing }}
{{- $existing }}
{{- else }}
{{- fail (printf "tls.enabled with tls.certManager.enabled=false needs tls.existingSecrets.%s: a Secret with tls.crt, tls.key and ca.crt" .name) }}
{{- end }}
{{- end }}

{{/* Environment of a component's gRPC side (RLHF_AUTH_*). Argument: (dict "root" $ "grpc" BOOL
"ownToken" KEY-OR-EMPTY "envPrefix" PREFIX). */}}
{{- define "rlhf-loop.authEnv" -}}
{{- $root := .root }}
{{- $tls := $root.Values.tls }}
{{- if .grpc }}
# The credentials this server accepts, name:<sha256 of the token>.
- name: RLHF_AUTH_ACCEPT
  valueFrom:
    secretKeyRef:
      name: {{ include "rlhf-loop.grpcCredentialsSecret" $root }}
      key: accepted
{{- end }}
{{- if .ownToken }}
# The bearer token this component presents to the services it calls.
- name: RLHF_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "rlhf-loop.grpcCredentialsSecret" $root }}
      key: {{ .ownToken }}
{{- end }}
{{- if $tls.enabled }}
- name: RLHF_AUTH_TLS_CA_FILE
  value: /etc/rlhf/tls/ca.crt
{{- if or .grpc $tls.clientAuth }}
- name: RLHF_AUTH_TLS_CERT_FILE
  value: /etc/rlhf/tls/tls.crt
- name: RLHF_AUTH_TLS_KEY_FILE
  value: /etc/rlhf/tls/tls.key
{{- end }}
{{- if $tls.clientAuth }}
- name: RLHF_AUTH_TLS_CLIENT_AUTH
  value: "true"
{{- end }}
{{- if .grpc }}
# Plaintext grpc.health.v1 only, for the kubelet's probes (they cannot speak TLS).
- name: {{ .envPrefix }}HEALTH_PORT
  value: {{ $tls.healthPort | int | quote }}
{{- end }}
{{- else }}
# TLS off: tokens cross the pod network in plaintext; only where a mesh encrypts pod traffic.
- name: RLHF_AUTH_ALLOW_PLAINTEXT
  value: "true"
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------
Kafka security of a component
--------------------------------------------------------------------------------------------- */}}

{{/* Which topics each Kafka client of the chart reads and writes: the KafkaUsers' ACLs, the
topics each waits for (shared/kafka/topics.py says who produces and consumes what). */}}
{{- define "rlhf-loop.kafkaAccess" -}}
inference:
  read: [rlhf.policy-updates]
  write: [rlhf.completions]
feedback:
  read: [rlhf.feedback]
  write: [rlhf.feedback, rlhf.feedback.dlq]
reward:
  read: [rlhf.feedback, rlhf.completions, rlhf.reward-models]
  write: [rlhf.reward-models]
{{- if .Values.rollout.enabled }}
# Rollout on: the trainer proposes candidates; only the rollout service moves what users are served.
trainer:
  read: [rlhf.completions]
  write: [rlhf.policy-candidates]
inference-canary:
  read: [rlhf.policy-canary]
  write: [rlhf.completions]
rollout:
  read: [rlhf.rollout, rlhf.policy-candidates, rlhf.feedback, rlhf.completions]
  write: [rlhf.rollout, rlhf.policy-updates, rlhf.policy-canary]
# The gateway routes by the rollout state on rlhf.rollout (and shows it on /flywheel).
gateway:
  read: [rlhf.rollout]
{{- else }}
trainer:
  read: [rlhf.completions]
  write: [rlhf.policy-updates]
{{- end }}
{{- end }}

{{/* The Kafka security settings: a dict (JSON) with protocol, mechanism ("" without SASL), caSecret,
userAuth ("scram" | "tls" | ""). */}}
{{- define "rlhf-loop.kafkaSecurity" -}}
{{- if include "rlhf-loop.strimziEnabled" . }}
{{- $auth := .Values.kafka.strimzi.listener.authentication }}
{{- $ca := printf "%s-cluster-ca-cert" (include "rlhf-loop.kafkaClusterName" .) }}
{{- if eq $auth "tls" }}
{{- toJson (dict "protocol" "SSL" "mechanism" "" "caSecret" $ca "userAuth" "tls") }}
{{- else }}
{{- toJson (dict "protocol" "SASL_SSL" "mechanism" "SCRAM-SHA-512" "caSecret" $ca "userAuth" "scram") }}
{{- end }}
{{- else }}
{{- $e := .Values.externalKafka }}
{{- $sasl := has $e.securityProtocol (list "SASL_SSL" "SASL_PLAINTEXT") }}
{{- if and $sasl (not $e.credentialsSecret) }}
{{- fail (printf "externalKafka.securityProtocol=%s needs externalKafka.credentialsSecret (keys <component>-username and <component>-password)" $e.securityProtocol) }}
{{- end }}
{{- toJson (dict "protocol" $e.securityProtocol "mechanism" (ternary $e.saslMechanism "" $sasl) "caSecret" $e.caSecret "userAuth" (ternary "scram" "" $sasl)) }}
{{- end }}
{{- end }}

{{/* Kafka user name of a component (Strimzi: its KafkaUser). Argument: (dict "root" $ "name" NAME). */}}
{{- define "rlhf-loop.kafkaUser" -}}
{{- include "rlhf-loop.componentName" . }}
{{- end }}

{{/* Per-component Kafka environment: who it is to the brokers. Argument: (dict "root" $ "name" NAME). */}}
{{- define "rlhf-loop.kafkaUserEnv" -}}
{{- $sec := include "rlhf-loop.kafkaSecurity" .root | fromJson }}
{{- if eq $sec.userAuth "scram" }}
{{- if include "rlhf-loop.strimziEnabled" .root }}
- name: RLHF_KAFKA_SASL_USERNAME
  value: {{ include "rlhf-loop.kafkaUser" . | quote }}
{{- else }}
- name: RLHF_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.externalKafka.credentialsSecret }}
      key: {{ printf "%s-username" .name }}
{{- end }}
- name: RLHF_KAFKA_SASL_PASSWORD_FILE
  value: /etc/rlhf/kafka-user/password
{{- else if eq $sec.userAuth "tls" }}
- name: RLHF_KAFKA_SSL_CERT_FILE
  value: /etc/rlhf/kafka-user/user.crt
- name: RLHF_KAFKA_SSL_KEY_FILE
  value: /etc/rlhf/kafka-user/user.key
{{- end }}
{{- end }}

{{/* The volumes behind it: the brokers' CA and the component's own credentials. Argument as above. */}}
{{- define "rlhf-loop.kafkaVolumes" -}}
{{- $sec := include "rlhf-loop.kafkaSecurity" .root | fromJson }}
{{- if $sec.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ $sec.caSecret }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- if $sec.userAuth }}
- name: kafka-user
  secret:
    {{- if include "rlhf-loop.strimziEnabled" .root }}
    # Written by Strimzi's User Operator for the KafkaUser.
    secretName: {{ include "rlhf-loop.kafkaUser" . }}
    {{- else }}
    secretName: {{ .root.Values.externalKafka.credentialsSecret }}
    items:
      - key: {{ printf "%s-password" .name }}
        path: password
    {{- end }}
{{- end }}
{{- end }}

{{- define "rlhf-loop.kafkaMounts" -}}
{{- $sec := include "rlhf-loop.kafkaSecurity" .root | fromJson }}
{{- if $sec.caSecret }}
- name: kafka-ca
  mountPath: /etc/rlhf/kafka-ca
  readOnly: true
{{- end }}
{{- if $sec.userAuth }}
- name: kafka-user
  mountPath: /etc/rlhf/kafka-user
  readOnly: true
{{- end }}
{{- end }}

{{/* The Kafka security settings every client shares, as KEY: "value" lines (ConfigMap data). */}}
{{- define "rlhf-loop.kafkaSecurityEnv" -}}
{{- $sec := include "rlhf-loop.kafkaSecurity" . | fromJson }}
RLHF_KAFKA_SECURITY_PROTOCOL: {{ $sec.protocol | quote }}
{{- if $sec.mechanism }}
RLHF_KAFKA_SASL_MECHANISM: {{ $sec.mechanism | quote }}
{{- end }}
{{- if $sec.caSecret }}
RLHF_KAFKA_SSL_CA_FILE: /etc/rlhf/kafka-ca/ca.crt
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------
Model version signing keys (shared/signing.py): a component gets only the keys of its lines
--------------------------------------------------------------------------------------------- */}}

{{/* Argument: (dict "root" $ "keys" (dict "RLHF_VERSIONS_..._FILE" "secret-key" ...)). */}}
{{- define "rlhf-loop.versionKeyEnv" -}}
{{- $vs := .root.Values.versionSigning }}
{{- if .keys }}
{{- if $vs.existingSecret }}
{{- range $env, $key := .keys }}
- name: {{ $env }}
  value: {{ printf "/etc/rlhf/version-keys/%s" $key | quote }}
{{- end }}
{{- else if $vs.allowUnsigned }}
# No signing keys: versions are published and accepted unsigned (development only).
- name: RLHF_VERSIONS_ALLOW_UNSIGNED
  value: "true"
{{- else }}
{{- fail "versionSigning.existingSecret is empty: name a Secret with the Ed25519 keys of the version lines (policy-signing-key.pem, policy-verify-keys, rm-signing-key.pem, rm-verify-keys), or set versionSigning.allowUnsigned=true (development only)" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rlhf-loop.versionKeyVolume" -}}
{{- $vs := .root.Values.versionSigning }}
{{- if and .keys $vs.existingSecret }}
- name: version-keys
  secret:
    secretName: {{ $vs.existingSecret }}
    items:
      {{- range $env, $key := .keys }}
      - key: {{ $key }}
        path: {{ $key }}
      {{- end }}
{{- end }}
{{- end }}
