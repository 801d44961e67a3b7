"""The dataset pipeline: scan a folder, check and repair images, captions, buckets, batch plans, latent cache.

Importing this package loads PIL but not torch or diffusers; torch is imported only by load_pixels and the
latent cache's disk I/O.
"""
from .buckets import Bucket, BatchPlan, bucket_stats, bucket_step, make_buckets, nearest_bucket
from .cache import LatentCache, cache_folder, file_sha256
from .captions import (CAPTION_EXTENSIONS, DATASET_FILE, build_caption, caption_file, dataset_trigger, decode_caption,
                       read_caption,
                       resolve_trigger, set_dataset_trigger, shuffle_tags, split_tags, with_trigger, write_caption)
from .errors import DatasetError, ImageLoadError
from .images import IMAGE_EXTENSIONS, is_image_file, load_image, probe_image, to_rgb
from .pixels import cover_size, crop_box, crop_geometry, load_pixels, needs_fresh_pixels, size_info
from .scan import LINK_OUT, DatasetScan, ImageItem, Skipped, folder_repeats, is_ignored, leaves_folder, scan_dataset

__all__ = [
    "BatchPlan", "Bucket", "CAPTION_EXTENSIONS", "DATASET_FILE", "DatasetError", "DatasetScan", "IMAGE_EXTENSIONS", "ImageItem",
    "ImageLoadError", "LatentCache", "Skipped", "bucket_stats", "bucket_step", "build_caption", "cache_folder", "caption_file", "cover_size",
    "crop_box", "crop_geometry", "dataset_trigger", "decode_caption", "file_sha256", "folder_repeats", "is_ignored", "is_image_file", "leaves_folder", "LINK_OUT", "load_image", "load_pixels", "make_buckets",
    "nearest_bucket", "needs_fresh_pixels", "probe_image", "read_caption", "resolve_trigger", "scan_dataset",
    "set_dataset_trigger", "shuffle_tags", "size_info", "split_tags", "to_rgb", "uses_latent_cache", "with_trigger", "write_caption",
]


def uses_latent_cache(ds) -> bool:
    """Latents are cached when caching is on and no random augmentation needs fresh pixels."""
    return ds.cache_latents != "off" and not needs_fresh_pixels(ds)
