"""ETA: straight-line distance × a road factor, over a smoothed speed.

Known limits (docs/tracking.md): no road network or traffic, so a river
between technician and home, or a jam, is invisible; the road factor
(1.35, typical for dense Chinese cities) is an average detour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Urban driving / e-bike range: below 10 km/h is a stop, not a pace; above
# 60 km/h is an expressway burst that will not last to the door.
MIN_SPEED_MPS: Final = 10 / 3.6
MAX_SPEED_MPS: Final = 60 / 3.6


@dataclass(frozen=True, slots=True)
class EtaConfig:
    road_factor: float = 1.35
    default_speed_mps: float = 25 / 3.6
    speed_alpha: float = 0.3  # weight of a new speed sample in the moving average
    eta_alpha: float = 0.35  # weight of a fresh estimate against the running one


class EtaEstimator:
    """Per technician: a smoothed speed, and an ETA that counts down between
    fixes instead of jumping with every noisy speed sample."""

    __slots__ = ("cfg", "eta_s", "eta_ts", "speed")

    def __init__(self, cfg: EtaConfig) -> None:
        self.cfg = cfg
        self.speed: float | None = None
        self.eta_s: float | None = None
        self.eta_ts: int = 0

    def reset(self) -> None:
        """Forget the running ETA (a new destination); keep the pace."""
        self.eta_s, self.eta_ts = None, 0

    def observe_speed(self, mps: float | None) -> None:
        if mps is None or mps < 0.5:  # standing still says nothing about the pace
            return
        mps = min(mps, MAX_SPEED_MPS * 2)
        a = self.cfg.speed_alpha
        self.speed = mps if self.speed is None else a * mps + (1 - a) * self.speed

    def pace(self) -> float:
        s = self.speed if self.speed is not None else self.cfg.default_speed_mps
        return min(MAX_SPEED_MPS, max(MIN_SPEED_MPS, s))

    def estimate(self, distance_m: float, ts: int, arrived_radius_m: float) -> int:
        """Seconds to the door from a fix at `ts` that is `distance_m` away."""
        if distance_m <= arrived_radius_m:
            self.eta_s, self.eta_ts = 0.0, ts
            return 0
        raw = distance_m * self.cfg.road_factor / self.pace()
        if self.eta_s is None or ts <= self.eta_ts:
            smoothed = raw
        else:
            predicted = max(0.0, self.eta_s - (ts - self.eta_ts) / 1000.0)
            smoothed = self.cfg.eta_alpha * raw + (1 - self.cfg.eta_alpha) * predicted
        self.eta_s, self.eta_ts = smoothed, ts
        return round(smoothed)
