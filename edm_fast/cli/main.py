"""edm-fast command line: sample, train, export, convert, bench, compare, serve, phema, metrics.

Examples:
    edm-fast sample --steps 18 --out samples.png                 # bundled digits model
    edm-fast sample --model toy-gmm --steps 18 --seeds 0-999 --out samples.png
    edm-fast sample --ckpt run/ --class 3 --guidance 2 --seeds 0-63 --out grid.png
    edm-fast sample --ckpt run/ --guide-ckpt early-run/ --guidance 2 --out auto.png  # autoguidance
    edm-fast train --data digits --preset tiny --loss edm --kimg 200 --out runs/edm --cond
Run ``edm-fast <command> --help`` for every option.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings

from .bench import add_bench_command
from .compare import add_compare_command
from .convert import add_convert_command
from .export import add_export_command
from .metrics import add_metrics_command
from .phema import add_phema_command
from .plan import add_plan_command
from .sample import add_sample_command
from .serve import add_serve_command
from .train import add_train_command

__all__ = ["main", "build_parser"]

# Every command's module registers it on the subparsers; --help lists them in this order.
COMMANDS = (add_sample_command, add_train_command, add_export_command, add_convert_command,
            add_bench_command, add_plan_command, add_compare_command, add_serve_command,
            add_phema_command, add_metrics_command)


class _Parser(argparse.ArgumentParser):
    """A parser whose errors are one line, ``edm-fast CMD: error: ...`` (exit code 2), as the
    errors of the commands themselves are; a value check that names its option (the train
    options' ranges) is shown without argparse's 'argument --x:' in front of it."""

    def error(self, message: str):
        match = re.fullmatch(r"argument (\S+): (.*)", message, flags=re.DOTALL)
        if match and any(flag in match[2] for flag in match[1].split("/")):
            message = match[2]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Adds "(default: X)" to an option's help unless X is None, the option is a plain flag
    (--cond, --no-progress: off unless given), or the help names its default."""

    def _get_help_string(self, action):
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                   argparse._StoreConstAction))
        if action.default is None or flag or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="edm-fast", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"edm-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add_command in COMMANDS:
        add_command(sub, _Formatter)
    return parser


# Library parameters whose option has another name (dest); the others are named as their dest.
_PARAMETER_DESTS = {"default_steps": "num_steps", "batch_size": "batch"}


def _name_options(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """An error from the library names Python parameters (num_steps, ema_halflife_kimg, S_churn);
    add the option of this command that sets each: 'num_steps (--steps) must be ...'. Only
    names with an underscore, which no English word in a message has, and only once."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {action.dest: next(s for s in action.option_strings if s.startswith("--"))
             for action in subparsers.choices[command]._actions
             if any(s.startswith("--") for s in action.option_strings)}
    for name in sorted(set(re.findall(r"\b[A-Za-z]+_[A-Za-z_]+\b", message))):
        flag = flags.get(_PARAMETER_DESTS.get(name, name))
        if flag is not None and flag not in message:
            message = re.sub(rf"\b{name}\b", f"{name} ({flag})", message, count=1)
    return message


def _exit_code(exc: BaseException) -> int | None:
    """The exit code of an error that the CLI reports as one line (its message), or None for
    an error that is a bug (it goes on as a traceback). A library error says its own code in
    ``exit_code`` (every ``EdmFastError``, and the errors that are another builtin kind: a
    missing optional package, NaN/Inf from the model, a diverged training run; 2: bad input,
    1: a run that failed); bad paths and values (OSError, ValueError) exit with 2."""
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    return 2 if isinstance(exc, (OSError, ValueError)) else None


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the user typed
    plain_format = warnings.formatwarning
    # warnings reach a CLI user as one line each, not as a source location and a code line;
    # the deprecation notices of libraries (torch.export, torch.jit) are for developers
    warnings.formatwarning = (lambda message, category, *_, **__:
                              f"edm-fast {args.command}: warning: {message}\n")
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category)
            return args.func(args) or 0
    except KeyboardInterrupt as exc:
        note = getattr(args, "interrupted_note", None)  # train: the checkpoint to resume from
        print(f"edm-fast {args.command}: interrupted{note(args, exc) if note else ''}",
              file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)  # 130 for Ctrl-C, 143 for SIGTERM (as shells do)
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise
        message = _name_options(str(exc), parser, args.command) if code == 2 else str(exc)
        print(f"edm-fast {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        warnings.formatwarning = plain_format
        from ..train.distributed import close_distributed

        close_distributed()  # torchrun jobs (sample, train) leave the process group cleanly
