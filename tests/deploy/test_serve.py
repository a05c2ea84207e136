"""The HTTP service: answers, schema, bad input, concurrency, and agreement with `xferlearn predict`."""

import base64
import hashlib
import io
import json
import socket
import struct
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from xferlearn.cli import main
from xferlearn.errors import XferlearnError
from xferlearn.models.predictor import load_predictor as load
from xferlearn.deploy.serve import create_app, serve_in_thread

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "samples_original"
LIMIT = 256 * 1024  # a small upload limit, so that "too large" costs little to send
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- images ---------------------------------------------------------------------------
def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def square(level: int, size: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(level, level + 100, (size, size, 3), dtype=np.uint8)


def noise_jpeg(size: int = 256) -> bytes:
    return encoded(np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8), "JPEG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header and holds no pixels: what a decompression bomb shows first."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return PNG_MAGIC + header + png_chunk(b"IEND", b"")


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("scan.jpeg", noise_jpeg(32))
    return buffer.getvalue()


def bad_crc_png() -> bytes:
    data = bytearray(encoded(square(150)))
    data[29] ^= 0xFF  # the IHDR checksum
    return bytes(data)


def multipart_chunks(total: int):
    """A multipart body sent in chunks without a Content-Length, as a streaming client would."""
    yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
    for _ in range(total // 65536):
        yield b"\0" * 65536


def xray(kind: str = "PNEUMONIA") -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"shared data is absent ({SAMPLES}); this test needs real X-rays")
    return sorted((SAMPLES / kind).glob("*.jpeg"))[0]


# --- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tiny_run):
    return TestClient(create_app(tiny_run, max_upload_bytes=LIMIT))


@pytest.fixture(scope="module")
def live(tiny_run):
    """The app behind a real uvicorn on 127.0.0.1 and a free port: (base url, app)."""
    app = create_app(tiny_run, max_upload_bytes=LIMIT)
    with serve_in_thread(app) as url:
        yield url, app


def upload(data: bytes, name: str = "scan.png", media_type: str = "image/png") -> dict:
    return {"files": {"file": (name, data, media_type)}}


# --- answers --------------------------------------------------------------------------
def test_health_and_model_card(client, tiny_run):
    health = client.get("/health").json()
    card = client.get("/model").json()
    checkpoint = load(tiny_run).checkpoint
    assert health["status"] == "ok" and health["max_upload_bytes"] == LIMIT
    assert card["model_id"] == health["model_id"]
    assert card["classes"] == ["NORMAL", "PNEUMONIA"] and card["positive_class"] == "PNEUMONIA"
    assert card["backbone"] == checkpoint.backbone and card["weights"] == checkpoint.weights == "none"
    assert card["threshold"] == pytest.approx(checkpoint.threshold)
    assert card["threshold_source"] == checkpoint.threshold_source
    assert card["temperature"] == pytest.approx(checkpoint.temperature) and card["input_size"] == 64
    assert card["preprocessing"] == checkpoint.preprocessing.to_dict()
    assert card["metrics"]["auc"] == pytest.approx(checkpoint.metrics["auc"])
    assert "state_dict" not in card


def test_model_id_is_backbone_and_checkpoint_hash(client, tiny_run):
    digest = hashlib.sha256((Path(tiny_run) / "model.pt").read_bytes()).hexdigest()[:12]
    backbone = load(tiny_run).checkpoint.backbone
    assert client.get("/health").json()["model_id"] == f"{backbone}-{digest}"
    # A loaded Predictor has no file to hash: its id comes from the weights and card, and is stable.
    predictor = load(tiny_run)
    first = TestClient(create_app(predictor)).get("/health").json()["model_id"]
    assert first == TestClient(create_app(predictor)).get("/health").json()["model_id"]
    assert first.startswith(f"{backbone}-") and first != f"{backbone}-{digest}"


def test_predict_answers_with_class_probabilities_and_threshold(client):
    response = client.post("/predict", **upload(encoded(square(150, seed=99))))
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"file", "class", "probabilities", "threshold", "threshold_source", "positive_class",
                         "model_id"}  # no heatmap unless asked for
    assert body["class"] in ("NORMAL", "PNEUMONIA") and body["file"] == "scan.png"
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    positive = body["probabilities"][body["positive_class"]]
    assert body["class"] == (body["positive_class"] if positive >= body["threshold"] else
                             next(c for c in body["probabilities"] if c != body["positive_class"]))


def test_openapi_lists_the_endpoints_with_their_schemas(client):
    spec = client.get("/openapi.json").json()

    def ok_schema(path, method):
        return spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]

    assert ok_schema("/predict", "post").endswith("/Prediction")
    assert ok_schema("/health", "get").endswith("/Health")
    assert ok_schema("/model", "get").endswith("/ModelCard")
    for status in ("400", "413", "415", "422"):
        ref = spec["paths"]["/predict"]["post"]["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody")
    schemas = spec["components"]["schemas"]
    assert {"class", "probabilities", "threshold", "threshold_source", "positive_class", "model_id",
            "heatmap_png_base64"} <= set(schemas["Prediction"]["properties"])
    assert "class" in schemas["Prediction"]["required"]
    assert {"classes", "backbone", "weights", "threshold", "threshold_source", "temperature", "input_size",
            "metrics"} <= set(schemas["ModelCard"]["required"])
    form = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in form


# --- bad input ------------------------------------------------------------------------
BAD_UPLOADS = {
    # name: (request keyword arguments, expected status, a word the message must hold)
    "text-named-jpeg": (upload(b"just some notes\n", "notes.jpg", "image/jpeg"), 422, "not an image"),
    "empty-file": (upload(b"", "empty.jpg", "image/jpeg"), 422, "empty"),
    "truncated-jpeg": (upload(noise_jpeg()[:3000], "cut.jpg", "image/jpeg"), 422, "corrupt"),
    "truncated-png": (upload(encoded(square(150, 128))[:2000]), 422, "corrupt"),
    "random-bytes": (upload(np.random.default_rng(2).bytes(4096), "x.bin", "application/octet-stream"), 422, "image"),
    "html-as-png": (upload(b"<!doctype html><html><body>hi</body></html>"), 422, "not an image"),
    "svg": (upload(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "a.svg", "image/svg+xml"),
            422, "not an image"),
    "zip-archive": (upload(zip_bytes(), "scans.zip", "application/octet-stream"), 422, "not an image"),
    "png-bad-checksum": (upload(bad_crc_png()), 422, "image"),
    "png-zero-size": (upload(png_header_only(0, 0)), 422, "image"),
    "decompression-bomb": (upload(png_header_only(30000, 30000)), 422, "pixels"),
    "over-server-pixel-limit": (upload(png_header_only(9000, 9000)), 422, "pixels"),
    "just-over-size-limit": (upload(b"\0" * (LIMIT + 1)), 413, "limit"),
    "far-over-size-limit": (upload(b"\0" * (4 * LIMIT)), 413, "limit"),
    "chunked-over-size-limit": ({"content": multipart_chunks(2 * LIMIT),
                                 "headers": {"content-type": "multipart/form-data; boundary=b"}}, 413, "limit"),
    "image-sent-as-text-plain": (upload(noise_jpeg(32), "scan.jpg", "text/plain"), 415, "text/plain"),
    "json-file-part": (upload(b"{}", "scan.json", "application/json"), 415, "application/json"),
    "json-request": ({"json": {"file": "aGVsbG8="}}, 415, "multipart"),
    "raw-image-body": ({"content": noise_jpeg(32), "headers": {"content-type": "image/jpeg"}}, 415, "multipart"),
    "urlencoded-form": ({"data": {"file": "scan.jpg"}}, 415, "multipart"),
    "no-body": ({}, 415, "multipart"),
    "missing-file-field": ({"files": {"image": ("scan.png", encoded(square(150)), "image/png")}}, 422, "'file'"),
    "file-field-as-text": ({"data": {"file": "scan.png"}, "files": {"other": ("a.png", b"1", "image/png")}}, 422,
                           "file upload"),
    "multipart-without-boundary": ({"content": b"--x\r\n\r\n", "headers": {"content-type": "multipart/form-data"}},
                                   400, "boundary"),
    "invalid-explain-flag": ({"params": {"explain": "maybe"}, **upload(encoded(square(150)))}, 422, "explain"),
}


@pytest.mark.parametrize("kind", sorted(BAD_UPLOADS))
def test_bad_upload_gets_a_one_line_json_error_and_the_server_goes_on(client, kind):
    request, status, word = BAD_UPLOADS[kind]
    if kind == "chunked-over-size-limit":  # a generator is spent once; make a fresh one
        request = {**request, "content": multipart_chunks(2 * LIMIT)}
    response = client.post("/predict", **request)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and word in body["error"]
    assert client.get("/health").status_code == 200
    assert client.post("/predict", **upload(encoded(square(0)))).status_code == 200


def test_other_bad_requests_get_json_errors(client):
    for response, status in ((client.get("/predict"), 405), (client.get("/no-such-page"), 404),
                             (client.put("/health"), 405)):
        assert response.status_code == status and set(response.json()) == {"error"}


def test_real_server_survives_bad_uploads(live):
    url, _ = live
    with httpx.Client(base_url=url, timeout=60) as http:
        for kind in ("truncated-jpeg", "decompression-bomb", "json-request", "far-over-size-limit", "no-body"):
            request, status, _ = BAD_UPLOADS[kind]
            assert http.post("/predict", **request).status_code == status
        assert http.get("/health").json()["status"] == "ok"
        assert http.post("/predict", **upload(encoded(square(150)))).status_code == 200


# --- concurrency ----------------------------------------------------------------------
def test_a_slow_request_does_not_stall_the_others(live, monkeypatch):
    url, app = live
    predictor, gate = app.state.service.predictor, threading.Event()
    slow_image, original = encoded(square(150, seed=7)), predictor.decode

    def decode(item):
        if item == slow_image:
            assert gate.wait(60)
        return original(item)

    monkeypatch.setattr(predictor, "decode", decode)
    with httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(http.post, "/predict", **upload(slow_image))
        try:
            assert http.get("/health").status_code == 200
            assert http.post("/predict", **upload(encoded(square(0, seed=8)))).status_code == 200
            assert not slow.done()  # the first is still decoding, and the others went past it
        finally:
            gate.set()
        assert slow.result().status_code == 200


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(live, monkeypatch):
    url, app = live
    runner, predictor = app.state.service.runner, app.state.service.predictor
    images = [encoded(square(level, seed=s)) for s in range(6) for level in (0, 150)]
    with httpx.Client(base_url=url, timeout=60) as http:
        alone = [http.post("/predict", **upload(data)).json()["probabilities"] for data in images]

        sizes, original = [], predictor.probabilities

        def probabilities(batch):
            if not sizes:  # hold the first pass until the rest are queued behind it
                deadline = time.monotonic() + 30
                while len(runner._queue) < len(images) - 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
            sizes.append(len(batch))
            return original(batch)

        monkeypatch.setattr(predictor, "probabilities", probabilities)
        with ThreadPoolExecutor(len(images)) as pool:
            together = list(pool.map(lambda d: http.post("/predict", **upload(d)).json()["probabilities"], images))
    assert max(sizes) > 1 and sum(sizes) == len(images)
    for one, other in zip(alone, together):
        assert one == pytest.approx(other, abs=1e-5)


# --- agreement with the CLI, explanations, the command --------------------------------
@pytest.mark.data
def test_served_prediction_equals_xferlearn_predict(tiny_run, tmp_path):
    paths = [xray("NORMAL"), xray("PNEUMONIA")]
    client = TestClient(create_app(tiny_run))  # the default upload limit: original X-rays run to megabytes
    out = tmp_path / "predictions.json"
    assert main(["predict", str(tiny_run), *map(str, paths), "--format", "json", "-o", str(out)]) == 0
    for path, row in zip(paths, json.loads(out.read_text())):
        response = client.post("/predict", **upload(path.read_bytes(), path.name, "image/jpeg"))
        assert response.status_code == 200, response.text
        served = response.json()
        assert served["class"] == row["class"]
        for name, p in row["probabilities"].items():
            assert served["probabilities"][name] == pytest.approx(p, abs=1e-4)


def test_explain_adds_a_heatmap_png(client):
    response = client.post("/predict", params={"explain": "true"}, **upload(encoded(square(150, seed=3))))
    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["heatmap_png_base64"])
    assert png.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(png)) as image:
        assert image.width > 0 and image.height > 0


def test_decode_runs_outside_the_model_lock_and_grad_cam_inside_it(tiny_run, monkeypatch):
    import xferlearn.evaluation.explain

    app = create_app(tiny_run)
    service, seen = app.state.service, {}
    decode, explanation_png = service.predictor.decode, xferlearn.evaluation.explain.explanation_png

    def watched_decode(item):
        seen["decode"] = service.model_lock.locked()
        return decode(item)

    def watched_explanation_png(predictor, item):
        seen["explain"] = service.model_lock.locked()
        return explanation_png(predictor, item)

    monkeypatch.setattr(service.predictor, "decode", watched_decode)
    monkeypatch.setattr(xferlearn.evaluation.explain, "explanation_png", watched_explanation_png)
    response = TestClient(app).post("/predict", params={"explain": "true"}, **upload(encoded(square(150))))
    assert response.status_code == 200 and seen == {"decode": False, "explain": True}


def test_explanations_and_predictions_side_by_side_all_answer(live):
    url, _ = live
    images = [encoded(square(level, seed=s)) for s in range(3) for level in (0, 150)]
    with httpx.Client(base_url=url, timeout=120) as http:
        alone = [http.post("/predict", **upload(data)).json()["probabilities"] for data in images]

        def both(data):
            explained = http.post("/predict", params={"explain": "true"}, **upload(data))
            return explained, http.post("/predict", **upload(data))

        with ThreadPoolExecutor(2 * len(images)) as pool:
            answers = list(pool.map(both, images + images))
    for expected, (explained, plain) in zip(alone + alone, answers):
        assert explained.status_code == plain.status_code == 200
        assert base64.b64decode(explained.json()["heatmap_png_base64"]).startswith(PNG_MAGIC)
        assert plain.json()["probabilities"] == pytest.approx(expected, abs=1e-5)
        assert explained.json()["probabilities"] == pytest.approx(expected, abs=1e-5)


def test_cli_serve_refuses_a_taken_port_and_a_bad_limit(tiny_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tiny_run), "--port", str(port)]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert main(["serve", str(tiny_run), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb" in capsys.readouterr().err


# --- engines ----------------------------------------------------------------------------
def test_serve_on_onnx_int8_answers_predict_and_health_at_its_own_threshold(tiny_run, tmp_path):
    import shutil

    run = shutil.copytree(tiny_run, tmp_path / "run")
    app = create_app(run, LIMIT, engine="onnx-int8")  # exports and quantises on first use, as predict does
    card = json.loads((run / "export" / "model.json").read_text())
    client, torch_client = TestClient(app), TestClient(create_app(run, LIMIT))
    health = client.get("/health").json()
    assert health["engine"] == "onnx-int8" and health["model_id"] == torch_client.get("/health").json()["model_id"]
    model = client.get("/model").json()
    assert model["engine"] == "onnx-int8" and model["threshold"] == pytest.approx(card["int8"]["threshold"])
    assert model["threshold_source"] == card["int8"]["threshold_source"]
    images = [encoded(square(level, seed=s)) for s in range(3) for level in (0, 150)]
    with ThreadPoolExecutor(len(images)) as pool:  # concurrent requests go through the batching runner
        served = list(pool.map(lambda d: client.post("/predict", **upload(d)), images))
    for response, data in zip(served, images):
        assert response.status_code == 200, response.text
        body, reference = response.json(), torch_client.post("/predict", **upload(data)).json()
        assert body["threshold"] == pytest.approx(card["int8"]["threshold"])
        p8, p32 = body["probabilities"]["PNEUMONIA"], reference["probabilities"]["PNEUMONIA"]
        assert p8 == pytest.approx(p32, abs=0.1)  # int8 rounding, on a tiny random-init model
    # Grad-CAM needs PyTorch: the checkpoint's network is loaded for it on first request.
    explained = client.post("/predict", params={"explain": "true"}, **upload(images[0]))
    assert explained.status_code == 200 and base64.b64decode(explained.json()["heatmap_png_base64"]).startswith(PNG_MAGIC)


def test_serve_refuses_an_unknown_engine_and_onnx_for_a_loaded_predictor(tiny_run, capsys):
    with pytest.raises(SystemExit):  # argparse's choices come from config.ENGINES
        main(["serve", str(tiny_run), "--engine", "tensorrt"])
    with pytest.raises(XferlearnError, match="engine must be one of"):
        create_app(tiny_run, engine="tensorrt")
    with pytest.raises(XferlearnError, match="loaded Predictor runs on PyTorch"):
        create_app(load(tiny_run), engine="onnx")
# --- issue 12: no server paths, one image per request, bounded decodes ---------------------------------
def test_model_card_shows_no_server_paths(client, tiny_run):
    text = client.get("/model").text
    card = json.loads(text)
    for place in (str(tiny_run), str(tiny_run.parent), "/tmp", "best.ckpt", str(Path.home())):
        assert place not in text, place
    assert "data" not in card["config"] and "out" not in card["config"] and "cache_dir" not in card["config"]
    assert "best_checkpoint" not in card["metrics"]["selection"]
    assert card["config"]["backbone"] == "resnet18"  # the rest of the card is kept


def test_several_file_parts_are_refused(client):
    files = [("file", ("a.png", encoded(square(40)), "image/png")), ("file", ("b.png", encoded(square(150)), "image/png"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 422 and "one image per request" in response.json()["error"]
    assert "(got 2)" in response.json()["error"]


def test_decode_slots_follow_memory(monkeypatch):
    import os

    from xferlearn.deploy import guards

    assert 1 <= guards.decode_slots() <= max(2, os.cpu_count() or 1)
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096}.get(name, 1000))  # 4 MB free
    assert guards.decode_slots() == 1
