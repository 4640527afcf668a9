"""The copies between nanogpt2.py and imagegpt.py, checked, and the one diff worth reading.

imagegpt.py never imports nanogpt2.py, so a reader sees everything in one file. The price is that the two
files share many functions by copy. Hugging Face keeps such copies honest with `# Copied from` comments and
a checker (utils/check_copies.py); this is ours, in plain Python:

- every function, method, class body and module-level constant that both files define (after the
  renaming below) is either SHARED, and then identical apart from docstrings and comments, or listed in
  DIFFERENT with the reason it differs;
- tests/test_copies.py fails when a shared copy drifts, when a new common name is not declared, or when a
  declared difference has disappeared.

The same comparison prints how imagegpt.py's model differs from nanogpt2.py's:

    python tests/copies.py              # the model (Parts I and II): the real architectural differences
    python tests/copies.py --all        # every declared difference, tools included, in full
    python tests/copies.py --list       # each common name: same or different, with line numbers
    python tests/copies.py --name NAME  # one name's whole diff

Only the standard library is used: the files are parsed with `ast`, never imported.
"""

import argparse
import ast
import copy
import difflib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# nanogpt2.py's names -> imagegpt.py's, applied in this order to whole identifiers (and identifier prefixes
# such as GPT2Config, init_gpt2_weights): "NANOGPT2_CACHE" stays as it is, since both files share the cache.
RENAMES = [
    ("GPT2LMHeadModel", "ImageGPTForCausalImageModeling"),
    ("GPT2", "ImageGPT"),
    ("gpt2", "imagegpt"),
    ("nn.LayerNorm", "ImageGPTLayerNorm"),  # the one architectural swap that is a renaming: see ImageGPTLayerNorm
]

# Differences by design: the name (nanogpt2.py's) -> why it differs, and whether it is part of the model
# (printed by default) or of the tools around it (printed with --all).
MODEL, TOOLS = "model", "tools"
DIFFERENT = {
    'GPT2Config': ('other defaults (a 512 + 1 token vocabulary, 32 x 32 positions, quick_gelu, untied head); no sequence-summary, bos/eos/pad or classifier_dropout fields (ImageGPT has no such heads or tokens)', MODEL),
    'init_gpt2_weights': ('ImageGPTLayerNorm has a gain and no bias, so there is no bias to zero', MODEL),
    'GPT2Model.__init__': ('the body carries the palette (colours <-> tokens) instead of a device map: the reference has no parallelize() for ImageGPT', MODEL),
    'GPT2Model.forward': ('no device map to follow between blocks (see GPT2Model.__init__)', MODEL),
    'GPT2LMHeadModel.__init__': ('the head predicts vocab_size - 1 colours (never SOS) with its own, untied matrix; '
                                 'generation starts from SOS and completes the image by default', MODEL),
    'GPT2LMHeadModel.forward': ('labels are colours, one fewer than the vocabulary; no device map to follow', MODEL),
    'GPT2LMHeadModel.generate': ('ImageGPT also takes num_samples: each prompt repeated, whatever the decoding', MODEL),
    'HEAD_CLASSES': ("each file's own heads", MODEL),
    'validate_config': ("the fields each config has (see GPT2Config); ImageGPT's head cannot be tied", MODEL),
    'PRESETS': ("OpenAI's released sizes of each model", MODEL),
    'config_from_preset': ("ImageGPT's presets may be named without their imagegpt- prefix", MODEL),
    'config_to_dict': ('only GPT-2 has classifier_dropout to leave out when unset', MODEL),
    'HUB_NAMES': ("each model's released checkpoints", TOOLS),
    'resolve_checkpoint': ('an ImageGPT download also fetches its palette (preprocessor_config.json)', TOOLS),
    'OTHER_HEAD_PREFIXES': ("each file's heads", TOOLS),
    'match_state_dict': ('only GPT-2 ties its head to the embedding, so only it may leave lm_head.weight out', TOOLS),
    'from_pretrained': ('ImageGPT also loads the palette saved beside the weights', TOOLS),
    'save_pretrained': ('GPT-2 stores its tied head once; ImageGPT also saves its palette', TOOLS),
    'CommonDefaults': ("each trainer's own options (gradient accumulation for GPT-2; samples and position init for ImageGPT)", TOOLS),
    'TRAIN_DEFAULTS': ("each trainer's own tasks", TOOLS),
    'Run': ("GPT-2's trainer runs under torchrun (rank, world size, autocast, GradScaler); ImageGPT's is one process", TOOLS),
    'Run.say': ("only GPT-2's trainer has other processes to keep quiet", TOOLS),
    'train': ('different tasks (addition and text; shapes and images, with probes and sample grids)', TOOLS),
    'train_command': ("GPT-2's starts the processes torchrun made", TOOLS),
    'fill_defaults': ("each trainer's own options", TOOLS),
    'prepare_task': ("each trainer's own tasks", TOOLS),
    'build_model': ('a GPT-2 sized for its tokenizer; an ImageGPT sized for its palette and image', TOOLS),
    'train_step': ("GPT-2's accumulates micro-batches under autocast and DDP; ImageGPT's is one batch in fp32", TOOLS),
    'validation_loss': ('as train_step', TOOLS),
    'RESUME_MAY_CHANGE': ("each trainer's own options", TOOLS),
    'RESUME_MAY_EXTEND': ("each trainer's own options", TOOLS),
    'save_checkpoint': ("ImageGPT's also stores the palette; GPT-2's the GradScaler and every process's RNG", TOOLS),
    'load_checkpoint': ("GPT-2's notes options a resumed run ignores, from the first process only", TOOLS),
    'TrainingLog': ('the columns: tokens/s or pixels/s', TOOLS),
    'TrainingLog.write': ('the columns: tokens/s or pixels/s', TOOLS),
    'describe_run': ('what each run says about its task and model', TOOLS),
    'TrainingProgress.line': ('tokens/s or pixels/s', TOOLS),
    'report_run': ('what each run reports at the end (worked sums; sample grids and probes)', TOOLS),
    'CLI_EXAMPLES': ("each command line's examples", TOOLS),
    'TRAIN_EXAMPLES': ("each command line's examples", TOOLS),
    'build_parser': ("each command line's commands", TOOLS),
    'add_train_parser': ("each trainer's options", TOOLS),
    'sample_command': ('text or images', TOOLS),
    'main': ("each command line's commands", TOOLS),
}

# convert_tf.py writes safetensors and downloads OpenAI's files with copies of these (no renaming).
SHARED_WITH_CONVERT_TF = ["safetensors_header", "_progress", "_if_range_value", "download", "_finish_download",
                          "file_sha256", "_process_alive", "_fsync", "MAX_HEADER_BYTES", "MIN_FREE_BYTES",
                          "MAX_JSON_BYTES", "promised_size", "_safetensors_size", "download_problem"]

# Everything else both files define must be identical (tests/test_copies.py checks that this list and DIFFERENT
# cover every name the two files share; `python tests/copies.py --list` shows each with its line numbers).
SHARED = [
    'GPT2Config.__post_init__', 'GPT2Config.validate', 'GPT2Config.from_preset', 'GPT2Config.from_dict',
    'GPT2Config.to_dict', 'GPT2Config.from_json_file', 'GPT2Config.to_json_file', 'Conv1D', 'Conv1D.__init__',
    'Conv1D.forward', 'gelu_new_formula', 'gelu_new', 'gelu_fast', 'quick_gelu', 'ACTIVATIONS', 'causal_mask',
    'GPT2Attention', 'GPT2Attention.__init__', 'GPT2Attention.prune_heads', 'GPT2Attention.score_scale',
    'GPT2Attention.split_heads', 'GPT2Attention.merge_heads', 'GPT2Attention.forward',
    'GPT2Attention.explicit_attention', 'GPT2Attention.sdpa_attention', 'StaticCache', 'StaticCache.__init__',
    'StaticCache.length', 'StaticCache.batch_size', 'StaticCache.update', 'StaticCache.to_tuple',
    'padding_mask_to_additive', 'layer_cache', 'GPT2MLP', 'GPT2MLP.__init__', 'GPT2MLP.forward', 'GPT2Block',
    'GPT2Block.__init__', 'GPT2Block.forward', 'GPT2Model', 'GPT2Model.dtype', 'GPT2Model.embed',
    'GPT2Model.get_input_embeddings', 'GPT2Model.set_input_embeddings', 'GPT2Model.prune_heads',
    'GPT2Model.gradient_checkpointing_enable', 'GPT2Model.gradient_checkpointing_disable', 'shifted_lm_loss',
    'GPT2LMHeadModel', 'GPT2LMHeadModel.get_output_embeddings', 'GPT2LMHeadModel.prune_heads',
    'GPT2LMHeadModel._reorder_cache', '_positions_from_mask', 'GenerationOptions', 'generate', 'decode_step',
    '_sample', 'GenerateDecoderOnlyOutput', 'GenerateBeamDecoderOnlyOutput', 'GenerationConfig',
    'GenerationConfig.from_model_config', 'GenerationConfig.from_dict', 'GenerationConfig.to_dict',
    'GenerationConfig.from_json_file', 'GenerationConfig.to_json_file', 'UNSUPPORTED_GENERATION_FIELDS',
    'MIN_TEMPERATURE', '_check_generation_config', 'prepare_generation', '_token_source', '_check_pad_token',
    'logits_processors', 'apply_processors',
    'tokens_present', 'repetition_penalty', 'no_repeat_ngram', 'ban_bad_words', 'forbid_eos', 'reorder_cache',
    '_BeamHypotheses', '_BeamHypotheses.__init__', '_BeamHypotheses.add', '_BeamHypotheses.is_done', '_beam_search',
    '_check_generate_args', '_check_left_padding', '_check_compile_args', 'top_k_filter', 'top_p_filter',
    'next_token_logits', 'fast_decode_step', 'FixedShapeCache', 'FixedShapeCache.__init__',
    'FixedShapeCache.update', 'FixedShapeCache.fix_shapes', 'FixedShapeCache.next_slot', 'FixedShapeCache.advance',
    'decode_one_token', '_COMPILED_STEPS', 'compiled_decode_step', 'compile_settings', 'mark_static',
    'fixed_shape_step', 'infer_problem_type', 'classification_loss', 'ModelOutput', 'ModelOutput.to_tuple',
    'ModelOutput.__getitem__', 'BaseModelOutputWithPastAndCrossAttentions', 'CausalLMOutputWithCrossAttentions',
    'SequenceClassifierOutputWithPast', 'find_pruneable_heads_and_indices', 'prune_conv1d_layer',
    'prune_attention_heads', 'prune_model_heads', 'expand_head_mask', 'to_device', 'checkpointed_block',
    '_shape_error', '_check_indices', 'check_token_ids', '_input_shape', '_check_cache_tuples',
    'check_model_inputs', 'check_classification_labels',
    'PROBLEM_TYPES', 'FIELD_KINDS', 'OPTIONAL_KINDS', 'INT64_BOUND', 'FLOAT_MAX', 'shown', 'is_kind', 'is_index',
    'check_field_types', 'check_label_names', 'pruned_heads_from_json', 'config_from_dict', 'config_from_json_file',
    'read_json_object', 'config_to_json_file', 'MEMORY_LIMIT_VARIABLE', 'PYTHON_BYTES_PER_LAYER', 'memory_limit',
    'check_memory', 'model_bytes', 'check_model_size', 'check_generation_memory', 'SAFETENSORS_DTYPES', 'TORCH_TO_SAFETENSORS',
    'MAX_HEADER_BYTES', 'CheckpointError', 'PLAIN_FILE_NAME', 'file_named_in', 'regular_file_in', 'shard_names',
    '_process_alive', 'remove_stale_temporaries', 'WriteError', '_fsync', '_atomic_path', '_atomic_path.__init__',
    '_atomic_path.__enter__', '_atomic_path.__exit__', '_write_atomically', 'write_json', 'check_output_file',
    'read_safetensors_header',
    'load_safetensors', 'safetensors_header', 'save_safetensors', 'cache_dir', 'hub_url', '_progress',
    '_if_range_value', 'download', '_finish_download', 'MIN_FREE_BYTES', 'MAX_JSON_BYTES', 'promised_size',
    '_safetensors_size', 'download_problem', 'file_sha256', '_download_if_present', 'load_state_dict_files',
    'load_bin', 'IGNORED_SUFFIXES', 'check_finite', 'parse_dtype', 'read_generation_config', 'without_random_init',
    'separate_shared', 'finish_loading', 'FineTuneDefaults', 'configure_optimizer', 'learning_rate',
    'resolve_device', 'ONE_THREAD_BELOW', 'set_cpu_threads', 'read_training_state', 'resuming_from',
    'check_saved_options', 'checkpoint_not_saved', 'diverged_error', 'save_training_state', 'listed_digests',
    'TrainingLog.__init__', 'TrainingLog.close', 'RUN_FILES', 'check_run_folder', 'RunLock', 'RunLock.__init__',
    'RunLock.holder', 'RunLock.release', 'RunFolder', 'RunFolder.__init__', 'RunFolder.__enter__',
    'RunFolder.__exit__', 'StopRequest', 'StopRequest.__init__', 'StopRequest.handle', 'StopRequest.restore',
    'format_time', 'TrainingProgress', 'TrainingProgress.__init__', 'MAX_SEED', 'integer_option', 'float_option',
    'default_help', 'PNG_SIGNATURE', '_png_chunk', 'write_png',
]


def rename(text: str) -> str:
    """nanogpt2.py's code, with imagegpt.py's names."""
    for old, new in RENAMES:
        text = re.sub(rf"(?<![A-Za-z0-9]){old}", new, text)
    return text


def _drop_docstrings(node):
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and n.body:
            first = n.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                n.body = n.body[1:] or [ast.Pass()]
    return node


def units(source, only=None) -> dict:
    """Every comparable piece of a file (a path, or a tree from ast.parse): name -> (first line, code without
    docstrings or comments). Functions and methods by qualified name (GPT2Attention.forward); a class by its
    name, meaning its body without the methods (fields, class attributes, bases, decorators); module-level
    assignments by target. `only`: a set of names, to unparse just those."""
    if isinstance(source, ast.AST):
        tree = source
    else:
        with open(source, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    found = {}

    def keep(name, line, make):
        if only is None or name in only:
            found[name] = (line, ast.unparse(make()))

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                keep(prefix + node.name, node.lineno, lambda: _drop_docstrings(copy.deepcopy(node)))
            elif isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
                keep(prefix + node.name, node.lineno, lambda: _drop_docstrings(ast.ClassDef(
                    name=node.name, bases=node.bases, keywords=node.keywords,
                    body=[copy.deepcopy(n) for n in node.body if n not in methods] or [ast.Pass()],
                    decorator_list=node.decorator_list, type_params=[])))
                visit(methods, prefix + node.name + ".")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and not prefix:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        keep(t.id, node.lineno, lambda: node)

    visit(tree.body, "")
    return found


def compare(a_path=os.path.join(ROOT, "nanogpt2.py"), b_path=os.path.join(ROOT, "imagegpt.py")):
    """name -> (line in a, line in b, a's code renamed, b's code) for every name both files define."""
    a, b = units(a_path), units(b_path)
    common = {}
    for name, (line, code) in a.items():
        other = rename(name)
        if other in b:
            common[name] = (line, b[other][0], rename(code), b[other][1])
    return common


def unified(name, entry, context=1, limit=None) -> str:
    """The diff of one common name, nanogpt2.py's renamed code against imagegpt.py's; at most `limit` lines."""
    a_line, b_line, a_code, b_code = entry
    lines = list(difflib.unified_diff(a_code.splitlines(), b_code.splitlines(), f"nanogpt2.py:{a_line} {name}",
                                      f"imagegpt.py:{b_line} {rename(name)}", n=context, lineterm=""))
    if limit is not None and len(lines) > limit:
        lines = lines[:limit] + [f"... {len(lines) - limit} more lines: python tests/copies.py --name {name}"]
    return "\n".join(lines)


def part_three_line(path) -> int:
    """The line where Part III (files and tools) starts: what comes before it is the model."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("# Part III"):
                return number
    return 10**9


def model_report(common, limit=10) -> str:
    """How imagegpt.py's model differs from nanogpt2.py's: what only it has, and each declared difference."""
    b_path = os.path.join(ROOT, "imagegpt.py")
    end = part_three_line(b_path)
    ours = {rename(n) for n in units(os.path.join(ROOT, "nanogpt2.py"))}
    only = [(line, n) for n, (line, _) in units(b_path).items() if n not in ours and line < end and "." not in n]
    out = ["How imagegpt.py's model (Parts I and II) differs from nanogpt2.py's, after renaming "
           + ", ".join(f"{a} -> {b}" for a, b in RENAMES) + ".",
           f"{sum(e[2] == e[3] for e in common.values())} functions, methods, classes and constants are the same in "
           "both (python tests/copies.py --list names them).", "",
           "Only in imagegpt.py: " + ", ".join(f"{n} (line {line})" for line, n in sorted(only)) + ".", ""]
    for name, (reason, part) in DIFFERENT.items():
        if part == MODEL and name in common:
            out += [f"# {name}: {reason}", unified(name, common[name], context=0, limit=limit), ""]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every declared difference, tools included")
    parser.add_argument("--list", action="store_true", help="each common name: shared or different")
    parser.add_argument("--name", help="the whole diff of one common name (nanogpt2.py's name)")
    args = parser.parse_args(argv)
    common = compare()
    drifted = [n for n, e in common.items() if n not in DIFFERENT and e[2] != e[3]]
    if args.list:
        for name, (a_line, b_line, a_code, b_code) in common.items():
            state = "same" if a_code == b_code else "different" if name in DIFFERENT else "DRIFTED"
            print(f"{state:9} nanogpt2.py:{a_line:<5} imagegpt.py:{b_line:<5} {name}")
    elif args.name:
        if args.name not in common:
            parser.error(f"{args.name} is not defined in both files")
        print(unified(args.name, common[args.name]) or f"{args.name}: the same in both files")
    elif args.all:
        for name, (reason, _) in DIFFERENT.items():
            if name in common:
                print(f"# {name}: {reason}\n{unified(name, common[name])}\n")
    else:
        print(model_report(common))
    for name in drifted:
        print(f"# {name}: DRIFTED (meant to be shared)\n{unified(name, common[name])}\n", file=sys.stderr)
    return 1 if drifted else 0


if __name__ == "__main__":
    sys.exit(main())
