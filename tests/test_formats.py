"""CSV, Pascal VOC and YOLO datasets: each reader on small hand-written files, and one dataset
written in every format reading back as the same images, boxes and classes."""

import json
from pathlib import Path

import pytest
import torch

from retinanet.cli import main as cli
from retinanet.config import DataConfig, apply_overrides
from retinanet.data.coco import CocoDetection
from retinanet.data.dataset import DatasetError
from retinanet.data.formats import open_dataset, read_csv, read_voc, read_yolo

from helpers import tiny_config

SHAPES = ["ellipse", "rectangle", "triangle", "star", "cross"]


def _coco(shapes_data):
    return CocoDetection(shapes_data["train_images"], shapes_data["train_annotations"])


def write_keras_csv(coco: CocoDetection, path: Path) -> None:
    lines = []
    for r in coco.records:
        if not r.boxes:
            lines.append(f"{coco.image_dir / r.file_name},,,,,")
        for (x0, y0, x1, y1), label in zip(r.boxes, r.labels):
            lines.append(f"{coco.image_dir / r.file_name},{x0},{y0},{x1},{y1},{coco.class_names[label]}")
    path.write_text("\n".join(lines) + "\n")


def write_deepforest_csv(coco: CocoDetection, path: Path) -> None:
    lines = ["image_path,xmin,ymin,xmax,ymax,label"]
    for r in coco.records:
        if not r.boxes:
            lines.append(f"{r.file_name},0,0,0,0,")
        for (x0, y0, x1, y1), label in zip(r.boxes, r.labels):
            lines.append(f"{r.file_name},{x0},{y0},{x1},{y1},{coco.class_names[label]}")
    path.write_text("\n".join(lines) + "\n")


def write_voc(coco: CocoDetection, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for r in coco.records:
        objects = "".join(
            f"<object><name>{coco.class_names[label]}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin>"
            f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for (x0, y0, x1, y1), label in zip(r.boxes, r.labels))
        (folder / (Path(r.file_name).stem + ".xml")).write_text(
            f"<annotation><filename>{r.file_name}</filename><size><width>{r.width}</width><height>{r.height}"
            f"</height><depth>3</depth></size>{objects}</annotation>")


def write_yolo_labels(coco: CocoDetection, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in coco.records:
        lines = [f"{label} {(x0 + x1) / 2 / r.width:.7f} {(y0 + y1) / 2 / r.height:.7f} {(x1 - x0) / r.width:.7f} "
                 f"{(y1 - y0) / r.height:.7f}" for (x0, y0, x1, y1), label in zip(r.boxes, r.labels)]
        if lines:  # images without objects get no label file at all
            (folder / (Path(r.file_name).stem + ".txt")).write_text("\n".join(lines) + "\n")
    data_yaml = folder.parent / "data.yaml"
    data_yaml.write_text("names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(SHAPES)))
    return data_yaml


def _same(a, b, tolerance: float) -> None:
    """The same images (by file name), classes and boxes."""
    assert a.class_names == b.class_names
    by_name = {Path(r.file_name).name: r for r in b.records}
    assert sorted(by_name) == sorted(Path(r.file_name).name for r in a.records)
    for r in a.records:
        other = by_name[Path(r.file_name).name]
        assert (r.width, r.height) == (other.width, other.height)
        assert r.labels == other.labels
        assert torch.allclose(torch.tensor(r.boxes).reshape(-1, 4), torch.tensor(other.boxes).reshape(-1, 4),
                              atol=tolerance, rtol=0)


@pytest.fixture
def formats(shapes_data, tmp_path):
    coco = _coco(shapes_data)
    write_keras_csv(coco, tmp_path / "keras.csv")
    write_deepforest_csv(coco, tmp_path / "deepforest.csv")  # paths relative to the image folder
    write_voc(coco, tmp_path / "voc")
    images = tmp_path / "yolo" / "images" / "train"
    images.parent.mkdir(parents=True)
    images.symlink_to(Path(shapes_data["train_images"]).resolve(), target_is_directory=True)
    data_yaml = write_yolo_labels(coco, tmp_path / "yolo" / "labels" / "train")
    return coco, {
        "csv": DataConfig(format="csv", train_annotations=str(tmp_path / "keras.csv")),
        "deepforest": DataConfig(format="csv", train_images=shapes_data["train_images"],
                                 train_annotations=str(tmp_path / "deepforest.csv")),
        "voc": DataConfig(format="voc", train_images=shapes_data["train_images"],
                          train_annotations=str(tmp_path / "voc")),
        "yolo": DataConfig(format="yolo", train_images=str(images), classes=str(data_yaml)),
    }


def test_every_format_reads_back_as_the_same_dataset(formats):
    coco, configs = formats
    for name, cfg in configs.items():
        if name in ("csv", "deepforest", "voc"):  # names found in the files, sorted: give the COCO order
            cfg.classes = ""
        dataset = open_dataset(cfg, "train", class_names=coco.class_names)
        _same(coco, dataset, 1e-3 if name == "yolo" else 1e-6)
        assert dataset.format == ("csv" if name == "deepforest" else name)


def test_every_format_gives_the_same_first_training_loss(formats, shapes_data, tmp_path):
    from retinanet import RetinaNet
    from retinanet.data.dataset import collate

    coco, configs = formats
    cfg = tiny_config(shapes_data, tmp_path)
    losses = []
    for dataset in [coco] + [open_dataset(c, "train", class_names=coco.class_names) for c in configs.values()]:
        by_name = {Path(r.file_name).name: i for i, r in enumerate(dataset.records)}
        items = [dataset[by_name[f"{k:06d}.jpg"]] for k in (1, 2, 3, 4)]
        images, targets, _ = collate(items)
        torch.manual_seed(0)
        model = RetinaNet.from_config(cfg.model).train()
        out = model(images, targets, generator=torch.Generator().manual_seed(0))
        losses.append((out["loss_cls"].item(), out["loss_box"].item()))
    for cls, box in losses[1:]:
        assert cls == pytest.approx(losses[0][0], rel=1e-4) and box == pytest.approx(losses[0][1], rel=1e-3)


def test_csv_edge_cases(tmp_path):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (50, 40)).save(tmp_path / name)
    csv_file = tmp_path / "ann.csv"
    csv_file.write_text("a.png,1,2,30,20,cat\nb.png,,,,,\na.png,10,10,5,30,dog\nmissing.png,1,1,9,9,cat\n")
    dataset = read_csv(csv_file)
    assert dataset.class_names == ["cat", "dog"] and len(dataset) == 2
    a, b = dataset.records
    assert a.boxes == [[1.0, 2.0, 30.0, 20.0]] and b.boxes == []  # x2 <= x1: dropped with the summary
    assert dataset.report.dropped_boxes == 1 and dataset.report.missing_images == ["missing.png"]
    deepforest = tmp_path / "df.csv"
    deepforest.write_text("image_path,xmin,ymin,xmax,ymax,label\na.png,1,2,30,20,Tree\nb.png,0,0,0,0,Tree\n")
    trees = read_csv(deepforest)
    assert trees.class_names == ["Tree"] and [r.boxes for r in trees.records] == [[[1.0, 2.0, 30.0, 20.0]], []]
    bad = tmp_path / "bad.csv"
    bad.write_text("a.png,1,2,30\na.png,x,2,30,20,cat\na.png,1,2,30,20,\n")
    with pytest.raises(DatasetError) as info:
        read_csv(bad)
    assert [p.split(": ", 1)[1][:7] for p in info.value.problems] == ["line 1:", "line 2:", "line 3:"]
    with pytest.raises(DatasetError, match=r"unknown classes \['dog'\]"):
        read_csv(csv_file, class_names=["cat"])


def test_voc_difficult_objects_and_one_based_pixels(tmp_path):
    folder = tmp_path / "Annotations"
    folder.mkdir()
    (folder / "x.xml").write_text(
        "<annotation><filename>x.jpg</filename><size><width>100</width><height>80</height></size>"
        "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>11</ymin><xmax>50</xmax>"
        "<ymax>60</ymax></bndbox></object>"
        "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>21</xmin><ymin>21</ymin><xmax>40</xmax>"
        "<ymax>40</ymax></bndbox></object></annotation>")
    ignored = read_voc(folder, tmp_path)
    record = ignored.records[0]
    assert ignored.class_names == ["cat", "dog"]
    assert record.boxes == [[0.0, 10.0, 50.0, 60.0], [20.0, 20.0, 40.0, 40.0]]  # xmin, ymin minus 1
    assert record.crowd == [False, True]  # difficult: an ignored region
    assert read_voc(folder, tmp_path, difficult="train").records[0].crowd == [False, False]
    assert len(read_voc(folder, tmp_path, difficult="drop").records[0].boxes) == 1
    (folder / "broken.xml").write_text("<annotation><size>")
    with pytest.raises(DatasetError, match="broken.xml: not valid XML"):
        read_voc(folder, tmp_path)


def test_yolo_missing_label_files_and_bad_lines(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    labels = tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (200, 100)).save(images / name)
    (labels / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n")
    dataset = read_yolo(images, None, ["cat", "dog"])
    a, b = dataset.records
    assert a.labels == [1] and torch.allclose(torch.tensor(a.boxes), torch.tensor([[80.0, 30, 120, 70]]))
    assert b.boxes == []  # no label file: an image without objects
    (labels / "b.txt").write_text("5 0.5 0.5 0.1 0.1\n0 0.5 oops\n")
    with pytest.raises(DatasetError) as info:
        read_yolo(images, labels, ["cat", "dog"])
    assert "b.txt:1: class 5 is not in the class list" in str(info.value.problems)
    assert "b.txt:2: expected 'class cx cy w h'" in str(info.value.problems)
    with pytest.raises(DatasetError, match="need a class list"):
        read_yolo(images, labels, [])


def test_yolo_segment_lines_are_read_as_their_polygons_bounding_box(tmp_path, capsys):
    """YOLO segmentation labels (class + polygon) give the polygon's box, through `data convert`
    too; a line that is neither a box nor a polygon (a sixth number, an odd count) is refused
    with its line number instead of being read as a box from its first four numbers."""
    from PIL import Image

    images, labels = tmp_path / "ds" / "images", tmp_path / "ds" / "labels"
    images.mkdir(parents=True), labels.mkdir(parents=True)
    Image.new("RGB", (200, 100)).save(images / "a.jpg")
    (labels / "a.txt").write_text("0 0.1 0.2 0.5 0.1 0.4 0.9 0.2 0.6\n1 0.5 0.5 0.2 0.4\n")
    record = read_yolo(images, None, ["cat", "dog"]).records[0]
    assert record.labels == [0, 1]
    assert torch.allclose(torch.tensor(record.boxes), torch.tensor([[20.0, 10, 100, 90], [80, 30, 120, 70]]))
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    assert cli(["data", "convert", "--from", "yolo", str(images), "--classes", str(tmp_path / "classes.txt"),
                "--output", str(tmp_path / "out.json")]) == 0
    boxes = [a["bbox"] for a in json.loads((tmp_path / "out.json").read_text())["annotations"]]
    assert sorted(boxes) == [[20.0, 10.0, 80.0, 80.0], [80.0, 30.0, 40.0, 40.0]]
    for bad in ("0 0.5 0.5 0.2 0.4 0.9", "0 0.1 0.2 0.5 0.1 0.4 0.9 0.2", "0 0.5 0.5 nan 0.4"):
        (labels / "a.txt").write_text(bad + "\n")
        with pytest.raises(DatasetError) as info:
            read_yolo(images, None, ["cat", "dog"])
        assert "a.txt:1: expected 'class cx cy w h' or a segment" in str(info.value.problems), bad


@pytest.mark.slow
def test_training_and_check_data_take_any_format(formats, shapes_data, tmp_path, capsys):
    coco, configs = formats
    from retinanet.config import save_config

    yolo = configs["yolo"]
    cfg = tiny_config(shapes_data, tmp_path / "run", train__max_iter=2)
    cfg = apply_overrides(cfg, ["data.format=yolo", f"data.train_images={yolo.train_images}", "data.train_annotations=",
                                f"data.val_images={yolo.train_images}", "data.val_annotations=",
                                f"data.classes={yolo.classes}"])
    save_config(cfg, tmp_path / "cfg.yaml")
    assert cli(["check-data", "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert "(yolo, train)" in capsys.readouterr().out
    assert cli(["train", "--config", str(tmp_path / "cfg.yaml")]) == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == len(coco) and set(metrics["per_class_AP"]) == set(SHAPES)


def test_data_convert_cli(formats, shapes_data, tmp_path):
    coco, configs = formats
    out = tmp_path / "from_csv.json"
    assert cli(["data", "convert", "--from", "csv", configs["csv"].train_annotations, "--output", str(out)]) == 0
    converted = CocoDetection(Path(configs["csv"].train_annotations).parent, out)
    assert converted.report.num_boxes == coco.report.num_boxes
    assert cli(["data", "convert", "--from", "csv", configs["csv"].train_annotations, "--output", str(out)]) == 2
    labels = tmp_path / "labels_out"
    assert cli(["data", "convert", "--from", "coco", shapes_data["train_annotations"], "--images",
                shapes_data["train_images"], "--to", "yolo", "--output", str(labels)]) == 0
    back = read_yolo(shapes_data["train_images"], labels, (labels / "classes.txt").read_text().split())
    _same(coco, back, 1e-3)
