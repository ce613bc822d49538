"""Flax LLaMA/OPT against transformers + torch: logits, perplexity, KV-cache decoding, loading edge cases."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_reference
from qjax.io import assets, text as data
from qjax.evaluation import perplexity
from qjax.core.errors import InputError
from qjax.models.kv_cache import KVCache
from qjax.io.hf import load_model


def _ids(vocab, shape, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def _check_logits(path, rtol=1e-4):
  model, params = load_model(path)
  ids = _ids(model.config.vocab_size, (2, 40))
  ours = np.asarray(jax.jit(model.apply)(params, ids)[0])
  ref = hf_reference.torch_logits(path, ids)
  assert np.max(np.abs(ours - ref)) <= rtol * np.max(np.abs(ref))
  return model, params


def _check_ppl(path, tokens, seqlen, nsamples=None):
  model, params = load_model(path)
  ours = perplexity.perplexity(model, params, tokens, seqlen, nsamples, progress=False).ppl
  ref = hf_reference.torch_perplexity(path, tokens, seqlen, nsamples)
  assert abs(ours / ref - 1) < 1e-4, (ours, ref)
  return ours


def test_llama_gqa_untied_llama3_rope(llama_dir):
  model, _ = _check_logits(llama_dir)
  c = model.config
  assert c.num_kv_heads < c.num_heads and not c.tie_word_embeddings
  assert c.rope_scaling_dict["rope_type"] == "llama3"
  _check_ppl(llama_dir, _ids(c.vocab_size, (2000,), 1), 128)


@pytest.mark.parametrize("chunk_elements", [16 * 128, 1 << 22])
def test_token_nll_in_logit_chunks_equals_torch_cross_entropy(llama_dir, opt_dir, monkeypatch, chunk_elements):
  """Per-token NLL computed a few positions' logits at a time (here 16 of 99: 7 chunks, the last one padded) equals
  torch's cross entropy of the full logits, for LLaMA and OPT (project_out before the head)."""
  import torch
  monkeypatch.setattr(perplexity, "LOGIT_CHUNK_ELEMENTS", chunk_elements)
  for path in (llama_dir, opt_dir):
    model, params = load_model(path)
    ids = _ids(model.config.vocab_size, (2, 100), 3)
    ours = np.asarray(jax.jit(perplexity.token_nll, static_argnums=0)(model, params, ids))
    logits = torch.from_numpy(hf_reference.torch_logits(path, ids[:, :-1]))
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(ids[:, 1:]).long().flatten(),
                                             reduction="none").reshape(2, 99).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)


def test_llama_tied_sharded(tmp_path):
  path = hf_reference.make_llama_checkpoint(tmp_path, tie_word_embeddings=True, max_shard_size="100KB")
  assert (path / "model.safetensors.index.json").is_file()
  _check_logits(path)


@pytest.mark.parametrize("pre_ln", [True, False])
def test_opt_project_in_out(tmp_path, pre_ln):
  path = hf_reference.make_opt_checkpoint(tmp_path, do_layer_norm_before=pre_ln)
  model, params = _check_logits(path)
  assert model.config.word_embed_proj_dim != model.config.hidden_size
  assert "project_in" in params["model"]["decoder"]
  if pre_ln:
    _check_ppl(path, _ids(model.config.vocab_size, (1500,), 2), 100)


def test_stories260k_tinystories_ppl(stories_dir):
  """The real model: 6.37 at seqlen 256 on the first 200 windows, equal to transformers to 1e-4."""
  tok = data.load_tokenizer(stories_dir)
  tokens = data.tokenize(tok, data.read_text(assets.named_text("tinystories", assets.PPL_DATASETS)))
  assert tokens[0] == tok.bos_token_id
  ppl = _check_ppl(stories_dir, tokens, 256, 200)
  assert 6.3 < ppl < 6.45


def test_bfloat16_close_to_float32(llama_dir):
  model, params = load_model(llama_dir)
  m16, p16 = load_model(llama_dir, "bfloat16")
  assert jax.tree_util.tree_leaves(p16)[0].dtype == jnp.bfloat16
  ids = _ids(model.config.vocab_size, (1, 16))
  a, b = model.apply(params, ids)[0], m16.apply(p16, ids)[0]
  assert float(jnp.max(jnp.abs(a - b))) < 0.1 * float(jnp.max(jnp.abs(a)))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_cached_decode_equals_full_forward(family, llama_dir, opt_dir):
  model, params = load_model(llama_dir if family == "llama" else opt_dir)
  ids = _ids(model.config.vocab_size, (2, 12), 3)
  full = np.asarray(model.apply(params, ids)[0])
  step = jax.jit(model.apply)
  cache = KVCache.dense(model.config, batch=2, max_len=16)
  logits, cache = step(params, ids[:, :8], cache=cache)
  outs = [np.asarray(logits)]
  for t in range(8, 12):
    logits, cache = step(params, ids[:, t:t + 1], cache=cache)
    outs.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-4 * np.abs(full).max())
  assert int(cache.length) == 12


def test_left_padding_matches_unpadded(llama_dir):
  model, params = load_model(llama_dir)
  ids = _ids(model.config.vocab_size, (1, 6), 4)
  padded = np.concatenate([np.zeros((1, 3), np.int32), ids], axis=1)
  mask = np.concatenate([np.zeros((1, 3), np.int32), np.ones((1, 6), np.int32)], axis=1)
  a = np.asarray(model.apply(params, ids)[0])
  b = np.asarray(model.apply(params, padded, attention_mask=mask)[0])[:, 3:]
  np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max())


def test_bad_checkpoints(tmp_path, llama_dir):
  with pytest.raises(InputError, match="does not exist"):
    load_model(tmp_path / "nope")
  bad = tmp_path / "bad"
  shutil.copytree(llama_dir, bad)
  cfg = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
  with pytest.raises(InputError, match="llama, mistral, opt"):
    load_model(bad)
  (bad / "config.json").write_text(json.dumps(cfg))
  tensors = load_file(bad / "model.safetensors")
  key = next(k for k in tensors if "q_proj" in k)
  tensors[key][0, 0] = np.inf
  save_file(tensors, bad / "model.safetensors")
  with pytest.raises(InputError, match=f"{key}.*NaN or Inf"):
    load_model(bad)
  del tensors[key]
  save_file(tensors, bad / "model.safetensors")
  with pytest.raises(InputError, match="missing"):
    load_model(bad)


@pytest.mark.parametrize("fixture", ["llama_dir", "opt_dir"])
def test_linears_reading_one_input_share_their_statistics(request, fixture):
  """q/k/v (and LLaMA's gate/up) read one input: collect_stats accumulates it once and hands each the same
  arrays, equal to what a linear collected on its own gets (independent: x^T x of the captured input)."""
  from qjax.core import tree
  from qjax.models import capture
  model, params = load_model(request.getfixturevalue(fixture))
  fam = model.family
  layer = tree.subtree(tree.flatten(params), fam.layer_path(0))
  names = tuple(fam.linear_path(r) for r, _ in fam.linears)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 16)), jnp.int32)
  x = capture.embed_windows(model, params, ids)
  stats = capture.collect_stats(model, layer, x, names, ("hessian", "absmax"))
  want = {fam.linear_path(r): fam.linear_path(group[0]) for group in fam.sequential for r in group}
  assert capture.shared_inputs(model, layer, x[0], names) == want
  qkv = tuple(fam.linear_path(r) for r in fam.sequential[0])
  dots = lambda ns: str(jax.make_jaxpr(lambda x: capture.collect_stats(model, layer, x, ns))(x)).count("dot_general")
  assert dots(qkv) == dots(qkv[:1]) < dots((qkv[0], fam.linear_path(fam.sequential[1][0])))  # one x^T x for q/k/v
  for n in names:
    alone = capture.collect_stats(model, layer, x, (n,), ("hessian",))[n]["hessian"]
    np.testing.assert_array_equal(np.asarray(stats[n]["hessian"]), np.asarray(alone))
    inputs = [capture.capture_linears(model, layer, xi, (n,))[n] for xi in x]
    want = sum(np.asarray(a, np.float64).T @ np.asarray(a, np.float64) for a in inputs) * 2 / len(inputs)
    np.testing.assert_allclose(np.asarray(stats[n]["hessian"]), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
