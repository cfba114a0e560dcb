"""Leases: which replica of the dataset service is doing a piece of long-running work.

Any number of replicas share one database. Work that spans many transactions (an upload,
a version being written) holds a lease row naming its owner (one id per process) and an
expiry, taken in the transaction that starts the work. The owner's `LeaseKeeper` pushes
the expiry of all its leases forward every third of the lease time, and every write that
continues the work renews its lease in the same transaction (`renew`), which fails once
the lease is gone; the transaction that ends the work deletes the lease (`release`).

A replica that stops (killed, crashed, cut off from the database) stops renewing. Once
its leases have expired, any replica's recovery (at start, then every lease time) undoes
what the work left half done, and takes the lease from the row first, so of two
replicas recovering at once one does it, and the owner, should it come back, fails at
its next fenced write instead of finishing work that was undone.

Leases live in their own table, which a database from before leases gains at start. An
upload or version left running by such a release has no lease row and is recovered as
expired.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from sqlalchemy import Connection, Engine, delete, insert, select, update

from loraforge.services.common.resources import new_id
from loraforge.services.dataset.tables import leases

log = logging.getLogger("loraforge.dataset.leases")

UPLOAD = "upload"
VERSION = "version"
DEFAULT_LEASE_SECONDS = 30.0


def new_owner_id() -> str:
    """This process's name in lease rows: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{new_id()[:6]}"


class Leases:
    """Takes, renews and releases this process's leases (blocking)."""

    def __init__(
        self,
        engine: Engine,
        owner: str,
        seconds: float = DEFAULT_LEASE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.owner = owner
        self.seconds = seconds
        self.clock = clock

    def take(self, conn: Connection, kind: str, ref_pk: int) -> None:
        """Leases new work to this process, in the transaction that starts the work."""
        conn.execute(
            insert(leases).values(
                kind=kind, ref_pk=ref_pk, owner=self.owner, expires_at=self.clock() + self.seconds
            )
        )

    def renew(self, conn: Connection, kind: str, ref_pk: int) -> bool:
        """Extends one lease if this process still holds it; False once it does not."""
        return (
            conn.execute(
                update(leases)
                .where(
                    leases.c.kind == kind, leases.c.ref_pk == ref_pk, leases.c.owner == self.owner
                )
                .values(expires_at=self.clock() + self.seconds)
            ).rowcount
            == 1
        )

    def release(self, conn: Connection, kind: str, ref_pk: int) -> bool:
        """Ends a lease this process holds, in the transaction that ends the work; False if
        it no longer held it (the work was recovered by another replica)."""
        return (
            conn.execute(
                delete(leases).where(
                    leases.c.kind == kind, leases.c.ref_pk == ref_pk, leases.c.owner == self.owner
                )
            ).rowcount
            == 1
        )

    def renew_all(self) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                update(leases)
                .where(leases.c.owner == self.owner)
                .values(expires_at=self.clock() + self.seconds)
            ).rowcount

    def take_over(self, conn: Connection, kind: str, ref_pk: int) -> bool:
        """For recovery: ends the lease on a piece of work if it has expired or there is
        none; False if a live owner holds it. This process's own work is never taken over:
        it is running (its renewals may only have been held up), and its next fenced write
        renews it."""
        now = self.clock()
        conn.execute(
            delete(leases).where(
                leases.c.kind == kind,
                leases.c.ref_pk == ref_pk,
                leases.c.expires_at < now,
                leases.c.owner != self.owner,
            )
        )
        live = conn.execute(
            select(leases.c.owner).where(leases.c.kind == kind, leases.c.ref_pk == ref_pk)
        ).first()
        return live is None


class LeaseKeeper(threading.Thread):
    """Renews this process's leases and recovers expired work of any replica, until stopped."""

    def __init__(self, leases_: Leases, recover: Callable[[], None]) -> None:
        super().__init__(name="dataset-lease-keeper", daemon=True)
        self.leases = leases_
        self.recover = recover
        self._halt = threading.Event()

    def run(self) -> None:
        period = self.leases.seconds / 3
        next_recovery = time.monotonic() + self.leases.seconds
        while not self._halt.wait(period):
            try:
                self.leases.renew_all()
                if time.monotonic() >= next_recovery:
                    next_recovery = time.monotonic() + self.leases.seconds
                    self.recover()
            except Exception:  # a database hiccup: try again next period, before expiry
                log.exception("could not renew leases or recover expired work")

    def stop(self) -> None:
        """Stops renewing; a statement under way finishes on its own (a daemon thread)."""
        self._halt.set()
