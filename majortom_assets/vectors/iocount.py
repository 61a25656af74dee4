"""Open local paths and fsspec URLs (hf://, http(s)://, s3://, ...) for Parquet reads, counting bytes.

A point look-up is only worth having if it reads a small part of the store; `ByteCounter` makes
that measurable: every file opened through `open_input` is wrapped in a `CountingFile` that adds
the bytes actually handed to pyarrow to the counter, beside each file's size. Remote files are
opened without fsspec's read-ahead cache (``cache_type="none"``), so what is counted is what is
fetched: one ranged request per column chunk pyarrow asks for, plus the footer.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

_LOCAL_PROTOCOLS = {"file", "local"}


@dataclass
class ByteCounter:
    """Bytes read and read calls across all files opened with it; file sizes once per path."""

    bytes_read: int = 0
    reads: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n
            self.reads += 1

    @property
    def bytes_total(self) -> int:
        """Size of every file opened (each once)."""
        return sum(self.sizes.values())

    @property
    def fraction(self) -> float:
        return self.bytes_read / self.bytes_total if self.bytes_total else 0.0

    def summary(self) -> dict:
        return {"files": len(self.sizes), "bytes_read": self.bytes_read, "bytes_total": self.bytes_total,
                "fraction_read": round(self.fraction, 6), "reads": self.reads}


class CountingFile(io.RawIOBase):
    """A read-only, seekable binary file that reports every byte it returns to a `ByteCounter`."""

    def __init__(self, raw, counter: ByteCounter | None, size: int) -> None:
        super().__init__()
        self._raw, self._counter, self._size = raw, counter, size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def size(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n) if n is not None and n >= 0 else self._raw.read()
        if self._counter is not None:
            self._counter.add(len(data))
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


def is_url(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def filesystem(location: str | os.PathLike):
    """(fsspec filesystem, path within it) of a local path or URL."""
    import fsspec

    if not is_url(location):
        return fsspec.filesystem("file"), str(Path(location).resolve())
    from majortom_assets.remote import redact_url, with_timeouts

    protocol = str(location).split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(str(location), **with_timeouts(protocol))
    except (ImportError, ValueError) as exc:   # s3:// without s3fs, unknown protocol
        raise ValueError(f"cannot open {redact_url(str(location))}: {exc}") from None
    return fs, path


def open_input(location: str | os.PathLike, counter: ByteCounter | None = None) -> CountingFile:
    """One read handle on a local file or URL (connect/read timeouts of `remote.with_timeouts`);
    its size is recorded in ``counter`` under the URL without credentials."""
    from majortom_assets.remote import redact_text, redact_url

    shown = redact_url(str(location))
    fs, path = filesystem(location)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    try:
        if protocols & _LOCAL_PROTOCOLS:
            raw = open(path, "rb")  # noqa: SIM115 - owned by the CountingFile, closed with it
            size = os.fstat(raw.fileno()).st_size
        else:
            raw = fs.open(path, "rb", cache_type="none")
            size = int(getattr(raw, "size", None) or fs.size(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"embedding file {shown} does not exist") from None
    except OSError as exc:      # connection refused, timeouts, permissions: name the file
        raise ValueError(f"cannot open embedding file {shown}: {redact_text(exc)}") from None
    if counter is not None:
        counter.sizes[shown] = size
    return CountingFile(raw, counter, size)
