"""A llama.py checkpoint in Hugging Face's layout and back: what transformers' LlamaForCausalLM,
vLLM and llama.cpp's converter read, and how TinyLlama, OpenLLaMA and the Llama 2 "-hf" models
are published.

    python tools/hf.py export --ckpt out/ckpt.pt --out hf/
    python tools/hf.py import hf/ --out DIR       (then python llama.py sample --ckpt DIR/ckpt.pt)

The layout is a folder of config.json, the weights in model.safetensors (or shards listed in
model.safetensors.index.json), and tokenizer.model beside them. Two things differ from Meta's
layout: the names, and the rotary convention. Meta (and llama.py) turn the interleaved feature
pairs (x[2j], x[2j+1]) of a head; Hugging Face turns x[j] with x[j + head_dim/2]. So the rows of
wq and wk are permuted on the way out and back on the way in, as transformers' own conversion
script does. Needs safetensors (pip install safetensors), which nothing else here does.
"""
import argparse
import json
import sys
from pathlib import Path

import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama as L  # noqa: E402
from tools.meta import write_checkpoint, write_folder  # noqa: E402

# llama.py's name of each weight, and Hugging Face's; {} is a layer's number
NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def names(n_layers):
    """llama.py's name of every weight of a model of n_layers, and Hugging Face's."""
    return {ours.format(i): theirs.format(i) for i in range(n_layers)
            for ours, theirs in NAMES.items()}


FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")


def safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ValueError("tools/hf.py needs safetensors: pip install safetensors") from None
    return safetensors


def to_halves(w, heads):
    """The rows of a query or key projection (heads * head_dim, dim) from Meta's interleaved
    pairs to Hugging Face's halves: per head, rows 0, 2, 4, ... then 1, 3, 5, ..."""
    return w.unflatten(0, (heads, -1, 2)).transpose(1, 2).flatten(0, 2)


def to_pairs(w, heads):
    """The inverse of to_halves: Hugging Face's rows back to Meta's interleaved pairs."""
    return w.unflatten(0, (heads, 2, -1)).transpose(1, 2).flatten(0, 2)


def export(args):
    """Write a checkpoint's model into a folder in Hugging Face's layout."""
    st = safetensors()
    ckpt = L.load_checkpoint(args.ckpt)
    margs = L.ModelArgs(**ckpt["model_args"])
    weights = {theirs: ckpt["model"][ours] for ours, theirs in names(margs.n_layers).items()}
    for i in range(margs.n_layers):
        q_proj = f"model.layers.{i}.self_attn.q_proj.weight"
        k_proj = f"model.layers.{i}.self_attn.k_proj.weight"
        weights[q_proj] = to_halves(weights[q_proj], margs.n_heads).contiguous()
        weights[k_proj] = to_halves(weights[k_proj], margs.n_kv_heads).contiguous()
    dtype = str(weights["lm_head.weight"].dtype).removeprefix("torch.")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": margs.dim, "intermediate_size": margs.hidden_dim,
        "num_hidden_layers": margs.n_layers, "num_attention_heads": margs.n_heads,
        "num_key_value_heads": margs.n_kv_heads, "head_dim": margs.head_dim,
        "vocab_size": margs.vocab_size, "max_position_embeddings": margs.max_seq_len,
        "rms_norm_eps": margs.norm_eps, "rope_theta": margs.rope_theta, "rope_scaling": None,
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": dtype,
        # llama.py's tokenizer has no beginning- or end-of-text piece
        "bos_token_id": None, "eos_token_id": None}
    tok = spm.SentencePieceProcessor(model_proto=ckpt["tokenizer"])
    bos = tok.bos_id() >= 0  # an imported Llama's has one, llama.py's none
    prefix = tok.encode("a", out_type=str)[0].startswith("▁")  # a space put before the text?
    tokenizer_config = {  # llama.py's: neither; an imported Llama's: both
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": bos, "add_eos_token": False,
        "add_prefix_space": prefix, "legacy": False,
        "bos_token": tok.id_to_piece(tok.bos_id()) if bos else None, "eos_token": None,
        "unk_token": tok.id_to_piece(tok.unk_id()), "clean_up_tokenization_spaces": False}
    write_folder(args.out, {
        "config.json": lambda f: f.write(json.dumps(config, indent=2).encode()),
        "model.safetensors": lambda f: f.write(st.torch.save(weights, metadata={"format": "pt"})),
        "tokenizer.model": lambda f: f.write(ckpt["tokenizer"]),
        "tokenizer_config.json": lambda f: f.write(json.dumps(tokenizer_config, indent=2).encode())})
    return 0


def read_config(folder, context):
    """ModelArgs from a folder's config.json, if it describes a model llama.py computes as
    transformers does: refused, with what is unsupported named, if not."""
    config = json.loads((folder / "config.json").read_text())
    kind = config.get("architectures", [config.get("model_type")])
    if kind != ["LlamaForCausalLM"] or config.get("model_type") != "llama":
        raise ValueError(f"{folder} holds a {kind[0] if kind else 'model'} of model_type "
                         f"{config.get('model_type')}: llama.py runs LlamaForCausalLM only")
    rope = config.get("rope_parameters") or {}  # transformers 5's; 4's keys are at the top
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                              else None)
    unsupported = {"rope_scaling": scaling, "attention_bias": config.get("attention_bias"),
                   "mlp_bias": config.get("mlp_bias")}
    if config.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = config["hidden_act"]
    for name, value in unsupported.items():
        if value:
            raise ValueError(f"{folder}/config.json has {name} {value}, which llama.py does not "
                             f"compute: it runs LLaMA's plain rotary embeddings, no biases, SwiGLU")
    dim = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    if (config.get("head_dim") or dim // n_heads) != dim // n_heads:
        raise ValueError(f"{folder}/config.json has head_dim {config['head_dim']}, not "
                         f"hidden_size / num_attention_heads = {dim // n_heads}, as llama.py has")
    hidden = config["intermediate_size"]
    base = int(2 * 4 * dim / 3)  # what ModelArgs.hidden_dim rounds up: LLaMA's own rule if it fits
    rule = L.ModelArgs(dim=dim, n_heads=n_heads, n_kv_heads=n_heads).hidden_dim == hidden
    return L.ModelArgs(
        dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
        # any other width: a multiplier that brings the rule to at most it, rounded up to it
        multiple_of=256 if rule else hidden, ffn_dim_multiplier=1.0 if rule else hidden / base,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        max_seq_len=context or config.get("max_position_embeddings", 2048))


def read_weights(folder, margs):
    """The folder's safetensors, single or sharded, under llama.py's names and rotary
    convention, in their own dtype; their names and shapes checked on the meta device."""
    st = safetensors()
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    theirs = {}
    for name in files:
        theirs.update(st.torch.load_file(folder / name))
    if "lm_head.weight" not in theirs:  # tied embeddings: the output layer is the input's
        theirs["lm_head.weight"] = theirs["model.embed_tokens.weight"]
    missing = set(names(margs.n_layers).values()) - set(theirs)
    if missing:
        raise ValueError(f"{folder} has no weights {sorted(missing)[:3]}, which a Llama has")
    weights = {ours: theirs.pop(hf_name) for ours, hf_name in names(margs.n_layers).items()}
    for i in range(margs.n_layers):
        weights[f"layers.{i}.attention.wq.weight"] = to_pairs(
            weights[f"layers.{i}.attention.wq.weight"], margs.n_heads).contiguous()
        weights[f"layers.{i}.attention.wk.weight"] = to_pairs(
            weights[f"layers.{i}.attention.wk.weight"], margs.n_kv_heads).contiguous()
    theirs = {k: v for k, v in theirs.items() if not k.endswith("rotary_emb.inv_freq")}
    if theirs:
        raise ValueError(f"{folder} has weights llama.py has no place for: {sorted(theirs)[:3]}")
    with torch.device("meta"):  # every name and shape must fit; nothing is copied
        L.Transformer(margs).load_state_dict(weights, assign=True)
    return weights


def import_(args):
    """A folder in Hugging Face's layout as DIR/ckpt.pt, which llama.py samples from and
    evaluates."""
    folder = Path(args.folder)
    for name in ("config.json", "tokenizer.model"):
        if not (folder / name).is_file():
            why = " (Llama 3's tokenizer is tiktoken's, in tokenizer.json)" * (name != "config.json")
            raise FileNotFoundError(f"{folder} has no {name}: llama.py reads folders of "
                                    f"config.json, safetensors and a SentencePiece tokenizer.model{why}")
    out = Path(args.out)
    if (out / "ckpt.pt").exists() and not args.overwrite:
        raise ValueError(f"{out}/ckpt.pt exists: give another --out, or --overwrite")
    tokenizer = (folder / "tokenizer.model").read_bytes()
    try:
        tok = spm.SentencePieceProcessor(model_proto=tokenizer)
    except RuntimeError:
        raise ValueError(f"{folder}/tokenizer.model is not a SentencePiece model (Llama 3's is "
                         f"tiktoken's): llama.py reads SentencePiece tokenizers") from None
    margs = read_config(folder, args.context)
    if tok.vocab_size() > margs.vocab_size:
        raise ValueError(f"{folder}: its tokenizer has {tok.vocab_size()} pieces, its model "
                         f"{margs.vocab_size}")
    write_checkpoint(out, read_weights(folder, margs), margs, tokenizer)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="tools/hf.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    out = commands.add_parser("export", help="a checkpoint into Hugging Face's layout")
    out.set_defaults(run=export)
    out.add_argument("--ckpt", default=f"{L.OUT_DIR}/ckpt.pt", help="(%(default)s)")
    out.add_argument("--out", required=True, help="the folder to write")
    into = commands.add_parser("import", help="a folder in Hugging Face's layout into DIR/ckpt.pt")
    into.set_defaults(run=import_)
    into.add_argument("folder", help="config.json, *.safetensors and tokenizer.model")
    into.add_argument("--out", required=True, help="the folder DIR to write DIR/ckpt.pt into")
    into.add_argument("--context", type=L.number(int, 1),
                      help="the model's context length (default: max_position_embeddings)")
    into.add_argument("--overwrite", action="store_true", help="replace DIR/ckpt.pt")
    return parser


if __name__ == "__main__":
    sys.exit(L.main(parser=build_parser()))
