"""``deeplabv2 export-hub``: a checkpoint as a model folder in the Hugging Face layout.

The folder holds

=====================  ===========================================================================
``model.safetensors``  the weights, with this project's metadata in the header (as every
                       ``.safetensors`` checkpoint of ours: :func:`deeplabv2.save_weights`)
``config.json``        the same metadata as JSON, plus the architecture's builder name and the
                       library's name and version (what the Hub shows and a reader greps)
``README.md``          the model card: YAML metadata (``library_name``, ``pipeline_tag``,
                       ``tags``, ``datasets``, ``metrics``, ``license``, ``model-index`` with the
                       mIoU) and how to load it, what it was trained on, how it scores
=====================  ===========================================================================

:func:`deeplabv2.load_model` (and so every command that takes a checkpoint) reads such a folder
without ``huggingface_hub``; writing the card uses ``huggingface_hub``'s ``ModelCard`` and
``ModelCardData`` (``pip install 'deeplabv2[hub]'``), which own the metadata conventions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..model.deeplab import LARGEFOV_RATES, RESNET_DEPTHS
from ..utils.fileio import atomic_write_text
from ..weights import (FORMAT, FORMAT_VERSION, MODEL_FOLDER_CONFIG, MODEL_FOLDER_WEIGHTS,
                       checkpoint_metadata, is_model_folder, load_model, save_weights)

CARD = "README.md"
#: what ``license:`` says unless ``--license`` is given: the weights inherit their training
#: data's terms (Cityscapes, GTA5 and SYNTHIA are not for commercial use), which we cannot know
DEFAULT_LICENSE = "unknown"


def architecture_name(config: dict) -> str:
    """The :mod:`deeplabv2.hub` builder of a model config (``"resnet101"``,
    ``"resnet101_v1c"``, ``"vgg16_largefov"``...), or ``"custom"`` for another depth/width."""
    if config.get("backbone") == "vgg16":
        rates = tuple(config.get("atrous_rates", ()))
        return "vgg16_largefov" if rates == LARGEFOV_RATES else "vgg16"
    blocks = tuple(config.get("blocks", RESNET_DEPTHS[101]))
    depth = next((d for d, b in RESNET_DEPTHS.items() if b == blocks), None)
    if depth is None or config.get("width", 64) != 64:
        return "custom"
    return f"resnet{depth}" + ("_v1c" if config.get("stem") == "v1c" else "")


@dataclass
class RunInfo:
    """What a training run folder says about a checkpoint: its ``config.yaml`` (text and
    parsed) and ``metrics.json`` (parsed), each None when absent."""

    folder: Path | None = None
    config_text: str | None = None
    config: dict = field(default_factory=dict)
    metrics: dict | None = None

    @classmethod
    def find(cls, checkpoint: Path, run: Path | None) -> "RunInfo":
        """The run folder ``run``, or else the checkpoint's own folder when it holds a
        ``config.yaml`` or ``metrics.json``; an empty :class:`RunInfo` when neither."""
        if run is not None:
            run = Path(run)
            if not run.is_dir():
                raise ValueError(f"{run}: --run is not a folder (give the training run folder "
                                 "that holds config.yaml and metrics.json)")
            if not ((run / "config.yaml").is_file() or (run / "metrics.json").is_file()):
                raise ValueError(f"{run}: no config.yaml or metrics.json (not a training run "
                                 "folder?)")
        else:
            here = checkpoint if checkpoint.is_dir() else checkpoint.parent
            if (here / "config.yaml").is_file() or (here / "metrics.json").is_file():
                run = here
        info = cls(folder=run)
        if run is None:
            return info
        if (run / "config.yaml").is_file():
            info.config_text = (run / "config.yaml").read_text(encoding="utf-8")
            try:
                info.config = yaml.safe_load(info.config_text) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{run / 'config.yaml'}: invalid YAML "
                                 f"({' '.join(str(e).split())[:160]})") from None
            if not isinstance(info.config, dict):
                raise ValueError(f"{run / 'config.yaml'}: not a mapping of config sections")
        if (run / "metrics.json").is_file():
            try:
                info.metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{run / 'metrics.json'}: invalid JSON ({e})") from None
            if not isinstance(info.metrics, dict) or "miou" not in info.metrics or \
                    not isinstance(info.metrics.get("classes"), dict):
                raise ValueError(f"{run / 'metrics.json'}: no 'miou' and 'classes'; expected "
                                 "the metrics.json a training run writes")
        return info

    def section(self, name: str) -> dict:
        value = self.config.get(name)
        return value if isinstance(value, dict) else {}

    @property
    def adapting(self) -> bool:
        return self.section("adapt").get("method", "none") not in (None, "none")

    @property
    def datasets(self) -> list[str]:
        """The training data: the source, and with adaptation the (unlabelled) target."""
        names = [self.section("data").get("dataset")]
        if self.adapting:
            names.append(self.section("adapt").get("target_dataset"))
        return [n for n in names if n]

    @property
    def eval_dataset(self) -> tuple[str | None, str | None]:
        """``(dataset, split)`` that ``metrics.json`` was measured on: the validation set the
        training loop uses (the target's with adaptation, cf. ``train.py``)."""
        data, adapt = self.section("data"), self.section("adapt")
        if self.adapting and adapt.get("target_val_split"):
            return adapt.get("target_dataset"), adapt.get("target_val_split")
        return data.get("dataset"), data.get("val_split", "val")


def hub_config(model, *, classes, palette) -> dict[str, Any]:
    """``config.json``: this project's checkpoint metadata (what ``model.safetensors`` records
    in its header) with the builder's name and the library's name and version on top."""
    from .. import __version__
    meta = checkpoint_metadata(model, classes, palette)
    config = {"library_name": FORMAT, "library_version": __version__,
              "architecture": architecture_name(meta["model_config"]),
              "num_classes": model.num_classes,
              "head_mode": meta["model_config"].get("head_mode", "aspp"),
              **{k: v for k, v in meta.items() if k != "format"},
              "weights": MODEL_FOLDER_WEIGHTS}
    config["format_version"] = config.pop("version")
    assert config["format_version"] == FORMAT_VERSION
    return json.loads(json.dumps(config))  # tuples as lists: as the weights' header holds them


def _percent(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def model_card(config: dict, run: RunInfo, *, repo_id: str | None, license: str,
               folder_name: str):
    """The :class:`huggingface_hub.ModelCard` of an exported folder: metadata header and text."""
    try:  # optional dependency: only the card needs it (start-up time of other verbs too)
        from huggingface_hub import EvalResult, ModelCard, ModelCardData
    except ImportError:
        raise ValueError("export-hub writes the model card with huggingface_hub: "
                         "pip install 'deeplabv2[hub]'") from None
    arch = config["architecture"]
    datasets = run.datasets
    eval_name, eval_split = run.eval_dataset
    tags = ["deeplabv2", "semantic-segmentation", "pytorch", "safetensors"]
    tags += [arch.replace("_", "-")] if arch != "custom" else []
    if run.adapting:
        tags += ["domain-adaptation", str(run.section("adapt")["method"])]
    protocol = ((run.metrics or {}).get("protocol") or {}).get("name", "none")
    results = []
    title = f"DeepLab v2 ({arch})" + (f" on {', '.join(datasets)}" if datasets else "")
    if run.metrics is not None and run.metrics.get("miou") is not None:
        results.append(EvalResult(
            task_type="image-segmentation", task_name="Semantic segmentation",
            dataset_type=eval_name or "unknown", dataset_name=eval_name or "unknown",
            dataset_split=eval_split, metric_type="mean_iou", metric_name="mIoU (%)",
            metric_value=round(100 * run.metrics["miou"], 2),
            metric_config=f"protocol {protocol}"))
    data = ModelCardData(
        library_name=FORMAT, pipeline_tag="image-segmentation", license=license,
        tags=tags, datasets=datasets or None, metrics=["mean_iou"] if results else None,
        model_name=title if results else None, eval_results=results or None)
    where = repo_id or "USER/REPO"
    lines = [f"# {title}", "",
             f"DeepLab v2 (Chen et al., TPAMI 2018) semantic segmentation, {config['num_classes']} "
             f"classes, exported by `deeplabv2 export-hub` (deeplabv2 "
             f"{config['library_version']}).", "",
             "## How to use it", "",
             "```python", "import deeplabv2", "",
             f'model = deeplabv2.load_model("{folder_name}")  # this folder, on disk',
             f'model = deeplabv2.from_pretrained("{where}")  # from the Hub (pip install '
             "'deeplabv2[hub]')",
             "```", "",
             "```bash",
             f"deeplabv2 predict {folder_name} IMAGES/ -o PREDICTIONS/",
             f"deeplabv2 evaluate {folder_name} -c CONFIG.yaml",
             "```", "",
             "`model.safetensors` carries the architecture, classes, palette, preprocessing and "
             "resizing convention in its header; `config.json` repeats them.", "",
             "## Model", "",
             "| | |", "| --- | --- |",
             f"| architecture | `deeplabv2_{arch}` |" if arch != "custom" else
             "| architecture | custom (see `model_config`) |",
             f"| model config | `{json.dumps(config['model_config'])}` |",
             f"| head mode | {config['head_mode']} |",
             f"| classes | {config['num_classes']} |",
             f"| input | {_describe_preprocessing(config['preprocessing'])} |",
             f"| alignment | {config['alignment']} |", ""]
    if config.get("classes"):
        palette = config.get("palette") or [None] * len(config["classes"])
        lines += ["| index | class | colour (RGB) |", "| --- | --- | --- |"]
        lines += [f"| {i} | {name} | {'' if rgb is None else tuple(rgb)} |"
                  for i, (name, rgb) in enumerate(zip(config["classes"], palette))]
        lines.append("")
    lines += ["## Training", ""]
    if run.config_text is not None:
        train = run.section("train")
        lines += [f"Trained on {', '.join(datasets) or 'the data of its config'}"
                  + (f" ({run.section('adapt')['method']} adaptation)" if run.adapting else "")
                  + (f", {train['iterations']} iterations" if train.get("iterations") else "")
                  + ". The run's `config.yaml`:", "", "```yaml", run.config_text.rstrip(), "```",
                  ""]
    else:
        lines += ["Not recorded: no `config.yaml` beside the checkpoint (`export-hub --run "
                  "RUN_DIR` names the run).", ""]
    lines += ["## Evaluation", ""]
    if run.metrics is not None:
        m = run.metrics
        limit = run.section("train").get("val_limit")
        lines += [f"The run's `metrics.json` (its last validation): {eval_name or 'dataset'} "
                  f"split `{eval_split}`"
                  + (f" (first {limit} images)" if limit else "")
                  + f", protocol `{protocol}`, {m.get('pixels', 'n/a')} labelled pixels.", "",
                  f"- mIoU: **{_percent(m.get('miou'))}**",
                  f"- pixel accuracy: {_percent(m.get('pixel_accuracy'))}",
                  f"- mean class accuracy: {_percent(m.get('mean_class_accuracy'))}", "",
                  "| class | IoU (%) | accuracy (%) |", "| --- | --- | --- |"]
        lines += [f"| {name} | {_percent((c or {}).get('iou'))} | "
                  f"{_percent((c or {}).get('accuracy'))} |" for name, c in m["classes"].items()]
        lines.append("")
    else:
        lines += ["Not recorded: no `metrics.json` beside the checkpoint (`export-hub --run "
                  "RUN_DIR` names the run).", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return card


def _describe_preprocessing(p: dict) -> str:
    return (f"{p.get('channel_order', '?')}, scale {p.get('scale', '?')}, mean "
            f"{p.get('mean', '?')}, std {p.get('std', '?')}")


def export_hub(checkpoint, out_dir, *, run=None, repo_id: str | None = None,
               license: str = DEFAULT_LICENSE, overwrite: bool = False) -> Path:
    """Write the model folder of ``checkpoint`` (any file :func:`deeplabv2.load_model` reads, a
    model folder, or a training run folder: its ``model.pth``) into ``out_dir`` and return it.

    ``run``: the training run folder whose ``config.yaml``/``metrics.json`` the card reports
    (default: the checkpoint's folder when it has them). ``out_dir`` may exist (e.g. a clone of
    the Hub repository); files of an earlier export in it are replaced only with ``overwrite``.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if checkpoint.is_dir() and not is_model_folder(checkpoint) and \
            (checkpoint / "model.pth").is_file():
        checkpoint = checkpoint / "model.pth"  # a training run folder: its final model
    run_info = RunInfo.find(checkpoint, run)
    model = load_model(checkpoint)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder")
    if out_dir.resolve() == (checkpoint if checkpoint.is_dir() else checkpoint.parent).resolve():
        raise ValueError(f"{out_dir}: the checkpoint's own folder; export into another one")
    ours = [out_dir / n for n in (MODEL_FOLDER_WEIGHTS, MODEL_FOLDER_CONFIG, CARD)]
    there = [p.name for p in ours if p.exists()]
    if there and not overwrite:
        raise ValueError(f"{out_dir}: already holds {', '.join(there)}; pass --overwrite to "
                         "replace them")
    config = hub_config(model, classes=model.classes, palette=model.palette)
    # the card first: without huggingface_hub nothing is written
    card = model_card(config, run_info, repo_id=repo_id, license=license,
                      folder_name=repo_id.split("/")[-1] if repo_id else out_dir.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, out_dir / MODEL_FOLDER_WEIGHTS, model.classes, model.palette)
    atomic_write_text(out_dir / MODEL_FOLDER_CONFIG, json.dumps(config, indent=2) + "\n")
    atomic_write_text(out_dir / CARD, str(card))
    return out_dir


def cmd_export_hub(args) -> int:
    out = export_hub(args.checkpoint, args.out_dir, run=args.run, repo_id=args.repo_id,
                     license=args.license, overwrite=args.overwrite)
    print(f"model folder written to {out} ({MODEL_FOLDER_WEIGHTS}, {MODEL_FOLDER_CONFIG}, "
          f"{CARD}); upload it with `huggingface-cli upload USER/REPO {out}` (or `hf upload`)")
    return 0


def register(subparsers) -> None:
    """Add the ``export-hub`` subcommand to ``deeplabv2``'s subparsers."""
    eh = subparsers.add_parser(
        "export-hub", help="a checkpoint as a model folder in the Hugging Face layout",
        description="Write model.safetensors (weights and metadata), config.json and a "
                    "README.md model card (metadata header, loading, the run's config.yaml, "
                    "its metrics.json) into OUT_DIR, which deeplabv2.load_model, every "
                    "command that takes a checkpoint and deeplabv2.from_pretrained read.")
    eh.add_argument("checkpoint", help="a deeplabv2 checkpoint (.pth or .safetensors), a model "
                                       "folder, or a training run folder (its model.pth)")
    eh.add_argument("out_dir", help="the model folder to write (created if missing)")
    eh.add_argument("--run", default=None,
                    help="training run folder whose config.yaml and metrics.json the card "
                         "reports (default: the checkpoint's folder, when it holds them)")
    eh.add_argument("--repo-id", default=None,
                    help="USER/REPO the folder will be uploaded to, for the card's examples")
    eh.add_argument("--license", default=DEFAULT_LICENSE,
                    help="the card's license: the weights follow their training data's terms")
    eh.add_argument("--overwrite", action="store_true",
                    help="replace model.safetensors, config.json and README.md of an earlier "
                         "export in OUT_DIR")
    eh.set_defaults(func=cmd_export_hub)
