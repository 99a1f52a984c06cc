"""Dense CRF: the permutohedral filter against a brute-force Gaussian, the CRF against pydensecrf
(the reference implementation) on natural-looking scenes, batches, devices and input errors."""

import numpy as np
import pytest
import torch

from deeplabv2.inference.crf import PROB_SUM_TOLERANCE, DenseCRF, PermutohedralLattice, dense_crf
from extras import require


@pytest.fixture(autouse=True)
def one_thread():
    # The suite runs as two xdist workers on two cores: more threads per worker only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def densecrf():
    return require("pydensecrf.densecrf",
                   "pydensecrf, the reference (PyPI package pydensecrf2), is not installed")


def scene(height, width, classes, seed):
    """A natural-looking image of a blocky ground truth and noisy probabilities of it.

    Returns ``image`` (H, W, 3) uint8, ``probs`` (C, H, W) float32, ``truth`` (H, W) int:
    16-pixel blocks of random classes, each class its own colour under smooth shading and
    sensor noise, and probabilities from a noisy one-hot encoding (about 60 % of the pixels
    right for 5 classes).
    """
    rng = np.random.default_rng(seed)
    block = 16
    coarse = rng.integers(0, classes, (-(-height // block), -(-width // block)))
    truth = np.repeat(np.repeat(coarse, block, 0), block, 1)[:height, :width]
    colours = rng.uniform(30, 225, (classes, 3))
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    shade = 25 * np.sin(2 * np.pi * (xx * rng.uniform(0.5, 2) + yy * rng.uniform(0.5, 2)))
    image = colours[truth] + shade[..., None] + rng.normal(0, 4, (height, width, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    logits = 2.0 * np.eye(classes)[truth].transpose(2, 0, 1)
    logits += rng.normal(0, 1.5, (classes, height, width))
    probs = np.exp(logits - logits.max(0))
    return image, (probs / probs.sum(0)).astype(np.float32), truth


def ours(crf, probs, image):
    return crf(torch.from_numpy(probs)[None], torch.from_numpy(image)[None])[0].numpy()


def reference(densecrf, crf, probs, image):
    """pydensecrf as DeepLab users call it: -log p unaries, Potts weights, default
    NORMALIZE_SYMMETRIC kernels."""
    c, h, w = probs.shape
    model = densecrf.DenseCRF2D(w, h, c)
    model.setUnaryEnergy(np.ascontiguousarray(-np.log(probs).reshape(c, -1)))
    if crf.pos_w:
        model.addPairwiseGaussian(sxy=crf.pos_xy_std, compat=crf.pos_w)
    if crf.bi_w:
        model.addPairwiseBilateral(sxy=crf.bi_xy_std, srgb=crf.bi_rgb_std, rgbim=image,
                                   compat=crf.bi_w)
    return np.asarray(model.inference(crf.iterations)).reshape(c, h, w)


# -- the permutohedral lattice ------------------------------------------------------------------

@pytest.mark.parametrize("dim, side", [(2, 6.0), (3, 4.0), (5, 3.0)])
def test_lattice_approximates_the_gaussian_filter(dim, side):
    """Against the dense sum over all pairs, on points dense enough for the method: the shape of
    the output is right, and once normalised by the filter of ones (as the CRF uses it) the
    values are within 5 % (1 % on average)."""
    g = torch.Generator().manual_seed(dim)
    points, values = torch.rand(1, 500, dim, generator=g) * side, torch.rand(1, 500, 2, generator=g)
    weights = torch.exp(-0.5 * torch.cdist(points[0].double(), points[0].double()) ** 2)
    exact = weights @ values[0].double()
    lattice = PermutohedralLattice(points)
    approx = lattice.filter(values)[0].double()
    assert np.corrcoef(approx.flatten(), exact.flatten())[0, 1] > 0.99
    normalised = approx / lattice.filter(torch.ones(1, 500, 1))[0]
    exact_normalised = exact / weights.sum(1, keepdim=True)
    error = (normalised - exact_normalised).abs() / exact_normalised
    assert error.max() < 0.05 and error.mean() < 0.01
    assert lattice.num_vertices <= (dim + 1) * 500  # at most d+1 vertices per point


def test_lattice_keeps_point_sets_apart():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(2, 300, 3, generator=g) * 4
    points[1] = points[0]  # the same positions: only the lattice separates the two sets
    values = torch.rand(2, 300, 4, generator=g)
    together = PermutohedralLattice(points).filter(values)
    for i in range(2):
        alone = PermutohedralLattice(points[i:i + 1]).filter(values[i:i + 1])[0]
        np.testing.assert_allclose(together[i], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("features, message", [
    (torch.rand(10, 3), r"\(N, P, d\)"),
    (torch.ones(1, 10, 2, dtype=torch.int64), "floating point"),
    (torch.tensor([[[0.0, float("nan")]]]), "NaN"),
    (torch.rand(1, 0, 3), "non-empty"),
])
def test_lattice_rejects_bad_features(features, message):
    with pytest.raises(ValueError, match=message):
        PermutohedralLattice(features)


def test_lattice_rejects_values_of_another_shape():
    lattice = PermutohedralLattice(torch.rand(1, 20, 2))
    with pytest.raises(ValueError, match=r"\(N, P\) = \(1, 20\)"):
        lattice.filter(torch.rand(1, 21, 3))


# -- agreement with pydensecrf ------------------------------------------------------------------

def test_appearance_kernel_matches_pydensecrf_to_rounding(densecrf):
    """The bilateral term alone: the same lattice as densecrf's, so the same numbers."""
    crf = DenseCRF(pos_w=0)
    for seed in range(2):
        image, probs, _ = scene(64, 96, 5, seed)
        expected, got = reference(densecrf, crf, probs, image), ours(crf, probs, image)
        assert (got.argmax(0) == expected.argmax(0)).all()
        np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("classes, seed", [(5, 0), (21, 1), (21, 2)])
def test_default_crf_matches_pydensecrf(densecrf, classes, seed):
    """DeepLab's parameters: at least 99 % of the labels as pydensecrf's, and close
    probabilities. The rest of the difference is the smoothness kernel, exact here and a lattice
    approximation in densecrf (measured: 99.8-99.98 % same labels, mean |dp| <= 0.0003)."""
    crf = DenseCRF()
    image, probs, truth = scene(64, 96, classes, seed)
    expected, got = reference(densecrf, crf, probs, image), ours(crf, probs, image)
    assert (got.argmax(0) == expected.argmax(0)).mean() >= 0.99
    diff = np.abs(got - expected)
    assert diff.mean() < 0.002 and np.quantile(diff, 0.99) < 0.02
    # and it does what it is for: most of the noise is gone
    assert (got.argmax(0) == truth).mean() > (probs.argmax(0) == truth).mean() + 0.3


def test_wide_smoothness_kernel_matches_pydensecrf_to_rounding(densecrf):
    """Past pos_xy_std = 4 the smoothness kernel runs on densecrf's lattice too."""
    crf = DenseCRF(pos_xy_std=6, bi_w=0)
    image, probs, _ = scene(64, 96, 5, 4)
    expected, got = reference(densecrf, crf, probs, image), ours(crf, probs, image)
    assert (got.argmax(0) == expected.argmax(0)).all()
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("crf", [
    DenseCRF(bi_w=0),  # the smoothness kernel alone: exact Gaussian vs densecrf's lattice
    DenseCRF(iterations=5, pos_w=2, pos_xy_std=2, bi_w=5, bi_xy_std=20, bi_rgb_std=10),
], ids=["smoothness only", "other parameters"])
def test_other_settings_match_pydensecrf(densecrf, crf):
    image, probs, _ = scene(64, 96, 5, 3)
    expected, got = reference(densecrf, crf, probs, image), ours(crf, probs, image)
    assert (got.argmax(0) == expected.argmax(0)).mean() >= 0.99
    assert np.abs(got - expected).mean() < 0.005


# -- behaviour ----------------------------------------------------------------------------------

def test_batch_gives_each_image_its_own_answer():
    scenes = [scene(48, 64, 4, seed) for seed in (5, 6)]
    images = torch.from_numpy(np.stack([s[0] for s in scenes]))
    probs = torch.from_numpy(np.stack([s[1] for s in scenes]))
    together = dense_crf(probs, images)
    for i in range(2):
        alone = dense_crf(probs[i:i + 1], images[i:i + 1])
        np.testing.assert_allclose(together[i:i + 1], alone, rtol=1e-5, atol=1e-6)


def test_output_is_a_distribution_in_the_input_layout():
    image, probs, _ = scene(40, 56, 3, 7)
    p = torch.from_numpy(probs)[None].double()
    out = DenseCRF(iterations=3)(p, image[None])  # a numpy image is accepted too
    assert out.shape == p.shape and out.dtype == torch.float64 and out.device == p.device
    assert out.is_contiguous()
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=0, atol=1e-6)
    assert (out >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_probabilities_are_accepted(dtype):
    image, probs, _ = scene(24, 32, 21, 13)
    p = torch.from_numpy(probs)[None]
    out = dense_crf(p.to(dtype), torch.from_numpy(image)[None], iterations=3)
    assert out.dtype == dtype
    expected = dense_crf(p, torch.from_numpy(image)[None], iterations=3)
    assert (out.argmax(1) == expected.argmax(1)).float().mean() > 0.99


def test_zero_iterations_return_the_renormalised_input():
    image, probs, _ = scene(32, 32, 3, 8)
    p = torch.from_numpy(probs)[None] * (1 + PROB_SUM_TOLERANCE / 2)  # within tolerance
    out = dense_crf(p, torch.from_numpy(image)[None], iterations=0)
    np.testing.assert_allclose(out, p / p.sum(1, keepdim=True), rtol=1e-5, atol=1e-7)


def test_a_zero_probability_stays_zero_without_the_clip():
    image, probs, _ = scene(32, 48, 3, 9)
    probs[2] += probs[0]
    probs[0] = 0  # class 0 ruled out everywhere
    out = dense_crf(torch.from_numpy(probs)[None], torch.from_numpy(image)[None], prob_clip=0)
    assert out.isfinite().all() and (out[:, 0] == 0).all()


def test_the_1e5_clip_lets_a_zero_probability_class_come_back():
    # One colour everywhere; class 0 is near certain except in a 4x4 hole where the network
    # gave it exactly zero. densecrf's unary clip at 1e-5 (pydensecrf's unary_from_softmax)
    # lets the neighbours win the hole back; with plain log p it can never come back.
    image = np.full((1, 24, 24, 3), 128, np.uint8)
    probs = torch.full((1, 2, 24, 24), 0.0)
    probs[:, 0], probs[:, 1] = 0.99, 0.01
    probs[:, 0, 10:14, 10:14], probs[:, 1, 10:14, 10:14] = 0.0, 1.0
    crf = DenseCRF(iterations=10, bi_w=30.0, bi_xy_std=20.0, bi_rgb_std=5.0)
    hole = (slice(None), slice(None), slice(10, 14), slice(10, 14))
    assert (crf(probs, image).argmax(1)[hole[0], hole[2], hole[3]] == 0).all()
    plain = DenseCRF(iterations=10, bi_w=30.0, bi_xy_std=20.0, bi_rgb_std=5.0, prob_clip=0)
    assert (plain(probs, image)[hole][:, 0] == 0).all()
    with pytest.raises(ValueError, match="prob_clip"):
        DenseCRF(prob_clip=1.5)


def test_function_and_class_agree_and_configs_round_trip():
    image, probs, _ = scene(32, 40, 3, 10)
    kwargs = dict(iterations=4, pos_w=2.0, pos_xy_std=1.5, bi_w=3.0, bi_xy_std=30.0,
                  bi_rgb_std=5.0, prob_clip=1e-4)
    crf = DenseCRF.from_dict(kwargs)
    assert DenseCRF.from_dict(crf.to_dict()) == crf and crf.to_dict() == kwargs
    p, im = torch.from_numpy(probs)[None], torch.from_numpy(image)[None]
    np.testing.assert_array_equal(crf(p, im), dense_crf(p, im, **kwargs))


def test_defaults_are_deeplabs():
    assert DenseCRF().to_dict() == dict(iterations=10, pos_w=3.0, pos_xy_std=1.0, bi_w=4.0,
                                        bi_xy_std=67.0, bi_rgb_std=3.0, prob_clip=1e-5)


def test_presets_per_backbone_and_the_papers_grid():
    from deeplabv2.config import EvalConfig
    from deeplabv2.inference.crf import PAPER_GRID, crf_preset
    resnet, vgg = crf_preset({"backbone": "resnet"}), crf_preset({"backbone": "vgg16"})
    assert (resnet.bi_w, resnet.bi_xy_std, resnet.bi_rgb_std, resnet.pos_w,
            resnet.pos_xy_std) == (4, 67, 3, 3, 1)
    assert (vgg.bi_w, vgg.bi_xy_std, vgg.bi_rgb_std, vgg.pos_w, vgg.pos_xy_std) == (4, 121, 5, 3, 3)
    # the config's crf_params update the backbone's preset; crf off gives None
    crf = EvalConfig(crf=True, crf_params={"bi_w": 5}).dense_crf({"backbone": "vgg16"})
    assert (crf.bi_w, crf.bi_xy_std) == (5, 121)
    assert EvalConfig().dense_crf({"backbone": "vgg16"}) is None
    assert PAPER_GRID == {"bi_w": [3, 4, 5, 6], "bi_xy_std": [30, 40, 50, 60, 70, 80, 90, 100],
                          "bi_rgb_std": [3, 4, 5, 6]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    image, probs, _ = scene(64, 96, 5, 11)
    p, im = torch.from_numpy(probs)[None], torch.from_numpy(image)[None]
    on_gpu = dense_crf(p.cuda(), im.cuda())
    assert on_gpu.device.type == "cuda"
    np.testing.assert_allclose(on_gpu.cpu(), dense_crf(p, im), atol=1e-4, rtol=0)


# -- input errors -------------------------------------------------------------------------------

def _inputs():
    image, probs, _ = scene(16, 24, 3, 12)
    return torch.from_numpy(probs)[None], torch.from_numpy(image)[None]


def _replace(probs=None, images=None):
    p, im = _inputs()
    return (p if probs is None else probs(p)), (im if images is None else images(im))


@pytest.mark.parametrize("probs, images, message", [
    (None, lambda im: im[:, :, :20], r"do not match probs.*\(1, 16, 24, 3\)"),
    (None, lambda im: im[:1].expand(2, -1, -1, -1), "do not match"),
    (None, lambda im: im.float(), "uint8"),
    (None, lambda im: im.to(torch.int64), "uint8"),
    (None, lambda im: torch.cat([im, im[..., :1]], -1), r"\(N, H, W, 3\) RGB"),
    (None, lambda im: im[..., 0], r"\(N, H, W, 3\) RGB"),
    (None, lambda im: [[1, 2, 3]], "images must be a torch.Tensor"),
    (lambda p: p[0], None, r"\(N, C, H, W\)"),
    (lambda p: p.to(torch.int64), None, "floating point"),
    (lambda p: p * 2, None, "do not sum to 1 over the class dimension"),
    (lambda p: torch.log(p), None, "negative values.*softmax"),
    (lambda p: p.index_put((torch.tensor(0), torch.tensor(1), torch.tensor(3)),
                           torch.tensor(float("nan"))), None, "NaN"),
    (lambda p: p.index_put((torch.tensor(0), torch.tensor(1), torch.tensor(3)),
                           torch.tensor(float("inf"))), None, "infinite"),
    (lambda p: p.numpy(), None, "probs must be a torch.Tensor"),
], ids=["smaller image", "batch mismatch", "float image", "int64 image", "RGBA image",
        "grey image", "list image", "no batch dim", "integer probs", "unnormalised",
        "logits", "NaN", "inf", "numpy probs"])
def test_bad_inputs_are_errors_that_say_what_is_wrong(probs, images, message):
    p, im = _replace(probs, images)
    with pytest.raises(ValueError, match=message):
        dense_crf(p, im)


@pytest.mark.parametrize("kwargs, message", [
    (dict(iterations=-1), "iterations"),
    (dict(iterations=2.5), "iterations"),
    (dict(iterations=True), "iterations"),
    (dict(pos_xy_std=0), "pos_xy_std"),
    (dict(bi_rgb_std=-3), "bi_rgb_std"),
    (dict(bi_w=float("nan")), "bi_w"),
    (dict(pos_w=-1), "pos_w"),
    (dict(bi_xy_std="67"), "bi_xy_std"),
])
def test_bad_parameters_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DenseCRF(**kwargs)


def test_unknown_config_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'bi_std'.*valid: iterations, pos_w, pos_xy_std, "
                                         "bi_w, bi_xy_std, bi_rgb_std"):
        DenseCRF.from_dict({"bi_std": 3})
