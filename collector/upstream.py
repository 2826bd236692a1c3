"""The upstream pointer: what CI published at the upstream URL, fetched conditionally and
validated. Speaking HTTP is collector/http.py's; this module says which request to make
(the upstream options, the validators of the last 200) and what the body means."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from . import http
from .config import Settings
from .errors import UpstreamError
from .store import StorePath


@dataclass(frozen=True)
class Validators:
    """What the last 200 said, for a conditional GET of the very URL that gave it."""

    etag: str | None
    last_modified: str | None
    url: str  # digest() of the URL that answered them (after redirects)


@dataclass(frozen=True)
class Fetched:
    body: bytes | None  # None: 304, the last upstream still holds
    etag: str | None
    last_modified: str | None
    url: str  # digest() of the URL that answered 200 (or 304)
    shown_url: str = ""  # the URL that answered, for messages


def digest(url: str) -> str:
    """What identifies a URL in state files: the whole URL (query, credentials and all,
    since any of them may select a different system) without storing it."""
    return hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()


def parse_body(body: bytes, url: str) -> StorePath:
    """What upstream's body means. The original tool's format: one store path line,
    surrounding whitespace ignored. `url` is the one that answered, for messages."""

    def reject(what: str) -> UpstreamError:
        return UpstreamError(f"upstream {http.shown(url)} gave {what}")

    if b"\0" in body:
        raise reject("a body containing a NUL byte")
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise reject("a body that is not UTF-8 text") from None
    if not text:
        raise reject("an empty body")
    if text.startswith("<") or "<html" in text.lower():
        raise reject("HTML, not a store path")
    if "\n" in text or "\r" in text:
        raise reject("more than one line; expected one store path")
    try:
        return StorePath.parse(text)
    except ValueError as e:
        raise reject(f"an invalid store path: {e}") from None


def bundle_dir(url: str) -> str | None:
    """An offline bundle's directory: `file:///DIR/release.json` is a release whose
    systems come from the binary cache DIR/cache."""
    if not url.startswith("file:"):
        return None  # an invalid URL too: the HTTP door says what is wrong with it
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise UpstreamError(f"upstream {url[:80]} is not a valid URL: {e}") from None
    if parts.netloc not in ("", "localhost"):
        raise UpstreamError(f"upstream {url[:80]}: a file URL names a local file (file:///DIR)")
    return os.path.dirname(unquote(parts.path)) or "/"


def _read_file(url: str, cached: Validators | None) -> Fetched:
    """A local file as upstream (an offline bundle): its size and mtime are its validator,
    so an unchanged file is an unchanged answer, as a 304 is."""
    path = unquote(urlsplit(url).path)
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            tag = f'"{stat.st_size}-{stat.st_mtime_ns}"'
            if cached is not None and cached.url == digest(url) and cached.etag == tag:
                return Fetched(None, tag, None, cached.url, url)
            body = f.read(http.MAX_BODY + 1)
    except OSError as e:
        raise UpstreamError(f"cannot read upstream {url}: {e.strerror}") from None
    if len(body) > http.MAX_BODY:
        raise UpstreamError(f"upstream {url} is larger than {http.MAX_BODY // 1024} KiB")
    return Fetched(body, tag, None, digest(url), url)


def fetch(
    settings: Settings, cached: Validators | None, session: http.Session | None = None
) -> Fetched:
    """GET the upstream URL with the upstream options (--timeout, credentials, --header,
    --ca-file), conditionally when `cached` holds validators; with a session, over its
    kept-alive connection. A file:// URL is read from the local file system."""
    assert settings.url is not None
    if bundle_dir(settings.url) is not None:
        return _read_file(settings.url, cached)

    def validators(url: str) -> dict[str, str]:
        # The validators go only to the URL that gave them: a redirect elsewhere (an
        # older build, another host's system) is not what they describe.
        if cached is None or cached.url != digest(url):
            return {}
        headers: dict[str, str] = {}
        if cached.etag:
            headers["If-None-Match"] = cached.etag
        if cached.last_modified:
            headers["If-Modified-Since"] = cached.last_modified
        return headers

    credentials = http.Credentials(
        bearer_token_file=settings.bearer_token_file,
        netrc_file=settings.netrc_file,
        headers=settings.headers,
    )
    answer = http.get(settings, settings.url, credentials, validators=validators, session=session)
    if answer.status == 304:
        assert cached is not None  # http.get takes a 304 only in answer to validators
        return Fetched(None, cached.etag, cached.last_modified, cached.url, answer.url)
    return Fetched(
        body=answer.body,
        etag=answer.etag,
        last_modified=answer.last_modified,
        url=digest(answer.url),
        shown_url=answer.url,
    )
