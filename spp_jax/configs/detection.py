"""Detection: SPP-net's object detector on the built-in ``spp_scenes`` data, end to end.

Command (from any directory)::

    spp-jax detect-train --config detection --workdir /tmp/spp_det

Runs every stage of :func:`spp_jax.detection.pipeline.detect_train`, each resumable, in
under 20 minutes on 2 CPU cores, the backbone included (``docs/detection.md`` lists the
stages, with their measured times, and the test mAP over seeds). The run's ``seed`` draws
the backbone's initialisation and data order as well as fine-tuning's.

Schedule. The backbone is ``default`` on ``spp_shapes`` (the same ten classes) on the
``paper`` grid's converged schedule (``backbone_overrides``): 48 epochs on random crops
of 35-100 % of the image's area. At 32 epochs some seeds were still learning, so the
backbone's accuracy, and the detector's mAP with it, moved by several points from seed to
seed and from one CPU to another; at 48 epochs every seed of the grid had converged to
within a point (``docs/training.md``, "The paper's classification findings"). Fine-tuning
runs 6,000 steps at lr 0.03 with dropout 0.2, each chosen on the validation mAP
(``docs/detection.md``, "How the default got from 27 % to 60 %"; every probe in
``experiments/results/detection_probes.json``).

Scales: the paper's {480, 576, 688, 864, 1200} (1 scale: 688) are for VOC's 500 x 375
images and a network trained on 224-pixel crops; here the images are 160-320 pixels
and the backbone was trained on 112-pixel crops, so the scales are the paper's times
480 / 688 (the median image's short side 240 scaled like VOC's 375 -> 688), and a
window's scale is the one where its area is closest to 112**2.

``window_context`` (1: the paper's rule) pools each window enlarged about its centre.
The backbone saw its objects with context (they fill 20-80 % of the short side of its
crops), and with context its own classifier head labels more ground-truth boxes right;
but detection got worse in the probes (enlarged windows of a box and of its near misses
look alike), so the default keeps the paper's rule.

Every key of a detection config is here; ``detection_voc07`` overrides some.
"""

import ml_collections

KIND = "detection"  # spp-jax detect-train; spp_jax.configs.available("detection")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Data: a TFDS detection dataset in the VOC format (spp_jax.detection.voc).
    c.dataset = "spp_scenes"
    c.data_dir = None
    c.train_split = "train"
    c.val_split = "validation"  # model selection (never the test split)
    c.test_split = "test"

    # Backbone: a classifier trained with `spp-jax train`; None: train one first with
    # the classification config `backbone_config` (in WORKDIR/backbone).
    c.backbone_workdir = None
    c.backbone_config = "default"
    c.backbone_overrides = ml_collections.ConfigDict({"num_epochs": 48, "min_crop_area": 0.35})
    c.train_backbone = True  # False: backbone_workdir is required

    # Proposals (spp_jax.detection.proposals): OpenCV selective search, fast mode.
    c.proposals = ml_collections.ConfigDict()
    c.proposals.mode = "fast"
    c.proposals.max_boxes = 2000
    c.proposals.min_size = 10.0  # boxes narrower or shorter are dropped
    # Search a copy whose longer side is at most this (None: full size); boxes map back to
    # the image's pixels. R-CNN's and SPP-net's ~500 px; spp_scenes (<= 320 px) is
    # searched full-size either way. README, "Photos of any size".
    c.proposals.max_side = 500
    c.proposals.num_workers = None  # None: every core
    c.proposals.cache_dir = None  # None: WORKDIR/proposals

    # Features (spp_jax.detection.features).
    c.scales = (336, 400, 480, 600, 840)  # the paper's 5 scales times 480 / 688
    c.single_scale = 480  # the 1-scale setting (the paper's 688)
    c.window_context = 1.0  # > 1: windows pooled enlarged about their centres (see above)
    c.window_target = 112  # a window's scale: its area closest to window_target**2
    c.window_rule = "paper"  # paper | code
    # Window pyramid (max-pooled from conv5): None takes the backbone head's levels, the
    # vector its fc6 was trained on ((6, 3, 2, 1) here; (6,) / (7,) for an imported
    # torchvision AlexNet / VGG-16): spp_jax.detection.stages.window_pyramid.
    c.levels = None
    # How a window becomes its pyramid vector: "max" (the paper's max-pooled bins) or
    # "align" (an ablation: RoIAlign at each level's size, the average of 2 x 2 bilinear
    # samples per bin; spp_jax.detection.features.pool_windows). The backbone's fc6 was
    # trained on max-pooled bins either way.
    c.window_pool = "max"
    c.max_side = 2000  # cap on the resized image's longer side (memory)
    c.image_bucket = 64  # padded image sizes (one conv compile each)

    # Fine-tuning fc6, fc7 and a new (K+1)-way fc8, conv frozen.
    c.finetune = ml_collections.ConfigDict()
    c.finetune.enabled = True
    c.finetune.steps = 6000  # see the docstring
    c.finetune.batch_size = 128
    c.finetune.fg_fraction = 0.25
    c.finetune.fg_iou = 0.5
    c.finetune.bg_iou = (0.1, 0.5)
    c.finetune.scales = "all"  # all: the 5 scales (random_scale picks one per window) | single
    c.finetune.random_scale = True  # else each window at its test-time scale
    c.finetune.flip = True  # mirrored images' maps too
    c.finetune.optimizer = "sgd"
    c.finetune.learning_rate = 0.03  # see the docstring
    c.finetune.momentum = 0.9
    c.finetune.weight_decay = 5e-4
    c.finetune.lr_boundaries = (0.6, 0.85)  # /10 at these fractions (the code: 1e-3 -> 1e-5)
    c.finetune.dropout_rate = 0.2  # see the docstring
    c.finetune.eval_every = 500  # validation mAP (softmax scores, 1 scale): keep the best

    # SVMs (liblinear, spp_jax.detection.svm) on fc7.
    c.svm = ml_collections.ConfigDict()
    c.svm.C = 0.001
    c.svm.pos_weight = 2.0
    c.svm.bias_feature = 10.0
    c.svm.neg_iou = 0.3
    c.svm.hard_thresh = -1.0001
    c.svm.evict_thresh = -1.2
    c.svm.retrain_every = 2000
    c.svm.feature_norm = 20.0
    # liblinear's stopping tolerance: 1e-4 stops much sooner than 1e-5 on 10,000 hard
    # negatives x 512-d, at an objective equal to a few parts per million.
    c.svm.tol = 1e-4

    # Box regression (spp_jax.detection.bbox_regression) on pooled conv5 features.
    c.bbox = ml_collections.ConfigDict()
    c.bbox.enabled = True
    c.bbox.lam = 4000.0  # the SPP-net code's (R-CNN: 1000)
    c.bbox.min_iou = 0.5  # the code's (R-CNN: 0.6)

    # Test.
    c.test = ml_collections.ConfigDict()
    c.test.scales = (1, 5)  # evaluate at 1 scale and at 5 scales
    c.test.scorer = "svm"  # svm | softmax
    c.test.score_thresh = -1.5  # SVM scores below are dropped (the code)
    c.test.nms_iou = 0.3
    c.test.max_per_image = 100
    c.test.draw_images = 6  # test images drawn with their detections in WORKDIR/eval/
    c.test.svd_rank = 128  # also evaluate fc6/fc7 as rank-128 truncated SVDs (0: don't)
    return c
