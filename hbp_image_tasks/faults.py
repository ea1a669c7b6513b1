"""Named points where a test makes a conversion signal itself, as a walltime or node failure would.

``HBP_IMAGE_TASKS_STOP_AT=POINT[:SIGNAL]`` (e.g. ``slab-2:SIGTERM``,
``chunks-written:SIGKILL``; the signal defaults to SIGKILL) makes the process
send itself SIGNAL when it reaches POINT. Unset, :func:`reached` does nothing.
The tests of the publish contract stop real ``ingest_ngs`` processes with it.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "HBP_IMAGE_TASKS_STOP_AT"


def reached(point: str) -> None:
    """Sends this process the signal that ``HBP_IMAGE_TASKS_STOP_AT`` asks for at ``point``."""
    wanted = os.environ.get(ENVIRONMENT_VARIABLE)
    if not wanted:
        return
    name, _, signal_name = wanted.partition(":")
    if name != point:
        return
    number = getattr(signal, signal_name or "SIGKILL")
    logger.warning("%s=%s: sending %s to this process", ENVIRONMENT_VARIABLE, wanted, number.name)
    os.kill(os.getpid(), number)
