"""The held-out stopping rule: thinning, its figures, and results better than the input
against plain Richardson-Lucy's best iteration (the oracle, computed here from the truth)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import zarr
from distributed import Client

from rqml_dask import Pipeline
from rqml_dask.arrays import numpy_backend
from rqml_dask.held_out import HeldOutScore, estimate_counts_per_unit, thin
from rqml_dask.pipeline import load_pipeline_config
from rqml_dask.report import FinishedRun
from rqml_dask.synthetic import SynthSpec, write_synthetic
from rqml_dask.volumes import open_array, read_core, read_window
from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy

from conftest import local_cluster


def test_thinning_splits_counts_into_independent_poisson_halves():
    rng = np.random.default_rng(0)
    mean = np.full(200_000, 40.0)
    image = rng.poisson(mean) / 10.0  # 10 counts per unit
    train, held = thin(image, 10.0, 0.2, seed=1)
    kept = train * 10.0 * 0.8
    np.testing.assert_allclose(kept + held, image * 10.0, atol=1e-3)  # nothing lost
    assert held.mean() == pytest.approx(0.2 * 40, rel=0.01) and held.var() == pytest.approx(0.2 * 40, rel=0.03)
    assert abs(np.corrcoef(kept, held)[0, 1]) < 0.01  # independent: a model fitting one cannot fit the other's noise
    again = thin(image, 10.0, 0.2, seed=1)
    assert (again[1] == held).all()  # the same split on every node and every run


def test_held_out_deviance_is_lowest_for_the_true_mean():
    rng = np.random.default_rng(2)
    mean = rng.uniform(1, 5, 100_000)
    held = rng.poisson(mean * 0.2).astype(np.float32)
    score = HeldOutScore(held, 1.0, 0.2, numpy_backend())
    assert score.deviance(mean) < score.deviance(mean * 1.2) and score.deviance(mean) < score.deviance(mean + rng.normal(0, 0.5, mean.size))


@pytest.mark.parametrize("photons", [20, 100, 300])
def test_the_photon_count_is_estimated_from_the_noise_on_the_safe_side(tmp_path, photons):
    store = write_synthetic(tmp_path / "s.zarr", SynthSpec(shape=(32, 64, 64), photons=photons))
    estimate = estimate_counts_per_unit(zarr.open_group(store, mode="r")["observed"][...])
    assert 0.75 * photons < estimate < 1.05 * photons


def oracle(pipeline: Pipeline, iterations: int = 120) -> tuple[float, int]:
    """Plain RL's best volume-wide relative error at any iteration, and that iteration."""
    tasks = pipeline.tasks()
    psf = np.asarray(open_array(tasks[0].input.operator)[...], dtype=np.float32)
    sse, truth_ss = np.zeros(iterations), 0.0
    for task in tasks:
        truth = read_core(task.input.truth, task.region, np.float64)
        truth_ss += float(np.sum(truth**2))
        model = RichardsonLucy({"image": read_window(task.input.image, task.region), "psf": psf}, numpy_backend())
        for k in range(iterations):
            model.step()
            sse[k] += float(np.sum((model.estimate[task.region.core_in_window] - truth) ** 2))
    errors = np.sqrt(sse / truth_ss)
    return float(errors.min()), int(errors.argmin()) + 1


def quickstart_on(store, out, tile=(16, 32, 32), camera=None) -> Pipeline:
    """The quickstart's models and convergence settings (the defaults users start from)."""
    config = load_pipeline_config("pipelines/quickstart.yaml")
    return Pipeline(config.model_copy(update={
        "input": config.input.model_copy(update={"store": store, "synthesize": None, "camera": camera}),
        "output": config.output.model_copy(update={"store": out}),
        "tiling": config.tiling.model_copy(update={"tile": tile}),
        "checkpoint": config.checkpoint.model_copy(update={"artifacts": out.with_name(out.name + ".checkpoints")}),
    }))


@pytest.fixture(scope="module")
def cluster_client():
    with local_cluster() as cluster, Client(cluster) as client:
        yield client


@pytest.mark.slow
@pytest.mark.parametrize("psf,photons", [("gaussian", 1000), ("gaussian", 30), ("widefield", 100), ("widefield", 30)])
def test_results_are_better_than_the_input_and_near_the_best_iteration(tmp_path, cluster_client, psf, photons):
    store = write_synthetic(tmp_path / "in.zarr", SynthSpec(shape=(32, 64, 64), psf=psf, photons=photons, seed=5))
    pipeline = quickstart_on(store, tmp_path / "out.zarr")
    report = pipeline.run(cluster_client, progress=False)
    best, at = oracle(pipeline)
    assert all(o.accepted for o in report.outcomes), report.summary()
    assert report.output_error < report.input_error, report.summary()
    assert report.output_error <= 1.15 * best, (report.summary(), best, at)
    assert report.iterations <= 1.5 * at * len(report.outcomes) + 10 * len(report.outcomes), (report.iterations, at)
    for outcome in report.outcomes:  # figures a user without a ground truth can read
        held = outcome.held_out
        assert held is not None and held.result < held.input and 0 < held.iteration <= outcome.iterations
    assert "held-out fit " in report.summary()
    record = FinishedRun.open(tmp_path / "out.zarr").outcomes[0]
    assert record["held_out"]["result"] < record["held_out"]["input"]


@pytest.mark.slow
def test_where_every_model_fits_the_noise_the_task_is_not_accepted_and_the_run_says_so(tmp_path, cluster_client):
    # a third of a photon per unit of intensity through a widefield PSF: next to no signal
    store = write_synthetic(tmp_path / "in.zarr", SynthSpec(shape=(32, 64, 64), psf="widefield", photons=0.3, seed=5))
    pipeline = quickstart_on(store, tmp_path / "out.zarr")
    report = pipeline.run(cluster_client, progress=False)
    noise = [o for o in report.outcomes if not o.accepted]
    assert noise and all(o.state == "rejected" and "every model fitted the noise" in o.validation_failures[0] for o in noise)
    for outcome in noise:  # it climbed toward regularisation, not toward faster noise-fitting
        models = [run.model for run in outcome.models]
        # a stall may have escalated to the accelerated model first; the rejection went straight to TV-RL
        assert models in (["richardson_lucy", "richardson_lucy_tv"],
                          ["richardson_lucy", "richardson_lucy_accelerated", "richardson_lucy_tv"]), models
        assert "every model fitted the noise" in outcome.validation_failures[0]
    assert "every model fitted the noise" in report.summary()
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "rejected"
    for outcome in report.outcomes:
        if outcome.accepted:  # what is accepted is better than its input: by the held-out counts, and by the truth
            assert outcome.held_out.better_than_input()
            assert outcome.error.output_sse < outcome.error.input_sse


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cells", "beads"])
def test_a_task_is_accepted_iff_it_beats_its_input_on_dim_camera_data(tmp_path, cluster_client, kind):
    """Camera data at 20 photons through a widefield PSF, with read noise of 1 photon: where
    read noise was taken for photons, the held-out rule fitted it and tasks worse than their
    input were accepted (and good bead tasks rejected)."""
    from rqml_dask.pipeline.config import CameraSpec

    store = write_synthetic(tmp_path / "in.zarr", SynthSpec(kind=kind, shape=(32, 64, 64), psf="widefield", photons=20,
                                                            seed=5, camera_offset=100, camera_gain=2, read_noise=2))
    pipeline = quickstart_on(store, tmp_path / "out.zarr", camera=CameraSpec(offset=100, gain=2, read_noise=2))
    report = pipeline.run(cluster_client, progress=False)
    verdicts = [(o.task_id, o.accepted, o.error.output_sse < o.error.input_sse) for o in report.outcomes]
    assert all(accepted == better for _, accepted, better in verdicts), verdicts
    assert report.output_error < report.input_error, report.summary()


def one_task(tmp_path, ladder, photons=30.0, **convergence):
    """The first task of a small widefield volume with the quickstart's settings, its
    problem loaded, and a refinement of it started."""
    from rqml_dask.arrays import numpy_backend
    from rqml_dask.problem import load_problem
    from rqml_dask.refinement import Refinement

    store = write_synthetic(tmp_path / "in.zarr", SynthSpec(shape=(32, 64, 64), psf="widefield", photons=photons, seed=5))
    pipeline = quickstart_on(store, tmp_path / "out.zarr")
    task = pipeline.tasks()[0]
    task = dataclasses.replace(task, model_ladder=tuple(ladder), convergence=dataclasses.replace(task.convergence, **convergence))
    task, problem = load_problem(task, numpy_backend())
    return task, problem, Refinement.start(task, problem, numpy_backend())


def test_a_model_that_raises_in_its_prediction_after_checks_gives_a_failed_outcome_not_an_error(tmp_path):
    """A model that raises in ``prediction()`` once the held-out rule has scored some of its
    iterates: the task fails, and its outcome says so. Building the outcome asked the model
    for the held-out figures again, raised again, and the node's delivery failed: the run
    ended with an error instead of reporting one failed task."""
    import time

    from rqml_dask.node.results import outcome_of

    task, problem, refinement = one_task(tmp_path, ["richardson_lucy"])
    model, calls = refinement.model, []

    def prediction():
        calls.append(None)
        if len(calls) > 6:
            raise RuntimeError("a bug in prediction")
        return type(model).prediction(model)

    model.prediction = prediction
    with pytest.raises(RuntimeError, match="a bug in prediction"):
        while not refinement.done:
            refinement.step()
    refinement.fail("model richardson_lucy raised in a check: RuntimeError: a bug in prediction")  # as the node does
    assert refinement.best_estimate is not None  # iterates were scored before it raised
    outcome = outcome_of(refinement, "node-0", None, time.time(), [])
    assert outcome.state == "failed" and outcome.held_out is None and outcome.written_to is None
    assert outcome.reason.endswith("a bug in prediction")


@pytest.mark.parametrize("ladder,per_model", [(["richardson_lucy"], None),
                                               (["richardson_lucy", "richardson_lucy_accelerated"], 10)])
def test_the_chosen_iterate_is_recomputed_on_all_the_counts_along_the_same_path(tmp_path, ladder, per_model):
    from rqml_dask.arrays import numpy_backend
    from rqml_dask.models import load_model

    task, problem, refinement = one_task(tmp_path, ladder, max_iterations_per_model=per_model)
    refinement.run_to_end()
    chosen = np.array(refinement.best_estimate)
    # the path is replayable: on the data the run refined, it gives the chosen iterate bit for bit
    replayed = refinement._replay(refinement.best_iteration, refinement.problem)
    np.testing.assert_array_equal(np.array(replayed.state()["estimate"]), chosen)

    assert not refinement.validate() and refinement.refitted
    # ... and on all the counts: the first model for min(best, per_model) iterations, then the next from there
    everything = {**{k: v for k, v in problem.items() if k != "held_out"}, "image": problem["observed"]}
    steps, estimate = refinement.best_iteration, None
    for name in ladder:
        model = load_model(name)(everything, numpy_backend())
        model.start(estimate)
        for _ in range(min(steps, per_model or steps)):
            model.step()
        steps -= min(steps, per_model or steps)
        estimate = np.array(model.estimate)  # the window, as an escalation hands it on
        if not steps:
            break
    np.testing.assert_array_equal(np.array(refinement.estimate), np.array(model.estimate))
    assert [e["kind"] for e in refinement.events].count("refitted") == 1
    # the guard judged the iterate chosen on the split data, and its figures stay those
    assert refinement.held_out_figures() is refinement.guard and refinement.guard.better_than_input()


def test_a_result_refitted_and_checkpointed_resumes_without_refitting_again(tmp_path):
    from rqml_dask.arrays import numpy_backend
    from rqml_dask.checkpoint import TaskCheckpoint
    from rqml_dask.refinement import Refinement

    task, problem, refinement = one_task(tmp_path, ["richardson_lucy"])
    refinement.run_to_end()
    assert not refinement.validate() and refinement.refitted
    snapshot = refinement.snapshot("finished")
    checkpoint = TaskCheckpoint.create(task.task_id, snapshot.iteration, snapshot.model_config, (),
                                       json.loads(json.dumps(snapshot.supervision_state)))  # as stored
    resumed = Refinement.resume(task, problem, numpy_backend(), checkpoint,
                                {k: np.array(v) for k, v in snapshot.arrays.items()})
    assert resumed.done and resumed.refitted and resumed.guard == refinement.guard
    assert not resumed.validate()
    np.testing.assert_array_equal(np.array(resumed.estimate), np.array(refinement.estimate))


FAST = ("richardson_lucy_accelerated", "richardson_lucy_tv")
"""The ladder the object error lets go first (BENCHMARKS: "Choosing the iterate by its object error")."""


def refined_by(task, score: str):
    """``task`` refined along :data:`FAST` to its end and validated with ``held_out_score:
    score`` and patience 5: the refinement, its validation failures and its core's squared
    error against the truth."""
    from rqml_dask.problem import load_problem
    from rqml_dask.refinement import Refinement

    task = dataclasses.replace(task, model_ladder=FAST, convergence=dataclasses.replace(
        task.convergence, held_out_score=score, held_out_patience=5))
    task, problem = load_problem(task, numpy_backend())
    refinement = Refinement.start(task, problem, numpy_backend())
    refinement.run_to_end()
    failures = refinement.validate()
    truth = read_core(task.input.truth, task.region, np.float64)
    error = float(np.sum((np.asarray(refinement.estimate[task.region.core_in_window], np.float64) - truth) ** 2))
    return refinement, failures, error


def test_the_object_error_chooses_a_later_iterate_than_the_deviance_and_it_is_closer_to_the_truth(tmp_path):
    """Bright data: the best prediction of the counts comes before the sharpest object the
    counts allow; the held-out object error (the default score) waits for the latter."""
    store = write_synthetic(tmp_path / "in.zarr", SynthSpec(shape=(32, 64, 64), psf="gaussian", photons=1000, seed=5))
    tasks = quickstart_on(store, tmp_path / "out.zarr").tasks()
    assert tasks[0].convergence.held_out_score == "deviance"  # the default
    for task in (tasks[0], tasks[3], tasks[7]):
        by_deviance, failures, deviance_error = refined_by(task, "deviance")
        assert failures == [] and not by_deviance.by_object_error
        by_object, failures, object_error = refined_by(task, "object")
        assert failures == [] and by_object.by_object_error and by_object.refitted
        assert by_object.best_iteration > by_deviance.best_iteration
        assert object_error < 0.97 * deviance_error, (object_error, deviance_error)
        figures = by_object.guard  # reported as the deviance, whatever chose the iterate
        assert figures.result < figures.input and figures.object_significance <= -2.0


def test_where_the_object_errors_choice_is_not_shown_better_the_best_prediction_is_judged_instead(tmp_path):
    """Dim data: in this tile the object error's iterate is not two standard errors better
    than the input by any of the guard's tests; the iterate with the lowest held-out deviance
    is computed again and judged, passes, and is the result the deviance alone would give,
    bit for bit (refitted on all the counts the same way)."""
    store = write_synthetic(tmp_path / "in.zarr", SynthSpec(shape=(32, 64, 64), psf="gaussian", photons=30, seed=5))
    task = quickstart_on(store, tmp_path / "out.zarr").tasks()[1]
    by_deviance, failures, _ = refined_by(task, "deviance")
    assert failures == []
    by_object, failures, _ = refined_by(task, "object")
    assert failures == [] and by_object.refitted
    fell_back = [e for e in by_object.events if e["kind"] == "rolled_back" and "because" in e]
    assert len(fell_back) == 1 and fell_back[0]["to_iteration"] == by_deviance.best_iteration
    assert by_object.best_iteration == by_deviance.best_iteration
    np.testing.assert_array_equal(np.asarray(by_object.estimate), np.asarray(by_deviance.estimate))
