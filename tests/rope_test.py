"""RoPE against the float64 numpy reference, and its defining property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvattn import rope
from kvattn.models import llama
from kvattn.rope import Scaling, apply_rope, inverse_frequencies
from tests import compiles
from tests import reference


def test_matches_float64_reference():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  positions = jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
  got = apply_rope(x, positions, 100.0)
  for b in range(2):
    want = reference.rope(np.asarray(x[b], np.float64), np.asarray(positions[b]), 100.0)
    np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)


def test_position_zero_is_identity():
  x = jax.random.normal(jax.random.key(1), (1, 1, 2, 4))
  np.testing.assert_allclose(apply_rope(x, jnp.zeros((1, 1), jnp.int32)), x, rtol=0, atol=0)


def test_dot_product_depends_only_on_relative_position():
  q = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(3), (1, 1, 1, 16))

  def score(m, n):
    rq = apply_rope(q, jnp.array([[m]]))
    rk = apply_rope(k, jnp.array([[n]]))
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
  np.testing.assert_allclose(score(0, 0), score(9, 9), rtol=1e-5)


def test_keeps_dtype():
  x = jnp.ones((1, 2, 1, 4), jnp.bfloat16)
  assert apply_rope(x, jnp.zeros((1, 2), jnp.int32)).dtype == jnp.bfloat16


@pytest.mark.parametrize("x_shape, pos_shape, match", [
    ((1, 2, 1, 5), (1, 2), r"x shape should be \(B, T, N, H\) with H even: but got \(1, 2, 1, 5\)"),
    ((1, 2, 1, 4), (1, 3), r"positions shape should be \(B, T\)=\(1, 2\): but got \(1, 3\)"),
    ((2, 4), (2, 4), r"x shape should be \(B, T, N, H\): but got \(2, 4\)"),
])
def test_errors(x_shape, pos_shape, match):
  with pytest.raises(ValueError, match=match):
    apply_rope(jnp.ones(x_shape), jnp.zeros(pos_shape, jnp.int32))


# numpy positions: a jax array built at import would start the backend before
# tests/conftest.py sets its flags (a test file runs as a script under Bazel).
@pytest.mark.parametrize("positions, base, error, match", [
    (np.zeros(
        (1, 2), np.float32), 10_000.0, ValueError, r"positions dtype should be an integer dtype"),
    (np.zeros(
        (1, 2), np.int32), True, ValueError, r"base should be a positive float: but got True"),
    (np.zeros(
        (1, 2), np.int32), -1.0, ValueError, r"base should be a positive float: but got -1.0"),
])
def test_bad_positions_or_base(positions, base, error, match):
  with pytest.raises(error, match=match):
    apply_rope(jnp.ones((1, 2, 1, 4)), jnp.asarray(positions), base)


def test_numpy_and_jax_scalar_bases_are_accepted():
  x, positions = jnp.ones((1, 2, 1, 4)), jnp.array([[0, 5]])
  want = apply_rope(x, positions, 10_000.0)
  np.testing.assert_allclose(apply_rope(x, positions, np.float32(10_000.0)), want, rtol=1e-6)
  traced = jax.jit(lambda b: apply_rope(x, positions, b))(jnp.float32(10_000.0))
  np.testing.assert_allclose(traced, want, rtol=1e-5)


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64
}


@pytest.mark.parametrize("hf_scaling, scaling", [
    (LLAMA3, Scaling("llama3", 8.0, 1.0, 4.0, 64)),
    ({
        "type": "linear",
        "factor": 4.0
    }, Scaling("linear", 4.0)),
])
def test_scaled_frequencies_match_float64_reference(hf_scaling, scaling):
  h = 32  # With base 500000 and an original length of 64, all three llama3 bands occur.
  want = reference.rope_frequencies(h, 500_000.0, hf_scaling)
  np.testing.assert_allclose(inverse_frequencies(h, 500_000.0, scaling), want, rtol=2e-6)
  assert not np.allclose(want, reference.rope_frequencies(h, 500_000.0))  # It scales.
  x = jax.random.normal(jax.random.key(4), (1, 6, 2, h))
  positions = jnp.array([[0, 3, 50, 200, 1000, 4000]])
  got = apply_rope(x, positions, 500_000.0, scaling)
  ref = reference.rope(np.asarray(x[0], np.float64), np.asarray(positions[0]), 500_000.0,
                       hf_scaling)
  np.testing.assert_allclose(got[0], ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("scaling, error, match", [
    ({
        "factor": 8.0
    }, TypeError, r"scaling should be None or a kvattn.rope.Scaling"),
    (Scaling("ntk", 8.0), ValueError,
     r"scaling.kind should be one of \('linear', 'llama3', 'yarn', 'longrope'\): but got 'ntk'"),
    (Scaling("linear",
             0.0), ValueError, r"scaling.factor should be a positive number: but got 0.0"),
    (Scaling("llama3", 8.0, 4.0, 1.0), ValueError, r"high_freq_factor > low_freq_factor"),
])
def test_bad_scaling(scaling, error, match):
  with pytest.raises(error, match=match):
    apply_rope(jnp.ones((1, 2, 1, 4)), jnp.zeros((1, 2), jnp.int32), 10_000.0, scaling)


# Inverse frequencies and attention factors computed once with transformers 5.25.0
# (modeling_rope_utils' ROPE_INIT_FUNCTIONS on Qwen3Config, LlamaConfig and Phi3Config; the long
# set with seq_len = original_max_position_embeddings + 1, as its dynamic_rope_update asks for).
# The dicts are rope_scaling as transformers resolves them (factor, original length filled in).
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024)
YARN_HF = [
    1.0, 0.3162277638912201, 0.08125000447034836, 0.019764237105846405, 0.0043750000186264515,
    0.0007905694656074047, 0.0002500000118743628, 7.905694656074047e-05
]
YARN_MSCALE = dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=256, beta_fast=16,
                   beta_slow=2, truncate=False, mscale=1.0, mscale_all_dim=0.5)
YARN_MSCALE_HF = [
    1.0, 0.5085274577140808, 0.21314136683940887, 0.07096832245588303, 0.017060279846191406,
    0.0042509096674621105, 0.0021617042366415262, 0.0010992857860401273, 0.0005590170039795339,
    0.0002842754765879363, 0.00014456186909228563, 7.351367821684107e-05, 3.738372106454335e-05,
    1.90106457012007e-05, 9.667434824223164e-06, 4.916155830869684e-06
]
# Phi-3 style: 16-dim heads, partial_rotary_factor 0.5 (8 rotated), factor 256 / 64 = 4.
LONGROPE = dict(rope_type="longrope", factor=4.0, original_max_position_embeddings=64,
                short_factor=[1.0, 1.1, 1.5, 2.0], long_factor=[1.2, 2.5, 4.0, 8.0])
LONGROPE_HF = ([1.0, 0.09090909361839294, 0.006666666828095913, 0.0005000000237487257], [
    0.8333333134651184, 0.03999999910593033, 0.0024999999441206455, 0.0001250000059371814
])
LONGROPE_SET = dict(rope_type="longrope", factor=2.0, attention_factor=1.3,
                    original_max_position_embeddings=128, short_factor=[1.0, 1.25, 1.5, 3.0],
                    long_factor=[2.0, 3.0, 5.0, 7.0])
LONGROPE_SET_HF = ([1.0, 0.16917939484119415, 0.029814239591360092, 0.0031524719670414925],
                   [0.5, 0.07049141079187393, 0.008944272063672543, 0.001351059414446354])

YARN_SCALING = Scaling("yarn", 4.0, original_max_positions=1024)
YARN_MSCALE_SCALING = Scaling("yarn", 8.0, original_max_positions=256, beta_fast=16.0,
                              beta_slow=2.0, truncate=False, attention_factor=1.094179988101349)
LONGROPE_SCALING = Scaling("longrope", 4.0, original_max_positions=64,
                           short_factor=(1.0, 1.1, 1.5, 2.0), long_factor=(1.2, 2.5, 4.0, 8.0))
LONGROPE_SET_SCALING = Scaling("longrope", 2.0, original_max_positions=128, attention_factor=1.3,
                               short_factor=(1.0, 1.25, 1.5, 3.0), long_factor=(2.0, 3.0, 5.0, 7.0))

# (hf dict, Scaling, base, R, HF's short or only frequencies, HF's long ones, HF's factor)
HF_CASES = {
    "yarn": (YARN, YARN_SCALING, 10_000.0, 16, YARN_HF, None, 1.138629436111989),
    "yarn_mscale_untruncated":
        (YARN_MSCALE, YARN_MSCALE_SCALING, 50_000.0, 32, YARN_MSCALE_HF, None, 1.094179988101349),
    "longrope": (LONGROPE, LONGROPE_SCALING, 10_000.0, 8, *LONGROPE_HF, 1.1547005383792517),
    "longrope_set": (LONGROPE_SET, LONGROPE_SET_SCALING, 500.0, 8, *LONGROPE_SET_HF, 1.3),
}


@pytest.mark.parametrize("hf_scaling, scaling, base, r, short, long, factor", HF_CASES.values(),
                         ids=HF_CASES.keys())
def test_frequencies_and_attention_factor_equal_transformers(hf_scaling, scaling, base, r, short,
                                                             long, factor):
  # Within float32 rounding of transformers' torch float32 computation.
  np.testing.assert_allclose(inverse_frequencies(r, base, scaling), short, rtol=1e-6)
  np.testing.assert_allclose(reference.rope_frequencies(r, base, hf_scaling), short, rtol=1e-6)
  assert rope.attention_factor(scaling) == pytest.approx(factor, rel=1e-12)
  assert reference.rope_attention_factor(hf_scaling) == pytest.approx(factor, rel=1e-12)
  if long is not None:
    old = hf_scaling["original_max_position_embeddings"]
    np.testing.assert_allclose(inverse_frequencies(r, base, scaling, old + 1), long, rtol=1e-6)
    np.testing.assert_allclose(reference.rope_frequencies(r, base, hf_scaling, old + 1), long,
                               rtol=1e-6)
    # At the original length itself, still the short factors.
    np.testing.assert_allclose(inverse_frequencies(r, base, scaling, old), short, rtol=1e-6)


def test_yarn_blends_interpolation_and_extrapolation():
  """The highest frequencies are kept, the lowest divided by factor, some between."""
  plain = np.asarray(inverse_frequencies(16, 10_000.0))
  ratio = np.asarray(inverse_frequencies(16, 10_000.0, YARN_SCALING)) / plain
  np.testing.assert_allclose(ratio[:2], 1.0, rtol=1e-6)
  np.testing.assert_allclose(ratio[-3:], 0.25, rtol=1e-6)
  assert np.all((ratio[2:5] < 1) & (ratio[2:5] > 0.25))


@pytest.mark.parametrize("hf_scaling, scaling, base, h, rotary_dim", [
    (YARN, YARN_SCALING, 10_000.0, 16, None),
    (YARN_MSCALE, YARN_MSCALE_SCALING, 50_000.0, 32, None),
    (LONGROPE, LONGROPE_SCALING, 10_000.0, 16, 8),
    (LONGROPE_SET, LONGROPE_SET_SCALING, 500.0, 8, None),
    (None, None, 100.0, 12, 4),
    (LLAMA3, Scaling("llama3", 8.0, 1.0, 4.0, 64), 500_000.0, 40, 32),
])
def test_yarn_longrope_and_partial_rotary_match_float64_reference(hf_scaling, scaling, base, h,
                                                                  rotary_dim):
  x = jax.random.normal(jax.random.key(5), (3, 4, 2, h))
  positions = jnp.array([[0, 3, 50, 60], [1, 20, 150, 300], [5, 6, 7, 8]])
  # Within the original length of the longrope configs (rows 0 and 2), then past it (all rows).
  for rows in (np.array([0, 2]), np.array([0, 1, 2])):
    got = apply_rope(x[rows], positions[rows], base, scaling, rotary_dim)
    # As transformers, the call's largest position over all rows picks longrope's factors.
    seq_len = int(positions[rows].max()) + 1
    for i, b in enumerate(rows):
      want = reference.rope(np.asarray(x[b], np.float64), np.asarray(positions[b]), base,
                            hf_scaling, rotary_dim, seq_len)
      np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=2e-4)


def test_partial_rotary_rotates_the_first_features_and_passes_the_rest():
  x = jax.random.normal(jax.random.key(6), (1, 3, 2, 10)).astype(jnp.bfloat16)
  positions = jnp.array([[0, 7, 1000]])
  got = apply_rope(x, positions, 10_000.0, rotary_dim=4)
  np.testing.assert_array_equal(got[..., 4:], x[..., 4:])  # Bit for bit, in x's dtype.
  # The first 4 are rotated as a 4-wide head would be: pairs (0, 2), (1, 3).
  np.testing.assert_array_equal(got[..., :4], apply_rope(x[..., :4], positions, 10_000.0))
  # In float32: numpy 1.26 (the floor) cannot compare bfloat16 arrays with allclose.
  assert not np.allclose(np.float32(got[:, 1:, :, :4]), np.float32(x[:, 1:, :, :4]))
  # rotary_dim=H is the whole head.
  np.testing.assert_array_equal(apply_rope(x, positions, rotary_dim=10), apply_rope(x, positions))


def test_longrope_switches_per_call_at_the_original_length():
  """HF's rule: long factors for the whole call iff its max position + 1 > original (64)."""
  x = jax.random.normal(jax.random.key(7), (1, 2, 1, 8))
  old = LONGROPE_SCALING.original_max_positions

  def rotated(last):  # A call with positions [10, last].
    return apply_rope(x, jnp.array([[10, last]]), 10_000.0, LONGROPE_SCALING)

  def want(last, seq_len):
    short_or_long = reference.rope_frequencies(8, 10_000.0, LONGROPE, seq_len)
    angle = np.array([10, last])[:, None, None] * short_or_long
    cos, sin = np.cos(angle) * 1.1547005383792517, np.sin(angle) * 1.1547005383792517
    x1, x2 = np.asarray(x[0, ..., :4], np.float64), np.asarray(x[0, ..., 4:], np.float64)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  at, past = rotated(old - 1), rotated(old)  # max + 1 == 64: short; == 65: long.
  np.testing.assert_allclose(at[0], want(old - 1, old), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(past[0], want(old, old + 1), rtol=1e-5, atol=1e-5)
  # The token at position 10 is rotated differently by the two calls: the rule is per call.
  assert not np.allclose(at[0, 0], past[0, 0], atol=1e-3)


def test_one_compilation_for_any_positions():
  """The longrope switch is traced (jnp.where), so positions on either side share a program."""
  x = jax.random.normal(jax.random.key(8), (1, 2, 1, 16))

  @jax.jit
  def rotate_all(positions):
    return [
        apply_rope(x, positions, 10_000.0, s, r)
        for s, r in ((YARN_SCALING, None), (LONGROPE_SCALING, 8), (None, 6))
    ]

  with compiles.compilations("rotate_all") as compiled:
    short = rotate_all(jnp.array([[5, 63]]))
    long = rotate_all(jnp.array([[5, 64]]))
    rotate_all(jnp.array([[500, 9000]]))
  assert compiled == ["rotate_all"]
  for got, positions in ((short, [[5, 63]]), (long, [[5, 64]])):
    want = apply_rope(x, jnp.array(positions), 10_000.0, LONGROPE_SCALING, 8)
    np.testing.assert_allclose(got[1], want, rtol=1e-6, atol=1e-6)
  assert not np.allclose(short[1][0, 0], long[1][0, 0])  # Same position 5, other call: long.


def test_yarn_with_a_traced_base():
  x, positions = jnp.ones((1, 2, 1, 32)), jnp.array([[3, 700]])
  want = apply_rope(x, positions, 50_000.0, YARN_MSCALE_SCALING)
  got = jax.jit(lambda b: apply_rope(x, positions, b, YARN_MSCALE_SCALING))(jnp.float32(50_000.0))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rotary_dim", [0, 3, 10, -2, True, 4.0])
def test_bad_rotary_dim(rotary_dim):
  with pytest.raises(
      ValueError, match=r"rotary_dim should be None or a positive even int <= "
      rf"H=8: but got {rotary_dim!r}"):
    apply_rope(jnp.ones((1, 2, 1, 8)), jnp.zeros((1, 2), jnp.int32), 10_000.0,
               rotary_dim=rotary_dim)


def _longrope(**changes):
  return LONGROPE_SCALING._replace(**changes)


@pytest.mark.parametrize("scaling, rotary_dim, match", [
    (_longrope(short_factor=(1.0, 1.0, 1.0)), 8,
     r"scaling.short_factor should have rotary_dim/2 = 4 entries .*: but got 3"),
    (_longrope(), None, r"scaling.short_factor should have rotary_dim/2 = 8 entries .*: but got 4"),
    (_longrope(long_factor=(1.0,)), 8,
     r"scaling.long_factor should have rotary_dim/2 = 4 entries .*: but got 1"),
    (_longrope(short_factor=[1.0, 1.1, 1.5, 2.0]), 8,
     r"scaling.short_factor should be a non-empty tuple of positive numbers"),
    (_longrope(long_factor=None), 8, r"scaling.long_factor should be a non-empty tuple"),
    (_longrope(long_factor=(1.0, 0.0, 1.0, 1.0)), 8,
     r"scaling.long_factor should be a non-empty tuple of positive numbers"),
    (_longrope(attention_factor=-1.0), 8,
     r"scaling.attention_factor should be None or a positive number: but got -1.0"),
    (Scaling("dynamic", 2.0), None,
     r"scaling.kind 'dynamic' is not supported: its frequencies depend on the longest sequence "
     r"seen so far"),
    (Scaling("yarn", 4.0, beta_fast=1.0, beta_slow=32.0), None,
     r"scaling should have beta_fast >= beta_slow: but got 1.0 and 32.0"),
    (Scaling("yarn", 4.0,
             beta_slow=0.0), None, r"scaling.beta_slow should be a positive number: but got 0.0"),
    (Scaling("yarn", 4.0, truncate=1), None, r"scaling.truncate should be a bool: but got 1"),
    (Scaling("linear", 2.0, attention_factor=2.0), None,
     r"scaling.attention_factor applies to kinds \('yarn', 'longrope'\) only: but got "
     r"attention_factor=2.0 with kind 'linear'"),
    (Scaling("yarn", 2.0, short_factor=(1.0,)), None,
     r"scaling.short_factor applies to kinds \('longrope',\) only"),
])
def test_bad_yarn_or_longrope(scaling, rotary_dim, match):
  with pytest.raises(ValueError, match=match):
    apply_rope(jnp.ones((1, 2, 1, 16)), jnp.zeros((1, 2), jnp.int32), 10_000.0, scaling, rotary_dim)


def test_unchecked_rotate_still_checks_the_factor_lengths():
  """A wrong length would broadcast silently (one factor for all pairs): refused at trace time."""
  scaling = _longrope(short_factor=(2.0,), long_factor=(2.0,))
  with pytest.raises(ValueError, match=r"rope_scaling.short_factor should have rotary_dim/2 = 4"):
    rope.rotate(jnp.ones((1, 2, 1, 8)), jnp.zeros((1, 2), jnp.int32), 10_000.0, scaling)


def test_scalings_are_hashable_static_arguments():
  scalings = [YARN_SCALING, YARN_MSCALE_SCALING, LONGROPE_SCALING, LONGROPE_SET_SCALING]
  assert len({hash(s) for s in scalings}) == 4
  x, positions = jnp.ones((1, 2, 1, 16)), jnp.array([[0, 70]])
  f = jax.jit(apply_rope, static_argnames=("scaling", "rotary_dim"))
  np.testing.assert_allclose(f(x, positions, 10_000.0, LONGROPE_SCALING, 8),
                             apply_rope(x, positions, 10_000.0, LONGROPE_SCALING, 8), rtol=1e-6)


# rope_scaling_from_hf (kvattn.models.llama): config.json's dicts onto Scaling.
PHI3_SU = dict(type="su", short_factor=[1.0, 1.1, 1.5, 2.0], long_factor=[1.2, 2.5, 4.0, 8.0])
PHI3 = dict(model_type="phi3", max_position_embeddings=256, original_max_position_embeddings=64,
            partial_rotary_factor=0.5, rope_scaling=PHI3_SU)
# The older spelling: "type", not "rope_type".
YARN_MSCALE_OLD = {"type": "yarn", **{k: v for k, v in YARN_MSCALE.items() if k != "rope_type"}}
FROM_HF_CASES = [
    (YARN, None, YARN_SCALING),
    (dict(YARN, rope_theta=10000.0), None, YARN_SCALING),  # transformers 5's rope_parameters.
    (YARN_MSCALE_OLD, None, YARN_MSCALE_SCALING),
    # 0 and None stand for transformers' defaults of beta_fast and beta_slow.
    (dict(YARN_MSCALE, beta_fast=0, beta_slow=None, truncate=True), None,
     YARN_MSCALE_SCALING._replace(beta_fast=32.0, beta_slow=1.0, truncate=True)),
    # No factor: max_position_embeddings / original (transformers 5.25.0 gives 1.138629436111989).
    (dict(rope_type="yarn", factor=None, original_max_position_embeddings=512),
     dict(max_position_embeddings=2048), Scaling("yarn", 4.0, original_max_positions=512)),
    # A top-level original_max_position_embeddings wins over the dict's, as in transformers.
    (YARN, dict(original_max_position_embeddings=512,
                max_position_embeddings=4096), YARN_SCALING._replace(original_max_positions=512)),
    # Not in the dict: max_position_embeddings.
    (dict(rope_type="yarn", factor=2.0), dict(max_position_embeddings=300),
     Scaling("yarn", 2.0, original_max_positions=300)),
    (LONGROPE, None, LONGROPE_SCALING),
    (LONGROPE_SET, dict(max_position_embeddings=1024), LONGROPE_SET_SCALING),
    # Phi-3: "su" and "yarn" are longrope; factor 256 / 64 and the original length from the top.
    (PHI3_SU, PHI3, LONGROPE_SCALING),
    (dict(PHI3_SU, type="yarn", original_max_position_embeddings=8), PHI3, LONGROPE_SCALING),
    (dict(rope_type="default", rope_theta=1e6), None, None),
]


@pytest.mark.parametrize("scaling, hf, want", FROM_HF_CASES)
def test_rope_scaling_from_hf(scaling, hf, want):
  got = llama.rope_scaling_from_hf(scaling, hf)
  assert got == want
  hash(got)  # A static argument of jit.


def test_rope_scaling_from_hf_keeps_hf_attention_factors():
  """The mscale variant's and Phi-3's attention factors, as transformers 5.25.0 computed them."""
  got = llama.rope_scaling_from_hf(YARN_MSCALE)
  assert got.attention_factor == pytest.approx(1.094179988101349, rel=1e-12)
  phi3 = llama.rope_scaling_from_hf(PHI3_SU, PHI3)
  assert rope.attention_factor(phi3) == pytest.approx(1.1547005383792517, rel=1e-12)


@pytest.mark.parametrize(
    "scaling, hf, match",
    [
        (dict(rope_type="dynamic", factor=2.0), None,
         r"rope_scaling type 'dynamic' is not supported: its frequencies depend on the longest "
         r"sequence seen so far, so growing the context changes the rotation of tokens already cached"
        ),
        (dict(rope_type="ntk", factor=2.0), None,
         r"rope_scaling type should be 'default', 'linear', 'llama3', 'yarn' or 'longrope': but got "
         r"'ntk'"),
        (PHI3_SU, dict(model_type="llama"), r"but got 'su'"),  # "su" is Phi-3's spelling only.
        (dict(rope_type="yarn", factor=2.0), None,
         r"rope_scaling 'yarn' should have original_max_position_embeddings"),
        (dict(rope_type="longrope", original_max_position_embeddings=64, short_factor=[1.0],
              long_factor=[1.0]), None,
         r"rope_scaling 'longrope' without a factor needs max_position_embeddings / "
         r"original_max_position_embeddings: pass the whole config as hf="),
        (dict(rope_type="longrope", factor=2.0, original_max_position_embeddings=64,
              short_factor=[1.0]), None, r"rope_scaling 'longrope' should have long_factor"),
        (dict(rope_type="linear"), None, r"rope_scaling 'linear' should have factor"),
    ])
def test_rope_scaling_from_hf_errors(scaling, hf, match):
  with pytest.raises(ValueError, match=match):
    llama.rope_scaling_from_hf(scaling, hf)
