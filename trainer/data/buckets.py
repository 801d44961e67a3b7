"""Aspect-ratio buckets (kohya style) and the per-epoch batch plan. Stdlib only."""
from __future__ import annotations

import math
import random

Bucket = tuple[int, int]  # (width, height) in pixels

VAE_FACTOR = 8  # SD's VAE halves three times: bucket sides must divide by 8 or the latents lose a row


def make_buckets(resolution: int, step: int) -> list[Bucket]:
    """Every (w, h) with sides multiples of `step` between resolution/2 and 2*resolution and the largest height
    that keeps w*h <= resolution^2, plus the square; sorted. Like kohya's BucketManager."""
    step = bucket_step(resolution, step)
    max_area = resolution * resolution
    low = max(step, resolution // 2 // step * step)
    high = max(low, resolution * 2 // step * step)
    square = max(step, resolution // step * step)
    found = {(square, square)}
    for width in range(low, high + 1, step):
        height = min(high, max_area // width // step * step)
        if height >= low:
            found.update({(width, height), (height, width)})
    return sorted(found)


def bucket_step(resolution: int, step: int) -> int:
    """The step actually used: at most the resolution, and a multiple of both `step` and the VAE factor."""
    step = min(step, resolution)
    return math.lcm(step, VAE_FACTOR)


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest on a log scale (so 2:1 and 1:2 are equally far from 1:1);
    ties go to the larger area."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1], b))


def epoch_repeats(items) -> list[int]:
    """How often each item is drawn per epoch: its folder's repeats; regularization images are cycled in name order
    until they match the training images (kohya's rule, DreamBooth's 1:1 prior preservation), never more."""
    repeats = [0 if item.regularization else item.repeats for item in items]
    cycle = [i for i, item in enumerate(items) if item.regularization for _ in range(item.repeats)]
    if cycle:
        for k in range(sum(repeats)):
            repeats[cycle[k % len(cycle)]] += 1
    return repeats


class BatchPlan:
    """Which bucket each item trains at, and the shuffled batches of each epoch (each batch from one bucket)."""

    def __init__(self, scan, ds, seed: int):
        self.batch_size = ds.batch_size
        self.seed = seed
        self._repeats = epoch_repeats(scan.items)
        if ds.bucketing:
            choices = make_buckets(ds.resolution, ds.bucket_step)
            self._bucket = [nearest_bucket(item.width, item.height, choices) for item in scan.items]
        else:
            self._bucket = [(ds.resolution, ds.resolution)] * len(scan.items)
        self.buckets: dict[Bucket, list[int]] = {}
        for index, bucket in sorted(enumerate(self._bucket), key=lambda pair: (pair[1], pair[0])):
            self.buckets.setdefault(bucket, []).append(index)

    def bucket_of(self, item_index: int) -> Bucket:
        return self._bucket[item_index]

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch: each image counted `repeats` times; a bucket's last partial batch is kept."""
        return sum(math.ceil(self._pool_size(members) / self.batch_size) for members in self.buckets.values())

    def epoch(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, a function of (seed, epoch) only, so a resumed run replays the same order."""
        rng = random.Random(f"loradesk-batches:{self.seed}:{epoch}")  # str seeds hash with sha512: stable
        batches = []
        for members in self.buckets.values():
            pool = [index for index in members for _ in range(self._repeats[index])]
            rng.shuffle(pool)
            batches += [pool[start:start + self.batch_size] for start in range(0, len(pool), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def _pool_size(self, members: list[int]) -> int:
        return sum(self._repeats[index] for index in members)


def bucket_stats(scan, plan: BatchPlan) -> dict[Bucket, int]:
    """Images per bucket (repeats not counted), sorted by bucket, for the dataset tab."""
    return {bucket: len(members) for bucket, members in sorted(plan.buckets.items())}
