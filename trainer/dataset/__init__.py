"""The data side of training, in three modules along its seams:

* :mod:`.scan` — dataset folders (kohya layout) scanned from headers only, caption files, the
  :class:`ScanReport` and the folder fingerprint;
* :mod:`.images` — probing image files (size, orientation, unusable files) and decoding them for training
  (crop, flip, colour jitter, all seeded);
* :mod:`.source` — :class:`DataSource`: every configured dataset, bucketed, with a deterministic batch order per
  epoch and a thread pool that decodes batches.

Import from ``trainer.dataset``; the names below are its public API.
"""
from __future__ import annotations

from .images import (IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, ImageItem, UnusableImage, image_geometry, load_image,
                     load_pil, parse_color, probe_image)
from .scan import (CaptionStats, ConceptSummary, ScanReport, ScanResult, dataset_fingerprint, read_caption,
                   scan_dataset)
from .source import Batch, BatchPlan, CaptionPreviewRow, DataSource, Sample, balance_reg_repeats

__all__ = ["ImageItem", "ConceptSummary", "CaptionStats", "ScanReport", "ScanResult", "scan_dataset",
           "probe_image", "read_caption", "UnusableImage", "dataset_fingerprint", "parse_color", "load_image",
           "load_pil", "image_geometry", "Sample",
           "BatchPlan", "Batch", "CaptionPreviewRow", "balance_reg_repeats", "DataSource", "IMAGE_EXTENSIONS",
           "MAX_IMAGE_PIXELS"]
