"""Faults and bad inputs (issue 12): nothing is lost (files byte-compared), nothing is silent,
and each failure ends in one line that says what is wrong. Numbers refer to the issue's items."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplabv2 import build_model, load_model, save_weights
from deeplabv2.cli import main
from deeplabv2.config import ConfigError, load_config, save_config
from deeplabv2.data.base import DatasetError, read_image
from deeplabv2.utils.digest import content_digest, weights_digest
from deeplabv2.utils.fileio import RunLock, WriteError, atomic_write, atomic_write_text
from deeplabv2.train import TrainingError, train
from deeplabv2.weights import WeightsError
from extras import require
from file_size_limit import CLI, refused, run_python
from torchrun import run_torchrun

from test_train import TINY, tiny_config
from test_uda_train import TARGET

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(num_classes=3, **kw):
    return build_model({"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8,
                        "num_classes": num_classes, **kw})


def snapshot(folder: Path) -> dict:
    """``{relative path: bytes}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_line_error(capsys, *needles):
    """The error is the last line of stderr, alone of its kind (progress bars aside)."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "\r" not in line and "img/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("deeplabv2 "), err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], err
    return lines[0]


# -- 1. predict never replaces an input; same stems get distinct outputs ------------------------
def test_predict_into_the_input_folder_is_refused_and_inputs_survive(tmp_path, capsys):
    ckpt = tmp_path / "m.pth"
    save_weights(tiny_model(), ckpt, classes=["a", "b", "c"])
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("x.png", "y.png"):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(photos / name)
    before = snapshot(photos)
    assert main(["predict", str(ckpt), str(photos), "-o", str(photos)]) == 2
    one_line_error(capsys, "would replace the input image", "x.png")
    assert snapshot(photos) == before  # nothing replaced, nothing added


def test_predict_gives_same_stem_inputs_distinct_outputs(tmp_path, capsys):
    ckpt = tmp_path / "m.pth"
    save_weights(tiny_model(), ckpt, classes=["a", "b", "c"])
    rng = np.random.default_rng(0)
    inputs = [tmp_path / "a" / "x.png", tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.png",
              tmp_path / "a" / "legend.png"]
    for p in inputs:
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(p)
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(tmp_path / "a"), str(tmp_path / "b"),
                 str(tmp_path / "a" / "x.png"), "-o", str(out)]) == 0  # x.png named twice
    assert "4 predictions written" in capsys.readouterr().out
    labels = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert labels == ["a/x_jpg.png", "a/x_png.png", "b/x.png", "legend.png", "legend_2.png"]
    overlays = list(out.rglob("*_overlay.jpg"))  # each over its own (distinct) input
    assert len(overlays) == 4 and len({p.read_bytes() for p in overlays}) == 4


# -- 2. the replica digest works for channels-last and 0-d tensors; DDP on the demo config ------
def test_weights_digest_any_layout_and_dtype():
    model = tiny_model(frozen_bn=False)
    nchw = weights_digest(model)
    cl = model.to(memory_format=torch.channels_last)
    assert any(not p.is_contiguous() for p in cl.parameters())
    assert weights_digest(cl) == nchw  # same values, other strides: same digest
    assert content_digest({"a": torch.tensor(3)}) != content_digest({"a": torch.tensor(4)})
    assert content_digest({"a": torch.ones(2, dtype=torch.bfloat16)}) != \
        content_digest({"a": torch.ones(2, dtype=torch.float16)})
    assert content_digest({"b": torch.tensor([True])}) != content_digest({"b": torch.tensor([False])})
    with torch.no_grad():
        p = next(cl.parameters())
        p[(0,) * p.dim()] += 1
    assert weights_digest(cl) != nchw


def _torchrun(args, tmp_path, script=None, env_extra=None, timeout=300):
    return run_torchrun(args, tmp_path, script, env_extra, timeout)


DEMO_FEW = ["train.iterations=3", "data.options={num_samples: 16}", "train.val_limit=2",
            "train.threads=1", "train.progress=false", "train.tensorboard=false",
            "data.num_workers=0", "train.checkpoint_every=1"]


@pytest.mark.slow
def test_torchrun_demo_config_and_resume_after_kill_equal_the_uninterrupted_run(tmp_path):
    """The demo config (channels-last, trainable BN) under 2-process torchrun writes model.pth
    and metrics.json (items 2 and 9); a DDP run killed after iteration 2 and resumed gives
    bit-identical weights to the uninterrupted one (per-rank RNG streams are functions of
    seed, rank and iteration; BN statistics are rank 0's)."""
    code, _, err = _torchrun(["train", "-c", "demo", *DEMO_FEW, "train.out_dir=full"], tmp_path)
    assert code == 0, err[-3000:]
    full = tmp_path / "full"
    assert (full / "model.pth").is_file() and (full / "metrics.json").is_file()
    replicas = json.loads((full / "replicas.json").read_text())
    assert replicas["sha256"][0] == replicas["sha256"][1]

    crash = ROOT / "tests" / "crash_after.py"
    code, _, err = _torchrun(["train", "-c", "demo", *DEMO_FEW, "train.out_dir=part"], tmp_path,
                             script=crash, env_extra={"CRASH_AFTER": "2"})
    assert code != 0
    part = tmp_path / "part"
    assert (part / ".lock").is_file() and not (part / "model.pth").exists()  # as a kill leaves it
    code, _, err = _torchrun(["train", "-c", "demo", *DEMO_FEW, "train.out_dir=part",
                              "--resume"], tmp_path)
    assert code == 0, err[-3000:]
    a, b = load_model(full / "model.pth"), load_model(part / "model.pth")
    assert weights_digest(a) == weights_digest(b)
    assert not (part / ".lock").exists()


# -- 3. a run folder is never trained over silently; the lock ------------------------------------
def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    run = tmp_path / "run"
    save_config(load_config(None, [*TINY, "train.iterations=1", f"train.out_dir={run}"]),
                cfg_path)
    assert main(["train", "-c", str(cfg_path)]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "-c", str(cfg_path)]) == 2
    one_line_error(capsys, str(run), "holds a run", "--resume", "--overwrite")
    assert snapshot(run) == before
    assert main(["train", "-c", str(cfg_path), "--overwrite", "--resume"]) == 2
    one_line_error(capsys, "give one of them")
    assert main(["train", "-c", str(cfg_path), "--overwrite"]) == 0
    assert (run / "model.pth").is_file()

    empty = tmp_path / "empty"
    assert main(["train", "-c", str(cfg_path), f"train.out_dir={empty}", "--resume"]) == 2
    one_line_error(capsys, str(empty / "last.pth"), "no checkpoint to resume")
    assert main(["train", "-c", str(cfg_path), "--from", str(tmp_path / "nope.pth")]) == 2
    one_line_error(capsys, "nope.pth: no such weights file")


def test_resume_flag_never_swallows_an_override(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    save_config(load_config(None, [*TINY, "train.iterations=1",
                                   f"train.out_dir={tmp_path / 'run'}"]), cfg_path)
    assert main(["train", "-c", str(cfg_path), "--resume", "data.num_workers=0"]) == 2
    # the override was read as an override, so the error is about the missing last.pth
    one_line_error(capsys, "last.pth: no checkpoint to resume")
    assert main(["train", "-c", str(cfg_path), f"--resume={tmp_path / 'x.pth'}"]) == 2
    one_line_error(capsys, "x.pth: no such weights file")


def test_lock_stops_a_second_writer_and_is_recovered_after_a_crash(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        with pytest.raises(Exception, match=rf"another run is writing here \(process "
                                            rf"{sleeper.pid} on"):
            train(tiny_config(run, "train.iterations=1"))
        assert not (run / "model.pth").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone (as after kill -9): the lock is taken over
    (run / ".tmp_stale").write_text("x")
    stale = run / ".last.pth.abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(tiny_config(run, "train.iterations=1"))
    assert (run / "model.pth").is_file() and not (run / ".lock").exists()
    assert not stale.exists()  # a kill's leftover .tmp is removed at the next start
    with RunLock(run):
        assert (run / ".lock").read_text().split()[0] == str(os.getpid())


# -- 4. nothing non-finite is ever saved --------------------------------------------------------
@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay"])
@pytest.mark.parametrize("value", [".nan", ".inf", "nan"])
def test_non_finite_optimizer_settings_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"train.{key} must be a"):
        load_config(None, [f"train.{key}={value}"])


def test_weights_made_non_finite_by_a_step_are_never_saved(tmp_path, monkeypatch):
    real_step = torch.optim.SGD.step
    calls = []

    def poisoning_step(self, *a, **kw):  # the 3rd update makes a weight NaN, the loss is fine
        out = real_step(self, *a, **kw)
        calls.append(1)
        if len(calls) == 3:
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", poisoning_step)
    with pytest.raises(TrainingError, match=r"weights became NaN/inf at iteration 3") as e:
        train(tiny_config(tmp_path, "train.iterations=5", "train.checkpoint_every=1"))
    assert f"newest finite checkpoint: {tmp_path / 'last.pth'}" in str(e.value)
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["train_state"]["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    model = tiny_model()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(WeightsError, match="not written: the weights hold NaN/inf"):
        save_weights(model, tmp_path / "bad.pth")
    assert not (tmp_path / "bad.pth").exists()


# -- 5. damaged checkpoints are refused ----------------------------------------------------------
def _flip_in_largest_tensor(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's data inside a torch zip file."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    start = info.header_offset
    name_len = int.from_bytes(data[start + 26:start + 28], "little")
    extra_len = int.from_bytes(data[start + 28:start + 30], "little")
    pos = start + 30 + name_len + extra_len + info.file_size // 2
    data[pos] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_checkpoint_are_detected(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, "train.iterations=1"))
    _flip_in_largest_tensor(run / "last.pth")
    torch.load(run / "last.pth", weights_only=True)  # torch alone does not notice
    cfg_path = tmp_path / "tiny.yaml"
    save_config(tiny_config(run, "train.iterations=2"), cfg_path)
    assert main(["train", "-c", str(cfg_path), "--resume", "--allow-changes"]) == 2
    one_line_error(capsys, "last.pth: damaged", "SHA-256")

    st = tmp_path / "m.safetensors"
    save_weights(tiny_model(), st, classes=["a", "b", "c"])
    data = bytearray(st.read_bytes())
    data[-10] ^= 0x01  # inside the last tensor's data
    st.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="m.safetensors: damaged"):
        load_model(st)


@pytest.mark.parametrize("kind", ["text", "folder", "fake_safetensors"])
def test_files_that_are_no_checkpoint_are_one_line_errors(tmp_path, capsys, kind):
    cfg_path = tmp_path / "tiny.yaml"
    save_config(tiny_config(tmp_path / "run", "train.iterations=1"), cfg_path)
    if kind == "text":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "last.pth").write_text("hello, not a checkpoint\n")
        args = ["train", "-c", str(cfg_path), "--resume"]
        needle = "last.pth: truncated or corrupt weights file"
    elif kind == "folder":
        (tmp_path / "run" / "last.pth").mkdir(parents=True)
        args = ["train", "-c", str(cfg_path), "--resume"]
        needle = "last.pth: is a folder, not a checkpoint"
    else:
        (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
        args = ["evaluate", str(tmp_path / "w.safetensors"), "-c", str(cfg_path)]
        needle = "w.safetensors: truncated or corrupt safetensors file"
    assert main(args) == 2
    one_line_error(capsys, needle)


# -- 6. numbers in every usual written form ------------------------------------------------------
@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("1E-3", 1e-3), ("5e-4", 5e-4),
                                        ("0.1", 0.1), ("2", 2.0), (".5", 0.5)])
def test_numeric_overrides_accept_the_usual_forms(text, value, tmp_path):
    assert load_config(None, [f"train.lr={text}"]).train.lr == value
    assert load_config(None, [f"data.scale_range=[{text}, 3]"]).data.scale_range[0] == value
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  weight_decay: {text}\n")  # in a YAML file too
    assert load_config(str(path)).train.weight_decay == value
    assert load_config(None, ["train.iterations=2e3"]).train.iterations == 2000
    with pytest.raises(ConfigError, match="train.iterations must be an integer"):
        load_config(None, ["train.iterations=1.5"])


# -- 7. images as displayed; labels outside the classes are errors ---------------------------
def test_images_16bit_exif_palette_and_alpha(tmp_path):
    gray16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    got = read_image(tmp_path / "g16.png")
    assert got.shape == (3, 4, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], np.rint(gray16 / 257).astype(np.uint8))

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:5, :5] = 255  # a white corner, top left as stored
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    shown = read_image(tmp_path / "phone.jpg")
    assert shown.shape == (30, 20, 3)  # upright as a viewer shows it
    assert shown[:5, -5:].mean() > 200  # the corner went top right

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[0, 1], [200, 100, 50])
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = [0, 0, 0, 255]  # opaque black; the rest transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    got = read_image(tmp_path / "a.png")
    assert got[0, 0].tolist() == [0, 0, 0] and got[1, 1].tolist() == [255, 255, 255]


def test_ground_truth_outside_the_classes_is_an_error_in_evaluate(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "images" / "val").mkdir(parents=True)
    (root / "masks" / "val").mkdir(parents=True)
    (root / "classes.txt").write_text("sky\nroad\nother\n")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
            root / "images" / "val" / f"{name}.png")
        mask = rng.integers(0, 3, (24, 32)).astype(np.uint8)
        if name == "b":
            mask[0, :3] = [7, 9, 255]
        Image.fromarray(mask).save(root / "masks" / "val" / f"{name}.png")
    ckpt = tmp_path / "m.pth"
    save_weights(tiny_model(), ckpt, classes=["sky", "road", "other"])
    assert main(["evaluate", str(ckpt), "-c", "demo", "data.dataset=folder",
                 f"data.root={root}", "data.options={}"]) == 2
    one_line_error(capsys, "b.png: label values 7, 9 (2 pixels) are outside the classes 0..2")
    save_weights(tiny_model(), ckpt, classes=["sky", "ground", "other"])  # other names
    assert main(["evaluate", str(ckpt), "-c", "demo", "data.dataset=folder",
                 f"data.root={root}", "data.options={}"]) == 2
    one_line_error(capsys, "m.pth: the model's classes are not the dataset's (1: 'ground' vs "
                           "'road')")


# -- 8. predict --cityscapes-ids -> score without renaming ---------------------------------------
# (in test_score.py, next to its Cityscapes fixture)


# -- 10. one line, nothing partial: full disk, read-only folder, Ctrl-C, bad --device ------------
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                   capsys):
    cfg_path = tmp_path / "tiny.yaml"
    run = tmp_path / "run"
    save_config(tiny_config(run, "train.iterations=4", "train.checkpoint_every=2"), cfg_path)
    real_save = torch.save
    seen = {}

    def filling_save(obj, f, *a, **kw):
        if "train_state" in obj and obj["train_state"]["iteration"] == 4:
            seen["last"] = (run / "last.pth").read_bytes()
            f.write(b"partial")  # half written (into the open file), then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", filling_save)
    assert main(["train", "-c", str(cfg_path)]) == 2
    one_line_error(capsys, "last.pth: cannot write: No space left on device",
                   "previous file is unchanged")
    assert (run / "last.pth").read_bytes() == seen["last"]  # the iteration-2 checkpoint
    assert not list(run.glob(".*.tmp"))


def test_read_only_output_folder_is_one_line(tmp_path, monkeypatch, capsys):
    """Tests run as root, whom chmod does not stop: the write itself is made to fail."""
    cfg_path = tmp_path / "tiny.yaml"
    save_config(tiny_config(tmp_path / "ro", "train.iterations=1"), cfg_path)
    real_open = os.open

    def read_only(path, flags, *a, **kw):
        if str(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", read_only)
    assert main(["train", "-c", str(cfg_path)]) == 2
    one_line_error(capsys, "ro: cannot write in the output folder: Read-only file system")
    monkeypatch.undo()
    with pytest.raises(OSError, match="cannot write: Read-only"):
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(
            OSError(errno.EROFS, "Read-only file system")))
        atomic_write_text(tmp_path / "x.json", "{}")
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.glob(".*.tmp"))


def test_the_free_space_named_is_measured_without_the_part_that_filled_the_disk(tmp_path,
                                                                             monkeypatch):
    """The message names the space the user has once the partial file is gone (it said
    "0 bytes free" on a full tmpfs that had 4.5 MiB once the partial last.pth was removed)."""
    import shutil
    real, partials = shutil.disk_usage, []

    def disk_usage(folder):
        partials.append(sorted(p.name for p in tmp_path.glob(".*.tmp")))
        return real(folder)

    def fill(tmp):
        Path(tmp).write_bytes(b"x" * 100)
        raise RuntimeError("unexpected pos")  # what torch.save's zip writer says
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))  # the probe finds the disk full
    with pytest.raises(WriteError, match=r"a.bin: cannot write: No space left on device; "
                                         r"[\d.]+ \w+ free in "):
        atomic_write(tmp_path / "a.bin", fill)
    assert partials == [[]] and not list(tmp_path.iterdir())


def test_a_checkpoint_that_does_not_fit_is_one_line_and_the_loader_workers_stop(tmp_path):
    """last.pth larger than the file-size limit, a loader worker running: torch.save's zip
    writer raises RuntimeError ("unexpected pos"), not OSError. The process used to print that
    traceback and then wait forever on its worker (which ignores the SIGTERM that
    multiprocessing ends it with at exit). Now: exit 2 at once, one line naming the file and
    the free space, nothing partial left."""
    cfg_path = tmp_path / "tiny.yaml"
    run = tmp_path / "run"
    save_config(tiny_config(run, "train.iterations=4", "train.checkpoint_every=2",
                            "data.num_workers=1"), cfg_path)  # last.pth: 1.6 MB, model.pth 0.8
    code, _, err = run_python("limit_file_size(1_000_000)" + CLI, "train", "-c", cfg_path,
                              timeout=180)
    assert code is not None, "still running after 180 s: " + err[-3000:]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert re.fullmatch("deeplabv2 train: error: " + refused(run / "last.pth", "976.6 KiB"),
                        lines[0]), lines[0]
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # no .tmp, no .lock


WRITERS = r"""
import json, sys
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from deeplabv2 import build_model, save_weights
from deeplabv2.app.report import ReportCollector
from deeplabv2.deploy.export import export_onnx, export_torchscript
from deeplabv2.inference.predict import predict_files
from deeplabv2.utils.fileio import atomic_write_text

out = Path(sys.argv[1])
torch.manual_seed(0)
model = build_model({"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8,
                     "num_classes": 3}).eval()
palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], dtype=np.uint8)
image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
label = np.random.default_rng(1).integers(0, 3, (96, 128), dtype=np.uint8)
Image.fromarray(image).save(out / "in.png")
save_weights(model, out / "model.pth")  # the previous version, which must survive
cases = {
    "model.pth": lambda p: save_weights(model, p),
    "model.safetensors": lambda p: save_weights(model, p),
    "metrics.json": lambda p: atomic_write_text(p, "{}" + " " * 5000),
    "model.onnx": lambda p: export_onnx(model, p, 64, 64),
    "model.ts": lambda p: export_torchscript(model, p, 64, 64),
    "predictions": lambda p: predict_files(model, [out / "in.png"], p, palette,
                                           progress=False),
    "report": lambda p: ReportCollector(p, ["a", "b", "c"], palette).add(
        "x", image, label, label),
}
results = {}
for name, write in cases.items():
    limit_file_size(1000)
    try:
        write(out / name)
        results[name] = "written"
    except Exception as e:
        results[name] = f"{type(e).__name__}: {e}"
    limit_file_size(None)
print(json.dumps(results))
"""


def test_every_writer_turns_a_refused_write_into_one_line(tmp_path):
    """Checkpoints (.pth, .safetensors), JSON, exports, predictions and report thumbnails under
    a file-size limit: each a WriteError naming the file, the reason and the free space;
    nothing partial left, the previous model.pth intact. Before, .pth and TorchScript raised
    torch's RuntimeError, .safetensors a SafetensorError, the report's thumbnails a bare
    OSError (leaving the part written under the final name), a JPEG Pillow's "encoder error
    -2 when writing image file"."""
    require("onnx", "ONNX export needs onnx (extra 'export')")
    code, out, err = run_python(WRITERS, tmp_path, timeout=300)
    assert code == 0, err[-3000:]
    results = json.loads(out.strip().splitlines()[-1])
    expected = {"model.pth": (tmp_path / "model.pth", True),
                "model.safetensors": (tmp_path / "model.safetensors", False),
                "metrics.json": (tmp_path / "metrics.json", False),
                "model.onnx": (tmp_path / "model.onnx", False),
                "model.ts": (tmp_path / "model.ts", False),
                "predictions": (tmp_path / "predictions" / "in.png", False),
                "report": (tmp_path / "report" / "thumbs" / "000000_image.jpg", False)}
    for name, (path, old) in expected.items():
        file = r"in(\.png|_overlay\.jpg)" if name == "predictions" else None  # the first over
        assert re.fullmatch("WriteError: " + refused(path, "1000 bytes", old, name=file),
                            results[name]), (name, results[name])
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.png", "model.pth", "predictions", "report"]
    assert not list((tmp_path / "report" / "thumbs").iterdir())
    assert load_model(tmp_path / "model.pth").num_classes == 3  # the previous file, whole


@pytest.mark.parametrize("sig,workers,method", [(signal.SIGINT, 0, "none"),
                                                (signal.SIGTERM, 1, "none"),
                                                (signal.SIGTERM, 1, "advent")])
def test_ctrl_c_saves_a_resumable_checkpoint_and_exits_130(tmp_path, sig, workers, method):
    """SIGINT to the process (Ctrl-C), or SIGTERM to its whole process group, loader workers
    included (a job scheduler): the iteration is finished, last.pth written, exit 128+sig.
    An adaptation run has a second loader, of the target images, whose workers a SIGTERM used
    to kill: the loader then raised in the middle of an iteration, a traceback."""
    cfg_path = tmp_path / "tiny.yaml"
    run = tmp_path / "run"
    adapt = [*TARGET, f"adapt.method={method}"] if method != "none" else []
    save_config(tiny_config(run, "train.iterations=400", "train.checkpoint_every=3",
                            f"data.num_workers={workers}", *adapt), cfg_path)
    proc = subprocess.Popen([sys.executable, "-m", "deeplabv2", "train", "-c", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        for _ in range(1200):  # the loop runs once the first periodic checkpoint is there
            if (run / "last.pth").exists() or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        if sig == signal.SIGINT:
            proc.send_signal(sig)
        else:
            os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    last = err.strip().splitlines()[-1]
    m = re.search(r"interrupted after iteration (\d+): resumable checkpoint .*last.pth written; "
                  r"continue with --resume", last)
    assert m, err[-2000:]
    state = torch.load(run / "last.pth", weights_only=True)
    assert state["train_state"]["iteration"] == int(m.group(1)) >= 3
    assert int(m.group(1)) < 400 and not (run / "model.pth").exists()
    assert not (run / ".lock").exists()


def test_bad_device_and_unknown_dataset_are_one_line(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    save_config(tiny_config(tmp_path / "run", "train.iterations=1"), cfg_path)
    assert main(["train", "-c", str(cfg_path), "--device", "gpu0"]) == 2
    one_line_error(capsys, "device 'gpu0' is not a device")
    assert main(["train", "-c", str(cfg_path), "data.dataset=citiscapes"]) == 2
    one_line_error(capsys, "unknown dataset 'citiscapes'; valid names: cityscapes")
    assert main(["train", "-c", str(cfg_path), "model.weights=init.pth"]) == 2
    one_line_error(capsys, "model.weights=init.pth: file not found", "model.weights=null")
    assert not (tmp_path / "run").exists()  # nothing left behind


# -- 11. a resume with other settings is refused unless asked ----------------------------------
def test_resume_with_changed_settings_isrefused(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, "train.iterations=2"))
    with pytest.raises(TrainingError, match=r"train.lr 0.01 -> 0.02.*--allow-changes"):
        train(tiny_config(run, "train.iterations=2", "train.lr=0.02"), resume="auto")
    result = train(tiny_config(run, "train.iterations=3", "data.num_workers=0"),
                   resume="auto", allow_changes=True)
    assert result.iterations == 3


# -- 12. files follow the umask ----------------------------------------------------------------
def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        train(tiny_config(run, "train.iterations=1"))
        save_weights(tiny_model(), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    for p in [*run.glob("*.*"), tmp_path / "w.safetensors"]:
        assert p.stat().st_mode & 0o777 == 0o644, p


# -- newcomer friction ---------------------------------------------------------------------------
def test_folder_config_trains_on_ones_own_images_and_masks(tmp_path, capsys):
    root = tmp_path / "mydata"
    (root / "classes.txt").parent.mkdir()
    (root / "classes.txt").write_text("background\nthing 255 0 0\n")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
                root / "images" / split / f"p{i}.jpg")
            Image.fromarray(rng.integers(0, 2, (24, 32)).astype(np.uint8)).save(
                root / "masks" / split / f"p{i}.png")
    tiny = ["model.blocks=[1, 1, 1, 1]", "model.width=8", "model.frozen_bn=false",
            "data.crop_size=[24, 32]", "data.batch_size=2", "data.num_workers=0",
            "train.iterations=2", "train.progress=false", "train.tensorboard=false"]
    assert main(["train", "-c", "folder", f"data.root={root}", *tiny,
                 f"train.out_dir={tmp_path / 'run'}"]) == 2
    one_line_error(capsys, "DeepLab_resnet_pretrained_imagenet.pth: file not found",
                   "model.weights=null trains from scratch")
    assert main(["train", "-c", "folder", f"data.root={root}", *tiny, "model.weights=null",
                 f"train.out_dir={tmp_path / 'run'}"]) == 0
    assert load_model(tmp_path / "run" / "model.pth").classes == ["background", "thing"]


def test_voc_train_aug_without_sbd_says_what_is_missing(tmp_path):
    from deeplabv2.data import build_dataset
    base = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    with pytest.raises(DatasetError, match="needs the SBD augmented labels"):
        build_dataset("voc12", base, "train_aug")


def test_version_and_every_option_says_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("deeplabv2 ")
    for command in ("train", "evaluate", "predict", "score"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--device" in text or command == "score"
        if command == "predict":
            assert "images of equal size per batch (default: 4)" in text


def test_serve_decodes_a_phone_photo_upright():
    """`serve` reads uploads as `predict` reads files: the EXIF orientation is applied."""
    import io
    require("starlette", "starlette not installed (extra 'serve')")
    from deeplabv2.app.server import decode_image
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:5, :5] = 255
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=100)
    shown = decode_image(buf.getvalue(), max_pixels=1e6)
    assert shown.shape == (30, 20, 3) and shown[:5, -5:].mean() > 200
