"""Training data: every supported source reads, and schema errors name the first bad row and what it lacks."""
import json
import re

import pytest
import training_helpers as h

from corept.training.data import DataError, check_rows, load_training_data
from corept.training.defaults import HELD_OUT_QUESTION, shipped_data


@pytest.mark.parametrize("method,n,fmt", [("sft", 46, "prompt-completion"), ("dpo", 46, "preference"),
                                          ("kto", 69, "unpaired preference")])
def test_shipped_data_is_valid(method, n, fmt):
    ds, got = load_training_data(shipped_data(method), method)
    assert (len(ds), got) == (n, fmt)
    questions = {r["prompt"][0]["content"] for r in ds}
    assert HELD_OUT_QUESTION not in questions  # the demo's question is held out
    if method == "kto":
        labels = ds["label"]
        assert all(isinstance(v, bool) for v in labels) and any(labels) and not all(labels)


def test_first_bad_row_is_named_with_its_line(tmp_path):
    good = h.rows("sft", 2)
    bad = {"prompt": h.conv("user", "Q")}  # lacks completion
    path = h.write_jsonl(tmp_path / "d.jsonl", good + [bad, bad])
    text = path.read_text()
    path.write_text("\n" + text)  # a blank first line: row 2 is on line 4
    with pytest.raises(DataError) as err:
        load_training_data(path, "sft")
    msg = str(err.value)
    assert "row 2 (line 4)" in msg and "lacks 'completion'" in msg and "row 3" not in msg


@pytest.mark.parametrize("method,row,expected", [
    ("sft", {"prompt": "q"}, "row 1 lacks 'completion'"),
    ("sft", {"other": "x"}, "row 1 lacks 'messages'"),
    ("dpo", {"prompt": "q", "chosen": "a"}, "row 1 lacks 'rejected'"),
    ("dpo", {"prompt": "q", "chosen": "a", "rejected": ""}, "row 1 lacks 'rejected'"),
    ("kto", {"prompt": "q", "completion": "a"}, "row 1 lacks 'label'"),
    ("kto", {"prompt": "q", "completion": "a", "label": "maybe"}, "row 1: 'label' must be a bool"),
    ("sft", {"messages": [{"role": "user"}]}, "row 1: 'messages': message 0 is not"),
    ("dpo", {"prompt": "q", "chosen": h.conv("assistant", "a"), "rejected": "b"}, "row 1 mixes plain strings"),
    ("sft", ["not", "a", "dict"], "row 1 is a list"),
])
def test_schema_errors(method, row, expected):
    first = {"sft": {"prompt": "q", "completion": "a"}, "dpo": {"prompt": "q", "chosen": "a", "rejected": "b"},
             "kto": {"prompt": "q", "completion": "a", "label": True}}[method]
    if method == "sft" and "messages" in str(row):
        first = {"messages": h.conv("user", "q") + h.conv("assistant", "a")}
    with pytest.raises(DataError, match="^" + re.escape("d: " + expected)):
        check_rows([first, row, row], method, source="d")


def test_one_format_per_dataset():
    with pytest.raises(DataError, match="row 1 is in 'text' format but row 0 is in 'messages' format"):
        check_rows([{"messages": h.conv("user", "q")}, {"text": "t"}], "sft")


def test_unreadable_sources(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"row 1 \(line 2\) is not valid JSON"):
        load_training_data(tmp_path / "bad.jsonl", "sft")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type .txt"):
        load_training_data(tmp_path / "x.txt", "sft")
    with pytest.raises(DataError, match="no such file"):
        load_training_data(tmp_path / "missing.jsonl", "sft")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_training_data(tmp_path / "empty.jsonl", "sft")
    (tmp_path / "obj.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match="under 'train' or 'data'"):
        load_training_data(tmp_path / "obj.json", "sft")


def test_every_source_type_reads(tmp_path):
    """jsonl, json (list and {'train': [...]}), csv (labels as text), parquet and a datasets folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    kto = [{"prompt": "q", "completion": "a", "label": i % 2 == 0, "extra": i} for i in range(4)]
    h.write_jsonl(tmp_path / "k.jsonl", kto)
    (tmp_path / "k.json").write_text(json.dumps(kto))
    (tmp_path / "k2.json").write_text(json.dumps({"train": kto}))
    (tmp_path / "k.csv").write_text("prompt,completion,label\n" + "".join(
        f"q,a,{'true' if r['label'] else 'False'}\n" for r in kto))
    pq.write_table(pa.Table.from_pylist(kto), tmp_path / "k.parquet")
    DatasetDict({"train": Dataset.from_list([{**r, "label": int(r["label"])} for r in kto])}).save_to_disk(
        str(tmp_path / "folder"))
    for name in ("k.jsonl", "k.json", "k2.json", "k.csv", "k.parquet", "folder"):
        ds, fmt = load_training_data(tmp_path / name, "kto")
        assert fmt == "unpaired preference", name
        assert ds.column_names == ["prompt", "completion", "label"], name  # extra columns dropped
        assert ds["label"] == [True, False, True, False], name


def test_datasets_folder_without_train_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"test": Dataset.from_list([{"text": "a"}])}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"no 'train' split \(splits: \['test'\]\)"):
        load_training_data(tmp_path / "d", "sft")
