"""Pure library pieces: messages, artifacts (atomic writes, provenance), config, logging."""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from diffractflow.artifacts import (
    Volume,
    atomic_write_path,
    load_valid_manifest,
    read_provenance,
    sha256_file,
    write_manifest,
    write_provenance,
)
from diffractflow.config import Settings
from diffractflow.logs import JsonFormatter, job_id_var
from diffractflow.messages import MAX_MESSAGE_BYTES, DataEvent, JobRequest, JobResult, MessageError


def test_message_round_trip_and_versioning():
    job = JobRequest(job_id="j1", run_id="r1", service="scaler", inputs={"obs": {"path": "a/b.h5", "sha256": "0" * 64}},
                     params={"n": 3})
    again = JobRequest.from_bytes(job.to_bytes())
    assert again == job
    doc = json.loads(job.to_bytes())
    doc["schema_version"] = 2
    with pytest.raises(MessageError, match="unknown message schema version 2"):
        JobRequest.from_bytes(json.dumps(doc).encode())
    doc["schema_version"] = 1
    doc["surprise"] = True
    with pytest.raises(MessageError, match="surprise"):
        JobRequest.from_bytes(json.dumps(doc).encode())
    with pytest.raises(MessageError, match="exceeds"):
        JobRequest.from_bytes(b"{" + b" " * MAX_MESSAGE_BYTES + b"}")
    big = JobRequest(job_id="j2", service="x", params={"blob": "x" * MAX_MESSAGE_BYTES})
    with pytest.raises(MessageError, match="over the"):
        big.to_bytes()
    with pytest.raises(MessageError, match="job_id"):
        JobRequest.from_bytes(json.dumps({"job_id": "../../etc", "service": "x"}).encode())


@hsettings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_message_parsing_never_crashes(data):
    for cls in (JobRequest, JobResult, DataEvent):
        try:
            cls.from_bytes(data)
        except MessageError:
            pass


def test_atomic_write_never_shows_half_a_file(tmp_path):
    target = tmp_path / "big.bin"
    payload = np.random.default_rng(0).bytes(8 << 20)
    digest = hashlib.sha256(payload).hexdigest()
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            if target.exists():
                seen.append(hashlib.sha256(target.read_bytes()).hexdigest())

    t = threading.Thread(target=reader)
    t.start()
    with atomic_write_path(target) as tmp:
        with open(tmp, "wb") as f:
            for i in range(0, len(payload), 1 << 16):
                f.write(payload[i:i + (1 << 16)])
                f.flush()
    stop.set()
    t.join()
    assert set(seen) <= {digest}
    assert sha256_file(target) == digest
    assert target.stat().st_mode & 0o777 == 0o640

    # a failed write leaves neither the target nor a temporary file behind
    with pytest.raises(RuntimeError):
        with atomic_write_path(tmp_path / "never.h5") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


def test_content_hash_memo_sees_every_change(tmp_path, monkeypatch):
    """sha256_file memoises settled files by identity and change times: a repeated hash does not read the file
    again, and any later change, even of the same size straight after hashing, gives the new content's hash."""
    from diffractflow import artifacts

    reads = []
    real_sha = hashlib.sha256

    def counting_sha():
        reads.append(1)
        return real_sha()

    monkeypatch.setattr(artifacts.hashlib, "sha256", counting_sha)
    f = tmp_path / "frame.bin"
    f.write_bytes(b"a" * 4096)
    # just written: hashed, but not remembered (it may still change within the timestamp granularity)
    assert sha256_file(f) == real_sha(b"a" * 4096).hexdigest()
    f.write_bytes(b"b" * 4096)  # same size, same instant
    assert sha256_file(f) == real_sha(b"b" * 4096).hexdigest()
    assert len(reads) == 2
    # settled: the second hash comes from the memo
    monkeypatch.setattr(artifacts, "HASH_MEMO_SETTLE_NS", 0)
    sha256_file(f)
    assert sha256_file(f) == real_sha(b"b" * 4096).hexdigest()
    assert len(reads) == 3
    # a same-size rewrite right after the memoised hash is seen (a later ctime), and so is a flipped byte
    monkeypatch.setattr(artifacts, "HASH_MEMO_SETTLE_NS", 50_000_000)
    time.sleep(0.06)
    with open(f, "r+b") as fh:
        fh.write(b"c")
    assert sha256_file(f) == real_sha(b"c" + b"b" * 4095).hexdigest()
    # a file replaced by another (atomic rename: a new inode) is hashed again
    with atomic_write_path(f) as tmp:
        tmp.write_bytes(b"d" * 4096)
    assert sha256_file(f) == real_sha(b"d" * 4096).hexdigest()


def test_provenance_and_manifest(tmp_path):
    vol = Volume(tmp_path)
    out = vol.job_dir("scaler", "j1") / "x.h5"
    with atomic_write_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            write_provenance(f, schema="test", schema_version=2, producer="scaler", producer_version="0.1",
                             job_id="j1", parameters={"a": 1}, inputs={"obs": "ab" * 32})
            f["data"] = np.arange(3)
    with h5py.File(out) as f:
        prov = read_provenance(f)
    assert prov["schema"] == "test" and prov["schema_version"] == 2 and prov["parameters"] == {"a": 1}
    ref = vol.ref(out)
    write_manifest(out.parent, {"x": ref}, {"m": 1})
    assert load_valid_manifest(vol, out.parent)["outputs"]["x"] == ref
    out.write_bytes(b"tampered")
    assert load_valid_manifest(vol, out.parent) is None  # hash mismatch: the job must run again


def test_settings_from_env_yaml_and_secret_file(tmp_path, monkeypatch):
    cfg = tmp_path / "df.yaml"
    cfg.write_text("nats_url: nats://example:4222\nmax_deliver: 7\nconcurrency: 2\n")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    monkeypatch.setenv("DIFFRACTFLOW_CONFIG", str(cfg))
    monkeypatch.setenv("DIFFRACTFLOW_CONCURRENCY", "3")  # environment beats the file
    monkeypatch.setenv("DIFFRACTFLOW_NATS_USER", "svc-scaler")
    monkeypatch.setenv("DIFFRACTFLOW_NATS_PASSWORD_FILE", str(pw))
    s = Settings()
    assert (s.nats_url, s.max_deliver, s.concurrency) == ("nats://example:4222", 7, 3)
    assert s.nats_options()["password"] == "s3cret"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())


def test_json_logs_carry_job_ids():
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    rec.deliveries = 2
    token = job_id_var.set("job-9")
    try:
        line = json.loads(JsonFormatter("scaler").format(rec))
    finally:
        job_id_var.reset(token)
    assert line["msg"] == "hello world" and line["job_id"] == "job-9" and line["service"] == "scaler"
    assert line["deliveries"] == 2
