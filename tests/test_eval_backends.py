"""`retinanet eval --backend onnxruntime|openvino` measures the exported file a user deploys: on a
validation set of images that the graph resizes up and down, portrait and landscape, it writes
the same metrics.json as `eval` of the checkpoint it came from; an exported model whose classes
are not the data's is one line."""

import json

import pytest
from PIL import Image

from retinanet import load_model, read_image
from retinanet.cli import main as cli
from retinanet.config import save_config

from helpers import require_peer, tiny_config

require_peer("onnxruntime", "pip install onnxruntime (the test extra)")
require_peer("onnx", "pip install onnx onnxscript (the test extra)")

# (height, width) of the validation images, in pairs of one size (eval.batch_size=2: no batch
# mixes sizes, so that the checkpoint's batches are not padded to another image's size)
SIZES = [(150, 230), (150, 230), (250, 170), (250, 170), (70, 101), (70, 101), (90, 61), (90, 61)]
GROUND_TRUTH = 3  # boxes per validation image


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes_data, shapes_model_file):
    """The shared untrained shapes model (it detects everywhere, with spread scores), its
    `--dynamic` export, and a config whose validation set holds the shapes' validation images
    at `SIZES`."""
    root = tmp_path_factory.mktemp("eval_backends")
    onnx_path = root / "model.onnx"
    assert cli(["export", "--weights", str(shapes_model_file), "--output", str(onnx_path), "--dynamic"]) == 0
    val = _resized_val_set(shapes_data, shapes_model_file, root / "val")
    config = root / "cfg.yaml"
    save_config(tiny_config({**shapes_data, **val}, root / "unused", eval__batch_size=2), config)
    want = _eval(shapes_model_file, config, root / "ev_torch")
    assert 0.3 < want["AP"] < 0.99 and want["num_images"] == len(SIZES)  # something to compare
    return {"root": root, "checkpoint": shapes_model_file, "onnx": onnx_path, "config": config, "val": val,
            "want": want}


def _resized_val_set(data: dict, checkpoint, folder) -> dict:
    """The validation images resized to `SIZES`, annotated with the checkpoint's own best
    `GROUND_TRUTH` detections in each (an untrained model scores near 0 AP on the true boxes,
    where any difference of the backends would hardly move the metrics; against its own
    boxes, AP is high and a box that moves by a pixel loses its match at IoU 0.95)."""
    model = load_model(checkpoint).eval()
    coco = json.loads(open(data["val_annotations"]).read())
    coco["annotations"] = []
    folder.mkdir()
    for image, (h, w) in zip(coco["images"], SIZES, strict=True):
        Image.open(f"{data['val_images']}/{image['file_name']}").resize((w, h)).save(folder / image["file_name"])
        image["width"], image["height"] = w, h
        det = model.predict(read_image(folder / image["file_name"]))
        for (x0, y0, x1, y1), label in zip(det["boxes"][:GROUND_TRUTH].tolist(), det["labels"].tolist()):
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image["id"],
                                        "category_id": model.category_ids[label], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                        "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    (folder / "val.json").write_text(json.dumps(coco))
    return {"val_images": str(folder), "val_annotations": str(folder / "val.json")}


def _eval(weights, config, out, *extra) -> dict:
    assert cli(["eval", "--weights", str(weights), "--config", str(config), "--output-dir", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def _without_plot_folder(metrics: dict) -> dict:
    return {**metrics, "plots": [p.rsplit("/", 1)[-1] for p in metrics["plots"]]}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_eval_of_the_export_writes_the_checkpoints_metrics(run, backend):
    root = run["root"]
    weights = run["onnx"]
    if backend == "openvino":
        require_peer("openvino", "pip install 'retinanet[openvino]'")
        weights = root / "ir"
        assert cli(["export", "--format", "openvino", "--weights", str(run["checkpoint"]), "--output", str(weights),
                    "--dynamic"]) == 0
    got = _eval(weights, run["config"], root / f"ev_{backend}", "--backend", backend)
    # equal detections (within 1e-4 in score and 1e-2 px) give equal COCO numbers: the
    # summary, per-class AP, error breakdown and threshold metrics are compared exactly
    assert _without_plot_folder(got) == _without_plot_folder(run["want"])
    got, want = (json.loads((root / f / "detections.json").read_text()) for f in (f"ev_{backend}", "ev_torch"))
    assert len(got) == len(want) >= 5 * len(SIZES)
    unused = list(range(len(want)))
    for g in got:  # each paired with an unused equal one (equal scores may come in either order)
        match = next((j for j in unused if (want[j]["image_id"], want[j]["category_id"]) == (g["image_id"],
                      g["category_id"]) and abs(want[j]["score"] - g["score"]) <= 1e-4
                      and max(abs(u - v) for u, v in zip(want[j]["bbox"], g["bbox"])) <= 1e-2), None)
        assert match is not None, f"no detection of the checkpoint equals {g}"
        unused.remove(match)


@pytest.mark.slow
def test_an_export_whose_classes_are_not_the_datas_is_one_line(run, tmp_path, capsys):
    coco = json.loads(open(run["val"]["val_annotations"]).read())
    renamed = coco["categories"][1]["name"]
    coco["categories"][1]["name"] = "giraffe"
    (tmp_path / "val.json").write_text(json.dumps(coco))
    cfg = tmp_path / "cfg.yaml"
    save_config(tiny_config({"val_images": run["val"]["val_images"], "val_annotations": str(tmp_path / "val.json")},
                            tmp_path / "unused"), cfg)
    code = cli(["eval", "--backend", "onnxruntime", "--weights", str(run["onnx"]), "--config", str(cfg),
                "--output-dir", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    cid = coco["categories"][1]["id"]
    assert err.startswith(f"error: {tmp_path / 'val.json'}: its categories do not match {run['onnx']}'s")
    assert f"id {cid} is 'giraffe' in the data but {renamed!r} in the model" in err
    assert not (tmp_path / "ev").exists()  # nothing predicted, nothing written


@pytest.mark.slow
def test_eval_of_an_exported_model_without_its_data_or_file_is_one_line(run, tmp_path, capsys):
    for args, line in [
        (["--weights", str(run["onnx"])], "error: --backend onnxruntime: an exported model holds no data settings; "
                                          "pass --config with the validation set"),
        (["--weights", str(tmp_path / "gone.onnx"), "--config", str(run["config"])],
         f"error: {tmp_path / 'gone.onnx'}: no such exported model"),
        (["--weights", str(run["config"]), "--config", str(run["config"])],  # not an ONNX file at all
         f"error: {run['config']}: cannot be loaded as an exported model ("),
        (["--weights", str(run["onnx"]), "--config", str(run["config"]), "eval.tta.flip=true"],
         "error: eval.tta: test-time augmentation runs with a checkpoint only; an exported model runs as it was "
         "exported"),
    ]:
        assert cli(["eval", "--backend", "onnxruntime", "--output-dir", str(tmp_path / "ev"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(line), err
    assert not (tmp_path / "ev").exists()
