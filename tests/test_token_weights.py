"""Weighted captions reach the text encoder: (tag:1.2) scales that tag's token embeddings."""
from __future__ import annotations

import pytest
import torch

from trainer.captions import process_caption
from trainer.config import CaptionConfig, ModelConfig
from trainer.families import get_family
from trainer.families.token_weights import apply_token_weights, token_weights


@pytest.fixture(scope="module")
def comps(tiny_sd15):
    return get_family("sd15").load(ModelConfig(path=str(tiny_sd15)))


def pieces(raw: str):
    cap = process_caption(raw, CaptionConfig(weighted_captions=True), seed=0, epoch=1, item=0)
    return cap.text, cap.weights


def test_weights_line_up_with_tokens(comps):
    tok = comps.tokenizers[0]
    text, w = pieces("a cat, (red hat:1.5), blue sky")
    weights = token_weights(tok, [w], 75)
    assert weights.shape == (1, 77)
    n_a_cat = len(tok("a cat, ", add_special_tokens=False).input_ids)
    n_hat = len(tok("red hat", add_special_tokens=False).input_ids)
    row = weights[0].tolist()
    assert row[0] == 1.0  # BOS
    assert row[1:1 + n_a_cat] == [1.0] * n_a_cat
    assert row[1 + n_a_cat:1 + n_a_cat + n_hat] == [1.5] * n_hat
    assert row[-1] == 1.0 and 1.5 not in row[1 + n_a_cat + n_hat:]


def test_uniform_weights_change_nothing_and_weights_keep_the_mean(comps):
    fam = get_family("sd15")
    text, w = pieces("a cat, red hat, blue sky")
    plain = fam.encode_text(comps, [text])["encoder_hidden_states"]
    same = fam.encode_text(comps, [text], weights=[w])["encoder_hidden_states"]
    assert torch.allclose(plain, same, atol=1e-6)
    text2, w2 = pieces("a cat, (red hat:1.8), blue sky")
    assert text2 == text
    weighted = fam.encode_text(comps, [text2], weights=[w2])["encoder_hidden_states"]
    assert not torch.allclose(weighted, plain, atol=1e-4)
    n_a_cat = len(comps.tokenizers[0]("a cat, ", add_special_tokens=False).input_ids)
    ratio = weighted[0, 1 + n_a_cat] / plain[0, 1 + n_a_cat]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)  # the weighted tag's rows are scaled together
    assert torch.allclose(weighted[0, 1], plain[0, 1] * ratio[0] / 1.8, rtol=1e-4)  # unweighted rows: mean rescale only


def test_apply_scales_rows():
    hidden = torch.ones(1, 4, 2)
    out = apply_token_weights(hidden, torch.tensor([[1.0, 2.0, 1.0, 1.0]]))
    assert out[0, 1, 0] / out[0, 0, 0] == pytest.approx(2.0)
    assert out.mean().item() == pytest.approx(1.0)  # the caption keeps its mean
    centred = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])  # mean 0: nothing to keep, plain scaling
    assert torch.equal(apply_token_weights(centred, torch.tensor([[1.0, 3.0]])), centred * torch.tensor([1.0, 3.0]).view(1, 2, 1))
