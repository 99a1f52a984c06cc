"""Command-line parts of the report and the web app: ``--report``/``--baseline`` for
``evaluate`` and ``score``, and the ``compare`` and ``serve`` commands (argument parsing and
hand-over only; the work is in :mod:`.report` and :mod:`.server`). As in :mod:`deeplabv2.cli`,
each command imports what it runs inside its function, so that the CLI starts without the
server's optional extra."""

from __future__ import annotations

import sys


def add_report_args(sp) -> None:
    sp.add_argument("--report", default=None, metavar="DIR",
                    help="write an HTML report here (metrics, per-class chart, confusion "
                         "matrix, worst/best images); open DIR/index.html")
    sp.add_argument("--baseline", default=None, metavar="METRICS",
                    help="with --report: compare against another run's metrics.json (or "
                         "report folder)")


def dataset_palette(ds):
    import numpy as np
    if getattr(ds, "palette", None) is not None:
        return np.asarray(ds.palette)
    from ..data import voc_palette
    return np.asarray(voc_palette(ds.num_classes))


def report_collector(args, ds):
    """A :class:`~.report.ReportCollector` for ``--report`` (None without it); checks
    ``--baseline`` up front so that a bad file fails before the evaluation runs."""
    if getattr(args, "baseline", None) and not args.report:
        raise ValueError("--baseline compares in the report: give --report DIR too")
    if not args.report:
        return None
    from ..utils.distributed import rank_and_world
    if rank_and_world()[1] > 1:
        raise ValueError("--report needs the whole split in one process; run without "
                         "torchrun (or write --out and use `deeplabv2 compare`)")
    from .report import ReportCollector, align_baseline, read_metrics
    if args.baseline:
        base, names = read_metrics(args.baseline)
        align_baseline(base, names, list(ds.classes), source=args.baseline)
    return ReportCollector(args.report, list(ds.classes), dataset_palette(ds), names=ds.name)


def score_callback(collector, ds):
    """``score_folder``'s ``on_image`` feeding ``collector`` (reads each image for its
    thumbnail)."""
    if collector is None:
        return None
    from ..data.base import read_image

    def on_image(i, label, pred):
        image = read_image(ds.samples[i][0]) if ds.samples else ds.load(i)[0]
        collector.add(ds.name(i), image, label, pred)
    return on_image


def finish_report(args, collector, results, *, title: str, settings: dict,
                  sections=()) -> None:
    if collector is None:
        return
    from .report import align_baseline, read_metrics
    baseline = None
    if args.baseline:
        base, names = read_metrics(args.baseline)
        baseline = align_baseline(base, names, collector.class_names, source=args.baseline)
    page = collector.write(results, title=title, settings=settings, baseline=baseline,
                           baseline_name=args.baseline or "baseline", sections=sections)
    print(f"report written to {page}")


def cmd_compare(args) -> int:
    from .report import compare_report
    page, diffs = compare_report(args.report, args.run, args.baseline)
    width = max(len(n) for n, _ in diffs)
    print(f"{'class':<{width}}  IoU difference (points, {args.run} - {args.baseline})")
    for name, d in diffs:
        print(f"{name:<{width}}  {'-' if d != d else f'{100 * d:+.2f}'}")
    if page is not None:
        print(f"report written to {page}")
    return 0


def cmd_serve(args) -> int:
    try:
        from .server import serve
    except ImportError as e:
        print(f"deeplabv2 serve needs the 'serve' extra: pip install 'deeplabv2[serve]' ({e})",
              file=sys.stderr)
        return 2
    from ..deploy.runtime import runtime_options
    serve(args.checkpoint, host=args.host, port=args.port, device=args.device,
          max_upload_mb=args.max_upload_mb, max_pixels=args.max_megapixels * 1e6,
          queue_size=args.queue, timeout_s=args.timeout, header_timeout_s=args.header_timeout,
          body_timeout_s=args.body_timeout, **runtime_options(args))
    return 0


def register(sub) -> None:
    """Add ``compare`` and ``serve`` to the ``deeplabv2`` sub-commands."""
    co = sub.add_parser(
        "compare", help="per-class IoU of one run against another, sorted",
        description="The per-class IoU of one run against another (each a metrics.json or a "
                    "report folder), in points, sorted; --report also writes an HTML page.")
    co.add_argument("run", help="metrics.json (or a report folder) of the run")
    co.add_argument("baseline", help="metrics.json (or a report folder) to compare against")
    co.add_argument("--report", default=None, metavar="DIR", help="also write an HTML report")
    co.set_defaults(func=cmd_compare)

    from ..deploy.runtime import add_runtime_args
    from .server import DEFAULTS
    se = sub.add_parser(
        "serve", help="local web app and HTTP API to try a model on images",
        description="Serve a checkpoint as a local web app and HTTP API: upload an image, get "
                    "its segmentation. Uploads, image size, waiting requests and time per "
                    "request are bounded (413, 503, 504 beyond); the runtime and precision "
                    "flags are predict's.")
    se.add_argument("checkpoint", help="a deeplabv2 checkpoint (.pth or .safetensors) or a "
                                       "model folder of export-hub")
    se.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only)")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--device", default="auto")
    add_runtime_args(se)  # --precision, --runtime, --eager, --compile, --winograd: as predict's
    se.add_argument("--max-upload-mb", type=float, default=DEFAULTS["max_upload_mb"],
                    help="largest request body accepted (413 beyond)")
    se.add_argument("--max-megapixels", type=float, default=DEFAULTS["max_pixels"] / 1e6,
                    help="largest image accepted, in millions of pixels (413 beyond; checked "
                         "from the header before decoding)")
    se.add_argument("--queue", type=int, default=DEFAULTS["queue_size"],
                    help="requests admitted at once, running or waiting (503 beyond)")
    se.add_argument("--timeout", type=float, default=DEFAULTS["timeout_s"],
                    help="seconds an admitted request (its whole body received) may wait and "
                         "run before a 504")
    se.add_argument("--header-timeout", type=float, default=DEFAULTS["header_timeout_s"],
                    help="seconds a connection has to send a request's line and headers, "
                         "from its opening or the previous answer (408 and closed beyond)")
    se.add_argument("--body-timeout", type=float, default=DEFAULTS["body_timeout_s"],
                    help="seconds a request has to send its whole body, at most --timeout "
                         "(408 and closed beyond; 30 s sends 20 MB at 5.6 Mbit/s)")
    se.set_defaults(func=cmd_serve)
