"""han_jax.core.scores against references written independently of it (plain Python loops over pmfs and
supports) and against the defining properties of proper scores."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from han_jax.core import scores

SIG_M10 = 1.0 / (1.0 + math.exp(10.0))  # sigmoid(-10), the smallest pi the callers pass
SIG_P10 = 1.0 / (1.0 + math.exp(-10.0))  # sigmoid(10), the largest


# --- independent references ---------------------------------------------------------------------------------


def _nb_log_pmf(k, mu, theta):
    """log NB(k; mean mu, dispersion theta) from math.lgamma."""
    return (
        math.lgamma(k + theta)
        - math.lgamma(theta)
        - math.lgamma(k + 1)
        + theta * math.log(theta / (theta + mu))
        + k * math.log(mu / (theta + mu))
    )


def _zinb_pmf(pi, mu, theta, min_len=0, mass_tol=1e-16, cap=60_000):
    """The ZINB pmf on 0..K, a Python loop over math.lgamma, cut where a geometric bound on the remaining mass
    falls below ``mass_tol``: past k the NB pmf ratio (1-p)(j+theta)/(j+1) is at most r = max(that ratio at k,
    1 - p), so the remaining mass is at most pmf_k r / (1 - r)."""
    p = theta / (theta + mu)
    pmf = []
    k = 0
    while True:
        nb = math.exp(_nb_log_pmf(k, mu, theta))
        pmf.append((1.0 - pi) * nb + (pi if k == 0 else 0.0))
        r = max((1.0 - p) * (k + theta) / (k + 1.0), 1.0 - p)
        if k >= min_len and k > mu and r < 1.0 and (1.0 - pi) * nb * r / (1.0 - r) < mass_tol:
            break
        k += 1
        assert k < cap, "reference pmf too long for these parameters"
    return np.array(pmf)


def _mean_abs_difference(pmf):
    """E|X - X'| by the direct double sum over a pmf on 0..K, one row of it at a time (elementwise products,
    not BLAS: a threaded dot is slow on a loaded machine)."""
    k = np.arange(pmf.size, dtype=np.float64)
    total = 0.0
    for i in range(pmf.size):
        if pmf[i] != 0.0:
            total += pmf[i] * float(np.sum(pmf * np.abs(k - i)))
    return total


def _crps_from_pmf(pmf, y, e_xx=None):
    """E|X - y| - 0.5 E|X - X'| by direct sums over a (truncated) pmf on 0..K."""
    k = np.arange(pmf.size, dtype=np.float64)
    e_xy = float(np.sum(pmf * np.abs(k - y)))
    if e_xx is None:
        e_xx = _mean_abs_difference(pmf)
    return e_xy - 0.5 * e_xx


def _sample_zinb(rng, n, pi, mu, theta):
    p = theta / (theta + mu)
    nb = rng.negative_binomial(theta, p, size=n)
    return np.where(rng.uniform(size=n) < pi, 0, nb)


# --- ZINB CRPS ---------------------------------------------------------------------------------------------

CRPS_CASES = [
    # (pi, mu, theta, y)
    (0.2, 3.0, 1.5, 0.0),
    (0.2, 3.0, 1.5, 2.0),
    (0.2, 3.0, 1.5, 2.5),
    (0.2, 3.0, 1.5, 17.25),
    (SIG_M10, 0.01, 0.1, 0.0),
    (SIG_M10, 0.01, 0.1, 1.0),
    (SIG_M10, 0.01, 100.0, 0.4),
    (SIG_P10, 5.0, 2.0, 0.0),
    (SIG_P10, 5.0, 2.0, 3.7),
    (0.5, 50.0, 0.1, 0.0),
    (0.5, 50.0, 0.1, 42.0),
    (0.05, 50.0, 100.0, 49.5),
    (0.05, 50.0, 100.0, 80.0),
    (0.0, 7.0, 0.7, 1.0),
    (0.3, 0.5, 0.1, 12.9),
]


def test_zinb_crps_matches_brute_force_double_sum():
    pis, mus, thetas, ys = (np.array(c) for c in zip(*CRPS_CASES))
    got = scores.zinb_crps(ys, pis, mus, thetas)
    ref = []
    cache = {}  # cases share parameters: one pmf and one double sum per parameter set
    for pi, mu, th, y in CRPS_CASES:
        if (pi, mu, th) not in cache:
            pmf = _zinb_pmf(pi, mu, th, min_len=int(math.ceil(max(c[3] for c in CRPS_CASES))))
            cache[pi, mu, th] = pmf, _mean_abs_difference(pmf)
        pmf, e_xx = cache[pi, mu, th]
        ref.append(_crps_from_pmf(pmf, y, e_xx))
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=0)
    assert got.shape == (len(CRPS_CASES),)


def test_zinb_crps_row_by_row_equals_vectorised_and_broadcasts():
    ys = np.array([0.0, 1.0, 2.5, 9.0])
    batch = scores.zinb_crps(ys, 0.25, 4.0, 1.3)
    single = [float(scores.zinb_crps(y, 0.25, 4.0, 1.3)) for y in ys]
    np.testing.assert_allclose(batch, single, rtol=1e-13)
    assert scores.zinb_crps(2.0, 0.25, 4.0, 1.3).shape == ()
    assert scores.zinb_crps(np.zeros((0,)), 0.25, 4.0, 1.3).shape == (0,)
    # below the support the integrand is 1 on [y, 0)
    assert scores.zinb_crps(-1.5, 0.25, 4.0, 1.3) == pytest.approx(float(scores.zinb_crps(0.0, 0.25, 4.0, 1.3)) + 1.5)


def test_zinb_crps_small_blocks_give_the_same_sum(monkeypatch):
    """Rows split across blocks (and blocks shared by rows) accumulate to the same values."""
    ys = np.array([0.0, 3.5, 30.0, 1.0])
    pis, mus, thetas = np.array([0.1, 0.4, 0.0, 0.9]), np.array([2.0, 8.0, 25.0, 0.3]), np.array([0.5, 3, 10, 1])
    whole = scores.zinb_crps(ys, pis, mus, thetas)
    monkeypatch.setattr(scores, "CRPS_BLOCK", 7)
    np.testing.assert_allclose(scores.zinb_crps(ys, pis, mus, thetas), whole, rtol=1e-12)


@pytest.mark.parametrize("y", [0.0, 1.0, 3.5, 20.0])
def test_zinb_crps_of_a_point_mass_at_zero_is_y(y):
    # pi = 1 - 1e-12: F(x) = 1 for x >= 0 up to 1e-12, so the integrand is 1 on [0, y) and ~0 elsewhere.
    got = scores.zinb_crps(y, 1.0 - 1e-12, 3.0, 2.0)
    assert abs(float(got) - y) < 1e-9


@pytest.mark.parametrize("mu,y", [(0.5, 0.0), (3.0, 2.0), (3.0, 4.5), (12.0, 9.0)])
def test_zinb_crps_with_large_theta_approaches_the_poisson(mu, y):
    pmf = [math.exp(-mu)]
    while len(pmf) <= max(y, 10 * mu + 60):
        pmf.append(pmf[-1] * mu / len(pmf))
    ref = _crps_from_pmf(np.array(pmf), y)
    # NB -> Poisson with an O(mu / theta) difference.
    np.testing.assert_allclose(scores.zinb_crps(y, 0.0, mu, 1e7), ref, rtol=1e-5)


def test_zinb_crps_proper_against_other_forecasts():
    """The expected CRPS under the true ZINB is lower than under a forecast with other parameters."""
    true = (0.3, 4.0, 1.5)
    pmf = _zinb_pmf(*true)
    ks = np.arange(pmf.size, dtype=np.float64)
    exp_true = float(np.dot(pmf, scores.zinb_crps(ks, *true)))
    for other in [(0.1, 4.0, 1.5), (0.3, 6.0, 1.5), (0.3, 4.0, 10.0), (0.5, 2.0, 0.5)]:
        assert exp_true < float(np.dot(pmf, scores.zinb_crps(ks, *other)))


def test_zinb_crps_rejects_an_absurd_grid_and_names_the_row():
    with pytest.raises(ValueError, match=r"row 1 .*mu=inf"):
        scores.zinb_crps([1.0, 1.0], 0.1, [2.0, np.inf], 1.0)
    with pytest.raises(ValueError, match=r"row 0 \(y=1000000000000.0"):
        scores.zinb_crps(1e12, 0.1, 2.0, 1.0)


def test_zinb_crps_grid_under_the_callers_clamps_is_within_the_cap():
    """The worst row the callers can produce (mu = exp(12), theta = 0.1, pi = sigmoid(-10)) needs a grid over
    2**24 points: hence the blockwise walk. It stays under CRPS_MAX_GRID."""
    from scipy.stats import nbinom

    mu, theta = math.exp(12.0), 0.1
    k = nbinom.isf(1e-10 / (1.0 - SIG_M10), theta, theta / (theta + mu))
    assert 2**24 < k < scores.CRPS_MAX_GRID


# --- ZINB log score, CDF, quantile, PIT --------------------------------------------------------------------


def test_zinb_log_score_matches_lgamma_reference():
    cases = [
        (0.0, 0.2, 3.0, 1.5),
        (4.0, 0.2, 3.0, 1.5),
        (2.5, 0.2, 3.0, 1.5),
        (0.0, SIG_M10, 0.01, 0.1),
        (0.0, SIG_P10, 50.0, 100.0),
        (7.0, SIG_P10, 50.0, 100.0),
        (13.3, 0.0, 40.0, 0.1),
        (0.0, 0.0, 2.0, 5.0),
    ]
    ys, pis, mus, thetas = (np.array(c) for c in zip(*cases))
    ref = []
    for y, pi, mu, th in cases:
        nb = math.exp(_nb_log_pmf(y, mu, th))
        ref.append(-math.log(pi + (1 - pi) * nb) if y == 0 else -math.log(1 - pi) - _nb_log_pmf(y, mu, th))
    np.testing.assert_allclose(scores.zinb_log_score(ys, pis, mus, thetas), ref, rtol=1e-12)


def test_zinb_log_score_is_minus_log_pmf_for_integers():
    pi, mu, theta = 0.35, 6.0, 0.8
    pmf = _zinb_pmf(pi, mu, theta)
    ks = np.arange(40)
    np.testing.assert_allclose(scores.zinb_log_score(ks, pi, mu, theta), -np.log(pmf[:40]), rtol=1e-11)
    # and the pmf it implies sums to one
    assert abs(np.exp(-scores.zinb_log_score(np.arange(pmf.size), pi, mu, theta)).sum() - 1.0) < 1e-12


def test_zinb_log_score_extremes_without_clamps():
    # pi = 0 at y = 0 is the NB's own log pmf; y > 0 with pi = 1 is impossible: inf.
    assert scores.zinb_log_score(0.0, 0.0, 2.0, 3.0) == pytest.approx(3.0 * math.log1p(2.0 / 3.0), rel=1e-14)
    with np.errstate(divide="ignore"):
        assert scores.zinb_log_score(2.0, 1.0, 2.0, 3.0) == np.inf
    # a tiny zero mass under a huge mean: log(pi + (1-pi) NB(0)) stays finite and equals -log(pi) nearly
    assert scores.zinb_log_score(0.0, 1e-30, 1e6, 10.0) == pytest.approx(-math.log(1e-30), rel=1e-12)


def test_zinb_cdf_matches_summed_pmf_and_is_zero_below():
    pi, mu, theta = 0.25, 9.0, 2.5
    pmf = _zinb_pmf(pi, mu, theta)
    ks = np.arange(60)
    np.testing.assert_allclose(scores.zinb_cdf(ks, pi, mu, theta), np.cumsum(pmf)[:60], rtol=1e-12)
    assert np.all(scores.zinb_cdf([-1, -5], pi, mu, theta) == 0.0)
    assert scores.zinb_cdf(0, pi, mu, theta) == pytest.approx(pi + (1 - pi) * (theta / (theta + mu)) ** theta)


@settings(max_examples=40, deadline=None)
@given(
    pi=st.floats(0.0, 0.999),
    mu=st.floats(0.01, 200.0),
    theta=st.floats(0.1, 100.0),
    q=st.lists(st.floats(1e-6, 1 - 1e-6), min_size=1, max_size=25),
)
def test_zinb_quantile_inverts_zinb_cdf(pi, mu, theta, q):
    q = np.array(q)
    k = scores.zinb_quantile(q, pi, mu, theta)
    assert np.all(k >= 0) and np.all(k == np.floor(k))
    assert np.all(scores.zinb_cdf(k, pi, mu, theta) >= q)
    assert np.all(scores.zinb_cdf(k - 1, pi, mu, theta) < q)


def test_zinb_quantile_zero_inflation_branch():
    pi, mu, theta = 0.6, 5.0, 2.0
    f0 = float(scores.zinb_cdf(0, pi, mu, theta))
    assert scores.zinb_quantile(f0, pi, mu, theta) == 0  # q == F(0) is still 0
    assert scores.zinb_quantile(np.nextafter(f0, 1.0), pi, mu, theta) == 1
    assert scores.zinb_quantile(0.5, 1.0, mu, theta) == 0  # pi = 1: all mass at 0


def test_randomized_pit_is_uniform_under_the_true_zinb():
    rng = np.random.default_rng(12345)
    n = 20_000
    pi = rng.uniform(0.0, 0.6, size=n)
    mu = rng.uniform(0.1, 20.0, size=n)
    theta = rng.uniform(0.2, 5.0, size=n)
    p = theta / (theta + mu)
    y = np.where(rng.uniform(size=n) < pi, 0, rng.negative_binomial(theta, p))
    u = scores.randomized_pit(y, pi, mu, theta, rng)
    assert u.shape == (n,) and np.all((u >= 0) & (u <= 1))
    freq = np.histogram(u, bins=10, range=(0.0, 1.0))[0] / n
    assert np.all(np.abs(freq - 0.1) <= 0.01), freq


def test_randomized_pit_is_not_uniform_under_a_wrong_forecast():
    rng = np.random.default_rng(7)
    y = _sample_zinb(rng, 20_000, 0.2, 3.0, 1.0)
    u = scores.randomized_pit(y, 0.2, 9.0, 1.0, rng)  # forecast mean three times too high
    freq = np.histogram(u, bins=10, range=(0.0, 1.0))[0] / y.size
    # PIT values pile up low (observations sit in the forecast's lower tail) and the top bins empty out.
    assert freq[:5].sum() > 0.7 and freq[-1] < 0.01, freq


def test_randomized_pit_ends_and_non_integer_y():
    rng = np.random.default_rng(0)
    pi, mu, theta = 0.3, 4.0, 2.0
    f = [float(scores.zinb_cdf(k, pi, mu, theta)) for k in range(4)]
    u = scores.randomized_pit(np.full(2000, 2.0), pi, mu, theta, rng)
    assert np.all((u >= f[1]) & (u <= f[2])) and u.min() < f[1] + 0.01 * (f[2] - f[1])
    u0 = scores.randomized_pit(np.zeros(2000), pi, mu, theta, rng)
    assert np.all((u0 >= 0.0) & (u0 <= f[0]))
    # a non-integer y: the CDF is flat there, so the value is F(floor y), exactly and without randomness
    got = scores.randomized_pit([2.5, 0.25, 3.999], pi, mu, theta, rng)
    assert got.tolist() == [f[2], f[0], f[3]]


# --- interval score --------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    a=st.floats(-100, 100),
    width=st.floats(0, 50),
    y=st.floats(-200, 200),
    alpha=st.floats(0.01, 0.5),
)
def test_interval_score_properties(a, width, y, alpha):
    lo, hi = a, a + width
    s = float(scores.interval_score(lo, hi, y, alpha))
    assert s >= (hi - lo) - 1e-12
    if lo <= y <= hi:
        assert s == pytest.approx(hi - lo, abs=1e-12)
    elif y < lo:
        assert s == pytest.approx((hi - lo) + 2.0 / alpha * (lo - y), rel=1e-12)
    else:
        assert s == pytest.approx((hi - lo) + 2.0 / alpha * (y - hi), rel=1e-12)


def test_interval_score_at_the_boundaries_and_vectorised():
    got = scores.interval_score([1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0], [1.0, 3.0, 0.5, 4.0], 0.1)
    np.testing.assert_allclose(got, [2.0, 2.0, 2.0 + 20.0 * 0.5, 2.0 + 20.0 * 1.0])


# --- empirical CRPS and quantile --------------------------------------------------------------------------------


def _crps_integral(samples, y):
    """int (F_m(x) - 1{x >= y})^2 dx over the sorted support of the samples and y, interval by interval."""
    xs = sorted(samples)
    m = len(xs)
    support = sorted(set(xs) | {y})
    total = 0.0
    for left, right in zip(support[:-1], support[1:]):
        f = sum(1 for x in xs if x <= left) / m
        h = 1.0 if left >= y else 0.0
        total += (f - h) ** 2 * (right - left)
    return total


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.lists(st.integers(-20, 20).map(lambda v: v / 4.0), min_size=1, max_size=12),
            st.integers(-30, 30).map(lambda v: v / 3.0),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_empirical_crps_matches_the_integral(rows):
    s = max(len(r[0]) for r in rows)
    samples = np.zeros((len(rows), s))
    where = np.zeros((len(rows), s), dtype=bool)
    for i, (xs, _) in enumerate(rows):
        samples[i, : len(xs)] = xs
        samples[i, len(xs) :] = 1e6  # masked out: must not count
        where[i, : len(xs)] = True
    ys = np.array([r[1] for r in rows])
    got = scores.empirical_crps(samples, ys, where=where)
    ref = [_crps_integral(xs, y) for xs, y in rows]
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_empirical_crps_single_sample_shared_samples_and_empty_rows():
    np.testing.assert_allclose(scores.empirical_crps([[2.0], [-1.0]], [5.0, 1.5]), [3.0, 2.5])
    shared = np.array([0.0, 1.0, 4.0])
    ys = np.array([0.5, 10.0])
    np.testing.assert_allclose(scores.empirical_crps(shared, ys), [_crps_integral(shared.tolist(), y) for y in ys])
    got = scores.empirical_crps(shared, ys, where=np.array([[True, False, True], [False, False, False]]))
    assert got[0] == pytest.approx(_crps_integral([0.0, 4.0], 0.5)) and np.isnan(got[1])
    # a [S] mask shared by every row
    got = scores.empirical_crps(np.array([[0.0, 9.0, 1.0], [3.0, 9.0, 5.0]]), [0.0, 0.0], where=[True, False, True])
    np.testing.assert_allclose(got, [_crps_integral([0.0, 1.0], 0.0), _crps_integral([3.0, 5.0], 0.0)])


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.lists(st.integers(-50, 50), min_size=6, max_size=6), min_size=1, max_size=6),
    keep=st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=6, max_size=6),
    q=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.7, 0.9, 0.95, 1.0]),
)
def test_empirical_quantile_matches_numpy_inverted_cdf(data, keep, q):
    samples = np.array(data, dtype=np.float64) / 7.0
    where = np.array(keep[: samples.shape[0]])
    got = scores.empirical_quantile(samples, q, where=where)
    for i in range(samples.shape[0]):
        sel = samples[i][where[i]]
        if sel.size == 0:
            assert np.isnan(got[i])
        else:
            assert got[i] == np.quantile(sel, q, method="inverted_cdf")


def test_empirical_quantile_hand_values():
    x = [4.0, 1.0, 3.0, 2.0]
    # inverted CDF: smallest x with F_m(x) >= q
    assert scores.empirical_quantile(x, 0.25).tolist() == [1.0]
    assert scores.empirical_quantile(x, 0.26).tolist() == [2.0]
    assert scores.empirical_quantile(x, 1.0).tolist() == [4.0]
    assert scores.empirical_quantile(x, 0.5, where=[False, True, True, False]).tolist() == [1.0]


# --- categorical ---------------------------------------------------------------------------------------------------


def test_categorical_scores_match_loops():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(5), size=30)
    probs[0] = [1.0, 0.0, 0.0, 0.0, 0.0]
    labels = rng.integers(0, 5, size=30)
    labels[0] = 2  # a certain wrong forecast
    log_ref, brier_ref = [], []
    for row, lab in zip(probs, labels):
        log_ref.append(-math.log(max(row[lab], 1e-7)))
        brier_ref.append(sum((row[c] - (1.0 if c == lab else 0.0)) ** 2 for c in range(5)))
    np.testing.assert_allclose(scores.categorical_log_score(probs, labels), log_ref, rtol=1e-14)
    np.testing.assert_allclose(scores.categorical_brier(probs, labels), brier_ref, rtol=1e-14)
    assert scores.categorical_log_score(probs, labels)[0] == pytest.approx(-math.log(scores.PROB_FLOOR))
    assert scores.categorical_brier([[0.0, 1.0, 0.0]], [0])[0] == 2.0


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_categorical_scores_are_proper(k, seed):
    rng = np.random.default_rng(seed)
    # True distributions with every class above 1e-3: the floored log score is proper only for true
    # probabilities above PROB_FLOOR.
    q = rng.dirichlet(np.ones(k)) * (1 - 1e-3 * k) + 1e-3
    classes = np.arange(k)

    def expected(score, report):
        return float(np.dot(q, score(np.tile(report, (k, 1)), classes)))

    best_log = expected(scores.categorical_log_score, q)
    best_brier = expected(scores.categorical_brier, q)
    for _ in range(20):
        other = rng.dirichlet(np.ones(k) * rng.uniform(0.1, 5.0))
        assert best_log <= expected(scores.categorical_log_score, other) + 1e-12
        assert best_brier <= expected(scores.categorical_brier, other) + 1e-12


def test_binary_scores_match_hand_values_and_are_proper():
    p = np.array([0.9, 0.9, 0.0, 1.0, 0.25])
    y = np.array([1, 0, 1, 1, 0])
    ref = [-math.log(0.9), -math.log(0.1), -math.log(1e-7), 0.0, -math.log(0.75)]
    np.testing.assert_allclose(scores.binary_log_score(p, y), ref, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(scores.binary_brier(p, y), [0.01, 0.81, 1.0, 0.0, 0.0625], rtol=1e-12)
    grid = np.linspace(0.01, 0.99, 99)
    for true in [0.1, 0.37, 0.8]:
        exp_log = true * scores.binary_log_score(grid, 1) + (1 - true) * scores.binary_log_score(grid, 0)
        exp_brier = true * scores.binary_brier(grid, 1) + (1 - true) * scores.binary_brier(grid, 0)
        assert grid[np.argmin(exp_log)] == pytest.approx(true) and grid[np.argmin(exp_brier)] == pytest.approx(true)


# --- calibration ----------------------------------------------------------------------------------------------------


def test_ece_hand_worked_example():
    probs = np.array([[0.9, 0.1], [0.85, 0.15], [0.35, 0.65], [0.7, 0.3], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0, 1])
    # 5 bins: [0.8, 1): conf .9 and .85, one right -> 2/5 |0.5 - 0.875|; [0.6, 0.8): .65 and .7, both right
    # -> 2/5 |1 - 0.675|; [0.4, 0.6): .55 wrong -> 1/5 |0 - 0.55|. Total 0.39.
    assert scores.expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.39, abs=1e-14)
    # 10 bins: every row alone: (0.1 + 0.85 + 0.35 + 0.3 + 0.55) / 5
    assert scores.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(2.15 / 5, abs=1e-14)


def test_ece_of_a_calibrated_construction_is_zero():
    probs, labels = [], []
    for c in [0.55, 0.65, 0.75, 0.85, 0.95]:
        n_right = round(100 * c)
        probs += [[c, 1 - c]] * 100
        labels += [0] * n_right + [1] * (100 - n_right)
    assert scores.expected_calibration_error(np.array(probs), np.array(labels)) < 1e-12


def test_ece_and_reliability_edges():
    assert scores.expected_calibration_error(np.zeros((0, 3)), np.zeros(0, dtype=int)) is None
    assert scores.expected_calibration_error([[1.0, 0.0]], [0]) == 0.0
    rel = scores.reliability([1.0, 0.0, 0.7, 0.1, 0.2, 0.3], [1, 0, 1, 0, 0, 1], n_bins=10)
    assert rel["count"].tolist() == [1, 1, 1, 1, 0, 0, 0, 1, 0, 1]  # 1.0 in the last bin, b/10 starts bin b
    assert rel["edges"].shape == (11,) and rel["edges"][0] == 0.0 and rel["edges"][-1] == 1.0
    assert np.isnan(rel["confidence"][4]) and np.isnan(rel["frequency"][4])
    assert rel["confidence"][9] == 1.0 and rel["frequency"][3] == 1.0
    for n_bins in (3, 7, 10, 15):  # each edge value starts its own bin
        edges = np.arange(n_bins) / n_bins
        assert scores.reliability(edges, np.zeros(n_bins), n_bins)["count"].tolist() == [1] * n_bins


# --- average precision -----------------------------------------------------------------------------------------------


def _ap_loop(p, y):
    pos = sum(y)
    if pos == 0:
        return None
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(p), reverse=True):
        tp = sum(1 for pi, yi in zip(p, y) if pi >= t and yi)
        n_pred = sum(1 for pi in p if pi >= t)
        recall = tp / pos
        ap += (recall - prev_recall) * (tp / n_pred)
        prev_recall = recall
    return ap


def test_average_precision_known_values():
    assert scores.average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.8333333333, abs=1e-10)
    assert scores.average_precision([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert scores.average_precision([0.9, 0.1], [1, 0]) == 1.0
    assert scores.average_precision([0.9, 0.1, 0.1], [0, 1, 0]) == pytest.approx(0.5 * 1 / 3 / 0.5)
    assert scores.average_precision([0.3, 0.2], [0, 0]) is None
    assert scores.average_precision([0.3, 0.2], [False, True]) == pytest.approx(0.5)


@settings(max_examples=50, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]), st.booleans()), min_size=1, max_size=30
    )
)
def test_average_precision_matches_loop_with_ties(pairs):
    p = [a for a, _ in pairs]
    y = [int(b) for _, b in pairs]
    ref = _ap_loop(p, y)
    got = scores.average_precision(np.array(p), np.array(y))
    if ref is None:
        assert got is None
    else:
        assert got == pytest.approx(ref, rel=1e-12)
