"""BN folding and the inference-only model: same logits, no BN left, original untouched."""

import pytest
import torch
from torch import nn

from torch.nn import functional as F

from deeplabv2.deploy.atrous import (atrous_conv3x3, atrous_conv3x3_gemm, nnpack_available,
                              release_workspace, use_atrous_winograd, winograd_weight)
from deeplabv2.deploy.fast import (FusedBottleneck, InferenceModel, fold_batchnorm,
                            optimize_for_inference)
from deeplabv2.model import FrozenBatchNorm2d, build_model

TINY = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8, "num_classes": 5}
BN_TYPES = (FrozenBatchNorm2d, nn.BatchNorm2d)


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Statistics and affine parameters far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)


def _tiny(frozen_bn: bool = True, layout: str = "caffe") -> nn.Module:
    torch.manual_seed(0)
    model = build_model({**TINY, "frozen_bn": frozen_bn, "layout": layout})
    _randomise_bn(model)
    with torch.no_grad():  # head scores comparable in size to the features
        for conv in model.head.convs:
            conv.weight.normal_(0, 0.1)
    return model.eval()


def _bn_params(model: nn.Module) -> tuple[int, int]:
    """(number of BN parameters, number of BN channels)."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    return sum(p.numel() for m in bns for p in m.parameters()), sum(m.num_features for m in bns)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


@pytest.mark.parametrize("layout", ["caffe", "torchvision"])
@pytest.mark.parametrize("frozen_bn", [True, False])
def test_folded_logits_equal_the_original(layout, frozen_bn):
    model = _tiny(frozen_bn, layout)
    folded = fold_batchnorm(model)
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert out.shape == ref.shape == (2, 5, 45, 61)
    assert _close(out, ref, 1e-4)
    assert not any(isinstance(m, BN_TYPES) for m in folded.modules())
    assert folded.layout == layout


def test_fold_drops_the_bn_parameters_and_leaves_the_original_untouched():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_before = sum(p.numel() for p in model.parameters())
    bn_params, bn_channels = _bn_params(model)
    assert bn_params == 2 * bn_channels > 0
    folded = fold_batchnorm(model)
    # BN scale and shift (2 C) are gone; each folded conv gained a bias of C.
    assert sum(p.numel() for p in folded.parameters()) == n_before - bn_params + bn_channels
    assert folded.backbone.layer1[0].conv1.bias is not None
    assert isinstance(folded.backbone.layer1[0].downsample[1], nn.Identity)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _bn_params(model) == (bn_params, bn_channels)


def test_training_mode_batchnorm_is_not_folded():
    model = _tiny(frozen_bn=False).train()
    folded = fold_batchnorm(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("channels_last", [True, False])
def test_optimize_for_inference_fp32_matches_eager(channels_last):
    model = _tiny()
    fast = optimize_for_inference(model, channels_last=channels_last)
    assert isinstance(fast, InferenceModel) and not fast.training
    assert fast.num_classes == 5 and fast.preprocessing == model.preprocessing
    x = torch.randn(1, 3, 50, 50)
    with torch.no_grad():
        ref, out = model(x), fast(x)
        ref8, out8 = model.logits(x), fast.logits(x)
    assert out.dtype == torch.float32 and _close(out, ref, 1e-4)
    assert out8.shape == ref8.shape and _close(out8, ref8, 1e-4)
    if channels_last:
        conv = fast.model.backbone.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last)
    assert model.backbone.bn1.__class__ is FrozenBatchNorm2d  # original not folded in place


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,dilation", [((1, 16, 8, 13, 17), 2), ((2, 8, 12, 9, 10), 4),
                                            ((1, 5, 3, 7, 7), 3), ((1, 4, 4, 3, 5), 6),
                                            ((1, 24, 24, 16, 32), 2)])
def test_atrous_winograd_equals_the_dilated_convolution(shape, dilation, channels_last):
    if not nnpack_available():
        pytest.skip("this torch has no NNPACK")
    n, c, co, h, w = shape
    g = torch.Generator().manual_seed(h * w + dilation)
    x = torch.randn(n, c, h, w, generator=g)
    weight, bias = torch.randn(co, c, 3, 3, generator=g), torch.randn(co, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=dilation,
                   dilation=dilation)
    out = atrous_conv3x3(x, weight, bias, dilation)
    assert out.shape == ref.shape and _close(out, ref, 1e-4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("tile", [4, 6])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,dilation", [((1, 16, 8, 13, 17), 2), ((2, 8, 12, 9, 10), 4),
                                            ((1, 5, 3, 7, 7), 3), ((1, 4, 4, 3, 5), 6),
                                            ((2, 24, 24, 16, 32), 1), ((1, 32, 16, 33, 65), 2)])
def test_gemm_winograd_equals_the_dilated_convolution(shape, dilation, channels_last, tile):
    """F(4x4, 3x3) and F(6x6, 3x3) through torch's GEMM: batches, sub-grids of unequal sizes,
    maps smaller than one tile, either layout kept; with and without bias and ReLU."""
    n, c, co, h, w = shape
    g = torch.Generator().manual_seed(h * w + dilation + tile)
    x = torch.randn(n, c, h, w, generator=g)
    weight, bias = torch.randn(co, c, 3, 3, generator=g), torch.randn(co, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    u = winograd_weight(weight, tile)
    assert u.shape == ((tile + 2) ** 2, c, co)
    for b, relu in ((bias, False), (None, False), (bias, True)):
        ref = F.conv2d(x.double(), weight.double(), None if b is None else b.double(),
                       padding=dilation, dilation=dilation)
        if relu:
            ref = ref.relu()
        out = atrous_conv3x3_gemm(x, u, b, dilation, relu=relu)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert _close(out, ref, 1e-4), (b is None, relu)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt)


def test_gemm_winograd_reads_only_what_it_wrote(monkeypatch):
    """Its buffers are uninitialised (and kept between calls) and only their borders zeroed:
    filled with NaN first, or holding an earlier call's values, the result must not change."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 23, 30, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(6, 8, 3, 3, generator=g), torch.randn(6, generator=g)
    ref = F.conv2d(x, weight, bias, padding=3, dilation=3)
    real = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *size, **kw: real(self, *size, **kw).fill_(float("nan")))
    for tile in (4, 6):
        release_workspace()  # buffers are kept between calls: make them anew, NaN-filled
        out = atrous_conv3x3_gemm(x, winograd_weight(weight, tile), bias, 3)
        assert torch.isfinite(out).all() and _close(out, ref, 1e-4), tile
        # reused, with the previous call's values (a larger map) still in them
        small = x[:1, :, :11, :13]
        again = atrous_conv3x3_gemm(small, winograd_weight(weight, tile), bias, 3)
        assert _close(again, F.conv2d(small, weight, bias, padding=3, dilation=3), 1e-4)


def test_gemm_winograd_refuses_weights_it_cannot_use():
    with pytest.raises(ValueError, match="3, 3"):
        winograd_weight(torch.zeros(4, 4, 5, 5))
    with pytest.raises(ValueError, match="tile"):
        winograd_weight(torch.zeros(4, 4, 3, 3), tile=5)
    u = winograd_weight(torch.zeros(4, 8, 3, 3))
    with pytest.raises(ValueError, match="for 6 input channels"):
        atrous_conv3x3_gemm(torch.zeros(1, 6, 9, 9), u, None, 2)


def _winograd_backends() -> list[str]:
    return ["gemm"] + (["nnpack"] if nnpack_available() else [])


@pytest.mark.parametrize("backend", _winograd_backends())
def test_fused_and_winograd_network_equals_eager_and_falls_back_with_autograd(backend):
    model = _tiny()
    fast = optimize_for_inference(model)  # CPU fp32 defaults: fold, channels-last, fuse
    kinds = [type(m) for m in fast.modules()]
    assert kinds.count(FusedBottleneck) == 4  # one block per stage
    # TINY's 8-32 channels are below the Winograd threshold; take them all to test the path
    wino = optimize_for_inference(model, fuse=True, winograd=False)
    # layer3 (d=2), layer4 (d=4) and the four ASPP branches (d=6..24, 5 output channels)
    assert use_atrous_winograd(wino.model, min_channels=1, min_pixels=1,
                               max_overhead=float("inf"), backend=backend) == 6
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        ref = model(x)
        for net in (fast, wino):
            assert _close(net(x), ref, 1e-4)
    with torch.enable_grad():  # autograd takes the plain ops, same result
        assert _close(wino(x).detach(), ref, 1e-4)
    plain = optimize_for_inference(model, fuse=False, winograd=False)
    assert FusedBottleneck not in [type(m) for m in plain.modules()]


def test_winograd_only_where_the_tiling_pays():
    from deeplabv2.deploy.atrous import worth_tiling
    assert worth_tiling(65, 129, 2) and worth_tiling(65, 129, 4) and worth_tiling(65, 65, 4)
    assert not worth_tiling(41, 41, 2)  # too small a map
    assert not worth_tiling(65, 129, 24)  # 3x6 sub-grids: the zero borders would double the work
    assert worth_tiling(65, 129, 24, max_overhead=float("inf"))
    # F(6x6, 3x3): whole 6x6 tiles; ResNet-101 at 321x321 (41x41 scores) and 512x1024 pay,
    # layer4's 9x9 sub-grids at 33x33 would be 12x12 (1.78x the work)
    for size in ((41, 41), (65, 129)):
        assert worth_tiling(*size, 2, 32 * 32, tile=6) and worth_tiling(*size, 4, 32 * 32, tile=6)
    assert not worth_tiling(33, 33, 4, 32 * 32, tile=6)
    assert not worth_tiling(31, 33, 2, 32 * 32, tile=6)  # below the GEMM form's smallest map


def test_the_real_vgg16_optimized_equals_eager():
    from deeplabv2.hub import deeplabv2_vgg16
    torch.manual_seed(0)
    model = deeplabv2_vgg16(num_classes=21).eval()
    fast = optimize_for_inference(model)
    x = torch.randn(1, 3, 161, 193)
    with torch.no_grad():
        assert _close(fast(x), model(x), 1e-4)


@pytest.mark.parametrize("backend", _winograd_backends())
def test_the_real_resnet101_optimized_equals_eager(monkeypatch, backend):
    """ResNet-101 as it is deployed: 33 fused blocks, 26 Winograd atrous convolutions (23 in
    layer3, 3 in layer4) that run at 65x65 scores, logits within 1e-4 of the eager network."""
    import deeplabv2.deploy.atrous as atrous
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet", "blocks": [3, 4, 23, 3], "num_classes": 19})
    model.eval()
    # each backend forced on: by default NNPACK runs on AVX2 CPUs, GEMM on AVX-512 ones
    fast = optimize_for_inference(model, winograd=backend)
    kinds = [type(m).__name__ for m in fast.modules()]
    assert kinds.count("FusedBottleneck") == 33
    assert kinds.count("AtrousWinogradConv2d") == 26
    wino = [m for m in fast.modules() if type(m).__name__ == "AtrousWinogradConv2d"]
    # the direct convolution kept for small maps is prepacked like the others
    assert all(type(m.conv).__name__ == "PrepackedConv2d" for m in wino)
    calls = []
    name = "atrous_conv3x3_gemm" if backend == "gemm" else "atrous_conv3x3"
    original = getattr(atrous, name)
    monkeypatch.setattr(atrous, name, lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    x = torch.randn(1, 3, 513, 513)  # 65x65 scores: above the Winograd threshold
    with torch.no_grad():
        assert _close(fast(x), model(x), 1e-4)
    assert sorted(calls) == [2] * 23 + [4] * 3
    if backend == "nnpack":
        assert all(m.winograd_weights.is_contiguous() for m in wino)  # NCHW, as NNPACK takes it


def test_optimize_for_inference_bf16_is_close_and_returns_float32():
    model = _tiny()
    fast = optimize_for_inference(model, precision="bf16")
    assert fast.model.backbone.conv1.weight.dtype == torch.bfloat16
    x = torch.randn(1, 3, 41, 41)
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert out.dtype == torch.float32 and _close(out, ref, 5e-2)


def test_optimize_for_inference_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        optimize_for_inference(_tiny(), precision="int8")


# -- bench: its bookkeeping on a clock of our own; the speed itself is benchmarks/speed.py's --------
def _benchmark(name: str):
    """The script ``benchmarks/{name}.py`` as a module (the scripts are no package)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Clock:
    """A stand-in for the ``time`` module of :mod:`deeplabv2.deploy.bench`: ``perf_counter``
    reads a clock that moves only by :meth:`spend` (or by ``tick`` at every reading), in steps
    that are exact in binary, so every interval bench measures is known exactly."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


def test_bench_books_each_modes_time_flops_ratios_and_differences(monkeypatch):
    """Each inference call of a mode and each training step of a choice takes a known time on
    a clock of the test's own (the calls themselves run for real): bench must report exactly
    those times per size and mode, the FLOP rates and the ratios to eager, to FP32 NCHW and to
    the dtype's bound that follow from them, and the real outputs' differences to eager. No
    speed is measured or asserted (``benchmarks/speed.py`` measures it)."""
    import json

    import deeplabv2.deploy.bench as bench_mod
    from deeplabv2.deploy.bench import bench, format_table
    from deeplabv2.model.info import forward_flops
    goal_ratios = _benchmark("goals").goal_ratios
    clock = _Clock()
    monkeypatch.setattr(bench_mod, "time", clock)
    call_s = {"eager": 0.5, "fold": 0.25, "fast": 0.125, "bf16": 0.0625, "onnxruntime": 0.375}
    step_s = {("none", False): 2.0, ("none", True): 1.0, ("bf16", True): 0.75}
    real_prepare, real_step = bench_mod._prepare_timed, bench_mod._train_step

    def prepare_timed(*args, **kwargs):
        def timed(mode, run):
            return lambda x: clock.spend(call_s[mode]) or run(x)
        return {mode: (timed(mode, run), prepare_s, held)
                for mode, (run, prepare_s, held) in real_prepare(*args, **kwargs).items()}

    def train_step(model, *, amp, channels_last, **kwargs):
        step = real_step(model, amp=amp, channels_last=channels_last, **kwargs)
        return lambda: clock.spend(step_s[amp, channels_last]) or step()

    bounds = {"fp32": {"gflops_per_s": 8.0, "per_shape": {"mm 256^3": 8.0}},
              "bf16": {"gflops_per_s": 32.0, "per_shape": {"mm 256^3": 32.0}}}
    monkeypatch.setattr(bench_mod, "_prepare_timed", prepare_timed)
    monkeypatch.setattr(bench_mod, "_train_step", train_step)
    monkeypatch.setattr(bench_mod, "dtype_bounds", lambda threads=None, n=2048: bounds)

    model = _tiny()
    modes, sizes = list(call_s), [(33, 41), (24, 24)]
    result = bench(model, sizes, modes, iterations=2, warmup=1, threads=1,
                   train_size=(65, 65), train_warmup=1, bound_size=256)
    json.dumps(result)  # plain types only
    assert result["threads"] == 1
    assert result["machine"]["cpu"] and result["machine"]["torch_cpu_capability"]
    rows = result["inference"]
    assert [(tuple(r["size"]), r["mode"]) for r in rows] == [(s, m) for s in sizes for m in modes]
    for r in rows:
        mode, seconds = r["mode"], call_s[r["mode"]]
        assert r["flops"] == forward_flops(model, *r["size"]), mode
        assert r["dtype"] == ("bf16" if mode == "bf16" else "fp32")
        assert r["times_s"] == [seconds, seconds] and r["first_call_s"] == seconds, mode
        assert r["median_s"] == r["mean_s"] == r["min_s"] == seconds and r["iterations"] == 2
        assert r["gflops_per_s"] == pytest.approx(r["flops"] / seconds / 1e9, rel=1e-12)
        assert r["speedup_vs_eager"] == pytest.approx(call_s["eager"] / seconds, rel=1e-12)
        assert r["percent_of_bound"] == pytest.approx(
            100 * r["gflops_per_s"] / bounds[r["dtype"]]["gflops_per_s"], rel=1e-12)
        assert r["prepare_s"] == 0  # preparing spent none of the clock: no call was counted
        assert 0 <= r["call_peak_mib"] <= r["peak_rss_mib"]
        assert r["held_mib"] < r["peak_rss_mib"]
    assert rows[0]["flops"] > rows[5]["flops"]  # the larger input costs more
    diffs = {r["mode"]: r["max_rel_diff_vs_eager"] for r in rows[:5]}
    assert diffs["eager"] == 0 and diffs["fold"] < 1e-4 and diffs["fast"] < 1e-4
    assert diffs["onnxruntime"] < 1e-4  # exported at the size it runs: 33x41, then 24x24
    assert 1e-4 < diffs["bf16"] < 0.2
    # training steps: backward counted as twice the forward of the batch of 2; the warm-up
    # step is the first call, apart from the timed ones
    assert [(t["amp"], t["channels_last"]) for t in result["train"]] == list(step_s)
    flops = 3 * forward_flops(model, 65, 65, batch=2)
    for t in result["train"]:
        seconds = step_s[t["amp"], t["channels_last"]]
        assert t["batch"] == 2 and t["flops"] == flops
        assert t["times_s"] == [seconds, seconds] and t["first_call_s"] == seconds
        assert t["median_s"] == seconds and t["dtype"] == ("bf16" if t["amp"] == "bf16" else "fp32")
        assert t["speedup_vs_fp32"] == pytest.approx(step_s["none", False] / seconds, rel=1e-12)
        assert t["gflops_per_s"] == pytest.approx(flops / seconds / 1e9, rel=1e-12)
        assert t["percent_of_bound"] == pytest.approx(
            100 * t["gflops_per_s"] / bounds[t["dtype"]]["gflops_per_s"], rel=1e-12)
        assert t["peak_rss_mib"] > 0
    assert result["train_auto"]["amp"] in ("none", "bf16") and result["train_auto"]["why"]
    assert result["bounds"] == bounds
    table = format_table(result)
    assert "% of dtype bound" in table and "fp32 bound" in table and "train.amp: auto" in table
    assert "| 33x41 | fast | 0.125 | 0.125 |" in table and "| 4.00x |" in table
    assert any("best peer FP32" in line for line in goal_ratios(result))
    assert not model.training and isinstance(model.backbone.bn1, FrozenBatchNorm2d)


def test_dtype_bounds_are_the_best_rate_of_their_shapes(monkeypatch):
    """Every product and convolution timed as 1/8 s (a clock of the test's own): each shape's
    rate is its FLOPs over that time, and the bound of a dtype is the best of them."""
    import deeplabv2.deploy.bench as bench_mod
    monkeypatch.setattr(bench_mod, "time", _Clock(tick=0.125))
    bounds = bench_mod.dtype_bounds(threads=1, repeats=2, n=64)
    assert sorted(bounds) == ["bf16", "fp32"]  # no int8 bound: none was found
    for b in bounds.values():
        assert len(b["per_shape"]) == 4
        assert b["per_shape"]["mm 64^3"] == pytest.approx(2 * 64 ** 3 / 0.125 / 1e9, rel=1e-12)
        # the 3x3 512 -> 512 convolution on 3x5 maps does the most work
        assert b["gflops_per_s"] == max(b["per_shape"].values()) == \
            b["per_shape"]["conv 3x3 512->512 d4 3x5"]


def test_rss_sampler_sees_the_memory_of_its_own_block():
    import mmap
    from deeplabv2.deploy.memory import RSSSampler, peak_rss_mib
    with RSSSampler() as big:
        # 64 MiB of fresh pages, touched: a tensor could be served from memory an earlier test
        # in this process freed but left resident, and not raise the RSS at all
        x = mmap.mmap(-1, 64 * 2**20)
        x.write(b"\x01" * len(x))
        big.sample()  # what the thread does every 2 ms (it may not be scheduled in time)
        x.close()
    assert big.peak_mib - big.start_mib > 48
    assert big.peak_mib <= peak_rss_mib() + 1  # never above the process's own maximum


def test_settled_rss_counts_what_is_held_not_what_the_allocator_caches():
    """64 MiB in small heap blocks: held, the settled memory rises by about that much; freed,
    it falls back, though glibc would keep freed heap pages resident without the trim."""
    from deeplabv2.deploy.memory import settled_rss_mib
    before = settled_rss_mib()
    blocks = [bytearray(b"\x01" * 65536) for _ in range(1024)]
    assert settled_rss_mib() - before > 48
    del blocks
    assert settled_rss_mib() - before < 16


def test_mode_accuracy_counts_changed_labels_and_miou_against_eager():
    from deeplabv2.deploy.accuracy import format_accuracy_table, mode_accuracy
    from deeplabv2.data import build_dataset
    model = _tiny()
    ds = build_dataset("synthetic", None, "val", num_samples=2, size=[40, 56])
    result = mode_accuracy(model, ds, ("fast", "winograd-all", "bf16"), threads=1)
    wino = result["modes"]["winograd-all"]
    assert wino["max_rel_logit_diff"] < 1e-4 and wino["labels_changed"] < 1e-3
    assert result["images"] == 2 and result["pixels"] == 2 * 40 * 56
    fast, bf16 = result["modes"]["fast"], result["modes"]["bf16"]
    # folding is exact up to rounding: the same labels, the same mIoU
    assert fast["max_rel_logit_diff"] < 1e-4 and fast["labels_changed"] < 1e-3
    assert abs(fast["miou_diff_points"]) < 0.1
    # bf16 (8 mantissa bits) differs measurably, and the counts say so
    assert 1e-4 < bf16["max_rel_logit_diff"] < 0.2 and 0 <= bf16["labels_changed"] < 0.5
    assert bf16["miou_diff_points"] == pytest.approx(100 * (bf16["miou"] - result["eager_miou"]))
    table = format_accuracy_table(result)
    assert "eager fp32 (reference)" in table and "| bf16 |" in table
    assert not model.training


def test_goal_ratios_per_round_follow_a_drifting_machine():
    """Round i of every mode saw about the same machine: the median of the per-round ratios
    sees through a slowdown that caught one mode's call in a round and both modes' calls in
    later rounds, where the ratio of the medians is thrown off."""
    goal_ratios = _benchmark("goals").goal_ratios
    times = {"fast": [1.0, 1.0, 1.0, 3.0, 3.0],
             "onnxruntime": [1.25, 1.25, 3.75, 3.75, 3.75],  # round 3: slow already
             "openvino": [2.0, 2.0, 6.0, 6.0, 6.0]}
    rows = [{"size": [8, 8], "mode": m, "median_s": sorted(t)[2], "times_s": t}
            for m, t in times.items()]
    lines = goal_ratios({"inference": rows, "train": []})
    assert lines == ["8x8: FP32 ours (fast) / best peer FP32: 3.75x "
                     "(median of per-round ratios 1.25x)"]
    for r in rows:  # older results without the rounds' times: the ratio of the medians
        del r["times_s"]
    assert goal_ratios({"inference": rows, "train": []}) == [
        "8x8: FP32 ours (fast) / best peer FP32: 3.75x"]


def test_isa_caps_come_from_the_environment(monkeypatch):
    from deeplabv2.deploy.machine import ISA_CAPS, isa_caps
    for name in ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    assert isa_caps() == {}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", " ")  # blank: not a cap
    assert isa_caps() == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}


def test_speed_report_names_an_instruction_set_cap(tmp_path, monkeypatch):
    """benchmarks/speed.py on a capped CPU says so, and its command line can be rerun as is;
    uncapped, it says nothing of caps. (The cap itself is mocked: oneDNN reads the variable
    once per process, and setting it here would slow the rest of this worker's tests.)"""
    import importlib.util
    import json
    from pathlib import Path

    import deeplabv2.deploy.machine as machine
    spec = importlib.util.spec_from_file_location(
        "speed", Path(__file__).parents[1] / "benchmarks" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    argv = ["--tiny", "--sizes", "32x32", "--modes", "eager", "fast", "--iterations", "1",
            "--no-train"]
    for caps in ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, {}):
        monkeypatch.setattr(machine, "isa_caps", lambda caps=caps: dict(caps))
        out, raw = tmp_path / "r.md", tmp_path / "r.json"
        assert speed.main(argv + ["--out", str(out), "--json", str(raw)]) == 0
        report = out.read_text()
        assert json.loads(raw.read_text())["machine"]["isa_caps"] == caps
        if caps:
            assert ("* command: `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/speed.py "
                    "--tiny") in report
            assert "**instruction set capped** by the environment" in report
        else:
            assert "* command: `python benchmarks/speed.py --tiny" in report
            assert "capped" not in report
        assert "| 32x32 | fast |" in report


def test_bench_command_passes_its_sizes_and_modes_and_writes_json(tmp_path, monkeypatch,
                                                                   capsys):
    """`deeplabv2 bench` end to end, with a tiny network in place of the one it builds and no
    bounds: the model, HxW sizes, modes and counts of the command line reach bench, the table
    is printed and --json written; a size that is not HxW is a one-line error. (`deeplabv2
    export` runs end to end in tests/test_export.py.)"""
    import json

    import deeplabv2.deploy.bench as bench_mod
    import deeplabv2.hub as hub
    from deeplabv2.cli import main
    built, calls = [], []
    monkeypatch.setattr(hub, "deeplabv2_resnet50",
                        lambda num_classes, weights=None: built.append((num_classes, weights))
                        or _tiny())
    real = bench_mod.bench

    def spy(model, sizes, modes, iterations, warmup, threads, **kwargs):
        calls.append((sizes, modes, iterations, warmup, threads, kwargs))
        return real(model, sizes, modes, iterations, warmup, threads, bound_size=64, **kwargs)

    monkeypatch.setattr(bench_mod, "bench", spy)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "resnet50", "--num-classes", "5", "--sizes", "33x41",
                 "24X24", "--modes", "eager", "fold", "--iterations", "1", "--warmup", "0",
                 "--threads", "1", "--no-train", "--json", str(out)]) == 0
    assert built == [(5, None)]
    assert calls == [([(33, 41), (24, 24)], ["eager", "fold"], 1, 0, 1,
                      {"train_step": False, "train_warmup": 2})]
    written = json.loads(out.read_text())
    assert written["model"] == "resnet50" and written["train"] == []
    assert [(r["size"], r["mode"]) for r in written["inference"]] == \
        [([33, 41], "eager"), ([33, 41], "fold"), ([24, 24], "eager"), ([24, 24], "fold")]
    text = capsys.readouterr().out
    assert "| 33x41 | fold |" in text and f"results written to {out}" in text
    assert main(["bench", "--model", "resnet50", "--sizes", "33by41", "--no-train"]) == 2
    assert "size must look like 321x321 (HEIGHTxWIDTH), got '33by41'" in capsys.readouterr().err


def test_winograd_backend_by_cpu(monkeypatch):
    """NNPACK on AVX2 CPUs, the GEMM form on AVX-512 ones, the direct convolutions elsewhere
    (and always for bf16)."""
    import deeplabv2.deploy.fast as fast_mod
    model = build_model({"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 64,
                         "num_classes": 3}).eval()  # 256-512 channels in layer3/4: eligible
    expected = {"AVX2": "nnpack" if nnpack_available() else None, "AVX512": "gemm",
                "AVX512_BF16": "gemm", "DEFAULT": None}
    for capability, backend in expected.items():
        monkeypatch.setattr(fast_mod.torch.backends.cpu, "get_cpu_capability",
                            lambda c=capability: c)
        assert fast_mod.winograd_backend() == backend, capability
        for precision in ("fp32", "bf16"):
            fast = optimize_for_inference(model, precision=precision)
            wino = [m for m in fast.modules() if type(m).__name__ == "AtrousWinogradConv2d"]
            want = backend if precision == "fp32" else None
            assert [m.backend for m in wino] == ([want] * 2 if want else []), (capability,
                                                                              precision)


def test_winograd_flags_choose_the_dilated_convolutions(monkeypatch):
    """``evaluate/predict --winograd auto|gemm|nnpack|off`` (``--no-winograd``: off): on an
    AVX-512 CPU auto is the GEMM form; gemm and nnpack are taken as asked whatever the CPU;
    off keeps oneDNN's direct convolutions; a Winograd form asked for with bf16 is an error."""
    import deeplabv2.deploy.fast as fast_mod
    from deeplabv2.cli import build_parser
    from deeplabv2.deploy.runtime import prepare_network, runtime_options
    monkeypatch.setattr(fast_mod.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    model = build_model({"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 64,
                         "num_classes": 3}).eval()
    cases = [([], "gemm"), (["--winograd", "auto"], "gemm"), (["--winograd", "gemm"], "gemm"),
             (["--winograd", "off"], None), (["--no-winograd"], None)]
    if nnpack_available():
        cases.append((["--winograd", "nnpack"], "nnpack"))
    for flags, backend in cases:
        args = build_parser().parse_args(["predict", "ckpt.pth", "in", "-o", "out",
                                          "--precision", "fp32", *flags])
        net = prepare_network(model, device="cpu", **runtime_options(args)).net
        winograd = [m for m in net.modules() if type(m).__name__ == "AtrousWinogradConv2d"]
        assert len(winograd) == (2 if backend else 0), flags
        assert all(m.backend == backend for m in winograd), flags
    args = build_parser().parse_args(["predict", "ckpt.pth", "in", "-o", "out",
                                      "--precision", "bf16", "--winograd", "gemm"])
    with pytest.raises(ValueError, match="fp32 model on the CPU"):
        prepare_network(model, device="cpu", **runtime_options(args))


def test_prepacked_weights_follow_the_input_and_survive_copies():
    """The oneDNN weights packed at the first call serve other sizes and batches; a deep copy
    (or pickle) of a used model packs its own."""
    import copy
    import pickle
    model = _tiny()
    for precision, tol in (("fp32", 1e-4), ("bf16", 5e-2)):
        fast = optimize_for_inference(model, precision=precision)
        with torch.no_grad():
            for shape in ((1, 3, 41, 41), (1, 3, 65, 97), (2, 3, 33, 41)):
                x = torch.randn(*shape)
                assert _close(fast(x), model(x), tol), (precision, shape)
            clone = copy.deepcopy(fast)
            assert _close(clone(x), fast(x), 1e-6)
            assert _close(pickle.loads(pickle.dumps(fast))(x), fast(x), 1e-6)


@pytest.mark.parametrize("head_mode", ["aspp", "adaptsegnet"])
def test_aspp_as_one_convolution_of_its_taps_equals_the_branches(head_mode):
    """TapsASPP: the 36 taps of the 4 dilated branches as one 1x1 convolution and shifted sums,
    on maps smaller than some rates (taps that read only padding are skipped) and larger."""
    from deeplabv2.deploy.fast import TapsASPP
    torch.manual_seed(0)
    model = build_model({**TINY, "head_mode": head_mode}).eval()
    with torch.no_grad():
        for conv in model.head.convs:
            conv.weight.normal_(0, 0.1)
            conv.bias.normal_(0, 0.1)
    for precision, tol in (("fp32", 1e-5), ("bf16", 3e-2)):
        fast = optimize_for_inference(model, precision=precision)
        assert isinstance(fast.model.head, TapsASPP)
        assert len(fast.model.head.shifts) == 9 * len(model.head.summed_convs())
        for shape in ((1, 3, 41, 41), (2, 3, 161, 225)):  # 6x6 and 21x29 score maps
            x = torch.randn(*shape)
            with torch.no_grad():
                ref, out = model(x), fast(x)
            assert _close(out, ref, tol), (precision, shape)
    with torch.enable_grad():  # autograd takes the branch convolutions
        head = optimize_for_inference(model).model.head
        feats = torch.randn(1, head.taps.in_channels, 9, 11)
        assert _close(head(feats), model.head(feats), 1e-5)


def test_fused_blocks_leave_the_callers_input_alone():
    """The residual sum accumulates in place only into tensors the block owns: the caller's
    input of a layer, and a lone block's input, come back unchanged."""
    model = _tiny()
    fast = optimize_for_inference(model)
    layer = fast.model.backbone.layer1
    x = torch.randn(1, layer[0].conv1.in_channels, 17, 19).contiguous(
        memory_format=torch.channels_last).to(next(layer.parameters()).dtype)
    before = x.clone()
    with torch.no_grad():
        layer(x)
        for block in layer:
            y = torch.randn(1, block.conv1.in_channels, 9, 11).contiguous(
                memory_format=torch.channels_last)
            kept = y.clone()
            block(y)
            if not block.input_is_private:
                assert torch.equal(y, kept)
    assert torch.equal(x, before)
