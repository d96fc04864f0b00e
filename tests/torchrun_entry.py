"""`mlip` as torchrun starts it (`python -m mlip`), with a failure injected for tests/test_distributed.py.

MLIP_TEST_RAISE="RANK:STEP:MESSAGE": the process of that rank (* for all) raises RuntimeError(MESSAGE)
instead of taking optimizer step STEP + 1 (MESSAGE "hang": sleeps an hour instead). MLIP_TEST_RECORD=DIR: each process writes DIR/rank<R>.json,
the structure indices of its batch at each step (null for a stand-in). Unset: plain `mlip`.
"""

import json
import os
import sys
import time

from mlip.data import keys

from mlip.cli import main
from mlip.train.trainer import Trainer

if os.environ.get("MLIP_TEST_RAISE"):
    rank, step, message = os.environ["MLIP_TEST_RAISE"].split(":", 2)
    take_step = Trainer._train_step

    def failing_step(trainer, batch):
        if rank in ("*", str(trainer.ranks.rank)) and trainer.step == int(step):
            if message == "hang":
                time.sleep(3600)
            raise RuntimeError(message)
        return take_step(trainer, batch)

    Trainer._train_step = failing_step

if os.environ.get("MLIP_TEST_RECORD"):
    seen = []
    take_step_recorded = Trainer._train_step

    def recording_step(trainer, batch):
        seen.append(None if keys.STAND_IN in batch else batch[keys.STRUCTURE_INDEX].tolist())
        with open(os.path.join(os.environ["MLIP_TEST_RECORD"], f"rank{trainer.ranks.rank}.json"), "w") as f:
            json.dump(seen, f)
        return take_step_recorded(trainer, batch)

    Trainer._train_step = recording_step

sys.exit(main(sys.argv[1:]))
