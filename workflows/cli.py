"""``raydistill <verb> [ACTION] --config PRESET_OR_YAML [a.b=c ...]``

Every setting is a config field (``a.b=c``); a verb's bare word is its action (``cache inspect``, ``promote
rollback``). The parser is built from the verb table (``workflows/verbs.py``) without importing any verb module;
only the verb that runs is imported. ``raydistill <verb> --help`` lists the config fields the verb reads, with
their defaults and the docstrings of ``tasks/config.py``; ``--help-config SECTION`` lists any section.

This is the one place that turns errors into exit codes: :class:`RaydistillError` → its message and
``exit_code`` (2 for a config error), Ctrl-C → 130. Anything else is a bug and keeps its traceback. Whatever it
prints is masked (:func:`tasks.guard.redact_text`): URL passwords, secret query values, secret env values.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import os
import sys
import textwrap
import traceback

from raydistill.tasks.config import (ConfigError, PipelineConfig, dump_yaml, field_docs, load_config,
                                     generated_corpus, resolve_paths)
from raydistill.tasks.errors import RaydistillError
from raydistill.tasks.guard import redact_text, secret_env_values
from raydistill.workflows.verbs import VERBS, Verb


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydistill",
        description="Distill LLMs into small, fast, quantized students on Ray.",
        epilog="Config: --config NAME (a preset in workflows/configs) or a YAML path; then a.b=c overrides, "
               "e.g. `raydistill train --config tiny train.steps=10 train.loss=reverse_kl`. "
               "`raydistill VERB --help` lists the fields VERB reads.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, verb in VERBS.items():
        actions = f" [{'|'.join(verb.actions)}]" if verb.actions else ""
        actions += "".join(f" [{flag}]" for flag, _ in verb.flags)
        p = sub.add_parser(name, help=verb.help, description=verb.help, epilog=config_help(verb.sections),
                           usage=f"raydistill {name}{actions} [--config NAME] [a.b=c ...]",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", "-c", default=None,
                       help="preset name (smollm2-shakespeare [default], smollm2-chat, tiny) or a YAML file")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("--help-config", nargs="?", const="", default=None, metavar="SECTION",
                       help="list the config fields of SECTION (e.g. train, registry.gate; default: the ones "
                            "this verb reads) with default and meaning, and exit")
        p.add_argument("words", nargs="*", metavar="ACTION|a.b=c",
                       help=f"the action ({', '.join(verb.actions)}; default {verb.actions[0]}) and "
                            "dotted config overrides" if verb.actions else "dotted config overrides")
    return parser


def config_help(paths: tuple[str, ...] | list[str]) -> str:
    """Every field under ``paths`` as ``path = default  (type)`` plus its docstring."""
    lines = []
    for path, owner, name in _leaves(paths):
        kind = {f.name: f.type for f in dataclasses.fields(owner)}[name]
        doc = field_docs().get(type(owner).__name__, {}).get(name, "")
        lines += [f"  {path} = {json.dumps(getattr(owner, name), ensure_ascii=False)}  ({kind})",
                  textwrap.indent(doc, " " * 6)]
    return "config fields (set with a.b=c; defaults from tasks/config.py):\n" + "\n".join(lines)


def _leaves(paths) -> list[tuple[str, object, str]]:
    """``(dotted path, owning dataclass instance, field name)`` of every field under ``paths`` (defaults)."""
    out, cfg = [], PipelineConfig()
    for path in paths:
        *parents, name = path.split(".")
        owner = cfg
        for part in parents:
            owner = getattr(owner, part)
        value = getattr(owner, name)
        if dataclasses.is_dataclass(value):
            out += _leaves([f"{path}.{f.name}" for f in dataclasses.fields(value)])
        else:
            out.append((path, owner, name))
    return out


def _check_path(path: str) -> None:
    """A ConfigError naming the closest valid key when ``path`` is not a config field or section."""
    node: object = PipelineConfig()
    for i, part in enumerate(path.split(".")):
        names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        if part not in names:
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            prefix = ".".join(path.split(".")[:i])
            raise ConfigError(f"no config section {path!r}" + (f"; did you mean {', '.join(close)}" if close else "")
                              + f" (valid here{' under ' + prefix if prefix else ''}: {', '.join(names)})")
        node = getattr(node, part)


def _split_words(parser: argparse.ArgumentParser, name: str, verb: Verb, words: list[str]) -> tuple:
    """``(action, overrides)``: overrides look like a.b=c; a verb with actions takes one bare word as its action.
    An unknown ``--option`` is a setting: the error names the config field it most likely is."""
    aliases = dict(verb.flags)
    words = [aliases.get(w, w) for w in words]
    options = [w for w in words if w.startswith("-")]
    if options:
        parser.error(_unknown_option(options[0], name, verb))
    overrides = [w for w in words if "=" in w]
    bare = [w for w in words if "=" not in w]
    action = verb.actions[0] if verb.actions else None
    if len(bare) == 1 and bare[0] in verb.actions:
        action = bare[0]
    elif len(bare) == 1 and verb.argument:  # e.g. `raydistill lineage models:/m/3`
        overrides.insert(0, f"{verb.argument}={bare[0]}")
    elif bare:
        hint = f"; actions of '{name}': {', '.join(verb.actions)}" if verb.actions else ""
        parser.error(f"unexpected argument(s) {' '.join(bare)}: overrides look like a.b=c{hint}")
    return action, overrides


def _unknown_option(option: str, name: str, verb: Verb) -> str:
    """Options are not settings: name the action or the config field the option most likely meant."""
    wanted = option.split("=")[0].lstrip("-").replace("-", "_")
    if wanted in verb.actions:
        return f"unknown option {option}: {wanted!r} is an action, `raydistill {name} {wanted} …`"
    fields = [path for path, _, _ in _leaves(verb.sections)]
    close = difflib.get_close_matches(wanted.removeprefix("no_"), [f.rsplit(".", 1)[-1] for f in fields],
                                      n=1, cutoff=0.6)
    matches = [f for f in fields if close and f.rsplit(".", 1)[-1] == close[0]]
    hint = f"; did you mean {matches[0]}=…?" if matches else f" (`raydistill {name} --help` lists them)"
    return f"unknown option {option}: settings are config fields, set as a.b=c{hint}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    verb = VERBS[args.verb]
    action, overrides = _split_words(parser, args.verb, verb, [*args.words, *extras])
    try:
        if args.help_config is not None:
            paths = [args.help_config] if args.help_config else list(verb.sections)
            for p in paths:
                _check_path(p)
            print(config_help(paths))
            return 0
        cfg = load_config(args.config, overrides)
        if args.verb not in ("submit", "job"):  # a submitted job resolves its paths on the cluster
            cfg = resolve_paths(cfg)
        if args.verb not in ("pipeline", "generate", "submit", "job"):  # the pipeline swaps after generate runs
            cfg = generated_corpus(cfg)
    except ConfigError as e:
        print(redact_text(f"raydistill: config error: {e}", secret_env_values()), file=sys.stderr)
        return e.exit_code
    if args.print_config:  # masked like every log line: a terminal scrollback or CI log is a leak too
        print(redact_text(dump_yaml(cfg), secret_env_values()))
        return 0
    module = importlib.import_module(verb.module)
    # every store this command opens (the cache's driver-side reads too) retries for cluster.store_retry_s
    before = os.environ.get("RAYDISTILL_STORE_RETRY_S")
    os.environ["RAYDISTILL_STORE_RETRY_S"] = str(cfg.cluster.store_retry_s)
    try:
        module.run(cfg, action) if verb.actions else module.run(cfg)
    except RaydistillError as e:  # messages may quote a cache.dir or address: masked like every log line
        print(redact_text(f"raydistill {args.verb}: {e}", secret_env_values()), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"raydistill {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception:  # a bug: its traceback, masked too (a message may quote s3://key:secret@…)
        print(redact_text(traceback.format_exc(), secret_env_values()), file=sys.stderr, end="")
        return 1
    finally:  # main() is called in-process too (tests, notebooks): leave the environment as it was
        if before is None:
            os.environ.pop("RAYDISTILL_STORE_RETRY_S", None)
        else:
            os.environ["RAYDISTILL_STORE_RETRY_S"] = before
    return 0


if __name__ == "__main__":
    sys.exit(main())
