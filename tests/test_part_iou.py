"""Part IoU against ground truth (pipeline/parts/iou.py): hand-made maps with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.parts.iou import part_confusion, part_iou, part_iou_from_confusion, class_part_iou, patch_majority, upsample_ids


def rows(*r: list[int]) -> np.ndarray:
    """One image per row, each a 1 x W map: ``rows([..], [..])`` -> ``[B, 1, W]`` int64."""
    return np.array(r, dtype=np.int64)[:, None, :]


def test_perfect_and_permuted_ids_score_one():
    truth = rows([0, 0, 1, 1, 2, 3, 3], [3, 3, 2, 2, 1, 0, 0])
    res = part_iou(truth.copy(), truth, num_ids=4, num_parts=3)
    assert res.miou == 1.0 and res.per_image_miou == 1.0
    np.testing.assert_array_equal(res.per_part, [1, 1, 1, 1])
    np.testing.assert_array_equal(res.match, [0, 1, 2, 3])
    perm = np.array([2, 0, 3, 1])  # true class j predicted as id perm[j]
    res = part_iou(torch.from_numpy(perm[truth]), torch.from_numpy(truth), num_ids=5, num_parts=3)  # id 4 unused
    assert res.miou == 1.0 and res.per_image_miou == 1.0
    np.testing.assert_array_equal(res.match, perm)
    assert (res.num_ids, res.num_parts) == (5, 3)


def test_merged_parts_exact_value():
    # id 0 covers part 1 (3 px) and part 2 (1 px); id 1 is exactly background
    res = part_iou(rows([1, 1, 0, 0, 0, 0]), rows([0, 0, 1, 1, 1, 2]), num_ids=2, num_parts=2)
    np.testing.assert_allclose(res.per_part, [1.0, 3 / 4, 0.0])  # part 2 left unmatched: 0
    np.testing.assert_array_equal(res.match, [1, 0, -1])
    assert res.miou == pytest.approx((3 / 4 + 0) / 2)


def test_empty_true_part_and_unused_id():
    # part 3 is never predicted (its pixels go to id 0) -> 0; id 3 is never used by the prediction
    res = part_iou(rows([0, 0, 1, 1, 2, 2, 0]), rows([0, 0, 1, 1, 2, 2, 3]), num_ids=4, num_parts=3)
    np.testing.assert_allclose(res.per_part, [2 / 3, 1, 1, 0])
    assert res.match[3] == 3 and res.iou[3].sum() == 0  # id 3 takes part 3 and scores nothing
    assert res.miou == pytest.approx(2 / 3)
    # a true part with no pixels anywhere is NaN and left out of the mean (not scored 0)
    res = part_iou(rows([0, 0, 1, 1]), rows([0, 0, 1, 1]), num_ids=3, num_parts=2)
    assert math.isnan(res.per_part[2]) and res.miou == 1.0


def test_fewer_ids_than_parts():
    # N=2 < P=3: id 1 covers parts 2 (2 px) and 3 (3 px) -> matched to 3 (IoU 3/5); part 2 scores 0
    res = part_iou(rows([0, 0, 1, 1, 1, 1, 1]), rows([1, 1, 2, 2, 3, 3, 3]), num_ids=2, num_parts=3)
    np.testing.assert_allclose(res.per_part[1:], [1, 0, 3 / 5])
    assert math.isnan(res.per_part[0])  # no background pixels
    assert res.miou == pytest.approx((1 + 0 + 3 / 5) / 3)


def test_more_ids_than_parts_extra_ids_ignored_but_in_unions():
    # part 1 split between ids 0 and 1: the better one is matched (2/4); id 1 is extra but its pixels are
    # still missing from part 1's intersection; id 2 is exactly background
    res = part_iou(rows([2, 0, 0, 1, 1]), rows([0, 1, 1, 1, 1]), num_ids=3, num_parts=1)
    assert res.miou == pytest.approx(1 / 2)
    assert set(res.match.tolist()) <= {0, 1, 2} and res.match[0] == 2


def test_background_is_matched_but_only_scored_on_request():
    # id 0: 2 background px; id 1: 1 background + 1 part px. Matching: id 0 -> background (2/3), id 1 -> part (1/2)
    pred, truth = rows([0, 0, 1, 1]), rows([0, 0, 0, 1])
    res = part_iou(pred, truth, num_ids=2, num_parts=1)
    np.testing.assert_allclose(res.per_part, [2 / 3, 1 / 2])
    np.testing.assert_array_equal(res.match, [0, 1])
    assert res.miou == pytest.approx(1 / 2)
    with_bg = part_iou(pred, truth, ignore_background=False, num_ids=2, num_parts=1)
    assert with_bg.miou == pytest.approx((2 / 3 + 1 / 2) / 2) and not with_bg.ignore_background
    # background pixels count in the union: one id over background and the part scores 3/4, not 1
    assert part_iou(rows([0, 0, 0, 0]), rows([0, 1, 1, 1]), num_ids=1, num_parts=1).miou == pytest.approx(3 / 4)
    # background competes for the ids: here the only id fits background better (3/4 vs 1/4), so the part gets 0
    res = part_iou(rows([0, 0, 0, 0]), rows([0, 0, 0, 1]), num_ids=1, num_parts=1)
    np.testing.assert_allclose(res.per_part, [3 / 4, 0])


def test_dataset_level_not_per_image():
    # image 1: id 0 covers part 1 and background; image 2: exact. Summed: id 0 = 6 px, part 1 = 4 px, both 4
    # -> IoU 4/6; image by image (same matching) it is 2/4 and 1 -> 3/4
    res = part_iou(rows([0, 0, 0, 0], [0, 0, 1, 1]), rows([1, 1, 0, 0], [1, 1, 0, 0]), num_ids=2, num_parts=1)
    assert res.miou == pytest.approx(2 / 3)
    assert res.per_image_miou == pytest.approx(3 / 4)
    np.testing.assert_array_equal(res.match, [1, 0])
    # batches concatenated = one call on the whole set
    conf = np.concatenate([part_confusion(rows([0, 0, 0, 0]), rows([1, 1, 0, 0]), 2, 1),
                           part_confusion(rows([0, 0, 1, 1]), rows([1, 1, 0, 0]), 2, 1)])  # fmt: skip
    assert part_iou_from_confusion(conf).miou == res.miou


def test_hungarian_beats_greedy():
    # IoU: id 0 -> part 1: 3/7 (the largest), id 0 -> part 2: 2/5, id 1 -> part 1: 2/5, id 1 -> part 2: 0.
    # Greedy takes 3/7 then 0 (mean 3/14); the optimal matching takes 2/5 + 2/5 (mean 2/5).
    res = part_iou(rows([0, 0, 0, 0, 0, 1, 1]), rows([1, 1, 1, 2, 2, 1, 1]), num_ids=2, num_parts=2)
    assert res.iou[0, 1] == pytest.approx(3 / 7) and res.iou.max() == res.iou[0, 1]
    np.testing.assert_array_equal(res.match[1:], [1, 0])
    assert res.miou == pytest.approx(2 / 5)


def test_random_prediction_scores_the_chance_value():
    # ids uniform over N=4, classes independent with shares q: E IoU = p q / (p + q - p q), p = 1/4
    rng = np.random.default_rng(0)
    q = np.array([0.4, 0.3, 0.2, 0.1])
    truth = rng.choice(4, p=q, size=(64, 128, 128))
    pred = rng.integers(0, 4, size=truth.shape)
    res = part_iou(pred, truth, num_ids=4, num_parts=3)
    chance = 0.25 * q / (0.25 + q - 0.25 * q)
    np.testing.assert_allclose(res.per_part, chance, atol=2e-3)
    assert res.miou == pytest.approx(chance[1:].mean(), abs=2e-3)


@pytest.mark.parametrize("pred, truth, kw, err, match", [
    (rows([0, 1]), rows([0, 1, 1]), {}, ValueError, "shape"),
    (rows([0, -1]), rows([0, 1]), {}, ValueError, "pred has a negative id"),
    (rows([0, 1]), rows([-1, 1]), {}, ValueError, "truth has a negative id"),
    (rows([0, 2]), rows([0, 1]), {}, ValueError, "pred has id 2 > 1.*num_ids=2"),
    (rows([0, 1]), rows([0, 2]), {}, ValueError, "truth has id 2 > 1.*num_parts=1"),
    (rows([0, 1]).astype(np.float32), rows([0, 1]), {}, TypeError, "pred: expected integer ids"),
    (np.array([0, 1]), np.array([0, 1]), {}, ValueError, r"pred: expected shape \[B, H, W\]"),
    (rows([0, 1]), rows([0, 1]), {"num_ids": 0}, ValueError, "num_ids=0: the number of predicted part ids"),
    (rows([0, 0]), rows([0, 0]), {"num_parts": 0}, ValueError, "num_parts=0: the number of true foreground parts"),
])  # fmt: skip
def test_bad_input_is_refused_with_a_clear_error(pred, truth, kw, err, match):
    with pytest.raises(err, match=match):
        part_iou(pred, truth, **{"num_ids": 2, "num_parts": 1, **kw})


def test_ids_at_the_top_of_the_range_are_accepted():
    res = part_iou(rows([0, 1, 2]), rows([0, 1, 2]), num_ids=3, num_parts=2)  # pred N-1, truth P
    assert res.miou == 1.0


# ---- several object classes: ids matched per class (class_part_iou), the oracle, patch ids on pixels ----

NAMES = ["background", "p1", "p2", "p3", "p4"]


def two_class_confusion(pred_b: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Image A (class 0): parts 1, 1, 2, 2 predicted 0, 0, 1, 1; image B (class 1): parts 3, 3, 4, 4 predicted
    ``pred_b``. The same two ids serve both classes."""
    pred = torch.tensor([[[0, 0, 1, 1]], [pred_b]])
    truth = torch.tensor([[[1, 1, 2, 2]], [[3, 3, 4, 4]]])
    return part_confusion(pred, truth, 2, 4), np.array([0, 1])


def test_class_part_iou_matches_ids_per_class():
    conf, labels = two_class_confusion([0, 0, 1, 1])
    res = class_part_iou(conf, labels, ["a", "b", "unused"], NAMES)
    # per class the ids are perfect; one matching for the whole set can give each id one part only:
    # id 0 ~ p1 (2 / (4 + 2 - 2) = 0.5), id 1 ~ p2 (0.5), p3 and p4 unmatched (0) -> 0.25
    assert res["miou"] == 1.0 and res["per_image_miou"] == 1.0 and res["miou_global"] == 0.25
    assert res["per_class"] == {"a": 1.0, "b": 1.0}  # a class without images is not listed
    assert res["per_part"] == {"p1": 1.0, "p2": 1.0, "p3": 1.0, "p4": 1.0}


def test_class_part_iou_merged_and_swapped_parts():
    conf, labels = two_class_confusion([0, 0, 0, 0])  # class b: both parts merged into one id
    res = class_part_iou(conf, labels, ["a", "b"], NAMES)
    # b: id 0 ~ p3 (2/4 = 0.5), id 1 has no pixel in b, so p4 scores 0 -> 0.25; a: 1.0; mean 0.625
    assert res["per_class"] == {"a": 1.0, "b": 0.25} and res["miou"] == 0.625
    assert res["per_part"] == {"p1": 1.0, "p2": 1.0, "p3": 0.5, "p4": 0.0}
    swapped, _ = two_class_confusion([1, 1, 0, 0])  # ids swapped in class b: still perfect per class
    assert class_part_iou(swapped, labels, ["a", "b"], NAMES)["miou"] == 1.0


def test_class_part_iou_refuses_mismatched_inputs():
    conf, labels = two_class_confusion([0, 0, 1, 1])
    with pytest.raises(ValueError, match="labels: expected one per image"):
        class_part_iou(conf, labels[:1], ["a", "b"], NAMES)
    with pytest.raises(ValueError, match="part_names: 4 names for 5"):
        class_part_iou(conf, labels, ["a", "b"], NAMES[:4])
    with pytest.raises(ValueError, match="no image of any class"):
        class_part_iou(conf, np.array([5, 6]), ["a", "b"], NAMES)


def test_patch_ids_spread_over_their_pixels_and_the_oracle_is_each_patchs_majority():
    ids = torch.tensor([[[0, 1], [2, 3]]])
    assert upsample_ids(ids, 4).tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]]
    truth = torch.tensor([[[1, 1, 2, 2],
                           [1, 3, 2, 0],
                           [0, 0, 4, 4],
                           [4, 4, 3, 3]]])  # fmt: skip
    # top-left: 1 x3; top-right: 2 x3; bottom-left: 0 and 4 tie (the lower id); bottom-right: 4 and 3 tie
    assert patch_majority(truth, 2, 5).tolist() == [[[1, 2], [0, 3]]]
