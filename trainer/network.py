"""What trains: peft adapters (LoRA, DoRA, LoHa, LoKr) or the full weights, and the optimizer parameter groups.

:func:`attach_network` freezes every base weight, injects the adapter into the components the config names, and
returns a :class:`Network` that knows the trainable parameters (grouped by component and block so block-wise
learning rates work), how to read/write the adapter state, and the peft configs the exporter needs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import NetworkConfig, OptimConfig
from .errors import ConfigError, require
from .families.base import Components, ModelFamily

ADAPTER = "default"


@dataclass
class Network:
    cfg: NetworkConfig
    modules: dict[str, torch.nn.Module]  # component name -> module that trains
    peft_configs: dict[str, Any] = field(default_factory=dict)  # component -> peft config (adapters only)
    family_name: str = ""

    @property
    def is_full(self) -> bool:
        return self.cfg.network_type == "full"

    def named_trainable(self):
        for comp, module in self.modules.items():
            for name, p in module.named_parameters():
                if p.requires_grad:
                    yield comp, name, p

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, _, p in self.named_trainable()]

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Trainable weights per component: the peft adapter state, or the full module state."""
        if self.is_full:
            return {c: {k: v for k, v in m.state_dict().items()} for c, m in self.modules.items()}
        from peft import get_peft_model_state_dict

        return {c: get_peft_model_state_dict(m, adapter_name=ADAPTER) for c, m in self.modules.items()}

    def load_state_dicts(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        for comp, state in states.items():
            module = self.modules[comp]
            if self.is_full:
                module.load_state_dict(state)
                continue
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ConfigError(f"saved adapter for '{comp}' does not match the network config "
                                  f"(unexpected key {unexpected[0]}); resume with the same network settings")


def _peft_config(cfg: NetworkConfig, targets: list[str], rank_pattern: dict[str, int],
                 alpha_pattern: dict[str, float]):
    peft = require("peft", "peft", "LoRA training")
    common = dict(r=cfg.network_dim, target_modules=targets, rank_pattern=rank_pattern)
    if cfg.network_type in ("lora", "dora"):
        return peft.LoraConfig(lora_alpha=cfg.network_alpha, init_lora_weights=True, alpha_pattern=alpha_pattern,
                               use_dora=cfg.network_type == "dora", **common)
    if cfg.network_type == "loha":
        return peft.LoHaConfig(alpha=cfg.network_alpha, alpha_pattern=alpha_pattern, **common)
    if cfg.network_type == "lokr":
        return peft.LoKrConfig(alpha=cfg.network_alpha, alpha_pattern=alpha_pattern, **common)
    raise ConfigError(f"network.network_type {cfg.network_type!r} has no adapter")


def _block_rank_pattern(family: ModelFamily, comp: str, module: torch.nn.Module, cfg: NetworkConfig,
                        targets: list[str]) -> dict[str, int]:
    """kohya ``block_dims``: one rank per block (down…, mid, up…) as a peft ``rank_pattern``."""
    if not cfg.block_dims or comp not in ("unet", "transformer"):
        return {}
    blocks = _block_order(family, comp, module)
    if len(cfg.block_dims) != len(blocks):
        raise ConfigError(f"network.block_dims has {len(cfg.block_dims)} values but the {family.name} denoiser has "
                          f"{len(blocks)} blocks ({', '.join(blocks)})")
    dims = dict(zip(blocks, cfg.block_dims))
    pattern = {}
    for name, _ in module.named_modules():
        block = family.block_of(comp, name)
        if block in dims and any(name == t or name.endswith("." + t) for t in targets):
            pattern[re.escape(name)] = int(dims[block])
    return pattern


def _conv_patterns(module: torch.nn.Module, cfg: NetworkConfig,
                   targets: list[str]) -> tuple[dict[str, int], dict[str, float]]:
    """kohya LoCon ``conv_dim``/``conv_alpha``: rank and alpha of the targeted k×k convolutions (1×1 convolutions
    count as linear layers, as in kohya). 0 keeps the linear layers' rank / ``network_alpha``."""
    if not (cfg.conv_dim or cfg.conv_alpha):
        return {}, {}
    ranks, alphas = {}, {}
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1) and \
                any(name == t or name.endswith("." + t) for t in targets):
            if cfg.conv_dim:
                ranks[re.escape(name)] = int(cfg.conv_dim)
            alphas[re.escape(name)] = float(cfg.conv_alpha or cfg.network_alpha)
    return ranks, alphas


def _block_order(family: ModelFamily, comp: str, module: torch.nn.Module) -> list[str]:
    seen: list[str] = []
    for name, _ in module.named_modules():
        block = family.block_of(comp, name)
        if block and block not in seen:
            seen.append(block)
    downs = sorted((b for b in seen if b.startswith("down_")), key=lambda b: int(b.split("_")[1]))
    ups = sorted((b for b in seen if b.startswith("up_")), key=lambda b: int(b.split("_")[1]))
    return downs + (["mid"] if "mid" in seen else []) + ups


def attach_network(family: ModelFamily, comps: Components, cfg: NetworkConfig) -> Network:
    """Freeze the base model and make the configured parts trainable."""
    for module in comps.modules().values():
        module.requires_grad_(False)
    if comps.vae is not None:
        comps.vae.requires_grad_(False)
    wanted = []
    if cfg.train_unet:
        wanted.append(comps.denoiser_name)
    if cfg.train_text_encoder:
        wanted.extend(comps.text_encoder_names)
    modules = {name: comps.modules()[name] for name in wanted}
    net = Network(cfg, modules, family_name=family.name)
    if cfg.network_type == "full":
        for module in modules.values():
            module.requires_grad_(True)
        return net
    peft = require("peft", "peft", "LoRA training")
    for comp, module in modules.items():
        targets = family.lora_target_modules(comp, cfg.target_preset)
        pattern = _block_rank_pattern(family, comp, module, cfg, targets)
        alphas = {k: cfg.network_alpha * v / cfg.network_dim for k, v in pattern.items()}  # same alpha/rank per block
        conv_ranks, conv_alphas = _conv_patterns(module, cfg, targets)
        pattern.update(conv_ranks)
        alphas.update(conv_alphas)
        peft_cfg = _peft_config(cfg, targets, pattern, alphas)
        peft.inject_adapter_in_model(peft_cfg, module, adapter_name=ADAPTER)
        net.peft_configs[comp] = peft_cfg
    if not net.parameters():
        raise ConfigError(f"network.target_preset {cfg.target_preset!r} matched no module of {family.name}")
    return net


def param_groups(family: ModelFamily, net: Network, optim: OptimConfig) -> list[dict]:
    """Optimizer groups: denoiser vs text-encoder LR, scaled per block by kohya's down/mid/up LR weights.

    A block whose weight is 0 is frozen (kohya behaviour) and left out of the optimizer.
    """
    base_lr = optim.learning_rate
    groups: dict[tuple[str, float], list] = {}
    for comp, name, p in net.named_trainable():
        is_denoiser = comp in ("unet", "transformer")
        lr = (optim.unet_lr or base_lr) if is_denoiser else (optim.text_encoder_lr or base_lr)
        if is_denoiser:
            lr *= _block_lr_weight(family, comp, name, net.cfg)
        if lr <= 0:
            p.requires_grad_(False)
            continue
        groups.setdefault((comp, lr), []).append(p)
    if not groups:
        raise ConfigError("every trainable block has a learning rate of 0: nothing would train")
    return [{"params": ps, "lr": lr, "name": f"{comp}@{lr:g}"} for (comp, lr), ps in groups.items()]


def _block_lr_weight(family: ModelFamily, comp: str, name: str, cfg: NetworkConfig) -> float:
    if not (cfg.down_lr_weight or cfg.up_lr_weight or cfg.mid_lr_weight != 1.0):
        return 1.0
    block = family.block_of(comp, name.split(".lora_")[0].split(".hada_")[0].split(".lokr_")[0])
    if block is None:
        return 1.0
    if block == "mid":
        return cfg.mid_lr_weight
    kind, _, idx = block.partition("_")
    weights = cfg.down_lr_weight if kind == "down" else cfg.up_lr_weight
    i = int(idx)
    if not weights:
        return 1.0
    if i >= len(weights):
        raise ConfigError(f"network.{kind}_lr_weight has {len(weights)} values but block {block} exists; give one per block")
    return float(weights[i])
