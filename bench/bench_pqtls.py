"""pqtls:// against tcp:// and Dask's stock tls://, between two processes, in one run.

A listener process (``distributed.comm.listen``) answers every message with its size; the
client process connects (handshake time: TCP connect + TLS + Dask's comm handshake, best of
``--connects``) and sends messages of 1 KiB, 1 MiB and 64 MiB (throughput: best of
``--repeats`` rounds of ``--count`` messages, one answer each). pqtls uses ML-DSA-65
certificates from :mod:`rqml_dask.trust.ca` (X25519MLKEM768 is negotiated); tls:// uses
ECDSA P-256 certificates, the classical TLS this machine's ``ssl`` can do.

Usage: python bench/bench_pqtls.py [--repeats 3] [--connects 20]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import tempfile
import time
from pathlib import Path

SIZES = {"1 KiB": 1 << 10, "1 MiB": 1 << 20, "64 MiB": 64 << 20}
COUNTS = {"1 KiB": 2000, "1 MiB": 200, "64 MiB": 4}


def classical_credentials(directory: Path) -> dict[str, str]:
    """An ECDSA P-256 CA and one leaf for 127.0.0.1 (what stock tls:// can load here)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "tls-ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "tls-cert.pem").write_bytes(leaf.public_bytes(pem))
    (directory / "tls-key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return {"ca": str(directory / "tls-ca.pem"), "cert": str(directory / "tls-cert.pem"), "key": str(directory / "tls-key.pem")}


def connection_args(scheme: str, directory: Path, role: str) -> dict:
    if scheme != "tls":
        return {}
    from distributed.security import Security

    files = classical_credentials(directory) if not (directory / "tls-ca.pem").exists() else {
        "ca": str(directory / "tls-ca.pem"), "cert": str(directory / "tls-cert.pem"), "key": str(directory / "tls-key.pem")}
    security = Security(tls_ca_file=files["ca"], tls_client_cert=files["cert"], tls_client_key=files["key"],
                        tls_scheduler_cert=files["cert"], tls_scheduler_key=files["key"], require_encryption=True)
    return security.get_listen_args("scheduler") if role == "listen" else security.get_connection_args("client")


def trust_config(directory: Path, name: str) -> dict:
    return {"rqml.trust": {"ca": str(directory / "ca.pem"), "cert": str(directory / "issued" / f"{name}.pem"),
                           "key": str(directory / "issued" / f"{name}-key.pem")}}


def serve(scheme: str, directory: str, ready) -> None:
    import dask
    from distributed.comm import listen

    async def handle(comm):
        try:
            while True:
                message = await comm.read()
                await comm.write(len(message["data"]))
        except Exception:
            pass

    async def main():
        args = connection_args(scheme, Path(directory), "listen")
        listener = listen(f"{scheme}://127.0.0.1:0", handle, **args)
        await listener.start()
        ready.send(listener.contact_address)
        await asyncio.Event().wait()

    with dask.config.set(trust_config(Path(directory), "server")):
        asyncio.run(main())


async def measure(scheme: str, address: str, directory: Path, repeats: int, connects: int) -> dict[str, float]:
    from distributed.comm import connect

    args = connection_args(scheme, directory, "connect")
    best_connect = float("inf")
    for _ in range(connects):
        start = time.perf_counter()
        comm = await connect(address, **args)
        best_connect = min(best_connect, time.perf_counter() - start)
        await comm.close()
    figures = {"handshake ms": best_connect * 1e3}
    comm = await connect(address, **args)
    for label, size in SIZES.items():
        payload = {"data": b"x" * size}
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(COUNTS[label]):
                await comm.write(payload)
                assert await comm.read() == size
            best = min(best, time.perf_counter() - start)
        figures[f"{label} MB/s"] = COUNTS[label] * size / best / 1e6
    await comm.close()
    return figures


def main() -> None:
    import dask

    from rqml_dask.trust import ca

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connects", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ca.init(directory)
        ca.issue(directory, "server", "scheduler")
        ca.issue(directory, "client", "client")
        classical_credentials(directory)
        results = {}
        context = multiprocessing.get_context("spawn")
        for scheme in ("tcp", "tls", "pqtls"):
            receive, send = context.Pipe(duplex=False)
            server = context.Process(target=serve, args=(scheme, tmp, send), daemon=True)
            server.start()
            address = receive.recv()
            with dask.config.set(trust_config(directory, "client")):
                results[scheme] = asyncio.run(measure(scheme, address, directory, args.repeats, args.connects))
            server.terminate()
            server.join()
    columns = list(results["tcp"])
    print(f"{'transport':<10}" + "".join(f"{c:>16}" for c in columns))
    for scheme, figures in results.items():
        print(f"{scheme:<10}" + "".join(f"{figures[c]:>16.2f}" for c in columns))
    for c in columns:
        print(f"{c}: pqtls/tcp {results['pqtls'][c] / results['tcp'][c]:.2f}, pqtls/tls {results['pqtls'][c] / results['tls'][c]:.2f}")


if __name__ == "__main__":
    main()
