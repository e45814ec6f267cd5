"""Unit tests of chat/masking.py (防飞单): phone numbers and WeChat ids typed into an
order chat are hidden from the other party.

docs/protocol.md: "a phone number (mainland mobile with or without +86, landlines,
full-width digits, separators) or a WeChat id (after 微信/vx/wx/wechat/加我)"."""

from __future__ import annotations

import pytest

from chat.masking import PHONE_MASK, WECHAT_MASK, mask_contacts

P, W = PHONE_MASK, WECHAT_MASK


def test_mask_texts_are_the_documented_ones() -> None:
    assert P == "[号码已隐藏]" and W == "[微信号已隐藏]"


@pytest.mark.parametrize(("text", "expected"), [
    # mainland mobiles, bare and inside text
    ("13812345678", P),
    ("19912345678", P),
    ("电话13812345678谢谢", f"电话{P}谢谢"),
    ("tel:15012345678.", f"tel:{P}."),
    # with the country code
    ("+8613812345678", P),
    ("+86 138 1234 5678", P),
    ("+86-138-1234-5678", P),
    ("0086 13812345678", P),
    ("86 13812345678", P),
    # separators
    ("138-1234-5678", P),
    ("138 1234 5678", P),
    ("138.1234.5678", P),
    ("138\u30001234\u30005678", P),  # ideographic spaces
    ("138－1234－5678", P),  # full-width hyphen
    ("138—1234—5678", P),
    # full-width digits
    ("１３８１２３４５６７８", P),
    ("电话：１３８－１２３４－５６７８", f"电话：{P}"),
    # landlines: area code and local number
    ("010-62345678", P),
    ("0755-88888888", P),
    ("021 62345678", P),
    ("02162345678", P),
    ("０２１－６２３４５６７８", P),
    ("电话：021-62345678 转 123", f"电话：{P} 转 123"),
    # two numbers in one text
    ("13812345678 或 13987654321", f"{P} 或 {P}"),
])
def test_phone_numbers_are_masked(text: str, expected: str) -> None:
    assert mask_contacts(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("微信 abc_123456", f"微信 {W}"),
    ("微信号：zhangsan88", f"微信号：{W}"),
    ("微信:abc123456", f"微信:{W}"),
    ("我的微信是 wxid_abc123", f"我的微信是 {W}"),
    ("微信为 li-si_2024", f"微信为 {W}"),
    ("加我微信 zhang_shifu88 方便联系", f"加我微信 {W} 方便联系"),
    ("加我 abcdef12", f"加我 {W}"),
    ("vx: zhang_san88", f"vx: {W}"),
    ("VX：abcdef1", f"VX：{W}"),
    ("Wx号 abcdef1", f"Wx号 {W}"),
    ("vx号：abcdef1", f"vx号：{W}"),
    ("wx abcdefg", f"wx {W}"),
    ("WeChat: foo_bar99", f"WeChat: {W}"),
    ("wechat id foobar1", f"wechat id {W}"),
    ("V信 hello_world", f"V信 {W}"),
    ("威信 hello_w1", f"威信 {W}"),
    # a WeChat "id" that is the phone number: masked as a number
    ("微信同号13812345678", f"微信同号{P}"),
    ("微信 13812345678", f"微信 {P}"),
    # both in one text
    ("电话 13812345678，微信 zhang_88a", f"电话 {P}，微信 {W}"),
])
def test_wechat_ids_are_masked(text: str, expected: str) -> None:
    assert mask_contacts(text) == expected


@pytest.mark.parametrize("text", [
    "好的，谢谢",
    "明天下午3点到",
    "房间 1203 室",
    "门牌号 13号楼 5单元 1203",
    "价格 138 元",
    "验证码 123456",
    "订单号 202312345678901",  # a mobile-looking run inside a longer number
    "12345678901",  # 12x is not a mobile prefix
    "23812345678",
    "电话 1381234567",  # ten digits
    "电话 138123456789",  # twelve digits
    "我家在 13 栋 812 室 345678",
    "wx: abc",  # shorter than a WeChat id
    "微信同号",
    "微信聊吧",
    "空调型号 KFR-35GW",
    "2024-05-13 14:30",
    "房间１２０３",  # full-width digits that are not a number to hide stay as typed
    "",
])
def test_ordinary_text_is_unchanged(text: str) -> None:
    assert mask_contacts(text) == text


def test_unchanged_text_is_returned_as_typed() -> None:
    text = "师傅请带上梯子，２楼"
    assert mask_contacts(text) is text


def test_masking_is_idempotent() -> None:
    once = mask_contacts("电话 138 1234 5678 微信 zhang_88a")
    assert mask_contacts(once) == once
    assert "138" not in once and "zhang_88a" not in once


# -- gaps against the documented rules ------------------------------------------------------
# "landlines ... separators": the mobile pattern accepts a separator between any two
# digits, the landline pattern only between area code and number.

@pytest.mark.parametrize("text", [
    "021-6234-5678",
    "021 6234 5678",
    "0755 2345 6789",
    "(010) 62345678",
])
def test_landlines_written_with_separators_or_brackets_are_masked(text: str) -> None:
    masked = mask_contacts(text)
    assert not any(ch.isdigit() for ch in masked), f"{text!r} -> {masked!r}"


@pytest.mark.parametrize("text", [
    "微信号是：zhangsan_88",  # "after 微信": 号 + 是 + ：
    "WECHAT: foobar1",  # vx/wx are case-insensitive, wechat only in two spellings
    "加我微信号: abc_12345",
])
def test_wechat_ids_after_common_phrasings_are_masked(text: str) -> None:
    assert W in mask_contacts(text), mask_contacts(text)
