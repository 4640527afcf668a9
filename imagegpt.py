"""imagegpt.py: all of ImageGPT in one readable PyTorch file.

ImageGPT (Chen et al., 2020, "Generative Pretraining from Pixels") is GPT-2 trained on images instead of
text: an image is shrunk to n_px x n_px (32 x 32 for the released models), every pixel is replaced by the
nearest of 512 colours (a palette found by k-means), and the pixels, read in raster order, become a
sequence of 1024 colour tokens that the transformer learns to predict one by one. A start-of-sequence
token (SOS, id 512) comes first, so the first pixel has something to be predicted from.
This file writes every part of the Hugging Face transformers ImageGPT family out in full, with the same
class names, config fields, state_dict keys, forward arguments and output names, so that a Hugging Face
checkpoint loads with `load_state_dict(strict=True)` and gives the same numbers.

It is nanogpt2.py with ImageGPT's differences, and `python tests/copies.py` prints them (the shared code is checked
identical, after renaming GPT2 -> ImageGPT, by tests/test_copies.py):
    - ImageGPTLayerNorm: no mean subtraction and no bias, x / sqrt(mean(x^2) + eps) * weight.
    - quick_gelu, x * sigmoid(1.702 x), instead of GPT-2's tanh GELU.
    - The head predicts the 512 colours only, never SOS, and is not tied to the token embeddings.
    - An image classification head that averages the hidden states over all positions.
    - Pixels and tokens: the colour palette, quantising images, PNG reading and writing.

Map of the file (read it top to bottom; Part I is the model a first reading needs, in the order the
data flows through it):
  Part I: the model
    Config                                ImageGPTConfig, with Hugging Face's names and defaults
    Conv1D, layer norm and activations    Conv1D, ImageGPTLayerNorm (no mean, no bias), quick_gelu
    Attention                             ImageGPTAttention: causal mask, KV cache, two attention cores
    MLP and block                         ImageGPTMLP, ImageGPTBlock (pre-norm)
    The body                              ImageGPTModel: embeddings, blocks, final layer norm
    The LM head                           ImageGPTForCausalImageModeling: next-colour logits, the loss
    Sampling                              generate (the reference's arguments): from SOS or a prompt
  Part II: what the reference also has
    The other heads                       ImageGPTForImageClassification (average pooling)
    Output dataclasses                    what each forward returns (out.logits, out[0], to_tuple())
    Generation options and processors     GenerationConfig; repetition penalty, n-grams, bad words, min length,
                                          top-k, top-p
    Beam search                           generate(num_beams=...)
    Pruning heads                         prune_heads, as the reference does it
    Head masks, gradient checkpointing    head_mask and checkpointing helpers
    Input checks                          every shape and range checked before any work
    Faster decoding                       generate()'s default step (the head as (W @ h^T)^T); compile=True:
                                          a fixed-shape cache and step, torch.compile'd
    Config validation and serialisation   validate, presets, config.json read/write
  Part III: files and tools
    Loading and saving                    safetensors by hand, the hub, from_pretrained, save_pretrained, the
                                          palette
    Pixels and tokens                     the palette (OpenAI's or k-means), quantise, dequantise, PNG files
    Training and evaluation               shapes drawn on the fly or your images, a k-means palette, AdamW,
                                          warmup + cosine, sample grids as it trains; a linear probe or
                                          fine-tuned classifier
    Command line                          python imagegpt.py sample | complete | train (--help)

Shapes in comments: B batch, T new tokens, P cached (past) tokens, S encoder tokens, C = n_embd, nh = number
of heads, hs = head size (C // nh), V = vocab size (colours + SOS), K = keys a query sees (P + T, or S for
cross-attention), n_colours = the palette's size (V - 1).

Run the tests with `python -m pytest -q` (see README.md); sample with `python imagegpt.py sample --help`;
train a small one that draws shapes with `python imagegpt.py train` (minutes on a CPU).
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
class ImageGPTConfig:
    """Every hyperparameter of an ImageGPT model, with Hugging Face's names and defaults
    (openai/imagegpt-small's, 76M parameters), those of its base config class (num_labels,
    problem_type, ...) included. Keys of a config.json that this class does not know are kept in
    `extra` and written back unchanged."""

    vocab_size: int = 512 + 1  # 512 colours + the start-of-sequence token (SOS = vocab_size - 1)
    n_positions: int = 32 * 32  # one position per pixel of a 32 x 32 image
    n_embd: int = 512  # width C of the residual stream
    n_layer: int = 24
    n_head: int = 8
    n_inner: Optional[int] = None  # MLP width; None means 4 * n_embd
    activation_function: str = "quick_gelu"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # Attention options.
    scale_attn_weights: bool = True  # divide scores by sqrt(hs)
    scale_attn_by_inverse_layer_idx: bool = False  # also divide by (layer index + 1), for stability
    reorder_and_upcast_attn: bool = False  # scores and softmax in fp32 even under autocast
    add_cross_attention: bool = False  # a cross-attention sub-block in each block (encoder-decoder)
    use_cache: bool = True
    # Heads.
    num_labels: int = 2
    problem_type: Optional[str] = None
    tie_word_embeddings: bool = False  # the head has n_colours rows, the embedding n_colours + 1
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

    # ImageGPT's own numbers. SOS, the last row of the token embedding, is never predicted.
    sos_token_id = property(lambda self: self.vocab_size - 1)
    n_colours = property(lambda self: self.vocab_size - 1)

    @property
    def n_px(self) -> int:
        """The side of the square images the model was trained on (n_positions = n_px * n_px)."""
        side = math.isqrt(self.n_positions)
        if side * side != self.n_positions:
            raise ValueError(f"n_positions={self.n_positions} is not a square number, so it is no "
                             "n_px x n_px image")
        return side

    # --- in Part II: validation, presets (the released sizes), config.json ------------------------
    def validate(self):  # raises ValueError naming the first bad field
        return validate_config(self)  # in Part II

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ImageGPTConfig":
        return config_from_preset(cls, name, **overrides)  # in Part II

    @classmethod
    def from_dict(cls, config_dict: dict) -> "ImageGPTConfig":  # unknown keys are kept in `extra`
        return config_from_dict(cls, config_dict)  # in Part II

    def to_dict(self) -> dict:
        return config_to_dict(self)  # in Part II

    @classmethod
    def from_json_file(cls, path) -> "ImageGPTConfig":
        return config_from_json_file(cls, path)  # in Part II

    def to_json_file(self, path):  # atomically
        return config_to_json_file(self, path)  # in Part II


# --- Conv1D, layer norm and activations -----------------------------------------------------------


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


class ImageGPTLayerNorm(nn.Module):
    """ImageGPT's layer norm: x / sqrt(mean(x^2) + eps) * weight, no mean subtracted and no bias
    (an RMS norm), as OpenAI's image-gpt code normalised: a standard LayerNorm changes a pretrained
    model's outputs completely. The reference's `weight.data` hides the weight from autograd, so it
    never trains; here it does, with the same forward numbers."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x):
        """x (..., C) -> (..., C): x / sqrt(mean(x^2 over the last axis) + eps) * weight. No mean is
        subtracted and there is no bias (an RMS norm)."""
        rms = torch.sqrt(torch.mean(torch.square(x), dim=-1, keepdim=True) + self.eps)  # (B, T, 1)
        return x / rms * self.weight


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
    """x * sigmoid(1.702 x), elementwise on a tensor of any shape: the cheaper GELU approximation
    ImageGPT was trained with (CLIP uses it too). It differs from the exact GELU by up to ~0.02, so
    a pretrained model needs exactly this one."""
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


class ImageGPTAttention(nn.Module):
    """Multi-head attention: causal self-attention, or (is_cross_attention=True) attention from the
    decoder's tokens to an encoder's outputs. ImageGPT's attention is GPT-2's, unchanged. Each
    pixel's query is compared with every visible key, and the softmax of the scores weights the
    values. Self-attention is causal: a pixel sees itself and the pixels before it in raster order
    (the rows above, and the pixels to its left), never after. Earlier pixels' keys and values can
    be passed back in (`layer_past`), so that one more pixel costs one pixel's work, not the
    image's."""

    def __init__(self, config: ImageGPTConfig, is_cross_attention: bool = False,
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
        on GPUs); the reference ImageGPT has only the explicit core. Returns the output
        (B, nh, T, hs) only."""
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


class ImageGPTMLP(nn.Module):
    """Position-wise feed-forward: C -> n_inner (4C) -> activation (quick_gelu) -> C."""

    def __init__(self, intermediate_size: int, config: ImageGPTConfig):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, intermediate_size)
        self.act = ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        """x (B, T, C) -> (B, T, C): c_fc widens each position to intermediate_size, the config's
        activation (self.act), c_proj projects back to C, then dropout (resid_pdrop)."""
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, 4C) inside


class ImageGPTBlock(nn.Module):
    """One transformer block, pre-norm: each sub-block reads a layer norm of the residual stream x
    and adds its output to x. GPT-2's block with ImageGPT's layer norm (no mean subtraction, no
    bias): x itself is never normalised until ln_f, and gradients flow straight through it."""

    def __init__(self, config: ImageGPTConfig, layer_idx: Optional[int] = None):
        super().__init__()
        inner_dim = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.ln_1 = ImageGPTLayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = ImageGPTAttention(config, layer_idx=layer_idx)
        self.ln_2 = ImageGPTLayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        if config.add_cross_attention:
            self.crossattention = ImageGPTAttention(config, is_cross_attention=True,
                                                layer_idx=layer_idx)
            self.ln_cross_attn = ImageGPTLayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = ImageGPTMLP(inner_dim, config)

    def forward(self, hidden_states, layer_past=None, attention_mask=None, head_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, use_cache=False,
                output_attentions=False):
        """One block on hidden_states (B, T, C), the residual stream x:
            x = x + attn(ln_1(x))                     with layer_past, attention_mask, head_mask
            x = x + crossattention(ln_cross_attn(x))  only with encoder_hidden_states (no cache)
            x = x + mlp(ln_2(x))
        Returns (x (B, T, C), present (see ImageGPTAttention) or None, self-attention weights or
        None, cross-attention weights or None): the weights with output_attentions."""
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


def init_imagegpt_weights(module: nn.Module, config: ImageGPTConfig):
    """ImageGPT's initialisation (GPT-2's), for one module (use with `model.apply`): N(0, 0.02)
    weights, zero biases, unit layer norms, and each residual projection (c_proj) scaled by
    1/sqrt(2 * n_layer): every block adds two of them to the residual stream, whose variance would
    otherwise grow with depth. torch.nn.init fills them, so that from_pretrained can skip it
    (without_random_init)."""
    if isinstance(module, (nn.Linear, Conv1D)):
        nn.init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=config.initializer_range)
    elif isinstance(module, ImageGPTLayerNorm):
        nn.init.ones_(module.weight)
    for name, p in module.named_parameters():
        if name == "c_proj.weight":  # ImageGPTAttention.c_proj and ImageGPTMLP.c_proj
            std = config.initializer_range / math.sqrt(2 * config.n_layer)
            nn.init.normal_(p, mean=0.0, std=std)


def layer_cache(past_key_values, i: int):
    """Layer i's part of past_key_values: a StaticCache serves every layer, the reference's tuples
    hold one (k, v) per layer."""
    if past_key_values is None or isinstance(past_key_values, StaticCache):
        return past_key_values
    return past_key_values[i]


class ImageGPTModel(nn.Module):
    """The ImageGPT body: token (colour) + position (pixel) embeddings, n_layer blocks, a final
    layer norm. It returns the last hidden states (B, T, C); the heads below turn them into
    predictions."""

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed_dim = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # colours and SOS, (V, C)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)  # pixels, (n_positions, C)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([ImageGPTBlock(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = ImageGPTLayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.palette = None  # (n_colours, 3) in [-1, 1], set by from_pretrained, not a weight
        self.apply(lambda module: init_imagegpt_weights(module, config))
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
        if position_ids is None:  # the new pixels continue after the P cached ones: (1, T)
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
            inputs = to_device(inputs, hidden_states.device)  # Part II: masks follow activations
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
        hidden_states = self.ln_f(hidden_states)
        hidden_states = hidden_states.view(input_shape + (hidden_states.size(-1),))  # (..., T, C)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        out = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states, past_key_values=presents, attentions=all_attentions,
            hidden_states=all_hidden_states, cross_attentions=all_cross_attentions)
        return out if return_dict else out.to_tuple()

    # --- in Part II: pruning, gradient checkpointing --------------------------------------------
    def prune_heads(self, heads_to_prune: Dict[int, List[int]]):
        """Remove attention heads, {layer: [head, ...]} (prune_model_heads)."""
        return prune_model_heads(self, heads_to_prune)  # in Part II

    def gradient_checkpointing_enable(self):
        """Training: recompute each block's insides in the backward pass (checkpointed_block)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False


# --- The LM head ----------------------------------------------------------------------------------


def shifted_lm_loss(logits, labels):
    """Next-pixel cross-entropy, a scalar: logits (..., T, V), labels (..., T) (on any device).
    Position t's logits predict labels[t + 1], so the last position's logits and the first label are
    not used. Labels of -100 are ignored (padding, or a prompt the loss should not count); the mean
    is over the rest. The labels are shifted, not the logits, so that the logits are not copied."""
    labels = labels.to(logits.device)
    shifted = F.pad(labels[..., 1:], (0, 1), value=-100)  # (..., T): the next label; -100 last
    flat_logits = logits.reshape(-1, logits.size(-1))  # (N, V)
    return F.cross_entropy(flat_logits, shifted.reshape(-1), ignore_index=-100)


class ImageGPTForCausalImageModeling(nn.Module):
    """ImageGPT with its next-pixel head: logits over the n_colours = vocab_size - 1 colours.

    Unlike GPT-2's, the head is not tied to the token embeddings, and it has no row for SOS: SOS
    only ever starts a sequence, so the model is never asked to predict it.
    """

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = ImageGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size - 1, bias=False)  # no SOS row
        init_imagegpt_weights(self.lm_head, config)
        self.palette = None  # (n_colours, 3) in [-1, 1], set by from_pretrained, not a weight
        # generate()'s defaults (Part II): the reference's, but starting from SOS and completing the
        # image (SOS + one token per pixel) rather than stopping at 20 tokens.
        self.generation_config = GenerationConfig.from_model_config(
            config, bos_token_id=config.sos_token_id, max_length=config.n_positions + 1)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None,
                token_type_ids=None, position_ids=None, head_mask=None, inputs_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=True):
        """The body's arguments -> logits (..., T, V - 1) for the next pixel's colour at every
        position, in a CausalLMOutputWithCrossAttentions (its to_tuple() if not return_dict). labels
        (..., T): usually input_ids itself, SOS first (shifted inside: the label at position 0 is
        never read), -100 where not counted; given, the loss is set."""
        check_colour_labels(labels, _input_shape(input_ids, inputs_embeds), self.config)  # Part II
        body = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask,
            inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        logits = self.lm_head(body.last_hidden_state)  # (B, T, C) -> (B, T, V - 1)
        loss = shifted_lm_loss(logits, labels) if labels is not None else None
        out = CausalLMOutputWithCrossAttentions(
            loss=loss, logits=logits, past_key_values=body.past_key_values,
            hidden_states=body.hidden_states, attentions=body.attentions,
            cross_attentions=body.cross_attentions)
        return out if return_dict else out.to_tuple()

    def generate(self, input_ids=None, num_samples: int = 1, **kwargs):
        """Sample or complete images: generate(), each prompt (and its attention_mask) first
        repeated num_samples times, rows grouped by prompt, whatever the decoding (for sampling, the
        same as num_return_sequences). input_ids None starts from SOS."""
        input_ids, kwargs = repeat_prompts(self, input_ids, num_samples, kwargs)  # Part II
        return generate(self, input_ids, **kwargs)

    # --- in Part II: pruning, beam search's cache -----------------------------------------------
    def prune_heads(self, heads_to_prune):
        self.transformer.prune_heads(heads_to_prune)

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
def generate(model: "ImageGPTForCausalImageModeling", input_ids=None, generation_config=None,
             attention_mask=None, **kwargs):
    """Sample or complete images pixel by pixel: the reference's generate() (transformers 4.46.3),
    with its arguments, defaults and tokens, in greedy decoding, sampling and beam search.

    input_ids (B, T): the prompts, each SOS (vocab_size - 1) then the pixels already known, in
    raster order; None is one prompt of SOS alone, an unconditional sample. attention_mask (B, T): 0
    on left padding, for prompts of different lengths. kwargs: GenerationConfig's fields
    (max_new_tokens, do_sample, top_k, num_beams, ...) over generation_config (default
    model.generation_config: from SOS to a whole image), and generator, on_token, stop_at_eos,
    cache, compile: see prepare_generation, which checks them all before any work. Returns a
    LongTensor (B * num_return_sequences, T + new tokens), SOS first, or with
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
# pruning, head masks, gradient checkpointing, input checks, compiled decoding, config validation and
# serialisation: written out in full, out of a first reading's way. A method of a Part I class marked
# `# in Part II` is one line that calls its body here.
# ==================================================================================================


# --- The other heads --------------------------------------------------------------------------------


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


class ImageGPTForImageClassification(nn.Module):
    """A label (or a number) for a whole image, from the average of the hidden states over all its pixels.

    (GPT-2's sequence classifier reads the last token instead; ImageGPT's paper found averaged features
    classify better. The average includes padding positions, as in the reference: pad nothing, or pool
    the hidden states yourself.)
    """

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.transformer = ImageGPTModel(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        init_imagegpt_weights(self.score, config)
        self.palette = None  # (n_colours, 3) colours in [-1, 1], set by from_pretrained; not part of the state_dict

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
        check_classification_labels(labels, _input_shape(input_ids, inputs_embeds), self.num_labels,
                                    self.config.problem_type)
        body = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        pooled = body.last_hidden_state.mean(dim=1)  # (B, T, C) -> (B, C): the average over all pixels
        logits = self.score(pooled)  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = classification_loss(logits, labels, self.num_labels, self.config.problem_type)
        out = SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, past_key_values=body.past_key_values,
            hidden_states=body.hidden_states, attentions=body.attentions,
        )
        return out if return_dict else out.to_tuple()


HEAD_CLASSES = (ImageGPTModel, ImageGPTForCausalImageModeling, ImageGPTForImageClassification)


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
    logits: torch.Tensor = None  # (B, T, V - 1): scores of the colours, never of SOS
    past_key_values: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None  # (B, num_labels)
    past_key_values: Optional[tuple] = None
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

    Head numbers are those of the original model; after earlier pruning, a head's channels sit further
    left, by one head size for every smaller head already removed.
    Returns (heads to prune now, LongTensor of kept channel indices within one of q, k or v).
    """
    heads = set(heads) - already_pruned
    keep = torch.ones(n_heads, head_size)  # (nh_now, hs): 1 = keep this channel
    for head in heads:
        head = head - sum(1 for h in already_pruned if h < head)  # position among the heads still here
        keep[head] = 0
    index = torch.arange(len(keep.view(-1)))[keep.view(-1).eq(1)]
    return heads, index


def prune_conv1d_layer(layer: Conv1D, index: torch.Tensor, dim: int = 1) -> Conv1D:
    """A new, smaller Conv1D keeping only `index` along `dim` (0: inputs, 1: outputs) of the weight."""
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
    """Remove whole heads: their columns of c_attn (in q, k and v) and their rows of c_proj.
    (The reference prunes cross-attention as if it held q, k and v; here its k, v and q_attn are pruned.)"""
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


# --- Head masks, gradient checkpointing -------------------------------------------------------------


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
                "ImageGPTConfig(add_cross_attention=True)"
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


def check_colour_labels(labels, shape, config):
    """ImageGPTForCausalImageModeling's labels, before any work: None, or one per input token (`shape`), and
    after the first position (never read: it is SOS's label) colours in [0, n_colours) or -100 (not counted)."""
    if labels is None:
        return
    if tuple(labels.shape) != tuple(shape):
        raise _shape_error("labels", labels.shape, tuple(shape), "one label per input token")
    predicted = labels[..., 1:]
    _check_indices("labels (after the first position)", predicted.masked_fill(predicted == -100, 0),
                   config.vocab_size - 1, "the number of colours", "colour")


def repeat_prompts(model, input_ids, num_samples, kwargs):
    """generate(num_samples=...): each prompt, and its attention_mask in kwargs, repeated num_samples times, rows
    grouped by prompt (input_ids None is first one SOS prompt). Checked before any work: num_samples a positive
    integer, and a cache for the repeated batch within memory. Returns (input_ids, kwargs)."""
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if num_samples == 1:
        return input_ids, kwargs
    # Before the repeat, so that a huge num_samples is refused, not allocated: the cache holds at most n_positions.
    prompts = input_ids.size(0) if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else 1
    check_generation_memory(model, prompts * num_samples, model.config.n_positions)
    if input_ids is None:  # the SOS prompt, checked here as prepare_generation checks it for one sample
        bos = kwargs.get("bos_token_id", model.generation_config.bos_token_id)
        rows = model.transformer.wte.num_embeddings
        if isinstance(bos, int) and not isinstance(bos, bool) and not 0 <= bos < rows:
            source = _token_source("bos_token_id", kwargs, None)
            raise ValueError(f"bos_token_id {bos}{source} is not a token id of this model: ids are in [0, {rows}); "
                             f"generation starts from it when input_ids is None: give a prompt, or a bos_token_id "
                             f"below {rows}")
        input_ids = torch.full((1, 1), bos)
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.repeat_interleave(num_samples, dim=0)
    if isinstance(kwargs.get("attention_mask"), torch.Tensor):
        kwargs["attention_mask"] = kwargs["attention_mask"].repeat_interleave(num_samples, dim=0)
    return input_ids, kwargs


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
    (see README, Performance).

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
    the value and its type: `ImageGPTConfig.tie_word_embeddings must be true or false, got 'false' (a str)`.
    The ranges (n_layer >= 1, dropout in [0, 1), ...) are validate_config's, once the kinds are right."""
    for f in fields(config):
        value = getattr(config, f.name)
        kind = OPTIONAL_KINDS.get(f.type, f.type)
        if kind not in FIELD_KINDS or (value is None and f.type in OPTIONAL_KINDS):
            continue
        expected = FIELD_KINDS[kind] + (" or null (None)" if f.type in OPTIONAL_KINDS else "")
        if not is_kind(value, kind):
            fix = f"; write {int(value)}" if kind is int and isinstance(value, float) and value.is_integer() else ""
            raise ValueError(f"ImageGPTConfig.{f.name} must be {expected}, got {shown(value)}{fix}")
        if kind is int and not -INT64_BOUND <= value < INT64_BOUND:
            raise ValueError(f"ImageGPTConfig.{f.name} must fit in 64 bits, [-2**63, 2**63), got {shown(value)}")
    heads = config.pruned_heads
    if not isinstance(heads, dict) or not all(is_kind(layer, int) and isinstance(pruned, (list, tuple))
                                              and all(is_kind(h, int) for h in pruned)
                                              for layer, pruned in heads.items()):
        raise ValueError(f"ImageGPTConfig.pruned_heads must map layer numbers to lists of head numbers, "
                         f"{{11: [0, 3]}}, got {shown(heads)}")
    if not isinstance(config.extra, dict) or not all(isinstance(key, str) for key in config.extra):
        raise ValueError(f"ImageGPTConfig.extra holds the config.json keys this class does not know: a dict with "
                         f"string keys, got {shown(config.extra)}")
    if "id2label" in config.extra:
        check_label_names(config.extra["id2label"])


def check_label_names(id2label):
    """id2label, Hugging Face's label names: an object of label numbers to names, {"0": "LABEL_0", ...}."""
    if not isinstance(id2label, dict) or not all(is_index(i) and isinstance(name, str) for i, name in id2label.items()):
        raise ValueError(f"ImageGPTConfig.id2label must map label numbers to names, "
                         f'{{"0": "negative", "1": "positive"}}, got {shown(id2label)}')


def pruned_heads_from_json(pruned_heads) -> Dict[int, List[int]]:
    """config.json's pruned_heads, {"11": [0, 3]} (JSON object keys are strings) -> {11: [0, 3]}."""
    if not isinstance(pruned_heads, dict) or not all(is_index(layer) and isinstance(heads, list)
                                                     and all(is_kind(h, int) for h in heads)
                                                     for layer, heads in pruned_heads.items()):
        raise ValueError(f"ImageGPTConfig.pruned_heads must map layer numbers to lists of head numbers, "
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
            raise ValueError(f"ImageGPTConfig.{name} must be a positive integer, got {value!r}")
    if config.vocab_size < 2:
        raise ValueError(f"ImageGPTConfig.vocab_size is {config.vocab_size}, but it counts the colours + SOS, so "
                         "it must be at least 2 (512 + 1 for OpenAI's palette)")
    if config.n_embd % config.n_head != 0:
        raise ValueError(
            f"ImageGPTConfig.n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}): each head "
            f"gets n_embd // n_head channels; try n_head in {[h for h in range(1, 33) if config.n_embd % h == 0]}"
        )
    if config.n_inner is not None and config.n_inner < 1:
        raise ValueError(f"ImageGPTConfig.n_inner must be None or a positive integer, got {config.n_inner!r}")
    if config.activation_function not in ACTIVATIONS:
        raise ValueError(f"ImageGPTConfig.activation_function is {config.activation_function!r}, expected one of "
                         f"{sorted(ACTIVATIONS)}")
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"ImageGPTConfig.{name} is a dropout probability in [0, 1), got {value!r}")
    if not config.layer_norm_epsilon > 0:
        raise ValueError(f"ImageGPTConfig.layer_norm_epsilon must be > 0, got {config.layer_norm_epsilon!r}")
    if config.initializer_range < 0:
        raise ValueError(f"ImageGPTConfig.initializer_range is the standard deviation of the initial weights, >= 0, "
                         f"got {config.initializer_range!r}")
    if config.problem_type not in PROBLEM_TYPES:
        raise ValueError(f"ImageGPTConfig.problem_type is {config.problem_type!r}, expected one of {PROBLEM_TYPES}")
    if config.tie_word_embeddings:
        raise ValueError(
            "ImageGPTConfig.tie_word_embeddings must be False: the head scores the vocab_size - 1 colours and "
            "the embedding also holds SOS, so the two matrices differ in shape"
        )
    for layer, heads in config.pruned_heads.items():
        if not 0 <= layer < config.n_layer or any(not 0 <= h < config.n_head for h in heads):
            raise ValueError(
                f"ImageGPTConfig.pruned_heads names layer {layer} heads {list(heads)}, but the model has "
                f"{config.n_layer} layers of {config.n_head} heads"
            )
        if len(set(heads)) == config.n_head:
            raise ValueError(f"ImageGPTConfig.pruned_heads removes all {config.n_head} heads of layer {layer}; a "
                             "layer keeps at least one")
    check_model_size(config)


# OpenAI's three released sizes (trained on 32 x 32 ImageNet with the same 512-colour palette).
PRESETS = {
    "imagegpt-small": dict(n_layer=24, n_head=8, n_embd=512),  # iGPT-S, 76M parameters
    "imagegpt-medium": dict(n_layer=36, n_head=8, n_embd=1024),  # iGPT-M, 455M
    "imagegpt-large": dict(n_layer=48, n_head=16, n_embd=1536),  # iGPT-L, 1.4B
}


def config_from_preset(cls, name: str, **overrides) -> "ImageGPTConfig":
    """The config of one of OpenAI's released sizes, e.g. `ImageGPTConfig.from_preset("imagegpt-medium")`
    (or just "medium")."""
    key = name if name in PRESETS else f"imagegpt-{name}"
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}, expected one of {sorted(PRESETS)}")
    return cls(**{**PRESETS[key], **overrides})


def config_from_dict(cls, config_dict: dict) -> "ImageGPTConfig":
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
    d["model_type"] = "imagegpt"
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


def config_from_json_file(cls, path) -> "ImageGPTConfig":
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
    check_memory(model_bytes(config), f"a model of this ImageGPTConfig (n_layer={config.n_layer}, "
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
# Loading and saving, pixels and tokens (the palette, PNG files), training and evaluation, the
# command line; main() at the bottom.
# ==================================================================================================

# Imported here rather than at the top, so that the model reads without them (Python allows an
# import anywhere at module level; a linter's E402 is expected).
import argparse
import csv
import errno
import functools
import hashlib
import http.client
import mmap
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib

import numpy as np


# ----------------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------------


# A Hugging Face model directory holds config.json and the weights: model.safetensors (or several
# shards listed in model.safetensors.index.json), or the older pytorch_model.bin (what the openai/imagegpt-*
# repositories hold). ImageGPT's directories also keep the palette: preprocessor_config.json ("clusters",
# Hugging Face's layout) or kmeans_centers.npy (OpenAI's). safetensors is simple enough to read by hand:
#     8 bytes      N, the header's length (unsigned little-endian)
#     N bytes      JSON: {"name": {"dtype": "F32", "shape": [512, 1536], "data_offsets": [begin, end]}, ...}
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
    """(header dict, offset of the data section). Every claim the header makes is checked against the
    file before any tensor is read, so a lying header gives an error, never an out-of-bounds read."""
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
    "imagegpt-small": "openai/imagegpt-small",
    "imagegpt-medium": "openai/imagegpt-medium",
    "imagegpt-large": "openai/imagegpt-large",
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


def resolve_checkpoint(name_or_dir: str) -> str:
    """A local directory as it is; a released name (imagegpt-small, ...) or hub repo id (owner/name)
    downloaded into the cache unless already there: config.json, the weights (model.safetensors, its
    shards, or pytorch_model.bin, whichever the repository has; with them generation_config.json if the
    repository has one) and the palette (preprocessor_config.json)."""
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
            "repository id like openai/imagegpt-small"
        )
    local = os.path.join(cache_dir(), *repo_id.split("/"))
    weight_files = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    try:
        download(hub_url(repo_id, "config.json"), os.path.join(local, "config.json"))
        if not any(os.path.exists(os.path.join(local, f)) for f in weight_files):
            # The first layout the repository has; the openai/imagegpt-* repositories hold pytorch_model.bin.
            if not _download_if_present(repo_id, "model.safetensors", local):
                if _download_if_present(repo_id, "model.safetensors.index.json", local):
                    index = os.path.join(local, "model.safetensors.index.json")
                    for shard in shard_names(index, ".safetensors"):  # every name checked before any download
                        download(hub_url(repo_id, shard), os.path.join(local, shard))
                elif not _download_if_present(repo_id, "pytorch_model.bin", local):
                    raise CheckpointError(f"{repo_id} has no model.safetensors, sharded index or pytorch_model.bin")
            _download_if_present(repo_id, "generation_config.json", local)  # generate()'s defaults, if any
        if not any(os.path.exists(os.path.join(local, f)) for f in PALETTE_FILES):
            _download_if_present(repo_id, "preprocessor_config.json", local)  # the palette, if it has one
    except (urllib.error.URLError, OSError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"could not download {name_or_dir} from {hub_url(repo_id, '')} ({getattr(e, 'reason', e)}). "
            f"To use it offline, put its config.json, model.safetensors and preprocessor_config.json (or "
            f"kmeans_centers.npy) in {local} (or pass a local directory holding them)"
        ) from None
    return local


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
OTHER_HEAD_PREFIXES = ("lm_head.", "score.")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".crossattention.bias", ".crossattention.masked_bias")


def match_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a checkpoint's keys to the model's (checkpoints of the body have no "transformer." prefix,
    checkpoints of a head do), drop what the model does not need, and check the rest: every missing or
    unexpected key and every shape mismatch is listed in one error."""
    expected = model.state_dict()
    is_body = isinstance(model, ImageGPTModel)
    renamed = {}
    for key, tensor in state_dict.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if is_body and key.startswith("transformer."):
            key = key[len("transformer."):]
        elif not is_body and not key.startswith("transformer.") and not key.startswith(OTHER_HEAD_PREFIXES):
            key = "transformer." + key
        renamed[key] = tensor
    missing = [k for k in expected if k not in renamed
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
    (imagegpt-small, imagegpt-medium, imagegpt-large) or a hub repository id (openai/imagegpt-small).
    Weights load in fp32 unless dtype says otherwise ("float16", "bfloat16", or a torch.dtype), onto
    `device` (default CPU). A head the checkpoint has no weights for (say a classifier on top of
    imagegpt-small) starts freshly initialised. The directory's palette, if it has one, becomes
    `model.palette` ((n_colours, 3) in [-1, 1], on the CPU)."""
    dtype = parse_dtype(dtype) or torch.float32
    device = resolve_device(str(device)) if device is not None else None  # a machine without it: one line, now
    directory = resolve_checkpoint(str(name_or_dir))
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{directory} has no config.json")
    config = ImageGPTConfig.from_json_file(config_path)
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
    if any(os.path.exists(os.path.join(directory, name)) for name in PALETTE_FILES):
        model.palette = load_palette(directory)
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


def finish_loading(model: nn.Module, config: ImageGPTConfig, missing_keys: List[str]):
    """What load_state_dict(assign=True) leaves to do: tie the LM head to the token embeddings again (the
    embeddings' parameter was replaced; the head still points at the old one), and give the model's
    initialisation to the modules whose weights the checkpoint did not hold (a fresh head)."""
    tied = config.tie_word_embeddings and hasattr(model, "lm_head")
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    for key in missing_keys:
        if not (tied and key == "lm_head.weight"):
            init_imagegpt_weights(model.get_submodule(key.rpartition(".")[0]), config)


def save_pretrained(model: nn.Module, directory):
    """Write config.json and model.safetensors in the layout Hugging Face transformers loads (and, for the image
    head, generation_config.json, generate()'s defaults), and the palette, when the model has one, beside them
    (preprocessor_config.json and kmeans_centers.npy)."""
    os.makedirs(directory, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    state_dict = check_finite(model.state_dict(), f"save_pretrained({os.fspath(directory)!r})")  # never save what cannot be loaded
    save_safetensors(state_dict, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:  # the heads that generate
        model.generation_config.to_json_file(os.path.join(directory, "generation_config.json"))
    write_json(os.path.join(directory, "config.json"), config)
    if model.palette is not None:
        save_palette(model.palette, directory, n_px=model.config.n_px)


# Every model class loads and saves the same way: one function each, attached to all three classes.
for _cls in HEAD_CLASSES:
    _cls.from_pretrained = classmethod(from_pretrained)
    _cls.save_pretrained = save_pretrained


# ----------------------------------------------------------------------------------------------------
# Pixels and tokens
# ----------------------------------------------------------------------------------------------------


#
# An image becomes tokens in three steps, as Hugging Face's ImageGPTImageProcessor does it:
#   resize to n_px x n_px (bilinear)  ->  normalise to [-1, 1] (x / 127.5 - 1)  ->  nearest palette colour.
# The palette is OpenAI's 512 k-means centres (kmeans_centers.npy, (512, 3) in [-1, 1]), or one fitted to
# your own images with fit_palette(). Tokens go back to pixels by looking the colour up (dequantise).
# PNG files are read and written here with zlib alone, so nothing beyond numpy and torch is needed.
def _as_uint8_image(image, name="image") -> torch.Tensor:
    """One RGB image, (H, W, 3) uint8, as a CPU tensor (a numpy array or a tensor is accepted)."""
    image = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).cpu()
    if image.dtype != torch.uint8:
        raise TypeError(f"{name} must hold uint8 pixels in [0, 255], got dtype {image.dtype}")
    if image.dim() != 3 or image.size(-1) != 3:
        raise _shape_error(name, image.shape, "(H, W, 3): RGB, channels last (convert grey or RGBA with to_rgb)")
    return image


def _as_image_list(images) -> List[torch.Tensor]:
    """A single image (H, W, 3), a batch (B, H, W, 3) or a list of images -> a list of (H, W, 3) uint8 tensors."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images is an empty list; expected at least one (H, W, 3) image")
        return [_as_uint8_image(image, f"images[{i}]") for i, image in enumerate(images)]
    images = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if images.dim() == 4 and images.size(0) == 0:
        raise _shape_error("images", images.shape, "(B, H, W, 3) with B >= 1", "an empty batch")
    if images.dim() == 4:
        return [_as_uint8_image(image, f"images[{i}]") for i, image in enumerate(images)]
    return [_as_uint8_image(images, "images")]


def resize_image(image, n_px: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (n_px, n_px, 3) uint8 with bilinear filtering.

    antialias=True widens the filter when shrinking, as Pillow's BILINEAR (which the reference processor
    uses) does; without it, shrinking a photo to 32 x 32 samples 4 pixels of each block and aliases.
    The result is rounded to uint8, as the reference's Pillow round trip rounds it.
    """
    if not isinstance(n_px, int) or isinstance(n_px, bool) or n_px < 1:
        raise ValueError(f"n_px must be a positive integer, got {n_px!r}")
    image = _as_uint8_image(image)
    x = image.permute(2, 0, 1)[None].float()  # (H, W, 3) -> (1, 3, H, W): interpolate wants channels first
    x = F.interpolate(x, size=(n_px, n_px), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)  # (1, 3, n, n) -> (n, n, 3)


def normalise(image: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [0, 255] -> float32 in [-1, 1], the scale of the palette."""
    return image.float() / 127.5 - 1.0


def nearest_colour(pixels: torch.Tensor, palette: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(N, 3) pixels in [-1, 1], (n_colours, 3) palette -> (N,) LongTensor: the index of the nearest colour (squared
    distance), on the palette's device; N = 0 gives an empty LongTensor.

    Computed in float64 as |x|^2 - 2 x.c + |c|^2, the reference's formula, so that a pixel halfway between
    two colours goes the same way; ties go to the lower index (argmin's first). In chunks of `chunk` pixels,
    so that a large image needs (chunk, n_colours) of memory, not (N, n_colours).
    """
    palette = palette.to(torch.float64)
    c2 = (palette ** 2).sum(dim=1)  # (n_colours,)
    out = []
    for start in range(0, pixels.size(0), chunk):
        x = pixels[start : start + chunk].to(palette.device, torch.float64)  # (n, 3)
        # (n, 1) - (n, n_colours) + (n_colours,) -> (n, n_colours)
        d = (x ** 2).sum(dim=1, keepdim=True) - 2 * x @ palette.T + c2
        out.append(d.argmin(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=palette.device)


def _check_palette(palette) -> torch.Tensor:
    palette = torch.as_tensor(np.asarray(palette) if not isinstance(palette, torch.Tensor) else palette)
    if palette.dim() != 2 or palette.size(1) != 3 or palette.size(0) < 1:
        raise _shape_error("palette", palette.shape, "(K, 3): K colours, RGB")
    palette = palette.to(torch.float32)
    if not torch.isfinite(palette).all():
        raise ValueError("palette holds NaN or infinite values")
    if palette.abs().max() > 1.0 + 1e-3:  # a little slack for centres saved with rounding
        raise ValueError(
            f"palette values must be in [-1, 1] (pixel / 127.5 - 1), but its largest magnitude is "
            f"{float(palette.abs().max()):.4g}; if it holds 0..255 colours, divide by 127.5 and subtract 1"
        )
    return palette


def quantise(images, palette, n_px: Optional[int] = None) -> torch.Tensor:
    """Images -> colour tokens: resize to n_px x n_px (if given), normalise to [-1, 1], replace each pixel by
    the index of the nearest palette colour (nearest_colour), read the pixels in raster order (row by row,
    left to right).

    images: (H, W, 3) uint8 -> (H*W,) tokens; (B, H, W, 3) or a list of B images -> (B, H*W). Images of
    different sizes need n_px (else ValueError); n_px must be a positive int. The palette is checked with
    _check_palette. Prepend SOS (config.sos_token_id) before giving the tokens to a model.
    """
    palette = _check_palette(palette)
    single = not isinstance(images, (list, tuple)) and np.ndim(images) == 3
    image_list = _as_image_list(images)
    if n_px is not None:
        if not isinstance(n_px, int) or isinstance(n_px, bool) or n_px < 1:
            raise ValueError(f"n_px must be a positive integer, got {n_px!r}")
        image_list = [resize_image(image, n_px) for image in image_list]
    shapes = {tuple(image.shape) for image in image_list}
    if len(shapes) > 1:
        raise ValueError(f"the images have different sizes {sorted(shapes)}: pass n_px to resize them all")
    pixels = normalise(torch.stack(image_list))  # (B, H, W, 3) in [-1, 1]
    B, H, W, _ = pixels.shape
    tokens = nearest_colour(pixels.reshape(-1, 3), palette).view(B, H * W)  # (B*H*W,) -> (B, H*W)
    return tokens[0] if single else tokens


def dequantise(tokens, palette) -> torch.Tensor:
    """Colour tokens -> uint8 RGB: (..., n_px * n_px) -> (..., n_px, n_px, 3), each token replaced by its
    palette colour, rint(127.5 * (colour + 1)) clamped to [0, 255]. The palette is checked with
    _check_palette; tokens whose last axis is not a non-zero square number are a ValueError (_shape_error),
    and a token outside [0, n_colours) is refused by _check_indices. Drop SOS (the first column of generate()'s
    output) first."""
    palette = _check_palette(palette)
    tokens = torch.as_tensor(tokens)
    n = tokens.size(-1) if tokens.dim() > 0 else 0
    n_px = math.isqrt(n)
    if tokens.dim() == 0 or n_px * n_px != n or n == 0:
        raise _shape_error("tokens", tokens.shape, "(..., n_px * n_px): one token per pixel of a square image")
    _check_indices("tokens", tokens, palette.size(0), "the number of palette colours", "colour")
    colours = torch.round(127.5 * (palette.to(torch.float64) + 1.0)).clamp(0, 255).to(torch.uint8)  # (n_colours, 3)
    return colours[tokens.cpu().long()].view(*tokens.shape[:-1], n_px, n_px, 3)  # (..., N, 3) -> (..., n, n, 3)


def _kmeans_plus_plus(pixels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre is a pixel drawn with probability proportional to its squared
    distance from the nearest centre so far, so the first centres spread over the colours actually used."""
    n = pixels.size(0)
    centres = [pixels[int(torch.randint(n, (1,), generator=generator))]]
    d2 = ((pixels - centres[0]) ** 2).sum(dim=1)  # (N,): squared distance to the nearest centre
    for _ in range(1, k):
        total = d2.sum()
        if total > 0:
            index = int(torch.multinomial(d2 / total, 1, generator=generator))
        else:  # every pixel sits on a centre: fewer distinct colours than k, so some centres repeat
            index = int(torch.randint(n, (1,), generator=generator))
        centres.append(pixels[index])
        d2 = torch.minimum(d2, ((pixels - pixels[index]) ** 2).sum(dim=1))
    return torch.stack(centres)  # (k, 3)


def fit_palette(images, n_colours: int = 512, n_iter: int = 20, seed: int = 0, n_px: Optional[int] = None,
                max_pixels: int = 200_000) -> torch.Tensor:
    """Fit a palette of n_colours to your own images with k-means (what OpenAI did on ImageNet).

    images: (B, H, W, 3) uint8, or a list of (H, W, 3); resized to n_px first if given (fit at the size you
    will quantise at). At most max_pixels pixels, drawn at random, are used. k-means++ seeding, then n_iter
    rounds of: assign every pixel to its nearest centre, move each centre to the mean of its pixels. A
    centre left with no pixels moves to the pixel farthest from its own centre, so no colour is wasted.
    Deterministic for a given seed. Returns (n_colours, 3) float32 in [-1, 1].
    A model only understands the palette it was trained with: use this one to train a new model.
    """
    if not isinstance(n_colours, int) or isinstance(n_colours, bool) or not 1 <= n_colours <= MAX_COLOURS:
        raise ValueError(f"n_colours must be an integer in [1, {MAX_COLOURS}], got {n_colours!r} (k-means++ picks "
                         "its centres one at a time: a million colours would take days)")
    if not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    image_list = _as_image_list(images)
    if n_px is not None:
        image_list = [resize_image(image, n_px) for image in image_list]
    pixels = torch.cat([normalise(image).reshape(-1, 3) for image in image_list]).double()  # (N, 3)
    generator = torch.Generator().manual_seed(seed)
    if pixels.size(0) > max_pixels:
        pixels = pixels[torch.randperm(pixels.size(0), generator=generator)[:max_pixels]]
    centres = _kmeans_plus_plus(pixels, n_colours, generator)  # (n_colours, 3)
    for _ in range(n_iter):
        centres = kmeans_step(pixels, centres)
    return centres.float()


def kmeans_step(pixels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """One round of k-means (Lloyd's algorithm): pixels (N, 3) and centres (n_colours, 3), both float64 -> the new
    centres (n_colours, 3), float64.

    Assign every pixel to its nearest centre (nearest_colour: squared distance, ties to the lower index),
    then move each centre to the mean of the pixels assigned to it. A centre that got no pixel would stay
    wasted: instead, the empty centres (in index order) move to the pixels worst served by the old centres,
    those with the largest squared distance to their assigned centre, the worst pixel to the first empty
    centre (torch.topk's order). If there are more empty centres than pixels, the extra ones keep their
    mean of nothing, 0."""
    assign = nearest_colour(pixels, centres)  # (N,)
    counts = torch.bincount(assign, minlength=centres.size(0))  # (n_colours,)
    sums = torch.zeros_like(centres).index_add_(0, assign, pixels)  # (n_colours, 3)
    new_centres = sums / counts.clamp(min=1)[:, None].to(sums.dtype)
    empty = (counts == 0).nonzero().flatten()
    if len(empty) > 0:
        error = ((pixels - centres[assign]) ** 2).sum(dim=1)  # (N,): how badly each pixel is served
        farthest = error.topk(min(len(empty), len(error))).indices
        new_centres[empty[: len(farthest)]] = pixels[farthest]
    return new_centres


def load_palette(path) -> torch.Tensor:
    """A palette from kmeans_centers.npy (OpenAI's file), a preprocessor_config.json (Hugging Face keeps
    it there as "clusters"), or a directory holding either. Returns (n_colours, 3) float32 in [-1, 1]."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in PALETTE_FILES:
            if os.path.lexists(os.path.join(path, name)):
                return load_palette(regular_file_in(path, os.path.join(path, name)))
        raise FileNotFoundError(f"no palette in {path}: expected one of {', '.join(PALETTE_FILES)}")
    regular_file_in(None, path)
    try:
        if path.endswith(".npy"):
            return _check_palette(np.load(path, allow_pickle=False))
        with open(path, encoding="utf-8") as f:
            processor = json.load(f)
    except (ValueError, EOFError, RecursionError) as e:  # bad JSON or UTF-8, a damaged or pickled .npy
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a readable palette ({type(e).__name__}: {e})") from None
    if not isinstance(processor, dict) or "clusters" not in processor:
        keys = sorted(processor) if isinstance(processor, dict) else f"none (a JSON {type(processor).__name__})"
        raise ValueError(f"{path} holds no \"clusters\" (the palette); keys are {keys}")
    try:
        clusters = np.array(processor["clusters"], dtype=np.float64)
    except (ValueError, TypeError) as e:  # strings, ragged rows, nested junk
        raise ValueError(f"{path}: \"clusters\" is not a list of [r, g, b] numbers ({e})") from None
    return _check_palette(clusters)


# Where a checkpoint directory keeps its palette, in the order they are looked for.
PALETTE_FILES = ("preprocessor_config.json", "kmeans_centers.npy")


def save_palette(palette, directory, n_px: Optional[int] = None):
    """Write the palette into a checkpoint directory as Hugging Face does (preprocessor_config.json, which
    transformers' ImageGPTImageProcessor reads back) and as OpenAI did (kmeans_centers.npy)."""
    palette = _check_palette(palette)
    processor = {
        "clusters": palette.double().tolist(),
        "do_color_quantize": True,
        "do_normalize": True,
        "do_resize": True,
        "image_processor_type": "ImageGPTImageProcessor",
        "resample": 2,  # Pillow's BILINEAR
    }
    if n_px is not None:
        processor["size"] = {"height": n_px, "width": n_px}
    write_json(os.path.join(directory, "preprocessor_config.json"), processor)
    with _atomic_path(os.path.join(directory, "kmeans_centers.npy")) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, palette.numpy())


# --- PNG files ---------------------------------------------------------------------------------------
#
# A PNG is an 8-byte signature and a list of chunks, each: length (4 bytes, big-endian), type (4 ASCII
# letters), data, CRC-32 of type + data. IHDR gives the size and pixel format; the IDAT chunks, joined,
# are one zlib stream holding every row, each row prefixed by a filter-type byte that says how its
# bytes were predicted from the left pixel, the pixel above, or both (see _unfilter_row).

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel: grey, RGB, grey+alpha, RGBA
MAX_PNG_BYTES = 1 << 28  # 256 MiB of pixels (8192 x 8192 RGB): a larger declared image is refused unread
_RESAVE_HINT = "re-save it as an 8-bit RGB PNG (e.g. `convert in.png -depth 8 PNG24:out.png`, or any image editor)"


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


def _paeth(a: int, b: int, c: int) -> int:
    """PNG's Paeth predictor, on ints: of left (a), above (b) and upper-left (c), the one nearest p = a + b - c
    (by absolute difference). Ties go to a first, then b, then c."""
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter_row(filter_type: int, row: bytes, prev: bytes, bpp: int) -> bytes:
    """Undo one row's filter. Each stored byte is the pixel byte minus a prediction, mod 256, from
    a = the byte bpp to the left, b = the byte above, c = the byte above-left (0 outside the image):
    0 None: nothing; 1 Sub: a; 2 Up: b; 3 Average: floor((a + b) / 2); 4 Paeth: _paeth(a, b, c).
    Sub and Up are whole-row numpy operations; Average and Paeth depend on the byte just rebuilt to the
    left, so they go byte by byte (pure Python: about 1 s per 3 MB of pixels)."""
    if filter_type == 0:
        return row
    x = np.frombuffer(row, np.uint8)
    if filter_type == 1:  # running sum along the row, per channel: (W * bpp,) -> (W, bpp), cumsum over W
        return (x.reshape(-1, bpp).cumsum(axis=0, dtype=np.uint64) & 0xFF).astype(np.uint8).tobytes()
    if filter_type == 2:
        return (x + np.frombuffer(prev, np.uint8)).tobytes()  # uint8 addition wraps mod 256
    out = bytearray(row)
    if filter_type == 3:
        for i in range(len(out)):
            a = out[i - bpp] if i >= bpp else 0
            out[i] = (out[i] + ((a + prev[i]) >> 1)) & 0xFF
        return bytes(out)
    for i in range(len(out)):  # 4, Paeth
        a, c = (out[i - bpp], prev[i - bpp]) if i >= bpp else (0, 0)
        out[i] = (out[i] + _paeth(a, prev[i], c)) & 0xFF
    return bytes(out)


def read_png(path) -> np.ndarray:
    """Read an 8-bit PNG: grey, grey + alpha, RGB or RGBA, any filter types, any number of IDAT chunks,
    every CRC checked. Returns the pixels as stored, (H, W, C) uint8 with C = 1, 2, 3 or 4 (to_rgb()
    makes that RGB). 16-bit, palette and interlaced PNGs are refused with a ValueError saying how to
    convert them."""
    path = regular_file_in(None, os.fspath(path))  # a FIFO would block, /dev/zero never end
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            raise ValueError(f"{path} is not a PNG file (it does not start with the PNG signature); {_RESAVE_HINT}")
        size = os.fstat(f.fileno()).st_size
        if size > 2 * MAX_PNG_BYTES:  # compressed, no image this reader takes comes near it
            raise ValueError(f"{path} is {size:,} bytes, more than a PNG of at most {MAX_PNG_BYTES:,} bytes of "
                             "pixels can be (shrink it first)")
        data = PNG_SIGNATURE + f.read()
    if data[:8] != PNG_SIGNATURE:
        raise ValueError(f"{path} is not a PNG file (it does not start with the PNG signature); {_RESAVE_HINT}")
    header, idat, pos = None, [], 8
    while True:
        if pos + 12 > len(data):
            raise ValueError(f"{path} is truncated: it ends at byte {len(data)} before its IEND chunk")
        length, chunk_type = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        crc_bytes = data[pos + 8 + length : pos + 12 + length]
        if len(body) < length or len(crc_bytes) < 4:
            raise ValueError(f"{path} is truncated inside its {chunk_type!r} chunk at byte {pos}")
        if zlib.crc32(chunk_type + body) != struct.unpack(">I", crc_bytes)[0]:
            raise ValueError(f"{path}: the {chunk_type.decode('latin-1')} chunk at byte {pos} fails its CRC check "
                             "(the file is corrupt)")
        if header is None and chunk_type != b"IHDR":
            raise ValueError(f"{path}: the first chunk is {chunk_type!r}, not IHDR (the file is corrupt)")
        if chunk_type == b"IHDR":
            if len(body) != 13:
                raise ValueError(f"{path}: its IHDR chunk holds {len(body)} bytes, but a PNG header is 13 bytes "
                                 "(the file is corrupt)")
            header = struct.unpack(">IIBBBBB", body)
        elif chunk_type == b"IDAT":
            idat.append(body)
        elif chunk_type == b"IEND":
            break
        elif not chunk_type[0] & 0x20 and chunk_type != b"PLTE":  # upper-case first letter: critical
            raise ValueError(f"{path} has an unknown critical chunk {chunk_type!r}; {_RESAVE_HINT}")
        pos += 12 + length  # ancillary chunks (text, gamma, ...) are skipped

    width, height, bit_depth, colour_type, _, _, interlace = header
    if colour_type == 3:
        raise ValueError(f"{path} is a palette (indexed-colour) PNG, which this reader does not decode; {_RESAVE_HINT}")
    if colour_type not in PNG_CHANNELS:
        raise ValueError(f"{path} has PNG colour type {colour_type}, which does not exist (the file is corrupt)")
    if bit_depth != 8:
        raise ValueError(f"{path} has {bit_depth}-bit samples; only 8-bit PNGs are read; {_RESAVE_HINT}")
    if interlace != 0:
        raise ValueError(f"{path} is an interlaced (Adam7) PNG, which this reader does not decode; {_RESAVE_HINT}")
    channels = PNG_CHANNELS[colour_type]
    stride = width * channels  # bytes per row, without the filter byte
    if width == 0 or height == 0 or height * stride > MAX_PNG_BYTES:
        raise ValueError(f"{path} declares a {width} x {height} image of {channels} channels ({height * stride:,} "
                         f"bytes); images must be at least 1 x 1 and at most {MAX_PNG_BYTES:,} bytes (shrink it first)")
    try:  # never more than the image needs (+1 to notice more): a zip bomb stops here, not after GBs
        inflater = zlib.decompressobj()
        raw = inflater.decompress(b"".join(idat), height * (stride + 1) + 1)
    except zlib.error as e:
        raise ValueError(f"{path}: its image data does not decompress ({e}); the file is corrupt") from None
    if len(raw) != height * (stride + 1):
        holds = f"{len(raw)} bytes" if len(raw) <= height * (stride + 1) else "more bytes than that"
        raise ValueError(f"{path}: the image data holds {holds}, but a {width} x {height} image of "
                         f"{channels} channels needs {height * (stride + 1)} (the file is corrupt)")
    rows, prev = [], bytes(stride)  # the row above the first one is all zeros
    for y in range(height):
        start = y * (stride + 1)
        filter_type = raw[start]
        if filter_type > 4:
            raise ValueError(f"{path}: row {y} has filter type {filter_type}, but PNG defines 0-4 (the file is corrupt)")
        prev = _unfilter_row(filter_type, raw[start + 1 : start + 1 + stride], prev, channels)
        rows.append(prev)
    return np.frombuffer(b"".join(rows), np.uint8).reshape(height, width, channels).copy()


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 from read_png -> (H, W, 3): grey is repeated into R, G and B; an image with alpha is
    composited over white, as a viewer shows it (the colour under a transparent pixel is arbitrary)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[-1]
    colour = image[..., :3] if channels >= 3 else np.repeat(image[..., :1], 3, axis=-1)  # (H, W, 3)
    if channels in (2, 4):
        alpha = image[..., -1:].astype(np.float64) / 255.0  # (H, W, 1)
        colour = np.round(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(colour)


def image_grid(images, columns: int, scale: int = 1, pad: int = 2) -> np.ndarray:
    """N images (N, H, W, 3) uint8 -> one (rows * (scale*H + pad) + pad, ...) image, left to right then top to
    bottom, on white, each image enlarged scale times by repeating pixels (32 x 32 is tiny on a screen)."""
    for name, value in (("columns", columns), ("scale", scale), ("pad", pad)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "pad" else 1):
            raise ValueError(f"image_grid's {name} must be an integer >= {0 if name == 'pad' else 1}, got {value!r}")
    images = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
    N, H, W, _ = images.shape
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, H, W, 3) -> (N, sH, sW, 3)
    H, W = H * scale, W * scale
    rows = math.ceil(N / columns)
    grid = np.full((rows * (H + pad) + pad, columns * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (H + pad), pad + (i % columns) * (W + pad)
        grid[top : top + H, left : left + W] = image
    return grid


def check_grid_memory(count: int, columns: int, n_px: int, scale: int):
    """Refuse, before any sampling, an image_grid (then a PNG) of count n_px x n_px images, enlarged scale times,
    columns to a row, that would not fit in memory_limit()."""
    side = n_px * scale + 2  # an enlarged image and the padding after it
    grid = (math.ceil(count / columns) * side + 2) * (columns * side + 2) * 3  # bytes of RGB
    # The enlarged images, the grid, its rows with filter bytes and their bytes for zlib: about four grids at once.
    check_memory(4 * grid, f"a PNG of {count} images of {n_px * scale:,} x {n_px * scale:,} pixels (--scale {scale})",
                 "use a smaller --scale or fewer --num-samples")


# ----------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------


# `python imagegpt.py train` trains an ImageGPT, from scratch or from pretrained weights (--init), and saves it
# with its palette (save_pretrained). With no options it learns to draw coloured shapes on plain backgrounds,
# 12 x 12 pixels in 16 colours, on a CPU, in about five minutes, writing a grid of samples as it goes.
# Before the loop: the images (drawn on the fly, or read from --data) and a palette fitted to them by k-means
# (fit_palette, Pixels and tokens), which turns each image into n_px * n_px colour tokens.
# One optimiser step (train_step) does, in order:
#     1. the step's batch of images as tokens; the inputs are SOS and every pixel but the last, the targets
#        every pixel, so each input predicts the pixel after it (lm_examples)
#     2. forward and backward
#     3. clip the gradient norm, then an AdamW step at the learning rate of the schedule (warmup, cosine)
# Around it, the loop (train) logs every step to a CSV file, measures the validation loss now and then, and
# samples a PNG grid of images every --sample-every steps. After it, --probe trains a classifier on the
# model's features (ImageGPTForImageClassification) and reports its accuracy on held-out images: a linear
# probe (the body frozen, only the score layer learnt) or fine-tuning (every weight).
# This is nanogpt2.py's Training and evaluation section with only what the images need: no gradient accumulation, mixed
# precision or DDP (nanogpt2.py shows those, and a 12 x 12 model does not need them).
# In this order: the defaults, the Run, the tasks, the loop (train), then what the loop calls.

# --- What to train, unless told otherwise -----------------------------------------------------------------
# Every option left unset takes its value from the dataclass of the task (fill_defaults); `train --help`
# states the same values (default_help, Command line).
@dataclass
class ShapesDefaults:
    """No --data: a new ImageGPT learns to draw the shapes (ShapesTask)."""
    n_px: int = 12  # images are n_px x n_px pixels, n_px * n_px tokens
    n_colours: int = 16  # colours of the palette k-means fits
    n_layer: int = 4  # blocks
    n_head: int = 4  # attention heads
    n_embd: int = 64  # width
    dropout: float = 0.0  # dropout probability
    batch_size: int = 32  # images per step
    lr: float = 3e-3  # peak learning rate
    warmup: int = 50  # steps of linear warmup
    max_steps: int = 3000  # optimiser steps
    time_budget: float = 300.0  # seconds of training; 0: none
    eval_every: int = 200  # steps between validation losses
    sample_every: int = 250  # steps between sample grids
    log_every: int = 25  # steps between progress lines


@dataclass
class DataDefaults:
    """--data PATH: a new ImageGPT learns your images."""
    n_px: int = 16
    n_colours: int = 16
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    max_steps: int = 2000
    time_budget: float = 0.0
    eval_every: int = 200
    sample_every: int = 500
    log_every: int = 25


@dataclass
class FineTuneDefaults:
    """--init NAME_OR_DIR: a checkpoint trained further, on either task; these replace the task's. What the
    checkpoint fixes itself (its vocabulary, its positions) stays its own."""
    lr: float = 1e-4  # gentler: the weights already know a lot
    dropout: Optional[float] = None  # None: the checkpoint's own


@dataclass
class CommonDefaults:
    """Every task."""
    weight_decay: float = 0.1  # AdamW's, on matrices only
    grad_clip: float = 1.0  # largest gradient norm; 0: no clipping
    seed: int = 0  # of the weights, the batches and the samples
    val_fraction: float = 0.1  # --data: the share of images kept for validation and for testing a probe
    eval_batches: int = 8  # batches in a validation loss
    num_samples: int = 16  # images in a sample grid
    position_init: str = "grid"  # a new model's position embeddings: "grid" (rows and columns) or "random"


@dataclass
class LinearProbeDefaults:
    """--probe linear: the score layer alone, fitted by L-BFGS."""
    probe_steps: int = 100  # L-BFGS iterations


@dataclass
class FineTuneProbeDefaults:
    """--probe finetune: every weight of the classifier."""
    probe_steps: int = 300  # AdamW steps
    probe_lr: float = 1e-3  # peak learning rate (for a large pretrained model, try 1e-5)


# How `train --help` names each dataclass when it states an option's default.
TRAIN_DEFAULTS = (("shapes", ShapesDefaults), ("--data", DataDefaults), ("--init", FineTuneDefaults),
                  ("linear", LinearProbeDefaults), ("finetune", FineTuneProbeDefaults), ("every task", CommonDefaults))


# --- The run: which device, and how it speaks --------------------------------------------------------------


@dataclass
class Run:
    """What the training process knows about itself, made once by train_command and passed along: its device,
    and how it prints. (nanogpt2.py's Run also holds the process's rank among torchrun's processes and a
    precision; this file trains in one process, in float32.)"""
    device: torch.device = torch.device("cpu")

    def say(self, *lines):
        """print, at once."""
        print(*lines, flush=True)


# --- The default task: coloured shapes, drawn on the fly ------------------------------------------------

SHAPE_KINDS = ("square", "disc", "triangle", "stripes")  # a shape's kind is its label for --probe
BACKGROUNDS = ((242, 238, 226), (38, 40, 52), (112, 128, 144))  # cream, charcoal, slate grey
SHAPE_COLOURS = ((214, 48, 49), (46, 160, 67), (40, 90, 220), (245, 195, 30), (150, 70, 190))  # red ... purple


def draw_shapes(count: int, n_px: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """count images of one shape each on a plain background -> (images (count, n_px, n_px, 3) uint8, kinds
    (count,), indices into SHAPE_KINDS). Everything random comes from generator, so a seed gives the same images.

    A square, disc or upward triangle is 45-80% of the image across (smaller discs look square once drawn in
    pixels), anywhere it fits whole; stripes (bars 3 or more pixels apart, horizontal or vertical) cross the
    whole image. A pixel takes the shape's colour when its centre is inside the shape: hard edges, no blending,
    so each image holds exactly two colours. Each colour is shifted by up to 12 levels per channel, so the
    palette has a spread of colours to fit, not a handful of exact ones.
    """
    if not isinstance(n_px, int) or n_px < 6:
        raise ValueError(f"the shapes need n_px >= 6 (a smaller image cannot hold a disc), got {n_px!r}")
    n, g = n_px, generator
    kinds = torch.randint(len(SHAPE_KINDS), (count,), generator=g)
    size = n * (0.45 + 0.35 * torch.rand(count, generator=g))  # (count,): side, diameter, or base and height
    centre = size[:, None] / 2 + (n - size[:, None]) * torch.rand(count, 2, generator=g)  # (count, 2): x, y
    ys, xs = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")  # pixel centres (n, n)
    dx = xs - centre[:, 0, None, None]  # (count, n, n): each pixel centre's offset from the shape's centre
    dy = ys - centre[:, 1, None, None]
    half = size[:, None, None] / 2  # (count, 1, 1)
    square = (dx.abs() < half) & (dy.abs() < half)
    disc = dx ** 2 + dy ** 2 < half ** 2
    triangle = (dy.abs() < half) & (dx.abs() < (dy + half) / 2)  # half-width grows from 0 at the apex to half
    period = torch.randint(3, max(3, n // 3) + 1, (count, 1, 1), generator=g)  # pixels from one bar to the next
    phase = torch.randint(0, n, (count, 1, 1), generator=g)
    vertical = torch.rand(count, 1, 1, generator=g) < 0.5
    across = torch.where(vertical, xs, ys).long()  # (count, n, n): the column (vertical bars) or row index
    stripes = (across + phase) % period < (period + 1) // 2
    inside = torch.stack([square, disc, triangle, stripes], dim=1)[torch.arange(count), kinds]  # (count, n, n)
    background = torch.tensor(BACKGROUNDS)[torch.randint(len(BACKGROUNDS), (count,), generator=g)]  # (count, 3)
    colour = torch.tensor(SHAPE_COLOURS)[torch.randint(len(SHAPE_COLOURS), (count,), generator=g)]
    background = (background + torch.randint(-12, 13, (count, 3), generator=g)).clamp(0, 255)
    colour = (colour + torch.randint(-12, 13, (count, 3), generator=g)).clamp(0, 255)
    images = torch.where(inside[..., None], colour[:, None, None, :], background[:, None, None, :])
    return images.to(torch.uint8), kinds  # (count, n, n, 3)


class ShapesTask:
    """The default task: draw_shapes images, new ones for every batch, so the model never sees one twice and
    cannot overfit. Two fixed sets, the same whatever --seed, are drawn once: 2,048 images to fit the palette
    on (and to train a probe on), and 512 held out for the validation loss (and to test a probe). A shape's
    kind is its label, so --probe needs no --labels here."""

    def __init__(self, n_px: int):
        self.n_px = n_px
        self.label_names = list(SHAPE_KINDS)
        # Seeds of their own (ImageGPT was published on 17 June 2020), apart from the batches' --seed.
        self.fit_images, self.fit_kinds = draw_shapes(2048, n_px, torch.Generator().manual_seed(2020))
        self.held_out, self.held_out_kinds = draw_shapes(512, n_px, torch.Generator().manual_seed(617))
        self.palette = None

    def describe(self) -> str:
        return (f"coloured shapes ({', '.join(SHAPE_KINDS)}) on plain backgrounds, {self.n_px} x {self.n_px} "
                f"pixels, drawn on the fly; {len(self.held_out)} held out")

    def palette_images(self) -> torch.Tensor:
        return self.fit_images

    def set_palette(self, palette: torch.Tensor):
        self.palette = palette

    def batch(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """count new images as tokens, (count, n_px * n_px)."""
        return quantise(draw_shapes(count, self.n_px, generator)[0], self.palette)

    def validation_batches(self, batch_size: int, max_batches: int) -> List[torch.Tensor]:
        return list(quantise(self.held_out, self.palette).split(batch_size)[:max_batches])

    def labelled(self):
        """(train tokens, train labels, test tokens, test labels) for a probe: the kind of each shape."""
        return (quantise(self.fit_images, self.palette), self.fit_kinds,
                quantise(self.held_out, self.palette), self.held_out_kinds)

    def show(self, count: int) -> torch.Tensor:
        """count held-out images as the model sees them (in the palette's colours), (count, n, n, 3)."""
        return dequantise(quantise(self.held_out[:count], self.palette), self.palette)


# --- Your images: a folder of PNGs or an .npy array ------------------------------------------------------

DATA_HINT = "give a folder of .png files or an .npy array of shape (N, H, W, 3), uint8"


def read_images(path: str, n_px: int) -> Tuple[torch.Tensor, List[str]]:
    """--data -> (images (N, n_px, n_px, 3) uint8, names). A folder: every .png in it (grey, RGB or RGBA,
    the Pixels and tokens section's reader), in sorted name order, the names being the file names. An .npy file: an (N,
    H, W, 3) uint8 array, names None. Each image is resized to n_px x n_px as the processor does (resize_image)."""
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
        if not names:
            raise ValueError(f"--data {path}: the folder holds no .png files; {DATA_HINT}")
        files = [regular_file_in(path, os.path.join(path, f)) for f in names]  # no link out, no FIFO
        return torch.stack([resize_image(to_rgb(read_png(f)), n_px) for f in files]), names
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: no such file or folder")
    if not path.lower().endswith(".npy"):
        raise ValueError(f"--data {path} is neither a folder nor an .npy file; {DATA_HINT}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"--data {path} is not a readable .npy array ({e}); {DATA_HINT}") from None
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"--data {path} holds an array of shape {array.shape}, expected (N, H, W, 3): N RGB images, "
                         "channels last")
    if array.dtype != np.uint8:
        raise ValueError(f"--data {path} holds {array.dtype} values, expected uint8 pixels in [0, 255] (from floats in "
                         "[0, 1]: np.save(path, (x * 255).round().astype(np.uint8)))")
    if array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
        raise ValueError(f"--data {path} holds no pixels: its shape is {array.shape}")
    if array.shape[1:3] == (n_px, n_px):
        return torch.from_numpy(np.array(array)), None
    return torch.stack([resize_image(np.array(image), n_px) for image in array]), None  # np.array: a writable copy


def read_labels(path: str, names: Optional[List[str]], count: int) -> Tuple[torch.Tensor, List[str]]:
    """--labels -> (labels (count,) long, the class names). An .npy file of count integers >= 0 (the names
    are the numbers); or a CSV file with one row per image, in the order of the images (for a folder of
    PNGs: sorted by name), whose last column is the label, a number or a name (names are numbered in sorted
    order). A first row labelled "label" or "class" is a header. For a folder, rows of two or more columns
    are matched to the images by the file name in their first column, in any order."""
    if not os.path.isfile(path):
        raise ValueError(f"--labels {path}: no such file")
    if path.lower().endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise ValueError(f"--labels {path} is not a readable .npy array ({e})") from None
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"--labels {path} holds {array.dtype} values of shape {array.shape}, expected a 1-D array "
                             "of integer class ids")
        raw = [int(v) for v in array]
    else:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = [[cell.strip() for cell in row] for row in csv.reader(f) if any(cell.strip() for cell in row)]
        except (UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f"--labels {path} is not a CSV file of UTF-8 text ({e})") from None
        if rows and rows[0][-1].lower() in ("label", "labels", "class"):
            rows = rows[1:]
        if names is not None and rows and all(len(row) >= 2 for row in rows):
            by_name = {row[0]: row[-1] for row in rows}
            missing = [name for name in names if name not in by_name]
            if missing:
                raise ValueError(f"--labels {path} names files in its first column, but has no row for {missing[:3]}"
                                 f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of the {count} images)")
            rows = [[by_name[name]] for name in names]
        raw = [row[-1] for row in rows]
        if all(re.fullmatch(r"\d+", label) for label in raw):
            raw = [int(label) for label in raw]
    if len(raw) != count:
        raise ValueError(f"--labels {path} holds {len(raw)} labels, but --data has {count} images: give one label per "
                         "image, in the same order")
    if all(isinstance(label, int) for label in raw):
        if min(raw) < 0:
            raise ValueError(f"--labels {path} holds the class id {min(raw)}; class ids must be >= 0")
        most = max(count, 1000)  # a classifier has one output per id up to the largest
        if max(raw) >= most:
            raise ValueError(f"--labels {path} holds the class id {max(raw)}; number the classes 0, 1, 2, ... "
                             f"(ids must be below {most:,}: a classifier gets one output per id up to the largest)")
        classes = [str(i) for i in range(max(raw) + 1)]
        labels = torch.tensor(raw, dtype=torch.long)
    else:
        classes = sorted(set(map(str, raw)))
        labels = torch.tensor([classes.index(str(label)) for label in raw], dtype=torch.long)
    if len(set(labels.tolist())) < 2:
        raise ValueError(f"--labels {path} holds a single class ({classes[int(labels[0])]!r}): a classifier needs "
                         "at least two")
    return labels, classes


class ImageData:
    """Your images (--data) in memory, and their labels (--labels) if given. A seeded shuffle sets
    val_fraction of them aside: never trained on, by the generative model or by a probe, they measure the
    validation loss and test the probe. Once the palette is known every image is quantised, once."""

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor], label_names, val_fraction: float,
                 seed: int, source: str):
        N = images.size(0)
        n_val = max(1, round(N * val_fraction))
        if N - n_val < 1:
            raise ValueError(f"--data {source} holds {N} image{'s' * (N != 1)}: at least 2 are needed, one to train "
                             f"on and one to validate on (--val-fraction {val_fraction})")
        order = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        self.train_index, self.val_index = order[: N - n_val], order[N - n_val:]
        self.images, self.labels, self.label_names, self.source = images, labels, label_names, source
        self.n_px = images.size(1)
        self.tokens = None
        self.palette = None

    def describe(self) -> str:
        labels = f", {len(self.label_names)} classes" if self.labels is not None else ""
        return (f"{len(self.images):,} images{labels}, resized to {self.n_px} x {self.n_px}: {len(self.train_index):,} "
                f"for training, {len(self.val_index):,} for validation")

    def palette_images(self) -> torch.Tensor:
        return self.images[self.train_index]

    def set_palette(self, palette: torch.Tensor):
        self.palette = palette
        # int16 holds any palette of up to 32,767 colours in a quarter of int64's memory
        self.tokens = torch.cat([quantise(chunk, palette) for chunk in self.images.split(4096)]).to(torch.int16)

    def batch(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """count training images, drawn at random (with replacement), as tokens (count, n_px * n_px)."""
        pick = self.train_index[torch.randint(len(self.train_index), (count,), generator=generator)]
        return self.tokens[pick].long()

    def validation_batches(self, batch_size: int, max_batches: int) -> List[torch.Tensor]:
        return [self.tokens[index].long() for index in self.val_index.split(batch_size)[:max_batches]]

    def labelled(self):
        if self.labels is None:
            raise ValueError("--probe needs --labels with --data: a .npy of class ids or a CSV, one per image")
        return (self.tokens[self.train_index].long(), self.labels[self.train_index],
                self.tokens[self.val_index].long(), self.labels[self.val_index])

    def show(self, count: int) -> torch.Tensor:
        return dequantise(self.tokens[self.val_index[:count]].long(), self.palette)


def lm_examples(tokens: torch.Tensor, sos: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images as tokens (B, N) -> inputs (B, N) and targets (B, N) for next-pixel prediction: the inputs are SOS
    and the first N - 1 pixels, the targets the N pixels, so input t predicts pixel t. (The last pixel is never
    an input: nothing comes after it. That is why n_positions = N suffices, and why generate() can draw
    SOS + N pixels.)"""
    sos_column = torch.full((tokens.size(0), 1), sos, dtype=torch.long, device=tokens.device)
    return torch.cat([sos_column, tokens[:, :-1]], dim=1), tokens  # (B, 1 + N - 1), (B, N)


# --- The training loop ----------------------------------------------------------------------------------


def train(args, task, init, run: Run, state=None) -> dict:
    """The training loop, then the probe if asked for."""
    palette, palette_how = choose_palette(args, task, init) if state is None else \
        (state["palette"], "the resumed run's")
    task.set_palette(palette)
    torch.manual_seed(args.seed)
    model = build_model(args, palette, task.n_px, init, state).to(run.device)
    # A step's fp32 logits with their gradient, and the sample grids' key/value cache: refused here, with the
    # figure, rather than by the machine in the first step.
    check_memory(8 * args.batch_size * task.n_px ** 2 * model.config.vocab_size, f"a training step of --batch-size "
                 f"{args.batch_size} images of {task.n_px} x {task.n_px} pixels", "use a smaller --batch-size")
    check_generation_memory(model, args.num_samples, model.config.n_positions)
    set_cpu_threads(args, model, run.device)
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, run.device.type)
    data_rng = torch.Generator().manual_seed(args.seed)  # draws every batch
    step, elapsed_before = 0, 0.0
    if state is not None:  # put back what the weights alone do not hold
        with resuming_from(os.path.join(args.out, "training_state.pt")):
            optimizer.load_state_dict(state["optimizer"])
            data_rng.set_state(state["data_rng"])
            torch.set_rng_state(state["rng"])
        step, elapsed_before = state["step"], state["elapsed"]
    saved = step if state is not None else None  # the step of the checkpoint in args.out, if there is one
    val_batches = task.validation_batches(args.batch_size, args.eval_batches)
    scale = max(1, 96 // task.n_px)  # samples drawn about 96 pixels across
    write_png(os.path.join(args.out, "data.png"), image_grid(task.show(args.num_samples), min(args.num_samples, 8),
                                                             scale=scale))
    run.say(describe_run(args, task, model, palette_how, run, step))

    log = TrainingLog(args.out, step)
    progress_lines = TrainingProgress(args, step)
    pixels = args.batch_size * task.n_px ** 2  # targets per step
    start, first_step = time.time(), step
    loss, val, grids, stopped = float("nan"), None, [], None
    stop = StopRequest()
    try:
        while True:
            elapsed = elapsed_before + time.time() - start
            # How far through its budget the run is: in steps, or in time, whichever is further.
            progress = max(step / max(args.max_steps, 1), elapsed / args.time_budget if args.time_budget else 0.0)
            if stopped is not None or progress >= 1 or args.max_steps == 0:
                break
            lr = learning_rate(step, progress, args.lr, args.warmup)
            step_start = time.time()
            loss, grad_norm = train_step(model, optimizer, task.batch(args.batch_size, data_rng), lr, args.grad_clip)
            step += 1
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the weights are NaN now: save nothing more
                stopped = "diverged"
                break
            pixels_per_s = pixels / (time.time() - step_start)
            val = validation_loss(model, val_batches) if args.eval_every and step % args.eval_every == 0 else None
            stopped = "interrupted" if stop.requested else None
            elapsed = elapsed_before + time.time() - start
            log.write(step, loss, lr, grad_norm, pixels_per_s, elapsed, val)
            if step % args.log_every == 0 or val is not None or step == first_step + 1:
                run.say(progress_lines.line(step, loss, lr, val, elapsed, pixels))
            if args.sample_every and step % args.sample_every == 0 and stopped is None:
                grids.append(sample_grid(args, model, palette, step, scale, run))
            if args.save_every and step % args.save_every == 0:
                saved = save_checkpoint(args, model, optimizer, data_rng, step, elapsed, saved)
    finally:
        stop.restore()

    if stopped == "diverged":
        log.close()
        raise diverged_error(step, loss, grad_norm, args, saved)

    elapsed = elapsed_before + time.time() - start
    summary = dict(step=step, loss=loss, val_loss=val, elapsed=elapsed, out=args.out, samples=grids, stopped=stopped,
                   pixels_per_s=(step - first_step) * pixels / max(time.time() - start, 1e-9))
    if stopped == "interrupted":
        save_checkpoint(args, model, optimizer, data_rng, step, elapsed, saved)
        log.close()
        run.say(f"interrupted: saved a checkpoint at step {step} to {args.out}; continue with:\n"
            f"  python imagegpt.py train --resume {shlex.quote(args.out)}")
        return summary
    if step > first_step:
        if val is None:  # the last step measured none
            summary["val_loss"] = validation_loss(model, val_batches)
        if not grids or not grids[-1].endswith(f"_{step}.png"):
            grids.append(sample_grid(args, model, palette, step, scale, run))
    log.close()
    model.eval()
    if step > 0:  # --max-steps 0 (a probe of --init as it is) has nothing new to save
        save_checkpoint(args, model, optimizer, data_rng, step, elapsed, saved)
    report_run(args, summary, run.say)
    if args.probe is not None:
        summary.update(train_classifier(args, model, task, run))
    return summary


# --- Before the loop: the options, the task, the palette, the folder ------------------------------------


def train_command(args) -> dict:
    """`python imagegpt.py train ...`. Returns a summary (for tests and scripts)."""
    state = load_checkpoint(args) if args.resume else None
    fill_defaults(args)
    device = resolve_device(args.device)
    init = ImageGPTForCausalImageModeling.from_pretrained(args.init) if args.init is not None and state is None \
        else None
    n_px = args.n_px if state is None else ImageGPTConfig.from_dict(state["config"]).n_px
    if init is not None:
        if n_px is not None and n_px != init.config.n_px:
            raise ValueError(f"--n-px {n_px}: --init {args.init} draws {init.config.n_px} x {init.config.n_px} images; "
                             "drop --n-px")
        n_px = init.config.n_px
        if args.data is None and n_px < 6:
            raise ValueError(f"--init {args.init} draws {n_px} x {n_px} images, too small for the shapes (n_px >= 6)")
    task = prepare_task(args, n_px)
    with RunFolder(args.out, args.overwrite, state is not None):
        return train(args, task, init, Run(device), state)


def fill_defaults(args):
    """Options left unset get the defaults of the task (the dataclasses above); then every option is checked,
    before any work, that argparse could not check alone (its integer_option and float_option types): options
    that go together, the ranges of the fractions and rates, and the size of a new model."""
    given = {name for name, value in vars(args).items() if value is not None}
    if args.labels is not None and args.probe is None:
        args.probe = "linear"  # --labels alone: the cheaper probe
    tasks = [CommonDefaults, ShapesDefaults if args.data is None else DataDefaults]
    if args.init is not None:
        tasks.append(FineTuneDefaults)  # after the task: its values replace the task's
        new_model_only = sorted(given & {"n_layer", "n_head", "n_embd", "n_colours", "position_init"})
        if new_model_only:
            raise ValueError(f"--{new_model_only[0].replace('_', '-')} shapes a new model; --init {args.init} brings "
                             "its own (drop one of them)")
    if args.probe is not None:
        tasks.append(LinearProbeDefaults if args.probe == "linear" else FineTuneProbeDefaults)
    defaults = {option.name: option.default for task in tasks for option in fields(task)}
    if args.init is not None:
        defaults.update(n_px=None, n_colours=None)  # the checkpoint's own
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.save_every is None:
        args.save_every = args.eval_every
    if args.out is None:
        stem = os.path.splitext(os.path.basename(os.path.normpath(args.data)))[0] if args.data else "shapes"
        args.out = os.path.join("out", f"imagegpt-{stem}")
    if args.labels is not None and args.data is None:
        raise ValueError("--labels labels the images of --data; the shapes bring their own labels (their kind), so "
                         "use --probe alone")
    if args.probe is not None and args.data is not None and args.labels is None:
        raise ValueError("--probe needs --labels with --data: a .npy of class ids or a CSV, one per image (only the "
                         "shapes bring their own labels)")
    if args.palette is not None and "n_colours" in given:
        raise ValueError("--palette brings its own colours; drop --n-colours")
    if args.palette is not None and not os.path.exists(args.palette):
        raise ValueError(f"--palette {args.palette}: no such file")
    if args.data is None and args.n_px is not None and args.n_px < 6:
        raise ValueError(f"--n-px must be at least 6 for the shapes (a smaller image cannot hold a disc), "
                         f"got {args.n_px}")
    for name in ("lr", "time_budget", "weight_decay", "grad_clip"):
        if getattr(args, name) < 0 or (name == "lr" and args.lr == 0):
            raise ValueError(f"--{name.replace('_', '-')} must be {'> 0' if name == 'lr' else '>= 0'}, "
                             f"got {getattr(args, name)}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout is a probability in [0, 1), got {args.dropout}")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.probe_lr is not None and args.probe != "finetune":
        raise ValueError("--probe-lr is the learning rate of --probe finetune (a linear probe is fitted by L-BFGS)")
    if args.probe == "finetune" and not args.probe_lr > 0:
        raise ValueError(f"--probe-lr must be > 0, got {args.probe_lr}")
    if args.max_steps == 0 and args.probe is None:
        raise ValueError("--max-steps 0 trains nothing; with it, --probe (to probe an --init model) is the only work")
    if args.init is None and args.resume is None:  # a new model: its size, before any image is drawn or read
        try:
            ImageGPTConfig(vocab_size=args.n_colours + 1, n_positions=args.n_px ** 2, n_embd=args.n_embd,
                           n_layer=args.n_layer, n_head=args.n_head)
        except ValueError as e:
            raise ValueError(f"--n-px {args.n_px}, --n-colours {args.n_colours}, --n-layer {args.n_layer}, --n-embd "
                             f"{args.n_embd}, --n-head {args.n_head}: {e}") from None


def prepare_task(args, n_px: int):
    """The shapes, or --data (with --labels) read and resized to n_px: a task with palette_images(),
    set_palette(), batch(), validation_batches(), labelled() and show()."""
    if args.data is None:
        return ShapesTask(n_px)
    images, names = read_images(args.data, n_px)
    labels, label_names = read_labels(args.labels, names, len(images)) if args.labels is not None else (None, None)
    return ImageData(images, labels, label_names, args.val_fraction, args.seed, args.data)


def choose_palette(args, task, init) -> Tuple[torch.Tensor, str]:
    """--palette, else --init's own, else k-means on the task's training images. Returns (palette, how)."""
    if args.palette is not None:
        palette, how = load_palette(args.palette), f"from {args.palette}"
    elif init is not None:
        if init.palette is None:
            raise ValueError(f"--init {args.init} comes without a palette (preprocessor_config.json or "
                             "kmeans_centers.npy); pass --palette PATH, the palette it was trained with")
        palette, how = init.palette, f"from {args.init}"
    else:
        images = task.palette_images()
        palette = fit_palette(images, n_colours=args.n_colours, seed=args.seed)
        how = f"fitted by k-means to {len(images):,} training images"
    if palette.size(0) < 2:  # every pixel the same token: the loss is 0 from the start, and nothing is learnt
        raise ValueError(f"--palette {args.palette} has {palette.size(0)} colour; a model needs at least 2 to learn "
                         "anything")
    if init is not None and palette.size(0) != init.config.n_colours:
        raise ValueError(f"--palette {args.palette} has {palette.size(0)} colours, but --init {args.init} predicts "
                         f"{init.config.n_colours}; use the palette it was trained with")
    return palette, how


# --- The model, the optimiser, the learning-rate schedule ----------------------------------------------


def build_model(args, palette: torch.Tensor, n_px: int, init=None, state=None) -> ImageGPTForCausalImageModeling:
    """An ImageGPT with its next-pixel head: rebuilt from a training checkpoint, --init's (already loaded), or a
    new one of palette's colours."""
    if state is not None:  # resuming: the checkpoint's own config and weights
        with resuming_from(os.path.join(args.out, "training_state.pt")):
            model = ImageGPTForCausalImageModeling(ImageGPTConfig.from_dict(state["config"]))
            model.load_state_dict(state["model"])
    elif init is not None:
        model = init
        if args.dropout is not None:  # the dropout layers were built from the config: change both
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = args.dropout
            model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = args.dropout
    else:
        config = ImageGPTConfig(
            vocab_size=palette.size(0) + 1, n_positions=n_px * n_px, n_embd=args.n_embd, n_layer=args.n_layer,
            n_head=args.n_head, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        )
        model = ImageGPTForCausalImageModeling(config)
        if args.position_init == "grid":
            init_grid_positions(model.transformer.wpe, n_px, config.initializer_range)
    model.palette = palette  # saved beside the weights, so the checkpoint samples and completes on its own
    return model.train()  # from_pretrained returns a model in eval mode: dropout back on


@torch.no_grad()
def init_grid_positions(wpe: nn.Embedding, n_px: int, std: float = 0.02):
    """Start the position embeddings (n_px * n_px, C) as sines and cosines of each pixel's row (the first half
    of the channels) and column (the second half), at C / 4 frequencies from pi (a pixel and its neighbour
    opposite) down to pi / n_px (half a wave across the image).

    ImageGPT's position embeddings start random, like GPT-2's: nothing tells the model that pixel 13 of a
    12 x 12 image sits under pixel 1, and a large model learns the image's rows and columns from millions of
    images. A small one, trained for minutes, spends most of them on that. Started from the grid, the model
    knows from the first step which pixels are neighbours (seen on the shapes, 5 minutes each: 0.128 nats/pixel
    against 0.153 from random positions). The embeddings still train freely, and the checkpoint is an ordinary
    ImageGPT: only the starting point differs. Each channel keeps about the usual spread, std."""
    C = wpe.embedding_dim
    pixel = torch.arange(n_px * n_px)
    row, col = (pixel // n_px).float(), (pixel % n_px).float()  # (N,) each
    k = C // 4
    freqs = math.pi / n_px ** (torch.arange(k) / max(k - 1, 1))  # (k,): pi ... pi / n_px
    waves = [f(x[:, None] * freqs) for x in (row, col) for f in (torch.sin, torch.cos)]  # 4 x (N, k)
    wpe.weight.normal_(std=std)  # channels beyond 4k (when C is not a multiple of 4) stay random
    wpe.weight[:, : 4 * k] = torch.cat(waves, dim=1) * std * math.sqrt(2)  # (N, 4k): sin and cos have RMS 1/sqrt(2)


def configure_optimizer(model, lr: float, weight_decay: float, device_type: str):
    """AdamW with weight decay on the matrices only (linear layers, embeddings). Decay pulls weights toward
    zero, which keeps matrices small and the model smooth; on biases and layer-norm gains it would only
    fight the offsets and scales they exist to set."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel updates all parameters, on CPUs as on GPUs, instead of a dozen elementwise passes.
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


def learning_rate(step: int, progress: float, peak: float, warmup_steps: int) -> float:
    """A linear warmup over the first warmup_steps (Adam's first moment estimates are noisy, and full-size
    steps on them can wreck the initialisation), times a cosine from peak down to peak / 10 as progress,
    the fraction of the run's budget spent, goes from 0 to 1."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    cosine = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return peak * warmup * cosine


# --- One optimiser step, and the validation loss ---------------------------------------------------------


def train_step(model, optimizer, tokens: torch.Tensor, lr: float, grad_clip: float) -> Tuple[float, float]:
    """One optimiser step on a batch of images as tokens (B, N). Returns the mean loss per pixel (nats) and
    the gradient's norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = model.lm_head.weight.device
    x, y = lm_examples(tokens.to(device), model.config.sos_token_id)  # (B, N) each
    logits = model(x, use_cache=False).logits  # (B, N, n_colours)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), grad_norm.item()


@torch.no_grad()
def validation_loss(model, batches: List[torch.Tensor]) -> float:
    """Mean loss per pixel (nats) over fixed validation images, each batch (b, N) tokens."""
    model.eval()  # no dropout
    device = model.lm_head.weight.device
    total, count = 0.0, 0
    for tokens in batches:
        x, y = lm_examples(tokens.to(device), model.config.sos_token_id)
        logits = model(x, use_cache=False).logits  # (b, N, n_colours)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


# --- The device, its threads ----------------------------------------------------------------------------


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


# --- Samples, the log ---------------------------------------------------------------------------------------


def write_samples(model, palette: torch.Tensor, path: str, count: int, seed: int, scale: int):
    """count images drawn by the model from SOS (temperature 1), as one PNG grid of up to 8 columns. The same
    seed every time, so grids from successive steps show the same random draws, as the model learns."""
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = model.generate(None, num_samples=count, do_sample=True, top_k=0, generator=generator)  # (count, 1 + N)
    images = dequantise(tokens[:, 1:].cpu(), palette)  # drop SOS: (count, n, n, 3)
    write_png(path, image_grid(images, columns=min(count, 8), scale=scale))


def sample_grid(args, model, palette, step: int, scale: int, run: Run) -> str:
    """out/samples_step_STEP.png, and the same grid as out/samples.png (the latest: keep it open in a viewer)."""
    path = os.path.join(args.out, f"samples_step_{step}.png")
    write_samples(model, palette, path, args.num_samples, args.seed, scale)
    with open(path, "rb") as f:
        _write_atomically(os.path.join(args.out, "samples.png"), f.read())
    run.say(f"  wrote {path}")
    return path


class TrainingLog:
    """Every step to out/log.csv: step, loss, lr, gradient norm before clipping, pixels/s, elapsed, and the
    validation loss where measured. A resumed run keeps the rows up to its checkpoint and appends."""

    COLUMNS = ["step", "loss", "lr", "grad_norm", "pixels_per_s", "elapsed_s", "val_loss"]

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

    def write(self, step, loss, lr, grad_norm, pixels_per_s, elapsed, val_loss=None):
        self.writer.writerow(dict(step=step, loss=f"{loss:.6f}", lr=f"{lr:.6g}", grad_norm=f"{grad_norm:.6g}",
                                  pixels_per_s=f"{pixels_per_s:.0f}", elapsed_s=f"{elapsed:.2f}",
                                  val_loss="" if val_loss is None else f"{val_loss:.6f}"))
        self.file.flush()  # each line reaches the file at once: a run killed outright keeps its log

    def close(self):
        self.file.close()


# --- Checkpoints: what --resume needs ---------------------------------------------------------------------

# Options a resumed run may change; every other option comes from the checkpoint, so the run goes on
# exactly as it would have. Those of RESUME_MAY_EXTEND keep the checkpoint's value unless given: a larger
# --max-steps or --time-budget extends a finished or cut run, the cosine schedule then laid over the new
# budget (the learning rate rises back to where that longer schedule is).
RESUME_MAY_CHANGE = ("resume", "out", "device", "log_every", "save_every", "sample_every", "overwrite")
RESUME_MAY_EXTEND = ("max_steps", "time_budget", "threads")


def save_checkpoint(args, model, optimizer, data_rng, step: int, elapsed: float, saved: Optional[int]) -> int:
    """out/config.json + model.safetensors + the palette (save_pretrained: what from_pretrained loads) and
    out/training_state.pt, which holds everything an exact resume needs in one file written atomically:
    weights, palette, optimiser moments, step, time spent, the data generator and the RNG state. Its
    SHA-256 goes to training_state.pt.sha256, checked by --resume. log.csv is synced to the disk first, so
    that its rows up to the checkpoint outlast a power cut as the checkpoint does. Returns step, the
    checkpoint's; a file that cannot be written (a full disk) stops the run with one line, every file of the
    checkpoint of step `saved` as it was (see save_training_state's also)."""
    state = dict(step=step, elapsed=elapsed, args=vars(args), config=model.config.to_dict(), palette=model.palette,
                 model=model.state_dict(), optimizer=optimizer.state_dict(), data_rng=data_rng.get_state(),
                 rng=torch.get_rng_state())
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


def load_checkpoint(args) -> dict:
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
        if given is not None and given != saved:
            print(f"note: --{name.replace('_', '-')} {given} ignored: the resumed run keeps {saved}", file=sys.stderr)
        setattr(args, name, saved)
    args.out = args.resume
    return state


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


def describe_run(args, task, model, palette_how: str, run: Run, resumed_at: int = 0) -> str:
    """What is about to happen, in five lines."""
    cfg = model.config
    start = f"resumed at step {resumed_at}" if resumed_at else f"from {args.init}" if args.init else "from scratch"
    budget = f"{args.max_steps} steps" + (f" or {args.time_budget:g} s, whichever ends first" if args.time_budget else "")
    return "\n".join([
        f"task: {task.describe() if args.data is None else args.data + ': ' + task.describe()}",
        f"palette: {cfg.n_colours} colours, {palette_how}; each image is {cfg.n_positions} colour tokens",
        f"model: ImageGPT, {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads: "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {start}",
        f"training: {budget}; batch {args.batch_size} images; AdamW lr {args.lr:g}, warmup {args.warmup} steps, "
        f"cosine to {args.lr / 10:g}; float32 on {run.device.type}",
        f"saving to {args.out} (data.png: what the model sees; samples_step_N.png "
        + (f"every {args.sample_every} steps" if args.sample_every else "at the end") + "; log.csv: every step)",
    ])


class TrainingProgress:
    """The loop's progress lines: step, loss, learning rate, speed since the previous line, time spent and
    time left. It keeps the time and step of its last line, to measure the speed in between."""

    def __init__(self, args, step: int):
        self.args, self.last_line = args, (time.time(), step)

    def line(self, step: int, loss: float, lr: float, val: Optional[float], elapsed: float,
             pixels_per_step: int) -> str:
        args, (since, since_step) = self.args, self.last_line
        self.last_line = (time.time(), step)
        seconds_per_step = (time.time() - since) / max(step - since_step, 1)
        left = (args.max_steps - step) * seconds_per_step
        if args.time_budget:
            left = min(left, args.time_budget - elapsed)
        return (f"step {step:>{len(str(args.max_steps))}}/{args.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{pixels_per_step / seconds_per_step:,.0f} px/s | {format_time(elapsed)} elapsed, "
                f"{format_time(max(left, 0))} left" + (f" | val loss {val:.4f}" if val is not None else ""))


def report_run(args, summary, say):
    """The end of the generative training: why it stopped, its losses, the samples and where it was saved."""
    step, val = summary["step"], summary["val_loss"]
    if step == 0:
        say(f"no generative training (--max-steps 0): the probe reads {args.init or 'a new model'} as it is")
        return
    why = "all steps done" if step >= args.max_steps else \
        f"the time budget ran out; --resume {args.out} --time-budget {2 * args.time_budget:g} trains on"
    say(f"done: step {step} of {args.max_steps} in {format_time(summary['elapsed'])} ({why}), "
        f"{summary['pixels_per_s']:,.0f} pixels/s; loss {summary['loss']:.4f} nats/pixel"
        + (f", validation loss {val:.4f} ({val / math.log(2):.3f} bits/pixel)" if val is not None else ""))
    if summary["samples"]:
        say(f"samples: {summary['samples'][-1]} (the last grid; every grid: {args.out}/samples_step_*.png)")
    say(f"saved to {args.out}: config.json + model.safetensors + the palette (preprocessor_config.json, "
        f"kmeans_centers.npy); draw more with: python imagegpt.py sample --model {args.out}")


# --- Evaluation: a linear probe or a fine-tuned classifier -------------------------------------------------
# ImageGPT's paper measured what the model learnt by classifying images from its features: the hidden
# states, averaged over every pixel, are what ImageGPTForImageClassification's score layer reads. A linear
# probe learns that layer alone, the body frozen (a logistic regression on the features, fitted by L-BFGS);
# fine-tuning trains every weight on the labels. The classifier's inputs are the n_px * n_px pixels alone, as
# Hugging Face's image processor makes them (no SOS), so the saved classifier works in transformers too.


@torch.no_grad()
def image_features(classifier, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, n_px * n_px) tokens -> (N, C): the last hidden states averaged over the pixels, the score layer's input."""
    classifier.eval()
    device = classifier.score.weight.device
    return torch.cat([classifier.transformer(t.to(device)).last_hidden_state.mean(dim=1).float()  # (b, T, C) -> (b, C)
                      for t in tokens.split(batch_size)])


def fit_linear_probe(classifier, tokens, labels, steps: int, weight_decay: float = 1e-3):
    """Learn the score layer alone by L-BFGS on the full batch of features (a convex problem: a logistic
    regression). The features are scaled to unit variance while fitting, which L-BFGS converges much faster
    on; the scale is folded back into the weights, so the head computes the same logits from the raw features."""
    features = image_features(classifier, tokens)  # (N, C)
    labels = labels.to(features.device)
    std = features.std(dim=0).clamp(min=1e-6)  # (C,)
    scaled = features / std
    weight = torch.zeros(classifier.num_labels, features.size(1), device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(scaled @ weight.T, labels) + weight_decay * weight.square().sum()  # L2 keeps it finite
        loss.backward()                                                                           # on separable data
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        classifier.score.weight.copy_(weight / std)  # (L, C): logits = features @ (weight / std)^T


def fine_tune_classifier(classifier, tokens, labels, args, run: Run):
    """Train every weight of the classifier on the labels: AdamW, warmup then cosine, random batches of
    --batch-size, for --probe-steps at a peak of --probe-lr, with the run's --weight-decay, --grad-clip and
    --seed; a line every 4 x --log-every steps."""
    steps, lr, batch_size, log_every = args.probe_steps, args.probe_lr, args.batch_size, args.log_every * 4
    classifier.train()
    optimizer = configure_optimizer(classifier, lr, args.weight_decay, run.device.type)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, step / steps, lr, min(50, steps // 10))
        pick = torch.randint(len(tokens), (batch_size,), generator=generator)
        loss = classifier(tokens[pick].to(run.device), labels=labels[pick].to(run.device)).loss
        loss.backward()
        nn.utils.clip_grad_norm_(classifier.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            run.say(f"  fine-tune step {step + 1}/{steps} | loss {loss.item():.4f} | "
                    f"{format_time(time.time() - start)}")
    classifier.eval()


@torch.no_grad()
def classifier_accuracy(classifier, tokens, labels, batch_size: int = 64) -> float:
    """The fraction of images whose most likely class, by the classifier's forward pass, is their label."""
    classifier.eval()
    device = classifier.score.weight.device
    right = sum(int((classifier(t.to(device)).logits.argmax(dim=-1).cpu() == y).sum())
                for t, y in zip(tokens.split(batch_size), labels.split(batch_size)))
    return right / len(labels)


def train_classifier(args, model, task, run: Run) -> dict:
    """--probe: an ImageGPTForImageClassification with the trained body, its score layer learnt on the
    training images' labels (linear) or every weight (finetune); its accuracy on the held-out images; saved
    to out/classifier."""
    train_tokens, train_labels, test_tokens, test_labels = task.labelled()
    names = task.label_names
    id2label = {str(i): str(name) for i, name in enumerate(names)}  # config.json keeps the class names
    config = ImageGPTConfig.from_dict({**model.config.to_dict(), "id2label": id2label})
    config.problem_type = "single_label_classification"
    classifier = ImageGPTForImageClassification(config)
    classifier.transformer.load_state_dict(model.transformer.state_dict())
    classifier.to(run.device)
    classifier.palette = model.palette
    run.say(f"{args.probe} probe: {len(names)} classes ({', '.join(map(str, names[:8]))}{' ...' * (len(names) > 8)}), "
        f"{len(train_labels):,} training images, {len(test_labels):,} held out")
    start = time.time()
    if args.probe == "linear":
        fit_linear_probe(classifier, train_tokens, train_labels, args.probe_steps)
    else:
        fine_tune_classifier(classifier, train_tokens, train_labels, args, run)
    train_accuracy = classifier_accuracy(classifier, train_tokens, train_labels)
    accuracy = classifier_accuracy(classifier, test_tokens, test_labels)
    chance = torch.bincount(test_labels, minlength=len(names)).max().item() / len(test_labels)
    out = os.path.join(args.out, "classifier")
    classifier.save_pretrained(out)
    run.say(f"{args.probe} probe accuracy: {100 * accuracy:.1f}% on {len(test_labels):,} held-out images (training "
        f"images: {100 * train_accuracy:.1f}%; always guessing the commonest class: {100 * chance:.1f}%), in "
        f"{format_time(time.time() - start)}")
    run.say(f"classifier saved to {out} (load with ImageGPTForImageClassification.from_pretrained({out!r}); its "
        "inputs are the pixels' tokens, no SOS)")
    return dict(probe_accuracy=accuracy, probe_train_accuracy=train_accuracy, chance=chance, classifier=out)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


CLI_EXAMPLES = """examples:
  python imagegpt.py sample --model imagegpt-small --num-samples 8 --out samples.png   # downloads 76M params once
  python imagegpt.py sample --model ./my-checkpoint --top-k 40 --seed 1 --out samples.png
  python imagegpt.py complete --model imagegpt-small --image cat.png --out completions.png
  python imagegpt.py complete --model openai/imagegpt-medium --image cat.png --num-samples 4 --temperature 0.9

A model directory holds config.json, model.safetensors (or pytorch_model.bin) and its palette
(preprocessor_config.json or kmeans_centers.npy); --palette points at a palette kept elsewhere.
Every image costs one model step per pixel (1024 for 32 x 32): minutes on a CPU, seconds on a GPU.
"""
TRAIN_EXAMPLES = """examples:
  python imagegpt.py train                    # a small ImageGPT learns to draw shapes: ~5 min on a CPU
  python imagegpt.py train --probe linear     # ... then a linear probe tells the shapes apart from its features
  python imagegpt.py train --resume out/imagegpt-shapes --time-budget 600   # train it further
  python imagegpt.py train --init out/imagegpt-shapes --max-steps 0 --probe finetune   # classify with a saved model
  python imagegpt.py train --data photos/ --n-px 16 --out out/photos   # a folder of PNGs, resized to 16 x 16
  python imagegpt.py train --data images.npy --labels labels.npy --probe linear   # (N, H, W, 3) uint8, N class ids
  python imagegpt.py sample --model out/imagegpt-shapes --num-samples 16 --out more.png   # sample a trained model
"""


# Every number on the command line is checked by argparse as it reads it (type=integer_option(...) or
# float_option()), so that a value out of range is one line, `error: argument --batch-size: must be at least 1,
# got 0`, before any model is loaded. What a number asks of memory is checked once the model is known
# (check_memory: the batch's logits, the samples' key/value cache, an image grid).
MAX_SEED = 2 ** 63 - 1  # torch takes seeds below 2**64; nanogpt2.py's trainer adds a rank, so both files stop here
MAX_COLOURS = 4096  # --n-colours: k-means compares 65,536 pixels with every colour at a time (2 GB at 4096)


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
        prog="imagegpt.py",
        description="ImageGPT in one file. `sample` draws new images; `complete` keeps the top half of your "
                    "image and lets the model paint the rest; `train` trains one (with no options: a small "
                    "ImageGPT that learns to draw shapes, in minutes on a CPU).",
        epilog=CLI_EXAMPLES + "\ntraining " + TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    sample = commands.add_parser(
        "sample", help="draw unconditional samples into one PNG grid",
        description="Draw images from nothing (the SOS token) and write them side by side into one PNG.",
        epilog=CLI_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    complete = commands.add_parser(
        "complete", help="complete the bottom half of an image, several times",
        description="Shrink IMAGE to the model's n_px x n_px, keep its top rows, sample the rest, and write the "
                    "original (as the model sees it) followed by the completions into one PNG.",
        epilog=CLI_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    complete.add_argument("--image", required=True, help="the PNG to complete (8-bit grey, RGB or RGBA)")
    complete.add_argument("--keep-rows", type=integer_option(0), default=None,
                          help="rows of the shrunk image to keep (default: the top half, n_px // 2)")
    for command, out in ((sample, "samples.png"), (complete, "completions.png")):
        command.add_argument("--model", default="imagegpt-small",
                             help="a directory with config.json + weights + palette, a released name "
                                  "(imagegpt-small, imagegpt-medium, imagegpt-large) or a hub repo id "
                                  "(default: imagegpt-small)")
        command.add_argument("--palette", default=None,
                             help="kmeans_centers.npy or preprocessor_config.json, if the model directory has none")
        command.add_argument("--num-samples", type=integer_option(1), default=8, help="images to draw (default 8)")
        command.add_argument("--out", default=out, help=f"the PNG to write (default {out})")
        command.add_argument("--temperature", type=float_option(), default=1.0,
                             help="divide the logits by this; lower is more predictable, 0 means greedy (default 1.0)")
        command.add_argument("--top-k", type=integer_option(0), default=0,
                             help="sample only among the k most likely colours; 0 turns it off (default 0)")
        command.add_argument("--top-p", type=float_option(), default=None,
                             help="sample only among the most likely colours whose probabilities sum to p")
        command.add_argument("--seed", type=integer_option(0, MAX_SEED), default=None,
                             help="random seed, for samples you can reproduce")
        command.add_argument("--scale", type=integer_option(1), default=4,
                             help="enlarge every pixel to scale x scale in the PNG (default 4: 32 px -> 128 px)")
        command.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present)")
        command.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                             help="weights' precision (default float32: sampling one pixel at a time is bound by "
                                  "kernel launches, not arithmetic, so half precision gains little)")
        command.add_argument("--compile", action="store_true",
                             help="compile the decoding step with torch.compile: a minute or more before the first "
                                  "pixel, then faster steps; worth it for many or large images")
    add_train_parser(commands)
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
    # Defaults shown as "shapes X, --data Y" depend on the task: see default_help.
    train = commands.add_parser(
        "train", help="train an ImageGPT (no options: a small one learns to draw shapes, in minutes on a CPU)",
        description="Train an ImageGPT and save it, with its palette, by save_pretrained.\n\n"
                    "With no options, an ImageGPT of 4 layers x 64 learns to draw coloured shapes on plain\n"
                    "backgrounds (12 x 12 pixels, a 16-colour palette fitted by k-means), from images drawn on the\n"
                    "fly, on a CPU, within about 5 minutes, writing a grid of samples every --sample-every steps\n"
                    "(out/imagegpt-shapes/samples.png is always the latest: watch the shapes appear). --data trains\n"
                    "on your images instead; --init continues from a checkpoint; --probe then classifies images\n"
                    "from the model's features and reports the accuracy on held-out ones. Defaults written\n"
                    "\"shapes X, --data Y\" depend on what is trained.",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = train.add_argument_group("what to learn")
    data.add_argument("--data", metavar="PATH",
                      help="a folder of .png files, or an .npy array (N, H, W, 3) of uint8 (default: the shapes)")
    data.add_argument("--n-px", type=integer_option(1), metavar="N",
                      help=f"images are resized to N x N pixels, N * N tokens {default_help('n_px')}; --init: its own")
    data.add_argument("--n-colours", type=integer_option(2, MAX_COLOURS, "a k-means palette; OpenAI's has 512"),
                      metavar="K",
                      help=f"colours of the palette k-means fits to the training images {default_help('n_colours')}")
    data.add_argument("--palette", metavar="PATH",
                      help="use this palette (kmeans_centers.npy or preprocessor_config.json) instead of fitting one")
    data.add_argument("--val-fraction", type=float_option(), metavar="F",
                      help=f"--data: the share of images set aside for validation and for testing a probe "
                           f"{default_help('val_fraction')}")
    probe = train.add_argument_group("classification")
    probe.add_argument("--labels", metavar="PATH",
                       help="--data's labels: a .npy of N class ids, or a CSV, one row per image (the last column "
                            "is the label; a first column of file names is matched to a folder's PNGs)")
    probe.add_argument("--probe", choices=["linear", "finetune"],
                       help="after training, learn a classifier on the model's features: its score layer alone "
                            "(linear) or every weight (finetune), and report its held-out accuracy; the shapes' "
                            "label is their kind (default with --labels: linear)")
    probe.add_argument("--probe-steps", type=integer_option(1), metavar="N",
                       help=f"L-BFGS iterations of a linear probe, or fine-tuning steps {default_help('probe_steps')}")
    probe.add_argument("--probe-lr", type=float_option(), metavar="LR",
                       help=f"fine-tuning's peak learning rate {default_help('probe_lr')}; for a large pretrained "
                            "model, try 1e-5")
    model = train.add_argument_group("the model")
    model.add_argument("--init", metavar="NAME_OR_DIR",
                       help="start from these weights and their palette (a directory, imagegpt-small, ...)")
    model.add_argument("--n-layer", type=integer_option(1), metavar="N",
                       help=f"blocks of a new model {default_help('n_layer')}")
    model.add_argument("--n-head", type=integer_option(1), metavar="N",
                       help=f"attention heads of a new model {default_help('n_head')}")
    model.add_argument("--n-embd", type=integer_option(1), metavar="N",
                       help=f"width of a new model {default_help('n_embd')}")
    model.add_argument("--position-init", choices=["grid", "random"],
                       help="how a new model's position embeddings start: sines and cosines of each pixel's row and "
                            "column (grid), or at random as in ImageGPT (random; learns the image's shape far more "
                            f"slowly) {default_help('position_init')}")
    model.add_argument("--dropout", type=float_option(), metavar="P",
                       help=f"dropout probability {default_help('dropout')}")
    opt = train.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=integer_option(1), metavar="N",
                     help=f"images per step {default_help('batch_size')}")
    opt.add_argument("--lr", type=float_option(), metavar="LR", help=f"peak learning rate {default_help('lr')}")
    opt.add_argument("--warmup", type=integer_option(0), metavar="STEPS",
                     help=f"steps of linear warmup {default_help('warmup')}")
    opt.add_argument("--weight-decay", type=float_option(), metavar="WD",
                     help=f"AdamW weight decay, on matrices only {default_help('weight_decay')}")
    opt.add_argument("--grad-clip", type=float_option(), metavar="NORM",
                     help=f"largest gradient norm; 0 turns clipping off {default_help('grad_clip')}")
    opt.add_argument("--max-steps", type=integer_option(0), metavar="N",
                     help=f"optimiser steps {default_help('max_steps')}; 0 with --probe: probe --init as it is")
    opt.add_argument("--time-budget", type=float_option(), metavar="SECONDS",
                     help="also stop after this much training time, the cosine schedule following whichever "
                          f"budget runs out first; 0: none {default_help('time_budget')}")
    opt.add_argument("--seed", type=integer_option(0, MAX_SEED), metavar="N",
                     help=f"seed of the weights, the batches and the samples {default_help('seed')}")
    opt.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    opt.add_argument("--threads", type=integer_option(1, os.cpu_count(), "the cores of this machine"),
                     metavar="N",
                     help="CPU threads (default: 1 for a model under 5M parameters, whose small matrix products "
                          "lose more to handing work between threads than they gain; else OMP_NUM_THREADS or all "
                          "cores)")
    run = train.add_argument_group("the run")
    run.add_argument("--out", metavar="DIR", help="where to save (default out/imagegpt-shapes, or out/imagegpt-<name>)")
    run.add_argument("--resume", metavar="DIR",
                     help="continue the run saved in DIR exactly, with its own options; a larger --max-steps or "
                          "--time-budget trains a finished run further")
    run.add_argument("--overwrite", action="store_true",
                     help="train into an --out that holds an earlier run, replacing it (without it: refused)")
    run.add_argument("--save-every", type=integer_option(0), metavar="STEPS",
                     help="steps between checkpoints (model and training_state.pt); 0: at the end only "
                          "(default: --eval-every)")
    run.add_argument("--eval-every", type=integer_option(0), metavar="STEPS",
                     help=f"steps between validation losses; 0: at the end only {default_help('eval_every')}")
    run.add_argument("--eval-batches", type=integer_option(1), metavar="N",
                     help=f"batches in a validation loss {default_help('eval_batches')}")
    run.add_argument("--sample-every", type=integer_option(0), metavar="STEPS",
                     help=f"steps between sample grids; 0: at the end only {default_help('sample_every')}")
    run.add_argument("--num-samples", type=integer_option(1), metavar="N",
                     help=f"images in a sample grid {default_help('num_samples')}")
    run.add_argument("--log-every", type=integer_option(1), metavar="STEPS",
                     help=f"steps between progress lines {default_help('log_every')}")


def _check_args(args):
    """The user's numbers, checked before a model is loaded (which can take a while)."""
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if getattr(args, "image", None) is not None and not os.path.isfile(args.image):
        raise ValueError(f"--image {args.image}: no such file")
    check_output_file("--out", args.out)  # a directory there would be found after all the sampling
    if args.palette is not None and not os.path.exists(args.palette):
        raise ValueError(f"--palette {args.palette}: no such file")


def load_model_and_palette(args):
    """The model on its device, and the palette: --palette, else the one saved with the model."""
    device = resolve_device(args.device)
    model = ImageGPTForCausalImageModeling.from_pretrained(args.model, dtype=args.dtype, device=device)
    palette = load_palette(args.palette) if args.palette is not None else model.palette
    if palette is None:
        raise ValueError(f"{args.model} comes without a palette (preprocessor_config.json or kmeans_centers.npy); "
                         "pass --palette PATH")
    if palette.size(0) != model.config.n_colours:
        raise ValueError(f"the palette has {palette.size(0)} colours, but the model predicts "
                         f"{model.config.n_colours}; use the palette the model was trained with")
    model.config.n_px  # raises a clear error for a model whose positions are not a square image
    return model, palette, device


class ProgressLine:
    """on_token callback for generate(): one line on stderr, rewritten in place at most 5 times a second."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done = total, what, 0
        self.start = self.last = time.time()

    def __call__(self, tokens):
        self.done += 1
        now = time.time()
        if now - self.last > 0.2 or self.done == self.total:
            rate = self.done / max(now - self.start, 1e-6)
            left = (self.total - self.done) / rate
            sys.stderr.write(f"\r{self.what}: {self.done}/{self.total} pixels ({100 * self.done // self.total}%), "
                             f"{rate:.1f} px/s, {left:.0f} s left   ")
            sys.stderr.flush()
            self.last = now
        if self.done == self.total:
            sys.stderr.write("\n")


def _generate_images(model, prompt, args, device, what):
    """Sample num_samples continuations of prompt (1, T) with the command line's options -> (N, n*n) tokens."""
    seed = args.seed if args.seed is not None else torch.seed() % 2**31
    if args.seed is None:
        sys.stderr.write(f"seed {seed} (pass --seed {seed} to draw the same images again)\n")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    max_new_tokens = model.config.n_positions + 1 - prompt.size(1)
    if args.compile:
        sys.stderr.write("compiling the decoding step (a minute or more the first time)...\n")
    tokens = model.generate(
        prompt, num_samples=args.num_samples, do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
        top_k=args.top_k or None, top_p=args.top_p, generator=generator,
        on_token=ProgressLine(max_new_tokens, f"{what} {args.num_samples} images"), compile=args.compile,
    )
    return tokens[:, 1:].cpu()  # drop SOS: one token per pixel


def sample_command(args):
    _check_args(args)
    model, palette, device = load_model_and_palette(args)
    check_grid_memory(args.num_samples, min(args.num_samples, 8), model.config.n_px, args.scale)
    sos = torch.full((1, 1), model.config.sos_token_id, dtype=torch.long)
    images = dequantise(_generate_images(model, sos, args, device, "sampling"), palette)  # (N, n, n, 3)
    write_png(args.out, image_grid(images, columns=min(args.num_samples, 8), scale=args.scale))
    sys.stderr.write(f"wrote {args.out}\n")


def complete_command(args):
    _check_args(args)
    image = to_rgb(read_png(args.image))  # read before the model: a bad file fails fast
    model, palette, device = load_model_and_palette(args)
    n_px = model.config.n_px
    check_grid_memory(1 + args.num_samples, 1 + args.num_samples, n_px, args.scale)
    keep_rows = args.keep_rows if args.keep_rows is not None else n_px // 2
    if not 0 <= keep_rows < n_px:
        raise ValueError(f"--keep-rows must be in [0, {n_px}) for this {n_px} x {n_px} model, got {keep_rows}")
    original = quantise(image, palette, n_px=n_px)  # (n_px * n_px,): the whole image as the model sees it
    sos = torch.tensor([model.config.sos_token_id])
    prompt = torch.cat([sos, original[: keep_rows * n_px]])[None]  # (1, 1 + keep_rows * n_px)
    completions = _generate_images(model, prompt, args, device, "completing")  # (N, n_px * n_px)
    images = dequantise(torch.cat([original[None], completions]), palette)  # original first: (1 + N, n, n, 3)
    write_png(args.out, image_grid(images, columns=1 + args.num_samples, scale=args.scale))
    sys.stderr.write(f"wrote {args.out} (the original, as the model sees it, then {args.num_samples} completions)\n")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "sample":
            sample_command(args)
        elif args.command == "complete":
            complete_command(args)
        elif train_command(args)["stopped"] == "interrupted":  # saved; it said how to resume
            return 130
    except KeyboardInterrupt:  # Ctrl-C: stop quietly; a PNG or checkpoint is written only when complete
        if args.command == "train":  # the first Ctrl-C of the training loop saves; this one came elsewhere
            sys.stderr.write(f"\ninterrupted: nothing saved since the last checkpoint in {args.out}, if any\n")
        else:
            sys.stderr.write("\ninterrupted: nothing written\n")
        return 130
    except (ValueError, OSError) as e:  # a user's mistake: one line, no traceback
        print(f"imagegpt.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
