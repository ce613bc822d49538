"""The needle-in-a-haystack prompt builder of ``eval/needle.py``."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import needle  # noqa: E402

from qjax.io import assets, text as data  # noqa: E402


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_has_needle_at_depth_and_fits(stories_dir, depth):
  tok = data.load_tokenizer(stories_dir)
  pool = needle.sentences(data.read_text(assets.named_text("tinystories", assets.PPL_DATASETS)))[:400]
  ids = needle.build_prompt(tok, pool, 7, 200, depth, "Lily")
  assert 150 < len(ids) <= 200
  text = tok.decode(ids, skip_special_tokens=True)
  assert text.endswith(needle.QUESTION) and text.count("Her name was Lily.") == 1
  where = text.index("Her name was Lily.") / len(text)
  assert abs(where - depth) < 0.15
