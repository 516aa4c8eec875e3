"""Signing and verifying a checkpoint record (ML-DSA-65, rqml_dask.trust.signing), per record.

Usage: python bench/bench_signing.py [--records 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rqml_dask.checkpoint import ArtifactRef, ModelConfig, TaskCheckpoint
from rqml_dask.trust import ca
from rqml_dask.trust.signing import Seal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ca.init(directory)
        ca.issue(directory, "node-a", "node")
        seal = Seal.load(directory / "ca.pem", directory / "issued" / "node-a.pem", directory / "issued" / "node-a-key.pem",
                         directory / "crl.pem")
        refs = tuple(ArtifactRef(name, f"zarr://x/{name}", (32, 64, 64), "float32", "0" * 64) for name in ("estimate", "previous"))
        records = [TaskCheckpoint.create("bench/0", i, ModelConfig("richardson_lucy", 0), refs, {"runs": [{"model": "rl", "iterations": i}]})
                   for i in range(args.records)]
        start = time.perf_counter()
        signed = [seal.sign(r) for r in records]
        sign_s = (time.perf_counter() - start) / args.records
        start = time.perf_counter()
        for r in signed:
            seal.verify(r)
        verify_s = (time.perf_counter() - start) / args.records
    print(f"{args.records} records: sign {sign_s * 1e3:.2f} ms, verify {verify_s * 1e3:.2f} ms per record "
          f"(verify includes the certificate chain and the revocation list)")


if __name__ == "__main__":
    main()
