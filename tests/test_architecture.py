"""The architecture as the code holds it: import contracts, and light package imports."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("dask", "distributed", "zarr", "lmdb", "bokeh")


def test_the_import_contracts_in_pyproject_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize("module", ["rqml_dask", "rqml_dask.task", "rqml_dask.models", "rqml_dask.messages",
                                    "rqml_dask.refinement", "rqml_dask.checkpoint", "rqml_dask.node.queues"])
def test_the_task_model_and_message_modules_load_no_dask_zarr_lmdb_or_bokeh(module):
    loaded = loaded_after(f"import {module}")
    assert module in loaded
    assert not loaded & set(HEAVY), f"import {module} loads {sorted(loaded & set(HEAVY))}"


def test_a_model_family_loads_only_the_contract_and_the_backend():
    loaded = loaded_after("import rqml_plugins.deconvolution.richardson_lucy")
    assert not loaded & set(HEAVY)
    assert {m for m in loaded if m.startswith("rqml_dask.")} <= {"rqml_dask.models", "rqml_dask.arrays", "rqml_dask._lazy"}  # behind the contract; the package's lazy names


def test_the_scheduler_preload_loads_none_of_the_node_side():
    loaded = loaded_after("import rqml_dask.scheduler")
    assert "rqml_dask.scheduler.plugin" in loaded
    assert not [m for m in loaded if m == "rqml_dask.node" or m.startswith("rqml_dask.node.")]
    assert "rqml_dask.node_installer" in loaded  # what it registers on the workers: it names the node plugin


def test_the_lazy_package_names_resolve():
    loaded = loaded_after("import rqml_dask, rqml_dask.node\nrqml_dask.Pipeline, rqml_dask.TaskOutcome, rqml_dask.node.RQMLWorker")
    assert {"rqml_dask.pipeline.pipeline", "rqml_dask.node.worker"} <= loaded
