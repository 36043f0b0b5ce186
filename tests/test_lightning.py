"""PFCCallback with a real Lightning Trainer on the CPU: the metrics logged to CSVLogger and
TensorBoardLogger equal an independent PFCMonitor measurement of the trained model; the epochs
measured; ModelCheckpoint on a metric and resuming from it; a classifier read from the module;
degenerate values; the results as a frame and a figure; bad arguments; the missing extra; two
ddp_spawn processes (gloo) equal one; the probe sets refused under torch.distributed."""
import copy
import csv
import datetime
import importlib
import math
import os
import pickle
import sys
import types

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import pfc_fast  # noqa: E402
from pfc_fast.lightning import PFCCallback
from lightning.pytorch.plugins.precision import Precision  # noqa: E402

from conftest import assert_metrics_close, seed_for  # noqa: E402

LAYERS = ["net.stem", "net.blocks.0", "net.blocks.1"]


class _Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _Net(nn.Module):
    """A 2-block residual CNN: 8x8 images, 4 channels, 3 classes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.Sequential(_Block(4), _Block(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class _Module(pl.LightningModule):
    def __init__(self, net=None):
        super().__init__()
        self.net = _Net() if net is None else net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data(n, seed, same_as_class_0=()):
    """Images whose mean grows with the label; the classes in ``same_as_class_0`` get class 0's images."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randn(n, 1, 8, 8, generator=gen) + labels.float()[:, None, None, None]
    for c in same_as_class_0:
        images[labels == c] = images[labels == 0]
    return images, labels


def _setup(name, net=None):
    """A seeded module, a train loader (48 samples, no shuffling) and a probe DataLoader of 30 (4 batches)."""
    torch.manual_seed(seed_for(name, "model"))
    train = DataLoader(TensorDataset(*_data(48, seed_for(name, "train"))), batch_size=16)
    probe = DataLoader(TensorDataset(*_data(30, seed_for(name, "probe"))), batch_size=8)
    return _Module(net), train, probe


def _trainer(**options):
    kwargs = dict(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**kwargs, **options})


def _csv_rows(logger):
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        return list(csv.DictReader(handle))


def _tensorboard(logger):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    return events


def _count_measurements(monkeypatch):
    """The calls of PFCMonitor.measure from now on (a list that grows by one per call)."""
    calls = []
    measure = pfc_fast.PFCMonitor.measure
    monkeypatch.setattr(pfc_fast.PFCMonitor, "measure", lambda self, *a, **k: calls.append(1) or measure(self, *a, **k))
    return calls


def test_logs_every_layer_to_csv_and_tensorboard_as_measured_independently(tmp_path):
    pytest.importorskip("tensorboard")
    module, train, probe = _setup("loggers")
    pfc = PFCCallback(probe, num_classes=3, layers=LAYERS)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer = _trainer(logger=loggers, callbacks=[pfc], log_every_n_steps=1)
    trainer.fit(module, train)
    assert list(pfc.results) == [0, 1]
    expected = pfc_fast.PFCMonitor(module, layers=LAYERS, num_classes=3).measure(probe)
    assert list(pfc.results[1].layers) == LAYERS
    for name, metrics in expected.layers.items():
        assert_metrics_close(pfc.results[1].layers[name], metrics.to_dict(), rtol=1e-12)
    assert pfc.results[1].accuracy == expected.accuracy

    rows = [row for row in _csv_rows(loggers[0]) if row.get("pfc/net.stem/nc1")]
    assert [int(row["epoch"]) for row in rows] == [0, 1]
    events = _tensorboard(loggers[1])
    for epoch, row in enumerate(rows):
        scalars = pfc.results[epoch].to_scalars()
        assert "pfc/net.blocks.1/nc1" in scalars and "pfc/net.stem/nc4" in scalars and "pfc/accuracy" in scalars
        for tag, value in scalars.items():  # every layer's every metric, in Lightning's float32
            assert float(row[tag]) == pytest.approx(value, rel=1e-6), tag
            assert events.Scalars(tag)[epoch].value == pytest.approx(value, rel=1e-6), tag
    steps = [event.step for event in events.Scalars("pfc/net.stem/nc1")]
    assert steps == [int(row["step"]) for row in rows] and steps[0] < steps[1]
    assert trainer.callback_metrics["pfc/net.blocks.1/nc1"].item() == pytest.approx(expected.layers["net.blocks.1"].nc1,
                                                                                  rel=1e-6)


def test_every_n_epochs_measures_only_those_epochs_and_not_the_sanity_check(monkeypatch):
    module, train, probe = _setup("every-n")
    calls = _count_measurements(monkeypatch)
    pfc = PFCCallback(probe, num_classes=3, layers=LAYERS, every_n_epochs=2)
    trainer = _trainer(max_epochs=3, callbacks=[pfc], num_sanity_val_steps=1)
    trainer.fit(module, train, val_dataloaders=probe)
    assert list(pfc.results) == [1] and len(calls) == 1
    assert "pfc/net.stem/nc1" in trainer.callback_metrics


def test_checkpoints_monitor_a_metric_and_resuming_keeps_the_results(tmp_path, monkeypatch):
    module, train, probe = _setup("resume")
    first = PFCCallback(probe, num_classes=3, layers=LAYERS)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="pfc/net.blocks.1/nc1", save_top_k=-1, save_last=True)
    _trainer(callbacks=[first, checkpoint], enable_checkpointing=True).fit(module, train)
    nc1 = [first.results[epoch].layers["net.blocks.1"].nc1 for epoch in (0, 1)]
    assert checkpoint.best_model_score.item() == pytest.approx(min(nc1), rel=1e-6)
    assert f"epoch={nc1.index(min(nc1))}" in checkpoint.best_model_path
    saved = torch.load(checkpoint.last_model_path, weights_only=True)["callbacks"]["PFCCallback{'prefix': 'pfc'}"]
    assert saved == first.state_dict() and [entry["epoch"] for entry in saved["results"]] == [0, 1]  # plain data

    resumed = PFCCallback(probe, num_classes=3, layers=LAYERS)
    calls = _count_measurements(monkeypatch)
    _trainer(max_epochs=3, callbacks=[resumed]).fit(_setup("resume")[0], train, ckpt_path=checkpoint.last_model_path)
    assert list(resumed.results) == [0, 1, 2] and len(calls) == 1  # epochs 0 and 1 from the checkpoint
    for epoch in (0, 1):
        ours, theirs = resumed.results[epoch], first.results[epoch]
        assert ours.to_list() == theirs.to_list()
        assert (ours.accuracy, ours.forward_passes) == (theirs.accuracy, theirs.forward_passes)
    assert resumed.state_key == "PFCCallback{'prefix': 'pfc'}"
    assert repr(resumed) == ("PFCCallback(num_classes=3, layers: net.stem, net.blocks.0, net.blocks.1, "
                             "every_n_epochs=1, pooling='flatten', 3 result(s))")


def test_a_classifier_function_is_read_at_each_measurement():
    module, train, probe = _setup("classifier")
    seen = []

    def classifier(pl_module):
        seen.append(pl_module.net.fc.weight.detach().clone())
        return pl_module.net.fc

    pfc = PFCCallback(probe, num_classes=3, layers=LAYERS, pooling="gap", classifier=classifier, prefix="probe")
    trainer = _trainer(callbacks=[pfc])
    trainer.fit(module, train)
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])  # the weights of each epoch's end
    expected = pfc_fast.PFCMonitor(module, layers=LAYERS, num_classes=3, pooling="gap").measure(probe, module.net.fc)
    for name, metrics in expected.layers.items():
        assert metrics.nc3 is not None  # every layer has 4 channels, the classifier's width
        assert_metrics_close(pfc.results[1].layers[name], metrics.to_dict(), rtol=1e-12)
    assert "probe/net.blocks.1/nc3" in trainer.callback_metrics and "pfc/accuracy" not in trainer.callback_metrics


def test_infinite_values_reach_the_loggers(tmp_path):
    """Classes 0 and 1 of the probe share their images, so every layer has two equal class means:
    cdnv = inf. Both loggers take it."""
    pytest.importorskip("tensorboard")
    module, train, _ = _setup("inf")
    probe = [(x, y) for x, y in DataLoader(TensorDataset(*_data(30, seed_for("inf", "probe"), (1,))), batch_size=10)]
    pfc = PFCCallback(probe, num_classes=3, layers=LAYERS)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    _trainer(max_epochs=1, logger=loggers, callbacks=[pfc]).fit(module, train)
    assert pfc.results[0].layers["net.stem"].cdnv == math.inf
    [row] = [row for row in _csv_rows(loggers[0]) if row.get("pfc/net.stem/cdnv")]
    assert float(row["pfc/net.stem/cdnv"]) == math.inf
    assert _tensorboard(loggers[1]).Scalars("pfc/net.stem/cdnv")[0].value == math.inf


def test_results_as_a_frame_and_a_figure():
    module, train, probe = _setup("frame")
    pfc = PFCCallback(probe, num_classes=3, layers={"stem": "net.stem", "block 1": "net.blocks.0",
                                                    "block 2": "net.blocks.1"})
    with pytest.raises(ValueError, match="no results yet"):
        pfc.plot()
    _trainer(callbacks=[pfc]).fit(module, train)
    pandas = pytest.importorskip("pandas")
    frame = pfc.to_frame()
    assert isinstance(frame, pandas.DataFrame) and frame.index.names == ["epoch", "layer"]
    assert list(frame.index) == [(e, name) for e in (0, 1) for name in ("stem", "block 1", "block 2")]
    assert frame.loc[(1, "block 2"), "nc1"] == pfc.results[1].layers["block 2"].nc1
    figure = pfc.plot()
    axes = figure.axes
    assert [axis.get_ylabel() for axis in axes] == ["PFC1 = nc1", "PFC2 = nc2_etf", "PFC3 = nc4"]
    assert axes[0].get_yscale() == "log" and axes[1].get_yscale() == "linear"
    assert [len(axis.get_lines()) for axis in axes] == [2, 2, 2]
    assert all(line.get_marker() == "o" for line in axes[0].get_lines())
    assert [label.get_text() for label in axes[0].get_xticklabels()] == ["stem", "block 1", "block 2"]
    assert list(axes[0].get_lines()[1].get_ydata()) == [m.nc1 for m in pfc.results[1].layers.values()]
    with pytest.raises(ValueError, match="metrics must be one of"):
        pfc.plot(["pfc1"])


def test_bad_arguments():
    probe = [_data(6, 0)]
    with pytest.raises(TypeError, match="probe_loader must be a re-iterable .* not iterable"):
        PFCCallback(3, num_classes=3)
    with pytest.raises(TypeError, match="one-shot iterator"):
        PFCCallback(iter(probe), num_classes=3)
    with pytest.raises(TypeError, match="num_classes must be an integer"):
        PFCCallback(probe, num_classes=3.0)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        PFCCallback(probe, num_classes=1)
    for every in (0, -1):
        with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
            PFCCallback(probe, num_classes=3, every_n_epochs=every)
    with pytest.raises(TypeError, match="every_n_epochs must be an integer"):
        PFCCallback(probe, num_classes=3, every_n_epochs=True)
    with pytest.raises(ValueError, match="pooling must be one of"):
        PFCCallback(probe, num_classes=3, pooling="max")
    with pytest.raises(TypeError, match="prefix must be a str"):
        PFCCallback(probe, num_classes=3, prefix=None)
    for prefix in ("", "pfc/"):
        with pytest.raises(ValueError, match="prefix must be a non-empty name"):
            PFCCallback(probe, num_classes=3, prefix=prefix)
    for classifier in (nn.Sequential(nn.Linear(4, 3)), "fc"):
        with pytest.raises(TypeError, match="classifier must be None, an nn.Linear"):
            PFCCallback(probe, num_classes=3, classifier=classifier)
    with pytest.raises(TypeError, match="monitor_options .*unexpected keyword argument 'cache'"):
        PFCCallback(probe, num_classes=3, cache=0)
    with pytest.raises(TypeError, match="monitor_options .*multiple values for argument 'model'"):
        PFCCallback(probe, num_classes=3, model=nn.Linear(1, 3))
    module, train, probe = _setup("bad-layers")
    steps = []
    module.training_step = lambda batch, batch_idx: steps.append(1)
    with pytest.raises(ValueError, match="layers: 'net.nope' is not a module"):  # at fit start, before a step
        _trainer(callbacks=[PFCCallback(probe, num_classes=3, layers=["net.nope"])]).fit(module, train)
    assert steps == []


def test_without_lightning_the_import_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)  # what `import lightning` finds uninstalled
    monkeypatch.delitem(sys.modules, "pfc_fast.lightning")
    with pytest.raises(ImportError, match=r"needs lightning.*pip install lightning.*pfc_fast\[lightning\]"):
        importlib.import_module("pfc_fast.lightning")


def test_default_layers_find_the_resnet_inside_the_lightning_module(tmp_path):
    """layers=None on a LightningModule wrapping a ResNet: its stem and blocks, named without the
    wrapper's ``net.``."""
    from pfc_fast.app.models import small_image_resnet

    torch.manual_seed(seed_for("defaults"))
    module, train, probe = _setup("defaults", net=small_image_resnet("resnet18", 3, in_channels=1, width=2))
    pfc = PFCCallback(probe, num_classes=3)
    logger = CSVLogger(tmp_path)
    _trainer(max_epochs=1, callbacks=[pfc], logger=logger).fit(module, train)
    names = ["stem"] + [f"layer{stage}.{block}" for stage in range(1, 5) for block in range(2)]
    assert list(pfc.results[0].layers) == names
    [row] = [row for row in _csv_rows(logger) if row.get("pfc/stem/nc1")]
    assert float(row["pfc/layer4.1/nc1"]) == pytest.approx(pfc.results[0].layers["layer4.1"].nc1, rel=1e-6)


class _SaveResults(pl.Callback):
    """Writes each rank's PFCCallback state (the results) to ``folder/rank{r}.pkl`` at the end of training."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        [pfc] = [callback for callback in trainer.callbacks if isinstance(callback, PFCCallback)]
        with open(f"{self.folder}/rank{trainer.global_rank}.pkl", "wb") as handle:
            pickle.dump(pfc.state_dict(), handle)


def test_two_ddp_spawn_processes_equal_one(tmp_path):
    """ddp_spawn on 2 CPU processes (gloo): each rank measures 2 of the probe's 4 batches (8, 8, 8, 6
    samples), BatchNorm statistics of rank 0; every rank holds and logs the metrics of one process
    measuring the whole probe set (the model returned to this process is rank 0's)."""
    module, train, probe = _setup("ddp")
    logger = CSVLogger(tmp_path, name="csv", version=0)  # the main process would number its own
    trainer = _trainer(max_epochs=1, strategy="ddp_spawn", devices=2, logger=logger,
                       callbacks=[PFCCallback(probe, num_classes=3, layers=LAYERS), _SaveResults(tmp_path)])
    trainer.fit(module, train)
    expected = pfc_fast.PFCMonitor(module, layers=LAYERS, num_classes=3).measure(probe)
    for rank in (0, 1):
        pfc = PFCCallback(probe, num_classes=3)
        with open(tmp_path / f"rank{rank}.pkl", "rb") as handle:
            pfc.load_state_dict(pickle.load(handle))
        result = pfc.results[0]
        assert result.accuracy == expected.accuracy
        for name, metrics in expected.layers.items():
            assert result.layers[name].num_samples == 30
            # the permutation null permutes within each rank's batches: not one process's null
            assert_metrics_close(result.layers[name], {**metrics.to_dict(), "null_mean": None}, rtol=1e-9)
    [row] = [row for row in _csv_rows(logger) if row.get("pfc/net.stem/nc1")]
    for tag, value in expected.to_scalars().items():
        if "_null_" not in tag:
            assert float(row[tag]) == pytest.approx(value, rel=1e-6), tag
    assert float(row["pfc/net.stem/nc1_null_mean"]) > 0
    assert trainer.callback_metrics["pfc/net.blocks.1/num_samples"].item() == 30


class _NoLength:
    """Re-iterable batches without a len()."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _shard_checks_main(rank, world, init_file, out_dir, module, batches):
    """Each rank (the same module, the probe's 4 batches): the probe sets the callback refuses under
    torch.distributed (every rank raising the same error, none left waiting), then one it measures,
    with rank 1's BatchNorm statistics its own again afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        module = copy.deepcopy(module)  # torch.multiprocessing hands the ranks one shared copy of its tensors
        probe = DataLoader(TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])),
                           batch_size=8, shuffle=True)
        epoch_end = types.SimpleNamespace(current_epoch=0)
        fit_start = types.SimpleNamespace(precision_plugin=Precision())  # float32: the inputs as they are
        errors = []
        for loader in (batches[:1], batches[:3 - rank], probe, _NoLength(batches)):
            pfc = PFCCallback(loader, num_classes=3, layers=LAYERS)
            pfc.on_fit_start(fit_start, module)
            try:
                pfc.on_train_epoch_end(epoch_end, module)
            except (TypeError, ValueError) as error:
                errors.append(f"{type(error).__name__}: {error}")
        pfc = PFCCallback(batches, num_classes=3, layers=LAYERS)
        pfc.on_fit_start(fit_start, module)
        bn = module.net.stem[1]
        with torch.no_grad():
            bn.running_var.add_(rank)
        own = bn.running_var.clone()
        result = pfc._measure(module)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as handle:
            pickle.dump((errors, result.to_list(), torch.equal(bn.running_var, own)), handle)
    finally:
        dist.destroy_process_group()


def test_the_probe_sets_refused_under_torch_distributed(tmp_path):
    module, _, probe = _setup("shard-checks")
    mp.spawn(_shard_checks_main, args=(2, str(tmp_path / "init"), str(tmp_path), module, list(probe)), nprocs=2,
             join=True)
    expected = pfc_fast.PFCMonitor(module, layers=LAYERS, num_classes=3).measure(probe)  # rank 0's statistics
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as handle:
            errors, layers, buffers_kept = pickle.load(handle)
        assert len(errors) == 4
        assert errors[0].startswith("ValueError: probe_loader has 1 batch(es) for 2 ranks") and ">= 2" in errors[0]
        assert errors[1] == ("ValueError: probe_loader has 2 to 3 batches on the ranks: every rank must hold the "
                             "same probe set")
        assert errors[2].startswith("ValueError: probe_loader has a RandomSampler")
        assert errors[3].startswith("TypeError: probe_loader must have a len() under torch.distributed")
        assert buffers_kept
        for ours, theirs in zip(layers, expected.layers.values()):
            assert ours["num_samples"] == 30
            assert_metrics_close(pfc_fast.NCMetrics(**{k: v for k, v in ours.items() if k != "name"}),
                                 {**theirs.to_dict(), "null_mean": None}, rtol=1e-9)


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_probe_batches_take_the_trainers_precision(precision):
    """The probe inputs go through the precision plugin, as the training batches do (float32 probe
    images into a bfloat16 or float64 network failed at the first epoch's end)."""
    module, train, probe = _setup(f"precision {precision}")
    pfc = PFCCallback(probe, num_classes=3, layers=LAYERS, null_permutations=0)
    _trainer(max_epochs=1, precision=precision, callbacks=[pfc]).fit(module, train)
    assert pfc.results[0].layers["net.blocks.1"].num_samples == 30
