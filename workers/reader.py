"""Source readers: a bounded, seekable view of one byte range of a file, and its checksum.

A worker never holds a whole part: the sender (workers/sender.py) hands the range to the
kernel with os.sendfile (`RangeReader.sendfile`) or reads it into one reused buffer
(`readinto`); botocore, where it sends, reads it in small blocks. Each seeks back to its
start to send again.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import os
import select
import socket
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import crc32c

BLOCK = 1024 * 1024

#: os.sendfile errors that are the socket's (the link), not the source's.
SOCKET_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN, errno.ESHUTDOWN,
                           errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN})


class RangeReader(io.RawIOBase):
    """Bytes [offset, offset + size) of `path`, as a file of `size` bytes."""

    def __init__(self, path: str | os.PathLike[str], offset: int, size: int) -> None:
        super().__init__()
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self._offset = offset
        self._size = size
        self._pos = 0
        #: the last read error, kept: an HTTP library that sends the body may report it as a
        #: connection error, and a source that fails to read is not a congested link
        self.error: OSError | None = None

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        target = base + pos
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        self._pos = min(target, self._size)
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        view = memoryview(buffer).cast("B")[:want]
        try:
            got = os.preadv(self._file.fileno(), [view], self._offset + self._pos)
        except OSError as error:
            self.error = error
            raise
        if got == 0:
            self.error = OSError(f"source ended early: expected {self._size} bytes from offset {self._offset}")
            raise self.error
        self._pos += got
        return got

    def read(self, size: int = -1) -> bytes:
        remaining = self._size - self._pos
        size = remaining if size is None or size < 0 else min(size, remaining)
        if size <= 0:
            return b""
        try:
            data = os.pread(self._file.fileno(), size, self._offset + self._pos)
        except OSError as error:
            self.error = error
            raise
        if not data:
            self.error = OSError(f"source ended early: expected {self._size} bytes from offset {self._offset}")
            raise self.error
        self._pos += len(data)
        return data

    def sendfile(self, sock: socket.socket) -> int:
        """Send the rest of the range to a connected socket with os.sendfile, from the page cache
        to the socket without passing through Python; returns how many bytes were sent. Waits on
        the socket within its timeout (TimeoutError). The socket's errors are raised as they are;
        the source's (it ended early, or failed to read) are kept in `error` too, as `read` does."""
        source, target, timeout = self._file.fileno(), sock.fileno(), sock.gettimeout()
        poller = select.poll()
        poller.register(target, select.POLLOUT)
        start = self._pos
        while (left := self._size - self._pos) > 0:
            try:
                sent = os.sendfile(target, source, self._offset + self._pos, left)
            except BlockingIOError:  # the socket's buffer is full: wait for room
                if not poller.poll(None if timeout is None else timeout * 1000):
                    raise TimeoutError("timed out sending the body") from None
                continue
            except OSError as error:
                if error.errno not in SOCKET_ERRNOS:
                    self.error = error
                raise
            if sent == 0:  # the file ends before the range does
                self.error = OSError(f"source ended early: expected {self._size} bytes from offset {self._offset}")
                raise self.error
            self._pos += sent
        return self._pos - start

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def crc32c_of(reader: RangeReader) -> str:
    """Base64 CRC32C of the whole range (the form S3's ChecksumCRC32C takes); rewinds the reader."""
    reader.seek(0)
    value = 0
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    while n := reader.readinto(buffer):
        value = crc32c.crc32c(view[:n], value=value)
    reader.seek(0)
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def digests_of(reader: RangeReader) -> tuple[str, str]:
    """(hex MD5, base64 CRC32C) of the whole range in one pass: what S3 reports for a part."""
    reader.seek(0)
    md5 = hashlib.md5(usedforsecurity=False)
    value = 0
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    while n := reader.readinto(buffer):
        md5.update(view[:n])
        value = crc32c.crc32c(view[:n], value=value)
    reader.seek(0)
    return md5.hexdigest(), base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


class SourceChanged(Exception):
    """The source file changed since it was submitted."""


class SourceUnavailable(SourceChanged):
    """The source file is missing or unreadable here (deleted, or not mounted on this host)."""


def path_from_uri(uri: str) -> str:
    """`file:///data/a%20b.mp4` -> `/data/a b.mp4`."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise SourceChanged(f"unsupported source {uri!r}: only file:// sources can be read")
    return url2pathname(unquote(parsed.path))


def check_unchanged(path: str, size: int, mtime_ns: int, inode: int, ctime_ns: int | None = None) -> None:
    """Raise SourceChanged unless the file still has the fingerprint taken at submit.

    The ctime catches a rewrite whose size stayed and whose mtime was put back (`touch -r`):
    only the kernel sets it. `ctime_ns` None (an upload recorded before it was taken): not checked.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise SourceUnavailable(f"source {path} no longer exists") from None
    except OSError as error:
        raise SourceUnavailable(f"source {path} cannot be read: {error.strerror}") from None
    fingerprint = [("size", size, info.st_size), ("mtime_ns", mtime_ns, info.st_mtime_ns),
                   ("inode", inode, info.st_ino)]
    if ctime_ns is not None:
        fingerprint.append(("ctime_ns", ctime_ns, info.st_ctime_ns))
    changes = [f"{name} {before} -> {after}" for name, before, after in fingerprint if before != after]
    if changes:
        raise SourceChanged(f"source {path} changed since submit ({', '.join(changes)})")


def has_content(path: str) -> bool:
    """Whether a file that reports a size of 0 yields bytes when read (/proc files do)."""
    try:
        with open(path, "rb", buffering=0) as file:
            return bool(file.read(1))
    except OSError:
        return False
