"""Camera data: uint16 ADU with an offset and a gain, read as photon counts (real Zarr on disk)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from rqml_dask import Pipeline
from rqml_dask.camera import Camera, sample_chunks
from rqml_dask.cli import main
from rqml_dask.synthetic import SynthSpec, write_synthetic
from rqml_dask.volumes import InputError

from conftest import pipeline_dict, write_yaml

SPEC = SynthSpec(kind="cells", shape=(16, 32, 32), psf_sigma=(1.5, 1.0, 1.0), photons=300, seed=2)
CAMERA = {"offset": 100.0, "gain": 2.0, "read_noise": 2.0}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple:
    """The same photon counts twice: as float intensity, and as a camera reads them
    (uint16, offset 100 ADU, gain 2 ADU/photon, read noise 2 ADU)."""
    data = tmp_path_factory.mktemp("camera")
    floats = write_synthetic(data / "float.zarr", SPEC)
    camera = write_synthetic(data / "camera.zarr", dataclasses.replace(SPEC, camera_offset=100.0, camera_gain=2.0))
    return floats, camera


def make_pipeline(tmp_path, store, name="p", tile=(16, 16, 32), **input_overrides) -> Pipeline:
    data = pipeline_dict(store, tmp_path / f"{name}.zarr", tiling={"tile": list(tile), "halo": "auto"})
    data["input"].update(input_overrides)
    return Pipeline.from_yaml(write_yaml(tmp_path / f"{name}.yaml", data))


def refused(tmp_path, camera, **more) -> str:
    from rqml_dask.pipeline import PipelineConfigError

    with pytest.raises(PipelineConfigError) as info:
        make_pipeline(tmp_path, tmp_path / "in.zarr", camera=camera, **more)
    return str(info.value)


def test_camera_settings_parse_and_bad_values_name_the_field(tmp_path):
    given = make_pipeline(tmp_path, tmp_path / "in.zarr", camera=CAMERA).config.input.camera
    assert (given.offset, given.gain, given.estimate) == (100.0, 2.0, False)
    assert make_pipeline(tmp_path, tmp_path / "in.zarr", camera="auto").config.input.camera.estimate
    assert "input.camera.gain: Input should be greater than 0 (got -2)" in refused(tmp_path, {"offset": 100, "gain": -2})
    assert "input.camera.offset: Input should be greater than or equal to 0 (got -1)" in refused(tmp_path, {"offset": -1, "gain": 2})
    assert "input.camera.gainn: Extra inputs are not permitted" in refused(tmp_path, {"offset": 1, "gainn": 2})
    assert "input.camera: Value error, give both offset (ADU) and gain (ADU per photon)" in refused(tmp_path, {"offset": 100})
    assert "input.camera: Value error, expected auto or {offset: ADU, gain: ADU per photon}, got 'guess'" in refused(tmp_path, "guess")
    assert "input: Value error, give camera or counts_per_unit, not both" in refused(tmp_path, CAMERA, counts_per_unit=2.0)


def test_synth_writes_uint16_camera_data_of_the_same_counts(stores, tmp_path):
    floats, camera = (zarr.open_group(s, mode="r") for s in stores)
    adu = camera["observed"][...]
    assert adu.dtype == np.uint16 and adu.shape == SPEC.shape
    counts = floats["observed"][...] * SPEC.photons
    photons = (adu.astype(np.float64) - 100.0) / 2.0
    assert np.abs(photons - counts).mean() < 1.5 and abs((photons - counts).mean()) < 0.1  # read noise, 1 photon
    np.testing.assert_allclose(camera["truth"][...], floats["truth"][...] * SPEC.photons, rtol=1e-6)  # in photons
    assert camera.attrs["rqml_synthetic"]["camera_offset"] == 100.0

    done = CliRunner().invoke(main, ["data", "synth", str(tmp_path / "cli.zarr"), "--shape", "8,16,16", "--psf-sigma",
                                     "1,1,1", "--camera-offset", "100", "--camera-gain", "2", "--read-noise", "1"])
    assert done.exit_code == 0, done.output
    assert "uint16 camera data, offset 100 ADU, gain 2 ADU/photon, read noise 1 ADU" in done.output
    assert zarr.open_group(tmp_path / "cli.zarr", mode="r")["observed"].dtype == np.uint16
    bad = CliRunner().invoke(main, ["data", "synth", str(tmp_path / "bad.zarr"), "--camera-gain", "0"])
    assert bad.exit_code != 0 and "--camera-gain" in bad.output


def test_camera_reads_adu_as_whole_photons_clipped_at_zero():
    raw = np.array([90, 100, 101, 103, 700], np.uint16)
    np.testing.assert_array_equal(Camera(offset=100, gain=2).photons(raw), [0, 0, 0, 2, 300])  # rint: 0.5 -> 0, 1.5 -> 2
    # read noise of 2 ADU at gain 2 is 1 photon: shifted-Poisson counts carry a pedestal of (2 / 2)^2 = 1
    noisy = Camera(offset=100, gain=2, read_noise=2)
    assert noisy.pedestal == 1.0
    np.testing.assert_array_equal(noisy.photons(raw), [0, 1, 2, 2, 301])


def test_the_read_noise_pedestal_is_a_background_the_result_does_not_hold(stores, tmp_path):
    from rqml_dask.arrays import numpy_backend
    from rqml_dask.problem import load_problem
    from rqml_dask.refinement import Refinement

    task = make_pipeline(tmp_path, stores[1], camera=CAMERA).tasks()[0]
    _, problem = load_problem(task, numpy_backend())
    assert problem["background"] == 1.0
    refinement = Refinement.start(task, problem, numpy_backend())
    refinement.run_to_end()
    # a dark region stays near 0 photons, not at the pedestal of 1
    truth = zarr.open_group(stores[1], mode="r")["truth"][task.region.core_slices]
    core = refinement.estimate[task.region.core_in_window]
    dark = truth <= np.percentile(truth, 20)
    assert float(core[dark].mean()) < 0.5 + float(truth[dark].mean())


def test_offset_data_without_a_camera_are_refused_before_any_task_runs(stores, tmp_path):
    with pytest.raises(InputError) as info:
        make_pipeline(tmp_path, stores[1]).tasks()
    message = str(info.value)
    assert "\n" not in message
    assert "camera.zarr::observed looks like camera data: its darkest values are at 9" in message
    assert "set input.camera: {offset: ADU, gain: ADU per photon} or input.camera: auto" in message
    float_adu = tmp_path / "float_adu.zarr"  # float data are not checked
    group = zarr.open_group(float_adu, mode="w")
    for name in ("observed", "truth", "psf"):
        source = zarr.open_group(stores[1], mode="r")[name]
        group.create_array(name, data=source[...].astype(np.float32), chunks=source.chunks)
    assert make_pipeline(tmp_path, float_adu, name="f").tasks()


def test_camera_data_run_to_the_result_of_the_same_photons_as_floats(stores, tmp_path, client):
    pipeline = make_pipeline(tmp_path, stores[1], name="camera", camera=CAMERA)
    tasks = pipeline.tasks()
    assert len(tasks) == 2 and tasks[0].input.camera == Camera(offset=100.0, gain=2.0, read_noise=2.0)
    assert pipeline.camera_note == "offset 100.0 ADU, gain 2.00 ADU/photon, read noise 2.00 ADU (given)"
    cam = pipeline.run(client, progress=False)
    flt = make_pipeline(tmp_path, stores[0], name="float").run(client, progress=False)
    assert not cam.rejected and not flt.rejected
    result = zarr.open_group(tmp_path / "camera.zarr", mode="r")["deconvolved"][...] / SPEC.photons  # photons -> intensity
    reference = zarr.open_group(tmp_path / "float.zarr", mode="r")["deconvolved"][...]
    # the camera's read noise (1 photon) is noise the float data lack: 60 iterations of RL make it 9 % of the result,
    # and the error against the truth 0.3 % more
    assert np.linalg.norm(result - reference) / np.linalg.norm(reference) < 0.12
    assert cam.output_error == pytest.approx(flt.output_error, rel=0.02)
    assert cam.output_error < 0.9 * cam.input_error


def test_held_out_thinning_gets_whole_photon_counts(stores, tmp_path):
    from rqml_dask.arrays import numpy_backend
    from rqml_dask.problem import load_problem

    data = pipeline_dict(stores[1], tmp_path / "o.zarr", tiling={"tile": [16, 16, 32], "halo": "auto"},
                         convergence={"held_out_fraction": 0.2})
    data["input"]["camera"] = CAMERA
    task = Pipeline.from_yaml(write_yaml(tmp_path / "h.yaml", data)).tasks()[0]
    assert task.input.counts_per_unit == 1.0
    _, problem = load_problem(task, numpy_backend())
    observed, held = problem["observed"], problem["held_out"]
    assert observed.min() == 0 and np.array_equal(observed, np.rint(observed)) and observed.max() > 100
    assert np.all(held <= observed) and held.sum() == pytest.approx(0.2 * observed.sum(), rel=0.05)


def test_auto_estimates_offset_and_gain_from_a_few_chunks(tmp_path):
    store = write_synthetic(tmp_path / "big.zarr", SynthSpec(kind="cells", shape=(64, 128, 128), photons=300, seed=5,
                                                           camera_offset=100.0, camera_gain=2.0, read_noise=2.0))
    pipeline = make_pipeline(tmp_path, store, tile=(64, 64, 64), camera="auto")
    camera = pipeline.tasks()[0].input.camera
    assert camera.offset == pytest.approx(100.0, abs=3.0)  # less read_noise^2 / gain: 98
    assert camera.gain == pytest.approx(2.0, rel=0.1)
    assert pipeline.camera_note.startswith(f"{camera} (estimated from 4 chunk(s), ")

    many = zarr.open_array(tmp_path / "many.zarr", mode="w", shape=(40, 40), chunks=(5, 5), dtype=np.uint16)
    many[...] = np.arange(1600).reshape(40, 40)
    sample = sample_chunks(many)
    assert len(sample) == 4 and all(c.shape == (5, 5) for c in sample)  # never the whole image
    assert sample[0][0, 0] == 0 and sample[-1][-1, -1] == 1599


def test_auto_refuses_data_with_too_little_range_to_estimate_a_gain(tmp_path):
    store = write_synthetic(tmp_path / "dim.zarr", SynthSpec(kind="beads", shape=(16, 64, 64), photons=20, seed=1,
                                                           camera_offset=100.0, camera_gain=2.0))
    with pytest.raises(InputError, match=r"dim.zarr::observed: input.camera: auto: too little range of intensity in "
                                         r"\d+ sampled voxels to estimate the gain .*set input.camera: \{offset"):
        make_pipeline(tmp_path, store, camera="auto").tasks()
