"""Language-model workloads: one small LSTM language model and one batching scheme, on two corpora.

- `char-lm` (`CharLM`): bytes of a fixed list of Python standard-library sources (every CPython install has them), so
  it runs offline. The text is that of the running Python version, so its numbers compare only within a version.
- `wikitext2-lstm` (`WikiText2LSTM`): the tiny LSTM of the KOALA paper's supplement (Table 1: 2 layers, 200 hidden,
  200 embedding, dropout 0.65, tied embeddings) on the word-level WikiText-2 token files, read from
  `$KOALA_DATA_DIR/datasets/wikitext-2/`, or from the folder `data_dir` names (the folder itself or its parent).

Every batch starts from a zero LSTM state: no hidden state is carried across batches (unlike truncated BPTT over
contiguous streams in the classic recipe), so batches are independent and can be shuffled, and the per-token losses of
a batch depend only on that batch. Perplexities are therefore somewhat higher than those of state-carrying
evaluation, such as the published ones.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import sysconfig
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from koala.workloads.base import (
    PATH_FIELD,
    Batch,
    Mode,
    Range,
    Workload,
    WorkloadConfig,
    dataset_folders,
    model_device,
)

# Large pure-Python modules present in CPython 3.11 and later (none became a package or was removed), sorted so the
# concatenated text is the same on every install of one Python version.
STDLIB_SOURCES: tuple[str, ...] = (
    "argparse.py",
    "ast.py",
    "dataclasses.py",
    "difflib.py",
    "doctest.py",
    "enum.py",
    "inspect.py",
    "pickle.py",
    "pydoc.py",
    "subprocess.py",
    "tarfile.py",
    "typing.py",
)
VALIDATION_FRACTION = 0.1
WIKITEXT2_FOLDER = "wikitext-2"
WIKITEXT2_FILES: tuple[str, ...] = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")
WIKITEXT2_SOURCE = (
    "They are the tokenised WikiText-2 release by Merity et al. (wikitext-2-v1.zip, which unpacks to wikitext-2/; or "
    "the wikitext dataset, config wikitext-2-v1, on Hugging Face, each split's text rows written one per line)."
)
END_OF_SENTENCE = "<eos>"
UNKNOWN = "<unk>"


class LSTMLanguageModel(nn.Module):
    """Embedding -> dropout -> multi-layer LSTM -> dropout -> linear decoder, optionally tied to the embedding.

    The forward pass starts from a zero state; dropout is applied to the embeddings, between LSTM layers and to the
    LSTM output, as in the classic word-level recipe (PyTorch's word_language_model example).
    """

    def __init__(
        self, vocab_size: int, embedding: int, hidden: int, layers: int, dropout: float, tie_weights: bool
    ) -> None:
        super().__init__()
        if tie_weights and embedding != hidden:
            raise ValueError(f"tie_weights: needs embedding == hidden, got {embedding} and {hidden}")
        self.encoder = nn.Embedding(vocab_size, embedding)
        self.drop = nn.Dropout(dropout)
        # nn.LSTM only applies dropout between layers (and warns when there is just one).
        self.lstm = nn.LSTM(embedding, hidden, layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.encoder.weight

    def forward(self, inputs: Tensor) -> Tensor:
        """Logits (B, T, V) of the next token at every position of `inputs` (B, T)."""
        embedded = self.drop(self.encoder(inputs))  # (B, T, E)
        # No initial state given: every batch starts from zeros, so no hidden state is carried across batches.
        output, _ = self.lstm(embedded)  # (B, T, H)
        logits: Tensor = self.decoder(self.drop(output))  # (B, T, V)
        return logits


# The ranges of the language-model settings, declared once and used by every config that sets its own default.
LMBatchSize = Annotated[int, Range(1, 4096)]
SeqLen = Annotated[int, Range(1, 4096)]
Width = Annotated[int, Range(1, 4096)]  # embedding and hidden sizes
Layers = Annotated[int, Range(1, 8)]
Dropout = Annotated[float, Range(0.0, 0.99)]
#: The most tokens one batch may hold (batch_size * seq_len): with WikiText-2's 33,278-word vocabulary, the float32
#: logits of such a batch take 17 GB.
MAX_BATCH_TOKENS = 2**17


@dataclasses.dataclass(frozen=True)
class LanguageModelConfig(WorkloadConfig):
    """Settings of the LSTM language model and its batches; each workload sets its own defaults."""

    batch_size: LMBatchSize = 32
    seq_len: SeqLen = 64
    embedding: Width = 64
    hidden: Width = 128
    layers: Layers = 1
    dropout: Dropout = 0.0
    tie_weights: bool = False

    def validate(self) -> None:
        super().validate()
        if self.batch_size * self.seq_len > MAX_BATCH_TOKENS:
            raise ValueError(
                f"batch_size: batch_size * seq_len must be at most {MAX_BATCH_TOKENS} tokens per batch, got "
                f"{self.batch_size} * {self.seq_len} = {self.batch_size * self.seq_len}"
            )
        if self.tie_weights and self.embedding != self.hidden:
            raise ValueError(
                f"tie_weights: needs embedding == hidden, got embedding={self.embedding}, hidden={self.hidden}"
            )


@dataclasses.dataclass(frozen=True)
class CharLMConfig(LanguageModelConfig):
    # Use only the first limit_chars characters of the text (0: all).
    limit_chars: Annotated[int, Range(0, 1_000_000_000)] = 0

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"batch_size": 8, "seq_len": 16, "hidden": 16, "embedding": 8, "limit_chars": 4000}


@dataclasses.dataclass(frozen=True)
class WikiText2Config(LanguageModelConfig):
    # The folder holding the three token files, or its parent (then they are in wikitext-2/); empty means
    # $KOALA_DATA_DIR/datasets/wikitext-2.
    data_dir: str = dataclasses.field(default="", metadata={PATH_FIELD: True})
    batch_size: LMBatchSize = 20
    seq_len: SeqLen = 35
    embedding: Width = 200
    hidden: Width = 200
    layers: Layers = 2
    dropout: Dropout = 0.65
    tie_weights: bool = True
    # Use only the first limit_tokens tokens of each split (0: all); the vocabulary is the full training file's.
    limit_tokens: Annotated[int, Range(0, 1_000_000_000)] = 0

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"batch_size": 4, "seq_len": 8, "embedding": 16, "hidden": 16, "limit_tokens": 2000}


@dataclasses.dataclass(frozen=True)
class _Corpus:
    train: Tensor  # (N_train,) token ids
    valid: Tensor  # (N_valid,) token ids
    vocab_size: int
    vocabulary: tuple[str, ...] = ()  # words by token id, for word-level corpora


class LanguageModelWorkload(Workload):
    """Next-token prediction with `LSTMLanguageModel`; subclasses only load their corpus (`_load`).

    Per-sample losses are per-token cross-entropies (B, T). An epoch cuts the training tokens into non-overlapping
    windows of seq_len + 1 tokens from a random offset, shuffles them and drops the last partial batch. Evaluation
    scores every validation token after the first once, in windows of seq_len targets.
    """

    metric: ClassVar[str] = "val_perplexity"
    mode: ClassVar[Mode] = "min"
    Config: ClassVar[type[WorkloadConfig]] = LanguageModelConfig
    config: LanguageModelConfig

    @abc.abstractmethod
    def _load(self) -> _Corpus:
        """Read the training and validation token ids (called once, on first use)."""

    def splits(self) -> tuple[Tensor, Tensor]:
        """The training and validation token ids, 1-D int64 tensors (loaded on first use, then cached).

        Raises:
            FileNotFoundError: the data is missing.
            ValueError: a split is too short for the configured batches.
        """
        return self._corpus.train, self._corpus.valid

    def prepare(self) -> None:
        self._corpus  # noqa: B018 (the cached property loads and checks the corpus)

    @cached_property
    def _corpus(self) -> _Corpus:
        corpus = self._load()
        self._check_lengths(corpus)
        return corpus

    def _check_lengths(self, corpus: _Corpus) -> None:
        seq_len, batch_size = self.config.seq_len, self.config.batch_size
        # The fewest windows an epoch can have is at the largest start offset, seq_len - 1.
        windows = (len(corpus.train) - (seq_len - 1)) // (seq_len + 1)
        if windows < batch_size:
            raise ValueError(
                f"batch_size: the training split has {len(corpus.train)} tokens, fewer than one batch of "
                f"batch_size={batch_size} windows of seq_len + 1 = {seq_len + 1} tokens needs"
            )
        if len(corpus.valid) < 2:
            raise ValueError(f"the validation split has {len(corpus.valid)} tokens, fewer than the 2 evaluation needs")

    def build_model(self) -> nn.Module:
        c = self.config
        return LSTMLanguageModel(self._corpus.vocab_size, c.embedding, c.hidden, c.layers, c.dropout, c.tie_weights)

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        train = self._corpus.train
        seq_len, batch_size = self.config.seq_len, self.config.batch_size
        # A random start offset so that window boundaries differ between epochs.
        offset = int(torch.randint(seq_len, (1,), generator=generator))
        count = (len(train) - offset) // (seq_len + 1)
        windows = train[offset : offset + count * (seq_len + 1)].view(count, seq_len + 1)  # (N, T + 1)
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            batch = windows[order[start : start + batch_size]]  # (B, T + 1)
            yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # inputs (B, T), targets (B, T)

    def losses(self, model: nn.Module, batch: Batch) -> Tensor:
        inputs, targets = batch  # (B, T), (B, T)
        logits = model(inputs)  # (B, T, V)
        # In float32 even under reduced precision: the softmax over a large vocabulary loses accuracy otherwise.
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # (B * T,)
        return losses.view_as(targets)  # (B, T)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = model_device(model)
        sums: list[Tensor] = []
        count = 0
        with torch.no_grad():
            for inputs, targets in self._validation_batches():
                sums.append(self.losses(model, (inputs.to(device), targets.to(device))).sum())
                count += targets.numel()
        # One host sync for the whole pass; the total in float64 on the CPU (some devices have no float64).
        mean = float(torch.stack(sums).cpu().double().sum()) / count
        perplexity = math.inf if mean > 700.0 else math.exp(mean)  # exp overflows beyond ~709.8; NaN stays NaN
        return {"val_perplexity": perplexity, "val_loss": mean}

    def _validation_batches(self) -> Iterator[Batch]:
        valid = self._corpus.valid
        seq_len, batch_size = self.config.seq_len, self.config.batch_size
        # Windows overlap by one token (the last target of one is the first input of the next), so each token after
        # the first is a target exactly once; the remainder forms one shorter final window.
        count = (len(valid) - 1) // seq_len
        inputs = valid[: count * seq_len].view(count, seq_len)  # (N, T)
        targets = valid[1 : count * seq_len + 1].view(count, seq_len)  # (N, T)
        for start in range(0, count, batch_size):
            yield inputs[start : start + batch_size], targets[start : start + batch_size]
        if count * seq_len + 1 < len(valid):
            yield valid[count * seq_len : -1].unsqueeze(0), valid[count * seq_len + 1 :].unsqueeze(0)  # (1, r)


class CharLM(LanguageModelWorkload):
    """Byte-level LSTM language model on Python standard-library sources (vocabulary 256, runs offline).

    The sources in `STDLIB_SOURCES` are read as UTF-8 and concatenated in that order; the text is truncated to
    `limit_chars` characters if set, encoded as UTF-8 bytes, and split: the first 90% for training, the rest for
    validation.
    """

    name: ClassVar[str] = "char-lm"
    description: ClassVar[str] = "byte-level LSTM language model on Python standard-library sources (offline)"
    Config: ClassVar[type[WorkloadConfig]] = CharLMConfig
    config: CharLMConfig

    def _load(self) -> _Corpus:
        text = stdlib_text()
        if self.config.limit_chars:
            text = text[: self.config.limit_chars]
        # bytearray: torch.frombuffer warns on read-only buffers such as bytes.
        ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()  # (N,)
        split = len(ids) - int(len(ids) * VALIDATION_FRACTION)
        return _Corpus(train=ids[:split], valid=ids[split:], vocab_size=256)


def stdlib_text() -> str:
    """The concatenated text of `STDLIB_SOURCES` from this interpreter's standard library.

    Raises:
        FileNotFoundError: a source is missing (e.g. an install that ships only compiled bytecode).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [root / name for name in STDLIB_SOURCES]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"workload 'char-lm' reads Python standard-library sources, but {', '.join(missing)} is missing; it needs "
            f"an install that ships the .py sources ({', '.join(STDLIB_SOURCES)} in {root})"
        )
    return "".join(path.read_text(encoding="utf-8") for path in paths)


class WikiText2LSTM(LanguageModelWorkload):
    """The KOALA paper's tiny LSTM on word-level WikiText-2 (supplement Table 1).

    Each line of a token file becomes its whitespace-separated tokens plus `<eos>`; the files already map rare words
    to `<unk>`. The vocabulary is the training file's tokens in order of first appearance (33,278 for the full
    release); validation tokens missing from it become `<unk>`.
    """

    name: ClassVar[str] = "wikitext2-lstm"
    description: ClassVar[str] = "2-layer 200-unit LSTM with tied embeddings on WikiText-2 (word level)"
    Config: ClassVar[type[WorkloadConfig]] = WikiText2Config
    config: WikiText2Config

    @property
    def vocabulary(self) -> list[str]:
        """The words by token id (loads the data on first use)."""
        return list(self._corpus.vocabulary)

    def _load(self) -> _Corpus:
        folder = self._data_folder()
        train_words = read_tokens(folder / WIKITEXT2_FILES[0])
        index = {word: i for i, word in enumerate(dict.fromkeys(train_words))}
        valid_words = read_tokens(folder / WIKITEXT2_FILES[1])
        unknown = index.get(UNKNOWN)
        if unknown is None and any(word not in index for word in valid_words):
            raise ValueError(
                f"{folder / WIKITEXT2_FILES[1]}: has words missing from the training file and no {UNKNOWN}"
            )
        limit = self.config.limit_tokens or None
        train = torch.tensor([index[word] for word in train_words[:limit]], dtype=torch.int64)
        valid = torch.tensor([index.get(word, unknown) for word in valid_words[:limit]], dtype=torch.int64)
        return _Corpus(train=train, valid=valid, vocab_size=len(index), vocabulary=tuple(index))

    def _data_folder(self) -> Path:
        """The folder holding the three token files: data_dir or data_dir/wikitext-2 if data_dir is set, else
        $KOALA_DATA_DIR/datasets/wikitext-2."""
        expected = ", ".join(WIKITEXT2_FILES)
        folders = dataset_folders(self.config.data_dir, WIKITEXT2_FOLDER, self.name, expected, WIKITEXT2_SOURCE)
        for folder in folders:
            if all((folder / file).is_file() for file in WIKITEXT2_FILES):
                return folder
        places = " or ".join(str(folder) for folder in folders)
        if not self.config.data_dir:
            places += f" ($KOALA_DATA_DIR/datasets/{WIKITEXT2_FOLDER})"
        raise FileNotFoundError(
            f"workload {self.name!r} reads {expected} from {places}, but they are not all there. {WIKITEXT2_SOURCE}"
        )


def read_tokens(path: Path) -> list[str]:
    """The whitespace-separated tokens of a token file, with `<eos>` after each line."""
    with path.open(encoding="utf-8") as lines:
        return [token for line in lines for token in [*line.split(), END_OF_SENTENCE]]
