"""Training ImageGPT (imagegpt.py, Part III): the shapes drawn on the fly, your images (a folder of PNGs or
an .npy array), the loop and its sample grids, the linear probe and fine-tuning, and the errors a user meets.
Models are tiny (1 layer, width 16, 6 x 6 images, 8 or 16 colours) so the whole file runs in seconds on 2 cores;
the full default run is marked slow."""

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import imagegpt
from imagegpt import (SHAPE_KINDS, ImageGPTForCausalImageModeling, ImageGPTForImageClassification, draw_shapes,
                      read_png, write_png)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_PX, SCALE, PAD = 6, 96 // 6, 2  # the trainer draws samples about 96 pixels across; image_grid's 2-pixel gaps
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--n-px", str(N_PX), "--batch-size", "8",
        "--eval-batches", "2", "--num-samples", "4", "--log-every", "10", "--warmup", "5"]


def train(tmp_path, *options, device="cpu", name="run", tiny=TINY):
    """Run `imagegpt.py train` in this process; returns (its summary, the output directory)."""
    out = tmp_path / name
    argv = ["train", *tiny, "--out", str(out), "--device", str(device), *map(str, options)]
    return imagegpt.train_command(imagegpt.build_parser().parse_args(argv)), out


def log_rows(out):
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def colours_of(images):
    """The distinct RGB colours of each image, (N, H, W, 3) -> N sets."""
    return [set(map(tuple, np.asarray(image).reshape(-1, 3).tolist())) for image in images]


def shape_masks(images):
    """(N, H, W, 3) images -> (N, H, W) bool, True where the pixel has a shape's colour: the nearest of the base
    colours is one of SHAPE_COLOURS (each colour is shifted by at most 12 levels, far less than they differ)."""
    pixels = torch.as_tensor(np.asarray(images)).float()[..., None, :]  # (N, H, W, 1, 3)
    base = torch.tensor(imagegpt.BACKGROUNDS + imagegpt.SHAPE_COLOURS).float()  # (8, 3)
    nearest = (pixels - base).square().sum(dim=-1).argmin(dim=-1)  # (N, H, W)
    return nearest >= len(imagegpt.BACKGROUNDS)


# --- the shapes ---------------------------------------------------------------------------------------------


def test_shapes_are_reproducible_from_the_seed_and_each_holds_a_shape():
    images, kinds = draw_shapes(400, 12, torch.Generator().manual_seed(3))
    again, again_kinds = draw_shapes(400, 12, torch.Generator().manual_seed(3))
    other, _ = draw_shapes(400, 12, torch.Generator().manual_seed(4))
    assert images.shape == (400, 12, 12, 3) and images.dtype == torch.uint8
    assert torch.equal(images, again) and torch.equal(kinds, again_kinds)
    assert not torch.equal(images, other)
    assert set(kinds.tolist()) == set(range(len(SHAPE_KINDS)))  # every kind is drawn
    # Exactly two colours each: a plain background and a shape that covers some of it, never none or all.
    assert all(len(c) == 2 for c in colours_of(images))
    covered = shape_masks(images).float().mean(dim=(1, 2))
    assert (covered > 0).all() and (covered < 1).all()


def test_the_smallest_shapes_still_cover_a_pixel():
    images, _ = draw_shapes(3000, 6, torch.Generator().manual_seed(0))  # n_px 6, the least draw_shapes allows
    assert all(len(c) == 2 for c in colours_of(images))


def test_each_kind_has_its_geometry():
    images, kinds = draw_shapes(600, 12, torch.Generator().manual_seed(1))
    masks = shape_masks(images)
    for mask, kind in zip(masks, kinds.tolist()):
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        box = mask[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
        widths = box.sum(dim=1)  # pixels of the shape in each row of its bounding box, top to bottom
        name = SHAPE_KINDS[kind]
        if name == "square":  # fills its bounding box, which is square to within a pixel of rounding
            assert box.all() and abs(box.size(0) - box.size(1)) <= 1
        elif name == "triangle":  # apex up: rows widen (or keep their width) downwards, the base is the widest
            assert (widths[1:] >= widths[:-1]).all() and widths[-1] > widths[0]
        elif name == "disc":  # rows widen then narrow; rounded, so two or more corners of its box are empty
            peak = int(widths.argmax())
            assert (widths[1: peak + 1] >= widths[:peak]).all() and (widths[peak + 1:] <= widths[peak:-1]).all()
            assert int(box[0, 0]) + int(box[0, -1]) + int(box[-1, 0]) + int(box[-1, -1]) <= 2
        else:  # stripes: bars from one edge of the image to the other
            assert (mask.all(dim=0).any() or mask.all(dim=1).any())


def test_draw_shapes_refuses_images_too_small_for_a_disc():
    with pytest.raises(ValueError, match="n_px >= 6"):
        draw_shapes(1, 5, torch.Generator())


# --- the loop's parts --------------------------------------------------------------------------------------


def test_inputs_are_sos_and_all_pixels_but_the_last_and_targets_every_pixel():
    tokens = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    x, y = imagegpt.lm_examples(tokens, sos=16)
    assert x.tolist() == [[16, 3, 1, 4], [16, 5, 9, 2]]
    assert torch.equal(y, tokens)


def test_grid_positions_make_neighbouring_pixels_alike():
    wpe = torch.nn.Embedding(12 * 12, 64)
    imagegpt.init_grid_positions(wpe, 12)
    table = wpe.weight.detach()
    assert 0.015 < table.std() < 0.025  # the usual spread of a new embedding (N(0, 0.02))

    def similarity(a, b):  # cosine similarity of the embeddings of pixels (row, column) a and b
        return torch.cosine_similarity(table[a[0] * 12 + a[1]], table[b[0] * 12 + b[1]], dim=0).item()

    for here in [(0, 0), (5, 7), (11, 3)]:
        near = [similarity(here, (r, c)) for r, c in [(here[0], here[1] + 1), (here[0], here[1] - 1),
                                                      (here[0] + 1, here[1]), (here[0] - 1, here[1])]
                if 0 <= r < 12 and 0 <= c < 12]
        far = [similarity(here, (r, c)) for r in range(12) for c in range(12) if abs(r - here[0]) + abs(c - here[1]) >= 6]
        assert min(near) > max(far) + 0.1, (here, min(near), max(far))


def test_position_init_random_keeps_imagegpts_own_start(tmp_path):
    _, grid = train(tmp_path, "--max-steps", 1, "--sample-every", 0, "--lr", 1e-9, name="grid")
    _, random = train(tmp_path, "--max-steps", 1, "--sample-every", 0, "--lr", 1e-9, "--position-init", "random",
                      name="random")
    wpe = {name: imagegpt.load_safetensors(str(out / "model.safetensors"))["transformer.wpe.weight"]
           for name, out in (("grid", grid), ("random", random))}
    rows = wpe["grid"].view(N_PX, N_PX, -1)
    assert torch.cosine_similarity(rows[0, 0], rows[0, 1], dim=0) > 0.5  # neighbours alike
    assert torch.cosine_similarity(wpe["random"][0], wpe["random"][1], dim=0).abs() < 0.5  # independent draws


def test_weight_decay_goes_to_matrices_only_and_each_parameter_once():
    model = ImageGPTForCausalImageModeling(imagegpt.ImageGPTConfig(vocab_size=9, n_positions=16, n_embd=16, n_layer=1,
                                                                   n_head=2))
    decay, no_decay = imagegpt.configure_optimizer(model, 1e-3, 0.1, "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# --- training on the shapes ------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_png_samples_and_a_checkpoint(tmp_path, device, capsys):
    summary, out = train(tmp_path, "--max-steps", 60, "--sample-every", 30, "--eval-every", 30, "--lr", 1e-2,
                         device=device)
    rows = log_rows(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 61))  # a row per step
    first, last = float(rows[0]["loss"]), summary["val_loss"]
    # 16 colours at random cost ln 16 = 2.77 nats a pixel; an untrained model is near that. Two colours per
    # image, one of them the background, is far more predictable: 60 steps reach about 1.0 (seen 0.89-1.04).
    assert first > 2.4 and last < 1.5, (first, last)
    assert float(rows[29]["val_loss"]) > last  # still going down between the two measurements

    # A grid every 30 steps, valid PNGs read back by our own reader: one row of 4 images of 6 x 6 pixels
    # enlarged 16 times, in the palette's colours (and the white of the gaps).
    assert summary["samples"] == [str(out / "samples_step_30.png"), str(out / "samples_step_60.png")]
    grid = read_png(out / "samples_step_60.png")
    assert grid.shape == (N_PX * SCALE + 2 * PAD, 4 * (N_PX * SCALE + PAD) + PAD, 3)
    model = ImageGPTForCausalImageModeling.from_pretrained(str(out))
    palette = {tuple(c) for c in torch.round(127.5 * (model.palette.double() + 1)).to(torch.uint8).tolist()}
    assert colours_of([grid])[0] <= palette | {(255, 255, 255)}
    assert (out / "samples.png").read_bytes() == (out / "samples_step_60.png").read_bytes()  # the latest
    assert read_png(out / "data.png").shape == grid.shape  # what the model learns from, drawn the same way

    # The checkpoint: a 6 x 6 model of 16 colours with its palette, which `sample` reads back.
    assert model.config.n_px == N_PX and model.config.n_colours == 16 and model.palette.shape == (16, 3)
    assert imagegpt.main(["sample", "--model", str(out), "--num-samples", "2", "--out", str(tmp_path / "s.png"),
                          "--device", str(device), "--seed", "0"]) == 0
    assert read_png(tmp_path / "s.png").shape == (N_PX * 4 + 2 * PAD, 2 * (N_PX * 4 + PAD) + PAD, 3)
    printed = capsys.readouterr().out
    assert re.search(r"step 30/60 \| loss \d\.\d{4} \| lr [\d.e+-]+ \| [\d,]+ px/s \| 0:\d\d elapsed, 0:\d\d left "
                     r"\| val loss \d\.\d{4}", printed)
    assert f"saved to {out}" in printed and "samples_step_60.png" in printed


def test_the_same_seed_trains_the_same_model(tmp_path):
    one, out_one = train(tmp_path, "--max-steps", 5, "--sample-every", 0, name="one")
    two, out_two = train(tmp_path, "--max-steps", 5, "--sample-every", 0, name="two")
    assert (out_one / "model.safetensors").read_bytes() == (out_two / "model.safetensors").read_bytes()
    assert (out_one / "samples.png").read_bytes() == (out_two / "samples.png").read_bytes()


def test_time_budget_stops_the_run(tmp_path):
    start = time.time()
    summary, _ = train(tmp_path, "--max-steps", 100000, "--time-budget", 1, "--sample-every", 0)
    assert 0 < summary["step"] < 100000 and time.time() - start < 20


# --- your images ------------------------------------------------------------------------------------------


def some_images(count=24, n_px=8, seed=0):
    return draw_shapes(count, n_px, torch.Generator().manual_seed(seed))


def test_a_folder_of_pngs_and_the_same_images_as_npy_train_the_same_model(tmp_path):
    images, _ = some_images()  # 8 x 8, resized to 6 x 6 by the trainer
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):  # RGB and RGBA (opaque) files: both read as the same pixels
        pixels = image.numpy() if i % 2 else np.concatenate([image.numpy(), np.full((8, 8, 1), 255, np.uint8)], -1)
        write_png(folder / f"img_{i:03d}.png", pixels)
    (folder / "notes.txt").write_text("not an image: ignored")
    np.save(tmp_path / "images.npy", images.numpy())
    common = ("--max-steps", 5, "--sample-every", 0, "--n-colours", 8)
    from_folder, out_folder = train(tmp_path, "--data", folder, *common, name="folder")
    from_npy, out_npy = train(tmp_path, "--data", tmp_path / "images.npy", *common, name="npy")
    assert (out_folder / "model.safetensors").read_bytes() == (out_npy / "model.safetensors").read_bytes()
    assert (out_folder / "kmeans_centers.npy").read_bytes() == (out_npy / "kmeans_centers.npy").read_bytes()
    assert from_folder["loss"] == from_npy["loss"] and math.isfinite(from_npy["val_loss"])
    model = ImageGPTForCausalImageModeling.from_pretrained(str(out_npy))
    assert model.config.n_px == N_PX and model.config.n_colours == 8


def test_an_npy_already_at_n_px_is_used_as_it_is(tmp_path):
    images, _ = some_images(n_px=N_PX)
    np.save(tmp_path / "images.npy", images.numpy())
    read, names = imagegpt.read_images(str(tmp_path / "images.npy"), N_PX)
    assert torch.equal(read, images) and names is None


HUES = np.array([(200, 40, 40), (40, 180, 60), (40, 70, 210), (230, 200, 40)])  # red, green, blue, yellow


def easy_labelled_set(count=80, classes=4, seed=0):
    """Plain images of one of `classes` hues (the label), each pixel with a little noise: a linear probe's easy
    case, which a score layer left at random (25% for 4 classes, give or take luck) does not pass."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    base = HUES[labels][:, None, None, :]  # (count, 1, 1, 3)
    images = np.clip(base + rng.integers(-20, 21, (count, N_PX, N_PX, 3)), 0, 255).astype(np.uint8)
    return images, labels


def test_linear_probe_on_an_easy_labelled_set_beats_chance(tmp_path, device, capsys):
    images, labels = easy_labelled_set()
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    summary, out = train(tmp_path, "--data", tmp_path / "images.npy", "--labels", tmp_path / "labels.npy",
                         "--max-steps", 20, "--sample-every", 0, "--val-fraction", 0.5, "--n-colours", 8,
                         device=device)
    # 40 held-out images of 4 hues. No two hues share a colour of the palette, so the averaged features tell
    # them apart: seen 100%. Chance is about 30% (the commonest class of 40); a score layer left at random
    # scores 25-50%; 85% leaves room for an unlucky split.
    assert summary["probe_accuracy"] >= 0.85 and summary["chance"] <= 0.5, summary
    assert "linear probe accuracy: " in capsys.readouterr().out
    # The saved classifier is a plain ImageGPTForImageClassification: it reproduces the accuracy by itself.
    classifier = ImageGPTForImageClassification.from_pretrained(summary["classifier"], device=device)
    assert classifier.config.num_labels == 4 and classifier.palette is not None
    tokens = imagegpt.quantise(torch.from_numpy(images), classifier.palette).to(device)
    predicted = classifier(tokens).logits.argmax(dim=-1).cpu().numpy()
    assert (predicted == labels).mean() >= 0.85
    # Linear: the body is the generative model's, unchanged; only the score layer was learnt.
    body = ImageGPTForCausalImageModeling.from_pretrained(str(out), device=device).transformer.state_dict()
    assert all(torch.equal(v, classifier.transformer.state_dict()[k]) for k, v in body.items())


def test_csv_labels_by_file_name_with_class_names(tmp_path):
    images, labels = easy_labelled_set(count=40, classes=2)
    folder = tmp_path / "pngs"
    folder.mkdir()
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        write_png(folder / f"{i:02d}.png", image)
        rows.append(f"{i:02d}.png,{'light' if label else 'dark'}")
    (tmp_path / "labels.csv").write_text("file,label\n" + "\n".join(reversed(rows)) + "\n")  # any order, a header
    names = sorted(os.listdir(folder))
    read, classes = imagegpt.read_labels(str(tmp_path / "labels.csv"), names, len(names))
    assert classes == ["dark", "light"] and read.tolist() == labels.tolist()
    summary, _ = train(tmp_path, "--data", folder, "--labels", tmp_path / "labels.csv", "--max-steps", 3,
                       "--sample-every", 0, "--val-fraction", 0.5)
    saved = imagegpt.ImageGPTConfig.from_json_file(os.path.join(summary["classifier"], "config.json"))
    assert saved.to_dict()["id2label"] == {"0": "dark", "1": "light"}


def test_finetuning_on_the_shapes_trains_every_weight_and_saves_a_classifier(tmp_path, device, capsys):
    summary, out = train(tmp_path, "--max-steps", 10, "--sample-every", 0, "--probe", "finetune",
                         "--probe-steps", 5, device=device)
    assert 0 <= summary["probe_accuracy"] <= 1 and "finetune probe accuracy" in capsys.readouterr().out
    classifier = ImageGPTForImageClassification.from_pretrained(summary["classifier"])
    body = ImageGPTForCausalImageModeling.from_pretrained(str(out)).transformer.state_dict()
    changed = [k for k, v in body.items() if not torch.equal(v, classifier.transformer.state_dict()[k])]
    assert len(changed) == len(body)  # every weight of the body moved
    assert list(classifier.config.to_dict()["id2label"].values()) == list(SHAPE_KINDS)


def test_init_probes_a_saved_model_as_it_is_and_keeps_its_palette(tmp_path, capsys):
    _, first = train(tmp_path, "--max-steps", 3, "--sample-every", 0, name="first")
    summary, out = train(tmp_path, "--init", first, "--max-steps", 0, "--probe", "linear", "--probe-steps", 5,
                         name="probed", tiny=["--batch-size", "8", "--eval-batches", "1"])
    assert summary["step"] == 0 and not (out / "model.safetensors").exists()  # nothing trained, nothing re-saved
    assert os.path.exists(os.path.join(summary["classifier"], "model.safetensors"))
    classifier = ImageGPTForImageClassification.from_pretrained(summary["classifier"])
    assert torch.equal(classifier.palette, ImageGPTForCausalImageModeling.from_pretrained(str(first)).palette)
    _, again = train(tmp_path, "--init", first, "--max-steps", 2, "--sample-every", 0, name="again",
                     tiny=["--batch-size", "8", "--eval-batches", "1"])
    assert (again / "kmeans_centers.npy").read_bytes() == (first / "kmeans_centers.npy").read_bytes()


# --- errors ------------------------------------------------------------------------------------------------


def make_bad_inputs(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "no_pngs").mkdir()
    (tmp_path / "no_pngs" / "a.txt").write_text("text")
    (tmp_path / "bad_pngs").mkdir()
    (tmp_path / "bad_pngs" / "a.png").write_bytes(b"GIF89a, not a PNG")
    (tmp_path / "zero_bytes.npy").write_bytes(b"")
    np.save(tmp_path / "no_images.npy", np.zeros((0, 8, 8, 3), np.uint8))
    np.save(tmp_path / "grey.npy", np.zeros((4, 8, 8), np.uint8))
    np.save(tmp_path / "floats.npy", np.zeros((4, 8, 8, 3), np.float32))
    np.save(tmp_path / "four.npy", np.zeros((4, 8, 8, 3), np.uint8))
    np.save(tmp_path / "one.npy", np.zeros((1, 8, 8, 3), np.uint8))
    np.save(tmp_path / "three_labels.npy", np.array([0, 1, 0]))
    np.save(tmp_path / "four_labels.npy", np.array([0, 1, 0, 1]))
    np.save(tmp_path / "one_class.npy", np.array([1, 1, 1, 1]))
    np.save(tmp_path / "float_labels.npy", np.array([0.0, 1.0, 0.0, 1.0]))
    (tmp_path / "images.txt").write_text("not images")
    (tmp_path / "labels.csv").write_text("label\ncat\ndog\n")


@pytest.mark.parametrize("options, message", [
    (("--data", "{tmp}/missing.npy"), "--data .*missing.npy: no such file or folder"),
    (("--data", "{tmp}/empty_dir"), "the folder holds no .png files"),
    (("--data", "{tmp}/no_pngs"), "the folder holds no .png files"),
    (("--data", "{tmp}/bad_pngs"), "a.png is not a PNG file"),
    (("--data", "{tmp}/zero_bytes.npy"), "zero_bytes.npy is not a readable .npy array"),
    (("--data", "{tmp}/no_images.npy"), "holds no pixels: its shape is \\(0, 8, 8, 3\\)"),
    (("--data", "{tmp}/grey.npy"), "shape \\(4, 8, 8\\), expected \\(N, H, W, 3\\)"),
    (("--data", "{tmp}/floats.npy"), "holds float32 values, expected uint8"),
    (("--data", "{tmp}/images.txt"), "neither a folder nor an .npy file"),
    (("--data", "{tmp}/one.npy"), "holds 1 image: at least 2 are needed"),
    (("--data", "{tmp}/four.npy", "--labels", "{tmp}/three_labels.npy"), "holds 3 labels, but --data has 4 images"),
    (("--data", "{tmp}/four.npy", "--labels", "{tmp}/labels.csv"), "holds 2 labels, but --data has 4 images"),
    (("--data", "{tmp}/four.npy", "--labels", "{tmp}/one_class.npy"), "a single class"),
    (("--data", "{tmp}/four.npy", "--labels", "{tmp}/float_labels.npy"), "expected a 1-D array of integer"),
    (("--data", "{tmp}/four.npy", "--labels", "{tmp}/none.npy"), "--labels .*none.npy: no such file"),
    (("--data", "{tmp}/four.npy", "--probe", "linear"), "--probe needs --labels with --data"),
    (("--labels", "{tmp}/four_labels.npy"), "the shapes bring their own labels"),
    (("--n-px", "5"), "--n-px must be at least 6 for the shapes"),
    (("--max-steps", "0"), "--max-steps 0 trains nothing"),
    (("--lr", "0"), "--lr must be > 0"),
    (("--probe", "linear", "--probe-lr", "1e-3"), "--probe-lr is the learning rate of --probe finetune"),
    (("--probe", "finetune", "--probe-lr", "0"), "--probe-lr must be > 0"),
    (("--val-fraction", "1"), "--val-fraction must be in \\(0, 1\\)"),
    (("--palette", "{tmp}/nowhere.npy"), "--palette .*nowhere.npy: no such file"),
    (("--palette", "{tmp}/four_labels.npy", "--n-colours", "8"), "--palette brings its own colours"),
    (("--init", "{tmp}/no_such_model"), "is neither a directory nor a known name"),
    (("--init", "{tmp}/empty_dir", "--n-layer", "2"), "--n-layer shapes a new model; --init"),
    (("--init", "{tmp}/empty_dir", "--position-init", "random"), "--position-init shapes a new model; --init"),
    (("--device", "cuda:99") if torch.cuda.is_available() else ("--device", "cuda"), "CUDA|cuda|device"),
])
def test_bad_inputs_end_with_one_line_and_status_2(tmp_path, capsys, options, message):
    make_bad_inputs(tmp_path)
    argv = ["train", "--out", str(tmp_path / "out"), "--max-steps", "1"]
    argv = [a for a in argv if not (options[0] == "--max-steps" and a in ("--max-steps", "1"))]
    assert imagegpt.main(argv + [o.format(tmp=tmp_path) for o in options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imagegpt.py: error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_ctrl_c_saves_a_checkpoint_at_the_last_step_and_prints_how_to_resume(tmp_path, capsys, monkeypatch):
    real_step, calls = imagegpt.train_step, []

    def step_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        result = real_step(*args, **kwargs)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C, at the end of step 3
        return result

    monkeypatch.setattr(imagegpt, "train_step", step_then_ctrl_c)
    out = tmp_path / "out"
    options = [*TINY, "--max-steps", "6", "--time-budget", "0", "--sample-every", "0", "--device", "cpu"]
    assert imagegpt.main(["train", *options, "--out", str(out)]) == 130
    printed = capsys.readouterr().out
    assert "interrupted: saved a checkpoint at step 3" in printed
    assert f"python imagegpt.py train --resume {out}" in printed
    assert torch.load(out / "training_state.pt", weights_only=True)["step"] == 3 and len(log_rows(out)) == 3
    monkeypatch.undo()
    assert imagegpt.main(["train", "--resume", str(out)]) == 0
    assert imagegpt.main(["train", *options, "--out", str(tmp_path / "whole")]) == 0
    # The interrupted and resumed run is the uninterrupted one, bit for bit.
    assert [r["loss"] for r in log_rows(out)] == [r["loss"] for r in log_rows(tmp_path / "whole")]
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("blow_up", [7, 2])
def test_a_run_that_turns_to_nan_stops_and_keeps_the_last_good_checkpoint_byte_for_byte(tmp_path, capsys,
                                                                                         monkeypatch, blow_up):
    """At step blow_up every weight becomes NaN (as after an update too large): that step's real loss is NaN. The
    run stops at once, saving nothing over the checkpoint of step 5 (when there is one), and says so in one line."""
    out, on_disk, real_step, calls = tmp_path / "out", {}, imagegpt.train_step, []

    def step_with_nan_weights(model, *args):
        calls.append(1)
        if len(calls) == blow_up:
            on_disk.update({p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"})
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return real_step(model, *args)

    monkeypatch.setattr(imagegpt, "train_step", step_with_nan_weights)
    options = [*TINY, "--max-steps", "20", "--time-budget", "0", "--save-every", "5", "--sample-every", "0",
               "--lr", "0.002", "--device", "cpu"]
    assert imagegpt.main(["train", *options, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    kept = f"the last good checkpoint, step 5, is kept in {out}" if blow_up > 5 else \
        f"no checkpoint was saved in {out} before it"
    assert err == f"imagegpt.py: error: training diverged at step {blow_up} (loss nan, gradient norm nan): {kept}; " \
                  "lower --lr (its peak is 0.002) or --grad-clip and train again (--resume would take the same steps " \
                  "again)\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == on_disk  # nothing saved over it, no temporary left
    assert ("training_state.pt" in on_disk) == (blow_up > 5)


def test_an_infinite_gradient_norm_alone_is_divergence_too(tmp_path, capsys, monkeypatch):
    real_step, calls = imagegpt.train_step, []

    def infinite_gradient_at_step_3(*args):
        calls.append(1)
        loss, grad_norm = real_step(*args)
        return loss, float("inf") if len(calls) == 3 else grad_norm

    monkeypatch.setattr(imagegpt, "train_step", infinite_gradient_at_step_3)
    out = tmp_path / "out"
    assert imagegpt.main(["train", *TINY, "--max-steps", "6", "--sample-every", "0", "--out", str(out)]) == 2
    assert re.fullmatch(r"imagegpt.py: error: training diverged at step 3 \(loss [0-9.]+, gradient norm inf\): no "
                        r"checkpoint was saved in .* before it; .*\n", capsys.readouterr().err)


def test_resume_with_a_larger_budget_trains_a_finished_run_further(tmp_path):
    _, out = train(tmp_path, "--max-steps", 3, "--sample-every", 0)
    resume = imagegpt.build_parser().parse_args(["train", "--resume", str(out), "--max-steps", "6"])
    assert imagegpt.train_command(resume)["step"] == 6
    assert [int(r["step"]) for r in log_rows(out)] == list(range(1, 7))


def test_a_run_killed_outright_keeps_its_log_and_resume_continues_it_without_a_gap(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "imagegpt.py"), "train", *TINY, "--max-steps", "100000",
               "--time-budget", "0", "--eval-every", "0", "--sample-every", "0", "--save-every", "5", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 60
    while not ((out / "log.csv").exists() and len(log_rows(out)) >= 13) and time.time() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    process.kill()  # SIGKILL: no handler runs, nothing is flushed on the way out
    process.wait()
    assert [int(r["step"]) for r in log_rows(out)][:13] == list(range(1, 14))
    saved = torch.load(out / "training_state.pt", weights_only=True)["step"]
    assert saved >= 10 and saved % 5 == 0
    assert imagegpt.main(["train", "--resume", str(out), "--max-steps", str(saved + 4)]) == 0
    assert [int(r["step"]) for r in log_rows(out)] == list(range(1, saved + 5)) and not (out / ".lock").exists()


def test_training_again_into_a_run_folder_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    _, out = train(tmp_path, "--max-steps", 3, "--sample-every", 0)
    before = (out / "model.safetensors").read_bytes()
    argv = ["train", *TINY, "--max-steps", "2", "--out", str(out), "--device", "cpu"]
    assert imagegpt.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds a run" in err and f"--resume {out}" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == before and len(log_rows(out)) == 3
    assert imagegpt.main(argv + ["--overwrite", "--seed", "1"]) == 0
    assert len(log_rows(out)) == 2 and (out / "model.safetensors").read_bytes() != before


def test_a_folder_in_use_by_a_live_process_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{live.pid}\n")
        assert imagegpt.main(["train", *TINY, "--max-steps", "2", "--out", str(out), "--device", "cpu"]) == 2
        assert f"process {live.pid} is training there" in capsys.readouterr().err
    finally:
        live.kill()
        live.wait()
    assert imagegpt.main(["train", *TINY, "--max-steps", "2", "--out", str(out), "--device", "cpu"]) == 0  # stale


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_a_damaged_training_state_gives_one_clear_line(tmp_path, capsys, damage):
    _, out = train(tmp_path, "--max-steps", 2, "--sample-every", 0)
    path = out / "training_state.pt"
    data = bytearray(path.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    assert imagegpt.main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagegpt.py: error: ") and err.count("\n") == 1 and f"{path} is damaged" in err


def test_a_run_that_fails_before_training_leaves_no_folder_behind(tmp_path, capsys):
    palette = tmp_path / "palette.npy"
    np.save(palette, np.zeros((4, 3), dtype=np.float32))
    ImageGPTForCausalImageModeling(imagegpt.ImageGPTConfig(vocab_size=9, n_positions=36, n_embd=16, n_layer=1,
                                                           n_head=2)).save_pretrained(str(tmp_path / "m"))
    argv = ["train", "--init", str(tmp_path / "m"), "--palette", str(palette), "--out", str(tmp_path / "o")]
    assert imagegpt.main(argv) == 2
    assert "colours" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_unknown_option_exits_2_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        imagegpt.main(["train", "--bogus", "3"])
    assert exit_.value.code == 2
    assert "imagegpt.py: error: unrecognized arguments: --bogus 3" in capsys.readouterr().err


def test_help_shows_the_training_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        imagegpt.main(["train", "--help"])
    assert exit_.value.code == 0
    assert "python imagegpt.py train --data images.npy --labels labels.npy --probe linear" in capsys.readouterr().out


# --- the default run ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_run_draws_shapes_within_a_few_minutes(tmp_path):
    """`python imagegpt.py train` as a user runs it, in its own process (about 5 minutes on 2 cores)."""
    start = time.time()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "imagegpt.py"), "train", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert time.time() - start < 420
    val = float(re.search(r"validation loss (\d\.\d+)", result.stdout).group(1))
    assert val < 0.2, result.stdout  # seen 0.115 on 2 idle cores; an untrained model: ln 16 = 2.77 nats/pixel
    grid = read_png(tmp_path / "samples.png")
    assert grid.shape == (2 * (12 * 8 + PAD) + PAD, 8 * (12 * 8 + PAD) + PAD, 3)
    # Most samples are a plain background and one shape, in two colours, as the training images are (seen: 14
    # of 16; an untrained model scatters all 16 colours of the palette).
    tiles = [grid[PAD + r * 98: PAD + r * 98 + 96: 8, PAD + c * 98: PAD + c * 98 + 96: 8] for r in range(2)
             for c in range(8)]
    assert sum(len(colours) == 2 for colours in colours_of(tiles)) >= 8
