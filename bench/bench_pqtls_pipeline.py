"""The quickstart-sized pipeline over pqtls:// against tcp://, on one cluster shape, in one run.

For each transport: a ``dask scheduler --preload rqml_dask.scheduler`` and two
``dask worker --preload rqml_dask.node`` processes (one thread each) on loopback, and the
quickstart pipeline (64x128x128, 8 tasks) run from this process, on a fresh output each
time (``--repeats`` runs, transports interleaved, best makespan). Over pqtls every process
has its own ML-DSA-65 certificate from a throw-away CA.

Usage: python bench/bench_pqtls_pipeline.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask
from distributed import Client

from rqml_dask import Pipeline
from rqml_dask.pipeline import load_pipeline_config
from rqml_dask.trust import ca

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trust(directory: Path, name: str) -> dict[str, str]:
    return {"DASK_RQML__TRUST__CA": str(directory / "ca.pem"), "DASK_RQML__TRUST__CERT": str(directory / "issued" / f"{name}.pem"),
            "DASK_RQML__TRUST__KEY": str(directory / "issued" / f"{name}-key.pem")}


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dask", *args], env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def run_once(scheme: str, directory: Path, work: Path, run: int) -> float:
    port = free_port()
    address = f"{scheme}://127.0.0.1:{port}"
    secure = scheme == "pqtls"
    processes = [start(["scheduler", "--protocol", scheme, "--host", "127.0.0.1", "--port", str(port),
                        "--dashboard-address", "127.0.0.1:0", "--preload", "rqml_dask.scheduler"], trust(directory, "scheduler") if secure else {})]
    for i in range(2):
        processes.append(start(["worker", address, "--nthreads", "1", "--name", f"node-{i}", "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
                                "--preload", "rqml_dask.node", "--preload-nanny", "rqml_dask.node"], trust(directory, f"node-{i}") if secure else {}))
    config = load_pipeline_config(ROOT / "pipelines" / "quickstart.yaml")
    config = config.model_copy(update={
        "input": config.input.model_copy(update={"store": work / "quickstart.zarr"}),
        "output": config.output.model_copy(update={"store": work / f"out-{scheme}-{run}.zarr"}),
        # checkpoints and done markers of their own: no run reuses another's results
        "checkpoint": config.checkpoint.model_copy(update={"local": f"lmdb://{work}/ckpt-{scheme}-{run}",
                                                           "artifacts": work / f"artifacts-{scheme}-{run}"}),
    })
    try:
        settings = {"rqml.trust": {k.split("__")[-1].lower(): v for k, v in trust(directory, "client").items()}} if secure else {}
        with dask.config.set(settings), Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            pipeline = Pipeline(config)
            started = time.perf_counter()
            report = pipeline.run(client, progress=False)
            elapsed = time.perf_counter() - started
            assert all(o.accepted for o in report.outcomes) and len(report.outcomes) == 8
            return elapsed
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory, work = Path(tmp) / "ca", Path(tmp)
        ca.init(directory)
        for name, role in (("scheduler", "scheduler"), ("node-0", "node"), ("node-1", "node"), ("client", "client")):
            ca.issue(directory, name, role)
        best = {"tcp": float("inf"), "pqtls": float("inf")}
        for run in range(args.repeats):
            for scheme in best:
                elapsed = run_once(scheme, directory, work, run)
                best[scheme] = min(best[scheme], elapsed)
                print(f"run {run} {scheme:<6} {elapsed:6.2f} s", flush=True)
    print(f"best makespan: tcp {best['tcp']:.2f} s, pqtls {best['pqtls']:.2f} s, pqtls/tcp {best['pqtls'] / best['tcp']:.3f}")


if __name__ == "__main__":
    main()
