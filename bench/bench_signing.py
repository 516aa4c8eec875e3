"""Signing and verifying a checkpoint record (ML-DSA-65, rqml_dask.trust.signing), per record;
signing a task's outcome on its node and checking it on the scheduler
(rqml_dask.scheduler.result_check), per result; and renewing a session certificate
(rqml_dask.trust.session): the node's key and request, the scheduler's certificate.

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
from rqml_dask.messages import OUTCOME, TaskOutcome, TracePoint
from rqml_dask.scheduler.result_check import ResultCheck
from rqml_dask.trust.signing import Seal, Verifier


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
        # a result as a node presents it: a full convergence trace (the largest outcome there is)
        outcome = TaskOutcome(task_id="bench/0", state="accepted", status="converged", iterations=500, model="richardson_lucy",
                              escalations=0, models=[], convergence=None, validation_failures=[], output="o", elapsed_s=1.0,
                              backend="numpy", trace=[TracePoint(i, "richardson_lucy", 0.5, 0.1, 0.1, 0.1) for i in range(256)])
        check = ResultCheck(Verifier.load(directory / "ca.pem", directory / "crl.pem"), max_skew=30, remembered=100_000)
        start = time.perf_counter()
        results = [seal.sign_outcome(outcome, f"bench/0@{i:016x}") for i in range(args.records)]
        sign_result_s = (time.perf_counter() - start) / args.records
        start = time.perf_counter()
        for i, result in enumerate(results):  # as it arrives: parsed from its JSON, then checked
            check.check(OUTCOME.validate_python(OUTCOME.dump_python(result, mode="json")), f"bench/0@{i:016x}", "node-a", live=True)
        check_result_s = (time.perf_counter() - start) / args.records
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
    print(f"{args.records} results: sign {sign_result_s * 1e3:.2f} ms on the node, check {check_result_s * 1e3:.2f} ms on the "
          f"scheduler per result (parse, certificate chain, revocation list, signature, skew, replay)")
    print(f"session renewal: new key and request {request_s * 1e3:.2f} ms on the node, certificate {issue_s * 1e3:.2f} ms on the scheduler")


if __name__ == "__main__":
    main()
