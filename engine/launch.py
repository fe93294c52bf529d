"""Entry point of every recipe script: the recipe's own error is the last line the failing process prints.

Under ``accelerate launch`` a failure otherwise ends in the launcher's ``CalledProcessError ... exit status 1``
(or torch elastic's summary) after the recipe's traceback, and the message that says what was wrong (a bad
config value, a missing file) is somewhere above. ``run_main`` prints the full traceback, then one last line
``error: <Type>: <message>``, and exits with status 1. Under torch elastic (``accelerate launch`` with several
processes, torchrun) that line also goes to the worker's error file, so the launcher's closing failure summary
names the error instead of "To enable traceback see ...".
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable


def error_line(exc: BaseException) -> str:
    """``error: <Type>: <message>`` on one line (a multi-line message is joined with ' | ')."""
    message = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"error: {type(exc).__name__}: {message}" if message else f"error: {type(exc).__name__}"


def _write_elastic_error_file(line: str) -> None:
    """The error file torch elastic's agent reads for its failure summary (format of its ErrorHandler)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as fh:
            json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, fh)
    except OSError:
        pass


def run_main(main: Callable[[list[str] | None], object]) -> None:
    """Run ``main(None)`` (it parses ``sys.argv``); exit 1 after a traceback and a final ``error:`` line on an
    exception, 130 on Ctrl-C; ``SystemExit`` (``--help``, argparse errors) passes through unchanged."""
    try:
        main(None)
    except KeyboardInterrupt:
        print("\ninterrupted (KeyboardInterrupt)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except BrokenPipeError:
        # the reader went away (``--help | head``): not an error of the run; silence the flush at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
    except Exception as exc:
        sys.stdout.flush()
        traceback.print_exc(file=sys.stderr)
        line = error_line(exc)
        _write_elastic_error_file(line)
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(1) from None
