"""MuskTokenizer encodes text exactly like MUSK's reference (transformers 4.x slow XLM-R tokenizer + fairseq ids).

Release tests compare against tests/fixtures/reference_token_ids.json, made once with transformers 4.49 from the
release's tokenizer; they need FEDMUSK_REFERENCE_DIR (holding musk-tokenizer.spm). The other tests use the tiny
tokenizer trained from the bundled corpus and always run.
"""

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from fedmusk.musk_model import tokenizer as tokenizer_module
from fedmusk.musk_model.tokenizer import MuskTokenizer, tiny_tokenizer, train_tiny_tokenizer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "reference_token_ids.json").read_text(encoding="utf-8"))
EXAMPLE = "histopathology image of lung adenocarcinoma"
EXAMPLE_IDS = [0, 39, 436, 13674, 5259, 1677, 9, 9242, 10, 3013, 348, 3887, 32033, 1867, 2]


# ---------------------------------------------------------------------------------------------------------------
# The release tokenizer against the reference fixture
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release() -> MuskTokenizer:
    directory = os.environ.get("FEDMUSK_REFERENCE_DIR")
    if not directory:
        pytest.skip("FEDMUSK_REFERENCE_DIR is unset: it names the folder holding the release's musk-tokenizer.spm")
    path = Path(directory) / "musk-tokenizer.spm"
    if not path.is_file():
        pytest.skip(f"release tokenizer missing: {path} does not exist (FEDMUSK_REFERENCE_DIR={directory})")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == FIXTURE["spm_sha256"], f"{path} is not the tokenizer the fixture was made from"
    return MuskTokenizer(path)


@pytest.mark.reference
@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[case["name"] for case in FIXTURE["cases"]])
def test_release_tokenizer_matches_reference_on_report_text(release, case):
    ids, padding_mask = release(case["text"], max_len=case["max_len"])
    assert ids == case["ids"]
    assert padding_mask == case["padding_mask"]


@pytest.mark.reference
def test_release_tokenizer_encodes_the_documented_example(release):
    ids, padding_mask = release(EXAMPLE)
    assert ids == EXAMPLE_IDS + [1] * (100 - len(EXAMPLE_IDS))
    assert padding_mask == [0] * len(EXAMPLE_IDS) + [1] * (100 - len(EXAMPLE_IDS))


@pytest.mark.reference
def test_release_tokenizer_has_fairseq_special_ids(release):
    assert (release.bos_token_id, release.pad_token_id, release.eos_token_id, release.unk_token_id) == (0, 1, 2, 3)
    assert release.mask_token_id == 64001
    assert release.vocab_size == 64002


@pytest.mark.reference
def test_release_batch_rows_equal_single_encodings(release):
    texts = [case["text"] for case in FIXTURE["cases"] if case["max_len"] == 100]
    ids, padding_mask = release.encode_batch(texts)
    for row, text in enumerate(texts):
        expected_ids, expected_mask = release(text)
        assert ids[row].tolist() == expected_ids and padding_mask[row].tolist() == expected_mask


@pytest.mark.reference
def test_release_word_starts_mark_the_first_piece_of_each_word(release):
    encoded = release.encode_with_word_starts(EXAMPLE, max_len=16)
    # his|to|path|ology  image  of  lung  a|den|o|car|cino|ma
    expected = [False, True, False, False, False, True, True, True, True, False, False, False, False, False]
    assert encoded.word_starts == expected + [False, False]


def test_reference_fixture_covers_the_tricky_cases():
    assert FIXTURE["generated_with"]["transformers"].startswith("4.")
    cases = FIXTURE["cases"]
    assert len(cases) >= 60
    assert {2, 3, 5, 16, 100} <= {case["max_len"] for case in cases}
    assert any(case["text"] == EXAMPLE and case["ids"][:15] == EXAMPLE_IDS for case in cases)
    assert all(len(case["ids"]) == len(case["padding_mask"]) == case["max_len"] for case in cases)


# ---------------------------------------------------------------------------------------------------------------
# Behaviour, with the tiny tokenizer
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.spm")


@pytest.fixture(scope="module")
def tiny(tiny_path) -> MuskTokenizer:
    return MuskTokenizer(tiny_path)


def test_tiny_tokenizer_has_release_id_layout(tiny):
    assert (tiny.bos_token_id, tiny.pad_token_id, tiny.eos_token_id, tiny.unk_token_id) == (0, 1, 2, 3)
    assert tiny.mask_token_id == 1001
    assert tiny.vocab_size == 1002


def test_encoding_is_padded_to_max_len_and_mask_marks_pads(tiny):
    ids, padding_mask = tiny("invasive adenocarcinoma", max_len=32)
    n_real = 32 - sum(padding_mask)
    assert len(ids) == len(padding_mask) == 32
    assert ids[0] == tiny.bos_token_id and ids[n_real - 1] == tiny.eos_token_id
    assert ids[n_real:] == [tiny.pad_token_id] * (32 - n_real)
    assert padding_mask == [0] * n_real + [1] * (32 - n_real)


def test_piece_ids_are_sentencepiece_ids_shifted_by_one(tiny, tiny_path):
    text = "lymphovascular invasion present; margins negative"
    raw = spm.SentencePieceProcessor(model_file=str(tiny_path)).encode(text)
    ids, _ = tiny(text, max_len=len(raw) + 2)
    assert ids == [0] + [i + 1 for i in raw] + [2]


def test_long_text_is_truncated_but_keeps_bos_and_eos(tiny):
    text = " ".join(["tumour necrosis with frequent mitoses"] * 40)
    ids, padding_mask = tiny(text, max_len=16)
    full, _ = tiny(text, max_len=1000)
    assert ids == full[:15] + [tiny.eos_token_id]
    assert padding_mask == [0] * 16


def test_max_len_two_holds_only_bos_and_eos(tiny):
    assert tiny("pT2a pN1 M0", max_len=2) == ([0, 2], [0, 0])


@pytest.mark.parametrize("max_len", [1, 0, -5])
def test_max_len_below_two_is_rejected(tiny, max_len):
    with pytest.raises(ValueError, match="max_len"):
        tiny("lung", max_len=max_len)
    with pytest.raises(ValueError, match="max_len"):
        tiny.encode_batch(["lung"], max_len=max_len)


@pytest.mark.parametrize("text", ["", " ", "\t\n  \r\n", "\u3000\u00a0"])
def test_empty_or_whitespace_text_encodes_to_bos_eos_only(tiny, text):
    ids, padding_mask = tiny(text, max_len=5)
    assert ids == [0, 2, 1, 1, 1]
    assert padding_mask == [0, 0, 1, 1, 1]


def test_unknown_characters_map_to_unk_id(tiny):
    ids, _ = tiny("margin ☃ clear", max_len=16)
    assert tiny.unk_token_id in ids


def test_nfkc_normalisation_makes_full_width_text_encode_like_ascii(tiny):
    assert tiny("ＰＤ－Ｌ１ ＴＰＳ ５０％") == tiny("PD-L1 TPS 50%")


def test_special_token_literals_in_text_become_special_ids(tiny):
    ids, _ = tiny("lung <mask> carcinoma <unk></s><s><pad>", max_len=32)
    lung, _ = tiny("lung", max_len=32)
    carcinoma, _ = tiny("carcinoma", max_len=32)
    body = lung[1 : lung.index(2)] + [tiny.mask_token_id] + carcinoma[1 : carcinoma.index(2)] + [3, 2, 0, 1]
    assert ids[: len(body) + 2] == [0] + body + [2]


def test_mask_literal_swallows_whitespace_on_its_left_only(tiny):
    # U+0085 is whitespace to Python (so <mask>'s lstrip removes it) but an unknown character to SentencePiece.
    assert tiny.unk_token_id not in tiny("tumour\x85<mask>")[0]
    assert tiny.unk_token_id in tiny("tumour\x85<s>")[0]
    assert tiny.unk_token_id in tiny("<mask>\x85tumour")[0]


def test_batch_gives_long_tensors_whose_rows_equal_single_encodings(tiny):
    texts = ["Ki-67 30%", "", "PD-L1 TPS ≥50%", "<mask> grade 3"]
    ids, padding_mask = tiny.encode_batch(texts, max_len=12)
    assert ids.shape == padding_mask.shape == (4, 12)
    assert ids.dtype == padding_mask.dtype == torch.long
    for row, text in enumerate(texts):
        assert (ids[row].tolist(), padding_mask[row].tolist()) == tiny(text, max_len=12)


def test_batch_of_no_texts_gives_empty_tensors(tiny):
    ids, padding_mask = tiny.encode_batch([], max_len=7)
    assert ids.shape == padding_mask.shape == (0, 7)


def test_batch_refuses_a_single_string(tiny):
    with pytest.raises(TypeError, match="single str"):
        tiny.encode_batch("lung adenocarcinoma")
    with pytest.raises(TypeError, match="single str"):
        tiny.encode_batch_with_word_starts("lung adenocarcinoma")


def test_batch_word_starts_are_a_bool_tensor_matching_single_encodings(tiny):
    texts = ["invasive lobular carcinoma", "", "grade <mask> tumour"]
    ids, padding_mask, word_starts = tiny.encode_batch_with_word_starts(texts, max_len=10)
    assert word_starts.dtype == torch.bool and word_starts.shape == ids.shape == (3, 10)
    assert torch.equal(ids, tiny.encode_batch(texts, max_len=10)[0])
    for row, text in enumerate(texts):
        encoded = tiny.encode_with_word_starts(text, max_len=10)
        assert word_starts[row].tolist() == encoded.word_starts
        assert padding_mask[row].tolist() == encoded.padding_mask


def test_word_starts_flag_one_piece_per_word_and_no_special(tiny):
    text = "invasive lobular carcinoma with lymphovascular invasion"
    encoded = tiny.encode_with_word_starts(text, max_len=40)
    assert (encoded.ids, encoded.padding_mask) == tiny(text, max_len=40)
    assert len(encoded.word_starts) == 40
    assert sum(encoded.word_starts) == len(text.split())
    assert encoded.word_starts[1] is True
    special = {tiny.bos_token_id, tiny.eos_token_id, tiny.pad_token_id}
    assert not any(start for start, i in zip(encoded.word_starts, encoded.ids, strict=True) if i in special)


def test_word_starts_are_false_for_literal_special_tokens_and_follow_truncation(tiny):
    encoded = tiny.encode_with_word_starts("grade <mask> tumour", max_len=40)
    assert encoded.word_starts[encoded.ids.index(tiny.mask_token_id)] is False
    assert sum(encoded.word_starts) == 2
    short = tiny.encode_with_word_starts("grade <mask> tumour", max_len=3)
    assert short.word_starts == [False, True, False]


def test_decode_recovers_plain_text_and_drops_special_ids(tiny):
    text = "invasive adenocarcinoma of the lung, grade 2"
    ids, _ = tiny(text, max_len=64)
    assert tiny.decode(ids) == text
    assert tiny.decode(torch.tensor(ids)) == text
    shown = tiny.decode(tiny("lung <mask> tumour", max_len=10)[0], skip_special_tokens=False)
    assert shown.startswith("<s> lung <mask> tumour </s> <pad>")


def test_decode_rejects_ids_outside_the_vocabulary(tiny):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.decode([0, tiny.vocab_size, 2])


def test_missing_tokenizer_file_is_reported_with_its_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.spm"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MuskTokenizer(missing)


def test_file_that_is_not_sentencepiece_is_reported_with_its_path(tmp_path):
    bogus = tmp_path / "bogus.spm"
    bogus.write_text("this is not a sentencepiece model")
    with pytest.raises(ValueError, match="bogus.spm"):
        MuskTokenizer(bogus)


def test_model_with_another_special_piece_layout_is_refused(tmp_path):
    buffer = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["invasive carcinoma of the lung"] * 20 + ["margins free of tumour"] * 20),
            model_writer=buffer,
            vocab_size=25,
            unk_id=3,
            bos_id=0,
            eos_id=1,
            pad_id=2,
            logstream=quiet,
        )
    path = tmp_path / "other_layout.spm"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="other_layout.spm"):
        MuskTokenizer(path)


def test_tiny_model_uses_the_release_normaliser_and_unigram(tiny_path):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tiny_path.read_bytes())
    assert proto.normalizer_spec.name == "nmt_nfkc"
    assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    assert [piece.piece for piece in proto.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    assert len(proto.pieces) == 1000


def test_tiny_training_is_deterministic(tiny_path, tmp_path):
    again = train_tiny_tokenizer(tmp_path / "again.spm")
    assert again.read_bytes() == tiny_path.read_bytes()


def test_tiny_tokenizer_is_trained_once_into_the_cache_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMUSK_CACHE", str(tmp_path))
    first = tiny_tokenizer()
    cached = list((tmp_path / "tokenizers").glob("*.spm"))
    assert [first.path] == cached
    stamp = first.path.stat().st_mtime_ns
    tokenizer_module._cached_tiny_tokenizer.cache_clear()  # as a fresh process would: only the disk cache is left
    second = tiny_tokenizer()
    assert second.path == first.path and second.path.stat().st_mtime_ns == stamp
    assert second("grade 3") == first("grade 3")


def test_damaged_cached_tiny_model_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMUSK_CACHE", str(tmp_path))
    path = tiny_tokenizer().path
    path.write_bytes(b"truncated")
    tokenizer_module._cached_tiny_tokenizer.cache_clear()
    assert tiny_tokenizer()("lung", max_len=4)[0][0] == 0
