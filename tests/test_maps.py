"""wsss_bench.maps: minmax, Up, the CAM rule and the Otsu rule (docs/methods/conventions.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu

from wsss_bench.maps import binarize_cam, minmax, otsu_masks, otsu_thresholds, upsample


def test_minmax_per_image_exact_ends():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(4, 9, 7, generator=g) * torch.tensor([1.0, 10.0, 1e-3, 1e3])[:, None, None]
    out = minmax(m)
    flat = out.reshape(4, -1)
    assert torch.equal(flat.amin(1), torch.zeros(4))
    assert torch.equal(flat.amax(1), torch.ones(4))  # exactly 1: Otsu relies on it
    # each image independently: scaling one image does not change another's result
    m2 = m.clone()
    m2[0] *= 100
    assert torch.allclose(minmax(m2)[1:], out[1:])


def test_minmax_constant_and_near_constant_give_zeros():
    m = torch.stack([torch.full((5, 5), 3.0), torch.full((5, 5), -1.0), torch.rand(5, 5)])
    m[1, 0, 0] += 1e-9  # range below 1e-8 counts as constant
    out = minmax(m)
    assert torch.equal(out[0], torch.zeros(5, 5))
    assert torch.equal(out[1], torch.zeros(5, 5))
    assert out[2].max() == 1.0
    assert not binarize_cam(m)[:2].any()
    assert not otsu_masks(m)[:2].any()


def test_upsample_is_bilinear_without_corner_alignment():
    m = torch.rand(2, 3, 4, 4)
    ref = F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(upsample(m, 16), ref)
    assert torch.equal(upsample(m[:, 0], (16, 16)), ref[:, 0])
    assert upsample(m[:, 0], (8, 12)).shape == (2, 8, 12)
    assert torch.equal(upsample(m[:, 0], 4), m[:, 0])  # same size: unchanged
    with pytest.raises(ValueError):
        upsample(torch.rand(4, 4), 8)


def test_binarize_cam_is_minmax_above_threshold():
    m = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])  # minmax: 0, .25, .5, 1
    assert binarize_cam(m).tolist() == [[[False, False], [False, True]]]
    assert binarize_cam(m, 0.2).tolist() == [[[False, True], [True, True]]]


def _random_maps(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b, s = 6, 33
    uni = torch.rand(b, s, s, generator=g)
    bimodal = torch.randn(b, s, s, generator=g) * 0.3 + (torch.rand(b, s, s, generator=g) > 0.7) * 2.0
    skewed = torch.rand(b, s, s, generator=g) ** 4 * 7.0 - 3.0
    blob = torch.zeros(b, s, s)
    blob[:, 10:20, 5:25] = 1.0
    blob = blob + 0.05 * torch.randn(b, s, s, generator=g)
    return torch.cat([uni, bimodal, skewed, blob])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_otsu_equals_skimage(seed, dtype):
    maps = _random_maps(seed).to(dtype)
    th = otsu_thresholds(maps)
    masks = otsu_masks(maps)
    mm = minmax(maps).numpy()
    for i in range(maps.shape[0]):
        ref_th = threshold_otsu(mm[i], nbins=256)
        assert th[i].item() == float(ref_th), i
        assert np.array_equal(masks[i].numpy(), mm[i] > ref_th), i


def test_otsu_is_scale_invariant_and_handles_few_values():
    two = torch.tensor([[[0.0, 0.0], [5.0, 5.0]], [[1.0, 2.0], [3.0, 2.0]]])
    for i, mm in enumerate(minmax(two).numpy()):
        assert otsu_thresholds(two)[i].item() == float(threshold_otsu(mm, nbins=256))
    assert torch.equal(otsu_masks(two), otsu_masks(two * 7 + 3))
    assert otsu_masks(two)[0].tolist() == [[False, False], [True, True]]
