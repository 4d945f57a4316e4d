"""What each of LLaMA's changes to GPT-2 buys here: llama.py's model, and variants that each put
back one of GPT-2's choices, trained alike on Tiny Shakespeare, in one table.

    python tools/ablate.py                        every variant, 3 seeds, two settings (~20 min)
    python tools/ablate.py --steps 20 --seeds 1   a quick look: every variant, briefly

Each variant is llama.py's Transformer with modules swapped or wrapped after it is built, then
initialized by its own rule (Transformer.init_weights): nothing of llama.py is copied or changed.
Every run trains exactly as `python llama.py train` does (the same batches for a seed: the baseline
run is that command's run) and is scored in bits per character over every validation token.
"""
import argparse
import contextlib
import io
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama as L  # noqa: E402


class GeluMLP(nn.Module):
    """GPT-2's feed-forward: w2(gelu(w1 x)), two matrices where SwiGLU has three."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # named w2: init_weights scales it

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class LearnedPositions(nn.Module):
    """GPT-2's positions: a learned vector per position, added to each token's embedding. For
    whole sequences from position 0 (training, evaluation), which is all this tool runs."""

    def __init__(self, tok_embeddings, max_seq_len):
        super().__init__()
        self.tokens = tok_embeddings
        self.positions = nn.Embedding(max_seq_len, tok_embeddings.embedding_dim)

    def forward(self, idx):
        return self.tokens(idx) + self.positions(torch.arange(idx.size(1), device=idx.device))


def use_layernorm(model):
    """LayerNorm, with its mean and bias, wherever the model has an RMSNorm."""
    dim = model.args.dim
    for block in model.layers:
        block.attention_norm = nn.LayerNorm(dim, eps=model.args.norm_eps)
        block.ffn_norm = nn.LayerNorm(dim, eps=model.args.norm_eps)
    model.norm = nn.LayerNorm(dim, eps=model.args.norm_eps)


def no_rotation(model):
    """Rotary tables that turn nothing: cos 1, sin 0 at every position."""
    model.freqs_cos.fill_(1.0)
    model.freqs_sin.zero_()


def use_learned_positions(model):
    no_rotation(model)
    model.tok_embeddings = LearnedPositions(model.tok_embeddings, model.args.max_seq_len)


def use_gelu(model):
    """A GELU MLP as wide as keeps the parameters: 2 * dim * h = 3 * dim * hidden, h = 1.5 hidden."""
    for block in model.layers:
        block.feed_forward = GeluMLP(model.args.dim, model.args.hidden_dim * 3 // 2)


def use_biases(model):
    """A bias in every linear layer, the output layer's too."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, nn.Linear(child.in_features, child.out_features, bias=True))


def tie_embeddings(model):
    """One matrix for the input embedding and the output layer, as GPT-2 has (its head has no
    bias, whatever use_biases gave it)."""
    model.output = nn.Linear(model.args.dim, model.args.vocab_size, bias=False)
    model.output.weight = model.tok_embeddings.weight


# each variant: whether every query head gets its own key/value head, and the swaps, in order
VARIANTS = {
    "llama": (False, []),
    "layernorm": (False, [use_layernorm]),
    "learned-positions": (False, [use_learned_positions]),
    "no-positions": (False, [no_rotation]),
    "gelu-mlp": (False, [use_gelu]),
    "multi-head": (True, []),
    "biases": (False, [use_biases]),
    "tied-embeddings": (False, [tie_embeddings]),
    "gpt-2": (True, [use_layernorm, use_gelu, use_biases, tie_embeddings, use_learned_positions]),
}


def build_variant(name, args, seed):
    """llama.py's Transformer for args, changed as the variant says, its weights drawn from seed.
    The baseline is built exactly as llama.py builds it; the others are then initialized by the
    same rule, biases at 0."""
    multi_head, swaps = VARIANTS[name]
    if multi_head:
        args = replace(args, n_kv_heads=args.n_heads)
    torch.manual_seed(seed)
    model = L.Transformer(args)
    if swaps:
        for swap in swaps:
            swap(model)
        torch.manual_seed(seed)
        model.init_weights()
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def kv_cache_bytes_per_token(model):
    """Keys and values of every layer for one token, in float32."""
    return 2 * model.args.n_layers * model.args.n_kv_heads * model.args.head_dim * 4


def run(name, cfg, tok, data, device):
    """Train one variant with llama.py's own training loop (its batches, its steps); its
    validation bits per character over every token, its training tokens per second, the first
    and last logged training losses, its parameters and KV-cache bytes per token."""
    model = build_variant(name, cfg.model_args(tok.vocab_size()), cfg.seed).to(device)
    optimizer = L.make_optimizer(model, cfg.lr, cfg.weight_decay, device)
    run = {"config": {}, "tokenizer": b"", "step": 0, "log": [], "loss_sum": 0.0,
           "batches": torch.Generator().manual_seed(cfg.seed).get_state()}  # as llama.py's train
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        L.train_loop(cfg, model, model, optimizer, data, Path(out), run, torch.zeros(1))
    tokens_per_s = cfg.steps * cfg.batch_size * cfg.context / (time.perf_counter() - started)
    result = L.evaluate(model, *L.windows(data["val"], cfg.context))
    n_chars = len(tok.decode(data["val"][1:].tolist()))  # as llama.py's report counts them
    return {"bpc": result["loss_sum"] / n_chars / math.log(2), "tokens_per_s": tokens_per_s,
            "first_loss": run["log"][0][1], "last_loss": run["log"][-1][1],
            "params": sum(p.numel() for p in model.parameters()),
            "kv_bytes": kv_cache_bytes_per_token(model)}


def settings(args):
    """The documented settings (with any flags given), and a longer context where positions
    matter more: 128 tokens, 8 sequences a step, half the steps, about the same tokens in all."""
    documented = L.TrainConfig(steps=args.steps or L.EPOCHS, data=args.data)
    longer = replace(documented, context=128, batch_size=8, steps=args.steps or L.EPOCHS // 2)
    return [("context 16", documented, list(VARIANTS)),
            ("context 128", longer, ["llama", "learned-positions", "no-positions"])]


def summarize(rows, base):
    """Mean and spread over seeds, and the change from the baseline, paired by seed. A change
    counts as beyond the seed noise when every seed moves the same way by more than the
    baseline's own spread over seeds (largest minus smallest)."""
    bpc = [r["bpc"] for r in rows]
    diffs = [r["bpc"] - b["bpc"] for r, b in zip(rows, base)]
    noise = max(b["bpc"] for b in base) - min(b["bpc"] for b in base)
    mean_diff = statistics.mean(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    beyond = "yes" if same_sign and abs(mean_diff) > noise else "no"
    if len(rows) == 1 or rows is base:
        beyond = "-"  # one seed has no spread; the baseline is no change
    return {"mean": statistics.mean(bpc), "spread": max(bpc) - min(bpc), "diff": mean_diff,
            "beyond": beyond,
            "speed": statistics.mean(r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rows, base))}


def ablate(args):
    started = time.perf_counter()
    device = L.pick_device(args.device)
    text = L.get_text(args.data)
    splits = L.split_text(text)
    tok = L.train_tokenizer(splits["train"], L.VOCAB_SIZE)
    seeds = [L.SEED + i for i in range(args.seeds)]
    plan = settings(args)
    # every setting's data, and the picture's folder, checked before the first run
    data = {label: L.encode_splits(splits, tok, cfg.context) for label, cfg, _ in plan}
    if args.png and not Path(args.png).parent.is_dir():
        raise FileNotFoundError(f"no folder {Path(args.png).parent} for --png {args.png}")
    total = sum(len(variants) for _, _, variants in plan) * len(seeds)
    results = {}
    done = 0
    for label, cfg, variants in plan:
        for seed in seeds:  # the seed outside, so that an early stop has every variant
            for name in variants:
                run_started = time.perf_counter()
                r = run(name, replace(cfg, seed=seed), tok, data[label], device)
                results.setdefault((label, name), []).append(r)
                done += 1
                print(f"[{done}/{total}] {label} {name} seed {seed}: {r['bpc']:.4f} bits/char, "
                      f"loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}, "
                      f"{r['tokens_per_s']:,.0f} tok/s, {time.perf_counter() - run_started:.0f} s",
                      flush=True)
    print_table(plan, results, seeds)
    if args.png:
        plot(plan, results, args.png)
    print(f"total {time.perf_counter() - started:.0f} s on {device}, {torch.get_num_threads()} "
          f"threads, {len(seeds)} seed(s)")
    return 0


def print_table(plan, results, seeds):
    print(f"\n{'setting':<12}{'variant':<19}{'params':>9}{'bits/char':>11}{'spread':>8}"
          f"{'change':>9}{'beyond noise':>14}{'tokens/s':>10}{'KV B/token':>12}")
    for label, cfg, variants in plan:
        base = results[(label, "llama")]
        for name in variants:
            rows = results[(label, name)]
            s = summarize(rows, base)
            print(f"{label:<12}{name:<19}{rows[0]['params']:>9,}{s['mean']:>11.4f}"
                  f"{s['spread']:>8.4f}{s['diff']:>+9.4f}{s['beyond']:>14}{s['speed']:>9.2f}x"
                  f"{rows[0]['kv_bytes']:>12,}")
    print(f"bits/char: mean over {len(seeds)} seed(s) of every validation token; spread: largest "
          f"minus smallest; change: paired with the baseline by seed; tokens/s: over the "
          f"baseline's, in this run")


def plot(plan, results, png):
    """Bits per character per variant, with each seed's value and the mean, into png."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"(no {png}: the picture needs matplotlib, pip install matplotlib)")
        return
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    labels = []
    for label, cfg, variants in plan:
        for name in variants:
            y = len(labels)
            labels.append(f"{name} ({label})")
            values = [r["bpc"] for r in results[(label, name)]]
            ax.plot(values, [y] * len(values), "o", color="tab:blue", alpha=0.5)
            ax.plot([statistics.mean(values)], [y], "|", color="black", markersize=14)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("validation bits per character (dots: seeds; bar: mean); lower is better")
    ax.set_title("llama.py with one of GPT-2's choices put back")
    L.atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    print(f"wrote {png}")


def build_parser():
    parser = argparse.ArgumentParser(prog="tools/ablate.py", description=__doc__.split("\n\n")[0])
    parser.set_defaults(run=ablate)
    parser.add_argument("--steps", type=L.number(int, 1), default=None,
                        help="optimizer steps of every run (default: EPOCHS, and half of it at "
                             "context 128)")
    parser.add_argument("--seeds", type=L.number(int, 1, 100), default=3,
                        help="seeds per variant, from SEED on (%(default)s)")
    parser.add_argument("--data", default=None, help="a UTF-8 text (default: Tiny Shakespeare)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, mps, cpu or auto")
    parser.add_argument("--png", default=None, help="also draw the table into this PNG")
    return parser


if __name__ == "__main__":
    sys.exit(L.main(parser=build_parser()))
