"""NCAccumulator: many batches equal one call; all_reduce over 2 gloo processes equals one process."""
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pfc_fast

from conftest import assert_metrics_close, make_features, seed_for


def _feed(acc, feats, labels, order, batch, predictions=None):
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        acc.update(feats[idx], labels[idx], None if predictions is None else predictions[idx])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batches_equal_whole(device, dtype):
    feats, labels = make_features(3000, 48, 12, seed=21, device=device, dtype=dtype, absent=(4,))
    gen = torch.Generator().manual_seed(22)
    weight, bias = torch.randn(12, 48, generator=gen).to(device), torch.randn(12, generator=gen).to(device)
    whole = pfc_fast.nc_metrics(feats, labels, num_classes=12, classifier=weight, bias=bias)
    acc = pfc_fast.NCAccumulator(12, classifier=weight, bias=bias)
    _feed(acc, feats, labels, torch.randperm(3000, generator=gen).to(device), batch=97)
    acc.next_pass()
    _feed(acc, feats, labels, torch.randperm(3000, generator=gen).to(device), batch=256)  # another order
    batched = acc.compute()
    assert_metrics_close(batched, whole.to_dict(), rtol=1e-10)


def test_predictions_in_second_pass(device):
    feats, labels = make_features(1000, 20, 5, seed=23, device=device)
    predictions = (labels + (torch.arange(1000, device=device) % 7 == 0)) % 5
    whole = pfc_fast.nc_metrics(feats, labels, predictions=predictions)
    acc = pfc_fast.NCAccumulator(5)
    _feed(acc, feats, labels, torch.arange(1000, device=device), 300)
    acc.next_pass()
    _feed(acc, feats, labels, torch.arange(1000, device=device), 300, predictions)
    assert_metrics_close(acc.compute(), whole.to_dict(), rtol=1e-10)


def test_missing_decisions_give_no_nc4():
    feats, labels = make_features(400, 6, 3, seed=24)
    acc = pfc_fast.NCAccumulator(3)
    acc.update(feats, labels)
    acc.next_pass()
    acc.update(feats[:200], labels[:200], predictions=labels[:200])
    acc.update(feats[200:], labels[200:])  # no decision source for this batch
    assert acc.compute().nc4 is None


def test_pass_protocol_errors():
    feats, labels = make_features(100, 4, 3, seed=25)
    acc = pfc_fast.NCAccumulator(3)
    with pytest.raises(ValueError, match="no data"):
        acc.next_pass()
    with pytest.raises(RuntimeError, match="both passes"):
        acc.compute()
    with pytest.raises(ValueError, match="second pass"):
        acc.update(feats, labels, predictions=labels)
    acc.update(feats, labels)
    acc.next_pass()
    acc.update(feats[:50], labels[:50])
    with pytest.raises(ValueError, match=r"per-class sample counts differ \(class 0: \d+ then \d+"):
        acc.compute()
    with pytest.raises(ValueError, match="D = 5"):
        acc.update(torch.randn(10, 5), labels[:10])
    with pytest.raises(RuntimeError, match="torch.distributed"):
        acc.all_reduce()


def _rank_main(rank, world, init_file, shards, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        feats, labels, weight, ood = shards[rank]
        acc = pfc_fast.NCAccumulator(8, classifier=weight)
        acc.update(feats, labels)
        if ood is not None:
            acc.update_ood(ood)
        acc.all_reduce()
        acc.next_pass()
        acc.update(feats, labels)
        acc.all_reduce()
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as handle:
            pickle.dump(acc.compute().to_dict(), handle)
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_processes(tmp_path):
    feats, labels = make_features(2000, 24, 8, seed=26, absent=(2,))
    weight = torch.randn(8, 24, generator=torch.Generator().manual_seed(27))
    ood = torch.randn(300, 24, generator=torch.Generator().manual_seed(28)) + 0.5
    whole = pfc_fast.nc_metrics(feats, labels, num_classes=8, classifier=weight, ood_feats=ood)
    # unequal shards; the out-of-distribution features all on rank 1 (rank 0 reduces zeros)
    shards = [(feats[:700], labels[:700], weight, None), (feats[700:], labels[700:], weight, ood)]
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), shards, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as handle:
            result = pickle.load(handle)
        assert result["nc5"] is not None
        assert_metrics_close(pfc_fast.NCMetrics(**result), whole.to_dict(), rtol=1e-10)


def test_second_pass_of_other_samples_with_the_same_counts():
    """The second pass of other samples with the same per-class counts is caught by the
    fingerprint, and so is one sample of a class replaced by another of that class."""
    feats, labels = make_features(300, 20, 4, seed=seed_for("fingerprint"), dtype=torch.float64)
    others, _ = make_features(300, 20, 4, seed=seed_for("fingerprint", "others"), dtype=torch.float64)
    swapped = feats.clone()
    first_of_class_1 = int((labels == 1).nonzero()[0])
    swapped[first_of_class_1] = others[first_of_class_1]
    for second in (others, swapped):
        acc = pfc_fast.NCAccumulator(4)
        acc.update(feats, labels)
        acc.next_pass()
        acc.update(second, labels)
        with pytest.raises(ValueError, match=r"same counts but other feature values in class\(es\) \[.*1"):
            acc.compute()
    acc = pfc_fast.NCAccumulator(4)  # the same samples in another order and other batches pass
    _feed(acc, feats, labels, torch.arange(300), 64)
    acc.next_pass()
    _feed(acc, feats, labels, torch.randperm(300, generator=torch.Generator().manual_seed(seed_for("fp"))), 50)
    assert_metrics_close(acc.compute(), pfc_fast.reference.nc_metrics(feats, labels), rtol=1e-9)


def test_update_after_compute_and_reset():
    feats, labels = make_features(200, 6, 3, seed=seed_for("reset"), dtype=torch.float64)
    acc = pfc_fast.NCAccumulator(3)
    acc.update(feats, labels)
    acc.next_pass()
    acc.update(feats, labels)
    first = acc.compute()
    with pytest.raises(RuntimeError, match=r"update\(\) after compute\(\); call reset\(\)"):
        acc.update(feats, labels)
    acc.reset()
    assert acc.current_pass == 1
    other, other_labels = make_features(150, 6, 3, seed=seed_for("reset", 2), dtype=torch.float64)
    acc.update(other, other_labels)
    acc.next_pass()
    acc.update(other, other_labels)
    assert acc.compute().num_samples == 150 and first.num_samples == 200
    assert_metrics_close(acc.compute(), pfc_fast.reference.nc_metrics(other, other_labels), rtol=1e-9)


def test_repr_follows_the_passes():
    feats, labels = make_features(90, 7, 3, seed=seed_for("repr"), dtype=torch.float64)
    acc = pfc_fast.NCAccumulator(3)
    states = [repr(acc)]
    acc.update(feats[:40], labels[:40])
    states.append(repr(acc))
    acc.update(feats[40:], labels[40:])
    acc.next_pass()
    acc.update(feats[:25], labels[:25])
    states.append(repr(acc))
    acc.update(feats[25:], labels[25:])
    acc.compute()
    states.append(repr(acc))
    assert states == ["NCAccumulator(num_classes=3, pass=1, samples=0, D=None)",
                      "NCAccumulator(num_classes=3, pass=1, samples=40, D=7)",
                      "NCAccumulator(num_classes=3, pass=2, samples=25 of 90, D=7)",
                      "NCAccumulator(num_classes=3, computed, samples=90 of 90, D=7)"]
    acc.reset()
    assert repr(acc) == states[0]
    for text in states:
        assert len(text) < 200 and "0x" not in text and "tensor(" not in text
