"""The byte path: client CPU and throughput of the sender (workers/sender.py) against
botocore's own sending, for UploadPart to the discard endpoint over plain HTTP and TLS.

The client is a worker's S3 client (s3.make_client: one attempt, UNSIGNED-PAYLOAD, our
CRC32C header) sending the parts of one file (1 GiB, 32 MiB parts, 4 threads by default)
from the page cache; CRC32Cs are computed before the clock starts, as they are the same
pass in every mode. Modes:

- botocore: botocore sends the RangeReader body (http.client: 128 KiB reads, a new bytes
  object each);
- sender: `sender.attach(client)`: os.sendfile over http; over TLS, reads into one reused
  buffer of connections.TLS_BUFFER bytes per part, written with sendall;
- botocore-reused (TLS only): botocore sends a body whose read() returns views of one
  reused buffer (the other way to avoid allocations over TLS; not used by s3ferry).

Each measurement runs in a process of its own (CPU: user + system of that process during
the sends, all threads; wall time of the sends); modes alternate within each run; the
median of the runs is reported, with the discard server's CPU per GiB too (it shares the
machine's cores). The server only drains bodies (no MD5/CRC32C), so that it is not the
bottleneck of the comparison.

    python bench/bytepath.py [--size-mib 1024] [--part-mib 32] [--threads 4] [--runs 3]

Writes bench/results/bytepath.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import discard_s3  # noqa: E402
from tests import services  # noqa: E402
from workers import connections, reader, s3, sender  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MiB = 1024 * 1024
GiB = 1024 * MiB
MODES = {"http": ("botocore", "sender"), "https": ("botocore", "botocore-reused", "sender")}
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}


# --- the server -------------------------------------------------------------------------------

class Drain(discard_s3.Handler):
    """The discard endpoint, reading bodies without hashing them."""

    def _drain(self) -> tuple[str, str, int]:
        size = left = int(self.headers.get("Content-Length", "0"))
        view = memoryview(bytearray(MiB))
        while left:
            got = self.rfile.readinto(view[:min(MiB, left)])
            if not got:
                break
            left -= got
        return hashlib.md5(self.path.encode()).hexdigest(), self.headers.get("x-amz-checksum-crc32c", ""), size


def serve(port: int, certfile: str | None, keyfile: str | None) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), Drain)
    server.daemon_threads = True
    if certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


@contextlib.contextmanager
def server(scheme: str, cert: tuple[str, str]) -> Iterator[tuple[str, int]]:
    """The discard endpoint in a process of its own: (its URL, its pid)."""
    port = services.free_port()
    args = [sys.executable, __file__, "serve", "--port", str(port)]
    if scheme == "https":
        args += ["--certfile", cert[0], "--keyfile", cert[1]]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not services.listening("127.0.0.1", port):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the discard endpoint did not start")
            time.sleep(0.05)
        yield f"{scheme}://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(10)


def certificate(folder: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1: (certificate file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s3ferry bench")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


# --- one measurement (a process of its own) -----------------------------------------------------

def measure(mode: str, endpoint: str, path: str, part_size: int, threads: int) -> dict[str, float]:
    client = s3.make_client(endpoint, retries=1)
    if mode == "sender":
        sender.attach(client)
    size = os.path.getsize(path)
    ranges = [(offset, min(part_size, size - offset)) for offset in range(0, size, part_size)]
    checksums = []
    for offset, length in ranges:
        with reader.RangeReader(path, offset, length) as body:
            checksums.append(reader.crc32c_of(body))
    upload_id = client.create_multipart_upload(Bucket="bench", Key="bytepath")["UploadId"]
    body_class = ReusedBlocks if mode == "botocore-reused" else reader.RangeReader

    def one(number: int) -> None:
        offset, length = ranges[number - 1]
        with body_class(path, offset, length) as body:
            client.upload_part(Bucket="bench", Key="bytepath", UploadId=upload_id, PartNumber=number, Body=body,
                               ContentLength=length, ChecksumCRC32C=checksums[number - 1])

    before, wall = os.times(), time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(1, len(ranges) + 1)))
    after, wall = os.times(), time.monotonic() - wall
    user, system = after.user - before.user, after.system - before.system
    return {"cpu_s": user + system, "user_s": user, "sys_s": system, "wall_s": wall, "bytes": size}


class ReusedBlocks(reader.RangeReader):
    """read() returns a view of one reused buffer (valid until the next read): what botocore's
    http.client loop accepts, without a new bytes object per block."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._buffer = memoryview(bytearray(connections.TLS_BUFFER))

    def read(self, size: int = -1):  # type: ignore[no-untyped-def,override]
        want = len(self._buffer) if size is None or size < 0 else min(size, len(self._buffer))
        return self._buffer[:self.readinto(self._buffer[:want])]


def _server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# --- the runs -----------------------------------------------------------------------------------

def run_one(mode: str, endpoint: str, path: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "one", "--mode", mode, "--endpoint", endpoint, "--file", path,
                          "--part-mib", str(args.part_mib), "--threads", str(args.threads)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} to {endpoint} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("one")
    one.add_argument("--mode", required=True)
    one.add_argument("--endpoint", required=True)
    one.add_argument("--file", required=True)
    one.add_argument("--part-mib", type=int, default=32)
    one.add_argument("--threads", type=int, default=4)
    served = sub.add_parser("serve")
    served.add_argument("--port", type=int, required=True)
    served.add_argument("--certfile")
    served.add_argument("--keyfile")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--part-mib", type=int, default=32)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--schemes", default="http,https")
    parser.add_argument("--out", default=str(RESULTS / "bytepath.json"))
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.port, args.certfile, args.keyfile)
        return 0
    if args.command == "one":
        print(json.dumps(measure(args.mode, args.endpoint, args.file, args.part_mib * MiB, args.threads)))
        return 0
    return bench(args)


def bench(args: argparse.Namespace) -> int:
    from orchestrator.demo import write_random

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bytepath-") as folder:
        path = Path(folder) / "source.bin"
        write_random(path, args.size_mib * MiB)
        path.read_bytes()  # into the page cache
        cert = certificate(Path(folder))
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **ENV, "AWS_CA_BUNDLE": cert[0]}
        results: dict[str, dict[str, list[dict[str, float]]]] = {}
        for scheme in args.schemes.split(","):
            results[scheme] = {mode: [] for mode in MODES[scheme]}
            with server(scheme, cert) as (endpoint, pid):
                for run in range(args.runs):
                    for mode in MODES[scheme]:
                        before = _server_cpu(pid)
                        sample = run_one(mode, endpoint, str(path), args, env)
                        sample["server_cpu_s"] = _server_cpu(pid) - before
                        results[scheme][mode].append(sample)
                        print(f"{scheme} run {run + 1} {mode}: {_line(sample)}", flush=True)
    summary = {scheme: {mode: _median(samples) for mode, samples in modes.items()}
               for scheme, modes in results.items()}
    report = {"command": "python bench/bytepath.py " + " ".join(sys.argv[1:]), "size_mib": args.size_mib,
              "part_mib": args.part_mib, "threads": args.threads, "runs": args.runs,
              "tls_buffer_kib": connections.TLS_BUFFER // 1024, "cpus": os.cpu_count(),
              "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "median": summary, "samples": results}
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for scheme, modes in summary.items():
        for mode, row in modes.items():
            print(f"median {scheme} {mode}: {row['cpu_s_per_gib']:.2f} s/GiB client CPU (user "
                  f"{row['user_s_per_gib']:.2f}, sys {row['sys_s_per_gib']:.2f}), {row['mb_s']:.0f} MB/s, "
                  f"server {row['server_cpu_s_per_gib']:.2f} s/GiB")
    return 0


def _line(sample: dict[str, float]) -> str:
    gib = sample["bytes"] / GiB
    return (f"{sample['cpu_s'] / gib:.2f} s/GiB (user {sample['user_s'] / gib:.2f}, sys {sample['sys_s'] / gib:.2f}), "
            f"{sample['bytes'] / sample['wall_s'] / 1e6:.0f} MB/s, "
            f"server {sample['server_cpu_s'] / gib:.2f} s/GiB")


def _median(samples: list[dict[str, float]]) -> dict[str, float]:
    gib = samples[0]["bytes"] / GiB
    return {"cpu_s_per_gib": round(statistics.median(s["cpu_s"] / gib for s in samples), 3),
            "user_s_per_gib": round(statistics.median(s["user_s"] / gib for s in samples), 3),
            "sys_s_per_gib": round(statistics.median(s["sys_s"] / gib for s in samples), 3),
            "mb_s": round(statistics.median(s["bytes"] / s["wall_s"] / 1e6 for s in samples), 1),
            "server_cpu_s_per_gib": round(statistics.median(s["server_cpu_s"] / gib for s in samples), 3)}


if __name__ == "__main__":
    sys.exit(main())
