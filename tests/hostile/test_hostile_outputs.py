"""Files never lost or overwritten: drawings, plots and exports never land on an input nor over
an existing file without --force; every output is written atomically (a full disk leaves the
old file or none, never a 0-byte or torn one, and a symlink at an output's name is replaced,
not followed); an output folder that cannot be written is refused in one line before any
work; a run killed mid-checkpoint leaves no temporary behind once resumed, and its
metrics.jsonl holds one history. Everything goes through the command line on real files."""

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from retinanet.cli import main as cli

from hostile_helpers import refused
from retinanet.config import save_config
from retinanet.data.synthetic import generate_dataset

from helpers import tiny_config


# ------------------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """A tiny dataset of its own (a test that fails may damage it)."""
    return generate_dataset(tmp_path_factory.mktemp("ds"), num_train=4, num_val=2, image_size=64, seed=5,
                            max_objects=2, min_size=16, max_size=40)


@pytest.fixture
def config(dataset, tmp_path) -> Path:
    path = tmp_path / "cfg.yaml"
    save_config(tiny_config(dataset, tmp_path / "run", model__input__train_min_sizes="[64]",
                            model__input__test_min_size=64, model__input__max_size=64,
                            data__val_annotations="''", train__batch_size=2, train__reference_batch_size=2), path)
    return path


@pytest.fixture
def weights(tmp_path_factory, shapes_model_file) -> Path:
    """A copy of the session's shapes model in a folder of its own (the tests look beside it)."""
    return Path(shutil.copyfile(shapes_model_file, tmp_path_factory.mktemp("weights") / "model.pt"))


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photos" / "photo.png"
    path.parent.mkdir()
    Image.new("RGB", (48, 40), (120, 60, 200)).save(path)
    return path


def _temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.is_dir() for p in folder.rglob("*.tmp")]


def _is_picture(path: Path) -> bool:
    with Image.open(path) as image:
        image.load()
    return True


def _disk_error(code: int, path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


@pytest.fixture
def read_only(monkeypatch):
    """Make folders behave as on a read-only mount: creating, writing or making folders in them
    fails with EROFS (permission bits would not do: the suite may run as root)."""
    folders: list[Path] = []

    def blocked(path) -> bool:
        if isinstance(path, int):
            return False
        p = Path(os.fsdecode(path)).absolute()
        return any(p == f or f in p.parents for f in folders)

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and blocked(file):
            raise _disk_error(errno.EROFS, file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and blocked(path):
            raise _disk_error(errno.EROFS, path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if blocked(path) and not os.path.exists(path):
            raise _disk_error(errno.EROFS, path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)

    def add(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folders.append(folder.absolute())
        return folder

    return add


# ------------------------------------------------------------------------------ case 4: drawings
@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_anchors_never_draw_over_their_image(config, photo, capsys, force):
    before = photo.read_bytes()
    refused(capsys, ["anchors", "--config", str(config), "--image", str(photo), "--output", str(photo), *force],
             str(photo), "is the input")
    assert photo.read_bytes() == before and not _temporaries(photo.parent)


def test_anchors_never_draw_over_a_hard_link_to_their_image(config, photo, tmp_path, capsys):
    link = tmp_path / "link.png"
    os.link(photo, link)
    before = photo.read_bytes()
    refused(capsys, ["anchors", "--config", str(config), "--image", str(photo), "--output", str(link), "--force"],
             "is the input")
    assert photo.read_bytes() == before


def test_anchors_and_plot_replace_an_existing_output_only_with_force(config, tmp_path, capsys):
    out = tmp_path / "view.png"
    out.write_bytes(b"my own picture")
    refused(capsys, ["anchors", "--config", str(config), "--output", str(out)], str(out), "--force")
    assert out.read_bytes() == b"my own picture"
    assert cli(["anchors", "--config", str(config), "--output", str(out), "--force"]) == 0
    assert _is_picture(out) and not _temporaries(tmp_path)

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "loss": 1.0, "loss_cls": 0.6,
                                                   "loss_box": 0.4, "lr": 0.01}) + "\n")
    curves = tmp_path / "curves.png"
    curves.write_bytes(b"older curves")
    refused(capsys, ["plot", str(run), "--output", str(curves)], str(curves), "--force")
    assert curves.read_bytes() == b"older curves"
    assert cli(["plot", str(run), "--output", str(curves), "--force"]) == 0
    assert _is_picture(curves) and not _temporaries(tmp_path)


def test_plot_never_writes_over_a_runs_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_text(json.dumps({"iteration": 1, "loss": 1.0, "loss_cls": 0.6, "loss_box": 0.4}) + "\n")
    before = metrics.read_bytes()
    refused(capsys, ["plot", str(run), "--output", str(metrics), "--force"], "is the input")
    assert metrics.read_bytes() == before


def test_assign_never_draws_over_or_into_the_training_images(config, dataset, capsys):
    images = Path(dataset["train_images"])
    first = json.loads(Path(dataset["train_annotations"]).read_text())["images"][0]
    target = images / first["file_name"]
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    refused(capsys, ["assign", "--config", str(config), "--image-id", str(first["id"]), "--output", str(target),
                      "--force"], str(target), "is the input")
    refused(capsys, ["assign", "--config", str(config), "--image-id", str(first["id"]),
                      "--output", str(images / "assigned.png")], "inside the input folder")
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_assign_replaces_an_existing_drawing_only_with_force(config, dataset, tmp_path, capsys):
    image_id = str(json.loads(Path(dataset["train_annotations"]).read_text())["images"][0]["id"])
    out = tmp_path / "assigned.png"
    out.write_bytes(b"mine")
    refused(capsys, ["assign", "--config", str(config), "--image-id", image_id, "--output", str(out)], "--force")
    assert out.read_bytes() == b"mine"
    assert cli(["assign", "--config", str(config), "--image-id", image_id, "--output", str(out), "--force"]) == 0
    assert _is_picture(out) and not _temporaries(tmp_path)


@pytest.mark.parametrize("tile", [[], ["--tile", "64"]], ids=["whole", "tiled"])
def test_predict_replaces_symlinks_in_its_output_instead_of_following_them(weights, photo, victim, tmp_path, tile):
    out = tmp_path / "out"
    (out / "labels").mkdir(parents=True)
    (out / "labels" / "photo.txt").symlink_to(victim)
    (out / "photo.jpg").symlink_to(victim)
    (out / "predictions.json").symlink_to(victim)
    code = cli(["predict", "--weights", str(weights), str(photo), "--output-dir", str(out), "--save-txt", "yolo",
                "--workers", "0", "--score-threshold", "0", *tile])
    assert code == 0
    assert victim.read_text() == "keep me\n"
    for name in ("labels/photo.txt", "photo.jpg", "predictions.json"):
        assert not (out / name).is_symlink() and (out / name).is_file(), name
    assert _is_picture(out / "photo.jpg") and json.loads((out / "predictions.json").read_text())
    assert not _temporaries(out)


# ------------------------------------------------------------------------------ case 5: export
@pytest.mark.parametrize("kind", ["hard link", "symlink"])
def test_export_never_replaces_its_checkpoint_even_with_force(weights, tmp_path, capsys, kind):
    link = tmp_path / "model.onnx"
    os.link(weights, link) if kind == "hard link" else link.symlink_to(weights)
    before = weights.read_bytes()
    refused(capsys, ["export", "--weights", str(weights), "--output", str(link), "--force"], str(link),
             "is the input")
    assert weights.read_bytes() == before and not _temporaries(tmp_path, weights.parent)


def test_export_on_a_full_disk_leaves_the_old_file_and_no_partial_one(weights, tmp_path, capsys, monkeypatch):
    def full_disk(module, args, f, **kwargs):
        with open(f, "wb") as out:
            out.write(b"\x08\x07partial")
        raise _disk_error(errno.ENOSPC, f)

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    fresh = tmp_path / "new.onnx"
    refused(capsys, ["export", "--weights", str(weights), "--output", str(fresh)], str(fresh),
             "No space left on device")
    assert not fresh.exists()
    old = tmp_path / "old.onnx"
    old.write_bytes(b"the previous export")
    refused(capsys, ["export", "--weights", str(weights), "--output", str(old), "--force"], str(old),
             "No space left on device", "unchanged")
    assert old.read_bytes() == b"the previous export" and not _temporaries(tmp_path)


# ------------------------------------------------------------------------------ case 6: broken disks
@pytest.mark.slow
def test_train_on_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(config, tmp_path, capsys, monkeypatch):
    """torch's zip writer reports ENOSPC as a RuntimeError raised while handling the OSError
    (two chained tracebacks before); the second checkpoint write meets the full disk."""
    from retinanet.checkpoint import read_checkpoint

    real_save, calls = torch.save, []

    def save(data, f, *args, **kwargs):
        calls.append(f)
        if len(calls) < 2:
            return real_save(data, f, *args, **kwargs)
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 torn")
        else:
            Path(f).write_bytes(b"PK\x03\x04 torn")
        try:
            raise _disk_error(errno.ENOSPC, f)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    line = refused(capsys, ["train", "--config", str(config), "train.checkpoint_period=1", "train.max_iter=2"],
                    str(run / "last.pt"), "No space left on device", "intact", "--resume")
    assert "unexpected pos" not in line
    assert read_checkpoint(run / "last.pt").training["iteration"] == 1
    assert not _temporaries(run)


def test_predict_on_a_full_disk_is_one_line_without_a_partial_drawing(weights, photo, tmp_path, capsys,
                                                                      monkeypatch):
    def full_disk(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\xff\xd8")
        raise _disk_error(errno.ENOSPC, fp)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out"
    refused(capsys, ["predict", "--weights", str(weights), str(photo), "--output-dir", str(out), "--workers", "0"],
             str(out / "photo.jpg"), "No space left on device")
    assert not (out / "photo.jpg").exists() and not _temporaries(out)


def test_analyze_refuses_a_read_only_folder_before_any_work(config, tmp_path, capsys, monkeypatch, read_only):
    from retinanet.engine import analyze as analyze_module

    def no_work(*args, **kwargs):
        raise AssertionError("the data was read before the output folder was checked")

    monkeypatch.setattr(analyze_module, "open_dataset", no_work)
    out = read_only(tmp_path / "ro") / "analysis"
    refused(capsys, ["analyze", "--config", str(config), "--output-dir", str(out)], str(out),
             "Read-only file system")


@pytest.mark.parametrize("command", ["train", "predict", "export", "anchors", "assign", "plot"])
def test_a_read_only_output_folder_is_one_line(command, config, dataset, weights, photo, tmp_path, capsys,
                                               read_only):
    ro = read_only(tmp_path / "ro")
    run = tmp_path / "done"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "loss": 1.0, "loss_cls": 0.6,
                                                   "loss_box": 0.4}) + "\n")
    image_id = str(json.loads(Path(dataset["train_annotations"]).read_text())["images"][0]["id"])
    argv = {"train": ["train", "--config", str(config), "--output-dir", str(ro / "run")],
            "predict": ["predict", "--weights", str(weights), str(photo), "--output-dir", str(ro / "out")],
            "export": ["export", "--weights", str(weights), "--output", str(ro / "m.onnx")],
            "anchors": ["anchors", "--config", str(config), "--output", str(ro / "a.png")],
            "assign": ["assign", "--config", str(config), "--image-id", image_id, "--output", str(ro / "a.png")],
            "plot": ["plot", str(run), "--output", str(ro / "curves.png")]}[command]
    refused(capsys, argv, "Read-only file system")
    assert list(ro.iterdir()) == []


def test_a_disk_error_anywhere_is_one_line_not_a_traceback(config, tmp_path, capsys, monkeypatch):
    """The last line of defence in main(): a write that no output helper wraps (here the
    training log) still ends in one line naming the file."""
    from retinanet.engine import train as train_module

    def full_disk(self, record):
        raise _disk_error(errno.ENOSPC, self.output_dir / "metrics.jsonl")

    monkeypatch.setattr(train_module.Trainer, "append_jsonl", full_disk)
    refused(capsys, ["train", "--config", str(config), "train.max_iter=1"], "metrics.jsonl",
             "No space left on device", "--resume")


# ------------------------------------------------------------------------------ case 7: killed runs
KILLED_RUN = """
import os, signal, sys
import torch
from retinanet.cli import main

real_save, calls = torch.save, []

def save(data, f, *args, **kwargs):  # the third checkpoint write (iteration 3) is killed halfway
    calls.append(f)
    if len(calls) < 3:
        return real_save(data, f, *args, **kwargs)
    if hasattr(f, "write"):
        f.write(b"PK\\x03\\x04" + bytes(4096))
        f.flush()
    else:
        with open(f, "wb") as out:
            out.write(b"PK\\x03\\x04" + bytes(4096))
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save
sys.exit(main(["train", "--config", sys.argv[1], "train.checkpoint_period=1", "train.max_iter=4"]))
"""


@pytest.mark.slow
def test_a_run_killed_mid_checkpoint_resumes_without_temporaries_or_repeated_metrics(config, tmp_path):
    from retinanet.checkpoint import read_checkpoint

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(config)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    stale = list(run.glob(".last.pt.*.tmp"))
    assert len(stale) == 1, sorted(p.name for p in run.iterdir())
    logged = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]  # 3 comes after the last checkpoint (2)
    assert read_checkpoint(run / "last.pt").training["iteration"] == 2
    mine = [run / ".notes.tmp", run / "last.pt.tmp", run / "sub" / ".last.pt.x.tmp"]  # not ours: kept
    for path in mine:
        path.parent.mkdir(exist_ok=True)
        path.write_text("not ours")

    assert cli(["train", "--config", str(config), "--resume", "train.checkpoint_period=1", "train.max_iter=4"]) == 0
    assert not stale[0].exists() and all(p.read_text() == "not ours" for p in mine)
    logged = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]
    assert read_checkpoint(run / "last.pt").training["iteration"] == 4
