"""The store-and-forward journal: every counter operation is made durable
here before the POS gets its answer, and kept until HQ has committed it.

Files, in one directory:

    NNNNNNNN.log    segments: frames, appended; the highest number is the active segment
    NNNNNNNN.keys   the idempotency keys of segment NNNNNNNN, written as it was deleted
    unsendable/     copies of records that could not be sent to HQ (set_aside)
    *.damaged-T     copies of damaged files as read at time T
    *.tmp           a file being put in place whole; deleted on open

A frame is ``b"SG" | u32 length | u32 crc32(payload) | payload``, little
endian, the payload compact JSON of one of four kinds (format.py):

    {"k":"h","next"}                               a segment's header: next_seq when it was opened
    {"k":"r","seq","id","type","ts","body"}        a record; with an idempotency key also "key",
                                                   "rh" (the request's hash) and "resp" (the first
                                                   answer, less the seq and tx_id the frame holds)
    {"k":"a","r":[[lo,hi],...]}                    an ack: HQ committed these seqs
    {"k":"i","key","rh","seq","resp","ts"}         a key carried out of a deleted segment

Invariants. The code keeps these; check every change against them.

1. A frame is valid when it starts with b"SG", its length is at most
   MAX_FRAME and within the file, the crc32 matches and the payload is
   JSON. A file's frames are the valid frames read one after another from
   offset 0, up to the first spot that is not one. (format.py)

2. Segments are appended to, never rewritten. Only the active segment is
   written, only at the end of its frames and only with whole frames; past
   them a segment holds zeros (its space is allocated when it is opened,
   and zeroed ahead of the frames with direct I/O). The one rewrite: with
   O_DIRECT the sector holding the end of the frames is written again,
   with the same bytes in front. A new segment, opened with a header
   frame, becomes the active one at every start and when a group does not
   fit; numbers are never reused. Key files and copies are written whole
   (under a .tmp name, synced, renamed). Every file and directory the
   journal creates is synced into its parent's entries before anything in
   it is relied on. (segments.py)

3. Durable before the answer. append() returns only once its frame and
   every frame before it are on stable storage (fdatasync, or a direct
   write with RWF_DSYNC). Frames queued in one turn of the event loop go
   in one write and one sync (group commit). Nobody waits for an ack
   frame: it goes with the next sync, and if a crash loses it HQ is sent
   those records again. (commit.py)

4. Torn tail or damage. On open every file is read past the page cache
   and what follows its frames is
   - zeros only: unused space;
   - a torn tail, in the last segment when no valid frame follows: a write
     a crash cut short, never synced, so never answered. It is cut off,
     and that is no fault;
   - damage, anything else (a key file is never torn): a copy of the file
     as read is set aside, the file is rewritten with every valid frame
     found before and after the damage, and a fault is reported. Nothing
     valid is dropped and nothing is invented. (segments.py)

5. Sequence numbers are never reused. A record takes next_seq when it is
   encoded, even if its write then fails. Each segment's header holds
   next_seq as it was opened and the active segment is never deleted, so
   deleting records never lowers it; an ack never moves it. (index.py)

6. The index equals the frames. After open, the index is the fold, in file
   order (N.log then N.keys, N ascending), of every valid frame: a header
   raises next_seq to its next; a record raises next_seq past its seq, is
   pending unless an ack covers it, and locates its key at N; an ack takes
   its records out of pending; a key frame locates its key at N. While the
   journal runs the index changes as the disk does: a record is indexed
   once its group is synced, an ack as it is queued; keys older than
   IDEMPOTENCY_RETENTION_S leave at compaction. (index.py)

7. What may be deleted. A segment, when (a) every record written to it is
   indexed and it is not the active one, (b) none of its records is
   pending, (c) its keys within retention are in its key file, or held in
   memory for want of room (8). A key file, when none of its keys is
   within retention. Nothing else: not a
   set-aside copy, not a damaged copy. After a crash, pending holds every
   record HQ has not acked, and perhaps some it has whose ack frame was
   lost or deleted: HQ applies each record once. (journal.py)

8. Keys are carried once. An idempotency key and its first answer are on
   disk in their record's frame while its segment lives, then in that
   segment's key file; never copied again, so what is written per record
   does not grow with the keys a day holds. Records come first: a key file
   is written only if it leaves room for a whole segment under the cap and
   on the disk; if not, its keys stay in memory (a crash forgets them, a
   retry then makes a new record) until a later compaction finds room.
   (journal.py)

9. Only what HQ can take is journaled: a record HQ could not take (not
   JSON, nested too deep, too large, a type HQ does not know) is refused
   with RecordRefused before anything is written or a seq is taken. One
   that cannot be sent anyway (written by an older version, unreadable on
   disk) is copied to unsendable/ before HQ is sent its placeholder, since
   HQ's ack frees the only other copy. (format.py, journal.py)

10. Full: past the cap (max_bytes) or on a full disk an append fails with
    JournalFull, and nothing of its group stays on disk (the bytes written
    are zeroed again). (segments.py)

11. Reads are coherent with the writes. Linux keeps buffered reads coherent
    with O_DIRECT writes to the same pages only if the reads are O_DIRECT
    too, and a stale cached page reads as a torn tail; so every read of a
    journal file is O_DIRECT where the file system allows it. Where it
    refuses (tmpfs: EINVAL), both sides are buffered, which is coherent.
    (segments.py)
"""

from gateway.store.journal.errors import IdempotencyConflict, JournalError, JournalFull, RecordRefused
from gateway.store.journal.format import decode_frame, encode_frame, request_hash, scan_frames
from gateway.store.journal.index import JournalIndex
from gateway.store.journal.journal import (IDEMPOTENCY_RETENTION_S, UNSENDABLE_DIR, Appended, Journal,
                                           UnreadableRecord, read_index)
from gateway.store.journal.segments import RWF_DSYNC, SEGMENT_BYTES, read_segment

__all__ = ["Appended", "IDEMPOTENCY_RETENTION_S", "IdempotencyConflict", "Journal", "JournalError", "JournalFull",
           "JournalIndex", "RWF_DSYNC", "RecordRefused", "SEGMENT_BYTES", "UNSENDABLE_DIR", "UnreadableRecord",
           "decode_frame", "encode_frame", "read_index", "read_segment", "request_hash", "scan_frames"]
