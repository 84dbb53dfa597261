"""One data-parallel worker, started by torchrun for :func:`lsq.distributed.launch`:

    python -m torch.distributed.run --standalone --nproc-per-node N -m lsq.train_worker RUN_FOLDER

It trains the run folder's config with :func:`lsq.train.train` and reports through the folder's event stream
(:class:`lsq.distributed.Events`). It asks the kernel for SIGKILL when torchrun dies before it imports the
training code (about 5 s on 2 cores), so a torchrun killed in that window takes the worker with it: that
ordering is why the training modules are imported inside :func:`main`.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from lsq.errors import LsqError
from lsq.processes import die_with_parent_by


def main(argv: list[str]) -> int:
    """Train the run folder's config; errors become events and exit 2."""
    die_with_parent_by(signal.SIGKILL)()  # torchrun gone (kill -9): so are we
    from lsq.distributed import Events
    from lsq.train import train
    from lsq.train_config import TrainConfig

    run = Path(argv[0])
    events = Events(run)
    try:
        cfg = TrainConfig.model_validate_json((run / "config.json").read_text())
        result = train(cfg, log=events.log, on_checkpoint=events.checkpoint)
        events.emit(result=result.to_json())
    except LsqError as exc:
        events.emit(error=str(exc), every_rank=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
