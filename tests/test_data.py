"""COCO reading, validation, images of every kind, sampling."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet.data.coco import CocoDetection, DatasetError, collate, hflip
from retinanet.data.image_io import ImageReadError, read_image
from retinanet.data.sampler import TrainBatchSampler

from helpers import write_json


def coco(images, annotations, categories=({"id": 1, "name": "a"}, {"id": 5, "name": "b"})):
    return {"images": images, "annotations": annotations, "categories": list(categories)}


def make_image(folder, name, size=(40, 30), mode="RGB"):
    Image.fromarray((np.random.rand(size[1], size[0], 3) * 255).astype(np.uint8)).convert(mode).save(folder / name)
    return {"id": len(list(folder.iterdir())), "file_name": name, "width": size[0], "height": size[1]}


def test_reads_boxes_labels_crowd_and_drops_degenerate(tmp_path, caplog):
    img = make_image(tmp_path, "a.png")
    anns = [
        {"id": 1, "image_id": img["id"], "category_id": 5, "bbox": [1, 2, 10, 5]},
        {"id": 2, "image_id": img["id"], "category_id": 1, "bbox": [0, 0, 20, 20], "iscrowd": 1},
        {"id": 3, "image_id": img["id"], "category_id": 1, "bbox": [5, 5, 0.5, 10]},  # too thin
        {"id": 4, "image_id": img["id"], "category_id": 1, "bbox": [100, 100, 10, 10]},  # outside
        {"id": 5, "image_id": img["id"], "category_id": 1, "bbox": [30, 20, 50, 50]},  # clipped to image
    ]
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(tmp_path, write_json(tmp_path / "a.json", coco([img], anns)))
    assert "dropped 2 degenerate boxes" in caplog.text
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8
    assert target["boxes"].tolist() == [[1, 2, 11, 7], [0, 0, 20, 20], [30, 20, 40, 30]]
    assert target["labels"].tolist() == [1, 0, 0] and target["iscrowd"].tolist() == [False, True, False]
    assert ds.category_ids[1] == 5 and ds.class_names == ["a", "b"]


def test_images_without_boxes_are_kept(tmp_path):
    img = make_image(tmp_path, "a.png")
    ds = CocoDetection(tmp_path, write_json(tmp_path / "a.json", coco([img], [])))
    assert len(ds) == 1 and ds[0][1]["boxes"].shape == (0, 4)


@pytest.mark.parametrize("data,fragment", [
    ([1, 2], "top level is not an object"),
    ({"images": []}, "no 'annotations' list"),
    (coco([{"id": 1, "file_name": "x.png", "width": 5, "height": 5}],
          [{"id": 9, "image_id": 1, "category_id": 42, "bbox": [0, 0, 2, 2]}]), "category id 42"),
    (coco([{"id": 1, "file_name": "x.png", "width": 5, "height": 5}],
          [{"id": 9, "image_id": 7, "category_id": 1, "bbox": [0, 0, 2, 2]}]), "unknown image id 7"),
    (coco([{"id": 1, "file_name": "x.png"}], []), "needs id, file_name, width and height"),
])
def test_bad_annotation_files_name_file_and_problem(tmp_path, data, fragment):
    path = write_json(tmp_path / "ann.json", data)
    with pytest.raises(DatasetError, match=fragment) as err:
        CocoDetection(tmp_path, path)
    assert str(path) in str(err.value)


def test_not_json(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        CocoDetection(tmp_path, path)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_every_image_mode_becomes_rgb_uint8(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    if mode == "I;16":
        Image.fromarray((np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)).save(path)
    else:
        Image.new("RGB", (4, 3), (200, 100, 50)).convert(mode).save(path)
    image = read_image(path)
    assert image.shape == (3, 3, 4) and image.dtype == torch.uint8
    if mode == "I;16":
        assert image[0, 2, 3] == round(55000 / 65535 * 255)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(path, exif=exif)
    assert read_image(path).shape == (3, 40, 20)


def test_bad_image_is_skipped_and_listed_unless_strict(tmp_path):
    good = make_image(tmp_path, "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    bad = {"id": 99, "file_name": "bad.jpg", "width": 10, "height": 10}
    ann = write_json(tmp_path / "a.json", coco([good, bad], []))
    ds = CocoDetection(tmp_path, ann)
    images, targets, skipped = collate([ds[0], ds[1]])
    assert len(images) == 1 and len(skipped) == 1 and "bad.jpg" in skipped[0]
    with pytest.raises(ImageReadError, match="bad.jpg"):
        CocoDetection(tmp_path, ann, strict=True)[1]


def test_flip_is_an_involution():
    image = torch.randint(0, 255, (3, 5, 7), dtype=torch.uint8)
    boxes = torch.tensor([[1.0, 0, 3, 4], [0, 1, 7, 5]])
    im2, b2 = hflip(*hflip(image, boxes))
    assert torch.equal(im2, image) and torch.equal(b2, boxes)
    assert hflip(image, boxes)[1][0].tolist() == [4, 0, 6, 4]


def test_sampler_groups_shards_and_resumes():
    ratios = [1.5, 0.7] * 10
    one = TrainBatchSampler(ratios, 4, seed=1, flip_prob=0.5)
    stream = iter(one)
    batches = [next(stream) for _ in range(12)]
    for batch in batches:
        assert len({ratios[i] >= 1 for i, _ in batch}) == 1  # one orientation per batch
    ranks = [iter(TrainBatchSampler(ratios, 4, seed=1, rank=r, world_size=2, flip_prob=0.5)) for r in (0, 1)]
    for batch in batches:
        assert next(ranks[0]) + next(ranks[1]) == batch
    resumed = iter(TrainBatchSampler(ratios, 4, seed=1, flip_prob=0.5, start_batch=7))
    assert [next(resumed) for _ in range(5)] == batches[7:]
    flips = [f for b in batches for _, f in b]
    assert 0 < sum(flips) < len(flips)


def test_sampler_rejects_bad_batch():
    with pytest.raises(ValueError, match="divisible"):
        TrainBatchSampler([1.0] * 4, 3, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        TrainBatchSampler([], 2)


def test_truncated_image_fails_even_if_pil_was_told_to_pad(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = tmp_path / "t.jpg"
    Image.fromarray((np.random.rand(64, 64, 3) * 255).astype(np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:1500])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries do globally
    with pytest.raises(ImageReadError, match="damaged or truncated"):
        read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_zoom_crop_keeps_cuts_and_drops_boxes():
    from retinanet.data.dataset import zoom_crop

    image = torch.arange(100 * 80).reshape(1, 80, 100).expand(3, -1, -1).to(torch.int32)
    target = {"boxes": torch.tensor([[50.0, 40, 70, 60], [0, 0, 30, 20], [40, 0, 60, 14], [0, 70, 10, 80]]),
              "labels": torch.tensor([0, 1, 2, 3]), "iscrowd": torch.tensor([False, False, False, True]), "image_id": 7}
    crop, out = zoom_crop(image, target, 2.0, 1.0, 0.25)  # a 50 x 40 window at (50, 10)
    assert crop.shape == (3, 40, 50) and torch.equal(crop, image[:, 10:50, 50:100])
    # inside: shifted; 2 of 20 px inside: ignored; outside: dropped
    assert out["boxes"].tolist() == [[0, 30, 20, 40], [0, 0, 10, 4]]
    assert out["labels"].tolist() == [0, 2] and out["iscrowd"].tolist() == [False, True]
    assert out["image_id"] == 7
    same, unchanged = zoom_crop(image, target, 1.0, 0.3, 0.9)  # zoom 1: the whole image
    assert torch.equal(same, image) and torch.equal(unchanged["boxes"], target["boxes"])


def test_sampler_zoom_draws_leave_the_rest_of_the_stream_alone():
    ratios = [1.0] * 12
    plain = iter(TrainBatchSampler(ratios, 4, seed=3, flip_prob=0.5))
    zoomed = iter(TrainBatchSampler(ratios, 4, seed=3, flip_prob=0.5, max_zoom=1.5))
    again = iter(TrainBatchSampler(ratios, 4, seed=3, flip_prob=0.5, max_zoom=1.5, start_batch=2))
    batches = [next(zoomed) for _ in range(6)]
    for batch in batches:
        assert [item[:2] for item in batch] == next(plain)  # the same images and flips
        for _, _, (zoom, fx, fy) in batch:
            assert 1 <= zoom <= 1.5 and 0 <= fx <= 1 and 0 <= fy <= 1
    zooms = [item[2][0] for batch in batches for item in batch]
    assert max(zooms) - min(zooms) > 0.2
    assert [next(again) for _ in range(4)] == batches[2:]  # resumable
    with pytest.raises(ValueError, match="max_zoom"):
        TrainBatchSampler(ratios, 4, max_zoom=0.5)


def test_dataset_item_with_zoom_is_cropped_then_flipped(tmp_path):
    from retinanet.data.dataset import zoom_crop

    img = make_image(tmp_path, "a.png", size=(40, 30))
    anns = [{"id": 1, "image_id": img["id"], "category_id": 1, "bbox": [22, 12, 10, 8]}]
    ds = CocoDetection(tmp_path, write_json(tmp_path / "a.json", coco([img], anns)))
    image, target = ds[0]
    got_image, got = ds[(0, True, (1.6, 0.75, 0.5))]
    crop, expected = zoom_crop(image, target, 1.6, 0.75, 0.5)
    flipped, boxes = hflip(crop, expected["boxes"])
    assert got_image.shape == (3, 19, 25) and torch.equal(got_image, flipped)
    assert torch.equal(got["boxes"], boxes) and got["boxes"].tolist() == [[4.0, 6, 14, 14]]
