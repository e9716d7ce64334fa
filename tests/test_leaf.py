"""FEMNIST and Sent140 from LEAF JSON (tests/fixtures_leaf.py writes LEAF's and GloVe's real formats):
exact replay in LEAF order, class filters, the official tokenisation worked by hand, embedding rows,
every refusal naming its file, the folder layouts searched, and the decode-once cache."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedrep.data import leaf
from fedrep.data.leaf import (
    FEMNIST_CLASSES,
    GLOVE_URL,
    DataError,
    femnist_clients,
    leaf_dirs,
    sent140_clients,
    tweet_words,
)
from fixtures_leaf import (
    leaf_file_name,
    write_embs_json,
    write_glove,
    write_leaf_femnist,
    write_leaf_sent140,
)

LEAF_COMMAND = "./preprocess.sh -s niid --sf 1.0 -k 0 -t sample"


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDREP_DATA_DIR", raising=False)


def _one_line_error(call: Callable[[], Any], *parts: str | Path) -> str:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, f"{part!r} not in {message!r}"
    return message


def _train_file(root: Path, index: int = 0, split: str = "train") -> Path:
    return root / "data" / split / leaf_file_name(index, split)


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _first_user(data: dict[str, Any]) -> dict[str, Any]:
    return data["user_data"][data["users"][0]]


# --- FEMNIST ---------------------------------------------------------------------------------------
FEMNIST_USERS = {  # LEAF order is the "users" order, not sorted: zeta before alpha
    "zeta_9": ([3, 1, 4], [1, 5]),
    "alpha_1": ([9, 2], [6]),
    "mid_5": ([0], [7, 7, 0]),
    "last_0": ([8], [8]),
}


def test_femnist_replays_the_first_users_exactly(tmp_path: Path) -> None:
    written = write_leaf_femnist(tmp_path, FEMNIST_USERS)  # two files: zeta, alpha | mid, last
    clients = femnist_clients(tmp_path, 3)
    assert [c.user for c in clients] == ["zeta_9", "alpha_1", "mid_5"]
    for client in clients:
        for split in ("train", "test"):
            images, labels = written[split][client.user]
            x, y = getattr(client, f"x_{split}"), getattr(client, f"y_{split}")
            assert x.dtype == np.float32 and x.shape == (len(labels), 28, 28)
            assert np.array_equal(x, images.astype(np.float32))  # every pixel as LEAF wrote it
            assert y.dtype == np.int64 and y.tolist() == labels.tolist()
    # Row-major: pixel (r, c) is entry 28 r + c of the JSON row.
    row = json.loads(_train_file(tmp_path).read_text())["user_data"]["zeta_9"]["x"][0]
    assert clients[0].x_train[0, 1, 2] == np.float32(row[28 + 2])


def test_femnist_class_filters_skip_and_renumber(tmp_path: Path) -> None:
    users = {"a": ([3, 40, 12], [41]), "b": ([37, 5], [5, 36]), "c": ([61, 0], [60]), "d": ([1], [2])}
    written = write_leaf_femnist(tmp_path, users)
    digits = femnist_clients(tmp_path, 2, "digits")  # a and c have no test digit
    assert [c.user for c in digits] == ["b", "d"]
    assert digits[0].y_train.tolist() == [5] and digits[0].y_test.tolist() == [5]
    assert np.array_equal(digits[0].x_train, written["train"]["b"][0][[1]].astype(np.float32))

    letters = femnist_clients(tmp_path, 2, "letters-a-j")  # 36..45 -> 0..9
    assert [c.user for c in letters] == ["a", "b"]
    assert letters[0].y_train.tolist() == [4] and letters[0].y_test.tolist() == [5]
    assert letters[1].y_train.tolist() == [1] and letters[1].y_test.tolist() == [0]
    assert np.array_equal(letters[1].x_test, written["test"]["b"][0][[1]].astype(np.float32))

    everything = femnist_clients(tmp_path, 4, "all")
    assert [c.y_train.tolist() for c in everything] == [list(u[0]) for u in users.values()]
    assert FEMNIST_CLASSES["all"] == range(62)

    _one_line_error(lambda: femnist_clients(tmp_path, 3, "digits"), "only 2 users", "--set num-clients=2",
                    "classes='digits'", LEAF_COMMAND)
    with pytest.raises(ValueError, match="letters-a-j"):
        femnist_clients(tmp_path, 1, "vowels")


def test_femnist_pixels_that_are_not_k_over_255_are_kept_as_float32(tmp_path: Path) -> None:
    written = write_leaf_femnist(tmp_path, 3, exact=False)
    for client in femnist_clients(tmp_path, 3, "all"):
        for split in ("train", "test"):
            images, _ = written[split][client.user]
            assert np.array_equal(getattr(client, f"x_{split}"), images.astype(np.float32))


def test_too_few_users(tmp_path: Path) -> None:
    write_leaf_femnist(tmp_path, 3)
    _one_line_error(lambda: femnist_clients(tmp_path, 5), "only 3 users", "--set num-clients=3", "--sf")


@pytest.mark.parametrize("layout", ["flat", "data", "leaf-data", "leaf-checkout", "mytrain"])
def test_femnist_folder_layouts(tmp_path: Path, layout: str) -> None:
    write_leaf_femnist(tmp_path / "gen", 2)
    generated = tmp_path / "gen" / "data"
    if layout == "flat":  # data-dir=leaf/data/femnist/data
        data_dir, data = generated, generated
    elif layout == "data":  # data-dir=leaf/data/femnist
        data_dir, data = tmp_path / "gen", generated
    elif layout == "leaf-data":  # data-dir=leaf/data
        data_dir, data = tmp_path / "leaf" / "data", tmp_path / "leaf" / "data" / "femnist" / "data"
    elif layout == "leaf-checkout":  # data-dir=leaf
        data_dir, data = tmp_path / "leaf", tmp_path / "leaf" / "data" / "femnist" / "data"
    else:  # the official FedRep run's own selection, data/mytrain + data/mytest
        data_dir, data = tmp_path / "gen", generated
        (data / "train").rename(data / "mytrain")
        (data / "test").rename(data / "mytest")
    if data != generated:
        data.parent.mkdir(parents=True)
        shutil.move(generated, data)
    names = ("mytrain", "mytest") if layout == "mytrain" else ("train", "test")
    assert leaf_dirs("femnist", data_dir) == (data / names[0], data / names[1])
    assert len(femnist_clients(data_dir, 2)) == 2


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_leaf_femnist(tmp_path, 2)
    monkeypatch.setenv("FEDREP_DATA_DIR", str(tmp_path))
    assert [c.user for c in femnist_clients(None, 2)] == ["f0000_00", "f0001_07"]


def test_not_found_says_where_and_how(tmp_path: Path) -> None:
    empty = tmp_path / "nothing"
    _one_line_error(lambda: femnist_clients(empty, 1), empty, "git clone https://github.com/TalwalkarLab/leaf",
                    f"cd leaf/data/femnist && {LEAF_COMMAND}", "--set data-dir=leaf/data/femnist/data",
                    "mytrain")
    _one_line_error(lambda: sent140_clients(empty, 1), empty, f"cd leaf/data/sent140 && {LEAF_COMMAND}",
                    "glove.6B.300d.txt", GLOVE_URL, "embs.json")
    # mytrain/mytest are FEMNIST's (FedRep's femnist selection) only
    write_leaf_sent140(tmp_path / "s", 2)
    for split in ("train", "test"):
        (tmp_path / "s" / "data" / split).rename(tmp_path / "s" / "data" / f"my{split}")
    _one_line_error(lambda: leaf_dirs("sent140", tmp_path / "s"), tmp_path / "s")


def test_not_found_names_a_train_folder_without_test(tmp_path: Path) -> None:
    write_leaf_femnist(tmp_path, 2)
    shutil.rmtree(tmp_path / "data" / "test")
    _one_line_error(lambda: femnist_clients(tmp_path, 1), f"{tmp_path / 'data' / 'train'} has .json files",
                    tmp_path / "data" / "test")


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda data: data.pop(key)


def _set_pixel(value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda data: _first_user(data)["x"][0].__setitem__(5, value)


FEMNIST_BAD = {  # name: (file, change, what the message must name besides the file)
    "no users": ("train", _drop("users"), ["'users'"]),
    "no num_samples": ("train", _drop("num_samples"), ["'num_samples'"]),
    "no user_data": ("train", _drop("user_data"), ["'user_data'"]),
    "num_samples off": ("train", lambda d: d["num_samples"].__setitem__(0, 99),
                        ["f0000_00", "'num_samples' says 99"]),
    "x/y lengths differ": ("train", lambda d: _first_user(d)["y"].append(1), ["f0000_00", "'y' holds 6"]),
    "user_data lacks user": ("train", lambda d: d["user_data"].pop("f0000_00"), ["f0000_00", "'user_data'"]),
    "short image": ("train", lambda d: _first_user(d)["x"][1].pop(), ["f0000_00", "'x'[1]", "784"]),
    "pixel above 1": ("train", _set_pixel(1.5), ["f0000_00", "'x'[0]", "[0, 1]"]),
    "pixel not a number": ("train", _set_pixel("dark"), ["f0000_00", "'x'[0]"]),
    "label 62": ("train", lambda d: _first_user(d)["y"].__setitem__(2, 62), ["f0000_00", "'y'[2]", "0..61"]),
    "float label": ("train", lambda d: _first_user(d)["y"].__setitem__(0, 3.0), ["'y'[0]"]),
    "bad test label": ("test", lambda d: _first_user(d)["y"].__setitem__(1, -1), ["f0000_00", "'y'[1]"]),
    "user not in test": ("test", lambda d: (d["users"].pop(0), d["num_samples"].pop(0)),
                         ["f0000_00", "none of the test files", "-t sample"]),
}


@pytest.mark.parametrize("case", FEMNIST_BAD)
def test_femnist_bad_files_name_file_and_key(tmp_path: Path, case: str) -> None:
    split, change, parts = FEMNIST_BAD[case]
    write_leaf_femnist(tmp_path, 4)
    path = _train_file(tmp_path, 0, split)
    _edit(path, change)
    named = _train_file(tmp_path) if case == "user not in test" else path
    _one_line_error(lambda: femnist_clients(tmp_path, 2, "all"), named, *parts)


def test_truncated_json_is_named(tmp_path: Path) -> None:
    write_leaf_femnist(tmp_path, 2)
    path = _train_file(tmp_path)
    path.write_bytes(path.read_bytes()[:5000])
    _one_line_error(lambda: femnist_clients(tmp_path, 1), path, "as JSON", "truncated", LEAF_COMMAND)
    path.write_text("[1, 2]")
    _one_line_error(lambda: femnist_clients(tmp_path, 1), path, "not a LEAF data file")


def test_only_the_files_the_selection_needs_are_parsed(tmp_path: Path) -> None:
    write_leaf_femnist(tmp_path, 4)  # users 0, 1 in file 0; 2, 3 in file 1
    for split in ("train", "test"):
        _train_file(tmp_path, 1, split).write_text("{ damaged")
    assert [c.user for c in femnist_clients(tmp_path, 2)] == ["f0000_00", "f0001_07"]
    _one_line_error(lambda: femnist_clients(tmp_path, 3), _train_file(tmp_path, 1))


def test_decoded_once_then_read_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_leaf_femnist(tmp_path, 5)
    first = femnist_clients(tmp_path, 4)

    def no_parsing(path: Path, how: str) -> Any:
        raise AssertionError(f"parsed {path} again")

    monkeypatch.setattr(leaf, "_read_json", no_parsing)
    again = femnist_clients(tmp_path, 4)
    assert [c.user for c in again] == [c.user for c in first]
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
        assert a.x_train.dtype == b.x_train.dtype == np.float32
    with pytest.raises(AssertionError, match="parsed"):
        femnist_clients(tmp_path, 3)  # another selection is another cache entry


# --- Sent140 ---------------------------------------------------------------------------------------
TWEET = "I can't believe it... wow!! @bob #fun"
LONG = " ".join(f"w{i}" for i in range(30))
SENT140_USERS = {
    "bob": ([(TWEET, 1), (LONG, 0)], [("Happy happy, joy; ok?", 1)]),
    "amy": ([("fun fun", 0)], [("bob", 1)]),
}
GLOVE_WORDS = ["the", "can't", "believe", "it", ".", "wow", "!", "fun", "bob", "i", "happy", ",", "joy",
               ";", "?", "w0", "w24", "w25", "w29", "unused"]
# The GloVe words the tweets use within their first 25 tokens ("I", "Happy", "ok" are not GloVe
# words: no lower-casing; w25 and w29 come after the cut), sorted.
VOCAB = ["!", ",", ".", ";", "?", "believe", "bob", "can't", "fun", "happy", "it", "joy", "w0", "w24", "wow"]
UNK = len(VOCAB)


def _pad(ids: list[int], n: int = 25) -> list[int]:
    return ids + [UNK] * (n - len(ids))


def test_tweet_words_follow_line_to_indices() -> None:
    assert tweet_words(TWEET) == ["I", "can't", "believe", "it", ".", ".", ".", "wow", "!", "!", "bob", "fun"]
    assert tweet_words(LONG) == [f"w{i}" for i in range(25)]
    assert tweet_words("a-b: c", 2) == ["a", "b"]


def test_sent140_tokens_and_embeddings_worked_by_hand(tmp_path: Path) -> None:
    written = write_leaf_sent140(tmp_path, SENT140_USERS)
    vectors = write_glove(tmp_path / "data" / "glove.6B.300d.txt", GLOVE_WORDS)
    clients, emb = sent140_clients(tmp_path / "data", 2)
    assert [c.user for c in clients] == ["bob", "amy"]
    bob, amy = clients
    assert bob.x_train.dtype == np.int32 and bob.x_train.shape == (2, 25)
    v = VOCAB.index
    assert bob.x_train[0].tolist() == _pad([UNK, v("can't"), v("believe"), v("it"), v("."), v("."), v("."),
                                            v("wow"), v("!"), v("!"), v("bob"), v("fun")])
    assert bob.x_train[1].tolist() == [v("w0"), *[UNK] * 23, v("w24")]  # cut to 25 words
    assert bob.x_test[0].tolist() == _pad([UNK, v("happy"), v(","), v("joy"), v(";"), UNK, v("?")])
    assert amy.x_train[0].tolist() == _pad([v("fun"), v("fun")])
    assert amy.x_test[0].tolist() == _pad([v("bob")])
    assert bob.y_train.dtype == np.int64 and bob.y_train.tolist() == written["train"]["bob"][1].tolist()
    assert amy.y_test.tolist() == [1]

    assert emb.dtype == np.float32 and emb.shape == (UNK + 1, 300)
    for i, word in enumerate(VOCAB):
        assert np.array_equal(emb[i], vectors[word])
    assert not emb[UNK].any()  # unknown word and padding


def test_sent140_max_words(tmp_path: Path) -> None:
    write_leaf_sent140(tmp_path, SENT140_USERS)
    write_glove(tmp_path / "glove.6B.300d.txt", GLOVE_WORDS)  # in data-dir/.. of data-dir=tmp/data
    clients, emb = sent140_clients(tmp_path / "data", 1, max_words=3)
    vocab = [",", "believe", "can't", "happy", "w0"]
    assert emb.shape == (len(vocab) + 1, 300)
    assert clients[0].x_train.tolist() == [[5, vocab.index("can't"), vocab.index("believe")], [4, 5, 5]]
    assert clients[0].x_test.tolist() == [[5, vocab.index("happy"), vocab.index(",")]]


@pytest.mark.parametrize("where", ["data-dir", "parent", "sent140"])
def test_embs_json_gives_the_same_as_glove_text(tmp_path: Path, where: str) -> None:
    write_leaf_sent140(tmp_path / "txt", SENT140_USERS)
    write_glove(tmp_path / "txt" / "data" / "glove.6B.300d.txt", GLOVE_WORDS)
    write_leaf_sent140(tmp_path / "json", SENT140_USERS)
    data_dir = tmp_path / "json" / "data"
    folder = {"data-dir": data_dir, "parent": data_dir.parent, "sent140": data_dir / "sent140"}[where]
    write_embs_json(folder / "embs.json", GLOVE_WORDS)
    from_text, emb_text = sent140_clients(tmp_path / "txt" / "data", 2)
    from_json, emb_json = sent140_clients(data_dir, 2)
    assert np.array_equal(emb_text, emb_json)
    for a, b in zip(from_text, from_json, strict=True):
        assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.x_test, b.x_test)


def test_glove_missing_says_where_it_looked(tmp_path: Path) -> None:
    write_leaf_sent140(tmp_path, 2)
    data_dir = tmp_path / "data"
    _one_line_error(lambda: sent140_clients(data_dir, 2), data_dir, tmp_path, data_dir / "sent140",
                    GLOVE_URL, "glove.6B.300d.txt", "embs.json")


def test_glove_bad_lines_name_the_line(tmp_path: Path) -> None:
    write_leaf_sent140(tmp_path, SENT140_USERS)
    glove = tmp_path / "data" / "glove.6B.300d.txt"
    write_glove(glove, GLOVE_WORDS)
    lines = glove.read_text().splitlines(keepends=True)
    glove.write_text("".join(lines) + "cut " + " ".join(["0.1"] * 120))  # an interrupted download
    _one_line_error(lambda: sent140_clients(tmp_path / "data", 2), glove, f"line {len(lines) + 1}", "120")
    numbers = lines[1].split(" ")
    lines[1] = " ".join([numbers[0], "x1.0", *numbers[2:]])  # "can't", a word the tweets use
    glove.write_text("".join(lines))
    _one_line_error(lambda: sent140_clients(tmp_path / "data", 2), glove, "line 2", "not a number")


def test_embs_json_damage_is_named(tmp_path: Path) -> None:
    write_leaf_sent140(tmp_path, SENT140_USERS)
    embs = tmp_path / "data" / "embs.json"
    write_embs_json(embs, GLOVE_WORDS)
    text = embs.read_text()
    embs.write_text(text[: len(text) // 2])
    _one_line_error(lambda: sent140_clients(tmp_path / "data", 2), embs, "get_embs.sh")
    data = json.loads(text)
    data["emba"].pop()
    data["emba"].pop()
    embs.write_text(json.dumps(data))
    _one_line_error(lambda: sent140_clients(tmp_path / "data", 2), embs, "19 rows for 20 words")


def _set_text(value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda data: _first_user(data)["x"][0].__setitem__(4, value)


SENT140_BAD = {
    "label 2": (lambda d: _first_user(d)["y"].__setitem__(0, 2), ["'y'[0]", "0..1"]),
    "four fields": (lambda d: _first_user(d)["x"][1].pop(), ["'x'[1]", "at least 5 fields"]),
    "text not a string": (_set_text(17), ["'x'[0][4]", "not a string"]),
    "num_samples off": (lambda d: d["num_samples"].__setitem__(0, 5), ["'num_samples'"]),
}


@pytest.mark.parametrize("case", SENT140_BAD)
def test_sent140_bad_files_name_file_and_user(tmp_path: Path, case: str) -> None:
    change, parts = SENT140_BAD[case]
    write_leaf_sent140(tmp_path, 4)
    write_glove(tmp_path / "data" / "glove.6B.300d.txt", ["the", "cat"])
    path = _train_file(tmp_path)
    _edit(path, change)
    _one_line_error(lambda: sent140_clients(tmp_path / "data", 2), path, "user000", *parts)


def test_sent140_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_leaf_sent140(tmp_path, SENT140_USERS)
    write_glove(tmp_path / "data" / "glove.6B.300d.txt", GLOVE_WORDS)
    clients, emb = sent140_clients(tmp_path / "data", 2)

    def fail(*args: Any) -> Any:
        raise AssertionError("decoded again")

    monkeypatch.setattr(leaf, "_read_json", fail)
    monkeypatch.setattr(leaf, "_embeddings", fail)
    again, emb_again = sent140_clients(tmp_path / "data", 2)
    assert np.array_equal(emb, emb_again)
    assert [c.x_train.tolist() for c in again] == [c.x_train.tolist() for c in clients]
    assert [c.user for c in again] == ["bob", "amy"]
