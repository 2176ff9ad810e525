"""The agent's ``send_range`` (``output``'s copy of a spool file to its
stdout): sendfile where it can, pread and write where it cannot (here: an
O_APPEND file, which sendfile refuses); the same bytes either way, and
fewer only where the file ends sooner."""

import os
import threading

import pytest

from support.helpers import load_agent

agent = load_agent()
DATA = bytes(range(256)) * 4096 + b"\x00tail, no newline"  # (1 MiB and some: more than one pass)


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "stdout"
    path.write_bytes(DATA)
    fd = os.open(str(path), os.O_RDONLY)
    yield fd
    os.close(fd)


def test_to_a_pipe(src):
    r, w = os.pipe()
    got = bytearray()

    def drain():
        while True:
            data = os.read(r, 1 << 16)
            if not data:
                return
            got.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        sent = agent.send_range(w, src, 100, len(DATA) - 100)
    finally:
        os.close(w)
        reader.join(10)
        os.close(r)
    assert sent == len(DATA) - 100 and bytes(got) == DATA[100:]


def test_where_sendfile_cannot_and_past_the_end(src, tmp_path):
    out = os.open(str(tmp_path / "out"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        sent = agent.send_range(out, src, 5, len(DATA))  # (asks for 5 bytes more than there are)
    finally:
        os.close(out)
    assert sent == len(DATA) - 5
    assert (tmp_path / "out").read_bytes() == DATA[5:]
