"""MixUp, CutMix and copy-paste (dfineseg/data/mixing.py): masks stay exact, computed independently on
full-size masks (property-based), and the pipeline's invariants hold with every mixing step on."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_transforms import check_invariants, make_sample

from dfineseg.config import AugmentConfig
from dfineseg.data.mixing import CopyPaste, CutMix, MixUp
from dfineseg.data.transforms import MIN_VISIBLE_FRACTION, TrainAugment, rasterize


def _full_masks(sample):
    return rasterize(sample).masks


def _same_size_pair(seed, h, w, n1, n2):
    rng = np.random.default_rng(seed)
    return make_sample(rng, h, w, n1), make_sample(rng, h, w, n2, id_base=10)


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CASE = dict(seed=st.integers(0, 2**31 - 1), h=st.integers(40, 100), w=st.integers(40, 100),
            n1=st.integers(0, 6), n2=st.integers(0, 6))


def _expected_occluded(a, hidden):
    """The instances of `a` after `hidden` pixels are removed, by the rule: full masks minus hidden, kept
    when at least MIN_VISIBLE_FRACTION stays (segmented instances only)."""
    out = {}
    for label, geom, mask in zip(a.labels, a.geoms, _full_masks(a), strict=True):
        if geom is None:
            continue
        left = mask & ~hidden
        if left.sum() and left.sum() >= MIN_VISIBLE_FRACTION * mask.sum():
            out[int(label)] = left
    return out


def _segmented(sample):
    r = rasterize(sample)
    return {int(lab): m for lab, m, g in zip(r.labels, r.masks, r.geoms, strict=True) if g is not None}


@SETTINGS
@given(**CASE)
def test_copy_paste_moves_masks_with_their_pixels_and_cuts_what_they_cover(seed, h, w, n1, n2):
    a, b = _same_size_pair(seed, h, w, n1, n2)
    aug = CopyPaste(1.0)
    out = aug.mix(a, b, np.random.default_rng(seed))
    idx = aug.chosen(b, np.random.default_rng(seed))
    b_masks = _full_masks(b)
    b_labels = rasterize(b).labels
    pasted = {int(lab): m for lab, m in zip(b_labels, b_masks, strict=True) if lab in set(b.labels[idx].tolist())}
    if not pasted:
        assert out is a
        return
    hidden = np.any(list(pasted.values()), axis=0)
    expected = {**_expected_occluded(a, hidden), **pasted}
    got = _segmented(out)
    assert got.keys() == expected.keys()
    for label, mask in expected.items():
        assert np.array_equal(got[label], mask), label
    assert np.array_equal(out.image[hidden], b.image[hidden])  # pasted with their pixels
    assert np.array_equal(out.image[~hidden], a.image[~hidden])


@SETTINGS
@given(**CASE)
def test_cutmix_keeps_exact_masks_on_both_sides_of_the_rectangle(seed, h, w, n1, n2):
    a, b = _same_size_pair(seed, h, w, n1, n2)
    aug = CutMix(1.0)
    out = aug.mix(a, b, np.random.default_rng(seed))
    x0, y0, x1, y1 = aug.region(h, w, np.random.default_rng(seed))
    hidden = np.zeros((h, w), bool)
    hidden[y0:y1, x0:x1] = True
    got = _segmented(out)
    for label, mask in _expected_occluded(a, hidden).items():
        assert np.array_equal(got[label], mask), label
    for label, mask in got.items():
        if label >= 10:  # the other image's instances live inside the rectangle only
            assert not (mask & ~hidden).any()
    assert np.array_equal(out.image[hidden], b.image[hidden])
    assert np.array_equal(out.image[~hidden], a.image[~hidden])


@SETTINGS
@given(**CASE)
def test_mixup_keeps_every_instance_of_both_images(seed, h, w, n1, n2):
    a, b = _same_size_pair(seed, h, w, n1, n2)
    out = MixUp(1.0).mix(a, b, np.random.default_rng(seed))
    got = _segmented(out)
    assert got.keys() == {**_segmented(a), **_segmented(b)}.keys()
    for label, mask in {**_segmented(a), **_segmented(b)}.items():
        assert np.array_equal(got[label], mask)
    lo = np.minimum(a.image, b.image).astype(int)
    hi = np.maximum(a.image, b.image).astype(int)
    assert ((out.image >= lo - 1) & (out.image <= hi + 1)).all()  # a blend of the two


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(48, 100), w=st.integers(48, 100), n=st.integers(0, 6))
def test_pipeline_invariants_with_every_mixing_step_on(seed, h, w, n):
    rng = np.random.default_rng(seed)
    sample = make_sample(rng, h, w, n)
    others = [make_sample(rng, int(rng.integers(40, 120)), int(rng.integers(40, 120)), int(rng.integers(0, 7)),
                          id_base=10 * (k + 1)) for k in range(3)]
    calls = iter(others)
    cfg = AugmentConfig()
    cfg.mixup.p = cfg.cutmix.p = cfg.copy_paste.p = 1.0
    cfg.mosaic.p = cfg.affine.p = cfg.photometric.p = 0.0
    aug = TrainAugment(cfg, load_random=lambda r: next(calls))
    out = rasterize(aug(sample, rng, (h, w)))
    allowed = set(sample.labels.tolist()) | {int(lab) for o in others for lab in o.labels}
    check_invariants(out, allowed, check_colours=False)
