"""Tests for fedge.transport: HttpTransport against a real local HTTP server, and LocalTransport."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from fedge.errors import ConfigError, ProtocolError, TransportError
from fedge.transport import LocalTransport, Request, Response
from fedge.transport.http import HttpTransport


class Handler(BaseHTTPRequestHandler):
    """Echoes requests as the routes below say; records what it received."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[str, str, dict[str, str], bytes]]] = []

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        self._serve(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def _serve(self, body: bytes) -> None:
        self.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        if self.path.endswith("/slow"):
            time.sleep(0.5)
        if self.path.endswith("/big"):
            self._reply(200, b"x" * 5000, {})
        elif self.path.endswith("/big-unsized"):  # no Content-Length: read until the server closes
            self.close_connection = True
            self._reply(200, b"x" * 5000, {"Connection": "close"}, sized=False)
        elif self.path.endswith("/refuse"):
            self._reply(409, b'{"error": "closed", "detail": "over"}', {"Content-Type": "application/json"})
        elif self.path.endswith("/broken"):
            self._reply(503, b"", {})
        else:
            self._reply(200, b"echo:" + body, {"ETag": '"abc"', "X-Custom": "Yes"})

    def _reply(self, status: int, body: bytes, headers: dict[str, str], *, sized: bool = True) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if sized:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # the client gave up first (the timeout test)
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Handler.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_get_and_post_round_trip(server: str) -> None:
    with HttpTransport(server, trust_env=False) as t:
        r = t.request("POST", "/v1/check-in", headers={"X-Fedge-Device": "gw-1"}, content=b"hi", timeout_s=5)
        assert r.status == 200 and r.body == b"echo:hi"
        assert r.headers["etag"] == '"abc"' and r.headers["x-custom"] == "Yes"
        assert all(k == k.lower() for k in r.headers)
        r = t.request("GET", "/v1/rounds/1/params", headers={"If-None-Match": '"x"'}, timeout_s=5)
        assert r.body == b"echo:"
    (method, path, headers, body), (method2, path2, headers2, _) = Handler.seen
    assert (method, path, body) == ("POST", "/v1/check-in", b"hi")
    assert headers["x-fedge-device"] == "gw-1" and headers["user-agent"].startswith("fedge-agent/")
    assert (method2, path2, headers2["if-none-match"]) == ("GET", "/v1/rounds/1/params", '"x"')


def test_base_url_path_prefix_is_kept(server: str) -> None:
    with HttpTransport(server + "/fedge", trust_env=False) as t:
        t.request("GET", "/v1/x", headers={}, timeout_s=5)
    assert Handler.seen[0][1] == "/fedge/v1/x"


def test_error_statuses_are_responses_not_exceptions(server: str) -> None:
    with HttpTransport(server, trust_env=False) as t:
        refused = t.request("POST", "/v1/refuse", headers={}, content=b"", timeout_s=5)
        broken = t.request("GET", "/v1/broken", headers={}, timeout_s=5)
    assert refused.status == 409 and refused.body == b'{"error": "closed", "detail": "over"}'
    assert refused.headers["content-type"] == "application/json"
    assert broken.status == 503 and broken.body == b""


def test_connection_refused_is_a_transport_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with HttpTransport(f"http://127.0.0.1:{port}", trust_env=False) as t, \
            pytest.raises(TransportError, match=r"^POST /v1/check-in: ConnectError \(.*\)$"):
        t.request("POST", "/v1/check-in", headers={}, content=b"{}", timeout_s=5)


def test_timeout_is_a_transport_error(server: str) -> None:
    with HttpTransport(server, trust_env=False) as t, pytest.raises(TransportError, match="ReadTimeout"):
        t.request("GET", "/v1/slow", headers={}, timeout_s=0.1)


def test_body_over_the_limit_is_refused(server: str) -> None:
    with HttpTransport(server, trust_env=False, max_body_bytes=4096) as t:
        for path, said in (("/v1/big", "response of 5000 bytes"), ("/v1/big-unsized", "response")):
            with pytest.raises(ProtocolError, match=f"{path}: {said} exceeds the limit of 4096") as info:
                t.request("GET", path, headers={}, timeout_s=5)
            assert info.value.reason == "too_large"
        assert t.request("GET", "/v1/ok", headers={}, timeout_s=5).status == 200  # still usable


def test_tls_settings_are_built_without_deprecated_httpx_arguments(tmp_path: Path) -> None:
    import certifi

    HttpTransport("https://127.0.0.1:1", verify=certifi.where()).close()  # DeprecationWarning fails here
    HttpTransport("https://127.0.0.1:1", verify=str(Path(certifi.where()).parent)).close()
    with pytest.raises(ConfigError, match="TLS setup failed"):
        HttpTransport("https://127.0.0.1:1", verify=str(tmp_path / "absent.pem"))
    with pytest.raises(ConfigError, match="TLS setup failed"):
        HttpTransport("https://127.0.0.1:1", verify=False, cert=str(tmp_path / "absent.pem"))


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        HttpTransport("http://127.0.0.1:1", max_body_bytes=0)
    with pytest.raises(ValueError, match="max_connections"):
        HttpTransport("http://127.0.0.1:1", max_connections=0)


def test_local_transport_routes_to_the_handler_with_lower_case_headers() -> None:
    seen: list[Request] = []

    def handler(req: Request) -> Response:
        seen.append(req)
        return Response(201, {"ETag": '"e"'}, b"ok")

    r = LocalTransport(handler).request("post", "/v1/x", headers={"X-Fedge-Device": "gw"}, content=b"b",
                                        timeout_s=1)
    assert r == Response(201, {"etag": '"e"'}, b"ok")
    assert seen == [Request("POST", "/v1/x", {"x-fedge-device": "gw"}, b"b")]


def test_local_transport_passes_transport_errors_through() -> None:
    def down(req: Request) -> Response:
        raise TransportError("down")

    with pytest.raises(TransportError, match="down"):
        LocalTransport(down).request("GET", "/", headers={}, timeout_s=1)
