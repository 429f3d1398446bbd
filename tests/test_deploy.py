"""deploy/ (Kubernetes, kustomize) checked offline: every kustomization renders with
kubectl, every object it makes passes the Kubernetes API's schemas (kubernetes-validate,
strict: no unknown field) for the version we target and the oldest we support, and what
matters holds: the cell index reaches KERNEL_SERVICE_CELL, probes, drain, resources,
policies, and a proxy configuration that names exactly the cells there are."""

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.conftest import SANDBOXED, kernel_processes, stop_process, wait_for

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
# 1.32: the version we target (the pod index label is GA); 1.30: the oldest the manifests
# use fields of (the AppArmor profile field).
TARGET, OLDEST = "1.32", "1.30"
# The cells' address as `kernel-service proxy-config --cell-address` takes it.
CELL_ADDRESS = "kernel-cell-{index}.kernel-cell.%s.svc.cluster.local:8000"
# The proxy pod's own address: all of its interfaces, on the Service's target port.
LISTEN = "0.0.0.0:8000"
KUBECTL = shutil.which("kubectl")
# kubectl is in CI's machine image (from Kubernetes' own apt repository); Debian has only
# kubectl 1.20, whose kustomize (2.0) reads none of this, and no registry has kustomize
# itself: without kubectl, nothing here can be rendered.
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl (1.27 or newer, for its kustomize 5) is not installed"
)
pytestmark = needs_kubectl

Object = dict[str, Any]


@functools.cache
def render(kustomization: Path) -> tuple[Object, ...]:
    """Every object `kubectl kustomize` makes of the kustomization."""
    done = subprocess.run(
        [KUBECTL or "kubectl", "kustomize", str(kustomization)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"kubectl kustomize {kustomization}: {done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def one(objects: tuple[Object, ...], kind: str, name: str) -> Object:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"one {kind} {name}, not {len(found)}"
    return found[0]


def cell_container(objects: tuple[Object, ...]) -> Object:
    pod = one(objects, "StatefulSet", "kernel-cell")["spec"]["template"]["spec"]
    container: Object = pod["containers"][0]
    return container


def selects(selector: Object, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only, as ours are) selects these labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def names(kustomizations: list[Path]) -> list[Any]:
    return [pytest.param(k, id=str(k.relative_to(DEPLOY))) for k in kustomizations]


@pytest.mark.parametrize("kustomization", names(KUSTOMIZATIONS))
@pytest.mark.parametrize("version", [TARGET, OLDEST])
def test_every_object_passes_the_api_schemas(kustomization: Path, version: str) -> None:
    objects = render(kustomization)
    assert {o["kind"] for o in objects} >= {
        "StatefulSet", "Service", "Deployment", "ConfigMap", "PodDisruptionBudget",
        "NetworkPolicy",
    }  # fmt: skip
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(map(str, error.path))
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {where}: {error.message}")


@pytest.mark.parametrize("kustomization", names(KUSTOMIZATIONS))
def test_the_cells_take_their_index_probes_drain_and_resources(kustomization: Path) -> None:
    objects = render(kustomization)
    cells = one(objects, "StatefulSet", "kernel-cell")
    pod, container = cells["spec"]["template"]["spec"], cell_container(objects)
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    label = "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == label
    # KERNEL_SERVICE_PORT=tcp://... from a Service named kernel-service would be read as
    # our setting: no service links in the cells
    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000} and env["KERNEL_SERVICE_PORT"]["value"] == "8000"
    # Ready while it serves its sessions, full or not: placement is the proxy's
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    hook = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    drain = re.search(r"kernel-service drain --url http://127\.0\.0\.1:8000 .*--wait (\d+)", hook)
    assert drain, hook
    assert pod["terminationGracePeriodSeconds"] > int(drain[1])

    for workload in [cells, one(objects, "Deployment", "kernel-proxy")]:
        for each in workload["spec"]["template"]["spec"]["containers"]:
            resources = each["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), each["name"]
            assert "memory" in resources["limits"], each["name"]


@pytest.mark.parametrize(
    ("pod_name", "pod_index", "status", "said"),
    [
        ("kernel-cell-7", "7", 0, "cell=7 argv=serve"),
        ("kernel-cell-12", "", 0, "cell=12 argv=serve"),  # no pod index label (before 1.28)
        ("kernel-cell-7", "3", 64, "disagree"),
        ("kernel-cell", "", 64, "does not end in -<ordinal>"),
    ],
)
def test_the_pod_ordinal_reaches_kernel_service_cell(
    tmp_path: Path, pod_name: str, pod_index: str, status: int, said: str
) -> None:
    """The cell's start-up script, run as the container runs it, with a kernel-service
    that says what it was given."""
    args = cell_container(render(DEPLOY / "base"))["args"]
    assert args[:2] == ["/bin/sh", "-c"]
    stub = tmp_path / "kernel-service"
    stub.write_text('#!/bin/sh\necho "cell=$KERNEL_SERVICE_CELL argv=$*"\n')
    stub.chmod(0o755)
    done = subprocess.run(
        args, env={"PATH": f"{tmp_path}:/usr/bin:/bin", "POD_NAME": pod_name,
                   "POD_INDEX": pod_index},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == status, done.stderr
    assert said in (done.stdout if status == 0 else done.stderr)


def test_a_cell_started_and_drained_as_kubernetes_would(tmp_path: Path) -> None:
    """The real service, started by the cell's start-up script as pod kernel-cell-5, is
    cell 5; its preStop hook (on this machine's port) drains it: no new sessions, its
    own go on."""
    container = cell_container(render(DEPLOY / "base"))
    hook = container["lifecycle"]["preStop"]["exec"]["command"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kernel-service").write_text(
        f'#!/bin/sh\nexec {sys.executable} -m kernel_service "$@"\n'
    )
    (bin_dir / "kernel-service").chmod(0o755)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    key = "deploy-test-key-0123456789"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "POD_NAME": "kernel-cell-5",
        "POD_INDEX": "5",
        "KERNEL_SERVICE_API_KEY": key,
        "KERNEL_SERVICE_HOST": "127.0.0.1",
        "KERNEL_SERVICE_PORT": str(port),
        "KERNEL_SERVICE_CONNECTION_DIR": str(tmp_path / "connection"),
        "KERNEL_SERVICE_WORK_DIR": str(tmp_path / "work"),
        "KERNEL_SERVICE_STATE_DIR": str(tmp_path / "state"),
        "KERNEL_SERVICE_POOL_SIZE": "0",
        "KERNEL_SERVICE_SANDBOX_UID_COUNT": "1000",
        **({} if SANDBOXED else {"KERNEL_SERVICE_SANDBOX": "none"}),
    }
    base_url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "cell.log").open("wb")
    cell = subprocess.Popen(container["args"], env=env, stdout=log, stderr=log)
    try:
        client = httpx.Client(base_url=base_url, timeout=60)

        def serving() -> bool:
            assert cell.poll() is None, (tmp_path / "cell.log").read_text()
            try:
                return client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(serving)
        assert client.get("/healthz").json()["cell"] == {"index": 5, "tag": "0005"}
        keyed = {"Authorization": f"Bearer {key}"}
        made = client.post("/sessions", json={}, headers=keyed)
        assert made.status_code == 201, made.text
        session_id = made.json()["session_id"]
        assert session_id.startswith("0005")

        hook = [base_url if arg == "http://127.0.0.1:8000" else arg for arg in hook]
        drained = subprocess.run(
            hook, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert drained.returncode == 0, drained.stderr
        assert client.get("/readyz").json()["status"] == "draining"
        assert client.post("/sessions", json={}, headers=keyed).status_code == 503
        assert client.get(f"/sessions/{session_id}", headers=keyed).status_code == 200
        client.close()
    finally:
        stop_process(cell)
        log.close()
    # stopped by SIGTERM as the kubelet stops it, within its time (not killed)
    assert cell.returncode in (0, -signal.SIGTERM), (tmp_path / "cell.log").read_text()
    assert kernel_processes(tmp_path / "connection") == []


@pytest.mark.parametrize("kustomization", names(KUSTOMIZATIONS))
def test_only_the_proxy_reaches_the_cells_and_the_cells_reach_nothing(
    kustomization: Path,
) -> None:
    objects = render(kustomization)
    cells = one(objects, "StatefulSet", "kernel-cell")
    proxy = one(objects, "Deployment", "kernel-proxy")
    cell_labels = cells["spec"]["template"]["metadata"]["labels"]
    proxy_labels = proxy["spec"]["template"]["metadata"]["labels"]
    assert not selects(cells["spec"]["selector"], proxy_labels)

    policy = one(objects, "NetworkPolicy", "kernel-cell")["spec"]
    assert selects(policy["podSelector"], cell_labels)
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"] and policy["egress"] == []
    [rule] = policy["ingress"]
    [peer] = rule["from"]
    assert set(peer) == {"podSelector"} and selects(peer["podSelector"], proxy_labels)
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    if kustomization == DEPLOY / "base":  # overlays may add (the example: metrics)
        others = [
            o for o in objects
            if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] != "kernel-cell"
            and selects(o["spec"]["podSelector"], cell_labels)
        ]  # fmt: skip
        assert others == []

    proxy_policy = one(objects, "NetworkPolicy", "kernel-proxy")["spec"]
    assert selects(proxy_policy["podSelector"], proxy_labels)
    [clients] = proxy_policy["ingress"]
    assert "from" not in clients and {"protocol": "TCP", "port": 8000} in clients["ports"]

    budget = one(objects, "PodDisruptionBudget", "kernel-cell")["spec"]
    assert selects(budget["selector"], cell_labels) and budget["maxUnavailable"] == 1
    assert selects(one(objects, "PodDisruptionBudget", "kernel-proxy")["spec"]["selector"],
                   proxy_labels)  # fmt: skip


def test_the_cells_privileges_are_the_ones_documented() -> None:
    """A capability more or less is a decision: docs/scaling.md says why each is there."""
    objects = render(DEPLOY / "base")
    context = cell_container(objects)["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert sorted(context["capabilities"]["add"]) == sorted(
        ["SYS_ADMIN", "SYS_CHROOT", "SETUID", "SETGID", "SETPCAP", "NET_ADMIN", "CHOWN",
         "FOWNER", "DAC_OVERRIDE", "KILL"]
    )  # fmt: skip
    assert not context.get("privileged") and context["runAsUser"] == 0
    # the API refuses allowPrivilegeEscalation false beside SYS_ADMIN (no schema says so)
    assert context["allowPrivilegeEscalation"] is True
    docs = (ROOT / "docs" / "scaling.md").read_text()
    for capability in context["capabilities"]["add"]:
        assert f"`{capability}`" in docs, f"docs/scaling.md does not explain {capability}"

    proxy = one(objects, "Deployment", "kernel-proxy")["spec"]["template"]["spec"]
    assert proxy["securityContext"]["runAsNonRoot"] is True
    [haproxy] = proxy["containers"]
    assert haproxy["securityContext"]["readOnlyRootFilesystem"] is True
    assert haproxy["securityContext"]["capabilities"]["drop"] == ["ALL"]


def proxy_config(objects: tuple[Object, ...]) -> str:
    """The haproxy.cfg in the ConfigMap the proxy mounts."""
    proxy = one(objects, "Deployment", "kernel-proxy")["spec"]["template"]["spec"]
    [volume] = [v for v in proxy["volumes"] if v["name"] == "config"]
    config: str = one(objects, "ConfigMap", volume["configMap"]["name"])["data"]["haproxy.cfg"]
    return config


def cells_of(objects: tuple[Object, ...]) -> tuple[int, str]:
    cells = one(objects, "StatefulSet", "kernel-cell")
    return cells["spec"]["replicas"], cells["metadata"]["namespace"]


@pytest.mark.parametrize("kustomization", names(KUSTOMIZATIONS))
def test_the_proxy_names_every_cell_there_is(kustomization: Path, tmp_path: Path) -> None:
    objects = render(kustomization)
    count, namespace = cells_of(objects)
    headless = one(objects, "Service", "kernel-cell")["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    config = proxy_config(objects)
    addresses = set(re.findall(r"^\s*server \S+ (\S+)", config, re.M))
    assert addresses == {(CELL_ADDRESS % namespace).format(index=i) for i in range(count)}
    tags = re.search(r"acl known_tag var\(txn\.tag\) -m str (.+)", config)
    assert tags and tags[1].split() == [f"{i:04x}" for i in range(count)]
    # every port the proxy's pod declares, probes and the Service reach, HAProxy listens on
    proxy = one(objects, "Deployment", "kernel-proxy")["spec"]["template"]["spec"]
    [haproxy] = proxy["containers"]
    declared = {p["name"]: p["containerPort"] for p in haproxy["ports"]}
    probed = [
        haproxy[probe].get("tcpSocket", haproxy[probe].get("httpGet"))["port"]
        for probe in ("readinessProbe", "livenessProbe")
    ]
    front = one(objects, "Service", "kernel-service")["spec"]["ports"]
    reached = [declared.get(port, port) for port in [*probed, *(p["targetPort"] for p in front)]]
    bound = {int(port) for port in re.findall(r"^\s*bind \S+:(\d+)", config, re.M)}
    assert set(declared.values()) | set(reached) <= bound, (declared, reached, bound)

    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed: its configuration is not checked by HAProxy")
    (tmp_path / "haproxy.cfg").write_text(config)
    checked = subprocess.run(
        ["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # offline, the cells' names do not resolve: warnings, not errors
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _proxy_config_command() -> list[str]:
    return [sys.executable, "-m", "kernel_service", "proxy-config"]


@pytest.mark.parametrize("kustomization", names(KUSTOMIZATIONS))
def test_the_committed_proxy_config_is_what_the_command_writes(kustomization: Path) -> None:
    objects = render(kustomization)
    count, namespace = cells_of(objects)
    made = subprocess.run(
        [*_proxy_config_command(), "--cells", str(count),
         "--cell-address", CELL_ADDRESS % namespace, "--listen", LISTEN],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert made.stdout == proxy_config(objects), (
        f"the proxy configuration of {kustomization} is not what `kernel-service "
        f"proxy-config --cells {count} --cell-address '{CELL_ADDRESS % namespace}' --listen "
        f"{LISTEN}` writes: "
        "write it to the haproxy.cfg its kustomization names"
    )
