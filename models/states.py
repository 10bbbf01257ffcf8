"""Statuses of uploads and parts, and the moves allowed between them."""

from __future__ import annotations

import enum


class UploadStatus(enum.StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETING = "completing"
    COMPLETE = "complete"
    FAILED = "failed"
    PAUSED = "paused"
    CANCELLED = "cancelled"


class PartStatus(enum.StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    FAILED = "failed"


#: Statuses an upload never leaves.
UPLOAD_FINAL = frozenset({UploadStatus.COMPLETE, UploadStatus.CANCELLED})

#: Statuses in which an upload still has work to do or may get it again.
UPLOAD_ACTIVE = frozenset({UploadStatus.QUEUED, UploadStatus.IN_PROGRESS, UploadStatus.COMPLETING})

#: to-status -> the statuses it may be reached from.
UPLOAD_MOVES: dict[UploadStatus, frozenset[UploadStatus]] = {
    UploadStatus.IN_PROGRESS: frozenset({UploadStatus.QUEUED}),  # a resumed upload queues again first
    UploadStatus.COMPLETING: frozenset({UploadStatus.IN_PROGRESS}),
    UploadStatus.COMPLETE: frozenset({UploadStatus.COMPLETING}),
    UploadStatus.FAILED: frozenset({UploadStatus.QUEUED, UploadStatus.IN_PROGRESS, UploadStatus.COMPLETING}),
    UploadStatus.PAUSED: frozenset({UploadStatus.QUEUED, UploadStatus.IN_PROGRESS}),
    UploadStatus.QUEUED: frozenset({UploadStatus.PAUSED, UploadStatus.FAILED}),
    UploadStatus.CANCELLED: frozenset(
        {UploadStatus.QUEUED, UploadStatus.IN_PROGRESS, UploadStatus.PAUSED, UploadStatus.FAILED}
    ),
}

PART_MOVES: dict[PartStatus, frozenset[PartStatus]] = {
    # claim: a fresh part, a failed one being retried, or one whose lease expired
    PartStatus.IN_FLIGHT: frozenset({PartStatus.PENDING, PartStatus.FAILED, PartStatus.IN_FLIGHT}),
    # from in_flight: the holder recorded it; from pending/failed: S3 ListParts proved it landed
    PartStatus.DONE: frozenset({PartStatus.IN_FLIGHT, PartStatus.PENDING, PartStatus.FAILED}),
    PartStatus.PENDING: frozenset({PartStatus.IN_FLIGHT}),
    PartStatus.FAILED: frozenset({PartStatus.IN_FLIGHT}),
}
