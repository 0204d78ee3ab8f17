"""Perceptual hashes of slices and their Hamming distances: what near-duplicate groups (``splits``)
and scan-order segments (``scans``) both measure look-alike slices with, kept below both so
neither imports the other."""

from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image

from covidlib.data.dataset import Dataset
from covidlib.data.images import decoded
from covidlib.paths import atomic_path, cache_dir

HASH_IMAGE = 128  # slices are decoded at this size before hashing
HASH_BITS_SIDE = 16  # phash with a 16x16 low-frequency DCT block: 256 bits
HASH_BITS = HASH_BITS_SIDE**2
# 48 of 256 bits (19%). On the real data a 64-bit phash chained most slices into one
# giant group at any useful threshold; 256 bits at 48 gives groups of at most ~50.
DEFAULT_THRESHOLD = 48


def phashes(dataset: Dataset, progress: bool = False) -> np.ndarray:
    """256-bit perceptual hashes (imagehash.phash) of every image, as ``(N, 32)`` packed bytes."""
    target = cache_dir() / "phash" / f"{dataset.manifest_hash[:16]}-{HASH_IMAGE}-{HASH_BITS}.npy"
    if target.exists():
        return np.load(target)
    images = decoded(dataset, HASH_IMAGE, progress=progress).images
    bits = np.stack([imagehash.phash(Image.fromarray(img[..., 0]), hash_size=HASH_BITS_SIDE).hash.ravel()
                     for img in images])
    packed = np.packbits(bits.astype(np.uint8), axis=1)
    with atomic_path(target, suffix=".npy") as tmp:
        np.save(tmp, packed)
    return packed


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between two sets of packed hashes: ``(len(a), len(b))``."""
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=-1)


def hamming_blocks(query: np.ndarray, reference: np.ndarray, block: int = 512):
    """``(start, distances)`` for blocks of ``query`` rows against all of ``reference``: memory
    stays at ``block x len(reference)`` whatever the dataset's size."""
    for start in range(0, len(query), block):
        yield start, hamming(query[start : start + block], reference)


def nearest_distance(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each query hash, the Hamming distance to its closest reference hash."""
    if len(reference) == 0:
        return np.full(len(query), HASH_BITS)
    return np.concatenate([d.min(axis=1) for _, d in hamming_blocks(query, reference)]) if len(query) else np.zeros(0, int)
