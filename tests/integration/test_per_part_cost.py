"""What a part costs in Redis, and the fixed costs of an upload (issue 15).

A real worker on a private redis-server counts its Redis requests per part; a process's
share of the window (workers/share.py) takes parked slots without Redis and keeps the
window's guarantees (the fleet-wide cap, AIMD on what parts say, a dead holder's slots freed);
PostgreSQL NOTIFY wakes a waiting command.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from models import notify
from models.db import Database
from models.states import UploadStatus
from orchestrator import cli
from tests import services
from tests.conftest import write_random
from tests.integration.helpers import FINISHED, MiB, submit, wait_status, wait_until
from workers import share, window
from workers.window import Limits, Signal, Window

pytestmark = pytest.mark.integration


# --- Redis requests per part, a real worker ---------------------------------------------------------


@pytest.fixture
def private_redis(workdir: Path) -> Iterator[str]:
    """A redis-server of this test's own: nothing else's requests in its counts."""
    port = services.free_port()
    server = services.Server(f"redis-cost-{port}", [services.redis_server(), "--port", str(port), "--save", "",
                                                    "--appendonly", "no"], workdir,
                             ready=lambda: services.listening("127.0.0.1", port)).start()
    with services.running(server):
        yield f"redis://127.0.0.1:{port}"


def _reads(client: redis.Redis) -> int:
    """The requests that reached the server (a pipeline or MULTI ... EXEC block mostly one)."""
    return int(client.info("stats")["total_reads_processed"])


def test_a_part_costs_about_what_a_no_op_chord_task_does(  # type: ignore[no-untyped-def]
        private_redis: str, service_env: dict[str, str], workdir: Path, db: Database, bucket: str,
        tmp_path: Path) -> None:
    env = {**service_env, "S3FERRY_BROKER_URL": f"{private_redis}/0", "S3FERRY_RESULT_BACKEND": f"{private_redis}/1",
           "S3FERRY_QUEUE": f"cost-{uuid.uuid4().hex[:8]}"}
    kv = redis.Redis.from_url(private_redis)
    worker = services.start_worker(workdir, env, f"cost-{uuid.uuid4().hex[:4]}", concurrency=4)
    spent: dict[int, tuple[int, float]] = {}
    try:
        for parts in (8, 32):  # the difference is what the 24 more parts cost: an upload's own costs cancel
            source = tmp_path / f"cost-{parts}.bin"
            with open(source, "wb") as out:
                out.truncate(parts * 5 * MiB)
            kv.config_resetstat()
            started = time.monotonic()
            upload_id = submit(env, source, bucket)
            assert wait_status(db, upload_id, FINISHED) == UploadStatus.COMPLETE
            spent[parts] = (_reads(kv), time.monotonic() - started)
        commands = {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in kv.info("commandstats").items()}
    finally:
        worker.stop()
        kv.flushall()
        kv.close()
    per_part = (spent[32][0] - spent[8][0]) / 24
    # before issue 15: 17 per part (a no-op Celery chord task: 7.5); now about 8 (bench/results/costs.json)
    assert per_part <= 10, (per_part, spent, commands)
    assert "setex" not in commands  # no task result stored, no STARTED state
    assert commands.get("publish", 0) < 10, commands  # no task events (a worker heartbeat every 2 s)


def test_task_events_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.broker import app

    assert app.conf.task_ignore_result and not app.conf.task_track_started
    assert not app.conf.worker_send_task_events and not app.conf.task_send_sent_event
    settings = cli.Settings(database_url="postgresql+psycopg://u@h/db", broker_url="redis://h/0", queue="q")
    parse = cli._parser().parse_args
    monkeypatch.delenv("S3FERRY_TASK_EVENTS", raising=False)
    argv = cli.worker_argv(parse(["worker"]), settings)
    assert "--task-events" not in argv and {"--without-mingle", "--without-gossip"} <= set(argv)
    assert "--task-events" in cli.worker_argv(parse(["worker", "-E"]), settings)
    monkeypatch.setenv("S3FERRY_TASK_EVENTS", "1")
    from_env = cli.Settings.from_env({"S3FERRY_DATABASE_URL": "postgresql+psycopg://u@h/db",
                                      "S3FERRY_BROKER_URL": "redis://h/0", "S3FERRY_TASK_EVENTS": "1"})
    assert from_env.task_events and "--task-events" in cli.worker_argv(parse(["worker"]), from_env)


# --- a process's share of the window --------------------------------------------------------------


@pytest.fixture
def kv(redis_urls: tuple[str, str]) -> Iterator[redis.Redis]:
    client = window.client_from_url(redis_urls[1])
    assert client is not None
    yield client
    client.close()


class Counted(Window):
    """A window that counts the share's calls to Redis."""

    calls = 0

    def sync(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super().sync(*args, **kwargs)


@pytest.fixture
def make_share(kv: redis.Redis) -> Iterator:  # type: ignore[type-arg]
    bucket = f"s-{uuid.uuid4().hex[:8]}"
    made: list[share.Share] = []

    def make(holder: str, **limits: float) -> share.Share:
        shared = share.Share(Counted(kv, "http://127.0.0.1:1", bucket, Limits(**limits)), holder)  # type: ignore[arg-type]
        made.append(shared)
        return shared

    yield make
    for shared in made:
        with shared._cond:  # noqa: SLF001 - the test's parts are over: nothing in use
            shared._busy.clear()  # noqa: SLF001
        shared.close()
    if made:
        kv.delete(*made[0].window.keys)


def token(holder: str, part: int) -> str:
    return f"{holder}:{uuid.uuid4()}:{part}:{uuid.uuid4().hex[:8]}"


def test_parts_of_a_process_take_its_parked_slots_without_redis(make_share) -> None:  # type: ignore[no-untyped-def]
    mine = make_share("host:a:1", initial=2, low=1, high=2)
    slots = [mine.try_acquire(token("host:a:1", n)) for n in (1, 2)]
    assert all(slots) and mine.try_acquire(token("host:a:1", 3)) is None  # the window's 2 are this process's
    calls = mine.window.calls
    for n in range(4, 40):  # a part ends, the next takes its slot: no round trip
        mine.release(slots[0], Signal.NONE, "landed")
        slots[0] = mine.try_acquire(token("host:a:1", n))
        assert slots[0] is not None
    assert mine.window.calls - calls <= 1  # (the keeper may tell Redis of the ends meanwhile)
    assert mine.state().in_flight == 2  # type: ignore[union-attr]


def test_what_parts_say_reaches_the_window_in_order(make_share) -> None:  # type: ignore[no-untyped-def]
    mine = make_share("host:a:1", initial=2, low=1, high=16)
    slots = [mine.try_acquire(token("host:a:1", n)) for n in (1, 2)]
    for n in range(3, 6):  # fast parts while the window is full: +1 each
        mine.release(slots[0], Signal.GROW, "fast")
        slots[0] = mine.try_acquire(token("host:a:1", n))
    wait_until(lambda: mine.state().window == 5, timeout=5)  # type: ignore[union-attr]
    mine.release(slots[1], Signal.SHRINK, "SlowDown")  # at once: halved
    # half the window the refused part was sent under (2), but at most half of now's back (5 -> 3): 1
    assert mine.state().window == 1  # type: ignore[union-attr]


def test_a_process_with_parked_slots_lets_a_waiting_one_have_them(make_share) -> None:  # type: ignore[no-untyped-def]
    a, b = make_share("host:a:1", initial=2, low=1, high=2), make_share("host:b:2", initial=2, low=1, high=2)
    held = [a.try_acquire(token("host:a:1", n)) for n in (1, 2)]
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(b.acquire(token("host:b:2", 3), wait_seconds=10)))
    waiter.start()
    time.sleep(share.FRESH_SECONDS + 0.1)  # b waits; a has not heard from Redis since it took its slots
    assert not got
    a.release(held[0], Signal.NONE, "landed")  # parked; a's next part would take it, but b waits
    assert a.try_acquire(token("host:a:1", 4)) is None  # a gives it back, and queues behind b
    waiter.join(5)
    assert got and got[0] is not None
    assert a.state().in_flight == 2  # type: ignore[union-attr]


def test_a_process_that_stopped_waiting_holds_nobody_up(make_share) -> None:  # type: ignore[no-untyped-def]
    a, b, c = (make_share(f"host:{n}:1", initial=1, low=1, high=1) for n in "abc")
    held = a.try_acquire(token("host:a:1", 1))
    assert held is not None and b.acquire(token("host:b:1", 2), wait_seconds=0.3) is None  # b gave up
    a.release(held, Signal.NONE, "landed")
    a.close()  # a's slot back in the window
    assert c.try_acquire(token("host:c:1", 3)) is not None  # not kept for b, which no longer waits


def test_a_halving_elsewhere_takes_parked_slots_back(make_share) -> None:  # type: ignore[no-untyped-def]
    a, b = make_share("host:a:1", initial=4, low=1, high=4), make_share("host:b:2", initial=4, low=1, high=4)
    mine = [a.try_acquire(token("host:a:1", n)) for n in (1, 2, 3)]
    theirs = b.try_acquire(token("host:b:2", 4))
    assert all(mine) and theirs
    a.release(mine[0], Signal.NONE, "landed")
    a.release(mine[1], Signal.NONE, "landed")  # a: 1 sending, 2 parked
    b.release(theirs, Signal.SHRINK, "SlowDown")  # 4 -> 2
    assert b.state().window == 2  # type: ignore[union-attr]
    time.sleep(share.FRESH_SECONDS + 0.1)
    slot = a.try_acquire(token("host:a:1", 5))  # a looks again before taking a parked slot: one is over
    assert slot is not None and a.try_acquire(token("host:a:1", 6)) is None
    assert a.state().in_flight <= 2  # type: ignore[union-attr]


def test_idle_slots_go_back_and_a_dead_process_loses_its_slots(make_share, kv: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    a = make_share("host:a:1", initial=4, low=1, high=4)
    first, second = a.try_acquire(token("host:a:1", 1)), a.try_acquire(token("host:a:1", 2))
    a.release(first, Signal.NONE, "landed")
    wait_until(lambda: a.state().in_flight == 1, timeout=3)  # type: ignore[union-attr]  # the parked one went back
    # a's process dies: the recovery pass evicts its part's slot, and with it every slot of the process
    assert a.window.evict(f"host:a:1:{uuid.uuid4()}:2:") == 1
    assert a.state().in_flight == 0  # type: ignore[union-attr]
    assert second is not None


def test_a_slot_in_use_is_renewed_past_its_lease(make_share) -> None:  # type: ignore[no-untyped-def]
    a = make_share("host:a:1", initial=1, low=1, high=1, lease_seconds=1)
    slot = a.try_acquire(token("host:a:1", 1))
    time.sleep(1.6)  # a long part: the process renews its slot every third of the lease
    assert a.state().in_flight == 1 and a.renew(slot)  # type: ignore[union-attr]
    assert a.window.try_acquire("another-process") is None


def test_a_new_window_starts_at_the_nodes_concurrency() -> None:
    try:
        window.start_at(4)
        assert window.start_size(Limits(initial=None, low=1, high=32)) == 4
        assert window.start_size(Limits(initial=None, low=1, high=2)) == 2
        assert window.start_size(Limits(initial=1, low=1, high=32)) == 1  # S3FERRY_WINDOW_INITIAL decides
        window.start_at(0)  # outside a worker
        assert window.start_size(Limits(initial=None, low=1, high=32)) == 1
        assert window.start_size(Limits(initial=None, low=3, high=32)) == 3
    finally:
        window.start_at(0)


# --- waiting on an upload ---------------------------------------------------------------------------


def test_a_notify_wakes_a_listener_when_its_transaction_commits(db: Database) -> None:
    upload_id = uuid.uuid4()
    listener = notify.listen(db.engine)
    assert listener is not None
    try:
        with pytest.raises(RuntimeError), db.transaction() as session:
            notify.notify(session, upload_id)
            raise RuntimeError("rolled back")
        assert not listener.wait(upload_id, 0.3)  # never sent
        with db.transaction() as session:
            notify.notify(session, uuid.uuid4())  # another upload's
            notify.notify(session, upload_id)
        assert listener.wait(upload_id, 5)
    finally:
        listener.close()


def test_waiting_on_a_fleets_upload_ends_when_its_completion_is_notified(  # type: ignore[no-untyped-def]
        worker, service_env: dict[str, str], db: Database, bucket: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "watched.bin"
    write_random(source, 6 * MiB)
    upload_id = submit(service_env, source, bucket)
    done: list[float] = []
    waiter = threading.Thread(target=lambda: done.append((cli.wait(db, upload_id, interval=30), time.monotonic())[1]))
    waiter.start()
    assert wait_status(db, upload_id, FINISHED) == UploadStatus.COMPLETE
    finished = time.monotonic()
    waiter.join(40)
    assert done and done[0] - finished < 5  # woken by the completion's NOTIFY, not its 30 s look
    assert "complete:" in capsys.readouterr().err


def test_help_imports_neither_sqlalchemy_nor_celery_nor_boto3() -> None:
    import subprocess
    import sys

    code = ("import sys; from orchestrator import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('sqlalchemy', 'celery', 'boto3', 'alembic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"

