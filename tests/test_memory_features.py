"""The memory options for full fine-tunes that fit: the fused backward pass, bf16 weights with stochastic rounding,
AdamW chosen for memory, and an export cast that never copies the model on the training device."""
from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import load_file

from functools import partial

from run_helpers import ONE_EPOCH_EXACT, short_run_config
from trainer.config import TrainConfig
from trainer.errors import ConfigError, TrainingDivergedError
from trainer.loop import train
from trainer.param_step import FusedBackward, step_parameter
from trainer.stochastic_rounding import stochastic_round_to_bf16

BF16_SPACING_AT_1 = 2.0 ** -7
make_config = partial(short_run_config, defaults=ONE_EPOCH_EXACT)


# --- stochastic rounding ---------------------------------------------------------------------------------------------

def test_stochastic_rounding_is_unbiased_and_lands_on_the_two_neighbours():
    for fraction in (0.1, 0.3, 0.5, 0.9):
        x = torch.full((100_000,), 1.0 + fraction * BF16_SPACING_AT_1)
        rounded = stochastic_round_to_bf16(x, torch.Generator().manual_seed(1)).float()
        assert set(rounded.unique().tolist()) == {1.0, 1.0 + BF16_SPACING_AT_1}
        # mean of 100k Bernoulli(fraction) draws: standard error < 0.0016 of the spacing; 5 σ
        assert abs(rounded.mean().item() - x[0].item()) < 0.008 * BF16_SPACING_AT_1
    negative = stochastic_round_to_bf16(torch.full((100_000,), -3.3), torch.Generator().manual_seed(2)).float()
    assert abs(negative.mean().item() + 3.3) < 1e-3
    special = torch.tensor([float("inf"), -float("inf"), 2.5, 0.0])
    assert stochastic_round_to_bf16(special).float().tolist() == [float("inf"), -float("inf"), 2.5, 0.0]
    assert stochastic_round_to_bf16(torch.tensor([float("nan")])).isnan().all()


def test_tiny_updates_add_up_with_stochastic_rounding_and_vanish_with_round_to_nearest():
    """1000 updates of +1e-4 to a bf16 weight of 1.0 (each < half the 0.0078 spacing): nearest rounding keeps 1.0
    for ever; stochastic rounding ends near 1.1 as float32 would."""
    nearest = torch.ones(4096, dtype=torch.bfloat16)
    stochastic = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    optimizer = torch.optim.SGD([stochastic], lr=1.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(1000):
        nearest = (nearest.float() + 1e-4).to(torch.bfloat16)
        stochastic.grad = torch.full_like(stochastic, -1e-4)
        step_parameter(optimizer, stochastic, generator)
    assert torch.all(nearest == 1.0)
    assert stochastic.dtype == torch.bfloat16 and stochastic.grad is None
    assert abs(stochastic.float().mean().item() - 1.1) < 0.005


# --- fused backward pass ---------------------------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.AdamW(params, lr=1e-2),
    lambda params: __import__("transformers").optimization.Adafactor(params, lr=1e-2, relative_step=False,
                                                                     scale_parameter=False),
], ids=["adamw", "adafactor"])
def test_fused_backward_steps_each_tensor_as_the_whole_step_does_and_frees_its_gradient(make_optimizer):
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.randn(32, 4)
    plain, fused = _mlp(), _mlp()
    plain_opt = make_optimizer(plain.parameters())
    params = list(fused.parameters())
    fused_opt = make_optimizer([{"params": params[:2]}, {"params": params[2:], "lr": 5e-3}])
    plain_opt = make_optimizer([{"params": list(plain.parameters())[:2]},
                                {"params": list(plain.parameters())[2:], "lr": 5e-3}])
    hooks = FusedBackward(fused_opt, params, max_grad_norm=0.0)
    seen_grads = []
    for step in range(1, 5):
        ((plain(x) - y) ** 2).mean().backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        hooks.begin(step)
        ((fused(x) - y) ** 2).mean().backward()
        seen_grads.append([p.grad for p in params])
        assert hooks.stepped == len(params)
    assert all(g is None for grads in seen_grads for g in grads)  # freed as soon as each tensor stepped
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert [g["params"] for g in fused_opt.param_groups] == [params[:2], params[2:]]  # groups restored


def test_fused_backward_clips_each_tensor_to_max_grad_norm():
    """kohya's fused pass clips per tensor (the gradients are never all alive for a global norm): with SGD at lr 1
    each tensor's update is its own gradient scaled to norm ≤ max_grad_norm, and a small gradient is left alone."""
    model = _mlp()
    x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)), torch.randn(16, 4)
    reference = _mlp()
    ((reference(x) - y) ** 2).mean().mul(100).backward()
    grads = [p.grad for p in reference.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    hooks = FusedBackward(torch.optim.SGD(model.parameters(), lr=1.0), list(model.parameters()), max_grad_norm=0.5)
    hooks.begin(1)
    ((model(x) - y) ** 2).mean().mul(100).backward()
    for old, new, grad in zip(before, model.parameters(), grads):
        expected = grad * min(1.0, 0.5 / (grad.norm().item() + 1e-6))
        torch.testing.assert_close(old - new.detach(), expected, rtol=1e-4, atol=1e-6)
    assert any(g.norm() > 0.5 for g in grads)  # clipping did bite on some tensor


def test_fused_backward_stops_on_a_non_finite_gradient_before_the_tensor_changes():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    hooks = FusedBackward(torch.optim.AdamW(model.parameters()), list(model.parameters()), max_grad_norm=1.0)
    hooks.begin(7)
    with pytest.raises(TrainingDivergedError, match="at step 7"):
        (model(torch.randn(2, 8)).sum() * float("inf")).backward()
    assert torch.equal(list(model.parameters())[-1], before[-1])  # the first tensor reached was not stepped


def _full_config(tiny_sd15, demo_dataset, out, **training):
    return make_config(tiny_sd15, demo_dataset, out, network={"network_type": "full"},
                       optim={"learning_rate": 1e-4, "max_grad_norm": 0.0},
                       training={"max_train_steps": 3, **training}, save={"save_every_n_steps": 3})


@pytest.mark.slow
def test_fused_backward_full_finetune_equals_the_unfused_run(tiny_sd15, demo_dataset, tmp_path):
    plain = train(_full_config(tiny_sd15, demo_dataset, tmp_path / "plain"))
    fused = train(_full_config(tiny_sd15, demo_dataset, tmp_path / "fused", fused_backward_pass=True))
    torch.testing.assert_close(torch.tensor(fused.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    a, b = load_file(str(plain.checkpoints[-1].path)), load_file(str(fused.checkpoints[-1].path))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("section, match", [
    ({"training": {"fused_backward_pass": True, "gradient_accumulation_steps": 2}}, "gradient_accumulation_steps to 1"),
    ({"training": {"fused_backward_pass": True}, "optim": {"optimizer": "lion"}}, "adamw or adafactor"),
    ({"training": {"full_bf16": True}}, "network_type to 'full'"),
    ({"training": {"blocks_to_swap": -1}}, "blocks_to_swap is -1"),
    ({"training": {"blocks_to_swap": 4}, "network": {"network_type": "full"}}, "blocks_to_swap to 0"),
])
def test_unsupported_memory_option_combinations_are_refused_by_name(tiny_sd15, demo_dataset, tmp_path, section,
                                                                     match):
    with pytest.raises(ConfigError, match=match):
        make_config(tiny_sd15, demo_dataset, tmp_path, **section)


def test_run_time_combinations_are_refused_by_name():
    from trainer.memory_options import check_run_memory_options

    cfg = TrainConfig.from_dict({"datasets": [{"path": "x"}], "network": {"network_type": "full"},
                                 "training": {"fused_backward_pass": True, "full_bf16": True}})
    check_run_memory_options(cfg, "bf16", 1)
    with pytest.raises(ConfigError, match="full_bf16 needs bf16"):
        check_run_memory_options(cfg, "no", 1)
    lora = TrainConfig.from_dict({"datasets": [{"path": "x"}], "training": {"fused_backward_pass": True}})
    with pytest.raises(ConfigError, match="fp16's gradient scaler"):
        check_run_memory_options(lora, "fp16", 1)
    with pytest.raises(ConfigError, match="one GPU"):
        check_run_memory_options(lora, "bf16", 2)


# --- full bf16 -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["step", "fused"])
def test_full_bf16_trains_bf16_weights_with_fp32_state_and_resumes_exactly(tiny_sd15, demo_dataset, tmp_path, fused):
    from run_helpers import StopAt
    from trainer.callbacks import Callbacks
    from trainer.loop import Trainer
    from trainer.release import release_run

    cfg = _full_config(tiny_sd15, demo_dataset, tmp_path / "a", mixed_precision="bf16", full_bf16=True,
                       fused_backward_pass=fused)
    trainer = Trainer(cfg, Callbacks())
    try:
        trainer._setup(None)
        unet = trainer.comps.denoiser
        assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}  # trained weights stored in bf16
        assert {p.dtype for p in trainer.comps.text_encoders[0].parameters()} == {torch.bfloat16}  # frozen: compute
        before = {n: p.detach().clone() for n, p in unet.named_parameters()}
        group = trainer._epoch_groups(1)[0]
        trainer._optimizer_step(group, 1, 1)
        changed = sum(not torch.equal(before[n], p) for n, p in unet.named_parameters())
        assert changed > len(before) // 2 and {p.dtype for p in unet.parameters()} == {torch.bfloat16}
        states = list(trainer.optimizer.optimizer.state.values())
        assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    finally:
        release_run(trainer)
    whole = train(cfg)
    resumed_cfg = _full_config(tiny_sd15, demo_dataset, tmp_path / "b", mixed_precision="bf16", full_bf16=True,
                               fused_backward_pass=fused)
    first = train(resumed_cfg, StopAt(1))
    resumed = train(resumed_cfg, resume_from=first.state_dir)
    assert resumed.losses == whole.losses
    a, b = load_file(str(whole.checkpoints[-1].path)), load_file(str(resumed.checkpoints[-1].path))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- AdamW for memory, and the export cast ---------------------------------------------------------------------------

def test_adamw_is_chosen_for_memory_and_optimizer_args_win(tiny_sd15, demo_dataset, tmp_path):
    from trainer.memory_options import adamw_memory_args
    from trainer.optim import build_optimizer

    cuda = types.SimpleNamespace(is_cuda=True, is_floating_point=lambda: True)
    cpu = torch.nn.Parameter(torch.zeros(2))
    assert adamw_memory_args([{"params": [cuda, cuda]}], lean=False) == {"fused": True}
    assert adamw_memory_args([{"params": [cpu]}], lean=True) == {"foreach": False}
    assert adamw_memory_args([{"params": [cpu]}], lean=False) == {}
    cfg = make_config(tiny_sd15, demo_dataset, tmp_path).optim
    assert build_optimizer([{"params": [cpu]}], cfg, memory_lean=True).defaults["foreach"] is False
    told = make_config(tiny_sd15, demo_dataset, tmp_path, optim={"optimizer_args": ["foreach=True"]}).optim
    assert build_optimizer([{"params": [cpu]}], told, memory_lean=True).defaults["foreach"] is True


def test_the_export_cast_happens_on_the_host_one_tensor_at_a_time():
    """Counting what is allocated on the 'device' side while a whole model is cast for saving: nothing. The mover
    stands for the device→host copy; a dispatch mode counts every byte an op allocates from a tensor that is not
    yet on the host. Casting before moving (``v.to(dtype)`` on the device) would count half the fp32 model."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from trainer.checkpoints import host_copies

    model = {f"w{i}": torch.randn(64, 64) for i in range(8)} | {"steps": torch.tensor([3])}
    on_host: set[int] = set()
    state = {"device_bytes": 0, "moving": False, "moved": []}

    class CountDeviceAllocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(a)]
            if not state["moving"] and any(t.data_ptr() not in on_host for t in inputs):
                outs = [o for o in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(o)]
                state["device_bytes"] += sum(o.numel() * o.element_size() for o in outs)
            return out

    def move(tensor):
        state["moving"] = True
        try:
            host = tensor.detach().clone()
        finally:
            state["moving"] = False
        on_host.add(host.data_ptr())
        state["moved"].append(tensor.numel())
        return host

    with CountDeviceAllocations():
        out = host_copies(model, torch.float16, move=move)
    assert state["device_bytes"] == 0 and len(state["moved"]) == len(model)
    assert out["w0"].dtype == torch.float16 and out["steps"].dtype == torch.int64
    torch.testing.assert_close(out["w3"].float(), model["w3"], rtol=1e-3, atol=1e-3)
    state["device_bytes"] = 0
    with CountDeviceAllocations():  # the counter itself sees a cast made before the move
        {k: v.to(torch.float16) for k, v in model.items() if v.is_floating_point()}
    assert state["device_bytes"] == 8 * 64 * 64 * 2


def test_full_checkpoints_are_written_through_the_host_cast(tiny_sd15, demo_dataset, tmp_path, monkeypatch):
    import trainer.checkpoints as checkpoints

    calls = []
    real = checkpoints.host_copies
    monkeypatch.setattr(checkpoints, "host_copies", lambda tensors, dtype, **kw: calls.append(len(tensors)) or
                        real(tensors, dtype, **kw))
    result = train(make_config(tiny_sd15, demo_dataset, tmp_path, network={"network_type": "full"},
                               training={"max_train_steps": 1}, save={"save_every_n_steps": 1}))
    assert calls == [len(load_file(str(result.checkpoints[-1].path)))] and result.checkpoints[-1].kind == "full"


# --- the Step Plan's memory estimate learns of the options -------------------------------------------------------------

def test_the_memory_estimate_counts_full_bf16_fused_backward_and_block_swap():
    from dataclasses import replace

    from trainer.memory import MemoryOptions, _swapped_block_bytes, estimate
    from trainer.full_size import param_counts

    full = MemoryOptions("sd15", network_type="full", precision="bf16", resolution=512)
    plain, lean = estimate(full), estimate(replace(full, full_bf16=True, fused_backward_pass=True))
    n = param_counts("sd15")["unet"]
    gib = 2 ** 30
    assert plain.parts["denoiser weights"] == pytest.approx(n * 4 / gib)
    assert lean.parts["denoiser weights"] == pytest.approx(n * 2 / gib)  # bf16 weights
    assert plain.parts["gradients + optimizer state"] > lean.parts["gradients + optimizer state"] + n * 3.9 / gib
    lora = MemoryOptions("sdxl", precision="bf16", resolution=512)
    blocks = sorted(_swapped_block_bytes("sdxl", 5, 2, False), reverse=True)  # the last 5 UNet blocks, bf16
    assert len(blocks) == 5 and all(b > 0 for b in blocks)
    assert estimate(lora).parts["denoiser weights"] - estimate(replace(lora, blocks_to_swap=5)).parts[
        "denoiser weights"] == pytest.approx(sum(blocks[2:]) / gib)  # two of them are on the device at a time
    assert estimate(replace(lora, blocks_to_swap=2)).parts["denoiser weights"] == estimate(lora).parts["denoiser weights"]


def test_the_fitting_switches_offer_the_memory_options():
    from trainer.memory import fitting_switches

    flux = TrainConfig.from_dict({"model": {"family": "flux"}, "datasets": [{"path": "x", "resolution": 1024}],
                                  "training": {"cache_latents": True, "cache_text_embeddings": True}})
    assert any(s.startswith("blocks_to_swap ") for s in fitting_switches(flux, 12.0))
    sd3 = TrainConfig.from_dict({"model": {"family": "sd3"}, "datasets": [{"path": "x", "resolution": 1024}],
                                 "network": {"network_type": "full"}, "optim": {"optimizer": "adafactor"},
                                 "training": {"mixed_precision": "bf16"}})
    switches = fitting_switches(sd3, 6.0)
    assert "full_bf16 on" in switches and any(s.startswith("fused_backward_pass on") for s in switches)
