"""``deeplabv2 serve CHECKPOINT``: a local web page and HTTP API to try a model on images.

Starlette (ASGI) under uvicorn, installed by the ``serve`` extra. One model in memory, one
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

Limits that keep it alive (each refusal says why, as ``{"error": ...}``):

* a body over ``max_upload_mb`` -> 413 (from ``Content-Length`` before reading, or while
  streaming); an empty body -> 400; a body not sent within ``timeout_s`` -> 408;
* not an image -> 415; a format other than PNG/JPEG/WebP/BMP -> 415; an image over
  ``max_pixels`` (read from its header, so a decompression bomb is never decoded) -> 413;
  a corrupt or truncated file -> 400; an unknown query parameter or value -> 400;
* more than ``queue_size`` requests admitted (running or waiting) -> 503 with ``Retry-After``;
  a request not answered within ``timeout_s`` -> 504 (a job that has not started is dropped;
  one that has started keeps its slot until it ends, so memory stays bounded);
* no request names a file: the page and its script are fixed package assets.
"""

from __future__ import annotations

import asyncio
import contextlib
import base64
import io
import json
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULTS = {"max_upload_mb": 20.0, "max_pixels": 16_000_000, "queue_size": 4, "timeout_s": 60.0}
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
            from ..data.base import _rgb8
            from PIL import ImageOps
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
        import torch
        from ..utils.distributed import pick_device
        from ..deploy.runtime import prepare_network
        from ..weights import load_model
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
            from ..data import voc_palette
            palette = voc_palette(C)
        self.palette = np.asarray(palette, dtype=np.uint8)[:C]
        from ..data.cityscapes_labels import CLASSES as CITYSCAPES
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
        import torch
        from ..inference.front import InferenceConfig, segment
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
            from ..inference.crf import crf_preset
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
        from ..data.cityscapes import train_to_label_ids
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


def create_app(predictor: Predictor, *, max_upload_mb: float = DEFAULTS["max_upload_mb"],
               timeout_s: float = DEFAULTS["timeout_s"]):
    """The Starlette application around ``predictor`` (see the module docstring)."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route
    from . import asset

    max_bytes = int(max_upload_mb * 1024 * 1024)
    page = (asset("serve.html").replace("/*CSS*/", asset("serve.css"))
            .replace("/*JS*/", asset("serve.js")))

    def error(status: int, message: str, headers=None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def index(request):
        return HTMLResponse(page)

    async def health(request):
        return JSONResponse({"status": "ok", "admitted": predictor.admitted,
                             "queue_size": predictor.queue_size})

    async def model_info(request):
        return JSONResponse({**predictor.info(), "max_upload_bytes": max_bytes,
                             "timeout_s": timeout_s})

    async def read_body(request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise RequestError(413, f"upload is larger than the limit of {max_bytes:,} "
                                        "bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def predict(request):
        params = dict(request.query_params)
        for key, value in params.items():
            if key not in _PARAMS:
                return error(400, f"unknown parameter {key!r}; valid: {', '.join(_PARAMS)}")
            if value not in _PARAMS[key]:
                return error(400, f"{key}={value!r} is not one of {', '.join(_PARAMS[key])}")
        fmt = params.get("format", "png")
        if fmt == "labelids" and not predictor.cityscapes:
            return error(400, "format=labelids needs a Cityscapes model (its 19 classes); "
                              "this one has " + ", ".join(predictor.classes[:4]) + ", ...")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            return error(413, f"upload of {length} bytes is larger than the limit of "
                              f"{max_bytes:,} bytes")
        if not predictor.try_admit():
            return error(503, f"busy: {predictor.queue_size} requests already admitted; "
                              "retry shortly", headers={"Retry-After": "1"})
        started = time.monotonic()
        try:
            data = await asyncio.wait_for(read_body(request), timeout_s)
        except RequestError as e:
            predictor.release()
            return error(e.status, e.message)
        except asyncio.TimeoutError:
            predictor.release()
            return error(408, f"the upload did not arrive within {timeout_s:g} s")
        except BaseException:
            predictor.release()
            raise
        job = predictor.submit(data, crf=_flag(params.get("crf")),
                               multi_scale=_flag(params.get("multiscale")))
        del data
        try:
            left = max(timeout_s - (time.monotonic() - started), 0.001)
            labels, seconds = await asyncio.wait_for(asyncio.wrap_future(job), left)
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

    routes = [Route("/", index), Route("/api/health", health), Route("/api/model", model_info),
              Route("/api/predict", predict, methods=["POST"])]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        predictor.close()

    return Starlette(routes=routes, lifespan=lifespan)


def serve(checkpoint, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          max_upload_mb: float = DEFAULTS["max_upload_mb"],
          max_pixels: float = DEFAULTS["max_pixels"], queue_size: int = DEFAULTS["queue_size"],
          timeout_s: float = DEFAULTS["timeout_s"], **runtime) -> None:
    """Load ``checkpoint`` and serve it until interrupted; ``runtime``: :class:`Predictor`'s
    ``precision``, ``runtime``, ``eager``, ``compile`` and ``winograd``."""
    import uvicorn
    predictor = Predictor(checkpoint, device=device, queue_size=queue_size,
                          max_pixels=max_pixels, **runtime)
    app = create_app(predictor, max_upload_mb=max_upload_mb, timeout_s=timeout_s)
    if runtime.get("precision") == "auto":
        print(predictor.note)
    print(f"deeplabv2 serve: {predictor.checkpoint} ({len(predictor.classes)} classes) on "
          f"http://{host}:{port}/  (API: POST /api/predict; Ctrl-C stops)")
    # limit_concurrency bounds the open connections (503 beyond) so that uploads waiting for
    # a queue slot cannot pile up either.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=5,
                limit_concurrency=max(16, 4 * queue_size))
