"""Dataset folders: scanning, reporting, fingerprinting, image loading and the per-epoch batch order.

Folder layout (kohya style)::

    my_dataset/                 <- DatasetConfig.path
        10_ohwx man/            <- 10 repeats, class tokens "ohwx man"
            001.png  001.txt    <- caption file: same stem + caption_extension
        3_woman/ ...            <- a second concept
        extra.jpg               <- images in the root: class tokens "my_dataset", 1 repeat

Scanning only reads image headers (size and EXIF orientation), so it is fast even on large folders. Unusable files
(empty, not an image, truncated, absurdly large) are skipped and listed in one warning on the ``"crucible"``
logger and in the :class:`ScanReport`.

:class:`DataSource` owns every configured dataset and produces, for each epoch, a deterministic list of batches
(indices only); :meth:`DataSource.load_batch` decodes one batch on a small thread pool. Epoch numbers are 1-based
everywhere (the first epoch is epoch 1), matching :mod:`trainer.plan`.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import warnings
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, Sequence

from .buckets import Resolution, assign_bucket, check_bucket_config
from .captions import ProcessedCaption, clean_tags, process_caption, sample_rng, tag_frequency
from .config import DatasetConfig
from .errors import ConfigError, DatasetError
from .fileio import caption_suffix, check_read, current_read_policy

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

logger = logging.getLogger("crucible")

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
MAX_IMAGE_PIXELS = 178_956_970  # Pillow's default decompression-bomb limit (~ 13377 x 13377), fixed here
# What an image file may really be, whatever its extension (JPEG includes MPO, which Pillow detects through JPEG).
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "GIF", "TIFF")
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")
_TOP_TAGS = 20
_MAX_LOGGED = 100  # files listed in the single warning; the report keeps them all


# --- records ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageItem:
    """One usable image. ``width``/``height`` are after EXIF orientation; ``caption_raw`` is the caption file's
    text (or the missing-caption substitute), before any caption processing."""

    path: Path
    caption_raw: str
    concept: str
    repeats: int
    is_reg: bool
    dataset_index: int
    width: int
    height: int


@dataclass(frozen=True)
class ConceptSummary:
    """One concept folder (or the root's own images)."""

    folder: str
    concept: str
    repeats: int
    images: int


@dataclass(frozen=True)
class CaptionStats:
    """Tags and characters per caption, after cleaning (no trigger words, no randomness)."""

    min_tags: int = 0
    mean_tags: float = 0.0
    max_tags: int = 0
    min_chars: int = 0
    mean_chars: float = 0.0
    max_chars: int = 0


@dataclass(frozen=True)
class ScanReport:
    """What a scan found, for the UI, the logs and the run metadata."""

    root: str
    dataset_index: int
    is_reg: bool
    concepts: tuple[ConceptSummary, ...]
    skipped: tuple[tuple[str, str], ...]  # (file, reason)
    missing_captions: tuple[str, ...]  # image files without a (non-empty) caption file
    missing_caption_policy: str
    caption_fallbacks: tuple[tuple[str, str], ...]  # (caption file, encoding used) when not UTF-8
    caption_stats: CaptionStats
    top_tags: tuple[tuple[str, int], ...]
    tag_frequency: dict[str, dict[str, int]] = field(hash=False, compare=False)  # kohya ss_tag_frequency
    bucket_counts: tuple[tuple[Resolution, int], ...] = ()  # images per bucket
    outside_kohya_folders: tuple[str, ...] = ()  # concept folders kohya would not read (root, no N_ prefix)

    @property
    def images(self) -> int:
        return sum(c.images for c in self.concepts)

    @property
    def samples(self) -> int:
        """Images × repeats (before regularization balancing, see :class:`DataSource`)."""
        return sum(c.images * c.repeats for c in self.concepts)

    @property
    def images_per_concept(self) -> dict[str, int]:
        return {c.concept: c.images for c in self.concepts}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (buckets written as ``"WxH"``)."""
        return {
            "root": self.root, "dataset_index": self.dataset_index, "is_reg": self.is_reg,
            "concepts": [asdict(c) for c in self.concepts],
            "skipped": [list(s) for s in self.skipped], "missing_captions": list(self.missing_captions),
            "missing_caption_policy": self.missing_caption_policy,
            "caption_fallbacks": [list(c) for c in self.caption_fallbacks],
            "caption_stats": asdict(self.caption_stats), "top_tags": [list(t) for t in self.top_tags],
            "tag_frequency": self.tag_frequency,
            "bucket_counts": {f"{w}x{h}": n for (w, h), n in self.bucket_counts},
        }

    def format(self) -> str:
        """Readable multi-line text for ComfyUI's UI and the console."""
        kind = "regularization" if self.is_reg else "training"
        lines = [f"Dataset {self.dataset_index + 1} ({kind}): {self.root}"]
        for c in self.concepts:
            lines.append(f"  {c.folder}: {c.images} image{_s(c.images)} x {c.repeats} repeat{_s(c.repeats)}"
                         f" = {c.images * c.repeats} samples (class tokens \"{c.concept}\")")
        lines.append(f"  total: {self.images} images, {self.samples} samples per epoch")
        if self.bucket_counts:
            lines.append("  buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in self.bucket_counts))
        lines.append(self._caption_line())
        s = self.caption_stats
        lines.append(f"  tags per caption: min {s.min_tags}, mean {s.mean_tags:.1f}, max {s.max_tags}; "
                     f"characters: min {s.min_chars}, mean {s.mean_chars:.0f}, max {s.max_chars}")
        if self.top_tags:
            lines.append("  top tags: " + ", ".join(f"{t} ({n})" for t, n in self.top_tags))
        if self.outside_kohya_folders:
            lines.append(f"  note: images in {', '.join(self.outside_kohya_folders)} are outside kohya-style N_name "
                         "sub-folders: they train here with the repeats shown above, but kohya would ignore them "
                         "(it reads only N_name sub-folders). Move them into N_name folders or set repeats.")
        if self.caption_fallbacks:
            lines.append(f"  {len(self.caption_fallbacks)} caption file(s) were not UTF-8:")
            lines.extend(f"    {self._rel(p)}: read as {enc}" for p, enc in self.caption_fallbacks)
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} file(s):")
            lines.extend(f"    {self._rel(p)}: {why}" for p, why in self.skipped)
        return _printable("\n".join(lines))

    def _caption_line(self) -> str:
        missing = len(self.missing_captions)
        if not missing:
            return "  captions: every image has a caption file"
        action = {"class_tokens": "class tokens used as caption", "empty": "trained with an empty caption",
                  "skip": "skipped"}[self.missing_caption_policy]
        return (f"  captions: {missing} image{_s(missing)} without a caption file: {action} "
                f"(missing_caption={self.missing_caption_policy})")

    def _rel(self, path: str) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return path


@dataclass(frozen=True)
class ScanResult:
    """Usable images of one dataset (in a stable order), the bucket of each, and the report."""

    items: tuple[ImageItem, ...]
    buckets: tuple[Resolution, ...]  # aligned with ``items``
    report: ScanReport


class UnusableImage(DatasetError):
    """An image file that cannot be used; ``reason`` is the short explanation shown in reports."""

    def __init__(self, reason: str, path: Path | str = ""):
        super().__init__(f"image '{path}': {reason}" if path else reason)
        self.reason = reason
        self.path = str(path)


# --- scanning --------------------------------------------------------------------------------------------------------

def scan_dataset(cfg: DatasetConfig, index: int = 0) -> ScanResult:
    """Scan one dataset folder (headers only) into :class:`ImageItem` records and a :class:`ScanReport`.

    Raises :class:`DatasetError` when the folder is missing, holds no images, or none of them is usable.
    """
    where = f"datasets[{index}].path"
    ext = caption_suffix(cfg.caption_extension, f"datasets[{index}].caption_extension")
    root = _check_root(cfg.path, where)
    check_bucket_config(cfg, f"datasets[{index}]")
    items: list[ImageItem] = []
    skipped: list[tuple[str, str]] = []
    missing: list[str] = []
    fallbacks: list[tuple[str, str]] = []
    concepts: list[ConceptSummary] = []
    candidates = 0
    for folder, repeats, concept, images in _concept_groups(root, cfg, skipped):
        candidates += len(images)
        count = 0
        for path in images:
            _check_file(path, "dataset image")
            try:
                width, height = probe_image(path)
                caption, encoding = read_caption(path, ext)
            except UnusableImage as why:
                skipped.append((str(path), why.reason))
                continue
            if encoding:
                fallbacks.append((str(path.parent / (path.stem + ext)), encoding))
            if caption is None or not caption.strip():
                missing.append(str(path))
                if cfg.missing_caption == "skip":
                    continue
                caption = concept if cfg.missing_caption == "class_tokens" else ""
            items.append(ImageItem(path, caption, concept, repeats, cfg.is_reg, index, width, height))
            count += 1
        if count:
            concepts.append(ConceptSummary(folder, concept, repeats, count))
    if not items:
        raise DatasetError(_no_images_message(root, where, candidates, skipped, missing, cfg.missing_caption))
    buckets = tuple(assign_bucket(i.width, i.height, cfg) for i in items)
    report = _build_report(root, index, cfg, items, buckets, concepts, skipped, missing, fallbacks)
    _warn_once(report)
    return ScanResult(tuple(items), buckets, report)


def _check_root(path: str, where: str) -> Path:
    if not path or not path.strip():
        raise DatasetError(f"{where} is empty: set it to a folder of images (kohya layout: sub-folders such as "
                           "'10_concept')")
    root = check_read(path, "data", f"dataset folder ({where})")
    if not root.exists():
        raise DatasetError(f"dataset folder '{root}' ({where}) does not exist: check the path, or create the folder "
                           "and put images in it")
    if not root.is_dir():
        raise DatasetError(f"dataset path '{root}' ({where}) is a file, not a folder: point it at the folder that "
                           "holds the images")
    return root


def _caption_ext(ext: str) -> str:
    return caption_suffix(ext)


def _check_file(path: Path, what: str) -> None:
    """Under a restricted read policy (ComfyUI), a file the scan reads must resolve inside the allowed folders:
    a symlink (or a linked concept folder) must not smuggle files from elsewhere into a run or a report."""
    if current_read_policy().data is not None:
        check_read(path, "data", f"{what} '{path.name}'", typed=False)


def _list_dir(folder: Path) -> list[os.DirEntry]:
    """Directory entries sorted by name, hidden ones (``.DS_Store``, ``._x.png``) left out."""
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not e.name.startswith(".")]
    except OSError as exc:
        raise DatasetError(f"cannot list dataset folder '{folder}': {exc.strerror or exc}; check its "
                           "permissions") from exc
    return sorted(entries, key=lambda e: e.name)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _concept_groups(root: Path, cfg: DatasetConfig, skipped: list[tuple[str, str]]):
    """Yield ``(folder label, repeats, class tokens, image paths)`` for the root and each sub-folder.

    Sub-folders ``N_name`` get ``N`` repeats and class tokens ``name``; other sub-folders 1 repeat and their own name.
    The root's images use the root's name the same way. ``cfg.repeats > 0`` overrides every folder.
    """
    masks = (root / cfg.mask_dir).resolve() if cfg.mask_dir.strip() else None  # mask images are not training images
    groups = [(root, True)] + [(Path(e.path), False) for e in _list_dir(root)
                               if e.is_dir() and (masks is None or Path(e.path).resolve() != masks)]
    for folder, is_root in groups:
        images = [Path(e.path) for e in _list_dir(folder) if _is_image_name(e.name) and e.is_file()]
        if not images:
            continue
        repeats, concept = _folder_repeats(folder.name)
        if cfg.repeats > 0:
            repeats = cfg.repeats
        if repeats < 1:
            skipped.append((str(folder), f"folder repeats prefix is 0, so its {len(images)} image(s) are not used"))
            continue
        yield ("(root)" if is_root else folder.name), repeats, concept, images


def _folder_repeats(name: str) -> tuple[int, str]:
    """``"10_ohwx man"`` → ``(10, "ohwx man")``; a name without the prefix → ``(1, name)``."""
    name = _name_text(name)
    match = _KOHYA_FOLDER.match(name)
    if match and match.group(2).strip():
        return int(match.group(1)), match.group(2).strip()
    return 1, name.strip()


def _name_text(name: str) -> str:
    """A folder name as text a tokenizer accepts. Names that are not valid UTF-8 (Python keeps their bytes as
    surrogate escapes; typical of archives made on Windows) are read as cp1252, else latin-1, like captions."""
    if not any("\udc80" <= c <= "\udcff" for c in name):
        return name
    raw = name.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _pil():
    """``PIL.Image`` with every format plugin registered (``Image.open(formats=...)`` needs them)."""
    from PIL import Image

    Image.init()
    return Image


def probe_image(path: Path) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, from the header only (plus a cheap end-of-file check).

    Raises :class:`UnusableImage` naming the file and the reason.
    """
    try:
        return _probe(Path(path))
    except UnusableImage as exc:
        raise UnusableImage(exc.reason, path) from None


def _probe(path: Path) -> tuple[int, int]:
    from PIL import UnidentifiedImageError

    Image = _pil()

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UnusableImage(f"cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise UnusableImage("empty file (0 bytes)")
    _check_declared_size(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=_PIL_FORMATS) as img:
                width, height = img.size
                _check_pixels(width, height)
                orientation = _orientation(img)
                fmt = img.format or ""
        except Image.DecompressionBombError:
            raise UnusableImage(f"declared size is larger than {MAX_IMAGE_PIXELS:,} pixels (refused as a possible "
                        "decompression bomb); downscale it") from None
        except UnidentifiedImageError:
            raise UnusableImage("not an image Pillow can read (wrong extension or corrupt header)") from None
        except UnusableImage:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder complaint about a header means "corrupt"
            raise UnusableImage(f"corrupt image header ({type(exc).__name__}: {exc})") from None
    if width <= 0 or height <= 0:
        raise UnusableImage(f"invalid size {width}x{height}")
    if _looks_truncated(path, fmt, size) and not _decodes(path):
        raise UnusableImage("truncated or corrupt image data; re-export or remove it")
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _check_declared_size(path: Path) -> None:
    """Refuse a bomb before Pillow opens it, for the one format whose *opening* allocates the whole canvas (WebP:
    libwebp's decoder is created in ``Image.open``). Pillow guards that only while its global ``MAX_IMAGE_PIXELS``
    is set, which any other ComfyUI node may have turned off; Crucible's own limit must hold regardless."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(30)
    except OSError:
        return  # Image.open reports it
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = (int.from_bytes(head[26:28], "little") & 0x3FFF,
                         int.from_bytes(head[28:30], "little") & 0x3FFF)
    elif chunk == b"VP8X":
        width, height = int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    elif chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:
        return
    _check_pixels(width, height)


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise UnusableImage(f"{width}x{height} is larger than {MAX_IMAGE_PIXELS:,} pixels (refused as a possible "
                    "decompression bomb); downscale it")


def _orientation(img: "Image.Image") -> int:
    """EXIF orientation (1..8) without decoding pixels (a PNG's late eXIf chunk is ignored here)."""
    from PIL import Image

    try:
        return int(Image.Image.getexif(img).get(0x0112, 1) or 1)  # base method: never triggers a PNG load()
    except Exception:  # noqa: BLE001 - a broken EXIF block just means "no rotation"
        return 1


def _looks_truncated(path: Path, fmt: str, size: int) -> bool:
    """Cheap end-of-file check per format; a suspect file is then fully decoded before it is rejected."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            fh.seek(max(0, size - 64))
            tail = fh.read()
    except OSError:
        return True
    if fmt == "PNG":
        return tail[-8:-4] != b"IEND"
    if fmt in ("JPEG", "MPO"):
        return not tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if fmt == "WEBP" and head[:4] == b"RIFF":
        return int.from_bytes(head[4:8], "little") + 8 > size
    if fmt in ("BMP", "DIB") and head[:2] == b"BM":
        return int.from_bytes(head[2:6], "little") > size
    return False


def _decodes(path: Path) -> bool:
    """Whether the whole image decodes (JPEGs at 1/8 scale, which still reads all the data)."""
    Image = _pil()

    try:
        with Image.open(path, formats=_PIL_FORMATS) as img:
            img.draft(None, (1, 1))
            img.load()
        return True
    except Exception:  # noqa: BLE001
        return False


def read_caption(image: Path, ext: str = ".txt") -> tuple[str | None, str | None]:
    """``(text, fallback encoding)`` of an image's caption file, ``(None, None)`` when there is none.

    UTF-8 (with or without BOM) and UTF-16 with BOM are read as such; anything else falls back to cp1252, then
    latin-1 (which never fails), and the encoding used is returned so it can be reported.
    """
    path = image.parent / (image.stem + _caption_ext(ext))
    _check_file(path, "caption file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise UnusableImage(f"caption file '{path.name}' cannot be read ({exc.strerror or exc})", image) from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), None
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def _no_images_message(root: Path, where: str, candidates: int, skipped, missing, policy: str) -> str:
    if candidates == 0 and not skipped:
        exts = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        return (f"dataset folder '{root}' ({where}) contains no images ({exts}); put images in it or in kohya-style "
                "sub-folders such as '10_concept'")
    reasons = [f"{Path(p).name}: {why}" for p, why in skipped[:5]]
    if missing and policy == "skip":
        reasons.append(f"{len(missing)} image(s) have no caption file and missing_caption is 'skip'")
    more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
    return (f"no usable image in dataset folder '{root}' ({where}): {'; '.join(reasons)}{more}. "
            "Fix or replace those files")


def _build_report(root, index, cfg, items, buckets, concepts, skipped, missing, fallbacks) -> ScanReport:
    tags = [clean_tags(item.caption_raw, cfg.captions) for item in items]
    n_tags = [len(t) for t in tags]
    n_chars = [len(", ".join(t)) for t in tags]
    stats = CaptionStats(min(n_tags), sum(n_tags) / len(n_tags), max(n_tags),
                         min(n_chars), sum(n_chars) / len(n_chars), max(n_chars))
    frequency = tag_frequency(((i.concept, i.caption_raw) for i in items), cfg.captions)
    overall: Counter = Counter()
    for per_concept in frequency.values():
        overall.update(per_concept)
    return ScanReport(
        root=str(root), dataset_index=index, is_reg=cfg.is_reg, concepts=tuple(concepts), skipped=tuple(skipped),
        missing_captions=tuple(missing), missing_caption_policy=cfg.missing_caption,
        caption_fallbacks=tuple(fallbacks), caption_stats=stats, top_tags=tuple(overall.most_common(_TOP_TAGS)),
        tag_frequency=frequency, bucket_counts=tuple(sorted(Counter(buckets).items())),
        outside_kohya_folders=() if cfg.repeats > 0 else tuple(
            c.folder for c in concepts if c.folder == "(root)" or not _KOHYA_FOLDER.match(_name_text(c.folder))),
    )


def _warn_once(report: ScanReport) -> None:
    """One warning per scan listing every skipped file, non-UTF-8 caption and missing caption."""
    lines = [f"{p}: skipped, {why}" for p, why in report.skipped]
    lines += [f"{p}: caption read as {enc} (not UTF-8)" for p, enc in report.caption_fallbacks]
    if report.missing_captions:
        lines += [f"{p}: no caption file (missing_caption={report.missing_caption_policy})"
                  for p in report.missing_captions]
    if not lines:
        return
    shown = lines[:_MAX_LOGGED]
    if len(lines) > _MAX_LOGGED:
        shown.append(f"... and {len(lines) - _MAX_LOGGED} more (see the dataset report)")
    logger.warning("%s", _printable(f"dataset '{report.root}': {len(lines)} file issue(s):\n  " + "\n  ".join(shown)))


def _printable(text: str) -> str:
    """``text`` with lone surrogates (file names that are not valid UTF-8) spelled as ``\\xNN`` escapes, so it
    can be logged, shown and sent as UTF-8 anywhere."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that did not come from undecodable bytes
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


# --- fingerprint -----------------------------------------------------------------------------------------------------

def dataset_fingerprint(cfgs: DatasetConfig | Sequence[DatasetConfig]) -> str:
    """A hex digest of the datasets' image and caption files (relative names, sizes, mtimes).

    It changes when a file is added, removed, renamed or rewritten; it does not change when the folder is only
    moved (names are relative). Never raises: a missing folder just hashes as missing. Used for ComfyUI's
    ``IS_CHANGED`` and the resume "dataset changed" check.
    """
    if isinstance(cfgs, DatasetConfig):
        cfgs = [cfgs]
    digest = hashlib.sha256()
    for index, cfg in enumerate(cfgs):
        digest.update(f"dataset {index}\n".encode())
        try:
            root = Path(cfg.path).expanduser() if cfg.path.strip() else None
            ext = _caption_ext(cfg.caption_extension)
            usable = root is not None and root.is_dir()
        except (OSError, ValueError):  # a name too long for the file system, a bad caption extension
            usable = False
        if not usable:
            digest.update(b"missing\n")
            continue
        for rel, size, mtime in _file_listing(root, ext):
            digest.update(f"{rel}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _file_listing(root: Path, caption_ext: str) -> Iterable[tuple[str, int, int]]:
    folders = [("", root)]
    try:
        folders += [(e.name + "/", Path(e.path)) for e in _list_dir(root) if e.is_dir()]
        for prefix, folder in folders:
            for entry in _list_dir(folder):
                name = entry.name
                if entry.is_file() and (_is_image_name(name) or name.lower().endswith(caption_ext.lower())):
                    st = entry.stat()
                    yield prefix + name, st.st_size, st.st_mtime_ns
    except (OSError, DatasetError):
        yield "<unreadable>", 0, 0


# --- image loading ---------------------------------------------------------------------------------------------------

@lru_cache(maxsize=32)
def parse_color(value: str, where: str = "background_color") -> tuple[int, int, int]:
    """``"#ffffff"``, ``"white"``, ``"rgb(0,0,0)"`` → an RGB triple; :class:`ConfigError` naming ``where``."""
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(value.strip())
    except (ValueError, AttributeError):
        raise ConfigError(f"{where} {value!r} is not a colour; use a hex value such as '#ffffff' or a name such as "
                          "'white'") from None
    return tuple(rgb[:3])  # type: ignore[return-value]


def load_image(item: ImageItem, target_w: int, target_h: int, cfg: DatasetConfig, *, seed: int, epoch: int,
               repeat: int) -> "torch.Tensor":
    """Decode one image for training: a float32 tensor ``[3, target_h, target_w]`` in ``[-1, 1]``.

    EXIF orientation is applied; transparency is composited on ``cfg.background_color``; greyscale, palette,
    CMYK and 16-bit images become 8-bit RGB. The image is resized to *cover* the target (aspect kept) and cropped
    per ``cfg.crop_style``: ``center``, ``random`` (seeded per sample) or ``corner`` (top-left, which keeps the top
    of portraits). Large JPEGs are decoded at a reduced DCT scale (``draft``) when they are at least twice the
    needed size. ``flip_aug`` mirrors half the samples; ``color_aug`` applies a mild brightness / contrast /
    saturation jitter (±10 %). All randomness is seeded by ``(seed, epoch, file, repeat)``.
    """
    import numpy as np
    import torch

    pil = load_pil(item, target_w, target_h, cfg, seed=seed, epoch=epoch, repeat=repeat)
    # Transpose while still uint8, then do float math on a contiguous array: ~10x faster than on a permuted view.
    chw = np.ascontiguousarray(np.asarray(pil).transpose(2, 0, 1)).astype(np.float32)
    if cfg.color_aug:
        chw = _color_jitter(chw, sample_rng(seed, epoch, _file_key(item), repeat, "color"))
    chw /= 127.5
    chw -= 1.0
    return torch.from_numpy(chw)


def load_pil(item: ImageItem, target_w: int, target_h: int, cfg: DatasetConfig, *, seed: int, epoch: int,
             repeat: int) -> "Image.Image":
    """The RGB PIL image :func:`load_image` uses (before colour jitter), exactly ``target_w × target_h``."""
    from PIL import Image

    key = _file_key(item)
    img = _open_rgb(item.path, target_w, target_h, parse_color(cfg.background_color, "datasets[].background_color"))
    img = _cover_crop(img, target_w, target_h, cfg.crop_style, sample_rng(seed, epoch, key, repeat, "crop"))
    if cfg.flip_aug and sample_rng(seed, epoch, key, repeat, "flip").random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def _file_key(item: ImageItem) -> str:
    """A stable per-image RNG key that survives moving the dataset folder. File names that are not valid UTF-8
    (kept by Python as surrogate escapes) are spelled with backslash escapes, so the key can always be hashed."""
    return _printable(f"{item.dataset_index}/{item.path.parent.name}/{item.path.name}")


def _open_rgb(path: Path, target_w: int, target_h: int, background: tuple[int, int, int]) -> "Image.Image":
    """Open, draft-decode when worthwhile, load, orient and convert to RGB; errors become :class:`DatasetError`."""
    from PIL import ImageOps

    Image = _pil()

    try:
        _check_declared_size(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=_PIL_FORMATS) as img:
                _check_pixels(*img.size)
                orientation = _orientation(img)  # read before load(), exactly as the scan did
                if img.format in ("JPEG", "MPO"):
                    _draft(img, target_w, target_h, orientation)
                img.load()
                if orientation != 1:
                    img = ImageOps.exif_transpose(img)
                return _to_rgb(img, background)
    except FileNotFoundError:
        raise DatasetError(f"image '{path}' no longer exists; it was there when the dataset was scanned. "
                           "Restore it, or rescan the dataset") from None
    except UnusableImage as exc:
        raise UnusableImage(exc.reason, path) from None
    except Image.DecompressionBombError as exc:
        raise UnusableImage(f"refused as a possible decompression bomb ({exc})", path) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise DatasetError(f"cannot decode image '{path}' ({type(exc).__name__}: {exc}); it changed or is corrupt. "
                           "Replace or remove it and restart") from None


def _draft(img: "Image.Image", target_w: int, target_h: int, orientation: int) -> None:
    """Let libjpeg downscale by 2/4/8 while decoding, keeping the result at least the cover size."""
    width, height = img.size
    if orientation in (5, 6, 7, 8):
        target_w, target_h = target_h, target_w
    scale = max(target_w / width, target_h / height)
    if scale <= 0.5:
        img.draft(None, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))


def _to_rgb(img: "Image.Image", background: tuple[int, int, int]) -> "Image.Image":
    """8-bit RGB; transparent pixels composited on ``background``."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img).astype(np.float32)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _crop_box(width: float, height: float, target_w: int, target_h: int, style: str, rng) -> tuple[float, ...]:
    """``(scale, left, top, crop_w, crop_h)``: the image is scaled by ``scale`` to cover the target and the box
    ``(left, top, crop_w, crop_h)`` (in image pixels) is cut out per ``style``."""
    scale = max(target_w / width, target_h / height)
    crop_w, crop_h = min(width, target_w / scale), min(height, target_h / scale)
    free_x, free_y = width - crop_w, height - crop_h
    if style == "random":
        left, top = rng.uniform(0, free_x), rng.uniform(0, free_y)
    elif style == "corner":
        left, top = 0.0, 0.0
    else:
        left, top = free_x / 2, free_y / 2
    return scale, left, top, crop_w, crop_h


def _cover_crop(img: "Image.Image", target_w: int, target_h: int, style: str, rng) -> "Image.Image":
    """Scale to cover ``target`` (aspect kept), then crop; done as one resampling of the crop box."""
    from PIL import Image

    scale, left, top, crop_w, crop_h = _crop_box(*img.size, target_w, target_h, style, rng)
    if abs(scale - 1.0) < 1e-9:  # same scale: a plain pixel crop, no resampling blur
        left, top = round(left), round(top)
        return img.crop((left, top, left + target_w, top + target_h))
    box = (left, top, left + crop_w, top + crop_h)
    return img.resize((target_w, target_h), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def image_geometry(item: ImageItem, target_w: int, target_h: int, cfg: DatasetConfig, *, seed: int, epoch: int,
                   repeat: int) -> tuple[int, int, int, int]:
    """``(original h, original w, crop top, crop left)`` of one training sample, as SDXL's micro-conditioning wants
    them (kohya, diffusers): the image's own size and where :func:`load_pil`'s crop starts in the image scaled to
    cover the target (mirrored when the sample is flipped). Computed from the header size and the same seeded
    draws as the pixels, without decoding."""
    key = _file_key(item)
    scale, left, top, _, _ = _crop_box(item.width, item.height, target_w, target_h, cfg.crop_style,
                                       sample_rng(seed, epoch, key, repeat, "crop"))
    left_px = left * scale
    if cfg.flip_aug and sample_rng(seed, epoch, key, repeat, "flip").random() < 0.5:
        left_px = item.width * scale - target_w - left_px
    return item.height, item.width, round(top * scale), max(0, round(left_px))


def _color_jitter(chw, rng):
    """Mild brightness, contrast and saturation jitter (each ×0.9…1.1) on a float ``[3, H, W]`` array in 0..255,
    modified in place."""
    import numpy as np

    brightness, contrast, saturation = (np.float32(rng.uniform(0.9, 1.1)) for _ in range(3))
    chw *= brightness
    mean = chw.mean(dtype=np.float32)
    chw -= mean
    chw *= contrast
    chw += mean
    grey = np.float32(0.299) * chw[0] + np.float32(0.587) * chw[1] + np.float32(0.114) * chw[2]
    chw -= grey
    chw *= saturation
    chw += grey
    return np.clip(chw, 0.0, 255.0, out=chw)


# --- the data source -------------------------------------------------------------------------------------------------

class Sample(NamedTuple):
    """One entry of a batch plan: an image (index into :attr:`DataSource.items`) and which of its repeats."""

    item: int
    repeat: int


BatchPlan = tuple[Sample, ...]


@dataclass
class Batch:
    """A decoded batch. ``weights`` holds each caption's ``(text, weight)`` pieces when any dataset in the batch
    uses weighted captions, else ``None``."""

    pixels: "torch.Tensor"  # [B, 3, H, W] float32 in [-1, 1]
    captions: list[str]
    weights: list[tuple[tuple[str, float], ...]] | None
    items: list[int]
    repeats: list[int]
    is_reg: list[bool]
    resolution: Resolution  # (width, height)


@dataclass(frozen=True)
class CaptionPreviewRow:
    """What training sees for one sample: the raw caption and the processed one."""

    item: int
    epoch: int
    repeat: int
    file: str
    raw: str
    caption: str
    dropped: bool


def balance_reg_repeats(train_samples: int, reg_repeats: Sequence[int]) -> list[int]:
    """Repeats for regularization images so an epoch holds about ``train_samples`` of them (kohya's rule).

    First pass: each image in order with its folder repeats, until the target is reached (later images get 0).
    Further passes: one more repeat per image in order until the target is reached.
    """
    out = [0] * len(reg_repeats)
    total = 0
    for i, repeats in enumerate(reg_repeats):
        if total >= train_samples:
            return out
        out[i] = repeats
        total += repeats
    while out and total < train_samples:
        for i in range(len(out)):
            if total >= train_samples:
                break
            out[i] += 1
            total += 1
    return out


class DataSource:
    """Every configured dataset, bucketed, with a deterministic batch order per epoch.

    * Each dataset keeps its own resolution, bucketing, repeats, augmentation and caption options; images of
      different datasets that land in the same bucket may share a batch.
    * Repeats are an index map: a :class:`Sample` is ``(item, repeat)``; nothing is copied.
    * Regularization datasets (``is_reg``) are mixed in as kohya does: their repeats are re-balanced with
      :func:`balance_reg_repeats` so an epoch holds as many regularization samples as training samples (an epoch is
      then twice as long), they are shuffled together with training samples inside buckets, and
      the loop gives a sample whose item ``is_reg`` the prior-preservation loss weight (``training.prior_loss_weight``;
      :attr:`Batch.is_reg` lists the same flags for other readers). Without training
      images, regularization images alone are an error.
    * All randomness (batch order, captions, crops, flips) comes from local RNGs seeded by ``(seed, epoch, …)``, so
      any epoch can be replayed exactly, in any order (exact resume).
    * ``validation_split`` holds images out for the validation loss (:func:`trainer.validation.holdout_items`): they
      stay in :attr:`items` (indices are stable) and are listed in :attr:`validation_items`, but get no repeats, so
      no epoch, bucket count or step plan includes them.
    """

    def __init__(self, datasets: Sequence[DatasetConfig], seed: int, validation_split: float = 0.0):
        if not datasets:
            raise DatasetError("no dataset configured: set datasets[0].path to a folder of images")
        self.datasets = tuple(datasets)
        self.seed = int(seed)
        for i, cfg in enumerate(self.datasets):
            parse_color(cfg.background_color, f"datasets[{i}].background_color")
        self.scans = tuple(scan_dataset(cfg, i) for i, cfg in enumerate(self.datasets))
        self.items: tuple[ImageItem, ...] = tuple(item for scan in self.scans for item in scan.items)
        from .validation import holdout_items

        # Held-out validation images stay in ``items`` (indices are stable) but get no repeats: never trained on.
        self.validation_items, self.validation_note = holdout_items(self.items, validation_split, self.seed)
        self.buckets: tuple[Resolution, ...] = tuple(b for scan in self.scans for b in scan.buckets)
        self.repeats: tuple[int, ...] = self._effective_repeats()
        self._by_bucket = self._bucket_samples()
        self._pool: ThreadPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None

    # --- structure ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def _effective_repeats(self) -> tuple[int, ...]:
        held = set(self.validation_items)
        repeats = [0 if i in held else item.repeats for i, item in enumerate(self.items)]
        train = sum(r for r, item in zip(repeats, self.items) if not item.is_reg)
        reg_idx = [i for i, item in enumerate(self.items) if item.is_reg]
        if reg_idx and not train:
            raise DatasetError("only regularization datasets (is_reg) are configured; add a training dataset")
        for i, r in zip(reg_idx, balance_reg_repeats(train, [self.items[i].repeats for i in reg_idx])):
            repeats[i] = r
        return tuple(repeats)

    def _bucket_samples(self) -> dict[Resolution, list[Sample]]:
        by_bucket: dict[Resolution, list[Sample]] = {}
        for index, (bucket, repeats) in enumerate(zip(self.buckets, self.repeats)):
            by_bucket.setdefault(bucket, []).extend(Sample(index, r) for r in range(repeats))
        return {b: s for b, s in sorted(by_bucket.items()) if s}

    def bucket_counts(self) -> dict[Resolution, int]:
        """Samples (images × effective repeats) per bucket: the input of :func:`trainer.plan.plan_from_counts`."""
        return {bucket: len(samples) for bucket, samples in self._by_bucket.items()}

    @property
    def samples_per_epoch(self) -> int:
        return sum(self.repeats)

    @property
    def has_random_augmentation(self) -> bool:
        """True when an image's pixels differ between epochs/repeats (so cached latents would be stale)."""
        return any(c.flip_aug or c.color_aug or c.crop_style == "random" for c in self.datasets)

    def fingerprint(self) -> str:
        return dataset_fingerprint(self.datasets)

    def report_text(self) -> str:
        text = "\n\n".join(scan.report.format() for scan in self.scans)
        return text + (f"\n{self.validation_note}" if self.validation_note else "")

    # --- per epoch ---------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, batch_size: int, drop_last: bool = False) -> list[BatchPlan]:
        """The batches of one (1-based) epoch: each a tuple of :class:`Sample` sharing one bucket.

        Samples are shuffled inside each bucket and cut into batches (a bucket's last partial batch is dropped
        when ``drop_last``), then the batch order is shuffled. Every ``(item, repeat)`` appears exactly once
        (unless dropped). Deterministic in ``(seed, epoch)``.
        """
        _check_epoch(epoch)
        if batch_size < 1:
            raise ConfigError(f"training.batch_size is {batch_size}; it must be at least 1")
        batches: list[BatchPlan] = []
        for (width, height), samples in self._by_bucket.items():
            order = list(samples)
            sample_rng(self.seed, epoch, f"bucket {width}x{height}", 0, "order").shuffle(order)
            for start in range(0, len(order), batch_size):
                chunk = tuple(order[start:start + batch_size])
                if drop_last and len(chunk) < batch_size:
                    break
                batches.append(chunk)
        sample_rng(self.seed, epoch, "batches", 0, "order").shuffle(batches)
        return batches

    def image_geometry(self, batch_plan: Sequence[Sample | tuple[int, int]], epoch: int) -> list[tuple[int, ...]]:
        """Per sample ``(original h, original w, crop top, crop left)`` (see :func:`image_geometry`)."""
        out = []
        for item, repeat in batch_plan:
            image = self.items[item]
            width, height = self.buckets[item]
            out.append(image_geometry(image, width, height, self.datasets[image.dataset_index], seed=self.seed,
                                      epoch=epoch, repeat=repeat))
        return out

    def caption(self, item: int, epoch: int, repeat: int = 0) -> ProcessedCaption:
        """The processed caption of one sample — the single caption path used by training and previews."""
        _check_epoch(epoch)
        image = self.items[item]
        cfg = self.datasets[image.dataset_index].captions
        return process_caption(image.caption_raw, cfg, seed=self.seed, epoch=epoch, item=item, repeat=repeat)

    def load_batch(self, batch_plan: Sequence[Sample | tuple[int, int]], epoch: int) -> Batch:
        """Decode a batch (images in parallel on a small thread pool) and process its captions."""
        import torch

        _check_epoch(epoch)
        plan = [Sample(*s) for s in batch_plan]
        if not plan:
            raise ValueError("load_batch got an empty batch plan")
        resolution = self.buckets[plan[0].item]
        if any(self.buckets[s.item] != resolution for s in plan):
            raise ValueError("load_batch: the samples of one batch must share a bucket resolution")
        width, height = resolution

        def decode(sample: Sample):
            image = self.items[sample.item]
            return load_image(image, width, height, self.datasets[image.dataset_index], seed=self.seed,
                              epoch=epoch, repeat=sample.repeat)

        pixels = torch.stack(list(self._executor().map(decode, plan)))
        captions = [self.caption(s.item, epoch, s.repeat) for s in plan]
        weighted = any(c.weights is not None for c in captions)
        weights = [c.weights if c.weights is not None else ((c.text, 1.0),) for c in captions] if weighted else None
        return Batch(pixels=pixels, captions=[c.text for c in captions], weights=weights,
                     items=[s.item for s in plan], repeats=[s.repeat for s in plan],
                     is_reg=[self.items[s.item].is_reg for s in plan], resolution=resolution)

    def caption_preview(self, indices: Iterable[int], epochs: Iterable[int],
                        repeats: Iterable[int] = (0,)) -> list[CaptionPreviewRow]:
        """Processed captions for chosen images/epochs/repeats, via exactly the training caption path."""
        rows = []
        epochs, repeats = list(epochs), list(repeats)
        for index in indices:
            image = self.items[index]
            for epoch in epochs:
                for repeat in repeats:
                    cap = self.caption(index, epoch, repeat)
                    rows.append(CaptionPreviewRow(index, epoch, repeat, str(image.path), image.caption_raw,
                                                  cap.text, cap.dropped))
        return rows

    # --- resources ---------------------------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="crucible-data")
            self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def close(self) -> None:
        """Stop the decode threads (also done automatically when the source is garbage collected)."""
        if self._finalizer is not None:
            self._finalizer()
        self._pool = None
        self._finalizer = None

    def __enter__(self) -> "DataSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_epoch(epoch: int) -> None:
    if epoch < 1:
        raise ValueError(f"epoch numbers start at 1, got {epoch}")


def _s(n: int) -> str:
    return "" if n == 1 else "s"


__all__ = ["ImageItem", "ConceptSummary", "CaptionStats", "ScanReport", "ScanResult", "scan_dataset",
           "probe_image", "read_caption", "UnusableImage", "dataset_fingerprint", "parse_color", "load_image",
           "load_pil", "image_geometry", "Sample",
           "BatchPlan", "Batch", "CaptionPreviewRow", "balance_reg_repeats", "DataSource", "IMAGE_EXTENSIONS",
           "MAX_IMAGE_PIXELS"]
