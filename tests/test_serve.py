"""`deeplabv2 serve`'s HTTP API through Starlette's test client: a good image in each output
format, every bad input answered with a 4xx that says why, the queue bound (503) and the
request timeout (504)."""

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
