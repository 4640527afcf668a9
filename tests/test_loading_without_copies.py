"""Loading without copies (both model files, Part III): safetensors memory-mapped copy-on-write, the
mapped tensors made the parameters (load_state_dict(assign=True)), no throw-away random init, and the
edge cases that come with it: tied heads, fresh heads, bf16 files, .bin files, training after loading."""

import hashlib
import json

import pytest
import torch

import imagegpt
import nanogpt2

MODULES = {
    "nanogpt2": (nanogpt2, nanogpt2.GPT2LMHeadModel,
                 lambda: nanogpt2.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32)),
    "imagegpt": (imagegpt, imagegpt.ImageGPTForCausalImageModeling,
                 lambda: imagegpt.ImageGPTConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=17, n_positions=16)),
}


@pytest.fixture(params=sorted(MODULES))
def saved(request, tmp_path):
    """(module, class, directory, source model, input ids) of a tiny model saved by save_pretrained."""
    module, cls, make_config = MODULES[request.param]
    torch.manual_seed(0)
    source = cls(make_config()).eval()
    source.save_pretrained(tmp_path)
    ids = torch.randint(0, source.config.vocab_size - 1, (2, 8))
    return module, cls, tmp_path, source, ids


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_safetensors_returns_views_of_the_file_not_copies(saved):
    module, _, directory, _, _ = saved
    tensors = module.load_safetensors(directory / "model.safetensors")
    # torch.frombuffer's storage borrows the mapping's memory and cannot be resized; a copy's storage can.
    assert all(not t.untyped_storage().resizable() for t in tensors.values())


def test_loaded_parameters_are_the_mapped_tensors(saved):
    _, cls, directory, _, _ = saved
    model = cls.from_pretrained(directory)
    assert all(not p.untyped_storage().resizable() for p in model.parameters())


def test_loaded_model_equals_the_saved_one(saved):
    _, cls, directory, source, ids = saved
    assert torch.equal(cls.from_pretrained(directory)(ids).logits, source(ids).logits)  # same bytes: exact


def test_training_after_loading_never_writes_to_the_file(saved):
    _, cls, directory, source, ids = saved
    before = sha256(directory / "model.safetensors")
    model = cls.from_pretrained(directory).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(ids, labels=ids).loss.backward()
    optimizer.step()  # writes every parameter in place: copy-on-write gives them private pages
    assert not torch.equal(model.eval()(ids).logits, source(ids).logits)
    assert sha256(directory / "model.safetensors") == before
    assert torch.equal(cls.from_pretrained(directory)(ids).logits, source(ids).logits)


def test_gpt2_head_is_tied_to_the_embeddings_after_loading(tmp_path):
    module, cls, make_config = MODULES["nanogpt2"]
    cls(make_config()).save_pretrained(tmp_path)
    model = cls.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = 123.0
    assert model.lm_head.weight[0, 0] == 123.0


def test_a_head_the_checkpoint_lacks_gets_the_models_initialisation(saved):
    module, _, directory, _, _ = saved
    cls = module.GPT2ForSequenceClassification if module is nanogpt2 else module.ImageGPTForImageClassification
    torch.manual_seed(1)
    head = cls.from_pretrained(directory).score.weight  # (num_labels, C), N(0, 0.02) as built fresh
    assert torch.isfinite(head).all() and 0.005 < head.std().item() < 0.05  # not left empty (garbage or zeros)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_files_load_in_fp32_by_default_and_in_their_own_dtype_on_request(saved, tmp_path, dtype):
    module, cls, directory, source, ids = saved
    half = cls.from_pretrained(directory, dtype=dtype)
    assert all(p.dtype == dtype for p in half.parameters())
    half.save_pretrained(tmp_path / "half")
    full = cls.from_pretrained(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in full.parameters())
    expected = {k: v.float() for k, v in half.state_dict().items() if v.is_floating_point()}
    for key, value in full.state_dict().items():
        if key in expected:
            assert torch.equal(value, expected[key]), key  # half -> fp32 is exact


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_bin_files_load_memory_mapped_or_whole(saved, zip_format):
    module, cls, directory, source, ids = saved
    (directory / "model.safetensors").unlink()
    torch.save(source.state_dict(), directory / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    model = cls.from_pretrained(directory)
    assert torch.equal(model(ids).logits, source(ids).logits)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(ids, labels=ids).loss.backward()
    optimizer.step()  # a mapped .bin is copy-on-write too


def test_tensors_sharing_memory_in_a_bin_are_loaded_apart(tmp_path):
    """A .bin saved from a tied model holds lm_head.weight and wte.weight as one storage; loaded into an
    untied model, training the head must not move the embeddings."""
    _, cls, make_config = MODULES["nanogpt2"]
    source = cls(make_config())
    config = source.config.to_dict()
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")  # lm_head.weight is wte.weight
    model = cls.from_pretrained(tmp_path)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert torch.equal(model.transformer.wte.weight, source.transformer.wte.weight)


def test_unaligned_tensors_are_read_correctly(tmp_path):
    """safetensors does not require the data to be aligned; a float32 tensor at an odd offset is read
    into fresh memory rather than viewed (a misaligned view would be undefined behaviour)."""
    values = torch.arange(6, dtype=torch.float32)
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1, 25]}}
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 4)  # the data starts 4-aligned, so "b" at byte 1 is not
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + b"\x07" + values.numpy().tobytes())
    for module in (nanogpt2, imagegpt):
        tensors = module.load_safetensors(path)
        assert tensors["a"].tolist() == [7]
        assert torch.equal(tensors["b"], values.view(2, 3))
        assert tensors["b"].data_ptr() % 4 == 0  # x86 reads a misaligned float anyway; other CPUs may not
