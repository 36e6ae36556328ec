"""Test-time augmentation on a trained model's validation set: COCO AP and prediction time of
each `eval.tta` setting against none, in one process on the same loaded model. The time is that
of prediction alone (`predict_dataset`: decoding, network, merging), not of the COCO scoring.

    python benchmarks/bench_tta.py WEIGHTS CONFIG [SIZE,SIZE ...]

A setting here equals `retinanet eval --weights WEIGHTS --config CONFIG eval.tta.flip=true
eval.tta.sizes=[...] eval.tta.merge=wbf` (the same `evaluate` path, without the plots).
"""

import sys
import time

import torch

from retinanet.checkpoint import load_model
from retinanet.config import TTAConfig, load_config
from retinanet.data.formats import open_dataset
from retinanet.engine.evaluate import coco_metrics, predict_dataset
from retinanet.engine.tta import build_tta


def main(weights: str, config_path: str, size_sets: list[list[int]]) -> None:
    cfg = load_config(config_path)
    model = load_model(weights).optimize_for_inference()  # as `retinanet eval` runs it
    dataset = open_dataset(cfg.data, "val", model.class_names)
    gt = dataset.coco_ground_truth()
    ids = [record.image_id for record in dataset.records]
    settings = [TTAConfig()] + [TTAConfig(flip=True, merge=m) for m in ("nms", "wbf")]
    for sizes in size_sets:
        settings += [TTAConfig(sizes=sizes, merge=m) for m in ("nms", "wbf")]
        settings += [TTAConfig(flip=True, sizes=sizes, merge=m) for m in ("nms", "wbf")]
    settings.append(TTAConfig())  # none again: how much the machine's speed drifted meanwhile
    print(f"{len(dataset)} images, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| eval.tta | views | AP | AP50 | AP75 | APs / APm / APl | prediction s (wall) | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for tta_config in settings:
        tta = build_tta(tta_config, model)
        wall, cpu = time.perf_counter(), time.process_time()
        results, _ = predict_dataset(model, dataset, cfg.eval.batch_size, 0, tta=tta)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        m = coco_metrics(gt, results, ids, dataset.class_names, verbose=False)
        name = "off" if tta is None else f"flip={tta_config.flip} sizes={tta_config.sizes} merge={tta_config.merge}"
        views = 1 if tta is None else tta.num_views(model.preprocessor.test_min_size)
        print(f"| {name} | {views} | {m['AP']:.3f} | {m['AP50']:.3f} | {m['AP75']:.3f} | "
              f"{m['APs']:.3f} / {m['APm']:.3f} / {m['APl']:.3f} | {wall:.1f} | {cpu:.1f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [[int(s) for s in arg.split(",")] for arg in sys.argv[3:]])
