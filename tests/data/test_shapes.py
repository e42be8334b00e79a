"""The shapes world: deterministic, batching-invariant, and its ground truth agrees with its pixels."""

from __future__ import annotations

import torch

from upop.data.shapes import COLOURS, SHAPES, ShapesWorld, class_names, num_classes, subject_label


def test_same_seed_same_scenes_other_seed_other_scenes():
    a, b, c = ShapesWorld(40, seed=3), ShapesWorld(40, seed=3), ShapesWorld(40, seed=4)
    xa, sa = a.render(torch.arange(40))
    xb, sb = b.render(torch.arange(40))
    xc, _ = c.render(torch.arange(40))
    assert torch.equal(xa, xb) and torch.equal(sa, sb)
    assert not torch.equal(xa, xc)
    assert [a.objects(i) for i in range(40)] == [b.objects(i) for i in range(40)]


def test_rendering_does_not_depend_on_batching():
    world = ShapesWorld(600, seed=1)
    full, seg = world.render(torch.arange(600))
    some = torch.tensor([599, 3, 300, 257])
    part, part_seg = world.render(some)
    assert torch.equal(part, full[some]) and torch.equal(part_seg, seg[some])


def test_object_lists_match_the_segmentation_and_labels():
    world = ShapesWorld(200, seed=2, noise=0.0)
    images, seg = world.render(torch.arange(200))
    labels = subject_label(world)
    names = class_names()
    assert len(names) == num_classes() == len(SHAPES) * len(COLOURS)
    for i in range(200):
        objs = world.objects(i)
        assert 1 <= len(objs) <= 4 and objs[0].size == "large"
        assert all(o.size == "small" for o in objs[1:])
        assert names[labels[i]] == f"{objs[0].colour} {objs[0].shape}"
        assert set(seg[i].unique().tolist()) <= set(range(len(objs) + 1))
        # the subject is large and painted: it is visible somewhere, in its own colour (noise is off)
        visible = seg[i] == 1
        assert visible.sum() > 10
        rgb = images[i][:, visible].mean(dim=1)
        assert torch.allclose(rgb, torch.tensor(COLOURS[objs[0].colour]), atol=0.05)
