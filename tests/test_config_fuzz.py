"""config.json and command-line numbers from an untrusted source: each loads, or fails with one of the project's
own errors (a ValueError, TypeError or CheckpointError with a one-line message), before anything is allocated.

- Hypothesis writes config.json files with JSON values of every kind in every field (strings for booleans,
  12.0 for integers, NaN, lists, nested objects, huge sizes), fields left out and unknown fields added, and
  loads them with from_pretrained (every head class of both files) and through the command line
  (`python nanogpt2.py sample --model DIR`, `python imagegpt.py sample --model DIR`) in subprocesses whose
  address space is capped, so that a check that lets a huge model through fails the test instead of
  swapping the machine.
- A config that is accepted really is as small as its estimate says: the tensors of the model built from it
  take no more bytes than model_bytes(config), which check_model_size held against the limit.
- Targeted: "false" is not true; a huge n_positions is refused with the figure before any allocation; the
  limit moves with NANOGPT2_MAX_MEMORY_GB and GPT-2 XL fits 24 GB; numbers out of range on the command line
  are argparse's one-line error; --scale and --num-samples too large for memory are refused before sampling.
"""

import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import imagegpt
import nanogpt2
from helpers import examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = "ab\n"  # the tiny GPT-2's characters (char_vocab): token i is CHARS[i]
ADDRESS_SPACE_CAP = 3 * 2 ** 30  # a subprocess may map 3 GiB: torch takes under 1; a model that slipped through, more
ONE_LINE_ERRORS = (ValueError, TypeError)  # CheckpointError is a ValueError


def save_tiny(module, directory):
    """A model of either file saved by save_pretrained: 1 layer of width 8; a GPT-2 that reads CHARS, an ImageGPT
    of 2 x 2 pixels with its 4-colour palette."""
    if module is nanogpt2:
        config = nanogpt2.GPT2Config(vocab_size=len(CHARS), n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                     bos_token_id=2, eos_token_id=2, extra={"char_vocab": CHARS})
        nanogpt2.GPT2LMHeadModel(config).save_pretrained(directory)
    else:
        config = imagegpt.ImageGPTConfig(vocab_size=5, n_positions=4, n_embd=8, n_layer=1, n_head=2)
        model = imagegpt.ImageGPTForCausalImageModeling(config)
        model.palette = torch.linspace(-1, 1, 12).view(4, 3)
        model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {module: save_tiny(module, tmp_path_factory.mktemp(module.__name__)) for module in (nanogpt2, imagegpt)}


@pytest.fixture
def capped():
    """While the test runs, this process may map at most ADDRESS_SPACE_CAP more than it has mapped already: a
    memory check that regressed then ends the test in a MemoryError at once, instead of in swapping or the
    kernel's OOM killer, on a machine others share."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    cap = mapped + ADDRESS_SPACE_CAP
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def config_class(module):
    return nanogpt2.GPT2Config if module is nanogpt2 else imagegpt.ImageGPTConfig


# --- what hypothesis writes -----------------------------------------------------------------------------

# Sizes: the small ones a model may have, and the ones no machine holds (or that overflow int64 or a float).
SIZES = st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 300_000, 2 ** 31, 2 ** 63, 10 ** 30, 10 ** 400])
SCALARS = st.none() | st.booleans() | st.integers(-3, 5) | SIZES | st.floats() | st.text(max_size=6) | \
    st.sampled_from(["false", "true", "12", "null", "gelu", "1e-05"])
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
# Keys a config.json may hold beyond the dataclass's fields: Hugging Face's, and nanogpt2's tools' own.
OTHER_KEYS = ["id2label", "label2id", "n_ctx", "architectures", "torch_dtype", "model_type", "task_specific_params",
              "char_vocab", "addition_digits"]


@st.composite
def config_json(draw, module, base):
    """A config.json's text: the tiny model's config with up to three fields replaced by a size or any JSON value
    (a string, NaN, a list, a nested object ...) or left out, and unknown keys added; now and then not an
    object at all. (Few fields at a time, so that an example gets past the first bad field to the ranges, the
    memory check and the weights; the simplest example is the tiny model's own config.)"""
    if draw(st.integers(0, 9)) == 9:
        return json.dumps(draw(JSON_VALUES))
    config = dict(base)
    keys = [f.name for f in dataclasses.fields(config_class(module)) if f.name != "extra"] + OTHER_KEYS
    for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        what = draw(st.sampled_from(["size", "junk", "drop"]))
        if what == "drop":
            config.pop(key, None)
        else:
            config[key] = draw(SIZES if what == "size" else JSON_VALUES)
    config.update(draw(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2)))
    return json.dumps(config)  # NaN and Infinity written as JSON's extension, which Python's json reads


def base_config(directory):
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def write_checkpoint(tiny_dir, directory, text):
    """The tiny model's weights (and palette) beside a config.json of the given text."""
    shutil.copytree(tiny_dir, directory, dirs_exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        f.write(text)
    return directory


def tensor_bytes(model) -> int:
    """The bytes of a model's parameters and buffers, each storage counted once (a tied head shares one)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


# --- in process: from_pretrained, every head class ------------------------------------------------------


@pytest.mark.parametrize("module", [nanogpt2, imagegpt], ids=["gpt2", "imagegpt"])
@examples(40)
@given(data=st.data())
def test_any_config_json_loads_or_fails_with_one_clear_error(module, tiny_dirs, tmp_path, monkeypatch, data, capped):
    """from_pretrained on a fuzzed config.json: a model, or a ValueError/TypeError of one line. When the config
    itself is accepted, the model built from it holds no more tensor bytes than the estimate check_model_size
    held against the limit (here 0.25 GB, so every accepted model is small)."""
    monkeypatch.setenv("NANOGPT2_MAX_MEMORY_GB", "0.25")
    text = data.draw(config_json(module, base_config(tiny_dirs[module])))
    directory = write_checkpoint(tiny_dirs[module], tmp_path / "model", text)
    head = data.draw(st.sampled_from(module.HEAD_CLASSES))
    try:
        head.from_pretrained(str(directory))
    except ONE_LINE_ERRORS as e:
        assert str(e) and "\n" not in str(e), repr(e)
    path, name = os.path.join(directory, "config.json"), config_class(module).__name__
    try:
        config = config_class(module).from_json_file(path)
    except module.CheckpointError as e:  # names the file, then the field (or the model's size, or the JSON)
        assert re.match(rf"{re.escape(path)}(: {name}\.\w+[ ']|: a model of this {name} | is not valid JSON"
                        r"| holds a JSON \w+, expected an object)", str(e)) and "\n" not in str(e), repr(e)
        return
    with module.without_random_init():
        model = head(config)
    assert tensor_bytes(model) <= module.model_bytes(config) <= 0.25e9


# Configs in which each term of model_bytes is most of the model: the causal masks, the embeddings, the blocks'
# matrices, a wide MLP, cross-attention, a classifier of many labels, GPT-2's multiple-choice projection (C x C).
DOMINANT_TERMS = [dict(n_positions=1024, n_layer=2), dict(vocab_size=50_000), dict(n_embd=256, n_layer=2),
                  dict(n_inner=4096), dict(add_cross_attention=True, n_embd=128, n_positions=256),
                  dict(num_labels=100_000), dict(summary_proj_to_labels=False, n_embd=512)]


@pytest.mark.parametrize("module", [nanogpt2, imagegpt], ids=["gpt2", "imagegpt"])
@pytest.mark.parametrize("overrides", DOMINANT_TERMS, ids=[next(iter(o)) for o in DOMINANT_TERMS])
def test_the_size_estimate_covers_every_tensor_of_every_head(module, overrides):
    """model_bytes, which check_model_size holds against the limit, is at least what the tensors of any head
    class built from the config take, whichever term dominates: a config that passes the check fits."""
    if not all(name in {f.name for f in dataclasses.fields(config_class(module))} for name in overrides):
        pytest.skip(f"{config_class(module).__name__} has no {list(overrides)}")
    config = config_class(module)(**{**dict(vocab_size=5, n_positions=4, n_embd=8, n_layer=1, n_head=2), **overrides})
    for head in module.HEAD_CLASSES:
        with module.without_random_init():
            assert tensor_bytes(head(config)) <= module.model_bytes(config), head.__name__


# --- through the command line, in subprocesses with a capped address space ------------------------------


def cap_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))


def run_capped(commands, tmp_path, memory_gb="1"):
    """Run each command (an argv list) at once, each under ADDRESS_SPACE_CAP and NANOGPT2_MAX_MEMORY_GB=memory_gb
    (None: the machine's memory); their CompletedProcesses."""
    env = {**os.environ, "NANOGPT2_HUB_URL": "http://127.0.0.1:9", "NANOGPT2_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    env.pop("NANOGPT2_MAX_MEMORY_GB", None)
    if memory_gb is not None:
        env["NANOGPT2_MAX_MEMORY_GB"] = memory_gb
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              encoding="utf-8", preexec_fn=cap_address_space) for command in commands]
    results = []
    for proc, command in zip(procs, commands):
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(command, proc.returncode, stdout, stderr))
    return results


def sample_command(module, directory, out):
    if module is nanogpt2:
        return [sys.executable, "nanogpt2.py", "sample", "--model", str(directory), "--prompt", "ab",
                "--max-new-tokens", "2", "--device", "cpu", "--seed", "1"]
    return [sys.executable, "imagegpt.py", "sample", "--model", str(directory), "--num-samples", "1",
            "--scale", "1", "--out", str(out), "--device", "cpu", "--seed", "1"]


@examples(2)
@given(data=st.data())
def test_fuzzed_config_json_through_the_command_line_is_a_model_or_one_error_line(tiny_dirs, tmp_path, data):
    """A fuzzed config.json per model, sampled from by a real `python nanogpt2.py sample` and `python imagegpt.py
    sample` (both at once, twice: the first example is the tiny models' own configs, which sample): exit 0, or
    exit 2 with one line `PROG: error: ...`, no traceback, and never past the address-space cap (which would
    end in a MemoryError's traceback)."""
    commands = []
    for module in (nanogpt2, imagegpt):
        text = data.draw(config_json(module, base_config(tiny_dirs[module])))
        directory = write_checkpoint(tiny_dirs[module], tmp_path / module.__name__, text)
        commands.append(sample_command(module, directory, tmp_path / f"{module.__name__}.png"))
    for result in run_capped(commands, tmp_path):
        prog = result.args[1]
        assert result.returncode in (0, 2), (result.args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        if result.returncode == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr


# --- targeted: booleans, sizes, the limit -------------------------------------------------------------


@pytest.mark.parametrize("module", [nanogpt2, imagegpt], ids=["gpt2", "imagegpt"])
def test_the_string_false_is_refused_not_read_as_true(module, tiny_dirs, tmp_path):
    name = config_class(module).__name__
    with pytest.raises(ValueError, match=rf"^{name}\.use_cache must be true or false, got 'false' \(a str\)$"):
        config_class(module)(use_cache="false")
    text = json.dumps({**base_config(tiny_dirs[module]), "tie_word_embeddings": "false"})
    directory = write_checkpoint(tiny_dirs[module], tmp_path / "model", text)
    message = rf"^{re.escape(str(directory / 'config.json'))}: {name}\.tie_word_embeddings must be true or false, " \
              r"got 'false' \(a str\)$"
    with pytest.raises(module.CheckpointError, match=message):
        module.HEAD_CLASSES[0].from_pretrained(str(directory))


BAD_SHAPES = [
    ("id2label", 5, r"id2label must map label numbers to names, \{\"0\": \"negative\", \"1\": \"positive\"\}, "
                    r"got 5 \(an int\)$"),
    ("id2label", None, r"id2label must map label numbers to names, .*got None \(a NoneType\)"),
    ("id2label", {"zero": "a"}, r"id2label must map label numbers to names, .*got \{'zero': 'a'\} \(a dict\)"),
    ("id2label", {"0": ["a"]}, r"id2label must map label numbers to names, .*got \{'0': \['a'\]\} \(a dict\)"),
    ("pruned_heads", {"a": [1]}, r"pruned_heads must map layer numbers to lists of head numbers, "
                                 r"\{\"11\": \[0, 3\]\}, got \{'a': \[1\]\} \(a dict\)$"),
    ("pruned_heads", {"0": "1"}, r"pruned_heads must map layer numbers to lists of head numbers, .*got \{'0': '1'\}"),
    ("pruned_heads", {"0": [True]}, r"pruned_heads must map layer numbers to lists of head numbers"),
    ("pruned_heads", {"9" * 5000: [0]}, r"pruned_heads must map layer numbers to lists of head numbers"),
    ("pruned_heads", [[0]], r"pruned_heads must map layer numbers to lists of head numbers, .*got \[\[0\]\] "
                            r"\(a list\)"),
]


@pytest.mark.parametrize("module", [nanogpt2, imagegpt], ids=["gpt2", "imagegpt"])
@pytest.mark.parametrize("key, value, message", BAD_SHAPES, ids=[f"{k}={str(v)[:12]}" for k, v, _ in BAD_SHAPES])
def test_label_names_and_pruned_heads_of_the_wrong_shape_are_named(module, tiny_dirs, key, value, message):
    """id2label and pruned_heads are read before the dataclass is built (num_labels is id2label's length; JSON's
    layer numbers are strings): junk there is named too, not a TypeError from len() or int()."""
    with pytest.raises(ValueError, match=rf"^{config_class(module).__name__}\.{message}"):
        config_class(module).from_dict({**base_config(tiny_dirs[module]), key: value})


@pytest.mark.parametrize("extra, message", [
    (dict(char_vocab="ab"), r"char_vocab must be a string of vocab_size \(3\) different characters, one per token, "
                            r"got 'ab' \(a str\)"),
    (dict(char_vocab="aab"), r"char_vocab must be a string of vocab_size \(3\) different characters"),
    (dict(char_vocab=["a", "b", "c"]), r"char_vocab must be a string .*got \['a', 'b', 'c'\] \(a list\)"),
    (dict(addition_digits=10), r"addition_digits must be an integer in 1\.\.9 \(as train --digits\), got 10"),
    (dict(addition_digits="2"), r"addition_digits must be an integer in 1\.\.9 .*got '2' \(a str\)"),
])
def test_what_nanogpt2s_tools_keep_in_the_config_is_checked_too(tiny_dirs, extra, message):
    """A character model's characters (the tokenizer decodes token i as the i-th) and an adder's digits (eval
    builds the task from them) come from config.json as well."""
    with pytest.raises(ValueError, match=rf"^GPT2Config\.extra's {message}"):
        nanogpt2.GPT2Config.from_dict({**base_config(tiny_dirs[nanogpt2]), **extra})


# The config.json of openai/imagegpt-small as Hugging Face publishes it: null for n_inner, 1e-05 for the
# epsilon, keys of Hugging Face's own (architectures, torch_dtype, transformers_version).
HF_IMAGEGPT_CONFIG = {
    "activation_function": "quick_gelu", "architectures": ["ImageGPTForCausalImageModeling"], "attn_pdrop": 0.1,
    "embd_pdrop": 0.1, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "imagegpt",
    "n_embd": 512, "n_head": 8, "n_inner": None, "n_layer": 24, "n_positions": 1024, "reorder_and_upcast_attn": False,
    "resid_pdrop": 0.1, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
    "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.46.3", "use_cache": True,
    "vocab_size": 513, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "pruned_heads": {}, "output_attentions": False, "output_hidden_states": False, "problem_type": None,
}


def test_what_hugging_face_writes_is_accepted(tmp_path):
    """Its own values, as transformers writes them, with the keys of PretrainedConfig it adds to every file
    (pruned_heads, id2label, return_dict, bad_words_ids, ...): none is refused."""
    import transformers

    for ours, theirs, preset in ((nanogpt2.GPT2Config, transformers.GPT2Config, "gpt2"),
                                 (imagegpt.ImageGPTConfig, transformers.ImageGPTConfig, None)):
        hf = theirs(n_layer=2, n_embd=64, n_head=4, num_labels=3, pruned_heads={1: [0, 2]})
        hf.to_json_file(tmp_path / f"{preset}.json", use_diff=False)
        config = ours.from_json_file(tmp_path / f"{preset}.json")
        assert (config.n_layer, config.num_labels, config.pruned_heads) == (2, 3, {1: [0, 2]})
    config = imagegpt.ImageGPTConfig.from_dict(HF_IMAGEGPT_CONFIG)
    assert config.n_inner is None and config.layer_norm_epsilon == 1e-05 and config.extra["torch_dtype"] == "float32"


def test_a_huge_n_positions_is_refused_with_the_figure_before_anything_is_allocated(tiny_dirs, tmp_path):
    """"n_positions": 300000 asks for a 90 GB causal mask in every layer. Under a 3 GiB address-space cap and
    the machine's own memory limit, both files' from_pretrained refuse it with the figure; a regression would
    die of a MemoryError (a traceback) instead of swapping the machine."""
    commands = []
    for module in (nanogpt2, imagegpt):
        text = json.dumps({**base_config(tiny_dirs[module]), "n_positions": 300_000})
        directory = write_checkpoint(tiny_dirs[module], tmp_path / module.__name__, text)
        commands.append(sample_command(module, directory, tmp_path / "out.png"))
    for result, module in zip(run_capped(commands, tmp_path, memory_gb=None), (nanogpt2, imagegpt)):
        name = config_class(module).__name__
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        # 1 layer: the mask (9e10 bools) and the one made alongside it, 1.8e11 bytes.
        assert re.fullmatch(rf"{result.args[1]}: error: \S+config\.json: a model of this {name} \(n_layer=1, "
                            r"n_embd=8, n_positions=300000, vocab_size=\d\) needs about 180\.\d GB, more than the "
                            r"[\d,.]+ GB limit \(this machine's memory\); use a smaller config .*, or set "
                            r"NANOGPT2_MAX_MEMORY_GB to allow more\n", result.stderr), result.stderr


@pytest.mark.parametrize("module", [nanogpt2, imagegpt], ids=["gpt2", "imagegpt"])
def test_the_memory_limit_follows_the_variable(module, monkeypatch):
    cls = config_class(module)
    monkeypatch.setenv("NANOGPT2_MAX_MEMORY_GB", "24")  # a 24 GB machine: the largest released models fit
    largest = cls.from_preset("gpt2-xl" if module is nanogpt2 else "imagegpt-large")
    assert 5e9 < module.model_bytes(largest) < 8e9  # 1.5B parameters of 4 bytes, and the rest
    monkeypatch.setenv("NANOGPT2_MAX_MEMORY_GB", "5")
    with pytest.raises(ValueError, match=r"needs about [5-7]\.\d GB, more than the 5\.0 GB limit "
                                         r"\(NANOGPT2_MAX_MEMORY_GB\)"):
        cls.from_preset("gpt2-xl" if module is nanogpt2 else "imagegpt-large")
    monkeypatch.setenv("NANOGPT2_MAX_MEMORY_GB", "lots")
    with pytest.raises(ValueError, match=r"NANOGPT2_MAX_MEMORY_GB must be a number of gigabytes > 0, got 'lots'"):
        cls()


# --- targeted: the command line's numbers -----------------------------------------------------------------

ARGPARSE_MISTAKES = [
    (nanogpt2, ["sample", "--seed", "-1"], r"argument --seed: must be in \[0, 9223372036854775807\], got -1"),
    (nanogpt2, ["sample", "--seed", str(2 ** 64)], r"argument --seed: must be in \[0, 9223372036854775807\]"),
    (nanogpt2, ["sample", "--num-samples", "0"], r"argument --num-return-sequences/--num-samples: must be at least 1, got 0"),
    (nanogpt2, ["sample", "--num-beams", "0"], r"argument --num-beams: must be at least 1, got 0"),
    (nanogpt2, ["sample", "--no-repeat-ngram-size", "-1"], r"argument --no-repeat-ngram-size: must be at least 0"),
    (nanogpt2, ["sample", "--repetition-penalty", "nan"], r"argument --repetition-penalty: must be a finite number"),
    (nanogpt2, ["sample", "--max-new-tokens", "-1"], r"argument --max-new-tokens: must be at least 0, got -1"),
    (nanogpt2, ["sample", "--top-k", "-5"], r"argument --top-k: must be at least 0, got -5"),
    (nanogpt2, ["sample", "--temperature", "nan"], r"argument --temperature: must be a finite number, got nan"),
    (nanogpt2, ["inspect", "--prompt", "a", "--top", "0"], r"argument --top: must be at least 1, got 0"),
    (nanogpt2, ["eval", "--batch-size", "0"], r"argument --batch-size: must be at least 1, got 0"),
    (nanogpt2, ["train", "--batch-size", "0"], r"argument --batch-size: must be at least 1, got 0"),
    (nanogpt2, ["train", "--batch-size", "1.5"], r"argument --batch-size: invalid integer value: '1.5'"),
    (nanogpt2, ["train", "--digits", "0"], r"argument --digits: must be in \[1, 9\], got 0"),
    (nanogpt2, ["train", "--lr", "inf"], r"argument --lr: must be a finite number, got inf"),
    (nanogpt2, ["train", "--threads", str((os.cpu_count() or 1) + 1)],
     rf"argument --threads: must be in \[1, {os.cpu_count()}\] \(the cores of this machine\)"),
    (imagegpt, ["sample", "--scale", "0"], r"argument --scale: must be at least 1, got 0"),
    (imagegpt, ["sample", "--num-samples", "0"], r"argument --num-samples: must be at least 1, got 0"),
    (imagegpt, ["complete", "--image", "x.png", "--seed", str(2 ** 63)], r"argument --seed: must be in \[0, "),
    (imagegpt, ["train", "--n-colours", "1"], r"argument --n-colours: must be in \[2, 4096\]"),
    (imagegpt, ["train", "--n-colours", "100000"], r"argument --n-colours: must be in \[2, 4096\]"),
    (imagegpt, ["train", "--seed", "-3"], r"argument --seed: must be in \[0, "),
    (imagegpt, ["train", "--num-samples", "0"], r"argument --num-samples: must be at least 1, got 0"),
    (imagegpt, ["train", "--dropout", "nan"], r"argument --dropout: must be a finite number, got nan"),
]


@pytest.mark.parametrize("module, argv, message", ARGPARSE_MISTAKES,
                         ids=[f"{m.__name__}-{' '.join(a)}" for m, a, _ in ARGPARSE_MISTAKES])
def test_command_line_numbers_out_of_range_are_one_argparse_error(module, argv, message, capsys, monkeypatch):
    def never(args):
        raise AssertionError(f"{argv} got past argparse")  # rather than train with --n-colours 100000

    for name in ("sample_command", "complete_command", "train_command", "eval_command", "inspect_command"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, never)
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage lines
    assert re.fullmatch(rf"{module.__name__}\.py {argv[0]}: error: {message}.*", last), last


def test_a_scale_too_large_for_memory_is_refused_before_sampling(tiny_dirs, tmp_path, capsys, monkeypatch, capped):
    def never(*args, **kwargs):
        raise AssertionError("sampled before refusing --scale")

    monkeypatch.setattr(imagegpt, "generate", never)
    monkeypatch.setattr(imagegpt.ImageGPTForCausalImageModeling, "generate", never)
    # 8 images of 2 x 2 pixels, each enlarged to 20,000,000 x 20,000,000 (petabytes): refused with the figure.
    argv = ["sample", "--model", str(tiny_dirs[imagegpt]), "--scale", str(10 ** 7), "--out", str(tmp_path / "x.png"),
            "--device", "cpu"]
    assert imagegpt.main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"imagegpt\.py: error: a PNG of 8 images of 20,000,000 x 20,000,000 pixels "
                        r"\(--scale 10000000\) needs about [\d,]+\.\d GB, more than the [\d,.]+ GB limit .*use a "
                        r"smaller --scale.*\n", err), err
    assert not (tmp_path / "x.png").exists()


def test_more_samples_than_memory_holds_are_refused_before_any_batch_is_made(tiny_dirs, capsys, monkeypatch, capped):
    def never(*args, **kwargs):
        raise AssertionError("made the batch before refusing --num-samples")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", never)
    argv = ["sample", "--model", str(tiny_dirs[nanogpt2]), "--prompt", "ab", "--num-samples", str(10 ** 15),
            "--max-new-tokens", "2", "--device", "cpu"]
    assert nanogpt2.main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"nanogpt2\.py: error: generating 1,000,000,000,000,000 sequences of up to 4 tokens \(their "
                        r"key/value cache\) needs about [\d,]+\.\d GB, .*ask for fewer samples or fewer new tokens.*\n",
                        err), err


@pytest.mark.parametrize("module", [nanogpt2, imagegpt], ids=["gpt2", "imagegpt"])
def test_generate_refuses_a_batch_whose_cache_would_not_fit_before_allocating(module, tiny_dirs, monkeypatch, capped):
    def never(*args, **kwargs):
        raise AssertionError("allocated the cache before refusing the batch")

    monkeypatch.setattr(module.StaticCache, "__init__", never)
    model = module.HEAD_CLASSES[1].from_pretrained(str(tiny_dirs[module]))
    with pytest.raises(ValueError, match=r"^generating 1,000,000,000,000 sequences of up to 4 tokens \(their key/value "
                                         r"cache\) needs about [\d,]+\.\d GB, more than the [\d,.]+ GB limit"):
        if module is nanogpt2:
            model.generate(torch.ones(1, 1, dtype=torch.long).expand(10 ** 12, 1), max_new_tokens=3)
        else:
            model.generate(num_samples=10 ** 12)


def test_a_training_batch_too_large_for_memory_is_refused_before_the_first_step(tmp_path, capsys, capped):
    out = tmp_path / "run"
    assert nanogpt2.main(["train", "--batch-size", str(10 ** 9), "--max-steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"nanogpt2\.py: error: a training step of --batch-size 1000000000 x --accum 1 windows of 10 "
                        r"tokens needs about [\d,]+\.\d GB, .*use a smaller --batch-size or --accum.*\n", err), err
    assert not out.exists()  # the run folder it made is gone again


def test_imagegpt_training_sizes_too_large_for_memory_are_refused_before_the_work(tmp_path, capsys, monkeypatch,
                                                                                 capped):
    def never(*args, **kwargs):
        raise AssertionError("drew the images before refusing the model's size")

    monkeypatch.setattr(imagegpt, "prepare_task", never)
    assert imagegpt.main(["train", "--n-px", "1000", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"imagegpt\.py: error: --n-px 1000, --n-colours 16, --n-layer 4, --n-embd 64, --n-head 4: a "
                        r"model of this ImageGPTConfig \(n_layer=4, n_embd=64, n_positions=1000000, vocab_size=17\) "
                        r"needs about [\d,]+\.\d GB.*\n", err), err
    monkeypatch.undo()
    monkeypatch.setattr(imagegpt, "fit_palette", lambda images, n_colours, seed: torch.linspace(-1, 1, 3 * n_colours)
                        .view(n_colours, 3))  # no k-means: the palette does not matter here
    monkeypatch.setattr(imagegpt, "train_step", never)
    assert imagegpt.main(["train", "--batch-size", str(10 ** 9), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"imagegpt\.py: error: a training step of --batch-size 1000000000 images of 12 x 12 pixels "
                        r"needs about [\d,]+\.\d GB, .*use a smaller --batch-size.*\n", err), err


def test_eval_refuses_more_windows_at_once_than_memory_holds(tiny_dirs, tmp_path, capsys, monkeypatch, capped):
    text = tmp_path / "text.txt"
    text.write_text("ab" * 600)
    monkeypatch.setattr(nanogpt2, "memory_limit", lambda: 200_000)  # the tiny model fits; 1,193 windows do not
    monkeypatch.setattr(nanogpt2, "sliding_window_loss", lambda *args: pytest.fail("scored before refusing"))
    argv = ["eval", "--model", str(tiny_dirs[nanogpt2]), "--data", str(text), "--context", "8", "--stride", "1",
            "--batch-size", "5000"]
    assert nanogpt2.main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"nanogpt2\.py: error: scoring 1193 windows of 8 tokens at once \(their fp32 logits and "
                        r"log-probabilities\) needs about 0\.0 GB, more than the 0\.0 GB limit .*use a smaller "
                        r"--batch-size or --context.*\n", err), err


@pytest.mark.parametrize("module", [nanogpt2, imagegpt], ids=["gpt2", "imagegpt"])
def test_a_config_that_prunes_every_head_of_a_layer_is_refused_before_a_model_is_built(module):
    with pytest.raises(ValueError, match=rf"^{config_class(module).__name__}\.pruned_heads removes all 2 heads of "
                                         r"layer 0; a layer keeps at least one$"):
        config_class(module)(n_layer=1, n_head=2, n_embd=8, n_positions=4, vocab_size=5, pruned_heads={0: [1, 0, 1]})
