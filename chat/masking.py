"""Masking of contact details between a customer and a technician (防飞单).

Platforms keep the relationship on-platform: a phone number or WeChat id
typed into an order chat is hidden from the other party; agents and the
audit trail keep the original. Deliberately generous: a false positive
costs a customer a re-typed house number, a false negative costs the
platform the customer.
"""

from __future__ import annotations

import re
from typing import Final

PHONE_MASK: Final = "[号码已隐藏]"
WECHAT_MASK: Final = "[微信号已隐藏]"

# Separators people put inside numbers: spaces, dashes, dots, full-width forms.
_SEP = r"[\s\-.·－—]?"
_MOBILE = re.compile(
    r"(?<![0-9０-９])(?:(?:\+|00)?86" + _SEP + r")?1[3-9](?:" + _SEP + r"[0-9]){9}(?![0-9０-９])"
)
# Landlines: an area code 0xx / 0xxx (maybe in brackets) and 7-8 digits,
# which people also split in two (021-6234-5678).
_LANDLINE = re.compile(
    r"(?<![0-9])(?:[(（]0[1-9][0-9]{1,2}[)）]\s?|0[1-9][0-9]{1,2}" + _SEP + r")"
    r"[2-9][0-9]{2,3}" + _SEP + r"[0-9]{4}(?![0-9])"
)
# A WeChat id follows a keyword: 微信 / 威信 / V信 / vx / wx / wechat / 加我.
_WECHAT = re.compile(
    r"((?:微信号?|威信|[vV]信|[vVwW][xX]|wechat|加我)\s*(?:号|id|ID)?\s*(?:是|为)?\s*[:：]?\s*)"
    r"([a-zA-Z][-_a-zA-Z0-9]{5,19})",
    re.IGNORECASE,
)
_FULLWIDTH_DIGITS = str.maketrans("０１２３４５６７８９", "0123456789")


def mask_contacts(text: str) -> str:
    """The text with phone numbers and WeChat ids replaced; unchanged if none.

    Matching runs on a copy with full-width digits made ASCII (a one-to-one
    character mapping, so positions agree); the replacement is made in the
    original, which keeps everything else exactly as typed."""
    normalized = text.translate(_FULLWIDTH_DIGITS)
    spans = [(m.start(2), m.end(2), WECHAT_MASK) for m in _WECHAT.finditer(normalized)]
    spans += [(m.start(), m.end(), PHONE_MASK) for m in _MOBILE.finditer(normalized)]
    spans += [(m.start(), m.end(), PHONE_MASK) for m in _LANDLINE.finditer(normalized)]
    if not spans:
        return text
    out, pos = [], 0
    for begin, end, mask in sorted(spans):
        if begin < pos:  # overlaps a span already masked
            continue
        out.append(text[pos:begin])
        out.append(mask)
        pos = end
    out.append(text[pos:])
    return "".join(out)
