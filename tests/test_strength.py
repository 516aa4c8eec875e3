"""A regularisation strength chosen per task from its held-out counts (rqml_dask/strength.py):
real synthetic data, the real models and engine, checkpoints through JSON as stored, and
pipeline files refused where the data cannot choose."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from distributed import Client

from rqml_dask.arrays import numpy_backend
from rqml_dask.node.checkpointer import Checkpointer
from rqml_dask.pipeline import Pipeline, PipelineConfigError
from rqml_dask.pipeline.config import ModelsSpec
from rqml_dask.problem import load_problem
from rqml_dask.refinement import SEARCH_BEST, SEARCH_ORIGIN, Refinement
from rqml_dask.stores.artifacts import ArtifactStore
from rqml_dask.stores.lmdb_store import LMDBStore
from rqml_dask.synthetic import SynthSpec, write_synthetic
from rqml_dask.volumes import read_core
from rqml_plugins.deconvolution.richardson_lucy import TotalVariationRichardsonLucy

from conftest import local_cluster, pipeline_dict, write_yaml
from test_stopping import quickstart_on

AUTO = {"richardson_lucy_tv": {"regularization": "auto"}}


def tasks_of(tmp_path, psf: str, photons: float, ladder: list[str], params: dict, count: int = 2):
    """The first ``count`` tasks of a small cells volume with the quickstart's settings and
    ``ladder``, each with its problem loaded."""
    store = tmp_path / f"{psf}-{photons:g}.zarr"
    if not store.exists():
        write_synthetic(store, SynthSpec(shape=(32, 64, 64), psf=psf, photons=photons, seed=5))
    pipeline = quickstart_on(store, tmp_path / "out.zarr")
    loaded = []
    for task in pipeline.tasks()[:count]:
        task = dataclasses.replace(task, model_ladder=tuple(ladder), model_params=params)
        loaded.append(load_problem(task, numpy_backend()))
    return loaded


def refined(task, problem) -> Refinement:
    """The task refined to its end and validated (its result refitted on all the counts)."""
    refinement = Refinement.start(task, problem, numpy_backend())
    refinement.run_to_end()
    assert refinement.validate() == []
    return refinement


def core_error(task, refinement: Refinement) -> float:
    truth = read_core(task.input.truth, task.region, np.float64)
    return float(np.sum((np.asarray(refinement.estimate[task.region.core_in_window], dtype=np.float64) - truth) ** 2))


def test_where_regularisation_helps_tasks_choose_a_strength_and_beat_the_unregularised_result(tmp_path):
    """Dim widefield data: TV-RL lowers the error against the truth. Each task runs every
    strength of the grid after the unregularised rung; a task that keeps one is better than
    the unregularised result against the truth, one that keeps none is that result."""
    plain = [refined(t, p) for t, p in tasks_of(tmp_path, "widefield", 30, ["richardson_lucy"], {}, count=4)]
    searched = tasks_of(tmp_path, "widefield", 30, ["richardson_lucy", "richardson_lucy_tv"], AUTO, count=4)
    chosen = []
    for (task, problem), unregularised in zip(searched, plain, strict=True):
        refinement = refined(task, problem)
        candidates = [run.strength for run in refinement.runs if run.strength is not None]
        grid = TotalVariationRichardsonLucy.strength_grid  # weakest first, to the first doing worse than the one before
        assert candidates and candidates == list(grid[:len(candidates)]), refinement.runs
        assert refinement.refitted and refinement.escalations == 1
        assert refinement.guard.object_significance is not None  # the guard judged the object too
        chosen.append(refinement.held_out_figures().strength)
        if chosen[-1]:
            assert chosen[-1] in TotalVariationRichardsonLucy.strength_grid and refinement.search.significance <= -1.0
            assert core_error(task, refinement) < core_error(task, unregularised)
        else:
            np.testing.assert_array_equal(np.asarray(refinement.estimate), np.asarray(unregularised.estimate))
    assert sum(s > 0 for s in chosen) >= 2, chosen


def test_where_no_strength_beats_the_unregularised_result_it_is_the_result_bit_for_bit(tmp_path):
    """Bright data and a strength far too strong: the search keeps strength 0, and the task's
    result is exactly the one without the search (refitted along the same path)."""
    params = {"richardson_lucy_tv": {"regularization": [0.3]}}
    ((task, problem),) = tasks_of(tmp_path, "gaussian", 1000, ["richardson_lucy", "richardson_lucy_tv"], params, count=1)
    ((plain_task, plain_problem),) = tasks_of(tmp_path, "gaussian", 1000, ["richardson_lucy"], {}, count=1)
    searched, plain = refined(task, problem), refined(plain_task, plain_problem)
    assert searched.search.chosen == 0.0 and searched.held_out_figures().strength == 0.0
    assert [run.strength for run in searched.runs] == [None, 0.3]
    assert searched.best_iteration == plain.best_iteration
    np.testing.assert_array_equal(np.asarray(searched.estimate), np.asarray(plain.estimate))
    assert [e["kind"] for e in searched.events].count("strength_chosen") == 1


def test_a_search_resumed_from_a_checkpoint_mid_candidate_ends_as_an_uninterrupted_one(tmp_path):
    """A checkpoint (real LMDB and Zarr) taken inside the second candidate, between two
    checks, holds the search: the resumed task runs the same candidates and ends bit for bit
    where an uninterrupted one does."""
    ((task, problem),) = tasks_of(tmp_path, "widefield", 30, ["richardson_lucy", "richardson_lucy_tv"], AUTO, count=1)
    uninterrupted = Refinement.start(task, problem, numpy_backend())
    uninterrupted.run_to_end()
    refinement = Refinement.start(task, problem, numpy_backend())
    while not (refinement.search is not None and refinement.search.index == 1 and refinement.runs[-1].iterations >= 7):
        refinement.step()  # inside the second candidate (the search may stop after it), between two checks
    checkpointer = Checkpointer(LMDBStore(tmp_path / "node.lmdb"), None, ArtifactStore(tmp_path / "artifacts"), "node-a",
                                on_alert=lambda kind, payload: None)
    try:
        checkpointer.submit(refinement.snapshot("interval"))
        assert checkpointer.flush()
        resume = checkpointer.latest(task)
    finally:
        checkpointer.stop()
    assert resume.checkpoint.model_config.params["regularization"] == TotalVariationRichardsonLucy.strength_grid[1]
    assert SEARCH_ORIGIN in resume.arrays and (SEARCH_BEST in resume.arrays) == (refinement.search.best_estimate is not None)
    resumed = Refinement.resume(task, problem, numpy_backend(), resume.checkpoint, resume.arrays)
    resumed.run_to_end()
    assert [dataclasses.astuple(r) for r in resumed.runs] == [dataclasses.astuple(r) for r in uninterrupted.runs]
    assert resumed.search.state() == uninterrupted.search.state()
    np.testing.assert_array_equal(np.asarray(resumed.estimate), np.asarray(uninterrupted.estimate))


@pytest.mark.parametrize("models,convergence,expected", [
    ({"ladder": ["richardson_lucy_tv"], "params": AUTO}, {}, "needs a rung before it on the ladder"),
    ({"ladder": ["richardson_lucy", "richardson_lucy_tv"], "params": AUTO}, {"held_out_fraction": 0},
     "needs held-out counts"),
    ({"ladder": ["richardson_lucy", "richardson_lucy_tv"], "params": {"richardson_lucy_tv": {"regularization": []}}}, {},
     "regularization must be a number, 'auto', or a non-empty list of finite numbers >= 0, not []"),
    ({"ladder": ["richardson_lucy", "richardson_lucy_tv"], "params": {"richardson_lucy_tv": {"regularization": [0.01, -1]}}},
     {}, "not [0.01, -1]"),
])
def test_a_strength_the_data_cannot_choose_is_refused_before_anything_runs(tmp_path, models, convergence, expected):
    data = pipeline_dict(tmp_path / "in.zarr", tmp_path / "out.zarr", models=models)
    data["convergence"] = {**data["convergence"], "held_out_fraction": 0.2, **convergence}
    path = write_yaml(tmp_path / "p.yaml", data)
    with pytest.raises(PipelineConfigError) as info:
        Pipeline.from_yaml(path)
    assert str(path) in str(info.value) and "richardson_lucy_tv" in str(info.value)
    assert expected in str(info.value)


@pytest.mark.slow
def test_a_run_that_chooses_strengths_says_which_and_beats_the_unregularised_run(tmp_path):
    store = write_synthetic(tmp_path / "in.zarr", SynthSpec(shape=(32, 64, 64), psf="widefield", photons=30, seed=5))
    with local_cluster() as cluster, Client(cluster) as client:
        reports = {}
        for name, models in (("plain", ModelsSpec(ladder=["richardson_lucy"])),
                             ("auto", ModelsSpec(ladder=["richardson_lucy", "richardson_lucy_tv"], params=AUTO))):
            pipeline = quickstart_on(store, tmp_path / f"{name}.zarr")
            pipeline = Pipeline(pipeline.config.model_copy(update={"models": models}))
            reports[name] = pipeline.run(client, progress=False)
    auto = reports["auto"]
    assert all(o.accepted for o in auto.outcomes), auto.summary()
    assert all(o.held_out.strength is not None for o in auto.outcomes)
    assert "strength     chosen by the held-out counts: " in auto.summary()
    assert auto.output_error < reports["plain"].output_error, (auto.summary(), reports["plain"].summary())


def test_the_strengths_a_task_chooses_among_run_weakest_first_without_repeats():
    from rqml_dask.strength import strength_grid

    tv = TotalVariationRichardsonLucy
    assert strength_grid(tv, {"regularization": [0.02, 0.005, 0.02]}) == (0.005, 0.02)
    assert strength_grid(tv, {"regularization": "auto"}) == tuple(sorted(tv.strength_grid))
    assert strength_grid(tv, {"regularization": 0.01}) is None and strength_grid(tv, {}) is None
    with pytest.raises(ValueError, match="regularization must be"):
        strength_grid(tv, {"regularization": [0.01, True]})


def test_the_guard_passes_a_searched_result_whose_object_error_is_lower_by_two_standard_errors():
    from rqml_dask.held_out import HeldOutFigures

    unconvincing = HeldOutFigures(input=0.326, result=0.325, iteration=115, fraction=0.2, significance=-1.6, departure=0.63)
    assert not unconvincing.better_than_input()
    assert dataclasses.replace(unconvincing, strength=0.02, object_significance=-5.2).better_than_input()
    assert not dataclasses.replace(unconvincing, strength=0.02, object_significance=-1.9).better_than_input()
