"""Impossible or pointless crops (issue 24, item 3): a step that cannot fit is refused before
it is tried, in one line naming the keys; a crop larger than every image is a warning; the
check changes nothing of the run it checks."""

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deeplabv2 import memory
from deeplabv2.cli import main
from deeplabv2.config import ConfigError, load_config, save_config
from deeplabv2.data import build_dataset
from deeplabv2.train import TrainingError, train

from test_train import tiny_config
from test_uda_train import uda_config

SRC = Path(memory.__file__).resolve().parents[1]
GIB = 2 ** 30
SMALL_DEMO = ["data.options={num_samples: 16}", "data.num_workers=0", "train.val_limit=1",
              "train.tensorboard=false", "train.device=cpu"]


def _child(args, tmp_path, limit_as: int | None = None, env_extra=None):
    """Run ``python args`` with ``ulimit -v limit_as``; return (exit code, stdout, stderr,
    the child's peak RSS in bytes)."""
    def preexec():
        if limit_as:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, *args], stdout=o, stderr=e, env=env,
                                preexec_fn=preexec, cwd=tmp_path)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out.read_text(), err.read_text(), usage.ru_maxrss * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ulimit -v and /proc")
def test_impossible_crop_is_refused_in_one_line_before_a_crop_is_made(tmp_path):
    """The issue's `deeplabv2 train -c demo data.crop_size=[4000,4000]` (batch 8): killed by
    the kernel at 19 GB before. Under a 4 GiB address-space limit (so that this test can never
    take the machine's memory, and so that the answer does not depend on the machine's RAM)
    it is exit code 2 and one line with the keys and the estimate; the process never grew to
    one 4000x4000 batch (8 crops: 2.4 GiB)."""
    code, out, err, peak = _child(
        ["-m", "deeplabv2", "train", "-c", "demo", "data.crop_size=[4000,4000]",
         f"train.out_dir={tmp_path / 'run'}", *SMALL_DEMO], tmp_path, limit_as=4 * GIB)
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    line = lines[0]
    assert line.startswith("deeplabv2 train: error: data.crop_size=[4000, 4000] with "
                           "data.batch_size=8: one training step needs about "), line
    assert "GiB" in line and "(ulimit -v) has" in line and "train.accumulate" in line, line
    assert "train.check_memory=false" in line, line
    needed = float(line.split("needs about ")[1].split(" GiB")[0])
    assert needed > 19, line  # more than the 19 GB the kernel killed it at
    assert peak < 1.5 * GIB, f"the child grew to {peak / GIB:.1f} GiB before refusing"
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written for a refused run


def test_estimate_is_within_a_sane_factor_of_the_measured_peak(tmp_path):
    """The demo network at 4x its crop (192x320, batch 8, the loss at full resolution): the
    estimate the check makes against the peak resident memory of the run's first two steps
    (the second with SGD's momentum), above what the process held when the check ran (plus
    the network it held then, which the estimate counts)."""
    script = tmp_path / "peak.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, resource, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import conftest  # FP32 whatever the machine
        from deeplabv2 import memory
        from deeplabv2.config import load_config
        from deeplabv2.train import train

        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        seen, peak = {{}}, {{}}
        estimate_step, held_bytes = memory.estimate_step, memory.held_bytes

        def spy(cfg, model, optimizer, method, *args, **kwargs):
            seen["estimate"] = estimate_step(cfg, model, optimizer, method, *args, **kwargs)
            seen["held"] = held_bytes(model, optimizer, method, args[-1])
            seen["rss"] = rss()
            return seen["estimate"]

        def after(iteration, logs):  # before the last iteration's validation and checkpoint
            if iteration == 2:
                peak["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        memory.estimate_step = spy
        cfg = load_config("demo", ["data.crop_size=[192, 320]", "train.iterations=3",
                                   "train.progress=false", "train.out_dir=run",
                                   *{SMALL_DEMO!r}])
        train(cfg, on_iteration=after)
        print(json.dumps({{"estimate": seen["estimate"].total,
                           "measured": peak["rss"] - seen["rss"] + seen["held"]}}))
        """))
    # big blocks straight from and back to the OS, so that the peak RSS is the peak in use
    code, out, err, _ = _child([str(script)], tmp_path,
                               env_extra={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert code == 0, err[-3000:]
    r = json.loads(out.strip().splitlines()[-1])
    assert r["measured"] > 100 * 2 ** 20, r  # the steps are what is measured, not noise
    assert 0.9 < r["estimate"] / r["measured"] < 2.0, r


def test_check_refuses_what_does_not_fit_and_can_be_turned_off(tmp_path, monkeypatch, capsys):
    """With 1 MiB said available the tiny run is refused in one line, nothing written; a
    resume that is refused keeps its run's config.yaml; train.check_memory=false trains."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: (2 ** 20, "this machine"))
    run = tmp_path / "run"
    save_config(tiny_config(run, "train.iterations=1"), tmp_path / "tiny.yaml")
    assert main(["train", "-c", str(tmp_path / "tiny.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "data.crop_size=[48, 64] with data.batch_size=2: one training step needs about " \
           "" in err and "this machine has " in err, err
    assert not (run / "config.yaml").exists()

    monkeypatch.undo()
    first = train(tiny_config(run, "train.iterations=2", "train.checkpoint_every=1",
                              "train.stop_at=1"))
    config_yaml = (run / "config.yaml").read_text()
    monkeypatch.setattr(memory, "available_bytes", lambda device: (2 ** 20, "this machine"))
    with pytest.raises(TrainingError, match=r"data\.crop_size=\[48, 64\] with data\.batch_siz"):
        train(tiny_config(run, "train.iterations=2"), resume="auto")
    assert (run / "config.yaml").read_text() == config_yaml

    unchecked = train(tiny_config(tmp_path / "unchecked", "train.iterations=1",
                                  "train.check_memory=false"))
    assert unchecked.iterations == 1 and first.iterations == 1


def test_check_memory_must_be_a_boolean():
    with pytest.raises(ConfigError, match="train.check_memory must be true or false"):
        load_config(None, ["train.check_memory=maybe"])


@pytest.mark.parametrize("method,more", [
    ("none", ["train.loss_at=full", "train.channels_last=true", "model.frozen_bn=false"]),
    ("none", ["model.backbone=vgg16", "data.crop_size=[56, 64]"]),  # dropout draws
    ("none", ["train.msc_scales=[1, 0.75, 0.5]"]),
    ("dacs", ["model.frozen_bn=false"]),  # random mixing, an EMA teacher, BN statistics
    ("dacs", ["model.bn=batch", "model.head_mode=adaptsegnet"]),  # the teacher's statistics
    ("adaptsegnet", ["adapt.multi_level=true"]),  # discriminators and their Adam
    ("fda", ["adapt.fda_ent_start=2"]),  # the probe's entropy pass is not logged at step 1
])
def test_the_check_changes_nothing_of_the_run(tmp_path, method, more, monkeypatch):
    """The probe runs the network and the method: with it and without it, the same weights,
    BN statistics, method modules and logged losses, bit for bit; and it leaves the global RNG
    as it found it (the loop reseeds every iteration and the samples are seeded by
    (seed, epoch, index), so only this shows a probe that draws)."""
    states = []
    measure_saved = memory.measure_saved

    def spy(*args, **kwargs):
        before = torch.get_rng_state()
        sizes = measure_saved(*args, **kwargs)
        states.append(torch.equal(before, torch.get_rng_state()))
        return sizes

    monkeypatch.setattr(memory, "measure_saved", spy)
    runs = {}
    for check in ("true", "false"):
        cfg = uda_config(tmp_path / check, method, "train.iterations=3", *more,
                         f"train.check_memory={check}")
        logs = []
        result = train(cfg, on_iteration=lambda it, step_logs: logs.append(step_logs))
        runs[check] = (logs, result, torch.load(tmp_path / check / "last.pth",
                                                weights_only=True))
    (la, a, ca), (lb, b, cb) = runs["true"], runs["false"]
    assert states == [True, True]  # two probes, in the checked run only
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert la == lb and len(la) == 3  # the losses, the method's terms (adapt/...), mIoU
    if ca.get("adapt_state"):
        for k, v in ca["adapt_state"]["modules"].items():
            assert torch.equal(v, cb["adapt_state"]["modules"][k]), k


def test_crop_larger_than_every_image_warns_naming_the_key(tmp_path, capsys):
    """[200, 320] on the demo's 96x160 scenes (120x200 at the largest scale 1.25) trains on
    padding in every crop: one warning line naming data.crop_size, and the run goes on. The
    demo's own crop, and a crop that fits in one dimension only, say nothing... unless no
    image is larger in the other."""
    run = tmp_path / "run"
    assert main(["train", "-c", "demo", "data.crop_size=[200,320]", "train.iterations=1",
                 "train.progress=false", f"train.out_dir={run}", *SMALL_DEMO]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in err if "data.crop_size" in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: data.crop_size=[200, 320] is larger, in height or width, than every one of "
        "the 16 training images checked"), err
    assert "120x200" in warnings[0] and "[120, 200] would fit" in warnings[0], warnings[0]
    assert (run / "model.pth").exists()

    cfg = load_config("demo", SMALL_DEMO)
    ds = build_dataset("synthetic", None, "train", num_samples=16)
    assert memory.crop_warnings(cfg, ds) == []  # data.check=none: sizes unknown, nothing said
    ds.check()
    assert ds.checked_sizes == {(96, 160): 16}
    assert memory.crop_warnings(cfg, ds) == []  # the demo's [96, 160]
    for crop, warns in (([120, 200], False), ([121, 160], True), ([96, 201], True)):
        cfg = load_config("demo", [*SMALL_DEMO, f"data.crop_size={crop}"])
        assert bool(memory.crop_warnings(cfg, ds)) == warns, crop
    cfg = load_config("demo", [*SMALL_DEMO, "data.crop_size=[121, 160]", "data.scales=[1, 2]"])
    assert memory.crop_warnings(cfg, ds) == []  # the discrete scales reach 192x320
