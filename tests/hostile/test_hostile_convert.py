"""`retinanet data convert` on hostile annotation files: every path built from annotation
content stays inside the output folder, nothing is written onto or into the inputs, label
files that would share a name are refused, and every refusal is one `error:` line with
nothing written. The corpus (tiny images, traversal file names, symlinks) is generated here."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from retinanet.cli import main as cli

from hostile_helpers import refused


def _image(path: Path, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (90, 120, 30)).save(path)
    return path


def _coco(path: Path, file_names: list) -> Path:
    """A COCO json with one 16x16 image per file name and one box on each."""
    images = [{"id": i, "file_name": name, "width": 16, "height": 16} for i, name in enumerate(file_names, 1)]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 6, 6]} for i in range(1, len(images) + 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


TRAVERSALS = ["../victim/pwn.jpg", "../../victim/pwn.jpg", "sub/../../victim/pwn.jpg", "..\\victim\\pwn.jpg",
              "sub\\..\\..\\victim\\pwn.jpg", "C:\\victim\\pwn.jpg", "\\\\server\\share\\pwn.jpg", "", ".",
              "a\x00.jpg"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_coco_file_names_leaving_the_output_folder_arerefused(tmp_path, victim, capsys, name):
    ann = _coco(tmp_path / "ds" / "ann.json", ["ok.jpg", name])
    out = tmp_path / "out" / "labels"
    refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--to", "yolo", "--output", str(out)],
             str(ann), "image 2", "nothing was written")
    assert victim.read_text() == "keep me\n"
    assert not out.exists() and not (tmp_path / "victim" / "pwn.txt").with_name("pwn.txt.tmp").exists()
    assert sorted(p.name for p in victim.parent.iterdir()) == ["pwn.txt"]


def test_absolute_file_name_outside_the_image_folder_isrefused(tmp_path, victim, capsys):
    ann = _coco(tmp_path / "ds" / "ann.json", [str(victim.with_suffix(".jpg"))])
    out = tmp_path / "out"
    refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--to", "yolo", "--output", str(out)],
             str(ann), "absolute path outside the image folder")
    assert victim.read_text() == "keep me\n" and not out.exists()


def test_absolute_file_name_inside_the_image_folder_maps_to_its_relative_label(tmp_path, capsys):
    images = tmp_path / "ds" / "images"
    _image(images / "sub" / "a.png")
    ann = _coco(tmp_path / "ds" / "ann.json", [str(images / "sub" / "a.png")])
    out = tmp_path / "out"
    assert cli(["data", "convert", "--from", "coco", str(ann), "--images", str(images), "--to", "yolo",
                "--output", str(out)]) == 0
    assert sorted(_tree(out)) == ["classes.txt", "sub/a.txt"]


def test_non_string_file_name_isrefused(tmp_path, capsys):
    ann = _coco(tmp_path / "ds" / "ann.json", [7])
    refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--to", "yolo", "--output",
                      str(tmp_path / "out")], str(ann), "image 1")


def test_voc_filename_leaving_the_output_folder_isrefused(tmp_path, victim, capsys):
    xml = tmp_path / "voc" / "a.xml"
    xml.parent.mkdir()
    xml.write_text("<annotation><filename>../../victim/pwn.jpg</filename><size><width>16</width><height>16</height>"
                   "</size><object><name>thing</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>8</xmax><ymax>8</ymax>"
                   "</bndbox></object></annotation>")
    out = tmp_path / "out" / "labels"
    refused(capsys, ["data", "convert", "--from", "voc", str(xml.parent), "--images", str(tmp_path / "img"),
                      "--to", "yolo", "--output", str(out)], str(xml.parent), "../../victim/pwn.jpg")
    assert victim.read_text() == "keep me\n" and not out.exists()


def test_csv_path_leaving_the_output_folder_isrefused(tmp_path, victim, capsys):
    _image(victim.with_suffix(".jpg"))  # the CSV reader opens the image: make the target a real one
    csv = tmp_path / "ds" / "train.csv"
    csv.parent.mkdir()
    csv.write_text("../victim/pwn.jpg,2,2,8,8,thing\n")
    out = tmp_path / "out" / "labels"
    refused(capsys, ["data", "convert", "--from", "csv", str(csv), "--to", "yolo", "--output", str(out)],
             str(csv), "'..'")
    assert victim.read_text() == "keep me\n" and not out.exists()


def test_symlinked_folder_inside_the_output_pointing_out_isrefused(tmp_path, victim, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(victim.parent, target_is_directory=True)
    ann = _coco(tmp_path / "ds" / "ann.json", ["link/pwn.jpg"])
    refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--to", "yolo", "--output", str(out),
                      "--force"], "link/pwn.jpg", "outside the output folder")
    assert victim.read_text() == "keep me\n"
    assert not (out / "classes.txt").exists()


def test_symlinked_label_file_pointing_out_isrefused(tmp_path, victim, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").symlink_to(victim)
    ann = _coco(tmp_path / "ds" / "ann.json", ["a.jpg"])
    refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--to", "yolo", "--output", str(out),
                      "--force"], "a.jpg", "outside the output folder")
    assert victim.read_text() == "keep me\n"


@pytest.mark.parametrize("names, shared", [(["a.jpg", "a.png"], "a.txt"), (["./b.jpg", "b.jpg"], "b.txt"),
                                           (["sub//c.jpg", "sub/c.jpg"], "sub/c.txt"),
                                           (["classes.jpg"], "classes.txt"), (["D.jpg", "d.jpg"], "d.txt")])
def test_images_sharing_a_label_file_are_refused_naming_both(tmp_path, capsys, names, shared):
    ann = _coco(tmp_path / "ds" / "ann.json", names)
    out = tmp_path / "out"
    line = refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--to", "yolo", "--output", str(out)],
                    str(ann), shared, "nothing was written")
    for name in names:
        assert repr(name) in line
    assert not out.exists()


def test_existing_label_file_is_not_replaced_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("mine\n")
    ann = _coco(tmp_path / "ds" / "ann.json", ["a.jpg"])
    refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--to", "yolo", "--output", str(out)],
             "--force")
    assert (out / "a.txt").read_text() == "mine\n"
    assert cli(["data", "convert", "--from", "coco", str(ann), "--to", "yolo", "--output", str(out), "--force"]) == 0
    assert (out / "a.txt").read_text().split()[0] == "0"


def test_output_kind_mismatch_with_force_is_one_line(tmp_path, capsys):
    ann = _coco(tmp_path / "ds" / "ann.json", ["a.jpg"])
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--to", "yolo", "--output", str(a_file),
                      "--force"], str(a_file), "not a folder")
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--output", str(a_folder), "--force"],
             str(a_folder), "is a folder")
    assert a_file.read_text() == "x"


def test_a_failure_while_writing_labels_leaves_no_output(tmp_path, capsys):
    ann = _coco(tmp_path / "ds" / "ann.json", ["a.jpg", "b" * 300 + ".jpg"])  # the second name is too long
    out = tmp_path / "out"
    refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--to", "yolo", "--output", str(out)],
             str(out), "nothing was written")
    assert sorted(os.listdir(tmp_path)) == ["ds"]


# ---------------------------------------------------------------- never onto or into the inputs
def _yolo_set(root: Path) -> tuple[Path, Path, Path]:
    images, labels = root / "images", root / "labels"
    for name in ("a.png", "b.png"):
        _image(images / name)
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text("0 0.5 0.5 0.25 0.25\n0 0.2 0.2 0.1 0.1\n")
    (labels / "b.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    classes = root / "classes.txt"
    classes.write_text("thing\n")
    return images, labels, classes


def test_yolo_to_yolo_onto_its_own_labels_is_refused_even_with_force(tmp_path, capsys):
    images, labels, classes = _yolo_set(tmp_path / "ds")
    before = _tree(tmp_path / "ds")
    refused(capsys, ["data", "convert", "--from", "yolo", str(images), "--classes", str(classes), "--to", "yolo",
                      "--output", str(labels), "--force"], str(labels), "input")
    refused(capsys, ["data", "convert", "--from", "yolo", str(images), "--labels", str(labels), "--classes",
                      str(classes), "--to", "yolo", "--output", str(labels / "." / "sub"), "--force"], "input")
    assert _tree(tmp_path / "ds") == before


def test_labels_into_the_image_folder_are_refused_even_with_force(tmp_path, capsys):
    images = tmp_path / "ds"
    _image(images / "a.png")
    ann = _coco(images / "ann.json", ["a.png"])
    before = _tree(images)
    for out in (images, images / "labels"):
        refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--to", "yolo", "--output", str(out),
                          "--force"], "input")
    assert _tree(images) == before


def test_label_tree_reaching_into_an_input_folder_isrefused(tmp_path, capsys):
    """Output beside the inputs, but an image's relative path leads its label into the labels input."""
    root = tmp_path / "ds"
    images, labels, classes = _yolo_set(root)
    _image(images / "labels" / "a.png")  # its label in --output ROOT would be ROOT/labels/a.txt
    before = _tree(root)
    refused(capsys, ["data", "convert", "--from", "yolo", str(images), "--labels", str(labels), "--classes",
                      str(classes), "--to", "yolo", "--output", str(root), "--force"], "labels/a.png", "input")
    assert _tree(root) == before


def test_coco_output_hard_linked_to_the_source_isrefused(tmp_path, capsys):
    ann = _coco(tmp_path / "ds" / "ann.json", ["a.jpg"])
    link = tmp_path / "link.json"
    os.link(ann, link)
    before = ann.read_bytes()
    refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--output", str(link), "--force"],
             str(link), "input")
    assert ann.read_bytes() == before


def test_coco_output_never_replaces_a_file_in_an_input_folder(tmp_path, capsys):
    images, labels, classes = _yolo_set(tmp_path / "ds")
    before = _tree(tmp_path / "ds")
    refused(capsys, ["data", "convert", "--from", "yolo", str(images), "--classes", str(classes), "--output",
                      str(images / "a.png"), "--force"], "input")
    assert _tree(tmp_path / "ds") == before
    # a new file beside the inputs is fine (COCO jsons usually live next to their images)
    assert cli(["data", "convert", "--from", "yolo", str(images), "--classes", str(classes), "--output",
                str(images / "train.json")]) == 0


# ---------------------------------------------------------------- silent wrong results
def test_empty_csv_is_one_line_and_writes_nothing(tmp_path, capsys):
    for text in ("", "image_path,xmin,ymin,xmax,ymax,label\n"):
        csv = tmp_path / "empty.csv"
        csv.write_text(text)
        refused(capsys, ["data", "convert", "--from", "csv", str(csv), "--output", str(tmp_path / "o.json")],
                 str(csv), "no annotation rows")
        assert not (tmp_path / "o.json").exists()


def test_csv_with_every_image_missing_is_one_line(tmp_path, capsys):
    csv = tmp_path / "train.csv"
    csv.write_text("missing.jpg,1,1,5,5,thing\n")
    refused(capsys, ["data", "convert", "--from", "csv", str(csv), "--output", str(tmp_path / "o.json")],
             str(csv), "no images")
    assert not (tmp_path / "o.json").exists()


def test_csv_spellings_of_one_image_are_one_image(tmp_path, capsys):
    _image(tmp_path / "000001.jpg")
    csv = tmp_path / "train.csv"
    csv.write_text(f"000001.jpg,1,1,5,5,thing\n./000001.jpg,6,6,12,12,thing\n{tmp_path}/000001.jpg,2,2,9,9,thing\n")
    out = tmp_path / "o.json"
    assert cli(["data", "convert", "--from", "csv", str(csv), "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [image["file_name"] for image in data["images"]] == ["000001.jpg"]
    assert len(data["annotations"]) == 3


@pytest.mark.parametrize("target", ["coco", "yolo"])
def test_a_full_disk_is_one_line_and_leaves_no_part_of_an_output(tmp_path, capsys, monkeypatch, target):
    """Every conversion output goes through the one atomic writer: on ENOSPC one line, no file
    or folder left half-written, an existing output (with --force) unchanged."""
    import errno

    _image(tmp_path / "images" / "a.jpg")
    ann = _coco(tmp_path / "ann.json", ["a.jpg"])
    out = tmp_path / ("out.json" if target == "coco" else "labels")
    if target == "yolo":
        out.mkdir()
        (out / "a.txt").write_text("old\n")
    else:
        out.write_text("old")
    before = _tree(tmp_path)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    refused(capsys, ["data", "convert", "--from", "coco", str(ann), "--images", str(tmp_path / "images"), "--to",
                      target, "--output", str(out), "--force"], "No space left on device")
    monkeypatch.undo()
    assert _tree(tmp_path) == before  # no temporary file, the old output whole
