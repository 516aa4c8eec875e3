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

from distributed.deploy import Cluster

from rqml_dask.pipeline.config import ClusterSpec


def start_cluster(spec: ClusterSpec) -> Cluster:
    """The cluster of ``spec.kind`` (``local``, ``slurm``, ``pbs`` or ``kubernetes``; not
    ``address``, which is joined, not started), started; the caller closes it."""
    if spec.kind == "local":
        from rqml_dask.deploy.local import embedded_cluster

        return embedded_cluster(spec)
    if spec.kind in ("slurm", "pbs"):
        from rqml_dask.deploy.jobqueue import start

        return start(spec.kind, spec)
    if spec.kind == "kubernetes":
        from rqml_dask.deploy.kubernetes import start as start_kubernetes

        return start_kubernetes(spec.kubernetes, name="rqml")
    raise ValueError(f"cluster kind {spec.kind!r} is joined (its address), not started")
