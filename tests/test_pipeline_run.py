"""End-to-end pipeline runs on a real multi-process LocalCluster with real Zarr on disk."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from rqml_dask import Pipeline, TaskOutcome
from rqml_dask.pipeline.pipeline import PipelineError
from rqml_dask.volumes import InputError

from conftest import TESTS, pipeline_dict, write_yaml
from timing import wait_for

pytestmark = pytest.mark.slow


def make_pipeline(tmp_path, store, **overrides) -> Pipeline:
    data = pipeline_dict(store, tmp_path / "out.zarr", **overrides)
    return Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", data))


def test_run_deconvolves_and_marks_output_complete(tmp_path, small_volume, client):
    pipeline = make_pipeline(tmp_path, small_volume)
    report = pipeline.run(client, progress=False)
    assert len(report.outcomes) == 2 * 2 * 2
    assert not report.rejected
    assert report.output_error < 0.85 * report.input_error
    group = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert group.attrs["rqml"]["status"] == "complete"
    result = group["deconvolved"][...]
    assert np.isfinite(result).all() and (result >= 0).all() and result.max() > 0
    truth = zarr.open_group(small_volume, mode="r")["truth"][...]
    assert np.sqrt(((result - truth) ** 2).sum() / (truth**2).sum()) == pytest.approx(report.output_error, rel=1e-4)


def test_a_run_again_reuses_every_result_but_one_whose_output_was_damaged(tmp_path, small_volume, client):
    pipeline = make_pipeline(tmp_path, small_volume)
    pipeline.run(client, progress=False)
    output = zarr.open_group(tmp_path / "out.zarr", mode="r+")["deconvolved"]
    before = output[...]
    damaged = pipeline.tasks()[3]
    output[damaged.region.core_slices] = output[damaged.region.core_slices] * 1.01  # an edited chunk
    report = pipeline.run(client, progress=False)
    assert {o.task_id for o in report.outcomes if not o.reused} == {damaged.task_id}
    np.testing.assert_array_equal(output[...], before)  # computed again, to the same result
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "complete"


def test_a_python_run_of_an_output_another_process_is_writing_is_refused_and_changes_nothing(tmp_path, small_volume, client):
    """From a Python session too, one live run per output: while another process holds the
    output's lock, ``Pipeline.run`` is refused naming it, and the finished output stays as
    it was; once that process is gone, the run goes on (reusing every result)."""
    import subprocess
    import sys

    from rqml_dask.run_lock import OutputBusy

    pipeline = make_pipeline(tmp_path, small_volume)
    pipeline.run(client, progress=False)
    group = zarr.open_group(tmp_path / "out.zarr", mode="r")
    before, attrs = group["deconvolved"][...], dict(group.attrs)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom rqml_dask.run_lock import writing\n"
                               f"with writing({str(tmp_path / 'out.zarr')!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusy, match=rf"being written by another rqml run \(pid {holder.pid} on "):
            pipeline.run(client, progress=False)
    finally:
        holder.kill()
        holder.wait()
    group = zarr.open_group(tmp_path / "out.zarr", mode="r")
    np.testing.assert_array_equal(group["deconvolved"][...], before)
    assert dict(group.attrs) == attrs
    report = pipeline.run(client, progress=False)  # the holder died: its lock is taken over
    assert all(o.reused for o in report.outcomes) and not (tmp_path / "out.zarr.lock").exists()


def test_submit_returns_one_future_per_task_with_its_outcome(tmp_path, small_volume, client):
    pipeline = make_pipeline(tmp_path, small_volume)
    futures = pipeline.submit(client)
    outcomes = client.gather(futures)
    assert len(futures) == len(pipeline.tasks())
    for outcome in outcomes:
        assert isinstance(outcome, TaskOutcome)
        assert outcome.iterations > 0 and outcome.model in [*pipeline.config.models.ladder, "landweber"]
        assert outcome.convergence is not None and outcome.convergence.misfit > 0
        assert outcome.output.startswith(str(tmp_path / "out.zarr")) and "deconvolved[" in outcome.output


def test_stalled_tasks_escalate_along_the_ladder_then_diversify_then_end_stalled(tmp_path, small_volume, client):
    ladder = ["richardson_lucy", "richardson_lucy_accelerated", "richardson_lucy_tv"]
    pipeline = make_pipeline(
        tmp_path,
        small_volume,
        models={"ladder": ladder},
        # a stability no model reaches, and a progress bar none keeps up with: every model stalls
        convergence={"max_iterations": 300, "check_every": 5, "stability_tol": 1e-12, "novelty_window": 10, "min_progress": 0.5},
    )
    report = pipeline.run(client, progress=False)
    assert report.escalations == 3 * len(report.outcomes)
    for outcome in report.outcomes:
        assert outcome.status == "stalled"  # a clear terminal state, not a hang
        assert [run.model for run in outcome.models] == [*ladder, "landweber"]  # the default policy's diversity
        assert outcome.reason == "stalled on every model of its ladder; policy adds landweber"
        assert all(run.stop == "stalled" and run.iterations >= 10 for run in outcome.models)
        assert outcome.iterations == sum(run.iterations for run in outcome.models)
    # `rqml status` names the model each task ran last, as its node reported (it once always named the ladder's first)
    ids = {o.task_id for o in report.outcomes}
    wait_for(lambda: {v["task_id"]: v["model"] for v in client.sync(client.scheduler.rqml_status)["tasks"].values() if v["task_id"] in ids}
             == dict.fromkeys(ids, "landweber"), what="the final models in rqml_status")


def test_stitched_tiles_equal_the_untiled_deconvolution(tmp_path, small_volume, client):
    fixed = {"max_iterations": 15, "check_every": 5, "stability_tol": 0, "consistency_tol": 0, "novelty_window": 1000,
             "accept_max_iterations": True}
    shape = zarr.open_group(small_volume, mode="r")["observed"].shape
    results = {}
    halo = [16, 14, 14]  # two PSF widths  # the untiled run mirrors its border by the same halo, as tiles at the border do
    for name, tile in (("tiled", [12, 24, 24]), ("whole", list(shape))):
        out = tmp_path / name
        out.mkdir()
        pipeline = make_pipeline(out, small_volume, models={"ladder": ["richardson_lucy"]},
                                 convergence=fixed, tiling={"tile": tile, "halo": halo})
        report = pipeline.run(client, progress=False)
        assert {o.iterations for o in report.outcomes} == {15}
        results[name] = zarr.open_group(out / "out.zarr", mode="r")["deconvolved"][...]
    tiled, whole = results["tiled"], results["whole"]
    scale = whole.max()
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-3 * scale)


@pytest.mark.parametrize("value,refusal", [
    (np.nan, r"::observed contains 1 NaN or infinite value\(s\) in \[\d+:\d+, \d+:\d+, \d+:\d+\], the first at "
             r"\(20, 40, 40\): fill or mask them"),
    (-3.0, r"::observed has 1 negative value\(s\) in \[.*\], the lowest -3 at \(20, 40, 40\): the models need "
           r"non-negative data"),
], ids=["nan", "negative"])
def test_unusable_input_values_fail_the_run_where_a_node_reads_them_and_lose_nothing(tmp_path, small_volume, client,
                                                                                     value, refusal):
    store = tmp_path / "in.zarr"
    shutil.copytree(small_volume, store)
    pipeline = make_pipeline(tmp_path, store)
    pipeline.run(client, progress=False)
    result = zarr.open_group(tmp_path / "out.zarr", mode="r")["deconvolved"][...]
    observed = zarr.open_group(store, mode="r+")["observed"]
    good = observed[20, 40, 40]
    observed[20, 40, 40] = value  # the input changes in place
    with pytest.raises(PipelineError, match=refusal):
        pipeline.run(client, progress=False)
    after = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert after.attrs["rqml"]["status"] == "incomplete"  # never complete over a task that did not pass
    np.testing.assert_array_equal(after["deconvolved"][...], result)  # nothing the earlier run stored is lost
    observed[20, 40, 40] = good
    report = pipeline.run(client, progress=False)  # fixed: every earlier result is still there, and reused
    assert all(o.reused for o in report.outcomes) and not report.rejected
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "complete"


def test_saturated_counts_are_refused_unless_accepted_and_an_all_zero_region_converges_to_zero(tmp_path, small_volume, client):
    store = tmp_path / "in.zarr"
    shutil.copytree(small_volume, store)
    group = zarr.open_group(store, mode="r+")
    counts = np.rint(group["observed"][...] * 100).astype(np.uint16)  # a camera's counts
    task = make_pipeline(tmp_path, store).tasks()[0]
    counts[tuple(slice(max(a, 0), b) for a, b in task.region.window)] = 0  # no signal in all it reads
    counts[20, 40, 40] = np.iinfo(np.uint16).max  # one clipped pixel
    group.create_array("observed", data=counts, chunks=(12, 24, 24), overwrite=True)
    with pytest.raises(PipelineError, match=r"::observed has 1 saturated value\(s\) \(= 65535, the most uint16 holds\) "
                                            r"in \[.*\], the first at \(20, 40, 40\).*set input.accept_saturated: true"):
        make_pipeline(tmp_path, store).run(client, progress=False)
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "incomplete"

    pipeline = make_pipeline(tmp_path, store, input={"store": str(store), "truth": "truth", "accept_saturated": True})
    report = pipeline.run(client, progress=False, overwrite=True)  # other tasks (they accept saturation): another configuration
    silent = next(o for o in report.outcomes if o.task_id == task.task_id)
    assert silent.state == "accepted" and silent.status == "converged", silent
    result = zarr.open_group(tmp_path / "out.zarr", mode="r")["deconvolved"]
    assert not result[task.region.core_slices].any()  # zero in, zero out
    assert np.isfinite(result[...]).all() and result[...].max() > 0


def test_psf_of_wrong_rank_is_refused(tmp_path, small_volume):
    store = tmp_path / "psf2d.zarr"
    shutil.copytree(small_volume, store)
    group = zarr.open_group(store, mode="r+")
    group.create_array("psf", data=np.ones((5, 5), np.float32) / 25, overwrite=True)
    with pytest.raises(InputError, match="psf2d.zarr::psf .* has rank 2 but the image has rank 3"):
        make_pipeline(tmp_path, store).tasks()


def test_a_model_that_raises_fails_its_tasks_the_run_says_so_and_the_nodes_go_on(tmp_path, small_volume, client):
    from rqml_dask import events

    fixed = {"max_iterations": 10, "check_every": 5, "stability_tol": 0, "consistency_tol": 0, "novelty_window": 1000,
             "accept_max_iterations": True}
    (tmp_path / "bad").mkdir()
    bad = make_pipeline(tmp_path / "bad", small_volume, models={"ladder": ["raising_model:RaisingModel"]}, convergence=fixed,
                        plugins=[str(TESTS / "raising_model.py")])
    report = bad.run(client, progress=False)
    assert len(report.rejected) == len(report.outcomes) == 8
    assert all(o.status == "failed" and o.error is None for o in report.outcomes)
    assert {o.reason for o in report.outcomes} == {
        "model raising_model:RaisingModel raised in step at iteration 2: RuntimeError: a bug in the model"}
    output = zarr.open_group(tmp_path / "bad" / "out.zarr", mode="r")
    assert output.attrs["rqml"]["status"] == "rejected" and not output["deconvolved"].nchunks_initialized
    alerts = [e for _, e in client.get_events(events.ALERTS) if e["kind"] == "task-failed"]
    assert sorted(e["task_id"] for e in alerts) == sorted(o.task_id for o in report.outcomes)
    # every node that ran the raising model still refines: its refinement thread lives on,
    # and the same nodes then refine a healthy pipeline to the end
    failed = client.run(lambda dask_worker: (dask_worker.plugins["rqml-node"].orchestrator.heartbeat()["tasks_failed"],
                                             dask_worker.plugins["rqml-node"].orchestrator._thread.is_alive()))
    assert sum(n for n, _ in failed.values()) == 8 and all(alive for _, alive in failed.values()), failed
    (tmp_path / "good").mkdir()
    good = make_pipeline(tmp_path / "good", small_volume, models={"ladder": ["richardson_lucy"]}, convergence=fixed)
    report = good.run(client, progress=False)
    assert not report.rejected and len(report.outcomes) == 8
    assert zarr.open_group(tmp_path / "good" / "out.zarr", mode="r").attrs["rqml"]["status"] == "complete"
