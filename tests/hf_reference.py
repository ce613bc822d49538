"""Independent numerical references built only on torch + transformers.

Nothing here imports ``qjax``: these helpers produce tiny random Hugging Face
checkpoints and the reference numbers (logits, perplexity, GPTQ-style fake
quantization) that the JAX implementation is tested against.

All checkpoints are float32, deterministic (``torch.manual_seed(0)``) and
come with a character-level tokenizer so ``AutoTokenizer.from_pretrained``
works offline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
BOS_ID, EOS_ID, UNK_ID, PAD_ID = 0, 1, 2, 3

LLAMA3_ROPE_PARAMETERS = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
"""llama3 RoPE scaling in the transformers 5.x ``rope_parameters`` format.

With head_dim 16 and theta 1e4 the 8 rotary wavelengths 2*pi*1e4**(i/8)
(6.3, 19.9, 62.8, 199, ...) hit all three llama3 regimes: 1 kept (< 16),
2 smoothed (16..64), 5 divided by the factor 8 (> 64).
"""


def _char_vocab() -> dict[str, int]:
    """Token -> id map: 4 specials, ``\\n``, ``\\t`` and printable ASCII (101 ids)."""
    tokens = [BOS, EOS, UNK, PAD, "\n", "\t"] + [chr(c) for c in range(32, 127)]
    return {tok: i for i, tok in enumerate(tokens)}


def save_char_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Write a deterministic character-level fast tokenizer into ``out_dir``.

    Every character is one token (ids < 101; anything outside printable ASCII,
    ``\\n`` and ``\\t`` maps to ``<unk>`` = 2). ``tokenizer(text)`` prepends
    ``<s>`` (id 0) via a TemplateProcessing post-processor; no EOS is appended.
    ``decode`` concatenates characters without separators.
    """
    vocab = _char_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD
    )
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def _perturb_norms(model: torch.nn.Module, norm_types: tuple[type, ...]) -> None:
    """In place: norm weights <- 1 + 0.1*randn; biases (if any) <- 0.1*randn."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norm_types):
                module.weight.copy_(1.0 + 0.1 * torch.randn_like(module.weight))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * torch.randn_like(module.bias))


def _save(model: torch.nn.Module, out_dir: Path, max_shard_size: int | str | None) -> Path:
    """save_pretrained as safetensors (sharded + index json iff max_shard_size) plus tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    save_char_tokenizer(out_dir)
    return out_dir


def make_llama_checkpoint(out_dir: str | Path, **overrides) -> Path:
    """Build, save and return the path of a tiny random fp32 ``LlamaForCausalLM``.

    Defaults: vocab 128, hidden 64, intermediate 96, 2 layers, 4 heads / 2 KV
    heads (GQA, head_dim 16), max_position_embeddings 256, untied embeddings,
    RMSNorm eps 1e-6, initializer_range 0.1 (larger than HF's 0.02 so attention
    is far from uniform), llama3 RoPE scaling (see ``LLAMA3_ROPE_PARAMETERS``).
    RMSNorm weights are perturbed to 1 + 0.1*randn.

    ``overrides`` are passed to ``LlamaConfig`` (e.g. ``tie_word_embeddings``,
    ``num_hidden_layers``, ``hidden_size``, ``intermediate_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``rope_parameters``),
    except ``max_shard_size`` which goes to ``save_pretrained`` and yields a
    sharded checkpoint with ``model.safetensors.index.json``.
    """
    max_shard_size = overrides.pop("max_shard_size", None)
    cfg = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_parameters=dict(LLAMA3_ROPE_PARAMETERS),
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float()
    _perturb_norms(model, (LlamaRMSNorm,))
    return _save(model, Path(out_dir), max_shard_size)


def make_opt_checkpoint(out_dir: str | Path, **overrides) -> Path:
    """Build, save and return the path of a tiny random fp32 ``OPTForCausalLM``.

    Defaults: vocab 128, hidden 64, word_embed_proj_dim 32 (so ``project_in``
    [64, 32] and ``project_out`` [32, 64] exist and ``embed_tokens`` /
    ``lm_head`` are [128, 32]), ffn_dim 96, 2 layers, 4 heads,
    max_position_embeddings 256 (the learned position table has 258 rows:
    position p uses row p + 2), pre-LN (``do_layer_norm_before=True``),
    ReLU, tied word embeddings (as in real OPT), init_std 0.1. LayerNorm
    weights are perturbed to 1 + 0.1*randn and biases to 0.1*randn.

    ``overrides`` go to ``OPTConfig`` (e.g. ``do_layer_norm_before=False`` for
    post-LN like OPT-350m, which also has no decoder ``final_layer_norm``),
    except ``max_shard_size`` which goes to ``save_pretrained``.
    """
    max_shard_size = overrides.pop("max_shard_size", None)
    cfg = dict(
        vocab_size=128,
        hidden_size=64,
        word_embed_proj_dim=32,
        ffn_dim=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        do_layer_norm_before=True,
        init_std=0.1,
        dropout=0.0,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**cfg)).float()
    _perturb_norms(model, (torch.nn.LayerNorm,))
    return _save(model, Path(out_dir), max_shard_size)


def load_torch_model(model_dir: str | Path) -> torch.nn.Module:
    """Load a checkpoint as an fp32, eager-attention, eval-mode torch model."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@torch.no_grad()
def torch_logits(model_dir: str | Path, input_ids: np.ndarray) -> np.ndarray:
    """Reference logits for ``input_ids``.

    Args:
        model_dir: a Hugging Face checkpoint directory.
        input_ids: integer array [batch, seq] (or [seq]); no padding/mask.

    Returns:
        float32 array [batch, seq, vocab] (or [seq, vocab] for 1-D input).
    """
    ids = np.asarray(input_ids)
    model = load_torch_model(model_dir)
    batch = torch.from_numpy(np.atleast_2d(ids).astype(np.int64))
    logits = model(input_ids=batch).logits.float().numpy()
    return logits.reshape(ids.shape + logits.shape[-1:])


@torch.no_grad()
def torch_perplexity(
    model_dir: str | Path,
    token_ids: np.ndarray,
    seqlen: int,
    nsamples: int | None = None,
    batch_size: int = 8,
) -> float:
    """Reference perplexity over non-overlapping windows.

    ``token_ids`` (1-D ints) is cut into ``len // seqlen`` windows of
    ``seqlen`` tokens (remainder dropped; only the first ``nsamples`` windows
    if given). Each window's NLL is the mean cross-entropy of predicting
    tokens 1..seqlen-1 from their prefixes; the result is
    ``exp(mean over windows of window NLL)``. Windows are evaluated in batches
    of ``batch_size`` (which does not change the result).
    """
    torch.set_num_threads(1)
    ids = np.asarray(token_ids).reshape(-1)
    n_windows = ids.size // seqlen
    if nsamples is not None:
        n_windows = min(n_windows, nsamples)
    if n_windows == 0:
        raise ValueError(f"need at least {seqlen} tokens, got {ids.size}")
    windows = torch.from_numpy(ids[: n_windows * seqlen].astype(np.int64).reshape(n_windows, seqlen))
    model = load_torch_model(model_dir)
    nlls = []
    for start in range(0, n_windows, batch_size):
        chunk = windows[start : start + batch_size]
        logits = model(input_ids=chunk).logits.float()
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), chunk[:, 1:], reduction="none"
        )  # [b, seqlen-1]
        nlls.append(ce.double().mean(dim=1))
    return float(torch.exp(torch.cat(nlls).mean()))


def _rows(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out * n_groups, g] float32 (per channel: g = in)."""
    w = w.float()
    if group_size == -1:
        return w
    if w.shape[1] % group_size:
        raise ValueError(f"in_features {w.shape[1]} not divisible by group_size {group_size}")
    return w.reshape(-1, group_size)


def reference_quant_params(
    w: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-convention (min/max, range forced to include 0) scale and zero point.

    Args:
        w: weight [out, in] (any float dtype; computed in float32).
        bits: bit width; maxq = 2**bits - 1.
        group_size: -1 for per output channel, else groups of this many
            consecutive input columns (``in % group_size == 0``).
        sym: symmetric (zero = (maxq + 1) / 2) vs asymmetric (rounded zero).

    Returns:
        (scale, zero), both float32 [out, n_groups] (n_groups = 1 per channel).
    """
    x = _rows(w, group_size)
    maxq = 2**bits - 1
    xmin = torch.minimum(x.min(dim=1).values, torch.zeros(()))
    xmax = torch.maximum(x.max(dim=1).values, torch.zeros(()))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        neg = xmin < 0
        xmin[neg] = -xmax[neg]
    dead = (xmin == 0) & (xmax == 0)
    xmin[dead] = -1.0
    xmax[dead] = 1.0
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale.reshape(w.shape[0], -1), zero.reshape(w.shape[0], -1)


def reference_fake_quant(
    w: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False
) -> torch.Tensor:
    """Quantize-dequantize ``w`` [out, in] with ``reference_quant_params``.

    q = clamp(round(x / scale) + zero, 0, maxq); returns scale * (q - zero) as
    float32 [out, in].
    """
    scale, zero = reference_quant_params(w, bits, group_size, sym)
    x = _rows(w, group_size)
    scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return (scale * (q - zero)).reshape(w.shape)
