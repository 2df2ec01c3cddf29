#!/usr/bin/env python3
"""Hostile PyTorch checkpoints for the pickle VM in Sources/Models/TorchCheckpoint.swift.

Writes Tests/Fixtures/hostile/ (or argv[1]): one small .pt per attack and expected.json, which maps
each file to the words its load error must contain ("" entries: the file must load, e.g. the memo
bomb, whose shared structure is harmless unless something walks it). Needs only the standard library.

Every code-running payload would `touch` MARKER if unpickled by Python's pickle (do NOT do that);
the tests assert the marker never appears. The pickles are assembled opcode by opcode so that each
attack is exactly what the name says; a few come from the stdlib pickler to show real-world shape.

Run: python3 scripts/reference/hostile_fixtures.py
"""
import json
import os
import pickle
import struct
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "Tests", "Fixtures", "hostile")
MARKER = "/tmp/ttrv-hostile-payload-ran"
os.makedirs(OUT, exist_ok=True)
CMD = "touch " + MARKER

# ------------------------------------------------------------------ opcode assembler


def proto(n=2):
    return b"\x80" + bytes([n])


def uni(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL


def stack_glob(module, name):
    return uni(module) + uni(name) + b"\x93"  # STACK_GLOBAL


def integer(i):
    if 0 <= i < 256:
        return b"K" + bytes([i])
    if -2**31 <= i < 2**31:
        return b"J" + struct.pack("<i", i)
    body = i.to_bytes(8 if -2**63 <= i < 2**63 else 9, "little", signed=True)  # LONG1
    return b"\x8a" + bytes([len(body)]) + body


def tup(*items):
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


MARK, STOP, REDUCE, BUILD, SETITEMS, APPEND = b"(", b".", b"R", b"b", b"u", b"a"
EMPTY_TUPLE, EMPTY_DICT, EMPTY_LIST, NEWFALSE, DUP = b")", b"}", b"]", b"\x89", b"2"


def ordered_dict():
    return glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE


def storage(key="0", numel=4, cls="FloatStorage"):
    return tup(uni("storage"), glob("torch", cls), uni(key), uni("cpu"), integer(numel)) + b"Q"  # BINPERSID


def tensor(offset=0, shape=(2, 2), stride=(2, 1), numel=4):
    return (glob("torch._utils", "_rebuild_tensor_v2")
            + tup(storage(numel=numel), integer(offset), tup(*map(integer, shape)), tup(*map(integer, stride)),
                  NEWFALSE, ordered_dict())
            + REDUCE)


def state_dict(*entries):
    """OrderedDict of (key bytes, value bytes) pairs, as torch writes a state dict."""
    return ordered_dict() + MARK + b"".join(uni(k) + v for k, v in entries) + SETITEMS


def torch_zip(name, pkl, storages={"0": struct.pack("<4f", 1, 2, 3, 4)}):
    """Stored (uncompressed) entries in torch's layout: archive/data.pkl, archive/data/<key>."""
    path = os.path.join(OUT, name)
    def entry(name):  # fixed timestamps keep the output byte-identical across runs
        return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(entry("archive/data.pkl"), pkl)
        z.writestr(entry("archive/byteorder"), "little")
        for key, raw in storages.items():
            z.writestr(entry("archive/data/" + key), raw)
        z.writestr(entry("archive/version"), "3\n")
    return path


def legacy(name, objects):
    """Legacy torch.save stream: magic, protocol, sys info, then the given pickles verbatim."""
    with open(os.path.join(OUT, name), "wb") as f:
        pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        for raw in objects:
            f.write(raw)


expected = {}


def zipped(name, body, words, **kw):
    torch_zip(name, proto() + body + STOP, **kw)
    expected[name] = words


# ------------------------------------------------------------------ code-running globals

zipped("os_system.pt", glob("os", "system") + tup(uni(CMD)) + REDUCE, ["disallowed global os.system"])
zipped("posix_system.pt", stack_glob("posix", "system") + tup(uni(CMD)) + REDUCE, ["disallowed global posix.system"])
zipped("builtins_eval.pt", glob("builtins", "eval") + tup(uni(f"__import__('os').system('{CMD}')")) + REDUCE,
       ["disallowed global builtins.eval"])
zipped("builtins_exec_stack_global.pt",
       stack_glob("builtins", "exec") + tup(uni(f"import os; os.system('{CMD}')")) + REDUCE,
       ["disallowed global builtins.exec"])
zipped("subprocess_popen.pt",
       glob("subprocess", "Popen") + tup(EMPTY_LIST + MARK + uni("touch") + uni(MARKER) + b"e") + REDUCE,
       ["disallowed global subprocess.Popen"])
# Looks like torch, is not an allow-listed callable.
zipped("torch_load.pt", glob("torch", "load") + tup(uni("/etc/passwd")) + REDUCE, ["disallowed global torch.load"])
zipped("numpy_reconstruct.pt", glob("numpy.core.multiarray", "_reconstruct") + EMPTY_TUPLE + REDUCE,
       ["disallowed global numpy.core.multiarray._reconstruct"])
# The payload hides inside an otherwise ordinary state dict, after a valid tensor.
zipped("nested_payload.pt", state_dict(("w", tensor()), ("evil", glob("os", "system") + tup(uni(CMD)) + REDUCE)),
       ["disallowed global os.system"])


class Evil:
    """What an attacker's class looks like to the stdlib pickler: GLOBAL of its own module."""

    def __reduce__(self):
        return (Evil, (CMD,))

    def __init__(self, *args):
        pass


Evil.__module__ = "attacker_module"
sys.modules["attacker_module"] = type(sys)("attacker_module")  # lets the stdlib pickler name the class
sys.modules["attacker_module"].Evil = Evil
zipped("reduce_custom_class.pt", pickle.dumps({"w": Evil()}, protocol=2)[2:-1],
       ["disallowed global attacker_module.Evil"])

# ------------------------------------------------------------------ opcodes that import or call

zipped("inst_opcode.pt", MARK + uni(CMD) + b"ios\nsystem\n", ["opcode 0x69"])            # INST
zipped("obj_opcode.pt", MARK + glob("collections", "OrderedDict") + b"o", ["opcode 0x6f"])  # OBJ
zipped("ext1_opcode.pt", b"\x82\x01" + EMPTY_TUPLE + REDUCE, ["opcode 0x82"])          # EXT1 (copyreg registry)
zipped("text_persid.pt", b"P0\n", ["opcode 0x50"])                                     # PERSID
zipped("newobj_ex.pt", glob("collections", "OrderedDict") + EMPTY_TUPLE + EMPTY_DICT + b"\x92",
       ["opcode 0x92"])                                                                 # NEWOBJ_EX
# BUILD would call __setstate__ / update __dict__ of whatever is below it.
zipped("build_on_tensor.pt", state_dict(("w", tensor() + EMPTY_DICT + uni("x") + integer(1) + b"s" + BUILD)),
       ["refused: BUILD on a tensor"])
zipped("build_on_global.pt", glob("collections", "OrderedDict") + EMPTY_DICT + BUILD, ["refused: BUILD on a"])
zipped("call_storage_class.pt", glob("torch", "FloatStorage") + tup(integer(10**9)) + REDUCE,
       ["cannot call", "with 1 arguments"])

# ------------------------------------------------------------------ absurd sizes and offsets

zipped("huge_storage_numel.pt", state_dict(("w", tensor(numel=2**62))), ["storage '0'", "expected 4611686018427387904"])
zipped("negative_storage_numel.pt", state_dict(("w", tensor(numel=-4))), ["storage '0'"])
zipped("huge_storage_offset.pt", state_dict(("w", tensor(offset=2**62))), ["tensor 'w'", "reach past"])
zipped("negative_offset.pt", state_dict(("w", tensor(offset=-1))), ["tensor 'w'", "invalid shape"])
zipped("zero_stride_view.pt", state_dict(("w", tensor(shape=(2**20, 2**20), stride=(0, 0)))),
       ["tensor 'w'", "overlapping views are refused"])
zipped("shape_overflow.pt", state_dict(("w", tensor(shape=(2**40, 2**40, 0), stride=(1, 1, 1)))),
       ["tensor 'w'", "too many elements"])
zipped("stride_overflow.pt", state_dict(("w", tensor(shape=(2, 2), stride=(2**62, 1)))), ["tensor 'w'"])
zipped("storage_missing.pt", state_dict(("w", tensor())), ["storage '0' missing"], storages={})

# ------------------------------------------------------------------ nesting, recursion, memo

zipped("deep_tuple.pt", EMPTY_TUPLE + b"\x85" * 5000, ["nests deeper than 100"])
zipped("deep_list.pt", EMPTY_LIST * 5000 + APPEND * 4999, ["nests deeper than 100"])
zipped("deep_dict.pt", (EMPTY_DICT + uni("k")) * 3000 + EMPTY_DICT + b"s" * 3000, ["nests deeper than 100"])
zipped("recursive_list.pt", EMPTY_LIST + b"\x94" + b"h\x00" + APPEND, ["recursive structure"])
zipped("recursive_dict.pt", EMPTY_DICT + b"\x94" + uni("self") + b"h\x00" + b"s", ["recursive structure"])
# A list already inside a tuple is grown through the memo: the cycle needs this, so it is refused.
zipped("recursive_via_memo.pt", EMPTY_LIST + b"\x94" + b"\x85" + b"h\x00" + EMPTY_LIST + APPEND,
       ["recursive structure"])
zipped("memo_unset.pt", b"j" + struct.pack("<I", 7), ["memo 7 unset"])
# Billion laughs: 40 levels, each a tuple of two references to the level below (2^40 leaves).
# Shared, never expanded: it must load (the tensor beside it) in bounded time and memory.
laughs = uni("lol") + b"\x94"
for level in range(40):
    laughs += b"h" + bytes([level]) + b"h" + bytes([level]) + b"\x86\x94"
zipped("memo_bomb.pt", state_dict(("w", tensor()), ("bomb", laughs)), [])

# ------------------------------------------------------------------ zip framing

with open(torch_zip("zip64_bad_locator.pt", proto() + state_dict(("w", tensor())) + STOP), "rb") as f:
    raw = f.read()
eocd = raw.rfind(b"PK\x05\x06")
patched = bytearray(raw[eocd:])
struct.pack_into("<I", patched, 16, 0xFFFFFFFF)  # central directory offset: "see zip64"
locator = struct.pack("<IIQI", 0x07064B50, 0, 2**63 - 8, 1)
with open(os.path.join(OUT, "zip64_bad_locator.pt"), "wb") as f:
    f.write(raw[:eocd] + locator + bytes(patched))
expected["zip64_bad_locator.pt"] = ["zip64 end-of-central-directory record missing"]

record_at = eocd
record = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 2**62, 2**62, 46, 2**63 - 1)
locator = struct.pack("<IIQI", 0x07064B50, 0, record_at, 1)
with open(os.path.join(OUT, "zip64_huge_directory.pt"), "wb") as f:
    f.write(raw[:eocd] + record + locator + bytes(patched))
expected["zip64_huge_directory.pt"] = ["central directory claims"]

# ------------------------------------------------------------------ legacy stream

legacy("legacy_os_system.pt", [proto() + glob("os", "system") + tup(uni(CMD)) + REDUCE + STOP])
expected["legacy_os_system.pt"] = ["disallowed global os.system"]

sys_info = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
legacy("legacy_huge_numel.pt", [sys_info, proto() + state_dict(("w", tensor())) + STOP,
                                pickle.dumps(["0"], protocol=2) + struct.pack("<Q", 2**62)])
expected["legacy_huge_numel.pt"] = ["truncated: storage '0' needs 4611686018427387904"]

# ------------------------------------------------------------------ decompression bombs (images)
# Refused from the header: decoding would allocate width x height before reading any pixel data.
import zlib  # noqa: E402


def png(name, width, height, rows):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    idat = zlib.compress(b"\0" * (width + 1) * rows)
    with open(os.path.join(IMAGES, name), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


IMAGES = os.path.join(OUT, "images")
os.makedirs(IMAGES, exist_ok=True)
png("png_bomb.png", 30000, 30000, 2)        # 9e8 pixels, within libpng's per-side limit
png("png_too_wide.png", 2**31 - 1, 1, 0)    # past the per-side limit
with open(os.path.join(ROOT, "Tests", "Fixtures", "images", "gray.jpg"), "rb") as f:
    jpeg = bytearray(f.read())
sof = jpeg.find(b"\xff\xc0")
struct.pack_into(">HH", jpeg, sof + 5, 65500, 65500)  # height, width of the frame header
with open(os.path.join(IMAGES, "jpeg_bomb.jpg"), "wb") as f:
    f.write(jpeg)

with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1, sort_keys=True)
    f.write("\n")
print(f"wrote {len(expected)} hostile checkpoints to {OUT}")
