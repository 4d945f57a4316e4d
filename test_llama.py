"""Tests for llama.py and tools/: every component against a reference written here, a known answer
or an invariant.

Run with `python -m pytest -q`. CPU only, no network: the download tests start their own HTTP
server on 127.0.0.1. The end-to-end tests need input.txt beside llama.py, which
`python llama.py train` downloads.
"""
import cmath
import hashlib
import http.server
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import llama as L
from tools import ablate, bench, meta

HERE = Path(__file__).resolve().parent
INPUT = HERE / "input.txt"
NO_INPUT = "input.txt is missing: run `python llama.py train` once to download it"
needs_input = pytest.mark.skipif(not INPUT.exists(), reason=NO_INPUT)
TINY = ["--steps", "30", "--dim", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--context", "8", "--batch-size", "8", "--log-interval", "10", "--vocab-size", "130",
        "--lr", "3e-3", "--warmup", "5"]
CPU = torch.device("cpu")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses share two cores with the test run


def tiny_model(n_heads=4, n_kv_heads=1, dim=16, max_seq_len=16, vocab_size=50, n_layers=2, seed=0):
    torch.manual_seed(seed)
    args = L.ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       vocab_size=vocab_size, max_seq_len=max_seq_len, multiple_of=8)
    return L.Transformer(args).eval()


def rope(head_dim, T, theta=10000.0):
    """The model's rotary tables, shaped as it uses them: (T, 1, head_dim/2) each."""
    cos, sin = L.precompute_rope(head_dim, T, theta)
    return cos[:, None], sin[:, None]


def one_line_error(capsys, words):
    """The command printed exactly one line on stderr, starting with error: and holding words."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in err and "Traceback" not in err, err
    assert lines[0].startswith("error: ") or lines[0] == "interrupted", err
    return err


def llama_command(*args, script="llama.py"):
    return [sys.executable, str(HERE / script), *[str(a) for a in args]]


def wait_for_line(proc, words, timeout=60):
    """Read proc's stdout until a line holding words; returns the lines read."""
    lines = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if words in line:
            return lines
    raise AssertionError(f"no line with {words!r} in {lines}")


@pytest.fixture(scope="session")
def small_text(tmp_path_factory):
    """The first 300,000 characters of Tiny Shakespeare, to keep end-to-end runs short."""
    if not INPUT.exists():
        pytest.skip(NO_INPUT)
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(INPUT.read_text(encoding="utf-8")[:300_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory, small_text):
    """A tiny model trained through main(), shared by the end-to-end tests (never written to)."""
    out = tmp_path_factory.mktemp("run")
    assert L.main(["train", *TINY, "--data", small_text, "--out", out]) == 0
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run, for tests that write into it."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# ======================================================================= the lesson: components

def test_shapes_of_every_component():
    m = tiny_model(n_heads=4, n_kv_heads=2, dim=16)
    a = m.args
    B, T = 3, 5
    x = torch.randn(B, T, a.dim)
    cos, sin = L.precompute_rope(a.head_dim, T)
    assert cos.shape == sin.shape == (T, a.head_dim // 2) and not cos.is_complex()
    cos, sin = rope(a.head_dim, T)  # (T, 1, head_dim/2): the same for every head
    assert L.RMSNorm(a.dim)(x).shape == (B, T, a.dim)
    assert L.apply_rotary_emb(torch.randn(B, T, 4, a.head_dim), cos, sin).shape == (B, T, 4, 4)
    assert m.layers[0].attention(x, cos, sin).shape == (B, T, a.dim)
    assert m.layers[0].feed_forward(x).shape == (B, T, a.dim)
    assert m.layers[0](x, cos, sin).shape == (B, T, a.dim)
    logits, loss = m(torch.randint(a.vocab_size, (B, T)))
    assert logits.shape == (B, T, a.vocab_size) and loss is None
    assert m.layers[0].attention.wk.weight.shape == (2 * a.head_dim, a.dim), "two key/value heads"


def test_hidden_dim_follows_llama_rule():
    # Meta's rule: int(2 * 4 * dim / 3), times ffn_dim_multiplier, rounded up to multiple_of
    assert L.ModelArgs(dim=128, multiple_of=256).hidden_dim == 512
    llama_7b = L.ModelArgs(dim=4096, n_heads=32, n_kv_heads=32, multiple_of=256)
    assert llama_7b.hidden_dim == 11008
    llama2_70b = L.ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096,
                             ffn_dim_multiplier=1.3)
    assert llama2_70b.hidden_dim == 28672


def test_state_dict_uses_meta_names_and_nothing_in_the_model_is_complex():
    model = tiny_model(n_layers=2)
    names = set(model.state_dict())
    per_layer = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"]
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    expected |= {f"layers.{i}.{name}.weight" for i in range(2) for name in per_layer}
    assert names == expected, names ^ expected  # no rotary table, no cache, no biases
    # DistributedDataParallel broadcasts every buffer, and NCCL has no complex type; nor has MPS
    model.setup_cache(2)
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_complex() for t in tensors), [t.dtype for t in tensors]
    assert {t.dtype for t in tensors} == {torch.float32}


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = L.RMSNorm(24, eps=1e-5)
    norm.weight.data = torch.randn(24)
    x = torch.randn(2, 7, 24) * 3
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-5), (norm(x) - expected).abs().max()
    # per token: changing one token leaves the others alone (the seed normalized the sequence)
    x2 = x.clone()
    x2[:, 3] *= 100
    assert torch.equal(norm(x)[:, :3], norm(x2)[:, :3])
    # it divides by the RMS: the output's RMS is 1 when the gain is 1
    rms = L.RMSNorm(24)(x).pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3), rms


def test_rotary_matches_meta_complex_product():
    """Meta's form, written here with Python's complex numbers: the pair (x[2i], x[2i+1]) is
    x[2i] + 1j x[2i+1], multiplied by e^(1j * position * theta^(-2i / head_dim))."""
    torch.manual_seed(0)
    B, T, H, hd = 2, 6, 3, 8  # batch, positions, heads, head size
    theta = 10000.0
    x = torch.randn(B, T, H, hd)
    out = L.apply_rotary_emb(x, *rope(hd, T, theta))
    expected = torch.empty_like(x)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for i in range(hd // 2):
                    angle = t * theta ** (-2 * i / hd)
                    z = complex(x[b, t, h, 2 * i], x[b, t, h, 2 * i + 1]) * cmath.exp(1j * angle)
                    expected[b, t, h, 2 * i] = z.real
                    expected[b, t, h, 2 * i + 1] = z.imag
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
    # and torch's own complex numbers, as Meta's llama/model.py computes it, agree to float32
    freqs = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(),
                                                            theta ** (-torch.arange(0, hd, 2) / hd)))
    meta = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * freqs[:, None])
    assert torch.allclose(out, meta.flatten(-2), atol=1e-6)


def test_rotary_dot_product_depends_only_on_offset():
    torch.manual_seed(0)
    hd = 16
    T = 32
    cos, sin = rope(hd, T)
    q = torch.randn(hd)
    k = torch.randn(hd)
    rq = L.apply_rotary_emb(q.expand(1, T, 1, hd), cos, sin)[0, :, 0]  # (T, hd): q everywhere
    rk = L.apply_rotary_emb(k.expand(1, T, 1, hd), cos, sin)[0, :, 0]
    for offset in (0, 3, 7):
        dots = torch.stack([rq[m] @ rk[m - offset] for m in range(offset, T)])
        assert torch.allclose(dots, dots[0].expand_as(dots), atol=1e-4), (offset, dots)
    assert not torch.allclose(rq[5] @ rk[2], rq[5] @ rk[4], atol=1e-3), "other offsets differ"


def reference_attention(attn, x, cos, sin):
    """Meta's recipe spelled out: repeat the key/value heads, then softmax(q k^T / sqrt(d)) v."""
    B, T, _ = x.shape
    H = attn.n_heads
    KV = attn.n_kv_heads
    hd = attn.head_dim
    q = L.apply_rotary_emb(attn.wq(x).view(B, T, H, hd), cos, sin)
    k = L.apply_rotary_emb(attn.wk(x).view(B, T, KV, hd), cos, sin)
    k = k.repeat_interleave(H // KV, dim=2)
    v = attn.wv(x).view(B, T, KV, hd).repeat_interleave(H // KV, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * hd)
    return attn.wo(y)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_matches_reference(n_kv_heads):
    m = tiny_model(n_heads=4, n_kv_heads=n_kv_heads, dim=32)
    x = torch.randn(2, 9, 32)
    attn = m.layers[0].attention
    got = attn(x, *rope(8, 9))
    expected = reference_attention(attn, x, *rope(8, 9))
    assert torch.allclose(got, expected, atol=1e-5), (n_kv_heads, (got - expected).abs().max())


def test_feed_forward_is_swiglu():
    ff = L.FeedForward(8, 24)
    x = torch.randn(3, 8)
    a = x @ ff.w1.weight.T
    b = x @ ff.w3.weight.T
    expected = (a * torch.sigmoid(a) * b) @ ff.w2.weight.T
    assert torch.allclose(ff(x), expected, atol=1e-6)


def test_model_args_refuse_bad_shapes():
    for kwargs, words in [({"dim": 30, "n_heads": 4}, "not divisible by n_heads"),
                          ({"n_heads": 8, "n_kv_heads": 3}, "not divisible by n_kv_heads"),
                          ({"dim": 24, "n_heads": 8}, "is odd"),
                          ({"n_layers": 0}, "n_layers must be a whole number, at least 1"),
                          ({"dim": 128.0}, "dim must be a whole number"),
                          ({"max_seq_len": True}, "max_seq_len must be a whole number")]:
        with pytest.raises(ValueError, match=words):
            L.ModelArgs(**kwargs)


def test_dropout_acts_only_while_training():
    torch.manual_seed(0)
    args = dict(dim=16, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=50, max_seq_len=16,
                multiple_of=8)
    m = L.Transformer(L.ModelArgs(**args, dropout=0.5))
    plain = L.Transformer(L.ModelArgs(**args))
    plain.load_state_dict(m.state_dict())
    idx = torch.randint(50, (2, 10))
    assert not torch.allclose(m(idx)[0], m(idx)[0]), "two training passes drop different features"
    m.eval()
    plain.train()  # plain has dropout 0: training mode changes nothing there
    assert torch.equal(m(idx)[0], m(idx)[0])
    assert torch.allclose(m(idx)[0], plain(idx)[0], atol=1e-6)
    x = torch.randint(50, (4, 10))
    y = torch.randint(50, (4, 10))
    m.train()
    L.evaluate(m, x, y, 2)
    assert m.training, "evaluate turns dropout off for itself and restores the mode"


def test_causality():
    m = tiny_model(n_kv_heads=2)
    idx = torch.randint(50, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = torch.randint(50, (2, 5))
    a, _ = m(idx)
    b, _ = m(changed)
    assert torch.equal(a[:, :7], b[:, :7]), "earlier positions saw later tokens"
    assert not torch.allclose(a[:, 7:], b[:, 7:]), "later positions should change"


# ======================================================================= the lesson: decoding

@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # multi-head, grouped-query, multi-query
def test_kv_cache_matches_recomputation(n_kv_heads):
    m = tiny_model(n_heads=4, n_kv_heads=n_kv_heads, dim=32, max_seq_len=16)
    idx = torch.randint(50, (3, 14))
    full, _ = m(idx)
    m.setup_cache(3)
    address = m.layers[0].attention.cache_k.data_ptr()
    with torch.no_grad():
        # the prompt, then one token at a time
        steps = [m(idx[:, :5], positions=torch.arange(5))[0]]
        for p in range(5, 14):
            steps.append(m.decode_step(idx[:, p:p + 1], torch.tensor([p]))[:, None])
    assert m.layers[0].attention.cache_k.data_ptr() == address, "the cache was reallocated"
    cached = torch.cat(steps, dim=1)
    assert torch.allclose(cached, full, atol=1e-5), (cached - full).abs().max()
    prompt = idx[:, :4]
    greedy = m.generate(prompt, 10, temperature=0, use_cache=True)
    recomputed = m.generate(prompt, 10, temperature=0, use_cache=False)
    assert torch.equal(greedy, recomputed), (greedy, recomputed)


def test_cache_prefill_after_start_uses_offset_mask():
    m = tiny_model(n_kv_heads=2, max_seq_len=16)
    idx = torch.randint(50, (2, 10))
    full, _ = m(idx)
    m.setup_cache(2)
    with torch.no_grad():
        a = m(idx[:, :4], positions=torch.arange(4))[0]
        b = m(idx[:, 4:10], positions=torch.arange(4, 10))[0]  # several after a cached prefix
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)


def test_decode_step_keeps_its_shapes_at_every_position():
    m = tiny_model(max_seq_len=12)
    m.setup_cache(2)
    shapes = set()
    for p in range(12):
        logits = m.decode_step(torch.randint(50, (2, 1)), torch.tensor([p]))
        shapes.add((tuple(logits.shape), tuple(m.layers[0].attention.cache_k.shape)))
    assert shapes == {((2, 50), (2, 12, 1, 4))}, shapes  # head_dim 16 / 4


def test_generation_past_the_window_matches_recomputation():
    m = tiny_model(n_kv_heads=1, max_seq_len=8)
    prompt = torch.randint(50, (2, 11))  # longer than the window: only its last 8 tokens are seen
    cached = m.generate(prompt, 30, temperature=0, use_cache=True)
    recomputed = m.generate(prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, 41) and torch.equal(cached[:, :11], prompt)
    assert torch.equal(cached, recomputed)
    # a reference for the documented policy: the window restarts from its most recent half when full
    seq = prompt.clone()
    start = 3
    for _ in range(30):
        if seq.size(1) - start > 8:
            start = seq.size(1) - 4
        nxt = m(seq[:, start:])[0][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def test_decode_step_compiles_once_for_every_position():
    """The static-shape step makes one graph for all positions, past the window too, and the
    same tokens as eager decoding."""
    from torch._dynamo.testing import CompileCounter
    m = tiny_model(n_kv_heads=2, dim=32, max_seq_len=10)
    prompt = torch.randint(50, (1, 3))
    eager = m.generate(prompt, 25, temperature=0)
    counter = CompileCounter()
    m.decode_step = torch.compile(m.decode_step, backend=counter, fullgraph=True)
    try:
        compiled = m.generate(prompt, 25, temperature=0)
        again = m.generate(prompt[:, :2], 25, temperature=0)  # another prompt, another generation
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    assert counter.op_count > 0 and torch.equal(compiled, eager)
    assert again.shape == (1, 27)


def test_compile_decoding_replaces_the_step_and_can_be_undone():
    m = tiny_model()
    L.compile_decoding(m)
    assert m.decode_step is not L.Transformer.decode_step
    del m.decode_step  # the eager step is back
    assert m.decode_step.__func__ is L.Transformer.decode_step


def test_sampling_rules():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)

    def draws(**kw):
        return {L.sample_next(logits, generator=g, **kw).item() for _ in range(300)}

    assert L.sample_next(logits, temperature=0).item() == 0
    assert draws(top_k=1) == {0}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert draws(top_p=0.5) == {0}
    assert draws() == {0, 1, 2, 3}
    # values that round to zero in float32 are greedy, not a crash
    assert draws(temperature=1e-300) == {0}
    assert draws(top_p=1e-300) == {0}
    assert draws(temperature=1e-40, top_p=1e-300, top_k=3) == {0}
    big = torch.tensor([[1e30, 3e30, -1e30]])
    assert L.sample_next(big, temperature=1e-30, generator=g).item() == 1
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match="not finite"):
            L.sample_next(torch.tensor([[0.0, bad]]), generator=g)


# ======================================================================= the lesson: training

def test_initial_loss_is_about_ln_vocab():
    m = tiny_model(vocab_size=130, dim=32)
    idx = torch.randint(130, (8, 16))
    _, loss = m(idx, idx)
    assert abs(loss.item() - math.log(130)) < 0.1, (loss.item(), math.log(130))


def test_overfits_one_batch():
    m = tiny_model(vocab_size=40, dim=32).train()
    x = torch.randint(40, (4, 12))
    y = torch.randint(40, (4, 12))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(300):
        loss = L.train_step(m, opt, x, y, 1e-2)
    assert loss.item() < 0.05, loss


def test_lr_schedule():
    cfg = L.TrainConfig(lr=1.0, warmup=10, steps=110)
    assert L.lr_at(0, cfg) == pytest.approx(0.1)
    assert L.lr_at(9, cfg) == pytest.approx(1.0)
    assert L.lr_at(60, cfg) == pytest.approx(L.MIN_LR_FRACTION + (1 - L.MIN_LR_FRACTION) / 2)
    assert L.lr_at(110, cfg) == pytest.approx(L.MIN_LR_FRACTION)


def test_windows_cover_every_token_once():
    data = torch.arange(23)
    x, y = L.windows(data, 5)
    assert x.shape == y.shape == (5, 5)
    assert sorted(y[y != -100].tolist()) == list(range(1, 23))
    assert torch.equal(x.flatten()[:22] + 1, y.flatten()[:22])


def test_one_name_for_the_constant_the_flag_and_the_field():
    cfg = L.TrainConfig()
    documented = {"steps": L.EPOCHS, "batch_size": L.BATCH_SIZE, "context": L.CONTEXT_WINDOW,
                  "dim": L.DIM, "heads": L.HEADS, "layers": L.LAYERS, "vocab_size": L.VOCAB_SIZE,
                  "log_interval": L.LOG_INTERVAL}
    assert {name: getattr(cfg, name) for name in documented} == documented
    train = L.build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {a.dest for a in train._actions} - {"help", "out", "resume", "overwrite", "device",
                                                "compile", "run"}
    assert flags == {f.name for f in fields(L.TrainConfig)}, "a flag for each field, no other"
    args = vars(train.parse_args(["--batch-size", "7", "--kv-heads", "2"]))
    given = {name: args[name] for name in flags if name in args}
    assert given == {"batch_size": 7, "kv_heads": 2}, "only the flags given, to tell from defaults"
    assert L.TrainConfig(**given) == replace(cfg, batch_size=7, kv_heads=2)
    with pytest.raises(ValueError, match="--batch-size: must be from 1 to 1,048,576, got 0"):
        L.TrainConfig(batch_size=0)  # a checkpoint's settings meet the flags' bounds too


def test_dropout_seeds_differ_by_process_and_step_and_repeat():
    seeds = {L.step_seed(1337, step, rank) for step in range(50) for rank in range(4)}
    assert len(seeds) == 200 and L.step_seed(1337, 3, 1) == L.step_seed(1337, 3, 1)
    assert all(0 <= s < 2**64 for s in seeds)


# ======================================================================= the lesson: tokenizer

@needs_input
def test_tokenizer_round_trips_all_of_input_and_is_reproducible():
    text = INPUT.read_text(encoding="utf-8")
    train_text = L.split_text(text)["train"]
    tok = L.Tokenizer.train(train_text, 130)
    assert tok.vocab_size == 130 and tok.bos_id == -1 and tok.special == {}
    ids = tok.encode(text)
    assert tok.decode(ids) == text, "decode(encode(text)) differs"
    assert text.count("\n") == 40000 and tok.decode(ids).count("\n") == 40000
    assert tok.decode(tok.encode("a  b\n\n   c")) == "a  b\n\n   c"
    assert int(tok.n_chars[torch.tensor(ids)].sum()) == len(text)
    again = L.Tokenizer.train(train_text, 130)
    assert again.model_proto == tok.model_proto, "same text, different tokenizer"


def test_tokenizer_round_trips_the_characters_sentencepiece_cannot_keep():
    """SentencePiece writes a space as "▁" (U+2581), its trainer drops "\r", NUL and "\x1f", and
    it reads "<unk>" as its own: a text of them must come back as itself."""
    lines = ["To be ▁ or not ▁▁ to be,\r\n", "▁that is\x00 the <unk> question:\x1f whether\n"]
    text = INPUT.read_text(encoding="utf-8")[:20_000] if INPUT.exists() else ""
    text += "".join(lines) * 60
    tok = L.Tokenizer.train(text, 130)
    assert set(tok.special) == {"\u2581", "\r", "\x00", "\x1f"}
    for sample in (text, "▁", "▁▁ ▁", " ▁\r\n▁ ", "to▁be", "a\x00\x00b", "<unk>", "\x1f\r"):
        assert tok.decode(tok.encode(sample)) == sample, repr(sample)
    assert tok.encode("▁") == [tok.special["\u2581"]] and tok.sp.unk_id() not in tok.encode(text)
    assert int(tok.n_chars[torch.tensor(tok.encode(text))].sum()) == len(text)
    again = L.Tokenizer(tok.model_proto)  # the pieces survive the checkpoint's bytes
    assert again.decode(again.encode("a▁b\r\n")) == "a▁b\r\n"
    plain = L.Tokenizer.train("To be, or not to be, that is the question:\n" * 100, 40)
    assert plain.special == {} and plain.decode(plain.encode("to be")) == "to be"


@needs_input
def test_tokenizer_keeps_lines_longer_than_sentencepieces_limit():
    """SentencePiece skips lines over 4192 bytes by default; a text on one line must still train."""
    one_line = INPUT.read_text(encoding="utf-8")[:200_000].replace("\n", " ")
    tok = L.Tokenizer.train(one_line, 130)
    assert tok.vocab_size == 130 and tok.decode(tok.encode(one_line[:5000])) == one_line[:5000]


def test_tokenizer_refuses_impossible_vocab_size_and_says_why():
    text = "the quick brown fox jumps over the lazy dog\n" * 50
    # 26 letters and the space, plus the unknown piece and the newline: 29
    with pytest.raises(ValueError, match="--vocab-size 20 does not fit.*smaller than required"):
        L.Tokenizer.train(text, 20)
    assert L.Tokenizer.train(text, 29).vocab_size == 29
    with pytest.raises(ValueError, match="--vocab-size 5000 does not fit.*too high"):
        L.Tokenizer.train(text, 5000)


# ======================================================================= checkpoints and files

def small_tokenizer(vocab_size=60):
    text = "To be, or not to be, that is the question:\n" * 200 + "xyzqjkvbwg.,;:!?'-\n"
    return L.Tokenizer.train(text, vocab_size)


def test_checkpoint_round_trip(trained):
    assert sorted(os.listdir(trained)) == ["ckpt.pt", "log.csv"], "only the run's two files"
    raw = torch.load(trained / "ckpt.pt", weights_only=True)
    assert raw["step"] == 30 and raw["model_args"]["n_kv_heads"] == 2 and len(raw["log"]) == 3
    assert raw["config"].keys() == {f.name for f in fields(L.TrainConfig)}, "every setting saved"
    model, tok = L.load_model(trained / "ckpt.pt", CPU)
    again = L.Transformer(L.ModelArgs(**raw["model_args"])).eval()
    again.load_state_dict(raw["model"])
    idx = torch.randint(tok.vocab_size, (2, 8))
    assert torch.equal(model(idx)[0], again(idx)[0]) and tok.model_proto == raw["tokenizer"]


def edited(tmp_path, trained, change):
    """A copy of the trained run whose checkpoint has change(ckpt) applied."""
    out = tmp_path / f"edited-{len(os.listdir(tmp_path))}"
    shutil.copytree(trained, out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, out / "ckpt.pt")
    return out


def args_edit(**changes):
    return lambda ckpt: ckpt["model_args"].update(changes)


EDITS = [
    ("extra model_args key", args_edit(colour="blue"), "unexpected keyword argument 'colour'"),
    ("a string for dim", args_edit(dim="32"), "dim must be a whole number"),
    ("a float for max_seq_len", args_edit(max_seq_len=8.0), "max_seq_len must be a whole number"),
    ("model_args wider than the weights", args_edit(dim=64, n_heads=8), "size mismatch"),
    ("one layer fewer than the weights", args_edit(n_layers=1), "Unexpected key(s)"),
    ("another vocabulary", args_edit(vocab_size=131), "tokenizer has 130 pieces"),
    ("damaged tokenizer", lambda c: c.update(tokenizer=c["tokenizer"][:50]), "RuntimeError"),
    ("a missing weight", lambda c: c["model"].pop("output.weight"), "Missing key(s)"),
    ("weights not a table", lambda c: c.update(model=[1, 2]), "AttributeError"),
    ("an edited size", args_edit(multiple_of=0), "multiple_of must be a whole number"),
    ("a string for norm_eps", args_edit(norm_eps="1e-5"), "TypeError"),
    ("a zero rope_theta", args_edit(rope_theta=0.0), "rope_theta must be positive"),
    ("NaN weights", lambda c: c["model"]["layers.0.attention.wq.weight"].fill_(float("nan")),
     "weights are not all finite"),
]


@pytest.mark.parametrize("what, change, words", EDITS, ids=[e[0] for e in EDITS])
def test_damaged_or_edited_checkpoints_are_refused_at_load(tmp_path, trained, capsys, what,
                                                           change, words):
    out = edited(tmp_path, trained, change)
    with pytest.raises(ValueError, match="damaged or was edited") as refused:
        L.load_model(out / "ckpt.pt", CPU)
    assert words in str(refused.value), refused.value
    for command in ("sample", "eval"):
        assert L.main([command, "--ckpt", out / "ckpt.pt"]) == 1
        one_line_error(capsys, "damaged or was edited")


def test_a_file_that_is_no_checkpoint_of_ours_says_so(tmp_path, trained, capsys):
    for change in (lambda c: c.clear(), lambda c: c.pop("model_args")):
        out = edited(tmp_path, trained, change)
        assert L.main(["sample", "--ckpt", out / "ckpt.pt"]) == 1
        one_line_error(capsys, "is not a checkpoint of llama.py (no model_args)")


RESUME_EDITS = [
    ("config without lr", lambda c: c["config"].pop("lr"), "not those of a TrainConfig"),
    ("config with a string", lambda c: c["config"].update(batch_size="many"), "--batch-size"),
    ("config with a float", lambda c: c["config"].update(layers=2.0), "--layers"),
    ("config with an unknown setting", lambda c: c["config"].update(colour=1), "'colour'"),
    ("config that disagrees with the weights", lambda c: c["config"].update(dim=64), "size mismatch"),
    ("no optimizer", lambda c: c.pop("optimizer"), "KeyError: 'optimizer'"),
    ("an optimizer of another model", lambda c: c["optimizer"]["param_groups"].pop(), "ValueError"),
    ("a step that is not a number", lambda c: c.update(step="abc"), "ValueError"),
    ("log of strings", lambda c: c.update(log=[["a"] * 4]), "could not convert"),
    ("log rows of another shape", lambda c: c.update(log=[[1.0, 2.0]]), "out of shape"),
    ("a negative step", lambda c: c.update(step=-5), "its step -5"),
    ("pending losses of strings", lambda c: c.update(losses=["x"]), "could not convert"),
    ("short batch generator state", lambda c: c.update(batches=c["batches"][:100]), "RuntimeError"),
    ("no record of the text", lambda c: c.pop("data_sha256"), "KeyError: 'data_sha256'"),
]


@pytest.mark.parametrize("what, change, words", RESUME_EDITS, ids=[e[0] for e in RESUME_EDITS])
def test_damaged_resume_state_is_refused_before_training(tmp_path, trained, small_text, capsys,
                                                         what, change, words):
    out = edited(tmp_path, trained, change)
    before = (out / "ckpt.pt").read_bytes()
    assert L.main(["train", "--resume", "--steps", "40", "--out", out]) == 1
    err = one_line_error(capsys, "damaged or was edited")
    assert words in err, err
    assert (out / "ckpt.pt").read_bytes() == before


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unsafe_and_foreign_files_are_refused_for_what_they_are(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model": Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="pickled Python objects") as refused:
        L.load_file(tmp_path / "evil.pt")
    assert not marker.exists(), "pickled code ran"
    assert "weights_only" not in str(refused.value), "no advice to turn the protection off"
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello")
    good = tmp_path / "good.pt"
    torch.save({"a": torch.randn(1000)}, good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:2000])
    for name in ("empty.pt", "text.pt", "cut.pt"):
        with pytest.raises(ValueError, match="is not a PyTorch zip archive") as refused:
            L.load_file(tmp_path / name)
        assert "pickled" not in str(refused.value)
    torch.save(torch.randn(3), tmp_path / "tensor.pt")
    # one byte changed inside the archive: the pickle's, or a weight's; the zip's checksums tell
    raw = bytearray(good.read_bytes())
    data_at = raw.index(b"data.pkl") + 40
    raw[data_at] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(raw)
    weights_at = raw.rindex(b"data/0") + 60
    raw = bytearray(good.read_bytes())
    raw[weights_at] ^= 0x01
    (tmp_path / "flipped-weight.pt").write_bytes(raw)
    for name in ("flipped.pt", "flipped-weight.pt"):
        with pytest.raises(ValueError, match="damaged PyTorch file") as refused:
            L.load_file(tmp_path / name)
        assert "pickled" not in str(refused.value), refused.value
    for name, words in [("tensor.pt", "holds a Tensor, not a table"), ("missing.pt", "No such file"),
                        (".", "Is a directory"), ("evil.pt", "pickled Python objects")]:
        assert L.main(["eval", "--ckpt", tmp_path / name]) == 1
        one_line_error(capsys, words)
    assert not marker.exists()


def test_atomic_write_keeps_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    (tmp_path / "notes.tmp").write_bytes(b"the user's own")

    def crash(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        L.atomic_write(path, crash)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "notes.tmp"], os.listdir(tmp_path)
    old = os.umask(0o027)
    try:
        L.atomic_write(tmp_path / "a.txt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640, "files follow the umask"


def test_a_full_disk_at_save_keeps_the_previous_checkpoint_and_log(run_copy, small_text):
    """A real file size limit (ulimit -f, in 1024-byte blocks) makes the save fail half-way."""
    before = (run_copy / "ckpt.pt").read_bytes()
    log_before = (run_copy / "log.csv").read_bytes()
    command = " ".join(llama_command("train", "--resume", "--steps", "35", "--out", run_copy))
    done = subprocess.run(["bash", "-c", f"ulimit -f 200; exec {command}"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: could not write"), done.stderr
    assert "File too large" in done.stderr and "is as it was" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert (run_copy / "ckpt.pt").read_bytes() == before
    assert (run_copy / "log.csv").read_bytes() == log_before
    assert sorted(os.listdir(run_copy)) == ["ckpt.pt", "log.csv"], os.listdir(run_copy)


# ======================================================================= download and data

class Handler(http.server.BaseHTTPRequestHandler):
    body = b"To be, or not to be\n" * 100

    def do_GET(self):
        if self.path == "/missing":
            self.send_error(404)
            return
        if self.path == "/slow":
            time.sleep(2)
        if self.path == "/endless":  # no length given, and far more than expected
            self.send_response(200)
            self.end_headers()
            for _ in range(200):
                self.wfile.write(self.body)
            self.close_connection = True
            return
        self.send_response(200)
        promised = len(self.body) + (500 if self.path == "/short" else 0)
        self.send_header("Content-Length", str(promised))
        self.end_headers()
        self.wfile.write(self.body)
        if self.path == "/short":
            self.close_connection = True

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that gave up on an endless body: expected here


@pytest.fixture(scope="module")
def server():
    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_download_success(tmp_path, server):
    sha = hashlib.sha256(Handler.body).hexdigest()
    L.download(f"{server}/ok", tmp_path / "input.txt", sha, len(Handler.body))
    assert (tmp_path / "input.txt").read_bytes() == Handler.body
    assert os.listdir(tmp_path) == ["input.txt"]


FAILURES = [("ok", "not the published file"), ("missing", "404"), ("short", "IncompleteRead"),
            ("slow", "timed out"), ("refused", "Connection refused"),
            ("endless", "2,001 bytes that are not"), ("big", "not the published file")]


@pytest.mark.parametrize("case, words", FAILURES)
def test_download_failures_leave_nothing(tmp_path, server, case, words):
    url = f"http://127.0.0.1:{free_port()}/ok" if case == "refused" else f"{server}/{case}"
    size = 1000 if case == "big" else 2000
    sha = hashlib.sha256(Handler.body).hexdigest() if case != "ok" else "0" * 64
    started = time.monotonic()
    with pytest.raises(OSError, match=words) as e:
        L.download(url, tmp_path / "input.txt", sha, size, timeout=0.5)
    assert time.monotonic() - started < 5
    assert "curl -L -o" in str(e.value), "the message should say how to fetch the file by hand"
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


@needs_input
def test_an_existing_input_txt_is_checked_and_never_deleted(tmp_path, monkeypatch):
    assert L.get_text() == INPUT.read_text(encoding="utf-8")  # the real one passes, untouched
    half = tmp_path / "input.txt"
    half.write_bytes(INPUT.read_bytes()[:500_000])
    monkeypatch.setattr(L, "DATA_PATH", half)
    with pytest.raises(ValueError, match="not Tiny Shakespeare as published: delete it"):
        L.get_text()
    assert half.stat().st_size == 500_000, "a damaged copy is refused, never deleted"


def test_bad_data_files_say_what_they_are(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ten.txt").write_text("0123456789")
    (tmp_path / "folder").mkdir()
    for name, words in [("latin1.txt", "is not UTF-8 text (byte 3)"), ("empty.txt", "is empty"),
                        ("missing.txt", "No such file or directory"),
                        ("folder", "Is a directory"),
                        ("ten.txt", "too short: its train split has 7 characters")]:
        assert L.main(["train", "--data", tmp_path / name, "--out", tmp_path / "o"]) == 1
        one_line_error(capsys, words)
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_a_split_too_short_in_tokens_is_named():
    tok = L.Tokenizer.train("abcdefgh ijkl\n" * 30, 20)
    with pytest.raises(ValueError, match=r"too short: its (train|val|test) split has \d+ tokens"):
        L.encode_splits(L.split_text("abcdefgh ijkl\n" * 6), tok, 12)


# ======================================================================= end to end through main()

def test_train_eval_sample_end_to_end(trained, small_text, capsys):
    rows = (trained / "log.csv").read_text().splitlines()
    assert rows[0] == "step,train_loss,val_loss,lr" and len(rows) == 4, rows
    first_val = float(rows[1].split(",")[2])
    last_val = float(rows[-1].split(",")[2])
    assert last_val < first_val < math.log(130), (first_val, last_val)
    assert L.main(["eval", "--ckpt", trained / "ckpt.pt", "--data", small_text]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "87.7" in table and "test" in table
    args = ["sample", "--ckpt", trained / "ckpt.pt", "--max-new-tokens", "40", "--prompt", "KING:"]
    assert L.main(args + ["--seed", "1"]) == 0
    one = capsys.readouterr().out
    assert L.main(args + ["--seed", "1"]) == 0
    assert capsys.readouterr().out == one and one.startswith("KING:"), "same seed, same sample"
    assert L.main(args + ["--seed", "2"]) == 0
    assert capsys.readouterr().out != one


def test_same_seed_same_losses(trained, small_text, tmp_path):
    assert L.main(["train", *TINY, "--data", small_text, "--out", tmp_path]) == 0
    assert (tmp_path / "log.csv").read_text() == (trained / "log.csv").read_text()
    first = torch.load(trained / "ckpt.pt", weights_only=True)["model"]
    second = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)


@needs_input
def test_documented_settings_meet_the_quality_bar(tmp_path):
    """The README's headline: the documented settings, 1000 steps, every token evaluated."""
    model, tok, data = L.train(L.TrainConfig(), out=tmp_path)
    results = L.report(model, tok, data, L.CONTEXT_WINDOW, 16 * L.BATCH_SIZE)
    val = results["val"]
    test = results["test"]
    assert val["perplexity"] <= 15.3 and val["bpc"] <= 2.66 and val["accuracy"] >= 0.29, val
    assert test["perplexity"] <= 16.4, test


def test_greedy_sample_is_deterministic_and_matches_model(trained):
    model, tok = L.load_model(trained / "ckpt.pt", CPU)
    ids = tok.encode("ROMEO:")
    n = model.args.max_seq_len - len(ids)  # stay inside the window: plain greedy decoding
    text = L.sample(model, tok, "ROMEO:", max_new_tokens=n, temperature=0)[0]
    for _ in range(n):  # greedy by hand, recomputing everything at each step
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert text == tok.decode(ids) and n > 0


def test_sample_refuses_bad_requests(trained, capsys):
    base = ["sample", "--ckpt", trained / "ckpt.pt", "--max-new-tokens", "5"]
    for extra, words in [(["--temperature", "-1"], "--temperature: must be at least 0"),
                         (["--temperature", "nan"], "--temperature"),
                         (["--temperature", "inf"], "--temperature"),
                         (["--top-p", "1.5"], "--top-p"), (["--top-k", "0"], "--top-k"),
                         (["--max-new-tokens", "-3"], "--max-new-tokens"),
                         (["--max-new-tokens", "10000000000000"], "from 0 to 1,000,000"),
                         (["--prompt", ""], "empty"), (["--prompt", "hello ~"], "never saw"),
                         (["--prompt", "KING▁"], "never saw"),
                         (["--prompt", "ROMEO\udcff"], "can't encode character '\\udcff'"),
                         (["--num-samples", "0"], "at least 1"), (["--seed", str(2**70)], "--seed"),
                         (["--device", "nonsense"], "not one of"), (["--device", "cuda:x"], "not one of"),
                         (["--device", "cuda:"], "not one of"), (["--device", "cuda:7"], "no such"),
                         (["--context", "0"], "--context"), (["--dtype", "int8"], "invalid choice")]:
        assert L.main(base + extra) == 1, extra
        one_line_error(capsys, words)
    assert L.main(base + ["--max-new-tokens", "0", "--prompt", "Hi"]) == 0
    assert capsys.readouterr().out.strip() == "Hi"
    for tiny in (["--temperature", "1e-300"], ["--top-p", "1e-300"]):
        assert L.main(base + tiny + ["--prompt", "Hi"]) == 0, "greedy, no crash"
        assert capsys.readouterr().out.startswith("Hi")
    long_prompt = "To be, or not to be, that is the question. " * 3
    assert L.main(base + ["--prompt", long_prompt]) == 0
    assert capsys.readouterr().out.startswith(long_prompt)


def test_non_finite_outputs_are_an_error_not_a_table(tmp_path, trained, small_text, capsys):
    out = edited(tmp_path, trained, lambda c: c["model"]["output.weight"].fill_(float("inf")))
    for args in (["eval", "--data", small_text], ["sample"]):
        assert L.main([*args, "--ckpt", out / "ckpt.pt"]) == 1
        one_line_error(capsys, "weights are not all finite numbers")
    # weights that are finite but overflow: evaluation and sampling refuse what comes out
    model = tiny_model()
    with torch.no_grad():
        model.output.weight.fill_(3e38)
    x = torch.randint(50, (2, 8))
    with pytest.raises(FloatingPointError, match="loss is nan"):
        L.evaluate(model, x, x, 2)
    with pytest.raises(FloatingPointError, match="not finite"):
        model.generate(x[:1, :2], 3, temperature=0)


HAS_GPU = torch.cuda.is_available() or torch.backends.mps.is_available()


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_a_device_that_is_not_there_is_one_line(trained, capsys):
    for device in ("cuda", "mps", "cuda:1"):
        assert L.main(["sample", "--ckpt", trained / "ckpt.pt", "--device", device]) == 1
        one_line_error(capsys, "PyTorch sees no such device")
        assert L.main(["train", "--device", device, "--steps", "1"]) == 1
        one_line_error(capsys, "PyTorch sees no such device")


def test_user_errors_are_one_line(tmp_path, small_text, capsys):
    (tmp_path / "file").write_text("x")
    for args, words in [(["eval", "--ckpt", tmp_path / "none.pt"], "No such file"),
                        (["sample", "--device", "cuda:01"], "not one of"),
                        (["sample", "--device", "cuda:99999999999999999999"], "not one of"),
                        (["train", "--dim", "30", "--heads", "4"], "not divisible by n_heads"),
                        (["train", "--heads", "8", "--kv-heads", "3"], "divisible by n_kv_heads"),
                        (["train", "--dim", "24", "--heads", "8"], "odd"),
                        (["train", "--steps", "0"], "--steps: must be at least 1, got 0"),
                        (["train", "--steps", "abc"], "invalid int value: 'abc'"),
                        (["train", "--lr", "x"], "invalid float value"),
                        (["train", "--batch-size", "-1"], "--batch-size"),
                        (["train", "--lr", "inf"], "--lr: must be from 0 to 1e+30, got inf"),
                        (["train", "--lr", "3e38"], "--lr: must be from 0 to 1e+30"),
                        (["train", "--dim", str(2**62)], "--dim: must be from 1 to 1,048,576"),
                        (["train", "--context", "99999999999999999999"], "--context: must be"),
                        (["train", "--heads", "4", "--kv-heads", "3"], "not divisible"),
                        (["train", "--weight-decay", "-1"], "--weight-decay"),
                        (["train", "--warmup", "-5"], "--warmup: must be at least 0"),
                        (["train", "--dropout", "2"], "--dropout: must be from 0 to 1"),
                        (["train", "--seed", str(2**64)], "--seed"),
                        (["train", "--resume", "--overwrite"], "--overwrite replaces it: give one"),
                        (["train", "--resume", "--out", tmp_path / "none"], "No such file"),
                        (["train", "--vocab-size", "20", "--data", small_text, "--out",
                          tmp_path / "v"], "--vocab-size 20 does not fit this text"),
                        (["train", "--out", tmp_path / "file"], "File exists"),
                        (["train", "--out", tmp_path / "file" / "sub"], "Not a directory"),
                        (["sample", "--stepz", "3"], "unrecognized arguments"),
                        (["eval", "--context", str(2**62)], "--context: must be from 1 to"),
                        (["eval", "--compile"], "unrecognized arguments: --compile"),
                        ([], "required: command"), (["fly"], "invalid choice: 'fly'")]:
        assert L.main(args) == 1, args
        one_line_error(capsys, words)


def test_out_of_memory_is_one_line(small_text, tmp_path, capsys):
    too_wide = ["--dim", "1048576", "--heads", "2", "--layers", "1", "--data", small_text, "--out",
                tmp_path]
    assert L.main(["train", *too_wide, "--steps", "1"]) == 1
    one_line_error(capsys, "out of memory")


def test_help_lists_commands_and_returns(capsys):
    assert L.main(["--help"]) == 0, "no SystemExit, so that a notebook cell just prints it"
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "sample", "eval")), out
    assert L.main(["train", "--help"]) == 0
    assert "EPOCHS" in capsys.readouterr().out


def test_a_finished_run_is_never_replaced_silently(run_copy, small_text, capsys):
    before = (run_copy / "ckpt.pt").read_bytes()
    log_before = (run_copy / "log.csv").read_bytes()
    assert L.main(["train", *TINY, "--data", small_text, "--out", run_copy]) == 1
    one_line_error(capsys, "holds a run: continue it with --resume, replace it with --overwrite")
    # --overwrite replaces it, but only with a checkpoint: a run that fails leaves both files alone
    diverging = ["train", *TINY, "--lr", "1e30", "--overwrite", "--data", small_text]
    assert L.main(diverging + ["--out", run_copy]) == 1
    one_line_error(capsys, "the training loss became nan by step 10: try a lower --lr")
    assert (run_copy / "ckpt.pt").read_bytes() == before
    assert (run_copy / "log.csv").read_bytes() == log_before


def test_a_fresh_run_refuses_a_folder_with_a_log_or_with_folders_for_its_files(tmp_path,
                                                                                small_text, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "log.csv").write_text("the user's own log\n")
    assert L.main(["train", *TINY, "--data", small_text, "--out", tmp_path / "mine"]) == 1
    one_line_error(capsys, "log.csv holds a run: continue it with --resume")
    assert (tmp_path / "mine" / "log.csv").read_text() == "the user's own log\n"
    for name in ("log.csv", "ckpt.pt"):  # where a save would fail after training: said at once
        folder = tmp_path / f"with-{name}"
        (folder / name).mkdir(parents=True)
        started = time.monotonic()
        assert L.main(["train", *TINY, "--data", small_text, "--out", folder, "--overwrite"]) == 1
        one_line_error(capsys, f"{name} is not a file, where the run saves one")
        assert time.monotonic() - started < 5, "refused before training"
    assert L.main(["train", "--data", tmp_path / "missing.txt", "--out", tmp_path / "new"]) == 1
    one_line_error(capsys, "No such file")
    assert not (tmp_path / "new").exists(), "a refused run makes no folder"


def test_a_batch_that_does_not_split_over_the_processes_is_refused(small_text, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the refusal comes before its group
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert L.main(["train", *TINY, "--batch-size", "7", "--data", small_text, "--out",
                   tmp_path]) == 1
    one_line_error(capsys, "--batch-size 7 does not split over 2 processes")


def test_nothing_that_is_not_finite_is_saved():
    model = tiny_model()
    losses = [torch.tensor(2.0), torch.tensor(1.0)]
    assert L.mean_loss(losses, 2, model) == 1.5
    with torch.no_grad():
        model.norm.weight[0] = float("inf")  # the losses so far finite, the weights not
    with pytest.raises(FloatingPointError, match="the last checkpoint was left as it was"):
        L.mean_loss(losses, 2, model)


def test_a_text_keeps_its_carriage_returns(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"To be,\r\nor not\r\n" * 20)
    assert L.get_text(tmp_path / "crlf.txt") == "To be,\r\nor not\r\n" * 20


def test_resume_extends_a_run_and_refuses_what_cannot_change(run_copy, small_text, tmp_path,
                                                               capsys):
    resume = ["train", "--resume", "--out", run_copy]
    assert L.main(resume) == 1
    one_line_error(capsys, "has trained 30 steps: give --steps N")
    for extra, words in [(["--dim", "64"], "--dim cannot change when resuming"),
                         (["--lr", "0.01"], "--lr cannot change"),
                         (["--steps", "20"], "has trained 30 steps")]:
        assert L.main(resume + extra) == 1
        one_line_error(capsys, words)
    other = tmp_path / "other.txt"
    other.write_text(small_text.read_text()[:-1] + "!")
    assert L.main(resume + ["--steps", "40", "--data", other]) == 1
    one_line_error(capsys, "is not the text")
    assert L.main(resume + ["--steps", "40", "--dim", "32", "--save-every", "5"]) == 0
    ckpt = torch.load(run_copy / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 40 and ckpt["config"]["steps"] == 40
    assert ckpt["config"]["save_every"] == 5, "--save-every is a setting of the run too"
    rows = (run_copy / "log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [10, 20, 30, 40], rows
    # the schedule continued over the new total: the last step's learning rate is the new schedule's
    extended = L.TrainConfig(lr=3e-3, warmup=5, steps=40)
    assert float(rows[-1].split(",")[3]) == pytest.approx(L.lr_at(39, extended), rel=1e-4)
    # and --resume keeps --save-every: it saves at 45 on its way to 48
    assert L.main(resume + ["--steps", "48"]) == 0
    assert torch.load(run_copy / "ckpt.pt", weights_only=True)["config"]["save_every"] == 5


def test_interrupt_then_resume_matches_uninterrupted_with_dropout(tmp_path, small_text):
    """A real SIGINT at step 20-ish of 200, --dropout on: the resumed run ends with the weights,
    losses and learning rates of the uninterrupted one."""
    args = llama_command("train", *TINY, "--steps", "200", "--dropout", "0.1", "--data", small_text)
    whole = subprocess.run(args + ["--out", tmp_path / "a"], env=ENV, capture_output=True,
                           text=True)  # in a process of its own, with one thread, as the other
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen(args + ["--out", tmp_path / "b"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_line(proc, "step    20/200")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "train --resume --out" in err, err[-500:]
    stopped_at = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"]
    assert 20 <= stopped_at < 200, stopped_at
    resumed = subprocess.run(llama_command("train", "--resume", "--out", tmp_path / "b"), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert b["step"] == 200
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs, resumed at {stopped_at}"
    # the log too: the losses since the last log line were saved with the checkpoint
    assert (tmp_path / "a" / "log.csv").read_text() == (tmp_path / "b" / "log.csv").read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_a_closed_terminal_save_the_run(tmp_path, small_text, signum):
    proc = subprocess.Popen(llama_command("train", *TINY, "--steps", "100000", "--data",
                                          small_text, "--out", tmp_path), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(proc, "step    20/")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    step = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert step >= 20 and f"stopped after step {step}" in err, err


def test_a_failing_stdout_stops_the_run_and_saves_it(tmp_path, small_text):
    """stdout is a pipe whose reader leaves after three lines: the run saves what it trained."""
    train = " ".join(llama_command("train", *TINY, "--steps", "100000", "--data", small_text,
                                   "--out", tmp_path))
    done = subprocess.run(["bash", "-c", f"{train} | head -n 3"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.count("\n") == 3, done.stdout
    step = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert 10 <= step < 100000 and "Traceback" not in done.stderr, (step, done.stderr)
    assert f"stopped after step {step}; saved" in done.stderr, "how to continue, where it is seen"


def test_a_kill_leaves_a_checkpoint_that_loads_and_the_users_files(tmp_path, small_text):
    """SIGKILL gives no chance to save: what is on disk comes from --save-every alone."""
    (tmp_path / "notes.tmp").write_text("the user's own")
    proc = subprocess.Popen(llama_command("train", *TINY, "--steps", "100000", "--save-every", "10",
                                          "--data", small_text, "--out", tmp_path),
                            stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for_line(proc, "step    30/")
    finally:
        proc.kill()
        proc.wait()
    step = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]  # whole, even mid-save
    assert step >= 20 and step % 10 == 0, step
    assert L.main(["train", "--resume", "--steps", str(step + 1), "--out", tmp_path]) == 0
    assert (tmp_path / "notes.tmp").read_text() == "the user's own", "files not ours stay"


def test_ctrl_c_outside_the_training_loop_is_one_line(trained, capsys):
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    assert L.main(["sample", "--ckpt", trained / "ckpt.pt", "--max-new-tokens", "1000000"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_closed_pipe_ends_sample_quietly(trained):
    sample = llama_command("sample", "--ckpt", trained / "ckpt.pt", "--max-new-tokens", "3000")
    done = subprocess.run(["bash", "-c", f"{' '.join(sample)} | head -c 50"], env=ENV,
                          capture_output=True, timeout=120)
    assert len(done.stdout) == 50 and done.stderr == b"", done.stderr


def test_whole_file_pasted_into_a_notebook_kernel(tmp_path, small_text):
    """Colab: the file pasted into one cell, then main([...]) and %run in the next cells."""
    why = "the notebook test needs nbformat, nbclient and ipykernel (.ci/run installs them)"
    nbformat = pytest.importorskip("nbformat", reason=why)
    nbclient = pytest.importorskip("nbclient", reason=why)
    pytest.importorskip("ipykernel", reason=why)
    train = ["train", *TINY, "--steps", "10", "--data", str(small_text), "--out", "run"]
    sample = ["sample", "--ckpt", "run/ckpt.pt", "--prompt", "KING:", "--max-new-tokens", "9"]
    cells = [(HERE / "llama.py").read_text(encoding="utf-8"),  # runs nothing: there is no __file__
             f"print('train rc', main({train!r}))",
             f"print('sample rc', main({sample!r}))",
             "print('mistake rc', main(['train', '--steps', 'many']))",
             f"%run {HERE / 'llama.py'} sample --ckpt run/ckpt.pt --prompt QUEEN: "
             "--max-new-tokens 9"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    def text(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    pasted, trained, sampled, mistake, ran = [text(cell) for cell in nb.cells]
    assert pasted == "", "pasting the file must not run anything"
    assert "step    10/10" in trained and "train rc 0" in trained, trained
    assert sampled.startswith("KING:") and "sample rc 0" in sampled, sampled
    assert "mistake rc 1" in mistake and "invalid int value" in mistake, mistake
    assert ran.startswith("QUEEN:"), ran
    assert (tmp_path / "run" / "ckpt.pt").exists()


# ======================================================================= several processes

def torchrun(nproc, *args, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(HERE / "llama.py"), *[str(a) for a in args]]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def test_two_processes_train_what_one_process_trains(trained, small_text, tmp_path, capsys):
    proc = torchrun(2, "train", *TINY, "--data", small_text, "--out", tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "cpu x 2" in out and out.count("saved") == 1, out
    single_run = torch.load(trained / "ckpt.pt", weights_only=True)
    double_run = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    # the log's rows at full precision (log.csv rounds them): step, train loss, validation loss
    for a, b in zip(single_run["log"], double_run["log"], strict=True):
        assert a[0] == b[0], (a, b)
        assert abs(a[1] - b[1]) < 1e-5, ("train loss", a, b)
        assert abs(a[2] - b[2]) < 1e-5, ("validation loss", a, b)
    for name, weight in single_run["model"].items():
        assert torch.allclose(weight, double_run["model"][name], atol=1e-5), name
    capsys.readouterr()
    assert L.main(["sample", "--ckpt", tmp_path / "ckpt.pt", "--prompt", "KING:"]) == 0
    assert capsys.readouterr().out.startswith("KING:")


def test_a_refusal_under_torchrun_ends_every_process(trained, small_text):
    """Every process checks the folder and refuses alike: none is left waiting for another."""
    proc = torchrun(2, "train", *TINY, "--data", small_text, "--out", trained)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and err.count("error: ") == 2, err[-2000:]
    assert "holds a run" in err and 'llama.py", line' not in err, err[-2000:]


def test_a_failing_stdout_under_torchrun_stops_every_process(small_text, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE / "llama.py"), "train", *TINY, "--steps", "100000", "--data",
               str(small_text), "--out", str(tmp_path)]
    done = subprocess.run(["bash", "-c", " ".join(command) + " | head -n 2"], env=ENV,
                          capture_output=True, text=True, timeout=180)
    step = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert 10 <= step < 100000 and done.stderr.count("stopped after step") == 1, done.stderr[-2000:]
    assert 'llama.py", line' not in done.stderr, done.stderr[-2000:]


def test_ctrl_c_stops_every_process_and_rank_0_saves_once(small_text, tmp_path):
    proc = torchrun(2, "train", *TINY, "--steps", "100000", "--data", small_text, "--out", tmp_path,
                    start_new_session=True)
    wait_for_line(proc, "step    20/")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    out, err = proc.communicate(timeout=120)
    assert err.count("stopped after step") == 1, err[-1500:]
    step = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert f"stopped after step {step}" in err and step >= 20
    resumed = torchrun(2, "train", "--resume", "--steps", str(step + 10), "--out", tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"from step {step}" in out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == step + 10


# ======================================================================= tools/bench.py

def test_bench_runs_and_counts_model_flops_by_hand(capsys):
    assert L.main(["--dim", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--context",
                   "8", "--batch-size", "2", "--new-tokens", "20", "--bench-steps", "2",
                   "--bench-warmup", "1"], bench.build_parser()) == 0
    out = capsys.readouterr().out
    assert "same tokens: True" in out and "tokens/s eager" in out and "peak memory" in out, out
    # by hand: 6 per weight of wq 16x16, wk and wv 16x8, wo 16x16, w1 w2 w3 16x256 (LLaMA's rule
    # rounds 2/3 * 4 * 16 up to a multiple of 256) and output 130x16; attention 12 * 1 * 8 * 16
    expected = 6 * (256 + 128 + 128 + 256 + 3 * 16 * 256 + 130 * 16) + 12 * 1 * 8 * 16
    args = L.ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=130)
    assert bench.model_flops_per_token(args, 8) == expected
    line = next(line for line in out.splitlines() if line.startswith("train"))
    assert line.split()[-1] == "TFLOP/s" and float(line.split()[-2]) > 0, line
    assert L.main(["--bench-steps", "0"], bench.build_parser()) == 1
    one_line_error(capsys, "--bench-steps: must be at least 1")


def test_every_tool_runs_from_the_project_root_with_its_help():
    for tool in ("bench", "meta", "plot", "ablate"):
        done = subprocess.run(llama_command("--help", script=f"tools/{tool}.py"), cwd=HERE,
                              capture_output=True, text=True, env=ENV, timeout=60)
        assert done.returncode == 0 and "usage: tools/" in done.stdout, (tool, done.stderr)


# ======================================================================= tools/meta.py

def test_export_then_import_gives_the_same_logits_and_samples(trained, small_text, tmp_path,
                                                               capsys):
    folder = tmp_path / "meta"
    assert L.main(["export", "--ckpt", trained / "ckpt.pt", "--out", folder], meta.build_parser()) == 0
    assert sorted(os.listdir(folder)) == sorted(meta.FILES)
    params = json.loads((folder / "params.json").read_text())
    assert list(params) == list(meta.PARAMS) and params["n_kv_heads"] == 2
    assert params["ffn_dim_multiplier"] is None, "Meta's way of saying none"
    ours, tok = L.load_model(trained / "ckpt.pt", CPU)
    assert torch.load(folder / "consolidated.00.pth").keys() == ours.state_dict().keys()
    imported = tmp_path / "imported"
    assert L.main(["import", folder, "--out", imported, "--context", "8"], meta.build_parser()) == 0
    theirs, tok2 = L.load_model(imported / "ckpt.pt", CPU)
    idx = torch.randint(tok.vocab_size, (2, 8))
    assert torch.equal(ours(idx)[0], theirs(idx)[0]) and tok2.model_proto == tok.model_proto
    capsys.readouterr()
    args = ["--max-new-tokens", "30", "--temperature", "0", "--prompt", "KING:"]
    assert L.main(["sample", "--ckpt", trained / "ckpt.pt", *args]) == 0
    first = capsys.readouterr().out
    assert L.main(["sample", "--ckpt", imported / "ckpt.pt", *args]) == 0
    assert capsys.readouterr().out == first
    assert L.main(["eval", "--ckpt", imported / "ckpt.pt", "--data", small_text]) == 0
    assert L.main(["eval", "--ckpt", trained / "ckpt.pt", "--data", small_text]) == 0
    tables = capsys.readouterr().out.split("split ")
    assert tables[1] == tables[2], "the same table from both"


def test_an_export_is_written_whole_or_not_at_all(trained, tmp_path, capsys):
    folder = tmp_path / "meta"
    export = ["export", "--ckpt", trained / "ckpt.pt", "--out", folder]
    assert L.main(export, meta.build_parser()) == 0
    before = {name: (folder / name).read_bytes() for name in meta.FILES}
    # an export that fails half-way (a file size limit) leaves the earlier one as it was
    command = " ".join(llama_command(*export, script="tools/meta.py"))
    done = subprocess.run(["bash", "-c", f"ulimit -f 60; exec {command}"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "could not write" in done.stderr, done.stderr
    assert {name: (folder / name).read_bytes() for name in meta.FILES} == before
    assert sorted(os.listdir(tmp_path)) == ["meta"], "no half-written folder beside it"
    assert L.main(export, meta.build_parser()) == 0, "an export over an earlier one replaces it"
    assert sorted(os.listdir(folder)) == sorted(meta.FILES)
    (folder / "notes.txt").write_text("mine")
    assert L.main(export, meta.build_parser()) == 1
    one_line_error(capsys, "holds files other than an export's")
    assert (folder / "notes.txt").read_text() == "mine"


def test_what_is_not_a_run_of_ours_says_so(trained, tmp_path, capsys):
    folder = tmp_path / "meta"
    assert L.main(["export", "--ckpt", trained / "ckpt.pt", "--out", folder], meta.build_parser()) == 0
    assert L.main(["sample", "--ckpt", folder / "consolidated.00.pth"]) == 1
    one_line_error(capsys, "is not a checkpoint of llama.py (no model_args)")
    assert L.main(["import", folder, "--out", tmp_path / "in", "--context", "8"],
                  meta.build_parser()) == 0
    capsys.readouterr()
    assert L.main(["train", "--resume", "--steps", "40", "--out", tmp_path / "in"]) == 1
    one_line_error(capsys, "holds a model but no training run to continue")
    link = tmp_path / "link"
    link.symlink_to(folder)
    old = os.umask(0o022)
    try:
        assert L.main(["export", "--ckpt", trained / "ckpt.pt", "--out", link],
                      meta.build_parser()) == 0
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["in", "link", "meta"], os.listdir(tmp_path)
    assert link.is_symlink() and folder.stat().st_mode & 0o777 == 0o755, "as mkdir makes it"


def meta_shards(model, n):
    """Split a state dict as Meta's model parallelism does (the layers of its llama/model.py):
    ParallelEmbedding, wo and w2 (RowParallelLinear) along dimension 1, the other matrices along
    dimension 0 (ColumnParallelLinear)."""
    shards = [{} for _ in range(n)]
    for name, tensor in model.state_dict().items():
        tensor = tensor.to(torch.bfloat16)  # Meta's files hold bfloat16
        if tensor.dim() == 1:
            parts = [tensor.clone() for _ in range(n)]
        elif name.endswith(("tok_embeddings.weight", "wo.weight", "w2.weight")):
            parts = tensor.chunk(n, dim=1)
        else:
            parts = tensor.chunk(n, dim=0)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for shard in shards:
        shard["rope.freqs"] = torch.randn(4)  # in Meta's files, unused
    return shards


def hand_built_meta_folder(folder, tok):
    """Llama-2-70B's shape, scaled down: grouped-query heads, ffn_dim_multiplier, vocab_size -1,
    two bfloat16 shards. Returns the model it came from."""
    args = L.ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=tok.vocab_size,
                       multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=32)
    torch.manual_seed(0)
    model = L.Transformer(args).eval()
    folder.mkdir()
    for i, shard in enumerate(meta_shards(model, 2)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    params = {"dim": 64, "multiple_of": 32, "ffn_dim_multiplier": 1.3, "n_heads": 8,
              "n_kv_heads": 2, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(tok.model_proto)
    return model


def test_a_hand_built_meta_folder_imports_to_the_model_it_came_from(tmp_path):
    tok = small_tokenizer(60)
    model = hand_built_meta_folder(tmp_path / "meta", tok)
    assert L.main(["import", tmp_path / "meta", "--out", tmp_path / "in", "--context", "32"],
                  meta.build_parser()) == 0
    ckpt = torch.load(tmp_path / "in" / "ckpt.pt", weights_only=True)
    assert {w.dtype for w in ckpt["model"].values()} == {torch.bfloat16}, "bf16 stays bf16"
    assert "rope.freqs" not in ckpt["model"] and ckpt["model_args"]["vocab_size"] == 60
    loaded, _ = L.load_model(tmp_path / "in" / "ckpt.pt", CPU)
    assert loaded.args == model.args and loaded.args.hidden_dim == 224
    # the reference: the same weights rounded to bfloat16, as the shards hold them
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    idx = torch.randint(tok.vocab_size, (2, 12))
    assert loaded.tok_embeddings.weight.dtype == torch.float32, "float32 on the CPU by default"
    assert torch.allclose(loaded(idx)[0], model(idx)[0], atol=1e-5)
    in_bf16, _ = L.load_model(tmp_path / "in" / "ckpt.pt", CPU, dtype=torch.bfloat16)
    assert in_bf16.output.weight.dtype == torch.bfloat16 and in_bf16(idx)[0].isfinite().all()


def test_a_beginning_of_sequence_token_starts_the_prompt(tmp_path):
    """Llama's tokenizer has a BOS id; Meta's generation puts it first, and so does sample()."""
    model_file = io.BytesIO()
    lines = ["To be, or not to be, that is the question: whether 'tis nobler in the mind\n"] * 200
    # bos 1 and eos 2: SentencePiece's defaults
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), vocab_size=40, model_type="bpe",
                                   model_writer=model_file, minloglevel=2)
    tok = L.Tokenizer(model_file.getvalue())
    assert tok.bos_id == 1
    model = tiny_model(vocab_size=tok.vocab_size, max_seq_len=32)
    text = L.sample(model, tok, "To be", max_new_tokens=6, temperature=0)[0]
    ids = [tok.bos_id] + tok.encode("To be")
    for _ in range(6):
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert text == "To be" + tok.decode(ids)[len(tok.decode(ids[:-6])):], (text, tok.decode(ids))


def test_what_cannot_be_imported_from_a_meta_folder_is_one_line(tmp_path, trained, capsys):
    tok = small_tokenizer(60)
    folder = tmp_path / "meta"
    hand_built_meta_folder(folder, tok)
    imported = ["import", folder, "--out", tmp_path / "in"]

    def refused(words):
        assert L.main(imported, meta.build_parser()) == 1
        one_line_error(capsys, words)

    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "dim": 64.0}))
    refused("dim must be a whole number")
    (folder / "params.json").write_text(json.dumps({**params, "vocab_size": 61}))
    refused("its tokenizer has 60 pieces, its params.json vocab_size 61")
    (folder / "params.json").write_text(json.dumps({**params, "dim": 32, "n_heads": 4}))
    refused("size mismatch")
    (folder / "params.json").write_text("{not json")
    refused("params.json is damaged or was edited")
    (folder / "params.json").write_text(json.dumps(params))
    shard = (folder / "consolidated.01.pth").read_bytes()
    (folder / "consolidated.01.pth").write_text("not weights")
    refused("consolidated.01.pth is not a PyTorch zip archive")
    (folder / "consolidated.01.pth").write_bytes(shard)
    other = torch.load(folder / "consolidated.01.pth")
    torch.save({**other, "extra.weight": torch.zeros(1)}, folder / "consolidated.01.pth")
    refused("the shards do not hold the same weights")
    (folder / "consolidated.01.pth").write_bytes(shard)
    (folder / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\nIw== 2\n")  # tiktoken's: Llama 3
    refused("tiktoken")
    (folder / "tokenizer.model").write_bytes(b"nonsense")
    refused("tokenizer.model is damaged or was edited")
    (folder / "tokenizer.model").write_bytes(b"")
    refused("tokenizer.model is damaged or was edited (ValueError: the tokenizer is empty)")
    (folder / "tokenizer.model").unlink()
    refused("has no tokenizer.model")
    assert not (tmp_path / "in").exists(), "nothing written by a refused import"
    assert L.main(["import", trained, "--out", tmp_path / "in"], meta.build_parser()) == 1
    one_line_error(capsys, "holds a llama.py checkpoint, not Meta's layout")


# ======================================================================= tools/plot.py

def test_plot_draws_the_log_or_says_what_is_missing(trained, tmp_path, capsys):
    png = tmp_path / "loss.png"
    status = L.main(["--log", trained / "log.csv", "--png", png], tools_plot().build_parser())
    if importlib.util.find_spec("matplotlib") is None:
        assert status == 1
        one_line_error(capsys, "needs matplotlib")
        return
    assert status == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert L.main(["--log", tmp_path / "none.csv"], tools_plot().build_parser()) == 1
    one_line_error(capsys, "No such file or directory")
    (tmp_path / "empty.csv").write_text("step,train_loss,val_loss,lr\n")  # stopped before a row
    assert L.main(["--log", tmp_path / "empty.csv"], tools_plot().build_parser()) == 1
    one_line_error(capsys, "has no rows yet")


def tools_plot():
    from tools import plot
    return plot


# ======================================================================= tools/ablate.py

def ablation_args():
    return L.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=60, max_seq_len=16)


def test_each_variant_swaps_what_it_says_and_counts_its_parameters():
    args = ablation_args()
    dim = 32
    hidden = args.hidden_dim  # 256: LLaMA's rule rounds 2/3 * 4 * 32 up to a multiple of 256
    kv = args.n_kv_heads * args.head_dim
    per_layer = 2 * dim * dim + 2 * dim * kv + 3 * dim * hidden + 2 * dim
    base = 2 * 60 * dim + 2 * per_layer + dim
    linears = 2 * (4 + 3) + 1  # biases: every linear layer, the output's too
    bias_sizes = 2 * (dim + kv + kv + dim + hidden + dim + hidden) + 60
    gelu = 3 * hidden // 2  # two matrices 1.5 times as wide as SwiGLU's three
    # GPT-2: one embedding matrix, a position table, and per layer multi-head attention and a GELU
    # MLP with their biases and two LayerNorms with theirs; a final LayerNorm; a tied head
    gpt2_layer = 4 * dim * dim + 4 * dim + 2 * dim * gelu + gelu + dim + 2 * 2 * dim
    expected = {
        "llama": base,
        "layernorm": base + 5 * dim,  # a bias beside each of the 5 gains
        "learned-positions": base + 16 * dim,
        "no-positions": base,
        "gelu-mlp": base,
        "multi-head": base + 2 * 2 * dim * (dim - kv),
        "biases": base + bias_sizes,
        "tied-embeddings": base - 60 * dim,
        "gpt-2": 60 * dim + 16 * dim + 2 * gpt2_layer + 2 * dim,
    }
    models = {name: ablate.build_variant(name, args, seed=0) for name in ablate.VARIANTS}
    for name, model in models.items():
        n = sum(p.numel() for p in model.parameters())
        assert n == expected[name], (name, n, expected[name])
    assert sum(isinstance(m, torch.nn.Linear) and m.bias is not None
               for m in models["biases"].modules()) == linears
    for name in ("layernorm", "gpt-2"):
        kinds = {type(m) for m in models[name].modules()}
        assert L.RMSNorm not in kinds and torch.nn.LayerNorm in kinds, name
    for name in ("learned-positions", "no-positions", "gpt-2"):
        x = torch.randn(1, 16, 4, 8)
        m = models[name]
        assert torch.equal(L.apply_rotary_emb(x, m.freqs_cos, m.freqs_sin), x), "no rotation"
    assert isinstance(models["learned-positions"].tok_embeddings, ablate.LearnedPositions)
    assert not isinstance(models["no-positions"].tok_embeddings, ablate.LearnedPositions)
    for name in ("gelu-mlp", "gpt-2"):
        assert all(isinstance(b.feed_forward, ablate.GeluMLP) for b in models[name].layers)
    assert models["tied-embeddings"].output.weight is models["tied-embeddings"].tok_embeddings.weight
    assert models["gpt-2"].output.bias is None, "GPT-2's tied head has no bias"
    for name in ("multi-head", "gpt-2"):
        assert models[name].args.n_kv_heads == 4
        assert ablate.kv_cache_bytes_per_token(models[name]) == 2 * 2 * 4 * 8 * 4
    assert ablate.kv_cache_bytes_per_token(models["llama"]) == 2 * 2 * 1 * 8 * 4
    # the baseline is llama.py's model, untouched: the same weights as llama.py builds for a seed
    torch.manual_seed(0)
    plain = L.Transformer(args)
    assert type(models["llama"]) is L.Transformer
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 models["llama"].state_dict().values()))


def test_every_variant_trains_and_the_baseline_run_is_llama_pys_run(small_text, tmp_path):
    text = small_text.read_text()
    splits = L.split_text(text)
    tok = L.Tokenizer.train(splits["train"], 130)
    cfg = L.TrainConfig(steps=30, dim=32, layers=2, heads=4, kv_heads=1, vocab_size=130,
                        context=16, batch_size=8, lr=1e-2, warmup=2, log_interval=30)
    data = L.encode_splits(splits, tok, cfg.context)
    for name in ablate.VARIANTS:
        r = ablate.run(name, cfg, tok, data, CPU)
        assert r["last_loss"] < r["first_loss"] - 0.2, (name, r)
        assert 0 < r["bpc"] < 8 and r["tokens_per_s"] > 0, (name, r)
    model, _, _ = L.train(replace(cfg, data=str(small_text)), out=tmp_path)
    x, y = L.windows(data["val"], cfg.context)
    n_chars = tok.n_chars[data["val"][1:]].sum().item()
    expected = L.evaluate(model, x, y, 16 * cfg.batch_size, n_chars)["bpc"]
    assert ablate.run("llama", cfg, tok, data, CPU)["bpc"] == pytest.approx(expected, rel=1e-6)


def test_the_quick_ablation_prints_the_whole_table(small_text, capsys):
    assert L.main(["--steps", "2", "--seeds", "1", "--data", small_text],
                  ablate.build_parser()) == 0
    out = capsys.readouterr().out
    runs = [line for line in out.splitlines() if line.startswith("[")]
    assert len(runs) == len(ablate.VARIANTS) + 3 and runs[-1].startswith("[12/12]"), runs
    table = [line for line in out.splitlines() if line.startswith("context")]
    assert len(table) == 12 and "KV B/token" in out and out.splitlines()[-1].startswith("total")


def test_the_ablation_says_at_once_what_would_fail_late(small_text, tmp_path, capsys):
    assert L.main(["--steps", "2", "--seeds", "1", "--data", small_text, "--png",
                   tmp_path / "no" / "x.png"], ablate.build_parser()) == 1
    one_line_error(capsys, "no folder")
    short = tmp_path / "short.txt"
    short.write_text(small_text.read_text()[:1000])  # enough for 16-token windows, not for 128
    assert L.main(["--steps", "2", "--seeds", "1", "--data", short], ablate.build_parser()) == 1
    captured = capsys.readouterr()
    assert "[1/" not in captured.out and "too short" in captured.err, captured
