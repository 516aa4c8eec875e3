"""The ``rqml`` command line: ``rqml run PIPELINE.yaml`` and ``rqml data synth STORE``."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from rqml_dask.pipeline import Pipeline, PipelineConfigError, PipelineError
from rqml_dask.synthetic import SynthSpec, write_synthetic
from rqml_dask.volumes import InputError


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


@click.group()
def main() -> None:
    """rqml-dask: iterative-refinement pipelines on Dask."""


@main.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--scheduler", metavar="ADDRESS", help="Use this Dask scheduler instead of an embedded cluster.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar while tasks run.")
def run(pipeline_file: Path, scheduler: str | None, progress: bool) -> None:
    """Run every task of PIPELINE_FILE and write its output Zarr."""
    from distributed import Client

    from rqml_dask.cluster import embedded_cluster

    try:
        pipeline = Pipeline.from_yaml(pipeline_file)
        pipeline.tasks()  # refuse bad input before any cluster starts
    except (PipelineConfigError, InputError) as exc:
        raise click.ClickException(str(exc)) from None
    with contextlib.ExitStack() as stack:
        if scheduler:
            client = stack.enter_context(Client(scheduler))
        else:
            cluster = stack.enter_context(embedded_cluster(pipeline.config.cluster))
            client = stack.enter_context(Client(cluster))
        click.echo(f"dashboard    {client.dashboard_link}", err=True)
        try:
            report = pipeline.run(client, progress=progress)
        except (PipelineError, InputError) as exc:
            raise click.ClickException(f"{exc}\noutput left marked incomplete: {pipeline.output_ref}") from None
    click.echo(report.summary())
    if report.rejected:
        click.echo(f"{len(report.rejected)} task(s) failed validation: output marked 'rejected'", err=True)
        sys.exit(1)


@main.group()
def data() -> None:
    """Input data helpers."""


@data.command()
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--kind", type=click.Choice(["beads", "cells"]), default="cells", show_default=True)
@click.option("--shape", type=_ints, default="64,128,128", show_default=True, help="Volume shape, z,y,x.")
@click.option("--psf-sigma", type=_floats, default="2.0,1.2,1.2", show_default=True, help="Gaussian PSF sigma per axis (voxels).")
@click.option("--photons", type=float, default=300.0, show_default=True, help="Counts per unit intensity (Poisson noise).")
@click.option("--seed", type=int, default=0, show_default=True)
def synth(store: Path, kind: str, shape, psf_sigma, photons: float, seed: int) -> None:
    """Write a synthetic ground truth, PSF and blurred noisy observation to STORE."""
    try:
        spec = SynthSpec(kind=kind, shape=shape, psf_sigma=psf_sigma, photons=photons, seed=seed)
        path = write_synthetic(store, spec)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote truth, observed and psf {shape} to {path}")


if __name__ == "__main__":
    main()
