"""Malformed HTTP that uvicorn refuses before the app runs still gets the JSON error shape,
over a real socket to a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from service.app import create_app
from service.protocol import JsonErrorH11Protocol
from tests.service.conftest import ServiceEnv
from tests.service.helpers import FakeEncoder


@pytest.fixture(scope="module")
def server_port(shared_env: ServiceEnv) -> Iterator[int]:
    encoder = shared_env.encoder
    app = create_app(shared_env.settings(), load_encoder=lambda s: encoder)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, http=JsonErrorH11Protocol, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield int(server.servers[0].sockets[0].getsockname()[1])
    server.should_exit = True
    thread.join(timeout=15)


def _exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; the status, headers and body of the response (read to close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, value in (line.split(":", 1) for line in header_lines)
    }
    return int(status_line.split()[1]), headers, body


def _error(status: int, headers: dict[str, str], body: bytes) -> dict[str, object]:
    assert headers["content-type"] == "application/json", (status, headers, body)
    assert int(headers["content-length"]) == len(body)
    parsed = json.loads(body)
    assert set(parsed) == {"error"} and set(parsed["error"]) == {"code", "message", "details"}
    return dict(parsed["error"])


def test_a_well_formed_request_is_answered_by_the_app(server_port: int) -> None:
    status, _, body = _exchange(
        server_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_a_url_over_the_limit_is_a_json_414(server_port: int) -> None:
    # h11 refuses a request line it has buffered 16 KiB of without reaching its end (the start
    # of a 1 MB URL); a whole request of that size in one read is parsed and answered.
    status, headers, body = _exchange(server_port, b"GET /search/images?q=" + b"a" * 20_000)
    assert status == 414
    error = _error(status, headers, body)
    assert error["code"] == "uri_too_long" and "16384 bytes" in str(error["message"])


def test_headers_over_the_limit_are_a_json_431(server_port: int) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000
    status, headers, body = _exchange(server_port, request)
    assert status == 431
    assert _error(status, headers, body)["code"] == "request_header_fields_too_large"


def test_a_negative_content_length_is_a_json_400(server_port: int) -> None:
    request = b"POST /search/images HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"
    status, headers, body = _exchange(server_port, request)
    assert status == 400
    error = _error(status, headers, body)
    assert error["code"] == "bad_request" and "Content-Length" in str(error["message"])


def test_the_cli_serves_with_this_protocol(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import service.__main__ as cli

    configs: list[uvicorn.Config] = []

    class NoServer:
        started = True

        def __init__(self, config: uvicorn.Config) -> None:
            configs.append(config)

        def run(self) -> None:
            pass

    monkeypatch.setattr(cli.uvicorn, "Server", NoServer)
    monkeypatch.setattr(cli, "load_model", lambda settings: FakeEncoder())
    assert cli.main(["--model-dir", str(tmp_path), "--index-root", str(tmp_path)]) == 0
    assert configs[0].http is JsonErrorH11Protocol
