"""Tiling plans and the convergence monitor's verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from rqml_dask.convergence import ConvergenceMonitor
from rqml_dask.task import ConvergenceSettings
from rqml_dask.tiling import plan_regions


@pytest.mark.parametrize("shape,tile,halo", [((10, 13), (4, 5), (2, 3)), ((7, 8, 9), (7, 3, 4), (0, 1, 5))])
def test_cores_cover_the_volume_exactly_once_and_windows_hold_the_halo(shape, tile, halo):
    cover = np.zeros(shape, int)
    for region in plan_regions(shape, tile, halo):
        cover[region.core_slices] += 1
        for (c0, c1), (w0, w1), h, n in zip(region.core, region.window, halo, shape):
            assert (w0, w1) == (max(c0 - h, 0), min(c1 + h, n))
        window = np.zeros([b - a for a, b in region.window], bool)
        assert window[region.core_in_window].shape == tuple(b - a for a, b in region.core)
    assert (cover == 1).all()


def test_plan_refuses_mismatched_rank():
    with pytest.raises(ValueError, match="differ in rank"):
        plan_regions((10, 10), (5,), (1, 1))


def run_monitor(settings, misfits, change=0.0, escalates=True):
    monitor = ConvergenceMonitor(settings, escalates=escalates)
    verdicts = [monitor.observe(5 * (i + 1), change, m) for i, m in enumerate(misfits)]
    return verdicts, monitor.latest


def test_converges_when_estimate_and_misfit_both_settle():
    settings = ConvergenceSettings(check_every=5, stability_tol=1e-3, consistency_tol=1e-3, novelty_window=20)
    verdicts, figures = run_monitor(settings, [1.0, 0.9999], change=1e-4)
    assert verdicts == ["continue", "converged"]
    assert figures.consistency == pytest.approx(0.0001 / 5)


def test_unsettled_estimate_with_no_progress_is_a_stall():
    settings = ConvergenceSettings(check_every=5, stability_tol=1e-6, novelty_window=10, min_progress=1e-2)
    verdicts, figures = run_monitor(settings, [1.0, 0.999, 0.998, 0.997], change=1e-2)
    assert verdicts == ["continue", "continue", "stalled", "stalled"]
    assert figures.novelty == pytest.approx((0.999 - 0.997) / 0.999)  # over iterations 10..20


def test_progressing_refinement_continues_and_divergence_stalls():
    settings = ConvergenceSettings(check_every=5, stability_tol=1e-6, novelty_window=10, min_progress=1e-2)
    verdicts, _ = run_monitor(settings, [1.0, 0.8, 0.6, 0.4], change=0.1)
    assert verdicts == ["continue"] * 4
    verdicts, _ = run_monitor(settings, [1.0, 1.1, float("nan")], change=0.1)
    assert verdicts[-1] == "stalled"


def test_window_stops_at_the_border_and_a_foreign_region_is_refused(tmp_path):
    import zarr

    from rqml_dask.task import ArrayRef, Region
    from rqml_dask.volumes import InputError, read_window

    volume = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    zarr.open_group(tmp_path / "v.zarr", mode="w").create_array("a", data=volume)
    ref = ArrayRef(str(tmp_path / "v.zarr"), "a")
    (region,) = [r for r in plan_regions(volume.shape, (5, 3), (2, 1)) if r.core[1] == (0, 3)]
    np.testing.assert_array_equal(read_window(ref, region), volume[:, :4])  # nothing invented past the border
    with pytest.raises(InputError, match=r"does not hold the window \[-1:6, 0:4\]"):
        read_window(ref, Region(core=((0, 5), (0, 3)), window=((-1, 6), (0, 4))))


def test_a_solver_whose_rate_cannot_reach_its_target_within_the_models_budget_stalls_at_the_first_window():
    """With a target and a per-model budget, a misfit falling 30 % per check of 5 iterations
    (well above ``min_progress``) would need about 280 more iterations from 0.05 at
    iteration 15 to 1e-10: past a budget of 200 it is a stall at the first full window (the
    ladder moves on now, not after the budget is spent); within a budget of 1,000 it goes
    on, and so does one falling 10x per check under the budget of 200. Without a budget, or
    on the ladder's last model, novelty alone decides."""
    slow = [1e-1 * 0.7**i for i in range(4)]
    fast = [1e-1 * 0.1**i for i in range(4)]
    within = dict(check_every=5, stability_tol=1.0, novelty_window=10, min_progress=1e-2, target_misfit=1e-10)
    assert run_monitor(ConvergenceSettings(max_iterations_per_model=200, **within), slow)[0][:3] == ["continue", "continue", "stalled"]
    assert run_monitor(ConvergenceSettings(max_iterations_per_model=1000, **within), slow)[0] == ["continue"] * 4
    assert run_monitor(ConvergenceSettings(max_iterations_per_model=200, **within), fast)[0] == ["continue"] * 4
    assert run_monitor(ConvergenceSettings(**within), slow)[0] == ["continue"] * 4
    # on the ladder's last model a stall would end the task: the projection does not apply
    assert run_monitor(ConvergenceSettings(max_iterations_per_model=200, **within), slow, escalates=False)[0] == ["continue"] * 4
