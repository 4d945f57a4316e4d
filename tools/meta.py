"""A llama.py checkpoint in Meta's layout and back: what Meta's llama repository reads and writes,
and with it the converters of llama.cpp, llama2.c and Hugging Face.

    python tools/meta.py export --ckpt out/ckpt.pt --out meta/
    python tools/meta.py import meta/ --out DIR      (then python llama.py sample --ckpt DIR/ckpt.pt)

The layout is a folder of params.json, the weights in consolidated.NN.pth (one file per model-
parallel shard) and tokenizer.model. llama.py uses Meta's parameter names and rotary convention,
so the tensors go across as they are: LLaMA 1 and Llama 2 folders import, bf16 weights stay bf16.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama as L  # noqa: E402

PARAMS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
          "ffn_dim_multiplier", "norm_eps", "rope_theta")
FILES = ("params.json", "consolidated.00.pth", "tokenizer.model")


def write_folder(folder, files):
    """Write files ({name: write(f)}) into folder, all of them or none: they go into a new folder
    beside it, which then takes its place. A folder holding other files is refused."""
    folder = Path(folder).resolve()  # a link's target, not the link, is what is replaced
    if folder.exists() and (not folder.is_dir() or set(os.listdir(folder)) - set(files)):
        raise ValueError(f"{folder} is a file, or holds files other than an export's: export into "
                         f"a new or empty folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # as mkdir would have made it; mkdtemp makes it private
    aside = staging.with_name(staging.name + ".old")
    try:
        for name, write in files.items():
            L.atomic_write(staging / name, write)
        if folder.exists():  # an earlier export: put it aside, the new one in its place
            folder.rename(aside)
        try:
            staging.rename(folder)
        except OSError:
            if aside.exists():
                aside.rename(folder)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    print(f"wrote {', '.join(str(folder / name) for name in files)}")


def export(args):
    """Write the model of a checkpoint into a folder in Meta's layout."""
    model, tok = L.load_model(args.ckpt, torch.device("cpu"))
    params = {name: getattr(model.args, name) for name in PARAMS}
    if params["ffn_dim_multiplier"] == 1.0:
        params["ffn_dim_multiplier"] = None  # Meta's way to say none
    write_folder(args.out, {
        "params.json": lambda f: f.write(json.dumps(params).encode()),
        "consolidated.00.pth": lambda f: torch.save(model.state_dict(), f),
        "tokenizer.model": lambda f: f.write(tok.serialized_model_proto())})
    return 0


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


def read_folder(folder, context):
    """ModelArgs, weights and tokenizer of a folder in Meta's layout, read as Meta's
    llama/generation.py builds its model; params.json has no context length: context is it."""
    shards = sorted(folder.glob("consolidated.*.pth"))
    for name in ("params.json", "tokenizer.model", "consolidated.00.pth"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: a folder in Meta's layout holds "
                                    f"params.json, consolidated.00.pth (and more) and tokenizer.model")
    tokenizer = (folder / "tokenizer.model").read_bytes()
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\n", tokenizer):  # base64 tokens and their ranks
        raise ValueError(f"{folder}/tokenizer.model is tiktoken's (Llama 3's): llama.py reads "
                         f"SentencePiece tokenizers, as LLaMA 1 and Llama 2 have")
    tok = spm.SentencePieceProcessor(model_proto=tokenizer)
    params = json.loads((folder / "params.json").read_text())
    args = L.ModelArgs(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=tok.vocab_size() if params.get("vocab_size", -1) == -1 else params["vocab_size"],
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier") or 1.0,
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
        max_seq_len=context)
    if tok.vocab_size() != args.vocab_size:
        raise ValueError(f"{folder}: its tokenizer has {tok.vocab_size()} pieces, its params.json "
                         f"vocab_size {args.vocab_size}")
    # memory-mapped: the shards are read from disk as they are used, never held twice
    shards = [L.load_checkpoint(shard, mmap=True) for shard in shards]
    if any(shard.keys() != shards[0].keys() for shard in shards):
        raise ValueError(f"{folder}: its shards do not hold the same weights")
    weights = join_shards(shards)
    with torch.device("meta"):  # shapes only: every name and shape must fit, nothing is copied
        L.Transformer(args).load_state_dict(weights, assign=True)
    return args, weights, tok


def import_(args):
    """A folder in Meta's layout as DIR/ckpt.pt, which llama.py samples from and evaluates."""
    folder = Path(args.folder)
    if (folder / "ckpt.pt").is_file() and not (folder / "params.json").exists():
        raise ValueError(f"{folder} holds a llama.py checkpoint, not Meta's layout: sample from "
                         f"it with python llama.py sample --ckpt {folder / 'ckpt.pt'}")
    out = Path(args.out)
    if (out / "ckpt.pt").exists() and not args.overwrite:
        raise ValueError(f"{out}/ckpt.pt exists: give another --out, or --overwrite")
    model_args, weights, tok = read_folder(folder, args.context)
    write_checkpoint(out, weights, model_args, tok.serialized_model_proto())
    return 0


def write_checkpoint(out, weights, model_args, tokenizer):
    """out/ckpt.pt for an imported model: weights, shape and tokenizer, and no training run."""
    ckpt = {"model": weights, "model_args": asdict(model_args), "tokenizer": tokenizer}
    out.mkdir(parents=True, exist_ok=True)
    L.atomic_write(out / "ckpt.pt", lambda f: torch.save(ckpt, f))
    n_params = sum({w.data_ptr(): w.numel() for w in weights.values()}.values())  # tied: once
    print(f"wrote {out / 'ckpt.pt'}: {n_params:,} parameters, {weights['output.weight'].dtype}, "
          f"context {model_args.max_seq_len}")


def build_parser():
    parser = argparse.ArgumentParser(prog="tools/meta.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    out = commands.add_parser("export", help="a checkpoint into Meta's layout")
    out.set_defaults(run=export)
    out.add_argument("--ckpt", default=f"{L.OUT_DIR}/ckpt.pt", help="(%(default)s)")
    out.add_argument("--out", required=True, help="the folder to write")
    into = commands.add_parser("import", help="a folder in Meta's layout into DIR/ckpt.pt")
    into.set_defaults(run=import_)
    into.add_argument("folder", help="params.json, consolidated.*.pth and tokenizer.model")
    into.add_argument("--out", required=True, help="the folder DIR to write DIR/ckpt.pt into")
    into.add_argument("--context", type=L.number(int, 1), default=2048,
                      help="the model's context length, which Meta's folder leaves out (%(default)s)")
    into.add_argument("--overwrite", action="store_true", help="replace DIR/ckpt.pt")
    return parser


if __name__ == "__main__":
    sys.exit(L.main(parser=build_parser()))
