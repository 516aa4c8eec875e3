"""Shared fixtures: small synthetic inputs on disk and a real multi-process Dask cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from distributed import Client

from rqml_dask.cluster import embedded_cluster
from rqml_dask.pipeline.config import ClusterSpec
from rqml_dask.synthetic import SynthSpec, write_synthetic

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
