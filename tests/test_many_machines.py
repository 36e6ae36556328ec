"""Many machines on localhost: two torchrun nodes, elastic restarts after a killed worker, and
sharded prediction with resume, all through `python -m retinanet.cli` as users launch them."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retinanet.cli import main as cli
from retinanet.config import save_config

from helpers import tiny_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("RANK", None), ENV.pop("WORLD_SIZE", None), ENV.pop("TORCHELASTIC_RESTART_COUNT", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """A command in its own process group (so that a test can end it and all its children)."""
    return subprocess.Popen(args, cwd=cwd, env={**ENV, **env}, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Wait for `procs`; whatever is still running at the end is killed with its process group."""
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


HOOKS = """
import os, signal, torch
from retinanet import Callback


class Record(Callback):
    \"\"\"On the main process, the weights after each step and the gradients it took (all-reduced).\"\"\"

    def on_iter_end(self, trainer, losses):
        if trainer.dist.is_main:
            torch.save({"weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                        "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters()}},
                       trainer.output_dir / f"step{trainer.iteration}.pt")


class KillOnce(Callback):
    \"\"\"SIGKILL of the rank-1 worker at iteration 3 of torchrun's first attempt: no cleanup runs.\"\"\"

    def on_iter_end(self, trainer, losses):
        if trainer.iteration == 3 and trainer.dist.rank == 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            os.kill(os.getpid(), signal.SIGKILL)
"""


def train_config(shapes_data, folder: Path, **overrides) -> Path:
    """The tiny training config as a YAML file in `folder`, beside the test's callbacks
    (`hooks.py`): SGD at a fixed lr, GroupNorm, one thread, 4 iterations of global batch 4, a
    checkpoint every 2 iterations, no validation."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hooks.py").write_text(HOOKS)
    cfg = tiny_config(shapes_data, folder / "unused", train__optimizer="sgd", train__base_lr=0.02,
                      train__schedule="step", train__steps=[100], train__warmup_iters=0,
                      model__backbone__norm="gn", data__val_annotations="''", train__threads=1,
                      train__checkpoint_period=2, train__loggers=[], **overrides)
    path = folder / "config.yaml"
    save_config(cfg, path)
    return path


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["weights"]


def relative_difference(a: dict, b: dict, reference: dict) -> float:
    """`|a - b| / |a - reference|` over all floating-point tensors together."""
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum(float((a[k] - b[k]).double().norm() ** 2) for k in keys) ** 0.5
    scale = sum(float((a[k] - reference[k]).double().norm() ** 2) for k in keys) ** 0.5
    return diff / scale


@pytest.fixture(scope="module")
def two_node_run(shapes_data, tmp_path_factory) -> Path:
    """4 iterations on two torchrun "nodes" of one process each, on this machine (c10d
    rendezvous, gloo), recording each step; the run folder."""
    root = tmp_path_factory.mktemp("two_nodes")
    config = train_config(shapes_data, root, train__callbacks="[hooks:Record]")
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [launch([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                     "-m", "retinanet.cli", "train", "--config", str(config), "--output-dir", str(root / "run"),
                     "--device", "cpu"], root, root / f"node{rank}.log") for rank in (0, 1)]
    finish(procs)
    for rank, p in enumerate(procs):
        assert p.returncode == 0, (root / f"node{rank}.log").read_text()[-3000:]
    return root / "run"


@pytest.mark.slow
def test_two_nodes_step_as_one_process_on_the_same_global_batch(two_node_run, shapes_data, tmp_path):
    """Each of the 4 steps of two nodes (batch 2 each) is the step one process takes with batch
    4 from the same weights: same batches, loss normalisation, lr and momentum, to float32
    rounding. Not bit for bit: the batch sums run in another order (per process, then gloo's
    all-reduce), which moves the last bits (measured 2e-6 of a step); the tolerance 1e-5 of a
    step is far below what a wrong loss normalisation across processes gives (0.5).
    Whole runs are compared step by step because this tiny net from scratch amplifies rounding
    over steps (a 3e-8 change of the weights moves the next gradient by 3%), in one process too."""
    from retinanet.config import load_config
    from retinanet.engine.train import Trainer

    threads = torch.get_num_threads()
    try:
        trainer = Trainer(load_config(str(train_config(shapes_data, tmp_path))), tmp_path / "one", device="cpu",
                          progress=False).setup()
        batches = iter(trainer._loader())
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        for step in range(1, 5):
            recorded = torch.load(two_node_run / f"step{step}.pt", weights_only=True)["weights"]
            trainer.model.load_state_dict(before)
            images, targets, _ = next(batches)
            trainer.step(images, targets)
            trainer.iteration += 1
            assert relative_difference(trainer.model.state_dict(), recorded, before) < 1e-5, step
            before = recorded
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(recorded[k], v) for k, v in weights(two_node_run).items())


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(two_node_run, shapes_data, tmp_path):
    """`torchrun --max-restarts 1`: the rank-1 worker is SIGKILLed at iteration 3 of the first
    attempt, after the checkpoint of iteration 2. torchrun restarts both workers, which resume
    from last.pt (the default of a restarted worker: no --resume is given), and the run ends
    with the weights of the uninterrupted run bit for bit (two processes of batch 2, as the two
    nodes: the same arithmetic), each iteration logged once. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    as the docs say: with torchrun's store shared by the workers, a restarted worker may read the
    address of the attempt before and fail to connect (pytorch/pytorch#135712, seen here once)."""
    config = train_config(shapes_data, tmp_path, train__callbacks="[hooks:Record, hooks:KillOnce]")
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    proc = launch([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m", "retinanet.cli",
                   "train", "--config", str(config), "--output-dir", str(run), "--device", "cpu"], tmp_path, log,
                  TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    finish([proc])
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "torchrun restart 1: resuming from" in text and "resumed from" in text, text[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4]
    expected = weights(two_node_run)
    assert all(torch.equal(expected[k], v) for k, v in weights(run).items())


@pytest.mark.slow
def test_resume_auto_starts_a_run_then_continues_it(shapes_data, tmp_path, capsys):
    """`train --resume auto` starts a run in a folder without a checkpoint and continues one
    with it; `--resume KEY=VALUE` still reads KEY=VALUE as an override; any other value is refused."""
    config = train_config(shapes_data, tmp_path, train__max_iter=1)
    out = tmp_path / "run"
    train = ["train", "--config", str(config), "--output-dir", str(out), "--device", "cpu"]

    def iteration() -> int:
        return torch.load(out / "last.pt", weights_only=True)["training"]["iteration"]

    threads = torch.get_num_threads()
    try:
        assert cli([*train, "--resume", "auto"]) == 0 and iteration() == 1
        assert cli([*train, "--resume", "auto", "train.max_iter=2"]) == 0 and iteration() == 2
        assert cli([*train, "--resume", "train.max_iter=3"]) == 0 and iteration() == 3
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3]
    capsys.readouterr()
    assert cli([*train, "--resume", "sometimes"]) == 2
    assert capsys.readouterr().err.strip() == "error: --resume sometimes: --resume takes no value, or auto"


@pytest.fixture(scope="module")
def predict_inputs(shapes_data, tmp_path_factory) -> tuple[Path, Path]:
    """`(weights, folder)`: a small untrained detector that finds boxes (class bias -1) and a
    folder of 10 JPEGs and one damaged file."""
    import shutil

    from retinanet import RetinaNet, save_model

    root = tmp_path_factory.mktemp("predict")
    model = RetinaNet.from_config(tiny_config(shapes_data, root).model)
    with torch.no_grad():
        model.head.cls_score.bias.fill_(-1.0)
    save_model(model, root / "model.pt")
    folder = root / "images"
    folder.mkdir()
    for path in sorted(Path(shapes_data["train_images"]).glob("*.jpg"))[:10]:
        shutil.copy(path, folder / path.name)
    (folder / "zz_damaged.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    return root / "model.pt", folder


def predict_args(weights: Path, folder: Path, out: Path) -> list[str]:
    return ["predict", str(folder), "--weights", str(weights), "--output-dir", str(out), "--no-draw",
            "--batch-size", "1", "--workers", "0", "--device", "cpu"]


def part_lines(out: Path) -> list[dict]:
    return [json.loads(line) for part in sorted((out / "parts").glob("*.jsonl"))
            for line in part.read_text().splitlines()]


def test_predict_resume_skips_the_images_done_and_redoes_a_torn_line(predict_inputs, tmp_path):
    """A part cut mid-line, as a kill leaves it: `predict --resume` keeps its complete lines
    (the images done: their records are taken from the part, not predicted again), predicts
    the rest once, and merges all into predictions.json in the order of the inputs."""
    weights, folder = predict_inputs
    assert cli(predict_args(weights, folder, tmp_path / "straight")) == 1  # the damaged file
    expected = json.loads((tmp_path / "straight" / "predictions.json").read_text())
    part = tmp_path / "straight" / "parts" / "rank00000-of-00001.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    assert len(lines) == 11 and "error" in json.loads(lines[-1])  # zz_damaged.jpg comes last
    done = json.loads(lines[0])
    assert done["records"]
    marked = json.dumps({**done, "records": done["records"][:1]}) + "\n"  # to see where its records come from
    stopped = tmp_path / "stopped" / "parts" / part.name
    stopped.parent.mkdir(parents=True)
    stopped.write_text(marked + "".join(lines[1:4]) + lines[4][: len(lines[4]) // 2])
    assert cli([*predict_args(weights, folder, tmp_path / "stopped"), "--resume"]) == 1
    got = json.loads((tmp_path / "stopped" / "predictions.json").read_text())
    assert got == [r for r in expected if r["file_name"] != done["file_name"] or r == done["records"][0]]
    entries = part_lines(tmp_path / "stopped")  # every line whole, every image once
    assert [e["file_name"] for e in entries] == [json.loads(line)["file_name"] for line in lines]


@pytest.mark.slow
def test_sharded_prediction_killed_part_way_resumes_to_the_single_process_output(predict_inputs, tmp_path):
    """`torchrun --nproc-per-node 2 ... predict FOLDER`: each process predicts every other image
    into its own part; the run is SIGKILLed (launcher and workers) once the parts hold a few
    images, and `--resume` under torchrun finishes it: one predictions.json equal, byte for byte,
    to a single process's, and no image predicted twice."""
    weights, folder = predict_inputs
    assert cli(predict_args(weights, folder, tmp_path / "one")) == 1
    out = tmp_path / "two"
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "retinanet.cli",
               *predict_args(weights, folder, out)]
    proc = launch(command, tmp_path, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            parts = list((out / "parts").glob("*.jsonl")) if (out / "parts").is_dir() else []
            if len(parts) == 2 and all(p.stat().st_size for p in parts):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        finish([proc], timeout=10)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert not (out / "predictions.json").exists()
    assert 2 <= len(part_lines(out)) < 11
    resumed = launch([*command, "--resume"], tmp_path, tmp_path / "resumed.log")
    finish([resumed])
    assert resumed.returncode != 0  # the damaged file: exit status 1
    assert "1 input(s) could not be used" in (tmp_path / "resumed.log").read_text()
    assert (out / "predictions.json").read_text() == (tmp_path / "one" / "predictions.json").read_text()
    names = [e["file_name"] for e in part_lines(out)]
    assert len(names) == len(set(names)) == 11
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["rank00000-of-00002.jsonl", "rank00001-of-00002.jsonl"]


def test_resume_shares_the_remaining_images_out_anew(predict_inputs, tmp_path):
    """Resumed by two processes (threads here, with a real barrier) after a stop where the first
    had done all its images and the second none: the remaining images are shared between both,
    not left to the second, and merged with the done ones in the order of the inputs."""
    from retinanet import load_model
    from retinanet.engine.predict import predict_files

    weights, folder = predict_inputs
    assert cli(predict_args(weights, folder, tmp_path / "straight")) == 1
    lines = (tmp_path / "straight" / "parts" / "rank00000-of-00001.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path / "stopped"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "rank00000-of-00002.jsonl").write_text("".join(lines[0::2]))  # all of the first's share
    model = load_model(weights)
    as_two_processes(lambda shard: predict_files(model, [folder], out, draw=False, workers=0, progress=False,
                                                 shard=shard, resume=True))
    new = {rank: [json.loads(line)["file_name"] for line in (out / "parts" / f"rank0000{rank}-of-00002.jsonl")
                  .read_text().splitlines()] for rank in (0, 1)}
    remaining = [json.loads(line)["file_name"] for line in lines[1::2]]
    assert new[0][len(lines[0::2]):] == remaining[0::2] and new[1] == remaining[1::2]
    # the same records in the inputs' order (to float rounding: two threads ran the model at once)
    got, expected = (json.loads((run / "predictions.json").read_text()) for run in (out, tmp_path / "straight"))
    assert [r["file_name"] for r in got] == [r["file_name"] for r in expected]
    assert all(abs(a["score"] - b["score"]) <= 1e-4 for a, b in zip(got, expected))


@pytest.fixture(scope="module")
def large_image(predict_inputs) -> Path:
    """One 600 x 760 px image (four training images side by side and stacked) to predict on
    tiles of 128 px: 48 tiles, in 12 units of 4 tiles, and the whole image."""
    from PIL import Image

    weights, folder = predict_inputs
    tiles = [Image.open(p).convert("RGB").resize((380, 300)) for p in sorted(folder.glob("*.jpg"))[:4]]
    canvas = Image.new("RGB", (760, 600))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (380 * (i % 2), 300 * (i // 2)))
    path = weights.parent / "large" / "large.png"
    path.parent.mkdir()
    canvas.save(path)
    return path


def tiled_args(weights: Path, image: Path, out: Path) -> list[str]:
    return [*predict_args(weights, image, out), "--tile", "128", "--full-image"]


def _shared_tiles(weights: Path, image: Path, out: Path, resume: bool = False) -> None:
    """`predict --tile` by two processes (threads, with a real barrier), as torchrun runs it."""
    from retinanet import load_model
    from retinanet.engine.predict import predict_files

    model = load_model(weights)
    tiling = {"tile": 128, "overlap": 0.2, "merge": "nms", "full_image": True}
    as_two_processes(lambda shard: predict_files(model, [image], out, draw=False, workers=0, progress=False,
                                                 batch_size=4, tiling=tiling, shard=shard, resume=resume))


def as_two_processes(run) -> None:
    """`run(shard)` in two threads standing for two processes, with a real barrier."""
    import threading

    from retinanet.engine.prediction_files import Shard

    barrier = threading.Barrier(2, timeout=300)
    threads = [threading.Thread(target=run, args=(Shard(rank, 2, barrier.wait),)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def tile_units(out: Path) -> dict[str, list[dict]]:
    return {part.name: [json.loads(line) for line in part.read_text().splitlines()]
            for part in sorted((out / "parts").glob("tiles-*.jsonl"))}


def _assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    """The same detections to float rounding (two threads ran the model at once, which can
    reorder this untrained model's near-equal scores)."""
    from test_deploy_parity import _assert_equal_records

    assert expected
    _assert_equal_records(got, expected)


def test_one_large_image_is_shared_by_tiles(predict_inputs, large_image, tmp_path, capsys):
    """Two processes on one image: each does every other unit of its tiles (12 units of 4
    tiles and the whole image), into its own tile part; the image's owner merges them into the
    detections one process gives. Every tile here holds the untrained model's 100 detections:
    predict says so once, for the whole run."""
    weights, _ = predict_inputs
    assert cli(tiled_args(weights, large_image, tmp_path / "one")) == 0
    err = capsys.readouterr().err
    assert err.count("note: 48 tile(s) reached the cap of 100 detections per tile") == 1
    _shared_tiles(weights, large_image, tmp_path / "two")
    units = tile_units(tmp_path / "two")
    assert {name: sorted(u["unit"] for u in lines) for name, lines in units.items()} == {
        "tiles-rank00000-of-00002.jsonl": list(range(0, 13, 2)), "tiles-rank00001-of-00002.jsonl": list(range(1, 13, 2))}
    expected = json.loads((tmp_path / "one" / "predictions.json").read_text())
    _assert_same_detections(json.loads((tmp_path / "two" / "predictions.json").read_text()), expected)


def test_a_stopped_tiled_run_resumes_from_its_last_unit(predict_inputs, large_image, tmp_path):
    """Tile parts cut part way, the last line torn, as a kill leaves them: `--resume` keeps the
    units done (their detections are taken from the parts, not predicted again), does the
    others once, and gives the straight run's detections."""
    weights, _ = predict_inputs
    _shared_tiles(weights, large_image, tmp_path / "straight")
    straight = tile_units(tmp_path / "straight")
    stopped = tmp_path / "stopped"
    (stopped / "parts").mkdir(parents=True)
    for name, lines in straight.items():
        kept = [json.dumps(u) + "\n" for u in lines[:3]]
        (stopped / "parts" / name).write_text("".join(kept) + kept[-1][:40])
    _shared_tiles(weights, large_image, stopped, resume=True)
    resumed = tile_units(stopped)
    for name, lines in straight.items():
        assert [u["unit"] for u in resumed[name]] == [u["unit"] for u in lines]  # each unit once
        assert resumed[name][:3] == lines[:3]
    expected = json.loads((tmp_path / "straight" / "predictions.json").read_text())
    _assert_same_detections(json.loads((stopped / "predictions.json").read_text()), expected)


def test_many_images_on_tiles_go_block_by_block(predict_inputs, tmp_path, capsys):
    """Ten images on tiles, and a damaged one, by two processes: blocks of four images a
    process, each image's units shared and merged by its owner; the detections of one process,
    and the damaged file reported once."""
    from retinanet import load_model
    from retinanet.engine.predict import predict_files

    weights, folder = predict_inputs
    assert cli([*predict_args(weights, folder, tmp_path / "one"), "--tile", "64"]) == 1
    capsys.readouterr()
    model = load_model(weights)
    tiling = {"tile": 64, "overlap": 0.2, "merge": "nms", "full_image": False}
    as_two_processes(lambda shard: predict_files(model, [folder], tmp_path / "two", draw=False, workers=0,
                                                 progress=False, batch_size=1, tiling=tiling, shard=shard))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "zz_damaged.jpg" in errors[0]
    got, expected = (json.loads((tmp_path / run / "predictions.json").read_text()) for run in ("two", "one"))
    assert [r["file_name"] for r in got] == [r["file_name"] for r in expected]
    for name in {r["file_name"] for r in expected}:
        _assert_same_detections([r for r in got if r["file_name"] == name],
                                [r for r in expected if r["file_name"] == name])


@pytest.mark.slow
def test_torchrun_shares_the_tiles_of_one_image(predict_inputs, large_image, tmp_path):
    """`torchrun --nproc-per-node 2 -m retinanet.cli predict IMAGE --tile 128`: both processes
    work on the one image, and predictions.json holds one process's detections."""
    weights, _ = predict_inputs
    assert cli(tiled_args(weights, large_image, tmp_path / "one")) == 0
    out = tmp_path / "two"
    proc = launch([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "retinanet.cli",
                   *tiled_args(weights, large_image, out)], tmp_path, tmp_path / "run.log")
    finish([proc], timeout=300)
    assert proc.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert sorted(tile_units(out)) == ["tiles-rank00000-of-00002.jsonl", "tiles-rank00001-of-00002.jsonl"]
    assert all(tile_units(out).values())
    expected = json.loads((tmp_path / "one" / "predictions.json").read_text())
    _assert_same_detections(json.loads((out / "predictions.json").read_text()), expected)
