"""Parity with torchvision's RetinaNet (the peer library, installed in the test environment).

torchvision's model is built with random weights (no download), its classification bias
shifted to 0 so that there are hundreds of detections, its BatchNorm layers replaced by
FrozenBatchNorm2d as torchvision does for trained models. Its state dict goes through our
converter; both models then run on the same photograph.
"""

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet.convert.torchvision import convert_torchvision
from retinanet.data.image_io import read_image
from retinanet.model.build import build_retinanet

from helpers import assert_same_detections


def _freeze_bn(module):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key))
            setattr(module, name, frozen)
        else:
            _freeze_bn(child)


def _torchvision_model(ctor):
    torch.manual_seed(0)
    tv = ctor(weights=None, weights_backbone=None)
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.zero_()
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    _freeze_bn(tv)
    return tv


@pytest.fixture(scope="module", params=[retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2], ids=["v1", "v2"])
def pair(request):
    tv = _torchvision_model(request.param)
    config, state = convert_torchvision(tv.state_dict())
    ours = build_retinanet(config)
    ours.load_state_dict(state)
    return tv, ours


def test_identical_detections(pair, photo_path):
    tv, ours = pair
    image = read_image(photo_path).float() / 255
    tv.eval(), ours.eval()
    with torch.no_grad():
        expected = tv([image])[0]
        got = ours([image])[0]
    assert len(expected["boxes"]) > 100
    # Order-free matching at the same tolerances: on random weights, detections of one class
    # share scores to 1e-7 and an ulp in a BatchNorm scale may swap their rows.
    assert_same_detections(got, expected, box_tol=1e-2, score_tol=1e-4)


def test_optimized_inference_keeps_the_detections(pair, photo_path):
    """BatchNorm folded into the convolutions and channels-last memory: torchvision's
    detections within the parity tolerances; training such a model is refused."""
    tv, ours = pair
    config, state = convert_torchvision(tv.state_dict())
    fast = build_retinanet(config)
    fast.load_state_dict(state)
    fast.optimize_for_inference()
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    image = read_image(photo_path).float() / 255
    tv.eval()
    with torch.no_grad():
        expected = tv([image])[0]
        got = fast([image])[0]
    assert len(got["boxes"]) > 100
    assert_same_detections(got, expected, box_tol=1e-2, score_tol=1e-4)
    with pytest.raises(RuntimeError, match="optimized for inference"):
        fast.train()


def test_identical_training_losses_at_batch_2(pair, photo_path):
    """Two images of different sizes and box counts: torchvision normalises each image by its
    own foreground count (per-image normalisation), which batch 1 cannot distinguish."""
    tv, ours = pair
    image = read_image(photo_path).float() / 255
    images = [image, image[:, 40:360, 100:420].flip(-1).contiguous()]  # 400x600 and 320x320
    targets = [{"boxes": torch.tensor([[100.0, 80, 300, 250], [350, 100, 580, 390], [10, 10, 40, 60]]),
                "labels": torch.tensor([1, 5, 17])},
               {"boxes": torch.tensor([[20.0, 30, 200, 290]]), "labels": torch.tensor([44])}]
    tv.train(), ours.train()
    expected = tv(images, targets)
    got = ours(images, targets)
    assert torch.allclose(got["loss_cls"], expected["classification"], rtol=1e-4)
    assert torch.allclose(got["loss_box"], expected["bbox_regression"], rtol=1e-4)
    # and the gradients flow the same way into the shared backbone
    (got["loss_cls"] + got["loss_box"]).backward()
    (expected["classification"] + expected["bbox_regression"]).backward()
    a, b = ours.backbone.layer4[0].conv1.weight.grad, tv.backbone.body.layer4[0].conv1.weight.grad
    assert b.norm() > 0 and ((a - b).norm() / b.norm()).item() < 1e-4


def test_converter_rejects_other_models():
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from retinanet.convert.common import ConversionError

    state = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    with pytest.raises(ConversionError, match="not a torchvision RetinaNet"):
        convert_torchvision(state)


def test_new_class_count_keeps_everything_but_the_class_predictor(pair):
    tv, _ = pair
    config, state = convert_torchvision(tv.state_dict(), num_classes=3)
    model = build_retinanet(config)
    model.load_state_dict(state)
    assert config.num_classes == 3 and model.head.cls_score.out_channels == 27
    assert torch.equal(state["head.bbox_pred.weight"], model.head.bbox_pred.weight)
