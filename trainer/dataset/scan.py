"""Dataset folders: scanning (kohya layout, headers only), caption files, the :class:`ScanReport` and the folder
fingerprint.

Folder layout (kohya style)::

    my_dataset/                 <- DatasetConfig.path
        10_ohwx man/            <- 10 repeats, class tokens "ohwx man"
            001.png  001.txt    <- caption file: same stem + caption_extension
        3_woman/ ...            <- a second concept
        extra.jpg               <- images in the root: class tokens "my_dataset", 1 repeat

Scanning only reads image headers (size and EXIF orientation, :func:`trainer.dataset.images.probe_image`), so it
is fast even on large folders. Unusable files (empty, not an image, truncated, absurdly large) are skipped and
listed in one warning on the ``"crucible"`` logger and in the :class:`ScanReport`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..buckets import Resolution, assign_bucket, check_bucket_config
from ..captions import clean_tags, tag_frequency
from ..config import DatasetConfig
from ..errors import DatasetError
from ..fileio import caption_suffix, check_read, current_read_policy
from .images import IMAGE_EXTENSIONS, ImageItem, UnusableImage, printable, probe_image

logger = logging.getLogger("crucible")

_KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")
_TOP_TAGS = 20
_MAX_LOGGED = 100  # files listed in the single warning; the report keeps them all


# --- records ---------------------------------------------------------------------------------------------------------

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
        return printable("\n".join(lines))

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
    logger.warning("%s", printable(f"dataset '{report.root}': {len(lines)} file issue(s):\n  " + "\n  ".join(shown)))



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



def _s(n: int) -> str:
    return "" if n == 1 else "s"



__all__ = ["ConceptSummary", "CaptionStats", "ScanReport", "ScanResult", "scan_dataset", "read_caption",
           "dataset_fingerprint"]
