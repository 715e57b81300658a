"""The built-in entries. Formats and measured accuracies: ``shared/assets/README.md``."""

from __future__ import annotations

from autodfp.models.face_ultralight import ultralight_face_rfb, ultralight_face_slim
from autodfp.models.mobilenet import mobilenet_v1_075, mobilenet_v2_100_folded
from autodfp.models.registry import (
    CIFAR10_TEST,
    CIFAR_PRE,
    IMAGENET_VAL,
    TF_IMAGENET_PRE,
    DatasetRef,
    ModelConfig,
    Preprocessing,
    WeightsRef,
    register,
)
from autodfp.models.resnet_cifar import resnet20, resnet56

_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"

register(
    ModelConfig(
        name="resnet20_cifar10",
        builder=resnet20,
        weights=WeightsRef(
            "resnet20-12fca82f.th",
            "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
            _AKAMASTER + "resnet20-12fca82f.th",
            key="state_dict",
        ),
        preprocessing=CIFAR_PRE,
        num_classes=10,
        default_dataset=CIFAR10_TEST,
        description="CIFAR-10 ResNet-20, option-A shortcut (akamaster, BSD-2)",
    )
)

register(
    ModelConfig(
        name="resnet56_cifar10",
        builder=resnet56,
        weights=WeightsRef(
            "resnet56-4bfd9763.th",
            "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
            _AKAMASTER + "resnet56-4bfd9763.th",
            key="state_dict",
        ),
        preprocessing=CIFAR_PRE,
        num_classes=10,
        default_dataset=CIFAR10_TEST,
        description="CIFAR-10 ResNet-56, option-A shortcut (akamaster, BSD-2)",
    )
)

# The two MobileNets are conversions of Google's TF releases; no upstream URL serves the converted
# PyTorch file, so resolution stops at the mirror/cache and says where to place it.
register(
    ModelConfig(
        name="mobilenet_v1_075_imagenet",
        builder=mobilenet_v1_075,
        weights=WeightsRef(
            "mobilenet_v1_0.75-imagenet.pth", "5d8381faf255b6b9d3c038d0eadccb984590e88da3344754f7a54eef46af1e51"
        ),
        preprocessing=TF_IMAGENET_PRE,
        num_classes=1000,
        default_dataset=IMAGENET_VAL,
        description="ImageNet MobileNet-V1 0.75 (Keras/TF.js release, Apache-2.0), BN eps 1e-3, TF SAME padding",
    )
)

register(
    ModelConfig(
        name="mobilenet_v2_100_imagenet_bnfolded",
        builder=mobilenet_v2_100_folded,
        weights=WeightsRef(
            "mobilenet_v2_1.0-imagenet-bnfolded.pth", "6001968f8f85112fd1275b9a90f65628030787f7feef36c1dd53ee30569cbdd6"
        ),
        preprocessing=TF_IMAGENET_PRE,
        num_classes=1001,
        label_offset=1,
        default_dataset=IMAGENET_VAL,
        description="ImageNet MobileNet-V2 1.0, BN folded into biases, int8-rounded weights (coral, Apache-2.0)",
    )
)

# Face detectors (Linzaer/Ultra-Light-Fast-Generic-Face-Detector-1MB, MIT). Upstream feeds
# (x - 127) / 128 of the RGB image resized to 320×240; on [0, 1] pixels that is mean 127/255 and
# std 128/255. No labelled face set exists here, so the default evaluation data are photographs on
# which the unpruned model's own detections serve as ground truth (autodfp.eval.detection).
_FACE_PRE = Preprocessing(240, (127 / 255,) * 3, (128 / 255,) * 3, input_hw=(240, 320))
_FACE_DIR = "detection/face-ultralight"
_FACE_DATA = DatasetRef("self", f"{_FACE_DIR}/sample-images,detection/coco128-val2017/images")

register(
    ModelConfig(
        name="ultralight_face_slim_320",
        builder=ultralight_face_slim,
        weights=WeightsRef(
            "version-slim-320.pth",
            "cd24abce45da5dbc7cfd8167cd3d5f955382dfc9d9ae9459f0026abd3c2e38a4",
            subdir=_FACE_DIR,
        ),
        preprocessing=_FACE_PRE,
        num_classes=2,
        default_dataset=_FACE_DATA,
        description="Ultra-Light face detector, slim, 320×240, outputs (logits, box offsets) (Linzaer, MIT)",
        task="detection",
    )
)

register(
    ModelConfig(
        name="ultralight_face_rfb_320",
        builder=ultralight_face_rfb,
        weights=WeightsRef(
            "version-RFB-320.pth",
            "c722b4427cc71642768baef6e15c659931b56f07425e5d2b0ec033ad41b145b3",
            subdir=_FACE_DIR,
        ),
        preprocessing=_FACE_PRE,
        num_classes=2,
        default_dataset=_FACE_DATA,
        description="Ultra-Light face detector, RFB, 320×240, outputs (logits, box offsets) (Linzaer, MIT)",
        task="detection",
    )
)
