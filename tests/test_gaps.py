"""Tests of small pieces, each checked against a textbook version, written where planted bugs got past the suite.

The classroom exercises (tests/exercises.py) plant subtle faults; these tests catch the ones the rest of the
suite let through: config fields that change the maths only away from their defaults, sampling checked for
its distribution (not only for which tokens it may pick), training-step details that do not stop the loss
falling, and byte-level code tried on many random inputs instead of one. They also grade the `write`
exercises whose functions no other test calls directly.
"""

import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import convert_tf
import imagegpt
import nanogpt2
from helpers import examples

# --- nanogpt2.py: building blocks and attention ------------------------------------------------------------


@pytest.mark.parametrize("name", ["gelu_new_formula", "gelu_new"])
def test_gelu_new_is_the_tanh_approximation(name):
    gelu = getattr(nanogpt2, name)  # the formula written out, and the fused kernel the model runs
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    expected = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(gelu(x), expected, rtol=1e-12, atol=1e-12)  # float64: the same formula
    exact = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    assert (gelu(x) - exact).abs().max() > 1e-4  # the approximation, not the exact erf GELU


@examples(15)
@given(nx=st.integers(1, 9), nf=st.integers(1, 9), lead=st.lists(st.integers(1, 3), max_size=3),
       seed=st.integers(0, 2**31 - 1))
def test_conv1d_is_x_times_weight_plus_bias(nx, nf, lead, seed):
    g = torch.Generator().manual_seed(seed)
    layer = nanogpt2.Conv1D(nf, nx)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(nf, generator=g))
    x = torch.randn(*lead, nx, generator=g)
    expected = (x.unsqueeze(-2) @ layer.weight).squeeze(-2) + layer.bias  # (..., 1, nx) @ (nx, nf)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # fp32, sums of <= 9 products


@examples(15)
@given(B=st.integers(1, 3), T=st.integers(1, 5), n_head=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**31 - 1))
def test_split_and_merge_heads_move_each_heads_channels(B, T, n_head, seed):
    config = nanogpt2.GPT2Config(n_embd=8 * n_head, n_head=n_head, n_layer=1, n_positions=8, vocab_size=10)
    attn = nanogpt2.GPT2Attention(config)
    hs = config.n_embd // n_head
    x = torch.randn(B, T, config.n_embd, generator=torch.Generator().manual_seed(seed))
    heads = attn.split_heads(x)
    assert heads.shape == (B, n_head, T, hs)
    for h in range(n_head):
        assert torch.equal(heads[:, h], x[:, :, h * hs:(h + 1) * hs]), f"head {h} holds the wrong channels"
    merged = attn.merge_heads(heads)
    assert merged.shape == (B, T, config.n_embd) and torch.equal(merged, x)


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("by_layer", [True, False])
def test_score_scale_follows_both_config_flags(scaled, by_layer):
    config = nanogpt2.GPT2Config(n_embd=32, n_head=2, n_layer=3, n_positions=8, vocab_size=10,
                                 scale_attn_weights=scaled, scale_attn_by_inverse_layer_idx=by_layer)
    for layer_idx in range(3):
        attn = nanogpt2.GPT2Attention(config, layer_idx=layer_idx)
        expected = (1 / math.sqrt(16) if scaled else 1.0) / ((layer_idx + 1) if by_layer else 1)
        assert attn.score_scale() == pytest.approx(expected, rel=1e-12), f"layer {layer_idx}"


def test_positions_from_mask_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 0, 1, 1]])
    expected = torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4], [1, 1, 1, 1, 0], [1, 0, 1, 1, 2]])
    assert torch.equal(nanogpt2._positions_from_mask(mask), expected)


def test_non_default_layer_norm_epsilon_matches_reference():
    """layer_norm_epsilon changes every norm's output; a large one makes a norm that ignores it visible."""
    transformers = pytest.importorskip("transformers")
    options = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0, layer_norm_epsilon=0.5)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**options, attn_implementation="eager")).eval()
    ours = nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(**options)).eval()
    ours.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)  # fp32, same maths


# --- nanogpt2.py: sampling's distribution -------------------------------------------------------------------


def expected_probs(logits, temperature, top_k, top_p):
    """The textbook next-token distribution: softmax of logits / temperature, restricted to the top_k most
    likely tokens and then to the smallest set of most likely ones whose probability reaches top_p."""
    logits = logits.double() / temperature
    order = logits.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k is not None else order
    if top_p is not None:
        probs = torch.softmax(logits[keep], dim=0).tolist()
        total, nucleus = 0.0, []
        for token, p in zip(keep, probs):
            nucleus.append(token)
            total += p
            if total >= top_p:
                break
        keep = nucleus
    masked = torch.full_like(logits, float("-inf"))
    masked[keep] = logits[keep]
    return torch.softmax(masked, dim=0)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.5, None, None), (2.0, None, None), (1.0, 5, None),
                                                       (0.7, None, 0.8), (1.5, 6, 0.9)])
def test_sampling_draws_from_softmax_of_the_filtered_logits_over_temperature(temperature, top_k, top_p):
    """4,000 draws of the first new token: each token's frequency is within 0.04 of its probability.
    A frequency's standard deviation is at most sqrt(0.25 / 4000) = 0.008, so 0.04 is five of them; a wrong
    temperature or a softmax over the wrong axis moves some probability by 0.1 or more."""
    config = nanogpt2.GPT2Config(vocab_size=12, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = nanogpt2.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 0.4)  # logits of std ~1.6 (|ln_f(x)| = 4): temperature matters
    prompt = torch.tensor([[3, 1, 4]])
    with torch.no_grad():
        logits = model(prompt).logits[0, -1]
    probs = expected_probs(logits, temperature, top_k, top_p)
    n = 4000
    out = model.generate(prompt.repeat(n, 1), max_new_tokens=1, do_sample=True, temperature=temperature,
                         top_k=top_k, top_p=top_p, stop_at_eos=False, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out[:, -1], minlength=config.vocab_size).double() / n
    worst = int((freq - probs).abs().argmax())
    assert (freq - probs).abs().max() < 0.04, (
        f"token {worst} was drawn with frequency {float(freq[worst]):.3f}, but its probability is "
        f"{float(probs[worst]):.3f} (frequencies {freq.tolist()}, probabilities {probs.tolist()})")


def test_beam_hypotheses_score_by_length_penalty():
    """A hypothesis scores sum_logprobs / length ** length_penalty: 0 prefers the short one here, 1 and 2 the
    long one; only the best num_beams are kept."""
    for penalty, best in ((0.0, "short"), (1.0, "long"), (2.0, "long")):
        hyps = nanogpt2._BeamHypotheses(num_beams=1, length_penalty=penalty)
        hyps.add(torch.tensor([1, 2]), -2.0, 2)  # "short": -2 over 2 tokens
        hyps.add(torch.tensor([1, 2, 3, 4]), -3.0, 4)  # "long": -3 over 4 tokens
        score, tokens, _ = max(hyps.beams, key=lambda h: h[0])
        assert len(hyps.beams) == 1 and len(tokens) == (2 if best == "short" else 4), f"length_penalty={penalty}"
        assert score == pytest.approx((-2.0 / 2 ** penalty) if best == "short" else (-3.0 / 4 ** penalty))


def test_safetensors_tensors_listed_out_of_offset_order_load(tmp_path):
    """The header's order is not the data's (the safetensors package sorts by dtype, then name)."""
    header = {"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
              "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
              "c": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}
    text = json.dumps(header).encode()
    data = struct.pack("<i", 7) + struct.pack("<3f", 1.5, 2.5, 3.5)
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
    tensors = nanogpt2.load_safetensors(tmp_path / "x.safetensors")
    assert tensors["c"].tolist() == [7] and tensors["a"].tolist() == [1.5] and tensors["b"].tolist() == [2.5, 3.5]
    header["a"]["data_offsets"] = [2, 6]  # now overlapping "c", and still out of order
    header["a"]["dtype"], header["c"]["data_offsets"] = "F32", [0, 4]
    text = json.dumps(header).encode()
    (tmp_path / "y.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
    with pytest.raises(nanogpt2.CheckpointError, match="overlap"):
        nanogpt2.load_safetensors(tmp_path / "y.safetensors")


# --- nanogpt2.py: training details --------------------------------------------------------------------------


def tiny_lm(seed=0):
    config = nanogpt2.GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return nanogpt2.GPT2LMHeadModel(config)


def one_step(model, optimizer, batch, grad_clip):
    return nanogpt2.train_step(model, optimizer, [batch], 1.0, grad_clip, nanogpt2.Run())  # one process, fp32, CPU


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_train_step_clips_the_gradient_norm():
    """With SGD at lr 1, the update is minus the gradient: its norm is min(true norm, grad_clip)."""
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 20, (4, 8), generator=g), torch.randint(0, 20, (4, 8), generator=g))
    for grad_clip in (0.0, 0.05):
        model = tiny_lm()
        before = flat(model)
        _, norm = one_step(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, grad_clip)
        step = (flat(model) - before).norm().item()
        expected = min(norm, grad_clip) if grad_clip > 0 else norm
        assert norm > 0.05 and step == pytest.approx(expected, rel=1e-4), f"grad_clip={grad_clip}"


def test_each_train_step_starts_from_zero_gradients():
    """Two steps of SGD at lr 1 equal two steps computed by hand, each from its own batch's gradient alone."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 20, (4, 8), generator=g), torch.randint(0, 20, (4, 8), generator=g))
               for _ in range(2)]
    model, by_hand = tiny_lm(), tiny_lm()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for x, y in batches:
        one_step(model, optimizer, (x, y), 0.0)
        loss = F.cross_entropy(by_hand(x).logits.flatten(0, 1), y.flatten())
        grads = torch.autograd.grad(loss, list(by_hand.parameters()))
        with torch.no_grad():
            for p, grad in zip(by_hand.parameters(), grads):
                p -= grad
    torch.testing.assert_close(flat(model), flat(by_hand), atol=1e-5, rtol=1e-5)  # fp32, reordered sums


@examples(25)
@given(n_tokens=st.integers(2, 60), context=st.integers(2, 16), data=st.data())
def test_sliding_windows_score_every_token_once(n_tokens, context, data):
    # stride == context leaves each window's first token without context: only stride < context scores all.
    stride = data.draw(st.integers(1, context - 1), label="stride")
    windows = nanogpt2.sliding_windows(n_tokens, context, stride)
    scored = []
    for begin, end, first in windows:
        assert 0 <= begin < first <= end <= n_tokens and end - begin <= context, (begin, end, first)
        scored += range(first, end)
    assert scored == list(range(1, n_tokens)), "every token but the first, each scored once, in order"
    assert [b for b, _, _ in windows] == list(range(0, stride * len(windows), stride))


# --- nanogpt2.py: streaming text ---------------------------------------------------------------------------

PIECES = list("ab ,.\n") + ["é", "ß", "€", "中", "文", "😀", "👍🏽", "ﬁ", "\u0301", " 😀😀", "ünïcödé"]
TEXTS = st.lists(st.sampled_from(PIECES), max_size=25).map("".join)


@examples(40)
@given(text=TEXTS)
def test_stream_decoder_equals_decode_for_any_text(text):
    """Tokens streamed one at a time print the same text as decoding them all at once, even where a character's
    bytes are split across tokens, and nothing printed is ever taken back (no U+FFFD mid-stream)."""
    ids = nanogpt2.encode(text)
    stream = nanogpt2.StreamDecoder()
    pieces = [stream(token) for token in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + stream.flush() == nanogpt2.decode(ids) == text


def test_stream_decoder_flush_gives_an_unfinished_character_as_u_fffd():
    ids = nanogpt2.encode("😀")
    stream = nanogpt2.StreamDecoder()
    raw = nanogpt2.get_tokenizer().decode_single_token_bytes(ids[0])
    if len(ids) > 1:  # the emoji's bytes span several tokens: the first alone is an unfinished character
        assert stream(ids[0]) == "" and stream.flush() == nanogpt2.decode(ids[:1])
    else:
        assert stream(ids[0]) == raw.decode()


# --- imagegpt.py -------------------------------------------------------------------------------------------------


def test_dequantise_rounds_each_colour_to_the_nearest_byte():
    values = torch.tensor([-1.0, -0.99, -0.5, 0.0, 0.003, 0.5, 0.996, 1.0])
    palette = torch.stack([values, values.flip(0), values.roll(3)], dim=1)  # (8, 3)
    tokens = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]).view(2, 4)  # two 2 x 2 images
    pixels = imagegpt.dequantise(tokens, palette)
    assert pixels.shape == (2, 2, 2, 3) and pixels.dtype == torch.uint8
    expected = np.clip(np.rint(127.5 * (palette.double().numpy() + 1)), 0, 255).astype(np.uint8)
    assert np.array_equal(pixels.reshape(8, 3).numpy(), expected[tokens.flatten().numpy()])


def png_filter_row(kind, row, prev, bpp):
    """Apply PNG filter `kind` to one row of bytes, the textbook way, byte by byte."""
    out = bytearray(len(row))
    for i in range(len(row)):
        a = row[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if kind == 0:
            pred = 0
        elif kind == 1:
            pred = a
        elif kind == 2:
            pred = b
        elif kind == 3:
            pred = (a + b) // 2
        else:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
        out[i] = (row[i] - pred) % 256
    return bytes(out)


def png_bytes(image, filters):
    h, w, channels = image.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows, prev = [], bytes(w * channels)
    for y in range(h):
        row = image[y].tobytes()
        rows.append(bytes([filters[y]]) + png_filter_row(filters[y], row, prev, channels))
        prev = row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return imagegpt.PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + \
        chunk(b"IEND", b"")


@examples(40)
@given(h=st.integers(1, 6), w=st.integers(1, 6), channels=st.sampled_from([1, 2, 3, 4]), data=st.data())
def test_png_filters_undo_any_random_image(tmp_path_factory, h, w, channels, data):
    """Random pixels of a few small values (so that Paeth's ties happen: a = 0, b = 3, c = 2 is one) or values
    near 255 (so that sums wrap around), any filter on each row."""
    values = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 128, 254, 255]), min_size=1, max_size=4),
                       label="values")
    flat_pixels = data.draw(st.lists(st.sampled_from(values), min_size=h * w * channels, max_size=h * w * channels),
                            label="pixels")
    filters = data.draw(st.lists(st.integers(0, 4), min_size=h, max_size=h), label="filters")
    image = np.array(flat_pixels, np.uint8).reshape(h, w, channels)
    path = tmp_path_factory.mktemp("png") / "x.png"
    path.write_bytes(png_bytes(image, filters))
    assert np.array_equal(imagegpt.read_png(path), image)


def test_paeth_breaks_ties_left_then_above_then_upper_left(tmp_path):
    """Every (a, b, c) of small values, where all the ties happen, and a 2 x 2 image that needs one:
    left a = 0, above b = 3, upper-left c = 2 tie between a and c, and a must win."""
    for a in range(8):
        for b in range(8):
            for c in range(8):
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                best = a if pa <= pb and pa <= pc else b if pb <= pc else c
                assert imagegpt._paeth(a, b, c) == best, (a, b, c)
    image = np.array([[2, 3], [0, 9]], np.uint8).reshape(2, 2, 1)
    (tmp_path / "tie.png").write_bytes(png_bytes(image, [0, 4]))
    assert np.array_equal(imagegpt.read_png(tmp_path / "tie.png"), image)


def kmeans_step_by_hand(pixels, centres):
    d = ((pixels[:, None, :] - centres[None, :, :]) ** 2).sum(-1)  # (N, K)
    assign = d.argmin(1)
    new = np.zeros_like(centres)
    empty = []
    for k in range(len(centres)):
        members = pixels[assign == k]
        if len(members):
            new[k] = members.mean(0)
        else:
            empty.append(k)
    error = d[np.arange(len(pixels)), assign]
    worst = np.argsort(-error, kind="stable")[:len(empty)]
    for k, i in zip(empty, worst):
        new[k] = pixels[i]
    return new


@examples(25)
@given(n=st.integers(1, 30), k=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_kmeans_step_moves_centres_to_means_and_empty_ones_to_the_worst_pixels(n, k, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, (n, 3))
    centres = rng.uniform(-1, 1, (k, 3))
    centres[k // 2:] += 5.0  # far from every pixel: these centres get no pixels and must move
    new = imagegpt.kmeans_step(torch.from_numpy(pixels), torch.from_numpy(centres))
    assert new.shape == (k, 3) and new.dtype == torch.float64
    expected = kmeans_step_by_hand(pixels, centres)
    # Ties in the error (duplicate pixels) may pick another pixel of the same value: compare values.
    np.testing.assert_allclose(new.numpy(), expected, atol=1e-12)


# --- convert_tf.py -----------------------------------------------------------------------------------------------


def varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@examples(40)
@given(numbers=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=5))
def test_read_varint_decodes_what_a_textbook_encoder_wrote(numbers):
    buf, pos = b"".join(varint(n) for n in numbers), 0
    for n in numbers:
        start = pos
        value, pos = convert_tf.read_varint(buf, pos, "test")
        assert value == n, f"read_varint of the bytes {buf[start:pos].hex(' ')} gave {value}, expected {n}"
    assert pos == len(buf)


def test_read_varint_known_bytes_and_errors():
    assert convert_tf.read_varint(b"\xac\x02", 0, "t") == (300, 2)
    assert convert_tf.read_varint(b"\x00\x7f", 1, "t") == (127, 2)
    with pytest.raises(convert_tf.CheckpointError, match="truncated"):
        convert_tf.read_varint(b"\x80", 0, "t")
    with pytest.raises(convert_tf.CheckpointError, match="longer than 10"):
        convert_tf.read_varint(b"\xff" * 11, 0, "t")


def test_proto_fields_reads_every_wire_type():
    message = (varint(1 << 3 | 0) + varint(150)                                   # field 1, varint
               + varint(2 << 3 | 1) + struct.pack("<Q", 0x0102030405060708)        # field 2, fixed64
               + varint(3 << 3 | 2) + varint(5) + b"hello"                        # field 3, bytes
               + varint(4 << 3 | 5) + struct.pack("<I", 0xDEADBEEF)                # field 4, fixed32
               + varint(1 << 3 | 0) + varint(2**64 - 1))                           # field 1 again
    assert list(convert_tf.proto_fields(message, "t")) == [
        (1, 150), (2, 0x0102030405060708), (3, b"hello"), (4, 0xDEADBEEF), (1, 2**64 - 1)]
    for bad in (varint(2 << 3 | 1) + b"\x00" * 7, varint(3 << 3 | 2) + varint(9) + b"abc", varint(5 << 3 | 3)):
        with pytest.raises(convert_tf.CheckpointError):
            list(convert_tf.proto_fields(bad, "t"))


def block(entries, restart_every=2):
    """An SSTable block written the LevelDB way: keys prefix-compressed against the previous one, whole at
    every restart point."""
    out, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_every == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        last = key
    return bytes(out) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


@pytest.mark.parametrize("restart_every", [1, 3, 100])
def test_block_entries_undo_prefix_compression(restart_every):
    entries = [(b"", b"header"), (b"model/h0/attn/c_attn/b", b"\x01"), (b"model/h0/attn/c_attn/w", b"\x02\x03"),
               (b"model/h0/attn/c_proj/b", b""), (b"model/h0/ln_1/g", b"v" * 200), (b"model/h10/mlp", b"x")]
    assert list(convert_tf.block_entries(block(entries, restart_every), "t", "block")) == entries


def test_mask_crc_is_leveldbs_rotation_plus_constant():
    # LevelDB's crc32c::Mask: ((crc >> 15) | (crc << 17)) + 0xa282ead8, in 32 bits; Unmask undoes it.
    def unmask(masked):
        rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
        return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF

    for crc in (0, 1, 0x8000, 0xE3069283, 0xFFFFFFFF, 0x12345678):
        masked = convert_tf.mask_crc(crc)
        assert 0 <= masked < 2**32 and unmask(masked) == crc
    assert convert_tf.mask_crc(0) == 0xA282EAD8
    assert convert_tf.mask_crc(1) == (1 << 17) + 0xA282EAD8


def test_as_int64_is_twos_complement_at_the_boundaries():
    for value, expected in ((0, 0), (2**63 - 1, 2**63 - 1), (2**63, -(2**63)), (2**64 - 1, -1)):
        assert convert_tf.as_int64(value) == expected
