"""
llama.py: a LLaMA language model written from scratch and trained on Tiny Shakespeare, in one file.

    python llama.py train       download the text, train a tokenizer and the model, evaluate it
    python llama.py sample      print text from out/ckpt.pt as it is generated
    python llama.py eval        loss, accuracy, perplexity and bits per character on val and test
    torchrun --standalone --nproc_per_node=2 llama.py train     the same run, data parallel

`python llama.py train --help` lists the flags. In a notebook, paste the file into a cell, then
call main(["train", "--steps", "200"]). The scripts in tools/ import this file.

What LLaMA changes relative to GPT-2. Both normalize the input of each sub-layer (pre-norm), but:
- RMSNorm instead of LayerNorm: divide by the root mean square; no mean subtracted, no bias.
- Rotary positional embeddings (RoPE) instead of a learned table of positions: queries and keys
  are turned by angles that grow with their position, so their dot products see distances.
- A SwiGLU feed-forward, a gated MLP with three matrices, instead of GELU with two.
- No biases; an output layer of its own, not GPT-2's tied input embedding (Llama 3.2 1B, 3B tie).
- Grouped-query attention, in Llama 2's 34B and 70B and in every Llama 3: each key/value head
  serves a group of query heads, which shrinks the KV cache. This file's KV_HEADS = 1, one
  key/value head for all query heads, is multi-query attention (Shazeer 2019): the original
  notebook's choice, and no LLaMA release's.

References: Touvron et al. 2023, "LLaMA" (arXiv:2302.13971) and "Llama 2" (arXiv:2307.09288);
Meta's llama/model.py, whose parameter names this file uses; Zhang & Sennrich 2019 (RMSNorm); Su
et al. 2021 (RoPE); Shazeer 2020 (SwiGLU); Ainslie et al. 2023 (grouped-query attention).
"""
import argparse
import hashlib
import io
import math
import os
import signal
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import requests
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Hyperparameters
# The documented ones keep their names; a flag of `train` overrides each for one run, never them.

VOCAB_SIZE = 130  # pieces in the SentencePiece vocabulary
BATCH_SIZE = 32  # sequences per optimizer step
CONTEXT_WINDOW = 16  # tokens per sequence: the longest context the model sees (--context)
# EPOCHS keeps its documented name but counts optimizer steps, each on one random batch, not
# passes over the data (--steps): 1000 steps of 32 x 16 tokens see about the training split once
EPOCHS = 1000
DIM = 128  # features per token in the residual stream
LOG_INTERVAL = 10  # optimizer steps between log lines, each with a validation loss
HEADS = 8  # query heads per attention layer
LAYERS = 4  # transformer blocks
KV_HEADS = 1  # key/value heads: 1 is multi-query, HEADS is multi-head, between is grouped-query
LEARNING_RATE = 1e-3  # AdamW's peak learning rate, reached at the end of warmup (--lr)
WARMUP_STEPS = 50  # steps of linear warmup up to LEARNING_RATE (--warmup)
MIN_LR_FRACTION = 0.1  # the cosine decay ends at this fraction of LEARNING_RATE
WEIGHT_DECAY = 0.1  # AdamW's decoupled weight decay, on the weight matrices only
GRAD_CLIP = 1.0  # the gradient's global L2 norm is clipped to this
EVAL_BATCHES = 4  # fixed validation batches behind each log line's validation loss
SEED = 1337  # the initial weights, the batches, dropout and sampling follow from it
OUT_DIR = "out"  # where the checkpoint and log.csv go (--out)

# input.txt beside llama.py, or in the working folder when pasted into a notebook (no __file__)
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
DATA_PATH = HERE / "input.txt"
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
ORIGINAL = {"val": {"loss": 4.469, "accuracy": 0.0559, "perplexity": 87.3},  # its README's
            "test": {"accuracy": 0.0562, "perplexity": 87.7}}

# -----------------------------------------------------------------------------
# Download
# Tiny Shakespeare, 1.1 MB of plays, is fetched once into input.txt and checked against its
# sha256. Like every file this program writes, it is written whole or not at all (atomic_write).

def download(url, path, sha256, timeout=30.0):
    """Fetch url into path, if what arrives has the given sha256."""
    print(f"downloading {url} to {path}", flush=True)
    try:
        response = requests.get(url, timeout=timeout)  # timeout: seconds without a byte
        response.raise_for_status()
        if hashlib.sha256(response.content).hexdigest() != sha256:
            raise requests.RequestException(f"{len(response.content):,} bytes, not the file")
    except requests.RequestException as e:
        raise OSError(f"could not download {url} ({e}): fetch it by hand into {path}") from None
    atomic_write(path, lambda f: f.write(response.content))

def get_text(path=None):
    """The text to learn from: the UTF-8 file at path, or Tiny Shakespeare if path is None."""
    if path is None and not DATA_PATH.exists():
        download(DATA_URL, DATA_PATH, DATA_SHA256)
    path = path or DATA_PATH
    try:  # "\r\n" and "\r" are read as "\n": SentencePiece keeps no piece for "\r"
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from None
    if not text:
        raise ValueError(f"{path} is empty: give a text to learn from")
    return text

# -----------------------------------------------------------------------------
# Tokenizer
# SentencePiece BPE with VOCAB_SIZE pieces, trained on the training split only. With its
# normalization off and "\n" a piece of its own, decode(encode(text)) == text for any text of
# the characters it was trained on. It writes a space as "▁", so a "▁" in the text comes back as
# a space; a character it has no piece for (its trainer keeps none for NUL) comes back as " ⁇ ".

def train_tokenizer(text, vocab_size):
    """A SentencePiece BPE model of vocab_size pieces, trained on text."""
    lines = text.splitlines(keepends=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0,  # every character gets a piece
            # no Unicode normalization, no space added before the text, runs of spaces kept
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],  # the newline, a piece of its own
            # it skips lines longer than max_sentence_length bytes (4192 by default): none here
            max_sentence_length=max([4192] + [len(line.encode()) + 1 for line in lines]),
            bos_id=-1, eos_id=-1,  # no beginning- or end-of-text pieces: none is used
            num_threads=1, minloglevel=2)  # one thread: the same pieces on every run
    except RuntimeError as e:  # "Vocabulary size is too high": a text too small for it
        raise ValueError(f"--vocab-size {vocab_size} does not fit this text ({e})") from None
    return spm.SentencePieceProcessor(model_proto=model.getvalue())

# -----------------------------------------------------------------------------
# Data
# Three contiguous parts, 70% train, 15% validation, 15% test, as the original notebook had. A
# batch is BATCH_SIZE random windows of CONTEXT_WINDOW tokens; its targets are one token later.

def split_text(text):
    """Cut at the 70% and 85% marks, by characters, so the tokenizer can learn from train only."""
    train_end = int(0.7 * len(text))
    val_end = int(0.85 * len(text))
    return {"train": text[:train_end], "val": text[train_end:val_end], "test": text[val_end:]}

def encode_splits(splits, tok, context):
    """The token ids of each split as a 1-D tensor, which must hold a window and its targets."""
    data = {}
    for name, part in splits.items():
        data[name] = torch.tensor(tok.encode(part), dtype=torch.long)
        if len(data[name]) < context + 1:
            raise ValueError(f"the text is too short: its {name} split is {len(data[name])} "
                             f"tokens, a window {context + 1}: give more text or a smaller --context")
    return data

def get_batch(data, batch_size, context, generator=None):
    """batch_size random windows of data: inputs (B, T) and targets (B, T), one token later."""
    starts = torch.randint(len(data) - context, (batch_size,), generator=generator)  # (B,)
    rows = data[starts[:, None] + torch.arange(context + 1)]  # (B, T + 1)
    return rows[:, :-1], rows[:, 1:]

def windows(data, context):
    """Every token of data but the first, once, as a target, in consecutive windows."""
    pad = -(len(data) - 1) % context  # the last window padded to full length
    x = F.pad(data[:-1], (0, pad))
    y = F.pad(data[1:], (0, pad), value=-100)  # cross_entropy skips targets of -100
    return x.view(-1, context), y.view(-1, context)  # (N, T) each

# -----------------------------------------------------------------------------
# Model
# Smallest part first, in forward-pass order: RMSNorm, rotary embeddings, attention with its KV
# cache, SwiGLU, the block, the model, generate(). Only ModelArgs' defaults read the constants.

@dataclass
class ModelArgs:
    """The model's shape, named as in Meta's llama/model.py."""
    dim: int = DIM
    n_layers: int = LAYERS
    n_heads: int = HEADS
    n_kv_heads: int = KV_HEADS
    vocab_size: int = VOCAB_SIZE
    multiple_of: int = 256  # the feed-forward width is rounded up to a multiple of this
    ffn_dim_multiplier: float = 1.0  # Meta's None is 1.0; Llama 2 70B has 1.3
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = CONTEXT_WINDOW
    dropout: float = 0.0  # not Meta's: LLaMA trains on far more text than this, and drops nothing

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:  # rotary embeddings turn pairs of features
            raise ValueError(f"the head size dim / n_heads = {self.dim} / {self.n_heads} is odd")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def hidden_dim(self):
        """SwiGLU's width: 2/3 of GPT-2's 4 * dim, so that its three matrices hold as many weights
        as GPT-2's two, rounded up to multiple_of (LLaMA-7B: 11008). At dim 128 the 2/3 rule gives
        341, which rounds up to 512 = 4 * dim: at this size the rounding undoes the rule."""
        hidden = int(self.ffn_dim_multiplier * int(2 * 4 * self.dim / 3))
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over each token's features: no mean, no bias."""
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # in float32 even under bf16 autocast, as Meta's code does
        # each token divided by its own root mean square, over its features (the last dimension)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

def precompute_rope(head_dim, max_seq_len, theta=10000.0):
    """cos and sin of the angle pos * theta^(-2j / head_dim) by which feature pair j turns at
    position pos: two tables (max_seq_len, head_dim/2). Pair j turns more slowly than pair j-1."""
    # on the CPU, moved with the model: real even in one built on the meta device (load_model)
    pairs = torch.arange(0, head_dim, 2, device="cpu").float()
    inv_freq = 1.0 / theta ** (pairs / head_dim)  # (head_dim/2,)
    angles = torch.outer(torch.arange(max_seq_len, device="cpu").float(), inv_freq)
    return angles.cos(), angles.sin()  # (max_seq_len, head_dim/2) each

def apply_rotary_emb(x, cos, sin):
    """Turn each feature pair (x[2j], x[2j+1]) of x (B, T, heads, head_dim) by its position's
    angle, as Meta does by multiplying the complex number x[2j] + i x[2j+1] by e^(i angle). A
    turned query and key have a dot product that sees their positions only as their distance."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, heads, head_dim/2, 2)
    even = pairs[..., 0]  # (B, T, heads, head_dim/2)
    odd = pairs[..., 1]
    # (even + i odd)(cos + i sin) = (even cos - odd sin) + i (even sin + odd cos); cos and sin
    # are (T, 1, head_dim/2), alike for every head
    turned = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return turned.flatten(-2).type_as(x)  # (B, T, heads, head_dim)

class Attention(nn.Module):
    """Causal self-attention in which each key/value head serves a group of n_heads // n_kv_heads
    query heads: n_kv_heads == n_heads is multi-head, 1 multi-query, between grouped-query."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # the KV cache, (B, max_seq_len, n_kv_heads, head_dim) each, made by setup_cache: buffers,
        # so that .to(device) moves them, but not saved in checkpoints
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def forward(self, x, cos, sin, positions=None):
        """x (B, T, dim), a sequence from position 0; or, with positions (T,), the next tokens of
        a sequence being generated, whose keys and values go into the KV cache."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        q = apply_rotary_emb(q, cos, sin)
        k = apply_rotary_emb(k, cos, sin)
        query_positions = torch.arange(T, device=x.device) if positions is None else positions
        if positions is not None:
            # the KV cache: store the new keys and values at their positions, then read all of
            # it: the same shapes at every step, so that one compiled graph serves every position
            self.cache_k.index_copy_(1, positions, k)
            self.cache_v.index_copy_(1, positions, v)
            k = self.cache_k  # (B, max_seq_len, n_kv_heads, head_dim)
            v = self.cache_v
        # the mask (T, S), S keys (T, or the cache's max_seq_len): the query at position p sees
        # the keys at 0 to p; -inf is added to the scores of later ones and of unwritten slots
        key_positions = torch.arange(k.size(1), device=x.device)
        mask = torch.where(key_positions > query_positions[:, None], float("-inf"), 0.0)
        # each key/value head serves n_heads // n_kv_heads query heads, side by side: Meta's
        # repeat_kv. F.scaled_dot_product_attention's enable_gqa=True does it without copies
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)  # (B, S, n_heads, hd)
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
        q = q.transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.transpose(1, 2)  # (B, n_heads, S, head_dim)
        v = v.transpose(1, 2)
        # softmax(q k^T / sqrt(head_dim) + mask) v in one fused kernel, equal up to rounding to
        # (q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + mask).softmax(dim=-1) @ v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, n_heads, T, head_dim)
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
        gate = F.silu(self.w1(x))  # (B, T, hidden_dim): silu(a) = a * sigmoid(a)
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

    def forward(self, x, cos, sin, positions=None):
        attended = self.attention(self.attention_norm(x), cos, sin, positions)
        h = x + F.dropout(attended, self.dropout, self.training)
        fed_forward = self.feed_forward(self.ffn_norm(h))
        return h + F.dropout(fed_forward, self.dropout, self.training)

class Transformer(nn.Module):
    """Token embeddings, n_layers blocks, a final RMSNorm, and a linear layer to the logits."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # buffers, so that .to(device) moves them; not saved: they follow from args, as in Meta's
        cos, sin = precompute_rope(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("freqs_cos", cos[:, None, :], persistent=False)  # (T, 1, hd/2)
        self.register_buffer("freqs_sin", sin[:, None, :], persistent=False)
        self.init_weights()

    def init_weights(self):
        """GPT-2's init, as nanoGPT has it (Meta's code publishes none): normal, std 0.02, and
        0.02 / sqrt(2 * n_layers) for wo and w2, whose outputs add up in the residual stream."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                deep = name.endswith(("wo.weight", "w2.weight"))
                std = 0.02 / math.sqrt(2 * self.args.n_layers) if deep else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None, positions=None):
        """Logits (B, T, vocab_size) for the tokens idx (B, T) and, with targets (B, T), the mean
        cross-entropy. With positions (T,), idx continues the cached sequence at those positions."""
        rows = slice(0, idx.size(1)) if positions is None else positions
        cos = self.freqs_cos[rows]  # (T, 1, head_dim/2): the rotary angles of idx's positions
        sin = self.freqs_sin[rows]
        h = self.tok_embeddings(idx)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, positions)
        logits = self.output(self.norm(h)).float()  # (B, T, vocab_size); the softmax is in the loss
        if targets is None:  # generating: no loss
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def setup_cache(self, batch_size):
        """Make each layer's KV cache, once for a batch size: written in place, never grown."""
        shape = (batch_size, self.args.max_seq_len, self.args.n_kv_heads, self.args.head_dim)
        for layer in self.layers:
            if layer.attention.cache_k is None or layer.attention.cache_k.shape != shape:
                layer.attention.cache_k = self.output.weight.new_zeros(shape)
                layer.attention.cache_v = self.output.weight.new_zeros(shape)

    def decode_step(self, token, position):
        """Logits (B, vocab) after token (B, 1) at position (1,): the same shapes at every step."""
        logits, _ = self(token, positions=position)
        return logits[:, -1]

    @torch.inference_mode()  # like no_grad, and lighter: these tensors will never need gradients
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
                 on_token=None, use_cache=True):
        """Continue idx (B, T0) by max_new_tokens tokens, calling on_token with each (B, 1).
        use_cache=False recomputes the whole window at every step, for comparison."""
        self.setup_cache(idx.size(0))
        window = idx[:, -self.args.max_seq_len:]  # (B, at most max_seq_len): what the model sees
        cached = 0  # how many tokens of the window the cache holds
        new_tokens = []
        for _ in range(max_new_tokens):
            if window.size(1) > self.args.max_seq_len:
                # full. Sliding the cache along would mean turning every cached key again for its
                # new position (and a ring buffer would need angles past max_seq_len). Instead the
                # newest half runs again from position 0, in one pass, and half a window of tokens
                # then comes from the cache before the next refill
                window = window[:, -max(1, self.args.max_seq_len // 2):]
                cached = 0
            if cached and use_cache:  # the token sampled last, alone, at position `cached`
                position = torch.tensor([cached], device=idx.device)
                logits = self.decode_step(token, position)
            else:  # all of the window: the prompt, a refill, or every step without the cache
                positions = torch.arange(window.size(1), device=idx.device)
                logits = self(window, positions=positions if use_cache else None)[0][:, -1]
            cached = window.size(1)
            token = sample_next(logits, temperature, top_k, generator)[:, None]  # (B, 1)
            window = torch.cat([window, token], dim=1)
            new_tokens.append(token)
            if on_token is not None:
                on_token(token)
        return torch.cat([idx, *new_tokens], dim=1)

def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """A token id per row of logits (B, vocab): the argmax at temperature 0, else a sample of
    softmax(logits / temperature), of the top_k likeliest only if top_k is given."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)  # (B,)

# -----------------------------------------------------------------------------
# Training
# AdamW with linear warmup, cosine decay and gradient clipping. Every LOG_INTERVAL steps a line:
# the mean training loss since the last one, and the loss on fixed validation batches. At the end
# (and every --save-every steps) a checkpoint, which --resume continues. Under torchrun every
# process draws the same batch and trains on its share of it; DDP averages their gradients.

def number(kind, low, high=math.inf):
    """An argparse type: a finite number of kind (int or float) from low to high."""
    def parse(text):
        value = kind(text)  # a ValueError here: argparse says "invalid int value: 'abc'"
        if not (math.isfinite(value) and low <= value <= high):
            bound = f"at least {low}" if high == math.inf else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse

def setting(default, kind, help):  # a TrainConfig field, with the type and help of its flag
    return field(default=default, metadata={"type": kind, "help": help})

@dataclass
class TrainConfig:
    """A training run's settings. Each is a flag of `train` (batch_size is --batch-size) whose
    default is the constant above; the checkpoint keeps them, and --resume reads them back."""
    steps: int = setting(EPOCHS, number(int, 1), "optimizer steps (EPOCHS)")
    batch_size: int = setting(BATCH_SIZE, number(int, 1), "sequences per step (BATCH_SIZE)")
    context: int = setting(CONTEXT_WINDOW, number(int, 1), "tokens per sequence (CONTEXT_WINDOW)")
    dim: int = setting(DIM, number(int, 1), "residual stream width (DIM)")
    layers: int = setting(LAYERS, number(int, 1), "transformer blocks (LAYERS)")
    heads: int = setting(HEADS, number(int, 1), "query heads (HEADS)")
    kv_heads: int = setting(KV_HEADS, number(int, 1), "key/value heads (KV_HEADS)")
    vocab_size: int = setting(VOCAB_SIZE, number(int, 2), "tokenizer pieces (VOCAB_SIZE)")
    lr: float = setting(LEARNING_RATE, number(float, 0), "peak learning rate (LEARNING_RATE)")
    warmup: int = setting(WARMUP_STEPS, number(int, 0), "warmup steps (WARMUP_STEPS)")
    weight_decay: float = setting(WEIGHT_DECAY, number(float, 0), "AdamW's (WEIGHT_DECAY)")
    dropout: float = setting(0.0, number(float, 0, 1), "residual dropout; LLaMA has none")
    log_interval: int = setting(LOG_INTERVAL, number(int, 1), "steps per log line (LOG_INTERVAL)")
    save_every: int = setting(0, number(int, 0), "also save every N steps; 0: at the end only")
    seed: int = setting(SEED, number(int, 0), "random seed (SEED)")
    data: str = setting(None, str, "a UTF-8 text file; default: Tiny Shakespeare")

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
    """AdamW, with weight decay on the weight matrices and none on the norms' gains."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    gains = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay},
              {"params": gains, "weight_decay": 0.0}]
    # LLaMA used beta2 = 0.95 with batches of 4M tokens. A batch here is 512 tokens, its gradient
    # far noisier: 0.99 averages the squared gradients over about 100 steps instead of 20
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=device.type == "cuda")

def autocast(device):
    """bf16 autocast on GPUs that compute in bf16 (compute capability 8.0 on; a T4 only emulates it).
    The weights and AdamW's state stay float32; matrix products run in bf16."""
    bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
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

def pick_device(name="auto"):
    """cuda, then mps, then cpu for "auto", else the device named; under torchrun, its GPU."""
    count = {"cuda": torch.cuda.device_count(), "mps": torch.backends.mps.is_available(), "cpu": 1}
    if name == "auto":
        name = next(kind for kind, n in count.items() if n)
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    kind, _, index = name.partition(":")
    if not (kind in count and (index or "0").isdigit() and int(index or 0) < count[kind]):
        raise ValueError(f"--device {name}: PyTorch sees no such device here, only {count}")
    return torch.device(name)

def torchrun_env():  # (rank, world size): torchrun sets RANK and WORLD_SIZE; a plain run: 0 of 1
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

def check_diverged(step, *losses):
    """Stop the run before anything is saved if a loss, or its exp (the perplexity), is not finite."""
    if not all(-math.inf < loss < math.log(sys.float_info.max) for loss in losses):
        raise FloatingPointError(f"the run diverged by step {step} (loss {max(losses):.4g}): try "
                                 f"a lower --lr; what was saved before was left as it was")

def atomic_write(path, write):
    """write(f) fills a temporary file of this process's own, which then takes path's name: a
    crash, a full disk or a kill leaves the old file as it was, and no half-written one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def save_checkpoint(out, model, optimizer, run):
    """out/ckpt.pt, then out/log.csv from its rows: tensors, numbers, strings and bytes only."""
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.args),
            "optimizer": optimizer.state_dict(), **run}
    atomic_write(out / "ckpt.pt", lambda f: torch.save(ckpt, f))
    rows = ["step,train_loss,val_loss,lr"] + [",".join(f"{v:.10g}" for v in row) for row in run["log"]]
    atomic_write(out / "log.csv", lambda f: f.write(("\n".join(rows) + "\n").encode()))

def train(cfg, out=OUT_DIR, device="auto", compiled=False, ckpt=None):
    """Train a model as cfg says into out/ckpt.pt and out/log.csv, continuing the checkpoint ckpt
    if given. Returns the model, tokenizer and data, or None if a signal stopped it (saved)."""
    rank, world_size = torchrun_env()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # under torchrun, only rank 0 prints
    device = pick_device(device)
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world_size} processes")
    splits = split_text(get_text(cfg.data))
    if ckpt:  # the tokenizer: the checkpoint's, or one trained on the training split
        tok = spm.SentencePieceProcessor(model_proto=ckpt["tokenizer"])
    else:
        tok = train_tokenizer(splits["train"], cfg.vocab_size)
    data = encode_splits(splits, tok, cfg.context)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = Transformer(cfg.model_args(tok.vocab_size())).to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, device)
    # all that the checkpoint holds besides the weights and AdamW's state
    run = {"config": asdict(cfg), "tokenizer": tok.serialized_model_proto(), "step": 0, "log": [],
           "loss_sum": 0.0, "batches": torch.Generator().manual_seed(cfg.seed).get_state()}
    if ckpt:
        model.load_state_dict(ckpt["model"])  # strict: every name and shape must match
        optimizer.load_state_dict(ckpt["optimizer"])
        run.update({name: ckpt[name] for name in ("step", "log", "loss_sum", "batches")})
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters | {len(data['train']):,} "
          f"training tokens | from step {run['step']} | {device} x {world_size}", flush=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    trained = model  # what the loop calls: the model, or its parallel or compiled form
    if world_size > 1:  # DistributedDataParallel averages the gradients of all processes
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        gpu = [device.index] if device.type == "cuda" else None  # None for gloo on the CPU
        trained = nn.parallel.DistributedDataParallel(model, device_ids=gpu)
    if compiled:  # forward and backward fused into fewer, larger kernels
        trained = torch.compile(trained)
    # 1 once Ctrl-C (SIGINT), kill (SIGTERM) or a closed terminal (SIGHUP; Windows has none) asks
    stop = torch.zeros(1, device=device if world_size > 1 else "cpu")
    signals = (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))
    handlers = {s: signal.signal(s, lambda signum, frame: stop.fill_(1)) for s in signals}
    try:
        train_loop(cfg, model, trained, optimizer, data, Path(out), run, stop)
        if world_size > 1:  # all finish together. The barrier's work keeps the last all_reduce's
            # tensors past the shutdown below, which holds the GIL gloo's threads need to free them
            finished = dist.barrier(async_op=True, device_ids=gpu)
            finished.wait()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if world_size > 1:
            del trained  # DistributedDataParallel lets go of the group, then the group is shut down
            dist.destroy_process_group()
    if run["step"] < cfg.steps:
        if rank == 0:  # on stderr, which `| head` leaves open
            print(f"stopped after step {run['step']}; saved {out}/ckpt.pt; continue with "
                  f"`train --resume --out {out}`", file=sys.stderr)
        return None
    print(f"saved {out}/ckpt.pt", flush=True)
    return model, tok, data

def train_loop(cfg, model, trained, optimizer, data, out, run, stop):
    """The steps from run["step"] on through trained, with log lines and saves; stop ends it."""
    rank, world_size = torchrun_env()
    device = model.output.weight.device
    # the same validation windows at every log line: the curve shows the model, not the draw
    val_x, val_y = get_batch(data["val"], EVAL_BATCHES * cfg.batch_size, cfg.context,
                             torch.Generator().manual_seed(0))
    # the training losses since the last log line: a number, and once added to, a tensor on the
    # device, read only at a log line so that a GPU is not waited for at every step
    loss_sum = run["loss_sum"]
    batches = torch.Generator()  # draws the training batches: alike in every process, and saved
    batches.set_state(run["batches"])
    while run["step"] < cfg.steps:
        step = run["step"]
        # every process draws the same batch and trains on its share of it
        x, y = get_batch(data["train"], cfg.batch_size, cfg.context, batches)
        x = x.chunk(world_size)[rank].to(device)
        y = y.chunk(world_size)[rank].to(device)
        # dropout masks of its own, from (seed, step, process): a resumed run draws the same
        torch.manual_seed(hash((cfg.seed, step, rank)))
        loss_sum = loss_sum + train_step(trained, optimizer, x, y, lr_at(step, cfg))
        step += 1
        run["step"] = step
        since = step - (run["log"][-1][0] if run["log"] else 0)  # the steps in loss_sum
        if step % cfg.log_interval == 0 or step == cfg.steps:
            train_loss = loss_sum / since
            if world_size > 1:
                dist.all_reduce(train_loss)  # the sum over the processes
                train_loss /= world_size
            train_loss = train_loss.item()
            val_loss = evaluate(model, val_x, val_y)["loss"]
            check_diverged(step, train_loss, val_loss)
            run["log"].append([step, train_loss, val_loss, lr_at(step - 1, cfg)])
            loss_sum = 0.0
            print(f"step {step:5d}/{cfg.steps} | train {train_loss:.4f} | val {val_loss:.4f}",
                  flush=True)
        stopping = stop.clone()  # a signal may set stop at any time: the processes agree on a copy
        if world_size > 1:  # every process stops after the same step
            dist.all_reduce(stopping, op=dist.ReduceOp.MAX)
        if step == cfg.steps or stopping.item() or cfg.save_every and step % cfg.save_every == 0:
            run["loss_sum"] = float(loss_sum)
            run["batches"] = batches.get_state()
            check_diverged(step, run["loss_sum"] / since)  # nothing diverged is ever saved
            if rank == 0:
                save_checkpoint(out, model, optimizer, run)
            if stopping.item():
                break

# -----------------------------------------------------------------------------
# Evaluation
# Every token of the validation and test splits, once, in consecutive windows: exact, repeatable.
# Bits per character divide the loss by the characters predicted: they compare across tokenizers.

@torch.no_grad()
def evaluate(model, x, y, batch_size=512):
    """Loss (nats per token), its sum and accuracy on inputs and targets (N, T), skipping -100."""
    device = model.output.weight.device
    training = model.training
    model.eval()  # no dropout
    loss_sum = 0.0
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        yb = y[i:i + batch_size].to(device)
        with autocast(device):
            logits, _ = model(xb)  # (b, T, vocab_size)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == yb).sum().item()
    model.train(training)
    count = (y != -100).sum().item()  # the targets scored: -100 pads the last window
    return {"loss": loss_sum / count, "loss_sum": loss_sum, "accuracy": correct / count}

def report(model, tok, data, context):
    """Evaluate the full validation and test splits; print them beside the original's numbers."""
    print(f"{'split':<6}{'loss':>8}{'accuracy':>10}{'perplexity':>12}{'bits/char':>11}   "
          f"original README")
    results = {}
    for split in ("val", "test"):
        r = evaluate(model, *windows(data[split], context))
        r["perplexity"] = torch.tensor(r["loss"], dtype=torch.float64).exp().item()  # inf past e^709
        # the characters of every target: all of the split's text but its first token's
        r["bpc"] = r["loss_sum"] / len(tok.decode(data[split][1:].tolist())) / math.log(2)
        numbers = f"{r['loss']:8.4f}{r['accuracy']:10.4f}{r['perplexity']:12.2f}{r['bpc']:11.4f}"
        original = ", ".join(f"{name} {value}" for name, value in ORIGINAL[split].items())
        print(f"{split:<6}{numbers}   {original}", flush=True)
        results[split] = r
    return results

# -----------------------------------------------------------------------------
# Sampling
# The prompt runs through the model once, filling the KV cache; then one token at a time is
# sampled and fed back, and the text is printed as soon as it is decoded.

def load_checkpoint(path, mmap=False):
    """A checkpoint's contents: weights_only=True never runs pickled code; mmap reads as needed."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one with `python llama.py train`")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

def load_model(path, device):
    """A checkpoint's model (eval mode; float32, or on a GPU the weights' own) and tokenizer."""
    ckpt = load_checkpoint(path, mmap=True)
    with torch.device("meta"):  # shapes only, no memory: the weights are taken as they are
        model = Transformer(ModelArgs(**ckpt["model_args"]))
    dtype = next(iter(ckpt["model"].values())).dtype if device.type == "cuda" else torch.float32
    weights = {name: w.to(device, dtype) for name, w in ckpt["model"].items()}
    model.load_state_dict(weights, assign=True)  # strict: every name and shape must match
    return model.to(device).eval(), spm.SentencePieceProcessor(model_proto=ckpt["tokenizer"])

class TextStream:
    """Prints what each new token adds to the text. Decoding the recent tokens together, not each
    piece alone, keeps whole characters, and the spaces a Llama tokenizer drops at a text's start."""
    def __init__(self, tok, ids):
        self.tok = tok
        self.ids = list(ids[-64:])
        self.shown = len(tok.decode(self.ids))  # how much of decode(self.ids) is printed

    def __call__(self, token):
        self.ids.append(token.item())
        decoded = self.tok.decode(self.ids)
        if not decoded.endswith("\ufffd"):  # not half a character
            print(decoded[self.shown:], end="", flush=True)
            self.ids = self.ids[-64:]  # a bounded tail, however long the sample grows
            self.shown = len(self.tok.decode(self.ids))

def compile_decoding(model):
    """Compile model.decode_step: one graph for all positions (GPU: a CUDA graph; CPU: C++ calls)."""
    cuda = model.output.weight.device.type == "cuda"
    model.decode_step = torch.compile(model.decode_step, fullgraph=True,
                                      mode="reduce-overhead" if cuda else None,
                                      options=None if cuda else {"cpp_wrapper": True})

def sample(model, tok, prompt="\n", max_new_tokens=500, temperature=0.8, top_k=None, seed=SEED):
    """Print a continuation of prompt as it is produced, and return it."""
    ids = tok.encode(prompt)
    if tok.bos_id() >= 0:  # a Llama tokenizer (imported by tools/) starts every text with its id
        ids = [tok.bos_id()] + ids
    if not ids:
        raise ValueError("the prompt is empty: give --prompt some text")
    print(prompt, end="", flush=True)
    idx = torch.tensor([ids], dtype=torch.long, device=model.output.weight.device)  # (1, T0)
    generator = torch.Generator(idx.device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature, top_k, generator, TextStream(tok, ids))
    print()
    return tok.decode(out[0].tolist())

# -----------------------------------------------------------------------------
# Command line
# main(argv) parses its own list, so that a notebook can call main(["train", "--steps", "200"]).
# The functions above raise; main() alone prints a mistake the user can fix, as one "error:" line.

RESUMABLE = {"steps", "log_interval", "save_every", "data"}  # what --resume may change
USAGE = "%(prog)s [flags]   (--help lists them)"

def add_config_flags(parser):
    """A flag for each TrainConfig field; one not given is left out, so --resume can tell."""
    for f in fields(TrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=f.metadata["type"],
                            default=argparse.SUPPRESS, help=f"{f.metadata['help']}; {f.default}")

def build_parser():
    parser = argparse.ArgumentParser(prog="llama.py", epilog="In a notebook: main([...]).")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    train = commands.add_parser("train", help="train a model and evaluate it", usage=USAGE)
    train.set_defaults(run=command_train)
    add_config_flags(train)
    train.add_argument("--out", default=OUT_DIR, help="output folder (%(default)s)")
    either = train.add_mutually_exclusive_group()
    either.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    either.add_argument("--overwrite", action="store_true", help="replace the run saved in --out")
    sample = commands.add_parser("sample", help="generate text", usage=USAGE)
    sample.set_defaults(run=command_sample)
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample.add_argument("--max-new-tokens", type=number(int, 0), default=500)
    sample.add_argument("--temperature", type=number(float, 0), default=0.8, help="0: greedy")
    sample.add_argument("--top-k", type=number(int, 1), help="sample from the k likeliest only")
    sample.add_argument("--seed", type=number(int, 0), default=SEED)
    evaluation = commands.add_parser("eval", help="evaluate on val and test", usage=USAGE)
    evaluation.set_defaults(run=command_eval)
    evaluation.add_argument("--data", help="a UTF-8 text file (default: Tiny Shakespeare)")
    for command in (sample, evaluation):
        command.add_argument("--ckpt", default=f"{OUT_DIR}/ckpt.pt", help="(%(default)s)")
    for command in (train, sample, evaluation):
        command.add_argument("--device", default="auto", help="cuda, cuda:N, mps, cpu or auto")
    for command in (train, sample):
        command.add_argument("--compile", action="store_true", help="torch.compile the model")
    return parser

def command_train(args):
    """Train, or with --resume continue the run in --out; then evaluate."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    path = Path(args.out) / "ckpt.pt"
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(path)
        if "config" not in ckpt:  # an import by tools/: weights and a tokenizer, no run
            raise ValueError(f"{path} holds a model but no training run: train one in another --out")
        for name in given.keys() - RESUMABLE:
            if given[name] != ckpt["config"][name]:
                raise ValueError(f"--{name.replace('_', '-')} cannot change when resuming: {path} "
                                 f"was trained with {ckpt['config'][name]}")
        given = {**ckpt["config"], **given}
        if ckpt["step"] >= given["steps"]:
            raise ValueError(f"{path} has trained {ckpt['step']} steps: give --steps N, more than "
                             f"that, to train it further")
    held = [p for p in (path, path.with_name("log.csv")) if p.exists()]
    if held and not (args.resume or args.overwrite):
        raise ValueError(f"{held[0]} holds a run: continue it with --resume, replace it with "
                         f"--overwrite, or give another --out")
    cfg = TrainConfig(**given)
    result = train(cfg, args.out, args.device, args.compile, ckpt)
    if result is None:
        return 130  # stopped by a signal, the checkpoint saved
    if torchrun_env()[0] == 0:  # under torchrun, one process evaluates: the others print nothing
        report(*result, cfg.context)
    return 0

def command_sample(args):
    model, tok = load_model(args.ckpt, pick_device(args.device))
    if args.compile:
        compile_decoding(model)
    sample(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    return 0

def command_eval(args):
    model, tok = load_model(args.ckpt, pick_device(args.device))
    data = encode_splits(split_text(get_text(args.data)), tok, model.args.max_seq_len)
    report(model, tok, data, model.args.max_seq_len)
    return 0

def main(argv=None, parser=None):
    """Parse argv, run the command and return its exit status. tools/ pass their own parser."""
    try:
        args = (parser or build_parser()).parse_args(None if argv is None else map(str, argv))
        return args.run(args)
    except SystemExit as e:  # --help, or argparse's own usage error: a notebook gets the status
        return e.code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, which saves instead
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (sample | head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush
        return 141
    except (ValueError, OSError, FloatingPointError) as e:  # a mistake the user can fix
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise  # a bug: its traceback says where
        print("error: out of memory: try a smaller --batch-size, --context or model", file=sys.stderr)
        return 1

if __name__ == "__main__" and "__file__" in globals():  # a pasted cell runs nothing: call main()
    sys.exit(main())
