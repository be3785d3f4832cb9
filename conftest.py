"""pytest's side of the tests: fixtures for the database, the app in-process and a live server, and helpers
that decode MP3s and upload through httpx. What the benchmark shares with the tests is in testkit.py.

The tests run on SQLite by default; TEST_DATABASE_URL=postgresql://... runs them on PostgreSQL: each pytest-xdist
worker makes a database of its own beside that one (`<name>_gw0`, `<name>_gw1`, made afresh, so the role needs
CREATEDB) and leaves its users and records in it.

The suite runs on both cores (pyproject.toml: `-n auto`): every server, port, directory, database and browser
a test uses comes from a fixture that makes its own. `--screenshot` runs one test alone, the one that writes
docs/page.png; without it that test is deselected, so the test command never changes a tracked file.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import miniaudio
import numpy as np
import pytest

import wav2mp3
from testkit import LiveServer, RemoteSite, credentials, unique_name

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "")
PAGE_URL = os.environ.get("PAGE_URL", "")


# The run ########################################################################


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--screenshot", action="store_true", help="run only the test that writes docs/page.png (the README's command)")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The page's tests run on one worker: they share one browser, or start one of their own (`russian_browser`)
    there; `--screenshot` selects the screenshot test alone, and without it that test is deselected."""
    for item in items:
        if any(name.endswith("browser") for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("browser"))
    wanted = config.getoption("--screenshot")
    chosen = [item for item in items if (item.get_closest_marker("screenshot") is not None) == wanted]
    config.hook.pytest_deselected(items=[item for item in items if item not in chosen])
    items[:] = chosen


# MP3 decoding ####################################################################


def decode(mp3: bytes) -> tuple[int, int, np.ndarray]:
    """(sample rate, channels, (frames x channels) int16) of an MP3, decoded in-process."""
    sound = miniaudio.mp3_read_s16(mp3)
    samples = np.frombuffer(sound.samples, dtype=np.int16).reshape(-1, sound.nchannels)
    return sound.sample_rate, sound.nchannels, samples


def dominant_frequency(channel: np.ndarray, rate: int) -> float:
    middle = channel[len(channel) // 4 : 3 * len(channel) // 4].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
    return float(np.argmax(spectrum) * rate / len(middle))


def rms_dbfs(channel: np.ndarray) -> float:
    middle = channel[len(channel) // 4 : 3 * len(channel) // 4].astype(np.float64) / 32768
    return 20 * math.log10(max(float(np.sqrt(np.mean(middle**2))), 1e-9))


def assert_duration(decoded_frames: int, rate: int, seconds: float) -> None:
    # A decoder that ignores the LAME tag adds LAME's delay and padding: up to ~2 MP3 frames of 1152 samples.
    duration = decoded_frames / rate
    assert seconds - 0.1 <= duration <= seconds + 0.1 + 2304 / rate, (duration, seconds)


def ffmpeg_decode(mp3: bytes, *args: str) -> tuple[np.ndarray, str]:
    """(frames x channels) int16 as ffmpeg decodes the file (it honours the LAME tag: gapless), and what it printed."""
    channels = decode(mp3)[1]
    with tempfile.NamedTemporaryFile(suffix=".mp3") as file:  # a file, not a pipe: ffmpeg trims the padding only where it can seek
        file.write(mp3)
        file.flush()
        done = subprocess.run(["ffmpeg", "-v", "warning", *args, "-i", file.name, "-f", "s16le", "-"], capture_output=True, check=True)
    return np.frombuffer(done.stdout, dtype="<i2").reshape(-1, channels), done.stderr.decode()


def mp3_frames(mp3: bytes) -> list[bytes]:
    """The MPEG frames of a file, after any ID3v2 tag (the first is the Info/Xing frame when there is one)."""
    offset = 0
    if mp3[:3] == b"ID3":
        offset = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(mp3[6:10]))  # syncsafe size (ID3v2.4 §3.1)
    frames = []
    while offset + 4 <= len(mp3):
        size = wav2mp3.FRAME_SIZES[int.from_bytes(mp3[offset : offset + 4], "big") >> 9 & 0xFFF]
        assert size, f"no frame header at {offset}"
        frames.append(mp3[offset : offset + size])
        offset += size
    return frames


def convert(wav: bytes, **options: int) -> wav2mp3.Mp3File:
    """A WAV converted in-process, without HTTP: the same job an upload runs."""

    async def run() -> wav2mp3.Mp3File:
        encoders = wav2mp3.Encoders(1, 16 * wav2mp3.MIB, wav2mp3.DiskBudget(1 << 40))
        job = wav2mp3.UploadSession(wav2mp3.Mp3Options(**{"bitrate": 128, **options}), encoders, "")
        try:
            for offset in range(0, len(wav), 65536):
                await job.feed(wav[offset : offset + 65536])
            return await job.finish()
        finally:
            job.close()
            encoders.shutdown()

    return asyncio.run(run())


# The database ####################################################################


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def postgresql_url() -> str:
    """This worker's own PostgreSQL database beside TEST_DATABASE_URL's, made afresh; "" without TEST_DATABASE_URL."""
    if not TEST_DATABASE_URL:
        return ""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    parts = urlsplit(TEST_DATABASE_URL)
    name = f"{parts.path.lstrip('/')}_{worker}"

    async def make() -> None:
        connection = await asyncpg.connect(TEST_DATABASE_URL)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    asyncio.run(make())
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture
def database_url(tmp_path: Path, postgresql_url: str) -> str:
    return postgresql_url or f"sqlite:///{tmp_path / 'wav2mp3.db'}"


async def db_rows(database_url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of a query run straight on the database ($1, $2... parameters), not through the service."""
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as connection:
            return connection.execute(query.replace("$1", "?").replace("$2", "?"), args).fetchall()
    connection = await asyncpg.connect(database_url)
    try:
        return [tuple(row) for row in await connection.fetch(query, *args)]
    finally:
        await connection.close()


async def table_counts(database_url: str) -> dict[str, int]:
    return {table: (await db_rows(database_url, f"SELECT count(*) FROM {table}"))[0][0] for table in ("users", "records", "record_chunks")}


async def assert_no_orphans(database_url: str) -> None:
    """Every chunk belongs to a record, and every record's chunks add up to its size, in sequence."""
    orphans = await db_rows(database_url, "SELECT count(*) FROM record_chunks c LEFT JOIN records r ON r.id = c.record_id WHERE r.id IS NULL")
    assert orphans[0][0] == 0
    sizes = await db_rows(
        database_url,
        "SELECT r.id, r.size_bytes, COALESCE(SUM(LENGTH(c.data)), 0), COUNT(c.seq), COALESCE(MAX(c.seq), -1)"
        " FROM records r LEFT JOIN record_chunks c ON c.record_id = r.id GROUP BY r.id, r.size_bytes",
    )
    for record_id, size, stored, count, last in sizes:
        assert (size, count) == (stored, last + 1), record_id


# The app in-process ##############################################################


async def start_app(database_url: str, **settings: Any) -> tuple[Any, Any]:
    app = wav2mp3.create_app(wav2mp3.Settings(database_url=database_url, **settings))
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    return app, lifespan


@contextlib.asynccontextmanager
async def running_app(database_url: str, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An app with its own settings, and a client for it."""
    app, lifespan = await start_app(database_url, **settings)
    try:
        async with asgi_client(app) as client:
            yield client
    finally:
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[Any]:
    app, lifespan = await start_app(database_url)
    yield app
    await lifespan.__aexit__(None, None, None)
    await assert_no_orphans(database_url)  # after every test: no chunk without its record, no record short of chunks


def asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=60)


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as client:
        yield client


# Users and uploads ###############################################################


async def new_user(client: httpx.AsyncClient) -> dict[str, str]:
    response = await client.post("/users", json={"name": unique_name()})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def upload_form(user: dict[str, str], wav: bytes, filename: str = "call.wav", **fields: str) -> dict[str, Any]:
    """httpx's own form encoding, as a client application sends it: fields first, then the file."""
    return {"data": {"data": credentials(user).decode(), **fields}, "files": {"audio_file": (filename, wav, "audio/wav")}}


async def upload(client: httpx.AsyncClient, user: dict[str, str], wav: bytes, filename: str = "call.wav", **fields: str) -> httpx.Response:
    return await client.post("/users/wav", **upload_form(user, wav, filename, **fields))


def record_path(url: str) -> str:
    return "/record" + url.split("/record", 1)[1]


async def uploaded(client: httpx.AsyncClient, wav: bytes, filename: str = "call.wav", **fields: str) -> tuple[dict[str, Any], bytes]:
    """Upload with a new user; the 201 body and the downloaded MP3, checked against the 201's sha256."""
    user = await new_user(client)
    response = await upload(client, user, wav, filename, **fields)
    assert response.status_code == 201, response.text
    download = await client.get(record_path(response.json()["url"]))
    assert download.status_code == 200
    assert wav2mp3.hashlib.sha256(download.content).hexdigest() == response.json()["sha256"]
    return response.json(), download.content


# A real server ###################################################################


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, postgresql_url: str) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("live")
    # Shared by a module's tests, which make users by the hundred from one address: no USER_CREATIONS_PER_MINUTE.
    # The operator's routes are served (ADMIN_TOKEN, a secret nobody sends), so that the fuzzer reaches them too.
    url = postgresql_url or f"sqlite:///{directory / 'live.db'}"
    server = LiveServer(directory, url, "--user-creations-per-minute", "0", "--admin-token", str(uuid.uuid4()))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(request: pytest.FixtureRequest) -> LiveServer | RemoteSite:
    """Where the page's tests open the page: `live`, or a deployment given as PAGE_URL (e.g. compose's nginx,
    http://127.0.0.1:8000), so that the same tests check the page from the container, behind the proxy."""
    return RemoteSite(PAGE_URL) if PAGE_URL else request.getfixturevalue("live")  # type: ignore[no-any-return]
