"""Slow and idle clients cannot lock others out (app/protocol.py, app/multipart.py).

Connections, against a real uvicorn server built by app/server.py's make_config (in a thread,
with both HTTP protocol implementations uvicorn can pick): a connection that does not complete
its request headers within header_timeout_s is closed, however it trickles them; one over
max_connections is answered 503 and closed at once, and the refusals are logged once, not per
connection; keep-alive clients are unaffected.

Uploads, through the app itself: a body that fits in upload_preread_bytes needs no upload slot,
so a client trickling its body holds none; a request holding a slot whose body comes slower than
min_upload_rate gets 408 and the next request waiting gets the slot.
"""

from __future__ import annotations

import asyncio
import logging
import select
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from app.main import create_app
from app.protocol import GuardedH11Protocol, GuardedHttpToolsProtocol
from app.server import make_config
from tests.app.conftest import image_bytes, make_settings

HEADER_TIMEOUT_S = 0.5
MAX_CONNECTIONS = 3
MARGIN_S = 5.0  # how much later than its deadline a close may come on a busy machine
PROTOCOLS = [
    pytest.param(GuardedH11Protocol, id="h11"),
    pytest.param(GuardedHttpToolsProtocol, id="httptools",
                 marks=pytest.mark.skipif(GuardedHttpToolsProtocol is None, reason="httptools is not installed")),
]


@dataclass
class LiveServer:
    server: uvicorn.Server
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=MARGIN_S)

    def connections(self) -> set:
        """uvicorn's open connections (protocol instances), as the server counts them."""
        return self.server.server_state.connections


@pytest.fixture(scope="module")
def vae_weights(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the tiny MLP VAE: the quickest start-up."""
    d = tmp_path_factory.mktemp("vae-only")
    shutil.copy(weights_dir / "vae.safetensors", d)
    return d


@contextmanager
def live_server(weights: Path, http: type, **overrides: object) -> Iterator[LiveServer]:
    """The app under uvicorn, configured as `python -m app` configures it, in a thread on a free port."""
    settings = make_settings(weights, header_timeout_s=HEADER_TIMEOUT_S, max_connections=MAX_CONNECTIONS, **overrides)
    config = make_config(create_app(settings), settings, http=http, log_config=None, log_level="warning")
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "the server did not start"
        time.sleep(0.02)
    try:
        yield LiveServer(server, *sock.getsockname())
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module", params=PROTOCOLS)
def live(request: pytest.FixtureRequest, vae_weights: Path) -> Iterator[LiveServer]:
    with live_server(vae_weights, request.param) as server:
        yield server


def wait_closed(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the peer closes `sock` within timeout_s (reading and dropping anything it sends)."""
    end = time.monotonic() + timeout_s
    while (left := end - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if readable:
            try:
                if not sock.recv(4096):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
    return False


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.01)


def test_a_connection_without_complete_headers_is_closed(live: LiveServer) -> None:
    with live.connect() as silent, live.connect() as partial:
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n")  # no blank line: the headers never end
        assert wait_closed(partial, HEADER_TIMEOUT_S + MARGIN_S), "a partial request stayed open"
        assert wait_closed(silent, HEADER_TIMEOUT_S + MARGIN_S), "a connection that sent nothing stayed open"


def test_trickled_header_bytes_do_not_extend_the_deadline(live: LiveServer) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: test\r\nX-Pad: " + b"a" * 10_000  # longer than the trickle lasts
    end = time.monotonic() + HEADER_TIMEOUT_S + MARGIN_S
    closed = False
    with live.connect() as sock:
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
            if wait_closed(sock, 0.05) or time.monotonic() > end:
                closed = time.monotonic() <= end
                break
    assert closed, "a connection trickling its headers one byte at a time was not closed"


def test_a_keep_alive_client_is_served_across_requests(live: LiveServer) -> None:
    # Four requests on one connection over more than header_timeout_s: the deadline restarts with each response.
    with httpx.Client(base_url=live.base_url, timeout=MARGIN_S) as client:
        peers = set()
        for _ in range(4):
            response = client.get("/health")
            assert response.status_code == 200, response.text
            peers.add(response.extensions["network_stream"].get_extra_info("client_addr"))
            time.sleep(HEADER_TIMEOUT_S * 0.6)
    assert len(peers) == 1, f"the client needed {len(peers)} connections"


def test_connections_over_max_connections_are_refused_at_once(live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    # Requests whose headers are in and whose body never comes: they hold their connections
    # (the header deadline ends with the headers; the body has request_timeout_s).
    head = b"POST /decode HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    wait_for(lambda: not live.connections(), "the other tests' connections to close")
    holders = [live.connect() for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in holders:
            sock.sendall(head)
        # uvicorn's protocols keep the request whose headers are in as .cycle
        wait_for(lambda: len(live.connections()) == MAX_CONNECTIONS and all(c.cycle for c in live.connections()),
                 "the requests to be in hand")
        time.sleep(2 * HEADER_TIMEOUT_S)
        assert len(live.connections()) == MAX_CONNECTIONS, "a request whose headers were in was closed"
        with caplog.at_level(logging.INFO, logger="app.protocol"):
            for _ in range(10):
                with live.connect() as extra:
                    answer = b""
                    while chunk := extra.recv(4096):  # the answer, then the close, without sending anything
                        answer += chunk
                head_lines, _, body = answer.partition(b"\r\n\r\n")
                assert head_lines.startswith(b"HTTP/1.1 503 ") and b"connection: close" in head_lines.lower(), answer
                assert f"max_connections={MAX_CONNECTIONS}".encode() in body
        refusals = [r for r in caplog.records if r.name == "app.protocol" and "refused" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]  # not one line per refused connection
    finally:
        for sock in holders:
            sock.close()
    wait_for(lambda: len(live.connections()) < MAX_CONNECTIONS, "the held connections to close")
    assert httpx.get(f"{live.base_url}/health", timeout=MARGIN_S).status_code == 200


# Uploads ---------------------------------------------------------------------------------------

BOUNDARY = "slowclientboundary"


def multipart(filename: str, data: bytes) -> bytes:
    """A multipart/form-data body with one `file` field."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


async def paced(data: bytes, fast: int, step: int, pause_s: float, until: asyncio.Event, cap_s: float = 15.0
                ) -> AsyncIterator[bytes]:
    """`fast` bytes at once, then `step` bytes every pause_s until `until` is set (or cap_s passes), then the rest."""
    yield data[:fast]
    sent, end = fast, time.monotonic() + cap_s
    while sent < len(data) and not until.is_set() and time.monotonic() < end:
        await asyncio.sleep(pause_s)
        yield data[sent:sent + step]
        sent += step
    if sent < len(data):
        yield data[sent:]


async def test_a_body_within_upload_preread_bytes_needs_no_slot(serve) -> None:
    async with serve(upload_slots=1) as (app, client):
        service = app.state.service
        await service.upload_slots.acquire()  # the only slot is taken, as by a long upload
        try:
            response = await asyncio.wait_for(
                client.post("/reconstruct", params={"model": "vae"}, files={"file": ("a.png", image_bytes(), "image/png")}), 10)
        finally:
            service.upload_slots.release()
    assert response.status_code == 200, response.text


async def test_a_trickling_upload_does_not_block_an_innocent_one(serve) -> None:
    body = multipart("slow.png", image_bytes(size=(24, 24)))  # ~0.8 KB, as the models' 28-32 px PNGs
    assert 600 < len(body) < 1024
    innocent_done = asyncio.Event()
    async with serve(upload_slots=1, upload_preread_bytes=1024) as (_app, client):
        # Its multipart headers, then a byte every 50 ms (for longer than the innocent one waits below,
        # unless it is answered): it never gets to upload_preread_bytes.
        slow = asyncio.ensure_future(client.post("/reconstruct", params={"model": "vae"}, headers=HEADERS,
                                                 content=paced(body, 150, 1, 0.05, innocent_done)))
        await asyncio.sleep(0.3)
        assert not slow.done()
        innocent = await asyncio.wait_for(
            client.post("/reconstruct", params={"model": "vae"}, files={"file": ("a.png", image_bytes(), "image/png")}), 10)
        assert not slow.done(), "the trickling upload ended before the innocent one was answered"
        innocent_done.set()
        slow_response = await asyncio.wait_for(slow, 10)
    assert innocent.status_code == 200, innocent.text
    assert slow_response.status_code == 200, slow_response.text  # slow but complete: served once it is all in


async def test_a_slot_holder_below_min_upload_rate_gets_408_and_the_next_one_gets_the_slot(serve) -> None:
    big = multipart("big.png", image_bytes(mode="RGB", size=(48, 48)))  # ~7 KB: past upload_preread_bytes
    assert len(big) > 4096
    never = asyncio.Event()
    async with serve(upload_slots=1, upload_preread_bytes=1024, min_upload_rate=2000, upload_rate_window_s=0.3) as (app, client):
        slots = app.state.service.upload_slots
        # 2 KiB at once (it takes the slot), then 10 bytes every 50 ms: 200 bytes/s.
        slow = asyncio.ensure_future(client.post("/reconstruct", params={"model": "vae"}, headers=HEADERS,
                                                 content=paced(big, 2048, 10, 0.05, never)))
        for _ in range(500):
            if slots.locked():
                break
            await asyncio.sleep(0.01)
        assert slots.locked(), "the slow upload did not take the slot"
        # Waits for the slot, then sends 256 bytes every 10 ms (25 KB/s): well above the minimum.
        waiting = asyncio.ensure_future(client.post("/reconstruct", params={"model": "vae"}, headers=HEADERS,
                                                    content=paced(big, 1024, 256, 0.01, never)))
        slow_response = await asyncio.wait_for(slow, 10)
        waiting_response = await asyncio.wait_for(waiting, 10)
        assert not slots.locked()
    assert slow_response.status_code == 408, slow_response.text
    detail = slow_response.json()["detail"]
    assert "below the minimum of 2000 bytes/s" in detail and "min_upload_rate" in detail, detail
    assert slow_response.headers["connection"] == "close"
    assert waiting_response.status_code == 200, waiting_response.text
