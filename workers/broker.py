"""The Celery app that sends s3ferry's tasks, by name: its settings, and no task code.

Decisions (submit, scheduler, reconciler, failover, ...) send tasks through it
without importing the tasks; `workers/app.py` adds the worker's signal handlers
to the same app, and its `include` loads `workers.tasks` when a worker starts.
"""

from __future__ import annotations

import logging

from celery import Celery, chord

from models.settings import Settings
from workers import backend

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


def _tls_options(url: str) -> dict[str, object] | None:
    """The TLS options of a rediss:// URL (its query string), as kombu parses them."""
    if not url.startswith("rediss://"):
        return None
    from kombu.utils.url import parse_url

    return parse_url(url).get("ssl") or None


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
        # rediss://...?ssl_cert_reqs=required&ssl_ca_certs=...: the broker connection takes the
        # URL's TLS options, and so does Flower, which reads only this setting
        broker_use_ssl=_tls_options(settings.broker_url),
        result_expires=RESULT_EXPIRES,
        result_extended=False,
        # Nothing reads a task's result or state: progress is in Postgres, and the chord's
        # callback gets the parts' results from the chord itself (the Redis backend keeps each
        # header task's return value in the chord's own keys, whether or not the task stores a
        # result). So no result is stored (a GET and a SETEX+PUBLISH each), nor a STARTED state.
        task_ignore_result=True,
        task_track_started=False,
        # Task events (received/started/succeeded, a PUBLISH each) only for those who watch them:
        # `s3ferry worker --task-events` (or S3FERRY_TASK_EVENTS=1) sends them from the start, and
        # Flower turns them on in every worker while it runs (`celery control enable_events`).
        worker_send_task_events=False,
        task_send_sent_event=False,
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


def recovered_queue(queue: str) -> str:
    """Where the recovery pass sends the parts it hands on: every part worker consumes it beside
    the parts queue, so those parts go next instead of behind every part still waiting."""
    return f"{queue}.recovered"


def send(name: str, *args: object) -> None:
    """Send task `name` (routed as configured: control tasks to the control queue)."""
    app.send_task(name, args=args)


def dispatch_chord(upload_id: str, part_numbers: list[int], recovered: bool = False) -> None:
    """One chord: s3ferry.upload_part(upload_id, n) for each part (on the recovered queue if
    `recovered`), then s3ferry.complete_upload(collected results, upload_id). Ids only in the messages."""
    options = {"queue": recovered_queue(app.conf.task_default_queue)} if recovered else {}
    header = [app.signature("s3ferry.upload_part", args=(upload_id, n), immutable=True, **options)
              for n in part_numbers]
    chord(header, app=app)(app.signature("s3ferry.complete_upload", args=(upload_id,)))
