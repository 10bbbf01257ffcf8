"""Sources: a local file, checked and fingerprinted (stat only; no byte is read here)."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

from models.exceptions import UserError


@dataclasses.dataclass(frozen=True)
class Source:
    """A file and its fingerprint: size, mtime, inode and ctime (a rewrite whose mtime was put back
    with `touch -r` still moves the ctime, which only the kernel sets). Not the device number: a
    network file system's differs between the hosts that mount it, and after a remount."""

    path: Path
    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int

    @property
    def uri(self) -> str:
        return self.path.as_uri()


def open_source(path_text: str) -> Source:
    """Check that `path_text` names a regular, readable file, and fingerprint it."""
    path = Path(path_text).expanduser()
    try:
        info = path.stat()
    except FileNotFoundError:
        raise UserError(f"source {path_text!r} does not exist") from None
    except OSError as error:
        raise UserError(f"source {path_text!r} cannot be read: {error.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"source {path_text!r} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"source {path_text!r} is not a regular file")
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as error:
        raise UserError(f"source {path_text!r} cannot be read: {error.strerror}") from None
    return Source(path.resolve(), info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns)
