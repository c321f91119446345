"""Image URLs reach public addresses only: an allow-listed name that resolves to an internal address is refused, a
literal internal address too, unless `allow_internal_image_hosts` is set; the connection goes to the address that
was checked (one resolution), with the name kept in the Host header (and as the TLS server name)."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from server.errors import APIError
from server.images import ImageLimits, fetch_image_bytes, pinned_request
from server.intake import ImageURL
from server.settings import Settings
from server.url_safety import internal_kind
from tests.support.images import png_bytes

LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20)
NAME = "images.example"  # resolved by the monkeypatched resolver below, never by DNS


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata services
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not globally reachable"),  # carrier-grade NAT
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
    ],
)
def test_internal_addresses_are_named(address: str, kind: str) -> None:
    assert internal_kind(address) == kind


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert internal_kind(address) is None


@dataclass
class Hits:
    hosts: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def internal_server() -> Iterator[tuple[int, Hits]]:
    """A loopback HTTP server standing for an internal service: it records every request's Host header."""
    payload = png_bytes(5)
    hits = Hits()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            hits.hosts.append(self.headers.get("Host", ""))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], hits
    httpd.shutdown()


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """NAME -> the addresses set by the test; every lookup of it is counted under "lookups"."""
    answers: dict[str, list[str]] = {NAME: ["127.0.0.1"], "lookups": []}
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == NAME:
            answers["lookups"].append(host)
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers[NAME]
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return answers


def _fetch(url: str, allowed: list[str], allow_internal: bool = False) -> bytes:
    return asyncio.run(fetch_image_bytes(url, LIMITS, allowed, 5.0, "image_url", allow_internal))


def test_a_listed_name_resolving_to_loopback_is_refused(
    internal_server: tuple[int, Hits], resolver: dict[str, list[str]]
) -> None:
    port, hits = internal_server
    before = len(hits.hosts)
    with pytest.raises(APIError) as err:
        _fetch(f"http://{NAME}:{port}/internal.png", [f"{NAME}:{port}"])
    assert err.value.status == 400 and err.value.code == "image_url_forbidden"
    assert "127.0.0.1" in err.value.message and "loopback" in err.value.message
    assert len(hits.hosts) == before  # the internal service was not reached


def test_a_name_with_one_internal_answer_among_public_ones_is_refused(
    internal_server: tuple[int, Hits], resolver: dict[str, list[str]]
) -> None:
    port, hits = internal_server
    resolver[NAME] = ["93.184.216.34", "169.254.169.254"]
    before = len(hits.hosts)
    with pytest.raises(APIError) as err:
        _fetch(f"http://{NAME}:{port}/x.png", [NAME])
    assert err.value.code == "image_url_forbidden" and "169.254.169.254" in err.value.message
    assert len(hits.hosts) == before


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]", "localhost"])
def test_literal_and_local_internal_hosts_are_refused(internal_server: tuple[int, Hits], host: str) -> None:
    port, hits = internal_server
    before = len(hits.hosts)
    with pytest.raises(APIError) as err:
        _fetch(f"http://{host}:{port}/x.png", [f"{host.strip('[]')}:{port}", f"{host}:{port}"])
    assert err.value.code == "image_url_forbidden"
    assert len(hits.hosts) == before


def test_allow_internal_connects_to_the_checked_address_with_the_name_as_host(
    internal_server: tuple[int, Hits], resolver: dict[str, list[str]]
) -> None:
    port, hits = internal_server
    data = _fetch(f"http://{NAME}:{port}/ok.png", [f"{NAME}:{port}"], allow_internal=True)
    assert data == png_bytes(5)
    assert hits.hosts[-1] == f"{NAME}:{port}"  # the Host header keeps the name
    assert resolver["lookups"] == [NAME]  # resolved once: the connection used the checked address


def test_https_keeps_the_name_for_tls(resolver: dict[str, list[str]]) -> None:
    resolver[NAME] = ["93.184.216.34"]
    target, headers, extensions = asyncio.run(pinned_request(f"https://{NAME}/a.png?x=1", False, "image_url"))
    assert str(target) == "https://93.184.216.34/a.png?x=1"
    assert headers == {"Host": NAME}
    assert extensions == {"sni_hostname": NAME}  # certificate checked against the name, not the address


def test_the_setting_reaches_the_fetch(internal_server: tuple[int, Hits], resolver: dict[str, list[str]]) -> None:
    port, _ = internal_server
    url = ImageURL(f"http://{NAME}:{port}/x.png", "messages.0.content.0.image_url")
    listed = dict(allowed_image_hosts=[f"{NAME}:{port}"], max_image_pixels=1 << 20)
    with pytest.raises(APIError) as err:
        asyncio.run(url.load(Settings(**listed)))  # type: ignore[arg-type]
    assert err.value.code == "image_url_forbidden" and err.value.param == url.param
    image = asyncio.run(url.load(Settings(**listed, allow_internal_image_hosts=True)))  # type: ignore[arg-type]
    assert image.size == (48, 40)
