"""The part plan: how one file is cut into parts within S3's multipart limits."""

from __future__ import annotations

import dataclasses
import logging

from models.exceptions import UserError
from models.settings import GiB, MiB, TiB, format_size
from models.transitions import PartSpec

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * MiB  # all parts but the last
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * TiB
DEFAULT_PART_SIZE = 32 * MiB


@dataclasses.dataclass(frozen=True)
class Plan:
    part_size: int
    parts: tuple[PartSpec, ...]
    #: the part size asked for, when it had to be raised to stay within 10,000 parts
    requested_part_size: int | None = None

    @property
    def adjusted(self) -> bool:
        return self.requested_part_size is not None

    def describe_adjustment(self) -> str:
        return (f"part size raised from {format_size(self.requested_part_size or 0)} to "
                f"{format_size(self.part_size)} to stay within S3's {MAX_PARTS:,} parts")


def check_part_size(part_size: int) -> None:
    if part_size < MIN_PART_SIZE:
        raise UserError(f"part size {format_size(part_size)} is under S3's minimum of 5 MiB")
    if part_size > MAX_PART_SIZE:
        raise UserError(f"part size {format_size(part_size)} is over S3's maximum of 5 GiB")


def check_object_size(size: int) -> None:
    if size > MAX_OBJECT_SIZE:
        raise UserError(f"the file is {format_size(size)}: over S3's maximum object size of 5 TiB")


def plan_parts(size: int, part_size: int = DEFAULT_PART_SIZE) -> Plan:
    """Cut `size` bytes into parts of `part_size` (the last one shorter).

    A 0-byte file is one empty part. A one-part plan is sent as a single PutObject. If the plan
    would exceed 10,000 parts, the part size is raised to the next MiB that fits.
    """
    check_part_size(part_size)
    check_object_size(size)
    requested = None
    if -(-size // part_size) > MAX_PARTS:
        requested = part_size
        part_size = -(-size // MAX_PARTS)
        part_size = -(-part_size // MiB) * MiB
        log.info("part size raised from %s to %s", format_size(requested), format_size(part_size))
    if size == 0:
        return Plan(part_size, (PartSpec(1, 0, 0),), requested)
    parts = tuple(
        PartSpec(number=i + 1, offset=offset, size=min(part_size, size - offset))
        for i, offset in enumerate(range(0, size, part_size))
    )
    return Plan(part_size, parts, requested)
