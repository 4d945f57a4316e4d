"""
llama.py: a LLaMA language model written from scratch and trained on Tiny Shakespeare, in one file.

    python llama.py train            download the data, train a tokenizer and the model, evaluate it
    python llama.py sample           generate text from out/ckpt.pt, printed as it is produced
    python llama.py eval             loss, accuracy, perplexity and bits per character on val and test
    python llama.py bench            training and decoding speed (KV cache against recomputation)
    python llama.py CMD --help       every flag of a command; in a notebook: main(["train", "--steps", "200"])

What LLaMA changes relative to GPT-2: RMSNorm instead of LayerNorm, before each sub-layer; rotary
positional embeddings (RoPE) instead of a learned position table; a SwiGLU feed-forward instead of
a GELU MLP; no biases; and, from LLaMA 2 on, key/value heads shared by groups of query heads
(grouped-query attention; multi-query with one key/value head), which shrinks the KV cache.

References: Touvron et al. 2023, "LLaMA" (arXiv:2302.13971) and "Llama 2" (arXiv:2307.09288); Meta's
llama/model.py (github.com/meta-llama/llama), whose parameter names this file uses; Su et al. 2021 (RoPE),
Zhang & Sennrich 2019 (RMSNorm), Shazeer 2020 (SwiGLU), Shazeer 2019 (multi-query attention).
"""
import argparse
import hashlib
import io
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import requests
import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Hyperparameters
# The documented ones keep their names. Command-line flags override them for one run
# (`python llama.py train --help`); the globals themselves never change.

VOCAB_SIZE = 130  # SentencePiece BPE pieces in the vocabulary (tokens)
BATCH_SIZE = 32  # sequences per optimizer step
CONTEXT_WINDOW = 16  # tokens per training sequence: the longest context the model sees
EPOCHS = 1000  # optimizer steps, each on one random batch (not passes over the data)
DIM = 128  # width of the residual stream, i.e. the embedding size (features per token)
LOG_INTERVAL = 10  # optimizer steps between log lines (each with a validation loss)
HEADS = 8  # query heads per attention layer
LAYERS = 4  # transformer blocks
KV_HEADS = 1  # key/value heads: 1 is multi-query, HEADS is multi-head, in between grouped-query
LEARNING_RATE = 1e-3  # peak Adam learning rate, reached at the end of warmup
WARMUP_STEPS = 50  # optimizer steps of linear warmup from 0 to LEARNING_RATE
MIN_LR_FRACTION = 0.1  # the cosine decay ends at this fraction of LEARNING_RATE
WEIGHT_DECAY = 0.1  # decoupled (AdamW) weight decay, on the weight matrices only
GRAD_CLIP = 1.0  # the gradient's global L2 norm is clipped to this
EVAL_BATCHES = 4  # fixed validation batches behind each log line's validation loss
SEED = 1337  # seeds the weights, the batches and sampling
OUT_DIR = "out"  # checkpoint, tokenizer cache and logs go here
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# beside llama.py; pasted into a notebook cell (no __file__), in the working folder
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
# what the original notebook's README reported, printed beside our numbers
ORIGINAL = {"val": {"loss": 4.469, "acc": 0.0559, "ppl": 87.3}, "test": {"acc": 0.0562, "ppl": 87.7}}

# -----------------------------------------------------------------------------
# Download
# Tiny Shakespeare (1.1 MB) is fetched once. Every file this program writes goes to a temporary
# name first and is renamed only when complete, so a failure never leaves half a file behind.

def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, then rename it to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def download(path, url=DATA_URL, sha256=DATA_SHA256, timeout=30.0):
    """Fetch url into path unless path exists, checking the sha256 when one is given."""
    path = Path(path)
    if path.exists():  # never overwritten
        return path
    print(f"downloading {url} to {path} ...", flush=True)
    try:
        r = requests.get(url, timeout=timeout)  # a body cut short raises: urllib3 checks Content-Length
        r.raise_for_status()
        digest = hashlib.sha256(r.content).hexdigest()
        if sha256 is not None and digest != sha256:
            raise OSError(f"sha256 {digest} is not the expected {sha256}")
        atomic_write(path, lambda f: f.write(r.content))
    except (requests.RequestException, OSError) as e:
        raise OSError(f"could not download {url}: {e}; fetch it by hand: curl -L -o {path} {url}") from None
    print(f"saved {len(r.content):,} bytes to {path}")
    return path

def read_text(path):
    """Read a UTF-8 text file, downloading Tiny Shakespeare first if it is the default one and missing."""
    path = Path(path)
    if not path.exists() and path.resolve() != HERE / "input.txt":
        raise FileNotFoundError(f"no data file at {path}: check --data")
    try:
        text = download(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8") from None
    if not text:
        raise ValueError(f"{path} is empty: give a text file, such as Tiny Shakespeare")
    return text

# -----------------------------------------------------------------------------
# Tokenizer
# SentencePiece BPE with VOCAB_SIZE pieces, trained on the training split. Its default normalization
# (newlines vanish, runs of spaces collapse) is off and "\n" is a piece, so decode(encode(text)) == text.

class Tokenizer:
    """A SentencePiece model, kept as its serialized bytes so that checkpoints carry it."""
    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.vocab_size()
        self.encode, self.decode = self.sp.encode, self.sp.decode  # str -> list of ids, list of ids -> str
        # characters each piece stands for ("▁" is SentencePiece's visible space), for bits per character
        self.n_chars = torch.tensor([0 if self.sp.is_unknown(i) else len(self.sp.id_to_piece(i))
                                     for i in range(self.vocab_size)])

    @staticmethod
    def train(text: str, vocab_size: int) -> "Tokenizer":
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(  # bos/eos -1: no slots for tokens this model never uses
                sentence_iterator=iter(text.splitlines(keepends=True)), model_writer=model, vocab_size=vocab_size,
                model_type="bpe", character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
                remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
                bos_id=-1, eos_id=-1, num_threads=1, minloglevel=2)
        except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars. 65 vs 60."
            raise ValueError(f"SentencePiece cannot make {vocab_size} pieces from this text ({e}); "
                             f"choose another --vocab-size") from None
        return Tokenizer(model.getvalue())

    def unknown_chars(self, text: str) -> str:
        """The characters of text that the tokenizer never saw in training (they would decode as ⁇)."""
        return "".join(sorted(c for c in set(text) if c != " " and self.sp.piece_to_id(c) == self.sp.unk_id()))

def get_tokenizer(train_text: str, vocab_size: int, out_dir) -> Tokenizer:
    """Train once per (text, vocab size) and reuse the saved model on later runs."""
    path = Path(out_dir) / f"tokenizer-{vocab_size}-{hashlib.sha256(train_text.encode()).hexdigest()[:12]}.model"
    if path.exists():
        return Tokenizer(path.read_bytes())
    print(f"training a {vocab_size}-piece BPE tokenizer on {len(train_text):,} characters ...", flush=True)
    tok = Tokenizer.train(train_text, vocab_size)
    atomic_write(path, lambda f: f.write(tok.model_proto))
    return tok

# -----------------------------------------------------------------------------
# Data
# Three contiguous parts, 70% train, 15% validation, 15% test, as the original notebook did. A batch
# is BATCH_SIZE random windows of CONTEXT_WINDOW tokens; its targets are the windows shifted by one.

def split_text(text: str) -> dict:
    """Cut at the 70% and 85% marks, by characters, so that the tokenizer can be trained on train only."""
    a, b = int(0.7 * len(text)), int(0.85 * len(text))
    return {"train": text[:a], "val": text[a:b], "test": text[b:]}

def load_splits(text: str, tok: Tokenizer, context: int) -> dict:
    """Token ids (a 1-D tensor) of each split, each long enough for one window and its targets."""
    data = {name: torch.tensor(tok.encode(part), dtype=torch.long) for name, part in split_text(text).items()}
    for name, d in data.items():
        if len(d) < context + 1:
            need = math.ceil((context + 1) / 0.15 * len(text) / max(1, sum(map(len, data.values()))))
            raise ValueError(f"the text is too short: its {name} split has {len(d)} tokens and a {context}-token "
                             f"context needs {context + 1}; use a text of at least ~{need:,} characters")
    return data

def get_batch(data, batch_size, context, generator=None):
    """batch_size random windows of one split: inputs (B, T) and targets (B, T), shifted by one token."""
    ix = torch.randint(len(data) - context, (batch_size,), generator=generator)  # (B,) window starts
    w = data[ix[:, None] + torch.arange(context + 1)]  # (B, T + 1)
    return w[:, :-1], w[:, 1:]

def windows(data, context):
    """Every token of a split (but the first) as a target, once: consecutive windows, the last padded."""
    pad = -(len(data) - 1) % context  # to a whole number of windows
    x, y = F.pad(data[:-1], (0, pad)), F.pad(data[1:], (0, pad), value=-100)  # -100: cross_entropy ignores it
    return x.view(-1, context), y.view(-1, context)  # (N, T) each

# -----------------------------------------------------------------------------
# Model
# Smallest part first, in forward-pass order: RMSNorm, rotary embeddings, attention with its KV cache,
# the SwiGLU feed-forward, the block, the whole model. No class reads the globals: ModelArgs brings all.

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
    dropout: float = 0.0  # not Meta's: LLaMA trains on far more text than this and drops nothing

    def __post_init__(self):
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        self.head_dim = self.dim // max(1, self.n_heads)  # not a field: it follows from the others
        for name, value in asdict(self).items():
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        d, h, kv = self.dim, self.n_heads, self.n_kv_heads
        for bad, message in [(d % h, f"dim {d} is not divisible by n_heads {h}"),
                             (h % kv, f"n_heads {h} is not divisible by n_kv_heads {kv}"),
                             (self.head_dim % 2, f"the head size dim / n_heads = {d} / {h} = {self.head_dim} is odd "
                                                 f"(rotary embeddings rotate pairs of features)")]:
            if bad:
                raise ValueError(f"{message}: change --dim, --heads or --kv-heads")

    @property
    def hidden_dim(self):
        """LLaMA's feed-forward width: 2/3 of 4*dim (SwiGLU has three matrices, not two), rounded up."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over each token's features: no mean subtracted, no bias."""
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # each token by its own RMS (last dimension only), in float32 as Meta does; F.rms_norm is the same
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight

def precompute_freqs(head_dim, max_seq_len, theta=10000.0):
    """cos and sin of the angle pos * theta^(-2i/head_dim), for each position and feature pair i."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (head_dim/2,)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # (max_seq_len, head_dim/2)
    return angles.cos(), angles.sin()

def apply_rotary_emb(x, freqs_cis):
    """Rotate each feature pair (x[2i], x[2i+1]) by its position's angle, as a complex product (Meta's
    convention). A rotated query and key have a dot product that depends only on their distance."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, heads, head_dim/2), complex
    return torch.view_as_real(xc * freqs_cis).flatten(-2).type_as(x)  # (B, T, heads, head_dim)

class Attention(nn.Module):
    """Causal self-attention; groups of query heads share each of the n_kv_heads key/value heads.
    n_kv_heads == n_heads is multi-head attention, 1 is multi-query, anything between grouped-query."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # (B, max_seq_len, n_kv_heads, head_dim) while decoding

    def forward(self, x, freqs_cis, start_pos=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        mask, causal = None, T > 1
        if start_pos is not None:  # decoding: write this step's keys and values, read all so far
            self.cache_k[:, start_pos:start_pos + T], self.cache_v[:, start_pos:start_pos + T] = k, v
            k, v = self.cache_k[:, :start_pos + T], self.cache_v[:, :start_pos + T]  # (B, S, n_kv_heads, hd)
            if T > 1:  # several new queries: each sees every cached key and the causal part of its own
                mask, causal = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos), False
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T or S, head_dim)
        # enable_gqa lets each group of n_heads // n_kv_heads query heads read one key/value head: Meta's
        # repeat_kv, i.e. torch.repeat_interleave(k, n_heads // n_kv_heads, dim=1), without the copy
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, n_heads, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)

class FeedForward(nn.Module):
    """SwiGLU, a gated MLP: w2(silu(w1 x) * w3 x)."""
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, hidden_dim) inside, (B, T, dim) out

class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attention(norm(x)), then h + feed_forward(norm(h))."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm, self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps), RMSNorm(args.dim, eps=args.norm_eps)
        self.dropout = args.dropout  # residual dropout while training: a regularizer for small data

    def forward(self, x, freqs_cis, start_pos=None):
        h = x + F.dropout(self.attention(self.attention_norm(x), freqs_cis, start_pos), self.dropout, self.training)
        return h + F.dropout(self.feed_forward(self.ffn_norm(h)), self.dropout, self.training)

class Transformer(nn.Module):
    """Token embeddings, n_layers blocks, a final RMSNorm, and a linear layer to the logits."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # not persistent: they follow from args, so checkpoints leave them out (as Meta's do)
        cos, sin = precompute_freqs(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        for name, p in self.named_parameters():  # GPT-2's init: small normal weights, the layers
            if p.dim() == 2:  # that write into the residual stream scaled down with depth
                deep = name.endswith(("wo.weight", "w2.weight"))
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers) if deep else 0.02)

    def forward(self, idx, targets=None, start_pos=None):
        """Logits (B, T, vocab_size) for idx (B, T), and the mean cross-entropy if targets are given.
        start_pos=None: whole sequences, no cache (training, evaluation); an integer: idx continues
        the cached sequence at that position (decoding, after setup_cache)."""
        T, p0 = idx.size(1), start_pos or 0  # idx: (B, T)
        if p0 + T > self.args.max_seq_len:
            raise ValueError(f"positions {p0}..{p0 + T - 1} exceed max_seq_len {self.args.max_seq_len}")
        cos, sin = self.freqs_cos[p0:p0 + T].float(), self.freqs_sin[p0:p0 + T].float()
        freqs_cis = torch.complex(cos, sin)[:, None, :]  # (T, 1, head_dim/2): e^(i * angle), one per head
        h = self.tok_embeddings(idx)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, freqs_cis, start_pos)
        logits = self.output(self.norm(h)).float()  # (B, T, vocab_size); the softmax is inside the loss
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def setup_cache(self, batch_size):
        """Preallocate each layer's key/value cache (batch_size None frees it)."""
        a, w = self.args, self.tok_embeddings.weight
        shape = (batch_size, a.max_seq_len, a.n_kv_heads, a.head_dim)
        for layer in self.layers:  # written in place while decoding, never concatenated
            layer.attention.cache_k = None if batch_size is None else w.new_zeros(shape)
            layer.attention.cache_v = None if batch_size is None else w.new_zeros(shape)

    @torch.inference_mode()  # like no_grad, and lighter: these tensors will never need gradients
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 generator=None, on_token=None):
        """Continue idx (B, T0) by max_new_tokens tokens; returns (B, T0 + max_new_tokens).
        The model sees at most max_seq_len tokens (of a longer prompt, the last ones). When the window
        is full, its most recent half is run again from position 0 (refilling the cache) and decoding
        goes on. use_cache=False recomputes the window at every step instead: the same tokens, slower."""
        (B, n), T = idx.shape, self.args.max_seq_len
        seq = torch.cat([idx, idx.new_zeros(B, max_new_tokens)], dim=1)  # (B, T0 + max_new_tokens)
        start, cached = max(0, n - T), 0  # where the window starts in seq; its tokens in the cache
        self.setup_cache(B if use_cache else None)
        for _ in range(max_new_tokens):
            if n - start > T:  # the window is full: keep its last half, refill the cache from 0
                start, cached = n - max(1, T // 2), 0
            if use_cache:  # only the tokens the cache has not seen: the prompt, then one at a time
                logits, _ = self(seq[:, start + cached:n], start_pos=cached)
                cached = n - start
            else:
                logits, _ = self(seq[:, start:n])
            seq[:, n] = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            n += 1
            if on_token is not None:
                on_token(seq[:, :n])
        self.setup_cache(None)  # free it
        return seq

def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, vocab_size): argmax at temperature 0, else a softmax sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):  # keep the k likeliest tokens
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p
        probs, order = torch.sort(logits.softmax(-1), dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # the tokens before this one already reach top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)  # (B,)

# -----------------------------------------------------------------------------
# Training
# Adam (AdamW) with warmup, cosine decay and gradient clipping. Every LOG_INTERVAL steps a line: the mean
# training loss since the last one and the loss on fixed validation batches. Then save, and evaluate.

TRAIN_KEYS = ("steps", "batch_size", "context", "dim", "layers", "heads", "kv_heads", "vocab_size", "lr", "warmup",
              "weight_decay", "dropout", "log_interval", "seed", "data")  # saved in the checkpoint, reused by --resume

def pick_device(name="auto"):
    """cuda, then mps, then cpu, unless the user names one."""
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(auto if name == "auto" else name)

def autocast(device):
    """bf16 autocast on GPUs with bf16 arithmetic (compute capability 8.0 on; a T4 only emulates it), else off."""
    bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)  # weights and Adam's state stay float32

def model_args_from(cfg, vocab_size=None):
    """ModelArgs from command-line settings, refusing bad values before any work starts."""
    for name in ("steps", "batch_size", "context", "vocab_size", "log_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0 or not 0 <= cfg.dropout < 1:
        raise ValueError(f"--lr must be positive and --dropout in [0, 1), got {cfg.lr} and {cfg.dropout}")
    return ModelArgs(dim=cfg.dim, n_layers=cfg.layers, n_heads=cfg.heads, n_kv_heads=cfg.kv_heads,
                     vocab_size=vocab_size or cfg.vocab_size, max_seq_len=cfg.context, dropout=cfg.dropout)

def lr_at(step, cfg):
    """Linear warmup to cfg.lr over cfg.warmup steps, then cosine decay to MIN_LR_FRACTION of it."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))

def build(cfg, vocab_size, device):
    """The seeded model, what runs it (with --compile, a wrapper that checkpoints never save), and Adam."""
    if device.type == "cuda":  # TF32 matmuls: float32 storage, faster tensor-core arithmetic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model = Transformer(model_args_from(cfg, vocab_size)).to(device)
    # decoupled weight decay on the matrices only, not on the norms' gains; fused kernels on CUDA
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=device.type == "cuda")
    return model, torch.compile(model) if cfg.compile else model, optimizer

def train_step(model, fwd, optimizer, x, y, lr, device):
    """One optimizer step on the batch (x, y); returns its loss. A non-finite loss changes nothing."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(device):
        _, loss = fwd(x.to(device), y.to(device))  # fwd: the model, or its torch.compile wrapper
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    loss = loss.item()
    if math.isfinite(loss):
        optimizer.step()
    return loss

def train(cfg):
    """Train as cfg says, save cfg.out/ckpt.pt and evaluate it; returns the evaluation, or None if stopped."""
    model_args_from(cfg)
    out, device, ckpt_path = Path(cfg.out), pick_device(cfg.device), Path(cfg.out) / "ckpt.pt"
    resume = load_checkpoint(ckpt_path) if cfg.resume else None
    if resume is not None:  # the run's own settings, so its schedule and batches continue exactly
        cfg = argparse.Namespace(**{**vars(cfg), **resume["config"]})
    text = read_text(cfg.data)
    tok = Tokenizer(resume["tokenizer"]) if resume else get_tokenizer(split_text(text)["train"], cfg.vocab_size, out)
    data = load_splits(text, tok, cfg.context)
    model, fwd, optimizer = build(cfg, tok.vocab_size, device)
    batch_gen, step = torch.Generator().manual_seed(cfg.seed), 0  # batch_gen draws the training batches
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        batch_gen.set_state(resume["rng"])
        step = resume["step"]
        print(f"resuming from {ckpt_path} at step {step}")
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters | {len(data['train']):,} tokens | {device}")
    # the same validation windows at every log line, so the curve shows the model, not the draw
    val_x, val_y = get_batch(data["val"], EVAL_BATCHES * cfg.batch_size, cfg.context, torch.Generator().manual_seed(0))
    val_tokens_per_char = val_y.numel() / tok.n_chars[val_y].sum().item()  # turns nats/token into nats/char
    config = {k: getattr(cfg, k) for k in TRAIN_KEYS}
    save = lambda s: save_checkpoint(ckpt_path, model, tok, optimizer, s, batch_gen.get_state(), config)
    stop = []  # gets the signal number on SIGINT or SIGTERM; the step in progress finishes first
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    if not resume:
        (out / "log.csv").write_text("step,train_loss,val_loss,val_nats_per_char,lr,tokens_per_s,peak_mib,seconds\n")
    t0 = t_last = time.time()
    eval_time, losses, first_step = 0.0, [], step
    try:
        while step < cfg.steps and not stop:
            lr = lr_at(step, cfg)
            x, y = get_batch(data["train"], cfg.batch_size, cfg.context, batch_gen)
            losses.append(train_step(model, fwd, optimizer, x, y, lr, device))
            if not math.isfinite(losses[-1]):  # keep the last good checkpoint: save nothing
                raise FloatingPointError(f"the training loss became {losses[-1]} at step {step + 1}; "
                                         f"try a lower --lr than {cfg.lr}; {ckpt_path} was left as it was")
            step += 1
            if step % cfg.log_interval == 0 or step == cfg.steps:
                t_eval = time.time()
                val_loss = evaluate(model, val_x, val_y, len(val_x), device)["loss"]
                eval_time += time.time() - t_eval
                tok_s = len(losses) * cfg.batch_size * cfg.context / (t_eval - t_last)
                elapsed, train_loss = time.time() - t0, sum(losses) / len(losses)
                left = elapsed / (step - first_step) * (cfg.steps - step)
                print(f"step {step:5d}/{cfg.steps} | train {train_loss:.4f} | val {val_loss:.4f} | lr {lr:.2e} | "
                      f"{tok_s:,.0f} tok/s | {elapsed:.0f}s elapsed, {left:.0f}s left", flush=True)
                with open(out / "log.csv", "a") as log:
                    log.write(f"{step},{train_loss:.5f},{val_loss:.5f},{val_loss * val_tokens_per_char:.5f},{lr:.6g},"
                              f"{tok_s:.0f},{peak_memory_mib(device):.0f},{elapsed:.1f}\n")
                losses, t_last = [], time.time()
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:  # the last is saved below
                save(step)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    save(step)
    if stop:
        print(f"\nstopped by signal {stop[0]} after step {step}; saved {ckpt_path}; "
              f"continue with: python llama.py train --resume --out {cfg.out}")
        return None
    total = time.time() - t0
    print(f"saved {ckpt_path} | {total:.0f}s, {100 * eval_time / total:.0f}% of it validation logging | "
          f"peak memory {peak_memory_mib(device):,.0f} MiB")
    plot_log(out)
    return report(model, tok, data, cfg.context, cfg.batch_size, device)

def plot_log(out):
    """out/loss.png from out/log.csv when matplotlib is installed (Colab has it); it is optional."""
    try:
        from matplotlib.figure import Figure  # no pyplot: a notebook's plotting backend is left alone
    except ImportError:
        return
    rows = np.loadtxt(out / "log.csv", delimiter=",", skiprows=1, ndmin=2)
    ax = (fig := Figure(figsize=(7, 4))).subplots()
    ax.plot(rows[:, 0], rows[:, 1:3], label=["train (mean since the last point)", "validation (fixed batches)"])
    ax.axhline(ORIGINAL["val"]["loss"], color="gray", ls="--", label="original README, validation")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title="llama.py on Tiny Shakespeare")
    ax.legend()
    fig.savefig(out / "loss.png", dpi=100, bbox_inches="tight")

# -----------------------------------------------------------------------------
# Evaluation
# Every token of the validation and test splits, once, in consecutive windows (exact and repeatable).
# Bits per character divide the loss by the characters predicted: they compare across tokenizers.

@torch.no_grad()
def evaluate(model, x, y, batch_size, device, n_chars=None, progress=None):
    """Loss (nats per token), accuracy and perplexity on inputs x and targets y (N, T); targets -100 skipped."""
    loss_sum, correct, count, training = 0.0, 0, 0, model.training
    model.eval()  # no dropout
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with autocast(device):
            logits, _ = model(xb)  # (b, T, vocab_size)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == yb).sum().item()
        count += (yb != -100).sum().item()
        if progress:
            print(f"\r{progress} {min(i + batch_size, len(x)) / len(x):4.0%}", end="", flush=True)
    bpc = loss_sum / (n_chars * math.log(2)) if n_chars else None  # bits per character
    model.train(training)
    return {"loss": loss_sum / count, "acc": correct / count, "ppl": math.exp(loss_sum / count), "bpc": bpc}

def report(model, tok, data, context, batch_size, device):
    """Evaluate the full validation and test splits; print them beside the original README's numbers."""
    results = {}
    for split in ("val", "test"):
        x, y = windows(data[split], context)
        n_chars = tok.n_chars[data[split][1:]].sum().item()  # the characters of every predicted token
        results[split] = evaluate(model, x, y, 16 * batch_size, device, n_chars, progress=f"evaluating {split}")
    print(f"\r{'split':<6}{'loss':>8}{'accuracy':>10}{'perplexity':>12}{'bits/char':>11}   original README")
    for split, r in results.items():
        o = ORIGINAL[split]
        print(f"{split:<6}{r['loss']:8.4f}{r['acc']:10.4f}{r['ppl']:12.2f}{r['bpc']:11.4f}   "
              + (f"loss {o['loss']}, " if "loss" in o else "") + f"accuracy {o['acc']}, perplexity {o['ppl']}")
    return results

# -----------------------------------------------------------------------------
# Sampling
# The prompt is encoded and run through the model once, filling the KV cache; then one token at
# a time is sampled and fed back, and the text is printed as soon as it is decoded.

def sample(model, tok, prompt="\n", max_new_tokens=500, temperature=0.8, top_k=None, top_p=None, seed=SEED,
           num_samples=1):
    """Print num_samples continuations of prompt as they are produced, and return them."""
    for bad, message in [
        (temperature < 0, f"--temperature must be 0 (greedy) or more, got {temperature}"),
        (top_k is not None and top_k < 1, f"--top-k must be at least 1, got {top_k}"),
        (top_p is not None and not 0 < top_p <= 1, f"--top-p must be in (0, 1], got {top_p}"),
        (max_new_tokens < 0, f"--max-new-tokens must be 0 or more, got {max_new_tokens}"),
        (prompt == "", 'the prompt is empty: give at least one character, such as --prompt "\\n" (the default)'),
        (unknown := tok.unknown_chars(prompt), f"the prompt has characters the tokenizer never saw: "
                                               f"{unknown!r}; remove or replace them")]:
        if bad:
            raise ValueError(message)
    ids, T, device = tok.encode(prompt), model.args.max_seq_len, model.output.weight.device
    if len(ids) > T:
        print(f"(the prompt has {len(ids)} tokens; the model sees its last {T})", file=sys.stderr)
    generator = torch.Generator(device).manual_seed(seed)
    show = lambda seq: print(tok.decode(seq[0, -1:].tolist()), end="", flush=True)  # the newest piece
    texts = []
    for i in range(num_samples):
        print(prompt, end="", flush=True)
        idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T0)
        out = model.generate(idx, max_new_tokens, temperature, top_k, top_p, generator=generator, on_token=show)
        texts.append(tok.decode(out[0].tolist()))
        print("\n" + "-" * 40 if i < num_samples - 1 else "")
    return texts

# -----------------------------------------------------------------------------
# Checkpoints and bench
# A checkpoint holds only tensors, numbers, strings and bytes, so torch.load(weights_only=True)
# reads it and no pickled code can run; it is written with atomic_write, like every file here.

def save_checkpoint(path, model, tok, optimizer, step, rng, config):
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.args), "tokenizer": tok.model_proto,
            "optimizer": optimizer.state_dict(), "step": step, "rng": rng, "config": config}
    atomic_write(path, lambda f: torch.save(ckpt, f))

def load_checkpoint(path):
    """A checkpoint written by save_checkpoint; anything else is refused with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: run `python llama.py train` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, a truncated file and a foreign format all land here
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{path} is not a checkpoint that can be loaded safely ({why}); "
                         f"retrain or give another --ckpt") from None
    keys = {"model", "model_args", "tokenizer", "optimizer", "step", "rng", "config"}
    if not isinstance(ckpt, dict) or not keys <= ckpt.keys():
        raise ValueError(f"{path} is not a llama.py checkpoint (it needs the keys {sorted(keys)}); retrain")
    return ckpt

def load_model(path, device):
    """The model (in eval mode) and tokenizer of a checkpoint."""
    ckpt = load_checkpoint(path)
    args, tok = ModelArgs(**ckpt["model_args"]), Tokenizer(ckpt["tokenizer"])
    if tok.vocab_size != args.vocab_size:
        raise ValueError(f"{path}: its tokenizer has {tok.vocab_size} pieces but its model {args.vocab_size}")
    model = Transformer(args)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit {ckpt['model_args']}: {str(e)[:300]}") from None
    return model.to(device).eval(), tok

def peak_memory_mib(device):
    """The most memory this process has held so far: allocated on the GPU, else resident."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if sys.platform == "win32":  # no resource module there
        return float("nan")
    import resource  # Unix only, so imported here; ru_maxrss is in KiB, on macOS in bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)

def bench(cfg):
    """Training tokens/s and model FLOP/s (as PaLM counts them); decoding tokens/s with and without the KV cache."""
    device = pick_device(cfg.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model, fwd, optimizer = build(cfg, cfg.vocab_size, device)
    data = torch.randint(cfg.vocab_size, (100_000,))  # the speed does not depend on the text
    print(f"device {device} | {torch.get_num_threads()} threads | torch {torch.__version__}")
    for i in range(cfg.bench_warmup + cfg.bench_steps):
        if i == cfg.bench_warmup:  # time only the steps after warm-up
            sync()
            t = time.perf_counter()
        train_step(model, fwd, optimizer, *get_batch(data, cfg.batch_size, cfg.context), cfg.lr, device)
    sync()
    train_tok_s = cfg.bench_steps * cfg.batch_size * cfg.context / (time.perf_counter() - t)
    n_weights = sum(p.numel() for p in model.parameters() if p.dim() == 2) - model.tok_embeddings.weight.numel()
    flops = 6 * n_weights + 12 * model.args.n_layers * cfg.context * model.args.dim  # per token: 2 + 4 per weight
    print(f"train  {train_tok_s:10,.0f} tokens/s (batch {cfg.batch_size} x context {cfg.context}, "
          f"{cfg.bench_steps} steps after {cfg.bench_warmup} of warm-up): {flops * train_tok_s / 1e12:.3g} TFLOP/s")
    # decoding: the same shape, with a context that holds the whole generation
    speed, outs, n = {}, {}, cfg.new_tokens
    dec = Transformer(ModelArgs(**{**asdict(model.args), "max_seq_len": max(n + 1, cfg.context)})).eval().to(device)
    for use_cache in (True, False, True, False):  # the best of two runs each: the first also warms up
        t = time.perf_counter()
        outs[use_cache] = dec.generate(torch.zeros(1, 1, dtype=torch.long, device=device), n, 0, use_cache=use_cache)
        sync()
        speed[use_cache] = max(speed.get(use_cache, 0), n / (time.perf_counter() - t))
    print(f"decode {speed[True]:10,.0f} tokens/s with the KV cache, {speed[False]:,.0f} recomputing ({n} greedy "
          f"tokens, batch 1): {speed[True] / speed[False]:.1f}x; same tokens: {torch.equal(*outs.values())}")
    print(f"peak memory {peak_memory_mib(device):,.0f} MiB ({'GPU' if device.type == 'cuda' else 'resident'})")
    return {"train_tok_s": train_tok_s, "decode_tok_s": speed[True], "recompute_tok_s": speed[False]}

# -----------------------------------------------------------------------------
# Command line
# main(argv) parses its own list, so a notebook can call main(["train", "--steps", "200"]).
# A user's mistake prints one line and returns a non-zero code instead of a traceback.

def build_parser():
    parser = argparse.ArgumentParser(prog="llama.py", description=__doc__.strip().split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"train": "train a model and evaluate it", "sample": "generate text from a checkpoint",
                "eval": "evaluate a checkpoint", "bench": "training and decoding tokens/s"}
    subs = {name: sub.add_parser(name, help=what, description=what) for name, what in commands.items()}
    run, ckpt = ("train", "bench"), ("sample", "eval")
    for flag, default, kind, what, where in [  # where: the commands that take the flag
        ("--steps", EPOCHS, int, "optimizer steps (EPOCHS)", run),
        ("--batch-size", BATCH_SIZE, int, "sequences per step (eval: per batch, times 16)", run + ("eval",)),
        ("--context", CONTEXT_WINDOW, int, "tokens per sequence (CONTEXT_WINDOW)", run),
        ("--dim", DIM, int, "embedding width", run), ("--layers", LAYERS, int, "transformer blocks", run),
        ("--heads", HEADS, int, "query heads", run), ("--kv-heads", KV_HEADS, int, "key/value heads", run),
        ("--vocab-size", VOCAB_SIZE, int, "tokenizer pieces", run),
        ("--lr", LEARNING_RATE, float, "peak learning rate", run), ("--warmup", WARMUP_STEPS, int, "warmup steps", run),
        ("--log-interval", LOG_INTERVAL, int, "steps per log line", run), ("--out", OUT_DIR, str, "output folder", run),
        ("--weight-decay", WEIGHT_DECAY, float, "AdamW's decoupled weight decay on the weight matrices", run),
        ("--dropout", 0.0, float, "residual dropout while training (LLaMA uses none)", run),
        ("--save-every", 0, int, "also save the checkpoint every N steps (0: only at the end)", ("train",)),
        ("--new-tokens", 512, int, "tokens decoded", ("bench",)), ("--bench-steps", 50, int, "timed steps", ("bench",)),
        ("--bench-warmup", 10, int, "untimed training steps before them", ("bench",)),
        ("--ckpt", str(Path(OUT_DIR) / "ckpt.pt"), str, "checkpoint to load", ckpt),
        ("--prompt", "\n", str, "text to continue", ("sample",)),
        ("--max-new-tokens", 500, int, "tokens to generate", ("sample",)),
        ("--temperature", 0.8, float, "0 is greedy; higher is more random", ("sample",)),
        ("--top-k", None, int, "sample from the k likeliest tokens only", ("sample",)),
        ("--top-p", None, float, "sample from the likeliest tokens holding this probability only", ("sample",)),
        ("--num-samples", 1, int, "samples", ("sample",)), ("--seed", SEED, int, "random seed", tuple(commands)),
        ("--device", "auto", str, "cuda, mps, cpu, or auto: the first of them available", tuple(commands)),
        ("--data", str(HERE / "input.txt"), str, "the text (UTF-8)", run + ("eval",))]:
        for name in where:
            subs[name].add_argument(flag, type=kind, default=default, help=f"{what} (default {default!r})")
    subs["train"].add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt, with its own settings")
    for name in run:
        subs[name].add_argument("--compile", action="store_true", help="torch.compile the model for training")
    return parser

def main(argv=None):
    cfg = build_parser().parse_args(sys.argv[1:] if argv is None else [str(a) for a in argv])
    try:
        if cfg.command == "train":
            return 0 if train(cfg) is not None else 130  # 130: stopped by a signal, checkpoint saved
        if cfg.command == "bench":
            bench(cfg)
            return 0
        model, tok = load_model(cfg.ckpt, pick_device(cfg.device))
        if cfg.command == "sample":
            sample(model, tok, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                   cfg.seed, cfg.num_samples)
            return 0
        data = load_splits(read_text(cfg.data), tok, model.args.max_seq_len)
        report(model, tok, data, model.args.max_seq_len, cfg.batch_size, model.output.weight.device)
        return 0
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

if __name__ == "__main__" and "__file__" in globals():  # a pasted notebook cell runs nothing: call main([...])
    sys.exit(main())
