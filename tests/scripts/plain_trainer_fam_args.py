"""A script that parses FAM's flags (``FAMTrainingArguments``) but trains with transformers' plain ``Trainer``: every
run of it trains plainly, whatever ``--fam_lambda`` or ``--sam_rho`` says. Run as it is (``fam-hf compare
--no-launch``), its FAM and SAM runs must fail verification, not pass as FAM or SAM."""

from launch_classification import DataTrainingArguments, Generated, ModelArguments, build_model, compute_metrics
from transformers import HfArgumentParser, Trainer, set_seed

from fam_hf import FAMTrainingArguments


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, FAMTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)
    trainer = Trainer(
        model=build_model(model_args),
        args=training_args,
        train_dataset=Generated(data_args.max_train_samples, data_args.max_seq_length, seed=training_args.seed),
        eval_dataset=Generated(data_args.max_eval_samples, data_args.max_seq_length, seed=1000),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    trainer.save_metrics("eval", trainer.evaluate())


if __name__ == "__main__":
    main()
