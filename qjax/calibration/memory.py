"""Host memory of the calibration pipeline: the held activations, checked against what is available up front,
and the process's peak."""
from __future__ import annotations

import resource

from qjax.core.errors import InputError
from qjax.models import CausalLM


def activation_bytes(model: CausalLM, nsamples: int, seqlen: int) -> int:
  """Bytes of one layer's calibration inputs plus outputs (float32)."""
  return 2 * nsamples * seqlen * model.config.hidden_size * 4


def check_memory_budget(model: CausalLM, nsamples: int, seqlen: int):
  """Fails up front when the held activations would not fit in available host memory."""
  need = activation_bytes(model, nsamples, seqlen)
  avail = available_bytes()
  if avail is not None and need > 0.8 * avail:
    raise InputError(f"calibration needs {need / 2**30:.1f} GiB for activations ({nsamples} samples x {seqlen} "
                     f"tokens x {model.config.hidden_size} x 4 bytes x 2), more than 80% of the "
                     f"{avail / 2**30:.1f} GiB available: lower --nsamples or --calib-seqlen")


def available_bytes() -> int | None:
  """MemAvailable of /proc/meminfo in bytes (None where it cannot be read)."""
  try:
    for line in open("/proc/meminfo"):
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def peak_host_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
