"""Pictures of detections: labels of overlapping boxes stay legible."""

import numpy as np
import torch

from retinanet.analysis.drawing import draw_detections, place_labels


def _overlaps(a, b, size_a, size_b):
    return a[0] < b[0] + size_b[0] and b[0] < a[0] + size_a[0] and a[1] < b[1] + size_b[1] and b[1] < a[1] + size_a[1]


def test_labels_of_one_box_go_inside_then_above_then_below():
    boxes = [[50.0, 40, 150, 140]] * 4
    sizes = [(60, 10)] * 4
    corners = place_labels(boxes, sizes, (300, 300))
    assert corners == [(51.0, 41.0), (51.0, 29.0), (51.0, 129.0), (51.0, 141.0)]
    for i in range(4):
        for j in range(i):
            assert not _overlaps(corners[i], corners[j], sizes[i], sizes[j])


def test_labels_stay_in_the_image_and_fall_back_to_the_first_spot():
    # a box touching the top and right edges: no room above, the label is pulled inside
    corners = place_labels([[250.0, 0, 300, 50]] * 2, [(80, 10)] * 2, (300, 300))
    assert corners[0] == (220.0, 1.0)  # x clamped so that the label ends at the border
    assert corners[1] == (220.0, 39.0)  # "above" would leave the image: bottom-left inside
    # three labels, two free spots: the third takes the first spot that fits the image
    corners = place_labels([[0.0, 0, 40, 30]] * 3, [(30, 12)] * 3, (40, 30))
    assert corners == [(1.0, 1.0), (1.0, 17.0), (1.0, 1.0)]


def test_drawn_labels_of_overlapping_boxes_both_show():
    """Two classes on the same box: each one's label text is visible in its own place."""
    image = torch.full((3, 120, 160), 128, dtype=torch.uint8)
    det = {"boxes": torch.tensor([[40.0, 40, 120, 100], [40.0, 40, 120, 100]]), "scores": torch.tensor([0.4, 0.9]),
           "labels": torch.tensor([0, 1]), "class_names": ["ellipse", "rectangle"]}
    pixels = np.asarray(draw_detections(image, det)).astype(int)
    red, green = pixels[..., 0], pixels[..., 1]
    reddish, greenish = (red > 60) & (red > 2 * green), (green > 60) & (green > 2 * red)  # label 0, label 1 text
    # the better detection (rectangle, green) is placed first, inside the box; the other above it
    inside, above = (slice(42, 52), slice(42, 110)), (slice(30, 40), slice(42, 110))
    assert greenish[inside].sum() > 20 and reddish[inside].sum() == 0
    assert reddish[above].sum() > 20 and greenish[above].sum() == 0
