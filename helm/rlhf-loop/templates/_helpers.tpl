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
{{- printf "%s-kafka-bootstrap.%s.svc:9092" (include "rlhf-loop.kafkaClusterName" .) .Release.Namespace }}
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
One service: Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget, NetworkPolicy.

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
An init container waits for the Kafka topics (services reading "kafka", kafka.waitForTopics) and
for a published policy (<name>.waitForPolicy) and reward model (<name>.waitForRewardModel) before
the service starts.
--------------------------------------------------------------------------------------------- */}}
{{- define "rlhf-loop.component" -}}
{{- $root := .root }}
{{- $v := index $root.Values .name }}
{{- $fullName := include "rlhf-loop.componentName" . }}
{{- $sel := dict "root" $root "name" .name }}
{{- $grpc := eq .protocol "grpc" }}
{{- $mainPort := ternary $v.grpcPort $v.port $grpc | int }}
{{- $mainPortName := ternary "grpc" "http" $grpc }}
{{- $hasMetricsPort := and $grpc (gt (int $v.metricsPort) 0) }}
{{- $autoscaling := and (not .singleton) $v.autoscaling (($v.autoscaling | default dict).enabled) }}
{{- $waitPolicy := and .modelStore $v.waitForPolicy }}
{{- $waitRewardModel := and .modelStore $v.waitForRewardModel }}
{{- $waitTopics := and (has "kafka" .configs) $root.Values.kafka.waitForTopics }}
{{- $waitFor := or $waitPolicy $waitRewardModel $waitTopics }}
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
        checksum/secret-values: {{ toJson $root.Values.secrets | sha256sum }}
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
            - {{ keys $root.Values.kafka.topics.items | sortAlpha | join "," }}
            {{- end }}
          {{- if $waitTopics }}
          envFrom:
            {{- include "rlhf-loop.envFrom" (dict "root" $root "configs" (list "kafka")) | trim | nindent 12 }}
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
          {{- $_ := set $ready "grpc" (dict "port" $mainPort) }}
          {{- $_ := set $alive "grpc" (dict "port" $mainPort) }}
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
{{- if $root.Values.networkPolicy.enabled }}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "rlhf-loop.componentLabels" $sel | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "rlhf-loop.selectorLabels" $sel | nindent 6 }}
  policyTypes:
    - Ingress
  ingress:
    {{- if $grpc }}
    # gRPC: only from the pods of this release.
    - from:
        - podSelector:
            matchLabels:
              {{- include "rlhf-loop.releaseSelectorLabels" $root | nindent 14 }}
      ports:
        - port: {{ $mainPortName }}
          protocol: TCP
    {{- if $hasMetricsPort }}
    - ports:
        - port: metrics
          protocol: TCP
      {{- with $root.Values.networkPolicy.metricsFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
    {{- else }}
    # The public entry point.
    - ports:
        - port: {{ $mainPortName }}
          protocol: TCP
      {{- with $v.allowFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
{{- end }}
{{- end }}
