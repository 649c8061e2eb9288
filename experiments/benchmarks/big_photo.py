"""``spp-jax detect`` on a phone-sized photo against a VOC-sized image: time and memory.

Run on a finished ``detect-train`` workdir::

    python experiments/benchmarks/big_photo.py --workdir runs/det \\
        --out experiments/results/big_photo.json

Makes one synthetic scene (coloured shapes on a textured background) as a 4000 x 3000
JPEG and the same scene at 500 x 375, then times ``spp-jax detect`` on each, every
call a fresh process as a user runs it (start-up and compiling included), under
``/usr/bin/time`` for the peak resident memory. Each size runs ``--repeats`` times;
the report gives the median. With ``--full-size`` the proposals are also computed on
the whole 12-megapixel image (``proposals.max_side=None`` in a copy of the workdir's
config), the behaviour before the downscaled search, for comparison. The workdir's
detector runs with the ``detection`` config's scales (one scale: short side 480), so a
small trunk (``detection_tiny``'s) shows the costs of decoding and proposals that the
default detector meets; ``--own-scales`` keeps the workdir's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Shapes on a noisy, shaded background, drawn at ``h x w``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    image = np.stack([90 + 60 * xx, 100 + 50 * yy, 110 + 30 * xx * yy], axis=-1)
    image += rng.normal(0, 12, (h, w, 3))
    for y0, x0, y1, x1, color in [
        (0.15, 0.10, 0.55, 0.45, (220, 40, 40)),
        (0.50, 0.50, 0.90, 0.85, (40, 200, 60)),
        (0.20, 0.60, 0.40, 0.90, (240, 220, 50)),
    ]:
        image[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)] = color
    return np.clip(image, 0, 255).astype(np.uint8)


def timed_detect(workdir: str, image: str, out: str) -> dict:
    cmd = [sys.executable, "-m", "spp_jax", "detect", "--workdir", workdir]
    cmd += ["--images", image, "--out", out]
    env = dict(os.environ, PYTHONPATH=REPO)
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    rss = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("MAXRSS")]
    with open(os.path.join(out, "detections.json")) as f:
        rec = json.load(f)["images"][0]
    return {
        "seconds": seconds,
        "peak_rss_mib": rss[-1] / 1024,
        "num_proposals": rec["num_proposals"],
        "decoded_size": rec["decoded_size"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a finished detect-train workdir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-size", action="store_true", help="also without max_side")
    parser.add_argument(
        "--own-scales",
        action="store_true",
        help="keep the workdir's scales (default: the detection config's, 480 for 1 scale)",
    )
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    from PIL import Image

    sys.path.insert(0, REPO)
    from spp_jax._cpu import tune

    tmp = tempfile.mkdtemp()
    big = scene(3000, 4000)
    paths = {"4000x3000": os.path.join(tmp, "photo.jpg"), "500x375": os.path.join(tmp, "small.jpg")}
    Image.fromarray(big).save(paths["4000x3000"], quality=92)
    Image.fromarray(big).resize((500, 375), Image.Resampling.LANCZOS).save(
        paths["500x375"], quality=92
    )
    from spp_jax.configs import detection

    default = detection.get_config()

    def workdir_copy(name: str, max_side: int | None) -> str:
        """The workdir with the default config's scales (unless --own-scales), so the
        images are decoded and resized as the default detector does."""
        copy = os.path.join(tmp, name)
        shutil.copytree(args.workdir, copy, symlinks=True)
        cfg_path = os.path.join(copy, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["proposals"]["max_side"] = max_side
        if not args.own_scales:
            cfg["scales"], cfg["single_scale"] = list(default.scales), default.single_scale
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        return copy

    workdirs = {"max_side": workdir_copy("max_side", default.proposals.max_side)}
    if args.full_size:
        workdirs["full_size"] = workdir_copy("full_size", None)
    rows = []
    for setting, wd in workdirs.items():
        for name, path in paths.items():
            if setting == "full_size" and name == "500x375":
                continue
            runs = [
                timed_detect(wd, path, os.path.join(tmp, f"out_{setting}_{name}_{i}"))
                for i in range(args.repeats)
            ]
            row = {
                "setting": setting,
                "image": name,
                "seconds_median": statistics.median(r["seconds"] for r in runs),
                "seconds": [r["seconds"] for r in runs],
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                "num_proposals": runs[0]["num_proposals"],
                "decoded_size": runs[0]["decoded_size"],
            }
            rows.append(row)
            print(
                f"{setting:9s} {name:9s}: {row['seconds_median']:.1f} s (median of "
                f"{len(runs)}), peak {row['peak_rss_mib']:.0f} MiB, {row['num_proposals']} "
                f"proposals, decoded {row['decoded_size']}",
                flush=True,
            )
    by = {(r["setting"], r["image"]): r for r in rows}
    big_s = by["max_side", "4000x3000"]["seconds_median"]
    ratio = big_s / by["max_side", "500x375"]["seconds_median"]
    print(f"4000 x 3000 / 500 x 375 time: {ratio:.2f}x")
    result = {
        "meta": {
            "workdir": os.path.abspath(args.workdir),
            "cpu": tune.cpu_description(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "repeats": args.repeats,
        },
        "rows": rows,
        "time_ratio_big_over_small": ratio,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
