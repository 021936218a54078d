"""Tagging node: images + caption strings from any tagger node (WD14 …) → a captioned dataset folder."""
from __future__ import annotations

from ..trainer import CaptionConfig
from . import _comfy
from .lists import split_list
from .widgets import BOOL, STRING, text_result


def _first(value, default=None):
    """INPUT_IS_LIST hands every widget over as a one-item list."""
    if isinstance(value, list):
        return value[0] if value else default
    return value


class CrucibleWriteCaptions:
    """Write each image with a same-name .txt caption into a dataset folder, ready for Crucible Dataset."""

    CATEGORY = "Crucible/dataset"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "report")
    FUNCTION = "write"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True
    DESCRIPTION = ("Raw images + the captions your tagger node made (WD14 and others output STRING) → a captioned "
                   "dataset folder. Existing files are never replaced unless overwrite is on; files are written "
                   "atomically. Connect 'path' to Crucible Dataset.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The images (a batch or a list), in the same order as the captions."}),
            "captions": ("STRING", {"forceInput": True, "tooltip": "One caption per image, e.g. from a WD14 tagger node."}),
            "path": STRING("my_dataset/10_ohwx", "Dataset folder to write into. Relative paths are inside ComfyUI/input; a kohya-style 10_name folder sets 10 repeats."),
            "name_prefix": STRING("image", "File names: <prefix>_0000.png with <prefix>_0000.txt."),
            "trigger_word": STRING("", "Put in front of every caption (kept once if the tagger already wrote it)."),
            "remove_tags": STRING("", "Tags removed from every caption (one per line or comma-separated): the traits the trigger word should carry.", multiline=True),
            "overwrite": BOOL(False, "Replace files that already exist (off: they are skipped and reported)."),
        }}

    def write(self, images, captions, path, name_prefix, trigger_word, remove_tags, overwrite):
        from ..trainer import write_captioned_images

        folder = _comfy.resolve_dataset_path(_first(path, ""))
        pils = [pil for batch in images for pil in _comfy.image_to_pil(batch)]
        texts = [str(c) for c in captions]
        cfg = CaptionConfig(trigger_word=_first(trigger_word, ""), remove_tags=split_list(_first(remove_tags, "")))
        report = write_captioned_images(folder, pils, texts, prefix=_first(name_prefix, "image"), cfg=cfg,
                                        overwrite=bool(_first(overwrite, False)))
        text = report.format()
        return text_result(text, (str(_first(path)), text))


NODES = {"CrucibleWriteCaptions": CrucibleWriteCaptions}
NAMES = {"CrucibleWriteCaptions": "Crucible Write Captions (tagging)"}
