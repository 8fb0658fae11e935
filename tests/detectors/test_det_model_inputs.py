"""The detectors' Python API as a torchvision user calls it: a bad argument is one TypeError or ValueError naming the
argument and the image, raised before the network runs, for every architecture; unusual but valid targets train."""

import contextlib
import math

import pytest
import torch

from detectors.build import ARCHITECTURES, build_detector
from detectors.config import BackboneConfig, ModelConfig

BOX = torch.tensor([[4.0, 4.0, 40.0, 30.0]])
LABEL = torch.tensor([1])
SIZES = [(64, 64), (60, 50)]


@pytest.fixture(scope="module")
def models():
    backbone = BackboneConfig(name="slim", weights=None, norm="gn", gn_groups=4, freeze_at=0, widths=[8, 8, 8, 8],
                              depths=[1, 1, 1, 1])
    torch.manual_seed(0)
    return {
        arch: build_detector(ModelConfig(meta_architecture=arch, backbone=backbone, fpn_channels=16,
                                         dyhead_channels=16, dyhead_blocks=1, dyhead_backend="torchvision"), 3)
        for arch in ARCHITECTURES
    }


@contextlib.contextmanager
def _backbone_must_not_run(model):
    """The check must refuse the call before any of the network runs."""

    def fail(module, args):
        raise AssertionError("the backbone ran")

    handle = model.backbone.register_forward_pre_hook(fail)
    try:
        yield
    finally:
        handle.remove()


def _target(boxes=BOX, labels=LABEL, **extra):
    return {"boxes": boxes, "labels": labels, **extra}


def _images(n=2):
    return torch.zeros(n, 3, 64, 64)


BAD_TARGETS = [
    ([_target()], ValueError, r"^targets: 1 dicts for a batch of 2 images$"),
    (_target(), TypeError, r"^targets: expected a list of one dict per image, got a dict"),
    ([_target(BOX[0]), _target()], ValueError, r"^targets\[0\]\['boxes'\]: expected shape \(G, 4\), got \(4,\)$"),
    ([_target(), _target(BOX.long())], TypeError,
     r"^targets\[1\]\['boxes'\]: expected a floating dtype, got torch.int64"),
    ([_target(labels=LABEL.float()), _target()], TypeError, r"^targets\[0\]\['labels'\]: expected int64 class indices"),
    ([_target(labels=torch.tensor([1, 2])), _target()], ValueError,
     r"^targets\[0\]\['labels'\]: expected shape \(1,\), one per box, got \(2,\)$"),
    ([_target(), _target(iscrowd=torch.tensor([True, False]))], ValueError,
     r"^targets\[1\]\['iscrowd'\]: expected shape \(1,\), one per box, got \(2,\)$"),
    ([{"boxes": BOX}, _target()], ValueError, r"^targets\[0\]: no 'labels'"),
    ([_target(), [BOX, LABEL]], TypeError, r"^targets\[1\]: expected a dict with 'boxes' and 'labels', got a list$"),
    ([_target(), _target(labels=[1])], TypeError, r"^targets\[1\]\['labels'\]: expected a tensor, got a list$"),
    # -1 would index the last class; 3 == num_classes is past the end
    ([_target(), _target(torch.cat([BOX, BOX]), torch.tensor([0, -1]))], ValueError,
     r"^targets\[1\]\['labels'\]\[1\]: -1 is not a class index in \[0, 3\)"),
    ([_target(labels=torch.tensor([3])), _target()], ValueError, r"^targets\[0\]\['labels'\]\[0\]: 3 is not a class"),
    ([_target(), _target(torch.tensor([[40.0, 4, 4, 30]]))], ValueError,
     r"^targets\[1\]\['boxes'\]\[0\]: \[40.0, 4.0, 4.0, 30.0\] is not a box x1,y1,x2,y2 with finite coordinates, "
     r"x2 > x1 and y2 > y1$"),
    ([_target(torch.tensor([[4.0, 30, 40, 30]])), _target()], ValueError,
     r"^targets\[0\]\['boxes'\]\[0\]: .* not a box"),
    ([_target(torch.tensor([[math.nan, 4, 40, 30]])), _target()], ValueError, r"^targets\[0\]\['boxes'\]\[0\]: \[nan"),
    ([_target(torch.tensor([[0, 4, math.inf, 30]])), _target()], ValueError, r"^targets\[0\]\['boxes'\]\[0\]: .*inf"),
]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("targets, error, message", BAD_TARGETS)
def test_bad_targets_name_the_image_and_field(models, arch, targets, error, message):
    """Each bad target is refused by the check, before the backbone runs."""
    model = models[arch].train()
    with _backbone_must_not_run(model), pytest.raises(error, match=message):
        model(_images(), SIZES, targets)


BAD_CALLS = [
    (dict(images=list(_images())), True, TypeError, r"^images: expected one \(N, 3, H, W\) float tensor .* got a list"),
    (dict(images=_images()[0]), True, ValueError, r"^images: expected shape \(N, 3, H, W\), got \(3, 64, 64\)$"),
    (dict(images=_images().to(torch.uint8)), True, TypeError, r"^images: expected a floating dtype"),
    (dict(image_sizes=SIZES[:1]), True, ValueError, r"^image_sizes: 1 sizes for a batch of 2 images$"),
    (dict(image_sizes=[(64, 64), (65, 64)]), False, ValueError,
     r"^image_sizes\[1\]: expected a positive \(h, w\) within the padded images' 64x64, got \(65, 64\)$"),
    (dict(image_sizes=[(64, 64), (60.5, 50)]), True, TypeError, r"^image_sizes\[1\]: expected a pair \(h, w\) of ints"),
    (dict(image_sizes=iter(SIZES)), False, TypeError, r"^image_sizes: expected a list of one \(h, w\) per image"),
    (dict(targets=None), True, ValueError, r"^targets are required in training mode$"),
    (dict(original_sizes=[(10, 10)]), False, ValueError, r"^original_sizes: 1 sizes for a batch of 2 images$"),
    (dict(original_sizes=[(10, 10), (0, 10)]), False, ValueError, r"^original_sizes\[1\]: expected a positive"),
]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("call, training, error, message", BAD_CALLS)
def test_bad_images_and_sizes_are_named(models, arch, call, training, error, message):
    """Images, sizes, missing targets in training and original_sizes in eval are checked before the backbone."""
    model = models[arch].train(training)
    kwargs = {"images": _images(), "image_sizes": SIZES, "targets": [_target(), _target()], **call}
    with _backbone_must_not_run(model), pytest.raises(error, match=message):
        model(**kwargs)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_valid_unusual_targets_train(models, arch):
    """An image without boxes, crowd boxes, the engine's extra keys, half-precision boxes, sizes as 0-d tensors,
    and in eval sizes as an (N, 2) tensor and targets that are not read at all, all pass the check and give finite
    losses / detections."""
    model = models[arch].train()
    targets = [
        _target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), iscrowd=torch.zeros(0, dtype=torch.bool)),
        _target(torch.cat([BOX, BOX + 2]).half(), torch.tensor([0, 2]), iscrowd=torch.tensor([False, True]),
                image_id=7, orig_size=(120, 100), size=(60, 50)),
    ]
    sizes = [(64, 64), (torch.tensor(60), torch.tensor(50))]
    losses = model(_images(), sizes, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        detections = model(_images(), torch.tensor(SIZES), [{"boxes": None}], original_sizes=[(128, 128), (120, 100)])
    assert len(detections) == 2
