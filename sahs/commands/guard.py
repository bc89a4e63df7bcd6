"""``sahs guard``: answer JSONL prompts through a model guarded by an exported detector.

    sahs guard --detector outputs/demo/detector --model sahs/tiny-llava --input prompts.jsonl
    echo '{"text": "How do I bake bread?"}' | sahs guard --detector outputs/demo/detector

Input lines are ``{"text": ..., "image": "optional/path.png"}`` (from a file or stdin); output lines are
``{"score", "flagged", "answer"}`` (to a file or stdout). Flagged prompts get the refusal. A line that
cannot be answered gets ``{"id" or "line", "error"}`` and the rest go on; the exit status is then
``FAILED_LINES`` (3), distinct from a user error (2) that stops before any prompt.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

from jsonargparse import ArgumentParser

FAILED_LINES = 3


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="sahs guard", description=__doc__.splitlines()[0])
    parser.add_argument("--detector", required=True, help="folder written by `sahs export`")
    parser.add_argument("--model", default=None, help="model to guard (default: the one the detector names)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA if present)")
    parser.add_argument("--input", default="-", help="JSONL prompts; - reads stdin")
    parser.add_argument("--output", default="-", help="JSONL results; - writes stdout")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="answer length for unflagged prompts")
    parser.add_argument("--refusal", default=None, help="the answer to a flagged prompt (default: a short refusal)")
    parser.add_argument("--threshold", type=float, default=None, help="flag at this score (default: the detector's)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call")
    return parser


def main(argv: list[str]) -> None:
    # The guard needs the live model (transformers): imported only when the verb runs.
    from sahs.guard.guard import SafetyGuard, check_options
    from sahs.guard.jsonl import guard_jsonl

    options = _parser().parse_args(argv)
    check_options(options.batch_size, options.max_new_tokens, options.threshold)  # before the model loads
    if options.input != "-" and not Path(options.input).is_file():
        raise SystemExit(f"sahs guard: no prompt file {options.input}: pass a JSONL file, or - for stdin")
    refusal = {} if options.refusal is None else {"refusal": options.refusal}
    guard = SafetyGuard.load(options.detector, options.model, device=options.device, threshold=options.threshold,
                             max_new_tokens=options.max_new_tokens, batch_size=options.batch_size, **refusal)
    with ExitStack() as files:
        reading_stdin = options.input == "-"
        lines = sys.stdin if reading_stdin else files.enter_context(open(options.input, encoding="utf-8", errors="replace"))
        sink = sys.stdout if options.output == "-" else files.enter_context(open(options.output, "w", encoding="utf-8"))
        base = Path.cwd() if reading_stdin else Path(options.input).resolve().parent
        counts = guard_jsonl(guard, lines, sink, base=base, source="stdin" if reading_stdin else options.input)
    print(f"[sahs] guarded {counts.answered} prompts", file=sys.stderr)
    if counts.failed:
        print(f"sahs guard: {counts.failed} lines got an \"error\" field in the output (the first: "
              f"{counts.failures[0]}); every other line has its answer", file=sys.stderr)
        raise SystemExit(FAILED_LINES)
