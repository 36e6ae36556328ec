"""The training loop's callbacks: the public `Callback` events, the experiment loggers
(`train.loggers`: TensorBoard, CSV, MLflow, Weights & Biases) built on them, and the loop's
own periodic actions (time budget, metrics lines, checkpoints, evaluation, stop on a signal)."""

from __future__ import annotations

import csv
import importlib
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError, config_to_dict
from . import distributed

if TYPE_CHECKING:
    from .train import Trainer

log = logging.getLogger(__name__)


class Callback:
    """Code run by `Trainer` at the events of a run; override the ones you need.

    Every process of a distributed run calls them (write files on `trainer.dist.is_main`).
    `trainer.iteration` is the number of iterations done; `trainer.request_stop(reason)` ends
    the run after the current iteration as a normal end does (last.pt, model_final.pt, final
    evaluation), with `status: "stopped"` and the reason in the summary.
    """

    def on_train_start(self, trainer: "Trainer") -> None:
        """Before the first iteration; the data, model and output folder are ready."""

    def on_iter_end(self, trainer: "Trainer", losses: dict | None) -> None:
        """After each iteration: its loss values and `lr` on this process (None: step skipped)."""

    def on_eval_end(self, trainer: "Trainer", metrics: dict) -> None:
        """After each evaluation on the validation set (periodic and final): its COCO metrics."""

    def on_checkpoint(self, trainer: "Trainer", path: Path) -> None:
        """After a checkpoint (`last.pt`, `best.pt`, `model_final.pt`) was written to `path`."""

    def on_train_end(self, trainer: "Trainer", summary: dict) -> None:
        """After the run ended without an error: the summary `Trainer.run()` returns."""

    def close(self) -> None:
        """Release resources; called last, also when the run fails."""


def load_callbacks(names: list[str]) -> list[Callback]:
    """Instances of `train.callbacks` ("module:Class", each built with no arguments), imported
    from the Python path or else the current folder (which the `retinanet` script's path lacks)."""
    out, folder = [], os.getcwd()
    for name in names:
        module_name, _, attr = name.partition(":")
        added = folder not in sys.path
        if added:
            sys.path.append(folder)
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"train.callbacks: cannot import {name!r} ({type(err).__name__}: {err})") from None
        finally:
            if added and folder in sys.path:
                sys.path.remove(folder)
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            raise ConfigError(f"train.callbacks: {name} is not a retinanet.Callback class")
        out.append(cls())
    return out


def _require(package: str, logger: str):
    """Import the package a logger needs, or a ConfigError that says how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"train.loggers: {logger} needs the {package} package: pip install "
                          f"'retinanet[{logger}]' (or pip install {package}), or leave {logger} out") from None


def build_loggers(names: list[str]) -> list[Callback]:
    """The loggers of `train.loggers`; each imports its package here, before any data is read.
    TensorBoard, on by default, is left out with a warning where it is not installed."""
    kinds = {"tensorboard": TensorBoardLogger, "csv": CSVLogger, "mlflow": MLflowLogger, "wandb": WandbLogger}
    loggers = []
    for name in names:
        try:
            loggers.append(kinds[name]())
        except ConfigError as err:
            if name != "tensorboard":
                raise
            log.warning("%s; no event files", err)
    return loggers


def flatten(tree: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists stay values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _Logger(Callback):
    """A logger: on the main process, the training values every `train.log_period` iterations
    (averaged over processes, as in metrics.jsonl) and each evaluation's numbers."""

    def on_iter_end(self, trainer, losses):
        record = trainer.logged
        if record is not None and trainer.dist.is_main:
            self.log_values({f"train/{k}": v for k, v in record.items() if k != "iteration"}, trainer.iteration)

    def on_eval_end(self, trainer, metrics):
        if trainer.dist.is_main:
            self.log_values({f"eval/{k}": float(v) for k, v in flatten(metrics).items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}, trainer.iteration)

    def log_values(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError


class TensorBoardLogger(_Logger):
    """Event files in `<output_dir>/tensorboard`."""

    def __init__(self):
        _require("tensorboard", "tensorboard")
        self.writer = None

    def on_train_start(self, trainer):
        if trainer.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(trainer.output_dir / "tensorboard"))

    def log_values(self, values, step):
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class CSVLogger(_Logger):
    """`<output_dir>/metrics.csv`, one `iteration,name,value` row per value (a resumed run
    first drops the rows after its checkpoint)."""

    FIELDS = ["iteration", "name", "value"]

    def __init__(self):
        self.file = None

    def on_train_start(self, trainer):
        if not trainer.dist.is_main:
            return
        path = trainer.output_dir / "metrics.csv"
        kept = []
        if path.is_file():
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if row.get("iteration", "").isdigit()
                        and int(row["iteration"]) <= trainer.iteration]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, self.FIELDS, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(kept)

    def log_values(self, values, step):
        if self.file is not None:
            self.writer.writerows({"iteration": step, "name": k, "value": v} for k, v in values.items())
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


class MLflowLogger(_Logger):
    """An MLflow run: the config as params, values as metrics, model_final.pt as an artefact.
    The store is `MLFLOW_TRACKING_URI` where set, else a file store in `<output_dir>/mlruns`
    (`mlflow ui --backend-store-uri <output_dir>/mlruns`); the experiment is
    `MLFLOW_EXPERIMENT_NAME` or "retinanet"."""

    def __init__(self):
        self.mlflow = _require("mlflow", "mlflow")
        self.run = None

    def on_train_start(self, trainer):
        if not trainer.dist.is_main:
            return
        mlflow = self.mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store for explicit opt-in: a local store needs no server or database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (trainer.output_dir / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)  # also replaces the store an earlier run of this process set
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "retinanet"))
        self.run = mlflow.start_run(run_name=trainer.output_dir.name)
        params = {k: str(v)[:6000] for k, v in flatten(config_to_dict(trainer.cfg)).items()}
        mlflow.log_params(params)

    def log_values(self, values, step):
        if self.run is not None:
            # MLflow refuses other characters in names (a class name in eval/per_class_AP...)
            self.mlflow.log_metrics({re.sub(r"[^\w\-. /:]", "_", k): v for k, v in values.items()}, step=step)

    def on_train_end(self, trainer, summary):
        final = trainer.output_dir / "model_final.pt"
        if self.run is not None:
            if summary["status"] != "interrupted" and final.is_file():
                self.mlflow.log_artifact(str(final))
            self.mlflow.end_run("FINISHED" if summary["status"] != "interrupted" else "KILLED")
            self.run = None

    def close(self):
        if self.run is not None:  # the run failed
            self.mlflow.end_run("FAILED")
            self.run = None


class WandbLogger(_Logger):
    """A Weights & Biases run (project `WANDB_PROJECT` or "retinanet"; files under `WANDB_DIR`,
    else the output folder; `WANDB_MODE=offline` keeps it local): the config, values, and
    model_final.pt as a model artefact."""

    def __init__(self):
        self.wandb = _require("wandb", "wandb")
        self.run = None

    def on_train_start(self, trainer):
        if trainer.dist.is_main:
            self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "retinanet"),
                                       name=trainer.output_dir.name, config=config_to_dict(trainer.cfg),
                                       dir=os.environ.get("WANDB_DIR") or str(trainer.output_dir))

    def log_values(self, values, step):
        if self.run is not None:
            self.run.log(values, step=step)

    def on_train_end(self, trainer, summary):
        final = trainer.output_dir / "model_final.pt"
        if self.run is not None:
            if summary["status"] != "interrupted" and final.is_file():
                artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model")
                artifact.add_file(str(final))
                self.run.log_artifact(artifact)
            self.run.finish(exit_code=0)
            self.run = None

    def close(self):
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None


# ------------------------------------------------------------------------------ the loop's own
# The loop's own periodic actions are callbacks (retinanet.Callback) like the user's and the loggers'.
class TimeBudget(Callback):
    """Shortens max_iter so that training ends within `max_minutes` of wall clock, from the
    average iteration time so far (re-fitted every 25 iterations; never above the config's)."""

    def __init__(self, minutes: float, start_iter: int):
        self.minutes, self.start_iter, self.start = minutes, start_iter, time.perf_counter()

    def on_iter_end(self, trainer, losses):
        done = trainer.iteration - self.start_iter
        if done % 25:
            return
        elapsed = time.perf_counter() - self.start
        remaining = self.minutes * 60 - elapsed
        fitted = trainer.iteration + max(0, int(remaining / max(elapsed / done, 1e-6)))
        configured = trainer.configured_max_iter
        fitted = min(distributed.all_gather_objects(fitted)[0], configured)
        if fitted != trainer.schedule.max_iter:
            if trainer.schedule.max_iter == configured:
                log.info("time budget %.1f min: max_iter %d -> %d", self.minutes, configured, fitted)
            trainer.schedule.max_iter = fitted


class MetricsLogger(Callback):
    """Loss lines in `metrics.jsonl` and the console (a progress bar on a TTY); the record is
    `trainer.logged` for the loggers that follow (None at iterations that log nothing)."""

    def __init__(self, trainer: "Trainer", period: int):
        self.period = period
        self.timer = _Timer()
        self.bar = None
        if trainer.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.schedule.max_iter, initial=trainer.iteration, dynamic_ncols=True,
                            desc="train")

    def on_iter_end(self, trainer, losses):
        self.timer.tick()
        trainer.logged = None
        if self.bar is not None:
            self.bar.total = trainer.schedule.max_iter
            self.bar.update(1)
            if losses:
                self.bar.set_postfix(loss=f"{losses['loss']:.3f}", refresh=False)
        if losses is None or not (trainer.iteration % self.period == 0 or trainer.iteration == 1):
            return
        values = distributed.mean_over_processes(losses)
        if not trainer.dist.is_main:
            return
        per_iter = self.timer.recent()
        record = {"iteration": trainer.iteration, **{k: round(v, 6) for k, v in values.items()},
                  "seconds_per_iter": round(per_iter, 4),
                  "images_per_second": round(trainer.cfg.train.batch_size / max(per_iter, 1e-9), 2),
                  "eta_seconds": round(per_iter * (trainer.schedule.max_iter - trainer.iteration))}
        trainer.append_jsonl(record)
        trainer.logged = record
        if trainer.progress and self.bar is None:
            print(f"iter {trainer.iteration}/{trainer.schedule.max_iter} loss {values['loss']:.4f} "
                  f"(cls {values['loss_cls']:.4f} box {values['loss_box']:.4f}) lr {values.get('lr', 0):.2e} "
                  f"{per_iter:.2f}s/it eta {record['eta_seconds'] // 60:.0f} min", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class PeriodicCheckpoint(Callback):
    def __init__(self, period: int):
        self.period = period

    def on_iter_end(self, trainer, losses):
        if trainer.iteration % self.period == 0:
            trainer.save_last()


class PeriodicEval(Callback):
    def __init__(self, period: int):
        self.period = period

    def on_iter_end(self, trainer, losses):
        if trainer.iteration % self.period == 0 and trainer.iteration < trainer.schedule.max_iter:
            trainer.evaluate()


class StopOnSignal(Callback):
    """Turns SIGINT/SIGTERM, and `trainer.request_stop`, into a stop between iterations, agreed
    by every process (a signal wins over a request)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        self.signal = signum

    def requested(self) -> bool:
        return distributed.any_over_processes(self.signal is not None)

    def on_iter_end(self, trainer, losses):
        if self.requested():
            trainer.stop_signal = self.signal or signal.SIGINT
        elif distributed.any_over_processes(trainer.stop_reason is not None):
            reasons = distributed.all_gather_objects(trainer.stop_reason)
            trainer.stop_reason = next(r for r in reasons if r is not None)

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class _Timer:
    """Seconds per iteration over the last few iterations."""

    def __init__(self, window: int = 20):
        self.times: list[float] = [time.perf_counter()]
        self.window = window

    def tick(self) -> None:
        self.times.append(time.perf_counter())
        self.times = self.times[-self.window - 1 :]

    def recent(self) -> float:
        if len(self.times) < 2:
            return 0.0
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)
