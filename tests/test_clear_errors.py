"""Inputs that once crashed deep inside torch, numpy or struct now get a clear error, raised before any work,
naming the argument (or file), what it got and what was expected. Both model files where they apply."""

import argparse
import signal
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import imagegpt
import nanogpt2

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"nanogpt2": nanogpt2, "imagegpt": imagegpt}


def tiny(module, head=None):
    torch.manual_seed(0)
    if module is nanogpt2:
        config = nanogpt2.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=8, vocab_size=16)
        return (head or nanogpt2.GPT2LMHeadModel)(config).eval()
    config = imagegpt.ImageGPTConfig(n_layer=1, n_head=2, n_embd=8, n_positions=4, vocab_size=5)
    return (head or imagegpt.ImageGPTForCausalImageModeling)(config).eval()


# --- 5. Weights that are not finite -------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoint_with_nan_or_inf_weights_is_refused_naming_the_tensors(tmp_path, name, bad):
    model = tiny(MODULES[name])
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, :3] = bad
        model.transformer.ln_f.weight[1] = -bad
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or name == "imagegpt"}
    MODULES[name].save_safetensors(state, tmp_path / "model.safetensors")  # save_pretrained would refuse them
    with pytest.raises(MODULES[name].CheckpointError,
                       match=r"NaN or inf, in 2 tensor\(s\): transformer.h.0.mlp.c_fc.weight \(3 of 256 values\), "
                             r"transformer.ln_f.weight \(1 of 8 values\)"):
        type(model).from_pretrained(tmp_path)


# --- 4. Inputs that crashed --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("text, message", [('{"n_layer": 1,,}', "is not valid JSON"),
                                           ("[1, 2]", "holds a JSON list, expected an object of config fields")])
def test_a_bad_config_json_is_named_with_what_is_wrong(tmp_path, name, text, message):
    module = MODULES[name]
    tiny(module).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(module.CheckpointError, match=f"{tmp_path / 'config.json'} {message}"):
        type(tiny(module)).from_pretrained(tmp_path)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("device, message", [("tpu", "not a device type torch knows"), ("mps", "has no mps device")])
def test_a_device_this_machine_lacks_is_refused_by_the_command_line(tmp_path, capsys, name, device, message):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an mps device")
    module = MODULES[name]
    with pytest.raises(ValueError, match=f"--device {device}: .*{message}"):
        module.resolve_device(device)
    tiny(module).save_pretrained(tmp_path)
    assert module.main(["sample", "--model", str(tmp_path), "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"--device {device}: " in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_an_empty_batch_is_refused_by_forward_and_generate(name, shape):
    module = MODULES[name]
    model = tiny(module)
    ids = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"input_ids has shape \({shape[0]}, {shape[1]}\), expected"):
        model(ids)
    with pytest.raises(ValueError, match="empty"):
        module.generate(model, ids, max_new_tokens=1)
    if shape[0] == 0:
        with pytest.raises(ValueError, match=r"input_ids has shape \(0, 3\), expected \(B, T\) with B >= 1"):
            module.generate(model, ids, max_new_tokens=1)


def test_encode_batch_refuses_no_prompts_and_a_bare_string():
    with pytest.raises(ValueError, match="prompts is an empty list"):
        nanogpt2.encode_batch([])
    with pytest.raises(TypeError, match="prompts must be a list of strings, got the string 'Hello'"):
        nanogpt2.encode_batch("Hello")


@pytest.mark.parametrize("call, error, message", [
    (lambda: nanogpt2.encode(123), TypeError, "encode takes a str, got int 123"),
    (lambda: nanogpt2.encode(b"bytes"), TypeError, "encode takes a str, got bytes"),
    (lambda: nanogpt2.decode([15496, -1]), ValueError, r"ids\[1\] is -1, but token ids are integers in \[0, 50257\)"),
    (lambda: nanogpt2.decode([10 ** 6]), ValueError, r"ids\[0\] is 1000000, but token ids"),
    (lambda: nanogpt2.decode([2 ** 64]), ValueError, r"ids\[0\] is 18446744073709551616"),
    (lambda: nanogpt2.decode(["a"]), ValueError, r"ids\[0\] is 'a'"),
    (lambda: nanogpt2.decode([True]), ValueError, r"ids\[0\] is True"),
    (lambda: nanogpt2.decode(torch.zeros(2, 2, dtype=torch.long)), TypeError, "must be a 1-D tensor"),
    (lambda: nanogpt2.decode("hello"), TypeError, "ids must be a sequence of token ids, got str"),
    (lambda: nanogpt2.encode_batch([1, 2]), TypeError, r"prompts\[0\] is int 1, expected a str"),
    (lambda: nanogpt2.encode_batch(["a"], pad_id=None), TypeError, "pad_id must be a token id"),
    (lambda: nanogpt2.StreamDecoder()(10 ** 6), ValueError, r"token is 1000000, but token ids are integers in \[0, 50257\)"),
    (lambda: nanogpt2.StreamDecoder("ab")(2), ValueError, r"token is 2, but token ids are integers in \[0, 2\)"),
])
def test_the_tokenizer_functions_name_a_bad_argument_instead_of_tiktokens_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_good_token_ids_of_every_kind_still_decode():
    assert nanogpt2.decode([15496, 995]) == nanogpt2.decode(torch.tensor([15496, 995])) == "Hello world"
    assert nanogpt2.decode(np.array([15496, 995])) == "Hello world"
    assert nanogpt2.StreamDecoder()(torch.tensor(15496)) == "Hello"


def test_labels_of_the_wrong_shape_are_named_before_any_work():
    ids = torch.zeros(2, 3, dtype=torch.long)
    config = tiny(nanogpt2).config
    cases = [
        (nanogpt2.GPT2LMHeadModel, dict(labels=torch.zeros(2, 4, dtype=torch.long)), r"labels has shape \(2, 4\)"),
        (nanogpt2.GPT2LMHeadModel, dict(labels=torch.zeros(6, dtype=torch.long)), r"labels has shape \(6,\)"),
        (nanogpt2.GPT2ForTokenClassification, dict(labels=torch.zeros(3, dtype=torch.long)),
         r"labels has shape \(3,\)"),
        (nanogpt2.GPT2ForSequenceClassification, dict(labels=torch.zeros(3, dtype=torch.long)),
         r"labels has shape \(3,\), expected \(2,\) or \(2, 1\)"),
        (nanogpt2.GPT2ForSequenceClassification, dict(labels=torch.zeros(2, 5)), r"labels has shape \(2, 5\)"),
        (nanogpt2.GPT2ForQuestionAnswering, dict(start_positions=torch.zeros(2, 2, dtype=torch.long),
                                                 end_positions=torch.zeros(2, dtype=torch.long)),
         r"start_positions has shape \(2, 2\), expected \(2,\)"),
    ]
    for head, kwargs, message in cases:
        config.pad_token_id = 0
        with pytest.raises(ValueError, match=message):
            head(config).eval()(ids, **kwargs)
    double = nanogpt2.GPT2DoubleHeadsModel(config).eval()
    choices = torch.zeros(2, 2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels has shape \(2, 3\), expected \(2, 2, 3\)"):
        double(choices, labels=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mc_labels has shape \(2, 2\), expected \(2,\)"):
        double(choices, mc_labels=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="mc_labels holds choice 5, but the number of choices is 2"):
        double(choices, mc_labels=torch.tensor([0, 5]))
    classifier = imagegpt.ImageGPTForImageClassification(tiny(imagegpt).config).eval()
    for labels in (torch.zeros(3, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match=rf"labels has shape \({', '.join(map(str, labels.shape))},?\)"):
            classifier(ids, labels=labels)


def test_imagegpt_refuses_position_ids_of_another_batch_size_as_nanogpt2_does():
    for module in MODULES.values():
        with pytest.raises(ValueError, match=r"position_ids has shape \(3, 3\), expected \(T,\), \(1, T\) or \(B, T\)"):
            tiny(module)(torch.zeros(2, 3, dtype=torch.long), position_ids=torch.zeros(3, 3, dtype=torch.long))


def test_a_prompt_longer_than_the_model_says_so_and_the_fix(tmp_path, capsys):
    torch.manual_seed(0)  # n_positions=8, and GPT-2's vocabulary, so the command line uses GPT-2's BPE
    config = nanogpt2.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=8)
    nanogpt2.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    prompt = "one two three four five six seven eight nine ten"  # 10 tokens
    assert nanogpt2.main(["sample", "--model", str(tmp_path), "--device", "cpu", "--prompt", prompt]) == 2
    err = capsys.readouterr().err
    assert "the prompt is 10 tokens, longer than the model's 8 positions; shorten it to at most 8 tokens" in err
    assert "--max-new-tokens" not in err  # the user never gave one
    assert nanogpt2.main(["sample", "--model", str(tmp_path), "--device", "cpu", "--prompt", "one two three",
                          "--max-new-tokens", "7"]) == 2
    assert "ask for at most 5 new tokens or shorten the prompt" in capsys.readouterr().err


def png_bytes(ihdr, idat=b""):
    return (imagegpt.PNG_SIGNATURE + imagegpt._png_chunk(b"IHDR", ihdr) + imagegpt._png_chunk(b"IDAT", idat)
            + imagegpt._png_chunk(b"IEND", b""))


def test_read_png_refuses_a_short_header_and_an_empty_image(tmp_path):
    (tmp_path / "short.png").write_bytes(png_bytes(b"\0\0\0\2\0\0"))
    with pytest.raises(ValueError, match="its IHDR chunk holds 6 bytes, but a PNG header is 13 bytes"):
        imagegpt.read_png(tmp_path / "short.png")
    (tmp_path / "empty.png").write_bytes(png_bytes(struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0), zlib.compress(b"")))
    with pytest.raises(ValueError, match="declares a 0 x 5 image"):
        imagegpt.read_png(tmp_path / "empty.png")


def zeros_inflating_to(size):
    """A zlib stream of `size` zero bytes (a multiple of 1 MiB), built from one compressed MiB repeated: after a
    full flush a deflate block refers to nothing before it, so copies of it chain. Fast, unlike compressing."""
    mib = b"\0" * (1 << 20)
    packer = zlib.compressobj(9)
    block = packer.compress(mib) + packer.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(size >> 20):
        checksum = zlib.adler32(mib, checksum)
    return block[:2] + block[2:] * (size >> 20) + b"\x03\x00" + checksum.to_bytes(4, "big")  # + an empty last block


def test_read_png_refuses_a_huge_declared_size_and_a_zip_bomb_without_inflating_it(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_bytes(struct.pack(">IIBBBBB", 32768, 32768, 8, 2, 0, 0, 0),
                                                  zlib.compress(b"\0" * 100)))
    with pytest.raises(ValueError, match=r"declares a 32768 x 32768 image of 3 channels \(3,221,225,472 bytes\)"):
        imagegpt.read_png(tmp_path / "huge.png")
    # 2 x 2 RGB declared (14 bytes with the filter bytes), 1 GiB inside
    (tmp_path / "bomb.png").write_bytes(png_bytes(struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0),
                                                  zeros_inflating_to(1 << 30)))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="the image data holds more bytes than that, but a 2 x 2 image"):
            imagegpt.read_png(tmp_path / "bomb.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20  # the 1 MB file is read; the 1 GiB it inflates to never exists


def test_quantise_refuses_an_empty_batch():
    palette = torch.rand(4, 3) * 2 - 1
    with pytest.raises(ValueError, match=r"images has shape \(0, 2, 2, 3\), expected \(B, H, W, 3\) with B >= 1"):
        imagegpt.quantise(torch.zeros(0, 2, 2, 3, dtype=torch.uint8), palette)
    with pytest.raises(ValueError, match="images is an empty list"):
        imagegpt.quantise([], palette)


def test_convert_list_into_a_closed_pipe_exits_quietly():
    fixture = ROOT / "tests" / "fixtures" / "tf" / "gpt2"
    child = subprocess.Popen([sys.executable, str(ROOT / "convert_tf.py"), "--list", str(fixture)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # as `| head` does once it has its lines
    err = child.stderr.read().decode()
    assert child.wait(timeout=60) == 0 and err == ""


# --- 6. Numbers that are not numbers -------------------------------------------------------------------------

def float_options(module):
    """(command, option, argparse type) for every option of every command that takes a float: plain float, or
    the project's float_option() (whose parser is a function named `number` made inside it)."""
    parser = module.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [(command, action.option_strings[0], action.type) for command, sub in commands.choices.items()
            for action in sub._actions
            if action.type is float or getattr(action.type, "__qualname__", "").startswith("float_option.")]


@pytest.mark.parametrize("name", MODULES)
def test_every_float_option_of_the_command_lines_refuses_nan_and_inf(capsys, name):
    """float() takes "nan" and "inf", and `nan < 0` is False, so a range check alone lets nan through
    (`sample --temperature nan` decoded greedily). Every float option is parsed by float_option() instead."""
    module = MODULES[name]
    options = float_options(module)
    assert {"--temperature", "--top-p", "--lr", "--weight-decay", "--grad-clip", "--dropout", "--time-budget",
            "--val-fraction"} <= {option for _, option, _ in options}  # the search finds them
    for command, option, kind in options:
        assert kind is not float, f"{command} {option} is parsed by float, which takes nan and inf"
        for text in ("nan", "inf", "-inf", "NaN", "1e999"):
            with pytest.raises(SystemExit) as exit_:
                module.main([command, f"{option}={text}"])  # (a bare -inf would read as an option)
            assert exit_.value.code == 2
            err = capsys.readouterr().err
            last = err.strip().splitlines()[-1]
            assert last.endswith(f"error: argument {option}: must be a finite number, got {text}"), err
            assert "Traceback" not in err
    with pytest.raises(SystemExit):
        module.main(["train", "--lr", "fast"])  # not a number at all: argparse's own words
    assert capsys.readouterr().err.strip().endswith("error: argument --lr: invalid number value: 'fast'")
    assert module.float_option()("-2.5e-3") == -2.5e-3  # ordinary numbers pass through, ranges are checked later


@pytest.mark.parametrize("module", [nanogpt2, imagegpt], ids=["nanogpt2", "imagegpt"])
def test_loading_saving_and_pruning_name_a_bad_argument(module, tmp_path):
    model = tiny(module)
    model.save_pretrained(tmp_path / "good")
    cls = type(model)
    for dtype in (torch.int64, torch.complex64, "float64", 5):  # an integer model fails; a complex one is wrong
        with pytest.raises(ValueError, match=r"dtype .* is not one of \['bf16', 'bfloat16'"):
            cls.from_pretrained(tmp_path / "good", dtype=dtype)
    with pytest.raises(ValueError, match="not a device type torch knows"):
        cls.from_pretrained(tmp_path / "good", device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            cls.from_pretrained(tmp_path / "good", device="cuda")
    assert cls.from_pretrained(tmp_path / "good", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(module.CheckpointError, match=r"save_pretrained\('.*bad'\): weights hold NaN or inf, in 1 "
                                                     r"tensor\(s\): transformer.h.0.mlp.c_fc.weight \(1 of"):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    for plan in ({"0": [0]}, {0: ["1"]}, [0], {0: 1}, {0: [True]}):
        with pytest.raises(TypeError, match=r"heads_to_prune must be a dict \{layer: \[head, ...\]\} of ints"):
            model.prune_heads(plan)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_parallelize_onto_gpus_a_machine_lacks_is_one_line():
    model = tiny(nanogpt2)
    with pytest.raises(ValueError, match="--device cuda:0: CUDA is not available on this machine"):
        model.parallelize({0: [0]})
    model.parallelize({"cpu": [0]})  # every block on the CPU: allowed, and a no-op
    assert model.transformer.first_device == torch.device("cpu")


# --- 7. Probes of bad input that once crashed, hung or ran out of memory ------------------------------------

def test_imagegpt_pixel_helpers_name_a_bad_argument():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    palette = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="n_px must be a positive integer, got True"):
        imagegpt.quantise(image, palette, n_px=True)
    with pytest.raises(ValueError, match="n_px must be a positive integer, got True"):
        imagegpt.resize_image(image, True)
    with pytest.raises(ValueError, match="image_grid's columns must be an integer >= 1, got 0"):
        imagegpt.image_grid(image[None], columns=0)
    with pytest.raises(ValueError, match="image_grid's scale must be an integer >= 1, got 0"):
        imagegpt.image_grid(image[None], columns=1, scale=0)
    with pytest.raises(ValueError, match=r"n_colours must be an integer in \[1, 4096\], got 1000000000"):
        imagegpt.fit_palette(image[None], n_colours=10 ** 9)  # k-means++ would pick a billion centres


@pytest.mark.parametrize("content, message", [
    (np.array([0, 1, 10 ** 12] + [0] * 7), "holds the class id 1000000000000; number the classes 0, 1, 2"),
    (np.array([0, 1, 2 ** 63 - 1] + [0] * 7), "holds the class id 9223372036854775807"),
    ("0\n1\n\xff\n".encode("latin-1"), "is not a CSV file of UTF-8 text"),
])
def test_labels_with_huge_ids_or_bad_bytes_are_one_line(tmp_path, content, message):
    path = tmp_path / ("labels.npy" if isinstance(content, np.ndarray) else "labels.csv")
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):  # (a class list of 10**12 names once ran out of memory)
        imagegpt.read_labels(str(path), None, 10 if isinstance(content, np.ndarray) else 3)


def test_a_one_colour_palette_is_refused_for_training(tmp_path, capsys):
    np.save(tmp_path / "one.npy", np.array([[0.0, 0.0, 0.0]]))
    assert imagegpt.main(["train", "--palette", str(tmp_path / "one.npy"), "--max-steps", "1",
                          "--out", str(tmp_path / "o")]) == 2
    assert "has 1 colour; a model needs at least 2" in capsys.readouterr().err


def test_nanogpt2_command_line_inputs_that_once_crashed(tmp_path, capsys, monkeypatch):
    model = tiny(nanogpt2)
    model.save_pretrained(tmp_path / "m")

    def error(argv):
        assert nanogpt2.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("nanogpt2.py: error: ") and err.count("\n") == 1, err
        return err

    (tmp_path / "bad.txt").write_bytes(b"hello \xff world")
    assert "--prompt-file " + str(tmp_path / "bad.txt") + " is not UTF-8 text (byte 6 is 0xff)" in error(
        ["sample", "--model", str(tmp_path / "m"), "--prompt-file", str(tmp_path / "bad.txt")])
    with open(tmp_path / "big.txt", "wb") as f:
        f.truncate(nanogpt2.MAX_PROMPT_BYTES + 1)  # sparse; read whole it was 3 GB of memory for a 3 GB file
    assert "holds more than 16 MB" in error(["sample", "--model", str(tmp_path / "m"), "--prompt-file",
                                             str(tmp_path / "big.txt")])
    assert "is a file, not a model folder" in error(["sample", "--model", str(tmp_path / "m" / "config.json")])
    (tmp_path / "t.txt").write_text("some text to score " * 20)
    with pytest.raises(SystemExit):  # argparse's own error: usage, then one line
        nanogpt2.main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "--context", "1"])
    assert "argument --context: must be at least 2" in capsys.readouterr().err  # was a ZeroDivisionError
    monkeypatch.setattr(nanogpt2, "MAX_PICTURE_PIXELS", 1000)
    assert "would be" in error(["inspect", "--model", str(tmp_path / "m"), "--prompt", "hi", "--out",
                                str(tmp_path / "a.png")])
    assert not (tmp_path / "a.png").exists()


def test_a_lock_that_is_a_fifo_is_taken_over_without_blocking(tmp_path):
    os_ = __import__("os")
    os_.makedirs(tmp_path / "run")
    os_.mkfifo(tmp_path / "run" / ".lock")  # opening it to read the holder's PID would wait forever
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked on the FIFO"))
    signal.alarm(10)
    try:
        lock = nanogpt2.RunLock(str(tmp_path / "run"))
    finally:
        signal.alarm(0)
    assert lock.holder() == os_.getpid()
    lock.release()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(do_sample=True, temperature=1e-45), ValueError, r"temperature must be at least 1e-06"),  # was NaN in torch
    (dict(pad_token_id=-1), ValueError, r"pad_token_id must be None or a token id \(an integer >= 0\), got -1"),
    (dict(do_sample=True, generator=5), TypeError, "generator must be a torch.Generator, got int 5"),
    (dict(on_token=5), TypeError, "on_token must be a function"),
    (dict(num_beams=2, length_penalty="x"), ValueError, "length_penalty must be a number, got 'x'"),
    (dict(do_sample=True, top_p="0.5"), ValueError, "top_p must be a number"),
])
@pytest.mark.parametrize("name", MODULES)
def test_generate_names_an_argument_of_the_wrong_kind_before_any_work(name, kwargs, error, message):
    module = MODULES[name]
    model = tiny(module)
    ids = torch.tensor([[1, 2]]) if module is nanogpt2 else None
    with pytest.raises(error, match=message):
        model.generate(ids, max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("name", MODULES)
def test_a_static_cache_larger_than_the_model_is_refused_before_it_allocates(name):
    module = MODULES[name]
    model = tiny(module)
    cache = module.StaticCache(max_length=10 ** 12)  # its first update would allocate every slot: terabytes
    with pytest.raises(ValueError, match=r"the StaticCache holds 1,000,000,000,000 positions, more than the model's"):
        model(torch.tensor([[1, 2]]), past_key_values=cache, use_cache=True)


def test_generate_counts_the_beams_logits_before_it_allocates(monkeypatch):
    monkeypatch.setenv("NANOGPT2_MAX_MEMORY_GB", "1")
    with pytest.raises(ValueError, match=r"generating 10,000,000 sequences .* more than the 1.0 GB limit"):
        tiny(nanogpt2).generate(torch.tensor([[1, 2]]), num_beams=10 ** 7, max_new_tokens=2)


# --- Special token ids, caches and ids the model cannot read; output files checked before the work -------------

@pytest.mark.parametrize("name", MODULES)
def test_special_token_ids_the_model_would_read_are_named_before_any_work(name):
    module = MODULES[name]
    model = tiny(module)  # 16 token ids (nanogpt2), 5 (imagegpt: 4 colours and SOS)
    rows = model.transformer.wte.num_embeddings
    ids = torch.tensor([[1, 2], [3, 0]])
    first = model.generate(ids, max_new_tokens=1)[:, -1]  # row 0 finishes at once on this eos, row 1 does not
    eos = int(first[0]) if first[0] != first[1] else pytest.fail("both rows chose the same token")
    # A row that finishes early carries the padding into the next step (the reference fails there, mid-way).
    with pytest.raises(ValueError, match=rf"^pad_token_id 1000000 is not a token id of this model: ids are in "
                                         rf"\[0, {rows}\); a row that finishes before the others"):
        model.generate(ids, max_new_tokens=3, eos_token_id=eos, pad_token_id=10 ** 6)
    model.generation_config.eos_token_id = [10 ** 6, eos]  # e.g. from config.json; the padding is its first id
    model.generation_config.pad_token_id = None
    with pytest.raises(ValueError, match=r"^pad_token_id is not set, so the padding is the first eos_token_id, "
                                         r"1000000 \(from the model's generation config: its generation_config.json, "
                                         r"else config.json\), which is not a token id of this model"):
        model.generate(ids, max_new_tokens=3)
    with pytest.raises(ValueError, match=r"^bos_token_id 1000000 is not a token id of this model: .*give a prompt"):
        model.generate(None, bos_token_id=10 ** 6, max_new_tokens=2)
    if name == "imagegpt":  # num_samples repeats the SOS prompt before generate's own checks
        with pytest.raises(ValueError, match=r"^bos_token_id 1000000 is not a token id of this model: .*give a prompt"):
            model.generate(None, bos_token_id=10 ** 6, max_new_tokens=2, num_samples=2)
    # What the reference runs correctly is not refused: an eos id the model never emits, padding never read.
    model.generation_config.eos_token_id = 10 ** 6
    never = model.generate(ids, max_new_tokens=3, eos_token_id=None, pad_token_id=None)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=3), never[:1])  # one row: nothing is padded
    assert torch.equal(model.generate(ids, max_new_tokens=3), never)  # no row finishes, padding unused
    assert model.generate(ids, max_new_tokens=1, eos_token_id=eos, pad_token_id=10 ** 6).shape == (2, 3)


@pytest.mark.parametrize("name", MODULES)
def test_a_cache_of_another_dtype_or_layout_is_named_before_attention(name):
    module = MODULES[name]
    model = tiny(module)
    ids = torch.tensor([[1, 2, 3], [3, 2, 1]])
    past = model(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"past_key_values\[0\] holds torch.float64 keys and torch.float64 values, "
                                         r"but the model computes in torch.float32; .*convert it"):
        model(ids[:, :1], past_key_values=tuple((k.double(), v.double()) for k, v in past))  # was SDPA's error
    with pytest.raises(ValueError, match=r"past_key_values\[0\] must be a pair \(keys, values\) of tensors"):
        model(ids[:, :1], past_key_values=tuple((k,) for k, v in past))
    assert model(ids[:, :1], past_key_values=past).logits.shape[:2] == (2, 1)


@pytest.mark.parametrize("name", MODULES)
def test_ids_are_checked_against_the_embedding_when_the_config_was_edited(name):
    module = MODULES[name]
    model = tiny(module)
    rows = model.transformer.wte.num_embeddings
    model.config.vocab_size = 10 ** 6  # edited after the model was built: the embedding still has `rows` rows
    message = (rf"input_ids holds token id 999, but the token embedding's number of rows \(wte.num_embeddings\) is "
               rf"{rows} .*config.vocab_size says 1000000: it was changed after the model was built")
    with pytest.raises(ValueError, match=message):  # was torch's "index out of range in self"
        model.generate(torch.tensor([[1, 999]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        model(torch.tensor([[1, 999]]))
    assert model.generate(torch.tensor([[1, 2]]), max_new_tokens=2).shape == (1, 4)  # as the reference: it runs


def cli(script, *argv):
    """`python script argv` in a fresh process: (exit status, stderr)."""
    run = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], capture_output=True, text=True,
                         timeout=300, env=dict(__import__("os").environ,
                                               TIKTOKEN_CACHE_DIR=str(ROOT / "tests" / "fixtures" / "tiktoken")))
    return run.returncode, run.stderr


def test_sample_refuses_an_eos_id_outside_the_vocabulary_that_it_would_pad_with(tmp_path):
    torch.manual_seed(0)  # GPT-2's vocabulary, so the command line uses GPT-2's BPE
    config = nanogpt2.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=16, eos_token_id=10 ** 6)
    nanogpt2.GPT2LMHeadModel(config).save_pretrained(tmp_path / "m")
    status, err = cli("nanogpt2.py", "sample", "--model", tmp_path / "m", "--prompt", "hi", "--prompt",
                      "hello there you", "--max-new-tokens", 3, "--temperature", 0)
    assert status == 2 and err.count("\n") == 1, err  # was "input_ids holds token id 1000000", an argument never given
    assert err.startswith(f"nanogpt2.py: error: eos_token_id 1000000 (from {tmp_path / 'm' / 'config.json'}) is not "
                          "a token id of this model: ids are in [0, 50257)"), err


def test_an_output_file_that_cannot_be_written_is_refused_before_the_work(tmp_path):
    imagegpt_model = tiny(imagegpt)
    imagegpt_model.palette = torch.rand(4, 3) * 2 - 1
    imagegpt_model.save_pretrained(tmp_path / "igpt")
    tiny(nanogpt2).save_pretrained(tmp_path / "gpt")
    (tmp_path / "d").mkdir()
    for script, argv in [("imagegpt.py", ["sample", "--model", tmp_path / "igpt", "--num-samples", 1]),
                         ("nanogpt2.py", ["inspect", "--model", tmp_path / "gpt", "--prompt", "hi"])]:
        status, err = cli(script, *argv, "--out", tmp_path / "d", "--device", "cpu")
        assert status == 2 and err.count("\n") == 1, err  # once refused only after all the sampling
        assert err == f"{script}: error: --out {tmp_path / 'd'} is a directory: give the name of a file to write " \
                      "(a .png) instead\n", err
        status, err = cli(script, *argv, "--out", tmp_path / "no" / "x.png", "--device", "cpu")
        assert status == 2 and f"the directory {tmp_path / 'no'} does not exist" in err and err.count("\n") == 1, err
    assert list((tmp_path / "d").iterdir()) == []
