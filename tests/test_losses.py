import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as tv_focal

from retinanet.model.box_coding import BoxCoder
from retinanet.model.losses import RetinaNetLoss, focal_loss_per_anchor, sigmoid_focal_loss, smooth_l1
from retinanet.model.matching import BACKGROUND, FOREGROUND, IGNORE, Matches


def test_focal_loss_formula_by_hand():
    alpha, gamma = 0.25, 2.0
    x = torch.tensor([2.0, -1.0, 0.5, -3.0])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    p = torch.sigmoid(x)
    expected = torch.where(y == 1, -alpha * (1 - p) ** gamma * torch.log(p), -(1 - alpha) * p**gamma * torch.log(1 - p))
    assert torch.allclose(sigmoid_focal_loss(x, y, alpha, gamma), expected, atol=1e-6)


def test_focal_loss_gradient_matches_the_analytic_derivative():
    alpha, gamma = 0.25, 2.0
    x = torch.linspace(-4, 4, 41, dtype=torch.float64, requires_grad=True)
    for target in (1.0, 0.0):
        y = torch.full_like(x, target)
        (grad,) = torch.autograd.grad(sigmoid_focal_loss(x, y, alpha, gamma).sum(), x)
        p = torch.sigmoid(x.detach())
        if target == 1.0:  # d/dx [-a (1-p)^g log p]
            analytic = alpha * (1 - p) ** gamma * (gamma * p * torch.log(p) - (1 - p))
        else:  # d/dx [-(1-a) p^g log(1-p)]
            analytic = (1 - alpha) * p**gamma * (p - gamma * (1 - p) * torch.log(1 - p))
        assert torch.allclose(grad, analytic, atol=1e-10)


def test_focal_loss_equals_torchvision():
    x = torch.randn(50, 7)
    y = (torch.rand(50, 7) > 0.8).float()
    assert torch.allclose(sigmoid_focal_loss(x, y).sum(), tv_focal(x, y, reduction="sum"), rtol=1e-5)


def test_gamma_zero_alpha_off_is_cross_entropy():
    x, y = torch.randn(20), (torch.rand(20) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert torch.allclose(sigmoid_focal_loss(x, y, alpha=-1, gamma=0.0), bce)


def test_smooth_l1():
    x = torch.tensor([0.0, 0.05, 0.5])
    assert torch.allclose(smooth_l1(x, torch.zeros(3), 0.1), torch.tensor([0.0, 0.5 * 0.0025 / 0.1, 0.45]))
    assert torch.allclose(smooth_l1(x, torch.zeros(3), 0.0), x)


def _setup(labels):
    anchors = torch.tensor([[0.0, 0, 10, 10], [10, 10, 30, 30], [0, 0, 5, 5], [40, 40, 50, 50]])
    gt_boxes = torch.tensor([[[1.0, 1, 11, 11], [12, 12, 30, 28]], [[40.0, 40, 52, 52], [0, 0, 0, 0]]])
    gt_labels = torch.tensor([[2, 0], [1, 0]])
    gt_index = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]])
    matches = Matches(gt_index, torch.tensor(labels, dtype=torch.int8))
    logits = torch.randn(2, 4, 3)
    deltas = torch.randn(2, 4, 4)
    return logits, deltas, anchors, matches, gt_boxes, gt_labels


def test_batch_normalisation_by_hand():
    labels = [[FOREGROUND, FOREGROUND, IGNORE, BACKGROUND], [BACKGROUND, BACKGROUND, BACKGROUND, FOREGROUND]]
    logits, deltas, anchors, matches, gt_boxes, gt_labels = _setup(labels)
    coder = BoxCoder()
    loss = RetinaNetLoss(coder, box_loss="l1", normalization="batch")(logits, deltas, anchors, matches, gt_boxes, gt_labels)
    target = torch.zeros(2, 4, 3)
    target[0, 0, 2] = target[0, 1, 0] = target[1, 3, 1] = 1
    valid = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    expected_cls = tv_focal(logits[valid], target[valid], reduction="sum") / 3
    enc = coder.encode(torch.stack([gt_boxes[0, 0], gt_boxes[0, 1], gt_boxes[1, 0]]), anchors[[0, 1, 3]])
    expected_box = (torch.stack([deltas[0, 0], deltas[0, 1], deltas[1, 3]]) - enc).abs().sum() / 3
    assert torch.allclose(loss["loss_cls"], expected_cls, rtol=1e-5)
    assert torch.allclose(loss["loss_box"], expected_box, rtol=1e-5)


def test_per_image_and_ema_normalisation():
    labels = [[FOREGROUND, FOREGROUND, IGNORE, BACKGROUND], [BACKGROUND, BACKGROUND, BACKGROUND, FOREGROUND]]
    args = _setup(labels)
    coder = BoxCoder()
    batch = RetinaNetLoss(coder, normalization="batch")(*args)
    ema = RetinaNetLoss(coder, normalization="ema", ema_initial=100.0, ema_momentum=0.9)
    out = ema(*args)
    # ema normaliser after one update: 0.9 * 100 + 0.1 * 3 = 90.3 instead of 3
    assert torch.allclose(out["loss_cls"], batch["loss_cls"] * 3 / 90.3, rtol=1e-5)
    assert torch.isclose(ema.ema_num_foreground, torch.tensor(90.3))
    per_image = RetinaNetLoss(coder, normalization="per_image")(*args)
    assert not torch.allclose(per_image["loss_cls"], batch["loss_cls"])


def test_no_foreground_gives_finite_losses_and_gradients():
    labels = [[BACKGROUND] * 4, [BACKGROUND] * 4]
    logits, deltas, anchors, matches, gt_boxes, gt_labels = _setup(labels)
    logits.requires_grad_(True)
    deltas.requires_grad_(True)
    for kind in ("smooth_l1", "giou"):
        logits.grad = deltas.grad = None
        out = RetinaNetLoss(BoxCoder(), box_loss=kind)(logits, deltas, anchors, matches, gt_boxes, gt_labels)
        assert out["loss_box"].item() == 0.0 and math.isfinite(out["loss_cls"].item())
        (out["loss_box"] + out["loss_cls"]).backward()
        assert deltas.grad is not None and torch.equal(deltas.grad, torch.zeros_like(deltas))
        assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_focal_loss_float32_keeps_the_positive_term_for_confident_logits(gamma):
    """For |x| up to 1e4 the float32 per-anchor loss equals a float64 reference, positives included."""
    x = torch.tensor([-1e4, -1e3, -30.0, -2.0, 0.5, 8.0, 1e3, 1e4, 1e6])
    num = len(x)
    logits = torch.full((1, num, 3), -5.0)
    logits[0, :, 1] = x  # the positive class of every anchor
    fg = torch.ones(1, num, dtype=torch.bool)
    anchor_labels = torch.ones(1, num, dtype=torch.long)
    got = focal_loss_per_anchor(logits, fg, anchor_labels, 0.25, gamma)
    targets = torch.zeros(1, num, 3, dtype=torch.float64)
    targets[0, :, 1] = 1
    expected = sigmoid_focal_loss(logits.double(), targets, 0.25, gamma).sum(-1)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=0), (got, expected)


def test_giou_loss_is_zero_for_perfect_boxes():
    labels = [[FOREGROUND, BACKGROUND, BACKGROUND, BACKGROUND], [BACKGROUND] * 4]
    logits, deltas, anchors, matches, gt_boxes, gt_labels = _setup(labels)
    coder = BoxCoder()
    deltas[0, 0] = coder.encode(gt_boxes[0, 0], anchors[0])
    out = RetinaNetLoss(coder, box_loss="giou")(logits, deltas, anchors, matches, gt_boxes, gt_labels)
    assert out["loss_box"].item() == pytest.approx(0.0, abs=1e-5)


def test_unknown_options_rejected():
    with pytest.raises(ValueError):
        RetinaNetLoss(BoxCoder(), box_loss="l2")
    with pytest.raises(ValueError):
        RetinaNetLoss(BoxCoder(), normalization="global")


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 1.5), (-1.0, 0.0)])
def test_per_anchor_focal_loss_equals_the_elementwise_form(alpha, gamma):
    from retinanet.model.losses import focal_loss_per_anchor

    logits = (torch.randn(2, 50, 6, dtype=torch.float64) * 3).requires_grad_(True)
    fg = torch.rand(2, 50) < 0.2
    labels = torch.randint(0, 6, (2, 50))  # read only where fg
    targets = torch.zeros(2, 50, 6, dtype=torch.float64)
    targets[fg, labels[fg]] = 1
    expected = sigmoid_focal_loss(logits, targets, alpha, gamma).sum(-1)
    got = focal_loss_per_anchor(logits, fg, labels, alpha, gamma)
    assert torch.allclose(got, expected, atol=1e-10)
    weights = torch.rand(2, 50, dtype=torch.float64)  # an upstream gradient that differs by anchor
    (g1,) = torch.autograd.grad((expected * weights).sum(), logits)
    (g2,) = torch.autograd.grad((got * weights).sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-10)


@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_focal_loss_float32_gradient_equals_float64_for_confident_logits(gamma):
    """The hand-written gradient, for positives and negatives from x = -1e4 to 1e4, in
    float32 against the elementwise form's autograd gradient in float64."""
    x = torch.tensor([-1e4, -1e3, -30.0, -8.0, -2.0, 0.0, 0.5, 8.0, 30.0, 1e3, 1e4])
    logits = x.view(1, -1, 1).repeat(1, 1, 3)  # (1, 11, 3): every value as positive and negative
    fg = torch.ones(1, len(x), dtype=torch.bool)
    labels = torch.ones(1, len(x), dtype=torch.long)
    targets = torch.zeros(1, len(x), 3, dtype=torch.float64)
    targets[..., 1] = 1
    reference = logits.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(sigmoid_focal_loss(reference, targets, 0.25, gamma).sum(), reference)
    logits.requires_grad_(True)
    (got,) = torch.autograd.grad(focal_loss_per_anchor(logits, fg, labels, 0.25, gamma).sum(), logits)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-12), (got, expected)


def test_focal_loss_without_gradient_gives_the_same_values():
    """Evaluated only (no gradient wanted), the forward skips forming the gradient."""
    logits = torch.randn(2, 40, 5) * 4
    fg, labels = torch.rand(2, 40) < 0.3, torch.randint(0, 5, (2, 40))
    with torch.no_grad():
        evaluated = focal_loss_per_anchor(logits, fg, labels)
    trained = focal_loss_per_anchor(logits.clone().requires_grad_(True), fg, labels)
    assert evaluated.grad_fn is None and trained.grad_fn is not None
    assert torch.equal(evaluated, trained.detach())


def test_focal_loss_of_bf16_logits_is_float32_with_a_bf16_gradient():
    logits = torch.randn(2, 30, 4).bfloat16().requires_grad_(True)
    fg, labels = torch.rand(2, 30) < 0.3, torch.randint(0, 4, (2, 30))
    loss = focal_loss_per_anchor(logits, fg, labels)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    reference = logits.detach().float().requires_grad_(True)
    focal_loss_per_anchor(reference, fg, labels).sum().backward()
    assert torch.allclose(logits.grad.float(), reference.grad, rtol=1e-2, atol=1e-4)


def test_giou_loss_equals_torchvision_values_and_gradients():
    from torchvision.ops import generalized_box_iou_loss

    from retinanet.model.losses import giou_loss

    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 400, 2, generator=generator, dtype=torch.float64) * 100
    boxes = torch.cat([xy, xy + 1 + torch.rand(2, 400, 2, generator=generator, dtype=torch.float64) * 60], -1)
    xy = torch.rand(2, 400, 2, generator=generator, dtype=torch.float64) * 100
    target = torch.cat([xy, xy + 1 + torch.rand(2, 400, 2, generator=generator, dtype=torch.float64) * 60], -1)
    target[0, :5] = boxes[0, :5]  # identical pairs
    disjoint = (torch.minimum(boxes[..., 2], target[..., 2]) <= torch.maximum(boxes[..., 0], target[..., 0]))
    assert 50 < int(disjoint.sum()) < 750  # both kinds of pair are exercised
    ours_in, theirs_in = boxes.clone().requires_grad_(True), boxes.clone().requires_grad_(True)
    ours = giou_loss(ours_in, target)
    theirs = generalized_box_iou_loss(theirs_in, target, reduction="none")
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
    (ours * torch.arange(400.0, dtype=torch.float64)).sum().backward()
    (theirs * torch.arange(400.0, dtype=torch.float64)).sum().backward()
    assert torch.allclose(ours_in.grad, theirs_in.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("box_loss,normalization", [("giou", "batch"), ("smooth_l1", "ema"), ("l1", "per_image")])
def test_a_training_step_reads_no_value_back_from_the_device(box_loss, normalization):
    """Preprocessing, matching and the losses never branch on or size by a tensor's values
    (no `.item()`, `nonzero`, boolean indexing, `if tensor`), which on a GPU would stall the
    step until the device catches up, and would break a compiled graph. Proven on the meta
    device, which holds shapes but no values: any such read raises there."""
    from retinanet.config import load_config
    from retinanet.model.build import build_retinanet

    cfg = load_config("demo")
    cfg.model.loss.box_loss, cfg.model.loss.normalization = box_loss, normalization
    model = build_retinanet(cfg.model).to("meta").train()
    assert model.loss.box_loss == box_loss and model.loss.normalization == normalization
    images = [torch.empty(3, 120, 140, dtype=torch.uint8, device="meta"), torch.empty(3, 90, 128, device="meta")]
    targets = [{"boxes": torch.empty(n, 4, device="meta"), "labels": torch.empty(n, dtype=torch.long, device="meta"),
                "iscrowd": torch.empty(n, dtype=torch.long, device="meta")} for n in (3, 5)]
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert set(losses) == {"loss_cls", "loss_box"} and all(v.device.type == "meta" for v in losses.values())
    assert next(model.head.parameters()).grad is not None


def test_per_level_logit_views_give_the_flat_losses_and_gradients():
    """The head's `(B, H, W, A, K)` views of its NCHW maps, level by level, against the same
    logits flattened and concatenated; a level list that does not cover the anchors is refused."""
    from retinanet.model.head import _anchor_view
    from retinanet.model.matching import AnchorMatcher

    def flat(m):  # channel a * K + k at (y, x) is anchor (y, x, a), class k
        return m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, num_classes)

    torch.manual_seed(0)
    num_anchors, num_classes, sizes = 3, 5, [(6, 8), (3, 4), (2, 2)]
    maps = [torch.randn(2, num_anchors * num_classes, h, w, dtype=torch.float64) * 3 for h, w in sizes]
    count = sum(h * w for h, w in sizes) * num_anchors
    anchors = torch.rand(count, 2) * 50
    anchors = torch.cat([anchors, anchors + 8 + torch.rand(count, 2) * 20], 1).double()
    gt_boxes = anchors[torch.randint(0, count, (2, 6))] + torch.randn(2, 6, 4).double()
    gt_labels = torch.randint(0, num_classes, (2, 6))
    matches = AnchorMatcher()(anchors, gt_boxes, torch.ones(2, 6, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.bool))
    assert (matches.labels == FOREGROUND).sum() > 5 and (matches.labels == IGNORE).any()
    deltas = torch.randn(2, count, 4, dtype=torch.float64)
    loss = RetinaNetLoss(BoxCoder())
    results = []
    for per_level in (True, False):
        leaves = [m.clone().requires_grad_(True) for m in maps]
        logits = ([_anchor_view(m, num_classes) for m in leaves] if per_level
                  else torch.cat([flat(m) for m in leaves], 1))
        out = loss(logits, deltas, anchors, matches, gt_boxes, gt_labels)
        results.append((out["loss_cls"], torch.autograd.grad(out["loss_cls"], leaves)))
    (views, view_grads), (flat, flat_grads) = results
    assert torch.allclose(views, flat, rtol=1e-12)
    for a, b in zip(view_grads, flat_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-15)
    with pytest.raises(ValueError, match="anchors"):
        loss([_anchor_view(m, num_classes) for m in maps[:2]], deltas, anchors, matches, gt_boxes, gt_labels)
