"""URL redaction and the API-key transport rule (pipelines/security.py)."""

from __future__ import annotations

import pytest

from pipelines.errors import UsageError
from pipelines.security import check_api_key_transport, is_loopback, redact_text, redact_url


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://user:pw@qdrant:6333", "http://***@qdrant:6333"),
        ("https://token@qdrant.example.com/prefix", "https://***@qdrant.example.com/prefix"),
        ("http://a:b@[::1]:6333", "http://***@[::1]:6333"),
        ("https://qdrant:6333?api_key=k1&timeout=5", "https://qdrant:6333?api_key=***&timeout=5"),
        ("https://qdrant:6333/?X-Api-Token=t", "https://qdrant:6333/?X-Api-Token=***"),
        ("http://qdrant:6333", "http://qdrant:6333"),
        ("local:/data/qdrant", "local:/data/qdrant"),
        (None, None),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_url_keeps_a_password_with_an_at_sign_out():
    assert redact_url("http://u:p@ss@host:1") == "http://***@host:1"


@pytest.mark.parametrize(
    "host, loopback",
    [("localhost", True), ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
     ("10.0.0.1", False), ("qdrant", False), ("localhost.example.com", False), (None, False)],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "url, allow",
    [("https://qdrant.example:6333", False), ("http://localhost:6333", False), ("http://127.0.0.1:6333", False),
     ("http://[::1]:6333", False), ("http://10.0.0.5:6333", True), ("qdrant.example:6333", True)],
)
def test_api_key_transport_allowed(url, allow):
    check_api_key_transport(url, "KEY", allow_insecure=allow)
    check_api_key_transport(url, None)  # no key: nothing to protect


@pytest.mark.parametrize("url", ["http://10.0.0.5:6333", "http://qdrant:6333", "qdrant.example:6333",
                                 "http://u:secret@qdrant:6333"])
def test_api_key_over_plain_http_to_another_host_is_refused(url):
    with pytest.raises(UsageError, match="would send the API key unencrypted") as info:
        check_api_key_transport(url, "KEY")
    assert "secret" not in str(info.value)
    assert info.value.exit_status == 2


def test_redact_text_removes_user_info_from_every_url_in_a_message():
    text = "GET 'http://u:pw@h:6333/collections' failed; retry https://tok@h2/x or see http://docs.example/y"
    assert redact_text(text) == (
        "GET 'http://***@h:6333/collections' failed; retry https://***@h2/x or see http://docs.example/y"
    )
