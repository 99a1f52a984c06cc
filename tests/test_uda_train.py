"""Domain adaptation through the one training loop: every method runs end to end, resumes
exactly, keeps its modules in the checkpoint, and runs as 2 processes under torchrun."""

import json
from pathlib import Path

import pytest
import torch

from deeplabv2 import load_model
from deeplabv2.config import ConfigError, load_config, save_config
from deeplabv2.train import train

from test_train import TINY
from torchrun import run_torchrun

class Crash(Exception):
    pass


def crash_and_resume(cfg, full, at: int = 3):
    """Train ``cfg`` until a crash during iteration ``at``, then resume from its ``last.pth``:
    the weights equal ``full``'s (the same config run without a crash) bit for bit, and so
    do the method's modules (discriminators, teacher...) in the two ``last.pth``. Returns the
    resumed run."""
    def crash(iteration, logs):
        if iteration == at:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, on_iteration=crash)
    cut = Path(cfg.train.out_dir) / "last.pth"
    resumed = train(cfg, resume=str(cut))
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    a = torch.load(Path(full.out_dir) / "last.pth", weights_only=True)["adapt_state"]
    b = torch.load(cut, weights_only=True)["adapt_state"]
    for k, v in (a or {}).get("modules", {}).items():
        assert torch.equal(v, b["modules"][k]), k
    return resumed


TARGET = ["adapt.target_dataset=synthetic",
          "adapt.target_options={num_samples: 12, size: [48, 64], style: target}",
          "adapt.target_val_options={num_samples: 4, size: [48, 64], style: target}",
          "adapt.fda_ent_start=1", "adapt.fda_beta=0.05", "train.val_limit=2"]


def uda_config(tmp_path, method, *more):
    return load_config(None, [*TINY, *TARGET, f"adapt.method={method}",
                              f"train.out_dir={tmp_path}", *more])


@pytest.mark.parametrize("method", ["source_only", "adaptsegnet", "advent", "minent", "fda",
                                    "dacs"])
def test_every_method_trains_and_resumes_exactly(tmp_path, method):
    more = ["adapt.multi_level=true"] if method in ("adaptsegnet", "minent") else []
    full = train(uda_config(tmp_path / "full", method, "train.iterations=4",
                            "train.checkpoint_every=2", *more))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in full.history)
    raw = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    if method in ("adaptsegnet", "advent", "dacs"):
        assert raw["adapt_state"]["modules"], "the method's modules are checkpointed"
    # a crash during iteration 3, a resume to 4: the same weights, bit for bit (and the same
    # discriminator / teacher)
    crash_and_resume(uda_config(tmp_path / "cut", method, "train.iterations=4",
                                "train.checkpoint_every=2", *more), full)
    if method in ("adaptsegnet", "minent"):
        assert load_model(tmp_path / "full" / "model.pth").aux_head is not None


def test_adversarial_training_moves_the_discriminator_and_the_teacher_follows(tmp_path):
    cfg = uda_config(tmp_path / "a", "adaptsegnet", "train.iterations=2")
    from deeplabv2.adapt.methods import build_method
    from deeplabv2.train import _build_model
    fresh = build_method(cfg.adapt, _build_model(cfg, 7))
    train(cfg)
    state = torch.load(tmp_path / "a" / "last.pth", weights_only=True)["adapt_state"]
    moved = [k for k, v in fresh.state_dict().items() if not torch.equal(v, state["modules"][k])]
    assert moved, "the discriminator was not trained"
    assert state["optimizers"][0]["state"], "Adam state saved for an exact resume"
    cfg = uda_config(tmp_path / "d", "dacs", "train.iterations=2", "train.checkpoint_every=1")
    first = {}

    def keep_first_checkpoint(iteration, logs):  # last.pth after step 1, before step 2's
        if iteration == 1:
            first.update(torch.load(tmp_path / "d" / "last.pth", weights_only=True))

    result = train(cfg, on_iteration=keep_first_checkpoint)
    teacher = torch.load(tmp_path / "d" / "last.pth", weights_only=True)["adapt_state"]
    student = result.model.state_dict()
    # EMA at iteration 1: alpha = min(1 - 1/2, 0.99) = 0.5 between the two student states
    key = "head.convs.0.weight"
    assert not torch.equal(teacher["modules"][f"teacher.model.{key}"], student[key])
    # at iteration 0 alpha = 0: the teacher is a copy of the student after step 1
    old_student = first["model"]
    old_teacher = first["adapt_state"]["modules"]
    names = [name for name, _ in result.model.named_parameters()]
    assert key in names
    for name in names:
        t_old = old_teacher[f"teacher.model.{name}"]
        t_new = teacher["modules"][f"teacher.model.{name}"]
        assert torch.equal(t_old, old_student[name]), name
        # then teacher_new = alpha * teacher_old + (1 - alpha) * student_new, alpha = 0.5
        assert torch.allclose(t_new, 0.5 * t_old + 0.5 * student[name], rtol=1e-6, atol=1e-7), \
            name


def test_adaptation_configs_are_checked():
    with pytest.raises(ConfigError, match="needs adapt.target_dataset"):
        load_config(None, [*TINY, "adapt.method=dacs"])
    with pytest.raises(ConfigError, match="valid values: none, source_only"):
        load_config(None, [*TINY, *TARGET, "adapt.method=cycada"])
    with pytest.raises(ConfigError, match="target_crop_size must equal"):
        load_config(None, [*TINY, *TARGET, "adapt.method=fda", "adapt.target_crop_size=[32, 32]"])
    with pytest.raises(ConfigError, match="multi_level needs"):
        load_config(None, [*TINY, *TARGET, "adapt.method=advent", "adapt.multi_level=true",
                           "train.msc_scales=[1, 0.5]"])


@pytest.mark.parametrize("name", ["gta5_to_cityscapes_adaptsegnet", "gta5_to_cityscapes_advent",
                                  "gta5_to_cityscapes_fda", "gta5_to_cityscapes_dacs",
                                  "synthia_to_cityscapes_adaptsegnet",
                                  "synthia_to_cityscapes_advent", "synthia_to_cityscapes_fda",
                                  "synthia_to_cityscapes_dacs"])
def test_packaged_adaptation_configs(name):
    cfg = load_config(name)
    assert cfg.adapt.method in name and cfg.adapt.target_dataset == "cityscapes"
    assert cfg.model.blocks == [3, 4, 23, 3] and cfg.model.num_classes in (19, 16)


@pytest.mark.slow
def test_torchrun_two_processes_adaptation(tmp_path):
    """AdvEnt (network + discriminator) as 2 gloo processes: replicas and discriminators agree."""
    cfg_path = tmp_path / "uda.yaml"
    save_config(uda_config(tmp_path / "run", "advent", "train.iterations=2",
                           "train.checkpoint_every=2", "data.scale_range=[1, 1]"), cfg_path)
    code, _, stderr = run_torchrun(["train", "-c", cfg_path], tmp_path)
    assert code == 0, stderr[-3000:]
    replicas = (tmp_path / "run" / "replicas.json").read_text()
    assert '"world_size": 2' in replicas
    assert (tmp_path / "run" / "model.pth").is_file()
    # the discriminators started equal and took the same steps on both ranks
    adapt = json.loads((tmp_path / "run" / "replicas_adapt.json").read_text())
    assert adapt["world_size"] == 2 and adapt["sha256"][0] == adapt["sha256"][1]
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["adapt_state"]
    assert any(k.startswith("d_main.") for k in state["modules"])


def test_stop_at_ends_early_on_the_longer_schedule(tmp_path):
    """train.stop_at: 3 iterations of a 6-iteration poly schedule = the first 3 of the full."""
    full = train(uda_config(tmp_path / "f", "none", "train.iterations=6",
                            "train.checkpoint_every=3", "train.val_limit=1"))
    cut = train(uda_config(tmp_path / "c", "none", "train.iterations=6", "train.stop_at=3",
                           "train.checkpoint_every=3", "train.val_limit=1"))
    assert cut.iterations == 3 and [h["iteration"] for h in cut.history] == [1, 2, 3]
    assert [h["lr"] for h in cut.history] == [h["lr"] for h in full.history[:3]]
    with pytest.raises(ConfigError, match="stop_at"):
        load_config(None, [*TINY, "train.iterations=6", "train.stop_at=7"])


def test_adapt_demo_writes_its_report(tmp_path, monkeypatch):
    """The whole ``demo --adapt`` pipeline on a few scenes and iterations (the real run's
    numbers are in the README)."""
    import json
    from deeplabv2.demo import adapt as demo
    for name in ("SOURCE", "TARGET", "TARGET_VAL", "SOURCE_VAL"):
        monkeypatch.setattr(demo, name, {**getattr(demo, name), "num_samples": 6})
    summary = demo.run_adapt_demo(
        tmp_path, methods=("fda", "dacs"), source_iterations=4, method_iterations=2,
        overrides=["model.width=8", "data.batch_size=2", "data.num_workers=0", "train.threads=1",
                   "train.progress=false", "train.tensorboard=false"])
    assert set(summary["runs"]) == {"warm_up", "source_only", "fda", "dacs", "target_supervised"}
    assert 0 <= summary["source_only_target_val_miou"] <= 1
    for f in ("summary.json", "table.md", "curves.png", "examples.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["best_method"] in ("fda", "dacs")
    assert "| target_supervised |" in (tmp_path / "table.md").read_text()
