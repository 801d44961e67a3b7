"""The dataset pipeline: scan a folder, check and repair images, captions, buckets, batch plans, latent cache.

Importing this package loads PIL but not torch or diffusers; torch is imported only by load_pixels and the
latent cache's disk I/O.
"""
from .buckets import Bucket, BatchPlan, bucket_stats, bucket_step, make_buckets, nearest_bucket
from .cache import LatentCache, file_sha256
from .captions import CAPTION_EXTENSIONS, build_caption, read_caption, shuffle_tags, split_tags, with_trigger
from .errors import DatasetError, ImageLoadError
from .images import IMAGE_EXTENSIONS, is_image_file, load_image, probe_image, to_rgb
from .pixels import cover_size, crop_box, load_pixels, needs_fresh_pixels
from .scan import DatasetScan, ImageItem, Skipped, folder_repeats, scan_dataset

__all__ = [
    "BatchPlan", "Bucket", "CAPTION_EXTENSIONS", "DatasetError", "DatasetScan", "IMAGE_EXTENSIONS", "ImageItem",
    "ImageLoadError", "LatentCache", "Skipped", "bucket_stats", "bucket_step", "build_caption", "cover_size",
    "crop_box", "file_sha256", "folder_repeats", "is_image_file", "load_image", "load_pixels", "make_buckets",
    "nearest_bucket", "needs_fresh_pixels", "probe_image", "read_caption", "scan_dataset", "shuffle_tags",
    "split_tags", "to_rgb", "uses_latent_cache", "with_trigger",
]


def uses_latent_cache(ds) -> bool:
    """Latents are cached when caching is on and no random augmentation needs fresh pixels."""
    return ds.cache_latents != "off" and not needs_fresh_pixels(ds)
