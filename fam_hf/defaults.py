"""The FAM settings' names and defaults, in one torch-free module that the library and its tools both read."""

GRADIENT_MODES = ("full", "head", "weights")  # what the penalty trains: see FAMTrainingArguments.fam_gradient
# "auto": "head" where the head trains, "full" where it is frozen (LoRA on the backbone); resolved when training starts
GRADIENT_CHOICES = ("auto", *GRADIENT_MODES)
LOSSES = ("cross_entropy", "mse", "bce")  # the losses with a closed form, and the names fam_loss accepts
DEFAULT_MODE = "auto"  # FAMTrainingArguments.fam_gradient
DEFAULT_SHARE = 0.001  # FAMTrainingArguments.fam_share: the penalty's share of the first batch's task loss
# fam-hf launch writes what the script's FAM trainers did to the file this variable names; fam-hf compare reads it
LAUNCH_RECORD_VARIABLE = "FAM_HF_LAUNCH_RECORD"
# a JSON object {field: value} that every FAM training-arguments object in a launched process tree takes; fam-hf
# launch sets it from its options, fam-hf compare for each run
SETTINGS_VARIABLE = "FAM_HF_SETTINGS"
