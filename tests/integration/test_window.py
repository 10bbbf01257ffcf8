"""The AIMD window (workers/window.py): its rules on a real Redis, and a real fleet under the
fault proxy's SlowDown, and a killed worker's slot coming back through its lease."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from models.db import Database
from models.states import UploadStatus
from tests import services
from tests.conftest import sha256_of_object, write_random
from tests.http_faults import FaultProxy
from tests.integration.helpers import FINISHED, MiB, run_cli, submit, wait_status, wait_until
from workers.window import PROBE_ROUNDS, Limits, Signal, Window, client_from_url

pytestmark = pytest.mark.integration


@pytest.fixture
def kv(redis_urls: tuple[str, str]) -> Iterator[redis.Redis]:
    client = client_from_url(redis_urls[1])
    assert client is not None
    yield client
    client.close()


@pytest.fixture
def make_window(kv: redis.Redis) -> Iterator:  # type: ignore[type-arg]
    made: list[Window] = []

    def make(**limits: float) -> Window:
        shared = Window(kv, "http://127.0.0.1:1", f"w-{uuid.uuid4().hex[:8]}", Limits(**limits))  # type: ignore[arg-type]
        made.append(shared)
        return shared

    yield make
    for shared in made:
        kv.delete(*shared.keys)


def test_the_window_starts_at_initial_and_grows_by_one_only_while_full(make_window) -> None:  # type: ignore[no-untyped-def]
    shared = make_window(initial=2, low=1, high=4)
    a, b = shared.try_acquire("a"), shared.try_acquire("b")
    assert a and b and shared.try_acquire("c") is None  # 2 slots, both taken
    assert shared.release(a, Signal.GROW, "fast") == (2, 3)
    assert shared.release(b, Signal.GROW, "fast") == (3, 3)  # 1 of 3 in use: the window was not full
    slots = [shared.try_acquire(t) for t in "xyz"]
    assert all(slots) and shared.try_acquire("w") is None
    assert shared.release(slots[0], Signal.GROW, "fast") == (3, 4)
    assert shared.release(slots[1], Signal.GROW, "fast") == (4, 4)  # not full any more
    more = [shared.try_acquire(t) for t in "pqr"]
    assert all(more) and shared.try_acquire("s") is None  # 4 in use: slots[2] and p, q, r
    assert shared.release(more[0], Signal.GROW, "fast") == (4, 4)  # clamped at the maximum
    assert shared.release(more[1], Signal.NONE, "slow") == (4, 4)
    state = shared.state()
    assert state is not None and state.window == 4 and state.in_flight == 2


def test_the_window_halves_once_per_round_and_never_below_the_minimum(make_window) -> None:  # type: ignore[no-untyped-def]
    shared = make_window(initial=8, low=3, high=16)
    round_one = [shared.try_acquire(f"r1-{i}") for i in range(8)]
    assert all(round_one)
    assert shared.release(round_one[0], Signal.SHRINK, "SlowDown") == (8, 4)
    for slot in round_one[1:]:  # sent before the halving: they do not halve it again
        assert shared.release(slot, Signal.SHRINK, "SlowDown") == (4, 4)
    round_two = [shared.try_acquire(f"r2-{i}") for i in range(4)]
    assert all(round_two)
    assert shared.release(round_two[0], Signal.SHRINK, "timeout") == (4, 3)  # floor(4/2)=2, clamped to 3
    state = shared.state()
    assert state is not None and state.window == 3 and state.reason == "timeout"


def test_after_a_halving_the_window_regrows_fast_probes_the_old_limit_slowly_then_adds_one_per_round(  # type: ignore[no-untyped-def]
        make_window) -> None:
    shared = make_window(initial=8, low=1, high=16)
    first = shared.try_acquire("first")
    assert shared.release(first, Signal.SHRINK, "SlowDown") == (8, 4)  # 8 met congestion
    sizes = []
    for n in range(3 + PROBE_ROUNDS * 7 + 8):
        full = shared.state().window
        slots = [shared.try_acquire(f"{n}-{j}") for j in range(full)]
        assert all(slots) and shared.try_acquire(f"{n}-extra") is None
        sizes.append(shared.release(slots[0], Signal.GROW, "fast")[1])  # lands fast while the window is full
        for slot in slots[1:]:
            shared.release(slot, Signal.NONE, "slow")
    probe = PROBE_ROUNDS * 7  # parts: PROBE_ROUNDS full rounds of 7
    assert sizes[:3] == [5, 6, 7], sizes  # +1 per part back up to below 8
    assert sizes[3:3 + probe - 1] == [7] * (probe - 1) and sizes[3 + probe - 1] == 8, sizes
    assert sizes[3 + probe:] == [8] * 7 + [9], sizes  # past the old limit: +1 per round of 8


def test_a_slot_whose_lease_ran_out_is_free_again(make_window) -> None:  # type: ignore[no-untyped-def]
    shared = make_window(initial=1, low=1, high=1, lease_seconds=0.5)
    held = shared.try_acquire("dead-worker")
    assert held is not None and shared.try_acquire("other") is None
    time.sleep(0.2)
    assert shared.renew(held)  # a live worker keeps it
    time.sleep(0.4)
    assert shared.try_acquire("other") is None
    time.sleep(0.3)  # no renewal for longer than the lease
    assert shared.try_acquire("other") is not None
    assert not shared.renew(held)


def test_a_waiting_part_is_woken_by_a_release_without_polling(make_window) -> None:  # type: ignore[no-untyped-def]
    shared = make_window(initial=1, low=1, high=1)
    held = shared.try_acquire("first")
    got: list[float] = []

    def wait() -> None:
        slot = shared.acquire("second", wait_seconds=10)
        assert slot is not None
        got.append(time.monotonic())

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    assert not got
    released = time.monotonic()
    shared.release(held, Signal.NONE, "done")
    waiter.join(5)
    assert got and got[0] - released < 0.5  # woken by the release, not by the 1 s re-check
    assert shared.acquire("third", wait_seconds=0.3) is None  # gives up when told


# --- a real fleet ---------------------------------------------------------------------------

WINDOW_LINE = re.compile(r"window \S+: (\d+) -> (\d+) \((.*?)\)")


def changes(log: str) -> list[tuple[int, int, str]]:
    return [(int(a), int(b), reason) for a, b, reason in WINDOW_LINE.findall(log)]


def window_keys(kv: redis.Redis, proxy: FaultProxy, bucket: str) -> tuple[str, str, str]:
    return Window(kv, proxy.url, bucket, Limits()).keys  # type: ignore[return-value]


@pytest.mark.slow
def test_under_slowdown_the_fleet_window_grows_then_halves_and_the_upload_completes(  # type: ignore[no-untyped-def]
        proxy_and_env, tmp_path: Path, workdir: Path, db: Database, s3, bucket: str, kv: redis.Redis) -> None:
    proxy, env = proxy_and_env
    # S3 throttles above 3 requests in flight; two workers of 4 could send 8
    proxy.configure(slowdown_above=3, latency=0.15)
    env = {**env, "S3FERRY_WINDOW_INITIAL": "1", "S3FERRY_WINDOW_MAX": "8"}
    source = tmp_path / "aimd.bin"
    sha256 = write_random(source, 40 * 5 * MiB)
    workers = [services.start_worker(workdir, env, f"aimd{i}-{uuid.uuid4().hex[:4]}", concurrency=4)
               for i in range(2)]
    try:
        upload_id = submit(env, source, bucket)
        assert wait_status(db, upload_id, FINISHED, timeout=180) == UploadStatus.COMPLETE
        status = run_cli(["status", str(upload_id)], env)
        logs = "".join(w.output() for w in workers)
    finally:
        for w in workers:
            w.stop()
        kv.delete(*window_keys(kv, proxy, bucket))
    assert sha256_of_object(s3, bucket, "aimd.bin") == sha256
    moves = changes(logs)
    grows = [(a, b) for a, b, r in moves if b > a]
    halvings = [(a, b, r) for a, b, r in moves if b < a and not r.startswith("limit lowered")]
    lowered = [(a, b, r) for a, b, r in moves if b < a and r.startswith("limit lowered")]
    assert all("SlowDown" in r for _, _, r in lowered), moves  # other refusals of a halved round
    assert grows and all(b == a + 1 for a, b in grows), moves  # additive: one at a time
    assert any(a == 1 and b == 2 for a, b in grows), moves  # from the initial window
    # multiplicative: half the window the refused part was sent under, which is between half the
    # window now and the window now
    assert halvings and all(max(1, ((a + 1) // 2) // 2) <= b <= max(1, a // 2) for a, b, _ in halvings), moves
    assert all("SlowDown" in r for _, _, r in halvings), moves
    assert max(b for _, b, _ in moves) <= 8
    assert proxy.counts.slowdowns >= len(halvings)
    # a window halved to at most 3 keeps the fleet under the throttle for most of the upload
    assert proxy.counts.slowdowns < 40, (proxy.counts, moves)
    assert "window" in status.stdout and re.search(r"window\s+\d+ \(0 in flight", status.stdout), status.stdout


@pytest.mark.slow
def test_a_killed_workers_slot_is_freed_by_its_lease(  # type: ignore[no-untyped-def]
        proxy_and_env, tmp_path: Path, workdir: Path, db: Database, s3, bucket: str, kv: redis.Redis) -> None:
    proxy, env = proxy_and_env
    proxy.configure(bytes_per_second=2 * MiB)  # a part takes ~2.5 s
    env = {**env, "S3FERRY_WINDOW_INITIAL": "1", "S3FERRY_WINDOW_MIN": "1", "S3FERRY_WINDOW_MAX": "1",
           "S3FERRY_WINDOW_LEASE_SECONDS": "3", "S3FERRY_LEASE_SECONDS": "3", "S3FERRY_STALL_SECONDS": "6"}
    slots_key = window_keys(kv, proxy, bucket)[1]
    source = tmp_path / "lease.bin"
    sha256 = write_random(source, 3 * 5 * MiB)
    doomed = services.start_worker(workdir, env, f"doomed-{uuid.uuid4().hex[:4]}", concurrency=2)
    try:
        upload_id = submit(env, source, bucket)
        wait_until(lambda: kv.zcard(slots_key) == 1, timeout=30)  # a part is being sent
        shared = Window(kv, proxy.url, bucket, Limits())
        doomed.kill()  # the worker and its pool, SIGKILL: no release, no renewal
        killed = time.monotonic()
        wait_until(lambda: shared.state().in_flight == 0, timeout=10)  # type: ignore[union-attr]
        freed_after = time.monotonic() - killed
        assert 1.0 < freed_after < 4.5, freed_after  # by the 3 s lease, not at once nor never
        # another worker takes the window's only slot and finishes the upload
        rescue = services.start_worker(workdir, env, f"rescue-{uuid.uuid4().hex[:4]}", concurrency=2)
        try:
            assert run_cli(["reconcile", str(upload_id), "--force"], env).returncode == 0
            assert wait_status(db, upload_id, FINISHED, timeout=120) == UploadStatus.COMPLETE
        finally:
            rescue.stop()
    finally:
        doomed.stop()
        kv.delete(*window_keys(kv, proxy, bucket))
    assert sha256_of_object(s3, bucket, "lease.bin") == sha256


def test_other_refusals_of_a_halved_round_lower_the_limit_without_halving_again(make_window) -> None:  # type: ignore[no-untyped-def]
    shared = make_window(initial=4, low=1, high=16)
    early = [shared.try_acquire(f"early-{i}") for i in range(4)]  # sent under a window of 4
    for slot in early[:3]:
        shared.release(slot, Signal.GROW, "fast")  # slow start: 4 -> 6 (the third finds it less than half used)
    late = [shared.try_acquire(f"late-{i}") for i in range(5)]  # sent under 6
    assert all(late) and shared.state().window == 6
    assert shared.release(late[-1], Signal.SHRINK, "SlowDown") == (6, 3)  # sent under 6: limit 6, halved
    assert shared.release(early[3], Signal.SHRINK, "SlowDown") == (3, 3)  # sent under 4: limit 4, no halving
    for slot in late[:-1]:
        shared.release(slot, Signal.NONE, "landed slowly")
    sizes = []
    for n in range(3):
        full = shared.state().window
        slots = [shared.try_acquire(f"{n}-{j}") for j in range(full)]
        sizes.append(shared.release(slots[0], Signal.GROW, "fast")[1])
        for slot in slots[1:]:
            shared.release(slot, Signal.NONE, "slow")
    assert sizes == [3, 3, 3], sizes  # at 3 = limit 4 - 1: the slow probe, not a fast regrowth to 6
