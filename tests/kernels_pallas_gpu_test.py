"""The Pallas GPU implementation (kvattn/kernels/pallas_gpu.py) without a GPU.

Two checks that need no GPU: the kernels, run in interpret mode, match the
float64 reference for every storage dtype (the invariants over ragged rows,
GQA, prefix-LM, block edges and overflow run for every implementation in
tests/attention_test.py); and the call lowers for CUDA, through
Pallas's Triton lowering, to Triton kernels (`jax.export` lowers for a
platform this machine does not have).

jax 0.11 changed two things here. Without a GPU, the Triton lowering needs
the GPU it lowers for to be named by an abstract device (jax 0.10 and older
took compute capability 9.0, an H100's); the lowering tests name an H100.
And the Triton lowering is deprecated: each kernel lowered for a GPU raises a
DeprecationWarning, which the lowering tests expect and every other test here
turns into an error (interpret mode never lowers through Triton).
See the module docstring of kvattn/kernels/pallas_gpu.py for why kvattn does
not silence it.
"""

import contextlib
import functools

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

import kvattn
from kvattn.kernels import pallas_gpu
from tests import reference

B, N, K, H = 3, 4, 2, 16
# The stored keys and values are the reference's inputs, so the tolerance is
# the kernel's own rounding: matmuls in the storage dtype for 16-bit caches.
TOL = {"float32": 1e-4, "int8": 1e-4, "bfloat16": 3e-2, "float16": 4e-3}

_TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"
# Where the Triton lowering is deprecated (jax 0.11 and newer), a test that
# does not expect the warning fails on it.
pytestmark = pytest.mark.filterwarnings(f"error:{_TRITON_DEPRECATION}:DeprecationWarning")
_JAX_0_11 = jax.__version_info__ >= (0, 11)


@pytest.mark.parametrize("dtype", sorted(TOL))
@pytest.mark.parametrize("prefix_lm", [False, True])
@pytest.mark.slow
def test_every_dtype_matches_float64_reference(dtype, prefix_lm):
  sizes = [11, 6, 1, 1]  # Chunks across block edges, then decode steps.
  total = sum(sizes)
  rng = np.random.default_rng(0)
  q = rng.standard_normal((B, total, N, H), np.float32)
  k = rng.standard_normal((B, total, K, H), np.float32)
  v = rng.standard_normal((B, total, K, H), np.float32)
  mask = reference.three_row_mask(total)
  call = jax.jit(
      functools.partial(kvattn.cached_attention, implementation="pallas_gpu", prefix_lm=prefix_lm,
                        block_q=4, block_kv=5))
  cache, outs, ids, lo = reference.new_cache(B, 24, K, H, dtype), [], [], 0
  for c, size in enumerate(sizes):
    o, cache = call(q[:, lo:lo + size], k[:, lo:lo + size], v[:, lo:lo + size], cache,
                    mask[:, lo:lo + size])
    outs.append(np.asarray(o))
    ids += [c] * size
    lo += size
  want = reference.attention_by_rows(q, reference.stored(cache, "k", total),
                                     reference.stored(cache, "v", total), mask, ids, prefix_lm)
  np.testing.assert_allclose(np.concatenate(outs, 1), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("num_tokens, max_len, num_heads",
                         [(1, 256, 8), (64, 256, 8), (37, 1000, 6)])  # Odd T, S and G = 3 too.
@pytest.mark.slow
def test_lowers_to_triton_kernels_for_cuda(dtype, num_tokens, max_len, num_heads):
  """One kernel for the cache; a second for a chunk of 16 tokens or more.

  Triton takes only power-of-two tiles: the lowering refuses anything else.
  """
  cache = reference.new_cache(2, max_len, 2, 64, dtype)
  q = jnp.ones((2, num_tokens, num_heads, 64))
  assert _triton_kernels(q, cache) == (1 if num_tokens < 16 else 2)


def _triton_kernels(q, cache) -> int:
  """The Triton kernels of `cached_attention(q, k, v, cache)` ("pallas_gpu") lowered for CUDA."""
  call = jax.jit(functools.partial(kvattn.cached_attention, implementation="pallas_gpu"))
  triton = "__gpu$xla.gpu.triton"
  exported = export.export(call, platforms=["cuda"],
                           disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])
  with _for_an_h100(), _triton_deprecation_expected():
    module = exported(q, q[:, :, :2], q[:, :, :2], cache).mlir_module()
  return module.count(f"@{triton}(")


def _for_an_h100():
  """Lowering for an H100 on a machine without a GPU.

  jax 0.11 and newer lower Triton kernels only for a GPU they can see or one
  named by an abstract device; older jax reads no abstract device and, without
  a GPU, lowers for compute capability 9.0 (an H100's).
  """
  if not _JAX_0_11:
    return contextlib.nullcontext()
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                     platform="gpu")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=h100))


def _triton_deprecation_expected():
  """Expects jax's DeprecationWarning for the Triton lowering (jax 0.11 and newer)."""
  if not _JAX_0_11:
    return contextlib.nullcontext()
  return pytest.warns(DeprecationWarning, match=_TRITON_DEPRECATION)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("num_tokens", [1, 300])  # A decode step; a chunk longer than the ring.
def test_ring_caches_lower_to_triton_kernels_for_cuda(dtype, num_tokens):
  """A ring (sliding-window) cache takes the same kernels, with positions compared."""
  cache = kvattn.init_cache(2, 4096, 2, 64, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                            quantized=dtype == "int8", window=128, rewind_room=16)
  q = jnp.ones((2, num_tokens, 8, 64))
  assert _triton_kernels(q, cache) == (1 if num_tokens < 16 else 2)


@pytest.mark.slow
def test_ring_int8_matches_the_xla_implementation():
  rng = np.random.default_rng(3)
  q = rng.standard_normal((2, 30, 4, 8)).astype(np.float32)
  k, v = (rng.standard_normal((2, 30, 2, 8)).astype(np.float32) for _ in range(2))
  mask = rng.random((2, 30)) > 0.2
  outs = {}
  for implementation in ("xla", "pallas_gpu"):
    cache = kvattn.init_cache(2, 64, 2, 8, quantized=True, window=5, rewind_room=2)
    call = jax.jit(
        functools.partial(kvattn.cached_attention, implementation=implementation, block_kv=3))
    o1, cache = call(q[:, :20], k[:, :20], v[:, :20], cache, mask[:, :20])
    o2, cache = call(q[:, 20:], k[:, 20:], v[:, 20:], cache, mask[:, 20:])
    outs[implementation] = np.concatenate([o1, o2], 1)
  np.testing.assert_allclose(outs["pallas_gpu"], outs["xla"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim, num_slots, ok", [(64, 256, True), (128, 16, True),
                                                     (48, 256, False), (8, 256, False),
                                                     (64, 8, False)])
def test_unsupported_shapes(head_dim, num_slots, ok):
  """The shapes the compiled kernel refuses, each with its reason (interpret mode takes any)."""
  why = pallas_gpu.unsupported(head_dim, num_slots)
  assert (why is None) == ok
  if not ok:
    assert (f"H={head_dim}" in why) if head_dim in (48, 8) else (f"{num_slots} slots" in why)
