"""The generic accelerate training loop: learning, checkpoints, resume, saved config."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from assistant.train_loop import CONFIG_FILE, RESULT_FILE, TrainConfig, make_loader, train


class Interrupted(Exception):
    pass


def regression_data(count: int = 64) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(count, 4, generator=generator)
    targets = inputs @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.3
    return [{"x": x, "y": y} for x, y in zip(inputs, targets)]


def mse(model, batch) -> torch.Tensor:
    return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def config(tmp_path, **overrides) -> TrainConfig:
    base = TrainConfig(out_dir=str(tmp_path), lr=0.2, epochs=3, batch_size=8, checkpoint_every=4, warmup_steps=2)
    return dataclasses.replace(base, **overrides)


def test_a_tiny_model_learns_and_the_config_is_saved(tmp_path):
    cfg = config(tmp_path, grad_accum=2)
    evals = []
    result = train(fresh_model(), mse, make_loader(regression_data(), cfg), cfg,
                   eval_fn=lambda model: evals.append(1) or {"ok": True})
    assert result.step == 12  # 3 epochs x 8 batches / 2 accumulated
    assert sum(result.losses[-3:]) < 0.5 * sum(result.losses[:3])
    assert len(evals) == 3 and [e["epoch"] for e in result.evals] == [1, 2, 3]
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == dataclasses.asdict(cfg)
    assert json.loads((tmp_path / RESULT_FILE).read_text())["step"] == 12


def test_resume_continues_from_the_saved_step(tmp_path):
    cfg = config(tmp_path / "run", checkpoint_every=5)
    calls = {"n": 0}

    def crashing_mse(model, batch):
        calls["n"] += 1
        if calls["n"] > 13:  # dies during step 14, after the checkpoint at step 10
            raise Interrupted
        return mse(model, batch)

    with pytest.raises(Interrupted):
        train(fresh_model(), crashing_mse, make_loader(regression_data(), cfg), cfg)
    resumed_model = fresh_model()
    resumed = train(resumed_model, mse, make_loader(regression_data(), cfg), cfg, resume=True)
    assert resumed.resumed_from == 10 and resumed.step == 24
    assert resumed.first_loss_step == 1 and len(resumed.losses) == 24  # the checkpoint kept steps 1-10's losses

    straight_model = fresh_model()
    straight = train(straight_model, mse, make_loader(regression_data(), cfg),
                     config(tmp_path / "straight", checkpoint_every=5))
    assert resumed.losses == pytest.approx(straight.losses)
    for a, b in zip(resumed_model.parameters(), straight_model.parameters()):
        torch.testing.assert_close(a, b)  # same data order, optimizer and schedule state


def test_resuming_a_finished_run_only_reloads_it(tmp_path):
    cfg = config(tmp_path, epochs=1)
    model = fresh_model()
    train(model, mse, make_loader(regression_data(), cfg), cfg)
    again = fresh_model()
    result = train(again, mse, make_loader(regression_data(), cfg), cfg, resume=True)
    assert result.step == 8 and len(result.losses) == 8  # the finished run's curve, nothing added
    torch.testing.assert_close(again.weight, model.weight)


def test_a_fresh_run_discards_old_checkpoints(tmp_path):
    cfg = config(tmp_path, epochs=1)
    train(fresh_model(), mse, make_loader(regression_data(), cfg), cfg)
    result = train(fresh_model(), mse, make_loader(regression_data(), cfg), cfg)
    assert result.resumed_from is None and len(result.losses) == 8
