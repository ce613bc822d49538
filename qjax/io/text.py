"""Tokenizers from model folders, text sources, and the seeded calibration sampler."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qjax.core.errors import InputError


def load_tokenizer(path):
  """``AutoTokenizer`` from a local model (or qjax checkpoint) folder; never touches the network."""
  import transformers
  try:
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise InputError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None
  tok.model_max_length = int(1e12)  # whole-text tokenization is intended; silence the length warning
  return tok


def read_text(path) -> str:
  path = Path(path)
  if not path.is_file():
    raise InputError(f"text file {path} does not exist")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise InputError(f"text file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
  if not text.strip():
    raise InputError(f"text file {path} is empty")
  return text


def tokenize(tokenizer, text: str) -> np.ndarray:
  """The whole text tokenized once, special tokens as the tokenizer adds them by default -> int32 ``[n]``."""
  return np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
