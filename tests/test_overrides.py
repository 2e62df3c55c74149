"""FAM's overrides of Trainer methods pass on what they do not know: a keyword of a later transformers reaches the
Trainer below instead of raising a ``TypeError``."""

import inspect

import pytest
import torch
from tiny_models import as_dataset, batch_for, build, collator, sgd_args
from transformers import Trainer

from fam_hf.sam import SAMMixin
from fam_hf.trainer import FAMMixin

OVERRIDES = ("compute_loss", "training_step", "evaluation_loop", "log", "save_model", "create_model_card")


class LaterTrainer(Trainer):
    """A Trainer of a later transformers: each method takes a new keyword, ``future_kw``, and records it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.future_kws = {name: [] for name in OVERRIDES}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, future_kw=None):
        self.future_kws["compute_loss"].append((future_kw, model.training))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None, future_kw=None):
        self.future_kws["training_step"].append(future_kw)
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluation_loop(
        self,
        dataloader,
        description,
        prediction_loss_only=None,
        ignore_keys=None,
        metric_key_prefix="eval",
        future_kw=None,
    ):
        self.future_kws["evaluation_loop"].append(future_kw)
        return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

    def log(self, logs, start_time=None, future_kw=None):
        self.future_kws["log"].append(future_kw)
        return super().log(logs, start_time)

    def save_model(self, output_dir=None, _internal_call=False, future_kw=None):
        self.future_kws["save_model"].append(future_kw)
        return super().save_model(output_dir, _internal_call)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, future_kw=None):
        self.future_kws["create_model_card"].append(future_kw)
        return super().create_model_card(language, license, tags, model_name)


class FAMLaterTrainer(FAMMixin, SAMMixin, LaterTrainer):
    """The later transformers calls FAM's overrides with ``future_kw="later"``: FAMMixin and SAMMixin pass it on."""


def _caller(name):
    def call(self, *args, **kwargs):
        return getattr(super(FAMLaterTrainer, self), name)(*args, future_kw="later", **kwargs)

    return call


class CallingTrainer(FAMLaterTrainer):
    """Stands for the later Trainer's own calls into its methods, which pass the new keyword."""


for _name in OVERRIDES:
    setattr(CallingTrainer, _name, _caller(_name))


@pytest.mark.parametrize("sam_rho", [0.0, 0.05])
def test_every_override_passes_a_new_keyword_on_to_the_trainer(tmp_path, sam_rho):
    model = build("bert", "sequence", dtype=torch.float32)
    data = as_dataset(batch_for(model, size=4))
    args = sgd_args(tmp_path, batch_size=4, fam_lambda=0.1, sam_rho=sam_rho)
    trainer = CallingTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collator(model.dtype)
    )
    trainer.train()
    trainer.evaluate()
    trainer.save_model(str(tmp_path / "saved"))
    trainer.create_model_card(model_name="tiny")

    seen = trainer.future_kws
    assert all("later" in seen[name] for name in OVERRIDES if name != "compute_loss"), seen
    assert ("later", True) in seen["compute_loss"] and ("later", False) in seen["compute_loss"], seen["compute_loss"]
    assert seen["training_step"].count("later") == (2 if sam_rho else 1)  # SAM's second pass passes it on too
    assert (tmp_path / "saved" / "fam_config.json").exists() and (tmp_path / "README.md").exists()


@pytest.mark.parametrize("mixin", [FAMMixin, SAMMixin])
def test_every_override_of_a_trainer_method_takes_args_and_kwargs(mixin):
    overrides = [name for name, value in vars(mixin).items() if callable(value) and hasattr(Trainer, name)]
    assert overrides
    for name in overrides:
        kinds = {p.kind for p in inspect.signature(getattr(mixin, name)).parameters.values()}
        assert {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds, f"{mixin.__name__}.{name}"
