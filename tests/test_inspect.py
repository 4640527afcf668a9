"""`python nanogpt2.py inspect`: the attention picture shows the model's real weights, and the printed
guesses are its real next-token probabilities.

The PNG is read back with imagegpt.py's reader (its own PNG decoder, tested on hand-encoded files), and
every square's pixels are held against the attention weights forward() returns for the same prompt.
"""

import re

import numpy as np
import pytest
import torch

import imagegpt
import nanogpt2

CHARS = "0123456789+=\n"


@pytest.fixture(scope="module")
def adder_dir(tmp_path_factory):
    """A character-level model (the addition task's vocabulary) with random weights of trained size, so
    that its attention is sharp and uneven: 2 layers x 3 heads."""
    torch.manual_seed(0)
    config = nanogpt2.GPT2Config(vocab_size=len(CHARS), n_positions=16, n_embd=24, n_layer=2, n_head=3,
                                 extra={"char_vocab": CHARS})
    model = nanogpt2.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("adder")
    model.save_pretrained(path)
    return path


def weights_for(model_dir, prompt):
    model = nanogpt2.GPT2LMHeadModel.from_pretrained(model_dir)
    ids = [CHARS.index(c) for c in prompt]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    return out


def test_every_square_of_the_picture_is_that_heads_attention(adder_dir, tmp_path, capsys):
    prompt = "57+68=521"
    png = tmp_path / "attn.png"
    assert nanogpt2.main(["inspect", "--model", str(adder_dir), "--prompt", prompt, "--out", str(png),
                          "--device", "cpu"]) == 0
    image = imagegpt.read_png(png)
    out = weights_for(adder_dir, prompt)
    T, L, nh = len(prompt), 2, 3
    assert image.shape[2] == 3
    # The layout attention_picture documents: s pixels per token, a 6-pixel label strip, 6-pixel gaps and
    # a 12-pixel margin.
    s, label, gap, margin = max(6, min(16, 160 // T)), 6, 6, 12
    cell = T * s + label
    assert image.shape[:2] == (margin + L * (cell + gap), margin + nh * (cell + gap))
    dark = np.array([8, 48, 107], dtype=np.float32)
    for layer in range(L):
        for head in range(nh):
            top, left = margin + layer * (cell + gap) + label, margin + head * (cell + gap) + label
            centres = image[top + s // 2: top + T * s: s, left + s // 2: left + T * s: s]  # (T, T, 3)
            w = out.attentions[layer][0, head].numpy()  # (T, T): row t is what query t attends to
            expected = 255 - w[:, :, None] * (255 - dark)
            assert np.abs(centres.astype(np.float32) - expected).max() <= 1.0, (layer, head)
            assert (centres[np.triu_indices(T, 1)] == 255).all()  # causal: future keys are white


def test_the_printed_guesses_are_the_models_next_token_probabilities(adder_dir, tmp_path, capsys):
    prompt = "12+34="
    nanogpt2.main(["inspect", "--model", str(adder_dir), "--prompt", prompt, "--out", str(tmp_path / "a.png"),
                   "--top", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d+\s+'", line)]
    assert len(rows) == len(prompt)
    probs = torch.softmax(weights_for(adder_dir, prompt).logits[0], dim=-1)
    for t, row in enumerate(rows):
        pairs = re.findall(r"'((?:[^'\\]|\\.)*)' ([0-9.]+)", row)  # (text, probability); the token itself has none
        assert len(pairs) == 3
        best = probs[t].topk(3)
        for (text, p), want_p, want_id in zip(pairs, best.values, best.indices):
            assert text == repr(CHARS[int(want_id)])[1:-1]
            assert float(p) == pytest.approx(float(want_p), abs=5e-4)


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "1" * 17], "longer than the model's 16 positions"),
])
def test_bad_inspect_arguments_are_one_clear_line(adder_dir, tmp_path, capsys, args, message):
    assert nanogpt2.main(["inspect", "--model", str(adder_dir), "--out", str(tmp_path / "x.png"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
