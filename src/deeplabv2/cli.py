"""``deeplabv2`` command line: argument parsing only; the work is done by the library.

Each verb imports the part of the library it runs inside its own function: ``deeplabv2 X``
loads only what X needs (not OpenVINO, Starlette, matplotlib or TensorBoard for every verb),
which keeps ``--help`` and every verb's start-up short."""

from __future__ import annotations

import argparse
import json
import re
import sys

from .config import load_config

ARCHS = ("resnet101", "resnet50", "vgg16", "resnet101_v1c")
#: the help of every command's ``checkpoint`` argument
CHECKPOINT_HELP = ("a deeplabv2 checkpoint (.pth or .safetensors, e.g. RUN/model.pth) or a model "
                   "folder of `deeplabv2 export-hub` (model.safetensors + config.json)")


def _build(name: str, num_classes: int, weights):
    from . import hub
    return getattr(hub, f"deeplabv2_{name}")(num_classes, weights=weights)


def cmd_info(args) -> int:
    from .model.info import model_info
    m = _build(args.model, args.num_classes, args.weights).eval()
    info = model_info(m, args.height, args.width)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model            deeplabv2_{args.model} ({args.num_classes} classes, "
          f"backbone layout {m.layout}, {m.preprocessing.channel_order} input)")
    print(f"parameters       {info['parameters']:,} total, "
          f"{info['trainable_parameters']:,} trainable")
    print(f"FLOPs            {info['flops'] / 1e9:,.1f} GFLOPs per {args.height}x{args.width} "
          f"image (multiply-add = 2)")
    print(f"output stride    {info['output_stride']}")
    print(f"logits           {tuple(info['logits_shape'])} -> upsampled "
          f"{tuple(info['output_shape'])}")
    return 0


def _with_device(args) -> list:
    """The overrides plus ``train.device`` from ``--device`` (when given)."""
    extra = [f"train.device={args.device}"] if getattr(args, "device", None) else []
    return [*args.overrides, *extra]


def cmd_train(args) -> int:
    from .train import train
    cfg = load_config(args.config, _with_device(args))
    if args.resume and args.resume_from:
        raise ValueError("--resume continues OUT_DIR/last.pth and --from PATH another "
                         "checkpoint: give one of them")
    if args.overwrite and (args.resume or args.resume_from):
        raise ValueError("--overwrite starts the run again and --resume/--from continue it: "
                         "give one of them")
    result = train(cfg, resume=args.resume_from or args.resume, overwrite=args.overwrite,
                   allow_changes=args.allow_changes)
    if result.metrics is not None and _is_main():
        print(f"final val mIoU {100 * result.metrics['miou']:.2f}  (best "
              f"{100 * (result.best_miou or 0):.2f}); checkpoints in {result.out_dir}")
    return 0


def _is_main() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"


def _eval_dataset(cfg, split):
    from .data import build_dataset
    d = cfg.data
    return build_dataset(d.dataset, d.root, split or cfg.eval.split, **d.options)


def _print_metrics(results: dict, classes: list, out) -> None:
    from .evaluation.metrics import format_table, save_json
    print(format_table(results, classes))
    if out:
        save_json(results, classes, out)
        print(f"metrics written to {out}")


def _add_inference_args(sp) -> None:
    sp.add_argument("--crf", action="store_true",
                    help="refine with the dense CRF (the parameters released for the model's "
                         "backbone, updated by the config's eval.crf_params)")
    sp.add_argument("--msc", type=float, nargs="*", default=None, metavar="SCALE",
                    help="the paper's test-time multi-scale inputs: scores of each scale fused "
                         "by max (default scales 1 0.75 0.5; default: the config's "
                         "eval.msc_scales, else off)")
    sp.add_argument("--avg-scales", "--scales", dest="avg_scales", type=float, nargs="+",
                    default=None, metavar="SCALE",
                    help="another protocol: one pass per scale, probabilities averaged "
                         "(e.g. 0.5 0.75 1; default 1)")
    sp.add_argument("--alignment", choices=("caffe", "pytorch"), default=None,
                    help="resizing convention: caffe (the paper's, score cell i on pixel 8i) "
                         "or pytorch (align_corners=False, kazuto1011's); default: the one "
                         "the checkpoint records")
    sp.add_argument("--flip", action="store_true", help="also average the mirrored image")
    sp.add_argument("--sliding", type=int, default=None, metavar="CROP",
                    help="sliding windows of CROPxCROP instead of the whole image")
    sp.add_argument("--stride", type=int, default=None, help="window stride (default 2/3 CROP)")


def _prepare(model, args, device, checkpoint=None):
    """``model`` (loaded from ``checkpoint``, by default ``args.checkpoint``) prepared as the
    runtime flags say (:func:`deeplabv2.deploy.runtime.prepare_network`); what ``--precision
    auto`` chose is printed with its reason."""
    from .deploy.runtime import prepare_network, runtime_options
    prepared = prepare_network(model, device=device, checkpoint=checkpoint or args.checkpoint,
                               **runtime_options(args))
    if args.precision == "auto":
        print(prepared.note)
    return prepared


def _add_ensemble_arg(sp) -> None:
    sp.add_argument("--ensemble", nargs="+", default=None, metavar="CHECKPOINT",
                    help="more checkpoints whose softmax outputs are averaged with the first's "
                         "(FDA's multi-band ensemble: the runs with beta 0.01, 0.05, 0.09)")
    sp.add_argument("--ensemble-fuse", choices=("probs", "logits"), default=None,
                    help="with --ensemble: average the softmax outputs (probs, the default; "
                         "FDA-MBT) or sum the weighted logits (logits; ADVENT's "
                         "AdvEnt+MinEnt, eval_UDA.py)")
    sp.add_argument("--ensemble-weights", nargs="+", type=float, default=None, metavar="W",
                    help="with --ensemble: one positive weight per checkpoint, the first's "
                         "first (default equal; ADVENT's AdvEnt+MinEnt: 0.5 0.5)")


def _ensemble(prepared, args, device):
    """The prepared network alone, or with ``--ensemble``: an
    :class:`deeplabv2.inference.ensemble.Ensemble` of it and the other checkpoints, each loaded
    and prepared as it was (``--alignment``, ``--precision``, ``--eager``, ``--compile``)."""
    extra = getattr(args, "ensemble", None)
    fuse, weights = getattr(args, "ensemble_fuse", None), getattr(args, "ensemble_weights", None)
    if not extra:
        if fuse is not None or weights is not None:
            raise ValueError("--ensemble-fuse / --ensemble-weights need --ensemble")
        return prepared.net
    if weights is not None and len(weights) != 1 + len(extra):
        raise ValueError(f"--ensemble-weights: {len(weights)} weights for {1 + len(extra)} "
                         f"checkpoints ({args.checkpoint} and --ensemble's {len(extra)})")
    if prepared.precision == "int8" or args.runtime == "openvino":
        raise ValueError("--ensemble runs on the PyTorch runtime: drop --runtime openvino / "
                         "--precision int8")
    from .deploy.runtime import prepare_network, runtime_options
    from .inference.ensemble import Ensemble
    options = {**runtime_options(args), "precision": prepared.precision}
    members = [prepared.net]
    for path in extra:
        member = _load(args, device, path)
        members.append(prepare_network(member, device=device, checkpoint=path, **options).net)
    return Ensemble(members, names=[args.checkpoint, *extra], fuse=fuse or "probs",
                    weights=weights)


def _inference(args, base: dict | None = None):
    from .inference.front import InferenceConfig
    d = dict(base or {})
    if args.msc is not None:
        from .model.msc import PAPER_SCALES
        d["msc_scales"] = args.msc or list(PAPER_SCALES)
    if args.avg_scales:
        d["avg_scales"] = args.avg_scales
    if args.flip:
        d["flip"] = True
    if args.sliding:
        d.update(mode="sliding", crop_size=args.sliding, stride=args.stride)
    return InferenceConfig.from_dict(d)


def _crf(args, cfg, model):
    """The DenseCRF asked for by ``--crf`` or the config's ``eval.crf`` (None: no CRF): the
    preset of the model's backbone updated by the config's ``eval.crf_params``."""
    from .inference.crf import crf_preset
    if cfg is not None:
        return cfg.eval.dense_crf(model.config, force=args.crf)
    return crf_preset(model.config) if args.crf else None


def _load(args, device, checkpoint=None):
    """The checkpoint ``checkpoint`` (by default ``args.checkpoint``) on ``device``, with
    ``--alignment`` applied."""
    from .weights import load_model
    model = load_model(checkpoint or args.checkpoint, device=device)
    if getattr(args, "alignment", None):
        from .model import get_alignment
        model.alignment = get_alignment(args.alignment)
    return model


def cmd_crf_search(args) -> int:
    import itertools
    import json
    from .inference.crf import DenseCRF
    from .evaluation.evaluate import crf_search
    from .utils.distributed import pick_device
    cfg = load_config(args.config, args.overrides)
    device = pick_device(cfg.train.device)
    model = _load(args, device)
    ds = _eval_dataset(cfg, args.split)
    base = cfg.eval.dense_crf(model.config, force=True).to_dict()
    grid = [DenseCRF.from_dict({**base, "bi_w": w, "bi_xy_std": xy, "bi_rgb_std": rgb})
            for w, xy, rgb in itertools.product(args.bi_w, args.bi_xy_std, args.bi_rgb_std)]
    prepared = _prepare(model, args, device)
    results = crf_search(prepared.net, ds, grid, device=device, limit=args.limit,
                         inference=_inference(args, cfg.eval.inference().to_dict()),
                         amp=prepared.amp, progress=True)
    print(f"{'bi_w':>6} {'bi_xy_std':>10} {'bi_rgb_std':>11} {'mIoU %':>8}")
    for r in results:
        c = r["crf"]
        cols = ("no CRF", "", "") if c is None else (c["bi_w"], c["bi_xy_std"], c["bi_rgb_std"])
        print(f"{cols[0]:>6} {cols[1]:>10} {cols[2]:>11} {100 * r['miou']:8.2f}")
    best = max(results, key=lambda r: r["miou"])
    print(f"best: {best['crf'] or 'no CRF'} (mIoU {100 * best['miou']:.2f} on "
          f"{min(args.limit or len(ds), len(ds))} images)")
    if args.out:
        from .utils.fileio import atomic_write_text
        atomic_write_text(args.out, json.dumps({"results": results, "best": best}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from pathlib import Path
    if _is_run_folder(args.checkpoint):  # its snapshot series and final model
        return _evaluate_run(args)
    if not args.config:
        raise ValueError(f"{args.checkpoint}: -c/--config CONFIG is needed to evaluate a "
                         "checkpoint file (a run folder reads its own config.yaml)")
    cfg = load_config(args.config, _with_device(args))
    from .utils.distributed import pick_device
    device = pick_device(cfg.train.device)
    model = _load(args, device)
    # the set the config's run validates on: an adaptation config's target (as evaluate
    # RUN_DIR and training do), else its data section
    ds, which = _run_eval_dataset(cfg, args.split)
    ds.check(limit=0 if len(ds) else None)
    from .app.commands import finish_report, report_collector
    report = report_collector(args, ds)  # None without --report
    results, settings = _evaluate_loaded(args, cfg, device, args.checkpoint, model, ds, report,
                                         which["dataset"])
    _print_metrics(results, list(ds.classes), args.out)
    finish_report(args, report, results, title=f"{args.checkpoint} on {which['dataset']} "
                  f"{ds.split}", settings=settings)
    return 0


def _is_run_folder(path) -> bool:
    """A training run folder (``model.pth``, ``snapshots/``, ``config.yaml``), not a model
    folder of ``export-hub`` (``model.safetensors`` + ``config.json``, or a broken one that
    :func:`deeplabv2.load_model` then names)."""
    from pathlib import Path
    p = Path(path)
    return p.is_dir() and not ((p / "model.safetensors").is_file() or
                               (p / "config.json").is_file())


def _evaluate_loaded(args, cfg, device, checkpoint, model, ds, report=None, dataset=None):
    """The metrics of ``model`` (loaded from ``checkpoint``) on ``ds`` (named ``dataset``,
    by default ``data.dataset``) with the config's eval settings and the command's flags, and
    the settings the report states: one checkpoint of ``evaluate``, and each checkpoint of
    ``evaluate RUN_DIR``."""
    from .evaluation.evaluate import evaluate
    dataset = dataset or cfg.data.dataset
    if model.num_classes != ds.num_classes:
        raise ValueError(f"{checkpoint}: model has {model.num_classes} classes, dataset "
                         f"{dataset!r} has {ds.num_classes}")
    _require_same_classes(checkpoint, model.classes, ds)
    inference = _inference(args, cfg.eval.inference().to_dict())
    from .evaluation.protocols import get_protocol
    protocol = get_protocol(args.protocol or cfg.eval.protocol)
    prepared = _prepare(model, args, device, checkpoint)
    net = _ensemble(prepared, args, device)
    members = f" (ensemble with {', '.join(args.ensemble)}: {net.extra_repr()})" \
        if args.ensemble else ""
    print(f"evaluating {checkpoint}{members} on {dataset} {ds.split} "
          f"({len(ds)} images), "
          f"{protocol.describe() if protocol else inference.describe()}"
          f"{', dense CRF' if args.crf or cfg.eval.crf else ''}, "
          f"{prepared.precision}{' eager' if args.eager else ''}")
    crf = _crf(args, cfg, model)
    results = evaluate(net, ds, device=device, limit=args.limit, amp=prepared.amp,
                       num_workers=cfg.data.num_workers, inference=inference, crf=crf,
                       progress=True, on_image=report, protocol=protocol)
    return results, {"checkpoint": str(checkpoint), "ensemble": args.ensemble or [],
                     "ensemble fuse": net.extra_repr() if args.ensemble else "",
                     "inference": inference.describe(),
                     "protocol": protocol.describe() if protocol else "none",
                     "dense CRF": crf is not None, "precision": prepared.precision}


def _evaluate_run(args) -> int:
    """``evaluate RUN_DIR``: every snapshot and the final model of a run folder, through the
    single-checkpoint path (:func:`_evaluate_loaded`), with the run's ``config.yaml`` (or
    ``-c``) and the flags; ``snapshots.json``/``.md``/``.png`` into the run folder (or
    ``--out``), final and best printed (:mod:`deeplabv2.evaluation.series`)."""
    import dataclasses
    from pathlib import Path
    from .evaluation import series
    run_dir = Path(args.checkpoint)
    config = args.config or run_dir / "config.yaml"
    if not args.config and not Path(config).is_file():
        raise ValueError(f"{run_dir}: no config.yaml (not a training run folder?); give "
                         "-c CONFIG naming the dataset to evaluate on")
    if args.ensemble:
        raise ValueError("--ensemble takes checkpoint files, not a run folder")
    cfg = load_config(str(config), _with_device(args))
    t = cfg.train
    entries = series.run_entries(run_dir, t.stop_at or t.iterations)
    from .utils.distributed import pick_device
    device = pick_device(t.device)
    ds, which = _run_eval_dataset(cfg, args.split)
    ds.check(limit=0 if len(ds) else None)
    out = Path(args.out) if args.out else run_dir
    if out.suffix == ".json":
        raise ValueError(f"--out {out}: with a run folder, --out names the folder that gets "
                         "snapshots.json, .md and .png")
    flags = ("split", "limit", "crf", "msc", "avg_scales", "flip", "sliding", "stride",
             "alignment", "precision", "runtime", "eager", "compile", "winograd", "protocol")
    settings = {"dataset": which, "eval": {k: v for k, v in dataclasses.asdict(cfg.eval).items()
                                           if k != "selection"},  # no bearing on the numbers
                "split": ds.split, "images": len(ds),
                "flags": {k: getattr(args, k) for k in flags if hasattr(args, k)}}
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back from JSON
    from .app.commands import finish_report, report_collector
    report = report_collector(args, ds)
    final = next((e for e in entries if e.final), None)

    def evaluate_one(path, on_image):
        return _evaluate_loaded(args, cfg, device, path, _load(args, device, path), ds,
                                on_image, which["dataset"])[0]

    result = series.evaluate_series(
        run_dir, entries, evaluate_one, out / "snapshots.json", settings, list(ds.classes),
        fresh=[final.path] if report is not None and final is not None else (),
        on_image_for=lambda e: report if e.final else None, write=_is_main())
    if not _is_main():  # under torchrun every rank evaluated its share; rank 0 reports
        return 0
    result.selection = cfg.eval.selection
    title = f"{run_dir} on {which['dataset']} {ds.split}"
    files = series.write_outputs(result, out, title,
                                 f"{len(ds) if not args.limit else min(args.limit, len(ds))} "
                                 f"images; {len(result.rows)} checkpoints")
    reused = f", {len(result.cached)} from {files[0]}" if result.cached else ""
    print(f"{len(result.rows)} checkpoints ({len(result.evaluated)} evaluated now{reused})")
    for line in series.summary_lines(result):
        print(line)
    print("written: " + ", ".join(str(f) for f in files))
    if report is not None and result.final is not None:
        finish_report(args, report, series.row_metrics(result.final, list(ds.classes)),
                      title=f"{title}: final model ({result.final['file']})",
                      settings={"run": str(run_dir), "checkpoint": result.final["file"],
                                "snapshots": len(result.rows)},
                      sections=[series.html_section(result)])
    elif report is not None:
        print("no final model (model.pth) in the run folder: no report written")
    return 0


def _run_eval_dataset(cfg, split):
    """The split ``evaluate RUN_DIR`` scores, and what it is: the run's validation set, as
    training validated (``train._datasets``): an adaptation run's target dataset with
    ``adapt.target_val_options``, else ``data``'s; the split is ``--split``, else
    ``eval.split``."""
    from .data import build_dataset
    a, d = cfg.adapt, cfg.data
    split = split or cfg.eval.split
    if a.method != "none" and a.target_val_split:
        which = {"dataset": a.target_dataset, "root": a.target_root,
                 "options": dict(a.target_val_options)}
    else:
        which = {"dataset": d.dataset, "root": d.root, "options": dict(d.options)}
    return build_dataset(which["dataset"], which["root"], split, **which["options"]), which


def _require_same_classes(checkpoint, model_classes, ds) -> None:
    """A checkpoint that records class names must name the dataset's classes, in its order
    (same count, other names: the indices mean other things, and the scores would too)."""
    if model_classes and list(model_classes) != list(ds.classes):
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(model_classes, ds.classes))
                if a != b]
        raise ValueError(f"{checkpoint}: the model's classes are not the dataset's ("
                         + ", ".join(diff[:3]) + (" ..." if len(diff) > 3 else "") + ")")


def cmd_predict(args) -> int:
    from .inference.predict import predict_files
    from .utils.distributed import pick_device
    device = pick_device(args.device)
    model = _load(args, device)
    palette = model.palette
    if palette is None:
        from .data import voc_palette
        palette = voc_palette(model.num_classes)
    prepared = _prepare(model, args, device)
    net = _ensemble(prepared, args, device)
    result = predict_files(net, args.inputs, args.out, palette, device=device,
                           save_probs=args.probs, amp=prepared.amp, inference=_inference(args),
                           crf=_crf(args, None, model), batch_size=args.batch_size,
                           cityscapes_ids=args.cityscapes_ids,
                           class_names=model.classes or
                           [f"class {i}" for i in range(model.num_classes)])
    failed = f", {len(result.failed)} unreadable" if result.failed else ""
    print(f"{len(result.written)} predictions written to {args.out} ("
          f"{len(result.written) + len(result.failed)} images{failed})")
    for path, why in result.failed.items():
        print(f"failed: {why}", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_score(args) -> int:
    from .evaluation.score import score_folder
    cfg = load_config(args.config, args.overrides)
    ds = _eval_dataset(cfg, args.split)
    from .app.commands import finish_report, report_collector, score_callback
    report = report_collector(args, ds)
    results = score_folder(args.predictions, ds, id_format=args.id_format,
                           on_image=score_callback(report, ds))
    from .evaluation.score import describe_files
    print(describe_files(results["files"]) + f" ({len(ds)} images in {ds.split})")
    _print_metrics(results, list(ds.classes), args.out)
    finish_report(args, report, results, title=f"{args.predictions} on {cfg.data.dataset} "
                  f"{ds.split}", settings={"predictions": args.predictions})
    return 0


def cmd_quantize(args) -> int:
    from .deploy.quantize import quantize_checkpoint
    cfg = load_config(args.config, args.overrides)
    d = cfg.data  # calibration crops of the training set, drawn as training draws them
    xml = quantize_checkpoint(args.checkpoint, d.dataset, d.root, d.train_split,
                              crop_size=d.crop_size, scale_range=d.scale_range, scales=d.scales,
                              flip=d.flip, options=d.options,
                              samples=args.samples, seed=args.seed,
                              max_label_change=args.max_label_change,
                              check_samples=args.check_samples,
                              refuse_above=args.refuse_above,
                              bias_correction=args.bias_correction, ranges=args.ranges)
    print(f"INT8 model written to {xml} ({args.samples} calibration crops of "
          f"{d.dataset} {d.train_split}); run it with --precision int8")
    info = json.loads(xml.with_suffix(".json").read_text())
    bound = "" if args.max_label_change is None else \
        f" (bound {100 * args.max_label_change:g}%)"
    print(f"classes changed on {100 * info['label_change_measured']:.2f}% of the "
          f"{info['check_samples']} check crops' scores{bound}; "
          f"{info['operations_in_fp32']} convolutions kept in floating point")
    return 0


def cmd_pseudo_label(args) -> int:
    from .adapt.pseudo_labels import make_pseudo_labels, summary_line, target_dataset
    from .utils.distributed import pick_device
    cfg = load_config(args.config, _with_device(args))
    a = cfg.adapt
    if not a.target_dataset:
        raise ValueError(f"{args.config}: no adapt.target_dataset: pseudo-labels are made for "
                         "an adaptation config's target training images")
    scale = args.scale
    if scale is None:
        lo, hi = a.target_scale_range
        if lo != hi:
            raise ValueError(f"adapt.target_scale_range={list(a.target_scale_range)} is a "
                             "range: give the inference scale with --scale")
        scale = lo
    device = pick_device(cfg.train.device)
    paths = [args.checkpoint, *(args.ensemble or [])]
    members = []
    for path in paths:
        model = _load(args, device, path).eval()
        members.append(model)
    net = members[0]
    if len(members) > 1:
        from .inference.ensemble import Ensemble
        net = Ensemble(members, names=paths).eval()
    ds = target_dataset(cfg)
    if net.num_classes != ds.num_classes:
        raise ValueError(f"{args.checkpoint}: model has {net.num_classes} classes, the target "
                         f"set {a.target_dataset!r} {a.target_split} has {ds.num_classes} "
                         "(set adapt.target_options num_classes)")
    size = list(a.target_resize) if a.target_resize else None  # as the target is trained
    at = (f"resized to {size[1]}x{size[0]} ({a.target_resize_filter})" if size else "") + \
        (f"{' then ' if size else ''}at scale {scale:g}" if scale != 1 or not size else "")
    print(f"pseudo-labelling {a.target_dataset} {a.target_split} ({len(ds)} images) {at} with "
          f"{', '.join(paths)}", flush=True)
    meta = make_pseudo_labels(net, ds, args.out, scale=scale, size=size,
                              resize_filter=a.target_resize_filter, device=device,
                              num_workers=cfg.data.num_workers, sources=paths)
    print(summary_line(meta, args.out))
    return 0


def cmd_adapt_table(args) -> int:
    from .evaluation.table import build_table, markdown, read_row, write_markdown
    if args.decimals < 0 or args.decimals > 4:
        raise ValueError(f"--decimals must be 0..4, got {args.decimals}")
    table = build_table([read_row(spec) for spec in args.runs], strict=args.strict)
    print(markdown(table, decimals=args.decimals), end="")
    if args.out:
        path = write_markdown(table, args.out, decimals=args.decimals, title=args.title)
        print(f"table written to {path}")
    if args.report:
        from .app.report import write_table_page
        page = write_table_page(args.report, table, title=args.title, decimals=args.decimals)
        print(f"report written to {page}")
    return 0


def cmd_demo(args) -> int:
    if args.adapt:
        from .demo.adapt import ALL_METHODS, run_adapt_demo
        # "--methods dacs hrda model.width=8": nargs="+" takes the overrides after the names
        # too; a method's name never holds "=", an override always does
        names = [m for m in args.methods if "=" not in m]
        overrides = [*(m for m in args.methods if "=" in m), *args.overrides]
        methods = ALL_METHODS if names == ["all"] else tuple(names)
        run_adapt_demo(args.out or "reports/demo_adapt", methods, overrides=overrides,
                       scene_scale=args.scene_scale, method_iterations=args.iterations)
        return 0
    if args.scene_scale != 1 or args.iterations != 300:
        raise SystemExit("deeplabv2 demo: --scene-scale and --iterations are options of "
                         "--adapt (the supervised demo takes train.iterations=N)")
    from .demo.supervised import run_demo
    run_demo(args.out or "reports/demo", args.overrides)
    return 0


def cmd_convert(args) -> int:
    from .caffe import convert_caffemodel
    from .weights import WeightsError
    classes = None
    if args.classes:
        from pathlib import Path
        text = Path(args.classes).read_text(encoding="utf-8")
        classes = [line.strip() for line in text.splitlines() if line.strip()]
    try:
        model, report, out = convert_caffemodel(
            args.caffemodel, args.out, arch=args.arch, prototxt=args.prototxt,
            num_classes=args.num_classes, classes=classes)
    except WeightsError as e:  # a list of disagreements: one line each, then the error
        first, *rest = str(e).splitlines()
        for line in rest:
            print(f"  {line}", file=sys.stderr)
        raise WeightsError(first) from None
    print(report.summary())
    c = model.config
    depth = {(3, 4, 23, 3): "ResNet-101", (3, 4, 6, 3): "ResNet-50"}.get(tuple(c.get("blocks", ())),
                                                                       "ResNet")
    what = (f"{depth} (blocks {tuple(c['blocks'])}, width {c['width']})"
            if c["backbone"] == "resnet" else "VGG-16")
    head = ("no head (backbone only)" if report.notes and "backbone-only" in report.notes[-1]
            else f"{model.num_classes} classes, rates {tuple(c['atrous_rates'])}")
    print(f"wrote {out}: {what}, {head}; preprocessing Caffe BGR 0-255 minus the mean pixel, "
          "alignment caffe")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .deploy.runtime import add_runtime_args
    p = argparse.ArgumentParser(prog="deeplabv2", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser(
        "info", help="parameters, FLOPs, output stride and shape of a model",
        description="Print a DeepLab v2 model's parameters, FLOPs per image, output stride and "
                    "logits shape, from its architecture (and a weights file if given), as text "
                    "or JSON.")
    info.add_argument("--model", choices=ARCHS, default="resnet101")
    info.add_argument("--num-classes", type=int, default=19)
    info.add_argument("--height", type=int, default=512)
    info.add_argument("--width", type=int, default=1024)
    info.add_argument("--weights", default=None, help="weights file to load (optional)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    tr = sub.add_parser(
        "train", help="train a model as a config says (torchrun for DDP)",
        description="Train a DeepLab v2 model as a config says (a packaged name or a YAML "
                    "file, then section.key=value overrides); checkpoints, history, metrics "
                    "and TensorBoard logs go to train.out_dir. Under torchrun it trains with "
                    "DDP. With train.amp: auto (the default) it prints the precision it chose "
                    "and why.")
    tr.add_argument("-c", "--config", required=True, help="packaged config name or YAML path")
    tr.add_argument("--resume", action="store_const", const="auto", default=None,
                    help="continue the run in train.out_dir from its last.pth (an error if "
                         "there is none); --resume=PATH is --from PATH")
    tr.add_argument("--from", dest="resume_from", default=None, metavar="PATH",
                    help="continue from the training checkpoint PATH (writing into "
                         "train.out_dir)")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace the run already in train.out_dir (its checkpoints, history "
                         "and logs are deleted first); without it such a folder is refused")
    tr.add_argument("--allow-changes", action="store_true",
                    help="resume even though settings that change the run (lr, iterations, "
                         "batch, crop, model...) differ from the checkpoint's")
    tr.add_argument("--device", default=None,
                    help="auto, cpu, cuda or cuda:N (default: the config's train.device)")
    tr.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.iterations=100")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "evaluate", help="mIoU of a checkpoint (or of a run's snapshots) on a dataset split",
        description="The mIoU and per-class IoU of a checkpoint on a dataset split named by a "
                    "config, with the paper's test-time options (multi-scale inputs, flip, "
                    "sliding windows, dense CRF) and the runtime and precision flags; --report "
                    "also writes an HTML report of the worst classes and images. Given a run "
                    "folder, it evaluates every snapshot (snapshots/iter_*.pth) and the final "
                    "model.pth with the run's config.yaml, writes snapshots.json, .md and .png "
                    "there (or into --out) and prints the final and the best mIoU, the best "
                    "selected on the evaluated split, as the papers did (optimistic); a re-run "
                    "evaluates only what is new.")
    ev.add_argument("checkpoint", help=CHECKPOINT_HELP + ", or a run folder (train.out_dir)")
    ev.add_argument("-c", "--config", default=None,
                    help="config naming the dataset (required for a checkpoint file; default "
                         "for a run folder: its config.yaml)")
    ev.add_argument("--split", default=None, help="split (default: the config's eval.split)")
    ev.add_argument("--limit", type=int, default=None, help="only the first N images")
    add_runtime_args(ev)
    _add_ensemble_arg(ev)
    ev.add_argument("-o", "--out", default=None,
                    help="write the metrics as JSON here; for a run folder: the folder that "
                         "gets snapshots.json, .md and .png (default: the run folder)")
    ev.add_argument("--device", default=None,
                    help="auto, cpu, cuda or cuda:N (default: the config's train.device)")
    _add_inference_args(ev)
    ev.add_argument("--protocol", default=None, metavar="NAME",
                    help="evaluate as a paper's released script does: none (our test-time "
                         "mode), adaptsegnet, advent, fda, dacs (default: the config's "
                         "eval.protocol)")
    ev.add_argument("overrides", nargs="*", help="section.key=value")
    from .app.commands import add_report_args
    add_report_args(ev)
    ev.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser(
        "predict", help="segment image files, folders or globs",
        description="Segment image files, folders or glob patterns with a checkpoint: a label "
                    "PNG in the model's colours and an overlay per image (optionally the "
                    "probabilities) in the output folder. With --precision auto (the default) "
                    "it prints the precision it chose and why.")
    pr.add_argument("checkpoint", help=CHECKPOINT_HELP)
    pr.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    pr.add_argument("-o", "--out", required=True, help="output folder")
    pr.add_argument("--probs", action="store_true", help="also save probabilities (.npy)")
    add_runtime_args(pr, precision="auto")
    _add_ensemble_arg(pr)
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pr.add_argument("--batch-size", type=int, default=4, help="images of equal size per batch")
    pr.add_argument("--cityscapes-ids", action="store_true",
                    help="also write *_labelIds.png (Cityscapes submission format)")
    _add_inference_args(pr)
    pr.set_defaults(func=cmd_predict)

    cs = sub.add_parser(
        "crf-search", help="grid search of the dense CRF on a validation subset",
        description="Grid-search the dense CRF's appearance kernel (weight, position and "
                    "colour standard deviations) on the first images of a validation split, as "
                    "the paper did, and print every setting's mIoU and the best.")
    cs.add_argument("checkpoint", help=CHECKPOINT_HELP)
    cs.add_argument("-c", "--config", required=True, help="config naming the dataset")
    cs.add_argument("--split", default=None)
    cs.add_argument("--limit", type=int, default=100, help="first N images (paper: 100)")
    from .inference.crf import PAPER_GRID
    cs.add_argument("--bi-w", type=float, nargs="+", default=PAPER_GRID["bi_w"],
                    help="appearance weights (default: the paper's 3 4 5 6)")
    cs.add_argument("--bi-xy-std", type=float, nargs="+", default=PAPER_GRID["bi_xy_std"],
                    help="appearance position std (default: the paper's 30 40 ... 100)")
    cs.add_argument("--bi-rgb-std", type=float, nargs="+", default=PAPER_GRID["bi_rgb_std"],
                    help="appearance colour std (default: the paper's 3 4 5 6)")
    cs.add_argument("--out", default=None, help="write every setting's mIoU as JSON here")
    add_runtime_args(cs)
    _add_inference_args(cs)
    cs.add_argument("overrides", nargs="*", help="section.key=value")
    cs.set_defaults(func=cmd_crf_search)

    sc = sub.add_parser(
        "score", help="score a folder of saved predictions against a split",
        description="Score a folder of label PNGs (written by predict or by another program) "
                    "against a dataset split named by a config: mIoU and per-class IoU.")
    sc.add_argument("predictions", help="folder of prediction PNGs")
    sc.add_argument("-c", "--config", required=True, help="config naming the dataset")
    sc.add_argument("--split", default=None, help="split (default: the config's eval.split)")
    sc.add_argument("--id-format", choices=("auto", "label", "train"), default="auto",
                    help="Cityscapes: label ids (official submission format) or train ids")
    sc.add_argument("--out", default=None, help="write the metrics as JSON here")
    add_report_args(sc)
    sc.add_argument("overrides", nargs="*", help="section.key=value")
    sc.set_defaults(func=cmd_score)

    pl = sub.add_parser(
        "pseudo-label", help="FDA's pseudo-labels of an adaptation config's target images",
        description="FDA's self-training round, step 1 (YanchaoYang/FDA getSudoLabel_multi.py): "
                    "run a checkpoint (or, with --ensemble, the average of the softmax "
                    "outputs of several: FDA's multi-band ensemble) over the config's target "
                    "training split at the size it is trained at; per class, the confidence at "
                    "the 66th percentile of its pixels (capped at 0.9) is the threshold below "
                    "which a pixel is ignored (255). Writes OUT/<image name>.png (train ids) and "
                    "OUT/thresholds.json; train on them with adapt.target_labels=OUT.")
    pl.add_argument("checkpoint", help=CHECKPOINT_HELP)
    _add_ensemble_arg(pl)
    pl.add_argument("-c", "--config", required=True,
                    help="the adaptation config (adapt.target_dataset, _root, _split, _options)")
    pl.add_argument("-o", "--out", required=True, help="output folder (new)")
    pl.add_argument("--scale", type=float, default=None,
                    help="inference scale of the target images (default: the config's "
                         "adapt.target_scale_range when it is one value, e.g. 0.5: 1024x512)")
    pl.add_argument("--alignment", choices=("caffe", "pytorch"), default=None,
                    help="resizing convention (default: the one the checkpoint records)")
    pl.add_argument("--device", default=None,
                    help="auto, cpu, cuda or cuda:N (default: the config's train.device)")
    pl.add_argument("overrides", nargs="*", help="section.key=value")
    pl.set_defaults(func=cmd_pseudo_label)

    at = sub.add_parser(
        "adapt-table", help="per-class IoU and mIoU of several runs in one table",
        description="Collect the evaluations of several runs into one table as the adaptation "
                    "papers print them: rows methods, columns the classes' IoU, mIoU last, "
                    "then the subset mIoUs (16 / 13 classes) when present, and the evaluation "
                    "(protocol, final or best model) of every row as a footnote. Rows "
                    "evaluated otherwise than the first are flagged (refused with --strict); "
                    "rows of other classes are refused. Prints markdown; -o writes it, "
                    "--report an HTML page.")
    at.add_argument("runs", nargs="+", metavar="RUN_OR_METRICS",
                    help="a run folder (its snapshots.json from `evaluate RUN_DIR`, else its "
                         "metrics.json), a metrics JSON of `evaluate --out` or a "
                         "snapshots.json; LABEL=PATH names the row (default: the run's "
                         "adapt.method, or the file's folder)")
    at.add_argument("-o", "--out", default=None, metavar="FILE.md",
                    help="write the markdown table here")
    at.add_argument("--report", default=None, metavar="DIR",
                    help="write the table as an HTML page, DIR/index.html")
    at.add_argument("--title", default="Adaptation results", help="the table's title")
    at.add_argument("--decimals", type=int, default=1,
                    help="decimals of the percentages (the papers print 1)")
    at.add_argument("--strict", action="store_true",
                    help="refuse rows evaluated otherwise (protocol, selection, pixels) "
                         "instead of flagging them")
    at.set_defaults(func=cmd_adapt_table)

    de = sub.add_parser(
        "demo", help="synthetic data: train -> evaluate -> predict -> report",
        description="The whole pipeline on embedded synthetic street scenes, with a reduced "
                    "network that trains on a CPU in minutes: train, evaluate, predict, and a "
                    "report folder; at the end it prints where the checkpoint is and the "
                    "commands that use it. --adapt runs the domain adaptation demo instead.")
    de.add_argument("--out", default=None,
                    help="report folder (default reports/demo, with --adapt reports/demo_adapt)")
    de.add_argument("--adapt", action="store_true",
                    help="domain adaptation demo: synthetic source -> restyled target, "
                         "source-only vs adaptation methods vs target-supervised (about "
                         "6 min on 2 cores; all 11 methods about 25)")
    de.add_argument("--methods", nargs="+", default=["fda"],
                    help="with --adapt: adaptsegnet advent minent fda fda_ssl dacs mic_dacs "
                         "daformer mic_daformer hrda mic_hrda, or all "
                         "(fda_ssl: FDA's self-training round on the fda run's pseudo-labels; "
                         "mic_*: MIC on the dacs, daformer or hrda row; default: fda)")
    de.add_argument("--scene-scale", type=int, default=1, metavar="S",
                    help="with --adapt: render every scene at S times 160x96; HRDA's rows train "
                         "on them at that size (context at 0.5, detail at full resolution), "
                         "the others at 160x96, as the released codes split the resolutions "
                         "(default 1)")
    de.add_argument("--iterations", type=int, default=300, metavar="N",
                    help="with --adapt: iterations of every run after the 400-iteration "
                         "source warm-up (default 300; DAFormer's warm-up keeps its share)")
    de.add_argument("overrides", nargs="*", help="section.key=value for the demo config")
    de.set_defaults(func=cmd_demo)

    qu = sub.add_parser(
        "quantize", help="static INT8 quantization of a checkpoint (OpenVINO, NNCF) for "
                         "--precision int8",
        description="Quantize a checkpoint to INT8 (NNCF's static quantization for OpenVINO), "
                    "calibrated on training crops of the config's dataset; the model is "
                    "written beside the checkpoint (CHECKPOINT.openvino/int8.xml), where "
                    "--precision int8 finds it. Refused when INT8 changes the class of too "
                    "many check scores.")
    qu.add_argument("checkpoint", help=CHECKPOINT_HELP)
    qu.add_argument("-c", "--config", required=True,
                    help="config naming the training set the calibration crops come from")
    qu.add_argument("--samples", type=int, default=300, help="calibration crops (default 300)")
    qu.add_argument("--seed", type=int, default=0)
    qu.add_argument("--max-label-change", type=float, default=None, metavar="FRACTION",
                    help="return the most harmful quantized operations to floating point "
                         "until at most this share of the scores changes class against FP32 "
                         "(e.g. 0.005; NNCF's accuracy control, on --check-samples other "
                         "training crops)")
    qu.add_argument("--check-samples", type=int, default=50,
                    help="training crops on which the INT8 model's changed classes are "
                         "measured (and --max-label-change decides; default 50)")
    qu.add_argument("--refuse-above", type=float, default=0.05, metavar="FRACTION",
                    help="refuse (write nothing) when INT8 changes the class of more than "
                         "this share of the check crops' scores (default 0.05)")
    qu.add_argument("--bias-correction", choices=("full", "fast"), default="full",
                    help="NNCF's bias correction: full (default; on the demo model 0.67%% of "
                         "the labels changed against 0.89%%) or fast (quicker to make on small "
                         "crops; about the same at 513x1025)")
    qu.add_argument("--ranges", choices=("minmax", "median"), default="minmax",
                    help="activation ranges: min/max over the crops (default) or the median "
                         "of each crop's min/max, for networks whose activations explode on "
                         "some inputs (use it with --bias-correction fast)")
    qu.add_argument("overrides", nargs="*", help="section.key=value")
    qu.set_defaults(func=cmd_quantize)

    cv = sub.add_parser(
        "convert", help="convert a DeepLab v2 Caffe .caffemodel into a checkpoint (no Caffe "
                        "needed)",
        description="Read a .caffemodel of the DeepLab v2 authors (ResNet-101 ImageNet/COCO "
                    "init, VOC 2012 MSC, VGG-16 LargeFOV / ASPP-L) and write this project's "
                    "checkpoint: every blob loaded or dropped with a reason, printed.")
    cv.add_argument("caffemodel", help="the .caffemodel file")
    cv.add_argument("-o", "--out", default=None,
                    help="output .pth or .safetensors (default: the input with .pth)")
    cv.add_argument("--arch", choices=("auto", "resnet101", "vgg16", "vgg16_largefov"),
                    default="auto", help="architecture (default: from the layer names)")
    cv.add_argument("--prototxt", default=None,
                    help="a net prototxt to check the file against (layer names, blob shapes, "
                         "convolution geometry)")
    cv.add_argument("--num-classes", type=int, default=None,
                    help="expected number of classes (checked against the classifier)")
    cv.add_argument("--classes", default=None,
                    help="a text file of class names, one a line (default: VOC 2012's for "
                         "21 classes)")
    cv.set_defaults(func=cmd_convert)

    from .app.commands import register as register_app  # adds "compare" and "serve"
    register_app(sub)
    from .deploy.bench import register as register_bench  # adds "bench" and "export"
    register_bench(sub)
    from .deploy.model_folder import register as register_model_folder  # adds "export-hub"
    register_model_folder(sub)
    for sp in sub.choices.values():  # every option's help says its default
        sp.formatter_class = _HelpWithDefaults
        for action in sp._actions:
            if action.option_strings and action.help is None:
                action.help = action.dest.replace("_", " ")
    return p


class _HelpWithDefaults(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option's help that does not already say it."""

    def _get_help_string(self, action):
        h = action.help or ""
        if not action.option_strings or action.required or "default" in h \
                or action.default is argparse.SUPPRESS or isinstance(action, argparse._StoreConstAction) \
                or isinstance(action, (argparse._StoreTrueAction, argparse._VersionAction)):
            return h
        return h + (" (default: none)" if action.default is None else " (default: %(default)s)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("deeplabv2")
    except PackageNotFoundError:
        return "unknown"


def _unambiguous_resume(argv: list) -> list:
    """``--resume=PATH`` means ``--from PATH``; a bare ``--resume`` never takes the next word
    (``--resume data.num_workers=0`` is the flag and an override)."""
    out = []
    for a in argv:
        if a.startswith("--resume="):
            out += ["--from", a.split("=", 1)[1]]
        else:
            out.append(a)
    return out


def main(argv=None) -> int:
    parser = build_parser()
    argv = _unambiguous_resume(list(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(argv)
    # section.key=value overrides may come after options too (argparse stops at the first)
    if extra and hasattr(args, "overrides") and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print(f"deeplabv2 {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for the user's mistakes, full trace with -v later
        from .utils.fileio import LockError
        from .weights import WeightsError
        from .train import Interrupted, TrainingError
        if isinstance(e, Interrupted):
            if _is_main():  # every rank stopped at the same iteration: say it once
                print(f"deeplabv2 {args.command}: {e}", file=sys.stderr)
            return e.exit_code
        if isinstance(e, (WeightsError, OSError, ValueError, TrainingError, LockError)):
            print(f"deeplabv2 {args.command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        raise


def _one_line(e: Exception) -> str:
    """The error's message on one line (an OSError without our wording gets its file named)."""
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
        text = f"{e.filename}: {e.strerror or e}"
    elif isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e)
    if "Original Traceback" in text:  # raised in a DataLoader worker: its last line is the error
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception): ", last) else last
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
