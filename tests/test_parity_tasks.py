"""Parity judged by what the output means: binary, multiclass, multilabel, regression; empty masks; relative errors."""

from __future__ import annotations

import numpy as np
import pytest

from sfedge.errors import ConfigError, ParityError
from sfedge.parity import (
    DEFAULT_TOLERANCES,
    MIN_MASK_PIXELS,
    Parity,
    Tolerance,
    compare_outputs,
    detect_task,
    gate,
    parse_tolerance_overrides,
    tolerance_for,
)

RNG = np.random.default_rng(0)


def _three_class_scores(labels: np.ndarray, margin: float = 4.0) -> np.ndarray:
    """(N, 3, H, W) logits whose argmax is ``labels`` (N, H, W), the losing classes at random negative values."""
    scores = RNG.normal(-margin, 1.0, (labels.shape[0], 3, *labels.shape[1:])).astype(np.float32)
    for c in range(3):
        scores[:, c][labels == c] = margin + RNG.random(int((labels == c).sum()))
    return scores


def test_multiclass_is_judged_per_class_where_the_pooled_logit_dice_is_wrong() -> None:
    """Class 2 swapped for class 1 on a stripe: the label maps disagree, the old metric does not see it.

    Class scores need not straddle 0 (softmax is shift-invariant; these are all positive): the old metric,
    Dice of ``logit > 0`` pooled over every channel, finds both outputs all-foreground and calls them
    identical.  Per-class Dice of the argmax maps sees the swap.
    """
    labels = np.zeros((2, 32, 32), np.int64)
    labels[:, 8:24, 8:24] = 1
    labels[:, 20:28, :] = 2
    ref = _three_class_scores(labels) + 20.0
    wrong = labels.copy()
    wrong[:, 20:28, :16] = 1  # half of class 2 predicted as class 1
    out = _three_class_scores(wrong) + 20.0
    pooled = 2 * ((ref > 0) & (out > 0)).sum() / ((ref > 0).sum() + (out > 0).sum())
    assert pooled > 0.99  # the pooled-logit Dice cannot tell
    p = compare_outputs(ref, out, "multiclass")
    assert p.task == "multiclass" and p.masks_judged and len(p.per_class) == 3
    assert p.per_class[2] < 0.75 and p.dice_agreement < 0.9  # per class, the swap shows
    assert Tolerance(dice_agreement=0.98).failures(p)
    same = compare_outputs(ref, _three_class_scores(labels) + 20.0, "multiclass")
    assert same.dice_agreement == pytest.approx(1.0) and not Tolerance(dice_agreement=0.98).failures(same)


def test_multiclass_mean_leaves_out_the_background_and_absent_classes() -> None:
    labels = np.zeros((1, 32, 32), np.int64)
    labels[:, :16] = 1  # class 2 absent from the reference
    ref = _three_class_scores(labels)
    out_labels = labels.copy()
    out_labels[:, 30:, :] = 2  # the artifact invents a little class 2 in the background
    p = compare_outputs(ref, _three_class_scores(out_labels), "multiclass")
    assert p.per_class[2] == 0.0 and p.dice_agreement == pytest.approx(p.per_class[1])


def test_empty_reference_masks_are_not_judged_and_fall_back_to_cosine() -> None:
    """No vessels in any held-out sample: never 'Dice 1.0' because both masks are empty."""
    ref = RNG.normal(-5.0, 1.0, (4, 1, 32, 32)).astype(np.float32)  # every logit negative: empty masks
    p = compare_outputs(ref, ref + RNG.normal(0, 0.01, ref.shape).astype(np.float32), "binary")
    assert p.dice_agreement is None and not p.masks_judged and "foreground pixels" in p.mask_note
    int8 = DEFAULT_TOLERANCES["int8"]
    assert int8.failures(p) == []  # judged on cosine, which holds
    garbage = compare_outputs(ref, RNG.normal(-5.0, 1.0, ref.shape).astype(np.float32), "binary")
    failures = int8.failures(garbage)
    assert len(failures) == 1 and "masks cannot be judged" in failures[0] and "cosine" in failures[0]
    stray = ref.copy()
    stray[0, 0, 0, :MIN_MASK_PIXELS - 1] = 3.0  # a few positive pixels: still too few to judge
    assert compare_outputs(stray, stray, "binary").dice_agreement is None


def test_large_logits_pass_fp32_on_rounding_and_a_wrong_artifact_fails() -> None:
    """Logits up to ~15 (MONAI BasicUNet) with float rounding of 2e-4: fine relative to the range; a bug is not."""
    ref = RNG.normal(0.0, 5.0, (4, 1, 64, 64)).astype(np.float32)
    rounding = ref + RNG.uniform(-2.2e-4, 2.2e-4, ref.shape).astype(np.float32)
    fp32 = DEFAULT_TOLERANCES["fp32"]
    p = compare_outputs(ref, rounding)
    assert p.max_abs > 1e-4  # the old absolute 1e-4 would have failed this artifact
    assert fp32.failures(p) == []
    wrong = ref.copy()
    wrong[:, :, :8] += 0.5  # one band of rows off by 0.5: a real conversion bug
    failures = fp32.failures(compare_outputs(ref, wrong))
    assert failures and "of the output range" in failures[0]


def test_multilabel_and_regression() -> None:
    ref = RNG.normal(0.0, 3.0, (2, 2, 32, 32)).astype(np.float32)
    flipped = ref.copy()
    flipped[:, 1] *= -1  # the second label inverted
    p = compare_outputs(ref, flipped, "multilabel")
    assert p.per_class[0] == pytest.approx(1.0) and p.per_class[1] == pytest.approx(0.0)
    assert p.dice_agreement == pytest.approx(0.5)
    r = compare_outputs(ref, ref * 1.01, "regression")
    assert r.dice_agreement is None and r.relative_error == pytest.approx(0.01, rel=1e-3)
    assert 30 < r.psnr < 60 and Tolerance(psnr=25).failures(r) == []


def test_task_detection_overrides_and_errors() -> None:
    assert detect_task((1, 1, 64, 64)) == "binary" and detect_task((1, 3, 64, 64)) == "multiclass"
    assert parse_tolerance_overrides(["relative_max_abs=2e-4", "dice-agreement=0.97"]) == {
        "relative_max_abs": 2e-4, "dice_agreement": 0.97}
    for bad in ("nope=1", "cosine", "cosine=abc", "cosine=-1"):
        with pytest.raises(ConfigError):
            parse_tolerance_overrides([bad])
    tol = tolerance_for({}, "int8", {"dice_agreement": 0.95})
    assert tol.dice_agreement == 0.95 and tol.fallback_cosine == DEFAULT_TOLERANCES["int8"].fallback_cosine
    with pytest.raises(ConfigError, match="unknown task"):
        compare_outputs(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)), "segmentation")


def test_gate_message_names_the_task_metric(tmp_path) -> None:
    labels = np.zeros((1, 32, 32), np.int64)
    labels[:, :16] = 1
    p = compare_outputs(_three_class_scores(labels), _three_class_scores(np.zeros_like(labels)), "multiclass")
    with pytest.raises(ParityError, match="multiclass mask Dice agreement 0.0000 < 0.98"):
        gate(p, Tolerance(dice_agreement=0.98), "the int8 thing")
    assert Parity.from_dict(p.as_dict()) == p
