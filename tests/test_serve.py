"""`deeplabv2 serve`'s HTTP API through Starlette's test client: a good image in each output
format, every bad input answered with a 4xx that says why, the queue bound (503) and the
request timeout (504); and against a real server on 127.0.0.1, the slow and greedy clients that
must not lock anyone out, and every refusal answered as JSON."""

import contextlib
import io
import json
import threading
import time
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from starlette.testclient import TestClient  # the 'test' extra installs starlette and httpx2

from deeplabv2 import build_model, save_weights
from deeplabv2.app.server import Predictor, RequestError, create_app, decode_image
from deeplabv2.data import SyntheticDataset

TINY = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny.pth"
    save_weights(build_model({**TINY, "num_classes": 7}), path, classes=SyntheticDataset.classes,
                 palette=SyntheticDataset.palette)
    return path


@pytest.fixture(scope="module")
def predictor(checkpoint):
    p = Predictor(checkpoint, device="cpu", queue_size=2)
    yield p
    p.close()


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, max_upload_mb=1, timeout_s=30)) as c:
        yield c


def encode(array, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(h=48, w=64, seed=0):
    return SyntheticDataset("val", size=(h, w), num_samples=seed + 1).load(seed)[0]


def test_health_model_info_and_page(client):
    assert client.get("/api/health").json() == {"status": "ok", "admitted": 0, "queue_size": 2}
    info = client.get("/api/model").json()
    assert info["num_classes"] == 7 and info["classes"][0]["name"] == "road"
    assert info["checkpoint"] == "tiny.pth" and info["cityscapes_label_ids"] is False
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and 'id="opacity"' in page.text
    assert "/*JS*/" not in page.text and "https://" not in page.text


def test_png_answer_is_the_models_labels(client, predictor):
    image = photo()
    r = client.post("/api/predict", content=encode(image), headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    labels = Image.open(io.BytesIO(r.content))
    assert labels.mode == "P" and labels.size == (64, 48)
    import torch
    with torch.no_grad():
        want = predictor.net(predictor.model.preprocess(image[None])).argmax(1)[0].numpy()
    assert np.array_equal(np.asarray(labels), want)
    palette = np.asarray(labels.getpalette()[:21]).reshape(7, 3)
    assert np.array_equal(palette, SyntheticDataset.palette)


def test_json_shares_and_embedded_png(client):
    r = client.post("/api/predict?format=json&include=png&crf=1&multiscale=1",
                    content=encode(photo(), "JPEG", quality=90))
    assert r.status_code == 200
    body = r.json()
    assert (body["width"], body["height"]) == (64, 48)
    assert sum(c["share"] for c in body["classes"]) == pytest.approx(1.0, abs=1e-5)
    assert sum(c["pixels"] for c in body["classes"]) == 48 * 64
    labels = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(body["label_png"]))))
    counts = np.bincount(labels.ravel(), minlength=7)
    assert {c["index"]: c["pixels"] for c in body["classes"]} == {
        i: int(n) for i, n in enumerate(counts) if n}


def test_cityscapes_label_ids(tmp_path):
    from deeplabv2.data import CityscapesDataset
    from deeplabv2.data.cityscapes_labels import TRAIN_TO_LABEL
    path = tmp_path / "city.pth"
    save_weights(build_model({**TINY, "num_classes": 19}), path,
                 classes=CityscapesDataset.classes, palette=CityscapesDataset.palette)
    p = Predictor(path, device="cpu")
    with TestClient(create_app(p)) as c:
        assert c.get("/api/model").json()["cityscapes_label_ids"] is True
        data = encode(photo())
        train = np.asarray(Image.open(io.BytesIO(c.post("/api/predict", content=data).content)))
        ids = np.asarray(Image.open(io.BytesIO(
            c.post("/api/predict?format=labelids", content=data).content)))
        assert np.array_equal(ids, np.asarray(TRAIN_TO_LABEL)[train])


def png_bomb(width=10_000, height=10_000) -> bytes:
    """A valid 1-bit-per-byte grey PNG of width x height zeros: ~100 kB that decodes to 100 MP."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    comp, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                              0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def truncated_png() -> bytes:
    data = encode(photo())
    return data[: len(data) // 2]


def bad_crc_png() -> bytes:
    data = bytearray(encode(photo()))
    i = data.index(b"IDAT") + 20
    data[i] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("body, query, status, why", [
    (b"", "", 400, "empty request body"),
    (b"hello, this is text and no image", "", 415, "not an image"),
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", "", 415, "not an image"),
    ("gif", "", 415, "GIF images are not accepted"),
    ("truncated", "", 400, "corrupt or truncated PNG"),
    ("bad_crc", "", 400, "corrupt or truncated PNG"),
    ("bomb", "", 413, "10000x10000 = 100,000,000 pixels, more than the limit"),
    ("tiny", "", 400, "at least 16 pixels"),
    ("good", "?format=tiff", 400, "format='tiff' is not one of png, json, labelids"),
    ("good", "?path=/etc/passwd", 400, "unknown parameter 'path'"),
    ("good", "?crf=yes", 400, "crf='yes' is not one of"),
    ("good", "?format=labelids", 400, "needs a Cityscapes model"),
])
def test_bad_inputs_get_a_4xx_that_says_why(client, body, query, status, why):
    bodies = {"gif": lambda: encode(photo(), "GIF"), "truncated": truncated_png,
              "bad_crc": bad_crc_png, "bomb": png_bomb,
              "tiny": lambda: encode(np.zeros((8, 8, 3), np.uint8)),
              "good": lambda: encode(photo())}
    if isinstance(body, str):
        body = bodies[body]()
    r = client.post("/api/predict" + query, content=body)
    assert r.status_code == status, r.text
    assert why in r.json()["error"]
    assert client.get("/api/health").json()["admitted"] == 0  # every refusal gave its slot back


def test_decompression_bomb_is_refused_before_decoding():
    """The header is enough: the 100 MP bomb is refused without allocating its pixels."""
    import tracemalloc
    data = png_bomb()
    tracemalloc.start()
    with pytest.raises(RequestError) as e:
        decode_image(data, max_pixels=16e6)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert e.value.status == 413 and peak < 10_000_000


def test_upload_size_limit(client):
    big = b"\0" * (1024 * 1024 + 1)
    r = client.post("/api/predict", content=big)  # Content-Length says it
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(3):
            yield b"\0" * 500_000
    r = client.post("/api/predict", content=chunks())
    assert r.status_code == 413 and "larger than the limit of 1,048,576 bytes" in r.json()["error"]
    assert client.get("/api/health").json()["admitted"] == 0


def test_no_paths_and_methods(client):
    assert client.get("/api/predict").status_code == 405
    for path in ("/../../etc/passwd", "/static/..%2f..%2fetc%2fpasswd", "/assets/serve.js"):
        assert client.get(path).status_code == 404


class _Gate:
    """Replaces the predictor's job with one that waits for ``open()`` (and counts runs)."""

    def __init__(self, predictor, monkeypatch):
        self.event, self.runs = threading.Event(), 0
        real = predictor._run

        def run(*args):
            self.runs += 1
            assert self.event.wait(30)
            return real(*args)
        monkeypatch.setattr(predictor, "_run", run)

    def open(self):
        self.event.set()


def _post_in_thread(client, data, results, key):
    def go():
        results[key] = client.post("/api/predict", content=data)
    t = threading.Thread(target=go)
    t.start()
    return t


def _wait_for(condition, seconds=20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_queue_bound_answers_503_and_loses_nothing(checkpoint, monkeypatch):
    p = Predictor(checkpoint, device="cpu", queue_size=2)
    gate = _Gate(p, monkeypatch)
    data = encode(photo())
    results = {}
    with TestClient(create_app(p, timeout_s=30)) as c:
        threads = [_post_in_thread(c, data, results, 0)]
        _wait_for(lambda: gate.runs == 1)           # one running
        threads.append(_post_in_thread(c, data, results, 1))
        _wait_for(lambda: p.admitted == 2)           # one waiting: the queue is full
        r = c.post("/api/predict", content=data)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "busy: 2 requests already admitted" in r.json()["error"]
        assert c.get("/api/health").status_code == 200  # the server still answers
        gate.open()
        for t in threads:
            t.join(30)
        assert [results[k].status_code for k in (0, 1)] == [200, 200]
        assert p.admitted == 0 and c.post("/api/predict", content=data).status_code == 200
    p.close()


def test_timeout_answers_504_and_drops_a_job_not_started(checkpoint, monkeypatch):
    p = Predictor(checkpoint, device="cpu", queue_size=2)
    gate = _Gate(p, monkeypatch)
    data = encode(photo())
    results = {}
    with TestClient(create_app(p, timeout_s=0.5)) as c:
        t0 = _post_in_thread(c, data, results, 0)
        _wait_for(lambda: gate.runs == 1)
        t1 = _post_in_thread(c, data, results, 1)
        t0.join(10), t1.join(10)
        for k in (0, 1):
            assert results[k].status_code == 504 and "no result within 0.5 s" in \
                results[k].json()["error"]
        # the running job keeps its slot until it ends; the waiting one was dropped
        assert p.admitted == 1
        gate.open()
        _wait_for(lambda: p.admitted == 0)
        assert gate.runs == 1
    p.close()


def test_serve_command_hands_the_server_its_options(monkeypatch):
    """`deeplabv2 serve` passes the command line to the server, megapixels as pixels: by
    default the server's own DEFAULTS, on 127.0.0.1 port 8000 (this machine only)."""
    import deeplabv2.app.server as server
    from deeplabv2.cli import main
    got = []
    monkeypatch.setattr(server, "serve", lambda checkpoint, **kw: got.append((checkpoint, kw)))
    assert main(["serve", "m.pth"]) == 0
    runtime = {"precision": "fp32", "runtime": "torch", "eager": False, "compile": False,
               "winograd": "auto"}  # FP32 by default, as serve always ran
    assert got.pop() == ("m.pth", {"host": "127.0.0.1", "port": 8000, "device": "auto",
                                   **server.DEFAULTS, **runtime})
    assert server.DEFAULTS["queue_size"] == 4
    assert main(["serve", "m.pth", "--host", "0.0.0.0", "--port", "9000", "--device", "cpu",
                 "--max-upload-mb", "12", "--max-megapixels", "2.5", "--queue", "7",
                 "--timeout", "3", "--header-timeout", "4", "--body-timeout", "2.5",
                 "--precision", "bf16", "--eager", "--no-winograd"]) == 0
    assert got.pop() == ("m.pth", {"host": "0.0.0.0", "port": 9000, "device": "cpu",
                                   "max_upload_mb": 12.0, "max_pixels": 2_500_000,
                                   "queue_size": 7, "timeout_s": 3.0, "header_timeout_s": 4.0,
                                   "body_timeout_s": 2.5, **runtime,
                                   "precision": "bf16", "eager": True, "winograd": "off"})


def test_slow_upload_gets_408_from_a_real_server(predictor):
    """An upload that stalls is cut off after the timeout (uvicorn on 127.0.0.1, raw socket)."""
    import socket
    from test_browser import running_server
    with running_server(create_app(predictor, timeout_s=0.5)) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n\x89PNG")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"did not arrive within 0.5 s" in answer
        assert predictor.admitted == 0


def test_serve_command_starts_on_localhost_and_stops(checkpoint, tmp_path):
    """`deeplabv2 serve` as a user runs it: bound to 127.0.0.1, answers, stops on SIGTERM."""
    import http.client
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "deeplabv2", "serve", str(checkpoint),
                             "--port", str(port), "--device", "cpu", "--queue", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/api/health")
                health = json.loads(conn.getresponse().read())
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert health == {"status": "ok", "admitted": 0, "queue_size": 2}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/api/predict?format=json", body=encode(photo()))
        answer = conn.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["width"] == 64
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout \
            if __import__("shutil").which("ss") else f"127.0.0.1:{port}"
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"on http://127.0.0.1:{port}/" in out


def test_serve_runs_the_network_as_predict_would(checkpoint):
    """`serve` takes predict's runtime flags (default fp32, as before) and its Predictor
    prepares the network by them: bf16, eager (with autocast), auto with its reason."""
    import torch
    from deeplabv2.cli import build_parser
    args = build_parser().parse_args(["serve", "m.pth"])
    assert (args.precision, args.runtime, args.eager, args.compile, args.winograd) == \
        ("fp32", "torch", False, False, "auto")
    args = build_parser().parse_args(["serve", "m.pth", "--precision", "bf16", "--no-winograd",
                                      "--runtime", "openvino", "--eager", "--compile"])
    assert (args.precision, args.runtime, args.eager, args.compile, args.winograd) == \
        ("bf16", "openvino", True, True, "off")
    bf16 = Predictor(checkpoint, device="cpu", precision="bf16")
    assert bf16.precision == "bf16" and bf16.net.dtype == torch.bfloat16 and bf16.amp == "none"
    eager = Predictor(checkpoint, device="cpu", precision="auto", eager=True)
    assert eager.net is eager.model and eager.precision == "fp32"  # pinned by conftest
    assert eager.note.startswith("--precision auto: fp32")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Predictor(checkpoint, device="cpu", precision="fp16")
    data = encode(photo())
    for p in (bf16, eager):
        with TestClient(create_app(p)) as c:
            r = c.post("/api/predict?format=json", content=data)
            assert r.status_code == 200 and r.json()["width"] == 64
        p.close()


# -- slow and greedy clients against a real server (uvicorn as `deeplabv2 serve` runs it) -------
@pytest.fixture
def own_predictor(checkpoint):
    """A predictor (queue of 2) for one server: the server's shutdown closes it."""
    p = Predictor(checkpoint, device="cpu", queue_size=2)
    yield p
    p.close()


@contextlib.contextmanager
def served(app):
    """``server_config(app)``, the configuration `deeplabv2 serve` runs, on 127.0.0.1 and a
    free port in a thread; yields the port. Stops when the block ends."""
    import socket
    import uvicorn
    from deeplabv2.app.server import server_config
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(server_config(app, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started or not thread.is_alive(), 30)
    assert server.started, "server did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def _answer(buf: bytes):
    """``(status, headers, body)`` of one whole HTTP answer in ``buf``, or None if incomplete."""
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in
                   (line.split(":", 1) for line in lines[1:]))
    if len(body) < int(headers.get("content-length", 0)):
        return None
    return int(lines[0].split()[1]), headers, body


def _json_error(answer, status, why=""):
    """``answer`` is a ``status`` refusal whose JSON ``error`` contains ``why``."""
    assert answer is not None, "no answer"
    got, headers, body = answer
    assert got == status, (got, body)
    assert headers["content-type"] == "application/json", headers
    error = json.loads(body)["error"]
    assert isinstance(error, str) and why in error, error
    return headers


class SlowClient(threading.Thread):
    """One connection that sends ``head`` and then ``piece`` every ``every`` seconds until the
    server answers (or, with ``keep_sending``, closes), or ``seconds`` pass: it stops by
    itself. ``answer``: what it got (see :func:`_answer`); ``took``: seconds from connecting
    to the answer; ``closed``: the server closed the connection, ``ended`` seconds after
    connecting."""

    def __init__(self, port, head: bytes, piece: bytes, every=0.25, seconds=15,
                 keep_sending=False):
        super().__init__(daemon=True)
        self.keep_sending = keep_sending
        self.port, self.head, self.piece, self.every = port, head, piece, every
        self.seconds = seconds
        self.answer = self.took = self.ended = None
        self.closed = False

    def run(self):
        import select
        import socket
        start = time.monotonic()
        buf = b""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(self.head)
            while time.monotonic() - start < self.seconds:
                if select.select([s], [], [], self.every)[0]:
                    try:
                        data = s.recv(65536)
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        self.closed, self.ended = True, time.monotonic() - start
                        break
                    buf += data
                    if self.answer is None and _answer(buf):
                        self.answer, self.took = _answer(buf), time.monotonic() - start
                elif self.answer is None or self.keep_sending:
                    try:
                        s.sendall(self.piece)
                    except OSError:
                        break


def _request(port, method, path, body=None, headers=None, timeout=5):
    """One request on a fresh connection: ``(status, headers, body)``; fails after
    ``timeout`` seconds without an answer."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_trickling_headers_lock_nobody_out(own_predictor):
    """30 connections that send a request line and then one header line at a time (uvicorn's
    connection limit of 16 answered everyone else a plain-text 503 while they trickled): a
    normal client keeps being served meanwhile, and each trickler gets a JSON 408 and is
    closed once the header deadline has passed."""
    app = create_app(own_predictor, timeout_s=30, header_timeout_s=4)
    limits = app.state.limits
    with served(app) as port:
        slow = [SlowClient(port, b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                           b"X-Slow: 1\r\n") for _ in range(30)]
        for c in slow:
            c.start()
        _wait_for(lambda: limits.connections >= 30, 10)
        data = encode(photo())
        for _ in range(2):
            status, _, body = _request(port, "POST", "/api/predict?format=json", data)
            assert status == 200 and json.loads(body)["width"] == 64
            assert _request(port, "GET", "/api/health")[0] == 200
        assert all(c.answer is None for c in slow), "served only after the tricklers were cut"
        for c in slow:
            c.join(15)
            _json_error(c.answer, 408, "request headers not complete within 4 s")
            assert c.closed and 4 <= c.took < 12
        _wait_for(lambda: limits.connections == 0, 10)
        assert _request(port, "POST", "/api/predict", data)[0] == 200
    assert own_predictor.admitted == 0


def test_slow_bodies_hold_no_queue_slot(own_predictor):
    """4 connections that announce a 5 MB body and send it a byte at a time (they held every
    slot of the queue, and everyone else got 503 until the 60 s timeout): a request counts
    against the queue only once its body is in, so normal clients are served while they
    trickle, and each slow one is cut off with a JSON 408 at the body deadline, also when
    it reconnects."""
    app = create_app(own_predictor, timeout_s=30, body_timeout_s=2)
    limits = app.state.limits
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 5000000\r\n\r\n\x89")
    data = encode(photo())
    statuses = []
    with served(app) as port:
        for _ in range(2):  # the second round: the slow clients reconnect
            slow = [SlowClient(port, head, b"\0") for _ in range(4)]
            for c in slow:
                c.start()
            _wait_for(lambda: limits.receiving == 4, 10)
            while any(c.answer is None for c in slow):  # served while they trickle
                assert own_predictor.admitted == 0  # the slow ones hold no slot
                statuses.append(_request(port, "POST", "/api/predict", data)[0])
                time.sleep(0.1)
            for c in slow:
                c.join(10)
                _json_error(c.answer, 408, "the upload did not arrive within 2 s")
                assert c.closed and 2 <= c.took < 6
            assert statuses and set(statuses) == {200}, statuses
    assert own_predictor.admitted == 0 and limits.buffered == 0 and limits.receiving == 0


def test_a_body_nobody_reads_is_cut_at_the_body_deadline(own_predictor):
    """A request answered before its body ended (``GET /api/health`` announcing a 5 MB body,
    which it goes on sending a byte at a time): uvicorn read and discarded the rest with no
    deadline, so such a connection was held until the body ended; it is closed at the body
    deadline after the answer."""
    app = create_app(own_predictor, timeout_s=30, body_timeout_s=1)
    with served(app) as port:
        c = SlowClient(port, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Length: 5000000\r\n\r\n\0", b"\0", seconds=8,
                       keep_sending=True)
        c.start()
        c.join(10)
        assert c.answer is not None and c.answer[0] == 200
        assert c.closed and c.ended < 4


def test_over_limit_upload_gets_413_not_a_broken_pipe(own_predictor):
    """A body over the limit sent the way Python's urllib sends it (all of it, then read; no
    ``Expect``) is read and thrown away, then answered 413 (it got a connection reset); one
    sent with ``Expect: 100-continue`` is answered before the body, which never comes."""
    import http.client
    import socket
    import urllib.error
    import urllib.request
    app = create_app(own_predictor, max_upload_mb=1, timeout_s=30, body_timeout_s=10)
    with served(app) as port:
        url = f"http://127.0.0.1:{port}/api/predict"
        big = b"\0" * (20 * 1024 * 1024)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, data=big), timeout=10)
        assert e.value.code == 413 and e.value.headers["content-type"] == "application/json"
        assert "larger than the limit of 1,048,576 bytes" in json.loads(e.value.read())["error"]
        # the same with a refused query, and with no Content-Length (chunked)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url + "?format=tiff", data=big),
                                   timeout=10)
        assert e.value.code == 400 and "format='tiff'" in json.loads(e.value.read())["error"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/api/predict", body=iter([b"\0" * 65536] * 320),
                     encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        r = conn.getresponse()
        assert r.status == 413 and "larger than the limit" in json.loads(r.read())["error"]
        conn.close()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Length: 20000000\r\nExpect: 100-continue\r\n\r\n")
            buf = b""
            while _answer(buf) is None and (chunk := s.recv(4096)):
                buf += chunk
            assert _json_error(_answer(buf), 413, "larger than the limit")["connection"] == \
                "close"
        assert _request(port, "POST", "/api/predict", encode(photo()))[0] == 200
    assert app.state.limits.buffered == 0


def test_every_refusal_is_json(own_predictor, monkeypatch):
    """What the protocol refuses (a malformed request, headers too slow), the connection
    bound, the bound on bodies held in memory, unknown paths and methods, and a failure of
    ours: each answered as ``{"error": ...}`` with a JSON content type (uvicorn answered the
    first three in plain text)."""
    import socket
    app = create_app(own_predictor, timeout_s=30, header_timeout_s=1, max_connections=3,
                     buffer_mb=0.05)
    limits = app.state.limits

    def raw(port, request: bytes, seconds=5):
        with socket.create_connection(("127.0.0.1", port), timeout=seconds) as s:
            s.sendall(request)
            buf = b""
            while _answer(buf) is None and (chunk := s.recv(4096)):
                buf += chunk
            return _answer(buf)

    with served(app) as port:
        _json_error(raw(port, b"NOT HTTP AT ALL\r\n\r\n"), 400, "invalid HTTP request")
        _json_error(raw(port, b"GET /api/health HTTP/1.1\r\n"), 408,
                    "request headers not complete within 1 s")
        _json_error(_request(port, "GET", "/nowhere"), 404, "no such page: /nowhere")
        headers = _json_error(_request(port, "GET", "/api/predict"), 405, "GET is not allowed")
        assert headers["allow"] == "POST"
        headers = _json_error(_request(port, "POST", "/api/predict", b"\0" * 100_000), 503,
                              "uploads in progress fill the 52,428 bytes")
        assert headers["retry-after"] == "1"
        monkeypatch.setattr(own_predictor, "info", lambda: 1 / 0)
        _json_error(_request(port, "GET", "/api/model"), 500, "internal error")
        # three connections open (that send nothing): the fourth's request is refused
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            _wait_for(lambda: limits.connections == 3, 5)
            headers = _json_error(_request(port, "GET", "/api/health"), 503,
                                  "busy: 3 connections already open")
            assert headers["retry-after"] == "1" and headers["connection"] == "close"
            for s in idle:  # nothing asked, nothing answered: closed at the header deadline
                s.settimeout(5)
                assert s.recv(4096) == b""
        finally:
            for s in idle:
                s.close()
        _wait_for(lambda: limits.connections == 0, 5)
        assert _request(port, "GET", "/api/health")[0] == 200
