"""`python -m assistant evaluate --task {report,summary,educate,triage,retrieval}`: the CLI group.

`add_commands(commands)` registers the subcommand on the main parser's subparsers; `main(argv)`
runs the group on its own with the same one-line error handling as the main CLI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_USAGE = 2
LEVEL_NAMES = ("simple", "general", "detailed")  # readability.READING_LEVELS, in order


def add_commands(commands) -> None:
    from .cli import add_model_options  # imported here: cli imports this module to register it
    from .evaluate import TASKS

    evaluate = commands.add_parser(
        "evaluate", help="score a task on its held-out data and write a JSON result",
        description="Score a task on its held-out data; writes JSON (metrics, model hashes, data, command, "
                    "time) and prints a table.")
    evaluate.add_argument("--task", required=True, choices=TASKS, help="what to evaluate")
    evaluate.add_argument("--limit", type=int, default=None, metavar="N",
                          help="only the first N items (deterministic order)")
    evaluate.add_argument("--out", default=None, metavar="FILE",
                          help="result JSON (default benchmarks/results/eval-TASK.json)")
    evaluate.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                          help="generation length limit (default: the config's generation.max_new_tokens)")
    evaluate.add_argument("--batch-size", type=int, default=8, metavar="N",
                          help="decode N items together (report task; 1 = the app's streaming path, slower)")
    evaluate.add_argument("--rag", action="store_true",
                          help="report task: put similar training-split reports into each prompt (retrieval-augmented)")
    evaluate.add_argument("--reading-level", choices=LEVEL_NAMES, default=None,
                          help="educate task: the reading level every answer is asked for (default: general)")
    add_model_options(evaluate)
    evaluate.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from .cli import config_from_args
    from .evaluate import default_out, evaluate

    config = config_from_args(args)  # applies --max-new-tokens, --llm, --adapter, --set ...
    out = args.out or default_out(args.task)
    from .readability import READING_LEVELS

    level = READING_LEVELS[LEVEL_NAMES.index(args.reading_level)] if args.reading_level else None
    evaluate(args.task, limit=args.limit, config=config, out=out, batch_size=args.batch_size, rag=args.rag,
             reading_level=level)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The evaluate group alone, e.g. `main(["evaluate", "--task", "triage"])`."""
    from .cli import user_message

    parser = argparse.ArgumentParser(prog="python -m assistant")
    add_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one actionable line unless --debug, like the main CLI
        if args.debug:
            raise
        print(f"error: {user_message(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
