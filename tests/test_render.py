"""render.py: colormaps match matplotlib, overlay blends, grid arithmetic, captions draw, PNGs round-trip."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_saliency.render import colorize, get_cmap, grid, overlay, save_png, to_image


def _mpl_rgb(name: str, value: float) -> list[int]:
    r, g, b, _ = matplotlib.colormaps[name](value)
    return [int(round(r * 255)), int(round(g * 255)), int(round(b * 255))]


@pytest.mark.parametrize("name", ["jet", "viridis"])
def test_colorize_endpoints_match_matplotlib(name):
    lo = colorize(np.zeros((3, 4)), name)
    hi = colorize(np.ones((3, 4)), name)
    assert lo.shape == (3, 4, 3) and lo.dtype == np.uint8
    assert np.all(lo == lo[0, 0]) and np.all(hi == hi[0, 0])
    assert np.abs(lo[0, 0].astype(int) - _mpl_rgb(name, 0.0)).max() <= 1
    assert np.abs(hi[0, 0].astype(int) - _mpl_rgb(name, 1.0)).max() <= 1


def test_colorize_jet_known_values_and_ramp():
    # jet runs from dark blue (0, 0, 0.5) to dark red (0.5, 0, 0)
    assert colorize(np.zeros((1, 1)))[0, 0].tolist() == [0, 0, 127]
    assert colorize(np.ones((1, 1)))[0, 0].tolist() == [127, 0, 0]
    ramp = np.linspace(0, 1, 11)[None, :]
    got = colorize(ramp, "viridis")[0].astype(int)
    want = np.array([_mpl_rgb("viridis", v) for v in ramp[0]])
    assert np.abs(got - want).max() <= 1
    # out-of-range values are clipped, NaN counts as 0, tensors accepted
    clipped = colorize(torch.tensor([[-3.0, 7.0, float("nan")]]))
    assert clipped[0, 0].tolist() == [0, 0, 127] and clipped[0, 1].tolist() == [127, 0, 0]
    assert clipped[0, 2].tolist() == [0, 0, 127]


def test_unknown_colormap_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown colormap 'jett'"):
        get_cmap("jett")


def test_to_image_minmax_channels_and_layouts():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4) * 0.1 - 0.3
    img = to_image(x)
    assert img.shape == (3, 4, 3) and img.dtype == np.uint8
    assert img.min() == 0 and img.max() == 255
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
    rgb = torch.rand(3, 5, 6)
    a = to_image(rgb)
    assert a.shape == (5, 6, 3)
    # same image as HWC numpy array gives the same pixels
    assert np.array_equal(to_image(rgb.permute(1, 2, 0).numpy()), a)
    assert np.array_equal(to_image(rgb.numpy()), a)
    # uint8 input passes through; constant input -> black, not NaN
    u = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert np.array_equal(to_image(u), u)
    assert to_image(torch.full((3, 2, 2), 4.0)).max() == 0
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_image(torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="one image"):
        to_image(torch.rand(2, 3, 4, 4))


def test_overlay_alpha_endpoints_and_blend():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)
    m = rng.random((16, 12))
    assert np.array_equal(overlay(img, m, alpha=0.0), img)
    assert np.array_equal(overlay(img, m, alpha=1.0), colorize(m))
    half = overlay(img, m, alpha=0.5).astype(int)
    want = np.round(0.5 * img + 0.5 * colorize(m)).astype(int)
    assert np.abs(half - want).max() <= 1
    # a smaller map is resized to the image
    small = overlay(img, np.ones((4, 3)), alpha=1.0)
    assert small.shape == img.shape and np.all(small == colorize(np.ones((1, 1)))[0, 0])
    # a float tensor image is converted with to_image
    assert overlay(torch.rand(3, 16, 12), m, 0.3).shape == (16, 12, 3)
    with pytest.raises(ValueError, match="alpha"):
        overlay(img, m, alpha=1.5)


@pytest.mark.parametrize("n,ncols,pad", [(1, None, 2), (5, None, 2), (9, None, 0), (7, 2, 3), (4, 10, 1)])
def test_grid_shape_arithmetic(n, ncols, pad):
    h, w = 10, 14
    tiles = [np.full((h, w, 3), i * 20, np.uint8) for i in range(n)]
    g = grid(tiles, ncols=ncols, pad=pad)
    cols = min(ncols or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    assert g.shape == (rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3)
    assert g.dtype == np.uint8
    # every tile sits where the arithmetic says
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        assert np.array_equal(g[y:y + h, x:x + w], t)


def test_grid_captions_draw_pixels_and_add_a_band():
    tiles = [np.zeros((32, 64, 3), np.uint8) for _ in range(4)]
    plain = grid(tiles, pad=2)
    blank = grid(tiles, captions=["", "", "", ""], pad=2)
    texted = grid(tiles, captions=["cat / dog", "a", "b", "c"], pad=2)
    assert blank.shape == texted.shape and texted.shape[0] > plain.shape[0]
    assert texted.shape[1] == plain.shape[1]
    band_h = (texted.shape[0] - plain.shape[0]) // 2  # 2 rows of tiles
    assert blank.max() == 0  # empty captions draw nothing
    # the caption band under tile 0 has text pixels; the tile itself is untouched
    band = texted[2 + 32:2 + 32 + band_h, 2:2 + 64]
    assert band.max() > 100
    assert texted[2:2 + 32, 2:2 + 64].max() == 0
    # a different caption gives different pixels
    other = grid(tiles, captions=["dog / cat", "a", "b", "c"], pad=2)
    assert not np.array_equal(other, texted)
    # long captions wrap and are cut, never wider than the tile
    long = grid(tiles, captions=["word " * 40] * 4, pad=2, max_caption_lines=2)
    assert long.shape[1] == plain.shape[1]
    with pytest.raises(ValueError, match="captions"):
        grid(tiles, captions=["only one"])
    with pytest.raises(ValueError, match="at least one"):
        grid([])


def test_grid_mixed_sizes_pad_to_largest():
    g = grid([np.zeros((8, 8, 3), np.uint8), np.zeros((10, 6, 3), np.uint8)], pad=1)
    assert g.shape == (1 * 10 + 2, 2 * 8 + 3, 3)


def test_save_png_round_trip(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    p = save_png(a, tmp_path / "sub" / "x.png")
    assert p.exists() and [q.name for q in p.parent.iterdir()] == ["x.png"]  # no temp file left
    back = np.asarray(Image.open(p).convert("RGB"))
    assert np.array_equal(back, a)
    gray = a[..., 0]
    assert np.array_equal(np.asarray(Image.open(save_png(gray, tmp_path / "g.png"))), gray)
    with pytest.raises(ValueError, match="uint8"):
        save_png(a.astype(np.float32), tmp_path / "bad.png")


def test_module_doctests():
    import doctest

    import lightning_saliency.render as render_mod

    result = doctest.testmod(render_mod)
    assert result.failed == 0 and result.attempted > 5


def test_batched_overlays_equal_one_by_one():
    from lightning_saliency.render import overlays

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 12, 10, 3), dtype=np.uint8)
    for maps, kw in ((rng.random((5, 12, 10)), {}), (rng.random((5, 3, 4)), {"alpha": 0.3, "cmap": "viridis"}),
                     (np.full((5, 12, 10), np.nan), {"alpha": 1.0})):
        batch = overlays(images, maps, **kw)
        assert batch.shape == (5, 12, 10, 3) and batch.dtype == np.uint8
        for i in range(5):
            assert np.array_equal(batch[i], overlay(images[i], maps[i], **kw))
    with pytest.raises(ValueError, match="one map"):
        overlays(images, rng.random((4, 12, 10)))
