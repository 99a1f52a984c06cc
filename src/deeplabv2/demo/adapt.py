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
   weights with them as target labels (its seconds include the labelling);
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
from ..evaluation.table import Row, build_table, markdown, write_markdown
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
#: ``fda`` run's network, then an FDA run on them (:mod:`deeplabv2.adapt.pseudo_labels`)
ALL_METHODS = ("adaptsegnet", "advent", "minent", "fda", "fda_ssl", "dacs", "daformer")
SIZE = [96, 160]
SOURCE = {"num_samples": 400, "size": SIZE}
TARGET = {"num_samples": 400, "size": SIZE, "style": "target"}
TARGET_VAL = {"num_samples": 100, "size": SIZE, "style": "target"}
SOURCE_VAL = {"num_samples": 100, "size": SIZE}
#: each run's target-val metrics in its folder (``deeplabv2 adapt-table RUN/FILE ...``)
TARGET_METRICS = "target_val_metrics.json"
#: per-method settings for the small demo network (the papers' weights are for ResNet-101 on
#: 1280x720 crops; the adversarial weight in particular scales with the map size)
METHOD_SETTINGS = {
    "adaptsegnet": ["adapt.lambda_adv=0.01", "adapt.d_lr=1e-4"],
    "advent": ["adapt.lambda_adv=0.01", "adapt.d_lr=1e-4"],
    "minent": ["adapt.lambda_ent=0.01"],
    "fda": ["adapt.fda_beta=0.05", "adapt.fda_ent_start=100", "adapt.fda_lambda_ent=0.005"],
    "dacs": [],
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
    "daformer": ["train.warmup_iters=11", "adapt.ema_alpha=0.999",
                 "adapt.pseudo_margins=[3, 22, 0, 0]", "adapt.fdist_lambda=0.005",
                 "adapt.fdist_classes=[5]", "adapt.fdist_min_ratio=0.75",
                 "data.rare_class_sampling={temperature: 0.01, min_pixels: 176, "
                 "min_crop_ratio: 0.5}", "data.cat_max_ratio=0.75"],
    # as the released SStrain.py: entropy from the first step, weight-1 pseudo-label CE
    "fda_ssl": ["adapt.method=fda", "adapt.fda_beta=0.05", "adapt.fda_ent_start=0",
                "adapt.fda_lambda_ent=0.005"],
}


def _options(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v if not isinstance(v, str) else v}" for k, v in d.items()) + "}"


def _config(out: Path, name: str, iterations: int, extra=()):
    base = [f"train.out_dir={out / name}", f"train.iterations={iterations}",
            "train.checkpoint_every=100000", f"train.val_every={max(10, iterations // 40 * 10)}",
            "train.val_limit=0", f"data.options={_options(SOURCE)}",
            "adapt.target_dataset=synthetic", "adapt.target_split=train",
            f"adapt.target_options={_options(TARGET)}", "adapt.target_val_split=val",
            f"adapt.target_val_options={_options(TARGET_VAL)}"]
    return load_config("demo", [*base, *extra])


def run_adapt_demo(out_dir="reports/demo_adapt", methods=DEFAULT_METHODS, source_iterations=400,
                   method_iterations=300, overrides=()) -> dict:
    """Run source-only, ``methods`` and the target-supervised bound; return the summary."""
    out = Path(out_dir)
    started = time.perf_counter()
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown adaptation method(s) {unknown}; choose from {ALL_METHODS}")
    if "fda_ssl" in methods and "fda" not in methods:
        raise ValueError("fda_ssl (FDA's self-training round) starts from the fda run's "
                         "network: list fda too (--methods fda fda_ssl)")
    methods = tuple(sorted(methods, key=lambda m: m == "fda_ssl"))  # after fda
    target_val = build_dataset("synthetic", None, "val", **TARGET_VAL)
    source_val = build_dataset("synthetic", None, "val", **SOURCE_VAL)
    print(f"deeplabv2 demo --adapt: synthetic source -> restyled target, methods "
          f"{', '.join(methods)}; evaluated on {len(target_val)} target validation scenes")

    runs: dict[str, dict] = {}
    rows: list = []  # each run's target-val metrics, for the per-class table

    def run(name, cfg, t0=None):
        t0 = t0 or time.perf_counter()
        result = train(cfg)
        net = optimize_for_inference(load_model(result.out_dir / "model.pth"))
        metrics = evaluate(net, target_val)
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
                           ["adapt.method=source_only", *overrides]))
    # every continuation as the released adaptation codes train: BN scale and shift frozen at
    # the warm-up's, batch statistics, running averages updated (model.bn batch); the head
    # stays the warm-up's four summed branches (the two-branch head of AdaptSegNet and DACS
    # would drop half of what the warm-up learnt)
    warm = [f"model.weights={out / 'warm_up' / 'model.pth'}", "model.init_head=true",
            "model.bn=batch"]
    # 2. from there: more source training (the baseline), and each method
    _, source_net = run("source_only", _config(out, "source_only", method_iterations,
                                               ["adapt.method=source_only", *warm, *overrides]))
    runs["source_only"]["source_val_miou"] = evaluate(source_net, source_val)["miou"]
    for m in methods:
        if m == "fda_ssl":  # the row's seconds count the pseudo-labelling too
            t0 = time.perf_counter()
            labels = _pseudo_labels(out, _config(out, "fda", method_iterations, overrides))
            run(m, _config(out, m, method_iterations,
                           [f"adapt.target_labels={labels}", *warm, *METHOD_SETTINGS[m],
                            *overrides]), t0)
            continue
        run(m, _config(out, m, method_iterations,
                       [f"adapt.method={m}", *warm, *METHOD_SETTINGS[m], *overrides]))
    # 3. the upper bound: the same continuation on labelled target scenes
    run("target_supervised", _config(out, "target_supervised", method_iterations,
                                     ["adapt.method=source_only", f"data.options={_options(TARGET)}",
                                      *warm, *overrides]))

    src = runs["source_only"]
    gap = src["source_val_miou"] - src["target_val_miou"]
    best = max(methods, key=lambda m: runs[m]["target_val_miou"]) if methods else None
    summary = {
        "source_only_source_val_miou": src["source_val_miou"],
        "source_only_target_val_miou": src["target_val_miou"],
        "domain_gap": gap,
        "best_method": best,
        "best_method_gain": (runs[best]["target_val_miou"] - src["target_val_miou"]) if best else None,
        "target_supervised_miou": runs["target_supervised"]["target_val_miou"],
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
    _examples(target_val, {k: out / k / "model.pth" for k in runs}, out / "examples.png")
    print(_table(runs, summary))
    print(markdown(table), end="")
    print(f"report: {out.resolve()} (index.html, summary.json, table.md, per_class.md, "
          f"curves.png, examples.png); "
          f"{summary['total_seconds']:.0f} s in all")
    print(_next_steps(out, list(runs), best or "source_only"))
    return summary


def _pseudo_labels(out: Path, cfg) -> Path:
    """FDA's pseudo-labels of the target training scenes (the ones ``cfg``'s training reads)
    from the ``fda`` run's network, at their own size, in ``out/fda_ssl_labels``."""
    from ..adapt.pseudo_labels import make_pseudo_labels, summary_line, target_dataset
    folder = out / "fda_ssl_labels"
    if folder.exists():  # this demo's own output of an earlier run
        shutil.rmtree(folder)
    net = load_model(out / "fda" / "model.pth").eval()
    meta = make_pseudo_labels(net, target_dataset(cfg), folder, scale=1.0, progress=False)
    print(f"{'':>18}  {summary_line(meta, folder)}")
    return folder


def _next_steps(out: Path, names: list, chosen: str) -> str:
    """Where the runs' checkpoints are, and the commands that use ``chosen``'s: evaluate on
    the target validation scenes (the table's number), serve it."""
    from .supervised import shown
    ckpt, cfg = shown(out / chosen / "model.pth"), shown(out / chosen / "config.yaml")
    target = shlex.quote(f"data.options={_options(TARGET_VAL)}")
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


def _examples(dataset, checkpoints: dict, path: Path, count: int = 4) -> None:
    """Rows of target image | ground truth | each run's prediction, under column titles, with
    the class legend beside them."""
    nets = {k: optimize_for_inference(load_model(p)) for k, p in checkpoints.items()}
    rows = []
    for i in range(count):
        image, label = dataset.load(i)
        cells = [image, colorize(label, dataset.palette)]
        for net in nets.values():
            with torch.no_grad():
                pred = net(net.preprocess(image)).argmax(1)[0].numpy()
            cells.append(colorize(pred, dataset.palette))
        gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
        row = [c for cell in cells for c in (cell, gap)][:-1]
        rows += [np.concatenate(row, axis=1), np.full((4, sum(c.shape[1] for c in row), 3),
                                                      255, np.uint8)]
    grid = np.concatenate(rows[:-1], axis=0)
    panel = _titled(grid, image.shape[1], 4, ["target image", "ground truth", *nets],
                    list(dataset.classes), dataset.palette)
    atomic_write_buffered(path, lambda f: panel.save(f, format="PNG"), fsync=False)
