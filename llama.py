"""
llama.py: a LLaMA language model written from scratch and trained on Tiny Shakespeare, in one file.

    python llama.py train       download the data, train a tokenizer and the model, evaluate it
    python llama.py sample      generate text from out/ckpt.pt, printed as it is produced
    python llama.py eval        loss, accuracy, perplexity and bits per character on val and test
    python llama.py CMD --help  every flag of a command
    torchrun --standalone --nproc_per_node=2 llama.py train     the same training, data parallel

In a notebook, paste the file into a cell, then call main(["train", "--steps", "200"]). The
scripts in tools/ import this file: bench.py (speed), meta.py (Meta's checkpoint layout),
plot.py (the loss curve) and ablate.py (what each of LLaMA's changes buys here).

What LLaMA changes relative to GPT-2: RMSNorm instead of LayerNorm, before each sub-layer; rotary
positional embeddings (RoPE) instead of a learned position table; a SwiGLU feed-forward instead of
a GELU MLP; no biases; separate input and output embeddings; and, from LLaMA 2 on, key/value
heads shared by groups of query heads (grouped-query attention; multi-query with one key/value
head), which shrinks the KV cache.

References: Touvron et al. 2023, "LLaMA" (arXiv:2302.13971) and "Llama 2" (arXiv:2307.09288);
Meta's llama/model.py, whose parameter names this file uses; Su et al. 2021 (RoPE); Zhang &
Sennrich 2019 (RMSNorm); Shazeer 2020 (SwiGLU) and 2019 (multi-query attention).
"""
import argparse
import contextlib
import hashlib
import io
import logging
import math
import os
import pickle
import re
import signal
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import requests
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import urllib3

# -----------------------------------------------------------------------------
# Hyperparameters
# The documented ones keep their documented names. A flag overrides each for one run
# (`python llama.py train --help`: --batch-size for BATCH_SIZE); the constants never change.

VOCAB_SIZE = 130  # pieces in the SentencePiece vocabulary
BATCH_SIZE = 32  # sequences per optimizer step
CONTEXT_WINDOW = 16  # tokens per training sequence: the longest context the model sees (--context)
# EPOCHS keeps its documented name, but it counts optimizer steps, each on one random batch, not
# passes over the data (--steps). 1000 steps of 32 x 16 tokens see about the training split once.
EPOCHS = 1000
DIM = 128  # width of the residual stream: features per token
LOG_INTERVAL = 10  # optimizer steps between log lines, each with a validation loss
HEADS = 8  # query heads per attention layer
LAYERS = 4  # transformer blocks
KV_HEADS = 1  # key/value heads: 1 is multi-query, HEADS multi-head, in between grouped-query
LEARNING_RATE = 1e-3  # peak AdamW learning rate, reached at the end of warmup (--lr)
WARMUP_STEPS = 50  # optimizer steps of linear warmup from 0 to LEARNING_RATE (--warmup)
MIN_LR_FRACTION = 0.1  # the cosine decay ends at this fraction of LEARNING_RATE
WEIGHT_DECAY = 0.1  # decoupled (AdamW) weight decay, on the weight matrices only
GRAD_CLIP = 1.0  # the gradient's global L2 norm is clipped to this
EVAL_BATCHES = 4  # fixed validation batches behind each log line's validation loss
SEED = 1337  # seeds the weights, the batches, dropout and sampling
OUT_DIR = "out"  # where the checkpoint and log.csv go (--out)

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
# Tiny Shakespeare, 1.1 MB of plays, is fetched once into input.txt beside this file and checked
# against its sha256. No file this program writes is ever left half-written.

def atomic_write(path, write):
    """Write a file whole or not at all: write(f) fills a temporary file of this process's own,
    which replaces path once complete. A crash, a full disk or a kill leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save's RuntimeError holds the OSError behind it
        cause = e.__context__ if isinstance(e.__context__, OSError) else e
        kept = f"the previous {path.name} is as it was" if path.exists() else "nothing was written"
        raise OSError(f"could not write {path} ({getattr(cause, 'strerror', 0) or cause}); {kept}")
    finally:
        tmp.unlink(missing_ok=True)

def download(url, path, sha256, size, timeout=30.0):
    """Fetch url into path: at most size bytes, each read within timeout seconds, checked."""
    print(f"downloading {url} to {path} ...", flush=True)
    by_hand = f"fetch it by hand: curl -L -o {path} {url}"
    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            body = response.raw.read(size + 1, decode_content=True)  # a byte more: a bigger file
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        raise OSError(f"could not download {url} ({e}); {by_hand}") from None
    if hashlib.sha256(body).hexdigest() != sha256:
        raise OSError(f"{url} sent {len(body):,} bytes that are not the published file; {by_hand}")
    atomic_write(path, lambda f: f.write(body))

def get_text(path=None):
    """The text to learn from: the UTF-8 file at path, or Tiny Shakespeare if None."""
    if path is None:
        path = DATA_PATH
        if not path.exists():
            download(DATA_URL, path, DATA_SHA256, DATA_BYTES)
        elif hashlib.sha256(path.read_bytes()).hexdigest() != DATA_SHA256:
            raise ValueError(f"{path} is not Tiny Shakespeare as published: delete it to download "
                             f"it again, or give --data {path} to learn from it as it is")
    try:  # an OSError (no such file, a folder) says itself what is wrong; "\r\n" stays
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from None
    if not text:
        raise ValueError(f"{path} is empty: give a text to learn from")
    return text

# -----------------------------------------------------------------------------
# Tokenizer
# SentencePiece BPE with VOCAB_SIZE pieces, trained on the training split only. Its normalization
# is off (it would drop newlines and merge runs of spaces) and "\n" is a piece of its own, so that
# decode(encode(text)) == text for any text of the characters it was trained on.

# characters SentencePiece cannot keep: "▁" stands for its spaces, and its trainer drops "\r",
# NUL and "\x1f". Each that the training text holds gets a piece of its own, named as here
SPECIAL = {c: f"<U+{ord(c):04X}>" for c in "\u2581\r\x00\x1f"}

class Tokenizer:
    """A SentencePiece model, kept as its serialized bytes so that a checkpoint carries it."""
    def __init__(self, model_proto: bytes):
        if not model_proto:  # SentencePiece would take it, then complain at every call
            raise ValueError("the tokenizer is empty")
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()  # -1 for ours; Llama's tokenizer starts each text with it
        ids = {c: self.sp.piece_to_id(piece) for c, piece in SPECIAL.items()}  # unk's if none
        self.special = {c: i for c, i in ids.items() if self.sp.is_control(i)}
        self.special_char = {i: c for c, i in self.special.items()}
        # the characters each piece stands for, to turn nats per token into bits per character
        self.n_chars = torch.tensor([self.piece_chars(i) for i in range(self.vocab_size)])

    def piece_chars(self, i):  # Llama's byte pieces (<0x0A>), "⁇" and SPECIAL's: one each
        if self.sp.is_byte(i) or self.sp.is_unknown(i) or i in self.special_char:
            return 1
        return 0 if self.sp.is_control(i) else len(self.sp.id_to_piece(i))

    def encode(self, text: str) -> list:
        if not self.special:
            return self.sp.encode(text)
        ids = []  # the special characters apart, each its own piece; the text between them
        for part in re.split(f"([{re.escape(''.join(self.special))}])", text):
            ids += [self.special[part]] if part in self.special else self.sp.encode(part)
        return ids

    def decode(self, ids: list) -> str:
        if not self.special:
            return self.sp.decode(ids)
        return "".join(self.special_char.get(i) or self.sp.decode([i]) for i in ids)

    @staticmethod
    def train(text: str, vocab_size: int) -> "Tokenizer":
        lines = text.splitlines(keepends=True)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                model_type="bpe", character_coverage=1.0,  # every character gets a piece
                normalization_rule_name="identity",  # no Unicode normalization
                add_dummy_prefix=False,  # no space added before the text
                remove_extra_whitespaces=False,  # runs of spaces stay
                allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
                control_symbols=[piece for c, piece in SPECIAL.items() if c in text],
                unk_piece="<U+FFFD>",  # not "<unk>": a text may hold that, and keep it
                # SentencePiece skips lines longer than this (4192 bytes by default): keep them
                max_sentence_length=max([4192] + [len(line.encode()) + 1 for line in lines]),
                bos_id=-1, eos_id=-1,  # no beginning- or end-of-sequence pieces: none is used
                num_threads=1, minloglevel=2)  # one thread: the same pieces on every run
        except RuntimeError as e:  # its reason follows the C++ condition: "...] Vocabulary size"
            raise ValueError(f"--vocab-size {vocab_size} does not fit this text: "
                             f"{str(e).split('] ')[-1].strip()}") from None
        return Tokenizer(model.getvalue())

# -----------------------------------------------------------------------------
# Data
# Three contiguous parts, 70% train, 15% validation, 15% test, as the original notebook did. A
# batch is BATCH_SIZE random windows of CONTEXT_WINDOW tokens; its targets are shifted by one.

def split_text(text: str) -> dict:
    """Cut at the 70% and 85% marks, by characters, so the tokenizer can learn from train only."""
    train_end = int(0.7 * len(text))
    val_end = int(0.85 * len(text))
    return {"train": text[:train_end], "val": text[train_end:val_end], "test": text[val_end:]}

def check_length(splits, context, unit):
    """Each split must hold a window and its targets: context + 1 tokens, so as many characters."""
    for name, part in splits.items():
        if len(part) < context + 1:
            raise ValueError(f"the text is too short: its {name} split has {len(part):,} {unit}, "
                             f"and a {context}-token window needs {context + 1}: give a longer "
                             f"text, or a smaller --context")

def encode_splits(splits: dict, tok: Tokenizer, context: int) -> dict:
    """The token ids of each split, as a 1-D tensor long enough for a window."""
    data = {name: torch.tensor(tok.encode(part), dtype=torch.long) for name, part in splits.items()}
    check_length(data, context, "tokens")
    return data

def get_batch(data, batch_size, context, generator=None):
    """batch_size random windows of one split: inputs (B, T) and targets (B, T), one token later."""
    starts = torch.randint(len(data) - context, (batch_size,), generator=generator)  # (B,)
    rows = data[starts[:, None] + torch.arange(context + 1)]  # (B, T + 1)
    return rows[:, :-1], rows[:, 1:]

def windows(data, context):
    """Every token of a split but the first, once, as a target, in consecutive windows."""
    pad = -(len(data) - 1) % context  # the last window padded to full length
    x = F.pad(data[:-1], (0, pad))
    y = F.pad(data[1:], (0, pad), value=-100)  # cross_entropy skips targets of -100
    return x.view(-1, context), y.view(-1, context)  # (N, T) each

# -----------------------------------------------------------------------------
# Model
# Smallest part first, in forward-pass order: RMSNorm, rotary embeddings, attention with its KV
# cache, SwiGLU, the block, the model and its generate(). No class reads the constants above.

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
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                     "max_seq_len"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:  # bool is no size
                raise ValueError(f"{name} must be a whole number, at least 1: {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:  # rotary embeddings turn pairs of features
            raise ValueError(f"the head size dim / n_heads = {self.dim} / {self.n_heads} is odd")
        if not (self.ffn_dim_multiplier > 0 and self.norm_eps > 0 and self.rope_theta > 0):
            raise ValueError("ffn_dim_multiplier, norm_eps and rope_theta must be positive")
        if not 0 <= self.dropout <= 1:
            raise ValueError(f"dropout must be from 0 to 1, not {self.dropout}")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def hidden_dim(self):
        """LLaMA's feed-forward width: 2/3 of 4 * dim (SwiGLU has three matrices), rounded up."""
        hidden = int(self.ffn_dim_multiplier * int(2 * 4 * self.dim / 3))
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

def precompute_rope(head_dim, max_seq_len, theta=10000.0):
    """cos and sin of the angle pos * theta^(-2j / head_dim) by which feature pair j turns at
    position pos: two tables (max_seq_len, head_dim/2). Pair j turns more slowly than pair j-1."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (head_dim/2,)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # (max_seq_len, head_dim/2)
    return angles.cos(), angles.sin()

def apply_rotary_emb(x, cos, sin):
    """Turn each feature pair (x[2j], x[2j+1]) of x (B, T, heads, head_dim) by its position's
    angle, as Meta does by multiplying the complex number x[2j] + i x[2j+1] by e^(i angle). A
    turned query and key have a dot product that depends only on how far apart they are."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, heads, head_dim/2, 2)
    even = pairs[..., 0]  # (B, T, heads, head_dim/2)
    odd = pairs[..., 1]
    # (even + i odd)(cos + i sin) = (even cos - odd sin) + i (even sin + odd cos); cos and sin
    # are (T, 1, head_dim/2), alike for every head
    turned = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return turned.flatten(-2).type_as(x)  # (B, T, heads, head_dim)

class Attention(nn.Module):
    """Causal self-attention, each key/value head shared by a group of n_heads // n_kv_heads
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
        # the KV cache, (B, max_seq_len, n_kv_heads, head_dim) each, allocated by setup_cache:
        # buffers, so that .to(device) moves them, but not saved in checkpoints
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def forward(self, x, cos, sin, positions=None, mask=None):
        """x (B, T, dim), a whole sequence; or, with positions (T,), tokens of a sequence being
        generated, whose keys and values go into the cache that the queries read through mask."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        q = apply_rotary_emb(q, cos, sin)
        k = apply_rotary_emb(k, cos, sin)
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

    def forward(self, x, cos, sin, positions=None, mask=None):
        attended = self.attention(self.attention_norm(x), cos, sin, positions, mask)
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
        """GPT-2's init: small normal weights, smaller with depth where they write the residual."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                deep = name.endswith(("wo.weight", "w2.weight"))
                std = 0.02 / math.sqrt(2 * self.args.n_layers) if deep else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None, positions=None):
        """Logits (B, T, vocab_size) for the tokens idx (B, T) and, with targets (B, T), the mean
        cross-entropy. With positions (T,), idx continues the cached sequence at those positions."""
        rows = slice(0, idx.size(1))  # the rotary angles of positions 0 to T - 1
        mask = None  # causal attention within idx
        if positions is not None:
            rows = positions
            # the query at positions[i] reads the cache slots up to it: 0 is added to their
            # scores, -inf to the later slots and to those not yet written
            slots = torch.arange(self.args.max_seq_len, device=idx.device)
            mask = torch.where(slots > positions[:, None], float("-inf"), 0.0)  # (T, max_seq_len)
        cos = self.freqs_cos[rows]  # (T, 1, head_dim/2)
        sin = self.freqs_sin[rows]
        h = self.tok_embeddings(idx)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, positions, mask)
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
        """The logits (B, vocab_size) after one token (B, 1) at position (1,): always the same
        shapes, so it compiles once, or is captured as a CUDA graph."""
        logits, _ = self(token, positions=position)
        return logits[:, -1]

    @torch.inference_mode()  # like no_grad, and lighter: these tensors will never need gradients
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, use_cache=True, on_token=None):
        """Continue idx (B, T0) by max_new_tokens tokens, calling on_token with each (B, 1). The
        model sees at most max_seq_len tokens; when they are all there, the most recent half runs
        again from position 0, refilling the cache. use_cache=False recomputes every step."""
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
            if use_cache and cached:  # the token sampled last, alone
                position = torch.full((1,), window.size(1) - 1, device=idx.device)
                logits = self.decode_step(token, position)
            else:  # all of the window: the prompt, a refill, or every step without the cache
                positions = torch.arange(window.size(1), device=idx.device) if use_cache else None
                logits = self(window, positions=positions)[0][:, -1]
            cached = window.size(1)
            token = sample_next(logits, temperature, top_k, top_p, generator)[:, None]  # (B, 1)
            window = torch.cat([window, token], dim=1)
            new_tokens.append(token)
            if on_token is not None:
                on_token(token)
        return torch.cat([idx, *new_tokens], dim=1)

def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """A token id per row of logits (B, vocab_size): the argmax at temperature 0, else a sample of
    the softmax, kept to the top_k likeliest tokens or to the top_p of the probability."""
    if not torch.isfinite(logits).all():
        raise FloatingPointError("the model's outputs are not finite: damaged weights, or float16")
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    # the best at 0 first; a temperature rounding to 0 in float32 would make 0 / 0
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, 1e-30)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # the fewest likeliest tokens whose mass reaches top_p
        probs, order = torch.sort(logits.softmax(-1), dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # the tokens before this one reach top_p already
        drop[:, 0] = False  # the likeliest always stays, however small top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)  # (B,)

# -----------------------------------------------------------------------------
# Training
# AdamW with linear warmup, cosine decay and gradient clipping. Every LOG_INTERVAL steps a line:
# the mean training loss since the last one, and the loss on fixed validation batches. At the end
# (and every --save-every steps) a checkpoint, which --resume continues. Under torchrun every
# process draws the same batch and trains on its share of it; DDP averages their gradients.

def number(kind, low, high=math.inf):
    """An argparse type: a finite number of kind from low to high."""
    def parse(text):
        value = kind(text)  # a ValueError here: argparse says "invalid int value: 'abc'"
        if not (math.isfinite(value) and low <= value <= high):
            bound = f"at least {low}" if high == math.inf else f"from {low} to {high:,}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse

MAX_SIZE = 2**20  # sizes and lengths beyond it overflow PyTorch's own before any memory is used
size = number(int, 1, MAX_SIZE)

def flag(name):  # a TrainConfig field's flag: batch_size is --batch-size
    return "--" + name.replace("_", "-")

def setting(default, kind, help):  # a TrainConfig field, with the type and help of its flag
    return field(default=default, metadata={"type": kind, "help": help})

@dataclass
class TrainConfig:
    """A training run's settings. Each is a flag of `train` (batch_size is --batch-size) whose
    default is the constant above; the checkpoint saves them, and --resume reads them back."""
    steps: int = setting(EPOCHS, number(int, 1), "optimizer steps (EPOCHS)")
    batch_size: int = setting(BATCH_SIZE, size, "sequences per step (BATCH_SIZE)")
    context: int = setting(CONTEXT_WINDOW, size, "tokens per sequence (CONTEXT_WINDOW)")
    dim: int = setting(DIM, size, "residual stream width (DIM)")
    layers: int = setting(LAYERS, size, "transformer blocks (LAYERS)")
    heads: int = setting(HEADS, size, "query heads (HEADS)")
    kv_heads: int = setting(KV_HEADS, size, "key/value heads (KV_HEADS)")
    vocab_size: int = setting(VOCAB_SIZE, number(int, 2, MAX_SIZE), "tokenizer pieces (VOCAB_SIZE)")
    lr: float = setting(LEARNING_RATE, number(float, 0, 1e30), "peak learning rate (LEARNING_RATE)")
    warmup: int = setting(WARMUP_STEPS, number(int, 0), "warmup steps (WARMUP_STEPS)")
    weight_decay: float = setting(WEIGHT_DECAY, number(float, 0), "AdamW's (WEIGHT_DECAY)")
    dropout: float = setting(0.0, number(float, 0, 1), "residual dropout; LLaMA has none")
    log_interval: int = setting(LOG_INTERVAL, number(int, 1), "steps per log line (LOG_INTERVAL)")
    save_every: int = setting(0, number(int, 0), "also save every N steps; 0: at the end only")
    seed: int = setting(SEED, number(int, 0, 2**63 - 1), "random seed (SEED)")
    data: str = setting(None, str, "a UTF-8 text file; default: Tiny Shakespeare")

    def __post_init__(self):  # a setting read from a checkpoint meets its flag's bounds too
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                if value is not None and f.metadata["type"](str(value)) != value:
                    raise ValueError(f"{value!r} is not a {f.type.__name__}")
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise ValueError(f"{flag(f.name)}: {e}") from None
        self.model_args(self.vocab_size)  # and ModelArgs checks the model's shape

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
    """bf16 autocast on GPUs that compute in bf16 (compute capability 8.0 on; a T4 emulates it).
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

def compile_training(model, optimizer):
    """The model compiled, forward and backward fused; on the CPU AdamW's step too, whose small
    operations on every parameter otherwise run one at a time (on a GPU it is one fused kernel)."""
    # the optimizer's profiler marks, which the compiler drops, need no warning
    logging.getLogger("torch._dynamo.variables.ctx_manager").setLevel(logging.ERROR)
    if next(model.parameters()).device.type != "cuda":
        optimizer.step = torch.compile(optimizer.step)
    return torch.compile(model)

def step_seed(*numbers):
    """A seed of its own for each (seed, step, process): the dropout masks differ from process to
    process, and a step draws the same ones whether or not the run was resumed."""
    return int.from_bytes(hashlib.sha256(repr(numbers).encode()).digest()[:8], "little")

def torchrun_env():
    """(rank, world size, local rank) as torchrun sets them; a plain `python llama.py` is 0 of 1."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))

def pick_device(name="auto", local_rank=None):
    """cuda, then mps, then cpu, unless the user names one; under torchrun, this process's GPU."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:(0|[1-9]\d{0,3}))?", name):
        raise ValueError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N or mps")
    mps = torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"  # one GPU per process
    device = torch.device(name)
    gpus = torch.cuda.device_count()
    if device.type == "mps" and not mps or device.type == "cuda" and (device.index or 0) >= gpus:
        raise ValueError(f"--device {name}: PyTorch sees no such device ({gpus} CUDA GPUs here)")
    return device

def mean_loss(losses, step, model):
    """The mean of the losses since the last log line, over all processes. One that is not
    finite, or weights that are not, stop the run before anything is saved."""
    losses = torch.stack(losses).float()
    if dist.is_initialized():
        dist.all_reduce(losses)  # a sum over the processes
        losses /= dist.get_world_size()
    if not (torch.isfinite(losses).all() and all(p.isfinite().all() for p in model.parameters())):
        raise FloatingPointError(f"the training loss became {losses.sum().item()} by step {step}: "
                                 f"try a lower --lr; the last checkpoint was left as it was")
    return losses.mean().item()

def save_checkpoint(out, model, optimizer, run):
    """out/ckpt.pt, then out/log.csv from the rows it holds; run is all but the weights. Tensors,
    numbers, strings and bytes only, so that torch.load(weights_only=True) reads it."""
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.args),
            "optimizer": optimizer.state_dict(), **run}
    atomic_write(out / "ckpt.pt", lambda f: torch.save(ckpt, f))
    rows = ["step,train_loss,val_loss,lr"] + [",".join(f"{v:.10g}" for v in row) for row in run["log"]]
    atomic_write(out / "log.csv", lambda f: f.write(("\n".join(rows) + "\n").encode()))

STOP_SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                if hasattr(signal, name)]  # Ctrl-C, kill, a closed terminal; Windows has no HUP

def check_out(out, resuming):
    """A fresh run refuses a folder that holds a run, and none writes where it could not save."""
    held = [out / name for name in ("ckpt.pt", "log.csv") if (out / name).exists()]
    if held and not resuming:
        raise ValueError(f"{held[0]} holds a run: continue it with --resume, replace it with "
                         f"--overwrite, or give another --out")
    for path in held:
        if not path.is_file():
            raise ValueError(f"{path} is not a file, where the run saves one: give another --out")

def prepare_data(cfg, out, checkpoint):
    """The text's splits as token ids, the tokenizer (the checkpoint's, when resuming: the same
    text, checked by its sha256) and that sha256."""
    text = get_text(cfg.data)
    data_sha256 = hashlib.sha256(text.encode()).hexdigest()
    splits = split_text(text)
    check_length(splits, cfg.context, "characters")
    with reading(out / "ckpt.pt"):
        tok = Tokenizer(checkpoint["tokenizer"]) if checkpoint else None
        same_text = not checkpoint or checkpoint["data_sha256"] == data_sha256
    if not same_text:
        raise ValueError(f"{cfg.data or DATA_PATH} is not the text {out}/ckpt.pt was trained on")
    tok = tok or Tokenizer.train(splits["train"], cfg.vocab_size)
    return encode_splits(splits, tok, cfg.context), tok, data_sha256

def train(cfg, out=OUT_DIR, device="auto", compiled=False, checkpoint=None, overwrite=False):
    """Train a LLaMA as cfg says, into out/ckpt.pt and out/log.csv; checkpoint (from load_file)
    is a run to continue. Returns (model, tokenizer, data), or None if a signal stopped it."""
    rank, world_size, local_rank = torchrun_env()
    device = pick_device(device, local_rank if world_size > 1 else None)
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world_size} processes")
    out = Path(out)
    check_out(out, checkpoint or overwrite)
    data, tok, data_sha256 = prepare_data(cfg, out, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=out).close()  # better to learn now than after training: writable?
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = Transformer(cfg.model_args(tok.vocab_size)).to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, device)
    run = {"config": asdict(cfg), "tokenizer": tok.model_proto, "step": 0, "log": [], "losses": [],
           "data_sha256": data_sha256}  # all that the checkpoint holds besides the weights
    batches = torch.Generator().manual_seed(cfg.seed)  # draws the training batches, alike everywhere
    if checkpoint:
        with reading(out / "ckpt.pt"):
            model.load_state_dict(checkpoint["model"])  # strict: every name and shape must match
            optimizer.load_state_dict(checkpoint["optimizer"])
            batches.set_state(checkpoint["batches"])
            run.update(step=checkpoint["step"], log=checkpoint["log"], losses=checkpoint["losses"])
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters | {len(data['train']):,} "
          f"training tokens | from step {run['step']} | {device} x {world_size}", flush=True)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # 1 once told to stop, in any process; on the CPU alone, reading it never waits for a GPU
    stop = torch.zeros(1, device=device if world_size > 1 else "cpu")
    old_handlers = [signal.signal(s, lambda signum, frame: stop.fill_(1)) for s in STOP_SIGNALS]
    try:
        train_loop(cfg, model, optimizer, data, out, compiled, run, batches, stop)
    finally:
        for s, handler in zip(STOP_SIGNALS, old_handlers):
            signal.signal(s, handler)
        if world_size > 1:
            dist.destroy_process_group()
    if run["step"] == cfg.steps:
        print(f"saved {out}/ckpt.pt", flush=True)
        return model, tok, data
    if rank == 0:  # on stderr, which a closed pipe on stdout leaves open
        how = "torchrun ... llama.py" if world_size > 1 else "python llama.py"
        print(f"stopped after step {run['step']}; saved {out}/ckpt.pt; continue with: {how} train "
              f"--resume --out {out}", file=sys.stderr)
    return None

def train_loop(cfg, model, optimizer, data, out, compiled, run, batches, stop):
    """The steps from run["step"] to cfg.steps, a log line every cfg.log_interval, and the saves.
    stop, set by a STOP_SIGNAL or a failing standard output, ends it after the step, saved."""
    rank, world_size, _ = torchrun_env()
    device = model.output.weight.device
    trained = model  # what the loop calls: the model, or its parallel or compiled form
    if world_size > 1:  # DistributedDataParallel averages the gradients of all processes
        gpu = [device.index] if device.type == "cuda" else None  # None for gloo on the CPU
        trained = nn.parallel.DistributedDataParallel(model, device_ids=gpu)
    trained = compile_training(trained, optimizer) if compiled else trained
    # the same validation windows at every log line: the curve shows the model, not the draw
    val_x, val_y = get_batch(data["val"], EVAL_BATCHES * cfg.batch_size, cfg.context,
                             torch.Generator().manual_seed(0))
    losses = [torch.tensor(loss) for loss in run.pop("losses")]  # those since the last log line
    while run["step"] < cfg.steps:
        step = run["step"]
        # the same batch in every process; each trains on its own share of it
        x, y = get_batch(data["train"], cfg.batch_size, cfg.context, batches)
        x = x.chunk(world_size)[rank].to(device)
        y = y.chunk(world_size)[rank].to(device)
        torch.manual_seed(step_seed(cfg.seed, step, rank))  # each process its own dropout masks
        losses.append(train_step(trained, optimizer, x, y, lr_at(step, cfg)))
        step += 1
        run["step"] = step
        if step % cfg.log_interval == 0 or step == cfg.steps:
            train_loss = mean_loss(losses, step, model)
            val_loss = evaluate(model, val_x, val_y, len(val_x))["loss"]
            run["log"].append([step, train_loss, val_loss, lr_at(step - 1, cfg)])
            losses = []
            try:  # if the terminal closed, or stdout fails: stop, saved, as on Ctrl-C
                print(f"step {step:5d}/{cfg.steps} | train {train_loss:.4f} | val {val_loss:.4f}",
                      flush=True)
            except OSError:
                stop.fill_(1)
        if world_size > 1:  # every process stops after the same step
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if step == cfg.steps or stop.item() or cfg.save_every and step % cfg.save_every == 0:
            if losses:
                mean_loss(losses, step, model)  # nothing that is not finite is ever saved
            if rank == 0:
                save_checkpoint(out, model, optimizer, {**run, "batches": batches.get_state(),
                                                        "losses": [float(v) for v in losses]})
            if stop.item():
                break

# -----------------------------------------------------------------------------
# Evaluation
# Every token of the validation and test splits, once, in consecutive windows: exact, repeatable.
# Bits per character divide the loss by the characters predicted: they compare across tokenizers.

@torch.no_grad()
def evaluate(model, x, y, batch_size, n_chars=None):
    """Loss (nats per token), accuracy and perplexity on inputs x and targets y (N, T), and bits
    per character if n_chars, the characters of the targets, is given. Targets -100 are skipped."""
    device = model.output.weight.device
    training = model.training
    model.eval()  # no dropout
    loss_sum = 0.0
    correct = 0
    count = (y != -100).sum().item()  # the targets scored: -100 pads the last window
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        yb = y[i:i + batch_size].to(device)
        with autocast(device):
            logits, _ = model(xb)  # (b, T, vocab_size)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == yb).sum().item()
    model.train(training)
    loss = loss_sum / count
    if not math.isfinite(loss):
        raise FloatingPointError(f"the model's loss is {loss}: damaged weights, or float16")
    bpc = loss_sum / (n_chars * math.log(2)) if n_chars else None
    return {"loss": loss, "accuracy": correct / count, "perplexity": math.exp(loss), "bpc": bpc}

def report(model, tok, data, context, batch_size):
    """Evaluate the full validation and test splits; print them beside the original's numbers."""
    results = {}
    for split in ("val", "test"):
        x, y = windows(data[split], context)
        n_chars = tok.n_chars[data[split][1:]].sum().item()  # the characters of every target
        results[split] = evaluate(model, x, y, batch_size, n_chars)
    print(f"{'split':<6}{'loss':>8}{'accuracy':>10}{'perplexity':>12}{'bits/char':>11}   "
          f"original README")
    for split, r in results.items():
        numbers = f"{r['loss']:8.4f}{r['accuracy']:10.4f}{r['perplexity']:12.2f}{r['bpc']:11.4f}"
        original = ", ".join(f"{name} {value}" for name, value in ORIGINAL[split].items())
        print(f"{split:<6}{numbers}   {original}")
    return results

# -----------------------------------------------------------------------------
# Sampling
# A checkpoint's model, built on the meta device so that its weights are never held twice. The
# prompt runs through it once, filling the KV cache; then one token at a time is sampled and fed
# back, and the text is printed as soon as it is decoded.

def load_file(path, mmap=False):
    """torch.load with weights_only=True: tensors, numbers, strings and bytes, never pickled code."""
    with open(path, "rb") as f:  # the OSError of a missing file or a folder says what is wrong
        if not zipfile.is_zipfile(f):  # what torch.save writes
            raise ValueError(f"{path} is not a PyTorch zip archive (empty, cut short, or another "
                             f"format)")
        with zipfile.ZipFile(f) as archive:
            damaged = archive.testzip()  # the first of its files whose checksum fails, if any
    try:
        if damaged:
            raise RuntimeError(f"{damaged} fails its checksum")
        contents = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # a name to call: code, never run here
        why = f"holds pickled Python objects ({found[1]}), which are never loaded here" if found \
            else f"is a damaged PyTorch file ({str(e)[-80:]})"
        raise ValueError(f"{path} {why}") from None
    except RuntimeError as e:
        raise ValueError(f"{path} is a damaged PyTorch file ({str(e)[:100]})") from None
    if not isinstance(contents, dict):  # every file here is a table of tensors and settings
        raise ValueError(f"{path} holds a {type(contents).__name__}, not a table of tensors")
    return contents

@contextlib.contextmanager
def reading(path):
    """What a damaged or edited file raises while its contents are used, as one line."""
    try:
        yield
    except (LookupError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        why = " ".join(str(e).split())[:300]
        raise ValueError(f"{path} is damaged or was edited ({type(e).__name__}: {why})") from None

def load_model(path, device, dtype=None, context=None):
    """The model (in eval mode) and tokenizer of a checkpoint; context overrides its length.
    dtype None: the weights' own on a GPU, float32 elsewhere."""
    ckpt = load_file(path, mmap=True)
    if "model_args" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of llama.py (no model_args): give --ckpt "
                         f"one, or import Meta's layout with tools/meta.py")
    with reading(path):
        args = ModelArgs(**{**ckpt["model_args"], **({"max_seq_len": context} if context else {})})
        tok = Tokenizer(ckpt["tokenizer"])
        if tok.vocab_size != args.vocab_size:
            raise ValueError(f"its tokenizer has {tok.vocab_size} pieces, its model {args.vocab_size}")
        with torch.device("meta"):  # shapes only, no memory: the weights are taken as they are
            model = Transformer(args)
        weights = ckpt["model"]
        if not all(w.isfinite().all() for w in weights.values()):
            raise ValueError("its weights are not all finite numbers: the run diverged")
        if dtype is None:
            dtype = next(iter(weights.values())).dtype if device.type == "cuda" else torch.float32
        model.load_state_dict({k: w.to(device, dtype) for k, w in weights.items()}, assign=True)
    # the rotary tables are not weights: compute them for real (they were made on the meta device)
    cos, sin = precompute_rope(args.head_dim, args.max_seq_len, args.rope_theta)
    model.freqs_cos = cos[:, None, :].to(device)
    model.freqs_sin = sin[:, None, :].to(device)
    return model.eval(), tok

class TextStream:
    """Prints what each new token adds to the text. Decoding the recent tokens together, not each
    piece alone, keeps the spaces Llama's tokenizer drops at a text's start, and whole characters."""
    def __init__(self, tok, ids):
        self.tok = tok
        self.ids = list(ids[-64:])
        self.shown = tok.decode(self.ids)  # the decoded text of self.ids, printed already
        self.text = ""  # what was printed after the prompt

    def __call__(self, token):
        self.ids.append(token.item())
        decoded = self.tok.decode(self.ids)
        if not decoded.endswith("\ufffd"):  # not half a character
            print(decoded[len(self.shown):], end="", flush=True)
            self.text += decoded[len(self.shown):]
            self.ids = self.ids[-64:]  # a bounded tail, however long the sample grows
            self.shown = self.tok.decode(self.ids)

def compile_decoding(model):
    """Compile model.decode_step: one graph for every position. On a GPU it is replayed as a CUDA
    graph ("reduce-overhead"); on the CPU called through generated C++ (cpp_wrapper)."""
    cuda = model.output.weight.device.type == "cuda"
    model.decode_step = torch.compile(model.decode_step, fullgraph=True,
                                      mode="reduce-overhead" if cuda else None,
                                      options=None if cuda else {"cpp_wrapper": True})
    return model  # `del model.decode_step` brings the eager step back

def sample(model, tok, prompt="\n", max_new_tokens=500, temperature=0.8, top_k=None, top_p=None,
           seed=SEED, num_samples=1):
    """Print num_samples continuations of prompt as they are produced, and return them."""
    device = model.output.weight.device
    prompt.encode()  # a UnicodeEncodeError, one line, if the command line held bytes not UTF-8
    # Llama's tokenizer has a beginning-of-sequence id, and every text starts with it
    ids = [tok.bos_id] * (tok.bos_id >= 0) + tok.encode(prompt)
    if not ids or tok.decode(ids) != prompt:  # as it would come back: each character known
        raise ValueError(f"the prompt {prompt!r} is empty or has characters the tokenizer never saw")
    generator = torch.Generator(device).manual_seed(seed)
    texts = []
    for i in range(num_samples):
        print(prompt, end="", flush=True)
        stream = TextStream(tok, ids)
        idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T0)
        model.generate(idx, max_new_tokens, temperature, top_k, top_p, generator, on_token=stream)
        texts.append(prompt + stream.text)
        print("\n" + "-" * 40 if i < num_samples - 1 else "")
    return texts

# -----------------------------------------------------------------------------
# Command line
# main(argv) parses its own list, so that a notebook can call main(["train", "--steps", "200"]).
# Every mistake, a mistyped number included, prints one line starting with "error:" and returns
# 1, without a traceback: argparse types and the classes' own checks raise, main() prints.

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
RESUMABLE = ("steps", "log_interval", "save_every", "data")  # what --resume may change

class Parser(argparse.ArgumentParser):
    """argparse, raising its complaint as a ValueError for main() to print as one line."""
    def error(self, message):
        raise ValueError(f"{message} (`python {self.prog} --help` lists the flags)")

def add_config_flags(parser):
    for f in fields(TrainConfig):  # a flag not given is left out: --resume tells it from a default
        parser.add_argument(flag(f.name), type=f.metadata["type"],
                            default=argparse.SUPPRESS, help=f"{f.metadata['help']}; {f.default}")

def build_parser():
    parser = Parser(prog="llama.py", description=__doc__.split("\n\n")[1], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    train = commands.add_parser("train", help="train a model and evaluate it", allow_abbrev=False)
    train.set_defaults(run=command_train)
    add_config_flags(train)
    train.add_argument("--out", default=OUT_DIR, help="output folder (OUT_DIR, %(default)s)")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    train.add_argument("--overwrite", action="store_true", help="replace the run saved in --out")
    sample = commands.add_parser("sample", help="generate text", allow_abbrev=False)
    sample.set_defaults(run=command_sample)
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample.add_argument("--max-new-tokens", type=number(int, 0, 10**6), default=500)
    sample.add_argument("--temperature", type=number(float, 0), default=0.8, help="0 is greedy")
    sample.add_argument("--top-k", type=number(int, 1), help="sample from the k likeliest only")
    sample.add_argument("--top-p", type=number(float, 0, 1), help="the likeliest tokens holding "
                        "this much probability only")
    sample.add_argument("--num-samples", type=number(int, 1), default=1)
    sample.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=SEED)
    evaluation = commands.add_parser("eval", help="evaluate on val and test", allow_abbrev=False)
    evaluation.set_defaults(run=command_eval)
    evaluation.add_argument("--data", help="a UTF-8 text file (default: Tiny Shakespeare)")
    evaluation.add_argument("--batch-size", type=number(int, 1), default=BATCH_SIZE,
                            help="windows per batch, times 16 (%(default)s)")
    for command in (sample, evaluation):
        command.add_argument("--ckpt", default=f"{OUT_DIR}/ckpt.pt", help="(%(default)s)")
        command.add_argument("--context", type=size, help="default: the checkpoint's")
        command.add_argument("--dtype", choices=DTYPES, default="auto",
                             help="the weights' dtype; auto: the checkpoint's on a GPU, else float32")
    for command in (train, sample, evaluation):
        command.add_argument("--device", default="auto", help="cuda, cuda:N, mps, cpu or auto")
    for command in (train, sample):
        command.add_argument("--compile", action="store_true", help="torch.compile the model")
    return parser

def command_train(args):
    """Train, or with --resume continue the run in --out, with the flags given; then evaluate."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it: give one")
    path = Path(args.out) / "ckpt.pt"
    checkpoint = load_file(path) if args.resume else None
    saved = {}
    if checkpoint and "config" not in checkpoint:
        raise ValueError(f"{path} holds a model but no training run to continue (an import?)")
    if checkpoint:
        with reading(path):  # the run's own settings, whole, and its place and log
            saved = dict(checkpoint["config"])
            if saved.keys() != {f.name for f in fields(TrainConfig)}:
                raise ValueError(f"its settings {sorted(saved)} are not those of a TrainConfig")
            TrainConfig(**saved)
            checkpoint["step"] = int(checkpoint["step"])
            checkpoint["log"] = [[float(value) for value in row] for row in checkpoint["log"]]
            checkpoint["losses"] = [float(value) for value in checkpoint["losses"]]
            if checkpoint["step"] < 0 or any(len(row) != 4 for row in checkpoint["log"]):
                raise ValueError(f"its step {checkpoint['step']} or log rows are out of shape")
    cfg = TrainConfig(**{**saved, **given})  # a mistake in the flags given is the user's
    for name in given.keys() & saved.keys() - set(RESUMABLE):
        if given[name] != saved[name]:
            raise ValueError(f"{flag(name)} cannot change when resuming: {path} was "
                             f"trained with {saved[name]}")
    if checkpoint and checkpoint["step"] >= cfg.steps:
        raise ValueError(f"{path} has trained {checkpoint['step']} steps: give --steps N, more "
                         f"than that, to train it further")
    rank = torchrun_env()[0]
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # under torchrun, only rank 0 prints
    result = train(cfg, args.out, args.device, args.compile, checkpoint, args.overwrite)
    if result is None:
        return 130  # stopped by a signal, the checkpoint saved
    if rank == 0:
        report(*result, cfg.context, 16 * cfg.batch_size)
    return 0

def command_sample(args):
    model, tok = load_model(args.ckpt, pick_device(args.device), DTYPES[args.dtype], args.context)
    if args.compile:
        compile_decoding(model)
    sample(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
           args.seed, args.num_samples)
    return 0

def command_eval(args):
    model, tok = load_model(args.ckpt, pick_device(args.device), DTYPES[args.dtype], args.context)
    data = encode_splits(split_text(get_text(args.data)), tok, model.args.max_seq_len)
    report(model, tok, data, model.args.max_seq_len, 16 * args.batch_size)
    return 0

def main(argv=None, parser=None):
    """Parse argv with parser (llama.py's own by default) and run the command; returns the exit
    status. In a notebook: main(["train", "--steps", "200"]). tools/ scripts pass their parser."""
    try:
        args = (parser or build_parser()).parse_args(None if argv is None else map(str, argv))
        return args.run(args)
    except SystemExit as e:  # --help: a notebook cell gets the status, not an exit
        return e.code
    except BrokenPipeError:  # the reader went away (sample | head): stop quietly, like Unix tools
        if sys.stdout is sys.__stdout__:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing to flush
        return 141
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError) as e:  # a mistake the user can fix
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            print(f"error: out of memory: use a smaller --batch-size, --context or model ({e})"[:300],
                  file=sys.stderr)
        elif torchrun_env()[1] > 1:  # under torchrun: a peer has failed
            print(f"error: another process stopped ({str(e).splitlines()[0][:80]}); its own error "
                  f"says why", file=sys.stderr)
        else:
            raise  # a bug: its traceback says where
        return 1

if __name__ == "__main__" and "__file__" in globals():  # a pasted cell runs nothing: call main()
    sys.exit(main())
