"""Property tests of imagegpt.py: the invariants any correct ImageGPT keeps, checked on many small random models.

The GPT-2 properties again (ImageGPT's attention and block are GPT-2's), plus what ImageGPT changes:

    causal masking      future pixels never change past outputs, for both cores, with a cache and padding
    cache               one forward equals a prefill plus cached steps (fp16/bf16 too, on CUDA)
    padding             padded positions never change the outputs at real positions
    attention cores     the explicit core, the fp32 upcast core and PyTorch's SDPA kernel agree
    head mask, pruning  a masked head has zero weights; pruning heads equals masking them; saved and loaded
    layer norm          ImageGPTLayerNorm is x / rms(x) * weight: no mean subtraction, no bias
    heads               the causal head scores the colours only (never SOS) with a shifted loss; the
                        classifier averages over positions; its three losses are the textbook ones
    generation          shapes, SOS first, deterministic under a seed, greedy = argmax of full forwards
    errors              bad inputs give clear errors before any work

Each test draws a tiny config (1-3 layers, width 8-32, 8-40 colours, 16 or 36 positions) and re-draws the
weights much larger than the gentle init (see `sharpen`), so a wrong mask or cache position moves the
outputs by far more than the tolerance. Only real (non-padding) positions are compared.
"""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from imagegpt import (
    Conv1D,
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTLayerNorm,
    ImageGPTModel,
    StaticCache,
    generate,
)
from helpers import examples, first_difference

# fp32 keeps ~7 significant digits; a few layers of reordered sums lose about one more. A real bug here moves
# outputs by 1e-1 of their scale or more.
FP32_TOL = 1e-5
# The causal, cache, padding and attention-core tests compare two orders of the same maths in float64.
# Under these sharpened weights, unscaled attention gives scores up to ~50 (|q| |k| up to ~110), so fp32
# rounding of a score (~6e-8 x 110 ~ 7e-6) moves its softmax weight by as much, relative; times |v| ~ 7 and
# every matmul after it, two orders differed by up to 3e-5 of the outputs' scale in fp32 (1.9e-4, 1.1e-4 and
# 6.8e-5 seen). In float64 (eps 1.1e-16) the same chain gave at most 1.3e-14 of the scale over ~5,000
# comparisons; a wrong cache position, causal slice or scale moves the outputs by 1e-1 of their scale or
# more (1.8 to 7 seen).
FP64_TOL = 1e-9


# --- helpers -----------------------------------------------------------------------------------------


@st.composite
def configs(draw, **fixed):
    """A tiny ImageGPTConfig with every attention option drawn, dropout off (equality tests need determinism)."""
    kwargs = dict(
        vocab_size=draw(st.integers(8, 40)) + 1,  # colours + SOS
        n_positions=draw(st.sampled_from([16, 36])),  # 4 x 4 or 6 x 6 images
        n_embd=draw(st.sampled_from([8, 16, 32])),
        n_layer=draw(st.integers(1, 3)),
        n_head=draw(st.sampled_from([1, 2, 4])),
        activation_function=draw(st.sampled_from(["quick_gelu", "gelu_new", "relu"])),
        scale_attn_weights=draw(st.booleans()),
        scale_attn_by_inverse_layer_idx=draw(st.booleans()),
        reorder_and_upcast_attn=draw(st.booleans()),
        add_cross_attention=draw(st.booleans()),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    kwargs.update(fixed)
    return ImageGPTConfig(**kwargs)


seeds = st.integers(0, 2**31 - 1)


def sharpen(model, seed):
    """Re-draw every weight much larger than the N(0, 0.02) init, under which every attention row is nearly
    uniform and attending to a wrong key would move the outputs by less than the tolerance. Matrices get
    std 2/sqrt(fan_in), embeddings std 1, biases and layer norms visible offsets. Draws happen on the CPU,
    so a seed gives the same weights on every device."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g))
            elif isinstance(module, (Conv1D, nn.Linear)):
                fan_in = module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]
                module.weight.copy_(2.0 / math.sqrt(fan_in) * torch.randn(module.weight.shape, generator=g))
                if module.bias is not None:
                    module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))
            elif isinstance(module, ImageGPTLayerNorm):
                module.weight.copy_(1.0 + 0.2 * torch.randn(module.weight.shape, generator=g))
    return model


def build(model_class, config, device, seed, dtype=torch.float32):
    return sharpen(model_class(config), seed).to(device=device, dtype=dtype).eval()


def random_ids(g, vocab_size, shape):
    return torch.randint(0, vocab_size, tuple(shape), generator=g)


def random_padding_mask(g, shape):
    """0/1 mask (B, T) with padding anywhere (left, right, middle) but at least one real token per row."""
    mask = (torch.rand(tuple(shape), generator=g) < 0.7).long()
    rows = mask.view(-1, shape[-1])
    rows[torch.arange(rows.size(0)), torch.randint(0, shape[-1], (rows.size(0),), generator=g)] = 1
    return mask


def positions_from_mask(mask):
    """Each real token's position counts only the real tokens before it (padding positions: 0, unused)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def encoder_inputs(g, config, batch):
    """Random encoder states (B, S, C) and an encoder padding mask (B, S) with a real token in every row."""
    S = int(torch.randint(1, 6, (1,), generator=g))
    return torch.randn(batch, S, config.n_embd, generator=g), random_padding_mask(g, (batch, S))


def to(device, **tensors):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}


def assert_close(actual, expected, tol, why):
    """max |actual - expected| <= tol * max(1, max |expected|): a tolerance relative to the outputs' scale."""
    assert actual.shape == expected.shape, \
        f"{why}: shapes differ: got {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()  # exact for every dtype
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, \
        f"{why}: max difference {err:.3g} > {tol:g} x scale {scale:.3g}" + \
        first_difference(actual, expected, tol * scale)


# --- causal masking ----------------------------------------------------------------------------------


@examples(20)
@given(data=st.data())
def test_future_pixels_never_change_past_outputs(device, data):
    model_class = data.draw(st.sampled_from([ImageGPTModel, ImageGPTForCausalImageModeling]), label="head")
    # In float64, without the upcast core (fp32 by design), as the cache test: see FP64_TOL.
    config = data.draw(configs(reorder_and_upcast_attn=False), label="config")
    seed = data.draw(seeds, label="seed")
    model = build(model_class, config, device, seed, torch.float64)
    g = torch.Generator().manual_seed(seed)
    B, T = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(2, 8), label="T")
    t = data.draw(st.integers(1, T - 1), label="t")  # pixels from t on change
    P = data.draw(st.integers(0, 4), label="cached pixels")

    ids = random_ids(g, config.vocab_size, (B, T))
    changed = ids.clone()
    changed[:, t:] = random_ids(g, config.vocab_size, (B, T - t))
    real = torch.ones(B, T, dtype=torch.bool)
    kwargs, mask = {}, None
    if data.draw(st.booleans(), label="padding"):
        mask = random_padding_mask(g, (B, P + T))
        kwargs.update(attention_mask=mask, position_ids=positions_from_mask(mask)[:, P:])
        real = mask[:, P:].bool()
    if data.draw(st.booleans(), label="head mask"):
        kwargs["head_mask"] = (torch.rand(config.n_layer, config.n_head, generator=g) < 0.7).float()
    if config.add_cross_attention:
        kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"] = encoder_inputs(g, config, B)
        kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].double()
    kwargs = to(device, **kwargs)
    if P > 0:  # run a prefix first; the new pixels attend to its cache
        prefix_kwargs = {k: v for k, v in kwargs.items() if k.startswith("encoder")}
        if mask is not None:
            prefix_kwargs.update(to(device, attention_mask=mask[:, :P], position_ids=positions_from_mask(mask)[:, :P]))
        body = model if model_class is ImageGPTModel else model.transformer
        prefix = random_ids(g, config.vocab_size, (B, P)).to(device)
        kwargs["past_key_values"] = body(prefix, use_cache=True, **prefix_kwargs).past_key_values

    def outputs(x, output_attentions):
        out = model(x.to(device), output_attentions=output_attentions, **kwargs)
        return out.last_hidden_state if model_class is ImageGPTModel else out.logits

    for output_attentions in (False, True):  # PyTorch's SDPA core, then the explicit core
        before, after = outputs(ids, output_attentions), outputs(changed, output_attentions)
        past_real = real[:, :t].to(device)
        # Same computation on the same past pixels: only summation order may differ.
        assert_close(after[:, :t][past_real], before[:, :t][past_real], FP64_TOL,
                     f"{model_class.__name__}, output_attentions={output_attentions}: positions < {t}")


# --- cache equivalence -------------------------------------------------------------------------------


def full_and_incremental(model, ids, bounds, mask, positions, cache="tuple", **common):
    """Logits and cache of one forward over ids (B, T), and of a prefill ids[:, :bounds[1]] followed by cached
    steps ids[:, bounds[i]:bounds[i + 1]]."""
    full = model(ids, attention_mask=mask, position_ids=positions, use_cache=True, **common)
    past = StaticCache(ids.size(1)) if cache == "static" else None  # preallocated for the whole sequence
    logits = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        step = model(
            ids[:, start:end], past_key_values=past, use_cache=True,
            attention_mask=None if mask is None else mask[:, :end],
            position_ids=None if positions is None else positions[:, start:end], **common,
        )
        past = step.past_key_values
        logits.append(step.logits)
    return full, torch.cat(logits, dim=1), past.to_tuple() if cache == "static" else past


def draw_cache_case(data, config, device):
    """Random pixels, where to cut them into a prefill and steps, and maybe padding and encoder inputs."""
    g = torch.Generator().manual_seed(data.draw(seeds, label="input seed"))
    B, T = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(2, 10), label="T")
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=T - 1), label="cuts"))
    ids = random_ids(g, config.vocab_size, (B, T))
    mask = positions = None
    if data.draw(st.booleans(), label="padding"):
        mask = random_padding_mask(g, (B, T))
        positions = positions_from_mask(mask)
    common = dict(output_attentions=data.draw(st.booleans(), label="explicit core"))
    if config.add_cross_attention:
        common["encoder_hidden_states"], common["encoder_attention_mask"] = encoder_inputs(g, config, B)
    real = mask.bool() if mask is not None else torch.ones(B, T, dtype=torch.bool)
    return to(device, ids=ids, mask=mask, positions=positions, real=real), [0, *cuts, T], to(device, **common)


def assert_same_cache(actual, expected, real, tol, why):
    """Per layer (k, v), each (B, nh, T, hs), compared at real positions."""
    assert len(actual) == len(expected)
    for (k, v), (k_ref, v_ref) in zip(actual, expected):
        for x, ref in ((k, k_ref), (v, v_ref)):
            assert_close(x.transpose(1, 2)[real], ref.transpose(1, 2)[real], tol, why)


@pytest.mark.parametrize("cache", ["tuple", "static"])
@examples(20)
@given(data=st.data())
def test_one_forward_equals_prefill_plus_cached_steps(device, cache, data):
    # In float64 (see FP64_TOL): the same maths over the same keys; the cache only splits the matmuls.
    # Not the upcast core: it rounds q, k and the scores to fp32 by design (see test_attention_cores_agree);
    # its causal slice over the cache is the explicit core's, drawn here with output_attentions=True.
    config = data.draw(configs(reorder_and_upcast_attn=False), label="config")
    model = build(ImageGPTForCausalImageModeling, config, device, data.draw(seeds, label="weights"), torch.float64)
    x, bounds, common = draw_cache_case(data, config, device)
    if "encoder_hidden_states" in common:
        common["encoder_hidden_states"] = common["encoder_hidden_states"].double()
    full, incremental, past = full_and_incremental(model, x["ids"], bounds, x["mask"], x["positions"], cache,
                                                   **common)
    assert_close(incremental[x["real"]], full.logits[x["real"]], FP64_TOL, f"steps {bounds}")
    assert_same_cache(past, full.past_key_values, x["real"], FP64_TOL, f"cache after steps {bounds}")


# Half precision keeps 11 (fp16) or 8 (bf16) significant bits; the two orders of summation round
# differently at every layer. A wrong cache position moves logits by their own scale (~1x).
HALF_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@examples(10)
@given(data=st.data())
def test_one_forward_equals_prefill_plus_cached_steps_in_half_precision(device, dtype, data):
    if device.type != "cuda":
        pytest.skip("fp16/bf16 cache equivalence is checked on CUDA (CPU half-precision kernels differ)")
    config = data.draw(configs(), label="config")
    model = build(ImageGPTForCausalImageModeling, config, device, data.draw(seeds, label="weights"), dtype=dtype)
    x, bounds, common = draw_cache_case(data, config, device)
    if "encoder_hidden_states" in common:
        common["encoder_hidden_states"] = common["encoder_hidden_states"].to(dtype)
    full, incremental, past = full_and_incremental(model, x["ids"], bounds, x["mask"], x["positions"], **common)
    assert_close(incremental[x["real"]], full.logits[x["real"]], HALF_TOL[dtype], f"{dtype}, steps {bounds}")
    assert_same_cache(past, full.past_key_values, x["real"], HALF_TOL[dtype], f"{dtype} cache, steps {bounds}")


# --- padding -----------------------------------------------------------------------------------------


@examples(20)
@given(data=st.data())
def test_padded_positions_never_change_real_outputs(device, data):
    """A padded batch gives, at every real position, what each row's real pixels give alone, wherever the
    padding sits; the same holds for padding of the encoder's tokens in cross-attention."""
    # In float64, without the upcast core (fp32 by design), as the cache test: see FP64_TOL. Padding keys
    # score the dtype's minimum, whose exp is exactly 0, so padded and alone are the same maths.
    config = data.draw(configs(reorder_and_upcast_attn=False), label="config")
    seed = data.draw(seeds, label="seed")
    model = build(ImageGPTForCausalImageModeling, config, device, seed, torch.float64)
    g = torch.Generator().manual_seed(seed)
    B, T = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 10), label="T")
    ids = random_ids(g, config.vocab_size, (B, T))
    mask = random_padding_mask(g, (B, T))
    positions = torch.where(mask.bool(), positions_from_mask(mask), random_ids(g, config.n_positions, (B, T)))
    encoder = encoder_inputs(g, config, B) if config.add_cross_attention else None
    if encoder is not None:
        encoder = (encoder[0].double(), encoder[1])
    for output_attentions in (False, True):  # SDPA core, then the explicit core
        kwargs = dict(attention_mask=mask, position_ids=positions, output_attentions=output_attentions)
        if encoder is not None:
            kwargs.update(encoder_hidden_states=encoder[0], encoder_attention_mask=encoder[1])
        padded = model(ids.to(device), **to(device, **kwargs)).logits
        for b in range(B):
            alone_kwargs = dict(output_attentions=output_attentions)
            if encoder is not None:  # the encoder row without its padded tokens
                alone_kwargs["encoder_hidden_states"] = encoder[0][b : b + 1, encoder[1][b].bool()]
            alone = model(ids[b : b + 1, mask[b].bool()].to(device), **to(device, **alone_kwargs)).logits[0]
            assert_close(padded[b][mask[b].bool().to(device)], alone, FP64_TOL,
                         f"row {b}, mask {mask[b].tolist()}, output_attentions={output_attentions}")


# --- attention cores ---------------------------------------------------------------------------------


@examples(20)
@given(data=st.data())
def test_attention_cores_agree(device, data):
    """SDPA (output_attentions=False), the explicit core (output_attentions=True) and the fp32 upcast core
    (reorder_and_upcast_attn=True) give the same logits, with padding, a cache and cross-attention."""
    config = data.draw(configs(reorder_and_upcast_attn=False), label="config")
    seed = data.draw(seeds, label="seed")
    # In float64 (see FP64_TOL): the same softmax(q k^T * scale + mask) v, in a different order of operations.
    model = build(ImageGPTForCausalImageModeling, config, device, seed, torch.float64)
    upcast = ImageGPTForCausalImageModeling(dataclasses.replace(config, reorder_and_upcast_attn=True))
    upcast = upcast.to(device=device, dtype=torch.float64)
    upcast.load_state_dict(model.state_dict())
    upcast.eval()
    g = torch.Generator().manual_seed(seed)
    B, T = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 8), label="T")
    P = data.draw(st.integers(0, 4), label="cached pixels")
    ids = random_ids(g, config.vocab_size, (B, P + T))
    kwargs, real = {}, torch.ones(B, T, dtype=torch.bool)
    if data.draw(st.booleans(), label="padding"):
        mask = random_padding_mask(g, (B, P + T))
        kwargs.update(attention_mask=mask, position_ids=positions_from_mask(mask))
        real = mask[:, P:].bool()
    if config.add_cross_attention:
        kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"] = encoder_inputs(g, config, B)
        kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].double()
    ids, kwargs, real = ids.to(device), to(device, **kwargs), real.to(device)

    def logits(m, output_attentions):
        step = dict(kwargs)
        if P > 0:  # cache the first P pixels with the same core, then run the last T
            prefix = {k: (v[:, :P] if k in ("attention_mask", "position_ids") else v) for k, v in kwargs.items()}
            step["past_key_values"] = m(ids[:, :P], use_cache=True, output_attentions=output_attentions,
                                        **prefix).past_key_values
        if "position_ids" in step:
            step["position_ids"] = step["position_ids"][:, P:]
        return m(ids[:, P:], output_attentions=output_attentions, **step).logits[real]

    sdpa = logits(model, False)
    assert_close(logits(model, True), sdpa, FP64_TOL, "explicit core vs SDPA")
    # The upcast core rounds q, k and the scores to fp32 by design, so it is held to FP32_TOL, and only with
    # scaled scores: unscaled, the rounding of a score of ~50 is amplified as FP64_TOL's comment says.
    # Scaled, the worst seen is 7.7e-7 of the outputs' scale; dropping its scale moves them by 1.8.
    if config.scale_attn_weights:
        assert_close(logits(upcast, False), sdpa, FP32_TOL, "fp32 upcast core vs SDPA")


# --- head mask and pruning ---------------------------------------------------------------------------


@examples(15)
@given(data=st.data())
def test_head_mask_zeroes_the_masked_heads_attention_weights(device, data):
    config = data.draw(configs(), label="config")
    seed = data.draw(seeds, label="seed")
    model = build(ImageGPTModel, config, device, seed)
    g = torch.Generator().manual_seed(seed)
    B, T = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 8), label="T")
    ids = random_ids(g, config.vocab_size, (B, T)).to(device)
    shape = data.draw(st.sampled_from([(config.n_head,), (config.n_layer, config.n_head)]), label="head_mask shape")
    head_mask = (torch.rand(shape, generator=g) < 0.5).float().to(device)
    kwargs = {}
    if config.add_cross_attention:
        kwargs = to(device, **dict(zip(("encoder_hidden_states", "encoder_attention_mask"),
                                       encoder_inputs(g, config, B))))
    out = model(ids, head_mask=head_mask, output_attentions=True, **kwargs)
    per_layer = head_mask.expand(config.n_layer, config.n_head)  # (nh,) applies to every layer
    weights = list(out.attentions) + (list(out.cross_attentions) if config.add_cross_attention else [])
    for i, w in enumerate(weights):  # (B, nh, T, keys)
        kept = per_layer[i % config.n_layer].bool()
        assert torch.all(w[:, ~kept] == 0), f"attention layer {i}: a masked head has non-zero weights"
        row_sums = w[:, kept].sum(-1)
        assert_close(row_sums, torch.ones_like(row_sums), FP32_TOL, "rows of kept heads are still softmaxes")


@st.composite
def heads_to_prune(draw, config):
    """{layer: [heads]} leaving at least one head in every layer."""
    plan = {}
    for layer in range(config.n_layer):
        heads = draw(st.sets(st.integers(0, config.n_head - 1), max_size=config.n_head - 1))
        if heads:
            plan[layer] = sorted(heads)
    return plan


@examples(20)
@given(data=st.data())
def test_pruning_heads_equals_masking_them(device, data):
    # Cross-attention off: a head mask also masks cross-attention heads, pruning removes self-attention heads only.
    config = data.draw(configs(n_head=data.draw(st.sampled_from([2, 4])), add_cross_attention=False), label="config")
    seed = data.draw(seeds, label="seed")
    model = build(ImageGPTForCausalImageModeling, config, device, seed)
    plan = data.draw(heads_to_prune(config), label="heads to prune")
    g = torch.Generator().manual_seed(seed)
    B, T = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 8), label="T")
    ids = random_ids(g, config.vocab_size, (B, T)).to(device)
    kwargs, real = {}, torch.ones(B, T, dtype=torch.bool)
    if data.draw(st.booleans(), label="padding"):
        mask = random_padding_mask(g, (B, T))
        kwargs = to(device, attention_mask=mask, position_ids=positions_from_mask(mask))
        real = mask.bool()
    head_mask = torch.ones(config.n_layer, config.n_head, device=device)
    for layer, heads in plan.items():
        head_mask[layer, heads] = 0
    masked = model(ids, head_mask=head_mask, **kwargs).logits

    pruned = copy.deepcopy(model)
    pruned.prune_heads(plan)
    assert pruned.config.pruned_heads == plan
    for output_attentions in (False, True):
        logits = pruned(ids, output_attentions=output_attentions, **kwargs).logits
        # The masked heads' outputs are exact zeros either way; only the matmul widths differ.
        assert_close(logits[real], masked[real], FP32_TOL, f"pruned {plan}, output_attentions={output_attentions}")


@examples(10)
@given(data=st.data())
def test_pruning_in_steps_equals_pruning_at_once(device, data):
    """Heads are numbered as in the unpruned model, however many were removed before."""
    config = data.draw(configs(n_head=4, add_cross_attention=False), label="config")
    seed = data.draw(seeds, label="seed")
    plan = data.draw(heads_to_prune(config), label="heads to prune")
    at_once = build(ImageGPTForCausalImageModeling, config, device, seed)
    in_steps = copy.deepcopy(at_once)
    at_once.prune_heads(plan)
    for layer, heads in plan.items():
        for head in reversed(heads) if seed % 2 else heads:  # one head at a time, in either order
            in_steps.prune_heads({layer: [head]})
    assert in_steps.config.pruned_heads == at_once.config.pruned_heads == plan
    for key, value in at_once.state_dict().items():
        assert torch.equal(in_steps.state_dict()[key], value), key


@examples(8)
@given(data=st.data())
def test_pruned_model_survives_save_and_load(device, data, tmp_path_factory):
    """save_pretrained / from_pretrained of a pruned model rebuild it: the config records the pruned heads,
    so the new model has the pruned shapes and the saved weights fit."""
    config = data.draw(configs(n_head=data.draw(st.sampled_from([2, 4])), add_cross_attention=False), label="config")
    model = build(ImageGPTForCausalImageModeling, config, device, data.draw(seeds, label="seed"))
    model.prune_heads(data.draw(heads_to_prune(config), label="heads to prune"))
    directory = tmp_path_factory.mktemp("pruned")
    model.save_pretrained(directory)
    loaded = ImageGPTForCausalImageModeling.from_pretrained(directory, device=device)
    assert loaded.config.pruned_heads == model.config.pruned_heads
    ids = torch.arange(6, device=device)[None] % config.vocab_size
    assert torch.equal(loaded(ids).logits, model(ids).logits)  # the same weights and maths: bit for bit


# --- ImageGPT's own parts ----------------------------------------------------------------------------


@examples(20)
@given(width=st.integers(1, 64), scale=st.floats(0.1, 10.0), shift=st.floats(-3.0, 3.0), seed=seeds)
def test_layer_norm_divides_by_root_mean_square_without_centring(device, width, scale, shift, seed):
    g = torch.Generator().manual_seed(seed)
    ln = ImageGPTLayerNorm(width, eps=1e-5).to(device)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(width, generator=g))
    x = torch.randn(3, width, generator=g) + shift
    x = (x / x.pow(2).mean(-1, keepdim=True).sqrt()).to(device)  # rms 1, mean anywhere in about [-1, 1]
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * ln.weight  # the reference's formula
    assert_close(ln(x), expected, FP32_TOL, "x / sqrt(mean(x^2) + eps) * weight")
    # Invariant to scaling the input, up to eps: rms(scale * x)^2 >= 0.01 here, so eps = 1e-5 moves the
    # result by at most 5e-4 of its size.
    assert_close(ln(scale * x), ln(x), 1e-3, "an rms norm is invariant to scaling its input")
    if width > 1 and abs(shift) > 1:  # nn.LayerNorm would subtract the mean; this one must not
        assert (ln(x) - F.layer_norm(x, (width,), ln.weight)).abs().max() > 1e-2
    assert set(ln.state_dict()) == {"weight"}  # no bias


@examples(15)
@given(data=st.data())
def test_causal_head_scores_colours_only_and_loss_is_shifted(device, data):
    config = data.draw(configs(add_cross_attention=False), label="config")
    seed = data.draw(seeds, label="seed")
    model = build(ImageGPTForCausalImageModeling, config, device, seed)
    g = torch.Generator().manual_seed(seed)
    B, T = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(2, 10), label="T")
    ids = random_ids(g, config.n_colours, (B, T))
    ids[:, 0] = config.sos_token_id  # sequences start with SOS, which is an input but never a target
    labels = ids.clone()
    labels[:, 1:][torch.rand(B, T - 1, generator=g) < 0.3] = -100  # ignored positions
    labels[:, 1] = ids[:, 1]  # keep at least one counted label per row
    out = model(ids.to(device), labels=labels.to(device))
    assert out.logits.shape == (B, T, config.vocab_size - 1)  # one score per colour, none for SOS
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()  # untied
    # Position t predicts label t + 1; labels of -100 are skipped; the mean is over counted labels.
    logits, targets = out.logits[:, :-1].reshape(-1, config.n_colours).cpu(), labels[:, 1:].reshape(-1)
    counted = targets != -100
    expected = -F.log_softmax(logits[counted].double(), dim=-1).gather(1, targets[counted, None]).mean()
    assert abs(out.loss.item() - expected.item()) <= FP32_TOL * max(1.0, abs(expected.item()))


@examples(15)
@given(data=st.data())
def test_classifier_averages_over_positions_and_its_losses_are_the_textbook_ones(device, data):
    num_labels = data.draw(st.integers(1, 4), label="num_labels")
    config = data.draw(configs(add_cross_attention=False, num_labels=num_labels), label="config")
    seed = data.draw(seeds, label="seed")
    model = build(ImageGPTForImageClassification, config, device, seed)
    g = torch.Generator().manual_seed(seed)
    B, T = data.draw(st.integers(2, 3), label="B"), data.draw(st.integers(1, 10), label="T")
    ids = random_ids(g, config.vocab_size, (B, T)).to(device)
    hidden = model.transformer(ids).last_hidden_state  # (B, T, C)
    logits = model(ids).logits
    assert_close(logits, hidden.mean(dim=1) @ model.score.weight.T, FP32_TOL, "score(mean over positions)")

    regression = torch.randn(B, num_labels, generator=g).squeeze(-1).to(device)
    cases = {"regression": (regression, F.mse_loss(logits.squeeze(), regression.squeeze()))}
    if num_labels > 1:
        classes = torch.randint(0, num_labels, (B,), generator=g).to(device)
        several = (torch.rand(B, num_labels, generator=g) < 0.5).float().to(device)
        cases["single_label_classification"] = (classes, F.cross_entropy(logits, classes))
        cases["multi_label_classification"] = (several, F.binary_cross_entropy_with_logits(logits, several))
    for problem_type, (labels, expected) in cases.items():
        # Inferred as the reference does (one label: regression; integer labels: single-label; float labels:
        # multi-label), or stated in the config.
        inferred = problem_type != "regression" or num_labels == 1
        for given_type in (None, problem_type) if inferred else (problem_type,):
            model.config.problem_type = given_type
            loss = model(ids, labels=labels).loss
            assert_close(loss, expected, FP32_TOL, f"{problem_type} loss (problem_type={given_type})")
    model.config.problem_type = None


# --- generation --------------------------------------------------------------------------------------


def tiny(device, seed=0, **overrides):
    config = ImageGPTConfig(**{**dict(vocab_size=9, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), **overrides})
    return build(ImageGPTForCausalImageModeling, config, device, seed)


def test_generation_from_sos_fills_an_image_and_never_emits_sos(device):
    model = tiny(device)
    g = torch.Generator(device=device).manual_seed(0)
    tokens = model.generate(num_samples=5, do_sample=True, generator=g)
    # SOS + one token per pixel; the last pixel is sampled but never fed back, so n_positions + 1 fits.
    assert tokens.shape == (5, model.config.n_positions + 1)
    assert torch.all(tokens[:, 0] == model.config.sos_token_id)
    assert torch.all((tokens[:, 1:] >= 0) & (tokens[:, 1:] < model.config.n_colours))


def test_sampling_is_deterministic_under_a_seed(device):
    model = tiny(device)

    def draw(seed, **options):
        g = torch.Generator(device=device).manual_seed(seed)
        return model.generate(num_samples=4, do_sample=True, generator=g, **options)

    for options in (dict(), dict(temperature=0.7, top_k=3), dict(top_p=0.8)):
        assert torch.equal(draw(1, **options), draw(1, **options)), options
    assert not torch.equal(draw(1), draw(2))  # 4 x 16 pixels of 8 colours: a collision would be astronomically rare


@examples(10)
@given(data=st.data())
def test_greedy_generation_equals_argmax_of_full_forwards(device, data):
    """Cached generation gives the tokens a model without cache picks, step by step: the argmax of the
    full forward at the last position. Prompt rows are kept as they were."""
    config = data.draw(configs(add_cross_attention=False), label="config")
    model = build(ImageGPTForCausalImageModeling, config, device, data.draw(seeds, label="seed"))
    g = torch.Generator().manual_seed(data.draw(seeds, label="prompt"))
    B, T = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 6), label="T")
    prompt = torch.cat([torch.full((B, 1), config.sos_token_id), random_ids(g, config.n_colours, (B, T - 1))], 1)
    new = data.draw(st.integers(0, config.n_positions + 1 - T), label="new tokens")
    tokens = generate(model, prompt.to(device), max_new_tokens=new)
    assert tokens.shape == (B, T + new) and torch.equal(tokens[:, :T].cpu(), prompt)
    for t in range(T, T + new):
        logits = model(tokens[:, :t]).logits[:, -1]  # (B, K)
        chosen = logits.gather(1, tokens[:, t : t + 1])[:, 0]
        # The chosen colour scores the maximum (ties broken either way are fine: compare values, not indices).
        assert_close(chosen, logits.max(-1).values, FP32_TOL, f"step {t}")
    top1 = generate(model, prompt.to(device), max_new_tokens=new, do_sample=True, top_k=1,
                    generator=torch.Generator(device=device).manual_seed(0))
    assert torch.equal(top1, tokens)  # sampling among the single best colour is greedy


def test_num_samples_repeats_each_prompt(device):
    model = tiny(device)
    prompt = torch.tensor([[8, 1, 2], [8, 3, 4]])
    tokens = model.generate(prompt, num_samples=3, max_new_tokens=2)
    assert tokens.shape == (6, 5)
    assert torch.equal(tokens[:3, :3].cpu(), prompt[[0, 0, 0]]) and torch.equal(tokens[3:, :3].cpu(), prompt[[1, 1, 1]])
    assert torch.equal(tokens[0], tokens[2])  # greedy: the copies agree


# --- training ----------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients(device):
    model = tiny(device, n_layer=3).train()
    ids = torch.randint(0, 9, (2, 10), generator=torch.Generator().manual_seed(0)).to(device)

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.transformer.gradient_checkpointing_enable()
    checkpointed = grads()
    model.transformer.gradient_checkpointing_disable()
    for name, g in plain.items():  # the same maths recomputed: equal up to summation order
        assert_close(checkpointed[name], g, FP32_TOL, name)
    assert plain["transformer.ln_f.weight"].abs().sum() > 0  # layer norm weights train (the reference's do not)


# --- config ------------------------------------------------------------------------------------------


def test_presets_are_openais_three_sizes():
    sizes = {name: ImageGPTConfig.from_preset(name) for name in ("small", "medium", "large")}
    assert [(c.n_embd, c.n_head, c.n_layer) for c in sizes.values()] == [(512, 8, 24), (1024, 8, 36), (1536, 16, 48)]
    for c in sizes.values():
        assert (c.vocab_size, c.n_positions, c.n_px, c.sos_token_id, c.activation_function) == \
            (513, 1024, 32, 512, "quick_gelu")
    assert ImageGPTConfig.from_preset("imagegpt-medium") == sizes["medium"]


def test_config_json_round_trips(tmp_path):
    config = ImageGPTConfig.from_preset("medium", num_labels=5, pruned_heads={1: [0, 3]}, extra={"custom": [1, 2]})
    config.to_json_file(tmp_path / "config.json")
    back = ImageGPTConfig.from_json_file(tmp_path / "config.json")
    assert back.to_dict() == config.to_dict()
    assert back.n_embd == 1024 and back.num_labels == 5 and back.pruned_heads == {1: [0, 3]} and back.extra["custom"] == [1, 2]


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(vocab_size=1), "at least 2"),
    (dict(activation_function="gelu_newer"), "activation_function"),
    (dict(attn_pdrop=1.5), "dropout probability"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings must be False"),
    (dict(problem_type="ranking"), "problem_type"),
])
def test_bad_configs_are_refused_with_the_field_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        ImageGPTConfig(**overrides)


def test_bad_inputs_give_clear_errors_before_any_work(device):
    model = tiny(device)
    ok = torch.tensor([[8, 1, 2]], device=device)
    cases = [
        (dict(input_ids=torch.tensor([[8, 9]], device=device)), ValueError, "token id 9, but vocab_size is 9"),
        (dict(input_ids=torch.zeros(1, 17, dtype=torch.long, device=device)), ValueError, "n_positions=16"),
        (dict(input_ids=ok.float()), TypeError, "integer tensor"),
        (dict(input_ids=ok, labels=torch.tensor([[8, 1, 8]], device=device)), ValueError, "colour 8"),
        (dict(input_ids=ok, labels=torch.tensor([[8, 1]], device=device)), ValueError, "labels has shape"),
        (dict(input_ids=ok, attention_mask=torch.ones(1, 2, device=device)), ValueError, "attention_mask has shape"),
        (dict(input_ids=ok, head_mask=torch.ones(3, device=device)), ValueError, "head_mask has shape"),
        (dict(input_ids=ok, encoder_hidden_states=torch.zeros(1, 2, 16, device=device)), ValueError,
         "no cross-attention"),
        (dict(), ValueError, "exactly one of input_ids"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            model(**kwargs)
    for kwargs, message in [
        (dict(input_ids=ok, max_new_tokens=15), "exceeds n_positions \\+ 1 = 17"),
        (dict(input_ids=ok[0]), "shape \\(B, T\\)"),
        (dict(do_sample=True, temperature=0.0), "temperature must be at least 1e-06"),
        (dict(do_sample=True, temperature=math.nan), "temperature must be at least 1e-06 and finite when sampling, got nan"),
        (dict(do_sample=True, temperature=math.inf), "temperature must be at least 1e-06 and finite when sampling, got inf"),
        (dict(do_sample=True, top_p=math.nan), "top_p must be in \\(0, 1\\], got nan"),
        (dict(do_sample=True, top_k=-1), "top_k"),
        (dict(num_samples=0), "num_samples"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.generate(**kwargs)
    with pytest.raises(ValueError, match="every head of layer 0"):
        model.prune_heads({0: [0, 1]})
