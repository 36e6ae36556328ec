"""The model zoo's download path, against a local HTTP server on 127.0.0.1 serving weight files
made here in each publisher's layout (torchvision's RetinaNet at its real size; detectron2 and
PaddleDetection ones on a ResNet-18, which their converters read by the same rules as the
published ResNet-50/101 files)."""

import dataclasses
import hashlib
import io
import os
import pickle
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
import torch

from retinanet import zoo
from retinanet.checkpoint import read_checkpoint
from retinanet.cli import main as cli
from retinanet.convert import convert_file
from retinanet.convert.detectron2 import detectron2_config
from retinanet.convert.paddle import paddle_config
from retinanet.model.detector import RetinaNet
from test_convert_detectron2 import to_detectron2_names

TV = "torchvision/retinanet_resnet50_fpn_coco"
D2 = "detectron2/retinanet_R_50_FPN_1x"
PADDLE = "paddle/retinanet_r50_fpn_1x_coco"
KIND = {TV: "torchvision", D2: "detectron2", PADDLE: "paddle"}


def _our_state(config) -> dict:
    torch.manual_seed(0)
    return {k: v for k, v in RetinaNet.from_config(config).state_dict().items() if not k.startswith("loss.")}


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _detectron2_bytes() -> bytes:
    """A detectron2 model-zoo pickle (`{"model": {name: ndarray}}`) of a ResNet-18 RetinaNet."""
    state = _our_state(detectron2_config(18, 80, "c5"))
    d2 = to_detectron2_names(_part(state, "backbone."), _part(state, "fpn."), _part(state, "head."))
    return pickle.dumps({"model": {k: v.numpy() for k, v in d2.items()}, "__author__": "Detectron2 Model Zoo"})


_PADDLE_BN = {"weight": "weight", "bias": "bias", "running_mean": "_mean", "running_var": "_variance"}


def _paddle_name(key: str) -> str:
    """Our name -> PaddleDetection's (ResNet variant b, FPN, RetinaHead), written independently
    of the converter's rules."""
    if m := re.fullmatch(r"backbone\.conv1\.(\w+)", key):
        return f"backbone.conv1.conv1.conv.{m[1]}"
    if m := re.fullmatch(r"backbone\.bn1\.(\w+)", key):
        return f"backbone.conv1.conv1.norm.{_PADDLE_BN[m[1]]}"
    if m := re.fullmatch(r"backbone\.layer(\d)\.(\d+)\.(conv|bn|downsample\.)(\d)\.(\w+)", key):
        stage = int(m[1]) + 1
        block = f"backbone.res{stage}.res{stage}{'abcdefghijklmnopqrstuvw'[int(m[2])]}"
        branch = "short" if m[3] == "downsample." else "branch2" + "abc"[int(m[4]) - 1]
        is_conv = m[3] == "conv" or (m[3] == "downsample." and m[4] == "0")
        return f"{block}.{branch}.{'conv' if is_conv else 'norm'}.{m[5] if is_conv else _PADDLE_BN[m[5]]}"
    if m := re.fullmatch(r"fpn\.lateral_convs\.(\d)\.(\w+)", key):
        level = int(m[1]) + 3
        return f"neck.fpn_inner_res{level}_sum{'' if level == 5 else '_lateral'}.{m[2]}"
    if m := re.fullmatch(r"fpn\.output_convs\.(\d)\.(\w+)", key):
        return f"neck.fpn_res{int(m[1]) + 3}_sum.{m[2]}"
    if m := re.fullmatch(r"fpn\.p([67])\.(\w+)", key):
        return f"neck.fpn_{m[1]}.{m[2]}"
    if m := re.fullmatch(r"head\.(cls|bbox)_subnet\.(\d+)\.(\w+)", key):
        return f"head.conv_feat.fcos_head_{'cls' if m[1] == 'cls' else 'reg'}_tower_conv_{int(m[2]) // 2}.conv.{m[3]}"
    return {"head.cls_score": "head.retina_cls", "head.bbox_pred": "head.retina_reg"}[key.rsplit(".", 1)[0]] + \
        "." + key.rsplit(".", 1)[1]


def _paddle_bytes() -> bytes:
    """A `.pdparams` (a pickled dict of numpy arrays) of a ResNet-18 RetinaNet with a 1-conv head."""
    state = _our_state(paddle_config(18, 80, num_convs=1))
    return pickle.dumps({_paddle_name(k): v.numpy() for k, v in state.items()})


def _torchvision_bytes() -> bytes:
    from torchvision.models.detection import retinanet_resnet50_fpn

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def peer_files() -> dict:
    return {TV: _torchvision_bytes(), D2: _detectron2_bytes(), PADDLE: _paddle_bytes()}


class Server:
    """Serves `files` (URL path -> bytes) on 127.0.0.1 and records each request's path. A path
    in `short` announces its full length but sends half of it and closes the connection."""

    def __init__(self):
        self.files, self.requests, self.short = {}, [], set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if self.path in server.short else body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strip(photo_path, tmp_path_factory):
    """A photograph 20 px high: the models' 800 px short side is capped by their 1333 px long side,
    so it runs at 26 x 1333 and a peer-sized model predicts in a fraction of a second."""
    from PIL import Image

    path = tmp_path_factory.mktemp("strip") / "strip.jpg"
    with Image.open(photo_path) as image:
        image.resize((1024, 20)).save(path, quality=95)
    return path


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _publish(server, monkeypatch, name, data, sha256_prefix="published"):
    """Serve `data` at the entry's URL path and point the entry at the server. The entry keeps
    its published hash unless `sha256_prefix` is given (None: no hash)."""
    entry = zoo.ZOO[name]
    path = urlparse(entry.url).path
    server.files[path] = data
    sha = entry.sha256_prefix if sha256_prefix == "published" else sha256_prefix
    monkeypatch.setitem(zoo.ZOO, name, dataclasses.replace(entry, url=server.base + path, sha256_prefix=sha))
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
def test_zoo_name_downloads_converts_and_predicts_then_hits_the_cache(server, peer_files, monkeypatch, torch_home,
                                                                       strip, tmp_path):
    path = _publish(server, monkeypatch, PADDLE, peer_files[PADDLE])
    assert cli(["predict", "--weights", PADDLE, str(strip), "--output-dir", str(tmp_path / "a"), "--no-draw"]) == 0
    assert (tmp_path / "a" / "predictions.json").is_file() and server.requests == [path]
    entry = zoo.ZOO[PADDLE]
    converted = torch_home / (entry.file_name + ".retinanet.pt")
    assert sorted(p.name for p in torch_home.iterdir()) == [entry.file_name, converted.name]  # no temporary file
    assert (torch_home / entry.file_name).read_bytes() == peer_files[PADDLE]
    meta = read_checkpoint(converted).meta["converted_from"]
    assert meta["zoo"] == PADDLE and meta["source"] == "paddle"

    made = converted.stat().st_mtime_ns
    assert zoo.resolve_weights(PADDLE, progress=False) == converted
    assert server.requests == [path] and converted.stat().st_mtime_ns == made  # the cache answered
    converted.unlink()  # a lost conversion is re-made from the download, without a request
    assert zoo.resolve_weights(PADDLE, progress=False) == converted and converted.is_file()
    assert server.requests == [path]


@pytest.mark.slow
@pytest.mark.parametrize("name", [TV, D2, PADDLE])
def test_each_publishers_file_converts_as_retinanet_convert_does(name, server, peer_files, monkeypatch, tmp_path):
    data = peer_files[name]
    _publish(server, monkeypatch, name, data, hashlib.sha256(data).hexdigest()[:8] if name == TV else None)
    got = read_checkpoint(zoo.resolve_weights(name, progress=False))
    (tmp_path / "peer").write_bytes(data)
    convert_file(KIND[name], tmp_path / "peer", tmp_path / "ours.pt")
    expected = read_checkpoint(tmp_path / "ours.pt")
    assert got.model_config == expected.model_config and got.model_config.num_classes in (80, 91)
    assert got.weights.keys() == expected.weights.keys()
    assert all(torch.equal(got.weights[k], expected.weights[k]) for k in got.weights)


def test_hash_mismatch_deletes_the_download(server, peer_files, monkeypatch, torch_home, strip, tmp_path,
                                            capsys):
    _publish(server, monkeypatch, TV, peer_files[TV])  # torchvision's published hash: this file is not theirs
    assert cli(["predict", "--weights", TV, str(strip), "--output-dir", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert "sha256" in line and "eeacb38b" in line and "deleted" in line
    assert list(torch_home.iterdir()) == []  # neither the file nor a temporary one is left
    assert not (tmp_path / "out").exists()


def test_truncated_transfer_leaves_nothing(server, peer_files, monkeypatch, torch_home, strip, tmp_path,
                                           capsys):
    path = _publish(server, monkeypatch, D2, peer_files[D2])
    server.short.add(path)  # announces the whole length, sends half, closes
    assert cli(["predict", "--weights", D2, str(strip), "--output-dir", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert "truncated" in line and f"{len(peer_files[D2]) // 2} of {len(peer_files[D2])} bytes" in line
    assert list(torch_home.iterdir()) == []


def test_no_server_says_the_url_and_where_to_put_the_file(server, peer_files, monkeypatch, torch_home,
                                                          strip, tmp_path, capsys):
    _publish(server, monkeypatch, PADDLE, peer_files[PADDLE])
    server.stop()  # connection refused from now on
    assert cli(["predict", "--weights", PADDLE, str(strip), "--output-dir", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert zoo.ZOO[PADDLE].url in line and str(torch_home / "retinanet_r50_fpn_1x_coco.pdparams") in line
    assert not torch_home.exists() or list(torch_home.iterdir()) == []


def _place_by_hand(torch_home, name, data):
    torch_home.mkdir(parents=True, exist_ok=True)
    (torch_home / zoo.ZOO[name].file_name).write_bytes(data)


def test_a_file_placed_by_hand_is_used_without_a_request(server, peer_files, monkeypatch, torch_home, strip,
                                                         tmp_path, capsys):
    _publish(server, monkeypatch, PADDLE, peer_files[PADDLE])
    _place_by_hand(torch_home, PADDLE, peer_files[PADDLE])
    assert cli(["predict", "--weights", PADDLE, str(strip), "--output-dir", str(tmp_path / "out"),
                "--no-draw"]) == 0
    assert server.requests == [] and (tmp_path / "out" / "predictions.json").is_file()
    capsys.readouterr()
    assert cli(["zoo"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.split() and line.split()[0] in zoo.ZOO}
    assert rows.keys() == zoo.ZOO.keys() and rows[TV][2] == "36.4" and rows[TV][-1] == zoo.ZOO[TV].url
    assert rows[PADDLE][5] == "converted" and rows[D2][5] == "no"


@pytest.mark.slow
def test_eval_and_export_take_a_zoo_name(server, peer_files, monkeypatch, torch_home, tmp_path, capsys):
    """Each reads the converted checkpoint: eval stops at a cheap check of its own past loading
    (the converted model's config has no data), export writes the graph; no request is made."""
    monkeypatch.chdir(tmp_path)
    _publish(server, monkeypatch, PADDLE, peer_files[PADDLE])
    _place_by_hand(torch_home, PADDLE, peer_files[PADDLE])
    assert cli(["eval", "--weights", PADDLE]) == 2
    assert "no validation set" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == [tmp_path / "torch_home"]  # nothing written but the cache
    assert cli(["export", "--weights", PADDLE, "--output", "model.onnx", "--height", "64", "--width", "64"]) == 0
    assert (tmp_path / "model.onnx").is_file() and server.requests == []


def test_a_damaged_file_in_the_cache_is_named_with_what_to_do(torch_home, tmp_path, capsys):
    _place_by_hand(torch_home, D2, b"\x80\x04 not a pickle of weights")
    assert cli(["predict", "--weights", D2, "x.jpg", "--output-dir", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert str(torch_home / zoo.ZOO[D2].file_name) in line and "delete that file to download it again" in line


def test_unknown_name_is_one_line_pointing_at_the_zoo(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["predict", "--weights", "torchvision/retinanet_resnet50_fpn_cooc", "x.jpg", "--output-dir", "o"]) == 2
    line = _one_line_error(capsys)
    assert "retinanet zoo" in line and "did you mean torchvision/retinanet_resnet50_fpn_coco" in line
    assert list(tmp_path.iterdir()) == []


def test_a_hand_placed_file_newer_than_its_conversion_is_converted_again(server, peer_files, monkeypatch, torch_home):
    _publish(server, monkeypatch, D2, peer_files[D2])
    first = zoo.resolve_weights(D2, progress=False)
    before = read_checkpoint(first).weights
    other = pickle.loads(peer_files[D2])
    other["model"]["head.cls_score.bias"] = other["model"]["head.cls_score.bias"] + 1
    placed = torch_home / zoo.ZOO[D2].file_name
    placed.write_bytes(pickle.dumps(other))
    os.utime(placed, (first.stat().st_atime, first.stat().st_mtime + 10))
    after = read_checkpoint(zoo.resolve_weights(D2, progress=False)).weights
    assert torch.equal(after["head.cls_score.bias"], before["head.cls_score.bias"] + 1)
    assert len(server.requests) == 1


@pytest.mark.slow
def test_train_starts_from_a_zoo_name(server, peer_files, monkeypatch, shapes_data, tmp_path, caplog):
    """`train --weights NAME` downloads, converts and fine-tunes; COCO's classes keep their rows."""
    import json
    import logging

    coco = json.loads(open(shapes_data["train_annotations"]).read())
    for category, name in zip(coco["categories"], ["person", "dog", "widget", "kite", "bus"]):
        category["name"] = name
    (tmp_path / "train.json").write_text(json.dumps(coco))
    path = _publish(server, monkeypatch, D2, peer_files[D2])
    with caplog.at_level(logging.INFO):
        assert cli(["train", "--weights", D2, "--output-dir", str(tmp_path / "run"),
                    f"data.train_images={shapes_data['train_images']}", f"data.train_annotations={tmp_path / 'train.json'}",
                    "train.max_iter=1", "train.batch_size=2", "train.reference_batch_size=2", "train.eval_period=0",
                    "data.num_workers=0", "train.amp=none", "model.input.train_min_sizes=[128]",
                    "model.input.max_size=128"]) == 0
    assert server.requests == [path]
    assert "4 of 5 start from the weights' classifier" in caplog.text
    final = read_checkpoint(tmp_path / "run" / "model_final.pt")
    assert final.model_config.class_names == ["person", "dog", "widget", "kite", "bus"]
    assert final.model_config.backbone.depth == 18 and final.model_config.input.channel_order == "BGR"


@pytest.mark.parametrize("stage", ["download", "conversion"])
def test_a_full_cache_disk_is_one_line_and_leaves_nothing(stage, server, peer_files, monkeypatch, torch_home,
                                                         tmp_path, capsys):
    import errno

    _publish(server, monkeypatch, D2, peer_files[D2])
    if stage == "download":
        def full(url, f, dst, progress, timeout):
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(zoo, "_stream", full)
    else:

        def full(obj, f, *args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", full)
    assert cli(["predict", "--weights", D2, "x.jpg", "--output-dir", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert "No space left on device" in line and "TORCH_HOME" in line
    left = sorted(p.name for p in torch_home.iterdir()) if torch_home.exists() else []
    assert left == ([] if stage == "download" else [zoo.ZOO[D2].file_name])  # no partial file of either
