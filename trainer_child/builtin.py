"""Build the offline model and dataset behind ``builtin:tiny-gpt2`` and ``builtin:tiny``.

Tests, the demo and CI must train a real HF model with no network, and two
machines must get the very same model so results and checksums compare. So the
model is built from nothing but the corpus shipped in ``data/tiny.txt``:

* the tokenizer is a byte-level BPE trained by ``tokenizers`` (its trainer breaks
  ties deterministically, so the vocabulary and merges are a pure function of the
  corpus);
* the weights come from Python's Mersenne Twister, not from torch's RNG: torch's
  CPU ``normal_`` takes vectorised code paths that depend on the CPU's
  instruction set, while ``random.Random(seed).random()`` is the same everywhere.

The result is saved with ``save_pretrained`` into
``$XDG_CACHE_HOME/trainwarden/<name>-<recipe digest>/`` and then loaded through
``from_pretrained`` like any local model, so the built-in path exercises the same
code as a real one. Builds happen in a temporary folder that is renamed into
place, so concurrent builders never see (or clash on) a half-written model.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trainer_child.protocol import fsync_dir

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_MODELS",
    "TINY_DATASET",
    "TINY_GPT2",
    "build_tiny_gpt2",
    "cache_root",
    "corpus_lines",
    "ensure_tiny_gpt2",
    "tiny_dataset",
]

log = logging.getLogger("trainer_child")

TINY_GPT2 = "builtin:tiny-gpt2"
TINY_DATASET = "builtin:tiny"
BUILTIN_MODELS = (TINY_GPT2,)
BUILTIN_DATASETS = (TINY_DATASET,)

#: Bump when the recipe below changes, so caches built by an older recipe are ignored.
RECIPE_VERSION = 1
SEED = 20240611
EOS = "<|endoftext|>"
VOCAB_SIZE = 512
# About 46k parameters (~190 kB of float32): big enough to be a real GPT-2, small
# enough that a CPU trains a step in milliseconds.
N_EMBD = 32
N_LAYER = 2
N_HEAD = 2
N_POSITIONS = 128
#: GPT-2's initialiser uses N(0, 0.02); a uniform law with the same spread avoids libm.
INIT_STD = 0.02


def corpus_lines() -> list[str]:
    """Return the non-empty lines of the shipped corpus (``trainer_child/data/tiny.txt``)."""
    text = importlib.resources.files("trainer_child").joinpath("data/tiny.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def tiny_dataset() -> Any:
    """Return ``builtin:tiny`` as an in-memory ``datasets.Dataset`` with a ``text`` column."""
    import datasets

    return datasets.Dataset.from_dict({"text": corpus_lines()})


def cache_root() -> Path:
    """Return ``$XDG_CACHE_HOME/trainwarden`` (``~/.cache/trainwarden`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "trainwarden"


def _recipe_digest() -> str:
    # Everything that changes the bytes: the recipe, the corpus, and the library
    # versions that serialise config and tokenizer files.
    import tokenizers
    import transformers

    hasher = hashlib.sha256()
    for part in (
        f"recipe={RECIPE_VERSION}",
        f"transformers={transformers.__version__}",
        f"tokenizers={tokenizers.__version__}",
        *corpus_lines(),
    ):
        hasher.update(part.encode())
        hasher.update(b"\n")
    return hasher.hexdigest()[:12]


def ensure_tiny_gpt2() -> Path:
    """Return the folder of ``builtin:tiny-gpt2``, building it into the cache if needed."""
    root = cache_root()
    target = root / f"tiny-gpt2-{_recipe_digest()}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-gpt2-build-", dir=root))
    try:
        build_tiny_gpt2(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another builder renamed its copy in first; theirs is byte-identical.
            if not target.is_dir():
                raise
        else:
            fsync_dir(root)
            log.info("builtin_model_built path=%s", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _train_tokenizer(lines: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=N_POSITIONS,
    )


def _seeded_weights(model: Any) -> None:
    """Overwrite every parameter from a platform-independent generator."""
    import torch

    rng = random.Random(SEED)
    bound = INIT_STD * math.sqrt(3.0)  # uniform(-b, b) has standard deviation b / sqrt(3)
    with torch.no_grad():
        # named_parameters() lists a tied tensor (wte / lm_head) once, in a fixed order.
        for name, param in model.named_parameters():
            if ".ln_" in name:  # layer norms start as the identity
                param.fill_(1.0 if name.endswith(".weight") else 0.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                values = [(2.0 * rng.random() - 1.0) * bound for _ in range(param.numel())]
                param.copy_(torch.tensor(values, dtype=torch.float64).reshape(param.shape))


def build_tiny_gpt2(folder: Path) -> None:
    """Write the tiny GPT-2 and its tokenizer into ``folder``, fsynced (byte-identical)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _train_tokenizer(corpus_lines())
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    _seeded_weights(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(folder)
