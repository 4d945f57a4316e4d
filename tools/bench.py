"""Training and decoding speed of llama.py's model, eager and (with --compile) compiled, in one run.

    python tools/bench.py [--compile] [llama.py's model and training flags, e.g. --dim 384]

Training runs train_step on random tokens; decoding runs generate() greedily from one token, with
the KV cache and by recomputing the window, and checks that both give the same tokens. Model
FLOP/s count 6 FLOPs per weight per token (2 forward, 4 backward, as PaLM's appendix B does) for
every matrix but the embedding lookup, plus the attention scores and sums.
"""
import argparse
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama as L  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device):
    """The most memory this process has held: allocated on the GPU, else resident (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # Unix only
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def model_flops_per_token(args, context):
    """6 per weight of every matrix but the embedding (a lookup), and 12 * layers * T * dim for
    the attention scores and their weighted sums, forward and backward."""
    kv_dim = args.n_kv_heads * args.head_dim
    per_layer = 2 * args.dim * args.dim + 2 * args.dim * kv_dim + 3 * args.dim * args.hidden_dim
    weights = args.n_layers * per_layer + args.vocab_size * args.dim  # and the output layer
    return 6 * weights + 12 * args.n_layers * context * args.dim


def time_training(cfg, device, steps, warmup, compiled):
    """Training tokens/s over steps timed after warmup untimed ones, and the first step's seconds."""
    torch.manual_seed(cfg.seed)
    model = L.Transformer(cfg.model_args(cfg.vocab_size)).to(device)
    optimizer = L.make_optimizer(model, cfg.lr, cfg.weight_decay, device)
    trained = torch.compile(model) if compiled else model  # as train --compile does
    data = torch.randint(cfg.vocab_size, (max(100_000, 2 * cfg.context + 2),))  # any tokens do
    first_step = 0.0
    started = time.perf_counter()
    for i in range(1 + warmup + steps):
        if i == 1:
            synchronize(device)
            first_step = time.perf_counter() - started
        if i == 1 + warmup:
            synchronize(device)
            started = time.perf_counter()
        x, y = L.get_batch(data, cfg.batch_size, cfg.context)
        L.train_step(trained, optimizer, x.to(device), y.to(device), cfg.lr)
    synchronize(device)
    return steps * cfg.batch_size * cfg.context / (time.perf_counter() - started), first_step


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


def bench(args):
    cfg = L.TrainConfig(**{f.name: getattr(args, f.name) for f in fields(L.TrainConfig)
                           if hasattr(args, f.name)})
    device = L.pick_device(args.device)
    model_args = cfg.model_args(cfg.vocab_size)
    flops = model_flops_per_token(model_args, cfg.context)
    print(f"device {device} | {torch.get_num_threads()} threads | torch {torch.__version__}")
    eager, _ = time_training(cfg, device, args.bench_steps, args.bench_warmup, compiled=False)
    print(f"train  {eager:10,.0f} tokens/s eager (batch {cfg.batch_size} x context {cfg.context}, "
          f"{args.bench_steps} steps after {args.bench_warmup} of warm-up): "
          f"{flops * eager / 1e12:.3g} TFLOP/s")
    if args.compile:
        speed, first = time_training(cfg, device, args.bench_steps, args.bench_warmup, True)
        print(f"train  {speed:10,.0f} tokens/s compiled: {speed / eager:.2f}x eager, "
              f"{flops * speed / 1e12:.3g} TFLOP/s (its first step took {first:.1f} s)")
    # decoding: the same shape, with a context that holds the whole generation
    decode_args = L.ModelArgs(**{**asdict(model_args), "max_seq_len": args.new_tokens + 1})
    torch.manual_seed(cfg.seed)
    decoder = L.Transformer(decode_args).to(device).eval()
    cached, cached_tokens = time_decoding(decoder, args.new_tokens, use_cache=True)
    recomputed, recomputed_tokens = time_decoding(decoder, args.new_tokens, use_cache=False)
    print(f"decode {cached:10,.0f} tokens/s with the KV cache, {recomputed:,.0f} recomputing "
          f"({args.new_tokens} greedy tokens, batch 1): {cached / recomputed:.1f}x; same tokens: "
          f"{torch.equal(cached_tokens, recomputed_tokens)}")
    if args.compile:
        L.compile_decoding(decoder)
        started = time.perf_counter()
        time_decoding(decoder, 2, use_cache=True, repeats=1)  # the first steps compile
        compiling = time.perf_counter() - started
        speed, compiled_tokens = time_decoding(decoder, args.new_tokens, use_cache=True)
        print(f"decode {speed:10,.0f} tokens/s compiled: {speed / cached:.2f}x eager with the "
              f"cache; same tokens: {torch.equal(cached_tokens, compiled_tokens)} (compiling "
              f"took {compiling:.1f} s)")
    where = "GPU, allocated" if device.type == "cuda" else "resident"
    print(f"peak memory {peak_memory_mib(device):,.0f} MiB ({where})")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__.split("\n\n")[0])
    parser.set_defaults(run=bench)
    L.add_config_flags(parser)
    parser.add_argument("--compile", action="store_true", help="time the compiled forms too")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, mps, cpu or auto")
    parser.add_argument("--new-tokens", type=L.number(int, 1, 2**20), default=512,
                        help="tokens decoded (%(default)s)")
    parser.add_argument("--bench-steps", type=L.number(int, 1), default=50,
                        help="timed training steps (%(default)s)")
    parser.add_argument("--bench-warmup", type=L.number(int, 0), default=10,
                        help="untimed steps before them (%(default)s)")
    return parser


if __name__ == "__main__":
    sys.exit(L.main(parser=build_parser()))
