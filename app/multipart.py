"""The multipart/form-data parser of the upload routes: image files read as they stream in and
checked one file at a time (the routes are app/routes/uploads.py).

FastAPI's `UploadFile` parameters would read the whole request body (up to max_files x
max_upload_bytes) before a route could look at the first file. `read_upload_images` instead
feeds the body to python-multipart chunk by chunk:

- a file's bytes are held to `max_upload_bytes` while they arrive (413 at the first byte over);
- each finished file is decoded at once (app/imaging.py's rule) in the decode pool, behind the
  service's decode semaphore (`decode_slots` decodes at a time across all requests), while the
  next file streams in; at most `decode_slots` files of a request wait for decoding, so a
  request holds the raw bytes of only a few files;
- the first file that is too large, undecodable or one too many ends the request with its
  4xx; the rest of the body is never read.

Slow clients cannot lock the others out:
- the first `upload_preread_bytes` of a body (64 KiB by default: ~25 of the models' 28-32 px
  PNGs) are read without an upload slot; a body that ends within them (nearly every request)
  never takes one, and a client that trickles its body waits there, holding no slot, until
  request_timeout_s ends it (408, app/middleware.py);
- only a longer body waits for one of the `upload_slots` (asyncio's semaphore serves waiters in
  order), and while it holds one its bytes must keep coming at `min_upload_rate` bytes/s or more,
  measured over each `upload_rate_window_s` of time spent waiting for the client (time spent on
  this side, decoding, does not count; the first window is the grace); a slower one ends with 408
  and `Connection: close`, freeing the slot for the next request waiting.

Memory: the raw bytes held for uploads stay bounded by about upload_slots x (decode_slots + 2) x
max_upload_bytes for the requests holding a slot (the others wait, and their bodies wait in the
network buffers), plus up to upload_preread_bytes (and the network read that crosses it) for
each request reading without one: at most one per open connection. Measured (a hostile review,
200 connections each sending 60 KiB and then 2 MB while the slots were held), the server grew
about 0.8 MB per such connection, not the 128 KiB these two buffers suggest: asyncio reads 256 KiB
at a time, uvicorn buffers beyond its 64 KiB high-water mark before it pauses reading, and the
request's reader (app/middleware.py) holds a message ahead. So max_connections (2048) of them could
hold about 1.6 GB: behind a proxy that buffers uploads (README, "Behind a proxy") none of this
reaches the service; exposed directly, lower GENSERVE_MAX_CONNECTIONS to what the memory allows.

A body that ends before the multipart closing boundary (a truncated upload) is 400: no file of
it is used.

A request is refused with 422 when it is not multipart/form-data, names a field the route does
not take, or lacks one it needs.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch
from fastapi import HTTPException, Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app import imaging
from app.registry import Entry
from app.service import Service


@dataclass
class _Part:
    name: str = ""
    filename: str = ""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    slot: int = -1  # its index among the files of its field

    @property
    def label(self) -> str:
        return f"file {self.filename!r}" if self.filename else f"the file in {self.name!r}"


class _UploadRate:
    """Reads a body's chunks, ending it with 408 when they come slower than `min_rate` bytes/s.

    The rate is bytes over the time spent waiting for them, checked each time `window_s` of
    waiting has added up (time the caller spends between reads, e.g. decoding, does not count);
    a body that ends within a window is not checked. min_rate = 0 turns the check off.
    """

    def __init__(self, min_rate: int, window_s: float) -> None:
        self.min_rate, self.window_s = min_rate, window_s
        self.waited = 0.0  # seconds spent waiting in the current window
        self.bytes = 0  # bytes received in it

    async def next(self, body: AsyncIterator[bytes]) -> bytes | None:
        """The next chunk of `body`, or None at its end; raises HTTPException(408) when too slow."""
        if self.min_rate <= 0:
            return await anext(body, None)
        loop = asyncio.get_running_loop()
        read = asyncio.ensure_future(anext(body, None))
        try:
            while True:
                start = loop.time()
                # Wait without cancelling the read (that would end the body's stream) until the window is full.
                done, _ = await asyncio.wait({read}, timeout=max(0.0, self.window_s - self.waited))
                self.waited += loop.time() - start
                if done:
                    chunk = read.result()
                    if chunk is not None:
                        self.bytes += len(chunk)
                        if self.waited >= self.window_s:
                            self._check()
                    return chunk
                self._check()
        finally:
            read.cancel()  # a no-op once done

    def _check(self) -> None:
        rate = self.bytes / self.waited if self.waited > 0 else float("inf")
        if rate < self.min_rate:
            raise HTTPException(
                408,
                f"the upload arrived at {rate:.0f} bytes/s, below the minimum of {self.min_rate} bytes/s "
                "(min_upload_rate) for a request holding an upload slot",
                headers={"Connection": "close"},
            )
        self.waited, self.bytes = 0.0, 0


def upload_body(fields: dict[str, str], multiple: str | None = None) -> dict:
    """The OpenAPI requestBody of a route that reads its files with read_upload_images.

    fields: name -> description; `multiple`, if given, is the one field that takes several files.
    """
    properties = {
        name: (
            {"type": "array", "items": {"type": "string", "format": "binary"}, "description": text}
            if name == multiple
            else {"type": "string", "format": "binary", "description": text}
        )
        for name, text in fields.items()
    }
    schema = {"type": "object", "properties": properties, "required": list(fields), "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


async def read_upload_images(
    request: Request, service: Service, entry: Entry, fields: Sequence[str], max_per_field: dict[str, int] | None = None
) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Stream the multipart body: field -> [(filename, image (C, H, W) in [0, 1]), ...] in upload order.

    Every name in `fields` must come at least once; `max_per_field` caps a field's files
    (default: settings.max_files for each field, and in all).
    """
    s = service.settings
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise HTTPException(
            422, f"send the images as multipart/form-data with the field(s) {list(fields)} (curl -F {fields[0]}=@image.png)"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(422, "the multipart/form-data Content-Type has no boundary")
    caps = {name: (max_per_field or {}).get(name, s.max_files) for name in fields}
    results: dict[str, list[tuple[str, torch.Tensor] | None]] = {name: [] for name in fields}
    pending: list[asyncio.Future] = []
    finished: list[_Part] = []
    part = _Part()
    header_name = bytearray()
    header_value = bytearray()
    count = 0
    ended = False

    def on_end() -> None:
        nonlocal ended
        ended = True

    def on_part_begin() -> None:
        nonlocal part
        part = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        part.headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        nonlocal count
        _, options = parse_options_header(part.headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise HTTPException(422, "a multipart part has no name in its Content-Disposition header")
        part.name = options[b"name"].decode("utf-8", "replace")
        part.filename = options.get(b"filename", b"").decode("utf-8", "replace")
        if part.name not in results:
            raise HTTPException(422, f"unexpected form field {part.name!r}; this endpoint takes {list(fields)}")
        count += 1
        if count > s.max_files:
            raise HTTPException(422, f"at most {s.max_files} files per request (max_files); this one has more")
        if len(results[part.name]) >= caps[part.name]:
            raise HTTPException(422, f"at most {caps[part.name]} file(s) in the field {part.name!r}; this request has more")
        part.slot = len(results[part.name])
        results[part.name].append(None)  # its place, filled once decoded

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if len(part.data) + (end - start) > s.max_upload_bytes:
            raise HTTPException(413, f"{part.label} has more bytes than max_upload_bytes ({s.max_upload_bytes})")
        before = len(part.data)
        part.data.extend(data[start:end])
        if before < imaging.SNIFF_BYTES <= len(part.data):
            check_kind(part)

    def on_part_end() -> None:
        if len(part.data) < imaging.SNIFF_BYTES:
            check_kind(part)
        finished.append(part)

    def check_kind(p: _Part) -> None:
        """A file that cannot be an accepted image is refused from its first bytes, not its last."""
        if p.data and not imaging.sniff(bytes(p.data[: imaging.SNIFF_BYTES])):
            raise HTTPException(400, f"{p.label} is not a decodable image (not one of {', '.join(imaging.FORMATS)})")

    async def decode(p: _Part) -> None:
        async with service.decode_slots:
            image = await service.run_decode(
                imaging.decode_upload, p.data, p.filename, image_shape=entry.image_shape, max_pixels=s.max_pixels
            )
        results[p.name][p.slot] = (p.filename, image)

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_end": on_end,
    }
    body = request.stream().__aiter__()
    received = 0
    holding_slot = False
    rate: _UploadRate | None = None  # set once the request holds a slot
    try:
        try:
            parser = MultipartParser(boundary, callbacks)
            while True:
                chunk = await (rate.next(body) if rate is not None else anext(body, None))
                if chunk is None:
                    break
                received += len(chunk)
                parser.write(chunk)
                for p in finished:
                    pending.append(asyncio.ensure_future(decode(p)))
                finished.clear()
                # The first bad file ends the request; and no more than decode_slots files wait.
                while pending and (pending[0].done() or len(pending) > s.decode_slots):
                    await pending.pop(0)
                if not holding_slot and received >= s.upload_preread_bytes and not ended:
                    await service.upload_slots.acquire()  # a long body: the rest is read under a slot
                    holding_slot = True
                    rate = _UploadRate(s.min_upload_rate, s.upload_rate_window_s)
            parser.finalize()
        except FormParserError as err:
            raise HTTPException(422, f"malformed multipart body: {err}") from None
        if not ended:
            raise HTTPException(400, "the multipart body ends before its closing boundary: the upload is incomplete")
        while pending:
            await pending.pop(0)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)  # retrieve what they raised
        if holding_slot:
            service.upload_slots.release()
    files = {name: [item for item in items if item is not None] for name, items in results.items()}
    missing = [name for name in fields if not files[name]]
    if missing:
        raise HTTPException(422, f"missing file field(s) {missing}: send them as multipart/form-data")
    assert all(len(files[n]) == len(results[n]) for n in fields), "every part that began was decoded"
    return files
