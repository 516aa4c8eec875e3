"""Nodes as pods of a ``DaskCluster`` of the Dask Kubernetes operator (``cluster.kind: kubernetes``).

:func:`cluster_resource` is the ``DaskCluster`` custom resource (``kubernetes.dask.org/v1``)
of a :class:`~rqml_dask.pipeline.config.KubernetesSpec`: dask-kubernetes'
``make_cluster_spec`` with the RQML commands. Its scheduler runs ``dask scheduler --preload
rqml_dask.scheduler``; its default worker group runs ``dask worker --worker-class
rqml_dask.node.RQMLWorker --preload rqml_dask.node`` (``dask cuda worker`` with one
``nvidia.com/gpu`` per pod with ``gpu``), given the scheduler's address and the worker's
name by the operator (``$(DASK_SCHEDULER_ADDRESS)``, ``$(DASK_WORKER_NAME)``, which it sets
in every worker container). Every container reads the image's ``configs/``
(:data:`CONFIG_DIR`: the workers' malloc and profiler settings of ``configs/dask.yaml``).
The nodes' HTTP endpoints stay on their pod's loopback (``kubectl port-forward`` reaches them).

Without ``trust_secret`` the cluster speaks plain ``tcp://`` and every process sets
``rqml.trust.allow-insecure`` (a pod listens beyond loopback, which the scheduler and node
preloads refuse over ``tcp://`` otherwise): anyone who reaches the pods' network runs code
on them, so only in a namespace where every pod and user that can reach them is trusted.
Its scheduler sets ``rqml.trust.expose-http`` too: the operator's probes, and its scaling
down and autoscaling, ask the scheduler's dashboard at the pod's address (a refused
connection there fails the operator's handler, it does not fall back to the Dask RPC).
With ``trust_secret: S`` it speaks ``pqtls://``: the scheduler and the node each hold their
own certificate of the cluster's CA, in Secrets of ``ca.pem``, ``cert.pem``, ``key.pem``
(and optionally the CA's ``crl.pem``): ``S-scheduler`` (a ``scheduler`` certificate) and
``S-node`` (a ``node`` certificate named ``S-node``), each mounted read-only at
:data:`TRUST_DIR` in its pods, with ``rqml.trust.{ca,cert,key,crl}`` pointing there. A node
registers only under its certificate's name and Dask takes one worker per name, so a secure
worker group is one node (its ``--name`` is its certificate's); more nodes are more worker
groups with Secrets of their own (``deploy/kubernetes/rqml-secure-cluster.yaml``). Its
dashboard stays on loopback (its probes ask ``/health`` from inside the pod), so the
operator can neither scale nor autoscale it: a node leaves with its worker group.

:func:`start` runs the resource with dask-kubernetes' ``KubeCluster`` (plain ``tcp://``
only: ``KubeCluster`` reaches its scheduler at a ``tcp://`` address).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rqml_dask.deploy import ClusterStartError
from rqml_dask.deploy.local import NODE_ARGUMENTS, PRELOADS, SCHEDULER_PRELOADS
from rqml_dask.pipeline.config import KubernetesSpec

if TYPE_CHECKING:
    from dask_kubernetes.operator import KubeCluster

CONFIG_DIR = "/opt/rqml/configs"
"""Where the images (``deploy/docker/``) hold the repository's ``configs/`` (``DASK_CONFIG``)."""
TRUST_DIR = "/etc/rqml/trust"
"""Where a pod's pqtls:// credentials (its Secret) are mounted, read-only."""
SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
NODE_HTTP_PORT = 8788
"""The node's HTTP endpoints (``/health``, ``/metrics``, ...), on the worker pod's loopback."""

HEALTH_PROBE = ["python", "-c",
                f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{DASHBOARD_PORT}/health', timeout=5)"]
"""The pqtls:// scheduler's probe, run inside its pod: its dashboard listens on loopback only."""


def cluster_resource(spec: KubernetesSpec, name: str) -> dict[str, Any]:
    """The ``DaskCluster`` of ``spec`` named ``name`` (its scheduler Service: ``NAME-scheduler``)."""
    from dask_kubernetes.operator import make_cluster_spec

    secure = spec.trust_secret is not None
    if secure and (spec.n_workers != 1 or spec.adapt is not None):
        raise ClusterStartError("kubernetes.trust_secret: a pqtls:// node registers under its certificate's name and Dask "
                         "takes one worker per name, so the Secret's worker group is one node (n_workers: 1, no adapt); "
                         "add nodes as DaskWorkerGroups with Secrets of their own (deploy/kubernetes/rqml-secure-cluster.yaml)")
    resource = make_cluster_spec(name=name, image=spec.image, n_workers=spec.n_workers)
    if spec.namespace is not None:
        resource["metadata"]["namespace"] = spec.namespace

    [scheduler] = resource["spec"]["scheduler"]["spec"]["containers"]
    scheduler["args"] = ["dask", "scheduler", "--host", "0.0.0.0", "--port", str(SCHEDULER_PORT),
                         "--dashboard-address", f"127.0.0.1:{DASHBOARD_PORT}" if secure else f":{DASHBOARD_PORT}",
                         *(a for p in SCHEDULER_PRELOADS for a in ("--preload", p)),
                         *(["--protocol", "pqtls"] if secure else [])]
    if secure:  # the dashboard stays on loopback: the probes ask it from inside the pod
        scheduler["readinessProbe"] = {"exec": {"command": list(HEALTH_PROBE)}, "periodSeconds": 5, "timeoutSeconds": 10}
        scheduler["livenessProbe"] = {"exec": {"command": list(HEALTH_PROBE)}, "initialDelaySeconds": 15,
                                      "periodSeconds": 20, "timeoutSeconds": 10}

    [worker] = resource["spec"]["worker"]["spec"]["containers"]
    command = ["dask", "cuda", "worker"] if spec.gpu else ["dask", "worker"]
    worker["args"] = [*command, "$(DASK_SCHEDULER_ADDRESS)", *NODE_ARGUMENTS,
                      # dask cuda worker has no --preload-nanny: its nannies read configs/pqtls.yaml's distributed.nanny.preload
                      *(a for p in PRELOADS for a in ("--preload-nanny", p) if secure and not spec.gpu),
                      "--name", f"{spec.trust_secret}-node" if secure else "$(DASK_WORKER_NAME)",
                      "--dashboard-address", f"127.0.0.1:{NODE_HTTP_PORT}"]
    del worker["ports"]  # its dashboard (the node's HTTP endpoints) is on the pod's loopback
    for container in (scheduler, worker):
        container["env"] = [{"name": "DASK_CONFIG", "value": CONFIG_DIR}]
        container["resources"] = {kind: {"cpu": spec.cpu, "memory": spec.memory} for kind in ("requests", "limits")}
    if spec.gpu:
        for kind in ("requests", "limits"):
            worker["resources"][kind]["nvidia.com/gpu"] = "1"
        # GPU node pools are commonly tainted so that only pods asking for a GPU land there
        resource["spec"]["worker"]["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

    if secure:
        assert spec.trust_secret is not None
        _mount_trust(resource["spec"]["scheduler"]["spec"], scheduler, f"{spec.trust_secret}-scheduler")
        _mount_trust(resource["spec"]["worker"]["spec"], worker, f"{spec.trust_secret}-node")
        # the operator gives workers tcp://NAME-scheduler.NAMESPACE.svc.cluster.local:8786 unless the container has its own
        worker["env"].append({"name": "DASK_SCHEDULER_ADDRESS", "value": f"pqtls://{name}-scheduler:{SCHEDULER_PORT}"})
    else:
        for container in (scheduler, worker):
            container["env"].append({"name": "DASK_RQML__TRUST__ALLOW_INSECURE", "value": "true"})
        # the operator's probes, scaling down and autoscaling ask the dashboard at the pod's address
        scheduler["env"].append({"name": "DASK_RQML__TRUST__EXPOSE_HTTP", "value": "true"})
    return resource


def trust_environment(directory: str = TRUST_DIR) -> list[dict[str, str]]:
    """``rqml.trust.{ca,cert,key,crl}`` as the env of a container whose Secret is at ``directory``."""
    files = {"CA": "ca.pem", "CERT": "cert.pem", "KEY": "key.pem", "CRL": "crl.pem"}
    return [{"name": f"DASK_RQML__TRUST__{key}", "value": f"{directory}/{file}"} for key, file in files.items()]


def _mount_trust(pod: dict[str, Any], container: dict[str, Any], secret: str) -> None:
    pod.setdefault("volumes", []).append({"name": "rqml-trust", "secret": {"secretName": secret, "defaultMode": 0o440}})
    pod["securityContext"] = {"fsGroup": 10001}  # the images' user rqml (uid and gid 10001) reads the key
    container.setdefault("volumeMounts", []).append({"name": "rqml-trust", "mountPath": TRUST_DIR, "readOnly": True})
    container["env"].extend(trust_environment())


def start(spec: KubernetesSpec, name: str) -> KubeCluster:
    """``spec``'s cluster, started by the Dask operator (``kubectl`` access to a cluster that
    runs it); with ``spec.adapt``, adaptive between its bounds. Not with ``trust_secret``."""
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as exc:
        raise ClusterStartError("cluster kind 'kubernetes' needs dask-kubernetes: pip install 'rqml-dask[cluster]'") from exc
    if spec.trust_secret is not None:
        raise ClusterStartError("kubernetes.trust_secret: KubeCluster reaches its scheduler over tcp:// only; apply "
                         "deploy/kubernetes/rqml-secure-cluster.yaml and run with --scheduler pqtls://ADDRESS")
    resource = cluster_resource(spec, name)
    try:
        cluster = KubeCluster(custom_cluster_spec=resource, namespace=spec.namespace)
    except Exception as exc:  # dask-kubernetes and kr8s raise what the API or its absence gives
        from distributed.core import Status

        for never_started in [c for c in KubeCluster._instances if c.status == Status.created]:
            KubeCluster._instances.discard(never_started)  # nothing to delete at exit (its reaper would fail the same way)
        raise ClusterStartError(f"the Dask operator did not start cluster {name!r}: {type(exc).__name__}: {exc} (it needs "
                                "Kubernetes credentials, ~/.kube/config or a pod's service account, and the Dask operator "
                                "installed: README, Running on a cluster)") from exc
    if spec.adapt is not None:
        cluster.adapt(minimum=spec.adapt.minimum, maximum=spec.adapt.maximum)
    return cluster
