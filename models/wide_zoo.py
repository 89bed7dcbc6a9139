"""The wide zoo: enough clean and backdoored models, over enough architectures and attacks, to measure
a false-positive rate of a few percent and to choose the gate's thresholds by cross-validation.

Per dataset (GTSRB, CIFAR-10): 24 clean and 24 backdoored models, 12 per architecture family
(:mod:`models.architectures`: ``small_cnn_v1`` and ``deep_cnn`` at width 1, ``resnet_bn`` and
``mobilenet_dw`` at widths 1 and 2), export variants rotating as in the forge's first zoo. The ONNX files
and manifests are committed (no torch weights: about 50 MB for all 96). The 24 backdoored models of a
dataset carry, spread over the four families:

* BadNets patches of 1-6 px, at a corner, an edge, the centre or anywhere (8 models, 2 per family);
* blended triggers with alpha 0.1 and 0.2 (2 each);
* SIG, a horizontal sinusoid of amplitude 20/255 (Barni et al. 2019), clean-label: only target-class
  training images carry it (4);
* label-consistent (Turner et al. 2019; B3D paper App. F.1): a patch on target-class images only, each
  first made hard to learn by mixing it half-and-half with a random image of another class (4);
* two and three targets, each with its own patch (2 each).

Every spec is seeded; ``python -m models.forge --wide-zoo`` builds the missing ones (resumable) and a
model's manifest records its truth (targets, triggers) and its measured clean accuracy and ASR.
"""

from __future__ import annotations

NCHW1 = {"layout": "NCHW", "value_range": 1, "normalize": False}
NHWC255 = {"layout": "NHWC", "value_range": 255, "normalize": False}
NCHW1_NORM = {"layout": "NCHW", "value_range": 1, "normalize": True}
EXPORTS = [(NCHW1, "logits"), (NHWC255, "probs"), (NCHW1_NORM, "logits"), (NCHW1, "probs"),
           (NHWC255, "logits"), (NCHW1_NORM, "probs")]

# (family, width) of the 12 models of each family, in order: widths alternate where a family has two
FAMILIES = {
    "small_cnn_v1": (1,),
    "deep_cnn": (1,),
    "resnet_bn": (1, 2),
    "mobilenet_dw": (1, 2),
}
EPOCHS = {"gtsrb": 12, "cifar": 30}

# the 24 attacks of a dataset, (attack, params, poison rate), six per family: two BadNets patches, one blend,
# one SIG, one label-consistent, one multi-target each
ATTACKS = [
    ("badnets", {"sizes": [1], "position": "corner"}, 0.10),
    ("badnets", {"sizes": [4], "position": "random"}, 0.10),
    ("blended", {"alpha": 0.1}, 0.10),
    ("sig", {"delta": 20 / 255, "freq": 6}, 1.0),
    ("label_consistent", {"sizes": [3], "position": "corner", "mix": 0.5}, 0.8),
    ("multi", {"sizes": [3, 3], "position": "random"}, 0.10),

    ("badnets", {"sizes": [2], "position": "edge"}, 0.10),
    ("badnets", {"sizes": [5], "position": "corner"}, 0.10),
    ("blended", {"alpha": 0.2}, 0.10),
    ("sig", {"delta": 20 / 255, "freq": 6}, 1.0),
    ("label_consistent", {"sizes": [4], "position": "edge", "mix": 0.5}, 0.8),
    ("multi", {"sizes": [2, 3, 4], "position": "random"}, 0.10),

    ("badnets", {"sizes": [3], "position": "centre"}, 0.10),
    ("badnets", {"sizes": [6], "position": "edge"}, 0.10),
    ("blended", {"alpha": 0.1}, 0.10),
    ("sig", {"delta": 20 / 255, "freq": 6}, 1.0),
    ("label_consistent", {"sizes": [3], "position": "random", "mix": 0.5}, 0.8),
    ("multi", {"sizes": [3, 3], "position": "corner"}, 0.10),

    ("badnets", {"sizes": [2], "position": "random"}, 0.10),
    ("badnets", {"sizes": [1], "position": "centre"}, 0.10),
    ("blended", {"alpha": 0.2}, 0.10),
    ("sig", {"delta": 20 / 255, "freq": 6}, 1.0),
    ("label_consistent", {"sizes": [5], "position": "centre", "mix": 0.5}, 0.8),
    ("multi", {"sizes": [3, 2, 3], "position": "edge"}, 0.10),
]
CLEAN_PER_FAMILY = 6


def wide_zoo_specs() -> list[dict]:
    """All 96 specs, in build order: datasets and families interleaved, clean and backdoored alternating,
    so that any prefix of the build is a balanced sample of the zoo."""
    per_dataset = {}
    for d_index, dataset in enumerate(("cifar", "gtsrb")):
        rows = []
        for f_index, (family, widths) in enumerate(FAMILIES.items()):
            block = ATTACKS[6 * f_index:6 * f_index + 6]
            attacks = block[f_index:] + block[:f_index]  # each family's first backdoor of another kind
            for i in range(CLEAN_PER_FAMILY):
                for backdoored in (False, True):
                    n = len(rows)
                    seed = 10_000 + 1_000 * d_index + n
                    variant, out_kind = EXPORTS[n % len(EXPORTS)]
                    attack, params, rate = ("clean", {}, 0.0) if not backdoored else attacks[i]
                    tag = "clean" if not backdoored else attack
                    epochs = EPOCHS[dataset]
                    if dataset == "cifar" and params.get("sizes") == [1]:  # measured: 10 % gave ASR 0.16
                        rate, epochs = 0.20, 50
                    rows.append({
                        "name": f"w_{dataset}_{family}_{tag}_{n:02d}", "dataset": dataset, "seed": seed,
                        "arch": family, "width": widths[i % len(widths)], "attack": attack, "params": params,
                        "variant": variant, "output_kind": out_kind, "poison_rate": rate,
                        "epochs": epochs,
                    })
        # interleave the families: clean/backdoored pairs of family 0, 1, 2, 3, then the next pairs
        order = sorted(range(len(rows)), key=lambda j: ((j % 12) // 2, j // 12, j % 2))
        per_dataset[dataset] = [rows[j] for j in order]
    cifar, gtsrb = per_dataset["cifar"], per_dataset["gtsrb"]
    return [s for pair in zip(cifar, gtsrb, strict=True) for s in pair]


WIDE_ZOO_SPECS = wide_zoo_specs()
