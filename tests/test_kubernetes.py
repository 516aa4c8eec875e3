"""Kubernetes (issue 35): the Dask operator resources of rqml_dask/deploy/kubernetes.py and
deploy/kubernetes/*.yaml, and the images of deploy/docker/, checked without a cluster or a
Docker engine.

Every resource is validated against the operator's own CRD schemas (the openAPIV3Schema of
the installed dask-kubernetes' Helm chart) with jsonschema, made strict: Kubernetes prunes a
field its structural schema does not declare, silently, so a misspelt key would be lost on
``kubectl apply``; here it is an error. The containers' command lines are parsed by Dask's
own ``dask scheduler`` / ``dask worker`` command definitions (``dask cuda worker`` is not
installed here), and every ``$(VAR)`` they use must be a variable the container has.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import dask
import jsonschema
import pytest
import yaml

import dask_kubernetes
import rqml_dask.scheduler  # noqa: F401  (its import checks a dask scheduler command: here, outside one)
from rqml_dask.config import exposure_settings
from rqml_dask.deploy import ClusterStartError, kubernetes
from rqml_dask.deploy.kubernetes import CONFIG_DIR, TRUST_DIR, cluster_resource
from rqml_dask.exposure import ExposureError, check_listeners, dask_scheduler_command_addresses
from rqml_dask.pipeline.config import AdaptSpec, KubernetesSpec

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
DOCKERFILES = [ROOT / "deploy" / "docker" / "Dockerfile", ROOT / "deploy" / "docker" / "Dockerfile.gpu"]
CRDS = Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"
CPU_IMAGE = "ghcr.io/rqml-dask/rqml-dask:0.1.0"
GPU_IMAGE = "ghcr.io/rqml-dask/rqml-dask-gpu:0.1.0"
OPERATOR_WORKER_ENV = {"DASK_WORKER_NAME", "DASK_SCHEDULER_ADDRESS"}
"""What the operator adds to every worker container (controller.py: build_worker_deployment_spec)."""
TRUST_ENV = {f"DASK_RQML__TRUST__{k.upper()}": f"{TRUST_DIR}/{k}.pem" for k in ("ca", "cert", "key", "crl")}


def _strict(schema: Any) -> Any:
    """``schema`` with every object that lists its properties closed to others (what
    Kubernetes would prune), unless it says how to take others."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _validators() -> dict[str, jsonschema.Draft7Validator]:
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
        # what every object has besides its schema's fields
        schema["properties"] |= {"apiVersion": {"type": "string", "enum": [f"{crd['spec']['group']}/v1"]},
                                 "kind": {"type": "string", "enum": [crd["spec"]["names"]["kind"]]},
                                 "metadata": {"type": "object", "required": ["name"],
                                              "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                                             "namespace": {"type": "string"}}}}
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
        jsonschema.Draft7Validator.check_schema(schema)
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(_strict(schema))
    return validators


VALIDATORS = _validators()


def errors(resource: dict[str, Any]) -> list[str]:
    """Why the operator's CRD would refuse (or prune part of) ``resource``; none if it takes it."""
    validator = VALIDATORS.get(resource.get("kind"))  # type: ignore[arg-type]
    if validator is None:
        return [f"no CRD of kind {resource.get('kind')!r}"]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resource)]


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path.name}#{i}", doc) for path in MANIFESTS for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]


def pods(resource: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(role, pod spec)`` of each pod template in ``resource``: ``scheduler`` or ``worker``."""
    spec = resource["spec"]
    found = [("worker", spec["worker"]["spec"])] if "worker" in spec else []
    if "scheduler" in spec:
        found.append(("scheduler", spec["scheduler"]["spec"]))
    return found


def container(resource: dict[str, Any], role: str) -> dict[str, Any]:
    [pod] = [p for r, p in pods(resource) if r == role]
    [only] = pod["containers"]
    return only


def env(c: dict[str, Any]) -> dict[str, str]:
    names = [e["name"] for e in c.get("env", [])]
    assert len(names) == len(set(names)), f"an env variable twice: {names}"
    return {e["name"]: e["value"] for e in c.get("env", [])}


def option(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]


VARIANTS = {
    "cpu": KubernetesSpec(),
    "gpu": KubernetesSpec(gpu=True, image=GPU_IMAGE, cpu="4", memory="16Gi"),
    "adapt": KubernetesSpec(adapt=AdaptSpec(minimum=1, maximum=10), namespace="rqml"),
    "trust": KubernetesSpec(trust_secret="rqml", n_workers=1),
    "trust-gpu": KubernetesSpec(trust_secret="rqml", n_workers=1, gpu=True, image=GPU_IMAGE, namespace="rqml"),
}


# --- the schemas ----------------------------------------------------------------------------


def test_the_operator_crds_are_found_and_strict():
    assert {"DaskCluster", "DaskWorkerGroup", "DaskAutoscaler", "DaskJob"} <= set(VALIDATORS)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cluster_resource_is_a_valid_daskcluster(name):
    resource = cluster_resource(VARIANTS[name], "rqml")
    assert resource["apiVersion"] == "kubernetes.dask.org/v1" and resource["kind"] == "DaskCluster"
    assert errors(resource) == []


@pytest.mark.parametrize("name,doc", documents(), ids=[n for n, _ in documents()])
def test_every_manifest_document_is_a_valid_operator_resource(name, doc):
    assert doc["apiVersion"] == "kubernetes.dask.org/v1"
    assert errors(doc) == []


def test_the_manifests_hold_a_cluster_gpu_workers_a_secure_cluster_and_an_autoscaler():
    kinds = {(name.split("#")[0], doc["kind"]) for name, doc in documents()}
    assert {("rqml-cluster.yaml", "DaskCluster"), ("rqml-gpu-workers.yaml", "DaskWorkerGroup"),
            ("rqml-secure-cluster.yaml", "DaskCluster"), ("rqml-secure-cluster.yaml", "DaskWorkerGroup"),
            ("rqml-autoscaler.yaml", "DaskAutoscaler")} <= kinds
    clusters = {doc["metadata"]["name"] for _, doc in documents() if doc["kind"] == "DaskCluster"}
    for name, doc in documents():  # a worker group or autoscaler names a cluster the manifests define
        if doc["kind"] != "DaskCluster":
            assert doc["spec"]["cluster"] in clusters, name


def _broken(mutate) -> dict[str, Any]:
    resource = cluster_resource(KubernetesSpec(), "rqml")
    mutate(resource)
    return resource


@pytest.mark.parametrize("why,mutate", [
    ("replicas a string", lambda r: r["spec"]["worker"].update(replicas="two")),
    ("no worker", lambda r: r["spec"].pop("worker")),
    ("a container without a name", lambda r: r["spec"]["worker"]["spec"]["containers"][0].pop("name")),
    ("a misspelt field (pruned by Kubernetes)", lambda r: r["spec"]["worker"]["spec"]["containers"][0].update(volumeMount=[])),
    ("a GPU count as a number", lambda r: r["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": 1})),
    ("args not a list", lambda r: r["spec"]["scheduler"]["spec"]["containers"][0].update(args="dask scheduler")),
    ("a name with capitals", lambda r: r["metadata"].update(name="RQML")),
    ("the wrong apiVersion", lambda r: r.update(apiVersion="kubernetes.dask.org/v2")),
])
def test_the_validator_refuses_a_broken_resource(why, mutate):
    assert errors(_broken(mutate)), why


def test_the_validator_refuses_a_broken_worker_group_and_autoscaler():
    group = copy.deepcopy(yaml.safe_load((ROOT / "deploy/kubernetes/rqml-gpu-workers.yaml").read_text()))
    group["spec"].pop("cluster")
    assert any("'cluster' is a required property" in e for e in errors(group))
    scaler = yaml.safe_load((ROOT / "deploy/kubernetes/rqml-autoscaler.yaml").read_text())
    scaler["spec"]["maximum"] = "8"
    assert any("maximum" in e for e in errors(scaler))


# --- what the containers run ----------------------------------------------------------------


def all_resources() -> list[tuple[str, dict[str, Any]]]:
    return [*((f"cluster_resource:{n}", cluster_resource(s, "rqml")) for n, s in VARIANTS.items()), *documents()]


@pytest.mark.parametrize("name,resource", all_resources(), ids=[n for n, _ in all_resources()])
def test_schedulers_preload_the_scheduler_plugin_and_workers_are_rqml_nodes(name, resource):
    for role, pod in pods(resource):
        [c] = pod["containers"]
        args = c["args"]
        assert env(c)["DASK_CONFIG"] == CONFIG_DIR, name
        if role == "scheduler":
            assert args[:2] == ["dask", "scheduler"] and option(args, "--preload") == ["rqml_dask.scheduler"], name
        else:
            assert args[:2] == ["dask", "worker"] or args[:3] == ["dask", "cuda", "worker"], name
            assert option(args, "--worker-class") == ["rqml_dask.node.RQMLWorker"], name
            assert option(args, "--preload") == ["rqml_dask.node"], name
            assert len(option(args, "--name")) == 1, name
            gpu = args[1] == "cuda"
            assert (c["resources"]["limits"].get("nvidia.com/gpu") == "1") is gpu, name
            assert (c["image"] == GPU_IMAGE) is gpu or name.startswith("cluster_resource:"), name


@pytest.mark.parametrize("name,resource", all_resources(), ids=[n for n, _ in all_resources()])
def test_every_variable_a_command_uses_is_set_in_its_container(name, resource):
    """Kubernetes leaves an unknown ``$(VAR)`` as it is: the worker would be named ``$(VAR)``."""
    for role, pod in pods(resource):
        [c] = pod["containers"]
        known = set(env(c)) | (OPERATOR_WORKER_ENV if role == "worker" else set())
        used = {m for a in c["args"] for m in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a)}
        assert used <= known, (name, role, used - known)
        volumes = {v["name"] for v in pod.get("volumes", [])}
        assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes, (name, role)


def config_of(variables: dict[str, str]) -> dict[str, Any]:
    """The Dask config a container's ``DASK_*`` variables make, as dotted keys."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", dask.config.collect_env({k: v for k, v in variables.items() if k not in ("DASK_CONFIG", "DASK_SCHEDULER_ADDRESS")}))
    return flat


def parse_and_check(role: str, c: dict[str, Any], variables: dict[str, str] | None = None) -> dict[str, Any]:
    """``c``'s command as Dask's click command parses it (an unknown option of ``dask worker``
    would become a preload argument, so none may), and what the RQML preloads check before
    anything listens: the scheduler's planned listeners (what ``rqml_dask.scheduler`` does
    as it is imported) and a node's (on every interface, over its scheduler's protocol), under
    the Dask config of the container's env. Raises :class:`ExposureError` where they refuse."""
    from distributed.cli import dask_scheduler, dask_worker

    variables = env(c) if variables is None else variables
    args = [re.sub(r"\$\((\w+)\)", lambda m: {"DASK_WORKER_NAME": "w-0"}.get(m[1], "tcp://s:8786"), a) for a in c["args"]]
    if "DASK_SCHEDULER_ADDRESS" in variables:
        args = [variables["DASK_SCHEDULER_ADDRESS"] if a == "tcp://s:8786" else a for a in args]
    with dask.config.set(config_of(variables)):
        if role == "scheduler":
            assert args[:2] == ["dask", "scheduler"]
            context = dask_scheduler.main.make_context("dask scheduler", args[2:])
            with context:
                check_listeners(dask_scheduler_command_addresses() or [], exposure_settings())
            return context.params
        if args[:3] == ["dask", "cuda", "worker"]:  # dask-cuda is not installed here
            scheduler, params = args[3], {}
        else:
            assert args[:2] == ["dask", "worker"]
            params = dask_worker.main.make_context("dask worker", args[2:]).params
            assert params["preload_argv"] == ()
            scheduler = params["scheduler"]
        check_listeners([f"{scheduler.split('://')[0]}://0.0.0.0:0"], exposure_settings(), kind="node")
        return params


@pytest.mark.parametrize("name,resource", all_resources(), ids=[n for n, _ in all_resources()])
def test_dask_takes_the_commands_and_the_preloads_take_where_they_listen(name, resource):
    for role, pod in pods(resource):
        [c] = pod["containers"]
        params = parse_and_check(role, c)
        if role == "scheduler":
            assert params["preload"] == ("rqml_dask.scheduler",), name
        elif params:
            assert params["worker_class"] == "rqml_dask.node.RQMLWorker" and params["preload"] == ("rqml_dask.node",), name


def test_without_allow_insecure_the_preloads_refuse_the_plain_cluster():
    """The check above can fail: the tcp:// cluster's containers without their setting."""
    resource = cluster_resource(KubernetesSpec(), "rqml")
    for role in ("scheduler", "worker"):
        c = container(resource, role)
        variables = {k: v for k, v in env(c).items() if k != "DASK_RQML__TRUST__ALLOW_INSECURE"}
        with pytest.raises(ExposureError, match="refusing to listen on tcp://0.0.0.0"):
            parse_and_check(role, c, variables)


def test_the_plain_cluster_is_tcp_and_says_it_is_insecure():
    resource = cluster_resource(KubernetesSpec(), "rqml")
    scheduler, worker = container(resource, "scheduler"), container(resource, "worker")
    assert "--protocol" not in scheduler["args"]
    assert env(scheduler)["DASK_RQML__TRUST__ALLOW_INSECURE"] == env(worker)["DASK_RQML__TRUST__ALLOW_INSECURE"] == "true"
    assert env(scheduler)["DASK_RQML__TRUST__EXPOSE_HTTP"] == "true"  # the operator's probes and scaling ask it
    assert "DASK_RQML__TRUST__EXPOSE_HTTP" not in env(worker)
    assert option(worker["args"], "--name") == ["$(DASK_WORKER_NAME)"] and resource["spec"]["worker"]["replicas"] == 2
    assert option(worker["args"], "--dashboard-address") == ["127.0.0.1:8788"]
    assert scheduler["readinessProbe"]["httpGet"] == {"port": "http-dashboard", "path": "/health"}
    assert "volumes" not in resource["spec"]["worker"]["spec"] and "--preload-nanny" not in worker["args"]


def test_resources_are_the_specs_and_a_gpu_pod_asks_for_one_gpu():
    resource = cluster_resource(KubernetesSpec(gpu=True, cpu="3", memory="12Gi", n_workers=5, namespace="lab"), "lab-rqml")
    worker, scheduler = container(resource, "worker"), container(resource, "scheduler")
    assert worker["resources"] == {k: {"cpu": "3", "memory": "12Gi", "nvidia.com/gpu": "1"} for k in ("requests", "limits")}
    assert scheduler["resources"] == {k: {"cpu": "3", "memory": "12Gi"} for k in ("requests", "limits")}  # no GPU
    assert worker["args"][:4] == ["dask", "cuda", "worker", "$(DASK_SCHEDULER_ADDRESS)"]
    assert resource["metadata"] == {"name": "lab-rqml", "namespace": "lab"}
    assert resource["spec"]["worker"]["replicas"] == 5
    assert resource["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == "lab-rqml"


def test_trust_secret_mounts_the_secrets_and_points_rqml_trust_at_them():
    resource = cluster_resource(KubernetesSpec(trust_secret="lab", n_workers=1), "rqml")
    assert errors(resource) == []
    for role, secret in (("scheduler", "lab-scheduler"), ("worker", "lab-node")):
        [pod] = [p for r, p in pods(resource) if r == role]
        [c] = pod["containers"]
        assert pod["volumes"] == [{"name": "rqml-trust", "secret": {"secretName": secret, "defaultMode": 0o440}}]
        assert c["volumeMounts"] == [{"name": "rqml-trust", "mountPath": TRUST_DIR, "readOnly": True}]
        assert TRUST_ENV.items() <= env(c).items()
        assert "DASK_RQML__TRUST__ALLOW_INSECURE" not in env(c) and "DASK_RQML__TRUST__EXPOSE_HTTP" not in env(c)
        assert pod["securityContext"] == {"fsGroup": 10001}
    scheduler, worker = container(resource, "scheduler"), container(resource, "worker")
    assert option(scheduler["args"], "--protocol") == ["pqtls"]
    assert option(scheduler["args"], "--dashboard-address") == ["127.0.0.1:8787"]
    assert "exec" in scheduler["readinessProbe"] and "exec" in scheduler["livenessProbe"]
    assert option(worker["args"], "--preload-nanny") == ["rqml_dask.node"]
    assert option(worker["args"], "--name") == ["lab-node"]  # the certificate's name
    # not the operator's tcp:// address: a container's own DASK_SCHEDULER_ADDRESS is kept
    assert env(worker)["DASK_SCHEDULER_ADDRESS"] == "pqtls://rqml-scheduler:8786"


def test_the_health_probe_is_python():
    compile(kubernetes.HEALTH_PROBE[2], "probe", "exec")


def test_a_secure_gpu_node_gets_its_nanny_preload_from_the_image_config():
    """``dask cuda worker`` has no ``--preload-nanny``; on pqtls:// a nanny without the node
    preload (its doors) stops the worker, so configs/pqtls.yaml, in the image, gives it."""
    worker = container(cluster_resource(VARIANTS["trust-gpu"], "rqml"), "worker")
    assert "--preload-nanny" not in worker["args"]
    config = yaml.safe_load((ROOT / "configs" / "pqtls.yaml").read_text())
    assert "rqml_dask.node" in config["distributed"]["nanny"]["preload"]


def test_a_secure_worker_group_is_one_node_more_are_refused():
    with pytest.raises(ClusterStartError, match="one node"):
        cluster_resource(KubernetesSpec(trust_secret="lab"), "rqml")  # n_workers: 2 by default
    with pytest.raises(ClusterStartError, match="one node"):
        cluster_resource(KubernetesSpec(trust_secret="lab", n_workers=1, adapt=AdaptSpec(maximum=4)), "rqml")


# --- the manifests are the module's resources -----------------------------------------------


def test_rqml_cluster_yaml_is_the_default_cluster_resource():
    assert yaml.safe_load((ROOT / "deploy/kubernetes/rqml-cluster.yaml").read_text()) == cluster_resource(KubernetesSpec(), "rqml")


def test_rqml_gpu_workers_yaml_is_the_gpu_worker_group_of_that_cluster():
    group = yaml.safe_load((ROOT / "deploy/kubernetes/rqml-gpu-workers.yaml").read_text())
    spec = KubernetesSpec(gpu=True, image=GPU_IMAGE, cpu="4", memory="16Gi", n_workers=1)
    assert group["spec"]["cluster"] == "rqml"
    assert group["spec"]["worker"] == cluster_resource(spec, "rqml")["spec"]["worker"]


def test_rqml_secure_cluster_yaml_is_the_trust_secret_cluster_resource_and_its_nodes_are_named_by_their_secrets():
    [cluster, *groups] = yaml.safe_load_all((ROOT / "deploy/kubernetes/rqml-secure-cluster.yaml").read_text())
    assert cluster == cluster_resource(KubernetesSpec(trust_secret="rqml", n_workers=1, cpu="2", memory="8Gi"), "rqml-secure")
    assert groups
    for group in groups:
        assert group["kind"] == "DaskWorkerGroup" and group["spec"]["cluster"] == "rqml-secure"
        worker = group["spec"]["worker"]
        [c] = worker["spec"]["containers"]
        [volume] = worker["spec"]["volumes"]
        assert worker["replicas"] == 1
        assert option(c["args"], "--name") == [volume["secret"]["secretName"]]
        assert TRUST_ENV.items() <= env(c).items()
        assert env(c)["DASK_SCHEDULER_ADDRESS"] == "pqtls://rqml-secure-scheduler:8786"
        assert c["volumeMounts"] == [{"name": volume["name"], "mountPath": TRUST_DIR, "readOnly": True}]
        assert worker["spec"]["securityContext"] == {"fsGroup": 10001}
        assert "--preload-nanny" in c["args"] or c["args"][:3] == ["dask", "cuda", "worker"]


# --- start() without a Kubernetes cluster ---------------------------------------------------


class _FakeKubeCluster:
    made: list[_FakeKubeCluster] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.adapted = kwargs, None
        _FakeKubeCluster.made.append(self)

    def adapt(self, minimum: int, maximum: int) -> None:
        self.adapted = (minimum, maximum)


def test_start_hands_the_resource_to_kubecluster_and_adapts(monkeypatch):
    import dask_kubernetes.operator

    monkeypatch.setattr(dask_kubernetes.operator, "KubeCluster", _FakeKubeCluster)
    spec = KubernetesSpec(adapt=AdaptSpec(minimum=1, maximum=6), namespace="lab")
    cluster = kubernetes.start(spec, "rqml")
    assert cluster.kwargs == {"custom_cluster_spec": cluster_resource(spec, "rqml"), "namespace": "lab"}
    assert cluster.adapted == (1, 6)
    assert kubernetes.start(KubernetesSpec(), "rqml").adapted is None


def test_start_refuses_trust_secret_kubecluster_speaks_tcp_only(monkeypatch):
    import dask_kubernetes.operator

    monkeypatch.setattr(dask_kubernetes.operator, "KubeCluster", _FakeKubeCluster)
    with pytest.raises(ClusterStartError, match="tcp://"):
        kubernetes.start(KubernetesSpec(trust_secret="lab", n_workers=1), "rqml")


# --- the images -----------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_file_a_dockerfile_copies_is_in_the_repository(dockerfile):
    copies = [args.split() for op, args in instructions(dockerfile) if op in ("COPY", "ADD")]
    assert copies
    for *sources, _ in copies:
        assert not any(s.startswith("--from") for s in sources)
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"


@pytest.mark.parametrize("dockerfile,extras", [(DOCKERFILES[0], {"etcd", "consul"}), (DOCKERFILES[1], {"gpu", "etcd", "consul"})],
                         ids=lambda p: getattr(p, "name", ""))
def test_the_dockerfiles_install_existing_extras_with_the_constraints(dockerfile, extras):
    runs = " ".join(args for op, args in instructions(dockerfile) if op == "RUN")
    [installed] = re.findall(r"pip install [^&]*?-c constraints\.txt '\.\[([a-z,]+)\]'", runs)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(installed.split(",")) == extras and extras <= set(declared)
    if "gpu" in extras:
        assert any(d.startswith("dask-cuda") for d in declared["gpu"]) and any(d.startswith("cupy") for d in declared["gpu"])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_images_hold_the_configs_where_the_manifests_read_them_and_run_as_the_fsgroup(dockerfile):
    steps = instructions(dockerfile)
    assert ("COPY", f"configs/ {CONFIG_DIR}/") in steps
    assert any(op == "ENV" and f"DASK_CONFIG={CONFIG_DIR}" in args.split() for op, args in steps)
    assert ("USER", "10001:10001") in steps  # the manifests' fsGroup: the group reads the mounted key
    froms = [args for op, args in steps if op == "FROM"]
    assert froms == (["python:3.11-slim"] if dockerfile.name == "Dockerfile" else ["${CUDA_IMAGE}"])
    if dockerfile.name == "Dockerfile.gpu":  # the same Python as the CPU image (the scheduler's)
        assert "python3.11" in " ".join(args for op, args in steps if op == "RUN")
