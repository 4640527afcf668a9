"""generate() against transformers 4.46.3, token for token, in both files (issue 17).

Every call of the issue's "Why" (Hugging Face's "How to generate text" post), then each option on its own:
greedy decoding, beam search with each of its options, sampling under the same torch.manual_seed (top_k=0, the
default top_k=50, top_p, temperature, num_return_sequences), left-padded batches, eos with minimum lengths,
and output_scores (the processed scores to 1e-4; sequences_scores and beam_indices for beams). Both models get
weights of realistic size (std 0.2 for GPT-2, 0.3 for ImageGPT, as in test_reference.py and
test_imagegpt_reference.py: the default init's near-uniform distributions would hide a wrong processor).

ImageGPT's own default length is a whole image (its generation_config has max_length = n_positions + 1; the
reference's default is 20 tokens): the reference model is given the same generation config, so that calls
without a length compare too. The reference cannot apply repetition_penalty to ImageGPT at all (SOS, in every
prompt, has no logit: it indexes past the scores); that case is compared with the reference's own processor on
the pixels instead.
"""

import warnings

import pytest
import torch

import imagegpt
import nanogpt2

transformers = pytest.importorskip("transformers")
if not transformers.__version__.startswith("4.46."):
    pytest.skip(f"the reference is transformers 4.46.3; {transformers.__version__} is installed",
                allow_module_level=True)
warnings.filterwarnings("ignore", category=FutureWarning)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
transformers.logging.set_verbosity_error()

GPT2_CONFIG = dict(n_layer=3, n_head=4, n_embd=64, vocab_size=211, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0, pad_token_id=0)
IGPT_CONFIG = dict(n_layer=3, n_head=4, n_embd=64, vocab_size=17, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0)  # 16 colours + SOS (16), 8 x 8 pixels
SOS = 16


def realistic_weights_(model, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


PAIRS = {}


def pair(name, device):
    """(reference, ours) with the same realistic weights, on device, built once per module and device."""
    if (name, device) not in PAIRS:
        if name == "gpt2":
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIG, attn_implementation="eager"))
            ours = nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(**GPT2_CONFIG))
            realistic_weights_(hf, 0.2)
        else:
            hf = transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(**IGPT_CONFIG))
            ours = imagegpt.ImageGPTForCausalImageModeling(imagegpt.ImageGPTConfig(**IGPT_CONFIG))
            realistic_weights_(hf, 0.3)
            # ours completes the image by default: the same defaults for the reference (see the module docstring)
            hf.generation_config.max_length = ours.generation_config.max_length
            hf.generation_config.bos_token_id = ours.generation_config.bos_token_id
        result = ours.load_state_dict(hf.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        PAIRS[name, device] = hf.eval().to(device), ours.eval().to(device)
    return PAIRS[name, device]


def prompts(name, device, batch=2, T=5, padded=False, seed=8):
    """(input_ids (batch, T), attention_mask or None): GPT-2 ids in [1, 200); ImageGPT SOS then colours. padded:
    row 0 left-padded by 2 and the last row by 3, under the mask, with id 0 (GPT-2) or SOS (ImageGPT: with a
    colour before SOS, the reference's n-gram blocking could ban SOS, which has no logit, and raise)."""
    g = torch.Generator().manual_seed(seed)
    if name == "gpt2":
        ids = torch.randint(1, 200, (batch, T), generator=g)
    else:
        ids = torch.cat([torch.full((batch, 1), SOS), torch.randint(0, 16, (batch, T - 1), generator=g)], dim=1)
    if not padded:
        return ids.to(device), None
    mask = torch.ones_like(ids)
    mask[0, :2], mask[-1, :3] = 0, 0
    if name == "imagegpt":  # each row still starts with SOS, after its padding
        ids[0, 2], ids[-1, 3] = SOS, SOS
    return ids.masked_fill(mask == 0, 0 if name == "gpt2" else SOS).to(device), mask.to(device)


def common_tokens(hf, ids, mask):
    """The tokens the model emits most often among the first 8 greedy tokens of every row, commonest first (the
    earliest on a tie). As eos they end rows early, and finish beam hypotheses early enough for early_stopping
    and the number of candidates kept to matter."""
    with torch.no_grad():
        free = hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), do_sample=False,
                           max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    new = free[:, ids.size(1):].flatten().tolist()
    return sorted(set(new), key=lambda t: (-new.count(t), new.index(t))) + [1, 2, 3]  # (at least three)


def assert_same_generation(expected, actual, what):
    """Sequences token for token; scores (processed) to 1e-4; sequences_scores and beam_indices as well."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{what}: ours returned {type(actual).__name__}"
        assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert torch.equal(actual, expected), f"{what}:\nours {actual.tolist()}\nreference {expected.tolist()}"
        return
    assert type(actual).__name__ == type(expected).__name__, what
    assert_same_generation(expected.sequences, actual.sequences, what + " (sequences)")
    for field in ("scores", "sequences_scores", "beam_indices"):
        theirs, ours = getattr(expected, field, None), getattr(actual, field, None)
        assert (theirs is None) == (ours is None), f"{what}: {field} is {ours!r:.40}, reference {theirs!r:.40}"
        if theirs is None:
            continue
        if field == "scores":
            assert len(ours) == len(theirs), f"{what}: {len(ours)} steps of scores, reference {len(theirs)}"
            for step, (o, t) in enumerate(zip(ours, theirs)):
                torch.testing.assert_close(o, t, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: step {step}: {m}")
        elif field == "beam_indices":
            assert torch.equal(ours, theirs), f"{what}: beam_indices {ours.tolist()} != {theirs.tolist()}"
        else:
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def compare(name, device, options, padded=False, seed=0, batch=2, T=5, call_without_mask=False):
    """Run the same generate call on the reference and on ours, each after torch.manual_seed(seed); "EOS",
    "EOS2" and "EOS3" in options stand for the commonest tokens (common_tokens), alone or in a list."""
    hf, ours = pair(name, device)
    ids, mask = prompts(name, device, batch=batch, T=T, padded=padded)
    if "EOS" in repr(options):
        common = dict(zip(["EOS", "EOS2", "EOS3"], common_tokens(hf, ids, mask)))
        put = lambda v: common.get(v, v) if isinstance(v, str) else [put(x) for x in v] if isinstance(v, list) \
            else v  # noqa: E731
        options = {k: put(v) for k, v in options.items()}
    masks = {} if call_without_mask else {"attention_mask": mask if mask is not None else torch.ones_like(ids)}
    torch.manual_seed(seed)
    with torch.no_grad():
        expected = hf.generate(ids, **masks, **options)
    torch.manual_seed(seed)
    actual = ours.generate(ids, **masks, **options)
    assert_same_generation(expected, actual, f"{name} {options}")
    return actual


MODELS = ["gpt2", "imagegpt"]

# --- the issue's calls, as written ----------------------------------------------------------------------

WHY = {
    "max_length": dict(max_length=50),
    "beams_early_stopping": dict(max_length=50, num_beams=5, early_stopping=True),
    "beams_no_repeat_ngram_5_sequences": dict(num_beams=5, no_repeat_ngram_size=2, num_return_sequences=5),
    "sample_top_k_0": dict(do_sample=True, max_length=50, top_k=0),
    "sample_top_p_3_sequences": dict(do_sample=True, top_p=0.92, top_k=0, num_return_sequences=3),
    "repetition_penalty": dict(repetition_penalty=1.2),
    "output_scores": dict(max_new_tokens=20, output_scores=True, return_dict_in_generate=True),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("call", WHY, ids=list(WHY))
def test_the_issues_calls_give_the_references_tokens(name, call, device):
    """`model.generate(ids, ...)` exactly as the issue writes each call (no attention_mask, the defaults for the
    rest), with the reference's tokens; sampling under the same torch.manual_seed."""
    if name == "imagegpt" and call == "repetition_penalty":
        pytest.skip("the reference cannot run it on ImageGPT: test_imagegpt_penalties_are_the_references_"
                    "processors_on_the_pixels")
    compare(name, device, WHY[call], call_without_mask=True, seed=3)


@pytest.mark.parametrize("option", ["repetition_penalty", "no_repeat_ngram_size"])
def test_imagegpt_penalties_are_the_references_processors_on_the_pixels(option, device):
    """The reference's RepetitionPenaltyLogitsProcessor gathers the score of every prompt token, SOS included,
    and SOS has no logit: it raises (so does its no-repeat n-gram processor with n = 1, which bans SOS). Ours
    leaves SOS out. Its tokens equal the reference's generate with the reference's own processor, given each row
    with SOS replaced by the row's last token: a token already there, and both act on the set of tokens a row
    holds, so the set is the pixels'."""
    hf, ours = pair("imagegpt", device)
    ids, _ = prompts("imagegpt", device, batch=3, T=6)
    ours_option, processor = {
        "repetition_penalty": (dict(repetition_penalty=1.2), transformers.RepetitionPenaltyLogitsProcessor(1.2)),
        "no_repeat_ngram_size": (dict(no_repeat_ngram_size=1), transformers.NoRepeatNGramLogitsProcessor(1)),
    }[option]
    with pytest.raises((RuntimeError, IndexError)):
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, **ours_option)

    def pixels_only(input_ids, scores):
        return processor(torch.where(input_ids == SOS, input_ids[:, -1:], input_ids), scores)

    for options in (dict(max_new_tokens=12), dict(max_new_tokens=10, num_beams=3)):
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids),
                                   logits_processor=transformers.LogitsProcessorList([pixels_only]), **options)
        actual = ours.generate(ids, **ours_option, **options)
        assert torch.equal(actual, expected), options
        assert not torch.equal(actual, ours.generate(ids, **options)), "the option changed nothing: a weak test"


# --- each option -----------------------------------------------------------------------------------------

GREEDY = {
    "max_new_tokens": dict(max_new_tokens=15),
    "max_new_tokens_wins_over_max_length": dict(max_new_tokens=9, max_length=40),
    "eos_pads_finished_rows": dict(max_new_tokens=15, eos_token_id="EOS", pad_token_id=1),
    "eos_list": dict(max_new_tokens=15, eos_token_id=["EOS2", "EOS"]),
    "min_length": dict(max_new_tokens=15, eos_token_id="EOS", min_length=12),
    "min_new_tokens": dict(max_new_tokens=15, eos_token_id="EOS", min_new_tokens=8),
    "min_new_tokens_eos_list": dict(max_new_tokens=15, eos_token_id=["EOS3", "EOS"], min_new_tokens=10),
    "no_repeat_ngram_1": dict(max_new_tokens=12, no_repeat_ngram_size=1),
    "no_repeat_ngram_3": dict(max_new_tokens=25, no_repeat_ngram_size=3),
    "bad_words": dict(max_new_tokens=15, bad_words_ids=[[5], [7, 9], [11, 12, 13]]),
    "bad_words_eos_kept": dict(max_new_tokens=15, eos_token_id="EOS", bad_words_ids=[["EOS"], [4]]),
    "output_scores": dict(max_new_tokens=10, eos_token_id="EOS", min_new_tokens=4, output_scores=True,
                          return_dict_in_generate=True),
    "temperature_ignored_when_greedy": dict(max_new_tokens=8, temperature=0.3, top_k=2),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("case", GREEDY, ids=list(GREEDY))
def test_greedy_with_each_option_equals_reference(name, case, padded, device):
    options = dict(GREEDY[case])
    if name == "imagegpt" and case == "no_repeat_ngram_1":
        pytest.skip("the reference bans SOS, and indexes past the scores: test_imagegpt_penalties_are_the_"
                    "references_processors_on_the_pixels")
    if name == "gpt2" and case == "no_repeat_ngram_1":
        options["repetition_penalty"] = 1.3  # (ImageGPT: see test_imagegpt_penalties_... above)
    compare(name, device, options, padded=padded, batch=3)


BEAMS = {
    "plain": dict(num_beams=4, max_new_tokens=12),
    "early_stopping_false": dict(num_beams=4, max_new_tokens=12, eos_token_id="EOS", early_stopping=False),
    "early_stopping_true": dict(num_beams=4, max_new_tokens=12, eos_token_id="EOS", early_stopping=True),
    "early_stopping_never": dict(num_beams=4, max_new_tokens=12, eos_token_id="EOS", early_stopping="never"),
    # where "never" gives other tokens than False (seen with the reference), for each model
    "never_3_beams": dict(num_beams=3, max_new_tokens=12, eos_token_id=["EOS", "EOS2"], early_stopping="never"),
    "never_length_penalty_2": dict(num_beams=2, max_new_tokens=12, eos_token_id="EOS", early_stopping="never",
                                   length_penalty=2.0),
    # more eos ids than beams among the best candidates: 2 * num_beams candidates would not be enough
    "many_eos_early_scores": dict(num_beams=2, max_new_tokens=10, eos_token_id=["EOS", "EOS2", "EOS3"],
                                  early_stopping=True, output_scores=True, return_dict_in_generate=True),
    "length_penalty_half": dict(num_beams=3, max_new_tokens=12, eos_token_id="EOS", length_penalty=0.5),
    "length_penalty_2": dict(num_beams=3, max_new_tokens=12, eos_token_id="EOS", length_penalty=2.0),
    "length_penalty_negative_never": dict(num_beams=3, max_new_tokens=12, eos_token_id="EOS", length_penalty=-1.0,
                                          early_stopping="never"),
    "num_return_sequences": dict(num_beams=4, max_new_tokens=12, eos_token_id="EOS", num_return_sequences=3),
    "no_repeat_ngram": dict(num_beams=3, max_new_tokens=20, no_repeat_ngram_size=2),
    "bad_words": dict(num_beams=3, max_new_tokens=12, bad_words_ids=[[5], [7, 9]]),
    "min_new_tokens": dict(num_beams=3, max_new_tokens=12, eos_token_id="EOS", min_new_tokens=7),
    "eos_list": dict(num_beams=3, max_new_tokens=12, eos_token_id=["EOS2", "EOS", "EOS3"]),
    "output_scores": dict(num_beams=3, max_new_tokens=10, eos_token_id="EOS", num_return_sequences=2,
                          output_scores=True, return_dict_in_generate=True),
    "return_dict_without_scores": dict(num_beams=3, max_new_tokens=6, return_dict_in_generate=True),
    "beam_sampling": dict(num_beams=3, max_new_tokens=10, do_sample=True, top_k=4, eos_token_id="EOS"),
    "beam_sampling_keeps_two": dict(num_beams=2, max_new_tokens=10, do_sample=True, top_k=1, top_p=0.1),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("case", BEAMS, ids=list(BEAMS))
def test_beam_search_with_each_option_equals_reference(name, case, padded, device):
    options = dict(BEAMS[case])
    if name == "gpt2" and case == "no_repeat_ngram":
        options["repetition_penalty"] = 1.5
    if padded and case == "many_eos_early_scores":
        # A finished prompt's beams go on computing, on row 0's cache (as the reference's) under their own mask:
        # with row 0 left-padded they attend to its padding slots, whose keys are arbitrary in both models
        # (test_reference.py compares real positions only). Their scores mean nothing and differ; compare tokens.
        options.pop("output_scores"), options.pop("return_dict_in_generate")
    compare(name, device, options, padded=padded, batch=3, seed=5)


SAMPLING = {
    "top_k_0": dict(do_sample=True, max_new_tokens=20, top_k=0),
    "default_top_k_50": dict(do_sample=True, max_new_tokens=20),
    "top_k_5": dict(do_sample=True, max_new_tokens=20, top_k=5),
    "top_p": dict(do_sample=True, max_new_tokens=20, top_k=0, top_p=0.8),
    "temperature": dict(do_sample=True, max_new_tokens=20, temperature=0.7),
    "hot_top_k_top_p": dict(do_sample=True, max_new_tokens=20, temperature=1.5, top_k=10, top_p=0.9),
    "num_return_sequences": dict(do_sample=True, max_new_tokens=15, num_return_sequences=3),
    "eos_min_new_tokens": dict(do_sample=True, max_new_tokens=15, eos_token_id="EOS", min_new_tokens=5),
    "processors": dict(do_sample=True, max_new_tokens=15, no_repeat_ngram_size=2, bad_words_ids=[[3, 4]]),
    "output_scores": dict(do_sample=True, max_new_tokens=10, top_k=7, temperature=0.9, output_scores=True,
                          return_dict_in_generate=True),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("case", SAMPLING, ids=list(SAMPLING))
def test_seeded_sampling_with_each_option_equals_reference(name, case, padded, device):
    """The same torch.manual_seed gives the same tokens: one torch.multinomial per step, over the same
    probabilities, from torch's global generator."""
    options = dict(SAMPLING[case])
    if name == "gpt2" and case == "processors":
        options["repetition_penalty"] = 1.2
    compare(name, device, options, padded=padded, batch=3, seed=11)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("options", [dict(max_new_tokens=10), dict(max_new_tokens=8, num_beams=3)])
def test_without_a_mask_pad_tokens_in_the_prompt_are_padding_as_in_the_reference(name, options, device):
    """No attention_mask, pad_token_id set (and not an eos id): the reference takes the pad tokens in the prompt
    for padding, and so does ours: a left-padded batch without its mask gives the reference's tokens."""
    hf, ours = pair(name, device)
    ids, mask = prompts(name, device, batch=3, padded=True)
    pad = 0 if name == "gpt2" else 15  # (ImageGPT's prompts are padded with SOS: a colour here, used nowhere else)
    ids = ids.masked_fill(ids == pad, pad - 1 if name == "imagegpt" else 1).masked_fill(mask == 0, pad)
    with torch.no_grad():
        expected = hf.generate(ids, pad_token_id=pad, eos_token_id=None, **options)
    assert torch.equal(ours.generate(ids, pad_token_id=pad, eos_token_id=None, **options), expected)
    assert torch.equal(expected, hf.generate(ids, attention_mask=mask, pad_token_id=pad, eos_token_id=None,
                                             **options))  # the premise: the reference did infer the mask


@pytest.mark.parametrize("name", MODELS)
def test_a_generation_config_object_equals_the_same_keywords(name, device):
    """generate(generation_config=...) as the reference: its special tokens left unset come from the model's."""
    hf, ours = pair(name, device)
    ids, _ = prompts(name, device)
    fields = dict(max_new_tokens=12, num_beams=3, no_repeat_ngram_size=2, num_return_sequences=2)
    module = nanogpt2 if name == "gpt2" else imagegpt
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids),
                               generation_config=transformers.GenerationConfig(**fields))
    assert torch.equal(ours.generate(ids, generation_config=module.GenerationConfig(**fields)), expected)
    assert torch.equal(ours.generate(ids, **fields), expected)
