"""trainer.report_to: metrics read back from the trackers' own local files (nothing is sent)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from mmopd.config import ConfigError, TrainConfig, load_config
from mmopd.training import tracking
from mmopd.training.loop import train


def _train(overrides, extra) -> Path:
    cfg = load_config(TrainConfig, None, [*overrides, "eval.num_problems=2", "eval.pass_k=0",
                                          *extra])
    return Path(train(cfg)["run_dir"])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tensorboard_events_hold_the_loss_eval_accuracy_and_config(tiny_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _train(tiny_overrides, [f"trainer.output_dir={tmp_path / 'tb'}",
                                  "trainer.report_to=tensorboard", "eval.every=1"])
    logdir = run / "tensorboard" / "mmopd"
    (events,) = logdir.glob("events.out.tfevents.*")  # hparams go to a subfolder of their own
    acc = EventAccumulator(str(logdir)).Reload()
    tags = acc.Tags()["scalars"]
    metrics = _rows(run / "metrics.jsonl")
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [r["step"] for r in metrics] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in metrics], rel=1e-6)
    evals = _rows(run / "eval.jsonl")
    assert [e.value for e in acc.Scalars("eval/accuracy")] == pytest.approx(
        [r["accuracy"] for r in evals])
    assert {"env_reward", "kept_frac", "train_tokens_per_s"} <= set(tags)
    (hparams,) = logdir.rglob("hparams.yml")  # the resolved config
    hparams = hparams.read_text()
    assert "trainer.report_to: tensorboard" in hparams and "objective.name: reopold" in hparams
    assert (run / "curves.png").is_file()  # kept beside the trackers


def test_wandb_offline_writes_its_local_run(tiny_overrides, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (the dev extra has it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _train(tiny_overrides, [f"trainer.output_dir={tmp_path / 'wb'}",
                                  "trainer.report_to=[wandb]"])
    (offline,) = (run / "wandb").glob("offline-run-*")
    (record,) = offline.glob("run-*.wandb")  # the offline run: every log call and the config
    keys = (b"loss", b"kept_frac", b"eval/accuracy", b"objective.name", b"reopold")
    deadline = time.monotonic() + 60  # wandb's writer process may still be flushing the
    while time.monotonic() < deadline:  # records after finish() returns, on a loaded machine
        data = record.read_bytes()
        if all(key in data for key in keys):
            break
        time.sleep(0.5)
    for key in keys:
        assert key in data, key


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None,
                    reason="trackio is not installed: it pins pillow<13, so it is in the track "
                    "extra (pip install 'mmopd[track]'), not the test environment")
def test_trackio_writes_its_local_store(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    _train(tiny_overrides, [f"trainer.output_dir={tmp_path / 'tr'}", "trainer.report_to=trackio"])
    assert any((tmp_path / "trackio").rglob("*"))


def test_report_to_choices_and_missing_packages(monkeypatch):
    assert tracking.resolve_report_to("none") == []
    assert tracking.resolve_report_to("auto") == ["tensorboard"]  # installed by the dev extra
    assert tracking.resolve_report_to("tensorboard,wandb") == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"trainer.report_to: unknown tracker\(s\) \['neptune'\]"):
        load_config(TrainConfig, None, ["model.path=m", "trainer.report_to=[tensorboard, neptune]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(ConfigError, match=r"mlflow is not installed: pip install mlflow-skinny "
                       r"\(or pip install 'mmopd\[track\]'"):
        load_config(TrainConfig, None, ["model.path=m", "trainer.report_to=mlflow"])
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    assert tracking.resolve_report_to("auto") == []  # no tensorboard: no tracker, no error
