"""Where a pipeline runs: the clusters ``rqml run`` starts (``cluster.kind`` of the pipeline
file, or ``rqml run --cluster KIND``).

- :mod:`~rqml_dask.deploy.local`: the embedded ``LocalCluster`` / ``LocalCUDACluster``
  (``kind: local``), and the same over ``pqtls://`` (``rqml run --secure``);
- :mod:`~rqml_dask.deploy.jobqueue`: nodes as Slurm or PBS jobs through dask-jobqueue
  (``kind: slurm | pbs``);
- :mod:`~rqml_dask.deploy.kubernetes`: nodes as pods of a Dask operator ``DaskCluster``
  (``kind: kubernetes``).
"""
