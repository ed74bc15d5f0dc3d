"""Shardings for params and caches: logical axis names and one rules table.

Every param and cache leaf names its dimensions with logical axes; one rules
table maps each logical axis to mesh axes (the logical-axis-rules style of
MaxText and jax-llm-examples). From the two come the `PartitionSpec`s and
`NamedSharding`s of whole pytrees, for `jax.jit(in_shardings=...,
out_shardings=...)`, `shard_map(in_specs=...)` and `jax.device_put`.

Shape legend and logical axes:
  L: "layers", any leading axis of stacked params or caches
  B: "batch"
  S: "sequence", the cache capacity (max_len)
  N: "heads", query heads
  K: "kv_heads", key/value heads
  H: "head_dim"
  DM: "embed", model width

With `DEFAULT_RULES` on a mesh with axes ("data", "model"), the batch is split
over "data" and the heads (query and kv alike) over "model": each device holds
its rows' cache for its own heads, a decode step reads and writes only local
cache slices, and the one collective is the all-reduce of the output
projection's sum over heads.

Kv heads that do not divide by their mesh axes (multi-query attention, or
K = 2 on a 4-way model axis) are replicated along them instead, in the cache
and in `wk`, `wv` alike: every device along "model" then keeps a full copy of
the cache for its rows. Any other dimension that does not divide raises
ValueError. With K = 1 the decode step still moves no cache bytes. With
1 < K < model size, XLA splits the kv heads of the new keys the way the query
heads are split and then all-gathers the whole updated cache at every step;
factor the model axis instead, e.g. a mesh "data:2,kv:2,rep:2" with rules
("heads", ("kv", "rep")) and ("kv_heads", "kv"): each device then holds only
the kv head its query heads use (query head n uses kv head n // (N // K)),
and no cache bytes move.

The meshes are Auto (the pjit style: XLA propagates shardings from the
in/out annotations). Explicit mesh axes (`jax.sharding.AxisType.Explicit`)
would need `out_sharding` on kvattn's einsums (the output projection sums
over split heads) and are refused; `make_mesh` builds an Auto mesh.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from kvattn import layout
from kvattn._cache_tree import check_tree
from kvattn.cache import KVCache

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", "data"),
    ("sequence", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("embed", None),
    ("layers", None),
)

# Logical axes of each KVCache field and attention param (without leading
# layer axes), from their one description in kvattn.layout.
_CACHE_AXES = {name: field.logical_axes() for name, field in layout.CACHE.items()}
_PARAM_AXES = {name: field.logical_axes() for name, field in layout.PARAMS.items()}

# Logical axes replicated, rather than refused, when they do not divide.
_REPLICATE_IF_UNEVEN = frozenset({"kv_heads"})


def make_mesh(axes: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """Returns a mesh with Auto axes, e.g. `make_mesh("data:2,model:4")`.

  Args:
    axes: "name:size,name:size" or a mapping {name: size}; the sizes must
      multiply to the number of devices.
    devices: the devices to use; default all (of every process).
  """
  sizes = parse_mesh_axes(axes) if isinstance(axes, str) else dict(axes)
  devices = jax.devices() if devices is None else list(devices)
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"axes {sizes} should multiply to the number of devices {len(devices)}: but "
                     f"multiply to {math.prod(sizes.values())}")
  kw = {}
  if hasattr(jax.sharding, "AxisType"):  # jax >= 0.5.1; Explicit is the default from 0.7.
    kw["axis_types"] = (jax.sharding.AxisType.Auto,) * len(sizes)
  return jax.make_mesh(tuple(sizes.values()), tuple(sizes), devices=devices, **kw)


def parse_mesh_axes(text: str) -> dict[str, int]:
  """Parses "data:2,model:4" into {"data": 2, "model": 4}."""
  sizes = {}
  for item in text.split(","):
    name, sep, size = item.strip().partition(":")
    if not sep or not name or not size.strip().isdigit() or int(size) < 1:
      raise ValueError(f"mesh axes should look like 'data:2,model:4': but got {text!r}")
    if name in sizes:
      raise ValueError(f"mesh axes should name each axis once: but got {text!r}")
    sizes[name] = int(size)
  return sizes


def logical_to_mesh_axes(logical: Sequence[str | None],
                         rules: Rules = DEFAULT_RULES) -> PartitionSpec:
  """Returns the PartitionSpec that `rules` give the logical axes of one array.

  A logical axis of None is replicated. Raises ValueError if an axis is not in
  the rules, if the rules name it twice, or if two dimensions of the array
  would be split over the same mesh axis.
  """
  table = _rules_table(rules)
  spec = []
  for axis in logical:
    if axis is not None and axis not in table:
      raise ValueError(f"logical axis {axis!r} has no rule; rules cover {sorted(table)}")
    spec.append(None if axis is None else table[axis])
  used = [a for s in spec for a in _as_tuple(s)]
  if len(set(used)) != len(used):
    raise ValueError(
        f"logical axes {tuple(logical)} map to {tuple(spec)}, which uses a mesh axis twice")
  return PartitionSpec(*spec)


def cache_logical_axes(cache: Any) -> Any:
  """Returns a KVCache whose leaves are the logical axes (a PartitionSpec of names) of cache's.

  `cache` may hold arrays or `jax.ShapeDtypeStruct`s, and may be stacked with
  leading L axes (named "layers"); it may also be any pytree of caches (a
  model's tuple of stacks), giving the same pytree of such KVCaches. Fields
  that are None stay None. A field not listed here takes k's logical axes for
  as many dimensions as it has.
  """
  if not isinstance(cache, KVCache):
    check_tree("cache", cache)
    return jax.tree.map(cache_logical_axes, cache, is_leaf=lambda x: isinstance(x, KVCache))
  lead = _ndim("cache.k", cache.k) - len(_CACHE_AXES["k"])
  if lead < 0:
    raise ValueError(f"cache.k shape should be (..., B, S, K, H): but got {cache.k.shape}")
  axes = {}
  for name, leaf in cache._asdict().items():
    if name in layout.CACHE_STATIC:  # Static ints, part of the treedef: kept as they are.
      axes[name] = leaf
      continue
    if leaf is None:
      axes[name] = None
      continue
    base = _CACHE_AXES.get(name, _CACHE_AXES["k"])
    own = _ndim(f"cache.{name}", leaf) - lead
    if own < 0 or (name in _CACHE_AXES and own != len(base)) or own > len(base):
      raise ValueError(
          f"cache.{name} shape should have {lead} leading layer axes then "
          f"{base if name in _CACHE_AXES else 'a prefix of ' + str(base)}: but got {leaf.shape}")
    axes[name] = PartitionSpec(*(("layers",) * lead + base[:own]))
  return type(cache)(**axes)


def params_logical_axes(params: Mapping[str, Any]) -> dict[str, PartitionSpec]:
  """Returns the logical axes (a PartitionSpec of names) of each attention param.

  Params may be stacked with leading L axes (named "layers"), as a model that
  scans over its layers keeps them.
  """
  if not isinstance(params, Mapping):
    raise TypeError(f"params should be a dict of arrays: but got {type(params).__name__}")
  unknown = sorted(set(params) - set(_PARAM_AXES))
  if unknown:
    raise ValueError(f"params has unknown keys {unknown}; expected keys among {list(_PARAM_AXES)}")
  axes = {}
  for name, leaf in params.items():
    base = _PARAM_AXES[name]
    lead = _ndim(f"params['{name}']", leaf) - len(base)
    if lead < 0:
      raise ValueError(f"params['{name}'] shape should be (..., {', '.join(base)}): "
                       f"but got {leaf.shape}")
    axes[name] = PartitionSpec(*(("layers",) * lead + base))
  return axes


def tree_specs(tree: Any, logical: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
               name: str = "tree") -> Any:
  """Returns the PartitionSpec of each leaf of `tree` from its logical axes.

  Args:
    tree: arrays or `jax.ShapeDtypeStruct`s.
    logical: the same structure with a PartitionSpec of logical names in
      place of each leaf (None subtrees stay None).
    mesh: the mesh, whose axis sizes decide divisibility.
    rules: the rules table.
    name: what to call `tree` in errors.

  Kv heads that do not divide by their mesh axes are replicated; any other
  dimension that does not divide raises ValueError.
  """
  _check_auto(mesh, rules)

  def one(path, axes, leaf):
    if axes is None:
      return None
    return _fit(f"{name}{jax.tree_util.keystr(path)}", leaf, axes, mesh, rules)

  return jax.tree_util.tree_map_with_path(one, logical, tree, is_leaf=_is_spec)


def cache_specs(cache: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Returns a KVCache of PartitionSpecs, e.g. k `PartitionSpec("data", None, "model", None)`.

  For any pytree of caches, the same pytree of such KVCaches.
  """
  return tree_specs(cache, cache_logical_axes(cache), mesh, rules, name="cache")


def params_specs(params: Mapping[str, Any], mesh: Mesh,
                 rules: Rules = DEFAULT_RULES) -> dict[str, PartitionSpec]:
  """Returns a dict of PartitionSpecs for attention params.

  E.g. wq `PartitionSpec(None, "model", None)` under `DEFAULT_RULES`.
  """
  return tree_specs(params, params_logical_axes(params), mesh, rules, name="params")


def named(specs: Any, mesh: Mesh) -> Any:
  """Turns a pytree of PartitionSpecs into NamedShardings on `mesh`."""
  return jax.tree.map(lambda s: None
                      if s is None else NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def cache_shardings(cache: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Returns a KVCache of NamedShardings (for `jax.jit` in/out_shardings); a pytree for a pytree."""
  return named(cache_specs(cache, mesh, rules), mesh)


def params_shardings(params: Mapping[str, Any], mesh: Mesh,
                     rules: Rules = DEFAULT_RULES) -> dict[str, NamedSharding]:
  """Returns a dict of NamedShardings for attention params."""
  return named(params_specs(params, mesh, rules), mesh)


def put(tree: Any, shardings: Any) -> Any:
  """Places each leaf of `tree` with its sharding; works across processes.

  Within one process this is `jax.device_put`. When the mesh spans several
  processes, each leaf must hold the same global value in every process
  (numpy, or an array on a local device); each process then builds only the
  shards its own devices hold.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(one, tree, shardings)


def _fit(name, leaf, axes, mesh, rules):
  """The spec of one leaf, with uneven kv heads replicated."""
  shape = leaf.shape
  if len(axes) != len(shape):
    raise ValueError(f"{name} has logical axes {tuple(axes)}: but shape {shape}")
  spec = list(logical_to_mesh_axes(axes, rules))
  for d, (axis, mesh_axes) in enumerate(zip(axes, spec)):
    names = _as_tuple(mesh_axes)
    missing = [a for a in names if a not in mesh.shape]
    if missing:
      raise ValueError(f"rules map {axis!r} to mesh axes {missing} that the mesh "
                       f"{dict(mesh.shape)} does not have")
    size = math.prod(mesh.shape[a] for a in names)
    if shape[d] % size:
      if axis in _REPLICATE_IF_UNEVEN:
        spec[d] = None
        continue
      raise ValueError(f"{name} dimension {d} ({axis}) has size {shape[d]}, which should divide by "
                       f"mesh axes {names} of size {size}: but does not")
  return PartitionSpec(*spec)


def _rules_table(rules):
  table = {}
  for entry in rules:
    if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
      raise ValueError(f"rules should be (logical_axis, mesh_axes) pairs: but got {entry!r}")
    axis, mesh_axes = entry
    if axis in table:
      raise ValueError(f"rules should name each logical axis once: {axis!r} is named twice")
    table[axis] = mesh_axes
  return table


def _check_auto(mesh, rules):
  kinds = getattr(mesh, "axis_types", None) or ()  # Older jax: every axis is Auto.
  explicit = [
      name for name, kind in zip(mesh.axis_names, kinds) if kind == jax.sharding.AxisType.Explicit
  ]
  used = {a for _, m in rules for a in _as_tuple(m)}
  if used & set(explicit):
    raise ValueError(
        f"mesh axes {sorted(used & set(explicit))} should be Auto (kvattn.sharding.make_mesh, "
        f"or jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)): but are Explicit")


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec) or x is None


def _ndim(name, leaf) -> int:
  shape = getattr(leaf, "shape", None)
  if shape is None:
    raise ValueError(f"{name} should be an array: but got {type(leaf).__name__}")
  return len(shape)
