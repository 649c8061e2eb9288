"""``spp-jax train`` uninterrupted vs SIGKILLed at random moments: same records?

Run (from the repository root; two full runs of the config, ~8 minutes each for
``default`` on 2 idle CPU cores)::

    python experiments/kill_check.py --config default --root /tmp/kill_check \\
        --out experiments/results/kill_check_default.json

Trains ``--config`` once without interruption (``ROOT/whole``), then again in
``ROOT/killed``, killing the process with SIGKILL after a random 20-150 s (seeded) up to
``--kills`` times and rerunning the same command each time until it finishes. Then
compares the two ``metrics.jsonl`` files, every record but the wall times and the
per-process compile counts, and the final evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(workdir: str) -> list[dict]:
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            r.pop("epoch_seconds", None)
            r.pop("train_compiles", None)
            out.append(r)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--root", required=True, help="the two workdirs go here")
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=REPO)

    def cmd(name: str) -> list[str]:
        wd = os.path.join(args.root, name)
        return [sys.executable, "-m", "spp_jax", "train", "--config", args.config, "--workdir", wd]

    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env, "cwd": REPO}
    t0 = time.time()
    subprocess.run(cmd("whole"), check=True, **quiet)
    print(f"uninterrupted run done in {time.time() - t0:.0f} s", flush=True)
    rng, delays = random.Random(args.seed), []
    while True:
        proc = subprocess.Popen(cmd("killed"), **quiet)
        delay = rng.uniform(20, 150) if len(delays) < args.kills else None
        try:
            rc = proc.wait(timeout=delay)
            break
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            delays.append(delay)
            print(f"killed after {delay:.0f} s (kill {len(delays)})", flush=True)
    whole = _records(os.path.join(args.root, "whole"))
    killed = _records(os.path.join(args.root, "killed"))
    result = {
        "config": args.config,
        "kills_after_seconds": delays,
        "last_exit_status": rc,
        "records": len(whole),
        "records_equal": whole == killed,
        "final_equal": whole[-1] == killed[-1],
        "final_metrics": killed[-1].get("metrics"),
    }
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
