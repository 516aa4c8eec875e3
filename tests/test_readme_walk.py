"""The README's examples, run as a new user runs them (issue 34, part 1).

Convention: every line that starts with ``rqml`` in a ```` ```bash ````, ```` ```sh ```` or
```` ```console ```` block of README.md is an example (a trailing ``# comment`` is not part
of it). Each runs as written, through ``bash`` with the virtualenv's ``rqml`` first on PATH,
in one fresh directory per session that holds what those commands read: a copy of
``pipelines/``, a small TIFF stack ``stack.tif`` standing for the user's own (``rqml data
import``), and a config directory of its own (``$XDG_CONFIG_HOME``: a fresh user, as
``rqml run --secure`` keeps its CA there).

An example runs after every earlier example of its block (each once a session), as a reader
following the block does: ``rqml show results/quickstart.zarr`` reads what ``rqml run
pipelines/quickstart.yaml`` wrote. It must exit 0; an ``rqml run`` must end with every task
accepted and, where it prints the error against the truth, with the output's below the
input's: what the README says of them. Examples that need what a test machine lacks are
skipped, each with its reason (:data:`SKIPPED`). An example that runs a pipeline, or comes
after one in its block, is ``slow`` (about 2.5 minutes in all on a two-core machine); the
others run in the fast part of the suite.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTS
from timing import bound

README = TESTS.parent / "README.md"
SKIPPED = {
    r"--scheduler (?!(tcp|pqtls)://127\.)": "talks to the cluster the README launches on 10.0.0.5; a test reaches loopback only",
    r"--scheduler \S+://127\.0\.0\.1:8786": "the Kubernetes scheduler behind kubectl port-forward; there is no Kubernetes here",
    r"--cluster (slurm|pbs|kubernetes)|pipelines/slurm\.yaml": "starts batch jobs or pods: tests/test_slurm.py runs pipelines on a one-host Slurm",
}
"""Pattern of an example's command -> why it is not run here."""


@dataclass(frozen=True)
class Example:
    block: int
    """Which shell block of the README it is in (counted from 0)."""
    line: int
    """Its line in README.md."""
    command: str

    @property
    def skipped(self) -> str | None:
        return next((why for pattern, why in SKIPPED.items() if re.search(pattern, self.command)), None)

    @property
    def runs_a_pipeline(self) -> bool:
        return self.command.startswith("rqml run ")


def examples(text: str) -> list[Example]:
    """The README's examples in order (the module's convention)."""
    found, block, fence = [], -1, None
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None and (opened := re.match(r"^```(bash|sh|console)\s*$", line)):
            fence, block = opened.group(1), block + 1
        elif fence is not None and line.startswith("```"):
            fence = None
        elif fence is not None and line.startswith("rqml "):
            found.append(Example(block, number, re.sub(r"\s+#.*$", "", line).strip()))
    return found


EXAMPLES = examples(README.read_text())


def _slow(example: Example) -> bool:
    """Whether it, or an earlier example of its block that runs here, runs a pipeline."""
    return any(e.runs_a_pipeline and not e.skipped for e in EXAMPLES[: EXAMPLES.index(example) + 1] if e.block == example.block)


def _param(example: Example):
    marks = [pytest.mark.skip(reason=example.skipped)] if example.skipped else [pytest.mark.slow] if _slow(example) else []
    return pytest.param(example, marks=marks, id=example.command)


class Walk:
    """The directory the examples run in, and what each printed (run once each)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        shutil.copytree(TESTS.parent / "pipelines", root / "pipelines")
        import tifffile

        rng = np.random.default_rng(0)  # the user's own stack: 16 planes of 64 x 64 uint16
        tifffile.imwrite(root / "stack.tif", rng.poisson(100, (16, 64, 64)).astype(np.uint16))
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "XDG_CONFIG_HOME": str(root / "config")}
        self.done: dict[Example, subprocess.CompletedProcess] = {}

    def run(self, example: Example) -> subprocess.CompletedProcess:
        """``example``'s result, after the earlier examples of its block (each run once)."""
        for earlier in EXAMPLES[: EXAMPLES.index(example)]:
            if earlier.block == example.block and not earlier.skipped:
                before = self.done.get(earlier) or self._run(earlier)
                assert before.returncode == 0, f"README line {earlier.line}, before this one, failed: {earlier.command}\n{before.stderr}"
        return self.done.get(example) or self._run(example)

    def _run(self, example: Example) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", "-c", example.command], cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=bound(300))
        self.done[example] = done
        return done


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> Walk:
    return Walk(tmp_path_factory.mktemp("readme"))


def test_the_readme_has_examples_and_the_walk_sees_them():
    """The convention finds the README's examples (a change of fences would otherwise skip them all)."""
    commands = [e.command for e in EXAMPLES]
    assert "rqml run pipelines/quickstart.yaml" in commands and "rqml run pipelines/van_cittert.yaml" in commands, commands
    assert sum(not e.skipped for e in EXAMPLES) >= 10, commands


@pytest.mark.parametrize("example", [_param(e) for e in EXAMPLES])
def test_a_readme_example_runs_as_written_and_ends_as_the_readme_says(walk, example):
    done = walk.run(example)
    assert done.returncode == 0, f"README line {example.line}: {example.command}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    if example.runs_a_pipeline:
        tasks = re.search(r"^tasks\s+(\d+) \((.*)\)$", done.stdout, re.M)
        assert tasks and tasks.group(2) == f"{tasks.group(1)} accepted", done.stdout
        if error := re.search(r"^error vs truth \(relative RMSE\): input (\S+) -> output (\S+)$", done.stdout, re.M):
            assert float(error.group(2)) < float(error.group(1)), done.stdout
