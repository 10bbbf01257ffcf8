"""Integrity from file to object: the fingerprint's ctime, and the object checksum S3 reports.

The composite checksum is checked against a CRC32C written out here bit by bit (the
Castagnoli polynomial), not against the `crc32c` package the code uses.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from models.tables import Part
from orchestrator import source
from workers import completion, reader


def bitwise_crc32c(data: bytes) -> int:
    """CRC-32C, reflected polynomial 0x82F63B78, initial and final XOR 0xFFFFFFFF."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def b64(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def test_the_reference_crc32c_is_the_standard_one() -> None:
    assert bitwise_crc32c(b"123456789") == 0xE3069283  # the CRC catalogue's check value


def test_the_composite_checksum_is_the_crc32c_of_the_part_crc32cs_then_the_count() -> None:
    data = os.urandom(3000)
    pieces = [data[:1024], data[1024:2048], data[2048:]]
    per_part = [bitwise_crc32c(piece) for piece in pieces]
    expected = b64(bitwise_crc32c(b"".join(v.to_bytes(4, "big") for v in per_part))) + "-3"

    assert completion.composite_crc32c([b64(v) for v in per_part]) == expected
    # not the CRC32C of the whole object: a composite one says it is made of parts
    assert expected.split("-")[0] != b64(bitwise_crc32c(data))


def test_the_composite_depends_on_the_order_of_the_parts() -> None:
    first, second = b64(bitwise_crc32c(b"a")), b64(bitwise_crc32c(b"b"))
    assert completion.composite_crc32c([first, second]) != completion.composite_crc32c([second, first])


@pytest.mark.parametrize("bad", ["not base64!", base64.b64encode(b"12345").decode(), ""])
def test_a_checksum_that_is_not_a_crc32c_gives_no_composite(bad: str) -> None:
    assert completion.composite_crc32c([b64(1), bad]) is None


def parts_with(*checksums: str | None) -> list[Part]:
    return [Part(part_number=n, checksum=c) for n, c in enumerate(checksums, 1)]


def test_the_expected_checksum_of_one_part_is_its_own_and_of_many_the_composite() -> None:
    one, two = b64(bitwise_crc32c(b"one")), b64(bitwise_crc32c(b"two"))
    assert completion.expected_checksum(parts_with(one), multipart=False) == one
    assert completion.expected_checksum(parts_with(one, two), multipart=True) == completion.composite_crc32c(
        [one, two])
    assert completion.expected_checksum(parts_with(one, None), multipart=True) is None  # cannot be computed
    assert completion.expected_checksum([], multipart=True) is None


def test_s3s_report_matches_with_or_without_the_part_count() -> None:
    composite = completion.composite_crc32c([b64(1), b64(2), b64(3)])
    assert composite is not None and composite.endswith("-3")
    value = composite[:-2]
    assert completion.same_checksum(composite, composite)  # HeadObject / GetObject on S3
    assert completion.same_checksum(value, composite)  # GetObjectAttributes; moto's HeadObject
    assert not completion.same_checksum(value + "-4", composite)  # another number of parts
    assert not completion.same_checksum(b64(7) + "-3", composite)
    plain = b64(5)
    assert completion.same_checksum(plain, plain)
    assert not completion.same_checksum(plain + "-1", plain)  # a single PutObject reports a plain CRC32C
    assert not completion.same_checksum(b64(6), plain)


def rewrite_keeping_size_and_mtime(path: Path) -> None:
    """Rewrite the file in place with other bytes of the same size, and put its times back (`touch -r`)."""
    before = os.stat(path)
    with open(path, "r+b") as out:
        out.write(os.urandom(before.st_size))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_rewrite_with_its_mtime_put_back_is_seen_by_the_ctime(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(4096))
    src = source.open_source(str(path))
    fingerprint = (src.size, src.mtime_ns, src.inode)
    reader.check_unchanged(str(path), *fingerprint, src.ctime_ns)

    rewrite_keeping_size_and_mtime(path)
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == fingerprint  # all the old fingerprint had
    reader.check_unchanged(str(path), *fingerprint)  # an upload recorded before the ctime was taken
    with pytest.raises(reader.SourceChanged, match=r"changed since submit \(ctime_ns \d+ -> \d+\)$") as changed:
        reader.check_unchanged(str(path), *fingerprint, src.ctime_ns)
    assert "\n" not in str(changed.value)


def test_reading_a_file_does_not_move_its_ctime(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(4096))
    src = source.open_source(str(path))
    with reader.RangeReader(path, 0, 4096) as body:
        reader.digests_of(body)
    reader.check_unchanged(str(path), src.size, src.mtime_ns, src.inode, src.ctime_ns)
