"""The CuPy path. Runs only where CuPy sees a CUDA GPU (``scripts/test -m gpu`` on a GPU host
set up with the ``gpu`` extra); skipped everywhere else, CI included."""

from __future__ import annotations

import numpy as np
import pytest

from rqml_dask.arrays import gpu_count, numpy_backend
from rqml_dask.models import load_model
from rqml_dask.synthetic import gaussian_psf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(gpu_count() == 0, reason="no CUDA GPU visible to CuPy"),
]

MODELS = ["richardson_lucy", "richardson_lucy_accelerated", "richardson_lucy_tv", "landweber"]


def problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.poisson(rng.random((32, 48, 48)) * 100).astype(np.float32) / 100
    return image, gaussian_psf((2.0, 1.2, 1.2))


@pytest.mark.parametrize("name", MODELS)
def test_models_on_cupy_agree_with_numpy(name):
    from rqml_dask.arrays import cupy_backend

    image, psf = problem()
    results = []
    for backend in (numpy_backend(), cupy_backend()):
        model = load_model(name)({"image": backend.asarray(image), "psf": backend.asarray(psf)}, backend)
        for _ in range(20):
            model.step()
        results.append((backend.to_numpy(model.estimate), model.misfit()))
    (cpu, cpu_misfit), (gpu, gpu_misfit) = results
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-4 * float(cpu.max()))
    assert gpu_misfit == pytest.approx(cpu_misfit, rel=1e-4)


def test_batched_stepping_on_cupy_equals_one_at_a_time():
    from rqml_dask.arrays import cupy_backend

    backend = cupy_backend()
    model = load_model("richardson_lucy")
    psf = backend.asarray(gaussian_psf((2.0, 1.2, 1.2)))
    images = [backend.asarray(problem(seed)[0]) for seed in range(4)]
    batched = [model({"image": im, "psf": psf}, backend) for im in images]
    alone = [model({"image": im, "psf": psf}, backend) for im in images]
    for _ in range(5):
        model.step_batch(batched)
        for m in alone:
            m.step()
    for b, a in zip(batched, alone):
        np.testing.assert_allclose(backend.to_numpy(b.estimate), backend.to_numpy(a.estimate), rtol=1e-6, atol=1e-7)


def test_the_embedded_cluster_is_dask_cuda_and_nodes_advertise_their_gpu(tmp_path, small_volume):
    from distributed import Client

    from rqml_dask import Pipeline
    from rqml_dask.deploy.local import embedded_cluster
    from rqml_dask.pipeline.config import ClusterSpec

    from conftest import pipeline_dict, write_yaml

    pipeline = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", pipeline_dict(small_volume, tmp_path / "out.zarr")))
    with embedded_cluster(ClusterSpec(dashboard_address="127.0.0.1:0")) as cluster, Client(cluster) as client:
        assert type(cluster).__name__ == "LocalCUDACluster"
        report = pipeline.run(client, progress=False)
        figures = client.run_on_scheduler(lambda dask_scheduler: [ws.metrics.get("rqml") for ws in dask_scheduler.workers.values()])
    assert all(o.backend == "cupy" for o in report.outcomes)
    assert report.output_error < report.input_error
    assert all(f["gpu_count"] == 1 and f["gpus"][0]["name"] and f["gpus"][0]["free_bytes"] > 0 for f in figures)
