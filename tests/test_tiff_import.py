"""``rqml data import``: TIFF stacks into Zarr, chunk by chunk, with their voxel size."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr_models.v05.image import Image

RQML = [sys.executable, "-m", "rqml_dask.cli"]


def rqml(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RQML, *args], capture_output=True, text=True, timeout=120)


def test_an_imagej_stack_imports_chunked_with_its_voxel_size_as_an_ome_image(tmp_path):
    stack = np.random.default_rng(0).integers(0, 4000, size=(20, 70, 90), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, resolution=(1 / 0.1, 1 / 0.1),
                     metadata={"spacing": 0.4, "unit": "um", "axes": "ZYX"})
    done = rqml("data", "import", str(tmp_path / "stack.tif"), str(tmp_path / "in.zarr"), "--chunks", "8,32,32")
    assert done.returncode == 0, done.stderr
    assert "(20, 70, 90) uint16, chunks (8, 32, 32), voxel (0.4, 0.1, 0.1) micrometer" in done.stdout
    group = zarr.open_group(tmp_path / "in.zarr", mode="r")
    np.testing.assert_array_equal(group["observed"][...], stack)
    assert group["observed"].chunks == (8, 32, 32)
    Image.from_zarr(group)
    assert group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.4, 0.1, 0.1]

    again = rqml("data", "import", str(tmp_path / "stack.tif"), str(tmp_path / "in.zarr"))
    assert again.returncode == 1 and "holds 'observed' already: pass --overwrite" in again.stderr


def test_a_stack_without_metadata_takes_the_voxel_size_given_or_none(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", np.ones((4, 16, 16), np.float32))
    done = rqml("data", "import", str(tmp_path / "plain.tif"), str(tmp_path / "a.zarr"))
    assert done.returncode == 0 and "voxel size unknown" in done.stdout
    assert "ome" not in zarr.open_group(tmp_path / "a.zarr", mode="r").attrs
    given = rqml("data", "import", str(tmp_path / "plain.tif"), str(tmp_path / "b.zarr"), "--voxel-size", "1,0.5,0.5", "--unit", "nanometer")
    assert given.returncode == 0, given.stderr
    axes = zarr.open_group(tmp_path / "b.zarr", mode="r").attrs["ome"]["multiscales"][0]["axes"]
    assert [a["unit"] for a in axes] == ["nanometer"] * 3


@pytest.mark.parametrize("content, expected", [
    (b"not a tiff", "is not a readable TIFF file"),
    (None, "rqml imports a 2-D image or a 3-D stack"),
])
def test_what_cannot_be_imported_is_refused_naming_the_file_and_nothing_is_written(tmp_path, content, expected):
    source = tmp_path / "bad.tif"
    if content is None:
        tifffile.imwrite(source, np.zeros((2, 3, 4, 5), np.uint8))
    else:
        source.write_bytes(content)
    done = rqml("data", "import", str(source), str(tmp_path / "out.zarr"))
    assert done.returncode == 1 and str(source) in done.stderr and expected in done.stderr
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.slow
def test_a_half_gigabyte_stack_imports_in_bounded_memory(tmp_path):
    shape = (512, 1024, 512)  # uint16: 512 MiB
    source = tmp_path / "big.tif"
    planes = tifffile.memmap(source, shape=shape, dtype=np.uint16)  # written a slab at a time, never whole in memory
    for z in range(0, shape[0], 64):
        planes[z:z + 64] = (np.arange(z, z + 64, dtype=np.uint16)[:, None, None] + np.arange(shape[2], dtype=np.uint16))
    planes.flush()
    del planes
    assert source.stat().st_size >= 512 * 2**20
    # peak resident memory of the import process alone (a parent of its own, so no other child counts)
    measure = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")

    def peak_mib(*args: str) -> float:
        done = subprocess.run([sys.executable, "-c", measure, *RQML, *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1]) / 1024

    tifffile.imwrite(tmp_path / "tiny.tif", np.zeros((2, 8, 8), np.uint16))
    idle = peak_mib("data", "import", str(tmp_path / "tiny.tif"), str(tmp_path / "tiny.zarr"))  # the same work, no data
    peak = peak_mib("data", "import", str(source), str(tmp_path / "big.zarr"))
    print(f"import of a {source.stat().st_size / 2**20:.0f} MiB TIFF: peak RSS {peak:.0f} MiB, {idle:.0f} MiB of it the imports")
    assert peak - idle < 128, f"{peak - idle:.0f} MiB over the imports for a 512 MiB file: not bounded by one slab (32 MiB)"
    imported = zarr.open_group(tmp_path / "big.zarr", mode="r")["observed"]
    assert imported.shape == shape
    np.testing.assert_array_equal(imported[300, :2, :4], [[300, 301, 302, 303]] * 2)
