"""tracking.geo: WGS-84 / GCJ-02 / BD-09 conversions and distances, as properties.

The server keeps WGS-84 and converts at the edge both ways (PROTOCOL.md,
"Tracking"): a point that goes out in one system and comes back must land
where it started, to well under a metre, anywhere in mainland China; outside
China every system is WGS-84, so every conversion is the identity.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tracking.geo import (
    EARTH_RADIUS_M,
    CoordSys,
    bd09_to_gcj02,
    from_wgs84,
    gcj02_to_bd09,
    gcj02_to_wgs84,
    haversine_m,
    in_mainland_china,
    to_wgs84,
    wgs84_to_gcj02,
)

SYSTEMS: tuple[CoordSys, ...] = ("wgs84", "gcj02", "bd09")
ROUND_TRIP_M = 1.0
# One degree of arc on the sphere the module uses.
DEGREE_M = 2 * math.pi * EARTH_RADIUS_M / 360

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

china_lat = st.floats(min_value=18.0, max_value=53.0, allow_nan=False, allow_infinity=False)
china_lng = st.floats(min_value=74.0, max_value=135.0, allow_nan=False, allow_infinity=False)
any_lat = st.floats(min_value=-90.0, max_value=90.0, allow_nan=False, allow_infinity=False)
any_lng = st.floats(min_value=-180.0, max_value=180.0, allow_nan=False, allow_infinity=False)
# West of China (the Americas, Europe, Africa, most of Asia west of Xinjiang).
west_lng = st.floats(min_value=-180.0, max_value=60.0, allow_nan=False, allow_infinity=False)
# South of the box (0.8293°N), at China's longitudes: Indonesia, Australia, the Southern Ocean.
south_lat = st.floats(min_value=-90.0, max_value=0.5, allow_nan=False, allow_infinity=False)

# Cities: (name, WGS-84 lat, lng).
CITIES = [
    ("beijing", 39.9042, 116.4074),
    ("shanghai", 31.2304, 121.4737),
    ("guangzhou", 23.1291, 113.2644),
    ("shenzhen", 22.5431, 114.0579),
    ("chengdu", 30.5728, 104.0668),
    ("urumqi", 43.8256, 87.6168),
    ("harbin", 45.8038, 126.5349),
    ("lhasa", 29.6520, 91.1721),
]


def china_point(lat: float, lng: float) -> None:
    assume(in_mainland_china(lat, lng))


# -- round trips inside mainland China ---------------------------------------------------------

@PROPS
@given(china_lat, china_lng)
@example(31.2304, 121.4737)
@example(18.0, 74.0)
@example(53.0, 135.0)
def test_wgs84_gcj02_wgs84_round_trip(lat: float, lng: float) -> None:
    china_point(lat, lng)
    glat, glng = wgs84_to_gcj02(lat, lng)
    back = gcj02_to_wgs84(glat, glng)
    assert haversine_m(lat, lng, *back) < ROUND_TRIP_M, (lat, lng, back)
    # The same through the edge functions the namespace uses.
    assert from_wgs84(lat, lng, "gcj02") == (glat, glng)
    assert haversine_m(lat, lng, *to_wgs84(glat, glng, "gcj02")) < ROUND_TRIP_M


@PROPS
@given(china_lat, china_lng)
@example(39.9042, 116.4074)
def test_wgs84_bd09_wgs84_round_trip(lat: float, lng: float) -> None:
    china_point(lat, lng)
    blat, blng = from_wgs84(lat, lng, "bd09")
    back = to_wgs84(blat, blng, "bd09")
    assert haversine_m(lat, lng, *back) < ROUND_TRIP_M, (lat, lng, back)


@PROPS
@given(china_lat, china_lng)
@example(22.5431, 114.0579)
def test_gcj02_wgs84_gcj02_round_trip(lat: float, lng: float) -> None:
    china_point(lat, lng)
    w = gcj02_to_wgs84(lat, lng)
    again = wgs84_to_gcj02(*w)
    assert haversine_m(lat, lng, *again) < ROUND_TRIP_M, (lat, lng, w, again)
    w2 = to_wgs84(lat, lng, "gcj02")
    assert haversine_m(lat, lng, *from_wgs84(*w2, "gcj02")) < ROUND_TRIP_M


@PROPS
@given(china_lat, china_lng)
def test_bd09_wgs84_bd09_round_trip(lat: float, lng: float) -> None:
    china_point(lat, lng)
    w = to_wgs84(lat, lng, "bd09")
    assert haversine_m(lat, lng, *from_wgs84(*w, "bd09")) < ROUND_TRIP_M


@PROPS
@given(china_lat, china_lng)
def test_gcj02_bd09_gcj02_round_trip(lat: float, lng: float) -> None:
    china_point(lat, lng)
    assert haversine_m(lat, lng, *bd09_to_gcj02(*gcj02_to_bd09(lat, lng))) < ROUND_TRIP_M


@PROPS
@given(china_lat, china_lng)
def test_offsets_in_china_are_real_and_bounded(lat: float, lng: float) -> None:
    """Inside China the systems really differ (else the round trips above prove
    nothing), by the customary tens to hundreds of metres, never kilometres."""
    china_point(lat, lng)
    gcj_off = haversine_m(lat, lng, *wgs84_to_gcj02(lat, lng))
    bd_off = haversine_m(lat, lng, *from_wgs84(lat, lng, "bd09"))
    assert 1.0 < gcj_off < 1500.0, gcj_off
    assert 1.0 < bd_off < 2500.0, bd_off


@PROPS
@given(china_lat, china_lng)
def test_wgs84_is_identity_everywhere(lat: float, lng: float) -> None:
    assert to_wgs84(lat, lng, "wgs84") == (lat, lng)
    assert from_wgs84(lat, lng, "wgs84") == (lat, lng)


# -- outside China every conversion is the identity --------------------------------------------

def _assert_identity(lat: float, lng: float) -> None:
    assert not in_mainland_china(lat, lng)
    assert wgs84_to_gcj02(lat, lng) == (lat, lng)
    assert gcj02_to_wgs84(lat, lng) == (lat, lng)
    for cs in SYSTEMS:
        assert to_wgs84(lat, lng, cs) == (lat, lng), cs
        assert from_wgs84(lat, lng, cs) == (lat, lng), cs


@PROPS
@given(any_lat, west_lng)
@example(51.4779, -0.0015)  # Greenwich
@example(40.7128, -74.0060)  # New York
@example(-33.9249, 18.4241)  # Cape Town
def test_outside_china_west_is_identity(lat: float, lng: float) -> None:
    assume(not in_mainland_china(lat, lng))
    _assert_identity(lat, lng)


@PROPS
@given(south_lat, china_lng)
@example(-6.2088, 106.8456)  # Jakarta
def test_outside_china_south_is_identity(lat: float, lng: float) -> None:
    _assert_identity(lat, lng)


@PROPS
@given(any_lat, st.floats(min_value=138.0, max_value=180.0))
@example(35.6762, 139.6503)  # Tokyo
@example(-33.8688, 151.2093)  # Sydney
def test_outside_china_east_is_identity(lat: float, lng: float) -> None:
    _assert_identity(lat, lng)


# -- reference values -----------------------------------------------------------------------------

# Published WGS-84 -> GCJ-02 reference pairs (the eviltransform project's test
# vectors; the first is Shanghai Pudong): (wgs lat, wgs lng, gcj lat, gcj lng).
GCJ_REFERENCE = [
    (31.1774276, 121.5272106, 31.17530398364597, 121.531541859215),
    (22.543847, 113.912316, 22.540796131694766, 113.9171764808363),
    (39.911954, 116.377817, 39.91334545536069, 116.38404722455657),
]


@pytest.mark.parametrize(("wlat", "wlng", "glat", "glng"), GCJ_REFERENCE)
def test_gcj02_reference_values(wlat: float, wlng: float, glat: float, glng: float) -> None:
    assert haversine_m(*wgs84_to_gcj02(wlat, wlng), glat, glng) < 0.05
    assert haversine_m(*gcj02_to_wgs84(glat, glng), wlat, wlng) < 0.05


def test_shanghai_gcj02_offset_is_hundreds_of_metres() -> None:
    """People's Square, Shanghai: the GCJ-02 marker sits several hundred metres
    off the GPS fix, mostly east (the well-known "Mars offset")."""
    lat, lng = 31.2304, 121.4737
    glat, glng = wgs84_to_gcj02(lat, lng)
    off = haversine_m(lat, lng, glat, glng)
    assert 300.0 <= off <= 700.0, off
    assert glng > lng  # eastward in Shanghai
    # BD-09 adds its own offset on top of GCJ-02 (about 0.006° in each axis).
    blat, blng = gcj02_to_bd09(glat, glng)
    assert 500.0 <= haversine_m(glat, glng, blat, blng) <= 1200.0
    assert blat > glat and blng > glng


@pytest.mark.parametrize(("name", "lat", "lng"), CITIES)
def test_cities_round_trip_to_the_centimetre(name: str, lat: float, lng: float) -> None:
    for cs in ("gcj02", "bd09"):
        there = from_wgs84(lat, lng, cs)
        assert haversine_m(lat, lng, *there) > 100.0, (name, cs)
        assert haversine_m(lat, lng, *to_wgs84(*there, cs)) < 0.01, (name, cs)


# -- haversine -----------------------------------------------------------------------------------

def test_haversine_known_distances() -> None:
    assert haversine_m(31.2304, 121.4737, 31.2304, 121.4737) == 0.0
    # One degree of latitude anywhere, and of longitude on the equator.
    assert haversine_m(0, 0, 1, 0) == pytest.approx(DEGREE_M, rel=1e-9)
    assert haversine_m(45, 10, 46, 10) == pytest.approx(DEGREE_M, rel=1e-9)
    assert haversine_m(0, 0, 0, 1) == pytest.approx(DEGREE_M, rel=1e-9)
    assert DEGREE_M == pytest.approx(111_195, abs=1)
    # One degree of longitude at 60°N is half of one at the equator.
    assert haversine_m(60, 0, 60, 1) == pytest.approx(DEGREE_M / 2, rel=1e-4)
    # Pole to pole and antipodes: half the circumference.
    assert haversine_m(90, 0, -90, 0) == pytest.approx(math.pi * EARTH_RADIUS_M, rel=1e-9)
    assert haversine_m(0, 0, 0, 180) == pytest.approx(math.pi * EARTH_RADIUS_M, rel=1e-9)
    assert haversine_m(31.2304, 121.4737, -31.2304, -58.5263) == pytest.approx(
        math.pi * EARTH_RADIUS_M, rel=1e-6)
    # Beijing (Tiananmen) to Shanghai (People's Square): about 1068 km.
    assert haversine_m(39.9042, 116.4074, 31.2304, 121.4737) == pytest.approx(1_067_000, rel=0.005)
    # Across the antimeridian: 179.5°E to 179.5°W is one degree, not 359.
    assert haversine_m(0, 179.5, 0, -179.5) == pytest.approx(DEGREE_M, rel=1e-9)
    # 100 m north of the order address used by the wire tests.
    assert haversine_m(31.2304, 121.4737, 31.2304 + 100 / DEGREE_M, 121.4737) == pytest.approx(100, abs=1e-6)


@PROPS
@given(any_lat, any_lng, any_lat, any_lng)
def test_haversine_is_a_metric(lat1: float, lng1: float, lat2: float, lng2: float) -> None:
    d = haversine_m(lat1, lng1, lat2, lng2)
    assert 0.0 <= d <= math.pi * EARTH_RADIUS_M + 1e-6
    assert d == pytest.approx(haversine_m(lat2, lng2, lat1, lng1), abs=1e-6)
    assert haversine_m(lat1, lng1, lat1, lng1) == 0.0


@PROPS
@given(any_lat, any_lng, any_lat, any_lng, any_lat, any_lng)
def test_haversine_triangle_inequality(a1: float, o1: float, a2: float, o2: float,
                                       a3: float, o3: float) -> None:
    assert haversine_m(a1, o1, a3, o3) <= (
        haversine_m(a1, o1, a2, o2) + haversine_m(a2, o2, a3, o3) + 1e-3)
