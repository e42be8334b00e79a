"""Text as BLIP's data code prepares it before tokenizing (``pre_caption``, ``pre_question`` of BLIP's
``data/utils.py``, which UPop's code uses for every BLIP task and for CLIP retrieval): lower case, a few punctuation
marks out, and a cap on the words. On the built-in world's texts (lower case, no such marks) both are the identity."""

from __future__ import annotations

import re

_MARKS = re.compile(r"[.!\"()*#:;~]")
CAPTION_WORDS = 30  # retrieval and captioning
STATEMENT_WORDS = 40  # NLVR2
QUESTION_WORDS = 50  # VQA


def pre_caption(text: str, max_words: int = CAPTION_WORDS) -> str:
    """Lower case, ``.!"()*#:;~`` each read as a space, runs of white space as one, the first ``max_words`` words."""
    text = re.sub(r"\s{2,}", " ", _MARKS.sub(" ", text.lower())).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def pre_question(text: str, max_words: int = QUESTION_WORDS) -> str:
    """Lower case, ``.!"()*#:;~`` removed, trailing spaces cut, the first ``max_words`` words."""
    text = _MARKS.sub("", text.lower()).rstrip(" ")
    return " ".join(text.split(" ")[:max_words])
