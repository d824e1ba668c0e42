"""Images a Python user already holds: tensors, numpy arrays, PIL images, ``torch.utils.data.Dataset``.

Everything is brought once to the uint8 ``N x C x H x W`` tensor that folders and archives
decode to (same channel conversion and antialiased resize), so training, the probes and
``encode`` treat it exactly like a decoded source.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from ..utils.errors import ConvaeError
from ..utils.records import Log
from .images import convert_images, pil_to_tensor
from .sources import MAX_CLASSES, ImageSet


def _one_image(x: Any) -> torch.Tensor:
    """A PIL image, numpy array or tensor of ONE image as uint8 (C, H, W); a PIL image converted as training
    decodes a file (:func:`convae.data.images.pil_to_tensor`)."""
    from PIL import Image

    if isinstance(x, Image.Image):
        try:
            return pil_to_tensor(x)[0]
        except ValueError as e:
            raise ConvaeError(f"cannot read a PIL image of mode {x.mode}: {e}") from None
    t = images_tensor(x)
    if t.shape[0] != 1:
        raise ConvaeError(f"expected one image, got a batch of {t.shape[0]}")
    return t[0]


def images_tensor(x: Any) -> torch.Tensor:
    """Images as uint8 (N, C, H, W), from what users hold.

    Accepts a tensor or numpy array of one image (C, H, W) / (H, W, C) / (H, W) or a batch
    (N, C, H, W) / (N, H, W, C); uint8 0-255 or float in [0, 1]; a PIL image or a list of them.
    Channels-last input is recognised by a last axis of 1, 3 or 4 that the second axis is not.
    """
    if isinstance(x, (list, tuple)):
        if not x:
            raise ConvaeError("no images given (an empty list)")
        images = [_one_image(i) for i in x]
        if len({tuple(i.shape) for i in images}) > 1:
            raise ConvaeError(
                "a list of images of different sizes or channels is one batch only once converted: give the "
                "model's format (convae.transform(model) converts any list)"
            )
        return torch.stack(images)
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        if hasattr(x, "getbands"):  # one PIL image
            return images_tensor([x])
        raise ConvaeError(
            f"cannot read images from a {type(x).__name__}: give a tensor, a numpy array, "
            "a PIL image, a list of them, a Dataset, or a path"
        )
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "uif":  # objects, strings, booleans, complex numbers
            raise ConvaeError(f"images must hold numbers (uint8 0-255 or float 0-1), got a numpy array of {x.dtype}")
        x = np.ascontiguousarray(x)
        t = torch.from_numpy(x if x.flags.writeable else x.copy())  # a PIL image's array is read-only
    else:
        t = x.detach().cpu()
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.dtype in _INT_TYPES):
        raise ConvaeError(f"images must hold numbers (uint8 0-255 or float 0-1), got {t.dtype}")
    if t.numel() == 0:
        raise ConvaeError(f"no images given (an empty array of shape {tuple(t.shape)})")
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[None] if t.shape[0] in (1, 3, 4) or t.shape[-1] not in (1, 3, 4) else t.permute(2, 0, 1)[None]
    elif t.ndim == 4:
        if t.shape[1] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
            t = t.permute(0, 3, 1, 2)
    else:
        raise ConvaeError(f"images must be (H, W), (C, H, W) or (N, C, H, W); got shape {tuple(t.shape)}")
    if t.shape[1] not in (1, 2, 3, 4):
        raise ConvaeError(f"images must have 1 (grey) or 3 (RGB) channels; got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if t.numel() and (not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1):
            raise ConvaeError("float images must hold values in [0, 1] (uint8 images 0-255)")
        t = (t * 255).round().to(torch.uint8)
    elif t.dtype != torch.uint8:
        if t.numel() and (t.min() < 0 or t.max() > 255):
            raise ConvaeError(
                f"integer images must hold values 0-255, got {t.dtype} from {int(t.min())} to {int(t.max())}"
            )
        t = t.to(torch.uint8)
    return t.contiguous()


_INT_TYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def to_model_format(x: Any, channels: int, height: int, width: int) -> torch.Tensor:
    """``images_tensor(x)`` converted as training converts a decoded source: channels, then an
    antialiased resize to ``height`` x ``width``. uint8 (N, C, H, W)."""
    if isinstance(x, (list, tuple)) and x:  # each image converted on its own: their sizes and modes may differ
        return torch.cat([convert_images(_one_image(i)[None], channels, height, width)[0] for i in x])
    return convert_images(images_tensor(x), channels, height, width)[0]  # alpha dropped there too


def _labels_tensor(labels: Any, n: int) -> torch.Tensor:
    try:
        y = torch.as_tensor(np.asarray(labels))
    except (TypeError, ValueError, RuntimeError):
        raise ConvaeError(f"labels must be {n} integers (one per image), got {type(labels).__name__}") from None
    if y.ndim != 1 or y.shape[0] != n or y.is_floating_point() or y.dtype == torch.bool:
        raise ConvaeError(f"labels must be {n} integers (one per image), got shape {tuple(y.shape)} {y.dtype}")
    if n and int(y.min()) < 0:
        raise ConvaeError("labels must be integers >= 0")
    return y.to(torch.int64)


def image_set(
    data: Any,
    labels: Any = None,
    classes: list[str] | None = None,
    channels: int = 3,
    height: int = 32,
    width: int = 32,
    log: Log = print,
) -> ImageSet:
    """An :class:`ImageSet` from a tensor/array of images (with optional ``labels``) or a Dataset
    whose items are ``(image, label)`` or ``image``."""
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.Tensor):
        data, labels, classes = _from_dataset(data, classes, log)
    images = to_model_format(data, channels, height, width)
    n = images.shape[0]
    if n == 0:
        raise ConvaeError("no images given (an empty batch)")
    y = None if labels is None else _labels_tensor(labels, n)
    if classes is not None and (
        isinstance(classes, str) or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes)
    ):
        raise ConvaeError("classes must be a list of distinct class names (strings)")
    if y is not None:
        k = int(y.max()) + 1
        if k > MAX_CLASSES:  # a class name for every label below the largest: bounded before it is built
            raise ConvaeError(
                f"labels go up to {k - 1}: convae trains at most {MAX_CLASSES:,} classes",
                advice="give the labels as 0 .. classes - 1",
            )
        classes = list(classes) if classes is not None else [str(i) for i in range(k)]
        if len(classes) < k:
            raise ConvaeError(f"labels go up to {k - 1} but only {len(classes)} class names were given")
    h = hashlib.sha256(images.numpy().tobytes())
    if y is not None:
        h.update(y.numpy().tobytes())
    key = "memory-" + h.hexdigest()[:24]
    name = f"in-memory images ({n}x{channels}x{height}x{width})"
    return ImageSet(images, y, classes or [], [f"{i}" for i in range(n)], [], name, key)


def _from_dataset(ds: Any, classes: list[str] | None, log: Log) -> tuple[list, list | None, list[str] | None]:
    from tqdm.auto import tqdm

    try:
        n = len(ds)
    except TypeError:
        raise ConvaeError("the Dataset has no length: give a map-style Dataset or a tensor") from None
    if n == 0:
        raise ConvaeError("the Dataset is empty")
    images, labels = [], []
    for i in tqdm(range(n), desc="reading the Dataset", unit="img", leave=False, mininterval=1.0, disable=None):
        item = ds[i]
        if isinstance(item, (tuple, list)) and len(item) == 2:
            images.append(_one_image(item[0]))
            labels.append(int(item[1]))
        else:
            images.append(_one_image(item))
    sizes = {tuple(t.shape) for t in images}
    if len(sizes) > 1:  # mixed sizes: brought to one size per image, as decoding does
        images = [convert_images(t, images[0].shape[0], *images[0].shape[1:])[0] for t in images]
    log(f"read {n} images from {type(ds).__name__}")
    names = classes or getattr(ds, "classes", None)
    if labels and len(labels) != n:
        raise ConvaeError("some Dataset items have a label and some do not")
    return torch.stack(images), (labels or None), (list(names) if names else None)
