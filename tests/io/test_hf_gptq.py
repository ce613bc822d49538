"""HF GPTQ export / import: the layout against an independent decoder of the format, model round trips."""
import hashlib
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from qjax.io import checkpoint, hf_gptq
from qjax.evaluation import perplexity
from qjax.core import tree
from qjax.core.errors import InputError
from qjax.methods.weights import rtn
from qjax.models.families import DECODER_LINEARS, hf_to_path
from qjax.core.formats.qarray import QArray
from qjax.io.hf import load_model

PARTS = ("qweight", "qzeros", "scales", "g_idx")


# ---------------------------------------------------------------- independent reference decoder (no qjax.core.packing)

def ref_codes(words, bits, n):
  """Codes ``[..., n]`` from int32 ``words [..., R]`` read as the format describes: each row of words is one
  little-endian bit stream (bit t of word r is stream bit 32*r + t) and code j is stream bits [bits*j, bits*j+bits)."""
  w = np.asarray(words).astype(np.int64) & 0xFFFFFFFF
  stream = np.stack([(w[..., r] >> t) & 1 for r in range(w.shape[-1]) for t in range(32)], axis=-1)
  codes = np.zeros(w.shape[:-1] + (n,), np.int64)
  for j in range(n):
    for t in range(bits):
      codes[..., j] |= stream[..., bits * j + t] << t
  return codes


def ref_weight(t, bits):
  """``w [in, out]`` float32 = scales[g_idx[i], o] * (q[i, o] - (z[g_idx[i], o] + 1))."""
  n, out = t["g_idx"].shape[0], t["scales"].shape[1]
  q = ref_codes(t["qweight"].T, bits, n).T          # qweight is packed along the input (row) axis
  z = ref_codes(t["qzeros"], bits, out)             # qzeros along the output (column) axis
  gi = t["g_idx"]
  return t["scales"].astype(np.float32)[gi] * (q - (z[gi] + 1)).astype(np.float32)


def rtn_qarray(w, bits, group_size, sym, perm=None):
  """RTN QArray of ``w [out, in]`` with float16 scales; with ``perm``, groups are formed in that column order."""
  kw = dict(bits=bits, group_size=group_size, sym=sym, scale_dtype="float16")
  if perm is None:
    return rtn.quantize_weight(w, **kw)
  qp = rtn.quantize_weight(w[:, perm], **kw)
  return QArray.from_codes(qp.unpacked_codes(), qp.scale, qp.zero, perm=perm, dtype=w.dtype, **kw)


def half(x):
  """A dense leaf as the export writes it: rounded to float16 (then back to its own dtype, as the loader casts)."""
  return jnp.asarray(x).astype(jnp.float16).astype(jnp.asarray(x).dtype)


def half_dense(params):
  """``params`` with every dense leaf rounded through float16 (QArrays kept)."""
  flat = tree.flatten(params)
  return tree.unflatten({p: v if isinstance(v, QArray) else half(v) for p, v in flat.items()})


def assert_same(a, b):
  """Identical leaves (dtype and value); QArrays compared by their dequantized matrix and static fields."""
  if isinstance(a, QArray):
    assert isinstance(b, QArray) and (a.shape, a.bits, a.group_size, a.sym) == (b.shape, b.bits, b.group_size, b.sym)
    assert b.scale.dtype == jnp.float16
    a, b = a.dequantize(), b.dequantize()
  assert a.dtype == b.dtype
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------ (a) format, per matrix

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_matches_independent_decoder(bits):
  rng = np.random.default_rng(bits)
  out, n = 64, 64  # the shape of the models' q/o projections: compiled programs are shared
  w = jnp.asarray(rng.normal(size=(out, n)), jnp.float32)
  for group_size in (32, -1):
    g = n if group_size == -1 else group_size
    for sym in (False, True):
      for perm in (None, rng.permutation(n)):
        qa = rtn_qarray(w, bits, group_size, sym, perm)
        case = f"bits={bits} g={group_size} sym={sym} perm={perm is not None}"
        assert hf_gptq.unsupported_reason("model/layers_0/mlp/down_proj/weight", qa, bits=bits, group_size=group_size,
                                          sym=sym, desc_act=True) is None, case
        t = hf_gptq.gptq_tensors(qa)
        assert {k: (v.dtype.name, v.shape) for k, v in t.items()} == {
            "qweight": ("int32", (n * bits // 32, out)), "qzeros": ("int32", (n // g, out * bits // 32)),
            "scales": ("float16", (n // g, out)), "g_idx": ("int32", (n,))}, case
        if perm is None:
          np.testing.assert_array_equal(t["g_idx"], np.arange(n) // g)
        else:
          np.testing.assert_array_equal(t["g_idx"][perm], np.arange(n) // g)
        if sym:
          assert np.all(ref_codes(t["qzeros"], bits, out) == 2 ** (bits - 1) - 1), case
        np.testing.assert_array_equal(ref_weight(t, bits), np.asarray(qa.dequantize()).T, err_msg=case)
        back = hf_gptq.from_gptq_tensors(t, (out, n), bits=bits, group_size=group_size, sym=sym, dtype="float32")
        assert (back.sym, back.perm is None) == (sym, perm is None or g == n), case
        np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(qa.dequantize()), err_msg=case)


def test_unrepresentable_qarrays_are_named():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(64, 96)), jnp.float32)
  path = "model/layers_0/mlp/down_proj/weight"
  why = lambda qa, p=path, **kw: hf_gptq.unsupported_reason(
      p, qa, **{"bits": 4, "group_size": 32, "sym": False, "desc_act": False, **kw})
  q4 = rtn_qarray(w, 4, 32, False)
  assert why(q4) is None
  assert "bits=3" in why(q4, bits=3)
  assert "group_size=-1" in why(q4, group_size=-1)
  assert "sym=True" in why(q4, sym=True)
  assert "decoder" in why(q4, "lm_head/weight")
  assert "not a multiple of 32" in why(rtn_qarray(w[:, :80], 4, 16, False), group_size=16)
  assert "multiple of the group size 64" in why(rtn_qarray(w, 4, 64, False), group_size=64)
  assert "output width 60" in why(rtn_qarray(w[:60], 4, 32, False))
  assert "act-order" in why(rtn_qarray(w, 4, 32, False, rng.permutation(96)))
  assert why(rtn_qarray(w, 4, -1, False, rng.permutation(96)), group_size=-1) is None  # one group: order is free
  assert "zero point outside 1..16" in why(rtn_qarray(jnp.abs(w), 4, 32, False))  # all-positive groups: zero 0


def test_import_rejects_unequal_groups():
  qa = rtn_qarray(jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32), 4, 32, True)
  t = hf_gptq.gptq_tensors(qa)
  t["g_idx"] = t["g_idx"].copy()
  t["g_idx"][0] = 1  # group 1 gets 33 rows
  with pytest.raises(InputError, match=r"blk\.g_idx .*exactly 32"):
    hf_gptq.from_gptq_tensors(t, (64, 64), bits=4, group_size=32, sym=True, dtype="float32", module="blk")
  with pytest.raises(InputError, match=r"blk\.qweight has shape"):
    hf_gptq.from_gptq_tensors(t, (64, 64), bits=3, group_size=32, sym=True, dtype="float32", module="blk")


# -------------------------------------------------------------------------------------- (b) model round trips

def act_order(params, bits, group_size, sym, targets, seed=0):
  """Every weight matching ``targets`` as an act-order QArray (random column order per matrix)."""
  rng = np.random.default_rng(seed)
  fn = lambda p, w: rtn_qarray(w, bits, group_size, sym, rng.permutation(w.shape[1]))
  return tree.replace(params, tree.matching(params, targets), fn)


def read_safetensors(path):
  with safe_open(str(path), framework="numpy") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def check_exclusion_rules(dest, summary):
  """``dynamic`` negative rules (``re.match``, as GPTQModel and vLLM apply them) and ``modules_in_block_to_quantize``
  (optimum's ``endswith`` and vLLM's substring test) select exactly the summary's excluded / quantized modules."""
  qc = json.loads((dest / "config.json").read_text())["quantization_config"]
  assert list(qc["dynamic"]) == [f"-:^{re.escape(m)}$" for m in summary["excluded"]]
  assert all(v == {} for v in qc["dynamic"].values())
  assert qc["modules_in_block_to_quantize"] == [summary["quantized"]]
  listed = summary["quantized"]
  for m in summary["quantized"] + summary["excluded"]:
    assert any(re.match(k[2:], m) for k in qc["dynamic"]) == (m in summary["excluded"])
    assert any(m.endswith(x) for x in listed) == any(x in m for x in listed) == (m in summary["quantized"])


LLAMA_CASES = {  # name: (bits, group_size, sym, act-order, extra targets, excluded roles); other bit widths: (a)
    "w4g32": (4, 32, False, False, (), ()),
    # in 96 of down_proj is not a multiple of 64; the quantized lm_head is outside the decoder blocks
    "w4g64-sym-actorder-lm_head": (4, 64, True, True, ("lm_head/weight",), ("mlp.down_proj",)),
}


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_round_trip(tmp_path, llama_dir, case):
  bits, group_size, sym, permuted, extra, excluded_roles = LLAMA_CASES[case]
  model, params = load_model(llama_dir)
  targets = DECODER_LINEARS + extra
  if permuted:
    q = act_order(params, bits, group_size, sym, targets)
  else:
    q, _ = rtn.quantize(params, rtn.RTNConfig(bits=bits, group_size=group_size, sym=sym, targets=targets),
                        progress=False)
  summary = hf_gptq.export_gptq(tmp_path / "gptq", q, source_dir=llama_dir, bits=bits, group_size=group_size,
                                sym=sym, desc_act=permuted)
  layers = range(model.config.num_layers)
  want_excluded = sorted([f"model.layers.{i}.{r}" for i in layers for r in excluded_roles]
                         + (["lm_head"] if extra else []))
  assert summary["excluded"] == want_excluded
  assert len(summary["quantized"]) == 7 * len(layers) - len(excluded_roles) * len(layers)
  if excluded_roles:
    assert summary["reasons"]["model.layers.0.mlp.down_proj"] == "input width 96 is not a multiple of the group size 64"
    assert summary["reasons"]["lm_head"].startswith("not a decoder-layer linear")
    check_exclusion_rules(tmp_path / "gptq", summary)
  assert hf_gptq.is_gptq_checkpoint(tmp_path / "gptq") and not hf_gptq.is_gptq_checkpoint(llama_dir)

  model2, back = load_model(tmp_path / "gptq")
  excluded = {hf_to_path(f"{m}.weight") for m in summary["excluded"]}
  # What the export holds: dense tensors (and the excluded linears, dequantized) in float16.
  q = half_dense(tree.replace(q, sorted(excluded), lambda p, w: w.dequantize()))
  fq, fb = tree.flatten(q), tree.flatten(back)
  assert fq.keys() == fb.keys()
  for p in fq:
    if p in excluded:
      assert not isinstance(fb[p], QArray)
    assert_same(fq[p], fb[p])
  # eager: each weight is materialized by the same ops, so logits are bit-identical (under jit, XLA may fuse a
  # QArray's dequantization into the matmul differently than a dense weight's and differ in the last ulp)
  ids = np.arange(24, dtype=np.int32).reshape(2, 12) % model.config.vocab_size
  np.testing.assert_array_equal(np.asarray(model.apply(q, ids)[0]), np.asarray(model2.apply(back, ids)[0]))


def test_stories_round_trip_excludes_ffn(tmp_path, stories_dir):
  model, params = load_model(stories_dir)
  q = rtn.quantize(params, rtn.RTNConfig(bits=4, group_size=32), progress=False)[0]
  summary = hf_gptq.export_gptq(tmp_path / "gptq", q, source_dir=stories_dir, bits=4, group_size=32, sym=False,
                                desc_act=False)
  layers = range(model.config.num_layers)
  ffn = [f"model.layers.{i}.mlp.{r}" for i in layers for r in ("down_proj", "gate_proj", "up_proj")]
  attn = [f"model.layers.{i}.self_attn.{r}" for i in layers for r in ("k_proj", "o_proj", "q_proj", "v_proj")]
  assert summary["excluded"] == sorted(ffn) and summary["quantized"] == sorted(attn)
  assert summary["reasons"]["model.layers.0.mlp.down_proj"] == "input width 172 is not a multiple of 32"
  assert summary["reasons"]["model.layers.0.mlp.up_proj"] == "output width 172 * 4 bits is not a multiple of 32"
  tensors = read_safetensors(tmp_path / "gptq" / "model.safetensors")
  assert "lm_head.weight" not in tensors  # tied to the embeddings
  assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == np.float16  # the checkpoint's half precision
  check_exclusion_rules(tmp_path / "gptq", summary)

  model2, back = load_model(tmp_path / "gptq")
  assert model2 == model
  # the in-memory model with its excluded QArrays replaced by their dequantized matrices: the same forward pass
  # (qmatmul dequantizes, then matmuls) and the same tree structure as ``back``, so one compiled program scores both
  ref = half_dense(tree.replace(q, [hf_to_path(f"{m}.weight") for m in summary["excluded"]],
                               lambda p, w: w.dequantize()))
  fr, fb = tree.flatten(ref), tree.flatten(back)
  assert fr.keys() == fb.keys()
  for p in fr:
    assert_same(fr[p], fb[p])
  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 4 * 64)
  a, b = (perplexity.perplexity(model, p, tokens, seqlen=64, progress=False) for p in (ref, back))
  np.testing.assert_array_equal(a.nll, b.nll)  # per-window NLL: identical logits, identical perplexity
  assert a.ppl == b.ppl and np.isfinite(a.ppl)


# ----------------------------------------------------------------------------- (c) the folder follows the layout

def test_folder_layout(tmp_path, opt_dir):
  """Config, names, dtypes and shapes exactly as HF GPTQ loaders expect (OPT: biases kept, tied lm_head absent)."""
  model, params = load_model(opt_dir)
  q = rtn.quantize(params, rtn.RTNConfig(bits=4, group_size=32, sym=True), progress=False)[0]
  hf_gptq.export_gptq(tmp_path / "gptq", q, source_dir=opt_dir, bits=4, group_size=32, sym=True, desc_act=False,
                      extra_config={"damp_percent": 0.1})
  out = tmp_path / "gptq"
  source_cfg = json.loads((opt_dir / "config.json").read_text())
  cfg = json.loads((out / "config.json").read_text())
  qc = cfg.pop("quantization_config")
  assert cfg == source_cfg
  assert qc == {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
                "checkpoint_format": "gptq", "lm_head": False, "true_sequential": True, "damp_percent": 0.1,
                "static_groups": False, "meta": {"quantizer": [qc["meta"]["quantizer"][0]]}}
  assert qc["meta"]["quantizer"][0].startswith("qjax:")
  assert json.loads((out / "quantize_config.json").read_text()) == qc
  for name in checkpoint.TOKENIZER_FILES:
    if (opt_dir / name).is_file():
      assert (out / name).read_bytes() == (opt_dir / name).read_bytes()

  src, dst = read_safetensors(next(opt_dir.glob("*.safetensors"))), read_safetensors(out / "model.safetensors")
  pattern = r".*layers\.\d+\.(self_attn\.\w+_proj|fc1|fc2)\.weight"
  linears = {k.removesuffix(".weight") for k in src if re.fullmatch(pattern, k)}
  assert len(linears) == 6 * model.config.num_layers
  assert "lm_head.weight" not in src and "lm_head.weight" not in dst
  assert set(dst) == (set(src) - {f"{m}.weight" for m in linears}) | {f"{m}.{k}" for m in linears for k in PARTS}
  for k, v in src.items():
    if k.removesuffix(".weight") not in linears:
      assert dst[k].dtype == np.float16 and dst[k].shape == v.shape  # dense tensors in half precision
      np.testing.assert_array_equal(dst[k], v.astype(np.float16))
  for m in linears:
    out_f, in_f = src[f"{m}.weight"].shape
    assert {k: (dst[f"{m}.{k}"].dtype.name, dst[f"{m}.{k}"].shape) for k in PARTS} == {
        "qweight": ("int32", (in_f // 8, out_f)), "qzeros": ("int32", (in_f // 32, out_f // 8)),
        "scales": ("float16", (in_f // 32, out_f)), "g_idx": ("int32", (in_f,))}
    np.testing.assert_array_equal(dst[f"{m}.g_idx"], np.arange(in_f) // 32)
    assert np.all(ref_codes(dst[f"{m}.qzeros"], 4, out_f) == 7)  # symmetric: 2**(4-1) - 1
    want = np.asarray(tree.flatten(q)[hf_to_path(f"{m}.weight")].dequantize()).T
    np.testing.assert_array_equal(ref_weight({k: dst[f"{m}.{k}"] for k in PARTS}, 4), want)
  _, back = load_model(out)
  fq, fb = tree.flatten(half_dense(q)), tree.flatten(back)
  assert fq.keys() == fb.keys()
  for p in fq:
    assert_same(fq[p], fb[p])


def test_summary_lines_count_reasons_and_warn_when_not_smaller():
  export = {"path": "out", "quantized": ["a"], "excluded": ["b", "c"], "dense_dtype": "float16",
            "reasons": {"b": "input width 576 is not a multiple of the group size 128", "c": "input width 576 is not "
                        "a multiple of the group size 128"}, "fitting_group_sizes": [32, 64], "bytes": 10,
            "fp16_bytes": 12}
  line, = hf_gptq.summary_lines(export)
  assert line == ("HF GPTQ export: out: 1 of 3 linears quantized, 2 kept dense in float16 (input width 576 is not a "
                  "multiple of the group size 128: 2); group sizes that fit every input width: 32, 64 (or -1, per "
                  "channel)")
  warn = hf_gptq.summary_lines({**export, "bytes": 12})[1]
  assert warn.startswith("warning: the export") and "not smaller than the fp16 model" in warn
  assert hf_gptq.fitting_group_sizes({576, 1536}) == [16, 32, 48, 64, 96, 192]
  assert hf_gptq.fitting_group_sizes({64, 172}) == []


# ------------------------------------------------------------------- (d) sources untouched, atomic, no clobbering

def digest(folder):
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_atomic_and_safe(tmp_path, llama_dir, monkeypatch):
  _, params = load_model(llama_dir)
  q = rtn.quantize(params, rtn.RTNConfig(bits=4, group_size=32), progress=False)[0]
  kw = dict(source_dir=llama_dir, bits=4, group_size=32, sym=False, desc_act=False)
  before = digest(llama_dir)
  dest = tmp_path / "gptq"

  def boom(*a, **k):
    raise RuntimeError("disk full")
  with monkeypatch.context() as m:
    m.setattr(hf_gptq, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
      hf_gptq.export_gptq(dest, q, **kw)
  assert list(tmp_path.iterdir()) == []  # no partial folder, no temporary left behind

  hf_gptq.export_gptq(dest, q, **kw)
  first = digest(dest)
  with pytest.raises(InputError, match="already exists"):
    hf_gptq.export_gptq(dest, q, **kw)
  with pytest.raises(InputError, match="source model folder"):
    hf_gptq.export_gptq(llama_dir, q, overwrite=True, **kw)
  with pytest.raises(InputError, match="no weight can be written"):
    hf_gptq.export_gptq(tmp_path / "dense", params, **kw)
  with pytest.raises(ValueError, match="bits"):
    hf_gptq.export_gptq(tmp_path / "x", q, extra_config={"bits": 3}, **kw)
  hf_gptq.export_gptq(dest, q, overwrite=True, **kw)
  assert digest(dest) == first
  assert [p.name for p in tmp_path.iterdir()] == ["gptq"]
  assert digest(llama_dir) == before


def test_load_rejects_corrupt_checkpoints(tmp_path, llama_dir):
  _, params = load_model(llama_dir)
  q = rtn.quantize(params, rtn.RTNConfig(bits=4, group_size=32), progress=False)[0]
  dest = tmp_path / "gptq"
  hf_gptq.export_gptq(dest, q, source_dir=llama_dir, bits=4, group_size=32, sym=False, desc_act=True)
  good = read_safetensors(dest / "model.safetensors")
  name = "model.layers.1.mlp.up_proj"

  def load_with(**changes):
    t = {**good, **changes}
    save_file({k: v for k, v in t.items() if v is not None}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    load_model(dest)

  g_idx = good[f"{name}.g_idx"].copy()
  g_idx[:2] = g_idx[:2][::-1] + 1  # two rows moved into other groups: unequal group sizes
  with pytest.raises(InputError, match=rf"{re.escape(name)}\.g_idx does not put exactly 32"):
    load_with(**{f"{name}.g_idx": g_idx})
  with pytest.raises(InputError, match=rf"lacks {re.escape(name)}\.qzeros"):
    load_with(**{f"{name}.qzeros": None})
  scales = good[f"{name}.scales"].copy()
  scales[0, 0] = np.nan
  with pytest.raises(InputError, match=rf"{re.escape(name)}\.scales contains NaN"):
    load_with(**{f"{name}.scales": scales})


def test_mixed_precision_exports_whole_with_dynamic_overrides(tmp_path, llama_dir):
  """A mixed recipe (W3 g32 MLPs, W4 per-channel attention, symmetric W8 lm_head) exports every decoder linear:
  the base config is the majority's, the others get one ``+:`` dynamic rule each, and the import reads each
  module with its own settings back to the same weights (an independent decoder of the tensors checks them)."""
  from qjax import api
  model, params = load_model(llama_dir)
  recipe = api.Recipe(weights=(
      api.Rule(r"model/layers_\d+/mlp/.*/weight", rtn.RTNConfig(bits=3, group_size=32)),
      api.Rule(r"model/layers_\d+/self_attn/.*/weight", rtn.RTNConfig(bits=4)),
      api.Rule(r"lm_head/weight", rtn.RTNConfig(bits=8, sym=True))))
  q = api.quantize_model(model, params, recipe).params
  summary = hf_gptq.export_gptq(tmp_path / "gptq", q, source_dir=llama_dir)
  layers = model.config.num_layers
  assert len(summary["quantized"]) == 7 * layers and summary["excluded"] == ["lm_head"]
  qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
  mlp_size, attn_size = (sum(tree.flatten(q)[p].size for p in tree.matching(q, (pat,)))
                         for pat in (r"model/layers_\d+/mlp/.*/weight", r"model/layers_\d+/self_attn/.*/weight"))
  base, other = ((3, 32), (4, -1)) if mlp_size >= attn_size else ((4, -1), (3, 32))
  assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (*base, False, False)
  plus = {k: v for k, v in qc["dynamic"].items() if k.startswith("+:")}
  assert len(plus) == len(summary["overrides"]) and plus
  assert all((v["bits"], v["group_size"]) == other for v in plus.values())
  assert "by per-module dynamic rules" in hf_gptq.summary_lines(summary)[0]
  tensors = read_safetensors(tmp_path / "gptq" / "model.safetensors")
  for module in summary["quantized"]:
    path = hf_to_path(f"{module}.weight")
    want = tree.flatten(q)[path]
    t = {k: tensors[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    np.testing.assert_array_equal(ref_weight(t, want.bits), np.asarray(want.dequantize(), np.float32).T)
  _, back = load_model(tmp_path / "gptq")
  fb = tree.flatten(back)
  for module in summary["quantized"]:
    path = hf_to_path(f"{module}.weight")
    assert isinstance(fb[path], QArray) and fb[path].bits == tree.flatten(q)[path].bits
    assert_same(tree.flatten(q)[path], fb[path])
