"""Remote sources, safely: credentials never shown or stored, and no read waits forever.

Collection URLs may carry secrets (``https://user:password@host/...``, pre-signed ``?X-Amz-Signature=``
or ``?token=`` query strings). Every place that shows or stores a URL — output files'
``source_collection``, error messages, Dagster metadata and logs — passes it through
``redact_url`` (one URL) or ``redact_text`` (any message that may quote one). The real URL is only
ever handed to the filesystem that opens it.

A server that accepts a connection and never answers must not hang an embedding run:
``with_timeouts`` adds connect and read timeouts to the storage options of the fsspec
filesystems we use remotely (HTTP, S3, GCS, Hugging Face), and ``call_with_retries`` bounds the
attempts of one read, ending in a ``RemoteTimeoutError`` that names the (redacted) URL.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

REDACTED = "***"
# Defaults; each can be set per deployment through the environment variable named beside it.
CONNECT_TIMEOUT_S = 10.0   # MAJORTOM_CONNECT_TIMEOUT_S
READ_TIMEOUT_S = 60.0      # MAJORTOM_READ_TIMEOUT_S
MAX_ATTEMPTS = 3           # MAJORTOM_REMOTE_ATTEMPTS
RETRY_BACKOFF_S = 1.0

# Query parameters whose values are secrets (case-insensitive, matched anywhere in the name):
# AWS/GCS/Azure pre-signed URLs, OAuth and API tokens, passwords.
_SECRET_PARAM = re.compile(
    r"token|sig|signature|secret|password|passwd|pwd|credential|key|auth|session|x-amz-|x-goog-",
    re.IGNORECASE,
)
# A URL inside free text: scheme://..., up to whitespace or a closing quote/bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")

T = TypeVar("T")


class RemoteTimeoutError(TimeoutError):
    """A remote read that did not answer within its timeouts after every retry."""


def _env_number(name: str, default: float, cast: type = float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = cast(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name}={text!r} must be positive")
    return value


def timeouts() -> tuple[float, float, int]:
    """(connect seconds, read seconds, attempts) in force: the defaults or the environment's."""
    return (_env_number("MAJORTOM_CONNECT_TIMEOUT_S", CONNECT_TIMEOUT_S),
            _env_number("MAJORTOM_READ_TIMEOUT_S", READ_TIMEOUT_S),
            int(_env_number("MAJORTOM_REMOTE_ATTEMPTS", MAX_ATTEMPTS, int)))


def redact_url(url: str) -> str:
    """``url`` without user info and with secret query values replaced by ``***``.

    Paths, hosts and harmless query parameters are kept, so the redacted URL still says which
    collection or file is meant. Strings that are not URLs (local paths) come back unchanged.
    """
    text = str(url)
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return _redact_loose(text)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{quote(k, safe='-_.~')}={REDACTED if _SECRET_PARAM.search(k) else quote(v, safe='-_.~/:')}"
            for k, v in pairs
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_loose(text: str) -> str:
    """Fallback for malformed URLs: drop anything between '://' and the last '@' before the path."""
    return re.sub(r"(://)[^/@\s]*@", rf"\1{REDACTED}@", text)


def redact_text(text: object) -> str:
    """A message with every URL in it redacted (exceptions from fsspec/aiohttp quote full URLs)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))


def with_timeouts(protocol: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Storage options for an fsspec filesystem of ``protocol`` with connect/read timeouts set.

    A user's own timeout settings win; only missing ones are added. Local and in-memory
    filesystems get nothing (they cannot stall on a network).
    """
    options = dict(storage_options or {})
    connect_s, read_s, attempts = timeouts()
    protocol = (protocol or "file").split("::")[0]
    if protocol in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=read_s))
        options["client_kwargs"] = client
    elif protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", connect_s)
        config.setdefault("read_timeout", read_s)
        config.setdefault("retries", {"max_attempts": attempts})
        options["config_kwargs"] = config
    elif protocol in ("gs", "gcs"):
        options.setdefault("timeout", read_s)
    return options


def is_timeout(exc: BaseException) -> bool:
    """True for the ways a stalled connection surfaces through fsspec, aiohttp, botocore and httpx."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TimeoutError):   # asyncio.TimeoutError and socket.timeout are aliases
            return True
        name = type(exc).__name__.lower()
        if "timeout" in name or "timedout" in name:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def call_with_retries(read: Callable[[], T], url: str, *, backoff_s: float = RETRY_BACKOFF_S,
                      what: str = "read") -> T:
    """``read()``, retried on timeouts up to ``attempts`` times with linear backoff.

    Other errors pass through at once (a missing file does not get better by waiting). After the
    last timeout a ``RemoteTimeoutError`` names the redacted URL and the limits, so a user can
    tell a stalled server from a slow one.
    """
    connect_s, read_s, attempts = timeouts()
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except Exception as exc:
            if not is_timeout(exc):
                raise
            last = exc
            if attempt < attempts:
                time.sleep(backoff_s * attempt)
    raise RemoteTimeoutError(
        f"{redact_url(url)}: {what} timed out {attempts} times (connect {connect_s:g} s, read "
        f"{read_s:g} s per attempt); the server accepts connections but does not answer — check "
        f"the URL and the server, then retry"
    ) from last
