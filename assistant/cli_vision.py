"""`python -m assistant train-vision | evaluate-vision`: the chest X-ray vision encoder."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def add_commands(commands) -> None:
    train = commands.add_parser("train-vision", help="train the chest X-ray vision encoder on ../shared/data")
    train.add_argument("--out", default="adapters/vision-nih14", help="folder for the trained weights")
    train.add_argument("--epochs", type=int, default=None, help="NIH epochs (default 10)")
    train.add_argument("--pretrain-epochs", type=int, default=None,
                       help="PneumoniaMNIST pretraining epochs (default 2; 0 skips)")
    train.add_argument("--work-dir", default=None, help="checkpoints (default .cache/train-vision/NAME)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument("--debug", action="store_true", help="show full tracebacks")
    train.set_defaults(handler=run_train_vision)

    evaluate = commands.add_parser("evaluate-vision", help="AUROC of vision weights on the held-out test data")
    evaluate.add_argument("--weights", default=None, help="weights folder (default: the shipped one)")
    evaluate.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    evaluate.add_argument("--debug", action="store_true", help="show full tracebacks")
    evaluate.set_defaults(handler=run_evaluate_vision)


def run_train_vision(args: argparse.Namespace) -> int:
    from .train_vision import VisionTrainSettings, train_vision

    chosen = {"epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs}
    settings = dataclasses.replace(VisionTrainSettings(), **{k: v for k, v in chosen.items() if v is not None})
    metadata = train_vision(args.out, settings, work_dir=args.work_dir, resume=args.resume)
    print(json.dumps(metadata["metrics"]["nih_test"]["normal_vs_abnormal_auroc"]))
    print(f"saved to {args.out}")
    return 0


def run_evaluate_vision(args: argparse.Namespace) -> int:
    from .train_vision import evaluate_vision

    metrics = evaluate_vision(args.weights)
    text = json.dumps(metrics, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
