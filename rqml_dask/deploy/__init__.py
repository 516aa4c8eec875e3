"""Where a pipeline runs: the clusters ``rqml run`` starts (``cluster.kind`` of the pipeline
file, or ``rqml run --cluster KIND``).

- :mod:`~rqml_dask.deploy.local`: the embedded ``LocalCluster`` / ``LocalCUDACluster``
  (``kind: local``), and the same over ``pqtls://`` (``rqml run --secure``);
- :mod:`~rqml_dask.deploy.jobqueue`: nodes as Slurm or PBS jobs through dask-jobqueue
  (``kind: slurm | pbs``);
- :mod:`~rqml_dask.deploy.kubernetes`: nodes as pods of a Dask operator ``DaskCluster``
  (``kind: kubernetes``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from distributed.deploy import Cluster

from rqml_dask.pipeline.config import ClusterSpec


class ClusterStartError(RuntimeError):
    """A cluster that cannot be started as asked; the message says what and the fix."""


@contextlib.contextmanager
def started_cluster(spec: ClusterSpec, secure: bool = False) -> Iterator[Cluster]:
    """The cluster of ``spec.kind`` (``local``, ``slurm``, ``pbs`` or ``kubernetes``; not
    ``address``, which is joined, not started), open while the context is; ``secure``: over
    ``pqtls://`` with certificates issued for the run (``local``, ``slurm``, ``pbs``; a
    Kubernetes cluster takes its credentials from a Secret, ``kubernetes.trust_secret``)."""
    if spec.kind == "address":
        raise ClusterStartError("cluster kind 'address' is joined (its address), not started")
    if secure and spec.kind == "kubernetes":
        raise ClusterStartError("--secure issues certificates to processes it starts; Kubernetes pods take theirs from a Secret "
                         "(cluster.kubernetes.trust_secret)")
    if spec.kind == "local":
        from rqml_dask.deploy.local import embedded_cluster, secure_embedded_cluster

        with secure_embedded_cluster(spec) if secure else embedded_cluster(spec) as cluster:
            yield cluster
    elif spec.kind in ("slurm", "pbs"):
        from rqml_dask.deploy.jobqueue import secure_jobs, start

        with secure_jobs(spec.kind, spec) if secure else start(spec.kind, spec) as cluster:
            yield cluster
    else:
        from rqml_dask.deploy.kubernetes import start as start_kubernetes

        with start_kubernetes(spec.kubernetes, name="rqml") as cluster:
            yield cluster
