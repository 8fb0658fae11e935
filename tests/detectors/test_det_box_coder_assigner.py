"""Box coder round trip and ATSS assignment on hand-made boxes with worked-out answers."""

import math

import torch

from detectors.atss_assigner import BACKGROUND, ATSSAssigner
from detectors.box_coder import BoxCoder

FAR1 = [200.0, 200.0, 240.0, 240.0]
FAR2 = [300.0, 300.0, 380.0, 380.0]


def test_box_coder_round_trip_and_known_deltas():
    coder = BoxCoder()
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(100, 2, generator=gen) * 100
    anchors = torch.cat((xy, xy + 1 + torch.rand(100, 2, generator=gen) * 60), dim=1)
    xy = torch.rand(100, 2, generator=gen) * 100
    boxes = torch.cat((xy, xy + 1 + torch.rand(100, 2, generator=gen) * 60), dim=1)
    decoded = coder.decode(coder.encode(boxes.double(), anchors.double()), anchors.double())
    torch.testing.assert_close(decoded, boxes.double(), rtol=0, atol=1e-9)

    # centre moved by one anchor width, width doubled: dx = 10 * 1, dw = 5 * log 2
    deltas = coder.encode(torch.tensor([[5.0, 0.0, 25.0, 10.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    torch.testing.assert_close(deltas, torch.tensor([[10 * 1.0, 0.0, 5 * math.log(2), 0.0]]))


def test_box_coder_clamps_huge_scales():
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    box = BoxCoder().decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), anchor)
    # log(1000/16) caps the growth at 1000/16 times the anchor: a 1000-pixel box around the anchor centre
    torch.testing.assert_close(box, torch.tensor([[8.0 - 500, 8.0 - 500, 8.0 + 500, 8.0 + 500]]))


def _assign(anchors, gt, topk=1):
    anchors = torch.tensor(anchors)
    return ATSSAssigner(topk)(anchors, [1] * len(anchors), torch.tensor(gt)).tolist()


def test_assigner_threshold_is_mean_plus_std_of_candidates():
    # one anchor per level; candidate IoUs 1, 0.25, 0.0625 -> threshold 0.4375 + 0.496 = 0.934
    anchors = [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 40.0, 40.0]]
    assert _assign(anchors, [[0.0, 0.0, 10.0, 10.0]]) == [0, BACKGROUND, BACKGROUND]


def test_assigner_topk_is_per_level():
    # two levels of two anchors each; with topk=1 only the closest anchor of each level is a candidate:
    # level 0 picks [0,0,10,10] (IoU 1) over [1,0,11,10] (IoU 0.82), level 1 its far anchor (IoU 0), and a
    # third level's far anchor (IoU 0): IoUs 1, 0, 0 -> threshold 0.91, only the first is positive
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], FAR1, FAR2, FAR2])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert ATSSAssigner(1)(anchors, [2, 2, 1], gt).tolist() == [0, -1, -1, -1, -1]
    # with topk=2 both level-0 anchors are candidates: IoUs 1, 0.82, 0, 0, 0 -> mean 0.36 + std 0.50 = 0.86
    assert ATSSAssigner(2)(anchors, [2, 2, 1], gt).tolist() == [0, -1, -1, -1, -1]
    gt_between = torch.tensor([[0.5, 0.0, 10.5, 10.0]])  # IoU 0.905 with both level-0 anchors
    assert ATSSAssigner(2)(anchors, [2, 2, 1], gt_between).tolist() == [0, 0, -1, -1, -1]


def test_assigner_needs_anchor_centre_inside_box():
    # IoUs 0.25, 0, 0: threshold 0.228 is reached, but the anchor centre (11, 5) lies outside the box
    assert _assign([[6.0, 0.0, 16.0, 10.0], FAR1, FAR2], [[0.0, 0.0, 10.0, 10.0]]) == [-1, -1, -1]
    # the same anchor moved left: centre (9, 5) inside, IoU 0.43 over threshold 0.39
    assert _assign([[4.0, 0.0, 14.0, 10.0], FAR1, FAR2], [[0.0, 0.0, 10.0, 10.0]]) == [0, -1, -1]


def test_assigner_ties_go_to_highest_iou():
    anchors = [[0.0, 0.0, 10.0, 10.0], FAR1, FAR2]
    inner, exact = [1.0, 1.0, 9.0, 9.0], [0.0, 0.0, 10.0, 10.0]  # IoU 0.64 and 1: both make it positive
    assert _assign(anchors, [inner, exact]) == [1, -1, -1]
    assert _assign(anchors, [exact, inner]) == [0, -1, -1]


def test_assigner_candidates_are_the_nearest_anchors_far_from_the_origin():
    # the anchor centred at (1774, 316) lies 5.657 from the box centre (1770, 312), the one at (1774, 307.99)
    # 5.664: the nearest one must be the level's candidate (and, against two far candidates, the positive).
    # cdist's matrix-product distances (|a|^2 + |b|^2 - 2ab, used past 25 points) err by ~0.1 pixel this
    # far from the origin and swapped the two
    def square(cx, cy, half=8.0):
        return [cx - half, cy - half, cx + half, cy + half]

    fillers = [square(8.0 + 16 * i, 8.0) for i in range(30)]
    anchors = torch.tensor(fillers + [square(1774.0, 307.99), square(1774.0, 316.0), FAR1, FAR2])
    gt = torch.tensor([square(1770.0, 312.0, 20.0)])
    matched = ATSSAssigner(1)(anchors, [32, 1, 1], gt)
    assert torch.nonzero(matched != BACKGROUND).flatten().tolist() == [31]


def test_assigner_centre_must_lie_more_than_001_inside_as_the_release():
    # the release's is_in_gts: min(l, t, r, b) > 0.01. The anchor centred at (9.995, 5) lies 0.005 inside the box:
    # IoU 50.05 / 149.95 = 0.334 reaches mean + std 0.304 of (0.334, 0, 0), but the centre is not 0.01 inside
    assert _assign([[4.995, 0.0, 14.995, 10.0], FAR1, FAR2], [[0.0, 0.0, 10.0, 10.0]]) == [-1, -1, -1]
    # 0.02 inside (IoU 0.335 over 0.305): positive
    assert _assign([[4.98, 0.0, 14.98, 10.0], FAR1, FAR2], [[0.0, 0.0, 10.0, 10.0]]) == [0, -1, -1]


def test_assigner_iou_equal_to_the_threshold_is_positive():
    # the release's candidate_ious >= mean + std: two candidates mirror images about the box centre have the same
    # IoU 80 / 120, so std 0 and the threshold is that IoU; both are positive
    anchors = torch.tensor([[-2.0, 0.0, 8.0, 10.0], [2.0, 0.0, 12.0, 10.0]])
    assert ATSSAssigner(1)(anchors, [1, 1], torch.tensor([[0.0, 0.0, 10.0, 10.0]])).tolist() == [0, 0]


def test_box_coder_weights_are_10_10_5_5_on_every_coordinate():
    # detectron2's / the release's (10, 10, 5, 5): on a box moved and grown along y only (and x only), each delta
    # is its weight times the shift in anchor sizes or the log of the growth
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    tall = torch.tensor([[0.0, 10.0, 10.0, 50.0]])  # centre y 10 -> 30 (one anchor height), height doubled
    torch.testing.assert_close(coder.encode(tall, anchor), torch.tensor([[0.0, 10.0, 0.0, 5 * math.log(2)]]))
    wide = torch.tensor([[-5.0, 0.0, 35.0, 20.0]])  # centre x 5 -> 15 (one anchor width), width times 4
    torch.testing.assert_close(coder.encode(wide, anchor), torch.tensor([[10.0, 0.0, 5 * math.log(4), 0.0]]))
    torch.testing.assert_close(coder.decode(torch.tensor([[0.0, 10.0, 0.0, 5 * math.log(2)]]), anchor), tall)
    torch.testing.assert_close(coder.decode(torch.tensor([[10.0, 0.0, 5 * math.log(4), 0.0]]), anchor), wide)


def test_assigner_centre_exactly_001_inside_is_not_positive():
    # the release's is_in_gts is min(l, t, r, b) > 0.01, strict: the anchor centred at x 0 lies exactly 0.01 (in float32)
    # inside the box's left side at -0.01; its IoU 50.1 / 149.9 = 0.334 reaches the threshold 0.304 of (0.334, 0, 0)
    assert (torch.tensor(0.0) - torch.tensor(-0.01)).item() == torch.tensor(0.01).item()
    assert _assign([[-5.0, 0.0, 5.0, 10.0], FAR1, FAR2], [[-0.01, 0.0, 9.99, 10.0]]) == [-1, -1, -1]


def test_assigner_needs_anchor_centre_inside_vertically_too():
    # the anchors of test_assigner_needs_anchor_centre_inside_box moved along y: IoU 0.25 reaches the threshold 0.228
    # of (0.25, 0, 0) but the centre (5, 11) lies below the box and (5, -1) above it
    gt = [[0.0, 0.0, 10.0, 10.0]]
    assert _assign([[0.0, 6.0, 10.0, 16.0], FAR1, FAR2], gt) == [-1, -1, -1]
    assert _assign([[0.0, -6.0, 10.0, 4.0], FAR1, FAR2], gt) == [-1, -1, -1]
    # centre (5, 9) inside, IoU 0.43 over the threshold 0.39: positive
    assert _assign([[0.0, 4.0, 10.0, 14.0], FAR1, FAR2], gt) == [0, -1, -1]


def test_box_coder_applies_each_weight_to_its_own_coordinate():
    # distinct weights (1, 2, 3, 4), so that using one coordinate's weight for another changes the deltas: the box's
    # centre moves by one anchor width along x and 1.5 anchor heights along y, its width doubles and its height triples
    coder = BoxCoder(weights=(1.0, 2.0, 3.0, 4.0))
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), 10 x 20
    box = torch.tensor([[5.0, 10.0, 25.0, 70.0]])  # centre (15, 40), 20 x 60
    deltas = torch.tensor([[1.0 * 1, 2.0 * 1.5, 3.0 * math.log(2), 4.0 * math.log(3)]])
    torch.testing.assert_close(coder.encode(box, anchor), deltas)
    torch.testing.assert_close(coder.decode(deltas, anchor), box)
