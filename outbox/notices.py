"""Who hears what when they are not connected (docs/notifications.md).

`notices_for(record)` lists, for one outbox record, each person it matters
to, with the words in both languages, a deep link, a collapse key, a
priority and how long it is worth delivering. Whether they are connected,
their preferences and quiet hours are the relay's to apply (`held_until`
here decides the quiet hours). Pure functions over plain values."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

LANGS: Final = ("zh-CN", "en")
DEFAULT_LANG: Final = "zh-CN"
# How long a notice is worth pushing to a device that is off (Web Push TTL,
# and the gateway's): a day for most; an offer only until it expires.
DEFAULT_TTL_S: Final = 86_400
# The longest text a push carries (a chat message is cut, with an ellipsis).
MAX_BODY: Final = 120


@dataclass(frozen=True)
class Notice:
    user_id: str
    role: str
    kind: str            # order | offer | chat | late | rating | refund | feedback
    title: dict[str, str]
    body: dict[str, str]
    link: str
    collapse_key: str
    # high: an offer (Web Push Urgency high, and never held by quiet hours).
    priority: str = "normal"
    # A state change of an active order, an offer: quiet hours never hold it.
    urgent: bool = False
    # Sent even to a connected user: an offer must reach a technician whose
    # app is in the background (its socket may live on, unseen).
    always: bool = False
    ttl_s: int = DEFAULT_TTL_S
    conversation_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    # Where the app hears this live: a user connected to this namespace on
    # any node gets no notification (a customer only on /chat still gets
    # their order's changes as notifications).
    namespace: str = "/orders"


# (title, body) per language, per order state the customer hears of.
CUSTOMER_STATES: Final[dict[str, dict[str, tuple[str, str]]]] = {
    "assigned": {"zh-CN": ("已安排服务人员", "{service}：技师已接单，将按预约时间上门"),
                 "en": ("Technician assigned", "{service}: a technician will come at the booked time")},
    "en_route": {"zh-CN": ("技师已出发", "{service}：技师正在前往您家，点击查看实时位置"),
                 "en": ("Technician on the way", "{service}: your technician is on the way; tap to follow")},
    "arrived": {"zh-CN": ("技师已到达", "{service}：技师已到达您家门口"),
                "en": ("Technician arrived", "{service}: your technician is at your door")},
    "in_service": {"zh-CN": ("服务已开始", "{service}：服务进行中"),
                   "en": ("Service started", "{service}: the service has started")},
    "completed": {"zh-CN": ("服务已完成", "{service}：服务已完成，欢迎评价"),
                  "en": ("Service completed", "{service}: done; tell us how it went")},
    "cancelled": {"zh-CN": ("订单已取消", "{service}：订单已取消"),
                  "en": ("Order cancelled", "{service}: the order was cancelled")},
    "refunded": {"zh-CN": ("退款已通过", "{service}：退款申请已通过"),
                 "en": ("Refund approved", "{service}: your refund was approved")},
    "refund_rejected": {"zh-CN": ("退款未通过", "{service}：退款申请未通过，可联系客服"),
                        "en": ("Refund declined", "{service}: your refund was declined; contact support")},
}
# States whose change is of an active order: quiet hours never hold them.
ACTIVE_STATES: Final = frozenset({"assigned", "en_route", "arrived", "in_service", "completed",
                                  "cancelled"})
REFUND_DECISIONS: Final = frozenset({"refunded", "refund_rejected"})


def _words(table: dict[str, tuple[str, str]], **params: Any) -> tuple[dict[str, str], dict[str, str]]:
    title = {lang: t.format(**params) for lang, (t, _) in table.items()}
    body = {lang: b.format(**params) for lang, (_, b) in table.items()}
    return title, body


def service_name(service: Any) -> str:
    return str(service.get("name") or "") if isinstance(service, dict) else str(service or "")


def order_link(order_id: str) -> str:
    return f"/track/{quote(order_id, safe='')}"


def notices_for(rec: dict[str, Any], now_ms: int) -> list[Notice]:
    topic, data = rec["topic"], rec["data"]
    if topic.startswith("order."):
        return _order_notices(data["order"], data["event"])
    if topic == "dispatch.offer":
        return [_offer_notice(data, now_ms)]
    if topic == "chat.message":
        return _chat_notices(data["conversation"], data["message"])
    if topic in ("feedback.replied", "feedback.status"):
        return _feedback_notices(data)
    return []


def _order_notices(order: dict[str, Any], event: dict[str, Any]) -> list[Notice]:
    oid, ev_type, state = order["order_id"], event["type"], event["state"]
    service = service_name(order.get("service"))
    common: dict[str, Any] = {
        "link": order_link(oid), "collapse_key": f"order:{oid}",
        "data": {"order_id": oid, "seq": event["seq"], "type": ev_type, "state": state}}
    out: list[Notice] = []
    customer, tech = order.get("customer_id"), order.get("technician_id")
    actor = (event.get("actor") or {}).get("id")
    if ev_type == "state_changed" and state in CUSTOMER_STATES and customer and actor != customer:
        title, body = _words(CUSTOMER_STATES[state], service=service)
        kind = "refund" if state in REFUND_DECISIONS else "order"
        out.append(Notice(customer, "customer", kind, title, body, urgent=state in ACTIVE_STATES,
                          **common))
    if ev_type == "reassigned" and customer:
        title, body = _words({"zh-CN": ("已更换服务人员", "{service}：已为您更换技师"),
                              "en": ("New technician", "{service}: another technician will come")},
                             service=service)
        out.append(Notice(customer, "customer", "order", title, body, urgent=True, **common))
    if ev_type == "late_risk" and customer:
        minutes = event["data"].get("minutes_late")
        title, body = _words({"zh-CN": ("技师可能迟到", "{service}：技师预计晚到约 {m} 分钟"),
                              "en": ("Your technician may be late",
                                     "{service}: about {m} min later than booked")},
                             service=service, m=minutes)
        out.append(Notice(customer, "customer", "late", title, body, urgent=True, **common))
    if tech and actor != tech and ((ev_type == "state_changed" and state == "assigned")
                                   or ev_type == "reassigned"):
        title, body = _words({"zh-CN": ("新订单", "{service}：您有一个新的服务订单"),
                              "en": ("New job", "{service}: a job was assigned to you")},
                             service=service)
        out.append(Notice(tech, "technician", "order", title, body, urgent=True, **common))
    previous = event["data"].get("previous_technician_id")
    if ev_type == "reassigned" and previous:
        title, body = _words({"zh-CN": ("订单已改派", "{service}：该订单已改派给其他技师"),
                              "en": ("Job moved", "{service}: this job went to another technician")},
                             service=service)
        out.append(Notice(str(previous), "technician", "order", title, body, urgent=True, **common))
    if ev_type == "state_changed" and state == "cancelled" and tech and actor != tech:
        title, body = _words(CUSTOMER_STATES["cancelled"], service=service)
        out.append(Notice(tech, "technician", "order", title, body, urgent=True, **common))
    if ev_type == "rated" and tech:
        stars = event["data"].get("stars")
        title, body = _words({"zh-CN": ("收到新评价", "{service}：客户给了您 {stars} 星"),
                              "en": ("New rating", "{service}: the customer gave you {stars} stars")},
                             service=service, stars=stars)
        out.append(Notice(tech, "technician", "rating", title, body, **common))
    return out


def _offer_notice(data: dict[str, Any], now_ms: int) -> Notice:
    offer = data["offer"]
    service = service_name(offer.get("service"))
    title, body = _words({"zh-CN": ("新的派单邀请", "{service}：请在倒计时结束前接单"),
                          "en": ("New job offer", "{service}: accept before it expires")},
                         service=service)
    ttl = max(1, (int(offer.get("expires_ts") or now_ms) - now_ms) // 1000)
    return Notice(data["technician_id"], "technician", "offer", title, body,
                  link=f"/offers/{quote(str(offer['dispatch_id']), safe='')}",
                  collapse_key=f"offer:{offer['dispatch_id']}", priority="high", urgent=True, always=True,
                  ttl_s=ttl, data={"order_id": offer.get("order_id"),
                                   "dispatch_id": offer["dispatch_id"],
                                   "expires_ts": offer.get("expires_ts")})


def _chat_notices(conv: dict[str, Any], msg: dict[str, Any]) -> list[Notice]:
    if msg.get("kind") == "system":
        return []
    sender = msg.get("sender") or {}
    cid = conv["conversation_id"]
    text = str(msg.get("body") or "")
    if len(text) > MAX_BODY:
        text = text[:MAX_BODY - 1] + "…"
    who = {"agent": ("客服", "Support"), "technician": ("技师", "Technician"),
           "customer": ("客户", "Customer")}.get(str(sender.get("role")), ("", ""))
    name = sender.get("name")
    title = {"zh-CN": f"{name or who[0]}发来新消息", "en": f"New message from {name or who[1]}"}
    link = (order_link(conv["order_id"]) + "#chat") if conv.get("order_id") else "/chat"
    out = []
    for uid, role in ((conv.get("customer_id"), "customer"), (conv.get("technician_id"), "technician")):
        if uid and uid != sender.get("id"):
            out.append(Notice(str(uid), role, "chat", title, {"zh-CN": text, "en": text}, link=link,
                              collapse_key=f"conversation:{cid}", conversation_id=cid,
                              namespace="/chat",
                              data={"conversation_id": cid, "seq": msg.get("seq"),
                                    "order_id": conv.get("order_id")}))
    return out


def _feedback_notices(item: dict[str, Any]) -> list[Notice]:
    """The author hears a reply, and that their item was resolved; the staff's
    own steps (notes, tags, assignment) stay inside."""
    event, user = item["event"], item.get("user") or {}
    if not user.get("id") or (event.get("actor") or {}).get("id") == user.get("id"):
        return []
    if event["type"] == "replied":
        text = str(event["data"].get("text") or "")
        if len(text) > MAX_BODY:
            text = text[:MAX_BODY - 1] + "…"
        title = {"zh-CN": "客服回复了您的反馈", "en": "Support replied to your feedback"}
        body = {"zh-CN": text, "en": text}
    elif event["type"] == "status" and event["data"].get("status") == "resolved":
        title, body = _words({"zh-CN": ("反馈已处理", "您的反馈已处理完毕，感谢您的耐心"),
                              "en": ("Feedback resolved", "Your feedback was resolved; thank you")})
    else:
        return []
    fid = str(item["id"])
    return [Notice(str(user["id"]), str(user.get("role") or "customer"), "feedback", title, body,
                   link=f"/feedback/{quote(fid, safe='')}", collapse_key=f"feedback:{fid}",
                   namespace="/chat",
                   data={"feedback_id": fid, "seq": event.get("user_seq"), "type": event["type"]})]


def presence_key(namespace: str, user_id: str) -> str:
    """What the edge counts as present: a user on a namespace."""
    return f"{namespace}|{user_id}"


def held_until(quiet: dict[str, Any] | None, now_ms: int) -> int | None:
    """When quiet hours (`{start: "22:00", end: "08:00", tz}`) that hold `now`
    end, in ms; None when now is not quiet. start == end: never quiet."""
    if not quiet:
        return None
    try:
        zone = ZoneInfo(str(quiet.get("tz") or "Asia/Shanghai"))
    except (ZoneInfoNotFoundError, ValueError):
        return None
    sh, sm = (int(x) for x in str(quiet["start"]).split(":"))
    eh, em = (int(x) for x in str(quiet["end"]).split(":"))
    now = dt.datetime.fromtimestamp(now_ms / 1000, zone)
    minute, start, end = now.hour * 60 + now.minute, sh * 60 + sm, eh * 60 + em
    if start == end:
        return None
    quiet_now = start <= minute < end if start < end else (minute >= start or minute < end)
    if not quiet_now:
        return None
    ends = now.replace(hour=eh, minute=em, second=0, microsecond=0)
    if ends <= now:
        ends += dt.timedelta(days=1)
    return int(ends.timestamp() * 1000)


def check_clock(value: str) -> bool:
    parts = value.split(":")
    return (len(parts) == 2 and all(p.isdigit() and len(p) == 2 for p in parts)
            and int(parts[0]) < 24 and int(parts[1]) < 60)


def words(notice: Notice, lang: str) -> tuple[str, str]:
    lang = lang if lang in LANGS else DEFAULT_LANG
    return notice.title[lang], notice.body[lang]
