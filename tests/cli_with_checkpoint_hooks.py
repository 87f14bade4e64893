"""``python -m lrsparse.cli`` with test-only checkpoint hooks, for tests that interrupt a real CLI run.

The hooks are observers of ``lrsparse.pipeline.CHECKPOINT_OBSERVERS`` installed from environment variables, so
that the production code holds no test switch:

- ``LRSPARSE_TEST_EXIT_AFTER_STAGE=<stage>``: the process exits abruptly (``os._exit(75)``, no cleanup) right after
  the named stage's checkpoint is committed: a simulated crash.
- ``LRSPARSE_TEST_PAUSE_AFTER_CHECKPOINT=<stage>:<step>``: the process sleeps right after committing that
  intra-stage checkpoint, so a test can SIGKILL it at a known point.
- ``LRSPARSE_TEST_KILL_RANK_AFTER_CHECKPOINT=<rank>:<stage>:<step>``: under torchrun, that rank SIGKILLs itself right
  after that intra-stage checkpoint (torchrun then stops the other ranks): one rank of a launch killed mid-stage.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

from lrsparse import pipeline
from lrsparse.cli import main

EXIT_AFTER_STAGE = "LRSPARSE_TEST_EXIT_AFTER_STAGE"
PAUSE_AFTER_CHECKPOINT = "LRSPARSE_TEST_PAUSE_AFTER_CHECKPOINT"
KILL_RANK_AFTER_CHECKPOINT = "LRSPARSE_TEST_KILL_RANK_AFTER_CHECKPOINT"


def _hook(run, record: dict) -> None:
    if "step" not in record and os.environ.get(EXIT_AFTER_STAGE) == record["name"]:
        logging.shutdown()
        os._exit(75)
    if "step" in record and os.environ.get(KILL_RANK_AFTER_CHECKPOINT) == \
            f"{os.environ.get('RANK')}:{record['name']}:{record['step']}":
        os.kill(os.getpid(), signal.SIGKILL)
    if "step" in record and os.environ.get(PAUSE_AFTER_CHECKPOINT) == f"{record['name']}:{record['step']}":
        logging.shutdown()
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    pipeline.CHECKPOINT_OBSERVERS.append(_hook)
    sys.exit(main(sys.argv[1:]))
