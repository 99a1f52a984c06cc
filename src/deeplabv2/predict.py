"""``deeplabv2 predict``: run a trained model on people's own images.

For each input image writes ``{stem}.png`` (class indices as a palette PNG, 255 = none),
``{stem}_overlay.jpg`` (colours over the image) and optionally ``{stem}.npy`` (float16
``(C, H, W)`` probabilities). An unreadable file is reported and skipped; the run goes on.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.base import DatasetError, read_image
from .inference import InferenceConfig
from .visualize import overlay

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}


@dataclass
class PredictResult:
    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # input path -> why


def collect_inputs(inputs) -> list[Path]:
    """Files named, image files in folders named, and matches of glob patterns, sorted."""
    paths: list[Path] = []
    for item in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            paths.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            if not matches:
                raise FileNotFoundError(f"{item}: no such file, folder or matching pattern")
            paths += [m for m in matches if m.is_file()]
    return paths


def save_label_png(label: np.ndarray, palette: np.ndarray, path) -> None:
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette
    im.putpalette(flat.flatten().tolist())
    im.save(path)


@torch.no_grad()
def predict_files(model, inputs, out_dir, palette, *, device=None, save_probs: bool = False,
                  amp: str = "none", progress: bool = True, predict=None,
                  inference: InferenceConfig | None = None, crf=None) -> PredictResult:
    """Predict every image in ``inputs`` (file, folder, glob or a list of them) into ``out_dir``.

    ``inference`` chooses whole image / sliding window / scales / flip (default: whole image);
    ``predict(model, x)`` may replace it altogether; ``crf`` (a :class:`deeplabv2.crf.DenseCRF`)
    refines the probabilities with the image. Returns what was written and what
    failed; the caller decides the exit code.
    """
    device = torch.device(device or next(model.parameters()).device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = PredictResult()
    paths = collect_inputs(inputs)
    if progress:
        from tqdm.auto import tqdm
        paths = tqdm(paths, desc="predict", unit="img", dynamic_ncols=True)
    model.eval()
    for path in paths:
        try:
            image = read_image(path)
        except DatasetError as e:
            result.failed[str(path)] = str(e)
            continue
        x = model.preprocess(image).to(device)
        probs = (predict(model, x) if predict is not None else
                 (inference or InferenceConfig())(model, x, amp=amp))
        if crf is not None:
            probs = crf(probs, torch.from_numpy(image).to(device)[None])
        label = probs.argmax(1)[0].to(torch.uint8).cpu().numpy()
        stem = out_dir / Path(path).stem
        save_label_png(label, palette, f"{stem}.png")
        Image.fromarray(overlay(image, label, palette)).save(f"{stem}_overlay.jpg", quality=92)
        result.written.append(Path(f"{stem}.png"))
        if save_probs:
            np.save(f"{stem}.npy", probs[0].cpu().numpy().astype(np.float16))
    return result
