"""`embedpipe serve`: the real server in a subprocess on 127.0.0.1, real HTTP requests.

One server (a logreg head on the Fashion-MNIST store, --max-upload-mb 1, --max-pixels 1000000)
serves every test of this module; the last test stops it with SIGINT (Ctrl-C).
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from clitools import ok, read_csv, runner
from imagegen import make_aspect_bombs
from PIL import Image

from embedpipe.cli import app
from embedpipe.heads import artifacts
from embedpipe.store import open_store

MAX_UPLOAD = 1024 * 1024  # --max-upload-mb 1
MAX_PIXELS = 1_000_000


def multipart(files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for field, name, data in files:
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
                  f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                  .encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def post(url: str, files: list[tuple[str, str, bytes]], query: str = "",
         timeout: float = 60) -> tuple[int, dict]:
    body, ctype = multipart(files)
    req = urllib.request.Request(f"{url}/predict{query}", data=body, method="POST",
                                 headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{url}{path}", timeout=30) as r:
        assert r.status == 200
        return json.loads(r.read())


class Server:
    def __init__(self, head: Path):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "embedpipe.cli", "serve", str(head), "--host", "127.0.0.1",
             "--port", "0", "--max-upload-mb", "1", "--max-pixels", str(MAX_PIXELS),
             "--max-batch", "16", "--batch-wait-ms", "20"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.url: str | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.output}"
            if self.url:
                try:
                    if get(self.url, "/health")["status"] == "ok":
                        return self.url
                except OSError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.output}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)


@pytest.fixture(scope="module")
def head(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "logreg.skops"
    ok("fit", fmnist_store, "--head", "logreg", "--param", "C=0.1", "-o", out, "-q")
    return out


@pytest.fixture(scope="module")
def server_proc(head: Path):
    srv = Server(head)  # loads while the module's other fixtures run
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def images(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real test-split images: one PNG per class, two large JPEGs (reduced-size draft decode),
    one of them EXIF-rotated, and an RGBA PNG (alpha composited on white)."""
    root = Path(open_store(fmnist_store, features=False).runs[0]["source"])
    pngs = [sorted((root / "test" / c).glob("*.png"))[0]
            for c in sorted(p.name for p in (root / "test").iterdir())]
    extra = tmp_path_factory.mktemp("serve-images")
    big = Image.open(pngs[1]).convert("RGB").resize((600, 600), Image.BICUBIC)
    big.save(extra / "big.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: decoded upright, draft size swapped
    Image.open(pngs[2]).convert("RGB").resize((640, 560)).save(extra / "rotated.jpg",
                                                                 exif=exif, quality=90)
    rgba = Image.open(pngs[3]).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(extra / "alpha.png")
    return pngs + [extra / "big.jpg", extra / "rotated.jpg", extra / "alpha.png"]


@pytest.fixture(scope="module")
def expected(server_proc: Server, head: Path, images: list[Path],
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """`embedpipe predict HEAD IMAGES` (run while the server starts), by file name."""
    out = tmp_path_factory.mktemp("serve-csv") / "pred.csv"
    ok("predict", head, *images, "-o", out, "--top-k", "3", "-q", "--workers", "0")
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(images)
    return {Path(r["path"]).name: r for r in rows}


@pytest.fixture(scope="module")
def url(server_proc: Server, expected: dict) -> str:
    return server_proc.wait_ready()


def test_predict_matches_embedpipe_predict(url: str, images: list[Path], expected: dict):
    status, body = post(url, [("files", p.name, p.read_bytes()) for p in images])
    assert status == 200, body
    preds = body["predictions"]
    assert [p["filename"] for p in preds] == [p.name for p in images]
    for p in preds:
        row = expected[p["filename"]]
        assert p["class"] == row["predicted"], (p, row)
        assert abs(p["confidence"] - float(row["confidence"])) < 1e-4, (p, row)
        assert [t["class"] for t in p["top_k"]] == [row["top1"], row["top2"], row["top3"]]
        for i, t in enumerate(p["top_k"], 1):
            assert abs(t["probability"] - float(row[f"top{i}_prob"])) < 1e-4
        assert p["top_k"][0]["probability"] == pytest.approx(p["confidence"])
    # one image in the `file` field, and a per-request top_k
    status, body = post(url, [("file", images[0].name, images[0].read_bytes())], "?top_k=5")
    assert status == 200, body
    (one,) = body["predictions"]
    assert one["class"] == expected[images[0].name]["predicted"] and len(one["top_k"]) == 5


def test_bad_uploads_get_4xx_with_a_message(url: str, images: list[Path]):
    png = images[0].read_bytes()
    cases = {
        "not an image": ([("file", "notes.txt", b"hello, not an image\n" * 10)], 422,
                         "not an image"),
        "truncated": ([("file", "cut.png", png[: len(png) // 2])], 422, "truncated"),
        "empty": ([("file", "empty.png", b"")], 422, "empty"),
        "wrong field": ([("image", "a.png", png)], 400, "no file"),
        "no parts": ([], 400, "no file"),
        "one bad in a batch": ([("files", "ok.png", png), ("files", "bad.jpg", b"\xff\xd8junk")],
                               422, "bad.jpg"),
    }
    for what, (files, code, needle) in cases.items():
        status, body = post(url, files)
        assert status == code, (what, status, body)
        assert needle in body["detail"], (what, body)
    # not multipart at all
    req = urllib.request.Request(f"{url}/predict", data=b'{"x": 1}', method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "multipart/form-data" in json.loads(e.value.read())["detail"]
    # too many pixels: a small file that declares 1.2 MP (> --max-pixels 1000000)
    buf = io.BytesIO()
    Image.new("L", (1200, 1000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < MAX_UPLOAD
    status, body = post(url, [("file", "huge.png", buf.getvalue())])
    assert status == 413 and "1200x1000" in body["detail"], body
    assert get(url, "/health")["status"] == "ok"


def _peak_rss_mib(pid: int) -> float:
    """VmHWM (the peak resident set size) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_aspect_ratio_bombs_answer_as_their_centre_crop_in_bounded_memory(
        server_proc: Server, url: str, head: Path, tmp_path: Path):
    """A 20000 x 1 and a 1 x 20000 PNG (a few hundred bytes; before the fix one such upload
    took the server from 1.0 to 6.3 GB) are answered as their documented 16:1 centre crops,
    by the server and by `embedpipe predict HEAD IMAGES`, and the server's peak memory does
    not grow by more than a plain upload's working set."""
    pairs = make_aspect_bombs(tmp_path, 20000)
    files = [tmp_path / n for pair in pairs.items() for n in pair]
    before = _peak_rss_mib(server_proc.proc.pid)
    status, body = post(url, [("files", p.name, p.read_bytes()) for p in files])
    assert status == 200, body
    after = _peak_rss_mib(server_proc.proc.pid)
    assert after < before + 128, (before, after)
    served = {p["filename"]: p for p in body["predictions"]}
    out = tmp_path / "pred.csv"
    ok("predict", head, *files, "-o", out, "-q", "--workers", "0")
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    for bomb, crop in pairs.items():
        assert served[bomb]["class"] == served[crop]["class"] == rows[bomb]["predicted"]
        assert served[bomb]["confidence"] == pytest.approx(served[crop]["confidence"], abs=1e-5)
        assert float(rows[bomb]["confidence"]) == pytest.approx(served[bomb]["confidence"],
                                                                abs=1e-4)
        assert float(rows[bomb]["confidence"]) == pytest.approx(float(rows[crop]["confidence"]),
                                                                abs=1e-5)


def test_oversize_upload_is_refused_with_413(url: str):
    host, port = url.removeprefix("http://").split(":")
    # Declared too large: refused from the headers, before any of the body is sent.
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(50 * MAX_UPLOAD))
    conn.endheaders()
    t0 = time.monotonic()
    r = conn.getresponse()
    assert r.status == 413 and "too large" in json.loads(r.read())["detail"]
    assert time.monotonic() - t0 < 10
    conn.close()
    # Streamed without a length (chunked): cut off once past the limit.
    body, ctype = multipart([("file", "big.bin", os.urandom(MAX_UPLOAD + 200_000))])
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
    conn.request("POST", "/predict", body=chunks, headers={"Content-Type": ctype},
                 encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and "too large" in json.loads(r.read())["detail"]
    conn.close()
    # The server is still fine; a body just under the limit is read (and is not an image).
    status, out = post(url, [("file", "noise.bin", os.urandom(MAX_UPLOAD - 4096))])
    assert status == 422 and "not an image" in out["detail"], out
    assert get(url, "/health")["status"] == "ok"


def test_info_describes_backbone_head_and_classes(url: str, head: Path):
    info = get(url, "/info")
    h = artifacts.load(head)
    ident = h.identity
    assert info["backbone"]["model"] == ident["model"] == "tf_efficientnet_lite0"
    assert info["backbone"]["weights"]["sha256"] == ident["weights_sha256"]
    assert f"{info['backbone']['weights']['source']}:{info['backbone']['weights']['location']}" \
        == ident["weights_source"]
    cfg = ident["data_config"]
    assert info["backbone"]["data_config"] == (json.loads(cfg) if isinstance(cfg, str) else cfg)
    assert info["backbone"]["precision"] == "fp32" and info["backbone"]["feature_dim"] == 1280
    assert info["head"]["head"] == "logreg"
    # the parameters as fitted, defaults included, as the head's manifest records them
    assert info["head"]["effective_params"] == h.manifest["effective_params"]
    assert info["head"]["effective_params"]["prep"] == "sqrt+l2"
    assert info["head"]["probabilities"] == "native"
    assert info["classes"] == h.classes and len(info["classes"]) == 10
    assert info["versions"]["head"] == h.manifest["versions"]
    assert {"torch", "timm", "fastapi", "uvicorn"} <= set(info["versions"]["server"])
    assert info["limits"]["max_upload_bytes"] == MAX_UPLOAD
    assert info["limits"]["max_pixels"] == MAX_PIXELS


def test_load_no_failures_and_requests_are_batched(url: str, images: list[Path],
                                                   expected: dict):
    n, concurrency = 200, 16
    payloads = [(p.name, p.read_bytes()) for p in images]
    before = get(url, "/metrics")

    def one(i: int) -> tuple[int, str, str]:
        name, data = payloads[i % len(payloads)]
        status, body = post(url, [("file", name, data)], timeout=120)
        return status, name, body["predictions"][0]["class"] if status == 200 else str(body)

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    seconds = time.monotonic() - t0
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    wrong = [(name, cls) for _, name, cls in results if cls != expected[name]["predicted"]]
    assert not wrong, wrong[:5]
    after = get(url, "/metrics")
    images_done = after["images"] - before["images"]
    batches = after["batches"] - before["batches"]
    assert images_done == n
    assert batches < n / 2, (batches, after)  # concurrent requests shared forward passes
    assert after["largest_batch"] > 1
    print(f"{n} requests, {concurrency} concurrent: {seconds:.1f} s, {n / seconds:.1f} req/s, "
          f"{batches} batches (mean {images_done / batches:.1f})")


def test_cli_errors_are_one_line(head: Path, tmp_path: Path):
    res = runner.invoke(app, ["serve", str(tmp_path / "nope.skops"), "--port", "0"])
    assert res.exit_code == 2 and "no such head file" in res.output, res.output
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        res = runner.invoke(app, ["serve", str(head), "--port", str(busy.getsockname()[1])])
        assert res.exit_code == 2 and "cannot listen on" in res.output, res.output
    finally:
        busy.close()
    res = runner.invoke(app, ["serve", str(head), "--port", "0", "--max-batch", "0"])
    assert res.exit_code == 2 and "--max-batch" in res.output, res.output
    for port in ("70000", "-1", "65536"):  # socket raised OverflowError: "a bug in embedpipe"
        res = runner.invoke(app, ["serve", str(head), "--port", port])
        assert res.exit_code == 2 and f"--port {port}: pass a TCP port from 0 to 65535" in \
            res.output and "bug" not in res.output, res.output


def test_a_max_batch_that_does_not_fit_is_refused_before_listening(head: Path):
    """--max-batch is how many uploads one forward pass takes: a batch that cannot fit in
    memory was accepted, and the server listened until a burst of requests filled it. Now
    it is measured at start-up (the model's activations on the meta device, as `extract
    --batch-size`: extract.runtime.check_batch_memory) and refused in one line, before the
    server listens, naming the largest --max-batch that fits; the process stays far below
    the batch's need."""
    import torch
    from clitools import lite0_image_bytes, refused_for_memory, run_measured

    from embedpipe.finetune.memory import available_bytes

    have = available_bytes(torch.device("cpu"))
    assert have is not None
    per = lite0_image_bytes(224)
    batch = int(2 * have[0] / per) + 1  # needs over twice the memory available
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res, peak_kib = run_measured("serve", head, "--port", port, "--max-batch", batch)
    line, avail, fits = refused_for_memory(
        res, peak_kib, f"error: --max-batch {batch} at 224x224 px: a forward pass needs about ",
        "--max-batch")
    assert fits < batch and abs(fits - avail / per) <= 0.02 * fits, (line, per)  # GiB to 0.1


def test_ctrl_c_stops_cleanly(server_proc: Server, url: str):
    """Runs last: stops the module's server."""
    assert "listening on http://127.0.0.1:" in server_proc.output
    server_proc.proc.send_signal(signal.SIGINT)
    assert server_proc.proc.wait(30) == 0
    server_proc._reader.join(5)
    assert "stopped" in server_proc.output and "Traceback" not in server_proc.output, \
        server_proc.output


def test_an_upload_whose_features_overflow_gets_422_naming_it(head: Path, images: list[Path],
                                                               monkeypatch):
    """A backbone that overflows (fp16, a broken --weights file) for one upload of a batch:
    the upload was classified from NaN features (this logreg head's compact form answered a
    class with confidence nan). Now it is answered as an upload that does not decode (422
    naming it, extraction's reason and fix), and the others of its batch are classified."""
    from starlette.testclient import TestClient

    from embedpipe.extract import runtime
    from embedpipe.serve import Model, Settings, create_app

    model = Model(head, runtime="torch")
    real = runtime.Engine.__call__
    poison = {"row": None}

    def overflowing(self, views, **kw):
        feats = real(self, views, **kw)
        if poison["row"] is not None and len(feats) > poison["row"]:
            feats[poison["row"], 3] = float("nan")
        return feats

    monkeypatch.setattr(runtime.Engine, "__call__", overflowing)
    tensors = [model.preprocess(p.read_bytes()) for p in images[:3]]
    clean = model.run(tensors)
    poison["row"] = 1
    got = model.run(tensors)
    assert got[0] == clean[0] and got[2] == clean[2]
    assert "NaN, infinite or huge features" in got[1]["error"]
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in images[:2]]
    with TestClient(create_app(model, Settings())) as client:  # its lifespan starts the batcher
        res = client.post("/predict", files=files)
        assert res.status_code == 422, res.text
        assert res.json()["detail"].startswith(f"{images[1].name}: the backbone gave NaN")
        poison["row"] = None
        assert client.post("/predict", files=files).status_code == 200
