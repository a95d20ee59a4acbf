"""flowray.corpora: every source kind on tiny local files, the shared data sets, and config errors."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA, needs_shared

from flowray.corpora import SOURCE_KINDS, Document, iter_documents, stdlib_files, validate_source
from flowray.errors import ConfigError, InputError
from flowray.tasks import task_prompts

FLORES = SHARED_DATA / "flores200_devtest"
C4 = SHARED_DATA / "c4_sample" / "c4_en_sample_1000.jsonl"


def write_jsonl(path, records, blank_line_after=None):
    lines = [json.dumps(r) for r in records]
    if blank_line_after is not None:
        lines.insert(blank_line_after + 1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def jsonl_file(tmp_path):
    records = [{"text": "first doc", "url": "a"}, {"text": "", "url": "b"}, {"text": None, "url": "c"},
               {"text": "last doc", "url": "d"}]
    return write_jsonl(tmp_path / "docs.jsonl", records, blank_line_after=1)


def texts(docs):
    return [d.text for d in docs]


# ------------------------------------------------------------------------------------------ jsonl


def test_jsonl_keeps_empty_and_null_texts_and_skips_blank_lines(jsonl_file):
    docs = list(iter_documents({"kind": "jsonl", "paths": [str(jsonl_file)], "meta_fields": ["url"]}))
    assert all(isinstance(d, Document) for d in docs)
    assert texts(docs) == ["first doc", "", "", "last doc"]
    # ids count lines of the file (the blank line is line 2), so they point back into it
    assert [d.doc_id for d in docs] == ["docs.jsonl:000000", "docs.jsonl:000001", "docs.jsonl:000003",
                                        "docs.jsonl:000004"]
    assert docs[0].meta == {"file": "docs.jsonl", "row": 0, "url": "a"}
    json.dumps([d.meta for d in docs])


def test_jsonl_globs_base_dir_and_labels(tmp_path, monkeypatch):
    for sub, name in [("x", "one.jsonl"), ("y", "one.jsonl"), ("y", "two.jsonl")]:
        (tmp_path / sub).mkdir(exist_ok=True)
        write_jsonl(tmp_path / sub / name, [{"text": f"{sub}/{name}"}])
    source = {"kind": "jsonl", "paths": ["**/*.jsonl"], "base_dir": str(tmp_path)}
    docs = list(iter_documents(source))
    assert [d.doc_id for d in docs] == ["x/one.jsonl:000000", "y/one.jsonl:000000", "y/two.jsonl:000000"]
    assert texts(docs) == ["x/one.jsonl", "y/one.jsonl", "y/two.jsonl"]
    # relative paths without base_dir resolve against the current directory; a single string is fine
    monkeypatch.chdir(tmp_path / "y")
    assert texts(iter_documents({"kind": "jsonl", "paths": "two.jsonl"})) == ["y/two.jsonl"]


def test_jsonl_missing_text_field_names_the_available_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(ConfigError, match=r"has no field 'text'; allowed: its fields \['body', 'id'\]; got 'text'"):
        list(iter_documents({"kind": "jsonl", "paths": [str(path)]}))


def test_jsonl_bad_line_is_an_input_error_naming_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not a JSON object"):
        list(iter_documents({"kind": "jsonl", "paths": [str(path)]}))


def test_missing_files_fail_at_the_call_not_at_first_next(tmp_path):
    with pytest.raises(ConfigError, match=r"file not found: 'nope.jsonl' \(resolved to .*nope.jsonl'\).*set base_dir"):
        iter_documents({"kind": "jsonl", "paths": ["nope.jsonl"], "base_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"no file matches the pattern '\*.parquet'"):
        iter_documents({"kind": "parquet", "paths": ["*.parquet"], "base_dir": str(tmp_path)})


# ---------------------------------------------------------------------------------------- parquet


@pytest.fixture
def parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"content": ["a", None, "ccc"], "lang": ["en", "en", "ru"]}), path, row_group_size=2)
    return path


def test_parquet_rows_in_order_with_meta(parquet_file):
    source = {"kind": "parquet", "paths": [str(parquet_file)], "text_field": "content", "meta_fields": ["lang"]}
    docs = list(iter_documents(source))
    assert texts(docs) == ["a", "", "ccc"]
    assert [d.doc_id for d in docs] == ["rows.parquet:000000", "rows.parquet:000001", "rows.parquet:000002"]
    assert docs[2].meta == {"file": "rows.parquet", "row": 2, "lang": "ru"}
    assert texts(iter_documents(source, limit=2)) == ["a", ""]


def test_parquet_missing_column(parquet_file):
    with pytest.raises(ConfigError, match=r"has no field 'text'; allowed: its fields \['content', 'lang'\]"):
        iter_documents({"kind": "parquet", "paths": [str(parquet_file)]})


# ------------------------------------------------------------------------------------------- text


def test_text_lines_and_file_modes(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\n\nthree\r\nfour")
    (tmp_path / "b.py").write_text("def f():\n    return 1\n")
    lines = list(iter_documents({"kind": "text", "paths": [str(tmp_path / "a.txt")]}))
    assert texts(lines) == ["one", "", "three", "four"]  # empty line kept, no extra doc after the last
    assert lines[2].doc_id == "a.txt:000002" and lines[2].meta == {"file": "a.txt", "row": 2}
    files = list(iter_documents({"kind": "text", "paths": [str(tmp_path / "*")], "mode": "file"}))
    assert [d.doc_id for d in files] == ["a.txt", "b.py"]
    assert files[1].text == "def f():\n    return 1\n"


def test_max_chars_truncates_at_a_line_break(tmp_path):
    (tmp_path / "code.py").write_text("x = 1\n" * 10)  # 60 characters
    source = {"kind": "text", "paths": [str(tmp_path / "code.py")], "mode": "file", "max_chars": 20}
    assert next(iter_documents(source)).text == "x = 1\n" * 3


def test_non_utf8_text_is_an_input_error(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match="is not UTF-8 text"):
        list(iter_documents({"kind": "text", "paths": [str(tmp_path / "latin.txt")]}))


# --------------------------------------------------------------------------------------------- hf


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_local_json_is_the_same_code_path(jsonl_file, tmp_path, streaming):
    source = {"kind": "hf", "path": "json", "data_files": str(jsonl_file), "split": "train",
              "streaming": streaming, "cache_dir": str(tmp_path / "cache"), "meta_fields": ["url"]}
    docs = list(iter_documents(source))
    assert texts(docs) == ["first doc", "", "", "last doc"]
    assert [d.doc_id for d in docs] == ["json:000000", "json:000001", "json:000002", "json:000003"]
    assert docs[3].meta == {"row": 3, "url": "d"}
    assert texts(iter_documents(source, limit=1)) == ["first doc"]


def test_hf_local_parquet_and_missing_field(parquet_file):
    source = {"kind": "hf", "path": "parquet", "data_files": [str(parquet_file)], "text_field": "content"}
    assert texts(iter_documents(source)) == ["a", "", "ccc"]
    expected = r"dataset 'parquet' has no field 'text'; allowed: its fields \['content', 'lang'\]"
    with pytest.raises(ConfigError, match=expected):
        iter_documents({**source, "text_field": "text"})


def test_hf_load_failures_become_config_errors(jsonl_file):
    with pytest.raises(ConfigError, match=r"could not load path='json'.*split='validation'"):
        iter_documents({"kind": "hf", "path": "json", "data_files": str(jsonl_file), "split": "validation"})


# ------------------------------------------------------------------------------ stdlib and pydoc


def test_stdlib_code_is_sorted_capped_and_skips_tests():
    files = stdlib_files()
    rel = [r for r, _ in files]
    assert rel == sorted(rel) and "json/decoder.py" in rel
    assert not any(part in {"test", "tests", "site-packages", "dist-packages"} for r in rel for part in r.split("/"))
    docs = list(iter_documents({"kind": "stdlib_code"}, limit=30))
    assert [d.doc_id for d in docs] == [f"stdlib:{r}" for r in rel[:30]]
    assert all(len(d.text) <= 20_000 for d in docs)
    capped = iter_documents({"kind": "stdlib_code", "max_chars": 500})
    decoder = next(d for d in capped if d.doc_id == "stdlib:json/decoder.py")
    assert decoder.text.startswith('"""Implementation of JSONDecoder') and len(decoder.text) <= 500
    assert decoder.meta["truncated"] and decoder.meta["chars"] > 500


def test_pydoc_topics_are_sorted_prose():
    from pydoc_data.topics import topics

    docs = list(iter_documents({"kind": "pydoc_topics"}))
    assert [d.doc_id for d in docs] == [f"pydoc:{t}" for t in sorted(topics)]
    assert next(d for d in docs if d.doc_id == "pydoc:assert").text == topics["assert"]
    assert all(d.text for d in docs)


# ------------------------------------------------------------------------------------------- task


def test_task_variants_pair_up_by_id():
    original = list(iter_documents({"kind": "task", "task": "greater_than", "n": 8, "contrastive_yy": "00"}, seed=3))
    twins = list(iter_documents({"kind": "task", "task": "greater_than", "n": 8, "variant": "contrastive",
                                 "contrastive_yy": "00"}, seed=3))
    prompts = task_prompts("greater_than", 8, seed=3, contrastive_yy="00")
    assert [d.doc_id for d in original] == [d.doc_id for d in twins] == [f"greater_than:{i:04d}" for i in range(8)]
    assert texts(original) == [p.text for p in prompts] and texts(twins) == [p.contrastive for p in prompts]
    assert twins[0].meta["variant"] == "contrastive" and twins[0].meta["answer"] == prompts[0].answer
    assert {k: original[5].meta[k] for k in ("template", "answer", "wrong")} == {
        "template": "gt-0", "answer": prompts[5].answer, "wrong": prompts[5].wrong}
    json.dumps([d.meta for d in original])


def test_task_limit_seed_key_and_tokenizer(smollm2):
    source = {"kind": "task", "task": "ioi", "n": 50, "templates": "BABA"}
    limited = list(iter_documents(source, limit=5, seed=1))
    assert texts(limited) == texts(list(iter_documents(source, seed=1))[:5])
    assert texts(iter_documents({**source, "seed": 1}, limit=5, seed=99)) == texts(limited)  # the key wins
    docs = list(iter_documents(source, limit=5, tokenizer=smollm2.tokenizer))
    assert all(d.meta["template"].startswith("BABA-") and "answer_token_id" in d.meta for d in docs)


# ------------------------------------------------------------------------------------- validation


def test_validate_source_fills_defaults():
    assert validate_source({"kind": "text", "paths": "a.txt"}) == {
        "kind": "text", "paths": ["a.txt"], "base_dir": None, "max_chars": None, "mode": "lines"}
    hf = validate_source({"kind": "hf", "path": "allenai/c4", "name": "en", "split": "validation"})
    assert hf["streaming"] is True and hf["text_field"] == "text" and hf["meta_fields"] == []
    assert validate_source({"kind": "task", "task": "ioi"})["templates"] == "both"
    assert validate_source({"kind": "stdlib_code"})["max_chars"] == 20_000
    for source in [hf, validate_source({"kind": "task", "task": "greater_than", "variant": "contrastive"})]:
        assert validate_source(source) == source  # idempotent: the driver and the reader may both call it
    assert {validate_source(s)["kind"] for s in [{"kind": k} for k in ("stdlib_code", "pydoc_topics")]} == {
        "stdlib_code", "pydoc_topics"}
    assert set(SOURCE_KINDS) == {"hf", "jsonl", "parquet", "text", "stdlib_code", "pydoc_topics", "task"}


@pytest.mark.parametrize(
    "source, message",
    [
        (["jsonl"], r"must be a mapping with a 'kind' key; got \['jsonl'\]"),
        ({"kind": "csv"}, r"'kind' must be one of \['hf', 'jsonl', .*\]; got 'csv'"),
        ({"paths": ["a"]}, r"'kind' must be one of .*; got None"),
        ({"kind": "jsonl"}, r"the key 'paths' is required; allowed: \['base_dir', .*\]; got .*; add 'paths'"),
        ({"kind": "jsonl", "paths": ["a"], "textfield": "x"},
         r"unknown key\(s\) \['textfield'\]; allowed: .*'text_field'"),
        ({"kind": "jsonl", "paths": []}, r"'paths' must name at least one file or glob; .*got \[\]"),
        ({"kind": "jsonl", "paths": [3]}, r"'paths' must be a string or a list of non-empty strings.*got \[3\]"),
        ({"kind": "hf", "path": "c4", "streaming": "yes"}, r"'streaming' must be true or false; .*got 'yes'"),
        ({"kind": "text", "paths": ["a"], "mode": "paragraphs"},
         r"'mode' is not a known value; allowed: \['lines', 'file'\]; got 'paragraphs'"),
        ({"kind": "stdlib_code", "max_chars": 0}, r"'max_chars' must be an integer >= 1; .*got 0"),
        ({"kind": "task", "task": "sst2"},
         r"'task' must name a generated task set; allowed: \['ioi', .*\]; got 'sst2'"),
        ({"kind": "task", "task": "ioi", "variant": "abc"}, r"allowed: \['original', 'contrastive'\]; got 'abc'"),
        ({"kind": "task", "task": "greater_than", "contrastive_yy": 1}, r"allowed: \['01', '00'\]; got 1"),
        ({"kind": "task", "task": "addition", "templates": "ABBA"}, r"unknown key\(s\) \['templates'\]"),
        ({"kind": "task", "task": "ioi", "n": -5}, r"'n' must be an integer >= 0; .*got -5"),
    ],
)
def test_bad_sources_are_config_errors_saying_what_and_allowed(source, message):
    with pytest.raises(ConfigError, match=message):
        validate_source(source)


@pytest.mark.parametrize("limit", [-1, 1.5, "3"])
def test_bad_limit_is_an_input_error(limit):
    with pytest.raises(InputError, match=rf"limit must be None or an integer >= 0; got {limit!r}"):
        iter_documents({"kind": "pydoc_topics"}, limit=limit)


def test_limit_zero_yields_nothing():
    assert list(iter_documents({"kind": "pydoc_topics"}, limit=0)) == []


# ----------------------------------------------------------------------------------- shared data


@needs_shared
def test_flores_lines_are_aligned_across_languages():
    eng = list(iter_documents({"kind": "text", "paths": [str(FLORES / "eng_Latn.devtest")]}))
    rus = list(iter_documents({"kind": "text", "paths": ["rus_Cyrl.devtest"], "base_dir": str(FLORES)}))
    assert len(eng) == len(rus) == 1012
    assert eng[0].text.startswith('"We now have 4-month-old mice') and eng[0].doc_id == "eng_Latn.devtest:000000"
    assert all(d.text and d.text == d.text.strip() for d in eng + rus)


@needs_shared
def test_c4_and_code_jsonl():
    c4 = list(iter_documents({"kind": "jsonl", "paths": [str(C4)], "meta_fields": ["url"]}))
    assert len(c4) == 1000 and len({d.doc_id for d in c4}) == 1000
    assert c4[17].doc_id == "c4_en_sample_1000.jsonl:000017" and c4[17].meta["url"].startswith("http")
    code = SHARED_DATA / "code_sample" / "python_code_sample.jsonl"
    docs = list(iter_documents({"kind": "jsonl", "paths": [str(code)], "text_field": "content",
                                "meta_fields": ["repo", "path"], "max_chars": 20_000}, limit=20))
    assert len(docs) == 20 and all(d.meta["path"].endswith(".py") and len(d.text) <= 20_000 for d in docs)
