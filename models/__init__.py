"""sevi-serve's method and models: SEVI alignment, contrastive decoding, family adapters, the engine core."""

from models.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()
