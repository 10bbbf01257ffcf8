from __future__ import annotations

import pytest

from models.exceptions import UserError
from orchestrator import plan
from models.settings import GiB, MiB, TiB


def test_default_plan_cuts_32_mib_parts_with_a_short_last_one() -> None:
    p = plan.plan_parts(100 * MiB + 1)
    assert p.part_size == 32 * MiB and not p.adjusted
    assert [(s.number, s.offset, s.size) for s in p.parts] == [
        (1, 0, 32 * MiB), (2, 32 * MiB, 32 * MiB), (3, 64 * MiB, 32 * MiB), (4, 96 * MiB, 4 * MiB + 1)]


def test_parts_cover_the_file_exactly() -> None:
    size = 777 * MiB + 12345
    p = plan.plan_parts(size, 5 * MiB)
    assert sum(s.size for s in p.parts) == size
    assert all(a.offset + a.size == b.offset for a, b in zip(p.parts, p.parts[1:], strict=False))
    assert all(s.size == 5 * MiB for s in p.parts[:-1])


def test_an_empty_file_is_one_empty_part() -> None:
    p = plan.plan_parts(0)
    assert [(s.number, s.offset, s.size) for s in p.parts] == [(1, 0, 0)]


def test_exactly_one_part() -> None:
    assert len(plan.plan_parts(32 * MiB).parts) == 1
    assert len(plan.plan_parts(32 * MiB + 1).parts) == 2


def test_the_part_size_is_raised_to_stay_within_10000_parts() -> None:
    p = plan.plan_parts(1 * TiB, 32 * MiB)
    assert p.adjusted and p.requested_part_size == 32 * MiB
    assert len(p.parts) <= plan.MAX_PARTS
    assert p.part_size % MiB == 0 and p.part_size == 105 * MiB
    assert "raised from 32.0 MiB to 105.0 MiB" in p.describe_adjustment()


def test_the_largest_object_fits() -> None:
    p = plan.plan_parts(5 * TiB, 5 * MiB)
    assert len(p.parts) <= plan.MAX_PARTS and p.part_size <= plan.MAX_PART_SIZE
    assert sum(s.size for s in p.parts) == 5 * TiB


@pytest.mark.parametrize(("size", "part_size", "message"), [
    (1, 5 * MiB - 1, "under S3's minimum of 5 MiB"),
    (1, 5 * GiB + 1, "over S3's maximum of 5 GiB"),
    (5 * TiB + 1, 32 * MiB, "over S3's maximum object size of 5 TiB"),
])
def test_limits(size: int, part_size: int, message: str) -> None:
    with pytest.raises(UserError, match=message):
        plan.plan_parts(size, part_size)


def test_limits_at_the_edges_are_accepted() -> None:
    assert plan.plan_parts(10, 5 * MiB).part_size == 5 * MiB
    assert plan.plan_parts(10, 5 * GiB).part_size == 5 * GiB
