"""imagegpt.py's command line and checkpoints: from a checkpoint this test saves, `sample` and `complete` write
real PNGs; user mistakes end with one line and exit status 2; Ctrl-C leaves no file; a hub name downloads
config, weights and palette together (from a local stand-in for the hub).
"""

import functools
import http.server
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import imagegpt
from imagegpt import ImageGPTConfig, ImageGPTForCausalImageModeling, dequantise, quantise, read_png, write_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_PX, SCALE, PAD = 4, 2, 2  # a 4 x 4 model, drawn at 2x, with image_grid's 2-pixel gaps
PALETTE = torch.tensor([[r, g, b] for r in (-1.0, 1.0) for g in (-1.0, 1.0) for b in (-1.0, 0.5)])  # 8 colours



@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """Nothing here may reach the real hub: point it at a closed port, and the cache at a fresh directory."""
    monkeypatch.setenv("NANOGPT2_HUB_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("NANOGPT2_CACHE", str(tmp_path / "cache"))


def save_tiny_checkpoint(directory, palette=PALETTE):
    config = ImageGPTConfig(vocab_size=len(PALETTE) + 1, n_positions=N_PX * N_PX, n_embd=16, n_layer=2, n_head=2)
    model = ImageGPTForCausalImageModeling(config)
    with torch.no_grad():  # weights large enough that the samples are not all alike
        model.lm_head.weight.normal_(std=1.0)
    model.palette = palette
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint")))


def tiles(grid, count):
    """Cut image_grid's one row of `count` images back out, undoing the enlargement."""
    size = N_PX * SCALE
    assert grid.shape == (size + 2 * PAD, count * (size + PAD) + PAD, 3)
    return [grid[PAD : PAD + size : SCALE, PAD + i * (size + PAD) : PAD + i * (size + PAD) + size : SCALE]
            for i in range(count)]


def palette_colours():
    """The 8-bit colours the palette's entries become (as dequantise computes them)."""
    return {tuple(c) for c in torch.round(127.5 * (PALETTE.double() + 1)).to(torch.uint8).tolist()}


def run(*argv):
    return imagegpt.main([str(a) for a in argv])


def test_sample_writes_a_png_grid_of_unconditional_samples(checkpoint, tmp_path, device, capsys):
    out = tmp_path / "samples.png"
    common = ("--model", checkpoint, "--num-samples", 3, "--seed", 5, "--scale", SCALE, "--device", device.type)
    assert run("sample", *common, "--out", out) == 0
    images = tiles(read_png(out), 3)
    colours = palette_colours()
    assert all(tuple(p) in colours for image in images for p in image.reshape(-1, 3).tolist())
    assert os.listdir(tmp_path) == ["samples.png"]  # written through a temporary file, renamed: nothing left over
    # The same seed draws the same images; the progress line went to stderr.
    assert run("sample", *common, "--out", tmp_path / "again.png") == 0
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()
    err = capsys.readouterr().err
    assert "sampling 3 images: 16/16 pixels (100%)" in err and f"wrote {out}" in err


def test_sample_compile_draws_the_same_images(checkpoint, tmp_path, capsys, monkeypatch):
    # --compile reaches generate(compile=True): the steps run with fixed shapes (uncompiled here, to keep the
    # suite fast; tests/test_compiled_decoding.py compiles them) and the same seed draws the same images.
    steps = []
    monkeypatch.setattr(imagegpt, "compiled_decode_step",
                        lambda model: lambda *args: steps.append(1) or imagegpt.decode_one_token(*args))
    common = ("--model", checkpoint, "--num-samples", 3, "--seed", 5, "--scale", SCALE, "--device", "cpu")
    assert run("sample", *common, "--out", tmp_path / "plain.png") == 0
    assert not steps
    assert run("sample", *common, "--compile", "--out", tmp_path / "compiled.png") == 0
    assert len(steps) == N_PX * N_PX - 1  # every pixel after the first, one step each
    assert (tmp_path / "compiled.png").read_bytes() == (tmp_path / "plain.png").read_bytes()
    assert "compiling the decoding step" in capsys.readouterr().err


def test_complete_keeps_the_top_rows_and_writes_the_original_first(checkpoint, tmp_path, device):
    picture = np.random.default_rng(0).integers(0, 256, (20, 12, 3), dtype=np.uint8)
    write_png(tmp_path / "in.png", picture)
    out = tmp_path / "completions.png"
    assert run("complete", "--model", checkpoint, "--image", tmp_path / "in.png", "--num-samples", 2, "--seed", 1,
               "--scale", SCALE, "--out", out, "--device", device.type, "--top-k", 3) == 0
    original, *completions = tiles(read_png(out), 3)
    expected = dequantise(quantise(picture, PALETTE, n_px=N_PX), PALETTE).numpy()  # what the model saw
    assert np.array_equal(original, expected)
    for completion in completions:  # the top half is the original's; the bottom half was sampled
        assert np.array_equal(completion[: N_PX // 2], original[: N_PX // 2])


def test_greedy_completions_are_all_alike(checkpoint, tmp_path, device):
    write_png(tmp_path / "in.png", np.full((8, 8, 3), 200, np.uint8))
    out = tmp_path / "greedy.png"
    assert run("complete", "--model", checkpoint, "--image", tmp_path / "in.png", "--num-samples", 2,
               "--temperature", 0, "--keep-rows", 1, "--scale", SCALE, "--out", out, "--device", device.type) == 0
    _, first, second = tiles(read_png(out), 3)
    assert np.array_equal(first, second)


@pytest.mark.parametrize("mistake, message", [
    (("sample", "--model", "./no/such/dir"), "neither a directory nor a known name"),
    (("complete", "--image", "missing.png"), "--image missing.png: no such file"),
    (("complete", "--image", "{not_png}"), "is not a PNG file"),
    (("sample", "--top-p", "1.5"), "--top-p must be in \\(0, 1\\]"),
    (("complete", "--image", "{png}", "--keep-rows", "4"), "--keep-rows must be in \\[0, 4\\)"),
    (("sample", "--model", "{no_palette}"), "comes without a palette"),
    (("sample", "--out", "no/such/dir/x.png"), "does not exist"),
])
def test_user_mistakes_end_with_one_line_and_status_2(checkpoint, tmp_path, capsys, mistake, message):
    (tmp_path / "not.png").write_bytes(b"GIF89a, not a PNG")
    write_png(tmp_path / "ok.png", np.zeros((4, 4, 3), np.uint8))
    no_palette = save_tiny_checkpoint(tmp_path / "no_palette", palette=None)
    argv = [a.format(not_png=tmp_path / "not.png", png=tmp_path / "ok.png", no_palette=no_palette) for a in mistake]
    if "--model" not in argv:
        argv += ["--model", checkpoint]
    assert run(*argv, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imagegpt.py: error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_command_line_error_has_no_traceback(checkpoint, tmp_path):
    """The real process: exit status 2 and one line on stderr."""
    (tmp_path / "bad.png").write_bytes(b"not an image")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "imagegpt.py"), "complete", "--model", checkpoint, "--image",
         str(tmp_path / "bad.png"), "--device", "cpu"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("imagegpt.py: error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ctrl_c_stops_cleanly_and_writes_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    def interrupt(self, tokens):
        raise KeyboardInterrupt

    monkeypatch.setattr(imagegpt.ProgressLine, "__call__", interrupt)
    assert run("sample", "--model", checkpoint, "--out", tmp_path / "x.png", "--device", "cpu") == 130
    assert not (tmp_path / "x.png").exists()
    assert "interrupted" in capsys.readouterr().err


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        run("complete", "--help")
    assert exit_.value.code == 0
    assert "python imagegpt.py complete --model imagegpt-small --image cat.png" in capsys.readouterr().out


# --- the hub -----------------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_hub_name_downloads_weights_and_palette_together(tmp_path, monkeypatch, device):
    """openai/imagegpt-* repositories hold config.json, pytorch_model.bin and preprocessor_config.json (the
    palette). A local server stands in for the hub, with the same URL layout and no safetensors file."""
    source = ImageGPTForCausalImageModeling.from_pretrained(save_tiny_checkpoint(tmp_path / "source"))
    repo = tmp_path / "hub" / "openai" / "imagegpt-small" / "resolve" / "main"
    repo.mkdir(parents=True)
    for name in ("config.json", "preprocessor_config.json"):
        (repo / name).write_bytes((tmp_path / "source" / name).read_bytes())
    torch.save(source.state_dict(), repo / "pytorch_model.bin")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(tmp_path / "hub")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NANOGPT2_HUB_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        model = ImageGPTForCausalImageModeling.from_pretrained("imagegpt-small", device=device)
    finally:
        server.shutdown()
        server.server_close()
    cached = tmp_path / "cache" / "openai" / "imagegpt-small"
    assert sorted(os.listdir(cached)) == ["config.json", "preprocessor_config.json", "pytorch_model.bin"]
    assert torch.equal(model.palette, PALETTE)
    ids = torch.tensor([[8, 1, 2, 3]])
    # The same weights; on a GPU, other fp32 kernels: equal to a few ulps (1e-5 leaves ample room).
    torch.testing.assert_close(model(ids.to(device)).logits.cpu(), source(ids).logits, atol=1e-5, rtol=1e-5)
    # The server is gone: the cache alone is enough now.
    again = ImageGPTForCausalImageModeling.from_pretrained("openai/imagegpt-small")
    assert torch.equal(again(ids).logits, source(ids).logits)


# --- hostile safetensors headers -----------------------------------------------------------------------


@pytest.mark.parametrize("header", [
    b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',  # an unhashable dtype
    b'{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}',  # a boolean size
    b'{"a": {"dtype": "F32", "shape": [' + b"1, " * 64 + b'1], "data_offsets": [0, 4]}}',  # 65 dimensions
    b'{"a": {"dtype": "F32", "shape": [0, 1099511627776, 1099511627776], "data_offsets": [0, 0]}}',  # 2**80
    b'{"a": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}',  # a 5000-digit size
    b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than Python's recursion limit
], ids=["list_dtype", "boolean_size", "65_dimensions", "product_overflows", "5000_digits", "deep_nesting"])
def test_hostile_safetensors_headers_are_checkpoint_errors(tmp_path, header):
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(imagegpt.CheckpointError):
        imagegpt.load_safetensors(path)
