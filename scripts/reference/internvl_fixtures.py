#!/usr/bin/env python3
"""Reference fixtures for Sources/Models/InternVL*.swift, generated with HF transformers (CPU, offline).

Usage (from the repository root):

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        ~/.cache/ttrv-peer/venv/bin/python scripts/reference/internvl_fixtures.py [--out Tests/Fixtures/internvl]

Needs torch, transformers 5.x, tokenizers, pillow, safetensors, numpy; no network, no torchvision.
Deterministic: fixed seeds, one thread, float32 CPU, eager attention.

What it builds (all under --out):
  tiny/          InternVLForConditionalGeneration (model_type "internvl", the `-hf` layout) with random weights:
                 InternViT (LayerNorm, q/k/v bias, no QK norm, like InternViT-300M of InternVL3-1B..14B),
                 2 layers, 56 px tiles of 14 px patches -> 16 patches -> pixel shuffle 0.5 -> 4 image tokens
                 per tile; Qwen2 decoder, 2 layers, untied lm_head. tokenizer.json = the repo's tiny Qwen2
                 tokenizer (Tests/Fixtures/tokenizer/qwen2) plus <img> </img> <IMG_CONTEXT> <video>
                 (ids 1016..1019). Processor files as transformers 5 saves them (max_patches 6).
  remote/        The same weights in the original remote-code layout (InternVLChatModel: vision_model.*,
                 mlp1.*, language_model.*, fused attn.qkv) with an InternVLChatConfig-style config.json.
                 Names come from inverting convert_internvl_weights_to_hf.py's key mapping; the script
                 re-applies that mapping forwards and asserts it reproduces every `-hf` name and tensor,
                 and checks every name against InternVLChatModel's module structure.
                 Note: transformers 5 writes `-hf` checkpoints with the published on-disk names
                 (vision_tower.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.*).
  vit6b/         A vision tower alone (InternVLVisionModel) in the InternViT-6B style: RMSNorm, QK norm,
                 no q/k/v bias, final LayerNorm (use_mean_pooling false); checks the other config branches.
  wide.png, tall.png, square.png   test images (lossless, so Swift decodes the same pixels).
  fixtures.json + fixtures.bin     index + little-endian float32 arrays ({offset, shape} refs):
    processor[name]: {pixel_values ref [tiles,3,56,56], num_patches, grid [cols, rows]}
    tiling: rows [height, width, tile, max_tiles, cols, rows] of get_optimal_tiled_canvas
    vision: {image, last_hidden_state ref [tiles,17,32], image_features ref [tiles,4,32]}
    prompts[]: {name, image|null, system|null, text, input_ids, logits ref [T, vocab], greedy_ids}
    vit6b: {image, last_hidden_state ref}

The image processor is transformers' PIL backend (GotOcr2ImageProcessorPil): the published `-hf`
checkpoints name GotOcr2ImageProcessorFast, whose torchvision resize is not bit-identical to PIL; the
original InternVL code resizes with PIL, as this backend does.
"""
from __future__ import annotations

import argparse
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    InternVLVisionModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (  # noqa: E402
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BASE_TOKENIZER = os.path.join(REPO, "Tests", "Fixtures", "tokenizer", "qwen2", "tokenizer.json")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TILE, MAX_TILES = 56, 6
EXTRA = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
         "video_token": "<video>"}
# The `-hf` checkpoints' chat template (no default system turn; an image renders as "<IMG_CONTEXT>\n").
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


class BinWriter:
    def __init__(self):
        self.chunks, self.nbytes = [], 0

    def add(self, t):
        a = np.ascontiguousarray(t.detach().to(torch.float32).numpy().astype("<f4"))
        ref = {"offset": self.nbytes, "shape": list(a.shape)}
        self.chunks.append(a.tobytes())
        self.nbytes += a.nbytes
        return ref


def jdump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def make_image(w, h, seed):
    """Gradients, a hard-edged block and noise: smooth and ringing parts of bicubic resampling both matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([255 * x / (w - 1), 255 * y / (h - 1), 127.5 + 127.5 * np.sin(x / 3 + y / 5)], -1)
    img[(x > w / 3) & (x < w / 2) & (y > h / 4)] = [250, 10, 40]
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))


def randomize(model, seed):
    """HF's init leaves norms at 1, cls/position embeddings at 0 and layer scale at 0.1; a parity test
    against such weights could not see a missing norm or a swapped embedding, so draw everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                p.copy_(1 + 0.2 * r)
            elif leaf == "bias":
                p.copy_(0.1 * r)
            elif leaf.startswith("lambda_"):
                p.copy_(0.5 + 0.3 * r)
            elif leaf in ("cls_token", "position_embeddings"):
                p.copy_(0.5 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            else:
                fan_in = p[0].numel()
                p.copy_(r / fan_in ** 0.5)


def vision_config(**kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=TILE, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu")
    base.update(kw)
    return InternVLVisionConfig(**base)


def text_config():
    return Qwen2Config(vocab_size=1020, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       bos_token_id=None, eos_token_id=1002, pad_token_id=1000)


# ---- remote-code layout ------------------------------------------------------------------------------
# transformers 5 keeps the on-disk names of the published `-hf` checkpoints (vision_tower.*,
# multi_modal_projector.*, language_model.model.*, language_model.lm_head.weight) and renames them to
# model.* only in memory. The regexes below are convert_internvl_weights_to_hf.py's vision and projector
# mappings, applied in order; a Qwen2 language model keeps its names.
VISION_FWD = [(r"vision_model", "vision_tower"), (r"layers", "layer"), (r"class_embedding", "cls_token"),
              (r"position_embedding", "position_embeddings"), (r"patch_embedding", "patch_embeddings.projection"),
              (r"ls(\d+)", r"lambda_\1"), (r"attn.proj", "attention.projection_layer"),
              (r"attn.dropout", "attention.projection_dropout"), (r"attn", "attention"),
              (r"norm1", "layernorm_before"), (r"norm2", "layernorm_after")]
MULTI_FWD = [(r"mlp1.0", "multi_modal_projector.layer_norm"), (r"mlp1.1", "multi_modal_projector.linear_1"),
             (r"mlp1.3", "multi_modal_projector.linear_2")]


def convert_forward(orig):
    """Original state dict -> `-hf` state dict, as the public conversion script does it."""
    out = {}
    for key, t in orig.items():
        new = key
        if key.startswith("vision_model"):
            for pat, rep in VISION_FWD:
                new = re.sub(pat, rep, new)
        elif not key.startswith("language_model"):
            for pat, rep in MULTI_FWD:
                new = re.sub(pat, rep, new)
        if "attention.qkv" in new:
            for part, x in zip("qkv", t.chunk(3, dim=0)):
                out[new.replace("attention.qkv", f"attention.{part}_proj")] = x
        else:
            out[new] = t
    return out


def to_original(hf):
    """Inverse of convert_forward for this model (checked by the round trip in main)."""
    vision = [(".encoder.layer.", ".encoder.layers."), ("embeddings.cls_token", "embeddings.class_embedding"),
              ("embeddings.position_embeddings", "embeddings.position_embedding"),
              ("patch_embeddings.projection", "patch_embedding"), ("lambda_", "ls"),
              ("attention.projection_layer", "attn.proj"), ("attention.", "attn."),
              ("layernorm_before", "norm1"), ("layernorm_after", "norm2")]
    out = {}
    for key, t in hf.items():
        if key.startswith("language_model."):
            out[key] = t
        elif key.startswith("multi_modal_projector."):
            rest = key[len("multi_modal_projector."):]
            for a, b in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
                rest = rest.replace(a, b)
            out["mlp1." + rest] = t
        elif key.startswith("vision_tower."):
            if ".k_proj." in key or ".v_proj." in key:
                continue
            if ".q_proj." in key:
                parts = [hf[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
                t, key = torch.cat(parts, 0), key.replace(".q_proj.", ".qkv.")
            new = "vision_model." + key[len("vision_tower."):]
            for a, b in vision:
                new = new.replace(a, b)
            out[new] = t
        else:
            raise KeyError(key)
    return {k: v.contiguous() for k, v in out.items()}


def remote_config(cfg: InternVLConfig):
    v, t = cfg.vision_config, cfg.text_config
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
        "downsample_ratio": cfg.downsample_ratio, "force_image_size": TILE, "select_layer": -1, "ps_version": "v2",
        "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": MAX_TILES,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size, "image_size": TILE, "patch_size": 14, "num_channels": 3,
            "qkv_bias": v.attention_bias, "qk_normalization": v.use_qk_norm, "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act, "initializer_factor": 0.1,
            "use_flash_attn": False, "drop_path_rate": 0.0},
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "max_position_embeddings": t.max_position_embeddings,
            "rope_theta": 1_000_000.0, "rms_norm_eps": t.rms_norm_eps, "tie_word_embeddings": False,
            "eos_token_id": 1002, "hidden_act": "silu", "use_sliding_window": False},
    }


# ---- main --------------------------------------------------------------------------------------------


class Processor(InternVLProcessor):
    # transformers checks the video processor's class even when none is given, and that class needs
    # torchvision; images and text never touch it.
    def check_argument_for_proper_class(self, name, arg):
        if arg is None and name == "video_processor":
            return None
        return super().check_argument_for_proper_class(name, arg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "Tests", "Fixtures", "internvl"))
    out = ap.parse_args().out
    tiny, remote, vit6b = (os.path.join(out, d) for d in ("tiny", "remote", "vit6b"))
    for d in (tiny, remote, vit6b):
        os.makedirs(d, exist_ok=True)
    bw = BinWriter()
    fx = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "pillow": Image.__version__}}

    # Tokenizer: the repo's tiny Qwen2 one plus InternVL's image tokens.
    tok = Tokenizer.from_file(BASE_TOKENIZER)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in EXTRA.values()])
    tok.save(os.path.join(tiny, "tokenizer.json"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tiny, "tokenizer.json"), eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", extra_special_tokens=EXTRA)
    tokenizer.chat_template = CHAT_TEMPLATE
    ctx_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")

    image_processor = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True,
                                               min_patches=1, max_patches=MAX_TILES, image_mean=IMAGENET_MEAN,
                                               image_std=IMAGENET_STD, resample=3)
    processor = Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                          chat_template=CHAT_TEMPLATE)
    # Saved piecewise: ProcessorMixin.save_pretrained insists on a video processor.
    tokenizer.save_pretrained(tiny)
    image_processor.save_pretrained(tiny)

    # Images: wide (100x40, ratio 2.5: ties between 2x1 and 3x1, the area rule keeps 2x1), tall (50x70 -> 2x3),
    # square (30x30 -> one tile, no thumbnail).
    images = {"wide": make_image(100, 40, 1), "tall": make_image(50, 70, 2), "square": make_image(30, 30, 3)}
    for name, im in images.items():
        im.save(os.path.join(out, f"{name}.png"))
    images = {n: Image.open(os.path.join(out, f"{n}.png")).convert("RGB") for n in images}

    fx["processor"] = {}
    for name, im in images.items():
        r = image_processor(images=[im], return_tensors="pt")
        grid = get_optimal_tiled_canvas((im.height, im.width), (TILE, TILE), 1, MAX_TILES)
        fx["processor"][name] = {"width": im.width, "height": im.height, "grid": list(grid),
                                 "num_patches": int(r["num_patches"][0]), "pixel_values": bw.add(r["pixel_values"])}

    # Tiling decisions at the real tile size and limits, including exact aspect-ratio ties.
    rng = np.random.default_rng(7)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 4000, size=(300, 2))]
    sizes += [(40, 100), (448, 448), (896, 448), (448, 1344), (512, 640), (100, 250), (1000, 2500), (1, 4000),
              (4000, 1), (300, 900), (900, 300), (449, 449), (600, 800)]
    fx["tiling"] = [[h, w, tile, mx, *get_optimal_tiled_canvas((h, w), (tile, tile), 1, mx)]
                    for tile, mx in ((448, 12), (TILE, MAX_TILES)) for h, w in sizes]

    # The model.
    cfg = InternVLConfig(vision_config=vision_config(norm_type="layer_norm", use_qk_norm=False, attention_bias=True),
                         text_config=text_config(), image_token_id=ctx_id, image_seq_length=4, downsample_ratio=0.5,
                         tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(cfg).eval()
    randomize(model, 1)
    model.save_pretrained(tiny, safe_serialization=True)
    model = InternVLForConditionalGeneration.from_pretrained(tiny, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 1000

    with torch.no_grad():
        pv = processor.image_processor(images=[images["wide"]], return_tensors="pt")["pixel_values"]
        vout = model.model.vision_tower(pixel_values=pv)
        feats = model.model.get_image_features(pixel_values=pv).pooler_output
        fx["vision"] = {"image": "wide", "last_hidden_state": bw.add(vout.last_hidden_state),
                        "image_features": bw.add(feats)}

        fx["prompts"] = []
        cases = [("wide_user", "wide", None, "Describe the image."),
                 ("tall_system", "tall", "Answer briefly.", "What is in the picture?"),
                 ("text_only", None, None, "Hello there, who are you?")]
        for name, image, system, text in cases:
            content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = processor(images=[images[image]] if image else None, text=[rendered], return_tensors="pt")
            logits = model(**inputs).logits[0]
            gen = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            fx["prompts"].append({"name": name, "image": image, "system": system, "text": text,
                                  "rendered": rendered, "input_ids": inputs["input_ids"][0].tolist(),
                                  "logits": bw.add(logits),
                                  "greedy_ids": gen[0, inputs["input_ids"].shape[1]:].tolist()})
            # generate's greedy path must agree with the plain forward's argmax at the first step.
            assert fx["prompts"][-1]["greedy_ids"][0] == int(logits[-1].argmax())

    # Remote-code layout of the same weights, verified by the conversion script's forward mapping.
    hf_state = load_file(os.path.join(tiny, "model.safetensors"))
    orig = to_original(hf_state)
    back = convert_forward(orig)
    assert back.keys() == hf_state.keys(), sorted(set(back) ^ set(hf_state))
    assert all(torch.equal(back[k], hf_state[k]) for k in back)
    # The forward regexes are not injective ("layers" -> "layer" leaves "layer" alone), so also check the
    # names against InternVLChatModel's module structure (modeling_intern_vit.py, mlp1 = Sequential).
    original = re.compile(r"vision_model\.(embeddings\.(class_embedding|position_embedding|patch_embedding\.(weight|bias))"
                          r"|encoder\.layers\.\d+\.(attn\.(qkv|proj)\.(weight|bias)|attn\.[qk]_norm\.weight"
                          r"|mlp\.fc[12]\.(weight|bias)|norm[12]\.(weight|bias)|ls[12]))$"
                          r"|mlp1\.[013]\.(weight|bias)$|language_model\.(model\..+|lm_head\.weight)$")
    assert all(original.match(k) for k in orig), [k for k in orig if not original.match(k)]
    save_file(orig, os.path.join(remote, "model.safetensors"), metadata={"format": "pt"})
    jdump(remote_config(cfg), os.path.join(remote, "config.json"))
    tok.save(os.path.join(remote, "tokenizer.json"))

    # InternViT-6B-style tower alone.
    vcfg = vision_config(norm_type="rms_norm", use_qk_norm=True, attention_bias=False, use_mean_pooling=False)
    vcfg._attn_implementation = "eager"
    torch.manual_seed(0)
    vmodel = InternVLVisionModel(vcfg).eval()
    randomize(vmodel, 2)
    save_file({k: v.contiguous() for k, v in vmodel.state_dict().items()}, os.path.join(vit6b, "model.safetensors"),
              metadata={"format": "pt"})
    jdump(vcfg.to_dict(), os.path.join(vit6b, "config.json"))
    with torch.no_grad():
        pv = image_processor(images=[images["tall"]], return_tensors="pt")["pixel_values"]
        fx["vit6b"] = {"image": "tall", "last_hidden_state": bw.add(vmodel(pixel_values=pv).last_hidden_state)}

    jdump(fx, os.path.join(out, "fixtures.json"))
    with open(os.path.join(out, "fixtures.bin"), "wb") as f:
        for c in bw.chunks:
            f.write(c)
    print("wrote", out, f"{bw.nbytes} bytes of arrays")


if __name__ == "__main__":
    main()
