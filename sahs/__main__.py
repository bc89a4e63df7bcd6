"""The ``sahs`` command: picks the verb, imports its code only then, and prints user errors in one line.

Importing torch and Lightning takes seconds, so ``sahs --help`` and an unknown verb import neither:
fit/validate/test/predict go to ``sahs.cli`` (LightningCLI), every other verb to ``sahs.commands.<verb>``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys

from sahs.commands import LIGHTNING_VERBS, VERBS
from sahs.errors import UserError


def usage() -> str:
    """``sahs --help``: every verb with its one-line description."""
    width = max(map(len, [*LIGHTNING_VERBS, *VERBS])) + 2
    lines = ["usage: sahs VERB [--config CONFIG] [overrides ...]", "",
             "Find the safety attention heads of a vision-language model and train detectors on them.", "",
             "verbs:"]
    lines += [f"  {verb:<{width}}{text}" for verb, text in {**LIGHTNING_VERBS, **VERBS}.items()]
    lines += ["", "`sahs VERB --help` documents a verb's options; every verb reads the same run config."]
    return "\n".join(lines)


def unknown_verb(verb: str) -> UserError:
    """``sahs fti``: the closest verb, and every verb there is."""
    verbs = [*LIGHTNING_VERBS, *VERBS]
    close = difflib.get_close_matches(verb, verbs, n=1, cutoff=0.5)
    hint = f", did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown command '{verb}'{hint} The verbs are {', '.join(verbs)} (`sahs --help` describes them)")


def run(argv: list[str]) -> None:
    """Run one verb's command line (``argv[0]`` is the verb)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
    elif argv[0] in VERBS:
        importlib.import_module(f"sahs.commands.{argv[0]}").main(argv[1:])
    elif argv[0] in LIGHTNING_VERBS or argv[0].startswith("-"):  # LightningCLI's own options (--print_config ...)
        from sahs.cli import lightning_main

        lightning_main(argv)
    else:
        raise unknown_verb(argv[0])


def main(argv: list[str] | None = None) -> None:
    """User errors print one line (``--debug`` or ``SAHS_DEBUG=1``: the traceback too); bugs keep theirs.

    A run that fails leaves no folder that looks finished: one holding nothing but its config is removed,
    any other is marked with a ``FAILED`` file that holds the error.
    """
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("SAHS_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        run(argv)
    except BaseException as error:
        from sahs.commands.errors import user_error_line

        line = user_error_line(error, argv[0] if argv else None) if isinstance(error, Exception) else None
        run_dir = getattr(error, "run_dir", None)
        if run_dir is not None:
            from sahs.commands.runs import close_failed

            close_failed(run_dir, line or f"{type(error).__name__}: {error}")
        if line is None or debug:
            raise
        print(f"sahs: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
