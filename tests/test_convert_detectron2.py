"""detectron2 weights: detectron2 is not on PyPI, so its key layout is produced here by renaming
a torchvision-built model's weights, pickled the way its model zoo ships them."""

import pickle
import re

import numpy as np
import pytest
import torch
import torchvision

from retinanet.convert import convert_file
from retinanet.convert.common import ConversionError
from retinanet import load_model
from retinanet.model.detector import RetinaNet
from retinanet.model.fpn import FPN
from retinanet.model.head import RetinaNetHead

D2_STAGES = {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}


def to_detectron2_names(backbone_state, fpn_state, head_state, origin=None):
    """An independent forward mapping: torchvision ResNet / FPN / head names -> detectron2's.
    `origin` (when given) records, for each detectron2 key, the name of the slot it came from
    in a model of ours (our backbone is torchvision's ResNet, our FPN and head are those here)."""
    out = {}
    origin = {} if origin is None else origin
    for key, value in backbone_state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if key.startswith("conv1."):
            new = "backbone.bottom_up.stem.conv1." + key[6:]
        elif key.startswith("bn1."):
            new = "backbone.bottom_up.stem.conv1.norm." + key[4:]
        else:
            layer, block, name, param = re.match(r"(layer\d)\.(\d+)\.(.+)\.(\w+)$", key).groups()
            name = {"downsample.0": "shortcut", "downsample.1": "shortcut.norm"}.get(
                name, re.sub(r"^bn(\d)$", r"conv\1.norm", name))
            new = f"backbone.bottom_up.{D2_STAGES[layer]}.{block}.{name}.{param}"
        out[new], origin[new] = value, "backbone." + key
    for key, value in fpn_state.items():
        m = re.match(r"(lateral|output)_convs\.(\d)\.(\w+)$", key)
        new = f"backbone.fpn_{m.group(1)}{int(m.group(2)) + 3}.{m.group(3)}" if m else "backbone.top_block." + key
        out[new], origin[new] = value, "fpn." + key
    for key, value in head_state.items():
        out["head." + key], origin["head." + key] = value, "head." + key
    return out


@pytest.fixture
def d2_pickle(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    fpn = FPN([512, 1024, 2048], 256, "c5")
    head = RetinaNetHead(256, 9, 80)
    with torch.no_grad():  # every tensor distinct, so that a value arriving in the wrong slot shows
        for module in (resnet, fpn, head):
            for value in module.state_dict().values():
                if value.is_floating_point():
                    value.uniform_(0.5, 2)
    origin = {}
    state = to_detectron2_names(resnet.state_dict(), fpn.state_dict(), head.state_dict(), origin)
    state["pixel_mean"] = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    state["pixel_std"] = torch.tensor([1.0, 1.0, 1.0]).view(3, 1, 1)
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "Detectron2 Model Zoo"}, f)
    return path, state, origin


def test_every_tensor_lands_in_its_slot(d2_pickle, tmp_path):
    """By name and position: each detectron2 tensor is found exactly in the slot of ours it
    was made from, and every slot of ours is filled from one."""
    path, source, origin = d2_pickle
    convert_file("detectron2", path, tmp_path / "ours.pt")
    ours = load_model(tmp_path / "ours.pt", optimize=False).state_dict()
    for key, slot in origin.items():
        assert torch.equal(ours[slot], source[key].float()), f"{key} did not land in {slot}"
    unfilled = {k for k in ours if k not in set(origin.values())}
    assert all(k.endswith("num_batches_tracked") or k.startswith("loss.") for k in unfilled), unfilled


def test_anchors_follow_detectron2s_formula():
    """detectron2's DefaultAnchorGenerator with offset 0: size-major cells centred on
    (i * stride, j * stride); aspect ratio = h / w; area = size^2. Hand-computed for P3."""
    import math

    from retinanet.convert.detectron2 import detectron2_config

    model = RetinaNet.from_config(detectron2_config(50, 80, "c5"))
    level0 = model.anchor_generator([(2, 2)] * 5, (256, 256))[0]
    sizes = [32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)]
    expected_cell = []
    for size in sizes:  # size-major, as generate_cell_anchors loops
        for ratio in (0.5, 1.0, 2.0):
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            expected_cell.append([-w / 2, -h / 2, w / 2, h / 2])
    expected_cell = torch.tensor(expected_cell)
    assert torch.allclose(level0[:9], expected_cell, atol=1e-4)  # location (x=0, y=0)
    assert torch.allclose(level0[9:18], expected_cell + torch.tensor([8.0, 0, 8, 0]), atol=1e-4)  # (x=1, y=0)
    assert torch.allclose(level0[18:27], expected_cell + torch.tensor([0.0, 8, 0, 8]), atol=1e-4)  # (x=0, y=1)
    assert torch.allclose(level0[1], torch.tensor([-16.0, -16, 16, 16]))  # size 32, ratio 1


def test_detectron2_training_settings_come_from_base_retinanet():
    from retinanet.convert.detectron2 import detectron2_config

    config = detectron2_config(50, 80, "c5")
    # Base-RetinaNet.yaml: SMOOTH_L1_LOSS_BETA 0.0 (an L1 loss), not defaults.py's 0.1
    assert config.loss.box_loss == "smooth_l1" and config.loss.smooth_l1_beta == 0.0
    assert (config.loss.normalization, config.loss.ema_momentum, config.loss.ema_initial) == ("ema", 0.9, 100.0)
    assert config.inference.clip_boxes == "after_nms"  # NMS on unclipped boxes, clip in detector_postprocess


def test_every_key_consumed_and_every_parameter_filled(d2_pickle, tmp_path):
    path, source, _ = d2_pickle
    config = convert_file("detectron2", path, tmp_path / "ours.pt")
    assert config.backbone.stride_in_1x1 and config.input.channel_order == "BGR"
    assert config.input.pixel_scale == 255.0 and config.loss.normalization == "ema"
    assert config.fpn.p6_source == "c5" and config.class_names[0] == "person" and config.category_ids[-1] == 90
    model = load_model(tmp_path / "ours.pt", optimize=False)
    ours = model.state_dict()
    consumed = {}
    for key, value in source.items():
        if key in ("pixel_mean", "pixel_std") or key.endswith("num_batches_tracked"):
            continue
        matches = [k for k, v in ours.items() if v.shape == value.shape and torch.equal(v, value.float())]
        assert matches, f"{key} did not arrive"
        consumed[key] = matches
    params = {n for n, _ in model.named_parameters()}
    filled = {k for ks in consumed.values() for k in ks}
    assert params <= filled | {n for n in params if n.startswith("loss.")}
    assert model.backbone.layer2[0].conv1.stride == (2, 2)  # MSRA: stride on the 1x1


def test_unknown_keys_are_an_error(d2_pickle, tmp_path):
    path, source, _ = d2_pickle
    state = {k: v.numpy() for k, v in source.items()}
    state["head.extra_conv.weight"] = np.zeros(3, dtype=np.float32)
    with open(path, "wb") as f:
        pickle.dump({"model": state}, f)
    with pytest.raises(ConversionError, match="does not use"):
        convert_file("detectron2", path, tmp_path / "x.pt")


def test_two_stage_detector_is_refused(tmp_path):
    path = tmp_path / "faster.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.bottom_up.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
                               "roi_heads.box_predictor.cls_score.weight": np.zeros((81, 1024), np.float32)}}, f)
    with pytest.raises(ConversionError, match="two-stage"):
        convert_file("detectron2", path, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_fewer_classes_keep_backbone_and_fpn(d2_pickle, tmp_path):
    path, source, _ = d2_pickle
    config = convert_file("detectron2", path, tmp_path / "ours.pt", num_classes=3)
    model = load_model(tmp_path / "ours.pt")
    assert config.num_classes == 3 and model.head.cls_score.out_channels == 27
    assert torch.equal(model.fpn.p6.weight, source["backbone.top_block.p6.weight"])


class _Exploit:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('PWNED').write_text('x')",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": _Exploit()}}, f)
    with pytest.raises(ConversionError, match="refused to load builtins.eval.*--trust"):
        convert_file("detectron2", path, tmp_path / "x.pt")
    assert not (tmp_path / "PWNED").exists()


def test_bgr_255_preprocessing():
    from retinanet.model.preprocess import Preprocessor

    pre = Preprocessor([8], 8, 8, [103.53, 116.28, 123.675], [1.0, 1.0, 1.0], pixel_scale=255.0,
                       channel_order="BGR", size_divisibility=1, resize=False)
    image = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    batch, _ = pre([image])
    expected = image.flip(0).float() - torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    assert torch.allclose(batch.tensor[0], expected)
    batch, _ = pre([image.float() / 255])
    assert torch.allclose(batch.tensor[0], expected, atol=1e-4)
