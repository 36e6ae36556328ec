import pytest
import torch

from retinanet.model.box_coding import BoxCoder
from retinanet.model.postprocess import PostProcessor


def _level(scores_by_anchor, num_classes=3):
    """Logits for one level from a dict {(anchor, class): prob}; everything else very unlikely."""
    logits = torch.full((1, 4, num_classes), -20.0)
    for (a, k), p in scores_by_anchor.items():
        logits[0, a, k] = torch.logit(torch.tensor(p))
    return logits


ANCHORS = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [95, 95, 120, 120]])


def test_threshold_nms_per_class_and_clip():
    post = PostProcessor(BoxCoder(), score_threshold=0.05, topk_candidates=1000, nms_threshold=0.5,
                         detections_per_image=100)
    logits = _level({(0, 0): 0.9, (1, 0): 0.8, (1, 1): 0.7, (2, 2): 0.04, (3, 1): 0.6})
    out = post([logits], [torch.zeros(1, 4, 4)], [ANCHORS], [(100, 100)])[0]
    # anchor 1 class 0 is suppressed by anchor 0 (IoU 0.68); class 1 on anchor 1 survives (other class);
    # anchor 2 is under the threshold; anchor 3 is clipped to the 100x100 image
    assert out["scores"].tolist() == torch.tensor([0.9, 0.7, 0.6]).tolist()
    assert out["labels"].tolist() == [0, 1, 1]
    assert torch.allclose(out["boxes"][2], torch.tensor([95.0, 95, 100, 100]))


def test_topk_per_level_and_max_detections():
    post = PostProcessor(BoxCoder(), topk_candidates=2, detections_per_image=1)
    far = torch.tensor([[0.0, 0, 10, 10], [30, 30, 40, 40], [60, 60, 70, 70], [90, 90, 99, 99]])
    logits = _level({(0, 0): 0.5, (1, 0): 0.6, (2, 0): 0.7, (3, 0): 0.8})
    out = post([logits], [torch.zeros(1, 4, 4)], [far], [(100, 100)])[0]
    assert out["scores"].tolist() == [torch.tensor(0.8).item()]
    post.detections_per_image = 10
    out = post([logits], [torch.zeros(1, 4, 4)], [far], [(100, 100)])[0]
    assert len(out["scores"]) == 2  # top-2 candidates only


def test_images_never_suppress_each_other_and_empty_boxes_dropped():
    post = PostProcessor(BoxCoder(), detections_per_image=100)
    logits = torch.cat([_level({(0, 0): 0.9}), _level({(0, 0): 0.8, (3, 1): 0.7})])
    deltas = torch.zeros(2, 4, 4)
    out = post([logits], [deltas], [ANCHORS], [(100, 100), (90, 90)])
    assert [len(o["scores"]) for o in out] == [1, 1]  # image 2: anchor 3 lies outside 90x90 -> empty -> dropped
    assert torch.equal(out[0]["boxes"], out[1]["boxes"])


def test_levels_are_combined_before_nms():
    post = PostProcessor(BoxCoder())
    l0 = _level({(0, 0): 0.9})
    l1 = _level({(1, 0): 0.95})
    out = post([l0, l1], [torch.zeros(1, 4, 4)] * 2, [ANCHORS, ANCHORS], [(100, 100)])[0]
    assert out["scores"].tolist() == [torch.tensor(0.95).item()]


def test_nothing_over_threshold():
    post = PostProcessor(BoxCoder())
    out = post([torch.full((2, 4, 3), -10.0)], [torch.zeros(2, 4, 4)], [ANCHORS], [(100, 100)] * 2)
    assert all(len(o["boxes"]) == 0 for o in out)


@pytest.fixture(params=["per_image", "batched"])
def nms_kind(request, monkeypatch):
    """Both ways of running NMS over the shortlists: image by image (what a CPU runs) and all
    images at once (what a GPU runs), the latter forced onto the CPU."""
    from retinanet.model import postprocess

    if request.param == "batched":
        monkeypatch.setattr(postprocess, "greedy_nms_per_image", postprocess.BatchedNMS())
    return postprocess.greedy_nms_per_image


def test_nms_runs_image_by_image_on_a_cpu_and_batched_on_a_gpu():
    """The choice `PostProcessor.shortlist_nms` makes (no GPU needed to ask it): a CPU keeps
    torchvision's NMS per image, a GPU one `BatchedNMS`, compiled after `compile()`."""
    from retinanet.model.postprocess import BatchedNMS, greedy_nms_per_image

    post = PostProcessor(BoxCoder())
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert post.shortlist_nms(cpu) is greedy_nms_per_image
    assert isinstance(post.shortlist_nms(gpu), BatchedNMS) and not post.shortlist_nms(gpu).compiled
    post.compile()
    assert post.shortlist_nms(gpu).compiled and post.shortlist_nms(cpu) is greedy_nms_per_image


def test_batched_detections_equal_one_image_at_a_time(nms_kind):
    """Batch 8, 91 classes, 800x1216-sized coordinates: the whole-batch NMS gives the same
    detections, bit for bit, as running each image alone."""
    from retinanet.model.anchors import AnchorGenerator

    generator = torch.Generator().manual_seed(0)
    anchor_gen = AnchorGenerator([[32.0, 40.3, 50.8], [64.0, 80.6, 101.6]], [0.5, 1.0, 2.0], [8, 16])
    sizes = [(100, 152), (50, 76)]
    anchors = anchor_gen(sizes, (800, 1216), torch.device("cpu"))
    batch, classes = 8, 91
    logits = [torch.randn(batch, len(a), classes, generator=generator) * 2 - 4 for a in anchors]
    deltas = [torch.randn(batch, len(a), 4, generator=generator) * 0.3 for a in anchors]
    image_sizes = [(800 - 16 * i, 1216 - 8 * i) for i in range(batch)]
    post = PostProcessor(BoxCoder(), score_threshold=0.05, topk_candidates=1000, detections_per_image=100)
    together = post(logits, deltas, anchors, image_sizes)
    for i in range(batch):
        alone = post([l[i : i + 1] for l in logits], [d[i : i + 1] for d in deltas], anchors, [image_sizes[i]])[0]
        assert len(alone["scores"]) == 100
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(together[i][key], alone[key]), (i, key)


def test_clip_after_nms_like_detectron2():
    """`after_nms`: NMS sees the unclipped boxes (here two overlapping boxes that clipping
    would make identical survive), clipping and the empty-box drop come afterwards."""
    anchors = torch.tensor([[80.0, 0, 140, 40], [80, 60, 140, 100], [120, 0, 150, 10], [0, 0, 10, 10]])
    logits = _level({(0, 0): 0.9, (1, 0): 0.8, (2, 1): 0.7})
    args = ([logits], [torch.zeros(1, 4, 4)], [anchors], [(100, 100)])
    before = PostProcessor(BoxCoder(), clip_boxes="before_nms")(*args)[0]
    after = PostProcessor(BoxCoder(), clip_boxes="after_nms")(*args)[0]
    assert len(before["boxes"]) == 2  # anchor 2 clipped to zero width and dropped before NMS
    assert len(after["boxes"]) == 3 and after["boxes"].max() == 150  # unclipped until the caller clips
    clipped = PostProcessor(BoxCoder(), clip_boxes="after_nms").batched(*args).clipped([(100, 100)]).split()[0]
    assert clipped["boxes"].max() == 100 and len(clipped["boxes"]) == 2
    assert torch.equal(clipped["scores"], after["scores"][:2])  # the empty one (score 0.7) dropped, order kept


def test_batched_nms_is_exact_near_the_iou_threshold(nms_kind):
    """Pairs of boxes at IoU 0.5 +- 1e-4, far from the origin, in the last image and class of
    a batch of 8 x 91: shifting groups apart must not round their coordinates (in float32
    the shift rounds them to ~0.06 px and flips the suppressions)."""
    from torchvision.ops import nms

    generator = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(200):
        x, y, w = 1000.3 + (i % 20) * 7.77, 700.1 + (i // 20) * 9.13, 10.0
        d = w / 3 + (torch.rand(1, generator=generator).item() - 0.5) * 2e-4  # IoU (w-d)/(w+d) ~ 0.5
        pairs += [[x, y, x + w, y + w], [x + d, y, x + w + d, y + w]]
    anchors = torch.tensor(pairs)
    logits = torch.full((8, len(anchors), 91), -10.0)
    logits[7, 0::2, 90], logits[7, 1::2, 90] = 3.0, 2.0
    deltas = torch.zeros(8, len(anchors), 4)
    post = PostProcessor(BoxCoder(), detections_per_image=1000)
    together = post([logits], [deltas], [anchors], [(800, 1216)] * 8)[7]
    alone = post([logits[7:]], [deltas[7:]], [anchors], [(800, 1216)])[0]
    scores = torch.sigmoid(logits[7, :, 90])
    boxes = BoxCoder().decode(deltas[7], anchors)
    exact = nms(boxes.double(), scores.double(), 0.5)  # one class, no shift at all
    assert len(together["scores"]) == len(alone["scores"]) == len(exact)
    assert torch.equal(together["boxes"], alone["boxes"])
    # equal scores (ties) may come in any order: compare the kept sets
    assert torch.equal(torch.unique(together["boxes"], dim=0), torch.unique(boxes[exact], dim=0))


@pytest.mark.parametrize("batch,n,k", [(1, 136800 * 91, 1000), (3, 50001, 1000), (2, 64001, 5), (1, 1000, 1000)])
def test_chunked_topk_equals_topk(batch, n, k):
    """Slices first, then the best of those: the same values and (without ties) the same
    indices as one top-k, including the elements left over after the equal slices."""
    from retinanet.model.postprocess import chunked_topk

    values = torch.randn(batch, n, generator=torch.Generator().manual_seed(n))
    values[:, -1] = 100.0  # the best element is among the left-over ones
    expected, expected_idx = values.topk(k, dim=1)
    got, got_idx = chunked_topk(values, k)
    assert torch.equal(got, expected) and torch.equal(got_idx, expected_idx)


@pytest.mark.parametrize("spread", [400.0, 3.0])
def test_nms_over_a_shortlist_keeps_the_same_boxes_as_over_all(spread, nms_kind):
    """`first_kept_batched` runs NMS on the best 8 x count boxes and falls back to all of an
    image's boxes when too few survive; either way its result is what torchvision's NMS over
    every box keeps first. With a wide spread few boxes overlap (the shortlist suffices);
    with a narrow one nearly all are suppressed and the fallback must be taken."""
    from torchvision.ops import batched_nms

    from retinanet.model.postprocess import first_kept_batched

    generator = torch.Generator().manual_seed(1)
    n, count = 5000, 100
    centres = torch.rand(n, 2, generator=generator) * spread
    sizes = 20 + torch.rand(n, 2, generator=generator) * 40
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 1)
    scores = torch.rand(n, generator=generator)
    groups = torch.randint(0, 3, (n,), generator=generator)
    expected = batched_nms(boxes.double(), scores.double(), groups, 0.5)[:count]  # torchvision's, every box
    index, counts = first_kept_batched(boxes[None], scores[None], groups[None], torch.ones(1, n, dtype=torch.bool),
                                       0.5, count, nms_kind)
    assert counts == [len(expected)] and torch.equal(index[0, : counts[0]], expected)
    shortlist = scores.argsort(descending=True)[: 8 * count]
    kept_in_shortlist = len(batched_nms(boxes[shortlist].double(), scores[shortlist].double(), groups[shortlist], 0.5))
    assert (kept_in_shortlist >= count) == (spread > 100)  # both paths are exercised


def test_batched_nms_equals_torchvision_per_image():
    """`BatchedNMS` over 6 images with different numbers of valid boxes, 4 classes,
    clustered boxes: per image the boxes torchvision's `batched_nms` keeps, in its order."""
    from torchvision.ops import batched_nms

    from retinanet.model.postprocess import BatchedNMS

    generator = torch.Generator().manual_seed(2)
    batch, size = 6, 300
    centres = torch.rand(batch, size, 2, generator=generator) * 120
    wh = 10 + torch.rand(batch, size, 2, generator=generator) * 30
    boxes = torch.cat([centres - wh / 2, centres + wh / 2], -1)
    scores = torch.rand(batch, size, generator=generator).sort(dim=1, descending=True).values
    groups = torch.randint(0, 4, (batch, size), generator=generator)
    valid = torch.arange(size) < torch.tensor([300, 250, 1, 0, 120, 299])[:, None]
    nms = BatchedNMS()
    nms.max_pairs = 2 * size * size  # 3 chunks of 2 images
    kept = nms(boxes, groups, valid, 0.5)
    for b in range(batch):
        n = int(valid[b].sum())
        expected = batched_nms(boxes[b, :n].double(), scores[b, :n].double(), groups[b, :n], 0.5)
        assert torch.equal(kept[b].nonzero()[:, 0], expected), b


@pytest.mark.parametrize("rounds_per_check", [1, 2, 8, 64])
def test_batched_nms_follows_a_long_chain_of_suppressions(rounds_per_check):
    """40 boxes in a row, each overlapping only the next by IoU > 0.5: greedy NMS keeps every
    other one, which the rounds reach only after ~40 of them (a first round that kept only
    boxes nothing overlaps would keep only the first), however many rounds go between two
    checks for the fixed point (2 eager, 8 compiled)."""
    from retinanet.model.postprocess import BatchedNMS

    x = torch.arange(40, dtype=torch.float32) * 3.0
    boxes = torch.stack([x, torch.zeros(40), x + 10, torch.full((40,), 10.0)], 1)  # IoU(i, i+1) = 7/13
    nms = BatchedNMS()
    nms.rounds_per_check = rounds_per_check
    kept = nms(boxes[None], torch.zeros(1, 40, dtype=torch.long), torch.ones(1, 40, dtype=torch.bool), 0.5)
    assert kept[0].nonzero()[:, 0].tolist() == list(range(0, 40, 2))


def test_at_most_n_boxes_per_class_enter_nms():
    """`nms_pre_per_class` (PaddleDetection's `nms_top_k`): only the best n candidates of each
    class and image go to NMS, so a class's (n+1)-th box survives nowhere even when nothing
    would suppress it; other classes and images keep theirs."""
    far = torch.tensor([[0.0, 0, 10, 10], [30, 30, 40, 40], [60, 60, 70, 70], [90, 90, 99, 99]])
    logits = torch.cat([_level({(0, 0): 0.9, (1, 0): 0.8, (2, 0): 0.7, (3, 1): 0.6}),
                        _level({(0, 1): 0.5, (1, 1): 0.95, (2, 0): 0.3, (3, 0): 0.4})])
    args = ([logits], [torch.zeros(2, 4, 4)], [far], [(100, 100)] * 2)
    capped = PostProcessor(BoxCoder(), nms_pre_per_class=2)(*args)
    assert [o["scores"].tolist() for o in capped] == [torch.tensor([0.9, 0.8, 0.6]).tolist(),
                                                      torch.tensor([0.95, 0.5, 0.4, 0.3]).tolist()]
    uncapped = PostProcessor(BoxCoder())(*args)
    assert len(uncapped[0]["scores"]) == 4


def test_compiled_batched_nms_keeps_what_the_eager_one_keeps():
    """`BatchedNMS(compiled=True)` (torch.compile's inductor, on the CPU here; on a GPU the
    same graph becomes Triton kernels) keeps what torchvision's NMS keeps, at two sizes of
    shortlist (the second goes through the graph compiled for dynamic shapes)."""
    from torchvision.ops import batched_nms

    from retinanet.model.postprocess import BatchedNMS

    generator = torch.Generator().manual_seed(3)
    compiled = BatchedNMS(compiled=True)
    for batch, size in [(4, 200), (3, 350)]:
        centres = torch.rand(batch, size, 2, generator=generator) * 100
        wh = 10 + torch.rand(batch, size, 2, generator=generator) * 30
        boxes = torch.cat([centres - wh / 2, centres + wh / 2], -1)
        groups = torch.randint(0, 3, (batch, size), generator=generator)
        valid = torch.arange(size) < torch.randint(1, size + 1, (batch, 1), generator=generator)
        kept = compiled(boxes, groups, valid, 0.5)
        for b in range(batch):
            n = int(valid[b].sum())
            expected = batched_nms(boxes[b, :n].double(), -torch.arange(n, dtype=torch.float64), groups[b, :n], 0.5)
            assert torch.equal(kept[b].nonzero()[:, 0], expected.sort().values), (batch, b)


@pytest.mark.parametrize("ties", [False, True])
def test_top_pairs_are_the_top_k_over_all_pairs(ties):
    """`top_pairs` (best anchors first, then their classes) selects what one top-k over every
    (anchor, class) pair selects: the same pairs without ties, the same values with many
    (integer logits, as bf16 logits tie), also when an anchor's classes all beat the rest and
    for a level with fewer anchors than k."""
    from retinanet.model.postprocess import top_pairs

    generator = torch.Generator().manual_seed(4)
    for batch, anchors, classes, k in [(2, 5000, 91, 1000), (3, 700, 20, 1000), (1, 3000, 4, 50)]:
        if ties:
            logits = (torch.randn(batch, anchors, classes, generator=generator) * 3).round()
        else:  # distinct values
            logits = torch.stack([torch.randperm(anchors * classes, generator=generator) for _ in range(batch)])
            logits = logits.reshape(batch, anchors, classes).float() / 1000 - 5
        logits[0, 7] = 1000.0 + torch.arange(classes)  # one anchor holds the best `classes` pairs
        values, anchor_idx, labels = top_pairs(logits, k)
        expected_values, expected_idx = logits.reshape(batch, -1).topk(min(k, anchors * classes), dim=1)
        assert torch.equal(values, expected_values)
        assert torch.equal(values, logits[torch.arange(batch)[:, None], anchor_idx, labels])
        if not ties:
            assert torch.equal(anchor_idx * classes + labels, expected_idx)
