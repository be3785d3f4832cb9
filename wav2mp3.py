"""wav2mp3: a small HTTP service that turns WAV recordings into MP3.

Create a user, upload a WAV with the user's id and access token, get back a link that
downloads the MP3 from the database:

    POST /users                 {"name": ...}  -> 201 {"user_id", "access_token"}
    POST /users/wav             multipart: data={"user_id", "access_token"}, audio_file=<wav>
                                -> 201 {"url": "http://host:port/record?id=...&user=...", ...}
    GET  /record?id=...&user=...  -> the MP3 (Range, ETag, HEAD)
    GET  /health                -> {"status": "ok"} or 503

The upload is parsed as it arrives; the audio bytes flow through a bounded pipe to a worker
thread that reads them with the stdlib `wave` module and encodes them with LAME (lameenc),
so the MP3 is ready when the upload ends and memory stays flat whatever the file size.
The MP3 is written to the database (SQLite or PostgreSQL) in one transaction, as 256 KiB
chunks, only when the whole request has succeeded.

Run:  python wav2mp3.py [--host H] [--port P] [--database-url URL] [--workers N]

Environment (command-line flags override them):
    DATABASE_URL          sqlite:///./wav2mp3.db (default) or postgresql://user:pw@host/db
    PUBLIC_URL            base of the links returned; default: the request's own scheme://host:port
    MAX_UPLOAD_MB         largest request body accepted, in MiB (default 4096)
    MP3_BITRATE           CBR kbps (default 128); the form field `bitrate` overrides it per upload
    MP3_QUALITY           LAME -q, 0 (best, slowest) .. 9 (default 3, as lame and ffmpeg)
    MAX_CONVERSIONS       conversions running at once per process (default: CPU count / workers)
    UPLOAD_IDLE_TIMEOUT   seconds a client may stall mid-upload before it is cut off (default 60)
    DB_TIMEOUT            seconds a database call may take before the answer is 503 (default 10)
    DB_STARTUP_TIMEOUT    seconds to wait for the database at start-up (default 120)
    HOST, PORT, WORKERS   where and with how many processes `python wav2mp3.py` serves
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import sqlite3
import struct
import tempfile
import threading
import time
import unicodedata
import uuid
import wave
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar
from urllib.parse import quote

import aiosqlite
import anyio
import asyncpg
import databases
import lameenc
import numpy as np
import uvicorn
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("wav2mp3")

# Settings ###########################################################################

MIB = 1024 * 1024
MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
CHUNK_BYTES = 256 * 1024  # one record_chunks row (GridFS uses 255 KiB; a power of two reads well)
USER_BATCH = 64  # users created by one INSERT (group commit)
CHUNKS_PER_QUERY = 4  # rows fetched or inserted per round trip: 1 MiB in memory at most
READ_BLOCK_BYTES = 1024 * 1024  # PCM handed to LAME per call: amortises the thread and numpy overhead
PIPE_CAPACITY = 4 * READ_BLOCK_BYTES  # upload bytes buffered ahead of the converter
SPOOL_MEMORY_BYTES = 4 * MIB  # an MP3 larger than this is spooled to a temporary file
KEEP_WAV_BYTES = 64 * MIB  # WAVs up to this size can be encoded again for a `bitrate` sent after them
MAX_PARTS = 16  # multipart parts per upload (three are meaningful)
MAX_FIELD_BYTES = 64 * 1024  # size of a non-file part (`data`, `bitrate`)
MAX_JSON_BODY = 64 * 1024  # body of POST /users
MAX_NAME_CHARS = 128
MAX_FILENAME_BYTES = 255  # as most file systems allow
DRAIN_LIMIT_BYTES = 64 * MIB  # how much of a refused oversized body is read so the client sees 413


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    value = env.get(name, "").strip()
    return int(value) if value else default


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///./wav2mp3.db"
    public_url: str = ""
    max_upload_bytes: int = 4096 * MIB
    mp3_bitrate: int = 128
    mp3_quality: int = 3
    max_conversions: int = os.cpu_count() or 1
    upload_idle_timeout: float = 60.0
    db_timeout: float = 10.0
    db_startup_timeout: float = 120.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        defaults = cls()
        settings = cls(
            database_url=env.get("DATABASE_URL") or defaults.database_url,
            public_url=env.get("PUBLIC_URL", "").rstrip("/"),
            max_upload_bytes=_env_int(env, "MAX_UPLOAD_MB", defaults.max_upload_bytes // MIB) * MIB,
            mp3_bitrate=_env_int(env, "MP3_BITRATE", defaults.mp3_bitrate),
            mp3_quality=_env_int(env, "MP3_QUALITY", defaults.mp3_quality),
            max_conversions=_env_int(env, "MAX_CONVERSIONS", defaults.max_conversions),
            upload_idle_timeout=float(env.get("UPLOAD_IDLE_TIMEOUT") or defaults.upload_idle_timeout),
            db_timeout=float(env.get("DB_TIMEOUT") or defaults.db_timeout),
            db_startup_timeout=float(env.get("DB_STARTUP_TIMEOUT") or defaults.db_startup_timeout),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.mp3_bitrate not in MP3_BITRATES:
            raise ValueError(f"MP3_BITRATE must be one of {MP3_BITRATES}, not {self.mp3_bitrate}")
        if not 0 <= self.mp3_quality <= 9:
            raise ValueError(f"MP3_QUALITY must be 0..9, not {self.mp3_quality}")
        if self.max_conversions < 1 or self.max_upload_bytes < 1:
            raise ValueError("MAX_CONVERSIONS and MAX_UPLOAD_MB must be positive")


# Errors #############################################################################


class HTTPError(Exception):
    """An answer other than success: mapped to {"error": message} in one place (`error_response`)."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(HTTPError):
    status = 422


class UnsupportedWav(HTTPError):
    status = 415


class InvalidWav(Invalid):
    pass


class Forbidden(HTTPError):
    status = 403


class NotFound(HTTPError):
    status = 404


class Stalled(HTTPError):
    status = 408


class Conflict(HTTPError):
    status = 409


class NameTaken(Conflict):
    def __init__(self, filename: str) -> None:
        super().__init__(f"this user already has a record from a file named {filename!r}")


class TooLarge(HTTPError):
    status = 413


class RangeNotSatisfiable(HTTPError):
    status = 416

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable: the record is {size} bytes")
        self.size = size


class Unavailable(HTTPError):
    status = 503


class UploadAborted(Exception):
    """The request was refused or the client left: the converter stops reading."""


# WAV reading ########################################################################

# Format tags from the Microsoft registry (mmreg.h / RFC 2361), for the 415 message.
WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_ALAW = 0x0006
WAVE_FORMAT_MULAW = 0x0007
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
FORMAT_NAMES = {
    0x0002: "MS ADPCM",
    0x0011: "IMA ADPCM",
    0x0016: "ITU G.723 ADPCM",
    0x0022: "DSP Group TrueSpeech",
    0x0031: "GSM 6.10",
    0x0040: "ITU G.721 ADPCM",
    0x0050: "MPEG",
    0x0055: "MPEG Layer 3",
    0x0092: "Dolby AC-3 SPDIF",
    0x00FF: "AAC",
    0x0161: "Windows Media Audio",
    0x2000: "Dolby AC-3",
    0xF1AC: "FLAC",
}
# The sub-format GUID of WAVE_FORMAT_EXTENSIBLE is the format tag followed by this suffix.
KSDATAFORMAT_SUFFIX = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
# Encoding -> sample widths (bytes) it may have.
ENCODINGS = {
    WAVE_FORMAT_PCM: ("PCM", (1, 2, 3, 4)),
    WAVE_FORMAT_IEEE_FLOAT: ("IEEE float", (4, 8)),
    WAVE_FORMAT_ALAW: ("A-law", (1,)),
    WAVE_FORMAT_MULAW: ("mu-law", (1,)),
}
# RF64 (EBU Tech 3306) and BW64 (ITU-R BS.2088) are WAV with 64-bit sizes, for files past 4 GiB.
RIFF_MAGICS = (b"RIFF", b"RF64", b"BW64")
MAX_DS64_BYTES = 4096  # 28 bytes and a table of 12-byte entries, empty in practice
MIN_RATE, MAX_RATE = 8000, 192000
STREAMED_SIZES = (0, 0xFFFFFFFF)  # what recorders write before they know the length
UNBOUNDED = 1 << 62


def format_name(tag: int) -> str:
    name = FORMAT_NAMES.get(tag, "unknown encoding")
    return f"{name} (format tag 0x{tag:04X})"


class Readable(Protocol):
    """All the WAV reader needs from its source: a file, the upload pipe, or a copy of it."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class WavFormat:
    encoding: int  # one of ENCODINGS
    channels: int
    rate: int
    sample_width: int  # bytes per sample
    channel_mask: int = 0

    @property
    def frame_size(self) -> int:
        return self.channels * self.sample_width


class _Prefixed:
    """Reads `prefix`, then the rest of `file`: how WavReader hands stdlib wave a patched header."""

    def __init__(self, prefix: bytes, file: Readable) -> None:
        self._prefix = prefix
        self._file = file

    def read(self, size: int = -1) -> bytes:
        if not self._prefix:
            return self._file.read(size)
        if size < 0:
            head, self._prefix = self._prefix, b""
            return head + self._file.read()
        head, self._prefix = self._prefix[:size], self._prefix[size:]
        return head + self._file.read(size - len(head)) if size > len(head) else head


class WavReader(wave.Wave_read):
    """stdlib `wave`, taught what real-world WAVs hold.

    Python's reader refuses everything but plain integer PCM (3.12 adds EXTENSIBLE PCM only).
    This subclass reads the `fmt ` chunk itself (float, A-law, mu-law, EXTENSIBLE) and
    accepts headers from streaming recorders whose RIFF and data sizes are 0, 0xFFFFFFFF or
    stale; the chunk walking (LIST, bext, fact, pad bytes) stays stdlib's. It reads from any
    object with `read(n)`, so it works on a stream that cannot seek.
    """

    format: WavFormat
    declared_data_bytes: int | None  # None: streamed, read to the end

    def initfp(self, file: Readable) -> None:  # type: ignore[override]
        head = file.read(12)
        if not head:
            raise InvalidWav("audio_file is empty (0 bytes)")
        magic = head[:4]
        if not any(known.startswith(magic) for known in RIFF_MAGICS) or (len(head) >= 12 and head[8:12] != b"WAVE"):
            raise UnsupportedWav("audio_file is not a RIFF/WAVE file")
        if len(head) < 12:
            raise InvalidWav("WAV header is truncated")
        # The RIFF size only bounds the chunk walk, and streamed or stale files get it wrong:
        # let the walk run to the end of the upload instead.
        prefix = b"RIFF\xff\xff\xff\xffWAVE"
        ds64_data_bytes = None
        if magic != b"RIFF":
            ds64_data_bytes, unread = self._read_ds64(file)
            prefix += unread
        try:
            super().initfp(_Prefixed(prefix, file))  # type: ignore[misc]  # typeshed omits initfp
        except (wave.Error, EOFError) as error:
            missing = "missing fmt chunk" if not getattr(self, "_fmt_chunk_read", 0) else str(error)
            raise InvalidWav(f"WAV header is corrupt or truncated: {missing}") from None
        # stdlib's private chunk objects (the same in 3.11's chunk.Chunk and 3.13's wave._Chunk)
        self._file.chunksize = UNBOUNDED  # type: ignore[attr-defined]
        data = self._data_chunk  # type: ignore[attr-defined]
        if data.chunksize == 0xFFFFFFFF and ds64_data_bytes is not None:
            data.chunksize = ds64_data_bytes
        if data.chunksize in STREAMED_SIZES:
            data.chunksize = UNBOUNDED
            self.declared_data_bytes = None
        else:
            self.declared_data_bytes = data.chunksize

    @staticmethod
    def _read_ds64(file: Readable) -> tuple[int | None, bytes]:
        """RF64/BW64 keep 64-bit sizes in a ds64 chunk right after the header (EBU Tech 3306 §2):
        the data size, or None, and any bytes read that were not a ds64 chunk."""
        chunk_head = file.read(8)
        if chunk_head[:4] != b"ds64" or len(chunk_head) < 8:
            return None, chunk_head
        size = struct.unpack("<L", chunk_head[4:])[0]
        if not 16 <= size <= MAX_DS64_BYTES:
            raise InvalidWav(f"WAV header is corrupt: ds64 chunk of {size} bytes")
        ds64 = file.read(size + (size & 1))
        if len(ds64) < 16:
            raise InvalidWav("WAV header is truncated: ds64 chunk")
        return struct.unpack("<Q", ds64[8:16])[0], b""

    def _read_fmt_chunk(self, chunk: Any) -> None:
        # WAVEFORMATEX, then for EXTENSIBLE: cbSize, valid bits, channel mask, sub-format GUID.
        header = chunk.read(16)
        if len(header) < 16:
            raise InvalidWav("WAV header is corrupt: fmt chunk shorter than 16 bytes")
        tag, channels, rate, _byte_rate, block_align, bits = struct.unpack("<HHLLHH", header)
        mask = 0
        if tag == WAVE_FORMAT_EXTENSIBLE:
            extension = chunk.read(24)
            if len(extension) < 24:
                raise InvalidWav("WAV header is corrupt: EXTENSIBLE fmt chunk too short")
            _size, _valid_bits, mask = struct.unpack("<HHL", extension[:8])
            guid = extension[8:]
            if guid[2:] != KSDATAFORMAT_SUFFIX:
                raise UnsupportedWav(f"unsupported WAV encoding: EXTENSIBLE sub-format {guid.hex()}")
            tag = struct.unpack("<H", guid[:2])[0]
        if tag not in ENCODINGS:
            raise UnsupportedWav(f"unsupported WAV encoding: {format_name(tag)}")
        encoding_name, widths = ENCODINGS[tag]
        width = (bits + 7) // 8
        if width not in widths:
            raise UnsupportedWav(f"unsupported WAV encoding: {bits}-bit {encoding_name}")
        if channels == 0:
            raise InvalidWav("WAV header is corrupt: zero channels")
        if block_align != channels * width:
            raise InvalidWav(
                f"WAV header is corrupt: block align {block_align} is not {channels} channels x {width} bytes"
            )
        if not MIN_RATE <= rate <= MAX_RATE:
            raise InvalidWav(f"sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE}")
        self.format = WavFormat(tag, channels, rate, width, mask)
        # What the stdlib reader itself needs to walk and count frames.
        self._nchannels, self._framerate, self._sampwidth = channels, rate, width
        self._framesize = channels * width
        self._comptype, self._compname = "NONE", "not compressed"


# Sample conversion ##################################################################
# LAME takes interleaved 16-bit PCM in one or two channels. Every conversion below is a
# table lookup, a strided view or one matrix product: numpy, never a loop per sample.


def _g711_tables() -> tuple[np.ndarray, np.ndarray]:
    """ITU-T G.711 decoding, computed for all 256 code words at once."""
    code = np.arange(256, dtype=np.int32)
    u = ~code & 0xFF
    exponent, mantissa = (u >> 4) & 7, u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    mulaw = np.where(u & 0x80, -magnitude, magnitude)
    a = code ^ 0x55
    exponent, mantissa = (a >> 4) & 7, a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    alaw = np.where(a & 0x80, magnitude, -magnitude)
    return alaw.astype(np.int16), mulaw.astype(np.int16)


ALAW_TO_PCM16, MULAW_TO_PCM16 = _g711_tables()
UNSIGNED8_TO_PCM16 = ((np.arange(256, dtype=np.int32) - 128) << 8).astype(np.int16)
BYTE_TABLES = {WAVE_FORMAT_PCM: UNSIGNED8_TO_PCM16, WAVE_FORMAT_ALAW: ALAW_TO_PCM16, WAVE_FORMAT_MULAW: MULAW_TO_PCM16}

# ITU-R BS.775 downmix: centre and surrounds at -3 dB into their side, LFE dropped. Keyed by
# the WAVE_FORMAT_EXTENSIBLE speaker bit; a file without a mask uses the bits in order.
MINUS_3DB = 0.7071
SPEAKER_GAINS = {
    0: (1.0, 0.0),  # front left
    1: (0.0, 1.0),  # front right
    2: (MINUS_3DB, MINUS_3DB),  # front centre
    3: (0.0, 0.0),  # LFE
    4: (MINUS_3DB, 0.0),  # back left
    5: (0.0, MINUS_3DB),  # back right
    6: (1.0, 0.0),  # front left of centre
    7: (0.0, 1.0),  # front right of centre
    8: (MINUS_3DB, MINUS_3DB),  # back centre
    9: (MINUS_3DB, 0.0),  # side left
    10: (0.0, MINUS_3DB),  # side right
    11: (MINUS_3DB, MINUS_3DB),  # top centre
    12: (MINUS_3DB, 0.0),  # top front left
    13: (MINUS_3DB, MINUS_3DB),  # top front centre
    14: (0.0, MINUS_3DB),  # top front right
    15: (MINUS_3DB, 0.0),  # top back left
    16: (MINUS_3DB, MINUS_3DB),  # top back centre
    17: (0.0, MINUS_3DB),  # top back right
}


@functools.lru_cache(maxsize=64)
def downmix_matrix(channels: int, mask: int) -> np.ndarray:
    """(channels x 2) gains folding any layout to stereo; channels beyond the mask go to both sides."""
    bits = [bit for bit in range(32) if mask >> bit & 1] if mask else list(range(channels))
    bits = (bits + [-1] * channels)[:channels]
    gains = [SPEAKER_GAINS.get(bit, (0.5, 0.5)) for bit in bits]
    return np.array(gains, dtype=np.float32)


def to_pcm16(frames: bytes | memoryview, fmt: WavFormat) -> bytes:
    """Whole frames of any supported encoding -> interleaved 16-bit PCM, mono or stereo."""
    width, encoding = fmt.sample_width, fmt.encoding
    if encoding in BYTE_TABLES and width == 1:
        samples = BYTE_TABLES[encoding][np.frombuffer(frames, dtype=np.uint8)]
    elif encoding == WAVE_FORMAT_PCM and width == 2:
        if fmt.channels <= 2:
            return bytes(frames)
        samples = np.frombuffer(frames, dtype="<i2")
    elif encoding == WAVE_FORMAT_PCM and width == 3:
        # The two high bytes of each little-endian 24-bit sample are its 16-bit value
        # (column copies: several times faster than one fancy-indexed copy).
        triples = np.frombuffer(frames, dtype=np.uint8).reshape(-1, 3)
        pairs = np.empty((len(triples), 2), dtype=np.uint8)
        pairs[:, 0], pairs[:, 1] = triples[:, 1], triples[:, 2]
        samples = pairs.view("<i2").ravel()
    elif encoding == WAVE_FORMAT_PCM and width == 4:
        samples = np.frombuffer(frames, dtype="<i2")[1::2]
    else:  # IEEE float, 32 or 64 bit: NaN to silence, clip to [-1, 1], scale in place
        samples = np.frombuffer(frames, dtype="<f4" if width == 4 else "<f8").astype(np.float32)
        np.nan_to_num(samples, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
        np.clip(samples, -1.0, 1.0, out=samples)
        np.multiply(samples, 32767.0, out=samples)
    if fmt.channels > 2:
        matrix = downmix_matrix(fmt.channels, fmt.channel_mask)
        surround = samples.reshape(-1, fmt.channels).astype(np.float32, copy=False)
        stereo = np.empty((len(surround), 2), dtype=np.float32)
        np.dot(surround, matrix, out=stereo)  # BLAS; `@` takes a slow path for this shape
        samples = np.clip(stereo, -32768.0, 32767.0, out=stereo).astype(np.int16)  # clipped, not wrapped
    return samples.astype("<i2", copy=False).tobytes()  # float samples are already in range


# Encoding ###########################################################################


@dataclasses.dataclass(frozen=True)
class Conversion:
    frames: int
    rate: int
    mp3_bytes: int
    sha256: str
    seconds: float  # wall time of the conversion

    @property
    def duration_seconds(self) -> float:
        return self.frames / self.rate


def convert_wav(source: Readable, sink: IO[bytes], bitrate: int, quality: int) -> Conversion:
    """Read a WAV from `source` (read(n) only), write its MP3 to `sink`, block by block."""
    started = time.perf_counter()
    reader = WavReader(source)  # type: ignore[arg-type]  # wave only calls read()
    fmt = reader.format
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(bitrate)
    encoder.set_in_sample_rate(fmt.rate)
    encoder.set_channels(min(fmt.channels, 2))
    encoder.set_quality(quality)
    digest = hashlib.sha256()
    frames = mp3_bytes = data_bytes = 0
    block_frames = max(1, READ_BLOCK_BYTES // fmt.frame_size)

    def emit(mp3: bytes) -> None:
        nonlocal mp3_bytes
        sink.write(mp3)
        digest.update(mp3)
        mp3_bytes += len(mp3)

    while block := reader.readframes(block_frames):
        data_bytes += len(block)
        whole = len(block) - len(block) % fmt.frame_size  # a streamed file may end mid-frame
        if whole:
            frames += whole // fmt.frame_size
            emit(encoder.encode(to_pcm16(memoryview(block)[:whole], fmt)))
    declared = reader.declared_data_bytes
    if declared is not None and data_bytes < declared - declared % fmt.frame_size:
        raise InvalidWav(f"WAV is truncated: data chunk declares {declared} bytes, {data_bytes} arrived")
    if frames == 0:
        raise InvalidWav("WAV has no audio frames")
    emit(encoder.flush())
    return Conversion(frames, fmt.rate, mp3_bytes, digest.hexdigest(), time.perf_counter() - started)


# Streaming plumbing #################################################################


class AudioPipe:
    """Bounded byte pipe: the event loop writes the upload, the converter thread reads it.

    When the pipe is full the writer awaits, so the server stops reading the socket and TCP
    slows the client down: memory stays at PIPE_CAPACITY whatever the file size.
    """

    def __init__(self, capacity: int = PIPE_CAPACITY) -> None:
        self._loop = asyncio.get_running_loop()
        self._capacity = capacity
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = self._aborted = self._reader_gone = self._writer_waiting = False
        self._cond = threading.Condition()
        self._space = asyncio.Event()
        self.bytes_in = 0

    async def write(self, data: bytes) -> None:
        self.bytes_in += len(data)
        while True:
            with self._cond:
                if self._reader_gone or self._aborted:
                    return  # nobody reads any more: the rest of the part is discarded
                if self._buffered < self._capacity:
                    self._chunks.append(data)
                    self._buffered += len(data)
                    self._cond.notify()
                    return
                self._space.clear()
                self._writer_waiting = True
            await self._space.wait()

    def close(self) -> None:
        """End of the audio part: the reader sees end of file."""
        with self._cond:
            self._eof = True
            self._cond.notify()

    def abort(self) -> None:
        """The request is refused or gone: the reader raises UploadAborted."""
        with self._cond:
            self._aborted = True
            self._chunks.clear()
            self._cond.notify()

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes, fewer only at end of file (what wave's chunk reader expects)."""
        with self._cond:
            want = self._capacity if size < 0 else min(size, self._capacity)
            while self._buffered < want and not self._eof and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise UploadAborted()
            pieces, taken = [], 0
            while self._chunks and taken < want:
                chunk = self._chunks.popleft()
                if len(chunk) > want - taken:
                    self._chunks.appendleft(chunk[want - taken :])
                    chunk = chunk[: want - taken]
                pieces.append(chunk)
                taken += len(chunk)
            self._buffered -= taken
            self._wake_writer()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def reader_done(self) -> None:
        with self._cond:
            self._reader_gone = True
            self._chunks.clear()
            self._buffered = 0
            self._wake_writer()

    def _wake_writer(self) -> None:
        if self._writer_waiting and self._buffered < self._capacity:
            self._writer_waiting = False
            self._loop.call_soon_threadsafe(self._space.set)


def _spool() -> IO[bytes]:
    """In memory up to SPOOL_MEMORY_BYTES, then an unnamed file on disk; its owner closes it."""
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)


class _KeepingCopy:
    """Reads from `source` and keeps a copy of what it read, up to `limit` bytes.

    Parts may come in any order, so `bitrate` can arrive after the audio has been encoded at
    the default: the copy lets the WAV be encoded again (files up to `limit` only).
    """

    def __init__(self, source: Readable, limit: int) -> None:
        self._source, self._limit = source, limit
        self.copy: IO[bytes] | None = _spool()

    def read(self, size: int = -1, /) -> bytes:
        data = self._source.read(size)
        if self.copy is not None:
            if self.copy.tell() + len(data) > self._limit:
                self.discard()
            else:
                self.copy.write(data)
        return data

    def discard(self) -> None:
        if self.copy is not None:
            self.copy.close()
            self.copy = None

    def rewound(self) -> IO[bytes] | None:
        """The whole WAV, ready to read again, or None if it outgrew `limit`."""
        if self.copy is not None:
            self.copy.seek(0)
        return self.copy


@dataclasses.dataclass
class Converted:
    """A finished conversion: its figures, the MP3, and maybe a copy of the WAV it came from."""

    conversion: Conversion
    mp3: IO[bytes]
    wav_copy: IO[bytes] | None = None

    def close(self) -> None:
        self.mp3.close()
        if self.wav_copy is not None:
            self.wav_copy.close()


def convert_to_spool(source: Readable, bitrate: int, quality: int) -> tuple[Conversion, IO[bytes]]:
    mp3 = _spool()
    try:
        conversion = convert_wav(source, mp3, bitrate, quality)
    except BaseException:
        mp3.close()
        raise
    mp3.seek(0)
    return conversion, mp3


def convert_upload(pipe: AudioPipe, bitrate: int, quality: int, keep_wav: bool) -> Converted:
    """Worker-thread side of an upload: the MP3 lands in a spooled temporary file."""
    keeper = _KeepingCopy(pipe, KEEP_WAV_BYTES) if keep_wav else None
    try:
        conversion, mp3 = convert_to_spool(keeper or pipe, bitrate, quality)
    except BaseException:
        if keeper is not None:
            keeper.discard()
        raise
    finally:
        pipe.reader_done()
    return Converted(conversion, mp3, keeper.rewound() if keeper is not None else None)


# SQL ################################################################################
# Portable text: the same statements run on SQLite and PostgreSQL (see schema.sql).

# Users are created in batches (see Store.create_user): one statement, one commit for all the
# requests that arrived together; RETURNING names the rows that were new.
SQL_INSERT_USERS = "INSERT INTO users (id, name, token_sha256, created_at) VALUES {rows} ON CONFLICT (name) DO NOTHING RETURNING id"
SQL_INSERT_USERS_ROW = "(:id{n}, :name{n}, :token_sha256{n}, :created_at{n})"
SQL_USER_TOKEN = "SELECT token_sha256 FROM users WHERE id = :id"
SQL_RECORD_NAME_TAKEN = "SELECT 1 FROM records WHERE user_id = :user_id AND filename = :filename"
SQL_INSERT_RECORD = (
    "INSERT INTO records (id, user_id, filename, size_bytes, duration_seconds, sha256, created_at)"
    " VALUES (:id, :user_id, :filename, :size_bytes, :duration_seconds, :sha256, :created_at)"
)
SQL_INSERT_CHUNK = "INSERT INTO record_chunks (record_id, seq, data) VALUES (:record_id, :seq, :data)"
SQL_FIND_RECORD = "SELECT filename, size_bytes, sha256 FROM records WHERE id = :id AND user_id = :user_id"
SQL_RECORD_CHUNKS = (
    "SELECT seq, data FROM record_chunks WHERE record_id = :record_id AND seq >= :first AND seq <= :last ORDER BY seq"
)
SQL_PING = "SELECT 1"


# Storage ############################################################################

T = TypeVar("T")
# Worth waiting out at start-up: the database is still starting, or another replica is
# creating the same tables at the same moment (PostgreSQL's catalog then reports a duplicate).
RETRY_AT_STARTUP = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.UniqueViolationError,
)
UNIQUE_VIOLATIONS: tuple[type[BaseException], ...] = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class _SQLiteConnection(sqlite3.Connection):
    """`databases` opens SQLite connections itself; this factory gives each one our pragmas."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA foreign_keys = ON")


class _SQLitePool:
    """Keeps SQLite connections open between requests.

    `databases` (0.9) opens a new aiosqlite connection, with a thread of its own, for every
    request and closes it afterwards; that costs more than the query. This stands in for its
    pool with the same two methods, keeping up to `size` idle connections.
    """

    _memref = None  # read by databases' SQLiteBackend.disconnect

    def __init__(self, path: str, size: int, **options: Any) -> None:
        self._path, self._size, self._options = path, size, options
        self._idle: list[aiosqlite.Connection] = []

    async def acquire(self) -> aiosqlite.Connection:
        if self._idle:
            return self._idle.pop()
        connection = aiosqlite.connect(self._path, isolation_level=None, **self._options)
        await connection.__aenter__()
        return connection

    async def release(self, connection: aiosqlite.Connection) -> None:
        if connection.in_transaction:  # a request cancelled mid-transaction
            await connection.rollback()
        if len(self._idle) < self._size:
            self._idle.append(connection)
        else:
            await connection.close()

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().close()


class Blob(bytes):
    """Chunk bytes with a short repr.

    databases (0.9) formats every query's arguments with repr() for its debug log, whether
    or not debug logging is on: for a 256 KiB chunk that is ~1.5 ms of the event loop.
    """

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@dataclasses.dataclass(frozen=True)
class StoredRecord:
    filename: str
    size_bytes: int
    sha256: str


class Store:
    """Users and records in SQLite or PostgreSQL, through `databases` and raw SQL."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.is_sqlite = url.startswith("sqlite")
        self._pending_users: list[tuple[dict[str, str], asyncio.Future[bool]]] = []
        self._user_writer: asyncio.Task[None] | None = None
        # SQLite has one writer at a time; queueing our writes here spares them the busy
        # handler's sleeps (it polls with growing naps). Other processes still meet the
        # busy timeout. PostgreSQL takes concurrent writers as they come.
        self.write_lock: asyncio.Lock | contextlib.AbstractAsyncContextManager[None]
        if self.is_sqlite:
            # The busy timeout ends a blocked statement a little before `_call` gives up on it, so
            # nothing commits after its request has been answered 503.
            options: dict[str, Any] = {"factory": _SQLiteConnection, "timeout": 0.9 * timeout}
            self.database = databases.Database(url)
            self.sqlite_pool = _SQLitePool(databases.DatabaseURL(url).database, 32, **options)
            self.database._backend._pool = self.sqlite_pool  # type: ignore[attr-defined]
            self.write_lock = asyncio.Lock()
        else:
            options = {"min_size": 1, "max_size": 20, "timeout": timeout, "command_timeout": timeout}
            self.database = databases.Database(url, **options)
            self.write_lock = contextlib.nullcontext()

    async def connect(self, deadline: float) -> None:
        """Connect and apply schema.sql, retrying until the database answers or `deadline`."""
        delay = 0.25
        while True:
            try:
                if not self.database.is_connected:
                    await asyncio.wait_for(self.database.connect(), self.timeout)
                await self.apply_schema()
                return
            except RETRY_AT_STARTUP as error:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("database not ready (%s); retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def apply_schema(self) -> None:
        if self.is_sqlite:
            # WAL: readers never block the writer; the mode is stored in the file.
            await self.database.execute("PRAGMA journal_mode = WAL")
        schema = (Path(__file__).with_name("schema.sql")).read_text()
        for statement in schema.split(";"):
            if statement.strip():
                await self.database.execute(statement)

    async def disconnect(self) -> None:
        if self.database.is_connected:
            await self.database.disconnect()
        if self.is_sqlite:
            await self.sqlite_pool.close()

    async def _call(self, operation: Awaitable[T]) -> T:
        """One database call, bounded in time; an outage becomes 503, a constraint stays itself."""
        try:
            async with asyncio.timeout(self.timeout):
                return await operation
        except UNIQUE_VIOLATIONS:
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, sqlite3.Error) as error:
            log.error("database call failed: %r", error)
            raise Unavailable("database unavailable") from None

    async def ping(self) -> None:
        await self._call(self.database.fetch_val(SQL_PING))

    async def create_user(self, name: str) -> tuple[str, str] | None:
        """(user id, access token) of a new user, or None if the name is taken.

        Group commit: requests that arrive while a batch is being written wait for the next
        one, so a burst costs one INSERT and one commit (one fsync) per batch instead of per
        user. The UNIQUE constraint still decides every race, also across processes.
        """
        user_id, token = str(uuid.uuid4()), str(uuid.uuid4())
        values = {"id": user_id, "name": name, "token_sha256": _hash_token(token), "created_at": _now()}
        created: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending_users.append((values, created))
        if self._user_writer is None or self._user_writer.done():
            self._user_writer = asyncio.create_task(self._write_users())
        return (user_id, token) if await created else None

    async def _write_users(self) -> None:
        while self._pending_users:
            batch = self._pending_users[:USER_BATCH]
            del self._pending_users[:USER_BATCH]
            rows = ", ".join(SQL_INSERT_USERS_ROW.format(n=n) for n in range(len(batch)))
            values = {f"{key}{n}": value for n, (row, _) in enumerate(batch) for key, value in row.items()}
            try:
                async with self.write_lock:
                    inserted = {row["id"] for row in await self._call(self.database.fetch_all(SQL_INSERT_USERS.format(rows=rows), values))}
            except Exception as error:  # noqa: BLE001 -- every waiting request gets the batch's answer (503)
                for _, created in batch:
                    if not created.done():
                        created.set_exception(error)
                continue
            for row, created in batch:
                if not created.done():  # its request may have been cancelled meanwhile
                    created.set_result(row["id"] in inserted)

    async def check_credentials(self, user_id: str, token: str) -> bool:
        stored = await self._call(self.database.fetch_val(SQL_USER_TOKEN, {"id": user_id}))
        # Compare even for an unknown user, so the answer takes the same time either way.
        return hmac.compare_digest(stored or "0" * 64, _hash_token(token)) and stored is not None

    async def record_name_taken(self, user_id: str, filename: str) -> bool:
        row = await self._call(self.database.fetch_val(SQL_RECORD_NAME_TAKEN, {"user_id": user_id, "filename": filename}))
        return row is not None

    async def save_record(self, record: dict[str, Any], mp3: IO[bytes]) -> None:
        """The record row and all its chunks in one transaction; Conflict if the name is taken."""
        try:
            async with self.write_lock, self.database.transaction():
                # The record row first: on SQLite its INSERT takes the write lock (waiting out
                # the busy timeout), and on a duplicate name nothing else has been written.
                await self._call(self.database.execute(SQL_INSERT_RECORD, record))
                seq = 0
                while batch := await asyncio.to_thread(mp3.read, CHUNK_BYTES * CHUNKS_PER_QUERY):
                    rows = []
                    for offset in range(0, len(batch), CHUNK_BYTES):
                        rows.append({"record_id": record["id"], "seq": seq, "data": Blob(batch[offset : offset + CHUNK_BYTES])})
                        seq += 1
                    await self._call(self.database.execute_many(SQL_INSERT_CHUNK, rows))
        except UNIQUE_VIOLATIONS:
            raise NameTaken(record["filename"]) from None

    async def find_record(self, record_id: str, user_id: str) -> StoredRecord | None:
        row = await self._call(self.database.fetch_one(SQL_FIND_RECORD, {"id": record_id, "user_id": user_id}))
        if row is None:
            return None
        return StoredRecord(row["filename"], int(row["size_bytes"]), row["sha256"])

    async def record_bytes(self, record_id: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes start..end (inclusive) of a record, reading only the chunks that cover them."""
        first, last = start // CHUNK_BYTES, end // CHUNK_BYTES
        for batch_first in range(first, last + 1, CHUNKS_PER_QUERY):
            batch_last = min(last, batch_first + CHUNKS_PER_QUERY - 1)
            values = {"record_id": record_id, "first": batch_first, "last": batch_last}
            rows = await self._call(self.database.fetch_all(SQL_RECORD_CHUNKS, values))
            for row in rows:
                data, offset = bytes(row["data"]), row["seq"] * CHUNK_BYTES
                lo, hi = max(start - offset, 0), min(end - offset + 1, len(data))
                yield data[lo:hi]


# HTTP helpers #######################################################################

CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def error_response(error: HTTPError) -> JSONResponse:
    headers = {}
    if isinstance(error, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{error.size}"  # RFC 9110 §15.5.17
    if isinstance(error, (Stalled, TooLarge)):
        headers["Connection"] = "close"  # the rest of the body is not read
    return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)


def parse_uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        return None


def parse_json(body: bytes | bytearray, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        raise Invalid(f"{what} is not valid JSON") from None
    except RecursionError:
        raise Invalid(f"{what} is JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise Invalid(f"{what} must be a JSON object")
    return value


def valid_text(value: str) -> bool:
    """Encodable as UTF-8 (no lone surrogates from JSON escapes) and free of control characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return CONTROL_CHARS.search(value) is None


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single `bytes=` range as (first, last), or None to send the whole body.

    RFC 9110 §14.2: a server MAY ignore Range, so multiple ranges and unparsable values get
    the full 200; a well-formed range that starts past the end is 416.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash or not (first_text.isdigit() or first_text == "") or not (last_text.isdigit() or last_text == ""):
        return None
    if first_text == "":
        if last_text == "":
            return None
        suffix = int(last_text)
        if suffix == 0:
            raise RangeNotSatisfiable(size)
        return max(size - suffix, 0), size - 1
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None  # invalid range-spec: ignored
    if first >= size:
        raise RangeNotSatisfiable(size)
    return first, min(int(last_text), size - 1) if last_text else size - 1


def etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match uses the weak comparison (RFC 9110 §13.1.2): W/ prefixes are ignored."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return etag in tags


def content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII fallback, then the exact name in RFC 8187 `filename*`."""
    decomposed = unicodedata.normalize("NFKD", filename)
    ascii_name = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in decomposed if not unicodedata.combining(c))
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


def mp3_name(filename: str) -> str:
    stem, dot, _suffix = filename.rpartition(".")
    return f"{stem if dot and stem else filename}.mp3"


def clean_filename(raw: bytes) -> str:
    """The name a client sent, less any directories; 422 when nothing sensible remains."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("audio_file name is not valid UTF-8") from None
    name = re.split(r"[/\\]", name)[-1]
    if name in ("", ".", ".."):
        raise Invalid("audio_file has an empty file name")
    if CONTROL_CHARS.search(name):
        raise Invalid("audio_file name contains control characters")
    if len(name.encode("utf-8")) > MAX_FILENAME_BYTES:
        raise Invalid(f"audio_file name is longer than {MAX_FILENAME_BYTES} bytes")
    return name


def base_url(request: Request, settings: Settings) -> str:
    if settings.public_url:
        return settings.public_url
    return f"{request.url.scheme}://{request.url.netloc}"


async def read_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"request body is larger than {limit} bytes")
    return bytes(body)


# Upload parsing #####################################################################


class Upload:
    """One POST /users/wav, parsed as its bytes arrive.

    Parts may come in any order. When `data` comes before the audio (httpx and curl send
    fields first) the credentials and the file name are checked before any audio is decoded;
    a refused request then only reads and discards the rest of its body, and is answered
    once the body has been read (a client still sending rarely sees an early answer).
    """

    def __init__(self, request: Request, services: Services) -> None:
        self.request = request
        self.services = services
        content_type, params = parse_options_header(request.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if content_type != b"multipart/form-data" or not boundary:
            raise Invalid("request must be multipart/form-data with a boundary")
        self.events: list[tuple[str, Any]] = []  # what the parser saw in the latest chunk
        self.headers: dict[bytes, bytes] = {}
        self.header_field = bytearray()
        self.header_value = bytearray()
        try:
            self.parser: MultipartParser | None = MultipartParser(
                boundary, self._callbacks(), max_header_count=16, max_header_size=8192  # type: ignore[arg-type]
            )
        except ValueError:
            raise Invalid("multipart boundary is invalid") from None
        self.part: str | None = None  # name of the part being received, if one we use
        self.field = bytearray()
        self.parts = 0
        self.received = 0  # body bytes read so far
        self.complete = False
        self.refusal: HTTPError | None = None
        self.user_id: str | None = None
        self.credentials_ok = False
        self.bitrate: int | None = None  # from the form, if sent
        self.encoded_bitrate = 0  # what the conversion under way uses
        self.filename: str | None = None
        self.pipe: AudioPipe | None = None
        self.conversion: asyncio.Future[Converted] | None = None

    def _callbacks(self) -> dict[str, Callable[..., None]]:
        events = self.events

        def on_header_field(data: bytes, start: int, end: int) -> None:
            self.header_field += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            self.header_value += data[start:end]

        def on_header_end() -> None:
            self.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
            self.header_field.clear()
            self.header_value.clear()

        def on_headers_finished() -> None:
            events.append(("headers", self.headers))
            self.headers = {}

        return {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": lambda data, start, end: events.append(("data", data[start:end])),
            "on_part_end": lambda: events.append(("end", None)),
            "on_end": lambda: events.append(("done", None)),
        }

    def refuse(self, error: HTTPError) -> None:
        """Keep the first refusal, stop converting and parsing: the rest of the body is discarded."""
        if self.refusal is None:
            self.refusal = error
        self.parser = None
        if self.pipe is not None:
            self.pipe.abort()

    async def receive(self) -> None:
        limit = self.services.settings.max_upload_bytes
        declared = self.request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"request body is larger than the {limit // MIB} MiB limit")
        stream = self.request.stream().__aiter__()
        while True:
            try:
                async with asyncio.timeout(self.services.settings.upload_idle_timeout):
                    chunk = await stream.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise Stalled(f"upload stalled for {self.services.settings.upload_idle_timeout:g} s") from None
            self.received += len(chunk)
            if self.received > limit:
                raise TooLarge(f"request body is larger than the {limit // MIB} MiB limit")
            if self.parser is None:
                continue
            try:
                self.parser.write(chunk)
            except MultipartParseError:
                self.refuse(Invalid("multipart body is malformed"))
            try:
                for kind, value in self.events:
                    if self.refusal is None:
                        await self._handle(kind, value)
            except HTTPError as error:
                self.refuse(error)
            finally:
                self.events.clear()

    async def _handle(self, kind: str, value: Any) -> None:
        if kind == "headers":
            await self._begin_part(value)
        elif kind == "data":
            if self.part == "audio_file":
                assert self.pipe is not None
                await self.pipe.write(value)
            elif self.part is not None:
                self.field += value
                if len(self.field) > MAX_FIELD_BYTES:
                    raise Invalid(f"form field {self.part!r} is larger than {MAX_FIELD_BYTES} bytes")
        elif kind == "end":
            await self._end_part()
        elif kind == "done":
            self.complete = True

    async def _begin_part(self, headers: dict[bytes, bytes]) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise Invalid(f"more than {MAX_PARTS} multipart parts")
        disposition, params = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            raise Invalid("a multipart part has no Content-Disposition: form-data name")
        name = params[b"name"].decode("latin-1")
        self.part, self.field = None, bytearray()
        if name == "audio_file":
            if self.pipe is not None:
                raise Invalid("more than one audio_file part")
            if b"filename" not in params:
                raise Invalid("audio_file part has no filename")
            self.filename = clean_filename(params[b"filename"])
            if self.credentials_ok:
                await self._check_name_free()
            self.part = "audio_file"
            self._start_conversion()
        elif name in ("data", "bitrate"):
            self.part = name

    async def _end_part(self) -> None:
        part, self.part = self.part, None
        if part == "audio_file":
            assert self.pipe is not None
            self.pipe.close()
        elif part == "data":
            await self._check_credentials(bytes(self.field))
        elif part == "bitrate":
            text = self.field.decode("latin-1").strip()
            if not text.isdigit() or int(text) not in MP3_BITRATES:
                raise Invalid(f"bitrate must be one of {', '.join(map(str, MP3_BITRATES))}")
            self.bitrate = int(text)

    async def _check_credentials(self, body: bytes) -> None:
        if self.user_id is not None:
            raise Invalid("more than one data part")
        payload = parse_json(body, "data")
        user_id, token = payload.get("user_id"), payload.get("access_token")
        if not isinstance(user_id, str) or not isinstance(token, str):
            raise Invalid("data must hold string fields user_id and access_token")
        self.user_id, token = parse_uuid(user_id), parse_uuid(token)
        if self.user_id is None or token is None:
            raise Invalid("user_id and access_token must be UUIDs")
        if not await self.services.store.check_credentials(self.user_id, token):
            raise Forbidden("unknown user_id or wrong access_token")
        self.credentials_ok = True
        if self.filename is not None:
            await self._check_name_free()

    async def _check_name_free(self) -> None:
        # Saves the conversion when the answer is already known; the UNIQUE constraint decides races.
        assert self.user_id is not None and self.filename is not None
        if await self.services.store.record_name_taken(self.user_id, self.filename):
            raise NameTaken(self.filename)

    def _start_conversion(self) -> None:
        settings = self.services.settings
        self.pipe = AudioPipe()
        self.encoded_bitrate = self.bitrate or settings.mp3_bitrate
        self.conversion = asyncio.get_running_loop().run_in_executor(
            self.services.converters,
            convert_upload,
            self.pipe,
            self.encoded_bitrate,
            settings.mp3_quality,
            self.bitrate is None,  # no bitrate yet: one may still come, keep the WAV
        )

    async def result(self) -> Converted:
        """After the body: the finished conversion, or the error that answers the request."""
        if self.refusal is not None:
            raise self.refusal
        if not self.complete:
            raise Invalid("multipart body ended before its closing boundary")
        if self.user_id is None:
            raise Invalid("the data part is missing")
        if self.conversion is None:
            raise Invalid("the audio_file part is missing")
        converted = await self.conversion
        if self.bitrate is None or self.bitrate == self.encoded_bitrate:
            return converted
        # `bitrate` came after the audio: encode the kept WAV again, at the asked bitrate.
        if converted.wav_copy is None:
            raise Invalid(f"send the bitrate part before audio_file for files over {KEEP_WAV_BYTES // MIB} MiB")
        converted.mp3.close()
        loop = asyncio.get_running_loop()
        quality = self.services.settings.mp3_quality
        converted.conversion, converted.mp3 = await loop.run_in_executor(
            self.services.converters, convert_to_spool, converted.wav_copy, self.bitrate, quality
        )
        return converted

    async def discard(self) -> None:
        """Whatever happened, leave nothing behind: stop the converter and drop its spools."""
        if self.conversion is None:
            return
        if self.pipe is not None and not self.conversion.done():
            self.pipe.abort()
        with contextlib.suppress(BaseException):
            (await self.conversion).close()

    async def drain(self, limit: int) -> None:
        """Read and drop up to `limit` more bytes, so a client still sending can read our answer."""
        stream = self.request.stream().__aiter__()
        with contextlib.suppress(Exception):  # a stall or a disconnect ends the favour
            while limit >= 0:
                async with asyncio.timeout(self.services.settings.upload_idle_timeout):
                    limit -= len(await stream.__anext__())


# Endpoints ##########################################################################


@dataclasses.dataclass
class Services:
    settings: Settings
    store: Store
    converters: ThreadPoolExecutor


def services_of(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def create_user(request: Request) -> Response:
    """Create a user: 201 with its id and the access token, shown this once."""
    store = services_of(request).store
    payload = parse_json(await read_body(request, MAX_JSON_BODY), "body")
    name = payload.get("name")
    if not isinstance(name, str):
        raise Invalid("name is required and must be a string")
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise Invalid(f"name must be 1..{MAX_NAME_CHARS} characters")
    if not valid_text(name):
        raise Invalid("name must not contain control characters")
    created = await store.create_user(name)
    if created is None:
        # The seed's answer, kept as it was for its clients.
        return JSONResponse({"error_name": "user with name already is"}, status_code=200)
    user_id, token = created
    return JSONResponse({"user_id": user_id, "access_token": token}, status_code=201)


async def upload_wav(request: Request) -> Response:
    """Upload a WAV (multipart: data, audio_file, optional bitrate): 201 with the MP3's link."""
    services = services_of(request)
    upload = Upload(request, services)
    try:
        try:
            await upload.receive()
        except TooLarge:
            # A client that asked "Expect: 100-continue" waits for our verdict before sending
            # the body: answer at once. Any other client is mid-body: read some of it first.
            if request.headers.get("expect", "").lower() != "100-continue" or upload.received:
                await upload.drain(DRAIN_LIMIT_BYTES)
            raise
        converted = await upload.result()
        conversion = converted.conversion
        assert upload.user_id is not None and upload.filename is not None and upload.pipe is not None
        record_id = str(uuid.uuid4())
        record = {
            "id": record_id,
            "user_id": upload.user_id,
            "filename": upload.filename,
            "size_bytes": conversion.mp3_bytes,
            "duration_seconds": conversion.duration_seconds,
            "sha256": conversion.sha256,
            "created_at": _now(),
        }
        await services.store.save_record(record, converted.mp3)
    except ClientDisconnect:
        log.info("upload abandoned: client disconnected mid-upload; nothing stored")
        return Response(status_code=400)
    finally:
        await upload.discard()
    log.info(
        "converted record=%s audio=%.2fs in=%d out=%d wall=%.3fs",
        record_id, conversion.duration_seconds, upload.pipe.bytes_in, conversion.mp3_bytes, conversion.seconds,
    )  # fmt: skip
    url = f"{base_url(request, services.settings)}/record?id={record_id}&user={upload.user_id}"
    body = {
        "url": url,
        "record_id": record_id,
        "user_id": upload.user_id,
        "filename": mp3_name(upload.filename),
        "duration_seconds": round(conversion.duration_seconds, 6),
        "size_bytes": conversion.mp3_bytes,
        "sha256": conversion.sha256,
    }
    return JSONResponse(body, status_code=201, headers={"Location": url})


async def get_record(request: Request) -> Response:
    """Download a record's MP3 (GET or HEAD); single byte ranges, ETag and If-None-Match."""
    store = services_of(request).store
    record_param, user_param = request.query_params.get("id"), request.query_params.get("user")
    if record_param is None or user_param is None:
        raise Invalid("query parameters id and user are required")
    record_id, user_id = parse_uuid(record_param), parse_uuid(user_param)
    record = await store.find_record(record_id, user_id) if record_id and user_id else None
    if record is None or record_id is None:
        raise NotFound("no such record for this user")
    etag = f'"{record.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": content_disposition(mp3_name(record.filename)),
    }
    # RFC 9110 §13.2.2: If-None-Match is evaluated before Range.
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    byte_range = parse_range(request.headers.get("range"), record.size_bytes)
    if_range = request.headers.get("if-range")
    if byte_range is not None and if_range is not None and if_range.strip() != etag:
        byte_range = None  # RFC 9110 §13.1.5: the representation changed, send it whole
    status = 200
    first, last = 0, record.size_bytes - 1
    if byte_range is not None:
        status, (first, last) = 206, byte_range
        headers["Content-Range"] = f"bytes {first}-{last}/{record.size_bytes}"
    headers["Content-Length"] = str(last - first + 1)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="audio/mpeg")
    return StreamingResponse(store.record_bytes(record_id, first, last), status_code=status, headers=headers, media_type="audio/mpeg")


async def health(request: Request) -> Response:
    """200 when the database answers, 503 otherwise."""
    await services_of(request).store.ping()
    return JSONResponse({"status": "ok"})


# OpenAPI ############################################################################
# The contract (../shared/contract.md) as OpenAPI 3.0, for clients and for the fuzzer in
# the test suite: every route, parameter, body, status code and header.


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json({"$ref": "#/components/schemas/Error"}, description)


_UNAVAILABLE = _error("the database is unreachable")
_RECORD_HEADERS = {
    "ETag": {"schema": {"type": "string"}, "description": "strong: the MP3's sha256 in quotes"},
    "Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}},
    "Content-Disposition": {"schema": {"type": "string"}, "description": "RFC 6266: ASCII filename and filename*"},
    "Content-Length": {"schema": {"type": "integer"}},
}
_RECORD_PARAMETERS = [
    {"name": "id", "in": "query", "required": True, "schema": {"type": "string"}, "description": "record UUID"},
    {"name": "user", "in": "query", "required": True, "schema": {"type": "string"}, "description": "owner's user UUID"},
    {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"}, "description": "one bytes= range"},
    {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"}},
]


def _record_responses(body: bool) -> dict[str, Any]:
    audio = {"audio/mpeg": {"schema": {"type": "string", "format": "binary"}}} if body else {}
    return {
        "200": {"description": "the MP3", "headers": _RECORD_HEADERS, **({"content": audio} if body else {})},
        "206": {
            "description": "the requested byte range",
            "headers": {**_RECORD_HEADERS, "Content-Range": {"schema": {"type": "string"}}},
            **({"content": audio} if body else {}),
        },
        "304": {"description": "If-None-Match matched", "headers": {"ETag": _RECORD_HEADERS["ETag"]}},
        "404": _error("no such record for that user, or ids that are not UUIDs"),
        "416": {**_error("range not satisfiable"), "headers": {"Content-Range": {"schema": {"type": "string"}}}},
        "422": _error("id or user missing"),
        "503": _UNAVAILABLE,
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "wav2mp3", "version": "1", "description": "WAV to MP3 conversion over HTTP."},
    "paths": {
        "/users": {
            "post": {
                "summary": "Create a user; the access token is shown only in this answer",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS}},
                            }
                        }
                    },
                },
                "responses": {
                    "201": _json({"$ref": "#/components/schemas/NewUser"}, "the new user"),
                    "200": _json(
                        {"type": "object", "required": ["error_name"], "properties": {"error_name": {"type": "string"}}},
                        "a user with that name exists",
                    ),
                    "413": _error("body larger than 64 KiB"),
                    "422": _error("not JSON, not an object, or a bad name"),
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/users/wav": {
            "post": {
                "summary": "Upload a WAV; answers with the link to its MP3",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["data", "audio_file"],
                                "properties": {
                                    "data": {"type": "string", "description": 'JSON: {"user_id": uuid, "access_token": uuid}'},
                                    "audio_file": {"type": "string", "format": "binary", "description": "the WAV, with a filename"},
                                    "bitrate": {"type": "integer", "enum": list(MP3_BITRATES), "description": "CBR kbps"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "201": {
                        **_json({"$ref": "#/components/schemas/Record"}, "converted and stored"),
                        "headers": {"Location": {"schema": {"type": "string"}, "description": "the same link as url"}},
                    },
                    "403": _error("unknown user_id or wrong access_token"),
                    "408": _error("the client stalled mid-upload"),
                    "409": _error("this user already has a record from a file of that name"),
                    "413": _error("body larger than MAX_UPLOAD_MB"),
                    "415": _error("not RIFF/WAVE, or an unsupported encoding (named)"),
                    "422": _error("malformed parts or data, bad bitrate, or a corrupt, truncated or empty WAV"),
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/record": {
            "get": {"summary": "Download an MP3", "parameters": _RECORD_PARAMETERS, "responses": _record_responses(True)},
            "head": {"summary": "An MP3's headers", "parameters": _RECORD_PARAMETERS, "responses": _record_responses(False)},
        },
        "/health": {
            "get": {
                "summary": "Is the database reachable",
                "responses": {
                    "200": _json({"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok"]}}}, "healthy"),
                    "503": _UNAVAILABLE,
                },
            }
        },
    },
    "components": {
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "NewUser": {
                "type": "object",
                "required": ["user_id", "access_token"],
                "properties": {"user_id": {"type": "string", "format": "uuid"}, "access_token": {"type": "string", "format": "uuid"}},
            },
            "Record": {
                "type": "object",
                "required": ["url", "record_id", "user_id", "filename", "duration_seconds", "size_bytes", "sha256"],
                "properties": {
                    "url": {"type": "string"},
                    "record_id": {"type": "string", "format": "uuid"},
                    "user_id": {"type": "string", "format": "uuid"},
                    "filename": {"type": "string"},
                    "duration_seconds": {"type": "number"},
                    "size_bytes": {"type": "integer"},
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                },
            },
        }
    },
}


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


# Application ########################################################################


async def handle_http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPError)
    if error.status != 304:
        log.info("refused %s %s: %d %s", request.method, request.url.path, error.status, error.message)
    return error_response(error)


async def handle_starlette_error(request: Request, error: Exception) -> Response:
    # Starlette's own 404/405 (unknown path or method) in our JSON shape.
    assert isinstance(error, StarletteHTTPException)
    return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)


async def handle_unexpected(request: Request, error: Exception) -> Response:
    # A bug, not the client's fault: log the trace, never send it.
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
    return JSONResponse({"error": "internal error"}, status_code=500)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = Store(settings.database_url, settings.db_timeout)
        await store.connect(time.monotonic() + settings.db_startup_timeout)
        converters = ThreadPoolExecutor(settings.max_conversions, thread_name_prefix="convert")
        # anyio imports its asyncio backend on first use (StreamingResponse's task group):
        # pay for that here rather than in the first download.
        async with anyio.create_task_group():
            pass
        app.state.services = Services(settings, store, converters)
        try:
            yield
        finally:
            converters.shutdown(wait=True, cancel_futures=True)
            await store.disconnect()

    routes = [
        Route("/users", create_user, methods=["POST"]),
        Route("/users/wav", upload_wav, methods=["POST"]),
        Route("/record", get_record, methods=["GET", "HEAD"]),
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    handlers = {HTTPError: handle_http_error, StarletteHTTPException: handle_starlette_error, Exception: handle_unexpected}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)  # type: ignore[arg-type]


app = create_app()


# Command line #######################################################################


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="wav2mp3: WAV to MP3 over HTTP")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "1")), help="server processes")
    flags = {
        "--database-url": "DATABASE_URL",
        "--public-url": "PUBLIC_URL",
        "--max-upload-mb": "MAX_UPLOAD_MB",
        "--mp3-bitrate": "MP3_BITRATE",
        "--mp3-quality": "MP3_QUALITY",
        "--max-conversions": "MAX_CONVERSIONS",
        "--upload-idle-timeout": "UPLOAD_IDLE_TIMEOUT",
        "--db-timeout": "DB_TIMEOUT",
    }
    for flag, variable in flags.items():
        parser.add_argument(flag, help=f"overrides ${variable}")
    args = parser.parse_args(argv)
    for flag, variable in flags.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            os.environ[variable] = value
    if args.workers > 1 and not os.environ.get("MAX_CONVERSIONS"):
        # The cap is per process: share the CPUs between the workers rather than oversubscribe them.
        os.environ["MAX_CONVERSIONS"] = str(max(1, (os.cpu_count() or 1) // args.workers))
    Settings.from_env()  # fail now, with the message, on a bad setting
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The workers import this module afresh and read the settings from the environment.
    uvicorn.run("wav2mp3:app", host=args.host, port=args.port, workers=args.workers, timeout_keep_alive=30)


if __name__ == "__main__":
    main()
