"""What a redis:// or rediss:// state store URL names: server, database, credentials and,
over TLS, the files that verify the server and identify the client."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from coordinator.store.interface import ACCEPTED_URLS, StoreError


@dataclass(frozen=True)
class RedisTls:
    """Files a rediss:// URL names: the CA that signed the server, the client's own pair."""

    ca: str | None
    cert: str | None
    key: str | None


@dataclass(frozen=True)
class RedisTarget:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: RedisTls | None  # None: plain redis://


TLS_OPTIONS = ("ca", "cert", "key")


def parse_redis_url(url: str) -> RedisTarget:
    """What a redis:// or rediss:// URL names; StoreError naming the wrong part."""
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as exc:
        raise StoreError(f"bad Redis URL ({exc}); expected {ACCEPTED_URLS}") from exc
    path = parts.path.strip("/") or "0"
    if parts.fragment or not path.isdigit():
        # The URL may hold a password: name only the part that is wrong.
        raise StoreError(
            f"bad Redis URL: database {path!r} is not a number; expected {ACCEPTED_URLS}"
        )
    tls = None
    if parts.scheme == "rediss":
        try:
            options = parse_qs(
                parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)
            )
        except ValueError:
            raise StoreError(f"bad Redis URL: options {parts.query!r} cannot be read") from None
        unknown = sorted(set(options) - set(TLS_OPTIONS))
        if unknown or any(len(v) != 1 or not v[0] for v in options.values()):
            raise StoreError(
                f"bad Redis URL: options may be {', '.join(TLS_OPTIONS)}, once each with a "
                f"file path; got {', '.join(unknown) or parts.query!r}"
            )
        files = {k: v[0] for k, v in options.items()}
        if ("cert" in files) != ("key" in files):
            raise StoreError("bad Redis URL: a client certificate needs both cert= and key=")
        for name, path_text in files.items():
            if not Path(path_text).is_file():
                raise StoreError(f"bad Redis URL: {name}={path_text} is not a readable file")
        tls = RedisTls(files.get("ca"), files.get("cert"), files.get("key"))
    elif parts.query:
        raise StoreError(
            "bad Redis URL: options are only for TLS (rediss://); expected " + ACCEPTED_URLS
        )
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return RedisTarget(parts.hostname or "127.0.0.1", port, int(path), username, password, tls)
