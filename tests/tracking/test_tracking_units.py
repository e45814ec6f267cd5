"""Units of the GPS path: the point filter, the token bucket, the ETA estimator."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.rate import MemoryRateLimiter, TokenBucket
from tracking.eta import MAX_SPEED_MPS, MIN_SPEED_MPS, EtaConfig, EtaEstimator
from tracking.geo import haversine_m
from tracking.locations import MAX_FUTURE_MS, FilterConfig, Point, check_point

NOW = 1_800_000_000_000
LAT, LNG = 31.2304, 121.4737
CFG = FilterConfig()
M_PER_DEG_LAT = haversine_m(0, 0, 1, 0)


def north(metres: float) -> float:
    return LAT + metres / M_PER_DEG_LAT


# -- check_point -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("lat", "lng"), [
    (math.nan, LNG), (LAT, math.nan), (math.inf, LNG), (LAT, -math.inf),
    (90.0001, LNG), (-90.0001, LNG), (LAT, 180.0001), (LAT, -180.0001), (1000, 1000),
])
def test_non_finite_or_out_of_range_is_invalid(lat: float, lng: float) -> None:
    assert check_point(Point(lat, lng, NOW), None, CFG, NOW) == "out_of_range"
    assert check_point(Point(lat, lng, NOW), Point(LAT, LNG, NOW - 1000), CFG, NOW) == "out_of_range"


@pytest.mark.parametrize(("lat", "lng"), [(90, 180), (-90, -180), (0, 0), (LAT, LNG)])
def test_range_bounds_are_accepted(lat: float, lng: float) -> None:
    assert check_point(Point(lat, lng, NOW), None, CFG, NOW) is None


def test_future_timestamp() -> None:
    assert check_point(Point(LAT, LNG, NOW + MAX_FUTURE_MS), None, CFG, NOW) is None
    assert check_point(Point(LAT, LNG, NOW + MAX_FUTURE_MS + 1), None, CFG, NOW) == "future"
    assert check_point(Point(LAT, LNG, NOW + 3_600_000), None, CFG, NOW) == "future"
    assert MAX_FUTURE_MS == 30_000
    # Old points are fine when nothing newer was accepted (a phone back online).
    assert check_point(Point(LAT, LNG, NOW - 86_400_000), None, CFG, NOW) is None


def test_stale() -> None:
    last = Point(LAT, LNG, NOW - 10_000)
    assert check_point(Point(LAT, LNG, NOW - 10_000), last, CFG, NOW) == "stale"
    assert check_point(Point(LAT, LNG, NOW - 20_000), last, CFG, NOW) == "stale"
    assert check_point(Point(LAT, LNG, NOW - 9_999), last, CFG, NOW) is None


def test_teleport_boundary() -> None:
    last = Point(LAT, LNG, NOW - 10_000)
    # 10 s later: 690 m is 69 m/s (fine), 710 m is 71 m/s (impossible).
    assert check_point(Point(north(690), LNG, NOW), last, CFG, NOW) is None
    assert check_point(Point(north(710), LNG, NOW), last, CFG, NOW) == "teleport"
    # Across the world in a second.
    assert check_point(Point(-LAT, -LNG, NOW - 9_000), last, CFG, NOW) == "teleport"
    # The limit is configurable.
    slow = FilterConfig(max_speed_mps=10.0)
    assert check_point(Point(north(150), LNG, NOW), last, slow, NOW) == "teleport"
    assert check_point(Point(north(90), LNG, NOW), last, slow, NOW) is None


def test_inaccurate() -> None:
    assert check_point(Point(LAT, LNG, NOW, accuracy=200.0), None, CFG, NOW) is None
    assert check_point(Point(LAT, LNG, NOW, accuracy=200.5), None, CFG, NOW) == "inaccurate"
    assert check_point(Point(LAT, LNG, NOW, accuracy=5000), Point(LAT, LNG, NOW - 1000), CFG,
                       NOW) == "inaccurate"
    assert check_point(Point(LAT, LNG, NOW, accuracy=300), None, FilterConfig(max_accuracy_m=500),
                       NOW) is None


def test_invalid_wins_over_other_reasons() -> None:
    last = Point(LAT, LNG, NOW)
    assert check_point(Point(math.nan, LNG, NOW - 5000, accuracy=9999), last, CFG, NOW) == "out_of_range"


# -- TokenBucket -----------------------------------------------------------------------------------

def test_token_bucket_burst_then_rate() -> None:
    b = TokenBucket(rate=1.0, burst=2.0)
    t0 = b.stamp
    assert b.take(t0) == 0
    assert b.take(t0) == 0
    wait = b.take(t0)
    assert wait == 1000
    assert b.take(t0 + 0.5) == 500  # half a token back: half the wait left
    assert b.take(t0 + 1.0) == 0  # a whole token after a second
    assert b.take(t0 + 1.0) > 0


def test_token_bucket_never_exceeds_burst() -> None:
    b = TokenBucket(rate=5.0, burst=3.0)
    t0 = b.stamp
    later = t0 + 3600  # an hour idle refills to the burst, not to 18000 tokens
    assert [b.take(later) for _ in range(3)] == [0, 0, 0]
    assert b.take(later) > 0


def test_token_bucket_retry_after_is_positive_and_accurate() -> None:
    b = TokenBucket(rate=4.0, burst=1.0)
    t0 = b.stamp
    assert b.take(t0) == 0
    wait = b.take(t0)
    assert wait == 250
    assert b.take(t0 + wait / 1000) == 0
    # Tiny fractions round up to at least 1 ms, never 0 (0 means "taken").
    b2 = TokenBucket(rate=1000.0, burst=1.0)
    s = b2.stamp
    assert b2.take(s) == 0
    assert b2.take(s + 0.000999) >= 1


def test_memory_rate_limiter_keys_are_independent() -> None:
    lim = MemoryRateLimiter(rate=1.0, burst=1.0)
    assert lim.take("a") == 0
    assert lim.take("a") > 0
    assert lim.take("b") == 0


def test_memory_rate_limiter_never_forgets_a_drained_bucket() -> None:
    """Flooding new keys must not reset a technician who is being limited."""
    lim = MemoryRateLimiter(rate=0.001, burst=1.0, max_keys=2)
    assert lim.take("a") == 0
    assert lim.take("a") > 0
    for k in ("b", "c", "d", "e"):
        lim.take(k)
    assert lim.take("a") > 0


# -- EtaEstimator ----------------------------------------------------------------------------------

def test_eta_zero_inside_radius() -> None:
    e = EtaEstimator(EtaConfig())
    assert e.estimate(99.0, NOW, 100.0) == 0
    assert e.estimate(100.0, NOW + 1000, 100.0) == 0
    assert e.estimate(0.0, NOW + 2000, 100.0) == 0
    assert e.eta_s == 0.0


def test_eta_first_estimate_uses_default_pace_and_road_factor() -> None:
    cfg = EtaConfig()
    e = EtaEstimator(cfg)
    assert e.pace() == pytest.approx(25 / 3.6)
    assert e.estimate(1000.0, NOW, 100.0) == round(1000 * 1.35 / (25 / 3.6))


def test_eta_speed_is_clamped() -> None:
    e = EtaEstimator(EtaConfig())
    e.observe_speed(0.2)  # standing still: no information
    assert e.speed is None
    e.observe_speed(1.0)  # walking pace: clamped up to 10 km/h
    assert e.pace() == pytest.approx(MIN_SPEED_MPS)
    e2 = EtaEstimator(EtaConfig())
    e2.observe_speed(500.0)  # GPS spike
    assert e2.speed == pytest.approx(MAX_SPEED_MPS * 2)
    assert e2.pace() == pytest.approx(MAX_SPEED_MPS)
    e3 = EtaEstimator(EtaConfig())
    e3.observe_speed(None)
    assert e3.pace() == pytest.approx(25 / 3.6)


def test_eta_speed_is_smoothed() -> None:
    e = EtaEstimator(EtaConfig(speed_alpha=0.3))
    e.observe_speed(10.0)
    assert e.speed == pytest.approx(10.0)
    e.observe_speed(20.0)
    assert e.speed == pytest.approx(0.3 * 20 + 0.7 * 10)


def test_eta_counts_down_between_fixes_and_blends() -> None:
    cfg = EtaConfig(eta_alpha=0.35)
    e = EtaEstimator(cfg)
    e.observe_speed(10.0)
    first = e.estimate(2000.0, NOW, 100.0)
    assert first == round(2000 * 1.35 / 10)  # 270
    # 10 s later, 100 m closer: blend of the fresh estimate and the countdown.
    second = e.estimate(1900.0, NOW + 10_000, 100.0)
    raw, predicted = 1900 * 1.35 / 10, 270 - 10
    assert second == round(0.35 * raw + 0.65 * predicted)
    assert second < first
    # A fix that is not newer than the last estimate is taken raw, not blended.
    assert e.estimate(1000.0, NOW + 10_000, 100.0) == round(1000 * 1.35 / 10)


def test_eta_one_noisy_fix_does_not_jump() -> None:
    e = EtaEstimator(EtaConfig())
    e.observe_speed(10.0)
    base = e.estimate(3000.0, NOW, 100.0)
    # A fix 10 s later that (by GPS noise) looks 1 km further away.
    noisy = e.estimate(4000.0, NOW + 10_000, 100.0)
    raw = round(4000 * 1.35 / 10)
    assert base - 10 < noisy < raw


def test_eta_decreases_along_an_approach() -> None:
    e = EtaEstimator(EtaConfig())
    etas = []
    for i in range(10):
        e.observe_speed(10.0 if i else None)
        etas.append(e.estimate(1000.0 - 100 * i, NOW + 10_000 * i, 100.0))
    assert all(b < a for a, b in itertools.pairwise(etas)), etas
    assert etas[-1] == 0


def test_position_row_round_trip() -> None:
    from tracking.positions import Position

    full = Position("t-1", 31.2304, 121.4737, 1_700_000_000_000, "张师傅", 3.5, 270.0, 8.0, "o-1",
                    120, 900, "busy", ("plumbing", "repair"))
    bare = Position("t-2", -33.9, 151.2, 1)
    for pos in (full, bare):
        row = json.loads(json.dumps(pos.as_row()))  # as it crosses between nodes
        assert Position.from_row(row) == pos


# -- the GPS fast path's point check agrees with the pydantic model -------------------------------

_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**60), 2**60), st.floats(allow_nan=True),
    st.sampled_from([0, 1, -1, 90, -90, 180, -180, 360, 1000, 100_000, 2**53 - 1, 2**53, 90.0001,
                     31.2304, 121.4737, 1_700_000_000_000]),
    st.text(max_size=5), st.sampled_from(["wgs84", "gcj02", "bd09", "WGS84"]),
    st.lists(st.integers(), max_size=2))
_keys = st.sampled_from(["lat", "lng", "ts", "accuracy", "speed", "heading", "coord_sys", "extra"])


def _near(lo: float, hi: float) -> st.SearchStrategy[Any]:
    return st.one_of(st.floats(lo - 1, hi + 1), st.integers(int(lo) - 1, int(hi) + 1), st.booleans(),
                     st.none(), st.sampled_from([lo, hi, float("inf"), float("nan")]))


_mostly_valid = st.fixed_dictionaries(
    {"lat": _near(-90, 90), "lng": _near(-180, 180),
     "ts": st.one_of(st.integers(-1, 2**53), st.floats(0, 1e6), st.booleans())},
    optional={"accuracy": _near(0, 100_000), "speed": _near(0, 1000), "heading": _near(0, 360),
              "coord_sys": st.sampled_from(["wgs84", "gcj02", "bd09", "x", None])})


@given(st.one_of(st.dictionaries(_keys, _values, max_size=8), _mostly_valid))
@settings(max_examples=3000, deadline=None)
def test_fast_point_accepts_only_what_the_model_accepts_and_gives_the_same_point(
        body: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from realtime.namespaces.tracking import PointIn, fast_point

    fast = fast_point(body)
    try:
        model = PointIn.model_validate(body).to_point()
    except ValidationError:
        assert fast is None, body
        return
    if fast is not None:
        assert fast == model, body
        assert [type(v) for v in vars_of(fast)] == [type(v) for v in vars_of(model)], body


@pytest.mark.parametrize("body", [
    {"lat": 31.2304, "lng": 121.4737, "ts": 1_700_000_000_000},
    {"lat": 31, "lng": 121, "ts": 1, "accuracy": 5, "speed": 0, "heading": 360, "coord_sys": "gcj02"},
    {"lat": -90, "lng": 180.0, "ts": 2**53 - 1, "accuracy": None, "speed": 12.5, "coord_sys": "bd09"},
])
def test_fast_point_takes_what_apps_send(body: dict[str, Any]) -> None:
    from realtime.namespaces.tracking import PointIn, fast_point

    fast = fast_point(body)
    assert fast is not None and fast == PointIn.model_validate(body).to_point()


def vars_of(p: Point) -> list[Any]:
    return [p.lat, p.lng, p.ts, p.accuracy, p.speed, p.heading]
