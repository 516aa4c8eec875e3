"""Results as OME-Zarr images and OME-Zarr inputs, read back with ome-zarr, ome-zarr-models and napari's reader."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr.writer import write_image
from ome_zarr_models.v05.image import Image

from rqml_dask import Pipeline
from rqml_dask.volumes import InputError

from conftest import pipeline_dict, write_yaml

VOXEL = [0.3, 0.1, 0.1]


def run(tmp_path, client, small_volume, name="ome", **overrides):
    out = tmp_path / f"{name}.zarr"
    config = pipeline_dict(small_volume, out, **overrides)
    config["name"] = name
    pipeline = Pipeline.from_yaml(write_yaml(tmp_path / f"{name}.yaml", config))
    return pipeline.run(client, progress=False), out


def test_an_accepted_result_opens_in_ome_zarr_and_napari_with_its_axes_scale_and_pyramid(tmp_path, client, small_volume):
    input_spec = {"store": str(small_volume), "truth": "truth", "voxel_size": VOXEL, "unit": "micrometer"}
    report, out = run(tmp_path, client, small_volume, input=input_spec,
                      output={"store": str(tmp_path / "ome.zarr"), "pyramid": 2})
    assert all(o.accepted for o in report.outcomes)

    Image.from_zarr(zarr.open_group(out, mode="r"))  # ome-zarr-models: a valid OME-NGFF 0.5 image

    (node,) = [n for n in Reader(parse_url(str(out)))() if n.metadata.get("axes")]
    assert [(a["name"], a["type"], a["unit"]) for a in node.metadata["axes"]] == [("z", "space", "micrometer"), ("y", "space", "micrometer"), ("x", "space", "micrometer")]
    scales = [next(t["scale"] for t in level if t["type"] == "scale") for level in node.metadata["coordinateTransformations"]]
    assert scales == [VOXEL, [0.3, 0.2, 0.2], [0.3, 0.4, 0.4]]
    level0, level1, level2 = (np.asarray(level) for level in node.data)
    assert level0.shape == (24, 48, 48) and level1.shape == (24, 24, 24) and level2.shape == (24, 12, 12)
    np.testing.assert_array_equal(level0, zarr.open_group(out, mode="r")["deconvolved"][...])
    np.testing.assert_allclose(level1, level0.reshape(24, 24, 2, 24, 2).mean(axis=(2, 4)), rtol=1e-6)
    np.testing.assert_allclose(level2, level1.reshape(24, 12, 2, 12, 2).mean(axis=(2, 4)), rtol=1e-6)

    napari_ome_zarr = pytest.importorskip("napari_ome_zarr")  # napari's own reader plugin, headless
    ((data, meta, kind),) = napari_ome_zarr.napari_get_reader(str(out))(str(out))
    assert kind == "image" and [tuple(d.shape) for d in data] == [(24, 48, 48), (24, 24, 24), (24, 12, 12)]
    assert list(meta["scale"]) == VOXEL and tuple(meta["axis_labels"]) == ("z", "y", "x")
    assert tuple(meta["units"]) == ("micrometer",) * 3


def test_an_ome_zarr_input_is_read_at_full_resolution_with_its_voxel_size(tmp_path, client, small_volume):
    source = zarr.open_group(small_volume, mode="r")
    image = tmp_path / "microscope.ome.zarr"  # as a microscope's converter writes one: the image at the root, no PSF
    write_image(source["observed"][...], zarr.open_group(image, mode="w"), scale_factors=(2,), axes="zyx",
                scale={"z": 0.5, "y": 0.2, "x": 0.2}, axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"})
    plain, _ = run(tmp_path, client, small_volume, name="plain")
    report, out = run(tmp_path, client, small_volume, name="from-ome",
                      input={"store": str(image), "image": ".", "operator": "psf", "operator_store": str(small_volume)})
    assert all(o.accepted for o in report.outcomes)
    np.testing.assert_array_equal(zarr.open_group(out, mode="r")["deconvolved"][...],
                                  zarr.open_group(tmp_path / "plain.zarr", mode="r")["deconvolved"][...])
    ome = zarr.open_group(out, mode="r").attrs["ome"]["multiscales"][0]
    assert ome["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.5, 0.2, 0.2]
    assert {axis["unit"] for axis in ome["axes"]} == {"micrometer"}


def test_a_result_not_accepted_is_no_ome_image_and_a_rerun_takes_the_metadata_off_first(tmp_path, client, small_volume):
    report, out = run(tmp_path, client, small_volume, name="first")
    assert "ome" in zarr.open_group(out, mode="r").attrs
    strict = {"max_iterations": 10, "check_every": 5, "stability_tol": 1e-9, "consistency_tol": 1e-12}
    config = pipeline_dict(small_volume, out, convergence=strict)
    config["name"] = "first"
    pipeline = Pipeline.from_yaml(write_yaml(tmp_path / "strict.yaml", config))
    pipeline.create_output(pipeline.prepare(overwrite=True))  # what a run does first
    assert "ome" not in zarr.open_group(out, mode="r").attrs  # a viewer meanwhile sees no finished image
    rejected = pipeline.run(client, progress=False, overwrite=True)
    assert rejected.rejected and all(o.state == "max_iterations" for o in rejected.outcomes)
    attrs = zarr.open_group(out, mode="r").attrs
    assert attrs["rqml"]["status"] == "rejected" and "ome" not in attrs
    assert not [n for n in Reader(parse_url(str(out)))() if n.metadata.get("axes")]  # ome-zarr finds no image


def test_a_voxel_size_of_another_rank_is_refused_before_anything_is_written(tmp_path, client, small_volume):
    with pytest.raises(InputError, match=r"input.voxel_size \(0.1, 0.1\) has 2 axes, the image .*::observed has 3"):
        run(tmp_path, client, small_volume, name="rank", input={"store": str(small_volume), "voxel_size": [0.1, 0.1]})
    assert not (tmp_path / "rank.zarr").exists()
