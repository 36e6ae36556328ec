"""The training loop (`Trainer`): data, model and run folder set up, steps with AMP and DDP,
periodic evaluation, atomic checkpoints and exact resume. The recipe (schedule, optimizer,
EMA) is `optimization`; the periodic actions and loggers are `callbacks`."""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointError, capture_rng, read_checkpoint, restore_rng, write_checkpoint
from ..config import Config, ConfigError, config_to_dict, save_config
from ..data.dataset import DatasetError, collate
from ..data.formats import has_split, open_dataset
from ..data.tiles import as_training_items
from ..data.sampler import TrainBatchSampler
from ..model.detector import RetinaNet
from ..outputs import check_writable, remove_stale_temporaries, write_text
from . import distributed
from .analyze import coverage_warning
from .callbacks import (Callback, MetricsLogger, PeriodicCheckpoint, PeriodicEval, StopOnSignal, TimeBudget,
                        build_loggers, load_callbacks)
from .evaluate import box_count, drop_unresizable, evaluate
from .finetune import (StartWeights, apply_freeze, architecture_differences, class_table, match_classes,
                       read_start_weights, start_state)
from .optimization import ModelEMA, build_optimizer, describe_scaling, lr_factor, scaled_schedule
from .precision import autocast, resolve_amp
from .tiling import check_tile_config

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


def compile_for_training(model: RetinaNet) -> None:
    """torch.compile the backbone, FPN and head in place (`Module.compile`: parameter names, and
    so checkpoints, stay as they are) and the matching + losses, which read no value back from
    the device and so compile as one graph: on a GPU, fused kernels and no host waits between
    network and loss (figures in benchmarks/RESULTS.md)."""
    for part in (model.backbone, model.fpn, model.head):
        part.compile()
    model.local_box_training = False  # its count of foreground locations would break the graph
    model.forward_training = torch.compile(model.forward_training)


# ------------------------------------------------------------------------------ pretrained
def load_pretrained_backbone(model: RetinaNet, source: str) -> None:
    """ImageNet weights into the backbone, from a local file or a torchvision weight name."""
    path = Path(source)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    else:
        import torchvision

        try:
            weights = torchvision.models.get_weight(source)
        except (ValueError, AttributeError):
            raise TrainingError(f"pretrained_backbone {source!r} is neither a file nor a torchvision weight name "
                                "(e.g. ResNet50_Weights.IMAGENET1K_V1)") from None
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as err:
            raise TrainingError(
                f"could not download {source} ({type(err).__name__}: {err}). This machine seems offline: "
                f"download it where there is internet ({weights.url}), copy the file here and pass "
                f"train.pretrained_backbone=/path/to/{weights.url.rsplit('/', 1)[-1]}"
            ) from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise TrainingError(f"{source}: does not fit a ResNet-{model.config.backbone.depth}: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")


# ------------------------------------------------------------------------------ output folder
RUN_FILES = ("config.yaml", "last.pt", "best.pt", "model_final.pt", "metrics.jsonl", "metrics.csv",
             "skipped_images.txt")


def check_output_dir(output_dir: Path, cfg: Config, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, to mix a new run into a folder that holds one,
    and to resume from a missing checkpoint or one of another architecture."""
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"{output_dir}: the output folder is a file")
    last = output_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise TrainingError(f"--resume: no checkpoint at {last} (nothing was written)")
        stored = read_checkpoint(last).model_config
        differences = model_config_differences(config_to_dict(stored), config_to_dict(cfg.model))
        if differences:
            raise TrainingError(f"--resume: the config differs from {last} in " + "; ".join(differences[:5])
                                + " (nothing was written; resume with the run's own config.yaml)")
        return
    existing = [name for name in RUN_FILES if (output_dir / name).exists()]
    if existing and not overwrite:
        raise TrainingError(f"{output_dir} holds a training run already ({', '.join(existing)}): pass --resume "
                            f"to continue it, --overwrite to replace it, or choose another --output-dir")


def resolve_resume(output_dir: Path, resume: bool | str, overwrite: bool) -> tuple[bool, bool]:
    """`(resume, overwrite)` to run with. `resume="auto"` continues from `output_dir/last.pt`
    when there is one, and otherwise starts the run, replacing the files of an attempt that
    wrote no checkpoint. A worker that torchrun restarted after a failure (`--max-restarts`)
    resumes so unless it was given `resume=True`: its first attempt began this run (and did any
    `overwrite` asked for), so starting again would throw that attempt's work away."""
    restarted = distributed.restart_count() > 0
    if resume is True or not (resume == "auto" or restarted):
        return bool(resume), overwrite
    found = (output_dir / "last.pt").is_file()
    why = f"torchrun restart {distributed.restart_count()}" if restarted else "--resume auto"
    log.info("%s: %s", why, f"resuming from {output_dir / 'last.pt'}" if found else
             f"no checkpoint in {output_dir} yet, starting the run")
    return found, not found


def model_config_differences(stored: dict, wanted: dict, where: str = "model") -> list[str]:
    """`key: stored -> wanted` for every model setting that differs. Class names and
    category ids left empty in `wanted` are filled from the data and do not count."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += model_config_differences(a, b, f"{where}.{key}")
        elif a != b and not (key in ("class_names", "category_ids") and not b):
            out.append(f"{where}.{key}: {a!r} in the checkpoint, {b!r} in the config")
    return out


def truncate_metrics(path: Path, iteration: int) -> int:
    """Keep the records of `metrics.jsonl` up to `iteration` (the resumed checkpoint's) and drop
    the later ones, which the resumed run logs again, and a line torn by a kill; the file is
    rewritten atomically, so plots and loggers see one history. Returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("iteration"), int) and record["iteration"] <= iteration:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def check_boxes(images, items, data) -> None:
    """Refuse a training set without a box to learn from (crowd regions aside): none in its
    `images`, or none in the `items` its tiles make of them (`data.tile`)."""
    if not any(map(box_count, images.records)):
        raise TrainingError(f"{data.train_annotations}: the training set has no boxes in its {len(images)} image(s) "
                            "(crowd regions aside): a detector cannot learn from it; check that its annotations "
                            "are read (retinanet check-data --config ...)")
    if not any(map(box_count, items.records)):
        raise TrainingError(f"{data.train_annotations}: no tile of data.tile.size={data.tile.size} keeps a box "
                            f"(data.tile.min_visible={data.tile.min_visible:g} of a box must be inside a tile): "
                            "use larger tiles")


def clear_run_files(output_dir: Path) -> None:
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / "tensorboard", ignore_errors=True)


# ------------------------------------------------------------------------------ the trainer
class Trainer:
    """One training run. `run()` returns a summary dict; files go to `output_dir`:
    `config.yaml`, `last.pt` (resumable), `best.pt` (best AP), `model_final.pt`,
    `metrics.jsonl`, the loggers' files (`train.loggers`), and `eval/` outputs. `callbacks`
    (`retinanet.Callback` instances) run at the run's events, before those of `train.callbacks`.

    Construction only stores its arguments (the caller's config is copied, never changed);
    `setup()` has the side effects: the process group, seeds, thread count, reading the
    data and building the model. `run()` calls it when needed.
    """

    def __init__(self, cfg: Config, output_dir: str | Path | None = None, resume: bool | str = False,
                 device: str = "auto", progress: bool = True, overwrite: bool = False,
                 start: StartWeights | None = None, trust_weights: bool = False,
                 callbacks: list[Callback] | None = None):
        """`resume`: True continues from `output_dir/last.pt` exactly, "auto" when there is one
        (`resolve_resume`, which a worker restarted by torchrun follows too); `start`: the
        detector of `cfg.train.weights` when the caller has read it already; `trust_weights`: a
        peer's weight file may be fully unpickled (code in it may run)."""
        self.cfg = copy.deepcopy(cfg)
        self.output_dir = Path(output_dir or cfg.output_dir)
        self.resume, self.device, self.overwrite = resume, device, overwrite
        self.progress = progress
        self.ready = False
        self.iteration = 0
        self.best_ap = -1.0
        self.skipped_images: list[str] = []
        self.nonfinite_skipped = 0
        self.stop_signal: int | None = None
        self.stop_reason: str | None = None
        self.user_callbacks = list(callbacks or [])
        self.events: list[Callback] = []  # every callback of the run, in calling order
        self.logged: dict | None = None  # the metrics.jsonl record of this iteration, if any
        self.start, self.trust_weights = start, trust_weights
        self.class_rows: list[int | None] = []  # the start's class for each of ours (fine-tuning)

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        if self.ready:
            return self
        self.resume, self.overwrite = resolve_resume(self.output_dir, self.resume, self.overwrite)
        check_output_dir(self.output_dir, self.cfg, self.resume, self.overwrite)
        check_writable(self.output_dir)
        self.dist = distributed.setup(self.device)
        self.progress = self.progress and self.dist.is_main
        self._seed_and_check()
        self._read_start()
        self._open_data()
        self._build_model()
        self.ready = True
        return self

    def _seed_and_check(self) -> None:
        """Threads, seeds and the checks that need the number of processes."""
        t = self.cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        random.seed(t.seed + self.dist.rank)
        np.random.seed(t.seed + self.dist.rank)
        self.size_generator = torch.Generator().manual_seed(t.seed * 1009 + self.dist.rank)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.cfg.model.backbone.norm == "bn" and t.batch_size // self.dist.world_size < 2:
            raise TrainingError("model.backbone.norm=bn (trainable BatchNorm) needs at least 2 images per process, "
                                f"got train.batch_size={t.batch_size} over {self.dist.world_size} process(es); "
                                "use norm frozen_bn or gn, or a larger batch")

    def _read_start(self) -> None:
        """The detector to start from (`train.weights`; not on resume, where the run's own
        checkpoint is read), checked against the config's architecture before any data is read."""
        weights = self.cfg.train.weights
        if not weights or self.resume:
            self.start = None
            return
        if self.start is None or self.start.name != weights:
            if not self.dist.is_main:  # rank 0 downloads a zoo file first; the others read it then
                distributed.barrier()
            self.start = read_start_weights(weights, self.trust_weights)
            if self.dist.is_main:
                distributed.barrier()
        differences = architecture_differences(self.start.model_config, self.cfg.model)
        if differences:
            raise ConfigError(f"the config's model does not fit train.weights {weights}: " + "; ".join(differences)
                              + " (set these in the config, or leave its model section out to take the "
                              "weights' own)")

    def _open_data(self) -> None:
        """The training and validation sets; fills the config's class names and ids from them."""
        cfg = self.cfg
        if not has_split(cfg.data, "train"):
            raise TrainingError("no training data: set data.train_annotations (and data.train_images)")
        tile_warning = check_tile_config(cfg.data.tile, cfg.model)
        images = open_dataset(cfg.data, "train")
        self.train_set = as_training_items(images, cfg.data.tile, cfg.data.value_range)
        if len(self.train_set) == 0:
            raise TrainingError(f"{cfg.data.train_annotations}: the training set has no images")
        check_boxes(images, self.train_set, cfg.data)
        if tile_warning and self.dist.is_main:
            log.warning("data.tile.size=%d: %s", cfg.data.tile.size, tile_warning)
        if self.start is not None:
            self._classes_from_data()
        elif self.train_set.num_classes != cfg.model.num_classes:
            raise TrainingError(f"{cfg.data.train_annotations} has {self.train_set.num_classes} categories but "
                                f"model.num_classes={cfg.model.num_classes}; set model.num_classes="
                                f"{self.train_set.num_classes}")
        if not cfg.model.class_names:
            cfg.model.class_names = list(self.train_set.class_names)
        if not cfg.model.category_ids:
            cfg.model.category_ids = list(self.train_set.category_ids)
        if self.dist.is_main:
            warning = coverage_warning(cfg, self.train_set)
            if warning:
                log.warning(warning)
        self.val_set = (open_dataset(cfg.data, "val", self.train_set.class_names) if has_split(cfg.data, "val")
                        else None)
        if self.val_set is not None and len(self.val_set) == 0:
            raise DatasetError(f"{cfg.data.val_annotations}: the validation set has no images")
        if self.val_set is not None and not any(map(box_count, self.val_set.records)):
            raise DatasetError(f"{cfg.data.val_annotations}: the validation set has no boxes (crowd regions aside): "
                               "there would be nothing to evaluate; annotate it, or leave data.val_* out")

    def _classes_from_data(self) -> None:
        """A fine-tuning run has the data's classes; each keeps the start's rows of its namesake."""
        model = self.cfg.model
        model.num_classes = self.train_set.num_classes
        model.class_names = list(self.train_set.class_names)
        model.category_ids = list(self.train_set.category_ids)
        source_names = self.start.class_names
        self.class_rows = match_classes(model.class_names, source_names, self.cfg.train.class_map)
        if self.dist.is_main:
            log.info("starting from %s (%s)\n%s", self.start.name, self.start.source,
                     class_table(model.class_names, self.class_rows, source_names))

    def _build_model(self) -> None:
        """Model, schedule, optimizer, precision, EMA, compilation and the DDP wrapper."""
        t = self.cfg.train
        self.model = RetinaNet.from_config(self.cfg.model)
        if self.start is not None:
            state = start_state(self.model.state_dict(), self.start, self.class_rows,
                                self.model.anchor_generator.num_anchors)
            self.model.load_state_dict(state)
            if t.pretrained_backbone and self.dist.is_main:
                log.info("train.pretrained_backbone is not loaded: train.weights gives every weight")
        elif t.pretrained_backbone:
            load_pretrained_backbone(self.model, t.pretrained_backbone)
        apply_freeze(self.model, t.freeze)
        self.model.to(self.dist.device)
        if t.channels_last:
            self.model.to_channels_last()
        self.schedule = scaled_schedule(t)
        self.configured_max_iter = self.schedule.max_iter
        scaling = describe_scaling(t, self.schedule)
        if scaling and self.dist.is_main:
            log.info(scaling)
        self.optimizer = build_optimizer(self.model, t, self.schedule.lr)
        self.amp, why = resolve_amp(t.amp, self.dist.device)
        if self.dist.is_main:
            log.info("precision: %s (train.amp=%s: %s)", {"none": "fp32"}.get(self.amp, self.amp), t.amp, why)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16" and self.dist.device.type == "cuda")
        self.ema = ModelEMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        if t.compile:
            compile_for_training(self.model)
            if self.dist.is_main:
                log.info("train.compile: networks, matching and losses go through torch.compile; "
                         "the first iterations wait for the compiler")
        self.ddp_model = (nn.parallel.DistributedDataParallel(self.model, device_ids=[self.dist.local_rank]
                                                              if self.dist.device.type == "cuda" else None)
                          if self.dist.world_size > 1 else self.model)

    @property
    def final_model(self) -> RetinaNet:
        """The model to evaluate and export: the EMA of the weights when EMA is on."""
        return self.ema.module if self.ema else self.model

    # ------------------------------------------------------------------ state
    def training_state(self) -> dict:
        """Everything besides the weights that `--resume` needs. Collective under DDP: every
        process's RNG states are gathered, so that each gets its own back on resume."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "max_iter": self.schedule.max_iter,
            "best_ap": self.best_ap,
            "rng_per_rank": distributed.all_gather_objects(
                {**capture_rng(), "sizes": self.size_generator.get_state()}),
        }
        if self.ema:
            state["train_model"] = self.model.state_dict()
            state["ema_updates"] = self.ema.updates
        return state

    def save_last(self) -> None:
        """Write `last.pt` (called on every process: it gathers RNG states)."""
        training = self.training_state()
        if self.dist.is_main:
            write_checkpoint(self.output_dir / "last.pt", self.cfg.model, self.final_model.state_dict(),
                             run_config=config_to_dict(self.cfg), training=training)
        self._fire("on_checkpoint", self.output_dir / "last.pt")

    def save_weights(self, name: str) -> None:
        if self.dist.is_main:
            write_checkpoint(self.output_dir / name, self.cfg.model, self.final_model.state_dict(),
                             run_config=config_to_dict(self.cfg))
        self._fire("on_checkpoint", self.output_dir / name)

    def request_stop(self, reason: str) -> None:
        """End the run after the current iteration as at its normal end (last.pt, model_final.pt,
        final evaluation); the summary has `status: "stopped"` and `stop_reason`."""
        self.stop_reason = reason

    def _fire(self, event: str, *args) -> None:
        for callback in self.events:
            getattr(callback, event)(self, *args)

    def load(self, path: Path) -> None:
        checkpoint = read_checkpoint(path, map_location="cpu")  # RNG states must stay CPU tensors
        training = checkpoint.training
        if not training or "optimizer" not in training:
            raise CheckpointError(f"{path}: holds weights only, not a training state to resume")
        self.model.load_state_dict(training.get("train_model", checkpoint.weights))
        if self.ema:
            self.ema.module.load_state_dict(checkpoint.weights)
            self.ema.updates = training.get("ema_updates", 0)
        self.optimizer.load_state_dict(training["optimizer"])
        self.scaler.load_state_dict(training["scaler"])
        self.iteration = training["iteration"]
        if self.cfg.train.max_minutes > 0:  # a time-budgeted run keeps the length it had fitted
            self.schedule.max_iter = training["max_iter"]
        self.best_ap = training["best_ap"]
        states = training.get("rng_per_rank") or [training["rng"]]
        if len(states) != self.dist.world_size:
            log.warning("%s was written by %d process(es), resuming with %d: random streams will differ",
                        path, len(states), self.dist.world_size)
        rng = states[self.dist.rank % len(states)]
        restore_rng(rng)
        if "sizes" in rng:
            self.size_generator.set_state(rng["sizes"])
        log.info("resumed from %s at iteration %d", path, self.iteration)

    def _tidy_run_folder(self) -> None:
        """Remove the temporaries a run killed mid-write left (`.last.pt.*.tmp`, ...) and, on
        resume, the metrics logged after the checkpoint it resumes from."""
        for path in remove_stale_temporaries(self.output_dir, RUN_FILES):
            log.info("removed %s, left by a run stopped while writing it", path)
        if self.resume:
            dropped = truncate_metrics(self.output_dir / "metrics.jsonl", self.iteration)
            if dropped:
                log.info("metrics.jsonl: %d record(s) after iteration %d dropped; the resumed run logs them again",
                         dropped, self.iteration)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        # imported before any data is read: a missing package or class fails at once
        extra = build_loggers(self.cfg.train.loggers) + self.user_callbacks + load_callbacks(self.cfg.train.callbacks)
        self.setup()
        if self.resume:
            self.load(self.output_dir / "last.pt")
        elif self.overwrite and self.dist.is_main:
            clear_run_files(self.output_dir)
        distributed.barrier()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            self._tidy_run_folder()
            save_config(self.cfg, self.output_dir / "config.yaml")
        self.events = self._hooks(extra)
        try:
            self._fire("on_train_start")
            summary = self._train()
            self._fire("on_train_end", summary)
        finally:
            for callback in self.events:
                callback.close()
        if summary["status"] != "interrupted":
            distributed.barrier()
        return summary

    def _train(self) -> dict:
        """The loop, then the final checkpoints and evaluation; the run's summary."""
        status = self._loop()
        self.save_last()
        if status == "interrupted":
            if self.dist.is_main:
                print(f"interrupted at iteration {self.iteration}: saved {self.output_dir / 'last.pt'}; "
                      "continue with --resume", file=sys.stderr)
            return {"status": status, "iteration": self.iteration, "signal": self.stop_signal}
        if status == "stopped" and self.dist.is_main:
            print(f"stopped at iteration {self.iteration}: {self.stop_reason}", file=sys.stderr)
        self.save_weights("model_final.pt")
        metrics = self.evaluate() if self.val_set is not None else None
        summary = {"status": status, "iteration": self.iteration, "metrics": metrics,
                   "skipped_images": self.skipped_images, "nonfinite_skipped": self.nonfinite_skipped}
        if status == "stopped":
            summary["stop_reason"] = self.stop_reason
        return summary

    def _hooks(self, extra: list[Callback]) -> list[Callback]:
        """The loop's actions, then `extra` (loggers and the user's callbacks), and the stop check
        last (it sees a stop requested by any of them)."""
        t = self.cfg.train
        hooks: list[Callback] = []
        if t.max_minutes > 0:
            hooks.append(TimeBudget(t.max_minutes, self.iteration))
        hooks += [MetricsLogger(self, t.log_period), PeriodicCheckpoint(t.checkpoint_period)]
        if t.eval_period and self.val_set is not None:
            hooks.append(PeriodicEval(t.eval_period))
        self.signals = StopOnSignal()  # its handlers are on while the loop runs
        return hooks + extra + [self.signals]

    def _loop(self) -> str:
        """Iterate until max_iter ("finished"), a stop signal ("interrupted") or a callback's
        `request_stop` ("stopped")."""
        batches = iter(self._loader())
        try:
            while self.iteration < self.schedule.max_iter:
                images, targets, skipped = self._resizable(*next(batches))
                losses = self.step(images, targets) if self._usable_batch(images, skipped) else None
                self.iteration += 1
                self._fire("on_iter_end", losses)
                if self.stop_signal is not None:
                    return "interrupted"
                if self.stop_reason is not None:
                    return "stopped"
        finally:
            self.signals.close()
        return "finished"

    def _resizable(self, images: list, targets: list[dict], skipped: list[str]) -> tuple[list, list, list]:
        """The batch less the images too elongated for the model's input (`drop_unresizable`),
        which join the skipped ones."""
        pre = self.model.preprocessor
        images, targets, dropped = drop_unresizable(pre, images, targets, min(pre.train_min_sizes))
        return images, targets, skipped + dropped

    def _usable_batch(self, images: list, skipped: list[str]) -> bool:
        """Record unreadable images; False (on every process alike) when some process got
        too few readable images (none; or one, for trainable BatchNorm), so that all skip
        the step together."""
        needed = 2 if self.cfg.model.backbone.norm == "bn" else 1
        if distributed.is_distributed():
            gathered = distributed.all_gather_objects((len(images) >= needed, skipped))
            empty = not all(ok for ok, _ in gathered)
            skipped = [s for _, part in gathered for s in part]
        else:
            empty = len(images) < needed
        if skipped:
            self.skipped_images.extend(skipped)
            if self.dist.is_main:
                with open(self.output_dir / "skipped_images.txt", "a") as f:
                    f.write("".join(s + "\n" for s in skipped))
        if empty:
            log.warning("iteration %d: too few readable images in the batch; step skipped", self.iteration + 1)
        return not empty

    def step(self, images: list[torch.Tensor], targets: list[dict]) -> dict | None:
        """One optimisation step; returns the logged loss values (None if skipped)."""
        t = self.cfg.train
        device = self.dist.device
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr * lr_factor(self.iteration, self.schedule, t.schedule, t.gamma,
                                                       t.warmup_factor)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in tg.items()}
                   for tg in targets]
        reducer = distributed.sum_over_processes if distributed.is_distributed() else None
        with autocast(self.amp, device.type):
            losses = self.ddp_model(images, targets, generator=self.size_generator, reduce_foreground=reducer)
        loss = sum(losses.values())
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["loss"] = float(loss.detach())
        if not all(math.isfinite(v) for v in distributed.mean_over_processes(values).values()):
            return self._nonfinite(values)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if t.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema:
            self.ema.update(self.model)
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        stats = self.model.assignment_stats
        if stats:
            values["positives_per_box"] = float(stats["foreground"]) / max(1.0, float(stats["boxes"]))
        return values

    def evaluate(self) -> dict | None:
        """COCO metrics of the final model on the validation set; keeps `best.pt`."""
        metrics = evaluate(self.final_model, self.val_set, self.output_dir / "eval",
                           self.cfg.eval.batch_size // self.dist.world_size or 1, self.cfg.data.num_workers,
                           self.cfg.eval.max_images, verbose=self.dist.is_main, amp=self.amp,
                           tile=self.cfg.data.tile, value_range=self.cfg.data.value_range,
                           score_threshold=self.cfg.eval.score_threshold, iou_threshold=self.cfg.eval.iou,
                           coco_backend=self.cfg.eval.coco_backend)
        if self.dist.is_main and metrics is not None:
            self.append_jsonl({"iteration": self.iteration, "eval": {k: v for k, v in metrics.items()
                                                                     if k != "skipped_images"}})
            if metrics["AP"] > self.best_ap:
                self.best_ap = metrics["AP"]
                self.save_weights("best.pt")
        if metrics is not None:
            self._fire("on_eval_end", metrics)
        return metrics

    # ------------------------------------------------------------------ helpers
    def _nonfinite(self, values: dict) -> None:
        last = self.output_dir / "last.pt"
        if self.cfg.train.nonfinite_loss == "skip":
            self.nonfinite_skipped += 1
            log.warning("iteration %d: non-finite loss %s, step skipped", self.iteration + 1, values)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        kept = f"the last good checkpoint {last} is left intact" if last.is_file() else "no checkpoint was written yet"
        raise TrainingError(f"non-finite loss at iteration {self.iteration + 1}: {values}; {kept}. "
                            f"Lower train.base_lr, set train.clip_grad_norm, or train.nonfinite_loss=skip")

    def _loader(self) -> DataLoader:
        d, t = self.cfg.data, self.cfg.train
        sampler = TrainBatchSampler(self.train_set.aspect_ratios(), t.batch_size, t.seed, self.dist.rank,
                                    self.dist.world_size, d.aspect_ratio_grouping, d.horizontal_flip,
                                    start_batch=self.iteration, max_zoom=d.max_zoom, augment=d.augment)
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=d.num_workers, collate_fn=collate,
                          pin_memory=self.dist.device.type == "cuda", persistent_workers=d.num_workers > 0,
                          generator=torch.Generator().manual_seed(t.seed))

    def append_jsonl(self, record: dict) -> None:
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg: Config, output_dir: str | Path | None = None, resume: bool | str = False, device: str = "auto",
          overwrite: bool = False, start: StartWeights | None = None, trust_weights: bool = False,
          callbacks: list[Callback] | None = None) -> dict:
    trainer = Trainer(cfg, output_dir, resume, device, overwrite=overwrite, start=start, trust_weights=trust_weights,
                      callbacks=callbacks)
    try:
        return trainer.run()
    finally:
        distributed.cleanup()
