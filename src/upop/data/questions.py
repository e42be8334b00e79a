"""Questions about built-in scenes with ten human answers each, for VQA.

Every scene gets one question of three kinds, drawn in equal shares:

- colour: "what colour is the large square?" (the subject is the scene's only large object);
- count: "how many triangles are there?" (visible objects of a shape; the shape is one the scene shows four times
  in five, else any shape, so 0 is an answer too);
- yes/no: "is there a red circle?" (half the time an object the scene shows, else a pair it does not show).

The ten "human" answers are the truth, except that some annotators write a synonym ("purple" for magenta, "light
blue" for cyan), a number word ("two" for 2), miscount by one or flip a yes/no, so the standard VQA metric's partial
credit (min(matches / 3, 1) over the 10-choose-9 subsets) is exercised. Only objects that show count (a small object
can hide behind the large one). Deterministic from the seed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from upop.data.captions import VOCAB
from upop.data.shapes import COLOUR_NAMES, SHAPES, ShapesWorld
from upop.data.statements import BLIP_VOCAB, render_visible

HUMANS = 10
SYNONYMS = {"magenta": ("purple", "pink"), "cyan": ("light blue", "turquoise"), "yellow": ("gold",)}
NUMBERS = ("zero", "one", "two", "three", "four")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
P_SYNONYM, P_WORD, P_MISCOUNT, P_FLIP = 0.25, 0.3, 0.15, 0.1
ANSWER_TYPES = ("other", "number", "yes/no")  # the VQA answer types of the colour, count and yes/no questions


def answer_list() -> list[str]:
    """Every answer a built-in question can have (the candidates of rank inference), in normalised form."""
    colours = [*COLOUR_NAMES, *(s for names in SYNONYMS.values() for s in names)]
    return [*colours, *(str(n) for n in range(len(NUMBERS))), "yes", "no"]


QUESTION_WORDS = ("what", "colour", "is", "the", "how", "many", "are", "there", "?", "yes", "no")
CAPTION_PROMPT = "a picture of"  # BLIP's captioning prompt; its words are not scored
EXTRA_WORDS = sorted(
    (
        {w for a in answer_list() for w in a.split()}
        | set(QUESTION_WORDS)
        | set(NUMBERS)
        | set(PLURAL.values())
        | set(CAPTION_PROMPT.split())
    )
    - set(BLIP_VOCAB)
)
# the built-in BLIP's vocabulary for captioning and VQA: NLVR's and retrieval's, the questions' and answers' words and
# the caption prompt's ("a picture of"); the decoder's start token is <bos>
BLIP_GEN_VOCAB: tuple[str, ...] = BLIP_VOCAB[:-1] + tuple(EXTRA_WORDS) + ("<eos>",)
assert set(VOCAB) <= set(BLIP_GEN_VOCAB)


def _humans(truth: str, kind: int, g: torch.Generator) -> list[str]:
    """Ten annotators' answers to a question of ``kind`` (0 colour, 1 count, 2 yes/no) whose answer is ``truth``."""
    out = []
    for _ in range(HUMANS):
        u = float(torch.rand(1, generator=g))
        answer = truth
        if kind == 0 and truth in SYNONYMS and u < P_SYNONYM:
            names = SYNONYMS[truth]
            answer = names[int(torch.randint(len(names), (1,), generator=g))]
        elif kind == 1:
            n = int(truth)
            if u < P_MISCOUNT:
                up = float(torch.rand(1, generator=g)) < 0.5
                n = n + 1 if n == 0 or (up and n < len(NUMBERS) - 1) else n - 1  # stays within 0..4
            answer = NUMBERS[n] if float(torch.rand(1, generator=g)) < P_WORD else str(n)
        elif kind == 2 and u < P_FLIP:
            answer = "no" if truth == "yes" else "yes"
        out.append(answer)
    return out


def scene_questions(n: int, seed: int, image_size: int = 32, noise: float = 0.1) -> tuple:
    """``n`` questions, one per scene of a world of ``n`` scenes: (scene images (n, 3, S, S) uint8, questions,
    ten answers per question, question types (index into ``ANSWER_TYPES``), true answers)."""
    world = ShapesWorld(n, seed=seed, image_size=image_size, noise=noise)
    pixels, visible = render_visible(world)
    g = torch.Generator().manual_seed(seed * 7901 + 29)
    questions, answers, kinds, truths = [], [], [], []
    for i in range(n):
        shown = [(int(world.shape[i, k]), int(world.colour[i, k])) for k in range(int(world.count[i])) if visible[i, k]]
        kind = int(torch.randint(3, (1,), generator=g))
        if kind == 0:
            question = f"what colour is the large {SHAPES[int(world.shape[i, 0])]}?"
            truth = COLOUR_NAMES[int(world.colour[i, 0])]
        elif kind == 1:
            shapes = sorted({s for s, _ in shown})
            if shapes and float(torch.rand(1, generator=g)) < 0.8:
                shape = shapes[int(torch.randint(len(shapes), (1,), generator=g))]
            else:
                shape = int(torch.randint(len(SHAPES), (1,), generator=g))
            question = f"how many {PLURAL[SHAPES[shape]]} are there?"
            truth = str(sum(s == shape for s, _ in shown))
        else:
            if shown and float(torch.rand(1, generator=g)) < 0.5:
                shape, colour = shown[int(torch.randint(len(shown), (1,), generator=g))]
            else:
                absent = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOUR_NAMES)) if (s, c) not in shown]
                shape, colour = absent[int(torch.randint(len(absent), (1,), generator=g))]
            question = f"is there a {COLOUR_NAMES[colour]} {SHAPES[shape]}?"
            truth = "yes" if (shape, colour) in shown else "no"
        questions.append(question)
        answers.append(_humans(truth, kind, g))
        kinds.append(kind)
        truths.append(truth)
    return pixels, questions, answers, kinds, truths


def question_split(
    n: int, seed: int, image_size: int, noise: float, normalise: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[Callable[[int], torch.Tensor], list[str], list[list[str]], list[str]]:
    """(question i -> its scene's image (3, S, S) normalised, questions, ten answers each, answer types)."""
    pixels, questions, answers, kinds, _ = scene_questions(n, seed, image_size, noise)
    return (lambda i: normalise(pixels[i].float() / 255)), questions, answers, [ANSWER_TYPES[k] for k in kinds]
