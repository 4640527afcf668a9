"""The catalogue of classroom exercises that tests/exercises.py serves: one place, plain data.

Each exercise is a dict:
    id          short, unique, used on the command line
    title       one line
    kind        "write": the student writes the functions listed in `functions` (their docstrings are the task);
                "bug": one fault is planted by `edits`, a list of (function, exact old text inside it, new text)
    file        nanogpt2.py, imagegpt.py or convert_tf.py
    functions   qualified names ("GPT2Attention.forward") of the functions written, or the one holding the bug
    chapter     a group that `start CHAPTER` starts at once
    difficulty  1 (a few lines) to 3 (a page, with the cache or the shapes to get right)
    tests       the focused grading tests (pytest node ids, relative to the repository root)
    hints       one to three, each saying more than the last: the first names the symptom, the next the idea, a
                third the common mistake; none is the code (`solution` is), and a test checks that none quotes it
    weight      (optional) points in the gradebook; the difficulty when absent
    slot        (set from SLOTS below) the drill slot of a bug: one of its variants is drawn per student

Functions are found by name in the syntax tree, and a bug's old text must occur exactly once in its function:
when the code changes so that an entry goes stale, tests/test_exercises.py says which and why.
"""

P = "tests/test_properties.py::"
H = "tests/test_heads_and_inputs.py::"
R = "tests/test_reference.py::"
T = "tests/test_train.py::"
S = "tests/test_pretrained_safetensors.py::"
I = "tests/test_imagegpt.py::"
IP = "tests/test_imagegpt_pixels.py::"
IR = "tests/test_imagegpt_reference.py::"
C = "tests/test_convert_tf.py::"
G = "tests/test_gaps.py::"
GP = "tests/test_generation_processors.py::"
GR = "tests/test_generation_reference.py::"
TK = "tests/test_tokenizer.py::"

CHAPTERS = {
    "blocks": "Building blocks: the activation, Conv1D, the MLP",
    "attention": "Attention: heads, scores, masks and the key/value cache",
    "model": "The block and the body, positions, the loss",
    "generation": "Generation: top-k, top-p, the sampling loop, beam search",
    "pruning": "Pruning attention heads",
    "files": "Files: safetensors headers",
    "training": "Training and evaluation: the schedule, the optimiser, one step, sliding windows",
    "text": "Text: streaming tokens to the screen",
    "pixels": "ImageGPT: its layer norm and activation, colour palettes, PNG filters, k-means",
    "tensorflow": "OpenAI's TensorFlow checkpoints: protobuf, the SSTable index, CRC32C",
    "generate-processors": "Generation the reference's way: repetition penalty, n-gram blocking, bad words, "
                           "minimum length",
    "tokenizer": "GPT-2's tokenizer: the pre-tokenizer, one piece's merge loop, one round of BPE training",
}

REFERENCE_HEADS = R + "test_every_head_matches_reference_with_realistic_weights"


def write(id, title, file, functions, chapter, difficulty, tests, hints):
    return dict(id=id, title=title, kind="write", file=file, functions=functions, chapter=chapter,
                difficulty=difficulty, tests=tests, hints=hints)


def bug(id, title, file, function, old, new, chapter, difficulty, tests, hints):
    return dict(id=id, title=title, kind="bug", file=file, functions=[function], edits=[(function, old, new)],
                chapter=chapter, difficulty=difficulty, tests=tests, hints=hints)


NG, IG, TF = "nanogpt2.py", "imagegpt.py", "convert_tf.py"

EXERCISES = [
    # --- nanogpt2.py: write --------------------------------------------------------------------------------
    write("gelu", "GPT-2's GELU, the tanh approximation", NG, ["gelu_new_formula"], "blocks", 1,
          [G + "test_gelu_new_is_the_tanh_approximation", R + "test_activations_equal_reference"],
          ["The test compares yours with GPT-2's formula at 2001 points from -8 to 8, to 1e-12: the exact erf GELU "
           "(torch's default) differs from it by up to 1e-3, so it fails.",
           "GELU(x) is x times the normal CDF of x; GPT-2 replaces that CDF by one half of (1 + tanh of a scaled "
           "cubic polynomial in x). The docstring gives both constants.",
           "Common slips: x^3 written with ^ (bitwise xor in Python), or the sqrt(2 / pi) factor applied to x alone "
           "instead of to the whole polynomial."]),
    write("conv1d", "Conv1D: a linear layer with its weight stored (in, out)", NG, ["Conv1D.forward"], "blocks", 1,
          [G + "test_conv1d_is_x_times_weight_plus_bias", REFERENCE_HEADS],
          ["A matrix product that refuses the shapes, or an output that is transposed, means the weight was used the "
           "nn.Linear way: here it is stored (in, out).",
           "The output is x times the weight plus the bias, for any number of leading dimensions: fold them into "
           "one, multiply, and unfold them again.",
           "A common slip: multiplying by the weight's transpose; with a square layer the shapes still fit and only "
           "the values are wrong."]),
    write("mlp", "The MLP: widen, activate, project back", NG, ["GPT2MLP.forward"], "blocks", 1,
          [REFERENCE_HEADS],
          ["If the output's shape is right but its values are not, the four modules ran in the wrong order, or one "
           "was skipped.",
           "Widen with c_fc, apply the activation, project back with c_proj, then dropout: all four are made in "
           "__init__."]),
    write("heads", "Splitting into heads and merging them back", NG,
          ["GPT2Attention.split_heads", "GPT2Attention.merge_heads"], "attention", 1,
          [G + "test_split_and_merge_heads_move_each_heads_channels", P + "test_attention_cores_agree"],
          ["If each head holds channels of several tokens, the head axis was made by a view alone: a view never "
           "moves data.",
           "Split: view the channels as (heads, head size), then swap the head axis with the token axis. Merge: undo "
           "exactly that, in reverse order.",
           "Common slips: a view straight after a transpose (the memory is out of order: make it contiguous first, "
           "or reshape), and the width after pruning, which is self.split_size, not the config's n_embd."]),
    write("score-scale", "What the attention scores are multiplied by", NG, ["GPT2Attention.score_scale"],
          "attention", 1,
          [G + "test_score_scale_follows_both_config_flags", REFERENCE_HEADS],
          ["The test tries all four settings of scale_attn_weights and scale_attn_by_inverse_layer_idx in layers 0, "
           "1 and 2: note which flags the failing case has.",
           "Start from 1; the first flag divides by the square root of the head size, the second divides again by "
           "the layer's number counted from 1.",
           "A common slip: the second flag replacing the first one's factor instead of multiplying with it."]),
    write("attention-core", "The attention core: scale, causal mask with a cache, padding, softmax", NG,
          ["GPT2Attention.explicit_attention"], "attention", 2,
          [P + "test_attention_cores_agree", P + "test_future_tokens_never_change_past_outputs",
           P + "test_one_forward_equals_prefill_plus_cached_steps", R + "test_left_padding_and_head_mask_match_reference"],
          ["If the explicit core disagrees with SDPA only with a cache, the causal rows are wrong; only with "
           "padding, the padding mask; always, the scale or the softmax's axis.",
           "Scores are the queries times the keys transposed, times the factor score_scale gives; masked scores "
           "become the dtype's minimum (not -inf); softmax over the keys; dropout; then the weighted sum of the "
           "values.",
           "With P cached tokens the T queries are the LAST T of the K key positions, so their rows of the causal "
           "matrix start at K - T; cross-attention has no causal mask; the upcast path scales q first and works in "
           "float32."]),
    write("kv-cache", "Attention's forward: projections, heads and the key/value cache", NG,
          ["GPT2Attention.forward"], "attention", 3,
          [P + "test_one_forward_equals_prefill_plus_cached_steps", R + "test_incremental_decoding_with_cache_matches_reference",
           R + "test_cross_attention_matches_reference", REFERENCE_HEADS],
          ["If one forward is right but a prefill plus cached steps is not, look at how the cache is joined to the "
           "new keys and values; if nothing is right, at how c_attn's output is split.",
           "c_attn gives queries, keys and values side by side, each split_size wide; split each into heads. The "
           "cached keys and values come first, in position order, then the new ones, along the token axis.",
           "Then pick the core (the explicit one when weights are wanted, heads masked or the upcast path on; SDPA "
           "otherwise), merge the heads, c_proj, resid_dropout; present only with use_cache. Cross-attention takes "
           "its queries from q_attn and its keys and values from the encoder's states."]),
    write("padding-mask", "From a 0/1 padding mask to an additive mask", NG, ["padding_mask_to_additive"],
          "attention", 1,
          [P + "test_padded_positions_never_change_real_outputs", R + "test_left_padding_and_head_mask_match_reference"],
          ["If real tokens' outputs change when the padding changes, the mask hides queries instead of keys.",
           "It is added to scores of shape (batch, heads, queries, keys): give the mask two size-1 axes so that it "
           "broadcasts over heads and queries; kept keys add 0, padded keys the dtype's most negative number.",
           "A common slip: -inf instead of the dtype's minimum; a row whose keys are all masked then gives NaN."]),
    write("positions", "Position ids of left-padded prompts", NG, ["_positions_from_mask"], "model", 1,
          [G + "test_positions_from_mask_count_real_tokens_only",
           H + "test_batched_left_padded_generation_equals_one_prompt_at_a_time"],
          ["If batched, left-padded generation differs from one prompt at a time, the real tokens' positions do not "
           "start at 0.",
           "A real token's position is the number of real tokens before it in its row: a running count of the mask, "
           "minus one.",
           "Padding slots get position 1 (nothing reads them); a common slip is leaving them negative, which the "
           "position embedding refuses."]),
    write("block", "The transformer block, pre-norm", NG, ["GPT2Block.forward"], "model", 2,
          [REFERENCE_HEADS, R + "test_cross_attention_matches_reference"],
          ["If every property holds but the outputs differ from the reference, look at which layer norm feeds which "
           "sub-block, and at the residual additions.",
           "Pre-norm: each sub-block reads a layer-normed copy of the stream and ADDS its output back: ln_1 then "
           "attention, ln_cross_attn then cross-attention (only with encoder states), ln_2 then the MLP.",
           "attn returns (output, present, weights); the block returns the stream, present, and the self- and "
           "cross-attention weights."]),
    write("body", "The body's forward: embeddings, masks, the blocks, the final norm", NG,
          ["GPT2Model.embed", "layer_cache", "GPT2Model.forward"], "model", 3,
          [REFERENCE_HEADS, P + "test_one_forward_equals_prefill_plus_cached_steps",
           R + "test_left_padding_and_head_mask_match_reference", R + "test_incremental_decoding_with_cache_matches_reference"],
          ["If one forward is right but cached steps are not, the new tokens' positions do not continue after the "
           "cached ones; if padding breaks it, the mask is not additive, or not as long as all the keys.",
           "embed: tokens and positions (token types through the token embedding), added, then dropout. forward: the "
           "padding mask becomes additive over the cached plus the new keys; head_mask is spread to one value per "
           "layer and head; layer_cache gives each block its part of the cache.",
           "Loop over the blocks collecting presents, hidden states and attentions as asked, then the final layer "
           "norm; last_hidden_state has the input's shape plus the channel axis."]),
    write("lm-loss", "The language-modelling loss, shifted, ignoring -100", NG, ["shifted_lm_loss"], "model", 1,
          [H + "test_lm_loss_equals_hand_computation"],
          ["If the loss is far too low, or is the loss of predicting the current token, the shift is missing or the "
           "wrong way round.",
           "Position t's logits predict the label at t + 1: leave out the last position's logits and the first "
           "label, then take one cross-entropy over every remaining position.",
           "Labels of -100 are skipped; cross-entropy wants the logits flattened to (positions, vocabulary) and the "
           "labels to (positions,)."]),
    write("top-k", "Top-k filtering", NG, ["top_k_filter"], "generation", 1,
          [H + "test_top_k_filter_keeps_exactly_the_k_largest"],
          ["If top_k=1 leaves no token, or ties with the k-th value are dropped, the comparison with the k-th value "
           "is the wrong one.",
           "Find each row's k-th largest value and set every logit smaller than it to -inf; the k-th itself and its "
           "ties stay.",
           "k may be larger than the vocabulary: clamp it first."]),
    write("top-p", "Top-p (nucleus) filtering", NG, ["top_p_filter"], "generation", 2,
          [H + "test_top_p_filter_keeps_the_smallest_nucleus"],
          ["If a small p removes the most likely token, or a large p keeps too few, look at which end of the sorted "
           "probabilities you cut.",
           "Sort the probabilities, take their running sum, and drop the unlikely tail whose total is at most 1 - p; "
           "the most likely token always stays.",
           "The decision is made in sorted order: put it back into vocabulary order before masking."]),
    write("sample-loop", "The generation loop with the cache", NG, ["_sample"], "generation", 3,
          [H + "test_greedy_generation_with_the_cache_picks_the_argmax_of_a_full_forward",
           H + "test_generation_stops_each_row_at_eos_and_pads_after_it",
           G + "test_sampling_draws_from_softmax_of_the_filtered_logits_over_temperature",
           H + "test_batched_left_padded_generation_equals_one_prompt_at_a_time"],
          ["If greedy generation differs from the argmax of a full forward from the second new token on, the cache, "
           "the mask or the positions fall out of step.",
           "The first step feeds the whole prompt; later steps feed only the new token, with the cache the step "
           "gave back. Make the mask and the positions once, for every slot: new tokens are real tokens, and their "
           "positions continue each row's own count.",
           "options.step gives the logits and the cache; the processors (temperature, top-k and top-p among them) "
           "turn the logits into scores; sample with the options' generator (or take the argmax); a row that has "
           "finished gets the pad token from then on."]),
    write("beam-search", "Beam search with the cache", NG, ["_beam_search"], "generation", 3,
          [H + "test_beam_search_with_the_cache_equals_textbook_beam_search", R + "test_beam_search_equals_reference"],
          ["Beams that come out as copies of each other mean every beam expanded at the first step; results that "
           "differ from recomputing each beam mean the cache did not follow its beam.",
           "Score each (beam, token) continuation as the beam's score plus the token's log-probability, and rank all "
           "the beams of a prompt together, keeping twice as many as beams in case some finish.",
           "At the first step only one beam may expand (they all hold the same prompt); after choosing, reorder the "
           "cache, the mask and the positions by the surviving beams; finished ones go to _BeamHypotheses."]),
    write("prune-indices", "Which channels survive when heads are pruned", NG, ["find_pruneable_heads_and_indices"],
          "pruning", 2,
          [P + "test_pruning_heads_equals_masking_them", P + "test_pruning_in_steps_equals_pruning_at_once"],
          ["If pruning in two steps differs from pruning at once, earlier pruning was forgotten.",
           "Make a grid of ones, a row per head still here and a column per channel of a head; zero the rows of the "
           "heads to prune; the kept channels are where it is one.",
           "Head numbers are the original model's: after earlier pruning a head sits one row further up for each "
           "smaller head already gone."]),
    write("prune-heads", "Pruning heads: cutting Conv1D layers", NG,
          ["prune_attention_heads", "prune_conv1d_layer"], "pruning", 2,
          [P + "test_pruning_heads_equals_masking_them", P + "test_pruning_in_steps_equals_pruning_at_once",
           P + "test_pruning_shrinks_shapes_and_twice_is_a_noop"],
          ["If the first pruning works but the second does not, a width of the original model was used.",
           "c_attn holds queries, keys and values side by side, each split_size wide: keep the same channels in each "
           "third. c_proj loses input rows and keeps its bias; c_attn loses output columns and their bias entries.",
           "Afterwards update num_heads, split_size and pruned_heads, so that the next pruning starts from the new "
           "widths."]),
    write("safetensors-header", "Reading a safetensors header, trusting nothing", NG, ["read_safetensors_header"],
          "files", 2,
          [S + "test_save_then_load_round_trips_any_collection_of_shapes", S + "test_any_truncation_is_a_checkpoint_error",
           S + "test_empty_and_tiny_files_are_checkpoint_errors", S + "test_offsets_outside_the_data_are_a_checkpoint_error",
           S + "test_overlapping_tensors_are_a_checkpoint_error", S + "test_a_dtype_that_is_not_a_string_is_a_checkpoint_error",
           S + "test_header_json_python_cannot_parse_is_a_checkpoint_error"],
          ["The tests hand it truncated, lying and overlapping files: each must give a CheckpointError, never a "
           "struct, JSON or index error.",
           "The file starts with the header's length (8 bytes, little-endian), then that many bytes of JSON. Trust "
           "nothing: check the length against the file, that the JSON is an object, each dtype, shape and pair of "
           "offsets.",
           "Offsets count from the start of the data, must fit inside it and match the shape times the item size; to "
           "find overlaps, sort the spans and compare neighbours."]),
    write("lr-schedule", "The learning-rate schedule: warmup, then a cosine", NG, ["learning_rate"], "training", 1,
          [T + "test_schedule_warms_up_then_follows_a_cosine_down_to_a_tenth"],
          ["If the first step learns nothing, or the last steps learn nothing, look at where the warmup starts and "
           "where the cosine ends.",
           "Two factors multiply the peak rate: a linear warmup that reaches 1 after warmup_steps (step 0 already "
           "gets its share), and a cosine that goes from 1 down to one tenth over the run."]),
    write("adamw-groups", "AdamW with weight decay on matrices only", NG, ["configure_optimizer"], "training", 1,
          [T + "test_weight_decay_goes_to_matrices_only_and_each_parameter_once"],
          ["If biases or layer norms decay, or a parameter appears twice, the groups are built wrongly.",
           "Two groups: matrices (two or more dimensions) with weight decay, the rest without; each parameter once, "
           "a tied matrix too; AdamW's betas are (0.9, 0.95)."]),
    write("train-step", "One optimiser step over micro-batches", NG, ["train_step"], "training", 3,
          [T + "test_micro_batches_with_accumulation_equal_one_bigger_batch", G + "test_train_step_clips_the_gradient_norm",
           G + "test_each_train_step_starts_from_zero_gradients"],
          ["If k micro-batches differ from one batch k times larger, each micro-batch was normalised on its own "
           "instead of by the whole batch's number of targets.",
           "Sum each micro-batch's loss, divide by the targets (labels not -100) of the whole batch, backward "
           "through the scaler; then unscale, clip (0 means no clipping), step, update and clear the gradients.",
           "Return the total loss and the gradient norm measured before clipping."]),
    write("sliding-windows", "The windows of a sliding-window evaluation", NG, ["sliding_windows"], "training", 2,
          [G + "test_sliding_windows_score_every_token_once",
           T + "test_eval_perplexity_matches_a_hand_computed_sliding_window"],
          ["If some tokens are scored twice or never, the windows' scored ranges overlap or leave gaps.",
           "Windows begin at multiples of the stride and hold up to context tokens; each scores from where the "
           "previous one stopped (never its own first token); stop once a window reaches the end."]),
    write("sliding-loss", "Perplexity with a sliding window", NG, ["sliding_window_loss"], "training", 2,
          [T + "test_eval_perplexity_matches_a_hand_computed_sliding_window"],
          ["If perplexity is far too high, the logits and the targets are one position out of step.",
           "Run the body on each window; only the scored tokens count, each predicted by the position before it; sum "
           "the cross-entropy and count the targets."]),
    write("stream-decoder", "Streaming tokens as text, multi-byte characters split across tokens", NG,
          ["StreamDecoder.__call__", "StreamDecoder.flush"], "text", 2,
          [G + "test_stream_decoder_equals_decode_for_any_text"],
          ["If emoji and accented text show U+FFFD, a token's bytes ended inside a character and were decoded on "
           "their own.",
           "Feed each token's bytes to the incremental UTF-8 decoder kept in self.utf8: it holds back an unfinished "
           "character until its last bytes arrive; flush tells it that the text has ended."]),
    # --- imagegpt.py: write --------------------------------------------------------------------------------
    write("igpt-layernorm", "ImageGPT's layer norm: an RMS norm", IG, ["ImageGPTLayerNorm.forward"], "pixels", 1,
          [I + "test_layer_norm_divides_by_root_mean_square_without_centring",
           IR + "test_every_head_matches_reference_with_realistic_weights"],
          ["If the outputs have zero mean, the mean was subtracted: ImageGPT's norm does not do that.",
           "Divide by the square root of (the mean square over the last axis plus eps), then multiply by the weight; "
           "there is no bias."]),
    write("quick-gelu", "quick_gelu", IG, ["quick_gelu"], "pixels", 1, [IR + "test_activations_equal_reference"],
          ["If your curve equals SiLU, the sigmoid's argument is not scaled.",
           "A sigmoid stands in for the normal CDF: x times the sigmoid of x scaled by the docstring's constant."]),
    write("nearest-colour", "The nearest palette colour of each pixel", IG, ["nearest_colour"], "pixels", 2,
          [IP + "test_quantise_picks_the_nearest_colour", IP + "test_nearest_colour_works_in_chunks",
           IR + "test_quantise_equals_reference_colour_quantize"],
          ["If pixels go to colours that are not the nearest, a term of the expanded distance is wrong.",
           "The squared distance expands into |x|^2 - 2 x.c + |c|^2: all pixels against all colours is then one "
           "matrix product; take the smallest along the colours.",
           "Work in float64 and in chunks of `chunk` pixels; an empty input gives an empty LongTensor."]),
    write("dequantise", "Colour tokens back to pixels", IG, ["dequantise"], "pixels", 1,
          [G + "test_dequantise_rounds_each_colour_to_the_nearest_byte", IP + "test_bad_palettes_and_tokens_are_refused",
           IP + "test_dequantise_then_quantise_returns_the_tokens_for_any_palette"],
          ["If colours sometimes come out one shade too dark, values were truncated instead of rounded.",
           "Check the palette and the tokens first; each colour in [-1, 1] maps to a byte by scaling to [0, 255] and "
           "rounding; index with the tokens and shape the result as square images."]),
    write("paeth", "PNG's Paeth predictor", IG, ["_paeth"], "pixels", 1,
          [G + "test_paeth_breaks_ties_left_then_above_then_upper_left", IP + "test_png_reader_undoes_every_filter_type"],
          ["If only a few pixels of some PNGs are wrong, the tie-break is wrong.",
           "Predict p = left + above - upper left, and return whichever of the three is nearest to p; ties go to "
           "left, then above, then upper left."]),
    write("png-filter", "Undoing a PNG row filter", IG, ["_unfilter_row"], "pixels", 2,
          [G + "test_png_filters_undo_any_random_image", IP + "test_png_reader_undoes_every_filter_type"],
          ["If the second pixel of each row goes wrong, or colour images but not grey ones, the left neighbour is "
           "the wrong byte.",
           "Each byte is the stored byte plus a prediction, mod 256; the left neighbour is one pixel (bpp bytes) "
           "back, 0 before the row starts; Average and Paeth use bytes already rebuilt, so they go byte by byte."]),
    write("kmeans-step", "One round of k-means", IG, ["kmeans_step"], "pixels", 2,
          [G + "test_kmeans_step_moves_centres_to_means_and_empty_ones_to_the_worst_pixels",
           IP + "test_kmeans_with_more_colours_than_the_images_hold_has_no_stray_colours"],
          ["If the palette has colours that no pixel uses, empty centres were left where they were.",
           "Assign each pixel to its nearest centre, move each centre to its pixels' mean (sums and counts per "
           "centre); an empty centre goes to the pixel worst served by its OLD centre."]),
    # --- convert_tf.py: write ------------------------------------------------------------------------------
    write("varint", "Protobuf varints", TF, ["read_varint"], "tensorflow", 1,
          [G + "test_read_varint_decodes_what_a_textbook_encoder_wrote", G + "test_read_varint_known_bytes_and_errors",
           C + "test_reader_returns_exactly_what_tensorflow_wrote"],
          ["If numbers up to 127 are right but bigger ones are not, the groups are shifted by the wrong amount.",
           "Each byte carries 7 bits, the lowest group first, and its high bit says that another byte follows; "
           "running out of bytes, or more than 10 of them, is a CheckpointError."]),
    write("proto-fields", "Protobuf fields by wire type", TF, ["proto_fields"], "tensorflow", 2,
          [G + "test_proto_fields_reads_every_wire_type", C + "test_reader_returns_exactly_what_tensorflow_wrote"],
          ["If messages with fixed-width fields go wrong, the sizes of wire types 1 and 5 are mixed up.",
           "Each field starts with a varint key: the field number in its high bits, the wire type in its low 3; type "
           "0 is a varint, 1 eight bytes, 5 four bytes, 2 a length and then that many bytes. Anything else, or "
           "running past the end, is a CheckpointError."]),
    write("block-entries", "An SSTable block's prefix-compressed keys", TF, ["block_entries"], "tensorflow", 2,
          [G + "test_block_entries_undo_prefix_compression", C + "test_reader_returns_exactly_what_tensorflow_wrote",
           C + "test_index_of_several_blocks_and_checkpoint_of_several_shards_are_walked"],
          ["If the names after the first in a block are garbled, the prefix compression is undone wrongly.",
           "The block ends with the restart offsets and their count (4 bytes each); each entry holds three varints "
           "(shared, unshared, value length); its key is the previous key's first `shared` bytes plus the unshared "
           "bytes."]),
    write("mask-crc", "Masked CRC32C", TF, ["mask_crc"], "tensorflow", 1,
          [G + "test_mask_crc_is_leveldbs_rotation_plus_constant", C + "test_reader_returns_exactly_what_tensorflow_wrote"],
          ["If every block fails its CRC check, the rotation or the constant is wrong.",
           "Rotate the 32-bit CRC right by 15 bits, then add LevelDB's constant (in the docstring), all mod 2^32."]),
    write("crc-bytes", "CRC32C, one byte at a time", TF, ["crc32c"], "tensorflow", 1,
          [C + "test_crc32c_matches_the_standard_check_value", C + "test_fast_crc32c_equals_the_textbook_loop",
           C + "test_reader_returns_exactly_what_tensorflow_wrote"],
          ["If the standard check value (of b'123456789') is wrong, look at the starting and final values, then at "
           "the table lookup.",
           "Start from all ones; for each byte, XOR it into the register's low byte, look that up in CRC_TABLE and "
           "XOR the entry with the register shifted right by 8; invert at the end."]),
]

# --- Planted bugs ------------------------------------------------------------------------------------------------

EXERCISES += [
    bug("bug-cache-mask", "Cached tokens see the future (or not their past)", NG, "GPT2Attention.explicit_attention",
        "self.bias[:, :, K - T : K, :K]", "self.bias[:, :, :T, :K]", "attention", 2,
        [P + "test_one_forward_equals_prefill_plus_cached_steps", R + "test_incremental_decoding_with_cache_matches_reference"],
        ["Outputs with a cache differ from one forward over the whole sequence, in the explicit core only.",
         "With P cached tokens, query i sits at position P + i, not i."]),
    bug("bug-sdpa-cache-mask", "The fused core's mask with a cache", NG, "GPT2Attention.sdpa_attention",
        "self.bias[:, :, K - T : K, :K]", "self.bias[:, :, :T, :K]", "attention", 2,
        [P + "test_one_forward_equals_prefill_plus_cached_steps", P + "test_attention_cores_agree"],
        ["Prefill and then several tokens at once with the cache goes wrong; one token at a time is fine.",
         "Which rows of the (n_positions, n_positions) causal matrix belong to the new queries?"]),
    bug("bug-missing-scale", "A missing scale", NG, "GPT2Attention.explicit_attention",
        "k.transpose(-1, -2)) * self.score_scale()", "k.transpose(-1, -2))", "attention", 1,
        [P + "test_attention_cores_agree", R + "test_left_padding_and_head_mask_match_reference"],
        ["The explicit core and the fused core disagree.", "Look at what multiplies q @ k^T."]),
    bug("bug-upcast-scale", "The fp32 upcast path forgets the scale", NG, "GPT2Attention.explicit_attention",
        "q.float() * self.score_scale()", "q.float()", "attention", 1,
        [P + "test_attention_cores_agree", REFERENCE_HEADS],
        ["Only models with reorder_and_upcast_attn=True go wrong.", "Which factor does the upcast path apply first?"]),
    bug("bug-inverse-layer-scale", "Per-layer scaling replaces the head-size scaling", NG, "GPT2Attention.score_scale",
        "scale /= float(self.layer_idx + 1)", "scale = 1.0 / float(self.layer_idx + 1)", "attention", 1,
        [REFERENCE_HEADS, G + "test_score_scale_follows_both_config_flags"],
        ["Only models with scale_attn_by_inverse_layer_idx=True differ from the reference.",
         "The two flags' factors multiply."]),
    bug("bug-swapped-qkv", "A swapped split", NG, "GPT2Attention.forward",
        "query, key, value = self.c_attn(hidden_states).split", "key, query, value = self.c_attn(hidden_states).split",
        "attention", 1, [REFERENCE_HEADS],
        ["Every property still holds (masks, cache), yet pretrained weights give nonsense.",
         "In what order does c_attn's output hold q, k and v?"]),
    bug("bug-split-heads", "Heads split without a transpose", NG, "GPT2Attention.split_heads",
        ".view(B, T, -1, self.head_dim).transpose(1, 2)", ".view(B, -1, T, self.head_dim)", "attention", 2,
        [REFERENCE_HEADS, G + "test_split_and_merge_heads_move_each_heads_channels"],
        ["The shapes are right but each head mixes channels of different tokens.",
         "A view only reinterprets memory: (B, T, nh, hs) then a transpose is not the same as (B, nh, T, hs)."]),
    bug("bug-merge-heads", "Heads merged without a transpose", NG, "GPT2Attention.merge_heads",
        "y.transpose(1, 2).contiguous().view(B, T, self.split_size)", "y.contiguous().view(B, T, self.split_size)",
        "attention", 2, [REFERENCE_HEADS, G + "test_split_and_merge_heads_move_each_heads_channels"],
        ["merge(split(x)) is not x.", "Undo split_heads' transpose before the view."]),
    bug("bug-cache-order", "The cache concatenated the wrong way round", NG, "GPT2Attention.forward",
        "torch.cat((past_key, k), dim=-2)", "torch.cat((k, past_key), dim=-2)", "attention", 2,
        [P + "test_one_forward_equals_prefill_plus_cached_steps", R + "test_incremental_decoding_with_cache_matches_reference"],
        ["Generation with the cache drifts from one forward over the whole text.",
         "Keys must stay in position order: the causal mask assumes key j is position j."]),
    bug("bug-padding-axis", "The padding mask masks queries, not keys", NG, "padding_mask_to_additive",
        "mask[:, None, None, :]", "mask[:, None, :, None]", "attention", 2,
        [P + "test_padded_positions_never_change_real_outputs", R + "test_left_padding_and_head_mask_match_reference"],
        ["Real tokens' outputs change when padding changes.", "Scores are (B, nh, queries, keys)."]),
    bug("bug-cache-positions", "Positions restart at 0 with a cache", NG, "GPT2Model.embed",
        "torch.arange(past_length, past_length + T", "torch.arange(0, T", "model", 1,
        [P + "test_one_forward_equals_prefill_plus_cached_steps", R + "test_incremental_decoding_with_cache_matches_reference"],
        ["Cached generation differs from a full forward from the second step on.",
         "Where do the new tokens sit when P tokens are already cached?"]),
    bug("bug-mask-positions", "Left-padded prompts start at position 1", NG, "_positions_from_mask",
        "cumsum(-1) - 1", "cumsum(-1)", "model", 1,
        [H + "test_batched_left_padded_generation_equals_one_prompt_at_a_time",
         R + "test_greedy_generation_equals_reference_token_for_token"],
        ["Batched, padded generation differs from one prompt at a time.", "What is the first real token's position?"]),
    bug("bug-activation", "The config's activation is ignored", NG, "GPT2MLP.__init__",
        "ACTIVATIONS[config.activation_function]", "gelu_new", "blocks", 1, [REFERENCE_HEADS],
        ["GPT-2 itself is fine; models with another activation_function are not.",
         "Which config field names the activation?"]),
    bug("bug-n-inner", "The MLP's width ignores n_inner", NG, "GPT2Block.__init__",
        "config.n_inner if config.n_inner is not None else 4 * config.n_embd", "4 * config.n_embd", "model", 1,
        [REFERENCE_HEADS],
        ["Default models are fine; a checkpoint with another MLP width does not load.",
         "4 * n_embd is only the default."]),
    bug("bug-block-norm", "The MLP reads the wrong layer norm", NG, "GPT2Block.forward",
        "self.mlp(self.ln_2(hidden_states))", "self.mlp(self.ln_1(hidden_states))", "model", 1, [REFERENCE_HEADS],
        ["Every property holds, but trained weights give different logits.",
         "Each sub-block has its own layer norm."]),
    bug("bug-ln-epsilon", "The final layer norm ignores layer_norm_epsilon", NG, "GPT2Model.__init__",
        "nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)", "nn.LayerNorm(config.n_embd)", "model", 2,
        [G + "test_non_default_layer_norm_epsilon_matches_reference"],
        ["Only a model with a non-default layer_norm_epsilon differs, and only slightly.",
         "Look at the norms the body itself builds."]),
    bug("bug-loss-shift", "The loss predicts the current token", NG, "shifted_lm_loss",
        "labels[..., 1:]", "labels[..., :-1]", "model", 1, [H + "test_lm_loss_equals_hand_computation"],
        ["The loss goes to zero far too easily in training.", "Position t's logits predict label t + 1."]),
    bug("bug-top-k", "Top-k keeps one token too few", NG, "top_k_filter",
        "logits < kth_largest", "logits <= kth_largest", "generation", 1,
        [H + "test_top_k_filter_keeps_exactly_the_k_largest"],
        ["top_k=1 leaves no token at all.", "The k-th largest value itself must stay."]),
    bug("bug-top-p", "Top-p protects the wrong token", NG, "top_p_filter",
        "remove_sorted[..., -min_keep:] = False", "remove_sorted[..., :min_keep] = False", "generation", 2,
        [H + "test_top_p_filter_keeps_the_smallest_nucleus"],
        ["A small p can remove every token but the least likely.", "Sorted ascending: where is the most likely?"]),
    bug("bug-temperature", "Temperature multiplies", NG, "logits_processors",
        "scores / config.temperature", "scores * config.temperature", "generation", 1,
        [G + "test_sampling_draws_from_softmax_of_the_filtered_logits_over_temperature"],
        ["Low temperatures give wilder text, high ones greedier.",
         "A low temperature must sharpen the distribution: what should it do to the logits?"]),
    bug("bug-softmax-axis", "Sampling probabilities along the wrong axis", NG, "_sample",
        "F.softmax(scores, dim=-1)", "F.softmax(scores, dim=0)", "generation", 2,
        [G + "test_sampling_draws_from_softmax_of_the_filtered_logits_over_temperature"],
        ["Sampled tokens are allowed ones, but their frequencies are wrong.", "logits are (B, V)."]),
    bug("bug-cache-mask-zero", "Generated tokens are masked out", NG, "_sample",
        "(0, S - T0), value=1)", "(0, S - T0), value=0)", "generation", 1,
        [H + "test_greedy_generation_with_the_cache_picks_the_argmax_of_a_full_forward"],
        ["Greedy generation differs from the argmax of a full forward from the second new token.",
         "What should the mask say about the tokens just generated?"]),
    bug("bug-eos-restart", "A finished sequence starts again", NG, "_sample",
        "unfinished &= ~torch.isin(next_tokens, eos)", "unfinished = ~torch.isin(next_tokens, eos)", "generation", 2,
        [H + "test_generation_stops_each_row_at_eos_and_pads_after_it"],
        ["With a pad token other than eos, text appears after the end.", "Once finished, always finished."]),
    bug("bug-beam-start", "All beams start alive", NG, "_beam_search",
        "beam_scores[:, 1:] = -1e9", "beam_scores[:, 1:] = 0.0", "generation", 2,
        [H + "test_beam_search_with_the_cache_equals_textbook_beam_search", R + "test_beam_search_equals_reference"],
        ["Beams come out as copies of each other.", "At the first step every beam holds the same prompt."]),
    bug("bug-beam-cache", "Beam search forgets to reorder the cache", NG, "_beam_search",
        "past = model._reorder_cache(out.past_key_values, beam_idx)", "past = out.past_key_values", "generation", 2,
        [H + "test_beam_search_with_the_cache_equals_textbook_beam_search"],
        ["Beam search with the cache differs from recomputing each beam from scratch.",
         "When beams are reordered, everything that belongs to a beam must follow it."]),
    bug("bug-length-penalty", "The length penalty is ignored", NG, "_BeamHypotheses.add",
        "sum_logprobs / (generated_len ** self.length_penalty)", "sum_logprobs / generated_len", "generation", 1,
        [G + "test_beam_hypotheses_score_by_length_penalty", R + "test_beam_search_equals_reference"],
        ["length_penalty=1 is fine; other values are not.",
         "The penalty is an exponent, on the length."]),
    bug("bug-prune-offset", "Pruning forgets earlier pruning", NG, "find_pruneable_heads_and_indices",
        "head = head - sum(1 for h in already_pruned if h < head)", "head = head", "pruning", 2,
        [P + "test_pruning_in_steps_equals_pruning_at_once"],
        ["Pruning in two steps differs from pruning at once.", "Head numbers are the original model's."]),
    bug("bug-prune-width", "Pruning indexes q, k and v with the original width", NG, "prune_attention_heads",
        "index + i * attn.split_size", "index + i * attn.embed_dim", "pruning", 2,
        [P + "test_pruning_in_steps_equals_pruning_at_once"],
        ["The first pruning is fine, the second is not.", "How wide is each of q, k, v after a pruning?"]),
    bug("bug-safetensors-offsets", "Offsets checked against the file, not the data", NG, "read_safetensors_header",
        "offsets[1] <= data_size", "offsets[1] <= size", "files", 2,
        [S + "test_offsets_outside_the_data_are_a_checkpoint_error", S + "test_any_truncation_is_a_checkpoint_error"],
        ["A lying header can make the reader go past the end of the file.",
         "Offsets count from the start of the data section."]),
    bug("bug-safetensors-overlap", "Overlaps checked on unsorted spans", NG, "read_safetensors_header",
        "    spans.sort()\n", "", "files", 2,
        [S + "test_overlapping_tensors_are_a_checkpoint_error", G + "test_safetensors_tensors_listed_out_of_offset_order_load"],
        ["Some files whose tensors overlap are accepted.", "Comparing neighbours only works in order."]),
    bug("bug-warmup", "Warmup starts at zero", NG, "learning_rate",
        "(step + 1) / warmup_steps", "step / warmup_steps", "training", 1,
        [T + "test_schedule_warms_up_then_follows_a_cosine_down_to_a_tenth"],
        ["The first step does not move the model.", "Step 0 is the first step."]),
    bug("bug-cosine-floor", "The cosine decays to zero", NG, "learning_rate",
        "0.1 + 0.9 * 0.5 * (1.0 + math.cos", "0.5 * (1.0 + math.cos", "training", 1,
        [T + "test_schedule_warms_up_then_follows_a_cosine_down_to_a_tenth"],
        ["The last steps learn nothing.", "Where should the cosine end?"]),
    bug("bug-decay-everything", "Weight decay on biases and layer norms", NG, "configure_optimizer",
        '"weight_decay": 0.0}', '"weight_decay": weight_decay}', "training", 1,
        [T + "test_weight_decay_goes_to_matrices_only_and_each_parameter_once"],
        ["The loss still falls.", "Which parameters should decay?"]),
    bug("bug-grad-clip", "Gradient clipping is off", NG, "train_step",
        'grad_clip if grad_clip > 0 else float("inf")', 'float("inf")', "training", 1,
        [G + "test_train_step_clips_the_gradient_norm"],
        ["The loss still falls, but one bad batch can wreck the run.", "What does --grad-clip do?"]),
    bug("bug-micro-batch-mean", "Micro-batches averaged instead of summed", NG, "train_step",
        'reduction="sum") / n_targets', 'reduction="mean") / len(micro_batches)', "training", 2,
        [T + "test_micro_batches_with_accumulation_equal_one_bigger_batch"],
        ["k micro-batches no longer equal one batch k times larger.",
         "A micro-batch with few targets counts as much as one with many."]),
    bug("bug-zero-grad", "Gradients are never cleared", NG, "train_step",
        "    optimizer.zero_grad(set_to_none=True)\n", "", "training", 1,
        [G + "test_each_train_step_starts_from_zero_gradients"],
        ["The loss still falls at first.", "Where do gradients go after the step?"]),
    bug("bug-window-overlap", "Sliding windows score tokens twice", NG, "sliding_windows",
        "scored_up_to = end", "scored_up_to = end - 1", "training", 2,
        [G + "test_sliding_windows_score_every_token_once",
         T + "test_eval_perplexity_matches_a_hand_computed_sliding_window"],
        ["The counted tokens add up to more than the text has.", "Each token is scored by one window only."]),
    bug("bug-window-logits", "Sliding-window logits one position late", NG, "sliding_window_loss",
        "hidden[:, offset - 1: length - 1]", "hidden[:, offset: length]", "training", 2,
        [T + "test_eval_perplexity_matches_a_hand_computed_sliding_window"],
        ["Perplexity is far too high.", "Position t predicts token t + 1."]),
    bug("bug-stream-bytes", "Streaming decodes each token on its own", NG, "StreamDecoder.__call__",
        "self.utf8.decode(get_tokenizer().decode_single_token_bytes(int(token)))",
        'get_tokenizer().decode_single_token_bytes(int(token)).decode("utf-8", errors="replace")', "text", 2,
        [G + "test_stream_decoder_equals_decode_for_any_text"],
        ["English is fine; emoji and accented text show U+FFFD.", "A character's bytes can span two tokens."]),
    # --- imagegpt.py ---------------------------------------------------------------------------------------
    bug("bug-igpt-ln-centred", "ImageGPT's norm subtracts the mean", IG, "ImageGPTLayerNorm.forward",
        "torch.mean(torch.square(x), dim=-1, keepdim=True)", "torch.var(x, dim=-1, unbiased=False, keepdim=True)",
        "pixels", 1, [I + "test_layer_norm_divides_by_root_mean_square_without_centring"],
        ["The outputs have zero mean: that is not what ImageGPT does.", "Root mean square, not standard deviation."]),
    bug("bug-quick-gelu", "quick_gelu's constant", IG, "quick_gelu", "1.702 * x", "x", "pixels", 1,
        [IR + "test_activations_equal_reference"],
        ["This is SiLU, not quick GELU.", "The sigmoid's argument is scaled."]),
    bug("bug-nearest-colour", "The distance formula", IG, "nearest_colour",
        "- 2 * x @ palette.T", "- x @ palette.T", "pixels", 1, [IP + "test_quantise_picks_the_nearest_colour"],
        ["Pixels go to colours that are not the nearest.", "Expand |x - c|^2."]),
    bug("bug-quantise-order", "Pixels read column by column", IG, "quantise",
        "normalise(torch.stack(image_list))", "normalise(torch.stack(image_list).transpose(1, 2))", "pixels", 2,
        [IR + "test_quantise_equals_reference_colour_quantize", IP + "test_quantise_picks_the_nearest_colour"],
        ["Square images come out mirrored along the diagonal.", "Raster order: row by row."]),
    bug("bug-dequantise-round", "Colours truncated instead of rounded", IG, "dequantise",
        "torch.round(127.5 * (palette.to(torch.float64) + 1.0))", "(127.5 * (palette.to(torch.float64) + 1.0))",
        "pixels", 1, [G + "test_dequantise_rounds_each_colour_to_the_nearest_byte"],
        ["Colours come out one shade too dark, sometimes.", "Casting to uint8 truncates."]),
    bug("bug-paeth-ties", "Paeth's tie-break", IG, "_paeth", "if pa <= pb and pa <= pc:", "if pa < pb and pa < pc:",
        "pixels", 2, [G + "test_paeth_breaks_ties_left_then_above_then_upper_left", G + "test_png_filters_undo_any_random_image"],
        ["A few pixels of some PNGs come out wrong.", "On a tie, the left byte wins."]),
    bug("bug-average-left", "The Average filter's first pixel", IG, "_unfilter_row",
        "a = out[i - bpp] if i >= bpp else 0", "a = out[i - bpp] if i > bpp else 0", "pixels", 2,
        [G + "test_png_filters_undo_any_random_image"],
        ["The second pixel of each Average row is wrong.", "Which is the first byte with a left neighbour?"]),
    bug("bug-sub-channels", "The Sub filter mixes channels", IG, "_unfilter_row",
        "x.reshape(-1, bpp).cumsum(axis=0, dtype=np.uint64)", "x.cumsum(dtype=np.uint64)", "pixels", 2,
        [G + "test_png_filters_undo_any_random_image", IP + "test_png_reader_undoes_every_filter_type"],
        ["Grey images are fine, colour ones are not.", "The left neighbour is bpp bytes back."]),
    bug("bug-kmeans-empty", "Empty k-means centres stay where they were", IG, "kmeans_step",
        "new_centres[empty[: len(farthest)]] = pixels[farthest]",
        "new_centres[empty[: len(farthest)]] = centres[empty[: len(farthest)]]", "pixels", 2,
        [G + "test_kmeans_step_moves_centres_to_means_and_empty_ones_to_the_worst_pixels"],
        ["Palettes have colours no pixel uses.", "Where should a centre with no pixels go?"]),
    # --- convert_tf.py -------------------------------------------------------------------------------------
    bug("bug-varint-shift", "Varint groups shifted by 8", TF, "read_varint", "range(0, 70, 7)", "range(0, 70, 8)",
        "tensorflow", 1, [G + "test_read_varint_decodes_what_a_textbook_encoder_wrote"],
        ["Numbers up to 127 are fine.", "How many bits does each byte carry?"]),
    bug("bug-fixed-sizes", "Fixed-size fields swapped", TF, "proto_fields",
        "size = 8 if wire == 1 else 4", "size = 4 if wire == 1 else 8", "tensorflow", 1,
        [G + "test_proto_fields_reads_every_wire_type"],
        ["Messages with fixed32 or fixed64 fields go wrong.", "Wire type 1 is 64-bit."]),
    bug("bug-shared-key", "Prefix compression undone with the wrong length", TF, "block_entries",
        "key = key[:shared] +", "key = key[:unshared] +", "tensorflow", 2,
        [G + "test_block_entries_undo_prefix_compression", C + "test_reader_returns_exactly_what_tensorflow_wrote"],
        ["Variable names come out garbled after the first in a block.", "How many bytes are shared with the key before?"]),
    bug("bug-mask-rotation", "The CRC mask rotates the wrong way", TF, "mask_crc",
        "(crc >> 15) | (crc << 17)", "(crc >> 17) | (crc << 15)", "tensorflow", 1,
        [G + "test_mask_crc_is_leveldbs_rotation_plus_constant", C + "test_reader_returns_exactly_what_tensorflow_wrote"],
        ["Every block fails its CRC check.",
         "Which way, and by how many bits, does LevelDB rotate?"]),
    bug("bug-int64-boundary", "int64 sign at the boundary", TF, "as_int64", "value >= 1 << 63", "value > 1 << 63",
        "tensorflow", 1, [G + "test_as_int64_is_twos_complement_at_the_boundaries"],
        ["Only -2^63 comes out wrong.", "Which values have the sign bit set?"]),
    # --- generate(): the reference's logits processors (nanogpt2.py; imagegpt.py shares them) ----------------
    write("repetition-penalty", "Repetition penalty: every token already seen, made less likely once", NG,
          ["repetition_penalty"], "generate-processors", 1,
          [GP + "test_repetition_penalty_moves_each_token_of_the_row_once",
           GP + "test_each_steps_scores_are_the_logits_through_the_processors_with_the_tokens_so_far"],
          ["If a token seen twice is pushed down twice as far, you penalise occurrences, not tokens: the reference "
           "moves each token of the row once.",
           "Find which tokens each row holds (a (B, V) mask; tokens_present makes one), then change only those scores.",
           "Dividing a negative score by a penalty above 1 raises it: negative scores are multiplied instead."]),
    write("no-repeat-ngram", "No repeated n-grams", NG, ["no_repeat_ngram"], "generate-processors", 2,
          [GP + "test_no_repeat_ngram_forbids_exactly_the_tokens_that_repeat_an_ngram",
           GP + "test_with_no_repeat_ngram_size_no_ngram_occurs_twice"],
          ["If an n-gram still repeats, look at which token you forbid: the one that would complete an n-gram the "
           "row already holds.",
           "Every n-gram of the row whose first n - 1 tokens equal the row's last n - 1 tokens forbids its last "
           "token; a sliding window over the row gives them all without a loop.",
           "A row shorter than n cannot repeat anything yet; forbidden scores become -inf, not a large negative."]),
    write("bad-words", "Bad words are never completed", NG, ["ban_bad_words"], "generate-processors", 2,
          [GP + "test_bad_words_forbid_the_tokens_that_would_complete_a_word",
           GP + "test_with_bad_words_no_bad_word_is_ever_completed"],
          ["If one-token bad words are blocked but longer ones still appear, the rows' endings are not compared "
           "with the right part of the word.",
           "A word is completed by the next token: ban its last token in the rows that already end with the rest "
           "of it (a one-token word: in every row).",
           "Compare the row's last tokens, not its first; gather every banned token in one (B, V) mask, then set "
           "those scores to -inf once."]),
    write("min-length", "A minimum length: no eos too early", NG, ["forbid_eos"], "generate-processors", 1,
          [GP + "test_forbid_eos_until_the_minimum_length",
           GP + "test_with_a_minimum_length_eos_never_comes_before_it"],
          ["If eos comes one token early or late, check which length you compare: the whole sequence so far, "
           "prompt included.",
           "Below the minimum, every eos id's score is -inf; from the minimum on, the scores are untouched.",
           "Several eos ids may be given, and some may lie beyond the scores' width: forbid only those that exist."]),
    bug("bug-repetition-sign", "The repetition penalty rewards negative scores", NG, "repetition_penalty",
        "torch.where(scores < 0, scores * penalty, scores / penalty)",
        "torch.where(scores < 0, scores / penalty, scores * penalty)", "generate-processors", 1,
        [GP + "test_repetition_penalty_moves_each_token_of_the_row_once"],
        ["With penalty 1.2, repeated text gets more likely, not less.",
         "Which way does multiplying move a negative score? And a positive one?"]),
    bug("bug-ngram-late", "n-gram blocking starts one token late", NG, "no_repeat_ngram",
        "    if L < n:\n        return scores", "    if L <= n:\n        return scores", "generate-processors", 2,
        [GP + "test_no_repeat_ngram_forbids_exactly_the_tokens_that_repeat_an_ngram"],
        ["A row exactly n tokens long may repeat its first n-gram.",
         "With L tokens, what is the earliest L at which the next token can complete an n-gram seen before?"]),
    bug("bug-bad-words-start", "Bad words matched at the start of the row", NG, "ban_bad_words",
        "input_ids[:, input_ids.size(1) - len(prefix):]", "input_ids[:, :len(prefix)]", "generate-processors", 1,
        [GP + "test_bad_words_forbid_the_tokens_that_would_complete_a_word",
         GP + "test_with_bad_words_no_bad_word_is_ever_completed"],
        ["One-token bad words are never generated; longer ones sometimes are.",
         "The word is completed by the NEXT token: what must the row end with?"]),
    bug("bug-min-length-late", "The minimum length holds one token too long", NG, "forbid_eos",
        "if input_ids.size(1) >= min_length:", "if input_ids.size(1) > min_length:", "generate-processors", 1,
        [GP + "test_forbid_eos_until_the_minimum_length",
         GR + "test_greedy_with_each_option_equals_reference"],
        ["With min_new_tokens=m, the earliest eos comes after m + 1 new tokens.",
         "min_length counts the whole sequence: when it is already that long, eos is allowed."]),
]

# --- The tokenizer: GPT-2's byte-level BPE written out (nanogpt2.py, Part III), graded against tiktoken ------------

PIECES = TK + "test_the_pieces_of_gpt2s_pattern"
PIECES_PROPERTY = TK + "test_split_into_pieces_cuts_text_where_tiktokens_own_pattern_cuts_it"
ENCODER = TK + "test_written_out_encoder_gives_tiktokens_tokens_on_arbitrary_text"
MERGE_LOOP = TK + "test_merge_loop_merges_the_lowest_rank_first_and_the_leftmost_of_equals"
MERGE_PROPERTY = TK + "test_merge_piece_gives_tiktokens_tokens_for_every_piece"
ROUND = TK + "test_each_round_merges_the_most_frequent_pair_and_counts_the_pairs_again"
TIES = TK + "test_ties_go_to_the_pair_whose_bytes_sort_first"
TRAINING = TK + "test_incremental_training_gives_the_merges_of_the_definition"

EXERCISES += [
    write("pre-tokenizer", "GPT-2's pre-tokenizer: text cut into the pieces that merges never cross", NG,
          ["gpt2_split_pattern", "split_into_pieces"], "tokenizer", 2,
          [PIECES, PIECES_PROPERTY, TK + "test_every_kind_of_character_is_cut_where_tiktoken_cuts_it", ENCODER],
          ["The failing case shows the text, your pieces and GPT-2's (tiktoken's): look at whether it goes wrong at "
           "a run of whitespace, a contraction in capitals, or a letter or digit of another script.",
           "GPT-2's pattern is in the comment above WHITESPACE; Python's re has no \\p{L}, but character_classes "
           "gives a letter, a number and 'anything else but whitespace' as re expressions, and WHITESPACE lists the "
           "whitespace. At each position the first alternative that matches wins; findall gives the pieces in order.",
           "Common slips: the optional space before a word, number or symbol is the plain space only; a run of "
           "whitespace before a word leaves its last character to that word (a negative lookahead), unless the run "
           "ends the text; Python's own \\s also takes \\x1c to \\x1f, which GPT-2's does not."]),
    write("merge-loop", "One piece's merge loop: the lowest rank first", NG, ["merge_piece"], "tokenizer", 2,
          [MERGE_LOOP, MERGE_PROPERTY, ENCODER],
          ["If words that are one token whole come out right but other pieces do not, look at which pair you merge "
           "first; if only pieces with a repeated pair go wrong, at which of two equal pairs.",
           "Start from one part per byte. Each round, find the adjacent pair whose joined bytes have the lowest rank "
           "in ranks and join it; stop when no adjacent pair's bytes are in ranks. The ids are the final parts' "
           "ranks.",
           "A lower rank is an earlier merge, so it goes first; of equal pairs the leftmost; after a merge only the "
           "pairs on either side of the new part change, so there is no need to look at every pair again."]),
    write("merge-pair", "One merge in one word: every occurrence of a pair becomes the new token", NG,
          ["merge_pair"], "tokenizer", 1,
          [TK + "test_merge_pair_replaces_each_occurrence_from_left_to_right", TRAINING],
          ["If three equal tokens in a row become two new tokens, or the list you were given has changed, overlapping "
           "pairs were both merged, or the word was edited in place.",
           "Walk the word from the left into a new list: where the pair starts, add the new id and step past both "
           "tokens; anywhere else, copy one token and step one."]),
    write("bpe-round", "One round of BPE training: the most frequent pair, merged, the counts kept up to date", NG,
          ["PairCounts.best_pair", "PairCounts.merge"], "tokenizer", 3,
          [ROUND, TIES, TRAINING, TK + "test_the_text_endoftext_separates_documents_and_is_never_learnt",
           TK + "test_a_trained_bpe_encodes_as_tiktoken_encodes_with_its_merges"],
          ["The first test names the round where best_pair chose another pair than the definition, or the pair "
           "counts that were wrong after a merge: is it a tie, a pair seen exactly twice, or a neighbour of the "
           "merged pair?",
           "best_pair: the heap's smallest entry is the next pair, unless its count is not the pair's count now "
           "(then it is stale: drop it); a pair must occur at least twice. merge: the new token's bytes (or the "
           "token they already are), then in each word that holds the pair, its old pairs taken off the counts and "
           "its new pairs added.",
           "Common slips: a changed count with no new heap entry, so best_pair never sees it; a word in `where` "
           "that no longer holds the pair (an earlier merge took it); counts that fall to zero left in pairs."]),
    bug("bug-rank-max", "The merge loop merges the highest rank first", NG, "merge_piece",
        "best = min(pair_ranks)", "best = max(pair_ranks)", "tokenizer", 1,
        [MERGE_LOOP, MERGE_PROPERTY, ENCODER],
        ["Words that are one token whole are right; other pieces stay as single bytes or split oddly.",
         "A rank is a merge's place in the list: which merge was learnt first?"]),
    bug("bug-merge-rightmost", "Of two equal pairs, the rightmost merges first", NG, "merge_piece",
        "i = pair_ranks.index(best)", "i = len(pair_ranks) - 1 - pair_ranks[::-1].index(best)", "tokenizer", 2,
        [MERGE_LOOP, MERGE_PROPERTY],
        ["Only pieces that hold the same pair twice, like 'bbb', go wrong.",
         "Two pairs of the same rank: which one does GPT-2 merge?"]),
    bug("bug-space-lookahead", "A run of spaces keeps its last space", NG, "gpt2_split_pattern",
        "|[{space}]+(?![^{space}])", "", "tokenizer", 1, [PIECES, PIECES_PROPERTY],
        ["A run of spaces before a word stays whole: the word should get the run's last space.",
         "Which alternative of the pattern lets a run of whitespace stop one character early, and when?"]),
    bug("bug-space-joins", "Any whitespace joins the word after it", NG, "gpt2_split_pattern",
        "| ?{letter}+", "|[{space}]?{letter}+", "tokenizer", 2, [PIECES, PIECES_PROPERTY],
        ["A tab, a newline or an ideographic space before a word becomes part of the word's piece.",
         "Which characters may stand before a word in its piece?"]),
    bug("bug-number-space", "The space before a number is cut off", NG, "gpt2_split_pattern",
        "| ?{number}+", "|{number}+", "tokenizer", 1, [PIECES, PIECES_PROPERTY],
        ["' 2019' gives two pieces, a space and '2019'.", "Letters, numbers and symbols each take an optional space."]),
    bug("bug-tie-ids", "Training breaks ties by token id", NG, "PairCounts.heap_entry",
        "self.tokens[pair[0]], self.tokens[pair[1]], pair)", "pair[0], pair[1], pair)",
        "tokenizer", 2, [ROUND, TIES],
        ["'ab ab ba ba' learns 'ab' first; the definition learns ' b' first.",
         "Ties go to the pair whose bytes sort first: are the tokens' ids in the order of their bytes?"]),
    bug("bug-pair-twice", "Pairs that occur exactly twice are never merged", NG, "PairCounts.best_pair",
        ">= 2 else None", "> 2 else None", "tokenizer", 1, [ROUND, TIES, TRAINING],
        ["Training stops too early: a text in which every pair occurs twice learns nothing.",
         "How often must a pair occur to be merged?"]),
    bug("bug-forgotten-pairs", "A merge never takes the old pairs off the counts", NG, "PairCounts.merge",
        "            for old in zip(word, word[1:]):\n                changed[old] -= count\n", "", "tokenizer", 2,
        [ROUND, TRAINING],
        ["After the first merge, the merged pair still counts as often as before.",
         "A merge takes pairs out of a word as well as putting new ones in."]),
    bug("bug-merge-overlap", "merge_pair merges overlapping pairs", NG, "merge_pair", "i += 2", "i += 1",
        "tokenizer", 1, [TK + "test_merge_pair_replaces_each_occurrence_from_left_to_right", TRAINING],
        ["Three equal tokens in a row, merged as a pair of two, give two new tokens.",
         "After a merge, where does the next comparison start?"]),
]

# --- Drill slots: per-student bug hunts ----------------------------------------------------------------------------
# `start CHAPTER-bugs --student NAME` plants, for each slot of the chapter, ONE of its variants, drawn from a hash
# of the name, so that neighbours hunt different bugs. The title is what the student is told (the variant's own
# title would give it away); the gradebook has one column per slot. Bugs in no slot are planted for everyone.

SLOTS = {
    "attention-scale": dict(title="Attention's scores are scaled wrongly somewhere",
                            variants=["bug-missing-scale", "bug-upcast-scale", "bug-inverse-layer-scale"]),
    "attention-cache": dict(title="Attention with the key/value cache goes wrong somewhere",
                            variants=["bug-cache-mask", "bug-sdpa-cache-mask", "bug-cache-order"]),
    "attention-heads": dict(title="Queries, keys, values or heads are mixed up somewhere",
                            variants=["bug-swapped-qkv", "bug-split-heads", "bug-merge-heads"]),
    "model-layers": dict(title="The block or the body builds or uses a layer wrongly",
                         variants=["bug-n-inner", "bug-block-norm", "bug-ln-epsilon"]),
    "model-positions": dict(title="Position ids go wrong somewhere",
                            variants=["bug-cache-positions", "bug-mask-positions"]),
    "sampling": dict(title="Sampling the next token goes wrong somewhere",
                     variants=["bug-top-k", "bug-top-p", "bug-temperature", "bug-softmax-axis"]),
    "generation-loop": dict(title="The generation loop goes wrong after the first token",
                            variants=["bug-cache-mask-zero", "bug-eos-restart"]),
    "beams": dict(title="Beam search goes wrong somewhere",
                        variants=["bug-beam-start", "bug-beam-cache", "bug-length-penalty"]),
    "pruning-steps": dict(title="Pruning heads goes wrong somewhere", variants=["bug-prune-offset", "bug-prune-width"]),
    "safetensors": dict(title="The safetensors reader trusts a header it should not",
                        variants=["bug-safetensors-offsets", "bug-safetensors-overlap"]),
    "schedule-optimiser": dict(title="The schedule or the optimiser's set-up is wrong",
                               variants=["bug-warmup", "bug-cosine-floor", "bug-decay-everything"]),
    "optimiser-step": dict(title="One training step goes wrong somewhere",
                       variants=["bug-grad-clip", "bug-micro-batch-mean", "bug-zero-grad"]),
    "sliding-window": dict(title="Sliding-window evaluation counts wrongly",
                           variants=["bug-window-overlap", "bug-window-logits"]),
    "colours": dict(title="Colours go wrong between pixels and tokens",
                    variants=["bug-nearest-colour", "bug-quantise-order", "bug-dequantise-round", "bug-kmeans-empty"]),
    "png-filters": dict(title="Some PNG files are read wrongly",
                        variants=["bug-paeth-ties", "bug-average-left", "bug-sub-channels"]),
    "igpt-layers": dict(title="ImageGPT's norm or activation is not ImageGPT's",
                        variants=["bug-igpt-ln-centred", "bug-quick-gelu"]),
    "protobuf": dict(title="Protobuf is decoded wrongly somewhere",
                     variants=["bug-varint-shift", "bug-fixed-sizes", "bug-int64-boundary"]),
    "sstable": dict(title="The SSTable index or its checksums are read wrongly",
                    variants=["bug-shared-key", "bug-mask-rotation"]),
    "pieces": dict(title="Text is cut into pieces wrongly somewhere",
                   variants=["bug-space-lookahead", "bug-space-joins", "bug-number-space"]),
    "merge-order": dict(title="A piece's bytes are merged in the wrong order",
                        variants=["bug-rank-max", "bug-merge-rightmost"]),
    "bpe-training": dict(title="BPE training learns the wrong merges somewhere",
                         variants=["bug-tie-ids", "bug-pair-twice", "bug-forgotten-pairs", "bug-merge-overlap"]),
}

for _slot, _entry in SLOTS.items():
    for _ex in EXERCISES:
        if _ex["id"] in _entry["variants"]:
            _ex["slot"] = _slot
