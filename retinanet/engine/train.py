"""The training loop: SGD/AdamW with warmup and step/cosine schedules, AMP, DDP, EMA,
periodic evaluation, atomic checkpoints and exact resume."""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import Config, config_to_dict, save_config
from ..data.coco import CocoDetection, collate
from ..data.sampler import TrainBatchSampler
from ..model.detector import RetinaNet
from . import distributed
from .checkpoint import CheckpointError, capture_rng, read_checkpoint, restore_rng, write_checkpoint
from .evaluate import evaluate

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


# ------------------------------------------------------------------------------ schedule
@dataclass
class Schedule:
    """The run's schedule after the linear scaling rule for the actual batch size."""

    lr: float
    max_iter: int
    steps: list[int]
    warmup_iters: int


def scaled_schedule(cfg) -> Schedule:
    """Scale lr by `batch / reference_batch` and iteration counts by the inverse
    (Goyal et al. 2017), so that a config written for batch 16 runs on any batch."""
    factor = cfg.batch_size / cfg.reference_batch_size
    return Schedule(
        lr=cfg.base_lr * factor,
        max_iter=max(1, round(cfg.max_iter / factor)),
        steps=[round(s / factor) for s in cfg.steps],
        warmup_iters=round(cfg.warmup_iters / factor),
    )


def lr_factor(iteration: int, schedule: Schedule, kind: str, gamma: float, warmup_factor: float) -> float:
    """Multiplier of the base lr at `iteration`: linear warmup, then step decay or cosine."""
    if kind == "step":
        factor = gamma ** sum(iteration >= s for s in schedule.steps)
    elif kind == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(iteration, schedule.max_iter) / schedule.max_iter))
    else:
        raise ValueError(f"unknown schedule {kind!r} (step or cosine)")
    if iteration < schedule.warmup_iters:
        alpha = iteration / schedule.warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW; normalisation parameters get `weight_decay_norm`."""
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                (no_decay if isinstance(module, norm_types) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": cfg.weight_decay_norm}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (sgd or adamw)")


# ------------------------------------------------------------------------------ EMA
class ModelEMA:
    """Exponential moving average of the weights; `decay` ramps up over the first updates."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.dtype.is_floating_point:
                ema_v.lerp_(v.detach(), 1 - d)
            else:
                ema_v.copy_(v)


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


# ------------------------------------------------------------------------------ the loop
class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between iterations."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        flag = torch.tensor([float(self.signal is not None)])
        if distributed.is_distributed():
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag)
        return bool(flag.item() > 0)


class Trainer:
    """One training run. `run()` returns a summary dict; files go to `output_dir`:
    `config.yaml`, `last.pt` (resumable), `best.pt` (best AP), `model_final.pt`,
    `metrics.jsonl`, TensorBoard events, and `eval/` outputs."""

    def __init__(self, cfg: Config, output_dir: str | Path | None = None, resume: bool = False,
                 device: str = "auto", progress: bool = True):
        self.cfg = cfg
        self.output_dir = Path(output_dir or cfg.output_dir)
        self.resume = resume
        self.dist = distributed.setup(device)
        self.progress = progress and self.dist.is_main
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        random.seed(t.seed + self.dist.rank)
        np.random.seed(t.seed + self.dist.rank)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.train_set = CocoDetection(cfg.data.train_images, cfg.data.train_annotations, strict=cfg.data.strict)
        if len(self.train_set) == 0:
            raise TrainingError(f"{cfg.data.train_annotations}: the training set has no images")
        if self.train_set.num_classes != cfg.model.num_classes:
            raise TrainingError(f"{cfg.data.train_annotations} has {self.train_set.num_classes} categories but "
                                f"model.num_classes={cfg.model.num_classes}; set model.num_classes="
                                f"{self.train_set.num_classes}")
        if not cfg.model.class_names:
            cfg.model.class_names = list(self.train_set.class_names)
        if not cfg.model.category_ids:
            cfg.model.category_ids = list(self.train_set.category_ids)
        self.val_set = (CocoDetection(cfg.data.val_images, cfg.data.val_annotations, strict=cfg.data.strict)
                        if cfg.data.val_annotations else None)

        self.model = RetinaNet.from_config(cfg.model)
        if t.pretrained_backbone:
            load_pretrained_backbone(self.model, t.pretrained_backbone)
        self.model.to(self.dist.device)
        if t.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.model.channels_last = True
        self.schedule = scaled_schedule(t)
        self.optimizer = build_optimizer(self.model, t, self.schedule.lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16" and self.dist.device.type == "cuda")
        self.ema = ModelEMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.ddp_model = (nn.parallel.DistributedDataParallel(self.model, device_ids=[self.dist.local_rank]
                                                              if self.dist.device.type == "cuda" else None)
                          if self.dist.world_size > 1 else self.model)
        self.iteration = 0
        self.best_ap = -1.0
        self.skipped_images: list[str] = []
        self.nonfinite_skipped = 0
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        model_state = (self.ema.module if self.ema else self.model).state_dict()
        state = {
            "config": config_to_dict(self.cfg),
            "model": model_state,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "max_iter": self.schedule.max_iter,
            "best_ap": self.best_ap,
            "rng": capture_rng(),
        }
        if self.ema:
            state["train_model"] = self.model.state_dict()
            state["ema_updates"] = self.ema.updates
        return state

    def save(self, name: str) -> Path | None:
        if not self.dist.is_main:
            return None
        return write_checkpoint(self.output_dir / name, self.state())

    def load(self, path: Path) -> None:
        data = read_checkpoint(path, map_location="cpu")  # RNG states must stay CPU tensors
        if "optimizer" not in data:
            raise CheckpointError(f"{path}: holds weights only, not a training state to resume")
        self.model.load_state_dict(data.get("train_model", data["model"]))
        if self.ema:
            self.ema.module.load_state_dict(data["model"])
            self.ema.updates = data.get("ema_updates", 0)
        self.optimizer.load_state_dict(data["optimizer"])
        self.scaler.load_state_dict(data["scaler"])
        self.iteration = data["iteration"]
        if self.cfg.train.max_minutes > 0:  # a time-budgeted run keeps the length it had fitted
            self.schedule.max_iter = data["max_iter"]
        self.best_ap = data["best_ap"]
        restore_rng(data["rng"])
        log.info("resumed from %s at iteration %d", path, self.iteration)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            save_config(self.cfg, self.output_dir / "config.yaml")
        last = self.output_dir / "last.pt"
        if self.resume:
            if not last.is_file():
                raise TrainingError(f"--resume: no checkpoint at {last}")
            self.load(last)
        writer = self._tensorboard()
        metrics = None
        try:
            status = self._loop(writer)
            self.save("last.pt")
            if status == "interrupted":
                if self.dist.is_main:
                    print(f"interrupted at iteration {self.iteration}: saved {last}; continue with --resume",
                          file=sys.stderr)
                return {"status": status, "iteration": self.iteration, "signal": self._stop_signal}
            if self.val_set is not None:
                metrics = self._evaluate(writer)
            if self.dist.is_main:
                final_model = self.ema.module if self.ema else self.model
                write_checkpoint(self.output_dir / "model_final.pt",
                                 {"config": config_to_dict(self.cfg), "model": final_model.state_dict()})
        finally:
            if writer:
                writer.close()
        distributed.barrier()
        return {"status": status, "iteration": self.iteration, "metrics": metrics,
                "skipped_images": self.skipped_images, "nonfinite_skipped": self.nonfinite_skipped}

    def _loop(self, writer) -> str:
        """Iterate until max_iter ("finished") or a stop signal ("interrupted")."""
        t = self.cfg.train
        batches = iter(self._loader())
        bar = self._progress_bar()
        timer = _Timer()
        start_time, start_iter = time.perf_counter(), self.iteration
        try:
            with _StopRequest() as stop:
                while self.iteration < self.schedule.max_iter:
                    images, targets, skipped = next(batches)
                    self._note_skipped(skipped)
                    losses = self.step(images, targets)
                    self.iteration += 1
                    timer.tick()
                    if t.max_minutes > 0 and (self.iteration - start_iter) % 25 == 0:
                        self._fit_budget(start_time, self.iteration - start_iter)
                    if bar is not None:
                        bar.total = self.schedule.max_iter
                        bar.update(1)
                        if losses:
                            bar.set_postfix(loss=f"{losses['loss']:.3f}", refresh=False)
                    if losses is not None and (self.iteration % t.log_period == 0 or self.iteration == 1):
                        self._log(losses, timer, writer)
                    if self.iteration % t.checkpoint_period == 0:
                        self.save("last.pt")
                    if t.eval_period and self.iteration % t.eval_period == 0 and self.iteration < self.schedule.max_iter:
                        self._evaluate(writer)
                    if stop.requested():
                        self._stop_signal = stop.signal or signal.SIGINT
                        return "interrupted"
        finally:
            if bar is not None:
                bar.close()
        return "finished"

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
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = self.ddp_model(images, targets)
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
        return values

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

    def _fit_budget(self, start: float, done: int) -> None:
        """Set max_iter so that training ends within `max_minutes` of wall clock, from the
        average iteration time so far (re-fitted as the run goes; never above the config's)."""
        elapsed = time.perf_counter() - start
        remaining = self.cfg.train.max_minutes * 60 - elapsed
        fitted = self.iteration + max(0, int(remaining / max(elapsed / done, 1e-6)))
        configured = scaled_schedule(self.cfg.train).max_iter
        fitted = min(distributed.all_gather_objects(fitted)[0], configured)
        if fitted != self.schedule.max_iter:
            if self.schedule.max_iter == configured:
                log.info("time budget %.1f min: max_iter %d -> %d", self.cfg.train.max_minutes,
                         self.schedule.max_iter, fitted)
            self.schedule.max_iter = fitted

    def _loader(self) -> DataLoader:
        d, t = self.cfg.data, self.cfg.train
        sampler = TrainBatchSampler(self.train_set.aspect_ratios(), t.batch_size, t.seed, self.dist.rank,
                                    self.dist.world_size, d.aspect_ratio_grouping, d.horizontal_flip,
                                    start_batch=self.iteration)
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=d.num_workers, collate_fn=collate,
                          pin_memory=self.dist.device.type == "cuda", persistent_workers=d.num_workers > 0,
                          generator=torch.Generator().manual_seed(t.seed))

    def _evaluate(self, writer) -> dict | None:
        model = self.ema.module if self.ema else self.model
        metrics = evaluate(model, self.val_set, self.output_dir / "eval", self.cfg.eval.batch_size //
                           self.dist.world_size or 1, self.cfg.data.num_workers, self.cfg.eval.max_images,
                           verbose=self.dist.is_main)
        if self.dist.is_main and metrics is not None:
            self._append_jsonl({"iteration": self.iteration, "eval": {k: v for k, v in metrics.items()
                                                                      if k != "skipped_images"}})
            if writer:
                for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
                    writer.add_scalar(f"eval/{key}", metrics[key], self.iteration)
            if metrics["AP"] > self.best_ap:
                self.best_ap = metrics["AP"]
                self.save("best.pt")
        return metrics

    def _log(self, values: dict, timer: "_Timer", writer) -> None:
        values = distributed.mean_over_processes(values)
        if not self.dist.is_main:
            return
        per_iter = timer.recent()
        record = {"iteration": self.iteration, **{k: round(v, 6) for k, v in values.items()},
                  "seconds_per_iter": round(per_iter, 4),
                  "images_per_second": round(self.cfg.train.batch_size / max(per_iter, 1e-9), 2),
                  "eta_seconds": round(per_iter * (self.schedule.max_iter - self.iteration))}
        self._append_jsonl(record)
        if writer:
            for k, v in values.items():
                writer.add_scalar(f"train/{k}", v, self.iteration)
        if self.progress and not sys.stderr.isatty():
            print(f"iter {self.iteration}/{self.schedule.max_iter} loss {values['loss']:.4f} "
                  f"(cls {values['loss_cls']:.4f} box {values['loss_box']:.4f}) lr {values.get('lr', 0):.2e} "
                  f"{per_iter:.2f}s/it eta {record['eta_seconds'] // 60:.0f} min", flush=True)

    def _append_jsonl(self, record: dict) -> None:
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _note_skipped(self, skipped: list[str]) -> None:
        if skipped:
            self.skipped_images.extend(skipped)
            if self.dist.is_main:
                with open(self.output_dir / "skipped_images.txt", "a") as f:
                    f.write("".join(s + "\n" for s in skipped))

    def _tensorboard(self):
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed: no event files (pip install tensorboard)")
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"))

    def _progress_bar(self):
        if not self.progress or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.schedule.max_iter, initial=self.iteration, dynamic_ncols=True, desc="train")


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


def train(cfg: Config, output_dir: str | Path | None = None, resume: bool = False, device: str = "auto") -> dict:
    trainer = Trainer(cfg, output_dir, resume, device)
    try:
        return trainer.run()
    finally:
        distributed.cleanup()
