"""Progress bars for long work: a live ``tqdm`` bar on a terminal; when stderr is redirected (a log file, CI), no
carriage-return frames but one final line per bar (``desc: n/total in s``); nothing at all when disabled
(``--no-progress``)."""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class _LogBar:
  """The redirected-stderr stand-in for a tqdm bar: counts, and prints one line when it closes."""

  def __init__(self, iterable, desc: str, total: int | None):
    self.iterable, self.desc, self.n, self.start, self.closed = iterable, desc, 0, time.perf_counter(), False
    self.postfix = ""
    self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)

  def __iter__(self):
    for x in self.iterable:
      yield x
      self.n += 1
    self.close()

  def update(self, n: int = 1):
    self.n += n

  def set_postfix(self, **values):
    """The latest values (e.g. a loss), printed on the closing line."""
    self.postfix = ", " + ", ".join(f"{k}={v}" for k, v in values.items())

  def close(self):
    if not self.closed:
      self.closed = True
      of = f"/{self.total}" if self.total is not None else ""
      print(f"{self.desc}: {self.n}{of} in {time.perf_counter() - self.start:.1f} s{self.postfix}", file=sys.stderr,
            flush=True)


def bar(iterable=None, *, desc: str, total: int | None = None, enabled: bool = True):
  """A progress bar over ``iterable`` (or a manual one with ``update()`` / ``close()``)."""
  if not enabled:
    return tqdm(iterable, total=total, disable=True)
  if sys.stderr.isatty():
    return tqdm(iterable, desc=desc, total=total, leave=False)
  return _LogBar(iterable, desc, total)
