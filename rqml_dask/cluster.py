"""The embedded cluster ``rqml run`` starts when it is given no scheduler.

A LocalCUDACluster (one worker per GPU, dask-cuda's spilling defaults) when a GPU and
dask-cuda are present, else a process-based LocalCluster. Both bind to loopback only.
"""

from __future__ import annotations

import os

from distributed import LocalCluster
from distributed.deploy import Cluster

from rqml_dask.arrays import gpu_count
from rqml_dask.pipeline.config import ClusterSpec


def embedded_cluster(spec: ClusterSpec) -> Cluster:
    if gpu_count() > 0:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            pass
        else:
            return LocalCUDACluster(
                host="127.0.0.1",
                dashboard_address=spec.dashboard_address,
                threads_per_worker=spec.threads_per_worker,
            )
    return LocalCluster(
        n_workers=spec.n_workers or os.cpu_count() or 1,
        threads_per_worker=spec.threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=spec.dashboard_address,
        memory_limit=spec.memory_limit,
    )
