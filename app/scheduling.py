"""Sharing the CPU between batchers: at most `slots` passes compute at once, the least-served first.

Every batcher runs its passes in threads of its own (app/batching.py), so without this the
operating system shares the cores between every busy model thread, and Python's GIL between
every thread that runs Python: eight models busy with 256-image draws slowed a one-image draw of
a cheap model from 2 ms to 73 ms. `ComputeScheduler` instead lets `slots` passes compute at a
time (by default one per core's worth of torch threads) and gives the next turn by **fair share
of compute time**, per batcher (start-time fair queuing, as operating systems share a CPU):

- each batcher (a *group*) has a virtual time, the seconds of compute its passes have had;
- a pass that wants to compute waits until a slot is free and no waiting group has a lower
  virtual time; a group that was idle comes back at the system's virtual time (the lowest of the
  competing groups', which never goes back), less `idle_bonus_s`: it goes first once, saves no
  credit while idle, and carries no debt from the time it ran alone;
- a multi-step pass (a prior's draws, an autoregressive decoder's pixels) offers its slot at
  every step (`checkpoint`, called from app/batching.py's `check_wanted`): when a waiting group
  has had at least `switch_s` less compute, the pass waits and that group's pass runs.

So a cheap model's pass waits at most for the next step of a running pass (milliseconds), not for
whole passes of heavy requests, and busy models share the cores equally, whatever their pass
sizes. A pass expected to take under `short_s` (1 ms; the batcher tells it the moving average of
its passes of that size) does not wait for a turn at all: it cannot hold anyone up. A pass with no steps (one forward) keeps its slot to the end. Waiting costs no CPU; a pass
whose requests have all gone away stops waiting (PassAbandoned).

**A lone pass may use every core.** A pass that gets its turn while no other pass computes or
waits, and that asks for it (`lone`), takes every slot: `computing` yields True, and its batcher
runs it in the one thread of the process that computes with every core's torch threads
(app/batching.py), charged for every slot it holds. Only a pass with no steps asks (so it never has
to give cores back halfway), and only one expected to be short, since a newcomer waits for it to
end. Passes that need no turn (short ones, express ones) may still run beside it, as beside any pass.

Outside a batcher's pass (warm-up, tests calling models directly) nothing is scheduled, except
the pass size checks, which the service runs as a group of their own (`Batcher.check_buckets`'s
`group`). With `slots=None` the scheduler does nothing at all (the default on CUDA, where
kernels run asynchronously and host time is not GPU time).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class PassAbandoned(Exception):
    """Raised inside a pass when none of its requests is still waiting for it (app/batching.py's
    `check_wanted`), also while it waits here for a slot."""


@dataclass(eq=False)
class _Ticket:
    group: str
    seq: int
    since: float = 0.0  # time.perf_counter() when it last got a slot (its compute is charged from here)
    slots: int = 1  # the slots it holds: all of them while it computes alone with every core


_local = threading.local()  # .ticket: the pass this thread computes, and its scheduler


@dataclass
class ComputeScheduler:
    slots: int | None  # passes computing at once; None: no scheduling
    switch_s: float = 0.002  # a running pass yields to a group with at least this much less compute
    idle_bonus_s: float = 0.005  # an idle group comes back this far below the least-served competitor
    poll_s: float = 0.05  # how often a waiting pass asks whether it is still wanted
    short_s: float = 0.001  # a pass expected to take at most this long needs no turn
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)
    _running: set[_Ticket] = field(default_factory=set, init=False, repr=False)
    _waiting: list[_Ticket] = field(default_factory=list, init=False, repr=False)
    _vtime: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _seq: Iterator[int] = field(default_factory=itertools.count, init=False, repr=False)
    _system: float = field(default=0.0, init=False, repr=False)  # the system virtual time (_advance)

    def __post_init__(self) -> None:
        if self.slots is not None and self.slots < 1:
            raise ValueError(f"slots must be at least 1 (or None for no scheduling), got {self.slots}")

    @contextmanager
    def computing(
        self, group: str, wanted: Callable[[], bool] | None = None, expected_s: float | None = None, lone: bool = False
    ) -> Iterator[bool]:
        """Around one pass, in the thread that computes it: wait for a turn, compute, give the slot back.

        A pass expected to take at most `short_s` (from the passes of its size so far) runs at once,
        beside the slots: waiting for a turn would cost it more than it can delay anyone. With `lone`,
        a pass that finds nothing else computing or waiting takes every slot, and the context yields
        True (else False): it may compute with every slot's threads."""
        if self.slots is None or (expected_s is not None and expected_s <= self.short_s):
            yield False
            return
        ticket = _Ticket(group, next(self._seq))
        with self._cond:
            self._place(group)
            self._wait_turn(ticket, wanted)
            alone = lone and self.slots > 1 and not self._waiting and self._running == {ticket}
            if alone:
                ticket.slots = self.slots
        _local.ticket = (self, ticket)
        try:
            yield alone
        finally:
            _local.ticket = None
            with self._cond:
                self._charge(ticket)
                self._running.discard(ticket)  # absent when a checkpoint's wait was abandoned
                self._cond.notify_all()

    def checkpoint(self, wanted: Callable[[], bool] | None = None) -> None:
        """Between two steps of the pass this thread computes: yield the slot to a less-served group."""
        with self._cond:
            current = getattr(_local, "ticket", None)
            if current is None or current[0] is not self:
                return
            ticket = current[1]
            self._charge(ticket)
            mine = self._vtime[ticket.group]
            if not any(self._vtime[t.group] < mine - self.switch_s for t in self._waiting):
                return
            self._running.discard(ticket)
            self._cond.notify_all()
            self._wait_turn(ticket, wanted)

    def virtual_times(self) -> dict[str, float]:
        """Group -> seconds of compute its passes have had (since it was last placed)."""
        with self._cond:
            return dict(self._vtime)

    # -- under self._cond ----------------------------------------------------------------------

    def _place(self, group: str) -> None:
        """A group with no pass running or waiting comes back at the system's virtual time (the lowest
        of the active groups', which only grows), less idle_bonus_s: whatever it had before, so it
        neither saves credit while idle nor carries a debt from the time it ran alone."""
        active = {t.group for t in (*self._running, *self._waiting)}
        if group in active:
            return
        self._advance(active)
        self._vtime[group] = self._system - self.idle_bonus_s

    def _advance(self, active: set[str] | None = None) -> None:
        """The system virtual time: the lowest virtual time of the active groups, never going back."""
        active = {t.group for t in (*self._running, *self._waiting)} if active is None else active
        if active:
            self._system = max(self._system, min(self._vtime[g] for g in active))

    def _charge(self, ticket: _Ticket) -> None:
        """Add the compute since the ticket's last charge to its group (only while it holds a slot)."""
        if ticket not in self._running:
            return
        now = time.perf_counter()  # a lone pass is charged for every slot it holds
        self._vtime[ticket.group] = self._vtime.get(ticket.group, 0.0) + (now - ticket.since) * ticket.slots
        ticket.since = now
        self._advance()

    def _best(self) -> _Ticket:
        return min(self._waiting, key=lambda t: (self._vtime[t.group], t.seq))

    def _wait_turn(self, ticket: _Ticket, wanted: Callable[[], bool] | None) -> None:
        self._waiting.append(ticket)
        try:
            while not (sum(t.slots for t in self._running) < self.slots and self._best() is ticket):  # type: ignore[operator]
                self._cond.wait(self.poll_s)
                if wanted is not None and not wanted():
                    raise PassAbandoned
        finally:
            self._waiting.remove(ticket)
            self._cond.notify_all()  # the next best may now go, or must re-check
        self._running.add(ticket)
        ticket.since = time.perf_counter()
        ticket.slots = 1


def checkpoint(wanted: Callable[[], bool] | None = None) -> None:
    """Between two steps of a pass: offer the slot of the pass this thread computes (if any)."""
    current = getattr(_local, "ticket", None)
    if current is not None:
        current[0].checkpoint(wanted)
