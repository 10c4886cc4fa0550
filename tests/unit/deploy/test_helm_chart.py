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

Offline renders cannot read a cluster, so the chart refuses to invent secret values there: every
render here gives them (OFFLINE_VALUES), and a test checks that without them the render fails.
NetworkPolicies are checked connection by connection with a small evaluator of their semantics
(``reachable``).

What only a real cluster can tell (Strimzi reconciling the Kafka resources and ACLs, cert-manager
issuing certificates, NetworkPolicy enforcement by the CNI, ReadWriteMany provisioning, GPU
scheduling, probes against running pods, lookup of existing Secrets on upgrade) is not checked here.
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
    "kafka.strimzi.io": "Strimzi CRDs (Kafka, KafkaNodePool, KafkaUser) are not in the Kubernetes API schemas",
    "monitoring.coreos.com": "the Prometheus Operator's ServiceMonitor CRD is not in the Kubernetes API schemas",
    "cert-manager.io": "cert-manager's CRDs (Certificate, Issuer) are not in the Kubernetes API schemas",
}

# The secret values an offline render must be given (the chart never invents them offline), and
# version signing off (its keys are files a real Secret provides; tested separately).
OFFLINE_VALUES: dict[str, Any] = {
    "secrets": {"gatewayApiKeys": ["alice:" + "a" * 32, "bob:" + "b" * 32], "feedbackTokenSecret": "f" * 40},
    "grpcAuth": {"gatewayToken": "g" * 32, "trainerToken": "t" * 32, "operator": {"token": "o" * 32}},
    "versionSigning": {"allowUnsigned": True},
}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in (dicts deeply, everything else replaced)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# The chart's services and their config classes (imported by name: a service's tests skip while
# its config class does not exist).
SERVICES = {
    "gateway": ("services.gateway.config", "GatewayConfig"),
    "inference": ("services.inference.config", "InferenceConfig"),
    "feedback": ("services.feedback.config", "FeedbackConfig"),
    "reward": ("services.reward.config", "RewardConfig"),
    "trainer": ("services.trainer.config", "TrainerConfig"),
    # Progressive rollout (rollout.enabled, on by default): the canary group of inference replicas
    # and the rollout service.
    "inference-canary": ("services.inference.config", "InferenceConfig"),
    "rollout": ("services.rollout.config", "RolloutConfig"),
}
GPU_SERVICES = ("inference", "trainer")
GRPC_SERVICES = {s for s in SERVICES if s != "gateway"}


# --- rendering ---------------------------------------------------------------------------------


@cache
def values_of(config: str) -> dict[str, Any]:
    name = CONFIGS[config]
    return yaml.safe_load((CHART / name).read_text()) if name else {}


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(values: dict[str, Any] | None = None, *, offline_values: bool = True) -> dict[str, str]:
    """template path -> rendered text (schema-validated by Helm first), with OFFLINE_VALUES under
    ``values`` unless ``offline_values`` is false."""
    given = merged(OFFLINE_VALUES, values or {}) if offline_values else (values or {})
    return _chart().render(values=given, name=RELEASE, namespace=NAMESPACE, is_install=True)


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
    values = merged(OFFLINE_VALUES, values_of(config))
    report = helm.lint(CHART, values=values, strict=True, kube_version=f"v{KUBE_VERSION}")
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
    expected_crds = {"Certificate", "Issuer"} | (
        set() if config == "external-kafka" else {"Kafka", "KafkaNodePool", "KafkaUser"}
    )
    assert skipped == expected_crds


def test_strict_validation_catches_a_misspelled_field():
    dep = json.loads(json.dumps(deployment(docs_of("default"), "gateway")))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kube_validate.ValidationError):
        kube_validate.validate(dep, KUBE_VERSION, strict=True)


# --- golden renders ------------------------------------------------------------------------------


def golden_text(config: str) -> str:
    """The render as one YAML stream, in template order (its secrets are OFFLINE_VALUES')."""
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


def test_two_offline_renders_give_the_same_secrets():
    a = render(values_of("default"))
    b = render(values_of("default"))
    assert a == b, "two offline renders with the same values differ"
    docs = documents(a)
    creds = one(docs, "Secret", f"{RELEASE}-grpc-credentials")["data"]
    decoded = {k: base64.b64decode(v).decode() for k, v in creds.items()}
    assert decoded["gateway-token"] == "g" * 32 and decoded["trainer-token"] == "t" * 32
    from shared.config import credential_entry

    assert decoded["accepted"].split(",") == [
        credential_entry("gateway", "g" * 32),
        credential_entry("trainer", "t" * 32),
        credential_entry("operator", "o" * 32),
    ], "every service accepts the callers' hashes, the operator's token itself stays in its own Secret"
    operator = one(docs, "Secret", f"{RELEASE}-operator-credential")["data"]
    assert base64.b64decode(operator["token"]).decode() == "o" * 32
    assert "o" * 32 not in json.dumps([d for d in docs if d["metadata"]["name"] != f"{RELEASE}-operator-credential"])


UNSET = {
    "secrets.feedbackTokenSecret": {"secrets": {"feedbackTokenSecret": ""}},
    "grpcAuth.gatewayToken": {"grpcAuth": {"gatewayToken": ""}},
    "grpcAuth.trainerToken": {"grpcAuth": {"trainerToken": ""}},
    "grpcAuth.operator.token": {"grpcAuth": {"operator": {"token": ""}}},
}


@pytest.mark.parametrize("values,name", [(v, k) for k, v in UNSET.items()], ids=UNSET.keys())
def test_an_offline_render_without_a_secret_value_fails_naming_it(values, name):
    """Offline (no cluster to keep a generated value in), a random value would differ at every
    render and replicas rendered apart would disagree: the render fails instead."""
    with pytest.raises(helm.HelmError, match=re.escape(f"{name} is empty and the cluster cannot be read")):
        render(values)


def test_existing_secrets_need_no_values_offline():
    values = {
        "secrets": {"existingSecret": "my-keys", "feedbackTokenSecret": "", "gatewayApiKeys": []},
        "grpcAuth": {
            "existingSecret": "my-grpc",
            "gatewayToken": "",
            "trainerToken": "",
            "operator": {"existingSecret": "my-op", "token": ""},
        },
    }
    docs = documents(render(values))
    assert not find(docs, "Secret")
    env = main_container(deployment(docs, "trainer"))["env"]
    refs = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in env if "valueFrom" in v}
    assert refs["RLHF_AUTH_ACCEPT"] == {"name": "my-grpc", "key": "accepted"}
    assert refs["RLHF_AUTH_TOKEN"] == {"name": "my-grpc", "key": "trainer-token"}


def test_pods_restart_when_a_secret_value_they_use_changes():
    """Each pod carries a checksum of exactly the secret values its environment uses."""

    def checksums(values):
        docs = documents(render(values))
        return {
            s: deployment(docs, s)["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"] for s in SERVICES
        }

    base = checksums({})
    trainer_token = checksums({"grpcAuth": {"trainerToken": "T" * 32}})
    # The trainer presents it; every gRPC service accepts its hash.
    assert {s for s in SERVICES if trainer_token[s] != base[s]} == GRPC_SERVICES
    operator = checksums({"grpcAuth": {"operator": {"token": "O" * 32}}})
    assert {s for s in SERVICES if operator[s] != base[s]} == GRPC_SERVICES
    feedback_key = checksums({"secrets": {"feedbackTokenSecret": "F" * 40}})
    assert {s for s in SERVICES if feedback_key[s] != base[s]} == {"gateway", "feedback"}
    api_keys = checksums({"secrets": {"gatewayApiKeys": ["carol:" + "c" * 32]}})
    assert {s for s in SERVICES if api_keys[s] != base[s]} == {"gateway"}


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
    port_fields = [f.name for f in dataclasses.fields(cls) if f.name.endswith("port") and f.type in (int, "int")]
    config_ports = {getattr(cfg, f) for f in port_fields if getattr(cfg, f)}
    container_ports = {p["containerPort"] for p in container["ports"]}
    assert container_ports == config_ports, (
        f"{service}: container ports {container_ports} != config ports {config_ports}"
    )

    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    if "grpc_port" in port_fields:
        assert by_name["grpc"] == cfg.grpc_port
        # TLS on: the kubelet's grpc probes (no TLS) ask the plaintext health-only port.
        assert cfg.auth.tls_server and by_name["health"] == cfg.health_port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == cfg.health_port
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
@pytest.mark.parametrize("service", ["trainer", "rollout"])
def test_trainer_and_rollout_are_single_replicas_recreated(config, service):
    """One trainer publishes policies; one rollout service decides who gets them."""
    dep = deployment(docs_of(config), service)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert not find(docs_of(config), "HorizontalPodAutoscaler", component_name(service))


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
    egress = one(docs, "NetworkPolicy", f"{RELEASE}-kafka-clients")["spec"]["egress"]
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
    from shared.kafka.admin import SINGLE_PARTITION

    for ordered in SINGLE_PARTITION:
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
    expected = {"inference": True, "inference-canary": True, "trainer": False, "reward": False, "rollout": False}
    for service, read_only in expected.items():
        spec = deployment(docs, service)["spec"]["template"]["spec"]
        (mount,) = [m for m in main_container(deployment(docs, service))["volumeMounts"] if m["name"] == "model-store"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "model-store"]
        assert mount["readOnly"] is read_only and volume["persistentVolumeClaim"]["readOnly"] is read_only, service
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    for service in ("gateway", "feedback"):
        assert "model-store" not in json.dumps(deployment(docs, service)), f"{service} should not mount the store"


# --- NetworkPolicies, connection by connection ----------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and labels.get(key) in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


@dataclasses.dataclass(frozen=True)
class Pod:
    labels: dict[str, str]
    ports: dict[str, int]  # name -> number
    namespace: str = NAMESPACE


def pods_of(docs) -> dict[str, Pod]:
    """component -> a pod of it (labels and named ports), from the Deployments and Jobs."""
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            tpl = d["spec"]["template"]
            ports = {p["name"]: p["containerPort"] for c in tpl["spec"]["containers"] for p in c.get("ports", [])}
            out[tpl["metadata"]["labels"]["app.kubernetes.io/component"]] = Pod(tpl["metadata"]["labels"], ports)
    return out


OUTSIDE = Pod({"app": "somebody-else"}, {}, namespace="elsewhere")
OPERATOR_POD = Pod({"rlhf-operator": "true", "app": "ops"}, {})
MONITORING_POD = Pod({"app": "prometheus"}, {}, namespace="monitoring")
KAFKA_POD = Pod({"strimzi.io/cluster": f"{RELEASE}-kafka", "strimzi.io/kind": "Kafka"}, {"tcp-clientstls": 9093})


def peer_matches(peer: dict[str, Any], pod: Pod) -> bool:
    if "ipBlock" in peer:
        return False  # addresses outside the cluster: none of these pods
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": pod.namespace}):
            return False
    elif pod.namespace != NAMESPACE:
        return False
    return selects(peer.get("podSelector", {}), pod.labels)


def port_matches(rule_ports: list[dict[str, Any]] | None, port: int, owner: Pod) -> bool:
    if not rule_ports:
        return True
    return any(p["port"] == port or owner.ports.get(p["port"]) == port for p in rule_ports)


def allowed(docs, direction: str, subject: Pod, other: Pod, port: int, owner: Pod) -> bool:
    """Whether the policies selecting ``subject`` (none: all allowed) let ``other`` through on
    ``port`` (Ingress: other -> subject; Egress: subject -> other); ``owner`` names the port."""
    policies = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and direction in d["spec"]["policyTypes"]
        and subject.namespace == NAMESPACE
        and selects(d["spec"]["podSelector"], subject.labels)
    ]
    if not policies:
        return True
    key, peer_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return any(
        (rule.get(peer_key) is None or any(peer_matches(p, other) for p in rule[peer_key]))
        and port_matches(rule.get("ports"), port, owner)
        for policy in policies
        for rule in policy["spec"].get(key, [])
    )


def reachable(docs, src: Pod, dst: Pod, port_name: str) -> bool:
    """src can open a connection to dst's named port: src's egress and dst's ingress both allow it."""
    port = dst.ports[port_name]
    return allowed(docs, "Egress", src, dst, port, dst) and allowed(docs, "Ingress", dst, src, port, dst)


# Every connection between the release's pods; any other pair is refused.
CONNECTIONS = {
    ("gateway", "inference"),
    ("gateway", "inference-canary"),
    ("gateway", "feedback"),
    ("trainer", "inference"),
    ("trainer", "reward"),
}
# With rollout.enabled (the default) the gateway reads rlhf.rollout; without it, it has no Kafka client.
KAFKA_CLIENTS = {"inference", "inference-canary", "feedback", "reward", "trainer", "rollout", "gateway", "kafka-topics"}


@pytest.mark.parametrize("config", CONFIGS)
def test_network_policies_allow_each_connection_and_nothing_else(config):
    docs = docs_of(config)
    pods = pods_of(docs)
    deny = one(docs, "NetworkPolicy", f"{RELEASE}-default-deny")
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in deny["spec"]
    services = [s for s in SERVICES if s in pods]
    for src in pods:
        for dst in services:
            if dst != "gateway" and src != dst:
                expected = (src, dst) in CONNECTIONS
                assert reachable(docs, pods[src], pods[dst], "grpc") is expected, f"{src} -> {dst}"
    # The gateway is the public entry point; no gRPC port is reachable from outside.
    assert reachable(docs, OUTSIDE, pods["gateway"], "http")
    for service in set(services) - {"gateway"}:
        assert not reachable(docs, OUTSIDE, pods[service], "grpc"), service
    # Operators reach the trainer's controls, the reward service's rater RPCs and the rollout
    # service's commands, nothing else.
    for service in services:
        if service != "gateway":
            expected = service in ("trainer", "reward", "rollout")
            assert reachable(docs, OPERATOR_POD, pods[service], "grpc") is expected, service
    # Prometheus scrapes the metrics ports only; the kubelet's probes get the plaintext health port.
    for service in set(services) - {"gateway"}:
        assert reachable(docs, MONITORING_POD, pods[service], "metrics"), service
        assert not reachable(docs, MONITORING_POD, pods[service], "grpc"), service
        assert reachable(docs, OUTSIDE, pods[service], "health"), service


@pytest.mark.parametrize("config", CONFIGS)
def test_only_producers_and_consumers_reach_kafka(config):
    docs = docs_of(config)
    pods = pods_of(docs)
    bootstrap = one(docs, "ConfigMap", f"{RELEASE}-env-kafka")["data"]["RLHF_KAFKA_BOOTSTRAP_SERVERS"]
    port = int(bootstrap.split(",")[0].rpartition(":")[2])
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-kafka-clients")
    assert {c for c, pod in pods.items() if selects(policy["spec"]["podSelector"], pod.labels)} == KAFKA_CLIENTS
    if config == "external-kafka":
        # The brokers are addresses (networkPolicy.externalKafkaTo): the rule names their port.
        assert any({p["port"] for p in r["ports"]} == {port} and "to" in r for r in policy["spec"]["egress"])
        return
    for component, pod in pods.items():
        assert allowed(docs, "Egress", pod, KAFKA_POD, port, KAFKA_POD) is (component in KAFKA_CLIENTS), component
    # Strimzi's own policy for the listener admits the same pods (networkPolicyPeers).
    (listener,) = find(docs, "Kafka")[0]["spec"]["kafka"]["listeners"]
    assert listener["port"] == port
    admitted = {c for c, pod in pods.items() if any(peer_matches(p, pod) for p in listener["networkPolicyPeers"])}
    assert admitted == KAFKA_CLIENTS


def test_the_evaluator_refuses_what_no_rule_allows():
    docs = docs_of("default")
    pods = pods_of(docs)
    assert not reachable(docs, pods["gateway"], pods["trainer"], "grpc")
    # With default-deny alone nothing is reachable; without any policy everything is.
    bare = [d for d in docs if d["kind"] != "NetworkPolicy" or d["metadata"]["name"].endswith("default-deny")]
    assert not reachable(bare, pods["gateway"], pods["inference"], "grpc")
    assert reachable([d for d in docs if d["kind"] != "NetworkPolicy"], pods["gateway"], pods["trainer"], "grpc")


def test_operators_can_be_chosen():
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}}
    docs = documents(render({"networkPolicy": {"operatorFrom": [peer]}}))
    pods = pods_of(docs)
    assert reachable(docs, Pod({"x": "y"}, {}, namespace="ops"), pods["trainer"], "grpc")
    assert not reachable(docs, OPERATOR_POD, pods["trainer"], "grpc")


# --- gRPC TLS and credentials -----------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_every_service_gets_a_certificate_and_callers_their_tokens(config):
    docs = docs_of(config)
    issuers = {d["metadata"]["name"]: d for d in find(docs, "Issuer")}
    assert issuers[f"{RELEASE}-selfsigned"]["spec"] == {"selfSigned": {}}
    assert issuers[f"{RELEASE}-ca"]["spec"] == {"ca": {"secretName": f"{RELEASE}-ca"}}
    for service in SERVICES:
        dep = deployment(docs, service)
        cert = one(docs, "Certificate", f"{component_name(service)}-tls")
        assert cert["spec"]["issuerRef"]["name"] == f"{RELEASE}-ca"
        assert {component_name(service), f"{component_name(service)}.{NAMESPACE}.svc"} <= set(cert["spec"]["dnsNames"])
        volume, mount = _volume(dep, "tls")
        assert volume == {"name": "tls", "secret": {"secretName": cert["spec"]["secretName"]}}
        cfg = load_config(config_class(service), container_environ(docs, main_container(dep)))
        assert cfg.auth.tls_ca_file == Path(mount["mountPath"]) / "ca.crt"
        if service != "gateway":
            assert cfg.auth.tls_cert_file == Path(mount["mountPath"]) / "tls.crt"
            assert cfg.auth.tls_key_file == Path(mount["mountPath"]) / "tls.key"
            assert sorted(cfg.auth.accepted_callers().values()) == ["gateway", "operator", "trainer"]
        expected_token = {"gateway": "g" * 32, "trainer": "t" * 32}.get(service, "")
        assert cfg.auth.token == expected_token, service


def test_certificates_from_a_given_issuer_or_existing_secrets():
    docs = documents(render({"tls": {"certManager": {"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}}))
    assert not find(docs, "Issuer")
    issuer = one(docs, "Certificate", f"{component_name('inference')}-tls")["spec"]["issuerRef"]
    assert issuer == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    existing = {s: f"{s}-certs" for s in SERVICES}
    docs = documents(render({"tls": {"certManager": {"enabled": False}, "existingSecrets": existing}}))
    assert not find(docs, "Certificate") and not find(docs, "Issuer")
    assert _volume(deployment(docs, "reward"), "tls")[0]["secret"]["secretName"] == "reward-certs"
    with pytest.raises(helm.HelmError, match=r"needs tls\.existingSecrets\.[a-z]+: a Secret with tls.crt"):
        render({"tls": {"certManager": {"enabled": False}}})


def test_tls_off_is_an_explicit_plaintext_network():
    docs = documents(render({"tls": {"enabled": False}}))
    assert not find(docs, "Certificate")
    container = main_container(deployment(docs, "inference"))
    cfg = load_config(config_class("inference"), container_environ(docs, container))
    assert cfg.auth.allow_plaintext and not cfg.auth.tls_server and cfg.health_port == 0
    assert container["readinessProbe"]["grpc"]["port"] == cfg.grpc_port


def test_mutual_tls_gives_every_client_its_certificate():
    docs = documents(render({"tls": {"clientAuth": True}}))
    for service in SERVICES:
        cfg = load_config(config_class(service), container_environ(docs, main_container(deployment(docs, service))))
        assert cfg.auth.tls_client_auth and cfg.auth.tls_cert_file is not None, service


def test_version_keys_reach_only_the_services_of_their_lines():
    docs = documents(render({"versionSigning": {"existingSecret": "version-keys", "allowUnsigned": False}}))
    expected = {
        "inference": {"policy-verify-keys"},
        "inference-canary": {"policy-verify-keys"},
        "trainer": {"policy-signing-key.pem"},
        "reward": {"rm-verify-keys", "rm-signing-key.pem"},
        # Its own key (not the trainer's) for the pointers it moves; the trainer's public key for candidates.
        "rollout": {"rollout-signing-key.pem", "policy-verify-keys"},
        "gateway": set(),
        "feedback": set(),
    }
    for service, keys in expected.items():
        volume, _ = _volume(deployment(docs, service), "version-keys")
        assert ({i["key"] for i in volume["secret"]["items"]} if volume else set()) == keys, service
    with pytest.raises(helm.HelmError, match="versionSigning.existingSecret is empty"):
        render({"versionSigning": {"allowUnsigned": False}})


# --- Kafka users ---------------------------------------------------------------------------------


def acls_of(docs, component: str) -> dict[str, set[str]]:
    """topic -> what the component's KafkaUser may do with it."""
    out: dict[str, set[str]] = {}
    for acl in one(docs, "KafkaUser", component_name(component))["spec"]["authorization"]["acls"]:
        if acl["resource"]["type"] == "topic":
            out.setdefault(acl["resource"]["name"], set()).update(acl["operations"])
    return out


def test_each_service_is_its_own_kafka_user_with_exactly_its_topics():
    docs = docs_of("default")
    reads, writes = {"Read", "Describe"}, {"Write", "Describe"}
    expected = {
        "inference": {"rlhf.completions": writes, "rlhf.policy-updates": reads},
        "inference-canary": {"rlhf.completions": writes, "rlhf.policy-canary": reads},
        "feedback": {"rlhf.feedback": reads | writes, "rlhf.feedback.dlq": writes},
        "reward": {"rlhf.feedback": reads, "rlhf.completions": reads, "rlhf.reward-models": reads | writes},
        # Rollout on: the trainer proposes candidates and cannot announce what users are served.
        "trainer": {"rlhf.completions": reads, "rlhf.policy-candidates": writes},
        "rollout": {
            "rlhf.rollout": reads | writes,
            "rlhf.policy-candidates": reads,
            "rlhf.feedback": reads,
            "rlhf.completions": reads,
            "rlhf.policy-updates": writes,
            "rlhf.policy-canary": writes,
        },
        "gateway": {"rlhf.rollout": reads},
    }
    for component, topics in expected.items():
        assert acls_of(docs, component) == topics, component
        user = one(docs, "KafkaUser", component_name(component))
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == f"{RELEASE}-kafka"
        assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
        dep = deployment(docs, component)
        cfg = load_config(config_class(component), container_environ(docs, main_container(dep)))
        assert cfg.kafka.security_protocol == "SASL_SSL" and cfg.kafka.sasl_username == component_name(component)
        volume, mount = _volume(dep, "kafka-user")
        assert volume["secret"]["secretName"] == component_name(component)  # Strimzi's Secret of the user
        assert cfg.kafka.sasl_password_file == Path(mount["mountPath"]) / "password"
        ca, ca_mount = _volume(dep, "kafka-ca")
        assert ca["secret"]["secretName"] == f"{RELEASE}-kafka-cluster-ca-cert"
        assert cfg.kafka.ssl_ca_file == Path(ca_mount["mountPath"]) / "ca.crt"
    admin = {"Create", "Describe", "Alter", "DescribeConfigs", "AlterConfigs"}
    assert acls_of(docs, "kafka-topics") == {"rlhf.": admin}
    (kafka,) = find(docs, "Kafka")
    assert kafka["spec"]["kafka"]["authorization"] == {"type": "simple"}
    assert "userOperator" in kafka["spec"]["entityOperator"]
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    assert listener["tls"] is True and listener["authentication"] == {"type": "scram-sha-512"}


def test_kafka_users_can_authenticate_by_certificate():
    docs = documents(render({"kafka": {"strimzi": {"listener": {"authentication": "tls"}}}}))
    cfg = load_config(config_class("reward"), container_environ(docs, main_container(deployment(docs, "reward"))))
    assert cfg.kafka.security_protocol == "SSL" and cfg.kafka.ssl_cert_file == Path("/etc/rlhf/kafka-user/user.crt")
    assert one(docs, "KafkaUser", component_name("reward"))["spec"]["authentication"] == {"type": "tls"}


def test_external_kafka_with_sasl_takes_its_credentials_from_a_secret():
    sasl = {"externalKafka": {"securityProtocol": "SASL_SSL", "credentialsSecret": "kafka-users", "caSecret": "ca"}}
    docs = documents(render(merged(values_of("external-kafka"), sasl)))
    dep = deployment(docs, "feedback")
    (user,) = [v for v in main_container(dep)["env"] if v["name"] == "RLHF_KAFKA_SASL_USERNAME"]
    assert user["valueFrom"]["secretKeyRef"] == {"name": "kafka-users", "key": "feedback-username"}
    volume, _ = _volume(dep, "kafka-user")
    assert volume["secret"] == {
        "secretName": "kafka-users",
        "items": [{"key": "feedback-password", "path": "password"}],
    }
    shared = one(docs, "ConfigMap", f"{RELEASE}-env-kafka")["data"]
    assert shared["RLHF_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert shared["RLHF_KAFKA_SSL_CA_FILE"] == "/etc/rlhf/kafka-ca/ca.crt"
    assert _volume(dep, "kafka-ca")[0]["secret"]["secretName"] == "ca"
    job_env = {v["name"]: v for v in main_container(one(docs, "Job", f"{RELEASE}-kafka-topics"))["env"]}
    assert job_env["RLHF_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
    assert job_env["RLHF_KAFKA_SASL_USERNAME"]["valueFrom"]["secretKeyRef"]["key"] == "kafka-topics-username"
    with pytest.raises(helm.HelmError, match="externalKafka.credentialsSecret"):
        render(merged(values_of("external-kafka"), {"externalKafka": {"securityProtocol": "SASL_SSL"}}))


def test_existing_secret_is_referenced_not_created():
    docs = documents(render({"secrets": {"existingSecret": "my-keys"}}))
    assert not find(docs, "Secret", f"{RELEASE}-secrets")
    env = main_container(deployment(docs, "gateway"))["env"]
    (keys,) = [v for v in env if v["name"] == "RLHF_GATEWAY_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"] == {"name": "my-keys", "key": "gateway-api-keys"}


def test_gateway_api_keys_come_from_the_secret():
    docs = documents(render({"secrets": {"gatewayApiKeys": ["carol:" + "k" * 32, "dave:" + "j" * 32]}}))
    env = container_environ(docs, main_container(deployment(docs, "gateway")))
    assert load_config(config_class("gateway"), env).api_keys == f"carol:{'k' * 32},dave:{'j' * 32}"


def test_a_gateway_without_keys_must_be_anonymous_explicitly():
    with pytest.raises(helm.HelmError, match="gateway.anonymous=true"):
        render({"secrets": {"gatewayApiKeys": []}})
    docs = documents(render({"secrets": {"gatewayApiKeys": []}, "gateway": {"anonymous": True}}))
    env = container_environ(docs, main_container(deployment(docs, "gateway")))
    assert load_config(config_class("gateway"), env).anonymous is True


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
    "two rollout services": ({"rollout": {"replicas": 2}}, "/rollout/replicas"),
    "canary share of everyone": ({"rollout": {"canaryShare": 1}}, "/rollout/canaryShare"),
    "unknown rollout mode": ({"rollout": {"initialMode": "yolo"}}, "/rollout/initialMode"),
    "negative canary replicas": ({"inference": {"canary": {"replicas": -1}}}, "/inference/canary/replicas"),
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
        render(
            {
                "feedback": {"enabled": False},
                "reward": {"enabled": False},
                "trainer": {"enabled": False},
                "rollout": {"enabled": False},
            }
        )
    )
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in find(docs, "Deployment")} == {
        "gateway",
        "inference",
    }


# --- progressive rollout ------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_the_canary_group_serves_the_canary_pointer_and_the_gateway_routes_to_it(config):
    docs = docs_of(config)
    canary, stable = deployment(docs, "inference-canary"), deployment(docs, "inference")
    cfg = load_config(config_class("inference-canary"), container_environ(docs, main_container(canary)))
    assert cfg.follow == "canary"
    assert load_config(config_class("inference"), container_environ(docs, main_container(stable))).follow == "current"
    # The inference pod spec, but its own fixed replica count and no autoscaler.
    assert canary["spec"]["replicas"] == values_of(config).get("inference", {}).get("canary", {}).get("replicas", 1)
    assert not find(docs, "HorizontalPodAutoscaler", component_name("inference-canary"))
    assert main_container(canary)["resources"] == main_container(stable)["resources"]
    gateway = load_config(config_class("gateway"), container_environ(docs, main_container(deployment(docs, "gateway"))))
    host, _, port = gateway.canary_inference_address.rpartition(":")
    svc = one(docs, "Service", host)
    assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "inference-canary"
    assert int(port) in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"}
    # The trainer proposes candidates; the rollout service decides (its settings from the values).
    trainer = load_config(config_class("trainer"), container_environ(docs, main_container(deployment(docs, "trainer"))))
    assert trainer.rollout is True
    rollout = load_config(config_class("rollout"), container_environ(docs, main_container(deployment(docs, "rollout"))))
    assert (rollout.canary_share, rollout.alpha, rollout.min_ratings, rollout.initial_mode) == (0.1, 0.05, 30, "auto")


def test_rollout_settings_come_from_the_values():
    values = {"rollout": {"canaryShare": 0.25, "margin": 0.02, "minRatings": 100, "timeoutSeconds": 600,
                          "initialMode": "manual"}, "inference": {"canary": {"replicas": 3}}}  # fmt: skip
    docs = documents(render(values))
    cfg = load_config(config_class("rollout"), container_environ(docs, main_container(deployment(docs, "rollout"))))
    assert (cfg.canary_share, cfg.margin, cfg.min_ratings, cfg.timeout_s, cfg.initial_mode) == (
        0.25,
        0.02,
        100,
        600.0,
        "manual",
    )
    assert deployment(docs, "inference-canary")["spec"]["replicas"] == 3


def test_without_rollout_versions_go_to_everyone_and_nothing_of_it_is_rendered():
    docs = documents(render({"rollout": {"enabled": False}}))
    components = {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in find(docs, "Deployment")}
    assert not {"rollout", "inference-canary"} & components
    assert not find(docs, "KafkaUser", component_name("rollout")) and not find(
        docs, "KafkaUser", component_name("gateway")
    )
    gateway_env = container_environ(docs, main_container(deployment(docs, "gateway")))
    assert "RLHF_GATEWAY_CANARY_INFERENCE_ADDRESS" not in gateway_env and not any(
        k.startswith("RLHF_KAFKA") for k in gateway_env
    )
    assert load_config(config_class("gateway"), gateway_env).canary_inference_address == ""
    trainer_env = container_environ(docs, main_container(deployment(docs, "trainer")))
    assert load_config(config_class("trainer"), trainer_env).rollout is False
    reads, writes = {"Read", "Describe"}, {"Write", "Describe"}
    assert acls_of(docs, "trainer") == {"rlhf.completions": reads, "rlhf.policy-updates": writes}
    pods = pods_of(docs)
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-kafka-clients")
    clients = {c for c, pod in pods.items() if selects(policy["spec"]["podSelector"], pod.labels)}
    assert clients == {"inference", "feedback", "reward", "trainer", "kafka-topics"}


def test_rollout_needs_inference():
    with pytest.raises(helm.HelmError, match="needs inference.enabled"):
        render({"inference": {"enabled": False}, "gateway": {"enabled": False}, "trainer": {"enabled": False}})


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
    # ARGs before the first FROM name its base image (a digest can be passed); nothing else may.
    args = dict(
        a.split("=", 1) for ins, a in instructions[: next(i for i, (x, _) in enumerate(instructions) if x == "FROM")]
    )
    assert all(ins in {"ARG", "FROM"} for ins, _ in instructions[: len(args) + 1]), "FROM must come first"
    instructions = [
        (ins, re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), a) if ins == "FROM" else a)
        for ins, a in instructions[len(args) :]
    ]
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
        # Every package from the hashed lock (tests/unit/deploy/test_lock.py), the project without deps.
        assert "pip install --require-hashes --no-deps -r requirements-cpu.lock" in run
        assert "pip install --no-deps --no-build-isolation ." in run
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
    "services.rollout.metrics",
    "shared.grpc_server",
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
        "thumbs-up rate, stable vs canary",
        "canary share",
        "rollout decisions",
    ):
        assert topic in titles, f"no panel about {topic}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_shows_every_reward_learner_trainer_and_rollout_metric():
    used = dashboard_series()
    metrics = exported_metrics(("services.reward.metrics", "services.trainer.metrics", "services.rollout.metrics"))
    wanted = {
        b: s for b, s in metrics.items() if b.startswith(("rlhf_reward_learner_", "rlhf_trainer_", "rlhf_rollout_"))
    }
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
        "gateway": (False, False, ("rlhf.rollout",)),
        "inference": (True, False, ("rlhf.completions", "rlhf.policy-updates")),
        "inference-canary": (True, False, ("rlhf.completions", "rlhf.policy-canary")),
        "feedback": (False, False, ("rlhf.feedback", "rlhf.feedback.dlq")),
        "reward": (False, True, ("rlhf.completions", "rlhf.feedback", "rlhf.reward-models")),
        "trainer": (True, False, ("rlhf.completions", "rlhf.policy-candidates")),
        "rollout": (
            True,
            False,
            (
                "rlhf.completions",
                "rlhf.feedback",
                "rlhf.policy-canary",
                "rlhf.policy-candidates",
                "rlhf.policy-updates",
                "rlhf.rollout",
            ),
        ),
    }  # (policy, reward model, the topics it reads or writes: all its Kafka user may see)
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
            assert tuple(args[args.index("--topics") + 1].split(",")) == topics, service
            init_env = {v["name"] for v in init.get("env", [])}
            assert (
                config == "external-kafka" or {"RLHF_KAFKA_SASL_USERNAME", "RLHF_KAFKA_SASL_PASSWORD_FILE"} <= init_env
            )
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
