"""``file://path``: the memory log kept on disk, so one machine keeps its tasks across restarts.

A :class:`FileLog` is a :class:`~qtasks.connectors.memory_log.MemoryLog` (the same
semantics: partitions, offsets, groups, compaction, transactions) that writes every
change to a journal, ``<path>/journal.qlog``, before the change is acknowledged, and
replays the journal when the process starts again.

- **What is written.** Topics, records (with their offsets and timestamps), the groups'
  committed offsets, and transactions (their records, offsets and ends). Reading a
  record writes nothing. Each entry is framed with its length and a CRC-32, so a
  process killed in the middle of a write leaves a torn last entry. The replay drops
  that entry and truncates the file there: it was never acknowledged.
- **When it reaches the disk** (``fsync`` in the URL):
  - ``interval`` (the default): every entry is written to the file before the call that
    made it returns, so a killed process loses nothing. The file is synced to the disk
    every ``fsync_interval_ms`` (default 1000 ms), so a machine that loses power loses
    at most that much.
  - ``always``: every entry is synced before the call returns (slow: a disk sync each).
  - ``never``: the OS decides.
- **Compaction of the journal.** When the journal holds more than twice the records the
  log still keeps, plus 10,000, it is rewritten with only those records: a compacted
  topic's last record per key, and what retention keeps, with the open transactions'
  records and offsets. It writes a new file, syncs it and renames it over the old one,
  so a crash in the middle leaves one whole journal or the other.
- **One process.** A lock file (``<path>/lock``, ``flock``) keeps a second process from
  opening the same log. In one process, apps with the same path share the log, as
  ``memory://`` apps of one name do.
- **After a restart.** Transactions that were open are aborted, as a broker does for a
  producer that is gone. Consumer groups start empty; their committed offsets are kept.

    file:///var/lib/myapp/queue?fsync=always
    file://queue-data?fsync_interval_ms=200
"""

from __future__ import annotations

import atexit
import fcntl
import os
import struct
import threading
import time
import urllib.parse
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from qtasks.connectors.base import TopicPartition, TopicSpec
from qtasks.connectors.memory_log import _URL_OPTIONS, MemoryLog, _Group
from qtasks.exc import ConfigError, ConnectorError

#: The journal's file name, and the frame of an entry: length and CRC-32 of the payload.
JOURNAL = "journal.qlog"
_FRAME = struct.Struct(">II")
#: URL options of ``file://`` (besides the retention ones of ``memory://``).
FILE_OPTIONS = ("fsync", "fsync_interval_ms")
_FSYNC = ("interval", "always", "never")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def _entry_at(data: bytes, at: int) -> bytes | None:
    """The payload of the whole entry at byte ``at`` (its frame fits and its CRC-32 matches), or None.

    No entry is empty (each is a msgpack list), so a frame of zeros is not one.
    """
    if at + _FRAME.size > len(data):
        return None
    size, crc = _FRAME.unpack_from(data, at)
    end = at + _FRAME.size + size
    if size == 0 or end > len(data):
        return None
    payload = data[at + _FRAME.size : end]
    return payload if zlib.crc32(payload) == crc else None


def _next_entry(data: bytes, start: int) -> int | None:
    """The first byte at or after ``start`` where a whole entry begins, or None."""
    for at in range(start, len(data) - _FRAME.size):
        size = int.from_bytes(data[at : at + 4], "big")
        if 0 < size <= len(data) - at - _FRAME.size and _entry_at(data, at) is not None:
            return at
    return None


def file_path(url: str) -> Path:
    """The directory a ``file://`` URL names (``file:///abs/dir`` or ``file://relative/dir``)."""
    path = urllib.parse.unquote(url.partition("://")[2].partition("?")[0])
    if not path:
        raise ConfigError(f"file:// needs a directory: file:///var/lib/app/queue or file://queue-data, got {url!r}")
    return Path(path)


def file_options(url: str) -> tuple[str, float]:
    """The fsync policy and interval (seconds) of a ``file://`` URL."""
    query = dict(urllib.parse.parse_qsl(url.partition("?")[2], keep_blank_values=True))
    for key in query:
        if key not in FILE_OPTIONS and key not in _URL_OPTIONS:
            raise ConfigError(
                f"unknown file:// option {key!r} in {url!r}: use {', '.join([*FILE_OPTIONS, *_URL_OPTIONS])}"
            )
    fsync = query.get("fsync", "interval")
    if fsync not in _FSYNC:
        raise ConfigError(f"fsync must be {', '.join(_FSYNC)}; got {fsync!r}")
    interval = query.get("fsync_interval_ms", "1000")
    if not interval.isdigit() or not 1 <= int(interval) <= 3_600_000:
        raise ConfigError(f"fsync_interval_ms must be 1 to 3600000 (milliseconds), got {interval!r}")
    return fsync, int(interval) / 1000


class FileLog(MemoryLog):
    """A memory log that journals every change to ``<path>/journal.qlog`` and replays it at start."""

    def __init__(self, path: Path, fsync: str = "interval", fsync_interval: float = 1.0) -> None:
        super().__init__()
        self.path = path
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        path.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(path / "lock", "a+b")  # noqa: SIM115 - held for the log's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise ConnectorError(
                f"{path} is in use by another process: a file:// log belongs to one process", retriable=False
            ) from None
        self._replaying = True
        self._unsynced = False
        self._closed = False
        self._stop_syncing = threading.Event()
        self.entries = 0
        self.replayed = 0
        try:
            self._journal = self._replay(path / JOURNAL)
        except BaseException:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            raise
        for t in self.topics.values():  # as the log cleaner would have by now
            if t.compacted:
                for p in t.partitions:
                    self._compact(t, p)
        self._replaying = False
        self._abort_open_transactions()
        if fsync == "interval":
            self._syncer = threading.Thread(target=self._sync_every, args=(fsync_interval,), daemon=True)
            self._syncer.start()
        atexit.register(self.close)

    # -- the journal --------------------------------------------------------------------

    def _write(self, *entry: Any) -> None:
        """Journal one change (the log's lock is held), whole or not at all.

        A write that fails (the disk is full) is cut back off the journal and raised as a
        retriable :class:`ConnectorError`: the call that made the change fails, and a retry
        (the engine retries deliveries while the failure is retriable) writes it again.
        """
        if self._replaying:
            return
        if self._closed:
            raise ConnectorError(f"the file:// log at {self.path} is closed", retriable=False)
        payload = _encoder.encode(entry)
        frame = memoryview(_FRAME.pack(len(payload), zlib.crc32(payload)) + payload)
        fd = self._journal.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            while frame:
                frame = frame[os.write(fd, frame) :]
            if self.fsync == "always":
                os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, start)  # no half entry is left in the middle of the journal
            except OSError:
                pass
            raise ConnectorError(f"could not write the file:// journal at {self.path}: {exc}", retriable=True) from exc
        self.entries += 1
        if self.fsync != "always":
            self._unsynced = True

    def _sync_every(self, interval: float) -> None:
        while not self._stop_syncing.wait(interval):
            with self.lock:  # the sync itself runs without the lock: appends go on meanwhile
                if not self._unsynced or self._closed:
                    continue
                self._unsynced = False
                fd = self._journal.fileno()
            try:
                os.fsync(fd)
            except OSError:  # swapped by a rewrite meanwhile (which synced its own file)
                pass

    def close(self) -> None:
        """Sync the journal and let the directory go (at exit, or for tests that open it again)."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self._stop_syncing.set()
            atexit.unregister(self.close)
            os.fsync(self._journal.fileno())
            self._journal.close()
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def _replay(self, journal: Path) -> BinaryIO:
        """Apply every whole entry of the journal; cut a torn tail; return the journal open for appends.

        An entry that is not whole (cut short, a CRC-32 that does not match, zeros where a
        power loss left the file's end unwritten) is a torn tail only if no whole entry
        follows it anywhere: then it was the last write, never acknowledged, and the file
        is cut there. With a whole entry after it, the journal is damaged in the middle and
        is refused as it is.
        """
        good = 0
        if journal.exists():
            data = journal.read_bytes()
            while good < len(data):
                payload = _entry_at(data, good)
                if payload is None:
                    after = _next_entry(data, good + 1)
                    if after is not None:
                        raise ConnectorError(
                            f"the file:// journal {journal} is damaged at byte {good} of {len(data)} (an entry that is "
                            f"not whole) with whole entries after it, from byte {after}: it is left as it is. Copy it "
                            "aside; cutting it at that byte opens the log without what came after",
                            retriable=False,
                        )
                    break  # a torn last entry: its write was cut short, so it was never acknowledged
                try:
                    self._apply(_decoder.decode(payload))
                except Exception as exc:
                    raise ConnectorError(
                        f"the file:// journal {journal} has an entry at byte {good} that cannot be replayed "
                        f"({type(exc).__name__}: {exc}): it is left as it is",
                        retriable=False,
                    ) from exc
                good += _FRAME.size + len(payload)
                self.replayed += 1
            if good < len(data):
                with open(journal, "r+b") as f:
                    f.truncate(good)
        self.entries = self.replayed
        return open(journal, "ab", buffering=0)

    def _apply(self, entry: list[Any]) -> None:
        kind = entry[0]
        if kind == "T":
            _, name, partitions, compacted, config = entry
            self.create_topic(TopicSpec(name, partitions, compacted=compacted, config=dict(config)))
        elif kind == "A":
            _, topic, partition, offset, key, value, ts, headers = entry
            self._at(topic, partition, offset, ts)
            MemoryLog.append(self, topic, partition, key, value, _headers(headers))
        elif kind == "X":
            _, txid, epoch, topic, partition, offset, key, value, ts, headers = entry
            self._at(topic, partition, offset, ts)
            MemoryLog.txn_append(self, txid, epoch, topic, partition, key, value, _headers(headers))
        elif kind == "I":
            _, txid, timeout_ms, epoch = entry
            MemoryLog.init_txn(self, txid, timeout_ms)
            self.txns[txid].epoch = epoch
        elif kind == "O":
            _, txid, epoch, group_id, offsets = entry
            MemoryLog.txn_offsets(self, txid, epoch, group_id, {TopicPartition(t, p): o for t, p, o in offsets})
        elif kind == "E":
            _, txid, epoch, commit, ts = entry
            self.clock = lambda: ts / 1000
            MemoryLog.txn_end(self, txid, epoch, commit=commit)
        elif kind == "C":
            _, group_id, offsets = entry
            self.groups.setdefault(group_id, _Group()).committed.update(
                {TopicPartition(t, p): o for t, p, o in offsets}
            )
        elif kind == "K":  # a transaction aborted past its timeout, its producer fenced
            _, txid, epoch, ts = entry
            txn = self.txns.get(txid)
            if txn is not None and txn.started:
                self.clock = lambda: ts / 1000
                self._end_txn(txn, txid, commit=False)
            if txn is not None:
                txn.epoch = epoch
        elif kind == "N":  # a partition's next offset (after a rewrite: markers and dropped records)
            _, topic, partition, offset = entry
            self.topics[topic].partitions[partition].next_offset = offset
        self.clock = time.time

    def _expire_txns(self) -> None:
        """Transactions past their timeout are aborted as in memory, and the abort is journaled;
        a replay applies the journaled ones only (never by today's clock)."""
        if self._replaying:
            return
        open_before = {txid: txn.epoch for txid, txn in self.txns.items() if txn.started}
        super()._expire_txns()
        for txid, epoch in open_before.items():
            txn = self.txns[txid]
            if txn.epoch != epoch:
                self._write("K", txid, txn.epoch, int(self.clock() * 1000))

    def _at(self, topic: str, partition: int, offset: int, ts: int) -> None:
        """Replay a record at its own offset and time."""
        self.topics[topic].partitions[partition].next_offset = offset
        self.clock = lambda: ts / 1000

    def _abort_open_transactions(self) -> None:
        with self.lock:
            for txid, txn in self.txns.items():
                if txn.started:
                    self._end_txn(txn, txid, commit=False)
                    txn.epoch += 1
                    self._write("I", txid, txn.timeout_ms, txn.epoch)

    def _maybe_rewrite(self) -> None:
        """Rewrite the journal with only what the log keeps, once it holds much more (lock held)."""
        if self._replaying or self.entries % 1024:
            return  # looked at every 1,024 entries: counting the records costs a pass over the partitions
        live = sum(len(p.records) for t in self.topics.values() for p in t.partitions)
        if self.entries <= 2 * live + 10_000:
            return
        self.rewrite()

    def rewrite(self) -> None:
        """Write a new journal with the topics, the records kept, the offsets, the groups and the
        open transactions (their records, their offsets); swap it in."""
        with self.lock:
            fresh = self.path / (JOURNAL + ".new")
            entries: list[bytes] = []

            def add(*entry: Any) -> None:
                payload = _encoder.encode(entry)
                entries.append(_FRAME.pack(len(payload), zlib.crc32(payload)) + payload)

            in_open: dict[tuple[str, int, int], tuple[str, int]] = {}  # a record of an open transaction: whose
            for txid, txn in self.txns.items():
                add("I", txid, txn.timeout_ms, txn.epoch)
                if txn.started:
                    for (topic, partition), offsets in txn.written.items():
                        for offset in offsets:
                            in_open[(topic, partition, offset)] = (txid, txn.epoch)
            for name, t in self.topics.items():
                add("T", name, len(t.partitions), t.compacted, sorted(t.spec.config.items()))
                for i, p in enumerate(t.partitions):
                    for record in p.records:
                        offset, key, value, ts = record[:4]
                        headers = list(record[4]) if len(record) > 4 else None
                        owner = in_open.get((name, i, offset))
                        if owner is None:
                            add("A", name, i, offset, key, value, ts, headers)
                        else:
                            add("X", *owner, name, i, offset, key, value, ts, headers)
                    add("N", name, i, p.next_offset)
            for group_id, group in self.groups.items():
                add("C", group_id, [(tp.topic, tp.partition, o) for tp, o in group.committed.items()])
            for txid, txn in self.txns.items():
                for group_id, group_offsets in txn.offsets.items() if txn.started else ():
                    add(
                        "O", txid, txn.epoch, group_id, [(tp.topic, tp.partition, o) for tp, o in group_offsets.items()]
                    )
            with open(fresh, "wb") as f:
                for entry in entries:
                    f.write(entry)
                f.flush()
                os.fsync(f.fileno())
            os.replace(fresh, self.path / JOURNAL)
            directory = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            self._journal.close()
            self._journal = open(self.path / JOURNAL, "ab", buffering=0)  # noqa: SIM115
            self.entries = len(entries)
            self._unsynced = False

    # -- the changes, journaled ------------------------------------------------------------

    # Each change is journaled before it is made: a write the disk refuses leaves the log as
    # it was, so a retry makes the change and journals it then. (A change refused for another
    # reason, a fenced producer or a commit of partitions not held, is checked first.)

    def create_topic(self, spec: TopicSpec, defaults: dict[str, str] | None = None) -> None:
        with self.lock:
            if spec.name in self.topics:
                super().create_topic(spec, defaults)  # checks the cleanup policy; nothing to journal
                return
            config = {**(defaults or {}), **spec.config}
            self._write("T", spec.name, spec.partitions, spec.compacted, sorted(config.items()))
            super().create_topic(spec, defaults)
            t = self.topics[spec.name]
            t.spec = TopicSpec(spec.name, spec.partitions, spec.compacted, spec.replication_factor, config)

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> int:
        with self.lock:
            offset, ts = self._next(topic, partition)
            self._write("A", topic, partition, offset, key, value, ts, list(headers) if headers else None)
            clock = self.clock
            try:
                self.clock = lambda: ts / 1000  # the record gets the time journaled
                offset = super().append(topic, partition, key, value, headers)
            finally:
                self.clock = clock
            self._maybe_rewrite()
        return offset

    def _next(self, topic: str, partition: int) -> tuple[int, int]:
        """The offset and time (ms) the next record of a partition gets (it is journaled before it is stored)."""
        try:
            p = self._topic(topic).partitions[partition]
        except IndexError:
            raise ConnectorError(f"topic {topic!r} has no partition {partition}") from None
        return p.next_offset, int(self.clock() * 1000)

    def txn_append(
        self,
        transactional_id: str,
        epoch: int,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> int:
        with self.lock:
            self._txn(transactional_id, epoch)  # a fenced producer writes nothing, not even to the journal
            offset, ts = self._next(topic, partition)
            self._write(
                "X",
                transactional_id,
                epoch,
                topic,
                partition,
                offset,
                key,
                value,
                ts,
                list(headers) if headers else None,
            )
            clock = self.clock
            try:
                self.clock = lambda: ts / 1000
                offset = super().txn_append(transactional_id, epoch, topic, partition, key, value, headers)
            finally:
                self.clock = clock
            self._maybe_rewrite()
        return offset

    def init_txn(self, transactional_id: str, timeout_ms: int) -> int:
        with self.lock:
            known = self.txns.get(transactional_id)
            epoch = (known.epoch if known is not None else 0) + 1  # what MemoryLog.init_txn gives
            self._write("I", transactional_id, timeout_ms, epoch)
            given = super().init_txn(transactional_id, timeout_ms)
            assert given == epoch, (given, epoch)
            self._maybe_rewrite()
        return epoch

    def txn_offsets(self, transactional_id: str, epoch: int, group_id: str, offsets: dict[TopicPartition, int]) -> None:
        with self.lock:
            self._txn(transactional_id, epoch)  # a fenced producer journals nothing
            self._write(
                "O", transactional_id, epoch, group_id, [(tp.topic, tp.partition, o) for tp, o in offsets.items()]
            )
            super().txn_offsets(transactional_id, epoch, group_id, offsets)
            self._maybe_rewrite()

    def txn_end(self, transactional_id: str, epoch: int, *, commit: bool) -> None:
        with self.lock:
            clock = self.clock
            ts = int(clock() * 1000)
            try:
                # One time for the whole end, and the expiry looked at now, not skipped by its
                # 50 ms throttle: a transaction past its timeout is aborted (and journaled)
                # before its end is, never between the end's entry and the end itself.
                self.clock = lambda: ts / 1000
                self._expiry_check = 0.0
                self._txn(transactional_id, epoch)  # a fenced producer journals nothing
                self._write("E", transactional_id, epoch, commit, ts)
                super().txn_end(transactional_id, epoch, commit=commit)
            finally:
                self.clock = clock
            self._maybe_rewrite()

    def commit(
        self,
        group_id: str,
        member_id: str,
        generation: int,
        offsets: dict[TopicPartition, int],
        held: set[TopicPartition],
    ) -> None:
        with self.lock:
            group = self.groups.get(group_id)
            before = dict(group.committed) if group is not None else {}
            super().commit(group_id, member_id, generation, offsets, held)  # refuses what the member may not commit
            try:
                self._write("C", group_id, [(tp.topic, tp.partition, o) for tp, o in offsets.items()])
            except ConnectorError:
                if group is not None:  # the disk refused: the commit is undone
                    group.committed.clear()
                    group.committed.update(before)
                raise
            self._maybe_rewrite()


def _headers(headers: list[Any] | None) -> list[tuple[str, bytes]] | None:
    return [(name, value) for name, value in headers] if headers else None


_logs: dict[Path, FileLog] = {}
_logs_lock = threading.Lock()


def get_file_log(url: str) -> FileLog:
    """The log behind a ``file://`` URL (one per directory, per process)."""
    path = file_path(url).resolve()
    fsync, interval = file_options(url)
    with _logs_lock:
        log = _logs.get(path)
        if log is None or log._closed:
            log = _logs[path] = FileLog(path, fsync, interval)
        elif (log.fsync, log.fsync_interval) != (fsync, interval):
            raise ConfigError(
                f"{path} is open in this process with fsync={log.fsync}, fsync_interval_ms="
                f"{round(log.fsync_interval * 1000)}: every app on one file:// log uses the same options"
            )
        return log


def close_file_log(url: str) -> None:
    """Close the log behind a ``file://`` URL (tests: the next app opens it again from its journal)."""
    path = file_path(url).resolve()
    with _logs_lock:
        log = _logs.pop(path, None)
    if log is not None:
        log.close()
