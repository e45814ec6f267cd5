"""Feedback statistics over many items, and the rating write against a
plain order event (issue 19; docs/benchmarks.md, "Feedback and ratings
(issue 19)").

    python -m loadtest.feedback_bench [--items 100000] [--requests 200]

Starts SecantusDB (the embedded store's server, a separate process, on CPU 1
with taskset) and one `python -m realtime` on it (CPU 0), as
`loadtest.quick` does; this process drives it over real HTTP and Socket.IO
(on CPU 1 once the seeding is done).

1. Seeding. `--items` feedback items over the last 60 days (in
   REALTIME_REPORT_TZ), written without HTTP (~90 items/s there) but through
   the service's own code: every item's life (created, tagged, prioritized,
   replied, the author's answers, in progress, resolved or closed, flagged
   overdue by the SLA sweep when its first response came late or never, a
   low rating's follow-up routed to an agent) is replayed through
   `FeedbackService` with the clock set to each step's time, on an
   in-memory store that keeps what each transaction would write: the item
   as it ends, every event, and each step's rollup update as
   `storage.feedback._rollup_update` encodes it. Those are then written
   in bulk: `insert_many` of items and events, one `$inc`/`$push` upsert per
   day. The outbox records of those steps are not written (the relay would
   fan out hundreds of thousands of them during the measurement; nothing
   measured reads them).
   Equivalence: a sample of `--check-items` scripts (spread over the whole
   period) is replayed twice, through `MongoFeedbackStore` (one transaction
   per step, as the server does) into one database and through the bulk
   path into another; the items, the events and the daily rollups of the
   two must be equal, or the run stops.
2. Statistics and inbox, over HTTP as an admin, one request at a time,
   the kinds of a phase interleaved (a rotating order each round), each
   phase after a 5-second sample in which the rest of the machine used
   under 40 % of a core (or 300 s): GET /api/feedback/stats for the last
   30 days (group_by=day and week) and for 60 days, `--requests` of each;
   the inbox GET /api/feedback?open=true&limit=50 and with tag= (the
   commonest tag), `--list-requests` (default 50) of each; then, apart
   (each reads every item, longer than the server waits for the store,
   which goes on with it after the 503), q= (`--q`, 漏水 "leaking") and
   tag= with q=, `--search-requests` (default 20) of each. A failed
   request is timed too and counted by status. Also recorded: the query
   plans the store chose (explain), and, from this process, the store's
   find of a period's rollups and `summarize` on them.
3. The rating write against plain order events, interleaved (rotating
   order each round): on orders made completed over HTTP (create, assign,
   en_route, arrived, in_service, completed), the customer's `rate` over
   /orders (its commit also updates the technician's aggregate, and a
   rating of <= 2 stars inserts a follow-up feedback item in the same
   transaction: `--low-share` of them), against the same customer's
   `request_refund` on another completed order (the same socket, actor,
   order state and service path; a commit with no in-transaction hook) and
   the technician's `progress` to `completed` (whose commit gives the
   schedule its time back). `--requests` of each after 5 of each not
   counted.

The summary is printed; everything, with the machine and the CPU each
process used in each window, goes to loadtest/results/feedback-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import hashlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import patch
from zoneinfo import ZoneInfo

import aiohttp
import bson
import socketio
from pymongo import AsyncMongoClient, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

import feedback.service as fs
from feedback.model import OPEN
from feedback.service import FeedbackService, NoChange, Rollup
from kernel.actor import Actor
from kernel.errors import Conflict, Forbidden
from loadtest.quick import SECRET, cpu_seconds, free_port, machine_busy_seconds, pin, server_env
from realtime.auth import mint_token
from realtime.settings import Settings
from storage.feedback import FEEDBACK_INDEXES, MongoFeedbackStore, _rollup_update

ROOT = Path(__file__).resolve().parent.parent
DAY_MS = 86_400_000
MIN_MS = 60_000
HOUR_MS = 3_600_000
DAYS = 60
WARMUP = 5
STATS_TARGET_MS = 500.0
CODE_FILES = ("feedback/service.py", "feedback/analysis.py", "feedback/ratings.py", "feedback/terms.py",
              "storage/feedback.py", "realtime/feedback_api.py", "realtime/namespaces/orders.py",
              "realtime/services.py", "orders/service.py", "storage/mongo.py")


# -- small helpers -------------------------------------------------------------
def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def r1(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def spread(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": r1(pct(values, 50)), "p90": r1(pct(values, 90)),
            "p99": r1(pct(values, 99)), "max": r1(max(values) if values else None),
            "mean": r1(statistics.fmean(values) if values else None)}


def blocks(values: list[float], n: int = 4) -> list[dict[str, Any]]:
    """p50/p99 of each consecutive quarter of a series (how much one run's
    figures move within it)."""
    size = max(1, len(values) // n)
    out = []
    for k in range(n):
        part = values[k * size:(k + 1) * size if k < n - 1 else len(values)]
        if part:
            out.append({"n": len(part), "p50": r1(pct(part, 50)), "p99": r1(pct(part, 99))})
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    versions: dict[str, str] = {}
    from importlib.metadata import PackageNotFoundError, version
    for pkg in ("SecantusDB", "pymongo", "aiohttp", "python-socketio", "jieba"):
        with contextlib.suppress(PackageNotFoundError):
            versions[pkg] = version(pkg)
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem_gib,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": versions, "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def code_fingerprint() -> dict[str, Any]:
    """The commit, whether the measured files differ from it, and their hashes."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except OSError:
            return None

    files = {}
    for name in CODE_FILES:
        with contextlib.suppress(OSError):
            files[name] = hashlib.sha256((ROOT / name).read_bytes()).hexdigest()[:12]
    dirty = git("status", "--porcelain", "--", *CODE_FILES)
    return {"git_head": git("rev-parse", "--short", "HEAD"),
            "modified_since_head": dirty.splitlines() if dirty else [], "sha256_12": files}


class Clock:
    """What `feedback.service.now_ms` returns while a script is replayed."""

    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


class Ids:
    """Item ids for `feedback.service.new_item` from a seeded generator: the
    two paths of the equivalence check give their items the same ids."""

    def __init__(self, seed: int) -> None:
        self._rnd = random.Random(seed)

    def uuid4(self) -> uuid.UUID:
        return uuid.UUID(int=self._rnd.getrandbits(128), version=4)


# -- texts ----------------------------------------------------------------------
APPLIANCES = ("空调", "冰箱", "洗衣机", "热水器", "油烟机", "燃气灶", "马桶", "水龙头", "地暖", "净水器",
              "电视", "洗碗机", "烤箱", "微波炉", "门锁", "下水道", "水管", "插座", "灯具", "浴霸",
              "新风系统", "壁挂炉", "集成灶", "烘干机", "排风扇", "智能马桶", "中央空调", "饮水机")
PROBLEMS = ("漏水", "不制冷", "不制热", "噪音很大", "有异味", "跳闸", "漏电", "不出热水", "堵塞",
            "打不着火", "显示故障代码", "开不了机", "结冰", "滴水", "震动厉害", "发霉", "松动", "渗水",
            "频繁报警", "遥控失灵", "水压太小", "温度忽高忽低", "自动断电", "排水很慢")
PLACES = ("浦东", "徐汇", "静安", "闵行", "长宁", "普陀", "杨浦", "虹口", "黄浦", "宝山", "嘉定", "松江",
          "青浦", "奉贤", "金山", "崇明")
HOMES = ("家里的", "我家", "租的房子里", "公司的", "父母家的", "店里的")
WHEN = ("昨天下午", "今天上午", "上周末", "前天晚上", "刚才", "周一早上", "这两天", "上个月", "中午")
TECHS = ("王师傅", "李师傅", "张师傅", "刘师傅", "陈师傅", "杨师傅", "赵师傅", "黄师傅", "周师傅", "吴师傅")
TECH_ISSUES = ("迟到了两个小时", "没带配件又走了", "没穿鞋套", "临时改约", "修完没有清理现场",
               "态度很好也很专业", "收了额外的上门费", "说必须换整机", "提前打电话确认时间，很贴心",
               "抽烟", "没有出示工牌", "检查得很仔细", "操作不规范", "把墙面弄脏了", "半路放弃了")
BILLING = ("收费不透明", "配件价格比网上贵很多", "发票一直没开", "重复扣款", "优惠券没有抵扣",
           "退款还没到账", "报价和最终价格不一样", "夜间加价没有提前说明", "上门费和检测费重复收",
           "会员折扣没有生效", "账单明细看不懂")
BOOKING = ("约不到周末的时间", "改约很麻烦", "上门时间窗口太长", "取消订单被扣了费", "预约成功但没人联系",
           "师傅不能按约定时间到", "预约页面一直转圈", "同一个问题要重复预约", "希望能预约晚上的时间")
APP = ("App闪退", "无法登录", "支付失败", "定位不准", "消息推送太多", "订单状态不更新", "聊天发不出图片",
       "验证码收不到", "地址保存不了", "评价提交失败", "看不到师傅的位置", "wifi环境下也很卡")
DEVICES = ("iPhone", "华为手机", "小米手机", "安卓平板", "iPad", "OPPO手机")
SUGGESTIONS = ("希望增加夜间服务", "建议上门前视频确认", "希望能选择指定师傅", "建议增加会员折扣",
               "希望支持分期付款", "建议公开配件价格表", "希望增加上门清洗套餐", "建议保修期延长到一年",
               "希望客服电话能更快接通", "建议师傅上门带好鞋套和垫布")
ASKS = ("请尽快处理", "希望给个说法", "要求退款", "请安排师傅再来一次", "麻烦回电", "希望改进",
        "已经是第二次了", "非常满意，点赞", "请核实一下", "希望尽快解决", "请给个处理时间")
DETAILS = ("订单在App里可以查到", "家里有老人小孩", "周末都在家", "已经拍了照片", "小区物业也来看过",
           "之前也修过一次", "还在保修期内", "师傅说是配件问题", "电话一直占线", "客服说会回电但是没有",
           "楼下邻居也受影响", "天气太热等不了", "用了不到三个月", "说明书上写的不一样")
RAIN = ("连续暴雨之后天花板渗水", "暴雨后外墙渗水", "暴雨以后地下室积水", "梅雨季节窗户漏水墙面发霉")
COLD = ("寒潮降温地暖不热", "寒潮以后壁挂炉频繁熄火", "降温以后水管冻裂")
REPLIES = ("您好，已经为您安排师傅再次上门，给您带来不便非常抱歉。",
           "您好，费用明细已经发到您的手机，请查收。",
           "您反馈的问题我们已经转交技术部门处理，会尽快给您答复。", "退款已经提交，预计三个工作日内到账。",
           "感谢您的建议，我们会认真考虑。", "已经联系师傅核实情况，稍后给您回电。")
USER_REPLIES = ("还是没有解决", "师傅到现在还没联系我", "好的，谢谢", "退款什么时候到账", "能不能换个师傅",
                "今天下午可以上门吗")
HIGH_COMMENTS = ("师傅很准时，修得很快", "服务专业，态度很好", "价格合理，下次还找你们", "讲解很清楚",
                 "干活利索，还帮忙清理了", "")
LOW_COMMENTS = ("师傅迟到还态度差", "修完第二天又坏了", "乱收费，配件价格太贵", "没穿鞋套，弄脏地板",
                "问题根本没解决", "说好的时间没来，也没通知")
CATEGORIES = (("service", 26), ("technician", 18), ("billing", 16), ("booking", 12), ("app", 12),
              ("suggestion", 8), ("complaint", 5), ("other", 3))
TAGS = (("repeat", 30), ("refund", 20), ("vip", 12), ("app_bug", 12), ("praise", 10), ("加急", 10),
        ("回访", 8), ("safety", 4))
AGENTS = tuple((f"agent-{k:02d}", f"客服{n}") for k, n in enumerate(
    ("小王", "小李", "小张", "小刘", "小陈", "小杨", "小赵", "小黄", "小周", "小吴", "小徐", "小孙"), 1))


def weighted(rnd: random.Random, pairs: tuple[tuple[str, int], ...]) -> str:
    return rnd.choices([p[0] for p in pairs], [p[1] for p in pairs])[0]


def feedback_text(rnd: random.Random, category: str, day: int) -> str:
    """A customer's or technician's feedback: category-shaped, some
    seasonal topics (a cold spell at the start of the period, heavy rain in
    its last twelve days, more each day)."""
    c = rnd.choice
    head = ""
    if day >= DAYS - 12 and rnd.random() < 0.04 + 0.025 * (day - (DAYS - 12)):
        head = c(RAIN) + "，"
    elif day < 15 and rnd.random() < 0.12 - 0.008 * day:
        head = c(COLD) + "，"
    if category == "service":
        text = f"{c(WHEN)}{c(PLACES)}{c(HOMES)}{c(APPLIANCES)}{c(PROBLEMS)}，{c(TECHS)}{c(TECH_ISSUES)}"
    elif category == "technician":
        text = f"{c(WHEN)}上门的{c(TECHS)}{c(TECH_ISSUES)}，修的是{c(APPLIANCES)}"
    elif category == "billing":
        text = f"{c(APPLIANCES)}维修{c(BILLING)}，{c(BILLING)}"
    elif category == "booking":
        text = f"{c(BOOKING)}，需要维修{c(APPLIANCES)}，{c(WHEN)}约的"
    elif category == "app":
        text = f"{c(APP)}，用的是{c(DEVICES)}，{c(APP)}"
    elif category == "suggestion":
        text = f"{c(SUGGESTIONS)}，{c(SUGGESTIONS)}"
    elif category == "complaint":
        text = f"投诉{c(TECHS)}{c(TECH_ISSUES)}，而且{c(BILLING)}"
    else:
        text = f"{c(APPLIANCES)}{c(PROBLEMS)}，{c(DETAILS)}"
    extra = "".join(f"，{c(DETAILS)}" for _ in range(rnd.choice((0, 0, 1, 1, 2))))
    return f"{head}{text}{extra}。{c(ASKS)}"


# -- item scripts ---------------------------------------------------------------
@dataclass
class Move:
    kind: str  # route | tags | priority | reply | user_reply | status
    t: int
    agent: str = ""
    text: str = ""
    tags: list[str] = field(default_factory=list)
    value: str = ""


@dataclass
class Script:
    """One item's life: how it is created, then its steps in time order."""

    idx: int
    ts: int
    day: int
    category: str
    body: str
    user_id: str
    user_role: str
    order_id: str | None
    technician_id: str | None
    priority: str
    source: str
    rating: dict[str, Any] | None
    agent: str
    sweep_lag_ms: int
    moves: list[Move] = field(default_factory=list)


def lognormal_ms(rnd: random.Random, median_ms: float, sigma: float, lo: float, hi: float) -> int:
    return int(min(hi, max(lo, median_ms * math.exp(rnd.gauss(0, sigma)))))


def creation_times(n: int, now: int, tz: ZoneInfo, rnd: random.Random) -> list[tuple[int, int]]:
    """(ts, day index) of n items over the DAYS local days ending today:
    more on weekends, a slow rise, daytime hours busier."""
    today = dt.datetime.fromtimestamp(now / 1000, tz).date()
    first = today - dt.timedelta(days=DAYS - 1)
    starts = [int(dt.datetime.combine(first + dt.timedelta(days=d), dt.time(), tz).timestamp() * 1000)
              for d in range(DAYS + 1)]
    weights = []
    for d in range(DAYS):
        wd = (first + dt.timedelta(days=d)).weekday()
        span = min(starts[d + 1], now - MIN_MS) - starts[d]
        weights.append(max(0.0, (1.25 if wd >= 5 else 1.0) * (1 + 0.006 * d) * span / DAY_MS))
    total = sum(weights)
    counts = [int(n * w / total) for w in weights]
    for d in sorted(range(DAYS), key=lambda d: -(n * weights[d] / total - counts[d]))[:n - sum(counts)]:
        counts[d] += 1
    hour_w = [0.2, 0.1, 0.05, 0.05, 0.05, 0.1, 0.3, 0.6, 1.0, 1.3, 1.4, 1.3, 1.1, 1.2, 1.3, 1.3,
              1.2, 1.1, 1.1, 1.2, 1.3, 1.1, 0.8, 0.4]
    out = []
    for d, k in enumerate(counts):
        span = min(starts[d + 1], now - MIN_MS) - starts[d]
        for _ in range(k):
            while True:
                off = rnd.randrange(max(1, span))
                hour = (off // HOUR_MS) % 24
                if rnd.random() < hour_w[hour] / 1.4:
                    break
            out.append((starts[d] + off, d))
    out.sort()
    return out


def make_scripts(n: int, now: int, tz: ZoneInfo, seed: int) -> list[Script]:
    rnd = random.Random(seed)
    scripts = []
    for idx, (ts, day) in enumerate(creation_times(n, now, tz, rnd)):
        agent = rnd.choice(AGENTS)[0]
        technician = f"t-{rnd.randrange(400):03d}"
        if rnd.random() < 0.04:  # a low rating's follow-up
            stars = rnd.choice((1, 2, 2))
            rating: dict[str, Any] | None = {"stars": stars, "quality": rnd.randint(1, 3),
                                             "comment": rnd.choice(LOW_COMMENTS)}
            s = Script(idx, ts, day, "rating", "", f"c-{rnd.randrange(40_000):05d}", "customer",
                       f"o-seed-{idx}", technician, "urgent" if stars <= 1 else "high", "rating",
                       rating, agent, rnd.randrange(15_000))
            s.moves.append(Move("route", ts + rnd.randrange(500, 20_000), agent))
        else:
            category = weighted(rnd, CATEGORIES)
            role = "technician" if category in ("app", "booking") and rnd.random() < 0.3 \
                else ("technician" if rnd.random() < 0.08 else "customer")
            user = technician if role == "technician" else f"c-{rnd.randrange(40_000):05d}"
            order = f"o-seed-{idx}" if rnd.random() < 0.6 else None
            s = Script(idx, ts, day, category, feedback_text(rnd, category, day), user, role, order,
                       technician if order else None,
                       rnd.choices(("low", "normal", "high", "urgent"), (5, 80, 12, 3))[0], "user",
                       None, agent, rnd.randrange(15_000))
        lifecycle(rnd, s)
        # In time order, strictly later than the previous step; what lies
        # after now has not happened yet.
        s.moves.sort(key=lambda m: m.t)
        last = ts
        kept = []
        for m in s.moves:
            m.t = max(m.t, last + 1000)
            if m.t > now - 1000:
                break
            kept.append(m)
            last = m.t
        s.moves = kept
        scripts.append(s)
    return scripts


def lifecycle(rnd: random.Random, s: Script) -> None:
    """Support's work on an item: tags, a priority, the first response (a
    lognormal around 80 min: some past the SLA), the author's answer,
    resolution or closing; a few never answered."""
    ts, agent = s.ts, s.agent
    if rnd.random() < 0.35:
        tags = [weighted(rnd, TAGS)]
        if rnd.random() < 0.3:
            second = weighted(rnd, TAGS)
            if second != tags[0]:
                tags.append(second)
        s.moves.append(Move("tags", ts + lognormal_ms(rnd, 20 * MIN_MS, 1.0, MIN_MS, 2 * DAY_MS), agent,
                            tags=tags))
    if rnd.random() < 0.05:
        s.moves.append(Move("priority", ts + lognormal_ms(rnd, 30 * MIN_MS, 1.0, MIN_MS, DAY_MS), agent,
                            value=rnd.choice(("high", "urgent", "low"))))
    r = rnd.random()
    if r < 0.04:  # handled without a written reply
        t1 = ts + lognormal_ms(rnd, 2 * HOUR_MS, 1.0, 5 * MIN_MS, 3 * DAY_MS)
        s.moves.append(Move("status", t1, agent, value="in_progress"))
        s.moves.append(Move("status", t1 + lognormal_ms(rnd, DAY_MS, 0.8, HOUR_MS, 7 * DAY_MS), agent,
                            value=rnd.choice(("resolved", "resolved", "closed"))))
        return
    if r > 0.99:  # never answered
        return
    t = ts + lognormal_ms(rnd, 80 * MIN_MS, 1.1, MIN_MS, 4 * DAY_MS)
    s.moves.append(Move("reply", t, agent, text=rnd.choice(REPLIES)))
    if rnd.random() < 0.15:  # the author answers, support again
        t += lognormal_ms(rnd, 3 * HOUR_MS, 1.0, 5 * MIN_MS, 3 * DAY_MS)
        s.moves.append(Move("user_reply", t, text=rnd.choice(USER_REPLIES)))
        t += lognormal_ms(rnd, 90 * MIN_MS, 1.0, 5 * MIN_MS, 2 * DAY_MS)
        s.moves.append(Move("reply", t, agent, text=rnd.choice(REPLIES)))
    u = rnd.random()
    if u < 0.72:
        t += lognormal_ms(rnd, 6 * HOUR_MS, 1.0, 10 * MIN_MS, 6 * DAY_MS)
        s.moves.append(Move("status", t, agent, value="resolved"))
        if rnd.random() < 0.04:  # reopened by the author, then resolved again
            t += lognormal_ms(rnd, DAY_MS, 0.8, HOUR_MS, 5 * DAY_MS)
            s.moves.append(Move("user_reply", t, text=rnd.choice(USER_REPLIES)))
            t += lognormal_ms(rnd, 4 * HOUR_MS, 1.0, 10 * MIN_MS, 3 * DAY_MS)
            s.moves.append(Move("status", t, agent, value="resolved"))
    elif u < 0.84:
        t += lognormal_ms(rnd, 8 * HOUR_MS, 1.0, 10 * MIN_MS, 6 * DAY_MS)
        s.moves.append(Move("status", t, agent, value="closed"))
    else:  # left `replied`; closed after a few days without an answer
        s.moves.append(Move("status", t + rnd.randrange(3 * DAY_MS, 5 * DAY_MS), agent, value="closed"))


# -- the stores the replay runs on ---------------------------------------------
class Collector:
    """An in-memory FeedbackStore: what each of the service's transactions
    would write (the item, its events, the rollup update exactly as the Mongo
    store encodes it), gathered for bulk writing."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.log: list[dict[str, Any]] = []  # every event, in commit order
        self.inc: dict[str, dict[str, int]] = defaultdict(dict)
        self.push: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        self.watch: set[str] = set()  # items the SLA sweep may still flag

    def _rollup(self, rollup: Rollup | None) -> None:
        if rollup is None:
            return
        update = _rollup_update(rollup)
        inc = self.inc[rollup.day]
        for key, n in update.get("$inc", {}).items():
            inc[key] = inc.get(key, 0) + n
        for key, v in update.get("$push", {}).items():
            self.push[rollup.day][key].append(v)

    def _keep(self, item: dict[str, Any]) -> None:
        if item.get("sla_due_ts") is not None and not item.get("overdue"):
            self.watch.add(item["id"])
        else:
            self.watch.discard(item["id"])

    async def insert(self, item: dict[str, Any], event: dict[str, Any], rollup: Rollup) -> bool:
        if item["id"] in self.items:
            return False
        self.items[item["id"]] = copy.deepcopy(item)
        self.log.append(copy.deepcopy(event))
        self._rollup(rollup)
        self._keep(item)
        return True

    async def get(self, feedback_id: str) -> dict[str, Any] | None:
        item = self.items.get(feedback_id)
        return copy.deepcopy(item) if item is not None else None

    async def commit(self, feedback_id: str, expected_seq: int, changes: dict[str, Any],
                     event: dict[str, Any], rollup: Rollup | None) -> dict[str, Any] | None:
        item = self.items.get(feedback_id)
        if item is None or item["seq"] != expected_seq:
            return None
        item.update(copy.deepcopy(changes))  # $set of top-level fields
        self.log.append(copy.deepcopy(event))
        self._rollup(rollup)
        self._keep(item)
        return copy.deepcopy(item)

    async def events(self, feedback_id: str, since_seq: int, limit: int,
                     public: bool) -> list[dict[str, Any]]:
        return [e for e in self.log if e["feedback_id"] == feedback_id and e["seq"] > since_seq][:limit]

    async def search(self, query: dict[str, Any], offset: int, limit: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def mine(self, user_id: str, limit: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def due(self, now: int, limit: int) -> list[dict[str, Any]]:
        found = sorted((self.items[i]["sla_due_ts"], i) for i in self.watch
                       if self.items[i]["sla_due_ts"] <= now)
        return [{"id": i} for _, i in found[:limit]]

    async def unrouted(self, limit: int) -> list[dict[str, Any]]:
        return []

    async def open_loads(self) -> dict[str, int]:
        return {}  # the replay's routing takes the script's agent, whatever the loads

    async def days(self, keys: list[str]) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def in_period(self, from_ts: int, to_ts: int) -> AsyncIterator[dict[str, Any]]:
        for item in self.items.values():
            if from_ts <= item["ts"] < to_ts:
                yield item


async def write_bulk(db: AsyncDatabase[dict[str, Any]], c: Collector, batch: int = 1000,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The collected writes in bulk: items and events with insert_many, each
    day's rollup as one upsert adding what every step added ($inc of the
    sums, keys a step touched kept even where they sum to 0, as the
    per-step $inc leaves them; $push $each in commit order)."""
    timings: dict[str, Any] = {}
    t0 = time.perf_counter()
    docs = []
    for item in c.items.values():
        doc = dict(item)
        doc["_id"] = doc.pop("id")
        docs.append(doc)
    for k in range(0, len(docs), batch):
        await db["feedback"].insert_many(docs[k:k + batch], ordered=False)
        if progress and (k // batch) % 20 == 19:
            progress(f"items {k + batch:,}/{len(docs):,}")
    timings["items_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    for k in range(0, len(c.log), batch):
        await db["feedback_events"].insert_many([dict(e) for e in c.log[k:k + batch]], ordered=False)
        if progress and (k // batch) % 25 == 24:
            progress(f"events {k + batch:,}/{len(c.log):,}")
    timings["events_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ops = []
    for day in sorted(set(c.inc) | set(c.push)):
        update: dict[str, Any] = {}
        if c.inc.get(day):
            update["$inc"] = dict(c.inc[day])
        if c.push.get(day):
            update["$push"] = {k: {"$each": v} for k, v in c.push[day].items()}
        ops.append(UpdateOne({"_id": day}, update, upsert=True))
    if ops:
        await db["feedback_daily"].bulk_write(ops, ordered=True)
    timings["rollups_s"] = round(time.perf_counter() - t0, 1)
    return {"items": len(docs), "events": len(c.log), "rollup_days": len(ops), **timings}


# -- replaying scripts ----------------------------------------------------------
async def replay(service: FeedbackService, clock: Clock, s: Script, until: int, route_to: list[str],
                 tally: Counter[str]) -> str:
    """One script through the service's own steps, the clock at each step's
    time; the SLA sweep flags the item where it would have (its due time +
    the sweep's lag) before the step that follows."""
    author = Actor(s.user_id, s.user_role)
    clock.t = s.ts
    if s.source == "rating":
        assert s.rating is not None
        order = {"order_id": s.order_id, "customer_id": s.user_id, "technician_id": s.technician_id}
        item, first, rollup = await service.follow_up(order, {**s.rating, "ts": s.ts})
        await service.store.insert(item, first, rollup)
        fid = item["id"]
    else:
        item = await service.create(author, None, category=s.category, body=s.body, order_id=s.order_id,
                                    technician_id=s.technician_id, priority=s.priority)
        fid = item["id"]
    tally["created"] += 1
    names = dict(AGENTS)
    for m in [*s.moves, Move("end", until)]:
        await sweep(service, clock, fid, m.t, s.sweep_lag_ms, tally)
        if m.kind == "end":
            break
        clock.t = m.t
        agent = Actor(m.agent, "agent")
        try:
            if m.kind == "route":
                route_to[0] = m.agent
                await service.route(fid)
            elif m.kind == "tags":
                await service.set_tags(agent, names[m.agent], fid, m.tags)
            elif m.kind == "priority":
                await service.set_priority(agent, names[m.agent], fid, m.value)
            elif m.kind == "reply":
                await service.reply(agent, names[m.agent], fid, m.text)
            elif m.kind == "user_reply":
                await service.reply(author, None, fid, m.text)
            elif m.kind == "status":
                await service.set_status(agent, names[m.agent], fid, m.value)
            tally[m.kind] += 1
        except (NoChange, Conflict, Forbidden) as exc:
            tally[f"skipped_{m.kind}_{type(exc).__name__}"] += 1
    return str(fid)


async def sweep(service: FeedbackService, clock: Clock, fid: str, before: int, lag: int,
                tally: Counter[str]) -> None:
    item = await service.store.get(fid)
    assert item is not None
    due = item.get("sla_due_ts")
    if due is None or item.get("overdue") or due + lag >= before:
        return
    clock.t = due + lag
    flagged = await service.flag_overdue(clock.t)
    tally["overdue"] += len(flagged)


def make_service(store: Any, settings: Settings, route_to: list[str]) -> FeedbackService:
    async def changed(item: dict[str, Any], event: dict[str, Any]) -> None:
        return None

    async def choose(loads: dict[str, int]) -> str | None:
        return route_to[0]

    return FeedbackService(store, changed, sla_min=settings.feedback_sla_min, tz=settings.report_tz,
                           choose_agent=choose)


async def replay_all(service: FeedbackService, scripts: list[Script], until: int, route_to: list[str],
                     seed: int, progress: Callable[[str], None] | None = None) -> Counter[str]:
    clock = Clock()
    tally: Counter[str] = Counter()
    with patch.object(fs, "now_ms", clock), patch.object(fs, "uuid", Ids(seed)):
        for k, s in enumerate(scripts):
            await replay(service, clock, s, until, route_to, tally)
            if progress and k % 10_000 == 9_999:
                progress(f"replayed {k + 1:,}/{len(scripts):,}")
    return tally


async def dump(db: AsyncDatabase[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    items = [d async for d in db["feedback"].find({}).sort("_id", 1)]
    events = [{k: v for k, v in d.items() if k != "_id"}
              async for d in db["feedback_events"].find({}).sort([("feedback_id", 1), ("seq", 1)])]
    days = [d async for d in db["feedback_daily"].find({}).sort("_id", 1)]
    return {"items": items, "events": events, "rollups": days}


def first_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str | None:
    if len(a) != len(b):
        return f"{len(a)} documents against {len(b)}"
    for x, y in zip(a, b, strict=True):
        if x != y:
            keys = sorted({k for k in set(x) | set(y) if x.get(k) != y.get(k)})
            return f"{x.get('_id', x.get('feedback_id'))}: fields {keys}: " \
                   f"{ {k: x.get(k) for k in keys} } against { {k: y.get(k) for k in keys} }"
    return None


async def check_equivalence(client: AsyncMongoClient[dict[str, Any]], db_prefix: str,
                            sample: list[Script], settings: Settings, until: int) -> dict[str, Any]:
    """The sample through MongoFeedbackStore (a transaction per step, as the
    server does) into one database, and through the bulk path into another:
    items, events and rollups must be equal."""
    ref_db, bulk_db = client[f"{db_prefix}_pertxn"], client[f"{db_prefix}_bulk"]
    route_to = [AGENTS[0][0]]
    ref_store = MongoFeedbackStore(client, ref_db)
    await ref_store.ensure_indexes()
    t0 = time.perf_counter()
    ref_tally = await replay_all(make_service(ref_store, settings, route_to), sample, until, route_to, 7)
    per_txn_s = time.perf_counter() - t0
    collector = Collector()
    bulk_tally = await replay_all(make_service(collector, settings, route_to), sample, until, route_to, 7)
    await write_bulk(bulk_db, collector)
    ref, bulk = await dump(ref_db), await dump(bulk_db)
    diffs = {k: first_difference(ref[k], bulk[k]) for k in ("items", "events", "rollups")}
    outbox = await ref_db["outbox"].count_documents({}) if "outbox" in await ref_db.list_collection_names() \
        else None
    for db in (ref_db, bulk_db):
        await client.drop_database(db.name)
    result = {"sample_items": len(sample), "items": len(ref["items"]), "events": len(ref["events"]),
              "rollup_docs": len(ref["rollups"]),
              "frt_values": sum(len(d.get("frt", [])) for d in ref["rollups"]),
              "res_values": sum(len(d.get("res", [])) for d in ref["rollups"]),
              "steps": dict(sorted(ref_tally.items())), "same_steps": ref_tally == bulk_tally,
              "outbox_records_per_txn_path": outbox,
              "per_txn_seconds": round(per_txn_s, 1),
              "equal": all(v is None for v in diffs.values()) and ref_tally == bulk_tally,
              "differences": {k: v for k, v in diffs.items() if v}}
    return result


# -- the server -----------------------------------------------------------------
class Stack:
    """SecantusDB and one `python -m realtime` on it, pinned apart."""

    def __init__(self, ttl_sweep_s: int | None = None) -> None:
        # SecantusDB's TTL sweeper walks every collection in Python (60 s by
        # default); None keeps its default, 0 turns it off.
        self.ttl_sweep_s = ttl_sweep_s
        self.tmp = Path(tempfile.mkdtemp(prefix="rt-feedback-bench-"))
        self.mongo_port, self.port = free_port(), free_port()
        self.db_name = f"fbbench_{uuid.uuid4().hex[:6]}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.settings = Settings(jwt_secret=SECRET)
        self.log_path = self.tmp / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mongo_url(self) -> str:
        return f"mongodb://127.0.0.1:{self.mongo_port}/?directConnection=true"

    def start(self) -> None:
        exe = str(Path(sys.executable).parent / "secantusd-py")
        # On disk, as the server's embedded store keeps it (<data dir>/mongo):
        # with ':memory:' the store slowed to ~20 inserts/s once it held
        # 100,000 items and some 85,000 events.
        config: list[str] = []
        if self.ttl_sweep_s is not None:
            (self.tmp / "secantusd.toml").write_text(
                f"[storage]\nttl_sweep_seconds = {self.ttl_sweep_s}\n")
            config = ["--config", str(self.tmp / "secantusd.toml")]
        with open(self.tmp / "store.log", "ab") as out:
            self.procs["store"] = subprocess.Popen(
                [*pin("1"), exe, *config, "--host", "127.0.0.1", "--port", str(self.mongo_port),
                 "--storage-path", str(self.tmp / "mongo"), "--log-level", "WARNING"],
                stdout=out, stderr=subprocess.STDOUT)
        env = server_env(self.port, self.mongo_port, self.tmp / "data", limits=False)
        env.pop("REDIS_URL", None)
        env.update({"REALTIME_MONGO_DB": self.db_name, "REALTIME_HTTP_SERVICE_RATE": "0",
                    "REALTIME_LOG_LEVEL": os.environ.get("LOADTEST_SERVER_LOG_LEVEL", "WARNING")})
        with open(self.log_path, "ab") as out:
            self.procs["server"] = subprocess.Popen(
                [*pin("0"), sys.executable, "-m", "realtime"], env=env, stdout=out,
                stderr=subprocess.STDOUT, cwd=ROOT)

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(900):
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(f"{self.url}/readyz") as r:
                        if r.status == 200:
                            return
                if self.procs["server"].poll() is not None:
                    break
                await asyncio.sleep(0.1)
        raise RuntimeError(f"server not ready:\n{self.log_tail()}")

    def token(self, role: str, sub: str) -> str:
        return mint_token(self.settings, sub=sub, role=role, ttl_s=24 * 3600)

    def cpu(self) -> dict[str, float]:
        out = {name: cpu_seconds(p.pid) for name, p in self.procs.items() if p.poll() is None}
        out["bench"] = time.process_time()
        out["machine"] = machine_busy_seconds()
        out["wall"] = time.monotonic()
        return out

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def log_problems(self) -> dict[str, Any]:
        lines = []
        with contextlib.suppress(OSError):
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines()
                     if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
        return {"count": len(lines), "first": lines[:10]}

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def cpu_share(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """% of one core each process used over a window; `others`: the rest of
    the machine (other people's work on the shared cores)."""
    wall = after["wall"] - before["wall"]
    out = {k: round(100 * (after[k] - before[k]) / wall, 1) for k in after
           if k in before and k != "wall"}
    machine_pct = out.pop("machine")
    out["others"] = round(machine_pct - sum(out.values()), 1)
    out["seconds"] = round(wall, 1)
    return out


# -- 2. statistics and the inbox -------------------------------------------------
async def timed_get(session: aiohttp.ClientSession, url: str,
                    params: dict[str, str]) -> tuple[float, int, Any]:
    """(ms, status, data); data is None unless the answer was ok."""
    t0 = time.perf_counter()
    async with session.get(url, params=params) as r:
        raw = await r.read()
        status = r.status
    ms = (time.perf_counter() - t0) * 1000
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    return ms, status, body.get("data") if status == 200 and body.get("ok") else None


async def run_reads(stack: Stack, kinds: dict[str, tuple[str, dict[str, str]]], n: int
                    ) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, Counter[int]]]:
    """`n` requests of each kind (after WARMUP of each), one at a time, the
    kinds in a rotating order each round. A failed request (the server's
    503 when the store took longer than REALTIME_MONGO_TIMEOUT_MS) is timed
    like the others and counted by status."""
    names = list(kinds)
    times: dict[str, list[float]] = {k: [] for k in names}
    last: dict[str, Any] = {}
    failed: dict[str, Counter[int]] = {k: Counter() for k in names}
    headers = {"Authorization": f"Bearer {stack.token('admin', 'bench-admin')}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        for r in range(WARMUP + n):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                path, params = kinds[k]
                ms, status, data = await timed_get(s, stack.url + path, params)
                if r >= WARMUP:
                    times[k].append(ms)
                    if data is None:
                        failed[k][status] += 1
                if data is not None:
                    last[k] = data
    return times, last, failed


async def settle(stack: Stack, log: Callable[[str], None], busy_pct: float = 20.0,
                 limit_s: float = 300.0) -> dict[str, Any]:
    """Wait until the store is quiet (under `busy_pct` of a core over 5 s)
    after the bulk write (WiredTiger writes its checkpoint behind)."""
    t0 = time.monotonic()
    while True:
        before = stack.cpu()
        await asyncio.sleep(5)
        share = cpu_share(before, stack.cpu())
        if share.get("store", 0) < busy_pct or time.monotonic() - t0 > limit_s:
            waited = round(time.monotonic() - t0, 1)
            log(f"store settled after {waited} s (last 5 s: {share})")
            return {"waited_s": waited, "last_5s": share}


async def quiet(stack: Stack, log: Callable[[str], None], others_pct: float = 40.0,
                limit_s: float = 300.0) -> dict[str, Any]:
    """Wait (at most `limit_s`) for a 5-second sample in which the rest of
    the machine used under `others_pct` of a core: other people's work
    shares these two cores."""
    t0 = time.monotonic()
    while True:
        before = stack.cpu()
        await asyncio.sleep(5)
        share = cpu_share(before, stack.cpu())
        if share["others"] < others_pct or time.monotonic() - t0 > limit_s:
            waited = round(time.monotonic() - t0, 1)
            log(f"machine {'quiet' if share['others'] < others_pct else 'still busy'} after {waited} s "
                f"(others {share['others']} % of a core)")
            return {"waited_s": waited, "quiet": share["others"] < others_pct, "last_5s": share}


async def stats_in_process(db: AsyncDatabase[dict[str, Any]], today: dt.date,
                           reps: int = 10) -> dict[str, Any]:
    """Where a stats request's time goes, from this process: the store's
    find of the period's and the previous period's rollups (what
    MongoFeedbackStore.days sends), and `summarize` on what it returned."""
    from feedback.analysis import Period, summarize

    out: dict[str, Any] = {}
    for days in (30, 60):
        period = Period(today - dt.timedelta(days=days - 1), today)
        keys = period.previous().days() + period.days()
        reads, sums, sizes = [], [], []
        for _ in range(reps):
            # As FeedbackService.stats asks: the period's rollups whole, the
            # previous period's only their totals and terms.
            t0 = time.perf_counter()
            docs = [d async for d in db["feedback_daily"].find({"_id": {"$in": period.days()}})]
            docs += [d async for d in db["feedback_daily"].find(
                {"_id": {"$in": period.previous().days()}}, {"n": 1, "term": 1})]
            reads.append((time.perf_counter() - t0) * 1000)
            by_day = {d["_id"]: d for d in docs}
            t0 = time.perf_counter()
            summarize(period, [by_day[d] for d in period.days() if d in by_day],
                      [by_day[d] for d in period.previous().days() if d in by_day], "day")
            sums.append((time.perf_counter() - t0) * 1000)
            sizes = [len(bson.encode(d)) for d in docs]
        out[f"{days}d"] = {"ids_asked": len(keys), "docs": len(sizes), "bytes": sum(sizes),
                           "store_find_ms": spread(reads), "summarize_ms": spread(sums)}
    return out


async def explain(db: AsyncDatabase[dict[str, Any]], coll: str, filt: dict[str, Any],
                  sort: dict[str, int] | None, limit: int) -> dict[str, Any]:
    cmd: dict[str, Any] = {"find": coll, "filter": filt, "limit": limit}
    if sort:
        cmd["sort"] = sort
    try:
        out = await db.command("explain", cmd)
    except Exception as exc:
        return {"error": str(exc)[:200]}

    def indexes(plan: Any) -> list[str]:
        found: list[str] = []
        if isinstance(plan, dict):
            if plan.get("indexName"):
                found.append(str(plan["indexName"]))
            elif plan.get("stage") in ("COLLSCAN", "IDHACK", "EXPRESS_IDHACK"):
                found.append(str(plan["stage"]))
            for v in plan.values():
                found += indexes(v)
        elif isinstance(plan, list):
            for v in plan:
                found += indexes(v)
        return found

    plan = (out.get("queryPlanner") or {}).get("winningPlan") or {}
    stats = out.get("executionStats") or {}
    return {"stage": plan.get("stage"), "indexes": indexes(plan),
            "keys_examined": stats.get("totalKeysExamined"), "docs_examined": stats.get("totalDocsExamined"),
            "returned": stats.get("nReturned"), "store_ms": stats.get("executionTimeMillis")}


# -- 3. ratings against plain order events ---------------------------------------
SERVICES = (("aircon_repair", "空调维修"), ("washer_repair", "洗衣机维修"), ("plumbing", "管道疏通"),
            ("water_heater", "热水器维修"), ("appliance_clean", "家电清洗"))


class Orders:
    """Orders made over HTTP as the backend does (tests/conftest.py Live)."""

    def __init__(self, stack: Stack, session: aiohttp.ClientSession, run: str) -> None:
        self.stack = stack
        self.s = session
        self.run = run
        self.windows = 0

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(6):  # `unavailable` (503) is retried, as the backend does
            async with self.s.post(self.stack.url + path, json=body) as r:
                data = await r.json()
                if r.status in (200, 201):
                    return dict(data["data"])
                if r.status == 409 and attempt > 0:
                    return {}  # the try that timed out (503) had committed after all
                if r.status != 503 or attempt == 5:
                    raise RuntimeError(f"POST {path}: {r.status} {data}")
            await asyncio.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def window(self) -> dict[str, int]:
        self.windows += 1  # each order its own hour, years ahead
        start = 1_900_000_000_000 + self.windows * 2 * HOUR_MS
        return {"start_ts": start, "end_ts": start + HOUR_MS}

    async def make(self, order_id: str, customer: str, tech: str, last: str, rnd: random.Random) -> None:
        code, name = rnd.choice(SERVICES)
        await self.post("/api/orders", {
            "order_id": order_id, "customer_id": customer, "service": {"code": code, "name": name},
            "address": {"lat": 31.2304 + rnd.uniform(-0.1, 0.1), "lng": 121.4737 + rnd.uniform(-0.1, 0.1),
                        "text": f"上海市{rnd.choice(PLACES)}区某路{rnd.randint(1, 999)}号"},
            "window": self.window()})
        await self.post(f"/api/orders/{order_id}/assign", {"technician_id": tech})
        for state in ("en_route", "arrived", "in_service", "completed"):
            await self.post(f"/api/orders/{order_id}/events", {"state": state})
            if state == last:
                break


@dataclass
class Pair:
    kind: str  # rate | refund | complete
    order_id: str
    customer: str
    tech: str
    body: dict[str, Any]
    low: bool = False


def rating_body(rnd: random.Random, order_id: str, low: bool) -> dict[str, Any]:
    if low:
        return {"order_id": order_id, "stars": rnd.choice((1, 2, 2)), "quality": rnd.randint(1, 3),
                "attitude": rnd.randint(1, 4), "efficiency": rnd.randint(1, 3),
                "comment": rnd.choice(LOW_COMMENTS)}
    body: dict[str, Any] = {"order_id": order_id, "stars": rnd.choice((5, 5, 5, 4, 4, 3)),
                            "quality": rnd.randint(3, 5), "attitude": rnd.randint(4, 5),
                            "efficiency": rnd.randint(3, 5)}
    comment = rnd.choice(HIGH_COMMENTS)
    if comment:
        body["comment"] = comment
    return body


async def connect(stack: Stack, role: str, sub: str) -> socketio.AsyncClient:
    c = socketio.AsyncClient(reconnection=False)
    await c.connect(stack.url, namespaces=["/orders"], auth={"token": stack.token(role, sub)},
                    transports=["websocket"], wait_timeout=30)
    return c


async def run_ratings(stack: Stack, db: AsyncDatabase[dict[str, Any]], n: int, low_share: float,
                      log: Callable[[str], None]) -> dict[str, Any]:
    run = uuid.uuid4().hex[:6]
    rnd = random.Random(19)
    total = WARMUP + n
    customers = [f"rc-{run}-{k}" for k in range(10)]
    techs_ab = [f"rt-{run}-{k:02d}" for k in range(50)]
    techs_c = [f"rtc-{run}-{k:03d}" for k in range(total)]
    low_at = set(rnd.sample(range(WARMUP, total), round(low_share * n))) | {WARMUP - 1}
    pairs: dict[str, list[Pair]] = {"rate": [], "refund": [], "complete": []}
    for i in range(total):
        for kind in ("rate", "refund"):
            oid = f"fb-{kind[:3]}-{run}-{i}"
            cust, tech = customers[i % len(customers)], techs_ab[(2 * i + (kind == "refund")) % len(techs_ab)]
            if kind == "rate":
                low = i in low_at
                pairs[kind].append(Pair(kind, oid, cust, tech, rating_body(rnd, oid, low), low))
            else:
                pairs[kind].append(Pair(kind, oid, cust, tech, {
                    "order_id": oid, "reason": rnd.choice(LOW_COMMENTS) or "服务不满意"}))
        oid = f"fb-cmp-{run}-{i}"
        pairs["complete"].append(Pair("complete", oid, customers[i % len(customers)], techs_c[i],
                                      {"order_id": oid, "state": "completed"}))
    # Setup over HTTP: each technician's orders one after another (one job at
    # a time), technicians side by side.
    t0 = time.perf_counter()
    per_tech: dict[str, list[tuple[Pair, str]]] = defaultdict(list)
    for kind, ps in pairs.items():
        for p in ps:
            per_tech[p.tech].append((p, "in_service" if kind == "complete" else "completed"))
    gate = asyncio.Semaphore(6)
    headers = {"Authorization": f"Bearer {stack.token('service', 'bench-backend')}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        maker = Orders(stack, session, run)

        async def tech_orders(items: list[tuple[Pair, str]]) -> None:
            async with gate:
                for p, last in items:
                    await maker.make(p.order_id, p.customer, p.tech, last, rnd)

        await asyncio.gather(*(tech_orders(v) for v in per_tech.values()))
    setup_s = time.perf_counter() - t0
    log(f"{3 * total} orders made in {setup_s:.0f} s")
    socks: dict[str, socketio.AsyncClient] = {}
    sgate = asyncio.Semaphore(16)

    async def open_one(role: str, sub: str) -> None:
        async with sgate:
            socks[sub] = await connect(stack, role, sub)

    await asyncio.gather(*(open_one("customer", c) for c in customers),
                         *(open_one("technician", t) for t in techs_c))
    events = {"rate": "rate", "refund": "request_refund", "complete": "progress"}
    times: dict[str, list[float]] = {"rate": [], "rate_low": [], "rate_high": [], "refund": [],
                                     "complete": []}
    errors: Counter[str] = Counter()
    kinds = list(pairs)
    cpu_before = stack.cpu()
    try:
        for i in range(total):
            if i == WARMUP:
                cpu_before = stack.cpu()
            order = kinds[i % 3:] + kinds[:i % 3]
            for kind in order:
                p = pairs[kind][i]
                sock = socks[p.tech if kind == "complete" else p.customer]
                t = time.perf_counter()
                try:
                    reply = await sock.call(events[kind], p.body, namespace="/orders", timeout=60)
                except Exception as exc:  # no reply within the timeout, a lost connection
                    reply = type(exc).__name__
                ms = (time.perf_counter() - t) * 1000
                if i < WARMUP:
                    continue
                if not (isinstance(reply, dict) and reply.get("ok")):
                    # Timed like the others (a refusal is an answer too), and counted.
                    errors[f"{kind}: {str(reply)[:120]}"] += 1
                times[kind].append(ms)
                if kind == "rate":
                    times["rate_low" if p.low else "rate_high"].append(ms)
        after = stack.cpu()
    finally:
        for c in socks.values():
            with contextlib.suppress(Exception):
                await c.disconnect()
    lows = [p.order_id for p in pairs["rate"][WARMUP:] if p.low]
    follow_ups = await db["feedback"].count_documents({"_id": {"$in": [f"fu-{o}" for o in lows]}})
    rated_techs = {p.tech for p in pairs["rate"]}
    aggregates = await db["technician_ratings"].count_documents({"_id": {"$in": sorted(rated_techs)}})
    return {"setup_seconds": round(setup_s, 1), "orders_each": n, "warmup_each": WARMUP,
            "low_ratings": len(lows), "follow_ups_found": follow_ups,
            "technicians_rated": len(rated_techs), "aggregates_found": aggregates,
            "errors": dict(errors), "times": times, "cpu_pct_of_a_core": cpu_share(cpu_before, after)}


# -- the run --------------------------------------------------------------------
async def run(args: argparse.Namespace, stack: Stack, out: dict[str, Any]) -> None:
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    stack.start()
    await stack.ready()
    log(f"server on {stack.url}, SecantusDB on 127.0.0.1:{stack.mongo_port}, database {stack.db_name}")
    settings = stack.settings
    tz = ZoneInfo(settings.report_tz)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.mongo_url)
    db = client[stack.db_name]
    try:
        # -- 1. seeding ----------------------------------------------------------
        now = int(time.time() * 1000)
        t0 = time.perf_counter()
        scripts = make_scripts(args.items, now, tz, args.seed)
        gen_s = time.perf_counter() - t0
        log(f"{len(scripts):,} scripts in {gen_s:.1f} s; equivalence check on {args.check_items}")
        step = max(1, len(scripts) // max(1, args.check_items))
        sample = scripts[::step][:args.check_items]
        check = await check_equivalence(client, f"{stack.db_name}_check", sample, settings, now)
        log(f"equivalence: {'EQUAL' if check['equal'] else 'DIFFERENT'} "
            f"({check['items']} items, {check['events']} events, {check['rollup_docs']} rollups)")
        out["equivalence"] = check
        if not check["equal"]:
            raise SystemExit(f"the bulk path differs from the per-transaction path: {check['differences']}")
        t0 = time.perf_counter()
        collector = Collector()
        route_to = [AGENTS[0][0]]
        tally = await replay_all(make_service(collector, settings, route_to), scripts, now, route_to,
                                 args.seed, progress=log)
        replay_s = time.perf_counter() - t0
        log(f"replayed in {replay_s:.0f} s: {len(collector.items):,} items, {len(collector.log):,} events, "
            f"{len(collector.inc)} days; writing")
        cpu0 = stack.cpu()
        t0 = time.perf_counter()
        written = await write_bulk(db, collector, progress=log)
        write_s = time.perf_counter() - t0
        cpu_write = cpu_share(cpu0, stack.cpu())
        log(f"written in {write_s:.0f} s")
        statuses = Counter(i["status"] for i in collector.items.values())
        tags = Counter(t for i in collector.items.values() for t in i["tags"])
        terms = Counter(t for i in collector.items.values() for t in i["terms"])
        open_n = sum(statuses[s] for s in OPEN)
        overdue_open = sum(1 for i in collector.items.values() if i["overdue"] and i["status"] in OPEN)
        rollups = [d async for d in db["feedback_daily"].find({})]
        sizes = [len(bson.encode(d)) for d in rollups]
        term_keys = [len(d.get("term") or {}) for d in rollups]
        today = dt.datetime.now(tz).date()
        expect: dict[str, int] = Counter()
        for i in collector.items.values():
            expect[i["day"]] += 1
        last30 = {(today - dt.timedelta(days=k)).isoformat() for k in range(30)}
        out["seeding"] = {
            "items": len(collector.items), "events": len(collector.log), "days": len(rollups),
            "script_seconds": round(gen_s, 1), "replay_seconds": round(replay_s, 1),
            "write_seconds": round(write_s, 1), "write": written, "write_cpu_pct_of_a_core": cpu_write,
            "steps": dict(sorted(tally.items())), "statuses": dict(statuses.most_common()),
            "open": open_n, "open_overdue": overdue_open, "tags": dict(tags.most_common()),
            "distinct_terms": len(terms), "top_terms": terms.most_common(15),
            "rollup_bytes": {"median": statistics.median(sizes), "max": max(sizes)},
            "rollup_term_keys": {"median": statistics.median(term_keys), "max": max(term_keys)},
            "items_per_day": {"min": min(expect.values()), "max": max(expect.values())},
        }
        del collector
        # -- 2. statistics and the inbox ---------------------------------------
        if pin("1"):
            os.sched_setaffinity(0, {1})  # beside the store, away from the server
        tag = tags.most_common(1)[0][0]
        # The inbox's search box: --q, or else a term in under 3 % of the items.
        term = args.q if terms.get(args.q) else next(
            (t for t, k in terms.most_common() if k < 0.03 * args.items), terms.most_common(1)[0][0])
        frm = (today - dt.timedelta(days=DAYS - 1)).isoformat()
        stats_kinds = {
            "stats_30d_day": ("/api/feedback/stats", {"group_by": "day"}),
            "stats_30d_week": ("/api/feedback/stats", {"group_by": "week"}),
            "stats_60d_day": ("/api/feedback/stats", {"from": frm, "to": today.isoformat(),
                                                      "group_by": "day"}),
        }
        list_kinds = {
            "inbox_open": ("/api/feedback", {"open": "true", "limit": "50"}),
            "inbox_tag": ("/api/feedback", {"tag": tag, "limit": "50"}),
        }
        # Apart, and after: a search by term reads every item, longer than the
        # server waits (it answers 503), and the store goes on with it.
        search_kinds = {
            "inbox_q": ("/api/feedback", {"q": term, "limit": "50"}),
            "inbox_tag_q": ("/api/feedback", {"tag": tag, "q": term, "limit": "50"}),
        }
        out["settle"] = await settle(stack, log)
        quiet_waits = {"stats": await quiet(stack, log)}
        log(f"stats: {args.requests} of each of {list(stats_kinds)}")
        cpu0 = stack.cpu()
        stats_times, stats_last, stats_failed = await run_reads(stack, stats_kinds, args.requests)
        cpu_stats = cpu_share(cpu0, stack.cpu())
        quiet_waits["inbox"] = await quiet(stack, log)
        log(f"inbox: {args.list_requests} of each of {list(list_kinds)} (tag {tag!r})")
        cpu0 = stack.cpu()
        list_times, list_last, list_failed = await run_reads(stack, list_kinds, args.list_requests)
        cpu_list = cpu_share(cpu0, stack.cpu())
        quiet_waits["search"] = await quiet(stack, log)
        log(f"search: {args.search_requests} of each of {list(search_kinds)} (q {term!r})")
        cpu0 = stack.cpu()
        search_times, search_last, search_failed = await run_reads(stack, search_kinds,
                                                                   args.search_requests)
        cpu_search = cpu_share(cpu0, stack.cpu())
        out["settle_after_search"] = await settle(stack, log)
        breakdown = await stats_in_process(db, today)
        s30 = stats_last.get("stats_30d_day") or {"total": None, "top_terms": [], "rising_terms": [],
                                                   "first_response": None, "resolution": None}
        want30 = sum(v for d, v in expect.items() if d in last30)
        plans = {
            "stats (30 days: 60 ids)": await explain(db, "feedback_daily", {"_id": {"$in": sorted(
                (today - dt.timedelta(days=k)).isoformat() for k in range(60))}}, None, 0),
            "inbox_open": await explain(db, "feedback", {"status": {"$in": sorted(OPEN)}},
                                        {"overdue": -1, "ts": -1}, 51),
            "inbox_tag": await explain(db, "feedback", {"tags": tag}, {"overdue": -1, "ts": -1}, 51),
            "inbox_q": await explain(db, "feedback", {"terms": term}, {"overdue": -1, "ts": -1}, 51),
            "inbox_tag_q": await explain(db, "feedback", {"tags": tag, "terms": term},
                                         {"overdue": -1, "ts": -1}, 51),
        }
        matches = {
            "inbox_open": open_n, "inbox_tag": tags[tag], "inbox_q": terms[term],
        }
        inbox_times = {**list_times, **search_times}
        inbox_failed = {**list_failed, **search_failed}
        out["reads"] = {
            "tag": tag, "term": term, "term_items": terms[term], "matching_items": matches,
            "stats": {k: {**spread(v), "failed": dict(stats_failed[k]), "blocks": blocks(v)}
                      for k, v in stats_times.items()},
            "inbox": {k: {**spread(v), "failed": dict(inbox_failed[k]), "blocks": blocks(v)}
                      for k, v in inbox_times.items()},
            "stats_in_process": breakdown, "quiet_waits": quiet_waits,
            "stats_cpu_pct_of_a_core": cpu_stats, "inbox_cpu_pct_of_a_core": cpu_list,
            "search_cpu_pct_of_a_core": cpu_search,
            "stats_30d_total": s30["total"], "expected_30d_total": want30,
            "stats_30d_top_terms": s30["top_terms"][:10], "stats_30d_rising": s30["rising_terms"][:5],
            "stats_30d_first_response": s30["first_response"], "stats_30d_resolution": s30["resolution"],
            "stats_30d_response_bytes": len(json.dumps(s30, ensure_ascii=False).encode()),
            "inbox_returned": {k: len(v["feedback"]) for k, v in {**list_last, **search_last}.items()
                               if v},
            "plans": plans,
            "raw_ms": {**{k: [round(x, 2) for x in v] for k, v in stats_times.items()},
                       **{k: [round(x, 2) for x in v] for k, v in inbox_times.items()}},
        }
        if s30["total"] != want30:
            log(f"note: stats say {s30['total']} items in 30 days, the seeding wrote {want30}")
        # -- 3. ratings against plain order events -----------------------------
        out["quiet_before_ratings"] = await quiet(stack, log)
        log(f"ratings: {args.requests} each of rate / request_refund / progress completed")
        rates = await run_ratings(stack, db, args.requests, args.low_share, log)
        t = rates.pop("times")
        rates["latency_ms"] = {k: {**spread(v), "blocks": blocks(v)} for k, v in t.items()}
        rates["raw_ms"] = {k: [round(x, 2) for x in v] for k, v in t.items()}
        lat = rates["latency_ms"]
        rates["ratios"] = {
            f"{a}/{b}": {"p50": ratio(lat[a]["p50"], lat[b]["p50"]),
                         "p99": ratio(lat[a]["p99"], lat[b]["p99"])}
            for a, b in (("rate", "refund"), ("rate", "complete"), ("rate_high", "refund"),
                         ("rate_low", "refund"))}
        out["ratings"] = rates
        out["indexes"] = {name: [dict(m.document) for m in models]
                          for name, models in FEEDBACK_INDEXES.items()}
    finally:
        await client.close()


def print_summary(res: dict[str, Any]) -> None:
    print()
    m = res["machine"]
    print(f"== feedback bench ({res['started']}; {m['cores']} cores, {m['cpu']}, Python {m['python']}) ==")
    eq = res.get("equivalence")
    if eq:
        print(f"equivalence (sample of {eq['sample_items']}): {'equal' if eq['equal'] else 'DIFFERENT'}: "
              f"{eq['items']} items, {eq['events']} events, {eq['rollup_docs']} daily rollups "
              f"({eq['frt_values']} first responses, {eq['res_values']} resolutions)")
    sd = res.get("seeding")
    if sd:
        print(f"seeded {sd['items']:,} items, {sd['events']:,} events, {sd['days']} days; "
              f"open {sd['open']:,} "
              f"(overdue {sd['open_overdue']:,}); written in {sd['write_seconds']} s "
              f"(items {sd['write']['items_s']} s, events {sd['write']['events_s']} s, "
              f"rollups {sd['write']['rollups_s']} s); rollup median {sd['rollup_bytes']['median']:,} bytes, "
              f"{sd['rollup_term_keys']['median']} term keys")
    rd = res.get("reads")
    if rd:
        print("\n| request | n | p50 ms | p90 ms | p99 ms | max ms | p99 by quarter |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for group in ("stats", "inbox"):
            for k, v in rd[group].items():
                q = " / ".join(str(b["p99"]) for b in v["blocks"])
                fail = f" ({sum(v['failed'].values())} failed: {v['failed']})" if v["failed"] else ""
                print(f"| {k}{fail} | {v['n']} | {v['p50']} | {v['p90']} | {v['p99']} | {v['max']} | {q} |")
        for k, b in rd["stats_in_process"].items():
            print(f"in process, {k}: {b['docs']} of {b['ids_asked']} rollups, {b['bytes']:,} bytes; "
                  f"store find p50 {b['store_find_ms']['p50']} ms, "
                  f"summarize p50 {b['summarize_ms']['p50']} ms")
        print(f"(tag {rd['tag']!r}, q {rd['term']!r} in {rd['term_items']:,} items; stats total 30 d "
              f"{rd['stats_30d_total']}, seeded {rd['expected_30d_total']})")
        c = rd["stats_cpu_pct_of_a_core"]
        print(f"CPU during stats, % of a core: server {c.get('server')}, store {c.get('store')}, "
              f"bench {c.get('bench')}, others {c.get('others')}")
        worst = max(v["p99"] or 0 for v in rd["stats"].values())
        met = "met" if worst <= STATS_TARGET_MS else "NOT met"
        print(f"stats p99 target <= {STATS_TARGET_MS:.0f} ms: {met}"
              f" (worst p99 {worst} ms)")
        for k, p in rd["plans"].items():
            print(f"  plan {k}: {p}")
    rt = res.get("ratings")
    if rt:
        print("\n| write | n | p50 ms | p90 ms | p99 ms | max ms | p99 by quarter |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for k, v in rt["latency_ms"].items():
            q = " / ".join(str(b["p99"]) for b in v["blocks"])
            print(f"| {k} | {v['n']} | {v['p50']} | {v['p90']} | {v['p99']} | {v['max']} | {q} |")
        for k, v in rt["ratios"].items():
            print(f"ratio {k}: p50 {v['p50']}, p99 {v['p99']}")
        c = rt["cpu_pct_of_a_core"]
        print(f"low ratings {rt['low_ratings']}, follow-ups found {rt['follow_ups_found']}; "
              f"aggregates {rt['aggregates_found']}/{rt['technicians_rated']}; errors {rt['errors'] or 0}; "
              f"CPU % of a core: server {c.get('server')}, store {c.get('store')}, bench {c.get('bench')}, "
              f"others {c.get('others')}")
    print(f"server log: {res.get('server_log', {}).get('count')} warnings/errors")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.feedback_bench",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--items", type=int, default=100_000, help="feedback items seeded over 60 days")
    ap.add_argument("--requests", type=int, default=200,
                    help="timed requests of each stats kind, and timed writes of each kind")
    ap.add_argument("--list-requests", type=int, default=50,
                    help="timed requests of each inbox kind (open; tag)")
    ap.add_argument("--search-requests", type=int, default=20,
                    help="timed requests of each inbox search (q; tag and q): each reads every item")
    ap.add_argument("--check-items", type=int, default=200, help="items in the equivalence check")
    ap.add_argument("--low-share", type=float, default=0.10, help="share of ratings with <= 2 stars")
    ap.add_argument("--q", default="漏水", help="the inbox's search term (q=)")
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--store-ttl-sweep-s", type=int, default=None,
                    help="SecantusDB's TTL sweep interval (default: its own, 60 s; 0: off). "
                         "It walks every collection in Python; a MongoDB replica set's TTL "
                         "monitor uses the index instead")
    ap.add_argument("--out", type=Path, default=None, help="the JSON's path (default: loadtest/results/)")
    args = ap.parse_args(argv)
    if args.items < 1000 or args.requests < 10:
        ap.error("--items >= 1000 and --requests >= 10")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["python", "-m", "loadtest.feedback_bench",
                               *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(), "code": code_fingerprint(),
        "config": {"items": args.items, "requests": args.requests, "list_requests": args.list_requests,
                   "search_requests": args.search_requests,
                   "check_items": args.check_items, "low_share": args.low_share, "seed": args.seed,
                   "q": args.q, "days": DAYS, "warmup_each": WARMUP,
                   "store_ttl_sweep_s": args.store_ttl_sweep_s},
    }
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C stops the run in order even where SIGINT came ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stack = Stack(args.store_ttl_sweep_s)
    ok = False
    try:
        asyncio.run(run(args, stack, res))
        ok = True
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        res["error"] = "interrupted"
    except Exception as exc:  # what was measured so far is still written
        import traceback
        traceback.print_exc()
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        res["server_log"] = stack.log_problems()
        if not ok:
            print(f"server log (last lines):\n{stack.log_tail()}", file=sys.stderr)
        stack.stop()
    res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print_summary(res)
    path = args.out or ROOT / "loadtest" / "results" / f"feedback-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, ensure_ascii=False, default=str))
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
