"""store/remote.py: weight files on S3 (moto's server as the endpoint) and hf:// through fsspec."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from llm_workbook import HuggingFaceToParquetConverter, StoreError, WeightLoaderV2
from llm_workbook.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed (pip install -e '.[cluster]')")
    pytest.importorskip("s3fs")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3(s3_endpoint, monkeypatch):
    """Standard AWS environment pointing at the moto server, a fresh bucket, and a byte counter on reads."""
    import fsspec

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fsspec.config.conf.clear()
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True)
    bucket = f"weights-{time.time_ns()}"
    fs.mkdir(bucket)
    return fs, bucket


def _count_reads(monkeypatch) -> list[int]:
    """Bytes returned by every read of a remote file object (what range requests fetched)."""
    from llm_workbook.store import remote

    counted: list[int] = []
    real = remote.open_read

    def counting(url):
        handle = real(url)
        read = handle.read

        def tracked(*args):
            data = read(*args)
            counted.append(len(data))
            return data

        handle.read = tracked
        return handle

    monkeypatch.setattr(remote, "open_read", counting)
    return counted


def test_convert_to_s3_then_load_inspect_export_from_s3(s3, qwen3_dir, tmp_path, monkeypatch, capsys):
    fs, bucket = s3
    url = f"s3://{bucket}/models/qwen3.parquet"
    assert main(["convert", str(qwen3_dir), url, "-q"]) == 0
    assert fs.exists(f"{bucket}/models/qwen3.parquet")
    assert not [k for k in fs.ls(f"{bucket}/models") if k.endswith(".tmp")]
    local = tmp_path / "local.parquet"
    HuggingFaceToParquetConverter(progress=False).convert(qwen3_dir, local)
    counted = _count_reads(monkeypatch)
    loader = WeightLoaderV2(url)
    opened = sum(counted)
    name = "model.layers.1.mlp.down_proj.weight"
    tensor = loader.load_tensor(name)
    one_tensor = sum(counted) - opened
    assert torch.equal(tensor, WeightLoaderV2(local).load_tensor(name))
    size = fs.size(f"{bucket}/models/qwen3.parquet")
    print(f"s3 one-tensor load: {one_tensor} bytes for a {tensor.numel() * tensor.element_size()}-byte tensor; "
          f"open (footer + index) {opened} bytes of a {size}-byte file")
    assert one_tensor == tensor.numel() * tensor.element_size() + 4  # its bytes and their length prefix, nothing else
    assert opened < size / 4
    assert main(["inspect", url, "--verify"]) == 0
    assert "all verify" in capsys.readouterr().out
    assert main(["export", url, str(tmp_path / "exported"), "-q"]) == 0
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_failed_upload_leaves_no_object_under_the_key(s3, qwen3_dir, monkeypatch):
    import pyarrow.parquet as pq

    fs, bucket = s3
    real = pq.ParquetWriter.write_table
    calls = [0]

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(5, "I/O error (injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing)
    with pytest.raises(StoreError):
        HuggingFaceToParquetConverter(progress=False).convert(qwen3_dir, f"s3://{bucket}/x.parquet")
    assert fs.ls(bucket, refresh=True) == []


def test_missing_bucket_bad_credentials_and_network_error_are_one_clear_error(s3, qwen3_dir, monkeypatch, capsys):
    fs, bucket = s3
    assert main(["convert", str(qwen3_dir), "s3://no-such-bucket-here/x.parquet", "-q"]) == 2
    assert "no such bucket" in capsys.readouterr().err
    assert main(["inspect", f"s3://{bucket}/absent.parquet"]) == 2
    assert "no such object" in capsys.readouterr().err
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    assert main(["inspect", f"s3://{bucket}/absent.parquet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "network error" in err[0]


def test_bad_credentials_are_one_clear_error(s3, qwen3_dir, tmp_path, capsys):
    # moto accepts any key unless IAM is enforced; a 403 from the endpoint is what real S3 answers.
    from llm_workbook.store import remote

    err = remote._explain("s3://b/k", PermissionError("Forbidden"))
    assert "access denied: check AWS_ACCESS_KEY_ID" in str(err)


def test_hf_urls_read_through_fsspec(qwen3_dir, tmp_path, monkeypatch):
    """hf:// goes through fsspec like s3://; the Hub is out of reach here, so a memory filesystem stands in for
    HfFileSystem under the hf protocol."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    local = tmp_path / "m.parquet"
    HuggingFaceToParquetConverter(progress=False).convert(qwen3_dir, local)

    class FakeHub(MemoryFileSystem):
        protocol = "hf"

        @classmethod
        def _strip_protocol(cls, path):
            return MemoryFileSystem._strip_protocol(str(path).removeprefix("hf://"))

    fsspec.register_implementation("hf", FakeHub, clobber=True)
    try:
        hub = FakeHub()
        hub.pipe("/owner/repo/m.parquet", local.read_bytes())
        loader = WeightLoaderV2("hf://owner/repo/m.parquet")
        name = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(loader.load_tensor(name), WeightLoaderV2(local).load_tensor(name))
        assert loader.file_bytes == local.stat().st_size
    finally:
        from huggingface_hub import HfFileSystem

        fsspec.register_implementation("hf", HfFileSystem, clobber=True)
