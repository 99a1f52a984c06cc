"""``deeplabv2 adapt-table``: several runs' evaluations in one table as the papers print it
(:mod:`deeplabv2.evaluation.table`, :func:`deeplabv2.app.report.write_table_page`)."""

import json

import pytest
import yaml

from deeplabv2.cli import main
from deeplabv2.evaluation.metrics import ConfusionMatrix, save_json
from deeplabv2.evaluation.protocols import describe, get_protocol
from deeplabv2.evaluation.table import TableError, build_table, markdown, read_row

CLASSES = ["road", "car", "pole"]


def _metrics(counts, protocol="none", **extra):
    """evaluate()'s dict from a hand-made (3, 3) confusion matrix."""
    cm = ConfusionMatrix.from_counts([row + [0] for row in counts])
    results = cm.compute()
    results["confusion"] = counts
    results["protocol"] = describe(get_protocol(protocol))
    results.update(extra)
    return results


# confusion A: road 6 right, 2 as car; car 3 right, 1 as road; pole 1 right, 1 as car
A = [[6, 2, 0], [1, 3, 0], [0, 1, 1]]
# confusion B (as many pixels): all right but one pole pixel called road
B = [[7, 0, 0], [0, 4, 0], [1, 0, 2]]
# by hand, IoU = TP / (row + column - TP):
#   A: road 6/(8+7-6) = 66.67, car 3/(4+6-3) = 42.86, pole 1/(2+1-1) = 50.00; mIoU 53.17
#   B: road 7/(7+8-7) = 87.50, car 4/4 = 100.00, pole 2/(3+2-2) = 66.67; mIoU 84.72


def _write(tmp_path, name, results, classes=CLASSES):
    folder = tmp_path / name
    folder.mkdir()
    save_json(results, classes, folder / "metrics.json")
    return folder / "metrics.json"


def test_table_of_metrics_files_has_the_papers_layout_and_values(tmp_path):
    a = _write(tmp_path, "dacs", _metrics(A))
    b = _write(tmp_path, "daformer", _metrics(B))
    table = build_table([read_row(str(a)), read_row(str(b))])
    text = markdown(table)
    lines = text.splitlines()
    assert lines[0] == "| method | eval. | road | car | pole | mIoU |"
    assert lines[1] == "| --- | --- | ---: | ---: | ---: | ---: |"
    # the highest value of each column in bold
    assert lines[2] == "| dacs | [1] | 66.7 | 42.9 | 50.0 | 53.2 |"
    assert lines[3] == "| daformer | [1] | **87.5** | **100.0** | **66.7** | **84.7** |"
    assert "[1] none: this project's front, its test-time mode not recorded" in text
    assert "final model" in text and "Not comparable" not in text
    assert table.flagged == [False, False]
    two = markdown(table, decimals=2).splitlines()
    assert two[3] == "| daformer | [1] | **87.50** | **100.00** | **66.67** | **84.72** |"


def test_subset_mious_follow_the_miou_and_absent_ones_are_dashes(tmp_path):
    a = _write(tmp_path, "fda", _metrics(A, miou_13=0.5, miou_16=0.25))
    b = _write(tmp_path, "dacs", _metrics(A))
    text = markdown(build_table([read_row(str(a)), read_row(str(b))]))
    head, _, row_a, row_b = text.splitlines()[:4]
    assert head == "| method | eval. | road | car | pole | mIoU | mIoU 16 | mIoU 13 |"
    # equal values (every class, the mIoU) are bold in both rows
    assert row_a.endswith("| **50.0** | **53.2** | **25.0** | **50.0** |")
    assert row_b.endswith("| **50.0** | **53.2** | - | - |")


def test_rows_under_another_protocol_are_flagged_and_refused_with_strict(tmp_path):
    a = _write(tmp_path, "dacs", _metrics(A, protocol="dacs"))
    b = _write(tmp_path, "ours", _metrics(B))
    rows = [read_row(str(a)), read_row(str(b))]
    table = build_table(rows)
    assert table.flagged == [False, True] and table.marks == [0, 1]
    text = markdown(table)
    assert "| ours | [2]* |" in text
    assert "[1] dacs: image bilinear to 1024x512" in text and "vikolss/DACS" in text
    assert "[2] none" in text
    assert "**Not comparable**" in text and "ours" in table.notes[0]
    with pytest.raises(TableError, match="not comparable.*ours"):
        build_table(rows, strict=True)


def test_rows_of_other_pixel_counts_are_flagged(tmp_path):
    a = _write(tmp_path, "a", _metrics(A))
    b = _write(tmp_path, "b", _metrics([[12, 4, 0], [2, 6, 0], [0, 2, 2]]))  # twice A's
    table = build_table([read_row(str(a)), read_row(str(b))])
    assert table.flagged == [False, True]
    assert "different numbers of pixels (a 14, b 28)" in table.notes[0]


def test_rows_of_other_classes_are_refused_naming_the_file(tmp_path):
    a = _write(tmp_path, "a", _metrics(A))
    b = _write(tmp_path, "b", _metrics(A), classes=["road", "car", "sign"])
    with pytest.raises(TableError, match=r"b/metrics.json: its classes differ.*missing "
                                         r"\['pole'\], extra \['sign'\]"):
        build_table([read_row(str(a)), read_row(str(b))])


def test_run_folders_read_snapshots_with_their_selection_else_metrics(tmp_path):
    run = tmp_path / "run_a"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"adapt": {"method": "daformer"}, "eval": {"selection": "best", "protocol": "none"},
         "train": {"val_limit": 0}}))
    iou = lambda r, c, p: {"road": r, "car": c, "pole": p}  # noqa: E731
    (run / "snapshots.json").write_text(json.dumps({
        "version": 1, "settings": {"eval": {"protocol": "dacs"}, "flags": {"protocol": None}},
        "classes": CLASSES, "snapshots": [
            {"iteration": 10, "file": "snapshots/iter_000010.pth", "final": False,
             "miou": 0.6, "iou": iou(0.6, 0.6, 0.6), "pixels": 100},
            {"iteration": 20, "file": "model.pth", "final": True, "miou": 0.5,
             "iou": iou(0.4, 0.5, 0.6), "pixels": 100}]}))
    best = read_row(str(run))
    assert best.label == "daformer" and best.selection == "best"
    assert best.iou == [0.6, 0.6, 0.6] and best.protocol["name"] == "dacs"
    (run / "config.yaml").write_text(yaml.safe_dump({"adapt": {"method": "daformer"}}))
    final = read_row(f"final={run}")
    assert final.label == "final" and final.iou == [0.4, 0.5, 0.6]
    table = build_table([best, final])
    assert table.flagged == [False, True]  # best-of-series against a final model
    assert "best snapshot, selected on the evaluated split" in table.footnotes[0]
    # a training run without snapshots.json: its metrics.json, validated on 5 images only
    run_b = tmp_path / "run_b"
    run_b.mkdir()
    save_json(_metrics(B), CLASSES, run_b / "metrics.json")
    (run_b / "config.yaml").write_text(yaml.safe_dump(
        {"adapt": {"method": "dacs"}, "train": {"val_limit": 5}}))
    row = read_row(str(run_b))
    assert row.label == "dacs" and row.protocol["images"] == "first 5"
    assert "on the first 5 images only" in build_table([row]).footnotes[0]
    assert "none: this project's front, whole image, one scale" in build_table([row]).footnotes[0]


def test_the_test_time_mode_of_a_series_is_part_of_its_evaluation(tmp_path):
    """Under protocol none, MSC, flip or the CRF change the numbers: a series evaluated with
    them (config or evaluate's flags) is another evaluation than one without, and --limit
    counts fewer images."""
    def series(folder, eval_section, flags):
        run = tmp_path / folder
        run.mkdir()
        (run / "snapshots.json").write_text(json.dumps({
            "settings": {"eval": eval_section, "flags": flags}, "classes": CLASSES,
            "snapshots": [{"iteration": 1, "file": "model.pth", "final": True, "miou": 0.5,
                           "iou": {c: 0.5 for c in CLASSES}, "pixels": 10}]}))
        return read_row(str(run))
    plain = series("plain", {"protocol": "none", "avg_scales": [1.0]}, {"msc": None})
    msc = series("msc", {"protocol": "none", "flip": True}, {"msc": [1, 0.75, 0.5],
                                                            "crf": True})
    part = series("part", {"protocol": "none"}, {"limit": 3})
    assert plain.protocol["test_time"] == "whole image, one scale"
    assert msc.protocol["test_time"] == "MSC [1, 0.75, 0.5], flip, dense CRF"
    table = build_table([plain, msc, part])
    assert table.marks == [0, 1, 2] and table.flagged == [False, True, True]
    assert table.footnotes[1].startswith("none: this project's front, MSC [1, 0.75, 0.5], "
                                         "flip, dense CRF; final model")
    assert "on the first 3 images only" in table.footnotes[2]


def test_cli_writes_markdown_and_html_and_reports_bad_inputs(tmp_path, capsys):
    a = _write(tmp_path, "dacs", _metrics(A))
    b = _write(tmp_path, "daformer", _metrics(B))
    out, page = tmp_path / "t.md", tmp_path / "page"
    assert main(["adapt-table", str(a), f"mine={b}", "-o", str(out), "--report", str(page),
                 "--title", "GTA5 -> Cityscapes"]) == 0
    md = out.read_text()
    assert md.startswith("# GTA5 -> Cityscapes\n")
    assert "| mine | [1] | **87.5** | **100.0** | **66.7** | **84.7** |" in md
    html = (page / "index.html").read_text()
    assert '<table id="adapt-table">' in html and '<tr data-row="mine">' in html
    assert '<td class="num best" data-column="mIoU"><b>84.7</b></td>' in html
    assert '<td class="num" data-column="mIoU">53.2</td>' in html
    capsys.readouterr()
    # errors: one line naming the file, exit code 2
    assert main(["adapt-table", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such run folder or metrics file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["adapt-table", str(bad)]) == 2
    assert "bad.json: no 'classes' and 'miou'" in capsys.readouterr().err
    assert main(["adapt-table", str(a), str(a)]) == 2
    assert "two rows named 'dacs'" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["adapt-table", str(empty)]) == 2
    assert "neither snapshots.json" in capsys.readouterr().err
    c = _write(tmp_path, "other", _metrics(B, protocol="advent"))
    assert main(["adapt-table", str(a), str(c), "--strict"]) == 2
    assert "rows not comparable" in capsys.readouterr().err


def test_adapt_demo_daformer_row_and_its_per_class_table(tmp_path, monkeypatch, capsys):
    """``demo --adapt --methods daformer`` on a few scenes and iterations: the row runs
    DAFormer's strategy with the demo's settings, and the demo writes adapt-table's table, the
    same one the command makes from the runs' files."""
    from deeplabv2.config import load_config
    from deeplabv2.demo import adapt as demo
    for name in ("SOURCE", "TARGET", "TARGET_VAL", "SOURCE_VAL"):
        monkeypatch.setattr(demo, name, {**getattr(demo, name), "num_samples": 6})
    summary = demo.run_adapt_demo(
        tmp_path, methods=("daformer",), source_iterations=4, method_iterations=2,
        overrides=["model.width=8", "data.batch_size=2", "data.num_workers=0",
                   "train.threads=1", "train.progress=false", "train.tensorboard=false"])
    names = ["warm_up", "source_only", "daformer", "target_supervised"]
    assert list(summary["runs"]) == names
    cfg = load_config(str(tmp_path / "daformer" / "config.yaml"))
    assert cfg.adapt.method == "daformer" and cfg.adapt.ema_alpha == 0.999
    assert cfg.adapt.fdist_classes == [5] and cfg.adapt.pseudo_margins == [3, 22, 0, 0]
    # the warm-up keeps its share of the 2-iteration run: 1500 / 40000 x 2 = 0.075, at least 1
    assert cfg.data.rare_class_sampling["min_pixels"] == 176 and cfg.train.warmup_iters == 1
    assert cfg.train.optimizer == "sgd" and cfg.model.bn == "batch"
    rows = [line for line in (tmp_path / "per_class.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == names
    for row, name in zip(rows[1:], names):  # mIoU last, as the summary's
        miou = summary["runs"][name]["target_val_miou"]
        assert row.rstrip(" |").split(" | ")[-1].strip("*") == f"{100 * miou:.1f}"
        assert row.split(" | ")[1] == "[1]"  # one evaluation for all
    page = (tmp_path / "index.html").read_text()
    assert '<table id="adapt-table">' in page and '<section id="demo-summary">' in page
    capsys.readouterr()
    files = [str(tmp_path / n / demo.TARGET_METRICS) for n in names]
    assert main(["adapt-table", *files]) == 0
    printed = capsys.readouterr().out
    assert all(r in printed for r in rows)
