"""A file of names encoded once into a compact token store on disk, memory-mapped by every process.

One store file holds, after a 64-byte header:

* the tokens of all names end to end, in the smallest unsigned integer type the vocabulary allows
  (no BOS: the data module adds it when it cuts rows);
* the line offsets, ``int64``, one more than there are names: name ``i`` is ``tokens[offsets[i]:offsets[i+1]]``;
* a 64-bit hash of every name's tokens, for telling whether a string is one of the names;
* the vocabulary, UTF-8: the file's characters, sorted, in id order.

It is named by the source file's content hash (only: a byte-identical copy under another name reuses it)
and the format version, built as a stream (a few MiB of text at a time) and written with ``atomic_write``,
so it is complete or absent. The seeded order of the names (``random.Random(seed).shuffle`` of their
indices) is cached beside it, named by count and seed. Both carry a CRC-32 of everything after their
header, checked once per process when they are opened: a damaged store is built again, a damaged order
computed again, each with one line naming the file.
"""

from __future__ import annotations

import array
import hashlib
import os
import random
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm.auto import tqdm

from microgpt.errors import UserError
from microgpt.files import WriteFailed, atomic_write, os_reason, unreadable

FORMAT = 2  # bump when the layout changes: the file name and the header both carry it
MAGIC = b"MGPTTOKS"
HEADER = struct.Struct("<8sIIQQQQ")  # magic, format, token itemsize, names, tokens, vocabulary bytes, CRC-32
HEADER_BYTES = 64
ORDER_MAGIC = b"MGPTORDR"
ORDER_HEADER = struct.Struct("<8sIIQQ")  # magic, format, index itemsize, count, CRC-32
ORDER_HEADER_BYTES = 32
CHUNK_BYTES = 4 << 20  # text read per step while scanning and building
CHUNK_LINES = 1 << 20  # names looked at per step by a pass over many of them
PROGRESS_FROM = 64 << 20  # files at least this large show a progress bar while the store is built
CACHE_ENV = "MICROGPT_CACHE"
MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # of the polynomial line hash
LENGTH_MIX = np.uint64(0xC2B2AE3D27D4EB4F)


def default_cache_dir() -> Path:
    """``$MICROGPT_CACHE``, else ``$XDG_CACHE_HOME/microgpt``, else ``~/.cache/microgpt``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "microgpt"


def check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file.")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a file of names.")


def blocks(f: BinaryIO) -> Iterator[bytes]:
    """The rest of an open file, ``CHUNK_BYTES`` at a time."""
    while block := f.read(CHUNK_BYTES):
        yield block


def chunks(count: int) -> Iterator[slice]:
    """``slice``s that cover ``0 .. count - 1``, ``CHUNK_LINES`` at a time: a pass over many names holds only one chunk."""
    for start in range(0, count, CHUNK_LINES):
        yield slice(start, min(start + CHUNK_LINES, count))


def content_hash(path: Path) -> str:
    """The SHA-256 of the file's bytes, in hex."""
    check_file(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in blocks(f):
                digest.update(block)
    except OSError as err:
        raise unreadable(path, err) from None
    return digest.hexdigest()


def read_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[list[str], int]]:
    """The names of a file a chunk at a time, with the bytes read for each chunk.

    The file's lines, stripped, blank ones dropped, in order, without holding the file: chunks end at a
    line break (``\\n`` or ``\\r``, bytes that never occur inside a UTF-8 character), so every line is
    split (any line ending: ``\\n``, ``\\r\\n``, ``\\r``), stripped and decoded as in the whole text. A
    byte-order mark, as some Windows editors write, is not part of the first name; duplicates are kept, and
    characters exactly as written (no Unicode normalization).
    """
    check_file(path)
    rest, newlines, first = b"", 0, True
    try:
        f = path.open("rb")
    except OSError as err:
        raise unreadable(path, err) from None
    with f:
        while True:
            try:
                block = f.read(chunk_bytes)
            except OSError as err:
                raise unreadable(path, err) from None
            data = rest + block
            cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1 if block else len(data)
            if block and cut == 0:  # no line break yet: read on
                rest = data
                continue
            data, rest = data[:cut], data[cut:]
            try:
                text = data.decode("utf-8-sig" if first else "utf-8")
            except UnicodeDecodeError as err:
                line = newlines + data.count(b"\n", 0, err.start) + 1
                raise UserError(f"{path}: line {line} is not valid UTF-8.") from None
            first = False
            newlines += data.count(b"\n")
            yield [stripped for line in text.splitlines() if (stripped := line.strip())], len(block)
            if not block:
                return


def code_points(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The code points of ``names`` end to end (``uint32``) and each name's length in characters."""
    points = np.frombuffer("".join(names).encode("utf-32-le"), dtype=np.uint32)
    return points, np.fromiter(map(len, names), dtype=np.int64, count=len(names))


def scan(path: Path) -> tuple[str, int]:
    """The vocabulary (sorted characters) and the number of names of a file, read as a stream."""
    seen = np.zeros(0x110000, dtype=bool)
    count = 0
    for names, _ in read_chunks(path):
        points, lengths = code_points(names)
        seen[points] = True
        count += len(lengths)
    if not count:
        raise UserError(f"{path}: contains no names (the file is empty or only blank lines).")
    return "".join(map(chr, np.flatnonzero(seen).tolist())), count


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds ids ``0 .. vocab_size - 1``."""
    return np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32) if vocab_size <= np.iinfo(t).max + 1))


def line_hashes(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each line's ids (lines laid end to end in ``ids``; every length at least 1):
    a polynomial in ``MULTIPLIER`` (wrapping at 2**64), mixed with the length."""
    starts = np.cumsum(lengths) - lengths
    within = np.arange(len(ids)) - np.repeat(starts, lengths)
    powers = np.multiply.accumulate(np.full(int(lengths.max()), MULTIPLIER, dtype=np.uint64))
    return np.add.reduceat((ids.astype(np.uint64) + np.uint64(1)) * powers[within], starts) ^ (
        lengths.astype(np.uint64) * LENGTH_MIX)


def align8(n: int) -> int:
    return (n + 7) // 8 * 8


_verified: set[tuple] = set()  # (path, inode, size, mtime) of the files this process found whole


def check_content(path: Path, offset: int, expected: int) -> None:
    """Raise ``ValueError`` unless the CRC-32 of ``path``'s bytes from ``offset`` on is ``expected``: read
    through the mapping (the pages training reads next), once per process and version of the file."""
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return
    crc = 0
    if stat.st_size > offset:
        crc = zlib.crc32(memoryview(np.memmap(path, dtype=np.uint8, mode="r", offset=offset)))
    if crc != expected:
        raise ValueError("its bytes do not match their checksum")
    _verified.add(key)


class TokenStore:
    """A store file mapped read-only: ``tokens``, ``offsets``, ``hashes`` and ``chars`` (see the module's docstring).

    ``verify`` checks the content's checksum first (``open_store`` does); pickling keeps only the path, and
    unpickling maps the file again.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = False):
        self.path = Path(path)
        with self.path.open("rb") as f:
            head = f.read(HEADER_BYTES)
            if len(head) < HEADER_BYTES:
                raise ValueError("shorter than its header")
            magic, version, itemsize, count, num_tokens, vocab_bytes, crc = HEADER.unpack_from(head)
            if magic != MAGIC or version != FORMAT:
                raise ValueError(f"not a format {FORMAT} token store")
            dtype = np.dtype(f"<u{itemsize}")
            at_offsets = align8(HEADER_BYTES + num_tokens * itemsize)
            at_hashes = at_offsets + 8 * (count + 1)
            at_vocab = at_hashes + 8 * count
            if self.path.stat().st_size != at_vocab + vocab_bytes:
                raise ValueError("truncated")
            if verify:
                check_content(self.path, HEADER_BYTES, crc)
            f.seek(at_vocab)
            self.chars = f.read(vocab_bytes).decode("utf-8")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
        self.offsets = np.memmap(self.path, dtype="<i8", mode="r", offset=at_offsets, shape=(count + 1,))
        self.hashes = np.memmap(self.path, dtype="<u8", mode="r", offset=at_hashes, shape=(count,))
        self._ids = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.hashes)

    def __reduce__(self):
        return type(self), (self.path,)

    def lengths(self, lines: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The length in characters of the names at ``lines`` (all by default)."""
        if isinstance(lines, slice):
            return np.diff(self.offsets[lines.start : None if lines.stop is None else lines.stop + 1])
        return self.offsets[lines + 1] - self.offsets[lines]

    def gather(self, lines: np.ndarray, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ids of the names at ``lines`` end to end, each cut to ``limit`` characters when set, and
        each name's full length."""
        starts, lengths = self.offsets[lines], self.lengths(lines)
        kept = lengths if limit is None else np.minimum(lengths, limit)
        first = np.cumsum(kept) - kept
        flat = np.arange(int(kept.sum())) + np.repeat(starts - first, kept)
        return np.asarray(self.tokens[flat]), lengths

    def decode(self, lines: np.ndarray) -> list[str]:
        """The names at ``lines``, as strings."""
        ids, lengths = self.gather(np.asarray(lines, dtype=np.int64))
        points = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)[ids]
        text = points.tobytes().decode("utf-32-le")
        ends = np.cumsum(lengths).tolist()
        return [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]

    def encode(self, name: str) -> np.ndarray | None:
        """The ids of ``name``, or None when it has a character that no name in the store has."""
        ids = [self._ids.get(c) for c in name]
        return None if None in ids else np.array(ids, dtype=np.int64)


def names_among(store: TokenStore, lines: np.ndarray, names: list[str]) -> set[str]:
    """Those of ``names`` that are names at ``lines`` of ``store``, found without a set of the store's
    names: one pass over the lines' hashes looking up the few wanted hashes, every hit checked against
    the line's tokens."""
    wanted = {name: ids for name in set(names) if name and (ids := store.encode(name)) is not None}
    if not wanted:
        return set()
    candidates = list(wanted)
    keys = np.array([line_hashes(wanted[name], np.array([len(name)]))[0] for name in candidates])
    by_key = np.argsort(keys)
    keys = keys[by_key]
    found: set[str] = set()
    for chunk in chunks(len(lines)):
        part = np.asarray(lines[chunk])
        hashes = store.hashes[part]
        first = np.searchsorted(keys, hashes)
        hits = np.flatnonzero(keys[first.clip(max=len(keys) - 1)] == hashes)
        for i in hits.tolist():
            for j in range(first[i], np.searchsorted(keys, hashes[i], "right")):  # every candidate with that hash
                name = candidates[by_key[j]]
                if name not in found and np.array_equal(store.gather(part[i : i + 1])[0], wanted[name]):
                    found.add(name)
    return found


def store_path(source: Path, cache_dir: Path) -> Path:
    """Where the store of ``source`` lives: named by its content hash and the format version, not by its
    name, so that a byte-identical copy anywhere, under any name, shares it."""
    return cache_dir / f"names-{content_hash(source)[:20]}.v{FORMAT}.tokens"


def open_store(path: Path) -> tuple[TokenStore | None, str]:
    """The store at ``path``, or None and why not ("" when there is none)."""
    if not path.exists():
        return None, ""
    try:
        return TokenStore(path, verify=True), ""
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return None, str(err)


def ensure_store(source: Path, path: Path, chars: str | None = None, flag: str = "--data.cache_dir") -> TokenStore:
    """The store of ``source`` at ``path``, built first when it is missing, truncated or of another format."""
    store, problem = open_store(path)
    if store is not None:
        return store
    if problem:
        print(f"microgpt: token store {path} is unusable ({problem}); rebuilding it.", file=sys.stderr, flush=True)
    else:
        print(f"microgpt: building the token store of {source} in {path.parent}", file=sys.stderr, flush=True)
    try:
        atomic_write(path, lambda f: write_store(f, source, chars or scan(source)[0], path.parent))
    except (WriteFailed, OSError) as err:  # the store, or its scratch files beside it (reading the source is
        # a UserError of its own): nothing half-written is left, the scratch files have no name
        reason = os_reason(err.error if isinstance(err, WriteFailed) else err)
        raise UserError(f"cannot write the token store {path}: {reason}; point {flag} "
                        f"or the {CACHE_ENV} environment variable at a writable directory.") from None
    return TokenStore(path)


def write_store(f: BinaryIO, source: Path, chars: str, scratch: Path) -> None:
    """Encode ``source`` into ``f`` in the store layout, a chunk at a time."""
    dtype = token_dtype(len(chars))
    lookup = np.zeros(0x110000, dtype=dtype)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars), dtype=dtype)
    f.write(bytes(HEADER_BYTES))
    crc = 0

    def put(data: bytes) -> None:
        nonlocal crc
        f.write(data)
        crc = zlib.crc32(data, crc)

    count = num_tokens = 0
    size = source.stat().st_size
    with tempfile.TemporaryFile(dir=scratch) as offsets, tempfile.TemporaryFile(dir=scratch) as hashes, \
            tqdm(total=size, unit="B", unit_scale=True, desc="token store", disable=size < PROGRESS_FROM) as bar:
        offsets.write(np.zeros(1, dtype="<i8").tobytes())
        for names, read in read_chunks(source):
            bar.update(read)
            if not names:
                continue
            points, lengths = code_points(names)
            ids = lookup[points]
            put(ids.tobytes())
            offsets.write((num_tokens + np.cumsum(lengths)).astype("<i8").tobytes())
            hashes.write(line_hashes(ids, lengths).astype("<u8").tobytes())
            count, num_tokens = count + len(lengths), num_tokens + len(ids)
        put(bytes(align8(HEADER_BYTES + num_tokens * dtype.itemsize) - HEADER_BYTES - num_tokens * dtype.itemsize))
        for part in (offsets, hashes):
            part.seek(0)
            for block in blocks(part):
                put(block)
    vocab = chars.encode("utf-8")
    put(vocab)
    f.seek(0)
    f.write(HEADER.pack(MAGIC, FORMAT, dtype.itemsize, count, num_tokens, len(vocab), crc))


def order_path(count: int, seed: int, cache_dir: Path) -> Path:
    """Where the seeded order of ``count`` names is cached."""
    return cache_dir / f"order-{count}-seed{seed}.v{FORMAT}.order"


def read_order(path: Path, count: int) -> np.ndarray:
    """The order cached at ``path``, mapped, after checking its header and checksum (``ValueError`` if wrong)."""
    with path.open("rb") as f:
        head = f.read(ORDER_HEADER_BYTES)
    if len(head) < ORDER_HEADER_BYTES:
        raise ValueError("shorter than its header")
    magic, version, itemsize, stored, crc = ORDER_HEADER.unpack_from(head)
    if magic != ORDER_MAGIC or version != FORMAT or itemsize not in (4, 8) or stored != count:
        raise ValueError(f"not a format {FORMAT} order of {count} names")
    if path.stat().st_size != ORDER_HEADER_BYTES + count * itemsize:
        raise ValueError("truncated")
    check_content(path, ORDER_HEADER_BYTES, crc)
    return np.memmap(path, dtype=f"<i{itemsize}", mode="r", offset=ORDER_HEADER_BYTES, shape=(count,))


def seeded_order(count: int, seed: int, cache_dir: Path, flag: str = "--data.cache_dir") -> np.ndarray:
    """The order ``random.Random(seed).shuffle`` puts ``count`` items in, as indices (mapped from the
    cache; computed and saved there the first time, and again when the cached one is damaged)."""
    path = order_path(count, seed, cache_dir)
    if path.exists():
        try:
            return read_order(path, count)
        except (OSError, ValueError) as err:
            print(f"microgpt: the names' order {path} is unusable ({err}); computing it again.", file=sys.stderr,
                  flush=True)
    # Python's shuffle depends only on the length, so shuffling indices orders names as shuffling them does;
    # a compact array keeps the memory at 4 or 8 bytes per name
    indices = array.array("i" if count < 2**31 else "q", range(count))
    random.Random(seed).shuffle(indices)
    order = np.frombuffer(indices, dtype=np.int32 if indices.itemsize == 4 else np.int64)
    data = memoryview(order.astype(order.dtype.newbyteorder("<"), copy=False))  # a view on little-endian machines
    head = ORDER_HEADER.pack(ORDER_MAGIC, FORMAT, order.itemsize, count, zlib.crc32(data))
    try:
        atomic_write(path, lambda f: f.writelines([head, data]))
    except WriteFailed as err:
        raise UserError(f"cannot write the names' order {path}: {os_reason(err.error)}; point {flag} "
                        f"or the {CACHE_ENV} environment variable at a writable directory.") from None
    return order
