"""Parity with PaddleDetection's RetinaNet (paddledet 2.6 on paddlepaddle, CPU).

The peer is built in code with the reference configuration (the yml files are not in the
wheel), given random weights with the classification bias shifted so that detections
exist, saved as `.pdparams`, converted by `retinanet convert --from paddle`, and both models
run on the same photograph, pre-processed once (resize to 800/1333, ImageNet normalisation,
padding to 32) and fed to both.
"""

import warnings

import numpy as np
import pytest
import torch

from helpers import require_peer  # noqa: E402

paddle = require_peer("paddle", "pip install paddlepaddle==3.3.1 (see .ci/run)")
require_peer("ppdet", "pip install --no-deps paddledet==2.6.0 (see .ci/run)")

from retinanet.cli import main as cli  # noqa: E402
from retinanet.data.image_io import read_image  # noqa: E402
from retinanet import load_model  # noqa: E402


def build_paddle_retinanet():
    warnings.filterwarnings("ignore")
    from ppdet.modeling.architectures.retinanet import RetinaNet as PaddleRetinaNet
    from ppdet.modeling.assigners.max_iou_assigner import MaxIoUAssigner
    from ppdet.modeling.backbones.resnet import ResNet
    from ppdet.modeling.heads.retina_head import RetinaFeat, RetinaHead
    from ppdet.modeling.layers import MultiClassNMS
    from ppdet.modeling.losses.focal_loss import FocalLoss
    from ppdet.modeling.losses.smooth_l1_loss import SmoothL1Loss
    from ppdet.modeling.necks.fpn import FPN
    from ppdet.modeling.proposal_generator.anchor_generator import RetinaAnchorGenerator

    paddle.seed(0)
    backbone = ResNet(depth=50, variant="b", norm_type="bn", freeze_at=0, return_idx=[1, 2, 3], num_stages=4)
    neck = FPN(in_channels=[512, 1024, 2048], out_channel=256, spatial_scales=[0.125, 0.0625, 0.03125],
               has_extra_convs=True, extra_stage=2, use_c5=False)
    head = RetinaHead(
        num_classes=80,
        conv_feat=RetinaFeat(feat_in=256, feat_out=256, num_convs=4, norm_type=None, use_dcn=False),
        anchor_generator=RetinaAnchorGenerator(octave_base_scale=4, scales_per_octave=3,
                                               aspect_ratios=[0.5, 1.0, 2.0], strides=[8.0, 16.0, 32.0, 64.0, 128.0]),
        bbox_assigner=MaxIoUAssigner(positive_overlap=0.5, negative_overlap=0.4, allow_low_quality=True),
        loss_class=FocalLoss(alpha=0.25, gamma=2.0), loss_bbox=SmoothL1Loss(beta=0.0),
        nms=MultiClassNMS(score_threshold=0.05, nms_top_k=1000, keep_top_k=100, nms_threshold=0.5),
        nms_pre=1000)
    model = PaddleRetinaNet(backbone, neck, head)
    state = model.state_dict()
    rng = np.random.default_rng(0)
    for key, value in state.items():  # non-trivial BN statistics, detections above the threshold
        if key.endswith("_mean"):
            value.set_value(rng.uniform(-0.1, 0.1, value.shape).astype("float32"))
        elif key.endswith("_variance"):
            value.set_value(rng.uniform(0.5, 1.5, value.shape).astype("float32"))
    # random features are large: scale the predictors so that scores spread around the threshold
    # and boxes stay near their anchors, as in a trained model
    for layer in (model.head.retina_cls, model.head.retina_reg):
        layer.weight.set_value(layer.weight.numpy() * 0.02)
    model.head.retina_cls.bias.set_value(np.full([720], -2.5, dtype="float32"))
    model.eval()
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paddle")
    peer = build_paddle_retinanet()
    paddle.save(peer.state_dict(), str(folder / "retinanet.pdparams"))
    assert cli(["convert", "--from", "paddle", str(folder / "retinanet.pdparams"), str(folder / "ours.pt")]) == 0
    ours = load_model(folder / "ours.pt", optimize=False).eval()  # trained too, in the loss test
    return peer, ours


def test_head_outputs_and_detections_match(pair, photo_path):
    peer, ours = pair
    image = read_image(photo_path)
    batch, _ = ours.preprocessor([image])
    x = batch.tensor
    (h, w), (oh, ow) = batch.image_sizes[0], batch.original_sizes[0]

    with torch.no_grad():
        features = ours.fpn(ours.backbone(x))
        logits, deltas = ours.head(features)
        anchors = ours.anchor_generator([tuple(f.shape[-2:]) for f in features], tuple(x.shape[-2:]))
        got = ours.forward_inference(logits, deltas, anchors, batch)[0]

    px = paddle.to_tensor(x.numpy())
    with paddle.no_grad():
        cls_list, reg_list = peer.head(peer.neck(peer.backbone({"image": px})))
        out = peer({"image": px, "im_shape": paddle.to_tensor([[h, w]], dtype="float32"),
                    "scale_factor": paddle.to_tensor([[h / oh, w / ow]], dtype="float32")})

    for level, (pc, pr) in enumerate(zip(cls_list, reg_list)):
        pc = torch.from_numpy(pc.numpy()).permute(0, 2, 3, 1).reshape(1, -1, 80)
        pr = torch.from_numpy(pr.numpy()).permute(0, 2, 3, 1).reshape(1, -1, 4)
        assert torch.allclose(logits[level], pc, atol=1e-4, rtol=1e-4), f"class logits of level {level}"
        assert torch.allclose(deltas[level], pr, atol=1e-4, rtol=1e-4), f"box deltas of level {level}"

    expected = torch.from_numpy(out["bbox"].numpy())  # (M, 6): label, score, x0, y0, x1, y1
    assert int(out["bbox_num"].numpy()[0]) == len(expected) == len(got["scores"]) > 20
    # equal scores (ties) may come in either order: pair each detection with an equal one
    unused = list(range(len(expected)))
    for box, score, label in zip(got["boxes"], got["scores"], got["labels"]):
        match = next((j for j in unused if int(expected[j, 0]) == int(label)
                      and abs(float(expected[j, 1]) - float(score)) <= 1e-4
                      and (expected[j, 2:] - box).abs().max() <= 1e-2), None)
        assert match is not None, f"no PaddleDetection detection equals ours: {label}, {score}, {box}"
        unused.remove(match)
    assert torch.allclose(got["scores"], expected[:, 1].sort(descending=True).values, atol=1e-4, rtol=0)


def test_training_losses_match_at_batch_2(pair, photo_path):
    """PaddleDetection's RetinaHead.get_loss (MaxIoUAssigner with its low-quality rule, focal
    and L1 losses normalised by the batch's positives) on two images with different box
    counts, against our training forward on the same network input."""
    peer, ours = pair
    image = read_image(photo_path)
    images = [image, image[:, 40:360, 100:420].flip(-1).contiguous()]  # 400x600 and 320x320
    targets = [{"boxes": torch.tensor([[100.0, 80, 300, 250], [350, 100, 580, 390], [10, 10, 40, 60]]),
                "labels": torch.tensor([1, 5, 17])},
               {"boxes": torch.tensor([[20.0, 30, 200, 290]]), "labels": torch.tensor([44])}]
    batch, scaled = ours.preprocessor(images, targets, training=True, generator=torch.Generator().manual_seed(0))
    x = batch.tensor
    with torch.no_grad():
        logits, deltas, anchors = ours.run_network(x)
        got = ours.forward_training(logits, deltas, anchors, scaled)

    px = paddle.to_tensor(x.numpy())
    with paddle.no_grad():
        head_outputs = peer.head(peer.neck(peer.backbone({"image": px})))
        expected = peer.head.get_loss(head_outputs, {
            "gt_bbox": [paddle.to_tensor(t["boxes"].numpy()) for t in scaled],
            "gt_class": [paddle.to_tensor(t["labels"].numpy().astype("int32")[:, None]) for t in scaled]})
    loss_cls, loss_reg = float(expected["loss_cls"]), float(expected["loss_reg"])
    assert loss_cls > 0 and loss_reg > 0
    assert abs(float(got["loss_cls"]) - loss_cls) <= 1e-4 * loss_cls
    assert abs(float(got["loss_box"]) - loss_reg) <= 1e-4 * loss_reg
