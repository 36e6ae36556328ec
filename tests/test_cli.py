"""The command line as a user meets it: convert torchvision weights, predict on a photo."""

import json
import os
import subprocess
import sys

import pytest
import torch

from retinanet.cli import main as cli


@pytest.fixture(scope="module")
def converted(converted_torchvision):
    return converted_torchvision


@pytest.mark.slow
def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "retinanet.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("train", "eval", "predict", "convert", "demo", "check-data"):
        assert command in out.stdout
    out = subprocess.run([sys.executable, "-m", "retinanet.cli", "convert", "--help"], capture_output=True, text=True)
    assert all(s in out.stdout for s in ("torchvision", "detectron2", "paddle", "--trust"))


def test_predict_on_a_photo_writes_json_and_drawing(converted, photo_path, tmp_path, capsys):
    code = cli(["predict", "--weights", str(converted), str(photo_path), "--output-dir", str(tmp_path),
                "--score-threshold", "0.2"])
    assert code == 0
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert len(preds) > 0
    assert all(p["score"] > 0.2 and p["file_name"] == str(photo_path) for p in preds)
    # torchvision's 91 outputs are indexed by COCO category id
    assert all(0 <= p["category_id"] <= 90 for p in preds)
    x, y, w, h = preds[0]["bbox"]
    assert 0 <= x and 0 <= y and x + w <= 600.01 and y + h <= 400.01  # original image pixels (600x400)
    assert (tmp_path / "coffee.jpg").stat().st_size > 10_000


def test_bad_files_get_one_line_each_and_the_rest_is_processed(converted, photo_path, tmp_path, capsys):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is text")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photo_path.read_bytes()[:3000])
    missing = tmp_path / "missing.jpg"
    out_dir = tmp_path / "out"
    code = cli(["predict", "--weights", str(converted), str(missing), str(not_image), str(photo_path),
                str(truncated), "--output-dir", str(out_dir), "--no-draw"])
    # one line per bad file; the untrained model also fills the detection cap, which is a note
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert code == 1
    assert len(err) == 3
    assert f"{missing}: file not found" in err[0]
    assert f"{not_image}: not an image" in err[1]
    assert f"{truncated}: damaged or truncated" in err[2]
    preds = json.loads((out_dir / "predictions.json").read_text())
    assert preds and {p["file_name"] for p in preds} == {str(photo_path)}


def test_predict_with_a_non_checkpoint_is_one_clear_error(tmp_path, capsys, photo_path):
    (tmp_path / "x.pt").write_text("garbage")
    assert cli(["predict", "--weights", str(tmp_path / "x.pt"), str(photo_path), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "x.pt" in err and "Traceback" not in err


@pytest.mark.slow
def test_bench_compares_with_torchvision_in_one_run(tmp_path):
    """The benchmark's pieces at a small size: both libraries timed on the same inputs, the
    ratio and the floor reported, the markdown table written."""

    from retinanet.engine.bench import bench_inference, bench_training, markdown_table, peak_gflops

    device = torch.device("cpu")
    peaks = peak_gflops(device)
    assert peaks["matmul"] > 0 and peaks["conv3x3"] > 0
    inference = bench_inference(2, (128, 192), 1, device)
    assert set(inference["seconds"]) == {"torchvision", "ours", "ours_optimized"}
    assert inference["network_gflop"] > 0 and set(inference["ours_stages_seconds"]) == {
        "preprocess", "backbone", "fpn", "head", "postprocess"}
    assert inference["ratio_vs_torchvision"] == round(
        inference["seconds"]["torchvision"] / inference["seconds"]["ours_optimized"], 3)
    assert all(inference["images_per_second"][k] == round(2 / v, 3) for k, v in inference["seconds"].items())
    training = bench_training(2, (128, 192), 1, device)
    assert set(training["seconds"]) == {"torchvision", "ours"} and min(training["seconds"].values()) > 0
    assert training["ratio_vs_torchvision"] == round(training["seconds"]["torchvision"] / training["seconds"]["ours"], 3)
    results = {"date": "today", "device": "cpu", "peaks": peaks, "cases": [inference, training],
               "machine": {"cpu": "x", "cpu_flags": ["avx2"], "threads": 2, "torch": torch.__version__}}
    table = markdown_table(results, "retinanet bench")
    assert "| inference batch 2 at 128x192 |" in table and "speed-up vs torchvision" in table


def test_bench_trains_the_same_backbone_parameters_in_both_libraries():
    """The training case compares like with like: torchvision as it is released (frozen BN,
    stem and res2 frozen) trains exactly the backbone parameters ours trains, and all of both
    heads; no BatchNorm computes batch statistics in either."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from retinanet.engine.bench import _models

    tv, ours, _, _ = _models(torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in tv.modules())
    assert isinstance(tv.backbone.body.layer2[0].bn1, FrozenBatchNorm2d)
    trained = lambda module: {n for n, p in module.named_parameters() if p.requires_grad}  # noqa: E731
    assert trained(tv.backbone.body) == trained(ours.backbone) and "layer1.0.conv1.weight" not in trained(ours.backbone)
    assert all(p.requires_grad for p in tv.head.parameters()) and all(p.requires_grad for p in ours.head.parameters())


def test_bench_command_runs_end_to_end_and_appends_its_table(tmp_path):
    """`retinanet bench` as a user runs it (here with a case filter that selects no case, so
    that only the peak measurements run): it writes bench.json and appends the table with
    the command's flags."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    assert cli(["bench", "--quick", "--only", "no such case", "--cuda-graphs", "--output-dir", str(tmp_path / "b"),
                "--append-results", str(results)]) == 0
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert report["cases"] == [] and report["peaks"]["conv3x3"] > 0
    text = results.read_text()
    assert text.startswith("# earlier results\n") and "--cuda-graphs" in text


def test_bench_says_when_the_kernels_were_capped_below_the_cpu():
    """Timings with AVX2 kernels forced on an AVX-512 CPU (how the AVX2-only machines are
    approximated) must say so in the table; an uncapped run says nothing."""
    from retinanet.engine.bench import _kernels

    avx512 = ["avx2", "avx512f"]
    capped = {"cpu_flags": avx512, "kernels": {"aten": "AVX2", "onednn_max": "AVX2"}}
    assert _kernels(capped) == "; kernels capped: ATen AVX2, oneDNN at most AVX2"
    capped["kernels"]["openvino_max"] = "AVX2"
    assert _kernels(capped) == "; kernels capped: ATen AVX2, oneDNN at most AVX2, OpenVINO at most AVX2"
    assert _kernels({"cpu_flags": avx512, "kernels": {"aten": "AVX512", "onednn_max": ""}}) == ""
    assert _kernels({"cpu_flags": ["avx2"], "kernels": {"aten": "AVX2", "onednn_max": ""}}) == ""  # AVX2-only CPU
    # machine() reads the caps from the environment the run was given
    script = "from retinanet.engine.bench import machine; print(machine()['kernels'])"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OV_CPU_MAX_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "{'aten': 'AVX2', 'onednn_max': 'AVX2', 'openvino_max': 'AVX2'}"


@pytest.mark.parametrize("kind", ["yolo", "csv"])
def test_predict_writes_one_label_file_per_image(converted, photo_path, tmp_path, kind):
    out = tmp_path / "out"
    assert cli(["predict", "--weights", str(converted), str(photo_path), "--output-dir", str(out),
                "--score-threshold", "0.3", "--save-txt", kind, "--no-draw", "--workers", "0"]) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    lines = (out / "labels" / f"coffee.{'txt' if kind == 'yolo' else 'csv'}").read_text().splitlines()
    assert len(lines) == len(predictions) > 0
    first = predictions[0]
    if kind == "yolo":
        label, cx, cy, w, h, score = lines[0].split()
        x, y, bw, bh = first["bbox"]
        assert abs(float(cx) * 600 - (x + bw / 2)) < 0.01 and abs(float(h) * 400 - bh) < 0.01
    else:
        x0, y0, x1, y1, score, name = lines[0].split(",")
        assert name == first["category_name"] and abs(float(x0) - first["bbox"][0]) < 0.01
    assert abs(float(score) - first["score"]) < 1e-4


def test_bench_runs_on_a_plain_install_writes_only_its_outputs_and_runs_no_git(tmp_path, monkeypatch):
    """`retinanet bench --quick` with scikit-image absent (it is only in the test extra) and git
    forbidden: its case runs (shrunk here to 64x96 so that the test is quick),
    bench.json and the table land in the given places, the table names the package version."""
    import retinanet
    import retinanet.engine.bench as bench

    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage -> ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)

    popen = subprocess.Popen

    def no_git(command, *args, **kwargs):
        assert "git" not in str(command), f"bench ran {command}"
        return popen(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", no_git)
    full_size = bench.bench_inference
    monkeypatch.setattr(bench, "bench_inference", lambda batch, size, *a, **k: full_size(batch, (64, 96), *a, **k))
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "mine.md"
    assert cli(["bench", "--quick", "--output-dir", "out", "--append-results", str(log)]) == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [c["case"] for c in report["cases"]] == ["inference batch 1 at 64x96"]
    assert report["version"] == retinanet.__version__
    assert f"(retinanet {retinanet.__version__})" in log.read_text() and "commit" not in log.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.md", "out"]
