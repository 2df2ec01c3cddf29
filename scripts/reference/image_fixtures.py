#!/usr/bin/env python3
"""Reference fixtures for Tests/ModelsTests/ImageTests.swift, produced by Pillow.

Writes Tests/Fixtures/images/: encoded inputs (PNG variants, JPEGs), the pixels
PIL decodes from them and PIL resize outputs as raw HWC uint8 .bin files, and
expected.json with shapes plus Fashion-MNIST IDX reference values.

Usage: python scripts/reference/image_fixtures.py   (needs pillow, numpy)
Deterministic: fixed numpy seed; rerunning only changes files if Pillow does.
"""
import gzip
import json
import os
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "Tests", "Fixtures", "images")
FASHION = "/usr/share/datasets/fashion-mnist"
rng = np.random.default_rng(1234)
expected = {"pillow": Image.__version__, "images": {}}


def smooth_rgb(w, h):
    """Gradients plus a few hard edges and mild noise: exercises both the smooth
    and the ringing parts of the resampling kernels."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 127.5 + 127.5 * np.sin(x / 3.0 + y / 5.0)
    img = np.stack([r, g, b], axis=-1)
    img[(x > w / 3) & (x < w / 2) & (y > h / 4)] = [250, 10, 40]
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def save_bin(name, arr):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    arr.tofile(os.path.join(OUT, name + ".bin"))
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else arr.shape[2]
    expected["images"][name] = {"width": w, "height": h, "channels": c}


def decoded(path, mode):
    """The pixels PIL hands to a model: convert() drops alpha, expands palettes."""
    with Image.open(path) as im:
        return np.asarray(im.convert(mode))


def main():
    os.makedirs(OUT, exist_ok=True)
    p = lambda name: os.path.join(OUT, name)

    # Lossless inputs: Swift's decode must equal PIL's exactly.
    rgb = smooth_rgb(19, 13)
    Image.fromarray(rgb).save(p("rgb.png"))
    save_bin("rgb.png", decoded(p("rgb.png"), "RGB"))

    gray = smooth_rgb(17, 11)[..., 1]
    Image.fromarray(gray).save(p("gray.png"))
    save_bin("gray.png", decoded(p("gray.png"), "L"))

    pal = Image.fromarray(smooth_rgb(16, 12)).quantize(colors=13)
    pal.info["transparency"] = 3  # tRNS on a palette: must still come out as plain RGB
    pal.save(p("palette.png"), transparency=3)
    save_bin("palette.png", decoded(p("palette.png"), "RGB"))

    rgba = np.dstack([smooth_rgb(15, 9), rng.integers(0, 256, (9, 15), dtype=np.uint8)])
    Image.fromarray(rgba).save(p("rgba.png"))
    save_bin("rgba.png", decoded(p("rgba.png"), "RGB"))

    la = np.dstack([gray[:7, :10], rng.integers(0, 256, (7, 10), dtype=np.uint8)])
    Image.fromarray(la).save(p("gray_alpha.png"))
    save_bin("gray_alpha.png", decoded(p("gray_alpha.png"), "L"))

    bits = (gray[:9, :13] > 128)
    Image.fromarray(bits).save(p("bilevel.png"))  # mode "1": 1-bit grayscale PNG
    save_bin("bilevel.png", decoded(p("bilevel.png"), "L"))

    # 16-bit gray; PIL's own convert("L") clips rather than scales, so the
    # expectation is the high byte (what the Swift decoder documents).
    deep = (gray[:6, :8].astype(np.uint16) * 257 + rng.integers(0, 257, (6, 8))).astype(np.uint16)
    Image.fromarray(deep).save(p("gray16.png"))
    with Image.open(p("gray16.png")) as im:
        assert im.mode.startswith("I"), im.mode
        save_bin("gray16.png", (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8))

    # JPEG: stored expectation is PIL's decode (its bundled libjpeg-turbo).
    Image.fromarray(smooth_rgb(48, 32)).save(p("photo.jpg"), quality=90)
    save_bin("photo.jpg", decoded(p("photo.jpg"), "RGB"))
    Image.fromarray(gray).save(p("gray.jpg"), quality=85)
    save_bin("gray.jpg", decoded(p("gray.jpg"), "L"))
    # Adobe CMYK JPEG (stored inverted); PIL's CMYK->RGB is (255-C)(255-K)/255.
    Image.fromarray(smooth_rgb(16, 12)).convert("CMYK").save(p("cmyk.jpg"), quality=95)
    save_bin("cmyk.jpg", decoded(p("cmyk.jpg"), "RGB"))
    # 4:2:0 subsampled, larger: timing input for the 224 px pipeline.
    big = np.asarray(Image.fromarray(smooth_rgb(64, 64)).resize((512, 512), Image.BICUBIC))
    Image.fromarray(big).save(p("large.jpg"), quality=75)

    # Resize references: non-integer factors, up and down, RGB and gray.
    up = smooth_rgb(37, 23)
    Image.fromarray(up).save(p("resize_src_37x23.png"))
    down = smooth_rgb(100, 80)
    Image.fromarray(down).save(p("resize_src_100x80.png"))
    # Pillow 13 runs the vertical pass first when height shrinks by more than
    # twice as many pixels as width (37x23->50x17, 100x80->90x40); cover both orders.
    cases = [(up, "37x23", (64, 64)), (down, "100x80", (28, 21)), (up, "37x23", (50, 17)), (down, "100x80", (90, 40))]
    for src, name, size in cases:
        for filt, fname in [(Image.BILINEAR, "bilinear"), (Image.BICUBIC, "bicubic"), (Image.NEAREST, "nearest")]:
            out = Image.fromarray(src).resize(size, filt)
            save_bin(f"resize_{name}_{size[0]}x{size[1]}_{fname}", np.asarray(out))
    gray_down = Image.fromarray(down[..., 0]).resize((28, 21), Image.BICUBIC)
    save_bin("resize_100x80_gray_28x21_bicubic", np.asarray(gray_down))

    # Fashion-MNIST references (tests skip if the dataset is absent).
    idx = {}
    labels_path = os.path.join(FASHION, "t10k-labels-idx1-ubyte.gz")
    images_path = os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")
    if os.path.exists(labels_path) and os.path.exists(images_path):
        labels = np.frombuffer(gzip.open(labels_path).read()[8:], np.uint8)
        images = np.frombuffer(gzip.open(images_path).read()[16:], np.uint8)
        idx = {
            "labels_count": int(labels.size),
            "first_labels": labels[:20].tolist(),
            "label_sum": int(labels.astype(np.int64).sum()),
            "images_count": int(images.size // 784),
            "image_byte_sum": int(images.astype(np.int64).sum()),
            # Position-weighted, so a transposed or shifted read also fails.
            "first_image_weighted_sum": int((images[:784].astype(np.int64) * np.arange(1, 785)).sum()),
        }
    else:
        print("warning: Fashion-MNIST not found; IDX reference values omitted", file=sys.stderr)
    expected["idx"] = idx

    with open(p("expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    total = sum(os.path.getsize(p(n)) for n in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes to {OUT}")


if __name__ == "__main__":
    main()
