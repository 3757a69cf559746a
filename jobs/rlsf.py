"""The whole pipeline as one Ray job (ALMoST: synthetic feedback, RMSP, SFT, RLSF, evaluation, report).

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"excludes": ["runs/", ".venv/", ".git/"], "env_vars": {"PYTHONUNBUFFERED": "1"}}' \\
        -- python jobs/rlsf.py --config configs/demo.yaml [--from STAGE] [--until STAGE] [--only STAGE,...] \\
           [--with train_dpo,ppo_grpo,rm_score]

The flags are `almost-ray pipeline`'s (the same parser, `almost_ray.cli`). `RAY_AUTH_MODE=token` makes the
client send the head's token (Ray's token authentication; docs/pipeline.md). Inside a job the driver joins
the job's cluster (`RAY_ADDRESS`), prints a banner and a one-line summary per stage into the job log, and
exits 0 when every selected stage finished, 2 for a config or input error (the message names the field
or file), 1 with the traceback for anything else: the job then ends FAILED. See docs/pipeline.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run the code this job was submitted with (the uploaded working_dir), not an older installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from almost_ray import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli.main(["pipeline", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
