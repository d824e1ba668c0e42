"""Data: sources decoded once into a cached uint8 array, splits, and batches on the training device.

``sources`` finds and decodes (folders, archives, CIFAR-10) with a cache; ``images`` decodes and
converts one file and holds the one uint8 -> model-input conversion; ``archives`` extracts
safely; ``rows`` reads a set's rows from the cache file; ``batches`` splits, and makes batches
sliced on the training device or read from the host and prefetched.
"""

from .archives import ARCHIVE_SUFFIXES, extract_archive, file_sha256, is_archive, safe_extract
from .batches import DeviceBatches, per_class_subset, split_indices
from .images import IMAGE_EXTENSIONS, convert_images, decode_file, is_image_file, load_image, to_model_input
from .sources import ImageSet, load_source, scan_folder

__all__ = [
    "ARCHIVE_SUFFIXES",
    "IMAGE_EXTENSIONS",
    "DeviceBatches",
    "ImageSet",
    "convert_images",
    "decode_file",
    "extract_archive",
    "file_sha256",
    "is_archive",
    "is_image_file",
    "load_image",
    "load_source",
    "per_class_subset",
    "safe_extract",
    "scan_folder",
    "split_indices",
    "to_model_input",
]
