"""`retinanet predict --tile` on damaged and odd rasters, generated here: a file cut short in
any format GDAL or Pillow reads is refused with one `error:` line naming it, on the whole-image
and the windowed path alike, the same way on every run; images that are not 8-bit (float 0-1,
12-bit in uint16) are read as bright as the same image in uint8."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import ModelConfig, RetinaNet, save_model
from retinanet.cli import main as cli

from helpers import require_peer

rasterio = require_peer("rasterio", "pip install -e '.[geo]'")
from rasterio.transform import Affine  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small random RetinaNet whose detections depend on every pixel (score threshold 0)."""
    cfg = ModelConfig(num_classes=2, class_names=["a", "b"], category_ids=[1, 2])
    cfg.backbone.depth, cfg.fpn.out_channels, cfg.head.num_convs = 18, 32, 1
    cfg.input.test_min_size, cfg.input.max_size = 64, 64
    torch.manual_seed(0)
    return save_model(RetinaNet.from_config(cfg), tmp_path_factory.mktemp("model") / "m.pt")


def _scene() -> np.ndarray:
    """A 120 x 180 RGB uint8 image with gradients, noise and bright boxes, `(3, H, W)`."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:120, 0:180]
    image = np.stack([x * 255 // 180, y * 255 // 120, (x + y) % 256]) + rng.integers(0, 30, (3, 120, 180))
    for x0, y0 in [(20, 30), (90, 70), (130, 10)]:
        image[:, y0 : y0 + 35, x0 : x0 + 50] = 240
    return np.clip(image, 0, 255).astype(np.uint8)


def _geotiff(path, array: np.ndarray, **profile):
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=array.dtype, crs="EPSG:32633", transform=Affine(0.5, 0, 5e5, 0, -0.5, 4e6),
                       **profile) as dst:
        dst.write(array)
    return path


def _damaged_corpus(folder) -> list:
    """The scene in each format, cut to 60% of its bytes (mid-stream, mid-strip, mid-tile)."""
    scene = _scene().transpose(1, 2, 0)
    paths = []
    for name, options in {"cut.png": {}, "cut.jpg": {"quality": 90}, "cut_progressive.jpg": {"progressive": True},
                          "cut.bmp": {}}.items():
        Image.fromarray(scene).save(folder / name, **options)
        paths.append(folder / name)
    for name, profile in {"cut_strips.tif": {}, "cut_strips_deflate.tif": {"compress": "deflate"},
                          "cut_tiles.tif": {"tiled": True, "blockxsize": 128, "blockysize": 128,
                                            "compress": "deflate"}}.items():
        paths.append(_geotiff(folder / name, scene.transpose(2, 0, 1), **profile))
    for path in paths:
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    return paths


@pytest.mark.parametrize("windowed", [False, True], ids=["default-routing", "all-windowed"])
def test_a_damaged_file_in_any_format_is_refused_with_one_line_every_time(weights, tmp_path, capsys, monkeypatch,
                                                                          windowed):
    """--tile 512 (twice) covers each image with one window (GDAL's whole-image read); 64 with many.
    `all-windowed` sends every file through GDAL, as an image over 64 MP would go."""
    if windowed:
        monkeypatch.setattr("retinanet.data.raster.WINDOWED_MIN_PIXELS", 0)
    damaged = _damaged_corpus(tmp_path)
    intact = tmp_path / "intact.png"
    Image.fromarray(_scene().transpose(1, 2, 0)).save(intact)
    for run, tile in enumerate(("512", "512", "64")):
        out = tmp_path / f"out_{run}"
        code = cli(["predict", "--weights", str(weights), *map(str, damaged), str(intact), "--output-dir", str(out),
                    "--tile", tile, "--score-threshold", "0.0", "--workers", "0"])
        err = capsys.readouterr().err
        assert code == 1, err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        for path in damaged:
            named = [line for line in lines if str(path) in line]
            assert len(named) == 1 and "damaged or truncated" in named[0], (path.name, err)
            assert "GDAL_ERROR_ON_LIBJPEG_WARNING" not in named[0]  # no advice to accept damage
        predictions = json.loads((out / "predictions.json").read_text())
        assert {p["file_name"] for p in predictions} == {str(intact)}  # nothing from a damaged file
        assert not [p for p in out.iterdir() if p.name.startswith("cut")]  # nor a drawing of one


@pytest.mark.parametrize("kind", ["float32 0-1", "12-bit in uint16", "declared 12-bit", "float32 0-1 tiled nodata"])
def test_data_that_is_not_8_bit_predicts_as_its_8_bit_twin(weights, tmp_path, capsys, caplog, kind):
    scene = _scene()
    profile = {}
    if kind.startswith("float32"):
        other = (scene / np.float32(255)).astype(np.float32)
        if "nodata" in kind:  # a nodata value outside the data, none of it in the image
            profile = {"tiled": True, "blockxsize": 64, "blockysize": 64, "nodata": -9999.0}
    else:
        other = np.round(scene.astype(np.float64) * 4095 / 255).astype(np.uint16)
        if kind == "declared 12-bit":  # a dark image: the declared depth rules, not its largest value
            profile = {"nbits": 12}
            other = np.minimum(other, 1500)
            scene = np.round(other.astype(np.float64) * 255 / 4095).astype(np.uint8)
    eight = _geotiff(tmp_path / "uint8.tif", scene, **({} if "nodata" not in kind else
                                                        {k: v for k, v in profile.items() if k != "nodata"}))
    deep = _geotiff(tmp_path / "deep.tif", other, **profile)
    results = {}
    for path in (eight, deep):
        out = tmp_path / f"out_{path.stem}"
        with caplog.at_level(logging.INFO, logger="retinanet.data.raster"):
            assert cli(["predict", "--weights", str(weights), str(path), "--output-dir", str(out), "--tile", "64",
                        "--score-threshold", "0.0"]) == 0
        results[path.stem] = [(p["bbox"], p["score"]) for p in json.loads((out / "predictions.json").read_text())]
        drawn = np.asarray(Image.open(out / f"{path.stem}.jpg"))
        results[path.stem + " mean"] = drawn.reshape(-1, 3).mean(axis=0).round(1).tolist()
    assert results["deep"] and results["deep"] == results["uint8"], kind
    assert results["deep mean"] == results["uint8 mean"]
    expected = "values 0-1 scaled" if kind.startswith("float32") else "values 0-4095 scaled"
    said = [r.getMessage() for r in caplog.records if str(deep) in r.getMessage()]
    assert len(said) == 1 and expected in said[0], said


def test_value_range_option_overrides_the_automatic_range(weights, tmp_path, caplog):
    """Dark 16-bit data (largest value 3855, automatically 0-4095) read as 0-65535 by the
    user's choice predicts as its 8-bit twin: the option is applied, and its range is logged."""
    dark = (_scene() // 16).astype(np.uint8)
    deep = _geotiff(tmp_path / "deep.tif", dark.astype(np.uint16) * 257)
    dark = _geotiff(tmp_path / "dark.tif", dark)
    out = {}
    for path, extra in ((deep, ["--value-range", "0,65535"]), (dark, [])):
        with caplog.at_level(logging.INFO, logger="retinanet.data.raster"):
            assert cli(["predict", "--weights", str(weights), str(path), "--output-dir", str(tmp_path / path.stem),
                        "--tile", "64", "--score-threshold", "0.0", *extra]) == 0
        out[path.stem] = json.loads((tmp_path / path.stem / "predictions.json").read_text())
    assert [p["bbox"] for p in out["deep"]] == [p["bbox"] for p in out["dark"]]
    assert any("values 0-65535 scaled to 0-255 (the range given)" in r.getMessage() for r in caplog.records)
    with pytest.raises(SystemExit):
        cli(["predict", "--weights", str(weights), str(deep), "--output-dir", str(tmp_path / "x"), "--tile", "64",
             "--value-range", "9,1"])
