"""`python -m assistant train | adapter-card`: train the LLM stages, record evaluations in the card.

    python -m assistant train --stage align --task report --out adapters/report-align
    python -m assistant train --stage lora --task report --adapter adapters/report-align --out adapters/report-lora
    python -m assistant adapter-card --adapter adapters/report-lora --eval eval.json --base-eval base.json

`--config FILE` reads a training config (the `train_config.json` a run saves beside its adapter:
{"settings": {...}, "assistant": {...}}); `--set train.lr=1e-4` / `--set llm.lora_r=8` override
fields of either. Checkpoints go to a work folder (default .cache/train/NAME), never into `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

TRAIN_CONFIG = "train_config.json"


def add_commands(commands) -> None:
    from .train import STAGES
    from .train_data import TASKS
    from .train_shard import SHARD_MODES

    train = commands.add_parser("train", help="train the projector (align) or a LoRA adapter (lora) for a task")
    train.add_argument("--stage", required=True, choices=STAGES, help="align: projector only; lora: LoRA + projector")
    train.add_argument("--task", required=True, choices=TASKS, help="which data and prompt template")
    train.add_argument("--out", required=True, help="adapter folder to write (e.g. adapters/report-lora)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides epochs)")
    train.add_argument("--epochs", type=int, default=None, help="passes over the training data (default 1)")
    train.add_argument("--shard", choices=SHARD_MODES, default=None,
                       help="fsdp: shard the whole model across the processes of a multi-GPU launch (default none)")
    train.add_argument("--config", default=None, help="training config JSON (a saved train_config.json)")
    train.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override train.FIELD (settings) or an AssistantConfig field, e.g. llm.lora_r=8")
    train.add_argument("--llm", default=None, help="local HF causal-LM folder instead of the built-in one")
    train.add_argument("--adapter", default=None, help="start from this align-stage adapter folder (projector)")
    train.add_argument("--work-dir", default=None, help="checkpoint folder (default .cache/train/NAME)")
    train.add_argument("--debug", action="store_true", help="show full tracebacks")
    train.set_defaults(handler=run_train)

    card = commands.add_parser("adapter-card", help="record held-out evaluation results in an adapter's card")
    card.add_argument("--adapter", required=True, help="adapter folder made by `train`")
    card.add_argument("--eval", required=True, help="`evaluate` result JSON of the adapter")
    card.add_argument("--base-eval", default=None, help="`evaluate` result JSON of the untrained base model")
    card.add_argument("--debug", action="store_true", help="show full tracebacks")
    card.set_defaults(handler=run_card)


def configs_from_args(args: argparse.Namespace):
    """(AssistantConfig, LLMTrainSettings) from --config, then --set, then the dedicated flags."""
    from .cli import _parse_assignment
    from .config import AssistantConfig
    from .train import settings_from_dict

    saved = json.loads(Path(args.config).read_text()) if args.config else {}
    config = AssistantConfig.from_dict(saved.get("assistant", {}))
    settings = dict(saved.get("settings", {}))
    overrides = {}
    for name, value in map(_parse_assignment, args.set):
        if name.startswith("train."):
            settings[name.removeprefix("train.")] = value
        else:
            overrides[name] = value
    chosen = {"stage": args.stage, "task": args.task, "max_steps": args.max_steps, "epochs": args.epochs,
              "shard": getattr(args, "shard", None)}
    settings.update({k: v for k, v in chosen.items() if v is not None})
    if args.llm is not None:
        overrides["llm.path"] = args.llm
    # Training starts from --adapter (or the saved run's start), never from the shipped default.
    overrides["adapter"] = args.adapter or saved.get("assistant", {}).get("adapter")
    return config.override(overrides), settings_from_dict(settings)


def run_train(args: argparse.Namespace) -> int:
    from .evaluate import current_command
    from .train import run_training
    from .train_loop import process_state
    from .vision import repo_root

    config, settings = configs_from_args(args)
    work = args.work_dir or str(repo_root() / ".cache" / "train" / Path(args.out).name)
    metadata = run_training(config, settings, args.out, work, resume=args.resume)
    if not process_state().is_main_process:
        return 0  # under `accelerate launch` or torchrun the main process alone writes the adapter folder
    payload = {"settings": dataclasses.asdict(settings), "assistant": config.to_dict()}
    (Path(args.out) / TRAIN_CONFIG).write_text(json.dumps(payload, indent=2) + "\n")
    metadata["commands"]["train"] = current_command()
    (Path(args.out) / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    from .adapter_card import write_card

    write_card(args.out, metadata)
    held = metadata["training"]["held_out_loss_full_vocab"]
    print(f"held-out loss {held['before']} -> {held['after']}; saved to {args.out}")
    return 0


def run_card(args: argparse.Namespace) -> int:
    from .adapter_card import attach_evaluation

    attach_evaluation(args.adapter, args.eval, args.base_eval)
    print(f"updated {args.adapter}/metadata.json and README.md")
    return 0
