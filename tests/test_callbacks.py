"""The public callback API (retinanet.Callback, train.callbacks) and the experiment loggers
(train.loggers: csv, mlflow, wandb) on tiny training runs."""

import csv
import glob
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import retinanet
from retinanet.checkpoint import read_checkpoint
from retinanet.cli import main as cli
from retinanet.config import save_config

from helpers import tiny_config


class Recorder(retinanet.Callback):
    """Every event with what it was given."""

    def __init__(self):
        self.events = []

    def on_train_start(self, trainer):
        self.events.append(("train_start", trainer.iteration))

    def on_iter_end(self, trainer, losses):
        self.events.append(("iter_end", trainer.iteration, losses))

    def on_eval_end(self, trainer, metrics):
        self.events.append(("eval_end", trainer.iteration, metrics))

    def on_checkpoint(self, trainer, path):
        assert path.is_file()
        self.events.append(("checkpoint", trainer.iteration, path.name))

    def on_train_end(self, trainer, summary):
        self.events.append(("train_end", trainer.iteration, summary))


class StopAtTwo(retinanet.Callback):
    """Stops the run after its second iteration (imported by name in a test below)."""

    def on_iter_end(self, trainer, losses):
        if trainer.iteration == 2:
            trainer.request_stop("enough at 2")


def small_config(data, out, **overrides):
    """tiny_config at 2 images a batch and 2 validation images: these tests are about events."""
    return tiny_config(data, out, train__batch_size=2, train__reference_batch_size=2, eval__max_images=2,
                       **overrides)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_events_fire_in_order_with_their_arguments(shapes_data, tmp_path):
    out = tmp_path / "run"
    cfg = small_config(shapes_data, out, train__eval_period=2, train__checkpoint_period=2, train__loggers="[]")
    recorder = Recorder()
    summary = retinanet.Trainer(cfg, out, progress=False, callbacks=[recorder]).run()
    events = recorder.events
    names = [(e[0], e[1]) + ((e[2],) if e[0] == "checkpoint" else ()) for e in events]
    first_ap = next(e[2]["AP"] for e in events if e[0] == "eval_end")
    final_best = [("checkpoint", 4, "best.pt")] if summary["metrics"]["AP"] > first_ap else []
    assert names == [("train_start", 0), ("iter_end", 1),
                     ("checkpoint", 2, "last.pt"), ("checkpoint", 2, "best.pt"), ("eval_end", 2), ("iter_end", 2),
                     ("iter_end", 3), ("checkpoint", 4, "last.pt"), ("iter_end", 4),
                     ("checkpoint", 4, "last.pt"), ("checkpoint", 4, "model_final.pt"), ("eval_end", 4)][:-1] \
        + final_best + [("eval_end", 4), ("train_end", 4)]  # the final best.pt only when the AP rose
    losses = [e[2] for e in events if e[0] == "iter_end"]
    logged = [r for r in jsonl(out / "metrics.jsonl") if "loss" in r]
    for given, record in zip(losses, logged, strict=True):
        assert {"loss", "loss_cls", "loss_box", "lr"} <= set(given)
        assert given["loss"] == pytest.approx(record["loss"], abs=1e-6)
    evals = [r["eval"] for r in jsonl(out / "metrics.jsonl") if "eval" in r]
    assert [e[2]["AP"] for e in events if e[0] == "eval_end"] == [e["AP"] for e in evals]
    assert events[-1] == ("train_end", 4, summary) and summary["status"] == "finished"
    assert not (out / "tensorboard").exists()  # train.loggers: [] writes no event files


@pytest.mark.slow
def test_a_callback_stops_training_as_a_normal_end(shapes_data, tmp_path):
    out = tmp_path / "run"
    recorder = Recorder()
    summary = retinanet.Trainer(small_config(shapes_data, out), out, progress=False,
                                callbacks=[StopAtTwo(), recorder]).run()
    assert summary["status"] == "stopped" and summary["stop_reason"] == "enough at 2"
    assert summary["iteration"] == 2 and summary["metrics"] is not None  # the final evaluation ran
    last, final = read_checkpoint(out / "last.pt"), read_checkpoint(out / "model_final.pt")
    assert last.training["iteration"] == 2 and final.training is None
    for key, value in last.weights.items():
        assert torch.equal(value, final.weights[key]), key
    assert [e[1] for e in recorder.events if e[0] == "iter_end"] == [1, 2]
    assert recorder.events[-1] == ("train_end", 2, summary)


@pytest.mark.slow
def test_train_callbacks_by_name_through_the_cli(shapes_data, tmp_path):
    """`retinanet train` finds a callback module in the folder it runs in."""
    (tmp_path / "my_callbacks.py").write_text(
        "import retinanet\n\n"
        "class StopAtTwo(retinanet.Callback):\n"
        "    def on_iter_end(self, trainer, losses):\n"
        "        if trainer.iteration == 2:\n"
        "            trainer.request_stop('enough at 2')\n")
    out = tmp_path / "run"
    save_config(small_config(shapes_data, out, data__val_annotations="''"), tmp_path / "cfg.yaml")
    done = subprocess.run([str(Path(sys.executable).parent / "retinanet"), "train", "--config", "cfg.yaml",
                           "train.callbacks=[my_callbacks:StopAtTwo]"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "stopped at iteration 2: enough at 2" in done.stderr
    assert read_checkpoint(out / "last.pt").training["iteration"] == 2 and (out / "model_final.pt").is_file()


@pytest.mark.parametrize("setting, message", [
    ("train.callbacks=[no_such_module_here:Thing]", "train.callbacks: cannot import 'no_such_module_here:Thing'"),
    ("train.callbacks=[test_callbacks:jsonl]", "train.callbacks: test_callbacks:jsonl is not a retinanet.Callback"),
    ("train.loggers=[csv,mlflow]", "train.loggers: mlflow needs the mlflow package: pip install 'retinanet[mlflow]'"),
])
def test_a_missing_callback_or_logger_package_is_one_line_before_any_data_is_read(tmp_path, monkeypatch, capsys,
                                                                                 setting, message):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    out = tmp_path / "run"
    # the data does not exist: reading it would be another error
    code = cli(["train", "--config", "demo", "--output-dir", str(out), setting,
                f"data.train_annotations={tmp_path / 'missing.json'}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def tracked_run(shapes_data, tmp_path_factory):
    """One run with the csv, MLflow and W&B loggers (MLflow to its default store in the run's
    folder, W&B offline): 3 iterations, evaluated at 2 and at the end. One class is named
    "star (5)", a name MLflow refuses in a metric name."""
    tmp = tmp_path_factory.mktemp("tracked")
    out = tmp / "run"
    data = dict(shapes_data)
    for split in ("train", "val"):
        coco = json.loads(Path(shapes_data[f"{split}_annotations"]).read_text())
        coco["categories"][3]["name"] = "star (5)"
        data[f"{split}_annotations"] = tmp / f"{split}.json"
        data[f"{split}_annotations"].write_text(json.dumps(coco))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # restored to absent afterwards; the logger sets it
        mp.delenv("MLFLOW_ALLOW_FILE_STORE")
        mp.delenv("WANDB_PROJECT", raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp / "wandb_dir"))
        mp.setenv("WANDB_SILENT", "true")
        (tmp / "wandb_dir").mkdir()
        cfg = small_config(data, out, train__max_iter=3, train__eval_period=2,
                           train__loggers="[csv,mlflow,wandb]")
        summary = retinanet.Trainer(cfg, out, progress=False).run()
    records = jsonl(out / "metrics.jsonl")
    return {"out": out, "wandb_dir": tmp / "wandb_dir", "summary": summary,
            "losses": {r["iteration"]: r["loss"] for r in records if "loss" in r},
            "AP": {r["iteration"]: r["eval"]["AP"] for r in records if "eval" in r}}


@pytest.mark.slow
def test_csv_logger_writes_losses_and_evaluations(tracked_run):
    with open(tracked_run["out"] / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    loss = {int(r["iteration"]): float(r["value"]) for r in rows if r["name"] == "train/loss"}
    ap = {int(r["iteration"]): float(r["value"]) for r in rows if r["name"] == "eval/AP"}
    assert loss == pytest.approx(tracked_run["losses"]) and list(loss) == [1, 2, 3]
    assert ap == pytest.approx(tracked_run["AP"]) and list(ap) == [2, 3]
    assert {"train/lr", "train/loss_cls", "eval/AP50", "eval/per_class_AP.star (5)"} <= {r["name"] for r in rows}


@pytest.mark.slow
def test_mlflow_logger_writes_params_metrics_and_the_final_checkpoint(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tracked_run["out"]
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("retinanet").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["train.max_iter"] == "3" and params["model.num_classes"] == "5"
    assert params["train.loggers"] == "['csv', 'mlflow', 'wandb']"
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    ap = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/AP")}
    assert loss == pytest.approx(tracked_run["losses"]) and sorted(loss) == [1, 2, 3]
    assert ap == pytest.approx(tracked_run["AP"]) and sorted(ap) == [2, 3]
    assert "eval/per_class_AP.star _5_" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["model_final.pt"]
    stored = Path(client.download_artifacts(run.info.run_id, "model_final.pt", str(out.parent / "dl")))
    assert stored.read_bytes() == (out / "model_final.pt").read_bytes()


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 32 KiB blocks of
    records with a 7-byte header: crc, length, type; types 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, records, part = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


@pytest.mark.slow
def test_wandb_logger_writes_an_offline_run(tracked_run):
    import base64
    import hashlib

    [path] = glob.glob(str(tracked_run["wandb_dir"] / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(Path(path))
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert run.project == "retinanet" and run.display_name == "run"
    assert config["train"]["max_iter"] == 3 and config["train"]["loggers"] == ["csv", "mlflow", "wandb"]
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    loss = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    ap = {h["_step"]: h["eval/AP"] for h in history if "eval/AP" in h}
    assert loss == pytest.approx(tracked_run["losses"]) and sorted(loss) == [1, 2, 3]
    assert ap == pytest.approx(tracked_run["AP"]) and sorted(ap) == [2, 3]
    [artifact] = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    [entry] = artifact.manifest.contents
    md5 = base64.b64encode(hashlib.md5((tracked_run["out"] / "model_final.pt").read_bytes()).digest()).decode()
    assert artifact.type == "model" and entry.path == "model_final.pt" and entry.digest == md5


@pytest.mark.slow
def test_csv_logger_on_resume_drops_the_rows_after_the_checkpoint(shapes_data, tmp_path, monkeypatch):
    from retinanet.engine.callbacks import StopOnSignal

    out = tmp_path / "run"
    cfg = small_config(shapes_data, out, train__max_iter=3, train__loggers="[csv]", data__val_annotations="''")
    monkeypatch.setattr(StopOnSignal, "requested", lambda self: True)  # as Ctrl-C at iteration 1
    assert retinanet.Trainer(cfg, out, progress=False).run()["status"] == "interrupted"
    monkeypatch.undo()
    with open(out / "metrics.csv", "a") as f:  # as a run killed after logging iteration 2 leaves it
        f.write("2,train/loss,99.0\n")
    assert retinanet.Trainer(cfg, out, resume=True, progress=False).run()["status"] == "finished"
    with open(out / "metrics.csv", newline="") as f:
        loss = [(int(r["iteration"]), float(r["value"])) for r in csv.DictReader(f) if r["name"] == "train/loss"]
    logged = {r["iteration"]: r["loss"] for r in jsonl(out / "metrics.jsonl") if "loss" in r}
    assert [i for i, _ in loss] == [1, 2, 3] and dict(loss) == pytest.approx(logged)


@pytest.mark.slow
def test_mlflow_logger_uses_the_tracking_uri_the_user_set(shapes_data, tmp_path, monkeypatch):
    """Also after an earlier run of this process (tracked_run) set its store in mlflow."""
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "team_store").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "shapes")
    out = tmp_path / "run"
    cfg = small_config(shapes_data, out, train__max_iter=1, train__loggers="[mlflow]", data__val_annotations="''")
    assert retinanet.Trainer(cfg, out, progress=False).run()["status"] == "finished"
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("shapes").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]
    assert not (out / "mlruns").exists()
