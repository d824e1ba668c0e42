"""Images: one file decoded with Pillow and converted to the configured format, and the one
uint8 -> float conversion every path into a model uses."""

from __future__ import annotations

import os
from pathlib import Path

import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


def printable(name: str | Path) -> str:
    """A file name as text any UTF-8 file and any one-line record can hold, faithfully: bytes
    that are not UTF-8 as ``\\xNN``, control characters (a newline in a name) escaped."""
    text = os.fsencode(str(name)).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def is_image_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def to_model_input(x: torch.Tensor) -> torch.Tensor:
    """Images as every model here takes them: float in [0, 1] (the lecture's ``ToTensor``), channels_last.

    ``x`` is uint8 0-255 (scaled) or already float in [0, 1] (kept).
    """
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    return x.contiguous(memory_format=torch.channels_last)


def convert_images(x: torch.Tensor, channels: int, height: int, width: int) -> tuple[torch.Tensor, bool, bool]:
    """Bring decoded images (C, H, W) or (N, C, H, W), uint8 or uint16, to the configured format.

    Returns the uint8 result and whether the mode and the size were changed.
    """
    mode_changed = False
    if x.dtype == torch.uint16:  # 16-bit PNG: keep the high byte
        x = (x.to(torch.int32) >> 8).to(torch.uint8)
        mode_changed = True
    elif x.dtype != torch.uint8:
        raise ValueError(f"unsupported pixel type {x.dtype}")
    c = x.shape[-3]
    if c in (2, 4):  # drop alpha
        x = x[..., : c - 1, :, :]
        mode_changed = True
    c = x.shape[-3]
    if c != channels:
        mode_changed = True
        if c == 1:
            x = x.expand(*x.shape[:-3], channels, *x.shape[-2:])
        elif c == 3 and channels == 1:
            from torchvision.transforms.v2 import functional as TF  # here: torchvision takes seconds to import

            x = TF.rgb_to_grayscale(x)
        else:
            raise ValueError(f"cannot convert {c} channels to {channels}")
    resized = tuple(x.shape[-2:]) != (height, width)
    if resized:
        from torchvision.transforms.v2 import functional as TF

        x = TF.resize(x, [height, width], antialias=True)
    return x.contiguous(), mode_changed, resized


def decode_file(path: Path, channels: int = 3, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, bool]:
    """Decode one image file with Pillow to a uint8 (channels, H, W) tensor.

    Returns the tensor and whether its mode had to change (grey, palette, alpha, 16-bit, ...).
    With ``size`` (height, width) a large JPEG is decoded at a reduced scale that still
    covers it. Runs once per file when a source is first cached, never in the training loop.
    """
    from PIL import Image

    target = "RGB" if channels == 3 else "L"
    with Image.open(path) as im:
        if size is not None and im.format == "JPEG":
            im.draft(target, (size[1], size[0]))  # a 4000x3000 photo need not be decoded whole
        im.load()  # truncated or corrupt files fail here, not later
        return pil_to_tensor(im, channels)


def pil_to_tensor(im, channels: int | None = None) -> tuple[torch.Tensor, bool]:
    """A PIL image as a uint8 (channels, H, W) tensor, as training decodes its files: upright (EXIF), the high
    byte of 16-bit grey, float grey in [0, 1] scaled to 0-255, palettes and alpha to RGB (``channels`` None:
    grey stays one channel, anything else three). Returns the tensor and whether its mode had to change."""
    import numpy as np
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)  # a phone photo stored sideways is shown, and trained, upright
    mode = im.mode
    if channels is None:
        channels = 1 if mode in ("1", "L", "F", "LA") or mode.startswith("I") else 3
    target = "RGB" if channels == 3 else "L"
    if mode.startswith("I"):  # 16/32-bit integer grey: keep the high byte of 16 bits
        im = Image.fromarray((np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8), "L")
    elif mode == "F":  # 32-bit float grey (scientific TIFFs): [0, 1] scaled to 0-255, else 0-255 as it is
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError("float pixels that are not finite (NaN or infinity)")
        scale = 255.0 if a.size and a.min() >= 0 and a.max() <= 1 else 1.0
        im = Image.fromarray((a * scale).round().clip(0, 255).astype(np.uint8), "L")
    if im.mode != target:
        im = im.convert(target)
    t = torch.from_numpy(np.asarray(im).copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t, mode != target


def load_image(path: Path, channels: int, height: int, width: int) -> tuple[torch.Tensor, bool, bool]:
    """One file exactly as training sees it: decoded, converted and resized to (channels, height, width).

    Returns the uint8 tensor and whether its mode and its size were changed.
    """
    img, mode_changed = decode_file(path, channels, (height, width))
    img, _, resized = convert_images(img, channels, height, width)
    return img, mode_changed, resized
