"""A technician's ratings, accumulated (docs/feedback.md, Ratings).

Every `rate` of an order adds to its technician's aggregate in the same
transaction: the count and sum of stars, of each dimension (quality,
attitude, efficiency), and of each day (for the last 30 days). What is
shown is derived from those sums:

- `mean`: the plain average of the stars;
- `bayes`: the Bayesian average against the fleet, (C*m + sum) / (C + n),
  with m the fleet's mean (every rating of every technician) and C =
  PRIOR_WEIGHT ratings. A newcomer starts at the fleet's mean, and five
  stars from one customer do not put them above a technician with four
  hundred ratings averaging 4.8 (IMDb's top list and the ride-hailing
  apps rank the same way);
- `last_30d`: count and mean of the last 30 days (the dashboard's "lately").

A rating of LOW_STARS or less, in the stars or any dimension, opens a
follow-up feedback item, linked to the order and the technician.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

DIMENSIONS: Final = ("quality", "attitude", "efficiency")
# The prior's weight, in ratings: how many ratings it takes before a
# technician's own mean counts as much as the fleet's.
PRIOR_WEIGHT: Final = 10
# With no rating anywhere yet, the fleet's mean is taken to be this.
DEFAULT_FLEET_MEAN: Final = 4.5
LOW_STARS: Final = 2
RECENT_DAYS: Final = 30
DAY_MS: Final = 86_400_000


def day_key(ts_ms: int) -> str:
    """The UTC day of a rating (the 30-day window is counted in whole days)."""
    return dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).strftime("%Y%m%d")


def increments(rating: dict[str, Any]) -> dict[str, int]:
    """What one rating adds to its technician's aggregate ($inc)."""
    stars = int(rating["stars"])
    inc = {"n": 1, "sum": stars, f"days.{day_key(int(rating['ts']))}.n": 1,
           f"days.{day_key(int(rating['ts']))}.sum": stars}
    for dim in DIMENSIONS:
        if rating.get(dim) is not None:
            inc[f"dims.{dim}.n"] = 1
            inc[f"dims.{dim}.sum"] = int(rating[dim])
    return inc


def stale_days(doc: dict[str, Any], now_ms: int) -> list[str]:
    """Day buckets older than the window (to drop after the write)."""
    oldest = day_key(now_ms - RECENT_DAYS * DAY_MS)
    return [d for d in (doc.get("days") or {}) if d < oldest]


def bayes(n: int, total: float, fleet_mean: float) -> float:
    return (PRIOR_WEIGHT * fleet_mean + total) / (PRIOR_WEIGHT + n)


def aggregate(doc: dict[str, Any] | None, fleet_mean: float, now_ms: int) -> dict[str, Any]:
    """The aggregate as shown: count, mean, dimension means, Bayesian
    average, last 30 days (rounded to 2 decimals)."""
    doc = doc or {}
    n, total = int(doc.get("n", 0)), float(doc.get("sum", 0))
    dims = doc.get("dims") or {}
    oldest = day_key(now_ms - RECENT_DAYS * DAY_MS)
    recent_n = recent_sum = 0
    for day, bucket in (doc.get("days") or {}).items():
        if day >= oldest:
            recent_n += int(bucket.get("n", 0))
            recent_sum += int(bucket.get("sum", 0))
    return {
        "count": n,
        "mean": round(total / n, 2) if n else None,
        "bayes": round(bayes(n, total, fleet_mean), 2),
        "fleet_mean": round(fleet_mean, 4),
        "prior_weight": PRIOR_WEIGHT,
        "dimensions": {d: (round(dims[d]["sum"] / dims[d]["n"], 2)
                           if d in dims and dims[d].get("n") else None) for d in DIMENSIONS},
        "last_30d": {"count": recent_n,
                     "mean": round(recent_sum / recent_n, 2) if recent_n else None},
    }


def is_low(rating: dict[str, Any]) -> bool:
    return any(rating.get(k) is not None and int(rating[k]) <= LOW_STARS
               for k in ("stars", *DIMENSIONS))


def follow_up_id(order_id: str) -> str:
    """One follow-up per order (an order is rated once): its id says so."""
    return f"fu-{order_id}"
