"""Atomic outputs: a writer interrupted at any step leaves either every new file or none."""

import os
import signal

import pytest

from quantkit import _io
from quantkit.errors import QuantkitError


def setup_old(tmp_path):
    files = {tmp_path / f"f{i}": b"old" for i in range(4)}
    for path, data in files.items():
        path.write_bytes(data)
    return {p: b"new" + bytes([i]) for i, p in enumerate(files)}


@pytest.fixture
def interruptible():
    """Python's own SIGINT handler for the test: a job started in the background (``cmd &`` in a
    script) inherits SIGINT ignored, and an ignored Ctrl-C rightly raises nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("after", [1, 2, 3])
def test_sigint_between_renames_waits_for_all_of_them(tmp_path, monkeypatch, after, interruptible):
    new = setup_old(tmp_path)
    real_replace, done = os.replace, []

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        done.append(dst)
        if len(done) == after:
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C in the middle of the renames

    monkeypatch.setattr(_io.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _io.write_files_atomic(new)
    assert {p: p.read_bytes() for p in new} == new  # every file is new: the interrupt waited
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in new)  # no temporary left


@pytest.mark.parametrize("fail_at", [0, 1, 3])
def test_failure_while_staging_leaves_every_old_file(tmp_path, monkeypatch, fail_at):
    new = setup_old(tmp_path)
    real_fdopen, calls = os.fdopen, []

    def fdopen(fd, *args, **kwargs):
        calls.append(fd)
        if len(calls) == fail_at + 1:
            raise KeyboardInterrupt
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(_io.os, "fdopen", fdopen)
    with pytest.raises(KeyboardInterrupt):
        _io.write_files_atomic(new)
    assert all(p.read_bytes() == b"old" for p in new)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in new)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_rename_that_fails_puts_every_old_file_back(tmp_path, monkeypatch, fail_at):
    """One of the final renames fails (a full disk, a file made read-only meanwhile): the ones
    before it are undone, so the set is all old, not half new."""
    new = setup_old(tmp_path)
    (tmp_path / "f3").unlink()  # one destination is new: undoing its rename removes it
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at + 1:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(_io.os, "replace", replace)
    with pytest.raises(OSError):
        _io.write_files_atomic(new)
    assert {p.name: p.read_bytes() for p in sorted(tmp_path.iterdir())} == {"f0": b"old", "f1": b"old", "f2": b"old"}


def test_output_checks(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    (tmp_path / "link.onnx").symlink_to(model)
    for bad in (model, tmp_path / "link.onnx", tmp_path, tmp_path / "missing" / "o.onnx"):
        with pytest.raises(QuantkitError):
            _io.check_output_file(bad, model)
    assert _io.check_output_file(tmp_path / "o.onnx", model) == tmp_path / "o.onnx"


def test_an_output_may_not_be_a_file_an_input_reads(tmp_path):
    """A model's external-data file and a data file inside a data folder are inputs too."""
    import numpy as np
    import onnx
    from conftest import conv_model
    from onnx import numpy_helper

    proto = conv_model()
    for i, t in enumerate(proto.graph.initializer):  # raw data, so that it can live outside the model file
        proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    (tmp_path / "ext").mkdir()
    model = tmp_path / "ext" / "model.onnx"
    onnx.save(proto, str(model), save_as_external_data=True, location="weights.bin", size_threshold=0)
    with pytest.raises(QuantkitError, match="external data of"):
        _io.check_output_file(tmp_path / "ext" / "weights.bin", model)
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "x.npy", np.zeros(3))
    with pytest.raises(QuantkitError, match="which this command reads"):
        _io.check_output_file(data / "x.npy", data)
    assert _io.check_output_file(data / "run.log", data) == data / "run.log"  # not a file the data is read from
    assert _io.check_output_file(tmp_path / "ext" / "other.onnx", model) == tmp_path / "ext" / "other.onnx"


def test_written_files_get_ordinary_permissions(tmp_path):
    path = _io.write_bytes_atomic(tmp_path / "a", b"1")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
