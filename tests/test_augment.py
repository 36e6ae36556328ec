"""`data.augment`: each op's box geometry, crops and ignored regions, photometric ranges, the
sampler's reproducible draws, config validation, and `retinanet augment`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet.cli import main as cli
from retinanet.config import ConfigError, load_config
from retinanet.data.augment import apply_ops, draw_ops, op_params, rescale, rotate90, vflip
from retinanet.data.coco import CocoDetection
from retinanet.data.sampler import TrainBatchSampler
from retinanet.data.tiles import TiledDataset

from helpers import write_json


def ops(*entries: str):
    """`data.augment` entries (YAML flow mappings) as the config loads them."""
    return load_config(None, ["data.horizontal_flip=0", f"data.augment=[{', '.join(entries)}]"]).data.augment


def painted(height: int, width: int, box: list[int]) -> torch.Tensor:
    """A black `(3, H, W)` uint8 image with the pixels of `box` (xyxy, whole pixels) white."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[:, box[1] : box[3], box[0] : box[2]] = 255
    return image


def pixel_box(image: torch.Tensor, threshold: int = 127) -> list[float]:
    """The xyxy box around the pixels brighter than `threshold`."""
    ys, xs = torch.nonzero(image[0] > threshold, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def target_of(boxes, crowd=None) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    crowd = torch.zeros(len(boxes), dtype=torch.bool) if crowd is None else torch.tensor(crowd)
    return {"boxes": boxes, "labels": torch.arange(len(boxes)), "iscrowd": crowd, "image_id": 1}


@pytest.mark.parametrize("drawn, shape, expected", [
    (("hflip",), (6, 10), [5.0, 1, 8, 4]),
    (("vflip",), (6, 10), [2.0, 2, 5, 5]),
    (("rotate90", 1), (10, 6), [1.0, 5, 4, 8]),  # counter-clockwise: (x, y) -> (y, W - x)
    (("rotate90", 2), (6, 10), [5.0, 2, 8, 5]),
    (("rotate90", 3), (10, 6), [2.0, 2, 5, 5]),  # clockwise: (x, y) -> (H - y, x)
])
def test_flips_and_quarter_turns_move_boxes_exactly_on_a_non_square_image(drawn, shape, expected):
    box = [2, 1, 5, 4]
    image, target = apply_ops(painted(6, 10, box), target_of([box]), (drawn,))
    assert tuple(image.shape[-2:]) == shape
    assert target["boxes"].tolist() == [expected]
    assert pixel_box(image) == expected  # the pixels went where the box went


def test_quarter_turns_compose_and_four_are_the_identity():
    image, boxes = painted(6, 10, [2, 1, 5, 4]), torch.tensor([[2.0, 1, 5, 4], [0, 0, 10, 6]])
    turned, turned_boxes = rotate90(*rotate90(image, boxes, 1), 2)
    assert torch.equal(turned, torch.rot90(image, 3, (-2, -1)))
    assert torch.equal(turned_boxes, rotate90(image, boxes, 3)[1])
    assert all(torch.equal(a, b) for a, b in zip(rotate90(image, boxes, 4), (image, boxes)))
    flipped, flipped_boxes = vflip(*vflip(image, boxes))
    assert torch.equal(flipped, image) and torch.equal(flipped_boxes, boxes)


def test_scale_jitter_crop_enlarges_ignores_cut_boxes_and_drops_outside_ones():
    # 20 x 10 image, scale 2: a 10 x 5 window at (5, 5) enlarged back to 20 x 10
    boxes = [[6, 6, 10, 9],  # inside: moved and doubled
             [3, 4, 7, 10],  # 10 of its 24 px inside: an ignored region
             [15, 0, 20, 4]]  # outside: dropped
    image, target = rescale(painted(10, 20, [6, 6, 10, 9]), target_of(boxes), 2.0, 0.5, 1.0, 0.5, (0, 0, 0))
    assert image.shape == (3, 10, 20)
    assert target["boxes"].tolist() == [[2, 2, 10, 8], [0, 0, 4, 10]]
    assert target["iscrowd"].tolist() == [False, True] and target["labels"].tolist() == [0, 1]
    assert pixel_box(image) == [2, 2, 10, 8]  # a 2x bilinear enlargement puts half-grey on the edge


def test_zoom_out_shrinks_onto_the_fill_and_drops_boxes_of_a_pixel():
    boxes = [[4, 2, 12, 8], [0, 0, 2, 2]]
    image, target = rescale(painted(10, 20, [4, 2, 12, 8]), target_of(boxes), 0.5, 0.0, 1.0, 0.5, (7, 8, 9))
    assert image.shape == (3, 10, 20)
    assert target["boxes"].tolist() == [[2, 6, 6, 9]]  # halved, at the bottom-left; the 1 px box dropped
    assert pixel_box(image, threshold=100) == [2, 6, 6, 9]
    assert image[:, :5].reshape(3, -1).unique(dim=1).tolist() == [[7], [8], [9]]  # the canvas above
    assert image[:, :, 10:].reshape(3, -1).unique(dim=1).tolist() == [[7], [8], [9]]  # and to the right
    (zoom_out,) = ops("{kind: zoom_out, p: 1, max_scale: 4}")
    assert op_params(zoom_out, [0.0, 1.0, 0.2, 0.3])[:4] == ("rescale", 0.25, 0.2, 0.3)
    assert op_params(zoom_out, [0.0, 0.0, 0.2, 0.3])[1] == 1.0


def test_photometric_leaves_boxes_and_draws_factors_within_their_ranges():
    (op,) = ops("{kind: photometric, p: 1, brightness: [0.5, 1.5], contrast: [1, 1], saturation: [1, 1], hue: [0, 0]}")
    image, boxes = torch.full((3, 4, 6), 100, dtype=torch.uint8), [[1.0, 1, 3, 3]]
    drawn = draw_ops([op], 200, torch.Generator().manual_seed(0))
    factors = [d[0][1] for d in drawn]
    assert 0.5 <= min(factors) < 0.6 and 1.4 < max(factors) <= 1.5
    for (params,) in drawn[:20]:
        out, target = apply_ops(image, target_of(boxes), (params,))
        assert target["boxes"].tolist() == boxes
        (value,) = out.unique().tolist()  # brightness: one factor on every pixel (truncated to uint8)
        assert 0 <= 100 * params[1] - value < 1
    colourful = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    for params in [("photometric", 1.0, 1.5, 1.0, 0.0), ("photometric", 1.0, 1.0, 0.5, 0.0),
                   ("photometric", 1.0, 1.0, 1.0, 0.1)]:  # contrast, saturation, hue
        out, target = apply_ops(colourful, target_of(boxes), (params,))
        assert not torch.equal(out, colourful) and target["boxes"].tolist() == boxes
    assert torch.equal(apply_ops(colourful, target_of(boxes), (("photometric", 1.0, 1.0, 1.0, 0.0),))[0], colourful)


AUGMENT = ["{kind: vflip, p: 0.5}", "{kind: rotate90}", "{kind: photometric, p: 0.5}",
           "{kind: scale_jitter, p: 0.7, scale: [0.5, 1.5]}", "{kind: zoom_out, p: 0.3}"]


def test_sampler_draws_are_reproducible_resumable_and_leave_the_other_draws_alone():
    ratios = [1.5, 0.7, 1.0] * 6
    plain = iter(TrainBatchSampler(ratios, 4, seed=5, flip_prob=0.5, max_zoom=1.5, grouping=False))
    augmented = TrainBatchSampler(ratios, 4, seed=5, flip_prob=0.5, max_zoom=1.5, grouping=False, augment=ops(*AUGMENT))
    stream = iter(augmented)
    batches = [next(stream) for _ in range(12)]  # over two epochs
    for batch in batches:
        assert [item[:3] for item in batch] == next(plain)  # images, flips and zooms as without the list
    drawn = [item[3] for batch in batches for item in batch]
    assert all(len(d) == len(AUGMENT) for d in drawn)
    for i in range(len(AUGMENT)):
        fired = sum(d[i] is not None for d in drawn)
        assert 0 < fired < len(drawn)  # each op applies to some items and not to others
    assert {d[1][1] for d in drawn if d[1] is not None} == {1, 2, 3}
    assert [batch for batch, _ in zip(iter(augmented), range(12))] == batches  # drawn again: the same
    resumed = iter(TrainBatchSampler(ratios, 4, seed=5, flip_prob=0.5, max_zoom=1.5, grouping=False,
                                     augment=ops(*AUGMENT), start_batch=7))  # mid-epoch
    assert [next(resumed) for _ in range(5)] == batches[7:]
    other = iter(TrainBatchSampler(ratios, 4, seed=6, flip_prob=0.5, max_zoom=1.5, grouping=False,
                                   augment=ops(*AUGMENT)))
    assert [next(other) for _ in range(3)] != batches[:3]


def test_quarter_turned_items_are_batched_by_their_turned_orientation():
    ratios = [2.0] * 8 + [0.5] * 8
    stream = iter(TrainBatchSampler(ratios, 4, seed=1, augment=ops("{kind: rotate90, p: 0.5}")))
    for _ in range(8):
        orientations = set()
        for index, _, _, (turn,) in next(stream):
            orientations.add((ratios[index] >= 1) != (turn is not None and turn[1] % 2 == 1))
        assert len(orientations) == 1


def make_dataset(folder, size=(40, 30)):
    folder.mkdir(exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[12:20, 22:32] = 255
    Image.fromarray(pixels).save(folder / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": size[0], "height": size[1]}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [22, 12, 10, 8]}],
            "categories": [{"id": 1, "name": "box"}]}
    return CocoDetection(folder, write_json(folder / "a.json", data))


def test_images_and_tiles_apply_the_drawn_ops_after_zoom_and_flip(tmp_path):
    dataset = make_dataset(tmp_path / "data")
    drawn = (("vflip",), None, ("rotate90", 1))
    image, target = dataset[(0, True, None, drawn)]
    # hflip: [8, 12, 18, 20]; vflip on 30 rows: [8, 10, 18, 18]; a quarter turn on 40 columns: (y, 40 - x)
    assert image.shape == (3, 40, 30) and target["boxes"].tolist() == [[10, 22, 18, 32]]
    assert pixel_box(image) == [10, 22, 18, 32]
    tiles = TiledDataset(dataset, 20, 0.0, 0.5)
    index = next(i for i, (_, window) in enumerate(tiles.windows) if window == (20, 10, 40, 30))
    tile, tile_target = tiles[(index, False, None, (("vflip",),))]
    assert tile.shape == (3, 20, 20) and tile_target["boxes"].tolist() == [[2, 10, 12, 18]]
    assert pixel_box(tile) == [2, 10, 12, 18]


def test_augment_config_errors_name_the_key(tmp_path):
    cases = {
        "[{kind: hflp}]": "data.augment[0].kind: 'hflp' is not allowed",
        "[{kind: vflip}, {kind: vflip, scale: [1, 2]}]": "unknown config key 'data.augment[1].scale'",
        "[{kind: rotate90, p: 1.5}]": "data.augment[0].p: 1.5 is out of range",
        "[{kind: scale_jitter, scale: [2.0, 0.5]}]": "data.augment[0].scale: [2.0, 0.5] must be [low, high]",
        "[{kind: photometric, hue: [0, 0.7]}]": "data.augment[0].hue[1]: 0.7 is out of range",
        "[{kind: zoom_out, fill: [1, 2]}]": "data.augment[0].fill: [1, 2] needs 3 values",
        "[{p: 0.5}]": "data.augment[0]: no kind given",
        "[vflip]": "data.augment[0]: expected a mapping with a kind",
    }
    for value, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(None, ["data.horizontal_flip=0", f"data.augment={value}"])
    with pytest.raises(ConfigError, match=r"data.augment\[0\]: hflip is listed while data.horizontal_flip is 0.5"):
        load_config(None, ["data.augment=[{kind: hflip}]"])
    assert load_config(None).data.augment == []  # off by default
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  augment:\n    - {kind: vflip, p: 2}\n")
    assert cli(["augment", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_augment_command_draws_pictures_and_refuses_to_overwrite(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "data")
    config = tmp_path / "aug.yaml"
    config.write_text(f"data:\n  train_images: {dataset.image_dir}\n  train_annotations: {dataset.annotation_file}\n"
                      "  horizontal_flip: 0\n  augment:\n    - {kind: vflip, p: 1}\n"
                      "    - {kind: scale_jitter, scale: [1.5, 1.5]}\n")
    out = tmp_path / "pictures"
    assert cli(["augment", "--config", str(config), "--output", str(out), "--count", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["augment.json", "augmented_000.png", "augmented_001.png",
                                                     "augmented_002.png"]
    listing = json.loads((out / "augment.json").read_text())
    for entry in listing:
        with Image.open(out / entry["picture"]) as picture:
            assert picture.size[0] >= 40 * 12  # enlarged to be seen
        vflip_params, (kind, scale, fx, fy, _, _) = entry["augment"]
        assert vflip_params == ["vflip"] and kind == "rescale" and scale == 1.5
        # the box [22, 10, 32, 18] after the flip, through a 27 x 20 window at (13fx, 10fy), enlarged 40/27, 30/20
        x0, y0 = round(fx * 13), round(fy * 10)
        expected = torch.tensor([[22 - x0, 10 - y0, 32 - x0, 18 - y0]]).clamp(min=0) * torch.tensor([40 / 27, 1.5] * 2)
        boxes = torch.tensor(entry["boxes"] + entry["ignored"])
        assert torch.allclose(boxes, torch.minimum(expected, torch.tensor([40.0, 30] * 2)))
    assert len({tuple(e["augment"][1][2:4]) for e in listing}) == 3  # each picture its own draw
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli(["augment", "--config", str(config), "--output", str(out), "--count", "1"]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli(["augment", "--config", str(config), "--output", str(dataset.image_dir / "pics"), "--force"]) == 2
    assert "inside the input folder" in capsys.readouterr().err and not (dataset.image_dir / "pics").exists()
    assert cli(["augment", "--config", str(config), "--output", str(out), "--count", "1", "--force"]) == 0


def test_the_trainer_samples_and_loads_the_configured_ops(shapes_data, tmp_path):
    from helpers import tiny_config
    from retinanet.engine.train import Trainer

    cfg = tiny_config(shapes_data, tmp_path / "run", data__num_workers=0, data__horizontal_flip=0,
                      data__augment="[{kind: rotate90, p: 1}]")
    trainer = Trainer(cfg, progress=False).setup()
    loader = trainer._loader()
    assert loader.batch_sampler.augment == cfg.data.augment
    images, targets, _ = next(iter(loader))
    first = next(iter(loader.batch_sampler))[0]
    plain, plain_target = trainer.train_set[first[0]]
    assert torch.equal(images[0], torch.rot90(plain, first[3][0][1], (-2, -1)))
    assert torch.equal(targets[0]["boxes"], rotate90(plain, plain_target["boxes"], first[3][0][1])[1])
