"""Pixels and tokens in imagegpt.py: the palette, quantising, k-means, and the PNG reader and writer.

    tokens              dequantise then quantise gives the tokens back, for any palette whose colours are
                        distinct at 8 bits; quantise picks the nearest colour
    k-means             fit_palette recovers the colours of synthetic images; deterministic under its seed;
                        more colours asked than the images hold gives no NaN and no stray colour
    PNG                 write then read gives the same pixels; the reader undoes every filter type, in every
                        colour type, across several IDAT chunks, on files written by an encoder in this test
                        (not by write_png); bad files give a ValueError naming the file

None of these run a model, so they take no `device`.
"""

import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import imagegpt
from imagegpt import (
    dequantise,
    fit_palette,
    image_grid,
    load_palette,
    nearest_colour,
    quantise,
    read_png,
    resize_image,
    save_palette,
    to_rgb,
    write_png,
)
from helpers import examples


# --- tokens and the palette --------------------------------------------------------------------------


@st.composite
def palettes_distinct_at_8_bits(draw):
    """K colours that stay distinct after dequantise's rounding: K different 8-bit colours, each moved by less
    than a quarter of a level per channel. Rounding takes each back to its own 8-bit colour, which is then
    nearer to it (at most 0.43 levels away) than to any other (at least 1 - 0.43 levels away)."""
    k = draw(st.integers(1, 64))
    colours = draw(st.lists(st.tuples(*[st.integers(0, 255)] * 3), min_size=k, max_size=k, unique=True))
    jitter = draw(st.lists(st.tuples(*[st.floats(-0.24, 0.24)] * 3), min_size=k, max_size=k))
    levels = np.clip(np.array(colours, dtype=np.float64) + np.array(jitter), 0, 255)  # palettes live in [-1, 1]
    return torch.tensor(levels / 127.5 - 1.0, dtype=torch.float64)


@examples(40)
@given(palette=palettes_distinct_at_8_bits(), data=st.data())
def test_dequantise_then_quantise_returns_the_tokens_for_any_palette(palette, data):
    n_px = data.draw(st.integers(1, 6), label="n_px")
    B = data.draw(st.integers(1, 3), label="B")
    tokens = torch.tensor(data.draw(st.lists(st.integers(0, len(palette) - 1), min_size=B * n_px * n_px,
                                             max_size=B * n_px * n_px), label="tokens")).view(B, n_px * n_px)
    images = dequantise(tokens, palette)  # (B, n_px, n_px, 3) uint8
    assert images.shape == (B, n_px, n_px, 3) and images.dtype == torch.uint8
    assert torch.equal(quantise(images, palette), tokens)
    assert torch.equal(quantise(images[0], palette), tokens[0])  # one image in, one token row out


@examples(25)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 512))
def test_quantise_picks_the_nearest_colour(seed, k):
    g = torch.Generator().manual_seed(seed)
    palette = torch.rand(k, 3, generator=g) * 2 - 1
    image = torch.randint(0, 256, (5, 7, 3), generator=g, dtype=torch.uint8)
    tokens = quantise(image, palette)
    pixels = image.double().view(-1, 3) / 127.5 - 1
    distances = ((pixels[:, None, :] - palette.double()[None]) ** 2).sum(-1)  # (N, K), computed directly
    chosen = distances.gather(1, tokens[:, None])[:, 0]
    # The chosen colour is at the minimum distance (float64 of two formulas: 1e-12 covers their rounding).
    assert torch.all(chosen <= distances.min(1).values + 1e-12)


def test_nearest_colour_works_in_chunks():
    g = torch.Generator().manual_seed(0)
    palette, pixels = torch.rand(16, 3, generator=g) * 2 - 1, torch.rand(1000, 3, generator=g) * 2 - 1
    assert torch.equal(nearest_colour(pixels, palette, chunk=7), nearest_colour(pixels, palette))


def test_quantise_resizes_to_n_px_first():
    palette = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])  # black, white
    image = np.zeros((40, 30, 3), np.uint8)
    image[:20] = 255  # top half white
    tokens = quantise(image, palette, n_px=4)
    assert tokens.tolist() == [1] * 8 + [0] * 8  # raster order: the top two rows white, the bottom two black
    batch = quantise([image, image[:, :10]], palette, n_px=4)  # different sizes are fine with n_px
    assert batch.shape == (2, 16) and torch.equal(batch[0], tokens)


def test_resize_keeps_flat_colours_and_same_size_images():
    flat = np.full((37, 23, 3), (10, 200, 77), np.uint8)
    assert np.array_equal(resize_image(flat, 8).numpy(), np.full((8, 8, 3), (10, 200, 77), np.uint8))
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(resize_image(image, 8).numpy(), image)  # bilinear at scale 1 samples pixel centres


def pillow_style_bilinear(image, n):
    """Pillow's BILINEAR resize written out in numpy, for shrinking: each output pixel is a weighted mean of
    the input pixels under a triangle whose half-width is the shrink factor (so every input pixel counts),
    applied to rows, then to columns."""
    def along(x, axis):
        size = x.shape[axis]
        scale = size / n
        centres = (np.arange(n) + 0.5) * scale  # output pixel centres, in input coordinates
        inputs = np.arange(size) + 0.5
        weights = np.clip(1 - np.abs(inputs[None, :] - centres[:, None]) / scale, 0, None)  # (n, size)
        weights /= weights.sum(1, keepdims=True)
        return np.moveaxis(np.tensordot(weights, np.moveaxis(x, axis, 0), axes=1), 0, axis)
    return np.clip(np.round(along(along(image.astype(np.float64), 0), 1)), 0, 255)


def test_resize_filters_like_pillow_when_shrinking():
    """Bilinear with the filter widened to the shrink factor, as Pillow (the reference's resizer) does: a
    plain bilinear lookup would read 4 pixels of every 8 x 8 block and alias."""
    image = np.random.default_rng(2).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    expected = pillow_style_bilinear(image, 8)
    # float32 in torch vs float64 here: values within a level (a .5 may round either way).
    assert np.abs(resize_image(image, 8).numpy().astype(int) - expected).max() <= 1


def test_resize_matches_pillow_bilinear():
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed: nothing to compare with")
    image = np.random.default_rng(1).integers(0, 256, (67, 45, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR)).astype(int)
    # Pillow filters in fixed point and rounds once; torch in float: a level apart at most.
    assert np.abs(resize_image(image, 32).numpy().astype(int) - expected).max() <= 1


def test_bad_palettes_and_tokens_are_refused():
    with pytest.raises(ValueError, match="divide by 127.5 and subtract 1"):
        quantise(np.zeros((2, 2, 3), np.uint8), torch.tensor([[0.0, 128.0, 255.0]]))
    with pytest.raises(ValueError, match="palette has shape"):
        quantise(np.zeros((2, 2, 3), np.uint8), torch.zeros(4, 4))
    with pytest.raises(TypeError, match="uint8"):
        quantise(np.zeros((2, 2, 3), np.float32), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="colour 4"):  # SOS left in front of the pixels
        dequantise(torch.tensor([4, 0, 1, 2]), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="square image"):
        dequantise(torch.tensor([0, 1, 2]), torch.zeros(4, 3))


def test_palette_files_round_trip(tmp_path):
    palette = torch.rand(512, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_palette(palette, tmp_path, n_px=32)
    assert sorted(os.listdir(tmp_path)) == ["kmeans_centers.npy", "preprocessor_config.json"]  # no temp files
    assert torch.equal(load_palette(tmp_path / "kmeans_centers.npy"), palette)
    assert torch.equal(load_palette(tmp_path / "preprocessor_config.json"), palette)  # JSON keeps float32 exactly
    assert torch.equal(load_palette(tmp_path), palette)
    with pytest.raises(FileNotFoundError, match="no palette"):
        load_palette(tmp_path / "..")


# --- k-means -----------------------------------------------------------------------------------------

TRUE_COLOURS = np.array([[230, 30, 30], [20, 180, 40], [30, 40, 220], [250, 250, 250], [15, 15, 15], [200, 160, 20]])


def synthetic_images(seed, noise=3, n=6, size=12):
    """Images made of 2 x 2 blocks of the true colours, each pixel moved by up to `noise` levels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(TRUE_COLOURS), (n, size // 2, size // 2)).repeat(2, 1).repeat(2, 2)
    pixels = TRUE_COLOURS[labels] + rng.integers(-noise, noise + 1, labels.shape + (3,))
    return np.clip(pixels, 0, 255).astype(np.uint8), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_palette_recovers_the_colours_of_synthetic_images(seed):
    images, labels = synthetic_images(seed)
    palette = fit_palette(images, n_colours=len(TRUE_COLOURS), seed=seed)
    assert palette.shape == (len(TRUE_COLOURS), 3) and palette.dtype == torch.float32
    truth = torch.tensor(TRUE_COLOURS / 127.5 - 1, dtype=torch.float32)
    distance = torch.cdist(truth, palette)  # (6 true, 6 fitted)
    # Every true colour has its own fitted centre, within the noise (3 levels = 0.024 per channel; a mean of
    # ~100 noisy pixels is far closer, but a centre off by a whole cluster would be > 0.5 away).
    assert sorted(distance.argmin(1).tolist()) == list(range(len(TRUE_COLOURS)))
    assert distance.min(1).values.max() < 0.03
    # And quantising with it groups the pixels exactly as they were drawn.
    tokens = quantise(images, palette).view(labels.shape)
    assert torch.equal(distance.argmin(1)[torch.as_tensor(labels)], tokens)


def test_kmeans_palette_is_deterministic_under_its_seed():
    images, _ = synthetic_images(5, noise=40)
    assert torch.equal(fit_palette(images, n_colours=16, seed=3), fit_palette(images, n_colours=16, seed=3))


def test_kmeans_with_more_colours_than_the_images_hold_has_no_stray_colours():
    images = np.zeros((2, 6, 6, 3), np.uint8)
    images[:, :3] = (255, 0, 0)
    images[1, :, :2] = (0, 0, 255)  # three distinct colours in all
    palette = fit_palette(images, n_colours=8, seed=0)
    assert torch.isfinite(palette).all()
    used = {tuple(c) for c in images.reshape(-1, 3).tolist()}
    assert {tuple(c) for c in dequantise(torch.arange(8)[None, :4], palette)[0].reshape(-1, 3).tolist()} <= used
    assert torch.equal(dequantise(quantise(images, palette), palette), torch.as_tensor(images))


# --- PNG ---------------------------------------------------------------------------------------------


@examples(40)
@given(h=st.integers(1, 20), w=st.integers(1, 20), channels=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 999))
def test_png_written_then_read_gives_the_same_pixels(tmp_path_factory, h, w, channels, seed):
    directory = tmp_path_factory.mktemp("png")
    image = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    write_png(directory / "x.png", image)
    assert np.array_equal(read_png(directory / "x.png"), image)
    assert os.listdir(directory) == ["x.png"]  # written through a temporary file, renamed: nothing left over


def paeth(a, b, c):
    """The Paeth predictor as the PNG specification writes it (section 9.4)."""
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def filter_row(filter_type, row, prev, bpp):
    """An encoder's side of filtering, byte by byte from the specification: stored = byte - prediction."""
    out = bytearray()
    for i, x in enumerate(row):
        a = row[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        prediction = [0, a, b, (a + b) // 2, paeth(a, b, c)][filter_type]
        out.append((x - prediction) % 256)
    return bytes(out)


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image, filters, colour_type, bit_depth=8, interlace=0, idat_parts=3, corrupt_crc=False):
    """A PNG written independently of imagegpt.write_png: any filter per row, the image data split over
    several IDAT chunks, an ancillary tEXt chunk before them (which a reader must skip)."""
    h, w, channels = image.shape
    rows, prev = [], bytes(w * channels)
    for y in range(h):
        row = image[y].tobytes()
        rows.append(bytes([filters[y % len(filters)]]) + filter_row(filters[y % len(filters)], row, prev, channels))
        prev = row
    data = zlib.compress(b"".join(rows))
    cut = [len(data) * i // idat_parts for i in range(idat_parts + 1)]
    header = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, interlace)
    idats = [chunk(b"IDAT", data[a:b]) for a, b in zip(cut, cut[1:])]
    if corrupt_crc:
        idats[0] = idats[0][:-1] + bytes([idats[0][-1] ^ 1])
    return imagegpt.PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"tEXt", b"Comment\x00made by hand") + \
        b"".join(idats) + chunk(b"IEND", b"")


COLOUR_TYPES = {0: 1, 4: 2, 2: 3, 6: 4}  # grey, grey + alpha, RGB, RGBA -> channels


@pytest.mark.parametrize("colour_type", sorted(COLOUR_TYPES))
@pytest.mark.parametrize("filters", [[0], [1], [2], [3], [4], [4, 3, 2, 1, 0, 1, 3]],
                         ids=["none", "sub", "up", "average", "paeth", "mixed"])
def test_png_reader_undoes_every_filter_type(tmp_path, colour_type, filters):
    image = np.random.default_rng(colour_type).integers(0, 256, (9, 11, COLOUR_TYPES[colour_type]), dtype=np.uint8)
    image[3:6] = 250  # a flat band: predictions near the wrap-around of mod 256
    (tmp_path / "x.png").write_bytes(encode_png(image, filters, colour_type))
    assert np.array_equal(read_png(tmp_path / "x.png"), image)


def test_png_reader_agrees_with_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed: nothing to compare with")
    image = np.random.default_rng(7).integers(0, 256, (31, 17, 3), dtype=np.uint8)
    image[:, :8] = image[:, :1]  # smooth areas so Pillow's adaptive filtering picks several filter types
    Image.fromarray(image).save(tmp_path / "pillow.png", optimize=True)
    assert np.array_equal(read_png(tmp_path / "pillow.png"), image)
    write_png(tmp_path / "ours.png", image)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png")), image)


def png_with_filter_type_7():
    """Valid chunks and CRCs, but every row claims filter type 7 (PNG defines 0-4)."""
    rows = b"".join(b"\x07" + bytes(12) for _ in range(4))
    return imagegpt.PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


BLACK = np.zeros((4, 4, 3), np.uint8)
BAD_PNGS = {
    "crc": (lambda: encode_png(BLACK, [0], 2, corrupt_crc=True), "fails its CRC check"),
    "truncated": (lambda: encode_png(BLACK, [0], 2)[:60], "truncated"),
    "not_png": (lambda: b"GIF89a" + bytes(40), "not a PNG file"),
    "16_bit": (lambda: encode_png(BLACK, [0], 2, bit_depth=16), "16-bit samples"),
    "palette": (lambda: encode_png(BLACK[..., :1], [0], 3), "palette \\(indexed-colour\\) PNG"),
    "interlaced": (lambda: encode_png(BLACK, [0], 2, interlace=1), "interlaced"),
    "filter_7": (png_with_filter_type_7, "filter type 7"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PNGS))
def test_bad_pngs_are_refused_with_the_file_named(tmp_path, kind):
    make, message = BAD_PNGS[kind]
    path = tmp_path / f"{kind}.png"
    path.write_bytes(make())
    with pytest.raises(ValueError, match=message) as error:
        read_png(path)
    assert str(path) in str(error.value)
    if kind in ("16_bit", "palette", "interlaced"):  # formats the reader skips: the message says how to convert
        assert "re-save it as an 8-bit RGB PNG" in str(error.value)


def test_to_rgb_repeats_grey_and_composites_alpha_over_white():
    grey = np.array([[[0], [128]]], np.uint8)
    assert to_rgb(grey).tolist() == [[[0, 0, 0], [128, 128, 128]]]
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], np.uint8)
    assert to_rgb(rgba).tolist() == [[[255, 0, 0], [255, 255, 255], [127, 127, 127]]]  # 255 * 127/255 = 127
    grey_alpha = np.array([[[0, 0]]], np.uint8)
    assert to_rgb(grey_alpha).tolist() == [[[255, 255, 255]]]


def test_image_grid_places_images_left_to_right_then_down():
    images = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(5)])  # 5 images of 2 x 3
    grid = image_grid(images, columns=3, scale=2, pad=1)
    assert grid.shape == (2 * (4 + 1) + 1, 3 * (6 + 1) + 1, 3)
    for i in range(5):
        top, left = 1 + (i // 3) * 5, 1 + (i % 3) * 7
        assert np.all(grid[top : top + 4, left : left + 6] == i)
    assert np.all(grid[0] == 255) and np.all(grid[6:, 15:] == 255)  # padding and the empty sixth cell
