"""nanogpt2.py: all of GPT-2 in one readable PyTorch file.

GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners") is a stack of
pre-norm transformer blocks over token + position embeddings, trained to predict the next token.
This file writes every part of the Hugging Face transformers GPT-2 family out in full, with the same
class names, config fields, state_dict keys, forward arguments and output names, so that a Hugging
Face checkpoint loads with `load_state_dict(strict=True)` and gives the same numbers.

Map of the file (read it top to bottom; Part I is the model a first reading needs, in the order the
data flows through it):
  Part I: the model
    Config                                GPT2Config, with Hugging Face's names and defaults
    Conv1D and activations                Conv1D (a linear layer stored (in, out)), GELU and the others
    Attention                             GPT2Attention: causal mask, KV cache, two attention cores
    MLP and block                         GPT2MLP, GPT2Block (pre-norm)
    The body                              GPT2Model: embeddings, blocks, final layer norm
    The LM head                           GPT2LMHeadModel: next-token logits, the shifted loss
    Sampling                              generate (the reference's arguments): greedy or sampling, the cache
  Part II: what the reference also has
    The other heads                       double heads, sequence/token classification, question answering
    Output dataclasses                    what each forward returns (out.logits, out[0], to_tuple())
    Generation options and processors     GenerationConfig; repetition penalty, n-grams, bad words, min length,
                                          top-k, top-p
    Beam search                           generate(num_beams=...)
    Pruning heads                         prune_heads, as the reference does it
    Head masks, device maps, gradient checkpointing
                                          parallelize(), head_mask, checkpointing helpers
    Input checks                          every shape and range checked before any work
    Faster decoding                       generate()'s default step (the head as (W @ h^T)^T); compile=True:
                                          a fixed-shape cache and step, torch.compile'd
    Config validation and serialisation   validate, presets, config.json read/write
  Part III: files and tools
    Loading and saving                    safetensors by hand, the hub, from_pretrained, save_pretrained
    Tokenizer                             GPT-2's byte-pair encoding: tiktoken's, and the same written out (the
                                          pattern, the merge loop, vocab.bpe); BPE training on your own text
    Training and evaluation               the addition task, text files (memory-mapped), AdamW, warmup +
                                          cosine, gradient accumulation, mixed precision, DDP, exact resume;
                                          sliding-window perplexity
    Command line                          python nanogpt2.py train | sample --prompt "..." | eval | inspect |
                                          tokenize (--help)

Shapes in comments: B batch, T new tokens, P cached (past) tokens, S encoder tokens, C = n_embd, nh = number
of heads, hs = head size (C // nh), V = vocab size, K = keys a query sees (P + T, or S for cross-attention).

Run the tests with `python -m pytest -q` (see README.md).
"""

# What the model (Parts I and II) needs. Part III, files and tools, imports its own modules (urllib,
# hashlib, argparse, numpy, ...) where it begins.
import contextlib
import json
import math
import weakref
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# ==================================================================================================
# Part I: the model
#
# Config, Conv1D and activations, attention (with its cache and masks), MLP and block, the body, the
# LM head, sampling: everything a forward pass and generation run through, in the order data flows.
# What a class leaves to Part II comes last in it: one-line methods marked `# in Part II`.
# ==================================================================================================


# --- Config ---------------------------------------------------------------------------------------


@dataclass
class GPT2Config:
    """Every hyperparameter of a GPT-2 model, with Hugging Face's names and defaults (gpt2's, 124M),
    those of its base config class (num_labels, pad_token_id, ...) included. Keys of a config.json
    that this class does not know are kept in `extra` and written back unchanged."""

    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    n_positions: int = 1024  # longest sequence (learned position embeddings)
    n_embd: int = 768  # width C of the residual stream
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # The multiple-choice head of GPT2DoubleHeadsModel ("sequence summary").
    summary_type: str = "cls_index"
    summary_use_proj: bool = True
    summary_activation: Optional[str] = None
    summary_proj_to_labels: bool = True
    summary_first_dropout: float = 0.1
    summary_last_dropout: float = 0.0
    # Attention options.
    scale_attn_weights: bool = True  # divide scores by sqrt(hs)
    scale_attn_by_inverse_layer_idx: bool = False  # also divide by (layer index + 1), for stability
    reorder_and_upcast_attn: bool = False  # scores and softmax in fp32 even under autocast
    add_cross_attention: bool = False  # a cross-attention sub-block in each block (encoder-decoder)
    use_cache: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: Optional[int] = None
    # Heads.
    num_labels: int = 2
    problem_type: Optional[str] = None
    classifier_dropout: Optional[float] = None  # token classification; None: 0.1, as the reference
    tie_word_embeddings: bool = True
    # Heads removed by prune_heads, {layer: [head, ...]}: a saved pruned model rebuilds its shapes.
    pruned_heads: Dict[int, List[int]] = field(default_factory=dict)
    output_attentions: bool = False
    output_hidden_states: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    # Hugging Face's generic names for the same numbers.
    hidden_size = property(lambda self: self.n_embd)
    num_attention_heads = property(lambda self: self.n_head)
    num_hidden_layers = property(lambda self: self.n_layer)
    max_position_embeddings = property(lambda self: self.n_positions)

    # --- in Part II: validation, presets (the released sizes), config.json ------------------------
    def validate(self):  # raises ValueError naming the first bad field
        return validate_config(self)  # in Part II

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        return config_from_preset(cls, name, **overrides)  # in Part II

    @classmethod
    def from_dict(cls, config_dict: dict) -> "GPT2Config":  # unknown keys are kept in `extra`
        return config_from_dict(cls, config_dict)  # in Part II

    def to_dict(self) -> dict:
        return config_to_dict(self)  # in Part II

    @classmethod
    def from_json_file(cls, path) -> "GPT2Config":
        return config_from_json_file(cls, path)  # in Part II

    def to_json_file(self, path):  # atomically
        return config_to_json_file(self, path)  # in Part II


# --- Conv1D and activations -----------------------------------------------------------------------


class Conv1D(nn.Module):
    """A linear layer with its weight stored transposed, (in, out), as OpenAI's TensorFlow code did:
    the 1x1 convolution of the original code, which is just x @ W + b. The (in, out) layout is what
    lets OpenAI's and Hugging Face's checkpoints load unchanged."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf  # output features
        self.weight = nn.Parameter(torch.empty(nx, nf))  # (in, out), the transpose of nn.Linear's
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        """x (..., nx), any number of leading dimensions -> x @ weight + bias, (..., nf). weight is
        stored (nx, nf), so there is no transpose."""
        out_shape = x.shape[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)  # (N, in) @ (in, out)
        return x.view(out_shape)


def gelu_new_formula(x):
    """GPT-2's GELU, the tanh approximation OpenAI trained with, elementwise on any shape and dtype:
    0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))). The exact erf GELU changes a
    pretrained model's logits by ~1e-3, far more than the 1e-5 we match the reference to."""
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
    return 0.5 * x * (1.0 + torch.tanh(inner))


def gelu_new(x):
    """gelu_new_formula through PyTorch's fused kernel: the same function (a test checks they agree
    to fp32 rounding) in one pass over memory, where the formula takes about eight elementwise
    passes over a (B, T, 4C) tensor, each kept for the backward."""
    return F.gelu(x, approximate="tanh")


def gelu_fast(x):
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def quick_gelu(x):
    """x * sigmoid(1.702 x): the cheaper GELU approximation ImageGPT (and CLIP) use."""
    return x * torch.sigmoid(1.702 * x)


# Every activation a config may name, by its Hugging Face name.
ACTIVATIONS = {
    "gelu_new": gelu_new, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": gelu_fast, "gelu": F.gelu, "quick_gelu": quick_gelu,  # "gelu": the exact one, erf
    "relu": F.relu, "leaky_relu": F.leaky_relu, "silu": F.silu, "swish": F.silu, "mish": F.mish,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "linear": lambda x: x,
}


# --- Attention ------------------------------------------------------------------------------------


def causal_mask(n_positions: int, device=None) -> torch.Tensor:
    """(1, 1, n, n) of bool, True where query i may see key j (j <= i)."""
    causal = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.bool, device=device))
    return causal.view(1, 1, n_positions, n_positions)


class GPT2Attention(nn.Module):
    """Multi-head attention: causal self-attention, or (is_cross_attention=True) attention from the
    decoder's tokens to an encoder's outputs. Each token's query is compared with every visible key,
    and the softmax of the scores weights the values. Self-attention is causal: a token sees itself
    and the tokens before it, never after. Earlier tokens' keys and values can be passed back in
    (`layer_past`), so that one more token costs one token's work, not the whole sequence's."""

    def __init__(self, config: GPT2Config, is_cross_attention: bool = False,
                 layer_idx: Optional[int] = None):
        super().__init__()
        self.embed_dim = config.n_embd
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.split_size = self.embed_dim  # width of each of q, k, v (shrinks when heads are pruned)
        self.scale_attn_weights = config.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.is_cross_attention = is_cross_attention
        self.layer_idx = layer_idx
        if is_cross_attention:
            self.c_attn = Conv1D(2 * self.embed_dim, self.embed_dim)  # the encoder's keys, values
            self.q_attn = Conv1D(self.embed_dim, self.embed_dim)  # queries from the decoder
        else:
            self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)  # q, k and v in one matmul
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.pruned_heads = set()
        # bias[0, 0, i, j]: may query i see key j (j <= i)? Not saved: the same for every model.
        self.register_buffer("bias", causal_mask(config.n_positions), persistent=False)

    def score_scale(self) -> float:
        """What q @ k^T is multiplied by, a Python float: 1 / sqrt(head_dim) if scale_attn_weights
        (else 1), further divided by (layer_idx + 1) if scale_attn_by_inverse_layer_idx (layers
        count from 0). 1/sqrt(hs) keeps the scores' variance near 1 whatever the head size, so the
        softmax does not saturate; the per-layer factor steadies deep models in mixed precision."""
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer_idx + 1)
        return scale

    def split_heads(self, x):
        """(B, T, nh * hs) -> (B, nh, T, hs): head h owns channels h * hs .. (h + 1) * hs - 1 of
        each token (hs = head_dim), and the head axis comes before the token axis, so that every
        head attends on its own. nh is whatever the width allows (fewer after pruning)."""
        B, T, _ = x.size()
        return x.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, T, nh*hs) -> (B, nh, T, hs)

    def merge_heads(self, y):
        """The inverse of split_heads: (B, nh, T, hs) -> (B, T, nh * hs), contiguous."""
        B, _, T, _ = y.size()
        return y.transpose(1, 2).contiguous().view(B, T, self.split_size)  # (B, T, nh*hs)

    def forward(self, hidden_states, layer_past=None, attention_mask=None, head_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, use_cache=False,
                output_attentions=False):
        """One attention layer with the key/value cache: (output (B, T, C), present, weights).

        hidden_states (B, T, C): the new tokens. layer_past: the P earlier tokens' (key, value),
        each (B, nh, P, hs), a StaticCache, or None. attention_mask: additive (B, 1, 1, P + T) or
        None; head_mask: (B or 1, nh, 1, 1) of 0/1 or None. encoder_hidden_states (B, S, C), for
        cross-attention only (else ValueError), give the keys and values, encoder_attention_mask the
        mask. present, with use_cache: (k, v) of all P + T tokens, or the StaticCache; else None.
        weights (B, nh, T, K) come from the explicit core only, which runs for output_attentions,
        head_mask or reorder_and_upcast_attn.
        """
        B, T, C = hidden_states.size()
        if encoder_hidden_states is not None:
            if not self.is_cross_attention:
                raise ValueError("encoder_hidden_states were given to a self-attention layer")
            query = self.q_attn(hidden_states)  # (B, T, C)
            key_value = self.c_attn(encoder_hidden_states)  # (B, S, 2C)
            key, value = key_value.split(self.split_size, dim=2)  # (B, S, C) each
            attention_mask = encoder_attention_mask  # the encoder's padding; no causal mask
        else:  # q, k, v side by side: (B, T, C) each
            query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        q, k, v = self.split_heads(query), self.split_heads(key), self.split_heads(value)

        static = isinstance(layer_past, StaticCache)
        if static:  # write the new keys and values into the preallocated cache, read all P + T
            k, v = layer_past.update(self.layer_idx, k, v)  # (B, nh, P + T, hs)
        elif layer_past is not None:  # prepend the cached keys and values of the P earlier tokens
            past_key, past_value = layer_past
            k = torch.cat((past_key, k), dim=-2)  # (B, nh, P + T, hs)
            v = torch.cat((past_value, v), dim=-2)
        present = (layer_past if static else (k, v)) if use_cache else None

        # The explicit core when a caller wants the weights, masks heads or asks for the fp32 path;
        # otherwise PyTorch's fused kernel, which never materialises the (T, K) weights.
        if output_attentions or head_mask is not None or self.reorder_and_upcast_attn:
            y, weights = self.explicit_attention(q, k, v, attention_mask, head_mask)
        else:
            y, weights = self.sdpa_attention(q, k, v, attention_mask), None

        y = self.merge_heads(y)  # (B, nh, T, hs) -> (B, T, nh*hs)
        y = self.resid_dropout(self.c_proj(y))  # (B, T, C)
        return y, present, weights

    def explicit_attention(self, q, k, v, attention_mask=None, head_mask=None):
        """softmax(q k^T * score_scale() + masks) v, every step written out.

        q (B, nh, T, hs): the T new queries; k, v (B, nh, K, hs): all keys and values, the K - T
        cached ones first. Self-attention is causal: query i, at position K - T + i, sees the keys
        up to that position (self.bias); masked scores become the dtype's minimum, not -inf.
        Cross-attention has no causal mask. attention_mask (B, 1, 1, K), if given, is added. The
        softmax, in v's dtype, goes through attn_dropout, then head_mask ((..., nh, 1, 1) of 0/1),
        if given, multiplies it. reorder_and_upcast_attn: q scaled first, scores and softmax in
        float32, autocast off. Returns (output (B, nh, T, hs), weights (B, nh, T, K)).
        """
        if self.reorder_and_upcast_attn:
            # In fp16, q @ k^T of a deep model overflows: fp32 even under autocast, and the scale
            # goes in before the matmul ("reorder"), which keeps the products smaller too.
            with torch.autocast(q.device.type, enabled=False):  # scores (B, nh, T, K) in float32
                scores = torch.matmul(q.float() * self.score_scale(), k.float().transpose(-1, -2))
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.score_scale()  # (B, nh, T, K)

        if not self.is_cross_attention:
            # The new T queries are the last T of the P + T positions: query i sits at P + i.
            T, K = q.size(-2), k.size(-2)
            causal = self.bias[:, :, K - T : K, :K]  # (1, 1, T, K)
            scores = torch.where(causal, scores, torch.finfo(scores.dtype).min)
        if attention_mask is not None:
            scores = scores + attention_mask  # (B, 1, 1, K): padding keys go to the dtype's minimum

        weights = F.softmax(scores, dim=-1).type(v.dtype)  # back to v's dtype under mixed precision
        weights = self.attn_dropout(weights)
        if head_mask is not None:
            weights = weights * head_mask  # (.., nh, 1, 1): a masked head contributes nothing
        return torch.matmul(weights, v), weights  # (B, nh, T, K) @ (B, nh, K, hs) -> (B, nh, T, hs)

    def sdpa_attention(self, q, k, v, attention_mask=None):
        """The same maths through F.scaled_dot_product_attention (flash or memory-efficient kernels
        on GPUs). Returns the output (B, nh, T, hs) only."""
        T, K = q.size(-2), k.size(-2)
        dropout_p = self.attn_dropout.p if self.training else 0.0
        scale = self.score_scale()
        sdpa = F.scaled_dot_product_attention  # the fused kernel
        if attention_mask is not None:
            # The kernel wants the mask in q's dtype. Clamp first: float32's minimum is -inf in
            # bfloat16, and a row of -inf (a padding query) would softmax to NaN.
            attention_mask = attention_mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
        if self.is_cross_attention:
            return sdpa(q, k, v, attn_mask=attention_mask, dropout_p=dropout_p, scale=scale)
        if attention_mask is None and T == K:  # no cache, no padding: the kernel's own causal mask
            return sdpa(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
        if attention_mask is None and T == 1:  # one new token sees every cached one: no mask
            return sdpa(q, k, v, dropout_p=dropout_p, scale=scale)
        # With a cache (T < K) the causal mask is the bottom-right corner of the full one, which
        # is_causal (top-left) does not give: pass it in, padding added. Future keys get -inf,
        # padding keys the dtype's minimum: every row scores exactly as in the explicit core.
        causal = self.bias[:, :, K - T : K, :K]  # (1, 1, T, K)
        padding = attention_mask if attention_mask is not None else q.new_zeros(())
        mask = torch.where(causal, padding, float("-inf"))  # (B or 1, 1, T, K)
        return sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)

    # --- in Part II: pruning ---------------------------------------------------------------------
    def prune_heads(self, heads):  # whole heads removed from this layer's weights
        return prune_attention_heads(self, heads)  # in Part II


class StaticCache:
    """A key/value cache allocated once for a whole generation, and written in place.

    Per layer, keys and values (B, nh, max_length, hs), made at the layer's first write. T new
    tokens are written after the P filled positions and attention reads the P + T: one token's copy
    per step, where the reference's tuples grow by concatenation (all copied, every step). Pass
    StaticCache(max_length) as past_key_values; forward fills it and returns it. Inference only
    (torch.no_grad): writing in place into tensors autograd saved would break the backward pass.
    """

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.keys: Dict[Optional[int], torch.Tensor] = {}  # layer -> (B, nh, max_length, hs)
        self.values: Dict[Optional[int], torch.Tensor] = {}
        self.filled: Dict[Optional[int], int] = {}  # layer -> positions written so far

    @property
    def length(self) -> int:
        """P: the positions filled, the same in every layer between forward calls."""
        return next(iter(self.filled.values()), 0)

    @property
    def batch_size(self) -> Optional[int]:
        return next(iter(self.keys.values())).size(0) if self.keys else None

    def update(self, layer: Optional[int], k, v):
        """Write a layer's keys and values of T new positions, k and v (B, nh, T, hs), after its P
        filled ones. Returns the keys and values of all P + T, (B, nh, P + T, hs) each: views."""
        if layer not in self.keys:  # made at the first write: k's device, dtype and heads
            B, nh, _, hs = k.shape
            self.keys[layer] = k.new_zeros(B, nh, self.max_length, hs)
            self.values[layer] = v.new_zeros(B, nh, self.max_length, hs)
            self.filled[layer] = 0
        P, T = self.filled[layer], k.size(-2)
        self.keys[layer][:, :, P : P + T] = k
        self.values[layer][:, :, P : P + T] = v
        self.filled[layer] = P + T
        return self.keys[layer][:, :, : P + T], self.values[layer][:, :, : P + T]

    def to_tuple(self) -> tuple:
        """The reference's layout: per layer (k, v), each (B, nh, P, hs)."""
        return tuple((self.keys[i][:, :, : self.filled[i]], self.values[i][:, :, : self.filled[i]])
                     for i in sorted(self.keys))


def padding_mask_to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) of 1 = attend, 0 = padding -> (B, 1, 1, S) of `dtype`, to add to the scores
    (B, nh, T, S): 0.0 on attended keys, the dtype's most negative number (torch.finfo(dtype).min)
    on padding. It broadcasts over heads and queries: it masks keys, never queries.

    Masked keys get the dtype's minimum, not -inf, so that a row with every key masked
    (a padding query) gives a uniform softmax instead of NaN.
    """
    mask = mask[:, None, None, :].to(dtype)  # (B, S) -> (B, 1, 1, S)
    return (1.0 - mask) * torch.finfo(dtype).min


# --- MLP and block --------------------------------------------------------------------------------


class GPT2MLP(nn.Module):
    """Position-wise feed-forward: C -> n_inner (4C) -> activation -> C."""

    def __init__(self, intermediate_size: int, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, intermediate_size)
        self.act = ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        """x (B, T, C) -> (B, T, C): c_fc widens each position to intermediate_size, the config's
        activation (self.act), c_proj projects back to C, then dropout (resid_pdrop)."""
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, 4C) inside


class GPT2Block(nn.Module):
    """One transformer block, pre-norm: each sub-block reads a layer norm of the residual stream x
    and adds its output to x. GPT-2 moved layer norm to the input of each sub-block (GPT-1
    normalised after the residual add), so x itself is never normalised until ln_f, and gradients
    flow straight through it."""

    def __init__(self, config: GPT2Config, layer_idx: Optional[int] = None):
        super().__init__()
        inner_dim = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx=layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        if config.add_cross_attention:
            self.crossattention = GPT2Attention(config, is_cross_attention=True,
                                                layer_idx=layer_idx)
            self.ln_cross_attn = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(inner_dim, config)

    def forward(self, hidden_states, layer_past=None, attention_mask=None, head_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, use_cache=False,
                output_attentions=False):
        """One block on hidden_states (B, T, C), the residual stream x:
            x = x + attn(ln_1(x))                     with layer_past, attention_mask, head_mask
            x = x + crossattention(ln_cross_attn(x))  only with encoder_hidden_states (no cache)
            x = x + mlp(ln_2(x))
        Returns (x (B, T, C), present (see GPT2Attention) or None, self-attention weights or None,
        cross-attention weights or None): the weights with output_attentions."""
        attn_out, present, self_weights = self.attn(
            self.ln_1(hidden_states), layer_past=layer_past, attention_mask=attention_mask,
            head_mask=head_mask, use_cache=use_cache, output_attentions=output_attentions)
        hidden_states = hidden_states + attn_out
        cross_weights = None
        if encoder_hidden_states is not None:  # the encoder's keys and values are never cached
            cross_out, _, cross_weights = self.crossattention(
                self.ln_cross_attn(hidden_states), head_mask=head_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, output_attentions=output_attentions)
            hidden_states = hidden_states + cross_out
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, present, self_weights, cross_weights


# --- The body -------------------------------------------------------------------------------------


def init_gpt2_weights(module: nn.Module, config: GPT2Config):
    """GPT-2's initialisation, for one module (use with `model.apply`): N(0, 0.02) weights, zero
    biases, unit layer norms, and each residual projection (c_proj) scaled by 1/sqrt(2 * n_layer):
    every block adds two of them to the residual stream, whose variance would otherwise grow with
    depth. torch.nn.init fills them, so that from_pretrained can skip it (without_random_init)."""
    if isinstance(module, (nn.Linear, Conv1D)):
        nn.init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=config.initializer_range)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    for name, p in module.named_parameters():
        if name == "c_proj.weight":  # GPT2Attention.c_proj and GPT2MLP.c_proj
            std = config.initializer_range / math.sqrt(2 * config.n_layer)
            nn.init.normal_(p, mean=0.0, std=std)


def layer_cache(past_key_values, i: int):
    """Layer i's part of past_key_values: a StaticCache serves every layer, the reference's tuples
    hold one (k, v) per layer."""
    if past_key_values is None or isinstance(past_key_values, StaticCache):
        return past_key_values
    return past_key_values[i]


class GPT2Model(nn.Module):
    """The GPT-2 body: token + position embeddings, n_layer blocks, a final layer norm. It returns
    the last hidden states (B, T, C); the heads below turn them into predictions."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        config.validate()
        self.config = config
        self.embed_dim = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings, (V, C)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)  # positions, (n_positions, C)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPT2Block(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.device_map = None
        self.apply(lambda module: init_gpt2_weights(module, config))
        if config.pruned_heads:  # a config saved from a pruned model rebuilds the pruned shapes
            self.prune_heads({layer: heads for layer, heads in config.pruned_heads.items()})

    @property
    def dtype(self):
        return self.wte.weight.dtype

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def embed(self, input_ids, inputs_embeds, position_ids, token_type_ids, past_length: int):
        """The T new tokens' embeddings, after dropout: (B, T, C), leading dimensions of input_ids
        (..., T) or inputs_embeds (..., T, C) flattened into B. position_ids (..., T) default to
        past_length .. past_length + T - 1, after the cached tokens; token_type_ids (..., T) add
        wte(token_type_ids)."""
        T = input_ids.size(-1) if input_ids is not None else inputs_embeds.size(-2)
        if input_ids is not None:
            input_ids = input_ids.reshape(-1, T)  # (..., T) -> (B, T)
            inputs_embeds = self.wte(input_ids.to(self.wte.weight.device))  # (B, T, C)
        else:
            inputs_embeds = inputs_embeds.reshape(-1, T, self.embed_dim)  # (..., T, C) -> (B, T, C)
        device = inputs_embeds.device
        if position_ids is None:  # the new tokens continue after the P cached ones: (1, T)
            position_ids = torch.arange(past_length, past_length + T, device=device).unsqueeze(0)
        else:
            position_ids = position_ids.reshape(-1, T).to(device)
        hidden_states = inputs_embeds + self.wpe(position_ids)  # (B, T, C) + (B or 1, T, C)
        if token_type_ids is not None:
            hidden_states = hidden_states + self.wte(token_type_ids.reshape(-1, T).to(device))
        return self.drop(hidden_states)

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None,
                token_type_ids=None, position_ids=None, head_mask=None, inputs_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=True):
        """Token ids (..., T), or inputs_embeds (..., T, C), -> the last hidden states (..., T, C),
        in a BaseModelOutputWithPastAndCrossAttentions (its to_tuple() if not return_dict).
        past_key_values: the P cached tokens' keys and values, per layer (k, v) each (B, nh, P, hs),
        or a StaticCache. attention_mask (..., P + T), 0 on padding; head_mask (nh,) or
        (n_layer, nh) of 0/1; options left None take the config's."""
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if output_attentions is None:
            output_attentions = cfg.output_attentions
        if output_hidden_states is None:
            output_hidden_states = cfg.output_hidden_states
        input_shape, P = check_model_inputs(  # Part II: every input checked before any work
            self, input_ids, inputs_embeds, past_key_values, attention_mask, token_type_ids,
            position_ids, head_mask, encoder_hidden_states, encoder_attention_mask)
        T, checkpointing = input_shape[-1], self.gradient_checkpointing and self.training
        use_cache = use_cache and not checkpointing  # a cache would keep what checkpointing drops
        hidden_states = self.embed(input_ids, inputs_embeds, position_ids, token_type_ids, P)
        if attention_mask is not None:  # (..., P + T) of 0/1 -> (B, 1, 1, P + T), added to scores
            attention_mask = padding_mask_to_additive(attention_mask.reshape(-1, P + T), self.dtype)
        if encoder_hidden_states is not None:  # (B, S) of 0/1, all ones by default -> (B, 1, 1, S)
            if encoder_attention_mask is None:
                encoder_attention_mask = hidden_states.new_ones(encoder_hidden_states.shape[:2])
            encoder_attention_mask = padding_mask_to_additive(encoder_attention_mask, self.dtype)
        head_mask = expand_head_mask(head_mask, cfg.n_layer, self.dtype)  # per layer
        presents = () if use_cache else None
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        all_cross_attentions = () if output_attentions and cfg.add_cross_attention else None
        for i, block in enumerate(self.h):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            inputs = dict(layer_past=layer_cache(past_key_values, i), attention_mask=attention_mask,
                          head_mask=head_mask[i], encoder_hidden_states=encoder_hidden_states,
                          encoder_attention_mask=encoder_attention_mask, use_cache=use_cache,
                          output_attentions=output_attentions)
            hidden_states, inputs = follow_device_map(self, block, hidden_states, inputs)  # Part II
            if checkpointing:  # Part II: the block's insides are recomputed in the backward pass
                outputs = checkpointed_block(block, hidden_states, **inputs)
            else:
                outputs = block(hidden_states, **inputs)
            hidden_states, present, self_weights, cross_weights = outputs
            if use_cache:  # a StaticCache is every layer's present: one object, written in place
                presents = present if isinstance(present, StaticCache) else presents + (present,)
            if output_attentions:
                all_attentions += (self_weights,)
                if cfg.add_cross_attention:
                    all_cross_attentions += (cross_weights,)
        hidden_states = self.ln_f(hidden_states.to(self.ln_f.weight.device))
        hidden_states = hidden_states.view(input_shape + (hidden_states.size(-1),))  # (..., T, C)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        out = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states, past_key_values=presents, attentions=all_attentions,
            hidden_states=all_hidden_states, cross_attentions=all_cross_attentions)
        return out if return_dict else out.to_tuple()

    # --- in Part II: pruning, gradient checkpointing, device maps -------------------------------
    def prune_heads(self, heads_to_prune: Dict[int, List[int]]):
        """Remove attention heads, {layer: [head, ...]} (prune_model_heads)."""
        return prune_model_heads(self, heads_to_prune)  # in Part II

    def gradient_checkpointing_enable(self):
        """Training: recompute each block's insides in the backward pass (checkpointed_block)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    def parallelize(self, device_map: Optional[Dict[object, List[int]]] = None):
        """Spread the blocks over several devices, a device map (parallelize_model)."""
        return parallelize_model(self, device_map)  # in Part II

    def deparallelize(self):
        """Bring every part back to the CPU (deparallelize_model)."""
        return deparallelize_model(self)  # in Part II


# --- The LM head ----------------------------------------------------------------------------------


def shifted_lm_loss(logits, labels):
    """Next-token cross-entropy, a scalar: logits (..., T, V), labels (..., T) (on any device).
    Position t's logits predict labels[t + 1], so the last position's logits and the first label are
    not used. Labels of -100 are ignored (padding, or a prompt the loss should not count); the mean
    is over the rest. The labels are shifted, not the logits, so that the logits are not copied."""
    labels = labels.to(logits.device)
    shifted = F.pad(labels[..., 1:], (0, 1), value=-100)  # (..., T): the next label; -100 last
    flat_logits = logits.reshape(-1, logits.size(-1))  # (N, V)
    return F.cross_entropy(flat_logits, shifted.reshape(-1), ignore_index=-100)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its language-modelling head: logits over the vocabulary for the next token.

    The head's weight is the token embedding matrix itself (tied, as OpenAI trained it): the same
    vectors that say what a token means on the way in score how likely it is on the way out.
    """

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            init_gpt2_weights(self.lm_head, config)
        # generate()'s defaults (Part II): the reference's, with the config's special tokens
        self.generation_config = GenerationConfig.from_model_config(config)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None,
                token_type_ids=None, position_ids=None, head_mask=None, inputs_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=True):
        """The body's arguments -> logits (..., T, V) for the next token at every position, in a
        CausalLMOutputWithCrossAttentions (its to_tuple() if not return_dict). labels (..., T):
        usually input_ids itself (shifted inside), -100 where not counted; given, the loss is
        set."""
        shape = _input_shape(input_ids, inputs_embeds)
        check_labels("labels", labels, shape, self.config.vocab_size, "vocab_size", "token id")
        body = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask,
            inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        hidden_states = body.last_hidden_state.to(self.lm_head.weight.device)
        logits = self.lm_head(hidden_states)  # (B, T, C) -> (B, T, V)
        loss = shifted_lm_loss(logits, labels) if labels is not None else None
        out = CausalLMOutputWithCrossAttentions(
            loss=loss, logits=logits, past_key_values=body.past_key_values,
            hidden_states=body.hidden_states, attentions=body.attentions,
            cross_attentions=body.cross_attentions)
        return out if return_dict else out.to_tuple()

    def generate(self, input_ids=None, **kwargs):
        """Continue the prompts input_ids (B, T) (None: from bos_token_id): see generate()."""
        return generate(self, input_ids, **kwargs)

    # --- in Part II: pruning, device maps, beam search's cache ----------------------------------
    def prune_heads(self, heads_to_prune):
        self.transformer.prune_heads(heads_to_prune)

    def parallelize(self, device_map=None):
        self.transformer.parallelize(device_map)
        self.lm_head.to(self.transformer.first_device)

    def deparallelize(self):
        self.transformer.deparallelize()
        self.lm_head.to("cpu")

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):  # the rows of the beams that survived
        return reorder_cache(past_key_values, beam_idx)  # in Part II


# --- Sampling -------------------------------------------------------------------------------------


def _positions_from_mask(attention_mask):
    """attention_mask (B, T) of 0/1 (left-padded prompts) -> position_ids (B, T), long: each row's
    real tokens are numbered 0, 1, 2, ... in order, counting real tokens only (a 0 in the middle
    does not advance the count). Padding slots get position 1, as the reference's: no real token
    attends to them, so any valid index would do."""
    position_ids = attention_mask.long().cumsum(-1) - 1  # (B, T)
    return position_ids.masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def generate(model: "GPT2LMHeadModel", input_ids=None, generation_config=None, attention_mask=None,
             **kwargs):
    """Continue each prompt, token by token: the reference's generate() (transformers 4.46.3), with
    its arguments, defaults and tokens, in greedy decoding, sampling and beam search.

    input_ids (B, T): the prompts (None: one row of bos_token_id), left-padded to one length, with
    attention_mask (B, T) 0 on the padding (encode_batch makes both; without one, 0 where
    pad_token_id is, as the reference). kwargs: GenerationConfig's fields (max_new_tokens,
    do_sample, top_k, num_beams, ...) over generation_config (default model.generation_config), and
    generator, on_token, stop_at_eos, cache, compile: see prepare_generation, which checks them all
    before any work. Returns a LongTensor (B * num_return_sequences, T + new tokens), or with
    return_dict_in_generate a GenerateDecoderOnlyOutput (GenerateBeamDecoderOnlyOutput for beams).
    """
    input_ids, attention_mask, options = prepare_generation(  # Part II: the defaults, every check
        model, input_ids=input_ids, attention_mask=attention_mask,
        generation_config=generation_config, **kwargs)
    was_training = model.training
    model.eval()  # no dropout while generating
    try:
        if options.num_beams > 1:
            out = _beam_search(model, input_ids, attention_mask, options)  # Part II
        else:
            out = _sample(model, input_ids, attention_mask, options)
    finally:
        model.train(was_training)
    return out if options.return_dict_in_generate else out.sequences


def decode_step(model, tokens, positions, mask, cache):
    """One step of generation: the body on the T tokens not cached yet, then the LM head on the
    last, whose logits choose the next token. tokens, positions (B, T); mask (B, P + T) of 0/1, or
    None when nothing is padded; cache: the P earlier tokens' past_key_values (None, a StaticCache
    or the reference's tuples). Returns (the next token's logits (B, V), the cache of all P + T)."""
    out = model.transformer(tokens, past_key_values=cache, position_ids=positions,
                            attention_mask=mask, use_cache=True)
    return model.lm_head(out.last_hidden_state[:, -1]), out.past_key_values  # (B, C) -> (B, V)


def _sample(model, input_ids, attention_mask, options):
    """Greedy decoding or sampling with the key/value cache: generate()'s loop when num_beams is 1.

    input_ids, attention_mask (B, T0): the prompts, left-padded, 0 on padding (checked). options:
    GenerationOptions (Part II); options.step(model, tokens, positions, mask, cache) is decode_step,
    or a faster Part II step with its contract. Runs options.max_new_tokens (N) steps, fewer once
    every row has emitted an eos id; a finished row carries options.pad. Returns
    GenerateDecoderOnlyOutput: sequences (B, T0 + steps run), with options.output_scores each step's
    scores (B, V).
    """
    B, T0 = input_ids.shape
    N = options.max_new_tokens
    S = min(T0 + N, model.config.n_positions)  # cache slots: the last new token is never fed back
    tokens = F.pad(input_ids, (0, N))  # (B, T0) -> (B, T0 + N): the prompts, room for new tokens
    mask = F.pad(attention_mask, (0, S - T0), value=1)  # (B, S): new tokens are never padding
    positions = _positions_from_mask(mask)  # (B, S): each row counts its own tokens, new ones too
    padded = not bool(attention_mask.all())  # no padding, no mask (a mask of ones masks nothing)
    eos = torch.tensor(options.eos, device=input_ids.device) if options.eos is not None else None
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    cache = StaticCache(S) if options.cache == "static" else None
    steps_scores = []
    start, length = 0, T0  # tokens[:, start:length] are not in the cache yet
    for _ in range(N):
        logits, cache = options.step(model, tokens[:, start:length], positions[:, start:length],
                                     mask[:, :length] if padded else None, cache)  # (B, V)
        scores = apply_processors(options.processors, tokens[:, :length], logits.float())  # Part II
        if options.output_scores:
            steps_scores.append(scores)
        if options.do_sample:
            probs = F.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=options.generator).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)  # (B,)
        if eos is not None:
            next_tokens = torch.where(unfinished, next_tokens, options.pad)  # finished: padding
        tokens[:, length] = next_tokens
        start, length = length, length + 1
        if options.on_token is not None:
            options.on_token(next_tokens)
        if eos is not None:
            unfinished &= ~torch.isin(next_tokens, eos)
            if not unfinished.any():
                break
    scores = tuple(steps_scores) if options.output_scores else None
    return GenerateDecoderOnlyOutput(sequences=tokens[:, :length], scores=scores)


# ==================================================================================================
# Part II: what the reference also has
#
# The other heads, the output dataclasses, generation's options and logits processors, beam search,
# pruning, head masks, device maps, gradient checkpointing, input checks, compiled decoding, config
# validation and serialisation: written out in full, out of a first reading's way. A method of a Part I
# class marked `# in Part II` is one line that calls its body here.
# ==================================================================================================


# --- The other heads --------------------------------------------------------------------------------


class SequenceSummary(nn.Module):
    """One vector per sequence, for the multiple-choice head: the hidden state of a chosen token (or the
    last, first, or mean), then dropout, an optional projection to num_labels, an optional activation."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.summary_type = config.summary_type
        self.summary = nn.Identity()
        if config.summary_use_proj:
            use_labels = config.summary_proj_to_labels and config.num_labels > 0
            self.summary = nn.Linear(config.n_embd, config.num_labels if use_labels else config.n_embd)
        act = config.summary_activation
        self.activation = ACTIVATIONS[act] if act else (lambda x: x)
        self.first_dropout = nn.Dropout(config.summary_first_dropout)
        self.last_dropout = nn.Dropout(config.summary_last_dropout)

    def forward(self, hidden_states, cls_index=None):
        """hidden_states (..., T, C); cls_index (...) position of the token to summarise (default: last)."""
        if self.summary_type == "last":
            output = hidden_states[..., -1, :]
        elif self.summary_type == "first":
            output = hidden_states[..., 0, :]
        elif self.summary_type == "mean":
            output = hidden_states.mean(dim=-2)
        else:  # "cls_index"
            if cls_index is None:
                cls_index = torch.full(hidden_states.shape[:-2], hidden_states.size(-2) - 1, dtype=torch.long)
            index = cls_index.to(hidden_states.device)[..., None, None]  # (...) -> (..., 1, 1)
            index = index.expand(*index.shape[:-1], hidden_states.size(-1))  # (..., 1, C)
            output = hidden_states.gather(-2, index).squeeze(-2)  # (..., C)
        return self.last_dropout(self.activation(self.summary(self.first_dropout(output))))


class GPT2DoubleHeadsModel(nn.Module):
    """Language modelling plus multiple choice (GPT-1/2 style fine-tuning, e.g. ROCStories): every
    choice is a full sequence (B, n_choices, T); the multiple-choice head scores each choice from the
    hidden state at its classification token (mc_token_ids)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        config.num_labels = 1  # one score per choice, as the reference sets it
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            init_gpt2_weights(self.lm_head, config)
        self.multiple_choice_head = SequenceSummary(config)
        self.multiple_choice_head.apply(lambda module: init_gpt2_weights(module, config))

    def prune_heads(self, heads_to_prune):
        self.transformer.prune_heads(heads_to_prune)

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        mc_token_ids=None,
        labels=None,
        mc_labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=True,
    ):
        """input_ids (B, n_choices, T); mc_token_ids (B, n_choices); labels (B, n_choices, T); mc_labels (B,)."""
        shape = _input_shape(input_ids, inputs_embeds)
        check_labels("labels", labels, shape, self.config.vocab_size, "vocab_size", "token id")
        if shape is not None and len(shape) >= 2:  # (B, n_choices, T): one right choice per example, (B,)
            check_labels("mc_labels", mc_labels, shape[:-2], shape[-2], "the number of choices", "choice", "example")
        if mc_token_ids is not None:
            if tuple(mc_token_ids.shape) != tuple(shape[:-1]):
                raise _shape_error("mc_token_ids", mc_token_ids.shape, tuple(shape[:-1]), "one position per choice")
            _check_indices("mc_token_ids", mc_token_ids, shape[-1], "the sequence length", "position")
        body = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = body.last_hidden_state  # (B, n_choices, T, C)
        logits = self.lm_head(hidden_states)  # (B, n_choices, T, V)
        mc_logits = self.multiple_choice_head(hidden_states, mc_token_ids).squeeze(-1)  # (B, n_choices)
        mc_loss = None
        if mc_labels is not None:
            mc_loss = F.cross_entropy(mc_logits.view(-1, mc_logits.size(-1)), mc_labels.view(-1).to(mc_logits.device))
        loss = shifted_lm_loss(logits, labels) if labels is not None else None
        out = GPT2DoubleHeadsModelOutput(
            loss=loss, mc_loss=mc_loss, logits=logits, mc_logits=mc_logits, past_key_values=body.past_key_values,
            hidden_states=body.hidden_states, attentions=body.attentions,
        )
        return out if return_dict else out.to_tuple()


def infer_problem_type(labels, num_labels: int, problem_type) -> str:
    """config.problem_type, or when it is None the reference's rule: one label means regression (MSE),
    integer labels mean one class per example (cross-entropy), float labels mean several classes at once
    (binary cross-entropy per class)."""
    if problem_type is not None:
        return problem_type
    if num_labels == 1:
        return "regression"
    return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"


def classification_loss(logits, labels, num_labels, problem_type):
    """The loss a classification head trains with (see infer_problem_type for which)."""
    problem_type = infer_problem_type(labels, num_labels, problem_type)
    labels = labels.to(logits.device)
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class GPT2ForSequenceClassification(nn.Module):
    """A label (or a number) for a whole sequence, read from the hidden state of its last real token:
    in a causal model that is the only position that has seen every token."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        init_gpt2_weights(self.score, config)

    def prune_heads(self, heads_to_prune):
        self.transformer.prune_heads(heads_to_prune)

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=True,
    ):
        """labels (B,): class ids, or floats for regression; (B, num_labels) floats for multi-label."""
        batch_size = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
        if self.config.pad_token_id is None and batch_size != 1:
            raise ValueError(
                "GPT2ForSequenceClassification needs config.pad_token_id to find the last real token of each "
                f"sequence in a batch of {batch_size}; set it (e.g. to the eos id 50256) or pass one sequence at a time"
            )
        check_classification_labels(labels, _input_shape(input_ids, inputs_embeds), self.num_labels,
                                    self.config.problem_type)
        body = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.score(body.last_hidden_state)  # (B, T, num_labels)
        if self.config.pad_token_id is None or input_ids is None:
            last = torch.full((batch_size,), -1, device=logits.device)  # no padding to find: the last token
        else:
            # The token before the first padding token (as the reference; -1 wraps to the last position
            # when a row has no padding or is left-padded).
            first_pad = torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1)  # (B,)
            last = ((first_pad - 1) % input_ids.shape[-1]).to(logits.device)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last]  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = classification_loss(pooled_logits, labels, self.num_labels, self.config.problem_type)
        out = SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled_logits, past_key_values=body.past_key_values,
            hidden_states=body.hidden_states, attentions=body.attentions,
        )
        return out if return_dict else out.to_tuple()


class GPT2ForTokenClassification(nn.Module):
    """A label for every token (named entities, parts of speech): dropout, then a linear layer per position."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.dropout = nn.Dropout(config.classifier_dropout if config.classifier_dropout is not None else 0.1)
        self.classifier = nn.Linear(config.n_embd, config.num_labels)
        init_gpt2_weights(self.classifier, config)

    def prune_heads(self, heads_to_prune):
        self.transformer.prune_heads(heads_to_prune)

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=True,
    ):
        """labels (B, T) class ids, -100 where no label applies."""
        check_labels("labels", labels, _input_shape(input_ids, inputs_embeds), self.num_labels, "num_labels", "class")
        body = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.classifier(self.dropout(body.last_hidden_state))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1).to(logits.device))
        out = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=body.hidden_states, attentions=body.attentions
        )
        return out if return_dict else out.to_tuple()


class GPT2ForQuestionAnswering(nn.Module):
    """Extractive question answering (SQuAD): for every token, a score for "the answer starts here" and
    one for "the answer ends here"."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.qa_outputs = nn.Linear(config.n_embd, 2)
        init_gpt2_weights(self.qa_outputs, config)

    def prune_heads(self, heads_to_prune):
        self.transformer.prune_heads(heads_to_prune)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=True,
    ):
        """start_positions, end_positions (B,): token indices of the answer span. Positions past the end of
        the sequence are clamped to T and ignored by the loss (the answer was cut off)."""
        shape = _input_shape(input_ids, inputs_embeds)
        for name, positions in (("start_positions", start_positions), ("end_positions", end_positions)):
            if positions is not None and shape and tuple(positions.shape) not in ((shape[0],), (shape[0], 1)):
                raise _shape_error(name, positions.shape, f"({shape[0]},)", "one token index per example")
        body = self.transformer(
            input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        )
        logits = self.qa_outputs(body.last_hidden_state)  # (B, T, 2)
        start_logits, end_logits = (x.squeeze(-1).contiguous() for x in logits.split(1, dim=-1))  # 2 x (B, T)
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)  # T: one past the last token
            start = start_positions.reshape(-1).to(start_logits.device).clamp(0, ignored)
            end = end_positions.reshape(-1).to(end_logits.device).clamp(0, ignored)
            loss = (F.cross_entropy(start_logits, start, ignore_index=ignored)
                    + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2
        out = QuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=body.hidden_states,
            attentions=body.attentions,
        )
        return out if return_dict else out.to_tuple()


HEAD_CLASSES = (
    GPT2Model, GPT2LMHeadModel, GPT2DoubleHeadsModel, GPT2ForSequenceClassification, GPT2ForTokenClassification,
    GPT2ForQuestionAnswering,
)


# --- Output dataclasses -----------------------------------------------------------------------------


class ModelOutput:
    """Base of the output dataclasses: attribute access (`out.logits`), and like Hugging Face, indexing
    and `to_tuple()` over the fields that are set (what `return_dict=False` returns)."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@dataclass
class BaseModelOutputWithPastAndCrossAttentions(ModelOutput):
    last_hidden_state: torch.Tensor = None  # (B, T, C)
    past_key_values: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]] = None  # per layer (k, v)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None  # n_layer + 1 of (B, T, C)
    attentions: Optional[Tuple[torch.Tensor, ...]] = None  # n_layer of (B, nh, T, P + T)
    cross_attentions: Optional[Tuple[torch.Tensor, ...]] = None  # n_layer of (B, nh, T, S)


@dataclass
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None  # (B, T, V)
    past_key_values: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None


@dataclass
class GPT2DoubleHeadsModelOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None  # language-modelling loss
    mc_loss: Optional[torch.Tensor] = None  # multiple-choice loss
    logits: torch.Tensor = None  # (B, n_choices, T, V)
    mc_logits: torch.Tensor = None  # (B, n_choices)
    past_key_values: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None  # (B, num_labels)
    past_key_values: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None  # (B, T, num_labels)
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    start_logits: torch.Tensor = None  # (B, T)
    end_logits: torch.Tensor = None  # (B, T)
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """generate(return_dict_in_generate=True) after greedy decoding or sampling."""

    sequences: torch.Tensor = None  # (B * num_return_sequences, T + new tokens)
    scores: Optional[Tuple[torch.Tensor, ...]] = None  # output_scores: each step's processed scores (B, V)


@dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """generate(return_dict_in_generate=True) after beam search; all but sequences need output_scores=True."""

    sequences: torch.Tensor = None  # (B * num_return_sequences, length)
    sequences_scores: Optional[torch.Tensor] = None  # (B * num_return_sequences,): each hypothesis' score
    scores: Optional[Tuple[torch.Tensor, ...]] = None  # each step's processed log-probabilities (B * num_beams, V)
    beam_indices: Optional[torch.Tensor] = None  # (B * num_return_sequences, length): each token's beam row, or -1


# --- Generation: the reference's options and logits processors --------------------------------------


@dataclass
class GenerationConfig:
    """How generate() decodes, with the reference's field names and defaults (transformers' GenerationConfig).

    A model's own is model.generation_config: made from its config (the special tokens, and any of these
    fields its config.json holds), or read from generation_config.json beside config.json; save_pretrained
    writes it there. generate()'s keywords override it for one call. Keys of generation_config.json that this
    class does not know are kept in `extra` and written back; generate() refuses a file that sets one of the
    reference's decoding options it does not implement (UNSUPPORTED_GENERATION_FIELDS), rather than ignore it.
    """

    max_length: int = 20  # the longest sequence, prompt included
    max_new_tokens: Optional[int] = None  # at most this many new tokens; wins over max_length
    min_length: int = 0  # eos is forbidden while the sequence (prompt included) is shorter
    min_new_tokens: Optional[int] = None  # eos is forbidden before this many new tokens; wins over min_length
    early_stopping: object = False  # beam search: True, False or "never" (see _BeamHypotheses.is_done)
    do_sample: bool = False  # draw each token from the softmax; False: greedy, or plain beam search
    num_beams: int = 1  # > 1: beam search
    temperature: Optional[float] = 1.0  # sampling: the scores are divided by it
    top_k: Optional[int] = 50  # sampling: only the k most likely tokens (0 or None: all)
    top_p: Optional[float] = 1.0  # sampling: only the nucleus of probability p (1.0 or None: all)
    repetition_penalty: Optional[float] = 1.0  # > 1: tokens already in the sequence are made less likely
    length_penalty: float = 1.0  # beam search: a hypothesis scores sum of log-probabilities / length**penalty
    no_repeat_ngram_size: Optional[int] = 0  # > 0: no n-gram of this size occurs twice
    bad_words_ids: Optional[List[List[int]]] = None  # token sequences never generated
    num_return_sequences: int = 1  # sequences returned per prompt (sampling: drawn; beam search: the best)
    output_scores: bool = False  # with return_dict_in_generate: each step's processed scores
    return_dict_in_generate: bool = False  # return a Generate...Output rather than the tokens alone
    pad_token_id: Optional[int] = None  # what finished rows carry (default: the first eos id)
    bos_token_id: Optional[int] = None  # the prompt when generate() gets none
    eos_token_id: Optional[object] = None  # an int or a list of ints: a row that emits one is finished
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_model_config(cls, config, **defaults) -> "GenerationConfig":
        """The model's defaults: `defaults`, then its config's special tokens and any field of this class its
        config.json holds (kept in config.extra), as the reference's GenerationConfig.from_model_config."""
        known = {f.name for f in fields(cls)} - {"extra"}
        values = dict(defaults)
        values.update({k: v for k, v in config.extra.items() if k in known})
        values.update({k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                       if getattr(config, k, None) is not None})
        return cls(**values)

    @classmethod
    def from_dict(cls, config_dict: dict) -> "GenerationConfig":
        """From a generation_config.json dict: fields it leaves out take the defaults above (as the reference's)."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"a generation config must be a dict of fields, got {type(config_dict).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in config_dict.items() if k in known},
                   extra={k: v for k, v in config_dict.items() if k not in known})

    def to_dict(self) -> dict:
        """The fields that differ from the defaults, and `extra`: what the reference writes (to_diff_dict)."""
        default = type(self)()
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in fields(self)
                  if f.name != "extra" and getattr(self, f.name) != getattr(default, f.name)})
        return d

    @classmethod
    def from_json_file(cls, path) -> "GenerationConfig":
        fields = "generation fields ({\"max_length\": 50, ...})"
        return cls.from_dict(read_json_object(path, "generation_config.json", fields))

    def to_json_file(self, path):
        """Write generation_config.json (atomically)."""
        write_json(path, self.to_dict())


# The reference's decoding options this generate() does not implement, with the value that leaves decoding as it
# is: a generation config that sets one to anything else is refused (generate() would otherwise quietly decode
# differently from the reference). Other keys of generation_config.json (transformers_version, ...) are kept.
UNSUPPORTED_GENERATION_FIELDS = {
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "num_beam_groups": 1,
    "diversity_penalty": 0.0, "penalty_alpha": None, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "force_words_ids": None, "constraints": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "guidance_scale": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "remove_invalid_values": False, "max_time": None, "stop_strings": None, "dola_layers": None,
    "watermarking_config": None, "prompt_lookup_num_tokens": None, "assistant_early_exit": None,
}


# Below this, logits / temperature overflow to inf for logits of a few hundred, and sampling fails on NaN.
MIN_TEMPERATURE = 1e-6


def _check_generation_config(config: GenerationConfig, scored: int):
    """Each field's type and range, before any work: a ValueError naming the field, its value and what it may be.
    scored: how many tokens the head scores (token ids 0 .. scored - 1 can be generated)."""
    def bad(name, expected, hint=""):
        return ValueError(f"{name} must be {expected}, got {getattr(config, name)!r}" + (f" ({hint})" if hint else ""))

    if not is_kind(config.max_length, int) or config.max_length < 1:
        raise bad("max_length", "a positive integer", "the prompt included")
    for name in ("max_new_tokens", "min_new_tokens"):
        value = getattr(config, name)
        if value is not None and (not is_kind(value, int) or value < 0):
            raise bad(name, "a non-negative integer", "or None")
    if not is_kind(config.min_length, int) or config.min_length < 0:
        raise bad("min_length", "a non-negative integer", "the prompt included")
    for name in ("do_sample", "output_scores", "return_dict_in_generate"):
        if not isinstance(getattr(config, name), bool):
            raise bad(name, "True or False")
    for name in ("num_beams", "num_return_sequences"):
        value = getattr(config, name)
        if not is_kind(value, int) or value < 1:
            raise bad(name, "a positive integer")
    for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):  # before any comparison
        value = getattr(config, name)
        if isinstance(value, bool) or (value is not None and not isinstance(value, (int, float))):
            raise bad(name, "a number")
    if config.do_sample and config.temperature is not None and not MIN_TEMPERATURE <= config.temperature < math.inf:
        raise ValueError(f"temperature must be at least {MIN_TEMPERATURE} and finite when sampling, got "
                         f"{config.temperature!r} (a smaller one overflows the scores to inf; for the most likely "
                         "token every step, use do_sample=False)")
    if config.top_k is not None and (not is_kind(config.top_k, int) or config.top_k < 0):
        raise bad("top_k", "a non-negative integer", "0 or None: no top-k")
    if config.top_p is not None and not 0 < config.top_p <= 1:
        raise bad("top_p", "in (0, 1]", "1.0 or None: no top-p")
    if config.repetition_penalty is not None and not 0 < config.repetition_penalty < math.inf:
        raise bad("repetition_penalty", "> 0 and finite", "1.0: none; above 1 penalises repeats")
    if config.no_repeat_ngram_size is not None and (not is_kind(config.no_repeat_ngram_size, int)
                                                    or config.no_repeat_ngram_size < 0):
        raise bad("no_repeat_ngram_size", "a non-negative integer", "0: off")
    if not -math.inf < config.length_penalty < math.inf:  # nan fails both comparisons
        raise bad("length_penalty", "a finite number", "1.0: none")
    if config.early_stopping not in (True, False, "never") or not isinstance(config.early_stopping, (bool, str)):
        raise bad("early_stopping", 'True, False or "never"')
    if config.num_beams == 1 and not config.do_sample and config.num_return_sequences > 1:
        raise ValueError(f"num_return_sequences={config.num_return_sequences} with greedy decoding would return "
                         "the same sequence several times; pass do_sample=True or num_beams >= num_return_sequences")
    if config.num_beams > 1 and config.num_return_sequences > config.num_beams:
        raise ValueError(f"num_return_sequences ({config.num_return_sequences}) must be at most num_beams "
                         f"({config.num_beams}): beam search keeps num_beams hypotheses per prompt")
    eos = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
    if config.eos_token_id is not None and (not eos or not all(is_kind(t, int) and t >= 0 for t in eos)):
        raise bad("eos_token_id", "None, a token id or a non-empty list of token ids")
    for name in ("pad_token_id", "bos_token_id"):
        value = getattr(config, name)
        if value is not None and (not is_kind(value, int) or value < 0):
            raise bad(name, "None or a token id (an integer >= 0)")
    words = config.bad_words_ids
    if words is not None and (not isinstance(words, (list, tuple)) or not words or not all(
            isinstance(w, (list, tuple)) and w and all(is_kind(t, int) and 0 <= t < scored for t in w) for w in words)):
        raise bad("bad_words_ids", f"None or a non-empty list of non-empty lists of token ids in [0, {scored})")


@dataclass
class GenerationOptions:
    """What the decoding loops (_sample in Part I, _beam_search) read, resolved and checked by
    prepare_generation from the model's GenerationConfig and generate()'s keywords: one object rather than a
    dozen parameters."""

    max_new_tokens: int  # N: at most this many new tokens per row
    do_sample: bool  # draw from the softmax of the processed scores; False takes the argmax
    processors: list  # f(tokens so far (B, L), scores (B, V)) -> scores, in the reference's order (Part II)
    eos: Optional[Tuple[int, ...]]  # a row that emits one of these is finished; None never stops early
    pad: Optional[int]  # what a finished row carries from then on
    num_beams: int = 1  # > 1: beam search, with this many beams per prompt
    num_return_sequences: int = 1  # beam search: the best this many hypotheses of each prompt
    length_penalty: float = 1.0  # beam search: a hypothesis scores sum of log-probabilities / length**penalty
    early_stopping: object = False  # beam search: True, False or "never" (see _BeamHypotheses.is_done)
    output_scores: bool = False  # keep each step's processed scores
    return_dict_in_generate: bool = False  # return the Generate...Output rather than the tokens alone
    generator: Optional[torch.Generator] = None  # for the draws; None: torch's global generator, as the reference
    on_token: Optional[Callable] = None  # on_token(tokens (B,)) after each step, for streaming
    cache: str = "static"  # "static": a StaticCache, written in place; "tuple": the reference's growing tuples
    # One decoding step, with decode_step's contract: fast_decode_step, or fixed_shape_step for compile=True.
    step: Optional[Callable] = None


def prepare_generation(model, input_ids=None, attention_mask=None, generation_config=None, generator=None,
                       on_token=None, stop_at_eos=True, cache="static", compile=False, **kwargs):
    """generate()'s arguments -> (input_ids, attention_mask, GenerationOptions), as the reference prepares them,
    everything checked before any work.

    The options: generation_config (default model.generation_config; when given, its unset special tokens come
    from the model's) with kwargs, GenerationConfig fields, on top (any other name is a TypeError). input_ids
    None is one row of bos_token_id. eos_token_id becomes a tuple (None with stop_at_eos=False), pad_token_id
    defaults to the first eos id. Without an attention_mask: 0 where pad_token_id occurs, if it was set and is
    not an eos id, else ones (as the reference). Lengths: N = max_new_tokens if set, else max_length - T; eos is
    forbidden until min_new_tokens new tokens, else min_length tokens. For greedy decoding and sampling, each
    prompt and its mask are repeated num_return_sequences times (rows grouped by prompt); beam search expands
    its own. The processors come from logits_processors. Returns the prompts and mask on the model's device.
    A special token id the model would read must be one of its token embedding's rows: bos_token_id when it is
    the prompt, the padding when a finished row can carry it into the next step (_check_pad_token).

    The GenerationConfig fields generate() takes as keywords, by what they set:
      lengths      max_length=20 (the prompt included), max_new_tokens (wins when both are given),
                   min_length, min_new_tokens (eos is forbidden until then)
      strategy     greedy by default; do_sample=True draws from the softmax; num_beams > 1: beam search, with
                   length_penalty, early_stopping (True, False or "never") and num_return_sequences
      sampling     temperature=1.0, top_k=50 (0 or None: off), top_p=1.0; num_return_sequences per prompt
      repetition   repetition_penalty, no_repeat_ngram_size, bad_words_ids (see logits_processors)
      tokens       eos_token_id (an int or a list), pad_token_id (default: the first eos), bos_token_id (the
                   prompt when input_ids is None)
      outputs      return_dict_in_generate=True returns GenerateDecoderOnlyOutput (sequences, scores) or, for
                   beams, GenerateBeamDecoderOnlyOutput (also sequences_scores, beam_indices); output_scores=True
                   fills in the scores
    And generate()'s own, beyond the reference: generator, a torch.Generator for the draws (default: torch's
    global one, so that torch.manual_seed gives the reference's tokens); on_token(tokens (B,)) after each step,
    for streaming; stop_at_eos=False never stops early; cache="static" (the default) keeps keys and values in a
    StaticCache, written in place, cache="tuple" in the reference's growing tuples; compile=True (greedy decoding
    and sampling, with the static cache) makes the step fixed_shape_step, which runs each step after the prompt
    through torch.compile: the first call compiles, for a minute or more, later calls with the same shapes reuse
    it. Otherwise the step is fast_decode_step (decode_step with a faster head).
    """
    names = {f.name for f in fields(GenerationConfig)} - {"extra"}
    for name in kwargs:
        if name in UNSUPPORTED_GENERATION_FIELDS:
            raise TypeError(f"generate() does not implement the reference's {name}")
        if name not in names:
            raise TypeError(f"generate() got an unexpected keyword argument {name!r}")
    if generation_config is None:
        config = model.generation_config
    elif isinstance(generation_config, GenerationConfig):
        own = model.generation_config
        config = replace(generation_config, **{k: getattr(own, k) for k in ("bos_token_id", "eos_token_id",
                                                                             "pad_token_id")
                                               if getattr(generation_config, k) is None})
    else:
        raise TypeError(f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}")
    config = replace(config, **kwargs)
    for name in sorted(config.extra):  # e.g. from generation_config.json
        if name in UNSUPPORTED_GENERATION_FIELDS and config.extra[name] != UNSUPPORTED_GENERATION_FIELDS[name]:
            raise ValueError(f"the generation config sets {name}={config.extra[name]!r}, which this generate() does "
                             f"not implement; set it to {UNSUPPORTED_GENERATION_FIELDS[name]!r} or remove it")
    scored = model.lm_head.weight.size(0)  # the token ids the head scores: 0 .. scored - 1
    _check_generation_config(config, scored)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__} {generator!r:.40}")
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token must be a function called with each step's tokens, got {on_token!r:.40}")
    if on_token is not None and config.num_beams > 1:
        raise ValueError("on_token streams one token per row and step, but beam search reorders its rows each step; "
                         "pass num_beams=1 to stream (the reference's streamer refuses beams too)")
    eos = config.eos_token_id
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,) if eos is not None else None
    pad = config.pad_token_id if config.pad_token_id is not None else eos[0] if eos is not None else None
    rows = model.transformer.wte.num_embeddings  # the token ids the model reads: 0 .. rows - 1
    if input_ids is None:
        if config.bos_token_id is None:
            raise ValueError("input_ids is None and the generation config has no bos_token_id to start from; "
                             "give a prompt")
        if config.bos_token_id >= rows:  # the reference fails too, in the embedding, at the first step
            source = _token_source("bos_token_id", kwargs, generation_config)
            raise ValueError(f"bos_token_id {config.bos_token_id}{source} is not a token id of this model: ids are "
                             f"in [0, {rows}); generation starts from it when input_ids is None: give a prompt, or "
                             f"a bos_token_id below {rows}")
        input_ids = torch.full((1, 1), config.bos_token_id, dtype=torch.long)
    N, min_length = _check_generate_args(model, input_ids, attention_mask, config)
    device = model.transformer.wte.weight.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
        if config.pad_token_id is not None and (eos is None or config.pad_token_id not in eos):
            attention_mask = (input_ids != config.pad_token_id).long()  # as the reference infers it
            _check_left_padding(attention_mask, input_ids, f" (inferred from pad_token_id={config.pad_token_id}; "
                                                           "pass attention_mask to say which tokens are padding)")
    attention_mask = attention_mask.to(device)
    if config.num_beams == 1 and config.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
    from_eos = config.pad_token_id is None  # then the padding is the first eos id
    _check_pad_token(pad, rows, scored, input_ids.size(0), N, eos if stop_at_eos else None, from_eos,
                     _token_source("eos_token_id" if from_eos else "pad_token_id", kwargs, generation_config))
    # beam sampling keeps enough tokens that a beam can continue even if all the eos ids are among them
    keep = (len(eos) + 1 if eos is not None else 2) if config.num_beams > 1 else 1
    if cache not in ("static", "tuple"):
        raise ValueError(f'cache must be "static" or "tuple", got {cache!r}')
    _check_compile_args(model, compile, cache, config.num_beams)
    options = GenerationOptions(
        max_new_tokens=N, do_sample=config.do_sample, processors=logits_processors(config, min_length, eos, keep),
        eos=eos if stop_at_eos else None, pad=pad, num_beams=config.num_beams,
        num_return_sequences=config.num_return_sequences, length_penalty=config.length_penalty,
        early_stopping=config.early_stopping, output_scores=config.output_scores,
        return_dict_in_generate=config.return_dict_in_generate, generator=generator, on_token=on_token,
        cache=cache, step=fixed_shape_step if compile else fast_decode_step,
    )
    return input_ids, attention_mask, options


def _token_source(name: str, kwargs: dict, generation_config) -> str:
    """Where generate() took a special token id from, for a message: nothing when the caller passed it."""
    if name in kwargs:
        return ""
    if generation_config is not None and getattr(generation_config, name) is not None:
        return " (from the generation_config passed to generate())"
    return " (from the model's generation config: its generation_config.json, else config.json)"


def _check_pad_token(pad, rows: int, scored: int, batch: int, N: int, eos, from_eos: bool, source: str):
    """The padding a finished row carries must be a token id of the model (one of its embedding's `rows`) when
    it can be fed back: with batch > 1 rows (prompts, for beam search), N > 1 new tokens and an eos id the head
    can emit (one of its `scored`), a row that finishes before the others carries pad into the next step, where
    the model looks it up; the reference fails there, mid-generation. Otherwise pad is at most written into the
    result, as the reference does with any id, and an eos id the model never emits merely never stops a row:
    neither is refused. pad: pad_token_id, or (from_eos) the first eos id when it is unset; eos: the eos ids
    that stop a row (None: none); source: where pad came from (_token_source)."""
    if pad is None or pad < rows or eos is None or not any(e < scored for e in eos) or batch < 2 or N < 2:
        return
    what = (f"pad_token_id is not set, so the padding is the first eos_token_id, {pad}{source}, which" if from_eos
            else f"pad_token_id {pad}{source}")
    raise ValueError(f"{what} is not a token id of this model: ids are in [0, {rows}); a row that finishes before "
                     f"the others carries the padding into the next step, where the model reads it; pass a "
                     f"pad_token_id below {rows}" + (", or correct eos_token_id" if from_eos else ""))


def logits_processors(config: GenerationConfig, min_length: int, eos, keep: int = 1) -> list:
    """The reference's logits processors for these options, in its order (GenerationMixin._get_logits_processor):
    each f(tokens so far (B, L), scores (B, V)) -> scores, applied one after the other to every step's scores
    (the logits; log-probabilities in beam search). One that is not asked for is left out, so that plain greedy
    decoding has none and does no extra work.
      1. repetition_penalty, when not 1.0                       (RepetitionPenaltyLogitsProcessor)
      2. no_repeat_ngram, when no_repeat_ngram_size > 0         (NoRepeatNGramLogitsProcessor)
      3. ban_bad_words, for bad_words_ids but [eos] itself      (NoBadWordsLogitsProcessor)
      4. forbid_eos until min_length tokens, when there is eos  (MinLength, MinNewTokensLengthLogitsProcessor)
      sampling only (the reference's "warpers"):
      5. divide by temperature, when not 1.0                    (TemperatureLogitsWarper)
      6. top_k_filter, when top_k is not 0 or None              (TopKLogitsWarper)
      7. top_p_filter, when top_p < 1.0                         (TopPLogitsWarper)
    min_length: the resolved minimum length (prompt included); eos: the eos ids (a tuple) or None; keep: tokens
    top-k and top-p always keep (beam sampling keeps more, so that every beam can continue).
    """
    processors = []
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(lambda ids, scores: repetition_penalty(ids, scores, config.repetition_penalty))
    if config.no_repeat_ngram_size:
        processors.append(lambda ids, scores: no_repeat_ngram(ids, scores, config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        words = [list(w) for w in config.bad_words_ids if eos is None or list(w) not in [[e] for e in eos]]
        if words:
            processors.append(lambda ids, scores: ban_bad_words(ids, scores, words))
    if eos is not None and min_length > 0:
        processors.append(lambda ids, scores: forbid_eos(ids, scores, min_length, eos))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(lambda ids, scores: scores / config.temperature)
        if config.top_k:
            processors.append(lambda ids, scores: top_k_filter(scores, config.top_k, keep))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(lambda ids, scores: top_p_filter(scores, config.top_p, keep))
    return processors


def apply_processors(processors, input_ids, scores):
    """scores (B, V) through each processor in turn, f(input_ids (B, L), scores) -> scores: the next token's
    logits (log-probabilities in beam search) as the reference's LogitsProcessorList turns them into the
    scores a token is chosen from. No processors: the scores themselves, no work."""
    for process in processors:
        scores = process(input_ids, scores)
    return scores


def tokens_present(ids, V: int):
    """ids (B, K) of token ids -> (B, V) bool: True at [b, v] where row b holds token v. Ids >= V, which the head
    does not score (ImageGPT's SOS), are left out. Repeated ids count once."""
    present = torch.zeros(ids.size(0), V + 1, dtype=torch.bool, device=ids.device)  # column V: "not scored"
    return present.scatter_(1, ids.clamp(max=V), True)[:, :V]


def repetition_penalty(input_ids, scores, penalty: float):
    """Make the tokens already in each sequence less likely (CTRL, Keskar et al. 2019): input_ids (B, L), the
    sequences so far, prompt included (padding too, as the reference); scores (B, V) -> (B, V), a new tensor.

    Every token that occurs in row b, however often, has its score in row b moved against it once: a positive
    score is divided by penalty, a negative one multiplied by it (penalty > 1 penalises, < 1 favours; 1 changes
    nothing). Scores of tokens not in the row are unchanged. Token ids the scores have no column for (ImageGPT's
    SOS) are ignored."""
    seen = tokens_present(input_ids, scores.size(-1))  # (B, V)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def no_repeat_ngram(input_ids, scores, n: int):
    """Forbid every token that would complete an n-gram the row already holds (fairseq's no-repeat n-gram):
    input_ids (B, L), the sequences so far, prompt included; scores (B, V) -> (B, V), a new tensor.

    In row b, the last n - 1 tokens are the start of the next n-gram. Wherever those same n - 1 tokens occur
    earlier in the row, followed by a token t, generating t would repeat that n-gram, so scores[b, t] becomes
    -inf. With n = 1 every token already in the row is forbidden. While L < n no n-gram can be completed:
    nothing changes. Tokens the scores have no column for are ignored."""
    L = input_ids.size(1)
    if L < n:
        return scores
    ngrams = input_ids.unfold(1, n, 1)  # (B, L - n + 1, n): every n-gram so far, a view
    last = input_ids[:, L - n + 1:]  # (B, n - 1): what the next n-gram starts with
    repeats = (ngrams[:, :, :-1] == last[:, None, :]).all(dim=-1)  # (B, L - n + 1): n-grams starting that way
    V = scores.size(-1)
    completing = torch.where(repeats, ngrams[:, :, -1], V)  # the token each such n-gram continues with; V: none
    return scores.masked_fill(tokens_present(completing, V), float("-inf"))


def ban_bad_words(input_ids, scores, bad_words_ids):
    """Never generate any of the token sequences in bad_words_ids (a list of lists of token ids): input_ids
    (B, L), the sequences so far, prompt included; scores (B, V) -> (B, V), a new tensor.

    A one-token word is forbidden always: its score becomes -inf in every row. A longer word's last token is
    forbidden in the rows whose last tokens are the rest of the word (the word minus its last token), so the
    word is never completed; a word longer than L is skipped (as the reference)."""
    banned = torch.zeros_like(scores, dtype=torch.bool)  # (B, V)
    for word in bad_words_ids:
        if len(word) == 1:
            banned[:, word[0]] = True
        elif len(word) <= input_ids.size(1):
            prefix = torch.tensor(word[:-1], dtype=input_ids.dtype, device=input_ids.device)
            banned[:, word[-1]] |= (input_ids[:, input_ids.size(1) - len(prefix):] == prefix).all(dim=1)
    return scores.masked_fill(banned, float("-inf"))


def forbid_eos(input_ids, scores, min_length: int, eos):
    """Minimum length: while the sequences (input_ids (B, L), prompt included) are shorter than min_length tokens,
    no eos token (eos: a tuple of ids) may be generated: their scores (B, V) become -inf, in a new tensor. From
    L >= min_length on the scores are returned unchanged."""
    if input_ids.size(1) >= min_length:
        return scores
    eos_ids = torch.tensor(eos, device=scores.device)[None]  # (1, E)
    return scores.masked_fill(tokens_present(eos_ids, scores.size(-1)), float("-inf"))


def top_k_filter(logits, k: int, min_keep: int = 1):
    """logits (B, V) -> (B, V): keep the k largest logits of each row (at least min_keep, at most
    V); the rest become -inf (probability 0). Ties at the k-th value are all kept. The input is not
    modified."""
    k = min(max(k, min_keep), logits.size(-1))
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits, p: float, min_keep: int = 1):
    """Nucleus sampling: logits (B, V) -> (B, V). In each row, keep the smallest set of most likely
    tokens whose probabilities (softmax of the row) sum to at least p; the rest become -inf: remove
    the least likely tokens whose probabilities together sum to at most 1 - p. The min_keep most
    likely tokens are always kept, whatever p. The input is not modified."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)  # least likely first
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    remove_sorted = cumulative <= (1 - p)  # the unlikely tail whose total mass is at most 1 - p
    remove_sorted[..., -min_keep:] = False  # always keep the most likely tokens
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


# --- Beam search ------------------------------------------------------------------------------------


def reorder_cache(past_key_values, beam_idx):
    """Beam search keeps the best beams each step: pick the cache rows of the beams that survived (beam_idx
    (B,), row indices). A StaticCache is reordered in place, each layer's tensors replaced by their rows."""
    if isinstance(past_key_values, StaticCache):
        cache = past_key_values
        for layer in cache.keys:
            rows = beam_idx.to(cache.keys[layer].device)
            cache.keys[layer] = cache.keys[layer].index_select(0, rows)
            cache.values[layer] = cache.values[layer].index_select(0, rows)
        return cache
    return tuple(
        tuple(state.index_select(0, beam_idx.to(state.device)) for state in layer_past)
        for layer_past in past_key_values
    )


class _BeamHypotheses:
    """The num_beams best finished sequences of one prompt, each scored by its sum of log-probabilities /
    generated length ** length_penalty (the reference's BeamHypotheses). early_stopping says when the prompt is
    done (is_done); max_new_tokens is the most new tokens a hypothesis can have, which early_stopping="never"
    needs."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping=False, max_new_tokens: int = 0):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.early_stopping, self.max_new_tokens = early_stopping, max_new_tokens
        self.beams: List[tuple] = []  # (score, tokens, beam_indices), in the order added (not sorted)
        self.worst_score = 1e9

    def add(self, tokens, sum_logprobs: float, generated_len: int, beam_indices=None):
        """Keep the hypothesis if there is room, or if it beats the worst kept one, which then goes."""
        score = sum_logprobs / (generated_len ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, tokens, beam_indices))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.beams))  # worst first
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, generated_len: int) -> bool:
        """Done when num_beams hypotheses are kept and (early_stopping=True) at once; (False) when the best live
        beam, scored at its present length, cannot beat the worst kept one; ("never") nor at any length it may
        still reach (the longest, for a positive length penalty)."""
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            generated_len = self.max_new_tokens
        return self.worst_score >= best_sum_logprobs / generated_len ** self.length_penalty


def _beam_search(model, input_ids, attention_mask, options):
    """Beam search as the reference does it; returns a GenerateBeamDecoderOnlyOutput whose sequences are
    (B * num_return_sequences, length), length <= T + N.

    options: the GenerationOptions, nb = options.num_beams, N = options.max_new_tokens. Each prompt keeps nb partial
    sequences (rows b * nb .. b * nb + nb - 1 of a (B * nb, ...) batch, with the cache (a StaticCache, or tuples for
    options.cache="tuple"); each prompt's mask and positions serve all its beams). All beams start from the same prompt, so at
    the first step only beam 0 may expand (the others start at -1e9). Each step takes log_softmax of every beam's
    next-token logits, puts them through options.processors (apply_processors, with the beams' tokens so far), adds
    the beam's summed score, and views the result (B, nb * V): every continuation (beam, token) of a prompt. From
    these it takes K = max(2, 1 + number of eos ids) * nb candidates, best first: the top K, or with
    options.do_sample K drawn without replacement from their softmax (options.generator), then sorted. Going down
    that list: a continuation ending in an eos id is added to the prompt's _BeamHypotheses (options.length_penalty,
    options.early_stopping; without the eos token, with generated length cur_len - T) only if it ranks among the
    first nb; any other becomes a live beam, until nb are live. A prompt is done once its hypotheses say so (is_done
    with the best candidate's score); a done prompt's beams carry options.pad (and, as the reference's, row 0's
    cache: what they compute is never used). The cache is reordered to follow the surviving beams
    (model._reorder_cache). The loop ends when all prompts are done or after N steps; then live beams of unfinished
    prompts are added as hypotheses too. Each prompt's best options.num_return_sequences hypotheses, best first, are
    written left-aligned into a options.pad-filled result of length min(longest + 1, T + N), each followed by the
    first eos id where it is shorter than that. With options.output_scores, also scores (each step's processed
    log-probabilities (B * nb, V)), sequences_scores (each hypothesis' score) and beam_indices (the row of the beam
    each token came from, -1 after its end)."""
    B, T = input_ids.shape
    nb, N = options.num_beams, options.max_new_tokens
    device = input_ids.device
    tokens = input_ids.repeat_interleave(nb, dim=0)  # (B * nb, T)
    attention_mask = attention_mask.repeat_interleave(nb, dim=0)
    position_ids = _positions_from_mask(attention_mask)
    beam_scores = torch.zeros(B, nb, device=device)
    beam_scores[:, 1:] = -1e9  # all beams start identical: let only the first one expand at step one
    beam_scores = beam_scores.view(-1)  # (B * nb,)
    hyps = [_BeamHypotheses(nb, options.length_penalty, options.early_stopping, N) for _ in range(B)]
    done = [False] * B
    eos = options.eos or ()
    K = max(2, 1 + len(eos)) * nb  # enough that nb survive even if every eos id is among the best
    steps_scores = []
    beam_indices = [()] * (B * nb) if options.output_scores else None  # per row: the rows its tokens came from
    past = StaticCache(min(T + N, model.config.n_positions)) if options.cache == "static" else None
    step_input = tokens
    for _ in range(N):
        out = model(step_input, past_key_values=past, attention_mask=attention_mask,
                    position_ids=position_ids[:, -step_input.size(1):], use_cache=True)
        scores = apply_processors(options.processors, tokens, F.log_softmax(out.logits[:, -1, :].float(), dim=-1))
        if options.output_scores:
            steps_scores.append(scores)
        V = scores.size(-1)
        candidates = (scores + beam_scores[:, None]).view(B, nb * V)  # every beam x token continuation
        if options.do_sample:
            top_ids = torch.multinomial(F.softmax(candidates, dim=-1), K, generator=options.generator)
            top_scores, order = torch.sort(torch.gather(candidates, -1, top_ids), descending=True, dim=1)
            top_ids = torch.gather(top_ids, -1, order)
        else:
            top_scores, top_ids = torch.topk(candidates, K, dim=1, largest=True, sorted=True)  # (B, K)
        beam_of, token_of = top_ids // V, top_ids % V
        cur_len = tokens.size(1) + 1
        next_scores = torch.zeros(B, nb, device=device)
        next_tokens = torch.zeros(B, nb, dtype=torch.long, device=device)
        next_beams = torch.zeros(B, nb, dtype=torch.long, device=device)
        for b in range(B):
            if done[b]:  # this prompt is finished: its beams carry padding (and row 0's cache, as the reference)
                next_tokens[b], next_beams[b] = options.pad, 0
                continue
            kept = 0
            for rank in range(K):
                source = b * nb + int(beam_of[b, rank])
                token, score = int(token_of[b, rank]), float(top_scores[b, rank])
                if token in eos:
                    if rank < nb:  # a finished sequence counts only if it ranks among the top beams
                        came_from = beam_indices[source] + (source,) if beam_indices is not None else None
                        hyps[b].add(tokens[source].clone(), score, cur_len - T, came_from)
                else:
                    next_scores[b, kept], next_tokens[b, kept], next_beams[b, kept] = score, token, source
                    kept += 1
                if kept == nb:
                    break
            done[b] = done[b] or hyps[b].is_done(float(top_scores[b].max()), cur_len - T)
        beam_idx = next_beams.view(-1)
        beam_scores = next_scores.view(-1)
        tokens = torch.cat([tokens[beam_idx], next_tokens.view(-1, 1)], dim=1)
        past = model._reorder_cache(out.past_key_values, beam_idx)
        if beam_indices is not None:
            beam_indices = [beam_indices[i] + (i,) for i in beam_idx.tolist()]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B * nb, 1)], dim=1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)
        step_input = next_tokens.view(-1, 1)
        if all(done):
            break
    # Beams still alive compete with the finished hypotheses on equal terms.
    for b in range(B):
        if not done[b]:
            for i in range(nb):
                source = b * nb + i
                came_from = beam_indices[source] if beam_indices is not None else None
                hyps[b].add(tokens[source], float(beam_scores[source]), tokens.size(1) - T, came_from)
    best = []  # (score, tokens, beam_indices): each prompt's best num_return_sequences, best first
    for b in range(B):
        ranked = sorted(hyps[b].beams, key=lambda h: h[0])  # worst first; on a tie, the later added is better
        best += [ranked.pop() for _ in range(options.num_return_sequences)]
    length = min(max(len(h[1]) for h in best) + 1, T + N)
    sequences = torch.full((len(best), length), options.pad if options.pad is not None else 0, dtype=torch.long,
                           device=device)
    for i, (_, seq, _) in enumerate(best):
        sequences[i, : len(seq)] = seq
        if len(seq) < length and options.eos is not None:
            sequences[i, len(seq)] = options.eos[0]  # a hypothesis that finished ends with an eos token
    if not options.output_scores:
        return GenerateBeamDecoderOnlyOutput(sequences=sequences)
    indices = torch.full((len(best), length), -1, dtype=torch.long, device=device)
    for i, (_, _, came_from) in enumerate(best):
        indices[i, : len(came_from)] = torch.tensor(came_from, dtype=torch.long)
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences, sequences_scores=torch.tensor([h[0] for h in best], device=device),
        scores=tuple(steps_scores), beam_indices=indices)


# --- Pruning heads ----------------------------------------------------------------------------------


def find_pruneable_heads_and_indices(heads, n_heads: int, head_size: int, already_pruned: set):
    """Which heads still need pruning, and the channel indices to keep in the remaining width.

    heads: head numbers of the original model; n_heads, head_size: the heads still present now and their size;
    already_pruned: the original numbers of heads removed before. Heads already pruned are ignored. After
    earlier pruning, a head's channels sit further left, by one head size for every smaller-numbered head
    already removed. Returns (set of heads to prune now, LongTensor of the kept channel indices within the
    current n_heads * head_size width of one of q, k or v, in increasing order).
    """
    heads = set(heads) - already_pruned
    keep = torch.ones(n_heads, head_size)  # (nh_now, hs): 1 = keep this channel
    for head in heads:
        head = head - sum(1 for h in already_pruned if h < head)  # position among the heads still here
        keep[head] = 0
    index = torch.arange(len(keep.view(-1)))[keep.view(-1).eq(1)]
    return heads, index


def prune_conv1d_layer(layer: Conv1D, index: torch.Tensor, dim: int = 1) -> Conv1D:
    """A new, smaller Conv1D keeping only `index` along `dim` of the weight (0: input rows; 1: output columns,
    and then the same entries of the bias; with dim 0 the bias is kept whole). The new layer is on the old
    one's device and dtype, its parameters are copies (not views) and keep their requires_grad."""
    index = index.to(layer.weight.device)
    weight = layer.weight.index_select(dim, index).detach().clone()
    bias = layer.bias.detach().clone() if dim == 0 else layer.bias[index].detach().clone()
    new_layer = Conv1D(weight.size(1), weight.size(0)).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new_layer.weight.copy_(weight)
        new_layer.bias.copy_(bias)
    new_layer.weight.requires_grad = layer.weight.requires_grad
    new_layer.bias.requires_grad = layer.bias.requires_grad
    return new_layer


def prune_attention_heads(attn, heads):
    """Remove whole heads (original head numbers; ones already pruned are ignored; nothing left to prune
    changes nothing): their columns of c_attn in each of q, k and v (each split_size wide; only k and v for
    cross-attention, whose q_attn loses the same columns), and their rows of c_proj (whose bias stays).
    Afterwards num_heads, split_size and pruned_heads describe what is left."""
    heads, index = find_pruneable_heads_and_indices(heads, attn.num_heads, attn.head_dim, attn.pruned_heads)
    if len(heads) == 0:
        return
    index_attn = torch.cat([index + i * attn.split_size for i in range(3 if not attn.is_cross_attention else 2)])
    attn.c_attn = prune_conv1d_layer(attn.c_attn, index_attn, dim=1)
    if attn.is_cross_attention:
        attn.q_attn = prune_conv1d_layer(attn.q_attn, index, dim=1)
    attn.c_proj = prune_conv1d_layer(attn.c_proj, index, dim=0)
    attn.num_heads -= len(heads)
    attn.split_size = attn.head_dim * attn.num_heads
    attn.pruned_heads = attn.pruned_heads.union(heads)


def prune_model_heads(model, heads_to_prune: Dict[int, List[int]]):
    """Remove attention heads, {layer: [heads]}, numbered as in the unpruned model. Pruning a head twice
    is a no-op. The config records them, so a saved model rebuilds the same shapes."""
    if not isinstance(heads_to_prune, dict) or not all(
            type(layer) is int and isinstance(heads, (list, tuple, set)) and all(type(h) is int for h in heads)
            for layer, heads in heads_to_prune.items()):
        raise TypeError(f"heads_to_prune must be a dict {{layer: [head, ...]}} of ints, got {heads_to_prune!r:.80}")
    for layer, heads in heads_to_prune.items():
        if not 0 <= layer < model.config.n_layer or any(not 0 <= h < model.config.n_head for h in heads):
            raise ValueError(
                f"prune_heads got layer {layer} heads {list(heads)}; layers are 0..{model.config.n_layer - 1} "
                f"and heads 0..{model.config.n_head - 1}"
            )
        if len(set(heads) | model.h[layer].attn.pruned_heads) >= model.config.n_head:
            raise ValueError(f"prune_heads would remove every head of layer {layer}; keep at least one")
    for layer, heads in heads_to_prune.items():
        model.h[layer].attn.prune_heads(heads)
        pruned = sorted(model.h[layer].attn.pruned_heads)
        if pruned:
            model.config.pruned_heads[layer] = pruned


# --- Head masks, device maps, gradient checkpointing ------------------------------------------------


def expand_head_mask(head_mask, n_layer: int, dtype):
    """head_mask (nh,) or (n_layer, nh) of 0/1 -> (n_layer, 1, nh, 1, 1): row i masks block i's heads and
    broadcasts over the batch and the (T, K) attention weights. None gives n_layer Nones, as the reference's
    get_head_mask, so that head_mask[i] is block i's either way."""
    if head_mask is None:
        return [None] * n_layer
    return head_mask.to(dtype).expand(n_layer, -1)[:, None, :, None, None]


def to_device(inputs: dict, device) -> dict:
    """A block's keyword arguments with every tensor among them on `device` (a no-op where it is already);
    anything else (None, a cache) as it is."""
    return {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}


def follow_device_map(model, block, hidden_states, inputs: dict):
    """(hidden_states, inputs) on the device of the block they enter next: with a device map (parallelize) the
    activations move to the block's device; the masks in `inputs`, the block's keyword arguments, follow them."""
    if model.device_map is not None:
        hidden_states = hidden_states.to(block.ln_1.weight.device)
    return hidden_states, to_device(inputs, hidden_states.device)


def parallelize_model(model, device_map: Optional[Dict[object, List[int]]] = None):
    """Spread the blocks over several devices, {device: [block indices]}, e.g. {0: [0, 1, 2], 1: [3, 4, 5]}
    for cuda:0 and cuda:1 (keys may also be device strings such as "cpu"). Embeddings go to the first
    device, ln_f to the last; activations move between devices as they flow. Default: blocks split
    evenly over all visible GPUs."""
    n = len(model.h)
    if device_map is None:
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError("parallelize() without a device_map needs CUDA devices; none are visible")
        per = math.ceil(n / count)
        device_map = {d: list(range(d * per, min(n, (d + 1) * per))) for d in range(count)}
    placed = sorted(b for blocks in device_map.values() for b in blocks)
    if placed != list(range(n)):
        raise ValueError(f"device_map must place every block 0..{n - 1} exactly once, got blocks {placed}")
    devices = {k: resolve_device(f"cuda:{k}" if isinstance(k, int) else str(k)) for k in device_map}  # exist?
    model.device_map = device_map
    model.first_device = devices[next(k for k in device_map if 0 in device_map[k])]
    model.last_device = devices[next(k for k in device_map if n - 1 in device_map[k])]
    model.wte.to(model.first_device)
    model.wpe.to(model.first_device)
    for key, blocks in device_map.items():
        for b in blocks:
            model.h[b].to(devices[key])
    model.ln_f.to(model.last_device)


def deparallelize_model(model):
    """Bring every part back to the CPU."""
    model.device_map = None
    model.to("cpu")


def checkpointed_block(block, hidden_states, layer_past=None, use_cache=False, **inputs):
    """block(hidden_states, **inputs) under gradient checkpointing: only its input is kept, and its insides are
    recomputed during the backward pass. Without a cache (layer_past and use_cache are ignored): it would hold
    the activations checkpointing drops."""
    return torch.utils.checkpoint.checkpoint(block, hidden_states, use_reentrant=False, **inputs)


# --- Input checks -----------------------------------------------------------------------------------


def _shape_error(name, got, expected, fix=""):
    return ValueError(f"{name} has shape {tuple(got)}, expected {expected}" + (f" ({fix})" if fix else ""))


def _check_indices(name, ids, limit, limit_name="vocab_size", what="token id", note=""):
    """Token ids (and other indices) must be integers in [0, limit): an embedding lookup outside it
    crashes on the CPU and corrupts silently or asserts on a GPU. note: said after the message."""
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    # Not while torch.compile traces (train --compile): reading values back into Python would split the
    # graph and wait for the device on every step. Compiled callers' ids come checked, from the data loader.
    if ids.numel() > 0 and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= limit:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds {what} {bad}, but {limit_name} is {limit} ({what}s must be in [0, {limit}))"
                             + note)


def check_token_ids(name, ids, wte: nn.Embedding, config):
    """Token ids look up rows of the token embedding wte, so they must be below its number of rows. That is
    config.vocab_size, unless the config was edited after the model was built: then the embedding is what a
    lookup fails on (with torch's bare "index out of range in self"), and the message says the two disagree."""
    rows = wte.num_embeddings
    if rows == config.vocab_size:
        _check_indices(name, ids, rows)
    else:
        _check_indices(name, ids, rows, "the token embedding's number of rows (wte.num_embeddings)",
                       note=f"; config.vocab_size says {config.vocab_size}: it was changed after the model was "
                            f"built, and the model still reads only ids below {rows}")


def _input_shape(input_ids, inputs_embeds):
    """(B, T), or (B, n_choices, T), of the inputs; None when neither is given (the body then says so)."""
    if input_ids is not None:
        return tuple(input_ids.shape)
    return tuple(inputs_embeds.shape[:-1]) if inputs_embeds is not None else None


def _check_cache_tuples(model, past_key_values, batch: int) -> int:
    """The reference's cache layout, past_key_values: per layer a pair (keys, values), each (B, nh, P, hs), in
    the dtype the layer computes in (its weights', or autocast's, which casts them itself). Anything else would
    fail deep inside attention: a float64 cache of a float32 model in SDPA's "Expected query, key, and value to
    have the same dtype". Returns P, the cached positions."""
    cfg = model.config
    if not isinstance(past_key_values, (tuple, list)):
        raise TypeError(f"past_key_values must be a StaticCache or, per layer, a pair (keys, values) of tensors "
                        f"(B, nh, P, hs), got {type(past_key_values).__name__}")
    if len(past_key_values) != cfg.n_layer:
        raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model has {cfg.n_layer}")
    for i, layer in enumerate(past_key_values):
        if not (isinstance(layer, (tuple, list)) and len(layer) == 2 and
                all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in layer)):
            got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in layer] \
                if isinstance(layer, (tuple, list)) else type(layer).__name__
            raise ValueError(f"past_key_values[{i}] must be a pair (keys, values) of tensors (B, nh, P, hs), "
                             f"got {got}")
    past_length = past_key_values[0][0].size(-2)
    device_type = model.wte.weight.device.type
    for i, (k, v) in enumerate(past_key_values):
        nh = model.h[i].attn.num_heads
        expected = (batch, nh, past_length, cfg.n_embd // cfg.n_head)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise _shape_error(f"past_key_values[{i}]", k.shape, f"(B, nh, P, hs) = {expected}")
        dtype = model.h[i].attn.c_attn.weight.dtype  # the dtype of the new keys, values and queries
        if k.dtype != dtype or v.dtype != dtype:
            if torch.is_autocast_enabled(device_type) and k.is_floating_point() and v.is_floating_point():
                continue  # autocast casts the attention's inputs to one dtype
            raise ValueError(f"past_key_values[{i}] holds {k.dtype} keys and {v.dtype} values, but the model "
                             f"computes in {dtype}; pass the cache a forward of this model returned, or convert it: "
                             f"tuple((k.to({dtype}), v.to({dtype})) for k, v in past_key_values)")
    return past_length


def check_model_inputs(
    model, input_ids, inputs_embeds, past_key_values, attention_mask, token_type_ids, position_ids, head_mask,
    encoder_hidden_states, encoder_attention_mask,
):
    """Every shape and range the forward pass relies on, checked before any work, so a mistake gives a
    clear message instead of a broadcast that silently does the wrong thing or an error deep in torch."""
    cfg = model.config
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, C)")
    if input_ids is not None:
        if input_ids.dim() < 1:
            raise _shape_error("input_ids", input_ids.shape, "(B, T)")
        check_token_ids("input_ids", input_ids, model.wte, cfg)
        input_shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() < 2 or inputs_embeds.size(-1) != cfg.n_embd:
            raise _shape_error("inputs_embeds", inputs_embeds.shape, f"(B, T, {cfg.n_embd})")
        input_shape = tuple(inputs_embeds.shape[:-1])
    if 0 in input_shape:  # nothing to compute: say so here, not in a reshape deep inside attention
        name, given = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
        raise _shape_error(name, given.shape, "at least one sequence of at least one token", "an empty batch")
    T = input_shape[-1]
    batch = math.prod(input_shape[:-1])
    past_length = 0
    if isinstance(past_key_values, StaticCache):
        past_length = past_key_values.length
        if past_key_values.max_length > cfg.n_positions:  # its first update allocates every slot
            raise ValueError(f"the StaticCache holds {past_key_values.max_length:,} positions, more than the model's "
                             f"n_positions={cfg.n_positions}; make it with max_length <= {cfg.n_positions}")
        if past_length + T > past_key_values.max_length:
            raise ValueError(f"the StaticCache holds {past_key_values.max_length} positions, {past_length} of them "
                             f"filled: no room for {T} more; make it with a larger max_length")
        if past_key_values.batch_size not in (None, batch):
            raise _shape_error("past_key_values (StaticCache)", (past_key_values.batch_size,), (batch,),
                               "one cache row per sequence")
    elif past_key_values is not None:
        past_length = _check_cache_tuples(model, past_key_values, batch)
    if past_length + T > cfg.n_positions:
        raise ValueError(
            f"the sequence is {past_length + T} tokens long ({past_length} cached + {T} new), but the model "
            f"has n_positions={cfg.n_positions}; crop the input to its last {cfg.n_positions - past_length} tokens"
        )
    if attention_mask is not None:
        expected = input_shape[:-1] + (past_length + T,)
        if tuple(attention_mask.shape) != expected:
            raise _shape_error("attention_mask", attention_mask.shape, expected, "1 per cached and new token")
        if not torch.all((attention_mask == 0) | (attention_mask == 1)):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if token_type_ids is not None:
        if tuple(token_type_ids.shape) != input_shape:
            raise _shape_error("token_type_ids", token_type_ids.shape, input_shape)
        check_token_ids("token_type_ids", token_type_ids, model.wte, cfg)
    if position_ids is not None:
        if position_ids.size(-1) != T or position_ids.dim() > len(input_shape) or \
                math.prod(position_ids.shape[:-1]) not in (1, batch):
            raise _shape_error("position_ids", position_ids.shape, f"(T,), (1, T) or (B, T) with T={T}")
        _check_indices("position_ids", position_ids, cfg.n_positions, "n_positions", "position")
    if head_mask is not None:
        if tuple(head_mask.shape) not in ((cfg.n_head,), (cfg.n_layer, cfg.n_head)):
            raise _shape_error("head_mask", head_mask.shape, f"({cfg.n_head},) or ({cfg.n_layer}, {cfg.n_head})")
        if any(block.attn.pruned_heads for block in model.h):
            raise ValueError("head_mask cannot be combined with pruned heads; mask or prune, not both")
    if encoder_hidden_states is not None:
        if not cfg.add_cross_attention:
            raise ValueError(
                "encoder_hidden_states were given, but this model has no cross-attention; build it with "
                "GPT2Config(add_cross_attention=True)"
            )
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != batch or \
                encoder_hidden_states.shape[2] != cfg.n_embd:
            raise _shape_error("encoder_hidden_states", encoder_hidden_states.shape, f"(B={batch}, S, {cfg.n_embd})")
        if encoder_attention_mask is not None and \
                tuple(encoder_attention_mask.shape) != tuple(encoder_hidden_states.shape[:2]):
            raise _shape_error("encoder_attention_mask", encoder_attention_mask.shape,
                               tuple(encoder_hidden_states.shape[:2]))
        if encoder_attention_mask is not None and \
                not torch.all((encoder_attention_mask == 0) | (encoder_attention_mask == 1)):
            raise ValueError("encoder_attention_mask must hold only 0 (padding) and 1 (token)")
    elif encoder_attention_mask is not None:
        raise ValueError("encoder_attention_mask was given without encoder_hidden_states")
    return input_shape, past_length


def check_labels(name, labels, shape, limit: int, limit_name: str, what: str, per: str = "input token"):
    """Labels with one entry per input token (or per example, per choice), of shape `shape`: ids in
    [0, limit), or -100 where no label applies. Checked before any work: a wrong shape would otherwise be
    flattened into a loss over the wrong pairs, or fail deep inside cross_entropy."""
    if labels is None or shape is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {tuple(shape)}, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(shape):
        raise _shape_error(name, labels.shape, tuple(shape), f"one label per {per}")
    # The ignored -100s are checked as 0 rather than removed: removing them gives a data-dependent shape,
    # which would split a torch.compile'd training step in two.
    _check_indices(name, labels.masked_fill(labels == -100, 0), limit, limit_name, what)


def check_classification_labels(labels, input_shape, num_labels: int, problem_type):
    """labels of the shape classification_loss reads, checked before any work (a wrong shape would be
    broadcast or flattened into a loss over the wrong pairs): (B,) class ids; (B,) or (B, 1) targets for
    one-value regression; (B, num_labels) for several values, or multi-label 0/1 floats."""
    if labels is None or input_shape is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    kind, batch = infer_problem_type(labels, num_labels, problem_type), input_shape[0]
    if kind == "single_label_classification" or (kind == "regression" and num_labels == 1):
        expected, per = ((batch,), (batch, 1)), "one label per example"
    else:
        expected, per = ((batch, num_labels),), f"num_labels={num_labels} values per example"
    if tuple(labels.shape) not in expected:
        raise _shape_error("labels", labels.shape, " or ".join(map(str, expected)), per)
    if kind == "single_label_classification":
        _check_indices("labels", labels.masked_fill(labels == -100, 0), num_labels, "num_labels", "class")


def _check_generate_args(model, input_ids, attention_mask, config) -> Tuple[int, int]:
    """generate()'s prompts (B, T), their mask and lengths, before any work. Returns (N, the number of new tokens:
    max_new_tokens if set, else max_length - T; the minimum length, prompt included: T + min_new_tokens if set,
    else min_length)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a LongTensor of shape (B, T), got {shape}")
    if input_ids.size(0) == 0:
        raise _shape_error("input_ids", input_ids.shape, "(B, T) with B >= 1", "an empty batch: give a prompt")
    T = input_ids.size(1)
    if T == 0:
        raise ValueError("input_ids is empty: give at least one token per row, or input_ids=None to start from "
                         f"bos_token_id ({model.generation_config.bos_token_id})")
    if config.max_new_tokens is not None:
        N, asked = config.max_new_tokens, f"prompt ({T} tokens) + max_new_tokens ({config.max_new_tokens})"
    else:
        N, asked = config.max_length - T, f"max_length ({config.max_length}, the prompt included)"
        if N <= 0:  # the reference raises too
            raise ValueError(f"max_length={config.max_length} counts the prompt, which is already {T} tokens: no "
                             "room for a new one; pass max_new_tokens (new tokens only), or a larger max_length")
    # The last new token is sampled but never fed back, so it needs no position: n_positions + 1 tokens fit.
    if T + N > model.config.n_positions + 1:
        raise ValueError(f"{asked} = {T + N} exceeds n_positions + 1 = "
                         f"{model.config.n_positions + 1}; shorten the prompt or ask for fewer tokens")
    if config.min_new_tokens is not None:
        min_length, asked_min = T + config.min_new_tokens, f"min_new_tokens={config.min_new_tokens} (+ {T} prompt)"
    else:
        min_length, asked_min = config.min_length, f"min_length={config.min_length}"
    if min_length > T + N:  # the reference warns, then stops at the maximum anyway
        raise ValueError(f"{asked_min} asks for {min_length} tokens, more than the maximum {T + N} "
                         f"(prompt {T} + {N} new): lower the minimum or raise the maximum")
    if attention_mask is not None:
        _check_left_padding(attention_mask, input_ids)
    check_generation_memory(model, input_ids.size(0) * max(config.num_beams, config.num_return_sequences), T + N)
    check_token_ids("input_ids", input_ids, model.transformer.wte, model.config)
    return N, min_length


def _check_left_padding(attention_mask, input_ids, where: str = ""):
    """generate()'s attention_mask: the shape of input_ids, 0/1, and in each row the padding (0) first, then the
    prompt's tokens (1), at least one. Every row is continued from its last column, so a right-padded row would
    be continued from its padding, a silently different answer: refused. `where` ends the messages (how the mask
    was made, when generate() inferred it)."""
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise _shape_error("attention_mask", attention_mask.shape, tuple(input_ids.shape))
    if not torch.all((attention_mask == 0) | (attention_mask == 1)):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = attention_mask.long()  # (B, T)
    token_then_padding = mask[:, :-1] > mask[:, 1:]  # (B, T - 1): a 1 followed by a 0
    bad = token_then_padding.any(dim=-1) | (mask[:, -1] == 0)  # (B,)
    if bad.any():
        row = int(bad.nonzero()[0])
        if not mask[row].any():
            raise ValueError(f"attention_mask row {row} is all 0: every prompt needs at least one token (1){where}")
        column = int(token_then_padding[row].nonzero()[0]) + 1
        raise ValueError(f"attention_mask row {row} has padding (0) at column {column}, after a token (1): generate() "
                         "continues each row from its last column, so padding must come first: pad on the left"
                         f"{where}")



# --- Faster decoding: the head's layout, and generate(compile=True) ---------------------------------------


def next_token_logits(model, hidden):
    """The LM head on the last hidden states, hidden (B, C) -> (B, V), as (W @ h^T)^T rather than lm_head's
    h @ W^T: the same products, but with the (V, C) weight as the matmul's left operand the CPU kernel streams
    it once for every row of the batch (on one CPU thread: as fast at batch 1, 1.2-2x faster at 2-16). A test
    checks it equals lm_head (tests/test_fast_paths.py); bench.py's decode rows time the whole step both ways."""
    weight = model.lm_head.weight  # (V, C)
    return (weight @ hidden.to(weight.device).T).T  # (V, C) @ (C, B) -> (V, B) -> (B, V)


def fast_decode_step(model, tokens, positions, mask, cache):
    """Part I's decode_step with next_token_logits as the head: the step generate() runs by default, with
    decode_step's arguments and results (and the same logits, to fp32 rounding)."""
    out = model.transformer(tokens, past_key_values=cache, position_ids=positions, attention_mask=mask,
                            use_cache=True)
    return next_token_logits(model, out.last_hidden_state[:, -1]), out.past_key_values  # (B, V)


class FixedShapeCache(StaticCache):
    """A StaticCache whose writes, once the prompt is in, never change a tensor's shape, so that
    torch.compile makes one graph for every decoding step (generate(compile=True)).

    The prompt is written as a StaticCache writes it. Then fix_shapes() sets write_at, a LongTensor (1,) of
    the slot to write (a tensor, so that the slot changes without the graph changing), and `visible`, the
    (B, max_length) 0/1 mask of the slots attention may read: from then on update() writes the one new
    token's keys and values at write_at and returns every slot, the empty ones hidden by `visible`.
    """

    def __init__(self, max_length: int):
        super().__init__(max_length)
        self.write_at: Optional[torch.Tensor] = None  # None until fix_shapes: the prompt's growing writes
        self.visible: Optional[torch.Tensor] = None  # (B, max_length): 1 on the real tokens written so far
        self.decode: Optional[Callable] = None  # the compiled decode_one_token that reads this cache

    def update(self, layer: Optional[int], k, v):
        if self.write_at is None:  # the prompt, any length
            return super().update(layer, k, v)
        self.keys[layer].index_copy_(2, self.write_at, k)  # k (B, nh, 1, hs) into slot write_at
        self.values[layer].index_copy_(2, self.write_at, v)
        return self.keys[layer], self.values[layer]  # (B, nh, max_length, hs): every slot

    def fix_shapes(self, mask):
        """After the prompt (P = length tokens; mask (B, P) of 0/1, or None for no padding): fixed shapes."""
        keys = next(iter(self.keys.values()))
        self.visible = torch.zeros(keys.size(0), self.max_length, dtype=torch.long, device=keys.device)
        self.visible[:, : self.length] = 1 if mask is None else mask
        self.write_at = torch.zeros(1, dtype=torch.long, device=keys.device)
        mark_static(self)

    def next_slot(self):
        """Point write_at at slot P = length, for the next token, and let attention see it."""
        self.write_at.fill_(self.length)
        self.visible[:, self.length] = 1

    def advance(self):
        """The token at write_at is written in every layer: P grows by one."""
        for layer in self.filled:
            self.filled[layer] += 1


def decode_one_token(model, tokens, positions, mask, cache):
    """One decoding step with shapes that never change, so that torch.compile makes one graph for every
    step: tokens and positions (B, 1), mask (B, L) of 0/1 over every slot of the cache (0 on padding and on
    the slots not written yet), cache a FixedShapeCache of L slots after fix_shapes (its write_at set).
    Returns the next token's logits (B, V).

    The body's forward without its checks and options: embeddings, the blocks (each writes its keys and
    values at cache.write_at and attends over all L slots, the mask hiding the empty ones), ln_f, the head.
    Being the same modules, it computes the same numbers as the uncompiled step (a test checks the tokens).
    The head is lm_head itself, h @ W^T, not next_token_logits' (W @ h^T)^T: that is the form inductor
    recognises as a linear layer and packs for its own kernel (2x MKL's at batch 8)."""
    body = model.transformer
    x = body.wte(tokens) + body.wpe(positions)  # (B, 1, C)
    additive = padding_mask_to_additive(mask, x.dtype)  # (B, L) -> (B, 1, 1, L)
    for block in body.h:
        x = block(x, layer_past=cache, attention_mask=additive, use_cache=True)[0]  # (B, 1, C)
    return model.lm_head(body.ln_f(x)[:, -1])  # (B, C) -> (B, V)


# model -> (its weights when compiled, the compiled decode_one_token): at most one model, since compiling
# another resets torch.compile (see compiled_decode_step). Weakly held: a deleted model takes its step along.
_COMPILED_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_decode_step(model):
    """decode_one_token through torch.compile, compiled once per model and kept while its weights stay the same.

    On a GPU, mode="reduce-overhead": CUDA graphs replay a whole step's hundreds of small kernels with one
    launch, which is what batch-1 decoding needs (each kernel is too short to hide its launch). On a CPU,
    mode="max-autotune" with inductor's freezing (compile_settings): the weights become constants that
    inductor packs for its own matrix kernels, which beat the BLAS library PyTorch calls at small batches
    (1.6x at batch 8 on a 2-core AMD EPYC; see README, Performance).

    Freezing bakes the weights in, and torch.compile keeps what it compiled with the function's code, not
    with the model. So the weights are remembered (their storage and version counter, which in-place edits
    bump), and a model whose weights changed (training, load_state_dict), or a model not compiled before,
    starts from torch.compiler.reset(): compiled again, never run on stale weights. The price: a process that
    alternates between two models recompiles each time, and reset() drops the process's other compiled code."""
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    entry = _COMPILED_STEPS.get(model)
    if entry is None or entry[0] != weights:
        torch.compiler.reset()
        _COMPILED_STEPS.clear()
        device = next(model.parameters()).device
        mode = "reduce-overhead" if device.type == "cuda" else "max-autotune"
        entry = _COMPILED_STEPS[model] = (weights, torch.compile(decode_one_token, mode=mode, fullgraph=True))
    return entry[1]


def compile_settings(device):
    """The inductor settings compiled_decode_step's graphs are made under: freezing on a CPU (see there)."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    import torch._inductor.config  # imported here: it is large, and only compile=True needs it

    return torch._inductor.config.patch(freezing=True)


def mark_static(cache):
    """Tell torch.compile that the cache's tensors stay at the same addresses between steps (they are written
    in place), so that CUDA graphs can read and write them directly instead of copying them in every step."""
    if cache.write_at.device.type == "cuda":
        for t in (*cache.keys.values(), *cache.values.values(), cache.write_at):
            torch._dynamo.mark_static_address(t)


def fixed_shape_step(model, tokens, positions, mask, cache):
    """generate(compile=True)'s decoding step, with decode_step's arguments and results. The prompt runs
    eagerly (fast_decode_step: any length) into a FixedShapeCache; every later token runs through
    compiled_decode_step(model), whose shapes never change: it writes slot cache.write_at and reads every
    slot, cache.visible hiding the ones not written yet (the loop's own mask is not needed then)."""
    if not isinstance(cache, FixedShapeCache):  # the prompt: made from the loop's empty StaticCache
        logits, cache = fast_decode_step(model, tokens, positions, mask, FixedShapeCache(cache.max_length))
        cache.fix_shapes(mask)
        cache.decode = compiled_decode_step(model)
        return logits, cache
    cache.next_slot()
    with compile_settings(tokens.device):
        logits = cache.decode(model, tokens, positions, cache.visible, cache)  # (B, V)
    cache.advance()
    return logits, cache


def _check_compile_args(model, compile, cache, num_beams):
    """generate(compile=...) before any work: a bool, with the static cache, greedy or sampling, no device map."""
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if not compile:
        return
    if cache != "static":
        raise ValueError(f'compile=True needs cache="static" (fixed shapes), got cache={cache!r}')
    if num_beams > 1:
        raise ValueError(f"compile=True does greedy decoding and sampling, not beam search (num_beams={num_beams}); "
                         "pass compile=False for beam search")
    if getattr(model.transformer, "device_map", None):
        raise ValueError("compile=True runs the model on one device; deparallelize() it first")


# --- Config validation and serialisation ------------------------------------------------------------


# The problem types a classification head can be asked to solve (as Hugging Face names them).
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
SUMMARY_TYPES = ("last", "first", "mean", "cls_index")


# What each field's annotation accepts. A config.json holds JSON's true/false, numbers, strings and null, which
# Python's json reads as bool, int, float, str and None; each field must hold its own kind exactly, because
# everything else is read wrongly or fails deep inside torch: the string "false" is true to Python, 12.0 is no
# size of a tensor (Hugging Face writes integers as 12), and a list is no dropout probability.
FIELD_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
OPTIONAL_KINDS = {Optional[int]: int, Optional[float]: float, Optional[str]: str}  # these may also be None (null)
INT64_BOUND = 2 ** 63  # config integers end up in int64 tensors (token ids): they must lie in [-2**63, 2**63)
FLOAT_MAX = torch.finfo(torch.float64).max  # a number beyond it (an int of 400 digits) is no float


def shown(value) -> str:
    """A value for an error message: its repr, cut to 60 characters, and its type, `'false' (a str)`."""
    text, kind = repr(value), type(value).__name__
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"


def is_kind(value, kind) -> bool:
    """Whether value is of kind (bool, int, float or str) as a config field of that kind must be: a bool is not
    an int or a float here (JSON's true is no size), an int is one for a float (JSON's 0 for 0.0), and a float
    must be finite (json reads NaN, Infinity and 1e999)."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= FLOAT_MAX
    return isinstance(value, kind)


def is_index(key) -> bool:
    """A layer or label number as a JSON object key ("3": object keys are strings) or as a Python int."""
    if isinstance(key, str):
        return key.isdecimal() and len(key) <= 18
    return is_kind(key, int) and key >= 0


def check_field_types(config):
    """Raise a ValueError naming the first field that does not hold its annotation's kind (FIELD_KINDS), with
    the value and its type: `GPT2Config.tie_word_embeddings must be true or false, got 'false' (a str)`.
    The ranges (n_layer >= 1, dropout in [0, 1), ...) are validate_config's, once the kinds are right."""
    for f in fields(config):
        value = getattr(config, f.name)
        kind = OPTIONAL_KINDS.get(f.type, f.type)
        if kind not in FIELD_KINDS or (value is None and f.type in OPTIONAL_KINDS):
            continue
        expected = FIELD_KINDS[kind] + (" or null (None)" if f.type in OPTIONAL_KINDS else "")
        if not is_kind(value, kind):
            fix = f"; write {int(value)}" if kind is int and isinstance(value, float) and value.is_integer() else ""
            raise ValueError(f"GPT2Config.{f.name} must be {expected}, got {shown(value)}{fix}")
        if kind is int and not -INT64_BOUND <= value < INT64_BOUND:
            raise ValueError(f"GPT2Config.{f.name} must fit in 64 bits, [-2**63, 2**63), got {shown(value)}")
    heads = config.pruned_heads
    if not isinstance(heads, dict) or not all(is_kind(layer, int) and isinstance(pruned, (list, tuple))
                                              and all(is_kind(h, int) for h in pruned)
                                              for layer, pruned in heads.items()):
        raise ValueError(f"GPT2Config.pruned_heads must map layer numbers to lists of head numbers, "
                         f"{{11: [0, 3]}}, got {shown(heads)}")
    if not isinstance(config.extra, dict) or not all(isinstance(key, str) for key in config.extra):
        raise ValueError(f"GPT2Config.extra holds the config.json keys this class does not know: a dict with "
                         f"string keys, got {shown(config.extra)}")
    if "id2label" in config.extra:
        check_label_names(config.extra["id2label"])


def check_label_names(id2label):
    """id2label, Hugging Face's label names: an object of label numbers to names, {"0": "LABEL_0", ...}."""
    if not isinstance(id2label, dict) or not all(is_index(i) and isinstance(name, str) for i, name in id2label.items()):
        raise ValueError(f"GPT2Config.id2label must map label numbers to names, "
                         f'{{"0": "negative", "1": "positive"}}, got {shown(id2label)}')


def pruned_heads_from_json(pruned_heads) -> Dict[int, List[int]]:
    """config.json's pruned_heads, {"11": [0, 3]} (JSON object keys are strings) -> {11: [0, 3]}."""
    if not isinstance(pruned_heads, dict) or not all(is_index(layer) and isinstance(heads, list)
                                                     and all(is_kind(h, int) for h in heads)
                                                     for layer, heads in pruned_heads.items()):
        raise ValueError(f"GPT2Config.pruned_heads must map layer numbers to lists of head numbers, "
                         f'{{"11": [0, 3]}}, got {shown(pruned_heads)}')
    return {int(layer): list(heads) for layer, heads in pruned_heads.items()}


def validate_config(config):
    """Raise a ValueError naming the field, its value and what it should be: first each field's kind
    (check_field_types), then its range, then whether the model fits in memory (check_model_size). Called on
    creation and by every model, so a config edited after creation is checked too."""
    check_field_types(config)
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "num_labels"):
        value = getattr(config, name)
        if value < (0 if name == "num_labels" else 1):
            raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
    if config.n_embd % config.n_head != 0:
        raise ValueError(
            f"GPT2Config.n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}): each head gets "
            f"n_embd // n_head channels; try n_head in {[h for h in range(1, 33) if config.n_embd % h == 0]}"
        )
    if config.n_inner is not None and config.n_inner < 1:
        raise ValueError(f"GPT2Config.n_inner must be None or a positive integer, got {config.n_inner!r}")
    for name in ("activation_function", "summary_activation"):
        value = getattr(config, name)
        if (value is not None or name == "activation_function") and value not in ACTIVATIONS:
            raise ValueError(f"GPT2Config.{name} is {value!r}, expected one of {sorted(ACTIVATIONS)}")
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "summary_last_dropout"):
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"GPT2Config.{name} is a dropout probability in [0, 1), got {value!r}")
    if config.classifier_dropout is not None and not 0.0 <= config.classifier_dropout < 1.0:
        raise ValueError(f"GPT2Config.classifier_dropout is a dropout probability in [0, 1) or None, "
                         f"got {config.classifier_dropout!r}")
    if not config.layer_norm_epsilon > 0:
        raise ValueError(f"GPT2Config.layer_norm_epsilon must be > 0, got {config.layer_norm_epsilon!r}")
    if config.initializer_range < 0:
        raise ValueError(f"GPT2Config.initializer_range is the standard deviation of the initial weights, >= 0, "
                         f"got {config.initializer_range!r}")
    if config.summary_type not in SUMMARY_TYPES:
        raise ValueError(f"GPT2Config.summary_type is {config.summary_type!r}, expected one of {SUMMARY_TYPES}")
    if config.problem_type not in PROBLEM_TYPES:
        raise ValueError(f"GPT2Config.problem_type is {config.problem_type!r}, expected one of {PROBLEM_TYPES}")
    for layer, heads in config.pruned_heads.items():
        if not 0 <= layer < config.n_layer or any(not 0 <= h < config.n_head for h in heads):
            raise ValueError(
                f"GPT2Config.pruned_heads names layer {layer} heads {list(heads)}, but the model has "
                f"{config.n_layer} layers of {config.n_head} heads"
            )
        if len(set(heads)) == config.n_head:
            raise ValueError(f"GPT2Config.pruned_heads removes all {config.n_head} heads of layer {layer}; a layer "
                             "keeps at least one")
    check_tool_extras(config)
    check_model_size(config)


def check_tool_extras(config):
    """The config.json keys this file's tools write and read back (kept in `extra`): a character-level model's
    characters (char_vocab: token i is its i-th character), the file beside config.json that holds the merges of
    a model's own BPE (bpe_merges: "merges.txt") and an addition model's digits (addition_digits)."""
    chars = config.extra.get("char_vocab")
    if chars is not None and (not isinstance(chars, str) or len(chars) != config.vocab_size
                              or len(set(chars)) != len(chars)):
        raise ValueError(f"GPT2Config.extra's char_vocab must be a string of vocab_size ({config.vocab_size}) "
                         f"different characters, one per token, got {shown(chars)}")
    merges = config.extra.get("bpe_merges")
    if merges is not None and (not isinstance(merges, str) or not PLAIN_FILE_NAME.fullmatch(merges)
                               or chars is not None or config.vocab_size < 257):
        raise ValueError(f"GPT2Config.extra's bpe_merges must name a file beside config.json (a plain file name, as "
                         f"train writes \"merges.txt\"), with no char_vocab and a vocab_size of 257 or more (256 bytes "
                         f"and <|endoftext|>), got {shown(merges)} with vocab_size {config.vocab_size}")
    digits = config.extra.get("addition_digits")
    if digits is not None and not (is_kind(digits, int) and 1 <= digits <= 9):
        raise ValueError(f"GPT2Config.extra's addition_digits must be an integer in 1..9 (as train --digits), "
                         f"got {shown(digits)}")


# OpenAI's four released sizes, and Hugging Face's distilled 6-layer model.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),  # 82M
}


def config_from_preset(cls, name: str, **overrides) -> "GPT2Config":
    """The config of one of OpenAI's released sizes (or distilgpt2), e.g. `GPT2Config.from_preset("gpt2-medium")`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}, expected one of {sorted(PRESETS)}")
    return cls(**{**PRESETS[name], **overrides})


def config_from_dict(cls, config_dict: dict) -> "GPT2Config":
    """Build from a Hugging Face config dict. Keys this class does not know are kept in `extra`."""
    if not isinstance(config_dict, dict):
        raise TypeError(f"config_dict must be a dict of config fields, got {type(config_dict).__name__}")
    known = {f.name for f in fields(cls)} - {"extra"}
    kwargs = {k: v for k, v in config_dict.items() if k in known}
    extra = {k: v for k, v in config_dict.items() if k not in known and k != "num_labels"}
    if "id2label" in config_dict:  # Hugging Face stores the label names; num_labels is their count
        check_label_names(config_dict["id2label"])
        kwargs["num_labels"] = len(config_dict["id2label"])
    elif "num_labels" in config_dict:
        kwargs["num_labels"] = config_dict["num_labels"]
    if "pruned_heads" in kwargs:  # JSON object keys are strings
        kwargs["pruned_heads"] = pruned_heads_from_json(kwargs["pruned_heads"])
    return cls(**kwargs, extra=extra)


def config_to_dict(config) -> dict:
    """The config as Hugging Face writes it (so transformers reads the same model back)."""
    d = dict(config.extra)
    d.update({f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("extra", "num_labels")})
    d["pruned_heads"] = {str(k): list(v) for k, v in config.pruned_heads.items()}
    labels = d.pop("id2label", None)
    if labels is None or len(labels) != config.num_labels:
        labels = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    d["id2label"] = labels
    d["label2id"] = {name: int(i) for i, name in labels.items()}
    d["model_type"] = "gpt2"
    if d["classifier_dropout"] is None:
        del d["classifier_dropout"]
    return d


def read_json_object(path, what: str, fields: str) -> dict:
    """The JSON object in the file `path` (a config.json, a generation_config.json), read whole: a regular file
    in its folder (no FIFO, no link out), at most MAX_JSON_BYTES, valid UTF-8 JSON, an object. Anything else is
    a CheckpointError naming the file, what it is (`what`) and what it should hold (`fields`)."""
    path = regular_file_in(os.path.dirname(os.fspath(path)) or ".", os.fspath(path))
    if os.path.getsize(path) > MAX_JSON_BYTES:  # read whole below: a config is a few kilobytes
        raise CheckpointError(f"{path} is {os.path.getsize(path):,} bytes, not a {what} (at most "
                              f"{MAX_JSON_BYTES:,})")
    try:
        with open(path, encoding="utf-8") as f:
            config_dict = json.load(f)
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd nesting
        raise CheckpointError(f"{path} is not valid JSON ({e}); expected a {what} object") from None
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config_dict).__name__}, expected an object of {fields}")
    return config_dict


def config_from_json_file(cls, path) -> "GPT2Config":
    path = os.fspath(path)
    config_dict = read_json_object(path, "config.json", "config fields ({\"n_layer\": 12, ...})")
    try:
        return cls.from_dict(config_dict)
    except ValueError as e:  # a field of the wrong kind or out of range, or a model too big for memory: name the file
        raise CheckpointError(f"{path}: {e}") from None


def config_to_json_file(config, path):
    write_json(path, config.to_dict())


# --- Memory: what a model or a batch needs, against what the machine has ---------------------------------
# A number in a config.json or on the command line can ask for more memory than any machine has: every
# attention layer keeps an n_positions x n_positions causal mask, so "n_positions": 300000 asks for 90 GB per
# layer. Such requests are refused before anything is allocated, with the figure, instead of ending in
# swapping, the kernel's OOM killer or an error from deep inside torch.


MEMORY_LIMIT_VARIABLE = "NANOGPT2_MAX_MEMORY_GB"
PYTHON_BYTES_PER_LAYER = 65_000  # a block's modules, parameters and dicts: measured 42 KB, 65 KB with cross-attention


def memory_limit() -> int:
    """The most bytes one model, batch or image may take: NANOGPT2_MAX_MEMORY_GB (in units of 10^9 bytes) if
    set, else the machine's physical memory (no limit where the system does not say). (os is imported with
    Part III's modules; it is there by the time this runs.)"""
    text = os.environ.get(MEMORY_LIMIT_VARIABLE)
    if text is not None:
        try:
            gigabytes = float(text)
        except ValueError:
            gigabytes = float("nan")
        if not 0 < gigabytes < float("inf"):
            raise ValueError(f"{MEMORY_LIMIT_VARIABLE} must be a number of gigabytes > 0, got {text!r}; "
                             f"e.g. {MEMORY_LIMIT_VARIABLE}=64")
        return int(gigabytes * 1e9)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or it does not know
        physical = -1
    return physical if physical > 0 else 2 ** 63


def check_memory(needed: int, what: str, fix: str):
    """Raise a ValueError if `what` needs more than memory_limit() bytes: the figure, the limit, the fix."""
    limit = memory_limit()
    if needed > limit:
        source = MEMORY_LIMIT_VARIABLE if MEMORY_LIMIT_VARIABLE in os.environ else "this machine's memory"
        raise ValueError(f"{what} needs about {needed / 1e9:,.1f} GB, more than the {limit / 1e9:,.1f} GB limit "
                         f"({source}); {fix}, or set {MEMORY_LIMIT_VARIABLE} to allow more")


def model_bytes(config) -> int:
    """About how many bytes a model of this config takes in fp32, counted from the config alone: its parameters
    (4 bytes each: the token and position embeddings, every block, and the largest heads any class has: an LM
    head, tied or not, and a classifier with a projection before it), every attention layer's causal mask
    (n_positions^2 bools, plus one more while it is made) and every block's Python objects."""
    C, P = config.n_embd, config.n_positions
    inner = config.n_inner if config.n_inner is not None else 4 * C
    attention_layers = 2 if config.add_cross_attention else 1  # cross-attention: another attention per block
    block = attention_layers * (4 * C * C + 6 * C) + 2 * C * inner + inner + 3 * C  # attention, layer norms, MLP
    heads = (config.vocab_size + C + config.num_labels) * C
    parameters = (config.vocab_size + P) * C + config.n_layer * block + 2 * C + heads
    masks = (config.n_layer * attention_layers + 1) * P * P
    return 4 * parameters + masks + config.n_layer * PYTHON_BYTES_PER_LAYER


def check_model_size(config):
    """Refuse a config whose model would not fit in memory_limit(), before anything is allocated."""
    check_memory(model_bytes(config), f"a model of this GPT2Config (n_layer={config.n_layer}, "
                 f"n_embd={config.n_embd}, n_positions={config.n_positions}, vocab_size={config.vocab_size})",
                 "use a smaller config (n_positions, vocab_size, n_embd or n_layer)")


def check_generation_memory(model, rows: int, length: int):
    """generate() before it allocates: the key/value cache of `rows` sequences of `length` tokens (keys and values
    of every layer, in the model's dtype) and one step's fp32 logits, with the few copies the processors and beam
    search make of them (log-probabilities, processed scores, the beams' candidates), must fit in memory_limit()."""
    config = model.config
    itemsize = model.transformer.wte.weight.element_size()
    needed = 2 * config.n_layer * rows * length * config.n_embd * itemsize + 4 * rows * config.vocab_size * 4
    check_memory(needed, f"generating {rows:,} sequences of up to {length:,} tokens (their key/value cache)",
                 "ask for fewer samples or fewer new tokens")


# ==================================================================================================
# Part III: files and tools
#
# Loading and saving, the tokenizer, training and evaluation, the command line; main() at the
# bottom.
# ==================================================================================================

# Imported here rather than at the top, so that the model reads without them (Python allows an
# import anywhere at module level; a linter's E402 is expected).
import argparse
import codecs
import collections
import csv
import errno
import functools
import hashlib
import heapq
import http.client
import itertools
import mmap
import os
import pathlib
import re
import shlex
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.error
import urllib.request
import zipfile
import zlib

import numpy as np
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------------


# A Hugging Face model directory holds config.json and the weights: model.safetensors (or several
# shards listed in model.safetensors.index.json), or the older pytorch_model.bin. safetensors is simple
# enough to read by hand:
#     8 bytes      N, the header's length (unsigned little-endian)
#     N bytes      JSON: {"name": {"dtype": "F32", "shape": [768, 2304], "data_offsets": [begin, end]}, ...}
#     the rest     every tensor's raw little-endian bytes, at [begin, end) counted from the end of the header
SAFETENSORS_DTYPES = {  # name in the header -> (numpy dtype to read the bytes as, torch dtype)
    "F64": ("<f8", torch.float64), "F32": ("<f4", torch.float32), "F16": ("<f2", torch.float16),
    "BF16": ("<u2", torch.bfloat16),  # numpy has no bfloat16: read the 16-bit patterns, reinterpret in torch
    "I64": ("<i8", torch.int64), "I32": ("<i4", torch.int32), "I16": ("<i2", torch.int16),
    "I8": ("i1", torch.int8), "U8": ("u1", torch.uint8), "BOOL": ("u1", torch.bool),
}
TORCH_TO_SAFETENSORS = {torch_dtype: name for name, (_, torch_dtype) in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the format's own limit; a larger "length" means a corrupt file


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or not matching the model."""


# A model folder is untrusted input, whoever made it: a downloaded index names the shard files to fetch
# and read, and a folder may hold links or special files. As pip and git refuse paths that escape their
# trees, every file read on a folder's say-so is checked first: a name taken from a file must be a plain
# file name (file_named_in), and a file must really be a file inside the folder (regular_file_in).
PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def file_named_in(directory: str, name, source: str) -> str:
    """directory/name, for a file name read from the file `source` (a shard named by an index). Anything
    but a plain file name (letters, digits, '.', '_' and '-'; no folder part, so no '..' and nothing
    absolute) is a CheckpointError naming source and name, raised before anything is read or fetched."""
    if not isinstance(name, str) or not PLAIN_FILE_NAME.fullmatch(name):
        raise CheckpointError(f"{source} names the file {name!r}, but only a plain file name inside {directory} "
                              "is allowed (no folders, no '..', not absolute): the file is damaged or hostile, "
                              "and nothing it names was read or downloaded")
    return os.path.join(directory, name)


def regular_file_in(directory: Optional[str], path: str) -> str:
    """path, once checked to be a regular file that is really inside directory (links followed): a link
    out of the folder, or a FIFO, device or folder in place of a file, is a CheckpointError, instead of
    reading someone else's file or waiting forever on a FIFO that no one writes. One place outside is
    allowed: Hugging Face's own cache, whose snapshots/<revision>/ folders link each file into ../../blobs/.
    directory None: a path the user named (a flag), which may be anywhere but must still be a file."""
    real = os.path.realpath(path)
    homes = [os.path.realpath(directory)] if directory is not None else [os.path.dirname(real)]
    if os.path.basename(os.path.dirname(homes[0])) == "snapshots":
        homes.append(os.path.join(os.path.dirname(os.path.dirname(homes[0])), "blobs"))
    if not any(os.path.commonpath([real, h]) == h for h in homes):
        raise CheckpointError(f"{path} is a link to {real}, outside {directory}: refused (copy the file into "
                              "the folder if you mean to use it)")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist (a broken link?)") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise CheckpointError(f"{path} is {kind}, expected a regular file")
    return path


def _process_alive(pid: int) -> bool:
    if not 0 < pid < 2 ** 31:  # no process has such an id (0 and -1 would signal whole process groups)
        return False
    if os.name == "nt":  # os.kill would end the process there, not probe it: assume alive, keep its file
        return True
    try:
        os.kill(pid, 0)  # signal 0: no signal is sent, only the existence check
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError): alive
        return True
    return True


def remove_stale_temporaries(path):
    """Delete the `path.tmp<PID>` files that killed runs (kill -9, a power cut) left beside path: those
    whose process no longer exists. A live process's temporary is left alone: it may still be writing."""
    directory, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(directory):
        found = re.fullmatch(re.escape(name) + r"\.tmp(\d+)", entry)
        if found and not _process_alive(int(found.group(1))):
            with contextlib.suppress(FileNotFoundError):  # another run may clean it up first
                os.remove(os.path.join(directory, entry))


class WriteError(OSError):
    """A file that could not be written whole (a full disk, a file-size limit, no permission): the file at its
    path is as it was before, and the temporary its new bytes went to is removed."""


def _fsync(path):
    """Have the system put path's bytes (a file's, or a folder's list of names) on the disk now, not when it
    likes: a rename survives a power cut only if the bytes renamed and the new name are both there. (Windows
    cannot open a folder to sync it; some network file systems cannot sync one: EINVAL.)"""
    if os.name == "nt" and os.path.isdir(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


class _atomic_path:
    """`with _atomic_path(path) as tmp:` write to tmp (path.tmp<PID>, in the same folder, so the rename
    cannot cross file systems); on success tmp is synced to the disk and renamed onto path in one step, and
    the folder synced, so a reader, a run killed mid-save or a power cut finds the old file or the new one,
    never half of one. On failure tmp is removed, and an OSError (a full disk: ENOSPC, EFBIG) becomes a
    WriteError naming path. tmp is opened like any new file, so the umask sets its mode (0644 under umask 022)."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __enter__(self):
        remove_stale_temporaries(self.path)
        self.tmp = f"{self.path}.tmp{os.getpid()}"
        if os.path.lexists(self.tmp):  # never write through a link planted under our temporary's name
            os.remove(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                _fsync(self.tmp)  # the new bytes on the disk before the name points at them
                os.replace(self.tmp, self.path)
            except OSError as error:  # a full disk may show only now, as the cached bytes go to the disk
                exc = error
            else:
                _fsync(os.path.dirname(os.path.abspath(self.path)))  # the new name, too
                return False
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):  # (a WriteError names its own file)
            raise WriteError(f"could not write {self.path} ({exc.strerror or exc}); it is as it was before, and "
                             "no part of the new one is left") from exc
        return False


def _write_atomically(path, data: bytes):
    with _atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json(path, obj):
    """obj as a config.json is written (indented, keys sorted, a final newline), atomically."""
    _write_atomically(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def check_output_file(option: str, path):
    """A file a command writes at its end (a PNG), checked before the work that makes it: a directory in its
    place, or a folder that does not exist or cannot be written to, would otherwise be found by the final
    write, after the model was loaded and run (minutes of sampling, lost)."""
    path = os.fspath(path)
    if path == "":
        raise ValueError(f"{option} is empty: give the name of the file to write")
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a directory: give the name of a file to write (a .png) instead")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the directory {folder} is not writable")


def read_safetensors_header(path) -> Tuple[dict, int]:
    """(header dict, offset of the data section) of a .safetensors file, reading no tensor data.

    The file is 8 bytes of little-endian unsigned header length n, n bytes of UTF-8 JSON (an object: tensor
    name -> {"dtype", "shape", "data_offsets": [begin, end]} relative to the data section, plus an optional
    "__metadata__" entry), then the data. Every claim the header makes is checked against the file before
    any tensor is read, so a lying header gives a CheckpointError naming the file, never an out-of-bounds read
    or another exception: too short for the length; n beyond MAX_HEADER_BYTES or the file; JSON that does not
    parse or is not an object; a dtype not in SAFETENSORS_DTYPES; a shape that is not a list of non-negative
    ints numpy can hold; offsets outside the data section or spanning other than shape x itemsize bytes; two
    tensors whose spans overlap (whatever order the header lists them in).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size} (truncated or corrupt)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd numbers or nesting
            raise CheckpointError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is a {type(header).__name__}, expected a JSON object")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else info
        if not isinstance(info, dict) or not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}, expected one of "
                                  f"{sorted(SAFETENSORS_DTYPES)}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        itemsize = np.dtype(SAFETENSORS_DTYPES[dtype][0]).itemsize
        if (not isinstance(shape, list) or len(shape) > 64 or not all(type(d) is int and d >= 0 for d in shape)
                or math.prod(max(d, 1) for d in shape) * itemsize >= 2 ** 63):  # numpy's limits
            raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}, expected a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, outside the "
                                  f"{data_size} data bytes (truncated or corrupt)")
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} and dtype {info['dtype']} needs "
                                  f"{math.prod(shape) * itemsize} bytes, its offsets span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data section (corrupt file)")
    return header, 8 + n


def load_safetensors(path, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Read a .safetensors file into CPU tensors without copying it: the file is memory-mapped, and each
    tensor is a view of its own bytes in the mapping (torch.frombuffer). Loading then costs neither time
    nor memory until a weight is used, and the pages are the operating system's file cache, shared with
    any other process reading the same file.

    The mapping is copy-on-write (mmap.ACCESS_COPY): writing to a tensor (an optimiser step) gives it
    private copies of the pages it changes, and the file never changes. The mapping lives as long as a
    tensor uses it; do not rewrite the file in place meanwhile (save_safetensors writes a new file and
    renames it, which is safe). Bytes are copied only when they must be: floating-point tensors stored in
    another dtype than `dtype` are read and converted one at a time (memory then peaks at the converted
    model plus one tensor, not the whole file on top), and a tensor whose bytes are not aligned to its
    element size is read into fresh memory. Byte order is the file's, little-endian, as on every machine
    PyTorch supports but s390x.
    """
    header, data_start = read_safetensors_header(path)
    tensors = {}
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # the whole file; outlives f
        for name, info in header.items():
            if name == "__metadata__":
                continue
            file_dtype = SAFETENSORS_DTYPES[info["dtype"]][1]
            begin, end = info["data_offsets"]
            start = data_start + begin  # offset in the file
            convert = dtype is not None and file_dtype.is_floating_point and file_dtype != dtype
            if end == begin:  # an empty tensor (frombuffer refuses zero bytes)
                raw = torch.empty(0, dtype=torch.uint8)
            elif convert or start % file_dtype.itemsize:
                raw = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(start)
                f.readinto(raw.numpy())
            else:
                raw = torch.frombuffer(mapping, dtype=torch.uint8, count=end - begin, offset=start)
            tensor = raw.bool() if file_dtype == torch.bool else raw.view(file_dtype)  # bytes -> elements
            tensor = tensor.view(info["shape"])
            tensors[name] = tensor.to(dtype) if convert else tensor
    return tensors


def safetensors_header(entries, metadata: Optional[dict] = None) -> bytes:
    """The start of a .safetensors file whose tensors follow back to back in the order given: entries are
    (name, dtype code such as "F32", shape, size in bytes). Returns the header's length (8 bytes, unsigned
    little-endian) and the JSON header, padded with spaces so that the data starts 8-byte aligned."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, size in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def save_safetensors(tensors: Dict[str, torch.Tensor], path, metadata: Optional[dict] = None):
    """Write tensors as .safetensors, one tensor's bytes at a time (atomically: a temporary file renamed at
    the end)."""
    tensors = {name: tensors[name].detach().to("cpu").contiguous() for name in sorted(tensors)}
    for name, t in tensors.items():
        if t.dtype not in TORCH_TO_SAFETENSORS:
            raise TypeError(f"cannot save tensor {name!r} of dtype {t.dtype} as safetensors")
    entries = [(name, TORCH_TO_SAFETENSORS[t.dtype], t.shape, t.numel() * t.element_size())
               for name, t in tensors.items()]
    with _atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(safetensors_header(entries, metadata))
            for t in tensors.values():  # numpy has no bfloat16 or torch.bool bytes: same-sized ints instead
                f.write((t.view(torch.uint16) if t.dtype == torch.bfloat16 else
                         t.to(torch.uint8) if t.dtype == torch.bool else t).numpy().tobytes())


# Short names of the released checkpoints -> their Hugging Face hub repositories.
HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}


def cache_dir() -> str:
    return os.environ.get("NANOGPT2_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanogpt2")


def hub_url(repo_id: str, filename: str) -> str:
    base = os.environ.get("NANOGPT2_HUB_URL", "https://huggingface.co").rstrip("/")
    return f"{base}/{repo_id}/resolve/main/{filename}"


def _progress(desc: str, done: int, total: Optional[int], start: float):
    rate = done / max(time.time() - start, 1e-6) / 1e6
    of = f" / {total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
    sys.stderr.write(f"\r{desc}: {done / 1e6:.1f}{of}, {rate:.1f} MB/s   ")
    sys.stderr.flush()


def _if_range_value(response) -> str:
    """What identifies this version of the file for an If-Range header: its ETag if strong (If-Range
    accepts no weak W/ ETag), else its Last-Modified date; "" when the server gives neither."""
    etag = response.headers.get("ETag") or ""
    return etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified") or ""


# A download stops rather than leave less than this free on the disk: an endless or oversized body (a broken
# or hostile server) never fills it. And the most a downloaded JSON file may be: a config.json, an index or
# a palette is a few megabytes at most.
MIN_FREE_BYTES = 256 << 20
MAX_JSON_BYTES = 64 << 20


def download(url: str, dest: str, desc: Optional[str] = None, quiet: bool = False) -> str:
    """Fetch url to dest, resumably and atomically. Bytes go to dest + ".part", continued with an HTTP
    Range request when a previous try was cut off; only a complete file is renamed to dest, so a partial
    download never looks like a cached one. A resume also sends If-Range with the ETag (or Last-Modified)
    the .part was started under, kept in dest + ".part.if-range": if the file has changed on the server
    since, the server sends the whole new file (200) and the .part starts again from zero, so two versions
    are never spliced together (a .part with no such record starts again too).

    Complete means checked: the length against the server's Content-Length; the SHA-256 when the server
    gives it (the hub's ETag for large files); and the contents against their own format (see
    download_problem: a safetensors file as long as its header says, JSON that parses), which also catches
    a body with no length cut short, or an error page sent with status 200. A file that fails is deleted,
    so the next run fetches it afresh. A body longer than its length or its header promised stops, as does
    one that would leave less than MIN_FREE_BYTES on the disk. A connection cut mid-body is one
    CheckpointError (run again to resume). The folder is made only once the server answers with the file,
    so a missing file (404) leaves none behind. HTTP errors are raised as urllib.error.HTTPError: a caller
    may expect some (a 404 for an optional file)."""
    if os.path.exists(dest):
        return dest
    part, if_range_path = dest + ".part", dest + ".part.if-range"
    if_range = ""
    if os.path.exists(part) and os.path.exists(if_range_path):
        with open(if_range_path, encoding="utf-8") as f:
            if_range = f.read().strip()
    have = os.path.getsize(part) if if_range else 0  # a .part with no record of its version starts again
    request = urllib.request.Request(url, headers={"User-Agent": "nanogpt2"})
    if have:
        request.add_header("Range", f"bytes={have}-")
        request.add_header("If-Range", if_range)
    desc = desc or os.path.basename(dest)
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except http.client.HTTPException as e:  # no HTTP answer: a garbage status line, endless headers, ...
        raise CheckpointError(f"download of {url} failed: the server's answer is not valid HTTP "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        # 416: nothing at or after byte `have`. If the server's size (Content-Range: bytes */N) is `have`, the
        # .part is whole (a run killed just before the rename); if not, it is longer than the file: start over.
        size = re.search(r"/(\d+)$", e.headers.get("Content-Range", "") if e.headers else "")
        if size and int(size.group(1)) == have:
            return _finish_download(url, dest, sha256="")
        os.remove(part)
        return download(url, dest, desc, quiet)
    with response:
        if response.status == 206 and not have:
            raise CheckpointError(f"download of {url} failed: asked for the whole file, the server sent part of "
                                  "it (206 Partial Content)")
        if response.status == 206 and not (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
            os.remove(part)  # the server sent another range than the one asked for: splicing it would corrupt
            return download(url, dest, desc, quiet)
        if response.status != 206:  # from zero: a first try, a server that ignored Range, or a changed file
            have = 0
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
            with open(if_range_path, "w", encoding="utf-8") as f:
                f.write(_if_range_value(response))
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None and length.isdigit() else None
        free = shutil.disk_usage(os.path.dirname(dest) or ".").free
        if total is not None and total - have > free - MIN_FREE_BYTES:
            raise CheckpointError(f"download of {url} needs {(total - have) / 1e6:.0f} MB, but only {free / 1e6:.0f} MB "
                                  f"are free beside {dest}; free some space and run again")
        etag = (response.headers.get("X-Linked-Etag") or response.headers.get("ETag") or "").strip('"').lower()
        limit, promise = (total, "the server's Content-Length") if total is not None else (None, "")
        start, done, last_report = time.time(), have, 0.0
        try:
            with open(part, "ab" if have else "wb") as f:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    done += len(chunk)
                    if limit is None:  # no length from the server: the file's own format may say it
                        f.flush()
                        limit, promise = promised_size(part, dest)
                    if limit is not None and (done > limit or limit < 0):
                        f.close()
                        os.remove(part)
                        os.remove(if_range_path)
                        raise CheckpointError(f"download of {url} " + (
                            f"sent more than the {limit} bytes {promise} promised" if limit >= 0 else
                            "is not a safetensors file (its header cannot be read)") +
                            "; stopped and deleted it (a broken or hostile server)")
                    if shutil.disk_usage(os.path.dirname(part) or ".").free < MIN_FREE_BYTES:
                        raise CheckpointError(f"download of {url} stopped at {done} bytes: less than "
                                              f"{MIN_FREE_BYTES >> 20} MB is left on the disk beside {dest}; "
                                              "free some space and run again to resume")
                    if not quiet and time.time() - last_report > 0.2:
                        _progress(f"downloading {desc}", done, total, start)
                        last_report = time.time()
        except (http.client.HTTPException, OSError) as e:  # a cut chunked body, a reset, a timeout, a full disk
            raise CheckpointError(f"download of {url} stopped at {done} bytes ({type(e).__name__}: {e}); "
                                  "run again to resume") from None
    if not quiet:
        _progress(f"downloading {desc}", done, total, start)
        sys.stderr.write("\n")
    if total is not None and done != total:
        raise CheckpointError(f"download of {url} stopped at {done} of {total} bytes; run again to resume")
    is_sha256 = len(etag) == 64 and all(c in "0123456789abcdef" for c in etag)
    return _finish_download(url, dest, sha256=etag if is_sha256 else "")


def _finish_download(url: str, dest: str, sha256: str) -> str:
    """Check dest + ".part" against the SHA-256 the server gave (if it gave one) and against its own format
    (download_problem), then rename it to dest; a file that fails either is deleted."""
    part, if_range_path = dest + ".part", dest + ".part.if-range"
    actual = file_sha256(part) if sha256 else ""
    problem = f"is corrupt: sha256 {actual}, expected {sha256}" if actual != sha256 else download_problem(part, dest)
    if problem:
        os.remove(part)
        os.remove(if_range_path)
        raise CheckpointError(f"download of {url} {problem}; deleted it: run again to download it afresh")
    os.replace(part, dest)
    os.remove(if_range_path)
    return dest


def promised_size(path: str, dest: str) -> Tuple[Optional[int], str]:
    """(the most bytes the file being downloaded into path may hold, what says so), from its own contents, for
    a body whose length the server did not give: a safetensors file's header gives the size of everything
    after it; a JSON file is at most MAX_JSON_BYTES. (None, "") while nothing bounds it yet."""
    if dest.endswith(".json"):
        return MAX_JSON_BYTES, f"the limit for a JSON file ({MAX_JSON_BYTES >> 20} MB)"
    if dest.endswith(".safetensors") and os.path.getsize(path) >= 8:
        size = _safetensors_size(path)
        if size is not None:
            return size, "its safetensors header"
    return None, ""


def _safetensors_size(path: str) -> Optional[int]:
    """The size a safetensors file's header says the whole file has (8 + header + the end of the last
    tensor); -1 when the header cannot be right; None while the header is not all there yet."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            return -1
        blob = f.read(n)
    if len(blob) < n:
        return None
    try:
        header = json.loads(blob.decode("utf-8"))
        ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return -1
    return 8 + n + max((e for e in ends if isinstance(e, int)), default=0)


def download_problem(path: str, dest: str) -> str:
    """What is wrong with a downloaded file, judged by its own format; "" if nothing is. A .safetensors
    file must be exactly as long as its header says, a .json file must parse, a zip (a .bin saved by
    torch.save) must have its whole central directory: so a body cut short with no length to check it
    by, or a page of HTML sent with status 200, never enters the cache. Other files are not judged here."""
    size = os.path.getsize(path)
    if dest.endswith(".safetensors"):
        promised = _safetensors_size(path) if size >= 8 else None
        if promised != size:
            return f"is not a whole safetensors file ({size} bytes; its header says {promised})"
    elif dest.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except (ValueError, RecursionError) as e:
            return f"is not valid JSON ({e})"
    elif dest.endswith(".bin"):
        with open(path, "rb") as f:
            if f.read(2) == b"PK" and not zipfile.is_zipfile(path):  # torch.save's zip, its end missing
                return "is a zip archive cut short (its central directory is missing)"
    return ""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def resolve_checkpoint(name_or_dir: str) -> str:
    """A local directory as it is; a released name (gpt2, ...) or hub repo id (owner/name) downloaded
    into the cache (config.json plus model.safetensors, or its shards, and generation_config.json if the
    repository has one, fetched with the weights) unless already there."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if os.path.lexists(name_or_dir):  # m/config.json would pass for a hub id: say what it is instead
        raise CheckpointError(f"model {name_or_dir!r} is a file, not a model folder: give the folder that holds "
                              "config.json and the weights")
    repo_id = HUB_NAMES.get(name_or_dir, name_or_dir)
    looks_like_repo = re.fullmatch(r"[\w-][\w.-]*/[\w-][\w.-]*", name_or_dir) and ".." not in name_or_dir
    if name_or_dir not in HUB_NAMES and not looks_like_repo:  # ./ckpt or ../ckpt: a mistyped local path
        raise CheckpointError(
            f"model {name_or_dir!r} is neither a directory nor a known name ({', '.join(HUB_NAMES)}) nor a hub "
            "repository id like openai-community/gpt2"
        )
    local = os.path.join(cache_dir(), *repo_id.split("/"))
    try:
        download(hub_url(repo_id, "config.json"), os.path.join(local, "config.json"))
        if not any(os.path.exists(os.path.join(local, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
            try:
                download(hub_url(repo_id, "model.safetensors"), os.path.join(local, "model.safetensors"))
            except urllib.error.HTTPError as e:  # large models come in shards, listed in an index
                if e.code != 404:
                    raise
                index = download(hub_url(repo_id, "model.safetensors.index.json"),
                                 os.path.join(local, "model.safetensors.index.json"))
                for shard in shard_names(index, ".safetensors"):  # every name checked before any download
                    download(hub_url(repo_id, shard), os.path.join(local, shard))
            _download_if_present(repo_id, "generation_config.json", local)  # generate()'s defaults, if any
    except (urllib.error.URLError, OSError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"could not download {name_or_dir} from {hub_url(repo_id, '')} ({getattr(e, 'reason', e)}). "
            f"To use it offline, put its config.json and model.safetensors in {local} "
            "(or pass a local directory holding them)"
        ) from None
    return local


def _download_if_present(repo_id: str, filename: str, local: str) -> bool:
    """Download one file of a hub repository; False (not an error) when the repository has no such file."""
    try:
        download(hub_url(repo_id, filename), os.path.join(local, filename))
        return True
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
        return False


def shard_names(index_path: str, suffix: str) -> List[str]:
    """The shard files a sharded checkpoint's index (model.safetensors.index.json) lists, sorted: its
    "weight_map" maps every tensor name to the file holding it. Each name must be a plain file name
    ending in suffix (see file_named_in), checked for all of them before any is read or downloaded; an
    index that is not JSON, or has no weight_map of names, is a CheckpointError saying so."""
    directory = os.path.dirname(index_path)
    try:
        with open(regular_file_in(directory, index_path), encoding="utf-8") as f:
            index = json.loads(f.read(MAX_JSON_BYTES + 1))  # more than that cannot be an index: not JSON then
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd nesting (CheckpointError is kept)
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{index_path} is not valid JSON ({e}); expected a shard index") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no \"weight_map\" (an object: tensor name -> shard file): "
                              "it is damaged or not a shard index")
    for name in weight_map.values():
        file_named_in(directory, name, index_path)
        if not name.endswith(suffix):
            raise CheckpointError(f"{index_path} names the shard {name!r}, expected a {suffix} file")
    return sorted(set(weight_map.values()))


def load_state_dict_files(directory: str, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The weights of a model directory, whichever of the four Hugging Face layouts it uses, memory-mapped
    (see load_safetensors), shard after shard, with floating-point tensors in `dtype` when given. Every
    file must be a regular file inside the directory (regular_file_in), every shard name a plain one."""
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        single, index = os.path.join(directory, single_name), os.path.join(directory, index_name)
        if os.path.exists(single):
            files = [single]
        elif os.path.exists(index):  # shards: the index maps every tensor name to its file
            files = [os.path.join(directory, name) for name in shard_names(index, os.path.splitext(single_name)[1])]
        else:
            continue
        state_dict = {}
        for path in files:
            if not os.path.lexists(path):
                raise CheckpointError(f"{path} is listed in {index_name} but missing")
            regular_file_in(directory, path)
            if path.endswith(".safetensors"):
                state_dict.update(load_safetensors(path, dtype))
            else:  # weights_only: a .bin is a pickle, and a pickle can run code; this refuses anything but tensors
                try:
                    loaded = load_bin(path)
                except Exception as e:
                    raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint of tensors "
                                          f"({type(e).__name__}): truncated, corrupt or unsafe") from None
                if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in loaded.items()):
                    raise CheckpointError(f"{path} holds a {type(loaded).__name__}, expected a dict of tensors "
                                          "by name")
                state_dict.update({k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                                   for k, v in loaded.items()})
        return state_dict
    raise CheckpointError(f"{directory} holds no weights: expected model.safetensors, pytorch_model.bin or a "
                          "sharded index of either")


def load_bin(path) -> dict:
    """A pytorch_model.bin (a zip of pickled tensors) memory-mapped like safetensors (torch.load(mmap=True),
    copy-on-write too); files from before PyTorch 1.6's zip format cannot be mapped and are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "zipfile" not in str(e) and "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


# Keys that heads other than the one being loaded may bring along, and buffers older checkpoints saved.
OTHER_HEAD_PREFIXES = ("lm_head.", "multiple_choice_head.", "score.", "classifier.", "qa_outputs.")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".crossattention.bias", ".crossattention.masked_bias")


def match_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a checkpoint's keys to the model's (checkpoints of the body have no "transformer." prefix,
    checkpoints of a head do), drop what the model does not need, and check the rest: every missing or
    unexpected key and every shape mismatch is listed in one error."""
    expected = model.state_dict()
    is_body = isinstance(model, GPT2Model)
    renamed = {}
    for key, tensor in state_dict.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if is_body and key.startswith("transformer."):
            key = key[len("transformer."):]
        elif not is_body and not key.startswith("transformer.") and not key.startswith(OTHER_HEAD_PREFIXES):
            key = "transformer." + key
        renamed[key] = tensor
    tied = getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in expected
    if tied:
        renamed.pop("lm_head.weight", None)  # the embedding matrix is the head: load it once
    missing = [k for k in expected if k not in renamed and not (tied and k == "lm_head.weight")
               and (is_body or k.startswith("transformer."))]  # a head's own weights may start fresh
    unexpected = [k for k in renamed if k not in expected and not k.startswith(OTHER_HEAD_PREFIXES)]
    mismatched = [f"{k}: checkpoint {tuple(renamed[k].shape)}, model {tuple(expected[k].shape)}"
                  for k in renamed if k in expected and renamed[k].shape != expected[k].shape]
    # A header may label a tensor I32 where the bytes are F32 (the same size): such a tensor would become an
    # integer parameter and fail deep inside the first forward. Every weight the model keeps in floating
    # point must come as floating point (any precision: from_pretrained converts it).
    mismatched += [f"{k}: checkpoint {renamed[k].dtype}, model {expected[k].dtype}" for k in renamed if k in expected
                   and renamed[k].is_floating_point() != expected[k].is_floating_point()]
    if missing or unexpected or mismatched:
        lines = [f"missing keys: {missing}"] * bool(missing) + [f"unexpected keys: {unexpected}"] * bool(unexpected)
        lines += [f"shape or dtype mismatches: {mismatched}"] * bool(mismatched)
        raise CheckpointError("the checkpoint does not fit " + type(model).__name__ + ": " + "; ".join(lines))
    return {k: v for k, v in renamed.items() if k in expected}


def check_finite(state_dict: Dict[str, torch.Tensor], where) -> Dict[str, torch.Tensor]:
    """Refuse weights holding NaN or inf (a corrupt file, or a run that diverged before it was saved): every
    such tensor is named, with how many of its values are not finite. Returns state_dict unchanged."""
    bad, chunk = [], 1 << 20
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            continue
        # A million values at a time: a bool mask the size of a whole embedding (38M values for GPT-2's) would
        # be freed, but stay in the process's memory, and loading is meant to add nothing but the file's pages.
        flat = tensor.reshape(-1)
        if not all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk)):
            count = int((~torch.isfinite(tensor)).sum())
            bad.append(f"{name} ({count} of {tensor.numel()} values)")
    if bad:
        raise CheckpointError(f"{where}: weights hold NaN or inf, in {len(bad)} tensor(s): {', '.join(bad)}. "
                              "The checkpoint is corrupt or its training diverged; use an earlier one")
    return state_dict


def parse_dtype(dtype) -> Optional[torch.dtype]:
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype is None or dtype in names.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in names:  # an integer or complex model would fail, or be wrong
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(names)} (or torch.float32, float16, bfloat16)")
    return names[dtype]


def from_pretrained(cls, name_or_dir, dtype=None, device=None):
    """Build a model of class `cls` from a Hugging Face checkpoint: a local directory, a released name
    (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2) or a hub repository id. Weights load in fp32
    unless dtype says otherwise ("float16", "bfloat16", or a torch.dtype), onto `device` (default CPU).
    A head the checkpoint has no weights for (say a classifier on top of gpt2) starts freshly initialised."""
    dtype = parse_dtype(dtype) or torch.float32
    device = resolve_device(str(device)) if device is not None else None  # a machine without it: one line, now
    directory = resolve_checkpoint(str(name_or_dir))
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{directory} has no config.json")
    config = GPT2Config.from_json_file(config_path)
    with without_random_init():
        model = cls(config)
    state_dict = match_state_dict(model, load_state_dict_files(directory, dtype))
    check_finite(state_dict, directory)
    # assign=True makes the loaded tensors (views of the mapped file) the parameters, instead of copying
    # them into parameters allocated for the purpose: the file is the model's memory.
    missing = model.load_state_dict(separate_shared(state_dict), strict=False, assign=True).missing_keys
    finish_loading(model, config, missing)
    model.to(dtype=dtype, device=device)  # a no-op for tensors already in this dtype, on this device
    generation_path = os.path.join(directory, "generation_config.json")
    if hasattr(model, "generation_config") and os.path.exists(generation_path):
        model.generation_config = read_generation_config(generation_path, model)
    return model.eval()


def read_generation_config(path: str, model) -> GenerationConfig:
    """generation_config.json beside a checkpoint's config.json: generate()'s defaults for this model, as the
    reference reads them (fields it leaves out take GenerationConfig's defaults). A field of the wrong type or
    range is a CheckpointError naming the file."""
    generation_config = GenerationConfig.from_json_file(path)
    try:
        _check_generation_config(generation_config, model.lm_head.weight.size(0))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return generation_config


@contextlib.contextmanager
def without_random_init():
    """Build a model whose weights a checkpoint will bring without first filling it with random numbers:
    torch.nn.init's random fills are no-ops meanwhile, so parameters stay as torch.empty made them, memory
    the operating system backs only once it is written, and load_state_dict(assign=True) replaces them
    before it ever is. Hugging Face's from_pretrained skips the fills the same way (no_init_weights).
    (PyTorch's meta device would skip even the allocation, but building on it runs Python decompositions
    of tril, arange and normal_ that import torch._dynamo: seconds, for a model that loads in one.)"""
    fills = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "xavier_uniform_")
    saved = {name: getattr(nn.init, name) for name in fills}
    try:
        for name in fills:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fill in saved.items():
            setattr(nn.init, name, fill)


def separate_shared(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Tensors that share memory in the file (a .bin saved with tied weights, loaded into an untied model)
    are copied apart, or training one would silently change the other. Non-contiguous ones (a .bin may hold
    views) are made contiguous."""
    seen, separate = set(), {}
    for key, tensor in state_dict.items():
        ptr = tensor.untyped_storage().data_ptr()
        separate[key] = tensor.clone() if ptr in seen and tensor.numel() else tensor.contiguous()
        seen.add(ptr)
    return separate


def finish_loading(model: nn.Module, config: GPT2Config, missing_keys: List[str]):
    """What load_state_dict(assign=True) leaves to do: tie the LM head to the token embeddings again (the
    embeddings' parameter was replaced; the head still points at the old one), and give the model's
    initialisation to the modules whose weights the checkpoint did not hold (a fresh head)."""
    tied = config.tie_word_embeddings and hasattr(model, "lm_head")
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    for key in missing_keys:
        if not (tied and key == "lm_head.weight"):
            init_gpt2_weights(model.get_submodule(key.rpartition(".")[0]), config)


def save_pretrained(model: nn.Module, directory):
    """Write config.json and model.safetensors in the layout Hugging Face transformers loads (and, for the LM
    head, generation_config.json, generate()'s defaults). The tied
    head (lm_head.weight, the same tensor as transformer.wte.weight) is stored once, as transformers does."""
    os.makedirs(directory, exist_ok=True)
    state_dict = model.state_dict()
    if model.config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    check_finite(state_dict, f"save_pretrained({os.fspath(directory)!r})")  # never save what cannot be loaded
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    save_safetensors(state_dict, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:  # the heads that generate
        model.generation_config.to_json_file(os.path.join(directory, "generation_config.json"))
    write_json(os.path.join(directory, "config.json"), config)


# Every model class loads and saves the same way: one function each, attached to all six classes.
for _cls in HEAD_CLASSES:
    _cls.from_pretrained = classmethod(from_pretrained)
    _cls.save_pretrained = save_pretrained


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------


# GPT-2 reads byte-pair-encoded text (BPE, Sennrich et al. 2016, on bytes as in the GPT-2 paper, section 2.2):
#     1. special tokens are cut out first: the text <|endoftext|> becomes token 50256 (when allowed);
#     2. the rest is cut into pieces by a pattern: a word with the space before it, a number, a run of other
#        symbols, a run of whitespace; tokens never cross a piece's edges;
#     3. each piece's UTF-8 bytes start as one token each (256 byte tokens), and the adjacent pair whose merged
#        bytes have the lowest rank is merged, again and again, until no merged pair is in the vocabulary.
# The 50,000 merges, in rank order, are OpenAI's vocab.bpe; with 256 bytes and <|endoftext|>, 50,257 tokens.
# tiktoken does all this in Rust, fast: get_tokenizer() is what the model's tools use. The same three steps are
# written out below in Python (BytePairEncoding: get_tokenizer("python")), proven to give tiktoken's tokens on any
# text by tests/test_tokenizer.py; and train_bpe learns merges of its own from a text file (train --tokenizer bpe).
EOT_TOKEN = 50256  # <|endoftext|>, which separated documents in training


@functools.lru_cache(maxsize=None)
def get_tokenizer(kind: str = "tiktoken"):
    """GPT-2's tokenizer: tiktoken's "gpt2" encoding (kind "tiktoken", the default: fast), or the same encoding
    written out in this file (kind "python": a BytePairEncoding, with tiktoken's encode(text, allowed_special=...),
    decode(ids) and decode_single_token_bytes(id)). Both give the same tokens for every text."""
    if kind == "python":
        return BytePairEncoding(read_merges(gpt2_merges_file(), sha256=GPT2_MERGES_SHA256), name="gpt2")
    if kind != "tiktoken":
        raise ValueError(f"get_tokenizer's kind is \"tiktoken\" (the default) or \"python\", got {kind!r}")
    import tiktoken  # imported here so the model code works without it

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its files on first use
        raise OSError(
            f"tiktoken could not load the gpt2 encoding ({e}). Offline, point TIKTOKEN_CACHE_DIR at a folder "
            "holding its cached files (this repository ships them: TIKTOKEN_CACHE_DIR=tests/fixtures/tiktoken)"
        ) from None


def encode(text: str) -> List[int]:
    """Text -> GPT-2 token ids. The literal text <|endoftext|> becomes the special token 50256."""
    if not isinstance(text, str):
        raise TypeError(f"encode takes a str, got {type(text).__name__} {text!r:.60}")
    return get_tokenizer().encode(text, allowed_special={"<|endoftext|>"})


def token_ids(ids, vocab_size: int = EOT_TOKEN + 1, name: str = "ids") -> List[int]:
    """ids (a list or 1-D tensor of integers) as a list of ints, each checked to be a token id in
    [0, vocab_size): one clear error naming the first bad one, instead of the tokenizer's own KeyError."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1 or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{name} must be a 1-D tensor of integer token ids, got {ids.dtype} of shape "
                            f"{tuple(ids.shape)}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(ids).__name__} {ids!r:.60}")
    ids = list(ids)
    for i, token in enumerate(ids):
        check_token_id(token, vocab_size, f"{name}[{i}]")
    return [int(token) for token in ids]


def check_token_id(token, vocab_size: int, name: str = "token"):
    """A ValueError naming `name` unless token is an integer (a Python or numpy one, not a bool) in
    [0, vocab_size)."""
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < vocab_size:
        raise ValueError(f"{name} is {token!r:.40}, but token ids are integers in [0, {vocab_size})")


def decode(ids) -> str:
    """Token ids -> text (bytes that are not valid UTF-8 on their own become U+FFFD)."""
    return get_tokenizer().decode(token_ids(ids))


def encode_batch(prompts: List[str], pad_id: int = EOT_TOKEN, encode_fn=encode) -> Tuple[torch.Tensor, torch.Tensor]:
    """Several prompts -> (input_ids (B, T), attention_mask (B, T)), left-padded so that every prompt
    ends at the last column, where generation continues. An empty prompt starts from pad_id
    (<|endoftext|> for GPT-2). encode_fn: text -> ids (GPT-2's BPE unless a model has its own)."""
    if isinstance(prompts, str):  # a string is a sequence too: each character would become a prompt
        raise TypeError(f"prompts must be a list of strings, got the string {prompts[:40]!r}; wrap it: [prompt]")
    if len(prompts) == 0:
        raise ValueError("prompts is an empty list; give at least one prompt ([\"\"] starts from <|endoftext|>)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] is {type(prompt).__name__} {prompt!r:.40}, expected a str")
    if not is_kind(pad_id, int) or pad_id < 0:
        raise TypeError(f"pad_id must be a token id (an int >= 0), got {pad_id!r}")
    encoded = [encode_fn(p) or [pad_id] for p in prompts]
    T = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, T - len(ids):] = torch.tensor(ids)
        attention_mask[row, T - len(ids):] = 1
    return input_ids, attention_mask


class StreamDecoder:
    """Decodes one sequence's tokens as they arrive. A BPE token can end in the middle of a multi-byte
    character, so bytes go through an incremental UTF-8 decoder that holds back incomplete characters.
    A character-level model (chars: its vocabulary string) needs none of that. bpe: a model's own BPE (a
    BytePairEncoding that train_bpe learnt), whose tokens' bytes are its own; by default GPT-2's."""

    def __init__(self, chars: Optional[str] = None, bpe: Optional["BytePairEncoding"] = None):
        self.chars, self.bpe = chars, bpe
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> str:
        """The text a new token adds, as soon as it is complete: "" while a multi-byte UTF-8 character is still
        unfinished (its remaining bytes come with the next tokens). GPT-2's BPE tokens are bytes
        (get_tokenizer().decode_single_token_bytes), and a token can end in the middle of a character, so bytes
        go through the incremental decoder self.utf8. With chars (a character-level model) a token is simply
        chars[token]. Everything returned, joined, plus flush(), equals decode() of all the tokens."""
        vocab_size = len(self.chars) if self.chars is not None else self.bpe.n_vocab if self.bpe else EOT_TOKEN + 1
        token = int(token) if isinstance(token, torch.Tensor) and token.numel() == 1 else token
        check_token_id(token, vocab_size)
        if self.chars is not None:
            return self.chars[int(token)]
        if self.bpe is not None:
            return self.utf8.decode(self.bpe.decode_single_token_bytes(int(token)))
        return self.utf8.decode(get_tokenizer().decode_single_token_bytes(int(token)))

    def flush(self) -> str:
        """What is left at the end, as decode() gives it: an unfinished character becomes U+FFFD; "" when nothing
        is pending."""
        return self.utf8.decode(b"", final=True)


# --- GPT-2's byte-pair encoding, written out ----------------------------------------------------------------
#
# Step 2's pattern, as GPT-2's encoder.py writes it (tiktoken's is the same, with possessive quantifiers):
#     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# \p{L} is a letter and \p{N} a number, of any script; \s is whitespace. Python's re has no \p{...}, so the
# classes are spelt out as ranges of characters, made once from unicodedata's general categories (L...: letters,
# N...: numbers), and \s as the 25 characters of Unicode's White_Space property: Python's own \s also takes
# \x1c-\x1f, which tiktoken's regex does not.
WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))  # U+2000-U+200A
              + "\u2028\u2029\u202f\u205f\u3000")
# tiktoken's regex knows Unicode 16.0; Python 3.11's unicodedata knows 14.0 (3.12: 15.0, 3.13: 15.1). The letters
# and numbers that Unicode 15.0 to 16.0 added (CJK ideographs of extensions H and I, Egyptian hieroglyphs, new
# scripts' letters and digits) count as letters and numbers here too, so that the pieces are tiktoken's on any
# Python from 3.11 on. Code points, in hexadecimal:
NEWER_LETTERS = ("1C89-1C8A A7CB-A7CD A7DA-A7DC 105C0-105F3 10D4A-10D65 10D6F-10D85 10EC2-10EC4 1123F-11240 "
                 "11380-11389 1138B 1138E 11390-113B5 113B7 113D1 113D3 11BC0-11BE0 11F02 11F04-11F10 11F12-11F33 "
                 "1342F 13441-13446 13460-143FA 16100-1611D 16D40-16D6C 18CFF 1B132 1B155 1DF25-1DF2A 1E030-1E06D "
                 "1E4D0-1E4EB 1E5D0-1E5ED 1E5F0 2B739 2EBF0-2EE5D 31350-323AF")
NEWER_NUMBERS = ("10D40-10D49 116D0-116E3 11BF0-11BF9 11F50-11F59 16130-16139 16D70-16D79 1CCF0-1CCF9 1D2C0-1D2D3 "
                 "1E4F0-1E4F9 1E5F1-1E5FA")


@functools.lru_cache(maxsize=None)
def character_classes() -> Tuple[str, str, str]:
    """Three re expressions that each match one character: a letter (\\p{L}), a number (\\p{N}), and anything else
    but whitespace ([^\\s\\p{L}\\p{N}]), every one of them listed as ranges of consecutive characters. Made once,
    from unicodedata (a third of a second), plus NEWER_LETTERS and NEWER_NUMBERS.
    Each is two classes, "[<ranges below U+10000>]|(?=[\\U00010000-\\U0010ffff])[<ranges above>]": re checks a class
    that holds characters beyond U+FFFF range by range, hundreds of them for each character that is not in it, but
    a class of the first 65,536 with one look-up, which makes encoding English text twice as fast."""
    kind = [unicodedata.category(chr(cp))[0] for cp in range(sys.maxunicode + 1)]  # "L", "N", "P", "S", "Z", ...
    for letter_or_number, newer in (("L", NEWER_LETTERS), ("N", NEWER_NUMBERS)):
        for span in newer.split():
            first, last = int(span.split("-")[0], 16), int(span.split("-")[-1], 16)
            kind[first: last + 1] = letter_or_number * (last - first + 1)
    kind = "".join("W" if chr(cp) in WHITESPACE else k if k in "LN" else "O" for cp, k in enumerate(kind))

    def ranges(k: str, start: int, end: int) -> str:  # the characters of kind k in [start, end), as re ranges
        return "".join(re.escape(chr(start + m.start())) + (f"-{re.escape(chr(start + m.end() - 1))}"
                                                            if m.end() - m.start() > 1 else "")
                       for m in re.finditer(f"{k}+", kind[start:end]))

    return tuple(f"(?:[{ranges(k, 0, 0x10000)}]|(?=[\U00010000-\U0010ffff])[{ranges(k, 0x10000, 0x110000)}])"
                 for k in "LNO")


@functools.lru_cache(maxsize=None)
def gpt2_split_pattern() -> "re.Pattern":
    """GPT-2's pattern for the standard re module: \\p{L}, \\p{N} and [^\\s\\p{L}\\p{N}] spelt out
    (character_classes), \\s as the characters of WHITESPACE; (?!\\S), "not followed by a non-space", is
    (?![^<whitespace>])."""
    letter, number, other = character_classes()
    space = re.escape(WHITESPACE)
    return re.compile(f"'(?:s|t|re|ve|m|ll|d)| ?{letter}+| ?{number}+| ?{other}+|[{space}]+(?![^{space}])|[{space}]+")


def split_into_pieces(text: str) -> List[str]:
    """GPT-2's pre-tokenizer: text cut into the pieces that byte-pair merges never cross, in order; joined they give
    back the text. At each position the first of these that matches is taken, as long as it goes:
      1. a contraction, lower case only: 's 't 're 've 'm 'll 'd ("it's" -> "it", "'s"; "IT'S" -> "IT", "'", "S");
      2. an optional space (" ", U+0020 only) and a run of letters of any script (" Hello", "naïve", " 東京");
      3. an optional space and a run of numbers of any kind (" 2019", "٣", "½");
      4. an optional space and a run of anything else but whitespace (" !?", " 🙂", "://");
      5. a run of whitespace (WHITESPACE: spaces, tabs, newlines, U+00A0, U+3000, ...) that reaches the end of
         the text, or else all of it but its last character: "a   b" -> "a", "  ", " b", so that the last space
         goes with the word after it;
      6. one whitespace character (a run of one before a non-space: "\\nb" -> "\\n", "b").
    A letter is a character whose Unicode category is L..., a number N... (see character_classes)."""
    return gpt2_split_pattern().findall(text)


def merge_piece(piece: bytes, ranks: Dict[bytes, int]) -> List[int]:
    """One piece's merge loop: piece's bytes start as one token each; then the adjacent pair whose merged bytes
    have the lowest rank (ranks: a token's bytes -> its id, which is its rank) becomes one token, the leftmost
    such pair if it occurs twice, again and again until no adjacent pair's merged bytes are in ranks. Returns
    the token ids. A piece that is a token as a whole is that token at once, as tiktoken does: with GPT-2's merges
    that only saves time (the bytes of each of its tokens merge back into that token)."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i: i + 1] for i in range(len(piece))]
    no_merge = len(ranks)  # a rank above every real one: this pair is no token
    pair_ranks = [ranks.get(a + b, no_merge) for a, b in zip(parts, parts[1:])]  # pair_ranks[i]: parts i, i + 1
    while pair_ranks:
        best = min(pair_ranks)
        if best == no_merge:
            break
        i = pair_ranks.index(best)  # the leftmost pair of the lowest rank
        parts[i: i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:  # the pairs on either side of the merged token have changed
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], no_merge)
        if i < len(pair_ranks):
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], no_merge)
    return [ranks[part] for part in parts]


# A vocab.bpe file writes each byte as one printable character, so that a token reads as a word on a line: the
# printable characters of Latin-1 (all but the space) stand for their own byte ('a', '!', 'é'), and the 68 others,
# in order, for chr(256), chr(257), ...: a space is 'Ġ', a newline 'Ċ', a tab 'ĉ'. The 256 byte tokens are
# numbered in the same order: first the printable ones ('!' is token 0), then the others (a space is token 220).
PRINTABLE_BYTES = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
BYTE_ORDER = PRINTABLE_BYTES + [b for b in range(256) if b not in PRINTABLE_BYTES]  # byte token id -> its byte
BYTE_SYMBOLS = [chr(b) if b in PRINTABLE_BYTES else chr(256 + BYTE_ORDER.index(b) - len(PRINTABLE_BYTES))
                for b in range(256)]  # byte -> the character vocab.bpe writes it as
MAX_MERGES_BYTES = 64 << 20  # GPT-2's 50,000 merges take 456 kB
BPE_CACHE_PIECES = 1 << 18  # pieces whose tokens an encoder remembers (English text repeats its words)


class BytePairEncoding:
    """A byte-level BPE tokenizer written out: GPT-2's (get_tokenizer("python")), or one that train_bpe learnt. Its
    tokens are the 256 bytes (in BYTE_ORDER), then one per merge, in rank order, then <|endoftext|>: GPT-2's
    50,000 merges make 50,257 tokens. The methods are tiktoken's: encode, encode_ordinary, decode,
    decode_single_token_bytes, n_vocab, eot_token; pieces() shows the work, piece by piece.

    merges: (left bytes, right bytes) in rank order; each side must already be a token (a byte, or an earlier
    merge's bytes) and each merge must make new bytes, or it is a ValueError naming the merge."""

    def __init__(self, merges: List[Tuple[bytes, bytes]], name: str = "bpe"):
        self.name, self.merges = name, list(merges)
        impossible = impossible_merge(self.merges)
        if impossible is not None:
            i, problem = impossible
            raise ValueError(f"merge {i} ({merges[i][0]!r} + {merges[i][1]!r}) is impossible: {problem}")
        self.tokens = [bytes([b]) for b in BYTE_ORDER] + [left + right for left, right in self.merges]  # id -> bytes
        self.ranks = {token: i for i, token in enumerate(self.tokens)}  # token bytes -> id, which is its rank
        self.eot_token = len(self.tokens)
        self.special_tokens = {"<|endoftext|>": self.eot_token}
        self.tokens.append(b"<|endoftext|>")
        self.n_vocab = len(self.tokens)
        self.cache: Dict[str, List[int]] = {}  # piece -> its token ids, for the BPE_CACHE_PIECES first pieces seen

    def __repr__(self):
        return f"<BytePairEncoding {self.name!r}: {len(self.merges):,} merges, {self.n_vocab:,} tokens>"

    def encode(self, text: str, allowed_special=(), disallowed_special="all") -> List[int]:
        """text -> token ids, as tiktoken's Encoding.encode. The special tokens named in allowed_special ("all":
        every one) become their ids wherever their text occurs; the text of one that is not allowed is a
        ValueError, unless disallowed_special leaves it out (disallowed_special=(): it is encoded as ordinary
        text, "<|endoftext|>" then being 7 tokens)."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__} {text!r:.60}")
        for special in sorted(disallowed):
            if special in text:
                raise ValueError(f"the text holds {special!r} (at character {text.index(special)}), a special token "
                                 f"not allowed here: pass allowed_special={{{special!r}}} to encode it as its token, "
                                 "or disallowed_special=() to encode it as ordinary text")
        ids = []
        for segment, is_special in self.segments(valid_unicode(text), allowed):
            ids.extend([self.special_tokens[segment]] if is_special else self.encode_ordinary(segment))
        return ids

    def encode_ordinary(self, text: str) -> List[int]:
        """text -> token ids, every character ordinary text (the text <|endoftext|> is 7 tokens): steps 2 and 3."""
        ids, cache, ranks = [], self.cache, self.ranks
        for piece in split_into_pieces(valid_unicode(text)):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = merge_piece(piece.encode("utf-8"), ranks)
                if len(cache) < BPE_CACHE_PIECES:
                    cache[piece] = piece_ids
            ids.extend(piece_ids)
        return ids

    def segments(self, text: str, allowed) -> List[Tuple[str, bool]]:
        """Step 1: text cut at the special tokens of `allowed` into (segment, is_special); empty segments left out."""
        allowed = sorted(set(allowed) & self.special_tokens.keys(), key=len, reverse=True)
        if not allowed:
            return [(text, False)] if text else []
        parts = re.split("(" + "|".join(map(re.escape, allowed)) + ")", text)  # text, special, text, special, ...
        return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]

    def pieces(self, text: str, allowed_special="all") -> List[Tuple[str, List[int]]]:
        """What encode does, shown: every piece of text (a special token is a piece of its own) with its token ids.
        The ids, joined, are encode(text, allowed_special)."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        shown = []
        for segment, is_special in self.segments(valid_unicode(text), allowed):
            if is_special:
                shown.append((segment, [self.special_tokens[segment]]))
            else:
                shown += [(piece, self.encode_ordinary(piece)) for piece in split_into_pieces(segment)]
        return shown

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.tokens[i] for i in token_ids(ids, self.n_vocab))

    def decode(self, ids, errors: str = "replace") -> str:
        """Token ids -> text; bytes that are not valid UTF-8 become U+FFFD (errors="replace"), as tiktoken does."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_single_token_bytes(self, token: int) -> bytes:
        """A token's bytes: a token can end in the middle of a character's UTF-8 bytes (see StreamDecoder)."""
        check_token_id(token, self.n_vocab)
        return self.tokens[token]


def impossible_merge(merges: List[Tuple[bytes, bytes]]) -> Optional[Tuple[int, str]]:
    """(the index of the first merge that cannot be, and why), or None when every merge can be: each side must be a
    token already (a byte, or the bytes of an earlier merge), and each merge must make bytes that are no token yet."""
    known = {bytes([b]) for b in range(256)}
    for i, (left, right) in enumerate(merges):
        problem = ("its left side is no token yet" if left not in known else
                   "its right side is no token yet" if right not in known else
                   "an earlier merge made the same token" if left + right in known else "")
        if problem:
            return i, problem
        known.add(left + right)
    return None


def valid_unicode(text: str) -> str:
    """text as UTF-8 can store it: a str holding halves of UTF-16 surrogate pairs (a bad decode can leave them)
    gets tiktoken's repair, each pair joined into its character and each lone half made U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# GPT-2's 50,000 merges: OpenAI's vocab.bpe, the file tiktoken itself reads for its "gpt2" encoding. tiktoken keeps
# it in its cache folder (TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else <temp>/data-gym-cache) under the SHA-1 of
# its address, and checks its SHA-256; so does gpt2_merges_file.
GPT2_MERGES_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def gpt2_merges_file() -> str:
    """The path of GPT-2's vocab.bpe in tiktoken's cache; if it is not there yet, tiktoken is asked for GPT-2's
    encoding, which downloads it there."""
    folder = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR",
                                                                 os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    path = os.path.join(folder, hashlib.sha1(GPT2_MERGES_URL.encode()).hexdigest())
    if not os.path.exists(path):
        get_tokenizer()
    if not folder or not os.path.exists(path):
        raise OSError(f"GPT-2's merges (vocab.bpe) are not in tiktoken's cache folder {folder!r}: point "
                      "TIKTOKEN_CACHE_DIR at a folder holding them (this repository ships them: "
                      "TIKTOKEN_CACHE_DIR=tests/fixtures/tiktoken)")
    return path


def read_merges(path, sha256: Optional[str] = None) -> List[Tuple[bytes, bytes]]:
    """The merges of a file in vocab.bpe's format, in rank order: GPT-2's own, or one write_merges wrote. The
    format (OpenAI's, and Hugging Face's merges.txt): the line "#version: 0.2", then one merge a line, in rank
    order, its two tokens separated by one space, each written with BYTE_SYMBOLS ("Ġt he" is " t" + "he"), and a
    newline at the end. A file over MAX_MERGES_BYTES, not in this format, or (sha256 given) with another SHA-256
    is a ValueError naming it and, where there is one, the line."""
    with open(path, "rb") as f:
        data = f.read(MAX_MERGES_BYTES + 1)
    damaged = f"{path} is damaged (not a list of merges as vocab.bpe or train write it)"
    if len(data) > MAX_MERGES_BYTES:
        raise ValueError(f"{damaged}: it is over {MAX_MERGES_BYTES >> 20} MB (GPT-2's 50,000 merges take 456 kB)")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path} is damaged: its SHA-256 is not {sha256}, GPT-2's vocab.bpe's; delete it, and "
                         "tiktoken downloads it again")
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{damaged}: byte {e.start} is not UTF-8") from None
    if lines[0] != "#version: 0.2" or lines[-1] != "":
        raise ValueError(f"{damaged}: it must begin with the line '#version: 0.2' and end with a newline")
    byte_of = {symbol: byte for byte, symbol in enumerate(BYTE_SYMBOLS)}
    merges = []
    for number, line in enumerate(lines[1:-1], start=2):
        sides = line.split(" ")
        if len(sides) != 2 or not all(sides) or any(c not in byte_of for c in sides[0] + sides[1]):
            raise ValueError(f"{damaged}: line {number}, {line[:60]!r}, is not two tokens separated by one space")
        merges.append(tuple(bytes(byte_of[c] for c in side) for side in sides))
    impossible = impossible_merge(merges)
    if impossible is not None:
        i, problem = impossible
        raise ValueError(f"{damaged}: line {i + 2}, {lines[i + 1][:60]!r}, is impossible: {problem}")
    return merges


def write_merges(path, merges: List[Tuple[bytes, bytes]]):
    """The merges to path, atomically, in the format read_merges reads (GPT-2's vocab.bpe's)."""
    lines = ["#version: 0.2"] + [" ".join("".join(BYTE_SYMBOLS[b] for b in side) for side in merge) for merge in merges]
    _write_atomically(path, ("\n".join(lines) + "\n").encode("utf-8"))


# --- Training a byte-pair encoding on your own text --------------------------------------------------------
#
# train_bpe learns merges the way GPT-2's were learnt: the text is cut into pieces by the same pattern (so that no
# token spans two words), each different piece is counted once with how often it occurs, and then, merge after
# merge, the pair of adjacent tokens that occurs most often (within pieces, counted once per occurrence of the
# piece) becomes a new token. Ties go to the pair whose bytes sort first (the left token's bytes, then the
# right's), so that the result never depends on the order of a dict. A pair must occur twice: a token made from
# something seen once would be memorised, not learnt. Counting every pair again after each merge takes minutes
# on a few megabytes; PairCounts updates the counts of the pieces that hold the merged pair only, and keeps the
# counts in a heap, where the most frequent is found at once.


def merge_pair(word: List[int], pair: Tuple[int, int], new_id: int) -> List[int]:
    """word (token ids) with every occurrence of pair replaced by new_id, from left to right, never overlapping:
    merge_pair([5, 5, 5], (5, 5), 9) is [9, 5]. word itself is left as it is."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


class PairCounts:
    """BPE training's state: each different piece of the text as token ids (words) with how often it occurs
    (counts); how often each adjacent pair of token ids occurs (pairs: a pair inside a piece counts the piece's
    count), the words that hold each pair (where), and a heap of (-count, left bytes, right bytes, pair) that
    puts the next pair to merge first. One round of training: `counts.merge(counts.best_pair())`."""

    def __init__(self, pieces: Dict[bytes, int]):
        self.tokens = [bytes([b]) for b in BYTE_ORDER]  # token id -> its bytes, as BytePairEncoding numbers them
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        self.words = [[self.ids[piece[i: i + 1]] for i in range(len(piece))] for piece in pieces]
        self.counts = list(pieces.values())
        self.pairs: Dict[Tuple[int, int], int] = collections.Counter()
        self.where: Dict[Tuple[int, int], set] = collections.defaultdict(set)
        for w, word in enumerate(self.words):
            for pair in zip(word, word[1:]):
                self.pairs[pair] += self.counts[w]
                self.where[pair].add(w)
        self.heap = [self.heap_entry(pair) for pair in self.pairs]
        heapq.heapify(self.heap)

    def heap_entry(self, pair: Tuple[int, int]) -> tuple:
        """pair's place in the heap, smallest first: the most frequent, then the one whose bytes sort first."""
        return (-self.pairs[pair], self.tokens[pair[0]], self.tokens[pair[1]], pair)

    def best_pair(self) -> Optional[Tuple[int, int]]:
        """The pair to merge next: the most frequent; among equally frequent ones, the one whose left token's bytes
        sort first, then its right token's; None when no pair occurs twice. (merge adds a new heap entry whenever a
        count changes; an entry whose count is out of date is dropped here.)"""
        while self.heap:
            minus_count, _, _, pair = self.heap[0]
            if -minus_count == self.pairs.get(pair, 0):
                return pair if -minus_count >= 2 else None
            heapq.heappop(self.heap)
        return None

    def merge(self, pair: Tuple[int, int]) -> Tuple[int, bool]:
        """One merge: pair becomes one token in every word that holds it, and the counts of the pairs in those words
        are updated (those words only). Returns (the token's id, whether it is new): the next free id; or, in the
        rare case that its bytes are a token already (made from another pair: "ab" + "c" after "a" + "bc"), that
        token's id, which the encoder would merge the pair into too (merge_piece ranks bytes, not pairs)."""
        token = self.tokens[pair[0]] + self.tokens[pair[1]]
        new = token not in self.ids
        if new:
            self.ids[token] = len(self.tokens)
            self.tokens.append(token)
        token_id, changed = self.ids[token], collections.Counter()
        for w in self.where.pop(pair):
            word, count = self.words[w], self.counts[w]
            merged = merge_pair(word, pair, token_id)
            if len(merged) == len(word):  # an earlier merge took the pair out of this word: a stale entry of where
                continue
            for old in zip(word, word[1:]):
                changed[old] -= count
            for now in zip(merged, merged[1:]):
                changed[now] += count
                self.where[now].add(w)
            self.words[w] = merged
        for changed_pair, delta in changed.items():
            if delta:
                self.pairs[changed_pair] += delta
                if self.pairs[changed_pair] > 0:
                    heapq.heappush(self.heap, self.heap_entry(changed_pair))
                else:
                    del self.pairs[changed_pair]
        return token_id, new


def count_pieces(source) -> Dict[bytes, int]:
    """Every different piece of a text (split_into_pieces; the text <|endoftext|> cut out first, as encode does),
    as UTF-8 bytes, with how often it occurs. source: the text (a str), or a file (a pathlib.Path or other
    os.PathLike) of UTF-8 text, read in parts."""
    counts = collections.Counter()
    for part in [valid_unicode(source)] if isinstance(source, str) else read_text_pieces(source):
        for segment in part.split("<|endoftext|>"):
            counts.update(split_into_pieces(segment))
    return {piece.encode("utf-8"): count for piece, count in counts.items()}


def train_bpe(source, vocab_size: int, option: str = "vocab_size") -> BytePairEncoding:
    """A byte-level BPE of vocab_size tokens learnt from source (a str of text, or a pathlib.Path of a UTF-8 file):
    256 byte tokens, vocab_size - 257 merges and <|endoftext|>, as GPT-2 counts its 50,257. Each merge is the
    pair of adjacent tokens that occurs most often within the pieces (see the notes above PairCounts). A
    vocab_size under 257, or more than the text supports (no pair occurs twice any more), is a ValueError that
    names `option` (the command line passes "--vocab-size")."""
    if not is_kind(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"{option} must be an integer of at least 257 (the 256 byte tokens and <|endoftext|>), "
                         f"got {vocab_size!r}")
    name = "the text" if isinstance(source, str) else os.fspath(source)
    pieces = count_pieces(source)
    wanted = vocab_size - 257
    at_most = sum(count * (len(piece) - 1) for piece, count in pieces.items()) // 2  # a merge removes 2+ tokens
    too_many = f"{option} {vocab_size} is more than {name} supports"
    if wanted > at_most:
        raise ValueError(f"{too_many}: its {len(pieces):,} different pieces allow at most {at_most:,} merges of pairs "
                         f"that occur twice, {257 + at_most:,} tokens; use a smaller {option} or a longer text")
    counts, merges = PairCounts(pieces), []
    while len(merges) < wanted:
        pair = counts.best_pair()
        if pair is None:
            raise ValueError(f"{too_many}: after {len(merges):,} merges no pair of tokens occurs twice within a "
                             f"piece, so it supports at most {257 + len(merges):,} tokens; use {option} "
                             f"{257 + len(merges)} or less, or a longer text")
        _, new = counts.merge(pair)
        if new:
            merges.append((counts.tokens[pair[0]], counts.tokens[pair[1]]))
    return BytePairEncoding(merges, name=f"trained on {name}")


# ----------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------


# `python nanogpt2.py train` trains a GPT-2, from scratch or from pretrained weights (--init), and saves it
# with save_pretrained. With no options it learns to add 2-digit numbers, on a CPU, in minutes.
# One optimiser step (train_step) does, in order:
#     1. the step's batch: addition problems made on the fly, or windows of a tokenised text file
#     2. forward and backward over k micro-batches (gradient accumulation), under autocast (mixed precision)
#     3. clip the gradient norm, then an AdamW step at the learning rate of the schedule (warmup, cosine)
# Around it, the loop (train) logs every step to a CSV file, measures the validation loss now and then,
# and saves checkpoints that resume exactly. Under torchrun every process runs this same loop on its own
# slice of each batch, and DistributedDataParallel sums their gradients.
# `python nanogpt2.py eval` measures loss and perplexity on a text file with a sliding window.
# In this order: the defaults, the Run, the tasks, the loop (train), then what the loop calls.

# --- What to train, unless told otherwise -----------------------------------------------------------------
# Every option left unset takes its value from the dataclass of the task (fill_defaults); `train --help`
# states the same values (default_help, Command line). The adder is small and takes many small steps: on a
# CPU, steps per second matter more than examples per step.
@dataclass
class AdditionDefaults:
    """No --data: a new GPT-2 learns to add (AdditionTask)."""
    digits: int = 2  # digits per operand
    n_layer: int = 2  # blocks
    n_head: int = 4  # attention heads
    n_embd: int = 64  # width
    dropout: float = 0.0  # dropout probability
    batch_size: int = 32  # examples per micro-batch and process
    lr: float = 3e-3  # peak learning rate
    warmup: int = 30  # steps of linear warmup
    max_steps: int = 2000  # optimiser steps
    time_budget: float = 240.0  # seconds of training; 0: none
    eval_every: int = 50  # steps between validation losses (and exact-match checks)
    log_every: int = 100  # steps between progress lines
    target_accuracy: float = 0.99  # stop once this share of the held-out problems is right


@dataclass
class TextDefaults:
    """--data FILE: a new GPT-2 learns a text file."""
    tokenizer: str = "gpt2"  # GPT-2's BPE; "char": one token per character of the file; "bpe": a BPE learnt from it
    vocab_size: int = 512  # --tokenizer bpe: 256 byte tokens + 255 merges + <|endoftext|>
    block_size: int = 256  # tokens per training window
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    batch_size: int = 16
    lr: float = 6e-4
    warmup: int = 100
    max_steps: int = 2000
    time_budget: float = 0.0
    eval_every: int = 200
    log_every: int = 20


@dataclass
class FineTuneDefaults:
    """--init NAME_OR_DIR: a checkpoint trained further, on either task; these replace the task's. What the
    checkpoint fixes itself (its vocabulary, its positions) stays its own."""
    lr: float = 1e-4  # gentler: the weights already know a lot
    dropout: Optional[float] = None  # None: the checkpoint's own


@dataclass
class CommonDefaults:
    """Every task."""
    accum: int = 1  # micro-batches per step (gradient accumulation)
    weight_decay: float = 0.1  # AdamW's, on matrices only
    grad_clip: float = 1.0  # largest gradient norm; 0: no clipping
    seed: int = 0  # of the weights, the batches and dropout
    val_fraction: float = 0.1  # --data: the share of tokens, at the end of the file, kept for validation
    eval_batches: int = 20  # batches in a validation loss


# How `train --help` names each dataclass when it states an option's default.
TRAIN_DEFAULTS = (("addition", AdditionDefaults), ("text", TextDefaults), ("--init", FineTuneDefaults),
                  ("every task", CommonDefaults))


# --- The run: which process, on which device, in what precision -----------------------------------------


@dataclass
class Run:
    """What a training process knows about itself, made once by train_command and passed along: its place
    among the processes torchrun started (rank 0 of 1 without torchrun), its device, its precision (with
    the GradScaler fp16 needs), and say(), which prints from the first process only."""
    rank: int = 0  # this process's number, 0 .. world_size - 1; the first (0) alone prints, logs and saves
    world_size: int = 1  # processes training together, each on its slice of every batch
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # autocast's precision: float32 (none), bfloat16 or float16

    def __post_init__(self):
        self.is_main = self.rank == 0
        # fp16 needs loss scaling (its gradients underflow); the scaler's state goes into the checkpoint.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self):
        """Mixed precision: under autocast, matrix products run in bf16 or fp16 while the weights, the
        optimiser and the loss stay fp32. A fresh context each time (float32: none)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def say(self, *lines):
        """print, at once, from the first process only (the others would repeat it)."""
        if self.is_main:
            print(*lines, flush=True)


# --- Tokenizers: characters, GPT-2's BPE, or a BPE trained on the text --------------------------------------


class CharTokenizer:
    """One token per character of a fixed string, the vocabulary: token i is chars[i]. A model trained on
    characters keeps that string in its config.json ("char_vocab"), so whoever loads it can decode."""

    kind = "char"
    bpe = None

    def __init__(self, chars: str):
        self.chars = chars
        self.ids = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)
        self.describe = f"{len(chars)} characters"

    def encode(self, text: str) -> List[int]:
        unknown = set(text) - self.ids.keys()
        if unknown:
            raise ValueError(f"the text holds characters that are not in the vocabulary {self.chars!r}: "
                             f"{''.join(sorted(unknown))!r}")
        return [self.ids[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class BPETokenizer:
    """A byte-pair encoding behind the same two methods: GPT-2's (tiktoken), or, given bpe, one that train_bpe
    learnt from the text (--tokenizer bpe). A model trained with its own BPE keeps the merges beside its weights
    (MERGES_FILE) and names that file in its config.json ("bpe_merges"). The text <|endoftext|> is its token."""

    chars = None

    def __init__(self, bpe: Optional[BytePairEncoding] = None):
        self.bpe = bpe
        self.kind = "gpt2" if bpe is None else "bpe"
        self.vocab_size = EOT_TOKEN + 1 if bpe is None else bpe.n_vocab
        self.eot_token = EOT_TOKEN if bpe is None else bpe.eot_token
        self.describe = "GPT-2 BPE" if bpe is None else f"a BPE of {bpe.n_vocab:,} tokens trained on the text"

    def encode(self, text: str) -> List[int]:
        return encode(text) if self.bpe is None else self.bpe.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids) -> str:
        return decode(ids) if self.bpe is None else self.bpe.decode(ids)


MERGES_FILE = "merges.txt"  # a trained BPE's merges, beside the model's config.json (write_merges' format)


def tokenizer_for(config: GPT2Config, folder: Optional[str] = None):
    """The tokenizer a model was trained with: its characters if its config lists them (char_vocab); its own BPE
    if its config names a merges file (bpe_merges), read from folder, the model's; else GPT-2's BPE."""
    chars = config.extra.get("char_vocab")
    if chars is not None:
        return CharTokenizer(chars)
    if config.extra.get("bpe_merges") is not None:
        return BPETokenizer(read_trained_bpe(folder, config))
    return BPETokenizer()


def read_trained_bpe(folder: Optional[str], config: GPT2Config) -> BytePairEncoding:
    """The BPE a model trained with --tokenizer bpe reads: the merges file its config.json names (bpe_merges),
    beside it in folder. The file must be a regular file inside the folder, in read_merges' format, and make
    exactly the model's vocab_size tokens; anything else is a ValueError naming the file."""
    if folder is None:
        raise ValueError("this model reads a BPE of its own (its config names bpe_merges), which is kept beside its "
                         "config.json: load it from its folder")
    path = file_named_in(folder, config.extra["bpe_merges"], os.path.join(folder, "config.json"))
    if not os.path.lexists(path):
        raise ValueError(f"{path} is missing: the model in {folder} was trained with a BPE of its own, kept in that "
                         f"file; copy it back from the folder the model was trained in")
    try:
        bpe = BytePairEncoding(read_merges(regular_file_in(folder, path)), name=f"{path}")
    except CheckpointError:  # a link out of the folder, a FIFO: it says so itself
        raise
    except ValueError as e:
        raise ValueError(f"{e}; copy it back from the folder the model was trained in") from None
    if bpe.n_vocab != config.vocab_size:
        raise ValueError(f"{path} makes {bpe.n_vocab:,} tokens ({len(bpe.merges):,} merges), but the model in {folder} "
                         f"has a vocabulary of {config.vocab_size:,}: the file is damaged or belongs to another model")
    return bpe


# --- The default task: addition, made on the fly --------------------------------------------------------

ADDITION_VOCAB = "0123456789+=\n"  # a digit's token id is its value; "\n" ends a problem (the eos token)


class AdditionTask:
    """Character-level addition problems such as "07+39=640\\n", which asks 7 + 39 and answers 46.

    Two well-known tricks make it learnable in minutes:
    - fixed width: operands are zero-padded to `digits` digits and the answer to digits + 1, so every
      problem has the same length, each answer digit always sits at the same position, and a batch
      needs no padding;
    - reversed answer: the sum is written least significant digit first (46 -> "640"), the order in
      which carries are worked out, so each digit depends on digits already seen, never on later ones.
    The loss counts only the answer and its "\\n": the operands are random, there is nothing to learn in them.
    A fixed random set of problems, the same whatever --seed, is held out: never trained on, it measures
    whether the model learnt to add rather than memorised its training problems.
    """

    def __init__(self, digits: int):
        self.digits = digits
        self.tokenizer = CharTokenizer(ADDITION_VOCAB)
        self.prompt_len = 2 * digits + 2  # "07+39="
        self.seq_len = self.prompt_len + digits + 2  # + "640" + "\n"
        self.n = 10 ** digits  # operands are 0 .. n - 1; a problem's code is a * n + b
        g = torch.Generator().manual_seed(20190214)  # the day GPT-2 was announced
        if self.n ** 2 <= 10 ** 6:  # few enough to list: hold out 10% of all problems, at most 2,000
            self.held_out = torch.randperm(self.n ** 2, generator=g)[: min(self.n ** 2 // 10, 2000)]
        else:  # too many to list: about 2,000 random ones (unique() drops the rare repeat)
            self.held_out = torch.randint(0, self.n ** 2, (2000,), generator=g).unique()

    def describe(self) -> str:
        a, b = 7 % self.n, 39 % self.n
        return (f"{self.digits}-digit addition made on the fly, e.g. {self.show(a * self.n + b)!r} for {a} + {b}: "
                f"operands zero-padded, the answer written least significant digit first (reversed), loss on "
                f"the answer only; {len(self.held_out):,} of the {self.n ** 2:,} problems held out")

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Codes of `count` random problems, none of them held out."""
        codes = torch.empty(0, dtype=torch.long)
        while len(codes) < count:  # draw, drop the held-out ones (10% at most), draw more if short
            draw = torch.randint(0, self.n ** 2, (count,), generator=generator)
            codes = torch.cat([codes, draw[~torch.isin(draw, self.held_out)]])
        return codes[:count]

    def encode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N,) problem codes -> (N, seq_len) token ids of "a+b=" and the reversed sum, then "\\n"."""
        a, b = codes // self.n, codes % self.n
        msd_first = 10 ** torch.arange(self.digits - 1, -1, -1)  # (digits,): ..., 100, 10, 1
        lsd_first = 10 ** torch.arange(self.digits + 1)  # (digits + 1,): 1, 10, 100, ...
        plus, equals, end = (torch.full((len(codes), 1), self.tokenizer.ids[c]) for c in "+=\n")
        return torch.cat([a[:, None] // msd_first % 10, plus, b[:, None] // msd_first % 10, equals,
                          (a + b)[:, None] // lsd_first % 10, end], dim=1)

    def examples(self, codes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N,) problem codes -> inputs (N, seq_len - 1) and targets (N, seq_len - 1), -100 but on the answer."""
        tokens = self.encode(codes)
        x, y = tokens[:, :-1], tokens[:, 1:].clone()  # the token at t is trained to predict the one at t + 1
        y[:, : self.prompt_len - 1] = -100  # predicting the operands is guesswork: no loss there
        return x, y

    def validation_batches(self, batch_size: int, max_batches: int):
        """The held-out problems, in batches (the same every time)."""
        return [self.examples(codes) for codes in self.held_out.split(batch_size)[:max_batches]]

    def show(self, code: int, answer=None) -> str:
        """A problem as the model sees it, with the model's answer tokens or else the right answer."""
        tokens = self.encode(torch.tensor([int(code)]))[0]
        shown = tokens[: self.prompt_len].tolist() + (tokens[self.prompt_len: -1].tolist() if answer is None
                                                      else list(answer))
        return self.tokenizer.decode(shown)

    @torch.no_grad()
    def accuracy(self, model, batch_size: int = 500):
        """Exact match on the held-out problems, decoding greedily. Returns (fraction right, the model's
        answer tokens (N, digits + 1), right (N,) bool)."""
        device = next(model.parameters()).device
        answers = []
        for codes in self.held_out.split(batch_size):
            prompts = self.encode(codes)[:, : self.prompt_len]  # (b, prompt_len): "07+39="
            out = generate(model, prompts.to(device), max_new_tokens=self.digits + 1, stop_at_eos=False)
            answers.append(out[:, self.prompt_len:].cpu())  # (b, digits + 1)
        answers = torch.cat(answers)
        right = (answers == self.encode(self.held_out)[:, self.prompt_len: -1]).all(dim=1)
        return right.float().mean().item(), answers, right

    def report(self, model, say):
        """Print the held-out exact match and a few worked examples (wrong ones first, if any)."""
        fraction, answers, right = self.accuracy(model)
        say(f"held-out exact match: {100 * fraction:.1f}% ({int(right.sum()):,} of {len(right):,} problems never "
            f"seen in training; greedy decoding)")
        say("worked examples (what the model wrote, then its reversed answer read back):")
        order = torch.cat([torch.nonzero(~right).flatten()[:3], torch.nonzero(right).flatten()])[:6]
        for i in order.tolist():
            code = int(self.held_out[i])
            a, b = divmod(code, self.n)
            text = self.tokenizer.decode(answers[i])
            value = int(text[::-1]) if text.isdigit() else text[::-1]
            verdict = "right" if right[i] else f"wrong, {a + b} expected"
            say(f"  {self.show(code, answers[i].tolist()):<{self.seq_len + 2}} {a} + {b} = {value}   ({verdict})")
        return fraction


# --- Any text file, tokenised into a memory-mapped file --------------------------------------------------


def read_text_pieces(path, piece_chars: int = 1 << 20):
    """A UTF-8 text file in pieces of about piece_chars characters, each cut just before a run of spaces or
    newlines. GPT-2's BPE never joins a character to the whitespace after it, so tokenising the pieces
    one at a time gives the tokens of the whole file, while only one piece is ever in memory. Bytes that are not
    UTF-8 are a ValueError naming the file and the offset of the first bad byte."""
    with open(path, encoding="utf-8", newline="") as f:  # newline="": the text exactly as stored
        carry = ""
        while True:
            try:
                chunk = f.read(piece_chars)
            except UnicodeDecodeError:
                raise ValueError(f"{path} is not UTF-8 text: byte {first_bad_utf8_byte(path):,} (counting from 0) "
                                 "is not part of a UTF-8 character; save it as UTF-8") from None
            text = carry + chunk
            if not chunk:  # end of file
                if text:
                    yield text
                return
            cut = max(text.rfind(" "), text.rfind("\n"))
            while cut > 0 and text[cut - 1].isspace():  # back to the start of that whitespace run
                cut -= 1
            if cut <= 0:  # no such place in this piece: read on
                carry = text
                continue
            yield text[:cut]
            carry = text[cut:]


def first_bad_utf8_byte(path) -> Optional[int]:
    """The offset in the file of the first byte that is not part of a valid UTF-8 character; None if there is none."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0  # offset: the bytes fed to the decoder so far
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            held = len(decoder.getstate()[0])  # the end of the last chunk, held back as an unfinished character
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:  # e.start counts from the held bytes' start
                return offset - held + e.start
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:  # the file ends in the middle of a character
            return offset - len(decoder.getstate()[0])
    return None


def characters_of(path) -> str:
    """Every character a text file uses, sorted: the vocabulary of a character-level model."""
    chars = set()
    for text in read_text_pieces(path):
        chars.update(text)
    return "".join(sorted(chars))


def tokenize_file(path, tokenizer, dest, piece_chars: int = 1 << 20) -> int:
    """Write a text file's tokens to dest, a flat array of uint16 (uint32 for a vocabulary over 65,536),
    one piece at a time. Returns the number of tokens."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
    count = 0
    with _atomic_path(dest) as tmp, open(tmp, "wb") as out:
        for text in read_text_pieces(path, piece_chars):
            ids = np.asarray(tokenizer.encode(text), dtype=dtype)
            out.write(ids.tobytes())
            count += len(ids)
    return count


def check_text_file(path, option: str = "--data"):
    if not os.path.lexists(path):
        raise ValueError(f"{option} {path}: no such file")
    try:
        regular_file_in(None, path)  # a FIFO would block, /dev/zero never end
    except CheckpointError as e:
        raise ValueError(f"{option}: {e}") from None
    if os.path.getsize(path) == 0:
        raise ValueError(f"{option} {path} is empty: there is nothing to train on or score")


class TextData:
    """A tokenised text file, memory-mapped: a batch reads only the windows it draws, so a corpus larger than
    memory works. The last val_fraction of the tokens is the validation split. An example is a window of
    block_size + 1 tokens: the inputs are its first block_size, the targets its last (each predicts the next)."""

    def __init__(self, token_file, dtype, block_size: int, val_fraction: float, name: str):
        self.tokens = np.memmap(token_file, dtype=dtype, mode="r")
        self.block_size = block_size
        self.n_val = int(len(self.tokens) * val_fraction)
        self.n_train = len(self.tokens) - self.n_val
        if min(self.n_train, self.n_val) < block_size + 1:
            raise ValueError(
                f"--data {name} holds {len(self.tokens):,} tokens: {self.n_train:,} for training and {self.n_val:,} "
                f"for validation (--val-fraction {val_fraction}), but a window of --block-size {block_size} needs "
                f"{block_size + 1} in each; use a longer file, a smaller --block-size or another --val-fraction"
            )

    def describe(self) -> str:
        return f"{len(self.tokens):,} tokens: {self.n_train:,} for training, {self.n_val:,} for validation"

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Start positions of `count` random training windows."""
        return torch.randint(0, self.n_train - self.block_size, (count,), generator=generator)

    def examples(self, starts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N,) start positions -> inputs (N, block_size) and targets (N, block_size), read from the file."""
        rows = np.stack([self.tokens[s: s + self.block_size + 1] for s in starts.tolist()]).astype(np.int64)
        rows = torch.from_numpy(rows)  # (N, block_size + 1)
        return rows[:, :-1], rows[:, 1:]

    def validation_batches(self, batch_size: int, max_batches: int):
        """Windows side by side from the start of the validation split (the same every time)."""
        starts = torch.arange(self.n_train, len(self.tokens) - self.block_size, self.block_size)
        return [self.examples(s) for s in starts[: batch_size * max_batches].split(batch_size)]


def prepare_text_data(args, vocab, run: Run):
    """Tokenise --data into out/tokens.bin (once: kept while the file, its size and date, and the tokenizer are
    unchanged) and open it. vocab: "gpt2" for GPT-2's BPE, "char" for the file's own characters, "bpe" for a BPE
    of --vocab-size tokens learnt from the file now (train_bpe), or the tokenizer of a model that already has
    one (a CharTokenizer or BPETokenizer). A BPE of the text's own is saved as out/merges.txt (MERGES_FILE),
    beside the model. Returns (TextData, tokenizer)."""
    check_text_file(args.data)
    dest, meta_path = os.path.join(args.out, "tokens.bin"), os.path.join(args.out, "tokens.json")
    merges_path = os.path.join(args.out, MERGES_FILE)
    source = dict(path=os.path.abspath(args.data), size=os.path.getsize(args.data),
                  mtime_ns=os.stat(args.data).st_mtime_ns)
    if run.is_main:  # one process tokenises; the others wait at the barrier, then read its files
        # None: the file's characters, listed only if the file is tokenised again
        tokenizer = {"gpt2": BPETokenizer, "bpe": lambda: new_bpe_tokenizer(args), "char": lambda: None}.get(
            vocab, lambda: vocab)()
        bpe = tokenizer.bpe if tokenizer is not None else None
        if bpe is not None:  # a BPE of its own: its merges beside the model, where its config.json says they are
            write_merges(merges_path, bpe.merges)
        merges_sha256 = file_sha256(merges_path) if bpe is not None else None
        meta = None
        if os.path.lexists(meta_path) or os.path.lexists(dest):
            try:  # the two files are a cache of --data's tokens: one that is damaged, or out of date (a run
                meta = read_tokens_meta(meta_path)  # stopped between writing the two), is made again
            except ValueError as e:
                print(f"note: {e}; tokenising --data again", file=sys.stderr)
        same_vocab = meta is not None and meta.get("merges_sha256") == merges_sha256 and (
            meta["char_vocab"] is not None if tokenizer is None else meta["char_vocab"] == tokenizer.chars)
        if same_vocab and meta["source"] == source:  # to be reused: its ids must be the vocabulary's
            size = len(meta["char_vocab"]) if meta["char_vocab"] is not None else tokenizer.vocab_size
            problem = tokens_beyond(dest, meta, size)
            if problem:
                print(f"note: {problem}; tokenising --data again", file=sys.stderr)
                same_vocab = False
        if not same_vocab or meta["source"] != source:
            tokenizer = tokenizer or CharTokenizer(characters_of(args.data))
            print(f"tokenising {args.data} ({tokenizer.describe})...", flush=True)
            count = tokenize_file(args.data, tokenizer, dest)
            dtype = "uint16" if tokenizer.vocab_size <= 2 ** 16 else "uint32"
            meta = dict(source=source, char_vocab=tokenizer.chars, merges_sha256=merges_sha256, dtype=dtype,
                        tokens=count)
            _write_atomically(meta_path, json.dumps(meta, indent=1).encode("utf-8"))
    if run.world_size > 1:
        dist.barrier()
    meta = read_tokens_meta(meta_path)
    if meta["char_vocab"] is not None:
        tokenizer = CharTokenizer(meta["char_vocab"])
    elif meta.get("merges_sha256") is not None:  # every process reads the merges that rank 0 wrote
        tokenizer = BPETokenizer(BytePairEncoding(read_merges(regular_file_in(args.out, merges_path)),
                                                  name=merges_path))
    else:
        tokenizer = BPETokenizer()
    data = TextData(dest, meta["dtype"], args.block_size, args.val_fraction, args.data)
    return data, tokenizer


def tokens_beyond(path, meta: dict, vocab_size: int) -> Optional[str]:
    """out/tokens.bin, to be reused, holds ids of the vocabulary, or what is wrong with it: a file damaged (or
    written by another tool) after tokens.json described it would otherwise start a run that fails at its first
    batch. One pass over the mapped file (a few seconds for gigabytes); None when all are below vocab_size."""
    if meta["tokens"] == 0:
        return None
    high = int(np.memmap(path, dtype=meta["dtype"], mode="r").max())
    if high < vocab_size:
        return None
    return (f"{path} holds token id {high:,}, but the vocabulary has {vocab_size:,} tokens (ids in "
            f"[0, {vocab_size:,})): it is damaged, and it is only a cache of --data's tokens")


def new_bpe_tokenizer(args) -> BPETokenizer:
    """--tokenizer bpe: a BPE of --vocab-size tokens learnt from --data (train_bpe), with what it took."""
    print(f"training a BPE of {args.vocab_size:,} tokens on {args.data}...", flush=True)
    start = time.time()
    bpe = train_bpe(pathlib.Path(args.data), args.vocab_size, option="--vocab-size")
    print(f"learnt {len(bpe.merges):,} merges in {format_time(time.time() - start)}; the longest tokens: "
          + ", ".join(repr(t.decode("utf-8", "replace")) for t in sorted(bpe.tokens[256:-1], key=len)[-5:]),
          flush=True)
    return BPETokenizer(bpe)


def read_tokens_meta(path) -> dict:
    """out/tokens.json: what out/tokens.bin holds (the source file's path, size and date, the characters of a
    character-level vocabulary or the SHA-256 of a trained BPE's merges.txt, the dtype and the count). One that is
    not what prepare_text_data writes (cut short, edited, or left describing an older tokens.bin by a run killed
    between the two renames) is a ValueError naming it, not a JSON traceback: prepare_text_data then tokenises
    --data again."""
    folder = os.path.dirname(path)
    try:
        meta = read_json_object(path, "tokens.json", "fields about tokens.bin")
    except ValueError:  # a CheckpointError: not a file in the folder, too long, not UTF-8 JSON, not an object
        meta = None
    tokens = os.path.join(folder, "tokens.bin")
    if not (isinstance(meta, dict) and {"source", "char_vocab", "dtype", "tokens"} <= set(meta)
            and meta["dtype"] in ("uint16", "uint32") and isinstance(meta["char_vocab"], (str, type(None)))
            and isinstance(meta.get("merges_sha256"), (str, type(None)))
            and type(meta["tokens"]) is int and os.path.isfile(tokens)
            and os.path.getsize(tokens) == meta["tokens"] * np.dtype(meta["dtype"]).itemsize):
        raise ValueError(f"{path} is damaged (it is not the JSON `train` writes about the tokens.bin beside it); "
                         "delete both, and train makes them again from --data")
    return meta


# --- The training loop ----------------------------------------------------------------------------------


def train(args, state, run: Run) -> dict:
    """The training loop. Every process runs it on its own slice of each batch; only the first (rank 0)
    prints, logs and writes files."""
    data, tokenizer, n_positions, extra = prepare_task(args, state, run)
    batch = args.batch_size * args.accum * run.world_size  # examples per optimiser step, over every process
    # A step holds every micro-batch's windows (inputs and targets, int64) and one micro-batch's fp32 logits,
    # with their gradient: refused here, with the figure, rather than by the machine in the first step.
    check_memory(16 * batch * n_positions + 8 * args.batch_size * n_positions * tokenizer.vocab_size,
                 f"a training step of --batch-size {args.batch_size} x --accum {args.accum} windows of {n_positions} "
                 "tokens", "use a smaller --batch-size or --accum")

    torch.manual_seed(args.seed)  # the same initial weights in every process
    model = build_model(args, tokenizer, n_positions, extra, state).to(run.device)
    set_cpu_threads(args, model, run.device)
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, run.device.type)
    data_rng = torch.Generator().manual_seed(args.seed)  # draws every batch: it is the data position
    torch.manual_seed(args.seed + run.rank)  # each process its own dropout masks
    step, elapsed_before = 0, 0.0
    if state is not None:
        with resuming_from(os.path.join(args.out, "training_state.pt")):
            step, elapsed_before = restore_training_state(state, optimizer, data_rng, run)
    saved = step if state is not None else None  # the step of the checkpoint in args.out, if there is one
    # What the loop calls: compiled and/or wrapped for DDP. `model` stays the plain module, to save and evaluate.
    trained = torch.compile(model) if args.compile else model
    if run.world_size > 1:
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=[run.device.index]
                                                      if run.device.type == "cuda" else None)
    val_batches = data.validation_batches(args.batch_size, args.eval_batches)
    run.say(describe_run(args, data, model, state, step, run))

    log = TrainingLog(args.out, step) if run.is_main else None
    progress_lines = TrainingProgress(args, step)
    start, first_step = time.time(), step
    loss, val, tokens, stopped = float("nan"), None, 0, None
    stop = StopRequest()
    try:
        while True:
            elapsed = elapsed_before + time.time() - start
            if run.world_size > 1:  # every process must stop at the same step: the first decides
                elapsed, stopped = agree_with_first_process(elapsed, stopped, run.device)
            # How far through its budget the run is: in steps, or in time, whichever is further.
            progress = max(step / args.max_steps, elapsed / args.time_budget if args.time_budget else 0.0)
            if stopped is not None or progress >= 1 or (args.stop_at is not None and step >= args.stop_at):
                break
            lr = learning_rate(step, progress, args.lr, args.warmup)
            step_start = time.time()
            # Every process draws the same batch, then takes its own micro-batches from it.
            indices = data.sample(batch, data_rng).view(args.accum, run.world_size, args.batch_size)[:, run.rank]
            micro_batches = [data.examples(i) for i in indices]  # accum x (inputs (b, T), targets (b, T))
            loss, grad_norm = train_step(trained, optimizer, micro_batches, lr, args.grad_clip, run)
            step += 1
            if training_diverged(loss, grad_norm, run):  # the weights are NaN now: save nothing more
                stopped = "diverged"
                break
            tokens = batch * micro_batches[0][0].size(1)  # inputs through the model per step, every process's
            tokens_per_s = tokens / (time.time() - step_start)

            val, accuracy = None, None
            if args.eval_every and step % args.eval_every == 0:
                val = validation_loss(model, val_batches, run)
                if args.data is None and args.target_accuracy:  # the adder: stop once it adds well enough
                    accuracy = data.accuracy(model)[0]
                    if accuracy >= args.target_accuracy:
                        stopped = f"reached --target-accuracy {args.target_accuracy:g}"
            if stop.requested:
                stopped = "interrupted"
            elapsed = elapsed_before + time.time() - start
            if run.is_main:
                log.write(step, loss, lr, grad_norm, tokens_per_s, elapsed, val)
            if step % args.log_every == 0 or val is not None or step == first_step + 1:
                run.say(progress_lines.line(step, loss, lr, val, elapsed, tokens)
                        + (f" | held-out exact match {100 * accuracy:.1f}%" if accuracy is not None else ""))
            if args.save_every and step % args.save_every == 0:
                saved = save_checkpoint(args, model, optimizer, data_rng, step, elapsed, run, saved)
    finally:
        stop.restore()

    if stopped == "diverged":
        if run.is_main:
            log.close()
        raise diverged_error(step, loss, grad_norm, args, saved)
    elapsed = elapsed_before + time.time() - start
    if val is None and args.eval_every and stopped != "interrupted":
        val = validation_loss(model, val_batches, run)
    save_checkpoint(args, model, optimizer, data_rng, step, elapsed, run, saved)
    tokens_per_s = (step - first_step) * tokens / (time.time() - start)  # this run's average
    summary = dict(step=step, loss=loss, val_loss=val, elapsed=elapsed, tokens_per_s=tokens_per_s, out=args.out,
                   stopped=stopped)
    if run.is_main:
        log.close()
        if stopped == "interrupted":
            run.say(f"interrupted: saved a checkpoint at step {step} to {args.out}; continue with:\n"
                f"  python nanogpt2.py train --resume {shlex.quote(args.out)}")
        else:
            report_run(args, summary, model, data, tokenizer, log.plot(), run.say)
    return summary


# --- Before the loop: the options, the task, the folder -------------------------------------------------


def train_command(args) -> dict:
    """`python nanogpt2.py train ...`, under torchrun or not. Returns a summary (for tests and scripts)."""
    rank, world_size, device = init_distributed(args.device)
    try:
        state = load_checkpoint(args, rank == 0) if args.resume else None
        fill_defaults(args)
        dtype = parse_dtype(args.dtype) or (torch.float32 if device.type == "cpu" else
                                            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        run = Run(rank, world_size, device, dtype)
        with RunFolder(args.out, args.overwrite, state is not None) if run.is_main else contextlib.nullcontext():
            summary = train(args, state, run)
        if world_size > 1:
            dist.barrier()  # every process done before any tears the group down: no peer leaves mid-teardown
        return summary
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def fill_defaults(args):
    """Options left unset get the defaults of the task (the dataclasses above); then every option is checked that
    argparse could not check alone (its integer_option and float_option types): options that go together, and
    the ranges of the fractions and rates."""
    tasks = [CommonDefaults, AdditionDefaults if args.data is None else TextDefaults]
    if args.vocab_size is not None and args.resume is None and args.tokenizer != "bpe":  # (resumed: the run's own)
        raise ValueError("--vocab-size is the size of a BPE learnt from --data: it goes with --tokenizer bpe"
                         + (f" (--init {args.init} keeps its model's own tokenizer)" if args.init is not None else ""))
    if args.init is not None:
        tasks.append(FineTuneDefaults)  # last: its values replace the task's
    defaults = {option.name: option.default for task in tasks for option in fields(task)}
    if args.init is not None:
        defaults["tokenizer"] = None  # the checkpoint's own
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.save_every is None:
        args.save_every = args.eval_every
    if args.out is None:
        stem = os.path.splitext(os.path.basename(args.data))[0] if args.data else f"addition-{args.digits}digit"
        args.out = os.path.join("out", stem)
    if args.data is not None:
        check_text_file(args.data)  # before any directory is made
        if args.digits is not None:
            raise ValueError("--digits is an option of the addition task; it cannot go with --data")
    if args.data is None and args.tokenizer is not None:
        raise ValueError("--tokenizer is an option of --data; the addition task has its own characters")
    for name in ("lr", "time_budget", "weight_decay", "grad_clip"):
        if getattr(args, name) < 0 or (name == "lr" and args.lr == 0):
            raise ValueError(f"--{name.replace('_', '-')} must be {'> 0' if name == 'lr' else '>= 0'}, "
                             f"got {getattr(args, name)}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout is a probability in [0, 1), got {args.dropout}")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.target_accuracy is not None and not 0 <= args.target_accuracy <= 1:
        raise ValueError(f"--target-accuracy is a fraction of problems in [0, 1] (0: train the whole budget), "
                         f"got {args.target_accuracy}")
    if args.target_accuracy and args.data is not None:
        raise ValueError("--target-accuracy is an option of the addition task (its held-out exact match); "
                         "it cannot go with --data")


def prepare_task(args, state, run: Run):
    """(data, tokenizer, n_positions of a new model, config extras to save) for the addition task or --data."""
    if args.data is None:
        task = AdditionTask(args.digits)
        if args.init is not None and state is None:  # go on training an adder, perhaps on more digits
            init_config = GPT2Config.from_json_file(os.path.join(resolve_checkpoint(args.init), "config.json"))
            if init_config.extra.get("char_vocab") != ADDITION_VOCAB or init_config.n_positions < task.seq_len:
                raise ValueError(f"--init {args.init} is not an addition model of {task.seq_len} positions or more; "
                                 "to fine-tune it, give a text file with --data")
        return task, task.tokenizer, task.seq_len, {"addition_digits": args.digits}
    if state is not None:  # the run's own tokenizer (a BPE of its own is in its folder: merges.txt)
        vocab = tokenizer_for(GPT2Config.from_dict(state["config"]), args.out)
    elif args.init is not None:
        init_dir = resolve_checkpoint(args.init)
        init_config = GPT2Config.from_json_file(os.path.join(init_dir, "config.json"))
        vocab = tokenizer_for(init_config, init_dir)
        if args.tokenizer is not None and args.tokenizer != vocab.kind:
            raise ValueError(f"--tokenizer {args.tokenizer} does not match --init {args.init}, which reads "
                             f"{vocab.describe}; drop --tokenizer")
        if args.block_size > init_config.n_positions:
            raise ValueError(f"--block-size {args.block_size} is longer than --init {args.init}'s "
                             f"{init_config.n_positions} positions")
    else:
        vocab = args.tokenizer
    data, tokenizer = prepare_text_data(args, vocab, run)
    return data, tokenizer, args.block_size, {}


# --- The model, the optimiser, the learning-rate schedule ----------------------------------------------


def build_model(args, tokenizer, n_positions: int, extra: dict, state=None) -> GPT2LMHeadModel:
    """A GPT-2 with its LM head: rebuilt from a training checkpoint, loaded from --init, or new."""
    if state is not None:  # resuming: the checkpoint's own config and weights
        with resuming_from(os.path.join(args.out, "training_state.pt")):
            model = GPT2LMHeadModel(GPT2Config.from_dict(state["config"]))
            model.load_state_dict(state["model"])
    elif args.init is not None:
        model = GPT2LMHeadModel.from_pretrained(args.init)
        if args.dropout is not None:  # the dropout layers were built from the config: change both
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = args.dropout
            model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = args.dropout
        model.config.extra.update(extra)
    else:
        # The token that ends a text: <|endoftext|>, or for characters a newline (which ends an addition problem).
        eos = tokenizer.eot_token if tokenizer.chars is None else tokenizer.ids.get("\n", 0)
        config = GPT2Config(
            vocab_size=tokenizer.vocab_size, n_positions=n_positions, n_embd=args.n_embd, n_layer=args.n_layer,
            n_head=args.n_head, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
            bos_token_id=eos, eos_token_id=eos, extra=dict(extra),
        )
        if tokenizer.chars is not None:
            config.extra["char_vocab"] = tokenizer.chars
        if tokenizer.bpe is not None:  # its merges are in the run's folder (prepare_text_data wrote them)
            config.extra["bpe_merges"] = MERGES_FILE
        model = GPT2LMHeadModel(config)
    return model.train()  # from_pretrained returns a model in eval mode: dropout back on


def configure_optimizer(model, lr: float, weight_decay: float, device_type: str):
    """AdamW with two parameter groups: weight decay on the matrices only (parameters with 2 or more
    dimensions: linear layers, embeddings), none (0.0) on the rest (biases, layer-norm gains). Only
    parameters that require gradients, each once (a tied matrix too). betas (0.9, 0.95); fused on CUDA.
    Decay pulls weights toward zero, which keeps matrices small and the model smooth; on biases and
    layer-norm gains it would only fight the offsets and scales they exist to set."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() lists a tied matrix once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel updates all parameters, on CPUs as on GPUs, instead of a dozen elementwise passes.
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


def learning_rate(step: int, progress: float, peak: float, warmup_steps: int) -> float:
    """The learning rate at `step` (counting from 0): peak x warmup x cosine. The warmup factor rises linearly,
    (step + 1) / warmup_steps, capped at 1 (and 1 when warmup_steps is 0): Adam's first moment estimates are
    noisy, and full-size steps on them can wreck the initialisation. The cosine factor goes from 1 down to 0.1
    as progress, the fraction of the run's budget spent, goes from 0 to 1 (progress beyond 1 counts as 1):
    0.1 + 0.9 * (1 + cos(pi * progress)) / 2."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    cosine = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return peak * warmup * cosine


# --- One optimiser step, and the validation loss ---------------------------------------------------------


def all_reduce_sum(value, device) -> float:
    """A number summed over every process (the number itself when there is only one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    total = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()


def train_step(model, optimizer, micro_batches, lr: float, grad_clip: float, run: Run) -> Tuple[float, float]:
    """One optimiser step over this process's micro-batches [(inputs (b, T), targets (b, T)), ...], on run's
    device, under its autocast and GradScaler, its gradients summed with the other processes'. Returns
    the mean loss per target over the whole batch (the micro-batches of every process) and the gradient's
    norm before clipping.

    Sets every param group's lr. Each micro-batch's cross-entropy is summed over its targets (ignoring -100)
    and divided by the number of targets in the whole batch, so that k micro-batches of b examples give the
    gradient of one batch of k * b: a mean taken per micro-batch would weigh one with few targets as much
    as one with many. The forward runs under run.autocast(); backward through run.scaler.scale(...) (times
    run.world_size: DDP averages over processes); all but the last micro-batch skip DDP's gradient sync
    (model.no_sync()) when run.world_size > 1. Then unscale, clip the gradient norm to grad_clip (0: no
    clipping), run.scaler.step, run.scaler.update, and zero the gradients for the next step.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_targets = all_reduce_sum(sum(int((y != -100).sum()) for _, y in micro_batches), run.device)
    total = 0.0
    for i, (x, y) in enumerate(micro_batches):
        x, y = x.to(run.device), y.to(run.device)
        # DDP sums gradients across processes after each backward; between the micro-batches of one step
        # that would be wasted traffic, so all but the last skip it (no_sync).
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or run.world_size == 1 else model.no_sync():
            with run.autocast():
                logits = model(x).logits  # (b, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                   reduction="sum") / n_targets
            # DDP divides the summed gradient by the number of processes; the factor undoes that, so the
            # step follows the batch's mean loss exactly as one process with the whole batch would.
            run.scaler.scale(loss * run.world_size).backward()
        total += loss.item()
    run.scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled-up ones
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    run.scaler.step(optimizer)  # with fp16, skipped when a gradient overflowed (the scaler then lowers its scale)
    run.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return all_reduce_sum(total, run.device), grad_norm.item()


def training_diverged(loss: float, grad_norm: float, run: Run) -> bool:
    """Whether the step's loss, or its gradient norm, is NaN or inf, which the optimiser has then written into
    the weights. Under fp16 an infinite gradient alone is no divergence: the GradScaler skips that step and
    lowers its scale. Every process gets the same answer (one stopping alone would leave the others waiting
    for it at the next all-reduce): each one's verdict is summed over all of them."""
    bad = not math.isfinite(loss) or (not math.isfinite(grad_norm) and not run.scaler.is_enabled())
    return all_reduce_sum(bad, run.device) > 0


@torch.no_grad()
def validation_loss(model, batches, run: Run) -> float:
    """Mean loss per target over fixed validation batches, each process scoring every world_size-th one."""
    model.eval()  # no dropout
    total, count = 0.0, 0
    for x, y in batches[run.rank::run.world_size]:
        with run.autocast():
            logits = model(x.to(run.device)).logits  # (b, T, V)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(run.device).flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((y != -100).sum())
    model.train()
    return all_reduce_sum(total, run.device) / all_reduce_sum(count, run.device)


# --- Processes, devices, precision ------------------------------------------------------------------------


def resolve_device(name: Optional[str]) -> torch.device:
    """--device NAME as a torch.device (default: cuda when there is one, else cpu), refused before any work
    when torch has no such device type, or this machine has none of it (an mps on Linux, a tpu anywhere)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:  # a type torch does not know, e.g. "tpu"
        raise ValueError(f"--device {name}: not a device type torch knows; use cpu, cuda, cuda:N or mps") from None
    backends = {"cpu": None, "cuda": torch.cuda, "mps": torch.backends.mps, "xpu": getattr(torch, "xpu", None)}
    if device.type not in backends:  # meta, xla, ...: torch knows the name, but this file does not run there
        raise ValueError(f"--device {name}: {device.type} devices are not supported here; use cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type in ("mps", "xpu") and not (backends[device.type] and backends[device.type].is_available()):
        raise ValueError(f"--device {name}: this machine (or this build of torch) has no {device.type} device; "
                         "use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def init_distributed(device_name: Optional[str]):
    """torchrun starts one process per GPU (or per CPU worker) and tells each, in its environment, its RANK
    (0 .. WORLD_SIZE - 1 over every machine), LOCAL_RANK (its number on this machine) and WORLD_SIZE.
    Returns (rank, world_size, device); with several processes, joins them in a process group: nccl
    between GPUs, gloo between CPU processes."""
    environment = {name: os.environ.get(name, default) for name, default in
                   (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"))}
    if not all(value.isdigit() for value in environment.values()) or not (
            0 <= int(environment["RANK"]) < int(environment["WORLD_SIZE"])):
        raise ValueError(f"the environment says {', '.join(f'{k}={v}' for k, v in environment.items())}: torchrun "
                         "sets these (0 <= RANK < WORLD_SIZE); unset them to train in one process")
    world_size, rank, local_rank = (int(environment[name]) for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device.index is None:  # one GPU per process: the LOCAL_RANK-th (without torchrun, the first)
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, device


def agree_with_first_process(elapsed: float, stopped: Optional[str], device) -> Tuple[float, Optional[str]]:
    """Under torchrun: the first process's clock and its reason to stop (Ctrl-C, the target reached), for all."""
    mine = [elapsed, stopped]
    dist.broadcast_object_list(mine, 0, device=device if device.type == "cuda" else None)
    return mine[0], mine[1]


def rng_states(run: Run) -> list:
    """Every process's random-number state (each draws its own dropout masks), for the checkpoint."""
    mine = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(run.device)
    if run.world_size == 1:
        return [mine]
    everyone = [None] * run.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


# Below this many parameters, a model on a CPU trains on one thread unless told otherwise: its matrix
# products are so small that handing the work between threads costs more than it saves, badly so on a
# machine busy with other programs (the default adder: 3x faster on one thread on 2 loaded cores).
ONE_THREAD_BELOW = 5_000_000


def set_cpu_threads(args, model, device):
    """--threads; else OMP_NUM_THREADS when set; else one thread for a small model on a CPU."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and \
            sum(p.numel() for p in model.parameters()) < ONE_THREAD_BELOW:
        torch.set_num_threads(1)


# --- Checkpoints, the log ---------------------------------------------------------------------------------

# Options a resumed run may change; every other option comes from the checkpoint, so the run goes on
# exactly as it would have. Those of RESUME_MAY_EXTEND keep the checkpoint's value unless given: a larger
# --max-steps or --time-budget extends a finished or cut run, the cosine schedule then laid over the new
# budget (the learning rate rises back to where that longer schedule is).
RESUME_MAY_CHANGE = ("resume", "out", "stop_at", "device", "compile", "log_every", "save_every", "overwrite")
RESUME_MAY_EXTEND = ("max_steps", "time_budget", "target_accuracy", "threads")


def save_checkpoint(args, model, optimizer, data_rng, step: int, elapsed: float, run: Run, saved: Optional[int]) -> int:
    """out/config.json + model.safetensors (save_pretrained: what from_pretrained loads) and
    out/training_state.pt, which holds everything an exact resume needs in one file written atomically:
    weights, optimiser moments, step, time spent, the data generator (the data position) and every
    process's RNG states. Its SHA-256 goes to training_state.pt.sha256, checked by --resume. log.csv is
    synced to the disk first, so that its rows up to the checkpoint outlast a power cut as the checkpoint
    does. Returns step, the checkpoint's; a file that cannot be written (a full disk) stops the run with one
    line, every file of the checkpoint of step `saved` as it was (see save_training_state's also)."""
    rngs = rng_states(run)  # every process takes part, only the first writes
    if not run.is_main:
        return step
    state = dict(step=step, elapsed=elapsed, args=vars(args), config=model.config.to_dict(), model=model.state_dict(),
                 optimizer=optimizer.state_dict(), scaler=run.scaler.state_dict(), data_rng=data_rng.get_state(),
                 rng=rngs)
    try:
        _fsync(os.path.join(args.out, "log.csv"))
        save_training_state(os.path.join(args.out, "training_state.pt"), state,
                            also=lambda: model.save_pretrained(args.out))  # the model's files, once the state fits
    except OSError as e:
        raise checkpoint_not_saved(e, step, args.out, saved) from None
    return step


def checkpoint_not_saved(error: OSError, step: int, out: str, saved: Optional[int]) -> OSError:
    """The one line a run whose checkpoint could not be written (a full disk, most often) stops with."""
    kept = f"the one of step {saved} is kept there whole, and --resume {shlex.quote(out)} continues from it" \
        if saved is not None else "no earlier checkpoint was saved there"
    return OSError(f"the checkpoint of step {step} was not saved in {out}: {error}; {kept}")


def diverged_error(step: int, loss: float, grad_norm: float, args, saved: Optional[int]) -> ValueError:
    """The one line a run whose loss (or gradient) turned to NaN or inf stops with. Nothing was saved at or
    after that step, so the checkpoint in args.out, if any (saved: its step), is the last good one."""
    kept = f"the last good checkpoint, step {saved}, is kept in {args.out}" if saved is not None else \
        f"no checkpoint was saved in {args.out} before it"
    return ValueError(f"training diverged at step {step} (loss {loss:g}, gradient norm {grad_norm:g}): {kept}; lower "
                      f"--lr (its peak is {args.lr:g}) or --grad-clip and train again (--resume would take the same "
                      "steps again)")


def save_training_state(path: str, state: dict, also: Optional[Callable] = None):
    """torch.save(state) to path, atomically, with its SHA-256 in path.sha256 (in sha256sum's format).
    also(), if given, writes the checkpoint's other files (save_pretrained) once the state is whole under its
    temporary name, before the old state and its .sha256 are touched: the state is the largest file, so a full
    disk fails the save before any file of the previous checkpoint is replaced, and that checkpoint stays whole.

    Two files cannot be renamed into place at once, so the order keeps them consistent at every moment: first
    a .sha256 listing the new digest and every digest the old one listed (the state on disk is among them),
    then the state, then a .sha256 of the new digest alone. A run killed anywhere in between leaves a state
    whose digest its .sha256 lists, never a good state reported as damaged."""
    with _atomic_path(path) as tmp:  # a killed run leaves the previous state whole; the next save cleans up
        with open(tmp, "wb") as f:
            try:
                torch.save(state, f)
            except RuntimeError as e:  # torch's writer turns a failed write (a full disk) into a RuntimeError
                raise e.__context__ if isinstance(e.__context__, OSError) else OSError(f"torch.save: {e}") from None
        if also is not None:
            also()
        digest = file_sha256(tmp)
        both = dict.fromkeys([digest, *listed_digests(path)])  # in order, once each
        _write_atomically(f"{path}.sha256", "".join(f"{d}  training_state.pt\n" for d in both).encode())
    _write_atomically(f"{path}.sha256", f"{digest}  training_state.pt\n".encode())


def listed_digests(path: str) -> List[str]:
    """The SHA-256 digests path.sha256 lists, one a line as sha256sum writes them; [] without the file."""
    if not os.path.lexists(f"{path}.sha256"):
        return []
    with open(regular_file_in(os.path.dirname(path), f"{path}.sha256"), encoding="utf-8", errors="replace") as f:
        return [line.split(" ")[0].strip() for line in f.read(1 << 16).splitlines() if line.strip()]  # a few lines


def read_training_state(path: str) -> dict:
    """training_state.pt, checked against its SHA-256 before torch.load reads it (weights only: tensors and
    plain values, never code). A damaged file, truncated by a crash or altered, is a ValueError naming it.
    Without the .sha256 (a checkpoint older than it), torch.load's own failures still say so."""
    regular_file_in(os.path.dirname(path), path)  # a run folder from elsewhere: no link out of it, no FIFO
    damaged = f"{path} is damaged (truncated by a crash, or altered)"
    listed = listed_digests(path)
    if listed and file_sha256(path) not in listed:
        raise ValueError(f"{damaged}: its SHA-256 differs from the one in {path}.sha256; it cannot be resumed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a zip archive cut short or a pickle out of shape: the many ways a file can break
        raise ValueError(f"{damaged}: torch.load fails with {type(e).__name__}; it cannot be resumed") from None
    missing = {"step", "elapsed", "args", "config", "model", "optimizer", "data_rng", "rng"} - set(state) \
        if isinstance(state, dict) else {"everything (it is no dict)"}
    if missing:
        raise ValueError(f"{path} is not a training state written by `train`: it lacks {', '.join(sorted(missing))}")
    plain = (type(None), bool, int, float, str, list, tuple)
    wrong = [f"{name} {state[name]!r:.40} (expected {expected})" for name, expected, ok in (
        ("step", "an integer >= 0", type(state["step"]) is int and state["step"] >= 0),
        ("elapsed", "seconds >= 0", type(state["elapsed"]) in (int, float) and 0 <= state["elapsed"] < math.inf),
        ("args", "a dict of options", isinstance(state["args"], dict) and all(
            isinstance(k, str) and isinstance(v, plain) for k, v in state["args"].items())),
        ("config", "a dict", isinstance(state["config"], dict)),
        ("model", "a dict of tensors", isinstance(state["model"], dict)),
        ("optimizer", "a dict", isinstance(state["optimizer"], dict))) if not ok]
    if wrong:
        raise ValueError(f"{path} was not written by `train` (or was altered): {'; '.join(wrong)}; it cannot be resumed")
    return state


@contextlib.contextmanager
def resuming_from(path: str):
    """Failures while putting a training state back into a model and an optimizer (a state edited by hand, or
    written for another model) as one line naming the file, instead of torch's tracebacks."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} does not fit the model and optimiser it describes ({type(e).__name__}: {first}); "
                         "it cannot be resumed") from None


def check_saved_options(saved: dict, path: str):
    """A resumed run takes its options from the training state, past the command line's checks: so each saved
    value goes through the same check (the option's argparse type and choices) before it is used. A state
    edited by hand (a batch size of "32", a seed out of range) is one line naming the option and the file."""
    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    for action in train._actions:
        value = saved.get(action.dest)
        if value is None or (action.type is None and action.choices is None):
            continue
        for one in value if isinstance(value, (list, tuple)) else [value]:
            try:
                parsed = action.type(str(one)) if action.type is not None else one
                if parsed != one or (action.choices is not None and one not in action.choices):
                    raise ValueError(f"expected one of {list(action.choices)}" if action.choices else "not as saved")
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise ValueError(f"{path} holds the option {action.option_strings[0]} {one!r}, which is not valid "
                                 f"({e}); it was not written by `train` like this, and cannot be resumed") from None


def load_checkpoint(args, is_main: bool = True) -> dict:
    """The training state in --resume DIR; its options replace those given, but for RESUME_MAY_CHANGE."""
    path = os.path.join(args.resume, "training_state.pt")
    if not os.path.lexists(path):
        raise ValueError(f"--resume {args.resume}: no training_state.pt there (it is written by `train`)")
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise ValueError(f"--resume {args.resume} continues in that directory; drop --out {args.out}")
    state = read_training_state(path)
    check_saved_options(state["args"], path)
    for name, saved in state["args"].items():
        given = getattr(args, name, None)
        if name in RESUME_MAY_CHANGE or (name in RESUME_MAY_EXTEND and given is not None):
            continue
        if given is not None and given != saved and is_main:
            print(f"note: --{name.replace('_', '-')} {given} ignored: the resumed run keeps {saved}", file=sys.stderr)
        setattr(args, name, saved)
    args.out = args.resume
    return state


def restore_training_state(state, optimizer, data_rng, run: Run) -> Tuple[int, float]:
    """Put back what the weights alone do not hold. Returns (step, seconds of training so far)."""
    optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    data_rng.set_state(state["data_rng"])
    mine = state["rng"][run.rank] if len(state["rng"]) == run.world_size else None
    if mine is not None:
        torch.set_rng_state(mine["torch"])
        if run.device.type == "cuda" and "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], run.device)
    elif run.is_main:
        print(f"note: the checkpoint was saved by {len(state['rng'])} processes and this run has {run.world_size}: "
              "dropout masks will differ from those of an uninterrupted run", file=sys.stderr)
    return state["step"], state["elapsed"]


class TrainingLog:
    """Every step to out/log.csv (step, loss, lr, gradient norm before clipping, tokens/s, elapsed, validation
    loss where measured) and, at the end, a loss-curve PNG when matplotlib is installed."""

    COLUMNS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "val_loss"]

    def __init__(self, out: str, resume_step: int):
        self.path = os.path.join(out, "log.csv")
        rows = []
        if resume_step and os.path.exists(self.path):  # keep the rows up to the checkpoint; later ones are redone
            try:  # rows that do not parse are dropped; a file that is not CSV at all is named
                with open(regular_file_in(out, self.path), newline="", encoding="utf-8", errors="replace") as f:
                    rows = [row for row in csv.DictReader(f) if row.get("step", "").isdigit()
                            and row.get("val_loss") is not None and int(row["step"]) <= resume_step]
            except csv.Error as e:
                raise ValueError(f"{self.path} is damaged ({e}); move it away to resume without the old log") from None
        with _atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:  # a crash leaves the old log
            writer = csv.DictWriter(f, self.COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, self.COLUMNS)

    def write(self, step, loss, lr, grad_norm, tokens_per_s, elapsed, val_loss=None):
        self.writer.writerow(dict(step=step, loss=f"{loss:.6g}", lr=f"{lr:.6g}", grad_norm=f"{grad_norm:.6g}",
                                  tokens_per_s=f"{tokens_per_s:.0f}", elapsed_s=f"{elapsed:.2f}",
                                  val_loss="" if val_loss is None else f"{val_loss:.6g}"))
        self.file.flush()  # each line reaches the file at once: a run killed outright keeps its log

    def close(self):
        self.file.close()

    def plot(self) -> Optional[str]:
        """out/loss.png: training loss and validation loss against the step; None without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")  # draw to a file; no window
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        val = [row for row in rows if row["val_loss"]]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=0.8, label="training loss")
        ax.plot([int(r["step"]) for r in val], [float(r["val_loss"]) for r in val], "o-", label="validation loss")
        ax.set(xlabel="step", ylabel="loss (nats per target token)", yscale="log")
        ax.legend()
        png = os.path.join(os.path.dirname(self.path), "loss.png")
        with _atomic_path(png) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        return png


# Files that show a folder holds a run; training into it again needs --resume or --overwrite.
RUN_FILES = ("training_state.pt", "log.csv", "model.safetensors", "config.json")


def check_run_folder(out: str, overwrite: bool):
    """Refuse to train into a folder that holds an earlier run, unless --overwrite; then the old run's log
    and training state go first, so that nothing of it passes for the new run's."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if found and not overwrite:
        raise ValueError(f"--out {out} already holds a run ({', '.join(found)}); continue it with --resume {out}, "
                         "choose another --out, or pass --overwrite to replace it")
    for name in found:
        if name in ("training_state.pt", "log.csv"):
            os.remove(os.path.join(out, name))
            if os.path.exists(os.path.join(out, name + ".sha256")):
                os.remove(os.path.join(out, name + ".sha256"))


class RunLock:
    """out/.lock, holding the PID of the process training there, so that a second run into the same folder
    is refused instead of mixing its files with the first's. The file is created only if absent
    (O_CREAT | O_EXCL: one process wins), and taken over when the process that made it is gone."""

    def __init__(self, out: str):
        self.path = os.path.join(out, ".lock")
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = self.holder()
                if pid is not None and pid != os.getpid() and _process_alive(pid):
                    raise ValueError(f"--out {out} is in use: process {pid} is training there ({self.path}); "
                                     f"wait for it to end, or stop it; if process {pid} is no training run, "
                                     f"delete {self.path}") from None
                os.remove(self.path)  # stale: left by a process that died; take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return

    def holder(self) -> Optional[int]:
        try:  # a FIFO or a device in its place would block or never end: only a small file holds a PID
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                return None
            with open(self.path, encoding="utf-8") as f:
                return int(f.read(32).strip())
        except (OSError, ValueError):  # gone meanwhile, or half written, or not a number
            return None

    def release(self):
        if self.holder() == os.getpid():
            os.remove(self.path)


class RunFolder:
    """The --out folder for the length of a run: made if need be, refused if it holds another run (unless
    --overwrite or --resume), locked against a second process, and removed again if this run made it and
    fails before it has anything to keep (a checkpoint or a line of log)."""

    def __init__(self, out: str, overwrite: bool, resuming: bool):
        self.out, self.overwrite, self.resuming, self.lock = out, overwrite, resuming, None
        self.made = None  # the topmost folder this run makes (--out a/b/c with only a: a/b), to remove on failure
        folder = os.path.abspath(out)
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            self.made, folder = folder, os.path.dirname(folder)

    def __enter__(self):
        os.makedirs(self.out, exist_ok=True)
        try:
            self.lock = RunLock(self.out)
            if not self.resuming:
                check_run_folder(self.out, self.overwrite)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, kind, error, trace):
        if self.lock is not None:
            self.lock.release()
        log = os.path.join(self.out, "log.csv")
        has_work = os.path.exists(os.path.join(self.out, "training_state.pt")) or (
            os.path.exists(log) and os.path.getsize(log) > len(",".join(TrainingLog.COLUMNS)) + 2)
        if kind is not None and self.made is not None and not has_work:
            shutil.rmtree(self.made, ignore_errors=True)
        return False


class StopRequest:
    """Ctrl-C (SIGINT) while training: the step under way finishes, then the run saves a checkpoint and
    stops, so an interrupt never lands in the middle of an optimiser update. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupted: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def format_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


# --- What the run prints --------------------------------------------------------------------------------


def describe_run(args, data, model, state, step: int, run: Run) -> str:
    """What is about to happen, in four lines."""
    cfg, batch = model.config, args.batch_size * args.accum * run.world_size
    start = f"resumed at step {step}" if state else f"from {args.init}" if args.init else "from scratch"
    budget = f"{args.max_steps} steps" + (f" or {args.time_budget:g} s, whichever ends first" if args.time_budget else "")
    return "\n".join([
        f"task: {data.describe() if args.data is None else args.data + ': ' + data.describe()}",
        f"model: GPT-2, {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, a vocabulary of {cfg.vocab_size:,}: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {start}",
        f"training: {budget}; batch {batch} (micro-batch {args.batch_size}, accumulation {args.accum}, processes "
        f"{run.world_size}); AdamW lr {args.lr:g}, warmup {args.warmup} steps, cosine to {args.lr / 10:g}; "
        f"{str(run.dtype)[6:]} on {run.device.type}" + (", compiled" if args.compile else "")
        + (f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''} (--threads)"
           if run.device.type == "cpu" else "")
        + (f"; stops early at {100 * args.target_accuracy:g}% held-out exact match (--target-accuracy)"
           if args.data is None and args.target_accuracy else ""),
        f"saving to {args.out} (log.csv: every step)",
    ])


class TrainingProgress:
    """The loop's progress lines: step, loss, learning rate, speed since the previous line, time spent and
    time left. It keeps the time and step of its last line, to measure the speed in between."""

    def __init__(self, args, step: int):
        self.args, self.last_line = args, (time.time(), step)

    def line(self, step: int, loss: float, lr: float, val: Optional[float], elapsed: float,
             tokens_per_step: int) -> str:
        args, (since, since_step) = self.args, self.last_line
        self.last_line = (time.time(), step)
        seconds_per_step = (time.time() - since) / max(step - since_step, 1)
        left = (args.max_steps - step) * seconds_per_step
        if args.time_budget:
            left = min(left, args.time_budget - elapsed)
        return (f"step {step:>{len(str(args.max_steps))}}/{args.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{tokens_per_step / seconds_per_step:,.0f} tok/s | {format_time(elapsed)} elapsed, "
                f"{format_time(max(left, 0))} left" + (f" | val loss {val:.4f}" if val is not None else ""))


def report_run(args, summary, model, data, tokenizer, png, say):
    """The end of a run: why it stopped, its losses, what the model can do, and where it was saved."""
    step, val = summary["step"], summary["val_loss"]
    if summary["stopped"] is not None:
        why = summary["stopped"]
    elif step >= args.max_steps:
        why = "all steps done"
    elif args.stop_at is not None and step >= args.stop_at:
        why = f"stopped at --stop-at; continue with --resume {args.out}"
    else:
        why = f"the time budget ran out; --resume {args.out} --time-budget {2 * args.time_budget:g} trains on"
    say(f"done: step {step} of {args.max_steps} in {format_time(summary['elapsed'])} ({why}), "
        f"{summary['tokens_per_s']:,.0f} tokens/s; loss {summary['loss']:.4f}"
        + (f", validation loss {val:.4f} (perplexity {math.exp(min(val, 50)):.2f})" if val is not None else ""))
    if args.data is None:
        summary["accuracy"] = data.report(model, say)
    else:
        say("sample (temperature 0.8):", tokenizer.decode(sample_after(model, data)))
    say(f"saved to {args.out}: config.json + model.safetensors (load with GPT2LMHeadModel.from_pretrained("
        f"{args.out!r})), " + (f"{MERGES_FILE} (its tokenizer), " if tokenizer.bpe is not None else "")
        + "training_state.pt (to --resume), log.csv" + (", loss.png" if png else ""))


def sample_after(model, data: TextData, new_tokens: int = 200) -> List[int]:
    """A short continuation of the first tokens of the validation split, to see what the model writes."""
    length = min(8, model.config.n_positions - 1)  # a model of 8 positions or fewer still gets a sample
    prompt = torch.from_numpy(data.tokens[data.n_train: data.n_train + length].astype(np.int64))[None]  # (1, 8)
    new_tokens = min(new_tokens, model.config.n_positions - prompt.size(1))
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    out = generate(model, prompt, max_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_k=200,
                   generator=generator, stop_at_eos=False)
    return out[0].tolist()


# --- Evaluation: loss and perplexity with a sliding window ---------------------------------------------


def sliding_windows(n_tokens: int, context: int, stride: int) -> List[Tuple[int, int, int]]:
    """The windows (begin, end, first scored position) of a sliding-window evaluation, as the GPT-2 paper
    and Hugging Face's perplexity guide do it: each window holds up to `context` tokens and begins `stride`
    after the previous one, and scores only the tokens no earlier window scored, so that every token is
    scored once, predicted from at least context - stride tokens before it (fewer in the first window).
    The first token of the text, with nothing before it, is never scored."""
    windows, scored_up_to = [], 1
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + context, n_tokens)
        windows.append((begin, end, max(scored_up_to, begin + 1)))  # a window's first token has no context
        scored_up_to = end
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def sliding_window_loss(model, tokens, context: int, stride: int, batch_size: int = 4) -> Tuple[float, int]:
    """The summed negative log-likelihood (nats) of the tokens of `tokens` (a 1-D array) the sliding windows
    score, and how many they score: (float, int). The model goes to eval mode. For a window (begin, end,
    first), token t of the window is predicted by the logits at t - 1, so its scored tokens first .. end - 1
    are predicted at positions first - 1 .. end - 2. Windows of the same shape go through the model together,
    batch_size at a time; only the scored positions' logits need computing (they are most of the memory)."""
    model.eval()
    device = next(model.parameters()).device
    windows = sliding_windows(len(tokens), context, stride)
    total, count = 0.0, 0
    for (length, offset), group in itertools.groupby(windows, key=lambda w: (w[1] - w[0], w[2] - w[0])):
        group = list(group)
        for i in range(0, len(group), batch_size):
            rows = np.stack([np.asarray(tokens[begin:end]) for begin, end, _ in group[i: i + batch_size]])
            x = torch.from_numpy(rows.astype(np.int64)).to(device)  # (n, length)
            hidden = model.transformer(x).last_hidden_state  # (n, length, C)
            # Position t predicts token t + 1, so the scored tokens offset .. length - 1 are predicted at
            # offset - 1 .. length - 2. Only those logits are computed: at V per position they are most
            # of the memory.
            logits = model.lm_head(hidden[:, offset - 1: length - 1]).float()  # (n, length - offset, V)
            targets = x[:, offset:]  # (n, length - offset)
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
    return total, count


def eval_command(args):
    """`python nanogpt2.py eval`: loss and perplexity on a text file, or an addition model's accuracy."""
    if args.data is not None:
        check_text_file(args.data)
    device = resolve_device(args.device)
    model = GPT2LMHeadModel.from_pretrained(args.model, dtype=args.dtype, device=device)
    digits = model.config.extra.get("addition_digits")
    if args.data is None:
        if digits is None:
            raise ValueError(f"--data is needed: {args.model} is not an addition model; give a text file to score")
        AdditionTask(digits).report(model, print)
        return
    context = args.context or model.config.n_positions
    stride = args.stride or max(context // 2, 1)
    if context > model.config.n_positions:
        raise ValueError(f"--context {context} is longer than the model's {model.config.n_positions} positions")
    if stride > context:
        raise ValueError(f"--stride {stride} is longer than --context {context}: tokens between windows would "
                         "never be scored")
    tokenizer = tokenizer_for(model.config, resolve_checkpoint(args.model))
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:  # tokens on disk, memory-mapped: any size of file works
        n_tokens = tokenize_file(args.data, tokenizer, os.path.join(tmp, "tokens.bin"))
        if n_tokens < 2:
            raise ValueError(f"--data {args.data} is {n_tokens} token long; scoring needs at least 2")
        rows = min(args.batch_size, len(sliding_windows(n_tokens, context, stride)))  # windows in a forward pass
        check_memory(8 * rows * context * model.config.vocab_size, f"scoring {rows} windows of {context} tokens at "
                     "once (their fp32 logits and log-probabilities)", "use a smaller --batch-size or --context")
        tokens = np.memmap(os.path.join(tmp, "tokens.bin"), mode="r",
                           dtype=np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32)
        total, count = sliding_window_loss(model, tokens, context, stride, args.batch_size)
        # Every token but the first is scored: their bytes are the file's, less the first token's.
        scored_bytes = os.path.getsize(args.data) - len(tokenizer.decode([int(tokens[0])]).encode("utf-8"))
        del tokens
    loss = total / count
    bits_per_byte = total / math.log(2) / max(scored_bytes, 1)
    print(f"{args.model} on {args.data}: {n_tokens:,} tokens ({tokenizer.describe}); context {context}, stride "
          f"{stride}: {len(sliding_windows(n_tokens, context, stride)):,} windows")
    print(f"scored {count:,} tokens: loss {loss:.4f} nats/token, perplexity {math.exp(loss):.3f} "
          f"({loss / math.log(2):.4f} bits/token; {bits_per_byte:.4f} bits per byte of text, which compares "
          f"tokenizers) in {time.time() - start:.1f} s")
    return dict(loss=loss, perplexity=math.exp(loss), tokens=count, bits_per_byte=bits_per_byte)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


CLI_EXAMPLES = """examples:
  python nanogpt2.py sample --prompt "The meaning of life is"            # downloads gpt2 (124M) once
  python nanogpt2.py sample --model gpt2-xl --prompt "..." --temperature 0   # greedy
  python nanogpt2.py sample --model ./my-checkpoint --prompt-file story.txt --num-samples 3
  python nanogpt2.py sample --prompt "Hello" --prompt "Goodbye"            # a batch of prompts
  python nanogpt2.py sample --prompt "..." --temperature 0 --num-beams 5 --num-return-sequences 3  # 3 best beams
  python nanogpt2.py sample --prompt "..." --no-repeat-ngram-size 2 --repetition-penalty 1.2 --min-new-tokens 20
  python nanogpt2.py tokenize --text "Hello world, naïve 🙂"               # how a text becomes tokens
"""
TRAIN_EXAMPLES = """examples:
  python nanogpt2.py train                              # a small GPT-2 learns 2-digit addition, on a CPU
  python nanogpt2.py train --digits 3 --max-steps 1500 --time-budget 300   # 3-digit: ~98% in 2 min
  python nanogpt2.py train --resume out/addition-3digit --max-steps 2500   # train it further: 99.6%
  python nanogpt2.py train --data input.txt --tokenizer char --out out/shakespeare
  python nanogpt2.py train --data input.txt --tokenizer bpe --vocab-size 512   # a BPE of its own, learnt first
  python nanogpt2.py train --data notes.txt --init gpt2 --block-size 512 --batch-size 4 --accum 8
  python nanogpt2.py train --resume out/shakespeare     # continue exactly where it stopped
  torchrun --nproc_per_node 8 nanogpt2.py train --data big.txt   # one process per GPU (DDP)
  python nanogpt2.py eval --model gpt2 --data wiki.test.raw --stride 512
  python nanogpt2.py eval --model out/addition-2digit   # the held-out accuracy of an adder
"""


# Every number on the command line is checked by argparse as it reads it (type=integer_option(...) or
# float_option()), so that a value out of range is one line, `error: argument --batch-size: must be at least 1,
# got 0`, before any model is loaded. What a number asks of memory is checked once the model is known
# (check_memory: the batch's logits, the samples' key/value cache, an image grid).
MAX_SEED = 2 ** 63 - 1  # torch takes seeds below 2**64; the trainer adds a process's rank to its seed


def integer_option(low: int, high: Optional[int] = None, why: str = ""):
    """An argparse type: an integer in [low, high] (no upper end when high is None); why, if given, says where
    the bound comes from."""
    def integer(text: str) -> int:
        value = int(text)  # not an integer: argparse says "invalid integer value: '1.5'"
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}{f' ({why})' if why else ''}, got {value}")
        return value
    return integer


def float_option():
    """An argparse type: a finite number (float() also reads nan and inf, which no option means)."""
    def number(text: str) -> float:
        value = float(text)  # not a number: argparse says "invalid number value: 'x'"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        return value
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanogpt2.py",
        description="GPT-2 in one file. `sample` continues text with a pretrained or saved GPT-2; `train` trains\n"
                    "one (with no options: a small GPT-2 that learns to add, in minutes on a CPU); `eval` scores one;\n"
                    "`inspect` draws its attention; `tokenize` shows how a text becomes tokens.",
        epilog=CLI_EXAMPLES + TRAIN_EXAMPLES[len("examples:\n"):], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    sample = commands.add_parser(
        "sample", help="continue a prompt with a GPT-2 model, streaming the text as it is written",
        description="Continue a prompt with a GPT-2 model. The prompt and its continuation stream to stdout; "
                    "generation stops at <|endoftext|> or after --max-new-tokens.",
        epilog=CLI_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sample.add_argument("--model", default="gpt2",
                        help="a directory with config.json + weights, a released name (gpt2, gpt2-medium, "
                             "gpt2-large, gpt2-xl, distilgpt2) or a hub repo id (default: gpt2)")
    sample.add_argument("--prompt", action="append",
                        help="text to continue; give it several times for a batch (default: start from "
                             "<|endoftext|>, i.e. unconditional samples)")
    sample.add_argument("--prompt-file", help="read the prompt from this file ('-' for stdin)")
    sample.add_argument("--max-new-tokens", type=integer_option(0), default=None,
                        help="tokens to add per sample (default 100, or fewer if the model has less room)")
    sample.add_argument("--temperature", type=float_option(), default=0.8,
                        help="divide the logits by this; lower is more predictable, 0 means greedy (default 0.8)")
    sample.add_argument("--top-k", type=integer_option(0), default=200,
                        help="sample only among the k most likely tokens; 0 turns it off (default 200)")
    sample.add_argument("--top-p", type=float_option(), default=None,
                        help="sample only among the most likely tokens whose probabilities sum to p (nucleus)")
    sample.add_argument("--num-return-sequences", "--num-samples", dest="num_samples", type=integer_option(1),
                        default=1,
                        metavar="N", help="continuations per prompt: N samples, or with --num-beams the N best "
                                          "beams (default 1)")
    sample.add_argument("--num-beams", type=integer_option(1), default=1, metavar="N",
                        help="beam search with N beams per prompt; deterministic with --temperature 0, else beam "
                             "sampling, as the reference's do_sample with num_beams (default 1: no beams)")
    sample.add_argument("--repetition-penalty", type=float_option(), default=1.0, metavar="X",
                        help="make tokens already in the text less likely: scores divided by X (above 1 "
                             "penalises; default 1.0, none; 1.2 is usual)")
    sample.add_argument("--no-repeat-ngram-size", type=integer_option(0), default=0, metavar="N",
                        help="never repeat a sequence of N tokens (default 0: off)")
    sample.add_argument("--min-new-tokens", type=integer_option(0), default=0, metavar="N",
                        help="no <|endoftext|> before N new tokens (default 0)")
    sample.add_argument("--seed", type=integer_option(0, MAX_SEED), default=None,
                        help="random seed, for samples you can reproduce")
    sample.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    sample.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights' precision (default: bfloat16 on a GPU that supports it, else float32)")
    sample.add_argument("--compile", action="store_true",
                        help="compile the decoding step with torch.compile: a minute or more before the first "
                             "token, then faster steps (on a GPU, several times faster at batch 1); worth it "
                             "for long or many samples")
    add_train_parser(commands)
    add_eval_parser(commands)
    inspect = commands.add_parser(
        "inspect", help="draw a model's attention over a prompt as one PNG, and its next-token guesses",
        description="Run the prompt through the model once and draw every layer's and head's attention weights "
                    "as one PNG (layers down, heads across; in each square, row t is what position t attends "
                    "to, white 0 to dark blue 1). Also prints each position's most likely next tokens.",
        epilog="example:\n  python nanogpt2.py inspect --model out/addition-2digit --prompt '57+68=521' --out attn.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("--model", default="gpt2", help="a directory, a released name or a hub repo id (default: gpt2)")
    inspect.add_argument("--prompt", required=True, help="the text to look at")
    inspect.add_argument("--out", default="attention.png", help="where to write the PNG (default: attention.png)")
    inspect.add_argument("--top", type=integer_option(1), default=5,
                         help="next-token guesses to print per position (default 5)")
    inspect.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    tokenize = commands.add_parser(
        "tokenize", help="show how a tokenizer cuts a text: its pieces, their tokens and ids",
        description="Show how GPT-2's tokenizer (or a model's own: --model) cuts a text: the pieces of its pattern, "
                    "each piece's tokens with their ids, and, written as bytes b'...', the tokens that are not whole "
                    "characters (a character's UTF-8 bytes can be split between tokens). GPT-2's is the encoder "
                    "written out in nanogpt2.py, which gives tiktoken's tokens; <|endoftext|> is its token.",
        epilog="examples:\n  python nanogpt2.py tokenize --text \"Hello world, naïve 🙂 2019\"\n"
               "  python nanogpt2.py tokenize --model out/mytext --file notes.txt --limit 20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = tokenize.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="the text to tokenize")
    what.add_argument("--file", metavar="PATH", help="a UTF-8 text file to tokenize")
    tokenize.add_argument("--model", default=None,
                          help="a model folder whose tokenizer to use: its own BPE (train --tokenizer bpe), its "
                               "characters, or GPT-2's (default: GPT-2's)")
    tokenize.add_argument("--limit", type=integer_option(0), default=100, metavar="N",
                          help="pieces to show; 0: all (default 100; the counts are always of the whole text)")
    return parser


def default_help(name: str) -> str:
    """An option's default as --help states it, read from the dataclasses that fill_defaults (Training and evaluation) reads,
    so that the two never disagree: "(default 4)" when all that set it agree, else each one's value, named as
    TRAIN_DEFAULTS names it; None reads "the model's" (--init keeps the checkpoint's own)."""
    shown = [(label, "the model's" if option.default is None else f"{option.default:g}"
              if isinstance(option.default, float) else str(option.default))
             for label, task in TRAIN_DEFAULTS for option in fields(task) if option.name == name]
    if len({value for _, value in shown}) == 1:
        return f"(default {shown[0][1]})"
    return "(" + ", ".join(f"{label} {value}" for label, value in shown) + ")"


def add_train_parser(commands):
    # Defaults shown as "addition X, text Y" depend on the task: see default_help.
    train = commands.add_parser(
        "train", help="train a GPT-2 (no options: a small one learns to add, in minutes on a CPU)",
        description="Train a GPT-2 and save it with save_pretrained.\n\n"
                    "With no options, a GPT-2 of 2 layers x 64 learns 2-digit addition from problems made on the\n"
                    "fly, on a CPU, within 5 minutes, then reports its exact-match accuracy on problems it never saw.\n"
                    "--data trains on a text file instead; --init fine-tunes pretrained weights. Under torchrun,\n"
                    "every process trains on its slice of each batch (DistributedDataParallel: nccl on GPUs, gloo\n"
                    "on CPUs) and the first one logs and saves. Defaults written \"addition X, text Y\" depend on\n"
                    "what is trained.",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = train.add_argument_group("what to learn")
    data.add_argument("--data", metavar="PATH", help="a UTF-8 text file (default: the addition task)")
    data.add_argument("--digits", type=integer_option(1, 9), metavar="N",
                      help=f"addition: digits per operand {default_help('digits')}")
    data.add_argument("--tokenizer", choices=["gpt2", "char", "bpe"],
                      help=f"--data: GPT-2's BPE, one token per character, or a BPE learnt from the file first (saved "
                           f"beside the model as merges.txt) {default_help('tokenizer')}; --init: the model's own")
    data.add_argument("--vocab-size", type=integer_option(257, why="256 byte tokens and <|endoftext|>"), metavar="N",
                      help=f"--tokenizer bpe: tokens of the BPE learnt from --data, bytes and <|endoftext|> included "
                           f"{default_help('vocab_size')}")
    data.add_argument("--block-size", type=integer_option(1), metavar="N",
                      help=f"--data: tokens per training window {default_help('block_size')}")
    data.add_argument("--val-fraction", type=float_option(), metavar="F",
                      help=f"--data: the share of tokens, at the end of the file, kept for validation "
                           f"{default_help('val_fraction')}")
    model = train.add_argument_group("the model")
    model.add_argument("--init", metavar="NAME_OR_DIR",
                       help="fine-tune these weights (a directory, gpt2, gpt2-medium, ...) instead of new ones")
    model.add_argument("--n-layer", type=integer_option(1), metavar="N",
                       help=f"blocks of a new model {default_help('n_layer')}")
    model.add_argument("--n-head", type=integer_option(1), metavar="N",
                       help=f"attention heads of a new model {default_help('n_head')}")
    model.add_argument("--n-embd", type=integer_option(1), metavar="N",
                       help=f"width of a new model {default_help('n_embd')}")
    model.add_argument("--dropout", type=float_option(), metavar="P",
                       help=f"dropout probability {default_help('dropout')}")
    opt = train.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=integer_option(1), metavar="N",
                     help=f"examples per micro-batch and process {default_help('batch_size')}")
    opt.add_argument("--accum", type=integer_option(1), metavar="K",
                     help=f"micro-batches per step: gradient accumulation {default_help('accum')}")
    opt.add_argument("--lr", type=float_option(), metavar="LR", help=f"peak learning rate {default_help('lr')}")
    opt.add_argument("--warmup", type=integer_option(0), metavar="STEPS",
                     help=f"steps of linear warmup {default_help('warmup')}")
    opt.add_argument("--weight-decay", type=float_option(), metavar="WD",
                     help=f"AdamW weight decay, on matrices only {default_help('weight_decay')}")
    opt.add_argument("--grad-clip", type=float_option(), metavar="NORM",
                     help=f"largest gradient norm; 0 turns clipping off {default_help('grad_clip')}")
    opt.add_argument("--max-steps", type=integer_option(1), metavar="N",
                     help=f"optimiser steps {default_help('max_steps')}")
    opt.add_argument("--time-budget", type=float_option(), metavar="SECONDS",
                     help="also stop after this much training time, the cosine schedule following whichever "
                          f"budget runs out first; 0: none {default_help('time_budget')}")
    opt.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="autocast precision (default: float32 on a CPU; bfloat16 on a GPU that has it, else "
                          "float16 with a GradScaler)")
    opt.add_argument("--compile", action="store_true", help="torch.compile the model")
    opt.add_argument("--threads", type=integer_option(1, os.cpu_count(), "the cores of this machine"),
                     metavar="N",
                     help="CPU threads (default: 1 for a model under 5M parameters, whose small matrix products "
                          "lose more to handing work between threads than they gain; else OMP_NUM_THREADS or all "
                          "cores)")
    opt.add_argument("--seed", type=integer_option(0, MAX_SEED), metavar="N",
                     help=f"seed of the weights, the batches and dropout {default_help('seed')}")
    opt.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present; under torchrun cuda:LOCAL_RANK)")
    run = train.add_argument_group("the run")
    run.add_argument("--out", metavar="DIR", help="where to save (default out/addition-2digit, or out/<file name>)")
    run.add_argument("--resume", metavar="DIR",
                     help="continue the run saved in DIR exactly, with its own options; a larger --max-steps or "
                          "--time-budget trains a finished run further")
    run.add_argument("--overwrite", action="store_true",
                     help="train into an --out that holds an earlier run, replacing it (without it: refused)")
    run.add_argument("--target-accuracy", type=float_option(), metavar="F",
                     help="addition: stop once this fraction of the held-out problems is right, checked at each "
                          f"--eval-every; 0: train the whole budget {default_help('target_accuracy')}")
    run.add_argument("--stop-at", type=integer_option(1), metavar="STEP",
                     help="stop (and save) after this step, leaving the schedule as it is; continue with --resume")
    run.add_argument("--eval-every", type=integer_option(0), metavar="STEPS",
                     help=f"steps between validation losses; 0: at the end only {default_help('eval_every')}")
    run.add_argument("--eval-batches", type=integer_option(1), metavar="N",
                     help=f"batches in a validation loss {default_help('eval_batches')}")
    run.add_argument("--save-every", type=integer_option(0), metavar="STEPS",
                     help="steps between checkpoints; 0: at the end only "
                                                    "(default: --eval-every)")
    run.add_argument("--log-every", type=integer_option(1), metavar="STEPS",
                     help=f"steps between progress lines {default_help('log_every')}")


def add_eval_parser(commands):
    ev = commands.add_parser(
        "eval", help="loss and perplexity of a model on a text file, with a sliding window",
        description="Loss and perplexity of a model on a text file, with a sliding window as the GPT-2 paper\n"
                    "measures WikiText: windows of --context tokens, --stride apart, each scoring only the tokens\n"
                    "no earlier window scored. An addition model with no --data reports its held-out accuracy.",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("--model", default="gpt2", help="a directory, a released name or a hub repo id (default gpt2)")
    ev.add_argument("--data", metavar="PATH", help="a UTF-8 text file to score")
    ev.add_argument("--context", type=integer_option(2, why="a window scores its tokens after the first"),
                    metavar="N",
                    help="tokens per window (default: the model's n_positions)")
    ev.add_argument("--stride", type=integer_option(1), metavar="N",
                    help="tokens between window starts (default: half the context)")
    ev.add_argument("--batch-size", type=integer_option(1), metavar="N", default=4,
                    help="windows per forward pass (default 4)")
    ev.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    ev.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weights' precision (default float32)")


def read_prompts(args) -> List[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            raw = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
        else:
            if not os.path.isfile(args.prompt_file):
                raise ValueError(f"--prompt-file {args.prompt_file}: no such file")
            with open(args.prompt_file, "rb") as f:
                raw = f.read(MAX_PROMPT_BYTES + 1)
        if len(raw) > MAX_PROMPT_BYTES:  # an endless pipe (`yes |`) or a whole corpus: stop reading here
            raise ValueError(f"--prompt-file {args.prompt_file} holds more than {MAX_PROMPT_BYTES >> 20} MB: far "
                             "more than any model's context; give the part to continue")
        try:
            prompts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte {e.start} is "
                             f"{raw[e.start]:#04x})") from None
    return prompts or [""]


MAX_PROMPT_BYTES = 16 << 20  # GPT-2's 1,024 tokens are a few kilobytes; 16 MB leaves room for any model


def sample_command(args):
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty <= 0:
        raise ValueError(f"--repetition-penalty must be > 0 (1 is none), got {args.repetition_penalty}")
    if args.num_beams > 1 and args.num_samples > args.num_beams:
        raise ValueError(f"--num-return-sequences {args.num_samples} must be at most --num-beams {args.num_beams}: "
                         "beam search keeps that many hypotheses per prompt")
    if args.max_new_tokens is not None and args.min_new_tokens > args.max_new_tokens:
        raise ValueError(f"--min-new-tokens {args.min_new_tokens} must be at most --max-new-tokens "
                         f"{args.max_new_tokens}")
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32")
    prompts = read_prompts(args)
    model = GPT2LMHeadModel.from_pretrained(args.model, dtype=dtype, device=device)
    tokenizer = tokenizer_for(model.config, resolve_checkpoint(args.model))  # GPT-2's BPE, its own, or characters
    eos = model.config.eos_token_id
    input_ids, attention_mask = encode_batch(prompts, pad_id=eos, encode_fn=tokenizer.encode)  # each prompt once
    rows = model.transformer.wte.num_embeddings  # the token ids the model reads: 0 .. rows - 1
    if eos is not None and eos >= rows and bool((input_ids == eos).any()):  # put there by encode_batch, to be read
        raise ValueError(f"eos_token_id {eos} (from {os.path.join(resolve_checkpoint(args.model), 'config.json')}) "
                         f"is not a token id of this model: ids are in [0, {rows}); sample pads the shorter prompts "
                         "with it and starts an empty one from it; correct eos_token_id in config.json")
    beams = args.num_beams > 1  # beam search returns the best num_samples beams of each prompt
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed if args.seed is not None else torch.seed())
    room = model.config.n_positions - input_ids.size(1)
    if room < 0:
        raise ValueError(f"the prompt is {input_ids.size(1)} tokens, longer than the model's "
                         f"{model.config.n_positions} positions; shorten it to at most {model.config.n_positions} "
                         "tokens (fewer, to leave room for new ones)")
    if args.max_new_tokens is None:
        args.max_new_tokens = min(100, room)
    if args.max_new_tokens > room:
        raise ValueError(f"the prompt is {input_ids.size(1)} tokens; with --max-new-tokens {args.max_new_tokens} "
                         f"that exceeds the model's {model.config.n_positions} positions; ask for at most {room} "
                         "new tokens or shorten the prompt")
    if args.min_new_tokens > args.max_new_tokens:
        raise ValueError(f"--min-new-tokens {args.min_new_tokens} must be at most --max-new-tokens "
                         f"{args.max_new_tokens}")
    copies = 1 if beams else args.num_samples  # without beams each prompt is repeated num_samples times
    check_generation_memory(model, input_ids.size(0) * copies * args.num_beams, input_ids.size(1) + args.max_new_tokens)
    # Each prompt `copies` times, in rows grouped by prompt: (P, T) -> (P * copies, T).
    input_ids, attention_mask = (t.repeat_interleave(copies, dim=0) for t in (input_ids, attention_mask))
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                   temperature=args.temperature or 1.0, top_k=args.top_k or None, top_p=args.top_p,
                   num_beams=args.num_beams, num_return_sequences=args.num_samples if beams else 1,
                   repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                   min_new_tokens=args.min_new_tokens or None, attention_mask=attention_mask, generator=generator,
                   compile=args.compile)
    if args.compile:
        sys.stderr.write("compiling the decoding step (a minute or more the first time)...\n")
    out = sys.stdout
    if input_ids.size(0) == 1 and not beams:  # one sample: stream it token by token
        out.write(prompts[0])
        out.flush()
        stream = StreamDecoder(tokenizer.chars, tokenizer.bpe)

        def on_token(tokens):
            if int(tokens[0]) != eos:
                out.write(stream(tokens[0]))
                out.flush()

        model.generate(input_ids, on_token=on_token, **options)
        out.write(stream.flush() + "\n")
    else:  # a batch, or beams: every sample advances together; print each when all are done
        rows = input_ids.size(0) * (args.num_samples if beams else 1)
        if rows > 1:
            sys.stderr.write(f"generating {rows} samples in one batch...\n")
        tokens = model.generate(input_ids, **options)
        for i in range(rows):
            new = tokens[i, input_ids.size(1):].tolist()
            new = new[:new.index(eos)] if eos in new else new  # what follows eos is padding
            if rows > 1:
                out.write(f"--- sample {i % args.num_samples + 1} of prompt {i // args.num_samples + 1} ---\n")
            out.write(prompts[i // args.num_samples] + tokenizer.decode(new) + "\n")
    out.flush()


# --- Look inside: the attention weights as one picture ----------------------------------------------------
# `python nanogpt2.py inspect --model M --prompt TEXT --out attn.png` runs the prompt once with
# output_attentions=True and draws every (layer, head)'s (T, T) weights as one PNG, written by hand below
# (no matplotlib): rows are layers, columns heads; in each square, row t is what position t looks at.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(chunk_type: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + chunk_type + data + struct.pack(">I", zlib.crc32(chunk_type + data))


def write_png(path, image):
    """Write (H, W, 3) RGB, (H, W, 4) RGBA, or (H, W) / (H, W, 1) grey uint8 pixels as a PNG, atomically.
    Every row uses filter type 0 (no prediction): simplest, and small images compress well enough."""
    image = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image)
    if image.dtype != np.uint8:
        raise TypeError(f"write_png needs uint8 pixels, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]  # (H, W) -> (H, W, 1)
    colour_types = {1: 0, 2: 4, 3: 2, 4: 6}  # samples per pixel -> PNG colour type
    if image.ndim != 3 or image.shape[2] not in colour_types or image.shape[0] < 1 or image.shape[1] < 1:
        raise _shape_error("image", image.shape, "(H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4), H, W >= 1")
    H, W, channels = image.shape
    header = struct.pack(">IIBBBBB", W, H, 8, colour_types[channels], 0, 0, 0)  # 8-bit, deflate, no interlace
    rows = np.concatenate([np.zeros((H, 1), np.uint8), image.reshape(H, W * channels)], axis=1)  # filter byte 0
    png = PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + \
        _png_chunk(b"IEND", b"")
    _write_atomically(path, png)


# A 3 x 5 pixel font for the labels: five octal digits per character, one per row from the top, each
# digit's three bits the row's pixels from the left (7 = ###, 5 = #.#, 2 = .#.). Lower case is drawn as
# upper case; a character not listed is drawn as "?".
FONT_3X5 = dict(zip(
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ+-=.,!?'\":;()/_* <>",
    "75557 26227 71747 71717 55711 74717 74757 71111 75757 75717 25755 65656 34443 65556 74647 74644 34553 "
    "55755 72227 11152 55655 44447 57755 65555 25552 65644 25563 65655 34216 72222 55557 55552 55775 55255 "
    "55222 71247 02720 00700 07070 00002 00024 22202 61202 22000 55000 02020 02024 12221 42224 11244 00007 "
    "05250 00000 12421 42124".split()))


def draw_text(image: np.ndarray, text: str, y: int, x: int, vertical: bool = False):
    """Draw text in FONT_3X5, black, with its top-left corner at (y, x); characters 4 px apart (6 down when
    vertical). Pixels outside the image are skipped."""
    for i, char in enumerate(text):
        rows = FONT_3X5.get(char.upper(), FONT_3X5["?"])
        top, left = (y + 6 * i, x) if vertical else (y, x + 4 * i)
        for r, digit in enumerate(rows):
            for c in range(3):
                if int(digit) >> (2 - c) & 1 and 0 <= top + r < image.shape[0] and 0 <= left + c < image.shape[1]:
                    image[top + r, left + c] = 0


def token_label(text: str) -> str:
    """One visible character for a token in the picture: its first non-space one ("_" for a space, "/"
    for a newline)."""
    shown = text.strip() or text
    return {"": "?", " ": "_", "\n": "/"}.get(shown[:1], shown[:1])


def picture_layout(T: int) -> Tuple[int, int, int, int, int]:
    """How attention_picture lays out T tokens: (pixels per token, room for a label, the square's side with its
    label, the gap between squares, the margin for "L3" left of each row and "H2" above each column)."""
    s = max(6, min(16, 160 // T)) if T <= 64 else max(1, 384 // T)  # pixels per token
    label = 6 if T <= 64 else 0  # room for one character left of and above each square
    return s, label, T * s + label, 6, 12


def picture_shape(L: int, nh: int, T: int) -> Tuple[int, int, int]:
    """The (H, W, 3) of the picture of L layers x nh heads over T tokens: known before the model runs."""
    _, _, cell, gap, margin = picture_layout(T)
    return margin + L * (cell + gap), margin + nh * (cell + gap), 3


MAX_PICTURE_PIXELS = 100_000_000  # 100 megapixels: far more than a screen shows, 300 MB in memory


def attention_picture(attentions, labels: List[str]) -> np.ndarray:
    """attentions: one (nh, T, T) tensor per layer -> an RGB picture (H, W, 3) uint8: layers down, heads
    across, each square a (T, T) map from white (weight 0) to dark blue (weight 1). With 64 tokens or
    fewer, each square gets its tokens written along its left side (queries) and top (keys)."""
    L, (nh, T, _) = len(attentions), attentions[0].shape
    s, label, cell, gap, margin = picture_layout(T)
    image = np.full(picture_shape(L, nh, T), 255, dtype=np.uint8)
    dark = np.array([8, 48, 107], dtype=np.float32)
    for layer, weights in enumerate(attentions):
        top = margin + layer * (cell + gap)
        draw_text(image, f"L{layer}", top + label + 1, 0)
        for head in range(nh):
            left = margin + head * (cell + gap)
            if layer == 0:
                draw_text(image, f"H{head}", 2, left + label)
            w = weights[head].float().clamp(0, 1).cpu().numpy()  # (T, T)
            block = np.kron(w, np.ones((s, s), dtype=np.float32))[:, :, None]  # (T, T) -> (T*s, T*s, 1)
            image[top + label: top + cell, left + label: left + cell] = (255 - block * (255 - dark)).astype(np.uint8)
            for t, text in enumerate(labels if label else []):
                draw_text(image, text, top + label + t * s + (s - 5) // 2, left)  # the query row t
                draw_text(image, text, top, left + label + t * s + (s - 3) // 2)  # the key column t
    return image


def inspect_command(args):
    """python nanogpt2.py inspect: the attention picture, and each position's most likely next tokens."""
    check_output_file("--out", args.out)  # before the model is loaded
    device = resolve_device(args.device)
    model = GPT2LMHeadModel.from_pretrained(args.model, device=device)
    tokenizer = tokenizer_for(model.config, resolve_checkpoint(args.model))
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt is empty: give at least one character to look at")
    if len(ids) > model.config.n_positions:
        raise ValueError(f"--prompt is {len(ids)} tokens, longer than the model's {model.config.n_positions} "
                         "positions; shorten it")
    H, W, _ = picture_shape(model.config.n_layer, model.config.n_head, len(ids))
    if H * W > MAX_PICTURE_PIXELS:
        raise ValueError(f"the picture of {model.config.n_layer} layers x {model.config.n_head} heads over "
                         f"{len(ids)} tokens would be {W} x {H} pixels, more than {MAX_PICTURE_PIXELS:,}; "
                         "give a shorter --prompt")
    with torch.no_grad():
        out = model(torch.tensor([ids], device=device), output_attentions=True)
    texts = [tokenizer.decode([i]) for i in ids]
    write_png(args.out, attention_picture([a[0] for a in out.attentions], [token_label(t) for t in texts]))
    print(f"{len(out.attentions)} layers x {out.attentions[0].size(1)} heads of attention over {len(ids)} tokens "
          f"written to {args.out}")
    probs = F.softmax(out.logits[0].float(), dim=-1)  # (T, V)
    top = probs.topk(min(args.top, probs.size(-1)), dim=-1)
    print(f"{'pos':>4}  {'token':<12} most likely next tokens")
    for t, text in enumerate(texts):
        guesses = "  ".join(f"{tokenizer.decode([int(i)])!r} {float(p):.3f}" for p, i in zip(top.values[t], top.indices[t]))
        print(f"{t:>4}  {text!r:<12} {guesses}")


# --- Look inside: how a text becomes tokens --------------------------------------------------------------


def tokenize_command(args):
    """python nanogpt2.py tokenize: a text's pieces, each piece's tokens (id and text; b'...' for the bytes of a
    token that is not whole characters), and the counts."""
    if args.file is not None:
        check_text_file(args.file, "--file")
        text = "".join(read_text_pieces(args.file))
    else:
        text = args.text
    if args.model is None or args.model in HUB_NAMES:  # every released GPT-2 reads GPT-2's BPE
        tokenizer, what = BPETokenizer(get_tokenizer("python")), "GPT-2's BPE (written out; tiktoken's tokens)"
    else:
        folder = resolve_checkpoint(args.model)
        tokenizer = tokenizer_for(GPT2Config.from_json_file(os.path.join(folder, "config.json")), folder)
        what = f"{args.model}'s tokenizer, {tokenizer.describe}"
    if tokenizer.chars is not None:  # one token per character: every character is its own piece
        pieces = [(c, tokenizer.encode(c)) for c in text]
        token_bytes = lambda token: tokenizer.chars[token].encode("utf-8")
    else:
        pieces = tokenizer.bpe.pieces(text, allowed_special={"<|endoftext|>"})
        token_bytes = tokenizer.bpe.decode_single_token_bytes
    n_tokens = sum(len(ids) for _, ids in pieces)
    n_bytes = len(text.encode("utf-8"))
    print(f"{what}: {tokenizer.vocab_size:,} tokens")
    print(f"{len(text):,} characters, {n_bytes:,} bytes -> {len(pieces):,} pieces -> {n_tokens:,} tokens"
          + (f" ({n_bytes / n_tokens:.2f} bytes per token)" if n_tokens else ""))
    shown = pieces if args.limit == 0 else pieces[: args.limit]
    # (A wide character, 東 or 🙂, takes two columns of a terminal.)
    columns = lambda s: sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)
    width = min(max([columns(repr(piece)) for piece, _ in shown] + [5]), 24)
    print(f"{'piece':<{width}}  tokens (id text)")
    for piece, ids in shown:
        print(repr(piece) + " " * (width - columns(repr(piece)) + 2)
              + "  ".join(f"{token} {token_text(token_bytes(token))}" for token in ids))
    if len(shown) < len(pieces):
        print(f"... and {len(pieces) - len(shown):,} more pieces (--limit 0 shows them all)")
    else:
        print("ids:", [token for _, ids in pieces for token in ids])
    if any(token_text(token_bytes(token)).startswith("b") for _, ids in shown for token in ids):
        print("b'...': a token whose bytes are not whole UTF-8 characters (a character's bytes are split between "
              "tokens)")


def token_text(raw: bytes) -> str:
    """A token as the tokenize command shows it: its text in quotes, or b'...' if its bytes are not whole UTF-8
    characters."""
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "sample":
            sample_command(args)
        elif args.command == "train":
            if train_command(args)["stopped"] == "interrupted":  # saved; it said how to resume
                return 130
        elif args.command == "eval":
            eval_command(args)
        elif args.command == "inspect":
            inspect_command(args)
        elif args.command == "tokenize":
            tokenize_command(args)
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, keep what was printed (train saves on the first Ctrl-C)
        sys.stdout.write("\n")
        if args.command == "train" and args.out is not None:
            print(f"interrupted: nothing saved since the last checkpoint in {args.out}, if any", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`sample ... | head`): not an error, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail too
        return 0
    except (ValueError, OSError) as e:  # a user's mistake: one line, no traceback
        print(f"nanogpt2.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
