"""Real anatomy and lesion-size statistics for IU-Phantom, read from the torchxrayvision wheel at run time.

* :class:`LungAtlas`: the usable lung masks of ``semantic_masks_v7labs_lungs.zip`` (517 files, 82 empty, a few
  unusable), each cropped to its lungs, resampled once to a ``(M, M)`` canonical frame and split into the image-left
  lung (the patient's right) and the image-right lung (the patient's left).
* :func:`lesion_diameters`: NIH ChestX-ray14 box sizes (``BBox_List_2017.csv.gz``) for nodules and masses, as
  fractions of the image width.

Nothing here is copied into the repository: the files are located through ``torchxrayvision.__file__``.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from medvl.data.reports import torchxrayvision_data_dir
from medvl.errors import DataError

MASK_ZIP = "semantic_masks_v7labs_lungs.zip"
BBOX_CSV = "BBox_List_2017.csv.gz"
REPORTS_TGZ = "NLMCXR_reports.tgz"
#: Side of the canonical square frame each lung mask is resampled to.
ATLAS_RES = 224
#: Bump when the atlas computation changes, so stale ``lung_atlas.npz`` caches are rebuilt.
ATLAS_VERSION = 4
#: NIH ChestX-ray14 images are 1024 x 1024.
NIH_IMAGE_SIZE = 1024.0


def xrv_data_dir() -> Path:
    """The folder of data files shipped in the torchxrayvision wheel (found without importing it, which is slow)."""
    try:
        path = torchxrayvision_data_dir()
    except FileNotFoundError as e:
        raise DataError(f"IU-Phantom reads torchxrayvision's shipped data files: {e}") from None
    for name in (MASK_ZIP, BBOX_CSV, REPORTS_TGZ):
        if not (path / name).exists():
            raise DataError(f"torchxrayvision's data file {name} is missing from {path}")
    return path


@dataclass(frozen=True)
class LungAtlas:
    """Usable real lung masks in a canonical frame.

    ``masks``: uint8 ``(K, M, M)``, 0..255 soft lung field, cropped to the lungs' bounding box (so the frame's
    unit square is the lungs' box). ``aspect``: ``(K,)`` height / width of that box in the source image.
    ``split``: ``(K,)`` x in [0, 1] of the gap between the two lungs. ``boxes``: ``(K, 2, 4)`` per lung
    ``(x0, y0, x1, y1)`` in [0, 1] of the frame, lung 0 = image left (patient right), 1 = image right (patient
    left). ``notch``: ``(K,)`` mean x of the image-right lung's medial border over its lower half (where the heart
    lies). ``dome``: ``(K, M)`` float32 diaphragm height per column in [0, 1]: the lungs' lower border over the lateral
    two thirds of each lung, held level under the heart and bridged between the lungs.
    ``flipped``: masks mirrored so the heart side is on the image right. ``names``: source file names.
    ``skipped``: ``(name, reason)`` for the masks left out.
    """

    masks: np.ndarray
    aspect: np.ndarray
    split: np.ndarray
    boxes: np.ndarray
    notch: np.ndarray
    dome: np.ndarray
    flipped: np.ndarray
    names: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def res(self) -> int:
        return int(self.masks.shape[-1])


def _decode(data: bytes, name: str) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        # Draft mode decodes JPEGs at a reduced scale: much faster and enough for a 224 px frame.
        im.draft("L", (max(im.width // 4, 4 * ATLAS_RES), max(im.height // 4, 4 * ATLAS_RES)))
    return np.asarray(im.convert("L"))


@dataclass(frozen=True)
class _MaskResult:
    name: str
    canon: np.ndarray | None
    aspect: float
    split: float
    flipped: bool
    reason: str


def _split_column(canon: np.ndarray) -> int | None:
    """Column of least lung between 30% and 70% of the width, or None when the lungs do not separate."""
    m = canon.shape[1]
    occupancy = (canon > 127).sum(axis=0).astype(np.float32)
    lo, hi = int(0.3 * m), int(0.7 * m)
    col = lo + int(np.argmin(occupancy[lo:hi]))
    if occupancy[col] > 0.15 * occupancy.max():
        return None
    return col


def _medial_gap(canon: np.ndarray, split: int, rows: slice) -> tuple[float, float]:
    """Mean distance from the split column to each lung's medial border over ``rows``."""
    band = canon[rows] > 127
    m = canon.shape[1]
    left, right = [], []
    for row in band:
        lx = np.nonzero(row[:split])[0]
        rx = np.nonzero(row[split:])[0]
        if len(lx):
            left.append(split - lx.max())
        if len(rx):
            right.append(rx.min())
    big = float(m)
    return (float(np.mean(left)) if left else big, float(np.mean(right)) if right else big)


def process_mask(name: str, data: bytes, res: int = ATLAS_RES) -> _MaskResult:
    """Decode one mask, crop it to the lungs, resample to ``(res, res)`` and orient it (heart on image right)."""
    try:
        a = _decode(data, name)
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
        return _MaskResult(name, None, 0, 0, False, f"cannot decode: {e}")
    fg = a > 127
    area = float(fg.mean())
    if area == 0:
        return _MaskResult(name, None, 0, 0, False, "empty mask")
    ys, xs = np.nonzero(fg)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    if min(h, w) < 32:
        return _MaskResult(name, None, 0, 0, False, f"lungs too small ({w}x{h} px)")
    fill = float(fg[y0:y1, x0:x1].mean())
    if fill < 0.3:
        return _MaskResult(name, None, 0, 0, False, f"lung box {fill:.0%} filled: not two lung fields")
    aspect = h / w
    if not 0.55 <= aspect <= 1.6:
        return _MaskResult(name, None, 0, 0, False, f"lung box aspect {aspect:.2f} outside 0.55..1.6")
    crop = Image.fromarray((fg[y0:y1, x0:x1] * 255).astype(np.uint8))
    canon = np.asarray(crop.resize((res, res), Image.Resampling.BOX))
    split = _split_column(canon)
    if split is None:
        return _MaskResult(name, None, 0, 0, False, "the two lungs do not separate")
    # Some masks carry annotation marks (arrows, squares) cut out of a lung: fill them, one lung at a time.
    canon = canon.copy()
    for sl in (np.s_[:, :split], np.s_[:, split:]):
        canon[sl] = np.maximum(canon[sl], ndimage.binary_fill_holes(canon[sl] > 127).astype(np.uint8) * 255)
    left_area = float((canon[:, :split] > 127).sum())
    right_area = float((canon[:, split:] > 127).sum())
    total = left_area + right_area
    if min(left_area, right_area) < 0.25 * total:
        return _MaskResult(name, None, 0, 0, False, "one lung field missing or tiny")
    # The heart pushes the patient-left lung's medial border outwards over the lower half: put that side on the
    # image right (radiology convention). Masks drawn from mirrored figures are flipped back.
    gap_l, gap_r = _medial_gap(canon, split, slice(int(0.55 * res), int(0.85 * res)))
    flipped = gap_l > 1.25 * gap_r and gap_l - gap_r > 0.02 * res
    if flipped:
        canon = np.ascontiguousarray(canon[:, ::-1])
        split = res - split
    # Soften the edges a little (about 1.5 px of a 256 px image): real lung borders are not razor sharp.
    canon = ndimage.gaussian_filter(canon.astype(np.float32), 1.0)
    canon = np.clip(canon + 0.5, 0, 255).astype(np.uint8)
    return _MaskResult(name, canon, aspect, split / res, flipped, "")


def _atlas_from_results(results: list[_MaskResult]) -> LungAtlas:
    good = [r for r in results if r.canon is not None]
    if not good:
        raise DataError("no usable lung mask in torchxrayvision's mask archive")
    masks = np.stack([r.canon for r in good]).astype(np.uint8)
    k, res, _ = masks.shape
    split = np.array([r.split for r in good], dtype=np.float32)
    boxes = np.zeros((k, 2, 4), dtype=np.float32)
    notch = np.zeros(k, dtype=np.float32)
    dome = np.zeros((k, res), dtype=np.float32)
    cols = np.arange(res)
    for i in range(k):
        fg = masks[i] > 127
        sc = int(round(split[i] * res))
        for side, sl in enumerate((slice(0, sc), slice(sc, res))):
            ys, xs = np.nonzero(fg[:, sl])
            off = sl.start
            boxes[i, side] = (
                (xs.min() + off) / res,
                ys.min() / res,
                (xs.max() + off + 1) / res,
                (ys.max() + 1) / res,
            )
        lo, hi = int(boxes[i, 1, 1] * res), int(boxes[i, 1, 3] * res)
        half = slice(lo + (hi - lo) // 2, hi)
        medial = [np.nonzero(r[sc:])[0] for r in fg[half]]
        medial = [m.min() + sc for m in medial if len(m)]
        notch[i] = (np.mean(medial) if medial else sc) / res
        has = fg.any(axis=0)
        last = res - 1 - np.argmax(fg[::-1], axis=0)
        bottom = np.where(has, (last + 1) / res, np.nan)
        # The medial third of each lung's lower border follows the heart, not the diaphragm: hold it level.
        for side in (0, 1):
            c0, c1 = int(boxes[i, side, 0] * res), int(boxes[i, side, 2] * res)
            cut = int(round(c1 - 0.35 * (c1 - c0))) if side == 0 else int(round(c0 + 0.35 * (c1 - c0)))
            sl = slice(cut, c1) if side == 0 else slice(c0, cut)
            bottom[sl] = bottom[cut] if not np.isnan(bottom[cut]) else np.nanmax(bottom[c0:c1])
        valid = ~np.isnan(bottom)
        dome[i] = np.interp(cols, cols[valid], bottom[valid])
    return LungAtlas(
        masks=masks,
        aspect=np.array([r.aspect for r in good], dtype=np.float32),
        split=split,
        boxes=boxes,
        notch=notch,
        dome=dome,
        flipped=np.array([r.flipped for r in good], dtype=bool),
        names=tuple(r.name for r in good),
        skipped=tuple((r.name, r.reason) for r in results if r.canon is None),
    )


_MEMORY: dict[tuple, LungAtlas] = {}


def _zip_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_size, int(st.st_mtime), ATLAS_VERSION, ATLAS_RES)


def npz_bytes(compresslevel: int = 3, **arrays: np.ndarray) -> bytes:
    """An ``.npz`` archive with fixed member timestamps (``np.savez`` stamps the current time, so its bytes change
    from run to run); ``np.load`` reads it as usual."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue(), compresslevel=compresslevel)
    return buf.getvalue()


def default_cache_dir() -> Path:
    """Where processed data derived from installed packages is kept between runs: ``$MEDVL_CACHE_DIR`` or
    ``~/.cache/medvl``."""
    env = os.environ.get("MEDVL_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "medvl"


def _save_atlas(atlas: LungAtlas, path: Path, key: tuple) -> None:
    data = npz_bytes(
        masks=atlas.masks,
        aspect=atlas.aspect,
        split=atlas.split,
        boxes=atlas.boxes,
        notch=atlas.notch,
        dome=atlas.dome,
        flipped=atlas.flipped,
        names=np.array(atlas.names),
        skipped=np.array([f"{n}\t{r}" for n, r in atlas.skipped]),
        key=np.array([str(v) for v in key[1:]]),
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        warnings.warn(f"could not write the lung-mask cache {path}: {e}", stacklevel=3)


def _read_atlas(path: Path, key: tuple) -> LungAtlas | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if [str(v) for v in key[1:]] != list(z["key"]):
                return None
            return LungAtlas(
                masks=z["masks"],
                aspect=z["aspect"],
                split=z["split"],
                boxes=z["boxes"],
                notch=z["notch"],
                dome=z["dome"],
                flipped=z["flipped"],
                names=tuple(str(n) for n in z["names"]),
                skipped=tuple(tuple(s.split("\t", 1)) for s in z["skipped"]),  # type: ignore[misc]
            )
    except (OSError, KeyError, ValueError):
        return None


def load_lung_atlas(
    cache: str | Path | None = None,
    *,
    map_fn: Callable | None = None,
) -> LungAtlas:
    """Load (once per process) the usable lung masks of torchxrayvision's archive.

    Decoding the 517 files takes several CPU-seconds, so the processed atlas is kept in memory, in ``cache`` (an
    ``.npz``; the phantom builder keeps one in ``out/raw/lung_atlas.npz``) and in :func:`default_cache_dir`, and
    read back from the first of them that matches the installed archive. ``map_fn``: a ``map``-like callable (e.g.
    a process pool's ``map``) used to decode the files in parallel.
    """
    zpath = xrv_data_dir() / MASK_ZIP
    key = _zip_key(zpath)
    user_cache = default_cache_dir() / f"lung_atlas_v{ATLAS_VERSION}_{ATLAS_RES}.npz"
    atlas = _MEMORY.get(key)
    if atlas is None:
        for path in (cache, user_cache):
            if path is not None and Path(path).exists():
                atlas = _read_atlas(Path(path), key)
                if atlas is not None:
                    break
    if atlas is None:
        with zipfile.ZipFile(zpath) as zf:
            items = [(n, zf.read(n)) for n in sorted(zf.namelist()) if not n.endswith("/")]
        names = [Path(n).name for n, _ in items]
        datas = [d for _, d in items]
        results = list((map_fn or map)(process_mask, names, datas))
        atlas = _atlas_from_results(results)
    _MEMORY[key] = atlas
    for path in (cache, user_cache):
        if path is not None and not Path(path).exists():
            _save_atlas(atlas, Path(path), key)
    return atlas


@dataclass(frozen=True)
class LesionSizes:
    """Diameters (fraction of image width) of NIH ChestX-ray14 boxes: ``sqrt(w * h) / 1024``."""

    nodule: np.ndarray
    mass: np.ndarray


_LESIONS: LesionSizes | None = None


def lesion_diameters() -> LesionSizes:
    """Nodule and mass sizes from ``BBox_List_2017.csv.gz`` (79 nodule and 85 mass boxes)."""
    global _LESIONS
    if _LESIONS is None:
        df = pd.read_csv(xrv_data_dir() / BBOX_CSV)
        cols = list(df.columns)
        label, w, h = cols[1], cols[4], cols[5]  # "Finding Label", "w", "h]" (the header splits the bracket)
        d = np.sqrt(df[w].to_numpy(float) * df[h].to_numpy(float)) / NIH_IMAGE_SIZE
        nodule = np.sort(d[df[label].to_numpy() == "Nodule"]).astype(np.float32)
        mass = np.sort(d[df[label].to_numpy() == "Mass"]).astype(np.float32)
        if len(nodule) == 0 or len(mass) == 0:
            raise DataError(f"{BBOX_CSV} has no Nodule or Mass rows")
        _LESIONS = LesionSizes(nodule=nodule, mass=mass)
    return _LESIONS
