"""What runs on a worker process around the per-slide function, and the rows an executor makes itself.

Exceptions do not travel well between processes (``ConfigError(key, message)`` cannot be rebuilt by
pickle), so a worker returns a config error as a small tagged row and the caller raises it again.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable

from ..errors import ConfigError, GigapathError, SlideError

log = logging.getLogger("gigapath")

_CONFIG_ERROR = "__config_error__"


def call_slide(fn: Callable[..., dict], config: Any, slide: Any) -> dict:
    """Run ``fn(config, slide)`` on a worker.

    A ConfigError (or another run-wide GigapathError, e.g. missing weights) becomes a tagged row that
    :func:`raise_config_error` raises again in the caller; any other exception that escapes ``fn`` fails this
    slide only (``status: failed`` with the exception type).
    """
    try:
        return fn(config, slide)
    except SlideError as err:  # process_slide records its own; another fn may not
        return _failed(config, slide, str(err), type(err).__name__)
    except GigapathError as err:
        return {_CONFIG_ERROR: str(err), "config_error": isinstance(err, ConfigError), "slide_id": slide.slide_id}
    except Exception as err:  # a bug outside fn's own per-slide handling: keep the run going
        log.debug("slide %s failed:\n%s", slide.slide_id, traceback.format_exc())
        return _failed(config, slide, f"{slide.path}: unexpected {type(err).__name__}: {err}", type(err).__name__)


def _failed(config: Any, slide: Any, reason: str, error_type: str) -> dict:
    row = {"slide_id": slide.slide_id, "slide_path": slide.path, "status": "failed", "reason": reason,
           "error_type": error_type}
    _write_marker(config, slide, row)
    return row


def raise_config_error(row: dict) -> dict:
    """Return ``row``, or raise the run-wide error (ConfigError or GigapathError) a worker reported in it."""
    if _CONFIG_ERROR in row:
        raise ConfigError("", row[_CONFIG_ERROR]) if row.get("config_error") else GigapathError(row[_CONFIG_ERROR])
    return row


def worker_died_row(config: Any, slide: Any, attempts: int, detail: str = "") -> dict:
    """The failed row (and marker) for a slide whose worker process died on every attempt."""
    return _failed(config, slide, f"{slide.path}: the worker process died {attempts} time(s) while processing "
                                  f"this slide (killed, or out of memory?){': ' + detail if detail else ''}",
                   "WorkerDied")


def _write_marker(config: Any, slide: Any, row: dict) -> None:
    output = getattr(config, "output", None)
    if output:
        from ..store import write_status

        from ..slide_ids import slide_dir

        try:
            write_status(slide_dir(output, slide.slide_id), row)
        except (OSError, SlideError) as err:
            log.warning("could not write the status marker of %s: %s", slide.slide_id, err)
