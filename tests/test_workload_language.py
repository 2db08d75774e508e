"""The language-model workloads: char-lm on the standard-library sources, wikitext2-lstm on generated token files."""

from __future__ import annotations

import math
import re
import sysconfig
from pathlib import Path

import pytest
import torch

import koala.workloads as workloads
from koala.workloads.language import STDLIB_SOURCES, CharLM, WikiText2LSTM


def char_lm() -> CharLM:
    workload = workloads.get("char-lm", **CharLM.Config.tiny())
    assert isinstance(workload, CharLM)
    return workload


def epoch(workload: workloads.Workload, seed: int) -> list[tuple[torch.Tensor, ...]]:
    return list(workload.train_batches(0, torch.Generator().manual_seed(seed)))


def test_char_lm_batches_are_shifted_int64_windows() -> None:
    batches = epoch(char_lm(), seed=0)
    assert len(batches) > 1
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (8, 16)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one token
        assert int(inputs.min()) >= 0
        assert int(inputs.max()) < 256


def test_char_lm_epoch_depends_only_on_the_generator() -> None:
    workload = char_lm()
    first, again, other = epoch(workload, 0), epoch(workload, 0), epoch(workload, 1)
    assert len(first) == len(again)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=False))


def test_char_lm_splits_the_stdlib_text_90_10_and_trains_on_the_first_part_only() -> None:
    workload = char_lm()
    train, valid = workload.splits()
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((root / name).read_text(encoding="utf-8") for name in STDLIB_SOURCES)[:4000]
    expected = text.encode("utf-8")
    assert bytes(torch.cat([train, valid]).tolist()) == expected
    assert len(valid) == len(expected) // 10
    train_bytes = bytes(train.tolist())
    for inputs, targets in epoch(workload, seed=3):
        for row in torch.cat([inputs, targets[:, -1:]], dim=1):  # (T + 1,) the whole window
            assert bytes(row.tolist()) in train_bytes


def test_char_lm_untrained_perplexity_is_about_the_vocabulary_size() -> None:
    workload = char_lm()
    torch.manual_seed(0)
    model = workload.build_model().eval()
    metrics = workload.evaluate(model)
    assert set(metrics) == {"val_perplexity", "val_loss"}
    assert 150 < metrics["val_perplexity"] < 400
    assert math.isclose(metrics["val_perplexity"], math.exp(metrics["val_loss"]))
    assert workload.metric == "val_perplexity"
    assert workload.mode == "min"


def test_char_lm_sgd_reduces_the_training_loss() -> None:
    workload = char_lm()
    torch.manual_seed(0)
    model = workload.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batches = epoch(workload, seed=0)

    def loss() -> float:
        with torch.no_grad():
            return float(workload.losses(model, batches[0]).mean())

    initial = loss()
    for batch in batches[:20]:
        losses = workload.losses(model, batch)
        assert losses.shape == batch[1].shape  # (B, T) per-token losses
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    assert loss() < initial - 0.5


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"limit_chars": -1}, "limit_chars"),
        ({"layers": 0}, "layers"),
        ({"hidden": 4097}, "hidden"),
        ({"batch_size": 1024, "seq_len": 256}, "batch_size"),
    ],
)
def test_char_lm_config_errors_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        workloads.get("char-lm", **overrides)


# Lines in the layout of the real files: a leading space, blank lines as " ", headings, <unk> and @-@ tokens.
TRAIN_LINES = [
    " ",
    " = Valkyria Chronicles III = ",
    " ",
    " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the Battlefield 3 )"
    " , commonly referred to as Valkyria Chronicles III outside Japan , is a tactical role @-@ playing video game . ",
    " The game began development in 2010 , carrying over a large portion of the work done on Valkyria Chronicles II . ",
    " ",
    " = = Gameplay = = ",
    " ",
    " As with previous <unk> Chronicles games , Valkyria Chronicles III is a tactical role @-@ playing game . ",
] * 3
VALID_LINES = [" ", " = = Gameplay = = ", " ", " The game is a <unk> of the work done on Valkyria Chronicles II . "]
TEST_LINES = [" ", " = Robert <unk> = ", " ", " Robert <unk> is a game . "]


def write_wikitext(folder: Path, valid_lines: list[str] = VALID_LINES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in [("train", TRAIN_LINES), ("valid", valid_lines), ("test", TEST_LINES)]:
        (folder / f"wiki.{name}.tokens").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def wikitext(data_dir: Path | str, **overrides: object) -> WikiText2LSTM:
    workload = workloads.get("wikitext2-lstm", data_dir=str(data_dir), **{**WikiText2LSTM.Config.tiny(), **overrides})
    assert isinstance(workload, WikiText2LSTM)
    return workload


def words(lines: list[str]) -> list[str]:
    return [word for line in lines for word in [*line.split(), "<eos>"]]


def test_wikitext_vocabulary_is_the_training_words_in_order_of_first_appearance(tmp_path: Path) -> None:
    write_wikitext(tmp_path)
    vocabulary = wikitext(tmp_path).vocabulary
    assert vocabulary[:4] == ["<eos>", "=", "Valkyria", "Chronicles"]  # the first line is blank: just <eos>
    assert {"<unk>", "@-@", "戦場のヴァルキュリア3"} <= set(vocabulary)
    assert sorted(vocabulary) == sorted(set(words(TRAIN_LINES)))


def test_wikitext_tokens_round_trip(tmp_path: Path) -> None:
    write_wikitext(tmp_path)
    workload = wikitext(tmp_path)
    train, valid = workload.splits()
    assert train.dtype == valid.dtype == torch.int64
    assert [workload.vocabulary[i] for i in train.tolist()] == words(TRAIN_LINES)
    assert [workload.vocabulary[i] for i in valid.tolist()] == words(VALID_LINES)


def test_wikitext_maps_validation_words_missing_from_training_to_unk(tmp_path: Path) -> None:
    write_wikitext(tmp_path, valid_lines=[" The Battlefield of Zanzibar . "])
    workload = wikitext(tmp_path)
    _, valid = workload.splits()
    assert [workload.vocabulary[i] for i in valid.tolist()] == ["The", "Battlefield", "of", "<unk>", ".", "<eos>"]


def test_wikitext_batches_and_evaluate(tmp_path: Path) -> None:
    write_wikitext(tmp_path)
    workload = wikitext(tmp_path)
    batches = epoch(workload, seed=0)
    assert batches
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (4, 8)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
    torch.manual_seed(0)
    model = workload.build_model()
    assert workload.losses(model, batches[0]).shape == (4, 8)
    metrics = workload.evaluate(model.eval())
    assert 1 < metrics["val_perplexity"] < 3 * len(workload.vocabulary)  # untrained: about the vocabulary size
    assert math.isclose(metrics["val_perplexity"], math.exp(metrics["val_loss"]))


def test_wikitext_limit_tokens_truncates_both_splits(tmp_path: Path) -> None:
    write_wikitext(tmp_path)
    train, valid = wikitext(tmp_path, limit_tokens=50, batch_size=2).splits()
    assert len(train) == 50
    assert len(valid) == min(50, len(words(VALID_LINES)))


@pytest.mark.parametrize("layout", ["flat", "wikitext-2"])
def test_wikitext_reads_both_directory_layouts(tmp_path: Path, layout: str) -> None:
    write_wikitext(tmp_path if layout == "flat" else tmp_path / "wikitext-2")
    assert len(wikitext(tmp_path).splits()[0]) == len(words(TRAIN_LINES))


def test_wikitext_falls_back_to_datasets_under_koala_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_wikitext(tmp_path / "datasets" / "wikitext-2")
    monkeypatch.setenv("KOALA_DATA_DIR", str(tmp_path))
    assert len(wikitext("").splits()[0]) == len(words(TRAIN_LINES))


@pytest.mark.parametrize("folder", ["", "wikitext-2", "datasets"])
def test_wikitext_koala_data_dir_is_searched_in_datasets_wikitext_2_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: str
) -> None:
    write_wikitext(tmp_path / folder)
    monkeypatch.setenv("KOALA_DATA_DIR", str(tmp_path))
    expected = f"{tmp_path / 'datasets' / 'wikitext-2'} ($KOALA_DATA_DIR/datasets/wikitext-2), but they are not all"
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        wikitext("").prepare()


def test_wikitext_missing_files_name_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wiki.train.tokens").write_text(" a b \n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"wiki\.train\.tokens, wiki\.valid\.tokens, wiki\.test\.tokens"):
        wikitext(tmp_path).build_model()
    monkeypatch.delenv("KOALA_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"\$KOALA_DATA_DIR/datasets/wikitext-2.*WikiText-2"):
        wikitext("").splits()


def test_wikitext_too_little_data_for_a_batch_names_batch_size(tmp_path: Path) -> None:
    write_wikitext(tmp_path)
    with pytest.raises(ValueError, match=r"^batch_size:"):
        wikitext(tmp_path, batch_size=1000).splits()


def test_wikitext_full_model_size(tmp_path: Path) -> None:
    # The full release's vocabulary is 33,278 words including <eos>. Parameters of the paper's tiny LSTM: tied
    # embedding/decoder 33,278 * 200 + decoder bias 33,278 + two LSTM layers 2 * (4 * 200 * (200 + 200) + 8 * 200)
    # = 6,655,600 + 33,278 + 643,200 = 7,332,078.
    train = " ".join(f"w{i}" for i in range(33_277)) + " \n"
    for name in ("train", "valid", "test"):
        (tmp_path / f"wiki.{name}.tokens").write_text(train, encoding="utf-8")
    workload = workloads.get("wikitext2-lstm", data_dir=str(tmp_path), batch_size=1)
    model = workload.build_model()
    assert sum(p.numel() for p in model.parameters()) == 7_332_078


def test_wikitext_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^tie_weights:"):
        workloads.get("wikitext2-lstm", hidden=100)
    workloads.get("wikitext2-lstm", hidden=100, tie_weights=False)  # untied sizes may differ
    with pytest.raises(ValueError, match=r"unknown config key.*vocab_size"):
        workloads.get("wikitext2-lstm", vocab_size=10)
    with pytest.raises(ValueError, match=r"^limit_tokens:"):
        workloads.get("wikitext2-lstm", limit_tokens=-1)
