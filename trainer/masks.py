"""Masked loss (kohya ``masked_loss``): a per-image mask weights the training loss per latent pixel.

A dataset's masks come from each image's alpha channel (``alpha_mask``, kohya's option of that name) or from a
same-name image in ``mask_dir`` (kohya's ``conditioning_data_dir``; white = train, black = ignore), looked up as
``mask_dir/<concept folder>/<name>.*`` and then ``mask_dir/<name>.*``; a relative ``mask_dir`` is inside the dataset
folder. An image without a mask trains everywhere (weight 1).

The mask goes through exactly the geometry of its image (:func:`trainer.dataset.load_pil`): EXIF orientation (alpha
masks), the cover scale and crop of its bucket with the same seeded draws, and the same flip. It is computed from the
files for every batch and never stored with cached latents, so latent caching keeps working. In the loss the mask is
averaged down to the latent grid (kohya: area interpolation) and multiplies the per-pixel error before the mean, so a
masked-out latent pixel contributes nothing and gets no gradient.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .captions import sample_rng
from .errors import DatasetError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .config import DatasetConfig
    from .dataset.images import ImageItem


def uses_masks(cfg: "DatasetConfig") -> bool:
    return bool(cfg.alpha_mask or cfg.mask_dir.strip())


def mask_file(item: "ImageItem", cfg: "DatasetConfig") -> Path | None:
    """The mask image for ``item`` in ``cfg.mask_dir`` (concept sub-folder first), or None."""
    from .dataset.images import IMAGE_EXTENSIONS

    if not cfg.mask_dir.strip():
        return None
    root = Path(cfg.mask_dir).expanduser()
    if not root.is_absolute():
        root = Path(cfg.path) / root
    if not root.is_dir():
        raise DatasetError(f"mask_dir '{root}' is not a folder: create it with the masks (same names as the images) "
                           "or clear mask_dir")
    for folder in (root / item.path.parent.name, root):
        for ext in (item.path.suffix, *sorted(IMAGE_EXTENSIONS)):
            candidate = folder / (item.path.stem + ext)
            if candidate.is_file():
                return candidate
    return None


def load_mask(item: "ImageItem", target_w: int, target_h: int, cfg: "DatasetConfig", *, seed: int, epoch: int,
              repeat: int) -> "np.ndarray":
    """The sample's mask ``[target_h, target_w]`` in [0, 1], cropped and flipped exactly like its pixels."""
    import numpy as np
    from PIL import Image, ImageOps

    from .dataset.images import crop_box, file_key

    mask = None
    path = mask_file(item, cfg)
    try:
        if path is not None:
            with Image.open(path) as img:
                mask = img.convert("L")
        elif cfg.alpha_mask:
            with Image.open(item.path) as img:
                img = ImageOps.exif_transpose(img)
                if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
                    mask = img.convert("RGBA").getchannel("A")
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise DatasetError(f"cannot read the mask of '{item.path}' from '{path or item.path}' "
                           f"({type(exc).__name__}: {exc}); replace or remove the file") from None
    if mask is None:
        return np.ones((target_h, target_w), dtype=np.float32)
    if mask.size != (item.width, item.height):  # a mask file of another size covers the whole image
        mask = mask.resize((item.width, item.height), Image.Resampling.BILINEAR)
    key = file_key(item)
    scale, left, top, crop_w, crop_h = crop_box(item.width, item.height, target_w, target_h, cfg.crop_style,
                                                sample_rng(seed, epoch, key, repeat, "crop"))
    mask = mask.resize((target_w, target_h), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    if cfg.flip_aug and sample_rng(seed, epoch, key, repeat, "flip").random() < 0.5:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(mask, dtype=np.float32) / 255.0


def batch_masks(source, batch_plan: Sequence, epoch: int) -> "torch.Tensor":
    """``[B, 1, H, W]`` pixel masks of a batch (1 everywhere for datasets without masks)."""
    import numpy as np
    import torch

    rows = []
    for item_index, repeat in batch_plan:
        item = source.items[item_index]
        cfg = source.datasets[item.dataset_index]
        width, height = source.buckets[item_index]
        rows.append(load_mask(item, width, height, cfg, seed=source.seed, epoch=epoch, repeat=repeat)
                    if uses_masks(cfg) else np.ones((height, width), dtype=np.float32))
    return torch.from_numpy(np.stack(rows))[:, None]


def apply_mask(error: "torch.Tensor", masks: "torch.Tensor") -> "torch.Tensor":
    """Per-pixel ``error`` ``[B, C, h, w]`` weighted by pixel ``masks`` ``[B, 1, H, W]`` averaged to ``h × w``."""
    import torch.nn.functional as F

    weights = F.interpolate(masks.to(error.device, error.dtype), size=error.shape[-2:], mode="area")
    return error * weights


__all__ = ["uses_masks", "mask_file", "load_mask", "batch_masks", "apply_mask"]
