"""The built-in procedural "shapes world".

A scene holds 1-4 objects, each with a shape, a colour, a size and a position. Scenes are drawn from a seed with
torch's generator, so the same seed gives the same scenes on every machine and every rank, and nothing is read from
disk. Every task derives its ground truth from the object list of a scene: the class label here; per-pixel
segmentation maps (``render`` returns them); captions, question/answer pairs and true/false statements about image
pairs in later tasks.

Object 0 of every scene is its *subject*: always large, while the other objects are small distractors. Objects are
painted in a random depth order, so distractors may hide part of the subject.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.15),
    "magenta": (0.85, 0.20, 0.85),
    "cyan": (0.15, 0.85, 0.90),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: dict[str, float] = {"small": 0.1, "large": 0.3}  # radius as a fraction of the image side
MAX_OBJECTS = 4
NOISE_CHUNK = 256


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene. ``x`` and ``y`` are the centre in [0, 1] image coordinates (y grows downwards)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float


def _shape_masks(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Inside-tests for every shape at once. shape (B,), dx/dy (B, S, S) offsets from the centre, r (B, 1, 1)."""
    ax, ay = dx.abs(), dy.abs()
    inside = torch.stack(
        [
            dx * dx + dy * dy <= r * r,  # circle
            torch.maximum(ax, ay) <= 0.85 * r,  # square
            (dy <= 0.8 * r) & (dy >= -r) & (ax <= (dy + r) * 0.55),  # triangle, apex up
            ax + ay <= 1.1 * r,  # diamond
            ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r)),  # cross
        ],
        dim=1,
    )  # (B, n_shapes, S, S)
    return inside.gather(1, shape.view(-1, 1, 1, 1).expand(-1, 1, *dx.shape[1:])).squeeze(1)


class ShapesWorld:
    """``n`` deterministic scenes drawn from ``seed``.

    Scenes are stored as small integer/float tensors (N, MAX_OBJECTS); images are rendered on demand by ``render``,
    which is vectorised over a batch of scenes. Different ``seed`` values give independent splits.
    """

    def __init__(self, n: int, seed: int = 0, image_size: int = 32, noise: float = 0.1) -> None:
        if n <= 0:
            raise ValueError(f"a shapes world needs at least one scene, got n={n}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        self.n, self.seed, self.image_size, self.noise = n, seed, image_size, noise
        g = torch.Generator().manual_seed(seed)
        self.count = torch.randint(1, MAX_OBJECTS + 1, (n,), generator=g)
        self.shape = torch.randint(0, len(SHAPES), (n, MAX_OBJECTS), generator=g)
        self.colour = torch.randint(0, len(COLOURS), (n, MAX_OBJECTS), generator=g)
        self.size = torch.zeros(n, MAX_OBJECTS, dtype=torch.long)
        self.size[:, 0] = 1  # the subject is large, distractors small
        margin = 0.25
        self.xy = margin + (1 - 2 * margin) * torch.rand(n, MAX_OBJECTS, 2, generator=g)
        self.depth = torch.rand(n, MAX_OBJECTS, generator=g).argsort(dim=1)  # painting order
        self.background = 0.05 + 0.25 * torch.rand(n, 3, generator=g)
        self.jitter = 0.08 * (torch.rand(n, MAX_OBJECTS, 3, generator=g) - 0.5)
        self._noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))

    def __len__(self) -> int:
        return self.n

    def objects(self, i: int) -> list[SceneObject]:
        """The object list of scene ``i``; element 0 is the subject."""
        sizes = tuple(SIZES)
        return [
            SceneObject(
                SHAPES[int(self.shape[i, k])],
                COLOUR_NAMES[int(self.colour[i, k])],
                sizes[int(self.size[i, k])],
                float(self.xy[i, k, 0]),
                float(self.xy[i, k, 1]),
            )
            for k in range(int(self.count[i]))
        ]

    def render(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Render scenes ``index`` (B,). Returns images (B, 3, S, S) in [0, 1] and segmentation maps (B, S, S) int64
        holding 0 for background and k + 1 where object k is visible."""
        index = torch.as_tensor(index, dtype=torch.long).view(-1)
        s = self.image_size
        b = index.numel()
        coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s
        gy, gx = torch.meshgrid(coords, coords, indexing="ij")
        image = self.background[index].view(b, 3, 1, 1).expand(b, 3, s, s).clone()
        seg = torch.zeros(b, s, s, dtype=torch.long)
        palette = torch.tensor(list(COLOURS.values()))
        radius = torch.tensor(list(SIZES.values()))
        for layer in range(MAX_OBJECTS):
            k = self.depth[index, layer]  # which object slot is painted at this depth, per scene
            present = (k < self.count[index]).view(b, 1, 1)
            take = lambda t: t[index].gather(1, k.view(b, 1)).squeeze(1)  # noqa: E731
            centre = self.xy[index].gather(1, k.view(b, 1, 1).expand(b, 1, 2)).squeeze(1)
            dx = gx.unsqueeze(0) - centre[:, 0].view(b, 1, 1)
            dy = gy.unsqueeze(0) - centre[:, 1].view(b, 1, 1)
            r = radius[take(self.size)].view(b, 1, 1)
            inside = _shape_masks(take(self.shape), dx, dy, r) & present
            rgb = palette[take(self.colour)] + self.jitter[index].gather(1, k.view(b, 1, 1).expand(b, 1, 3)).squeeze(1)
            image = torch.where(inside.unsqueeze(1), rgb.view(b, 3, 1, 1), image)
            seg = torch.where(inside, (k + 1).view(b, 1, 1), seg)
        if self.noise > 0:
            image = image + self.noise * _chunk_noise(index, self._noise_seed, s)
        return image.clamp_(0, 1), seg


def _chunk_noise(index: torch.Tensor, seed: int, s: int) -> torch.Tensor:
    """Standard normal noise (B, 3, S, S) that depends on (seed, scene index) only, so a scene's pixels are identical
    however scenes are batched: scenes come in chunks of NOISE_CHUNK, each chunk drawn from its own seeded generator."""
    out = torch.empty(index.numel(), 3, s, s)
    chunk = index // NOISE_CHUNK
    for c in chunk.unique().tolist():
        block = torch.randn(NOISE_CHUNK, 3, s, s, generator=torch.Generator().manual_seed(seed + c))
        sel = chunk == c
        out[sel] = block[index[sel] % NOISE_CHUNK]
    return out


def subject_label(world: ShapesWorld) -> torch.Tensor:
    """Classification target for every scene (N,): the subject's shape and colour, shape-major."""
    return world.shape[:, 0] * len(COLOURS) + world.colour[:, 0]


def class_names() -> list[str]:
    """Names of the ``subject_label`` classes, in label order."""
    return [f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES]


def num_classes() -> int:
    return len(SHAPES) * len(COLOURS)


SEGMENTATION_CLASSES: tuple[str, ...] = ("background", *SHAPES)


def semantic_map(world: ShapesWorld, index: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Per-pixel classes (B, S, S) of scenes ``index`` from their object maps ``seg`` (``render``'s): 0 for the
    background, 1 + the shape of the object that shows there (``SEGMENTATION_CLASSES``)."""
    index = torch.as_tensor(index, dtype=torch.long).view(-1)
    shapes = torch.cat([torch.full((len(index), 1), -1), world.shape[index]], dim=1)  # object k + 1 -> its shape
    return shapes.gather(1, seg.flatten(1)).view_as(seg) + 1
