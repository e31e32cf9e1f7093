"""Shard download against a local HTTP server on 127.0.0.1 (never the network)."""
import json
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.data import download
from nanochat.data.download import ShardNotFound, download_shards

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory) -> Path:
    """The shared dev shards; a few generated shards where that folder is absent."""
    if (SHARED / "shard_00000.parquet").is_file():
        return SHARED
    d = tmp_path_factory.mktemp("shards")
    for i in range(7):
        pq.write_table(pa.table({"text": [f"doc {i} {k} " * 50 for k in range(2000)]}), d / f"shard_{i:05d}.parquet")
    return d


class Handler(SimpleHTTPRequestHandler):
    """Serves the dir; counts GETs; cuts the first `truncate[name]` transfers of a file off halfway."""

    def do_GET(self):
        name = self.path.lstrip("/")
        with self.server.lock:
            self.server.gets[name] += 1
            cut = self.server.gets[name] <= self.server.truncate.get(name, 0)
        if not cut:
            return super().do_GET()
        data = (Path(self.directory) / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(served_dir):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served_dir)))
    httpd.lock, httpd.gets, httpd.truncate = threading.Lock(), Counter(), {}
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def get(server, out_dir, n=2, **kw):
    return download_shards(n, base_url=server.url, out_dir=out_dir, workers=2, backoff=0.01, **kw)


def test_download_then_rerun_skips(server, served_dir, tmp_path):
    paths = get(server, tmp_path)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet"]
    for p in paths:
        assert p.read_bytes() == (served_dir / p.name).read_bytes()
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name for p in paths]  # no temporary files left
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert get(server, tmp_path) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert server.gets == Counter({"shard_00000.parquet": 1, "shard_00001.parquet": 1})


def test_broken_file_under_final_name_is_replaced(server, served_dir, tmp_path):
    (tmp_path / "shard_00000.parquet").write_bytes(b"half a file")
    (path,) = get(server, tmp_path, n=1)
    assert path.read_bytes() == (served_dir / "shard_00000.parquet").read_bytes()


def test_404_is_clear_and_not_retried(server, tmp_path):
    with pytest.raises(ShardNotFound, match=r"127\.0\.0\.1:\d+/shard_00007\.parquet does not exist \(HTTP 404\)"):
        get(server, tmp_path, n=8)
    assert server.gets["shard_00007.parquet"] == 1
    assert not (tmp_path / "shard_00007.parquet").exists()
    assert (tmp_path / "shard_00006.parquet").is_file()  # the shards that exist were still fetched
    assert not list(tmp_path.glob(".*.tmp"))


def test_cut_off_transfer_is_retried(server, served_dir, tmp_path):
    server.truncate["shard_00001.parquet"] = 1
    paths = get(server, tmp_path)
    assert server.gets["shard_00001.parquet"] == 2
    assert paths[1].read_bytes() == (served_dir / "shard_00001.parquet").read_bytes()
    pq.ParquetFile(paths[1])


def test_always_cut_off_fails_and_writes_nothing(server, tmp_path):
    server.truncate["shard_00000.parquet"] = 100
    with pytest.raises(RuntimeError, match=r"shard_00000\.parquet: failed 3 times.*got \d+ of \d+ bytes"):
        get(server, tmp_path, n=1, retries=2)
    assert server.gets["shard_00000.parquet"] == 3
    assert list(tmp_path.iterdir()) == []


def test_cli_and_env_url(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
    result = download.main(["-n", "1", "--out_dir", str(tmp_path), "--workers", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["num_shards"] == 1 and result["base_url"] == server.url
    assert (tmp_path / "shard_00000.parquet").is_file()
