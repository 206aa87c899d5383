"""The deployment files (``docker/``, ``deploy/kubernetes/``) agree with the code they run.

There is no Docker engine or cluster here, so these tests check what would otherwise
fail only at deploy time: every command a container runs parses with the real
``instgenie`` CLI; ports, probes and health checks point at the ports those commands
open and at health endpoints that exist; the environment names are ones the code
reads; every Triton instance has a GPU and a template cache of its own; the router is
pointed at every instance.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import posixpath
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from instgenie_cli import build_parser
from instgenie_router.instances import Instance

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
#: Triton's health endpoints, which the router answers too.
READY, LIVE = "/v2/health/ready", "/v2/health/live"
#: The launcher's own probes on ``serve``'s health port (Triton's answer 200 with a dead stub).
SERVE_READY, SERVE_LIVE = "/ready", "/live"
#: Seconds Triton gets after SIGTERM once drained (``TritonServer.stop``'s ``term_timeout_s``).
TERM_TIMEOUT_S = 15
PORT_NAMES = ("http", "grpc", "metrics")


# --- reading the files ------------------------------------------------------------


def parse_command(argv: list[str]) -> argparse.Namespace:
    """``argv`` (``instgenie ...``) parsed by the real CLI; a parse error fails the test with its message."""
    assert argv[0] == "instgenie", f"{argv}: not an instgenie command"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{shlex.join(argv)}` does not parse:\n{stderr.getvalue()}")


def ports(args: argparse.Namespace) -> dict[str, int]:
    """The http, grpc and metrics ports (and ``serve``'s health port) a parsed command listens on."""
    found = {name: getattr(args, f"{name}_port") for name in PORT_NAMES}
    if args.command == "serve":
        found["health"] = args.health_port
    if args.command == "router":  # options left out take RouterConfig's defaults
        from instgenie_router.service import RouterConfig

        defaults = RouterConfig()
        found = {name: getattr(defaults, f"{name}_port") if port is None else port for name, port in found.items()}
    else:
        assert args.command == "serve", args.command
    assert all(found.values()), f"{found}: port 0 picks a random port, which no probe or client can find"
    return found


def parse_spec(spec: str) -> tuple[bool, Instance]:
    """A router instance spec: (whether it is ``dns:NAME:...``, its host or name and ports)."""
    return spec.startswith("dns:"), Instance.parse(spec.removeprefix("dns:"))


def router_specs(args: argparse.Namespace) -> list[str]:
    assert args.instances, "the router is given no instances"
    return [spec.strip() for spec in args.instances.split(",") if spec.strip()]


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, rest)`` per instruction, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def dockerfile_env() -> dict[str, str]:
    return dict(item.split("=", 1) for op, rest in dockerfile() if op == "ENV" for item in shlex.split(rest))


def url_port_and_path(text: str) -> tuple[int, str]:
    match = re.search(r"https?://[^/:\s]+:(\d+)(/\S*)", text)
    assert match, f"no http://host:port/path in {text!r}"
    return int(match.group(1)), match.group(2)


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` as its default; ``${VAR}`` and ``${VAR:?error}`` as ``<VAR>``."""
    return re.sub(
        r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}",
        lambda m: m.group(3) if m.group(2) in (":-", "-") else f"<{m.group(1)}>",
        text,
    )


def seconds(duration: str) -> float:
    """A compose duration (``90s``, ``1m30s``, ``2h``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"cannot read duration {duration!r}"
    return sum(float(number) * {"h": 3600, "m": 60, "s": 1}[unit] for number, unit in parts)


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_services(role: str) -> dict[str, tuple[dict[str, Any], argparse.Namespace]]:
    """Compose services whose command is ``instgenie <role>``, with their parsed commands
    (the metrics services, Prometheus and Grafana, run other images)."""
    services = {
        name: (service, parse_command(service["command"]))
        for name, service in compose()["services"].items()
        if service.get("command", [None])[0] == "instgenie"
    }
    return {name: pair for name, pair in services.items() if pair[1].command == role}


def compose_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (host source, read-only) of a service's short-syntax volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = interpolate(volume).split(":")
        mounts[target] = (source, mode == ["ro"])
    return mounts


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                yield path, document


def kind(name: str) -> list[dict[str, Any]]:
    return [document for _, document in manifests() if document["kind"] == name]


def workloads() -> list[dict[str, Any]]:
    return kind("Deployment") + kind("StatefulSet")


def workload(role: str) -> tuple[dict[str, Any], dict[str, Any], argparse.Namespace]:
    """The one workload whose container runs ``instgenie <role>``: (workload, container, parsed args)."""
    found = [
        (item, container, parse_command(container.get("command", []) + container.get("args", [])))
        for item in workloads()
        for container in item["spec"]["template"]["spec"]["containers"]
    ]
    matching = [entry for entry in found if entry[2].command == role]
    assert len(matching) == 1, f"expected one container running `instgenie {role}`, found {len(matching)}"
    return matching[0]


def service_selecting(labels: dict[str, str]) -> list[dict[str, Any]]:
    return [s for s in kind("Service") if s["spec"]["selector"].items() <= labels.items()]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def named_ports(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container["ports"]}


# --- the image --------------------------------------------------------------------


def test_dockerfile_builds_on_a_pinned_ngc_triton_image() -> None:
    bases = [rest.split()[0] for op, rest in dockerfile() if op == "FROM"]
    assert len(bases) == 1
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", bases[0]), bases[0]


def test_dockerfile_runs_the_images_triton_and_the_copied_model_repository() -> None:
    env = dockerfile_env()
    assert env["INSTGENIE_TRITON_HOME"] == "/opt/tritonserver"  # where NGC's images install Triton
    workdir, copied = "/", {}
    for op, rest in dockerfile():
        if op == "WORKDIR":
            workdir = posixpath.join(workdir, rest.strip())
        elif op == "COPY":
            *sources, dest = shlex.split(rest)
            copied.update({source.rstrip("/"): posixpath.join(workdir, dest) for source in sources})
    assert env["INSTGENIE_MODEL_REPOSITORY"] == copied["model_repository"]
    assert (ROOT / "model_repository" / "instgenie_edit" / "config.pbtxt").is_file()


def test_dockerfile_copies_every_package_and_the_build_context_keeps_them() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(pyproject["tool"]["setuptools"]["packages"]["find"]["where"])
    sources = {source.rstrip("/") for op, rest in dockerfile() if op == "COPY" for source in shlex.split(rest)[:-1]}
    assert packages | {"pyproject.toml", "README.md", "model_repository"} <= sources
    assert all((ROOT / source).exists() for source in sources), sources
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not sources & ignored
    assert {".venv", "models", "out"} <= ignored  # GBs that must not go to the Docker daemon


def test_dockerfile_installs_the_server_extra_but_uses_the_images_triton() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    server_extra = pyproject["project"]["optional-dependencies"]["server"]
    installed = {
        word
        for op, rest in dockerfile()
        if op == "RUN" and "pip install" in rest
        for word in shlex.split(rest.split("&&")[0])
        if not word.startswith("-")
    }
    assert {req for req in server_extra if not req.startswith("nvidia-pytriton")} <= installed
    assert not any("pytriton" in word for word in installed)
    # The torch the tests run with (the Makefile's pin), not whatever is newest.
    makefile_torch = re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert makefile_torch and f"TORCH_VERSION={makefile_torch.group(1)}" in {
        rest for op, rest in dockerfile() if op == "ARG"
    }


def test_dockerfile_default_command_serves_a_gpu_on_all_interfaces() -> None:
    (cmd,) = [json.loads(rest) for op, rest in dockerfile() if op == "CMD"]
    args = parse_command(cmd)
    assert args.command == "serve" and args.host == "0.0.0.0" and args.device.startswith("cuda")
    exposed = {int(port) for op, rest in dockerfile() if op == "EXPOSE" for port in rest.split()}
    router = parse_command(["instgenie", "router", "--instances", "triton:8001"])
    assert set(ports(args).values()) | set(ports(router).values()) <= exposed  # one image, both roles
    (healthcheck,) = [rest for op, rest in dockerfile() if op == "HEALTHCHECK"]
    assert url_port_and_path(healthcheck) == (ports(args)["health"], SERVE_READY)
    start_period = re.search(r"--start-period=(\S+)", healthcheck)
    assert start_period and seconds(start_period.group(1)) >= args.ready_timeout  # loading is not "unhealthy"


# --- docker compose ---------------------------------------------------------------


def test_compose_instances_each_have_their_own_gpu_and_cache() -> None:
    instances = compose_services("serve")
    assert len(instances) >= 2
    gpus, caches = [], []
    for name, (service, args) in instances.items():
        assert args.host == "0.0.0.0" and args.device.startswith("cuda"), name
        (devices,) = [service["deploy"]["resources"]["reservations"]["devices"]]
        assert [(d["driver"], d["capabilities"]) for d in devices] == [("nvidia", ["gpu"])], name
        assert len(devices[0]["device_ids"]) == 1, f"{name}: one GPU per instance"
        gpus += devices[0]["device_ids"]
        env, mounts = service["environment"], compose_mounts(service)
        cache_dir = args.cache_dir or env["INSTGENIE_CACHE_DIR"]
        assert cache_dir in mounts and not mounts[cache_dir][1], (
            f"{name}: cache dir {cache_dir} is not a writable mount"
        )
        caches.append(mounts[cache_dir][0])
        model = args.model or env["INSTGENIE_MODEL"]
        assert mounts.get(model, (None, False))[1], f"{name}: model folder {model} is not mounted read-only"
    assert len(set(gpus)) == len(gpus), f"instances share a GPU: {gpus}"
    assert len(set(caches)) == len(caches), f"instances share a cache folder: {caches}"


def test_compose_router_reaches_every_instance_once_healthy() -> None:
    instances = compose_services("serve")
    ((_, (router, args)),) = compose_services("router").items()
    targets = {}
    for spec in router_specs(args):
        dns, instance = parse_spec(spec)
        assert not dns, f"{spec}: compose names its services; dns: is for Kubernetes"
        targets[instance.host] = instance
    assert set(targets) == set(instances)
    for host, instance in targets.items():
        expected = ports(instances[host][1])
        assert (instance.http_port, instance.grpc_port, instance.metrics_port) == tuple(expected[n] for n in PORT_NAMES)
    assert {dep: cond["condition"] for dep, cond in router["depends_on"].items()} == dict.fromkeys(
        instances, "service_healthy"
    )
    published = {int(mapping.split(":")[-1]) for mapping in router["ports"]}
    assert published == set(ports(args).values())


def test_compose_health_checks_hit_the_command_http_port() -> None:
    for name, (service, args) in {**compose_services("serve"), **compose_services("router")}.items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "curl", name
        expected = (ports(args)["health"], SERVE_READY) if args.command == "serve" else (ports(args)["http"], READY)
        assert url_port_and_path(" ".join(test)) == expected, name


def test_compose_stop_grace_outlasts_the_drain() -> None:
    for name, (service, args) in compose_services("serve").items():
        # Docker's default is 10 s: it would SIGKILL running edits half way.
        assert seconds(service["stop_grace_period"]) > args.drain_timeout + TERM_TIMEOUT_S, name


def test_compose_variables_are_documented() -> None:
    variables = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    assert "INSTGENIE_MODEL_DIR" in variables
    header = "".join(line for line in COMPOSE.read_text().splitlines(keepends=True) if line.startswith("#"))
    readme = (ROOT / "README.md").read_text()
    assert {v for v in variables if v not in header or v not in readme} == set()


# --- Kubernetes -------------------------------------------------------------------


def test_manifests_parse_and_kustomization_lists_them_all() -> None:
    documents = list(manifests())
    assert {document["kind"] for _, document in documents} >= {"StatefulSet", "Deployment", "Service", "Kustomization"}
    (kustomization,) = kind("Kustomization")
    listed = set(kustomization["resources"])
    assert listed == {path.name for path, document in documents if document["kind"] != "Kustomization"}


def test_kubernetes_containers_expose_and_probe_their_command_ports() -> None:
    for role in ("serve", "router"):
        item, container, args = workload(role)
        opened = ports(args)
        assert named_ports(container) == opened, role
        probes = {
            kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container
        }
        assert {"readinessProbe", "livenessProbe"} <= probes.keys(), role
        # serve: the launcher's probes (they see a dead stub or a wedged loop); the router: its own.
        ready, live, port_name = (SERVE_READY, SERVE_LIVE, "health") if role == "serve" else (READY, LIVE, "http")
        # Liveness must not be readiness: a loading, recovering or draining pod is alive, just not ready.
        assert probes["livenessProbe"]["httpGet"]["path"] == live, role
        assert probes["readinessProbe"]["httpGet"]["path"] == ready, role
        for kind_, probe in probes.items():
            port = probe["httpGet"]["port"]
            assert named_ports(container).get(port, port) == opened[port_name], f"{role} {kind_}"
            assert probe["httpGet"]["path"] in (ready, live), f"{role} {kind_}"
        annotations = item["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == opened["metrics"], role
        assert args.host == "0.0.0.0", f"{role}: a pod must listen beyond its loopback"


def test_kubernetes_triton_pods_have_one_gpu_and_their_own_cache() -> None:
    statefulset, container, args = workload("serve")
    assert statefulset["kind"] == "StatefulSet"
    assert args.device.startswith("cuda")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = statefulset["spec"]["template"]["spec"]
    env, mounts = env_of(container), {m["mountPath"]: m for m in container["volumeMounts"]}
    cache = mounts[args.cache_dir or env["INSTGENIE_CACHE_DIR"]]
    per_pod = {claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]}
    assert cache["name"] in per_pod and not cache.get("readOnly", False)  # a claim per pod: never shared
    assert cache["name"] not in {volume["name"] for volume in pod["volumes"]}
    assert mounts[args.model or env["INSTGENIE_MODEL"]].get("readOnly") is True
    assert pod["terminationGracePeriodSeconds"] > args.drain_timeout + TERM_TIMEOUT_S
    # The host-memory tier must fit in the pod, or the kernel kills it when the tier fills.
    assert args.cache_budget_bytes and quantity(container["resources"]["limits"]["memory"]) > args.cache_budget_bytes
    shm = {volume["name"]: volume for volume in pod["volumes"]}[mounts["/dev/shm"]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"


def quantity(value: str) -> int:
    """A Kubernetes memory quantity (``128Gi``, ``512M``) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?)?", value).groups()  # type: ignore[union-attr]
    factors = {
        None: 1,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    return int(number) * factors[unit]


def test_kubernetes_services_select_their_pods_and_ports() -> None:
    for role in ("serve", "router"):
        item, container, args = workload(role)
        labels = item["spec"]["template"]["metadata"]["labels"]
        assert item["spec"]["selector"]["matchLabels"].items() <= labels.items(), role
        (service,) = service_selecting(labels)
        by_name = {port["name"]: port for port in service["spec"]["ports"]}
        assert {name: port["port"] for name, port in by_name.items()} == ports(args), role
        for port in by_name.values():
            assert named_ports(container).get(port["targetPort"], port["targetPort"]) == port["port"], role
    statefulset, _, _ = workload("serve")
    (headless,) = service_selecting(statefulset["spec"]["template"]["metadata"]["labels"])
    assert headless["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == headless["metadata"]["name"]
    router_deployment, _, router_args = workload("router")
    (router_service,) = service_selecting(router_deployment["spec"]["template"]["metadata"]["labels"])
    assert int(router_service["metadata"]["annotations"]["prometheus.io/port"]) == ports(router_args)["metrics"]


def test_kubernetes_router_discovers_the_triton_pods_through_the_headless_service() -> None:
    statefulset, _, serve_args = workload("serve")
    (headless,) = service_selecting(statefulset["spec"]["template"]["metadata"]["labels"])
    name = headless["metadata"]["name"]
    _, _, args = workload("router")
    (spec,) = router_specs(args)
    dns, target = parse_spec(spec)
    assert dns, f"{spec}: a fixed address would miss pods added by scaling"
    assert target.host == name or target.host.startswith(f"{name}."), f"{spec} does not name Service {name}"
    expected = ports(serve_args)
    assert (target.http_port, target.grpc_port, target.metrics_port) == tuple(expected[n] for n in PORT_NAMES)
    assert args.discovery_interval_s and args.discovery_interval_s > 0


# --- environment ------------------------------------------------------------------


def test_container_environment_names_are_read_by_the_code() -> None:
    names = set(dockerfile_env())
    names |= {key for service in compose()["services"].values() for key in service.get("environment", {})}
    names |= {
        variable
        for item in workloads()
        for container in item["spec"]["template"]["spec"]["containers"]
        for variable in env_of(container)
    }
    names = {name for name in names if name.startswith("INSTGENIE_")}
    assert {"INSTGENIE_TRITON_HOME", "INSTGENIE_MODEL", "INSTGENIE_CACHE_DIR"} <= names
    source = "\n".join(
        path.read_text()
        for folder in ("server", "backend", "router", "client")
        for path in (ROOT / folder).rglob("*.py")
    )
    unread = {name for name in names if not re.search(rf"[\"']{name}[\"']", source)}
    assert not unread, f"set in the deployment files but read by no code: {sorted(unread)}"
