import json
from pathlib import Path

import pytest

from pqflow.artifacts import MANIFEST, build_manifest, open_artifact, publish, read_manifest, staging_dir
from pqflow.errors import ArtifactError


def _make(uri: str, files: dict[str, bytes]) -> dict:
    work = staging_dir(uri)
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    manifest = build_manifest(work, stage="test", params={"a": 1}, inputs={}, fingerprint="fp")
    publish(work, uri, manifest)
    return manifest


def test_publish_and_verify(tmp_path: Path):
    uri = f"file://{tmp_path}/art"
    m = _make(uri, {"a.bin": b"hello", "sub/b.json": b"{}"})
    art = open_artifact(uri)
    assert art.digest == m["digest"] and (art.path / "sub" / "b.json").is_file()
    assert set(m["files"]) == {"a.bin", "sub/b.json"}
    assert "torch" in m["versions"] and m["bytes"] == 7
    assert not list(tmp_path.glob(".art.partial-*"))


def test_flipped_byte_names_the_file(tmp_path: Path):
    uri = str(tmp_path / "art")
    _make(uri, {"weights.safetensors": bytes(range(200))})
    p = tmp_path / "art" / "weights.safetensors"
    data = bytearray(p.read_bytes())
    data[100] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        open_artifact(uri)


def test_missing_or_broken_manifest_is_refused(tmp_path: Path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "x.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=MANIFEST):
        open_artifact(str(tmp_path / "half"))
    (tmp_path / "half" / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        open_artifact(str(tmp_path / "half"))


def test_missing_file_is_named(tmp_path: Path):
    uri = str(tmp_path / "art")
    _make(uri, {"a.bin": b"1", "b.bin": b"2"})
    (tmp_path / "art" / "b.bin").unlink()
    with pytest.raises(ArtifactError, match="b.bin"):
        open_artifact(uri)


def test_republish_replaces_whole_artifact(tmp_path: Path):
    uri = str(tmp_path / "art")
    _make(uri, {"old.bin": b"1"})
    _make(uri, {"new.bin": b"2"})
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == [MANIFEST, "new.bin"]
    assert read_manifest(uri)["files"].keys() == {"new.bin"}


def test_s3_round_trip_and_corruption(s3_env):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="arts")
    uri = "s3://arts/run/one"
    _make(uri, {"w.bin": b"abc" * 100})
    art = open_artifact(uri)
    assert (art.path / "w.bin").read_bytes() == b"abc" * 100
    manifest = json.loads(s3.get_object(Bucket="arts", Key="run/one/manifest.json")["Body"].read())
    assert manifest["files"]["w.bin"]["bytes"] == 300
    s3.put_object(Bucket="arts", Key="run/one/w.bin", Body=b"abd" * 100)
    import shutil

    shutil.rmtree(art.path)  # drop the verified local cache so the read goes to S3 again
    with pytest.raises(ArtifactError, match="w.bin"):
        open_artifact(uri)


def test_s3_unreachable_names_endpoint(monkeypatch):
    from pqflow.artifacts import check_reachable
    from pqflow.errors import PqflowError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(PqflowError, match="127.0.0.1:9"):
        check_reachable("s3://bucket/prefix")
