"""A build's calibration and evaluation inputs, from the `[data]` specs, fitted to a model's inputs.

Specs (one kind, and for some an argument after a colon):

- `pydoc`: English sentences from Python's own documentation (`pydoc_data.topics`), tokenized;
- `other-english`: English from other sources (scikit-learn's data-set descriptions, the system's
  software licences) — evaluate on this when calibrating on `pydoc`;
- `text:PATH`: the non-empty lines of a text file, tokenized;
- `npz:PATH`: arrays by input name (first axis: samples), as `graphprune prune --calib`;
- `photos:china` / `photos:flower`: random crops of scikit-learn's two bundled photographs, at the
  model's image size, ImageNet-normalized — calibrate on one, evaluate on the other;
- `digits`: scikit-learn's handwritten digits, scaled to the model's image size (with labels);
- `random`: seeded random inputs.

Text needs the tokenizer of the source (`[source] hf`, or `[source] tokenizer`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from graphprune import calib
from graphprune.calib import CalibrationError
from graphprune.runtime import DEFAULT_DYNAMIC_DIM

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class Data:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    description: str  # where it came from, for the report
    windows: np.ndarray | None = None  # a causal LM's token windows [n, seq] (perplexity)


def fingerprint(spec: str, folder: Path) -> str:
    """What a spec names, for a cache key: the spec, and the content of a file it reads."""
    kind, _, argument = spec.partition(":")
    if kind in ("text", "npz"):
        path = resolve(argument, folder)
        return spec + ":" + (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing")
    return spec


def resolve(argument: str, folder: Path) -> Path:
    path = Path(argument).expanduser()
    return path if path.is_absolute() else folder / path


def load_data(spec: str, model: Path, samples: int, seq: int, folder: Path, tokenizer: str | None,
              seed: int = 0, causal: bool = False) -> Data:
    """`samples` inputs for the ONNX model at `model` from `spec` (see the module doc). `causal`: the
    model is a causal LM, so text becomes windows of `seq` tokens cut from one token stream, with
    empty KV caches where the model has them."""
    kind, _, argument = spec.partition(":")
    proto = onnx.load(str(model), load_external_data=False)
    if kind in ("pydoc", "other-english", "text") and causal:
        return _windows(kind, argument, model, samples, seq, folder, tokenizer)
    if kind in ("pydoc", "other-english", "text"):
        return _text(kind, argument, proto, samples, seq, folder, tokenizer)
    if kind == "npz":
        path = resolve(argument, folder)
        feeds = calib.load_calibration(path, proto)
        count = min(samples, len(next(iter(feeds.values()))))
        found = calib.load_labels(path, proto)
        return Data({k: v[:count] for k, v in feeds.items()}, None if found is None else found[:count],
                    f"{count} samples of {path.name}")
    if kind in ("photos", "digits"):
        return _images(kind, argument, proto, samples, seed)
    feeds = calib.random_calibration(proto, samples=samples, seed=seed,
                                     dynamic_dim=seq if _is_text(proto) else DEFAULT_DYNAMIC_DIM)
    return Data(feeds, None, f"{samples} seeded random inputs")


def _is_text(proto: onnx.ModelProto) -> bool:
    return any(v.name == "input_ids" for v in calib.model_inputs(proto))


def _lines(kind: str, argument: str, folder: Path, tokenizer: str | None) -> tuple[list[str], str]:
    """The text of a spec, line by line, and where it came from."""
    from graphprune.tools import text

    if tokenizer is None:
        raise CalibrationError(f"data '{kind}' is text, and the source has no tokenizer: give [source] hf or "
                               "[source] tokenizer")
    if kind == "text":
        path = resolve(argument, folder)
        if not path.is_file():
            raise CalibrationError(f"text file {path} does not exist")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()], path.name
    if kind == "pydoc":
        return list(text.english_sentences()), "Python's documentation"
    return list(text.other_sentences()), "scikit-learn's data-set descriptions and licences"


def _windows(kind: str, argument: str, model_path: Path, samples: int, seq: int, folder: Path,
             tokenizer: str | None) -> Data:
    from graphprune.ir.model import load_model
    from graphprune.tools.perplexity import causal_feeds, text_windows

    lines, where = _lines(kind, argument, folder, tokenizer)
    assert tokenizer is not None  # _lines refuses text without one
    windows = text_windows(" ".join(lines), calib.load_tokenizer(tokenizer), seq, limit=samples)
    feeds = causal_feeds(load_model(model_path), windows)
    return Data(feeds, None, f"{len(windows)} windows of {seq} tokens of {where}", windows)


def _text(kind: str, argument: str, proto: onnx.ModelProto, samples: int, seq: int, folder: Path,
          tokenizer: str | None) -> Data:
    lines, where = _lines(kind, argument, folder, tokenizer)
    lines = lines[:samples]
    if not lines:
        raise CalibrationError(f"data '{kind}' has no text lines")
    assert tokenizer is not None  # _lines refuses text without one
    encoded = calib.load_tokenizer(tokenizer)(lines, padding="max_length", truncation=True, max_length=seq,
                                              return_tensors="np")
    names = [v.name for v in calib.model_inputs(proto)]
    missing = [name for name in names if name not in encoded]
    if missing:
        raise CalibrationError(f"the tokenizer gives {', '.join(encoded)}, not {', '.join(missing)}")
    feeds = {name: np.asarray(encoded[name], dtype=np.int64) for name in names}
    return Data(feeds, None, f"{len(lines)} sentences of {where}, {seq} tokens")


def _image_input(proto: onnx.ModelProto) -> tuple[str, int, int, int]:
    inputs = calib.model_inputs(proto)
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim] if len(inputs) == 1 else []
    if len(dims) != 4 or min(dims[1:]) < 1:
        raise CalibrationError("image data needs a model with one input [batch, channels, height, width] "
                               "(static channels, height and width)")
    return inputs[0].name, dims[1], dims[2], dims[3]


def _images(kind: str, argument: str, proto: onnx.ModelProto, samples: int, seed: int) -> Data:
    name, channels, height, width = _image_input(proto)
    rng = np.random.default_rng(seed)
    labels = None
    if kind == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = rng.permutation(len(digits.images))[:samples]
        pictures = digits.images[order][..., None].repeat(3, axis=-1) / 16.0  # [n, 8, 8, 3] in [0, 1]
        labels = digits.target[order]
        where = f"{len(order)} scikit-learn digits"
    else:
        from sklearn.datasets import load_sample_image

        photo = argument or "china"
        if photo not in ("china", "flower"):
            raise CalibrationError(f"photos:{photo}: the bundled photographs are china and flower")
        image = load_sample_image(f"{photo}.jpg").astype(np.float32) / 255.0  # [427, 640, 3]
        side = min(image.shape[:2])
        pictures = []
        for _ in range(samples):  # crops of 1/4 to all of the short side, anywhere in the photograph
            size = int(rng.integers(side // 4, side + 1))
            top, left = (int(rng.integers(0, image.shape[i] - size + 1)) for i in (0, 1))
            pictures.append(image[top:top + size, left:left + size])
        where = f"{samples} random crops of scikit-learn's {photo}.jpg"
    batch = np.stack([_resize(picture, height, width) for picture in pictures])  # [n, h, w, 3]
    batch = (batch - IMAGENET_MEAN) / IMAGENET_STD
    if channels == 1:
        batch = batch.mean(axis=-1, keepdims=True)
    elif channels != 3:
        raise CalibrationError(f"image data is RGB or grey; the model's input has {channels} channels")
    feeds = {name: np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)}
    return Data(feeds, labels, f"{where}, {height}x{width}")


def _resize(picture: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an [h, w, c] picture."""
    from scipy.ndimage import zoom

    factors = (height / picture.shape[0], width / picture.shape[1], 1)
    resized = zoom(picture, factors, order=1)
    return resized[:height, :width]
