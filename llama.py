"""
llama.py: a LLaMA language model written from scratch and trained on Tiny Shakespeare, in one file.

    python llama.py train       download the data, train a tokenizer and the model, evaluate it
    python llama.py sample      generate text from out/ckpt.pt, printed as it is produced
    python llama.py eval        loss, accuracy, perplexity and bits per character on val and test
    python llama.py bench       training and decoding speed: KV cache, recomputation, compiled
    python llama.py export      a checkpoint in Meta's layout (params.json, consolidated.00.pth)
    python llama.py CMD --help  every flag of a command
    torchrun --standalone --nproc_per_node=2 llama.py train     the same training, data parallel

In a notebook, paste the file into a cell, then call main(["train", "--steps", "200"]).

What LLaMA changes relative to GPT-2: RMSNorm instead of LayerNorm, before each sub-layer; rotary
positional embeddings (RoPE) instead of a learned position table; a SwiGLU feed-forward instead of
a GELU MLP; no biases; and, from LLaMA 2 on, key/value heads shared by groups of query heads
(grouped-query attention; multi-query with one key/value head), which shrinks the KV cache.

The file has two parts. Part I is the lesson: the model and its training, top to bottom, in the
order the data flows. Part II is the tool around it: safe files, checkpoints, resuming, logs,
compiled decoding and bench, Meta's checkpoint layout, several processes, the command line.

References: Touvron et al. 2023, "LLaMA" (arXiv:2302.13971) and "Llama 2" (arXiv:2307.09288);
Meta's llama/model.py (github.com/meta-llama/llama), whose parameter names this file uses;
Su et al. 2021 (RoPE); Zhang & Sennrich 2019 (RMSNorm); Shazeer 2020 (SwiGLU); Shazeer 2019
(multi-query attention); Ainslie et al. 2023 (grouped-query attention).
"""
import argparse
import dataclasses
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import requests
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import urllib3

# =============================================================================
# Part I: the lesson. LLaMA and its training, in the order the data flows: hyperparameters,
# download, tokenizer, data, the model (smallest part first), training, evaluation, sampling.

# -----------------------------------------------------------------------------
# Hyperparameters
# The documented ones keep their documented names. A command-line flag of the same name
# overrides each for one run (`python llama.py train --help`); the constants never change.

VOCAB_SIZE = 130  # pieces in the SentencePiece vocabulary (--vocab-size)
BATCH_SIZE = 32  # sequences per optimizer step (--batch-size)
CONTEXT_WINDOW = 16  # tokens per training sequence: the longest context the model sees (--context)
# EPOCHS keeps its documented name, but it counts optimizer steps, each on one random batch, not
# passes over the data (--steps). 1000 steps of 32 x 16 tokens see about the training split once.
EPOCHS = 1000
DIM = 128  # width of the residual stream: features per token (--dim)
LOG_INTERVAL = 10  # optimizer steps between log lines, each with a validation loss (--log-interval)
HEADS = 8  # query heads per attention layer (--heads)
LAYERS = 4  # transformer blocks (--layers)
KV_HEADS = 1  # key/value heads: 1 is multi-query, HEADS multi-head, in between grouped-query
LEARNING_RATE = 1e-3  # peak AdamW learning rate, reached at the end of warmup (--lr)
WARMUP_STEPS = 50  # optimizer steps of linear warmup from 0 to LEARNING_RATE (--warmup)
MIN_LR_FRACTION = 0.1  # the cosine decay ends at this fraction of LEARNING_RATE
WEIGHT_DECAY = 0.1  # decoupled (AdamW) weight decay, on the weight matrices only (--weight-decay)
GRAD_CLIP = 1.0  # the gradient's global L2 norm is clipped to this
EVAL_BATCHES = 4  # fixed validation batches behind each log line's validation loss
SEED = 1337  # seeds the weights, the batches and sampling (--seed)
OUT_DIR = "out"  # checkpoint, tokenizer cache and log go here (--out)

# beside llama.py; pasted into a notebook cell (no __file__), in the working folder
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
DATA_PATH = HERE / "input.txt"
DATA_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
            "tinyshakespeare/input.txt")
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_BYTES = 1_115_394

# what the original notebook's README reported, printed beside our numbers
ORIGINAL = {"val": {"loss": 4.469, "accuracy": 0.0559, "perplexity": 87.3},
            "test": {"accuracy": 0.0562, "perplexity": 87.7}}

# -----------------------------------------------------------------------------
# Download
# Tiny Shakespeare, 1.1 MB of plays, is fetched once into input.txt beside this file. Part II's
# download() checks its sha256, bounds it in time and size, and never leaves half a file.


def get_text(path=None):
    """The text to learn from, as one string: the file at path, or Tiny Shakespeare if None."""
    if path is None:
        path = DATA_PATH
        fetch_tiny_shakespeare(path)  # Part II: downloads it once; refuses a damaged copy
    return read_text(path)  # Part II: one clear line if it is missing, empty or not UTF-8


# -----------------------------------------------------------------------------
# Tokenizer
# SentencePiece BPE with VOCAB_SIZE pieces, trained on the training split only. Its normalization
# is off (it would drop newlines and merge runs of spaces) and "\n" is a piece of its own, so
# that decode(encode(text)) == text.


class Tokenizer:
    """A SentencePiece model, kept as its serialized bytes so that a checkpoint carries it."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()  # -1 for ours; Llama's tokenizer starts each text with it
        # the characters each piece stands for, to turn nats per token into nats per character
        self.n_chars = torch.tensor([self.piece_chars(i) for i in range(self.vocab_size)])

    def encode(self, text: str) -> list:
        return self.sp.encode(text)

    def decode(self, ids: list) -> str:
        return self.sp.decode(ids)

    def piece_chars(self, i):
        if self.sp.is_unknown(i) or self.sp.is_control(i):
            return 0
        if self.sp.is_byte(i):  # Llama's <0x0A> pieces: one byte, counted as one character
            return 1
        return len(self.sp.id_to_piece(i))  # "▁" is SentencePiece's visible space

    def unknown_chars(self, text: str) -> str:
        """The characters of text that this tokenizer cannot represent (they decode as ⁇)."""
        unknown = [c for c in set(text) if self.sp.unk_id() in self.sp.encode(c)]
        return "".join(sorted(unknown))

    @staticmethod
    def train(text: str, vocab_size: int) -> "Tokenizer":
        lines = text.splitlines(keepends=True)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=model,
                vocab_size=vocab_size,
                model_type="bpe",
                character_coverage=1.0,  # every character of the text gets a piece
                normalization_rule_name="identity",  # no Unicode normalization
                add_dummy_prefix=False,  # no space added before the text
                remove_extra_whitespaces=False,  # runs of spaces stay
                allow_whitespace_only_pieces=True,
                user_defined_symbols=["\n"],
                # SentencePiece skips lines longer than this (4192 bytes by default): keep them
                max_sentence_length=max([4192] + [len(line.encode()) + 1 for line in lines]),
                bos_id=-1,  # no beginning- or end-of-sequence pieces: this model uses neither
                eos_id=-1,
                num_threads=1,  # the same pieces on every run
                minloglevel=2,
            )
        except RuntimeError as e:
            # Part II turns SentencePiece's message into what to change
            raise ValueError(tokenizer_error(e, vocab_size, len(text))) from None
        return Tokenizer(model.getvalue())


def get_tokenizer(train_text: str, vocab_size: int, cache_dir=None) -> Tokenizer:
    """Train a tokenizer once per (text, vocab size); later runs reuse the one in cache_dir."""
    path = None
    if cache_dir is not None:
        text_hash = hashlib.sha256(train_text.encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"tokenizer-{vocab_size}-{text_hash}.model"
    if path is not None and path.exists():
        try:
            return Tokenizer(path.read_bytes())
        except RuntimeError:  # a damaged file: train it again below
            print(f"{path} is damaged; training the tokenizer again", file=sys.stderr)
    print(f"training a {vocab_size}-piece BPE tokenizer on {len(train_text):,} characters ...",
          flush=True)
    tok = Tokenizer.train(train_text, vocab_size)
    if path is not None:
        atomic_write(path, tok.model_proto)  # Part II: a temporary file, renamed when complete
    return tok


# -----------------------------------------------------------------------------
# Data
# Three contiguous parts, 70% train, 15% validation, 15% test, as the original notebook did. A
# batch is BATCH_SIZE random windows of CONTEXT_WINDOW tokens; its targets are shifted by one.


def split_text(text: str) -> dict:
    """Cut at the 70% and 85% marks, by characters, so the tokenizer can learn from train only."""
    train_end = int(0.7 * len(text))
    val_end = int(0.85 * len(text))
    return {"train": text[:train_end], "val": text[train_end:val_end], "test": text[val_end:]}


def encode_splits(text: str, tok: Tokenizer) -> dict:
    """The token ids of each split, as a 1-D tensor."""
    splits = split_text(text)
    return {name: torch.tensor(tok.encode(part), dtype=torch.long) for name, part in splits.items()}


def get_batch(data, batch_size, context, generator=None):
    """batch_size random windows of one split: inputs (B, T) and targets (B, T), one token later."""
    starts = torch.randint(len(data) - context, (batch_size,), generator=generator)  # (B,)
    rows = data[starts[:, None] + torch.arange(context + 1)]  # (B, T + 1)
    return rows[:, :-1], rows[:, 1:]


def windows(data, context):
    """Every token of a split but the first, once, as a target, in consecutive windows (the last
    one padded)."""
    pad = -(len(data) - 1) % context  # to a whole number of windows
    x = F.pad(data[:-1], (0, pad))
    y = F.pad(data[1:], (0, pad), value=-100)  # cross_entropy skips targets of -100
    return x.view(-1, context), y.view(-1, context)  # (N, T) each


# -----------------------------------------------------------------------------
# Model
# Smallest part first, in forward-pass order: RMSNorm, rotary embeddings, attention with its KV
# cache, the SwiGLU feed-forward, the block, the whole model and its generate(). No class reads
# the constants above: ModelArgs brings everything, so a test builds a tiny model in one line.


@dataclass
class ModelArgs:
    """The model's shape, named as in Meta's llama/model.py."""

    dim: int = DIM
    n_layers: int = LAYERS
    n_heads: int = HEADS
    n_kv_heads: int | None = KV_HEADS  # None means n_heads (multi-head attention)
    vocab_size: int = VOCAB_SIZE
    multiple_of: int = 256  # the feed-forward width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = CONTEXT_WINDOW
    dropout: float = 0.0  # not Meta's: LLaMA trains on far more text than this, and drops nothing

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                     "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}: "
                             f"change --dim or --heads")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads "
                             f"{self.n_kv_heads}: change --heads or --kv-heads")
        if self.head_dim % 2:
            raise ValueError(f"the head size dim / n_heads = {self.dim} / {self.n_heads} is odd, "
                             f"and rotary embeddings turn pairs of features: change --dim or "
                             f"--heads")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def hidden_dim(self):
        """LLaMA's feed-forward width: 2/3 of 4 * dim (SwiGLU has three matrices), rounded up."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over each token's features: no mean, no bias."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # each token by its own RMS (the last dimension only), in float32 as Meta does. F.rms_norm
        # is x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) in one call, not five
        normed = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        return normed.type_as(x) * self.weight


def precompute_freqs_cis(head_dim, max_seq_len, theta=10000.0):
    """e^(i * pos * theta^(-2j / head_dim)) for each position pos and feature pair j:
    (max_seq_len, head_dim/2), complex. Pair j turns by a smaller angle per position than j-1."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (head_dim/2,)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # (max_seq_len, head_dim/2)
    return torch.polar(torch.ones_like(angles), angles)  # complex64, magnitude 1


def apply_rotary_emb(x, freqs_cis):
    """Rotate each feature pair (x[2j], x[2j+1]) of x (B, T, heads, head_dim) by its position's
    angle, as a complex product (Meta's convention). freqs_cis (T, 1, head_dim/2) holds the unit
    complex numbers, the same for every head. A rotated query and key have a dot product that
    depends only on how far apart they are."""
    x_complex = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, heads, hd/2)
    rotated = torch.view_as_real(x_complex * freqs_cis)  # (B, T, heads, head_dim/2, 2)
    return rotated.flatten(-2).type_as(x)  # (B, T, heads, head_dim)


class Attention(nn.Module):
    """Causal self-attention; groups of query heads share each of the n_kv_heads key/value heads.
    n_kv_heads == n_heads is multi-head attention, 1 multi-query, anything between grouped-query."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # the KV cache, (B, max_seq_len, n_kv_heads, head_dim) each, allocated by setup_cache:
        # buffers, so that .to(device) moves them, but not saved in checkpoints
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def forward(self, x, freqs_cis, positions=None, mask=None):
        """x (B, T, dim). positions None: x is a whole sequence (training, evaluation). Else a
        tensor (T,) of the positions x's tokens take in a sequence being generated: their keys
        and values go into the cache, and the queries read the cache through mask."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        q = apply_rotary_emb(q, freqs_cis)
        k = apply_rotary_emb(k, freqs_cis)
        if positions is not None:
            # store the new keys and values at their positions in the preallocated cache
            self.cache_k.index_copy_(1, positions, k)
            self.cache_v.index_copy_(1, positions, v)
            # then read all of it, the slots not yet written hidden by the mask: the same shapes
            # at every step, whatever the position, so that one compiled graph serves them all
            k = self.cache_k  # (B, max_seq_len, n_kv_heads, head_dim)
            v = self.cache_v
        q = q.transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.transpose(1, 2)  # (B, n_kv_heads, T or max_seq_len, head_dim)
        v = v.transpose(1, 2)
        # enable_gqa lets each group of n_heads // n_kv_heads query heads read one key/value head:
        # Meta's repeat_kv, i.e. torch.repeat_interleave(k, n_heads // n_kv_heads, dim=1), uncopied
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_heads * head_dim)
        return self.wo(y)  # (B, T, dim)


class FeedForward(nn.Module):
    """SwiGLU, a gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        gate = F.silu(self.w1(x))  # (B, T, hidden_dim)
        return self.w2(gate * self.w3(x))  # (B, T, dim)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.dropout = args.dropout  # residual dropout while training, against overfitting

    def forward(self, x, freqs_cis, positions=None, mask=None):
        attended = self.attention(self.attention_norm(x), freqs_cis, positions, mask)
        if self.training:
            attended = F.dropout(attended, self.dropout)
        h = x + attended
        fed_forward = self.feed_forward(self.ffn_norm(h))
        if self.training:
            fed_forward = F.dropout(fed_forward, self.dropout)
        return h + fed_forward


class Transformer(nn.Module):
    """Token embeddings, n_layers blocks, a final RMSNorm, and a linear layer to the logits."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # not persistent: it follows from args, so checkpoints leave it out, as Meta's do. It is
        # complex: model.to(device) moves it, but model.to(dtype) would break it (Part II never)
        freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("freqs_cis", freqs_cis[:, None, :], persistent=False)  # (T, 1, hd/2)
        # GPT-2's init: small normal weights, the two layers that write into the residual
        # stream scaled down with depth
        for name, p in self.named_parameters():
            if p.dim() == 2:
                deep = name.endswith(("wo.weight", "w2.weight"))
                std = 0.02 / math.sqrt(2 * args.n_layers) if deep else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None, positions=None):
        """Logits (B, T, vocab_size) for the tokens idx (B, T), and their mean cross-entropy
        against targets (B, T) if given. positions None: whole sequences from position 0, no
        cache (training, evaluation). A tensor (T,): idx continues the cached sequence at those
        positions (generation, after setup_cache)."""
        T = idx.size(1)
        if positions is None:
            freqs_cis = self.freqs_cis[:T]
            mask = None  # causal attention within idx
        else:
            freqs_cis = self.freqs_cis[positions]
            # the query at positions[i] reads the cache slots up to it: 0 is added to their
            # scores, -inf to the later slots and to those not yet written
            slots = torch.arange(self.args.max_seq_len, device=idx.device)
            mask = torch.where(slots > positions[:, None], float("-inf"), 0.0)  # (T, max_seq_len)
        h = self.tok_embeddings(idx)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, freqs_cis, positions, mask)
        logits = self.output(self.norm(h)).float()  # (B, T, vocab_size); the softmax is in the loss
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def setup_cache(self, batch_size):
        """Allocate each layer's key/value cache once; calls with the same batch size keep it."""
        weight = self.tok_embeddings.weight
        shape = (batch_size, self.args.max_seq_len, self.args.n_kv_heads, self.args.head_dim)
        for layer in self.layers:
            attention = layer.attention
            if attention.cache_k is None or attention.cache_k.shape != shape:
                attention.cache_k = weight.new_zeros(shape)  # written in place, never concatenated
                attention.cache_v = weight.new_zeros(shape)

    def decode_step(self, token, position):
        """The logits (B, vocab_size) after one new token (B, 1) at position, a tensor (1,). Every
        call has the same shapes, so Part II can compile it once, or capture it as a CUDA graph."""
        logits, _ = self(token, positions=position)
        return logits[:, -1]

    @torch.inference_mode()  # like no_grad, and lighter: these tensors will never need gradients
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, use_cache=True, on_token=None):
        """Continue idx (B, T0) by max_new_tokens tokens; returns (B, T0 + max_new_tokens).
        The model sees at most max_seq_len tokens (of a longer prompt, the last ones). When that
        window is full, its most recent half is run again from position 0, refilling the cache,
        and decoding goes on. use_cache=False recomputes the window at every step instead: the
        same tokens, more slowly. on_token(token) is called with each new token (B, 1)."""
        window = idx[:, -self.args.max_seq_len:]  # (B, at most max_seq_len): what the model sees
        new_tokens = []
        token = None  # the token sampled last, fed back at the next step
        cached = 0  # how many tokens of the window the cache holds
        if use_cache:
            self.setup_cache(idx.size(0))
        for _ in range(max_new_tokens):
            if window.size(1) > self.args.max_seq_len:  # full: keep the most recent half
                window = window[:, -max(1, self.args.max_seq_len // 2):]
                cached = 0
            if not use_cache:
                logits = self(window)[0][:, -1]  # every position, every step
            elif cached == 0:  # the prompt, or a refill: all of the window at once
                positions = torch.arange(window.size(1), device=idx.device)
                logits = self(window, positions=positions)[0][:, -1]
            else:  # the token sampled last, alone
                position = torch.full((1,), window.size(1) - 1, device=idx.device)
                logits = self.decode_step(token, position)
            cached = window.size(1)
            token = sample_next(logits, temperature, top_k, top_p, generator)[:, None]  # (B, 1)
            window = torch.cat([window, token], dim=1)
            new_tokens.append(token)
            if on_token is not None:
                on_token(token)
        return torch.cat([idx, *new_tokens], dim=1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """A token id for each row of logits (B, vocab_size): the argmax at temperature 0, else a
    sample from the softmax, restricted to the top_k likeliest tokens or the top_p of the mass."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    # the best token at 0 before dividing, so that a tiny temperature cannot overflow
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # the fewest likeliest tokens whose mass reaches top_p
        probs, order = torch.sort(logits.softmax(-1), dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # the tokens before this one reach top_p already
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)  # (B,)


# -----------------------------------------------------------------------------
# Training
# AdamW with linear warmup, cosine decay and gradient clipping. Every LOG_INTERVAL steps, a line:
# the mean training loss since the last one and the loss on fixed validation batches.


@dataclass
class TrainConfig:
    """One training run's settings, each with its flag's name; the defaults are the constants."""

    steps: int = EPOCHS
    batch_size: int = BATCH_SIZE
    context: int = CONTEXT_WINDOW
    dim: int = DIM
    layers: int = LAYERS
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    vocab_size: int = VOCAB_SIZE
    lr: float = LEARNING_RATE
    warmup: int = WARMUP_STEPS
    weight_decay: float = WEIGHT_DECAY
    dropout: float = 0.0
    log_interval: int = LOG_INTERVAL
    seed: int = SEED
    data: str | None = None  # a text file; None is Tiny Shakespeare, downloaded to input.txt
    out: str = OUT_DIR
    device: str = "auto"  # cuda, then mps, then cpu
    compile: bool = False  # torch.compile the training step (Part II)
    save_every: int = 0  # also save the checkpoint every this many steps; 0: only at the end

    def model_args(self, vocab_size):
        return ModelArgs(dim=self.dim, n_layers=self.layers, n_heads=self.heads,
                         n_kv_heads=self.kv_heads, vocab_size=vocab_size, max_seq_len=self.context,
                         dropout=self.dropout)


def lr_at(step, cfg):
    """Linear warmup to cfg.lr over cfg.warmup steps, then cosine decay to MIN_LR_FRACTION of it."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # from 1 down to 0
    return cfg.lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * cosine)


def make_optimizer(model, lr, weight_decay, device):
    """AdamW with decoupled weight decay on the weight matrices, none on the norms' gains."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    gains = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay},
              {"params": gains, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=device.type == "cuda")


def autocast(device):
    """bf16 autocast on GPUs that compute in bf16 (compute capability 8.0 on; a T4 emulates it)."""
    bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    # the weights and AdamW's state stay float32; matrix products run in bf16
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)


def train_step(model, optimizer, x, y, lr):
    """One optimizer step on the batch (x, y). Returns the loss as a tensor: reading its value
    would make the program wait for a GPU at every step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(x.device):
        _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    return loss.detach()


def train(cfg: TrainConfig, run=None):
    """Train a LLaMA as cfg says; returns (model, tokenizer, data), or None if a signal stopped it.
    run (Part II) keeps the output folder: checkpoints, resuming, Ctrl-C, log.csv, and the
    processes of a torchrun. Without one, a fresh run into cfg.out is made."""
    run = run or Run(cfg)
    with run:
        text = get_text(cfg.data)
        tok = run.saved_tokenizer() or get_tokenizer(split_text(text)["train"], cfg.vocab_size,
                                                     run.cache_dir)
        data = encode_splits(text, tok)
        check_splits(text, tok, data, cfg.context)  # Part II: one clear line if a split is short
        torch.manual_seed(cfg.seed)
        model = Transformer(cfg.model_args(tok.vocab_size)).to(run.device)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{n_params:,} parameters | {len(data['train']):,} training tokens | {run.device}")
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, run.device)
        batches = torch.Generator().manual_seed(cfg.seed)  # draws the training batches
        # the same validation windows at every log line: the curve shows the model, not the draw
        val_x, val_y = get_batch(data["val"], EVAL_BATCHES * cfg.batch_size, cfg.context,
                                 torch.Generator().manual_seed(0))
        val_chars = tok.n_chars[val_y].sum().item()  # to log nats per character too
        step = run.start(model, optimizer, batches, tok, val_chars)  # 0, or where it stopped
        trained = run.wrap(model)  # the model, or its DistributedDataParallel or compiled form
        losses = []
        while step < cfg.steps and not run.stop_requested:
            lr = lr_at(step, cfg)
            x, y = get_batch(data["train"], cfg.batch_size, cfg.context, batches)
            # under torchrun every process draws the same batch and trains on its own share of it
            x = run.share(x)
            y = run.share(y)
            losses.append(train_step(trained, optimizer, x.to(run.device), y.to(run.device), lr))
            step += 1
            if step % cfg.log_interval == 0 or step == cfg.steps:
                train_loss = run.mean_loss(losses, step)  # over all processes; stops on nan
                val_loss = evaluate(model, val_x, val_y, len(val_x))["loss"]
                print(f"step {step:5d}/{cfg.steps} | train {train_loss:.4f} | "
                      f"val {val_loss:.4f} | lr {lr:.2e} | {run.progress(step)}", flush=True)
                run.log(step, train_loss, val_loss, lr)  # a row of log.csv
                losses = []
            run.step_done(step, losses)  # saves every --save-every steps; hears Ctrl-C
        run.finish(step, losses)  # saves the checkpoint; says how to resume if stopped early
    if run.stop_requested:
        return None
    return model, tok, data


# -----------------------------------------------------------------------------
# Evaluation
# Every token of the validation and test splits, once, in consecutive windows: exact, repeatable.
# Bits per character divide the loss by the characters predicted: they compare across tokenizers.


@torch.no_grad()
def evaluate(model, x, y, batch_size, n_chars=None, progress=None):
    """Loss (nats per token), accuracy and perplexity on inputs x and targets y (N, T), and bits
    per character if n_chars, the characters of the targets, is given. Targets -100 are skipped."""
    device = model.output.weight.device
    training = model.training
    model.eval()  # no dropout
    loss_sum = 0.0
    correct = 0
    count = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        yb = y[i:i + batch_size].to(device)
        with autocast(device):
            logits, _ = model(xb)  # (b, T, vocab_size)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == yb).sum().item()
        count += (yb != -100).sum().item()
        if progress:
            print(f"\r{progress} {min(i + batch_size, len(x)) / len(x):4.0%}", end="", flush=True)
    model.train(training)
    loss = loss_sum / count
    bpc = loss_sum / (n_chars * math.log(2)) if n_chars else None
    return {"loss": loss, "accuracy": correct / count, "perplexity": math.exp(loss), "bpc": bpc}


def report(model, tok, data, context, batch_size):
    """Evaluate the full validation and test splits; print them beside the original's numbers."""
    results = {}
    for split in ("val", "test"):
        x, y = windows(data[split], context)
        n_chars = tok.n_chars[data[split][1:]].sum().item()  # the characters of every target
        results[split] = evaluate(model, x, y, batch_size, n_chars, f"evaluating {split}")
    header = f"{'split':<6}{'loss':>8}{'accuracy':>10}{'perplexity':>12}{'bits/char':>11}"
    print(f"\r{header}   original README")
    for split, r in results.items():
        numbers = f"{r['loss']:8.4f}{r['accuracy']:10.4f}{r['perplexity']:12.2f}{r['bpc']:11.4f}"
        original = ", ".join(f"{name} {value}" for name, value in ORIGINAL[split].items())
        print(f"{split:<6}{numbers}   {original}")
    return results


# -----------------------------------------------------------------------------
# Sampling
# The prompt is encoded and run through the model once, filling the KV cache; then one token at
# a time is sampled and fed back, and the text is printed as soon as it is decoded.


def sample(model, tok, prompt="\n", max_new_tokens=500, temperature=0.8, top_k=None, top_p=None,
           seed=SEED, num_samples=1):
    """Print num_samples continuations of prompt as they are produced, and return them."""
    device = model.output.weight.device
    ids = tok.encode(prompt)
    if tok.bos_id >= 0:  # Llama's tokenizer: every text starts with the beginning-of-sequence id
        ids = [tok.bos_id] + ids
    generator = torch.Generator(device).manual_seed(seed)
    texts = []
    for i in range(num_samples):
        print(prompt, end="", flush=True)
        stream = TextStream(tok, ids)  # Part II: prints what each token adds to the text
        idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T0)
        model.generate(idx, max_new_tokens, temperature, top_k, top_p, generator, on_token=stream)
        texts.append(prompt + stream.text)
        print("\n" + "-" * 40 if i < num_samples - 1 else "")
    return texts


# =============================================================================
# Part II: the tool. What a program needs around the lesson, and a reader may skip: files that
# are never half-written, checkpoints, resuming and signals, log.csv and its plot, several
# processes under torchrun, compiled decoding and bench, Meta's checkpoint layout, the command line.

# -----------------------------------------------------------------------------
# Safe files
# Every file is written under a temporary name beside its destination and renamed only when
# complete, so that a crash, a full disk or a kill never leaves half a file. A lock keeps a second
# run out of a folder that a first one is writing to.


def atomic_write(path, data):
    """Write data (bytes, or a function that writes to a binary file) to path: all, or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        umask = os.umask(0)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it; mkstemp makes it private
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        reason = no_room(e)
        if reason is None:
            raise
        kept = "nothing was written"
        if path.exists():
            kept = f"the previous {path.name} was left as it was"
        raise OSError(f"could not write {path}: {reason}; {kept}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def no_room(e):
    """Why there was no room to write, if that is what e (or the error behind it) says; else None.
    torch.save reports a failed write as a RuntimeError raised while handling the OSError."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.EFBIG:
            return "the file is over this process's size limit (`ulimit -f`)"
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"the disk is full ({e.strerror}): free some space"
        e = e.__cause__ or e.__context__
    return None


def lock_folder(folder):
    """Hold folder/.lock until the returned file is closed; refuse if another process holds it.
    The operating system releases the lock when its process ends, however it ends: none is ever
    left stuck by a crash."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file: give a folder")
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / ".lock", "a+")
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ValueError(f"{folder} is in use by another training run (process {holder}): wait "
                         f"for it to end, or give another --out") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def remove_temp_files(folder):
    """Remove the temporary files a killed process left in folder (call it holding the lock)."""
    for tmp in folder.glob("*.*.tmp"):
        tmp.unlink()
        print(f"removed {tmp}, left by an earlier run killed while writing", file=sys.stderr)


# -----------------------------------------------------------------------------
# Data checks
# The download, bounded in time and size; the text, read as UTF-8; and what to say when a text
# cannot be split or tokenized.


def fetch_tiny_shakespeare(path):
    """Download Tiny Shakespeare to path unless it is there; refuse a copy that differs from it."""
    if not path.exists():
        print(f"downloading {DATA_URL} to {path} ...", flush=True)
        download(DATA_URL, path, DATA_SHA256, max_bytes=DATA_BYTES)
        print(f"saved {DATA_BYTES:,} bytes to {path}")
        return
    content = path.read_bytes()
    if hashlib.sha256(content).hexdigest() != DATA_SHA256:
        raise ValueError(f"{path} is not Tiny Shakespeare as published ({len(content):,} bytes, "
                         f"not {DATA_BYTES:,}, or other bytes): it may be half-written. Delete it "
                         f"to download it again, or pass --data {path} to use it as it is")


def download(url, path, sha256=None, max_bytes=64 * 2**20, timeout=30.0, deadline=300.0):
    """Fetch url into path, all or nothing: each read within timeout seconds, all of it within
    deadline seconds and max_bytes bytes, and checked against sha256 if one is given."""
    started = time.monotonic()

    def receive(f):
        headers = {"Accept-Encoding": "identity"}  # uncompressed, so that the sizes can be checked
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as response:
            response.raise_for_status()
            length = int(response.headers.get("Content-Length") or -1)
            if length > max_bytes:
                raise OSError(f"it is {length:,} bytes, more than the {max_bytes:,} expected")
            # read1 returns what has arrived: a server that trickles bytes still meets the deadline
            read = getattr(response.raw, "read1", response.raw.read)
            digest = hashlib.sha256()
            received = 0
            chunk = read(65536)
            while chunk:
                received += len(chunk)
                if received > max_bytes:
                    raise OSError(f"it sent more than the {max_bytes:,} bytes expected")
                if time.monotonic() - started > deadline:
                    raise OSError(f"it took more than {deadline:.0f} s (a slow or stalled server)")
                digest.update(chunk)
                f.write(chunk)
                chunk = read(65536)
            if length >= 0 and received != length:
                raise OSError(f"the connection closed after {received:,} of {length:,} bytes")
            if sha256 is not None and digest.hexdigest() != sha256:
                raise OSError(f"sha256 {digest.hexdigest()} is not the expected {sha256}")

    try:
        atomic_write(path, receive)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        # urllib3's errors hold their message first in a tuple
        why = e.args[0] if isinstance(e, urllib3.exceptions.HTTPError) and e.args else e
        raise OSError(f"could not download {url}: {why}; fetch it by hand: "
                      f"curl -L -o {path} {url}") from None
    return path


def read_text(path):
    """A UTF-8 text file as one string, or one clear line saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}: check --data")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it "
                         f"to UTF-8") from None
    if not text:
        raise ValueError(f"{path} is empty: give a text file, such as Tiny Shakespeare")
    return text


def tokenizer_error(e, vocab_size, n_chars):
    """What a SentencePiece training error means for the user, and what to change."""
    message = str(e)
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    too_big = re.search(r"set it to a value <= (\d+)", message)
    if too_small:
        return (f"--vocab-size {vocab_size} is too small for this text: it needs one piece per "
                f"distinct character, plus the unknown piece and the newline: use at least "
                f"{too_small[1]}")
    if too_big:
        return (f"--vocab-size {vocab_size} is more pieces than SentencePiece can make from "
                f"{n_chars:,} characters of training text (at most {too_big[1]}): use a smaller "
                f"--vocab-size, or a longer text")
    if "sentences_.empty()" in message:
        return "the training split has no text to learn a tokenizer from: give a longer text"
    return f"SentencePiece cannot make {vocab_size} pieces from this text ({message.strip()[:200]})"


def check_length(text, context):
    """A text too short to split, refused before a tokenizer is trained on it."""
    need = math.ceil((context + 1) / 0.15)  # a token is at least one character
    if len(text) < need:
        raise ValueError(f"the text is too short: {len(text):,} characters, and the validation "
                         f"and test splits (15% each) need {context + 1} tokens each for a "
                         f"{context}-token context: give a text of at least {need:,} characters "
                         f"(many more to learn anything), or a smaller --context")


def check_splits(text, tok, data, context):
    """Each split must hold a window and its targets. Characters the training split never has
    cannot be encoded: say so, since they make the evaluation's bits per character approximate."""
    parts = split_text(text)
    for name in ("val", "test"):
        unknown = tok.unknown_chars(parts[name])
        if unknown:
            print(f"note: the {name} split has characters that the training split never has "
                  f"({unknown[:20]!r}); each run of them is one unknown token, so its bits per "
                  f"character are approximate", file=sys.stderr)
    for name, ids in data.items():
        if len(ids) >= context + 1:
            continue
        if len(parts[name]) >= context + 1 and tok.unknown_chars(parts[name]):
            raise ValueError(f"the {name} split has {len(parts[name]):,} characters but only "
                             f"{len(ids)} tokens: most of its characters never occur in the "
                             f"training split (the first 70% of the text), so the tokenizer "
                             f"cannot encode them")
        chars_per_token = len(text) / max(1, sum(map(len, data.values())))
        need = math.ceil((context + 1) / 0.15 * chars_per_token)
        raise ValueError(f"the text is too short: its {name} split has {len(ids)} tokens and a "
                         f"{context}-token context needs {context + 1}; use a text of at least "
                         f"~{need:,} characters, or a smaller --context")


# -----------------------------------------------------------------------------
# Checkpoints
# A checkpoint holds only tensors, numbers, strings and bytes, so torch.load(weights_only=True)
# reads it and no pickled code can run. All of it is checked as it is loaded, so that a damaged
# or edited file is refused with one line, not a traceback later.

# the run's settings, as saved; --resume reuses them
TRAIN_KEYS = ("steps", "batch_size", "context", "dim", "layers", "heads", "kv_heads", "vocab_size",
              "lr", "warmup", "weight_decay", "dropout", "log_interval", "seed", "data")
MAX_CONTEXT = 2**20  # a longer context would only fail to allocate its rotary table and cache
INT_ARGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len")


def save_checkpoint(path, model, tok, optimizer, step, rng, config, log_rows, data_sha256):
    ckpt = {
        "model": model.state_dict(),
        "model_args": asdict(model.args),
        "tokenizer": tok.model_proto,
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng": rng,  # the state of the generator that draws the training batches
        "config": config,  # the run's settings, reused by --resume
        "log": log_rows,  # the rows of log.csv up to this step
        "data_sha256": data_sha256,  # the text it learns from, checked by --resume
    }
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, for_resume=False):
    """A checkpoint written by save_checkpoint, checked; anything else is refused with one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: run `python llama.py train` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, a cut file and a foreign format all land here
        if "Weights only load failed" in str(e):
            why = "it holds pickled Python objects (code, perhaps), which are never loaded here"
        else:
            why = "it is not a whole PyTorch file (empty, cut short, or another format)"
        raise ValueError(f"{path} cannot be loaded safely: {why}; retrain, or give another "
                         f"--ckpt") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "tokenizer"} <= ckpt.keys():
        raise ValueError(f"{path} is not a llama.py checkpoint (no model, model_args and "
                         f"tokenizer): retrain, or give another --ckpt")
    try:
        check_checkpoint(ckpt, for_resume)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ValueError(f"{path} is damaged or was edited: {e}; retrain, or give another "
                         f"--ckpt") from None
    return ckpt


def is_number(value, kind=(int, float)):
    return isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)


def check_checkpoint(ckpt, for_resume):
    """Raise if any part of ckpt is not what save_checkpoint writes."""
    raw_args = ckpt["model_args"]
    if not isinstance(raw_args, dict):
        raise ValueError("its model_args are not a table of settings")
    known = {f.name for f in fields(ModelArgs)}
    for key, value in raw_args.items():
        if key not in known:
            raise ValueError(f"its model_args have an unknown setting {key!r}")
        optional = key in ("n_kv_heads", "ffn_dim_multiplier") and value is None
        if not optional and not is_number(value, int if key in INT_ARGS else (int, float)):
            raise ValueError(f"its model_args have {key} = {value!r}, not a number of that kind")
    args = ModelArgs(**raw_args)
    if args.max_seq_len > MAX_CONTEXT:
        raise ValueError(f"its max_seq_len {args.max_seq_len} is over {MAX_CONTEXT:,}")
    if not (args.norm_eps > 0 and args.rope_theta > 0 and 0 <= args.dropout < 1):
        raise ValueError(f"its norm_eps, rope_theta or dropout is out of range: {raw_args}")
    if not isinstance(ckpt["tokenizer"], bytes):
        raise ValueError("its tokenizer is not a SentencePiece model")
    tok = Tokenizer(ckpt["tokenizer"])  # RuntimeError if the bytes are damaged
    if tok.vocab_size != args.vocab_size:
        raise ValueError(f"its tokenizer has {tok.vocab_size} pieces but its model "
                         f"{args.vocab_size}")
    weights = ckpt["model"]
    if not isinstance(weights, dict) or not all(torch.is_tensor(t) for t in weights.values()):
        raise ValueError("its weights are not a table of tensors")
    misfit = weights_misfit(meta_model(args), weights)
    if misfit:
        raise ValueError(f"its weights do not fit its model_args: {misfit}")
    for name, tensor in weights.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"its weight {name} holds NaN or infinite values (the run diverged)")
    if for_resume:
        check_resume_state(ckpt)


def check_resume_state(ckpt):
    """What --resume needs besides the model: the settings, step, optimizer and random state."""
    config = ckpt.get("config")
    if not isinstance(config, dict) or not set(TRAIN_KEYS) <= config.keys():
        raise ValueError(f"its run settings are incomplete (it needs {', '.join(TRAIN_KEYS)})")
    for key in TRAIN_KEYS:
        value = config[key]
        if key == "data":
            good = value is None or isinstance(value, str)
        elif key in ("lr", "weight_decay", "dropout"):
            good = is_number(value)
        else:
            good = is_number(value, int) and value >= 0
        if not good:
            raise ValueError(f"its run setting {key} = {value!r} is not valid")
    if not is_number(ckpt.get("step"), int) or ckpt["step"] < 0:
        raise ValueError(f"its step {ckpt.get('step')!r} is not a whole number")
    rng = ckpt.get("rng")
    rng_shape = torch.Generator().get_state().shape
    if not torch.is_tensor(rng) or rng.dtype != torch.uint8 or rng.shape != rng_shape:
        raise ValueError("its random state is incomplete")
    optimizer = ckpt.get("optimizer")
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= optimizer.keys():
        raise ValueError("its optimizer state is incomplete")
    rows = ckpt.get("log", [])
    if not isinstance(rows, list) or not all(isinstance(row, list) and len(row) == 8 and
                                             all(is_number(v) for v in row) for row in rows):
        raise ValueError("its log rows are not rows of 8 numbers")
    if not isinstance(ckpt.get("data_sha256"), (str, type(None))):
        raise ValueError("its text's sha256 is not a string")


def check_optimizer_state(optimizer):
    """AdamW's moments must have their parameters' shapes (load_state_dict does not check)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if name != "step" and (not torch.is_tensor(value) or value.shape != p.shape):
                    raise ValueError(f"AdamW's {name} does not fit a weight of {tuple(p.shape)}")


def meta_model(args):
    """A Transformer on the meta device: its weights' names and shapes, none allocated."""
    with torch.device("meta"):
        return Transformer(args)


def weights_misfit(model, weights):
    """What keeps weights from loading into model, in a few words; None if nothing."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    if missing:
        more = f", and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"{missing[0]} is missing{more}"
    extra = sorted(weights.keys() - expected.keys())
    if extra:
        return f"{extra[0]} is not a weight of this model"
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            wanted = tuple(expected[name].shape)
            return f"{name} is {tuple(tensor.shape)}, where the model has {wanted}"
    return None


def load_model(path, device, dtype=None, context=None):
    """The model (in eval mode) and tokenizer of a checkpoint: a file of ours, or a folder in
    Meta's layout. context overrides the context length (a Meta folder has none: 2048 then)."""
    path = Path(path)
    if path.is_dir():
        args, weights, tok = read_meta_folder(path, context or 2048)
    else:
        ckpt = load_checkpoint(path)
        args = ModelArgs(**ckpt["model_args"])
        if context is not None:
            args.max_seq_len = context
        weights = ckpt["model"]
        tok = Tokenizer(ckpt["tokenizer"])
    return build_model(args, weights, device, dtype), tok


def build_model(args, weights, device, dtype=None):
    """A Transformer in eval mode holding weights, in dtype, on device. Built on the meta device,
    it takes the tensors as they are: a 7B model is never held twice, nor initialized at random.
    dtype None: the checkpoint's own dtype on a GPU, float32 elsewhere."""
    if dtype is None:
        dtype = next(iter(weights.values())).dtype if device.type == "cuda" else torch.float32
    model = meta_model(args)
    misfit = weights_misfit(model, weights)
    if misfit:
        raise ValueError(f"the weights do not fit the model's settings: {misfit}")
    weights = {name: tensor.to(device=device, dtype=dtype) for name, tensor in weights.items()}
    model.load_state_dict(weights, assign=True)
    # the rotary table is not a weight: compute it for real (it was made on the meta device)
    freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta)
    model.freqs_cis = freqs_cis[:, None, :].to(device)
    return model.eval()


# -----------------------------------------------------------------------------
# Training runs
# Run is where Part I's training loop meets everything that is not the lesson: the output
# folder's lock, resuming, Ctrl-C and SIGTERM, saving every --save-every steps, log.csv and its
# plot, and the processes of a torchrun, each of which trains on its share of every batch.


def pick_device(name="auto", local_rank=None):
    """cuda, then mps, then cpu, unless the user names one; under torchrun, this process's GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise ValueError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N or mps")
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"  # one GPU per process
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: PyTorch sees no CUDA GPU here (a CPU-only build, or no "
                         "driver): use --device cpu, or leave --device out")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple's MPS is not available here: use --device cpu, or "
                         "leave --device out")
    return device


def torchrun_process():
    """(rank, world size, local rank) as torchrun sets them; a plain `python llama.py` is 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def peak_memory_mib(device):
    """The most memory this process has held so far: allocated on the GPU, else resident."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if sys.platform == "win32":  # no resource module there
        return float("nan")
    import resource  # Unix only, so imported here; ru_maxrss is in KiB, on macOS in bytes
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class Run:
    """A training run's output folder and processes, used as a context manager. A fresh run
    refuses a folder that holds a checkpoint already, unless overwrite; a resumed one gets the
    loaded checkpoint it continues."""

    LOG_HEADER = "step,train_loss,val_loss,val_nats_per_char,lr,tokens_per_s,peak_mib,seconds"

    def __init__(self, cfg, checkpoint=None, overwrite=False, data_sha256=None, lock=None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "ckpt.pt"
        self.checkpoint = checkpoint
        self.overwrite = overwrite
        self.data_sha256 = data_sha256
        self.rank, self.world_size, local_rank = torchrun_process()
        self.is_main = self.rank == 0
        self.device = pick_device(cfg.device, local_rank if self.world_size > 1 else None)
        self.cache_dir = self.out if self.is_main else None  # only rank 0 writes files
        self.rows = list(checkpoint.get("log", [])) if checkpoint else []
        self.lock = lock  # the folder's lock, if the caller took it already
        self.stop_requested = False
        self.signal_number = None
        self.real_stdout = None
        self.old_handlers = {}

    def __enter__(self):
        try:
            if self.world_size > 1:
                if self.device.type == "cuda":
                    dist.init_process_group("nccl", device_id=self.device)
                else:
                    dist.init_process_group("gloo")
            if self.is_main:
                self.lock = self.lock or lock_folder(self.out)
                remove_temp_files(self.out)
                if self.checkpoint is None and self.ckpt_path.exists() and not self.overwrite:
                    raise ValueError(f"{self.ckpt_path} already holds a run: continue it with "
                                     f"--resume (and --steps N to train it further), replace it "
                                     f"with --overwrite, or give another --out")
            else:  # only rank 0 prints
                self.real_stdout = sys.stdout
                sys.stdout = open(os.devnull, "w")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, exc_type=None, *exc):
        for signum, handler in self.old_handlers.items():
            signal.signal(signum, handler)
        if self.lock is not None:
            self.lock.close()
        if self.real_stdout is not None:
            sys.stdout.close()
            sys.stdout = self.real_stdout
        # processes leave the group together, after a barrier: one that tears it down while
        # another still uses it can hang. After an error, torchrun ends them all instead.
        if self.world_size > 1 and dist.is_initialized() and exc_type is None:
            dist.barrier()
            dist.destroy_process_group()
        return False

    def on_signal(self, signum, frame):
        self.signal_number = signum  # the step in progress finishes first; step_done() sees this

    def saved_tokenizer(self):
        """The tokenizer of the run being resumed, or None for a fresh run."""
        return Tokenizer(self.checkpoint["tokenizer"]) if self.checkpoint else None

    def start(self, model, optimizer, batches, tok, val_chars):
        """Take the run's objects; a resumed run loads its state into them. Returns the first
        step. val_chars, the characters of the validation targets, gives the log nats per char."""
        self.model = model
        self.optimizer = optimizer
        self.batches = batches
        self.tok = tok
        self.val_tokens_per_char = EVAL_BATCHES * self.cfg.batch_size * self.cfg.context / val_chars
        step = 0
        if self.checkpoint is not None:
            model.load_state_dict(self.checkpoint["model"])
            try:
                optimizer.load_state_dict(self.checkpoint["optimizer"])
                batches.set_state(self.checkpoint["rng"])
                check_optimizer_state(optimizer)
            except (ValueError, RuntimeError, KeyError, TypeError) as e:
                raise ValueError(f"{self.ckpt_path} cannot be resumed: its optimizer or random "
                                 f"state is damaged ({str(e)[:200]})") from None
            step = self.checkpoint["step"]
            print(f"resuming {self.ckpt_path} at step {step}")
        if self.world_size > 1:
            share = self.cfg.batch_size // self.world_size
            print(f"{self.world_size} processes, {share} sequences each of every batch of "
                  f"{self.cfg.batch_size}: together they compute what one process computes")
        # from here on, Ctrl-C and SIGTERM stop the run after the step in progress, and it saves
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.old_handlers[signum] = signal.signal(signum, self.on_signal)
        self.first_step = step
        self.last_step = step
        self.started = time.time()
        self.interval_start = self.started
        self.interval_end = self.started
        self.validation_seconds = 0.0
        return step

    def wrap(self, model):
        """What the loop trains: the model; under torchrun, in DistributedDataParallel, which
        averages the gradients of all processes in backward(); with --compile, compiled."""
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if self.cfg.compile:
            model = compile_training(model, self.optimizer)
        return model

    def share(self, batch):
        """This process's rows of a batch that every process drew alike (all of it, alone)."""
        return batch.chunk(self.world_size)[self.rank]

    def mean_loss(self, losses, step):
        """The mean of the losses since the last log line, over all processes. A non-finite one
        stops the run before anything is saved."""
        self.interval_end = time.time()  # the interval's training ends here, its validation starts
        losses = torch.stack(losses).float()
        if self.world_size > 1:
            dist.all_reduce(losses)  # a sum over the processes
            losses /= self.world_size
        bad = ~torch.isfinite(losses)
        if bad.any():
            first = step - len(losses) + 1 + int(bad.nonzero()[0])
            kept = (f"{self.ckpt_path} was left as it was" if self.ckpt_path.exists()
                    else "nothing was saved")
            raise FloatingPointError(f"the training loss became {losses[bad][0].item()} at step "
                                     f"{first}: try a lower --lr than {self.cfg.lr}; {kept}")
        return losses.mean().item()

    def progress(self, step):
        """Training tokens per second over the last interval, and the time elapsed and left."""
        now = time.time()
        self.validation_seconds += now - self.interval_end
        tokens = (step - self.last_step) * self.cfg.batch_size * self.cfg.context
        self.tokens_per_s = tokens / max(1e-9, self.interval_end - self.interval_start)
        elapsed = now - self.started
        left = elapsed / (step - self.first_step) * (self.cfg.steps - step)
        self.last_step = step
        self.interval_start = now
        return f"{self.tokens_per_s:,.0f} tok/s | {elapsed:.0f}s elapsed, {left:.0f}s left"

    def log(self, step, train_loss, val_loss, lr):
        """A row of log.csv, written with the next checkpoint so that the two always agree."""
        nats_per_char = val_loss * self.val_tokens_per_char
        seconds = time.time() - self.started
        self.rows.append([step, train_loss, val_loss, nats_per_char, lr, self.tokens_per_s,
                          peak_memory_mib(self.device), seconds])

    def step_done(self, step, losses):
        """After each step: hear a signal (under torchrun, any process's), and save the
        checkpoint every --save-every steps."""
        stop = self.signal_number is not None
        if self.world_size > 1:  # every process stops after the same step
            flag = torch.tensor([float(stop)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = flag.item() > 0
        self.stop_requested = stop
        every = self.cfg.save_every
        if every and step % every == 0 and step < self.cfg.steps and not stop:
            self.save(step, losses)

    def save(self, step, losses):
        """The checkpoint, then log.csv, by rank 0, once the losses not yet logged are checked."""
        if losses:
            self.mean_loss(losses, step)  # raises on a non-finite loss
        if not self.is_main:
            return
        config = {key: getattr(self.cfg, key) for key in TRAIN_KEYS}
        rng = self.batches.get_state()
        save_checkpoint(self.ckpt_path, self.model, self.tok, self.optimizer, step, rng, config,
                        self.rows, self.data_sha256)
        lines = [self.LOG_HEADER] + [",".join(f"{value:.6g}" for value in row) for row in self.rows]
        atomic_write(self.out / "log.csv", ("\n".join(lines) + "\n").encode())

    def finish(self, step, losses):
        """Save the last checkpoint; say how to continue if a signal stopped the run."""
        self.save(step, losses)
        if self.stop_requested:
            command = "torchrun ... llama.py" if self.world_size > 1 else "python llama.py"
            print(f"\nstopped by signal {self.signal_number or 'in another process'} after step "
                  f"{step}; saved {self.ckpt_path}; continue with: {command} train --resume "
                  f"--out {self.cfg.out}")
            return
        total = time.time() - self.started
        share = 100 * self.validation_seconds / max(1e-9, total)
        print(f"saved {self.ckpt_path} | {total:.0f}s, {share:.0f}% of it validation logging | "
              f"peak memory {peak_memory_mib(self.device):,.0f} MiB")
        if self.world_size > 1:
            self.compare_processes()
        if self.is_main:
            plot_log(self.out)

    def compare_processes(self):
        """Every process must end with the same weights: compare a fingerprint of them."""
        fingerprint = torch.stack([torch.stack([p.double().sum(), p.double().norm()])
                                   for p in self.model.parameters()])
        fingerprints = [torch.zeros_like(fingerprint) for _ in range(self.world_size)]
        dist.all_gather(fingerprints, fingerprint)
        if all(torch.equal(f, fingerprints[0]) for f in fingerprints):
            print(f"weights identical on all {self.world_size} processes")
        else:
            print(f"warning: the weights differ between the {self.world_size} processes",
                  file=sys.stderr)


def plot_log(out):
    """out/loss.png from out/log.csv when matplotlib is installed (Colab has it); it is optional."""
    try:
        from matplotlib.figure import Figure  # not pyplot: a notebook's plotting is left alone
    except ImportError:
        return
    rows = np.loadtxt(out / "log.csv", delimiter=",", skiprows=1, ndmin=2)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(rows[:, 0], rows[:, 1], label="train (mean since the last point)")
    ax.plot(rows[:, 0], rows[:, 2], label="validation (fixed batches)")
    ax.axhline(ORIGINAL["val"]["loss"], color="gray", ls="--", label="original README, validation")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title="llama.py on Tiny Shakespeare")
    ax.legend()
    fig.savefig(out / "loss.png", dpi=100, bbox_inches="tight")


# -----------------------------------------------------------------------------
# Decoding: printing, compiling, bench
# Transformer.decode_step has the same shapes at every position, so torch.compile turns it into
# one graph for all of them. On CUDA, mode "reduce-overhead" also records that graph as a CUDA
# graph and replays it: one launch per token instead of hundreds. bench measures what each gives.


class TextStream:
    """Prints what each new token adds to the decoded text. Decoding the recent tokens together,
    not each piece alone, keeps the spaces that Llama's tokenizer drops at the start of a text,
    and waits for the rest of a character split over several byte pieces."""

    def __init__(self, tok, prompt_ids):
        self.tok = tok
        self.recent = list(prompt_ids[-64:])
        self.shown = tok.decode(self.recent)  # the decoded text of self.recent, printed already
        self.text = ""  # everything printed after the prompt

    def __call__(self, token):
        self.recent.append(token[0, 0].item())
        decoded = self.tok.decode(self.recent)
        if decoded.endswith("\ufffd"):  # half a character so far
            return
        new_text = decoded[len(self.shown):]
        print(new_text, end="", flush=True)
        self.text += new_text
        self.shown = decoded
        if len(self.recent) > 128:  # decode a bounded tail, however long the sample grows
            self.recent = self.recent[-64:]
            self.shown = self.tok.decode(self.recent)


def compile_decoding(model):
    """Replace model.decode_step by its compiled form: one graph for every position. On the CPU
    the graph is called through generated C++ (cpp_wrapper), skipping most of Python's cost."""
    quiet_compiler()
    if model.output.weight.device.type == "cuda":
        compiled = torch.compile(model.decode_step, fullgraph=True, mode="reduce-overhead")
    else:
        compiled = torch.compile(model.decode_step, fullgraph=True, options={"cpp_wrapper": True})
    model.decode_step = compiled  # `del model.decode_step` brings the eager step back
    return model


def compile_training(model, optimizer):
    """The model compiled for training, its forward and backward passes fused. On the CPU AdamW's
    step too, whose many small operations per parameter otherwise run one at a time (on CUDA it
    is a single fused kernel already)."""
    quiet_compiler()
    if next(model.parameters()).device.type == "cuda":
        return torch.compile(model)
    optimizer.step = torch.compile(optimizer.step, options={"cpp_wrapper": True})
    return torch.compile(model, options={"cpp_wrapper": True})


def quiet_compiler():
    """Silence what torch.compile says about this model that need not worry a user: the complex
    numbers of the rotary embeddings run outside its generated code, and the optimizer's
    profiler marks are dropped."""
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation")
    logging.getLogger("torch._dynamo.variables.ctx_manager").setLevel(logging.ERROR)


def count_parameters(args):
    """The model's parameters, counted from its shape, before any is allocated."""
    kv_dim = args.n_kv_heads * args.head_dim
    attention = 2 * args.dim * args.dim + 2 * args.dim * kv_dim  # wq, wo; wk, wv
    feed_forward = 3 * args.dim * args.hidden_dim  # w1, w2, w3
    per_layer = attention + feed_forward + 2 * args.dim  # and the two norms' gains
    return 2 * args.vocab_size * args.dim + args.n_layers * per_layer + args.dim


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(cfg, device, steps, warmup, compiled):
    """Training tokens/s on random tokens, and the seconds the first step took (compiling)."""
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model_args(cfg.vocab_size)).to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, device)
    trained = compile_training(model, optimizer) if compiled else model
    data = torch.randint(cfg.vocab_size, (max(100_000, 2 * cfg.context + 1),))  # any text will do
    started = time.perf_counter()
    for i in range(1 + warmup + steps):
        if i == 1:
            synchronize(device)
            first_step = time.perf_counter() - started
        if i == 1 + warmup:  # time only the steps after the first one and the warm-up
            synchronize(device)
            started = time.perf_counter()
        x, y = get_batch(data, cfg.batch_size, cfg.context)
        train_step(trained, optimizer, x.to(device), y.to(device), cfg.lr)
    synchronize(device)
    return steps * cfg.batch_size * cfg.context / (time.perf_counter() - started), first_step, model


def time_decoding(model, new_tokens, use_cache, repeats=2):
    """Greedy decoding tokens/s from one token, the best of repeats runs, and the tokens."""
    device = model.output.weight.device
    start = torch.zeros(1, 1, dtype=torch.long, device=device)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = model.generate(start, new_tokens, temperature=0, use_cache=use_cache)
        synchronize(device)
        best = max(best, new_tokens / (time.perf_counter() - started))
    return best, tokens


def bench(cfg, new_tokens=512, steps=50, warmup=10):
    """Training tokens/s and model FLOP/s (as PaLM counts them); decoding tokens/s with the KV
    cache and without; with cfg.compile, both compiled too, and the time compiling took."""
    device = pick_device(cfg.device)
    print(f"device {device} | {torch.get_num_threads()} threads | torch {torch.__version__}")
    train_speed, _, model = time_training(cfg, device, steps, warmup, compiled=False)
    args = model.args
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    weights = matrices - model.tok_embeddings.weight.numel()  # a lookup, not a product
    # per token: 6 FLOPs per weight (2 forward, 4 backward), and the attention scores and sums
    flops = 6 * weights + 12 * args.n_layers * cfg.context * args.dim
    print(f"train  {train_speed:10,.0f} tokens/s eager (batch {cfg.batch_size} x context "
          f"{cfg.context}, {steps} steps after {warmup} of warm-up): "
          f"{flops * train_speed / 1e12:.3g} TFLOP/s")
    result = {"train_tok_s": train_speed}
    if cfg.compile:
        speed, compiling, _ = time_training(cfg, device, steps, warmup, compiled=True)
        print(f"train  {speed:10,.0f} tokens/s compiled: {speed / train_speed:.2f}x eager, "
              f"{flops * speed / 1e12:.3g} TFLOP/s (its first step took {compiling:.1f} s)")
        result["compiled_train_tok_s"] = speed
    # decoding: the same shape, with a context that holds the whole generation
    decode_args = ModelArgs(**{**asdict(args), "max_seq_len": max(new_tokens + 1, cfg.context)})
    decoder = Transformer(decode_args).to(device).eval()
    cached, cached_tokens = time_decoding(decoder, new_tokens, use_cache=True)
    recomputed, recomputed_tokens = time_decoding(decoder, new_tokens, use_cache=False)
    same = torch.equal(cached_tokens, recomputed_tokens)
    print(f"decode {cached:10,.0f} tokens/s with the KV cache, {recomputed:,.0f} recomputing "
          f"({new_tokens} greedy tokens, batch 1): {cached / recomputed:.1f}x; same tokens: {same}")
    result.update(decode_tok_s=cached, recompute_tok_s=recomputed)
    if cfg.compile:
        compile_decoding(decoder)
        started = time.perf_counter()
        time_decoding(decoder, 2, use_cache=True, repeats=1)  # the first step compiles
        compiling = time.perf_counter() - started
        speed, compiled_tokens = time_decoding(decoder, new_tokens, use_cache=True)
        same = torch.equal(cached_tokens, compiled_tokens)
        print(f"decode {speed:10,.0f} tokens/s compiled: {speed / cached:.2f}x eager with the "
              f"cache; same tokens: {same} (compiling took {compiling:.1f} s)")
        result["compiled_decode_tok_s"] = speed
    where = "GPU" if device.type == "cuda" else "resident"
    print(f"peak memory {peak_memory_mib(device):,.0f} MiB ({where})")
    return result


# -----------------------------------------------------------------------------
# Meta's checkpoint layout
# What Meta's llama repository reads and writes, and with it the converters of llama.cpp,
# llama2.c and Hugging Face: params.json, the weights in consolidated.NN.pth (a file per
# model-parallel rank), and tokenizer.model. The parameter names and the rotary convention here
# are Meta's, so the tensors load as they are.

META_PARAMS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
               "ffn_dim_multiplier", "norm_eps", "rope_theta")
META_FILES = ("params.json", "consolidated.00.pth", "tokenizer.model")


def export_meta(ckpt_path, folder):
    """Write the model of one of our checkpoints into folder in Meta's layout, weights only."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file: give --out a folder")
    others = sorted(p.name for p in folder.glob("*") if p.name not in META_FILES)
    if others:
        raise ValueError(f"{folder} holds other files ({', '.join(others[:3])}): export into an "
                         f"empty or new folder")
    model, tok = load_model(ckpt_path, torch.device("cpu"))
    params = {name: getattr(model.args, name) for name in META_PARAMS}
    atomic_write(folder / "params.json", json.dumps(params, indent=2).encode() + b"\n")
    atomic_write(folder / "consolidated.00.pth", lambda f: torch.save(model.state_dict(), f))
    atomic_write(folder / "tokenizer.model", tok.model_proto)
    return folder


def read_meta_folder(folder, context):
    """ModelArgs, weights and tokenizer from a folder in Meta's layout (ours, LLaMA 1 or
    Llama 2), read as Meta's llama/generation.py builds its model."""
    if (folder / "ckpt.pt").is_file() and not (folder / "params.json").is_file():
        raise FileNotFoundError(f"{folder} is a folder: give the checkpoint in it, "
                                f"--ckpt {folder / 'ckpt.pt'}")
    for name in ("params.json", "tokenizer.model"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: a folder in Meta's layout holds "
                                    f"params.json, consolidated.00.pth (and more shards) and "
                                    f"tokenizer.model")
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{folder} has no consolidated.00.pth: its weights are missing")
    tokenizer_bytes = (folder / "tokenizer.model").read_bytes()
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\n", tokenizer_bytes):  # base64 tokens and their ranks
        raise ValueError(f"{folder}/tokenizer.model is a tiktoken tokenizer (Llama 3's), which "
                         f"this file does not read: it runs LLaMA 1 and Llama 2, whose "
                         f"tokenizer is SentencePiece")
    try:
        params = json.loads((folder / "params.json").read_text())
        tok = Tokenizer(tokenizer_bytes)
        vocab_size = params.get("vocab_size", -1)
        args = ModelArgs(dim=params["dim"], n_layers=params["n_layers"],
                         n_heads=params["n_heads"], n_kv_heads=params.get("n_kv_heads"),
                         vocab_size=vocab_size if vocab_size > 0 else tok.vocab_size,  # -1
                         multiple_of=params.get("multiple_of", 256),
                         ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                         norm_eps=params.get("norm_eps", 1e-5),
                         rope_theta=params.get("rope_theta", 10000.0),
                         max_seq_len=context)  # params.json has no context length
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{folder}: params.json or tokenizer.model cannot be read "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    weights = [torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
               for shard in shards]
    return args, join_shards(weights), tok


def join_shards(shards):
    """One state dict from Meta's model-parallel shards. Meta's code split the embedding, wo and
    w2 along their input dimension (1), the other matrices along their output dimension (0),
    and copied the norms' gains whole into every shard. rope.freqs is computed here: dropped."""
    joined = {}
    for name, first in shards[0].items():
        if name == "rope.freqs":
            continue
        if first.dim() == 1 or len(shards) == 1:
            joined[name] = first
            continue
        axis = 1 if name.endswith(("tok_embeddings.weight", "wo.weight", "w2.weight")) else 0
        joined[name] = torch.cat([shard[name] for shard in shards], dim=axis)
    return joined


# -----------------------------------------------------------------------------
# Command line
# main(argv) parses its own list, so that a notebook can call main(["train", "--steps", "200"]).
# The flags are checked here, at the door, before any work starts: every mistake, a mistyped
# number included, prints one line starting with "error:" and returns 1, without a traceback.

MAX_NEW_TOKENS = 1_000_000  # per sample: generate() keeps every token it makes
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
RESUMABLE = ("steps", "log_interval", "data")  # what --resume may change; the rest is the run's


class UsageError(ValueError):
    """A mistake on the command line."""


class HelpShown(Exception):
    """--help was printed: main() returns its status."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


class Interrupted(Exception):
    """Ctrl-C outside the training loop, with what it leaves behind."""


class Parser(argparse.ArgumentParser):
    """argparse, raising UsageError where it would print the usage and exit with status 2."""

    def error(self, message):
        if message.startswith(("the following arguments are required: command",
                               "argument command:")):
            raise UsageError("give a command: train, sample, eval, bench or export "
                             "(python llama.py --help)")
        raise UsageError(f"{message} (`python {self.prog} --help` lists the flags)")

    def exit(self, status=0, message=None):
        if message:
            print(message, file=sys.stderr)
        raise HelpShown(status)


def add_training_flags(p):
    p.add_argument("--steps", type=int, default=EPOCHS,
                   help="optimizer steps (EPOCHS, %(default)s)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="sequences per step (BATCH_SIZE, %(default)s)")
    p.add_argument("--context", type=int, default=CONTEXT_WINDOW,
                   help="tokens per sequence (CONTEXT_WINDOW, %(default)s)")
    p.add_argument("--dim", type=int, default=DIM, help="residual stream width (DIM, %(default)s)")
    p.add_argument("--layers", type=int, default=LAYERS, help="blocks (LAYERS, %(default)s)")
    p.add_argument("--heads", type=int, default=HEADS, help="query heads (HEADS, %(default)s)")
    p.add_argument("--kv-heads", type=int, default=KV_HEADS,
                   help="key/value heads (KV_HEADS, %(default)s)")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE,
                   help="tokenizer pieces (VOCAB_SIZE, %(default)s)")
    p.add_argument("--lr", type=float, default=LEARNING_RATE,
                   help="peak learning rate (LEARNING_RATE, %(default)s)")
    p.add_argument("--warmup", type=int, default=WARMUP_STEPS,
                   help="warmup steps (WARMUP_STEPS, %(default)s)")
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY,
                   help="AdamW's weight decay on the weight matrices (WEIGHT_DECAY, %(default)s)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="residual dropout while training; LLaMA has none (%(default)s)")
    p.add_argument("--log-interval", type=int, default=LOG_INTERVAL,
                   help="steps per log line (LOG_INTERVAL, %(default)s)")


def add_common_flags(p):
    p.add_argument("--seed", type=int, default=SEED, help="random seed (SEED, %(default)s)")
    p.add_argument("--device", default="auto",
                   help="cuda, cuda:N, mps, cpu, or auto: the first of them available")


def add_sampling_flags(p):
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500,
                   help="tokens to generate (%(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (%(default)s)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the k likeliest tokens only")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the likeliest tokens holding this much probability")
    p.add_argument("--num-samples", type=int, default=1, help="samples (%(default)s)")
    p.add_argument("--compile", action="store_true", help="compile the decode step first")


def add_checkpoint_flags(p):
    p.add_argument("--ckpt", default=str(Path(OUT_DIR) / "ckpt.pt"),
                   help="our checkpoint file, or a folder in Meta's layout (%(default)s)")
    p.add_argument("--context", type=int, default=None,
                   help="context length; default: the checkpoint's, 2048 for a Meta folder")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="the weights' dtype; auto: the checkpoint's on a GPU, else float32")


def build_parser():
    parser = Parser(prog="llama.py", description=__doc__.strip().split("\n\n")[0],
                    allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="command", required=True,
                                     parser_class=Parser)

    train = commands.add_parser("train", help="train a model and evaluate it", allow_abbrev=False)
    add_training_flags(train)
    add_common_flags(train)
    train.add_argument("--data", default=None, help="a UTF-8 text file (default: Tiny Shakespeare)")
    train.add_argument("--out", default=OUT_DIR, help="output folder (OUT_DIR, %(default)s)")
    train.add_argument("--save-every", type=int, default=0,
                       help="also save every N steps (default 0: at the end only)")
    train.add_argument("--resume", action="store_true", help="continue the run saved in OUT")
    train.add_argument("--overwrite", action="store_true", help="replace the run saved in OUT")
    train.add_argument("--compile", action="store_true", help="torch.compile the training step")

    sample = commands.add_parser("sample", help="generate text from a checkpoint",
                                 allow_abbrev=False)
    add_checkpoint_flags(sample)
    add_common_flags(sample)
    add_sampling_flags(sample)

    evaluation = commands.add_parser("eval", help="evaluate a checkpoint on val and test",
                                     allow_abbrev=False)
    add_checkpoint_flags(evaluation)
    add_common_flags(evaluation)
    evaluation.add_argument("--data", default=None,
                            help="a UTF-8 text file (default: Tiny Shakespeare)")
    evaluation.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                            help="windows per batch, times 16 (%(default)s)")

    speed = commands.add_parser("bench", help="training and decoding tokens/s", allow_abbrev=False)
    add_training_flags(speed)
    add_common_flags(speed)
    speed.add_argument("--new-tokens", type=int, default=512, help="tokens decoded (%(default)s)")
    speed.add_argument("--bench-steps", type=int, default=50,
                       help="timed training steps (%(default)s)")
    speed.add_argument("--bench-warmup", type=int, default=10,
                       help="untimed steps before them (%(default)s)")
    speed.add_argument("--compile", action="store_true",
                       help="also time the compiled training step and decoding")

    export = commands.add_parser("export", help="write a checkpoint in Meta's layout",
                                 allow_abbrev=False)
    export.add_argument("--ckpt", default=str(Path(OUT_DIR) / "ckpt.pt"),
                        help="our checkpoint (%(default)s)")
    export.add_argument("--out", required=True, help="the folder to write")
    return parser


def flag(name):
    return "--" + name.replace("_", "-")


def check_at_least(args, name, minimum):
    value = getattr(args, name)
    if value < minimum:
        raise UsageError(f"{flag(name)} must be at least {minimum}, got {value}")


def check_seed(args):
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")


def check_training_flags(args):
    for name in ("steps", "batch_size", "context", "dim", "layers", "heads", "kv_heads",
                 "log_interval"):
        check_at_least(args, name, 1)
    check_at_least(args, "vocab_size", 2)
    check_at_least(args, "warmup", 0)
    check_seed(args)
    if args.context > MAX_CONTEXT:
        raise UsageError(f"--context must be at most {MAX_CONTEXT:,}, got {args.context}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be 0 or more, got {args.weight_decay}")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    # the model's shape: heads that divide dim and are divided by kv_heads, an even head size
    ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
              vocab_size=args.vocab_size, max_seq_len=args.context)


def check_sample_flags(args):
    check_at_least(args, "max_new_tokens", 0)
    check_at_least(args, "num_samples", 1)
    check_seed(args)
    if args.max_new_tokens > MAX_NEW_TOKENS:
        raise UsageError(f"--max-new-tokens must be at most {MAX_NEW_TOKENS:,}, got "
                         f"{args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be 0 (greedy) or a positive number, got "
                         f"{args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.prompt == "":
        raise UsageError('the prompt is empty: give at least one character, such as --prompt "\\n" '
                         '(the default)')
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise UsageError(f"the prompt is not valid UTF-8 text (at character {e.start}): retype "
                         f"it") from None


def check_checkpoint_flags(args):
    if args.context is not None and not 1 <= args.context <= MAX_CONTEXT:
        raise UsageError(f"--context must be between 1 and {MAX_CONTEXT:,}, got {args.context}")


def device_memory(device):
    """The device's memory in bytes: the GPU's, or the machine's; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_memory(cfg, device):
    """Refuse, before allocating anything, a run that cannot fit in the device's memory."""
    args = cfg.model_args(cfg.vocab_size)
    params = count_parameters(args)
    tokens = cfg.batch_size * cfg.context
    # float32 weights, gradients and AdamW's two moments; the activations backward() keeps
    per_token = args.n_layers * (10 * args.dim + 4 * args.hidden_dim) + 4 * args.vocab_size
    needed = 4 * (4 * params + tokens * per_token)
    total = device_memory(device)
    if total is not None and needed > total:
        raise ValueError(f"this run needs about {needed / 2**30:,.1f} GiB ({params:,} parameters "
                         f"with their gradients and AdamW's state, and the activations of "
                         f"{tokens:,} tokens per step), more than the {total / 2**30:,.1f} GiB of "
                         f"{device}: use a smaller --batch-size, --context, --dim or --layers")


def train_config(args):
    names = [f.name for f in fields(TrainConfig) if hasattr(args, f.name)]
    return TrainConfig(**{name: getattr(args, name) for name in names})


def resume_config(cfg, given):
    """The settings of the run saved in cfg.out, with those --resume may change taken from the
    command line; the others are refused. Returns (settings, checkpoint, sha256 of the text)."""
    path = Path(cfg.out) / "ckpt.pt"
    ckpt = load_checkpoint(path, for_resume=True)
    saved = ckpt["config"]
    for key in TRAIN_KEYS:
        if key in given and key not in RESUMABLE and getattr(cfg, key) != saved[key]:
            raise UsageError(f"{flag(key)} cannot change when resuming: {path} was trained with "
                             f"{flag(key)} {saved[key]}; drop the flag to continue that run, or "
                             f"train a new one into another --out")
    cfg = dataclasses.replace(cfg, **{key: saved[key] for key in TRAIN_KEYS if key not in given})
    step = ckpt["step"]
    if cfg.steps <= step and "steps" in given:
        raise UsageError(f"--steps {cfg.steps} is not past step {step}, where {path} stopped: "
                         f"give more")
    if cfg.steps <= step:
        raise UsageError(f"{path} has finished its {step} steps: add --steps N, more than "
                         f"{step}, to train it further")
    data_sha256 = hashlib.sha256(get_text(cfg.data).encode()).hexdigest()
    if ckpt.get("data_sha256") not in (None, data_sha256):
        raise UsageError(f"the text in {cfg.data or DATA_PATH} is not the one {path} was "
                         f"trained on: give the same --data")
    return cfg, ckpt, data_sha256


def command_train(args, given):
    check_training_flags(args)
    check_at_least(args, "save_every", 0)
    cfg = train_config(args)
    rank, world_size, _ = torchrun_process()
    if cfg.batch_size % world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split evenly over "
                         f"{world_size} processes")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite replaces it: give one")
    # rank 0 holds the folder from here on: no other run changes it while this one reads it
    lock = lock_folder(Path(cfg.out)) if rank == 0 else None
    try:
        if args.resume:
            cfg, checkpoint, data_sha256 = resume_config(cfg, given)
        else:
            checkpoint = None
            text = get_text(cfg.data)
            check_length(text, cfg.context)
            data_sha256 = hashlib.sha256(text.encode()).hexdigest()
        run = Run(cfg, checkpoint, args.overwrite, data_sha256, lock)
        check_memory(cfg, run.device)
        result = train(cfg, run)  # releases the lock when it ends
    except KeyboardInterrupt:
        raise Interrupted("interrupted before training began: nothing was saved") from None
    finally:
        if lock is not None:
            lock.close()
    if result is None:
        return 130  # stopped by a signal, the checkpoint saved
    if run.is_main:
        model, tok, data = result
        try:
            report(model, tok, data, cfg.context, 16 * cfg.batch_size)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted during the evaluation; {run.ckpt_path} is saved, "
                              f"and `python llama.py eval --ckpt {run.ckpt_path}` evaluates "
                              f"it") from None
    return 0


def command_sample(args):
    check_sample_flags(args)
    check_checkpoint_flags(args)
    device = pick_device(args.device)
    model, tok = load_model(args.ckpt, device, DTYPES[args.dtype], args.context)
    unknown = tok.unknown_chars(args.prompt)
    if unknown:
        raise UsageError(f"the prompt has characters the tokenizer never saw: {unknown!r}; "
                         f"remove or replace them")
    n_prompt = len(tok.encode(args.prompt))
    if n_prompt > model.args.max_seq_len:
        print(f"(the prompt has {n_prompt} tokens; the model sees its last "
              f"{model.args.max_seq_len})", file=sys.stderr)
    if args.compile:
        compile_decoding(model)
    sample(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
           args.top_p, args.seed, args.num_samples)
    return 0


def command_eval(args):
    check_at_least(args, "batch_size", 1)
    check_checkpoint_flags(args)
    device = pick_device(args.device)
    model, tok = load_model(args.ckpt, device, DTYPES[args.dtype], args.context)
    text = get_text(args.data)
    data = encode_splits(text, tok)
    check_splits(text, tok, data, model.args.max_seq_len)
    report(model, tok, data, model.args.max_seq_len, 16 * args.batch_size)
    return 0


def command_bench(args):
    check_training_flags(args)
    check_at_least(args, "new_tokens", 1)
    check_at_least(args, "bench_steps", 1)
    check_at_least(args, "bench_warmup", 0)
    if args.new_tokens >= MAX_CONTEXT:
        raise UsageError(f"--new-tokens must be less than {MAX_CONTEXT:,}, got {args.new_tokens}")
    cfg = train_config(args)
    check_memory(cfg, pick_device(cfg.device))
    bench(cfg, args.new_tokens, args.bench_steps, args.bench_warmup)
    return 0


def command_export(args):
    folder = export_meta(args.ckpt, args.out)
    print(f"wrote {', '.join(str(folder / name) for name in META_FILES)}")
    return 0


def is_out_of_memory(e):
    message = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in message or (
        "out of memory" in message)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # the flags typed, so that --resume can tell them from defaults (abbreviations are off)
    given = {token.split("=")[0][2:].replace("-", "_") for token in argv if token.startswith("--")}
    try:
        args = build_parser().parse_args(argv)
        if args.command == "train":
            return command_train(args, given)
        if args.command == "sample":
            return command_sample(args)
        if args.command == "eval":
            return command_eval(args)
        if args.command == "bench":
            return command_bench(args)
        return command_export(args)
    except HelpShown as e:
        return e.status
    except BrokenPipeError:  # the reader went away (sample | head): stop quietly, like Unix tools
        if sys.stdout is sys.__stdout__:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing to flush
        return 141
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        first_line = str(e).splitlines()[0][:120]
        print(f"error: out of memory ({first_line}): use a smaller --batch-size, --context or "
              f"model", file=sys.stderr)
        return 1


if __name__ == "__main__" and "__file__" in globals():  # a pasted cell runs nothing: call main()
    sys.exit(main())
