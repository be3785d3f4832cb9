"""wav2mp3: a small HTTP service that turns WAV recordings into MP3.

Create a user, upload a WAV with the user's id and access token, get back a link that downloads
the MP3 from the database. The upload is converted while it arrives: its chunks are read with
struct, its frames with the stdlib `wave` module, and whole blocks of audio go to a shared pool of
LAME (lameenc) threads, so the MP3 is ready when the upload ends and memory stays flat whatever
the file size. The MP3 is stored in the database (SQLite or PostgreSQL), in one transaction, only
when the whole request has succeeded.

Run:  python wav2mp3.py [--host H] [--port P] [--database-url URL] [--workers N] ...
Every setting is an environment variable and a command-line flag: see `Settings` below, or the
configuration table in README.md (a test keeps the two equal). docs/API.md describes the routes.

How to read this file: an upload goes down the page. First what everything uses (settings,
errors, metrics), then the routes, each endpoint one screen that names its steps (the table of
contents), then those steps in the order POST /users/wav takes them:

     1  client input       numbers, JSON, names and ids, as a client sends them
     2  request bodies     chunk by chunk, within the size limit and the slow-client limits
     3  multipart parts    bytes in, part events out
     4  authentication     the one credential check
     5  the upload form    what the parts of POST /users/wav mean
     6  upload sessions    resumable uploads (tus): a session fed by many requests, its bytes and records
                           through storage (11), as the application (14) holds them
     7  conversion         the shared encoder threads, the memory and disk budgets; UploadSession, one
                           WAV's conversion on them (POST /users/wav feeds one from one request)
     8  WAV reading        the chunk list, as it streams past
     9  samples            any WAV encoding to 16-bit PCM, with numpy
    10  MP3 encoding       LAME through lameenc, the ID3 tag
    11  storage            raw SQL through `databases`
    12  responses          links and tus's headers; the download: Range, ETag, streamed from the database
    13  API documents      OpenAPI from the route declarations, /docs
    14  the application    the app factory and its lifespan, the access log, the storage sweep
    15  command line       main()
    A   work-arounds       every reach into a library's internals, why, and the test that pins it
    B   the LAME tag       libmp3lame's Info/Xing frame, ported

Nothing happens at import: `create_app()` builds the application (uvicorn calls it, factory=True).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import copy
import ctypes
import dataclasses
import email.utils
import errno
import functools
import hashlib
import hmac
import http
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import resource
import secrets
import shutil
import sqlite3
import struct
import sys
import tempfile
import threading
import time
import unicodedata
import uuid
import wave
import zipfile
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final, Literal, TypeVar, cast
from urllib.parse import quote, unquote, unquote_to_bytes, urlencode, urlsplit

import aiosqlite
import anycrc
import anyio
import asyncpg
import databases.backends.sqlite
import lameenc
import mutagen.id3
import numpy as np
import prometheus_client.multiprocess
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("wav2mp3")
T = TypeVar("T")
Endpoint = Callable[[Request], Awaitable[Response]]


# Settings #########################################################################


MIB = 1024 * 1024
MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
MAX_JSON_BODY = 64 * 1024  # body of POST /users
MAX_NAME_CHARS = 128
MAX_TITLE_CHARS = 1024  # of a record's title (its tag's TIT2) as the records list shows it; the tag keeps it whole
SIGNUP_MODES = ("open", "invite", "closed")
MAX_INVITE_USES = 1_000_000
DEFAULT_INVITE_HOURS = 168.0  # an invite code is good for a week unless the operator says otherwise
MAX_ADMIN_PAGE = 1000  # users per page of GET /admin/users
MAX_QUOTA_MB = 2**40  # a quota in bytes stays within a 64-bit integer
MAX_PARTS = 16  # multipart parts per upload (three are meaningful)
MAX_FIELD_BYTES = 8 * 1024  # size of a non-file part (`data` is ~90 bytes, `bitrate` 3): 16 of them are 128 KiB
MAX_FILENAME_BYTES = 255  # as most file systems allow
DRAIN_BYTES = 64 * MIB  # how much of a refused, oversized body is read so that the client sees the answer
ENCODE_BLOCK_BYTES = 256 * 1024  # WAV audio handed to LAME at once: ~1.5 s of CD audio, ~9 ms of encoding
SPOOL_MEMORY_BYTES = 16 * 1024  # an MP3 larger than this is spooled to an unnamed temporary file (within TEMP_DISK_MB)
OVERLOAD_DRAIN = (1 * MIB, 1.0)  # bytes and seconds of a body read before a 503, so that the client can see it
RETRY_AFTER_SECONDS = 5  # what a 503 for the upload cap asks a client to wait
DOWNLOAD_BUFFER_BYTES = 64 * MIB  # chunks all downloads together may hold ahead of their clients
SEND_PIECE_BYTES = 64 * 1024  # a download is written in pieces of this size: the most a connection buffers
LINGER_SECONDS = 1.0  # how long a connection refused at the protocol level is read (and dropped) before it closes
HELD_REFUSAL_SECONDS = 2.0  # how long a connection over its client's share waits, reading nothing, for its 503
MAX_HEAD_BYTES = 64 * 1024  # request line and headers (trailers included), as nginx's large_client_header_buffers 4 16k
MAX_HEAD_LINE_BYTES = 8 * 1024  # one of them: h11's and nginx's line bound
KEEP_ALIVE_SECONDS = 30.0  # an idle kept-alive connection is closed after this
RATE_WINDOW_CLIENTS = 10_000  # client addresses a RateWindow remembers before it forgets the quiet ones
POOL_CLOSE_SECONDS = 5.0  # at shutdown, how long SQLite's pool waits for a connection still lent out
KEEP_WAV_BYTES = 64 * MIB  # audio up to this size is kept on disk (within TEMP_DISK_MB) in case an option follows it
FLUSH_BYTES = 256 * 1024  # a resumable upload's bytes are stored in pieces of this size, and whatever arrived when a request ends
LOCK_WAIT_SECONDS = 1.0  # a request waits this long for another's turn on a resumable upload before 409
MAX_PAUSED_UPLOADS = 32  # paused resumable uploads that keep their live session (LAME's state, ~0.3 MB each)
PAUSED_UPLOAD_SECONDS = 120.0  # a paused resumable upload lets its session go after this; going on re-encodes its stored bytes
CHECKSUMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512, "md5": hashlib.md5}  # Upload-Checksum
TUS_VERSION = "1.0.0"  # the one this service speaks, in Tus-Resumable
DEFERRED = 0  # an upload's length in the database while it is not known (creation-defer-length; 0 is no WAV's length)
TUS_CAPABILITIES = {  # what OPTIONS tells a tus client, as the OpenAPI shows it; the answer has the number in Tus-Max-Size
    "Tus-Version": TUS_VERSION,
    "Tus-Extension": "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum,concatenation",
    "Tus-Max-Size": "MAX_UPLOAD_MB in bytes",
    "Tus-Checksum-Algorithm": ",".join(CHECKSUMS),
}
CHUNK_BYTES = 256 * 1024  # one record_chunks row (GridFS uses 255 KiB; a power of two reads well)
CHUNKS_PER_QUERY = 4  # rows fetched or inserted per round trip: 1 MiB in memory at most
USER_BATCH = 64  # users created by one INSERT (group commit)
DEFAULT_PAGE, MAX_PAGE = 50, 100  # records per page of a listing
SWEEP_SECONDS = 60.0  # how often expired records are deleted and free SQLite pages returned
SWEEP_BATCH = 16  # records deleted per transaction by the sweep: short transactions, requests go between them
SQLITE_FREE_RESERVE_PAGES = 2048  # free pages kept for the next uploads; beyond them the file shrinks
SQLITE_VACUUM_STEP_PAGES = 1024  # pages returned per incremental vacuum step


@dataclasses.dataclass(frozen=True)
class FormOption:
    """An option a client may send with an upload (how to encode, or the tag's version), declared once: it drives the
    parsing, the check for an option sent after the audio, the OpenAPI schema and the table in docs/API.md."""

    name: str
    values: tuple[int, ...]
    meaning: str
    group: str  # options of one group exclude each other: CBR or VBR
    spellings: tuple[str, ...] = ()  # what a client sends for each of `values`, when not the number itself (`2.3` for 3)
    tag_only: bool = False  # changes only the ID3 tag, written at the end: it may come after the audio at no cost

    def parse(self, text: str) -> int:
        if self.spellings:
            if text not in self.spellings:
                raise self.refusal()
            return self.values[self.spellings.index(text)]
        value = parse_count(text, self.name)
        if value not in self.values:
            raise self.refusal()
        return value

    def refusal(self) -> Refused:
        """422 for a value not allowed, saying which are: the words in the text, the values in its holes (translated whole)."""
        if self.is_range:
            return Refused(422, f"{self.name} must be an integer {self.values[0]}..{self.values[-1]}")
        return Refused(422, f"{self.name} must be one of {', '.join(self.choices)}")

    def spelled(self, value: int) -> int | str:
        """A value as a client sends it (and sees it again in GET /users/{user_id}/uploads)."""
        return self.spellings[self.values.index(value)] if self.spellings else value

    @property
    def schema(self) -> dict[str, Any]:
        """Its OpenAPI schema."""
        if self.spellings:
            return {"type": "string", "enum": list(self.spellings), "description": self.meaning}
        return {"type": "integer", "enum": list(self.values), "description": self.meaning}

    @property
    def choices(self) -> tuple[str, ...]:
        """The values as a client writes them."""
        return self.spellings or tuple(map(str, self.values))

    @property
    def is_range(self) -> bool:
        """Whether the values are every integer low..high (more than two), and so written."""
        return not self.spellings and len(self.values) > 2 and self.values == tuple(range(self.values[0], self.values[-1] + 1))

    @property
    def allowed(self) -> str:
        return f"an integer {self.values[0]}..{self.values[-1]}" if self.is_range else "one of " + ", ".join(self.choices)


FORM_OPTIONS = {
    option.name: option
    for option in (
        FormOption("bitrate", MP3_BITRATES, "CBR bit rate in kbps", "mode"),
        FormOption(
            "vbr_quality",
            tuple(range(10)),
            "VBR instead: LAME's `-V`, 0 (best, ~245 kbps) to 9 (smallest, ~65 kbps); 2 (~190 kbps) is LAME's advice. Not with `bitrate`",
            "mode",
        ),
        FormOption(
            "channels",
            (1, 2),
            "1: a mono MP3 (stereo averaged; more channels folded to stereo first); 2: stereo (mono on both sides). Default: as the WAV, at most 2",
            "channels",
        ),
        FormOption(
            "id3_version",
            (3, 4),
            "the ID3 tag's version: 2.4, or 2.3 for players that read only that (older Windows, many car stereos), written as"
            " mutagen writes it (the date as TYER, TDAT and TIME; several values joined by `/`). Default: `ID3_VERSION`."
            " It changes only the tag, so it may come after `audio_file` at no cost",
            "id3_version",
            spellings=("2.3", "2.4"),
            tag_only=True,
        ),
    )
}


def form_options_table() -> str:
    """The options table of docs/API.md, from FORM_OPTIONS (a test keeps the two equal)."""
    rows = ["| part | value | meaning |", "|---|---|---|"]
    rows += [f"| `{option.name}` (optional) | {option.allowed} | {option.meaning} |" for option in FORM_OPTIONS.values()]
    return "\n".join(rows)


def _setting(default: T, meaning: str, parse: Callable[[str], Any] | None = None) -> T:
    """A field of Settings: its environment variable is its name in capitals, its flag --its-name."""
    return dataclasses.field(default=default, metadata={"meaning": meaning, "parse": parse or type(default)})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, declared once: README.md's configuration table is generated from these fields."""

    database_url: str = _setting("sqlite:///./wav2mp3.db", "`sqlite:///path` or `postgresql://user:pw@host:5432/db`")
    public_url: str = _setting(
        "", "base of the links returned (set it behind a proxy); empty: the request's own scheme://host:port", lambda v: v.rstrip("/")
    )
    host: str = _setting("127.0.0.1", "address `python wav2mp3.py` listens on")
    port: int = _setting(8000, "port it listens on")
    workers: int = _setting(1, "server processes (a resumable upload may move between them, re-encoding its stored bytes: scale with replicas)")
    max_upload_mb: int = _setting(4096, "largest request body, MiB (413 above it, with or without `Content-Length`)")
    mp3_bitrate: int = _setting(128, "CBR kbps; the form field `bitrate` overrides it per upload")
    mp3_vbr_quality: int | None = _setting(None, "VBR instead of CBR: LAME `-V`, 0 (best) ... 9; the form fields override it", int)
    mp3_quality: int = _setting(3, "LAME `-q`: 0 (best, slowest) ... 9; 3 is the lame and ffmpeg default")
    id3_version: str = _setting("2.4", "version of the MP3's ID3 tag: `2.4` or `2.3`; the form field `id3_version` overrides it")
    max_conversions: int = _setting(0, "blocks LAME encodes at once per process (its threads; as many again yield the CPU); 0: CPUs / workers")
    max_connections: int = _setting(2048, "open connections per process; beyond: 503 and closed (also held under the open-file limit)")
    max_connections_per_client: int = _setting(64, "of those, from one client address (not counting a trusted proxy's); beyond: 503 in 2 s, closed")
    trusted_proxies: str = _setting(
        "", "addresses or networks (CIDR, comma-separated) of proxies whose `X-Forwarded-For` / `Forwarded` names the client; empty: none"
    )
    header_timeout: float = _setting(20.0, "seconds a client has to send its request headers; then 408 and the connection closed")
    upload_idle_timeout: float = _setting(60.0, "seconds a client may stall mid-upload before it is cut off (408)")
    download_idle_timeout: float = _setting(60.0, "seconds a client may take nothing of a download before it is cut off")
    min_upload_rate: int = _setting(1024, "bytes per second a request body must average over MIN_RATE_WINDOW (408 below it); 0: no minimum")
    min_rate_window: float = _setting(30.0, "seconds of waiting for the client over which MIN_UPLOAD_RATE is averaged")
    max_uploads: int = _setting(256, "uploads converted at once per process; beyond: 503 with Retry-After")
    max_uploads_per_client: int = _setting(32, "of those, from one client address; beyond: 503 with Retry-After")
    max_uploads_per_user: int = _setting(16, "of those, by one user; beyond: 503 with Retry-After")
    user_creations_per_minute: int = _setting(30, "users one client address may create a minute, per process; beyond: 429 with Retry-After; 0: any")
    max_unfinished_uploads: int = _setting(100, "unfinished resumable uploads one user may have; beyond: 429")
    max_unfinished_mb: int = _setting(0, "MiB one user's unfinished uploads may declare (Upload-Length) in all; beyond: 429; 0: MAX_UPLOAD_MB")
    unfinished_storage_mb: int = _setting(
        0, "MiB all unfinished uploads may declare in all; beyond: 503; 0: half the free space of SQLite's file system at start-up (PostgreSQL: any)"
    )
    audio_buffer_mb: int = _setting(16, "MiB of WAV audio all uploads may hold in memory at once; beyond, reading pauses (TCP holds the rest)")
    temp_disk_mb: int = _setting(
        0, "MiB all temporary files may take (MP3s being made, audio kept for a late option); 0: half the free space of TMPDIR at start-up"
    )
    max_checked_piece_mb: int = _setting(16, "MiB of one PATCH with Upload-Checksum (it waits on the temporary disk until checked); beyond: 413")
    db_timeout: float = _setting(10.0, "seconds a database call may take before the answer is 503")
    db_connections: int = _setting(8, "database connections per process (SQLite: readers beside the one writer)")
    db_startup_timeout: float = _setting(120.0, "seconds to wait for the database at start-up")
    upload_expiry_hours: float = _setting(24.0, "hours a resumable upload has to finish; then it is deleted, bytes and all")
    retention_days: float | None = _setting(None, "records older than this are deleted by a background sweep; unset: kept forever", float)
    cors_origins: str = _setting("", "origins whose browser apps may call the API: `*` or a comma-separated list; empty: no CORS headers")
    signup: str = _setting(
        "open", "who may create users: `open` (anyone), `invite` (POST /users needs an operator's invite code), `closed` (the operator only)"
    )
    admin_token: str = _setting(
        "", "the operator's Bearer credential for /admin/... (or `sha256:` and its hex digest); empty: those routes answer 404"
    )
    user_quota_mb: float | None = _setting(
        None, "MB (MiB) each user may keep: MP3s and unfinished uploads' bytes; the operator may set a user's own; unset: unlimited", float
    )

    @classmethod
    def from_env(cls) -> Settings:
        values = {}
        for field in dataclasses.fields(cls):
            text = os.environ.get(field.name.upper(), "").strip()
            if text:
                try:
                    values[field.name] = field.metadata["parse"](text)
                except ValueError:
                    raise ValueError(f"{field.name.upper()}={text!r} is not a valid {field.type}") from None
        return cls(**values)

    def __post_init__(self) -> None:
        if self.mp3_bitrate not in FORM_OPTIONS["bitrate"].values:
            raise ValueError(f"MP3_BITRATE must be {FORM_OPTIONS['bitrate'].allowed}, not {self.mp3_bitrate}")
        if self.mp3_vbr_quality is not None and self.mp3_vbr_quality not in FORM_OPTIONS["vbr_quality"].values:
            raise ValueError(f"MP3_VBR_QUALITY must be {FORM_OPTIONS['vbr_quality'].allowed}, not {self.mp3_vbr_quality}")
        if self.id3_version not in FORM_OPTIONS["id3_version"].spellings:
            raise ValueError(f"ID3_VERSION must be {FORM_OPTIONS['id3_version'].allowed}, not {self.id3_version!r}")
        if not 0 <= self.mp3_quality <= 9:
            raise ValueError(f"MP3_QUALITY must be 0..9, not {self.mp3_quality}")
        if self.retention_days is not None and self.retention_days <= 0:
            raise ValueError(f"RETENTION_DAYS must be positive, not {self.retention_days}")
        positive = (
            "max_upload_mb",
            "workers",
            "max_uploads",
            "max_connections",
            "max_connections_per_client",
            "max_uploads_per_client",
            "max_uploads_per_user",
            "max_unfinished_uploads",
            "max_checked_piece_mb",
            "audio_buffer_mb",
            "db_connections",
            "header_timeout",
            "download_idle_timeout",
            "upload_expiry_hours",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.upper()} must be positive, not {getattr(self, name)}")
        if self.max_conversions < 0 or self.min_upload_rate < 0 or self.temp_disk_mb < 0 or self.min_rate_window <= 0:
            raise ValueError("MAX_CONVERSIONS, MIN_UPLOAD_RATE and TEMP_DISK_MB must not be negative, MIN_RATE_WINDOW must be positive")
        if min(self.user_creations_per_minute, self.max_unfinished_mb, self.unfinished_storage_mb) < 0:
            raise ValueError("USER_CREATIONS_PER_MINUTE, MAX_UNFINISHED_MB and UNFINISHED_STORAGE_MB must not be negative")
        trusted_networks(self.trusted_proxies)  # a ValueError names what is not an address or a network
        if self.signup not in SIGNUP_MODES:
            raise ValueError(f"SIGNUP must be one of {', '.join(SIGNUP_MODES)}, not {self.signup!r}")
        if self.user_quota_mb is not None and not 0 <= self.user_quota_mb <= MAX_QUOTA_MB:
            raise ValueError(f"USER_QUOTA_MB must be a number of MiB from 0 to {MAX_QUOTA_MB}, not {self.user_quota_mb}")
        if self.admin_token.startswith("sha256:") and not re.fullmatch(r"[0-9a-f]{64}", self.admin_token.removeprefix("sha256:")):
            raise ValueError("ADMIN_TOKEN as a hash is `sha256:` and 64 lower-case hex digits")

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * MIB

    @property
    def max_checked_piece_bytes(self) -> int:
        return self.max_checked_piece_mb * MIB

    @property
    def max_unfinished_bytes(self) -> int:
        return (self.max_unfinished_mb or self.max_upload_mb) * MIB

    def unfinished_storage_bytes(self) -> int | None:
        """UNFINISHED_STORAGE_MB, or half of what SQLite's file system has free now; None: no bound (PostgreSQL)."""
        if self.unfinished_storage_mb:
            return self.unfinished_storage_mb * MIB
        if not self.database_url.startswith("sqlite"):
            return None
        folder = Path(self.database_url.removeprefix("sqlite:///")).resolve().parent
        return shutil.disk_usage(folder if folder.exists() else Path.cwd()).free // 2

    def temp_disk_bytes(self) -> int:
        """TEMP_DISK_MB, or half of what TMPDIR has free now: room is left for the database and everyone else."""
        return self.temp_disk_mb * MIB or shutil.disk_usage(tempfile.gettempdir()).free // 2

    @property
    def default_quota_bytes(self) -> int | None:
        return None if self.user_quota_mb is None else int(self.user_quota_mb * MIB)

    @property
    def admin_token_sha256(self) -> str:
        return self.admin_token.removeprefix("sha256:") if self.admin_token.startswith("sha256:") else hash_token(self.admin_token)

    @property
    def encoder_threads(self) -> int:
        # The cap is per process: share the CPUs between the workers rather than oversubscribe them.
        return self.max_conversions or max(1, (os.cpu_count() or 1) // self.workers)


@functools.cache
def trusted_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def is_trusted(address: str, settings: Settings) -> bool:
    """Whether `address` is one of TRUSTED_PROXIES (a proxy whose forwarding headers name the client)."""
    networks = trusted_networks(settings.trusted_proxies)
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def settings_table() -> str:
    """The configuration table of README.md, from the fields above."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(Settings):
        default = "" if field.default in ("", None) else f"`{field.default}`"
        rows.append(f"| `{field.name.upper()}` | `--{field.name.replace('_', '-')}` | {default} | {field.metadata['meaning']} |")
    return "\n".join(rows)


# Errors ###########################################################################
# Every refusal is a Refused: a status, a message for people that says what to do next, and headers,
# all as data. The WAV reader, the encoder, storage and the routes raise them alike; one handler
# (`answer_refusal`, chapter 14) answers {"error": message}. Starlette's own 404 and 405 go there too.


FORBIDDEN = "unknown user_id or wrong access_token"  # one message whatever was wrong
NO_SUCH_RECORD = "no such record for this user"
NO_SUCH_USER = "no such user"
NO_SUCH_UPLOAD = "no such upload for this user: unknown, terminated, failed or expired"
CLOSE = {"Connection": "close"}  # the rest of the body will not be read
RETRY_LATER = {"Retry-After": str(RETRY_AFTER_SECONDS), **CLOSE}  # a cap's 503: the client goes on after a moment


class Refused(Exception):
    """A request the service turns down: the HTTP status as data, a message that says what to do, and headers; and,
    where the IETF draft of resumable uploads names its problem type, that problem's members (RFC 9457): a client
    of the draft gets them as application/problem+json, with the problem's status (`answer_refusal`)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None, problem: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})
        self.problem = dict(problem or {})


class BadWav(Refused):
    """A WAV that is corrupt, truncated, empty or out of range: 422."""

    def __init__(self, message: str) -> None:
        super().__init__(422, message)


class UnsupportedWav(Refused):
    """Not RIFF/WAVE, or an encoding this service does not convert (the message names it): 415."""

    def __init__(self, message: str) -> None:
        super().__init__(415, message)


class Unavailable(Refused):
    """The service cannot do it now, through no fault of the client's: 503, with Retry-After."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_SECONDS) -> None:
        super().__init__(503, message, {"Retry-After": str(retry_after)})


class DatabaseUnavailable(Unavailable):
    """The database did not answer in time, or is down."""

    def __init__(self) -> None:
        super().__init__("database unavailable")


class DatabaseBusy(Unavailable):
    """SQLite's one writer was not free within DB_TIMEOUT (a large record being stored)."""

    def __init__(self) -> None:
        super().__init__("database busy: try again shortly", retry_after=1)


class DiskFull(Unavailable):
    """The temporary-disk budget is spent, or the disk itself is full: nothing is kept; the next upload may fit."""

    def __init__(self, message: str = "the service's temporary disk is full: try again shortly") -> None:
        super().__init__(message)


class NameTaken(Refused):
    """A user's file names are unique: a record of this name exists, or an unfinished resumable upload holds it."""

    def __init__(self, filename: str, holder: str) -> None:
        if holder == "record":
            what_to_do = f"this user already has a record from a file named {filename!r}: delete it first"
        else:
            what_to_do = f"an unfinished upload of this user holds the name {filename!r}: finish or delete it"
        super().__init__(409, f"{what_to_do}, or send the file under another name")


class RangeNotSatisfiable(Refused):
    def __init__(self, size: int, reason: str = "") -> None:
        # RFC 9110 §15.5.17: the 416 tells the client the current length.
        super().__init__(416, reason or f"range not satisfiable: the record is {size} bytes", {"Content-Range": f"bytes */{size}"})


class BodyCut(Refused):
    """A request body that ended before its end: its client left (400: no one reads the answer), was too slow (408),
    or sent more than the limit (413). A resumable upload keeps the bytes that arrived before it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message, CLOSE)


def too_large(limit: int) -> BodyCut:
    return BodyCut(413, f"request body is larger than the {limit // MIB} MiB limit" if limit >= MIB else f"request body is larger than {limit} bytes")


def piece_too_large(remaining: int, bound: str = "Upload-Length") -> BodyCut:
    """413 for a resumable upload's piece past what the upload may still take, naming the bound that says so: its
    Upload-Length, or, while its length is not known, MAX_UPLOAD_MB, MAX_UNFINISHED_MB or the user's quota."""
    return BodyCut(413, f"more bytes than {bound} leaves: {remaining} to go")


# The problem types the IETF draft registers (RFC 9457 §4), with the status it gives each, as its clients are shown them.
PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"
MISMATCHING_OFFSET = {
    "type": PROBLEM_TYPES + "mismatching-upload-offset",
    "title": "offset from request does not match offset of resource",
    "status": 409,
}
COMPLETED_UPLOAD = {"type": PROBLEM_TYPES + "completed-upload", "title": "upload is already completed", "status": 400}  # drafts -04 to -10
INCONSISTENT_LENGTH = {"type": PROBLEM_TYPES + "inconsistent-upload-length", "title": "inconsistent length values for upload", "status": 400}


# Metrics ##########################################################################
# Prometheus, at GET /metrics. With --workers N the values live in files under PROMETHEUS_MULTIPROC_DIR
# (main() makes one) and /metrics sums them over the worker processes.


METRICS = CollectorRegistry()  # this module's own: `python wav2mp3.py` imports the module twice
ProcessCollector(registry=METRICS)
counter = functools.partial(Counter, registry=METRICS)
live_gauge = functools.partial(Gauge, registry=METRICS, multiprocess_mode="livesum")  # summed over the live worker processes
UPLOADS = counter("wav2mp3_uploads", "POST /users/wav answers, by status", ["status"])
UPLOAD_BYTES = counter("wav2mp3_upload_bytes", "bytes of uploads received, by protocol (multipart, tus)", ["protocol"])
DOWNLOAD_BYTES = counter("wav2mp3_download_bytes", "MP3 bytes sent by downloads")
AUDIO_SECONDS = counter("wav2mp3_audio_seconds", "seconds of audio converted and stored")
UPLOADS_IN_PROGRESS = live_gauge("wav2mp3_uploads_in_progress", "uploads being received and converted")
BLOCKS_ENCODING = live_gauge("wav2mp3_encoder_blocks_running", "audio blocks LAME is encoding")
BLOCKS_QUEUED = live_gauge("wav2mp3_encoder_blocks_queued", "audio blocks waiting for an encoder thread")
ENCODED_BLOCKS = counter(
    "wav2mp3_encoder_blocks",
    "audio blocks handed to an encoder thread, by priority: first (its owner's only one) or yielding (one of several)",
    ["priority"],
)
BUFFERED_AUDIO = live_gauge("wav2mp3_audio_buffered_bytes", "WAV audio held in memory by uploads")
BUFFERED_DOWNLOADS = live_gauge("wav2mp3_download_buffered_bytes", "MP3 chunks read ahead of download clients")
CONVERSION_SECONDS = Histogram(
    "wav2mp3_conversion_seconds",
    "an upload from its first byte to its stored MP3",
    registry=METRICS,
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
REQUEST_SECONDS = Histogram("wav2mp3_request_seconds", "time to answer, by method and route", ["method", "route"], registry=METRICS)
SLOW_CLIENTS = counter("wav2mp3_slow_clients", "clients cut off, by reason", ["reason"])
OVERLOAD_REFUSALS = counter("wav2mp3_overload_refusals", "refusals at a cap (503; 414 or 431 for a request head), by cap", ["cap"])
CONNECTIONS = live_gauge("wav2mp3_connections_open", "open HTTP connections")
DB_ERRORS = counter("wav2mp3_database_errors", "database calls that failed or timed out (answered 503)")
RESUMABLE_LIVE = live_gauge("wav2mp3_resumable_uploads_live", "resumable uploads with a live session here")
RESUMABLE_UPLOADS = counter(
    "wav2mp3_resumable_uploads",
    "resumable uploads by event: created, resumed (re-encoded from stored bytes), completed, terminated, failed, expired, done (row expired)",
    ["event"],
)
TEMP_DISK = live_gauge("wav2mp3_temp_disk_bytes", "bytes in temporary files (MP3s being made, kept audio)")
DB_CONNECTIONS_IN_USE = live_gauge("wav2mp3_database_connections_in_use", "pooled SQLite connections lent out")


# Routes ###########################################################################
# The table of contents: each endpoint reads as the list of steps it takes, and the chapters
# after this one follow those steps in order. Each @API.route line is also the endpoint's
# OpenAPI entry (statuses, parameters, bodies), so the document cannot drift from the code.


@dataclasses.dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    answers: Mapping[int, Mapping[str, Any]]  # OpenAPI response objects by status
    parameters: tuple[Mapping[str, Any], ...]
    body: Mapping[str, Any] | None
    bearer: bool  # the owner's routes: Authorization: Bearer <access_token>
    admin: bool  # the operator's routes: Authorization: Bearer <ADMIN_TOKEN>


class Api:
    """Routes with their OpenAPI declarations: the one place a route's statuses are written."""

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.operations: list[Operation] = []

    def route(
        self,
        path: str,
        methods: list[str],
        summary: str,
        answers: Mapping[int, Mapping[str, Any]],
        parameters: tuple[Mapping[str, Any], ...] = (),
        body: Mapping[str, Any] | None = None,
        bearer: bool = False,
        admin: bool = False,
    ) -> Callable[[Endpoint], Endpoint]:
        if bearer:
            answers = {**OWNER_ONLY, **answers}
        if admin:
            answers = {**ADMIN_ONLY, **answers}

        def register(endpoint: Endpoint) -> Endpoint:
            self.routes.append(Route(path, endpoint, methods=methods))
            bodiless = {status: {key: value for key, value in a.items() if key != "content"} for status, a in answers.items()}
            for method in methods if summary else ():  # a route without a summary is left out of the OpenAPI
                self.operations.append(Operation(method, path, summary, bodiless if method == "HEAD" else answers, parameters, body, bearer, admin))
            return endpoint

        return register


API = Api()


def answer(
    description: str, schema: str | Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None, media: str = "application/json"
) -> dict[str, Any]:
    """An OpenAPI response: a description, a body schema (a component name or a schema) and headers."""
    result: dict[str, Any] = {"description": description}
    if schema is not None:
        result["content"] = {media: {"schema": {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else schema}}
    if headers:
        result["headers"] = {
            name: {"schema": {"type": "integer" if name == "Content-Length" else "string"}, "description": text}
            for name, text in dict(headers).items()
        }
    return result


def error(description: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    return answer(description, "Error", headers)


def problem_error(description: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An error that a request of the IETF draft gets as a problem (RFC 9457) where the draft names one."""
    declared = error(description, headers)
    declared["content"]["application/problem+json"] = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return declared


def query(name: str, description: str, required: bool = True, schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": dict(schema or {"type": "string"}), "description": description}


def header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "schema": {"type": "string"}, "description": description}


USER_ID: dict[str, Any] = {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "the user's UUID"}
USER_PATH = (USER_ID,)
RECORD_QUERY = (query("id", "record UUID"), query("user", "owner's user UUID"))
UNAVAILABLE = {503: error("the database is unreachable")}
OWNER_ONLY = {
    401: error("no Authorization: Bearer header", {"WWW-Authenticate": "Bearer"}),
    403: error(FORBIDDEN),
}
NOT_FOUND = "Not Found"  # Starlette's own text for a path it does not know
NO_STORE = {"Cache-Control": "no-store"}  # answers that hold a secret or a user's data
ADMIN_ONLY = {
    401: error("no Authorization: Bearer header", {"WWW-Authenticate": "Bearer"}),
    403: error("not the ADMIN_TOKEN"),
    404: error("ADMIN_TOKEN is not set: the operator's routes are absent"),
}
BODY_LIMITS = {
    408: error("the client stalled for UPLOAD_IDLE_TIMEOUT, or sent slower than MIN_UPLOAD_RATE"),
    413: error("body larger than the limit"),
}


@API.route(
    "/users",
    ["POST"],
    "Create a user; the access token is shown only in this answer",
    {
        201: answer("the new user", "NewUser"),
        200: answer("a user with that name exists", {"type": "object", "required": ["error_name"], "properties": {"error_name": {"type": "string"}}}),
        408: BODY_LIMITS[408],
        413: error(f"body larger than {MAX_JSON_BODY // 1024} KiB"),
        403: error("SIGNUP is closed, or invite and the invite code is missing, unknown, used up or expired"),
        422: error("not JSON, not an object, or a bad name"),
        429: error("USER_CREATIONS_PER_MINUTE users were created from this address in the last minute", {"Retry-After": "seconds"}),
        **UNAVAILABLE,
    },
    body={
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS},
                    "invite": {"type": "string", "description": "an invite code from the operator: needed when SIGNUP is invite"},
                },
            }
        }
    },
)
async def create_user(request: Request) -> Response:
    services = services_of(request)
    signup = services.settings.signup
    if signup == "closed":
        raise Refused(403, "sign-up is closed on this service: the operator creates users (python wav2mp3.py admin create NAME)")
    payload = parse_json(await BodyReader(request, MAX_JSON_BODY, services.settings).read(), "request body")
    name = valid_name(payload.get("name"))
    services.user_creations.admit(client_address(request.scope, services.settings))
    if signup == "invite":
        created = await invited_user(services.store, name, payload.get("invite"))
    else:
        created = await services.users.create(name)
    if created is None:
        # The seed's answer, kept as it was for its clients.
        return JSONResponse({"error_name": "user with name already is"}, status_code=200)
    user_id, token = created
    return JSONResponse({"user_id": user_id, "access_token": token}, status_code=201)


@API.route(
    "/users/wav",
    ["POST"],
    "Upload a WAV; answers with the link to its MP3",
    {
        201: answer("converted and stored", "Record", {"Location": "the same link as url"}),
        403: error(FORBIDDEN),
        409: error("this user already has a record from a file of that name"),
        415: error("not RIFF/WAVE, or an unsupported encoding (named)"),
        422: error("malformed parts or data, a bad option, or a corrupt, truncated or empty WAV"),
        **BODY_LIMITS,
        503: error(
            "the database is unreachable, or an upload cap is reached (MAX_UPLOADS, ..._PER_CLIENT, ..._PER_USER)",
            {"Retry-After": "seconds, for the upload caps"},
        ),
    },
    body={
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["data", "audio_file"],
                "properties": {
                    "data": {"type": "string", "description": 'JSON: {"user_id": uuid, "access_token": uuid}'},
                    "audio_file": {"type": "string", "format": "binary", "description": "the WAV, with a filename"},
                    **{name: option.schema for name, option in FORM_OPTIONS.items()},
                },
            }
        }
    },
)
async def upload_wav(request: Request) -> Response:
    services = services_of(request)
    body_reader = BodyReader(request, services.settings.max_upload_bytes, services.settings)
    parts = MultipartReader(request.headers.get("content-type", ""))
    slot = await services.uploads.admit(body_reader, client_address(request.scope, services.settings))
    services.resumable.make_room()
    upload = FormUpload(services, parts, slot)
    try:
        await upload.receive(body_reader)
        mp3 = await upload.converted()
        record = await services.store.save_record(upload.new_record(mp3), mp3)
        if record is None:
            raise Refused(403, FORBIDDEN)  # the token was replaced while the upload ran
    finally:
        upload.close()
        slot.release()
        UPLOAD_BYTES.labels("multipart").inc(body_reader.received)
    AUDIO_SECONDS.inc(record.duration_seconds)
    CONVERSION_SECONDS.observe(time.perf_counter() - upload.started)
    log.info(
        "converted record=%s audio=%.2fs in=%d out=%d wall=%.3fs",
        record.record_id, record.duration_seconds, body_reader.received, record.size_bytes, time.perf_counter() - upload.started,
    )  # fmt: skip
    body = record_json(request, record)
    return JSONResponse(body, status_code=201, headers={"Location": body["url"]})


# Resumable uploads: tus 1.0.0 (https://tus.io/protocols/resumable-upload) with creation,
# creation-with-upload, termination, expiration and checksum. The bytes of a PATCH go to the upload's
# live session as they arrive (chapter 6), are stored as they go, and the last ones store the record.
# The same collection and upload URLs speak the IETF draft too (its endpoints follow tus's, `draft_of`).

UPLOAD_STATE = {
    "Upload-Offset": "bytes received and stored",
    "Upload-Length": "the file's size",
    "Upload-Expires": "RFC 9110 date after which an unfinished upload is deleted",
}
UPLOAD_URL = (USER_ID, {**USER_ID, "name": "upload_id", "description": "the upload's UUID"})


# The IETF draft's interop versions spoken here, and what its requests and answers carry (its endpoints follow tus's).
@dataclasses.dataclass(frozen=True)
class DraftVersion:
    """An interop version of the draft (its section "Draft Version Identification"), and what its texts differ in."""

    interop: int
    drafts: str  # the texts that give it
    append_status: int  # of an append that leaves the upload incomplete: -03 to -05 require 201 (Created), later texts any 2xx
    partial_upload: bool  # an append's body is application/partial-upload (from -04 on; -03 names no media type)
    lifetime: str | None  # Upload-Limit's key for the seconds an upload has left (-04, -05: expires); None: no Upload-Limit (-03)


DRAFT_VERSIONS = {
    str(version.interop): version
    for version in (
        DraftVersion(5, "-03", 201, False, None),
        DraftVersion(6, "-04, -05", 201, True, "expires"),
        DraftVersion(7, "-06 to -08", 204, True, "max-age"),
        DraftVersion(8, "-09 and later", 204, True, "max-age"),
    )
}
PARTIAL_UPLOAD = "application/partial-upload"
DRAFT_STATE = {  # what the draft's answers carry besides Upload-Offset and Upload-Length, as the OpenAPI shows it
    "Upload-Complete": "?1: the upload is complete, and the answer is its record's; ?0: it goes on",
    "Upload-Limit": "max-size (MAX_UPLOAD_MB in bytes) and the seconds left to finish: max-age (expires in drafts -04, -05; none in -03)",
    "Upload-Draft-Interop-Version": "the request's",
}
DRAFT_ENDPOINTS: dict[Endpoint, Endpoint] = {}  # tus's endpoint of a route -> the draft's, where they differ
DRAFT_HEADERS = (  # what a request of the draft sends instead of Tus-Resumable, as the OpenAPI shows it
    {
        **header("Upload-Draft-Interop-Version", "the IETF draft's interop version, instead of Tus-Resumable"),
        "schema": {"type": "string", "enum": [*DRAFT_VERSIONS]},
    },
    {
        **header("Upload-Complete", "the IETF draft's creation or append: ?1 if its bytes end the file, else ?0"),
        "schema": {"type": "string", "enum": ["?0", "?1"]},
    },
)
TUS_REFUSALS = {
    404: error(NO_SUCH_UPLOAD),
    412: error(
        f"no Tus-Resumable: {TUS_VERSION} (nor Upload-Draft-Interop-Version), or an interop version of the IETF draft not spoken here",
        {"Tus-Version": TUS_VERSION},
    ),
    **UNAVAILABLE,
}
DRAFT_STATE_SENT = error("the IETF draft: Upload-Offset, Upload-Complete or Upload-Length, which are for a creation or an append")  # HEAD, DELETE


def tus_route(endpoint: Endpoint) -> Endpoint:
    """A tus request carries `Tus-Resumable: 1.0.0` (tus 1.0.0 §Tus-Resumable: 412 with Tus-Version without
    it; a GET or OPTIONS needs none), and every answer carries it back, refusals too. A request of the IETF
    draft goes to the draft's endpoint of this route, if it has one (`draft_of`), else to this one."""

    @functools.wraps(endpoint)
    async def tus_endpoint(request: Request) -> Response:
        if speaks_draft(request):
            return await draft_exchange(request, DRAFT_ENDPOINTS.get(tus_endpoint, endpoint))
        try:
            if request.method not in ("GET", "OPTIONS") and request.headers.get("tus-resumable") != TUS_VERSION:
                raise Refused(412, f"send Tus-Resumable: {TUS_VERSION}, the tus version this service speaks", {"Tus-Version": TUS_VERSION})
            response = await endpoint(request)
        except Refused as refusal:
            refusal.headers.setdefault("Tus-Resumable", TUS_VERSION)
            raise
        response.headers.setdefault("Tus-Resumable", TUS_VERSION)
        return response

    return tus_endpoint


def upload_route(method: str, summary: str, answers: Mapping[int, Mapping[str, Any]], **declared: Any) -> Callable[[Endpoint], Endpoint]:
    """A route of an upload's URL: tus's (`tus_route`), and the owner's alone."""
    declare = API.route("/users/{user_id}/uploads/{upload_id}", [method], summary, answers, **{"parameters": UPLOAD_URL, "bearer": True, **declared})
    return lambda endpoint: declare(tus_route(endpoint))


@API.route("/users/{user_id}/uploads/{upload_id}", ["OPTIONS"], "", {})
@API.route(
    "/users/{user_id}/uploads",
    ["OPTIONS"],
    "The tus version, extensions and limits of the resumable uploads, and the IETF draft's limits (no credentials needed)",
    {204: answer("what the server offers", headers={**TUS_CAPABILITIES, "Upload-Limit": "the IETF draft's: max-size, MAX_UPLOAD_MB in bytes"})},
    parameters=(USER_ID,),
)
@tus_route
async def tus_options(request: Request) -> Response:
    settings = services_of(request).settings
    return Response(
        status_code=204, headers={**TUS_CAPABILITIES, "Tus-Max-Size": str(settings.max_upload_bytes), "Upload-Limit": upload_limit(settings)}
    )


@API.route(
    "/users/{user_id}/uploads",
    ["GET"],
    "The user's unfinished resumable uploads, newest first: to go on with one after a reload or on another device",
    {200: answer("the unfinished uploads", "UploadList"), **UNAVAILABLE},
    parameters=USER_PATH,
    bearer=True,
)
async def list_uploads(request: Request) -> Response:
    """At most MAX_UNFINISHED_UPLOADS of them (the pieces of a parallel upload among them): one answer, no pages."""
    services = services_of(request)
    user_id, _ = await owner(request)
    uploads = await services.store.unfinished_uploads(user_id, services.settings.max_unfinished_uploads)
    return JSONResponse({"uploads": [upload_json(request, upload) for upload in uploads]}, headers={"Cache-Control": "no-store"})


def upload_json(request: Request, upload: StoredUpload) -> dict[str, Any]:
    return {
        "upload_id": upload.upload_id,
        "url": upload_url(request, upload),
        "filename": upload.filename or None,  # None: a partial upload (a piece of a parallel one)
        "length": None if upload.length == DEFERRED else upload.length,
        "offset": upload.received,
        "options": {name: FORM_OPTIONS[name].spelled(value) for name, value in upload.options.items()},
        "created": upload.created_at,
        "expires": upload.expires_at,
    }


@API.route(
    "/users/{user_id}/uploads",
    ["POST"],
    "Create a resumable upload (tus creation, or the IETF draft's); its first bytes may come along (creation-with-upload)",
    {
        201: answer("created; with a body, its bytes are stored", headers={"Location": "the upload's URL", **UPLOAD_STATE, **DRAFT_STATE}),
        200: answer(
            "the IETF draft's creation with the whole file (Upload-Complete: ?1): the record, stored",
            "Record",
            {"Location": "the upload's URL", "Upload-Offset": UPLOAD_STATE["Upload-Offset"], **DRAFT_STATE},
        ),
        400: problem_error(
            "no Upload-Length nor Upload-Defer-Length: 1, both, or a length that is not a number; a bad Upload-Concat, or a final one"
            " naming a partial upload not whole yet, or with a body; the IETF draft: no Upload-Complete, or two lengths told"
            " (inconsistent-upload-length)"
        ),
        404: error("a partial upload that Upload-Concat: final names is unknown, expired or not partial"),
        413: error("Upload-Length larger than MAX_UPLOAD_MB, or than the user's quota leaves"),
        415: error("a tus body that is not application/offset+octet-stream, or a WAV refused as on POST /users/wav"),
        422: error(
            "Upload-Metadata malformed, without filename (tus), or with a bad option (or the query's: the IETF draft); a record of this user,"
            " or an unfinished upload, has this file name (not 409, which tus clients retry); or an empty file"
        ),
        429: error("the user has MAX_UNFINISHED_UPLOADS unfinished uploads, or they would declare more than MAX_UNFINISHED_MB"),
        412: TUS_REFUSALS[412],
        503: error("the database is unreachable, or UNFINISHED_STORAGE_MB is taken", {"Retry-After": "seconds, for the storage"}),
    },
    parameters=(
        USER_ID,
        header("Tus-Resumable", TUS_VERSION),
        header("Upload-Length", "the file's size in bytes"),
        header("Upload-Defer-Length", "1 instead of Upload-Length: the length comes with a later PATCH (a recording under way)"),
        header("Upload-Metadata", f"filename (required for tus), {', '.join(FORM_OPTIONS)}: `key base64(value)`, comma-separated"),
        *DRAFT_HEADERS,
        header("Content-Disposition", "the IETF draft: `inline; filename=...`, the file's name when Upload-Metadata gives none"),
        # The draft has no metadata of its own: every option of FORM_OPTIONS may come in the query, as in POST /users/wav's form.
        *(query(name, f"the IETF draft: {option.meaning}", required=False, schema=option.schema) for name, option in FORM_OPTIONS.items()),
    ),
    bearer=True,
)
@tus_route
async def create_upload(request: Request) -> Response:
    """tus creation: the name is reserved now; a body is the first piece of the file."""
    services = services_of(request)
    user_id, token = await owner(request)
    concat = request.headers.get("upload-concat", "").strip()
    if concat.startswith("final;") and has_body(request):
        # tus concatenation: a final upload's bytes are its partial uploads' (its length is their sum; a PATCH of it is 403).
        # A chunked body of no chunk (a client that always sends chunked) holds none: it is read to its end, or its first byte.
        no_body = "a final upload (Upload-Concat: final) has no bytes of its own, only its partial uploads': send it without a body"
        if "content-length" in request.headers or "transfer-encoding" not in request.headers:
            raise Refused(400, no_body)
        async for _ in BodyReader(request, 0, services.settings, BodyCut(400, no_body)).chunks():
            pass  # no chunk comes: its first byte is past the limit of 0, answered 400
    elif has_body(request) and media_type(request) != OFFSET_OCTET_STREAM:
        raise Refused(415, f"send a first piece as Content-Type: {OFFSET_OCTET_STREAM}, or no body")
    metadata = request.headers.get("upload-metadata", "")
    if concat.startswith("final;"):
        return await concatenate(request, services, user_id, token, concat.removeprefix("final;"), metadata)
    if concat not in ("", "partial"):
        raise Refused(400, "Upload-Concat must be `partial` or `final;` and the partial uploads' URLs")
    length = upload_length(request, services.settings, deferrable=not concat)
    filename, options = ("", {}) if concat else upload_metadata(metadata)  # a partial upload's metadata is only kept
    upload_checksum(request, *creation_room(length, services.settings), services.settings)  # a first piece's refusals come before the upload
    try:
        upload = await services.resumable.create(user_id, token, filename, options, length, metadata)
    except NameTaken as taken:
        # 409 and 423 mean "ask for the offset and try again" to tus clients (tus-js-client, Uppy retry them):
        # a name taken is for the person to see at once, so it is 422 here (POST /users/wav keeps its 409).
        raise Refused(422, taken.message) from None
    headers = {"Location": upload_url(request, upload), "Upload-Expires": http_date(upload.expires_at)}
    if has_body(request):  # creation-with-upload: a body is the file's first bytes
        headers["Upload-Offset"] = str(await receive_first_piece(request, services, upload, token))
    return Response(status_code=201, headers=headers)


@upload_route(
    "HEAD",
    "Where a resumable upload stands: the bytes received and stored",
    {
        200: answer(
            "the offset to go on from",
            headers={**UPLOAD_STATE, "Upload-Metadata": "as given at creation", "Cache-Control": "no-store", **DRAFT_STATE},
        ),
        400: DRAFT_STATE_SENT,
        423: error("all bytes are in and the record is being stored: ask again after Retry-After", {"Retry-After": "seconds"}),
        **TUS_REFUSALS,
    },
)
async def head_upload(request: Request) -> Response:
    """The offset a client goes on from: every byte it counts is stored (a restart keeps it)."""
    upload = await standing_upload(request)
    metadata = {"Upload-Metadata": upload.metadata} if upload.metadata else {}
    return Response(status_code=200, headers={**upload_state(upload), **metadata, "Cache-Control": "no-store"})


async def standing_upload(request: Request) -> StoredUpload:
    """The upload of the path as it stands: a request of this process still storing its bytes is waited for, and an
    upload with every byte in but no record (its last request met a database that could not store it) has it stored
    now: 423 until it is."""
    services = services_of(request)
    upload, token = await owned_upload(request)
    upload = await services.resumable.settled(upload)
    if upload.record_id is None and upload.whole and not upload.partial:
        upload = await services.resumable.completed(upload, token)
    return upload


@upload_route(
    "PATCH",
    "The next bytes of a resumable upload, at its offset; the last ones store the record",
    {
        204: answer("stored (the last ones: and the record too); the IETF draft from interop version 7: stored, it goes on", headers=UPLOAD_STATE),
        200: answer(
            "the IETF draft: these bytes completed the upload (Upload-Complete: ?1): the record, stored",
            "Record",
            {"Upload-Offset": UPLOAD_STATE["Upload-Offset"], **DRAFT_STATE},
        ),
        201: answer(
            "the IETF draft, interop versions 5 and 6: stored, the upload goes on (Upload-Complete: ?0)",
            headers={"Upload-Offset": UPLOAD_STATE["Upload-Offset"], **DRAFT_STATE},
        ),
        400: problem_error(
            "no Upload-Offset, or an Upload-Checksum that is malformed or of an algorithm not offered; the IETF draft: no Upload-Complete,"
            " two lengths told (inconsistent-upload-length), or an upload complete already (completed-upload)"
        ),
        408: error("the client stalled or sent too slowly: the bytes that arrived are kept"),
        409: problem_error(
            "Upload-Offset is not the upload's offset (the IETF draft: mismatching-upload-offset), another request is sending this upload's"
            " bytes, or (tus) the upload is complete",
            {"Upload-Offset": "where it is"},
        ),
        413: error(
            "more bytes than Upload-Length leaves (before it is known: MAX_UPLOAD_MB, MAX_UNFINISHED_MB or the quota, named), a piece with"
            " Upload-Checksum over MAX_CHECKED_PIECE_MB, or an MP3 past the quota"
        ),
        415: error(
            "not application/offset+octet-stream (the IETF draft: application/partial-upload), or a WAV refused as on POST /users/wav"
            " (the upload is then ended)"
        ),
        422: error("a WAV refused as on POST /users/wav: the upload is then ended"),
        460: error("Upload-Checksum does not match: the piece is dropped, the offset stays"),
        **TUS_REFUSALS,
        503: error(
            "the database is unreachable, or an upload cap is reached (MAX_UPLOADS, ..._PER_CLIENT, ..._PER_USER)", {"Retry-After": "seconds"}
        ),
    },
    parameters=(
        *UPLOAD_URL,
        header("Tus-Resumable", TUS_VERSION),
        header("Upload-Offset", "where these bytes start: the upload's offset"),
        header("Upload-Length", "the file's size, once known, of an upload created with Upload-Defer-Length: 1"),
        header("Upload-Checksum", "optional: `sha1 base64(digest)` of this piece (also sha256, sha512, md5)"),
        *DRAFT_HEADERS,
    ),
    body={media: {"schema": {"type": "string", "format": "binary"}} for media in ("application/offset+octet-stream", PARTIAL_UPLOAD)},
)
async def patch_upload(request: Request) -> Response:
    services = services_of(request)
    upload, token = await owned_upload(request)
    if media_type(request) != OFFSET_OCTET_STREAM:
        raise Refused(415, f"send the bytes as Content-Type: {OFFSET_OCTET_STREAM}")
    offset = parse_count(request.headers.get("upload-offset", ""), "Upload-Offset", 400)
    length = upload_length(request, services.settings, deferrable=False) if "upload-length" in request.headers else None
    offset = await receive_upload(request, services, upload, offset, token, length)
    return Response(status_code=204, headers={"Upload-Offset": str(offset), "Upload-Expires": http_date(upload.expires_at)})


@upload_route(
    "GET",
    "A finished resumable upload's record, as POST /users/wav answers it",
    {200: answer("the record", "Record"), 404: TUS_REFUSALS[404], 409: error("not complete yet", {"Upload-Offset": "where it is"}), **UNAVAILABLE},
)
async def get_upload(request: Request) -> Response:
    services = services_of(request)
    upload, _ = await owned_upload(request)
    if upload.record_id is None:
        raise Refused(409, "the upload is not complete: send the rest of its bytes (PATCH)", {"Upload-Offset": str(upload.received)})
    record = await services.store.find_record(upload.record_id, upload.user_id)
    if record is None:
        raise Refused(404, "the record of this upload has been deleted")
    return JSONResponse(record_json(request, record))


@upload_route(
    "DELETE",
    "End a resumable upload (tus termination): its bytes are deleted and its file name is free again",
    {204: answer("terminated"), 400: DRAFT_STATE_SENT, **TUS_REFUSALS},
)
async def delete_upload(request: Request) -> Response:
    """tus termination; a finished upload's record stays (DELETE /record deletes it)."""
    services = services_of(request)
    upload, _ = await owned_upload(request)
    await services.resumable.end(upload, "terminated")
    return Response(status_code=204)


@API.route("/users/{user_id}/uploads/{upload_id}", ["POST"], "", {})
@tus_route
async def override_upload_method(request: Request) -> Response:
    """For clients that can send only GET and POST (tus 1.0.0 §X-HTTP-Method-Override, tus-js-client's overridePatchMethod)."""
    method = request.headers.get("x-http-method-override", "").upper()
    if method not in ("PATCH", "DELETE"):
        raise Refused(405, "POST to an upload needs X-HTTP-Method-Override: PATCH or DELETE")
    return await (patch_upload if method == "PATCH" else delete_upload)(request)


# Resumable uploads: the IETF draft "Resumable Uploads for HTTP" (draft-ietf-httpbis-resumable-upload, tus's successor:
# https://datatracker.ietf.org/doc/draft-ietf-httpbis-resumable-upload/) on the same collection and upload URLs. A
# request with Upload-Draft-Interop-Version and no Tus-Resumable speaks it (tus-js-client's `protocol: 'ietf-draft-03'`
# sends 5, `'ietf-draft-05'` 6). Its uploads are tus's (the same rows, sessions, bounds, quota and shares); what differs
# is what a request says and what it is answered. Upload-Complete: ?1 ends the file, as reaching its length does, and
# the answer that ends it is the record (the draft: the answer of the resource that processed the representation).
# No 104 (Upload Resumption Supported): uvicorn gives an ASGI app no interim answers, and nginx (deploy/) would take
# one for the final answer (docs/API.md, "The IETF draft").


def speaks_draft(request: Request) -> bool:
    return "upload-draft-interop-version" in request.headers and "tus-resumable" not in request.headers


def draft_version(request: Request) -> DraftVersion:
    """The request's interop version: 412 for one this service does not speak."""
    version = DRAFT_VERSIONS.get(request.headers.get("upload-draft-interop-version", "").strip())
    if version is None:
        raise Refused(
            412,
            f"Upload-Draft-Interop-Version must be one of {', '.join(DRAFT_VERSIONS)} (or send Tus-Resumable: {TUS_VERSION})",
            {"Tus-Version": TUS_VERSION},
        )
    return version


def draft_of(tus_endpoint: Endpoint) -> Callable[[Endpoint], Endpoint]:
    """The draft's endpoint of a route whose tus endpoint is `tus_endpoint`: tus_route sends the draft's requests to it."""

    def register(endpoint: Endpoint) -> Endpoint:
        DRAFT_ENDPOINTS[tus_endpoint] = endpoint
        return endpoint

    return register


async def draft_exchange(request: Request, endpoint: Endpoint) -> Response:
    """A request of the draft: its version (412 for one not spoken; a GET or an OPTIONS needs none), given back on every
    answer. A refused creation or append says whether the upload has ended (Upload-Complete: ?1: a file refused as no
    WAV, as the draft's example of a body that cannot be decoded) or goes on (?0)."""
    version = {} if request.method in ("GET", "OPTIONS") else {"Upload-Draft-Interop-Version": str(draft_version(request).interop)}
    try:
        said = [name for name in ("Upload-Offset", "Upload-Complete", "Upload-Length") if name in request.headers]
        if request.method in ("HEAD", "DELETE") and said:  # drafts -03 to -05: the server MUST refuse it
            raise Refused(400, f"a {request.method} of an upload carries no {said[0]}: that is for a creation or an append")
        response = await endpoint(request)
    except Refused as refusal:
        if request.method in ("POST", "PATCH"):
            refusal.headers.setdefault("Upload-Complete", "?1" if isinstance(refusal, BadWav | UnsupportedWav) else "?0")
        refusal.headers.update(version)
        raise
    response.headers.update(version)
    return response


@draft_of(create_upload)
async def create_draft_upload(request: Request) -> Response:
    """The draft's creation: a POST with Upload-Complete, whose body (none, some or all of the file) is the file's first
    bytes, ?1 saying they are all of it. The name is reserved now, as for tus."""
    services = services_of(request)
    user_id, token = await owner(request)
    last = upload_complete(request)
    length = draft_length(request, 0, last, services.settings)
    upload_checksum(request, *creation_room(length, services.settings), services.settings)  # a body past the length: 413, nothing created
    upload_id = str(uuid.uuid4())
    metadata = request.headers.get("upload-metadata", "")
    filename, options = draft_name(request, metadata, upload_id)
    try:
        upload = await services.resumable.create(user_id, token, filename, options, length or DEFERRED, metadata, upload_id=upload_id)
    except NameTaken as taken:
        raise Refused(422, taken.message) from None  # as for tus: clients of the draft, too, take 409 for "ask the offset"
    offset = await receive_first_piece(request, services, upload, token, last) if has_body(request) else 0
    return await draft_answer(request, upload, offset, length, last, 201, {"Location": upload_url(request, upload)})


@draft_of(head_upload)
async def head_draft_upload(request: Request) -> Response:
    """The draft's offset retrieval: where the upload stands, whether it is complete, its length if known, its limits."""
    upload = await standing_upload(request)
    length = {} if upload.length == DEFERRED else {"Upload-Length": str(upload.length)}
    state = {"Upload-Offset": str(upload.received), "Upload-Complete": "?0" if upload.record_id is None else "?1", **length}
    return Response(status_code=200, headers={**state, **draft_limits(request, upload), "Cache-Control": "no-store"})


@draft_of(patch_upload)
async def patch_draft_upload(request: Request) -> Response:
    """The draft's append: the bytes at Upload-Offset, Upload-Complete saying whether they end the file."""
    services = services_of(request)
    upload, token = await owned_upload(request)
    version = draft_version(request)
    if version.partial_upload and has_body(request) and media_type(request) != PARTIAL_UPLOAD:
        raise Refused(415, f"send the bytes as Content-Type: {PARTIAL_UPLOAD}")
    last = upload_complete(request)
    offset = parse_count(request.headers.get("upload-offset", ""), "Upload-Offset", 400)
    length = draft_length(request, offset, last, services.settings)
    offset = await receive_upload(request, services, upload, offset, token, length, last)
    return await draft_answer(request, upload, offset, length, last, version.append_status, {})


def upload_complete(request: Request) -> bool:
    """Upload-Complete, which a creation or an append of the draft carries (an RFC 9651 boolean): 400 without one."""
    value = request.headers.get("upload-complete", "").partition(";")[0].strip()
    if value not in ("?0", "?1"):
        raise Refused(400, "send Upload-Complete: ?1 if these bytes end the file, else ?0")
    return value == "?1"


def draft_length(request: Request, offset: int, last: bool, settings: Settings) -> int | None:
    """The file's length, if a request of the draft tells it: Upload-Length, or, with Upload-Complete: ?1, the offset
    and the body's Content-Length; 400 when they disagree (the draft's inconsistent-upload-length), 413 past MAX_UPLOAD_MB."""
    told = set()
    if "upload-length" in request.headers:
        told.add(parse_count(request.headers["upload-length"].strip(), "Upload-Length", 400))
    if last and "transfer-encoding" not in request.headers:
        told.add(offset + parse_count(request.headers.get("content-length", "0"), "Content-Length", 400))
    if len(told) > 1:
        raise Refused(
            400, f"Upload-Length and the bytes that end the file tell two lengths: {min(told)} and {max(told)}", problem=INCONSISTENT_LENGTH
        )
    return checked_length(told.pop(), settings) if told else None


def draft_name(request: Request, metadata: str, upload_id: str) -> tuple[str, dict[str, int]]:
    """A draft upload's file name and options: Upload-Metadata's, as for tus, when the client sends it (tus-js-client
    does); else the name Content-Disposition gives (`inline; filename=...`, as the draft advises), or else
    upload-<the upload id's first 8 digits>.wav. Options (any of FORM_OPTIONS) may come in the query too: ?bitrate=96&id3_version=2.3."""
    filename, options = upload_metadata(metadata, named=False) if metadata else ("", {})
    if not filename:
        _, params = disposition_params(request.headers.get("content-disposition", "").encode("latin-1"))
        if "filename" in params or "filename*" in params:
            filename = clean_filename(disposition_filename(params, "Content-Disposition"), "Content-Disposition's filename")
    for name, value in request.query_params.multi_items():
        if name in FORM_OPTIONS:
            add_option(options, name, value)
    return filename or f"upload-{upload_id[:8]}.wav", options


async def draft_answer(
    request: Request, upload: StoredUpload, offset: int, length: int | None, last: bool, status: int, headers: Mapping[str, str]
) -> Response:
    """A creation's or an append's answer: once the upload is complete (its file ended with this request, or reached its
    length, and the record is stored), the record as GET of the upload gives it, with Upload-Complete: ?1 (200); else
    the offset, with ?0 (`status`): a first piece that met a refusal too (`receive_first_piece`)."""
    known = upload.length if length is None else length
    if not upload.partial and (last or offset == known != DEFERRED):
        store = services_of(request).store
        if (stored := await store.find_upload(upload.upload_id, upload.user_id)) is not None and stored.record_id is not None:
            record = await store.find_record(stored.record_id, upload.user_id)
            if record is None:
                raise Refused(404, "the record of this upload has been deleted")
            return JSONResponse(record_json(request, record), headers={**headers, "Upload-Offset": str(offset), "Upload-Complete": "?1"})
    return Response(status_code=status, headers={**headers, "Upload-Offset": str(offset), "Upload-Complete": "?0", **draft_limits(request, upload)})


def draft_limits(request: Request, upload: StoredUpload) -> dict[str, str]:
    lifetime = draft_version(request).lifetime
    return {} if lifetime is None else {"Upload-Limit": upload_limit(services_of(request).settings, lifetime, upload.expires_at)}


def upload_limit(settings: Settings, lifetime: str = "", expires_at: str = "") -> str:
    """The draft's Upload-Limit (an RFC 9651 dictionary): the largest file, and the seconds an upload has left to finish."""
    limits = f"max-size={settings.max_upload_bytes}"
    if lifetime:
        left = datetime.fromisoformat(expires_at).astimezone(UTC) - datetime.now(UTC)
        limits += f", {lifetime}={max(0, int(left.total_seconds()))}"
    return limits


RECORD_HEADERS = {
    "ETag": "strong: the MP3's sha256 in quotes",
    "Accept-Ranges": "bytes",
    "Content-Disposition": "RFC 6266: an ASCII filename and the exact name in filename*",
    "Content-Length": "bytes in this answer",
}


@API.route(
    "/record",
    ["GET", "HEAD"],
    "Download an MP3 (HEAD: its headers)",
    {
        200: answer("the MP3", {"type": "string", "format": "binary"}, RECORD_HEADERS, media="audio/mpeg"),
        206: answer(
            "the requested byte range",
            {"type": "string", "format": "binary"},
            {**RECORD_HEADERS, "Content-Range": "bytes first-last/size"},
            media="audio/mpeg",
        ),
        304: answer("If-None-Match matched", headers={"ETag": RECORD_HEADERS["ETag"]}),
        404: error("no such record for that user, or ids that are not UUIDs"),
        416: error("range not satisfiable", {"Content-Range": "bytes */size"}),
        422: error("id or user missing"),
        **UNAVAILABLE,
    },
    parameters=(
        *RECORD_QUERY,
        header("Range", "one bytes= range"),
        header("If-None-Match", "ETags, or *"),
        header("If-Range", "the ETag the Range is for"),
    ),
)
async def get_record(request: Request) -> Response:
    services = services_of(request)
    record_id, user_id = record_query(request)
    record = await services.store.find_record(record_id, user_id) if record_id and user_id else None
    if record is None:
        raise Refused(404, NO_SUCH_RECORD)
    return await RecordResponse(request, record, services).read_ahead()


@API.route(
    "/record",
    ["DELETE"],
    "Delete a record: its MP3 is gone from the database, its file name free again",
    {204: answer("deleted"), 404: error("no such record for this user, or ids that are not UUIDs"), 422: error("id or user missing"), **UNAVAILABLE},
    parameters=RECORD_QUERY,
    bearer=True,
)
async def delete_record(request: Request) -> Response:
    store = services_of(request).store
    token = bearer_token(request)
    record_id, user_param = record_query(request)
    user_id = await authenticate(store, user_param, token)
    if record_id is None or not await store.delete_record(record_id, user_id):
        raise Refused(404, NO_SUCH_RECORD)  # another user's record looks like none at all
    return Response(status_code=204)


@API.route(
    "/users/{user_id}/records",
    ["GET"],
    "The user's records, newest first, a page at a time",
    {200: answer("a page of records", "RecordPage"), 422: error("a bad limit or cursor"), **UNAVAILABLE},
    parameters=(
        USER_ID,
        query("limit", f"records per page, 1..{MAX_PAGE} (default {DEFAULT_PAGE})", False, {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
        query("cursor", "next_cursor of the page before", False),
    ),
    bearer=True,
)
async def list_records(request: Request) -> Response:
    """A page of the user's records, newest first; next_cursor continues it (keyset pagination)."""
    services = services_of(request)
    user_id, _ = await owner(request)
    limit, after = page_limit(request.query_params.get("limit")), parse_cursor(request.query_params.get("cursor"))
    records = await services.store.list_records(user_id, after, limit + 1)
    page = records[:limit]
    return JSONResponse(
        {
            "records": [{**record_json(request, record), "created_at": record.created_at} for record in page],
            "next_cursor": page_cursor(page[-1]) if len(records) > limit else None,
        }
    )


# All or some of a user's MP3s as one ZIP. A browser's download cannot carry a Bearer header, so the page asks
# for a link (POST) and opens it (GET). The link is safe to hand to a browser: it holds no token, only an HMAC
# keyed by the SHA-256 of the user's current token (which the service keeps, and which only the user could
# compute), over exactly the records it opens and when it expires (ZIP_LINK_SECONDS): nobody else can make one
# or stretch one, a new token voids them all at once, it only reads, and the access log never shows query values.
RECORDS_ZIP = "/users/{user_id}/records.zip"
ZIP_LINK_SECONDS = 600
MAX_ZIP_SELECTION = 100  # records a link names (its line stays within MAX_HEAD_LINE_BYTES); all of them: no bound
ZIP_SELECTION = {
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {
                "records": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_ZIP_SELECTION,
                    "uniqueItems": True,
                    "items": {"type": "string", "format": "uuid"},
                    "description": "the records to put in it; absent (or null): all",
                }
            },
        }
    }
}


@API.route(
    RECORDS_ZIP,
    ["POST"],
    "A link that downloads the user's records (all, or those named) as one ZIP, for a browser (no Bearer header needed)",
    {
        201: answer("the link, good for ZIP_LINK_SECONDS", "ZipLink"),
        404: error("a record named is not this user's"),
        408: BODY_LIMITS[408],
        413: error("body too large"),
        422: error(f"not JSON, or records not a list of 1 to {MAX_ZIP_SELECTION} record ids, each once"),
        **UNAVAILABLE,
    },
    parameters=USER_PATH,
    body=ZIP_SELECTION,
    bearer=True,
)
async def zip_link(request: Request) -> Response:
    services = services_of(request)
    user_id, token = await owner(request)
    chosen = (await json_payload(request, required=False)).get("records")
    # Each item is one id, whatever it holds ("a,b" is no id); an empty list would be read as none chosen, which the
    # link spells as all of them: an absent `records` says that, and [] is refused rather than guessed at.
    ids = [parse_uuid(item) for item in chosen] if isinstance(chosen, list) else [None]
    if chosen is not None and (not 1 <= len(ids) <= MAX_ZIP_SELECTION or None in ids or len(set(ids)) != len(ids)):
        raise Refused(422, f"records must be a list of 1 to {MAX_ZIP_SELECTION} record ids, each once (leave it out for all of them)")
    selection = ",".join(record_id for record_id in ids if record_id)
    for record_id in selection.split(",") if selection else ():
        if await services.store.find_record(record_id, user_id) is None:
            raise Refused(404, f"no record {record_id} of this user")
    expires = int(time.time()) + ZIP_LINK_SECONDS
    query = {"records": selection} if selection else {}
    query |= {"expires": str(expires), "signature": zip_signature(hash_token(token), user_id, selection, expires)}
    url = f"{base_url(request)}/users/{user_id}/records.zip?{urlencode(query)}"
    return JSONResponse({"url": url, "expires": timestamp(datetime.fromtimestamp(expires, UTC))}, status_code=201)


@API.route(
    RECORDS_ZIP,
    ["GET"],
    "The user's records (all, or those of `records`) as one ZIP, streamed: with the Bearer header, or by a link from POST",
    {
        200: answer("the ZIP: stored entries named as the MP3s", {"type": "string", "format": "binary"}, media="application/zip"),
        403: error(f"{FORBIDDEN}; or a link that is not valid (the token was replaced since) or has expired"),
        422: error("bad records, expires or signature"),
        **UNAVAILABLE,
    },
    parameters=(
        USER_ID,
        query("records", f"record ids, comma-separated, 1 to {MAX_ZIP_SELECTION}; absent: all", False),
        query("expires", "of a link: when it expires (Unix seconds)", False),
        query("signature", "of a link: its HMAC", False),
    ),
    bearer=True,
)
async def download_zip(request: Request) -> Response:
    services = services_of(request)
    given = request.query_params.getlist("records")
    chosen = zip_selection(given)
    user_id = await signed_zip_user(request, ",".join(given)) if "signature" in request.query_params else (await owner(request))[0]
    filename = f"wav2mp3-{datetime.now(UTC):%Y-%m-%d}.zip"
    return ZipResponse(records_of(services.store, user_id, chosen), services, filename)


def zip_selection(given: list[str]) -> list[str]:
    """The `records` query parameter: record ids, comma-separated, each once, 1 to MAX_ZIP_SELECTION; none (all the
    records) when absent; 422 for anything else (an empty `records=` too: absent says all; and `records` given
    twice, which was read as its last)."""
    chosen = [parse_uuid(part) for part in given[0].split(",")] if len(given) == 1 else [None] * len(given)
    if len(chosen) > MAX_ZIP_SELECTION or None in chosen or len(set(chosen)) != len(chosen):
        raise Refused(422, f"records must be 1 to {MAX_ZIP_SELECTION} record ids, each once, comma-separated (leave it out for all of them)")
    return [record_id for record_id in chosen if record_id]


def zip_signature(token_sha256: str, user_id: str, selection: str, expires: int) -> str:
    return hmac.new(token_sha256.encode(), f"records.zip {user_id} {selection} {expires}".encode(), hashlib.sha256).hexdigest()


async def signed_zip_user(request: Request, selection: str) -> str:
    """The user of a ZIP link whose signature is good and has not expired; 403 otherwise (one message for a wrong one)."""
    user_id = parse_uuid(request.path_params["user_id"])
    expires = parse_count(request.query_params.get("expires", ""), "expires")
    stored = await services_of(request).store.token_hash(user_id) if user_id else None
    expected = zip_signature(stored or "0" * 64, user_id or "", selection, expires)
    if stored is None or user_id is None or not hmac.compare_digest(expected, request.query_params["signature"]):
        raise Refused(403, "this ZIP link is not valid (the access token was replaced since, or the link was changed): make a new one")
    if expires < time.time():
        raise Refused(403, "this ZIP link has expired: make a new one")
    return user_id


async def records_of(store: Store, user_id: str, chosen: list[str]) -> AsyncIterator[StoredRecord]:
    """The records chosen (those still there), or all the user's, newest first, a page at a time."""
    for record_id in chosen:
        if (record := await store.find_record(record_id, user_id)) is not None:
            yield record
    if chosen:
        return
    after = FIRST_PAGE
    while page := await store.list_records(user_id, after, MAX_PAGE):
        for record in page:
            yield record
        after = (page[-1].created_at, page[-1].record_id)


@API.route(
    "/users/{user_id}/token",
    ["POST"],
    "Replace the user's access token; the old one stops working at once",
    {201: answer("the new token, shown only in this answer", "NewUser"), **UNAVAILABLE},
    parameters=(USER_ID,),
    bearer=True,
)
async def rotate_token(request: Request) -> Response:
    user_id, token = await owner(request)
    new_token = str(uuid.uuid4())
    if not await services_of(request).store.replace_token(user_id, hash_token(token), hash_token(new_token)):
        raise Refused(403, FORBIDDEN)  # another rotation won the race: this token is already the old one
    return JSONResponse({"user_id": user_id, "access_token": new_token}, status_code=201)


async def invited_user(store: Store, name: str, code: Any) -> tuple[str, str] | None:
    """A new user for one use of an invite code (SIGNUP=invite): (user id, token), None if the name is taken."""
    if not isinstance(code, str) or not code.strip():
        raise Refused(403, 'sign-up on this service needs an invite code from the operator: send {"name": ..., "invite": "<code>"}')
    if NOT_TEXT.search(code) or len(code) > MAX_FIELD_BYTES:
        raise Refused(403, "this invite code is unknown, used up or expired: ask the operator for another")
    user_id, token = str(uuid.uuid4()), str(uuid.uuid4())
    created = await store.create_invited_user({"id": user_id, "name": name, "token_sha256": hash_token(token), "created_at": now()}, code.strip())
    if created is None:
        raise Refused(403, "this invite code is unknown, used up or expired: ask the operator for another")
    return (user_id, token) if created else None


USAGE = answer("the user's name, usage and quota", "Usage")


@API.route(
    "/users/{user_id}", ["GET"], "The user's name, records, bytes stored and quota", {200: USAGE, **UNAVAILABLE}, parameters=USER_PATH, bearer=True
)
async def user_usage(request: Request) -> Response:
    user_id, _ = await owner(request)
    usage = await services_of(request).store.usage(user_id)
    if usage is None:
        raise Refused(403, FORBIDDEN)  # deleted since it was authenticated
    return JSONResponse(usage.json(), headers={"Cache-Control": "no-store"})


@API.route("/service", ["GET"], "What the page needs to know of this service: its sign-up mode and retention", {200: answer("the facts", "Service")})
async def service_facts(request: Request) -> Response:
    settings = services_of(request).settings
    return JSONResponse({"signup": settings.signup, "retention_days": settings.retention_days, "max_upload_bytes": settings.max_upload_bytes})


# The operator's routes (ADMIN_TOKEN): the same as `python wav2mp3.py admin ...` does (Operator, chapter 14).


@API.route(
    "/admin/invites",
    ["POST"],
    "Make an invite code (SIGNUP=invite): shown only in this answer",
    {201: answer("the code", "Invite"), 408: BODY_LIMITS[408], 413: error("body too large"), 422: error("bad uses or expires_hours"), **UNAVAILABLE},
    body={
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "uses": {"type": "integer", "minimum": 1, "maximum": MAX_INVITE_USES, "description": "users it may create (default 1)"},
                    "expires_hours": {"type": "number", "description": f"hours it is good for (default {DEFAULT_INVITE_HOURS:g})"},
                },
            }
        }
    },
    admin=True,
)
async def admin_invite(request: Request) -> Response:
    operator = await operator_of(request)
    payload = await json_payload(request, required=False)
    uses = parse_admin_number(payload, "uses", 1, 1, MAX_INVITE_USES, integer=True)
    hours = parse_admin_number(payload, "expires_hours", DEFAULT_INVITE_HOURS, 1 / 3600, 24 * 3650)
    return JSONResponse(await operator.invite(int(uses), hours), status_code=201, headers=NO_STORE)


@API.route(
    "/admin/users",
    ["GET"],
    "Every user with its usage and quota, by name, a page at a time",
    {200: answer("a page of users", "UserPage"), 422: error("a bad limit"), **UNAVAILABLE},
    parameters=(
        query("limit", f"users per page, 1..{MAX_ADMIN_PAGE} (default {MAX_ADMIN_PAGE})", False, {"type": "integer"}),
        query("after", "next_after of the page before", False),
    ),
    admin=True,
)
async def admin_users(request: Request) -> Response:
    operator = await operator_of(request)
    limit = parse_count(request.query_params.get("limit", str(MAX_ADMIN_PAGE)), "limit")
    if not 1 <= limit <= MAX_ADMIN_PAGE:
        raise Refused(422, f"limit must be 1..{MAX_ADMIN_PAGE}")
    after = request.query_params.get("after", "")
    if NOT_TEXT.search(after):
        raise Refused(422, "after must be a user's name (next_after of the page before)")
    return JSONResponse(await operator.users(after, limit), headers=NO_STORE)


@API.route(
    "/admin/users",
    ["POST"],
    "Create a user (whatever SIGNUP says); the access token is shown only in this answer",
    {
        201: answer("the new user", "NewUser"),
        408: BODY_LIMITS[408],
        409: error("a user with that name exists"),
        413: error("body too large"),
        422: error("not JSON, or a bad name"),
        **UNAVAILABLE,
    },
    body={"application/json": {"schema": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}},
    admin=True,
)
async def admin_create_user(request: Request) -> Response:
    operator = await operator_of(request)
    name = valid_name((await json_payload(request)).get("name"))
    return JSONResponse(await operator.create(name), status_code=201, headers=NO_STORE)


@API.route("/admin/users/{user_id}", ["GET"], "One user's usage and quota", {200: USAGE, **UNAVAILABLE}, parameters=USER_PATH, admin=True)
async def admin_user(request: Request) -> Response:
    operator = await operator_of(request)
    return JSONResponse(await operator.user(request.path_params["user_id"]), headers=NO_STORE)


@API.route(
    "/admin/users/{user_id}",
    ["DELETE"],
    "Delete a user with every record and unfinished upload: its links stop working at once",
    {204: answer("deleted"), **UNAVAILABLE},
    parameters=USER_PATH,
    admin=True,
)
async def admin_delete_user(request: Request) -> Response:
    operator = await operator_of(request)
    await operator.delete(request.path_params["user_id"])
    return Response(status_code=204)


@API.route(
    "/admin/users/{user_id}/quota",
    ["PUT"],
    "Set the user's own quota (null: unlimited), over USER_QUOTA_MB",
    {200: USAGE, 408: BODY_LIMITS[408], 413: error("body too large"), 422: error("quota_mb missing or not a number >= 0 or null"), **UNAVAILABLE},
    parameters=USER_PATH,
    body={
        "application/json": {
            "schema": {"type": "object", "required": ["quota_mb"], "properties": {"quota_mb": {"type": "number", "minimum": 0, "nullable": True}}}
        }
    },
    admin=True,
)
async def admin_set_quota(request: Request) -> Response:
    operator = await operator_of(request)
    payload = await json_payload(request)
    if "quota_mb" not in payload:
        raise Refused(422, 'send {"quota_mb": <MiB, or null for unlimited>}')
    megabytes = payload["quota_mb"]
    if megabytes is not None:
        megabytes = parse_admin_number(payload, "quota_mb", 0, 0, MAX_QUOTA_MB)
    quota = None if megabytes is None else int(megabytes * MIB)
    return JSONResponse(await operator.quota(request.path_params["user_id"], quota))


@API.route(
    "/admin/users/{user_id}/quota",
    ["DELETE"],
    "Clear the user's own quota: USER_QUOTA_MB applies again",
    {200: USAGE, **UNAVAILABLE},
    parameters=USER_PATH,
    admin=True,
)
async def admin_clear_quota(request: Request) -> Response:
    operator = await operator_of(request)
    return JSONResponse(await operator.quota(request.path_params["user_id"], DEFAULT_QUOTA))


@API.route(
    "/admin/users/{user_id}/token",
    ["POST"],
    "Give the user a new access token (the old one stops working at once); shown only in this answer",
    {201: answer("the new token", "NewUser"), **UNAVAILABLE},
    parameters=USER_PATH,
    admin=True,
)
async def admin_new_token(request: Request) -> Response:
    operator = await operator_of(request)
    return JSONResponse(await operator.token(request.path_params["user_id"]), status_code=201, headers=NO_STORE)


async def operator_of(request: Request) -> Operator:
    """The operator, authenticated by `Authorization: Bearer <ADMIN_TOKEN>`; without ADMIN_TOKEN the routes are absent (404)."""
    services = services_of(request)
    if not services.settings.admin_token:
        raise Refused(404, NOT_FOUND)
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused(401, "send Authorization: Bearer <ADMIN_TOKEN>", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(hash_token(token.strip()), services.settings.admin_token_sha256):
        raise Refused(403, "wrong admin token")
    return Operator(services.store)


async def json_payload(request: Request, required: bool = True) -> dict[str, Any]:
    body = await BodyReader(request, MAX_JSON_BODY, services_of(request).settings).read()
    return parse_json(body, "request body") if body.strip() or required else {}


def parse_admin_number(payload: Mapping[str, Any], name: str, default: float, low: float, high: float, integer: bool = False) -> float:
    value = payload.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)) or not low <= value <= high:
        raise Refused(422, f"{name} must be {'an integer' if integer else 'a number'} from {number_text(low)} to {number_text(high)}")
    return value


def number_text(number: float) -> str:
    """A bound as people write it: 1000000, 0.000278, not 1e+06."""
    return str(int(number)) if number == int(number) else f"{number:.6f}".rstrip("0")


@API.route(
    "/", ["GET"], "The page for people: drop WAVs, get MP3s (its script and styles under /static/)", {200: answer("the page", media="text/html")}
)
async def page(request: Request) -> Response:
    """The page: plain HTML, script and styles from static/, no build step and no CDN, so it works offline."""
    return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


@API.route("/health", ["GET"], "Is the database reachable", {200: answer("healthy", "Health"), **UNAVAILABLE})
async def health(request: Request) -> Response:
    await services_of(request).store.ping()
    return JSONResponse({"status": "ok"})


@API.route("/openapi.json", ["GET"], "", {})
async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document(bool(services_of(request).settings.admin_token)))


@API.route("/metrics", ["GET"], "Prometheus metrics", {200: answer("the text exposition format", {"type": "string"}, media="text/plain")})
async def metrics(request: Request) -> Response:
    registry = METRICS
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several worker processes: add up their files
        registry = CollectorRegistry()
        prometheus_client.multiprocess.MultiProcessCollector(registry)
    return Response(prometheus_client.generate_latest(registry), media_type=prometheus_client.CONTENT_TYPE_LATEST)


@API.route("/docs", ["GET"], "", {})
async def docs(request: Request) -> Response:
    """Swagger UI for /openapi.json, its assets served from the swagger-ui-bundle package: no CDN, works offline."""
    return HTMLResponse(DOCS_PAGE)


# 1. Client input ##################################################################
# Every number, JSON object, name and id a client sends is read by one function each, here.


# 18 digits: every count a client may send (bytes, offsets, kbps) fits a 64-bit integer.
ASCII_COUNT = re.compile(r"[0-9]{1,18}")


def parse_count(text: str, name: str, status: int = 422) -> int:
    """The one reading of a number a client sends (headers, query, form fields): ASCII digits, at most 18 of them.

    `str.isdigit()` and `int()` accept superscripts and other scripts' digits, and `int()` refuses more
    than 4300 digits with a ValueError (a 500 if unchecked): nothing a client sends reaches either unchecked.
    """
    if ASCII_COUNT.fullmatch(text) is None:
        raise Refused(status, f"{name} must be a whole number in ASCII digits (at most 18 of them)")
    return int(text)


def parse_json(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        raise Refused(422, f"{what} is not valid JSON") from None
    except RecursionError:
        raise Refused(422, f"{what} is JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise Refused(422, f"{what} must be a JSON object")
    return value


# Control characters, and the lone surrogates JSON escapes can make (text that UTF-8 cannot encode).
NOT_TEXT = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def valid_name(value: Any) -> str:
    if not isinstance(value, str):
        raise Refused(422, "name is required and must be a string")
    name = value.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise Refused(422, f"name must be 1..{MAX_NAME_CHARS} characters")
    if NOT_TEXT.search(name):
        raise Refused(422, "name must not contain control characters")
    return name


UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_uuid(value: Any) -> str | None:
    """A UUID in its usual form (8-4-4-4-12 hex digits), lower-cased; None for anything else."""
    return value.lower() if isinstance(value, str) and UUID_TEXT.fullmatch(value) else None


# The headers of a resumable upload (tus 1.0.0).
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
METADATA_KEY = re.compile(r"[^\s,]+")


def upload_length(request: Request, settings: Settings, deferrable: bool = True) -> int:
    """Upload-Length: 400 without one (or `Upload-Defer-Length: 1` at creation: then 0, not known yet), 413 past
    MAX_UPLOAD_MB, 422 for an empty file."""
    text, deferred = request.headers.get("upload-length"), request.headers.get("upload-defer-length")
    if deferrable and deferred is not None:
        if deferred.strip() != "1" or text is not None:
            raise Refused(400, "send either Upload-Length, or Upload-Defer-Length: 1 and the length with a later PATCH")
        return DEFERRED
    if text is None:
        raise Refused(400, "send Upload-Length, the file's size in bytes, or Upload-Defer-Length: 1 if it is not known yet")
    return checked_length(parse_count(text, "Upload-Length", 400), settings)


def checked_length(length: int, settings: Settings) -> int:
    """A file's length as a client declares it: 413 past MAX_UPLOAD_MB, 422 for an empty file."""
    if length > settings.max_upload_bytes:
        raise Refused(413, f"Upload-Length is larger than the {settings.max_upload_mb} MiB limit (Tus-Max-Size)")
    if length == 0:
        raise BadWav("the file is empty (its length is 0 bytes)")  # no audio_file here: a resumable upload's
    return length


def upload_metadata(header: str, named: bool = True) -> tuple[str, dict[str, int]]:
    """Upload-Metadata (`key base64(value)` pairs, comma-separated): the file name (required if `named`, else "" when
    missing), and the encoding options of FORM_OPTIONS under their own names. Other keys (filetype, relativePath...)
    are read and let be."""
    if len(header) > MAX_FIELD_BYTES:
        raise Refused(422, f"Upload-Metadata is longer than {MAX_FIELD_BYTES} bytes")
    pairs: dict[str, str] = {}
    for item in header.split(",") if header.strip() else ():
        key, _, encoded = item.strip().partition(" ")
        if not METADATA_KEY.fullmatch(key) or key in pairs:
            raise Refused(422, "Upload-Metadata must be comma-separated `key base64(value)` pairs, each key once")
        try:
            pairs[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise Refused(422, f"Upload-Metadata's {key} is not base64 of UTF-8 text") from None
    if "filename" not in pairs and named:
        raise Refused(422, "Upload-Metadata needs a filename")
    form: dict[str, int] = {}
    for name in FORM_OPTIONS.keys() & pairs.keys():
        add_option(form, name, pairs[name])
    return clean_filename(pairs["filename"], "Upload-Metadata's filename") if "filename" in pairs else "", form


def creation_room(length: int | None, settings: Settings) -> tuple[int, str]:
    """What a creation's first piece may hold, and the bound that says so: the length told, or else MAX_UPLOAD_MB."""
    return (length, "Upload-Length") if length else (settings.max_upload_bytes, "MAX_UPLOAD_MB")


def upload_checksum(request: Request, remaining: int, bound: str, settings: Settings) -> tuple[Callable[[], Any], bytes] | None:
    """A piece of a resumable upload: 413 when it declares more bytes than are left (`remaining`, as `bound` says), or,
    with a checksum, more than MAX_CHECKED_PIECE_MB; its Upload-Checksum (tus checksum extension: `<algorithm> <base64
    digest>` of this request's bytes), if any."""
    declared = request.headers.get("content-length")
    size = None if declared is None else parse_count(declared, "Content-Length", 400)
    if size is not None and size > remaining:
        raise piece_too_large(remaining, bound)
    header = request.headers.get("upload-checksum")
    if header is None:
        return None
    if size is not None and size > settings.max_checked_piece_bytes:
        raise checked_piece_too_large(settings)
    name, _, encoded = header.strip().partition(" ")
    algorithm = CHECKSUMS.get(name.lower())
    if algorithm is None:
        raise Refused(400, f"Upload-Checksum's algorithm must be one of {', '.join(CHECKSUMS)}")
    digest = b""
    with contextlib.suppress(ValueError):
        digest = base64.b64decode(encoded.strip(), validate=True)
    if len(digest) != algorithm().digest_size:
        raise Refused(400, f"Upload-Checksum must be `{name} <base64 of the {algorithm().digest_size}-byte digest>`")
    return algorithm, digest


def checked_piece_too_large(settings: Settings) -> Refused:
    limit = settings.max_checked_piece_bytes
    return Refused(413, f"a piece with Upload-Checksum is at most {limit} bytes (MAX_CHECKED_PIECE_MB): send smaller pieces", CLOSE)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def has_body(request: Request) -> bool:
    return request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers


# 2. Request bodies ################################################################


class BodyReader:
    """A request body, chunk by chunk, within the size limit, the idle timeout and the minimum rate.

    The one way bodies are read: POST /users reads it whole, POST /users/wav chunk by chunk,
    and a refused request drains what is left so that the client, still sending, sees the answer.
    The rate is measured on a clock that runs only while the service waits for the client, so time
    the service itself takes (the encoder pool, the database) never counts against a client; a
    client that sends a byte now and then resets the idle timeout but not this average.
    """

    def __init__(self, request: Request, limit: int, settings: Settings, too_much: BodyCut | None = None) -> None:
        self.request = request
        self.limit = limit
        self.too_much = too_much or too_large(limit)  # what a body past the limit is answered
        self.idle_timeout = settings.upload_idle_timeout
        self.min_rate, self.window = settings.min_upload_rate, settings.min_rate_window
        self.received = 0
        self.waited = 0.0  # seconds spent waiting for the client
        self._marks: deque[tuple[float, int]] = deque([(0.0, 0)])  # (waited, received) within the last window
        declared = request.headers.get("content-length")
        if declared is not None and parse_count(declared, "Content-Length", 400) > limit:
            raise self.too_much
        self._more = True

    async def _next(self) -> bytes | None:
        """The next chunk; None at the end of the body.

        ASGI's receive() itself rather than Starlette's request.stream(): that generator keeps the last
        chunk while it waits for the next, and a thousand waiting uploads would keep a chunk each.
        """
        if not self._more:
            return None
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.idle_timeout):
                message = await self.request.receive()
        except TimeoutError:
            SLOW_CLIENTS.labels("stalled").inc()
            raise BodyCut(408, f"upload stalled for {self.idle_timeout:g} s") from None
        finally:
            self.waited += time.monotonic() - started
        if message["type"] == "http.disconnect":
            raise BodyCut(400, "client disconnected mid-upload")
        self._more = message.get("more_body", False)
        return message.get("body", b"")  # type: ignore[no-any-return]

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._next()) is not None:
            self.received += len(chunk)
            if self.received > self.limit:
                if (within := len(chunk) - (self.received - self.limit)) > 0:
                    yield chunk[:within]  # the bytes up to the limit (a resumable upload keeps them)
                raise self.too_much
            self._check_rate()
            if chunk:
                yield chunk
            del chunk  # not held while the next one is awaited: with many uploads, that is a chunk each

    def _check_rate(self) -> None:
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= self.waited - self.window:
            marks.popleft()
        since, then = marks[0]
        if self.min_rate and self.waited - since >= self.window and self.received - then < self.min_rate * (self.waited - since):
            SLOW_CLIENTS.labels("too_slow").inc()
            raise BodyCut(408, f"upload slower than {self.min_rate} bytes/s over {self.window:g} s")
        marks.append((self.waited, self.received))

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def drain(self, limit: int, seconds: float | None = None) -> None:
        """Read and drop up to `limit` more bytes (for at most `seconds`), so that a client still sending can read the answer."""
        if self.request.headers.get("expect", "").lower() == "100-continue" and not self.received:
            return  # it waits for our verdict before sending its body: answer at once
        with contextlib.suppress(Refused, TimeoutError):  # a stall, a disconnect or the deadline ends the favour
            async with asyncio.timeout(seconds):
                while limit > 0 and (chunk := await self._next()) is not None:
                    limit -= len(chunk)


# 3. Multipart parts ###############################################################


@dataclasses.dataclass(frozen=True)
class Part:
    """A multipart part: its name, and the parameters of its Content-Disposition (a file's name...)."""

    name: str
    params: Mapping[str, str]  # latin-1 text of the header's bytes: UTF-8 names are decoded later


# A parameter of Content-Disposition (RFC 6266 §4.1): a token name, then a token or a quoted-string, whose
# escapes hide any ';' or '=' inside it; read one after the other, so a name inside a quoted value never counts.
DISPOSITION_PARAM = re.compile(r'\s*;\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)\s*')


def disposition_params(header: bytes) -> tuple[str, dict[str, str]]:
    """The kind (form-data) and the parameters of a Content-Disposition; the first of a repeated name wins."""
    text = header.decode("latin-1")
    kind = text.partition(";")[0]
    params: dict[str, str] = {}
    position = len(kind)
    while match := DISPOSITION_PARAM.match(text, position):
        name, value = match.group(1).lower(), match.group(2)
        if value.startswith('"'):
            value = value[1:-1].replace("\\\\", "\\").replace('\\"', '"')  # the escapes clients use (python-multipart's reading)
        params.setdefault(name, value)
        position = match.end()
    return kind.strip().lower(), params


PartEvent = tuple[Literal["start"], Part] | tuple[Literal["data"], bytes] | tuple[Literal["end"], None]


class MultipartReader:
    """multipart/form-data bytes in, part events out; what a part means is decided elsewhere.

    Like Starlette's own MultiPartParser, on python-multipart's push parser, but it hands the
    parts over as they stream in instead of collecting them.
    """

    def __init__(self, content_type: str) -> None:
        kind, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise Refused(422, "request must be multipart/form-data with a boundary")
        self.complete = False
        self._events: list[PartEvent] = []
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        callbacks = {
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": lambda data, start, end: self._events.append(("data", data[start:end])),
            "on_part_end": lambda: self._events.append(("end", None)),
            "on_end": self._on_end,
        }
        try:
            self._parser = MultipartParser(boundary, callbacks, max_header_count=16, max_header_size=8192)  # type: ignore[arg-type]
        except ValueError:
            raise Refused(422, "multipart boundary is invalid") from None

    def feed(self, chunk: bytes) -> list[PartEvent]:
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            raise Refused(422, "multipart body is malformed") from None
        events, self._events = self._events, []
        return events

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        kind, params = disposition_params(self._headers.get(b"content-disposition", b""))
        self._headers = {}
        if kind != "form-data" or "name" not in params:
            raise Refused(422, "a multipart part has no Content-Disposition: form-data name")
        self._events.append(("start", Part(params["name"], params)))

    def _on_end(self) -> None:
        self.complete = True


# RFC 8187 (RFC 5987) ext-value: charset'language'percent-encoded.
EXT_VALUE = re.compile(r"([A-Za-z0-9!#$&+^`{}~-]+)'[A-Za-z0-9-]*'(.*)")


def disposition_filename(params: Mapping[str, str], what: str = "audio_file") -> str:
    """The file name a client meant in a Content-Disposition (a part's, or a draft upload's): `filename*` when sent,
    else `filename` with the HTML form escapes undone; 422, naming where it is (`what`), without one."""
    if "filename*" in params:
        extended = EXT_VALUE.fullmatch(params["filename*"])
        if extended is None:
            raise Refused(422, f"{what} filename* is not charset'language'percent-encoded (RFC 8187)")
        charset, encoded = extended.groups()
        if charset.lower() not in ("utf-8", "iso-8859-1"):  # RFC 8187 §3.2.1: the two a recipient must support
            raise Refused(422, f"{what} filename* must be UTF-8 or ISO-8859-1")
        try:
            return unquote_to_bytes(encoded).decode(charset)
        except UnicodeDecodeError:
            raise Refused(422, f"{what} name is not valid {charset}") from None
    raw = params.get("filename")
    if raw is None:
        raise Refused(422, "audio_file part has no filename")
    try:
        name = raw.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(422, f"{what} name is not valid UTF-8") from None
    # The HTML form encoding (WHATWG, "multipart/form-data encoding algorithm") escapes these three in names.
    return name.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")


def clean_filename(name: str, what: str = "audio_file") -> str:
    """The name less any directories; 422, naming where the client put it (`what`), when nothing sensible remains."""
    name = re.split(r"[/\\]", name)[-1]
    if name in ("", ".", ".."):
        raise Refused(422, f"{what} has an empty file name")
    if NOT_TEXT.search(name):
        raise Refused(422, f"{what} name contains control characters, or is not text")
    if len(name.encode("utf-8")) > MAX_FILENAME_BYTES:
        raise Refused(422, f"{what} name is longer than {MAX_FILENAME_BYTES} bytes")
    return name


# 4. Authentication ################################################################
# Who is asking: the client's address (for the per-client shares, before credentials), then the user.


def client_address(scope: Any, settings: Settings) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy (TRUSTED_PROXIES), the last address
    in `X-Forwarded-For` (or `Forwarded: for=`, RFC 7239 §5.2) that is not itself a trusted proxy. Only what
    trusted proxies appended counts: a client may put anything first."""
    peer = scope["client"][0] if scope.get("client") else ""
    if not is_trusted(peer, settings):
        return peer
    headers = {name.decode(): value.decode("latin-1") for name, value in scope["headers"] if name in (b"x-forwarded-for", b"forwarded")}
    if "forwarded" in headers:
        hops = [found.group(1) for found in FORWARDED_FOR.finditer(headers["forwarded"])]
    else:
        hops = headers.get("x-forwarded-for", "").split(",")
    for address in map(forwarded_address, reversed(hops)):
        if address and not is_trusted(address, settings):
            return address
    return peer


FORWARDED_FOR = re.compile(r'for=("[^"]*"|[^;,\s]*)', re.IGNORECASE)


def forwarded_address(hop: str) -> str:
    """An address as a proxy writes it: `192.0.2.1`, `192.0.2.1:4711`, `"[2001:db8::1]:4711"`, `2001:db8::1`."""
    hop = hop.strip().strip('"')
    if hop.startswith("["):
        return hop[1:].split("]", 1)[0]
    return hop.rsplit(":", 1)[0] if hop.count(":") == 1 else hop


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def authenticate(store: Store, user_id: str | None, token: str | None) -> str:
    """The user's id when `token` is its current access token; 403, one message for every reason, otherwise."""
    stored = await store.token_hash(user_id) if user_id and token else None
    # Compare even for an unknown user, so the answer takes the same time either way.
    matches = hmac.compare_digest(stored or "0" * 64, hash_token(token or ""))
    if not matches or stored is None or user_id is None:
        raise Refused(403, FORBIDDEN)
    return user_id


def bearer_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer <token>` (RFC 6750 §2.1), None when it is not a UUID (403 follows); 401 without one."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused(401, "send Authorization: Bearer <access_token>", {"WWW-Authenticate": "Bearer"})
    return parse_uuid(token.strip())


async def owner(request: Request) -> tuple[str, str]:
    """The owner's routes: the user of the path, authenticated by `Authorization: Bearer`; (user id, token)."""
    token = bearer_token(request)
    user_id = await authenticate(services_of(request).store, parse_uuid(request.path_params["user_id"]), token)
    assert token is not None  # authenticate() refused a missing one
    return user_id, token


async def owned_upload(request: Request) -> tuple[StoredUpload, str]:
    """The upload of the path, of its user authenticated as owner() does; (upload, token)."""
    user_id, token = await owner(request)
    upload_id = parse_uuid(request.path_params["upload_id"])
    upload = await services_of(request).store.find_upload(upload_id, user_id) if upload_id else None
    if upload is None:
        raise Refused(404, NO_SUCH_UPLOAD)
    return upload, token


def data_credentials(body: bytes) -> tuple[str, str]:
    """The upload's `data` part: {"user_id": uuid, "access_token": uuid}, or 422."""
    payload = parse_json(body, "data")
    user_id, token = payload.get("user_id"), payload.get("access_token")
    if not isinstance(user_id, str) or not isinstance(token, str):
        raise Refused(422, "data must hold string fields user_id and access_token")
    parsed_user, parsed_token = parse_uuid(user_id), parse_uuid(token)
    if parsed_user is None or parsed_token is None:
        raise Refused(422, "user_id and access_token must be UUIDs")
    return parsed_user, parsed_token


# 5. The upload form ###############################################################
# POST /users/wav's parts, in whatever order they come: `data` (the credentials), `audio_file` (fed to
# an upload session as it arrives) and the encoding options of FORM_OPTIONS.


@dataclasses.dataclass(frozen=True)
class Mp3Options:
    """How to encode: from the settings, overridden per upload by the form's options."""

    bitrate: int | None  # CBR kbps; None for VBR
    vbr_quality: int | None = None  # LAME -V, 0 (best) .. 9
    channels: int | None = None  # 1 or 2; None: the WAV's, at most 2
    quality: int = 3  # LAME -q
    id3_version: int = 4  # of the tag: 3 or 4 (ID3v2.3, ID3v2.4)

    @classmethod
    def of(cls, form: Mapping[str, int], settings: Settings) -> Mp3Options:
        """The form's options over the settings: a form's bitrate means CBR, its vbr_quality VBR."""
        if "bitrate" in form or ("vbr_quality" not in form and settings.mp3_vbr_quality is None):
            bitrate, vbr_quality = form.get("bitrate", settings.mp3_bitrate), None
        else:
            bitrate, vbr_quality = None, form.get("vbr_quality", settings.mp3_vbr_quality)
        id3_version = form.get("id3_version") or FORM_OPTIONS["id3_version"].parse(settings.id3_version)
        return cls(bitrate, vbr_quality, form.get("channels"), settings.mp3_quality, id3_version)

    def same_audio(self, other: Mp3Options) -> bool:
        """Whether `other` encodes the audio as these do (the ID3 version changes only the tag, made at the end)."""
        return dataclasses.replace(other, id3_version=self.id3_version) == self


def add_option(form: dict[str, int], name: str, text: str) -> None:
    """One option of FORM_OPTIONS into `form`: 422 for a bad value, a repeated one, or two of one group."""
    option = FORM_OPTIONS[name]
    if name in form:
        raise Refused(422, f"more than one {name}: send it once")
    form[name] = option.parse(text)
    rivals = [other for other in form if other != name and FORM_OPTIONS[other].group == option.group]
    if rivals:
        raise Refused(422, f"{rivals[0]} and {name} exclude each other (CBR or VBR): send one of them")


class FormUpload:
    """What the parts of one POST /users/wav mean, acted on as they arrive.

    Parts may come in any order. When `data` comes before the audio (httpx and curl send fields
    first) the credentials and the file name are checked before any audio is decoded; a refused
    request then only reads and discards the rest of its body, and is answered once the body has
    been read (a client still sending rarely sees an early answer). The audio goes to an upload
    session as it arrives; an option sent after it means encoding again (UploadSession.finish).
    A name already taken stops the conversion but not the reading of the parts, so that a
    malformed part after it is the answer (422), not the name (409).
    """

    def __init__(self, services: Services, parts: MultipartReader, slot: UploadSlot) -> None:
        self.services = services
        self.parts = parts
        self.slot = slot  # its user's share is taken once the user is known
        self.started = time.perf_counter()
        self.refusal: Refused | None = None  # the answer: the rest of the body is discarded
        self.conflict: NameTaken | None = None  # the answer unless a refusal comes up
        self.user_id: str | None = None
        self.token: str | None = None
        self.filename: str | None = None
        self.options: dict[str, int] = {}
        self.session: UploadSession | None = None
        self.usage: Usage | None = None  # the user's, once known: its quota bounds the MP3
        self.mp3: Mp3File | None = None
        self._part: str | None = None  # name of the part being received, if one we use
        self._field = bytearray()
        self._count = 0

    async def receive(self, body: BodyReader) -> None:
        """Read the whole body, acting on each part; a refusal stops the work but not the reading."""
        try:
            async for chunk in body.chunks():
                if self.refusal is None:
                    try:
                        for event in self.parts.feed(chunk):
                            await self._act_on(event)
                    except Refused as error:
                        self.refusal = error
                        self.close()
                del chunk  # while the next chunk is awaited, hold nothing of this one (see BodyReader.chunks)
                if self._part == "audio_file" and (session := self._live_session()) is not None:
                    await session.room()  # audio is read only when there is room for it: else TCP holds it
        except Refused as error:
            if error.status == 413:
                await body.drain(DRAIN_BYTES)
            raise
        if self.refusal is not None:
            raise self.refusal

    def _live_session(self) -> UploadSession | None:
        """The session, while its conversion can still be the answer."""
        return self.session if self.refusal is None and self.conflict is None else None

    async def _act_on(self, event: PartEvent) -> None:
        if event[0] == "start":
            await self._begin_part(event[1])
        elif event[0] == "end":
            await self._end_part()
        elif self._part == "audio_file":
            if (session := self._live_session()) is not None:
                await session.feed(event[1])
                if self.usage is not None and self.usage.quota_bytes is not None and not session.keeps_audio:  # as soon as it shows
                    self.usage.admit(session.least_mp3_bytes(), "this MP3")  # (an option still to come may make it smaller)
        elif self._part is not None:
            self._field += event[1]
            if len(self._field) > MAX_FIELD_BYTES:
                raise Refused(422, f"form field {self._part!r} is larger than {MAX_FIELD_BYTES} bytes")

    async def _begin_part(self, part: Part) -> None:
        self._count += 1
        if self._count > MAX_PARTS:
            raise Refused(422, f"more than {MAX_PARTS} multipart parts")
        self._part = part.name if part.name in ("audio_file", "data") or part.name in FORM_OPTIONS else None
        self._field = bytearray()
        if part.name == "audio_file":
            if self.filename is not None:
                raise Refused(422, "more than one audio_file part")
            self.filename = clean_filename(disposition_filename(part.params))
            # Until every group of encoding options has its value, one still to come could change the encoding.
            groups = {option.group for option in FORM_OPTIONS.values() if not option.tag_only}
            settled = groups <= {FORM_OPTIONS[name].group for name in self.options}
            options = Mp3Options.of(self.options, self.services.settings)
            self.session = UploadSession(options, self.services.encoders, self.slot.owner, options_may_change=not settled)
            await self._check_name_free()

    async def _end_part(self) -> None:
        part, self._part = self._part, None
        if part == "data":
            if self.user_id is not None:
                raise Refused(422, "more than one data part")
            user_id, token = data_credentials(bytes(self._field))
            self.user_id = await authenticate(self.services.store, user_id, token)
            self.token = token
            self.slot.take_user(self.user_id)
            self.usage = await self.services.store.usage(self.user_id)
            if self.usage is not None:
                self.usage.admit(1, "this upload")  # nothing left at all: say so before any audio
            if self.session is not None:
                self.session.owner = self.slot.owner  # the audio came first: its blocks wait for the user's turn from now on
            await self._check_name_free()
        elif part in FORM_OPTIONS:
            add_option(self.options, part, self._field.decode("latin-1"))

    async def _check_name_free(self) -> None:
        # Saves the conversion when the answer is already known; the UNIQUE constraint decides races.
        if self.user_id is not None and self.filename is not None and (holder := await self.services.store.name_holder(self.user_id, self.filename)):
            self.conflict = NameTaken(self.filename, holder)  # the parts go on being read: one of them may yet be the answer
            self.close()

    async def converted(self) -> Mp3File:
        """After the body: the finished MP3 (encoded again for an option that came after the audio), or the refusal."""
        if not self.parts.complete:
            raise Refused(422, "multipart body ended before its closing boundary")
        if self.user_id is None:
            raise Refused(422, "the data part is missing")
        if self.session is None:
            raise Refused(422, "the audio_file part is missing")
        if self.conflict is not None:
            raise self.conflict
        self.mp3 = await self.session.finish(Mp3Options.of(self.options, self.services.settings))
        return self.mp3

    def new_record(self, mp3: Mp3File) -> NewRecord:
        assert self.user_id is not None and self.filename is not None and self.token is not None
        return NewRecord.of(mp3, self.user_id, self.token, self.filename)

    def close(self) -> None:
        """Whatever happened, leave nothing behind."""
        if self.session is not None:
            self.session.close()
        if self.mp3 is not None:
            self.mp3.close()


# 6. Upload sessions ###############################################################
# A session is what outlives a request: the file's offset and its conversion (UploadSession, in chapter 7).
# POST /users/wav feeds one session with one request; a resumable upload (tus) feeds one with as many
# requests as it takes. Its bytes are stored in the database as they come (upload_chunks, through
# Store in chapter 11), so any replica can go on with an upload after a restart; the process that has an
# upload's live session goes on with it as it is, and one that has not (a restart, another replica, a
# session let go while paused) re-encodes the stored bytes first, at LAME speed. nginx sends an upload's
# requests to one replica (deploy/nginx.conf), so that this stays the exception.


class ResumableUpload:
    """A resumable upload this process converts: its session (the live encoder) and the bytes fed but not stored yet.

    One request, or one catch-up, at a time holds its `turn`. Its session is trusted only where it stands
    exactly where the database does: otherwise `catch_up` starts it anew from the stored bytes. An upload
    ended while someone holds its turn is closed by that holder, when the turn ends.
    """

    def __init__(self, upload: StoredUpload, services: Services) -> None:
        self.upload = upload
        self.turn = asyncio.Lock()
        self.holder = ""  # who holds the turn: "request" or "catch-up" (a request's too, while it catches up)
        self.callers = 0  # requests on their way to the turn
        self.ended = False
        self.paused_since = time.monotonic()
        self.mp3: Mp3File | None = None  # finished, not stored yet: the database was down
        self._services = services
        self._session: UploadSession | None = None
        self._stored = 0  # bytes of the file in the database; the session has been fed these and the pending ones
        self._pending = bytearray()
        self.token_sha256 = ""  # of the request feeding it: its bytes are stored only while that token is the user's

    async def catch_up(self) -> None:
        """Stand where the database stands (`upload`): go on as it is, or start anew and feed the stored bytes."""
        if (self._session is not None or self.upload.partial) and self._stored == self.upload.received and not self._pending:
            return
        self.close()
        if self.upload.partial:  # bytes only: they are converted with the final upload
            self._stored = self.upload.received
            return
        options = Mp3Options.of(self.upload.options, self._services.settings)
        self._session = UploadSession(options, self._services.encoders, user_share(self.upload.user_id))  # a cold resume is its user's cost
        holder, self.holder = self.holder, "catch-up"
        try:
            async for piece in self._services.store.upload_pieces(self.upload.upload_id, self.upload.received):
                await self.room()
                await self.feed(piece, stored=True)
        finally:
            self.holder = holder
        if self.upload.received:
            RESUMABLE_UPLOADS.labels("resumed").inc()
        self._stored = self.upload.received

    async def room(self) -> None:
        if self._session is not None:
            await self._converting(self._session.room())

    async def feed(self, data: bytes, stored: bool = False) -> None:
        """The file's next bytes: converted now, and (unless they come from the database) stored with the next FLUSH_BYTES."""
        if self.ended or (self._session is None and not self.upload.partial):
            raise Refused(404, NO_SUCH_UPLOAD)  # terminated or expired meanwhile
        if self._session is not None:
            await self._converting(self._session.feed(data))
        if not stored:
            self._pending += data
            if len(self._pending) >= FLUSH_BYTES:
                await self.store_pending()

    async def store_pending(self) -> int:
        """Store the bytes fed since the last time: from now on they are acknowledged. The stored offset."""
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            try:
                store = self._services.store
                if not await store.append_upload(self.upload.upload_id, self._stored, data, self.token_sha256):
                    if await store.token_hash(self.upload.user_id) != self.token_sha256:
                        raise Refused(403, FORBIDDEN)  # the token was replaced or the user deleted while the request ran
                    now_there = await store.find_upload(self.upload.upload_id, self.upload.user_id)
                    if now_there is None:
                        raise Refused(404, NO_SUCH_UPLOAD)
                    raise Refused(409, "this upload went on elsewhere meanwhile: send from its offset", {"Upload-Offset": str(now_there.received)})
            except BaseException:
                self.close()  # fed but not stored (gone on elsewhere, the database down, the request cancelled): next time, start from what is
                raise
            self._stored += len(data)
        return self._stored

    async def finish(self) -> Mp3File:
        """The MP3 once every byte is stored (kept if it cannot be stored yet)."""
        if self.mp3 is None:
            assert self._session is not None
            self.mp3 = await self._converting(self._session.finish())
        return self.mp3

    async def _converting(self, work: Awaitable[T]) -> T:
        try:
            return await work
        except BaseException:
            self.close()  # a conversion that failed midway (a block, the disk) cannot go on: next time, start over from what is stored
            raise

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        if self.mp3 is not None:
            self.mp3.close()
            self.mp3 = None
        self._pending = bytearray()


class ResumableUploads:
    """This process's live resumable uploads: one request at a time feeds each; a paused one keeps its session
    for PAUSED_UPLOAD_SECONDS, and only the MAX_PAUSED_UPLOADS most recent do (1,000 paused uploads cost
    nothing but their rows). Ending, terminating and expiring uploads is here too."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._live: dict[str, ResumableUpload] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # catching up, storing records, purging: kept until done
        self._completing: dict[str, asyncio.Task[StoredUpload]] = {}
        self._purge_again = False
        settings = services.settings
        self._bounds = UnfinishedBounds(settings.max_unfinished_uploads, settings.max_unfinished_bytes, settings.unfinished_storage_bytes())
        # A full budget (met in an encoder thread) lets every paused session go too, so that the next try fits.
        services.encoders.disk.on_full = functools.partial(asyncio.get_running_loop().call_soon_threadsafe, self.let_go, True)

    async def create(
        self, user_id: str, token: str, filename: str, options: dict[str, int], length: int, metadata: str, bounded: bool = True, upload_id: str = ""
    ) -> StoredUpload:
        created = datetime.now(UTC)
        expires = created + timedelta(hours=self._services.settings.upload_expiry_hours)
        upload_id = upload_id or str(uuid.uuid4())
        upload = StoredUpload(upload_id, user_id, filename, options, length, 0, None, timestamp(expires), metadata, timestamp(created))
        if not await self._services.store.create_upload(upload, hash_token(token), timestamp(created), self._bounds if bounded else None):
            raise Refused(403, FORBIDDEN)  # the token was replaced meanwhile
        RESUMABLE_UPLOADS.labels("created").inc()
        return upload

    @contextlib.asynccontextmanager
    async def turn(self, upload: StoredUpload, wait: float | None = LOCK_WAIT_SECONDS, holder: str = "request") -> AsyncIterator[ResumableUpload]:
        """The upload's turn, standing where the database does when it begins; paused when it ends. Another request
        holding it longer than `wait` is 409 (a catch-up is waited out: it only re-encodes what is stored)."""
        live = self._live.get(upload.upload_id)
        if live is None:
            live = self._live[upload.upload_id] = ResumableUpload(upload, self._services)
            RESUMABLE_LIVE.inc()
        live.callers += 1  # from now on it is not let go of (let_go): this request would find it ended
        try:
            await asyncio.wait_for(live.turn.acquire(), None if live.holder == "catch-up" else wait)
        except TimeoutError:
            raise Refused(
                409,
                "another request is sending this upload's bytes: ask for its offset (HEAD) and try again",
                {"Upload-Offset": str(upload.received)},
            ) from None
        finally:
            live.callers -= 1
        live.holder = holder
        try:
            fresh = await self._services.store.find_upload(upload.upload_id, upload.user_id)
            if fresh is None or (live.ended and fresh.record_id is None):  # ended, not completed (by the holder before)
                live.ended = True
                raise Refused(404, NO_SUCH_UPLOAD)
            live.upload = fresh
            if fresh.record_id is None:
                await live.catch_up()
            yield live
        finally:
            live.holder = ""
            live.turn.release()
            live.paused_since = time.monotonic()
            if live.ended:
                self.forget(upload.upload_id)
            self.let_go()

    async def settled(self, upload: StoredUpload) -> StoredUpload:
        """The upload after a request of this process that is storing its last bytes (its connection just broke)
        has done so: a HEAD waits for it, a second at most, so that the offset it reports includes them."""
        live = self._live.get(upload.upload_id)
        if live is None or live.holder != "request":
            return upload
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LOCK_WAIT_SECONDS):
                await live.turn.acquire()
                live.turn.release()
        found = await self._services.store.find_upload(upload.upload_id, upload.user_id)
        if found is None:
            raise Refused(404, NO_SUCH_UPLOAD)
        return found

    async def completed(self, upload: StoredUpload, token: str) -> StoredUpload:
        """An upload with every byte stored but no record yet (its last PATCH met a database that could not store
        the record): store it now. 423 while that takes longer than a moment, or fails: ask again."""
        completion = self._completing.get(upload.upload_id)
        if completion is None:
            completion = self._completing[upload.upload_id] = self._in_background(self._complete_later(upload, token))
            completion.add_done_callback(lambda _: self._completing.pop(upload.upload_id, None))
        await asyncio.wait([completion], timeout=2 * LOCK_WAIT_SECONDS)
        if completion.done():
            with contextlib.suppress(Unavailable):
                return completion.result()
        raise Refused(423, "every byte is in and the record is being stored: ask again shortly", {"Retry-After": "2"})

    async def _complete_later(self, upload: StoredUpload, token: str) -> StoredUpload:
        async with self.turn(upload, wait=None) as live:
            if live.upload.record_id is None:
                await self.complete(live, token)
            return await self._services.store.find_upload(upload.upload_id, upload.user_id) or live.upload

    async def complete(self, live: ResumableUpload, token: str) -> StoredRecord:
        """Every byte is stored: the MP3, then the record, which claims the upload's completion in the same transaction."""
        upload, store = live.upload, self._services.store
        try:
            mp3 = await live.finish()
        except (BadWav, UnsupportedWav):
            await self.end(upload, "failed")
            raise
        mp3.rewind()
        record = NewRecord.of(mp3, upload.user_id, token, upload.filename)
        try:
            stored = await store.save_record(record, mp3, upload.upload_id)
        except Refused as gone:  # ended meanwhile, or completed by another request (a HEAD's, another replica's)
            if gone.status == 413:  # its MP3 passes the quota: it ends, as a bad WAV does, or every HEAD would encode it again
                await self.end(upload, "failed")
                raise
            if gone.status != 404:
                raise
            self.forget(upload.upload_id)
            now_there = await store.find_upload(upload.upload_id, upload.user_id)
            if now_there is None or now_there.record_id is None or (done := await store.find_record(now_there.record_id, upload.user_id)) is None:
                raise
            return done
        if stored is None:
            raise Refused(403, FORBIDDEN)  # the token was replaced meanwhile: the MP3 waits for the new one
        RESUMABLE_UPLOADS.labels("completed").inc()
        AUDIO_SECONDS.inc(stored.duration_seconds)
        self.forget(upload.upload_id)
        self.purge_soon()
        return stored

    async def end(self, upload: StoredUpload, why: str) -> None:
        """Terminated, failed or expired: the row goes now (and with it the file name), its bytes soon after."""
        await self._services.store.delete_upload(upload.upload_id, upload.user_id)
        RESUMABLE_UPLOADS.labels(why).inc()
        self.forget(upload.upload_id)
        self.purge_soon()

    def forget(self, upload_id: str) -> None:
        """Close an upload's live session; one whose turn is held is closed by its holder when the turn ends."""
        live = self._live.get(upload_id)
        if live is None:
            return
        live.ended = True
        if not live.turn.locked():
            live.close()
            del self._live[upload_id]
            RESUMABLE_LIVE.dec()

    def let_go(self, every_paused: bool = False, but: str = "") -> None:
        """Close the sessions of uploads paused too long, and of the least recent beyond MAX_PAUSED_UPLOADS (or of
        every paused one but `but`); they catch up from the database when they go on."""
        paused = sorted((live for live in self._live.values() if not live.turn.locked() and not live.callers), key=lambda live: live.paused_since)
        stale = time.monotonic() - PAUSED_UPLOAD_SECONDS
        for index, live in enumerate(paused):
            if (every_paused and live.upload.upload_id != but) or live.paused_since < stale or index < len(paused) - MAX_PAUSED_UPLOADS:
                self.forget(live.upload.upload_id)

    def make_room(self, but: str = "") -> None:
        """An upload begins: if the temporary disk is more than half taken, paused uploads give back what their
        sessions hold of it (their MP3s so far), since an active upload needs it more. On e37ff88 32 paused uploads
        held a 64 MiB budget for minutes while every bystander got 503."""
        disk = self._services.encoders.disk
        if disk.used * 2 > disk.limit:
            self.let_go(every_paused=True, but=but)

    def purge_soon(self) -> None:
        """Delete the stored bytes of uploads that are gone or complete, in the background, a few at a time."""
        self._purge_again = True  # a running purge goes round once more
        if not any(task.get_name() == "purge" for task in self._tasks):
            self._in_background(self._purge()).set_name("purge")

    async def _purge(self) -> None:
        while self._purge_again:
            self._purge_again = False
            await self._services.store.purge_upload_chunks()

    async def expire(self) -> None:
        """Delete the uploads past UPLOAD_EXPIRY_HOURS, a few per transaction (the storage sweep calls this)."""
        while expired := await self._services.store.delete_expired_uploads(now(), SWEEP_BATCH):
            for upload_id, record_id in expired:
                RESUMABLE_UPLOADS.labels("expired" if record_id is None else "done").inc()
                self.forget(upload_id)
            await asyncio.sleep(0.05)
        self.purge_soon()
        self.let_go()

    def _in_background(self, work: Awaitable[T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._log_failure)
        return task

    @staticmethod
    def _log_failure(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and (failure := task.exception()) is not None and not isinstance(failure, Refused):
            log.error("background work on resumable uploads failed", exc_info=failure)  # a bug: say so

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for upload_id in list(self._live):
            self.forget(upload_id)


async def concatenate(request: Request, services: Services, user_id: str, token: str, urls: str, metadata: str) -> Response:
    """tus concatenation's final upload: the user's whole partial uploads, in the order named, converted as one WAV
    now (the same MP3 as a POST of the file), stored as the record of this upload, which is complete at once; the
    partial uploads are deleted then. Their bytes were counted at their creation: this one adds only its MP3."""
    paths = [urlsplit(url).path.rstrip("/") for url in urls.split()]
    prefix = f"/users/{user_id}/uploads/"
    ids = [parse_uuid(path.removeprefix(prefix)) if path.startswith(prefix) else None for path in paths]
    if not ids or len(set(ids)) != len(ids):
        raise Refused(400, "Upload-Concat: final; needs the URLs of this user's partial uploads, each once, in order")
    parts: list[StoredUpload] = []
    for upload_id in ids:
        part = await services.store.find_upload(upload_id, user_id) if upload_id else None
        if part is None or not part.partial:
            raise Refused(404, f"no partial upload of this user at {paths[len(parts)]}: unknown, expired, or not created with Upload-Concat: partial")
        if not part.whole:
            raise Refused(400, f"the partial upload at {paths[len(parts)]} has {part.received} of its {part.length} bytes: finish it first")
        parts.append(part)
    filename, options = upload_metadata(metadata)
    length = sum(part.length for part in parts)
    if length > services.settings.max_upload_bytes:
        raise Refused(413, f"the partial uploads hold more than the {services.settings.max_upload_mb} MiB limit")
    slot = await services.uploads.admit(BodyReader(request, 0, services.settings), client_address(request.scope, services.settings), user_id)
    mp3: Mp3File | None = None
    try:
        try:
            upload = await services.resumable.create(user_id, token, filename, options, DEFERRED, metadata, bounded=False)
        except NameTaken as taken:
            raise Refused(422, taken.message) from None
        session = UploadSession(Mp3Options.of(options, services.settings), services.encoders, user_share(user_id))
        try:
            for part in parts:
                async for piece in services.store.upload_pieces(part.upload_id, part.length):
                    await session.room()
                    await session.feed(piece)
            mp3 = await session.finish()
            new_record = NewRecord.of(mp3, user_id, token, filename)
            record = await services.store.save_record(new_record, mp3, upload.upload_id, [part.upload_id for part in parts], length)
            if record is None:
                raise Refused(403, FORBIDDEN)
        except BaseException:
            await services.resumable.end(upload, "failed")
            raise
        finally:
            session.close()
    finally:
        if mp3 is not None:
            mp3.close()
        slot.release()
    for part in parts:  # deleted with the record's transaction: their bytes go with the next purge
        services.resumable.forget(part.upload_id)
    services.resumable.purge_soon()
    RESUMABLE_UPLOADS.labels("completed").inc()
    AUDIO_SECONDS.inc(record.duration_seconds)
    headers = {"Location": upload_url(request, upload), "Upload-Offset": str(length), "Upload-Expires": http_date(upload.expires_at)}
    return Response(status_code=201, headers=headers)


async def receive_upload(
    request: Request, services: Services, upload: StoredUpload, offset: int, token: str, length: int | None = None, last: bool = False
) -> int:
    """A request's bytes into a resumable upload at `offset`: converted as they arrive, stored every FLUSH_BYTES and
    when the request ends, however it ends (a dropped connection, a client too slow, too many bytes); the last ones
    store the record. `length` is the file's, if the request tells it; `last`, that its bytes end the file whatever
    their number (the IETF draft's Upload-Complete: ?1). The offset the upload stands at afterwards."""
    if done_at(request, upload, offset):
        return upload.length
    if length is not None:  # the length, now known (creation-defer-length); once known, it stays
        if upload.length == DEFERRED:
            upload = await services.store.declare_length(upload, length)
        elif length != upload.length:
            raise Refused(400, f"Upload-Length {length} is not this upload's: it is {upload.length}", problem=INCONSISTENT_LENGTH)
    if not has_body(request) and (not upload.whole or upload.partial):
        # Nothing to add: the offset as it stands, without taking the upload's turn. A cold upload catches up (re-encodes
        # its stored bytes) only for bytes that go on from there: on e37ff88 an empty PATCH cost 1.4 s of CPU.
        return offset
    remaining, bound = (upload.length - offset, "Upload-Length") if upload.length != DEFERRED else await deferred_room(services, upload)
    checksum = upload_checksum(request, remaining, bound, services.settings)
    body = BodyReader(request, remaining, services.settings, piece_too_large(remaining, bound))
    slot = await services.uploads.admit(body, client_address(request.scope, services.settings), upload.user_id)
    services.resumable.make_room(but=upload.upload_id)
    try:
        async with services.resumable.turn(upload) as live:
            if done_at(request, live.upload, offset):  # another request completed it while this one waited for its turn
                return upload.length
            live.token_sha256 = hash_token(token)
            try:
                if checksum:
                    await receive_checked(body, live, checksum, services)
                else:
                    await live.room()  # read only when there is room: else TCP holds the bytes
                    async for chunk in body.chunks():
                        await live.feed(chunk)
                        del chunk  # not held while the next one is awaited (see BodyReader.chunks)
                        await live.room()
            except (BadWav, UnsupportedWav):
                await services.resumable.end(live.upload, "failed")
                raise
            except BodyCut:  # the bytes that arrived count (tus 1.0.0 §PATCH); if they were the whole file, its record is stored too
                if await live.store_pending() == upload.length != DEFERRED and not upload.partial:
                    await services.resumable.complete(live, token)
                raise
            stored = await live.store_pending()
            if last and upload.length == DEFERRED:  # a body of a size not told: the file ends with it
                upload = live.upload = await services.store.declare_length(live.upload, checked_length(stored, services.settings))
            if stored == upload.length != DEFERRED and not upload.partial:
                await services.resumable.complete(live, token)
            elif last and stored != upload.length:
                raise Refused(
                    400,
                    f"Upload-Complete: ?1 ends the file at {stored} bytes, but it is {upload.length}: send the rest",
                    {"Upload-Offset": str(stored)},
                    problem=INCONSISTENT_LENGTH,
                )
            return stored
    finally:
        slot.release()
        UPLOAD_BYTES.labels("tus").inc(body.received)


async def deferred_room(services: Services, upload: StoredUpload) -> tuple[int, str]:
    """What a PATCH may add to an upload of a length not known yet, and the bound that says so: its bytes count as
    declared, so it stays within MAX_UPLOAD_MB, MAX_UNFINISHED_MB with the user's other uploads, and the user's quota
    (413 past them, naming the one it meets)."""
    usage = await services.store.usage(upload.user_id, upload.upload_id)
    if usage is None:
        raise Refused(403, FORBIDDEN)
    settings = services.settings
    bounds = {"MAX_UPLOAD_MB": settings.max_upload_bytes, "MAX_UNFINISHED_MB": settings.max_unfinished_bytes - usage.unfinished_declared}
    if (quota_room := usage.room()) is not None:
        bounds["this user's quota"] = quota_room
    bound, room = min(bounds.items(), key=lambda item: item[1])
    if room <= upload.received:
        usage.admit(upload.received + 1, "this upload's next bytes")  # the quota, named with its usage, when it is what is full
        raise Refused(413, f"this upload may not grow: {bound} is reached at {upload.received} bytes")
    return room - upload.received, bound


def done_at(request: Request, upload: StoredUpload, offset: int) -> bool:
    """Whether this PATCH is the last one repeated, of an upload complete already; else the upload must stand at `offset`."""
    if upload.record_id is not None:
        if offset == upload.length and not has_body(request):
            return True
        raise Refused(409, "this upload is complete: GET its URL for the record", {"Upload-Offset": str(upload.length)}, problem=COMPLETED_UPLOAD)
    if offset != upload.received:
        raise Refused(
            409, f"the upload stands at {upload.received}, not {offset}: send from there", {"Upload-Offset": str(upload.received)},
            problem={**MISMATCHING_OFFSET, "expected-offset": upload.received, "provided-offset": offset},
        )  # fmt: skip
    return False


async def receive_first_piece(request: Request, services: Services, upload: StoredUpload, token: str, last: bool = False) -> int:
    """creation-with-upload: the POST's body is the file's first bytes (all of them, if `last`). The upload exists from
    now on, so a piece that meets a refusal (a checksum that does not match, a cut, the upload cap) still gets its 201,
    with the offset stored; only a file that turns out to be no WAV, which ends the upload, is answered with its refusal."""
    try:
        return await receive_upload(request, services, upload, 0, token, last=last)
    except Refused as refusal:
        if isinstance(refusal, BadWav | UnsupportedWav) or (stored := await services.store.find_upload(upload.upload_id, upload.user_id)) is None:
            raise
        return stored.received


async def receive_checked(body: BodyReader, live: ResumableUpload, checksum: tuple[Callable[[], Any], bytes], services: Services) -> None:
    """With Upload-Checksum the bytes wait in a temporary file until the last one has been checked: a piece that
    does not match is dropped whole (460), and so is one cut short (it cannot be checked). A piece holds at most
    MAX_CHECKED_PIECE_MB of the temporary disk (413 past it, the piece dropped): one slow client's piece cannot
    hold the whole budget (a 64 MiB piece sent at 1,200 B/s did, on e37ff88)."""
    algorithm, expected = checksum
    digest = algorithm()
    with contextlib.closing(TempFile(services.encoders.disk)) as piece:

        def keep(chunk: bytes) -> None:  # in a thread: a large piece is seconds of hashing and writing
            digest.update(chunk)
            piece.write(chunk)

        async for chunk in body.chunks():
            if piece.size + len(chunk) > services.settings.max_checked_piece_bytes:
                raise checked_piece_too_large(services.settings)
            await asyncio.to_thread(keep, chunk)
        if not hmac.compare_digest(digest.digest(), expected):
            raise Refused(460, "Upload-Checksum does not match these bytes: they were dropped, the offset stays")
        piece.seek(0)
        while data := await asyncio.to_thread(piece.read, FLUSH_BYTES):
            await live.room()
            await live.feed(data)


# 7. Conversion ####################################################################
# The shared pool of LAME threads; the budgets all uploads draw from (memory for buffered audio, disk
# for temporary files); and UploadSession, one WAV's conversion on them, which knows nothing of requests.


class Encoders:
    """The shared pool of LAME threads: uploads hand over whole blocks, never wait in it for the network.

    Each upload has at most one block waiting (UploadSession), and a free thread takes the next block of
    the owner served least recently: a user, or a client address until its credentials are known. One
    user's many uploads, or the catch-ups of many cold ones, wait behind each other, not ahead of another
    user's one, which gets every other block (on e37ff88, a FIFO, 87 cold PATCHes of one user made a
    bystander's 0.5 s conversion take 4 s). An owner with nothing waiting is forgotten: it comes back first.

    Turns share the threads, not the cores: the event loop and every other process want those too. So an owner
    with more than one block in the pool (several uploads at once, or catch-ups) has them encoded by threads of
    their own that yield the CPU (niceness BACKLOG_NICENESS, Linux's per-thread nice), as many again as the
    others: alone it still has every core; beside an owner of one upload, that one's block neither waits for
    a thread they hold nor for the core, which the kernel gives it first (F3 of the benchmark, docs/PERFORMANCE.md).
    """

    def __init__(self, threads: int, audio_budget_bytes: int, disk: DiskBudget) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="encode")
        self._yielding = ThreadPoolExecutor(threads, thread_name_prefix="encode-yielding", initializer=yield_the_cpu)
        self._threads = threads  # each pool runs at most this many blocks at once
        self._running = {"first": 0, "yielding": 0}  # blocks each pool runs
        self._waiting: dict[str, deque[tuple[Callable[[], Any], asyncio.Future[Any]]]] = {}  # by owner
        self._held: collections.Counter[str] = collections.Counter()  # blocks of each owner waiting or encoding
        self._served: dict[str, int] = {}  # the turn each owner with blocks waiting was last served at
        self._turns = itertools.count()
        self._stopped = False
        self.budget = ByteBudget(audio_budget_bytes, BUFFERED_AUDIO)
        self.disk = disk  # the temporary files' budget: MP3 spools and kept audio

    def run(self, owner: str, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`function(*args)` in an encoder thread when `owner`'s turn comes."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(owner, deque()).append((functools.partial(function, *args), done))
        self._held[owner] += 1
        BLOCKS_QUEUED.inc()
        self._start()
        return done

    def _priority(self, owner: str) -> Literal["first", "yielding"]:
        return "yielding" if self._held[owner] > 1 else "first"

    def _start(self) -> None:
        while self._waiting and not self._stopped:
            ready = [owner for owner in self._waiting if self._running[self._priority(owner)] < self._threads]
            if not ready:
                return
            owner = min(ready, key=lambda waiting: self._served.get(waiting, -1))
            blocks = self._waiting[owner]
            work, done = blocks.popleft()
            if blocks:
                self._served[owner] = next(self._turns)  # its next block waits for every other owner's
            else:
                del self._waiting[owner]
                self._served.pop(owner, None)
            BLOCKS_QUEUED.dec()
            if done.cancelled():
                self._release(owner)
                continue
            priority = self._priority(owner)
            self._running[priority] += 1
            ENCODED_BLOCKS.labels(priority).inc()
            pool = self._yielding if priority == "yielding" else self._pool
            running = asyncio.get_running_loop().run_in_executor(pool, self._encode, work)
            running.add_done_callback(functools.partial(self._finished, owner, priority, done))

    @staticmethod
    def _encode(work: Callable[[], T]) -> T:
        with BLOCKS_ENCODING.track_inprogress():
            return work()

    def _release(self, owner: str) -> None:
        self._held[owner] -= 1
        if not self._held[owner]:
            del self._held[owner]

    def _finished(self, owner: str, priority: str, done: asyncio.Future[Any], running: asyncio.Future[Any]) -> None:
        """A thread is free (only now: a block whose waiter was cancelled still held it)."""
        self._running[priority] -= 1
        self._release(owner)
        if not done.cancelled():
            if running.cancelled():
                done.cancel()
            elif (error := running.exception()) is not None:
                done.set_exception(error)
            else:
                done.set_result(running.result())
        self._start()

    def shutdown(self) -> None:
        self._stopped = True
        for blocks in self._waiting.values():
            for _, done in blocks:
                BLOCKS_QUEUED.dec()
                done.cancel()
        self._waiting.clear()
        self._held.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._yielding.shutdown(wait=True, cancel_futures=True)


BACKLOG_NICENESS = 10  # an encoder thread of the yielding pool weighs a tenth of one at 0 when they contend (CFS)


def yield_the_cpu() -> None:
    """Make the calling thread (an encoder of the yielding pool) nice: Linux keeps niceness per thread, and any
    thread may raise its own. Elsewhere, or refused, its owner's blocks still wait their turn (Encoders)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKLOG_NICENESS)


class ByteBudget:
    """Bytes that one kind of work may hold in memory at once, all requests together; whoever would go
    over it waits, in turn (while its client's TCP window fills). Uploads hold WAV audio in it: one that
    must wait first sends its own partial block to the encoders (UploadSession), so the budget always
    comes back. Downloads hold the chunks they read ahead of their clients (RecordResponse)."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit = limit
        self.used = 0
        self._gauge = gauge
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def try_take(self, size: int) -> bool:
        if self._waiters or (self.used and self.used + size > self.limit):
            return False
        self.used += size
        self._gauge.inc(size)
        return True

    async def take(self, size: int) -> None:
        if self.try_take(size):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((size, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give(size)  # granted as it was cancelled: hand it on
            elif (size, waiter) in self._waiters:  # (give() may have popped it, finding it cancelled)
                self._waiters.remove((size, waiter))
            raise

    def give(self, size: int) -> None:
        self.used -= size
        self._gauge.dec(size)
        while self._waiters and (not self.used or self.used + self._waiters[0][0] <= self.limit):
            size, waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += size
                self._gauge.inc(size)
                waiter.set_result(None)


class DiskBudget:
    """Bytes all temporary files together may hold (TEMP_DISK_MB): a file takes its bytes before it writes them.

    Thread-safe, as the encoder threads write the MP3s. Past the budget, or on a full disk (ENOSPC), the
    write raises DiskFull: the request is answered 503 and its files go with it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.on_full: Callable[[], object] | None = None  # told (from any thread) when a file finds the budget full
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        with self._lock:
            if self.used + size > self.limit:
                if self.on_full is not None:
                    self.on_full()
                raise DiskFull()
            self.used += size
        TEMP_DISK.inc(size)

    def give(self, size: int) -> None:
        with self._lock:
            self.used -= size
        TEMP_DISK.dec(size)


def _on_full_disk(error: OSError) -> Exception:
    return DiskFull() if error.errno in (errno.ENOSPC, errno.EDQUOT) else error


class TempFile:
    """An unnamed temporary file (even a SIGKILL leaves nothing) whose bytes come out of the disk budget.

    Its first `in_memory` bytes stay in memory (tempfile.SpooledTemporaryFile) and count against the budget too.
    """

    def __init__(self, budget: DiskBudget, in_memory: int = 0) -> None:
        self._budget = budget
        self.size = 0  # bytes written: what this file holds of the budget
        try:
            # Unbuffered, so that a full disk shows at the write that meets it, not at a later flush or close.
            self._file: IO[bytes] = (
                tempfile.SpooledTemporaryFile(in_memory, buffering=0) if in_memory else tempfile.TemporaryFile(buffering=0)  # noqa: SIM115 -- closed in close()
            )
        except OSError as error:
            raise _on_full_disk(error) from None
        # Reading takes nothing from the budget: the file's own methods.
        self.read = self._file.read
        self.seek = self._file.seek
        self.tell = self._file.tell

    def write(self, data: BytesLike) -> None:
        self._budget.take(len(data))
        self.size += len(data)
        try:
            self._file.write(data)
        except OSError as error:
            raise _on_full_disk(error) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the file has no name: closing it frees its blocks, whatever close() says
            self._file.close()
        self._budget.give(self.size)
        self.size = 0


class UploadSession:
    """One file on its way from bytes to an MP3: fed the WAV in order, as it arrives; the MP3 comes out of finish().

    Knows nothing of HTTP: what goes wrong is a Refused, with its status as data, whichever request fed
    the bytes that showed it. The event loop parses and buffers; a whole block goes to the
    encoder pool, and the next one is gathered while it encodes (one block in flight).
    With `options_may_change` (an option may still come after the audio) the encoder thread also
    writes each block to a temporary file, so that finish() can start over with other options;
    a file over KEEP_WAV_BYTES, or one the disk budget cannot hold, is not kept.
    """

    def __init__(self, options: Mp3Options, encoders: Encoders, owner: str, options_may_change: bool = False) -> None:
        self.options = options
        self.owner = owner  # whose turn its blocks wait for in the encoder pool (Encoders)
        self._encoders = encoders
        self._budget = encoders.budget
        self._buffered = 0  # bytes of audio taken from the budget and not yet handed to the encoders
        self._wav = WavParser()
        self._frames: WavFrames | None = None
        self._block_frames = 1  # frames handed to LAME at once, once the format is known
        self._encoder: Mp3Encoder | None = None
        self._in_flight: asyncio.Future[None] | None = None
        self._copy: TempFile | None = TempFile(encoders.disk) if options_may_change else None
        self.keeps_audio = options_may_change  # an option may still come: what is encoded now may not be the MP3
        self._copy_lost: Refused | None = None  # why the copy was let go
        self._closed = False

    async def feed(self, data: bytes) -> None:
        if self._closed:
            return
        audio = self._wav.feed(data)
        if self._frames is None and self._wav.format is not None:
            self._frames = WavFrames(self._wav.format)
            self._block_frames = max(1, ENCODE_BLOCK_BYTES // self._frames.frame_size)
            self._encoder = Mp3Encoder(self._wav.format, self.options, self._encoders.disk)
        if audio and self._frames is not None:
            await self._take(len(audio))
            if self._closed:  # closed while it waited (the upload was ended): its share goes back at once
                self._budget.give(len(audio))
                return
            self._buffered += len(audio)
            self._frames.append(audio)
            while self._frames.available >= self._block_frames:
                await self._encode(self._frames.read(self._block_frames))

    def least_mp3_bytes(self) -> int:
        """What the MP3 will at least weigh, as far as is known now: what LAME has written, or at a constant bit rate
        (CBR), the declared data's duration at that rate (LAME's frames carry exactly that, padding aside)."""
        written = self._encoder.written if self._encoder is not None else 0
        wav_format, data_bytes = self._wav.format, self._wav.data_bytes
        if wav_format is None or not data_bytes or self.options.bitrate is None:
            return written
        seconds = data_bytes / wav_format.frame_size / wav_format.rate
        # LAME never goes above what its MPEG version allows at the output rate, which is at most the input's:
        # 320 kbps at 32 kHz and up (MPEG-1), 160 at 16-24 kHz (MPEG-2), 64 below (MPEG-2.5).
        cap = 320 if wav_format.rate >= 32000 else 160 if wav_format.rate >= 16000 else 64
        return max(written, int(0.99 * seconds * min(self.options.bitrate, cap) * 125))

    async def room(self) -> None:
        """Wait, in turn, for room in the audio budget: a reader asks before it reads, so that it holds nothing while it waits."""
        await self._take(1)
        self._budget.give(1)

    async def _take(self, size: int) -> None:
        """Audio from the budget. One that must wait makes way first: this upload's partial block goes to the encoders,
        so that the budget always comes back (no upload waits while it holds some)."""
        if not self._budget.try_take(size):
            if self._frames is not None and self._frames.available:
                await self._encode(self._frames.read(self._frames.available))
            await self._budget.take(size)

    async def finish(self, options: Mp3Options | None = None) -> Mp3File:
        """The MP3, once every byte has been fed, its tag made of what the WAV said about itself; when `options`
        encode the audio otherwise than the ones it began with, the kept audio encoded again with them, block by
        block as before (an other ID3 version only changes the tag)."""
        wav_format = self._wav.close()
        options = options or self.options
        assert self._frames is not None and self._encoder is not None
        if self._frames.available:
            await self._encode(self._frames.read(self._frames.available))
        await self._settle()
        if options.same_audio(self.options):
            mp3 = await self._encoders.run(self.owner, self._encoder.finish, self._wav.tags, options.id3_version)
            self._encoder = None  # the MP3 owns the spool now
            return mp3
        self._encoder.close()
        self._encoder = None
        if self._copy is None or self._copy_lost is not None:
            raise self._copy_lost or Refused(422, "send the encoding options before audio_file")
        copy, self._copy = self._copy, None
        encoder = Mp3Encoder(wav_format, options, self._encoders.disk)
        try:
            copy.seek(0)
            block_bytes = self._block_frames * wav_format.frame_size
            while block := await asyncio.to_thread(copy.read, block_bytes):
                await self._encoders.run(self.owner, encoder.encode, block)
            return await self._encoders.run(self.owner, encoder.finish, self._wav.tags, options.id3_version)
        except BaseException:
            encoder.close()
            raise
        finally:
            copy.close()

    async def _encode(self, block: bytes) -> None:
        await self._settle()  # one block in flight: memory stays at two blocks per upload
        assert self._encoder is not None
        self._buffered -= len(block)
        self._in_flight = self._encoders.run(self.owner, self._encode_block, self._encoder, block)
        self._in_flight.add_done_callback(lambda _: self._budget.give(len(block)))

    def _encode_block(self, encoder: Mp3Encoder, block: bytes) -> None:
        """In an encoder thread: keep the block if asked to (a write to the page cache), then encode it."""
        copy = self._copy
        if copy is not None and self._copy_lost is None:
            try:
                if copy.size + len(block) > KEEP_WAV_BYTES:
                    raise Refused(422, f"send the encoding options before audio_file for files over {KEEP_WAV_BYTES // MIB} MiB")
                copy.write(block)
            except Refused as reason:  # a late option cannot be honoured now; the conversion goes on
                full = DiskFull("the service's temporary disk is full: send the options before audio_file, or try again shortly")
                self._copy_lost = full if isinstance(reason, DiskFull) else reason
                copy.close()  # its disk is free at once
        encoder.encode(block)

    async def _settle(self) -> None:
        if self._in_flight is not None:
            try:
                await asyncio.shield(self._in_flight)
            finally:
                if self._in_flight.done():  # else this request was cancelled and the block still encodes: close() waits for it
                    self._in_flight = None

    def close(self) -> None:
        """Drop everything; a block still encoding finishes in its thread and is dropped with it."""
        if self._closed:
            return
        self._closed = True
        self._budget.give(self._buffered)  # a block in flight gives its share back when it is done
        self._buffered = 0
        held = [item for item in (self._encoder, self._copy) if item is not None]

        def close_held(in_flight: asyncio.Future[None] | None = None) -> None:
            if in_flight is not None and not in_flight.cancelled():
                in_flight.exception()  # retrieved: the request has its answer already
            for item in held:
                item.close()

        if self._in_flight is None:
            close_held()
        else:
            self._in_flight.add_done_callback(close_held)


# 8. WAV reading ###################################################################
# The chunk list is read here with struct, as the bytes arrive; the frames of the data chunk
# are then read through stdlib `wave`'s public interface (WavFrames, in appendix A). That reads any WAV
# the recorders of the world write, without seeking.


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
    WAVE_FORMAT_PCM: ("PCM", (1, 2, 3, 4, 8)),  # 64-bit: scipy.io.wavfile's default for numpy int arrays
    WAVE_FORMAT_IEEE_FLOAT: ("IEEE float", (4, 8)),
    WAVE_FORMAT_ALAW: ("A-law", (1,)),
    WAVE_FORMAT_MULAW: ("mu-law", (1,)),
}


# RF64 (EBU Tech 3306) and BW64 (ITU-R BS.2088) are WAV with 64-bit sizes, for files past 4 GiB;
# RIFX is RIFF with big-endian sizes, fields and samples (old Mac and Amiga tools, some DSP boards).
RIFF_MAGICS = (b"RIFF", b"RF64", b"BW64", b"RIFX")
MIN_RATE, MAX_RATE = 8000, 192000
STREAMED_SIZES = (0, 0xFFFFFFFF)  # what recorders write before they know the length
# What is kept of a WAV's header chunks; everything else streams past. fmt: WAVE_FORMAT_EXTENSIBLE's 40 bytes;
# ds64: EBU Tech 3306's sizes; INFO: the texts that become the ID3 tag, each cut at MAX_INFO_TEXT bytes.
FMT_BYTES, DS64_BYTES, MAX_INFO_TEXT = 40, 28, 1024
MAX_CHUNKS = 1024  # chunk headers per WAV (INFO entries included): real files have a few dozen
# The tags a WAV carries besides INFO (issue 26), each kept within its bound as it streams past: the WAV's own ID3
# tag (an `id3 ` chunk), frame by frame: a frame (a picture) up to MAX_ID3_FRAME, MAX_ID3_BYTES in all, at most
# MAX_ID3_FRAMES frame headers read; bext (EBU Tech 3285): its first BEXT_BYTES (description, originator, its
# reference, origination date and time); `cue ` points and their LIST/adtl labels, up to MAX_MARKERS of each (the
# labels cut at MAX_INFO_TEXT), at most ADTL_ENTRIES entries of adtl lists read (labl, note, ltxt, file).
ID3_CHUNKS = (b"id3 ", b"ID3 ")
MAX_ID3_FRAME, MAX_ID3_BYTES, MAX_ID3_FRAMES = MIB, 4 * MIB, 1024
BEXT_BYTES = 256 + 32 + 32 + 10 + 8
MAX_MARKERS = 1000
ADTL_ENTRIES = 4 * MAX_MARKERS
# Frames of a WAV's ID3 tag that are not carried: ones about the file's bytes (its MPEG frames, seek points, size,
# length, type, encryption, signatures), which the MP3 does not share (a TLEN the WAV's tagger wrote need not be the
# audio's), and chapters, which come from the cue points (and whose sub-frames mutagen would inflate, were they
# compressed, beyond any bound).
ID3_NOT_CARRIED = frozenset(
    {"MLLT", "SEEK", "ASPI", "RBUF", "TSIZ", "TLEN", "TFLT", "ENCR", "GRID", "SIGN", "CHAP", "CTOC", "MLL", "BUF", "TSI", "TLE", "TFT", "CRM"}
)
ID3_FRAME_ID = re.compile(rb"[A-Z0-9]{3,4}")


@dataclasses.dataclass
class WavId3:
    """The frames kept of a WAV's ID3 tag, as they were (parsed when the MP3's tag is made, in an encoder thread)."""

    version: int  # 2, 3 or 4: ID3v2.2, v2.3, v2.4
    flags: int  # the tag header's that still apply: v2.4's "every frame unsynchronised"
    frames: list[bytes]  # header and body of each
    size: int = 0  # of the frames


@dataclasses.dataclass
class WavTags:
    """What a WAV says about itself, as WavParser keeps it (bounded); the MP3's ID3 tag is made of it at the end."""

    info: dict[bytes, bytes] = dataclasses.field(default_factory=dict)  # INFO texts that map to an ID3 frame, by their id
    id3: WavId3 | None = None  # the first ID3 chunk's
    bext: bytes = b""  # the first BEXT_BYTES of the first bext chunk
    cues: dict[int, int] = dataclasses.field(default_factory=dict)  # cue point id -> its sample offset (dwSampleOffset)
    labels: dict[int, bytes] = dataclasses.field(default_factory=dict)  # cue point id -> its `labl` text


@dataclasses.dataclass(frozen=True)
class WavFormat:
    encoding: int  # one of ENCODINGS
    channels: int
    rate: int
    sample_width: int  # bytes per sample
    channel_mask: int = 0
    big_endian: bool = False  # RIFX

    @property
    def frame_size(self) -> int:
        return self.channels * self.sample_width


def parse_fmt_chunk(payload: bytes, endian: str = "<") -> WavFormat:
    """WAVEFORMATEX, then for EXTENSIBLE: cbSize, valid bits, channel mask, sub-format GUID."""
    if len(payload) < 16:
        raise BadWav("WAV header is corrupt: fmt chunk shorter than 16 bytes")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack(endian + "HHLLHH", payload[:16])
    mask = 0
    if tag == WAVE_FORMAT_EXTENSIBLE:
        if len(payload) < 40:
            raise BadWav("WAV header is corrupt: EXTENSIBLE fmt chunk too short")
        _size, _valid_bits, mask = struct.unpack(endian + "HHL", payload[16:24])
        guid = payload[24:40]
        if guid[2:] != KSDATAFORMAT_SUFFIX:
            raise UnsupportedWav(f"unsupported WAV encoding: EXTENSIBLE sub-format {guid.hex()}")
        tag = struct.unpack("<H", guid[:2])[0]
    if tag not in ENCODINGS:
        raise UnsupportedWav(f"unsupported WAV encoding: {FORMAT_NAMES.get(tag, 'unknown encoding')} (format tag 0x{tag:04X})")
    encoding_name, widths = ENCODINGS[tag]
    width = (bits + 7) // 8
    if width not in widths:
        raise UnsupportedWav(f"unsupported WAV encoding: {bits}-bit {encoding_name}")
    if channels == 0:
        raise BadWav("WAV header is corrupt: zero channels")
    if block_align != channels * width:
        raise BadWav(f"WAV header is corrupt: block align {block_align} is not {channels} channels x {width} bytes")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise BadWav(f"sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE}")
    return WavFormat(tag, channels, rate, width, mask, big_endian=endian == ">")


class WavParser:
    """A WAV's chunk list, read as its bytes arrive: feed() returns the audio among them.

    RIFF, RF64, BW64 and RIFX; chunks in any order before `data` (fmt, ds64, and the tags: LIST/INFO,
    `id3 `, bext, `cue ` and LIST/adtl are read; iXML, fact, JUNK... skipped, pad bytes included); a data
    size of 0 or 0xFFFFFFFF (a recorder that streamed its header) means "to the end of the upload";
    chunks after a sized data chunk are read for their tags too. What is kept is bounded whatever the
    file holds: the first bytes of fmt and ds64, the tags within their bounds (WavTags: INFO texts of
    at most MAX_INFO_TEXT bytes each, one per tag id; ID3 frames up to MAX_ID3_FRAME, MAX_ID3_BYTES in
    all...) and the piece being read: a flood of metadata streams past.

    The header is read by `_header()`, a generator that asks for the bytes it needs next (it
    yields a count and is sent that many bytes) and sets `_skip` for the bytes it does not need.
    """

    def __init__(self) -> None:
        self.format: WavFormat | None = None
        self.data_bytes: int | None = None  # declared size of the data chunk; None: read to the end
        self.audio_bytes = 0  # data chunk bytes seen so far
        self.tags = WavTags()
        self._stage: Literal["head", "chunks", "data", "after"] = "head"
        self._pending = bytearray()  # bytes of the next piece the header reader asked for
        self._skip = 0  # bytes of a chunk being skipped
        self._seen = 0
        self._chunks = 0
        self._endian = "<"
        self._reader = self._header()
        self._want = next(self._reader)  # the size of the piece the reader waits for

    def feed(self, data: bytes) -> bytes | memoryview:
        self._seen += len(data)
        view, audio = memoryview(data), memoryview(b"")
        while view:
            if self._stage == "data":
                take = len(view) if self.data_bytes is None else min(len(view), self.data_bytes - self.audio_bytes)
                audio, view = view[:take], view[take:]  # no copy: the audio is held where it arrived
                self.audio_bytes += take
                if self.audio_bytes == self.data_bytes:
                    self._stage, self._skip = "after", self.data_bytes & 1  # the data chunk's pad byte
            elif self._skip:
                skipped = min(self._skip, len(view))
                self._skip -= skipped
                view = view[skipped:]
            else:
                take = min(self._want - len(self._pending), len(view))
                self._pending += view[:take]
                view = view[take:]
                if len(self._pending) == self._want:
                    piece = bytes(self._pending)
                    self._pending.clear()
                    self._want = self._reader.send(piece)
        return audio

    def _header(self) -> Generator[int, bytes, None]:
        riff = yield 12
        if riff[:4] not in RIFF_MAGICS or riff[8:12] != b"WAVE":
            raise UnsupportedWav("audio_file is not a RIFF/WAVE file")
        self._endian = ">" if riff[:4] == b"RIFX" else "<"
        self._stage = "chunks"
        ds64_data_bytes = None
        while True:
            chunk_id, size = yield from self._chunk_header()
            before_data = self._stage == "chunks"
            if chunk_id == b"data" and before_data:
                if self.format is None:
                    raise BadWav("WAV header is corrupt or truncated: missing fmt chunk")
                if size == 0xFFFFFFFF and ds64_data_bytes is not None:
                    size = ds64_data_bytes
                self.data_bytes = None if size in STREAMED_SIZES else size
                self._stage = "data"
                continue  # the next header is read once the data chunk has passed
            read = 0
            if chunk_id == b"fmt " and before_data:
                if self.format is not None:  # which one would win would depend on how the bytes arrive
                    raise BadWav("WAV header is corrupt: more than one fmt chunk")
                payload = yield from self._take(min(size, FMT_BYTES))
                self.format = parse_fmt_chunk(payload, self._endian)
                read = len(payload)
            elif chunk_id == b"ds64" and before_data:
                payload = yield from self._take(min(size, DS64_BYTES))
                if len(payload) >= 16:  # EBU Tech 3306 §2: RIFF size, then data size, as 64-bit numbers.
                    ds64_data_bytes = struct.unpack("<Q", payload[8:16])[0]
                read = len(payload)
            elif chunk_id == b"LIST" and size >= 4:
                kind = yield 4
                if kind == b"INFO":
                    yield from self._info(size - 4)
                elif kind == b"adtl":
                    yield from self._labels(size - 4)
                read = size if kind in (b"INFO", b"adtl") else 4
            elif chunk_id in ID3_CHUNKS and self.tags.id3 is None:
                read = yield from self._id3(size)
            elif chunk_id == b"bext" and not self.tags.bext:
                self.tags.bext = yield from self._take(min(size, BEXT_BYTES))
                read = len(self.tags.bext)
            elif chunk_id == b"cue ":
                read = yield from self._cues(size)
            self._skip += size - read + (size & 1)

    def _chunk_header(self) -> Generator[int, bytes, tuple[bytes, int]]:
        self._chunks += 1
        if self._chunks > MAX_CHUNKS:
            raise BadWav(f"WAV header is corrupt: more than {MAX_CHUNKS} chunks")
        header = yield 8
        return header[:4], struct.unpack(self._endian + "L", header[4:])[0]

    def _take(self, size: int) -> Generator[int, bytes, bytes]:
        return (yield size) if size else b""

    def _info(self, remaining: int) -> Generator[int, bytes, None]:
        """A LIST/INFO chunk's texts that map to an ID3 frame, each cut at MAX_INFO_TEXT bytes; a damaged tail is skipped."""
        while remaining >= 8:
            text_id, size = yield from self._chunk_header()
            remaining -= 8
            if size > remaining:
                break
            kept = yield from self._take(min(size, MAX_INFO_TEXT) if text_id in INFO_TO_ID3 else 0)
            if kept:
                text = kept.split(b"\x00", 1)[0]
                self.tags.info[text_id] = (whole_characters(text) if size > MAX_INFO_TEXT else text).strip()
            pad = min(size & 1, remaining - size)
            self._skip += size - len(kept) + pad
            remaining -= size + pad
        self._skip += remaining

    def _labels(self, remaining: int) -> Generator[int, bytes, None]:
        """A LIST/adtl chunk's `labl` texts (cue point id, then the text), up to MAX_MARKERS of them, each cut at
        MAX_INFO_TEXT bytes; its other entries (note, ltxt, file) skipped; past ADTL_ENTRIES entries, or a damaged
        one, the rest of the list streams past. Its entries are not counted as chunks: a marker may have several."""
        entries = 0
        while remaining >= 8 and entries < ADTL_ENTRIES:
            entries += 1
            header = yield 8
            entry_id, size = header[:4], struct.unpack(self._endian + "L", header[4:])[0]
            remaining -= 8
            if size > remaining:
                break
            wanted = entry_id == b"labl" and size >= 4 and len(self.tags.labels) < MAX_MARKERS
            kept = yield from self._take(min(size, 4 + MAX_INFO_TEXT) if wanted else 0)
            if kept:
                cue_id = struct.unpack(self._endian + "L", kept[:4])[0]
                text = kept[4:].split(b"\x00", 1)[0]
                self.tags.labels.setdefault(cue_id, (whole_characters(text) if size > 4 + MAX_INFO_TEXT else text).strip())
            pad = min(size & 1, remaining - size)
            self._skip += size - len(kept) + pad
            remaining -= size + pad
        self._skip += remaining

    def _cues(self, size: int) -> Generator[int, bytes, int]:
        """A `cue ` chunk's points (Multimedia Programming Interface and Data Specifications 1.0, "Cue-Points Chunk"):
        each point's id and sample offset, up to MAX_MARKERS points in all; returns the bytes read."""
        if size < 4:
            return 0
        count = struct.unpack(self._endian + "L", (yield 4))[0]
        read = 4
        for _ in range(min(count, (size - 4) // 24, MAX_MARKERS - len(self.tags.cues))):
            # dwName, dwPosition, fccChunk, dwChunkStart, dwBlockStart, dwSampleOffset
            cue_id, *_, sample_offset = struct.unpack(self._endian + "LL4sLLL", (yield 24))
            self.tags.cues.setdefault(cue_id, sample_offset)
            read += 24
        return read

    def _id3(self, size: int) -> Generator[int, bytes, int]:
        """A WAV's own ID3 tag (ID3v2.2, 2.3 or 2.4, id3.org), frame by frame: each frame up to MAX_ID3_FRAME is kept
        while the kept ones stay within MAX_ID3_BYTES, the rest stream past; compressed and encrypted frames (whose
        inflated size no header bounds) and ID3_NOT_CARRIED are skipped too. Not an ID3 tag, or one damaged from
        some frame on: what came before is kept, the rest skipped. Returns the bytes read."""
        if size < 10:
            return 0
        header = yield 10
        version, flags, declared = header[3], header[5], header[6:10]
        if header[:3] != b"ID3" or version not in (2, 3, 4) or any(byte & 0x80 for byte in declared):
            return 10
        end = min(10 + syncsafe(declared), size)
        if (version < 4 and flags & 0x80) or (version == 2 and flags & 0x40):
            # Unsynchronised as a whole (v2.2, v2.3 §5: frame headers included), a frame cannot be told from the next,
            # nor a compressed one (which could inflate beyond any bound) from a plain one, before the whole is
            # read; v2.2's compression was never defined. No tagger of today writes either: skipped.
            return 10
        read = 10
        if flags & 0x40:  # an extended header (v2.3 §3.2: its size leaves out its own 4 bytes; v2.4 §3.2: syncsafe, whole)
            if end - read < 4:
                return read
            field = yield 4
            extended = syncsafe(field) if version == 4 else struct.unpack(">L", field)[0] + 4
            read += 4
            if extended < 4 or extended > end - read + 4:
                return read
            self._skip += extended - 4
            read += extended - 4
        kept = WavId3(version, flags & 0x80, [])  # v2.4's "every frame unsynchronised" stays with the frames
        header_size = 6 if version == 2 else 10
        for _ in range(MAX_ID3_FRAMES):
            if end - read < header_size:
                break
            frame_header = yield header_size
            read += header_size
            if version == 2:
                frame_id, frame_size, frame_flags = frame_header[:3], int.from_bytes(frame_header[3:6]), 0
            else:
                frame_id, frame_flags = frame_header[:4], frame_header[9]
                raw_size = frame_header[4:8]
                # ID3v2.4 sizes are syncsafe; iTunes wrote some v2.4 tags with plain ones: a size byte with its top bit set says so.
                frame_size = syncsafe(raw_size) if version == 4 and not any(byte & 0x80 for byte in raw_size) else struct.unpack(">L", raw_size)[0]
            if not ID3_FRAME_ID.fullmatch(frame_id) or frame_size > end - read:
                break  # padding (zeros) or damage: the rest is skipped
            packed = frame_flags & (0xC0 if version == 3 else 0x0C)  # compression, encryption: v2.3 §3.3.1, v2.4 §4.1.2
            keep = frame_size <= MAX_ID3_FRAME and kept.size + header_size + frame_size <= MAX_ID3_BYTES
            keep = keep and not packed and frame_id.decode() not in ID3_NOT_CARRIED
            body = yield from self._take(frame_size if keep else 0)
            if keep:
                kept.frames.append(frame_header + body)
                kept.size += header_size + frame_size
            else:
                self._skip += frame_size
            read += frame_size
        if kept.frames:
            self.tags.id3 = kept
        return read

    def close(self) -> WavFormat:
        """The end of the upload: the format, or 415/422 for a file that is no WAV, or a header or data chunk cut short."""
        if self._stage == "head":
            if self._seen == 0:
                raise BadWav("audio_file is empty (0 bytes)")
            if not any(magic.startswith(bytes(self._pending[:4])) for magic in RIFF_MAGICS):
                raise UnsupportedWav("audio_file is not a RIFF/WAVE file")
            raise BadWav("WAV header is truncated")
        if self._stage == "chunks" or self.format is None:
            missing = "missing fmt chunk" if self.format is None else "no data chunk"
            raise BadWav(f"WAV header is corrupt or truncated: {missing}")
        declared, frame = self.data_bytes, self.format.frame_size
        if declared is not None and self.audio_bytes < declared - declared % frame:
            raise BadWav(f"WAV is truncated: data chunk declares {declared} bytes, {self.audio_bytes} arrived")
        return self.format


def syncsafe(field: bytes) -> int:
    """An ID3v2 syncsafe integer (ID3v2.4 §6.2): 7 bits a byte, the top bit unused."""
    return functools.reduce(lambda value, byte: value << 7 | byte & 0x7F, field, 0)


def syncsafe_bytes(value: int) -> bytes:
    return bytes((value >> shift) & 0x7F for shift in (21, 14, 7, 0))


def whole_characters(cut: bytes) -> bytes:
    """Text cut at MAX_INFO_TEXT bytes, less a UTF-8 character the cut split (any other text as it is: Windows-1252)."""
    try:
        cut.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.reason == "unexpected end of data":
            return cut[: error.start]
    return cut


# 9. Samples #######################################################################
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
def mix_matrix(channels: int, mask: int, out: int) -> np.ndarray | None:
    """(channels x out) gains, or None where the channels pass as they are (or mono is copied to both sides).

    More than two channels fold to stereo by SPEAKER_GAINS (channels beyond the mask to both sides); a mono MP3 is their mean.
    """
    if channels == 1 or channels == out:
        return None
    stereo = np.eye(2, dtype=np.float32)
    if channels > 2:
        bits = [bit for bit in range(32) if mask >> bit & 1] if mask else list(range(channels))
        stereo = np.array([SPEAKER_GAINS.get(bit, (0.5, 0.5)) for bit in (bits + [-1] * channels)[:channels]], dtype=np.float32)
    return stereo if out == 2 else stereo @ np.array([[0.5], [0.5]], dtype=np.float32)


_SCRATCH = threading.local()  # each encoder thread's arrays, reused block after block


def scratch(name: str, shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
    """A reusable array of this thread's: fresh arrays for every block would mean fresh pages (and page faults)."""
    size = math.prod(shape)
    array = getattr(_SCRATCH, name, None)
    if array is None or array.size < size:
        array = np.empty(size, dtype)
        setattr(_SCRATCH, name, array)
    return array[:size].reshape(shape)


def to_pcm16(frames: bytes | memoryview, fmt: WavFormat, channels: int = 0) -> bytes:
    """Whole frames of any supported encoding -> interleaved 16-bit PCM in `channels` (default: the WAV's, at most 2)."""
    out = channels or min(fmt.channels, 2)
    width, encoding, order = fmt.sample_width, fmt.encoding, ">" if fmt.big_endian else "<"
    matrix = mix_matrix(fmt.channels, fmt.channel_mask, out)
    samples: np.ndarray
    if encoding in BYTE_TABLES and width == 1:
        samples = BYTE_TABLES[encoding][np.frombuffer(frames, dtype=np.uint8)]
    elif encoding == WAVE_FORMAT_PCM and width == 2:
        if order == "<" and matrix is None and out == fmt.channels:
            return bytes(frames)
        samples = np.frombuffer(frames, dtype=order + "i2")
    elif encoding == WAVE_FORMAT_PCM and width == 3:
        # The two high bytes of each 24-bit sample are its 16-bit value (column copies: several
        # times faster than one fancy-indexed copy); little-endian keeps them last, RIFX first.
        triples = np.frombuffer(frames, dtype=np.uint8).reshape(-1, 3)
        pairs = scratch("u8", (len(triples), 2), np.uint8)
        pairs[:, 0], pairs[:, 1] = triples[:, 1], triples[:, 2 if order == "<" else 0]
        samples = pairs.view("<i2").ravel()
    elif encoding == WAVE_FORMAT_PCM and width in (4, 8):
        # The high 16 bits: the last of the 2 or 4 words of a little-endian sample, the first of a RIFX one.
        samples = np.frombuffer(frames, dtype=order + "i2")[width // 2 - 1 if order == "<" else 0 :: width // 2]
    else:  # IEEE float, 32 or 64 bit: NaN to silence, clip to [-1, 1], scale, all in place
        floats = np.frombuffer(frames, dtype=order + ("f4" if width == 4 else "f8"))
        samples = scratch("f32", floats.shape, np.float32)
        np.copyto(samples, floats, casting="same_kind")
        np.clip(samples, -1.0, 1.0, out=samples)  # infinities too; NaN stays NaN
        with np.errstate(invalid="ignore"):  # a signalling NaN in the file raises the flag; it is handled just below
            has_nan = np.isnan(np.add.reduce(samples))  # one pass finds any NaN; nan_to_num's masks are for the rare file that has one
        if has_nan:
            np.nan_to_num(samples, copy=False, nan=0.0)
        np.multiply(samples, 32767.0, out=samples)
    if matrix is not None:
        wide = samples.reshape(-1, fmt.channels)
        if wide.dtype != np.float32:
            widened = scratch("wide", wide.shape, np.float32)
            np.copyto(widened, wide)
            wide = widened
        mixed = scratch("mixed", (len(wide), out), np.float32)
        np.dot(wide, matrix, out=mixed)  # BLAS; `@` takes a slow path for this shape
        samples = np.clip(mixed, -32768.0, 32767.0, out=mixed)  # clipped, not wrapped
    elif out > fmt.channels:
        samples = np.repeat(samples, out)  # a mono WAV asked for as stereo: the same signal on both sides
    if samples.dtype != np.dtype("<i2"):  # float (in range by now) or big-endian: to little-endian int16, truncating
        pcm = scratch("i16", samples.shape, np.int16)
        np.copyto(pcm, samples, casting="unsafe")
        samples = pcm
    return samples.tobytes()


# 10. MP3 encoding #################################################################
# lameenc gives the MP3 frames; the Info/Xing frame that players read first is rebuilt by the port in
# appendix B, and the ID3 tag comes from what the WAV says about itself (WavTags), through mutagen.


class Mp3Encoder:
    """LAME for one WAV: blocks of frames in (one at a time, in an encoder thread), MP3 frames to a spool."""

    def __init__(self, fmt: WavFormat, options: Mp3Options, disk: DiskBudget) -> None:
        self.fmt = fmt
        self.channels = options.channels or min(fmt.channels, 2)
        self.settings = LameSettings(fmt.rate, self.channels, options.quality, options.bitrate, options.vbr_quality)
        self._lame = lameenc.Encoder()
        self._lame.set_in_sample_rate(fmt.rate)
        self._lame.set_channels(self.channels)
        self._lame.set_quality(options.quality)
        if options.vbr_quality is None:
            self._lame.set_bit_rate(options.bitrate)
        else:
            self._lame.set_vbr(4)  # vbr_mtrh, what `lame -V` uses
            self._lame.set_vbr_quality(options.vbr_quality)
        self._lame.silence()
        self._frames = Mp3Frames()
        self._calls: list[int] = []  # PCM frames per encode call: LAME's resampler count depends on them
        self._spool = TempFile(disk, SPOOL_MEMORY_BYTES)

    @property
    def written(self) -> int:
        """MP3 bytes so far (read from the event loop while a thread encodes: an int, a moment old at worst)."""
        return self._spool.size

    def encode(self, frames: bytes) -> None:
        self._calls.append(len(frames) // self.fmt.frame_size)
        self._write(self._lame.encode(to_pcm16(frames, self.fmt, self.channels)))

    def _write(self, mp3: bytes) -> None:
        self._frames.feed(mp3)
        self._spool.write(mp3)

    def finish(self, tags: WavTags, id3_version: int = 4) -> Mp3File:
        """The whole file: the ID3 tag (of `id3_version`) made of the WAV's tags, the LAME tag frame, then the frames."""
        frames_in = sum(self._calls)
        if frames_in == 0:
            raise BadWav("WAV has no audio frames")
        self._write(self._lame.flush())
        try:
            lame_tag = lame_tag_frame(self.settings, self._frames, self._calls)
        except ValueError as mismatch:  # a LAME this port does not know: the MP3 is still good, only untagged
            log.warning("no LAME tag written: %s", mismatch)
            lame_tag = b""
        tag = mp3_tag(tags, frames_in, self.fmt.rate)
        title = tag_title(tag)
        head = id3_tag(tag, id3_version, lame_tag)
        del tag  # its pictures, while the digest is taken
        size = len(head) + self._spool.tell()
        self._spool.seek(0)
        digest = hashlib.sha256(head)
        while piece := self._spool.read(MIB):
            digest.update(piece)
        self._spool.seek(0)
        return Mp3File(head, self._spool, size, digest.hexdigest(), frames_in / self.fmt.rate, title)

    def close(self) -> None:
        self._spool.close()


@dataclasses.dataclass
class Mp3File:
    """A finished MP3: what comes before its frames (tags), the frames in a spool, and its digest."""

    head: bytes
    frames: TempFile
    size: int
    sha256: str
    duration_seconds: float
    title: str | None = None  # its tag's TIT2 (at most MAX_TITLE_CHARS of it), shown beside the file name

    _read: int = 0  # of the head

    def read(self, size: int) -> bytes:
        piece = self.head[self._read : self._read + size]
        self._read += len(piece)
        return piece + self.frames.read(size - len(piece)) if len(piece) < size else piece

    def rewind(self) -> None:
        """Read from the start again (a store that failed is tried again)."""
        self._read = 0
        self.frames.seek(0)

    def close(self) -> None:
        self.frames.close()


# ID3v2.4 from the WAV's LIST/INFO texts (RIFF INFO list, as Audacity, Audition, recorders and
# Windows write it), mapped as ffmpeg-based converters map them.
INFO_TO_ID3 = {
    b"INAM": "TIT2",  # title
    b"IART": "TPE1",  # artist
    b"IPRD": "TALB",  # album (product)
    b"ICMT": "COMM",  # comment
    b"ICRD": "TDRC",  # date of creation
    b"IGNR": "TCON",  # genre
    b"IPRT": "TRCK",  # part (track); ITRK, after it, wins
    b"ITRK": "TRCK",  # track
    b"ICOP": "TCOP",  # copyright
    b"IENG": "TIPL",  # engineer: ID3v2.4's involved-people list, role "engineer"
    b"ISFT": "TSSE",  # software: ffmpeg puts it there too ("encoder")
}
ID3_DATE = re.compile(r"\d{4}(?:[-/.]\d{2}(?:[-/.]\d{2})?)?")
UTF8 = mutagen.id3.Encoding.UTF8


def info_text(raw: bytes) -> str:
    """INFO text is UTF-8 when it decodes as UTF-8 (modern tools), else Windows-1252 (the RIFF default in practice)."""
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace").strip()


def info_frames(info: Mapping[bytes, bytes]) -> list[mutagen.id3.Frame]:
    """The ID3 frames of the INFO texts that map to one."""
    tag = mutagen.id3.ID3()
    for info_id, frame_id in INFO_TO_ID3.items():
        text = info_text(info.get(info_id, b""))
        if not text:
            continue
        if frame_id == "COMM":
            tag.add(mutagen.id3.COMM(encoding=UTF8, lang="XXX", desc="", text=[text]))  # XXX: language unknown (ID3v2.4 §4.10)
        elif frame_id == "TIPL":
            tag.add(mutagen.id3.TIPL(encoding=UTF8, people=[["engineer", text]]))
        elif frame_id == "TDRC" and not ID3_DATE.match(text):
            tag.add(mutagen.id3.TXXX(encoding=UTF8, desc="DATE", text=[text]))  # not a date ID3 can hold: kept as said
        else:
            tag.add(getattr(mutagen.id3, frame_id)(encoding=UTF8, text=[text]))
    return list(tag.values())


# A Broadcast WAV's date and time (EBU Tech 3285 §2.3): `yyyy:mm:dd` and `hh:mm:ss`, with any of these separators.
BEXT_DATE = re.compile(rb"(\d{4})[-_:. ](\d{2})[-_:. ](\d{2})")
BEXT_TIME = re.compile(rb"(\d{2})[-_:. ](\d{2})[-_:. ](\d{2})")


def bext_frames(bext: bytes) -> list[mutagen.id3.Frame]:
    """The ID3 frames of a bext chunk (EBU Tech 3285 §2.3): Description -> the comment (COMM), Originator (the recorder,
    station or program that made the file) -> "encoded by" (TENC), OriginationDate and OriginationTime -> the
    recording time (TDRC, which ID3v2.3 writes as TYER, TDAT and TIME)."""
    frames: list[mutagen.id3.Frame] = []
    description, originator = (info_text(whole_characters(field.split(b"\x00", 1)[0])) for field in (bext[:256], bext[256:288]))
    if description:
        frames.append(mutagen.id3.COMM(encoding=UTF8, lang="XXX", desc="", text=[description]))
    if originator:
        frames.append(mutagen.id3.TENC(encoding=UTF8, text=[originator]))
    date, time_of_day = BEXT_DATE.fullmatch(bext[320:330]), BEXT_TIME.fullmatch(bext[330:338])
    moment = None
    with contextlib.suppress(ValueError):  # a date (or time) that is none: what can be read of it
        if date is not None:
            year, month, day = map(int, date.groups())
            moment = datetime(year, month, day).date().isoformat()
            if time_of_day is not None:
                hour, minute, second = map(int, time_of_day.groups())
                moment = datetime(year, month, day, hour, minute, second).isoformat()
    if moment is not None:
        frames.append(mutagen.id3.TDRC(encoding=UTF8, text=[moment]))
    return frames


# What mutagen may raise on a tag it cannot read (its own errors; struct's and Python's on damage it does not catch).
UNREADABLE_TAG = (mutagen.MutagenError, ValueError, struct.error, EOFError, IndexError, UnicodeError)


# A frame larger than this (a picture) is read and written by mutagen alone: mutagen holds the frames of a tag two
# or three times over as it reads or writes them, and so holds a large one only with itself.
ID3_APART = 64 * 1024


def wav_id3_frames(wav_id3: WavId3 | None) -> list[mutagen.id3.Frame]:
    """The frames of a WAV's ID3 tag that mutagen can read, as ID3v2.4 ones (v2.2 and v2.3 frames are translated); the
    small frames are read as one tag (v2.3's TYER, TDAT and TIME become one TDRC), each large one alone. The kept bytes
    are let go as they are read."""
    if wav_id3 is None:
        return []
    parts = deque([[raw for raw in wav_id3.frames if len(raw) <= ID3_APART], *([raw] for raw in wav_id3.frames if len(raw) > ID3_APART)])
    wav_id3.frames.clear()
    frames: list[mutagen.id3.Frame] = []
    while parts:
        part = parts.popleft()
        data = b"".join([b"ID3", bytes((wav_id3.version, 0, wav_id3.flags)), syncsafe_bytes(sum(map(len, part))), *part])
        del part
        try:
            tag = mutagen.id3.ID3(io.BytesIO(data), load_v1=False)
        except UNREADABLE_TAG as error:
            log.info("frames of the WAV's ID3 tag are skipped: %s", error.__class__.__name__)
            continue
        finally:
            del data
        frames += [frame for frame in tag.values() if frame.FrameID not in ID3_NOT_CARRIED]
    return frames


# A chapter's title is cut at this many bytes of UTF-8: ffmpeg reads the size of a chapter's sub-frames as a plain
# 32-bit number in every ID3 version (libavformat/id3v2.c, read_chapter(): `taglen = avio_rb32(pb)`), where ID3v2.4
# writes it syncsafe, and drops a chapter whose title frame (encoding byte, text, NUL) is 128 bytes or more, where
# the two differ.
CHAPTER_TITLE_BYTES = 125
MAX_CHAPTERS = 255  # a CTOC's entry count is one byte (ID3v2 Chapter Frame Addendum 1.0 §2): the first points in time are kept


def chapter_frames(cues: Mapping[int, int], labels: Mapping[int, bytes], frames: int, rate: int) -> list[mutagen.id3.Frame]:
    """`cue ` points as chapters (ID3v2 Chapter Frame Addendum 1.0): a CHAP from each point to the next (the last to the
    end), titled (TIT2) by its label (at most CHAPTER_TITLE_BYTES of it), else by its number, all in one top-level,
    ordered CTOC. A point past the audio is dropped, and any past the first MAX_CHAPTERS. Times are the WAV's, the
    sample offset / the rate to the nearest millisecond: the MP3's timeline as decoders play it, who drop the encoder
    delay and padding the LAME tag gives (ffmpeg, Apple's, foobar2000); the optional byte offsets are left unset.
    Points at one millisecond (the same offset twice, as editors write a marker and a region's start) make one
    chapter, titled by the first of them with a label, and a point at the end's millisecond none: no chapter is
    empty."""
    end = (frames * 1000 + rate // 2) // rate
    starts: dict[int, int] = {}  # a chapter's start (ms) -> its cue point
    for offset, cue_id in sorted((offset, cue_id) for cue_id, offset in cues.items() if offset < frames):
        start = (offset * 1000 + rate // 2) // rate
        titled = start in starts and chapter_title(labels.get(starts[start], b""))
        if start < end and not titled:  # the first point of a millisecond with a label titles its chapter
            starts[start] = cue_id
    points = list(starts.items())[:MAX_CHAPTERS]
    if not points:
        return []
    times = [start for start, _ in points] + [end]
    ids = [f"chp{n}" for n in range(1, len(points) + 1)]
    chapters = [
        mutagen.id3.CHAP(
            element_id=ids[n - 1],
            start_time=times[n - 1],
            end_time=times[n],
            start_offset=0xFFFFFFFF,
            end_offset=0xFFFFFFFF,
            sub_frames=[mutagen.id3.TIT2(encoding=UTF8, text=[chapter_title(labels.get(cue_id, b"")) or str(n)])],
        )
        for n, (_, cue_id) in enumerate(points, 1)
    ]
    flags = mutagen.id3.CTOCFlags.TOP_LEVEL | mutagen.id3.CTOCFlags.ORDERED
    return [mutagen.id3.CTOC(element_id="toc", flags=flags, child_element_ids=ids, sub_frames=[]), *chapters]


def chapter_title(label: bytes) -> str:
    return clean_title(info_text(label)).encode()[:CHAPTER_TITLE_BYTES].decode("utf-8", errors="ignore").strip()  # (a character cut in two goes)


# A title (the tag's TIT2, the record's, a chapter's) is shown in lists, terminals and the page: it keeps no control
# characters (C0, DEL, C1: line breaks and tabs become a space), nor the bidirectional overrides and isolates
# (U+202A-U+202E, U+2066-U+2069) that make it, and what follows it on a line, read in another order than it is
# written (Unicode UAX #9; "Trojan Source", CVE-2021-42574).
TITLE_SPACES = re.compile("[\t\n\v\f\r\x85\u2028\u2029]+")
NOT_IN_TITLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean_title(text: str) -> str:
    return NOT_IN_TITLE.sub("", TITLE_SPACES.sub(" ", text)).strip()


def same_frame(frame: mutagen.id3.Frame) -> str:
    """What makes two frames one: mutagen's key, but a comment or lyrics in another language is still the same one."""
    return f"{frame.FrameID}:{getattr(frame, 'desc', '')}" if frame.FrameID in ("COMM", "USLT") else str(frame.HashKey)


def mp3_tag(tags: WavTags, frames: int, rate: int) -> mutagen.id3.ID3:
    """The MP3's tag: the WAV's own ID3 frames over its INFO texts over its bext fields (where two give one frame, the
    first named wins), and its cue points as chapters; its title cleaned (clean_title), and gone if nothing is left."""
    tag = mutagen.id3.ID3()
    sources = (bext_frames(tags.bext), info_frames(tags.info), wav_id3_frames(tags.id3), chapter_frames(tags.cues, tags.labels, frames, rate))
    for source in sources:
        replaced = {same_frame(frame) for frame in source}
        for key in [key for key, frame in tag.items() if same_frame(frame) in replaced]:
            del tag[key]
        for frame in source:
            tag.add(frame)
    if "TIT2" in tag:
        titles = [title for text in tag["TIT2"].text if (title := clean_title(str(text)))]
        if titles:
            tag["TIT2"].text = titles
        else:
            del tag["TIT2"]
    return tag


def tag_title(tag: mutagen.id3.ID3) -> str | None:
    title = "".join(tag["TIT2"].text[:1])[:MAX_TITLE_CHARS].strip() if "TIT2" in tag else ""
    return title or None


def id3_tag(tag: mutagen.id3.ID3, version: int = 4, after: bytes = b"") -> bytes:
    """The tag as ID3v2.4, or as mutagen writes ID3v2.3 (`version` 3: its conversion of dates, people and several
    values), with no padding; then `after`. Just `after` when the tag is empty.

    The tag is written in parts, and emptied as it is: the small frames together (in mutagen's order: a few text
    frames first, then by size), then each frame larger than ID3_APART alone, then the chapters alone in time
    order, so that a player that lists them as they come rather than by the CTOC (ffmpeg, for one) has them in
    order too. An ID3v2 tag is a 10-byte header (its size syncsafe in every version) and its frames: the frames of
    several saved tags add up to one."""
    if not tag:
        return after
    frames = list(tag.values())
    tag.clear()
    chapters = sorted((frame for frame in frames if frame.FrameID == "CHAP"), key=lambda chapter: chapter.start_time)
    large = [frame for frame in frames if frame.FrameID != "CHAP" and len(getattr(frame, "data", b"")) > ID3_APART]
    small = [frame for frame in frames if frame.FrameID != "CHAP" and len(getattr(frame, "data", b"")) <= ID3_APART]
    parts = deque([small, *([frame] for frame in large), *([chapter] for chapter in chapters)])
    del frames, chapters, large, small
    out = io.BytesIO()
    out.write(bytes(10))  # the header, once the size is known
    while parts:
        part = mutagen.id3.ID3()
        for frame in parts.popleft():
            part.add(frame)
        if version == 3:
            part.update_to_v23()
        saved = io.BytesIO()
        part.save(saved, v1=mutagen.id3.ID3v1SaveOptions.REMOVE, v2_version=version, padding=lambda _: 0)
        del part
        out.write(saved.getbuffer()[10:])
        del saved
    size = out.tell() - 10
    out.seek(0)
    out.write(b"ID3" + bytes((version, 0, 0)) + syncsafe_bytes(size))
    out.seek(0, io.SEEK_END)
    out.write(after)
    return out.getvalue()


# 11. Storage ######################################################################
# Portable SQL: the same statements run on SQLite and PostgreSQL (see schema.sql).


# Users are created in batches (UserBatcher): one statement, one commit for all the requests
# that arrived together; RETURNING names the rows that were new.
SQL_INSERT_USERS = "INSERT INTO users (id, name, token_sha256, created_at) VALUES {rows} ON CONFLICT (name) DO NOTHING RETURNING id"
SQL_INSERT_USERS_ROW = "(:id{n}, :name{n}, :token_sha256{n}, :created_at{n})"
SQL_USER_TOKEN = "SELECT token_sha256 FROM users WHERE id = :id"
# A record and a resumable upload each reserve their file name. Whoever takes a name first locks the
# user's row (an UPDATE that changes nothing, and checks the token), then looks at both tables: on
# PostgreSQL two transactions of one user cannot both see a name free; SQLite has one writer anyway.
SQL_LOCK_USER = "UPDATE users SET token_sha256 = token_sha256 WHERE id = :id AND token_sha256 = :token_sha256 RETURNING id"
SQL_NAME_HOLDER = (
    "SELECT 'record' FROM records WHERE user_id = :user_id AND filename = :filename UNION ALL"
    " SELECT 'upload' FROM uploads WHERE user_id = :user_id AND filename = :filename AND record_id IS NULL AND id <> :upload_id"
    " AND expires_at > :now"
)
SQL_INSERT_RECORD = (
    "INSERT INTO records (id, user_id, filename, size_bytes, duration_seconds, sha256, created_at)"
    " VALUES (:id, :user_id, :filename, :size_bytes, :duration_seconds, :sha256, :created_at)"
)
SQL_INSERT_CHUNK = "INSERT INTO record_chunks (record_id, seq, data) VALUES (:record_id, :seq, :data)"
SQL_INSERT_TITLE = "INSERT INTO record_titles (record_id, title) VALUES (:record_id, :title)"
# A record with its title, if it has one (record_titles: see schema.sql).
RECORD_WITH_TITLE = (
    "SELECT id, user_id, filename, size_bytes, duration_seconds, sha256, created_at, title"
    " FROM records LEFT JOIN record_titles ON record_titles.record_id = records.id"
)
SQL_FIND_RECORD = f"{RECORD_WITH_TITLE} WHERE id = :id AND user_id = :user_id"
SQL_LIST_RECORDS = (
    f"{RECORD_WITH_TITLE} WHERE user_id = :user_id AND (created_at < :created_at OR (created_at = :created_at AND id < :id))"
    " ORDER BY created_at DESC, id DESC LIMIT :limit"
)
# The chunks go with the record (ON DELETE CASCADE); SQLite overwrites them (secure_delete).
SQL_DELETE_RECORD = "DELETE FROM records WHERE id = :id AND user_id = :user_id RETURNING id"
SQL_DELETE_EXPIRED = (
    "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE created_at < :before ORDER BY created_at LIMIT :limit) RETURNING id"
)
SQL_REPLACE_TOKEN = "UPDATE users SET token_sha256 = :new WHERE id = :id AND token_sha256 = :old RETURNING id"
SQL_RECORD_CHUNKS = "SELECT seq, data FROM record_chunks WHERE record_id = :record_id AND seq >= :first AND seq <= :last ORDER BY seq"
SQL_PING = "SELECT 1"
# Resumable uploads: the row, then its bytes in pieces. Storing a piece moves `received` on only from where
# the storer found it (a compare-and-set), so two requests that feed one upload at once, in one process or
# in two replicas, cannot both succeed: one is told 409, and no byte is lost or stored twice.
UPLOAD_COLUMNS = "id, user_id, filename, options, length, received, record_id, expires_at, metadata, created_at"
SQL_INSERT_UPLOAD = (
    "INSERT INTO uploads (id, user_id, filename, options, length, received, created_at, expires_at, metadata)"
    " VALUES (:id, :user_id, :filename, :options, :length, 0, :created_at, :expires_at, :metadata)"
)
DECLARED = "CASE WHEN length > 0 THEN length ELSE received END"  # an upload's declared bytes; of a DEFERRED length, what it holds
SQL_UNFINISHED_DECLARED = f"SELECT CAST(COALESCE(SUM({DECLARED}), 0) AS BIGINT) FROM uploads WHERE record_id IS NULL AND expires_at > :now"
SQL_FIND_UPLOAD = f"SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = :id AND user_id = :user_id AND expires_at > :now"
SQL_UNFINISHED_UPLOADS = (
    f"SELECT {UPLOAD_COLUMNS} FROM uploads WHERE user_id = :user_id AND record_id IS NULL AND expires_at > :now"
    " ORDER BY created_at DESC, id LIMIT :limit"
)
# A request's bytes count only while the upload stands where it began, has not expired, and the request's token is
# still its user's: expiry, a new token and a deleted user reach a request that is already running.
SQL_ADVANCE_UPLOAD = (
    "UPDATE uploads SET received = :received WHERE id = :id AND received = :start AND record_id IS NULL AND expires_at > :now"
    " AND EXISTS (SELECT 1 FROM users WHERE users.id = uploads.user_id AND users.token_sha256 = :token_sha256) RETURNING id"
)
SQL_INSERT_UPLOAD_CHUNK = "INSERT INTO upload_chunks (upload_id, start, data) VALUES (:upload_id, :start, :data)"
SQL_UPLOAD_CHUNKS = (
    "SELECT start, data FROM upload_chunks WHERE upload_id = :upload_id AND start >= :start AND start < :end ORDER BY start LIMIT :limit"
)
# A final upload (concatenation) is created with a DEFERRED length, so that while it converts it declares nothing
# beside its pieces: its length comes with its completion.
SQL_COMPLETE_UPLOAD = (
    "UPDATE uploads SET record_id = :record_id, length = CASE WHEN length > 0 THEN length ELSE :length END,"
    " received = CASE WHEN length > 0 THEN length ELSE :length END WHERE id = :id AND record_id IS NULL AND expires_at > :now RETURNING id"
)
SQL_DELETE_UPLOAD = "DELETE FROM uploads WHERE id = :id AND user_id = :user_id RETURNING id"
SQL_SPEND_PIECE = "DELETE FROM uploads WHERE id = :id AND user_id = :user_id AND record_id IS NULL AND expires_at > :now RETURNING id"
SQL_DECLARE_LENGTH = (
    "UPDATE uploads SET length = :length WHERE id = :id AND length = 0 AND received <= :length AND record_id IS NULL AND expires_at > :now"
    " RETURNING id"
)
SQL_DELETE_EXPIRED_UPLOADS = "DELETE FROM uploads WHERE id IN (SELECT id FROM uploads WHERE expires_at < :now LIMIT :limit) RETURNING id, record_id"
SQL_SPENT_UPLOADS = (
    "SELECT DISTINCT upload_id FROM upload_chunks WHERE upload_id NOT IN (SELECT id FROM uploads WHERE record_id IS NULL) LIMIT :limit"
)
SQL_PURGE_UPLOAD_CHUNKS = (
    "DELETE FROM upload_chunks WHERE upload_id = :upload_id"
    " AND start IN (SELECT start FROM upload_chunks WHERE upload_id = :upload_id ORDER BY start LIMIT :limit) RETURNING start"
)
# SQLite: a new database reclaims freed pages on request (incremental_vacuum), so the file can shrink.
# A user's usage, from the indexes on records (user_id, size_bytes) and on unfinished uploads: one user (`users.id =
# :id`) or a page of them by name. `unfinished_declared` leaves out the upload being completed (`:upload_id`).
UNFINISHED_OF_USER = "FROM uploads WHERE uploads.user_id = users.id AND record_id IS NULL AND expires_at > :now"
SQL_USAGE = (
    "SELECT users.id, users.name, users.created_at,"
    " (SELECT COUNT(*) FROM records WHERE records.user_id = users.id) AS records,"
    " (SELECT CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) FROM records WHERE records.user_id = users.id) AS mp3_bytes,"
    f" (SELECT COUNT(*) {UNFINISHED_OF_USER}) AS unfinished_uploads,"
    f" (SELECT CAST(COALESCE(SUM(received), 0) AS BIGINT) {UNFINISHED_OF_USER}) AS unfinished_bytes,"
    f" (SELECT CAST(COALESCE(SUM({DECLARED}), 0) AS BIGINT) {UNFINISHED_OF_USER} AND uploads.id <> :upload_id) AS unfinished_declared,"
    " quotas.user_id IS NOT NULL AS own_quota, quotas.quota_bytes"
    " FROM users LEFT JOIN quotas ON quotas.user_id = users.id WHERE {where} ORDER BY users.name LIMIT :limit"
)
SQL_USER_BY_NAME = "SELECT id FROM users WHERE name = :name"
SQL_DELETE_USER = "DELETE FROM users WHERE id = :id RETURNING id"  # records, chunks, uploads and quota go with it (ON DELETE CASCADE)
SQL_SET_TOKEN = "UPDATE users SET token_sha256 = :token_sha256 WHERE id = :id RETURNING id"
SQL_SET_QUOTA = (
    "INSERT INTO quotas (user_id, quota_bytes) SELECT :user_id, :quota_bytes WHERE EXISTS (SELECT 1 FROM users WHERE id = :user_id)"
    " ON CONFLICT (user_id) DO UPDATE SET quota_bytes = excluded.quota_bytes RETURNING user_id"
)
SQL_CLEAR_QUOTA = "DELETE FROM quotas WHERE user_id = :user_id RETURNING user_id"
SQL_INSERT_INVITE = "INSERT INTO invites (code_sha256, uses_left, expires_at, created_at) VALUES (:code_sha256, :uses, :expires_at, :created_at)"
# One use of an invite: of N uses, exactly N users, however many ask at once (the row is locked by the UPDATE).
SQL_USE_INVITE = (
    "UPDATE invites SET uses_left = uses_left - 1 WHERE code_sha256 = :code_sha256 AND uses_left > 0 AND expires_at > :now RETURNING uses_left"
)
SQL_DELETE_SPENT_INVITES = "DELETE FROM invites WHERE uses_left <= 0 OR expires_at < :now"
SQL_SQLITE_FILE = ("PRAGMA auto_vacuum = INCREMENTAL", "PRAGMA journal_mode = WAL")
SQL_SQLITE_FREE_PAGES = "PRAGMA freelist_count"
SQL_SQLITE_VACUUM_STEP = "PRAGMA incremental_vacuum({pages})"
# PostgreSQL: a 256 KiB chunk is TOASTed out of line in ~2 KB rows; MP3 and PCM hardly compress, so skip the
# attempt, and let autovacuum reclaim deleted chunks sooner than its 20 % default.
SQL_POSTGRES_CHUNK_STORAGE = "SELECT attstorage FROM pg_attribute WHERE attrelid = '{table}'::regclass AND attname = 'data'"
SQL_POSTGRES_TUNE_CHUNKS = (
    "ALTER TABLE {table} ALTER COLUMN data SET STORAGE EXTERNAL",
    "ALTER TABLE {table} SET (autovacuum_vacuum_scale_factor = 0.02, toast.autovacuum_vacuum_scale_factor = 0.02)",
)


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
OUTAGES = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, sqlite3.Error)


def timestamp(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def now() -> str:
    return timestamp(datetime.now(UTC))


@dataclasses.dataclass(frozen=True)
class StoredRecord:
    record_id: str  # then the fields of RECORD_FIELDS
    user_id: str
    filename: str
    size_bytes: int
    duration_seconds: float
    sha256: str
    created_at: str
    title: str | None  # its tag's TIT2, kept in record_titles


RECORD_FIELDS = ("user_id", "filename", "size_bytes", "duration_seconds", "sha256", "created_at")  # the records table's


@dataclasses.dataclass(frozen=True)
class NewRecord(StoredRecord):
    token_sha256: str  # the upload's credentials: checked again as the record is stored

    @classmethod
    def of(cls, mp3: Mp3File, user_id: str, token: str, filename: str) -> NewRecord:
        """The record of a converted upload: a fresh id, stamped now."""
        return cls(str(uuid.uuid4()), user_id, filename, mp3.size, mp3.duration_seconds, mp3.sha256, now(), mp3.title, hash_token(token))


@dataclasses.dataclass(frozen=True)
class StoredUpload:
    upload_id: str
    user_id: str
    filename: str
    options: dict[str, int]  # of FORM_OPTIONS
    length: int
    received: int  # bytes stored
    record_id: str | None  # once complete
    expires_at: str
    metadata: str  # Upload-Metadata as sent: a HEAD gives it back
    created_at: str = ""

    @property
    def partial(self) -> bool:
        """A partial upload (tus concatenation): bytes only, no name, converted with the final upload that names it."""
        return not self.filename

    @property
    def whole(self) -> bool:
        """Every byte is in: the length is known (not DEFERRED) and received."""
        return self.length != DEFERRED and self.received == self.length


@dataclasses.dataclass(frozen=True)
class Usage:
    """What a user keeps and may keep: GET /users/{id}, the operator's list, and every quota check."""

    user_id: str
    name: str
    created: str
    records: int
    mp3_bytes: int
    unfinished_uploads: int
    unfinished_bytes: int  # stored so far
    unfinished_declared: int  # what they will hold when whole (Upload-Length): what a quota check counts
    quota_bytes: int | None  # None: unlimited
    own_quota: bool  # the operator's for this user, not USER_QUOTA_MB

    def json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "name": self.name,
            "created": self.created,
            "records": self.records,
            "bytes_stored": self.mp3_bytes + self.unfinished_bytes,
            "quota_bytes": self.quota_bytes,
            "unfinished_uploads": self.unfinished_uploads,
        }

    @property
    def taken(self) -> int:
        """Bytes counted against the quota: the MP3s, and unfinished uploads at their declared length."""
        return self.mp3_bytes + self.unfinished_declared

    def room(self) -> int | None:
        return None if self.quota_bytes is None else self.quota_bytes - self.taken

    def admit(self, more: int, what: str) -> None:
        """413 when `more` bytes would pass the user's quota: with its usage and quota, and what to do."""
        room = self.room()
        if room is not None and more > room:
            OVERLOAD_REFUSALS.labels("user_quota").inc()
            raise Refused(413, over_quota(what, self.taken, self.quota_bytes or 0, more))


def over_quota(what: str, taken: int, quota: int, more: int) -> str:
    """Sizes in the unit of USER_QUOTA_MB (MiB), and exactly; the units are the text's, not its holes', so that they translate."""
    return (
        f"{what} would pass this user's quota: {mib(taken)} MiB ({taken} bytes) of {mib(quota)} MiB ({quota} bytes) used,"
        f" {mib(more)} MiB ({more} bytes) more needed (delete records or unfinished uploads, or ask the operator for more)"
    )


def mib(size: int) -> str:
    return f"{size / MIB:.2f}"


class Store:
    """Users, records and resumable uploads in SQLite or PostgreSQL: raw SQL through `databases`, nothing else."""

    def __init__(self, url: str, timeout: float, connections: int, default_quota: int | None = None) -> None:
        self.timeout = timeout
        self.default_quota = default_quota  # USER_QUOTA_MB in bytes, for users without their own
        # Downloads read chunks with all connections but two: a burst of them never keeps the short
        # queries (/health, a login, a name check) waiting behind megabytes.
        self._bulk_readers = asyncio.Semaphore(max(1, connections - 2))
        self.is_sqlite = url.startswith("sqlite")
        # SQLite has one writer at a time; queueing our writes here spares them the busy
        # handler's sleeps (it polls with growing naps). Other processes still meet the
        # busy timeout. PostgreSQL takes concurrent writers as they come.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        if self.is_sqlite:
            # The busy timeout ends a blocked statement a little before `_call` gives up on it, so
            # nothing commits after its request has been answered 503.
            self.database = databases.Database(url)
            self.sqlite_pool = SQLitePool(url, connections, factory=_SQLiteConnection, timeout=0.9 * timeout)
            self.database._backend._pool = self.sqlite_pool
        else:
            self.database = databases.Database(url, min_size=1, max_size=connections, timeout=timeout, command_timeout=timeout)

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """SQLite's one writer, in turn; the wait for it is bounded by DB_TIMEOUT too (503 past it)."""
        if self._write_lock is None:
            yield
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self._write_lock.acquire()
        except TimeoutError:
            DB_ERRORS.inc()
            log.error("database busy: no write turn within %g s", self.timeout)
            raise DatabaseBusy() from None
        try:
            yield
        finally:
            self._write_lock.release()

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
            # WAL: readers never block the writer; the mode is stored in the file. auto_vacuum takes
            # effect only on a new file (before its first table); an older file still reuses its free pages.
            for pragma in SQL_SQLITE_FILE:
                await self.database.execute(pragma)
        schema = Path(__file__).with_name("schema.sql").read_text()
        for statement in schema.split(";"):
            if statement.strip():
                await self.database.execute(statement)
        for table in ("record_chunks", "upload_chunks"):
            if not self.is_sqlite and await self.database.fetch_val(SQL_POSTGRES_CHUNK_STORAGE.format(table=table)) != "e":
                for statement in SQL_POSTGRES_TUNE_CHUNKS:
                    await self.database.execute(statement.format(table=table))

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
        except OUTAGES as failure:
            DB_ERRORS.inc()
            if isinstance(failure, sqlite3.OperationalError) and ("locked" in str(failure) or "busy" in str(failure)):
                raise DatabaseBusy() from None  # another process holds the one writer
            log.error("database call failed: %r", failure)
            raise DatabaseUnavailable() from None

    async def _write(self, sql: str, values: dict[str, Any]) -> list[Any]:
        async with self.writing():
            return await self._call(self.database.fetch_all(sql, values))

    async def ping(self) -> None:
        await self._call(self.database.fetch_val(SQL_PING))

    async def insert_users(self, rows: list[dict[str, str]]) -> set[str]:
        sql = SQL_INSERT_USERS.format(rows=", ".join(SQL_INSERT_USERS_ROW.format(n=n) for n in range(len(rows))))
        values = {f"{key}{n}": value for n, row in enumerate(rows) for key, value in row.items()}
        return {row["id"] for row in await self._write(sql, values)}

    async def token_hash(self, user_id: str) -> str | None:
        return await self._call(self.database.fetch_val(SQL_USER_TOKEN, {"id": user_id}))

    async def name_holder(self, user_id: str, filename: str, upload_id: str = "") -> str | None:
        """What holds the user's file name, if anything: 'record', or 'upload' (an unfinished upload but `upload_id`)."""
        values = {"user_id": user_id, "filename": filename, "upload_id": upload_id, "now": now()}
        return await self._call(self.database.fetch_val(SQL_NAME_HOLDER, values))

    async def _reserve_name(self, user_id: str, token_sha256: str, filename: str, upload_id: str = "") -> bool:
        """Inside a transaction: lock the user's row if the token is still the user's (else False), then 409 if the name is held."""
        if await self._call(self.database.fetch_val(SQL_LOCK_USER, {"id": user_id, "token_sha256": token_sha256})) is None:
            return False
        if filename and (holder := await self.name_holder(user_id, filename, upload_id)):  # a partial upload has no name
            raise NameTaken(filename, holder)
        return True

    async def save_record(
        self, record: NewRecord, mp3: Mp3File, upload_id: str | None = None, spent: Sequence[str] = (), length: int = 0
    ) -> StoredRecord | None:
        """The record row and all its chunks in one transaction (and, for a resumable upload, the upload marked
        complete; for a final upload, its partial uploads `spent` deleted, before the quota is checked: the MP3
        replaces them); 409 if the name is taken, None if the token was replaced meanwhile (nothing stored)."""
        values = {"id": record.record_id, **{field: getattr(record, field) for field in RECORD_FIELDS}}
        try:
            async with self.writing(), self.database.transaction():
                # The user's row first: on SQLite it takes the write lock (waiting out the busy timeout), and
                # on a taken name or a replaced token nothing else has been written.
                if not await self._reserve_name(record.user_id, record.token_sha256, record.filename, upload_id or ""):
                    return None
                for piece in spent:  # one final upload spends them: another at once finds them gone (404)
                    if not await self._call(self.database.fetch_all(SQL_SPEND_PIECE, {"id": piece, "user_id": record.user_id, "now": now()})):
                        raise Refused(404, "a partial upload this final upload names is gone meanwhile (another final upload used it)")
                usage = await self.usage(record.user_id, upload_id or "")
                assert usage is not None  # its row is locked
                usage.admit(mp3.size, "this MP3")
                # A resumable upload's record claims its completion first: one of two at once wins, none after an end.
                complete = {"id": upload_id, "record_id": record.record_id, "now": now(), "length": length}
                if upload_id is not None and await self._call(self.database.fetch_val(SQL_COMPLETE_UPLOAD, complete)) is None:
                    raise Refused(404, NO_SUCH_UPLOAD)
                await self._call(self.database.execute(SQL_INSERT_RECORD, values))
                if record.title is not None:
                    await self._call(self.database.execute(SQL_INSERT_TITLE, {"record_id": record.record_id, "title": record.title}))
                seq = itertools.count()
                while batch := await asyncio.to_thread(mp3.read, CHUNK_BYTES * CHUNKS_PER_QUERY):
                    chunks = (batch[offset : offset + CHUNK_BYTES] for offset in range(0, len(batch), CHUNK_BYTES))
                    rows = [{"record_id": record.record_id, "seq": next(seq), "data": Blob(chunk)} for chunk in chunks]
                    await self._call(self.database.execute_many(SQL_INSERT_CHUNK, rows))
        except UNIQUE_VIOLATIONS:
            raise NameTaken(record.filename, "record") from None
        return StoredRecord(record.record_id, **{field: getattr(record, field) for field in RECORD_FIELDS}, title=record.title)

    async def find_record(self, record_id: str, user_id: str) -> StoredRecord | None:
        row = await self._call(self.database.fetch_one(SQL_FIND_RECORD, {"id": record_id, "user_id": user_id}))
        return None if row is None else stored_record(row)

    async def record_pieces(self, record_id: str, start: int, end: int) -> AsyncIterator[list[bytes]]:
        """Bytes start..end (inclusive) of a record, one query's worth (up to CHUNKS_PER_QUERY chunks) at a time,
        reading only the chunks that cover them; RecordVanished when a chunk is missing (deleted meanwhile)."""
        first, last = start // CHUNK_BYTES, end // CHUNK_BYTES
        for batch_first in range(first, last + 1, CHUNKS_PER_QUERY):
            batch_last = min(last, batch_first + CHUNKS_PER_QUERY - 1)
            values = {"record_id": record_id, "first": batch_first, "last": batch_last}
            async with self._bulk_readers:
                rows = await self._call(read_to_the_end(self.database.fetch_all(SQL_RECORD_CHUNKS, values)))
            if len(rows) != batch_last - batch_first + 1:
                raise RecordVanished(record_id)
            handed = [[bytes(row["data"])[max(start - row["seq"] * CHUNK_BYTES, 0) : end - row["seq"] * CHUNK_BYTES + 1] for row in rows]]
            del rows
            # Hand the batch over and keep nothing of it here: while the caller waits (for budget) before
            # asking for the next batch, this suspended generator must not hold the last megabyte.
            yield handed.pop()

    async def list_records(self, user_id: str, after: tuple[str, str], limit: int) -> list[StoredRecord]:
        """Up to `limit` of the user's records older than `after` (created_at, id), newest first."""
        values = {"user_id": user_id, "created_at": after[0], "id": after[1], "limit": limit}
        return [stored_record(row) for row in await self._call(self.database.fetch_all(SQL_LIST_RECORDS, values))]

    async def delete_record(self, record_id: str, user_id: str) -> bool:
        return bool(await self._write(SQL_DELETE_RECORD, {"id": record_id, "user_id": user_id}))

    async def replace_token(self, user_id: str, old_sha256: str, new_sha256: str) -> bool:
        return bool(await self._write(SQL_REPLACE_TOKEN, {"id": user_id, "old": old_sha256, "new": new_sha256}))

    async def delete_expired(self, before: str, limit: int) -> int:
        return len(await self._write(SQL_DELETE_EXPIRED, {"before": before, "limit": limit}))

    async def create_upload(self, upload: StoredUpload, token_sha256: str, created_at: str, bounds: UnfinishedBounds | None) -> bool:
        """A resumable upload's row, its file name reserved; 409 if a record or another upload holds the name, 429
        or 503 past the bounds on unfinished uploads, False if the token was replaced meanwhile. The user's row is
        locked first, so that one user's creations are counted one after another."""
        values = {"id": upload.upload_id, "options": json.dumps(upload.options), "created_at": created_at}
        values |= {column: getattr(upload, column) for column in ("user_id", "filename", "length", "expires_at", "metadata")}
        async with self.writing(), self.database.transaction():
            if not await self._reserve_name(upload.user_id, token_sha256, upload.filename):
                return False
            usage = await self.usage(upload.user_id)
            assert usage is not None  # its row is locked
            if bounds is not None:  # else a final upload, whose bytes are its partial uploads', counted already
                total = await self._call(self.database.fetch_val(SQL_UNFINISHED_DECLARED, {"now": created_at})) if bounds.storage else 0
                bounds.check(usage.unfinished_uploads, usage.unfinished_declared, total, upload.length)
                usage.admit(upload.length, "this upload (Upload-Length)")
            await self._call(self.database.execute(SQL_INSERT_UPLOAD, values))
        return True

    async def usage(self, user_id: str, upload_id: str = "") -> Usage | None:
        """The user's usage (the upload `upload_id`, being completed, not counted as unfinished); None: no such user."""
        found = await self._usages("users.id = :id", {"id": user_id, "upload_id": upload_id, "limit": 1})
        return found[0] if found else None

    async def usages(self, after: str, limit: int) -> list[Usage]:
        """A page of users by name, after the name `after`."""
        return await self._usages("users.name > :after", {"after": after, "upload_id": "", "limit": limit})

    async def _usages(self, where: str, values: dict[str, Any]) -> list[Usage]:
        rows = await self._call(self.database.fetch_all(SQL_USAGE.format(where=where), {**values, "now": now()}))
        return [
            Usage(
                row["id"],
                row["name"],
                row["created_at"],
                row["records"],
                row["mp3_bytes"],
                row["unfinished_uploads"],
                row["unfinished_bytes"],
                row["unfinished_declared"],
                row["quota_bytes"] if row["own_quota"] else self.default_quota,
                bool(row["own_quota"]),
            )
            for row in rows
        ]

    async def create_invited_user(self, row: dict[str, str], code: str) -> bool | None:
        """A user made with one use of the invite `code`, in one transaction: True; False if the name is taken (the
        use is not spent); None if the code is unknown, used up or expired."""
        async with self.writing():
            try:
                async with self.database.transaction():
                    if await self._call(self.database.fetch_val(SQL_USE_INVITE, {"code_sha256": hash_token(code), "now": now()})) is None:
                        return None
                    sql = SQL_INSERT_USERS.format(rows=SQL_INSERT_USERS_ROW.format(n=0))
                    if not await self._call(self.database.fetch_all(sql, {f"{key}0": value for key, value in row.items()})):
                        raise Rollback()  # and the use with it
            except Rollback:
                return False
        return True

    async def create_invite(self, code: str, uses: int, expires_at: str) -> None:
        async with self.writing(), self.database.transaction():
            await self._call(self.database.execute(SQL_DELETE_SPENT_INVITES, {"now": now()}))
            values = {"code_sha256": hash_token(code), "uses": uses, "expires_at": expires_at, "created_at": now()}
            await self._call(self.database.execute(SQL_INSERT_INVITE, values))

    async def set_quota(self, user_id: str, quota_bytes: int | None) -> bool:
        """The user's own quota (None: unlimited); False: no such user."""
        return bool(await self._write(SQL_SET_QUOTA, {"user_id": user_id, "quota_bytes": quota_bytes}))

    async def clear_quota(self, user_id: str) -> None:
        await self._write(SQL_CLEAR_QUOTA, {"user_id": user_id})

    async def delete_user(self, user_id: str) -> bool:
        return bool(await self._write(SQL_DELETE_USER, {"id": user_id}))

    async def set_token(self, user_id: str, token_sha256: str) -> bool:
        return bool(await self._write(SQL_SET_TOKEN, {"id": user_id, "token_sha256": token_sha256}))

    async def declare_length(self, upload: StoredUpload, length: int) -> StoredUpload:
        """The length of an upload created without one, within the bounds and the quota its creation would have met."""
        async with self.writing(), self.database.transaction():
            usage = await self.usage(upload.user_id, upload.upload_id)
            if usage is None:
                raise Refused(403, FORBIDDEN)
            usage.admit(length, "this upload (Upload-Length)")
            values = {"id": upload.upload_id, "length": length, "now": now()}
            if await self._call(self.database.fetch_val(SQL_DECLARE_LENGTH, values)) is None:
                found = await self.find_upload(upload.upload_id, upload.user_id)
                if found is None:
                    raise Refused(404, NO_SUCH_UPLOAD)
                if found.length != length:
                    raise Refused(
                        400,
                        f"Upload-Length {length} is not this upload's: it is {found.length or 'not known'}, with {found.received} bytes in",
                        problem=INCONSISTENT_LENGTH,
                    )
                return found
        return dataclasses.replace(upload, length=length)

    async def find_upload(self, upload_id: str, user_id: str) -> StoredUpload | None:
        row = await self._call(self.database.fetch_one(SQL_FIND_UPLOAD, {"id": upload_id, "user_id": user_id, "now": now()}))
        return None if row is None else stored_upload(row)

    async def unfinished_uploads(self, user_id: str, limit: int) -> list[StoredUpload]:
        rows = await self._call(self.database.fetch_all(SQL_UNFINISHED_UPLOADS, {"user_id": user_id, "now": now(), "limit": limit}))
        return [stored_upload(row) for row in rows]

    async def append_upload(self, upload_id: str, start: int, data: bytes, token_sha256: str) -> bool:
        """Store bytes of an upload that stood at `start`; False if it stands elsewhere by now, is gone or expired, or
        the token is no longer its user's."""
        advance = {"id": upload_id, "start": start, "received": start + len(data), "now": now(), "token_sha256": token_sha256}
        async with self.writing(), self.database.transaction():
            moved = await self._call(self.database.fetch_val(SQL_ADVANCE_UPLOAD, advance))
            if moved is None:
                return False
            await self._call(self.database.execute(SQL_INSERT_UPLOAD_CHUNK, {"upload_id": upload_id, "start": start, "data": Blob(data)}))
        return True

    async def upload_pieces(self, upload_id: str, end: int) -> AsyncIterator[bytes]:
        """An upload's stored bytes up to `end`, piece by piece, a few pieces per query; 404 when some are gone."""
        start = 0
        while start < end:
            values = {"upload_id": upload_id, "start": start, "end": end, "limit": CHUNKS_PER_QUERY}
            async with self._bulk_readers:
                rows = await self._call(read_to_the_end(self.database.fetch_all(SQL_UPLOAD_CHUNKS, values)))
            pieces = []
            for row in rows:
                if row["start"] != start:
                    break
                pieces.append(bytes(row["data"]))
                start += len(pieces[-1])
            del rows
            if not pieces:
                raise Refused(404, NO_SUCH_UPLOAD)
            while pieces:
                yield pieces.pop(0)

    async def delete_upload(self, upload_id: str, user_id: str) -> bool:
        return bool(await self._write(SQL_DELETE_UPLOAD, {"id": upload_id, "user_id": user_id}))

    async def delete_expired_uploads(self, before: str, limit: int) -> list[tuple[str, str | None]]:
        return [(row["id"], row["record_id"]) for row in await self._write(SQL_DELETE_EXPIRED_UPLOADS, {"now": before, "limit": limit})]

    async def purge_upload_chunks(self) -> None:
        while spent := await self._call(self.database.fetch_all(SQL_SPENT_UPLOADS, {"limit": SWEEP_BATCH})):
            for row in spent:
                values = {"upload_id": row["upload_id"], "limit": SWEEP_BATCH}
                while len(await self._write(SQL_PURGE_UPLOAD_CHUNKS, values)) == SWEEP_BATCH:
                    await asyncio.sleep(0.01)  # requests have the database between batches

    async def release_free_pages(self) -> None:
        """SQLite: give free pages beyond a reserve back to the file system, a step at a time."""
        while self.is_sqlite:  # PostgreSQL's autovacuum reclaims deleted chunks itself
            free = await self._call(self.database.fetch_val(SQL_SQLITE_FREE_PAGES)) - SQLITE_FREE_RESERVE_PAGES
            if free <= 0:
                break
            async with self.writing():
                await self._call(self.database.execute(SQL_SQLITE_VACUUM_STEP.format(pages=min(free, SQLITE_VACUUM_STEP_PAGES))))
            if await self._call(self.database.fetch_val(SQL_SQLITE_FREE_PAGES)) - SQLITE_FREE_RESERVE_PAGES >= free:
                break  # auto_vacuum is off (a file made before it): its free pages stay for reuse


class Rollback(Exception):
    """Raised in a transaction to undo it: what it did is not to be."""


class RecordVanished(Exception):
    """A record was deleted while its bytes were being read: the answer under way cannot be completed."""


def stored_upload(row: Any) -> StoredUpload:
    upload_id, user_id, filename, options, *rest = (row[column] for column in UPLOAD_COLUMNS.split(", "))
    return StoredUpload(upload_id, user_id, filename, json.loads(options), *rest)


def stored_record(row: Any) -> StoredRecord:
    return StoredRecord(row["id"], **{field: row[field] for field in RECORD_FIELDS}, title=row["title"])


@dataclasses.dataclass(frozen=True)
class UnfinishedBounds:
    """What unfinished resumable uploads may hold: per user (MAX_UNFINISHED_UPLOADS, MAX_UNFINISHED_MB) and in all
    (UNFINISHED_STORAGE_MB, None for no bound), counted by what they declare (Upload-Length), so that a creation is
    refused before any byte is sent."""

    uploads: int
    declared: int
    storage: int | None

    def check(self, uploads: int, declared: int, total: int, length: int) -> None:
        if uploads >= self.uploads:
            OVERLOAD_REFUSALS.labels("unfinished_uploads").inc()
            raise Refused(429, f"this user has {uploads} unfinished uploads (MAX_UNFINISHED_UPLOADS): finish or delete one first")
        if declared + length > self.declared:
            OVERLOAD_REFUSALS.labels("unfinished_mb").inc()
            raise Refused(
                429,
                f"this user's unfinished uploads declare {declared} bytes, and {length} more would pass MAX_UNFINISHED_MB"
                f" ({self.declared} bytes): finish or delete some first",
            )
        if self.storage is not None and total + length > self.storage:
            OVERLOAD_REFUSALS.labels("unfinished_storage").inc()
            raise Refused(503, "the storage for unfinished uploads (UNFINISHED_STORAGE_MB) is full: try again later", RETRY_LATER)


class UserBatcher:
    """Group commit for POST /users: requests that arrive while a batch is being written wait
    for the next one, so a burst costs one INSERT and one commit (one fsync) per batch instead
    of per user. The UNIQUE constraint still decides every race, also across processes."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[tuple[dict[str, str], asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def create(self, name: str) -> tuple[str, str] | None:
        """(user id, access token) of a new user, or None if the name is taken."""
        user_id, token = str(uuid.uuid4()), str(uuid.uuid4())
        row = {"id": user_id, "name": name, "token_sha256": hash_token(token), "created_at": now()}
        created: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((row, created))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return (user_id, token) if await created else None

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:USER_BATCH], self._pending[USER_BATCH:]
            try:
                inserted = await self._store.insert_users([row for row, _ in batch])
            except Exception as failure:  # noqa: BLE001 -- every waiting request gets the batch's answer (503)
                for _, created in batch:
                    if not created.done():
                        created.set_exception(failure)
                continue
            for row, created in batch:
                if not created.done():  # its request may have been cancelled meanwhile
                    created.set_result(row["id"] in inserted)


# 12. Responses ####################################################################


def base_url(request: Request) -> str:
    settings = services_of(request).settings
    return settings.public_url or f"{forwarded_scheme(request.scope, settings) or request.url.scheme}://{request.url.netloc}"


def forwarded_scheme(scope: Any, settings: Settings) -> str | None:
    """The scheme a trusted proxy (TRUSTED_PROXIES) says the client used (X-Forwarded-Proto), e.g. https in front of http."""
    if not scope.get("client") or not is_trusted(scope["client"][0], settings):
        return None
    proto = dict(scope["headers"]).get(b"x-forwarded-proto", b"").decode("latin-1").strip().lower()
    return proto if proto in ("http", "https") else None


def upload_url(request: Request, upload: StoredUpload) -> str:
    return f"{base_url(request)}/users/{upload.user_id}/uploads/{upload.upload_id}"


def upload_state(upload: StoredUpload) -> dict[str, str]:
    length = {"Upload-Defer-Length": "1"} if upload.length == DEFERRED else {"Upload-Length": str(upload.length)}
    concat = {"Upload-Concat": "partial"} if upload.partial else {}
    return {"Upload-Offset": str(upload.received), **length, **concat, "Upload-Expires": http_date(upload.expires_at)}


def http_date(moment: str) -> str:
    """An ISO 8601 time as RFC 9110 §5.6.7 writes dates: `Wed, 25 Jun 2014 16:00:00 GMT` (tus Upload-Expires)."""
    return email.utils.format_datetime(datetime.fromisoformat(moment).astimezone(UTC), usegmt=True)


def mp3_name(filename: str) -> str:
    stem, dot, _suffix = filename.rpartition(".")
    return f"{stem if dot and stem else filename}.mp3"


def record_json(request: Request, record: StoredRecord) -> dict[str, Any]:
    """A record as the upload's 201 shows it."""
    return {
        "url": f"{base_url(request)}/record?id={record.record_id}&user={record.user_id}",
        "record_id": record.record_id,
        "user_id": record.user_id,
        "filename": mp3_name(record.filename),
        "title": record.title,
        "duration_seconds": round(record.duration_seconds, 6),
        "size_bytes": record.size_bytes,
        "sha256": record.sha256,
    }


def record_query(request: Request) -> tuple[str | None, str | None]:
    """The `id` and `user` query parameters as UUIDs (None when not one); 422 when missing."""
    record_param, user_param = request.query_params.get("id"), request.query_params.get("user")
    if record_param is None or user_param is None:
        raise Refused(422, "query parameters id and user are required")
    return parse_uuid(record_param), parse_uuid(user_param)


# Keyset pagination: a cursor is the (created_at, id) of the last record of a page, opaque to clients.
# The first page starts below a date later than any record: same shape, so every collation orders it alike.
FIRST_PAGE = ("9999-12-31T23:59:59.999+00:00", "")


def page_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_PAGE
    if not 1 <= parse_count(text, "limit") <= MAX_PAGE:
        raise Refused(422, f"limit must be an integer 1..{MAX_PAGE}")
    return int(text)


def page_cursor(record: StoredRecord) -> str:
    return base64.urlsafe_b64encode(json.dumps([record.created_at, record.record_id]).encode()).decode().rstrip("=")


def parse_cursor(text: str | None) -> tuple[str, str]:
    if text is None:
        return FIRST_PAGE
    try:
        created_at, record_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        if isinstance(created_at, str) and len(created_at) == len(FIRST_PAGE[0]) and parse_uuid(record_id) == record_id:
            return created_at, record_id
    except (ValueError, TypeError, RecursionError):
        pass
    raise Refused(422, "cursor is not a next_cursor this service gave")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single `bytes=` range as (first, last), or None to send the whole body.

    RFC 9110 §14.2: a server MAY ignore Range, so multiple ranges and values that are not a
    range at all get the full 200; a well-formed range that starts past the end is 416, and so
    is one whose numbers are not ASCII digits (superscripts, other scripts' digits, 5000 nines).
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash or not (first_text + last_text).isnumeric():  # a number on one side at least, nothing else
        return None
    try:
        first = parse_count(first_text, "a Range position") if first_text else None
        last = parse_count(last_text, "a Range position") if last_text else size - 1
    except Refused as refusal:
        raise RangeNotSatisfiable(size, refusal.message) from None
    if first is None:  # a suffix: the last `last` bytes
        if last == 0:
            raise RangeNotSatisfiable(size)
        return max(size - last, 0), size - 1
    if last_text and last < first:
        return None  # invalid range-spec: ignored
    if first >= size:
        raise RangeNotSatisfiable(size)
    return first, min(last, size - 1)


def etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match uses the weak comparison (RFC 9110 §13.1.2): W/ prefixes are ignored."""
    return header is not None and (header.strip() == "*" or etag in [tag.strip().removeprefix("W/") for tag in header.split(",")])


def content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII fallback, then the exact name in RFC 8187 `filename*`."""
    decomposed = unicodedata.normalize("NFKD", filename)
    ascii_name = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in decomposed if not unicodedata.combining(c))
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


class DownloadResponse(StreamingResponse):
    """Stored bytes streamed to a client: what is read ahead of it comes out of a budget shared by all downloads, so
    many at once hold a bounded amount of memory; a client that takes nothing for DOWNLOAD_IDLE_TIMEOUT is cut off."""

    def _budgeted(self, services: Services) -> None:
        """Before StreamingResponse's __init__: the budget and the deadline of this download."""
        self._budget = services.downloads
        self._idle_timeout = services.settings.download_idle_timeout
        self._scope: Any = {}  # the request's, once called
        self._holding = 0  # bytes of the budget this answer holds

    async def _hold(self, size: int) -> None:
        await self._budget.take(size)
        self._holding += size

    def _release(self) -> None:
        self._budget.give(self._holding)
        self._holding = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self._scope = scope
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()  # also when the answer never started or its client left

    async def stream_response(self, send: Any) -> None:
        """Starlette's, with a deadline on every send (appendix A): a client that reads nothing gives its budget back.
        Its connection is closed with the answer short of its Content-Length: the client sees a cut download."""
        try:
            await with_send_deadline(super().stream_response, send, self._idle_timeout)
        except TimeoutError:
            SLOW_CLIENTS.labels("download_stalled").inc()
            log.info("download cut off: its client took nothing for %g s", self._idle_timeout)
            # uvicorn closes a connection whose answer ended short only once the client has read what it holds
            # for it (asyncio's close() flushes first): abort it, buffer and all, where our protocol serves.
            if abort := self._scope.get(ABORT_KEY):
                abort()


class RecordResponse(DownloadResponse):
    """A stored MP3 as HTTP: ETag and 304, one Range (206, 416), HEAD, streamed from the database."""

    def __init__(self, request: Request, record: StoredRecord, services: Services) -> None:
        self._budgeted(services)
        etag = f'"{record.sha256}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Disposition": content_disposition(mp3_name(record.filename))}
        self._batches: AsyncIterator[list[bytes]] | None = None
        # RFC 9110 §13.2.2: If-None-Match is evaluated before Range.
        if etag_matches(request.headers.get("if-none-match"), etag):
            super().__init__(_nothing(), 304, headers)
            return
        byte_range = parse_range(request.headers.get("range"), record.size_bytes)
        if byte_range and request.headers.get("if-range", etag).strip() != etag:
            byte_range = None  # RFC 9110 §13.1.5: the representation changed, send it whole
        status, (first, last) = (206, byte_range) if byte_range else (200, (0, record.size_bytes - 1))
        if byte_range:
            headers["Content-Range"] = f"bytes {first}-{last}/{record.size_bytes}"
        headers["Content-Length"] = str(last - first + 1)
        if request.method != "HEAD":
            self._batches = services.store.record_pieces(record.record_id, first, last)
        self._unread = last - first + 1  # bytes still to be read from the database
        super().__init__(_nothing(), status, headers, media_type="audio/mpeg")

    async def read_ahead(self) -> RecordResponse:
        """Read the first batch of chunks before answering: a record deleted since it was found is 404, and
        one of up to CHUNKS_PER_QUERY chunks (1 MiB) comes whole from one query, whatever a delete does next.
        A larger record deleted mid-download has its connection cut (Content-Length unmet), never a short 200."""
        if self._batches is None:
            return self
        batches = self._batches
        try:
            await self._hold_next()
            batch = await anext(batches)
        except BaseException as failure:
            self._release()
            if isinstance(failure, RecordVanished):
                raise Refused(404, NO_SUCH_RECORD) from None
            raise

        async def body() -> AsyncIterator[bytes]:
            nonlocal batch
            while True:
                for chunk in batch:
                    DOWNLOAD_BYTES.inc(len(chunk))
                    for offset in range(0, len(chunk), SEND_PIECE_BYTES):
                        # A copy, not a view: what the transport still holds of a slow client is this piece, not the chunk.
                        yield chunk[offset : offset + SEND_PIECE_BYTES]
                batch = []
                self._release()
                await self._hold_next()
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:
                    return

        self.body_iterator = body()
        return self

    async def _hold_next(self) -> None:
        size = min(CHUNK_BYTES * CHUNKS_PER_QUERY, self._unread)
        await self._hold(size)
        self._unread -= size


class ZipSink(io.RawIOBase):
    """Where zipfile writes an archive that is streamed: its bytes wait here until taken. Not seekable, so zipfile
    writes each entry's CRC and sizes in a data descriptor after its bytes, found as they pass."""

    def __init__(self) -> None:
        self._bytes = bytearray()
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._bytes += data
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        """Nothing to flush; and never a ValueError when zipfile closes an archive cut short after the sink is gone."""

    def take(self) -> bytes:
        data, self._bytes = bytes(self._bytes), bytearray()
        return data


class ZipResponse(DownloadResponse):
    """Records as one ZIP of stored (not deflated: MP3 does not compress) entries, written as it is sent: at most one
    batch of chunks (1 MiB, from the downloads' budget) in memory, nothing on disk, whatever the size (ZIP64 past
    4 GiB). Entries are named as the records' MP3s, a name met again (any case) made unique with " (2)"; a record
    deleted before its first byte is left out, one deleted mid-way cuts the connection (a short archive, never a
    wrong one)."""

    def __init__(self, records: AsyncIterator[StoredRecord], services: Services, filename: str) -> None:
        self._budgeted(services)
        self._store = services.store
        headers = {"Content-Disposition": content_disposition(filename), "Cache-Control": "no-store"}
        super().__init__(self._archive(records), 200, headers, media_type="application/zip")

    async def stream_response(self, send: Any) -> None:
        """A record deleted while its bytes are sent: the connection is dropped (the client sees a cut download, never
        a whole-looking archive), and the log says so in a line, not as an internal error."""
        try:
            await super().stream_response(send)
        except RecordVanished:
            log.info("ZIP download cut: a record in it was deleted while it was sent")
            if abort := self._scope.get(ABORT_KEY):
                abort()

    async def _archive(self, records: AsyncIterator[StoredRecord]) -> AsyncIterator[bytes]:
        sink, names = ZipSink(), set[str]()
        with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as archive:
            async for record in records:
                pieces, unread = self._store.record_pieces(record.record_id, 0, record.size_bytes - 1), record.size_bytes
                await self._hold(min(CHUNK_BYTES * CHUNKS_PER_QUERY, unread))
                try:
                    batch = await anext(pieces)
                except RecordVanished:
                    self._release()
                    continue
                entry = zipfile.ZipInfo(unique_name(mp3_name(record.filename), names), zip_time(record.created_at))
                entry.file_size = record.size_bytes  # ZIP64 for this entry if it needs it
                with archive.open(entry, "w") as writing:
                    while True:
                        for chunk in batch:
                            writing.write(chunk)
                            unread -= len(chunk)
                            data = sink.take()
                            for offset in range(0, len(data), SEND_PIECE_BYTES):
                                yield data[offset : offset + SEND_PIECE_BYTES]
                        batch = []
                        self._release()
                        if not unread:
                            break
                        await self._hold(min(CHUNK_BYTES * CHUNKS_PER_QUERY, unread))
                        batch = await anext(pieces)  # RecordVanished here cuts the answer short
                DOWNLOAD_BYTES.inc(record.size_bytes)
                yield sink.take()  # the entry's data descriptor
        yield sink.take()  # the central directory


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or `stem (2).mp3`, `stem (3).mp3`... if a name equal to it but for case is in `taken` (which gets it)."""
    stem, dot, suffix = name.rpartition(".")
    candidate, number = name, 1
    while candidate.casefold() in taken:
        number += 1
        candidate = f"{stem} ({number}).{suffix}" if dot else f"{name} ({number})"
    taken.add(candidate.casefold())
    return candidate


def zip_time(moment: str) -> tuple[int, int, int, int, int, int]:
    """A record's creation time (UTC) as a ZIP entry holds it."""
    parsed = datetime.fromisoformat(moment).astimezone(UTC)
    return (max(parsed.year, 1980), parsed.month, parsed.day, parsed.hour, parsed.minute, parsed.second)


# 13. API documents ################################################################


USAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["user_id", "name", "created", "records", "bytes_stored", "quota_bytes", "unfinished_uploads"],
    "properties": {
        "user_id": {"type": "string", "format": "uuid"},
        "name": {"type": "string"},
        "created": {"type": "string", "format": "date-time"},
        "records": {"type": "integer"},
        "bytes_stored": {"type": "integer", "description": "the MP3s, and the bytes unfinished uploads hold so far"},
        "quota_bytes": {"type": "integer", "nullable": True, "description": "null: unlimited"},
        "unfinished_uploads": {"type": "integer"},
    },
}
COMPONENTS = {
    "Usage": USAGE_SCHEMA,
    "UploadList": {
        "type": "object",
        "required": ["uploads"],
        "properties": {
            "uploads": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["upload_id", "url", "filename", "length", "offset", "options", "created", "expires"],
                    "properties": {
                        "upload_id": {"type": "string", "format": "uuid"},
                        "url": {"type": "string"},
                        "filename": {"type": "string", "nullable": True, "description": "null: a piece of a parallel upload"},
                        "length": {"type": "integer", "nullable": True, "description": "null: not known yet (Upload-Defer-Length)"},
                        "offset": {"type": "integer"},
                        "options": {"type": "object", "additionalProperties": {"oneOf": [{"type": "integer"}, {"type": "string"}]}},
                        "created": {"type": "string", "format": "date-time"},
                        "expires": {"type": "string", "format": "date-time"},
                    },
                },
            }
        },
    },
    "UserPage": {
        "type": "object",
        "required": ["users", "next_after"],
        "properties": {
            "users": {
                "type": "array",
                "items": {
                    "allOf": [
                        {"$ref": "#/components/schemas/Usage"},
                        {"type": "object", "required": ["own_quota"], "properties": {"own_quota": {"type": "boolean"}}},
                    ]
                },
            },
            "next_after": {"type": "string", "nullable": True, "description": "give it as after for the next page; null on the last"},
        },
    },
    "ZipLink": {
        "type": "object",
        "required": ["url", "expires"],
        "properties": {"url": {"type": "string"}, "expires": {"type": "string", "format": "date-time"}},
    },
    "Invite": {
        "type": "object",
        "required": ["invite", "uses", "expires"],
        "properties": {"invite": {"type": "string"}, "uses": {"type": "integer"}, "expires": {"type": "string", "format": "date-time"}},
    },
    "Service": {
        "type": "object",
        "required": ["signup", "retention_days", "max_upload_bytes"],
        "properties": {
            "signup": {"type": "string", "enum": list(SIGNUP_MODES)},
            "retention_days": {"type": "number", "nullable": True},
            "max_upload_bytes": {"type": "integer"},
        },
    },
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Problem": {
        "type": "object",
        "description": "RFC 9457: a refusal of the IETF draft's request with one of its problem types; `error` as in every refusal",
        "required": ["type", "title", "status", "detail", "error"],
        "properties": {
            **{name: {"type": "string"} for name in ("type", "title", "detail", "error")},
            **{name: {"type": "integer"} for name in ("status", "expected-offset", "provided-offset")},
        },
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok"]}}},
    "NewUser": {
        "type": "object",
        "required": ["user_id", "access_token"],
        "properties": {"user_id": {"type": "string", "format": "uuid"}, "access_token": {"type": "string", "format": "uuid"}},
    },
    "RecordPage": {
        "type": "object",
        "required": ["records", "next_cursor"],
        "properties": {
            "records": {
                "type": "array",
                "items": {
                    "allOf": [
                        {"$ref": "#/components/schemas/Record"},
                        {"type": "object", "required": ["created_at"], "properties": {"created_at": {"type": "string", "format": "date-time"}}},
                    ]
                },
            },
            "next_cursor": {"type": "string", "nullable": True, "description": "give it as cursor for the next page; null on the last"},
        },
    },
    "Record": {
        "type": "object",
        "required": ["url", "record_id", "user_id", "filename", "title", "duration_seconds", "size_bytes", "sha256"],
        "properties": {
            "url": {"type": "string"},
            "record_id": {"type": "string", "format": "uuid"},
            "user_id": {"type": "string", "format": "uuid"},
            "filename": {"type": "string"},
            "title": {"type": "string", "nullable": True, "description": "the MP3's title (its tag's TIT2); null when it has none"},
            "duration_seconds": {"type": "number"},
            "size_bytes": {"type": "integer"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        },
    },
}


@functools.cache
def openapi_document(operator: bool = True) -> dict[str, Any]:
    """OpenAPI 3.0 from the route declarations: for clients, /docs and the fuzzer in the tests; the operator's routes
    only where they are served (ADMIN_TOKEN set)."""
    paths: dict[str, dict[str, Any]] = {}
    for operation in API.operations:
        if operation.admin and not operator:
            continue
        entry: dict[str, Any] = {"summary": operation.summary, "responses": {str(status): dict(a) for status, a in operation.answers.items()}}
        if operation.parameters:
            entry["parameters"] = [dict(p) for p in operation.parameters]
        if operation.body is not None:
            entry["requestBody"] = {"required": True, "content": dict(operation.body)}
        if operation.bearer or operation.admin:
            entry["security"] = [{"admin" if operation.admin else "bearer": []}]
        paths.setdefault(operation.path, {})[operation.method.lower()] = entry
    info = {"title": "wav2mp3", "version": "2", "description": "WAV to MP3 conversion over HTTP; docs/API.md tells the whole story."}
    security = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "the user's access_token"},
        "admin": {"type": "http", "scheme": "bearer", "description": "the operator's ADMIN_TOKEN"},
    }
    return {"openapi": "3.0.3", "info": info, "paths": paths, "components": {"schemas": COMPONENTS, "securitySchemes": security}}


STATIC = Path(__file__).with_name("static")
# The page loads only what the service serves; audio plays from the service's own links.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; media-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# Swagger UI from the swagger-ui-bundle package: relative links, so it works under a proxy's path prefix too.
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wav2mp3 API</title>
<link rel="stylesheet" href="docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true})</script>
</body></html>
"""


# 14. The application ##############################################################


@dataclasses.dataclass
class Services:
    settings: Settings
    store: Store
    users: UserBatcher
    encoders: Encoders
    uploads: UploadSlots
    downloads: ByteBudget
    resumable: ResumableUploads = dataclasses.field(init=False)
    user_creations: RateWindow = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.user_creations = RateWindow(self.settings.user_creations_per_minute, "users created", "USER_CREATIONS_PER_MINUTE")


DEFAULT_QUOTA: Final = "default"  # Operator.quota: USER_QUOTA_MB applies again


class Operator:
    """What the operator may do, the same over HTTP (/admin/..., with ADMIN_TOKEN) and from the command line
    (`python wav2mp3.py admin ...`, on the configured database, service running or not). Refusals are Refused."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def invite(self, uses: int, hours: float) -> dict[str, Any]:
        code = secrets.token_urlsafe(12)
        expires = timestamp(datetime.now(UTC) + timedelta(hours=hours))
        await self.store.create_invite(code, uses, expires)
        return {"invite": code, "uses": uses, "expires": expires}

    async def users(self, after: str, limit: int) -> dict[str, Any]:
        found = await self.store.usages(after, limit + 1)
        page = found[:limit]
        return {
            "users": [{**usage.json(), "own_quota": usage.own_quota} for usage in page],
            "next_after": page[-1].name if len(found) > limit else None,
        }

    async def user(self, user_id: str) -> dict[str, Any]:
        usage = await self.store.usage(self._user_id(user_id))
        if usage is None:
            raise Refused(404, NO_SUCH_USER)
        return {**usage.json(), "own_quota": usage.own_quota}

    async def create(self, name: str) -> dict[str, str]:
        user_id, token = str(uuid.uuid4()), str(uuid.uuid4())
        if not await self.store.insert_users([{"id": user_id, "name": name, "token_sha256": hash_token(token), "created_at": now()}]):
            raise Refused(409, f"a user named {name!r} exists")
        return {"user_id": user_id, "access_token": token}

    async def quota(self, user_id: str, quota_bytes: int | None | Literal["default"]) -> dict[str, Any]:
        """The user's own quota (None: unlimited), or DEFAULT_QUOTA: USER_QUOTA_MB again. The user's usage after it."""
        user_id = self._user_id(user_id)
        if quota_bytes == DEFAULT_QUOTA:
            await self.store.clear_quota(user_id)
        elif not await self.store.set_quota(user_id, quota_bytes):
            raise Refused(404, NO_SUCH_USER)
        return await self.user(user_id)

    async def delete(self, user_id: str) -> None:
        if not await self.store.delete_user(self._user_id(user_id)):
            raise Refused(404, NO_SUCH_USER)

    async def token(self, user_id: str) -> dict[str, str]:
        user_id, token = self._user_id(user_id), str(uuid.uuid4())
        if not await self.store.set_token(user_id, hash_token(token)):
            raise Refused(404, NO_SUCH_USER)
        return {"user_id": user_id, "access_token": token}

    @staticmethod
    def _user_id(text: str) -> str:
        user_id = parse_uuid(text)
        if user_id is None:
            raise Refused(404, NO_SUCH_USER)
        return user_id


class RateWindow:
    """At most `limit` events a minute from one client address (IPv6: one /64, what one host is given), in this
    process; beyond, 429 with the seconds until the oldest leaves the window. 0: no bound."""

    def __init__(self, limit: int, what: str, setting: str) -> None:
        self.limit, self.what, self.setting = limit, what, setting
        self.events: dict[str, deque[float]] = {}

    def admit(self, client: str) -> None:
        if not self.limit:
            return
        if ":" in client:
            with contextlib.suppress(ValueError):
                client = str(ipaddress.ip_network(f"{client}/64", strict=False))
        now, events = time.monotonic(), self.events.setdefault(client, deque())
        while events and events[0] <= now - 60:
            events.popleft()
        if len(events) >= self.limit:
            wait = max(1, math.ceil(events[0] + 60 - now))
            OVERLOAD_REFUSALS.labels(self.setting.lower()).inc()
            raise Refused(
                429, f"too many {self.what} from this address ({self.setting} is {self.limit}): try again in {wait} s", {"Retry-After": str(wait)}
            )
        events.append(now)
        if len(self.events) > RATE_WINDOW_CLIENTS:  # forget the clients that have been quiet for a minute
            self.events = {key: times for key, times in self.events.items() if times and times[-1] > now - 60}


class UploadSlots:
    """The caps on uploads at once in this process (503 beyond them): in all (MAX_UPLOADS), from one client
    address (MAX_UPLOADS_PER_CLIENT) and by one user (MAX_UPLOADS_PER_USER), so that one client cannot hold
    every slot (256 slow PATCHes from one address did, on e37ff88)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.held: collections.Counter[str] = collections.Counter()  # "" for all, "client <address>", "user <id>"

    async def admit(self, body: BodyReader, client: str, user_id: str | None = None) -> UploadSlot:
        """A place for one more upload, or 503 with Retry-After (after reading a little of the body, up to
        OVERLOAD_DRAIN, so that a client that is still sending sees the answer); the slot's release() gives it back."""
        slot = UploadSlot(self)
        try:
            slot.take("", "max_uploads", "too many uploads at once")
            slot.take(client_share(client), "max_uploads_per_client", "too many uploads from this address at once")
            if user_id is not None:
                slot.take_user(user_id)
        except Refused:
            slot.release()
            await body.drain(*OVERLOAD_DRAIN)
            raise
        return slot


def client_share(client: str) -> str:
    return f"client {client}"


def user_share(user_id: str) -> str:
    return f"user {user_id}"


class UploadSlot:
    """One upload's places in UploadSlots: in all, its client's, and its user's once the user is known."""

    def __init__(self, slots: UploadSlots) -> None:
        self.slots = slots
        self.keys: list[str] = []

    def take(self, key: str, setting: str, why: str) -> None:
        limit = getattr(self.slots.settings, setting)
        if self.slots.held[key] >= limit:
            OVERLOAD_REFUSALS.labels(setting.removeprefix("max_")).inc()
            raise Refused(503, f"{why} ({setting.upper()} is {limit}): try again shortly", RETRY_LATER)
        self.slots.held[key] += 1
        self.keys.append(key)
        if key == "":
            UPLOADS_IN_PROGRESS.inc()

    @property
    def owner(self) -> str:
        """Whose share the upload is: its user's once known, else its client address's."""
        return self.keys[-1] if self.keys else ""

    def take_user(self, user_id: str) -> None:
        self.take(user_share(user_id), "max_uploads_per_user", "too many uploads by this user at once")

    def release(self) -> None:
        for key in self.keys:
            self.slots.held[key] -= 1
            if not self.slots.held[key]:
                del self.slots.held[key]
            if key == "":
                UPLOADS_IN_PROGRESS.dec()
        self.keys = []


def services_of(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def answer_refusal(request: Request, failure: Exception) -> Response:
    """Every refusal, ours (Refused) or Starlette's (404, 405), as {"error": message}: the one place one becomes HTTP,
    in the language the client prefers (Accept-Language: English, or Russian); the log keeps the English. A request
    of the IETF draft refused with one of its problem types gets the problem (RFC 9457), at the draft's status."""
    if isinstance(failure, HTTPException):
        failure = Refused(failure.status_code, failure.detail, failure.headers)
    assert isinstance(failure, Refused)
    problem = failure.problem if speaks_draft(request) else {}
    status = problem.get("status", failure.status)
    log.info("refused %s %s: %d %s", request.method, without_ids(request.url.path), status, failure.message)
    return error_answer(request, failure.message, status, failure.headers, problem)


async def internal_error(request: Request, failure: Exception) -> Response:
    # A bug, not the client's fault: log the trace, never send it.
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=failure)
    return error_answer(request, "internal error", 500)


def error_answer(
    request: Request, message: str, status: int, headers: Mapping[str, str] | None = None, problem: Mapping[str, Any] | None = None
) -> JSONResponse:
    headers = {**(headers or {}), "Vary": "Accept-Language"}
    if prefers_russian(request.headers.get("accept-language", "")) and (russian := RUSSIAN.translate(message)) is not None:
        message, headers["Content-Language"] = russian, "ru"
    if problem:  # the message is the problem's detail, and stays the `error` every answer of the service has
        return JSONResponse({**problem, "detail": message, "error": message}, status, headers, "application/problem+json")
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# RFC 9110 §12.4.2: a weight is 0 to 1 with at most three decimals (what float() reads besides, 5, 1e0, inf, is none).
QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def prefers_russian(header: str) -> bool:
    """Whether Accept-Language (RFC 9110 §12.5.4) ranks Russian above English (English when neither is named). An entry
    with a weight that is no qvalue is ignored, as one of weight 0 is: it says nothing a server can rank."""
    best: tuple[float, str] | None = None
    for item in header.split(","):
        tag, *parameters = item.strip().split(";")
        weight = 1.0
        for parameter in parameters:
            name, _, value = parameter.strip().partition("=")
            if name.lower() == "q":
                weight = float(value) if QVALUE.fullmatch(value.strip()) else 0.0
        language = tag.strip().lower().split("-")[0]
        if language in ("ru", "en") and weight > 0 and (best is None or weight > best[0]):
            best = (weight, language)
    return best is not None and best[1] == "ru"


class Translations:
    """English error texts in another language, from a table of the texts as the source writes them: each English
    template (its `{expression}`s stand for what the code fills in) is matched whole against a message, and what
    they matched goes into the other template where it has the same `{expression}` (itself translated when the
    table has it whole: "too many uploads at once"). A message the table lacks stays English."""

    def __init__(self, table: Mapping[str, str]) -> None:
        self._table = dict(table)
        self._patterns: list[tuple[re.Pattern[str], list[str], str]] = []
        for english, other in table.items():
            pieces = re.split(r"(\{[^{}]*\})", english)
            pattern = "".join("(.+?)" if index % 2 else re.escape(piece) for index, piece in enumerate(pieces))
            self._patterns.append((re.compile(pattern + r"\Z", re.DOTALL), pieces[1::2], other))

    def translate(self, message: str) -> str | None:
        for pattern, holes, other in self._patterns:
            if found := pattern.match(message):
                for hole, value in zip(holes, found.groups(), strict=True):
                    other = other.replace(hole, self._table.get(value, value))
                return other
        return None


RUSSIAN = Translations(json.loads((Path(__file__).with_name("static") / "i18n" / "errors.ru.json").read_text(encoding="utf-8")))


ACCESS_LOG = logging.getLogger("wav2mp3.access")


def logged_target(scope: Any) -> str:
    """The path and the names of the query's parameters, never their values: `id` and `user` together are a
    download link, which needs no token (a capability), so they stay out of the logs, however a client
    arranges them (a UUID anywhere, even encoded in the path, is cut to its first 8 digits)."""
    names = [pair.split("=", 1)[0] for pair in scope.get("query_string", b"").decode("latin-1").split("&") if pair]
    return without_ids(unquote(str(scope["path"])) + ("?" + "&".join(f"{unquote(name)}=…" for name in names) if names else ""))


def without_ids(text: str) -> str:
    return UUID_ANYWHERE.sub(lambda found: found.group()[:8] + "…", text)


UUID_ANYWHERE = re.compile(UUID_TEXT.pattern.replace("}-", "}-?"))  # with its hyphens or without


class RequestMetrics:
    """ASGI middleware: the access log, every answer's latency by route, uploads by status; memory back to the OS after a burst."""

    in_flight = 0

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        RequestMetrics.in_flight += 1
        try:
            await self.app(scope, receive, sending)
        finally:
            RequestMetrics.in_flight -= 1
            elapsed = time.perf_counter() - started
            client = "%s:%s" % tuple(scope["client"]) if scope.get("client") else "-"  # noqa: UP031 -- a pair
            ACCESS_LOG.info(
                '%s - "%s %s HTTP/%s" %d %.1fms', client, scope["method"], logged_target(scope), scope["http_version"], status, 1000 * elapsed
            )
            route = route_template(scope)
            REQUEST_SECONDS.labels(scope["method"], route).observe(elapsed)
            if route == "/users/wav":
                UPLOADS.labels(str(status)).inc()
            if RequestMetrics.in_flight == 0:
                MALLOC.trim_soon()


async def keep_storage(services: Services) -> None:
    """In the background: delete records past RETENTION_DAYS and resumable uploads past UPLOAD_EXPIRY_HOURS (and
    the bytes of finished ones), a few per transaction, and give SQLite's free pages beyond a reserve back to
    the file system. Every replica may run it: deleting twice is harmless."""
    store, settings = services.store, services.settings
    while True:
        try:
            await services.resumable.expire()
            if settings.retention_days is not None:
                before = timestamp(datetime.now(UTC) - timedelta(days=settings.retention_days))
                deleted = 0
                while (batch := await store.delete_expired(before, SWEEP_BATCH)) > 0:
                    deleted += batch
                    await asyncio.sleep(0.05)  # let requests have the database between batches
                if deleted:
                    log.info("retention: deleted %d records created before %s", deleted, before)
            await store.release_free_pages()
        except Unavailable as failure:  # the database is down: try again at the next sweep
            log.warning("storage sweep skipped: %s", failure.message)
        await asyncio.sleep(SWEEP_SECONDS)


# What browser tus clients send and read (tus-js-client, Uppy): CORS lets them, with CORS_ORIGINS set.
# Every request header a mainstream resumable client sends: tus-js-client (X-Request-ID with addRequestId, which Uppy
# turns on; the IETF draft's with its ietf-draft protocols), Uppy, tuspy; a client of the draft may name its file in
# Content-Disposition. What they read: the upload's state, tus's capabilities and the draft's state (Upload-Limit...).
TUS_REQUEST_HEADERS = ("Tus-Resumable", "Upload-Length", "Upload-Offset", "Upload-Metadata", "Upload-Checksum", "Upload-Defer-Length",
                       "Upload-Concat", "X-HTTP-Method-Override", "X-Requested-With", "X-Request-ID", "Upload-Complete",
                       "Upload-Draft-Interop-Version", "Content-Disposition")  # fmt: skip
TUS_RESPONSE_HEADERS = (*UPLOAD_STATE, "Upload-Defer-Length", "Upload-Metadata", "Tus-Resumable", *TUS_CAPABILITIES, *DRAFT_STATE)


def create_app(settings: Settings | None = None) -> Starlette:
    """The application: uvicorn calls this in each worker process (factory=True), tests with their own settings."""
    settings = settings or Settings.from_env()
    GuardedHttpToolsProtocol.limits = settings

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        MALLOC.tune()
        store = Store(settings.database_url, settings.db_timeout, settings.db_connections, settings.default_quota_bytes)
        await store.connect(time.monotonic() + settings.db_startup_timeout)
        encoders = Encoders(settings.encoder_threads, settings.audio_buffer_mb * MIB, DiskBudget(settings.temp_disk_bytes()))
        # anyio imports its asyncio backend on first use (StreamingResponse's task group):
        # pay for that here rather than in the first download.
        async with anyio.create_task_group():
            pass
        downloads = ByteBudget(DOWNLOAD_BUFFER_BYTES, BUFFERED_DOWNLOADS)
        services = Services(settings, store, UserBatcher(store), encoders, UploadSlots(settings), downloads)
        services.resumable = ResumableUploads(services)
        app.state.services = services
        sweeper = asyncio.create_task(keep_storage(services))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper  # it may hold a connection: let it give it back before the pool closes
            await services.resumable.close()
            encoders.shutdown()
            await store.disconnect()
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                prometheus_client.multiprocess.mark_process_dead(os.getpid())

    handlers = {Refused: answer_refusal, HTTPException: answer_refusal, Exception: internal_error}
    middleware = [Middleware(RequestMetrics)]
    if settings.cors_origins:
        origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "Range", "If-None-Match", "If-Range", *TUS_REQUEST_HEADERS],
                expose_headers=["Location", "Content-Range", "Content-Disposition", "ETag", "Retry-After", *TUS_RESPONSE_HEADERS],
            )
        )
    # Without ADMIN_TOKEN the operator's routes are not there at all: 404 whatever the method, no redirect for a slash.
    served = [route for route in API.routes if settings.admin_token or not route.path.startswith("/admin/")]
    routes = [*served, Mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path))), Mount("/static", StaticFiles(directory=STATIC))]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers=handlers)


# 15. Command line #################################################################


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["admin"]:
        sys.exit(admin_main(argv[1:]))
    parser = argparse.ArgumentParser(description="wav2mp3: WAV to MP3 over HTTP (every flag overrides its environment variable)")
    for field in dataclasses.fields(Settings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", metavar=field.name.upper(), help=field.metadata["meaning"])
    for name, value in vars(parser.parse_args(argv)).items():
        if value is not None:
            os.environ[name.upper()] = value  # the workers import this module afresh and read them
    settings = Settings.from_env()  # fail now, with the message, on a bad setting
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # The workers write their metrics here and /metrics adds them up (prometheus_client's multiprocess mode).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="wav2mp3-metrics-")
    uvicorn.run(
        "wav2mp3:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        http="wav2mp3:GuardedHttpToolsProtocol",
        timeout_keep_alive=int(KEEP_ALIVE_SECONDS),
        access_log=False,  # RequestMetrics writes it, without the values of download links' queries
        log_config=log_config(),
        proxy_headers=False,  # TRUSTED_PROXIES decides whose X-Forwarded-* count (client_address, forwarded_scheme), not uvicorn's own setting
    )


def admin_main(argv: list[str]) -> int:
    """`python wav2mp3.py admin ...`: the operator's commands (Operator) on the configured database. Exit status 0 done,
    1 refused (no such user, a name taken), 2 a bad command line, 3 the database unreachable."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", metavar="DATABASE_URL", help="the database (default: DATABASE_URL, else the service's default)")
    common.add_argument("--json", action="store_true", help="print JSON, for scripts, instead of text for people")
    parser = argparse.ArgumentParser(
        prog="wav2mp3.py admin", description="The operator's commands, on the configured database: the service need not be running."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    invite = commands.add_parser("invite", parents=[common], help="make an invite code (for SIGNUP=invite)")
    invite.add_argument("--uses", type=int, default=1, help="users it may create (default 1)")
    invite.add_argument("--expires-hours", type=float, default=DEFAULT_INVITE_HOURS, help=f"hours it is good for (default {DEFAULT_INVITE_HOURS:g})")
    commands.add_parser("users", parents=[common], help="every user with records, bytes stored, unfinished uploads and quota")
    commands.add_parser("create", parents=[common], help="create a user, whatever SIGNUP says").add_argument("name")
    quota = commands.add_parser("quota", parents=[common], help="set a user's own quota")
    quota.add_argument("user_id")
    quota.add_argument("quota", metavar="MB|unlimited|default", help="MiB, `unlimited`, or `default` (USER_QUOTA_MB applies again)")
    commands.add_parser("delete", parents=[common], help="delete a user with every record and unfinished upload").add_argument("user_id")
    commands.add_parser("token", parents=[common], help="give a user a new access token (the old one stops working)").add_argument("user_id")
    args = parser.parse_args(argv)
    if args.command == "invite" and not (1 <= args.uses <= MAX_INVITE_USES and 1 / 3600 <= args.expires_hours <= 24 * 3650):
        parser.error(f"--uses must be 1..{MAX_INVITE_USES} and --expires-hours from one second (0.0003) to ten years (87600)")
    if args.command == "quota" and args.quota not in ("unlimited", DEFAULT_QUOTA):
        try:
            megabytes = float(args.quota)
        except ValueError:
            megabytes = -1.0
        if not 0 <= megabytes <= MAX_QUOTA_MB:
            parser.error(f"the quota is MiB (a number >= 0), unlimited or default, not {args.quota!r}")
    if args.database_url:
        os.environ["DATABASE_URL"] = args.database_url
    try:
        settings = Settings.from_env()
    except ValueError as failure:
        parser.error(str(failure))
    if not settings.database_url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        parser.error(f"DATABASE_URL must be sqlite:///path or postgresql://..., not {settings.database_url!r}")
    if settings.database_url.startswith("sqlite:///") and not Path(settings.database_url.removeprefix("sqlite:///")).is_file():
        # The service makes its database on first start; the command only works on one that exists (a path mistyped
        # would give an invite code to an empty new file the service never reads).
        print(f"wav2mp3 admin: no database at {settings.database_url}: set DATABASE_URL (or --database-url) as the service has it", file=sys.stderr)
        return 3
    try:
        result = asyncio.run(admin_command(args, settings))
    except Unavailable as failure:
        print(f"wav2mp3 admin: {failure.message}", file=sys.stderr)
        return 3
    except (*RETRY_AT_STARTUP, sqlite3.Error, asyncpg.PostgresError) as failure:
        print(f"wav2mp3 admin: the database is unreachable or not the service's: {failure}", file=sys.stderr)
        return 3
    except Refused as refusal:
        print(f"wav2mp3 admin: {refusal.message}", file=sys.stderr)
        return 2 if refusal.status == 422 else 1
    print(json.dumps(result, indent=2) if args.json else admin_text(args.command, result, settings.user_quota_mb is not None))
    return 0


async def admin_command(args: argparse.Namespace, settings: Settings) -> Any:
    store = Store(settings.database_url, settings.db_timeout, 2, settings.default_quota_bytes)
    try:
        await store.connect(time.monotonic() + settings.db_timeout)
        operator = Operator(store)
        if args.command == "invite":
            return await operator.invite(args.uses, args.expires_hours)
        if args.command == "users":
            users, after = [], ""
            while True:
                page = await operator.users(after, MAX_ADMIN_PAGE)
                users += page["users"]
                if page["next_after"] is None:
                    return users
                after = page["next_after"]
        if args.command == "create":
            return await operator.create(valid_name(args.name))
        if args.command == "quota":
            if args.quota in ("unlimited", DEFAULT_QUOTA):
                return await operator.quota(args.user_id, None if args.quota == "unlimited" else DEFAULT_QUOTA)
            return await operator.quota(args.user_id, int(float(args.quota) * MIB))
        if args.command == "delete":
            await operator.delete(args.user_id)
            return {"deleted": args.user_id}
        return await operator.token(args.user_id)
    finally:
        await store.disconnect()


def admin_text(command: str, result: Any, default_known: bool) -> str:
    """What an admin command did, for people: a table of users, or the lines of one answer. A user without a quota of
    its own has USER_QUOTA_MB: its value as this command's environment has it, or "default" when that has none (the
    service's may differ: run the command with the service's environment). Names are shown with their control
    characters escaped, as the logs do: a name could otherwise move a terminal's cursor."""
    if command != "users":
        return "\n".join(f"{key}: {'unlimited' if value is None else printable(str(value))}" for key, value in result.items())
    header = ("name", "user_id", "created", "records", "stored MB", "quota MB", "unfinished")
    rows = [header] + [
        (
            printable(user["name"]),
            user["user_id"],
            user["created"][:19],
            str(user["records"]),
            f"{user['bytes_stored'] / MIB:.1f}",
            quota_text(user, default_known),
            str(user["unfinished_uploads"]),
        )
        for user in result
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows)


def quota_text(user: Mapping[str, Any], default_known: bool) -> str:
    if not user["own_quota"] and not default_known:
        return "default"
    quota = "unlimited" if user["quota_bytes"] is None else f"{user['quota_bytes'] / MIB:.1f}"
    return quota if user["own_quota"] else f"{quota} (default)"


def printable(text: str) -> str:
    """Control characters (C0, DEL, C1, line separators) and bidirectional overrides written as escapes."""
    return UNPRINTABLE.sub(lambda found: ascii(found.group())[1:-1], text)


UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def log_config() -> dict[str, Any]:
    """uvicorn's logging, and this module's loggers (the access log among them) on stderr, in every worker process;
    every handler's messages without control characters."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["wav2mp3"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["handlers"]["wav2mp3"] = {"class": "logging.StreamHandler", "formatter": "wav2mp3", "stream": "ext://sys.stderr"}
    config["loggers"]["wav2mp3"] = {"handlers": ["wav2mp3"], "level": "INFO", "propagate": False}
    config.setdefault("filters", {})["printable"] = {"()": PrintableMessages}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("printable")
    return config


class PrintableMessages(logging.Filter):
    """A log message carries what a client sent (a path, a query's names, a file name): its control characters
    (CR and LF that would start a forged line, ESC that would colour a terminal, and the rest of C0, DEL, C1 and
    the Unicode line separators) are written as escapes. A traceback keeps its lines: it is not in the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if CONTROL_CHARACTERS.search(message):
            record.msg, record.args = CONTROL_CHARACTERS.sub(lambda found: ascii(found.group())[1:-1], message), None
        return True


CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# Appendix A: work-arounds #########################################################
# Every reach into a library's internals is here: what it works around, where upstream, and the test
# that fails the day it stops taking effect. None is covered by the deployment: nginx (compose) has a
# header timeout and connection limits of its own, but `python wav2mp3.py` and `docker run` serve
# clients without it, so the guard at uvicorn's protocol stays.


class Blob(bytes):
    """Chunk bytes with a short repr.

    databases 0.9 formats every query's arguments with repr() for its debug log, whether or
    not debug logging is on (databases/backends/sqlite.py and postgres.py, `_compile`): for a
    256 KiB chunk that is ~1.5 ms of the event loop. Pinned by test_chunk_arguments_are_not_formatted.
    """

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


class _SQLiteConnection(sqlite3.Connection):
    """`databases` opens SQLite connections itself; this factory gives each one our pragmas."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA foreign_keys = ON")  # chunks go with their record
        self.execute("PRAGMA secure_delete = ON")  # a deleted record's bytes are overwritten, not left in free pages


async def read_to_the_end(query: Awaitable[T]) -> T:
    """A read (outside any transaction) that runs to its end even when its caller is cancelled, as a download is
    when its client leaves (Starlette's StreamingResponse, listen_for_disconnect). aiosqlite runs a statement
    in its own thread whatever happens to the awaiting task, and that thread holds the last result it made
    until the connection's next statement (aiosqlite/core.py, _connection_worker_thread): a cursor whose
    `execute` is cancelled is never read to its end nor closed, and its statement keeps a read snapshot past
    which SQLite cannot checkpoint the WAL, for as long as that pool connection stays idle (80 stalled
    downloads cut off at once left the WAL growing by 150 MB a minute). Pinned by
    test_downloads_cut_off_mid_read_leave_no_read_snapshot_behind."""
    task = asyncio.ensure_future(query)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: its caller has left
    return await asyncio.shield(task)


class SettledConnection(aiosqlite.Connection):
    """An aiosqlite connection whose statements never outlive a caller that is cancelled.

    aiosqlite runs each call in the connection's thread whatever happens to the task awaiting it, and a call whose
    awaiting task is cancelled (DB_TIMEOUT, a client gone) still makes its cursor there: the thread keeps it as the
    last result it made (aiosqlite/core.py, _connection_worker_thread) until the connection's next call, and when
    the cancellation came just after the result was delivered, the future that holds it lives on in the exception's
    traceback until the garbage collector runs. That cursor's statement stays open, and with it its read snapshot
    (or, of an INSERT or DELETE ... RETURNING, its write transaction): the next statement on the connection reads in
    that old snapshot, so a user made since was not there and its valid token was answered 403, or writes in that
    transaction, so users answered 201 were never committed. Here a cancelled caller leaves its call running apart
    (`left`), the call's cursor is closed when it comes, and the pool lends the connection again only once that is
    done (SQLitePool.release). Pinned by test_a_cancelled_read_leaves_no_old_snapshot_to_the_next_request."""

    def __init__(self, connector: Callable[[], sqlite3.Connection], iter_chunk_size: int) -> None:
        super().__init__(connector, iter_chunk_size)
        self.left: set[asyncio.Future[Any]] = set()  # calls whose caller was cancelled, still running in the thread

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """aiosqlite's Connection._execute, but the call's future is shielded from its caller's cancellation."""
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        future = asyncio.get_running_loop().create_future()
        self._tx.put_nowait((future, functools.partial(fn, *args, **kwargs)))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.left.add(future)
            future.add_done_callback(self._close_left)
            raise

    def _close_left(self, call: asyncio.Future[Any]) -> None:
        self.left.discard(call)
        if not call.cancelled() and call.exception() is None and isinstance(cursor := call.result(), sqlite3.Cursor):
            self._tx.put_nowait((None, cursor.close))  # in the thread, before anything the pool lends it for next


class SQLitePool(databases.backends.sqlite.SQLitePool):
    """Keeps SQLite connections open between requests.

    databases 0.9's SQLitePool opens a new aiosqlite connection, with a thread of its own, for
    every query and closes it afterwards: that costs more than the query, and 500 downloads at
    once were 500 threads and 500 open files. This one lends out at most `size` connections and
    keeps them open; a caller waits for one (within DB_TIMEOUT). Installed over the backend's
    private `_pool` (there is no public hook); pinned by test_sqlite_connections_are_reused.

    It closes every connection it opened, lent ones too once they come back, and ones still opening: one left
    to the garbage collector stops its thread from whatever event loop is current then (aiosqlite/core.py,
    Connection.__del__), and one whose opening was cancelled (aiosqlite's Connection._connect) finishes in its
    thread after its caller has gone; either raises "Event loop is closed" in that thread once the loop is gone.
    """

    def __init__(self, url: str, size: int, **options: Any) -> None:
        super().__init__(databases.DatabaseURL(url), **options)
        self._size = size
        self._free = asyncio.Semaphore(size)
        self._idle: list[SettledConnection] = []
        self._opened: set[SettledConnection] = set()
        self._opening: set[asyncio.Task[SettledConnection]] = set()
        self._settling: set[asyncio.Task[None]] = set()  # connections whose caller was cancelled, on their way back

    async def acquire(self) -> SettledConnection:
        await self._free.acquire()
        try:
            connection = self._idle.pop() if self._idle else await self._open()
        except BaseException:
            self._free.release()
            raise
        DB_CONNECTIONS_IN_USE.inc()
        return connection

    async def release(self, connection: aiosqlite.Connection) -> None:
        assert isinstance(connection, SettledConnection)  # every connection it lends
        DB_CONNECTIONS_IN_USE.dec()
        if connection.left:  # a caller cancelled mid-call (DB_TIMEOUT, a client gone): lent again only once settled
            settling = asyncio.ensure_future(self._settle(connection))
            self._settling.add(settling)
            settling.add_done_callback(self._settling.discard)
            return
        try:
            if connection.in_transaction:  # a request that left a transaction without ending it
                await connection.rollback()
            self._idle.append(connection)
        finally:
            self._free.release()

    async def _settle(self, connection: SettledConnection) -> None:
        """A connection whose caller was cancelled while a call of its ran: that call ends (its cursor closed as it
        does, SettledConnection), then a rollback ends any transaction it left, and only then is it lent again. Apart
        from the request, which a cancellation may interrupt again at any await (anyio cancels at every one)."""
        try:
            if connection.left:
                await asyncio.wait(list(connection.left))
            await connection.rollback()
            self._idle.append(connection)
        except Exception:  # noqa: BLE001 (a connection that fails this is not lent again; close() still closes it)
            log.warning("a database connection could not be settled after a cancelled call: dropped from the pool")
        finally:
            self._free.release()

    async def _open(self) -> SettledConnection:
        """A new connection. It opens in a thread of its own, which goes on if the caller is cancelled meanwhile:
        the connection is then kept, idle, for the next caller and for close()."""
        opening = asyncio.ensure_future(self._connect())
        self._opening.add(opening)
        opening.add_done_callback(self._opening.discard)
        try:
            connection = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(self._keep_idle)
            raise
        self._opened.add(connection)
        return connection

    async def _connect(self) -> SettledConnection:
        """As databases' SQLitePool.acquire opens one (aiosqlite.connect), but a SettledConnection."""
        connection = SettledConnection(functools.partial(sqlite3.connect, self._database, isolation_level=None, **self._options), 64)
        await connection
        return connection

    def _keep_idle(self, opening: asyncio.Task[SettledConnection]) -> None:
        if not opening.cancelled() and opening.exception() is None:
            self._opened.add(opening.result())
            self._idle.append(opening.result())

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError):  # a connection lent out now comes back when its statement ends
            async with asyncio.timeout(POOL_CLOSE_SECONDS):
                for _ in range(self._size):
                    await self._free.acquire()
                await asyncio.gather(*self._opening, return_exceptions=True)
        self._idle.clear()
        while self._opened:
            await self._opened.pop().close()


class _FrameSource:
    """What `wave` reads: a canonical header, then the data chunk's bytes as they arrive."""

    def __init__(self) -> None:
        self._pieces: deque[bytes | memoryview] = deque()
        self.available = 0

    def append(self, data: bytes | memoryview) -> None:
        if data:
            self._pieces.append(data)
            self.available += len(data)

    def prepend(self, data: bytes | memoryview) -> None:
        self._pieces.appendleft(data)
        self.available += len(data)

    def read(self, size: int = -1) -> bytes:
        size = self.available if size < 0 else min(size, self.available)
        taken: list[bytes | memoryview] = []
        while size > 0:
            piece = self._pieces.popleft()
            if len(piece) > size:
                self._pieces.appendleft(bytes(piece[size:]))  # a copy: the rest of what arrived can go
                piece = piece[:size]
            taken.append(piece)
            size -= len(piece)
            self.available -= len(piece)
        return b"".join(taken)  # one piece of bytes comes back as it is, uncopied


class WavFrames:
    """Whole frames out of a data chunk, read by stdlib `wave` through its public interface.

    `wave` is given a plain PCM view of the audio (the format was read by WavParser, which knows
    the encodings `wave` does not): it counts whole frames and keeps partial ones for later. Its
    chunk sizes are 32-bit, so audio past 4 GiB (RF64, long streams) is read through a new view.
    """

    def __init__(self, fmt: WavFormat) -> None:
        self.frame_size = fmt.frame_size
        self.frames = 0
        self._source = _FrameSource()
        # The largest even (no pad byte) whole-frame size a RIFF header can declare around it.
        self._segment = (0xFFFFFFFF - 44) // fmt.frame_size * fmt.frame_size
        if self._segment % 2:
            self._segment -= fmt.frame_size
        fmt_fields = (WAVE_FORMAT_PCM, fmt.channels, fmt.rate, fmt.rate * fmt.frame_size, fmt.frame_size, 8 * fmt.sample_width)
        self._header = struct.pack("<4sL8sLHHLLHH4sL", b"RIFF", 36 + self._segment, b"WAVEfmt ", 16, *fmt_fields, b"data", self._segment)
        self._view = self._new_view()

    def _new_view(self) -> wave.Wave_read:
        self._source.prepend(self._header)
        return wave.open(cast(IO[bytes], self._source), "rb")

    def append(self, audio: bytes | memoryview) -> None:
        self._source.append(audio)

    @property
    def available(self) -> int:
        return self._source.available // self.frame_size

    def read(self, frames: int) -> bytes:
        if self._view.tell() == self._view.getnframes():
            self._view = self._new_view()
        frames = min(frames, self._view.getnframes() - self._view.tell())
        block = self._view.readframes(frames)
        self.frames += len(block) // self.frame_size
        return block


ABORT_KEY = "wav2mp3.abort"  # in a request's scope: drops its connection at once (GuardedHttpToolsProtocol)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol (httptools) with the two limits it lacks, for `python wav2mp3.py`.

    uvicorn has no deadline for request headers, so a client that sends them a byte at a time held
    its connection forever: here the headers must be complete within HEADER_TIMEOUT (then a 408 and
    the connection closes). And it has no cap on connections but a 503 per request: here a
    connection beyond MAX_CONNECTIONS is answered 503 and closed at once, before it costs anything.
    It also gives each request a way to drop its connection (ABORT_KEY), for a download cut off.
    And it bounds what a request's head holds in memory, which neither httptools nor uvicorn does: httptools
    joins a header's pieces until the header ends, uvicorn keeps the URL's pieces and every header, trailers
    of a chunked body included, so 300 MiB of headers were 300 MiB of memory. Here the request line and each
    header are at most MAX_HEAD_LINE_BYTES (414, 431), all of them with the trailers at most MAX_HEAD_BYTES,
    and so is what arrives between two pieces of body (chunk extensions, trailers): 431 and the connection closed.
    Pinned by test_live_header_timeout_closes_a_dripping_client, ..._connection_cap,
    test_live_a_download_nobody_reads_is_cut_off and test_live_request_heads_are_bounded.
    """

    limits = Settings()  # create_app() puts the service's own here: uvicorn makes the protocol, not us
    per_client: collections.Counter[str] = collections.Counter()  # open connections by client address (not a trusted proxy's)
    held_refusals = 0  # connections over their client's share waiting for their 503 (_refuse_later)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        CONNECTIONS.inc()
        self._header_deadline: asyncio.TimerHandle | None = None
        self._held: asyncio.TimerHandle | None = None
        self._refused = False
        address = self.client[0] if self.client else ""
        self._counted_as = "" if is_trusted(address, self.limits) else address
        if self._counted_as:
            self.per_client[self._counted_as] += 1
        self._head_bytes = 0  # bytes read since the last progress: headers complete, or a piece of body
        self._progressed = False
        self._head_refusal: tuple[int, str] | None = None
        if len(self.connections) > min(self.limits.max_connections, connection_limit()):
            OVERLOAD_REFUSALS.labels("connections").inc()
            self._refuse(503, "too many connections: try again shortly", f"Retry-After: {RETRY_AFTER_SECONDS}\r\n")
            return
        if self.per_client[self._counted_as] > self.limits.max_connections_per_client:
            OVERLOAD_REFUSALS.labels("connections_per_client").inc()
            limit = self.limits.max_connections_per_client
            self._refuse_later(
                503,
                f"too many connections from this address (MAX_CONNECTIONS_PER_CLIENT is {limit}): try again shortly",
                f"Retry-After: {RETRY_AFTER_SECONDS}\r\n",
            )
            return
        self._await_headers()

    def _refuse_later(self, status: int, detail: str, extra_headers: str) -> None:
        """A connection over its client's share hears so after HELD_REFUSAL_SECONDS, not at once: a client that
        connects again as soon as it is answered (F5: 2,036 connections over the share, answered 3,750 times a
        second, took a core between it and the service) now does so at most once per connection and hold. Held,
        it reads nothing and counts under no cap but its client's; at most MAX_CONNECTIONS are held at once, and
        beyond them the refusal is at once, as it was."""
        if GuardedHttpToolsProtocol.held_refusals >= self.limits.max_connections:
            self._refuse(status, detail, extra_headers)
            return
        GuardedHttpToolsProtocol.held_refusals += 1
        self._refused = True
        self.connections.discard(self)
        self.transport.pause_reading()
        self._held = self.loop.call_later(HELD_REFUSAL_SECONDS, self._refuse_held, status, detail, extra_headers)

    def _refuse_held(self, status: int, detail: str, extra_headers: str) -> None:
        self._let_go_of_hold()
        self.transport.resume_reading()  # what comes while it lingers is read and dropped
        self._refuse(status, detail, extra_headers)

    def _let_go_of_hold(self) -> None:
        if self._held is not None:
            self._held.cancel()
            self._held = None
            GuardedHttpToolsProtocol.held_refusals -= 1

    def data_received(self, data: bytes) -> None:
        if self._refused:
            if self._held is not None:  # uvloop starts reading after connection_made, whose pause_reading it ignores
                self.transport.pause_reading()
            return  # answered already (or held): what still comes is read and dropped until the connection closes
        if self._header_deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._await_headers()  # the first bytes of a request on a kept-alive connection
        self._progressed = False
        super().data_received(data)
        self._head_bytes = 0 if self._progressed else self._head_bytes + len(data)
        if self._head_bytes > MAX_HEAD_BYTES and self._head_refusal is None:
            self._head_refusal = (431, f"request headers or trailers over {MAX_HEAD_BYTES // 1024} KiB")
        if self._head_refusal is not None and not self._refused:
            self._refuse_head(*self._head_refusal)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_total = 0

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > MAX_HEAD_LINE_BYTES:
            self._head_refusal = self._head_refusal or (414, f"request target over {MAX_HEAD_LINE_BYTES // 1024} KiB")
        elif self._head_refusal is None:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_total += len(name) + len(value) + 4
        if len(name) + len(value) > MAX_HEAD_LINE_BYTES:
            self._head_refusal = self._head_refusal or (431, f"a request header over {MAX_HEAD_LINE_BYTES // 1024} KiB")
        elif self._head_total + len(self.url) > MAX_HEAD_BYTES:
            self._head_refusal = self._head_refusal or (431, f"request headers or trailers over {MAX_HEAD_BYTES // 1024} KiB")
        elif self._head_refusal is None:
            super().on_header(name, value)

    def on_body(self, body: bytes) -> None:
        if self._head_refusal is None:
            self._progressed = True
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._head_refusal is None:
            super().on_message_complete()

    def _refuse_head(self, status: int, detail: str) -> None:
        OVERLOAD_REFUSALS.labels("request_head").inc()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # trailers: the request runs, and hears it has ended
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self._refused = True
                self.transport.close()
                return
        self._refuse(status, detail)

    def on_headers_complete(self) -> None:
        if self._head_refusal is not None:
            return  # answered once this piece has been read, and the request never starts
        self._progressed = True
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        cast(dict[str, Any], self.scope)[ABORT_KEY] = self.transport.abort  # before uvicorn starts the request with it
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        CONNECTIONS.dec()
        self._let_go_of_hold()
        if self._counted_as:
            self.per_client[self._counted_as] -= 1
            if not self.per_client[self._counted_as]:
                del self.per_client[self._counted_as]
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._header_deadline = self.loop.call_later(self.limits.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            SLOW_CLIENTS.labels("header_timeout").inc()
            self._refuse(408, f"request headers not received within {self.limits.header_timeout:g} s")

    def _refuse(self, status: int, detail: str, extra_headers: str = "") -> None:
        body = json.dumps({"error": detail}).encode()
        head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        self.transport.write((head + extra_headers + "connection: close\r\n\r\n").encode() + body)
        # A lingering close (as nginx's): end our side, but keep reading for a moment, so that bytes the
        # client still sends do not make the kernel answer with a reset that could destroy the answer. A connection
        # lingering so holds no place under MAX_CONNECTIONS: a client refused again and again takes none from others.
        self._refused = True
        self.connections.discard(self)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


@functools.cache
def connection_limit() -> int:
    """Connections this process can hold: its open-file limit (raised to the hard limit) less room for everything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return max(64, soft - 256)  # database connections, temporary files, the encoder and server threads


async def with_send_deadline(stream: Callable[[Any], Awaitable[None]], send: Any, seconds: float) -> None:
    """Run Starlette's StreamingResponse.stream_response (responses.py), which awaits every send without a
    deadline, with one: a client that takes nothing for `seconds` is cut off, and its download gives back the
    read-ahead it holds. One timer, moved for each send (a new one per piece cost ~20% of B7). RecordResponse
    also sets Starlette's `body_iterator` after construction, once its first chunks are read. Pinned by
    test_live_downloads_give_their_read_ahead_back_even_when_clients_leave."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as deadline:

        async def send_in_time(message: Any) -> None:
            deadline.reschedule(loop.time() + seconds)
            await send(message)
            deadline.reschedule(None)  # time spent reading the next chunks is not the client's

        await stream(send_in_time)


def route_template(scope: Any) -> str:
    """The matched route's template (/users/{user_id}/records), not the path, for metric labels: Starlette's
    Router leaves the Route in scope["route"] (routing.py), a key it does not document. Pinned by
    test_metrics_move_as_requests_happen (route="/users/wav")."""
    return getattr(scope.get("route"), "path", "unknown")


# glibc keeps freed memory in its heaps, one per thread that allocated, and raises its mmap threshold
# as big blocks come and go, so after a burst of uploads the process kept ~400 MB it no longer used.
# A fixed threshold maps every block over 64 KiB (network chunks, audio blocks, MP3 chunks) on its own
# and unmaps it when freed (200 uploads at once peaked 35 MB lower than at 128 KiB); malloc_trim(0)
# returns what is free in every heap once the service goes idle. Through ctypes, as glibc's own
# mallopt(3) and malloc_trim(3); elsewhere (musl, macOS) nothing happens. Pinned by the load
# benchmark's "after it" check (RSS back near idle after every scenario, tested in quick mode).
class Malloc:
    """glibc's allocator, tuned when the application starts (`tune`), trimmed when it goes idle (`trim_soon`)."""

    M_MMAP_THRESHOLD = -3  # malloc.h
    _libc: ctypes.CDLL | None = None  # glibc, once tuned
    _trim_pending = False

    def tune(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(self.M_MMAP_THRESHOLD, 64 * 1024)
            self._libc = libc

    def trim_soon(self) -> None:
        """Once idle for a moment, give free heap memory back to the OS (malloc_trim), in a thread."""
        if self._libc is None or self._trim_pending:
            return
        self._trim_pending = True
        loop = asyncio.get_running_loop()

        def trim() -> None:
            self._trim_pending = False
            if RequestMetrics.in_flight == 0 and self._libc is not None:
                loop.run_in_executor(None, self._libc.malloc_trim, 0)

        loop.call_later(0.5, trim)


MALLOC = Malloc()


# Appendix B: the LAME tag #########################################################
# lameenc gives the frames; what it does not give (it sets lame_set_bWriteVbrTag(0)) is the first
# frame a player reads to time and trim the file: the Info (CBR) / Xing (VBR) frame with LAME's
# extension (frame and byte counts, seek table, encoder delay and padding). It is rebuilt here, as
# lame_get_lametag_frame() would write it, from the settings, the frame headers as they come out
# of the encoder and the PCM frame count: the rules of libmp3lame 3.100's lame.c (lame_init_params,
# lame_encode_flush), presets.c, util.c (fill_buffer_resample), bitstream.c and VbrTag.c, ported
# with their names and checked byte by byte against `lame` (test_lame_tag_matches_lame_field_by_field).


BytesLike = bytes | bytearray | memoryview


# VbrTag.c PutLameVBR: strncpy(get_lame_tag_encoder_short_version(), 9). lameenc 1.9.0 is built from the lame-3.100
# tarball, though its frames' filler says "LAME4.0": the tag names the source version, as `lame` 3.100 does.
LAME_VERSION = b"LAME3.100"


# tables.c bitrate_table[version]: row 0 = MPEG-2, 1 = MPEG-1, 2 = MPEG-2.5 (LAME's own 2.5 limit of 64 kbps)
BITRATES = (
    (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, -1),
    (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, -1),
    (0, 8, 16, 24, 32, 40, 48, 56, 64, -1, -1, -1, -1, -1, -1, -1),
)
MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # MPEG-1, 2, 2.5 by header bits 20..19
SAMPLERATES = {rate: (bits & 1, i) for bits, rates in MPEG_RATES.items() for i, rate in enumerate(rates)}  # util.c SmpFrqIndex: (version, index)


# util.c nearestBitrateFullIndex table, with lame.c optimum_bandwidth lowpass per entry
FULL_BITRATES = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
CBR_LOWPASS = (2000, 3700, 3900, 5500, 7000, 7500, 10000, 11000, 13500, 15100, 15600, 17000, 17500, 18600, 19400, 19700, 20500)
VBR_MTRH_LOWPASS = (24000, 19500, 18500, 18000, 17500, 17000, 16500, 15600, 15200, 7230, 3950)  # lame.c, vbr_mtrh


# lame.c lame_init_params "mapping VBR scale to internal VBR quality settings" (sr_a, qa, qb, ta, tb), rows 2..8
VBR_Q_MAP = (
    (32000, 6.5, 8.0, 5.2, 6.5),
    (24000, 8.0, 8.5, 5.2, 6.0),
    (22050, 8.5, 9.01, 5.2, 6.5),
    (16000, 9.01, 9.4, 4.9, 6.5),
    (12000, 9.4, 9.6, 4.5, 6.0),
    (11025, 9.6, 9.9, 5.1, 6.5),
    (8000, 9.9, 10.0, 4.9, 6.5),
)


STEREO, JOINT_STEREO, MONO = 0, 1, 3  # lame.h MPEG_mode
ENCDELAY = 576  # encoder.h
LAMEHEADERSIZE = 156  # VbrTag.c: Xing (120) + LAME extension (36)
MAXFRAMESIZE = 2880  # VbrTag.c
FRAMES_BYTES_TOC_SCALE = 0x0F  # VbrTag.h FRAMES_FLAG | BYTES_FLAG | TOC_FLAG | VBR_SCALE_FLAG
_FIXED_HEADER_BITS = 0xFFFF0DCF  # sync, version, layer, CRC, sample rate, private, mode, copyright, original, emphasis


def _frame_sizes() -> tuple[int, ...]:
    """Layer III frame size indexed by header bits 20..9 (version, layer, CRC, bitrate, rate, padding); 0 = invalid."""
    sizes = [0] * 4096
    for ver_bits, rates in MPEG_RATES.items():
        for prot, bri, pad, (sri, rate) in itertools.product((0, 1), range(1, 15), (0, 1), enumerate(rates)):
            v = ver_bits & 1  # MPEG-2.5 frames use MPEG-2's bitrate row
            sizes[ver_bits << 10 | 1 << 8 | prot << 7 | bri << 3 | sri << 1 | pad] = (v + 1) * 72000 * BITRATES[v][bri] // rate + pad
    return tuple(sizes)


FRAME_SIZES = _frame_sizes()


# LAME's CRC-16 (VbrTag.c CRC_update_lookup: x^16 + x^15 + x^2 + 1, reflected, from 0) is CRC-16/ARC.
# anycrc computes it in C at ~15 GB/s: the music CRC over every frame costs ~0.1 ms a minute of audio.
CRC16_ARC = anycrc.Model("CRC16-ARC")


def crc16(data: BytesLike, crc: int = 0) -> int:
    """LAME's CRC-16 of `data`, continuing from `crc`."""
    return int(CRC16_ARC.calc(data, crc))


@dataclasses.dataclass(frozen=True)
class LameSettings:
    """What lameenc is given: set_in_sample_rate, set_channels, set_quality and set_bit_rate or set_vbr(4) + set_vbr_quality."""

    in_rate: int
    channels: int
    quality: int = 3
    bitrate: int | None = 128  # CBR kbps, None for VBR
    vbr_quality: int | None = None  # -V 0..9 (vbr_mtrh), None for CBR

    def __post_init__(self) -> None:
        if (self.bitrate is None) == (self.vbr_quality is None):
            raise ValueError("exactly one of bitrate (CBR) and vbr_quality (VBR) must be set")
        if self.channels not in (1, 2) or self.in_rate <= 0:
            raise ValueError("channels must be 1 or 2 and in_rate positive")
        if not (0 < (self.bitrate or 1) <= 320 and 0 <= (self.vbr_quality or 0) <= 9):  # > 320: no reservoir, not ported
            raise ValueError("bitrate must be 1..320 kbps and vbr_quality 0..9")


@dataclasses.dataclass(frozen=True)
class LameConfig:
    """The parts of LAME's SessionConfig_t / lame_global_flags that end up in the tag."""

    in_rate: int
    out_rate: int
    version: int  # 1 = MPEG-1, 0 = MPEG-2 / 2.5 (cfg->version)
    samplerate_index: int
    mode: int  # STEREO, JOINT_STEREO or MONO
    vbr: bool
    bitrate: int  # CBR: the bitrate LAME really uses (FindNearestBitrate); VBR: cfg->avg_bitrate is unused
    lowpass: int  # cfg->lowpassfreq in Hz, -1 = none
    quality: int  # gfp->quality after lame_init_params
    vbr_q: int  # gfp->VBR_q after lame_init_params (4 = lame_init default for CBR)
    preset: int
    ath_type: int
    safe_joint: bool
    noise_shaping: int

    @property
    def frame_samples(self) -> int:
        return 1152 if self.out_rate > 24000 else 576


def _nearest_full_index(kbps: int) -> int:
    """util.c nearestBitrateFullIndex (ties go up)."""
    return min(range(17), key=lambda b: (abs(FULL_BITRATES[b] - kbps), -b))


def _find_nearest_bitrate(kbps: int, version: int, rate: int) -> int:
    """util.c FindNearestBitrate: LAME caps e.g. 320 kbps to 160 (MPEG-2) or 64 (MPEG-2.5)."""
    return min((b for b in BITRATES[2 if rate < 16000 else version][1:15] if b > 0), key=lambda b: abs(b - kbps))  # ties: the lower


def _optimum_samplefreq(lowpass: int, in_rate: int) -> int:
    """lame.c optimum_samplefreq."""
    valid = (48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
    suggested = next((r for r in valid if in_rate >= r), 44100)
    if lowpass == -1:
        return suggested
    for limit, rate in ((15960, 44100), (15250, 32000), (11220, 24000), (9970, 22050), (7230, 16000), (5420, 12000), (4510, 11025), (3970, 8000)):
        if lowpass <= limit:
            suggested = rate
    if in_rate < suggested:  # "choose a valid MPEG sample frequency above the input sample frequency"
        return next((r for r, below in itertools.pairwise(valid) if in_rate > below), 8000)
    return suggested


def lame_config(s: LameSettings) -> LameConfig:
    """Port of lame_init_params for lameenc's calls (lameenc.c sets MONO for 1 channel, STEREO for CBR > 128 kbps)."""
    vbr, q = s.vbr_quality is not None, min(max(s.quality, 0), 9)  # lame_set_quality clamps
    mode = MONO if s.channels == 1 else STEREO if not vbr and (s.bitrate or 0) > 128 else JOINT_STEREO
    vbr_q = s.vbr_quality if s.vbr_quality is not None else 4  # lame_init: VBR_q = 4
    vbr_q_frac, lowpass, out_rate = np.float32(0), 0, 0
    if vbr:  # lame.c: VBR quality remapping for low input rates (float arithmetic as in C)
        qval = np.float32(vbr_q)
        for sr, *floats in VBR_Q_MAP:
            qa, qb, ta, tb = np.array(floats, np.float32)
            if s.in_rate == sr and qval < qa:
                d = float(qval / qa) * float(ta)
                vbr_q, vbr_q_frac = int(d), np.float32(d - int(d))
            if s.in_rate >= sr and qa <= qval < qb:
                d = float(ta + (tb - ta) * (qval - qa) / (qb - qa))
                vbr_q, vbr_q_frac, out_rate, lowpass = int(d), np.float32(d - int(d)), sr, -1
                break
    # lame.c: "if a filter has not been enabled, see if we should add one"
    if not vbr:
        lowpass = int(CBR_LOWPASS[_nearest_full_index(s.bitrate or 0)] * (1.5 if mode == MONO else 1))
    elif lowpass == 0:
        a, b = VBR_MTRH_LOWPASS[vbr_q : vbr_q + 2]
        lowpass = int(a + float(vbr_q_frac) * (b - a))
    if out_rate == 0:
        if 2 * lowpass > s.in_rate:
            lowpass = s.in_rate // 2
        out_rate = _optimum_samplefreq(lowpass, s.in_rate)
    lowpass = min(lowpass, 24000 if vbr else 20500, out_rate // 2)
    version, sr_index = SAMPLERATES[out_rate]
    if vbr:  # apply_preset(500 - 10 * VBR_q): vbr_mt_psy_switch_map row VBR_q sets ATH type 5, safejoint for V0-V7
        bitrate, preset, ath_type, safe_joint, shaping = 0, 500 - 10 * vbr_q, 5, vbr_q <= 7, 0
        quality = 0 if q < 5 else min(q, 7)
    else:  # apply_abr_preset(nearest bitrate): abr_switch_map's sfscale (noise_shaping = 2) below 192 kbps; its safejoint
        # (above 128 kbps) never shows, as lameenc encodes STEREO there
        bitrate = _find_nearest_bitrate(s.bitrate or 0, version, out_rate)
        preset, ath_type, safe_joint, shaping = bitrate, 4, False, 2 if bitrate < 192 else 0
        quality = 7 if q == 8 else q  # lame_init_qval
    shaping = 0 if quality >= 7 else shaping or 1  # lame_init_qval
    return LameConfig(
        s.in_rate,
        out_rate,
        version,
        sr_index,
        mode,
        vbr,
        bitrate,
        lowpass,
        quality,
        vbr_q,
        preset,
        ath_type,
        safe_joint and mode == JOINT_STEREO,
        shaping,
    )


class Mp3Frames:
    """Fed the bytes lameenc returns, in order (a frame may be split across calls).

    Parses Layer III headers as they come: counts frames and bytes, keeps each frame's bitrate index (for LAME's
    addVbr TOC bag), the first/last header (version, sample rate, mode; mode_ext of the last frame goes into the tag
    header as in setLameTagFrameHeader) and LAME's nMusicCRC over all audio bytes."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.first_header = 0
        self.last_header = 0
        self._bitrate_indexes = bytearray()
        self._skip = 0  # bytes of the current frame still to come
        self._head = b""  # start of a header split across calls, read again with the next
        self.music_crc = 0

    @property
    def frame_count(self) -> int:
        return len(self._bitrate_indexes)

    @property
    def version(self) -> int:
        """1 = MPEG-1, 0 = MPEG-2 or 2.5 (as LAME's cfg->version)."""
        return self.first_header >> 19 & 1

    @property
    def sample_rate(self) -> int:
        return MPEG_RATES[self.first_header >> 19 & 3][self.first_header >> 10 & 3]

    @property
    def mode(self) -> int:
        return self.first_header >> 6 & 3

    @property
    def mode_ext(self) -> int:
        return self.last_header >> 4 & 3

    def bitrates(self) -> np.ndarray:
        """kbps of every frame, from LAME's bitrate_table[cfg->version] as AddVbrFrame uses it."""
        table = np.array(BITRATES[self.version], np.int64)
        return table[np.frombuffer(bytes(self._bitrate_indexes), np.uint8)]

    def feed(self, data: BytesLike) -> None:
        data = bytes(data)
        self.nbytes += len(data)
        self.music_crc = crc16(data, self.music_crc)
        data = self._head + data
        n, pos, h = len(data), self._skip, self.last_header
        sizes, first, indexes, unpack = FRAME_SIZES, self.first_header, self._bitrate_indexes, struct.Struct(">I").unpack_from
        while pos + 4 <= n:
            (h,) = unpack(data, pos)
            size = sizes[h >> 9 & 0xFFF]
            if (h ^ first) & _FIXED_HEADER_BITS or not size:
                first = self._first_frame(h, size)
            indexes.append(h >> 12 & 15)
            pos += size
        self.last_header = h
        self._head, self._skip = data[pos:], max(pos - n, 0)

    def _first_frame(self, h: int, size: int) -> int:
        """The slow path: the stream's first header, or a bad one (every later header that differs from the first)."""
        if h >> 21 != 0x7FF or not size:
            raise ValueError(f"not an MPEG Layer III frame header: {h:08x} (in the {self.nbytes} bytes fed so far)")
        if self.first_header:
            raise ValueError(f"frame header {h:08x} does not match the stream's first {self.first_header:08x}")
        self.first_header = self.last_header = h
        return h


def xing_toc(kbps: np.ndarray) -> bytes:
    """VbrTag.c addVbr (bag of 400 sums, 'want' doubling) + Xing_seek_table (float arithmetic) for frame bitrates."""
    n = len(kbps)
    if not n:
        return bytes(100)
    want = 1
    while n >= 400 * want:  # the bag is halved each time it fills up
        want *= 2
    pos = n // want
    cum = np.cumsum(kbps, dtype=np.int64)
    bag = cum[np.arange(1, pos + 1) * want - 1]  # bag[p] = sum of the first (p + 1) * want frames
    total = int(cum[-1])
    j = np.arange(1, 100, dtype=np.float32) / np.float32(100)
    idx = np.minimum(np.floor(j * np.float32(pos)).astype(np.int64), pos - 1)
    act = bag[idx].astype(np.float32).astype(np.float64)
    seek = np.minimum((256.0 * act / float(np.float32(total))).astype(np.int64), 255)
    return bytes([0]) + bytes(seek.astype(np.uint8).tobytes())


def resampled_count(chunks: Sequence[int], in_rate: int, out_rate: int, frame_samples: int) -> int:
    """Samples util.c fill_buffer_resample outputs for encode() calls of the given PCM frame counts.

    Replays its bookkeeping in the same double arithmetic: per call, lame_encode_buffer_sample_t asks for at most one
    frame (desired_len) at a time; output k needs input floor(k * ratio - itime) + 16 < len (filter_l - filter_l/2 = 16
    for both filter lengths). Mathematically that is ceil((n - 16) * out / in), but when that is an exact integer the
    rounding of itime decides, and that depends on the call sizes."""
    ratio = float(in_rate) / float(out_rate)
    itime, total = 0.0, 0
    for n in chunks:
        while n > 0:
            k = min(max(0, math.ceil((n - 16 + itime) / ratio)), frame_samples)  # first guess, then exact search
            while k > 0 and math.floor((k - 1) * ratio - itime) + 16 >= n:
                k -= 1
            while k < frame_samples and math.floor(k * ratio - itime) + 16 < n:
                k += 1
            used = min(n, math.floor((k if k < frame_samples else k - 1) * ratio - itime) + 16)
            itime = itime + (used - k * ratio)
            total += k
            n -= used
    return total


def samples_and_padding(cfg: LameConfig, input_frames: int | Sequence[int]) -> tuple[int, int]:
    """lame.c lame_encode_flush: samples_to_encode (ENCDELAY + samples LAME buffered) and end_padding."""
    chunks = [input_frames] if isinstance(input_frames, int) else input_frames
    lo, hi = (int(np.float32(cfg.out_rate) * np.float32(f)) for f in (0.9995, 1.0005))  # util.c isResamplingNecessary (float)
    if not lo <= cfg.in_rate <= hi:  # "delay due to resampling": samples_to_encode += 16. / resample_ratio (int += double)
        n_out = resampled_count(chunks, cfg.in_rate, cfg.out_rate, cfg.frame_samples)
        samples = int(ENCDELAY + n_out + 16.0 / (float(cfg.in_rate) / float(cfg.out_rate)))
    else:
        samples = ENCDELAY + sum(chunks)
    pad = cfg.frame_samples - samples % cfg.frame_samples
    return samples, pad + cfg.frame_samples if pad < 576 else pad


def lame_tag_frame(settings: LameSettings, frames: Mp3Frames, input_frames: int | Sequence[int], version: bytes = LAME_VERSION) -> bytes:
    """The whole Info (CBR) / Xing (VBR) frame lame_get_lametag_frame() writes, to put before the audio frames.

    input_frames is the number of PCM frames given to encode(), or the list of per-call counts: with resampling
    (88.2-192 kHz input, low bitrates) LAME's resampler count - hence the padding - can depend on the call sizes in
    ~1/(in_rate/gcd) of the lengths; an int is exact for a single call. version: the tag's 9-byte encoder string. b''
    where lame writes no tag (frame too small for it, or no frames). Raises ValueError if the frames do not match what
    LAME makes of the settings (wrong settings or input count)."""
    cfg = lame_config(settings)
    # VbrTag.c InitVbrTag: CBR uses its own bitrate, VBR pretends 128 / 64 / 32 kbps (MPEG-1 / 2 / 2.5), and no tag is
    # written where it does not fit the frame (e.g. 32 kbps CBR MPEG-1 stereo)
    tag_bitrate = cfg.bitrate if not cfg.vbr else 128 if cfg.version == 1 else 32 if cfg.out_rate < 16000 else 64
    size = (cfg.version + 1) * 72000 * tag_bitrate // cfg.out_rate
    i = (21 if cfg.mode == MONO else 36) if cfg.version == 1 else (13 if cfg.mode == MONO else 21)  # lame.c sideinfo_len
    if not i + LAMEHEADERSIZE <= size <= MAXFRAMESIZE or not frames.frame_count:
        return b""
    if (frames.sample_rate, frames.version, frames.mode) != (cfg.out_rate, cfg.version, cfg.mode):
        raise ValueError(f"stream is {frames.sample_rate} Hz v{frames.version} mode {frames.mode}, settings give {cfg}")
    kbps = frames.bitrates()
    if not cfg.vbr and np.any(kbps != cfg.bitrate):
        raise ValueError(f"CBR stream at {sorted(set(kbps.tolist()))} kbps, settings give {cfg.bitrate}")
    samples, padding = samples_and_padding(cfg, input_frames)
    if frames.frame_count != (samples + padding) // cfg.frame_samples:  # lame_encode_flush: frames_left
        raise ValueError(
            f"{frames.frame_count} frames, but LAME makes {(samples + padding) // cfg.frame_samples}"
            f" for {input_frames if isinstance(input_frames, int) else sum(input_frames)} input frames"
        )

    buf = bytearray(size)
    # setLameTagFrameHeader: header of the first frame with the Xing bitrate, no padding, mode_ext of the last frame
    mpeg25 = cfg.out_rate < 16000
    bitrate_index = BITRATES[2 if mpeg25 else cfg.version].index(tag_bitrate)
    buf[0] = 0xFF
    buf[1] = 0xFB if cfg.version == 1 else 0xE3 if mpeg25 else 0xF3
    buf[2] = bitrate_index << 4 | cfg.samplerate_index << 2
    buf[3] = cfg.mode << 6 | frames.mode_ext << 4 | 1 << 2  # copyright 0, original 1, emphasis 0
    stream_size = (frames.nbytes + size).to_bytes(4, "big")  # nBytesWritten counts audio bytes only (copy_buffer mp3data=1), + this frame
    info = struct.pack(">4sII4s", b"Xing" if cfg.vbr else b"Info", FRAMES_BYTES_TOC_SCALE, frames.frame_count, stream_size)
    buf[i : i + 154] = info + xing_toc(kbps) + _lame_extension(cfg, padding, stream_size, frames.music_crc, version)  # 16 + 100 + 38
    buf[i + 154 : i + 156] = crc16(bytes(buf[: i + 154])).to_bytes(2, "big")  # tag CRC over everything before it
    return bytes(buf)


def _lame_extension(cfg: LameConfig, padding: int, stream_size: bytes, music_crc: int, version: bytes) -> bytes:
    """VbrTag.c PutLameVBR without the trailing tag CRC (ReplayGain / peak not computed: zeros, as --noreplaygain)."""
    quality = max(0, 100 - 10 * cfg.vbr_q - cfg.quality)  # also the Xing "VBR scale" field
    lowpass = min(255.0, cfg.lowpass / 100.0 + 0.5)
    rev_method = 4 if cfg.vbr else 1  # vbr_type_translator[vbr_mtrh] / [vbr_off], revision 0
    flags = cfg.ath_type + (1 << 4) + (cfg.safe_joint << 5)  # nspsytune always on, no nogap
    abr = (8 if cfg.version == 0 else 32) if cfg.vbr else min(cfg.bitrate, 255)  # vbr_min_bitrate_index 1 / CBR rate
    stereo = {MONO: 0, STEREO: 1, JOINT_STEREO: 3}[cfg.mode]
    non_optimal = cfg.in_rate <= 32000  # the only "nasty option" lameenc can trigger
    source = 0 if cfg.in_rate <= 32000 else 2 if cfg.in_rate == 48000 else 3 if cfg.in_rate > 48000 else 1
    misc = cfg.noise_shaping + (stereo << 2) + (non_optimal << 5) + (source << 6)
    delay_padding = (ENCDELAY << 12 | padding).to_bytes(3, "big")  # 12 bits each
    # 8x: peak amplitude (4), radio and audiophile ReplayGain (2 + 2); x: MP3Gain's byte, unused
    return struct.pack(
        ">I9s2B8x2B3sBxH4sH", quality, version, rev_method, int(lowpass), flags, abr, delay_padding, misc, cfg.preset, stream_size, music_crc
    )


if __name__ == "__main__":
    main()
