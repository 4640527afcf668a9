"""from_pretrained / save_pretrained ("Loading and saving") and the tokenizer (Part III) on checkpoints the tests make.

Every checkpoint here is written by the test itself: random weights of realistic size (std 0.2, so a
weight loaded into the wrong place changes the outputs far above any tolerance) and small widths, so the
module runs in seconds. The round-trip checkpoints have GPT-2's vocabulary (50257), so that the real
tokenizer applies; the checks of key layouts and of transformers interop use a toy vocabulary (256 rows,
200x cheaper). Covered: both weight formats (model.safetensors and pytorch_model.bin), sharded indexes,
dtypes and devices, the key layouts of Hugging Face checkpoints (with and without the "transformer."
prefix, old attention buffers, heads with no weights, pruned heads) and round trips through transformers.
The hub download is in test_pretrained_download.py, the safetensors reader's fuzzing in
test_pretrained_safetensors.py, the command line in test_pretrained_cli.py.
"""

import copy
import json
import os
import shutil
import warnings

import pytest
import torch

import nanogpt2

SMALL = dict(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=50257)  # the real vocabulary
TOY = dict(vocab_size=256)  # where no text is involved (key layouts, transformers interop): 200x fewer rows
HEADS = [nanogpt2.GPT2Model, nanogpt2.GPT2LMHeadModel, nanogpt2.GPT2DoubleHeadsModel,
         nanogpt2.GPT2ForSequenceClassification, nanogpt2.GPT2ForTokenClassification,
         nanogpt2.GPT2ForQuestionAnswering]
PROMPT = "Hello world, this is GPT-2!"
PROMPT_IDS = [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 0]  # OpenAI's encoder, as transformers' tokenizer gives
HF_TOL = dict(atol=1e-5, rtol=1e-5)  # fp32, same maths in another library: a few ulps of a different op order


def realistic_weights_(model, seed=0):
    """Weights of the size a trained GPT-2 has: matrices std 0.2, layer norms 1 +- 0.2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith(("ln_", "transformer.ln_")):
                p.copy_((1 if name.endswith("weight") else 0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def make_model(cls=nanogpt2.GPT2LMHeadModel, seed=0, **overrides):
    return realistic_weights_(cls(nanogpt2.GPT2Config(**{**SMALL, **overrides})), seed).eval()


def outputs(model, device):
    """Every tensor the model returns for the reference prompt (hidden states, logits, start/end logits);
    a model with a toy vocabulary reads the prompt's ids modulo its size."""
    ids = torch.tensor([PROMPT_IDS], device=device) % model.config.vocab_size
    with torch.no_grad():
        out = model.to(device)(ids)
    return [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]


def assert_outputs_equal(a, b):
    """Same weights, same code, same device: the same numbers, bit for bit."""
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def save_bin(model, directory):
    """The older format: config.json + pytorch_model.bin (a pickled state_dict)."""
    os.makedirs(directory, exist_ok=True)
    model.config.to_json_file(os.path.join(directory, "config.json"))
    torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))


def shard(directory, weights_name, n_shards=3):
    """Split a directory's single weights file into shards with an index, as large checkpoints come."""
    path = os.path.join(directory, weights_name)
    state_dict = nanogpt2.load_safetensors(path) if weights_name.endswith(".safetensors") else torch.load(path)
    os.remove(path)
    stem, ext = weights_name.rsplit(".", 1)
    names = sorted(state_dict)
    weight_map = {}
    for i in range(n_shards):
        shard_name = f"{stem}-{i + 1:05d}-of-{n_shards:05d}.{ext}"
        part = {k: state_dict[k] for k in names[i::n_shards]}
        if ext == "safetensors":
            nanogpt2.save_safetensors(part, os.path.join(directory, shard_name))
        else:
            torch.save(part, os.path.join(directory, shard_name))
        weight_map.update({k: shard_name for k in part})
    with open(os.path.join(directory, weights_name + ".index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    """(directory, source model) of one GPT2LMHeadModel saved by save_pretrained, shared by the tests that
    only read it (a test that changes the model works on a deep copy)."""
    directory = tmp_path_factory.mktemp("lm")
    source = make_model()
    source.save_pretrained(directory)
    return directory, source


@pytest.fixture
def hf():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    return transformers


def hf_model(transformers, cls_name, seed=0, **overrides):
    config = transformers.GPT2Config(**{**SMALL, **overrides}, attn_implementation="eager")
    return realistic_weights_(getattr(transformers, cls_name)(config), seed).eval()


# --- tokenizer --------------------------------------------------------------------------------------

def test_tokenizer_encodes_the_reference_sentence_to_gpt2_ids_and_decodes_it_back():
    assert nanogpt2.encode(PROMPT) == PROMPT_IDS
    assert nanogpt2.decode(PROMPT_IDS) == PROMPT
    assert nanogpt2.decode(torch.tensor(PROMPT_IDS)) == PROMPT  # a tensor of ids decodes the same


def test_endoftext_text_becomes_the_special_token_50256():
    assert nanogpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert nanogpt2.decode([50256]) == "<|endoftext|>"


def test_encode_batch_left_pads_so_every_prompt_ends_at_the_last_column():
    ids, mask = nanogpt2.encode_batch([PROMPT, "Hello", ""])
    assert ids[0].tolist() == PROMPT_IDS
    assert ids[1, -1].item() == 15496 and mask[1].tolist() == [0] * 9 + [1]
    assert ids[2, -1].item() == nanogpt2.EOT_TOKEN and mask[2].sum() == 1  # an empty prompt starts from <|endoftext|>
    assert (ids[mask == 0] == nanogpt2.EOT_TOKEN).all()


# --- our checkpoints, both formats --------------------------------------------------------------------

@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_save_pretrained_then_from_pretrained_gives_equal_outputs(tmp_path, device, cls):
    source = make_model(cls)
    source.save_pretrained(tmp_path)
    generates = ["generation_config.json"] if cls is nanogpt2.GPT2LMHeadModel else []  # only it has generate()
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", "model.safetensors", *generates])
    loaded = cls.from_pretrained(tmp_path, device=device)
    assert not loaded.training  # ready for inference: dropout off
    assert_outputs_equal(outputs(loaded, device), outputs(source, device))


def test_pytorch_model_bin_checkpoint_loads_with_equal_logits(tmp_path, device):
    source = make_model()
    save_bin(source, tmp_path)
    assert_outputs_equal(outputs(nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path, device=device), device),
                         outputs(source, device))


def test_save_load_save_reproduces_the_same_tensors_and_config(tmp_path, device):
    make_model(nanogpt2.GPT2ForSequenceClassification, num_labels=3, pad_token_id=50256).save_pretrained(tmp_path / "a")
    loaded = nanogpt2.GPT2ForSequenceClassification.from_pretrained(tmp_path / "a", device=device)
    loaded.save_pretrained(tmp_path / "b")
    a, b = (nanogpt2.load_safetensors(tmp_path / d / "model.safetensors") for d in "ab")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    config_a, config_b = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert config_a == config_b


def test_tied_head_is_saved_once_and_reloaded_tied(lm_checkpoint, device):
    directory, _ = lm_checkpoint
    assert "lm_head.weight" not in nanogpt2.load_safetensors(directory / "model.safetensors")
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(directory, device=device)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_untied_head_is_saved_and_reloaded_as_its_own_matrix(tmp_path, device):
    source = make_model(tie_word_embeddings=False)
    source.save_pretrained(tmp_path)
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path, device=device)
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight.cpu(), source.lm_head.weight)
    assert_outputs_equal(outputs(loaded, device), outputs(source, device))


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_sharded_index_loads_like_the_single_file(tmp_path, device, weights_name):
    source = make_model()
    source.save_pretrained(tmp_path) if weights_name.endswith(".safetensors") else save_bin(source, tmp_path)
    shard(tmp_path, weights_name)
    assert not (tmp_path / weights_name).exists() and (tmp_path / (weights_name + ".index.json")).exists()
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path, device=device)
    assert_outputs_equal(outputs(loaded, device), outputs(source, device))


def test_index_naming_a_missing_shard_is_a_checkpoint_error(lm_checkpoint, tmp_path, device):
    shutil.copytree(lm_checkpoint[0], tmp_path, dirs_exist_ok=True)
    shard(tmp_path, "model.safetensors")
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(nanogpt2.CheckpointError, match="model-00002-of-00003.safetensors is listed in .* but missing"):
        nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path, device=device)


def test_directory_without_weights_or_config_is_a_checkpoint_error(lm_checkpoint, tmp_path, device):
    shutil.copy(lm_checkpoint[0] / "config.json", tmp_path)  # a config, but no weights beside it
    with pytest.raises(nanogpt2.CheckpointError, match="holds no weights: expected model.safetensors"):
        nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path, device=device)
    (tmp_path / "empty").mkdir()
    with pytest.raises(nanogpt2.CheckpointError, match="has no config.json"):
        nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path / "empty", device=device)


def test_loading_to_bfloat16_gives_the_source_model_cast_to_bfloat16(lm_checkpoint, device):
    directory, source = lm_checkpoint
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(directory, dtype="bfloat16", device=device)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.parameters()} == {device.type}
    # The same bf16 weights through the same code: equal bit for bit (a tolerance would hide a wrong cast).
    assert_outputs_equal(outputs(loaded, device), outputs(copy.deepcopy(source).to(torch.bfloat16), device))


def test_loading_to_a_device_puts_every_parameter_and_buffer_there(lm_checkpoint, device):
    directory, source = lm_checkpoint
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(directory, device=device)
    assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {device.type}
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    # Against the source on the CPU: on a GPU other kernels sum in another order (fp32, 1e-4 for logits ~10).
    for x, y in zip(outputs(loaded, device), outputs(source, torch.device("cpu"))):
        torch.testing.assert_close(x.cpu(), y, atol=1e-4, rtol=1e-4)


def test_bfloat16_checkpoint_loads_in_float32_with_the_same_values(tmp_path, device):
    source = make_model().to(torch.bfloat16)
    source.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {v.dtype for v in nanogpt2.load_safetensors(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path, device=device)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for (name, p), q in zip(loaded.named_parameters(), source.parameters()):
        assert torch.equal(p.cpu(), q.float()), name  # bf16 -> fp32 is exact


def test_unknown_dtype_name_is_a_value_error_listing_the_choices(tmp_path):
    with pytest.raises(ValueError, match="'float8' is not one of .*bfloat16"):
        nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path, dtype="float8")


# --- key layouts ---------------------------------------------------------------------------------------

def test_missing_unexpected_and_mismatched_keys_are_listed_in_one_checkpoint_error(tmp_path, device):
    model = make_model(**TOY)
    state_dict = dict(model.state_dict())
    del state_dict["transformer.h.0.ln_1.weight"]
    state_dict["transformer.h.7.mlp.c_fc.weight"] = torch.zeros(32, 128)
    state_dict["transformer.wpe.weight"] = torch.zeros(64, 32)
    model.config.to_json_file(tmp_path / "config.json")
    nanogpt2.save_safetensors(state_dict, tmp_path / "model.safetensors")
    with pytest.raises(nanogpt2.CheckpointError) as error:
        nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path, device=device)
    message = str(error.value)
    assert "\n" not in message and "GPT2LMHeadModel" in message
    assert "missing keys: ['transformer.h.0.ln_1.weight']" in message
    assert "unexpected keys: ['transformer.h.7.mlp.c_fc.weight']" in message
    assert "transformer.wpe.weight: checkpoint (64, 32), model (128, 32)" in message


def test_checkpoint_with_a_wrong_head_shape_is_a_checkpoint_error(tmp_path, device):
    make_model(nanogpt2.GPT2ForSequenceClassification, num_labels=3, **TOY).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("id2label"), config.pop("label2id")
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_labels": 5}))
    with pytest.raises(nanogpt2.CheckpointError, match=r"score.weight: checkpoint \(3, 32\), model \(5, 32\)"):
        nanogpt2.GPT2ForSequenceClassification.from_pretrained(tmp_path, device=device)


@pytest.mark.parametrize("cls", HEADS[2:], ids=lambda c: c.__name__)
def test_head_without_weights_in_the_checkpoint_starts_fresh_while_the_body_loads(lm_checkpoint, device, cls):
    directory, source = lm_checkpoint
    loaded = cls.from_pretrained(directory, device=device)
    body = outputs(source.transformer, device)[0]
    assert_outputs_equal(outputs(loaded.transformer, device)[:1], [body])
    fresh = {k: v for k, v in loaded.state_dict().items() if not k.startswith(("transformer.", "lm_head."))}
    assert fresh, "the head has weights of its own"
    for name, p in fresh.items():  # initialised as GPT-2 initialises (std 0.02, zero bias), not left empty
        assert torch.isfinite(p).all(), name
        if name.endswith("weight"):
            assert 0.01 < p.float().std() < 0.03, name


@pytest.mark.parametrize("cls, weights_name", [
    (nanogpt2.GPT2LMHeadModel, "pytorch_model.bin"), (nanogpt2.GPT2LMHeadModel, "model.safetensors"),
    (nanogpt2.GPT2Model, "pytorch_model.bin"), (nanogpt2.GPT2ForQuestionAnswering, "pytorch_model.bin")],
    ids=lambda x: getattr(x, "__name__", x))
def test_released_layout_without_prefix_and_with_old_attention_buffers_loads(tmp_path, device, cls, weights_name):
    """openai-community/gpt2 is a GPT2LMHeadModel saved as the body alone: keys without "transformer.", plus
    the causal-mask buffers h.N.attn.bias and h.N.attn.masked_bias that old transformers saved."""
    source = make_model(**TOY)
    state_dict = dict(source.transformer.state_dict())
    n = SMALL["n_positions"]
    for i in range(SMALL["n_layer"]):
        state_dict[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state_dict[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    source.config.to_json_file(tmp_path / "config.json")
    if weights_name == "model.safetensors":
        nanogpt2.save_safetensors(state_dict, tmp_path / weights_name)
    else:
        torch.save(state_dict, tmp_path / weights_name)
    loaded = cls.from_pretrained(tmp_path, device=device)
    if cls is nanogpt2.GPT2LMHeadModel:
        assert_outputs_equal(outputs(loaded, device), outputs(source, device))
    body = loaded if cls is nanogpt2.GPT2Model else loaded.transformer
    assert_outputs_equal(outputs(body, device), outputs(source.transformer, device))


def test_body_loads_from_a_head_checkpoint(tmp_path, device):
    source = make_model(nanogpt2.GPT2DoubleHeadsModel, **TOY)
    source.save_pretrained(tmp_path)
    loaded = nanogpt2.GPT2Model.from_pretrained(tmp_path, device=device)
    assert_outputs_equal(outputs(loaded, device), outputs(source.transformer, device))


def test_pruned_model_saved_and_reloaded_keeps_its_heads_shapes_and_outputs(tmp_path, device):
    source = make_model(n_head=4, **TOY)
    source.prune_heads({0: [1, 3], 1: [0]})
    source.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["pruned_heads"] == {"0": [1, 3], "1": [0]}
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path, device=device)
    assert loaded.config.pruned_heads == {0: [1, 3], 1: [0]}
    assert loaded.transformer.h[0].attn.c_attn.weight.shape == (32, 3 * 16)  # 2 of 4 heads of size 8 left
    assert_outputs_equal(outputs(loaded, device), outputs(source, device))


# --- Hugging Face transformers reads ours, we read theirs ------------------------------------------

@pytest.mark.parametrize("cls_name", ["GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2Model"])
def test_our_checkpoint_loads_in_transformers_with_equal_outputs(tmp_path, device, hf, cls_name):
    ours = make_model(getattr(nanogpt2, cls_name), num_labels=3, **TOY)
    ours.save_pretrained(tmp_path)
    theirs, info = getattr(hf, cls_name).from_pretrained(tmp_path, attn_implementation="eager",
                                                         output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    for x, y in zip(outputs(theirs.eval(), device), outputs(ours, device)):
        torch.testing.assert_close(x, y, **HF_TOL)


@pytest.mark.parametrize("layout", ["safetensors", "pytorch_model.bin", "sharded_100KB"])
def test_transformers_checkpoint_loads_in_nanogpt2_with_equal_logits(tmp_path, device, hf, layout):
    theirs = hf_model(hf, "GPT2LMHeadModel", **TOY)
    if layout == "sharded_100KB":
        theirs.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    else:
        theirs.save_pretrained(tmp_path, safe_serialization=layout == "safetensors")
    assert (tmp_path / "pytorch_model.bin").exists() == (layout == "pytorch_model.bin")
    ours = nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path, device=device)
    for x, y in zip(outputs(ours, device), outputs(theirs, device)):
        torch.testing.assert_close(x, y, **HF_TOL)


def test_transformers_classifier_loads_from_an_lm_checkpoint_like_ours(tmp_path, device, hf):
    """Both libraries load the body of an LM checkpoint under a fresh classifier: the bodies agree."""
    hf_model(hf, "GPT2LMHeadModel", **TOY).save_pretrained(tmp_path)
    theirs = hf.GPT2ForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = nanogpt2.GPT2ForSequenceClassification.from_pretrained(tmp_path, device=device)
    assert ours.score.weight.shape == theirs.score.weight.shape == (2, 32)
    torch.testing.assert_close(outputs(ours.transformer, device)[0], outputs(theirs.transformer, device)[0], **HF_TOL)


def test_pruned_checkpoints_cross_between_the_libraries(tmp_path, device, hf):
    theirs = hf_model(hf, "GPT2LMHeadModel", n_head=4, **TOY)
    theirs.prune_heads({0: [0, 2], 1: [3]})
    theirs.save_pretrained(tmp_path / "theirs")
    ours = nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path / "theirs", device=device)
    assert ours.config.pruned_heads == {0: [0, 2], 1: [3]}
    for x, y in zip(outputs(ours, device), outputs(theirs, device)):
        torch.testing.assert_close(x, y, **HF_TOL)
    ours.save_pretrained(tmp_path / "ours")
    back = hf.GPT2LMHeadModel.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    for x, y in zip(outputs(back, device), outputs(ours, device)):
        torch.testing.assert_close(x, y, **HF_TOL)


# --- a pytorch_model.bin that is not a plain dict of tensors -----------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def _bad_bins(tmp_path):
    good = tmp_path / "good.bin"
    torch.save(make_model(n_layer=1, **TOY).state_dict(), good)
    return {
        "runs_code": lambda p: torch.save({"x": _RunsCode(str(tmp_path / "ran"))}, p),
        "truncated": lambda p: p.write_bytes(good.read_bytes()[: good.stat().st_size // 2]),
        "empty": lambda p: p.write_bytes(b""),
        "a_list": lambda p: torch.save([torch.zeros(1)], p),
    }


def test_pytorch_model_bin_never_runs_code_when_loaded(tmp_path, device):
    make_model(n_layer=1, **TOY).config.to_json_file(tmp_path / "config.json")
    _bad_bins(tmp_path)["runs_code"](tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception):
        nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path, device=device)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("kind", ["runs_code", "truncated", "empty", "a_list"])
def test_unreadable_pytorch_model_bin_is_a_checkpoint_error(tmp_path, device, kind):
    make_model(n_layer=1, **TOY).config.to_json_file(tmp_path / "config.json")
    _bad_bins(tmp_path)[kind](tmp_path / "pytorch_model.bin")
    with pytest.raises(nanogpt2.CheckpointError, match="pytorch_model.bin"):
        nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path, device=device)
