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
                 alpha_pattern: dict[str, float], exclude: list[str] | None = None):
    peft = require("peft", "peft", "LoRA training")
    common = dict(r=cfg.network_dim, target_modules=targets, rank_pattern=rank_pattern, exclude_modules=exclude or None)
    if cfg.network_type in ("lora", "dora"):
        return peft.LoraConfig(lora_alpha=cfg.network_alpha, init_lora_weights=True, alpha_pattern=alpha_pattern,
                               use_dora=cfg.network_type == "dora", **common)
    if cfg.network_type == "loha":
        return peft.LoHaConfig(alpha=cfg.network_alpha, alpha_pattern=alpha_pattern, **common)
    if cfg.network_type == "lokr":
        return peft.LoKrConfig(alpha=cfg.network_alpha, alpha_pattern=alpha_pattern, **common)
    raise ConfigError(f"network.network_type {cfg.network_type!r} has no adapter")


def _block_patterns(family: ModelFamily, comp: str, module: torch.nn.Module, cfg: NetworkConfig,
                    targets: list[str]) -> tuple[dict[str, int], dict[str, float], list[str]]:
    """kohya ``block_dims`` / ``block_alphas`` (linear and 1×1 layers) and ``conv_block_dims`` /
    ``conv_block_alphas`` (k×k convolutions), one value per block of kohya's layout, as peft rank/alpha patterns;
    modules whose block rank is 0 are excluded (no adapter, as in kohya)."""
    layout = family.block_layout if comp == "unet" else None
    if layout is None or not (cfg.block_dims or cfg.conv_block_dims):
        return {}, {}, []
    dims = layout.per_block(cfg.block_dims, "block_dims")
    alphas = layout.per_block(cfg.block_alphas, "block_alphas") or [cfg.network_alpha] * layout.total
    conv_dims = layout.per_block(cfg.conv_block_dims, "conv_block_dims")
    conv_alphas = layout.per_block(cfg.conv_block_alphas, "conv_block_alphas") or \
        [cfg.conv_alpha or cfg.network_alpha] * layout.total
    ranks, alpha_pattern, excluded = {}, {}, []
    for name, layer in module.named_modules():
        index = layout.index(name)
        if index is None or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        conv = isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)
        rank_list, alpha_list = (conv_dims, conv_alphas) if conv else (dims, alphas)
        if rank_list is None:
            continue
        if int(rank_list[index]) <= 0:
            excluded.append(name)
            continue
        ranks[re.escape(name)] = int(rank_list[index])
        alpha_pattern[re.escape(name)] = float(alpha_list[index])
    return ranks, alpha_pattern, excluded


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


def attach_network(family: ModelFamily, comps: Components, cfg: NetworkConfig) -> Network:
    """Freeze the base model and make the configured parts trainable (encoders released after caching are
    placeholders, not modules: nothing to freeze)."""
    for module in [*comps.modules().values(), comps.vae]:
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
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
        pattern, alphas = _conv_patterns(module, cfg, targets)
        block_ranks, block_alphas, excluded = _block_patterns(family, comp, module, cfg, targets)
        pattern.update(block_ranks)
        alphas.update(block_alphas)
        peft_cfg = _peft_config(cfg, targets, pattern, alphas, excluded)
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
    layout = family.block_layout
    weights = layout.lr_weights(net.cfg.down_lr_weight, net.cfg.mid_lr_weight, net.cfg.up_lr_weight) \
        if layout is not None else None
    groups: dict[tuple[str, float], list] = {}
    for comp, name, p in net.named_trainable():
        is_denoiser = comp == family.denoiser_name
        lr = (optim.unet_lr or base_lr) if is_denoiser else (optim.text_encoder_lr or base_lr)
        if is_denoiser and weights is not None:
            index = family.block_index(comp, name)
            lr *= weights[index] if index is not None else 1.0
        if lr <= 0:
            p.requires_grad_(False)
            continue
        groups.setdefault((comp, lr), []).append(p)
    if not groups:
        raise ConfigError("every trainable block has a learning rate of 0: nothing would train")
    return [{"params": ps, "lr": lr, "name": f"{comp}@{lr:g}"} for (comp, lr), ps in groups.items()]
