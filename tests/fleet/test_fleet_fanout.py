"""The generic fan-out (chaperone.fleet.fanout), with fake tasks: limits,
results as they complete, failures and timeouts per host, back-pressure,
the two-step interrupt, and no task left behind."""

import asyncio

import pytest

from chaperone.fleet.fanout import (CANCELLED, FAILED, OK, TIMEOUT, Fanout, HostFailure, default_forks, fanout,
                                    host_key)
from chaperone.fleet.inventory import HostEntry


class Tracker:
    """Counts concurrent tasks, overall and per host."""

    def __init__(self):
        self.now = 0
        self.peak = 0
        self.per = {}
        self.peak_per = {}
        self.started = []

    async def run(self, job, seconds=0.01):
        host = host_key(job)
        self.started.append(job)
        self.now += 1
        self.per[host] = self.per.get(host, 0) + 1
        self.peak = max(self.peak, self.now)
        self.peak_per[host] = max(self.peak_per.get(host, 0), self.per[host])
        try:
            await asyncio.sleep(seconds)
            return job
        finally:
            self.now -= 1
            self.per[host] -= 1


async def collect(it):
    return [r async for r in it]


def test_forks_and_per_host_limits():
    tr = Tracker()
    jobs = [("h%d" % (i % 3), i) for i in range(30)]        # 3 hosts, 10 jobs each
    results = asyncio.run(collect(fanout(jobs, tr.run, forks=8, per_host=2)))
    assert sorted(r.value for r in results) == sorted(jobs)
    assert all(r.ok for r in results)
    assert tr.peak == 6                                     # 3 hosts x 2, under forks=8
    assert max(tr.peak_per.values()) == 2
    tr = Tracker()
    asyncio.run(collect(fanout([("h%d" % i, 0) for i in range(40)], tr.run, forks=5)))
    assert tr.peak == 5


def test_a_busy_host_does_not_block_the_others():
    tr = Tracker()
    jobs = [("slow", i) for i in range(4)] + [("h%d" % i, 0) for i in range(4)]

    async def task(job):
        return await tr.run(job, 1.0 if job[0] == "slow" else 0.01)  # (0.2 s was not enough on a loaded CI machine)

    results = asyncio.run(collect(fanout(jobs, task, forks=4, per_host=1)))
    # the three other 'slow' jobs wait; the four other hosts run meanwhile
    assert [r.job[0] for r in results[:4]] == ["h0", "h1", "h2", "h3"]
    assert tr.started[:5] == [("slow", 0), ("h0", 0), ("h1", 0), ("h2", 0), ("h3", 0)]


def test_results_come_as_they_complete():
    async def task(n):
        await asyncio.sleep(n / 10)  # (100 ms apart: 10 ms were not, on a loaded CI machine)
        return n

    results = asyncio.run(collect(fanout([5, 1, 3, 0, 2], task, forks=10)))
    assert [r.value for r in results] == [0, 1, 2, 3, 5]
    assert all(r.duration is not None and r.duration >= 0 for r in results)


def test_failures_and_timeouts_fail_only_their_host():
    async def task(job):
        if job == "boom":
            raise ValueError("bad value\nsecond line")
        if job == "refused":
            raise HostFailure("ssh: connect to host refused port 22: Connection refused", exit_status=255)
        if job == "oserror":
            raise ConnectionResetError(104, "Connection reset by peer")
        if job == "hang":
            await asyncio.sleep(30)
        await asyncio.sleep(0.01)
        return job.upper()

    jobs = ["a", "boom", "refused", "oserror", "hang", "b"]
    results = {r.job: r for r in asyncio.run(collect(fanout(jobs, task, timeout=0.3)))}
    assert results["a"].value == "A" and results["b"].state == OK
    assert (results["boom"].state, results["boom"].reason) == (FAILED, "ValueError: bad value")
    assert results["refused"].reason == "ssh: connect to host refused port 22: Connection refused"
    assert results["oserror"].reason == "ConnectionResetError: [Errno 104] Connection reset by peer"
    assert (results["hang"].state, results["hang"].reason) == (TIMEOUT, "timed out after 0.3 s")
    assert 0.25 < results["hang"].duration < 5


def test_back_pressure_a_slow_consumer_stops_new_starts():
    tr = Tracker()

    async def main():
        fan = Fanout(range(100), lambda j: tr.run(j, 0), forks=4, buffer=3)
        it = fan.__aiter__()
        first = await it.__anext__()
        await asyncio.sleep(0.2)          # the consumer is busy: tasks finish, the buffer fills
        started_while_busy = len(tr.started)
        rest = [r async for r in it]
        return first, started_while_busy, rest

    first, started, rest = asyncio.run(main())
    # at most forks running + buffer waiting + the one handed over, not all 100
    assert started <= 4 + 3 + 1 + 4, started
    assert len(rest) == 99 and sorted([first.job] + [r.job for r in rest]) == list(range(100))


def test_interrupt_forwards_then_cancels():
    forwarded = []

    async def main():
        fan = Fanout(["a", "b", "c", "d", "e"], None, forks=3, on_interrupt=forwarded.append)

        async def task(job):
            await asyncio.sleep(30)

        fan.task = task
        results = []
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, fan.interrupt)
        loop.call_later(0.2, lambda: results.append(("seen", sorted(forwarded))))
        loop.call_later(0.3, fan.interrupt)
        async for r in fan:
            results.append(r)
        return results

    results = asyncio.run(asyncio.wait_for(main(), 10))
    assert results[0] == ("seen", ["a", "b", "c"])          # the first Ctrl-C: forwarded to the running ones
    by_job = {r.job: r for r in results[1:]}
    assert set(by_job) == set("abcde")                      # every job has one result
    assert all(by_job[j].state == CANCELLED for j in "abcde")
    assert by_job["a"].reason == "cancelled: interrupted twice"
    assert by_job["e"].reason == "not started: interrupted" and by_job["e"].started is None


def test_a_first_interrupt_lets_running_tasks_finish():
    async def main():
        fan = Fanout(range(6), None, forks=2, on_interrupt=lambda j: None)

        async def task(job):
            await asyncio.sleep(0.15)
            return job

        fan.task = task
        asyncio.get_running_loop().call_later(0.05, fan.interrupt)
        return [r async for r in fan]

    results = asyncio.run(main())
    assert [(r.job, r.state) for r in results if r.ok] == [(0, OK), (1, OK)]
    assert [r.job for r in results if not r.ok] == [2, 3, 4, 5]


def test_breaking_out_leaves_no_task_running():
    cancelled = []

    async def task(job):
        try:
            await asyncio.sleep(0 if job == 0 else 30)
        except asyncio.CancelledError:
            cancelled.append(job)
            raise
        return job

    async def main():
        async with Fanout(range(5), task, forks=5) as fan:
            async for r in fan:
                break
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    left = asyncio.run(main())
    assert left == [] and sorted(cancelled) == [1, 2, 3, 4]


def test_host_key_and_defaults():
    e = HostEntry.plain("a", user="u", port=22)
    assert host_key(e) == ("a", 22) == host_key(HostEntry.plain("a", user="v", port=22))
    assert host_key(("h1", "job")) == "h1"
    assert default_forks(cpus=2, nofile=1024) == 32
    assert default_forks(cpus=8, nofile=1 << 20) == 64
    assert default_forks(cpus=8, nofile=256) == 28
    with pytest.raises(ValueError):
        Fanout([], lambda j: None, forks=0)
