"""Device meshes: the two named axes every sharded computation of qjax uses, and the data-parallel loop over rows.

A mesh has the axes ``data`` (calibration windows, evaluation batches and generation rows are split over it, and
FSDP-style the second dimension of the weights) and ``model`` (tensor parallelism: a weight's output or input
features, as the family's map says; :mod:`qjax.models.sharding`). Everything else is JAX's own partitioner:
arrays are placed with ``NamedSharding`` and the jit-compiled functions are partitioned by XLA (GSPMD), which
inserts the collectives (the all-reduce of per-shard Hessians, the all-gather of an FSDP weight). On one device
(``mesh=None``) nothing here changes a computation.

:func:`map_rows` is how a function that loops over rows (``lax.map`` over micro-batches of perplexity windows) keeps
its rows split over ``data``: a ``lax.map`` over a sharded axis would make every device run every step, so the
rows are reshaped ``[n] -> [D, n / D]``, the ``D`` axis is pinned to ``data`` and the loop runs under ``vmap`` over
it (each device loops over its own ``n / D`` rows). Layer-wise calibration instead needs the one-device bits on
any mesh: :func:`map_split` runs the one-device program on each device's rows with the weights whole, and
:func:`reduce_rows` sums per-row statistics in one fixed pairwise tree whatever the device count.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qjax.core.errors import InputError

AXES = ("data", "model")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """``data x model`` devices (``--mesh data=D,model=M``); ``data * model`` must equal the number of devices JAX
  sees (every process's, under ``jax.distributed``)."""
  data: int = 1
  model: int = 1

  def __post_init__(self):
    for name in AXES:
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InputError(f"mesh axis {name} must be a positive integer, got {v!r}")

  @classmethod
  def parse(cls, spec: str) -> "MeshConfig":
    """``"data=2,model=4"`` (either axis may be left out: 1) -> MeshConfig."""
    sizes = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
      name, sep, value = part.partition("=")
      name = name.strip()
      if not sep or name not in AXES:
        raise InputError(f"bad mesh {spec!r}: expected data=D,model=M (axes: {', '.join(AXES)})")
      if name in sizes:
        raise InputError(f"bad mesh {spec!r}: axis {name} given twice")
      try:
        sizes[name] = int(value)
      except ValueError:
        raise InputError(f"bad mesh {spec!r}: {name} must be an integer, got {value.strip()!r}") from None
    return cls(**sizes)

  @property
  def size(self) -> int:
    return self.data * self.model

  def build(self, devices=None) -> Mesh:
    """The ``(data, model)`` mesh over ``devices`` (default: all of ``jax.devices()``, in order)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != self.size:
      raise InputError(f"mesh data={self.data},model={self.model} needs {self.size} devices, JAX sees "
                       f"{len(devices)} (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={self.size})")
    return Mesh(np.array(devices).reshape(self.data, self.model), AXES)

  def __str__(self) -> str:
    return f"data={self.data},model={self.model}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessConfig:
  """One process of a ``jax.distributed`` run: the coordinator's ``host:port`` (process 0 listens there), the
  number of processes and this one's id (``--coordinator``, ``--num-processes``, ``--process-id``). One process
  (the default) needs no coordinator."""
  coordinator: str | None = None
  num_processes: int = 1
  process_id: int = 0

  def __post_init__(self):
    if not isinstance(self.num_processes, int) or self.num_processes < 1:
      raise InputError(f"--num-processes must be a positive integer, got {self.num_processes!r}")
    if not isinstance(self.process_id, int) or not 0 <= self.process_id < self.num_processes:
      raise InputError(f"--process-id must be in [0, {self.num_processes}), got {self.process_id!r}")
    if self.num_processes > 1:
      host, sep, port = (self.coordinator or "").rpartition(":")
      if not sep or not host or not port.isdigit():
        raise InputError(f"{self.num_processes} processes need --coordinator HOST:PORT, got {self.coordinator!r}")

  def initialize(self):
    """``jax.distributed.initialize`` for several processes (on CPU with gloo collectives); call it before any
    JAX computation. One process: nothing to do."""
    if self.num_processes == 1:
      return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # the CPU backend's (others ignore it)
    jax.distributed.initialize(coordinator_address=self.coordinator, num_processes=self.num_processes,
                               process_id=self.process_id)


def fit_spec(mesh: Mesh, shape, wanted) -> P:
  """``PartitionSpec`` ``wanted`` (one mesh axis name, a tuple of names or None per array axis) with every axis
  whose length its mesh axes do not divide left unsplit (XLA would pad it; a placement refuses it)."""
  out = []
  for n, want in zip(shape, tuple(wanted) + (None,) * (len(shape) - len(wanted))):
    names = () if want is None else (want,) if isinstance(want, str) else tuple(want)
    names = tuple(a for a in names if mesh.shape[a] > 1)
    ok = names and n % math.prod(mesh.shape[a] for a in names) == 0
    out.append((names[0] if len(names) == 1 else names) if ok else None)
  return P(*out)


def rows_sharding(mesh: Mesh, shape, axes=("data",)) -> NamedSharding:
  """Axis 0 of an array of ``shape`` split over ``axes`` (when they divide it), the rest whole."""
  return NamedSharding(mesh, fit_spec(mesh, shape, (axes,)))


def put_rows(x, mesh: Mesh | None, axes=("data",)):
  """``x`` placed with axis 0 split over ``axes`` (:func:`rows_sharding`; ``mesh=None``: unchanged)."""
  return x if mesh is None else put(x, mesh, rows_sharding(mesh, x.shape, axes).spec)


def put(x, mesh: Mesh | None, spec: P | None = None):
  """``x`` placed on ``mesh`` with ``spec`` (default: replicated); under ``jax.distributed`` every process must
  pass the same global value. ``mesh=None``: ``x`` unchanged."""
  if mesh is None:
    return x
  sharding = NamedSharding(mesh, P() if spec is None else spec)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:     # a global array: resharded on the devices
    return _resharder(sharding)(x)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x) -> np.ndarray:
  """The whole value of ``x`` as a NumPy array, also of a global array whose shards live in other processes
  (``jax.distributed``: every process must call it)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.lru_cache(maxsize=64)
def _resharder(sharding):
  return jax.jit(lambda a: a, out_shardings=sharding)


def device_count(mesh: Mesh | None, axes=AXES) -> int:
  """Devices along ``axes`` of ``mesh`` (1 without one)."""
  return 1 if mesh is None else math.prod(mesh.shape[a] for a in axes)


def _split(mesh, xs, axes):
  d = device_count(mesh, axes)
  lead = jax.tree.leaves(xs)[0].shape[0]
  if d == 1 or lead % d:
    return None
  split = lambda a: jax.lax.with_sharding_constraint(a.reshape(d, lead // d, *a.shape[1:]),
                                                     NamedSharding(mesh, P(axes)))
  return jax.tree.map(split, xs)


def map_rows(f, xs, mesh: Mesh | None, axes=("data",)):
  """``lax.map(f, xs)`` (over axis 0 of every leaf of ``xs``) with the rows split over the mesh's ``axes`` (when
  they divide them; otherwise, and without a mesh, a plain ``lax.map``). XLA partitions whatever ``f`` closes over
  as its placement says (tensor-parallel weights: partial sums all-reduced). Call inside ``jit``."""
  split = _split(mesh, xs, axes)
  if split is None:
    return jax.lax.map(f, xs)
  ys = jax.vmap(lambda part: jax.lax.map(f, part))(split)
  return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), ys)


def map_split(f, consts, xs, mesh: Mesh | None):
  """``lax.map(lambda x: f(consts, x), xs)`` with the rows of ``xs`` split over every device and one whole copy of
  ``consts`` on each (``shard_map``): each device runs exactly the one-device program on its own rows, so every
  output row has the same bits as on one device (no partial sums cross devices). When the device count does not
  divide the rows, every device computes every row (still the same bits). Call inside ``jit``."""
  local = lambda c, x: jax.lax.map(lambda row: f(c, row), x)
  if mesh is None:
    return local(consts, xs)
  n, d = jax.tree.leaves(xs)[0].shape[0], device_count(mesh)
  spec = P(AXES) if n % d == 0 else P()
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), spec), out_specs=spec, check_vma=False)(consts, xs)


def reduce_rows(contribution, combine, init, consts, xs, mesh: Mesh | None):
  """The ``combine``-reduction of ``contribution(consts, x)`` over the rows ``x`` of ``xs`` (axis 0 of every
  leaf), in one fixed pairwise tree, so that the result has the same bits on one device and on any mesh.

  ``combine(a, b)`` must be commutative with ``combine(init, a) == a`` exactly (a sum from zeros, a max from
  ``-inf``). With ``n = 2^L m`` rows (``m`` odd) the rows form ``2^L`` consecutive chunks of ``m``; a chunk is
  combined in order (a scan), and the chunks in a balanced binary tree (nested scans of length 2, so the trace
  does not grow with ``n``). On a mesh of ``G = 2^g <= 2^L`` devices each device holds ``2^(L-g)`` consecutive
  chunks and reduces its subtree, and the top ``g`` levels are a butterfly (``ppermute`` with device ``i xor
  2^s``): both partners add the same two operands, so every device ends with the one-device tree's bits. Other
  device counts: every device reduces every row (the same bits, no speed-up). Memory: ``L + 2`` accumulators,
  never a stack of per-row contributions. Call inside ``jit``.
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  levels = (n & -n).bit_length() - 1                       # L: 2^L is the largest power of two dividing n
  d = device_count(mesh)
  g = d.bit_length() - 1 if mesh is not None and d & (d - 1) == 0 and d <= 2**levels else 0

  def tree(c, x, depth):
    step = ((lambda acc, row: (combine(acc, contribution(c, row)), None)) if depth == 0 else
            (lambda acc, half: (combine(acc, tree(c, half, depth - 1)), None)))
    return jax.lax.scan(step, init, x)[0]

  def local(c, x):
    depth = levels - g
    x = jax.tree.map(lambda a: a.reshape((2,) * depth + (a.shape[0] >> depth,) + a.shape[1:]), x)
    acc = tree(c, x, depth)
    for s in range(g):
      acc = combine(acc, jax.lax.ppermute(acc, AXES, [(i, i ^ (1 << s)) for i in range(d)]))
    return acc

  if mesh is None:
    return local(consts, xs)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXES) if g else P()), out_specs=P(),
                       check_vma=False)(consts, xs)
