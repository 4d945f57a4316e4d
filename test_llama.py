"""Tests for llama.py and tools/: every component against a reference written here, a known answer
or an invariant. The lesson first, then running it, then the tools.

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
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

import llama as L
from tools import ablate, bench, hf, meta, plot

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


def small_tokenizer(vocab_size=60):
    return L.train_tokenizer("To be, or not to be, that is the question:\n" * 200, vocab_size)


# ======================================================================= the lesson: components

def test_shapes_and_names_of_every_component():
    m = tiny_model(n_heads=4, n_kv_heads=2, dim=16)
    a = m.args
    B, T = 3, 5
    x = torch.randn(B, T, a.dim)
    cos, sin = rope(a.head_dim, T)  # (T, 1, head_dim/2): the same for every head
    assert cos.shape == (T, 1, a.head_dim // 2) and not cos.is_complex()
    assert L.apply_rotary_emb(torch.randn(B, T, 4, a.head_dim), cos, sin).shape == (B, T, 4, 4)
    assert m.layers[0].attention(x, cos, sin).shape == (B, T, a.dim)
    assert m.layers[0](x, cos, sin).shape == (B, T, a.dim)
    assert m.layers[0].attention.wk.weight.shape == (2 * a.head_dim, a.dim), "two key/value heads"
    # Meta's names, so that Meta's checkpoints line up; no biases, no rotary table, no cache
    per_layer = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"]
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    expected |= {f"layers.{i}.{name}.weight" for i in range(2) for name in per_layer}
    assert set(m.state_dict()) == expected, set(m.state_dict()) ^ expected
    # DistributedDataParallel broadcasts every buffer, and NCCL has no complex type
    m.setup_cache(2)
    assert {t.dtype for t in [*m.parameters(), *m.buffers()]} == {torch.float32}


def test_rmsnorm_is_its_formula_per_token_in_float32():
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
    # it divides by the RMS (the seed multiplied): the output's RMS is 1 when the gain is 1
    rms = L.RMSNorm(24)(x).pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3), rms
    # a bf16 model (an imported one): the mean of squares in float32, the result in bf16
    xb = x.to(torch.bfloat16)
    x32 = xb.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    got = L.RMSNorm(24).to(torch.bfloat16)(xb)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


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
    angles = torch.outer(torch.arange(T).float(), theta ** (-torch.arange(0, hd, 2) / hd))
    freqs = torch.polar(torch.ones(T, hd // 2), angles)
    meta_form = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * freqs[:, None])
    assert torch.allclose(out, meta_form.flatten(-2), atol=1e-6)


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
    k = torch.cat([k[:, :, [j]].expand(B, T, H // KV, hd) for j in range(KV)], dim=2)
    v = attn.wv(x).view(B, T, KV, hd)
    v = torch.cat([v[:, :, [j]].expand(B, T, H // KV, hd) for j in range(KV)], dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * hd)
    return attn.wo(y)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # multi-head, grouped-query, multi-query
def test_attention_matches_reference(n_kv_heads):
    m = tiny_model(n_heads=4, n_kv_heads=n_kv_heads, dim=32)
    x = torch.randn(2, 9, 32)
    attn = m.layers[0].attention
    got = attn(x, *rope(8, 9))
    expected = reference_attention(attn, x, *rope(8, 9))
    assert torch.allclose(got, expected, atol=1e-5), (n_kv_heads, (got - expected).abs().max())


def test_the_formula_beside_the_fused_attention_call_computes_what_it_computes(monkeypatch):
    """The comment's line, run as code on the very q, k, v and mask of a call, equals the call."""
    source = Path(L.__file__).read_text().splitlines()
    at = next(i for i, line in enumerate(source) if "# softmax(q k^T / sqrt(head_dim)" in line)
    formula = source[at + 1].strip().lstrip("# ")
    assert formula.startswith("(q @ k.transpose(2, 3)") and "fused" in source[at], formula
    assert "F.scaled_dot_product_attention(q, k, v, attn_mask=mask)" in source[at + 2]
    fused = F.scaled_dot_product_attention
    seen = []

    def spy(q, k, v, attn_mask):
        seen.append((q, k, v, attn_mask))
        return fused(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    m = tiny_model(n_heads=4, n_kv_heads=2, dim=32, max_seq_len=12)
    idx = torch.randint(50, (2, 9))
    m(idx)
    m.setup_cache(2)
    m(idx[:, :5], positions=torch.arange(5))
    m.decode_step(idx[:, 5:6], torch.tensor([5]))  # the mask hides the 6 slots not yet written
    assert len(seen) == 3 * 2
    attn = m.layers[0].attention
    for q, k, v, mask in seen:
        by_formula = eval(formula, {"math": math}, {"q": q, "k": k, "v": v, "mask": mask,
                                                     "self": attn})
        assert torch.allclose(by_formula, fused(q, k, v, attn_mask=mask), atol=1e-6)


def test_feed_forward_is_swiglu():
    ff = L.FeedForward(8, 24)
    x = torch.randn(3, 8)
    a = x @ ff.w1.weight.T
    b = x @ ff.w3.weight.T
    expected = (a * torch.sigmoid(a) * b) @ ff.w2.weight.T
    assert torch.allclose(ff(x), expected, atol=1e-6)


def test_block_is_pre_norm_residual_as_in_gpt2():
    """The docstring's claim: LLaMA, like GPT-2, normalizes each sub-layer's input; the residual
    stream itself is never normalized inside a block."""
    m = tiny_model(n_kv_heads=2, dim=32)
    block = m.layers[0]
    x = torch.randn(2, 6, 32) * 5
    cos, sin = rope(8, 6)
    h = x + block.attention(block.attention_norm(x), cos, sin)
    expected = h + block.feed_forward(block.ffn_norm(h))
    assert torch.allclose(block(x, cos, sin), expected, atol=1e-6)


def test_feed_forward_width_and_shapes_of_real_llamas():
    """Known answers: LLaMA-7B's 11008, Llama-2-70B's 28672 (grouped-query, 8 key/value heads for
    64 query heads), Llama-3-8B's 14336. At DIM 128 the rule's 341 rounds up to 512 = 4 * DIM."""
    assert L.ModelArgs().hidden_dim == 512 == 4 * L.DIM
    assert L.ModelArgs(dim=128, multiple_of=32).hidden_dim == 352, "the rule without the rounding"
    assert L.ModelArgs(dim=4096, n_heads=32, n_kv_heads=32).hidden_dim == 11008
    llama2_70b = L.ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096,
                             ffn_dim_multiplier=1.3)
    assert llama2_70b.hidden_dim == 28672 and llama2_70b.head_dim == 128
    llama3_8b = L.ModelArgs(dim=4096, n_heads=32, n_kv_heads=8, multiple_of=1024,
                            ffn_dim_multiplier=1.3)
    assert llama3_8b.hidden_dim == 14336


def test_the_documented_model_is_multi_query_and_its_cache_one_eighth():
    m = L.Transformer(L.ModelArgs())
    m.setup_cache(1)
    one = m.layers[0].attention.cache_k.numel()
    multi_head = L.Transformer(L.ModelArgs(n_kv_heads=L.HEADS))
    multi_head.setup_cache(1)
    assert L.KV_HEADS == 1 and multi_head.layers[0].attention.cache_k.numel() == 8 * one


def test_model_args_refuse_bad_shapes():
    for kwargs, words in [({"dim": 30, "n_heads": 4}, "dim 30 is not divisible by n_heads 4"),
                          ({"n_heads": 8, "n_kv_heads": 3}, "not divisible by n_kv_heads 3"),
                          ({"dim": 24, "n_heads": 8}, "24 / 8 is odd")]:
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
    m.train()
    L.evaluate(m, idx, idx, 1)
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
        # a prompt, then several tokens after it, then one token at a time
        steps = [m(idx[:, :4], positions=torch.arange(4))[0],
                 m(idx[:, 4:7], positions=torch.arange(4, 7))[0]]
        for p in range(7, 14):
            steps.append(m.decode_step(idx[:, p:p + 1], torch.tensor([p]))[:, None])
    assert m.layers[0].attention.cache_k.data_ptr() == address, "the cache was reallocated"
    cached = torch.cat(steps, dim=1)
    assert torch.allclose(cached, full, atol=1e-5), (cached - full).abs().max()
    prompt = idx[:, :4]
    greedy = m.generate(prompt, 10, temperature=0, use_cache=True)
    recomputed = m.generate(prompt, 10, temperature=0, use_cache=False)
    assert torch.equal(greedy, recomputed), (greedy, recomputed)


def test_generation_past_the_window_refills_as_documented():
    m = tiny_model(n_kv_heads=1, max_seq_len=8)
    prompt = torch.randint(50, (2, 11))  # longer than the window: only its last 8 tokens are seen
    cached = m.generate(prompt, 30, temperature=0, use_cache=True)
    assert cached.shape == (2, 41) and torch.equal(cached[:, :11], prompt)
    assert torch.equal(cached, m.generate(prompt, 30, temperature=0, use_cache=False))
    # the reference: when the window is full, it restarts from its most recent half
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


def test_compiled_decoding_and_training_equal_eager():
    """What --compile captures: the decode step, and a training step, through the compiler's
    graphs (backend aot_eager: the graphs, run without generating code; tools/bench.py runs the
    full compiler and checks its tokens too)."""
    m = tiny_model(n_kv_heads=2, dim=32, max_seq_len=10)
    prompt = torch.randint(50, (1, 3))
    eager = m.generate(prompt, 12, temperature=0)
    L.compile_decoding(m)
    assert m.decode_step is not L.Transformer.decode_step
    del m.decode_step  # the eager step is back
    assert m.decode_step.__func__ is L.Transformer.decode_step
    m.decode_step = torch.compile(m.decode_step, backend="aot_eager", fullgraph=True)
    losses = []
    try:
        assert torch.equal(m.generate(prompt, 12, temperature=0), eager)
        for compiled in (False, True):
            model = tiny_model(n_kv_heads=2, dim=32).train()
            optimizer = L.make_optimizer(model, 1e-2, 0.1, CPU)
            run = torch.compile(model, backend="aot_eager") if compiled else model
            x = torch.randint(50, (4, 10))
            losses.append([L.train_step(run, optimizer, x, x.roll(-1, 1), 1e-2) for _ in range(3)])
    finally:
        torch._dynamo.reset()
    assert torch.allclose(torch.stack(losses[0]), torch.stack(losses[1]), atol=1e-5), losses


def test_sampling_rules():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)

    def draws(**kw):
        return {L.sample_next(logits, generator=g, **kw).item() for _ in range(300)}

    assert L.sample_next(logits, temperature=0).item() == 0
    assert draws(top_k=1) == {0}
    assert draws(top_k=2) == {0, 1}
    assert draws() == {0, 1, 2, 3}
    counts = torch.bincount(torch.stack([L.sample_next(logits, 2.0, generator=g)
                                         for _ in range(4000)]).flatten(), minlength=4)
    flatter = torch.softmax(logits[0] / 2.0, -1)
    assert torch.allclose(counts / 4000, flatter, atol=0.03), (counts / 4000, flatter)


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


def test_adamw_second_moment_averages_over_about_100_steps():
    """The comment's claim on beta2 = 0.99: a gradient's weight in AdamW's second moment falls
    by e after about 100 steps (with LLaMA's 0.95, after about 20)."""
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = L.make_optimizer(torch.nn.ModuleDict({"w": torch.nn.Linear(2, 2)}), 0.0, 0.0, CPU)
    optimizer.param_groups[0]["params"] = [weight]
    for step in range(101):
        weight.grad = torch.ones(2, 2) if step == 0 else torch.zeros(2, 2)
        optimizer.step()
    first = 1 - optimizer.param_groups[0]["betas"][1]  # the impulse's weight after one step
    left = optimizer.state[weight]["exp_avg_sq"][0, 0].item() / first
    assert math.exp(-1.02) < left < math.exp(-0.98), left


def test_windows_cover_every_token_once_and_batches_shift_by_one():
    data = torch.arange(23)
    x, y = L.windows(data, 5)
    assert x.shape == y.shape == (5, 5)
    assert sorted(y[y != -100].tolist()) == list(range(1, 23))
    assert torch.equal(x.flatten()[:22] + 1, y.flatten()[:22])
    x, y = L.get_batch(data, 6, 4)
    assert x.shape == (6, 4) and torch.equal(x + 1, y) and y.max() <= 22


def test_one_name_for_the_constant_the_flag_and_the_field():
    cfg = L.TrainConfig()
    documented = {"steps": L.EPOCHS, "batch_size": L.BATCH_SIZE, "context": L.CONTEXT_WINDOW,
                  "dim": L.DIM, "heads": L.HEADS, "layers": L.LAYERS, "vocab_size": L.VOCAB_SIZE,
                  "log_interval": L.LOG_INTERVAL}
    assert {name: getattr(cfg, name) for name in documented} == documented
    train = L.build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {a.dest for a in train._actions} - {"help", "out", "resume", "overwrite", "device",
                                                "compile"}
    assert flags == {f.name for f in fields(L.TrainConfig)}, "a flag for each field, no other"
    args = vars(train.parse_args(["--batch-size", "7", "--kv-heads", "2"]))
    given = {name: args[name] for name in flags if name in args}
    assert given == {"batch_size": 7, "kv_heads": 2}, "only the flags given, to tell from defaults"
    assert L.TrainConfig(**given) == replace(cfg, batch_size=7, kv_heads=2)


@needs_input
def test_tokenizer_round_trips_all_of_input_and_is_reproducible():
    text = INPUT.read_text(encoding="utf-8")
    train_text = L.split_text(text)["train"]
    tok = L.train_tokenizer(train_text, 130)
    assert tok.vocab_size() == 130 and tok.bos_id() == -1
    ids = tok.encode(text)
    assert tok.decode(ids) == text, "decode(encode(text)) differs"
    assert text.count("\n") == 40000 and tok.decode(ids).count("\n") == 40000
    assert tok.decode(tok.encode("a  b\n\n   c")) == "a  b\n\n   c"
    again = L.train_tokenizer(train_text, 130)
    assert again.serialized_model_proto() == tok.serialized_model_proto()


def test_tokenizer_does_what_its_comment_says_with_what_it_cannot_keep(tmp_path):
    """"▁" comes back as a space and NUL as " ⁇ "; "\r\n" is read as "\n"; lines over
    SentencePiece's 4192 bytes are learned from; a vocabulary too large for the text is refused."""
    (tmp_path / "crlf.txt").write_bytes(b"To be,\r\nor not\rto be\x00\n" * 50)
    text = L.get_text(tmp_path / "crlf.txt")
    assert text == "To be,\nor not\nto be\x00\n" * 50
    tok = L.train_tokenizer(text + "a▁b\n", 24)
    assert tok.decode(tok.encode("be▁or")) == "be or"
    assert tok.decode(tok.encode("be\x00")) == "be ⁇ ", "no piece for NUL"
    one_line = "To be or not to be, that is the question. " * 200  # 8,600 bytes
    long_tok = L.train_tokenizer(one_line, 30)
    assert long_tok.vocab_size() == 30 and long_tok.decode(long_tok.encode(one_line)) == one_line
    with pytest.raises(ValueError, match="--vocab-size 5000 does not fit this text"):
        L.train_tokenizer(one_line, 5000)


# ======================================================================= running it: end to end

def test_train_eval_sample_end_to_end(trained, small_text, capsys):
    assert sorted(os.listdir(trained)) == ["ckpt.pt", "log.csv"], "only the run's two files"
    rows = (trained / "log.csv").read_text().splitlines()
    assert rows[0] == "step,train_loss,val_loss,lr" and len(rows) == 4, rows
    first_val = float(rows[1].split(",")[2])
    last_val = float(rows[-1].split(",")[2])
    assert last_val < first_val < math.log(130), (first_val, last_val)
    ckpt = L.load_checkpoint(trained / "ckpt.pt")
    assert ckpt["step"] == 30 and ckpt["config"].keys() == {f.name for f in fields(L.TrainConfig)}
    assert L.main(["eval", "--ckpt", trained / "ckpt.pt", "--data", small_text]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "87.7" in table and "test" in table
    args = ["sample", "--ckpt", trained / "ckpt.pt", "--max-new-tokens", "40", "--prompt", "KING:"]
    assert L.main(args + ["--seed", "1"]) == 0
    one = capsys.readouterr().out
    assert L.main(args + ["--seed", "1"]) == 0
    assert capsys.readouterr().out == one and one.startswith("KING:"), "same seed, same sample"
    assert L.main(args + ["--seed", "2", "--top-k", "5"]) == 0
    assert capsys.readouterr().out != one


def test_the_report_counts_bits_per_character_by_hand(trained, small_text):
    model, tok = L.load_model(trained / "ckpt.pt", CPU)
    splits = L.split_text(small_text.read_text())
    data = L.encode_splits(splits, tok, 8)
    results = L.report(model, tok, data, 8)
    x, y = L.windows(data["val"], 8)
    logits, _ = model(x)
    nats = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    first_piece = tok.id_to_piece(int(data["val"][0])).replace("▁", " ")
    chars = len(splits["val"]) - len(first_piece)  # every character but the first token's
    assert results["val"]["bpc"] == pytest.approx(nats / chars / math.log(2), rel=1e-5)
    assert results["val"]["perplexity"] == pytest.approx(math.exp(nats / (y != -100).sum()))


def test_same_seed_same_run(trained, small_text, tmp_path):
    assert L.main(["train", *TINY, "--data", small_text, "--out", tmp_path]) == 0
    assert (tmp_path / "log.csv").read_text() == (trained / "log.csv").read_text()
    first = L.load_checkpoint(trained / "ckpt.pt")["model"]
    second = L.load_checkpoint(tmp_path / "ckpt.pt")["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)


@needs_input
def test_documented_settings_learn_more_than_token_frequencies(tmp_path, capsys):
    """200 of the documented run's 1000 steps, evaluated on every validation token: well past the
    original README's 87.3, which a model of token frequencies alone gets."""
    result = L.train(replace(L.TrainConfig(), steps=200, log_interval=100), out=tmp_path)
    assert result[0].args == L.ModelArgs() and sum(p.numel() for p in result[0].parameters()) == 968_320
    val = L.report(*result, L.CONTEXT_WINDOW)["val"]
    assert val["perplexity"] < 30 and val["accuracy"] > 0.2, val


def test_greedy_sample_is_the_models_argmax(trained):
    model, tok = L.load_model(trained / "ckpt.pt", CPU)
    ids = tok.encode("ROMEO:")
    n = model.args.max_seq_len - len(ids)  # stay inside the window: plain greedy decoding
    text = L.sample(model, tok, "ROMEO:", max_new_tokens=n, temperature=0)
    for _ in range(n):  # greedy by hand, recomputing everything at each step
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert text == tok.decode(ids) and n > 0


def llama_like_tokenizer():
    """A tokenizer made as Llama's: a beginning-of-text id, a space added before the text, and
    bytes for the characters it has no piece for."""
    model_file = io.BytesIO()
    lines = ["To be, or not to be, that is the question: whether 'tis nobler in the mind\n"] * 200
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), vocab_size=300, model_type="bpe",
                                   model_writer=model_file, byte_fallback=True, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model_file.getvalue())


def test_streaming_prints_llamas_spaces_and_whole_characters(capsys):
    tok = llama_like_tokenizer()
    prompt = [tok.bos_id()] + tok.encode("To be")
    new = tok.encode(" or not, é€ the question") * 20  # é and € are bytes: 2 and 3 pieces
    assert tok.bos_id() == 1 and sum(tok.is_byte(i) for i in new) == 20 * 5
    pieces = "".join(tok.decode([i]) for i in new)
    assert " or" not in pieces and "\ufffd" in pieces, "decoded alone, pieces lose their spaces"
    stream = L.TextStream(tok, prompt)
    for i in new:
        stream(torch.tensor([[i]]))
    printed = capsys.readouterr().out
    assert printed == tok.decode(prompt + new)[len("To be"):], printed
    assert "\ufffd" not in printed and printed.startswith(" or not, é€ the question or")


def test_a_beginning_of_text_id_starts_the_prompt(capsys):
    """Llama's tokenizer has one; Meta's generation puts it first, and so does sample()."""
    tok = llama_like_tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size(), max_seq_len=32)
    text = L.sample(model, tok, "To be", max_new_tokens=6, temperature=0)
    ids = [tok.bos_id()] + tok.encode("To be")
    for _ in range(6):
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert text == tok.decode(ids) and capsys.readouterr().out == text + "\n"


# ======================================================================= running it: mistakes

def test_user_errors_are_one_line(trained, tmp_path, small_text, capsys):
    (tmp_path / "file").write_text("x")
    ckpt = trained / "ckpt.pt"
    for args, words in [(["eval", "--ckpt", tmp_path / "none.pt"], "no checkpoint at"),
                        (["sample", "--ckpt", tmp_path / "none.pt"], "`python llama.py train`"),
                        (["train", "--resume", "--out", tmp_path / "none"], "no checkpoint at"),
                        (["sample", "--ckpt", ckpt, "--prompt", ""], "the prompt is empty"),
                        (["sample", "--ckpt", ckpt, "--device", "gpu"], "no such device"),
                        (["sample", "--ckpt", ckpt, "--device", "cuda:x"], "no such device"),
                        (["train", "--dim", "30", "--heads", "4", "--data", small_text, "--out",
                          tmp_path / "a"], "dim 30 is not divisible by n_heads 4"),
                        (["train", "--kv-heads", "3", "--data", small_text, "--out", tmp_path / "b"],
                         "not divisible by n_kv_heads"),
                        (["train", "--vocab-size", "20", "--data", small_text, "--out",
                          tmp_path / "v"], "--vocab-size 20 does not fit this text"),
                        (["train", *TINY, "--data", small_text, "--out", tmp_path / "file"],
                         "File exists")]:
        assert L.main(args) == 1, args
        one_line_error(capsys, words)


def test_numbers_out_of_range_are_argparse_usage_errors(capsys):
    for args, words in [(["train", "--steps", "0"], "--steps: must be at least 1, got 0"),
                        (["train", "--steps", "abc"], "invalid int value: 'abc'"),
                        (["train", "--lr", "nan"], "--lr: must be at least 0, got nan"),
                        (["train", "--lr", "inf"], "--lr: must be at least 0, got inf"),
                        (["train", "--dropout", "2"], "--dropout: must be from 0 to 1, got 2"),
                        (["train", "--warmup", "-5"], "--warmup: must be at least 0"),
                        (["train", "--resume", "--overwrite"], "not allowed with argument"),
                        (["sample", "--temperature", "-1"], "--temperature: must be at least 0"),
                        (["sample", "--top-k", "0"], "--top-k: must be at least 1"),
                        (["eval", "--compile"], "unrecognized arguments: --compile"),
                        ([], "required: command")]:
        assert L.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("usage: llama.py") and words in err and len(err.splitlines()) == 2, err


def test_help_returns_instead_of_exiting(capsys):
    assert L.main(["--help"]) == 0, "no SystemExit, so that a notebook cell just prints it"
    out = capsys.readouterr().out
    assert all(f"    {c} " in out for c in ("train", "sample", "eval")), out
    assert L.main(["train", "--help"]) == 0
    assert "(EPOCHS); 1000" in capsys.readouterr().out


def test_bad_texts_say_what_they_are(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("To be, or not to be\n" * 3)
    (tmp_path / "folder").mkdir()
    for name, words in [("latin1.txt", "is not UTF-8 text (byte 3)"), ("empty.txt", "is empty"),
                        ("missing.txt", "No such file or directory"),
                        ("folder", "Is a directory"),
                        ("short.txt", "--vocab-size 130 does not fit this text")]:
        assert L.main(["train", "--data", tmp_path / name, "--out", tmp_path / "o"]) == 1
        one_line_error(capsys, words)
    assert L.main(["train", "--data", tmp_path / "short.txt", "--vocab-size", "20", "--context",
                   "16", "--out", tmp_path / "o"]) == 1
    one_line_error(capsys, "too short: its val split is 5 tokens, a window 17")
    assert not (tmp_path / "o").exists(), "a refused run makes no folder"


def test_out_of_memory_is_one_line(small_text, tmp_path, capsys):
    too_wide = ["--dim", str(2**26), "--heads", "2", "--layers", "1", "--data", small_text, "--out",
                tmp_path]
    assert L.main(["train", *too_wide, "--steps", "1"]) == 1
    one_line_error(capsys, "out of memory: try a smaller --batch-size, --context or model")


HAS_GPU = torch.cuda.is_available() or torch.backends.mps.is_available()


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_a_device_that_is_not_there_is_one_line(trained, capsys):
    for device in ("cuda", "mps", "cuda:1"):
        assert L.main(["sample", "--ckpt", trained / "ckpt.pt", "--device", device]) == 1
        one_line_error(capsys, "PyTorch sees no such device here, only {'cuda': 0")
    assert L.pick_device("auto") == CPU and L.pick_device("cpu") == CPU


def test_a_diverging_run_is_one_line_and_saves_nothing(run_copy, small_text, capsys):
    """The learner's --lr 100: the run stops at the first log line, its folder as it was."""
    before = {name: (run_copy / name).read_bytes() for name in ("ckpt.pt", "log.csv")}
    diverging = ["train", *TINY, "--lr", "100", "--overwrite", "--data", small_text, "--out",
                 run_copy]
    assert L.main(diverging) == 1
    one_line_error(capsys, "the run diverged by step 10")
    assert L.main(diverging + ["--save-every", "5", "--log-interval", "7"]) == 1
    one_line_error(capsys, "the run diverged by step")
    assert {name: (run_copy / name).read_bytes() for name in before} == before
    # the class: any loss whose exp, the perplexity the report prints, would overflow
    L.check_diverged(1, 2.5, 709.7)
    for loss in (709.8, float("inf"), float("nan"), -float("inf")):
        with pytest.raises(FloatingPointError, match="try a lower --lr"):
            L.check_diverged(1, 2.5, loss)


# ======================================================================= running it: saving

def test_a_finished_run_is_never_replaced_silently(run_copy, small_text, tmp_path, capsys):
    before = (run_copy / "ckpt.pt").read_bytes()
    assert L.main(["train", *TINY, "--data", small_text, "--out", run_copy]) == 1
    one_line_error(capsys, "ckpt.pt holds a run: continue it with --resume, replace it with")
    assert (run_copy / "ckpt.pt").read_bytes() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "log.csv").write_text("the user's own log\n")
    assert L.main(["train", *TINY, "--data", small_text, "--out", tmp_path / "mine"]) == 1
    one_line_error(capsys, "log.csv holds a run")
    assert (tmp_path / "mine" / "log.csv").read_text() == "the user's own log\n"
    assert L.main(["train", *TINY, "--data", small_text, "--out", run_copy, "--overwrite",
                   "--seed", "7"]) == 0
    assert (run_copy / "ckpt.pt").read_bytes() != before
    assert L.load_checkpoint(run_copy / "ckpt.pt")["step"] == 30


def test_atomic_write_keeps_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    (tmp_path / "notes.tmp").write_bytes(b"the user's own")

    def crash(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        L.atomic_write(path, crash)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "notes.tmp"], os.listdir(tmp_path)


def test_a_full_disk_at_save_keeps_the_previous_checkpoint_and_log(run_copy):
    """A real file size limit (ulimit -f, in 1024-byte blocks) makes the save fail half-way."""
    before = {name: (run_copy / name).read_bytes() for name in ("ckpt.pt", "log.csv")}
    command = " ".join(llama_command("train", "--resume", "--steps", "35", "--out", run_copy))
    done = subprocess.run(["bash", "-c", f"ulimit -f 200; exec {command}"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "File too large" in done.stderr, done.stderr[-500:]
    assert {name: (run_copy / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(run_copy)) == ["ckpt.pt", "log.csv"], os.listdir(run_copy)


def test_resume_extends_a_run_and_refuses_what_cannot_change(run_copy, small_text, capsys):
    resume = ["train", "--resume", "--out", run_copy]
    for extra, words in [([], "has trained 30 steps: give --steps N"),
                         (["--steps", "20"], "has trained 30 steps"),
                         (["--dim", "64", "--steps", "40"], "--dim cannot change when resuming"),
                         (["--lr", "0.01", "--steps", "40"], "--lr cannot change")]:
        assert L.main(resume + extra) == 1
        one_line_error(capsys, words)
    assert L.main(resume + ["--steps", "40", "--dim", "32", "--save-every", "5"]) == 0
    ckpt = L.load_checkpoint(run_copy / "ckpt.pt")
    assert ckpt["step"] == 40 and ckpt["config"]["steps"] == 40 and ckpt["config"]["save_every"] == 5
    rows = (run_copy / "log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [10, 20, 30, 40], rows
    # the schedule continued over the new total: the last step's learning rate is the new one's
    extended = L.TrainConfig(lr=3e-3, warmup=5, steps=40)
    assert float(rows[-1].split(",")[3]) == pytest.approx(L.lr_at(39, extended), rel=1e-4)


def test_a_run_killed_between_log_lines_resumes_to_the_uninterrupted_run(tmp_path, small_text):
    """SIGKILL gives no chance to save: what is on disk comes from --save-every alone, saved
    between log lines. With --dropout on, the resumed run ends with the weights and the log of
    the uninterrupted one. The losses since the last log line are saved as a number, with no
    device to disagree with a GPU's when the run resumes. Files not ours stay as they were."""
    args = llama_command("train", *TINY, "--steps", "60", "--log-interval", "25", "--dropout",
                         "0.1", "--data", small_text)
    whole = subprocess.Popen(args + ["--out", tmp_path / "a"], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.tmp").write_text("the user's own")
    proc = subprocess.Popen(args + ["--save-every", "13", "--out", tmp_path / "b"], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    try:
        wait_for_line(proc, "step    25/60")
    finally:
        proc.kill()
        proc.wait()
    saved = L.load_checkpoint(tmp_path / "b" / "ckpt.pt")  # whole, even if killed mid-save
    assert saved["step"] in (13, 26, 39, 52), saved["step"]
    assert type(saved["loss_sum"]) is float and saved["loss_sum"] > 0, saved["loss_sum"]
    resumed = subprocess.run(llama_command("train", "--resume", "--out", tmp_path / "b"), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0 and whole.wait(timeout=120) == 0, resumed.stderr
    a = L.load_checkpoint(tmp_path / "a" / "ckpt.pt")
    b = L.load_checkpoint(tmp_path / "b" / "ckpt.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k}: resumed at {saved['step']}"
    assert (tmp_path / "a" / "log.csv").read_text() == (tmp_path / "b" / "log.csv").read_text()
    assert (tmp_path / "b" / "notes.tmp").read_text() == "the user's own"


def test_sigterm_and_a_closed_terminal_save_the_run(tmp_path, small_text):
    procs = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        procs[signum] = subprocess.Popen(
            llama_command("train", *TINY, "--steps", "100000", "--data", small_text, "--out",
                          tmp_path / signum.name), env=ENV, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
    for signum, proc in procs.items():
        wait_for_line(proc, "step    10/")
        proc.send_signal(signum)
    for signum, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        step = L.load_checkpoint(tmp_path / signum.name / "ckpt.pt")["step"]
        assert proc.returncode == 130 and f"stopped after step {step}; saved" in err, err
        assert step >= 10 and "Traceback" not in err


def test_ctrl_c_outside_the_training_loop_is_one_line(trained, capsys):
    # Python's own Ctrl-C handler, even where the tests run with SIGINT ignored (`nohup ... &`)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        assert L.main(["sample", "--ckpt", trained / "ckpt.pt", "--max-new-tokens", "1000000"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_closed_pipe_ends_sample_quietly(trained):
    sample = llama_command("sample", "--ckpt", trained / "ckpt.pt", "--max-new-tokens", "3000")
    done = subprocess.run(["bash", "-c", f"{' '.join(sample)} | head -c 50"], env=ENV,
                          capture_output=True, timeout=120)
    assert len(done.stdout) == 50 and done.stderr == b"", done.stderr


def test_a_checkpoint_never_runs_code_and_an_edited_one_never_loads_wrong(tmp_path, trained):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        L.load_model(tmp_path / "evil.pt", CPU)
    assert not marker.exists(), "pickled code ran"
    ckpt = L.load_checkpoint(trained / "ckpt.pt")
    ckpt["model_args"]["n_layers"] = 1  # a hand edit that disagrees with the weights
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        L.load_model(tmp_path / "edited.pt", CPU)


# ======================================================================= running it: download

class Handler(http.server.BaseHTTPRequestHandler):
    body = b"To be, or not to be\n" * 100

    def do_GET(self):
        if self.path == "/missing":
            self.send_error(404)
            return
        if self.path == "/slow":
            time.sleep(2)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_writes_the_file_whole_or_nothing(tmp_path, server):
    sha = hashlib.sha256(Handler.body).hexdigest()
    L.download(f"{server}/ok", tmp_path / "input.txt", sha)
    assert (tmp_path / "input.txt").read_bytes() == Handler.body
    assert os.listdir(tmp_path) == ["input.txt"]
    for path, sha_given, words in [("ok", "0" * 64, "2,000 bytes, not the file"),
                                   ("missing", sha, "404"), ("slow", sha, "timed out")]:
        started = time.monotonic()
        with pytest.raises(OSError, match=words) as e:
            L.download(f"{server}/{path}", tmp_path / "other.txt", sha_given, timeout=0.5)
        assert time.monotonic() - started < 5 and "fetch it by hand into" in str(e.value)
        assert os.listdir(tmp_path) == ["input.txt"], os.listdir(tmp_path)


def test_a_missing_input_txt_is_downloaded_and_an_existing_one_never_touched(tmp_path, server,
                                                                           monkeypatch):
    monkeypatch.setattr(L, "DATA_URL", f"{server}/ok")
    monkeypatch.setattr(L, "DATA_SHA256", hashlib.sha256(Handler.body).hexdigest())
    monkeypatch.setattr(L, "DATA_PATH", tmp_path / "input.txt")
    assert L.get_text() == Handler.body.decode()
    (tmp_path / "input.txt").write_text("the user's own text\n")
    assert L.get_text() == "the user's own text\n"
    assert (tmp_path / "input.txt").read_text() == "the user's own text\n"


# ======================================================================= running it: notebooks

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
             "print('mistake rc', main(['sample', '--ckpt', 'nowhere.pt']))",
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
    assert "mistake rc 1" in mistake and "no checkpoint at nowhere.pt" in mistake, mistake
    assert ran.startswith("QUEEN:"), ran


# ======================================================================= running it: torchrun

def torchrun(nproc, *args, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(HERE / "llama.py"), *[str(a) for a in args]]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def test_two_processes_train_what_one_process_trains(trained, small_text, tmp_path):
    # every process checks the folder and refuses alike: none is left waiting for another (the
    # first to refuse may end the run before the other has printed its own line)
    refused = torchrun(2, "train", *TINY, "--data", small_text, "--out", trained)
    out, err = refused.communicate(timeout=120)
    errors = [line for line in err.splitlines() if "error: " in line]
    assert refused.returncode != 0 and errors and all("holds a run" in e for e in errors), err
    proc = torchrun(2, "train", *TINY, "--data", small_text, "--out", tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "cpu x 2" in out and out.count("saved") == 1 and out.count("test ") == 1, out
    single_run = L.load_checkpoint(trained / "ckpt.pt")
    double_run = L.load_checkpoint(tmp_path / "ckpt.pt")
    # the log's rows at full precision (log.csv rounds them): step, train loss, validation loss
    for a, b in zip(single_run["log"], double_run["log"], strict=True):
        assert a[0] == b[0] and abs(a[1] - b[1]) < 1e-5 and abs(a[2] - b[2]) < 1e-5, (a, b)
    for name, weight in single_run["model"].items():
        assert torch.allclose(weight, double_run["model"][name], atol=1e-5), name


def test_ctrl_c_stops_every_process_and_rank_0_saves_once(small_text, tmp_path):
    proc = torchrun(2, "train", *TINY, "--steps", "100000", "--data", small_text, "--out", tmp_path,
                    start_new_session=True)
    wait_for_line(proc, "step    10/")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    out, err = proc.communicate(timeout=120)
    assert err.count("stopped after step") == 1, err[-1500:]
    step = L.load_checkpoint(tmp_path / "ckpt.pt")["step"]
    assert f"stopped after step {step}" in err and step >= 10


# ======================================================================= the README

def test_the_code_the_readme_quotes_is_llama_pys_own():
    """Every line of a ```python block quoted from llama.py (indented, as cut from a function)
    is a line of the file, in the file's order."""
    readme = (HERE / "README.md").read_text()
    source = [line.rstrip() for line in (HERE / "llama.py").read_text().splitlines()]
    quoted = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if b.startswith(" ")]
    assert quoted, "the README quotes the training loop"
    for block in quoted:
        at = 0
        for line in block.rstrip().splitlines():
            if line.strip() in ("", "..."):
                continue
            assert line.rstrip() in source[at:], f"not in llama.py (after line {at}): {line}"
            at = source.index(line.rstrip(), at) + 1


def test_the_readmes_line_ranges_are_the_files_sections():
    readme = (HERE / "README.md").read_text()
    source = (HERE / "llama.py").read_text().splitlines()
    rows = re.findall(r"^\| (\d+)-(\d+) \| ([A-Z][a-z ]+) \|", readme, re.M)
    assert len(rows) == 9, rows  # every section but the docstring's
    for first, last, title in rows:
        first, last = int(first), int(last)
        assert source[first - 1].startswith("# ---") and source[first] == f"# {title}", title
        assert last == len(source) or source[last].startswith("# ---"), (title, last)


def test_the_readme_names_nothing_outside_the_project():
    readme = (HERE / "README.md").read_text()
    assert "../" not in readme and "/work/" not in readme


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


def test_every_tool_runs_from_the_project_root_with_its_help():
    procs = {tool: subprocess.Popen(llama_command("--help", script=f"tools/{tool}.py"), cwd=HERE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=ENV)
             for tool in ("bench", "meta", "plot", "ablate", "hf")}
    for tool, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and f"usage: tools/{tool}.py" in out, (tool, err)


# ======================================================================= tools/meta.py

def test_meta_export_then_import_gives_the_same_model_and_table(trained, small_text, tmp_path,
                                                                capsys):
    folder = tmp_path / "meta"
    assert L.main(["export", "--ckpt", trained / "ckpt.pt", "--out", folder],
                  meta.build_parser()) == 0
    assert sorted(os.listdir(folder)) == sorted(meta.FILES)
    params = json.loads((folder / "params.json").read_text())
    assert list(params) == list(meta.PARAMS) and params["n_kv_heads"] == 2
    assert params["ffn_dim_multiplier"] is None, "Meta's way of saying none"
    imported = tmp_path / "imported"
    assert L.main(["import", folder, "--out", imported, "--context", "8"], meta.build_parser()) == 0
    ours, tok = L.load_model(trained / "ckpt.pt", CPU)
    theirs, tok2 = L.load_model(imported / "ckpt.pt", CPU)
    idx = torch.randint(tok.vocab_size(), (2, 8))
    assert torch.equal(ours(idx)[0], theirs(idx)[0])
    assert tok2.serialized_model_proto() == tok.serialized_model_proto()
    capsys.readouterr()
    assert L.main(["eval", "--ckpt", imported / "ckpt.pt", "--data", small_text]) == 0
    assert L.main(["eval", "--ckpt", trained / "ckpt.pt", "--data", small_text]) == 0
    tables = capsys.readouterr().out.split("split ")
    assert len(tables) == 3 and tables[1] == tables[2], "the same table from both"
    assert L.main(["train", "--resume", "--steps", "40", "--out", imported]) == 1
    one_line_error(capsys, "holds a model but no training run")
    # an export over an earlier one replaces it; a folder holding other files is refused
    (folder / "notes.txt").write_text("mine")
    assert L.main(["export", "--ckpt", trained / "ckpt.pt", "--out", folder],
                  meta.build_parser()) == 1
    one_line_error(capsys, "holds files other than an export's")
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_failed_export_leaves_the_earlier_one_whole(trained, tmp_path):
    folder = tmp_path / "meta"
    export = ["export", "--ckpt", trained / "ckpt.pt", "--out", folder]
    assert L.main(export, meta.build_parser()) == 0
    before = {name: (folder / name).read_bytes() for name in meta.FILES}
    command = " ".join(llama_command(*export, script="tools/meta.py"))
    done = subprocess.run(["bash", "-c", f"ulimit -f 60; exec {command}"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "File too large" in done.stderr, done.stderr[-500:]
    assert {name: (folder / name).read_bytes() for name in meta.FILES} == before
    assert sorted(os.listdir(tmp_path)) == ["meta"], "no half-written folder beside it"


def meta_shards(model, n):
    """Split a state dict as Meta's model parallelism does (the layers of its llama/model.py):
    ParallelEmbedding, wo and w2 (RowParallelLinear) along dimension 1, the other matrices along
    dimension 0 (ColumnParallelLinear), bfloat16 as Meta's files hold them."""
    shards = [{"rope.freqs": torch.randn(4)} for _ in range(n)]  # in Meta's files, unused
    for name, tensor in model.state_dict().items():
        tensor = tensor.to(torch.bfloat16)
        if tensor.dim() == 1:
            parts = [tensor] * n
        elif name.endswith(("tok_embeddings.weight", "wo.weight", "w2.weight")):
            parts = tensor.chunk(n, dim=1)
        else:
            parts = tensor.chunk(n, dim=0)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def test_a_hand_built_meta_folder_imports_to_the_model_it_came_from(tmp_path, capsys):
    """Llama-2-70B's shape, scaled down: grouped-query heads, ffn_dim_multiplier, vocab_size -1,
    two bfloat16 shards."""
    tok = small_tokenizer(60)
    args = L.ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=60, multiple_of=32,
                       ffn_dim_multiplier=1.3, max_seq_len=32)
    torch.manual_seed(0)
    model = L.Transformer(args).eval()
    folder = tmp_path / "meta"
    folder.mkdir()
    for i, shard in enumerate(meta_shards(model, 2)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    params = {"dim": 64, "multiple_of": 32, "ffn_dim_multiplier": 1.3, "n_heads": 8,
              "n_kv_heads": 2, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(tok.serialized_model_proto())
    assert L.main(["import", folder, "--out", tmp_path / "in", "--context", "32"],
                  meta.build_parser()) == 0
    ckpt = L.load_checkpoint(tmp_path / "in" / "ckpt.pt")
    assert {w.dtype for w in ckpt["model"].values()} == {torch.bfloat16}, "bf16 stays bf16"
    assert "rope.freqs" not in ckpt["model"] and ckpt["model_args"]["vocab_size"] == 60
    loaded, _ = L.load_model(tmp_path / "in" / "ckpt.pt", CPU)
    assert loaded.args == args and loaded.args.hidden_dim == 224
    assert loaded.output.weight.dtype == torch.float32, "float32 on the CPU"
    with torch.no_grad():  # the reference: the same weights rounded to bf16, as the shards hold
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    idx = torch.randint(60, (2, 12))
    assert torch.allclose(loaded(idx)[0], model(idx)[0], atol=1e-5)
    (folder / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\nIw== 2\n")  # tiktoken's: Llama 3
    assert L.main(["import", folder, "--out", tmp_path / "in3"], meta.build_parser()) == 1
    one_line_error(capsys, "tiktoken")
    (folder / "tokenizer.model").unlink()
    assert L.main(["import", folder, "--out", tmp_path / "in3"], meta.build_parser()) == 1
    one_line_error(capsys, "has no tokenizer.model")


# ======================================================================= tools/plot.py

def test_plot_draws_the_log_or_says_what_is_missing(trained, tmp_path, capsys):
    png = tmp_path / "loss.png"
    status = L.main(["--log", trained / "log.csv", "--png", png], plot.build_parser())
    if importlib.util.find_spec("matplotlib") is None:
        assert status == 1
        one_line_error(capsys, "needs matplotlib")
        return
    assert status == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.csv").write_text("step,train_loss,val_loss,lr\n")  # stopped before a row
    assert L.main(["--log", tmp_path / "empty.csv"], plot.build_parser()) == 1
    one_line_error(capsys, "has no rows yet")


# ======================================================================= tools/ablate.py

def test_each_variant_swaps_what_it_says_and_counts_its_parameters():
    args = L.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=60, max_seq_len=16)
    dim = 32
    hidden = args.hidden_dim  # 256: LLaMA's rule rounds 2/3 * 4 * 32 up to a multiple of 256
    kv = args.n_kv_heads * args.head_dim
    per_layer = 2 * dim * dim + 2 * dim * kv + 3 * dim * hidden + 2 * dim
    base = 2 * 60 * dim + 2 * per_layer + dim
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
    for name in ("learned-positions", "no-positions", "gpt-2"):
        x = torch.randn(1, 16, 4, 8)
        m = models[name]
        assert torch.equal(L.apply_rotary_emb(x, m.freqs_cos, m.freqs_sin), x), "no rotation"
    assert models["tied-embeddings"].output.weight is models["tied-embeddings"].tok_embeddings.weight
    assert ablate.kv_cache_bytes_per_token(models["multi-head"]) == 2 * 2 * 4 * 8 * 4
    torch.manual_seed(0)  # the baseline is llama.py's model for the seed, untouched
    plain = L.Transformer(args)
    assert type(models["llama"]) is L.Transformer
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 models["llama"].state_dict().values()))


def test_the_ablations_baseline_run_is_llama_pys_run_and_the_table_is_whole(small_text, tmp_path,
                                                                           capsys):
    cfg = L.TrainConfig(steps=20, dim=32, layers=2, heads=4, kv_heads=1, context=16, batch_size=8,
                        lr=1e-2, warmup=2, log_interval=10, data=str(small_text))
    model, tok, data = L.train(cfg, out=tmp_path)
    expected = L.report(model, tok, data, cfg.context)["val"]["bpc"]
    assert ablate.run("llama", cfg, tok, data, CPU)["bpc"] == pytest.approx(expected, rel=1e-6)
    capsys.readouterr()
    assert L.main(["--steps", "2", "--seeds", "1", "--data", small_text],
                  ablate.build_parser()) == 0
    out = capsys.readouterr().out
    runs = [line for line in out.splitlines() if line.startswith("[")]
    assert len(runs) == len(ablate.VARIANTS) + 3 and runs[-1].startswith("[12/12]"), runs
    table = [line for line in out.splitlines() if line.startswith("context")]
    assert len(table) == 12 and "KV B/token" in out and out.splitlines()[-1].startswith("total")


# ======================================================================= tools/hf.py

@pytest.fixture(scope="module")
def transformers():
    why = "the Hugging Face tests need transformers and protobuf (.ci/run installs them)"
    pytest.importorskip("google.protobuf", reason=why)
    module = pytest.importorskip("transformers", reason=why)
    module.logging.set_verbosity_error()
    module.logging.disable_progress_bar()
    return module


def random_hf_llama(transformers, folder, tok, tied=False, **config):
    """A randomly initialized LlamaForCausalLM with grouped-query attention, a feed-forward width
    that LLaMA's rule does not give, and norm gains that are not 1, saved as safetensors."""
    torch.manual_seed(0)
    settings = dict(hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, vocab_size=tok.vocab_size(),
                    rms_norm_eps=1e-5, rope_theta=20000.0, max_position_embeddings=32,
                    tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + 1)
    model.save_pretrained(folder, **config)
    (folder / "tokenizer.model").write_bytes(tok.serialized_model_proto())
    return model


def test_hf_import_gives_transformers_logits(transformers, tmp_path, capsys):
    tok = small_tokenizer(60)
    idx = torch.randint(60, (2, 20))
    for name, tied, config in [("plain", False, {}), ("tied", True, {}),
                               ("sharded", False, {"max_shard_size": "20KB"})]:
        folder = tmp_path / name
        model = random_hf_llama(transformers, folder, tok, tied=tied, **config)
        assert (folder / "model.safetensors.index.json").exists() == (name == "sharded")
        assert L.main(["import", folder, "--out", tmp_path / f"in-{name}"], hf.build_parser()) == 0
        ours, _ = L.load_model(tmp_path / f"in-{name}" / "ckpt.pt", CPU)
        assert ours.args.hidden_dim == 100 and ours.args.n_kv_heads == 2, ours.args
        with torch.no_grad():
            theirs = model(idx).logits
        difference = (ours(idx)[0] - theirs).abs().max().item()
        assert difference <= 1e-5, (name, difference)
        print(f"{name}: largest logit difference {difference:.2e}", file=sys.stderr)


def test_hf_export_loads_in_transformers_with_the_same_logits_tokens_and_ids(transformers, trained,
                                                                             small_text, tmp_path):
    folder = tmp_path / "hf"
    assert L.main(["export", "--ckpt", trained / "ckpt.pt", "--out", folder], hf.build_parser()) == 0
    assert sorted(os.listdir(folder)) == sorted(hf.FILES)
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ours, tok = L.load_model(trained / "ckpt.pt", CPU)
    idx = torch.randint(tok.vocab_size(), (2, 8))
    with torch.no_grad():
        difference = (ours(idx)[0] - theirs(idx).logits).abs().max().item()
        assert difference <= 1e-5, difference
        prompt = torch.tensor([tok.encode("KING:")])  # and greedy tokens, within the window
        new = ours.args.max_seq_len - prompt.size(1)
        greedy = theirs.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, ours.generate(prompt, new, temperature=0)), greedy
    passage = L.split_text(small_text.read_text())["val"][:5000]
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert auto(passage)["input_ids"] == tok.encode(passage)
    assert auto.decode(tok.encode(passage)) == passage


def test_hf_export_keeps_a_llama_tokenizers_beginning_of_text_and_space(transformers, tmp_path):
    tok = llama_like_tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size())
    ckpt = {"model": model.state_dict(), "model_args": vars(model.args),
            "tokenizer": tok.serialized_model_proto()}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert L.main(["export", "--ckpt", tmp_path / "ckpt.pt", "--out", tmp_path / "hf"],
                  hf.build_parser()) == 0
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "To be, or not to be: that is the question, é"
    assert auto(text)["input_ids"] == [tok.bos_id()] + tok.encode(text)


def test_hf_round_trip_prints_the_same_table(transformers, trained, small_text, tmp_path, capsys):
    assert L.main(["export", "--ckpt", trained / "ckpt.pt", "--out", tmp_path / "hf"],
                  hf.build_parser()) == 0
    assert L.main(["import", tmp_path / "hf", "--out", tmp_path / "back"], hf.build_parser()) == 0
    back = L.load_checkpoint(tmp_path / "back" / "ckpt.pt")
    assert back["model_args"] == L.load_checkpoint(trained / "ckpt.pt")["model_args"]
    capsys.readouterr()
    for ckpt in (trained / "ckpt.pt", tmp_path / "back" / "ckpt.pt"):
        assert L.main(["eval", "--ckpt", ckpt, "--data", small_text]) == 0
    tables = capsys.readouterr().out.split("split ")
    assert len(tables) == 3 and tables[1] == tables[2], tables


def test_what_hf_import_cannot_run_is_one_line(transformers, tmp_path, capsys):
    tok = small_tokenizer(60)
    folder = tmp_path / "hf"
    random_hf_llama(transformers, folder, tok)
    config = json.loads((folder / "config.json").read_text())

    def refused(words, **changes):
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        assert L.main(["import", folder, "--out", tmp_path / "in"], hf.build_parser()) == 1
        one_line_error(capsys, words)

    refused("rope_scaling {'type': 'linear', 'factor': 2.0}", rope_scaling={"type": "linear",
                                                                            "factor": 2.0})
    refused("rope_scaling {'rope_type': 'llama3'", rope_parameters={"rope_type": "llama3",
                                                                     "rope_theta": 5e5})
    refused("attention_bias True", attention_bias=True)
    refused("mlp_bias True", mlp_bias=True)
    refused("holds a MistralForCausalLM of model_type mistral: llama.py runs LlamaForCausalLM",
            architectures=["MistralForCausalLM"], model_type="mistral")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\nIw== 2\n")  # tiktoken's: Llama 3
    refused("is not a SentencePiece model (Llama 3's is tiktoken's)")
    (folder / "tokenizer.model").unlink()
    refused("has no tokenizer.model")
    assert not (tmp_path / "in").exists(), "nothing written by a refused import"
