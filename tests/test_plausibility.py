"""Plausibility flags: none on physiological trajectories, exactly the constructed violations
otherwise, readable reasons, and limits that refuse malformed input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from twin.errors import InputError
from twin.priors import Limits, check_trajectory, reasons
from twin.priors.growth import gompertz_solution
from twin.priors.plausibility import CHECKS

F64 = torch.float64
NAN = float("nan")

LIMITS = Limits.from_mapping({
    "ventricle_volume": {"low": 0.0, "direction": 1, "max_rate": 5.0, "unit": "mL"},
    "cognitive_score": {"low": 0.0, "high": 30.0, "direction": -1, "unit": "points"},
    "tumour_volume": {"low": 0.0, "max_rate": 50.0, "unit": "mL"},
})


def compliant():
    """Two subjects, the second with two visits (then padding): atrophy, decline, a growing tumour."""
    times = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.5, NAN, NAN]], dtype=F64)
    t = times.nan_to_num(0.0)
    y = torch.stack([20 + 2 * t, 29 - t, 10 + 20 * t], dim=-1)
    y[1, 2:] = NAN
    return y, times


def flagged(flags):
    return {check: [tuple(i) for i in flags[check].nonzero().tolist()] for check in CHECKS}


def test_no_flags_on_compliant_trajectories():
    y, times = compliant()
    flags = check_trajectory(y, times, LIMITS)
    assert set(flags) == set(CHECKS)
    assert all(f.shape == (2, 4, 3) and f.dtype == torch.bool for f in flags.values())
    assert not any(f.any() for f in flags.values())
    assert reasons(flags, y, times, LIMITS) == []


def test_no_flags_on_a_closed_form_growth_curve():
    times = torch.linspace(0, 5, 11, dtype=F64).expand(3, -1)
    y = gompertz_solution(times, torch.tensor([[0.1], [0.5], [0.9]], dtype=F64), torch.tensor([0.5, 1.0, 2.0], dtype=F64))
    limits = Limits(names=("burden",), low=(0.0,), high=(1.0,), direction=(1,), max_rate=(1.0,))
    assert not any(f.any() for f in check_trajectory(y, times, limits).values())


def test_each_constructed_violation_is_flagged_where_it_is_and_explained():
    y, times = compliant()
    y[0, 3, 0] = 20.9  # ventricles shrink from 24 to 20.9 in a year
    y[1, 0, 1] = 31.2  # a score above its maximum
    y[0, 2, 2] = 90.0  # tumour from 30 to 90 mL in a year, back to 70 a year later
    y[1, 1, 0] = NAN  # the model returned NaN where a value is due
    y[0, 1, 1] = -1.0  # a score below zero (and a steep fall: no rate limit on scores)
    flags = check_trajectory(y, times, LIMITS)
    assert flagged(flags) == {
        "not_finite": [(1, 1, 0)],
        "below_low": [(0, 1, 1)],
        "above_high": [(1, 0, 1)],
        "wrong_direction": [(0, 2, 1), (0, 3, 0)],  # the score may not rise from -1 back to 27
        "too_fast": [(0, 2, 2)],
    }
    assert reasons(flags, y, times, LIMITS, subjects=["sub-01", "sub-02"]) == [
        "sub-01, t = 1 y: cognitive_score: -1 below minimum 0 points",
        "sub-01, t = 2 y: cognitive_score: increases by 28 points/y where it must not increase",
        "sub-01, t = 2 y: tumour_volume: changes at +60 mL/y, beyond the physiological maximum 50 mL/y",
        "sub-01, t = 3 y: ventricle_volume: decreases by 3.1 mL/y where it must not decrease",
        "sub-02, t = 0 y: cognitive_score: 31.2 above maximum 30 points",
        "sub-02, t = 0.5 y: ventricle_volume: value is nan where a value is expected",
    ]


def test_mask_and_padding_are_not_flagged():
    y, times = compliant()
    y[0, 2, 0] = -5.0  # implausible, but at a time the caller does not ask about
    y[1, 3, :] = 1e9  # beyond the padded end of subject 2's times
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 2] = False
    flags = check_trajectory(y, times, LIMITS, mask=mask)
    assert not any(f.any() for f in flags.values())
    flags = check_trajectory(y, times, LIMITS)
    assert flagged(flags)["below_low"] == [(0, 2, 0)]


def test_round_off_against_the_direction_is_tolerated_with_atol():
    y, times = compliant()
    y[0, :, 0] = 24.0
    y[0, 3, 0] = 24.0 - 1e-9  # a plateau with solver noise
    assert flagged(check_trajectory(y, times, LIMITS))["wrong_direction"] == [(0, 3, 0)]
    assert not check_trajectory(y, times, LIMITS, atol=1e-6)["wrong_direction"].any()


def test_limits_refuse_malformed_input_naming_the_field():
    with pytest.raises(InputError, match=r"^limits: cognitive_score: unknown key\(s\) \['maximum'\]; expected some of "):
        Limits.from_mapping({"cognitive_score": {"maximum": 30}})
    with pytest.raises(InputError, match=r"^Limits: low: has 1 entries for 2 biomarkers \['a', 'b'\]$"):
        Limits(names=("a", "b"), low=(0.0,))
    with pytest.raises(InputError, match=r"^Limits: a: need low <= high \(inf for none\), got low=2.0, high=1.0$"):
        Limits(names=("a",), low=(2.0,), high=(1.0,))
    with pytest.raises(InputError, match=r"^Limits: a: direction must be -1, 0 or \+1, got 2$"):
        Limits(names=("a",), direction=(2,))
    with pytest.raises(InputError, match=r"^Limits: a: max_rate must be > 0"):
        Limits(names=("a",), max_rate=(0.0,))
    with pytest.raises(InputError, match=r"^Limits: names: need distinct biomarker names"):
        Limits(names=("a", "a"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        LIMITS.low = (0.0, 0.0, 0.0)


def test_limits_fill_unset_fields_with_no_limit():
    limits = Limits(names=["a", "b"], high=[1, 2])
    assert limits.names == ("a", "b") and limits.high == (1.0, 2.0)
    assert limits.low == (-math.inf, -math.inf) and limits.direction == (0, 0) and limits.max_rate == (math.inf, math.inf)
    with pytest.raises(ValueError, match=r"D=2 biomarkers \['a', 'b'\], got \(1, 4, 3\)"):
        check_trajectory(torch.zeros(1, 4, 3), torch.zeros(1, 4), limits)
