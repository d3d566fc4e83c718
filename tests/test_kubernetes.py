"""deploy/kubernetes: every manifest is valid for a current Kubernetes (`kubernetes-validate
--strict`: unknown fields are errors), the ConfigMap's embedded config passes `balancer
check`, and the manifests agree with each other, with that config and with the Dockerfile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from balancer.config import Config, parse_config

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "deploy" / "kubernetes"
CONFIG_KEY = "balancer.yaml"
PRE_STOP_ALLOWANCE = 5  # the preStop sleep, before SIGTERM reaches the balancer


def manifests() -> list[Path]:
    return sorted(MANIFESTS.glob("*.yaml"))


def resources() -> dict[str, dict[str, Any]]:
    """kind/name -> resource, over every manifest."""
    found = {}
    for path in manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def embedded_text() -> str:
    return resources()["ConfigMap/balancer-config"]["data"][CONFIG_KEY]


def embedded() -> Config:
    return parse_config(yaml.safe_load(embedded_text()))


def pod_spec() -> dict[str, Any]:
    return resources()["Deployment/balancer"]["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    (only,) = pod_spec()["containers"]
    return only


def test_every_manifest_is_valid_for_a_current_kubernetes_in_strict_mode() -> None:
    version = kubernetes_validate.latest_version()
    assert tuple(int(part) for part in version.split(".")[:2]) >= (1, 33)
    assert {p.name for p in manifests()} == {"configmap.yaml", "deployment.yaml",
                                             "service.yaml", "app-headless.yaml", "pdb.yaml"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet",
         "-k", version, *map(str, manifests())],
        capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_strict_validation_does_catch_a_misspelt_field(tmp_path: Path) -> None:
    """The check above can fail: a field Kubernetes does not know is an error."""
    bad = tmp_path / "deployment.yaml"
    bad.write_text((MANIFESTS / "deployment.yaml").read_text().replace(
        "readOnlyRootFilesystem:", "readOnlyRootFileSystem:"))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet",
         str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "readOnlyRootFileSystem" in result.stdout + result.stderr


def test_the_configmaps_config_passes_balancer_check(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_KEY
    path.write_text(embedded_text())
    result = subprocess.run([sys.executable, "-m", "balancer", "check", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "configuration ok"


def test_the_config_discovers_the_headless_service_by_srv() -> None:
    headless = resources()["Service/app"]
    assert headless["spec"]["clusterIP"] == "None"
    (port,) = headless["spec"]["ports"]
    namespace = headless["metadata"].get("namespace", "default")
    (found,) = [d for u in embedded().upstreams.values() for d in u.discover]
    assert found.srv
    assert found.name == (f"_{port['name']}._{port['protocol'].lower()}."
                          f"{headless['metadata']['name']}.{namespace}.svc.cluster.local")


def test_the_deployment_mounts_the_configmap_folder_and_watches_it() -> None:
    args = container()["args"]
    assert "--watch-config" in args
    config_path = Path(args[args.index("-c") + 1])
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    (mount,) = [m for m in container()["volumeMounts"]
                if volumes[m["name"]].get("configMap", {}).get("name") == "balancer-config"]
    # A subPath mount is never updated: --watch-config would wait for ever.
    assert "subPath" not in mount
    assert config_path == Path(mount["mountPath"]) / CONFIG_KEY
    assert resources()["Deployment/balancer"]["spec"]["replicas"] == 2


def test_ports_probes_and_scrape_annotations_match_the_config() -> None:
    config = embedded()
    assert config.metrics is not None
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert sorted(ports.values()) == sorted(
        [listener.bind.port for listener in config.listeners] + [config.metrics.bind.port])
    for probe in ("readinessProbe", "livenessProbe"):
        get = container()[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert ports[get["port"]] == config.metrics.bind.port
    annotations = resources()["Deployment/balancer"]["spec"]["template"]["metadata"][
        "annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.metrics.bind.port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_grace_period_outlasts_the_drain() -> None:
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert container()["lifecycle"]["preStop"]["exec"]["command"] == [
        "sleep", str(PRE_STOP_ALLOWANCE)]
    assert grace > PRE_STOP_ALLOWANCE + embedded().shutdown_timeout


def test_resources_and_a_non_root_read_only_security_context() -> None:
    limits = container()["resources"]
    assert {"cpu", "memory"} <= set(limits["requests"])
    assert "memory" in limits["limits"]
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True
    own = container()["securityContext"]
    assert own["readOnlyRootFilesystem"] is True
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"]
    # The Dockerfile's numeric USER is the one the pod runs as.
    user = next(line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines()
                if line.startswith("USER "))
    assert user == f"{pod['runAsUser']}:{pod['runAsGroup']}"
    # The root file system is read-only: the temporary folder is a volume of its own.
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert any(m["mountPath"] == "/tmp" and "emptyDir" in volumes[m["name"]]
               for m in container()["volumeMounts"])


@pytest.mark.parametrize("kind", ["Service/balancer", "PodDisruptionBudget/balancer"])
def test_the_client_service_and_the_budget_select_the_balancer_pods(kind: str) -> None:
    labels = resources()["Deployment/balancer"]["spec"]["template"]["metadata"]["labels"]
    spec = resources()[kind]["spec"]
    selector = spec["selector"].get("matchLabels", spec["selector"])
    assert selector.items() <= labels.items()
    if kind.startswith("Service"):
        names = {p["name"] for p in container()["ports"]}
        assert {p["targetPort"] for p in spec["ports"]} <= names
    else:
        assert spec["minAvailable"] < resources()["Deployment/balancer"]["spec"]["replicas"]
