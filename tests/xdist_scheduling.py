"""The suite's ``--dist loadgroup`` scheduler, with pytest-xdist 3.8's recovery from a crashed worker fixed.

``launch/local.sh test`` runs ``pytest -n 2 --dist loadgroup`` so that the tests sharing an expensive
session fixture (one ``xdist_group``) run on one worker. When a worker dies (a fatal signal in native
code), xdist 3.8 reports the test it was running as failed and starts a replacement worker, but its
group scheduler (``LoadScopeScheduling``) then leaves the run waiting forever (pytest-xdist issues
1323, 1327 and 1378; fixed upstream after 3.8, in no release yet):

- it puts the dead worker's whole workload back on the queue, finished groups included; a finished
  group is sent as an empty batch that never reports back, so it eats a reschedule;
- the crashed test goes back too, and runs (and crashes) again in the replacement worker;
- a worker that was sent a single test waits for a second one (it needs the next item to run the
  first), which the scheduler sends only when a test completes.

A stop 11 CI run did exactly that: a worker crashed in XLA's compiler and the run sat idle until CI's
90-minute limit, so nobody saw which tests passed. Here only the dead worker's unfinished tests, the
crashed one excepted, go back on the queue, and a worker is never left holding a single test with
more to come: it gets a second batch, or is told that no more will come. The crashed test is still
reported as failed (a crash is a failure), and the run ends with its summary.
"""

from __future__ import annotations

from xdist.scheduler.loadgroup import LoadGroupScheduling


class CrashSafeLoadGroupScheduling(LoadGroupScheduling):
    """``LoadGroupScheduling`` whose crash recovery neither hangs nor re-runs the crashed test."""

    def remove_node(self, node):
        workload = self.assigned_work.pop(node)
        pending = {scope: [nodeid for nodeid, done in unit.items() if not done]
                   for scope, unit in workload.items()}
        pending = {scope: nodeids for scope, nodeids in pending.items() if nodeids}
        if not pending:
            return None  # a clean shutdown, or a crash after its last test
        # The worker runs a batch in order, so its crashed test is the first unfinished one.
        crashitem = next(iter(pending.values()))[0]
        requeued = {}
        for scope, nodeids in pending.items():
            rest = [nodeid for nodeid in nodeids if nodeid != crashitem]
            if rest:
                requeued[scope] = dict.fromkeys(rest, False)
        # Unfinished groups first: their shared fixtures are rebuilt once, by the replacement worker.
        for scope, unit in reversed(list(requeued.items())):
            self.workqueue[scope] = unit
            self.workqueue.move_to_end(scope, last=False)
        for other in self.assigned_work:
            self._reschedule(other)
        return crashitem

    def _reschedule(self, node):
        if node.shutting_down:
            return
        if not self.workqueue:
            node.shutdown()
            return
        # 2: xdist's heuristic for when a worker needs more work; a worker must hold 2 tests (or be
        # told that none will follow) to start its next one
        if self._pending_of(self.assigned_work[node]) > 2:
            return
        self._assign_work_unit(node)
        while self.workqueue and self._pending_of(self.assigned_work[node]) < 2:
            self._assign_work_unit(node)
        if not self.workqueue:
            node.shutdown()


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadgroup":
        return CrashSafeLoadGroupScheduling(config, log)
    return None
