"""``raydistill <verb> --config PRESET_OR_YAML [a.b=c ...]``

Verbs are modules of this package, each with ``add_arguments(parser)`` (optional) and
``run(cfg, args) -> dict``. They talk to each other only through ``run_dir``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from raydistill.tasks.config import ConfigError, dump_yaml, load_config, resolve_paths

VERBS = {
    "cache": ("raydistill.workflows.cache", "run the teacher once over the corpus and store its soft targets"),
    "train": ("raydistill.workflows.train", "train the student from the cache (Ray Train + DeepSpeed)"),
    "tune": ("raydistill.workflows.tune", "search alpha, T, lr, loss over the same cache (Ray Tune + ASHA)"),
    "quantize": ("raydistill.workflows.quantize", "quantize the trained student and score it against the teacher"),
    "register": ("raydistill.workflows.register", "register the quantized student in MLflow with lineage tags"),
    "promote": ("raydistill.workflows.promote", "move @champion to a model version if it passes the quality gate"),
    "serve": ("raydistill.workflows.serve", "serve models:/<name>@champion over HTTP (OpenAI-style completions)"),
    "pipeline": ("raydistill.workflows.pipeline", "run every stage in order, skipping finished ones"),
    "submit": ("raydistill.workflows.submit", "submit a verb as a Ray job to a remote cluster"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydistill",
        description="Distill LLMs into small, fast, quantized students on Ray.",
        epilog="Config: --config NAME (a preset in workflows/configs) or a YAML path; then a.b=c overrides, "
               "e.g. `raydistill train --config tiny train.steps=10 train.loss=reverse_kl`.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None,
                       help="preset name (smollm2-shakespeare [default], tiny) or a YAML file")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", metavar="a.b=c", help="dotted config overrides")
        mod = importlib.import_module(module)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
    return parser


def _split_action(parser, args, extras: list[str]) -> None:
    """Overrides may come before or after options; a verb with ``ACTIONS`` takes one bare word as its action."""
    actions = getattr(importlib.import_module(VERBS[args.verb][0]), "ACTIONS", ())
    words = [w for w in [*args.overrides, *extras] if "=" not in w]
    args.overrides = [w for w in [*args.overrides, *extras] if "=" in w]
    args.action = actions[0] if actions else None
    if len(words) == 1 and words[0] in actions:
        args.action = words[0]
    elif words:
        hint = f"; actions of '{args.verb}': {', '.join(actions)}" if actions else ""
        parser.error(f"unexpected argument(s) {' '.join(words)}: overrides look like a.b=c{hint}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    _split_action(parser, args, extras)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.verb != "submit":  # a submitted job resolves its paths on the cluster
            cfg = resolve_paths(cfg)
    except ConfigError as e:
        print(f"raydistill: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg))
        return 0
    module = importlib.import_module(VERBS[args.verb][0])
    try:
        module.run(cfg, args)
    except ConfigError as e:
        print(f"raydistill {args.verb}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raydistill {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
