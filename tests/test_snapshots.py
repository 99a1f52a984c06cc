"""Snapshot series: ``train.snapshot_every`` writes weights-only snapshots, a resume continues
the series, and ``deeplabv2 evaluate RUN_DIR`` evaluates them, picks final and best, and
reuses what it evaluated before."""

import json
import os
import shutil

import pytest
import torch

from deeplabv2 import load_model
from deeplabv2.cli import main
from deeplabv2.config import ConfigError, load_config, resolve_path, save_config
from deeplabv2.evaluation import series
from deeplabv2.snapshots import list_snapshots, snapshot_name
from deeplabv2.train import TrainingError, train

from test_train import TINY, tiny_config


def _tiny_args(out):
    return [*TINY, f"train.out_dir={out}"]

SNAP = ["train.snapshot_every=2", "data.options={num_samples: 6, size: [48, 64]}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """5 iterations, a snapshot every 2: snapshots at 2 and 4, model.pth at 5."""
    out = tmp_path_factory.mktemp("snap") / "run"
    train(tiny_config(out, "train.iterations=5", "train.checkpoint_every=5", *SNAP))
    return out


def _names(run_dir):
    return [p.name for _, p in list_snapshots(run_dir)]


def test_snapshots_are_weights_only_model_files(run, tmp_path):
    assert _names(run) == ["iter_000002.pth", "iter_000004.pth"]
    assert snapshot_name(120000) == "iter_120000.pth"
    last = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    for _, path in list_snapshots(run):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        # the final model.pth's fields, none of the training checkpoint's
        assert set(obj) == set(torch.load(run / "model.pth", weights_only=True))
        assert not {"optimizer_state", "rng_state", "train_state"} & set(obj)
        assert {"optimizer_state", "rng_state", "train_state"} <= set(last)
        model = load_model(path)  # what evaluate / predict / serve read
        assert model.classes == load_model(run / "model.pth").classes
        # no momentum buffers: about half of the training checkpoint
        assert path.stat().st_size < 0.6 * (run / "last.pth").stat().st_size
    # the snapshot at 4 is the weights after 4 iterations: a run stopped at 4 (the same poly
    # schedule over 5) ends with a byte-identical model.pth
    stopped = train(tiny_config(tmp_path / "stop4", "train.iterations=5", "train.stop_at=4",
                                *SNAP[1:]))
    assert (run / "snapshots" / "iter_000004.pth").read_bytes() == \
        (stopped.out_dir / "model.pth").read_bytes()


def test_snapshots_do_not_change_the_run(run, tmp_path):
    plain = train(tiny_config(tmp_path / "plain", "train.iterations=5",
                              "train.checkpoint_every=5", SNAP[1]))
    assert (plain.out_dir / "model.pth").read_bytes() == (run / "model.pth").read_bytes()
    assert not (plain.out_dir / "snapshots").exists()  # snapshot_every 0 (default): none


def test_resume_continues_the_series(tmp_path, capsys):
    """A crash during iteration 5 (checkpoint at 3, snapshots at 2 and 4): the resume from 3
    drops the snapshot at 4, writes it again and goes on to 6; the series is the
    uninterrupted run's, byte for byte."""
    args = ["train.iterations=6", "train.checkpoint_every=3", *SNAP]
    full = train(tiny_config(tmp_path / "full", *args)).out_dir

    def crash(iteration, logs):
        if iteration == 5:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(part, *args), on_iteration=crash)
    assert _names(part) == ["iter_000002.pth", "iter_000004.pth"]
    first = (part / "snapshots" / "iter_000002.pth").stat().st_mtime_ns
    stale = part / "snapshots" / ".iter_000006.pth.x1y2.tmp"  # a write killed half-way
    stale.write_bytes(b"partial")
    capsys.readouterr()
    train(tiny_config(part, *args), resume="auto")
    printed = capsys.readouterr().out
    assert "iter_000004.pth (taken after iteration 3" in printed
    assert f"removed {stale} (an unfinished write" in printed and not stale.exists()
    assert _names(part) == _names(full) == ["iter_000002.pth", "iter_000004.pth",
                                            "iter_000006.pth"]
    assert (part / "snapshots" / "iter_000002.pth").stat().st_mtime_ns == first  # kept
    for name in _names(full):
        assert (part / "snapshots" / name).read_bytes() == \
            (full / "snapshots" / name).read_bytes(), name


def test_snapshots_hold_a_run_and_overwrite_removes_them(tmp_path):
    out = tmp_path / "run"
    (out / "snapshots").mkdir(parents=True)
    shutil.copy(__file__, out / "snapshots" / "iter_000002.pth")
    with pytest.raises(TrainingError, match="holds a run \\(snapshots/\\)"):
        train(tiny_config(out, "train.iterations=1"))
    (out / "snapshots.json").write_text("{}")
    train(tiny_config(out, "train.iterations=1", *SNAP), overwrite=True)
    assert _names(out) == [] and not (out / "snapshots.json").exists()


def test_snapshot_every_is_checked():
    with pytest.raises(ConfigError, match="train.snapshot_every must be 0 .* got -2"):
        load_config(None, ["train.snapshot_every=-2"])
    with pytest.raises(ConfigError, match="unknown key train.snapshot_evry"):
        load_config(None, ["train.snapshot_evry=2"])


def test_choose_final_and_best():
    rows = [{"iteration": 2, "file": "a", "miou": 0.3, "final": False},
            {"iteration": 4, "file": "b", "miou": 0.5, "final": False},
            {"iteration": 6, "file": "c", "miou": None, "final": False},
            {"iteration": 8, "file": "d", "miou": 0.5, "final": False},
            {"iteration": 10, "file": "e", "miou": 0.4, "final": True}]
    final, best = series.choose(rows)
    assert final["file"] == "e"
    assert best["file"] == "b"  # the highest; the earliest of equal ones (ADVENT's strict >)


@pytest.mark.parametrize("selection, miou", [("final", "40.00"), ("best", "50.00")])
def test_the_papers_selection_is_named(selection, miou):
    """eval.selection says which of final and best the paper reports (ADVENT: best)."""
    rows = [{"iteration": 2, "file": "a", "miou": 0.5, "final": False},
            {"iteration": 4, "file": "b", "miou": 0.4, "final": True}]
    final, best = series.choose(rows)
    result = series.SeriesResult(rows, final, best, selection=selection)
    assert series.summary_lines(result)[-1] == (
        f"the paper's number (eval.selection {selection}): mIoU {miou}")
    assert load_config("gta5_to_cityscapes_advent").eval.selection == "best"
    assert load_config("gta5_to_cityscapes_dacs").eval.selection == "final"
    with pytest.raises(ConfigError, match="eval.selection='peak'; valid values: final, best"):
        load_config(None, ["eval.selection=peak"])


def _count_evaluations(monkeypatch):
    import deeplabv2.evaluation.evaluate as ev
    calls = []
    real = ev.evaluate

    def counting(model, dataset, **kw):
        calls.append(1)
        return real(model, dataset, **kw)
    monkeypatch.setattr(ev, "evaluate", counting)
    return calls


def test_evaluate_run_dir_equals_single_evaluations_and_caches(run, tmp_path, monkeypatch,
                                                                capsys):
    out = tmp_path / "series"
    calls = _count_evaluations(monkeypatch)
    assert main(["evaluate", str(run), "-o", str(out)]) == 0
    assert len(calls) == 3  # two snapshots and model.pth
    printed = capsys.readouterr().out
    data = json.loads((out / "snapshots.json").read_text())
    rows = data["snapshots"]
    assert [(r["iteration"], r["file"], r["final"]) for r in rows] == [
        (2, "snapshots/iter_000002.pth", False), (4, "snapshots/iter_000004.pth", False),
        (5, "model.pth", True)]
    # each equals evaluating that checkpoint alone, as `evaluate CHECKPOINT -c` does
    singles = []
    for r in rows:
        single = tmp_path / f"{r['iteration']}.json"
        assert main(["evaluate", str(run / r["file"]), "-c", str(run / "config.yaml"),
                     "--out", str(single)]) == 0
        s = json.loads(single.read_text())
        singles.append(s)
        assert r["miou"] == pytest.approx(s["miou"], abs=1e-12)
        assert r["pixel_accuracy"] == pytest.approx(s["pixel_accuracy"], abs=1e-12)
        for name, c in s["classes"].items():
            assert r["iou"][name] == (None if c["iou"] is None else pytest.approx(c["iou"]))
    best = max(range(3), key=lambda i: (singles[i]["miou"], -i))
    assert data["best"]["file"] == rows[best]["file"]
    assert data["best"]["selection"] == series.BEST_LABEL
    assert data["final"] == {"iteration": 5, "file": "model.pth", "miou": rows[2]["miou"]}
    assert f"final: mIoU {100 * rows[2]['miou']:.2f} at iteration 5" in printed
    assert "selected on the evaluated split, as the papers did" in printed
    md = (out / "snapshots.md").read_text()
    assert "| iteration | mIoU % |" in md and "| 5 (final" in md
    assert f"| {100 * rows[0]['miou']:.2f} |" in md
    assert (out / "snapshots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    calls.clear()  # a re-run evaluates nothing new
    assert main(["evaluate", str(run), "-o", str(out)]) == 0
    assert calls == [] and "0 evaluated now, 3 from" in capsys.readouterr().out
    assert json.loads((out / "snapshots.json").read_text())["snapshots"] == rows
    snap = run / "snapshots" / "iter_000002.pth"  # a changed file is evaluated again
    os.utime(snap, ns=(snap.stat().st_atime_ns, snap.stat().st_mtime_ns + 10**9))
    assert main(["evaluate", str(run), "-o", str(out)]) == 0
    assert len(calls) == 1
    calls.clear()  # other settings: the whole series again
    assert main(["evaluate", str(run), "-o", str(out), "--limit", "1"]) == 0
    assert len(calls) == 3 and "other settings" in capsys.readouterr().out


def test_final_snapshot_is_not_evaluated_twice(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(run, "train.iterations=4", "train.checkpoint_every=4", *SNAP))
    calls = _count_evaluations(monkeypatch)
    assert main(["evaluate", str(run)]) == 0  # writes into the run folder
    rows = json.loads((run / "snapshots.json").read_text())["snapshots"]
    assert [(r["file"], r["final"]) for r in rows] == [
        ("snapshots/iter_000002.pth", False), ("snapshots/iter_000004.pth", True)]
    assert rows[1]["same_as"] == "model.pth" and "same_as" not in rows[0]
    assert len(calls) == 2
    assert "| 4 (final" in (run / "snapshots.md").read_text()
    assert "iteration 4 (snapshots/iter_000004.pth = model.pth)" in \
        (run / "snapshots.md").read_text()


def test_adaptation_run_dir_is_evaluated_on_its_target_validation_set(tmp_path):
    """An adaptation run's config.yaml names the source in ``data``; its series is scored on
    the set training validated on: the target's ``target_val_split`` with
    ``target_val_options`` (here 4 restyled scenes, not the 6 source ones)."""
    run = tmp_path / "run"
    target = "{num_samples: 4, size: [48, 64], style: target}"
    train(tiny_config(run, "train.iterations=2", "train.checkpoint_every=2", *SNAP,
                      "adapt.method=source_only", "adapt.target_dataset=synthetic",
                      f"adapt.target_val_options={target}"))
    assert main(["evaluate", str(run)]) == 0
    data = json.loads((run / "snapshots.json").read_text())
    assert data["settings"]["images"] == 4
    assert data["settings"]["dataset"]["options"]["style"] == "target"
    single = tmp_path / "single.json"  # the same as the final model on that set alone
    cfg = load_config(None, [*_tiny_args(run), f"data.options={target}"])
    save_config(cfg, tmp_path / "target.yaml")
    assert main(["evaluate", str(run / "model.pth"), "-c", str(tmp_path / "target.yaml"),
                 "--out", str(single)]) == 0
    assert data["final"]["miou"] == pytest.approx(json.loads(single.read_text())["miou"])
    # one checkpoint with the run's own config is scored on the same target set, not the
    # source its data section names
    own = tmp_path / "own.json"
    assert main(["evaluate", str(run / "model.pth"), "-c", str(run / "config.yaml"),
                 "--out", str(own)]) == 0
    assert json.loads(own.read_text())["miou"] == pytest.approx(data["final"]["miou"])
    source = tmp_path / "source.json"
    cfg = load_config(str(run / "config.yaml"), ["adapt.method=none"])
    save_config(cfg, tmp_path / "source.yaml")
    assert main(["evaluate", str(run / "model.pth"), "-c", str(tmp_path / "source.yaml"),
                 "--out", str(source)]) == 0
    assert json.loads(source.read_text())["miou"] != pytest.approx(data["final"]["miou"])


def test_evaluate_run_dir_report_has_the_series(run, tmp_path):
    out, report = tmp_path / "series", tmp_path / "report"
    assert main(["evaluate", str(run), "-o", str(out), "--report", str(report)]) == 0
    page = (report / "index.html").read_text()
    assert 'id="snapshots"' in page and 'id="snapshot-curve"' in page
    assert "iter_000002.pth" in page and "as the papers did" in page
    final = json.loads((out / "snapshots.json").read_text())["final"]
    # the page is the final model's
    assert json.loads((report / "metrics.json").read_text())["miou"] == \
        pytest.approx(final["miou"])


def test_evaluate_run_dir_errors_are_clear(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run / "config.yaml", empty / "config.yaml")
    assert main(["evaluate", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: no snapshots (snapshots/iter_*.pth) and no model.pth" in err

    (tmp_path / "noconfig").mkdir()
    assert main(["evaluate", str(tmp_path / "noconfig")]) == 2
    assert "no config.yaml" in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    bad = broken / "snapshots" / "iter_000004.pth"
    bad.write_bytes(bad.read_bytes()[:1000])
    assert main(["evaluate", str(broken)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "truncated or corrupt" in err
    assert f"1 earlier result kept in {broken / 'snapshots.json'}" in err
    # the one before it is not evaluated again once the file is replaced
    rows = json.loads((broken / "snapshots.json").read_text())["snapshots"]
    assert [r["iteration"] for r in rows] == [2]

    assert main(["evaluate", str(run / "model.pth")]) == 2  # a file needs -c
    assert "-c/--config CONFIG is needed" in capsys.readouterr().err


# The released codes' snapshot intervals: AdaptSegNet train_gta2cityscapes_multi.py
# SAVE_PRED_EVERY = 5000; ADVENT advent/domain_adaptation/config.py TRAIN.SAVE_PRED_EVERY and
# TEST.SNAPSHOT_STEP = 2000; FDA options/train_options.py --save-pred-every 2500; DACS
# configs/configUDA.json save_checkpoint_every and val_per_iter 5000.
RELEASED_INTERVALS = {"adaptsegnet": 5000, "advent": 2000, "fda": 2500, "dacs": 5000}


@pytest.mark.parametrize("source", ["gta5", "synthia"])
@pytest.mark.parametrize("method", sorted(RELEASED_INTERVALS))
def test_adaptation_configs_snapshot_at_the_released_interval(source, method):
    cfg = load_config(f"{source}_to_cityscapes_{method}")
    every = cfg.train.snapshot_every
    assert every == RELEASED_INTERVALS[method]
    assert (cfg.train.stop_at or cfg.train.iterations) % every == 0  # the last is a snapshot
    header = resolve_path(f"{source}_to_cityscapes_{method}").read_text().split("\nmodel:")[0]
    assert f"Snapshots every {every} iterations (train.snapshot_every)" in header
    assert load_config("cityscapes").train.snapshot_every == 0  # supervised: off
