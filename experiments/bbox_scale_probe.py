"""Box regression at 1 scale: regressors trained on 1-scale features vs the shipped ones.

The pipeline trains one set of box regressors on pooled conv5 features with each window
at its own one of the 5 scales, and uses it at both test settings. At 1 scale the test
features come from the single scale's map only. This probe trains a second set on
1-scale features of the training split and compares the two at 1 scale on the test split.

Run (about 1.5 minutes on 2 CPU cores) on a finished ``detect-train`` workdir::

    python experiments/bbox_scale_probe.py --workdir runs/det --out results/bbox_scale_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from spp_jax.detection import pipeline, stages


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a finished detect-train workdir")
    ap.add_argument("--out", help="JSON file for the two mAPs")
    args = ap.parse_args(argv)

    det = pipeline.load_detector(args.workdir, scorer="svm")
    if det.regressors is None:
        raise SystemExit(f"{args.workdir} has no box regressors (bbox.npz): nothing to compare")
    config = pipeline.load_run_config(args.workdir)
    train = stages.load_split(config.dataset, config.train_split, config.data_dir)
    test = stages.load_split(config.dataset, config.test_split, config.data_dir)
    train_props = stages.workdir_proposals(config, args.workdir, train)
    test_props = stages.workdir_proposals(config, args.workdir, test)
    test_maps = stages.split_maps(det, test, det.scales(1))

    def test_map() -> float:
        dets = [
            det.detect(test.images[i], test_props[i], num_scales=1, scorer="svm",
                       maps=[m[i] for m in test_maps])
            for i in range(len(test))
        ]  # fmt: skip
        return float(stages.evaluate(dets, test, det.num_classes, "voc07")["map"])

    result = {"regressors trained on 5-scale features (shipped)": test_map()}
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "stages"))
        train_maps = stages.split_maps(det, train, det.scales(1))
        det.regressors = stages.stage_bbox(config, tmp, det, train, train_props, train_maps)
    result["regressors trained on 1-scale features"] = test_map()
    for name, value in result.items():
        print(f"test mAP (VOC07) at 1 scale, SVM + box regression, {name}: {100 * value:.1f} %")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
