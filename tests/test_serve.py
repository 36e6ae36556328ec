"""`retinanet serve` answered with real HTTP requests on 127.0.0.1."""

import io
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from helpers import require_peer

httpx = require_peer("httpx", "pip install httpx fastapi uvicorn python-multipart (the test extra)")
require_peer("fastapi", "pip install fastapi uvicorn python-multipart (the test extra)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((90 + seed % 4, 120, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(shapes_model_file):
    from retinanet import load_model

    proc, url = start_server(shapes_model_file, "--max-bytes", "200000")
    yield url, load_model(shapes_model_file)
    stop_server(proc)


def start_server(weights, *options: str) -> tuple[subprocess.Popen, str]:
    """`retinanet serve --weights weights *options` on a free port of 127.0.0.1, answering
    /health; its log (stdout and stderr) is read by `stop_server`."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "retinanet.cli", "serve", "--weights", str(weights), "--port",
                             str(port), *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("the server did not start: " + proc.communicate()[0][-3000:])


def stop_server(proc: subprocess.Popen) -> str:
    """Stop a server of `start_server`; its log."""
    proc.terminate()
    return proc.communicate(timeout=30)[0]


@pytest.mark.slow
def test_health_and_info(server):
    url, model = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    info = httpx.get(url + "/info").json()
    assert info["classes"] == model.class_names and info["backend"] == "torch"


@pytest.mark.slow
def test_twenty_concurrent_uploads_are_answered_correctly(server):
    """Correct answers, and the same answers, to the digit, as each image sent alone: an answer
    does not depend on the other traffic (concurrent requests of one size once ran as one batch,
    and scores moved in the fifth decimal with the batch's composition)."""
    url, model = server
    from retinanet.data.image_io import read_image_bytes

    images = [_jpeg(i) for i in range(20)]

    def upload(i):
        if i % 2:
            return httpx.post(url + "/predict", files={"file": (f"{i}.jpg", images[i], "image/jpeg")}, timeout=120)
        return httpx.post(url + "/predict", content=images[i], headers={"content-type": "image/jpeg"}, timeout=120)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(upload, range(20)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for i, response in enumerate(responses):
        body = response.json()
        expected = model.predict(read_image_bytes(images[i]))
        assert (body["width"], body["height"]) == (120, 90 + i % 4)
        assert len(body["detections"]) == len(expected["scores"]) > 0
        got = sorted(d["score"] for d in body["detections"])
        assert np.allclose(got, sorted(expected["scores"].tolist()), atol=1e-4)
        assert all(d["class_name"] in model.class_names for d in body["detections"])
    alone = [upload(i).json() for i in range(20)]
    assert [r.json() for r in responses] == alone


@pytest.mark.slow
def test_bad_requests_get_4xx_and_the_service_keeps_answering(server):
    url, _ = server
    too_big = httpx.post(url + "/predict", content=b"\xff" * 300_000, headers={"content-type": "image/jpeg"})
    assert too_big.status_code == 413
    not_image = httpx.post(url + "/predict", content=b"hello, not an image")
    assert not_image.status_code == 400 and "not an image" in not_image.json()["detail"]
    truncated = httpx.post(url + "/predict", files={"file": ("t.jpg", _jpeg(1)[:400], "image/jpeg")})
    assert truncated.status_code == 400 and "t.jpg" in truncated.json()["detail"]
    no_file = httpx.post(url + "/predict", data={"x": "1"}, files={"other": ("a.txt", b"x", "text/plain")})
    assert no_file.status_code == 400
    assert httpx.post(url + "/predict", content=_jpeg(3)).status_code == 200


def test_a_checkpoint_is_served_in_the_precision_asked(tmp_path, shapes_model_file, capsys):
    """`serve --amp`: the model runs under autocast in that precision, and /info says which;
    an ONNX model runs as exported, so asking it for --amp or --compile is refused."""
    import torch

    from retinanet.cli import main as cli
    from retinanet.serve import Predictor

    weights = shapes_model_file
    arrays = [np.zeros((90, 120, 3), dtype=np.uint8)]
    for amp, expected in (("none", None), ("bf16", torch.bfloat16)):
        predictor = Predictor(weights, "cpu", amp=amp)
        seen, predict = [], predictor.model.predict
        predictor.model.predict = lambda *a, **k: seen.append(
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None) or predict(*a, **k)
        predictor.predict(arrays)
        assert seen == [expected] and predictor.info["precision"] == (amp if expected else "fp32")
    (tmp_path / "m.onnx").write_bytes(b"not read")
    for args in (["serve", "--weights", str(tmp_path / "m.onnx"), "--compile"],
                 ["predict", "--backend", "onnxruntime", "--weights", str(tmp_path / "m.onnx"), "x.jpg",
                  "--output-dir", str(tmp_path / "out"), "--amp", "bf16"]):
        assert cli(args) == 2
        assert "model runs as it was exported" in capsys.readouterr().err  # refused, not a load failure
    assert not (tmp_path / "out").exists()
