"""One shape for every command line: a `Command` (arguments + entry point) and one error path.

`jinavlm <name>` runs the registered commands (`jinavlm_jax.cli`); the repository's own faces
(`python -m convert`, `python train.py`, `python -m jinavlm_jax.aot`) run the same `Command` objects
through `run_cli` under their own program names, so every front end parses, reports errors and
exits the same way:

| what happens | stderr | exit status |
|---|---|---|
| success | - | what `run` returned (0 by default) |
| `ValueError` / `OSError` (our errors are ValueError subclasses) | `PROG: error: MESSAGE` | 1 |
| an exception with an `exit_status` attribute (e.g. training's `Preempted`: 143) | `PROG: MESSAGE` | that status |
| Ctrl-C | `PROG: interrupted` (+ the command's note) | 130 |
| bad arguments | argparse's usage line | 2 |
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, argument setup and entry point (returns the exit code).

    `intermixed`: options and positionals may interleave (e.g. `key=value` overrides after options);
    `description` / `epilog`: longer help text; `interrupted`: what to add to the Ctrl-C message;
    `huge_pages`: run from the process's own command line, the program first re-executes itself with
    malloc's huge pages on (`hostmem.with_huge_pages`: XLA:CPU train steps allocate gigabytes per call).
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    intermixed: bool = False
    description: str | None = None
    epilog: str | None = None
    interrupted: str = ""
    huge_pages: bool = False


def make_parser(command: Command, prog: str) -> argparse.ArgumentParser:
    """The argument parser of one command under the program name `prog`."""
    parser = argparse.ArgumentParser(prog=prog, description=command.description or command.help,
                                     epilog=command.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    command.configure(parser)
    return parser


def parse(command: Command, parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv` for `command` (intermixed when it asks for it); `args.argv` keeps the raw list."""
    args = parser.parse_intermixed_args(list(argv)) if command.intermixed else parser.parse_args(list(argv))
    args.argv = list(argv)
    return args


def guarded(prog: str, fn: Callable[[], int | None], interrupted: str = "") -> int:
    """Run `fn` through the one error path (see the module docstring); returns the exit status."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + (f": {interrupted}" if interrupted else ""), file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        status = getattr(e, "exit_status", None)
        if status is None:
            raise
        print(f"{prog}: {'error: ' if status == 1 else ''}{e}", file=sys.stderr)
        return int(status)


def run_cli(command: Command, argv: Sequence[str] | None, prog: str, own_process: bool | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run `command` under the program name `prog`.
    `own_process` (default: `argv` is None): these are the process's own arguments, so process-wide
    set-up may run first (`Command.huge_pages`); in-process callers (tests) never re-execute."""
    if (argv is None if own_process is None else own_process) and command.huge_pages:
        from .hostmem import with_huge_pages
        with_huge_pages()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(command, make_parser(command, prog), argv)
    return guarded(prog, lambda: command.run(args), command.interrupted)
