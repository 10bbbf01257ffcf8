from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import crc32c
import pytest

from workers import reader


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * 1024 * 1024 + 7)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return path, data


def test_reads_exactly_its_range(source: tuple[Path, bytes]) -> None:
    path, data = source
    with reader.RangeReader(path, 1000, 2 * 1024 * 1024) as body:
        assert len(body) == 2 * 1024 * 1024
        chunks = []
        while chunk := body.read(8192):
            chunks.append(chunk)
        assert b"".join(chunks) == data[1000:1000 + 2 * 1024 * 1024]
        assert body.read() == b""
        assert body.tell() == len(body)


def test_seeks_within_the_range(source: tuple[Path, bytes]) -> None:
    path, data = source
    with reader.RangeReader(path, 10, 100) as body:
        assert body.seek(0, io.SEEK_END) == 100
        assert body.seek(-10, io.SEEK_END) == 90
        assert body.read() == data[100:110]
        body.seek(5)
        assert body.read(3) == data[15:18]
        assert body.seek(500) == 100  # clamped to the end
        with pytest.raises(ValueError):
            body.seek(-1)


def test_readinto_never_passes_the_end(source: tuple[Path, bytes]) -> None:
    path, data = source
    buffer = bytearray(64)
    with reader.RangeReader(path, len(data) - 20, 20) as body:
        assert body.readinto(buffer) == 20
        assert bytes(buffer[:20]) == data[-20:]
        assert body.readinto(buffer) == 0


def test_a_file_shorter_than_the_range_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"abc")
    with reader.RangeReader(path, 0, 10) as body:
        assert body.read(3) == b"abc"
        with pytest.raises(OSError, match="source ended early"):
            body.read(1)


def test_crc32c_matches_the_whole_range_and_rewinds(source: tuple[Path, bytes]) -> None:
    path, data = source
    with reader.RangeReader(path, 7, 3 * 1024 * 1024) as body:
        checksum = reader.crc32c_of(body)
        assert body.tell() == 0
    expected = crc32c.crc32c(data[7:7 + 3 * 1024 * 1024]).to_bytes(4, "big")
    assert checksum == base64.b64encode(expected).decode()


def test_crc32c_of_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with reader.RangeReader(path, 0, 0) as body:
        assert reader.crc32c_of(body) == "AAAAAA=="


def test_check_unchanged(source: tuple[Path, bytes]) -> None:
    path, data = source
    info = path.stat()
    reader.check_unchanged(str(path), info.st_size, info.st_mtime_ns, info.st_ino)
    with pytest.raises(reader.SourceChanged, match="mtime_ns"):
        reader.check_unchanged(str(path), info.st_size, info.st_mtime_ns + 1, info.st_ino)
    path.unlink()
    with pytest.raises(reader.SourceChanged, match="no longer exists"):
        reader.check_unchanged(str(path), info.st_size, info.st_mtime_ns, info.st_ino)


def test_path_from_uri(tmp_path: Path) -> None:
    path = tmp_path / "a b%.bin"
    assert reader.path_from_uri(path.as_uri()) == str(path)
    with pytest.raises(reader.SourceChanged, match="only file://"):
        reader.path_from_uri("https://example.com/x")
