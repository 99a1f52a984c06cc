"""``deeplabv2 predict``: run a trained model on people's own images.

For each input image writes ``{stem}.png`` (class indices as a palette PNG, 255 = none),
``{stem}_overlay.jpg`` (colours over the image), optionally ``{stem}.npy`` (float16
``(C, H, W)`` probabilities) and ``{stem}_labelIds.png`` (Cityscapes label ids, the official
submission format), plus ``legend.png``. An unreadable file is reported and skipped; the run
goes on.

Nothing is lost: an output never replaces an input (a run whose outputs would land on an input
file is refused before anything is written), and inputs that share a stem (``a/x.png``,
``b/x.png``, ``a/x.jpg``) get distinct outputs (``a/x.png``, ``b/x.png``: the folders below
their common parent; ``a/x_jpg.png`` when only the extension differs). Every file is written
under a temporary name and renamed, so an interrupted run leaves no half-written PNG.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.base import DatasetError, read_image
from ..data.cityscapes import train_to_label_ids
from ..utils.fileio import atomic_write, atomic_write_buffered
from .front import InferenceConfig, segment
from ..utils.visualize import overlay

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}


@dataclass
class PredictResult:
    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # input path -> why


def collect_inputs(inputs) -> list[Path]:
    """Files named, image files in folders named, and matches of glob patterns, sorted; a file
    reached twice (named and in a folder named) is listed once."""
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
    seen, unique = set(), []
    for p in paths:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def output_names(paths: list[Path]) -> list[str]:
    """The output stem (relative to the output folder, without extension) of every input: its
    file stem; for inputs sharing a stem, the path below their common folder (``a/x``,
    ``b/x``), with ``_{ext}`` added where only the extension differs (``x_jpg``)."""
    resolved = [Path(os.path.realpath(p)) for p in paths]
    by_stem: dict[str, list[int]] = {}
    for i, p in enumerate(resolved):
        by_stem.setdefault(p.stem, []).append(i)
    names: list[str] = [""] * len(paths)
    for stem, idx in by_stem.items():
        if len(idx) == 1:
            names[idx[0]] = stem
            continue
        root = Path(os.path.commonpath([str(resolved[i].parent) for i in idx]))
        rel = {i: resolved[i].relative_to(root).with_suffix("").as_posix() for i in idx}
        counts = Counter(rel.values())
        for i in idx:
            ext = resolved[i].suffix.lstrip(".").lower()
            names[i] = f"{rel[i]}_{ext}" if counts[rel[i]] > 1 else rel[i]
    return names


def _output_files(name: str, save_probs: bool, cityscapes_ids: bool) -> list[str]:
    files = [f"{name}.png", f"{name}_overlay.jpg"]
    if cityscapes_ids:
        files.append(f"{name}_labelIds.png")
    if save_probs:
        files.append(f"{name}.npy")
    return files


def plan_outputs(paths: list[Path], out_dir: Path, *, save_probs: bool = False,
                 cityscapes_ids: bool = False) -> list[str]:
    """:func:`output_names` made unique over every file written (``legend.png`` included;
    ``_2``, ``_3`` added on a clash), checked never to land on an input file.

    Raises ``ValueError`` naming the output and the input it would replace."""
    taken = {"legend.png"}
    names = []
    for name in output_names(paths):
        candidate, n = name, 1
        while any(f.lower() in taken for f in _output_files(candidate, save_probs,
                                                             cityscapes_ids)):
            n += 1
            candidate = f"{name}_{n}"
        taken.update(f.lower() for f in _output_files(candidate, save_probs, cityscapes_ids))
        names.append(candidate)
    inputs = {os.path.realpath(p): p for p in paths}
    for name in names:
        for f in _output_files(name, save_probs, cityscapes_ids):
            target = os.path.realpath(out_dir / f)
            if target in inputs:
                raise ValueError(f"{out_dir / f}: predicting into the input folder would replace "
                                 f"the input image {inputs[target]}; write to another folder "
                                 f"(-o)")
    return names


def _save_image(im: Image.Image, path, fmt: str, **kw) -> None:
    atomic_write_buffered(path, lambda f: im.save(f, format=fmt, **kw), fsync=False)


def save_label_png(label: np.ndarray, palette: np.ndarray, path) -> None:
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette
    im.putpalette(flat.flatten().tolist())
    _save_image(im, path, "PNG")


def legend(class_names, palette, path, *, swatch: int = 18) -> None:
    """A PNG listing each class's colour and name (used by predict and the demo report)."""
    _save_image(legend_image(class_names, palette, swatch=swatch), path, "PNG")


def legend_image(class_names, palette, *, swatch: int = 18) -> Image.Image:
    """Each class's colour swatch and name, one a row, as an RGB image."""
    width = 12 + swatch + 8 + 7 * max(len(n) for n in class_names) + 12
    im = Image.new("RGB", (width, 8 + (swatch + 6) * len(class_names) + 2), "white")
    draw = ImageDraw.Draw(im)
    for i, name in enumerate(class_names):
        y = 8 + i * (swatch + 6)
        draw.rectangle([12, y, 12 + swatch, y + swatch], fill=tuple(int(c) for c in palette[i]),
                       outline="black")
        draw.text((12 + swatch + 8, y + 3), name, fill="black")
    return im


def _batches(paths, names, batch_size: int, failed: dict):
    """Readable ``(path, output name, image)`` grouped into batches of equal size (in input
    order)."""
    batch: list[tuple[Path, str, np.ndarray]] = []
    for path, name in zip(paths, names):
        try:
            image = read_image(path)
        except DatasetError as e:
            failed[str(path)] = str(e)
            continue
        if batch and (len(batch) == batch_size or batch[0][2].shape != image.shape):
            yield batch
            batch = []
        batch.append((Path(path), name, image))
    if batch:
        yield batch


@torch.no_grad()
def predict_files(model, inputs, out_dir, palette, *, device=None, save_probs: bool = False,
                  amp: str = "none", progress: bool = True,
                  inference: InferenceConfig | None = None, crf=None, batch_size: int = 4,
                  cityscapes_ids: bool = False, class_names=None) -> PredictResult:
    """Predict every image in ``inputs`` (file, folder, glob or a list of them) into ``out_dir``.

    Images of equal size are segmented ``batch_size`` at a time by
    :func:`deeplabv2.inference.front.segment`: ``inference`` chooses whole image / sliding
    window / scales / flip (default: whole image); ``crf`` (a
    :class:`deeplabv2.inference.crf.DenseCRF`) refines the probabilities with the image.
    ``cityscapes_ids`` also writes ``{stem}_labelIds.png`` with Cityscapes label ids (the
    official submission format). ``class_names`` adds ``legend.png``. Returns what was
    written and what failed; the caller decides the exit code.
    """
    device = torch.device(device or next(model.parameters()).device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cityscapes_ids:
        if model.num_classes != 19:
            raise ValueError(f"Cityscapes label ids need a 19-class model, this one has "
                             f"{model.num_classes}")
    result = PredictResult()
    paths = collect_inputs(inputs)
    names = plan_outputs(paths, out_dir, save_probs=save_probs, cityscapes_ids=cityscapes_ids)
    bar = None
    if progress:
        from tqdm.auto import tqdm  # only when a bar is shown (70 ms of start-up)
        bar = tqdm(total=len(paths), desc="predict", unit="img", dynamic_ncols=True)
    model.eval()
    for batch in _batches(paths, names, batch_size, result.failed):
        seg = segment(model, np.stack([image for _, _, image in batch]), inference,
                      device=device, amp=amp, crf=crf)
        labels = seg.labels.to(torch.uint8).cpu().numpy()
        for (path, name, image), label, p in zip(batch, labels, seg.probs):
            stem = out_dir / name
            save_label_png(label, palette, f"{stem}.png")
            _save_image(Image.fromarray(overlay(image, label, palette)), f"{stem}_overlay.jpg",
                        "JPEG", quality=92)
            if cityscapes_ids:
                _save_image(Image.fromarray(train_to_label_ids(label)), f"{stem}_labelIds.png",
                            "PNG")
            if save_probs:
                probs16 = p.cpu().numpy().astype(np.float16)
                atomic_write(f"{stem}.npy", lambda tmp: _save_npy(tmp, probs16), fsync=False)
            result.written.append(Path(f"{stem}.png"))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.update(len(paths) - bar.n)
        bar.close()
    if class_names:
        legend(class_names, palette, out_dir / "legend.png")
    return result


def _save_npy(path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, array)
