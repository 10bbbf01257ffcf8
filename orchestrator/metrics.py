"""Prometheus metrics, read from the database on each scrape (`s3ferry metrics`).

The database is the source of truth for the whole fleet, so one exporter sees every
worker's work, whatever pool they run and however often they restart: no per-process
counters to aggregate. Totals only grow while upload rows are kept.
"""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from models.db import Database
from models.states import PartStatus, UploadStatus
from models.tables import Part, Upload

#: Part durations (claim to ETag recorded), seconds.
BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class DatabaseCollector(Collector):
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[object]:
        with self.db.transaction() as session:
            done_bytes, done_parts = session.execute(
                sa.select(sa.func.coalesce(sa.func.sum(Part.size), 0), sa.func.count())
                .where(Part.status == PartStatus.DONE)).one()
            failed_parts = session.scalar(sa.select(sa.func.count()).select_from(Part)
                                          .where(Part.status == PartStatus.FAILED)) or 0
            retries = session.scalar(sa.select(sa.func.coalesce(sa.func.sum(Upload.retry_count), 0))) or 0
            by_status = dict(session.execute(sa.select(Upload.status, sa.func.count()).group_by(Upload.status)).all())
            in_flight = session.scalar(sa.select(sa.func.count()).select_from(Part)
                                       .where(Part.status == PartStatus.IN_FLIGHT)) or 0
            seconds = _seconds(session.get_bind().dialect.name)
            timed = sa.and_(Part.status == PartStatus.DONE, Part.started_at.is_not(None),
                            Part.finished_at.is_not(None))
            counts = session.execute(sa.select(*[sa.func.count().filter(seconds <= bound) for bound in BUCKETS],
                                               sa.func.count(), sa.func.coalesce(sa.func.sum(seconds), 0))
                                     .where(timed)).one()
        yield CounterMetricFamily("s3ferry_uploaded_bytes", "Bytes of parts that landed in S3 (recorded ETag).",
                                  value=int(done_bytes))
        parts = CounterMetricFamily("s3ferry_parts", "Parts by final outcome.", labels=["outcome"])
        parts.add_metric(["done"], int(done_parts))
        parts.add_metric(["failed"], int(failed_parts))
        yield parts
        yield CounterMetricFamily("s3ferry_part_retries", "Counted part retries (transient S3 errors).",
                                  value=int(retries))
        uploads = GaugeMetricFamily("s3ferry_uploads", "Uploads by status.", labels=["status"])
        for status in UploadStatus:
            uploads.add_metric([status.value], int(by_status.get(status, 0)))
        yield uploads
        yield GaugeMetricFamily("s3ferry_parts_in_flight", "Parts claimed by a worker right now.", value=in_flight)
        *cumulative, total, total_seconds = counts
        histogram = HistogramMetricFamily("s3ferry_part_duration_seconds",
                                          "Time from a part's claim to its recorded ETag.")
        histogram.add_metric([], [(str(b), int(c)) for b, c in zip(BUCKETS, cumulative, strict=True)]
                             + [("+Inf", int(total))], sum_value=float(total_seconds))
        yield histogram


class WindowCollector(Collector):
    """The AIMD window of every destination, read from Redis on each scrape."""

    def __init__(self, client: object) -> None:
        self.client = client

    def collect(self) -> Iterator[object]:
        from workers import window

        size = GaugeMetricFamily("s3ferry_window", "Parts allowed in flight to a destination (AIMD window).",
                                 labels=["destination"])
        in_flight = GaugeMetricFamily("s3ferry_window_in_flight", "Parts holding a slot of the window now.",
                                      labels=["destination"])
        up = GaugeMetricFamily("s3ferry_window_redis_up", "1 if the windows could be read from Redis.")
        try:
            states = window.all_states(self.client)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - the database metrics still count
            up.add_metric([], 0)
            yield up
            return
        for destination, state in sorted(states.items()):
            size.add_metric([destination], state.window)
            in_flight.add_metric([destination], state.in_flight)
        up.add_metric([], 1)
        yield size
        yield in_flight
        yield up


def _seconds(dialect: str) -> sa.ColumnElement[float]:
    if dialect == "postgresql":
        return sa.func.extract("epoch", Part.finished_at - Part.started_at)
    return (sa.func.julianday(Part.finished_at) - sa.func.julianday(Part.started_at)) * 86400.0


def serve(db: Database, port: int, address: str, window_redis: object | None = None) -> None:
    """Serve /metrics until interrupted."""
    import time

    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(DatabaseCollector(db))
    if window_redis is not None:
        registry.register(WindowCollector(window_redis))
    start_http_server(port, addr=address, registry=registry)
    while True:
        time.sleep(3600)

