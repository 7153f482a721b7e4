"""What train.py and evaluate.py share: one line for every error a user can act on."""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from q8.errors import Q8Error

log = logging.getLogger("q8")


def describe(err: BaseException) -> str:
    """One line naming the cause: a q8 error's message, or an OS error's reason and file."""
    if isinstance(err, OSError) and not isinstance(err, Q8Error):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or type(err).__name__}{where} ({type(err).__name__}, errno {err.errno})"
    return str(err)


def fail(err: BaseException, code: int = 1) -> None:
    log.error("%s", describe(err))
    sys.exit(code)


class RunFolderCheck(Callback):
    """Before Hydra writes into the run folder: it must be a folder we can create and write,
    else one line says so (Hydra itself would print a traceback)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.run.dir))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            sys.stderr.write(f"cannot use the run folder {folder} (hydra.run.dir): {describe(err)}\n")
            raise SystemExit(1) from None
