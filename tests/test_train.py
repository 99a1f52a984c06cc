"""The training loop: recipe pieces, exact resume, NaN handling, configs, DDP under torchrun."""

import json

import pytest
import torch

from deeplabv2 import load_model
from deeplabv2.config import ConfigError, load_config, save_config
from deeplabv2.data.sampler import IterationBatchSampler
from deeplabv2.train import TrainingError, poly_lr, segmentation_loss, train
from deeplabv2.utils.digest import weights_digest

from torchrun import train_two_processes_and_one

TINY = ["model.blocks=[1, 1, 1, 1]", "model.width=8", "data.dataset=synthetic",
        "data.crop_size=[48, 64]", "data.scale_range=[0.75, 1.25]", "data.batch_size=2",
        "data.num_workers=0", "data.options={num_samples: 12, size: [48, 64]}",
        "train.lr=0.01", "train.log_every=1", "train.tensorboard=false",
        "train.progress=false", "train.val_limit=2", "train.threads=1"]


def tiny_config(tmp_path, *more):
    return load_config(None, [*TINY, f"train.out_dir={tmp_path}", *more])


def test_poly_lr():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 100, 100) == 0.0


def test_sampler_ranks_partition_the_global_batch_and_resume_continues():
    one = list(IterationBatchSampler(10, 4, seed=3, total_steps=6))
    r0 = list(IterationBatchSampler(10, 2, seed=3, total_steps=6, rank=0, world_size=2))
    r1 = list(IterationBatchSampler(10, 2, seed=3, total_steps=6, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == one
    assert list(IterationBatchSampler(10, 4, seed=3, total_steps=6, start_step=4)) == one[4:]
    # every epoch is a permutation: the first 10 samples are each index once
    first_epoch = [i for batch in one for e, i in batch if e == 0]
    assert sorted(first_epoch) == list(range(10))
    assert one != list(IterationBatchSampler(10, 4, seed=4, total_steps=6))


def test_stride8_loss_downsamples_labels_with_nearest():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 10.0  # predicts class 1 everywhere
    labels = torch.ones(1, 16, 16, dtype=torch.long)
    labels[0, :8, :8] = 255  # ignored
    assert segmentation_loss(logits, labels, "stride8") < 1e-3
    labels[0, 8:, 8:] = 2
    assert segmentation_loss(logits, labels, "stride8") > 1.0
    assert segmentation_loss(logits, torch.full((1, 16, 16), 255), "full") == 0


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key train.iteratons; valid keys of 'train': "
                                          "iterations, stop_at, lr"):
        load_config(None, ["train.iteratons=5"])
    with pytest.raises(ConfigError, match="unknown section 'optim'"):
        load_config(None, ["optim.lr=5"])
    with pytest.raises(ConfigError, match="train.amp='fp32'; valid values: auto, none, bf16, fp16"):
        load_config(None, ["train.amp=fp32"])
    with pytest.raises(ConfigError, match="nope: no such config file"):
        load_config("nope")


def _packaged_configs():
    from deeplabv2.config import CONFIG_DIR
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", _packaged_configs())
def test_packaged_configs_are_valid(name, tmp_path):
    """Every packaged config loads (``load_config`` validates it), survives a save and load
    unchanged, and names datasets that exist and take its ``options`` (which only building the
    dataset, at training time, would check otherwise)."""
    import inspect

    from deeplabv2.data.registry import DATASETS
    cfg = load_config(name)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(str(tmp_path / "saved.yaml")).to_dict() == cfg.to_dict()
    a = cfg.adapt
    uses = [(cfg.data.dataset, cfg.data.options)]
    if a.method not in ("none", "source_only"):
        uses += [(a.target_dataset, a.target_options), (a.target_dataset, a.target_val_options)]
    for dataset, options in uses:
        assert dataset in DATASETS, dataset
        takes = inspect.signature(DATASETS[dataset].__init__).parameters
        assert set(options) <= set(takes), (dataset, options)


@pytest.mark.parametrize("name,classes", [("voc12_aug", 21), ("context", 60), ("person_part", 7)])
def test_the_paper_configs_use_its_recipe(name, classes):
    cfg = load_config(name)
    assert cfg.model.num_classes == classes and cfg.model.blocks == [3, 4, 23, 3]
    assert cfg.train.msc_scales == [1.0, 0.75, 0.5] and cfg.eval.msc_scales == [1.0, 0.75, 0.5]
    assert cfg.data.scales == [0.5, 0.75, 1.0, 1.25, 1.5] and cfg.data.crop_size == [321, 321]
    assert (cfg.data.batch_size, cfg.train.iterations, cfg.train.lr) == (10, 20000, 2.5e-4)
    assert cfg.model.init_head is False and cfg.model.alignment == "caffe"


def test_resume_continues_exactly(tmp_path):
    """3 iterations, a crash, a resume to 6 == 6 iterations uninterrupted (same weights)."""
    full = train(tiny_config(tmp_path / "full", "train.iterations=6",
                             "train.checkpoint_every=3"))

    def crash(iteration, logs):
        if iteration == 4:  # after the checkpoint at 3, during the 4th
            raise KeyboardInterrupt

    part_dir = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(part_dir, "train.iterations=6", "train.checkpoint_every=3"),
              on_iteration=crash)
    resumed = train(tiny_config(part_dir, "train.iterations=6", "train.checkpoint_every=3"),
                    resume="auto")
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["iteration"] for h in resumed.history] == list(range(1, 7))
    # the model trained: weights differ from a fresh initialisation
    assert (part_dir / "model.pth").is_file() and (part_dir / "best.pth").is_file()
    assert full.metrics["miou"] == resumed.metrics["miou"]


def test_identical_runs_write_identical_files(tmp_path):
    """Two runs of the same config (in other folders) write byte-identical weight files, so a
    digest of model.pth identifies the trained weights (the random temporary file name used to
    end up inside each file)."""
    for name in ("a", "b"):
        train(tiny_config(tmp_path / name, "train.iterations=2"))
    for f in ("model.pth", "best.pth"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "train.iterations=50", "train.checkpoint_every=1",
                      "train.lr=1.0e+12", "model.frozen_bn=false")
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at iteration \d+") as e:
        train(cfg)
    assert str(tmp_path / "last.pth") in str(e.value)
    model = load_model(tmp_path / "last.pth")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values()
               if v.is_floating_point())


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    """batch 2 x 2 accumulation steps == batch 4 (BN frozen so batch statistics don't differ)."""
    big = train(tiny_config(tmp_path / "big", "train.iterations=2", "data.batch_size=4",
                            "data.scale_range=[1, 1]"))
    acc = train(tiny_config(tmp_path / "acc", "train.iterations=2", "train.accumulate=2",
                            "data.scale_range=[1, 1]"))
    for k, v in big.model.state_dict().items():
        assert torch.allclose(v, acc.model.state_dict()[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    """2 CPU processes (gloo) x batch 2 == 1 process x batch 4: identical weights on both
    ranks, equal to the single-process result within float tolerance. Frozen BN and no
    ignored pixels (scale 1, crop inside the image), so the averages are the same."""
    ddp = train_two_processes_and_one(tmp_path, [*TINY, "data.scale_range=[1, 1]",
                                                 "train.iterations=3",
                                                 "train.checkpoint_every=3"])
    replicas = json.loads((tmp_path / "ddp" / "replicas.json").read_text())
    assert replicas["world_size"] == 2
    assert replicas["sha256"][0] == replicas["sha256"][1] == weights_digest(ddp)


def test_tf32_setting_reaches_the_cuda_backends_and_leaves_a_cpu_alone():
    from deeplabv2.train import set_tf32
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        set_tf32(torch.device("cpu"), False)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        set_tf32(torch.device("cuda", 0), False)  # the flags exist without a GPU
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        set_tf32("cuda", True)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    with pytest.raises(ConfigError, match="train.tf32"):
        load_config(None, ["train.tf32=maybe"])
