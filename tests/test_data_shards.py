"""Shard listing, splits, document streams (parquet/txt/jsonl, ranks, positions) and bad input."""
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.data.packing import PackedLoader
from nanochat.data.shards import DocumentStream, list_shards, split_shards


class ByteTokenizer:
    def get_bos_token_id(self):
        return 256

    def get_vocab_size(self):
        return 257

    def token_piece(self, token):
        return bytes([token]) if token < 256 else b"<|bos|>"

    def encode(self, texts, prepend=None, num_threads=1):
        return [[prepend] + list(t.encode()) for t in texts]


def write_parquet(path, texts, row_group=4):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group)


def docs_of(paths, **kw):
    return [text for text in DocumentStream(paths, loop=False, **kw)]


def test_missing_dir_names_dir_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        list_shards(tmp_path / "nope")
    msg = str(err.value)
    assert "nope" in msg and "python -m nanochat.data.download -n 8" in msg and "--data_dir" in msg


def test_empty_dir(tmp_path):
    (tmp_path / "notes.md").write_text("not a shard")
    with pytest.raises(FileNotFoundError, match="holds no .*python -m nanochat.data.download"):
        list_shards(tmp_path)


def test_list_sorted_and_one_format(tmp_path):
    for name in ["shard_00002.parquet", "shard_00000.parquet", "shard_00001.parquet"]:
        write_parquet(tmp_path / name, ["x"])
    (tmp_path / "zzz.txt").write_text("ignored when parquet is present")
    (tmp_path / "shard_00003.parquet.tmp").write_text("a download in flight")
    names = [p.name for p in list_shards(tmp_path)]
    assert names == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    paths = list_shards(tmp_path)
    assert split_shards(paths, "val") == paths[-1:] and split_shards(paths, "train") == paths[:-1]
    with pytest.raises(ValueError, match="validation"):
        split_shards(paths[:1], "train")
    with pytest.raises(ValueError, match="'train' or 'val'"):
        split_shards(paths, "test")


def test_empty_shard_is_an_error(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["doc"])
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="b.parquet is an empty shard"):
        PackedLoader(ByteTokenizer(), tmp_path, "val", 1, 8, "cpu")


def test_only_empty_documents_is_an_error_not_a_hang(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["", "", None])
    with pytest.raises(ValueError, match="only empty documents"):
        DocumentStream([tmp_path / "a.parquet"]).read(1)


def test_not_parquet(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["doc"])
    (tmp_path / "b.parquet").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(ValueError, match="b.parquet is not a readable parquet file.*nanochat.data.download"):
        PackedLoader(ByteTokenizer(), tmp_path, "val", 1, 8, "cpu")


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"content": ["a"], "id": [1]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a.parquet has no `text` column \(its columns: \['content', 'id'\]\)"):
        docs_of([tmp_path / "a.parquet"])


def test_txt_documents_are_blank_line_separated(tmp_path):
    (tmp_path / "a.txt").write_text("First: one\nline two\n\n\n  \nSecond doc\n\nThird\n")
    assert docs_of([tmp_path / "a.txt"]) == ["First: one\nline two", "Second doc", "Third"]


def test_jsonl_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello", "id": 1}) + "\n\n" +
                                      json.dumps({"text": "wörld"}) + "\n")
    assert docs_of([tmp_path / "a.jsonl"]) == ["hello", "wörld"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl:2 has no string \"text\" field"):
        docs_of([tmp_path / "b.jsonl"])
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="c.jsonl:1 is not valid JSON"):
        docs_of([tmp_path / "c.jsonl"])


def test_txt_and_jsonl_dirs_feed_the_loader(tmp_path):
    for fmt in ("txt", "jsonl"):
        d = tmp_path / fmt
        d.mkdir()
        for i in range(2):
            docs = [f"doc {i}-{k} " * 3 for k in range(30)]
            body = "\n\n".join(docs) if fmt == "txt" else "\n".join(json.dumps({"text": t}) for t in docs)
            (d / f"part{i}.{fmt}").write_text(body)
        x, y = next(PackedLoader(ByteTokenizer(), d, "train", 2, 40, "cpu", buffer_size=4, prefetch=0))
        assert (x[:, 0] == 256).all()
        assert bytes(x[0, 1:7].tolist()) == b"doc 0-"


def test_ranks_see_disjoint_row_groups_covering_everything(tmp_path):
    texts = [f"doc{i}" for i in range(70)]
    write_parquet(tmp_path / "a.parquet", texts[:30], row_group=4)  # 8 row groups, the last one short
    write_parquet(tmp_path / "b.parquet", texts[30:], row_group=4)
    paths = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    for world in (2, 3):
        per_rank = [docs_of(paths, rank=r, world_size=world) for r in range(world)]
        assert sorted(sum(per_rank, [])) == sorted(texts)  # disjoint (no duplicates) and complete
        assert all(per_rank)
    # rank 0 of 2 gets global row groups 0, 2, 4, ... (groups are numbered across files)
    assert docs_of(paths, rank=0, world_size=2)[:6] == ["doc0", "doc1", "doc2", "doc3", "doc8", "doc9"]


def test_fewer_row_groups_than_ranks_splits_rows(tmp_path):
    write_parquet(tmp_path / "v.parquet", [f"d{i}" for i in range(10)], row_group=100)  # 1 row group
    per_rank = [docs_of([tmp_path / "v.parquet"], rank=r, world_size=4) for r in range(4)]
    assert per_rank[1] == ["d1", "d5", "d9"]
    assert sorted(sum(per_rank, [])) == sorted(f"d{i}" for i in range(10))


def test_stream_position_resumes_and_loops(tmp_path):
    write_parquet(tmp_path / "a.parquet", [f"a{i}" for i in range(10)], row_group=3)
    write_parquet(tmp_path / "b.parquet", [f"b{i}" for i in range(5)], row_group=3)
    paths = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    stream = DocumentStream(paths)
    first = [t for _, t in stream.read(7)]
    position = json.loads(json.dumps(stream.position))
    rest = [t for _, t in stream.read(20)]
    again = [t for _, t in DocumentStream(paths, position=position).read(20)]
    assert first == [f"a{i}" for i in range(7)] and again == rest
    assert rest[:8] == ["a7", "a8", "a9", "b0", "b1", "b2", "b3", "b4"] and rest[8:11] == ["a0", "a1", "a2"]
    assert stream.position["epoch"] == 1


# ---- bad shards are refused by name, with the fix, before training (issue 27) --------------------------------

@pytest.mark.parametrize("column", [pa.array([1, 2]), pa.array([b"a", b"b"]), pa.array([["a"], ["b"]])],
                         ids=["ints", "binary", "lists"])
def test_text_column_of_other_types_is_refused(tmp_path, column):
    write_parquet(tmp_path / "a.parquet", ["doc"])
    pq.write_table(pa.table({"text": column}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"b.parquet: its `text` column holds .* values.*write the column as strings"):
        PackedLoader(ByteTokenizer(), tmp_path, "val", 1, 8, "cpu")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_text_shard_is_refused_by_name(tmp_path, suffix):
    (tmp_path / f"a{suffix}").write_bytes("caf\xe9 au lait\n".encode("latin-1") if suffix == ".txt"
                                          else b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"a\{suffix} is not UTF-8 text \(byte \d+.*iconv"):
        DocumentStream([tmp_path / f"a{suffix}"])


def test_damaged_row_group_is_refused_when_the_stream_is_built(tmp_path):
    """A byte range overwritten inside row group 2 used to fail only when training reached it."""
    path = tmp_path / "a.parquet"
    rng = random.Random(0)
    texts = [" ".join("".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(80)) for _ in range(40)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=8, compression="zstd", use_dictionary=False)
    chunk = pq.ParquetFile(path).metadata.row_group(2).column(0)
    data = bytearray(path.read_bytes())
    start = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[start:start + 64] = bytes(range(64))
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"a.parquet: row group 2 of 5 does not decode .*download it again"):
        DocumentStream([path])
    # rank 1 of 2 reads row groups 1 and 3 only: it is not held up by rank 0's damaged one
    assert len(DocumentStream([path], rank=1, world_size=2, loop=False).read(100)) == 16
