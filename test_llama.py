"""Tests for llama.py: every component against a reference written here, a known answer or an
invariant.

Run with `python -m pytest -q`. CPU only, no network: the download tests start their own HTTP
server on 127.0.0.1. The end-to-end tests need input.txt beside llama.py, which
`python llama.py train` downloads.
"""
import cmath
import hashlib
import http.server
import importlib.util
import io
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import llama as L

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


def one_line_error(capsys, words):
    """The command printed exactly one line on stderr, and it holds words."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in err and "Traceback" not in err, err
    return err


def llama_command(*args):
    return [sys.executable, str(HERE / "llama.py"), *[str(a) for a in args]]


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


# ------------------------------------------------------------------------------------ shapes

def test_shapes_of_every_component():
    m = tiny_model(n_heads=4, n_kv_heads=2, dim=16)
    a = m.args
    B, T = 3, 5
    x = torch.randn(B, T, a.dim)
    freqs_cis = L.precompute_freqs_cis(a.head_dim, T)
    assert freqs_cis.shape == (T, a.head_dim // 2) and freqs_cis.is_complex()
    freqs_cis = freqs_cis[:, None, :]  # (T, 1, head_dim/2): the same for every head
    assert L.RMSNorm(a.dim)(x).shape == (B, T, a.dim)
    rotated = L.apply_rotary_emb(torch.randn(B, T, 4, a.head_dim), freqs_cis)
    assert rotated.shape == (B, T, 4, a.head_dim)
    assert m.layers[0].attention(x, freqs_cis).shape == (B, T, a.dim)
    assert m.layers[0].feed_forward(x).shape == (B, T, a.dim)
    assert m.layers[0](x, freqs_cis).shape == (B, T, a.dim)
    logits, loss = m(torch.randint(a.vocab_size, (B, T)))
    assert logits.shape == (B, T, a.vocab_size) and loss is None
    assert m.layers[0].attention.wk.weight.shape == (2 * a.head_dim, a.dim), "two key/value heads"


def test_hidden_dim_follows_llama_rule():
    # Meta's rule: int(2 * 4 * dim / 3), times ffn_dim_multiplier, rounded up to multiple_of
    assert L.ModelArgs(dim=128, multiple_of=256).hidden_dim == 512
    llama_7b = L.ModelArgs(dim=4096, n_heads=32, n_kv_heads=None, multiple_of=256)
    assert llama_7b.hidden_dim == 11008
    llama2_70b = L.ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096,
                             ffn_dim_multiplier=1.3)
    assert llama2_70b.hidden_dim == 28672


def test_state_dict_uses_meta_names():
    names = set(tiny_model(n_layers=2).state_dict())
    per_layer = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"]
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    expected |= {f"layers.{i}.{name}.weight" for i in range(2) for name in per_layer}
    assert names == expected, names ^ expected  # no rotary table, no cache, no biases


SHAPES = [dict(dim=16, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=50),
          dict(dim=128, n_layers=4, n_heads=8, n_kv_heads=1, vocab_size=130),
          dict(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=77, multiple_of=32,
               ffn_dim_multiplier=1.3)]


@pytest.mark.parametrize("config", SHAPES)
def test_count_parameters_matches_the_model(config):
    args = L.ModelArgs(**config)
    assert L.count_parameters(args) == sum(p.numel() for p in L.Transformer(args).parameters())


# ------------------------------------------------------------------ components against references

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


def test_rotary_matches_complex_reference():
    torch.manual_seed(0)
    B, T, H, hd = 2, 6, 3, 8  # batch, positions, heads, head size
    theta = 10000.0
    x = torch.randn(B, T, H, hd)
    out = L.apply_rotary_emb(x, L.precompute_freqs_cis(hd, T, theta)[:, None])
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


def test_rotary_dot_product_depends_only_on_offset():
    torch.manual_seed(0)
    hd = 16
    T = 32
    freqs_cis = L.precompute_freqs_cis(hd, T)[:, None]
    q = torch.randn(hd)
    k = torch.randn(hd)
    rq = L.apply_rotary_emb(q.expand(1, T, 1, hd), freqs_cis)[0, :, 0]  # (T, hd): q everywhere
    rk = L.apply_rotary_emb(k.expand(1, T, 1, hd), freqs_cis)[0, :, 0]
    for offset in (0, 3, 7):
        dots = torch.stack([rq[m] @ rk[m - offset] for m in range(offset, T)])
        assert torch.allclose(dots, dots[0].expand_as(dots), atol=1e-4), (offset, dots)
    assert not torch.allclose(rq[5] @ rk[2], rq[5] @ rk[4], atol=1e-3), "other offsets differ"


def reference_attention(attn, x, freqs_cis):
    """Meta's recipe spelled out: repeat the key/value heads, then softmax(q k^T / sqrt(d)) v."""
    B, T, _ = x.shape
    H = attn.n_heads
    KV = attn.n_kv_heads
    hd = attn.head_dim
    q = L.apply_rotary_emb(attn.wq(x).view(B, T, H, hd), freqs_cis)
    k = L.apply_rotary_emb(attn.wk(x).view(B, T, KV, hd), freqs_cis)
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
    freqs_cis = L.precompute_freqs_cis(8, 9)[:, None]
    attn = m.layers[0].attention
    got = attn(x, freqs_cis)
    expected = reference_attention(attn, x, freqs_cis)
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
                          ({"n_layers": 0}, "n_layers must be at least 1")]:
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


# ------------------------------------------------------------------------- KV cache and decoding

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


def test_compile_decoding_picks_the_mode_by_device():
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
    assert draws(temperature=1e-40) == {0}, "a tiny temperature is greedy, not a crash"
    big = torch.tensor([[1e30, 3e30, -1e30]])
    assert L.sample_next(big, temperature=1e-30, generator=g).item() == 1


# ----------------------------------------------------------------------------- training

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


def test_the_train_config_mirrors_the_constants_and_the_flags():
    cfg = L.TrainConfig()
    documented = {"steps": L.EPOCHS, "batch_size": L.BATCH_SIZE, "context": L.CONTEXT_WINDOW,
                  "dim": L.DIM, "heads": L.HEADS, "layers": L.LAYERS, "vocab_size": L.VOCAB_SIZE,
                  "log_interval": L.LOG_INTERVAL}
    assert {name: getattr(cfg, name) for name in documented} == documented
    args = L.build_parser().parse_args(["train"])
    assert L.train_config(args) == cfg, "the flags' defaults are the constants"


# ----------------------------------------------------------------------------- tokenizer

@needs_input
def test_tokenizer_round_trips_all_of_input_and_is_reproducible():
    text = INPUT.read_text(encoding="utf-8")
    train_text = L.split_text(text)["train"]
    tok = L.Tokenizer.train(train_text, 130)
    assert tok.vocab_size == 130 and tok.bos_id == -1
    ids = tok.encode(text)
    assert tok.decode(ids) == text, "decode(encode(text)) differs"
    assert text.count("\n") == 40000 and tok.decode(ids).count("\n") == 40000
    assert tok.decode(tok.encode("a  b\n\n   c")) == "a  b\n\n   c"
    assert int(tok.n_chars[torch.tensor(ids)].sum()) == len(text)
    again = L.Tokenizer.train(train_text, 130)
    assert again.model_proto == tok.model_proto, "same text, different tokenizer"
    assert tok.unknown_chars("Hello ~ world") == "~"


@needs_input
def test_tokenizer_keeps_lines_longer_than_sentencepieces_limit():
    """SentencePiece skips lines over 4192 bytes by default; a text on one line must still train."""
    one_line = INPUT.read_text(encoding="utf-8")[:200_000].replace("\n", " ")
    tok = L.Tokenizer.train(one_line, 130)
    assert tok.vocab_size == 130 and tok.decode(tok.encode(one_line[:5000])) == one_line[:5000]


def test_tokenizer_refuses_impossible_vocab_size_and_says_why():
    text = "the quick brown fox jumps over the lazy dog\n" * 50
    # 26 letters and the space, plus the unknown piece and the newline: 29
    with pytest.raises(ValueError, match="--vocab-size 20 is too small.*use at least 29"):
        L.Tokenizer.train(text, 20)
    assert L.Tokenizer.train(text, 29).vocab_size == 29
    with pytest.raises(ValueError, match="than SentencePiece can make from 2,200 characters"):
        L.Tokenizer.train(text, 5000)


def test_damaged_cached_tokenizer_is_trained_again(tmp_path, capsys):
    text = "To be, or not to be, that is the question:\n" * 100
    tok = L.get_tokenizer(text, 40, tmp_path)
    (cached,) = tmp_path.glob("tokenizer-40-*.model")
    cached.write_bytes(cached.read_bytes()[:100])  # cut short
    again = L.get_tokenizer(text, 40, tmp_path)
    assert again.model_proto == tok.model_proto and cached.read_bytes() == tok.model_proto
    assert "damaged" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoints

def small_tokenizer(vocab_size=60):
    text = "To be, or not to be, that is the question:\n" * 200 + "xyzqjkvbwg.,;:!?'-\n"
    return L.Tokenizer.train(text, vocab_size)


def save_small_checkpoint(path, vocab_size=60, n_kv_heads=2):
    tok = small_tokenizer(vocab_size)
    m = L.Transformer(L.ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                                  vocab_size=tok.vocab_size, max_seq_len=16, multiple_of=8))
    opt = torch.optim.AdamW(m.parameters())
    config = asdict(L.TrainConfig(steps=7))
    config = {key: config[key] for key in L.TRAIN_KEYS}
    rng = torch.Generator().get_state()
    L.save_checkpoint(path, m, tok, opt, 7, rng, config, [[7.0] * 8], None)
    return m, tok


def test_checkpoint_round_trip(tmp_path):
    m, tok = save_small_checkpoint(tmp_path / "ckpt.pt")
    raw = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert raw["step"] == 7 and raw["model_args"]["n_kv_heads"] == 2 and raw["log"] == [[7.0] * 8]
    loaded, tok2 = L.load_model(tmp_path / "ckpt.pt", CPU)
    idx = torch.randint(tok.vocab_size, (2, 10))
    assert torch.equal(m.eval()(idx)[0], loaded(idx)[0])
    assert tok2.model_proto == tok.model_proto
    assert os.listdir(tmp_path) == ["ckpt.pt"], "temporary files left behind"
    assert L.load_checkpoint(tmp_path / "ckpt.pt", for_resume=True)["step"] == 7


def edited(tmp_path, change):
    """A copy of a good checkpoint with change(ckpt) applied."""
    if not (tmp_path / "good.pt").exists():
        save_small_checkpoint(tmp_path / "good.pt")
    ckpt = torch.load(tmp_path / "good.pt", weights_only=True)
    change(ckpt)
    path = tmp_path / f"edited-{len(os.listdir(tmp_path))}.pt"
    torch.save(ckpt, path)
    return path


def args_edit(**changes):
    return lambda ckpt: ckpt["model_args"].update(changes)


EDITS = [
    ("extra model_args key", args_edit(colour="blue"), "unknown setting 'colour'"),
    ("a string for dim", args_edit(dim="16"), "dim = '16', not a number"),
    ("absurd max_seq_len", args_edit(max_seq_len=10**12), "max_seq_len"),
    ("wider weights", args_edit(dim=32), "is (60, 16), where the model has (60, 32)"),
    ("another vocabulary", args_edit(vocab_size=61), "tokenizer has 60 pieces"),
    ("damaged tokenizer", lambda c: c.update(tokenizer=c["tokenizer"][:50]), "damaged or was"),
    ("NaN weights", lambda c: c["model"]["norm.weight"].fill_(float("nan")), "NaN or infinite"),
    ("a missing weight", lambda c: c["model"].pop("output.weight"), "output.weight is missing"),
]


@pytest.mark.parametrize("what, change, words", EDITS, ids=[e[0] for e in EDITS])
def test_damaged_or_edited_checkpoints_are_refused_at_load(tmp_path, capsys, what, change, words):
    path = edited(tmp_path, change)
    with pytest.raises(ValueError, match=re.escape(words)):
        L.load_model(path, CPU)
    assert L.main(["sample", "--ckpt", path, "--max-new-tokens", "3"]) == 1
    one_line_error(capsys, "damaged or was edited")


RESUME_EDITS = [
    ("config without lr", lambda c: c["config"].pop("lr"), "settings are incomplete"),
    ("config with a string", lambda c: c["config"].update(steps="7"), "steps = '7' is not valid"),
    ("short random state", lambda c: c.update(rng=c["rng"][:100]), "random state is incomplete"),
    ("no optimizer", lambda c: c.update(optimizer={}), "optimizer state is incomplete"),
    ("fractional step", lambda c: c.update(step=2.5), "not a whole number"),
    ("log of strings", lambda c: c.update(log=[["a"] * 8]), "rows of 8 numbers"),
]


@pytest.mark.parametrize("what, change, words", RESUME_EDITS, ids=[e[0] for e in RESUME_EDITS])
def test_damaged_resume_state_is_refused(tmp_path, what, change, words):
    path = edited(tmp_path, change)
    L.load_checkpoint(path)  # enough to sample from
    with pytest.raises(ValueError, match=words):
        L.load_checkpoint(path, for_resume=True)


def test_adam_moments_of_the_wrong_shape_are_refused_on_resume(run_copy, capsys):
    """load_state_dict takes AdamW's moments whatever their shape; the first step would fail."""
    ckpt = torch.load(run_copy / "ckpt.pt", weights_only=True)
    ckpt["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(ckpt, run_copy / "ckpt.pt")
    assert L.main(["train", "--resume", "--steps", "40", "--out", run_copy]) == 1
    one_line_error(capsys, "cannot be resumed: its optimizer or random state is damaged")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unsafe_and_broken_checkpoints_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="pickled Python objects") as refused:
        L.load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists(), "pickled code ran"
    assert "weights_only" not in str(refused.value), "no advice to turn the protection off"
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello")
    torch.save(torch.randn(3), tmp_path / "tensor.pt")
    good = tmp_path / "good.pt"
    torch.save({"a": torch.randn(100)}, good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:200])
    for name, words in [("empty.pt", "not a whole PyTorch file"),
                        ("text.pt", "not a whole PyTorch file"),
                        ("cut.pt", "not a whole PyTorch file"),
                        ("tensor.pt", "not a llama.py checkpoint"),
                        ("good.pt", "not a llama.py checkpoint"),
                        ("missing.pt", "run `python llama.py train` first")]:
        with pytest.raises((ValueError, FileNotFoundError), match=words):
            L.load_checkpoint(tmp_path / name)


# ----------------------------------------------------------------------------- safe files

def test_atomic_write_keeps_old_file_on_crash(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")

    def crash(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        L.atomic_write(path, crash)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_write_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        L.atomic_write(tmp_path / "a.txt", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640


def test_a_full_disk_at_save_keeps_the_previous_checkpoint(run_copy, small_text):
    """A real file size limit (ulimit -f, in 1024-byte blocks) makes the save fail half-way."""
    before = (run_copy / "ckpt.pt").read_bytes()
    log_before = (run_copy / "log.csv").read_bytes()
    command = " ".join(llama_command("train", "--resume", "--steps", "35", "--out", run_copy))
    done = subprocess.run(["bash", "-c", f"ulimit -f 200; exec {command}"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: could not write"), done.stderr
    assert "left as it was" in done.stderr, done.stderr
    assert "size limit" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert (run_copy / "ckpt.pt").read_bytes() == before
    assert (run_copy / "log.csv").read_bytes() == log_before
    assert not list(run_copy.glob("*.tmp")), list(run_copy.iterdir())


# ----------------------------------------------------------------------------- download

class Handler(http.server.BaseHTTPRequestHandler):
    body = b"To be, or not to be\n" * 100

    def do_GET(self):
        if self.path == "/missing":
            self.send_error(404)
            return
        if self.path == "/slow":
            time.sleep(2)
        if self.path == "/trickle":  # a byte at a time, each in time for the read timeout
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            for byte in self.body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
            return
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
        pass  # a client that gave up on a trickling or endless body: expected here


@pytest.fixture(scope="module")
def server():
    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_success_and_checksum(tmp_path, server):
    sha = hashlib.sha256(Handler.body).hexdigest()
    path = L.download(f"{server}/ok", tmp_path / "input.txt", sha)
    assert path.read_bytes() == Handler.body and os.listdir(tmp_path) == ["input.txt"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


FAILURES = [("checksum", "sha256"), ("missing", "404"), ("short", "IncompleteRead|closed after"),
            ("slow", "timed out"), ("refused", "download"), ("trickle", "took more than 1 s"),
            ("endless", "more than the 5,000"), ("big", "more than the 1,000 expected")]


@pytest.mark.parametrize("case, words", FAILURES)
def test_download_failures_leave_nothing(tmp_path, server, case, words):
    url = f"http://127.0.0.1:{free_port()}/ok" if case == "refused" else f"{server}/{case}"
    limit = {"endless": 5000, "big": 1000}.get(case, 10**6)
    started = time.monotonic()
    with pytest.raises(OSError, match=words) as e:
        L.download(url, tmp_path / "input.txt", "0" * 64 if case == "checksum" else None,
                   max_bytes=limit, timeout=0.5, deadline=1.0)
    assert time.monotonic() - started < 5, "the whole download is bounded in time"
    assert "curl" in str(e.value), "the message should say how to fetch the file by hand"
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


@needs_input
def test_an_existing_input_txt_is_checked(tmp_path):
    L.fetch_tiny_shakespeare(INPUT)  # the real one passes, and is left alone
    half = tmp_path / "input.txt"
    half.write_bytes(INPUT.read_bytes()[:500_000])
    with pytest.raises(ValueError, match="500,000 bytes, not 1,115,394.*Delete it"):
        L.fetch_tiny_shakespeare(half)
    assert half.stat().st_size == 500_000, "a damaged copy is refused, never deleted"


def test_bad_data_files(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        L.read_text(tmp_path / "latin1.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        L.read_text(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="no data file"):
        L.read_text(tmp_path / "nope.txt")
    text = "abcdefgh ijkl\n" * 3
    tok = L.Tokenizer.train("abcdefgh ijkl\n" * 30, 20)
    with pytest.raises(ValueError, match="too short"):
        L.check_splits(text, tok, L.encode_splits(text, tok), 16)


def test_a_split_the_tokenizer_cannot_read_is_named(capsys):
    """Validation and test text in an alphabet the training split never has: not 'too short'."""
    text = "abc def ghi\n" * 17_500 + "ЖЗИЙКЛМН" * 11_250  # 210,000 + 90,000 characters
    tok = L.Tokenizer.train(L.split_text(text)["train"], 20)
    data = L.encode_splits(text, tok)
    with pytest.raises(ValueError, match="never occur in the training split"):
        L.check_splits(text, tok, data, 16)
    assert "bits per" in capsys.readouterr().err


# ----------------------------------------------------------------------- end to end through main()

def test_train_eval_sample_end_to_end(trained, small_text, capsys):
    assert (trained / "ckpt.pt").exists() and (trained / "log.csv").exists()
    if importlib.util.find_spec("matplotlib"):  # optional: a plot only where matplotlib is
        assert (trained / "loss.png").stat().st_size > 1000
    rows = (trained / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,train_loss,val_loss,val_nats_per_char") and len(rows) == 4, rows
    # nats per character over nats per token: tokens per character, the same on every row
    ratios = [float(r.split(",")[3]) / float(r.split(",")[2]) for r in rows[1:]]
    assert max(ratios) - min(ratios) < 1e-4 and 0.2 < ratios[0] < 1, rows
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["model_args"]["n_kv_heads"] == 2 and len(ckpt["log"]) == 3
    first_val = float(rows[1].split(",")[2])
    last_val = float(rows[-1].split(",")[2])
    assert last_val < first_val < math.log(130), (first_val, last_val)
    capsys.readouterr()
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

    def columns(run):
        return [row.split(",")[:5] for row in (run / "log.csv").read_text().splitlines()]

    assert columns(tmp_path) == columns(trained), "step, losses and lr should repeat exactly"
    first = torch.load(trained / "ckpt.pt", weights_only=True)["model"]
    second = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)


@needs_input
def test_documented_settings_meet_the_quality_bar(tmp_path):
    """The README's headline: the documented settings, 1000 steps, every token evaluated."""
    model, tok, data = L.train(L.TrainConfig(out=str(tmp_path)))
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
    for extra, words in [(["--temperature", "-1"], "--temperature"),
                         (["--temperature", "nan"], "--temperature"),
                         (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
                         (["--top-k", "0"], "--top-k"),
                         (["--max-new-tokens", "-3"], "--max-new-tokens"),
                         (["--max-new-tokens", "10000000000000"], "at most 1,000,000"),
                         (["--prompt", ""], "empty"), (["--prompt", "hello ~"], "never saw"),
                         (["--prompt", "ROMEO\udcff"], "not valid UTF-8"),
                         (["--num-samples", "0"], "at least 1"), (["--seed", str(2**70)], "--seed"),
                         (["--device", "nonsense"], "not one of"), (["--device", "cuda:7"], "cuda"),
                         (["--context", "0"], "--context")]:
        assert L.main(base + extra) == 1, extra
        one_line_error(capsys, words)
    assert L.main(base + ["--max-new-tokens", "0", "--prompt", "Hi"]) == 0
    assert capsys.readouterr().out.strip() == "Hi"
    assert L.main(base + ["--temperature", "1e-40", "--prompt", "Hi"]) == 0, "greedy, no crash"
    tiny = capsys.readouterr().out
    assert L.main(base + ["--temperature", "0", "--prompt", "Hi"]) == 0
    assert capsys.readouterr().out == tiny
    long_prompt = "To be, or not to be, that is the question. " * 3
    assert L.main(base + ["--prompt", long_prompt]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(long_prompt) and "sees its last 8" in captured.err


HAS_GPU = torch.cuda.is_available() or torch.backends.mps.is_available()


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_a_device_that_is_not_there_is_one_line(trained, capsys):
    for device, words in [("cuda", "no CUDA GPU"), ("mps", "MPS is not available")]:
        assert L.main(["sample", "--ckpt", trained / "ckpt.pt", "--device", device]) == 1
        one_line_error(capsys, words)
        assert L.main(["train", "--device", device, "--steps", "1"]) == 1
        one_line_error(capsys, words)


def test_user_errors_are_one_line(tmp_path, small_text, capsys):
    (tmp_path / "ten.txt").write_text("0123456789")
    for args, words in [(["eval", "--ckpt", tmp_path / "none.pt"], "no checkpoint"),
                        (["train", "--dim", "30", "--heads", "4"], "not divisible"),
                        (["train", "--heads", "8", "--kv-heads", "3"], "divisible by n_kv_heads"),
                        (["train", "--dim", "24", "--heads", "8"], "odd"),
                        (["train", "--steps", "0"], "--steps must be at least 1"),
                        (["train", "--steps", "abc"], "invalid int value: 'abc'"),
                        (["train", "--lr", "x"], "invalid float value"),
                        (["train", "--batch-size", "-1"], "--batch-size"),
                        (["train", "--lr", "0"], "--lr"),
                        (["train", "--lr", "inf"], "--lr must be a positive number"),
                        (["train", "--weight-decay", "-1"], "--weight-decay"),
                        (["train", "--warmup", "-5"], "--warmup must be at least 0"),
                        (["train", "--dropout", "1"], "--dropout must be in [0, 1)"),
                        (["train", "--seed", str(2**64)], "--seed must be between"),
                        (["train", "--dim", "10000000"], "GiB"),
                        (["train", "--batch-size", "1000000000000"], "GiB"),
                        (["train", "--resume", "--overwrite"], "--overwrite replaces it: give one"),
                        (["train", "--vocab-size", "20", "--data", small_text, "--out",
                          tmp_path / "v"], "--vocab-size 20 is too small"),
                        (["train", "--data", tmp_path / "ten.txt", "--out", tmp_path / "t"],
                         "the text is too short: 10 characters"),
                        (["train", "--data", tmp_path / "missing.txt"], "no data file"),
                        (["eval", "--batch-size", "0"], "--batch-size must be at least 1"),
                        (["eval", "--batch-size", "-1"], "--batch-size must be at least 1"),
                        (["bench", "--new-tokens", "0"], "--new-tokens"),
                        (["bench", "--bench-steps", "0"], "--bench-steps"),
                        (["bench", "--bench-warmup", "-1"], "--bench-warmup"),
                        (["sample", "--stepz", "3"], "unrecognized arguments"),
                        (["train", "--out", small_text], "is a file: give a folder"),
                        ([], "give a command"), (["fly"], "give a command")]:
        assert L.main(args) == 1, args
        one_line_error(capsys, words)


def test_help_lists_commands_and_returns(capsys):
    assert L.main(["--help"]) == 0, "no SystemExit, so that a notebook cell just prints it"
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "sample", "eval", "bench", "export")), out
    assert L.main(["train", "--help"]) == 0
    assert "EPOCHS" in capsys.readouterr().out


def test_a_finished_run_is_never_replaced_silently(run_copy, small_text, capsys):
    before = (run_copy / "ckpt.pt").read_bytes()
    log_before = (run_copy / "log.csv").read_bytes()
    assert L.main(["train", *TINY, "--data", small_text, "--out", run_copy]) == 1
    one_line_error(capsys, "already holds a run: continue it with --resume")
    # --overwrite replaces it, but only with a checkpoint: a run that fails leaves both files alone
    diverging = ["train", *TINY, "--lr", "1e30", "--overwrite", "--data", small_text]
    assert L.main(diverging + ["--out", run_copy]) == 1
    err = one_line_error(capsys, "the training loss became")
    assert "was left as it was" in err
    assert (run_copy / "ckpt.pt").read_bytes() == before
    assert (run_copy / "log.csv").read_bytes() == log_before


def test_resume_extends_a_run_and_refuses_what_cannot_change(run_copy, small_text, tmp_path,
                                                               capsys):
    resume = ["train", "--resume", "--out", run_copy]
    assert L.main(resume) == 1
    one_line_error(capsys, "has finished its 30 steps: add --steps N")
    for extra, words in [(["--dim", "64"], "--dim cannot change when resuming"),
                         (["--lr", "0.01"], "--lr cannot change"),
                         (["--steps", "20"], "not past step 30")]:
        assert L.main(resume + extra) == 1
        one_line_error(capsys, words)
    other = tmp_path / "other.txt"
    other.write_text(small_text.read_text()[:-1] + "!")
    assert L.main(resume + ["--steps", "40", "--data", other]) == 1
    one_line_error(capsys, "not the one")
    assert L.main(resume + ["--steps", "40", "--dim", "32"]) == 0, "the saved value is fine"
    ckpt = torch.load(run_copy / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 40 and ckpt["config"]["steps"] == 40
    rows = (run_copy / "log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [10, 20, 30, 40], rows
    # the schedule continued over the new total: the last step's learning rate is the new schedule's
    extended = L.TrainConfig(lr=3e-3, warmup=5, steps=40)
    assert float(rows[-1].split(",")[4]) == pytest.approx(L.lr_at(39, extended), rel=1e-4)
    assert L.lr_at(39, extended) > L.lr_at(39, L.TrainConfig(lr=3e-3, warmup=5, steps=30))


def test_interrupt_then_resume_matches_uninterrupted(tmp_path, small_text):
    args = llama_command("train", *TINY, "--steps", "200", "--data", small_text)
    whole = subprocess.run(args + ["--out", tmp_path / "a"], env=ENV, capture_output=True,
                           text=True)  # in a process of its own, with one thread, as the other
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen(args + ["--out", tmp_path / "b"], env=ENV, stdout=subprocess.PIPE,
                            text=True)
    wait_for_line(proc, "step    20/200")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in out, out[-500:]
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

    def last_row(run):
        return (tmp_path / run / "log.csv").read_text().splitlines()[-1].split(",")[:5]

    assert last_row("a") == last_row("b"), "the last log line (step, losses, lr) differs"


def test_kill_leaves_a_checkpoint_a_free_folder_and_no_temp_files(tmp_path, small_text, capsys):
    """SIGKILL gives no chance to save: what is on disk comes from --save-every alone. While the run
    lives, a second one is refused the folder; once it is dead, its lock holds nothing."""
    args = llama_command("train", *TINY, "--steps", "100000", "--save-every", "10", "--data",
                         small_text, "--out", tmp_path)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for_line(proc, "step    30/")
        assert L.main(["train", *TINY, "--data", small_text, "--out", tmp_path, "--resume"]) == 1
        one_line_error(capsys, f"in use by another training run (process {proc.pid})")
    finally:
        proc.kill()
        proc.wait()
    step = L.load_checkpoint(tmp_path / "ckpt.pt")["step"]  # intact, even if the kill hit a save
    assert step >= 20 and step % 10 == 0, step
    (tmp_path / "ckpt.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert L.main(["train", "--resume", "--steps", str(step + 1), "--out", tmp_path]) == 0
    assert not list(tmp_path.glob("*.tmp")) and "left by an earlier run" in capsys.readouterr().err


def test_ctrl_c_outside_the_training_loop_is_one_line(trained, small_text, tmp_path, capsys,
                                                      monkeypatch):
    """A real SIGINT during a long sample, while the data is encoded and during the final
    evaluation: one line each, status 130, and no traceback."""
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    assert L.main(["sample", "--ckpt", trained / "ckpt.pt", "--max-new-tokens", "1000000"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    for phase, words in [("encode_splits", "interrupted before training began: nothing was saved"),
                         ("report", "interrupted during the evaluation; ")]:
        def interrupt_first(*args, original=getattr(L, phase)):
            os.kill(os.getpid(), signal.SIGINT)  # the default handler raises KeyboardInterrupt here
            return original(*args)

        monkeypatch.setattr(L, phase, interrupt_first)
        assert L.main(["train", *TINY, "--data", small_text, "--out", tmp_path / phase]) == 130
        err = capsys.readouterr().err
        assert err.startswith("\n" + words) and len(err.strip().splitlines()) == 1, err
        monkeypatch.undo()
    assert not (tmp_path / "encode_splits" / "ckpt.pt").exists()
    assert L.load_checkpoint(tmp_path / "report" / "ckpt.pt")["step"] == 30


def test_a_closed_pipe_ends_sample_quietly(trained):
    sample = llama_command("sample", "--ckpt", trained / "ckpt.pt", "--max-new-tokens", "3000")
    done = subprocess.run(["bash", "-c", f"{' '.join(sample)} | head -c 50"], env=ENV,
                          capture_output=True, timeout=120)
    assert len(done.stdout) == 50 and done.stderr == b"", done.stderr


def test_bench_runs_on_a_tiny_setting(capsys):
    result = L.main(["bench", "--dim", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                     "--context", "8", "--batch-size", "2", "--new-tokens", "20",
                     "--bench-steps", "2", "--bench-warmup", "1"])
    out = capsys.readouterr().out
    assert result == 0 and "same tokens: True" in out and "tokens/s" in out, out
    # model FLOPs per token, by hand: 6 per weight of wq 16x16, wk and wv 16x8, wo 16x16, w1 w2 w3
    # 16x256 (hidden 256: LLaMA's rule rounds 2/3 * 4 * 16 up to a multiple of 256) and output
    # 130x16; attention 12 * 1 layer * 8 positions * 16 wide
    expected = 6 * (256 + 128 + 128 + 256 + 3 * 16 * 256 + 130 * 16) + 12 * 1 * 8 * 16
    line = next(line for line in out.splitlines() if line.startswith("train"))
    tok_s = float(line.split()[1].replace(",", ""))
    tflop_s = float(line.split()[-2])
    assert abs(tflop_s * 1e12 / tok_s / expected - 1) < 0.01, (line, expected)


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


# ------------------------------------------------------------------------ Meta's checkpoint layout

def test_export_then_import_gives_the_same_logits_and_samples(trained, tmp_path, capsys):
    folder = tmp_path / "meta"
    assert L.main(["export", "--ckpt", trained / "ckpt.pt", "--out", folder]) == 0
    assert sorted(os.listdir(folder)) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    params = L.json.loads((folder / "params.json").read_text())
    assert list(params) == list(L.META_PARAMS) and params["n_kv_heads"] == 2
    weights = torch.load(folder / "consolidated.00.pth", weights_only=True)
    ours, tok = L.load_model(trained / "ckpt.pt", CPU)
    assert weights.keys() == ours.state_dict().keys(), "Meta's names and nothing else"
    theirs, tok2 = L.load_model(folder, CPU, context=ours.args.max_seq_len)
    idx = torch.randint(tok.vocab_size, (2, 8))
    assert torch.equal(ours(idx)[0], theirs(idx)[0]) and tok2.model_proto == tok.model_proto
    capsys.readouterr()
    args = ["--max-new-tokens", "30", "--temperature", "0", "--prompt", "KING:"]
    assert L.main(["sample", "--ckpt", trained / "ckpt.pt", *args]) == 0
    first = capsys.readouterr().out
    assert L.main(["sample", "--ckpt", folder, "--context", "8", *args]) == 0
    assert capsys.readouterr().out == first
    assert L.main(["export", "--ckpt", trained / "ckpt.pt", "--out", trained]) == 1
    one_line_error(capsys, "holds other files")


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


def test_a_hand_built_meta_folder_loads_to_the_model_it_came_from(tmp_path, capsys):
    """Llama-2-70B's shape, scaled down: grouped-query heads, ffn_dim_multiplier, vocab_size -1,
    and two shards."""
    tok = small_tokenizer(60)
    args = L.ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=tok.vocab_size,
                       multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=32)
    torch.manual_seed(0)
    model = L.Transformer(args).eval()
    for i, shard in enumerate(meta_shards(model, 2)):
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    params = {"dim": 64, "multiple_of": 32, "ffn_dim_multiplier": 1.3, "n_heads": 8,
              "n_kv_heads": 2, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}
    (tmp_path / "params.json").write_text(L.json.dumps(params))
    (tmp_path / "tokenizer.model").write_bytes(tok.model_proto)
    loaded, _ = L.load_model(tmp_path, CPU, context=32)
    assert loaded.args == args and loaded.args.hidden_dim == 224
    for name, tensor in model.state_dict().items():
        assert loaded.state_dict()[name].shape == tensor.shape, name
    # the reference: the same weights rounded to bfloat16, as the shards hold them
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    idx = torch.randint(tok.vocab_size, (2, 12))
    assert torch.allclose(loaded(idx)[0], model(idx)[0], atol=1e-5)
    assert loaded.tok_embeddings.weight.dtype == torch.float32, "float32 on the CPU by default"
    in_bf16, _ = L.load_model(tmp_path, CPU, dtype=torch.bfloat16, context=32)
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


def test_what_cannot_be_loaded_from_a_meta_folder_is_one_line(tmp_path, capsys):
    save_small_checkpoint(tmp_path / "ckpt.pt")
    assert L.main(["sample", "--ckpt", tmp_path]) == 1
    one_line_error(capsys, f"give the checkpoint in it, --ckpt {tmp_path / 'ckpt.pt'}")
    folder = tmp_path / "meta"
    L.export_meta(tmp_path / "ckpt.pt", folder)
    (folder / "consolidated.00.pth").rename(tmp_path / "weights.pth")
    assert L.main(["sample", "--ckpt", folder]) == 1
    one_line_error(capsys, "no consolidated.00.pth")
    (tmp_path / "weights.pth").rename(folder / "consolidated.00.pth")
    tokenizer = (folder / "tokenizer.model").read_bytes()
    (folder / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\nIw== 2\n")  # tiktoken's: Llama 3
    assert L.main(["sample", "--ckpt", folder]) == 1
    one_line_error(capsys, "tiktoken")
    (folder / "tokenizer.model").write_bytes(tokenizer)
    wider = {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": -1}
    (folder / "params.json").write_text(L.json.dumps(wider))
    assert L.main(["sample", "--ckpt", folder]) == 1
    one_line_error(capsys, "do not fit")


# ----------------------------------------------------------------------------- several processes

def torchrun(nproc, *args, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(HERE / "llama.py"), *[str(a) for a in args]]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def test_two_processes_train_what_one_process_trains(trained, small_text, tmp_path, capsys):
    proc = torchrun(2, "train", *TINY, "--data", small_text, "--out", tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "2 processes, 4 sequences each of every batch of 8" in out, out
    assert "identical on all 2 processes" in out, out
    single_run = torch.load(trained / "ckpt.pt", weights_only=True)
    double_run = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    # the log's rows at full precision (log.csv rounds them): step, train loss, validation loss
    for a, b in zip(single_run["log"], double_run["log"], strict=True):
        assert a[0] == b[0], (a, b)
        assert abs(a[1] - b[1]) < 1e-5, ("train loss", a, b)
        assert abs(a[2] - b[2]) < 1e-5, ("validation loss", a, b)
    single = single_run["model"]
    double = double_run["model"]
    for name in single:
        assert torch.allclose(single[name], double[name], atol=1e-5), name
    capsys.readouterr()
    sample = ["sample", "--ckpt", tmp_path / "ckpt.pt", "--max-new-tokens", "20", "--prompt",
              "KING:"]
    assert L.main(sample) == 0
    assert capsys.readouterr().out.startswith("KING:")


def test_ctrl_c_stops_every_process_and_rank_0_saves_once(small_text, tmp_path):
    proc = torchrun(2, "train", *TINY, "--steps", "100000", "--data", small_text, "--out", tmp_path,
                    start_new_session=True)
    wait_for_line(proc, "step    20/")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    out, err = proc.communicate(timeout=120)
    assert out.count("stopped by signal") == 1 and out.count("saved") == 1, out[-1500:]
    step = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert f"after step {step}" in out and step >= 20
    resumed = torchrun(2, "train", "--resume", "--steps", str(step + 10), "--out", tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resuming {tmp_path / 'ckpt.pt'} at step {step}" in out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == step + 10
