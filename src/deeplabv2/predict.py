"""``deeplabv2 predict``: run a trained model on people's own images.

For each input image writes ``{stem}.png`` (class indices as a palette PNG, 255 = none),
``{stem}_overlay.jpg`` (colours over the image), optionally ``{stem}.npy`` (float16
``(C, H, W)`` probabilities) and ``{stem}_labelIds.png`` (Cityscapes label ids, the official
submission format), plus ``legend.png``. An unreadable file is reported and skipped; the run
goes on.
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


def legend(class_names, palette, path, *, swatch: int = 18) -> None:
    """A PNG listing each class's colour and name (used by predict and the demo report)."""
    from PIL import ImageDraw
    width = 12 + swatch + 8 + 7 * max(len(n) for n in class_names) + 12
    im = Image.new("RGB", (width, 8 + (swatch + 6) * len(class_names) + 2), "white")
    draw = ImageDraw.Draw(im)
    for i, name in enumerate(class_names):
        y = 8 + i * (swatch + 6)
        draw.rectangle([12, y, 12 + swatch, y + swatch], fill=tuple(int(c) for c in palette[i]),
                       outline="black")
        draw.text((12 + swatch + 8, y + 3), name, fill="black")
    im.save(path)


def _batches(paths, batch_size: int, failed: dict):
    """Readable images grouped into batches of equal size (in input order)."""
    batch: list[tuple[Path, np.ndarray]] = []
    for path in paths:
        try:
            image = read_image(path)
        except DatasetError as e:
            failed[str(path)] = str(e)
            continue
        if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((Path(path), image))
    if batch:
        yield batch


@torch.no_grad()
def predict_files(model, inputs, out_dir, palette, *, device=None, save_probs: bool = False,
                  amp: str = "none", progress: bool = True, predict=None,
                  inference: InferenceConfig | None = None, crf=None, batch_size: int = 4,
                  cityscapes_ids: bool = False, class_names=None) -> PredictResult:
    """Predict every image in ``inputs`` (file, folder, glob or a list of them) into ``out_dir``.

    Images of equal size are run ``batch_size`` at a time. ``inference`` chooses whole image /
    sliding window / scales / flip (default: whole image); ``predict(model, x)`` may replace it
    altogether; ``crf`` (a :class:`deeplabv2.crf.DenseCRF`) refines the probabilities with the
    image. ``cityscapes_ids`` also writes ``{stem}_labelIds.png`` with Cityscapes label ids (the
    official submission format). ``class_names`` adds ``legend.png``. Returns what was
    written and what failed; the caller decides the exit code.
    """
    device = torch.device(device or next(model.parameters()).device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cityscapes_ids:
        from .data.cityscapes import train_to_label_ids
        if model.num_classes != 19:
            raise ValueError(f"Cityscapes label ids need a 19-class model, this one has "
                             f"{model.num_classes}")
    result = PredictResult()
    paths = collect_inputs(inputs)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(paths), desc="predict", unit="img", dynamic_ncols=True)
    model.eval()
    for batch in _batches(paths, batch_size, result.failed):
        images = np.stack([image for _, image in batch])
        x = model.preprocess(images).to(device)
        probs = (predict(model, x) if predict is not None else
                 (inference or InferenceConfig())(model, x, amp=amp))
        if crf is not None:
            probs = crf(probs, torch.from_numpy(images).to(device))
        labels = probs.argmax(1).to(torch.uint8).cpu().numpy()
        for (path, image), label, p in zip(batch, labels, probs):
            stem = out_dir / path.stem
            save_label_png(label, palette, f"{stem}.png")
            Image.fromarray(overlay(image, label, palette)).save(f"{stem}_overlay.jpg",
                                                                 quality=92)
            if cityscapes_ids:
                Image.fromarray(train_to_label_ids(label)).save(f"{stem}_labelIds.png")
            if save_probs:
                np.save(f"{stem}.npy", p.cpu().numpy().astype(np.float16))
            result.written.append(Path(f"{stem}.png"))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.update(len(paths) - bar.n)
        bar.close()
    if class_names:
        legend(class_names, palette, out_dir / "legend.png")
    return result
