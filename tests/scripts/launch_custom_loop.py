"""A script that parses transformers' ``TrainingArguments`` but trains in a loop of its own, with no ``Trainer``:
there is nothing for ``fam-hf launch`` to instrument, and it must say so instead of passing for a FAM run."""

import json
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments, set_seed


def main() -> None:
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    set_seed(args.seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    features, labels = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(max(args.max_steps, 1)):
        loss = torch.nn.functional.cross_entropy(model(features), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "eval_results.json").write_text(json.dumps({"eval_loss": loss.item()}))


if __name__ == "__main__":
    main()
