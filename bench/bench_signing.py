"""Signing and verifying a checkpoint record (ML-DSA-65, rqml_dask.trust.signing), per record;
and renewing a session certificate (rqml_dask.trust.session): the node's key and request, the
scheduler's certificate.

Usage: python bench/bench_signing.py [--records 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cryptography import x509

from rqml_dask.checkpoint import ArtifactRef, ModelConfig, TaskCheckpoint
from rqml_dask.trust import ca
from rqml_dask.trust.session import signing_request
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
        holder = x509.load_pem_x509_certificates((directory / "issued" / "node-a.pem").read_bytes())[0]
        authority = ca.Authority.load(directory)
        start = time.perf_counter()
        requests = [signing_request("node-a")[1] for _ in range(50)]
        request_s = (time.perf_counter() - start) / 50
        start = time.perf_counter()
        for request in requests:
            authority.session(x509.load_pem_x509_csr(request.encode()), holder, 3600)
        issue_s = (time.perf_counter() - start) / 50
    print(f"{args.records} records: sign {sign_s * 1e3:.2f} ms, verify {verify_s * 1e3:.2f} ms per record "
          f"(verify includes the certificate chain and the revocation list)")
    print(f"session renewal: new key and request {request_s * 1e3:.2f} ms on the node, certificate {issue_s * 1e3:.2f} ms on the scheduler")


if __name__ == "__main__":
    main()
