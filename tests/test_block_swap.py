"""Block swap (``training.blocks_to_swap``) on the CPU: the same losses and LoRA weights as without it, and the
swapped blocks' weights off the "device" between uses (a recording mover makes real copies, so a weight on the
device is a different tensor from its home in host memory)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import trainer.block_swap as block_swap
from functools import partial

from run_helpers import SDXL_BOTH_ENCODERS, short_run_config
from trainer.config import TrainConfig
from trainer.families import get_family
from trainer.loop import train

pytestmark = pytest.mark.slow
sdxl_config = partial(short_run_config, defaults=SDXL_BOTH_ENCODERS)


def flux_config(tiny, data, out, steps: int, lr: float) -> TrainConfig:
    """A short Flux LoRA run in fp32 (exact comparisons) on the tiny Flux's diffusers folder."""
    return TrainConfig.from_dict({
        "model": {"family": "flux", "path": str(tiny.folder)},
        "datasets": [{"path": str(data), "resolution": 64, "repeats": 1}],
        "network": {"network_dim": 4, "network_alpha": 4, "target_preset": "attn_mlp"},
        "optim": {"learning_rate": lr, "lr_scheduler": "constant"},
        "training": {"batch_size": 4, "max_train_steps": steps, "seed": 3, "mixed_precision": "no",
                     "timestep_sampling": "logit_normal", "guidance_scale": 3.5},
        "save": {"output_dir": str(out / "models"), "work_dir": str(out / "runs"), "run_name": "t",
                 "save_every_n_epochs": 0, "save_every_n_steps": steps, "save_precision": "fp32"},
    })


class RecordingMover(block_swap.StreamMover):
    """A CPU mover that copies for real and records every move: 'device' tensors are the copies it made."""

    instances: list["RecordingMover"] = []

    def __init__(self, device):
        super().__init__(device)
        self.on_device: set[int] = set()  # data_ptr of the copies handed out
        self.copied_in = 0
        RecordingMover.instances.append(self)

    def start(self, hosts):
        copies = [h.clone() for h in hosts]
        self.on_device.update(c.data_ptr() for c in copies)
        self.copied_in += 1
        return copies


SGD = {"optimizer": "sgd", "learning_rate": 0.1, "lr_scheduler": "constant"}


def _assert_same(plain, swapped, loss_rtol=1e-5, weight_rtol=1e-4, weight_atol=1e-7):
    """Same losses and LoRA weights up to float rounding. The swap's identity nodes change the order in which
    autograd sums a tensor's gradient contributions (gradients agree to ~1e-6 relative); SGD keeps that rounding
    at rounding size in the weights, where AdamW's normalisation would magnify it for near-zero gradients.
    (tests/test_cuda.py passes wider tolerances: CUDA kernels may sum in another order from run to run.)"""
    torch.testing.assert_close(torch.tensor(swapped.losses), torch.tensor(plain.losses), rtol=loss_rtol, atol=0)
    a, b = load_file(str(plain.checkpoints[-1].path)), load_file(str(swapped.checkpoints[-1].path))
    assert a.keys() == b.keys()
    ups = [k for k in a if k.endswith(("lora_up.weight", "lora_B.weight"))]
    assert ups and any(a[k].abs().max() > 1e-4 for k in ups)  # the LoRA did train
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=weight_rtol, atol=weight_atol)


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointed", "plain"])
def test_sdxl_lora_with_block_swap_trains_exactly_as_without(tiny_sdxl, demo_dataset, tmp_path, checkpointing,
                                                             monkeypatch):
    def config(out, swap):
        return sdxl_config(tiny_sdxl, demo_dataset, out, network={"train_text_encoder": False}, optim=SGD,
                           training={"max_train_steps": 3, "blocks_to_swap": swap,
                                     "gradient_checkpointing": checkpointing},
                           save={"save_every_n_steps": 3})

    from accelerate import Accelerator

    plain = train(config(tmp_path / "plain", 0))
    RecordingMover.instances.clear()
    monkeypatch.setattr(block_swap, "StreamMover", RecordingMover)
    placed = []
    real_prepare_model = Accelerator.prepare_model
    monkeypatch.setattr(Accelerator, "prepare_model", lambda self, model, device_placement=None, **kw: placed.append(
        (type(model).__name__, device_placement)) or real_prepare_model(self, model, device_placement, **kw))
    swapped = train(config(tmp_path / "swap", 3))
    _assert_same(plain, swapped)
    mover = RecordingMover.instances[-1]
    assert mover.copied_in >= 3 * 2 * 3  # 3 swapped blocks, in for the forward and again for the backward, 3 steps
    assert placed == [("UNet2DConditionModel", False)]  # accelerate never moves the swapped blocks to the device


def flux_swap_config(tiny_flux, demo_dataset, out, swap: int) -> TrainConfig:
    """3 SGD steps of a tiny Flux LoRA with ``swap`` blocks swapped."""
    data = flux_config(tiny_flux, demo_dataset, out, steps=3, lr=0.1).to_dict()
    data["optim"].update(SGD)
    data["training"]["blocks_to_swap"] = swap
    return TrainConfig.from_dict(data)


def test_flux_lora_with_block_swap_trains_exactly_as_without(tiny_flux, demo_dataset, tmp_path, monkeypatch):
    """The tiny Flux has one double and one single block: swapping 2 streams both kinds."""
    plain = train(flux_swap_config(tiny_flux, demo_dataset, tmp_path / "plain", 0))
    monkeypatch.setattr(block_swap, "StreamMover", RecordingMover)
    swapped = train(flux_swap_config(tiny_flux, demo_dataset, tmp_path / "swap", 2))
    _assert_same(plain, swapped)


def test_swapped_weights_are_on_the_device_only_while_their_block_runs(tiny_sdxl, demo_dataset, tmp_path):
    """At every block's forward and backward: that block's frozen weights are device copies, at most two swapped
    blocks are in (the running one and the prefetched next), and after the step every swapped weight is home."""
    family = get_family("sdxl")
    comps = family.load(sdxl_config(tiny_sdxl, demo_dataset, tmp_path).model)
    from trainer.network import attach_network

    cfg = sdxl_config(tiny_sdxl, demo_dataset, tmp_path, network={"train_text_encoder": False})
    attach_network(family, comps, cfg.network)
    blocks = family.swappable_blocks(comps.denoiser)
    assert len(blocks) == 2 + 1 + 2  # the tiny SDXL UNet: 2 down blocks, the mid block, 2 up blocks
    mover = RecordingMover("cpu")
    swap = block_swap.BlockSwap(blocks, 3, "cpu", mover=mover)
    swapped = [2, 3, 4]
    homes = {i: [h.data_ptr() for _, h in swap.hosts[i]] for i in swapped}

    def where(i):
        ptrs = [p.data.data_ptr() for p, _ in swap.hosts[i]]
        if ptrs == homes[i]:
            return "host"
        assert all(ptr in mover.on_device for ptr in ptrs)
        return "device"

    seen = []

    def check(i, phase):
        states = {j: where(j) for j in swapped}
        if i in swapped:
            assert states[i] == "device", (i, phase, states)
        else:  # a resident block runs: no swapped block is on the device (the backward's last one went home)
            assert set(states.values()) == {"host"}, (i, phase, states)
        assert sum(s == "device" for s in states.values()) <= 2, (i, phase, states)
        seen.append((phase, i))

    checked_backward = set()
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda _m, _a, i=i: check(i, "forward"))
        # the backward check sits on the block's last adapter layer: its backward runs inside the block's backward
        adapters = [m for m in block.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        if adapters:  # (blocks of plain resnets have none; they are checked in the forward only)
            adapters[-1].register_full_backward_pre_hook(lambda _m, _g, i=i: check(i, "backward"))
            checked_backward.add(i)
    assert all(where(i) == "host" for i in swapped)  # home before the first step
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = family.encode_text(comps, ["a", "b"])
    cond["image_geometry"] = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)
    for _ in range(2):
        seen.clear()
        family.predict(comps, latents, torch.tensor([10, 900]), cond).square().mean().backward()
        swap.settle()
        assert all(where(i) == "host" for i in swapped)
        assert [p for p, i in seen if i in swapped].count("forward") == 3
        assert sorted(i for p, i in seen if p == "backward") == sorted(checked_backward)
        assert 1 in checked_backward and checked_backward & set(swapped)  # resident and swapped blocks checked
    trained = [p for b in blocks[2:] for p in b.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)  # the adapter in the swapped blocks learned


def test_more_blocks_than_the_denoiser_has_is_refused(tiny_sdxl, demo_dataset, tmp_path):
    from trainer.errors import ConfigError

    cfg = sdxl_config(tiny_sdxl, demo_dataset, tmp_path, network={"train_text_encoder": False},
                      training={"max_train_steps": 1, "blocks_to_swap": 6})
    with pytest.raises(ConfigError, match="blocks_to_swap is 6.*at most 5"):
        train(cfg)
