"""MIC, masked image consistency (issue 26 item 4), against values computed here by hand or from
lhoyer/MIC's definitions (seg/mmseg/models/utils/masking_transforms.py BlockMaskGenerator,
seg/mmseg/models/uda/masking_consistency_module.py) written out with plain tensor ops."""

import math

import pytest
import torch
from torch.nn import functional as F

from deeplabv2.adapt.methods import DACS, DAFormer, Step, build_method
from deeplabv2.adapt.mic import (MICSettings, augment_batch, block_grid, block_mask,
                                 mic_settings)
from deeplabv2.adapt.mix import apply_colour_jitter, gaussian_blur, jitter_parameters
from deeplabv2.config import ConfigError, load_config
from deeplabv2.model.preprocessing import from_rgb, to_rgb
from deeplabv2.train import _build_model, train

from test_daformer import DAFORMER
from test_train import TINY
from test_uda_train import TARGET, crash_and_resume, uda_config


# -- the block mask ----------------------------------------------------------------------------
def test_block_grid_is_the_rounded_number_of_blocks():
    assert block_grid(512, 512, 32) == (16, 16)      # MIC's DeepLab v2 rows
    assert block_grid(1024, 1024, 64) == (16, 16)    # MIC on HRDA's crops
    assert block_grid(48, 64, 16) == (3, 4)
    # Python's round, half to even: 80 / 32 = 2.5 -> 2, 112 / 32 = 3.5 -> 4, 100 / 32 -> 3
    assert block_grid(80, 100, 32) == (2, 3)
    assert block_grid(112, 17, 32) == (4, 1)         # 17 / 32 = 0.53 -> 1
    with pytest.raises(ValueError, match="adapt.mic.block_size=32 gives a 0x1 mask grid"):
        block_grid(16, 32, 32)                       # 16 / 32 = 0.5 -> 0 (half to even)


def test_block_mask_keeps_cells_where_the_uniform_exceeds_the_ratio():
    """rand(grid) > mask_ratio kept, upsampled by nearest neighbour: for a non-divisible size
    (80x100 with 32-pixel blocks: a 2x3 grid) row y reads cell floor(y * 2 / 80), column x
    cell floor(x * 3 / 100)."""
    n, height, width = 3, 80, 100
    mask = block_mask(n, height, width, 32, 0.7, generator=torch.Generator().manual_seed(5))
    u = torch.rand((n, 1, 2, 3), generator=torch.Generator().manual_seed(5))
    cells = (u > 0.7).float()
    rows = [y * 2 // height for y in range(height)]
    cols = [x * 3 // width for x in range(width)]
    expected = cells[:, :, rows][:, :, :, cols]
    assert mask.shape == (n, 1, height, width) and mask.dtype == torch.float32
    assert torch.equal(mask, expected)
    # widths of the columns of cells: 34, 33, 33 (ceil(100 / 3) for the first)
    assert [cols.count(c) for c in range(3)] == [34, 33, 33]
    # a divisible size: each cell a block_size x block_size square
    mask = block_mask(2, 64, 96, 32, 0.5, generator=torch.Generator().manual_seed(1))
    u = torch.rand((2, 1, 2, 3), generator=torch.Generator().manual_seed(1))
    expected = (u > 0.5).float().repeat_interleave(32, 2).repeat_interleave(32, 3)
    assert torch.equal(mask, expected)


def test_block_mask_ratio_is_the_masked_share():
    """Each cell is kept with probability 1 - mask_ratio: over 40,000 cells the kept share is
    0.3 within 4 standard deviations (sqrt(0.3 * 0.7 / 40000) = 0.0023); ratio 0 keeps all."""
    mask = block_mask(2500, 64, 64, 16, 0.7, generator=torch.Generator().manual_seed(0))
    kept = float(mask[:, :, ::16, ::16].mean())
    assert abs(kept - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 40000)
    assert float(mask.mean()) == pytest.approx(kept, abs=1e-6)
    assert torch.equal(block_mask(2, 48, 64, 16, 0.0), torch.ones(2, 1, 48, 64))


# -- the colour augmentation of the target batch ---------------------------------------------
def test_augment_batch_draws_factors_per_image_and_one_order_and_sigma_for_the_batch():
    """kornia's ColorJitter on the batch (one call): factors per image, one permutation of the
    four steps; gaussian_blur: one sigma for the batch."""
    torch.manual_seed(0)
    images = torch.rand(3, 3, 40, 40) * 255
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        got = augment_batch(images, 0.2, "rgb", generator=g)
        g = torch.Generator().manual_seed(seed)
        expected = images
        if float(torch.rand((), generator=g)) < 0.8:
            params = jitter_parameters(3, 0.2, g)
            order = params["order"][0]
            expected = torch.cat([apply_colour_jitter(
                images[i:i + 1], {**{k: v[i:i + 1] for k, v in params.items() if k != "order"},
                                  "order": order[None]}, "rgb") for i in range(3)])
        if float(torch.rand((), generator=g)) < 0.5:
            sigma = 0.15 + float(torch.rand((), generator=g))
            expected = torch.cat([gaussian_blur(expected[i:i + 1], sigma) for i in range(3)])
        assert torch.allclose(got, expected, atol=1e-4), seed


# -- the pass on the method --------------------------------------------------------------------
def _method(*more):
    cfg = load_config(None, [*TINY, *TARGET, "adapt.method=daformer", *DAFORMER,
                             "adapt.pseudo_threshold=0.2", *more])
    torch.manual_seed(0)
    model = _build_model(cfg, 7).train()
    return model, build_method(cfg.adapt, model)


def test_masked_loss_equals_an_independent_computation():
    """Pass 2 = lambda * mean over pixels of w * CE(student(aug(target) * mask), teacher's
    labels of the unmasked target), w the confidence share (0 in the margin rows/columns)."""
    model, method = _method("adapt.mic={block_size: 16, mask_ratio: 0.6, lambda: 0.5}")
    assert isinstance(method, DAFormer) and method.passes(0) == 3
    assert method.mic == MICSettings(0.6, 16, 0.5, True)
    pre = model.preprocessing
    images, target = torch.randn(2, 3, 48, 64), torch.randn(2, 3, 48, 64)
    labels = torch.randint(0, 7, (2, 48, 64))
    step = Step(net=model, model=model, images=images, labels=labels, target=target,
                iteration=0, seg_loss=None)
    # pass 1: its pseudo-labels, by hand (the teacher in train mode: batch statistics)
    with torch.no_grad():
        probs = F.softmax(method.teacher.model(target).float(), dim=1)
        confidence, pseudo = probs.max(1)
        share = float((confidence >= 0.2).float().mean())
        weights = torch.full_like(confidence, share)
        weights[:, :2], weights[:, -6:], weights[:, :, :1] = 0, 0, 0   # margins [2, 6, 1, 0]
    assert 0 < share
    torch.manual_seed(11)
    method.loss(step, 1)
    torch.manual_seed(12)
    got = method.loss(step, 2)
    # pass 2 by hand, with the draws in the same order
    torch.manual_seed(12)
    with torch.no_grad():
        rgb = to_rgb(target, pre)
        if float(torch.rand(())) < 0.8:
            params = jitter_parameters(2, 0.2)
            params["order"] = params["order"][:1].expand(2, -1)
            rgb = apply_colour_jitter(rgb, params, "rgb")
        if float(torch.rand(())) < 0.5:
            rgb = gaussian_blur(rgb, 0.15 + float(torch.rand(())))
        cells = (torch.rand((2, 1, 3, 4)) > 0.6).float()
        mask = cells.repeat_interleave(16, 2).repeat_interleave(16, 3)
        x = from_rgb(rgb, pre) * mask
    logits = model.alignment.upsample(model(x, upsample=False), (48, 64))
    ce = -F.log_softmax(logits.float(), 1).gather(1, pseudo[:, None])[:, 0]
    expected = 0.5 * (ce * weights).mean()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert float(method.logs["mic_kept"]) == pytest.approx(float(mask.mean()))
    with pytest.raises(RuntimeError, match="needs the pseudo-labels of pass 1"):
        method.loss(step, 2)  # consumed


def test_unaugmented_masked_image_is_the_target_times_the_mask():
    """augment false (MIC's 'separatetrg' ablation): the input is the target times the mask in
    the network's input space (0: the mean colour), nothing else drawn."""
    model, method = _method("adapt.mic={block_size: 16, augment: false}", "model.bn=frozen")
    seen = []
    hook = model.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    target = torch.randn(2, 3, 48, 64)
    step = Step(net=model, model=model, images=torch.randn(2, 3, 48, 64),
                labels=torch.randint(0, 7, (2, 48, 64)), target=target, iteration=0,
                seg_loss=None)
    method.loss(step, 1)
    seen.clear()
    torch.manual_seed(3)
    method.loss(step, 2)
    torch.manual_seed(3)
    mask = (torch.rand((2, 1, 3, 4)) > 0.7).float().repeat_interleave(16, 2) \
        .repeat_interleave(16, 3)
    assert torch.equal(seen[0], target * mask)
    hook.remove()


def test_dacs_takes_mic_with_its_own_augmentation_and_without_it_is_unchanged():
    cfg = load_config(None, [*TINY, *TARGET, "adapt.method=dacs", "adapt.mic={block_size: 16}"])
    model = _build_model(cfg, 7)
    method = build_method(cfg.adapt, model)
    assert isinstance(method, DACS) and method.passes(5) == 3
    assert (method.jitter_strength, method.kornia_order) == (0.25, "bgr")
    plain = build_method(load_config(None, [*TINY, *TARGET, "adapt.method=dacs"]).adapt, model)
    assert plain.mic is None and plain.passes(5) == 2


# -- config ------------------------------------------------------------------------------------
def test_mic_config_is_checked_and_written_out_in_full():
    base = [*TINY, *TARGET]
    cfg = load_config(None, [*base, "adapt.method=daformer", "adapt.mic={block_size: 16}"])
    assert cfg.adapt.mic == {"mask_ratio": 0.7, "block_size": 16, "lambda": 1.0,
                             "augment": True}
    assert load_config(None, [*base, "adapt.method=dacs"]).adapt.mic is None
    bad = {"{block: 16}": "unknown key adapt.mic.block; valid keys: mask_ratio, block_size",
           "{mask_ratio: 1.0}": r"adapt.mic.mask_ratio must be in \[0, 1\)",
           "{mask_ratio: -0.1}": r"adapt.mic.mask_ratio must be in \[0, 1\)",
           "{mask_ratio: x}": "adapt.mic.mask_ratio must be a number, got 'x'",
           "{block_size: 0}": "adapt.mic.block_size must be a positive integer",
           "{block_size: 1.5}": "adapt.mic.block_size must be a positive integer",
           "{lambda: -1}": "adapt.mic.lambda must be >= 0",
           "{augment: 1}": "adapt.mic.augment must be true or false",
           "0.7": "adapt.mic must be a mapping",
           # the 48x64 crop: 48 / 128 rounds to 0 rows
           "{block_size: 128}": "adapt.mic.block_size=128 gives a 0x0 mask grid on a 48x64"}
    for value, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, "adapt.method=daformer", f"adapt.mic={value}"])
    for method in ("fda", "none", "source_only", "adaptsegnet"):
        with pytest.raises(ConfigError, match="adapt.mic \\(MIC\\) is an option of the "
                                              f"self-training methods .* not of adapt.method="
                                              f"{method}"):
            load_config(None, [*base, f"adapt.method={method}", "adapt.mic={}"])
    assert mic_settings(None) is None


def test_packaged_mic_config_is_the_daformer_row_plus_mic():
    """MIC experiments.py id 81, ('dlv2red', 'r101v1c', uda_daformer): block 32 on 512 crops,
    ratio 0.7, lambda 1, 'separatetrgaug'; everything else the DAFormer-strategy config."""
    mic = load_config("gta5_to_cityscapes_mic_daformer_dlv2").to_dict()
    base = load_config("gta5_to_cityscapes_daformer_dlv2").to_dict()
    assert mic["adapt"].pop("mic") == {"mask_ratio": 0.7, "block_size": 32, "lambda": 1.0,
                                       "augment": True}
    assert base["adapt"].pop("mic") is None
    assert mic["train"].pop("out_dir") == "runs/gta5_to_cityscapes_mic_daformer_dlv2"
    base["train"].pop("out_dir")
    assert mic == base


def test_packaged_mic_dacs_config_is_daformer_with_its_additions_off():
    """MIC experiments.py id 81, ('dlv2red', 'r101v1c', uda_dacs): their mmseg DACS (alpha
    0.99, no feature distance, no margins, no rare-class sampling), the same optimizer and
    data; adapt.method daformer without its additions, plus MIC."""
    cfg = load_config("gta5_to_cityscapes_mic_dacs_dlv2")
    model = _build_model(load_config("gta5_to_cityscapes_mic_dacs_dlv2",
                                     ["model.blocks=[1, 1, 1, 1]", "model.width=8",
                                      "model.weights=null"]), 19)
    method = build_method(cfg.adapt, model)
    assert isinstance(method, DAFormer) and method.imagenet is None
    assert method.teacher.alpha == 0.99 and method.pseudo_margins == (0, 0, 0, 0)
    assert method.mic == MICSettings(0.7, 32, 1.0, True) and method.passes(0) == 3
    mic = cfg.to_dict()
    base = load_config("gta5_to_cityscapes_daformer_dlv2").to_dict()
    changed = {("adapt", "ema_alpha"): (0.999, 0.99),
               ("adapt", "pseudo_margins"): ([15, 120, 0, 0], [0, 0, 0, 0]),
               ("adapt", "fdist_lambda"): (0.005, 0.0),
               ("adapt", "mic"): (None, {"mask_ratio": 0.7, "block_size": 32, "lambda": 1.0,
                                         "augment": True}),
               ("data", "rare_class_sampling"): (base["data"]["rare_class_sampling"], None),
               ("train", "out_dir"): ("runs/gta5_to_cityscapes_daformer_dlv2",
                                      "runs/gta5_to_cityscapes_mic_dacs_dlv2")}
    for (section, key), (before, after) in changed.items():
        assert (base[section].pop(key), mic[section].pop(key)) == (before, after), key
    assert base["data"]["cat_max_ratio"] == 0.75 and mic == base


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.parametrize("method,more", [("daformer", DAFORMER), ("dacs", [])])
def test_training_with_mic_resumes_exactly(tmp_path, method, more):
    """A tiny run with MIC (threshold 0.2 so the pseudo-labels weigh), cut after iteration 3
    and resumed: the network and the teacher equal those of the uncut run."""
    more = ["train.iterations=4", "train.checkpoint_every=2", "adapt.pseudo_threshold=0.2",
            "adapt.mic={block_size: 16}", *more]
    logs = []
    full = train(uda_config(tmp_path / "full", method, *more),
                 on_iteration=lambda it, entry: logs.append(entry))
    assert all(math.isfinite(h["loss"]) for h in full.history)
    assert len(logs) == 4 and all(e["adapt/mic"] > 0 for e in logs)
    assert all(0 <= e["adapt/mic_kept"] <= 1 for e in logs)
    assert len({e["adapt/mic_kept"] for e in logs}) > 1, "a new mask each iteration"

    cfg = uda_config(tmp_path / "cut", method, *more)
    crash_and_resume(cfg, full)


@pytest.mark.slow
def test_torchrun_two_processes_daformer_with_mic(tmp_path):
    """DAFormer + MIC as 2 gloo processes (three passes, the last one synchronising the
    gradients): the replicas agree, and so do the teachers."""
    import json

    from deeplabv2.config import save_config
    from torchrun import run_torchrun
    cfg_path = tmp_path / "uda.yaml"
    save_config(uda_config(tmp_path / "run", "daformer", "train.iterations=2",
                           "train.checkpoint_every=2", "data.scale_range=[1, 1]",
                           "adapt.pseudo_threshold=0.2", "adapt.mic={block_size: 16}",
                           *DAFORMER), cfg_path)
    code, _, stderr = run_torchrun(["train", "-c", cfg_path], tmp_path)
    assert code == 0, stderr[-3000:]
    assert '"world_size": 2' in (tmp_path / "run" / "replicas.json").read_text()
    adapt = json.loads((tmp_path / "run" / "replicas_adapt.json").read_text())
    assert adapt["world_size"] == 2 and adapt["sha256"][0] == adapt["sha256"][1]
    assert all(math.isfinite(h["loss"]) for h in
               json.loads((tmp_path / "run" / "history.json").read_text()))
