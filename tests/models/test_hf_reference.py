"""Sanity tests of the torch/transformers reference helpers in ``hf_reference``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_reference import (
    BOS_ID,
    make_llama_checkpoint,
    make_opt_checkpoint,
    reference_fake_quant,
    reference_quant_params,
    torch_logits,
    torch_perplexity,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama_checkpoint(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return make_opt_checkpoint(tmp_path_factory.mktemp("opt"))


@pytest.fixture(scope="module")
def random_tokens():
    return np.random.default_rng(0).integers(0, 128, size=1100)


def test_llama_checkpoint_loads_with_llama3_rope(llama_dir, tmp_path):
    cfg = json.loads((llama_dir / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "llama3"
    assert cfg["rope_parameters"]["factor"] == 8.0
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == 2
    assert model.config.intermediate_size == 96
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))

    plain_dir = make_llama_checkpoint(
        tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    )
    ids = np.random.default_rng(1).integers(0, 128, size=(1, 100))
    scaled, plain = torch_logits(llama_dir, ids), torch_logits(plain_dir, ids)
    np.testing.assert_allclose(scaled[:, 0], plain[:, 0], atol=1e-5)  # RoPE is identity at pos 0
    assert np.abs(scaled[:, 50:] - plain[:, 50:]).max() > 0.1


def test_sharded_tied_llama_checkpoint(tmp_path):
    path = make_llama_checkpoint(tmp_path, tie_word_embeddings=True, max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((path / s).exists() for s in shards)
    assert "lm_head.weight" not in index["weight_map"]
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("pre_ln", [True, False])
def test_opt_checkpoint_loads(opt_dir, tmp_path, pre_ln):
    path = opt_dir if pre_ln else make_opt_checkpoint(tmp_path, do_layer_norm_before=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    decoder = model.model.decoder
    assert type(model).__name__ == "OPTForCausalLM"
    assert decoder.project_in.weight.shape == (64, 32)
    assert decoder.project_out.weight.shape == (32, 64)
    assert decoder.embed_positions.weight.shape == (258, 64)
    assert (decoder.final_layer_norm is not None) == pre_ln
    bias = decoder.layers[0].self_attn_layer_norm.bias
    assert bias.abs().max() > 0


@pytest.mark.parametrize("make", [make_llama_checkpoint, make_opt_checkpoint])
def test_tokenizer_prepends_bos(tmp_path, make):
    tok = AutoTokenizer.from_pretrained(make(tmp_path))
    text = "Hello, world!\nThe end."
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS_ID and len(ids) == len(text) + 1
    assert max(ids) < 128 and BOS_ID not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_torch_logits_shapes(llama_dir):
    ids = np.random.default_rng(2).integers(0, 128, size=(2, 16))
    batched = torch_logits(llama_dir, ids)
    assert batched.shape == (2, 16, 128) and batched.dtype == np.float32
    np.testing.assert_allclose(torch_logits(llama_dir, ids[1]), batched[1], atol=1e-5)


@pytest.mark.parametrize("fixture", ["llama_dir", "opt_dir"])
def test_perplexity_protocol(request, fixture, random_tokens):
    path = request.getfixturevalue(fixture)
    ppl = torch_perplexity(path, random_tokens, seqlen=100)
    assert 128 / 4 < ppl < 128 * 4
    # first nsamples windows only; remainder dropped; batching irrelevant
    two = torch_perplexity(path, random_tokens, seqlen=100, nsamples=2)
    assert two == pytest.approx(torch_perplexity(path, random_tokens[:250], seqlen=100, batch_size=1))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    windows = torch.from_numpy(random_tokens[:200].reshape(2, 100))
    with torch.no_grad():
        nlls = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    assert two == pytest.approx(float(torch.exp(torch.stack(nlls).mean())), rel=1e-5)


def test_fake_quant_hand_example():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    torch.testing.assert_close(reference_fake_quant(w, 2), torch.tensor([[-1.0, 0.0, 0.0, 2.0]]))
    scale, zero = reference_quant_params(w, 2)
    assert scale.item() == 1.0 and zero.item() == 1.0
    sym = reference_fake_quant(w, 2, sym=True)
    torch.testing.assert_close(sym, torch.tensor([[-4 / 3, 0.0, 0.0, 4 / 3]]))
    # dead (all-zero) groups get range [-1, 1]; in float32 1 / (2/15) = 7.4999995 rounds to 7
    scale, zero = reference_quant_params(torch.zeros(3, 8), 4, group_size=4)
    assert scale.shape == (3, 2) and torch.all(scale == torch.tensor(2 / 15)) and torch.all(zero == 7)
    _, zero = reference_quant_params(torch.zeros(3, 8), 4, group_size=4, sym=True)
    assert torch.all(zero == 8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("sym", [False, True])
def test_fake_quant_properties(bits, group_size, sym):
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[3] = w[3].abs()  # all-positive row
    w[4] = 0.0  # dead row
    wq = reference_fake_quant(w, bits, group_size, sym)
    scale, zero = reference_quant_params(w, bits, group_size, sym)
    n_groups = 1 if group_size == -1 else 96 // group_size
    assert wq.shape == w.shape and wq.dtype == torch.float32
    assert scale.shape == zero.shape == (16, n_groups)

    g = 96 if group_size == -1 else group_size
    groups, s, z = wq.reshape(-1, g), scale.reshape(-1, 1), zero.reshape(-1, 1)
    codes = groups / s + z  # integers in [0, maxq]
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    assert codes.min() > -1e-3 and codes.max() < 2**bits - 1 + 1e-3
    assert max(len(torch.unique(row)) for row in groups) <= 2**bits
    assert torch.all(wq[4] == 0)
    if not sym:  # the symmetric grid [-2^(b-1), 2^(b-1)-1]*scale is not closed under requantization
        torch.testing.assert_close(reference_fake_quant(wq, bits, group_size, sym), wq)
        inside = (w.reshape(-1, g) - groups).abs() <= s / 2 + 1e-6
        assert inside.all()


def test_fake_quant_rejects_bad_group_size():
    with pytest.raises(ValueError):
        reference_fake_quant(torch.randn(4, 96), 4, group_size=64)
