"""Training, evaluation and prediction end to end on small generated data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retinanet.cli import main as cli
from retinanet.engine.callbacks import StopOnSignal
from retinanet.engine.optimization import ModelEMA, lr_factor, scaled_schedule
from retinanet.engine.train import Trainer
from retinanet.config import TrainConfig

from helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_end_to_end_train_eval_predict(shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(shapes_data, out, train__eval_period=2)
    summary = Trainer(cfg, out, progress=False).run()
    assert summary["status"] == "finished" and summary["iteration"] == 4
    for name in ("config.yaml", "last.pt", "best.pt", "model_final.pt", "metrics.jsonl", "eval/metrics.json",
                 "eval/detections.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class_AP"} <= set(metrics)
    assert set(metrics["per_class_AP"]) == {"ellipse", "rectangle", "triangle", "star", "cross"}
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["iteration"] for l in lines if "loss" in l] == [1, 2, 3, 4]
    assert [l["iteration"] for l in lines if "eval" in l] == [2, 4]  # periodic, then final
    assert all({"loss", "loss_cls", "loss_box", "lr", "eta_seconds"} <= set(l) for l in lines if "loss" in l)

    # the CLI evaluates the checkpoint with its stored config, and predicts on files
    assert cli(["eval", "--weights", str(out / "model_final.pt"), "--output-dir", str(tmp_path / "ev"),
                "model.inference.score_threshold=0.0"]) == 0
    cli_metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    detections = json.loads((tmp_path / "ev" / "detections.json").read_text())
    assert detections and cli_metrics["num_images"] == 8
    # scored by pycocotools itself, from the files alone
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(shapes_data["val_annotations"])
    evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
    evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert cli_metrics["AP"] == pytest.approx(float(evaluator.stats[0]), abs=1e-9)
    assert cli_metrics["AP50"] == pytest.approx(float(evaluator.stats[1]), abs=1e-9)
    images = sorted(Path(shapes_data["val_images"]).glob("*.jpg"))[:2]
    assert cli(["predict", "--weights", str(out / "model_final.pt"), *map(str, images), "--output-dir",
                str(tmp_path / "pred"), "--score-threshold", "0.0"]) == 0
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert {p["file_name"] for p in preds} == {str(p) for p in images}
    assert all(p["category_id"] in range(1, 6) and len(p["bbox"]) == 4 for p in preds)
    assert (tmp_path / "pred" / f"{images[0].stem}.jpg").is_file()

    # compiled (torch.compile'd network), `predict` and `eval` give the same detections
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert cli(["predict", "--weights", str(out / "model_final.pt"), *map(str, images), "--output-dir",
                str(tmp_path / "pred_compiled"), "--score-threshold", "0.0", "--compile", "--no-draw"]) == 0
    compiled = json.loads((tmp_path / "pred_compiled" / "predictions.json").read_text())
    _assert_same_records(compiled, preds)
    assert counters["stats"]["unique_graphs"] > graphs  # it did go through the compiler
    # on a CPU with the weights frozen in: oneDNN prepacked the convolutions' weights
    assert counters["inductor"]["mkldnn_conv_weight_pack_matcher_count"] > 0
    assert cli(["eval", "--weights", str(out / "model_final.pt"), "--output-dir", str(tmp_path / "ev_compiled"),
                "model.inference.score_threshold=0.0", "eval.compile=true"]) == 0
    _assert_same_records(json.loads((tmp_path / "ev_compiled" / "detections.json").read_text()), detections)


def _assert_same_records(got: list[dict], expected: list[dict]) -> None:
    """The same detection records up to float rounding (boxes 1e-2 px, scores 1e-4)."""
    assert len(got) == len(expected) > 0
    key = lambda p: (str(p.get("file_name", p.get("image_id"))), -p["score"])  # noqa: E731
    for a, b in zip(sorted(got, key=key), sorted(expected, key=key)):
        assert a["category_id"] == b["category_id"] and abs(a["score"] - b["score"]) <= 1e-4, (a, b)
        assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) <= 1e-2, (a, b)


def test_predict_runs_the_network_in_the_precision_asked(tmp_path, photo_path):
    """`predict --amp`: the model runs under autocast in the resolved precision, else in fp32."""
    from retinanet.engine.predict import predict_files

    class Spy(torch.nn.Module):
        category_ids, class_names = [1], ["thing"]

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.preprocessor = type("P", (), {"check_size": None})()
            self.seen = []

        def predict(self, images, score_threshold=None):
            self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
                     "class_names": []} for _ in images]

    spy = Spy()
    for amp in ("none", "bf16"):
        predict_files(spy, [photo_path], tmp_path / amp, draw=False, workers=0, progress=False, amp=amp)
    assert spy.seen == [None, torch.bfloat16]


@pytest.mark.slow
def test_exact_resume_after_interruption(shapes_data, tmp_path, monkeypatch):
    def config(out):
        return tiny_config(shapes_data, out, train__max_iter=6, train__optimizer="sgd", train__base_lr=0.01,
                           train__schedule="step", train__steps=[4], train__ema_decay=0.99,
                           train__max_minutes=0, data__val_annotations="''")

    straight = Trainer(config(tmp_path / "a"), progress=False)
    straight.run()

    interrupted = Trainer(config(tmp_path / "b"), progress=False)
    monkeypatch.setattr(StopOnSignal, "requested", lambda self: interrupted.iteration == 3)
    assert interrupted.run()["status"] == "interrupted"
    monkeypatch.undo()
    resumed = Trainer(config(tmp_path / "b"), resume=True, progress=False)
    assert resumed.iteration == 0  # loaded in run()
    resumed.run()
    assert resumed.iteration == 6
    for a, b in [(straight.final_model, resumed.final_model), (straight.model, resumed.model)]:
        a, b = a.state_dict(), b.state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_linear_scaling_rule_and_schedule():
    cfg = TrainConfig(batch_size=8, reference_batch_size=16, base_lr=0.01, max_iter=90000, steps=[60000, 80000],
                      warmup_iters=1000)
    s = scaled_schedule(cfg)
    assert (s.lr, s.max_iter, s.steps, s.warmup_iters) == (0.005, 180000, [120000, 160000], 2000)
    assert lr_factor(0, s, "step", 0.1, 0.001) == pytest.approx(0.001)
    assert lr_factor(1000, s, "step", 0.1, 0.001) == pytest.approx(0.5005)
    assert lr_factor(2000, s, "step", 0.1, 0.001) == 1.0
    assert lr_factor(120000, s, "step", 0.1, 0.001) == pytest.approx(0.1)
    assert lr_factor(170000, s, "step", 0.1, 0.001) == pytest.approx(0.01)
    assert lr_factor(90000, s, "cosine", 0.1, 0.001) == pytest.approx(0.5)


def _training_script(path: Path, config_arguments: str, run: str) -> Path:
    """A script for torchrun (which needs a file): `tiny_config` from its arguments (the data's
    JSON, the output dir, then what `config_arguments` reads) with SGD at a fixed lr, GroupNorm
    and one thread, then `run`."""
    path.write_text(
        "import sys, json, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from helpers import tiny_config\n"
        "from retinanet.engine.train import Trainer\n"
        "data = json.loads(sys.argv[1]); out = sys.argv[2]\n"
        "cfg = tiny_config(data, out, train__optimizer='sgd', train__base_lr=0.02, train__schedule='step',\n"
        "                  train__warmup_iters=0, model__backbone__norm='gn', data__val_annotations=\"''\",\n"
        f"                  train__threads=1, {config_arguments})\n" + run)
    return path


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(shapes_data, tmp_path):
    """torchrun with 2 CPU processes (gloo) and global batch 4 == one process with batch 4."""
    script = _training_script(tmp_path / "run.py", "train__max_iter=3, data__horizontal_flip=0.0",
                              "trainer = Trainer(cfg, out, device='cpu').setup()\n"
                              "import os; os.makedirs(out, exist_ok=True)\n"
                              "if trainer.dist.is_main: torch.save(trainer.model.state_dict(), out + '/init.pt')\n"
                              "trainer.run()\n")
    data = json.dumps(shapes_data)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    single = subprocess.run([sys.executable, str(script), data, str(tmp_path / "one")], capture_output=True,
                            text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", str(script), data, str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    def losses(run):
        rows = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["loss_cls"], r["loss_box"]) for r in rows if "loss" in r]

    for (c1, b1), (c2, b2) in zip(losses("one"), losses("two"), strict=True):
        assert c1 == pytest.approx(c2, rel=1e-4) and b1 == pytest.approx(b2, rel=1e-4)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["weights"]
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["weights"]
    init = torch.load(tmp_path / "one" / "init.pt", weights_only=True)
    moved = 0
    for key in one:
        if not one[key].is_floating_point():
            continue
        update = (one[key] - init[key]).norm()
        moved += update > 0
        # the two runs agree to 1% of what training changed (float summation order differs and
        # three steps at lr 0.02 amplify it; a wrong normalisation across processes shows as ~100%)
        assert (one[key] - two[key]).norm() <= 1e-2 * update + 1e-7, key
    assert moved > 50


@pytest.mark.slow
def test_learns_to_overfit_a_small_set(tmp_path):
    """On a few generated images the model reaches AP >= 0.9 on those same images."""
    from retinanet.data.synthetic import generate_dataset

    data = generate_dataset(tmp_path / "data", num_train=8, num_val=0, image_size=128, seed=11, min_objects=1,
                            max_objects=3, min_size=24, max_size=90)
    data = dict(data, val_images=data["train_images"], val_annotations=data["train_annotations"])
    cfg = tiny_config(data, tmp_path / "run", train__max_iter=150, train__base_lr=0.002, train__warmup_iters=20,
                      data__horizontal_flip=0.0, train__log_period=50, train__ema_decay=0,
                      model__fpn__out_channels=64, model__head__num_convs=2)
    summary = Trainer(cfg, tmp_path / "run", progress=False).run()
    assert summary["metrics"]["AP"] >= 0.9, summary["metrics"]


def test_pretrained_backbone_from_a_local_file(tmp_path):
    import torchvision

    from retinanet import ModelConfig, RetinaNet
    from retinanet.engine.train import load_pretrained_backbone

    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    cfg = ModelConfig(num_classes=2)
    cfg.backbone.depth = 18
    model = RetinaNet.from_config(cfg)
    load_pretrained_backbone(model, str(tmp_path / "r18.pth"))
    assert torch.equal(model.backbone.layer3[1].conv2.weight, resnet.layer3[1].conv2.weight)
    assert torch.equal(model.backbone.bn1.running_var, resnet.bn1.running_var)


def test_offline_weight_name_explains_how_to_supply_a_file(monkeypatch):
    import torchvision

    from retinanet import ModelConfig, RetinaNet
    from retinanet.engine.train import TrainingError, load_pretrained_backbone

    def offline(self, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    cfg = ModelConfig(num_classes=2)
    cfg.backbone.depth = 18
    with pytest.raises(TrainingError, match=r"offline.*train\.pretrained_backbone=/path/to/resnet18-"):
        load_pretrained_backbone(RetinaNet.from_config(cfg), "ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(TrainingError, match="neither a file nor a torchvision weight name"):
        load_pretrained_backbone(RetinaNet.from_config(cfg), "no_such_weights.pth")


@pytest.mark.slow
def test_ddp_resume_is_exact_with_multiscale(shapes_data, tmp_path):
    """torchrun with 2 processes and multi-scale sizes: 2 iterations, then --resume to 4, equals
    4 iterations straight, bit for bit (each process gets its own RNG and size stream back)."""
    script = _training_script(tmp_path / "run.py", "train__max_iter=int(sys.argv[3]), train__steps=[100], "
                              "model__input__train_min_sizes=[96, 112, 128]",
                              "Trainer(cfg, out, resume=sys.argv[4] == '1', device='cpu').run()\n")
    data = json.dumps(shapes_data)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}

    def torchrun(out, iters, resume, port):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              str(port), str(script), data, str(out), str(iters), "1" if resume else "0"],
                             capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]

    torchrun(tmp_path / "straight", 4, False, 29541)
    torchrun(tmp_path / "split", 2, False, 29542)
    torchrun(tmp_path / "split", 4, True, 29543)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert a["training"]["iteration"] == b["training"]["iteration"] == 4
    assert len(b["training"]["rng_per_rank"]) == 2
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key


def test_amp_auto_picks_bf16_only_where_the_hardware_has_it(monkeypatch, shapes_data, tmp_path, caplog):
    import logging

    from retinanet.engine import precision
    from retinanet.engine.precision import resolve_amp

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_amp("auto", cpu)[0] == "none"
    assert "much slower" in resolve_amp("bf16", cpu)[1]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp("auto", cpu)[0] == "bf16" and resolve_amp("none", cpu)[0] == "none"
    with caplog.at_level(logging.INFO):
        trainer = Trainer(tiny_config(shapes_data, tmp_path, train__amp="auto"), progress=False).setup()
    assert trainer.amp == "bf16"
    assert any("precision: bf16 (train.amp=auto: the CPU has native bf16" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_train_compile_gives_the_eager_losses_and_the_same_checkpoints(shapes_data, tmp_path, monkeypatch):
    """`train.compile=true` goes through torch.compile (here with the aot_eager backend: the
    same graph capture and autograd, without minutes of C++ compilation on a CI CPU) and
    changes neither the losses nor the parameter names a checkpoint holds."""
    import functools

    from retinanet.checkpoint import read_checkpoint

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        trainer = Trainer(tiny_config(shapes_data, out, train__max_iter=3, train__compile=compiled), out,
                          progress=False)
        assert trainer.run()["status"] == "finished"
        assert (getattr(trainer.model.backbone, "_compiled_call_impl", None) is not None) == compiled
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[compiled] = ([l["loss"] for l in lines if "loss" in l], read_checkpoint(out / "model_final.pt").weights)
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = runs[False], runs[True]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4) and len(eager_losses) == 3
    assert list(compiled_weights) == list(eager_weights)


@pytest.mark.slow
def test_matching_and_losses_compile_as_one_graph(shapes_data):
    """No graph break from pre-processing to the losses (fullgraph=True raises at the first):
    the property that lets torch.compile fuse them on a GPU."""
    from retinanet.config import load_config
    from retinanet.model.build import build_retinanet

    cfg = load_config("demo")
    cfg.model.loss.box_loss = "giou"
    model = build_retinanet(cfg.model).train()
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8, generator=generator) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 60, 70], [30, 30, 90, 100]]), "labels": torch.tensor([1, 3]),
                "iscrowd": torch.tensor([0, 1])} for _ in images]
    eager = model(images, targets)
    model.forward_training = torch.compile(model.forward_training, fullgraph=True, backend="aot_eager")
    compiled = model(images, targets)
    for key in eager:
        assert torch.allclose(compiled[key], eager[key], rtol=1e-5), key


def test_ema_follows_the_ramped_decay_and_copies_counters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    start = model[0].weight.detach().clone()
    expected = start.clone()
    for step in range(1, 4):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model[1].num_batches_tracked += 1
        ema.update(model)
        d = min(0.9, (1 + step) / (10 + step))  # 2/11, 3/12, 4/13: the ramp, below 0.9
        expected = d * expected + (1 - d) * model[0].weight.detach()
    assert torch.allclose(ema.module[0].weight, expected, atol=1e-6)
    assert not torch.allclose(ema.module[0].weight, model[0].weight)
    assert int(ema.module[1].num_batches_tracked) == 3


def test_demo_makes_its_images_at_the_training_size_not_the_test_size(tmp_path):
    # the demo tests at a larger size than it trains at; images made at the test size would be
    # downscaled in training, and every object smaller than the demo means
    from retinanet.engine.demo import demo_config
    cfg = demo_config(tmp_path, num_train=2, num_val=2)
    train_size = max(cfg.model.input.train_min_sizes)
    assert cfg.model.input.test_min_size != train_size
    for split in ("train", "val"):
        images = json.loads(Path(getattr(cfg.data, f"{split}_annotations")).read_text())["images"]
        assert {(im["width"], im["height"]) for im in images} == {(train_size, train_size)}
