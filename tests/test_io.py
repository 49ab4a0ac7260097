"""Readers, the ordered writer and output records: every input format, the issue-10 parsing cases, prefixes."""

import csv
import io
import json
import random

import pytest

from simple_generation.io import (
    InputError,
    InputRecord,
    OrderedWriter,
    openai_batch_line,
    output_record,
    read_records,
    scan,
    windows,
)
from simple_generation.results import CompletionOutput, GenerationResult


def _write(path, data: bytes | str):
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def _read(path, **kwargs):
    return list(read_records(path, **kwargs))


# ------------------------------------------------------------------------------------------- .txt
def test_txt_splits_on_newline_only_and_keeps_record_positions(tmp_path):
    source = _write(tmp_path / "p.txt", "one\u2028still one\r\n\ntwo\x0cthree\u0085x\u2029y\r\n   \nfour")
    records = _read(source)
    assert [r.prompt for r in records] == ["one\u2028still one", "two\x0cthree\u0085x\u2029y", "four"]
    assert [r.index for r in records] == [0, 1, 2]
    assert [r.source for r in records] == [f"{source}:1", f"{source}:3", f"{source}:5"]


def test_txt_bom_is_dropped(tmp_path):
    records = _read(_write(tmp_path / "p.txt", b"\xef\xbb\xbfHello\nWorld\n"))
    assert [r.prompt for r in records] == ["Hello", "World"]


def test_txt_invalid_utf8_names_the_line(tmp_path):
    source = _write(tmp_path / "p.txt", b"fine\nbad \xff byte\n")
    with pytest.raises(InputError, match=r"p\.txt:2: not valid UTF-8"):
        _read(source)


# ------------------------------------------------------------------------------------------- .jsonl
def test_jsonl_raw_line_separator_inside_a_string(tmp_path):
    line = '{"prompt": "a\u2028b\u2029c", "id": 1}'  # json.dumps(ensure_ascii=False) writes these raw
    records = _read(_write(tmp_path / "p.jsonl", line + "\n" + json.dumps({"prompt": "x"}) + "\n"))
    assert [r.prompt for r in records] == ["a\u2028b\u2029c", "x"]
    assert records[0].fields == {"id": 1}


def test_jsonl_extension_is_case_insensitive_and_bom_is_dropped(tmp_path):
    source = _write(tmp_path / "P.JSONL", b"\xef\xbb\xbf" + b'{"prompt": "hi"}\r\n{"text": "there"}\n')
    assert [r.prompt for r in _read(source)] == ["hi", "there"]


def test_jsonl_error_names_the_file_line(tmp_path):
    source = _write(tmp_path / "p.jsonl", '{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(InputError, match=r"p\.jsonl:2: invalid JSON"):
        _read(source)


def test_jsonl_invalid_utf8_names_the_line(tmp_path):
    source = _write(tmp_path / "p.jsonl", b'{"prompt": "a"}\n\n{"prompt": "\xc3\x28"}\n')
    with pytest.raises(InputError, match=r"p\.jsonl:3: not valid UTF-8"):
        _read(source)


def test_missing_prompt_field_names_the_record_and_its_fields(tmp_path):
    source = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"question": "q", "id": 3}\n')
    with pytest.raises(InputError) as info:
        _read(source)
    message = str(info.value)
    assert "p.jsonl:2" in message and "record 1" in message and "question, id" in message
    other = _write(tmp_path / "q.jsonl", '{"question": "q", "id": 3}\n')
    assert [(r.prompt, r.fields) for r in _read(other, prompt_field="question")] == [("q", {"id": 3})]


def test_prompt_field_default_order_and_messages(tmp_path):
    rows = [{"prompt": "p", "text": "t"}, {"text": "t2"},
            {"messages": [{"role": "user", "content": "hi"}]}, "bare string"]
    records = _read(_write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert records[0].prompt == "p" and records[0].fields == {"text": "t"}
    assert records[1].prompt == "t2"
    assert records[2].prompt == [{"role": "user", "content": "hi"}]
    assert records[3].prompt == "bare string"
    chats = _read(_write(tmp_path / "c.jsonl", json.dumps({"conv": [{"role": "user", "content": "x"}]}) + "\n"),
                  messages_field="conv")
    assert chats[0].prompt == [{"role": "user", "content": "x"}]


def test_per_record_params_and_carried_fields(tmp_path):
    row = {"prompt": "p", "id": "a1", "max_tokens": 3, "temperature": 0, "stop": "\n", "n": 2, "seed": 7,
           "top_k": 5, "top_p": 0.5, "meta": {"k": [1, 2]}}
    record = _read(_write(tmp_path / "p.jsonl", json.dumps(row) + "\n"))[0]
    assert record.params == {"max_new_tokens": 3, "temperature": 0, "stop_strings": ["\n"], "num_return_sequences": 2,
                             "seed": 7, "top_k": 5, "top_p": 0.5}
    assert record.fields == {"id": "a1", "meta": {"k": [1, 2]}}


@pytest.mark.parametrize("row, words", [
    ({"prompt": "p", "temperature": "hot"}, "temperature"),
    ({"prompt": "p", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "p", "max_new_tokens": 2.5}, "max_new_tokens"),
    ({"prompt": "p", "top_p": 1.5}, "top_p"),
    ({"prompt": "p", "stop": [""]}, "empty stop"),
    ({"prompt": "p", "stop": 3}, "stop"),
    ({"prompt": "p", "seed": True}, "seed"),
    ({"prompt": "p", "max_tokens": 3, "max_new_tokens": 4}, "both"),
    ({"prompt": 5}, "must be a string"),
])
def test_invalid_params_name_the_record(tmp_path, row, words):
    source = _write(tmp_path / "p.jsonl", json.dumps({"prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError, match=r"p\.jsonl:2: record 1") as info:
        _read(source)
    assert words in str(info.value)


# ------------------------------------------------------------------------------------------- .json, .csv, parquet
def test_json_list_and_error_line(tmp_path):
    source = _write(tmp_path / "p.json", json.dumps([{"prompt": "a", "id": 1}, {"text": "b"}]))
    assert [(r.prompt, r.fields) for r in _read(source)] == [("a", {"id": 1}), ("b", {})]
    bad = _write(tmp_path / "bad.json", '[\n  {"prompt": "a"},\n  {"prompt": }\n]')
    with pytest.raises(InputError, match=r"bad\.json:3: invalid JSON"):
        _read(bad)
    lines = _write(tmp_path / "lines.json", '{"prompt": "a"}\n{"prompt": "b"}\n')  # JSON Lines named .json
    assert [r.prompt for r in _read(lines)] == ["a", "b"]


def test_csv_with_params_quoted_newlines_and_bom(tmp_path):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "prompt", "max_new_tokens", "temperature", "stop"])
    writer.writerow(["x", "line one\nline two", "5", "", '["END", "STOP"]'])
    writer.writerow(["y", "second", "", "0.5", "\n\n"])
    source = _write(tmp_path / "p.CSV", b"\xef\xbb\xbf" + buffer.getvalue().encode())
    records = _read(source)
    assert [r.prompt for r in records] == ["line one\nline two", "second"]
    assert records[0].params == {"max_new_tokens": 5, "stop_strings": ["END", "STOP"]}
    assert records[1].params == {"temperature": 0.5, "stop_strings": ["\n\n"]}
    assert [r.fields for r in records] == [{"id": "x"}, {"id": "y"}]
    assert records[1].source.endswith(":4")
    bad = _write(tmp_path / "bad.csv", "prompt,max_new_tokens\na,3\nb,lots\n")
    with pytest.raises(InputError, match=r"bad\.csv:3: record 1: `max_new_tokens` must be an integer"):
        _read(bad)


def test_parquet_by_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"prompt": [f"p{i}" for i in range(2500)], "id": list(range(2500)),
                      "max_new_tokens": [3 if i % 2 else None for i in range(2500)]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=1000)
    records = _read(tmp_path / "p.parquet")
    assert len(records) == 2500 and records[2499].prompt == "p2499" and records[2499].fields == {"id": 2499}
    assert records[1].params == {"max_new_tokens": 3} and records[0].params == {}
    assert records[7].source.endswith(":row 7")
    assert len(_read(tmp_path / "p.parquet", limit=10)) == 10


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(str(tmp_path / "ds"))
    records = _read(tmp_path / "ds")
    assert [(r.prompt, r.fields) for r in records] == [("a", {"label": 0}), ("b", {"label": 1})]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["x"]}),
                          "test": datasets.Dataset.from_dict({"prompt": ["y"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="splits train, test"):
        _read(tmp_path / "dd")


# ------------------------------------------------------------------------------------------- stdin
@pytest.mark.parametrize("data, fmt, expected", [
    (b'{"prompt": "a"}\n{"prompt": "b"}\n', None, ["a", "b"]),      # sniffed: JSON Lines
    (b"\n\nplain one\nplain two\n", None, ["plain one", "plain two"]),  # sniffed: text
    (b'[{"prompt": "a"}]', None, ["a"]),                              # sniffed: JSON
    (b"prompt\nfrom csv\n", "csv", ["from csv"]),
    (b'{"prompt": "as text"}\n', "txt", ['{"prompt": "as text"}']),
])
def test_stdin(data, fmt, expected):
    records = list(read_records("-", input_format=fmt, stdin=io.BytesIO(data)))
    assert [r.prompt for r in records] == expected
    assert records[0].source.startswith("<stdin>")


# ------------------------------------------------------------------------------------------- OpenAI batch
def _openai_lines():
    return [
        {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-x", "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                  "max_tokens": 5, "temperature": 0.2, "top_p": 0.9, "stop": ["\n"], "n": 2, "seed": 3}},
        {"custom_id": "req-2", "method": "POST", "url": "/v1/completions",
         "body": {"model": "gpt-x", "prompt": "Once upon", "max_completion_tokens": 4, "presence_penalty": 0}},
    ]


def test_openai_batch_input_is_detected(tmp_path):
    source = _write(tmp_path / "batch.jsonl", "".join(json.dumps(line) + "\n" for line in _openai_lines()))
    first, second = _read(source)
    assert first.custom_id == "req-1" and first.openai.chat and first.openai.model == "gpt-x"
    assert first.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert first.params == {"max_new_tokens": 5, "temperature": 0.2, "top_p": 0.9, "stop_strings": ["\n"],
                            "num_return_sequences": 2, "seed": 3}
    assert second.prompt == "Once upon" and not second.openai.chat and second.params == {"max_new_tokens": 4}
    unsupported = {"custom_id": "r", "body": {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 2}}}
    with pytest.raises(InputError, match="body.logit_bias is not supported"):
        _read(_write(tmp_path / "bad.jsonl", json.dumps(unsupported) + "\n"))


def _result(texts, reasons, **fields):
    """A GenerationResult whose outputs have these texts and finish reasons."""
    outputs = [CompletionOutput(index=i, text=t, finish_reason=r) for i, (t, r) in enumerate(zip(texts, reasons))]
    return GenerationResult(index=0, outputs=outputs, **fields)


def test_openai_batch_output_lines():
    record = InputRecord(index=0, prompt=[{"role": "user", "content": "Hi"}], custom_id="req-1")
    ok = output_record(record, _result(["a", "b"], ["stop_string", "length"], prompt_tokens=4, completion_tokens=6))
    line = openai_batch_line(ok, chat=True, model="m", created=1)
    assert line["custom_id"] == "req-1" and line["error"] is None and line["id"].startswith("batch_req_")
    body = line["response"]["body"]
    assert line["response"]["status_code"] == 200 and line["response"]["request_id"].startswith("req_")
    assert body["object"] == "chat.completion" and body["model"] == "m"
    assert [c["message"]["content"] for c in body["choices"]] == ["a", "b"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    text = openai_batch_line(output_record(record, _result(["x"], ["stop"])),
                             chat=False, model="m", created=1)
    assert text["response"]["body"]["object"] == "text_completion"
    assert text["response"]["body"]["choices"][0]["text"] == "x"
    failed = openai_batch_line(output_record(record, GenerationResult(index=0, error="too long")), chat=True)
    assert failed["response"] is None and failed["error"] == {"code": "generation_error", "message": "too long"}
    assert openai_batch_line(ok, created=1) == openai_batch_line(ok, created=1)  # stable ids across reruns


# ------------------------------------------------------------------------------------------- records, scan, windows
def test_output_record_keeps_todays_fields_and_renames_collisions():
    record = InputRecord(index=4, prompt="Q", fields={"id": 9, "answer": "gold", "index": "orig"})
    out = output_record(record, _result(["A"], ["stop"], prompt="<s>[INST] Q [/INST]", prompt_tokens=3,
                                         completion_tokens=1))
    assert out == {"id": 9, "input_answer": "gold", "input_index": "orig", "index": 4, "prompt": "Q", "answer": "A",
                   "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 1, "error": None}
    many = output_record(record, _result(["a", "b"], ["stop", "length"]))
    assert many["answer"] == ["a", "b"] and many["finish_reason"] == ["stop", "length"]
    near = output_record(record, duplicate_of=1)
    assert near["duplicate_of"] == 1 and near["answer"] is None and near["error"] is None


def test_scan_collects_errors_and_duplicates(tmp_path):
    lines = ['{"prompt": "a"}', '{"prompt": "a"}', '{"prompt": "a", "temperature": 0}', "{oops", '{"x": 1}',
             '{"prompt": "b"}']
    report = scan(_write(tmp_path / "p.jsonl", "\n".join(lines) + "\n"))
    assert report.records == 4 and report.duplicates == 1 and report.error_count == 2 and not report.ok
    assert report.errors[0].startswith(f"{tmp_path / 'p.jsonl'}:4") and ":5" in report.errors[1]
    assert report.with_params == {"temperature": 1}


def test_limit_and_windows(tmp_path):
    source = _write(tmp_path / "p.txt", "".join(f"p{i}\n" for i in range(25)))
    assert [len(w) for w in windows(read_records(source), 10)] == [10, 10, 5]
    assert [r.prompt for r in read_records(source, limit=3)] == ["p0", "p1", "p2"]


def test_reader_is_lazy(tmp_path):
    source = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{broken\n')
    iterator = read_records(source)
    assert next(iterator).prompt == "a" and next(iterator).prompt == "b"  # the bad line is not read yet
    with pytest.raises(InputError):
        next(iterator)


# ------------------------------------------------------------------------------------------- ordered writer
def _records(count):
    return [{"id": f"r{i}", "index": i, "prompt": f"p{i}\u2028", "answer": f"a{i}", "error": None}
            for i in range(count)]


def test_ordered_writer_file_is_always_a_valid_prefix(tmp_path):
    records = _records(60)
    order = list(range(60))
    random.Random(0).shuffle(order)
    path = tmp_path / "out.jsonl"
    with OrderedWriter(path) as writer:
        for index in order:
            writer.add(index, records[index])
            lines = path.read_text(encoding="utf-8").split("\n")
            assert lines[-1] == ""  # whole lines only
            written = [json.loads(line) for line in lines[:-1]]
            assert written == records[:len(written)]
            assert len(written) == writer.next_index and writer.pending == sum(i > len(written) for i in
                                                                             order[:order.index(index) + 1])
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]] == records
    with pytest.raises(ValueError, match="already"):
        OrderedWriter(tmp_path / "x.jsonl").add(0, {}) or None
        writer.add(3, records[3])


def test_ordered_writer_csv_and_parquet(tmp_path):
    records = _records(5)
    records[2]["answer"] = ["x", "y"]
    with OrderedWriter(tmp_path / "out.csv") as writer:
        for index in (4, 3, 2, 1, 0):
            writer.add(index, records[index])
    rows = list(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8", newline="")))
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in records]
    assert json.loads(rows[2]["answer"]) == ["x", "y"] and rows[0]["error"] == ""
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    with OrderedWriter(tmp_path / "out.parquet", row_group_size=2) as writer:
        for index in (1, 0, 2, 4, 3):
            writer.add(index, records[index])
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["index"] for r in table] == list(range(5)) and table[2]["answer"] == '["x", "y"]'
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_row_groups == 3
