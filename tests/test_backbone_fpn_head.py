import math

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet.model.backbone import ResNetBackbone
from retinanet.model.fpn import FPN
from retinanet.model.head import RetinaNetHead


def test_frozen_bn_equals_batchnorm_in_eval_mode():
    bn = nn.BatchNorm2d(8)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    x = torch.randn(2, 8, 5, 5)
    assert torch.allclose(bn.eval()(x), frozen(x), atol=1e-5)
    frozen.train()
    assert torch.allclose(bn(x), frozen(x), atol=1e-5)  # training mode changes nothing


@pytest.mark.parametrize("depth,channels", [(18, [128, 256, 512]), (50, [512, 1024, 2048])])
def test_backbone_outputs_c3_c5(depth, channels):
    bb = ResNetBackbone(depth)
    c3, c4, c5 = bb(torch.zeros(1, 3, 64, 96))
    assert bb.out_channels == channels
    assert [t.shape[1] for t in (c3, c4, c5)] == channels
    assert [t.shape[-2:] for t in (c3, c4, c5)] == [(8, 12), (4, 6), (2, 3)]
    assert all(isinstance(m, FrozenBatchNorm2d) for m in bb.modules() if "BatchNorm" in type(m).__name__)


@pytest.mark.parametrize("depth,stride_in_1x1", [(18, False), (50, False), (50, True)])
def test_frozen_bn_folded_into_the_convolutions_is_the_same_function_with_the_same_gradients(depth, stride_in_1x1):
    """The backbone applies each FrozenBatchNorm as its convolution's weight scale and bias;
    the modules' own forwards (conv, then BN) are the reference (float64)."""
    torch.manual_seed(0)
    bb = ResNetBackbone(depth, stride_in_1x1=stride_in_1x1).double().train()
    for bn in bb.modules():
        if isinstance(bn, FrozenBatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)

    def reference(x):
        x = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
        outputs = []
        for stage in (bb.layer1, bb.layer2, bb.layer3, bb.layer4):
            x = stage(x)
            outputs.append(x)
        return outputs[1:]

    x = torch.randn(2, 3, 70, 90, dtype=torch.float64)
    trainable = [p for p in bb.parameters() if p.requires_grad]
    folded, expected = bb(x), reference(x)
    weights = [torch.randn_like(e) for e in expected]
    grads = torch.autograd.grad(sum((f * w).sum() for f, w in zip(folded, weights)), trainable)
    expected_grads = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)), trainable)
    for f, e in zip(folded, expected):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-10)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_freeze_at_two_freezes_stem_and_res2_only():
    bb = ResNetBackbone(18, freeze_at=2)
    frozen = {n.split(".")[0] for n, p in bb.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in bb.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "layer1"} and trainable == {"layer2", "layer3", "layer4"}


def test_trainable_bn_in_frozen_stage_keeps_its_statistics():
    bb = ResNetBackbone(18, norm="bn", freeze_at=2)
    bb.train()
    before = bb.layer1[0].bn1.running_mean.clone()
    bb(torch.randn(2, 3, 64, 64))
    assert torch.equal(bb.layer1[0].bn1.running_mean, before)
    assert not bb.layer1[0].bn1.training and bb.layer2[0].bn1.training


def test_stride_in_1x1_moves_the_stride_but_keeps_shapes():
    bb = ResNetBackbone(50, stride_in_1x1=True)
    assert bb.layer2[0].conv1.stride == (2, 2) and bb.layer2[0].conv2.stride == (1, 1)
    assert [t.shape[-1] for t in bb(torch.zeros(1, 3, 64, 64))] == [8, 4, 2]
    with pytest.raises(ValueError):
        ResNetBackbone(18, stride_in_1x1=True)


def test_fpn_levels_and_p6_source():
    feats = [torch.randn(1, 128, 16, 16), torch.randn(1, 256, 8, 8), torch.randn(1, 512, 4, 4)]
    for source, p6_in in (("c5", 512), ("p5", 64)):
        fpn = FPN([128, 256, 512], 64, source)
        assert fpn.p6.in_channels == p6_in
        outs = fpn(feats)
        assert [o.shape[-1] for o in outs] == [16, 8, 4, 2, 1] and all(o.shape[1] == 64 for o in outs)


def test_fpn_top_down_reaches_p3():
    fpn = FPN([8, 8, 8], 8)
    feats = [torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 4, 4), torch.randn(1, 8, 2, 2)]
    baseline = fpn([torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 2, 2)])[0]
    assert not torch.allclose(fpn(feats)[0], baseline)  # C5 changes P3 through the top-down path


def test_head_prior_bias_and_output_layout():
    head = RetinaNetHead(16, num_anchors=9, num_classes=4, num_convs=2)
    assert torch.allclose(head.cls_score.bias, torch.full((36,), -math.log(99.0)))
    logits, deltas = head([torch.randn(2, 16, 3, 5), torch.randn(2, 16, 2, 3)])
    assert [l.shape for l in logits] == [(2, 135, 4), (2, 54, 4)]
    assert [d.shape for d in deltas] == [(2, 135, 4), (2, 54, 4)]
    # initial probabilities are ~0.01 everywhere
    assert abs(torch.sigmoid(logits[0]).mean().item() - 0.01) < 0.005


def test_head_layout_is_location_major_anchor_minor():
    head = RetinaNetHead(4, num_anchors=2, num_classes=3, num_convs=0)
    nn.init.zeros_(head.cls_score.weight)
    with torch.no_grad():
        head.cls_score.bias.copy_(torch.arange(6.0))  # channel = anchor * K + class
    logits, _ = head([torch.zeros(1, 4, 1, 2)])
    assert logits[0][0].tolist() == [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("num_convs,block", [(4, 4), (4, 1), (4, 3), (1, 4), (0, 2)])
def test_box_subnet_at_chosen_locations_equals_it_over_whole_maps(num_convs, block):
    """`regress_at`'s local pass (what training on a CPU runs where objects are few): the same
    deltas and the same gradients, for the weights and the features, as the whole-map subnet
    read at those locations; corners, edges and maps smaller than the subnet's window included
    (float64, so equal to rounding)."""
    torch.manual_seed(0)
    head = RetinaNetHead(8, num_anchors=3, num_classes=2, num_convs=num_convs).double()
    for conv in head.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.normal_(conv.weight, std=0.3)
            nn.init.normal_(conv.bias, std=0.3)
    shapes = [(9, 14), (3, 4), (1, 2)]
    features = [torch.randn(2, 8, h, w, dtype=torch.float64, requires_grad=True) for h, w in shapes]
    locations = [torch.tensor([[0, 0, 0], [1, 8, 13], [0, 4, 7], [1, 0, 13], [0, 8, 0], [1, 4, 7], [0, 5, 6]]),
                 torch.tensor([[1, 2, 3], [0, 1, 0], [1, 0, 0]]), torch.tensor([[0, 0, 1], [1, 0, 0]])]
    local = head.regress_at(features, locations, block, whole_maps_when_cheaper=False)
    _, dense = head(features)
    read = torch.cat([d.view(2, h, w, 3, 4)[loc[:, 0], loc[:, 1], loc[:, 2]]
                      for d, (h, w), loc in zip(dense, shapes, locations)])
    assert local.shape == (12, 3, 4)
    torch.testing.assert_close(local, read, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(local)
    params = [*features, *head.bbox_subnet.parameters(), *head.bbox_pred.parameters()]
    from_local = torch.autograd.grad((local * weights).sum(), params)
    from_dense = torch.autograd.grad((read * weights).sum(), params)
    for a, b in zip(from_local, from_dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _saved_bytes(fn, exclude: list[torch.Tensor]):
    """`fn()` and the bytes of the distinct storages autograd keeps for its backward pass,
    those of `exclude` (inputs, weights and indices, which exist anyway) left out."""
    existing = {t.untyped_storage().data_ptr() for t in exclude}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in existing:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


def test_box_subnet_at_dense_locations_costs_no_more_than_whole_maps():
    """Where chosen locations are dense (hundreds of objects per image), `regress_at`'s
    overlapping windows would keep several times a level's activations: such a level runs
    whole, so that the box subnet keeps no more than `forward` does, while a sparse level in
    the same call still runs locally (a fraction of that); the deltas and their gradients
    stay those of the whole-map subnet, levels in order (float64)."""
    torch.manual_seed(0)
    head = RetinaNetHead(8, num_anchors=3, num_classes=2).double()
    for conv in head.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.normal_(conv.weight, std=0.3)
    shapes = [(40, 60), (16, 16), (1, 2)]
    features = [torch.randn(2, 8, h, w, dtype=torch.float64, requires_grad=True) for h, w in shapes]
    every = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(16), torch.arange(16), indexing="ij"), -1)
    locations = [torch.tensor([[0, 3, 50], [1, 39, 0]]), every.reshape(-1, 3), torch.tensor([[1, 0, 1]])]
    params = [*head.bbox_subnet.parameters(), *head.bbox_pred.parameters()]

    def box_subnet(level):  # what forward keeps for one level's deltas
        return _saved_bytes(lambda: head.bbox_pred(head.bbox_subnet(features[level])), [*features, *params])[1]

    for level, most in ((1, box_subnet(1)), (0, box_subnet(0) / 4)):
        _, kept = _saved_bytes(lambda: head.regress_at(features[level : level + 1], locations[level : level + 1]),
                               [*features, *params, *locations])
        assert kept <= most, (level, kept, most)
    deltas = head.regress_at(features, locations)
    _, dense = head(features)
    read = torch.cat([d.view(2, h, w, 3, 4)[loc[:, 0], loc[:, 1], loc[:, 2]]
                      for d, (h, w), loc in zip(dense, shapes, locations)])
    torch.testing.assert_close(deltas, read, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(deltas)
    from_regress = torch.autograd.grad((deltas * weights).sum(), [*features, *params])
    from_dense = torch.autograd.grad((read * weights).sum(), [*features, *params])
    for a, b in zip(from_regress, from_dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_group_norm_head_has_no_conv_bias():
    head = RetinaNetHead(32, 9, 3, norm="gn")
    convs = [m for m in head.cls_subnet if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs) and any(isinstance(m, nn.GroupNorm) for m in head.cls_subnet)


@pytest.mark.parametrize("channels,groups", [(256, 32), (64, 32), (48, 24), (32, 16)])
def test_group_norm_head_runs_on_a_1x1_level_at_any_width(channels, groups):
    """P7 of a 64 px tile is 1x1: with one channel a group (the old rule for 32 channels)
    GroupNorm refuses it, and 48 channels did not build at all."""
    head = RetinaNetHead(channels, 9, 3, num_convs=1, norm="gn").eval()
    assert head.cls_subnet[1].num_groups == groups
    with torch.no_grad():
        logits, deltas = head([torch.randn(2, channels, 1, 1)])
    assert logits[0].shape == (2, 9, 3) and torch.isfinite(deltas[0]).all()


def test_multiscale_sizes_come_from_the_given_generator():
    """The preprocessor draws training sizes from the generator it is given, not from Python's
    global `random`: the same seed gives the same sizes, whatever the global state."""
    import random

    from retinanet.model.preprocess import Preprocessor

    pre = Preprocessor([64, 80, 96, 112], 96, 200, [0.5] * 3, [0.25] * 3)
    images = [torch.rand(3, 50, 60) for _ in range(12)]

    def sizes(seed):
        random.seed(seed)  # must not matter
        batch, _ = pre(images, [{"boxes": torch.zeros(0, 4)}] * 12, training=True,
                       generator=torch.Generator().manual_seed(7))
        return [s[0] for s in batch.image_sizes]

    assert sizes(1) == sizes(2)
    assert len(set(sizes(1))) > 1
    state = random.getstate()
    pre(images, None, training=True, generator=torch.Generator().manual_seed(7))
    assert random.getstate() == state


def test_training_forward_runs_no_collective(monkeypatch):
    """Inside a process group the model's forward runs no collective by itself; the
    foreground count is reduced only through the function the trainer hands in."""
    import torch.distributed as dist

    from retinanet import ModelConfig, RetinaNet

    cfg = ModelConfig(num_classes=3)
    cfg.backbone.depth, cfg.fpn.out_channels, cfg.head.num_convs = 18, 32, 1
    cfg.input.train_min_sizes, cfg.input.max_size = [96], 128
    model = RetinaNet.from_config(cfg).train()
    images = [torch.rand(3, 90, 100), torch.rand(3, 80, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 60, 70]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 20, 50, 60], [30, 30, 90, 70]]), "labels": torch.tensor([0, 2])}]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        def forbidden(*args, **kwargs):
            raise AssertionError("the model ran a collective")

        monkeypatch.setattr(dist, "all_reduce", forbidden)
        torch.manual_seed(0)
        plain = model(images, targets)
        calls = []

        def reducer(count):  # as if a second process had twice this batch's foreground anchors
            calls.append(float(count))
            return count * 3, 2

        torch.manual_seed(0)
        reduced = model(images, targets, reduce_foreground=reducer)
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
    assert len(calls) == 1 and calls[0] > 0
    # per process the loss is divided by (global count / processes) = 1.5x this batch's count
    assert torch.allclose(reduced["loss_cls"] * 1.5, plain["loss_cls"], rtol=1e-5)
    assert torch.allclose(reduced["loss_box"] * 1.5, plain["loss_box"], rtol=1e-5)


@pytest.mark.parametrize("channel_order", ["RGB", "BGR"])
def test_images_of_one_shape_are_preprocessed_together_with_the_same_numbers(channel_order):
    """Same-shaped images are normalised and resized as one batch: each comes out bit for bit
    as it does alone, in its place; an image already at its target size is left unresized,
    equal to what bilinear resizing by 1 gives."""
    import torch.nn.functional as F

    from retinanet.model.preprocess import Preprocessor

    pre = Preprocessor([64], 96, 200, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], channel_order=channel_order)
    generator = torch.Generator().manual_seed(0)
    shapes = [(50, 60), (70, 40), (50, 60), (96, 120), (50, 60)]
    images = [torch.randint(0, 256, (3, *s), generator=generator, dtype=torch.uint8) for s in shapes]
    together, _ = pre(images)
    for i, image in enumerate(images):
        alone, _ = pre([image])
        h, w = together.image_sizes[i]
        assert together.image_sizes[i] == alone.image_sizes[0]
        assert torch.equal(together.tensor[i, :, :h, :w], alone.tensor[0, :, :h, :w]), i
    assert together.image_sizes[3] == (96, 120)  # short side already 96: not resized
    normalized = pre.normalize(images[3])
    resized = F.interpolate(normalized[None], scale_factor=1.0, mode="bilinear", recompute_scale_factor=True,
                            align_corners=False)[0]
    assert torch.equal(together.tensor[3, :, :96, :120], resized)


def test_training_on_a_cpu_runs_the_box_subnet_at_foreground_locations_with_the_same_gradients(monkeypatch):
    from retinanet.config import load_config
    from retinanet.model.build import build_retinanet

    cfg = load_config("retinanet_r18_fpn_1x_coco")
    cfg.model.input.train_min_sizes, cfg.model.input.max_size = [256], 384
    torch.manual_seed(0)
    model = build_retinanet(cfg.model).train()
    for conv in model.head.bbox_subnet.modules():  # a box subnet whose outputs vary with its input
        if isinstance(conv, nn.Conv2d):
            nn.init.normal_(conv.weight, std=0.05)
    # float64: the two paths sum the same products in different orders, and in float32 that
    # rounding alone differs with the CPU's kernels (AVX2 vs AVX-512) by ~1e-3 of the largest gradient
    model.double()
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 255, (3, 240, 350), dtype=torch.uint8, generator=generator).double() / 255
              for _ in range(2)]
    boxed = [{"boxes": torch.tensor([[0.0, 0, 40, 50], [100, 120, 300, 230], [320, 10, 350, 40]]),
              "labels": torch.tensor([1, 3, 7])},
             {"boxes": torch.tensor([[5.0, 150, 60, 240]]), "labels": torch.tensor([2])}]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    calls = []
    regress_at = model.head.regress_at
    monkeypatch.setattr(model.head, "regress_at", lambda *a: calls.append(1) or regress_at(*a))

    def step(local: bool, targets):
        model.local_box_training = local
        model.zero_grad(set_to_none=True)
        losses = model(images, targets)
        sum(losses.values()).backward()
        return losses, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    for targets in (boxed, empty):
        dense_losses, dense_grads = step(False, targets)
        local_losses, local_grads = step(True, targets)
        for key in dense_losses:
            torch.testing.assert_close(local_losses[key], dense_losses[key], rtol=1e-12, atol=1e-12)
        for name, grad in dense_grads.items():
            assert local_grads[name] is not None, name  # every parameter takes part (as DDP needs)
            torch.testing.assert_close(local_grads[name], grad, rtol=1e-9, atol=1e-9 * grad.abs().max().item())
    assert len(calls) == 2
    assert not build_retinanet(load_config("demo").model).head.regresses_locally  # GroupNorm needs whole maps
