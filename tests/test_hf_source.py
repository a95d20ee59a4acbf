"""The ``kind: hf`` corpus source through the real ``datasets.load_dataset`` code path, on local dataset
directories laid out like hub dataset repositories: split files found by name, and a dataset card
(README.md) whose YAML declares named configs, as ``allenai/c4`` / ``en`` is read on a cluster.
Streaming on and off must give the same documents; a wrong split, config or field fails with a
ConfigError that lists what exists.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowray.corpora import iter_documents
from flowray.errors import ConfigError

CARD = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train-*.parquet
  - split: validation
    path: en/validation-*.parquet
- config_name: de
  data_files:
  - split: train
    path: de/train-*.parquet
---
# A tiny two-language corpus laid out like a hub dataset repository
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a local directory must never reach for the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture
def split_files_dataset(tmp_path):
    """data/train.jsonl + data/test.jsonl: splits inferred from the file names, no card."""
    root = tmp_path / "notes_ds"
    (root / "data").mkdir(parents=True)
    for split, n in (("train", 7), ("test", 3)):
        rows = [{"body": f"{split} note {i}: the cat sat on the mat.", "id": i} for i in range(n)]
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def carded_dataset(tmp_path):
    """README.md with configs en/de, Parquet shards named like the hub's (train-00000-of-00002.parquet)."""
    root = tmp_path / "tiny_c4"
    for config, split, shards in (("en", "train", 2), ("en", "validation", 1), ("de", "train", 1)):
        (root / config).mkdir(parents=True, exist_ok=True)
        for k in range(shards):
            texts = [f"{config} {split} shard {k} row {i}" for i in range(4)]
            table = pa.table({"text": texts, "url": [f"https://example.org/{config}/{k}/{i}" for i in range(4)]})
            pq.write_table(table, root / config / f"{split}-{k:05d}-of-{shards:05d}.parquet")
    (root / "README.md").write_text(CARD)
    return root


def _hf(path, cache, **keys) -> dict:
    return {"kind": "hf", "path": str(path), "cache_dir": str(cache), **keys}


@pytest.mark.parametrize("streaming", [True, False])
def test_a_dataset_directory_with_split_files(split_files_dataset, tmp_path, streaming):
    src = _hf(split_files_dataset, tmp_path / "cache", split="test", text_field="body", meta_fields=["id"],
              streaming=streaming)
    docs = list(iter_documents(src))
    assert [d.text for d in docs] == [f"test note {i}: the cat sat on the mat." for i in range(3)]
    assert [d.doc_id for d in docs] == ["notes_ds:000000", "notes_ds:000001", "notes_ds:000002"]
    assert docs[2].meta == {"row": 2, "id": 2}
    first = list(iter_documents({**src, "split": "train"}, limit=2))  # a job takes the first N only
    assert [d.text for d in first] == ["train note 0: the cat sat on the mat.", "train note 1: the cat sat on the mat."]


def test_streaming_and_download_give_the_same_documents(carded_dataset, tmp_path):
    keys = dict(name="en", split="train", meta_fields=["url"])
    streamed = list(iter_documents(_hf(carded_dataset, tmp_path / "c1", streaming=True, **keys)))
    loaded = list(iter_documents(_hf(carded_dataset, tmp_path / "c2", streaming=False, **keys)))
    assert streamed == loaded and len(streamed) == 8
    assert streamed[0].text == "en train shard 0 row 0" and streamed[-1].text == "en train shard 1 row 3"
    assert streamed[5].meta == {"row": 5, "url": "https://example.org/en/1/1"}
    de = list(iter_documents(_hf(carded_dataset, tmp_path / "c3", name="de")))
    assert [d.text for d in de][:1] == ["de train shard 0 row 0"]


@pytest.mark.parametrize("streaming", [True, False])
def test_a_wrong_split_names_the_splits_there_are(carded_dataset, split_files_dataset, tmp_path, streaming):
    with pytest.raises(ConfigError, match=r"split='test'.*validation") as info:
        iter_documents(_hf(carded_dataset, tmp_path / "c", name="en", split="test", streaming=streaming))
    assert "train" in str(info.value)
    with pytest.raises(ConfigError, match=r"split='validation'.*\['train', 'test'\]"):
        iter_documents(_hf(split_files_dataset, tmp_path / "c", split="validation", text_field="body",
                           streaming=streaming))


@pytest.mark.parametrize("streaming", [True, False])
def test_a_wrong_field_or_config_names_what_exists(carded_dataset, split_files_dataset, tmp_path, streaming):
    with pytest.raises(ConfigError, match=r"no field 'body'.*\['text', 'url'\]"):
        iter_documents(_hf(carded_dataset, tmp_path / "c", name="en", text_field="body", streaming=streaming))
    with pytest.raises(ConfigError, match=r"no field 'title'"):
        list(iter_documents(_hf(split_files_dataset, tmp_path / "c", text_field="body", meta_fields=["title"],
                                streaming=streaming)))
    with pytest.raises(ConfigError, match=r"name='fr'.*(en|de)"):
        iter_documents(_hf(carded_dataset, tmp_path / "c", name="fr", streaming=streaming))


def test_a_missing_dataset_is_a_config_error_offline(tmp_path):
    with pytest.raises(ConfigError, match="could not load path=.*no_such_ds"):
        iter_documents(_hf(tmp_path / "no_such_ds", tmp_path / "c"))
    with pytest.raises(ConfigError, match="offline"):
        iter_documents({"kind": "hf", "path": "someone/not-cached-anywhere", "cache_dir": str(tmp_path / "c")})
