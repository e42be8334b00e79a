"""True/false statements about pairs of built-in scenes, for NLVR (natural-language visual reasoning over two images).

Every sample is (left scene, right scene, statement, label). Statements compare the two images, so that no single
image decides them: "both images contain a red object", "only one image contains a triangle", "the left image has
more objects than the right image", "the two images have the same number of objects". For the presence statements
at least one of the two images always holds the named colour or shape (which one is random), so the answer turns on
the other image. Labels are balanced: each sample draws its label first and then a pair of scenes that makes the
statement take it. Only objects that show count (a small object can hide behind a large one). Deterministic from the
seed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from upop.data.captions import VOCAB
from upop.data.shapes import COLOUR_NAMES, MAX_OBJECTS, SHAPES, ShapesWorld

TEMPLATES = (
    "both images contain a {colour} object",
    "only one image contains a {colour} object",
    "both images contain a {shape}",
    "only one image contains a {shape}",
    "the left image has more objects than the right image",
    "the right image has more objects than the left image",
    "the two images have the same number of objects",
)
WORDS = sorted({w for t in TEMPLATES for w in t.split() if "{" not in w})
# the built-in BLIP's vocabulary: the captions' words, the statements' words and BLIP's encoder token
BLIP_VOCAB: tuple[str, ...] = ("<pad>", "<bos>", "<enc>") + tuple(sorted(set(VOCAB[2:-1]) | set(WORDS))) + ("<eos>",)
ACTIVE = tuple(range(len(TEMPLATES)))  # the templates drawn from
MIN_VISIBLE = 4  # pixels of an object that must show for a statement to count it
CANDIDATES = 64  # scene pairs tried at once when looking for one that gives a statement the wanted label


def _facts(world: ShapesWorld, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per scene, from its visible objects only: colours present (N, C), shapes present (N, S), object count (N,)."""
    colours = torch.zeros(world.n, len(COLOUR_NAMES), dtype=torch.bool)
    shapes = torch.zeros(world.n, len(SHAPES), dtype=torch.bool)
    for k in range(visible.shape[1]):
        rows = visible[:, k].nonzero().squeeze(1)
        colours[rows, world.colour[rows, k]] = True
        shapes[rows, world.shape[rows, k]] = True
    return colours, shapes, visible.sum(1)


def render_visible(world: ShapesWorld) -> tuple[torch.Tensor, torch.Tensor]:
    """Every scene rendered (N, 3, S, S) uint8, and which objects are visible (N, MAX_OBJECTS): at least
    ``MIN_VISIBLE`` pixels of it show (a small object may hide wholly behind a large one, and then a statement must
    not count it)."""
    chunks, visible = [], []
    for start in range(0, world.n, 4096):
        x, seg = world.render(torch.arange(start, min(world.n, start + 4096)))
        chunks.append((x * 255).round().to(torch.uint8))
        ids = torch.arange(1, MAX_OBJECTS + 1).view(1, -1, 1)
        visible.append((seg.flatten(1).unsqueeze(1) == ids).sum(2) >= MIN_VISIBLE)
    return torch.cat(chunks), torch.cat(visible)


def _truth(t: int, a: int, left: torch.Tensor, right: torch.Tensor, facts) -> tuple[torch.Tensor, torch.Tensor]:
    """(label, allowed) of template ``t`` with attribute ``a`` for candidate pairs (left[i], right[i])."""
    colours, shapes, count = facts
    if t < 4:
        table = colours if t < 2 else shapes
        in_left, in_right = table[left, a], table[right, a]
        allowed = in_left | in_right  # one of the two always holds it: the other image decides
        return ((in_left & in_right) if t % 2 == 0 else (in_left ^ in_right)), allowed
    cl, cr = count[left], count[right]
    label = cl > cr if t == 4 else (cr > cl if t == 5 else cl == cr)
    return label, torch.ones_like(label)


def statement_pairs(
    n: int, seed: int, image_size: int = 32, noise: float = 0.1
) -> tuple[ShapesWorld, torch.Tensor, torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """``n`` samples over a world of 2n scenes: (world, its images (2n, 3, S, S) uint8, visible objects (2n, 4),
    scene pairs (n, 2), statements, labels (n,) in {0, 1})."""
    world = ShapesWorld(max(2 * n, 16), seed=seed, image_size=image_size, noise=noise)
    pixels, visible = render_visible(world)
    facts = _facts(world, visible)
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    pairs = torch.empty(n, 2, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    sentences = []
    for i in range(n):
        t = ACTIVE[int(torch.randint(len(ACTIVE), (1,), generator=g))]
        want = bool(torch.randint(2, (1,), generator=g))
        while True:
            a = int(torch.randint(len(COLOUR_NAMES) if t < 2 else len(SHAPES), (1,), generator=g))
            cand = torch.randint(world.n, (CANDIDATES, 2), generator=g)
            label, allowed = _truth(t, a, cand[:, 0], cand[:, 1], facts)
            ok = (allowed & (label == want) & (cand[:, 0] != cand[:, 1])).nonzero()
            if ok.numel():
                pairs[i] = cand[int(ok[0])]
                break
        labels[i] = int(want)
        words = {"colour": COLOUR_NAMES[a] if t < 2 else "", "shape": SHAPES[a] if 2 <= t < 4 else ""}
        sentences.append(TEMPLATES[t].format(**words))
    return world, pixels, visible, pairs, sentences, labels


def statement_split(
    n: int, seed: int, image_size: int, noise: float, normalise: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[Callable[[int], torch.Tensor], list[str], torch.Tensor]:
    """(sample i -> its two images (2, 3, S, S) normalised, statements, labels) of ``n`` built-in samples."""
    _, pixels, _, pairs, sentences, labels = statement_pairs(n, seed, image_size, noise)
    return (lambda i: normalise(pixels[pairs[i]].float() / 255)), sentences, labels
