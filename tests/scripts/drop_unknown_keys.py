"""A framework in the shape of axolotl: it reads a YAML config, keeps only the keys of its own schema (dropping the
others silently, ``fam_*`` keys included), builds the ``TrainingArguments`` itself, trains with the plain ``Trainer``
and saves with ``model.save_pretrained``. It leaves the root logger at WARNING and knows nothing of FAM.

    python drop_unknown_keys.py CONFIG.yaml

``set_after`` (a mapping) is set on the training arguments after they are built, as some frameworks do.
"""

import dataclasses
import json
import sys
from pathlib import Path

import yaml
from launch_classification import Generated, ModelArguments, build_model
from transformers import Trainer, TrainingArguments


@dataclasses.dataclass
class Schema:
    output_dir: str = "out"
    max_steps: int = 3
    learning_rate: float = 5e-5
    seed: int = 42
    logging_steps: int = 1
    per_device_train_batch_size: int = 8
    set_after: dict = dataclasses.field(default_factory=dict)


def main() -> None:
    config = yaml.safe_load(Path(sys.argv[1]).read_text()) or {}
    known = {field.name for field in dataclasses.fields(Schema)}
    schema = Schema(**{key: value for key, value in config.items() if key in known})
    args = TrainingArguments(
        output_dir=schema.output_dir,
        max_steps=schema.max_steps,
        learning_rate=schema.learning_rate,
        seed=schema.seed,
        logging_steps=schema.logging_steps,
        per_device_train_batch_size=schema.per_device_train_batch_size,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    for name, value in schema.set_after.items():
        setattr(args, name, value)
    model = build_model(ModelArguments())
    Trainer(model=model, args=args, train_dataset=Generated(64, 8, seed=args.seed)).train()
    model.save_pretrained(args.output_dir)
    seen = {"seed": args.seed, "output_dir": args.output_dir}
    (Path(args.output_dir) / "args_seen.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
