"""Distances and China's map coordinate systems.

GPS gives WGS-84. Maps in mainland China draw in GCJ-02 (Amap, Tencent) or
BD-09 (Baidu); a point in the wrong system is off by hundreds of metres. The
server keeps WGS-84 and converts at the edge, both ways. The forward
transforms are the published GCJ-02/BD-09 formulas; the inverses have no
closed form and are solved by fixed-point iteration to well under a
centimetre. Outside mainland China (by the customary bounding box) every
system is WGS-84.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final, Literal

CoordSys = Literal["wgs84", "gcj02", "bd09"]
EARTH_RADIUS_M: Final = 6_371_008.8
# Krasovsky 1940 ellipsoid, used by the GCJ-02 transform.
_A: Final = 6378245.0
_EE: Final = 0.00669342162296594323
_X_PI: Final = math.pi * 3000.0 / 180.0
# Iterative inverses stop at 1e-10 degrees (~0.01 mm).
_EPS: Final = 1e-10
_MAX_ITER: Final = 30


def haversine_m(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lng2 - lng1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def in_mainland_china(lat: float, lng: float) -> bool:
    """The customary bounding box the map SDKs use for "apply GCJ-02"."""
    return 72.004 <= lng <= 137.8347 and 0.8293 <= lat <= 55.8271


def _d_lat(x: float, y: float) -> float:
    r = -100.0 + 2.0 * x + 3.0 * y + 0.2 * y * y + 0.1 * x * y + 0.2 * math.sqrt(abs(x))
    r += (20.0 * math.sin(6.0 * x * math.pi) + 20.0 * math.sin(2.0 * x * math.pi)) * 2.0 / 3.0
    r += (20.0 * math.sin(y * math.pi) + 40.0 * math.sin(y / 3.0 * math.pi)) * 2.0 / 3.0
    r += (160.0 * math.sin(y / 12.0 * math.pi) + 320.0 * math.sin(y * math.pi / 30.0)) * 2.0 / 3.0
    return r


def _d_lng(x: float, y: float) -> float:
    r = 300.0 + x + 2.0 * y + 0.1 * x * x + 0.1 * x * y + 0.1 * math.sqrt(abs(x))
    r += (20.0 * math.sin(6.0 * x * math.pi) + 20.0 * math.sin(2.0 * x * math.pi)) * 2.0 / 3.0
    r += (20.0 * math.sin(x * math.pi) + 40.0 * math.sin(x / 3.0 * math.pi)) * 2.0 / 3.0
    r += (150.0 * math.sin(x / 12.0 * math.pi) + 300.0 * math.sin(x / 30.0 * math.pi)) * 2.0 / 3.0
    return r


def wgs84_to_gcj02(lat: float, lng: float) -> tuple[float, float]:
    if not in_mainland_china(lat, lng):
        return lat, lng
    dlat = _d_lat(lng - 105.0, lat - 35.0)
    dlng = _d_lng(lng - 105.0, lat - 35.0)
    rad = lat / 180.0 * math.pi
    magic = 1 - _EE * math.sin(rad) ** 2
    sq = math.sqrt(magic)
    dlat = (dlat * 180.0) / ((_A * (1 - _EE)) / (magic * sq) * math.pi)
    dlng = (dlng * 180.0) / (_A / sq * math.cos(rad) * math.pi)
    return lat + dlat, lng + dlng


def gcj02_to_bd09(lat: float, lng: float) -> tuple[float, float]:
    z = math.sqrt(lng * lng + lat * lat) + 0.00002 * math.sin(lat * _X_PI)
    theta = math.atan2(lat, lng) + 0.000003 * math.cos(lng * _X_PI)
    return z * math.sin(theta) + 0.006, z * math.cos(theta) + 0.0065


def _invert(forward: Callable[[float, float], tuple[float, float]],
            lat: float, lng: float) -> tuple[float, float]:
    """Solve forward(w) = (lat, lng) for w by fixed-point iteration; the
    transforms are near-identity shifts, so this converges in a few steps."""
    wlat, wlng = lat, lng
    for _ in range(_MAX_ITER):
        glat, glng = forward(wlat, wlng)
        elat, elng = glat - lat, glng - lng
        wlat, wlng = wlat - elat, wlng - elng
        if abs(elat) < _EPS and abs(elng) < _EPS:
            break
    return wlat, wlng


def gcj02_to_wgs84(lat: float, lng: float) -> tuple[float, float]:
    if not in_mainland_china(lat, lng):
        return lat, lng
    return _invert(wgs84_to_gcj02, lat, lng)


def bd09_to_gcj02(lat: float, lng: float) -> tuple[float, float]:
    return _invert(gcj02_to_bd09, lat, lng)


def to_wgs84(lat: float, lng: float, system: CoordSys) -> tuple[float, float]:
    if system == "wgs84" or not in_mainland_china(lat, lng):
        return lat, lng
    if system == "bd09":
        lat, lng = bd09_to_gcj02(lat, lng)
    return gcj02_to_wgs84(lat, lng)


def from_wgs84(lat: float, lng: float, system: CoordSys) -> tuple[float, float]:
    if system == "wgs84" or not in_mainland_china(lat, lng):
        return lat, lng
    lat, lng = wgs84_to_gcj02(lat, lng)
    if system == "bd09":
        return gcj02_to_bd09(lat, lng)
    return lat, lng
