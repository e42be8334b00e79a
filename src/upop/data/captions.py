"""Captions of the built-in shapes world, and the word-level tokenizer of the built-in CLIP.

Every scene gets ``CAPTIONS_PER_SCENE`` templated captions naming attributes (size, colour, shape) and spatial
relations between two objects ("a large red circle left of a small blue square"). Relations are read from the object
positions (the larger of the horizontal and vertical offsets decides), so a model must see where objects are, not
only which ones are present, and captions of different scenes often share all their words but one relation or one
attribute. Deterministic from the world's seed.
"""

from __future__ import annotations

import re

import torch

from upop.data.shapes import COLOUR_NAMES, SHAPES, SIZES, SceneObject, ShapesWorld

CAPTIONS_PER_SCENE = 5
RELATIONS = ("left of", "right of", "above", "below")
FILLERS = ("a", "alone", "on", "its", "own", "one", "and", "with", "object", "objects", "two", "three", "four")
# <eos> has the highest id, so models that pool the text at the highest token id (open_clip, OpenAI CLIP) find it
VOCAB: tuple[str, ...] = (
    ("<pad>", "<bos>")
    + tuple(
        sorted(set(FILLERS) | set(COLOUR_NAMES) | set(SHAPES) | set(SIZES) | {w for r in RELATIONS for w in r.split()})
    )
    + ("<eos>",)
)
CONTEXT_LENGTH = 16


def _phrase(o: SceneObject, g: torch.Generator) -> str:
    """The object with its attributes; the size is left out a third of the time."""
    if int(torch.randint(0, 3, (1,), generator=g)) == 0:
        return f"a {o.colour} {o.shape}"
    return f"a {o.size} {o.colour} {o.shape}"


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b`` (y grows downwards)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def scene_captions(world: ShapesWorld, i: int) -> list[str]:
    """``CAPTIONS_PER_SCENE`` captions of scene ``i``: the subject alone or with the object count, and relations
    between pairs of objects."""
    g = torch.Generator().manual_seed(world.seed * 1_000_003 + i)
    objects = world.objects(i)
    n = len(objects)
    counts = {2: "two", 3: "three", 4: "four"}
    captions = []
    for k in range(CAPTIONS_PER_SCENE):
        if n == 1:
            o = objects[0]
            single = ("{s} alone", "{s} on its own", "one object {s}", "{s}", "a {c} {sh} alone")
            captions.append(single[k].format(s=_phrase(o, g), c=o.colour, sh=o.shape))
        elif k == 0:
            captions.append(f"{counts[n]} objects with {_phrase(objects[0], g)}")
        else:
            a, b = torch.randperm(n, generator=g)[:2].tolist()
            captions.append(f"{_phrase(objects[a], g)} {relation(objects[a], objects[b])} {_phrase(objects[b], g)}")
    return captions


class WordTokenizer:
    """Word tokenizer over ``vocab`` (default ``VOCAB``, the captions' words; it starts with ``<pad>``, ``<bos>``
    and ends with ``<eos>``): ``<bos>`` words ``<eos>``, padded with ``<pad>`` (id 0) to ``context_length``. Words
    are runs of letters and digits; any other visible character is a word of its own ("?"). Called on a list of
    strings it returns {"input_ids", "attention_mask"} (long tensors); ``decode`` maps ids back to text. The
    ``<eos>`` id is the highest."""

    def __init__(self, context_length: int = CONTEXT_LENGTH, vocab: tuple[str, ...] = VOCAB) -> None:
        self.context_length, self.vocab = context_length, vocab
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, len(vocab) - 1

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """``max_length``: a cap on the tokens of a text (BLIP's tasks cap theirs), within ``context_length``."""
        length = min(self.context_length, max_length or self.context_length)
        ids = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            words = re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text.lower())
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise ValueError(f"the built-in tokenizer knows only the shapes-world words; got {unknown[0]!r}")
            tokens = [self.bos_id, *(self.ids[w] for w in words)][: length - 1] + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """The words of ``ids`` up to the first ``<eos>``, without the special tokens (those written ``<...>``)."""
        words = []
        for i in torch.as_tensor(ids).tolist():
            if i == self.eos_id:
                break
            word = self.vocab[i]
            if not (word.startswith("<") and word.endswith(">")):
                words.append(word)
        return " ".join(words)
