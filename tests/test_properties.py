"""Property-based tests (hypothesis) of the Shapley and coefficient functions: efficiency,
symmetry, the null player, ranges — for random games and random statistics."""
import itertools
import math

import torch
from hypothesis import given, settings, strategies as st

from mmbalance.evaluation.shapley import shapley_numerators, shapley_values
from mmbalance.methods.arl import arl_coefficients
from mmbalance.methods.ogm_ge import ogm_coefficients

games = st.integers(2, 5).flatmap(lambda M: st.lists(st.integers(-5, 5), min_size=2 ** M, max_size=2 ** M))


def brute_force(v, M):
    phi = [0.0] * M
    for perm in itertools.permutations(range(M)):
        S = 0
        for i in perm:
            phi[i] += v[S | 1 << i] - v[S]
            S |= 1 << i
    return [p / math.factorial(M) for p in phi]


@settings(max_examples=60, deadline=None)
@given(games)
def test_shapley_efficiency_and_permutation_formula(v):
    M = int(math.log2(len(v)))
    t = torch.tensor(v, dtype=torch.float64)
    phi = shapley_values(t)
    assert abs(float(phi.sum()) - (v[-1] - v[0])) < 1e-9  # efficiency
    assert torch.allclose(phi, torch.tensor(brute_force(v, M), dtype=torch.float64))
    num = shapley_numerators(torch.tensor(v))
    assert num.dtype == torch.int64 and torch.allclose(num.double() / math.factorial(M), phi)


@settings(max_examples=40, deadline=None)
@given(games)
def test_shapley_null_player_and_symmetry(v):
    M = int(math.log2(len(v)))
    # make player 0 a null player: v(S + 0) = v(S)
    w = [v[S & ~1] for S in range(2 ** M)]
    assert abs(float(shapley_values(torch.tensor(w, dtype=torch.float64))[0])) < 1e-12
    # symmetric players 0 and 1: v depends on them only through how many are in S
    sym = [v[(S & ~3) | (1 if (S & 3) in (1, 2) else (S & 3))] for S in range(2 ** M)]
    phi = shapley_values(torch.tensor(sym, dtype=torch.float64))
    assert abs(float(phi[0] - phi[1])) < 1e-9


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(0, 10_000), st.floats(0.1, 16.0))
def test_arl_coefficients_are_a_distribution(M, seed, T):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(12, 4, generator=g) * float(torch.rand(1, generator=g) * 5) for _ in range(M)]
    y = torch.randint(0, 4, (12,), generator=g)
    k, c, v, w = arl_coefficients(logits, y, T=T)
    for x in (k, c, w):
        assert torch.all(x >= 0) and torch.all(x <= 1) and abs(float(x.sum()) - 1) < 1e-5
    assert torch.all(v > 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=2, max_size=6), st.floats(0.0, 3.0), st.booleans())
def test_ogm_coefficients_damp_only_the_dominant(scores, alpha, offset):
    s = torch.tensor(scores, dtype=torch.float64)
    k, rho = ogm_coefficients(s, alpha, ratio_offset=offset)
    assert torch.all(k <= 1.0 + 1e-12) and torch.all(k > -1.0)
    ratio = s / ((s.sum() - s) / (len(scores) - 1))  # in float64, as the rule decides (rho is float32)
    assert torch.allclose(rho.double(), ratio, rtol=1e-6)
    for i in range(len(scores)):
        if float(ratio[i]) <= 1.0:
            assert float(k[i]) == 1.0  # modalities not above the others' mean are never damped


int_dtypes = st.sampled_from([torch.int64, torch.int32, torch.int16])


@settings(max_examples=40, deadline=None)
@given(games, int_dtypes)
def test_shapley_of_an_integer_dtype_game_equals_the_float_game(v, dtype):
    """A game given in any integer dtype has the Shapley values (and exact numerators) of the
    same game in float64."""
    M = int(math.log2(len(v)))
    ref = shapley_values(torch.tensor(v, dtype=torch.float64))
    phi = shapley_values(torch.tensor(v, dtype=dtype))
    assert phi.dtype == torch.float64 and torch.allclose(phi, ref)
    num = shapley_numerators(torch.tensor(v, dtype=dtype))
    assert num.dtype == torch.int64 and torch.allclose(num.double() / math.factorial(M), ref)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5).flatmap(lambda M: st.lists(st.booleans(), min_size=2 ** M, max_size=2 ** M)))
def test_shapley_numerators_of_a_boolean_game(v):
    """A 0/1 (simple) game given as bool, e.g. a correctness indicator."""
    M = int(math.log2(len(v)))
    num = shapley_numerators(torch.tensor(v))
    assert torch.equal(num, shapley_numerators(torch.tensor(v, dtype=torch.int64)))
    assert torch.allclose(num.double() / math.factorial(M), torch.tensor(brute_force([int(b) for b in v], M),
                                                                          dtype=torch.float64))
