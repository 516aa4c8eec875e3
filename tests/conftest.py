"""Shared fixtures: small synthetic inputs on disk and a real multi-process Dask cluster."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from distributed import Client

from rqml_dask.deploy.local import embedded_cluster
from rqml_dask.pipeline.config import ClusterSpec
from rqml_dask.synthetic import SynthSpec, SystemsSpec, write_synthetic, write_systems

from timing import bound


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """pytest-timeout's per-test guard against hangs (``timeout`` in pyproject.toml) scales
    with every other bound (``RQML_TEST_TIME_SCALE``, see tests/timing.py)."""
    ini = config.getoption("timeout", None) or config.getini("timeout")
    if ini:
        config.option.timeout = bound(float(ini))


SMALL = SynthSpec(kind="cells", shape=(24, 48, 48), psf_sigma=(1.5, 1.0, 1.0), photons=300, seed=1)


@pytest.fixture(scope="session")
def small_volume(tmp_path_factory) -> Path:
    """A 24x48x48 synthetic cell volume (truth, observed, psf) in a Zarr store."""
    return write_synthetic(tmp_path_factory.mktemp("data") / "small.zarr", SMALL)


SYSTEMS = SystemsSpec(kind="systems", grid=(48, 48), count=8, contrast=1000, anisotropy=4, seed=1)
"""Conditioned so that float32 CG needs 400+ iterations to its fixed point: fixed budgets of 300 hold."""
TESTS = Path(__file__).parent
ARTIFACTS = Path(os.environ.get("RQML_TEST_ARTIFACTS", TESTS.parent / "test-artifacts"))
"""Where browser tests leave their screenshots (``test-artifacts/``, git-ignored, unless set)."""
ARTIFACTS.mkdir(exist_ok=True)


@pytest.fixture(scope="session")
def small_systems(tmp_path_factory) -> Path:
    """Eight 48x48 high-contrast diffusion systems (rhs, coefficients, truth) in a Zarr store."""
    return write_systems(tmp_path_factory.mktemp("data") / "systems.zarr", SYSTEMS)


def systems_dict(store: Path, out: Path, **overrides) -> dict:
    """A small, valid linear_solve pipeline over ``store`` (the ladder of pipelines/linear_solve.yaml,
    two systems per task); ``overrides`` replace top-level sections, as :func:`pipeline_dict`."""
    config = {
        "name": "solve",
        "task_class": "linear_solve",
        "input": {"store": str(store), "image": "rhs", "operator": "coefficients", "truth": "truth"},
        "output": {"store": str(out)},
        "tiling": {"tile": [2, *SYSTEMS.grid], "halo": 0},
        "models": {"ladder": ["jacobi", "conjugate_gradient", "mixed_precision"]},
        "convergence": {"target_misfit": 1e-10, "max_iterations": 3000, "max_iterations_per_model": 1000, "check_every": 5,
                        "stability_tol": 1e-4, "novelty_window": 10, "min_progress": 0.1},
        "validation": {"require_nonnegative": False, "max_misfit": 1e-10},
        "cluster": {"n_workers": 2, "dashboard_address": "127.0.0.1:0"},
        "checkpoint": {"every_iterations": 10},
    }
    return _with(config, out, overrides)


@dataclass(frozen=True)
class EngineCase:
    """One task class as the engine tests run it: its data, a pipeline over them, and a
    model that iterates at a set pace (``delay`` seconds per iteration) for fixed budgets."""

    task_class: str
    store: Path
    output_array: str
    paced_model: str

    def pipeline(self, out: Path, *, tasks: int, iterations: int, delay: float, **overrides) -> dict:
        """A pipeline of ``tasks`` tasks, each run for exactly ``iterations`` iterations of the
        paced model (shipped as a plugin file), its result accepted as it is."""
        fixed = {"max_iterations": iterations, "check_every": 10, "stability_tol": 0, "consistency_tol": 0,
                 "novelty_window": 10**6, "accept_max_iterations": True}
        models = {"ladder": [self.paced_model], "params": {self.paced_model: {"delay": delay}}}
        if self.task_class == "deconvolution":
            tile = {8: [12, 24, 24], 4: [12, 24, 48]}[tasks]
            config = pipeline_dict(self.store, out, tiling={"tile": tile, "halo": "auto"}, convergence=fixed, models=models)
        else:
            tile = [SYSTEMS.count // tasks, *SYSTEMS.grid]
            config = systems_dict(self.store, out, tiling={"tile": tile, "halo": 0}, convergence=fixed, models=models,
                                  validation={"require_nonnegative": False})
        return {**config, "plugins": [str(TESTS / "sleepy_model.py")], **overrides}


@pytest.fixture(params=["deconvolution", "linear_solve"])
def engine_case(request, small_volume, small_systems) -> EngineCase:
    """Each task class in turn, for the engine tests that must hold for both."""
    if request.param == "deconvolution":
        return EngineCase("deconvolution", small_volume, "deconvolved", "sleepy_model:SleepyModel")
    return EngineCase("linear_solve", small_systems, "solution", "sleepy_model:SleepyConjugateGradient")


def local_cluster(n_workers: int = 2):
    """The cluster ``rqml run`` starts when given no scheduler (the node and scheduler
    plugins preloaded), with ``n_workers`` single-threaded worker processes on loopback."""
    return embedded_cluster(ClusterSpec(n_workers=n_workers, threads_per_worker=1, dashboard_address="127.0.0.1:0"))


@pytest.fixture(scope="module")
def client():
    """A client of :func:`local_cluster`, shared by a module's tests."""
    with local_cluster() as cluster, Client(cluster) as client:
        yield client


def pipeline_dict(store: Path, out: Path, **overrides) -> dict:
    """A small, valid pipeline over ``store``; ``overrides`` replace top-level sections.

    Its checkpoints go beside ``out`` unless ``checkpoint.artifacts`` is given: tests share
    input stores, and by default every run on one input reuses the others' results. Its
    convergence holds no counts out unless ``convergence.held_out_fraction`` is given: these
    tests pin iteration counts and results; tests/test_stopping.py tests the held-out rule."""
    config = {
        "name": "test",
        "input": {"store": str(store), "truth": "truth"},
        "output": {"store": str(out)},
        "tiling": {"tile": [12, 24, 24], "halo": "auto"},
        "models": {"ladder": ["richardson_lucy", "richardson_lucy_accelerated"]},
        "convergence": {"max_iterations": 60, "check_every": 5, "accept_max_iterations": True},  # a fixed budget
        "cluster": {"n_workers": 2, "dashboard_address": "127.0.0.1:0"},
        "checkpoint": {"every_iterations": 10},
    }
    return _with(config, out, overrides)


def paced_pipeline_dict(store: Path, out: Path, iterations: int) -> dict:
    """:func:`pipeline_dict` of tiles [24, 48, 48] refined by ``tests/sleepy_model.py`` at
    0.05 s an iteration, exactly ``iterations`` each, checked every 10: a run that takes a
    known while."""
    paced = {"max_iterations": iterations, "check_every": 10, "stability_tol": 0, "consistency_tol": 0, "novelty_window": 10**6,
             "accept_max_iterations": True}
    return pipeline_dict(store, out, tiling={"tile": [24, 48, 48], "halo": "auto"}, convergence=paced,
                         models={"ladder": ["sleepy_model:SleepyModel"], "params": {"sleepy_model:SleepyModel": {"delay": 0.05}}},
                         plugins=[str(TESTS / "sleepy_model.py")])


def _with(config: dict, out: Path, overrides: dict) -> dict:
    """``config`` with ``overrides``, its checkpoints beside ``out`` and no held-out counts, unless given."""
    config.update(overrides)
    config["checkpoint"] = {"artifacts": f"{out}.checkpoints", **config["checkpoint"]}
    config["convergence"] = {"held_out_fraction": 0, **config["convergence"]}
    return config


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def etcd(tmp_path):
    """A real etcd server on free loopback ports, with its own data dir; stopped at the end."""
    from etcd_server import EtcdServer

    with EtcdServer(tmp_path / "etcd") as server:
        yield server


@pytest.fixture
def browser():
    """Headless Debian Chromium driven by Selenium (``scripts/test`` installs both)."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("browser tests need Debian's chromium and chromium-driver: run scripts/test, which installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,900"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()
