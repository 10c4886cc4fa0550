"""Offline checks of the deployment: the Helm chart helm/rlhf-loop, the Dockerfiles, the dashboard.

The chart is rendered with helm-python-sdk (Helm v4 as a library: no helm binary, no cluster) in
three configurations: the default values, helm/rlhf-loop/values-gpu.yaml and
helm/rlhf-loop/values-external-kafka.yaml. Each render is linted (strict), validated against the
Kubernetes 1.31 API schemas (kubernetes-validate, strict: unknown fields fail), compared with a
golden file, and checked against the services' config classes: every RLHF_* variable a container
gets must be one its config reads (load_config rejects unknown ones with the service's prefix), and
the container ports must be the ports the config is given.

Golden renders live in tests/unit/deploy/golden/{default,gpu,external-kafka}.yaml. After an
intended chart change, regenerate them and review the diff:

    UPDATE_GOLDEN=1 ./rlhf test tests/unit/deploy

What only a real cluster can tell (Strimzi reconciling the Kafka resources, NetworkPolicy
enforcement, ReadWriteMany provisioning, GPU scheduling, probes against running pods) is not
checked here.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import importlib
import importlib.util
import json
import os
import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm  # not `import helm`: the repository's helm/ folder would shadow it
import pytest
import yaml
from kubernetes_validate import utils as kube_validate

from shared.config import ConfigBase, env_vars, load_config
from shared.kafka import topics as kafka_topics

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "helm" / "rlhf-loop"
GOLDEN = Path(__file__).parent / "golden"
DOCKER = REPO / "deploy" / "docker"
DASHBOARD = REPO / "deploy" / "grafana" / "rlhf-dashboard.json"

RELEASE = "rlhf-loop"
NAMESPACE = "rlhf"
KUBE_VERSION = "1.31.0"
CONFIGS = {"default": None, "gpu": "values-gpu.yaml", "external-kafka": "values-external-kafka.yaml"}

# Kinds of custom resources: kubernetes-validate only knows the built-in API, so these are checked
# structurally by the tests below instead.
CRD_GROUPS = {
    "kafka.strimzi.io": "Strimzi CRDs (Kafka, KafkaNodePool) are not in the Kubernetes API schemas",
    "monitoring.coreos.com": "the Prometheus Operator's ServiceMonitor CRD is not in the Kubernetes API schemas",
}

# The chart's services and their config classes (imported by name: a service's tests skip while
# its config class does not exist).
SERVICES = {
    "gateway": ("services.gateway.config", "GatewayConfig"),
    "inference": ("services.inference.config", "InferenceConfig"),
    "feedback": ("services.feedback.config", "FeedbackConfig"),
    "reward": ("services.reward.config", "RewardConfig"),
    "trainer": ("services.trainer.config", "TrainerConfig"),
}
GPU_SERVICES = ("inference", "trainer")


# --- rendering ---------------------------------------------------------------------------------


@cache
def values_of(config: str) -> dict[str, Any]:
    name = CONFIGS[config]
    return yaml.safe_load((CHART / name).read_text()) if name else {}


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """template path -> rendered text (schema-validated by Helm first)."""
    return _chart().render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


@cache
def rendered(config: str) -> dict[str, str]:
    return render(values_of(config))


def documents(out: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@cache
def docs_of(config: str) -> tuple[dict[str, Any], ...]:
    return tuple(documents(rendered(config)))


def find(docs, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def component_name(component: str) -> str:
    return f"{RELEASE}-{component}"


def deployment(docs, component: str) -> dict[str, Any]:
    return one(docs, "Deployment", component_name(component))


def main_container(dep: dict[str, Any]) -> dict[str, Any]:
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


def config_class(service: str) -> type[ConfigBase]:
    """The service's config class; skips the test when that service does not exist yet."""
    module, cls = SERVICES[service]
    if importlib.util.find_spec(module.rpartition(".")[0]) is None or importlib.util.find_spec(module) is None:
        pytest.skip(f"{module}.{cls} does not exist yet (the {service} service lands in a later issue)")
    return getattr(importlib.import_module(module), cls)


def container_environ(docs, container: dict[str, Any]) -> dict[str, str]:
    """Every variable the container gets, resolved from the rendered ConfigMaps and Secret."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(one(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
        elif "secretRef" in src:
            secret = one(docs, "Secret", src["secretRef"]["name"])
            env.update({k: base64.b64decode(v).decode() for k, v in secret["data"].items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = base64.b64decode(one(docs, "Secret", ref["name"])["data"][ref["key"]]).decode()
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = one(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            env[var["name"]] = ""
    return env


def pod_specs(docs) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in {"Deployment", "Job"}
    ]


# --- lint, API schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_lint_strict(config):
    report = helm.lint(CHART, values=values_of(config), strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, json.dumps(report, indent=2)


@pytest.mark.parametrize("config", CONFIGS)
def test_manifests_validate_against_kubernetes_api(config):
    failures, skipped = [], set()
    for doc in docs_of(config):
        group = doc["apiVersion"].rpartition("/")[0]
        if group in CRD_GROUPS:
            skipped.add(doc["kind"])
            continue
        try:
            kube_validate.validate(doc, KUBE_VERSION, strict=True)
        except kube_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message[:300]}")
        except kube_validate.SchemaNotFoundError as exc:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not failures, "\n".join(failures)
    expected_crds = set() if config == "external-kafka" else {"Kafka", "KafkaNodePool"}
    assert skipped == expected_crds


def test_strict_validation_catches_a_misspelled_field():
    dep = json.loads(json.dumps(deployment(docs_of("default"), "gateway")))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kube_validate.ValidationError):
        kube_validate.validate(dep, KUBE_VERSION, strict=True)


# --- golden renders ------------------------------------------------------------------------------

_RANDOM_SECRET = re.compile(r'^(\s*feedback-token-secret: )"[A-Za-z0-9+/=]+"$', re.MULTILINE)


def golden_text(config: str) -> str:
    """The render as one YAML stream, in template order; the random HMAC key masked."""
    values_file = CONFIGS[config] or "the default values"
    parts = [
        f"# helm/rlhf-loop rendered with {values_file}; release {RELEASE}, namespace {NAMESPACE}.\n"
        "# Regenerate: UPDATE_GOLDEN=1 ./rlhf test tests/unit/deploy\n"
    ]
    for path, text in sorted(rendered(config).items()):
        text = text.strip("\n")
        if not text.strip():
            continue
        if not path.endswith(".yaml"):  # NOTES.txt, as comments
            text = "\n".join(f"# {line}".rstrip() for line in text.splitlines())
        text = _RANDOM_SECRET.sub(r'\1"<random: generated at install, kept across upgrades>"', text)
        parts.append(f"---\n# Source: {path}\n{text}\n")
    return "".join(parts)


@pytest.mark.parametrize("config", CONFIGS)
def test_golden_render(config):
    path = GOLDEN / f"{config}.yaml"
    actual = golden_text(config)
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
    assert path.exists(), f"{path} is missing: run UPDATE_GOLDEN=1 ./rlhf test tests/unit/deploy"
    expected = path.read_text()
    if actual != expected:
        diff = list(
            difflib.unified_diff(
                expected.splitlines(),
                actual.splitlines(),
                f"golden/{config}.yaml",
                f"render ({config})",
                lineterm="",
                n=2,
            )
        )
        shown = "\n".join(diff[:150]) + (f"\n... {len(diff) - 150} more diff lines" if len(diff) > 150 else "")
        pytest.fail(
            f"the {config} render drifted from golden/{config}.yaml; if intended, regenerate with\n"
            f"    UPDATE_GOLDEN=1 ./rlhf test tests/unit/deploy\n\n{shown}",
            pytrace=False,
        )


def test_secret_is_the_only_nondeterministic_part():
    a = render(values_of("default"))
    b = render(values_of("default"))
    differing = sorted(p for p in a if a[p] != b[p])
    assert differing == [f"{CHART.name}/templates/secret.yaml"]
    masked = lambda t: _RANDOM_SECRET.sub("", t)
    assert masked(a[differing[0]]) == masked(b[differing[0]])


# --- services against their config classes ---------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("service", SERVICES)
def test_env_and_ports_are_the_ones_the_config_reads(config, service):
    cls = config_class(service)
    docs = docs_of(config)
    container = main_container(deployment(docs, service))
    known = {v.name for v in env_vars(cls)}

    names = [v["name"] for v in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env entries: {sorted(n for n in names if names.count(n) > 1)}"
    environ = container_environ(docs, container)
    unknown = sorted(n for n in environ if n.startswith("RLHF_") and n not in known)
    assert not unknown, f"{service}: {unknown} are not read by {cls.__name__} (it reads {sorted(known)})"

    # The config loads from exactly this environment (types parse, problems() is empty)...
    cfg = load_config(cls, environ)
    assert cfg.host == "0.0.0.0"
    # ...and its ports are the container's ports.
    port_fields = [f.name for f in dataclasses.fields(cls) if f.name.endswith("port")]
    config_ports = {getattr(cfg, f) for f in port_fields if getattr(cfg, f)}
    container_ports = {p["containerPort"] for p in container["ports"]}
    assert container_ports == config_ports, (
        f"{service}: container ports {container_ports} != config ports {config_ports}"
    )

    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    if "grpc_port" in port_fields:
        assert by_name["grpc"] == cfg.grpc_port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == cfg.grpc_port
    if getattr(cfg, "metrics_port", 0):
        assert by_name["metrics"] == cfg.metrics_port


@pytest.mark.parametrize("config", CONFIGS)
def test_gateway_reaches_the_inference_service(config):
    docs = docs_of(config)
    env = container_environ(docs, main_container(deployment(docs, "gateway")))
    host, _, port = env["RLHF_GATEWAY_INFERENCE_ADDRESS"].rpartition(":")
    svc = one(docs, "Service", host)
    assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "inference"
    assert int(port) in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"}
    assert env["RLHF_FEEDBACK_TOKEN_SECRET"], "the gateway signs feedback tokens with the shared key"


def test_gateway_without_feedback_gets_neither_address_nor_key():
    docs = documents(render({"gateway": {"wireFeedback": False}}))
    env = container_environ(docs, main_container(deployment(docs, "gateway")))
    assert "RLHF_GATEWAY_FEEDBACK_ADDRESS" not in env and "RLHF_FEEDBACK_TOKEN_SECRET" not in env
    load_config(config_class("gateway"), env)


def test_gateway_feedback_address_when_wired():
    docs = documents(render({"gateway": {"wireFeedback": True}}))
    container = main_container(deployment(docs, "gateway"))
    env = container_environ(docs, container)
    host, _, port = env["RLHF_GATEWAY_FEEDBACK_ADDRESS"].rpartition(":")
    svc = one(docs, "Service", host)
    assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "feedback"
    assert int(port) == svc["spec"]["ports"][0]["port"]
    assert load_config(config_class("gateway"), env).feedback_address == env["RLHF_GATEWAY_FEEDBACK_ADDRESS"]


def test_every_chart_component_is_a_known_service():
    components = {
        d["metadata"]["labels"]["app.kubernetes.io/component"] for d in find(docs_of("default"), "Deployment")
    }
    assert components == set(SERVICES)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("service", SERVICES)
def test_service_has_probes_resources_and_a_service(config, service):
    docs = docs_of(config)
    dep = deployment(docs, service)
    pod = dep["spec"]["template"]
    container = main_container(dep)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, f"{service}: no {probe}"
    if service == "gateway":
        assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    else:
        assert "grpc" in container["readinessProbe"] and "grpc" in container["livenessProbe"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    svc = one(docs, "Service", component_name(service))
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    pdb = one(docs, "PodDisruptionBudget", component_name(service))
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("config", CONFIGS)
def test_trainer_is_a_single_replica_recreated(config):
    dep = deployment(docs_of(config), "trainer")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert not find(docs_of(config), "HorizontalPodAutoscaler", component_name("trainer"))


def _volume(dep: dict[str, Any], name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(pod volume, main container mount) named ``name``; None where absent."""
    volumes = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    mounts = [m for m in main_container(dep).get("volumeMounts", []) if m["name"] == name]
    assert len(volumes) <= 1 and len(mounts) <= 1
    return (volumes or [None])[0], (mounts or [None])[0]


LEARNER_CLAIM = f"{RELEASE}-reward-learner-state"


@pytest.mark.parametrize("config", CONFIGS)
def test_reward_learner_is_a_singleton_with_persistent_state(config):
    """The continual learner runs in the reward process: one replica, Recreate, and its SQLite state
    on a ReadWriteOnce claim mounted where RLHF_REWARD_STATE_DIR points (the root filesystem is
    read-only)."""
    docs = docs_of(config)
    dep = deployment(docs, "reward")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert not find(docs, "HorizontalPodAutoscaler", component_name("reward"))
    env = container_environ(docs, main_container(dep))
    cfg = load_config(config_class("reward"), env)
    assert cfg.learner is True and env["RLHF_REWARD_LEARNER"] == "true"
    volume, mount = _volume(dep, "learner-state")
    assert mount is not None and not mount.get("readOnly", False)
    assert cfg.state_dir == Path(mount["mountPath"]) and cfg.state_dir.is_absolute()
    assert volume == {"name": "learner-state", "persistentVolumeClaim": {"claimName": LEARNER_CLAIM}}
    pvc = one(docs, "PersistentVolumeClaim", LEARNER_CLAIM)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "annotations" not in pvc["metadata"]  # rebuildable state: removed with the release


def test_reward_learner_state_on_an_empty_dir_without_persistence():
    docs = documents(render({"reward": {"learner": {"persistence": {"enabled": False}}}}))
    dep = deployment(docs, "reward")
    volume, mount = _volume(dep, "learner-state")
    assert volume == {"name": "learner-state", "emptyDir": {}}
    assert mount is not None and not mount.get("readOnly", False)
    env = container_environ(docs, main_container(dep))
    assert load_config(config_class("reward"), env).state_dir == Path(mount["mountPath"])
    assert not find(docs, "PersistentVolumeClaim", LEARNER_CLAIM)
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # still the only learner


def test_reward_learner_state_claim_settings():
    docs = documents(
        render(
            {
                "reward": {
                    "learner": {
                        "stateMountPath": "/state",
                        "persistence": {"size": "10Gi", "storageClassName": "local-ssd"},
                    }
                }
            }
        )
    )
    pvc = one(docs, "PersistentVolumeClaim", LEARNER_CLAIM)
    assert pvc["spec"]["storageClassName"] == "local-ssd"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    dep = deployment(docs, "reward")
    env = container_environ(docs, main_container(dep))
    assert env["RLHF_REWARD_STATE_DIR"] == _volume(dep, "learner-state")[1]["mountPath"] == "/state"


def test_reward_without_learner_scales_and_keeps_no_state():
    docs = documents(render({"reward": {"learner": {"enabled": False}, "replicas": 3}}))
    dep = deployment(docs, "reward")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    env = container_environ(docs, main_container(dep))
    assert env["RLHF_REWARD_LEARNER"] == "false" and "RLHF_REWARD_STATE_DIR" not in env
    assert load_config(config_class("reward"), env).learner is False
    assert _volume(dep, "learner-state") == (None, None)
    assert not find(docs, "PersistentVolumeClaim", LEARNER_CLAIM)


@pytest.mark.parametrize(
    "cpu,threads,expected",
    [
        ("500m", 0, "1"),
        ("1500m", 0, "2"),
        ("2", 0, "2"),
        (2.5, 0, "3"),
        ("0", 0, "0"),
        ("4", 6, "6"),
    ],
)
def test_torch_threads_follow_the_cpu_request(cpu, threads, expected):
    """torch's default is one thread per core of the node; the chart sizes the pool to the pod."""
    component = {"resources": {"requests": {"cpu": cpu}}, "torchThreads": threads}
    docs = documents(render({"reward": component, "trainer": component}))
    for service, prefix in (("reward", "RLHF_REWARD_"), ("trainer", "RLHF_TRAINER_")):
        env = container_environ(docs, main_container(deployment(docs, service)))
        assert env[f"{prefix}TORCH_THREADS"] == expected, service
        assert load_config(config_class(service), env).torch_threads == int(expected)


@pytest.mark.parametrize("config", CONFIGS)
def test_default_torch_threads_are_the_cpu_requests(config):
    docs = docs_of(config)
    for service, prefix in (("reward", "RLHF_REWARD_"), ("trainer", "RLHF_TRAINER_")):
        container = main_container(deployment(docs, service))
        cpu = float(str(container["resources"]["requests"]["cpu"]))
        assert container_environ(docs, container)[f"{prefix}TORCH_THREADS"] == str(int(cpu)), service


@pytest.mark.parametrize("config", CONFIGS)
def test_trainer_reaches_inference_and_reward_and_checkpoints_on_the_store(config):
    docs = docs_of(config)
    container = main_container(deployment(docs, "trainer"))
    env = container_environ(docs, container)
    cfg = load_config(config_class("trainer"), env)
    for component, address in (("inference", cfg.inference_address), ("reward", cfg.reward_address)):
        host, _, port = address.rpartition(":")
        svc = one(docs, "Service", host)
        assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == component
        assert int(port) in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"}
    (store,) = [m for m in container["volumeMounts"] if m["name"] == "model-store"]
    assert cfg.checkpoint_dir.is_relative_to(store["mountPath"]) and store["readOnly"] is False
    assert cfg.checkpoint_dir != Path(store["mountPath"])


@pytest.mark.parametrize("config", CONFIGS)
def test_inference_and_gateway_autoscale(config):
    docs = docs_of(config)
    for service in ("inference", "gateway"):
        hpa = one(docs, "HorizontalPodAutoscaler", component_name(service))
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": component_name(service),
        }
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        # The HPA owns the replica count: the Deployment must not reset it on every upgrade.
        assert "replicas" not in deployment(docs, service)["spec"]


def test_gpu_values_request_gpus_on_inference_and_trainer():
    docs = docs_of("gpu")
    for service in GPU_SERVICES:
        dep = deployment(docs, service)
        res = main_container(dep)["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] >= 1
        assert any(t.get("key") == "nvidia.com/gpu" for t in dep["spec"]["template"]["spec"]["tolerations"])
        assert main_container(dep)["image"].endswith("-cuda")
    env = container_environ(docs, main_container(deployment(docs, "inference")))
    assert env["RLHF_INFERENCE_DTYPE"] == "bfloat16"
    for config in ("default", "external-kafka"):
        assert "nvidia.com/gpu" not in json.dumps(docs_of(config)), f"{config} requests GPUs"


# --- Kafka ------------------------------------------------------------------------------------------


def test_default_runs_kafka_with_strimzi_in_kraft_mode():
    docs = docs_of("default")
    (kafka,) = find(docs, "Kafka")
    (pool,) = find(docs, "KafkaNodePool")
    assert kafka["apiVersion"] == pool["apiVersion"] == "kafka.strimzi.io/v1beta2"
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    assert kafka["metadata"]["annotations"]["strimzi.io/node-pools"] == "enabled"
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    config = kafka["spec"]["kafka"]["config"]
    assert config["auto.create.topics.enable"] is False  # the topic Job creates them, partitions included
    assert config["min.insync.replicas"] <= config["default.replication.factor"] <= pool["spec"]["replicas"]
    bootstrap = one(docs, "ConfigMap", f"{RELEASE}-env-kafka")["data"]["RLHF_KAFKA_BOOTSTRAP_SERVERS"]
    assert bootstrap == f"{kafka['metadata']['name']}-kafka-bootstrap.{NAMESPACE}.svc:{listener['port']}"
    assert not any(d["kind"] == "Kafka" or "bitnami" in json.dumps(d) for d in docs if d["kind"] != "Kafka")


def test_external_kafka_renders_no_strimzi_resources():
    docs = docs_of("external-kafka")
    servers = values_of("external-kafka")["externalKafka"]["bootstrapServers"]
    assert not [d for d in docs if d["apiVersion"].startswith("kafka.strimzi.io/")]
    assert one(docs, "ConfigMap", f"{RELEASE}-env-kafka")["data"]["RLHF_KAFKA_BOOTSTRAP_SERVERS"] == servers
    job_env = {v["name"]: v.get("value") for v in main_container(one(docs, "Job", f"{RELEASE}-kafka-topics"))["env"]}
    assert job_env["RLHF_KAFKA_BOOTSTRAP_SERVERS"] == servers
    egress = one(docs, "NetworkPolicy", f"{RELEASE}-egress")["spec"]["egress"]
    ports = {int(s.rpartition(":")[2]) for s in servers.split(",")}
    assert any({p["port"] for p in rule.get("ports", [])} == ports and "to" in rule for rule in egress)


@pytest.mark.parametrize("config", CONFIGS)
def test_topic_job_creates_exactly_the_loops_topics(config):
    docs = docs_of(config)
    cm = one(docs, "ConfigMap", f"{RELEASE}-kafka-topics")
    job = one(docs, "Job", f"{RELEASE}-kafka-topics")
    for d in (cm, job):
        assert set(d["metadata"]["annotations"]["helm.sh/hook"].split(",")) == {"post-install", "pre-upgrade"}
    assert int(cm["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    plan = json.loads(cm["data"]["topics.json"])
    assert set(plan["topics"]) == set(kafka_topics.ALL_TOPICS)
    for ordered in (kafka_topics.POLICY_UPDATES, kafka_topics.REWARD_MODELS):
        assert plan["topics"][ordered]["partitions"] == 1, f"{ordered} must keep its order: one partition"
    for spec in plan["topics"].values():
        assert re.fullmatch(r"-?\d+", spec["configs"]["retention.ms"]), spec  # not 6.048e+08
        assert int(spec["configs"]["min.insync.replicas"]) <= plan["replicationFactor"]
    assert cm["data"]["create_topics.py"] == (CHART / "files" / "create_topics.py").read_text()


# --- security, storage, network ------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_pods_run_as_non_root_without_service_links(config):
    for where, spec in pod_specs(docs_of(config)):
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] == 10001, where
        # Service links would inject e.g. RLHF_GATEWAY_PORT=tcp://... for a Service named rlhf-gateway.
        assert spec["enableServiceLinks"] is False, where
        assert spec["automountServiceAccountToken"] is False, where
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where


@pytest.mark.parametrize("config", CONFIGS)
def test_model_store_is_shared_read_write_only_by_learners(config):
    docs = docs_of(config)
    pvc = one(docs, "PersistentVolumeClaim", f"{RELEASE}-model-store")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    expected = {"inference": True, "trainer": False, "reward": False}
    for service, read_only in expected.items():
        spec = deployment(docs, service)["spec"]["template"]["spec"]
        (mount,) = [m for m in main_container(deployment(docs, service))["volumeMounts"] if m["name"] == "model-store"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "model-store"]
        assert mount["readOnly"] is read_only and volume["persistentVolumeClaim"]["readOnly"] is read_only, service
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    for service in ("gateway", "feedback"):
        assert "model-store" not in json.dumps(deployment(docs, service)), f"{service} should not mount the store"


@pytest.mark.parametrize("config", CONFIGS)
def test_network_policies_expose_only_the_gateway(config):
    docs = docs_of(config)
    deny = one(docs, "NetworkPolicy", f"{RELEASE}-default-deny")
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in deny["spec"]
    release = {"app.kubernetes.io/name": "rlhf-loop", "app.kubernetes.io/instance": RELEASE}
    assert deny["spec"]["podSelector"]["matchLabels"] == release
    for service in SERVICES:
        rules = one(docs, "NetworkPolicy", component_name(service))["spec"]["ingress"]
        main = [r for r in rules if {p["port"] for p in r["ports"]} == {"http" if service == "gateway" else "grpc"}]
        assert len(main) == 1, service
        if service == "gateway":
            assert "from" not in main[0]  # reachable from outside the release
        else:
            assert main[0]["from"] == [{"podSelector": {"matchLabels": release}}], service


@pytest.mark.parametrize("config", CONFIGS)
def test_learners_may_reach_kafka(config):
    """The reward learner reads rlhf.feedback and rlhf.completions and writes rlhf.reward-models; the
    trainer reads rlhf.completions and writes rlhf.policy-updates: the release-wide egress policy must
    select their pods and allow the brokers."""
    docs = docs_of(config)
    egress = one(docs, "NetworkPolicy", f"{RELEASE}-egress")["spec"]
    bootstrap = one(docs, "ConfigMap", f"{RELEASE}-env-kafka")["data"]["RLHF_KAFKA_BOOTSTRAP_SERVERS"]
    kafka_ports = {int(s.rpartition(":")[2]) for s in bootstrap.split(",")}
    kafka_rules = [r for r in egress["egress"] if {p["port"] for p in r.get("ports", [])} == kafka_ports]
    assert len(kafka_rules) == 1
    if config != "external-kafka":
        (peer,) = kafka_rules[0]["to"]
        assert peer["podSelector"]["matchLabels"]["strimzi.io/kind"] == "Kafka"
    for service in ("reward", "trainer"):
        labels = deployment(docs, service)["spec"]["template"]["metadata"]["labels"]
        assert egress["podSelector"]["matchLabels"].items() <= labels.items(), service
        env = container_environ(docs, main_container(deployment(docs, service)))
        assert env["RLHF_KAFKA_BOOTSTRAP_SERVERS"] == bootstrap, service


def test_existing_secret_is_referenced_not_created():
    docs = documents(render({"secrets": {"existingSecret": "my-keys"}}))
    assert not find(docs, "Secret")
    env = main_container(deployment(docs, "gateway"))["env"]
    (keys,) = [v for v in env if v["name"] == "RLHF_GATEWAY_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"] == {"name": "my-keys", "key": "gateway-api-keys"}


def test_gateway_api_keys_come_from_the_secret():
    docs = documents(render({"secrets": {"gatewayApiKeys": ["k" * 32, "j" * 32]}}))
    env = container_environ(docs, main_container(deployment(docs, "gateway")))
    assert load_config(config_class("gateway"), env).api_keys == ("k" * 32, "j" * 32)


def test_ingress_and_service_monitor_are_optional():
    default = docs_of("default")
    assert not find(default, "Ingress") and not find(default, "ServiceMonitor")
    docs = documents(
        render(
            {
                "gateway": {"ingress": {"enabled": True, "className": "nginx"}},
                "metrics": {"serviceMonitor": {"enabled": True}},
            }
        )
    )
    (ingress,) = find(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": component_name("gateway"), "port": {"name": "http"}}
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics", "http"}
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE


# --- the values schema ------------------------------------------------------------------------------

BAD_VALUES = {  # values -> where the schema must point
    "negative replicas": ({"inference": {"replicas": -1}}, "/inference/replicas"),
    "non-numeric port": ({"gateway": {"service": {"port": "abc"}}}, "/gateway/service/port"),
    "port out of range": ({"inference": {"grpcPort": 70000}}, "/inference/grpcPort"),
    "unknown top-level key": ({"inferense": {"replicas": 2}}, "'inferense' not allowed"),
    "unknown nested key": ({"inference": {"replica": 2}}, "'replica' not allowed"),
    "two trainers": ({"trainer": {"replicas": 2}}, "/trainer/replicas"),
    "relative learner state path": (
        {"reward": {"learner": {"stateMountPath": "var/reward-learner"}}},
        "/reward/learner/stateMountPath",
    ),
    "unknown learner key": ({"reward": {"learner": {"persistance": {"enabled": True}}}}, "'persistance' not allowed"),
    "negative torch threads": ({"trainer": {"torchThreads": -1}}, "/trainer/torchThreads"),
    "trainer autoscaling": (
        {"trainer": {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 2}}},
        "'autoscaling' not allowed",
    ),
    "internal service exposed": ({"inference": {"service": {"type": "LoadBalancer"}}}, "/inference/service/type"),
    "ordered topic with partitions": (
        {"kafka": {"topics": {"items": {"rlhf.policy-updates": {"partitions": 3}}}}},
        "/kafka/topics/items/rlhf.policy-updates/partitions",
    ),
    "unknown topic": (
        {"kafka": {"topics": {"items": {"rlhf.other": {"partitions": 1, "retentionMs": 1}}}}},
        "'rlhf.other' not allowed",
    ),
    "env var without name": ({"inference": {"extraEnv": [{"value": "x"}]}}, "/inference/extraEnv/0"),
    "bad log level": ({"logging": {"level": "TRACE"}}, "/logging/level"),
    "bad bootstrap servers": (
        {"externalKafka": {"bootstrapServers": "kafka-without-port"}},
        "/externalKafka/bootstrapServers",
    ),
    "root pod": ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    "short api key": ({"secrets": {"gatewayApiKeys": ["short"]}}, "/secrets/gatewayApiKeys/0"),
    "extra kafka env outside RLHF_KAFKA_": (
        {"kafka": {"extraClientEnv": {"RLHF_INFERENCE_DTYPE": "x"}}},
        "'RLHF_INFERENCE_DTYPE' does not match",
    ),
}


@pytest.mark.parametrize("values,where", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(values, where):
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert where in str(err.value)
    assert helm.lint(CHART, values=values, strict=True)["errors"]


TEMPLATE_FAILURES = {
    "no kafka at all": ({"kafka": {"strimzi": {"enabled": False}}}, "externalKafka.bootstrapServers"),
    "min ISR above replication": ({"kafka": {"topics": {"minInsyncReplicas": 4}}}, "minInsyncReplicas"),
    "replication above brokers": ({"kafka": {"topics": {"replicationFactor": 5}}}, "nodePool.replicas"),
    "gateway without inference": ({"inference": {"enabled": False}}, "inference.enabled"),
    "two reward learners": ({"reward": {"replicas": 2}}, "reward.replicas is 2 but reward.learner.enabled is true"),
}


@pytest.mark.parametrize("values,message", TEMPLATE_FAILURES.values(), ids=TEMPLATE_FAILURES.keys())
def test_inconsistent_values_fail_with_a_message(values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


def test_schema_topics_are_the_loops_topics():
    schema = json.loads((CHART / "values.schema.json").read_text())
    items = schema["properties"]["kafka"]["properties"]["topics"]["properties"]["items"]
    assert set(items["properties"]) == set(items["required"]) == set(kafka_topics.ALL_TOPICS)


def test_services_can_be_disabled():
    docs = documents(
        render({"feedback": {"enabled": False}, "reward": {"enabled": False}, "trainer": {"enabled": False}})
    )
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in find(docs, "Deployment")} == {
        "gateway",
        "inference",
    }


# --- the topic script ---------------------------------------------------------------------------------


def _load_topic_script():
    spec = importlib.util.spec_from_file_location("create_topics", CHART / "files" / "create_topics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeAdmin:
    """The slice of KafkaAdminClient that create_topics.py uses, over an in-memory cluster."""

    def __init__(self, topics: dict[str, tuple[int, dict[str, str]]], brokers: int = 3):
        self.topics = {n: {"partitions": p, "configs": dict(c), "rf": brokers} for n, (p, c) in topics.items()}
        self.calls: list[str] = []

    def list_topics(self):
        return list(self.topics)

    def describe_topics(self, names):
        return [
            {
                "name": n,
                "error_code": 0,
                "partitions": [{"replica_nodes": list(range(self.topics[n]["rf"]))}] * self.topics[n]["partitions"],
            }
            for n in names
        ]

    def create_topics(self, new):
        for name, spec in new.items():
            self.calls.append(f"create {name}")
            self.topics[name] = {
                "partitions": spec["num_partitions"],
                "configs": dict(spec["configs"]),
                "rf": spec["replication_factor"],
            }

    def create_partitions(self, counts):
        for name, total in counts.items():
            self.calls.append(f"partitions {name} {total}")
            self.topics[name]["partitions"] = total

    def describe_configs(self, resources, config_filter="modified"):
        return {
            "topic": {r.name: {k: {"value": v} for k, v in self.topics[r.name]["configs"].items()} for r in resources}
        }

    def alter_configs(self, resources):
        for r in resources:
            self.calls.append(f"configs {r.name} {sorted(r.configs.items())}")
            self.topics[r.name]["configs"].update(r.configs)


def test_topic_script_reconciles_an_existing_cluster():
    script = _load_topic_script()
    plan = {
        "replicationFactor": 3,
        "topics": {
            "rlhf.completions": {"partitions": 6, "configs": {"retention.ms": "604800000"}},
            "rlhf.feedback": {"partitions": 6, "configs": {"retention.ms": "1"}},
            "rlhf.policy-updates": {"partitions": 1, "configs": {"retention.ms": "-1"}},
        },
    }
    admin = FakeAdmin(
        {"rlhf.completions": (3, {"retention.ms": "604800000"}), "rlhf.feedback": (8, {"retention.ms": "5"})}
    )
    assert script.reconcile(admin, plan) == []
    assert admin.calls == [
        "create rlhf.policy-updates",
        "partitions rlhf.completions 6",
        "configs rlhf.feedback [('retention.ms', '1')]",
    ]
    assert admin.topics["rlhf.feedback"]["partitions"] == 8  # never shrunk
    admin.calls.clear()
    assert script.reconcile(admin, plan) == [] and admin.calls == []  # idempotent


def test_topic_script_refuses_an_unordered_announcement_topic():
    script = _load_topic_script()
    admin = FakeAdmin({"rlhf.policy-updates": (3, {})})
    plan = {"replicationFactor": 3, "topics": {"rlhf.policy-updates": {"partitions": 1, "configs": {}}}}
    (problem,) = script.reconcile(admin, plan)
    assert "rlhf.policy-updates" in problem and "ordered" in problem


# --- Dockerfiles --------------------------------------------------------------------------------------


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments and parser directives dropped, continuations joined."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comment lines may also sit inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        instruction, _, args = (buf + stripped).partition(" ")
        out.append((instruction.upper(), " ".join(args.split())))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued instruction"
    return out


def final_stage(instructions):
    start = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[start:]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile(name):
    instructions = parse_dockerfile((DOCKER / name).read_text())
    assert instructions[0][0] == "FROM", "FROM must come first"
    final = final_stage(instructions)
    users = [args for ins, args in final if ins == "USER"]
    assert users, "no USER in the final stage: the services would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"} and users[-1].split(":")[0] == "10001"
    for ins, args in instructions:
        if ins in {"COPY", "ADD"}:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            assert not [s for s in sources if s.endswith(WEIGHT_SUFFIXES) or "model" in s.lower()], f"{ins} {args}"
        if ins == "ADD":
            assert not re.search(r"\bhttps?://", args), f"ADD from a URL: {args}"
    run = " ".join(args for ins, args in instructions if ins == "RUN")
    assert "test -x /opt/venv/bin/rlhf" in run  # the console script is installed
    (cmd,) = [args for ins, args in final if ins in {"CMD", "ENTRYPOINT"}]
    assert json.loads(cmd)[0] == "rlhf"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "rlhf" in scripts
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    assert "*" in ignore and "**/*.safetensors" in ignore  # allow-list context, never weights
    if name == "Dockerfile.cpu":
        assert instructions[0][1].startswith("python:3.11-slim")
        assert 'pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu]"' in run
        assert "pip uninstall -y torchvision torchaudio torchcodec" in run
    else:
        assert re.match(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-", instructions[0][1])
        assert 'pip install ".[gpu]"' in run


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_copies_every_installed_package(name):
    # A package pyproject installs but the image lacks fails only at run time (rlhf bootstrap -> ModuleNotFoundError).
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {args.split()[0] for ins, args in parse_dockerfile((DOCKER / name).read_text()) if ins == "COPY"}
    allowed = set((DOCKER / f"{name}.dockerignore").read_text().splitlines())
    for pattern in packages:
        top = pattern.rstrip("*")
        assert top in copied, f"{name} does not COPY {top}/"
        assert f"!{top}/" in allowed, f"{name}.dockerignore keeps {top}/ out of the build context"


def test_dockerfile_parser():
    parsed = parse_dockerfile("# syntax=docker/dockerfile:1\nFROM a AS b\n# c\nRUN x \\\n  # inner\n  && y\nUSER 1:1\n")
    assert parsed == [("FROM", "a AS b"), ("RUN", "x && y"), ("USER", "1:1")]


# --- Grafana dashboard -----------------------------------------------------------------------------------


METRIC_MODULES = (
    "services.inference.metrics",
    "services.gateway.metrics",
    "shared.kafka.metrics",
    "services.reward.metrics",
    "services.trainer.metrics",
)


def exported_metrics(modules=METRIC_MODULES) -> dict[str, set[str]]:
    """Base name -> the series names it exports (counters: _total, histograms: _bucket...)."""
    from prometheus_client.metrics import MetricWrapperBase

    metrics = {}
    for module in modules:
        for obj in vars(importlib.import_module(module)).values():
            if isinstance(obj, MetricWrapperBase):
                base, kind = obj._name, obj._type
                metrics[base] = {
                    "counter": {f"{base}_total"},
                    "gauge": {base},
                    "histogram": {f"{base}_bucket", f"{base}_sum", f"{base}_count"},
                }.get(kind, {base})
    return metrics


def exported_series() -> set[str]:
    return set().union(*exported_metrics().values())


def dashboard_series() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return {m for e in exprs for m in re.findall(r"\brlhf_[a-z_]+\b", e)}


def test_dashboard_queries_metrics_the_services_export():
    dash = json.loads(DASHBOARD.read_text())
    unknown = dashboard_series() - exported_series()
    assert not unknown, f"the dashboard queries metrics nobody exports: {sorted(unknown)}"
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for topic in (
        "requests/s",
        "p50",
        "p99",
        "first token",
        "tokens/s",
        "in flight",
        "policy version",
        "swap",
        "outbox",
        "publish failures",
        "reward model version",
        "learner",
        "held-out accuracy",
        "consumer lag",
        "rating to reward model",
        "trainer mean reward",
        "kl",
        "entropy",
        "step",
        "published policy versions",
        "drops",
    ):
        assert topic in titles, f"no panel about {topic}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_shows_every_reward_learner_and_trainer_metric():
    used = dashboard_series()
    metrics = exported_metrics(("services.reward.metrics", "services.trainer.metrics"))
    wanted = {b: s for b, s in metrics.items() if b.startswith(("rlhf_reward_learner_", "rlhf_trainer_"))}
    assert len(wanted) >= 20
    missing = sorted(b for b, series in wanted.items() if not series & used)
    assert not missing, f"no panel shows {missing}"


def test_dashboard_panels_do_not_overlap():
    dash = json.loads(DASHBOARD.read_text())
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    for p in dash["panels"]:
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]


# --- the services' wait-for init container -------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_services_wait_for_topics_policy_and_reward_model_before_starting(config):
    docs = docs_of(config)
    expected = {
        "gateway": (False, False, False),
        "inference": (True, False, True),
        "feedback": (False, False, True),
        "reward": (False, True, True),
        "trainer": (True, False, True),
    }  # (policy, reward model, topics)
    for service, (policy, reward_model, topics) in expected.items():
        inits = deployment(docs, service)["spec"]["template"]["spec"].get("initContainers", [])
        if not (policy or topics):
            assert not inits, service
            continue
        (init,) = inits
        args = init["command"]
        assert args[:2] == ["python", "/etc/rlhf/scripts/wait_for.py"]
        assert ("--policy" in args) is policy, service
        assert ("--reward-model" in args) is reward_model, service
        if topics:
            assert set(args[args.index("--topics") + 1].split(",")) == set(kafka_topics.ALL_TOPICS)
    scripts = one(docs, "ConfigMap", f"{RELEASE}-scripts")
    assert scripts["data"]["wait_for.py"] == (CHART / "files" / "wait_for.py").read_text()


def _load_wait_for():
    spec = importlib.util.spec_from_file_location("wait_for", CHART / "files" / "wait_for.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wait_for_policy_and_reward_model(tmp_path):
    wait_for = _load_wait_for()
    assert wait_for.missing_current(str(tmp_path), "policy", "policy")
    (tmp_path / "policy.current").write_text('{"version": "policy-0001"}')
    assert wait_for.missing_current(str(tmp_path), "policy", "policy") == []
    assert wait_for.main(["--policy", str(tmp_path), "--interval", "0"]) == 0
    assert "no reward model published yet" in wait_for.missing_current(str(tmp_path), "rm", "reward model")[0]
    (tmp_path / "rm.current").write_text('{"version": "rm-0001"}')
    assert wait_for.main(["--policy", str(tmp_path), "--reward-model", str(tmp_path), "--interval", "0"]) == 0
