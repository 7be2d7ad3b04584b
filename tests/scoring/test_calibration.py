import numpy as np
import pytest

from fsad_pipeline.scoring.calibration import calibrate_threshold


def test_f1_max_separable():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    result = calibrate_threshold(labels, scores)
    assert result["method"] == "f1_max" and result["validation_f1"] == 1.0
    assert 0.3 < result["threshold"] <= 0.8


def test_false_alarm_rate():
    normals = np.linspace(0, 1, 101)
    labels = np.r_[np.zeros(101), np.ones(3)]
    scores = np.r_[normals, [2.0, 3.0, 4.0]]
    result = calibrate_threshold(labels, scores, method="false_alarm_rate", target_false_alarm_rate=0.1)
    assert result["validation_false_alarm_rate"] <= 0.1
    assert np.mean(normals >= result["threshold"]) == pytest.approx(0.099, abs=0.01)


def test_single_class_falls_back_to_false_alarm_rate():
    result = calibrate_threshold(np.zeros(20), np.arange(20.0), target_false_alarm_rate=0.05)
    assert result["method"] == "false_alarm_rate" and result["validation_false_alarm_rate"] <= 0.05


def test_unknown_method():
    with pytest.raises(ValueError, match="threshold method"):
        calibrate_threshold([0, 1], [0.0, 1.0], method="magic")
