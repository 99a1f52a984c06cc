"""``deeplabv2 demo --adapt``: domain adaptation on the embedded synthetic scenes, on 2 CPU cores.

The source domain is the demo's synthetic street scenes, the target the same classes and
layouts in another look (:func:`deeplabv2.data.synthetic.restyle`: colour cast, dimmer light,
blur, noise), the kind of gap between GTA5 and Cityscapes. Runs, all through the one training
loop and evaluated on the *target* validation scenes:

1. ``warm_up``: trained on labelled source scenes (the published methods start from a trained
   network too);
2. from those weights, for the same number of iterations each: ``source_only`` (more source
   training: the fair baseline, also evaluated on source validation to show the gap) and each
   adaptation method (labelled source + unlabelled target); ``fda_ssl``, FDA's self-training
   round, labels the target training scenes with the ``fda`` run's network
   (:func:`deeplabv2.adapt.pseudo_labels.make_pseudo_labels`) and trains again from the same
   weights with them as target labels (its seconds include the labelling); ``mic_dacs``,
   ``mic_daformer``, ``hrda`` and ``mic_hrda`` are the MIC and HRDA rows on the ``dacs`` and
   ``daformer`` rows' settings (an HRDA run is evaluated through HRDA's inference: its
   checkpoint rebuilds the wrapper);
3. ``target_supervised``: from the same weights, the same iterations on *labelled* target
   scenes: the upper bound of what adaptation can reach.

Writes ``summary.json``, ``table.md``, ``curves.png`` (target-val mIoU during training),
``examples.png`` (target image | ground truth | each run's prediction), and the per-class
table of :mod:`deeplabv2.evaluation.table` (``deeplabv2 adapt-table``'s): ``per_class.md`` and
``index.html`` (with table.md's numbers); each run's folder gets its target-val metrics
(``target_val_metrics.json``), so ``deeplabv2 adapt-table OUT/*/target_val_metrics.json``
tabulates them again.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..config import load_config
from ..data import build_dataset
from ..evaluation.evaluate import evaluate
from ..evaluation.metrics import save_json
from ..evaluation.table import Row, build_table, markdown, test_time, write_markdown
from ..app.report import write_table_page
from ..deploy.fast import optimize_for_inference
from ..utils.fileio import atomic_write_buffered, atomic_write_text
from ..train import train
from ..utils.visualize import colorize
from ..weights import load_model
from ..utils.visualize import pyplot
from .supervised import _titled

DEFAULT_METHODS = ("fda",)
#: ``fda_ssl`` is FDA's self-training round: pseudo-labels of the target training scenes from the
#: ``fda`` run's network, then an FDA run on them (:mod:`deeplabv2.adapt.pseudo_labels`);
#: ``mic_dacs``, ``mic_daformer``, ``hrda`` and ``mic_hrda`` are the HRDA and MIC papers' DeepLab v2
#: rows (issue 26), each on the demo's settings of the row it extends
ALL_METHODS = ("adaptsegnet", "advent", "minent", "fda", "fda_ssl", "dacs", "mic_dacs",
               "daformer", "mic_daformer", "hrda", "mic_hrda")
SIZE = [96, 160]
SOURCE = {"num_samples": 400, "size": SIZE}
TARGET = {"num_samples": 400, "size": SIZE, "style": "target"}
TARGET_VAL = {"num_samples": 100, "size": SIZE, "style": "target"}
SOURCE_VAL = {"num_samples": 100, "size": SIZE}
#: each run's target-val metrics in its folder (``deeplabv2 adapt-table RUN/FILE ...``)
TARGET_METRICS = "target_val_metrics.json"
# DAFormer's strategy (adapt.method daformer), each part scaled to this network and crop
# where its released value is tied to ResNet-101 on 512x512 crops for 40k iterations:
# - the optimizer stays the demo's SGD lr 0.01 poly, as every other row's (their AdamW
#   6e-5, head x10, is tuned for an ImageNet ResNet-101; a different optimizer would make
#   the row differ from DACS by more than the strategy), with their linear warm-up scaled
#   to the run: 1500 / 40000 x 300 = 11 iterations (ratio 1e-6);
# - EMA 0.999, confidence-share weight 0.968 as released;
# - pseudo-label margins [15, 120, 0, 0] rows of 512 scaled to the 96-row crop: [3, 22, 0, 0]
#   (the synthetic scenes have no ego car; kept so the row runs the released masking);
# - feature distance lambda 0.005, min ratio 0.75, on the thing class of the synthetic
#   scenes: car (5); pole is stuff in DAFormer's list (Cityscapes pole 5 is not among its
#   [6, 7, 11..18]). The frozen copy is of the warm-up's backbone: the demo has no ImageNet;
# - rare-class sampling of the source at T 0.01 as released, min_pixels 3000 of a 512x512
#   crop scaled to the 96x160 scene: 176 (then 0.5 x 176 in the crop), and mmseg's crop
#   re-draw at cat_max_ratio 0.75.
PSEUDO_MARGINS = [3, 22, 0, 0]
RCS_MIN_PIXELS = 176


def _rcs_setting(min_pixels: int, min_crop_ratio: float) -> str:
    """The demo's rare-class sampling override (T 0.01 as released)."""
    return (f"data.rare_class_sampling={{temperature: 0.01, min_pixels: {min_pixels}, "
            f"min_crop_ratio: {min_crop_ratio}}}")


def _mic_setting(block_size: int) -> str:
    """The demo's MIC override: ratio 0.7, lambda 1 and the colour augmentation as released."""
    return (f"adapt.mic={{mask_ratio: 0.7, block_size: {block_size}, lambda: 1.0, "
            f"augment: true}}")


DAFORMER = ["train.warmup_iters=11", "adapt.ema_alpha=0.999",  # 11: see warmup_iterations
            f"adapt.pseudo_margins={PSEUDO_MARGINS}", "adapt.fdist_lambda=0.005",
            "adapt.fdist_classes=[5]", "adapt.fdist_min_ratio=0.75",
            _rcs_setting(RCS_MIN_PIXELS, 0.5), "data.cat_max_ratio=0.75"]
# MIC's masked image consistency (adapt.mic) on the demo's 96x160 crop:
# - block size: released 32 pixels on the 512x512 crops of the DeepLab v2 rows (64 on HRDA's
#   1024 crops: the same 1/16 of the crop side); the crop is the 96-row scene here, so 32 x
#   96 / 512 = 6 pixels, a 16 x 27 grid of blocks (released 16 x 16 on a square crop);
# - mask ratio 0.7, lambda 1 and the target's colour augmentation as released (no tie to the
#   network, crop or iterations); the pseudo-labels and weights are the host row's.
MIC_BLOCK = 6
MIC = [_mic_setting(MIC_BLOCK)]
# HRDA (adapt.method hrda) on the daformer row's settings. Released: a 1024x1024 crop of images
# at twice DAFormer's resolution (GTA5 2560x1407, Cityscapes 2048x1024), seen whole at scale 0.5
# (the context: the 512x512 view DAFormer trains on) and a 512x512 detail crop inside it at full
# resolution. The synthetic scenes have one resolution, 96x160: the scene is the context crop,
# at scale 0.5 as released (48x80 into the network: multiples of 8, and the scene one of 16, as
# the wrapper's context grid and inference need), and the detail crop is half of each side as
# 512 of 1024: 48x80 (multiples of 8; its corner on the released 8-pixel grid: 6 x 10 positions).
# So here HRDA's detail sees what every other row sees everywhere, and its context less: it
# tests the two-scale training and the scale attention, not the extra resolution it was made
# for (which needs scenes rendered larger than the other rows').
# - detail loss weight 0.1 and EMA, feature distance (on the context features, labels in
#   16-pixel blocks), optimizer and warm-up as the daformer row;
# - pseudo-label margins: released rows 30 / 240 of the 1024-row crop (plcrop v2 on the 1024-row
#   image) are 15 / 120 of 512, the daformer row's share: [3, 22, 0, 0] again (the side
#   columns are not applied by adapt.method hrda, see gta5_to_cityscapes_hrda_dlv2.yaml);
# - rare-class sampling: released min_crop_ratio 2.0 = 0.5 x (1024 / 512)^2, the same share of
#   the crop as 0.5 on DAFormer's 512 crops at half the resolution; the demo's HRDA crop is the
#   daformer row's (the whole scene at the same resolution), so the same share is 0.5 here:
#   min_pixels 176 and ratio 0.5 as the daformer row.
HRDA = [*DAFORMER, "adapt.hrda_detail_crop=[48, 80]", "adapt.hrda_detail_weight=0.1",
        "adapt.hrda_context_scale=0.5"]
#: the ``adapt.method`` of the rows named otherwise
BASE_METHOD = {"fda_ssl": "fda", "mic_dacs": "dacs", "mic_daformer": "daformer",
               "mic_hrda": "hrda"}
#: per-method settings for the small demo network (the papers' weights are for ResNet-101 on
#: 1280x720 crops; the adversarial weight in particular scales with the map size)
METHOD_SETTINGS = {
    "adaptsegnet": ["adapt.lambda_adv=0.01", "adapt.d_lr=1e-4"],
    "advent": ["adapt.lambda_adv=0.01", "adapt.d_lr=1e-4"],
    "minent": ["adapt.lambda_ent=0.01"],
    "fda": ["adapt.fda_beta=0.05", "adapt.fda_ent_start=100", "adapt.fda_lambda_ent=0.005"],
    "dacs": [],
    # DAFormer's strategy: DAFORMER above
    "daformer": DAFORMER,
    # MIC (adapt.mic) on the demo's DACS row: what MIC adds to it alone. (MIC's own "DACS + MIC"
    # row, gta5_to_cityscapes_mic_dacs_dlv2, hosts MIC on mmseg's DACS, i.e. DAFormer's strategy
    # at EMA 0.99 without its additions; the demo's dacs row is DACS's own code.)
    "mic_dacs": [*MIC],
    # MIC on DAFormer's strategy: MIC's main DeepLab v2 comparison (its "DAFormer + MIC" row,
    # gta5_to_cityscapes_mic_daformer_dlv2): the daformer row's settings plus MIC's
    "mic_daformer": [*DAFORMER, *MIC],
    "hrda": HRDA,
    # HRDA + MIC (gta5_to_cityscapes_mic_hrda_dlv2): the hrda row plus MIC; the released 64-pixel
    # blocks on the 1024 crops are the same share of the crop as 32 on 512: 6 here too
    "mic_hrda": [*HRDA, *MIC],
    # as the released SStrain.py: entropy from the first step, weight-1 pseudo-label CE
    "fda_ssl": ["adapt.fda_beta=0.05", "adapt.fda_ent_start=0",
                "adapt.fda_lambda_ent=0.005"],
}


def _options(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v if not isinstance(v, str) else v}" for k, v in d.items()) + "}"


def scenes(scale: int = 1) -> dict:
    """The four scene sets (``source``, ``target``, ``target_val``, ``source_val``: the
    :data:`SOURCE`... options) rendered at ``scale`` times their size."""
    sets = {"source": SOURCE, "target": TARGET, "target_val": TARGET_VAL,
            "source_val": SOURCE_VAL}
    return {k: {**v, "size": [int(s) * scale for s in v["size"]]} for k, v in sets.items()}


def is_hrda(name: str) -> bool:
    return BASE_METHOD.get(name, name) == "hrda"


def scale_overrides(name: str, scale: int) -> list[str]:
    """The row ``name``'s settings on scenes rendered at ``scale`` times :data:`SIZE`
    (``--scene-scale``), as the released codes split the work between resolutions:

    - every row but HRDA's trains on the scenes resized to :data:`SIZE` (DAFormer's strategy
      and the rows before it train on GTA5 and Cityscapes at half their size) and is
      evaluated at that size, its scores upsampled to the full-size labels
      (``eval.avg_scales [1 / scale]``; mmseg's test pipeline for the DeepLab v2 rows of
      DAFormer);
    - HRDA's rows train on the full-size scenes: the context crop is the whole scene, seen at
      0.5 (at ``scale`` 2: what the other rows see), the detail crop half of each side at full
      resolution (512 of 1024, released), and are evaluated at full resolution (their own
      sliding-window inference). Their pixel settings are counted at that size: pseudo-label
      margins and MIC blocks times ``scale``;
    - rare-class sampling keeps its share of the scene: ``min_pixels`` times ``scale`` squared
      on the full-size labels the statistics count; the crop check at the size the row's crop
      has (``min_crop_ratio`` 0.5 on HRDA's full-size crop, 0.5 / ``scale`` squared on the
      others' resized one: released 2.0 for HRDA's 1024 crops of full-size images against
      DAFormer's 0.5, the same relation turned around).

    ``scale`` 1 adds nothing: the demo as it is."""
    if scale == 1:
        return []
    settings = METHOD_SETTINGS.get(name, [])  # warm_up, source_only, target_supervised: none
    rcs = any(s.startswith("data.rare_class_sampling=") for s in settings)
    mic = any(s.startswith("adapt.mic=") for s in settings)
    min_pixels = RCS_MIN_PIXELS * scale * scale
    if not is_hrda(name):
        out = [f"data.resize={list(SIZE)}", f"adapt.target_resize={list(SIZE)}",
               f"eval.avg_scales=[{1 / scale}]"]
        if rcs:
            out.append(_rcs_setting(min_pixels, 0.5 / scale ** 2))
        return out
    crop = [s * scale for s in SIZE]
    out = [f"data.crop_size={crop}", f"adapt.hrda_detail_crop={[c // 2 for c in crop]}",
           f"adapt.pseudo_margins={[m * scale for m in PSEUDO_MARGINS]}",
           _rcs_setting(min_pixels, 0.5)]
    if mic:
        out.append(_mic_setting(MIC_BLOCK * scale))
    return out


def warmup_iterations(iterations: int) -> int:
    """DAFormer's linear warm-up, 1500 of its 40k iterations, as the same share of a run of
    ``iterations`` (11 of the demo's 300)."""
    return max(1, round(1500 / 40000 * iterations))


def method_overrides(name: str, extra=(), scale: int = 1, iterations: int = 300) -> list[str]:
    """The demo row ``name``'s overrides: its ``adapt.method``, its :data:`METHOD_SETTINGS`,
    its settings at the scene ``scale`` (:func:`scale_overrides`) and, for a run of other than
    300 ``iterations``, its warm-up's share of them, then ``extra`` (the run's own: weights,
    the caller's overrides)."""
    settings = METHOD_SETTINGS[name]
    warmup = [f"train.warmup_iters={warmup_iterations(iterations)}"] if any(
        s.startswith("train.warmup_iters=") for s in settings) else []
    return [f"adapt.method={BASE_METHOD.get(name, name)}", *settings, *warmup,
            *scale_overrides(name, scale), *extra]


def _config(out: Path, name: str, iterations: int, extra=(), scale: int = 1):
    sets = scenes(scale)
    base = [f"train.out_dir={out / name}", f"train.iterations={iterations}",
            "train.checkpoint_every=100000", f"train.val_every={max(10, iterations // 40 * 10)}",
            "train.val_limit=0", f"data.options={_options(sets['source'])}",
            "adapt.target_dataset=synthetic", "adapt.target_split=train",
            f"adapt.target_options={_options(sets['target'])}", "adapt.target_val_split=val",
            f"adapt.target_val_options={_options(sets['target_val'])}"]
    return load_config("demo", [*base, *extra])


def run_adapt_demo(out_dir="reports/demo_adapt", methods=DEFAULT_METHODS, source_iterations=400,
                   method_iterations=300, overrides=(), scene_scale: int = 1) -> dict:
    """Run source-only, ``methods`` and the target-supervised bound; return the summary.

    ``scene_scale`` renders every scene (source and target, training and validation) at that
    many times :data:`SIZE`, HRDA's rows training on them at full size and the others at
    :data:`SIZE` (:func:`scale_overrides`): the setting HRDA was made for."""
    if not isinstance(scene_scale, int) or scene_scale < 1:
        raise ValueError(f"scene_scale must be a whole number >= 1, got {scene_scale!r}")
    if not isinstance(method_iterations, int) or method_iterations < 1:
        raise ValueError(f"method_iterations must be a whole number >= 1, got "
                         f"{method_iterations!r}")
    scale = scene_scale
    out = Path(out_dir)
    started = time.perf_counter()
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown adaptation method(s) {unknown}; choose from {ALL_METHODS}")
    if "fda_ssl" in methods and "fda" not in methods:
        raise ValueError("fda_ssl (FDA's self-training round) starts from the fda run's "
                         "network: list fda too (--methods fda fda_ssl)")
    methods = tuple(sorted(methods, key=lambda m: m == "fda_ssl"))  # after fda
    sets = scenes(scale)
    target_val = build_dataset("synthetic", None, "val", **sets["target_val"])
    source_val = build_dataset("synthetic", None, "val", **sets["source_val"])
    h, w = sets["target_val"]["size"]
    print(f"deeplabv2 demo --adapt: synthetic source -> restyled target, methods "
          f"{', '.join(methods)}; evaluated on {len(target_val)} target validation scenes of "
          f"{w}x{h}" + (f" (--scene-scale {scale}: HRDA's rows train on them at that size, "
                        f"the others at {SIZE[1]}x{SIZE[0]})" if scale > 1 else ""))

    runs: dict[str, dict] = {}
    rows: list = []  # each run's target-val metrics, for the per-class table
    settings: dict = {}  # each run's test-time mode (eval.avg_scales [1 / scale] at a scale)
    plain = scale_overrides("source_only", scale)  # the rows without a method's settings

    def run(name, cfg, t0=None):
        t0 = t0 or time.perf_counter()
        result = train(cfg)
        net = optimize_for_inference(load_model(result.out_dir / "model.pth"))
        settings[name] = cfg.eval.inference()
        metrics = evaluate(net, target_val, inference=settings[name])
        # the test-time mode, which differs between rows at a scene scale, in the file and table
        mode = test_time(cfg.to_dict()["eval"])
        metrics["protocol"] = {**metrics["protocol"], "test_time": (
            f"HRDA's inference (context at 0.5, detail windows), {mode}" if is_hrda(name)
            else mode)}
        target_miou = metrics["miou"]
        # the run's target-val evaluation, as `evaluate --out` writes it (adapt-table reads it)
        save_json(metrics, list(target_val.classes), result.out_dir / TARGET_METRICS)
        rows.append(Row.from_metrics(name, metrics, list(target_val.classes),
                                     source=str(result.out_dir / TARGET_METRICS)))
        runs[name] = {"target_val_miou": target_miou, "seconds": round(time.perf_counter() - t0, 1),
                      "iterations": result.iterations,
                      "curve": [(h["iteration"], h["val_miou"]) for h in
                                _val_points(result.out_dir)]}
        print(f"{name:>18}: target-val mIoU {100 * target_miou:.1f}")
        return result, net

    # 1. the source warm-up (its validation during training is on the target, as every run's)
    run("warm_up", _config(out, "warm_up", source_iterations,
                           ["adapt.method=source_only", *plain, *overrides], scale))
    # every continuation as the released adaptation codes train: BN scale and shift frozen at
    # the warm-up's, batch statistics, running averages updated (model.bn batch); the head
    # stays the warm-up's four summed branches (the two-branch head of AdaptSegNet and DACS
    # would drop half of what the warm-up learnt)
    warm = [f"model.weights={out / 'warm_up' / 'model.pth'}", "model.init_head=true",
            "model.bn=batch"]
    # 2. from there: more source training (the baseline), and each method
    _, source_net = run("source_only", _config(out, "source_only", method_iterations,
                                               ["adapt.method=source_only", *plain, *warm,
                                                *overrides], scale))
    runs["source_only"]["source_val_miou"] = evaluate(
        source_net, source_val, inference=settings["source_only"])["miou"]
    for m in methods:
        if m == "fda_ssl":  # the row's seconds count the pseudo-labelling too
            t0 = time.perf_counter()
            labels = _pseudo_labels(out, _config(out, "fda", method_iterations,
                                                 [*plain, *overrides], scale))
            run(m, _config(out, m, method_iterations,
                           method_overrides(m, [f"adapt.target_labels={labels}", *warm,
                                                *overrides], scale, method_iterations), scale),
                t0)
            continue
        run(m, _config(out, m, method_iterations,
                       method_overrides(m, [*warm, *overrides], scale, method_iterations), scale))
    # 3. the upper bound: the same continuation on labelled target scenes
    run("target_supervised", _config(out, "target_supervised", method_iterations,
                                     ["adapt.method=source_only",
                                      f"data.options={_options(sets['target'])}", *plain,
                                      *warm, *overrides], scale))

    src = runs["source_only"]
    gap = src["source_val_miou"] - src["target_val_miou"]
    best = max(methods, key=lambda m: runs[m]["target_val_miou"]) if methods else None
    summary = {
        "scene_scale": scale,
        "scene_size": sets["target_val"]["size"],
        "source_only_source_val_miou": src["source_val_miou"],
        "source_only_target_val_miou": src["target_val_miou"],
        "domain_gap": gap,
        "best_method": best,
        "best_method_gain": (runs[best]["target_val_miou"] - src["target_val_miou"]) if best else None,
        "target_supervised_miou": runs["target_supervised"]["target_val_miou"],
        "method_iterations": method_iterations,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in runs.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "table.md", _table(runs, summary))
    table = build_table(rows)
    write_markdown(table, out / "per_class.md",
                   title="deeplabv2 demo --adapt: per-class IoU on the target validation scenes")
    write_table_page(out, table, title="deeplabv2 demo --adapt: synthetic source -> restyled "
                     "target", palette=target_val.palette, sections=[_html_summary(runs, summary)])
    _curves(runs, out / "curves.png")
    _examples(target_val, {k: out / k / "model.pth" for k in runs}, out / "examples.png",
              settings)
    print(_table(runs, summary))
    print(markdown(table), end="")
    print(f"report: {out.resolve()} (index.html, summary.json, table.md, per_class.md, "
          f"curves.png, examples.png); "
          f"{summary['total_seconds']:.0f} s in all")
    print(_next_steps(out, list(runs), best or "source_only", sets["target_val"]))
    return summary


def _pseudo_labels(out: Path, cfg) -> Path:
    """FDA's pseudo-labels of the target training scenes (the ones ``cfg``'s training reads)
    from the ``fda`` run's network, predicted at the size the row trains at
    (``adapt.target_resize``), written at the scenes' own size, in ``out/fda_ssl_labels``."""
    from ..adapt.pseudo_labels import make_pseudo_labels, summary_line, target_dataset
    folder = out / "fda_ssl_labels"
    if folder.exists():  # this demo's own output of an earlier run
        shutil.rmtree(folder)
    net = load_model(out / "fda" / "model.pth").eval()
    meta = make_pseudo_labels(net, target_dataset(cfg), folder, size=cfg.adapt.target_resize,
                              resize_filter=cfg.adapt.target_resize_filter, progress=False)
    print(f"{'':>18}  {summary_line(meta, folder)}")
    return folder


def _next_steps(out: Path, names: list, chosen: str, target_val: dict = TARGET_VAL) -> str:
    """Where the runs' checkpoints are, and the commands that use ``chosen``'s: evaluate on
    the target validation scenes (the table's number), serve it."""
    from .supervised import shown
    ckpt, cfg = shown(out / chosen / "model.pth"), shown(out / chosen / "config.yaml")
    target = shlex.quote(f"data.options={_options(target_val)}")
    return "\n".join([
        f"checkpoints: {shown(out / 'RUN' / 'model.pth')}, RUN one of {', '.join(names)}",
        f"next, with {chosen}'s:",
        f"  deeplabv2 evaluate {ckpt} -c {cfg} {target}   (its target-val mIoU above)",
        f"  deeplabv2 predict {ckpt} IMAGES -o {shown(out / 'my_predictions')}",
        f"  deeplabv2 serve {ckpt}   (web app on http://127.0.0.1:8000; the serve extra)"])


def _val_points(run_dir: Path) -> list[dict]:
    path = run_dir / "history.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    return [h for h in history if "val_miou" in h]


def _table(runs: dict, summary: dict) -> str:
    lines = ["| run | target-val mIoU | vs source only | seconds |", "| --- | ---: | ---: | ---: |"]
    base = runs["source_only"]["target_val_miou"]
    for name, r in runs.items():
        lines.append(f"| {name} | {100 * r['target_val_miou']:.1f} | "
                     f"{100 * (r['target_val_miou'] - base):+.1f} | {r['seconds']:.0f} |")
    lines.append(f"\nsource only on source-val: {100 * summary['source_only_source_val_miou']:.1f}"
                 f" mIoU; domain gap {100 * summary['domain_gap']:.1f} points")
    return "\n".join(lines) + "\n"


def _html_summary(runs: dict, summary: dict) -> str:
    """table.md's numbers as a section of the HTML page."""
    import html
    base = runs["source_only"]["target_val_miou"]
    body = "".join(
        f"<tr><th>{html.escape(name)}</th><td class=\"num\">{100 * r['target_val_miou']:.1f}</td>"
        f"<td class=\"num\">{100 * (r['target_val_miou'] - base):+.1f}</td>"
        f"<td class=\"num\">{r['seconds']:.0f}</td></tr>" for name, r in runs.items())
    return ('<section id="demo-summary"><h2>Target mIoU, gain and time</h2><table id="runs">'
            "<tr><th>run</th><th>target-val mIoU %</th><th>vs source only</th><th>seconds"
            f"</th></tr>{body}</table><p class=\"note\">Source only on source-val: "
            f"{100 * summary['source_only_source_val_miou']:.1f} mIoU; domain gap "
            f"{100 * summary['domain_gap']:.1f} points; the bound (target_supervised): "
            f"{100 * summary['target_supervised_miou']:.1f}.</p></section>")


def _curves(runs: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    offset = runs["warm_up"]["iterations"]
    for name, r in runs.items():
        if not r["curve"]:
            continue
        its, mious = zip(*r["curve"])
        start = offset if name != "warm_up" else 0
        ax.plot([start + i for i in its], [100 * m for m in mious], "o-", label=name)
    ax.set_xlabel("iteration (source_only and the methods continue from warm_up)")
    ax.set_ylabel("target-val mIoU %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _examples(dataset, checkpoints: dict, path: Path, settings: dict | None = None,
              count: int = 4) -> None:
    """Rows of target image | ground truth | each run's prediction (in its test-time mode
    ``settings[run]``, default whole image), under column titles, with the class legend
    beside them."""
    from ..inference.front import segment
    settings = settings or {}
    nets = {k: optimize_for_inference(load_model(p)) for k, p in checkpoints.items()}
    rows = []
    for i in range(min(count, len(dataset))):
        image, label = dataset.load(i)
        cells = [image, colorize(label, dataset.palette)]
        for name, net in nets.items():
            with torch.no_grad():
                pred = segment(net, image[None], settings.get(name)).labels[0].numpy()
            cells.append(colorize(pred, dataset.palette))
        gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
        row = [c for cell in cells for c in (cell, gap)][:-1]
        rows += [np.concatenate(row, axis=1), np.full((4, sum(c.shape[1] for c in row), 3),
                                                      255, np.uint8)]
    grid = np.concatenate(rows[:-1], axis=0)
    panel = _titled(grid, image.shape[1], 4, ["target image", "ground truth", *nets],
                    list(dataset.classes), dataset.palette)
    atomic_write_buffered(path, lambda f: panel.save(f, format="PNG"), fsync=False)
