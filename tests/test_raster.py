"""Large images read by windows (rasterio), GeoTIFF in, GeoJSON out."""

import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet.data.image_io import ImageReadError, read_image
from retinanet.data.raster import ArrayRaster, WindowedRaster, open_raster
from retinanet.engine.predict import predict_files

from helpers import require_peer

rasterio = require_peer("rasterio", "pip install -e '.[geo]'")
from rasterio.transform import Affine  # noqa: E402
from rasterio.windows import Window  # noqa: E402


def write_geotiff(path, array: np.ndarray, transform=None, crs="EPSG:32633", **profile):
    """`array (bands, H, W)` as a tiled, compressed GeoTIFF (north up, 50 cm pixels unless
    `transform` says otherwise)."""
    bands, height, width = array.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=bands, dtype=array.dtype,
                       crs=crs, transform=transform or Affine(0.5, 0, 500000, 0, -0.5, 4000000), tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", **profile) as dst:
        dst.write(array)
    return path


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_windows_equal_the_whole_decode_for_rgb_grey_and_palette(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 300, 500), dtype=np.uint8)
    grey = rng.integers(0, 256, (1, 300, 500), dtype=np.uint8)
    for name, array in {"rgb": rgb, "grey": grey}.items():
        path = write_geotiff(tmp_path / f"{name}.tif", array)
        with open_raster(path) as raster:
            assert isinstance(raster, WindowedRaster)
            whole = read_image(path)  # Pillow, whole: the reference
            window = raster.read((37, 11, 420, 290))
            assert torch.equal(window, whole[:, 11:290, 37:420]), name
    palette_path = tmp_path / "palette.tif"
    with rasterio.open(palette_path, "w", driver="GTiff", width=500, height=300, count=1, dtype="uint8",
                       photometric="palette") as dst:
        dst.write(grey)
        dst.write_colormap(1, {i: (i, 255 - i, (7 * i) % 256, 255) for i in range(256)})
    with open_raster(palette_path) as raster:
        assert torch.equal(raster.read((0, 0, 500, 300)), read_image(palette_path))


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_data_that_is_not_8_bit_is_scaled_by_its_own_range(tmp_path):
    """Each kind of data by the rule of `value_range.automatic_scaling`, written out by hand:
    the fewest bits (at least 8) that hold the largest value; a declared NBITS; floats in 0-1;
    nodata left out of the range and black; a given range over all of it."""
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 4000, (3, 300, 500), dtype=np.uint16)  # 12-bit data in uint16
    shallow = rng.integers(0, 200, (1, 300, 500), dtype=np.uint16)  # 16-bit data within 0-255
    signed = rng.integers(0, 1000, (1, 300, 500), dtype=np.int32)
    reflectance = rng.random((3, 300, 500), dtype=np.float32)
    with_nodata = reflectance.copy()
    with_nodata[:, :50] = -1.0  # outside the data: were it counted, the range would be -1..1

    def by_hand(array, low, high):
        return torch.from_numpy(np.clip((array.astype(np.float64) - low) * 255 / (high - low) + 0.5, 0, 255)
                                .astype(np.uint8))

    cases = {"deep": (deep, {}, None, by_hand(deep, 0, 4095)),
             "shallow": (shallow, {}, None, by_hand(shallow, 0, 255)),
             "signed": (signed, {}, None, by_hand(signed, 0, 1023)),
             "declared": (shallow, {"nbits": 12}, None, by_hand(shallow, 0, 4095)),
             "float": (reflectance, {}, None, by_hand(reflectance, 0, 1)),
             "nodata": (with_nodata, {"nodata": -1.0}, None, by_hand(np.where(with_nodata < 0, 0, with_nodata), 0, 1)),
             "given": (deep, {}, [100, 3000], by_hand(deep, 100, 3000))}
    for name, (array, profile, value_range, expected) in cases.items():
        path = write_geotiff(tmp_path / f"{name}.tif", array, **profile)
        with open_raster(path, value_range=value_range) as raster:
            window = raster.read((37, 11, 420, 290))
        expected = expected.expand(3, -1, -1) if expected.shape[0] == 1 else expected
        assert torch.equal(window, expected[:, 11:290, 37:420]), name
    with pytest.raises(ValueError, match="low must be below high"):
        open_raster(tmp_path / "deep.tif", value_range=[5, 1])


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_whole_and_windowed_reads_scale_single_band_data_alike(tmp_path, caplog):
    """Predicting with or without --tile sees the same pixels: 12-bit data in uint16, 16-bit
    data within 0-255, 32-bit integers and float reflectance decode whole (Pillow) as they read
    by windows (GDAL), and the whole decode logs the rule it used."""
    rng = np.random.default_rng(1)
    arrays = {"deep": rng.integers(0, 4000, (1, 120, 200), dtype=np.uint16),
              "shallow": rng.integers(0, 200, (1, 120, 200), dtype=np.uint16),
              "signed": rng.integers(0, 1000, (1, 120, 200), dtype=np.int32),
              "float": rng.random((1, 120, 200), dtype=np.float32)}
    with caplog.at_level(logging.INFO, logger="retinanet.data.image_io"):
        for name, array in arrays.items():
            path = write_geotiff(tmp_path / f"{name}.tif", array)
            with open_raster(path, windowed=True) as raster:
                windowed = raster.read((0, 0, 200, 120))
            assert torch.equal(read_image(path), windowed), name
    assert "values 0-4095 scaled to 0-255 (12-bit data" in caplog.text
    assert "values 0-1 scaled to 0-255 (floating-point values within 0-1)" in caplog.text


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_the_range_of_a_large_file_comes_from_a_sample_read_once(tmp_path, monkeypatch, caplog):
    """A 4096 x 4096 file in 256 px tiles: its range is found from at most 8 x 8 tiles of its
    256, once per file however often it is opened, and said in one log line."""
    import logging

    data = np.zeros((1, 4096, 4096), dtype=np.uint16)
    data[0, ::97, ::89] = 3000  # 12-bit values everywhere, so any fair sample finds them
    path = write_geotiff(tmp_path / "big.tif", data)
    calls = []
    original = WindowedRaster._read

    def counting(self, **kwargs):
        calls.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(WindowedRaster, "_read", counting)
    with caplog.at_level(logging.INFO, logger="retinanet.data.raster"):
        for _ in range(3):
            with open_raster(path) as raster:
                assert raster.scaling.high == 4095
    sampled = [c["window"] for c in calls]
    assert len(sampled) <= 64 and all(w.width == 256 and w.height == 256 for w in sampled)
    assert len({(w.col_off, w.row_off) for w in sampled}) == len(sampled)
    assert max(w.row_off for w in sampled) == 4096 - 256  # spread to the far edge
    lines = [r.getMessage() for r in caplog.records if "big.tif" in r.getMessage()]
    assert len(lines) == 1 and "values 0-4095 scaled to 0-255 (12-bit data" in lines[0]


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_a_large_png_is_routed_by_its_header_without_decoding_it(tmp_path, monkeypatch):
    """Deciding whether a PNG over WINDOWED_MIN_PIXELS goes by windows must not decode it
    (Pillow's `getexif` on a PNG decodes the whole image to look for a late eXIf chunk)."""
    from PIL import ImageFile

    image = Image.new("1", (8200, 8200), 0)  # 67 MP, bilevel: tiny to write
    image.paste(1, (4000, 4000, 4100, 4050))
    image.save(tmp_path / "large.png")

    def no_decode(self, *args, **kwargs):
        raise AssertionError("decoded whole")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with open_raster(tmp_path / "large.png") as raster:
        assert isinstance(raster, WindowedRaster)
        window = raster.read((3990, 3990, 4110, 4060))
    assert window[:, 10:60, 10:110].eq(255).all() and window.sum() == 255 * 3 * 50 * 100  # bilevel as 0/255


def test_a_jpeg_with_data_after_its_end_is_not_refused_but_a_cut_one_is(tmp_path):
    """The end-of-image check accepts what cameras write after the JPEG (motion-photo video,
    trailers) and refuses a file cut anywhere in its scan."""
    pixels = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=90)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "trailer.jpg").write_bytes(data + b"ftypmp42" + bytes(range(256)) * 40)
    with open_raster(tmp_path / "trailer.jpg", windowed=True) as raster:
        assert raster.read((0, 0, 160, 120)).shape == (3, 120, 160)
    for cut in (len(data) // 3, len(data) - 2):
        (tmp_path / "cut.jpg").write_bytes(data[:cut])
        with pytest.raises(ImageReadError, match=r"cut.jpg: damaged or truncated image \(no end-of-image marker\)"):
            open_raster(tmp_path / "cut.jpg", windowed=True)


def test_a_geotiff_round_trips_through_tiled_prediction_into_geojson(tmp_path):
    """Boxes in pixels and in the raster's CRS agree: the GeoJSON polygon's corners, taken
    back through the inverse transform, are the pixel box of predictions.json."""
    transform = Affine(0.3, 0.05, 431000.0, 0.04, -0.3, 5140000.0)  # a rotated grid, 30 cm pixels
    image = np.full((3, 900, 1300), 90, dtype=np.uint8)
    objects = torch.tensor([[100.0, 120, 140, 150], [630, 400, 680, 470], [1200, 800, 1250, 860]])
    for x0, y0, x1, y1 in objects.int().tolist():
        image[:, y0:y1, x0:x1] = 230
    path = write_geotiff(tmp_path / "scene.tif", image, transform=transform, crs="EPSG:32632")
    model = _BrightBlobDetector()
    predictions, errors = predict_files(model, [path], tmp_path / "out", tiling={
        "tile": 256, "overlap": 0.25, "merge": "nmm", "full_image": False}, workers=0, progress=False)
    assert not errors and len(predictions) == 3
    pixel_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (p["bbox"] for p in predictions)])
    assert torch.allclose(pixel_boxes.sort(dim=0).values, objects.sort(dim=0).values, atol=0.01)

    collection = json.loads((tmp_path / "out" / "scene.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32632"
    assert len(collection["features"]) == 3
    inverse = ~transform
    for feature in collection["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]
        pixels = torch.tensor([_apply(inverse, *point) for point in ring], dtype=torch.float64)
        x0, y0, x1, y1 = feature["properties"]["bbox_pixels"]
        expected = torch.tensor([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=torch.float64)
        assert torch.allclose(pixels, expected, atol=1e-6)
        # and the map coordinates are where rasterio puts those pixel corners
        assert ring[0] == pytest.approx(rasterio.transform.xy(transform, y0, x0, offset="ul"), abs=1e-6)


def test_a_geotiff_read_without_rasterio_says_how_to_get_geojson(tmp_path, capsys, monkeypatch):
    import retinanet.data.raster as raster_module

    path = write_geotiff(tmp_path / "scene.tif", np.full((3, 200, 300), 90, dtype=np.uint8))
    monkeypatch.setattr(raster_module, "rasterio_available", lambda: False)
    raster = open_raster(path)
    assert isinstance(raster, ArrayRaster) and raster.georeferenced_without_reader and raster.transform is None
    predict_files(_BrightBlobDetector(), [path], tmp_path / "out", tiling={"tile": 128, "overlap": 0.2,
                  "merge": "nms", "full_image": False}, workers=0, progress=False)
    assert not (tmp_path / "out" / "scene.geojson").exists()
    assert "pip install 'retinanet[geo]'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_memory_stays_flat_as_the_image_grows(tmp_path):
    """Peak memory of tiled prediction over a 12,000 x 12,000 GeoTIFF (432 MB of pixels) is
    within a few tens of MB of that over a 2,000 x 2,000 one when read by windows; decoded
    whole it grows by the image (the check that the measurement can see the difference)."""
    sizes = (2000, 12000)
    for size in sizes:
        with rasterio.open(tmp_path / f"{size}.tif", "w", driver="GTiff", width=size, height=size, count=3,
                           dtype="uint8", tiled=True, blockxsize=512, blockysize=512, compress="deflate") as dst:
            block = np.random.default_rng(size).integers(0, 256, (3, 512, 512), dtype=np.uint8)
            for y in range(0, size, 512):
                for x in range(0, size, 512):
                    h, w = min(512, size - y), min(512, size - x)
                    dst.write(block[:, :h, :w], window=Window(x, y, w, h))

    def peak_growth(size: int, windowed: bool) -> float:
        script = textwrap.dedent(f"""
            import torch
            from retinanet.data.raster import open_raster
            from retinanet.engine.tiling import predict_tiled

            class Touch:  # reads every pixel of every tile, detects nothing
                class_names = ["x"]
                def predict(self, images, score_threshold=None, batch_size=4):
                    return [{{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
                              "sum": float(im.float().sum())}} for im in images]

            def peak_mb():  # VmHWM: this process's own peak (ru_maxrss keeps the parent's across exec)
                for line in open("/proc/self/status"):
                    if line.startswith("VmHWM"):
                        return int(line.split()[1]) / 1024

            before = peak_mb()
            with open_raster(r"{tmp_path / f'{size}.tif'}", windowed={windowed}) as raster:
                predict_tiled(Touch(), raster, 1024, 0.2, batch_size=4)
            print(peak_mb() - before)
        """)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    windowed = [peak_growth(size, True) for size in sizes]
    assert windowed[1] - windowed[0] < 80, windowed  # MB: the GDAL cache (64 MB) at most
    whole = [peak_growth(size, False) for size in sizes]
    assert whole[1] - whole[0] > 400, whole  # decoded whole: 432 MB more


def test_open_raster_names_the_file_of_a_bad_input(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 40)
    with pytest.raises(OSError, match="broken.tif"):
        open_raster(bad)
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "small.png")
    assert isinstance(open_raster(tmp_path / "small.png"), ArrayRaster)  # small non-TIFF: decoded whole
    with open_raster(tmp_path / "small.png", windowed=True) as raster:  # what an image over 64 MP gets
        assert isinstance(raster, WindowedRaster)
        assert torch.equal(raster.read((10, 20, 250, 180)), torch.from_numpy(pixels[20:180, 10:250]).permute(2, 0, 1))


def test_a_damaged_block_names_the_file_and_what_gdal_said(tmp_path):
    path = write_geotiff(tmp_path / "cut.tif", np.random.default_rng(0).integers(0, 256, (3, 512, 512), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the header survives, later blocks do not
    with open_raster(path) as raster:
        assert raster.read((0, 0, 256, 256)).shape == (3, 256, 256)  # an intact block still reads
        with pytest.raises(ImageReadError, match=r"cut.tif: damaged or truncated image \((?!Read failed)"):
            raster.read((256, 256, 512, 512))


def _apply(transform, x, y):
    a, b, c, d, e, f = tuple(transform)[:6]
    return a * x + b * y + c, d * x + e * y + f


class _BrightBlobDetector:
    """A stand-in detector: the bounding box of each bright blob (> 200) in the tile it is
    given, clipped to the tile, as a real detector reports the part of an object it sees."""

    class_names = ["blob"]
    category_ids = [1]

    def predict(self, images, score_threshold=None, batch_size=4):
        from skimage.measure import label, regionprops

        out = []
        for image in images:
            regions = regionprops(label((image[0] > 200).numpy()))
            boxes = [[r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]] for r in regions]
            boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            out.append({"boxes": boxes, "scores": torch.full((len(boxes),), 0.9),
                        "labels": torch.zeros(len(boxes), dtype=torch.long)})
        return out


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_tiled_evaluation_reads_images_by_windows_and_matches_the_whole_decode(shapes_data, tmp_path, monkeypatch):
    from retinanet.config import TileConfig
    from retinanet.data.coco import CocoDetection
    from retinanet.engine import evaluate as evaluate_module
    from retinanet.engine.tiling import predict_tiled
    from retinanet.model.build import build_retinanet

    from helpers import tiny_config

    # the shapes validation set as TIFFs: the files tiled evaluation should read window by window
    annotations = json.loads(open(shapes_data["val_annotations"]).read())
    for entry in annotations["images"]:
        pixels = np.asarray(Image.open(f"{shapes_data['val_images']}/{entry['file_name']}").convert("RGB"))
        entry["file_name"] = entry["file_name"].rsplit(".", 1)[0] + ".tif"
        write_geotiff(tmp_path / entry["file_name"], pixels.transpose(2, 0, 1))
    (tmp_path / "val.json").write_text(json.dumps(annotations))
    dataset = CocoDetection(tmp_path, tmp_path / "val.json")
    cfg = tiny_config(shapes_data, tmp_path / "run", model__inference__score_threshold=0.0, model__fpn__out_channels=64)
    torch.manual_seed(0)
    model = build_retinanet(cfg.model).eval()
    tile = TileConfig(size=64, overlap=0.25)
    whole = {}  # what evaluation gave before: each image decoded whole, then tiled
    for index in range(len(dataset)):
        image, target = dataset[index]
        whole[target["image_id"]] = predict_tiled(model, image, 64, 0.25, 4, "nms", max_detections=100)

    def no_whole_decode(path, *args, **kwargs):
        raise AssertionError(f"{path} decoded whole")

    monkeypatch.setattr("retinanet.data.dataset.read_image", no_whole_decode)
    results, skipped = evaluate_module.predict_dataset(model, dataset, batch_size=4, tile=tile)
    assert not skipped and {r["image_id"] for r in results} == set(whole)
    for image_id, det in whole.items():
        expected = evaluate_module.to_coco_results(det, image_id, model.category_ids)
        assert [r for r in results if r["image_id"] == image_id] == expected


@pytest.mark.slow
def test_data_value_range_reaches_tiled_training_and_evaluation(tmp_path, monkeypatch):
    """`data.value_range` is what tiled training reads its tiles with and what tiled evaluation
    opens its images with, not only `predict --value-range`."""
    from retinanet.config import load_config
    from retinanet.engine import evaluate as evaluate_module
    from retinanet.engine.train import Trainer

    from helpers import tiny_config

    folder = tmp_path / "images"
    folder.mkdir()
    write_geotiff(folder / "a.tif", np.full((1, 96, 96), 500, dtype=np.uint16))
    coco = {"images": [{"id": 1, "file_name": "a.tif", "width": 96, "height": 96}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    data = {"train_images": folder, "train_annotations": tmp_path / "a.json", "val_images": folder,
            "val_annotations": tmp_path / "a.json"}
    cfg = tiny_config(data, tmp_path / "run", model__num_classes=1, data__tile__size=64,
                      data__value_range="[0, 1000]", train__max_iter=1, train__batch_size=2,
                      train__reference_batch_size=2, data__num_workers=0)
    trainer = Trainer(cfg, tmp_path / "run", progress=False).setup()
    image, _ = trainer.train_set[0]
    assert int(image[0, 0, 0]) == 128  # 500 of 0-1000; the data's own range (9-bit, 0-511) gives 250
    opened = []
    real = evaluate_module.open_raster
    monkeypatch.setattr(evaluate_module, "open_raster", lambda path, **kw: opened.append(kw) or real(path, **kw))
    trainer.run()
    assert opened and all(kw.get("value_range") == [0.0, 1000.0] for kw in opened)
