"""A running program's input from another process (the library's side of
``chaperone attach``): ``input_status`` says what the host holds, or None
when the input is not a stream (the agent's exit status 5, not its
message's wording); ``send_input`` appends after what is there."""

import asyncio

import pytest

from chaperone.api import Chaperone
from chaperone.client import AGENT_NOT_A_STREAM
from chaperone.errors import AgentFailed


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_input_status_and_send_input_from_another_process(tmp_path):
    home = tmp_path / "home"

    async def go():
        first = Chaperone(home)
        never = asyncio.StreamReader()  # (a stream nobody writes to: the input stays open)
        r = await first.start("local", ["cat"], stdin=never)
        quiet = await first.start("local", ["cat"])
        await first.close()  # (its sender goes: the stream is neither ended nor fed)

        other = Chaperone(home)
        try:
            ack = await other.input_status(r.id)
            assert (ack.held, ack.end, ack.closed, ack.tty) == (0, False, False, False)
            assert await other.input_status(quiet.id) is None
            held = await other.send_input(r.id, b"typed\x00\xff\n")
            assert held == 8
            st = await other.wait(r.id, timeout=30)
            assert st.state == "done" and st.return_code == 0
            assert await other.read(r.id) == b"typed\x00\xff\n"
            ack = await other.input_status(r.id)
            assert (ack.held, ack.end, ack.closed) == (8, True, True)
            with pytest.raises(AgentFailed) as e:
                await other.send_input(quiet.id, b"x")
            assert e.value.agent_code == AGENT_NOT_A_STREAM
            assert "does not read its stdin from a stream" in str(e.value)
        finally:
            await other.close()

    run(go())
