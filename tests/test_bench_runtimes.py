"""`retinanet bench`'s deployed runtimes: every runtime a CPU user deploys on, timed on the same
images and weights, with its floor and how far its detections agree with ours in PyTorch; a
runtime whose package is missing is left out with the line that says how to get it."""

import math

import numpy as np
import pytest
import torch

from retinanet.engine.evaluate import agreement_ap

from helpers import require_peer

RUNTIMES = {"torchvision", "ours", "ours_optimized", "ours_onnxruntime", "ours_openvino_fp32", "ours_openvino_int8",
            "torchvision_onnxruntime"}


def _detections(boxes, scores, labels) -> dict:
    return {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4), "scores": np.array(scores, dtype=np.float32),
            "labels": np.array(labels)}


def test_agreement_is_one_for_the_same_detections_and_falls_as_they_move():
    reference = [_detections([[0, 0, 10, 10], [20, 20, 40, 50]], [0.9, 0.4], [1, 3]), _detections([], [], [])]
    assert agreement_ap(reference, reference) == pytest.approx(1.0)
    shifted = [_detections([[0, 0, 10, 15], [20, 20, 40, 50]], [0.9, 0.4], [1, 3]), reference[1]]
    assert 0.5 < agreement_ap(reference, shifted) < 0.9  # one box of two moved to IoU 0.67
    relabelled = [_detections([[0, 0, 10, 10], [20, 20, 40, 50]], [0.9, 0.4], [2, 3]), reference[1]]
    assert agreement_ap(reference, relabelled) < 0.6
    # the one box left as truth, moved to IoU 2/3: matched at 4 of COCO's 10 IoU thresholds (0.5-0.65)
    assert agreement_ap(reference, shifted, min_score=0.5) == pytest.approx(0.4)
    assert math.isnan(agreement_ap(reference, reference, min_score=0.95))  # no truth at all
    with pytest.raises(ValueError):
        agreement_ap(reference, reference[:1])


@pytest.mark.slow
def test_every_runtime_side_by_side(tmp_path):
    """torchvision's R-50-FPN (random weights) and ours converted from it, at a small size: the
    exported fp32 runtimes give ours' detections, INT8 is faster than fp32 OpenVINO per FLOP
    (its measured peak), and the table has a row for each runtime."""
    require_peer("onnxruntime", "pip install 'retinanet[export]' (the test extra)")
    require_peer("openvino", "pip install 'retinanet[openvino]' (the test extra)")
    from retinanet.engine.bench import markdown_table
    from retinanet.engine.bench_runtimes import bench_runtimes

    case = bench_runtimes(2, (128, 192), 1, calibration_images=2, work=tmp_path)
    assert set(case["seconds"]) == RUNTIMES and not case["skipped"]
    assert list(tmp_path.iterdir()) == []  # the exports are removed
    for name in ("ours", "ours_onnxruntime", "ours_openvino_fp32", "torchvision", "torchvision_onnxruntime"):
        assert case["agreement_ap_vs_ours"][name] > 0.99, name
    assert 0 < case["agreement_ap_vs_ours"]["ours_openvino_int8"] <= 1
    peaks = case["conv3x3_peak_gflops"]
    assert case["floor_seconds"]["ours_openvino_int8"] == round(case["network_gflop"] / peaks["int8"], 3)
    assert case["ratio_vs_torchvision"]["torchvision"] == 1.0
    assert set(case["export_seconds"]) == RUNTIMES - {"torchvision", "ours", "ours_optimized"}
    results = {"date": "today", "device": "cpu", "peaks": {"matmul": 1.0, "conv3x3": 1.0}, "cases": [case],
               "machine": {"cpu": "x", "cpu_flags": ["avx2"], "threads": 2, "torch": torch.__version__}}
    table = markdown_table(results, "retinanet bench --only deployed")
    assert all(f"| {name} | " in table for name in RUNTIMES)


def test_a_runtime_without_its_package_is_left_out_saying_how_to_get_it(monkeypatch):
    import importlib.util

    from retinanet.engine import bench_runtimes

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    assert bench_runtimes.missing_packages("ours_openvino_int8") == "needs nncf (pip install 'retinanet[openvino]')"
    assert bench_runtimes.missing_packages("ours_openvino_fp32") is None
    case = {"case": "c", "seconds": {"torchvision": 1.0}, "images_per_second": {"torchvision": 1.0},
            "ratio_vs_torchvision": {"torchvision": 1.0}, "floor_seconds": {"torchvision": 0.1},
            "agreement_ap_vs_ours": {"torchvision": 1.0}, "export_seconds": {},
            "skipped": {"ours_openvino_int8": bench_runtimes.missing_packages("ours_openvino_int8")}}
    assert "| ours_openvino_int8 | left out: needs nncf (pip install 'retinanet[openvino]') |" in \
        bench_runtimes.runtimes_table(case)
