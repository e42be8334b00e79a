"""The README's recipe for a new family: a model of the user's own, one ``upop.register_adapter`` call, and the
Pruner works on it with the same invariants (masks at 1 change nothing, masked == compressed, plan round trip)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import upop
from upop.adapters.registry import _REGISTRY


class MyAttention(nn.Module):
    """Separate q/k/v/o projections; the softmax scale is fixed at construction (slicing keeps it)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.scale = self.head_dim**-0.5
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(-1)
        return self.o((attn @ v).transpose(1, 2).reshape(b, n, -1))


class MyMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class MyModel(nn.Module):
    def __init__(self, width: int = 12, heads: int = 3, hidden: int = 20, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(5, width)
        self.blocks = nn.ModuleList(
            nn.ModuleList([MyAttention(width, heads), MyMlp(width, hidden)]) for _ in range(depth)
        )
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for attn, mlp in self.blocks:
            x = x + attn(x)
            x = x + mlp(x)
        return self.head(x.mean(1))


MY_ADAPTER = upop.Adapter(
    name="my-model",
    description="MyModel: MyAttention (q, k, v, o) + MyMlp (up, down)",
    blocks=(
        upop.BlockSpec(
            kind="attn",
            types=(f"{__name__}:MyAttention",),
            rows=(("q", lambda m: m.heads), ("k", lambda m: m.heads), ("v", lambda m: m.heads)),
            cols=(("o", lambda m: m.heads),),
            size=lambda m: m.head_dim,
            heads=lambda m: m.heads,
            resize=lambda m, old, new: setattr(m, "head_dim", new),  # `scale` keeps 1/sqrt(old)
        ),
        upop.BlockSpec(
            kind="mlp",
            types=(f"{__name__}:MyMlp",),
            rows=(("up", 1),),
            cols=(("down", 1),),
            size=lambda m: m.up.out_features,
        ),
    ),
)


def test_a_registered_family_gets_the_invariants(tmp_path):
    upop.register_adapter(MY_ADAPTER)
    try:
        torch.manual_seed(0)
        model = MyModel().eval()
        fresh = copy.deepcopy(model)
        x = torch.randn(3, 6, 5)
        before = model(x)
        pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10))
        assert pruner.adapter.name == "my-model" and len(pruner.structures) == 4
        assert torch.equal(model(x), before)  # masks at 1: bitwise the same
        g = torch.Generator().manual_seed(1)
        chosen = [torch.rand(s.size, generator=g) < 0.5 for s in pruner.structures]
        for c in chosen:
            c[0] = False
        pruner.set_choice(chosen, 0.0)
        masked = model(x)
        compressed = pruner.compress(force=True)
        torch.testing.assert_close(compressed(x), masked, rtol=1e-5, atol=1e-6)
        upop.save_compressed(compressed, tmp_path)
        loaded = upop.load_compressed(fresh, tmp_path)
        torch.testing.assert_close(loaded(x), masked, rtol=1e-5, atol=1e-6)
    finally:
        _REGISTRY.pop("my-model", None)
