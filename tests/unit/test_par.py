import torch

from wsss.cam.par import par_affinity, par_refine


def test_flat_image_gives_uniform_affinity_and_exact_gain():
    img = torch.zeros(1, 3, 5, 6)
    aff = par_affinity(img, dilations=(1, 2))
    # colour term: softmax of 16 equal values = 1/16; position term adds 0.01 * softmax over neighbours
    assert aff.shape == (1, 16, 5, 6)
    assert torch.allclose(aff.sum(1), torch.full((1, 5, 6), 1.01))
    cmap = torch.full((1, 1, 5, 6), 2.0)
    out = par_refine(img, cmap, iters=3, dilations=(1, 2))
    assert torch.allclose(out, torch.full_like(out, 2.0 * 1.01**3))


def test_strong_edge_stops_propagation_flat_image_does_not():
    img = torch.zeros(1, 3, 8, 8)
    img[..., 4:] = 1.0
    img += 0.01 * torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    m = torch.zeros(1, 1, 8, 8)
    m[..., :4] = 1.0
    edge = par_refine(img, m, iters=10, dilations=(1, 2, 4))
    flat = par_refine(torch.zeros_like(img), m, iters=10, dilations=(1, 2, 4))
    assert edge[..., 4:].max() < 0.05  # mass stays on its side of the colour edge
    assert flat[..., 4:].mean() > 0.2  # without an edge it spreads
