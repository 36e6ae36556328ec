import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from retinanet.model.box_coding import BoxCoder


def random_boxes(n, scale=500.0):
    xy = torch.rand(n, 2) * scale
    wh = torch.rand(n, 2) * scale / 2 + 2
    return torch.cat([xy, xy + wh], dim=1)


def test_round_trip():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchors, boxes = random_boxes(200), random_boxes(200)
    assert torch.allclose(coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=1e-3)


def test_identity_box_encodes_to_zero():
    coder = BoxCoder()
    anchors = random_boxes(10)
    assert torch.allclose(coder.encode(anchors, anchors), torch.zeros(10, 4), atol=1e-6)


def test_hand_example():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    box = torch.tensor([[5.0, 0.0, 15.0, 40.0]])  # centre moves (+5, +10), height doubles
    d = coder.encode(box, anchor)
    assert torch.allclose(d, torch.tensor([[0.5, 0.5, 0.0, torch.log(torch.tensor(2.0))]]))


def test_clamp_limits_scale():
    coder = BoxCoder(scale_clamp=1.0)
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    out = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), anchor)
    w = out[0, 2] - out[0, 0]
    assert torch.isclose(w, 10 * torch.exp(torch.tensor(1.0)))


def test_batched_leading_dims():
    coder = BoxCoder()
    anchors, boxes = random_boxes(12).view(3, 4, 4), random_boxes(12).view(3, 4, 4)
    assert coder.encode(boxes, anchors).shape == (3, 4, 4)


def test_equals_torchvision_box_coder():
    ours, tv = BoxCoder((1.0, 1.0, 1.0, 1.0)), TVBoxCoder((1.0, 1.0, 1.0, 1.0))
    anchors, boxes = random_boxes(100), random_boxes(100)
    assert torch.allclose(ours.encode(boxes, anchors), tv.encode_single(boxes, anchors), atol=1e-6)
    deltas = torch.randn(100, 4)
    assert torch.allclose(ours.decode(deltas, anchors), tv.decode_single(deltas, anchors), atol=1e-4)
