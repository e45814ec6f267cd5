"""The terms of a text, for the top terms of a period (docs/feedback.md).

Chinese has no spaces: words come from jieba's segmentation (the maintained
standard for it; its dictionary loads once, ~1 s and ~50 MB, on first use,
in a worker thread). Stop words are the `stop-words` package's Chinese and
English lists plus a short list of our own (words every complaint has).
Kept: words of 2+ characters (one character says little in Chinese) and
Latin words of 3+ letters, lower-cased; no numbers; no punctuation. A term
counts once per item: the top terms are how many items mention them.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import cache
from typing import Any, Final

# Ours: filler and the words of the trade that every item has.
OWN_STOP_WORDS: Final = frozenset("""
一个 一下 一直 一点 一样 不是 不会 不能 不要 为什么 什么 今天 以后 以前 但是 你们 使用
其实 出现 到底 可以 可能 各位 因为 多少 如果 如何 已经 希望 应该 怎么 我们 所以 还是 还有
然后 现在 而且 能够 自己 觉得 谢谢 这个 这样 这次 那个 那么 非常 问题 麻烦 有点 没有 就是
时候 感觉 知道 需要 只是 一次 这么 一些 他们 她们 the and for with this that was are
""".split())
WORD: Final = re.compile(r"^[\w\u4e00-\u9fff]+$")
LATIN: Final = re.compile(r"^[a-z]+$")
MAX_TERMS: Final = 64  # per item: a long text does not outweigh many short ones
_init_lock = threading.Lock()


@cache
def _stop_words() -> frozenset[str]:
    from stop_words import get_stop_words
    return frozenset(get_stop_words("zh")) | frozenset(get_stop_words("en")) | OWN_STOP_WORDS


_tokenizer_instance: Any = None


def _tokenizer() -> Any:
    global _tokenizer_instance
    with _init_lock:  # one load, whichever thread asks first
        if _tokenizer_instance is None:
            import jieba
            jieba.setLogLevel(logging.WARNING)
            tokenizer = jieba.Tokenizer()
            tokenizer.initialize()
            _tokenizer_instance = tokenizer
        return _tokenizer_instance


def warm() -> None:
    """Load the dictionary and the stop words (call in a thread)."""
    _tokenizer()
    _stop_words()


def terms(text: str) -> list[str]:
    """The distinct terms of `text`, in order of first appearance (blocking:
    run it in a thread)."""
    stop = _stop_words()
    out: dict[str, None] = {}
    for raw in _tokenizer().lcut(text):
        word = raw.strip().lower()
        if not word or word in stop or not WORD.match(word) or word.isdigit() or "_" in word:
            continue
        if LATIN.match(word) and len(word) < 3:
            continue
        if not LATIN.match(word) and len(word) < 2:
            continue
        out[word] = None
        if len(out) >= MAX_TERMS:
            break
    return list(out)
