"""URL redaction and the rule for sending a Qdrant API key. Standard library only (the CLI imports it before parsing).

- ``redact_url`` is the one function every print, log line, summary and manifest uses for a URL:
  credentials written in it (``http://user:pw@host``, ``?api_key=...``) never reach a terminal or a file.
- ``check_api_key_transport``: an API key travels only over https, or to this machine (loopback),
  unless ``--allow-insecure-api-key`` says otherwise; qdrant-client itself only warns.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pipelines.errors import UsageError

REDACTED = "***"
# Query parameters whose values are secrets whatever the server calls them.
_SECRET_PARAMS = ("key", "token", "secret", "password", "passwd", "pwd", "auth", "credential", "signature")


def redact_url(url: str | None) -> str | None:
    """``url`` with its user info and secret-looking query values replaced by ``***``.

    ``http://user:pw@host:6333/x?api_key=k&a=1`` -> ``http://***@host:6333/x?api_key=***&a=1``.
    The whole user info goes, not just the password: a token is often passed as the user name.
    """
    if not url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:  # unparseable (e.g. a bad IPv6 literal): show nothing that could be a secret
        return REDACTED
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if _is_secret(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@'\"]+@")


def redact_text(text: str) -> str:
    """``text`` with the user info of every URL in it replaced: for messages and tracebacks from libraries."""
    return _URL_USERINFO.sub(lambda m: m["scheme"] + REDACTED + "@", text)


def _is_secret(name: str) -> bool:
    name = name.lower().replace("-", "_")
    return any(s in name for s in _SECRET_PARAMS)


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is this machine: ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_key_transport(url: str | None, api_key_env: str | None, allow_insecure: bool = False) -> None:
    """Refuse to send an API key in clear text over the network.

    Raises ``UsageError`` when ``api_key_env`` is given with a URL that is neither ``https://`` nor
    a loopback host, unless ``allow_insecure`` (``--allow-insecure-api-key``).
    """
    if not url or not api_key_env or allow_insecure:
        return
    parts = urlsplit(url if "://" in url else "http://" + url)  # qdrant-client reads a bare host as http
    if parts.scheme.lower() == "https" or is_loopback(parts.hostname):
        return
    raise UsageError(
        f"--qdrant-api-key-env {api_key_env} would send the API key unencrypted to {redact_url(url)}; "
        "use an https:// URL, or pass --allow-insecure-api-key if the network is trusted"
    )


def check_qdrant_flags(args: argparse.Namespace) -> None:
    """The Qdrant flags' pre-flight checks that need no network: key transport, and the key variable is set."""
    url = getattr(args, "qdrant_url", None)
    key_env = getattr(args, "qdrant_api_key_env", None)
    if key_env and not url:
        raise UsageError("--qdrant-api-key-env only applies with --qdrant-url")
    check_api_key_transport(url, key_env, getattr(args, "allow_insecure_api_key", False))
    if key_env and not (os.environ.get(key_env) or "").strip():  # as QdrantConfig reads it: whitespace is no key
        raise UsageError(f"--qdrant-api-key-env {key_env}: the environment variable {key_env} is not set")
