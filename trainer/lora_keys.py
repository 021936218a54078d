"""LoRA key names that ComfyUI 0.8.0's stock LoraLoader loads: the :class:`KeyStyle` vocabulary. Each family
declares its components' styles (``ModelFamily.key_styles``).

The choices follow ``shared/comfyui/lora_formats.md`` (conventions marked "tested" there, plus the kohya names
A1111/Forge/civitai expect): UNets and text encoders in kohya style (``lora_unet_<diffusers name, . → _>``,
``lora_te1_text_model_…``), MMDiT transformers in PEFT style (``transformer.<diffusers name>``).

kohya-style prefixes take ``.lora_down.weight`` / ``.lora_up.weight``; PEFT-style prefixes take ``.lora_A.weight`` /
``.lora_B.weight``. Every prefix also gets ``.alpha`` (and ``.dora_scale`` for DoRA); LoHa and LoKr use LyCORIS'
``.hada_*`` / ``.lokr_*`` names under the same prefix.

CLIP text encoders always carry the ``text_model.`` level: transformers 5.x's ``CLIPTextModel`` has none, and
ComfyUI loads no key without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .families.base import ModelFamily

_CLIP_LEVEL = "text_model."


@dataclass(frozen=True)
class KeyStyle:
    """How one component's module names become LoRA key prefixes.

    ``kohya``: ``prefix + "_" + name.replace(".", "_")``; otherwise ``prefix + "." + name``. ``clip``: the module is
    a CLIP text model whose names must start with ``text_model.``.
    """

    prefix: str
    kohya: bool
    clip: bool = False

    @property
    def separator(self) -> str:
        return "_" if self.kohya else "."

    @property
    def down_up(self) -> tuple[str, str]:
        """Suffixes of the LoRA down (peft ``lora_A``) and up (peft ``lora_B``) matrices."""
        return ("lora_down.weight", "lora_up.weight") if self.kohya else ("lora_A.weight", "lora_B.weight")

    def module_key(self, module_name: str) -> str:
        """The key prefix of a module (``down_blocks.0.attentions.0.proj_in`` → ``lora_unet_down_blocks_0_…``)."""
        if self.clip and not module_name.startswith(_CLIP_LEVEL):
            module_name = _CLIP_LEVEL + module_name
        return self.prefix + self.separator + (module_name.replace(".", "_") if self.kohya else module_name)

    def owns(self, key: str) -> bool:
        """Whether a file key belongs to this component."""
        return key.startswith(self.prefix + self.separator)


def kohya(prefix: str, clip: bool = False) -> KeyStyle:
    """A kohya-style component (``lora_unet_…``, ``lora_te1_…``)."""
    return KeyStyle(prefix, kohya=True, clip=clip)


TRANSFORMER = KeyStyle("transformer", kohya=False)  # PEFT-style ``transformer.<diffusers name>`` (SD3, Flux)


def key_style(family: "str | ModelFamily", component: str) -> KeyStyle:
    """The :class:`KeyStyle` of one component (the family's ``key_styles``), or a :class:`ConfigError` naming the
    valid choices."""
    from .families import get_family

    family = get_family(family)
    styles = family.key_styles
    if component not in styles:
        raise ConfigError(f"{family.name} LoRA export has no component '{component}'; it has: {', '.join(styles)}")
    return styles[component]


def lora_prefix(family: "str | ModelFamily", component: str, module_name: str) -> str:
    """The key prefix ComfyUI maps for ``module_name`` (a diffusers/transformers module name) of a component."""
    return key_style(family, component).module_key(module_name)


def is_scale_shift_swapped(family: "str | ModelFamily", module_name: str, weight_shape: tuple[int, ...]) -> bool:
    """Whether ComfyUI stores this module's weight with its two output halves swapped (``swap_scale_shift``).

    diffusers' ``AdaLayerNormContinuous`` emits ``(scale, shift)``; ComfyUI's SD3/Flux weights hold
    ``(shift, scale)``. Which modules those are is the family's fact (``ModelFamily.scale_shift_swapped``).
    ComfyUI swaps LoRA deltas itself; only a per-row DoRA scale has to be swapped by the exporter.
    """
    from .families import get_family

    return len(weight_shape) == 2 and get_family(family).scale_shift_swapped(module_name, tuple(weight_shape))


def swap_halves(tensor: "torch.Tensor") -> "torch.Tensor":
    """Swap the two halves of dim 0 (its own inverse)."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
