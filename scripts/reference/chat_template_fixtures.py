#!/usr/bin/env python3
"""Reference renders of chat templates, for Tests/ModelsTests/ChatTemplateTests.swift.

Usage (from the repository root; no torch needed):

    python3 -m venv /tmp/jvenv && /tmp/jvenv/bin/pip install transformers jinja2 tokenizers
    /tmp/jvenv/bin/python scripts/reference/chat_template_fixtures.py [--out Tests/Fixtures/chat_templates]

Each `*.jinja` in --out is a template written for the tests in the style of a public family's template
(SmolLM2, Qwen2.5, Qwen2.5-VL, Qwen3-VL, InternVL3 `-hf` and original, Llama 3.x, Gemma 3, Idefics3/SmolVLM, plus
engine_mix.jinja for constructs none of those uses). Every template is rendered with transformers'
`apply_chat_template(..., tokenize=False)` over every conversation below, with and without
add_generation_prompt. A render that raises (a template's raise_exception, or a string-only template
given a list of content parts) is recorded as {"error": ...}. Writes --out/expected.json.

Other templates (published ones, say) can be checked the same way without committing them: put the
`*.jinja` files in a folder, run this script with `--out` that folder, then
`TTRV_CHAT_TEMPLATE_FIXTURES=folder swift test --filter ChatTemplateTests.testRendersLikeTransformers`.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

from transformers import PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_OUT = os.path.join(ROOT, "Tests/Fixtures/chat_templates")
TOKENIZER = os.path.join(ROOT, "Tests/Fixtures/tokenizer/qwen2/tokenizer.json")
SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def img():
    return {"type": "image"}


def txt(t):
    return {"type": "text", "text": t}


CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is shown here?"}],
    "system_user": [{"role": "system", "content": "Answer in one word. "},
                    {"role": "user", "content": "  Hello there!\n"}],
    "multi_turn": [{"role": "system", "content": "You are terse."},
                   {"role": "user", "content": "Name a colour."},
                   {"role": "assistant", "content": "Blue."},
                   {"role": "user", "content": "Why that one?"}],
    "no_system_multi": [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": " Hello! "},
                        {"role": "user", "content": "Wie geht's? Ça va — 好吗?"}],
    "image_first": [{"role": "user", "content": [img(), txt("What is this?")]}],
    "image_between": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [txt("Compare "), img(), txt(" with the sky.")]}],
    "image_after": [{"role": "user", "content": [txt("Where is this? "), img()]}],
    "two_images_multi": [{"role": "user", "content": [img(), txt("First.")]},
                         {"role": "assistant", "content": "Ok."},
                         {"role": "user", "content": [txt("And this one: "), img(), txt(" What now?")]}],
    "bad_alternation": [{"role": "user", "content": "One."}, {"role": "user", "content": "Two."}],
    "thinking": [{"role": "user", "content": [txt("Think: "), img()]},
                 {"role": "assistant", "content": "<think>\nIt is red.\n</think>\n\nRed."},
                 {"role": "user", "content": "Sure?"}],
    "assistant_twice": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"},
                        {"role": "assistant", "content": "B"}],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=DEFAULT_OUT)
    out = ap.parse_args().out
    tok = PreTrainedTokenizerFast(tokenizer_file=TOKENIZER, **SPECIAL)
    cases = []
    for path in sorted(glob.glob(os.path.join(out, "*.jinja"))):
        name = os.path.basename(path)
        with open(path, encoding="utf-8") as f:
            template = f.read()
        for conv_name, messages in CONVERSATIONS.items():
            for agp in (True, False):
                case = {"template": name, "conversation": conv_name, "add_generation_prompt": agp}
                try:
                    case["text"] = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                           add_generation_prompt=agp)
                except Exception as e:  # noqa: BLE001 - recorded: the Swift side must fail too
                    case["error"] = f"{type(e).__name__}: {e}"
                cases.append(case)
    import jinja2
    import transformers
    result = {"versions": {"transformers": transformers.__version__, "jinja2": jinja2.__version__},
              "special_tokens": tok.special_tokens_map, "conversations": CONVERSATIONS, "cases": cases}
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(cases)} cases, {sum('error' in c for c in cases)} errors")


if __name__ == "__main__":
    main()
