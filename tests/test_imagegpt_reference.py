"""imagegpt.py against Hugging Face transformers 4.46.3, number by number.

Each test builds a transformers ImageGPT model, gives it weights of realistic size (the default init, std
0.02, is so gentle that a wrong activation or layer norm hides below 1e-5), loads its state_dict into ours
with strict=True, and compares every output: hidden states, logits, attentions, the cache, losses, and
greedy generation token for token. Skipped only where transformers is not installed; .ci/run installs it.

The reference is transformers' eager ImageGPT attention (the only one it has). One known bug in 4.46.3 is
kept out of the comparisons and pinned by its own test: its eager core divides the scores by
int(sqrt(head size)) instead of sqrt(head size) (`torch_float` returns int(x); huggingface/transformers
PR #47376). The released models use head sizes 64 (imagegpt-small: sqrt is 8, exact), 128 (medium) and
96 (large), so 4.46.3 computes medium and large with the wrong scale; imagegpt.py keeps the correct one,
which OpenAI trained with. The models here use head size 16, where the two agree.
"""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import imagegpt
from helpers import first_difference

transformers = pytest.importorskip("transformers")
if not transformers.__version__.startswith("4.46."):  # the pinned reference (requirements.txt)
    pytest.skip(f"the reference is transformers 4.46.3; {transformers.__version__} is installed (5.x changed the "
                "cache format and head_mask these tests use)", allow_module_level=True)
warnings.filterwarnings("ignore", category=FutureWarning)
# The reference's upcast path calls torch.cuda.amp.autocast, which torch 2.13 reports as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
transformers.logging.set_verbosity_error()

# fp32, relative to each output's scale: |ours - reference| <= 1e-5 * max(1, max |reference|). Our explicit
# core does the reference's operations in its order and matches bit for bit; PyTorch's fused SDPA kernel sums
# in another order and differs by ~1e-6 of the scale. Elementwise relative tolerance would be meaningless for
# the entries near zero of a residual stream whose largest entries are ~50 (realistic weights, 3 layers).
RTOL = 1e-5
SMALL = dict(n_layer=3, n_head=4, n_embd=64, vocab_size=17, n_positions=36, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0)  # head size 16: sqrt is exact (see the module docstring); 16 colours + SOS; 6 x 6
OPTIONS = {
    "default": {},
    "inverse_layer_scale_and_upcast": dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    "unscaled_relu": dict(scale_attn_weights=False, activation_function="relu"),
    "exact_gelu_wide_mlp": dict(activation_function="gelu", n_inner=96),
}
HEADS = ["ImageGPTModel", "ImageGPTForCausalImageModeling", "ImageGPTForImageClassification"]



def realistic_weights_(model, seed=0):
    """Weights of the size a trained model has: matrices std 0.3 (sharp attention), layer norms 1 +- 0.3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "ln_cross_attn.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def make_pair(head, device, **options):
    """A transformers model with realistic weights and our model holding the same state_dict, on device."""
    hf = realistic_weights_(getattr(transformers, head)(transformers.ImageGPTConfig(**{**SMALL, **options}))).eval()
    ours = getattr(imagegpt, head)(imagegpt.ImageGPTConfig(**{**SMALL, **options})).eval()
    result = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return hf.to(device), ours.to(device)


def on(device, tensors: dict):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def assert_close(actual, expected, tol=RTOL, name="output"):
    assert actual.shape == expected.shape, \
        f"{name}: shapes differ: got {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, \
        f"{name} differs from the reference: max difference {err:.3g} > {tol:g} x scale {scale:.3g}" + \
        first_difference(actual, expected, tol * scale)


def assert_outputs_match(hf_out, our_out, real=None):
    """Every field of the reference output equals ours. `real` (B, T) bool selects the positions that are
    real pixels: outputs at padding positions are arbitrary in both (nothing reads them)."""
    compared = 0
    for name, expected in hf_out.items():
        actual = getattr(our_out, name)
        if name == "past_key_values":
            for (hk, hv), (ok, ov) in zip(expected, actual):
                for h, o in ((hk, ok), (hv, ov)):  # (B, nh, T, hs): padding positions on dim 2
                    mask = real[:, None, :, None].expand_as(h) if real is not None else slice(None)
                    assert_close(o[mask], h[mask], name=f"output {name}")
        elif isinstance(expected, tuple):
            assert len(expected) == len(actual), name
            for e, a in zip(expected, actual):
                if real is not None and name == "hidden_states":
                    e, a = e[real], a[real]
                elif real is not None:  # attentions (B, nh, T, K): real query rows only
                    e, a = e.transpose(1, 2)[real], a.transpose(1, 2)[real]
                assert_close(a, e, name=f"output {name}")
        elif real is not None and expected.dim() >= 2 and expected.shape[:2] == real.shape:
            assert_close(actual[real], expected[real], name=f"output {name}")
        else:
            assert_close(actual, expected, name=f"output {name}")
        compared += 1
    assert compared >= 2


def image_ids(batch=3, T=SMALL["n_positions"], seed=1):
    """SOS followed by T - 1 random colours, per row."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, SMALL["vocab_size"] - 1, (batch, T - 1), generator=g)
    return torch.cat([torch.full((batch, 1), SMALL["vocab_size"] - 1), colours], dim=1)


def labels_for(head, ids, seed=2):
    if head == "ImageGPTForCausalImageModeling":
        labels = ids.clone()
        labels[0, :5] = -100  # ignored positions
        return dict(labels=labels)
    if head == "ImageGPTForImageClassification":
        return dict(labels=torch.randint(0, 2, (ids.shape[0],), generator=torch.Generator().manual_seed(seed)))
    return {}


# --- every head, every option ------------------------------------------------------------------------


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("head", HEADS)
def test_every_head_matches_reference_with_realistic_weights(head, option, device):
    hf, ours = make_pair(head, device, **OPTIONS[option])
    ids = image_ids()
    inputs = on(device, {"input_ids": ids, **labels_for(head, ids)})
    for output_attentions in (False, True):  # our fused core, then our explicit one; the reference's eager core
        with torch.no_grad():
            expected = hf(**inputs, output_hidden_states=True, output_attentions=output_attentions)
            actual = ours(**inputs, output_hidden_states=True, output_attentions=output_attentions)
        assert_outputs_match(expected, actual)


@pytest.mark.parametrize("option", ["default", "inverse_layer_scale_and_upcast"])
def test_padding_and_head_mask_match_reference(option, device):
    hf, ours = make_pair("ImageGPTForCausalImageModeling", device, **OPTIONS[option])
    ids = image_ids(T=12, seed=3)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    head_mask = torch.ones(SMALL["n_layer"], SMALL["n_head"])
    head_mask[0, 1] = head_mask[2, 3] = 0
    ids, mask, position_ids, head_mask = (t.to(device) for t in (ids, mask, position_ids, head_mask))
    for kwargs in (dict(), dict(head_mask=head_mask), dict(output_attentions=True)):
        with torch.no_grad():
            expected = hf(ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True, **kwargs)
            actual = ours(ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True, **kwargs)
        assert_outputs_match(expected, actual, real=mask.bool())


@pytest.mark.parametrize("option", ["default", "inverse_layer_scale_and_upcast"])
def test_cross_attention_matches_reference(option, device):
    hf, ours = make_pair("ImageGPTForCausalImageModeling", device, add_cross_attention=True, **OPTIONS[option])
    g = torch.Generator().manual_seed(4)
    ids = image_ids(batch=2, T=9, seed=4)
    encoder_states = torch.randn(2, 5, SMALL["n_embd"], generator=g)
    encoder_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids, encoder_states, encoder_mask = ids.to(device), encoder_states.to(device), encoder_mask.to(device)
    for output_attentions in (False, True):
        kwargs = dict(encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask,
                      output_attentions=output_attentions, output_hidden_states=True, labels=ids)
        with torch.no_grad():
            assert_outputs_match(hf(ids, **kwargs), ours(ids, **kwargs))


def test_incremental_decoding_with_cache_matches_reference(device):
    hf, ours = make_pair("ImageGPTForCausalImageModeling", device)
    ids = image_ids(batch=2, T=14, seed=5).to(device)
    with torch.no_grad():
        hf_out, our_out = hf(ids[:, :7], use_cache=True), ours(ids[:, :7], use_cache=True)
        assert_outputs_match(hf_out, our_out)
        for t in range(7, 14):  # one pixel at a time, each side feeding its own cache back
            hf_out = hf(ids[:, t:t + 1], past_key_values=hf_out.past_key_values, use_cache=True)
            our_out = ours(ids[:, t:t + 1], past_key_values=our_out.past_key_values, use_cache=True)
            assert_outputs_match(hf_out, our_out)


def test_pruned_model_matches_reference(device):
    hf, ours = make_pair("ImageGPTForCausalImageModeling", device)
    heads = {0: [1, 3], 2: [0]}
    hf.prune_heads(heads)
    ours.prune_heads(heads)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    ids = image_ids(batch=2, T=8, seed=6).to(device)
    with torch.no_grad():
        assert_outputs_match(hf(ids, output_attentions=True), ours(ids, output_attentions=True))


@pytest.mark.parametrize("problem_type, labels", [
    ("regression", torch.tensor([[0.5, -1.0], [2.0, 0.0], [0.1, 0.2]])),
    ("single_label_classification", torch.tensor([1, 0, 1])),
    ("multi_label_classification", torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])),
])
def test_classification_losses_match_reference(problem_type, labels, device):
    hf, ours = make_pair("ImageGPTForImageClassification", device, problem_type=problem_type)
    inputs = on(device, dict(input_ids=image_ids(), labels=labels))
    with torch.no_grad():
        assert_outputs_match(hf(**inputs), ours(**inputs))


def test_one_label_regression_loss_matches_reference(device):
    hf, ours = make_pair("ImageGPTForImageClassification", device, num_labels=1)
    inputs = on(device, dict(input_ids=image_ids(), labels=torch.tensor([0.3, -1.2, 2.0])))
    with torch.no_grad():
        assert_outputs_match(hf(**inputs), ours(**inputs))


@pytest.mark.parametrize("prompt_pixels", [0, 17])
def test_greedy_generation_equals_reference_token_for_token(prompt_pixels, device):
    """From SOS alone (a whole image) and from the top rows of an image (a completion)."""
    hf, ours = make_pair("ImageGPTForCausalImageModeling", device)
    prompt = image_ids(batch=2, T=1 + prompt_pixels, seed=7).to(device)
    new = SMALL["n_positions"] + 1 - prompt.size(1)  # up to SOS + one token per pixel
    with torch.no_grad():  # an explicit mask: else transformers masks every pixel equal to pad_token_id
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                               pad_token_id=0)
    actual = ours.generate(prompt, max_new_tokens=new)
    assert actual.shape == (2, SMALL["n_positions"] + 1)
    assert torch.equal(actual, expected)


# --- the reference's int(sqrt(head size)) --------------------------------------------------------------


def test_reference_4_46_3_scales_scores_by_int_sqrt_of_head_size(device, monkeypatch):
    """With head size 8 (sqrt 2.83), transformers 4.46.3's eager core equals ours only if ours divides by
    int(2.83) = 2: that is the whole difference. Its upcast core uses the float sqrt, and equals ours as is."""
    options = dict(n_embd=32, n_head=4)  # head size 8
    hf, ours = make_pair("ImageGPTForCausalImageModeling", device, **options)
    ids = image_ids(batch=2, T=12, seed=8).to(device)
    with torch.no_grad():
        expected = hf(ids).logits
        assert (ours(ids).logits - expected).abs().max() > 1e-2  # the correct scale really differs
        monkeypatch.setattr(imagegpt.ImageGPTAttention, "score_scale", lambda self: 1.0 / int(self.head_dim ** 0.5))
        assert_close(ours(ids).logits, expected)
        monkeypatch.undo()
    hf, ours = make_pair("ImageGPTForCausalImageModeling", device, reorder_and_upcast_attn=True, **options)
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(ids).logits)


# --- pixels, config, files ---------------------------------------------------------------------------


def reference_pixel_functions():
    """transformers' squared_euclidean_distance and color_quantize, run from its own source. Its module imports
    Pillow, which is not installed here, so the two numpy functions are lifted out of the file and compiled
    alone rather than imported."""
    import ast
    import importlib.util
    import os

    spec = importlib.util.find_spec("transformers")
    path = os.path.join(os.path.dirname(spec.origin), "models", "imagegpt", "image_processing_imagegpt.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef)
              and node.name in ("squared_euclidean_distance", "color_quantize")]
    namespace = {"np": np}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), path, "exec"), namespace)
    return namespace["color_quantize"]


def test_quantise_equals_reference_colour_quantize():
    """The reference processor's normalise (x * (1 / 127.5) in float64, to float32, - 1) and color_quantize
    (argmin of squared distances) give our tokens."""
    color_quantize = reference_pixel_functions()
    g = torch.Generator().manual_seed(9)
    palette = (torch.rand(512, 3, generator=g) * 2 - 1).double()
    images = torch.randint(0, 256, (3, 16, 16, 3), generator=g, dtype=torch.uint8)
    normalised = (images.numpy().astype(np.float64) * (1 / 127.5)).astype(np.float32) - 1
    expected = color_quantize(normalised, palette.numpy()).reshape(3, 256)
    assert np.array_equal(imagegpt.quantise(images, palette).numpy(), expected)


def test_quantise_with_resizing_equals_reference_image_processor():
    pytest.importorskip("PIL", reason="the reference processor resizes with Pillow, which is not installed")
    from transformers import ImageGPTImageProcessor

    g = torch.Generator().manual_seed(9)
    palette = (torch.rand(512, 3, generator=g) * 2 - 1).double()
    images = torch.randint(0, 256, (2, 40, 30, 3), generator=g, dtype=torch.uint8)
    processor = ImageGPTImageProcessor(clusters=palette.numpy(), size={"height": 8, "width": 8})
    expected = processor([image.numpy() for image in images], return_tensors="pt")["input_ids"]
    # Pillow resizes in fixed point: a pixel a level apart can land on another colour. Allow 2% of pixels.
    assert (imagegpt.quantise(images, palette, n_px=8) != expected).float().mean() <= 0.02


def test_saved_palette_is_what_the_reference_processor_reads(tmp_path):
    from transformers.image_processing_utils import ImageProcessingMixin

    palette = torch.rand(16, 3, generator=torch.Generator().manual_seed(10)) * 2 - 1
    imagegpt.save_palette(palette, tmp_path, n_px=6)
    # The dictionary ImageGPTImageProcessor.from_pretrained builds itself from (the class needs Pillow).
    processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(str(tmp_path))
    assert np.array_equal(np.array(processor_dict["clusters"]), palette.double().numpy())
    assert processor_dict["image_processor_type"] == "ImageGPTImageProcessor"
    assert processor_dict["size"] == {"height": 6, "width": 6}


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_checkpoints_load_both_ways(tmp_path, safe, device):
    hf, ours = make_pair("ImageGPTForCausalImageModeling", device)
    ids = image_ids(batch=2, T=10).to(device)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=safe)
    from_hf = imagegpt.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf", device=device)
    ours.save_pretrained(tmp_path / "ours")
    from_ours = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "ours").to(device).eval()
    # A classifier built on the causal checkpoint: body loaded, its new score layer freshly initialised.
    classifier = imagegpt.ImageGPTForImageClassification.from_pretrained(tmp_path / "hf", device=device)
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True)
        assert_close(from_hf(ids).logits, expected.logits)
        assert_close(from_ours(ids).logits, expected.logits)
        assert_close(classifier.transformer(ids).last_hidden_state, expected.hidden_states[-1])


def test_defaults_equal_reference_defaults():
    hf, ours = transformers.ImageGPTConfig(), imagegpt.ImageGPTConfig()
    for f in dataclasses.fields(ours):
        if f.name == "extra":
            continue
        assert getattr(ours, f.name) == getattr(hf, f.name), f.name


def test_config_json_round_trips_through_transformers(tmp_path):
    ours = imagegpt.ImageGPTConfig.from_preset("large", num_labels=3, scale_attn_by_inverse_layer_idx=True)
    ours.to_json_file(tmp_path / "config.json")
    hf = transformers.ImageGPTConfig.from_json_file(tmp_path / "config.json")
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "activation_function",
                 "layer_norm_epsilon", "num_labels", "scale_attn_by_inverse_layer_idx", "tie_word_embeddings"):
        assert getattr(hf, name) == getattr(ours, name), name
    hf.to_json_file(tmp_path / "hf.json")
    back = imagegpt.ImageGPTConfig.from_json_file(tmp_path / "hf.json")
    assert back.num_labels == 3 and back.n_embd == 1536 and "transformers_version" in back.extra


@pytest.mark.parametrize("name", ["quick_gelu", "gelu_new", "gelu", "relu"])
def test_activations_equal_reference(name):
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(imagegpt.ACTIVATIONS[name](x), ACT2FN[name](x), atol=1e-6, rtol=1e-6)
