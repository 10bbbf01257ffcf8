"""The Celery app, with settings chosen for long, idempotent part uploads.

`celery -A workers.app worker` and `s3ferry worker` both run it.
"""

from __future__ import annotations

import atexit
import logging
import os

from celery import Celery, signals

from models import transitions
from models.settings import Settings
from workers import backend, held, logs, runtime, signer, watch, window

log = logging.getLogger(__name__)

#: How long a part task may run. A part is at most 5 GiB: at 10 MB/s that is ~9 minutes;
#: one hour leaves room for slow links. The soft limit raises inside the task first,
#: so its claim is released and the part retried rather than lost.
TASK_TIME_LIMIT = 3600
TASK_SOFT_TIME_LIMIT = 3300

#: Redis redelivers an unacknowledged message after this long (measured from when a
#: worker RECEIVED it). It must exceed the task time limit, or a long part would run
#: twice at once. Dead workers are not waited for: their claims expire in Postgres
#: (lease) and the reconciler re-dispatches their parts.
VISIBILITY_TIMEOUT = 2 * TASK_TIME_LIMIT

#: Chord counters live in the result backend and expire with results: keep them for as
#: long as an upload may take (paused or stalled ones included). Never 0.
RESULT_EXPIRES = 7 * 24 * 3600


def control_queue(queue: str) -> str:
    return f"{queue}.control"


def control_routes(queue: str) -> dict[str, dict[str, str]]:
    return {name: {"queue": control_queue(queue)}
            for name in ("s3ferry.schedule", "s3ferry.reconcile", "s3ferry.sweep", "s3ferry.complete_upload")}


def make_app(settings: Settings) -> Celery:
    # The Redis result backend holds the chord counters; s3ferry's variant skips the
    # per-task result subscriptions that nobody here waits on (see workers/backend.py).
    app = Celery("s3ferry", broker=settings.broker_url, backend=backend.url_for(settings.result_backend),
                 include=["workers.tasks"])
    app.conf.update(
        task_default_queue=settings.queue,
        # The scheduler, reconciler, sweeper and completions go to a queue of their own, so
        # that they never wait behind thousands of part messages (`s3ferry worker` consumes
        # both; in presigned mode, only `s3ferry signer`, which holds the credentials, runs it).
        task_routes=control_routes(settings.queue),
        # Messages carry ids only: JSON, never pickle.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Acknowledge a part after it landed, not when it was received: a worker that dies
        # mid-part leaves its message to be delivered again (the claim makes that harmless).
        task_acks_late=True,
        # A pool process killed mid-part (OOM, SIGKILL) requeues its message instead of
        # marking the part failed, which would fail the whole chord.
        task_reject_on_worker_lost=True,
        # Each process reserves one message at a time: parts wait in the queue, where an idle
        # worker (or a new pod) can take them, instead of in one busy worker's prefetch.
        worker_prefetch_multiplier=1,
        task_time_limit=TASK_TIME_LIMIT,
        task_soft_time_limit=TASK_SOFT_TIME_LIMIT,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        # On SIGTERM (mapped to Celery's cold shutdown by REMAP_SIGTERM=SIGQUIT, which
        # `s3ferry worker` and the image set), parts in flight get this long to finish; the
        # rest are requeued and their claims released (see _release_claims_at_exit below).
        worker_soft_shutdown_timeout=settings.soft_shutdown_seconds,
        result_expires=RESULT_EXPIRES,
        result_extended=False,
        task_track_started=True,
        # Flower and the event stream see sent/started/succeeded parts.
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        # Keep working through a broker blip instead of cancelling parts mid-flight.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=True,
        # `s3ferry beat`: the scheduler and the reconciler every reconcile_interval, the sweeper hourly.
        beat_schedule={
            "schedule": {"task": "s3ferry.schedule", "schedule": float(settings.reconcile_interval)},
            "reconcile": {"task": "s3ferry.reconcile", "schedule": float(settings.reconcile_interval)},
            "sweep": {"task": "s3ferry.sweep", "schedule": 3600.0},
        },
    )
    return app


app = make_app(Settings.from_env())

# Presigned URLs never reach a log, even at DEBUG (workers/signer.py).
signer.hide_urls_in_logs()


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Never share the parent's database pool or S3 connections with a forked child.
    runtime.reset()


@signals.worker_ready.connect
def _reconcile_on_start(sender: object = None, **_: object) -> None:
    # A worker (re)starting is a good moment to look for uploads that stalled while it was down.
    app.send_task("s3ferry.reconcile")


_watch: list[watch.Watch] = []


@signals.worker_ready.connect
def _start_watch(sender: object = None, **_: object) -> None:
    # Every worker node runs the recovery pass: no singleton on the recovery path. Nodes that
    # consume the control queue hold S3 credentials, so they also reconcile (ListParts).
    rt = runtime.get()
    rt.alive()
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
