"""A script that parses FAM's flags (``FAMTrainingArguments``) but trains with transformers' plain ``Trainer``: every
run of it trains plainly, whatever ``--fam_lambda`` or ``--sam_rho`` says. Run as it is (``fam-hf compare
--no-launch``), its FAM and SAM runs must fail verification, not pass as FAM or SAM."""

from launch_classification import DataTrainingArguments, Generated, ModelArguments, compute_metrics
from transformers import AutoConfig, AutoModelForSequenceClassification, HfArgumentParser, Trainer, set_seed

from fam_hf import FAMTrainingArguments


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, FAMTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)
    config = AutoConfig.for_model(
        "bert",
        vocab_size=40,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * model_args.hidden_size,
        num_labels=3,
    )
    trainer = Trainer(
        model=AutoModelForSequenceClassification.from_config(config),
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
