"""OutputMirror: idempotent appends by offset, across processes too."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

from chaperone.push.mirror import OffsetGap, OutputMirror, plan_append


def test_plan_append_decisions():
    assert plan_append(0, 0, 5) == 0  # all new
    assert plan_append(5, 0, 5) == 5  # duplicate
    assert plan_append(5, 2, 3) == 3  # duplicate inside
    assert plan_append(5, 3, 6) == 2  # overlap: skip 2, write 4
    assert plan_append(5, 5, 0) == 0  # empty at the end
    with pytest.raises(OffsetGap) as e:
        plan_append(5, 6, 1)
    assert e.value.held == 5
    with pytest.raises(ValueError):
        plan_append(5, -1, 1)


def test_modes_and_empty(tmp_path):
    m = OutputMirror(tmp_path / "run")
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
    assert m.held("stdout") == 0 and m.held("stderr") == 0
    assert m.read("stdout", 0) == b""
    m.append("stdout", 0, b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "run" / "stdout").st_mode) == 0o600


def test_append_in_order_duplicate_overlap_gap(tmp_path):
    m = OutputMirror(tmp_path)
    assert m.append("stdout", 0, b"hello ") == 6
    assert m.append("stdout", 6, b"world") == 11
    assert m.append("stdout", 6, b"world") == 11  # retried chunk
    assert m.append("stdout", 0, b"hello") == 11  # old chunk
    assert m.append("stdout", 9, b"ld!!") == 13  # overlap: only "!!" is new
    with pytest.raises(OffsetGap) as e:
        m.append("stdout", 20, b"late")
    assert e.value.held == 13
    assert m.read("stdout", 0) == b"hello world!!"
    assert m.read("stdout", 6, 5) == b"world"
    assert m.held("stderr") == 0  # streams are independent
    assert m.append("stderr", 0, b"err") == 3
    assert m.read("stderr") == b"err"
    assert m.append("stderr", 3, b"") == 3



def test_append_pieces_without_joining_them(tmp_path):
    """A body stored as the pieces it arrived in (one writev): the same
    offset decisions across the pieces' boundaries, nothing written twice,
    a gap writes nothing, and more pieces than one writev takes."""
    m = OutputMirror(tmp_path)
    assert m.append("stdout", 0, [b"hel", bytearray(b"lo "), memoryview(b"wor")]) == 9
    assert m.append("stdout", 0, [b"hel", b"lo "]) == 9  # duplicate
    assert m.append("stdout", 4, [b"o", b" w", b"orld", b"!"]) == 12  # overlap: skips into the 3rd piece
    with pytest.raises(OffsetGap):
        m.append("stdout", 13, [b"x", b"y"])
    assert m.read("stdout") == b"hello world!"
    many = [bytes([i % 256]) * 3 for i in range(3000)]  # > IOV_MAX pieces
    assert m.append("stdout", 12, many) == 12 + 9000
    assert m.read("stdout", 12) == b"".join(many)
    assert m.append("stderr", 0, []) == 0

@pytest.mark.parametrize("stream", ["stdin", "../stdout", "", "STDOUT"])
def test_unknown_stream(tmp_path, stream):
    m = OutputMirror(tmp_path)
    with pytest.raises(ValueError):
        m.append(stream, 0, b"x")
    with pytest.raises(ValueError):
        m.held(stream)
    with pytest.raises(ValueError):
        m.read(stream, 0)


@pytest.mark.parametrize("offset", [-1, True, 1.0, "0"])
def test_bad_offset(tmp_path, offset):
    with pytest.raises(ValueError):
        OutputMirror(tmp_path).append("stdout", offset, b"x")
    assert OutputMirror(tmp_path).held("stdout") == 0


CHUNK = 997  # odd size so that chunk boundaries and overlaps vary
DATA = bytes((i * 7 + i // 251) % 256 for i in range(200 * CHUNK))


def _writer(directory, seed, barrier):
    import random

    rng = random.Random(seed)
    m = OutputMirror(directory)
    barrier.wait()
    offset = 0
    while offset < len(DATA):
        # Each process uses its own chunking, sometimes resending overlaps.
        size = rng.randint(1, 3 * CHUNK)
        start = max(0, offset - rng.choice([0, 0, 0, rng.randint(0, CHUNK)]))
        try:
            m.append("stdout", start, DATA[start:start + size])
        except OffsetGap as gap:
            offset = gap.held
            continue
        offset = m.held("stdout")
        # The other process may have written ahead: resend from what it holds.
        offset = min(offset, max(0, offset - rng.randint(0, 2) * CHUNK))


def test_two_processes_append_each_byte_once(tmp_path):
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_writer, args=(tmp_path, seed, barrier)) for seed in (1, 2)]
    for p in procs:
        p.start()
    barrier.wait()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    m = OutputMirror(tmp_path)
    assert m.held("stdout") == len(DATA)
    assert m.read("stdout") == DATA


def _same_chunks(directory, barrier):
    m = OutputMirror(directory)
    barrier.wait()
    for i in range(0, len(DATA), CHUNK):
        m.append("stderr", i, DATA[i:i + CHUNK])


def test_two_processes_same_chunks(tmp_path):
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_same_chunks, args=(tmp_path, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert OutputMirror(tmp_path).read("stderr") == DATA


def test_appending_opens_the_files_once_and_keeps_the_lock(tmp_path, monkeypatch):
    """Within ``appending()`` (an output body as it arrives), the event
    loop's appends share one pair of open files instead of opening two at
    every append; they still take the lock each time: while another open
    file holds it, a non-blocking append writes nothing, and a blocking one
    (a thread's) waits with files of its own; on leaving, the files close."""
    import fcntl
    import threading

    from chaperone.push import mirror as mirror_module

    m = OutputMirror(tmp_path / "run")
    opened = []
    real_open = os.open
    monkeypatch.setattr(mirror_module.os, "open", lambda path, *a: opened.append(path) or real_open(path, *a))
    fds_before = len(os.listdir("/proc/self/fd"))
    with m.appending("stdout"):
        for i in range(20):
            assert m.append("stdout", i, b"x", blocking=False) == i + 1
        assert len(opened) == 2  # (the lock file, the stream's file: once)
        other = real_open(str(tmp_path / "run" / ".lock"), os.O_RDWR)
        fcntl.flock(other, fcntl.LOCK_EX)  # another process's lock, as far as flock knows
        with pytest.raises(BlockingIOError):
            m.append("stdout", 20, b"y", blocking=False)
        waiting = threading.Thread(target=m.append, args=("stdout", 20, b"y"))
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive() and m.held("stdout") == 20  # (it waits for the lock)
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
        waiting.join(10)
        assert m.append("stdout", 20, b"y", blocking=False) == 21  # (a duplicate: stored once)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert m.read("stdout") == b"x" * 20 + b"y"
    m.append("stdout", 21, b"z")
    assert len(opened) == 6  # (the thread opened its own pair; outside appending(): a pair per append)
