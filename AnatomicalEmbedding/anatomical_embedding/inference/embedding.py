"""Dense embedding of a volume: coarse map for the whole volume, fine map on demand, disk cache.

A full-resolution 64-d map of a 512x512x300 CT would take several GB, so it is never built:

* the **coarse** (global, stride ``s``) map is computed once for the whole volume with a numpy
  Gaussian-blended sliding window (shared by the torch and ONNX Runtime backends, so they agree), and
  the fine output of each window is dropped as soon as it is produced;
* the **fine** (local, full resolution) map is computed on demand in cubic *tiles* of ``fine_tile``
  voxels, each from a window that adds ``fine_margin`` voxels of context on every side.

Both are cached on disk (see :class:`EmbeddingCache`) as float16 under a key made of the image content
hash, the model hash, the model spacing and the window settings, so any change to the image or model
gives a new key. Coordinates: :class:`VolumeEmbedding` keeps ``prepared``, the resampled, intensity-
normalised and padded volume; every index below is a continuous voxel index (i, j, k) on that grid, and
world points are LPS, converted through the ``Volume`` methods only.

2D images (single-slice volumes): a network with ``size_multiple`` 16 cannot see one slice, so the
slice is replicated to ``size_multiple`` slices (the original at index ``size_multiple // 2``), embedded as a
thin slab, and every search is restricted to that slice (the *valid box*).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from anatomical_embedding.inference.backends import EmbeddingModel
from anatomical_embedding.io import Volume, check_finite, reorient_to_canonical, resample_to_spacing
from anatomical_embedding.io.intensity import intensity_warnings
from anatomical_embedding.io.settings import check_ranges, ranged

log = logging.getLogger(__name__)

CACHE_ENV = "ANATOMICAL_EMBEDDING_CACHE"
CACHE_VERSION = 1
#: Smallest window (voxels per axis) of the dense fine pass: more context per voxel, fewer windows.
DENSE_FINE_WINDOW = 64
#: Largest dense fine map (float16 bytes) that ``EmbedConfig.dense_fine`` keeps; larger images use tiles.
DENSE_FINE_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class EmbedConfig:
    """Sliding-window and fine-tile settings (part of the cache key)."""

    #: Sliding-window size along (i, j, k); ``None`` uses the model's training patch size.
    window: tuple[int, int, int] | None = None
    #: Window overlap as a fraction (MONAI's default is 0.25).
    overlap: float = 0.25
    #: Gaussian blending sigma as a fraction of the window (MONAI's ``sigma_scale`` default 0.125).
    sigma_scale: float = 0.125
    #: Fine tiles are cubes of this many voxels (a multiple of the model's size_multiple).
    fine_tile: int = 16
    #: Context voxels added on each side of a fine window (instance norm and receptive field need it).
    fine_margin: int = 16
    #: Smallest size in voxels, at the model spacing, of a non-flat axis.
    min_size: int = 16
    #: Compute a dense fine map of the whole image when embedding (one sliding-window pass, see
    #: :meth:`VolumeEmbedding.dense_fine`) and read every fine vector from it instead of from canonical tiles: a
    #: click then computes nothing, and the robust prior's refinement needs it anyway. Images whose map would
    #: exceed ``DENSE_FINE_MAX_BYTES`` (float16) fall back to tiles.
    dense_fine: bool = False
    #: Take the coarse map from windows of the dense fine pass (at least ``DENSE_FINE_WINDOW`` voxels) instead of
    #: the model's training patch size. Not in the papers (AEFM embeds at its patch size): more context per window
    #: and, with ``dense_fine``, one network pass per image instead of two (the dense pass's coarse outputs are the
    #: coarse map). On the real-data benchmark it kept the robust prior's errors (``benchmarks/results/real.md``).
    coarse_from_dense: bool = False
    #: Not in the papers (they slide cubes of the window), opt-in: with a positive value each image gets its own
    #: window shape, at least the cube's side (or the whole axis) along every axis and at most this many voxels,
    #: chosen to make the network process the fewest voxels at the same overlap (:func:`fit_window_kji`). A
    #: 512x512x300 CT at 1 mm takes 75 windows of 128^3 (2^21 voxels) instead of 320 cubes of 96^3. Off by default:
    #: the shipped models, trained on 32^3 patches, match worse without the prior with larger windows (real-data
    #: benchmark, intra-subject MR 34.3 against 21.8 mm; the robust prior's errors were unchanged). 0: cubes.
    max_window_voxels: int = ranged(0, 0)

    def __post_init__(self) -> None:
        check_ranges(self, "")

    @classmethod
    def dense(cls, **changes) -> "EmbedConfig":
        """How the product embeds for matching (viewer, ``match``, demo, benchmarks): a dense fine map, and the
        coarse map from the same pass."""
        return cls(**{"dense_fine": True, "coarse_from_dense": True, **changes})

    def key(self) -> dict:
        # dense_fine changes where fine vectors are read from, not what is cached (coarse map, tiles, dense map).
        d = asdict(self)
        d.pop("dense_fine")
        if not d["max_window_voxels"]:  # cubes, as before the option existed: their cache entries stay valid
            d.pop("max_window_voxels")
        return d


# ---- cache --------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "anatomical-embedding"


def image_hash(volume: Volume) -> str:
    """sha256 of the voxel data (dtype, shape, bytes) and geometry."""
    h = hashlib.sha256()
    arr = np.ascontiguousarray(volume.array)
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(memoryview(arr).cast("B"))
    for v in (volume.spacing, volume.origin, volume.direction):
        h.update(np.round(np.asarray(v, dtype=np.float64), 6).tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """On-disk cache of coarse maps and fine tiles, with LRU eviction by total size.

    Layout: ``<root>/<key>/meta.json``, ``coarse.npy`` (float16, (C, k, j, i)), ``fine/<a>_<b>_<c>.npy``
    (float16 tiles, indices along (i, j, k)), and other arrays kept as they are (:meth:`save_array`: a few-shot
    case's voxel sample) as ``<name>.npy``. Access times are recorded with ``os.utime`` (mtime), and
    eviction deletes the least recently used *files* (coarse maps and tiles alike) until the total is
    under ``budget_bytes``.
    """

    def __init__(self, root: str | os.PathLike | None = None, budget_bytes: int = 4 << 30) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.budget_bytes = int(budget_bytes)
        self._writes = 0

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    @staticmethod
    def _touch(path: Path) -> None:
        try:
            os.utime(path, None)
        except OSError:
            pass

    def _save(self, path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
        self._writes += 1

    def _load(self, path: Path) -> np.ndarray | None:
        if not path.is_file():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:  # a truncated file from a killed process: recompute
            log.warning("ignoring unreadable cache file %s (%s)", path, exc)
            return None
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():  # written by an older version
            log.warning("ignoring non-finite cache file %s", path)
            return None
        self._touch(path)
        return arr

    def load_coarse(self, key: str) -> np.ndarray | None:
        return self._load(self.entry_dir(key) / "coarse.npy")

    def save_coarse(self, key: str, coarse: np.ndarray, meta: dict) -> None:
        if not np.isfinite(coarse).all():  # a poisoned entry would be served to every later run
            raise ValueError(f"refusing to cache a non-finite coarse map ({key[:12]})")
        d = self.entry_dir(key)
        d.mkdir(parents=True, exist_ok=True)
        (d / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        self._save(d / "coarse.npy", coarse.astype(np.float16))
        self.evict()

    def load_dense_fine(self, key: str) -> np.ndarray | None:
        return self._load(self.entry_dir(key) / "fine_dense.npy")

    def save_dense_fine(self, key: str, fine: np.ndarray) -> None:
        if not np.isfinite(fine).all():
            raise ValueError(f"refusing to cache a non-finite fine map ({key[:12]})")
        self._save(self.entry_dir(key) / "fine_dense.npy", fine.astype(np.float16))
        self.evict()

    def load_tile(self, key: str, tile: Sequence[int]) -> np.ndarray | None:
        return self._load(self.entry_dir(key) / "fine" / ("%d_%d_%d.npy" % tuple(tile)))

    def has_tile(self, key: str, tile: Sequence[int]) -> bool:
        return (self.entry_dir(key) / "fine" / ("%d_%d_%d.npy" % tuple(tile))).is_file()

    def save_tile(self, key: str, tile: Sequence[int], block: np.ndarray) -> None:
        if not np.isfinite(block).all():
            log.warning("not caching a non-finite fine tile %s of %s", tuple(tile), key[:12])
            return
        self._save(self.entry_dir(key) / "fine" / ("%d_%d_%d.npy" % tuple(tile)), block.astype(np.float16))
        if self._writes % 64 == 0:
            self.evict()

    def load_array(self, key: str, name: str) -> np.ndarray | None:
        """Another array kept under ``key`` (e.g. a few-shot case's voxel sample), as saved; None when missing."""
        return self._load(self.entry_dir(key) / f"{name}.npy")

    def save_array(self, key: str, name: str, array: np.ndarray) -> None:
        """Keep ``array`` as is (no float16) under ``key``; it counts towards the budget like the maps."""
        self._save(self.entry_dir(key) / f"{name}.npy", np.asarray(array))
        self.evict()

    def files(self) -> list[tuple[float, int, Path]]:
        out = []
        if not self.root.is_dir():
            return out
        for dirpath, _, names in os.walk(self.root):
            for n in names:
                if n.endswith(".npy"):
                    p = Path(dirpath) / n
                    try:
                        st = p.stat()
                    except OSError:
                        continue
                    out.append((st.st_mtime, st.st_size, p))
        return out

    def size_bytes(self, key: str | None = None) -> int:
        if key is None:
            return sum(s for _, s, _ in self.files())
        d = self.entry_dir(key)
        return sum(p.stat().st_size for p in d.rglob("*.npy")) if d.is_dir() else 0

    def evict(self) -> int:
        """Delete least recently used files until under budget; returns bytes freed."""
        files = self.files()
        total = sum(s for _, s, _ in files)
        freed = 0
        for _, size, path in sorted(files):
            if total - freed <= self.budget_bytes:
                break
            try:
                path.unlink()
                freed += size
            except OSError:
                pass
        if freed:
            log.info("embedding cache: evicted %.1f MB (budget %.1f MB)", freed / 2**20, self.budget_bytes / 2**20)
        return freed


# ---- sliding window ----------------------------------------------------------------------------
def gaussian_weights(shape: Sequence[int], sigma_scale: float) -> np.ndarray:
    """Separable Gaussian importance map, as MONAI's ``BlendMode.GAUSSIAN`` (peak 1, floor > 0)."""
    w = np.ones(tuple(shape), dtype=np.float32)
    for axis, n in enumerate(shape):
        centre = (n - 1) / 2.0
        sigma = max(sigma_scale * n, 1e-3)
        g = np.exp(-0.5 * ((np.arange(n) - centre) / sigma) ** 2).astype(np.float32)
        w *= g.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return np.maximum(w / w.max(), 1e-3)


def window_starts(size: int, window: int, overlap: float, multiple: int) -> list[int]:
    """Window starts along one axis, multiples of ``multiple``; the last window ends at ``size``."""
    if size <= window:
        return [0]
    step = max(multiple, int(window * (1.0 - overlap)) // multiple * multiple)
    starts = list(range(0, size - window, step))
    starts.append(size - window)
    return sorted(set(starts))


def fit_window_kji(shape_kji: Sequence[int], window_kji: Sequence[int], overlap: float, multiple: int,
                   max_voxels: int) -> np.ndarray:
    """The window (k, j, i) for an array of ``shape_kji`` that makes :func:`sliding_window` process the fewest voxels.

    Every side is a multiple of ``multiple`` between the cube's side ``window_kji`` (or the axis, if shorter) and the
    axis; the window holds at most ``max_voxels`` voxels (the cube itself is always allowed); windows overlap as
    :func:`window_starts` places them. Sides are chosen per axis, so a thin slab or a long axis gets its own shape.
    """
    shape, base = np.asarray(shape_kji, dtype=int), np.minimum(np.asarray(window_kji, dtype=int), shape_kji)
    options = []
    for size, low in zip(shape, base):
        axis, best = [], None
        for w in range(int(low), int(size) + 1, multiple):
            cost = w * len(window_starts(int(size), w, overlap, multiple))
            if best is None or cost < best:  # a larger side that costs as much is never better
                axis.append((w, cost))
                best = cost
        options.append(axis)
    budget = max(int(max_voxels), int(np.prod(base)))
    chosen, best_key = base, None
    for (wk, ck), (wj, cj), (wi, ci) in itertools.product(*options):
        if wk * wj * wi > budget:
            continue
        key = (ck * cj * ci, wk * wj * wi)  # fewest voxels processed, then the smaller window (memory)
        if best_key is None or key < best_key:
            chosen, best_key = np.array([wk, wj, wi]), key
    return chosen


def embedding_window_count(model: EmbeddingModel, volume: Volume, config: EmbedConfig) -> int:
    """About how many network runs :func:`embed_volume` makes for ``volume`` (progress bars): its coarse map's
    windows, plus the dense fine pass's with ``config.dense_fine``.

    The volume at the model spacing, padded to the size multiple, in the windows :func:`embed_volume` uses;
    reorientation is ignored, so it is exact for axis-aligned images.
    """
    m = model.size_multiple
    shape = np.ceil(np.asarray(volume.shape_ijk) * volume.spacing / model.spacing).astype(int)
    shape = np.maximum(-(-shape // m) * m, m)
    shape = shape[::-1]
    windows = [coarse_window_kji(model, config, shape)]
    if config.dense_fine and not _one_pass(model, config, shape):
        windows.append(dense_window_kji(model, config, shape))
    return sum(int(np.prod([len(window_starts(int(s), int(min(w, s)), config.overlap, m))
                            for s, w in zip(shape, win)]))
               for win in windows)


def sliding_window_coarse(model: EmbeddingModel, array: np.ndarray, window_kji: Sequence[int],
                          overlap: float = 0.25, sigma_scale: float = 0.125,
                          timings: dict[str, float] | None = None) -> np.ndarray:
    """Coarse map (C, K/s, J/s, I/s) of ``array`` (K, J, I), sizes multiples of ``size_multiple``.

    Window outputs are blended with Gaussian weights at coarse resolution and re-normalised to unit
    length (a weighted mean of unit vectors is shorter than 1). Fine outputs are never requested.
    ``timings`` (when given) receives ``network_s`` (the model calls) and ``blend_s`` (everything else).
    """
    return sliding_window(model, array, window_kji, overlap, sigma_scale, False, timings)[0]


def sliding_window(model: EmbeddingModel, array: np.ndarray, window_kji: Sequence[int], overlap: float = 0.25,
                   sigma_scale: float = 0.125, want_fine: bool = False, timings: dict[str, float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(coarse map, dense fine map or None) of ``array``, blended as described in :func:`sliding_window_coarse`.

    With ``want_fine`` the fine outputs (C_f, K, J, I) are blended the same way at full resolution: a dense
    fine map for the price of one pass, used by the dense refinement (the fine tiles of clicks come from their
    own canonical windows instead, see :meth:`VolumeEmbedding.ensure_tiles`).
    """
    s, m = model.coarse_stride, model.size_multiple
    shape = np.asarray(array.shape)
    win = np.minimum(np.asarray(window_kji, dtype=int), shape)
    if np.any(shape % m) or np.any(win % m):
        raise ValueError(f"array {tuple(shape)} and window {tuple(win)} must be multiples of {m}")
    cshape = shape // s
    acc = np.zeros((model.coarse_channels, *cshape), dtype=np.float32)
    wsum = np.zeros(tuple(cshape), dtype=np.float32)
    wmap = gaussian_weights(win // s, sigma_scale)
    facc = np.zeros((model.fine_channels, *shape), dtype=np.float32) if want_fine else None
    fmap = gaussian_weights(win, sigma_scale) if want_fine else None
    starts = [window_starts(int(shape[a]), int(win[a]), overlap, m) for a in range(3)]
    n = len(starts[0]) * len(starts[1]) * len(starts[2])
    t0 = time.perf_counter()
    network = 0.0
    for count, (k0, j0, i0) in enumerate(
        (k, j, i) for k in starts[0] for j in starts[1] for i in starts[2]
    ):
        patch = array[k0:k0 + win[0], j0:j0 + win[1], i0:i0 + win[2]][None, None]
        t_net = time.perf_counter()
        coarse, fine = model.embed_patch(patch, want_fine=want_fine)
        network += time.perf_counter() - t_net
        ck, cj, ci = k0 // s, j0 // s, i0 // s
        sl = (slice(ck, ck + win[0] // s), slice(cj, cj + win[1] // s), slice(ci, ci + win[2] // s))
        acc[(slice(None),) + sl] += coarse[0] * wmap
        wsum[sl] += wmap
        if want_fine:
            facc[:, k0:k0 + win[0], j0:j0 + win[1], i0:i0 + win[2]] += fine[0] * fmap
        log.debug("window %d/%d", count + 1, n)
    acc /= np.maximum(np.linalg.norm(acc, axis=0, keepdims=True), 1e-12)
    if want_fine:
        facc /= np.maximum(np.linalg.norm(facc, axis=0, keepdims=True), 1e-12)
    total = time.perf_counter() - t0
    if timings is not None:
        timings.update(network_s=network, blend_s=total - network, windows=n)
    log.info("%s map %s from %d windows of %s in %.2f s (network %.2f s)", "coarse and fine" if want_fine else
             "coarse", cshape.tolist(), n, win.tolist(), total, network)
    return acc, facc


# ---- interpolation helpers ---------------------------------------------------------------------
def trilinear(grid: np.ndarray, coords_ijk: np.ndarray) -> np.ndarray:
    """Sample a (C, K, J, I) grid at continuous (N, 3) coordinates (i, j, k), clamped at the edges."""
    c = np.atleast_2d(np.asarray(coords_ijk, dtype=np.float64))
    dims = np.array([grid.shape[3], grid.shape[2], grid.shape[1]])
    c = np.clip(c, 0, dims - 1)
    lo = np.floor(c).astype(int)
    lo = np.minimum(lo, np.maximum(dims - 2, 0))
    f = c - lo
    hi = np.minimum(lo + 1, dims - 1)
    out = np.zeros((c.shape[0], grid.shape[0]), dtype=np.float64)
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                ii = hi[:, 0] if di else lo[:, 0]
                jj = hi[:, 1] if dj else lo[:, 1]
                kk = hi[:, 2] if dk else lo[:, 2]
                w = (f[:, 0] if di else 1 - f[:, 0]) * (f[:, 1] if dj else 1 - f[:, 1]) * (f[:, 2] if dk else 1 - f[:, 2])
                out += w[:, None] * grid[:, kk, jj, ii].T
    return out


def upsample_linear(x: np.ndarray, u: int, axes: Sequence[int] = (-3, -2, -1)) -> np.ndarray:
    """Linear upsampling by ``u`` along ``axes`` keeping the end points: n -> (n - 1) * u + 1 samples.

    Sample ``m`` of the output sits at input coordinate ``m / u``.
    """
    if u == 1:
        return x
    for ax in axes:
        x = np.moveaxis(x, ax, 0)
        n = x.shape[0]
        if n == 1:
            x = np.moveaxis(x, 0, ax)
            continue
        r = (np.arange(u, dtype=np.float32) / u).reshape((1, u) + (1,) * (x.ndim - 1))
        mid = (1 - r) * x[:-1, None] + r * x[1:, None]
        x = np.concatenate([mid.reshape((-1,) + x.shape[1:]), x[-1:]], axis=0)
        x = np.moveaxis(x, 0, ax)
    return x


def normalise(v: np.ndarray, axis: int = -1) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=axis, keepdims=True), 1e-12)


# ---- the embedded volume ---------------------------------------------------------------------------
#: Memory budget of the fine tiles one VolumeEmbedding keeps (bytes, float16). Wide imported models (vox2vec,
#: HDSSL: ~1000 fine channels) make a 32^3 tile 65 MB, so a count limit alone is not a bound.
TILE_BUDGET_BYTES = 1 << 30
#: Tiles always allowed in memory whatever the budget (a match reads a few neighbouring tiles at once).
MIN_TILES_IN_MEMORY = 27


class VolumeEmbedding:
    """An embedded volume: prepared grid, coarse map in memory, fine tiles on demand (memory + disk).

    Fine tiles in memory are bounded by ``max_tiles_in_memory`` and by ``tile_budget_bytes`` (least recently
    used tiles are dropped; the disk cache keeps them).

    Thread safety: the tile dict and tile computation are guarded by one re-entrant lock, taken per tile, so a
    warming thread (:meth:`warm_tiles`) and a click (:meth:`fine_block`) never compute the same tile twice and a
    click waits at most for the one tile being computed.
    """

    def __init__(self, model: EmbeddingModel, prepared: Volume, valid_start: np.ndarray, valid_size: np.ndarray,
                 coarse: np.ndarray, key: str, config: EmbedConfig, cache: EmbeddingCache | None,
                 source: Volume | None = None, max_tiles_in_memory: int = 512,
                 tile_budget_bytes: int | None = None) -> None:
        self.model = model
        self.prepared = prepared
        self.valid_start = np.asarray(valid_start, dtype=int)
        self.valid_size = np.asarray(valid_size, dtype=int)
        self.coarse = coarse.astype(np.float32, copy=False)
        self.key = key
        self.config = config
        self.cache = cache
        self.source = source
        self._tiles: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        budget = TILE_BUDGET_BYTES if tile_budget_bytes is None else int(tile_budget_bytes)
        self._max_tiles = max(MIN_TILES_IN_MEMORY, min(int(max_tiles_in_memory), budget // max(self.tile_bytes, 1)))
        self.stats = {"tiles_computed": 0, "tiles_from_disk": 0, "fine_forwards": 0}
        #: Seconds per stage of ``embed_volume`` (checks, prepare, hash, cache read/write, network, blend).
        self.timings: dict[str, float] = {}
        # Re-entrant: fine_block holds it around a tile while _get_tile / _compute_tiles take it again.
        self._lock = threading.RLock()
        self._pad_value = float(prepared.array.min())
        self._dense_fine: np.ndarray | None = None

    # ---- geometry -----------------------------------------------------------------------
    @property
    def stride(self) -> int:
        return self.model.coarse_stride

    def world_to_index(self, points_lps: np.ndarray) -> np.ndarray:
        return self.prepared.world_to_index(points_lps)

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        return self.prepared.index_to_world(ijk)

    def inside(self, ijk: np.ndarray, margin: float = 0.5) -> np.ndarray:
        ijk = np.atleast_2d(ijk)
        lo = self.valid_start - margin
        hi = self.valid_start + self.valid_size - 1 + margin
        return np.all((ijk >= lo) & (ijk <= hi), axis=1)

    def clamp_to_valid(self, ijk: np.ndarray) -> np.ndarray:
        return np.clip(ijk, self.valid_start, self.valid_start + self.valid_size - 1)

    def voxel_to_coarse(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel index -> coarse-grid coordinate: cell ``c`` covers voxels [c*s, (c+1)*s)."""
        s = self.stride
        return (np.asarray(ijk, dtype=np.float64) - (s - 1) / 2.0) / s

    def coarse_to_voxel(self, c: np.ndarray) -> np.ndarray:
        s = self.stride
        return np.asarray(c, dtype=np.float64) * s + (s - 1) / 2.0

    def coarse_valid_mask(self) -> np.ndarray:
        """(Kc, Jc, Ic) True where a coarse cell overlaps the valid (unpadded) box."""
        s = self.stride
        mask = np.ones(self.coarse.shape[1:], dtype=bool)
        for axis_ijk, axis_arr in ((0, 2), (1, 1), (2, 0)):
            n = self.coarse.shape[1 + axis_arr]
            cells = np.arange(n)
            lo, hi = self.valid_start[axis_ijk], self.valid_start[axis_ijk] + self.valid_size[axis_ijk]
            ok = (cells * s < hi) & ((cells + 1) * s > lo)
            shape = [1, 1, 1]
            shape[axis_arr] = n
            mask &= ok.reshape(shape)
        return mask

    def upsampled_norms(self, u: int) -> np.ndarray:
        """Norm of the trilinearly interpolated coarse vectors on the ``u``-times finer coarse grid.

        Cosine similarity to *interpolated* target vectors is then ``upsample(q . T) / norms`` (the dot
        product is linear), so a query that falls between cells can still score exactly 1 on a copy.
        """
        cache = self.__dict__.setdefault("_norms", {})
        if u not in cache:
            acc = None
            for c in range(self.coarse.shape[0]):
                up = upsample_linear(self.coarse[c], u)
                acc = up * up if acc is None else acc + up * up
            cache[u] = np.sqrt(np.maximum(acc, 1e-12)).astype(np.float32)
        return cache[u]

    def upsampled_valid_mask(self, u: int) -> np.ndarray:
        """Valid mask on the ``u``-times finer coarse grid (positions whose voxel lies in the valid box +- s/2)."""
        cache = self.__dict__.setdefault("_valid_up", {})
        if u not in cache:
            cache[u] = self._upsampled_valid_mask(u)
        return cache[u]

    def _upsampled_valid_mask(self, u: int) -> np.ndarray:
        shape = [(n - 1) * u + 1 for n in self.coarse.shape[1:]]
        mask = np.ones(shape, dtype=bool)
        half = self.stride / 2.0
        for axis_ijk, axis_arr in ((0, 2), (1, 1), (2, 0)):
            pos = self.coarse_to_voxel(np.arange(shape[axis_arr]) / u)
            lo = self.valid_start[axis_ijk] - half
            hi = self.valid_start[axis_ijk] + self.valid_size[axis_ijk] - 1 + half
            ok = (pos >= lo) & (pos <= hi)
            sh = [1, 1, 1]
            sh[axis_arr] = shape[axis_arr]
            mask &= ok.reshape(sh)
        return mask

    # ---- sampling ---------------------------------------------------------------------------
    def sample_coarse(self, ijk: np.ndarray) -> np.ndarray:
        return normalise(trilinear(self.coarse, self.voxel_to_coarse(np.atleast_2d(ijk))))

    def sample_fine(self, ijk: np.ndarray) -> np.ndarray:
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        out = np.empty((len(ijk), self.model.fine_channels))
        for n, p in enumerate(ijk):
            lo = np.floor(p).astype(int)
            block = self.fine_block(lo, np.full(3, 2))
            out[n] = trilinear(block, (p - lo)[None])[0]
        return normalise(out)

    # ---- fine tiles ---------------------------------------------------------------------------
    def _tile_range(self, start: np.ndarray, size: np.ndarray) -> list[tuple[int, int, int]]:
        T = self.config.fine_tile
        shape = np.asarray(self.prepared.shape_ijk)
        a0 = np.clip(start, 0, shape - 1) // T
        a1 = np.clip(start + size - 1, 0, shape - 1) // T
        return [(a, b, c) for c in range(a0[2], a1[2] + 1) for b in range(a0[1], a1[1] + 1)
                for a in range(a0[0], a1[0] + 1)]

    def _get_tile(self, t: tuple[int, int, int]) -> np.ndarray | None:
        with self._lock:
            if t in self._tiles:
                self._tiles.move_to_end(t)
                return self._tiles[t]
            if self.cache is not None:
                block = self.cache.load_tile(self.key, t)
                if block is not None:
                    self.stats["tiles_from_disk"] += 1
                    self._remember(t, block)
                    return block
            return None

    @property
    def tile_bytes(self) -> int:
        """Bytes of one fine tile in memory (float16)."""
        return int(self.model.fine_channels) * int(self.config.fine_tile) ** 3 * 2

    @property
    def max_tiles_in_memory(self) -> int:
        return self._max_tiles

    def tiles_in_memory(self) -> list[tuple[int, int, int]]:
        """The fine tiles held in memory now, least recently used first (a snapshot)."""
        with self._lock:
            return list(self._tiles)

    def all_tiles(self) -> list[tuple[int, int, int]]:
        """Every fine tile that touches the valid (image) box."""
        return self._tile_range(self.valid_start, self.valid_size)

    @functools.cached_property
    def _tile_grid(self) -> np.ndarray:
        """(N, 3) :meth:`all_tiles`: the geometry never changes, a CT has thousands of tiles, and
        :meth:`tiles_near` runs per point."""
        return np.asarray(self.all_tiles(), dtype=int).reshape(-1, 3)

    def tiles_near(self, points_lps: np.ndarray, radius_mm: float) -> list[tuple[int, int, int]]:
        """Fine tiles of the image whose voxel box lies within ``radius_mm`` of any of the world (LPS) points,
        nearest first (ties in tile order), for :meth:`warm_tiles`.

        The distance is from the point to the nearest voxel centre of the tile (0 inside it), in mm on the
        prepared grid, so ``radius_mm`` = the reach of a search around a point gives every tile it can read.
        """
        pts = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
        tiles = self._tile_grid
        if not len(pts) or not len(tiles):
            return []
        T = self.config.fine_tile
        ijk = self.world_to_index(pts)                                 # (P, 3)
        lo, hi = tiles * T, tiles * T + T - 1                          # (N, 3) voxel boxes
        gap = np.maximum(lo[:, None] - ijk[None], 0) + np.maximum(ijk[None] - hi[:, None], 0)  # (N, P, 3)
        dist = np.linalg.norm(gap * self.prepared.spacing, axis=-1).min(axis=1)
        keep = np.flatnonzero(dist <= radius_mm)
        order = keep[np.argsort(dist[keep], kind="stable")]
        return [tuple(int(v) for v in tiles[n]) for n in order]

    def warm_tiles(self, tiles: Iterable[tuple[int, int, int]], check: Callable[[], None] | None = None) -> int:
        """Compute the given tiles in order (most wanted first) unless memory or the disk cache holds them.

        Safe to run in a background thread while clicks read tiles: the lock is taken per tile, never for the
        whole loop, so a click waits at most for one tile and then computes only what is still missing. A
        warmed tile never evicts one from memory (those are the ones clicks read, or more wanted ones warmed
        earlier): once memory is full the rest go to the disk cache only, or, without a disk cache, warming
        stops. ``check`` is called before each tile (raise to cancel). Returns the number of tiles computed here;
        none when fine vectors come from the dense map (:attr:`reads_dense`).
        """
        if self.reads_dense:
            return 0
        computed = 0
        for t in dict.fromkeys(tuple(int(v) for v in t) for t in tiles):
            if check is not None:
                check()
            with self._lock:
                if t in self._tiles or (self.cache is not None and self.cache.has_tile(self.key, t)):
                    continue
                room = len(self._tiles) < self._max_tiles
                if not room and self.cache is None:
                    break
                self._compute_tiles([t], remember=room)
                computed += 1
        return computed

    def precompute_fine_tiles(self, check: Callable[[], None] | None = None) -> int:
        """Compute every fine tile of the image (each one written to the disk cache when there is one; without
        one, only as many as memory holds).

        :meth:`warm_tiles` over :meth:`all_tiles`: unlike ``fine_block`` over the whole image, nothing of size
        channels x voxels is allocated, and memory stays within the tile budget. ``check`` is called between
        tiles (cancel). Returns the number of tiles computed (not found in a cache).
        """
        return self.warm_tiles(self.all_tiles(), check)

    def clear_fine_tiles(self) -> None:
        """Forget the fine tiles held in memory (the disk cache is untouched), e.g. to time a second matching
        run as if the volume had just been embedded."""
        with self._lock:
            self._tiles.clear()

    def _remember(self, t: tuple[int, int, int], block: np.ndarray) -> None:
        with self._lock:
            self._tiles[t] = block.astype(np.float16, copy=False)
            while len(self._tiles) > self._max_tiles:
                self._tiles.popitem(last=False)

    def ensure_tiles(self, tiles: Iterable[tuple[int, int, int]]) -> None:
        """Compute the missing tiles, each from its own canonical window.

        Each tile always comes from the same window (the tile plus ``fine_margin`` on every side), never
        from a window shared with whichever tiles happened to be missing: with instance normalisation the
        features depend on the window, and matching needs the same voxel content to give the same vector
        in the source and the target.
        """
        for t in dict.fromkeys(tiles):
            with self._lock:  # per tile: a warming thread gets the lock between two tiles
                if self._get_tile(t) is None:
                    self._compute_tiles([t])

    def _compute_tiles(self, tiles: list[tuple[int, int, int]], remember: bool = True) -> dict:
        """Run the network on the window of ``tiles`` (callers pass one tile: its canonical window).

        Returns the blocks by tile; ``remember=False`` writes them to the disk cache only (warming a full memory).
        """
        T, M, m = self.config.fine_tile, self.config.fine_margin, self.model.size_multiple
        arr = np.asarray(tiles)
        lo = arr.min(0) * T - M                          # (i, j, k) voxel start of the window
        hi = (arr.max(0) + 1) * T + M
        size = -(-(hi - lo) // m) * m
        out = {}
        with self._lock:
            window = self._extract(lo, size)
            _, fine = self.model.embed_patch(window[None, None], want_fine=True)
            self.stats["fine_forwards"] += 1
            fine = fine[0]
            for t in tiles:
                o = np.asarray(t) * T - lo
                block = fine[:, o[2]:o[2] + T, o[1]:o[1] + T, o[0]:o[0] + T]
                self.stats["tiles_computed"] += 1
                out[tuple(t)] = block = block.astype(np.float16)  # what memory and the disk cache hold
                if remember:
                    self._remember(tuple(t), block)
                if self.cache is not None:
                    self.cache.save_tile(self.key, t, block)
        return out

    def _extract(self, start_ijk: np.ndarray, size_ijk: np.ndarray) -> np.ndarray:
        """(k, j, i) block of the prepared array; outside is background (the pad value)."""
        a = self.prepared.array
        shape = np.asarray(self.prepared.shape_ijk)
        out = np.full(tuple(size_ijk[::-1]), self._pad_value, dtype=np.float32)
        s0 = np.maximum(start_ijk, 0)
        s1 = np.minimum(start_ijk + size_ijk, shape)
        if np.any(s1 <= s0):
            return out
        d0 = s0 - start_ijk
        d1 = d0 + (s1 - s0)
        out[d0[2]:d1[2], d0[1]:d1[1], d0[0]:d1[0]] = a[s0[2]:s1[2], s0[1]:s1[1], s0[0]:s1[0]]
        return out

    def fine_block(self, start_ijk: Sequence[int], size_ijk: Sequence[int]) -> np.ndarray:
        """Fine embeddings (C, k, j, i) of the voxel box ``[start, start + size)`` (clamped to the grid)."""
        T = self.config.fine_tile
        shape = np.asarray(self.prepared.shape_ijk)
        start = np.clip(np.asarray(start_ijk, dtype=int), 0, shape - 1)
        end = np.clip(np.asarray(start_ijk, dtype=int) + np.asarray(size_ijk, dtype=int), start + 1, shape)
        size = end - start
        if self.reads_dense:
            return self.dense_fine()[:, start[2]:end[2], start[1]:end[1], start[0]:end[0]].astype(np.float32)
        tiles = self._tile_range(start, size)
        self.ensure_tiles(tiles)
        out = np.empty((self.model.fine_channels, size[2], size[1], size[0]), dtype=np.float32)
        for t in tiles:
            with self._lock:
                block = self._get_tile(t)
                if block is None:  # evicted from memory between ensure and here: recompute this one
                    block = self._compute_tiles([t])[t]
            t0 = np.asarray(t) * T
            a = np.maximum(start, t0)
            b = np.minimum(end, t0 + T)
            out[:, a[2] - start[2]:b[2] - start[2], a[1] - start[1]:b[1] - start[1], a[0] - start[0]:b[0] - start[0]] = \
                block[:, a[2] - t0[2]:b[2] - t0[2], a[1] - t0[1]:b[1] - t0[1], a[0] - t0[0]:b[0] - t0[0]]
        return out

    @property
    def dense_fine_bytes(self) -> int:
        """Bytes of this image's dense fine map (float16)."""
        return dense_fine_bytes(self.model, self.prepared.array.shape)

    @property
    def reads_dense(self) -> bool:
        """Fine vectors come from the dense map (``EmbedConfig.dense_fine`` and the map within its budget)."""
        return reads_dense_map(self.model, self.config, self.prepared.array.shape)

    def dense_fine(self) -> np.ndarray:
        """Fine map (C, K, J, I) float16 of the whole prepared grid from one sliding-window pass (memoised, and
        kept in the disk cache).

        One pass of windows of at least ``DENSE_FINE_WINDOW`` voxels costs a fraction of computing every canonical
        tile (each a window of the tile plus its margins). Its values differ slightly from the tiles' (other
        windows): with ``EmbedConfig.dense_fine`` every fine read uses it, otherwise only the prior's refinement,
        which reads it for both images.
        """
        with self._lock:
            if self._dense_fine is None:
                t0 = time.perf_counter()
                fine = self.cache.load_dense_fine(self.key) if self.cache is not None else None
                if fine is None or fine.shape[1:] != self.prepared.array.shape:
                    window = dense_window_kji(self.model, self.config, self.prepared.array.shape)
                    _, fine = sliding_window(self.model, self.prepared.array, window, self.config.overlap,
                                             self.config.sigma_scale, want_fine=True)
                    self._keep_dense_fine(fine)
                else:
                    self._dense_fine = fine
                self.timings["dense_fine_s"] = time.perf_counter() - t0
            return self._dense_fine

    def _keep_dense_fine(self, fine: np.ndarray) -> None:
        """Keep a freshly computed dense fine map (float16, as the disk cache holds it) and cache it."""
        self._dense_fine = fine.astype(np.float16)
        if self.cache is not None:
            self.cache.save_dense_fine(self.key, self._dense_fine)

    def coarse_volume(self, values: np.ndarray, upsample: int = 1) -> Volume:
        """Wrap an array on the coarse grid (or its ``upsample``-times finer version) as a Volume (heatmaps)."""
        s = self.stride
        origin = self.prepared.index_to_world(np.full(3, (s - 1) / 2.0))
        return Volume(values.astype(np.float32), self.prepared.spacing * s / upsample, origin, self.prepared.direction)


# ---- embedding a volume --------------------------------------------------------------------------
def replicate_flat_axes(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A single-slice array (any axis of length 1) copied along each flat axis to ``size`` on that axis.

    The one 2D path of the engine: the embedding (here) and the few-shot tiles (``fewshot.head``) both give
    the network a slab of copies of the slice, never padding, so a 2D network that averages k-slices (Adam's
    coarse map) sees only the real slice. Axes of other lengths are left as they are.
    """
    array = np.asarray(array)
    reps = [int(n) if s == 1 else 1 for s, n in zip(array.shape, size)]
    return np.tile(array, reps) if any(r > 1 for r in reps) else array


def prepare_volume(model: EmbeddingModel, volume: Volume, config: EmbedConfig) -> tuple[Volume, np.ndarray, np.ndarray]:
    """Reorient, resample to the model spacing, apply the intensity preset, pad.

    Returns (prepared, valid_start, valid_size); the embedding lives on the prepared grid and every
    query goes through world coordinates, so the reorientation is invisible to callers.
    """
    volume = reorient_to_canonical(volume)
    m = model.size_multiple
    spacing = model.spacing
    if np.allclose(volume.spacing, spacing, rtol=1e-4) or all(
        np.isclose(volume.spacing[a], spacing[a], rtol=1e-4) or volume.shape_ijk[a] == 1 for a in range(3)
    ):
        resampled = volume
    else:
        resampled = resample_to_spacing(volume, spacing)
    shape = np.asarray(resampled.shape_ijk)
    flat = shape == 1
    small = (~flat) & (shape < config.min_size)
    if np.any(small) or np.all(flat):
        raise ValueError(
            f"image is {shape.tolist()} voxels along (i, j, k) at the model spacing {spacing.tolist()} mm; the model "
            f"needs at least {config.min_size} voxels along every non-flat axis "
            f"({(config.min_size * spacing).round(1).tolist()} mm): use a larger field of view"
        )
    arr = model.preset().apply(resampled.array)
    # 2D: replicate the single slice so the network sees a slab; the original sits at index m // 2.
    before = np.where(flat, m // 2, 0)
    if np.any(flat):
        arr = replicate_flat_axes(arr, [m, m, m])
    full = shape + np.where(flat, m - 1, 0)
    target = np.maximum(-(-full // m) * m, m)
    after = target - full
    bg = float(arr.min())
    if np.any(after):
        arr = np.pad(arr, ((0, after[2]), (0, after[1]), (0, after[0])), constant_values=bg)
    origin = resampled.index_to_world(-before.astype(np.float64))
    prepared = Volume(np.ascontiguousarray(arr, dtype=np.float32), resampled.spacing.copy(), origin,
                      resampled.direction.copy())
    return prepared, before, shape


def cache_key(image_digest: str, model: EmbeddingModel, config: EmbedConfig) -> str:
    payload = json.dumps({
        "v": CACHE_VERSION, "image": image_digest, "model": model.model_hash, "backend": model.backend,
        "spacing": [round(float(s), 6) for s in model.spacing], "config": config.key(),
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:40]


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """``timings[key]`` = seconds the block took (``VolumeEmbedding.timings``)."""
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def window_kji(model: EmbeddingModel, config: EmbedConfig) -> np.ndarray:
    """The sliding window (k, j, i): ``config.window`` or the model's patch size, rounded up to the size multiple."""
    window = np.asarray(config.window or model.patch_size, dtype=int)
    return (-(-window // model.size_multiple) * model.size_multiple)[::-1]


def _fitted(model: EmbeddingModel, config: EmbedConfig, cube_kji: np.ndarray, shape_kji: Sequence[int]) -> np.ndarray:
    if not config.max_window_voxels:
        return cube_kji
    return fit_window_kji(shape_kji, cube_kji, config.overlap, model.size_multiple, config.max_window_voxels)


def dense_window_kji(model: EmbeddingModel, config: EmbedConfig, shape_kji: Sequence[int]) -> np.ndarray:
    """The dense fine pass's window (k, j, i): :func:`window_kji`, at least ``DENSE_FINE_WINDOW`` per axis; fitted to a
    prepared grid of ``shape_kji`` with ``config.max_window_voxels``."""
    return _fitted(model, config, np.maximum(window_kji(model, config), DENSE_FINE_WINDOW), shape_kji)


def coarse_window_kji(model: EmbeddingModel, config: EmbedConfig, shape_kji: Sequence[int]) -> np.ndarray:
    """The coarse map's window (k, j, i): the dense pass's with ``config.coarse_from_dense``, else :func:`window_kji`;
    fitted to a prepared grid of ``shape_kji`` with ``config.max_window_voxels``."""
    if config.coarse_from_dense:
        return dense_window_kji(model, config, shape_kji)
    return _fitted(model, config, window_kji(model, config), shape_kji)


def dense_fine_bytes(model: EmbeddingModel, shape_kji: Sequence[int]) -> int:
    """Bytes of the dense fine map (float16) of a prepared grid of ``shape_kji``."""
    return 2 * int(model.fine_channels) * int(np.prod(shape_kji))


def reads_dense_map(model: EmbeddingModel, config: EmbedConfig, shape_kji: Sequence[int]) -> bool:
    """A prepared grid of ``shape_kji`` keeps a dense fine map: ``config.dense_fine`` and the map within
    ``DENSE_FINE_MAX_BYTES`` (:attr:`VolumeEmbedding.reads_dense`; the viewer's cache check uses it too)."""
    return bool(config.dense_fine) and dense_fine_bytes(model, shape_kji) <= DENSE_FINE_MAX_BYTES


def _one_pass(model: EmbeddingModel, config: EmbedConfig, shape_kji: Sequence[int]) -> bool:
    """Coarse and dense fine maps from one sliding-window pass: the dense map is kept, and the coarse map uses the
    same windows."""
    return bool(config.coarse_from_dense) and reads_dense_map(model, config, shape_kji)


def embed_volume(model: EmbeddingModel, volume: Volume, cache: EmbeddingCache | None = None,
                 config: EmbedConfig | None = None, image_digest: str | None = None) -> VolumeEmbedding:
    """Embed ``volume``: coarse map for the whole volume (from the cache when possible), fine on demand.

    ``image_digest``: ``image_hash(volume)`` when the caller has computed it already (hashing a 512x512x300 CT
    takes 0.2-0.3 s: the hash column of benchmarks/results/embedding_fitted_windows.md)."""
    config = config or EmbedConfig()
    timings: dict[str, float] = {}
    with _timed(timings, "checks_s"):
        check_finite(volume, "image")  # volumes handed over directly (viewer, API) skip read_image's check
        for reason in intensity_warnings(volume.array, model.preset()):
            log.warning("%s; matches and segmentations will be unreliable", reason)
    with _timed(timings, "prepare_s"):  # reorientation, resampling, intensity preset, padding
        prepared, start, size = prepare_volume(model, volume, config)
    with _timed(timings, "hash_s"):
        key = cache_key(image_digest or image_hash(volume), model, config)
    with _timed(timings, "cache_read_s"):
        coarse = cache.load_coarse(key) if cache is not None else None
    if coarse is not None:
        log.info("coarse map from cache %s", key[:12])
        coarse = coarse.astype(np.float32)
        expect = np.asarray(prepared.array.shape) // model.coarse_stride
        if tuple(coarse.shape[1:]) != tuple(expect):
            coarse = None
    fine = None
    if coarse is None:
        window = coarse_window_kji(model, config, prepared.array.shape)
        if _one_pass(model, config, prepared.array.shape):
            coarse, fine = sliding_window(model, prepared.array, window, config.overlap, config.sigma_scale,
                                          want_fine=True, timings=timings)
        else:
            coarse = sliding_window_coarse(model, prepared.array, window, config.overlap, config.sigma_scale, timings)
        if not np.isfinite(coarse).all():
            raise ValueError(f"the model produced {int((~np.isfinite(coarse)).sum())} non-finite embedding values "
                             f"for a finite image; the model is broken (not cached)")
        with _timed(timings, "cache_write_s"):
            if cache is not None:
                cache.save_coarse(key, coarse, {
                    "model_hash": model.model_hash, "backend": model.backend, "spacing": model.spacing.tolist(),
                    "prepared_shape_kji": list(prepared.array.shape), "config": config.key(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                })
            # Always float16 precision (what the cache stores), so cached and fresh runs agree exactly.
            coarse = coarse.astype(np.float16).astype(np.float32)
    emb = VolumeEmbedding(model, prepared, start, size, coarse, key, config, cache, source=volume)
    emb.timings = timings
    if fine is not None:  # the coarse map's own pass made it (counted in network_s and blend_s)
        t0 = time.perf_counter()
        emb._keep_dense_fine(fine)
        timings["cache_write_s"] = timings.get("cache_write_s", 0.0) + time.perf_counter() - t0
    if config.dense_fine:
        if emb.reads_dense:
            emb.dense_fine()
        else:
            log.info("dense fine map of %.0f MB over its budget (%d MB): fine tiles on demand instead",
                     emb.dense_fine_bytes / 2 ** 20, DENSE_FINE_MAX_BYTES >> 20)
    return emb
