"""Pipeline files are refused before anything runs, with the file, the key path and what was expected."""

from __future__ import annotations

import pytest

from rqml_dask.pipeline import Pipeline, PipelineConfigError
from rqml_dask.volumes import InputError

from conftest import pipeline_dict, write_yaml


def refused(tmp_path, data) -> str:
    path = write_yaml(tmp_path / "p.yaml", data)
    with pytest.raises(PipelineConfigError) as info:
        Pipeline.from_yaml(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_the_shipped_pipelines_are_valid():
    pipeline = Pipeline.from_yaml("pipelines/quickstart.yaml")
    assert pipeline.config.models.ladder[0] == "richardson_lucy"
    assert pipeline.config.output.store.is_absolute()


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ninput: {store: [unclosed\n")
    with pytest.raises(PipelineConfigError, match=rf"{path}:\d+:\d+: not valid YAML"):
        Pipeline.from_yaml(path)


def test_unknown_key_wrong_type_and_bad_value(tmp_path):
    data = pipeline_dict(tmp_path / "in.zarr", tmp_path / "out.zarr")
    data["convergence"] = {"max_iterations": "lots", "stabilty_tol": 1e-3}
    data["tiling"] = {"tile": [0, 8, 8]}
    message = refused(tmp_path, data)
    assert "convergence.max_iterations: Input should be a valid integer" in message
    assert "convergence.stabilty_tol: Unexpected keyword argument" in message
    assert "tiling.tile: Value error, every tile size must be positive" in message


def test_unknown_model_and_unknown_parameter(tmp_path):
    data = pipeline_dict(tmp_path / "in.zarr", tmp_path / "out.zarr")
    data["models"] = {"ladder": ["richardson_lucy", "wiener"]}
    message = refused(tmp_path, data)
    assert "models.ladder: unknown model 'wiener'; registered models: conjugate_gradient, jacobi, landweber" in message
    data["models"] = {"ladder": ["richardson_lucy_tv"], "params": {"richardson_lucy_tv": {"lambda": 0.1}}}
    assert "params for model 'richardson_lucy_tv'" in refused(tmp_path, data)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(PipelineConfigError, match="cannot read pipeline file"):
        Pipeline.from_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(PipelineConfigError, match="expected a mapping"):
        Pipeline.from_yaml(tmp_path / "list.yaml")


def test_missing_input_store_is_refused_before_output_exists(tmp_path):
    data = pipeline_dict(tmp_path / "absent.zarr", tmp_path / "out.zarr")
    pipeline = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", data))
    with pytest.raises(InputError, match=r"absent\.zarr does not exist"):
        pipeline.tasks()
    assert not (tmp_path / "out.zarr").exists()
