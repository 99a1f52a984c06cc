"""``deeplabv2 serve CHECKPOINT``: a local web page and HTTP API to try a model on images.

Starlette (ASGI) under uvicorn, installed by the ``serve`` extra (imported inside the functions
that build the app and run the server, so the rest of this module loads without the extra). One model in memory, one
worker thread running it; every request is admitted to a bounded queue or refused:

* ``GET /``                 the page: drop or pick images, overlay with an opacity slider,
                            legend with class shares, CRF and multi-scale toggles, downloads
* ``GET /api/health``       ``{"status": "ok", "admitted": n, "queue_size": q}``
* ``GET /api/model``        classes, colours, architecture, limits
* ``POST /api/predict``     body: the image file's bytes (PNG, JPEG, WebP or BMP); query:
                            ``format=png`` (palette PNG of class indices, the default),
                            ``labelids`` (Cityscapes label ids, 19-class Cityscapes models) or
                            ``json`` (class shares; ``include=png`` adds the PNG as base64),
                            ``crf=1`` (dense CRF), ``multiscale=1`` (the paper's MSC: scales 1, 0.75, 0.5,
                            scores fused by max)

Limits that keep it alive (each refusal says why, as ``{"error": ...}``, from the app or from
the HTTP protocol alike; :class:`Limits` says why each bound has its default):

* request line and headers not complete within ``header_timeout_s`` of the connection opening
  (or of the previous answer on a kept-alive connection) -> 408 and the connection closes
  (a connection that sent nothing is closed without an answer); a malformed request, or
  headers over h11's 16 kB that arrive in pieces -> 400;
* a body over ``max_upload_mb`` -> 413 (from ``Content-Length`` before reading, or while
  streaming); an empty body -> 400; a body not received within ``body_timeout_s`` (at most
  ``timeout_s``) -> 408 and the connection closes;
* a body that is refused is first read and thrown away (up to :data:`DISCARD_BYTES` past the
  limit, within the body deadline) so that a client that sends it all before reading, as
  Python's urllib does, reads the refusal instead of a broken pipe; a client that sent
  ``Expect: 100-continue`` is answered at once and never sends it;
* not an image -> 415; a format other than PNG/JPEG/WebP/BMP -> 415; an image over
  ``max_pixels`` (read from its header, so a decompression bomb is never decoded) -> 413;
  a corrupt or truncated file -> 400; an unknown query parameter or value -> 400;
* request bodies held in memory at once (arriving or waiting for their answer) over
  ``2 * queue_size * max_upload_mb`` -> 503 with ``Retry-After``; more than
  ``max_connections`` connections open -> 503 with ``Retry-After``, and that one closes;
* a request counts against the queue only once its whole body has arrived, so a slow upload
  never holds a queue slot: more than ``queue_size`` requests admitted (running or waiting)
  -> 503 with ``Retry-After``; a result not ready within ``timeout_s`` of admission -> 504 (a
  job that has not started is dropped; one that has started keeps its slot until it ends, so
  memory stays bounded);
* an unknown path -> 404, a wrong method -> 405, a failure of ours -> 500, all as JSON;
* no request names a file: the page and its script are fixed package assets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..data import voc_palette
from ..data.base import _rgb8
from ..data.cityscapes import train_to_label_ids
from ..data.cityscapes_labels import CLASSES as CITYSCAPES
from ..deploy.runtime import prepare_network
from ..inference.crf import crf_preset
from ..inference.front import InferenceConfig, segment
from ..utils.distributed import pick_device
from ..weights import load_model

DEFAULTS = {"max_upload_mb": 20.0, "max_pixels": 16_000_000, "queue_size": 4, "timeout_s": 60.0,
            "header_timeout_s": 10.0, "body_timeout_s": 30.0}
MAX_CONNECTIONS = 256  # see Limits
DISCARD_BYTES = 64 * 1024 * 1024  # see Limits
ACCEPTED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp",
                    "BMP": "image/bmp"}
MIN_SIDE = 16  # smaller images leave nothing at output stride 8
MULTI_SCALES = (1.0, 0.75, 0.5)  # the paper's test-time MSC (Sec. 3.3), max fusion
_PARAMS = {"format": ("png", "json", "labelids"), "crf": ("0", "1", "false", "true"),
           "multiscale": ("0", "1", "false", "true"), "include": ("png",)}


class RequestError(Exception):
    """A request that is answered with ``status`` and ``message`` instead of a result."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def decode_image(data: bytes, max_pixels: float) -> np.ndarray:
    """The RGB ``uint8 (H, W, 3)`` pixels of an uploaded file, or :class:`RequestError`.

    The size is read from the header and checked against ``max_pixels`` before any pixel is
    decoded, so a small file that would expand to gigabytes is refused cheaply."""
    if not data:
        raise RequestError(400, "empty request body: send the image file's bytes")
    try:
        with warnings.catch_warnings():  # the pixel limit below is ours; PIL's would only warn
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"image refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise RequestError(415, "not an image: the body is no PNG, JPEG, WebP or BMP file") \
            from None
    except Exception as e:  # a header that PIL chokes on
        raise RequestError(400, f"corrupt image header: {e}") from None
    if im.format not in ACCEPTED_FORMATS:
        raise RequestError(415, f"{im.format} images are not accepted; send PNG, JPEG, WebP "
                                "or BMP")
    width, height = im.size
    if width * height > max_pixels:
        raise RequestError(413, f"image is {width}x{height} = {width * height:,} pixels, more "
                                f"than the limit of {int(max_pixels):,}")
    if min(width, height) < MIN_SIDE:
        raise RequestError(400, f"image is {width}x{height}; both sides must be at least "
                                f"{MIN_SIDE} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            # as displayed (EXIF orientation), 16-bit scaled, alpha over white: as `predict`
            rgb = _rgb8(ImageOps.exif_transpose(im))
    except Exception as e:  # truncated data, bad CRC, bad compressed stream...
        raise RequestError(400, f"corrupt or truncated {im.format} image: {e}") from None
    return rgb  # writable, for torch


def _flag(value: str | None) -> bool:
    return value in ("1", "true")


class Predictor:
    """One model, one worker thread, at most ``queue_size`` jobs admitted at a time.

    The checkpoint runs as ``precision``, ``runtime``, ``eager``, ``compile`` and ``winograd``
    say (:func:`deeplabv2.deploy.runtime.prepare_network`, the choices of ``evaluate`` and
    ``predict``); ``self.note`` says what ``precision="auto"`` chose and why."""

    def __init__(self, checkpoint, *, device="cpu", queue_size: int = 4,
                 max_pixels: float = DEFAULTS["max_pixels"], precision: str = "fp32",
                 runtime: str = "torch", eager: bool = False, compile: bool = False,
                 winograd: str = "auto"):
        # imported here, not above: `deeplabv2 serve --help` and the parser (which reads
        # DEFAULTS) start without loading torch and the model code
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.device = pick_device(device) if device == "auto" else torch.device(device)
        self.model = load_model(checkpoint, device=self.device)
        self.net, self.amp, self.precision, self.note = prepare_network(
            self.model, device=self.device, precision=precision, runtime=runtime, eager=eager,
            compile=compile, winograd=winograd, checkpoint=checkpoint)
        self.checkpoint = Path(checkpoint).name
        C = self.model.num_classes
        self.classes = list(self.model.classes or [f"class {i}" for i in range(C)])
        palette = self.model.palette
        if palette is None:
            palette = voc_palette(C)
        self.palette = np.asarray(palette, dtype=np.uint8)[:C]
        self.cityscapes = tuple(self.classes) == tuple(CITYSCAPES)
        self.queue_size = int(queue_size)
        self.max_pixels = max_pixels
        self._admitted = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deeplabv2-infer")
        self._crf = None

    @property
    def admitted(self) -> int:
        return self._admitted

    def try_admit(self) -> bool:
        """Take a slot of the queue; False when all ``queue_size`` are taken."""
        with self._lock:
            if self._admitted >= self.queue_size:
                return False
            self._admitted += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def submit(self, data: bytes, *, crf: bool, multi_scale: bool) -> Future:
        """Decode and segment in the worker; the slot taken by :meth:`try_admit` is given back
        when the job ends or is cancelled before it starts. The future's result is
        ``(labels uint8 (H, W), seconds)`` or raises :class:`RequestError`."""
        future = self._executor.submit(self._run, data, crf, multi_scale)
        future.add_done_callback(lambda _: self.release())
        return future

    def _run(self, data: bytes, crf: bool, multi_scale: bool):
        started = time.perf_counter()
        image = decode_image(data, self.max_pixels)
        del data
        inference = InferenceConfig(msc_scales=MULTI_SCALES if multi_scale else None)
        seg = segment(self.net, image[None], inference, device=self.device, amp=self.amp,
                      crf=self._dense_crf() if crf else None)
        labels = seg.labels[0].to(torch.uint8).cpu().numpy()
        return labels, time.perf_counter() - started

    def _dense_crf(self):
        if self._crf is None:  # the parameters released for the model's backbone
            self._crf = crf_preset(self.model.config)
        return self._crf

    # -- answers -----------------------------------------------------------------------------
    def label_png(self, labels: np.ndarray) -> bytes:
        im = Image.fromarray(labels, mode="P")
        table = np.zeros((256, 3), dtype=np.uint8)
        table[: len(self.palette)] = self.palette
        im.putpalette(table.flatten().tolist())
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def label_ids_png(self, labels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(train_to_label_ids(labels)).save(buf, format="PNG")
        return buf.getvalue()

    def shares(self, labels: np.ndarray) -> list[dict]:
        """Each class's share of the image's pixels, largest first (classes present only)."""
        counts = np.bincount(labels.ravel(), minlength=len(self.classes))[: len(self.classes)]
        total = max(int(labels.size), 1)
        return [{"index": int(c), "name": self.classes[c], "colour": _hex(self.palette[c]),
                 "pixels": int(counts[c]), "share": round(counts[c] / total, 6)}
                for c in np.argsort(-counts, kind="stable") if counts[c] > 0]

    def info(self) -> dict:
        return {"checkpoint": self.checkpoint, "num_classes": len(self.classes),
                "classes": [{"index": i, "name": n, "colour": _hex(self.palette[i])}
                            for i, n in enumerate(self.classes)],
                "model": dict(self.model.config), "device": str(self.device),
                "cityscapes_label_ids": self.cityscapes,
                "multi_scale": list(MULTI_SCALES), "queue_size": self.queue_size,
                "max_pixels": int(self.max_pixels)}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


class Limits:
    """What one client may hold of the server, and for how long. Shared by the HTTP protocol
    (:func:`server_config`, which counts connections and enforces the header deadline) and
    the app (:func:`create_app`, which enforces the rest); every bound is answered as JSON.

    * ``header_timeout_s`` (default 10 s), in the protocol: from the connection opening, or
      from the previous answer on a kept-alive one, to the end of the request's headers.
      Request line and headers fit h11's 16 kB; a 56 kbit/s link sends that in under 3 s and
      real clients send it in one packet, so 10 s spares slow links while a connection that
      trickles its headers is gone in 10 s (holding all ``max_connections`` that way takes a
      flood of new connections every second, not "a few slow clients").
    * ``body_timeout_s`` (default 30 s, never more than ``timeout_s``), in the app: from the
      end of the headers to the end of the body. The largest default upload, 20 MB, needs
      5.6 Mbit/s to make it; a typical 1-5 MB photo well under 2. It is half the 60 s
      inference timeout, so a slow upload holds its connection and its bytes for less time
      than the slowest answered request. A total deadline rather than a minimum rate: one
      number a user can check against their link, and no way to stretch it by sending just
      fast enough. The protocol applies it too to the rest of a body the app answered
      before it ended (uvicorn would read and discard that rest for as long as it came).
    * ``buffer_bytes`` (default ``2 * queue_size * max_upload``: 160 MiB), in the app: bytes of
      request bodies held in memory at once, arriving or waiting for their answer, counted as
      they arrive (a ``Content-Length`` reserves nothing, so announcing big bodies holds
      nothing). A full queue of the largest uploads fills half; the other half takes uploads
      arriving meanwhile. Beyond: 503.
    * ``max_connections`` (default :data:`MAX_CONNECTIONS`, 256), in the app with the
      protocol's count: open connections when a request's headers are complete; beyond, that
      request gets a JSON 503 and its connection closes. Each idle connection costs a file
      descriptor and at most ~80 kB (h11's 16 kB header buffer, uvicorn's 64 kB read-ahead):
      256 stay far under the usual 1024-descriptor limit and ~20 MB. It replaces uvicorn's
      ``limit_concurrency`` (16 here before), which answered plain text, and which 16 slow
      clients filled.
    * :data:`DISCARD_BYTES` (64 MiB), in the app: how far past ``max_upload`` a refused body
      is read and thrown away so that its client can read the answer; beyond, the answer goes
      at once and the connection closes (such a client may see a broken pipe). Discarding
      costs no memory and is bounded in time by the body deadline.
    """

    def __init__(self, *, max_bytes: int, buffer_bytes: int,
                 header_timeout_s: float = DEFAULTS["header_timeout_s"],
                 body_timeout_s: float = DEFAULTS["body_timeout_s"],
                 max_connections: int = MAX_CONNECTIONS):
        for name, value in (("header_timeout_s", header_timeout_s),
                            ("body_timeout_s", body_timeout_s),
                            ("max_connections", max_connections)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.max_bytes, self.buffer_bytes = int(max_bytes), int(buffer_bytes)
        self.header_timeout_s, self.body_timeout_s = float(header_timeout_s), float(body_timeout_s)
        self.max_connections = int(max_connections)
        self.connections = 0  # open now (the protocol counts; 0 under a test client)
        self.buffered = 0     # bytes of bodies held by requests in progress
        self.receiving = 0    # bodies being received now

    def hold(self, n: int) -> bool:
        """Count ``n`` more body bytes in memory; False (nothing counted) past the bound."""
        if self.buffered + n > self.buffer_bytes:
            return False
        self.buffered += n
        return True

    def free(self, n: int) -> None:
        self.buffered -= n


def _json_error(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 JSON error answer that closes the connection, for the protocol."""
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json"
            f"\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def _protocol_class(limits: Limits):
    """uvicorn's h11 protocol with a connection count, JSON answers to what uvicorn answers
    in plain text (a malformed request), and two deadlines: the header deadline while a
    request's headers are due, and the body deadline for the rest of a body that the app
    answered before it ended (uvicorn reads and discards that rest with no deadline)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _timer = None
        _waiting = None  # "headers", "rest of body" or None: what the timer waits for
        _counted = False

        def connection_made(self, transport):
            super().connection_made(transport)
            limits.connections += 1
            self._counted = True
            self._arm()

        def connection_lost(self, exc):
            if self._counted:
                limits.connections -= 1
                self._counted = False
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data):
            super().data_received(data)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def _arm(self):
            """Start the deadline for what the connection now waits for, unless it runs."""
            if self.transport.is_closing():
                return self._disarm()
            if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
                waiting, seconds = "headers", limits.header_timeout_s
            elif self.conn.their_state is h11.SEND_BODY and \
                    self.conn.our_state in (h11.DONE, h11.MUST_CLOSE):
                waiting, seconds = "rest of body", limits.body_timeout_s
            else:  # a request in the app's hands: its body deadline is the app's
                return self._disarm()
            if waiting != self._waiting:
                self._disarm()
                self._waiting = waiting
                self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._waiting = None

        def _expired(self):
            waiting = self._waiting
            self._timer = self._waiting = None
            if self.transport.is_closing():
                return
            if waiting == "headers" and self.conn.trailing_data[0]:
                self.transport.write(_json_error(  # part of a request came: say why it ends
                    408, f"request headers not complete within {limits.header_timeout_s:g} s"))
            self.transport.close()  # nothing asked, or already answered: just close

        def send_400_response(self, msg: str) -> None:
            self._disarm()
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # the app's answer, if any, goes nowhere
                if self.cycle.response_started:
                    self.transport.close()
                    return
            self.transport.write(_json_error(
                400, "invalid HTTP request (malformed request line, headers or chunked body, "
                     "or headers too large)"))
            self.transport.close()

    return Protocol


def server_config(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """The uvicorn configuration that serves ``app`` (from :func:`create_app`) under its
    :class:`Limits`: the protocol above instead of uvicorn's plain-text
    ``limit_concurrency``, idle kept-alive connections closed after 5 s."""
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=_protocol_class(app.state.limits), ws="none",
                          timeout_keep_alive=5, limit_concurrency=None)


def create_app(predictor: Predictor, *, max_upload_mb: float = DEFAULTS["max_upload_mb"],
               timeout_s: float = DEFAULTS["timeout_s"],
               header_timeout_s: float = DEFAULTS["header_timeout_s"],
               body_timeout_s: float = DEFAULTS["body_timeout_s"],
               max_connections: int = MAX_CONNECTIONS, buffer_mb: float | None = None):
    """The Starlette application around ``predictor`` (see the module docstring); its
    :class:`Limits` are ``app.state.limits`` (``buffer_mb`` defaults to
    ``2 * queue_size * max_upload_mb``)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route
    from . import asset

    max_bytes = int(max_upload_mb * 1024 * 1024)
    if buffer_mb is None:
        buffer_bytes = 2 * predictor.queue_size * max_bytes
    else:
        buffer_bytes = int(buffer_mb * 1024 * 1024)
    body_timeout_s = min(body_timeout_s, timeout_s)
    limits = Limits(max_bytes=max_bytes, buffer_bytes=buffer_bytes,
                    header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
                    max_connections=max_connections)
    page = (asset("serve.html").replace("/*CSS*/", asset("serve.css"))
            .replace("/*JS*/", asset("serve.js")))
    busy = {"Retry-After": "1"}

    def error(status: int, message: str, headers=None, *, close: bool = False):
        headers = {**(headers or {}), **({"Connection": "close"} if close else {})}
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def body_deadline() -> float:
        return asyncio.get_running_loop().time() + limits.body_timeout_s

    async def receive(request, deadline: float):
        """The next ASGI message of ``request``, or :class:`asyncio.TimeoutError` past
        ``deadline`` (loop time)."""
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(request.receive(), left)

    def length_of(request) -> int | None:
        length = request.headers.get("content-length")
        return int(length) if length is not None and length.isdigit() else None

    def has_body(request) -> bool:
        return (length_of(request) or 0) > 0 or ("content-length" not in request.headers and
                                                  "chunked" in request.headers.get(
                                                      "transfer-encoding", "").lower())

    async def discard(request, deadline: float, seen: int = 0) -> bool:
        """Read the rest of the body and throw it away; False when it did not end by the
        deadline or within :data:`DISCARD_BYTES` past the limit (the connection must
        close then)."""
        try:
            while True:
                message = await receive(request, deadline)
                if message["type"] != "http.request":
                    return False  # the client is gone
                seen += len(message.get("body", b""))
                if seen > max_bytes + DISCARD_BYTES:
                    return False
                if not message.get("more_body", False):
                    return True
        except asyncio.TimeoutError:
            return False

    async def refuse(request, deadline: float, status: int, message: str, headers=None):
        """The JSON refusal of a request whose body has not been read. The body is read and
        thrown away first, so that a client that sends it all before reading (Python's
        urllib) reads this answer instead of a broken pipe; a client waiting for
        ``100 Continue``, or a body too long to throw away, is answered at once and its
        connection closed."""
        close = False
        if has_body(request):
            length = length_of(request)
            waits = "100-continue" in request.headers.get("expect", "").lower()
            if waits or (length is not None and length > max_bytes + DISCARD_BYTES):
                close = True
            else:
                close = not await discard(request, deadline)
        return error(status, message, headers, close=close)

    async def read_body(request, deadline: float):
        """``(data, None)`` with ``len(data)`` bytes held in ``limits`` (the caller frees
        them), or ``(None, refusal)`` holding nothing."""
        chunks, size = [], 0
        limits.receiving += 1
        try:
            while True:
                message = await receive(request, deadline)
                if message["type"] != "http.request":
                    limits.free(size)
                    return None, error(400, "the client went away before its upload ended")
                chunk = message.get("body", b"")
                more = message.get("more_body", False)
                if size + len(chunk) > max_bytes or not limits.hold(len(chunk)):
                    limits.free(size)
                    del chunks
                    if size + len(chunk) > max_bytes:
                        refusal = (413, f"upload is larger than the limit of {max_bytes:,} "
                                        "bytes")
                    else:
                        refusal = (503, "busy: uploads in progress fill the "
                                        f"{limits.buffer_bytes:,} bytes kept for them; retry "
                                        "shortly", busy)
                    ended = not more or await discard(request, deadline, size + len(chunk))
                    return None, error(*refusal, close=not ended)
                chunks.append(chunk)
                size += len(chunk)
                if not more:
                    return b"".join(chunks), None
        except asyncio.TimeoutError:
            limits.free(size)
            return None, error(408, f"the upload did not arrive within "
                                    f"{limits.body_timeout_s:g} s", close=True)
        finally:
            limits.receiving -= 1

    async def index(request):
        return HTMLResponse(page)

    async def health(request):
        return JSONResponse({"status": "ok", "admitted": predictor.admitted,
                             "queue_size": predictor.queue_size})

    async def model_info(request):
        return JSONResponse({**predictor.info(), "max_upload_bytes": max_bytes,
                             "timeout_s": timeout_s})

    async def predict(request):
        deadline = body_deadline()
        params = dict(request.query_params)
        for key, value in params.items():
            if key not in _PARAMS:
                return await refuse(request, deadline, 400, f"unknown parameter {key!r}; "
                                    f"valid: {', '.join(_PARAMS)}")
            if value not in _PARAMS[key]:
                return await refuse(request, deadline, 400, f"{key}={value!r} is not one of "
                                    f"{', '.join(_PARAMS[key])}")
        fmt = params.get("format", "png")
        if fmt == "labelids" and not predictor.cityscapes:
            return await refuse(request, deadline, 400, "format=labelids needs a Cityscapes "
                                "model (its 19 classes); this one has "
                                + ", ".join(predictor.classes[:4]) + ", ...")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            return await refuse(request, deadline, 413, f"upload of {length} bytes is larger "
                                f"than the limit of {max_bytes:,} bytes")
        data, refusal = await read_body(request, deadline)
        if refusal is not None:
            return refusal
        try:
            return await answer(data, params, fmt)
        finally:
            limits.free(len(data))

    async def answer(data: bytes, params: dict, fmt: str):
        if not predictor.try_admit():  # only now, with the whole body here
            return error(503, f"busy: {predictor.queue_size} requests already admitted; "
                              "retry shortly", headers=busy)
        job = predictor.submit(data, crf=_flag(params.get("crf")),
                               multi_scale=_flag(params.get("multiscale")))
        del data
        try:
            labels, seconds = await asyncio.wait_for(asyncio.wrap_future(job), timeout_s)
        except RequestError as e:
            return error(e.status, e.message)
        except asyncio.TimeoutError:
            return error(504, f"no result within {timeout_s:g} s (the model is busy or the "
                              "image too large for this machine)")
        except Exception as e:  # the model failed on this image: say so, stay up
            return error(500, f"inference failed: {type(e).__name__}: {e}")
        headers = {"X-Inference-Seconds": f"{seconds:.3f}"}
        if fmt == "png":
            return Response(predictor.label_png(labels), media_type="image/png",
                            headers=headers)
        if fmt == "labelids":
            return Response(predictor.label_ids_png(labels), media_type="image/png",
                            headers=headers)
        body = {"width": int(labels.shape[1]), "height": int(labels.shape[0]),
                "seconds": round(seconds, 4), "classes": predictor.shares(labels)}
        if params.get("include") == "png":
            body["label_png"] = base64.b64encode(predictor.label_png(labels)).decode("ascii")
        return Response(json.dumps(body), media_type="application/json", headers=headers)

    class ConnectionLimit:
        """More than ``max_connections`` open: a JSON 503 that closes this one."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and limits.connections > limits.max_connections:
                request = Request(scope, receive)
                response = await refuse(request, body_deadline(), 503,
                                        f"busy: {limits.connections - 1} connections already "
                                        "open; retry shortly", busy)
                response.headers["Connection"] = "close"
                await response(scope, receive, send)
                return
            await self.app(scope, receive, send)

    async def http_error(request, exc):  # 404, 405, ... as JSON too
        message = {404: f"no such page: {request.url.path}",
                   405: f"{request.method} is not allowed here"}.get(exc.status_code,
                                                                      exc.detail)
        return await refuse(request, body_deadline(), exc.status_code, message,
                            getattr(exc, "headers", None))

    async def server_error(request, exc):  # its body may be unread: close after
        return error(500, f"internal error: {type(exc).__name__}", close=True)

    routes = [Route("/", index), Route("/api/health", health), Route("/api/model", model_info),
              Route("/api/predict", predict, methods=["POST"])]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        predictor.close()

    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(ConnectionLimit)],
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.limits = limits
    return app


def serve(checkpoint, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          max_upload_mb: float = DEFAULTS["max_upload_mb"],
          max_pixels: float = DEFAULTS["max_pixels"], queue_size: int = DEFAULTS["queue_size"],
          timeout_s: float = DEFAULTS["timeout_s"],
          header_timeout_s: float = DEFAULTS["header_timeout_s"],
          body_timeout_s: float = DEFAULTS["body_timeout_s"],
          max_connections: int = MAX_CONNECTIONS, **runtime) -> None:
    """Load ``checkpoint`` and serve it until interrupted; ``runtime``: :class:`Predictor`'s
    ``precision``, ``runtime``, ``eager``, ``compile`` and ``winograd``; the bounds:
    :class:`Limits`."""
    import uvicorn
    predictor = Predictor(checkpoint, device=device, queue_size=queue_size,
                          max_pixels=max_pixels, **runtime)
    app = create_app(predictor, max_upload_mb=max_upload_mb, timeout_s=timeout_s,
                     header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
                     max_connections=max_connections)
    if runtime.get("precision") == "auto":
        print(predictor.note)
    print(f"deeplabv2 serve: {predictor.checkpoint} ({len(predictor.classes)} classes) on "
          f"http://{host}:{port}/  (API: POST /api/predict; Ctrl-C stops)")
    uvicorn.Server(server_config(app, host=host, port=port)).run()
