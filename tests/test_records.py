import datetime as dt
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexer.records import BadRecordError, ReadStats, Record, read_records

from .support import write_jsonl


def test_plain_documents_keep_metadata(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", [
        {"id": "a", "text": "hello world", "url": "http://x", "meta": {"lang": "en", "tags": [1, 2]}},
        {"id": 7, "text": "second", "score": 0.5},
    ])
    recs = list(read_records(p))
    assert recs[0] == Record(id="a", text="hello world", prompt="",
                             metadata={"url": "http://x", "meta": {"lang": "en", "tags": [1, 2]}},
                             source=str(p), line=1)
    assert recs[1].id == "7" and recs[1].metadata == {"score": 0.5} and recs[1].line == 2


def test_custom_text_and_id_fields(tmp_path):
    p = write_jsonl(tmp_path / "d.json", [{"doc_id": "x1", "content": "body", "text": "other"}])
    (rec,) = read_records(str(p), text_field="content", id_field="doc_id")
    assert rec.id == "x1" and rec.text == "body" and rec.metadata == {"text": "other"}


def test_an_id_field_no_record_has_is_an_error(tmp_path):
    from indexer.records import ID_FIELD_CHECK, BadRecordError
    p = write_jsonl(tmp_path / "d.jsonl", [{"uid": f"u{i}", "text": "body"} for i in range(ID_FIELD_CHECK + 5)])
    with pytest.raises(BadRecordError, match=r"--id-field 'doc_id': none of the first 100 records.*'uid', 'text'"):
        list(read_records(str(p), id_field="doc_id"))
    short = write_jsonl(tmp_path / "s.jsonl", [{"uid": "a", "text": "body"}])  # fewer records than the check
    with pytest.raises(BadRecordError, match="none of the first 1 records"):
        list(read_records(str(short), id_field="doc_id"))
    # the default id field may be absent (ids are generated), and one record having the field is enough
    assert [r.id for r in read_records(str(short))] == ["s-1"]
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"doc_id": "x", "text": "b"}])
    assert [r.id for r in read_records(str(mixed), id_field="doc_id")] == ["m-1", "x"]


def test_prompt_response_records(tmp_path):
    p = write_jsonl(tmp_path / "chat.jsonl", [
        {"id": 1, "q": "What is 2+2? ", "a": "4", "text": "ignored field", "src": "s"},
        {"id": 2, "q": "", "a": "only a response"},
    ])
    recs = list(read_records(p, prompt_field="q", response_field="a"))
    assert recs[0].text == "What is 2+2? 4"
    assert recs[0].prompt == "What is 2+2? "
    assert recs[0].text.startswith(recs[0].prompt)
    # text_field is ignored in prompt/response mode, so "text" stays as metadata.
    assert recs[0].metadata == {"text": "ignored field", "src": "s"}
    assert recs[1].prompt == "" and recs[1].text == "only a response"


def test_empty_response_is_bad(tmp_path):
    p = write_jsonl(tmp_path / "chat.jsonl", [{"q": "hi", "a": "  "}])
    with pytest.raises(BadRecordError, match=r"chat\.jsonl line 1: .*'a'.*empty"):
        list(read_records(p, prompt_field="q", response_field="a"))


def test_generated_ids(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, "", {"text": "b", "id": "given"}, {"text": "c"}])
    assert [r.id for r in read_records(p)] == ["data-1", "given", "data-4"]


def test_generated_ids_gzip(tmp_path):
    p = tmp_path / "data.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    assert [(r.id, r.text) for r in read_records(p)] == [("data-1", "a"), ("data-2", "b")]


def test_generated_id_collision_is_duplicate(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", [{"id": "data-2", "text": "a"}, {"text": "b"}])
    with pytest.raises(BadRecordError, match=r"line 2: duplicate id 'data-2'"):
        list(read_records(p))


def test_parquet_streams_batches(tmp_path):
    n = 2500  # crosses two 1024-row batch boundaries
    table = pa.table({
        "id": pa.array(range(n), pa.int64()),
        "text": [f"doc {i}" for i in range(n)],
        "tags": [[f"t{i}", "x"] for i in range(n)],
        "info": [{"k": i, "name": f"n{i}"} for i in range(n)],
        "when": pa.array([dt.datetime(2024, 1, 2, 3, 4, 5)] * n, pa.timestamp("s")),
        "weight": [float("nan") if i == 5 else i / 2 for i in range(n)],
    })
    p = tmp_path / "corpus.parquet"
    pq.write_table(table, p, row_group_size=700)
    recs = list(read_records(p))
    assert len(recs) == n
    assert [r.id for r in recs] == [str(i) for i in range(n)]
    assert [r.line for r in recs] == list(range(1, n + 1))
    r = recs[1500]
    assert r.text == "doc 1500" and r.prompt == "" and r.source == str(p)
    assert r.metadata == {"tags": ["t1500", "x"], "info": {"k": 1500, "name": "n1500"},
                          "when": "2024-01-02T03:04:05", "weight": 750.0}
    assert recs[5].metadata["weight"] is None  # NaN is not JSON
    json.dumps([x.metadata for x in recs], allow_nan=False)


def test_parquet_bad_row_names_row(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["ok", "", "fine"]}), p)
    with pytest.raises(BadRecordError, match=r"t\.parquet row 2: .*empty"):
        list(read_records(p))
    assert [r.id for r in read_records(p, skip_bad=True)] == ["t-1", "t-3"]


def test_malformed_line_raises_with_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "c",', {"text": "d"}])
    with pytest.raises(BadRecordError) as exc:
        list(read_records(p))
    msg = str(exc.value)
    assert "data.jsonl" in msg and "line 3" in msg and "invalid JSON" in msg
    assert exc.value.line == 3 and exc.value.source == str(p)


def test_skip_bad_counts_and_keeps_good(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", [
        {"text": "a"}, "not json", {"text": ""}, [1, 2], {"text": "b", "id": "x"}, {"text": "c", "id": "x"},
    ])
    stats = ReadStats()
    recs = list(read_records(p, skip_bad=True, stats=stats))
    assert [r.text for r in recs] == ["a", "b"]
    assert stats.read == 2 and stats.skipped == 4
    assert len(stats.skipped_reasons) == 4
    assert stats.skipped_reasons[0].startswith(f"{p} line 2:")
    assert "line 6: duplicate id 'x'" in stats.skipped_reasons[3]


def test_skipped_reasons_capped(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", ["bad"] * 30 + [{"text": "ok"}])
    stats = ReadStats()
    assert len(list(read_records(p, skip_bad=True, stats=stats))) == 1
    assert stats.skipped == 30 and len(stats.skipped_reasons) == 20


def test_missing_text_field_lists_available_fields(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", [{"id": "1", "body": "x", "title": "t"}])
    with pytest.raises(BadRecordError, match=r"line 1: missing field 'text'") as exc:
        list(read_records(p))
    assert "'body'" in str(exc.value) and "'title'" in str(exc.value)


def test_missing_field_list_is_bounded(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", [{f"f{i}": i for i in range(50)}])
    with pytest.raises(BadRecordError) as exc:
        list(read_records(p))
    msg = str(exc.value)
    assert "'f9'" in msg and "'f10'" not in msg and "50 in all" in msg


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_text(tmp_path, text):
    p = write_jsonl(tmp_path / "data.jsonl", [{"text": text}])
    with pytest.raises(BadRecordError, match=r"data\.jsonl line 1: field 'text' is empty"):
        list(read_records(p))


@pytest.mark.parametrize("value, kind", [(5, "integer"), (None, "null"), (["a"], "array")])
def test_text_not_a_string(tmp_path, value, kind):
    p = write_jsonl(tmp_path / "data.jsonl", [{"text": value}])
    with pytest.raises(BadRecordError, match=f"must be a string, got {kind}"):
        list(read_records(p))


@pytest.mark.parametrize("bad_id", [1.5, True, None, {"a": 1}, ""])
def test_bad_id_types(tmp_path, bad_id):
    p = write_jsonl(tmp_path / "data.jsonl", [{"id": bad_id, "text": "x"}])
    with pytest.raises(BadRecordError, match=r"line 1: id field 'id'"):
        list(read_records(p))


def test_duplicate_id_within_file(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", [{"id": 1, "text": "a"}, {"id": "1", "text": "b"}])
    with pytest.raises(BadRecordError, match=r"data\.jsonl line 2: duplicate id '1'"):
        list(read_records(p))


def test_duplicate_id_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "a"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "y", "text": "b"}, {"id": "x", "text": "c"}])
    with pytest.raises(BadRecordError, match=r"b\.jsonl line 2: duplicate id 'x'"):
        list(read_records([a, b]))


def test_duplicate_against_seen_ids_and_set_updated(tmp_path):
    p = write_jsonl(tmp_path / "new.jsonl", [{"id": "n1", "text": "a"}, {"id": "old", "text": "b"}])
    seen = {"old"}
    stats = ReadStats()
    recs = list(read_records(p, seen_ids=seen, skip_bad=True, stats=stats))
    assert [r.id for r in recs] == ["n1"]
    assert seen == {"old", "n1"}
    assert stats.skipped == 1 and "duplicate id 'old'" in stats.skipped_reasons[0]


def test_non_object_json_line(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, '"just a string"'])
    with pytest.raises(BadRecordError, match=r"data\.jsonl line 2: expected a JSON object.*got string"):
        list(read_records(p))


def test_blank_lines_ignored(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('\n{"text": "a"}\n   \n\n{"text": "b"}\r\n\n', encoding="utf-8")
    stats = ReadStats()
    recs = list(read_records(p, stats=stats))
    assert [(r.text, r.line) for r in recs] == [("a", 2), ("b", 5)]
    assert stats.skipped == 0 and stats.read == 2


def test_invalid_utf8_is_a_bad_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n{"text": "c"}\n')
    with pytest.raises(BadRecordError, match="line 2: not valid UTF-8"):
        list(read_records(p))
    assert [r.text for r in read_records(p, skip_bad=True)] == ["a", "c"]


@pytest.mark.parametrize("kwargs", [{"prompt_field": "q"}, {"response_field": "a"}])
def test_only_one_of_prompt_response(tmp_path, kwargs):
    p = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="together"):
        read_records(p, **kwargs)


def test_unknown_extension(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"data\.csv.*\.jsonl.*\.parquet"):
        read_records(p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(p)


def test_reading_is_lazy(tmp_path):
    p = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b"}, "{oops", {"text": "d"}])
    it = read_records(p)
    assert next(it).text == "a"
    assert next(it).text == "b"
    with pytest.raises(BadRecordError, match="line 3"):
        next(it)


def test_huge_text_is_fine(tmp_path):
    big = "word " * 200_000
    p = write_jsonl(tmp_path / "data.jsonl", [{"text": big}])
    (rec,) = read_records(p)
    assert rec.text == big


def test_folders_of_shards_and_glob_patterns_expand_to_their_files_in_order(tmp_path):
    from indexer.records import expand_inputs
    (tmp_path / "shards" / "b").mkdir(parents=True)
    write_jsonl(tmp_path / "shards" / "b" / "part-2.jsonl", [{"id": "b2", "text": "two"}])
    write_jsonl(tmp_path / "shards" / "part-1.jsonl", [{"id": "a1", "text": "one"}, {"id": "a2", "text": "uno"}])
    with gzip.open(tmp_path / "shards" / "part-3.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "c3", "text": "three"}) + "\n")
    (tmp_path / "shards" / "README.md").write_text("not data")
    folder = [r for r in read_records(str(tmp_path / "shards"))]
    assert [r.id for r in folder] == ["b2", "a1", "a2", "c3"]  # sorted paths: b/part-2, part-1, part-3
    assert [Path(r.source).name for r in folder] == ["part-2.jsonl", "part-1.jsonl", "part-1.jsonl", "part-3.jsonl.gz"]
    pattern = str(tmp_path / "shards" / "**" / "part-*.jsonl")
    assert [r.id for r in read_records(pattern)] == ["b2", "a1", "a2"]
    # a file named twice (folder and file) is read once
    assert expand_inputs([tmp_path / "shards" / "part-1.jsonl", tmp_path / "shards"])[0].endswith("part-1.jsonl")
    assert len(expand_inputs([tmp_path / "shards" / "part-1.jsonl", tmp_path / "shards"])) == 3
    with pytest.raises(FileNotFoundError, match="no .* files match"):
        expand_inputs(str(tmp_path / "nothing-*.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="in the folder"):
        expand_inputs(tmp_path / "empty")


def test_datasets_saved_to_disk_and_unreachable_hub_names(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"id": f"d{i}", "text": f"row {i} text", "lang": "en"} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "single")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(tmp_path / "splits")
    got = list(read_records(str(tmp_path / "single")))
    assert [r.id for r in got] == [r["id"] for r in rows] and got[0].metadata == {"lang": "en"}
    assert got[2].source == str(tmp_path / "single") and got[2].line == 3  # provenance: the dataset and its row
    assert [r.id for r in read_records(str(tmp_path / "splits"))] == ["d0", "d1", "d2"]  # train by default
    assert [r.id for r in read_records(f"{tmp_path / 'splits'}@test")] == ["d3", "d4"]
    with pytest.raises(ValueError, match="no split 'dev'.*train, test"):
        read_records(f"{tmp_path / 'splits'}@dev")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot load this dataset from the Hugging Face hub"):
        read_records("hf://no-such-owner/no-such-dataset:cfg@train")
