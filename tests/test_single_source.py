"""Values computed in one place: the run folder (loop, Train node, CLI) and the caption preview (node, CLI)."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from trainer.config import TrainConfig
from trainer.errors import CrucibleError
from trainer.fileio import safe_name
from trainer.run_paths import run_paths


def test_run_paths_confine_the_run_name(tmp_path):
    cfg = TrainConfig.from_dict({"save": {"output_dir": str(tmp_path / "loras"), "work_dir": str(tmp_path / "work"),
                                          "run_name": "../escape: v1"}})
    paths = run_paths(cfg.save)
    assert paths.name == safe_name("../escape: v1") == "_escape_ v1"
    assert paths.run_dir.parent == tmp_path / "loras" and paths.work_dir.parent == tmp_path / "work"
    assert paths.state_dir == paths.work_dir / "state" and paths.logs_dir == paths.work_dir / "logs"
    beside = run_paths(cfg.save.__class__(output_dir=str(tmp_path / "loras"), run_name="r"))
    assert beside.work_dir == beside.run_dir == tmp_path / "loras" / "r"
    with pytest.raises(CrucibleError, match="run_name"):
        run_paths(cfg.save.__class__(run_name="///"), "run_name")


def test_cli_tensorboard_logs_go_to_the_run_folder_the_loop_uses(tmp_path, monkeypatch):
    """The CLI used to join the raw run name: a name with a '/' put the logs outside the run's folder."""
    import trainer.loop
    import trainer.tb
    from trainer.cli import main

    logs = []
    monkeypatch.setattr(trainer.tb, "TensorBoardCallbacks", lambda log_dir: logs.append(Path(log_dir)) or None)
    seen = []

    def fake_train(cfg, callbacks, resume_from=None, force_resume=False):
        seen.append(cfg)
        return types.SimpleNamespace(run_dir=run_paths(cfg.save).run_dir, checkpoints=[], cancelled=False,
                                     state_dir=None)

    monkeypatch.setattr(trainer.loop, "train", fake_train)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"save": {"output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
                                           "run_name": "style/v2"}}))
    assert main(["train", str(config), "--tensorboard"]) == 0
    assert logs == [run_paths(seen[0].save).logs_dir]
    assert logs[0].parent.parent == tmp_path / "work"  # one folder level: the run's, not work/style/v2


def test_cli_preview_shows_the_text_cache_variants_training_uses(demo_dataset, tmp_path, capsys):
    """With cache_text_embeddings on, training draws each caption from K cached variants: the CLI preview (like the
    node) shows those, not a fresh shuffle per epoch."""
    from trainer.cache import TextCache
    from trainer.cli import main
    from trainer.dataset import DataSource

    data = {"datasets": [{"path": str(demo_dataset), "captions": {"shuffle_caption": True}}],
            "training": {"seed": 3, "cache_text_embeddings": True, "caption_variants": 2}}
    config = tmp_path / "run.json"
    config.write_text(json.dumps(data))
    assert main(["preview", str(config), "--images", "1", "--epochs", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    cfg = TrainConfig.from_dict(data)
    cache = TextCache(DataSource(cfg.datasets, seed=3), 2, encode=None)
    assert [r["caption"] for r in rows] == [cache.caption_for(0, e, 0) for e in (1, 2, 3)]
    assert main(["preview", str(config), "--images", "1", "--epochs", "1"]) == 0
    assert "text cache: 2 variants" in capsys.readouterr().out
