"""A rerun of a pipeline whose every result is recorded and still valid is answered on the
client, with no cluster started, and keeps its pyramid and pictures; anything that no
longer justifies a result sends the run to a cluster, which computes that task again."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05.image import Image

from conftest import pipeline_dict, write_yaml
from test_cli import rqml


def synth_and_config(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A 20x40x40 volume in 8 tiles, its pipeline (a pyramid of one level) and its output."""
    store, out = tmp_path / "vol.zarr", tmp_path / "out.zarr"
    assert rqml("data", "synth", str(store), "--shape", "20,40,40", "--psf-sigma", "1.5,1,1", "--seed", "3").returncode == 0
    config = pipeline_dict(store, out, tiling={"tile": [10, 20, 20]}, output={"store": str(out), "pyramid": 1})
    return store, out, write_yaml(tmp_path / "p.yaml", config)


def image(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """The result and its first pyramid level, as the output holds them."""
    group = zarr.open_group(out, mode="r")
    return group["deconvolved"][...], group["deconvolved_s1"][...]


def pictures(out: Path) -> dict[Path, int]:
    """The slices and the report beside the output, with their modification times."""
    paths = [out.with_name("out.png"), out.with_name("out.report.html")]
    return {path: path.stat().st_mtime_ns for path in paths}


def ran(config: Path) -> tuple[str, str]:
    done = rqml("run", str(config), "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, done.stderr


def test_a_rerun_whose_results_are_all_recorded_starts_no_cluster_and_keeps_its_image_and_pictures(tmp_path):
    _, out, config = synth_and_config(tmp_path)
    _, first = ran(config)
    assert re.search(r"^cluster +local at ", first, re.M), first
    result, level = image(out)
    drawn = pictures(out)

    stdout, stderr = ran(config)
    assert re.search(r"^cluster +none started: every task's result is recorded on this host and valid$", stderr, re.M), stderr
    assert "dashboard" not in stderr  # no cluster, no pages
    assert "8 reused from an earlier run" in stdout
    assert stdout.count("(as drawn before: the results are the same)") == 2, stdout
    assert pictures(out) == drawn  # not drawn again
    again, again_level = image(out)
    assert np.array_equal(again, result) and np.array_equal(again_level, level)
    group = zarr.open_group(out, mode="r")
    assert group.attrs["rqml"]["status"] == "complete" and group.attrs["rqml"]["pyramid"] == ["deconvolved", "deconvolved_s1"]
    Image.from_zarr(group)  # an OME image again: its metadata put back

    slices = next(iter(drawn))
    slices.unlink()  # a picture gone is drawn again, and only the pictures
    stdout, stderr = ran(config)
    assert "none started" in stderr and slices.is_file()
    assert "(as drawn before" not in stdout


@pytest.mark.parametrize("damage", ["input", "output"])
def test_a_rerun_where_one_result_is_no_longer_justified_computes_it_on_a_cluster(tmp_path, damage):
    """One voxel of the input changed (the recorded results of the tasks whose windows hold
    it no longer match the data), or of a result in the output (it no longer matches its
    record): the run starts a cluster, computes those tasks again and reuses the others.
    The pyramid and the pictures are made anew where the results changed, and kept where
    the same input gave the same result again."""
    store, out, config = synth_and_config(tmp_path)
    ran(config)
    result, _ = image(out)
    drawn = pictures(out)
    if damage == "input":
        observed = zarr.open_group(store, mode="r+")["observed"]
        observed[3, 5, 5] = observed[3, 5, 5] + 50
    else:
        zarr.open_group(out, mode="r+")["deconvolved"][3, 5, 5] = 1e6

    stdout, stderr = ran(config)
    assert re.search(r"^cluster +local at ", stderr, re.M), stderr
    reused = int(re.search(r"(\d+) reused from an earlier run", stdout)[1])
    assert reused == 7 if damage == "output" else 0 < reused < 8, stdout
    again, level = image(out)
    outside = np.ones(again.shape, bool)
    outside[:10, :20, :20] = False  # the core of the damaged voxel's task
    if damage == "output":
        assert np.array_equal(again[outside], result[outside])
    if damage == "output":
        assert np.array_equal(again, result)  # the same input computes the same result again
        assert pictures(out) == drawn and "(as drawn before: the results are the same)" in stdout
    else:
        assert not np.array_equal(again[~outside], result[~outside])
        assert all(mtime != drawn[path] for path, mtime in pictures(out).items())
    expected = again.reshape(20, 20, 2, 20, 2).mean(axis=(2, 4), dtype=np.float64).astype(again.dtype)
    assert np.array_equal(level, expected)  # the pyramid of the result as it is now
