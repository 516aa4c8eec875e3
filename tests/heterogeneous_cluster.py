"""Clusters of worker processes of known, different speeds (see :mod:`sleepy_model`)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr
from distributed import Client, Nanny, Scheduler, SpecCluster

from rqml_dask import Pipeline, RunReport
from rqml_dask.arrays import numpy_backend
from rqml_dask.pipeline import load_pipeline_config
from rqml_dask.problem import load_problem
from rqml_dask.refinement import Refinement
from rqml_dask.volumes import open_array


def heterogeneous_cluster(slowdowns: list[float], rqml_scheduler: bool = True, faulty: frozenset[int] = frozenset()) -> SpecCluster:
    """One single-threaded worker (with its Nanny and the node plugin) per slowdown factor,
    those whose index is in ``faulty`` producing invalid results; the scheduler runs the RQML
    scheduler plugin unless ``rqml_scheduler`` is false."""
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
            "preload": ["rqml_dask.scheduler"] if rqml_scheduler else [],
        },
    }
    workers = {
        f"worker-{i}-x{factor:g}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "host": "127.0.0.1",
                "dashboard_address": "127.0.0.1:0",
                "env": {"RQML_TEST_SLOWDOWN": str(factor), **({"RQML_TEST_FAULTY": "1"} if i in faulty else {})},
                "preload": ["rqml_dask.node"],
            },
        }
        for i, factor in enumerate(slowdowns)
    }
    return SpecCluster(workers=workers, scheduler=scheduler)


def sleepy_pipeline(store: Path, out: Path, tile: list[int], iterations: int, delay: float, name: str) -> Pipeline:
    from rqml_dask.pipeline.plugins import import_plugins

    import_plugins([Path(__file__).with_name("sleepy_model.py")])  # as loading a pipeline file that lists it does
    config = load_pipeline_config("pipelines/quickstart.yaml")
    return Pipeline(
        config.model_copy(
            update={
                "name": name,
                "input": config.input.model_copy(update={"store": store, "synthesize": None}),
                "output": config.output.model_copy(update={"store": out}),
                "tiling": config.tiling.model_copy(update={"tile": tuple(tile)}),
                "models": config.models.model_copy(update={"ladder": ["sleepy_model:SleepyModel"], "params": {"sleepy_model:SleepyModel": {"delay": delay}}}),
                "plugins": [Path(__file__).with_name("sleepy_model.py")],
                "convergence": config.convergence.__class__(max_iterations=iterations, stability_tol=0, consistency_tol=0, novelty_window=10**6, held_out_fraction=0,
                                                            accept_max_iterations=True),
                "checkpoint": config.checkpoint.model_copy(update={"every_iterations": 10, "artifacts": Path(f"{out}.checkpoints")}),
            }
        )
    )


def sleepy_result(store: Path, iterations_: int) -> np.ndarray:
    """What the sleepy model computes from the observed volume in ``iterations_`` steps."""
    x = zarr.open_group(store, mode="r")["observed"][...].astype(np.float32)
    for _ in range(iterations_):
        x = x * 0.999
    return x


def uninterrupted_result(pipeline: Pipeline) -> np.ndarray:
    """What ``pipeline`` computes, every task run here from start to end without a pause
    (its paced model at no delay): what any run, however interrupted, must write."""
    backend = numpy_backend()
    output = None
    for task in pipeline.tasks():
        task = replace(task, model_params={m: {**p, "delay": 0.0} for m, p in task.model_params.items()})
        task, problem = load_problem(task, backend)
        refinement = Refinement.start(task, problem, backend)
        refinement.run_to_end()
        core = refinement.estimate[task.region.core_in_window]
        if output is None:
            output = np.zeros(open_array(task.input.image).shape, core.dtype)
        output[task.region.core_slices] = core
    return output


def placement(client: Client, report) -> dict[str, int]:
    """RQML tasks of ``report`` refined per worker name."""
    names = {address: info["name"] for address, info in client.scheduler_info()["workers"].items()}
    counts = dict.fromkeys(names.values(), 0)
    for outcome in report.outcomes:
        counts[names[outcome.node]] += 1
    return counts


def timed_run(client: Client, pipeline: Pipeline) -> tuple[float, RunReport]:
    """The run's report and makespan: from submitting every task to the last one finishing."""
    start = time.perf_counter()
    report = pipeline.run(client, progress=False)
    return time.perf_counter() - start, report
