"""The Celery app of a worker: workers/broker.py's app, with the worker's signal handlers
(heartbeat and recovery pass, held messages, claims released at exit).

`celery -A workers.app worker` and `s3ferry worker` both run it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import signal
import threading

from celery import signals

from models import transitions
from models.settings import Settings
from workers import held, logs, runtime, s3, signer, watch, window
from workers.broker import app, control_queue

log = logging.getLogger(__name__)

# Presigned URLs never reach a log, even at DEBUG (workers/signer.py).
signer.hide_urls_in_logs()


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Never share the parent's database pool or S3 connections with a forked child.
    runtime.reset()
    _warm_up()


@signals.worker_init.connect
def _window_start(sender: object = None, **_: object) -> None:
    # A destination's new window starts at this node's concurrency, so that an upload's first
    # parts go together (workers/window.py); S3FERRY_WINDOW_INITIAL, if set, decides instead.
    concurrency = getattr(sender, "concurrency", 0)
    window.start_at(concurrency if isinstance(concurrency, int) else 0)


@signals.worker_ready.connect
def _freeze_what_is_loaded(**_: object) -> None:
    # Everything loaded so far (Celery, SQLAlchemy, botocore, their modules) lives as long as the
    # process: the garbage collector need not walk it again at every full collection.
    gc.freeze()


@signals.worker_ready.connect
def _reconcile_on_start(sender: object = None, **_: object) -> None:
    # A worker (re)starting is a good moment to look for uploads that stalled while it was down.
    app.send_task("s3ferry.reconcile")
    _warm_up()


@signals.worker_ready.connect
def _wake_on_signals(sender: object = None, **_: object) -> None:
    # Celery's shutdown signals only set a flag, which its event loop reads when its poll
    # returns (up to a second later): a signal also writes to a pipe the loop polls, so a
    # SIGINT/SIGTERM/SIGQUIT is acted on at once (single-machine commands stop their worker).
    hub = getattr(sender, "hub", None)
    if hub is None or threading.current_thread() is not threading.main_thread():
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    if previous != -1:  # someone else's: leave it to them
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
        return
    hub.add_reader(read, _drain, read)


def _drain(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 512):
            pass


def _warm_up() -> None:
    """Make what a process's first part needs while no part waits for it, on a thread: its
    heartbeat (a first beat), and its S3 client for the configured endpoint (botocore loads the
    service model: a few hundred ms). A part that comes first waits for them as it would have."""
    threading.Thread(target=_make_ready, name="s3ferry-warm-up", daemon=True).start()


def _make_ready() -> None:
    rt = runtime.get()
    try:
        rt.alive()
        if not rt.settings.presigned:  # presigned workers have no credentials, and send no request of their own
            client = rt.s3(None)  # uploads to AWS itself record no endpoint (None)
            endpoint = s3.recorded_endpoint(client)
            if endpoint:  # uploads to the configured endpoint record it
                rt.s3(endpoint)
    except Exception as error:  # noqa: BLE001 - the first part makes them, or reports why it cannot
        log.info("could not prepare for the first part (%s); the part will", error)


_watch: list[watch.Watch] = []


@signals.worker_ready.connect
def _start_watch(sender: object = None, **_: object) -> None:
    # Every worker node runs the recovery pass: no singleton on the recovery path. Nodes that
    # consume the control queue hold S3 credentials, so they also reconcile (ListParts).
    rt = runtime.get()  # its heartbeat starts with the first pass, which retries it if the database is down
    consumed = set(app.amqp.queues.consume_from or ())
    _watch.append(watch.Watch(rt, reconcile=control_queue(rt.settings.queue) in consumed).start())


@signals.worker_shutdown.connect
def _stop_watch(**_: object) -> None:
    while _watch:
        _watch.pop().stop()


#: The node's main process's worker id (its pool processes inherit it): whose messages they are.
_node: list[str] = []


@signals.task_received.connect
def _note_held(request: object = None, **_: object) -> None:
    # Runs in the node's main process as a message arrives (workers/held.py).
    if getattr(request, "name", None) != "s3ferry.upload_part" or not _node:
        return
    rt = runtime.get()
    try:
        upload_id, part = request.args  # type: ignore[attr-defined]
        retries = int((request.request_dict or {}).get("retries") or 0)  # type: ignore[attr-defined]
        held.note(rt.redis, rt.settings.queue, _node[0], f"{request.id}:{retries}", str(upload_id), int(part))  # type: ignore[attr-defined, arg-type]
    except Exception as error:  # noqa: BLE001 - only a shortcut: Redis returns the message in the end
        log.warning("could not note a received part message: %s", error)


@signals.task_postrun.connect
def _forget_held(task_id: str | None = None, task: object = None, **_: object) -> None:
    if getattr(task, "name", None) != "s3ferry.upload_part" or not _node:
        return
    rt = runtime.get()
    try:
        held.forget(rt.redis, _node[0], f"{task_id}:{task.request.retries or 0}")  # type: ignore[union-attr, arg-type]
    except Exception as error:  # noqa: BLE001
        log.warning("could not forget a finished part message: %s", error)


@signals.worker_process_shutdown.connect
def _at_process_exit(**_: object) -> None:
    runtime.reset()


@signals.worker_init.connect
def _release_claims_at_exit(**_: object) -> None:
    # Celery's cold shutdown (what SIGTERM becomes after the soft shutdown) sends no
    # worker_shutdown signal, so the main process releases at interpreter exit, after the
    # pool is gone (parts that outlived the soft shutdown were killed, their messages
    # requeued): every claim this node's processes held goes back, and other workers take
    # those parts now rather than when the leases expire.
    main = os.getpid()
    atexit.register(_release_claims, main)
    settings = Settings.from_env()
    if watch.held_on_redis(settings) and window.redis_url(settings.result_backend, settings.broker_url):
        _node.append(f"{runtime.node_prefix()}{main}")


def _release_claims(main: int) -> None:
    if os.getpid() != main:  # a forked pool process inherits atexit handlers: not its job
        return
    _stop_watch()
    rt = runtime.get()
    try:
        with rt.db.transaction() as session:
            released = transitions.release_claims(session, runtime.node_prefix(), "worker shutting down")
        if released:
            log.warning("released %d part claim(s) at shutdown", released)
    except Exception as error:  # noqa: BLE001 - the leases expire anyway
        log.warning("could not release claims at shutdown: %s", error)
    finally:
        runtime.reset()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _context_in_logs(logger: logging.Logger, **_: object) -> None:
    logs.add_context(logger)
