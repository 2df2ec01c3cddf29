#!/usr/bin/env python3
"""End-to-end prompt fixtures: the tiny test checkpoints, each with a chat template like its family's,
and the prompt token ids transformers builds for them. For Tests/ModelsTests/PromptParityTests.swift.

Usage (from the repository root):

    python3 -m venv /tmp/jvenv && /tmp/jvenv/bin/pip install transformers jinja2 tokenizers pillow numpy torch
    /tmp/jvenv/bin/python scripts/reference/prompt_fixtures.py

With torch installed (CPU, float32, one thread, eager attention), each case also gets `greedy_ids`: the
8 tokens `generate(do_sample=False)` continues the prompt with (no EOS stop) on the tiny checkpoint --
tiny-llama for lm, the qwen25vl checkpoint, InternVL's `-hf` tiny checkpoint for both InternVL layouts
(the remote layout holds the same weights). Without torch, ids only.

Writes:
  Tests/Fixtures/lm/chat/tokenizer.json, tokenizer_config.json
        a byte-level BPE tokenizer trained here (vocab 320, fits tiny-llama's 512 embeddings) and a
        SmolLM2-style template with a default system turn; the test pairs them with lm/tiny-llama.
  Tests/Fixtures/internvl/remote/tokenizer_config.json
        the original (remote-code) InternVL layout's template: Qwen2.5 style, default system message.
  Tests/Fixtures/prompts.json
        per checkpoint, cases {name, image, system, text (ttrv's prompt, "<image>" where the image goes),
        rendered, input_ids}:
        - lm: tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        - qwen25vl, internvl (-hf): processor.apply_chat_template(..., tokenize=True), which loads the
          image and expands <|image_pad|> / <IMG_CONTEXT> as the processor does, with content parts in
          the user's order (images before, between, after text)
        - internvl remote: tokenizer.apply_chat_template on "<image>\\n…" text, then "<image>" replaced by
          <img> + num_patches x 4 <IMG_CONTEXT> + </img> and tokenised, as the original chat() and vLLM do.
"""
from __future__ import annotations

import json
import os

from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, InternVLProcessor, PreTrainedTokenizerFast, Qwen2_5_VLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(REPO, "Tests", "Fixtures")

LM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

REMOTE_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\n你是一个小小的测试模型。<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

CORPUS = ["What is the capital of France? Paris is the capital of France.",
          "Name a colour. Blue is a colour, and so are red and green.",
          "You are a tiny test model. Answer briefly, please."] * 20


def img(path):
    return {"type": "image", "path": path}


def txt(t):
    return {"type": "text", "text": t}


def messages(system, content):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


try:
    import torch
    torch.set_num_threads(1)
except ImportError:
    torch = None


def greedy(model, inputs):
    """8 greedy tokens after the prompt, without stopping at EOS."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def load(cls, path):
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def ids_of(x):
    return list(x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x)


def lm_cases():
    out = os.path.join(FIX, "lm", "chat")
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= 512
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "chat_template": LM_TEMPLATE}, f, indent=1)
    hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"), bos_token="<|im_start|>",
                                 eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = LM_TEMPLATE
    cases = []
    model = None
    if torch is not None:
        from transformers import LlamaForCausalLM
        model = load(LlamaForCausalLM, os.path.join(FIX, "lm", "tiny-llama"))
    for name, system, text in [("user", None, "What is the capital of France?"),
                               ("system", "Answer briefly.", "Name a colour.")]:
        m = messages(system, text)
        case = {"name": name, "image": None, "system": system, "text": text,
                "rendered": hf.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                "input_ids": ids_of(hf.apply_chat_template(m, tokenize=True, add_generation_prompt=True))}
        if model is not None:
            ids = torch.tensor([case["input_ids"]])
            case["greedy_ids"] = greedy(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        cases.append(case)
    return cases


class NoVideo:
    # transformers checks the video processor's class even when none is given, and that class needs
    # torchvision; images and text never touch it.
    def check_argument_for_proper_class(self, name, arg):
        if name == "video_processor":
            return None
        return super().check_argument_for_proper_class(name, arg)


class QwenProcessor(NoVideo, Qwen2_5_VLProcessor):
    pass


class InternProcessor(NoVideo, InternVLProcessor):
    pass


def processor_cases(proc, image_dir, specs, model=None):
    cases = []
    for name, image, system, parts, text in specs:
        content = [img(os.path.join(image_dir, image)) if p is None else txt(p) for p in parts]
        m = messages(system, content)
        rendered = proc.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        inputs = proc.apply_chat_template(m, tokenize=True, add_generation_prompt=True, return_dict=True,
                                          return_tensors="pt" if model is not None else "np")
        case = {"name": name, "image": image, "system": system, "text": text, "rendered": rendered,
                "input_ids": inputs["input_ids"][0].tolist()}
        if model is not None:
            case["greedy_ids"] = greedy(model, dict(inputs))
        cases.append(case)
    return cases


# (name, image file, system, content parts with None for the image, ttrv's prompt text)
VISION_SPECS = [
    ("image_first", "wide.png", None, [None, "Describe this image."], "Describe this image."),
    ("image_between", "tall.png", "Answer briefly.", ["Compare ", None, " to a cat."], "Compare <image> to a cat."),
    ("image_after", "wide.png", None, ["Where is this? ", None], "Where is this? <image>"),
    ("image_only", "tall.png", None, [None], "<image>"),
    ("text_only", None, "Be kind.", ["Hello there!"], "Hello there!"),
]


def qwen_cases():
    d = os.path.join(FIX, "qwen25vl")
    tok = AutoTokenizer.from_pretrained(d)
    with open(os.path.join(d, "tokenizer_config.json")) as f:
        template = json.load(f)["chat_template"]
    with open(os.path.join(d, "preprocessor_config.json")) as f:
        pp = json.load(f)
    ip = Qwen2VLImageProcessorPil(min_pixels=pp["min_pixels"], max_pixels=pp["max_pixels"])
    model = None
    if torch is not None:
        from transformers import Qwen2_5_VLForConditionalGeneration
        model = load(Qwen2_5_VLForConditionalGeneration, d)
    proc = QwenProcessor(image_processor=ip, tokenizer=tok, chat_template=template)
    return processor_cases(proc, d, VISION_SPECS, model)


def internvl_image_processor(d):
    with open(os.path.join(d, "preprocessor_config.json")) as f:
        pp = json.load(f)
    return GotOcr2ImageProcessorPil(size=pp["size"], crop_to_patches=True, min_patches=pp["min_patches"],
                                    max_patches=pp["max_patches"], image_mean=pp["image_mean"],
                                    image_std=pp["image_std"], resample=pp["resample"])


def internvl_cases():
    d = os.path.join(FIX, "internvl", "tiny")
    tok = AutoTokenizer.from_pretrained(d)
    with open(os.path.join(d, "chat_template.jinja")) as f:
        template = f.read()
    proc = InternProcessor(image_processor=internvl_image_processor(d), tokenizer=tok, image_seq_length=4,
                           chat_template=template)
    return processor_cases(proc, os.path.join(FIX, "internvl"), VISION_SPECS, internvl_model())


def internvl_model():
    if torch is None:
        return None
    from transformers import InternVLForConditionalGeneration
    return load(InternVLForConditionalGeneration, os.path.join(FIX, "internvl", "tiny"))


def remote_cases():
    d = os.path.join(FIX, "internvl", "remote")
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": REMOTE_TEMPLATE}, f,
                  ensure_ascii=False, indent=1)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = REMOTE_TEMPLATE
    ip = internvl_image_processor(os.path.join(FIX, "internvl", "tiny"))
    model = internvl_model()
    cases = []
    for name, image, system, _, text in VISION_SPECS:
        query = text if image is None or "<image>" in text else "<image>\n" + text
        rendered = tok.apply_chat_template(messages(system, query), tokenize=False, add_generation_prompt=True)
        prompt, pixels = rendered, None
        if image:
            im = Image.open(os.path.join(FIX, "internvl", image)).convert("RGB")
            processed = ip(images=[im], return_tensors="pt" if model is not None else "np")
            n = int(processed["num_patches"][0])
            prompt = rendered.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (n * 4) + "</img>", 1)
            pixels = processed["pixel_values"]
        case = {"name": name, "image": image, "system": system, "text": text, "rendered": rendered,
                "input_ids": tok(prompt, add_special_tokens=False)["input_ids"]}
        if model is not None:
            ids = torch.tensor([case["input_ids"]])
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if pixels is not None:
                inputs["pixel_values"] = pixels
            case["greedy_ids"] = greedy(model, inputs)
        cases.append(case)
    return cases


def main():
    import transformers
    fx = {"versions": {"transformers": transformers.__version__, "torch": torch.__version__ if torch else None},
          "lm": lm_cases(), "qwen25vl": qwen_cases(), "internvl": internvl_cases(), "internvl_remote": remote_cases()}
    with open(os.path.join(FIX, "prompts.json"), "w") as f:
        json.dump(fx, f, ensure_ascii=False, indent=1)
        f.write("\n")
    for k in ("lm", "qwen25vl", "internvl", "internvl_remote"):
        print(k, [(c["name"], len(c["input_ids"]), c.get("greedy_ids")) for c in fx[k]])


if __name__ == "__main__":
    main()
