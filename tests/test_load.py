"""Evaluation and prediction hold memory flat over thousands of images."""

import resource

import torch

from retinanet import ModelConfig, RetinaNet
from retinanet.data.coco import CocoDetection
from retinanet.data.synthetic import generate_dataset
from retinanet.engine.evaluate import predict_dataset


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_memory_stays_flat_over_thousands_of_images(tmp_path):
    paths = generate_dataset(tmp_path, num_train=0, num_val=3000, image_size=64, seed=5, max_objects=2,
                             min_size=12, max_size=40)
    dataset = CocoDetection(paths["val_images"], paths["val_annotations"])
    cfg = ModelConfig(num_classes=5)
    cfg.backbone.depth = 18
    cfg.fpn.out_channels = 16
    cfg.head.num_convs = 1
    cfg.input.train_min_sizes, cfg.input.test_min_size, cfg.input.max_size = [64], 64, 64
    cfg.inference.detections_per_image = 2
    model = RetinaNet.from_config(cfg).eval()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(-2.0)  # every image yields detections: real post-processing work

    predict_dataset(model, dataset, batch_size=16, max_images=500)  # warm up allocators
    rss_start = _rss_mb()
    results, skipped = predict_dataset(model, dataset, batch_size=16, max_images=3000)
    rss_end = _rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nRSS {rss_start:.0f} MB -> {rss_end:.0f} MB over 3000 images ({len(results)} detections), "
          f"peak {peak:.0f} MB")
    assert not skipped and len(results) > 3000
    # the results themselves take ~1 KB each; anything beyond that would be a leak
    assert rss_end - rss_start < 60 + len(results) * 1.5 / 1024
