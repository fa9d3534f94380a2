"""Calibration coverage verdicts and data-free (distilled) calibration images."""

import pytest
import torch
from torch import nn

import qsurgery
from qsurgery import DataError
from qsurgery.calibration import calibration_coverage
from qsurgery.data import distill_images


def net(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), norm(8),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    if bn:  # running statistics of a "training set": smooth images, like real ones
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.momentum = None  # cumulative average
        m.train()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(8):
                base = torch.rand(16, 3, 3, 3, generator=g)
                m(nn.functional.interpolate(base, size=12, mode="bilinear", align_corners=False) * 2 - 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def graph():
    return qsurgery.capture(net(), torch.rand(1, 3, 12, 12))


def batches(gen_fn, n, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [gen_fn(min(bs, n - i), g) for i in range(0, n, bs)]


def uniform(scale=1.0):
    return lambda b, g: torch.rand(b, 3, 12, 12, generator=g) * scale


def varying(b, g):  # each image has its own brightness scale: ranges keep growing as images are added
    return torch.rand(b, 3, 12, 12, generator=g) * torch.exp(torch.randn(b, 1, 1, 1, generator=g) * 1.5)


def test_coverage_verdicts_tell_the_cases_apart(graph):
    evals = batches(uniform(), 32, seed=1)
    enough = calibration_coverage(graph, batches(uniform(), 64), evals, progress=False)
    assert enough.verdict == "enough", enough.message
    assert enough.n_calib == 64 and enough.n_eval == 32 and set(enough.curve) >= {1, 2, 64}
    unlike = calibration_coverage(graph, batches(uniform(0.1), 64), evals, progress=False)
    assert unlike.verdict == "unlike", unlike.message
    assert any(r.flagged == "saturates" for r in unlike.rows)
    few = calibration_coverage(graph, batches(varying, 8, bs=2), batches(varying, 64, seed=2), progress=False)
    assert few.verdict == "more images", few.message
    assert few.suggested_images and few.suggested_images > 8
    md = enough.to_markdown()
    assert "enough" in md and "| layer |" in md


def test_coverage_bad_input(graph, tmp_path):
    with pytest.raises(DataError, match="one image"):
        calibration_coverage(graph, [torch.rand(1, 3, 12, 12)], [torch.rand(4, 3, 12, 12)], progress=False)
    with pytest.raises(qsurgery.QSurgeryError, match="shape|size"):
        calibration_coverage(graph, [torch.rand(4, 1, 12, 12)], [torch.rand(4, 3, 12, 12)], progress=False)
    report = calibration_coverage(graph, batches(uniform(), 16), batches(uniform(), 8), progress=False)
    assert report.plot(tmp_path / "curve.png").stat().st_size > 0


def bn_mismatch(model, x):
    """Mean over BN layers of |batch mean - running mean| + |batch std - running std|."""
    errs = []

    def hook(m, inp, _o):
        v = inp[0]
        errs.append(float((v.mean((0, 2, 3)) - m.running_mean).abs().mean()
                          + (v.std((0, 2, 3)) - (m.running_var + m.eps).sqrt()).abs().mean()))

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return sum(errs) / len(errs)


def test_distilled_images_match_bn_statistics_and_are_cached(tmp_path):
    model = net()
    flags = [p.requires_grad for p in model.parameters()]
    x = distill_images(model, 6, size=12, steps=60, batch_size=4, cache_dir=tmp_path, progress=False)
    assert x.shape == (6, 3, 12, 12) and torch.isfinite(x).all()
    noise = torch.randn(6, 3, 12, 12)
    assert bn_mismatch(model, x) < 0.3 * bn_mismatch(model, noise)
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert len(list(tmp_path.glob("distilled-*.pt"))) == 1
    again = distill_images(model, 6, size=12, steps=60, batch_size=4, cache_dir=tmp_path, progress=False)
    assert torch.equal(x, again)
    fresh = distill_images(model, 6, size=12, steps=60, batch_size=4, progress=False)
    torch.testing.assert_close(x, fresh)  # seeded: the same without the cache


def test_distill_images_needs_batchnorm():
    with pytest.raises(DataError, match="no BatchNorm.*real images"):
        distill_images(net(bn=False), 4, size=12, steps=2, progress=False)
    with pytest.raises(DataError, match="at least 1"):
        distill_images(net(), 0, size=12)


def test_distilled_pixels_stay_in_the_range_real_images_have():
    model = net()
    model.pretrained_cfg = {"mean": (0.5, 0.4, 0.3), "std": (0.25, 0.2, 0.5)}  # as timm models carry it
    x = distill_images(model, 4, size=12, steps=30, batch_size=4, progress=False)
    lo = (-torch.tensor([0.5, 0.4, 0.3]) / torch.tensor([0.25, 0.2, 0.5])).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.25, 0.2, 0.5])).view(1, 3, 1, 1)
    assert bool((x >= lo).all() and (x <= hi).all())
    assert bn_mismatch(model, x) < 0.5 * bn_mismatch(model, torch.rand(4, 3, 12, 12) * (hi - lo) + lo)
    free = distill_images(model, 4, size=12, steps=30, batch_size=4, pixel_range=None, progress=False)
    assert not bool((free >= lo).all() and (free <= hi).all())  # unbounded: outside what a photo can be
    tight = distill_images(model, 4, size=12, steps=5, batch_size=4, pixel_range=(-0.5, 0.5), progress=False)
    assert float(tight.abs().max()) <= 0.5
    with pytest.raises(DataError, match="lo < hi"):
        distill_images(model, 4, size=12, steps=1, pixel_range=(1.0, -1.0), progress=False)
    with pytest.raises(DataError, match="pixel_range"):
        distill_images(model, 4, size=12, steps=1, pixel_range="imagenet", progress=False)
