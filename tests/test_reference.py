"""nanogpt2.py against Hugging Face transformers 4.46.3, number by number.

Each test builds a transformers model, gives it weights of realistic size (the default init, std 0.02,
is so gentle that a wrong GELU or a missing scale hides below 1e-5), loads its state_dict into ours
with strict=True, and compares every output. Skipped only where transformers is not installed;
.ci/run installs it, so CI runs these.

The reference for attention options is transformers' eager attention: its SDPA attention class ignores
scale_attn_weights=False, scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn (it never passes
a scale to the kernel), so for those options only the eager path is the specification.
"""

import dataclasses
import warnings

import pytest
import torch

import nanogpt2

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=FutureWarning)
transformers.logging.set_verbosity_error()

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32: the same maths in a different order differs by a few ulps
SMALL = dict(n_layer=3, n_head=4, n_embd=64, vocab_size=211, n_positions=48, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0, summary_first_dropout=0.0, pad_token_id=0)
OPTIONS = {
    "default": {},
    "inverse_layer_scale_and_upcast": dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    "unscaled_relu": dict(scale_attn_weights=False, activation_function="relu"),
    "exact_gelu_wide_mlp": dict(activation_function="gelu", n_inner=96),
}
HEADS = ["GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification",
         "GPT2ForTokenClassification", "GPT2ForQuestionAnswering"]


def realistic_weights_(model, seed=0):
    """Weights of the size a trained GPT-2 has: matrices std 0.2 (sharp attention), layer norms 1 +- 0.2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "ln_cross_attn.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def make_pair(head, device, attn_implementation="eager", **options):
    """A transformers model with realistic weights and our model holding the same state_dict, on device."""
    hf_config = transformers.GPT2Config(**{**SMALL, **options}, attn_implementation=attn_implementation)
    hf = realistic_weights_(getattr(transformers, head)(hf_config)).eval()
    ours = getattr(nanogpt2, head)(nanogpt2.GPT2Config(**{**SMALL, **options})).eval()
    result = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return hf.to(device), ours.to(device)


def on(device, tensors: dict):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def differs(name):
    """assert_close's message, naming the output that differs (the exercises' check prints it)."""
    return lambda message: f"output {name} differs from the reference: {message}"


def assert_outputs_match(hf_out, our_out, real=None, tol=TOL):
    """Every field of the reference output equals ours. `real` (B, T) bool selects the positions that
    are real tokens: outputs at padding positions are arbitrary in both (nothing reads them)."""
    compared = 0
    for name, expected in hf_out.items():
        actual = getattr(our_out, name)
        if name == "past_key_values":
            for layer, ((hk, hv), (ok, ov)) in enumerate(zip(expected, actual)):
                for h, o, kv in ((hk, ok, "keys"), (hv, ov, "values")):  # (B, nh, T, hs): padding on dim 2
                    mask = real[:, None, :, None].expand_as(h) if real is not None else slice(None)
                    torch.testing.assert_close(o[mask], h[mask], **tol, msg=differs(f"{name}[{layer}] {kv}"))
        elif isinstance(expected, tuple):
            assert len(expected) == len(actual), name
            for i, (e, a) in enumerate(zip(expected, actual)):
                if real is not None and name == "hidden_states":
                    e, a = e[real], a[real]
                elif real is not None:  # attentions (B, nh, T, K): real query rows only
                    e, a = e.transpose(1, 2)[real], a.transpose(1, 2)[real]
                torch.testing.assert_close(a, e, **tol, msg=differs(f"{name}[{i}]"))
        elif real is not None and expected.dim() >= 2 and expected.shape[:2] == real.shape:
            torch.testing.assert_close(actual[real], expected[real], **tol, msg=differs(name))
        else:
            torch.testing.assert_close(actual, expected, **tol, msg=differs(name))
        compared += 1
    assert compared >= 2


def inputs_for(head, batch=3, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SMALL["vocab_size"], (batch, T), generator=g)
    if head == "GPT2DoubleHeadsModel":  # (B, n_choices, T), a classification token per choice
        return dict(input_ids=ids.view(1, batch, T), mc_token_ids=torch.tensor([[T - 1, T - 3, T - 2][:batch]]))
    return dict(input_ids=ids)


def labels_for(head, inputs, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = inputs["input_ids"]
    if head in ("GPT2LMHeadModel",):
        labels = ids.clone()
        labels[0, :3] = -100  # ignored positions
        return dict(labels=labels)
    if head == "GPT2DoubleHeadsModel":
        return dict(labels=ids.clone(), mc_labels=torch.tensor([1]))
    if head == "GPT2ForSequenceClassification":
        return dict(labels=torch.randint(0, 2, (ids.shape[0],), generator=g))
    if head == "GPT2ForTokenClassification":
        return dict(labels=torch.randint(0, 2, ids.shape, generator=g))
    if head == "GPT2ForQuestionAnswering":
        return dict(start_positions=torch.tensor([1, 4, 20]), end_positions=torch.tensor([3, 9, 2]))
    return {}


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("head", HEADS)
def test_every_head_matches_reference_with_realistic_weights(head, option, device):
    hf, ours = make_pair(head, device, **OPTIONS[option])
    inputs = on(device, {**inputs_for(head), **labels_for(head, inputs_for(head))})
    for output_attentions in (False, True):  # the fused core, then the explicit one
        tol = TOL
        if option == "unscaled_relu" and (not output_attentions or device.type == "cuda"):
            # Without the 1/sqrt(hs) scale the scores are 8x larger, and the fused kernels (CUDA's, and the
            # CPU's blocked softmax) sum in another order than transformers' matmul: seen 1.4e-5 on an H200
            # and 1.7e-5 on an AVX2 EPYC, so allow 5e-5 there. The explicit core matches to 1e-5 on CPUs.
            tol = dict(atol=5e-5, rtol=1e-4)
        with torch.no_grad():
            expected = hf(**inputs, output_hidden_states=True, output_attentions=output_attentions)
            actual = ours(**inputs, output_hidden_states=True, output_attentions=output_attentions)
        assert_outputs_match(expected, actual, tol=tol)


@pytest.mark.parametrize("head", HEADS)
def test_default_config_matches_reference_sdpa_path_too(head, device):
    hf, ours = make_pair(head, device, attn_implementation="sdpa")
    inputs = on(device, inputs_for(head))
    with torch.no_grad():
        assert_outputs_match(hf(**inputs, output_hidden_states=True), ours(**inputs, output_hidden_states=True))


@pytest.mark.parametrize("option", ["default", "inverse_layer_scale_and_upcast"])
def test_left_padding_and_head_mask_match_reference(option, device):
    hf, ours = make_pair("GPT2LMHeadModel", device, **OPTIONS[option])
    ids = torch.randint(1, SMALL["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
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
    hf, ours = make_pair("GPT2LMHeadModel", device, add_cross_attention=True, **OPTIONS[option])
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, SMALL["vocab_size"], (2, 9), generator=g)
    encoder_states = torch.randn(2, 5, SMALL["n_embd"], generator=g)
    encoder_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids, encoder_states, encoder_mask = ids.to(device), encoder_states.to(device), encoder_mask.to(device)
    for output_attentions in (False, True):
        kwargs = dict(encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask,
                      output_attentions=output_attentions, output_hidden_states=True, labels=ids)
        with torch.no_grad():
            assert_outputs_match(hf(ids, **kwargs), ours(ids, **kwargs))


def test_incremental_decoding_with_cache_matches_reference(device):
    hf, ours = make_pair("GPT2LMHeadModel", device)
    ids = torch.randint(1, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        hf_out, our_out = hf(ids[:, :7], use_cache=True), ours(ids[:, :7], use_cache=True)
        assert_outputs_match(hf_out, our_out)
        for t in range(7, 12):  # one token at a time, each side feeding its own cache back
            hf_out = hf(ids[:, t:t + 1], past_key_values=hf_out.past_key_values, use_cache=True)
            our_out = ours(ids[:, t:t + 1], past_key_values=our_out.past_key_values, use_cache=True)
            assert_outputs_match(hf_out, our_out)


def test_pruned_model_matches_reference(device):
    hf, ours = make_pair("GPT2LMHeadModel", device)
    heads = {0: [1, 3], 2: [0]}
    hf.prune_heads(heads)
    ours.prune_heads(heads)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ids = torch.randint(1, SMALL["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(6)).to(device)
    with torch.no_grad():
        assert_outputs_match(hf(ids, output_attentions=True), ours(ids, output_attentions=True))


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generation_equals_reference_token_for_token(padded, device):
    hf, ours = make_pair("GPT2LMHeadModel", device, vocab_size=211, n_positions=48)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 200, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0
        mask[2, :4] = 0
        ids = ids.masked_fill(mask == 0, 0)
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                               eos_token_id=210)
    actual = ours.generate(ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0, eos_token_id=210)
    assert torch.equal(actual, expected)


def test_beam_search_equals_reference(device):
    hf, ours = make_pair("GPT2LMHeadModel", device)
    ids = torch.randint(1, 200, (2, 5), generator=torch.Generator().manual_seed(8)).to(device)
    # An eos id the random model does emit, so finished hypotheses and early stopping are exercised.
    with torch.no_grad():
        first = hf.generate(ids, max_new_tokens=12, num_beams=1, do_sample=False, pad_token_id=0)
    eos = int(first[0, 8])
    for length_penalty in (1.0, 0.5):
        with torch.no_grad():
            expected = hf.generate(ids, max_new_tokens=12, num_beams=4, do_sample=False, pad_token_id=0,
                                   eos_token_id=eos, length_penalty=length_penalty)
        actual = ours.generate(ids, max_new_tokens=12, num_beams=4, pad_token_id=0, eos_token_id=eos,
                               length_penalty=length_penalty)
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("name", ["gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu",
                                  "silu", "swish", "mish", "tanh", "sigmoid", "linear", "leaky_relu"])
def test_activations_equal_reference(name):
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(nanogpt2.ACTIVATIONS[name](x), ACT2FN[name](x), atol=1e-6, rtol=1e-6)


def test_config_json_round_trips_through_transformers(tmp_path):
    ours = nanogpt2.GPT2Config.from_preset("gpt2-medium", num_labels=3, pad_token_id=50256,
                                           scale_attn_by_inverse_layer_idx=True)
    ours.to_json_file(tmp_path / "config.json")
    hf = transformers.GPT2Config.from_json_file(tmp_path / "config.json")
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "activation_function",
                 "layer_norm_epsilon", "num_labels", "pad_token_id", "scale_attn_by_inverse_layer_idx",
                 "summary_type", "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        assert getattr(hf, name) == getattr(ours, name), name
    hf.to_json_file(tmp_path / "hf.json")
    back = nanogpt2.GPT2Config.from_json_file(tmp_path / "hf.json")
    assert back.num_labels == 3 and back.n_embd == 1024 and "transformers_version" in back.extra


def test_defaults_equal_reference_defaults():
    hf, ours = transformers.GPT2Config(), nanogpt2.GPT2Config()
    for f in dataclasses.fields(ours):
        if f.name in ("extra", "classifier_dropout", "summary_last_dropout"):
            continue  # not fields of transformers' GPT2Config: its heads read them with a default
        assert getattr(ours, f.name) == getattr(hf, f.name), f.name
