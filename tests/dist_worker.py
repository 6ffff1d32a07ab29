"""One rank of a data-parallel test run, started by torchrun: joins the run, then runs each configuration of a JSON
file ({name: [run arguments]}) through the CLI into OUT/NAME (rank 0 writes), one after another in one process
group: one launch for all of them, since each torchrun start costs seconds.

    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py RUNS.json OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from typer.testing import CliRunner

from taylorprune import distributed
from taylorprune.cli import app


def main() -> None:
    runs, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    distributed.init()
    for name, args in runs.items():
        res = CliRunner().invoke(app, ["run", *args, "--output", str(out / name), "--overwrite"])
        if res.exit_code != 0:
            print(f"{name}: exit {res.exit_code}: {res.output[-2000:]}", file=sys.stderr)
            sys.exit(1)
    distributed.shutdown()


if __name__ == "__main__":
    main()
