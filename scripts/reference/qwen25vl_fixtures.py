#!/usr/bin/env python3
"""Reference fixtures for ttrv's Qwen2.5-VL port, generated with HF transformers (CPU, float32, offline).

Usage (from the repository root):

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        ~/.cache/ttrv-peer/venv/bin/python scripts/reference/qwen25vl_fixtures.py [--out Tests/Fixtures/qwen25vl]

Needs: torch, transformers 5.x, pillow, safetensors, numpy. No network, no torchvision.

It builds a tiny random-weight Qwen2_5_VLForConditionalGeneration (2 text layers, 4 vision blocks with
window attention and two full-attention blocks, tied embeddings like Qwen2.5-VL-3B) over the Qwen2
test tokenizer in Tests/Fixtures/tokenizer/qwen2 (vocab 1016, Qwen special tokens), and writes it the
way public Qwen2.5-VL checkpoints are laid out on the Hub:
  - config.json in the flat pre-v5 form (text fields at the root, rope_scaling {"type": "mrope"}),
  - weights under `visual.*` / `model.*` (the old names), split into two shards + index.
config_v5.json is the same config as transformers 5 writes it (nested text_config), so the Swift
tests can check both forms.

The image processor is the slow PIL one (Qwen2VLImageProcessorPil): torchvision is not installed,
and the PIL resize is what Swift's Image.resized(.bicubic) reproduces bit for bit. The images are
generated here and committed as PNG, so both sides decode identical pixels.

Fixtures (fixtures.json + fixtures.bin, the BinFixture format of the other model fixtures) for three
prompts: image A (wide, exercises the max_pixels branch of smart_resize), image B (tall, exercises
round-half-to-even in smart_resize, image in the middle of the text, custom system prompt) and a
text-only prompt. Per prompt: rendered text, input_ids, pixel_values, image_grid_thw, vision-tower
output, 3-D position ids and rope delta, full logits, HF generate()'s greedy 10 tokens (KV cache and
rope_deltas decode path) and the no-cache logits at those 10 decode positions.

After writing, the checkpoint is re-loaded from disk through from_pretrained (so HF's own legacy
key/config conversion is exercised) and every stored logit is recomputed and compared.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO, "Tests", "Fixtures", "qwen25vl")
TOKENIZER_DIR = os.path.join(REPO, "Tests", "Fixtures", "tokenizer", "qwen2")

# Small enough for a tiny fixture, large enough that smart_resize's max branch triggers.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16

TEXT = dict(vocab_size=1016, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
            hidden_act="silu", rope_theta=1_000_000.0, mrope_section=[2, 3, 3],
            bos_token_id=1000, eos_token_id=1002)
# window_size 56 -> windows of 2x2 merged tokens (real: 112 / 14 / 2 = 4x4); blocks 1 and 3 attend fully.
VISION = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, in_chans=3,
              patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
              fullatt_block_indexes=[1, 3], tokens_per_second=2, hidden_act="silu")
SPECIAL = dict(image_token_id=1012, video_token_id=1013, vision_start_token_id=1009, vision_end_token_id=1010)


class BinWriter:
    """Appends little-endian float32 arrays to one .bin file; records {offset (bytes), shape}."""

    def __init__(self):
        self.chunks, self.nbytes = [], 0

    def add(self, t):
        a = np.ascontiguousarray(torch.as_tensor(t).detach().to(torch.float32).cpu().numpy().astype("<f4"))
        ref = {"offset": self.nbytes, "shape": list(a.shape)}
        self.chunks.append(a.tobytes())
        self.nbytes += a.nbytes
        return ref

    def write(self, path):
        with open(path, "wb") as f:
            for c in self.chunks:
                f.write(c)


def read_bin(path, ref):
    n = int(np.prod(ref["shape"]))
    with open(path, "rb") as f:
        f.seek(ref["offset"])
        a = np.frombuffer(f.read(4 * n), dtype="<f4")
    return torch.from_numpy(a.copy()).reshape(ref["shape"])


def jdump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def legacy_config():
    """config.json as the Qwen2.5-VL checkpoints on the Hub have it (written by transformers 4.4x)."""
    t = dict(TEXT)
    section = t.pop("mrope_section")
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **{k: v for k, v in t.items()},
        "attention_dropout": 0.0, "initializer_range": 0.02, "max_window_layers": 2,
        "sliding_window": 4096, "use_sliding_window": False, "use_cache": True,
        "tie_word_embeddings": True, "torch_dtype": "float32",
        "rope_scaling": {"type": "mrope", "mrope_section": section},
        "vision_config": dict(VISION, model_type="qwen2_5_vl", initializer_range=0.02),
        **SPECIAL,
    }


def make_model(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig.from_dict(legacy_config())
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    # HF's 0.02-std init gives near-uniform logits (ties make greedy checks meaningless); use
    # O(1)-scale weights so every layer visibly shapes the output.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lm_head.weight"):
                continue  # tied to embed_tokens
            if p.ndim == 1 and "norm" in name or name.endswith("ln_q.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    return model


def legacy_state_dict(model):
    """The model's tensors under the names public checkpoints use (visual.*, model.*; no lm_head, tied)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        if k.startswith("model.visual."):
            k = k[len("model."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        else:
            raise AssertionError(k)
        out[k] = v.detach().contiguous().clone()
    return out


def save_checkpoint(model, out):
    sd = legacy_state_dict(model)
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in sd.items() if k.startswith("visual.")},
              "model-00002-of-00002.safetensors": {k: v for k, v in sd.items() if not k.startswith("visual.")}}
    weight_map = {}
    for fname, part in shards.items():
        save_file(part, os.path.join(out, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    jdump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
          os.path.join(out, "model.safetensors.index.json"))
    jdump(legacy_config(), os.path.join(out, "config.json"))
    model.config.save_pretrained(os.path.join(out, "_v5"))
    shutil.move(os.path.join(out, "_v5", "config.json"), os.path.join(out, "config_v5.json"))
    shutil.rmtree(os.path.join(out, "_v5"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, f), os.path.join(out, f))
    jdump({"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": 3,
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
           "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "processor_class": "Qwen2_5_VLProcessor"},
          os.path.join(out, "preprocessor_config.json"))


def make_images(out):
    """Smooth colour fields with texture: resizing them exercises every filter tap."""
    rng = np.random.default_rng(7)
    paths = {}
    for name, (w, h) in {"wide.png": (300, 90), "tall.png": (70, 200)}.items():
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        base = np.stack([128 + 100 * np.sin(x / 17 + c) * np.cos(y / 11 - c) for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(os.path.join(out, name), optimize=True)
        paths[name] = os.path.join(out, name)
    return paths


def processor_for(out):
    tok = AutoTokenizer.from_pretrained(out)
    ip = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    with open(os.path.join(TOKENIZER_DIR, "tokenizer_config.json")) as f:
        template = json.load(f)["chat_template"]
    return _NoVideoProcessor(image_processor=ip, tokenizer=tok, chat_template=template)


class _NoVideoProcessor(Qwen2_5_VLProcessor):
    """The real processor minus its video processor, whose class needs torchvision (not installed);
    the class check would otherwise fail before any image is seen."""

    def check_argument_for_proper_class(self, attribute_name, arg):
        if attribute_name != "video_processor":
            return super().check_argument_for_proper_class(attribute_name, arg)


PROMPTS = [
    # (name, image file or None, system or None, HF content list, the same prompt as ttrv's prepare() takes it)
    ("wide_image", "wide.png", None,
     [{"type": "image"}, {"type": "text", "text": "Describe this image."}], "Describe this image."),
    ("tall_image", "tall.png", "You are a tiny test model.",
     [{"type": "text", "text": "What is in "}, {"type": "image"}, {"type": "text", "text": " this picture?"}],
     "What is in <image> this picture?"),
    ("text_only", None, None, [{"type": "text", "text": "Hello, how are you today?"}], "Hello, how are you today?"),
]


def model_inputs(proc, images, name, image, system, content):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kw = {"images": [Image.open(images[image]).convert("RGB")]} if image else {}
    inputs = proc(text=[text], return_tensors="pt", **kw)
    return text, inputs


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
    return out.logits[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)

    model = make_model()
    save_checkpoint(model, out)
    images = make_images(out)
    proc = processor_for(out)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 1000

    bw = BinWriter()
    fx = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "prompts": []}
    for name, image, system, content, ttrv_text in PROMPTS:
        text, inputs = model_inputs(proc, images, name, image, system, content)
        ids = inputs["input_ids"]
        entry = {"name": name, "image": image, "system": system, "text": ttrv_text, "rendered": text,
                 "input_ids": ids[0].tolist()}
        mm = inputs.get("mm_token_type_ids")
        if image:
            grid = inputs["image_grid_thw"]
            entry["image_grid_thw"] = grid[0].tolist()
            entry["pixel_values"] = bw.add(inputs["pixel_values"])
            with torch.no_grad():
                vis = model.model.visual(inputs["pixel_values"], grid_thw=grid).pooler_output
            entry["vision_output"] = bw.add(vis)
            pos, delta = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid)
        else:
            t = ids.shape[1]
            pos, delta = torch.arange(t).view(1, 1, -1).expand(3, 1, -1), torch.zeros(1, 1, dtype=torch.long)
        entry["position_ids"] = pos[:, 0].tolist()
        entry["rope_delta"] = int(delta.reshape(-1)[0])
        logits = run(model, inputs)
        entry["logits"] = bw.add(logits)

        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=1000)
        new = gen[0, ids.shape[1]:].tolist()
        assert len(new) == 10, new
        entry["greedy10_ids"] = new
        # No-cache logits at the decode positions: what a KV-cache decode must reproduce.
        full = dict(inputs)
        full["input_ids"] = gen[:, :-1]
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        if mm is not None:
            full["mm_token_type_ids"] = torch.cat([mm, torch.zeros(1, 9, dtype=mm.dtype)], dim=1)
        full_logits = run(model, full)
        assert torch.equal(full_logits[-10:].argmax(-1), gen[0, ids.shape[1]:]), "generate() disagrees with recompute"
        entry["decode_logits"] = bw.add(full_logits[-10:])
        fx["prompts"].append(entry)
        print(f"{name}: T={ids.shape[1]} grid={entry.get('image_grid_thw')} delta={entry['rope_delta']} greedy={new}")

    jdump(fx, os.path.join(out, "fixtures.json"))
    bw.write(os.path.join(out, "fixtures.bin"))

    # Re-load through HF's own loader (legacy names and config) and recompute everything stored.
    again = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    binpath = os.path.join(out, "fixtures.bin")
    for (name, image, system, content, _), entry in zip(PROMPTS, fx["prompts"]):
        _, inputs = model_inputs(proc, images, name, image, system, content)
        d = (run(again, inputs) - read_bin(binpath, entry["logits"])).abs().max().item()
        assert d < 1e-5, f"{name}: reloaded checkpoint drifts by {d}"
    # The fixtures must discriminate: ignoring the window/full split or M-RoPE moves the logits.
    _, inputs = model_inputs(proc, images, *PROMPTS[0][:4])
    ref = read_bin(binpath, fx["prompts"][0]["logits"])
    again.model.visual.fullatt_block_indexes = []
    print("all-window vision attention moves logits by", (run(again, inputs) - ref).abs().max().item())
    again.model.visual.fullatt_block_indexes = [1, 3]
    again.model.language_model.rotary_emb.mrope_section = [8, 0, 0]
    print("1-D RoPE instead of M-RoPE moves logits by", (run(again, inputs) - ref).abs().max().item())
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
    print("written:", sizes, "total", sum(sizes.values()))


if __name__ == "__main__":
    main()
