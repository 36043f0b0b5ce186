"""The benchmark baselines compute the same numbers as pfc_fast.reference, so speed-ups are
never measured against a wrong baseline."""
import pytest

from benchmarks.baselines import published_nc_metrics
from pfc_fast import reference

from conftest import make_features


def test_published_baseline_matches_reference(device):
    feats, labels = make_features(1500, 40, 6, seed=51, device=device, balanced=True)
    ours = published_nc_metrics(feats, labels, 6, batch_size=256)
    ref = reference.nc_metrics(feats.double(), labels)
    for name, value in ours.items():
        assert value == pytest.approx(ref[name], rel=1e-9), name
