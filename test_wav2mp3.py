"""wav2mp3 through its real HTTP interface and a real database.

Runs on SQLite by default; set TEST_DATABASE_URL=postgresql://... (a throwaway database) to run on PostgreSQL.
`-m "not slow"` leaves out the benchmark smoke runs, floods and other long runs (see pyproject.toml).
Most tests drive the app in-process with httpx's ASGI transport; the streaming, early-answer,
disconnect, memory and fuzzing tests run `python wav2mp3.py` as a real uvicorn server on
loopback, and so do those that upload with tus-js-client under Node (tests/tus_client.mjs). WAVs are
generated in code (conftest.py); MP3s are decoded with miniaudio.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import functools
import getpass
import hashlib
import hmac
import http.server
import io
import itertools
import json
import logging
import math
import os
import re
import select
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiosqlite
import asyncpg
import httpx
import hypothesis
import hypothesis.strategies as st
import mutagen.id3
import mutagen.mp3
import numpy as np
import pytest
import schemathesis
import tusclient.client
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

import wav2mp3
from conftest import (
    asgi_client,
    assert_duration,
    assert_no_orphans,
    convert,
    db_rows,
    decode,
    dominant_frequency,
    ffmpeg_decode,
    mp3_frames,
    new_user,
    record_path,
    rms_dbfs,
    running_app,
    start_app,
    table_counts,
    upload,
    upload_form,
    uploaded,
)
from testkit import (
    HERE,
    KSDATAFORMAT_SUFFIX,
    LiveServer,
    RemoteSite,
    credentials,
    encode_samples,
    fmt_chunk,
    form_part,
    free_port,
    info_list,
    long_wav,
    make_wav,
    multipart,
    music,
    patch,
    rf64,
    riff_chunk,
    rifx,
    sine,
    streamed_upload,
    unique_name,
    wav_header,
)

pytestmark = pytest.mark.anyio


# Users ###########################################################################

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


async def test_create_user_returns_201_with_uuid4_id_and_token(client: httpx.AsyncClient) -> None:
    response = await client.post("/users", json={"name": unique_name()})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"user_id", "access_token"}
    assert UUID4.match(body["user_id"]) and UUID4.match(body["access_token"])
    assert body["user_id"] != body["access_token"]


async def test_create_user_duplicate_name_is_200_with_seed_error(client: httpx.AsyncClient) -> None:
    name = unique_name()
    assert (await client.post("/users", json={"name": name})).status_code == 201
    response = await client.post("/users", json={"name": name})
    assert response.status_code == 200
    assert response.json() == {"error_name": "user with name already is"}


async def test_create_user_strips_whitespace_and_is_case_sensitive(client: httpx.AsyncClient) -> None:
    name = unique_name()
    assert (await client.post("/users", json={"name": f"  {name}\t"})).status_code == 201
    assert (await client.post("/users", json={"name": name})).json() == {"error_name": "user with name already is"}
    assert (await client.post("/users", json={"name": name.upper()})).status_code == 201


async def test_create_user_accepts_json_whatever_the_content_type(client: httpx.AsyncClient) -> None:
    response = await client.post("/users", content=f'{{"name": "{unique_name()}"}}', headers={"Content-Type": "text/plain"})
    assert response.status_code == 201


async def test_create_user_name_of_128_unicode_characters_is_accepted(client: httpx.AsyncClient) -> None:
    name = ("é" * 116) + uuid.uuid4().hex[:12]
    assert len(name) == 128
    assert (await client.post("/users", json={"name": name})).status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'"name"',
        b"{}",
        b'{"name": 5}',
        b'{"name": null}',
        b'{"name": ""}',
        b'{"name": "   "}',
        b'{"name": "' + b"x" * 129 + b'"}',
        b'{"name": "a\\nb"}',
        b'{"name": "nul\\u0000"}',
        b'{"name": "del\\u007f"}',
        b'{"name": "\\ud800"}',
        b"[" * 50000,
    ],
    ids=lambda b: b[:24].decode("latin-1"),
)
async def test_create_user_invalid_body_is_422_and_stores_nothing(client: httpx.AsyncClient, database_url: str, body: bytes) -> None:
    before = await table_counts(database_url)
    response = await client.post("/users", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert isinstance(response.json()["error"], str)
    assert await table_counts(database_url) == before


async def test_create_user_body_over_64_kib_is_413(client: httpx.AsyncClient) -> None:
    response = await client.post("/users", json={"name": "x", "padding": "y" * 70000})
    assert response.status_code == 413
    assert "error" in response.json()


async def test_create_user_30_parallel_creates_of_one_name_give_one_201(client: httpx.AsyncClient) -> None:
    name = unique_name()
    responses = await asyncio.gather(*(client.post("/users", json={"name": name}) for _ in range(30)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 29 + [201]
    assert all(r.json() == {"error_name": "user with name already is"} for r in responses if r.status_code == 200)


async def test_access_token_is_stored_only_as_its_sha256(client: httpx.AsyncClient, database_url: str) -> None:
    user = await new_user(client)
    rows = await db_rows(database_url, "SELECT id, name, token_sha256, created_at FROM users WHERE id = $1", user["user_id"])
    assert rows[0][2] == hashlib.sha256(user["access_token"].encode()).hexdigest()
    assert all(user["access_token"] not in str(value) for value in rows[0])


# Upload: success ################################################################


async def test_upload_returns_201_with_link_location_and_metadata(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    response = await upload(client, user, make_wav(2.0, 44100, 2), "meeting.wav")
    assert response.status_code == 201, response.text
    body = response.json()
    assert re.fullmatch(r"http://testserver/record\?id=[0-9a-f-]{36}&user=" + user["user_id"], body["url"])
    assert response.headers["location"] == body["url"]
    assert body["record_id"] in body["url"] and body["user_id"] == user["user_id"]
    assert body["filename"] == "meeting.mp3"
    assert body["duration_seconds"] == pytest.approx(2.0)
    mp3 = (await client.get(record_path(body["url"]))).content
    assert body["size_bytes"] == len(mp3)
    assert body["sha256"] == hashlib.sha256(mp3).hexdigest()


async def test_upload_link_uses_the_request_host_and_port(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    response = await client.post("http://example.org:8123/users/wav", **upload_form(user, make_wav(0.5)))
    assert response.json()["url"].startswith("http://example.org:8123/record?id=")


async def test_upload_link_uses_public_url_when_configured(database_url: str) -> None:
    async with running_app(database_url, public_url="https://audio.example.com") as client:
        response = await upload(client, await new_user(client), make_wav(0.5))
        assert response.json()["url"].startswith("https://audio.example.com/record?id=")


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
async def test_upload_mp3_has_the_wav_duration_channels_and_rate(client: httpx.AsyncClient, channels: int, rate: int) -> None:
    body, mp3 = await uploaded(client, make_wav(1.5, rate, channels))
    mp3_rate, mp3_channels, samples = decode(mp3)
    assert (mp3_rate, mp3_channels) == (rate, channels)
    assert_duration(len(samples), mp3_rate, 1.5)
    assert body["duration_seconds"] == pytest.approx(1.5)
    assert dominant_frequency(samples[:, 0], mp3_rate) == pytest.approx(440, abs=5)


@pytest.mark.parametrize("rate", [96000, 192000])
async def test_upload_high_sample_rate_is_resampled_by_lame(client: httpx.AsyncClient, rate: int) -> None:
    _, mp3 = await uploaded(client, make_wav(1.0, rate, 2))
    mp3_rate, _, samples = decode(mp3)
    assert mp3_rate == 48000
    assert_duration(len(samples), mp3_rate, 1.0)


async def test_upload_bitrate_field_sets_the_mp3_bitrate(client: httpx.AsyncClient) -> None:
    wav = make_wav(4.0, 44100, 2)
    body_64, _ = await uploaded(client, wav, bitrate="64")
    body_256, _ = await uploaded(client, wav, bitrate="256")
    # CBR: bytes = kbps * 1000 / 8 * seconds (+ padding frames)
    assert body_64["size_bytes"] == pytest.approx(64000 / 8 * 4.0, rel=0.1)
    assert body_256["size_bytes"] == pytest.approx(256000 / 8 * 4.0, rel=0.1)


async def test_upload_bitrate_sent_after_the_audio_is_honoured(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    body, headers = multipart(
        form_part("audio_file", make_wav(4.0, 44100, 2), "a.wav"), form_part("bitrate", b"64"), form_part("data", credentials(user))
    )
    response = await client.post("/users/wav", content=body, headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["size_bytes"] == pytest.approx(64000 / 8 * 4.0, rel=0.1)
    mp3 = (await client.get(record_path(response.json()["url"]))).content
    assert hashlib.sha256(mp3).hexdigest() == response.json()["sha256"]
    rate, _, samples = decode(mp3)
    assert_duration(len(samples), rate, 4.0)


async def test_upload_late_bitrate_for_a_file_too_large_to_keep_is_422(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wav2mp3, "KEEP_WAV_BYTES", 100_000)
    user = await new_user(client)
    body, headers = multipart(
        form_part("data", credentials(user)), form_part("audio_file", make_wav(2.0, 44100, 2), "a.wav"), form_part("bitrate", b"64")
    )
    response = await client.post("/users/wav", content=body, headers=headers)
    assert response.status_code == 422
    assert "before audio_file" in response.json()["error"]


async def test_upload_accepts_parts_in_any_order(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    body, headers = multipart(form_part("audio_file", make_wav(0.5), "late.wav"), form_part("data", credentials(user)))
    response = await client.post("/users/wav", content=body, headers=headers)
    assert response.status_code == 201, response.text


async def test_upload_strips_directories_from_the_file_name(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    response = await upload(client, user, make_wav(0.5), "C:\\calls\\2024/monday.wav")
    assert response.json()["filename"] == "monday.mp3"
    assert (await upload(client, user, make_wav(0.5), "monday.wav")).status_code == 409


# Upload: refusals ###############################################################


async def test_upload_wrong_token_or_unknown_user_is_403_with_one_message(client: httpx.AsyncClient, database_url: str) -> None:
    user = await new_user(client)
    before = await table_counts(database_url)
    first = await upload(client, {**user, "access_token": str(uuid.uuid4())}, make_wav(0.5))
    second = await upload(client, {**user, "user_id": str(uuid.uuid4())}, make_wav(0.5))
    assert first.status_code == second.status_code == 403
    assert first.json() == second.json() == {"error": "unknown user_id or wrong access_token"}
    assert await table_counts(database_url) == before


async def test_upload_duplicate_file_name_is_409_but_another_user_may_use_it(client: httpx.AsyncClient, database_url: str) -> None:
    alice, bob = await new_user(client), await new_user(client)
    assert (await upload(client, alice, make_wav(0.5), "standup.wav")).status_code == 201
    before = await table_counts(database_url)
    again = await upload(client, alice, make_wav(0.7), "standup.wav")
    assert again.status_code == 409
    assert "standup.wav" in again.json()["error"]
    assert await table_counts(database_url) == before
    assert (await upload(client, alice, make_wav(0.5), "Standup.wav")).status_code == 201  # case-sensitive
    assert (await upload(client, bob, make_wav(0.5), "standup.wav")).status_code == 201


BAD_PARTS = [form_part("bitrate", b"100"), form_part("channels", b"3"), form_part("data", b"{}")]


@pytest.mark.parametrize("bad_part", BAD_PARTS, ids=["bitrate", "channels", "second-data"])
async def test_upload_with_a_taken_name_and_a_malformed_part_is_422_not_409(client: httpx.AsyncClient, bad_part: bytes) -> None:
    """The request is wrong whatever the name: the malformed part is the answer, wherever it comes."""
    user = await new_user(client)
    assert (await upload(client, user, make_wav(0.3), "taken.wav")).status_code == 201
    for parts in [
        (form_part("data", credentials(user)), form_part("audio_file", make_wav(0.3), "taken.wav"), bad_part),
        (form_part("audio_file", make_wav(0.3), "taken.wav"), form_part("data", credentials(user)), bad_part),
    ]:
        body, headers = multipart(*parts)
        response = await client.post("/users/wav", content=body, headers=headers)
        assert response.status_code == 422, response.text
    response = await upload(client, user, make_wav(0.3), "taken.wav")
    assert response.status_code == 409
    message = "this user already has a record from a file named 'taken.wav': delete it first, or send the file under another name"
    assert response.json() == {"error": message}


async def test_upload_duplicate_name_is_409_also_when_audio_comes_first(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    assert (await upload(client, user, make_wav(0.5), "a.wav")).status_code == 201
    body, headers = multipart(form_part("audio_file", make_wav(0.5), "a.wav"), form_part("data", credentials(user)))
    assert (await client.post("/users/wav", content=body, headers=headers)).status_code == 409


@pytest.mark.parametrize(
    "wav, status, message",
    [
        (b"ID3\x03\x00\x00\x00" + bytes(2000), 415, "not a RIFF/WAVE file"),
        (b"RIFF\x24\x00\x00\x00AVI LIST" + bytes(100), 415, "not a RIFF/WAVE file"),
        (patch(make_wav(0.2), 20, struct.pack("<H", 2)), 415, "MS ADPCM (format tag 0x0002)"),
        (b"", 422, "empty"),
        (b"RIFF\x00\x00", 422, "truncated"),
        (make_wav(0.2)[:30], 422, "corrupt"),
        (b"RIFF\x04\x00\x00\x00WAVE" + riff_chunk(b"data", bytes(100)), 422, "fmt"),
        (make_wav(0.0), 422, "no audio frames"),
        (make_wav(0.1, rate=4000), 422, "4000 Hz"),
        (make_wav(0.1, rate=200000), 422, "200000 Hz"),
        (patch(make_wav(0.2), 22, struct.pack("<H", 0)), 422, "zero channels"),
        (make_wav(1.0)[:-1000], 422, "truncated"),
        (make_wav(0.2, before_data=fmt_chunk(1, 2, 8000, 16)), 422, "more than one fmt chunk"),
    ],
    ids=[
        "id3",
        "avi",
        "adpcm",
        "empty",
        "short-riff",
        "short-fmt",
        "no-fmt",
        "no-frames",
        "rate-low",
        "rate-high",
        "zero-channels",
        "truncated-data",
        "two-fmt",
    ],
)
async def test_upload_bad_wav_is_refused_with_its_reason_and_stores_nothing(
    client: httpx.AsyncClient, database_url: str, wav: bytes, status: int, message: str
) -> None:
    user = await new_user(client)
    before = await table_counts(database_url)
    response = await upload(client, user, wav)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert await table_counts(database_url) == before


def malformed_upload(case: str, user: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    good, wav = credentials(user), make_wav(0.3)
    audio = form_part("audio_file", wav, "a.wav")
    cases = {
        "no-data": multipart(audio),
        "no-audio": multipart(form_part("data", good)),
        "data-not-json": multipart(form_part("data", b"{nope"), audio),
        "data-array": multipart(form_part("data", b"[1]"), audio),
        "ids-not-uuids": multipart(form_part("data", b'{"user_id": "1", "access_token": "2"}'), audio),
        "ids-not-strings": multipart(form_part("data", b'{"user_id": 1, "access_token": {}}'), audio),
        "audio-without-filename": multipart(form_part("data", good), form_part("audio_file", wav)),
        "empty-filename": multipart(form_part("data", good), form_part("audio_file", wav, "")),
        "bad-bitrate": multipart(form_part("bitrate", b"100"), form_part("data", good), audio),
        "not-multipart": (good, {"Content-Type": "application/json"}),
        "no-closing-boundary": (multipart(form_part("data", good), audio)[0][:-10], multipart()[1]),
        "two-audio-parts": multipart(form_part("data", good), audio, form_part("audio_file", wav, "b.wav")),
        "filename-control-char": multipart(form_part("data", good), form_part("audio_file", wav, "a\x00b.wav")),
        "filename-too-long": multipart(form_part("data", good), form_part("audio_file", wav, "é" * 128 + ".wav")),
    }
    return cases[case]


@pytest.mark.parametrize(
    "case",
    ["no-data", "no-audio", "data-not-json", "data-array", "ids-not-uuids", "ids-not-strings", "audio-without-filename",
     "empty-filename", "bad-bitrate", "not-multipart", "no-closing-boundary", "two-audio-parts",
     "filename-control-char", "filename-too-long"],
)  # fmt: skip
async def test_upload_malformed_request_is_422_and_stores_nothing(client: httpx.AsyncClient, database_url: str, case: str) -> None:
    body, headers = malformed_upload(case, await new_user(client))
    before = await table_counts(database_url)
    response = await client.post("/users/wav", content=body, headers=headers)
    assert response.status_code == 422, response.text
    assert isinstance(response.json()["error"], str)
    assert await table_counts(database_url) == before


async def test_upload_over_the_size_limit_is_413_with_and_without_content_length(database_url: str) -> None:
    async with running_app(database_url, max_upload_mb=1) as client:
        user = await new_user(client)
        before = await table_counts(database_url)
        response = await upload(client, user, make_wav(20.0))
        assert response.status_code == 413
        assert "1 MiB limit" in response.json()["error"]
        body, headers = multipart(form_part("data", b"{}"), form_part("audio_file", make_wav(20.0), "a.wav"))

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        response = await client.post("/users/wav", content=chunked(), headers=headers)
        assert response.status_code == 413
        assert await table_counts(database_url) == before


async def test_upload_wav_that_breaks_half_way_stores_nothing(client: httpx.AsyncClient, database_url: str) -> None:
    user = await new_user(client)
    wav = make_wav(6.0, 44100, 2)
    before = await table_counts(database_url)
    response = await upload(client, user, wav[: len(wav) // 2], "half.wav")  # the data chunk declares twice what arrives
    assert response.status_code == 422
    assert "truncated" in response.json()["error"]
    assert await table_counts(database_url) == before
    assert (await upload(client, user, wav, "half.wav")).status_code == 201  # the name stayed free


# Download #######################################################################


@pytest.fixture
async def long_record(client: httpx.AsyncClient) -> tuple[dict[str, Any], bytes]:
    """A record of several 256 KiB chunks, and its bytes."""
    body, mp3 = await uploaded(client, make_wav(40.0, 44100, 2), "Łódź café «notes».wav")
    assert len(mp3) > 2 * wav2mp3.CHUNK_BYTES
    return body, mp3


async def test_download_headers(client: httpx.AsyncClient, long_record: tuple[dict[str, Any], bytes]) -> None:
    body, mp3 = long_record
    response = await client.get(record_path(body["url"]))
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/mpeg"
    assert response.headers["content-length"] == str(len(mp3))
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["etag"] == f'"{body["sha256"]}"'
    assert response.headers["content-disposition"] == (
        "attachment; filename=\"_odz cafe _notes_.mp3\"; filename*=UTF-8''" + quote("Łódź café «notes».mp3", safe="")
    )


async def test_download_ascii_name_still_gets_filename_star(client: httpx.AsyncClient) -> None:
    body, _ = await uploaded(client, make_wav(0.3), "plain.wav")
    response = await client.get(record_path(body["url"]))
    assert response.headers["content-disposition"] == "attachment; filename=\"plain.mp3\"; filename*=UTF-8''plain.mp3"


@pytest.mark.parametrize("spec", ["0-99", "100-", "-500", "262100-262200", "0-0", "{last}-"])
async def test_download_single_range_is_206_with_exactly_those_bytes(
    client: httpx.AsyncClient, long_record: tuple[dict[str, Any], bytes], spec: str
) -> None:
    body, mp3 = long_record
    size = len(mp3)
    header = "bytes=" + spec.format(last=size - 1)
    first_text, _, last_text = header[6:].partition("-")
    first, last = (size - int(last_text), size - 1) if not first_text else (int(first_text), int(last_text) if last_text else size - 1)
    response = await client.get(record_path(body["url"]), headers={"Range": header})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {first}-{last}/{size}"
    assert response.headers["content-length"] == str(last - first + 1)
    assert response.content == mp3[first : last + 1]


async def test_download_range_past_the_end_is_416_with_content_range(client: httpx.AsyncClient, long_record: tuple[dict[str, Any], bytes]) -> None:
    body, mp3 = long_record
    response = await client.get(record_path(body["url"]), headers={"Range": f"bytes={len(mp3)}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(mp3)}"
    assert "error" in response.json()


async def test_download_multiple_or_malformed_ranges_get_the_whole_body(client: httpx.AsyncClient, long_record: tuple[dict[str, Any], bytes]) -> None:
    body, mp3 = long_record
    for header in ("bytes=0-1,5-6", "bytes=abc", "items=0-5", "bytes=9-3"):
        response = await client.get(record_path(body["url"]), headers={"Range": header})
        assert response.status_code == 200 and response.content == mp3


async def test_download_if_range_with_another_etag_gets_the_whole_body(client: httpx.AsyncClient, long_record: tuple[dict[str, Any], bytes]) -> None:
    body, mp3 = long_record
    response = await client.get(record_path(body["url"]), headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert response.status_code == 200 and response.content == mp3
    response = await client.get(record_path(body["url"]), headers={"Range": "bytes=0-9", "If-Range": f'"{body["sha256"]}"'})
    assert response.status_code == 206 and response.content == mp3[:10]


@pytest.mark.parametrize("header", ["{etag}", "W/{etag}", '"other", {etag}', "*"])
async def test_download_matching_if_none_match_is_304_with_etag(client: httpx.AsyncClient, header: str) -> None:
    body, _ = await uploaded(client, make_wav(0.3))
    etag = f'"{body["sha256"]}"'
    response = await client.get(record_path(body["url"]), headers={"If-None-Match": header.format(etag=etag)})
    assert response.status_code == 304
    assert response.headers["etag"] == etag
    assert response.content == b""


async def test_download_other_if_none_match_is_200(client: httpx.AsyncClient) -> None:
    body, mp3 = await uploaded(client, make_wav(0.3))
    response = await client.get(record_path(body["url"]), headers={"If-None-Match": '"something-else"'})
    assert response.status_code == 200 and response.content == mp3


async def test_download_head_has_the_headers_and_no_body(client: httpx.AsyncClient, long_record: tuple[dict[str, Any], bytes]) -> None:
    body, mp3 = long_record
    response = await client.head(record_path(body["url"]))
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(mp3))
    assert response.headers["etag"] == f'"{body["sha256"]}"'
    assert response.content == b""
    ranged = await client.head(record_path(body["url"]), headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.headers["content-length"] == "10"


async def test_download_of_another_users_record_is_404(client: httpx.AsyncClient) -> None:
    body, _ = await uploaded(client, make_wav(0.3))
    stranger = await new_user(client)
    response = await client.get(f"/record?id={body['record_id']}&user={stranger['user_id']}")
    assert response.status_code == 404
    assert response.json() == {"error": "no such record for this user"}


@pytest.mark.parametrize(
    "query",
    [
        "id=nope&user=nope",
        "id={record}&user=1",
        "id=6f1c2a4e-8b3d-4e5f-9a7b-0c1d2e3f4a5b&user={user}",  # a well-formed id no record has
        "id={{{record}}}&user={user}",  # what uuid.UUID() also takes, not the form the service gives
        "id=urn:uuid:{record}&user={user}",
    ],
)
async def test_download_unknown_or_malformed_ids_are_404(client: httpx.AsyncClient, query: str) -> None:
    body, _ = await uploaded(client, make_wav(0.3))
    response = await client.get("/record?" + query.format(record=body["record_id"], user=body["user_id"]))
    assert response.status_code == 404


@pytest.mark.parametrize("query", ["", "id=x", "user=x"])
async def test_download_missing_parameters_are_422(client: httpx.AsyncClient, query: str) -> None:
    response = await client.get("/record?" + query)
    assert response.status_code == 422
    assert "error" in response.json()


async def test_health_is_200_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


# A real server ###################################################################


def encode_cpu_seconds(wav: bytes) -> float:
    """CPU time of converting `wav` in this process: what the server's work is measured against."""
    started = time.process_time()
    convert(wav).close()
    return time.process_time() - started


def test_live_conversion_runs_while_the_upload_arrives(live: LiveServer) -> None:
    """Before the last byte is sent, the server has already spent the CPU of encoding what it got."""
    user = live.new_user()
    wav = make_wav(30.0, 44100, 2)
    held_back = 4096
    encode_cpu = encode_cpu_seconds(wav)
    observed: dict[str, float] = {}

    def pieces() -> Iterator[bytes]:
        before = live.cpu_seconds()
        for i in range(0, len(wav) - held_back, 65536):
            yield wav[i : min(i + 65536, len(wav) - held_back)]
        # Wait for the server to go idle, then see how much work it has done.
        previous, deadline = -1.0, time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = live.cpu_seconds()
            if now == previous:
                break
            previous = now
        observed["cpu_before_last_byte"] = live.cpu_seconds() - before
        yield wav[len(wav) - held_back :]

    body, headers = streamed_upload(user, pieces())
    response = httpx.post(live.url + "/users/wav", content=body, headers=headers, timeout=120)
    assert response.status_code == 201, response.text
    # Buffering the upload would cost next to nothing; converting it costs about one bare encode.
    assert observed["cpu_before_last_byte"] > 0.5 * encode_cpu, (observed, encode_cpu)


def test_live_wrong_token_sent_first_is_403_without_decoding_the_audio(live: LiveServer) -> None:
    user = {**live.new_user(), "access_token": str(uuid.uuid4())}
    wav = make_wav(60.0, 44100, 2)
    cpu_before = live.cpu_seconds()
    body, headers = streamed_upload(user, iter([wav]))
    response = httpx.post(live.url + "/users/wav", content=body, headers=headers, timeout=120)
    refused_cpu = live.cpu_seconds() - cpu_before
    assert response.status_code == 403
    assert response.json() == {"error": "unknown user_id or wrong access_token"}
    assert refused_cpu < 0.3 * encode_cpu_seconds(wav), refused_cpu


def test_live_wrong_token_sent_after_the_audio_is_still_403(live: LiveServer) -> None:
    user = {**live.new_user(), "access_token": str(uuid.uuid4())}
    body, headers = streamed_upload(user, iter([make_wav(2.0)]), data_first=False)
    assert httpx.post(live.url + "/users/wav", content=body, headers=headers, timeout=60).status_code == 403


def test_live_duplicate_name_sent_first_is_409_after_the_body(live: LiveServer) -> None:
    user = live.new_user()
    body, headers = streamed_upload(user, iter([make_wav(1.0)]), "dup.wav")
    assert httpx.post(live.url + "/users/wav", content=body, headers=headers).status_code == 201
    body, headers = streamed_upload(user, long_wav(120.0), "dup.wav")
    assert httpx.post(live.url + "/users/wav", content=body, headers=headers, timeout=120).status_code == 409


def raw_upload_head(user: dict[str, str], filename: str, wav_head: bytes, length: int, boundary: str = "cut") -> bytes:
    """A request line, headers and the multipart head of an upload, for clients that misbehave on a raw socket."""
    head = f"--{boundary}\r\n".encode() + form_part("data", credentials(user)) + f"\r\n--{boundary}\r\n".encode()
    head += form_part("audio_file", b"", filename) + wav_head
    request = f"POST /users/wav HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
    return (request + f"Content-Length: {len(head) + length}\r\n\r\n").encode() + head


def test_live_client_that_disconnects_mid_upload_leaves_nothing(live: LiveServer) -> None:
    user = live.new_user()
    before = asyncio.run(table_counts(live.database_url))
    wav_bytes = 100 * 1024 * 1024  # its MP3 outgrows the in-memory spool and goes to TMPDIR
    block = (sine(1.0, 44100, 2) * 32767).astype("<i2").tobytes()
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(raw_upload_head(user, "cut.wav", wav_header(44100, 2, wav_bytes), wav_bytes + 100))
        sent = 0
        while sent < wav_bytes * 0.8:
            sock.sendall(block)
            sent += len(block)
        deadline = time.monotonic() + 20
        while not live.temp_files() and time.monotonic() < deadline:
            time.sleep(0.05)
        spooled = live.temp_files()
    live.wait_for_log("client disconnected mid-upload")
    time.sleep(0.5)
    assert spooled, "the MP3 should have been spooled to disk before the disconnect"
    assert live.temp_files() == []
    assert list(live.tmp.iterdir()) == []
    assert asyncio.run(table_counts(live.database_url)) == before


@pytest.mark.xdist_group("machine")
@pytest.mark.slow
def test_live_large_upload_keeps_server_memory_flat(live: LiveServer) -> None:
    """About 100 MB of WAV: the server's peak RSS grows by far less than the file (a server that held it would
    grow by more than the bound)."""
    user = live.new_user()
    rss_before = live.proc_status("VmHWM")  # KiB
    seconds = 10 * 60.0
    body, headers = streamed_upload(user, long_wav(seconds), "long.wav")
    response = httpx.post(live.url + "/users/wav", content=body, headers=headers, timeout=600)
    assert response.status_code == 201, response.text
    assert response.json()["duration_seconds"] == pytest.approx(seconds)
    growth_mib = (live.proc_status("VmHWM") - rss_before) / 1024
    assert growth_mib < 60, growth_mib


def test_live_413_is_seen_by_a_client_still_sending(tmp_path: Path, database_url: str) -> None:
    with LiveServer(tmp_path, database_url, "--max-upload-mb", "1") as server:
        body, headers = streamed_upload(server.new_user(), iter([make_wav(30.0)]))
        response = httpx.post(server.url + "/users/wav", content=b"".join(body), headers=headers, timeout=60)
        assert response.status_code == 413
        assert "1 MiB" in response.json()["error"]


def test_live_client_that_stalls_is_cut_off_and_leaves_nothing(tmp_path: Path, database_url: str) -> None:
    with LiveServer(tmp_path, database_url, "--upload-idle-timeout", "1") as server:
        user = server.new_user()
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(raw_upload_head(user, "stall.wav", make_wav(5.0)[:200000], 10**6))
            answer = b""  # the server speaks first, although the client never finished, then closes
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"stalled" in answer
        assert server.temp_files() == []
        assert asyncio.run(db_rows(server.database_url, "SELECT count(*) FROM records WHERE user_id = $1", user["user_id"]))[0][0] == 0


# Every real-world WAV (formats) #################################################

FORMATS = {
    # id: (encoding, bits, extensible)
    "pcm-u8": ("pcm", 8, False),
    "pcm-16": ("pcm", 16, False),
    "pcm-24": ("pcm", 24, False),
    "pcm-32": ("pcm", 32, False),
    "float-32": ("float", 32, False),
    "float-64": ("float", 64, False),
    "alaw": ("alaw", 8, False),
    "mulaw": ("mulaw", 8, False),
    "extensible-pcm-16": ("pcm", 16, True),
    "extensible-pcm-24": ("pcm", 24, True),
    "extensible-pcm-32": ("pcm", 32, True),
    "extensible-float-32": ("float", 32, True),
    "extensible-float-64": ("float", 64, True),
    "extensible-mulaw": ("mulaw", 8, True),
}
# A sine at half scale has an RMS of -9.03 dBFS; G.711 and 8-bit quantisation stay close to it.
HALF_SCALE_DBFS = 20 * np.log10(0.5 / np.sqrt(2))


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("name", list(FORMATS))
async def test_format_converts_with_duration_channels_rate_and_sine_intact(client: httpx.AsyncClient, name: str, channels: int) -> None:
    encoding, bits, extensible = FORMATS[name]
    rate = 8000 if encoding in ("alaw", "mulaw") else 44100
    wav = make_wav(2.0, rate, channels, encoding, bits, extensible=extensible, mask=(1 << channels) - 1 if extensible else 0)
    body, mp3 = await uploaded(client, wav, f"{name}.wav")
    assert body["duration_seconds"] == pytest.approx(2.0)
    mp3_rate, mp3_channels, samples = decode(mp3)
    assert (mp3_rate, mp3_channels) == (rate, channels)
    assert_duration(len(samples), mp3_rate, 2.0)
    for k in range(channels):  # channel k carries 440 * (k + 1) Hz
        assert dominant_frequency(samples[:, k], mp3_rate) == pytest.approx(440 * (k + 1), abs=4)
        assert rms_dbfs(samples[:, k]) == pytest.approx(HALF_SCALE_DBFS, abs=1.5)


@pytest.mark.parametrize(
    "name, wav",
    [
        # scipy.io.wavfile and libsndfile write float with an 18-byte fmt (cbSize=0) and a fact chunk.
        ("scipy-float32", make_wav(1.0, 44100, 2, "float", 32, fmt_extra=b"\x00\x00", before_data=riff_chunk(b"fact", struct.pack("<L", 44100)))),
        ("soundfile-float64", make_wav(1.0, 48000, 1, "float", 64, fmt_extra=b"\x00\x00",
                                       before_data=riff_chunk(b"fact", struct.pack("<L", 48000)) + riff_chunk(b"PEAK", bytes(24)))),
        # Broadcast WAV from a field recorder: bext (602 bytes) and iXML before the audio.
        ("bwf-24", make_wav(1.0, 48000, 2, "pcm", 24, before_data=riff_chunk(b"bext", bytes(602)) + riff_chunk(b"iXML", b"<BWFXML/>"))),
        # DAW export: LIST/INFO before and after the data, an odd-sized chunk with its pad byte.
        ("daw-list", make_wav(1.0, 44100, 2, before_data=riff_chunk(b"LIST", b"INFOISFT" + struct.pack("<L", 5) + b"Lavf\x00")
                              + riff_chunk(b"junk", b"odd"), after_data=riff_chunk(b"LIST", b"INFOICMT" + struct.pack("<L", 3) + b"hi\x00"))),
        # Telephony: 8 kHz A-law with an 18-byte fmt and a fact chunk.
        ("telephony-alaw", make_wav(1.0, 8000, 1, "alaw", 8, fmt_extra=b"\x00\x00", before_data=riff_chunk(b"fact", struct.pack("<L", 8000)))),
        # Live recorders that write the header before they know the length.
        ("streamed-data-0", make_wav(1.0, 16000, 1, data_size=0, riff_size=0)),
        ("streamed-data-ffffffff", make_wav(1.0, 16000, 1, data_size=0xFFFFFFFF, riff_size=0xFFFFFFFF)),
        ("riff-size-lies", make_wav(1.0, 16000, 1, riff_size=100)),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)  # fmt: skip
async def test_real_world_wav_shapes_convert(client: httpx.AsyncClient, name: str, wav: bytes) -> None:
    body, mp3 = await uploaded(client, wav, f"{name}.wav")
    assert body["duration_seconds"] == pytest.approx(1.0, abs=0.001)
    rate, _, samples = decode(mp3)
    assert_duration(len(samples), rate, 1.0)
    assert dominant_frequency(samples[:, 0], rate) == pytest.approx(440, abs=4)


@pytest.mark.parametrize("magic", [b"RF64", b"BW64"])
async def test_rf64_and_bw64_use_the_ds64_data_size(client: httpx.AsyncClient, magic: bytes) -> None:
    # A LIST chunk after the data: read as audio it would lengthen the file.
    wav = rf64(make_wav(1.5, 48000, 2, after_data=riff_chunk(b"LIST", b"INFO" + bytes(4000))), magic)
    body, mp3 = await uploaded(client, wav, "long-take.wav")
    assert body["duration_seconds"] == pytest.approx(1.5)
    rate, channels, samples = decode(mp3)
    assert (rate, channels) == (48000, 2)
    assert_duration(len(samples), rate, 1.5)


async def test_streamed_wav_with_a_trailing_partial_frame_converts_whole_frames(client: httpx.AsyncClient) -> None:
    wav = make_wav(1.0, 16000, 2, data_size=0xFFFFFFFF, riff_size=0xFFFFFFFF) + b"\x01"
    body, _ = await uploaded(client, wav)
    assert body["duration_seconds"] == pytest.approx(1.0)


def test_frames_past_4_gib_are_read_through_a_new_wave_view(monkeypatch: pytest.MonkeyPatch) -> None:
    # stdlib wave's chunk sizes are 32-bit; a smaller segment stands in for 4 GiB here.
    fmt = wav2mp3.WavFormat(wav2mp3.WAVE_FORMAT_PCM, 2, 8000, 2)
    frames = wav2mp3.WavFrames(fmt)
    frames._segment = 1000 * fmt.frame_size  # private on purpose: the 4 GiB case without 4 GiB of audio
    frames._view = frames._new_view()
    audio = np.arange(2500 * 2, dtype="<i2").tobytes()
    frames.append(audio)
    read = b"".join(frames.read(frames.available) for _ in range(4))
    assert read == audio and frames.frames == 2500


async def test_surround_51_is_downmixed_to_stereo_keeping_left_and_right(client: httpx.AsyncClient) -> None:
    # Channel k plays 440*(k+1) Hz: FL 440, FR 880, FC 1320, LFE 1760, BL 2200, BR 2640.
    wav = make_wav(2.0, 48000, 6, "pcm", 24, extensible=True, mask=0x3F, amplitude=0.3)
    _, mp3 = await uploaded(client, wav, "surround.wav")
    rate, channels, samples = decode(mp3)
    assert channels == 2
    left, right = samples[:, 0].astype(float), samples[:, 1].astype(float)
    assert dominant_frequency(samples[:, 0], rate) == pytest.approx(440, abs=4)
    assert dominant_frequency(samples[:, 1], rate) == pytest.approx(880, abs=4)

    def level(channel: np.ndarray, freq: float) -> float:
        spectrum = np.abs(np.fft.rfft(channel[rate // 2 : rate // 2 + rate]))
        return float(spectrum[int(freq)])  # 1 s window: bin k is k Hz

    assert level(left, 1320) > 0.5 * level(left, 440)  # centre at -3 dB in both sides
    assert level(right, 1320) > 0.5 * level(right, 880)
    assert level(left, 2200) > 0.5 * level(left, 440)  # back left into the left only
    assert level(right, 2200) < 0.05 * level(right, 880)
    assert level(left, 1760) < 0.05 * level(left, 440)  # LFE dropped
    assert level(right, 1760) < 0.05 * level(right, 880)


def test_downmix_clips_instead_of_wrapping() -> None:
    fmt = wav2mp3.WavFormat(wav2mp3.WAVE_FORMAT_PCM, 6, 48000, 2, 0x3F)
    loud = np.array([[30000, -30000, 0, 30000, 30000, -30000]] * 4, dtype="<i2").tobytes()
    stereo = np.frombuffer(wav2mp3.to_pcm16(loud, fmt), dtype="<i2").reshape(-1, 2)
    assert (stereo[:, 0] == 32767).all() and (stereo[:, 1] == -32768).all()


def test_multichannel_without_a_mask_uses_the_standard_order() -> None:
    fmt = wav2mp3.WavFormat(wav2mp3.WAVE_FORMAT_PCM, 4, 48000, 2, 0)  # FL FR FC LFE
    frame = np.array([[1000, 2000, 3000, 4000]], dtype="<i2").tobytes()
    left, right = np.frombuffer(wav2mp3.to_pcm16(frame, fmt), dtype="<i2")
    assert left == int(1000 + 0.7071 * 3000) and right == int(2000 + 0.7071 * 3000)


def test_float_samples_are_clipped_and_nan_is_silence() -> None:
    fmt = wav2mp3.WavFormat(wav2mp3.WAVE_FORMAT_IEEE_FLOAT, 1, 48000, 4)
    floats = np.array([2.0, -3.0, np.nan, 0.5, np.inf], dtype="<f4").tobytes()
    assert list(np.frombuffer(wav2mp3.to_pcm16(floats, fmt), dtype="<i2")) == [32767, -32767, 0, 16383, 32767]


@pytest.mark.filterwarnings("error")
def test_a_signalling_nan_is_silence_without_a_warning() -> None:
    # 0x7FA00000 is a float32 signalling NaN: summing it raises numpy's "invalid value" flag, which must not leak out.
    fmt = wav2mp3.WavFormat(wav2mp3.WAVE_FORMAT_IEEE_FLOAT, 1, 48000, 4)
    floats = np.array([0x3F000000, 0x7FA00000], dtype="<u4").tobytes()  # 0.5, sNaN
    assert list(np.frombuffer(wav2mp3.to_pcm16(floats, fmt), dtype="<i2")) == [16383, 0]


def test_g711_tables_match_the_itu_reference_values() -> None:
    # G.711 tables: mu-law 0x00 -> -32124, 0x80 -> 32124, 0xFF -> 0; A-law 0x55 -> -8, 0xD5 -> 8, 0x2A -> -32256.
    assert (wav2mp3.MULAW_TO_PCM16[0x00], wav2mp3.MULAW_TO_PCM16[0x80], wav2mp3.MULAW_TO_PCM16[0xFF]) == (-32124, 32124, 0)
    assert (wav2mp3.ALAW_TO_PCM16[0x55], wav2mp3.ALAW_TO_PCM16[0xD5], wav2mp3.ALAW_TO_PCM16[0x2A]) == (-8, 8, -32256)


@pytest.mark.parametrize(
    "tag, name",
    [(0x0002, "MS ADPCM (format tag 0x0002)"), (0x0011, "IMA ADPCM (format tag 0x0011)"), (0x0031, "GSM 6.10 (format tag 0x0031)"),
     (0x0055, "MPEG Layer 3 (format tag 0x0055)"), (0x1234, "unknown encoding (format tag 0x1234)")],
)  # fmt: skip
async def test_unsupported_format_tag_is_415_naming_it(client: httpx.AsyncClient, database_url: str, tag: int, name: str) -> None:
    user = await new_user(client)
    before = await table_counts(database_url)
    response = await upload(client, user, patch(make_wav(0.3), 20, struct.pack("<H", tag)))
    assert response.status_code == 415
    assert name in response.json()["error"]
    assert await table_counts(database_url) == before


@pytest.mark.parametrize(
    "wav, message",
    [
        (make_wav(0.3, extensible=True, mask=1).replace(KSDATAFORMAT_SUFFIX, bytes(14), 1), "sub-format"),
        (make_wav(0.3, extensible=True, mask=1).replace(b"\x01\x00" + KSDATAFORMAT_SUFFIX, b"\x02\x00" + KSDATAFORMAT_SUFFIX, 1), "MS ADPCM"),
        (patch(make_wav(0.3, encoding="float", bits=32), 34, struct.pack("<H", 16)), "16-bit IEEE float"),
        (patch(make_wav(0.3, bits=32), 34, struct.pack("<H", 40)), "40-bit PCM"),
    ],
    ids=["extensible-unknown-guid", "extensible-adpcm", "float-16", "pcm-40"],
)
async def test_unsupported_encodings_are_415_naming_them(client: httpx.AsyncClient, database_url: str, wav: bytes, message: str) -> None:
    user = await new_user(client)
    before = await table_counts(database_url)
    response = await upload(client, user, wav)
    assert response.status_code == 415
    assert message in response.json()["error"]
    assert await table_counts(database_url) == before


async def test_block_align_that_contradicts_the_format_is_422(client: httpx.AsyncClient) -> None:
    response = await upload(client, await new_user(client), patch(make_wav(0.3), 32, struct.pack("<H", 3)))
    assert response.status_code == 422
    assert "block align" in response.json()["error"]


# MP3 files as good as LAME's own ################################################

needs_ffmpeg = pytest.mark.skipif(
    not shutil.which("ffmpeg") or not shutil.which("ffprobe"), reason="ffmpeg/ffprobe not installed (.ci/run installs them)"
)
needs_lame = pytest.mark.skipif(not shutil.which("lame"), reason="lame not installed (.ci/run installs it)")


def lame_tag(mp3: bytes) -> dict[str, Any]:
    """The fields of a file's Info/Xing frame and LAME extension, read by VbrTag.c's layout."""
    frame = mp3_frames(mp3)[0]
    mpeg1, mono = frame[1] >> 3 & 1, frame[3] >> 6 == 3
    side = (21 if mono else 36) if mpeg1 else (13 if mono else 21)
    x, e = frame[side:], frame[side + 120 :]
    number = functools.partial(int.from_bytes, byteorder="big")
    return {
        "tag": x[:4].decode(), "flags": number(x[4:8]), "frames": number(x[8:12]), "bytes": number(x[12:16]), "toc": list(x[16:116]),
        "quality": number(x[116:120]), "version": e[:9].decode(), "method": e[9], "lowpass": e[10] * 100, "replay gain": e[11:19].hex(),
        "flags2": e[19], "abr": e[20], "delay": e[21] << 4 | e[22] >> 4, "padding": (e[22] & 15) << 8 | e[23], "misc": e[24],
        "preset": number(e[26:28]), "music length": number(e[28:32]), "music crc": number(e[32:34]), "tag crc": number(e[34:36]),
        "frame header": frame[:4].hex(), "frame size": len(frame), "crc span": side + 154,
    }  # fmt: skip


def lame_cli(wav: bytes, tmp_path: Path, *options: str) -> bytes:
    (tmp_path / "in.wav").write_bytes(wav)
    subprocess.run(["lame", "--quiet", "--noreplaygain", "-q", "3", *options, str(tmp_path / "in.wav"), str(tmp_path / "out.mp3")], check=True)
    return (tmp_path / "out.mp3").read_bytes()


def test_crc16_is_lames_crc():
    # CRC-16/ARC (x^16 + x^15 + x^2 + 1, reflected), LAME's: its check value, a byte loop as VbrTag.c has it, continuation.
    assert wav2mp3.crc16(b"123456789") == 0xBB3D
    data = np.random.default_rng(5).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    table = [functools.reduce(lambda c, _: c >> 1 ^ (0xA001 if c & 1 else 0), range(8), b) for b in range(256)]
    assert wav2mp3.crc16(data) == functools.reduce(lambda crc, b: crc >> 8 ^ table[(crc ^ b) & 0xFF], data, 0)
    assert wav2mp3.crc16(data[5000:], wav2mp3.crc16(data[:5000])) == wav2mp3.crc16(data)


MODES = {"cbr-128": {}, "cbr-160": {"bitrate": "160"}, "vbr-2": {"vbr_quality": "2"}, "vbr-7": {"vbr_quality": "7"}}


@needs_lame
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000])
async def test_lame_tag_matches_lame_field_by_field(client: httpx.AsyncClient, tmp_path: Path, rate: int, channels: int, mode: str) -> None:
    wav = make_wav(signal=music(1.3, rate, channels), rate=rate, channels=channels)
    _, ours = await uploaded(client, wav, **MODES[mode])
    options = ["-b", MODES[mode].get("bitrate", "128")] if "vbr_quality" not in MODES[mode] else ["-V", MODES[mode]["vbr_quality"]]
    if mode == "cbr-160" and channels == 2:
        options += ["-m", "s"]  # lameenc encodes stereo (not joint) above 128 kbps
    theirs = lame_cli(wav, tmp_path, *options)
    tag, reference = lame_tag(ours), lame_tag(theirs)
    # The CRCs differ by design: lameenc's frames carry "LAME4.0" in their filler bytes where lame writes "LAME3.100".
    assert {k: v for k, v in tag.items() if "crc" not in k} == {k: v for k, v in reference.items() if "crc" not in k}
    audio = b"".join(mp3_frames(ours)[1:])
    assert tag["music crc"] == wav2mp3.crc16(audio) and tag["music length"] == len(audio) + tag["frame size"] == tag["bytes"]
    assert tag["tag crc"] == wav2mp3.crc16(mp3_frames(ours)[0][: tag["crc span"]])


@needs_lame
async def test_low_cbr_bitrate_has_no_tag_as_lame_writes_none(client: httpx.AsyncClient, tmp_path: Path) -> None:
    # A 32 kbps MPEG-1 stereo frame is too small for the tag: lame writes none either (VbrTag.c InitVbrTag).
    wav = make_wav(1.0, 44100, 2)
    _, ours = await uploaded(client, wav, bitrate="32")
    assert mp3_frames(ours)[0][36:40] not in (b"Info", b"Xing")
    assert mp3_frames(lame_cli(wav, tmp_path, "-b", "32"))[0][36:40] not in (b"Info", b"Xing")


@needs_ffmpeg
@pytest.mark.parametrize("frames", [1152 * 40, 1152 * 40 + 777])
@pytest.mark.parametrize("mode", ["cbr-128", "vbr-2"])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000])
async def test_gapless_decoder_gives_exactly_the_wav_frames(
    client: httpx.AsyncClient, tmp_path: Path, rate: int, channels: int, mode: str, frames: int
) -> None:
    wav = make_wav(signal=music(frames / rate, rate, channels)[:frames], rate=rate, channels=channels)
    body, mp3 = await uploaded(client, wav, **MODES[mode])
    samples, warnings = ffmpeg_decode(mp3)
    assert len(samples) == frames
    assert body["duration_seconds"] == pytest.approx(frames / rate)
    (tmp_path / "our.mp3").write_bytes(mp3)
    probe = subprocess.run(["ffprobe", "-v", "info", str(tmp_path / "our.mp3")], capture_output=True, check=True).stderr.decode()
    assert "Estimating duration" not in probe and not warnings


async def test_mutagen_reads_length_mode_and_encoder_from_the_tag(client: httpx.AsyncClient) -> None:
    wav = make_wav(signal=music(3.0, 44100, 2), rate=44100, channels=2)
    for fields, mode, settings in (({}, mutagen.mp3.BitrateMode.CBR, "-b 128"), ({"vbr_quality": "2"}, mutagen.mp3.BitrateMode.VBR, "-V 2")):
        _, mp3 = await uploaded(client, wav, **fields)
        info = mutagen.mp3.MP3(io.BytesIO(mp3)).info
        assert info.length == pytest.approx(3.0, abs=0.001)
        assert info.bitrate_mode == mode
        assert info.encoder_info.startswith("LAME 3.100")
        assert info.encoder_settings == settings
        assert (info.sample_rate, info.channels) == (44100, 2)


@needs_ffmpeg
async def test_vbr_uses_several_bitrates_and_seeks_through_its_toc(client: httpx.AsyncClient) -> None:
    # 3 s: the TOC holds byte positions in 256ths of the file, so for longer files any encoder's seek is that coarse.
    rate, seconds = 44100, 3.0
    rng = np.random.default_rng(3)  # a chirp and noise under a random envelope: no two places alike
    t = np.arange(int(seconds * rate)) / rate
    envelope = np.repeat(rng.uniform(0.05, 1, len(t) // 2000 + 1), 2000)[: len(t)]
    signal = 0.5 * np.sin(2 * np.pi * (200 * t + 100 * t * t)) + 0.3 * rng.standard_normal(len(t)) * envelope
    wav = make_wav(signal=np.clip(np.stack([signal, signal], axis=1), -1, 1) * 0.9, rate=rate, channels=2)
    _, mp3 = await uploaded(client, wav, vbr_quality="2")
    bitrates = {wav2mp3.BITRATES[1][frame[2] >> 4] for frame in mp3_frames(mp3)[1:]}
    assert len(bitrates) >= 3, bitrates
    whole = ffmpeg_decode(mp3)[0][:, 0].astype(np.float64)
    after_seek = ffmpeg_decode(mp3, "-usetoc", "1", "-ss", str(seconds / 2))[0][:, 0].astype(np.float64)
    skip, width = 2304, 8192  # the first frames after a seek lack their bit reservoir: match what follows them
    piece = after_seek[skip : skip + width]
    correlation = np.correlate(whole, piece, "valid") / (np.sqrt(np.convolve(whole**2, np.ones(width), "valid")) + 1e-9)
    landed = int(np.argmax(correlation)) - skip
    # ffmpeg reads the TOC from the end of the tag frame, LAME writes it from its start: up to a frame late.
    assert abs(landed - len(whole) // 2) <= 1152 + 64, landed - len(whole) // 2


@pytest.mark.parametrize(
    "fields, message",
    [({"bitrate": "128", "vbr_quality": "2"}, "exclude each other"), ({"vbr_quality": "10"}, "vbr_quality"), ({"vbr_quality": "-1"}, "vbr_quality"),
     ({"vbr_quality": "2.5"}, "vbr_quality"), ({"channels": "3"}, "channels"), ({"channels": "0"}, "channels"), ({"channels": "mono"}, "channels")],
)  # fmt: skip
async def test_bad_mp3_options_are_422_with_a_clear_message(
    client: httpx.AsyncClient, database_url: str, fields: dict[str, str], message: str
) -> None:
    user = await new_user(client)
    before = await table_counts(database_url)
    response = await upload(client, user, make_wav(0.5), **fields)
    assert response.status_code == 422 and message in response.json()["error"]
    assert await table_counts(database_url) == before


async def test_vbr_setting_is_the_default_and_the_form_overrides_it(database_url: str) -> None:
    async with running_app(database_url, mp3_vbr_quality=4) as client:
        _, vbr = await uploaded(client, make_wav(signal=music(2.0, 44100, 2), rate=44100, channels=2))
        _, cbr = await uploaded(client, make_wav(signal=music(2.0, 44100, 2), rate=44100, channels=2), bitrate="96")
    assert lame_tag(vbr)["tag"] == "Xing" and lame_tag(vbr)["quality"] == 100 - 10 * 4  # LAME runs VBR -V4 at -q 0
    assert lame_tag(cbr)["tag"] == "Info" and lame_tag(cbr)["abr"] == 96


@pytest.mark.parametrize("channels, mask", [(2, 0), (6, 0x3F)])
async def test_channels_1_gives_a_mono_mp3_downmixed(client: httpx.AsyncClient, channels: int, mask: int) -> None:
    wav = make_wav(2.0, 48000, channels, "pcm", 24, extensible=mask > 0, mask=mask, amplitude=0.3)
    _, mp3 = await uploaded(client, wav, channels="1")
    rate, mp3_channels, samples = decode(mp3)
    assert mp3_channels == 1 and lame_tag(mp3)["misc"] >> 2 & 7 == 0  # LAME's stereo mode field: mono
    spectrum = np.abs(np.fft.rfft(samples[rate // 2 : rate // 2 + rate, 0].astype(float)))
    assert spectrum[440] > 0.3 * spectrum.max() and spectrum[880] > 0.3 * spectrum.max()  # left and right both in


async def test_channels_2_makes_a_mono_wav_stereo(client: httpx.AsyncClient) -> None:
    _, mp3 = await uploaded(client, make_wav(1.0, 44100, 1), channels="2")
    _, channels, samples = decode(mp3)
    assert channels == 2 and np.abs(samples[:, 0].astype(int) - samples[:, 1]).max() <= 2


async def test_options_sent_after_the_audio_are_honoured(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    parts = form_part("audio_file", make_wav(signal=music(2.0, 44100, 2), rate=44100, channels=2), "a.wav"), form_part("vbr_quality", b"3")
    body, headers = multipart(*parts, form_part("channels", b"1"), form_part("data", credentials(user)))
    response = await client.post("/users/wav", content=body, headers=headers)
    assert response.status_code == 201, response.text
    mp3 = (await client.get(record_path(response.json()["url"]))).content
    assert lame_tag(mp3)["tag"] == "Xing" and decode(mp3)[1] == 1


INFO_TEXTS = {"INAM": "Протокол совещания", "IART": "Отдел продаж", "IPRD": "Звонки 2026", "ICMT": "Запись с Zoom H5",
              "ICRD": "2026-11-27", "IGNR": "Речь", "ITRK": "7", "ICOP": "© ООО Ромашка"}  # fmt: skip
FFPROBE_TAGS = {
    "INAM": "title",
    "IART": "artist",
    "IPRD": "album",
    "ICMT": "comment",
    "ICRD": "date",
    "IGNR": "genre",
    "ITRK": "track",
    "ICOP": "copyright",
}


def ffprobe_tags(mp3: bytes) -> dict[str, str]:
    done = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format_tags", "-of", "json", "-"], input=mp3, capture_output=True, check=True)
    return json.loads(done.stdout)["format"]["tags"]  # type: ignore[no-any-return]


@needs_ffmpeg
@pytest.mark.parametrize("where", ["before-data", "after-data"])
async def test_info_texts_become_id3v24_tags(client: httpx.AsyncClient, where: str) -> None:
    info = info_list(**INFO_TEXTS)
    wav = make_wav(1.0, 44100, 2, **({"before_data": info} if where == "before-data" else {"after_data": info}))
    body, mp3 = await uploaded(client, wav)
    assert mp3[:5] == b"ID3\x04\x00"
    tags = ffprobe_tags(mp3)
    assert {key: tags[name] for key, name in FFPROBE_TAGS.items()} == INFO_TEXTS
    assert lame_tag(mp3)["tag"] == "Info"  # the LAME tag frame follows the ID3 tag
    assert body["duration_seconds"] == pytest.approx(1.0) and len(ffmpeg_decode(mp3)[0]) == 44100


async def test_info_text_that_is_not_utf8_is_read_as_windows_1252(client: httpx.AsyncClient) -> None:
    wav = make_wav(1.0, 44100, 1, before_data=info_list(INAM="Caf\xe9 \x93live\x94".encode("latin-1"), IENG="Zoë", ICRD="spring 2024"))
    _, mp3 = await uploaded(client, wav)
    tag = mutagen.id3.ID3(io.BytesIO(mp3))
    assert tag.version == (2, 4, 0)
    assert str(tag["TIT2"]) == "Café “live”"
    assert tag["TIPL"].people == [["engineer", "Zoë"]]
    assert str(tag["TXXX:DATE"]) == "spring 2024"  # not a date ID3 can hold, kept as written


async def test_no_info_no_id3_tag(client: httpx.AsyncClient) -> None:
    _, mp3 = await uploaded(client, make_wav(0.5))
    assert mp3[:3] != b"ID3" and lame_tag(mp3)["tag"] == "Info"


async def test_size_sha256_etag_and_range_cover_the_tags(client: httpx.AsyncClient) -> None:
    body, mp3 = await uploaded(client, make_wav(1.0, 44100, 2, before_data=info_list(INAM="x")))
    assert body["size_bytes"] == len(mp3) and body["sha256"] == hashlib.sha256(mp3).hexdigest()
    head = await client.get(record_path(body["url"]), headers={"Range": "bytes=0-2"})
    assert head.status_code == 206 and head.content == b"ID3" and head.headers["etag"] == f'"{body["sha256"]}"'


# Tags from the WAV (issue 26): its own ID3 tag, bext, cue points as chapters, the ID3 version ###########


def jpeg_ish(size: int, seed: int = 0) -> bytes:
    """Cover art as far as a tag is concerned: JPEG's SOI and APP0 markers, then noise."""
    return b"\xff\xd8\xff\xe0" + np.random.default_rng(seed).bytes(size - 4)


def id3_chunk(*frames: mutagen.id3.Frame, version: int = 4, chunk_id: bytes = b"id3 ") -> bytes:
    """An `id3 ` chunk as a tagger leaves one in a WAV: a tag mutagen writes, of ID3v2.4 or v2.3."""
    tag = mutagen.id3.ID3()
    for frame in frames:
        tag.add(frame)
    if version == 3:
        tag.update_to_v23()
    out = io.BytesIO()
    tag.save(out, v2_version=version, padding=lambda _: 0)
    return riff_chunk(chunk_id, out.getvalue())


def frame_bytes(frame: mutagen.id3.Frame) -> bytes:
    """One frame as mutagen writes it into an ID3v2.4 tag."""
    tag = mutagen.id3.ID3()
    tag.add(frame)
    out = io.BytesIO()
    tag.save(out, v2_version=4, padding=lambda _: 0)
    return out.getvalue()[10:]


def album_frames(picture: bytes) -> list[mutagen.id3.Frame]:
    """What iTunes or Mp3tag put in a tag: texts, numbers, a comment, lyrics, a user text and the cover."""
    return [
        mutagen.id3.TIT2(encoding=3, text=["Лекция 3: энтропия"]),
        mutagen.id3.TPE1(encoding=3, text=["Кафедра физики"]),
        mutagen.id3.TALB(encoding=3, text=["Термодинамика"]),
        mutagen.id3.TRCK(encoding=3, text=["3/12"]),
        mutagen.id3.TPOS(encoding=3, text=["1/2"]),
        mutagen.id3.TCON(encoding=3, text=["Speech"]),
        mutagen.id3.COMM(encoding=3, lang="rus", desc="", text=["записано в аудитории 5"]),
        mutagen.id3.USLT(encoding=3, lang="rus", desc="", text="ла-ла-ла"),
        mutagen.id3.TXXX(encoding=3, desc="SPEAKER", text=["проф. Иванов"]),
        mutagen.id3.APIC(encoding=3, mime="image/jpeg", type=mutagen.id3.PictureType.COVER_FRONT, desc="cover", data=picture),
    ]


def bext_chunk(description: bytes = b"", originator: bytes = b"", date: bytes = b"", time: bytes = b"", size: int = 602) -> bytes:
    """A Broadcast WAV bext chunk (EBU Tech 3285): its fixed fields, the rest zeros, cut at `size`."""
    fields = description.ljust(256, b"\x00") + originator.ljust(32, b"\x00") + b"ZOOM0001".ljust(32, b"\x00") + date.ljust(10) + time.ljust(8)
    return riff_chunk(b"bext", (fields + bytes(602))[:size])


def cue_chunk(points: dict[int, int], count: int | None = None) -> bytes:
    """A `cue ` chunk: cue point id -> sample offset (in the data chunk, as Audacity, Reaper and recorders write it)."""
    entries = b"".join(struct.pack("<LL4sLLL", cue_id, offset, b"data", 0, 0, offset) for cue_id, offset in points.items())
    return riff_chunk(b"cue ", struct.pack("<L", len(points) if count is None else count) + entries)


def labels_list(labels: dict[int, str | bytes]) -> bytes:
    """A LIST/adtl chunk: a `note` (not read) and a `labl` for each cue point id."""
    entries = b""
    for cue_id, label in labels.items():
        text = (label.encode() if isinstance(label, str) else label) + b"\x00"
        entries += riff_chunk(b"note", struct.pack("<L", cue_id) + b"a note\x00") + riff_chunk(b"labl", struct.pack("<L", cue_id) + text)
    return riff_chunk(b"LIST", b"adtl" + entries)


def ffprobe_of(mp3: bytes) -> dict[str, Any]:
    """The tags, chapters and streams ffprobe reads in a file."""
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-show_chapters", "-show_streams", "-show_entries", "format_tags", "-of", "json", "-"],
        input=mp3,
        capture_output=True,
        check=True,
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def ffmpeg_picture(mp3: bytes) -> bytes:
    """The attached picture's bytes, as ffmpeg copies them out."""
    return subprocess.run(["ffmpeg", "-v", "quiet", "-i", "-", "-an", "-c", "copy", "-f", "image2pipe", "-"], input=mp3, capture_output=True).stdout


def chapters_of(mp3: bytes) -> list[tuple[int, int, str]]:
    """(start ms, end ms, title) of each chapter, in the order ffprobe lists them (the file's)."""
    return [(int(c["start"]), int(c["end"]), c["tags"]["title"]) for c in ffprobe_of(mp3)["chapters"] if c["time_base"] == "1/1000"]


async def converted_via(client: httpx.AsyncClient, via: str, wav: bytes, **options: str) -> tuple[dict[str, Any], bytes]:
    """The record and MP3 of a WAV sent by POST, or by tus in 4 PATCHes (then checked byte for byte against a POST)."""
    if via == "post":
        return await uploaded(client, wav, **options)
    user = await new_user(client)
    record = await tus_upload(client, user, wav, 4, "tus.wav", **options)
    mp3 = (await client.get(record_path(record["url"]))).content
    posted = (await upload(client, user, wav, "posted.wav", **options)).json()
    assert hashlib.sha256(mp3).hexdigest() == record["sha256"] == posted["sha256"]
    return record, mp3


WAV_ID3_CASES = {
    "id3-v2.4-before-data": (b"id3 ", 4, "before"),
    "ID3-v2.3-after-data": (b"ID3 ", 3, "after"),
    "id3-v2.3-before-data": (b"id3 ", 3, "before"),
    "ID3-v2.4-after-data": (b"ID3 ", 4, "after"),
}


@needs_ffmpeg
@pytest.mark.parametrize("via", ["post", "tus"])
@pytest.mark.parametrize("case", list(WAV_ID3_CASES))
async def test_the_wavs_own_id3_tag_becomes_the_mp3s(client: httpx.AsyncClient, case: str, via: str) -> None:
    chunk_id, version, where = WAV_ID3_CASES[case]
    picture = jpeg_ish(300_000)
    chunk = id3_chunk(*album_frames(picture), version=version, chunk_id=chunk_id)
    wav = make_wav(2.0, 44100, 2, **{f"{where}_data": chunk})
    record, mp3 = await converted_via(client, via, wav)
    tag = mutagen.id3.ID3(io.BytesIO(mp3))
    assert tag.version == (2, 4, 0)
    texts = {key: tag[key].text for key in ("TIT2", "TPE1", "TALB", "TRCK", "TPOS", "TCON", "COMM::rus", "TXXX:SPEAKER")}
    assert texts == {
        "TIT2": ["Лекция 3: энтропия"],
        "TPE1": ["Кафедра физики"],
        "TALB": ["Термодинамика"],
        "TRCK": ["3/12"],
        "TPOS": ["1/2"],
        "TCON": ["Speech"],
        "COMM::rus": ["записано в аудитории 5"],
        "TXXX:SPEAKER": ["проф. Иванов"],
    }
    assert tag["USLT::rus"].text == "ла-ла-ла"
    cover = tag["APIC:cover"]
    assert (cover.mime, cover.type, cover.data) == ("image/jpeg", mutagen.id3.PictureType.COVER_FRONT, picture)
    probed = ffprobe_of(mp3)
    assert {key: probed["format"]["tags"][key] for key in ("title", "artist", "album", "track", "disc", "genre", "comment", "lyrics-rus")} == {
        "title": "Лекция 3: энтропия",
        "artist": "Кафедра физики",
        "album": "Термодинамика",
        "track": "3/12",
        "disc": "1/2",
        "genre": "Speech",
        "comment": "записано в аудитории 5",
        "lyrics-rus": "ла-ла-ла",
    }
    assert [stream["disposition"]["attached_pic"] for stream in probed["streams"]] == [0, 1]
    assert ffmpeg_picture(mp3) == picture
    assert lame_tag(mp3)["tag"] == "Info" and record["title"] == "Лекция 3: энтропия"
    assert len(ffmpeg_decode(mp3)[0]) == 2 * 44100  # the audio is all there, the tag before it


async def test_id3_frames_win_over_info_texts_which_win_over_bext(client: httpx.AsyncClient) -> None:
    """One frame each: the ID3 chunk's where it has one (a comment in another language is the same comment), else
    INFO's, else bext's; the rest of each kept beside."""
    info = info_list(INAM="INFO title", IART="INFO artist", ICMT="INFO comment", ICRD="2023-02-01")
    bext = bext_chunk(b"bext description", b"Sound Devices MixPre-6", b"2024-05-01", b"13:45:10")
    own = id3_chunk(mutagen.id3.TIT2(encoding=3, text=["ID3 title"]), mutagen.id3.COMM(encoding=3, lang="eng", desc="", text=["ID3 comment"]))
    _, mp3 = await uploaded(client, make_wav(1.0, 44100, 1, before_data=bext + own, after_data=info))
    tag = mutagen.id3.ID3(io.BytesIO(mp3))
    assert str(tag["TIT2"]) == "ID3 title" and str(tag["TPE1"]) == "INFO artist"
    assert [str(comment) for comment in tag.getall("COMM")] == ["ID3 comment"]
    assert str(tag["TDRC"]) == "2023-02-01" and str(tag["TENC"]) == "Sound Devices MixPre-6"


@needs_ffmpeg
@pytest.mark.parametrize(
    "date, time, tdrc",
    [
        (b"2024-05-01", b"13:45:10", "2024-05-01T13:45:10"),
        (b"2024:05:01", b"13.45.10", "2024-05-01T13:45:10"),  # EBU Tech 3285 allows - _ : space . as separators
        (b"2024-05-01", b"        ", "2024-05-01"),
        (b"2024-02-30", b"13:45:10", None),  # no such day
        (b"2024-05-01", b"25:61:00", "2024-05-01"),  # no such time: the date alone
    ],
)
async def test_bext_becomes_the_comment_encoded_by_and_recording_time(client: httpx.AsyncClient, date: bytes, time: bytes, tdrc: str | None) -> None:
    wav = make_wav(1.0, 48000, 2, before_data=bext_chunk(b"Interview, take 7", b"ZOOM H5", date, time))
    _, mp3 = await uploaded(client, wav)
    tag = mutagen.id3.ID3(io.BytesIO(mp3))
    assert tag["COMM::XXX"].text == ["Interview, take 7"] and tag["TENC"].text == ["ZOOM H5"]
    assert (str(tag["TDRC"]).replace(" ", "T") if "TDRC" in tag else None) == tdrc  # (mutagen shows a space where it writes T)
    tags = ffprobe_of(mp3)["format"]["tags"]
    assert (tags["comment"], tags["encoded_by"], tags.get("date")) == ("Interview, take 7", "ZOOM H5", tdrc)


async def test_a_short_bext_chunk_gives_what_it_has(client: httpx.AsyncClient) -> None:
    wav = make_wav(1.0, 48000, 2, before_data=bext_chunk(b"only a description " * 20, size=120))
    _, mp3 = await uploaded(client, wav)
    tag = mutagen.id3.ID3(io.BytesIO(mp3))
    assert str(tag["COMM::XXX"]) == ("only a description " * 20)[:120].strip() and "TENC" not in tag and "TDRC" not in tag


def expected_ms(offset: int, rate: int) -> int:
    return math.floor(offset * 1000 / rate + 0.5)


CHAPTER_ORDERS = {
    "all-before-data": lambda cue, labels: {"before_data": cue + labels},
    "all-after-data": lambda cue, labels: {"after_data": labels + cue},
    "labels-before-cue-after": lambda cue, labels: {"before_data": labels, "after_data": cue},
}


@needs_ffmpeg
@pytest.mark.parametrize("via", ["post", "tus"])
@pytest.mark.parametrize("order", list(CHAPTER_ORDERS))
@pytest.mark.parametrize("rate", [8000, 44100, 48000, 96000])
async def test_cue_points_with_labels_become_chapters_at_their_millisecond(client: httpx.AsyncClient, rate: int, order: str, via: str) -> None:
    """Chapters at the cue point's sample offset / the rate, to the nearest millisecond, in time order whatever the
    order of the points in the chunk; the last ends with the audio; a point without a label is titled by its number."""
    seconds = 4.0
    points = {7: int(2.5 * rate) + 3, 1: 0, 42: 12345 % rate + rate, 9: int(3.9 * rate) + 1}  # ids out of time order too
    labels = {1: "Вступление", 7: "Вопросы из зала", 9: "Итоги"}  # 42 has none
    wav = make_wav(seconds, rate, 1, **CHAPTER_ORDERS[order](cue_chunk(points), labels_list(labels)))
    _, mp3 = await converted_via(client, via, wav)
    starts = sorted(expected_ms(offset, rate) for offset in points.values())
    titles = ["Вступление", "2", "Вопросы из зала", "Итоги"]
    assert chapters_of(mp3) == list(zip(starts, [*starts[1:], int(seconds * 1000)], titles, strict=True))
    toc = mutagen.id3.ID3(io.BytesIO(mp3))["CTOC:toc"]
    assert toc.flags == mutagen.id3.CTOCFlags.TOP_LEVEL | mutagen.id3.CTOCFlags.ORDERED
    assert toc.child_element_ids == ["chp1", "chp2", "chp3", "chp4"]


@needs_ffmpeg
@pytest.mark.parametrize("rate", [44100, 22050])
async def test_a_chapter_starts_where_its_sound_starts_in_the_decoded_mp3(client: httpx.AsyncClient, rate: int) -> None:
    """The chapter's time is the WAV's, and so the MP3's as a gapless decoder plays it (the LAME tag's encoder delay and
    padding dropped): a tone that starts at the cue point starts at the chapter's millisecond, not ~25 ms later."""
    onset = int(1.2345 * rate)
    signal = np.zeros((3 * rate, 1))
    signal[onset:, 0] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(3 * rate - onset) / rate)
    wav = make_wav(signal=signal, rate=rate, channels=1, after_data=cue_chunk({1: onset}) + labels_list({1: "Tone"}))
    _, mp3 = await uploaded(client, wav)
    [(start, _, title)] = chapters_of(mp3)
    decoded = ffmpeg_decode(mp3)[0][:, 0].astype(np.int32)
    heard = int(np.argmax(np.abs(decoded) > 0.25 * 32767))  # pre-echo stays far below a quarter of the tone
    assert (title, start) == ("Tone", expected_ms(onset, rate))
    assert abs(heard * 1000 / rate - start) <= 1.5, (heard * 1000 / rate, start)


def syncsafe(value: int) -> bytes:
    """ID3v2's 28-bit size in four bytes of 7 bits (ID3v2.4 §6.2)."""
    return bytes(value >> shift & 0x7F for shift in (21, 14, 7, 0))


def id3_size(tag: bytes) -> int:
    """The size of the ID3v2 tag a file starts with, its header left out."""
    return functools.reduce(lambda size, byte: size << 7 | byte, tag[6:10], 0)


def id3_frame(frame_id: bytes, body: bytes, flags: bytes = b"\x00\x00") -> bytes:
    """An ID3v2.4 frame as bytes: its id, syncsafe size and flags, then the body (for damage mutagen would not write)."""
    return frame_id + syncsafe(len(body)) + flags + body


def id3v24(*frames: bytes, declared: int | None = None, flags: int = 0) -> bytes:
    body = b"".join(frames)
    return b"ID3\x04\x00" + bytes([flags]) + syncsafe(len(body) if declared is None else declared) + body


def zlib_bomb() -> bytes:
    """A compressed ID3v2.4 frame body (its data length, then zlib) of 64 KB that would inflate to 64 MiB."""
    return struct.pack(">L", 64 << 20) + zlib.compress(bytes(64 << 20), 9)


TITLE_FRAME = id3_frame(b"TIT2", b"\x03kept\x00")
DAMAGED_ID3: dict[str, tuple[Callable[[], bytes], str | None]] = {
    "not-id3": (lambda: riff_chunk(b"id3 ", b"XYZ" + bytes(100)), None),
    "truncated-header": (lambda: riff_chunk(b"id3 ", b"ID3\x04\x00"), None),
    "chunk-shorter-than-a-header": (lambda: riff_chunk(b"id3 ", b"ID3"), None),
    "size-past-the-chunk": (lambda: riff_chunk(b"id3 ", id3v24(TITLE_FRAME, declared=5_000_000)), "kept"),
    "frame-past-the-tag": (lambda: riff_chunk(b"id3 ", id3v24(TITLE_FRAME, b"TPE1\x00\x00\x7f\x7f\x00\x00\x03x")), "kept"),
    "garbage-frames": (lambda: riff_chunk(b"id3 ", id3v24(np.random.default_rng(3).bytes(5000))), None),
    "bad-text-encoding": (lambda: riff_chunk(b"id3 ", id3v24(id3_frame(b"TPE1", b"\x09zz"), TITLE_FRAME)), "kept"),
    # Compressed frames are skipped as they stream, never inflated.
    "compressed-frame": (lambda: riff_chunk(b"id3 ", id3v24(id3_frame(b"TPE1", zlib_bomb(), b"\x00\x09"), TITLE_FRAME)), "kept"),
    "unsynchronised-v2.3": (lambda: riff_chunk(b"id3 ", b"ID3\x03\x00\x80" + syncsafe(len(TITLE_FRAME)) + TITLE_FRAME), None),
    "second-chunk-ignored": (
        lambda: riff_chunk(b"id3 ", id3v24(TITLE_FRAME)) + riff_chunk(b"ID3 ", id3v24(id3_frame(b"TIT2", b"\x03second\x00"))),
        "kept",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED_ID3))
@pytest.mark.parametrize("where", ["before", "after"])
async def test_a_damaged_id3_chunk_is_skipped_and_the_mp3_still_made(client: httpx.AsyncClient, case: str, where: str) -> None:
    make_chunk, title = DAMAGED_ID3[case]
    chunk = make_chunk()
    info = info_list(IART="INFO artist")
    wav = make_wav(1.0, 44100, 2, before_data=info + chunk if where == "before" else info, after_data=chunk if where == "after" else b"")
    body, mp3 = await uploaded(client, wav)
    tag = mutagen.id3.ID3(io.BytesIO(mp3))
    assert (str(tag["TIT2"]) if "TIT2" in tag else None) == title
    assert str(tag["TPE1"]) == "INFO artist"  # the INFO texts stay
    assert body["title"] == title
    assert body["duration_seconds"] == pytest.approx(1.0) and len(decode(mp3)[2]) >= 44100


async def test_pictures_over_1_mib_and_frames_past_4_mib_stream_past(client: httpx.AsyncClient) -> None:
    """A frame (a picture) is kept up to 1 MiB, the tag up to 4 MiB: what is over streams past, what comes after it and
    fits is kept."""
    small = [jpeg_ish(900_000, seed) for seed in range(6)]
    pictures = [mutagen.id3.APIC(encoding=3, mime="image/jpeg", type=3, desc=f"p{n}", data=data) for n, data in enumerate(small)]
    big = mutagen.id3.APIC(encoding=3, mime="image/jpeg", type=4, desc="big", data=jpeg_ish(wav2mp3.MAX_ID3_FRAME + 1))
    # In this order: small frames after what is skipped are kept (mutagen would write the biggest frames last).
    frames = [mutagen.id3.TIT2(encoding=3, text=["title"]), big, *pictures, mutagen.id3.TPE1(encoding=3, text=["after"])]
    chunk = riff_chunk(b"id3 ", id3v24(*map(frame_bytes, frames)))
    _, mp3 = await uploaded(client, make_wav(1.0, 44100, 2, before_data=chunk))
    tag = mutagen.id3.ID3(io.BytesIO(mp3))
    kept = [frame.desc for frame in tag.getall("APIC")]
    assert sorted(kept) == ["p0", "p1", "p2", "p3"]  # 4 x 0.9 MB within 4 MiB; the fifth would pass it; the big one over 1 MiB
    assert all(frame.data == small[int(frame.desc[1])] for frame in tag.getall("APIC"))
    assert str(tag["TIT2"]) == "title" and str(tag["TPE1"]) == "after"
    assert id3_size(mp3) < wav2mp3.MAX_ID3_BYTES + 1024


DAMAGED_MARKERS = {
    # name: (chunks before data, chunks after data, chapters as (start, end, title))
    "count-past-the-chunk": (cue_chunk({1: 8000, 2: 16000}, count=1_000_000_000), b"", [(500, 1000, "1"), (1000, 3000, "2")]),
    "cue-too-short": (riff_chunk(b"cue ", b"\x01\x00"), b"", []),
    "point-past-the-audio": (cue_chunk({1: 8000, 2: 48000}), labels_list({1: "in", 2: "out"}), [(500, 3000, "in")]),
    "label-of-no-point": (cue_chunk({1: 0}), labels_list({5: "nobody's", 1: "first"}), [(0, 3000, "first")]),
    # A title of 125 bytes at most, whole characters: ffmpeg drops a chapter whose title frame is of 128 bytes or more.
    "long-label": (cue_chunk({1: 0}), labels_list({1: "é" * 3000}), [(0, 3000, "é" * 62)]),
    "damaged-label-list": (
        cue_chunk({1: 0, 2: 16000}),
        riff_chunk(b"LIST", b"adtl" + riff_chunk(b"labl", struct.pack("<L", 1) + b"one\x00") + b"labl" + struct.pack("<L", 999_999) + b"two"),
        [(0, 1000, "one"), (1000, 3000, "2")],
    ),
    "two-cue-chunks": (cue_chunk({1: 0}), cue_chunk({1: 8000, 2: 16000}), [(0, 1000, "1"), (1000, 3000, "2")]),  # the first offset of an id wins
    # No chapter is empty: points at one millisecond make one (titled by the first with a label), one at the end none.
    "points-at-one-offset": (
        cue_chunk({1: 8000, 2: 8000, 3: 16000, 4: 16000}),
        labels_list({2: "two", 3: "three", 4: "four"}),
        [(500, 1000, "two"), (1000, 3000, "three")],
    ),
    "points-in-one-millisecond": (cue_chunk({1: 8000, 2: 8007, 3: 47999}), labels_list({1: "one", 2: "two", 3: "end"}), [(500, 3000, "one")]),
}


@needs_ffmpeg
@pytest.mark.parametrize("case", list(DAMAGED_MARKERS))
async def test_damaged_markers_give_what_can_be_read(client: httpx.AsyncClient, case: str) -> None:
    before, after, chapters = DAMAGED_MARKERS[case]
    _, mp3 = await uploaded(client, make_wav(3.0, 16000, 1, before_data=before, after_data=after))
    assert chapters_of(mp3) == chapters


@needs_ffmpeg
async def test_the_first_255_markers_in_time_become_chapters(client: httpx.AsyncClient) -> None:
    """Up to 1000 points are read (the rest stream past), and the first 255 in time become chapters: a CTOC lists
    at most 255 (its count is one byte). Here 1500 points, one each millisecond, listed from the last."""
    points = {n: n * 16 for n in range(1500, 0, -1)}
    _, mp3 = await uploaded(client, make_wav(2.0, 16000, 1, before_data=cue_chunk(points) + labels_list({n: f"m{n}" for n in points})))
    chapters = chapters_of(mp3)
    assert len(chapters) == wav2mp3.MAX_CHAPTERS == 255 and wav2mp3.MAX_MARKERS == 1000
    assert chapters[0] == (501, 502, "m501") and chapters[-1] == (755, 2000, "m755")  # points 1500 down to 501 were read
    assert len(mutagen.id3.ID3(io.BytesIO(mp3))["CTOC:toc"].child_element_ids) == 255


# The ID3 version.


@needs_ffmpeg
@pytest.mark.parametrize("sent", ["before-the-audio", "after-the-audio", "setting", "tus-metadata"])
async def test_id3_version_2_3_is_written_as_mutagen_writes_it(database_url: str, monkeypatch: pytest.MonkeyPatch, sent: str) -> None:
    """v2.3 from the form field (before or after the audio: it changes only the tag, and needs no copy of the audio),
    the setting or tus's metadata: dates as TYER, TDAT and TIME, the engineer in IPLS, UTF-16 texts; pictures and
    chapters as in v2.4."""
    monkeypatch.setattr(wav2mp3, "KEEP_WAV_BYTES", 100_000)  # an encoding option after this much audio would be 422
    picture = jpeg_ish(300_000)
    wav = make_wav(
        3.0,
        44100,
        2,
        before_data=info_list(IENG="Петров")
        + id3_chunk(mutagen.id3.TIT2(encoding=3, text=["Заголовок"]), mutagen.id3.APIC(mime="image/jpeg", data=picture)),
        after_data=bext_chunk(b"", b"", b"2024-05-01", b"13:45:10") + cue_chunk({1: 0, 2: 44100}) + labels_list({1: "один", 2: "два"}),
    )
    async with running_app(database_url, **({"id3_version": "2.3"} if sent == "setting" else {})) as client:
        user = await new_user(client)
        if sent == "tus-metadata":
            url = await tus_create(client, user, len(wav), "v23.wav", id3_version="2.3")
            listed = (await client.get(f"/users/{user['user_id']}/uploads", headers=bearer(user))).json()["uploads"]
            assert listed[0]["options"] == {"id3_version": "2.3"}  # as it was sent
            assert (await tus_patch(client, user, url, 0, wav)).status_code == 204
            record = (await client.get(url, headers=bearer(user))).json()
        else:
            parts = [form_part("data", credentials(user)), form_part("audio_file", wav, "v23.wav")]
            if sent != "setting":
                parts.insert(0 if sent == "before-the-audio" else 2, form_part("id3_version", b"2.3"))
            body, headers = multipart(*parts)
            response = await client.post("/users/wav", content=body, headers=headers)
            assert response.status_code == 201, response.text
            record = response.json()
        mp3 = (await client.get(record_path(record["url"]))).content
    assert mp3[:5] == b"ID3\x03\x00"
    raw = mutagen.id3.ID3(io.BytesIO(mp3), translate=False)
    assert raw.version == (2, 3, 0)
    assert {key: raw[key].text for key in ("TYER", "TDAT", "TIME")} == {"TYER": ["2024"], "TDAT": ["0105"], "TIME": ["1345"]}
    assert "TDRC" not in raw and raw["IPLS"].people == [["engineer", "Петров"]]
    assert raw["TIT2"].encoding == mutagen.id3.Encoding.UTF16 and str(raw["TIT2"]) == "Заголовок"
    assert raw.getall("APIC")[0].data == picture and ffmpeg_picture(mp3) == picture
    assert chapters_of(mp3) == [(0, 1000, "один"), (1000, 3000, "два")]
    assert ffprobe_of(mp3)["format"]["tags"]["date"] == "2024-05-01 13:45"
    assert record["title"] == "Заголовок"


async def test_id3_version_2_4_in_the_form_wins_over_the_setting(database_url: str) -> None:
    async with running_app(database_url, id3_version="2.3") as client:
        user = await new_user(client)
        response = await upload(client, user, make_wav(1.0, before_data=info_list(INAM="x")), id3_version="2.4")
        assert response.status_code == 201, response.text
        assert (await client.get(record_path(response.json()["url"]))).content[:4] == b"ID3\x04"


@pytest.mark.parametrize("value", ["3", "4", "v2.3", "2.4 ", "2.5", "", "２.３"])
async def test_a_bad_id3_version_is_422_naming_the_values(client: httpx.AsyncClient, value: str) -> None:
    user = await new_user(client)
    response = await upload(client, user, make_wav(0.5), id3_version=value)
    assert response.status_code == 422 and response.json()["error"] == "id3_version must be one of 2.3, 2.4"
    metadata = tus_metadata(filename="a.wav", id3_version=value)
    created = await client.post(f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Length="1000", Upload_Metadata=metadata))
    assert created.status_code == 422 and created.json()["error"] == "id3_version must be one of 2.3, 2.4"


def test_the_id3_version_setting_is_2_3_or_2_4() -> None:
    assert wav2mp3.Settings().id3_version == "2.4"
    with pytest.raises(ValueError, match="ID3_VERSION must be one of 2.3, 2.4"):
        wav2mp3.Settings(id3_version="3")


# The title beside the file name.


async def test_records_show_their_title_beside_the_file_name(client: httpx.AsyncClient, database_url: str) -> None:
    user = await new_user(client)
    wavs = {
        "id3.wav": make_wav(0.5, before_data=id3_chunk(mutagen.id3.TIT2(encoding=3, text=["Из ID3"]))),
        "info.wav": make_wav(0.5, after_data=info_list(INAM="Из INFO")),
        "none.wav": make_wav(0.5),
        "long.wav": make_wav(0.5, before_data=id3_chunk(mutagen.id3.TIT2(encoding=3, text=["ж" * 5000]))),
    }
    posted = {name: (await upload(client, user, wav, name)).json() for name, wav in wavs.items()}
    titles = {"id3.mp3": "Из ID3", "info.mp3": "Из INFO", "none.mp3": None, "long.mp3": "ж" * wav2mp3.MAX_TITLE_CHARS}
    assert {body["filename"]: body["title"] for body in posted.values()} == titles
    listed = (await client.get(f"/users/{user['user_id']}/records", headers=bearer(user))).json()["records"]
    assert {record["filename"]: record["title"] for record in listed} == titles
    record = await tus_upload(client, user, wavs["id3.wav"], 2, "tus.wav")
    assert record["title"] == "Из ID3"
    titled = "SELECT count(*) FROM record_titles JOIN records ON records.id = record_titles.record_id WHERE records.user_id = $1"
    assert (await db_rows(database_url, titled, user["user_id"]))[0][0] == 4  # a row for each title, none for no title
    gone = posted["id3.wav"]["record_id"]
    assert (await client.delete(record_path(posted["id3.wav"]["url"]), headers=bearer(user))).status_code == 204
    assert (await db_rows(database_url, "SELECT count(*) FROM record_titles WHERE record_id = $1", gone))[0][0] == 0  # it went with its record
    assert (await db_rows(database_url, titled, user["user_id"]))[0][0] == 3


@pytest.mark.parametrize("source", ["info", "id3"])
async def test_titles_keep_no_control_characters_nor_bidi_overrides(client: httpx.AsyncClient, source: str) -> None:
    """A title is shown in lists, terminals and the page: control characters go (line breaks and tabs become a space),
    and so do bidi overrides and isolates, which make it (and what follows it) read in another order; in the record,
    its MP3's TIT2 and its chapters alike. A title of nothing else is no title."""
    sent = "\u202eevil\u202c\x07 Call\r\nof\tthe \u2066day\u2069\x85\x1b[31m"
    title = id3_chunk(mutagen.id3.TIT2(encoding=3, text=[sent])) if source == "id3" else info_list(INAM=sent)
    wav = make_wav(1.0, 16000, 1, before_data=title + cue_chunk({1: 0}) + labels_list({1: "\u202bchapter\u202c\x00\x01"}))
    body, mp3 = await uploaded(client, wav)
    assert body["title"] == "evil Call of the day [31m"
    tag = mutagen.id3.ID3(io.BytesIO(mp3))
    assert tag["TIT2"].text == ["evil Call of the day [31m"]
    assert str(tag.getall("CHAP")[0].sub_frames["TIT2"]) == "chapter"
    blank, blank_mp3 = await uploaded(client, make_wav(0.5, before_data=info_list(INAM="\u202e\x07\u2069")))
    assert blank["title"] is None and blank_mp3[:3] != b"ID3"  # nothing else to say: no tag at all


async def test_titles_survive_a_restart_that_applies_the_schema_again(database_url: str) -> None:
    async with running_app(database_url) as client:
        user = await new_user(client)
        assert (await upload(client, user, make_wav(0.5, after_data=info_list(INAM="kept")))).status_code == 201
    async with running_app(database_url) as client:
        listed = (await client.get(f"/users/{user['user_id']}/records", headers=bearer(user))).json()["records"]
    assert [record["title"] for record in listed] == ["kept"]


async def test_64_bit_integer_pcm_as_scipy_writes_it_converts(client: httpx.AsyncClient) -> None:
    # scipy.io.wavfile.write of a default numpy int array (int64 on Linux): PCM, 64 bits per sample.
    wav = make_wav(1.0, 22050, 2, "pcm", 64)
    body, mp3 = await uploaded(client, wav, "scipy-int64.wav")
    rate, channels, samples = decode(mp3)
    assert (rate, channels, body["duration_seconds"]) == (22050, 2, pytest.approx(1.0))
    assert dominant_frequency(samples[:, 1], rate) == pytest.approx(880, abs=4)
    assert rms_dbfs(samples[:, 0]) == pytest.approx(HALF_SCALE_DBFS, abs=1.5)


@pytest.mark.parametrize("bits", [16, 24, 32])
async def test_big_endian_rifx_converts(client: httpx.AsyncClient, bits: int) -> None:
    body, mp3 = await uploaded(client, rifx(1.0, 16000, 2, bits), "amiga.wav")
    rate, channels, samples = decode(mp3)
    assert (rate, channels, body["duration_seconds"]) == (16000, 2, pytest.approx(1.0))
    assert dominant_frequency(samples[:, 0], rate) == pytest.approx(440, abs=4)
    assert rms_dbfs(samples[:, 0]) == pytest.approx(HALF_SCALE_DBFS, abs=1.5)


# The owner's routes ##############################################################


def bearer(user: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {user['access_token']}"}


OWNER_ROUTES = [("GET", "/users/{user}/records"), ("POST", "/users/{user}/token"), ("DELETE", "/record?id={record}&user={user}")]


@pytest.mark.parametrize("method, path", OWNER_ROUTES)
@pytest.mark.parametrize("authorization", [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Token abc"])
async def test_owner_routes_without_a_bearer_token_are_401(client: httpx.AsyncClient, method: str, path: str, authorization: str | None) -> None:
    body, _ = await uploaded(client, make_wav(0.3))
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.request(method, path.format(user=body["user_id"], record=body["record_id"]), headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert list(response.json()) == ["error"]


@pytest.mark.parametrize("method, path", OWNER_ROUTES)
async def test_owner_routes_with_a_wrong_token_or_user_are_403_with_one_message(client: httpx.AsyncClient, method: str, path: str) -> None:
    owner = await new_user(client)
    body = (await upload(client, owner, make_wav(0.3))).json()
    stranger = await new_user(client)
    cases = [
        (body["user_id"], f"Bearer {uuid.uuid4()}"),  # wrong token
        (body["user_id"], "Bearer not-a-uuid"),  # malformed token
        (str(uuid.uuid4()), f"Bearer {uuid.uuid4()}"),  # unknown user
        ("not-a-user", f"Bearer {uuid.uuid4()}"),  # malformed user id
        (body["user_id"], f"Bearer {stranger['access_token']}"),  # another user's token
    ]
    for user_id, authorization in cases:
        response = await client.request(method, path.format(user=user_id, record=body["record_id"]), headers={"Authorization": authorization})
        assert response.status_code == 403, (user_id, authorization)
        assert response.json() == {"error": "unknown user_id or wrong access_token"}
    # nothing happened: the record is there, and the owner's token still lists it (it was not replaced)
    assert (await client.get(record_path(body["url"]))).status_code == 200
    listing = await client.get(f"/users/{owner['user_id']}/records", headers=bearer(owner))
    assert listing.status_code == 200 and [r["record_id"] for r in listing.json()["records"]] == [body["record_id"]]


async def test_listing_shows_the_users_records_newest_first_as_their_uploads_did(client: httpx.AsyncClient) -> None:
    user, stranger = await new_user(client), await new_user(client)
    created = []
    for i in range(3):
        response = await upload(client, user, make_wav(0.3 + i * 0.1), f"take {i}.wav")
        created.append(response.json())
    await upload(client, stranger, make_wav(0.3), "theirs.wav")
    response = await client.get(f"/users/{user['user_id']}/records", headers=bearer(user))
    assert response.status_code == 200
    page = response.json()
    assert page["next_cursor"] is None
    assert [{k: v for k, v in r.items() if k != "created_at"} for r in page["records"]] == created[::-1]
    stamps = [r["created_at"] for r in page["records"]]
    assert stamps == sorted(stamps, reverse=True)
    assert all(datetime.fromisoformat(stamp).tzinfo is not None for stamp in stamps)


async def test_listing_pages_hold_every_record_exactly_once_while_records_come_and_go(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    bodies = [(await upload(client, user, make_wav(0.2), f"r{i}.wav")).json() for i in range(9)]
    seen: list[str] = []
    cursor, pages = None, 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get(f"/users/{user['user_id']}/records", params=params, headers=bearer(user))).json()
        seen += [r["record_id"] for r in page["records"]]
        pages += 1
        if pages == 2:  # between pages: a new record (newer than the cursor) and a deleted one not yet listed
            await upload(client, user, make_wav(0.2), "late.wav")
            doomed = bodies[2]
            assert (await client.delete(f"/record?id={doomed['record_id']}&user={user['user_id']}", headers=bearer(user))).status_code == 204
        cursor = page["next_cursor"]
        if cursor is None:
            break
    expected = [b["record_id"] for b in bodies[::-1] if b is not bodies[2]]
    assert seen == expected  # each once, in order; the late one is newer than every cursor, the deleted one never shown
    assert pages == 4


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=101",
        "limit=x",
        "limit=-1",
        "limit=1.5",
        "cursor=nope",
        "cursor=W10",
        "cursor=WyJ4IiwgInkiXQ",
        "cursor=" + base64.urlsafe_b64encode(b"[" * 5000).decode(),  # deeper than json's recursion limit
    ],
)
async def test_listing_with_a_bad_limit_or_cursor_is_422(client: httpx.AsyncClient, query: str) -> None:
    user = await new_user(client)
    response = await client.get(f"/users/{user['user_id']}/records?{query}", headers=bearer(user))
    assert response.status_code == 422 and list(response.json()) == ["error"]


async def test_listing_limit_defaults_to_50_and_goes_to_100(client: httpx.AsyncClient, database_url: str) -> None:
    user = await new_user(client)
    wav = make_wav(0.05, 8000, 1)
    for i in range(101):
        assert (await upload(client, user, wav, f"{i}.wav")).status_code == 201
    default = (await client.get(f"/users/{user['user_id']}/records", headers=bearer(user))).json()
    most = (await client.get(f"/users/{user['user_id']}/records?limit=100", headers=bearer(user))).json()
    assert (len(default["records"]), len(most["records"])) == (50, 100)
    assert default["next_cursor"] and most["next_cursor"]


async def test_delete_is_204_then_the_record_is_gone_and_its_name_free(client: httpx.AsyncClient, database_url: str) -> None:
    user = await new_user(client)
    body = (await upload(client, user, make_wav(3.0, 44100, 2), "gone.wav")).json()
    response = await client.delete(f"/record?id={body['record_id']}&user={user['user_id']}", headers=bearer(user))
    assert response.status_code == 204 and response.content == b""
    assert (await client.get(record_path(body["url"]))).status_code == 404
    assert (await db_rows(database_url, "SELECT count(*) FROM record_chunks WHERE record_id = $1", body["record_id"]))[0][0] == 0
    assert (await upload(client, user, make_wav(0.5), "gone.wav")).status_code == 201
    again = await client.delete(f"/record?id={body['record_id']}&user={user['user_id']}", headers=bearer(user))
    assert again.status_code == 404


async def test_deleted_bytes_are_overwritten_in_the_sqlite_file(client: httpx.AsyncClient, database_url: str) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("the file of an SQLite database")
    user = await new_user(client)
    response = await upload(client, user, make_wav(signal=music(5.0, 44100, 2), rate=44100, channels=2), "secret.wav")
    mp3 = (await client.get(record_path(response.json()["url"]))).content
    assert (await client.delete(f"/record?id={response.json()['record_id']}&user={user['user_id']}", headers=bearer(user))).status_code == 204
    path = Path(database_url.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    stored = path.read_bytes()
    assert all(mp3[offset : offset + 64] not in stored for offset in range(1024, len(mp3) - 64, 4096))


async def test_delete_of_another_users_record_or_none_is_404_and_deletes_nothing(client: httpx.AsyncClient) -> None:
    body, mp3 = await uploaded(client, make_wav(0.5))
    stranger = await new_user(client)
    for record_id in (body["record_id"], str(uuid.uuid4()), "not-a-uuid"):
        response = await client.delete(f"/record?id={record_id}&user={stranger['user_id']}", headers=bearer(stranger))
        assert response.status_code == 404 and response.json() == {"error": "no such record for this user"}
    assert (await client.get(record_path(body["url"]))).content == mp3
    missing = await client.delete(f"/record?user={stranger['user_id']}", headers=bearer(stranger))
    assert missing.status_code == 422


async def test_token_rotation_gives_a_new_token_and_the_old_one_stops_working(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    kept = (await upload(client, user, make_wav(0.3), "kept.wav")).json()
    response = await client.post(f"/users/{user['user_id']}/token", headers=bearer(user))
    assert response.status_code == 201
    fresh = response.json()
    assert set(fresh) == {"user_id", "access_token"} and fresh["user_id"] == user["user_id"] and UUID4.match(fresh["access_token"])
    assert fresh["access_token"] != user["access_token"]
    old = user
    assert (await upload(client, old, make_wav(0.3), "new.wav")).status_code == 403
    assert (await client.get(f"/users/{user['user_id']}/records", headers=bearer(old))).status_code == 403
    assert (await client.delete(f"/record?id={kept['record_id']}&user={user['user_id']}", headers=bearer(old))).status_code == 403
    assert (await client.post(f"/users/{user['user_id']}/token", headers=bearer(old))).status_code == 403
    assert (await upload(client, fresh, make_wav(0.3), "new.wav")).status_code == 201
    assert len((await client.get(f"/users/{user['user_id']}/records", headers=bearer(fresh))).json()["records"]) == 2


async def test_two_rotations_with_one_token_give_one_new_token(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    responses = await asyncio.gather(*(client.post(f"/users/{user['user_id']}/token", headers=bearer(user)) for _ in range(6)))
    assert sorted(r.status_code for r in responses) == [201] + [403] * 5


async def test_deletion_racing_an_upload_of_the_same_name_leaves_one_consistent_state(client: httpx.AsyncClient, database_url: str) -> None:
    user = await new_user(client)
    for round_ in range(4):
        body = (await upload(client, user, make_wav(0.5), f"same{round_}.wav")).json()
        delete = client.delete(f"/record?id={body['record_id']}&user={user['user_id']}", headers=bearer(user))
        deleted, uploaded_again = await asyncio.gather(delete, upload(client, user, make_wav(0.7), f"same{round_}.wav"))
        assert deleted.status_code == 204 and uploaded_again.status_code in (201, 409)
        names = await db_rows(database_url, "SELECT count(*) FROM records WHERE user_id = $1 AND filename = $2", user["user_id"], f"same{round_}.wav")
        assert names[0][0] == (1 if uploaded_again.status_code == 201 else 0)
    await assert_no_orphans(database_url)


def test_live_deletion_racing_downloads_never_gives_a_short_200(live: LiveServer) -> None:
    user = live.new_user()
    for seconds, filename in ((10.0, "small.wav"), (120.0, "large.wav")):  # one query's worth (< 1 MiB), and many
        created = httpx.post(live.url + "/users/wav", **upload_form(user, make_wav(seconds, 22050, 1), filename), timeout=60).json()
        url = live.url + record_path(created["url"])
        outcomes: list[str] = []

        def download(url: str = url, created: dict[str, Any] = created, outcomes: list[str] = outcomes) -> None:
            try:
                response = httpx.get(url, timeout=30)
            except httpx.HTTPError:  # a large record deleted mid-stream: the connection is cut, never completed
                outcomes.append("cut")
                return
            if response.status_code == 200:
                assert hashlib.sha256(response.content).hexdigest() == created["sha256"], "a 200 with other bytes"
                outcomes.append("whole")
            else:
                assert response.status_code == 404
                outcomes.append("404")

        threads = [threading.Thread(target=download) for _ in range(12)]
        for i, thread in enumerate(threads):
            thread.start()
            if i == 5:
                deleted = httpx.delete(f"{live.url}/record?id={created['record_id']}&user={user['user_id']}", headers=bearer(user))
                assert deleted.status_code == 204
        for thread in threads:
            thread.join()
        assert len(outcomes) == 12 and "404" in outcomes
        if filename == "small.wav":
            assert "cut" not in outcomes  # read by one query: whole or 404, whatever the timing


def test_live_token_rotation_racing_an_upload_with_the_old_token_stores_nothing(live: LiveServer) -> None:
    user = live.new_user()
    rotated = threading.Event()

    def pieces() -> Iterator[bytes]:
        wav = make_wav(20.0, 44100, 2)
        yield wav[: len(wav) // 2]
        response = httpx.post(f"{live.url}/users/{user['user_id']}/token", headers=bearer(user))
        assert response.status_code == 201
        rotated.set()
        yield wav[len(wav) // 2 :]

    body, headers = streamed_upload(user, pieces(), "raced.wav")
    response = httpx.post(live.url + "/users/wav", content=body, headers=headers, timeout=60)
    assert rotated.is_set()
    assert response.status_code == 403 and response.json() == {"error": "unknown user_id or wrong access_token"}
    assert asyncio.run(db_rows(live.database_url, "SELECT count(*) FROM records WHERE user_id = $1", user["user_id"]))[0][0] == 0


async def test_retention_deletes_only_expired_records(database_url: str) -> None:
    async with running_app(database_url) as client:
        user = await new_user(client)
        bodies = [(await upload(client, user, make_wav(0.3), f"{name}.wav")).json() for name in ("old", "older", "fresh")]
    expired = (datetime.now(UTC) - timedelta(days=10)).isoformat(timespec="milliseconds")
    for body in bodies[:2]:
        await db_rows(database_url, "UPDATE records SET created_at = $1 WHERE id = $2 RETURNING id", expired, body["record_id"])
    async with running_app(database_url, retention_days=7.0) as client:  # the sweep runs at start-up, then every minute
        deadline = time.monotonic() + 10
        while len((await client.get(f"/users/{user['user_id']}/records", headers=bearer(user))).json()["records"]) > 1:
            assert time.monotonic() < deadline, "the sweep did not run"
            await asyncio.sleep(0.05)
        listed = (await client.get(f"/users/{user['user_id']}/records", headers=bearer(user))).json()["records"]
        assert [r["record_id"] for r in listed] == [bodies[2]["record_id"]]
        assert (await client.get(record_path(bodies[0]["url"]))).status_code == 404
    await assert_no_orphans(database_url)


async def test_sqlite_file_does_not_grow_across_upload_and_delete_cycles(tmp_path: Path) -> None:
    """Upload, delete all, upload as much again: freed pages are reused (and beyond a reserve given back)."""
    database_url = f"sqlite:///{tmp_path / 'cycle.db'}"
    path = tmp_path / "cycle.db"

    def file_bytes() -> int:
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return path.stat().st_size

    async with running_app(database_url) as client:
        user = await new_user(client)
        wav = make_wav(signal=music(60.0, 22050, 1), rate=22050, channels=1)
        first = [(await upload(client, user, wav, f"a{i}.wav", bitrate="320")).json() for i in range(8)]
        after_first = file_bytes()
        for body in first:
            assert (await client.delete(f"/record?id={body['record_id']}&user={user['user_id']}", headers=bearer(user))).status_code == 204
        for i in range(8):
            assert (await upload(client, user, wav, f"b{i}.wav", bitrate="320")).status_code == 201
        after_second = file_bytes()
    assert sum(b["size_bytes"] for b in first) > 9_000_000  # 160 kbps: the most LAME writes at 22.05 kHz
    assert after_second <= 1.10 * after_first, (after_first, after_second)


@pytest.mark.parametrize(
    "style",
    ["html-form (browsers, curl, requests, httpx)", "backslash-escaped", "rfc5987-only", "rfc5987-and-plain", "rfc5987-first"],
)
async def test_quoted_and_escaped_names_round_trip_to_the_same_name(client: httpx.AsyncClient, style: str) -> None:
    name = 'say "hi" ё.wav'
    encoded = "UTF-8''" + quote(name, safe="")
    extra = {
        "html-form (browsers, curl, requests, httpx)": f'; filename="{name.replace(chr(34), "%22")}"',
        "backslash-escaped": '; filename="say \\"hi\\" ё.wav"',
        "rfc5987-only": f"; filename*={encoded}",
        "rfc5987-and-plain": f'; filename="say _hi_ e.wav"; filename*={encoded}',
        "rfc5987-first": f'; filename*={encoded}; filename="fallback.wav"',
    }[style]
    user = await new_user(client)
    audio = b"Content-Disposition: " + b'form-data; name="audio_file"' + extra.encode() + b"\r\n\r\n" + make_wav(0.2)
    body, headers = multipart(form_part("data", credentials(user)), audio)
    response = await client.post("/users/wav", content=body, headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == 'say "hi" ё.mp3'
    download = await client.get(record_path(response.json()["url"]))
    assert download.headers["content-disposition"].endswith("filename*=UTF-8''" + quote('say "hi" ё.mp3', safe=""))


async def test_httpx_sends_quotes_as_percent_22_which_is_decoded(client: httpx.AsyncClient) -> None:
    response = await upload(client, await new_user(client), make_wav(0.2), 'say "hi" ё.wav')
    assert response.json()["filename"] == 'say "hi" ё.mp3'


@pytest.mark.parametrize(
    "charset, name, answer",
    [
        ("ISO-8859-1", "caf%E9.wav", "café.mp3"),
        ("utf-8", "caf%C3%A9.wav", "café.mp3"),
        ("utf-7", "%2B2D3-.wav", 422),  # Python decodes it to a lone surrogate, which is no text
        ("idna", "xn--caf-dma.wav", 422),
        ("utf-16", "%FF%FEa%00.%00w%00a%00v%00", 422),
    ],
)
async def test_filename_star_takes_utf_8_and_iso_8859_1_only(client: httpx.AsyncClient, charset: str, name: str, answer: str | int) -> None:
    """RFC 8187 §3.2.1: the two charsets a recipient must support; any other, decoded by whatever codec Python has
    under that name, could give names that are not text."""
    user = await new_user(client)
    audio = f"Content-Disposition: form-data; name=\"audio_file\"; filename*={charset}''{name}\r\n\r\n".encode() + make_wav(0.2)
    body, headers = multipart(form_part("data", credentials(user)), audio)
    response = await client.post("/users/wav", content=body, headers=headers)
    if isinstance(answer, int):
        assert response.status_code == answer and list(response.json()) == ["error"], response.text
    else:
        assert response.status_code == 201 and response.json()["filename"] == answer, response.text


@pytest.mark.parametrize("name", ["line%0Abreak.wav", "carriage%0Dreturn.wav"])
async def test_escaped_line_breaks_in_names_are_422(client: httpx.AsyncClient, name: str) -> None:
    user = await new_user(client)
    body, headers = multipart(form_part("data", credentials(user)), form_part("audio_file", make_wav(0.2), name))
    response = await client.post("/users/wav", content=body, headers=headers)
    assert response.status_code == 422 and "control characters" in response.json()["error"]


async def test_cors_lets_every_mainstream_tus_client_through(database_url: str) -> None:
    """Uppy turns on tus-js-client's addRequestId: its preflight asked for X-Request-ID, got 400 on e37ff88, and Uppy
    said the endpoint "might be blocked by an internet provider or a firewall". The same for the headers the client
    sends with its ietf-draft protocols."""
    async with running_app(database_url, cors_origins="https://app.example.com") as client:
        asked = (
            "authorization, tus-resumable, upload-length, upload-metadata, upload-offset, x-request-id, upload-complete, upload-draft-interop-version"
        )
        for method in ("POST", "PATCH", "HEAD", "DELETE"):
            preflight = await client.options(
                f"/users/{uuid.uuid4()}/uploads",
                headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": method, "Access-Control-Request-Headers": asked},
            )
            assert preflight.status_code == 200, (method, preflight.text)
            allowed = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
            assert set(asked.split(", ")) <= allowed


async def test_cors_is_off_by_default(client: httpx.AsyncClient) -> None:
    response = await client.get("/health", headers={"Origin": "https://app.example.com"})
    assert "access-control-allow-origin" not in response.headers
    assert (await client.options("/health", headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"})).status_code == 405


@pytest.mark.parametrize("origins", ["*", "https://app.example.com, https://other.example.org"])
async def test_cors_origins_lets_a_browser_app_read_every_answer(database_url: str, origins: str) -> None:
    async with running_app(database_url, cors_origins=origins) as client:
        origin = {"Origin": "https://app.example.com"}
        preflight = await client.options(
            "/users/x/records", headers={**origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "Authorization"}
        )
        assert preflight.status_code == 200
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        body, _ = await uploaded(client, make_wav(0.3))
        download = await client.get(record_path(body["url"]), headers=origin)
        assert download.headers["access-control-allow-origin"] in ("*", "https://app.example.com")
        exposed = {h.strip().lower() for h in download.headers["access-control-expose-headers"].split(",")}
        assert {"location", "content-range", "content-disposition", "etag"} <= exposed
        stranger = await client.get("/health", headers={"Origin": "https://evil.example.net"})
        assert ("access-control-allow-origin" in stranger.headers) == (origins == "*")


async def test_docs_page_and_its_assets_are_served_by_the_service(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(not asset.startswith(("http:", "https:", "//")) for asset in assets)  # nothing from a CDN
    for asset in assets:
        response = await client.get("/" + asset)
        assert response.status_code == 200 and len(response.content) > 1000, asset
    assert '"openapi.json"' in page.text


# Real traffic: slow clients, caps, bounded memory, metrics #######################


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_move_as_requests_happen(client: httpx.AsyncClient) -> None:
    before = (await client.get("/metrics")).text
    body, _ = await uploaded(client, make_wav(2.0, 44100, 2))
    await upload(client, {"user_id": body["user_id"], "access_token": str(uuid.uuid4())}, make_wav(0.2))
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = response.text

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert (moved("wav2mp3_uploads_total", status="201"), moved("wav2mp3_uploads_total", status="403")) == (1, 1)
    assert moved("wav2mp3_audio_seconds_total") == pytest.approx(2.0) and moved("wav2mp3_conversion_seconds_count") == 1
    assert moved("wav2mp3_upload_bytes_total", protocol="multipart") > len(make_wav(2.0, 44100, 2))
    assert moved("wav2mp3_download_bytes_total") == body["size_bytes"]
    assert metric(after, "wav2mp3_request_seconds_count", method="POST", route="/users/wav") >= 2
    assert moved("wav2mp3_uploads_in_progress") == 0 and moved("wav2mp3_audio_buffered_bytes") == 0
    assert "wav2mp3_encoder_blocks_queued" in after and "wav2mp3_database_connections_in_use" in after
    assert "process_resident_memory_bytes" in after


def test_audio_budget_waits_in_turn_and_always_comes_back() -> None:
    async def run() -> list[str]:
        budget, order = wav2mp3.ByteBudget(100, wav2mp3.BUFFERED_AUDIO), []
        assert budget.try_take(60) and not budget.try_take(60)

        async def taker(name: str, size: int) -> None:
            await budget.take(size)
            order.append(name)

        waiting = [asyncio.create_task(taker("a", 50)), asyncio.create_task(taker("b", 30))]
        await asyncio.sleep(0)
        assert order == [] and not budget.try_take(10)  # no overtaking those who wait
        budget.give(60)
        await asyncio.gather(*waiting)
        budget.give(80)
        assert budget.used == 0 and budget.try_take(500)  # one piece larger than the budget still passes alone
        budget.give(500)
        return order

    assert asyncio.run(run()) == ["a", "b"]


async def test_uploads_convert_right_when_the_audio_budget_is_tiny(database_url: str) -> None:
    async with running_app(database_url, audio_buffer_mb=1) as client:
        user = await new_user(client)
        wavs = [make_wav(6.0, 44100, 2, freq=300 + 100 * i) for i in range(6)]  # 6 x 1 MB against a 1 MiB budget
        responses = await asyncio.gather(*(upload(client, user, wav, f"tight{i}.wav") for i, wav in enumerate(wavs)))
        assert [r.status_code for r in responses] == [201] * 6
        for i, response in enumerate(responses):
            rate, _, samples = decode((await client.get(record_path(response.json()["url"]))).content)
            assert dominant_frequency(samples[:, 0], rate) == pytest.approx(300 + 100 * i, abs=4)
        assert metric((await client.get("/metrics")).text, "wav2mp3_audio_buffered_bytes") == 0  # every byte of budget came back


async def test_over_the_upload_cap_is_503_with_retry_after_and_nothing_stored(database_url: str) -> None:
    async with running_app(database_url, max_uploads=1) as client:
        user = await new_user(client)
        go_on = asyncio.Event()
        wav = make_wav(2.0, 44100, 2)
        body, headers = multipart(form_part("data", credentials(user)), form_part("audio_file", wav, "first.wav"))

        async def slow_body() -> AsyncIterator[bytes]:
            yield body[: len(body) // 2]
            await go_on.wait()
            yield body[len(body) // 2 :]

        in_progress = metric((await client.get("/metrics")).text, "wav2mp3_uploads_in_progress")
        first = asyncio.create_task(client.post("/users/wav", content=slow_body(), headers=headers))
        while metric((await client.get("/metrics")).text, "wav2mp3_uploads_in_progress") == in_progress:
            await asyncio.sleep(0.01)
        before = await table_counts(database_url)
        refused = await upload(client, user, make_wav(0.5), "second.wav")
        assert refused.status_code == 503 and refused.headers["retry-after"] == str(wav2mp3.RETRY_AFTER_SECONDS)
        assert list(refused.json()) == ["error"]
        assert await table_counts(database_url) == before
        go_on.set()
        assert (await first).status_code == 201
        assert (await upload(client, user, make_wav(0.5), "second.wav")).status_code == 201


async def test_sqlite_connections_stay_within_the_pool(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite only")
    opened = []
    real_connect = sqlite3.connect  # what databases' own pool (through aiosqlite.connect) and this one open connections with
    monkeypatch.setattr(sqlite3, "connect", lambda *args, **kwargs: opened.append(1) or real_connect(*args, **kwargs))
    async with running_app(database_url, db_connections=3) as client:
        body, mp3 = await uploaded(client, make_wav(20.0, 44100, 2))
        downloads = await asyncio.gather(*(client.get(record_path(body["url"])) for _ in range(40)))
        assert all(d.status_code == 200 and d.content == mp3 for d in downloads)
    assert len(opened) <= 3


def test_live_downloads_give_their_read_ahead_back_even_when_clients_leave(live: LiveServer) -> None:
    user = live.new_user()
    created = httpx.post(live.url + "/users/wav", **upload_form(user, make_wav(120.0, 22050, 1), "long.wav"), timeout=60).json()
    path = record_path(created["url"])
    for _ in range(5):  # read a little, then hang up
        with socket.create_connection(("127.0.0.1", live.port)) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.recv(1000)
    downloads = [httpx.get(live.url + path, timeout=60) for _ in range(3)]
    assert all(hashlib.sha256(d.content).hexdigest() == created["sha256"] for d in downloads)
    deadline = time.monotonic() + 10
    while metric(httpx.get(live.url + "/metrics").text, "wav2mp3_download_buffered_bytes") != 0:
        assert time.monotonic() < deadline, "downloads kept their budget"
        time.sleep(0.1)


def test_live_a_download_nobody_reads_is_cut_off(tmp_path: Path, database_url: str) -> None:
    """A client that asks for an MP3 and reads nothing of it: past DOWNLOAD_IDLE_TIMEOUT its connection is
    dropped, with what the server held for it, and the log says so in one line (no traceback)."""
    with LiveServer(tmp_path, database_url, "--download-idle-timeout", "1") as server:
        user = server.new_user()
        wav = b"".join(long_wav(600.0, 22050, 1))  # a 9.6 MB MP3: more than the kernel's socket buffers take
        created = httpx.post(server.url + "/users/wav", **upload_form(user, wav, "long.wav"), timeout=60).json()
        before = httpx.get(server.url + "/metrics").text
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(f"GET {record_path(created['url'])} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            deadline = time.monotonic() + 15
            while metric(httpx.get(server.url + "/metrics").text, "wav2mp3_slow_clients_total", reason="download_stalled") == 0:
                assert time.monotonic() < deadline, "the download was not cut off"
                time.sleep(0.2)
            time.sleep(0.5)
            metrics = httpx.get(server.url + "/metrics").text
            # One connection open: the /metrics request's own (the stalled one is gone, not waiting to flush).
            assert metric(metrics, "wav2mp3_connections_open") == metric(before, "wav2mp3_connections_open") == 1
            assert metric(metrics, "wav2mp3_download_buffered_bytes") == 0
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while piece := sock.recv(65536):
                    received += piece
            assert received.startswith(b"HTTP/1.1 200") and len(received) < created["size_bytes"]
        log = server.log.read_text()
        assert "download cut off: its client took nothing for 1 s" in log and "Traceback" not in log


def test_live_stalled_clients_do_not_stop_other_uploads(tmp_path: Path, database_url: str) -> None:
    """Clients that stop sending mid-audio hold no encoder thread: ordinary uploads go on beside them."""
    with LiveServer(tmp_path, database_url, "--max-conversions", "2") as server, contextlib.ExitStack() as stalled:
        user = server.new_user()
        wav = make_wav(30.0, 44100, 2)
        for i in range(6):  # three times the encoder threads, each stopped mid-block
            sock = stalled.enter_context(socket.create_connection(("127.0.0.1", server.port)))
            sock.sendall(raw_upload_head(user, f"stalled{i}.wav", wav[:700_000], len(wav) + 100, boundary=f"b{i}"))
        time.sleep(1.0)
        started = time.monotonic()
        for i in range(3):
            response = httpx.post(server.url + "/users/wav", **upload_form(user, make_wav(5.0, 44100, 2), f"normal{i}.wav"), timeout=60)
            assert response.status_code == 201, response.text
        assert time.monotonic() - started < 30  # not a timing figure: "answered at all, while the others stall"
        metrics = httpx.get(server.url + "/metrics").text
        assert metric(metrics, "wav2mp3_uploads_in_progress") == 6 and metric(metrics, "wav2mp3_encoder_blocks_running") == 0


def test_live_slow_drip_client_gets_408_and_nothing_is_stored(tmp_path: Path, database_url: str) -> None:
    with LiveServer(tmp_path, database_url, "--min-rate-window", "2", "--min-upload-rate", "1024") as server:
        user = server.new_user()
        wav = make_wav(5.0, 44100, 2)
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(raw_upload_head(user, "drip.wav", wav[:100_000], len(wav) + 100))
            answer, started = b"", time.monotonic()
            sock.settimeout(0.4)
            while not answer and time.monotonic() - started < 15:
                with contextlib.suppress(OSError):
                    sock.sendall(b"\x00")  # one byte now and then: the idle timeout alone would never fire
                with contextlib.suppress(TimeoutError):
                    answer = sock.recv(65536)
            sock.settimeout(5)
            while chunk := sock.recv(65536):  # the rest of the answer, then the server closes
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"slower than 1024 bytes/s" in answer
        assert server.temp_files() == []
        assert asyncio.run(db_rows(server.database_url, "SELECT count(*) FROM records WHERE user_id = $1", user["user_id"]))[0][0] == 0
        assert metric(httpx.get(server.url + "/metrics").text, "wav2mp3_slow_clients_total", reason="too_slow") == 1


def send_and_read_answer(port: int, head: bytes, then: Iterable[bytes] = ()) -> bytes:
    """Send a request's start, then more pieces while the server lets us; what it answered before it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        with contextlib.suppress(OSError):  # the server may close while we still send: that is the point
            sock.sendall(head)
            for piece in then:
                sock.sendall(piece)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


@pytest.mark.xdist_group("machine")
def test_live_request_heads_are_bounded(tmp_path: Path) -> None:
    """Request line, headers and trailers are bounded (64 KiB in all, 8 KiB a line) at the protocol, before any
    route: past it 414 or 431 and the connection closed, and the server's memory does not grow with what was
    sent. On e37ff88 300 MiB of header lines took the server from 88 to 384 MB, and 200 MiB of headers got 200."""
    pad_line = b"X-Pad: " + b"p" * 1000 + b"\r\n"
    with LiveServer(tmp_path, f"sqlite:///{tmp_path / 'heads.db'}") as server:
        server.reset_peak_memory()
        before = server.proc_status("VmHWM")
        # Headers that never end: 64 MiB offered, cut off after the bound.
        answer = send_and_read_answer(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n", (pad_line * 1024 for _ in range(64)))
        assert answer.startswith(b"HTTP/1.1 431") and b"64 KiB" in answer, answer[:300]
        # Headers that end, over the bound: 431, not 200.
        answer = send_and_read_answer(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + pad_line * 100 + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431"), answer[:300]
        # One line over 8 KiB: a header, the request target.
        answer = send_and_read_answer(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"l" * 9000 + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431") and b"8 KiB" in answer, answer[:300]
        answer = send_and_read_answer(server.port, b"GET /health?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 414"), answer[:300]
        # A chunked body's trailers and chunk extensions, endless: cut off, not held until a timeout.
        chunked = b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        started = time.monotonic()
        answer = send_and_read_answer(server.port, chunked + b'd\r\n{"name":"ab"}\r\n0\r\n', (pad_line * 1024 for _ in range(64)))
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:300]
        answer = send_and_read_answer(server.port, chunked + b"c;ext=", (b"e" * 1024 * 1024 for _ in range(64)))
        assert answer.startswith(b"HTTP/1.1 431"), answer[:300]
        assert time.monotonic() - started < 10
        growth_mib = (server.proc_status("VmHWM") - before) / 1024
        assert growth_mib < 20, growth_mib
        # Within the bounds, as ever: seven 8 KiB headers, and trailers that end.
        fair = b"".join(b"X-Fair-%d: " % n + b"f" * 8000 + b"\r\n" for n in range(7))
        answer = send_and_read_answer(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fair + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        name = unique_name()
        body = json.dumps({"name": name}).encode()
        answer = send_and_read_answer(
            server.port, chunked.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + b"%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (len(body), body)
        )
        assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
        assert metric(httpx.get(server.url + "/metrics").text, "wav2mp3_overload_refusals_total", cap="request_head") == 6
        assert "Traceback" not in server.log.read_text()


def test_live_header_timeout_closes_a_dripping_client(tmp_path: Path) -> None:
    """uvicorn has no header timeout of its own: GuardedHttpToolsProtocol adds one."""
    with LiveServer(tmp_path, f"sqlite:///{tmp_path / 'headers.db'}", "--header-timeout", "1") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            started = time.monotonic()
            sock.settimeout(0.3)
            answer = b""
            for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"x" * 100:
                with contextlib.suppress(OSError):
                    sock.sendall(bytes([byte]))
                with contextlib.suppress(TimeoutError):
                    if chunk := sock.recv(65536):
                        answer += chunk
                    else:
                        break  # closed
            closed_after = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408") and b"request headers not received within 1 s" in answer
        assert closed_after < 5
        assert httpx.get(server.url + "/health").status_code == 200  # others are served as ever
        # a kept-alive connection gets the same deadline for its next request
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b'{"status":"ok"}'):
                first += sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /health HTTP/1.1\r\nHost")
            assert sock.recv(65536).startswith(b"HTTP/1.1 408")
        assert metric(httpx.get(server.url + "/metrics").text, "wav2mp3_slow_clients_total", reason="header_timeout") == 2


def test_live_connection_cap_answers_503_and_closes(tmp_path: Path) -> None:
    with LiveServer(tmp_path, f"sqlite:///{tmp_path / 'cap.db'}", "--max-connections", "4") as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after:" in answer.lower()
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 5
        while True:  # the idle connections' slots come back
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_live_metrics_add_up_over_worker_processes(tmp_path: Path, database_url: str) -> None:
    with LiveServer(tmp_path, database_url, "--workers", "2") as server:
        user = server.new_user()
        for i in range(6):  # the kernel spreads the connections over both workers
            assert httpx.post(server.url + "/users/wav", **upload_form(user, make_wav(0.5), f"w{i}.wav"), timeout=60).status_code == 201
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "wav2mp3_uploads_total", status="201") == 6
        assert metric(text, "wav2mp3_audio_seconds_total") == pytest.approx(3.0)


NGINX_MAIN = """
user {user};
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    include {dir}/site.conf;
}}
"""


@contextlib.contextmanager
def nginx_in_front(upstream_port: int, directory: Path, **changes: tuple[str, str]) -> Iterator[int]:
    """deploy/nginx.conf run by a real nginx in front of a live server, with `changes` (old text=new text); its port."""
    port = free_port()
    site = (HERE / "deploy" / "nginx.conf").read_text().replace("server app:8000", f"server 127.0.0.1:{upstream_port}")
    site = site.replace("listen 80;", f"listen {port};")
    for old, new in changes.values():
        assert old in site, old
        site = site.replace(old, new)
    (directory / "site.conf").write_text(site)
    # Its workers run as the test's own user, so that they may write under the test's directory.
    (directory / "nginx.conf").write_text(NGINX_MAIN.format(dir=directory, user=getpass.getuser()))
    nginx = subprocess.Popen(["nginx", "-c", str(directory / "nginx.conf"), "-g", "daemon off;"])
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code < 500:
                    break
            assert time.monotonic() < deadline, (directory / "error.log").read_text()
            time.sleep(0.1)
        yield port
    finally:
        nginx.terminate()
        nginx.wait(10)


def nginx_body_files(directory: Path) -> dict[str, int]:
    """The request-body files nginx's processes hold open, and their sizes. nginx unlinks such a file right after it
    opens it, so the directory always looks empty: only /proc shows what a worker holds ("... (deleted)")."""
    master = int((directory / "nginx.pid").read_text())
    workers = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    held = {}
    for pid in [master, *map(int, workers)]:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith(str(directory / "body")):
                    held[os.readlink(fd)] = fd.stat().st_size
    return held


needs_nginx = pytest.mark.skipif(not shutil.which("nginx"), reason="nginx not installed (.ci/run installs it)")


@pytest.mark.xdist_group("machine")
@needs_nginx
@pytest.mark.slow
@pytest.mark.parametrize("buffering, megabytes", [("off", 80), ("on", 20)], ids=["as-deployed", "control-buffering-on"])
def test_live_compose_proxy_config_streams_a_large_upload(live: LiveServer, tmp_path: Path, buffering: str, megabytes: int) -> None:
    """deploy/nginx.conf, run by a real nginx in front of the service: the upload reaches the encoder while it is
    still arriving, nginx holds no body file, and the answer and links come through. The control runs the same
    checks with `proxy_request_buffering on`, where nginx does hold the body in a file: the check can fail."""
    changes = {"buffering": ("proxy_request_buffering off;", f"proxy_request_buffering {buffering};")}
    with nginx_in_front(live.port, tmp_path, **changes) as port:
        user = live.new_user()
        seconds = megabytes * 1e6 / (44100 * 4)
        observed: dict[str, Any] = {}

        def pieces() -> Iterator[bytes]:
            *most, last = list(long_wav(seconds, piece_seconds=1.0))
            cpu = live.cpu_seconds()
            yield from most
            time.sleep(1.0)
            observed["cpu"] = live.cpu_seconds() - cpu
            observed["body_files"] = nginx_body_files(tmp_path)
            yield last

        body, headers = streamed_upload(user, pieces(), "big.wav")
        response = httpx.post(f"http://127.0.0.1:{port}/users/wav", content=body, headers=headers, timeout=600)
        assert response.status_code == 201, response.text
        assert response.json()["url"].startswith(f"http://127.0.0.1:{port}/record?")  # the client's own host and port
    encode_cpu = megabytes * 1e6 / len(make_wav(30.0, 44100, 2)) * encode_cpu_seconds(make_wav(30.0, 44100, 2))
    if buffering == "off":
        assert observed["body_files"] == {}
        assert observed["cpu"] > 0.5 * encode_cpu, (observed, encode_cpu)
    else:
        assert sum(observed["body_files"].values()) > 0.9 * megabytes * 1e6, observed["body_files"]
        assert observed["cpu"] < 0.1 * encode_cpu, (observed, encode_cpu)


# Hardening: OpenAPI and fuzzing ##################################################

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))


async def test_openapi_describes_every_route_with_its_statuses(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    operations = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert operations == {
        ("/users", "post"), ("/users/wav", "post"), ("/record", "get"), ("/record", "head"), ("/record", "delete"),
        ("/users/{user_id}/records", "get"), ("/users/{user_id}/token", "post"), ("/health", "get"), ("/metrics", "get"),
        ("/users/{user_id}/uploads", "options"), ("/users/{user_id}/uploads", "post"), ("/users/{user_id}/uploads/{upload_id}", "head"),
        ("/users/{user_id}/uploads/{upload_id}", "patch"), ("/users/{user_id}/uploads/{upload_id}", "get"),
        ("/users/{user_id}/uploads/{upload_id}", "delete"), ("/", "get"), ("/users/{user_id}", "get"), ("/service", "get"),
        ("/users/{user_id}/uploads", "get"), ("/users/{user_id}/records.zip", "get"), ("/users/{user_id}/records.zip", "post"),
    }  # fmt: skip
    operator = wav2mp3.openapi_document(True)["paths"]  # with ADMIN_TOKEN set: the operator's routes too
    assert {(path, method) for path, item in operator.items() for method in item} - operations == {
        ("/admin/invites", "post"), ("/admin/users", "get"), ("/admin/users", "post"), ("/admin/users/{user_id}", "get"),
        ("/admin/users/{user_id}", "delete"), ("/admin/users/{user_id}/quota", "put"), ("/admin/users/{user_id}/quota", "delete"),
        ("/admin/users/{user_id}/token", "post"),
    }  # fmt: skip
    uploads, upload = spec["paths"]["/users/{user_id}/uploads"], spec["paths"]["/users/{user_id}/uploads/{upload_id}"]
    assert set(uploads["post"]["responses"]) == {"200", "201", "400", "401", "403", "404", "412", "413", "415", "422", "429", "503"}
    assert set(upload["patch"]["responses"]) == {
        "200", "201", "204", "400", "401", "403", "404", "408", "409", "412", "413", "415", "422", "460", "503"
    }  # fmt: skip
    assert set(upload["head"]["responses"]) == {"200", "400", "401", "403", "404", "412", "423", "503"}
    assert set(upload["delete"]["responses"]) == {"204", "400", "401", "403", "404", "412", "503"}
    problem = {"application/json", "application/problem+json"}  # the IETF draft's problem types, to its requests
    assert set(upload["patch"]["responses"]["409"]["content"]) == set(upload["patch"]["responses"]["400"]["content"]) == problem
    assert set(spec["paths"]["/users/{user_id}/records"]["get"]["responses"]) == {"200", "401", "403", "422", "503"}
    assert set(spec["paths"]["/record"]["delete"]["responses"]) == {"204", "401", "403", "404", "422", "503"}
    assert set(spec["paths"]["/users/{user_id}/token"]["post"]["responses"]) == {"201", "401", "403", "503"}
    assert set(spec["paths"]["/users/wav"]["post"]["responses"]) == {"201", "403", "408", "409", "413", "415", "422", "503"}
    assert set(spec["paths"]["/users"]["post"]["responses"]) == {"200", "201", "403", "408", "413", "422", "429", "503"}
    assert set(spec["paths"]["/users/{user_id}"]["get"]["responses"]) == {"200", "401", "403", "503"}
    assert set(operator["/admin/users/{user_id}"]["delete"]["responses"]) == {"204", "401", "403", "404", "503"}
    assert set(operator["/admin/users/{user_id}/quota"]["put"]["responses"]) == {"200", "401", "403", "404", "408", "413", "422", "503"}
    assert operator["/admin/users"]["get"]["security"] == [{"admin": []}] and spec["components"]["securitySchemes"]["admin"]["scheme"] == "bearer"
    assert set(spec["paths"]["/record"]["get"]["responses"]) == {"200", "206", "304", "404", "416", "422", "503"}


async def test_unknown_route_and_method_answer_json_errors(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nope")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = await client.put("/users")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


# A tus PATCH's body is plain bytes, and so is the IETF draft's: schemathesis sends them as it sends application/octet-stream.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")
schemathesis.serializer.alias("application/partial-upload", "application/octet-stream")


def fuzzed_operations() -> list[tuple[str, str, str]]:
    """Every documented operation with data that fits its schema, and those that take input with data that does not."""
    operations = [(op.method, op.path) for op in wav2mp3.API.operations]
    # (a path parameter alone is a string that anything fits: no data can fail to fit it)
    with_input = [(op.method, op.path) for op in wav2mp3.API.operations if any(p["in"] != "path" for p in op.parameters) or op.body or op.bearer]
    return [(*operation, "positive") for operation in operations] + [(*operation, "negative") for operation in with_input]


@pytest.mark.parametrize("method, path, mode", fuzzed_operations())
def test_fuzz_api_never_5xx_and_conforms_to_its_schema(live: LiveServer, method: str, path: str, mode: str) -> None:
    """schemathesis drives the live server from its own /openapi.json: data that fits the schema
    and data that does not; every answer must be a documented status with a documented body."""
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operation = schema[path][method]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance, response_headers_conformance]

    @hypothesis.given(case=operation.as_strategy(schemathesis.GenerationMode(mode)))
    @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(hypothesis.HealthCheck), database=None)
    def fuzz(case: Any) -> None:
        # A made-up Transfer-Encoding or Content-Length breaks HTTP's own framing: uvicorn answers it 400 in plain
        # text, before any route.
        hypothesis.assume(not {"transfer-encoding", "content-length"} & {name.lower() for name in case.headers or {}})
        response = case.call_and_validate(base_url=live.url, checks=checks)
        assert "Traceback" not in response.text and "SELECT" not in response.text

    fuzz()


def seed_wavs() -> list[bytes]:
    """Small valid WAVs of every kind, for the mutating fuzzers to start from."""
    return [
        make_wav(0.05, 8000, 1),
        make_wav(0.05, 44100, 2, "pcm", 24),
        make_wav(0.05, 22050, 2, "float", 32, fmt_extra=b"\x00\x00", before_data=riff_chunk(b"fact", struct.pack("<L", 1102))),
        make_wav(0.05, 8000, 1, "mulaw", 8),
        make_wav(0.05, 48000, 6, "pcm", 16, extensible=True, mask=0x3F),
        make_wav(0.05, 16000, 1, before_data=riff_chunk(b"LIST", b"INFOx"), data_size=0xFFFFFFFF),
        rf64(make_wav(0.05, 16000, 2)),
    ]


SIZE_VALUES = st.sampled_from([0, 1, 2, 3, 15, 16, 17, 18, 40, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1)


@st.composite
def mutated_wavs(draw: st.DrawFn) -> bytes:
    wav = bytearray(draw(st.sampled_from(seed_wavs())))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["byte", "size", "truncate", "insert", "field16"]))
        if kind == "byte" and wav:
            wav[draw(st.integers(0, min(len(wav), 80) - 1))] = draw(st.integers(0, 255))
        elif kind == "size" and len(wav) >= 8:
            offset = draw(st.sampled_from([4, 16, 40, 36 + 8 * draw(st.integers(0, 4))]))
            if offset + 4 <= len(wav):
                wav[offset : offset + 4] = struct.pack("<L", draw(SIZE_VALUES))
        elif kind == "field16" and len(wav) >= 36:
            offset = draw(st.sampled_from([20, 22, 32, 34]))  # tag, channels, block align, bits
            wav[offset : offset + 2] = struct.pack("<H", draw(st.integers(0, 0xFFFF)))
        elif kind == "truncate":
            del wav[draw(st.integers(0, len(wav))) :]
        elif kind == "insert":
            at = draw(st.integers(12, max(12, min(len(wav), 60))))
            wav[at:at] = draw(st.binary(min_size=0, max_size=64))
    return bytes(wav)


@hypothesis.given(st.one_of(mutated_wavs(), st.binary(max_size=300)))
@hypothesis.settings(max_examples=FUZZ_EXAMPLES * 10, deadline=5000, suppress_health_check=[hypothesis.HealthCheck.too_slow])
def test_fuzz_wav_reader_converts_or_refuses_with_415_or_422(wav: bytes) -> None:
    try:
        mp3 = convert(wav, bitrate=32, quality=9)
    except (wav2mp3.BadWav, wav2mp3.UnsupportedWav) as refusal:
        assert refusal.status in (415, 422), refusal
        assert refusal.message
    else:
        assert mp3.duration_seconds > 0 and mp3.size > 0
        mp3.close()


@hypothesis.given(
    declared=st.integers(1, 4000), trailing=st.binary(max_size=200), encoding=st.sampled_from([("pcm", 16), ("pcm", 24), ("float", 64), ("alaw", 8)])
)
@hypothesis.settings(max_examples=FUZZ_EXAMPLES * 3, deadline=5000)
def test_fuzz_wav_reader_never_reads_past_a_declared_data_chunk(declared: int, trailing: bytes, encoding: tuple[str, int]) -> None:
    # (a declared size of 0 means "streamed": read to the end, by design)
    wav = make_wav(0.05, 16000, 2, encoding[0], encoding[1])
    data_start = wav.index(b"data") + 8
    wav = wav[: data_start - 4] + struct.pack("<L", declared) + wav[data_start:] + trailing
    parser = wav2mp3.WavParser()
    audio = b"".join(parser.feed(wav[i : i + 97]) for i in range(0, len(wav), 97))
    assert audio == wav[data_start : data_start + declared]


@hypothesis.given(wav=mutated_wavs())
@hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_fuzz_upload_of_mutated_wavs_is_201_415_or_422(live: LiveServer, wav: bytes) -> None:
    user = live_fuzz_user(live)
    response = httpx.post(live.url + "/users/wav", **upload_form(user, wav, f"{uuid.uuid4().hex}.wav"), timeout=60)
    assert response.status_code in (201, 415, 422), response.text
    assert set(response.json()) == ({"url", "record_id", "user_id", "filename", "title", "duration_seconds", "size_bytes", "sha256"}
                                    if response.status_code == 201 else {"error"})  # fmt: skip


_fuzz_users: dict[str, dict[str, str]] = {}


def live_fuzz_user(live: LiveServer) -> dict[str, str]:
    if live.url not in _fuzz_users:
        _fuzz_users[live.url] = live.new_user()
    return _fuzz_users[live.url]


# Hardening: limits ##############################################################


async def test_upload_with_too_many_parts_is_422(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    extras = [form_part(f"extra{i}", b"x") for i in range(20)]
    body, headers = multipart(form_part("data", credentials(user)), *extras, form_part("audio_file", make_wav(0.2), "a.wav"))
    response = await client.post("/users/wav", content=body, headers=headers)
    assert response.status_code == 422 and "parts" in response.json()["error"]


@pytest.mark.parametrize(
    "payload, message",
    [
        (b'{"user_id": "' + b"x" * 70000 + b'"}', "larger than"),
        # Python 3.11 refuses these depths with a RecursionError; 3.12 and 3.13 parse some of them, and
        # then the value is refused for its shape: a 422 either way, never a 500.
        (b"[" * 3000 + b"]" * 3000, "nested too deeply|must be a JSON object"),
        (b'{"a":' * 1200 + b"1" + b"}" * 1200, "nested too deeply|must hold string fields"),
    ],
    ids=["huge", "deep-array", "deep-object"],
)
async def test_upload_data_part_too_large_or_too_deep_is_422(client: httpx.AsyncClient, payload: bytes, message: str) -> None:
    body, headers = multipart(form_part("data", payload), form_part("audio_file", make_wav(0.2), "a.wav"))
    response = await client.post("/users/wav", content=body, headers=headers)
    assert response.status_code == 422
    assert re.search(message, response.json()["error"])


# Hardening: races ###############################################################


async def test_parallel_uploads_of_one_file_name_give_one_201_and_409s(client: httpx.AsyncClient, database_url: str) -> None:
    user = await new_user(client)
    wav = make_wav(3.0, 44100, 2)
    responses = await asyncio.gather(*(upload(client, user, wav, "race.wav") for _ in range(8)))
    assert sorted(r.status_code for r in responses) == [201] + [409] * 7
    rows = await db_rows(database_url, "SELECT count(*) FROM records WHERE user_id = $1", user["user_id"])
    assert rows[0][0] == 1
    await assert_no_orphans(database_url)


async def test_parallel_downloads_while_uploading_all_succeed(client: httpx.AsyncClient, database_url: str) -> None:
    body, mp3 = await uploaded(client, make_wav(20.0, 44100, 2))
    user = await new_user(client)
    uploads = [upload(client, user, make_wav(10.0, 44100, 2), f"u{i}.wav") for i in range(3)]
    downloads = [client.get(record_path(body["url"])) for _ in range(12)]
    results = await asyncio.gather(*uploads, *downloads)
    assert [r.status_code for r in results[:3]] == [201] * 3
    assert all(r.status_code == 200 and r.content == mp3 for r in results[3:])
    await assert_no_orphans(database_url)


# Hardening: crash safety ########################################################


def test_sigkill_mid_batch_loses_no_acknowledged_upload(tmp_path: Path, database_url: str) -> None:
    server = LiveServer(tmp_path, database_url)  # killed below: no `with`
    user = server.new_user()
    acknowledged: list[dict[str, Any]] = []
    wavs = [make_wav(4.0 + i * 0.25, 44100, 2) for i in range(16)]
    killed = threading.Event()

    def client(indexes: list[int]) -> None:
        for i in indexes:
            try:
                response = httpx.post(server.url + "/users/wav", **upload_form(user, wavs[i], f"crash{i}.wav"), timeout=60)
            except httpx.HTTPError:
                continue  # the server died under this request
            if response.status_code == 201:
                acknowledged.append(response.json())
                if len(acknowledged) == 5:
                    server.process.kill()  # SIGKILL: no shutdown, no cleanup
                    killed.set()

    threads = [threading.Thread(target=client, args=(list(range(k, 16, 3)),)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert killed.is_set() and 5 <= len(acknowledged) < 16
    server.process.wait()
    with LiveServer(tmp_path, database_url) as restarted:
        for body in acknowledged:
            download = httpx.get(restarted.url + record_path(body["url"]), timeout=60)
            assert download.status_code == 200
            assert hashlib.sha256(download.content).hexdigest() == body["sha256"] == download.headers["etag"].strip('"')
        stored = asyncio.run(db_rows(database_url, "SELECT id, sha256 FROM records WHERE user_id = $1", user["user_id"]))
        # Anything else stored was committed just before the kill, unanswered: it must be whole too.
        for record_id, sha256 in stored:
            download = httpx.get(f"{restarted.url}/record?id={record_id}&user={user['user_id']}", timeout=60)
            assert hashlib.sha256(download.content).hexdigest() == sha256
        assert {b["record_id"] for b in acknowledged} <= {row[0] for row in stored}
        asyncio.run(assert_no_orphans(database_url))


# Hardening: database outage #####################################################

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PrivatePostgres:
    """A throwaway PostgreSQL 15 cluster the test can stop and start (run as the postgres user)."""

    def __init__(self, directory: Path) -> None:
        self.data = directory / "pgdata"
        self.port = free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres", str(directory)], check=True)
        subprocess.run(
            [*self.as_postgres, str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True
        )
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        subprocess.run(
            [*self.as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.data / "log"), "-w", "start"],
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run([*self.as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"], check=True, capture_output=True)


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists() or (os.geteuid() != 0 and Path.home().name != "postgres"):
        pytest.skip("needs PostgreSQL 15 binaries and root (CI has both)")
    # pytest's own temporary directories are private to root: the postgres user needs its own.
    directory = Path(tempfile.mkdtemp(prefix="wav2mp3-test-pg-"))
    database = PrivatePostgres(directory)
    yield database
    with contextlib.suppress(subprocess.CalledProcessError):
        database.stop()
    shutil.rmtree(directory, ignore_errors=True)


def test_postgres_outage_is_503_everywhere_and_the_service_recovers_by_itself(tmp_path: Path, private_postgres: PrivatePostgres) -> None:
    with LiveServer(tmp_path / "app", private_postgres.url, "--db-timeout", "3") as server:
        user = server.new_user()
        created = httpx.post(server.url + "/users/wav", **upload_form(user, make_wav(1.0)), timeout=30)
        assert created.status_code == 201
        record = record_path(created.json()["url"])

        private_postgres.stop()
        calls = [
            ("GET", "/health", {}),
            ("POST", "/users", {"json": {"name": unique_name()}}),
            ("POST", "/users/wav", upload_form(user, make_wav(1.0), "during-outage.wav")),
            ("GET", record, {}),
        ]
        for method, path, kwargs in calls:
            started = time.monotonic()
            response = httpx.request(method, server.url + path, timeout=30, **kwargs)
            assert response.status_code == 503, (path, response.text)
            assert response.json() == {"error": "database unavailable"}
            assert time.monotonic() - started < 15, path  # bounded by DB_TIMEOUT, not a hang

        private_postgres.start()
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the service did not recover"
            time.sleep(0.2)
        assert httpx.post(server.url + "/users", json={"name": unique_name()}).status_code == 201
        assert httpx.post(server.url + "/users/wav", **upload_form(user, make_wav(1.0), "after.wav"), timeout=30).status_code == 201
        download = httpx.get(server.url + record, timeout=30)
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == created.json()["sha256"]  # the record outlived the outage whole


# Hardening: security ############################################################


@pytest.mark.parametrize(
    "filename",
    ['say "hi".wav', "../../etc/passwd.wav", "..\\..\\boot.ini.wav", 'x"; filename*=UTF-8\'\'evil.wav', "semi;colon, comma.wav",
     "%41%0d%0aX-Evil: 1.wav", "тест 测试 🎧.wav", "é" * 120 + ".wav"],
)  # fmt: skip
async def test_hostile_file_names_cannot_break_content_disposition(client: httpx.AsyncClient, filename: str) -> None:
    user = await new_user(client)
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"')  # quoted-string escapes, sent raw
    body, headers = multipart(form_part("data", credentials(user)), form_part("audio_file", make_wav(0.2), quoted))
    created = await client.post("/users/wav", content=body, headers=headers)
    assert created.status_code == 201, created.text
    response = await client.get(record_path(created.json()["url"]))
    disposition = response.headers["content-disposition"]
    match = re.fullmatch(r'attachment; filename="([ -~]*)"; filename\*=UTF-8\'\'([A-Za-z0-9%._~-]*)', disposition)
    assert match, disposition
    assert '"' not in match.group(1) and "\\" not in match.group(1)
    stem = re.split(r"[/\\]", filename)[-1].rsplit(".", 1)[0]
    assert unquote(match.group(2)) == stem + ".mp3"
    assert "x-evil" not in {k.lower() for k in response.headers}


@pytest.mark.parametrize("filename", ["a\x00b.wav", "line\rbreak.wav", "tab\there.wav", "é" * 128 + ".wav"])
async def test_file_names_with_control_characters_or_over_255_bytes_are_422(client: httpx.AsyncClient, filename: str) -> None:
    user = await new_user(client)
    body, headers = multipart(form_part("data", credentials(user)), form_part("audio_file", make_wav(0.2), filename))
    assert (await client.post("/users/wav", content=body, headers=headers)).status_code == 422


SQL_INJECTIONS = ["'; DROP TABLE users; --", "x' OR '1'='1", '"); DELETE FROM records; --', "1; SELECT pg_sleep(5)"]


@pytest.mark.parametrize("attack", SQL_INJECTIONS)
async def test_sql_injection_strings_are_inert_in_every_field(client: httpx.AsyncClient, database_url: str, attack: str) -> None:
    before = await table_counts(database_url)
    created = await client.post("/users", json={"name": attack + uuid.uuid4().hex[:6]})
    assert created.status_code == 201
    user = created.json()
    response = await upload(client, user, make_wav(0.2), attack + ".wav")
    # httpx sends a quote in a file name as %22 (the HTML form rule), which the service decodes
    assert response.status_code == 201 and response.json()["filename"] == attack + ".mp3"
    forged = {"user_id": attack, "access_token": attack}
    assert (await upload(client, forged, make_wav(0.2))).status_code == 422
    assert (await client.get("/record", params={"id": attack, "user": attack})).status_code == 404
    assert (await client.get("/record", params={"id": response.json()["record_id"], "user": attack})).status_code == 404
    after = await table_counts(database_url)
    assert (after["users"], after["records"]) == (before["users"] + 1, before["records"] + 1)  # nothing dropped, nothing more


async def test_error_bodies_never_carry_traces_or_sql(client: httpx.AsyncClient) -> None:
    responses = [
        await client.post("/users", content=b"{"),
        await client.post("/users/wav", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data; boundary=x"}),
        await client.get("/record?id=1&user=2"),
        await client.get("/record"),
    ]
    for response in responses:
        assert list(response.json()) == ["error"]
        assert not re.search(r"Traceback|File \"|SELECT|INSERT|sqlite|asyncpg", response.text), response.text


# Hostile input: numbers, metadata, temporary disk, logs, the write lock #########

# What a client may send where a number belongs: ASCII runs short and thousands of digits long, every
# script's digits, superscripts and other numerals (Unicode Nd, No, Nl), signs, spaces and dots.
NUMBER_LIKE = st.one_of(
    st.text(st.sampled_from("0123456789"), min_size=1, max_size=20),
    st.text(st.characters(categories=["Nd", "No", "Nl"]) | st.sampled_from("0123456789+- \t."), min_size=1, max_size=12),
    st.integers(19, 6000).map(lambda digits: "9" * digits),
    st.builds(lambda pad, sign, n: f"{pad}{sign}{n}{pad}", st.sampled_from(["", " ", "\t"]), st.sampled_from(["", "+", "-"]), st.integers(0, 400)),
)


def ascii_count(text: str) -> int | None:
    return int(text) if re.fullmatch(r"[0-9]{1,18}", text) else None


def on_the_wire(text: str) -> bytes:
    """The text as a client would send it: Latin-1 where it can be (so `²` arrives as `²`), else UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


_number_fixtures: dict[str, tuple[httpx.Client, dict[str, str], dict[str, Any]]] = {}


def number_fixture(live: LiveServer) -> tuple[httpx.Client, dict[str, str], dict[str, Any]]:
    """A kept-alive client of the live server (a new client per request costs more than the request), a user
    and one of its records, made once."""
    if live.url not in _number_fixtures:
        http = httpx.Client(base_url=live.url, timeout=60)
        user = live.new_user()
        record = http.post("/users/wav", **upload_form(user, make_wav(3.0, 44100, 2), "numbers.wav")).json()
        _number_fixtures[live.url] = (http, user, record)
    return _number_fixtures[live.url]


@pytest.mark.slow
@hypothesis.given(number=NUMBER_LIKE)
@hypothesis.settings(max_examples=FUZZ_EXAMPLES * 2, deadline=None, suppress_health_check=list(hypothesis.HealthCheck), database=None)
def test_every_number_a_client_sends_is_ascii_digits_or_a_4xx(live: LiveServer, number: str) -> None:
    http, user, record = number_fixture(live)
    value = ascii_count(number)

    wire = on_the_wire(number)
    seen = wire.decode("latin-1")  # what the server reads of a header or a form field
    for spec in (b"0-" + wire, wire + b"-", b"-" + wire):
        spec = spec.strip(b" \t")  # a header value's surrounding white space is not part of it (RFC 9110 §5.5)
        response = http.get(record_path(record["url"]), headers={"Range": b"bytes=" + spec})
        assert response.status_code in (200, 206, 416), (spec, response.text)
        if seen.strip(" \t").isnumeric() and ascii_count(seen.strip(" \t")) is None:
            assert response.status_code == 416 and response.headers["content-range"] == f"bytes */{record['size_bytes']}", spec

    listing = http.get(f"/users/{user['user_id']}/records", params={"limit": number}, headers=bearer(user))
    assert listing.status_code == (200 if value is not None and 1 <= value <= 100 else 422), listing.text

    for option, allowed in (("bitrate", wav2mp3.MP3_BITRATES), ("vbr_quality", range(10)), ("channels", (1, 2))):
        audio = form_part("audio_file", make_wav(0.1), f"{uuid.uuid4()}.wav")
        body, headers = multipart(form_part(option, wire), form_part("data", credentials(user)), audio)
        response = http.post("/users/wav", content=body, headers=headers)
        assert response.status_code == (201 if ascii_count(seen) in allowed else 422), (option, response.text)
        assert response.status_code == 201 or list(response.json()) == ["error"]

    # tus: Upload-Length on creation, Upload-Offset on a PATCH (the header as the server reads it)
    wav = make_wav(0.1)
    header = wire.strip(b" \t")  # a header value's surrounding white space is not part of it (RFC 9110 §5.5)
    value = ascii_count(header.decode("latin-1"))
    created = http.post(
        f"/users/{user['user_id']}/uploads",
        headers={**tus(user, Upload_Metadata=tus_metadata(filename=f"{uuid.uuid4()}.wav")), "Upload-Length": header},
    )
    expected = 201 if value is not None and 0 < value <= wav2mp3.Settings().max_upload_bytes else (413 if value else 422 if value == 0 else 400)
    assert created.status_code == expected, created.text
    url = http.post(
        f"/users/{user['user_id']}/uploads",
        headers=tus(user, Upload_Length=str(len(wav)), Upload_Metadata=tus_metadata(filename=f"{uuid.uuid4()}.wav")),
    ).headers["location"]
    patched = http.patch(url, content=wav, headers={**tus(user, **OCTETS), "Upload-Offset": header})
    assert patched.status_code == (204 if value == 0 else 409 if value is not None else 400), patched.text
    assert list(patched.json()) == ["error"] if patched.status_code != 204 else patched.headers["upload-offset"] == str(len(wav))
    for unfinished in (created.headers.get("location"), None if patched.status_code == 204 else url):  # the user's bound on unfinished uploads
        if unfinished:
            http.delete(unfinished, headers=tus(user))


@pytest.mark.parametrize("declared", ["²", "١٢", "+12", "1" * 5000, "12 "])
async def test_content_length_that_is_not_ascii_digits_is_400(client: httpx.AsyncClient, declared: str) -> None:
    response = await client.post("/users", content=b'{"name": "x"}', headers={"Content-Length": on_the_wire(declared)})
    assert response.status_code == 400 and "Content-Length" in response.json()["error"]


# A WAV's metadata: whatever the chunks, the reader keeps a bounded amount.

INFO_IDS = [*wav2mp3.INFO_TO_ID3, b"ISBJ", b"IKEY", b"ZZZZ"]


@st.composite
def wavs_full_of_metadata(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A WAV with many metadata chunks (LIST/INFO with mapped and unmapped ids, other lists, unknown chunks),
    before and after its audio; and that audio."""

    def metadata() -> bytes:
        chunks = b""
        for _ in range(draw(st.integers(0, 6))):
            kind = draw(st.sampled_from(["info", "list", "other"]))
            if kind == "info":
                entries = b"".join(
                    riff_chunk(draw(st.sampled_from(INFO_IDS)), draw(st.sampled_from([b"x", b"ab" * 700, b"\xc3\xa9" * 2000, bytes(3000)])))
                    for _ in range(draw(st.integers(0, 5)))
                )
                chunks += riff_chunk(b"LIST", b"INFO" + entries)
            elif kind == "list":
                chunks += riff_chunk(b"LIST", b"adtl" + bytes(draw(st.integers(0, 5000))))
            else:
                chunks += riff_chunk(draw(st.sampled_from([b"bext", b"JUNK", b"iXML", b"cue "])), bytes(draw(st.integers(0, 70000))))
        return chunks

    audio = encode_samples(sine(0.05, 16000, 2), "pcm", 16)
    wav = b"RIFF\x00\x00\x00\x00WAVE" + metadata() + fmt_chunk(1, 2, 16000, 16) + metadata() + riff_chunk(b"data", audio) + metadata()
    return wav, audio


@hypothesis.given(wav_and_audio=wavs_full_of_metadata(), piece=st.integers(1, 70000))
@hypothesis.settings(max_examples=FUZZ_EXAMPLES * 3, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
def test_wav_reader_keeps_a_bounded_amount_of_any_metadata(wav_and_audio: tuple[bytes, bytes], piece: int) -> None:
    wav, audio = wav_and_audio
    parser = wav2mp3.WavParser()
    received = b""
    for offset in range(0, len(wav), piece):
        received += bytes(parser.feed(wav[offset : offset + piece]))
        assert len(parser._pending) <= wav2mp3.MAX_INFO_TEXT  # the piece being read: a header, fmt, ds64 or one INFO text
        assert set(parser.tags.info) <= set(wav2mp3.INFO_TO_ID3)
        assert all(len(text) <= wav2mp3.MAX_INFO_TEXT for text in parser.tags.info.values())
    assert received == audio
    parser.close()
    tag = wav2mp3.id3_tag(wav2mp3.mp3_tag(parser.tags, len(audio) // 4, 16000))
    assert len(tag) <= len(wav2mp3.INFO_TO_ID3) * (wav2mp3.MAX_INFO_TEXT + 64) + 10


async def test_info_texts_are_cut_at_1_kib_without_splitting_a_character(client: httpx.AsyncClient) -> None:
    wav = make_wav(1.0, 44100, 1, before_data=info_list(INAM="a" + "é" * 100_000, IART="x" * 200_000))
    _, mp3 = await uploaded(client, wav)
    tag = mutagen.id3.ID3(io.BytesIO(mp3))
    assert str(tag["TIT2"]) == "a" + "é" * 511  # 1,024 bytes hold "a" and 511.5 "é": the half is dropped, not mangled
    assert str(tag["TPE1"]) == "x" * 1024
    assert mp3.index(b"\xff\xfb") < 4096  # the whole ID3 tag is a few kilobytes


def metadata_flood(chunks: int, chunk_bytes: int) -> Iterator[bytes]:
    """A WAV that is nothing but metadata: a fmt chunk, then LIST/INFO chunks of `chunk_bytes`, each entry under
    an id of its own (mapped ids and others), and no data chunk."""
    yield b"RIFF\xff\xff\xff\xffWAVE" + fmt_chunk(1, 2, 44100, 16)
    filler = bytes(range(65, 91)) * (chunk_bytes // 26 + 1)
    for i in range(chunks):
        text_id = INFO_IDS[i % len(INFO_IDS)] if i % 2 else b"Q%03d" % i
        entry = riff_chunk(text_id, filler[: chunk_bytes - 12])
        yield riff_chunk(b"LIST", b"INFO" + entry)


@pytest.mark.xdist_group("machine")
@pytest.mark.slow
@pytest.mark.parametrize("order", ["audio-first", "data-first"])
def test_live_metadata_flood_does_not_grow_server_memory(tmp_path: Path, database_url: str, order: str) -> None:
    """Three uploads at once, each ~120 MiB of LIST/INFO chunks of 1 MiB and no audio: the server's peak RSS
    grows by less than 20 MB, and each is answered 422 (before the fix: +230 MB for two)."""
    with LiveServer(tmp_path, database_url) as server:
        user = server.new_user()
        assert httpx.post(server.url + "/users/wav", **upload_form(user, make_wav(2.0, 44100, 2), "warm.wav"), timeout=60).status_code == 201
        server.reset_peak_memory()
        before = server.proc_status("VmHWM")

        def flood(i: int) -> int:
            body, headers = streamed_upload(user, metadata_flood(120, wav2mp3.MIB), f"flood{i}.wav", data_first=order == "data-first")
            return httpx.post(server.url + "/users/wav", content=body, headers=headers, timeout=300).status_code

        with ThreadPoolExecutor(3) as pool:
            statuses = list(pool.map(flood, range(3)))
        growth_mib = (server.proc_status("VmHWM") - before) / 1024
        assert statuses == [422] * 3
        assert growth_mib < 20, growth_mib


@st.composite
def wavs_with_tags(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A WAV with tag chunks (`id3 `, bext, `cue `, LIST/adtl), each whole, damaged (bytes changed, cut short) or
    noise, before and after its audio; and that audio."""

    def payload() -> tuple[bytes, bytes]:
        kind = draw(st.sampled_from([b"id3 ", b"ID3 ", b"bext", b"cue ", b"LIST"]))
        version = draw(st.sampled_from([2, 3, 4]))
        whole = {
            b"id3 ": id3v24(TITLE_FRAME, frame_bytes(mutagen.id3.APIC(encoding=3, data=jpeg_ish(draw(st.integers(4, 300_000)))))),
            b"ID3 ": id3_chunk(mutagen.id3.TDRC(encoding=3, text=["2024-05-01"]), version=min(version + 1, 4))[8:],
            b"bext": bext_chunk(b"d" * draw(st.integers(0, 300)), b"o", b"2024-05-01", b"13:45:10")[8:],
            b"cue ": cue_chunk({n: draw(st.integers(0, 20000)) for n in range(draw(st.integers(0, 50)))})[8:],
            b"LIST": labels_list({n: "é" * draw(st.integers(0, 700)) for n in range(draw(st.integers(0, 50)))})[8:],
        }[kind]
        how = draw(st.sampled_from(["whole", "changed", "cut", "noise"]))
        if how == "changed":
            damaged = bytearray(whole)
            for _ in range(draw(st.integers(1, 8))):
                damaged[draw(st.integers(0, len(damaged) - 1))] = draw(st.integers(0, 255))
            whole = bytes(damaged)
        elif how == "cut":
            whole = whole[: draw(st.integers(0, len(whole)))]
        elif how == "noise":
            whole = draw(st.binary(max_size=3000))
        return kind, whole

    def chunks() -> bytes:
        return b"".join(riff_chunk(*payload()) for _ in range(draw(st.integers(0, 4))))

    audio = encode_samples(sine(0.05, 16000, 2), "pcm", 16)
    wav = b"RIFF\x00\x00\x00\x00WAVE" + chunks() + fmt_chunk(1, 2, 16000, 16) + chunks() + riff_chunk(b"data", audio) + chunks()
    return wav, audio


@hypothesis.given(wav_and_audio=wavs_with_tags(), piece=st.integers(1, 70000), version=st.sampled_from([3, 4]))
@hypothesis.settings(max_examples=FUZZ_EXAMPLES * 3, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
def test_wav_reader_keeps_tags_within_their_bounds_and_any_makes_a_tag(wav_and_audio: tuple[bytes, bytes], piece: int, version: int) -> None:
    wav, audio = wav_and_audio
    parser = wav2mp3.WavParser()
    received = b""
    for offset in range(0, len(wav), piece):
        received += bytes(parser.feed(wav[offset : offset + piece]))
        tags = parser.tags
        assert len(parser._pending) <= wav2mp3.MAX_ID3_FRAME + 10  # the piece being read: at most an ID3 frame and its header
        assert tags.id3 is None or tags.id3.size == sum(map(len, tags.id3.frames)) <= wav2mp3.MAX_ID3_BYTES
        assert len(tags.bext) <= wav2mp3.BEXT_BYTES and len(tags.cues) <= wav2mp3.MAX_MARKERS >= len(tags.labels)
        assert all(len(label) <= wav2mp3.MAX_INFO_TEXT for label in tags.labels.values())
    assert received == audio
    parser.close()
    tag = wav2mp3.id3_tag(wav2mp3.mp3_tag(parser.tags, len(audio) // 4, 16000), version, b"after")
    assert tag.endswith(b"after")
    if len(tag) > len(b"after"):
        assert mutagen.id3.ID3(io.BytesIO(tag)).version == (2, version, 0)


def pictures_wav(where: str, pictures_mb: int = 50) -> Iterator[bytes]:
    """A WAV whose `id3 ` chunk holds `pictures_mb` MB of pictures, streamed: a title, then pictures of 2 MB (over the
    bound of a frame) and of 0.7 MB (five fit in the bound of the tag) in turn, then an artist; 2 s of audio."""
    small = frame_bytes(mutagen.id3.APIC(encoding=3, mime="image/jpeg", desc="small", data=jpeg_ish(700_000)))
    large = frame_bytes(mutagen.id3.APIC(encoding=3, mime="image/jpeg", desc="large", data=jpeg_ish(2_000_000)))
    count = pictures_mb * 1_000_000 // (len(small) + len(large))
    assert count < 100  # each picture's description (its key: APIC:sma07...) is made unique below, in place: 5 bytes
    first = frame_bytes(mutagen.id3.TIT2(encoding=3, text=["fifty megabytes of art"]))
    last = frame_bytes(mutagen.id3.TPE1(encoding=3, text=["after"]))
    frames_size = len(first) + count * (len(small) + len(large)) + len(last)
    chunk_head = b"id3 " + struct.pack("<L", 10 + frames_size) + b"ID3\x04\x00\x00" + syncsafe(frames_size)
    audio = riff_chunk(b"data", encode_samples(sine(2.0, 44100, 2), "pcm", 16))
    yield b"RIFF\xff\xff\xff\xffWAVE" + fmt_chunk(1, 2, 44100, 16) + (audio if where == "after" else b"")
    yield chunk_head + first
    for n in range(count):
        yield large.replace(b"large", b"lar%02d" % n, 1)
        yield small.replace(b"small", b"sma%02d" % n, 1)
    yield last + (b"\x00" if frames_size % 2 else b"") + (audio if where == "before" else b"")


@pytest.mark.xdist_group("machine")
@pytest.mark.parametrize("where", ["before", "after"])
def test_live_an_id3_chunk_of_50_mb_of_pictures_converts_in_flat_memory(tmp_path: Path, database_url: str, where: str) -> None:
    """The pictures over the bounds stream past: the server's peak RSS grows by less than 20 MB, and the MP3's tag
    holds the title, the pictures that fit in 4 MiB and the artist after them."""
    with LiveServer(tmp_path, database_url) as server:
        user = server.new_user()
        assert httpx.post(server.url + "/users/wav", **upload_form(user, make_wav(2.0, 44100, 2), "warm.wav"), timeout=60).status_code == 201
        server.reset_peak_memory()
        before = server.proc_status("VmHWM")
        body, headers = streamed_upload(user, pictures_wav(where), "art.wav")
        response = httpx.post(server.url + "/users/wav", content=body, headers=headers, timeout=300)
        growth_mib = (server.proc_status("VmHWM") - before) / 1024
        assert response.status_code == 201, response.text
        mp3 = httpx.get(response.json()["url"], timeout=60).content
    print(f"RSS growth with a 50 MB ID3 chunk {where} the audio: {growth_mib:.1f} MiB")
    assert growth_mib < 20, growth_mib
    tag = mutagen.id3.ID3(io.BytesIO(mp3))
    assert sorted(frame.desc for frame in tag.getall("APIC")) == ["sma00", "sma01", "sma02", "sma03", "sma04"]
    assert str(tag["TIT2"]) == "fifty megabytes of art" and str(tag["TPE1"]) == "after"
    assert id3_size(mp3) < wav2mp3.MAX_ID3_BYTES and response.json()["title"] == "fifty megabytes of art"


# Temporary disk: a budget every temporary file draws from, and a full disk answered 503.


@contextlib.contextmanager
def small_tmpfs(mebibytes: int) -> Iterator[Path]:
    """A real file system of that size (tmpfs), for TMPDIR: CI runs as root and can mount one."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    directory = Path(tempfile.mkdtemp(prefix="wav2mp3-tmpfs-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mebibytes}m", "tmpfs", str(directory)], capture_output=True).returncode:
        directory.rmdir()
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)
        directory.rmdir()


def used_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def readme_curl_order(user: dict[str, str], wav: bytes, filename: str, **after: str) -> tuple[bytes, dict[str, str]]:
    """data, then the file, then the options: the order of the README's curl example."""
    options = [form_part(name, value.encode()) for name, value in after.items()]
    return multipart(form_part("data", credentials(user)), form_part("audio_file", wav, filename), *options)


@pytest.mark.slow
@pytest.mark.parametrize(
    "wav_mb, late_bitrate, args",
    [(6, True, ()), (16, False, ()), (30, False, ("--temp-disk-mb", "16"))],
    ids=["late-bitrate-6-mb", "no-options-16-mb", "disk-full-before-the-budget"],
)
def test_live_full_temporary_disk_is_503_leaves_nothing_and_the_next_upload_works(
    tmp_path: Path, database_url: str, wav_mb: int, late_bitrate: bool, args: tuple[str, ...]
) -> None:
    """TMPDIR on a real 2 MiB tmpfs: the budget (half of it by default) or the disk itself (ENOSPC) runs out: by the
    audio kept for a late option (6 MB), by an MP3 (16 MB of WAV make 1.5 MB), or by an MP3 within a budget larger
    than the disk (30 MB of WAV make 2.7 MB)."""
    with small_tmpfs(2) as tmpfs, LiveServer(tmp_path, database_url, *args, tmp=tmpfs) as server:
        user = server.new_user()
        before = asyncio.run(table_counts(server.database_url))
        wav = b"".join(long_wav(wav_mb * 1e6 / 176400))
        if late_bitrate:
            body, headers = readme_curl_order(user, wav, "big.wav", bitrate="64")
        else:
            body, headers = multipart(form_part("data", credentials(user)), form_part("audio_file", wav, "big.wav"))
        response = httpx.post(server.url + "/users/wav", content=body, headers=headers, timeout=300)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == str(wav2mp3.RETRY_AFTER_SECONDS)
        assert "temporary disk" in response.json()["error"]
        assert asyncio.run(table_counts(server.database_url)) == before
        assert server.temp_files() == [] and list(tmpfs.iterdir()) == [] and used_bytes(tmpfs) < 64 * 1024
        body, headers = readme_curl_order(user, make_wav(5.0, 44100, 2), "small.wav", bitrate="64")
        response = httpx.post(server.url + "/users/wav", content=body, headers=headers, timeout=60)
        assert response.status_code == 201, response.text
        assert metric(httpx.get(server.url + "/metrics").text, "wav2mp3_temp_disk_bytes") == 0


async def test_uploads_beyond_the_temporary_disk_budget_are_503_and_leave_nothing(database_url: str) -> None:
    async with running_app(database_url, temp_disk_mb=1) as client:
        user = await new_user(client)
        before = await table_counts(database_url)
        response = await upload(client, user, make_wav(90.0, 44100, 2), "long.wav")  # a 1.4 MB MP3
        assert response.status_code == 503 and response.headers["retry-after"] == str(wav2mp3.RETRY_AFTER_SECONDS)
        assert await table_counts(database_url) == before
        body, headers = readme_curl_order(user, make_wav(10.0, 44100, 2), "late.wav", bitrate="64")  # 1.7 MB of audio to keep
        late = await client.post("/users/wav", content=body, headers=headers)
        assert late.status_code == 503 and "send the options before audio_file" in late.json()["error"]
        assert metric((await client.get("/metrics")).text, "wav2mp3_temp_disk_bytes") == 0
        body, headers = readme_curl_order(user, make_wav(3.0, 44100, 2), "short.wav", bitrate="64")
        created = await client.post("/users/wav", content=body, headers=headers)
        assert created.status_code == 201
        mp3 = (await client.get(record_path(created.json()["url"]))).content
        assert mutagen.mp3.MP3(io.BytesIO(mp3)).info.bitrate == 64000


# Logs: a download link (id and user) is a capability; the log never holds one.


def test_live_logs_never_hold_a_records_id_and_its_user_together(tmp_path: Path, database_url: str) -> None:
    with LiveServer(tmp_path, database_url) as server:
        user = server.new_user()
        created = httpx.post(server.url + "/users/wav", **upload_form(user, make_wav(1.0)), timeout=60).json()
        assert httpx.get(server.url + record_path(created["url"])).status_code == 200
        assert httpx.get(server.url + record_path(created["url"]), headers={"Range": b"bytes=0-\xb2"}).status_code == 416
        record_id, user_id = created["record_id"], user["user_id"]
        for disguised in (
            f"/record%3Fid={record_id}%26user={user_id}",
            f"/record?id%3D{record_id}%26user%3D{user_id}",
            f"/record?{record_id}&{user_id.replace('-', '').upper()}",
        ):
            assert httpx.get(server.url + disguised).status_code in (404, 422)
        assert httpx.delete(server.url + record_path(created["url"]), headers=bearer(user)).status_code == 204
        server.wait_for_log('"DELETE /record?id=…&user=… HTTP/1.1" 204')
    lines = server.log.read_text().splitlines()
    assert any('"GET /record?id=…&user=… HTTP/1.1" 200' in line for line in lines)
    ids = {created["record_id"], user["user_id"]}
    assert not [line for line in lines if len({id for id in ids if id in line or id.replace("-", "") in line.lower()}) == 2]


def test_live_log_lines_carry_no_control_characters_a_client_sent(tmp_path: Path) -> None:
    """A path, a query's names or a file name with CR, LF or ESC in it is logged with those written as escapes:
    no forged line, no terminal colours (on e37ff88 each of these wrote a second, forged line)."""
    forged = "2026-12-07 15:00:00,000 INFO wav2mp3: converted record=forged"
    with LiveServer(tmp_path, f"sqlite:///{tmp_path / 'log.db'}") as server:
        user = server.new_user()
        for target in (
            f"/x%0A{quote(forged)}",
            f"/x%250A{quote(forged)}",
            f"/x%0D%0A{quote(forged)}",
            "/x%1B[31mred",
            f"/health?a%0A{quote(forged)}=1",
        ):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:  # as sent, not as a client library would tidy it
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                assert sock.recv(65536).startswith(b"HTTP/1.1 ")
        body, headers = multipart(form_part("data", credentials(user)), form_part("audio_file", b"not a wav", f"x\n{forged}.wav"))
        assert httpx.post(server.url + "/users/wav", content=body, headers=headers).status_code in (415, 422)
        server.wait_for_log("red")
    log = server.log.read_text()
    assert "\x1b" not in log and "\r" not in log
    assert not [line for line in log.splitlines() if line.startswith(forged)]
    assert "\\x1b[31mred" in log and "\\n" + forged in log  # written as escapes, still readable


# SQLite's one writer: a request waits for its turn at most DB_TIMEOUT.


async def test_writes_waiting_for_sqlites_writer_are_503_after_db_timeout(database_url: str) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite only: PostgreSQL takes concurrent writers")
    app, lifespan = await start_app(database_url, db_timeout=0.5)
    try:
        async with asgi_client(app) as client:
            owner = await new_user(client)
            created = (await upload(client, owner, make_wav(0.5))).json()
            store = app.state.services.store
            holding, release = asyncio.Event(), asyncio.Event()

            async def long_write() -> None:  # as a large record's transaction would hold it
                async with store.writing():
                    holding.set()
                    await release.wait()

            writer = asyncio.create_task(long_write())
            await asyncio.wait_for(holding.wait(), 10)
            calls = [
                client.post("/users", json={"name": unique_name()}),
                client.delete(record_path(created["url"]), headers=bearer(owner)),
                client.post(f"/users/{owner['user_id']}/token", headers=bearer(owner)),
            ]
            started = time.monotonic()
            async with asyncio.timeout(30):  # before the fix they waited for the writer as long as it wrote
                responses = await asyncio.gather(*calls)
            waited = time.monotonic() - started
            release.set()
            await writer
            assert [r.status_code for r in responses] == [503, 503, 503], [r.text for r in responses]
            assert responses[0].json() == {"error": "database busy: try again shortly"} and responses[0].headers["retry-after"] == "1"
            assert waited < 5
            assert (await client.post("/users", json={"name": unique_name()})).status_code == 201
            assert (await client.delete(record_path(created["url"]), headers=bearer(owner))).status_code == 204
    finally:
        await lifespan.__aexit__(None, None, None)


async def test_a_write_held_up_by_another_process_is_503_database_busy(database_url: str) -> None:
    """Another process (a backup, a migration, sqlite3 at a shell) holds SQLite's writer: SQLite's own busy
    timeout ends the wait, and that is 'busy' (Retry-After), not an outage; nothing is half-written."""
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite only: one writer across processes")
    async with running_app(database_url, db_timeout=0.5) as client:
        owner = await new_user(client)
        with sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None) as other:
            other.execute("BEGIN IMMEDIATE")
            name = unique_name()
            refused = await client.post("/users", json={"name": name})
            other.execute("ROLLBACK")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert refused.json() == {"error": "database busy: try again shortly"}
        assert (await client.post("/users", json={"name": name})).status_code == 201
        assert (await upload(client, owner, make_wav(0.2))).status_code == 201


async def cut_off_download(app: Any, url: str, after: int) -> int:
    """A GET of `url` as uvicorn hands it to the app (ASGI 2.3: the app listens for the disconnect), whose client
    leaves once `after` bytes of the body have been sent: the app goes on to read the next chunks as it leaves."""
    path, query = record_path(url).split("?")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "", "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    left, asked, sent = asyncio.Event(), False, 0

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal sent
        sent += len(message.get("body", b""))
        if sent >= after:
            left.set()

    await app(scope, receive, send)
    return sent


async def test_downloads_cut_off_mid_read_leave_no_read_snapshot_behind(database_url: str, app: Any, client: httpx.AsyncClient) -> None:
    """A download whose client leaves while its next chunks are being read: the read is finished and its cursor
    closed. Abandoned, aiosqlite's thread keeps the cursor until that connection's next statement, its read
    snapshot with it, and SQLite cannot checkpoint the WAL past it: an idle pool connection kept it for good."""
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite's write-ahead log")
    user = await new_user(client)
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, size=(44100 * 30, 2))
    record = (await upload(client, user, make_wav(30.0, 44100, 2, signal=noise), bitrate="320")).json()
    assert record["size_bytes"] > 1_100_000  # more than one batch of chunks
    with sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None) as other:
        other.execute("CREATE TABLE scratch (x)")
        for _ in range(3):
            assert await cut_off_download(app, record["url"], wav2mp3.CHUNK_BYTES * wav2mp3.CHUNKS_PER_QUERY) < record["size_bytes"]
            await asyncio.sleep(0.3)  # the abandoned read ends
            other.execute("INSERT INTO scratch VALUES (1)")
            busy, log, done = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            assert (busy, done) == (0, log), "a read snapshot is still held"
    assert len((await client.get(record_path(record["url"]))).content) == record["size_bytes"]


async def test_a_users_mp3s_download_as_one_zip_streamed_with_unique_names(client: httpx.AsyncClient) -> None:
    """GET /users/{id}/records.zip with the Bearer header: every record, stored (MP3 does not compress) under its MP3's
    name, a name met again in another case made unique; each entry the bytes its own link gives."""
    user, other = await new_user(client), await new_user(client)
    bodies = [(await upload(client, user, make_wav(seconds), name)).json() for seconds, name in ((1.0, "a.wav"), (2.0, "A.WAV"), (1.5, "b c.wav"))]
    await upload(client, other, make_wav(1.0), "theirs.wav")
    answer = await client.get(f"/users/{user['user_id']}/records.zip", headers=bearer(user))
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    assert answer.headers["content-disposition"].startswith('attachment; filename="wav2mp3-')
    archive = zipfile.ZipFile(io.BytesIO(answer.content))
    assert archive.testzip() is None
    entries = {info.filename: info for info in archive.infolist()}
    assert set(entries) == {"a.mp3", "A (2).mp3", "b c.mp3"} or set(entries) == {"A.mp3", "a (2).mp3", "b c.mp3"}
    assert all(info.compress_type == zipfile.ZIP_STORED for info in entries.values())
    mp3s = {(await client.get(record_path(body["url"]))).content for body in bodies}
    assert {archive.read(name) for name in entries} == mp3s
    assert (await client.get(f"/users/{user['user_id']}/records.zip")).status_code == 401
    assert (await client.get(f"/users/{user['user_id']}/records.zip", headers=bearer(other))).status_code == 403
    empty = await client.get(f"/users/{(await new_user(client))['user_id']}/records.zip", headers=bearer(await new_user(client)))
    assert empty.status_code == 403


async def test_a_zip_link_opens_exactly_its_records_until_it_expires_or_the_token_changes(client: httpx.AsyncClient) -> None:
    """A browser cannot send a Bearer header: POST makes a link (no token in it, signed for these records and a
    time) that a plain GET opens; a changed, expired or revoked link is 403."""
    user = await new_user(client)
    bodies = [(await upload(client, user, make_wav(1.0), f"{name}.wav")).json() for name in ("one", "two", "three")]
    chosen = [bodies[0]["record_id"], bodies[2]["record_id"]]
    made = await client.post(f"/users/{user['user_id']}/records.zip", json={"records": chosen}, headers=bearer(user))
    assert made.status_code == 201 and user["access_token"] not in made.json()["url"]
    link = made.json()["url"]
    opened = await client.get(link)
    assert opened.status_code == 200
    assert sorted(zipfile.ZipFile(io.BytesIO(opened.content)).namelist()) == ["one.mp3", "three.mp3"]
    everything = await client.post(f"/users/{user['user_id']}/records.zip", headers=bearer(user))
    assert sorted(zipfile.ZipFile(io.BytesIO((await client.get(everything.json()["url"])).content)).namelist()) == ["one.mp3", "three.mp3", "two.mp3"]
    widened = link.replace("records=" + quote(",".join(chosen), safe=""), "records=" + quote(",".join([*chosen, bodies[1]["record_id"]]), safe=""))
    assert widened != link and (await client.get(widened)).status_code == 403
    key = hashlib.sha256(user["access_token"].encode()).hexdigest().encode()
    past = int(time.time()) - 1
    signature = hmac.new(key, f"records.zip {user['user_id']} {','.join(chosen)} {past}".encode(), hashlib.sha256).hexdigest()
    expired = await client.get(f"/users/{user['user_id']}/records.zip", params={"records": ",".join(chosen), "expires": past, "signature": signature})
    assert expired.status_code == 403 and "expired" in expired.json()["error"]
    for bad in ({"records": ["nope"]}, {"records": "all"}, {"records": [str(uuid.uuid4())] * 2}, {"records": [str(uuid.uuid4())] * 101}):
        assert (await client.post(f"/users/{user['user_id']}/records.zip", json=bad, headers=bearer(user))).status_code == 422, bad
    missing = await client.post(f"/users/{user['user_id']}/records.zip", json={"records": [str(uuid.uuid4())]}, headers=bearer(user))
    assert missing.status_code == 404
    await client.post(f"/users/{user['user_id']}/token", headers=bearer(user))  # a new token voids every link
    assert (await client.get(link)).status_code == 403


async def test_a_zip_selection_is_what_it_names_an_empty_one_and_a_joined_id_are_422(client: httpx.AsyncClient) -> None:
    """All of them is said by leaving `records` out; [] (or `records=`) is refused rather than read as all, and each
    item of the list is one id: "a,b" is no id, where it was read as two (the review made a link to both with it)."""
    user = await new_user(client)
    one, two = [(await upload(client, user, make_wav(0.3), f"{name}.wav")).json()["record_id"] for name in ("one", "two")]
    path = f"/users/{user['user_id']}/records.zip"
    empty = await client.post(path, json={"records": []}, headers=bearer(user))
    joined = await client.post(path, json={"records": [f"{one},{two}"]}, headers=bearer(user))
    for refused in (empty, joined):
        assert refused.status_code == 422
        assert refused.json()["error"] == "records must be a list of 1 to 100 record ids, each once (leave it out for all of them)"
    nothing = await client.get(path, params={"records": ""}, headers=bearer(user))
    twice = await client.get(path, params=[("records", one), ("records", two)], headers=bearer(user))  # read as the last, on 50afe45
    for refused in (nothing, twice):
        assert refused.status_code == 422
        assert refused.json()["error"] == "records must be 1 to 100 record ids, each once, comma-separated (leave it out for all of them)"
    everything = await client.post(path, json={"records": None}, headers=bearer(user))
    assert everything.status_code == 201 and "records=" not in everything.json()["url"]
    opened = zipfile.ZipFile(io.BytesIO((await client.get(everything.json()["url"])).content))
    assert sorted(opened.namelist()) == ["one.mp3", "two.mp3"]


# Resumable uploads (tus 1.0.0) ###################################################


OCTETS = {"Content_Type": "application/offset+octet-stream"}  # a tus PATCH's body


def tus(user: dict[str, str], **headers: str) -> dict[str, str]:
    """A tus request's headers: the Bearer token and Tus-Resumable, and more (Upload_Offset= for Upload-Offset)."""
    return {"Authorization": f"Bearer {user['access_token']}", "Tus-Resumable": "1.0.0", **{k.replace("_", "-"): v for k, v in headers.items()}}


def tus_metadata(**values: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in values.items())


async def tus_create(client: httpx.AsyncClient, user: dict[str, str], length: int, filename: str = "call.wav", **options: str) -> str:
    """A new resumable upload's URL."""
    response = await client.post(
        f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Length=str(length), Upload_Metadata=tus_metadata(filename=filename, **options))
    )
    assert response.status_code == 201, response.text
    assert response.headers["tus-resumable"] == "1.0.0"
    return response.headers["location"]


async def tus_patch(client: httpx.AsyncClient, user: dict[str, str], url: str, offset: int, data: bytes, **headers: str) -> httpx.Response:
    return await client.patch(url, content=data, headers=tus(user, Upload_Offset=str(offset), **OCTETS, **headers))


async def tus_upload(
    client: httpx.AsyncClient, user: dict[str, str], wav: bytes, pieces: int = 3, filename: str = "call.wav", **options: str
) -> dict[str, Any]:
    """A WAV uploaded through tus in `pieces` PATCHes; the record, as GET of the upload URL answers it."""
    url = await tus_create(client, user, len(wav), filename, **options)
    cuts = [len(wav) * i // pieces for i in range(pieces + 1)]
    for start, end in itertools.pairwise(cuts):
        response = await tus_patch(client, user, url, start, wav[start:end])
        assert response.status_code == 204, response.text
        assert response.headers["upload-offset"] == str(end)
    record = await client.get(url, headers=bearer(user))
    assert record.status_code == 200, record.text
    return record.json()  # type: ignore[no-any-return]


async def test_tus_options_name_the_version_extensions_size_and_checksums(client: httpx.AsyncClient) -> None:
    response = await client.options(f"/users/{uuid.uuid4()}/uploads")
    assert response.status_code == 204
    assert response.headers["tus-resumable"] == response.headers["tus-version"] == "1.0.0"
    assert set(response.headers["tus-extension"].split(",")) == {
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "termination",
        "expiration",
        "checksum",
        "concatenation",
    }
    assert response.headers["tus-max-size"] == str(wav2mp3.Settings().max_upload_bytes)
    assert "sha1" in response.headers["tus-checksum-algorithm"].split(",")


@pytest.mark.parametrize("options", [{}, {"bitrate": "64", "channels": "1"}, {"vbr_quality": "2"}], ids=["defaults", "cbr-64-mono", "vbr-2"])
async def test_tus_upload_in_pieces_gives_the_mp3_post_gives(client: httpx.AsyncClient, database_url: str, options: dict[str, str]) -> None:
    user = await new_user(client)
    wav = make_wav(7.0, 44100, 2, signal=music(7.0, 44100, 2), before_data=info_list(INAM="Résumé"))
    record = await tus_upload(client, user, wav, 4, "resumed.wav", **options)
    posted = (await upload(client, user, wav, "posted.wav", **options)).json()
    assert record["sha256"] == posted["sha256"] and record["size_bytes"] == posted["size_bytes"]
    assert (record["filename"], record["duration_seconds"]) == ("resumed.mp3", pytest.approx(7.0))
    mp3 = (await client.get(record_path(record["url"]))).content
    assert hashlib.sha256(mp3).hexdigest() == record["sha256"]
    listed = (await client.get(f"/users/{user['user_id']}/records", headers=bearer(user))).json()["records"]
    assert {r["record_id"] for r in listed} == {record["record_id"], posted["record_id"]}
    await wait_for_purge(database_url)  # the stored WAV bytes go once the record is stored


async def wait_for_purge(database_url: str) -> None:
    deadline = time.monotonic() + 20
    while (await db_rows(database_url, "SELECT count(*) FROM upload_chunks WHERE upload_id NOT IN (SELECT id FROM uploads WHERE record_id IS NULL)"))[
        0
    ][0]:
        assert time.monotonic() < deadline, "the bytes of finished or ended uploads were not deleted"
        await asyncio.sleep(0.1)


async def test_tus_creation_with_upload_stores_the_first_piece(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    wav = make_wav(3.0, 44100, 2)
    headers = tus(user, Upload_Length=str(len(wav)), Upload_Metadata=tus_metadata(filename="first.wav"), **OCTETS)
    created = await client.post(f"/users/{user['user_id']}/uploads", content=wav[:100_000], headers=headers)
    assert created.status_code == 201 and created.headers["upload-offset"] == "100000"
    url = created.headers["location"]
    assert (await client.head(url, headers=tus(user))).headers["upload-offset"] == "100000"
    assert (await tus_patch(client, user, url, 100_000, wav[100_000:])).status_code == 204
    whole = await client.post(
        f"/users/{user['user_id']}/uploads", content=wav, headers={**headers, "Upload-Metadata": tus_metadata(filename="whole.wav")}
    )
    assert whole.status_code == 201 and whole.headers["upload-offset"] == str(len(wav))  # the whole file in the POST: done
    first, second = [(await client.get(u, headers=bearer(user))).json() for u in (url, whole.headers["location"])]
    assert first["sha256"] == second["sha256"]


@pytest.mark.parametrize("method", ["POST", "HEAD", "PATCH", "DELETE"])
async def test_tus_requests_without_tus_resumable_are_412_with_tus_version(client: httpx.AsyncClient, method: str) -> None:
    user = await new_user(client)
    url = await tus_create(client, user, 1000)
    target = f"/users/{user['user_id']}/uploads" if method == "POST" else url
    response = await client.request(method, target, headers={"Authorization": f"Bearer {user['access_token']}", "Tus-Resumable": "0.2.2"})
    assert response.status_code == 412 and response.headers["tus-version"] == "1.0.0"
    assert method == "HEAD" or list(response.json()) == ["error"]


CREATION_REFUSALS = {
    "no-length": (400, {"Upload-Metadata": tus_metadata(filename="a.wav")}, "Upload-Length"),
    "deferred-length-not-1": (400, {"Upload-Defer-Length": "2", "Upload-Metadata": tus_metadata(filename="a.wav")}, "Upload-Defer-Length: 1"),
    "length-and-deferred": (400, {"Upload-Length": "9", "Upload-Defer-Length": "1", "Upload-Metadata": tus_metadata(filename="a.wav")}, "either"),
    "length-not-a-number": (400, {"Upload-Length": "-5", "Upload-Metadata": tus_metadata(filename="a.wav")}, "Upload-Length"),
    "length-over-the-limit": (413, {"Upload-Length": str(2 * wav2mp3.MIB), "Upload-Metadata": tus_metadata(filename="a.wav")}, "1 MiB"),
    "empty-file": (422, {"Upload-Length": "0", "Upload-Metadata": tus_metadata(filename="a.wav")}, "the file is empty (its length is 0 bytes)"),
    "no-metadata": (422, {"Upload-Length": "1000"}, "filename"),
    "no-filename": (422, {"Upload-Length": "1000", "Upload-Metadata": tus_metadata(filetype="audio/wav")}, "filename"),
    "not-base64": (422, {"Upload-Length": "1000", "Upload-Metadata": "filename a.wav"}, "base64"),
    "repeated-key": (
        422,
        {"Upload-Length": "1000", "Upload-Metadata": tus_metadata(filename="a.wav") + "," + tus_metadata(filename="b.wav")},
        "once",
    ),
    "bad-bitrate": (422, {"Upload-Length": "1000", "Upload-Metadata": tus_metadata(filename="a.wav", bitrate="100")}, "bitrate"),
    "cbr-and-vbr": (422, {"Upload-Length": "1000", "Upload-Metadata": tus_metadata(filename="a.wav", bitrate="64", vbr_quality="2")}, "exclude"),
    "empty-filename": (422, {"Upload-Length": "1000", "Upload-Metadata": tus_metadata(filename="dir/")}, "empty file name"),
    "first-piece-not-offset-octet-stream": (
        415,
        {"Upload-Length": "1000", "Upload-Metadata": tus_metadata(filename="a.wav"), "Content-Type": "audio/wav", "Content-Length": "4"},
        "application/offset+octet-stream",
    ),
}


@pytest.mark.parametrize("case", list(CREATION_REFUSALS))
async def test_tus_creation_refusals_are_4xx_and_create_nothing(database_url: str, case: str) -> None:
    status, headers, message = CREATION_REFUSALS[case]
    async with running_app(database_url, max_upload_mb=1) as client:
        user = await new_user(client)
        before = await db_rows(database_url, "SELECT count(*) FROM uploads")
        body = b"RIFF" if "Content-Length" in headers else b""
        response = await client.post(f"/users/{user['user_id']}/uploads", content=body, headers={**tus(user), **headers})
        assert response.status_code == status, response.text
        assert message in response.json()["error"] and response.headers["tus-resumable"] == "1.0.0"
        assert await db_rows(database_url, "SELECT count(*) FROM uploads") == before


@pytest.mark.parametrize("declared", [0xFFFFFFFF, 0])
async def test_a_recording_of_unknown_length_converts_as_it_arrives(database_url: str, declared: int) -> None:
    """creation-defer-length: a recorder uploads while it records, its WAV header's data size 0 or 0xFFFFFFFF, and
    gives the length with its last PATCH (or an empty one after it). The MP3 is the one a POST of the file makes. On
    e37ff88 the creation was 400."""
    async with running_app(database_url) as client:
        user = await new_user(client)
        audio = make_wav(6.0, 44100, 2)[44:]
        wav = wav_header(44100, 2, 0)[:-4] + struct.pack("<L", declared) + audio
        created = await client.post(
            f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Defer_Length="1", Upload_Metadata=tus_metadata(filename="call.wav"))
        )
        assert created.status_code == 201, created.text
        url = created.headers["location"]
        cuts = [0, 100_000, 600_000, len(wav) - 1000]
        for start, end in itertools.pairwise(cuts):
            assert (await tus_patch(client, user, url, start, wav[start:end])).status_code == 204
            state = await client.head(url, headers=tus(user))
            assert state.headers["upload-offset"] == str(end) and state.headers["upload-defer-length"] == "1" and "upload-length" not in state.headers
        options = await client.options(f"/users/{user['user_id']}/uploads")
        assert "creation-defer-length" in options.headers["tus-extension"].split(",")
        if declared:  # the last piece tells the length
            last = await tus_patch(client, user, url, cuts[-1], wav[cuts[-1] :], Upload_Length=str(len(wav)))
        else:  # the length in an empty PATCH of its own
            assert (await tus_patch(client, user, url, cuts[-1], wav[cuts[-1] :])).status_code == 204
            last = await tus_patch(client, user, url, len(wav), b"", Upload_Length=str(len(wav)))
        assert last.status_code == 204 and last.headers["upload-offset"] == str(len(wav)), last.text
        record = (await client.get(url, headers=bearer(user))).json()
        mp3 = (await client.get(record_path(record["url"]))).content
        posted = await upload(client, await new_user(client), wav, "call.wav")
        assert posted.status_code == 201 and posted.json()["sha256"] == hashlib.sha256(mp3).hexdigest() == record["sha256"]
        head = await client.head(url, headers=tus(user))
        assert head.headers["upload-length"] == str(len(wav))


async def test_an_upload_of_unknown_length_keeps_within_the_bounds_a_declared_one_meets(database_url: str) -> None:
    """Its bytes count as declared: a deferred upload cannot hold more than the user's quota (or MAX_UNFINISHED_MB)
    leaves; a length given later meets the same checks as one given at creation, and once given it stays."""
    async with running_app(database_url, user_quota_mb=0.25) as client:  # 262,144 bytes
        user = await new_user(client)
        wav = make_wav(3.0, 44100, 2)  # 529 KB
        created = await client.post(
            f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Defer_Length="1", Upload_Metadata=tus_metadata(filename="big.wav"))
        )
        url = created.headers["location"]
        assert (await tus_patch(client, user, url, 0, wav[:200_000])).status_code == 204
        over = await tus_patch(client, user, url, 200_000, wav[200_000:300_000])
        assert over.status_code == 413, over.text
        assert (await client.head(url, headers=tus(user))).headers["upload-offset"] == "200000"
        too_long = await tus_patch(client, user, url, 200_000, b"", Upload_Length=str(len(wav)))
        assert too_long.status_code == 413 and "quota" in too_long.json()["error"]
        fits = await tus_patch(client, user, url, 200_000, b"", Upload_Length="250000")
        assert fits.status_code == 204 and (await client.head(url, headers=tus(user))).headers["upload-length"] == "250000"
        changed = await tus_patch(client, user, url, 200_000, b"", Upload_Length="240000")
        assert changed.status_code == 400 and "250000" in changed.json()["error"]


async def test_an_upload_of_unknown_length_past_its_room_is_413_naming_the_bound_it_meets(database_url: str) -> None:
    """A deferred upload has no Upload-Length: a piece past what it may still take names MAX_UPLOAD_MB or MAX_UNFINISHED_MB
    (whichever is nearer), whether Content-Length tells it first or a chunked body shows it. They said Upload-Length, or
    the request body's limit."""

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        yield data

    async with running_app(database_url, max_upload_mb=1, max_unfinished_mb=2) as client:
        user = await new_user(client)
        deferred = tus(user, Upload_Defer_Length="1", Upload_Metadata=tus_metadata(filename="live.wav"))
        url = (await client.post(f"/users/{user['user_id']}/uploads", headers=deferred)).headers["location"]
        wav = make_wav(8.0, 44100, 2)  # 1.4 MB
        assert (await tus_patch(client, user, url, 0, wav[:100_000])).status_code == 204
        declared = await tus_patch(client, user, url, 100_000, wav[100_000:])
        assert declared.status_code == 413 and declared.json()["error"] == f"more bytes than MAX_UPLOAD_MB leaves: {wav2mp3.MIB - 100_000} to go"
        streamed = await client.patch(url, content=chunked(wav[100_000:]), headers=tus(user, Upload_Offset="100000", **OCTETS))
        assert streamed.status_code == 413 and streamed.json()["error"] == f"more bytes than MAX_UPLOAD_MB leaves: {wav2mp3.MIB - 100_000} to go"
        offset = int((await client.head(url, headers=tus(user))).headers["upload-offset"])
        assert offset == wav2mp3.MIB  # the bytes up to the bound are kept
        other = tus(user, Upload_Length=str(900_000), Upload_Metadata=tus_metadata(filename="other.wav"))
        assert (await client.post(f"/users/{user['user_id']}/uploads", headers=other)).status_code == 201
        second = await client.post(f"/users/{user['user_id']}/uploads", headers={**deferred, "Upload-Metadata": tus_metadata(filename="b.wav")})
        room = 2 * wav2mp3.MIB - wav2mp3.MIB - 900_000
        shared = await tus_patch(client, user, second.headers["location"], 0, wav[: room + 1])
        assert shared.status_code == 413 and shared.json()["error"] == f"more bytes than MAX_UNFINISHED_MB leaves: {room} to go"


async def tus_partial(client: httpx.AsyncClient, user: dict[str, str], piece: bytes, **headers: str) -> str:
    """A partial upload (tus concatenation) holding `piece`, as tus-js-client's parallelUploads makes one."""
    created = await client.post(
        f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Concat="partial", Upload_Length=str(len(piece)), **headers)
    )
    assert created.status_code == 201, created.text
    return created.headers["location"]


async def test_parallel_pieces_become_one_mp3_the_same_as_a_posts(database_url: str) -> None:
    """tus concatenation (tus-js-client's and Uppy's parallelUploads): partial uploads hold bytes only, with or without
    metadata, sent in any order, the first not even a whole WAV header; the final upload names them in order and is
    converted as one WAV, complete at once. On e37ff88 the partials were 422 ("needs a filename"), or taken for whole
    files, and the final 400."""
    async with running_app(database_url) as client:
        user = await new_user(client)
        wav = make_wav(8.0, 44100, 2)
        cuts = [0, 30, len(wav) // 2, len(wav) * 3 // 4, len(wav)]  # the first piece ends inside the header
        urls = []
        for number, (start, end) in enumerate(itertools.pairwise(cuts)):
            metadata = {"Upload_Metadata": tus_metadata(filename="call.wav")} if number % 2 else {}  # metadataForPartialUploads or not
            urls.append(await tus_partial(client, user, wav[start:end], **metadata))
        for url, start, end in reversed(list(zip(urls, cuts, cuts[1:], strict=False))):  # the last piece first
            assert (await tus_patch(client, user, url, 0, wav[start:end])).status_code == 204
        state = await client.head(urls[0], headers=tus(user))
        assert state.headers["upload-concat"] == "partial" and state.headers["upload-offset"] == "30"
        assert (await client.get(urls[0], headers=bearer(user))).status_code == 409  # bytes only: no record of its own
        final = await client.post(
            f"/users/{user['user_id']}/uploads",
            headers=tus(user, Upload_Concat="final;" + " ".join(urls), Upload_Metadata=tus_metadata(filename="call.wav", bitrate="96")),
        )
        assert final.status_code == 201, final.text
        assert final.headers["upload-offset"] == str(len(wav))
        record = (await client.get(final.headers["location"], headers=bearer(user))).json()
        posted = await upload(client, await new_user(client), wav, "call.wav", bitrate="96")
        assert record["sha256"] == posted.json()["sha256"] and record["filename"] == "call.mp3"
        head = await client.head(final.headers["location"], headers=tus(user))
        assert head.headers["upload-offset"] == head.headers["upload-length"] == str(len(wav))
        for url in urls:  # the partial uploads are spent
            assert (await client.head(url, headers=tus(user))).status_code == 404
        assert "concatenation" in (await client.options(f"/users/{user['user_id']}/uploads")).headers["tus-extension"].split(",")


async def test_a_parallel_upload_near_the_quota_fits_as_the_same_file_does(database_url: str) -> None:
    """The pieces' declared bytes give way to the MP3 in the record's transaction: a file that fits as one upload
    fits as pieces too (the review saw 413: the pieces were counted beside the MP3 that replaces them). And two
    final uploads naming one piece at once make one record, not two."""
    async with running_app(database_url, user_quota_mb=2.7) as client:
        user = await new_user(client)
        wav = make_wav(15.0, 44100, 2)  # 2.65 MB, its MP3 240 KB
        half = len(wav) // 2
        first, second = await tus_partial(client, user, wav[:half]), await tus_partial(client, user, wav[half:])
        assert (await tus_patch(client, user, first, 0, wav[:half])).status_code == 204
        assert (await tus_patch(client, user, second, 0, wav[half:])).status_code == 204

        async def final(name: str) -> httpx.Response:
            headers = tus(user, Upload_Concat=f"final;{first} {second}", Upload_Metadata=tus_metadata(filename=name))
            return await client.post(f"/users/{user['user_id']}/uploads", headers=headers)

        answers = await asyncio.gather(final("one.wav"), final("two.wav"))
        assert sorted(answer.status_code for answer in answers) == [201, 404], [answer.text for answer in answers]
        usage = await usage_of(client, user)
        assert (usage["records"], usage["unfinished_uploads"]) == (1, 0)


async def test_a_final_upload_is_refused_before_anything_is_stored_when_its_pieces_are_not_right(database_url: str) -> None:
    async with running_app(database_url) as client:
        user, other = await new_user(client), await new_user(client)
        wav = make_wav(2.0, 44100, 2)
        half = len(wav) // 2
        first, second = await tus_partial(client, user, wav[:half]), await tus_partial(client, user, wav[half:])
        assert (await tus_patch(client, user, first, 0, wav[:half])).status_code == 204

        async def final(*urls: str, filename: str = "call.wav", who: dict[str, str] = user) -> httpx.Response:
            return await client.post(
                f"/users/{who['user_id']}/uploads",
                headers=tus(who, Upload_Concat="final;" + " ".join(urls), Upload_Metadata=tus_metadata(filename=filename)),
            )

        unfinished = await final(first, second)
        assert unfinished.status_code == 400 and "finish it first" in unfinished.json()["error"]
        assert (await final(first, first)).status_code == 400  # each once
        assert (await final()).status_code == 400
        stranger = await final(first, who=other)  # another user's partial upload is none
        assert stranger.status_code == 404
        whole = await tus_create(client, user, len(wav), "whole.wav")
        assert (await final(first, whole)).status_code == 404  # not a partial upload
        assert (await tus_patch(client, user, second, 0, wav[half:])).status_code == 204
        assert (await upload(client, user, make_wav(1.0), "taken.wav")).status_code == 201
        taken = await final(first, second, filename="taken.wav")
        assert taken.status_code == 422 and "record" in taken.json()["error"]  # not 409: tus clients retry that
        garbage = await client.post(f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Concat="whole", Upload_Length="10"))
        assert garbage.status_code == 400
        done = await final(first, second)
        assert done.status_code == 201, done.text
        names = await db_rows(database_url, "SELECT filename FROM records WHERE user_id = $1 ORDER BY filename", user["user_id"])
        assert names == [("call.wav",), ("taken.wav",)]


async def test_a_final_upload_with_a_body_is_400_and_its_pieces_stay(database_url: str) -> None:
    """A final upload's bytes are its partial uploads' (tus concatenation: its length is their sum, a PATCH of it is
    403): bytes sent with it are a client's mistake, 400 saying so, not the 413 of a body over a limit of 0 bytes."""
    async with running_app(database_url) as client:
        user = await new_user(client)
        wav = make_wav(1.0)
        half = len(wav) // 2
        first, second = await tus_partial(client, user, wav[:half]), await tus_partial(client, user, wav[half:])
        assert (await tus_patch(client, user, first, 0, wav[:half])).status_code == 204
        assert (await tus_patch(client, user, second, 0, wav[half:])).status_code == 204
        final = {"Upload_Concat": f"final;{first} {second}", "Upload_Metadata": tus_metadata(filename="call.wav")}
        with_body = await client.post(f"/users/{user['user_id']}/uploads", content=wav[:100], headers=tus(user, **final, **OCTETS))
        assert with_body.status_code == 400 and with_body.json()["error"] == (
            "a final upload (Upload-Concat: final) has no bytes of its own, only its partial uploads': send it without a body"
        )

        async def chunked(*pieces: bytes) -> AsyncIterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
            for piece in pieces:
                yield piece

        chunked_body = await client.post(f"/users/{user['user_id']}/uploads", content=chunked(wav[:100]), headers=tus(user, **final, **OCTETS))
        assert chunked_body.status_code == 400 and "send it without a body" in chunked_body.json()["error"]
        assert (await client.head(first, headers=tus(user))).status_code == 200  # nothing spent
        # A chunked body of no chunk holds no byte (some clients always send chunked): the final upload is made.
        done = await client.post(f"/users/{user['user_id']}/uploads", content=chunked(), headers=tus(user, **final))
        assert done.status_code == 201, done.text
        assert (await client.head(done.headers["location"], headers=tus(user))).headers["upload-offset"] == str(len(wav))


async def test_a_user_lists_its_unfinished_uploads_to_go_on_with_them(client: httpx.AsyncClient) -> None:
    """After a reload or on another device: each unfinished upload with its name, length, offset, options and expiry,
    newest first; finished, terminated and other users' uploads are not among them."""
    user, other = await new_user(client), await new_user(client)
    wav = make_wav(2.0, 44100, 2)
    older = await tus_create(client, user, len(wav), "older.wav", bitrate="96")
    assert (await tus_patch(client, user, older, 0, wav[:100_000])).status_code == 204
    deferred = await client.post(
        f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Defer_Length="1", Upload_Metadata=tus_metadata(filename="live.wav"))
    )
    done = await tus_create(client, user, len(wav), "done.wav")
    assert (await tus_patch(client, user, done, 0, wav)).status_code == 204
    gone = await tus_create(client, user, len(wav), "gone.wav")
    assert (await client.delete(gone, headers=tus(user))).status_code == 204
    await tus_create(client, other, len(wav), "theirs.wav")
    listed = await client.get(f"/users/{user['user_id']}/uploads", headers=bearer(user))
    assert listed.status_code == 200 and listed.headers["cache-control"] == "no-store"
    uploads = listed.json()["uploads"]
    assert [(u["filename"], u["length"], u["offset"], u["options"]) for u in uploads] == [
        ("live.wav", None, 0, {}),
        ("older.wav", len(wav), 100_000, {"bitrate": 96}),
    ]
    assert uploads[0]["url"] == deferred.headers["location"] and uploads[1]["url"] == older
    assert uploads[1]["expires"] > uploads[1]["created"]
    assert (await client.get(f"/users/{user['user_id']}/uploads")).status_code == 401
    assert (await client.get(f"/users/{user['user_id']}/uploads", headers=bearer(other))).status_code == 403


async def test_tus_creation_reserves_the_name_until_completion_termination_or_expiry(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    wav = make_wav(1.0)
    first = await tus_create(client, user, len(wav), "take.wav")
    held = await client.post(
        f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Length="10", Upload_Metadata=tus_metadata(filename="take.wav"))
    )
    assert held.status_code == 422 and "unfinished upload" in held.json()["error"]  # not 409: tus clients retry that
    posted = await upload(client, user, wav, "take.wav")
    assert posted.status_code == 409 and "unfinished upload" in posted.json()["error"]
    assert (await client.delete(first, headers=tus(user))).status_code == 204  # termination frees it
    second = await tus_create(client, user, len(wav), "take.wav")
    assert (await tus_patch(client, user, second, 0, wav)).status_code == 204  # completion moves it to the record
    again = await client.post(
        f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Length="10", Upload_Metadata=tus_metadata(filename="take.wav"))
    )
    assert again.status_code == 422 and "record" in again.json()["error"]
    other = await new_user(client)
    assert await tus_create(client, other, len(wav), "take.wav")  # names are per user


async def test_tus_head_reports_the_stored_offset_length_and_expiry(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    url = await tus_create(client, user, 50_000)
    assert (await tus_patch(client, user, url, 0, make_wav(1.0)[:12_345])).status_code == 204
    response = await client.head(url, headers=tus(user))
    assert response.status_code == 200 and response.content == b""
    assert (response.headers["upload-offset"], response.headers["upload-length"]) == ("12345", "50000")
    assert response.headers["cache-control"] == "no-store" and response.headers["tus-resumable"] == "1.0.0"
    assert response.headers["upload-metadata"] == tus_metadata(filename="call.wav")
    assert (await client.options(url)).headers["tus-version"] == "1.0.0"
    expires = datetime.strptime(response.headers["upload-expires"], "%a, %d %b %Y %H:%M:%S GMT").replace(tzinfo=UTC)
    assert timedelta(hours=23.9) < expires - datetime.now(UTC) <= timedelta(hours=24)


async def test_tus_patch_refusals_change_nothing(client: httpx.AsyncClient, database_url: str) -> None:
    user, stranger = await new_user(client), await new_user(client)
    wav = make_wav(2.0, 44100, 2)
    url = await tus_create(client, user, len(wav))
    assert (await tus_patch(client, user, url, 0, wav[:50_000])).status_code == 204
    cases = [
        (415, await client.patch(url, content=wav[50_000:60_000], headers=tus(user, Upload_Offset="50000", Content_Type="audio/wav"))),
        (409, await tus_patch(client, user, url, 40_000, wav[40_000:60_000])),
        (409, await tus_patch(client, user, url, 60_000, wav[60_000:70_000])),
        (413, await tus_patch(client, user, url, 50_000, wav[50_000:] + b"x")),
        (400, await client.patch(url, content=b"x", headers=tus(user, **OCTETS))),
        (400, await tus_patch(client, user, url, 50_000, wav[50_000:60_000], Upload_Checksum="crc32 AAAA")),
        (400, await tus_patch(client, user, url, 50_000, wav[50_000:60_000], Upload_Checksum="sha1 not-base64")),
        (460, await tus_patch(client, user, url, 50_000, wav[50_000:60_000], Upload_Checksum="sha1 " + sha1_b64(wav[50_001:60_001]))),
        (404, await tus_patch(client, user, url.rsplit("/", 1)[0] + f"/{uuid.uuid4()}", 50_000, wav[50_000:60_000])),
        (
            403,
            await client.patch(
                url, content=b"x", headers={**tus(stranger, Upload_Offset="50000"), "Content-Type": "application/offset+octet-stream"}
            ),
        ),
        (401, await client.patch(url, content=b"x", headers={"Tus-Resumable": "1.0.0", "Upload-Offset": "50000"})),
    ]
    for status, response in cases:
        assert response.status_code == status, (status, response.text)
        assert list(response.json()) == ["error"]
    assert cases[1][1].headers["upload-offset"] == "50000"  # where to go on from
    assert (await client.head(url, headers=tus(user))).headers["upload-offset"] == "50000"
    assert (await db_rows(database_url, "SELECT sum(length(data)) FROM upload_chunks WHERE upload_id = $1", url.rsplit("/", 1)[1]))[0][0] == 50_000
    done = await tus_patch(client, user, url, 50_000, wav[50_000:], Upload_Checksum="sha1 " + sha1_b64(wav[50_000:]))
    assert (
        done.status_code == 204
        and (await client.get(url, headers=bearer(user))).json()["sha256"] == (await upload(client, user, wav, "p.wav")).json()["sha256"]
    )


def sha1_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha1(data).digest()).decode()


BAD_WAVS = {  # a WAV refused at its first bytes, and one refused at its last (its data chunk cut short)
    "not-wav": (b"ID3\x04" + bytes(5000), 415),
    "zero-channels": (patch(make_wav(0.5), 22, struct.pack("<H", 0)), 422),
    "truncated": (make_wav(3.0, 44100, 2)[:400_000], 422),
}


@pytest.mark.parametrize("case", list(BAD_WAVS))
async def test_tus_bad_wav_is_refused_and_ends_the_upload(client: httpx.AsyncClient, database_url: str, case: str) -> None:
    wav, status = BAD_WAVS[case]
    user = await new_user(client)
    url = await tus_create(client, user, len(wav), "bad.wav")
    half = len(wav) // 2
    first = await tus_patch(client, user, url, 0, wav[:half])
    response = first if first.status_code != 204 else await tus_patch(client, user, url, half, wav[half:])
    assert response.status_code == status and list(response.json()) == ["error"]
    assert (await client.head(url, headers=tus(user))).status_code == 404
    assert await tus_create(client, user, 100, "bad.wav")  # the name is free again
    await wait_for_purge(database_url)  # the truncated one had its first half stored: gone too
    assert (await db_rows(database_url, "SELECT count(*) FROM upload_chunks WHERE upload_id = $1", url.rsplit("/", 1)[1]))[0][0] == 0


async def test_tus_get_is_409_with_the_offset_before_completion_and_the_record_after(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    wav = make_wav(1.0)
    url = await tus_create(client, user, len(wav))
    assert (await tus_patch(client, user, url, 0, wav[:1000])).status_code == 204
    early = await client.get(url, headers=bearer(user))
    assert early.status_code == 409 and early.headers["upload-offset"] == "1000" and list(early.json()) == ["error"]
    assert (await tus_patch(client, user, url, 1000, wav[1000:])).status_code == 204
    record = (await client.get(url, headers=bearer(user))).json()
    assert set(record) == {"url", "record_id", "user_id", "filename", "title", "duration_seconds", "size_bytes", "sha256"}
    repeated = await tus_patch(client, user, url, len(wav), b"")  # the last PATCH again: done already
    assert repeated.status_code == 204 and repeated.headers["upload-offset"] == str(len(wav))
    assert (await client.delete(record_path(record["url"]), headers=bearer(user))).status_code == 204
    assert (await client.get(url, headers=bearer(user))).status_code == 404


async def test_tus_termination_deletes_the_bytes_and_frees_the_name(client: httpx.AsyncClient, database_url: str) -> None:
    user = await new_user(client)
    url = await tus_create(client, user, 400_000, "end.wav")
    assert (await tus_patch(client, user, url, 0, make_wav(2.0, 44100, 2)[:300_000])).status_code == 204
    assert (await client.delete(url, headers=tus(user))).status_code == 204
    for method in ("HEAD", "PATCH", "DELETE", "GET"):
        response = await client.request(method, url, headers=tus(user, Upload_Offset="300000", **OCTETS))
        assert response.status_code == 404, method
    await wait_for_purge(database_url)
    assert (await db_rows(database_url, "SELECT count(*) FROM upload_chunks WHERE upload_id = $1", url.rsplit("/", 1)[1]))[0][0] == 0
    assert await tus_create(client, user, 100, "end.wav")


async def test_tus_two_patches_at_once_one_wins_and_no_byte_is_lost_or_doubled(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    wav = make_wav(3.0, 44100, 2)
    url = await tus_create(client, user, len(wav))
    go_on = asyncio.Event()

    async def slow_piece() -> AsyncIterator[bytes]:
        yield wav[:100_000]
        await go_on.wait()
        yield wav[100_000:200_000]

    headers = tus(user, Upload_Offset="0", **OCTETS, Content_Length="200000")
    first = asyncio.create_task(client.patch(url, content=slow_piece(), headers=headers))
    await asyncio.sleep(0.3)
    second = await tus_patch(client, user, url, 0, wav[:200_000])
    assert second.status_code == 409 and "another request" in second.json()["error"] and second.headers["upload-offset"] == "0"
    go_on.set()
    assert (await first).status_code == 204
    assert (await tus_patch(client, user, url, 200_000, wav[200_000:])).status_code == 204
    assert (await client.get(url, headers=bearer(user))).json()["sha256"] == (await upload(client, user, wav, "twice.wav")).json()["sha256"]


@pytest.mark.parametrize("when", ["mid-patch", "last-patch"])
async def test_tus_termination_while_a_patch_runs_ends_it_cleanly(database_url: str, when: str) -> None:
    """tus-js-client's abort(true) and Uppy's cancel: DELETE while a PATCH is sending. The DELETE is 204, the PATCH
    ends with a 404 (never a 500), nothing is stored, and every byte of the audio buffer comes back."""
    async with running_app(database_url, db_timeout=2.0) as client:
        user = await new_user(client)
        wav = make_wav(4.0, 44100, 2)
        url = await tus_create(client, user, len(wav))
        go_on = asyncio.Event()
        start = 0 if when == "mid-patch" else len(wav) - 200_000
        if start:
            assert (await tus_patch(client, user, url, 0, wav[:start])).status_code == 204

        async def piece() -> AsyncIterator[bytes]:
            yield wav[start : start + 100_000]
            await go_on.wait()
            yield wav[start + 100_000 :]

        headers = tus(user, Upload_Offset=str(start), Content_Length=str(len(wav) - start), **OCTETS)
        patching = asyncio.create_task(client.patch(url, content=piece(), headers=headers))
        await asyncio.sleep(0.3)
        assert (await client.delete(url, headers=tus(user))).status_code == 204
        go_on.set()
        ended = await patching
        assert ended.status_code == 404 and list(ended.json()) == ["error"], ended.text
        assert (await client.head(url, headers=tus(user))).status_code == 404
        assert (await client.get(f"/users/{user['user_id']}/records", headers=bearer(user))).json()["records"] == []
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "wav2mp3_audio_buffered_bytes") == 0 and metric(metrics, "wav2mp3_resumable_uploads_live") == 0
        assert await tus_create(client, user, len(wav))  # and uploads go on
        await wait_for_purge(database_url)


@pytest.mark.parametrize("case", ["checksum-mismatch", "more-than-declared"])
async def test_tus_creation_with_a_refused_first_piece_still_gives_the_upload(client: httpx.AsyncClient, case: str) -> None:
    """creation-with-upload: once the upload exists, a refused first piece still answers 201 with its Location and
    the offset stored, so that the client goes on with it (a retried POST would find the name held)."""
    user = await new_user(client)
    wav = make_wav(2.0, 44100, 2)
    headers = tus(user, Upload_Length=str(len(wav)), Upload_Metadata=tus_metadata(filename="first.wav"), **OCTETS)
    if case == "checksum-mismatch":  # the piece is dropped whole
        headers["Upload-Checksum"] = "sha1 " + sha1_b64(b"something else")
        created, kept = await client.post(f"/users/{user['user_id']}/uploads", content=wav[:100_000], headers=headers), 0
    else:  # no Content-Length: more bytes than the file has, found as they come; the file's own bytes are kept

        async def too_long() -> AsyncIterator[bytes]:
            yield wav[:100_000]
            yield wav[100_000:] + bytes(100_000)  # the excess comes in the same chunk as the file's last bytes

        created, kept = await client.post(f"/users/{user['user_id']}/uploads", content=too_long(), headers=headers), len(wav)
    assert created.status_code == 201, created.text
    assert created.headers["upload-offset"] == str(kept)
    url = created.headers["location"]
    assert (await client.head(url, headers=tus(user))).headers["upload-offset"] == str(kept)
    if kept < len(wav):
        assert (await tus_patch(client, user, url, kept, wav[kept:])).status_code == 204
    assert (await client.get(url, headers=bearer(user))).json()["sha256"] == (await upload(client, user, wav, "direct.wav")).json()["sha256"]


def test_byte_budget_waiter_cancelled_as_its_turn_comes_hands_it_on() -> None:
    """A download waiting for read-ahead budget whose client leaves (its task cancelled) just as give() hands it
    the bytes: they go on to the next waiter, and no ValueError escapes the cancellation."""

    async def run() -> None:
        budget = wav2mp3.ByteBudget(100, wav2mp3.BUFFERED_DOWNLOADS)
        assert budget.try_take(100)
        first = asyncio.create_task(budget.take(60))
        second = asyncio.create_task(budget.take(60))
        await asyncio.sleep(0)
        first.cancel()
        budget.give(100)  # pops `first` (cancelled, or granted as it is cancelled), then hands on
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 1)
        budget.give(60)
        assert budget.used == 0 and not budget._waiters

    asyncio.run(run())


async def test_tus_uploads_expire_with_their_bytes_and_free_the_name(database_url: str) -> None:
    app, lifespan = await start_app(database_url, upload_expiry_hours=1.5 / 3600)
    try:
        async with asgi_client(app) as client:
            user = await new_user(client)
            url = await tus_create(client, user, 200_000, "late.wav")
            assert (await tus_patch(client, user, url, 0, make_wav(2.0)[:100_000])).status_code == 204
            before = metric((await client.get("/metrics")).text, "wav2mp3_resumable_uploads_total", event="expired")
            await asyncio.sleep(2)
            assert (await client.head(url, headers=tus(user))).status_code == 404
            assert await tus_create(client, user, 100, "late.wav")  # its name is free once it expires, before the sweep
            await app.state.services.resumable.expire()  # what the storage sweep does every minute
            expired_here = metric((await client.get("/metrics")).text, "wav2mp3_resumable_uploads_total", event="expired") - before
            # On PostgreSQL the worker's other servers (the module's live server) share the database, and their sweeps
            # may delete it first, as another replica's would: harmless. SQLite's file is this test's own.
            assert expired_here == 1 or (expired_here == 0 and not database_url.startswith("sqlite"))
            assert (await db_rows(database_url, "SELECT count(*) FROM uploads WHERE id = $1", url.rsplit("/", 1)[1]))[0][0] == 0
            await wait_for_purge(database_url)
    finally:
        await lifespan.__aexit__(None, None, None)


async def assert_stored_as_a_post_would(client: httpx.AsyncClient, user: dict[str, str], url: str, wav: bytes) -> None:
    """HEAD is 423 until the upload's record is stored, then 200 at Upload-Length; the MP3 is the one a POST makes."""
    deadline = time.monotonic() + 20
    while (done := await client.head(url, headers=tus(user))).status_code == 423:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    assert done.status_code == 200 and done.headers["upload-offset"] == str(len(wav))
    record = (await client.get(url, headers=bearer(user))).json()
    assert record["sha256"] == (await upload(client, user, wav, "same.wav")).json()["sha256"]


async def test_tus_record_that_cannot_be_stored_is_503_then_423_then_done(database_url: str) -> None:
    """The last PATCH's bytes are stored but its record cannot be (a migration holds the records table): 503 with
    Retry-After; HEAD answers 423 while that lasts, and stores the record in the background. That PATCH repeated
    meanwhile (no body) waits for the HEAD's turn and finds the upload complete: 204 at Upload-Length (it was 404:
    the turn it waited for was a session's that completing had ended). Then HEAD is 200 at Upload-Length."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL: a lock on one table (SQLite's writer lock would stop the bytes too)")
    async with running_app(database_url, db_timeout=5.0) as client:
        user = await new_user(client)
        wav = make_wav(2.0, 44100, 2)
        url = await tus_create(client, user, len(wav))
        assert (await tus_patch(client, user, url, 0, wav[:-1000])).status_code == 204
        migration = await asyncpg.connect(database_url)
        transaction = migration.transaction()
        await transaction.start()
        await migration.execute("LOCK TABLE records IN ACCESS EXCLUSIVE MODE")
        try:
            last = await tus_patch(client, user, url, len(wav) - 1000, wav[-1000:])
            assert last.status_code == 503 and int(last.headers["retry-after"]) > 0
            waiting = await client.head(url, headers=tus(user))  # its record is being stored, and still locked out
            assert waiting.status_code == 423 and int(waiting.headers["retry-after"]) > 0
            repeated = asyncio.ensure_future(tus_patch(client, user, url, len(wav), b""))
            await asyncio.sleep(0.2)  # the PATCH waits for the turn (a second at most) that the HEAD's storing holds
        finally:
            await transaction.rollback()
            await migration.close()
        answer = await repeated
        assert answer.status_code == 204 and answer.headers["upload-offset"] == str(len(wav)), answer.text
        await assert_stored_as_a_post_would(client, user, url, wav)


async def test_tus_disk_full_at_the_last_piece_is_503_then_the_whole_mp3(app: Any) -> None:
    """The temporary disk runs out while the last PATCH's audio is encoded: 503 with Retry-After, its bytes stored.
    Once there is room again, HEAD stores the record, converted anew from the stored bytes: the whole MP3, the same
    as a POST's (it was short of the block that failed, and then failed for good)."""
    disk = app.state.services.encoders.disk
    async with asgi_client(app) as client:
        user = await new_user(client)
        wav = make_wav(20.0, 44100, 2)
        url = await tus_create(client, user, len(wav))
        assert (await tus_patch(client, user, url, 0, wav[:-100_000])).status_code == 204
        limit, disk.limit = disk.limit, disk.used  # the MP3 being made (320 KB, on disk) cannot grow
        last = await tus_patch(client, user, url, len(wav) - 100_000, wav[-100_000:])
        assert last.status_code == 503 and int(last.headers["retry-after"]) > 0, last.text
        disk.limit = limit
        await assert_stored_as_a_post_would(client, user, url, wav)


async def test_tus_post_with_x_http_method_override_patches_and_deletes(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    wav = make_wav(1.0)
    url = await tus_create(client, user, len(wav))
    headers = tus(user, Upload_Offset="0", **OCTETS, X_HTTP_Method_Override="PATCH")
    assert (await client.post(url, content=wav[:5000], headers=headers)).status_code == 204
    assert (await client.post(url, headers=tus(user, X_HTTP_Method_Override="DELETE"))).status_code == 204
    assert (await client.post(url, headers=tus(user, X_HTTP_Method_Override="PUT"))).status_code == 405


async def test_tus_old_token_stops_and_the_new_one_goes_on(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    wav = make_wav(1.0)
    url = await tus_create(client, user, len(wav))
    assert (await tus_patch(client, user, url, 0, wav[:5000])).status_code == 204
    renewed = {**user, **(await client.post(f"/users/{user['user_id']}/token", headers=bearer(user))).json()}
    assert (await tus_patch(client, user, url, 5000, wav[5000:])).status_code == 403
    assert (await tus_patch(client, renewed, url, 5000, wav[5000:])).status_code == 204


async def test_tus_cors_lets_a_browser_client_send_and_read_the_tus_headers(database_url: str) -> None:
    async with running_app(database_url, cors_origins="https://app.example.com") as client:
        preflight = await client.options(
            f"/users/{uuid.uuid4()}/uploads/{uuid.uuid4()}",
            headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "PATCH",
                     "Access-Control-Request-Headers": "authorization, tus-resumable, upload-offset, upload-checksum, content-type"},
        )  # fmt: skip
        assert preflight.status_code == 200 and "PATCH" in preflight.headers["access-control-allow-methods"]
        user = await new_user(client)
        created = await client.post(
            f"/users/{user['user_id']}/uploads",
            headers={**tus(user, Upload_Length="100", Upload_Metadata=tus_metadata(filename="x.wav")), "Origin": "https://app.example.com"},
        )
        exposed = {h.strip().lower() for h in created.headers["access-control-expose-headers"].split(",")}
        assert {"location", "upload-offset", "upload-length", "upload-expires", "tus-resumable", "tus-version", "tus-max-size"} <= exposed


async def test_tus_metrics_count_uploads_and_their_bytes(client: httpx.AsyncClient) -> None:
    before = (await client.get("/metrics")).text
    user = await new_user(client)
    wav = make_wav(1.0)
    await tus_upload(client, user, wav, 2)
    after = (await client.get("/metrics")).text
    for event, count in (("created", 1), ("completed", 1)):
        assert metric(after, "wav2mp3_resumable_uploads_total", event=event) - metric(before, "wav2mp3_resumable_uploads_total", event=event) == count
    assert metric(after, "wav2mp3_upload_bytes_total", protocol="tus") - metric(before, "wav2mp3_upload_bytes_total", protocol="tus") == len(wav)
    assert metric(after, "wav2mp3_resumable_uploads_live") == 0


def test_live_tuspy_uploads_in_chunks_with_checksums(live: LiveServer) -> None:
    """tuspy, a real tus client, unchanged: creation, PATCHes with sha1 checksums, and the same MP3 as a POST."""
    user = live.new_user()
    wav = make_wav(30.0, 44100, 2, signal=music(30.0, 44100, 2))
    tus_client = tusclient.client.TusClient(
        f"{live.url}/users/{user['user_id']}/uploads", headers={"Authorization": f"Bearer {user['access_token']}"}
    )
    uploader = tus_client.uploader(
        file_stream=io.BytesIO(wav), chunk_size=1_000_000, metadata={"filename": "tuspy.wav", "bitrate": "192"}, upload_checksum=True
    )
    uploader.upload()
    record = httpx.get(uploader.url, headers=bearer(user)).json()
    posted = httpx.post(live.url + "/users/wav", **upload_form(user, wav, "posted.wav", bitrate="192"), timeout=60).json()
    assert record["sha256"] == posted["sha256"]


def raw_patch(live: LiveServer, user: dict[str, str], url: str, offset: int, declared: int) -> bytes:
    path = url.split(str(live.port), 1)[1]
    return (
        f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {user['access_token']}\r\nTus-Resumable: 1.0.0\r\n"
        f"Upload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()


def live_tus_create(live: LiveServer, user: dict[str, str], length: int, filename: str) -> str:
    response = httpx.post(
        f"{live.url}/users/{user['user_id']}/uploads", headers=tus(user, Upload_Length=str(length), Upload_Metadata=tus_metadata(filename=filename))
    )
    assert response.status_code == 201, response.text
    return response.headers["location"]


def live_offset(user: dict[str, str], url: str) -> int:
    response = httpx.head(url, headers=tus(user), timeout=30)
    assert response.status_code == 200, response.headers
    return int(response.headers["upload-offset"])


def test_live_tus_connection_cut_mid_patch_keeps_what_arrived(live: LiveServer) -> None:
    user = live.new_user()
    wav = make_wav(20.0, 44100, 2)
    url = live_tus_create(live, user, len(wav), "cut.wav")
    sent = 1_234_567
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(raw_patch(live, user, url, 0, len(wav)) + wav[:sent])
        time.sleep(0.5)  # the bytes reach the server; then the connection breaks
    assert live_offset(user, url) == sent  # at once: a HEAD waits for the request that is still storing them
    response = httpx.patch(url, content=wav[sent:], headers=tus(user, Upload_Offset=str(sent), **OCTETS))
    assert response.status_code == 204, response.text
    posted = httpx.post(live.url + "/users/wav", **upload_form(user, wav, "whole.wav"), timeout=60).json()
    assert httpx.get(url, headers=bearer(user)).json()["sha256"] == posted["sha256"]


def test_live_tus_dripping_patch_is_cut_off_and_keeps_its_bytes(tmp_path: Path, database_url: str) -> None:
    with LiveServer(tmp_path, database_url, "--min-rate-window", "2", "--min-upload-rate", "1024") as server:
        user = server.new_user()
        wav = make_wav(5.0, 44100, 2)
        url = live_tus_create(server, user, len(wav), "drip.wav")
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(raw_patch(server, user, url, 0, len(wav)) + wav[:100_000])
            answer, started = b"", time.monotonic()
            sock.settimeout(0.4)
            while not answer and time.monotonic() - started < 15:
                with contextlib.suppress(OSError):
                    sock.sendall(b"\x00")
                with contextlib.suppress(TimeoutError):
                    answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        offset = live_offset(user, url)
        assert 100_000 < offset <= 100_100  # the audio and the drips (zero bytes) that arrived
        response = httpx.patch(url, content=wav[offset:], headers=tus(user, Upload_Offset=str(offset), **OCTETS))
        assert response.status_code == 204, response.text


def test_live_tus_goes_on_after_a_sigkill_and_in_another_process(tmp_path: Path, database_url: str) -> None:
    """Half an upload, the server killed (SIGKILL), a new one on the same database goes on from the stored
    bytes (re-encoding them), and the MP3 is the one a POST gives."""
    user_wav = make_wav(60.0, 44100, 2, signal=music(60.0, 44100, 2))
    first = LiveServer(tmp_path / "first", database_url)  # killed below: no `with`
    try:
        user = first.new_user()
        url = live_tus_create(first, user, len(user_wav), "killed.wav")
        half = len(user_wav) // 2
        assert httpx.patch(url, content=user_wav[:half], headers=tus(user, Upload_Offset="0", **OCTETS)).status_code == 204
    finally:
        first.process.kill()
        first.process.wait()
    with LiveServer(tmp_path / "second", database_url) as second:
        url = url.replace(str(first.port), str(second.port))
        assert live_offset(user, url) == half
        response = httpx.patch(url, content=user_wav[half:], headers=tus(user, Upload_Offset=str(half), **OCTETS), timeout=120)
        assert response.status_code == 204, response.text
        record = httpx.get(url, headers=bearer(user)).json()
        posted = httpx.post(second.url + "/users/wav", **upload_form(user, user_wav, "posted.wav"), timeout=60).json()
        assert record["sha256"] == posted["sha256"]
        assert metric(httpx.get(second.url + "/metrics").text, "wav2mp3_resumable_uploads_total", event="resumed") == 1


def test_live_tus_paused_uploads_keep_few_live_sessions(live: LiveServer) -> None:
    user = live.new_user()
    wav = make_wav(2.0, 44100, 2)
    resumed = metric(httpx.get(live.url + "/metrics").text, "wav2mp3_resumable_uploads_total", event="resumed")
    urls = [live_tus_create(live, user, len(wav), f"paused{i}.wav") for i in range(wav2mp3.MAX_PAUSED_UPLOADS + 8)]
    for url in urls:
        assert httpx.patch(url, content=wav[:300_000], headers=tus(user, Upload_Offset="0", **OCTETS)).status_code == 204
    metrics = httpx.get(live.url + "/metrics").text
    assert metric(metrics, "wav2mp3_resumable_uploads_live") == wav2mp3.MAX_PAUSED_UPLOADS
    # the least recent let its session go: going on re-encodes its stored bytes, and gives the same MP3
    response = httpx.patch(urls[0], content=wav[300_000:], headers=tus(user, Upload_Offset="300000", **OCTETS))
    assert response.status_code == 204, response.text
    assert metric(httpx.get(live.url + "/metrics").text, "wav2mp3_resumable_uploads_total", event="resumed") == resumed + 1
    posted = httpx.post(live.url + "/users/wav", **upload_form(user, wav, "posted.wav"), timeout=60).json()
    assert httpx.get(urls[0], headers=bearer(user)).json()["sha256"] == posted["sha256"]


# The IETF draft on the same URLs #################################################
# draft-ietf-httpbis-resumable-upload: a request with Upload-Draft-Interop-Version and no Tus-Resumable. Versions 5
# (draft -03, tus-js-client's protocol 'ietf-draft-03'), 6 (-04, -05: 'ietf-draft-05'), 7 (-06 to -08) and 8 (-09 on).

DRAFTS = [5, 6, 7, 8]
PARTIAL = {"Content_Type": "application/partial-upload"}  # an append's body from draft -04 (version 6) on
PROBLEMS = "https://iana.org/assignments/http-problem-types#"


def draft(user: dict[str, str], version: int, **headers: str) -> dict[str, str]:
    """A request of the draft's headers: the Bearer token, Upload-Draft-Interop-Version, and more (Upload_Complete="?1")."""
    named = {key.replace("_", "-"): value for key, value in headers.items()}
    return {"Authorization": f"Bearer {user['access_token']}", "Upload-Draft-Interop-Version": str(version), **named}


async def draft_create(client: httpx.AsyncClient, user: dict[str, str], version: int, body: bytes = b"", **headers: str) -> httpx.Response:
    return await client.post(f"/users/{user['user_id']}/uploads", content=body, headers=draft(user, version, **headers))


async def draft_append(
    client: httpx.AsyncClient, user: dict[str, str], version: int, url: str, offset: int, data: bytes, last: bool, **headers: str
) -> httpx.Response:
    complete = "?1" if last else "?0"
    return await client.patch(
        url, content=data, headers=draft(user, version, Upload_Offset=str(offset), Upload_Complete=complete, **PARTIAL, **headers)
    )


async def posted_sha256(client: httpx.AsyncClient, wav: bytes, **options: str) -> str:
    """The sha256 of the MP3 a POST /users/wav of another user makes of `wav`."""
    posted = await upload(client, await new_user(client), wav, "posted.wav", **options)
    assert posted.status_code == 201, posted.text
    return posted.json()["sha256"]  # type: ignore[no-any-return]


def assert_goes_on(response: httpx.Response, version: int, offset: int, status: int) -> None:
    """An answer of the draft to a creation or an append that leaves the upload incomplete."""
    assert response.status_code == status, response.text
    assert (response.headers["upload-offset"], response.headers["upload-complete"]) == (str(offset), "?0")
    assert response.headers["upload-draft-interop-version"] == str(version) and "tus-resumable" not in response.headers
    limit = {5: None, 6: "expires", 7: "max-age", 8: "max-age"}[version]  # Upload-Limit came with draft -04; `expires` was renamed
    if limit is None:
        assert "upload-limit" not in response.headers
    else:
        assert re.fullmatch(rf"max-size={wav2mp3.Settings().max_upload_bytes}, {limit}=(\d+)", response.headers["upload-limit"])
        assert 23 * 3600 < int(response.headers["upload-limit"].rsplit("=", 1)[1]) <= 24 * 3600


@pytest.mark.parametrize("version", DRAFTS)
@pytest.mark.parametrize("length_told", [True, False], ids=["upload-length", "length-at-the-end"])
async def test_draft_upload_in_appends_gives_the_mp3_a_post_gives(client: httpx.AsyncClient, version: int, length_told: bool) -> None:
    """tus-js-client's way ("careful creation"): a creation with Upload-Complete: ?0 and no body, appends with ?0, the
    last with ?1, answered with the record. A HEAD between them tells the offset, and the length once told."""
    user = await new_user(client)
    wav = make_wav(4.0, 44100, 2, signal=music(4.0, 44100, 2))
    created = await draft_create(client, user, version, Upload_Complete="?0", **({"Upload_Length": str(len(wav))} if length_told else {}))
    assert_goes_on(created, version, 0, 201)
    url = created.headers["location"]
    cuts = [0, 100_000, 400_000, len(wav)]
    appended = 201 if version < 7 else 204  # drafts -03 to -05 require 201 for an append that leaves the upload incomplete
    for start, end in itertools.pairwise(cuts[:-1]):
        assert_goes_on(await draft_append(client, user, version, url, start, wav[start:end], last=False), version, end, appended)
        state = await client.head(url, headers=draft(user, version))
        assert state.status_code == 200 and state.headers["cache-control"] == "no-store"
        assert (state.headers["upload-offset"], state.headers["upload-complete"]) == (str(end), "?0")
        assert state.headers.get("upload-length") == (str(len(wav)) if length_told else None)
    last = await draft_append(client, user, version, url, cuts[-2], wav[cuts[-2] :], last=True)
    assert last.status_code == 200 and (last.headers["upload-complete"], last.headers["upload-offset"]) == ("?1", str(len(wav))), last.text
    record = last.json()
    assert record == (await client.get(url, headers=bearer(user))).json()
    assert record["filename"] == f"upload-{url.rsplit('/', 1)[1][:8]}.mp3"  # no name given: one made of the upload's id
    assert record["sha256"] == await posted_sha256(client, wav)
    assert hashlib.sha256((await client.get(record_path(record["url"]))).content).hexdigest() == record["sha256"]
    done = await client.head(url, headers=draft(user, version))
    assert (done.headers["upload-offset"], done.headers["upload-complete"], done.headers["upload-length"]) == (str(len(wav)), "?1", str(len(wav)))


@pytest.mark.parametrize("version", DRAFTS)
async def test_draft_creation_with_the_whole_file_is_answered_with_the_record(client: httpx.AsyncClient, version: int) -> None:
    """An "optimistic creation": the whole file in the POST, Upload-Complete: ?1; the answer is the record, with the
    upload's URL in Location. A creation with a first piece and ?0 stores it, and the rest follows."""
    user = await new_user(client)
    wav = make_wav(2.0, 44100, 2)
    whole = await draft_create(client, user, version, wav, Upload_Complete="?1", Content_Type="audio/wav")
    assert whole.status_code == 200 and whole.headers["upload-complete"] == "?1", whole.text
    assert whole.headers["upload-offset"] == str(len(wav)) and whole.headers["location"].startswith("http://testserver/users/")
    assert whole.json() == (await client.get(whole.headers["location"], headers=bearer(user))).json()
    piece = await draft_create(client, user, version, wav[:150_000], Upload_Complete="?0", Upload_Length=str(len(wav)))
    assert_goes_on(piece, version, 150_000, 201)
    rest = await draft_append(client, user, version, piece.headers["location"], 150_000, wav[150_000:], last=True)
    assert rest.status_code == 200, rest.text
    assert rest.json()["sha256"] == whole.json()["sha256"] == await posted_sha256(client, wav)


async def cut_append(app: Any, url: str, headers: dict[str, str], pieces: list[bytes]) -> dict[str, Any]:
    """A PATCH of `url` as uvicorn hands it to the app, whose connection breaks after `pieces` of its body (ASGI
    http.disconnect); the answer's start, as the app sent it (the client is gone)."""
    path = httpx.URL(url).path
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "PATCH", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000), "headers": [(b"host", b"testserver"), *((k.lower().encode(), v.encode()) for k, v in headers.items())],
    }  # fmt: skip
    messages = [{"type": "http.request", "body": piece, "more_body": True} for piece in pieces]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]


@pytest.mark.parametrize("version", DRAFTS)
async def test_draft_append_cut_short_keeps_what_arrived_and_goes_on_from_there(app: Any, client: httpx.AsyncClient, version: int) -> None:
    """A connection that breaks mid-append: the bytes that arrived are stored and the upload is not complete (the
    draft: "the upload MUST NOT be considered complete"); HEAD tells the offset, and the rest goes from there."""
    user = await new_user(client)
    wav = make_wav(6.0, 44100, 2, signal=music(6.0, 44100, 2))
    url = (await draft_create(client, user, version, Upload_Complete="?0", Upload_Length=str(len(wav)))).headers["location"]
    headers = draft(user, version, Upload_Offset="0", Upload_Complete="?1", Content_Length=str(len(wav)), **PARTIAL)
    arrived = [wav[i : i + 65536] for i in range(0, 400_000, 65536)]
    answer = await cut_append(app, url, headers, arrived)
    assert answer["status"] == 400 and (b"upload-complete", b"?0") in answer["headers"]  # (nobody reads it)
    state = await client.head(url, headers=draft(user, version))
    offset = sum(map(len, arrived))
    assert (state.headers["upload-offset"], state.headers["upload-complete"]) == (str(offset), "?0")
    again = await draft_append(client, user, version, url, 0, wav, last=True)
    assert again.status_code == 409 and again.headers["upload-offset"] == str(offset)  # not from 0: from the offset
    rest = await draft_append(client, user, version, url, offset, wav[offset:], last=True)
    assert rest.status_code == 200, rest.text
    assert rest.json()["sha256"] == await posted_sha256(client, wav)


@pytest.mark.parametrize("version", DRAFTS)
async def test_draft_refusals_name_the_drafts_problem_types(client: httpx.AsyncClient, database_url: str, version: int) -> None:
    """An offset that is not the upload's: 409 with the draft's mismatching-upload-offset (RFC 9457: the expected and
    provided offsets); lengths that disagree: 400 inconsistent-upload-length; bytes for an upload complete already:
    400 completed-upload, while the last append repeated with no bytes gets the record again. Each keeps `error`,
    and tus's answers keep the service's one shape."""
    user = await new_user(client)
    wav = make_wav(1.0, 44100, 2)
    url = (await draft_create(client, user, version, wav[:50_000], Upload_Complete="?0")).headers["location"]
    mismatch = await draft_append(client, user, version, url, 60_000, wav[60_000:70_000], last=False)
    assert (mismatch.status_code, mismatch.headers["content-type"]) == (409, "application/problem+json"), mismatch.text
    assert (mismatch.headers["upload-offset"], mismatch.headers["upload-complete"]) == ("50000", "?0")
    problem = mismatch.json()
    assert (problem["type"], problem["status"], problem["expected-offset"], problem["provided-offset"]) == (
        PROBLEMS + "mismatching-upload-offset", 409, 50_000, 60_000)  # fmt: skip
    assert problem["detail"] == problem["error"] == "the upload stands at 50000, not 60000: send from there"
    as_tus = await tus_patch(client, user, url, 60_000, wav[60_000:70_000])
    assert as_tus.status_code == 409 and as_tus.json() == {"error": problem["error"]}  # tus's clients: the one shape
    lengths = await draft_append(client, user, version, url, 50_000, wav[50_000:], last=True, Upload_Length=str(len(wav) + 1))
    assert (lengths.status_code, lengths.json()["type"]) == (400, PROBLEMS + "inconsistent-upload-length"), lengths.text
    before = await db_rows(database_url, "SELECT count(*) FROM uploads")
    created = await draft_create(client, user, version, wav[:1000], Upload_Complete="?1", Upload_Length="2000")
    assert (created.status_code, created.json()["type"]) == (400, PROBLEMS + "inconsistent-upload-length")
    assert await db_rows(database_url, "SELECT count(*) FROM uploads") == before  # nothing created
    done = await draft_append(client, user, version, url, 50_000, wav[50_000:], last=True)
    assert done.status_code == 200, done.text
    more = await draft_append(client, user, version, url, len(wav), b"xx", last=True)
    assert (more.status_code, more.json()["type"], more.headers["upload-complete"]) == (400, PROBLEMS + "completed-upload", "?0"), more.text
    repeated = await draft_append(client, user, version, url, len(wav), b"", last=True)
    assert repeated.status_code == 200 and repeated.json() == done.json()


@pytest.mark.parametrize("version", [5, 8])
async def test_draft_a_file_refused_as_no_wav_ends_the_upload(client: httpx.AsyncClient, version: int) -> None:
    """The draft's example of a body that cannot be decoded: the refusal says Upload-Complete: ?1 (do not resume)."""
    user = await new_user(client)
    url = (await draft_create(client, user, version, Upload_Complete="?0")).headers["location"]
    refused = await draft_append(client, user, version, url, 0, b"ID3\x04" + bytes(5000), last=False)
    assert refused.status_code == 415 and refused.headers["upload-complete"] == "?1" and list(refused.json()) == ["error"]
    assert (await client.head(url, headers=draft(user, version))).status_code == 404


@pytest.mark.parametrize("version", DRAFTS)
async def test_draft_cancellation_deletes_the_upload_and_frees_its_name(client: httpx.AsyncClient, version: int) -> None:
    user = await new_user(client)
    named = {"Upload_Complete": "?0", "Content_Disposition": 'inline; filename="c.wav"'}
    url = (await draft_create(client, user, version, make_wav(1.0)[:20_000], **named)).headers["location"]
    wrong = await client.delete(url, headers=draft(user, version, Upload_Offset="20000"))
    assert wrong.status_code == 400 and "Upload-Offset" in wrong.json()["error"]  # drafts -03 to -05: a DELETE carries no upload state
    assert (await client.head(url, headers=draft(user, version, Upload_Complete="?0"))).status_code == 400
    cancelled = await client.delete(url, headers=draft(user, version))
    assert cancelled.status_code == 204 and cancelled.headers["upload-draft-interop-version"] == str(version)
    assert (await client.head(url, headers=draft(user, version))).status_code == 404
    again = await draft_create(client, user, version, **named)
    assert again.status_code == 201, again.text


async def test_draft_names_and_options_come_from_metadata_disposition_or_query(client: httpx.AsyncClient) -> None:
    """The draft has no Upload-Metadata, but tus-js-client sends it with the draft too: its filename and options count;
    else Content-Disposition's file name (RFC 6266, filename* first), or upload-<id>.wav; options in the query too."""
    user = await new_user(client)
    wav = make_wav(1.0, 44100, 2)
    named = {
        "metadata": {"Upload_Metadata": tus_metadata(filename="meta.wav", bitrate="64")},
        "disposition": {"Content_Disposition": "inline; filename=\"plain.wav\"; filename*=UTF-8''R%C3%A9sum%C3%A9.wav"},
        "query": {},
    }
    records = {}
    for case, headers in named.items():
        query = "?bitrate=64&channels=1" if case == "query" else ""
        response = await client.post(f"/users/{user['user_id']}/uploads{query}", content=wav, headers=draft(user, 8, Upload_Complete="?1", **headers))
        assert response.status_code == 200, response.text
        records[case] = response.json()
    assert records["metadata"]["filename"] == "meta.mp3" and records["disposition"]["filename"] == "Résumé.mp3"
    assert re.fullmatch(r"upload-[0-9a-f]{8}\.mp3", records["query"]["filename"])
    assert records["metadata"]["sha256"] == await posted_sha256(client, wav, bitrate="64")
    assert records["query"]["sha256"] == await posted_sha256(client, wav, bitrate="64", channels="1")
    assert records["disposition"]["sha256"] == await posted_sha256(client, wav)
    taken = await draft_create(client, user, 8, wav, Upload_Complete="?1", Content_Disposition='inline; filename="meta.wav"')
    assert taken.status_code == 422 and "meta.wav" in taken.json()["error"]  # as for tus: 409 means "ask the offset" to these clients
    both = await client.post(f"/users/{user['user_id']}/uploads?vbr_quality=2&bitrate=64", headers=draft(user, 8, Upload_Complete="?0"))
    assert both.status_code == 422 and "exclude" in both.json()["error"]


async def test_draft_query_takes_every_option_a_post_takes_as_documented(client: httpx.AsyncClient) -> None:
    """The draft has no metadata of its own: its creation's query takes what POST /users/wav's form and tus's
    Upload-Metadata take (FORM_OPTIONS), id3_version included, with the same values; /openapi.json and docs/API.md
    say so. They said bitrate, vbr_quality and channels, and the OpenAPI had id3_version as the integers 3 and 4."""
    user = await new_user(client)
    wav = make_wav(1.0, 44100, 1, before_data=info_list(INAM="x"))
    created = await client.post(f"/users/{user['user_id']}/uploads?id3_version=2.3", content=wav, headers=draft(user, 8, Upload_Complete="?1"))
    assert created.status_code == 200, created.text
    assert (await client.get(record_path(created.json()["url"]))).content[:4] == b"ID3\x03"
    wrong = await client.post(f"/users/{user['user_id']}/uploads?id3_version=3", headers=draft(user, 8, Upload_Complete="?0"))
    assert wrong.status_code == 422 and wrong.json()["error"] == "id3_version must be one of 2.3, 2.4"
    creation = (await client.get("/openapi.json")).json()["paths"]["/users/{user_id}/uploads"]["post"]
    queried = {parameter["name"]: parameter["schema"] for parameter in creation["parameters"] if parameter["in"] == "query"}
    assert queried == {name: option.schema for name, option in wav2mp3.FORM_OPTIONS.items()}
    options = re.search(r"^- \*\*Options\*\*: (.*?)^- ", (HERE / "docs" / "API.md").read_text(), re.MULTILINE | re.DOTALL)
    assert options is not None and all(f"`{name}`" in options.group(1) for name in wav2mp3.FORM_OPTIONS)


async def test_draft_upload_of_a_length_known_only_at_its_end(client: httpx.AsyncClient) -> None:
    """A recording streamed as it is made: the last append's body has no Content-Length (chunked) and says
    Upload-Complete: ?1; the file ends with it, its length is what arrived, and the MP3 is the one a POST gives."""
    user = await new_user(client)
    wav = make_wav(3.0, 44100, 2)
    recording = wav[:40] + struct.pack("<L", 0xFFFFFFFF) + wav[44:]
    url = (await draft_create(client, user, 8, recording[:100_000], Upload_Complete="?0")).headers["location"]
    assert "upload-length" not in (await client.head(url, headers=draft(user, 8))).headers

    async def streamed() -> AsyncIterator[bytes]:
        for start in range(100_000, len(recording), 60_000):
            yield recording[start : start + 60_000]

    headers = draft(user, 8, Upload_Offset="100000", Upload_Complete="?1", **PARTIAL)
    last = await client.patch(url, content=streamed(), headers=headers)
    assert last.status_code == 200 and last.headers["upload-offset"] == str(len(recording)), last.text
    assert last.json()["sha256"] == await posted_sha256(client, recording)
    assert (await client.head(url, headers=draft(user, 8))).headers["upload-length"] == str(len(recording))


async def test_draft_versions_not_spoken_are_412_and_options_tell_the_limit(client: httpx.AsyncClient) -> None:
    """A draft version this service does not speak is 412, naming those it does; OPTIONS (no credentials, no version)
    tells the draft's Upload-Limit beside tus's capabilities."""
    user = await new_user(client)
    for version in ("4", "9", "x"):
        response = await client.post(
            f"/users/{user['user_id']}/uploads", headers={**bearer(user), "Upload-Draft-Interop-Version": version, "Upload-Complete": "?0"}
        )
        assert response.status_code == 412 and "one of 5, 6, 7, 8" in response.json()["error"], response.text
    missing = await draft_create(client, user, 8)
    assert missing.status_code == 400 and "Upload-Complete" in missing.json()["error"]
    options = await client.options(f"/users/{user['user_id']}/uploads")
    assert options.status_code == 204 and options.headers["upload-limit"] == f"max-size={wav2mp3.Settings().max_upload_bytes}"
    assert options.headers["tus-version"] == "1.0.0"
    both = await client.post(f"/users/{user['user_id']}/uploads", headers={**draft(user, 8, Upload_Complete="?0"), "Tus-Resumable": "1.0.0"})
    assert both.status_code == 400 and "Upload-Length" in both.json()["error"]  # with Tus-Resumable, a tus request


async def test_draft_cors_lets_a_browser_client_send_and_read_the_drafts_headers(database_url: str) -> None:
    async with running_app(database_url, cors_origins="https://app.example.com") as client:
        origin = {"Origin": "https://app.example.com"}
        preflight = await client.options(
            f"/users/{uuid.uuid4()}/uploads",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, upload-draft-interop-version, upload-complete, upload-length, content-disposition",
            },
        )
        assert preflight.status_code == 200, preflight.text
        user = await new_user(client)
        created = await draft_create(client, user, 6, Upload_Complete="?0", **{"Origin": origin["Origin"]})
        exposed = {h.strip().lower() for h in created.headers["access-control-expose-headers"].split(",")}
        assert {"location", "upload-offset", "upload-length", "upload-complete", "upload-limit", "upload-draft-interop-version"} <= exposed


# tus-js-client, the reference client, unchanged: tests/tus_client.mjs runs one upload with it under Node (the job
# and the outcome it prints are described at its top); tests/package.json pins the version.

NODE_CLIENT = HERE / "tests" / "tus_client.mjs"
NODE_CHUNK = 256 * 1024


def tus_js_client_missing() -> str:
    """Why tus-js-client cannot run here, if it cannot."""
    if not shutil.which("node"):
        return "node not installed (.ci/run installs nodejs and npm from Debian)"
    if not (HERE / "tests" / "node_modules" / "tus-js-client").is_dir():
        return "tests/node_modules missing: npm ci --prefix tests (.ci/run runs it)"
    return ""


needs_tus_js_client = pytest.mark.skipif(bool(tus_js_client_missing()), reason=tus_js_client_missing())


def tus_js_client(server: LiveServer, user: dict[str, str], wav_file: Path, filename: str, **job: Any) -> dict[str, Any]:
    """One upload of `wav_file` by tus-js-client in 256 KiB PATCHes (unless `job` says otherwise); what became of it."""
    job = {
        "endpoint": f"{server.url}/users/{user['user_id']}/uploads",
        "token": user["access_token"],
        "file": str(wav_file),
        "metadata": {"filename": filename},
        "chunkSize": NODE_CHUNK,
        **job,
    }
    done = subprocess.run(["node", str(NODE_CLIENT)], input=json.dumps(job), capture_output=True, text=True, timeout=120, cwd=HERE)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def patches(start: int, end: int) -> list[str]:
    """The answers tus-js-client sees sending bytes start..end in NODE_CHUNK PATCHes, each accepted."""
    return ["PATCH 204"] * math.ceil((end - start) / NODE_CHUNK)


def patch_answers(length: int, protocol: str = "tus-v1") -> list[str]:
    """The answers tus-js-client sees sending a file of `length` bytes in NODE_CHUNK PATCHes, none sent twice: tus's 204
    each; the IETF draft's 201 for an append that leaves the upload incomplete, 200 (with the record) for the last."""
    count = math.ceil(length / NODE_CHUNK)
    return ["PATCH 204"] * count if protocol == "tus-v1" else ["PATCH 201"] * (count - 1) + ["PATCH 200"]


def live_record_mp3_sha256(server: LiveServer, user: dict[str, str], upload_url: str) -> str:
    """The sha256 of the MP3 downloaded from the link of a completed upload's record."""
    record = httpx.get(upload_url, headers=bearer(user), timeout=30).json()
    mp3 = httpx.get(server.url + record_path(record["url"]), timeout=30).content
    assert hashlib.sha256(mp3).hexdigest() == record["sha256"]
    return record["sha256"]  # type: ignore[no-any-return]


def live_posted_mp3_sha256(server: LiveServer, wav: bytes) -> str:
    """The sha256 of the MP3 a POST /users/wav of another user makes of `wav` (conversion is deterministic)."""
    created = httpx.post(server.url + "/users/wav", **upload_form(server.new_user(), wav, "posted.wav"), timeout=60)
    assert created.status_code == 201, created.text
    return hashlib.sha256(httpx.get(server.url + record_path(created.json()["url"]), timeout=30).content).hexdigest()


def node_wav(tmp_path: Path) -> tuple[bytes, Path]:
    """Ten seconds of music-like stereo (1.7 MB, seven 256 KiB PATCHes), in a file for tus-js-client to read."""
    wav = make_wav(10.0, 44100, 2, signal=music(10.0, 44100, 2))
    path = tmp_path / "node.wav"
    path.write_bytes(wav)
    return wav, path


def node_recording(tmp_path: Path) -> tuple[bytes, Path]:
    """node_wav as a recorder writes it while it records (its header's data size 0xFFFFFFFF: not known yet), for
    tus-js-client's uploadLengthDeferred to read from a buffer (a file's stream would be read as a known length)."""
    wav, path = node_wav(tmp_path)
    recording = wav[:40] + struct.pack("<L", 0xFFFFFFFF) + wav[44:]
    path.write_bytes(recording)
    return recording, path


@needs_tus_js_client
def test_live_tus_js_client_uploads_in_chunks_the_mp3_a_post_gives(live: LiveServer, tmp_path: Path) -> None:
    user = live.new_user()
    wav, wav_file = node_wav(tmp_path)
    outcome = tus_js_client(live, user, wav_file, "node.wav")
    assert outcome["ok"], outcome["error"]
    assert outcome["requests"] == ["POST 201", *patches(0, len(wav))] and outcome["retries"] == 0
    assert live_record_mp3_sha256(live, user, outcome["url"]) == live_posted_mp3_sha256(live, wav)


@needs_tus_js_client
def test_live_tus_js_client_goes_on_from_its_upload_url_on_a_restarted_server(tmp_path: Path, database_url: str) -> None:
    """Aborted halfway, the server stopped, a new one on the same database (another port): a new tus-js-client
    Upload given the upload's URL asks the offset (HEAD) and sends only the rest; the MP3 is the one a POST gives."""
    wav, wav_file = node_wav(tmp_path)
    with LiveServer(tmp_path / "first", database_url) as first:
        user = first.new_user()
        stopped = tus_js_client(first, user, wav_file, "restarted.wav", interrupt={"afterBytes": len(wav) // 2, "then": "stop"})
    assert (stopped["ok"], stopped["interrupted"], stopped["error"]) == (False, True, None)
    half = stopped["accepted"]
    assert len(wav) // 2 <= half < len(wav) and stopped["requests"] == ["POST 201", *patches(0, half)]
    with LiveServer(tmp_path / "second", database_url) as second:
        url = stopped["url"].replace(f":{first.port}/", f":{second.port}/")
        resumed = tus_js_client(second, user, wav_file, "restarted.wav", options={"uploadUrl": url})
        assert resumed["ok"], resumed["error"]
        assert resumed["requests"] == ["HEAD 200", *patches(half, len(wav))]  # resumed where the first server stood: no new upload
        assert live_record_mp3_sha256(second, user, url) == live_posted_mp3_sha256(second, wav)


# tus-js-client's options of issue 24's points 1-3 and 5 (point 4 has its own test), each resumed on a restarted server.
RESTARTED_OPTIONS = {
    "parallel": {"parallelUploads": 3},
    "deferred-length": {"uploadLengthDeferred": True},
    "request-id": {"addRequestId": True},
    "ietf-draft-03": {"protocol": "ietf-draft-03"},
    "ietf-draft-05": {"protocol": "ietf-draft-05"},
    "ietf-draft-05-deferred-length": {"protocol": "ietf-draft-05", "uploadLengthDeferred": True},
}


@needs_tus_js_client
@pytest.mark.parametrize("options", RESTARTED_OPTIONS.values(), ids=RESTARTED_OPTIONS.keys())
def test_live_tus_js_client_options_go_on_after_a_server_restart(tmp_path: Path, database_url: str, options: dict[str, Any]) -> None:
    """Aborted halfway, the server stopped, a new one on the same database and port: tus-js-client run again with the
    same options finds the upload in its FileUrlStorage (parallel pieces: each piece's URL) and goes on from the offset
    the server kept, a HEAD each, creating nothing but a parallel upload's final upload; one record, no upload left,
    the MP3 a POST gives."""
    deferred = options.get("uploadLengthDeferred", False)
    wav, wav_file = node_recording(tmp_path) if deferred else node_wav(tmp_path)
    job = {"urlStorage": str(tmp_path / "tus-urls.json"), "options": options, "input": "buffer" if deferred else "file"}
    with LiveServer(tmp_path / "first", database_url) as first:
        user = first.new_user()
        stopped = tus_js_client(first, user, wav_file, "restarted.wav", interrupt={"afterBytes": len(wav) // 2, "then": "stop"}, **job)
    assert (stopped["ok"], stopped["interrupted"], stopped["error"]) == (False, True, None)
    with LiveServer(tmp_path / "second", database_url, port=first.port) as second:
        resumed = tus_js_client(second, user, wav_file, "restarted.wav", **job)
        assert resumed["ok"], resumed["error"]
        assert stopped["retries"] == resumed["retries"] == 0
        if "parallelUploads" in options:  # pieces cut mid-PATCH kept what arrived: how many PATCHes are left varies
            assert [r for r in stopped["requests"] if r.startswith("POST")] == ["POST 201"] * 3, stopped["requests"]
            *pieces, final = resumed["requests"]
            assert final == "POST 201" and pieces.count("HEAD 200") == 3 and set(pieces) == {"HEAD 200", "PATCH 204"}, resumed["requests"]
        else:  # abort() comes between two PATCHes: the second server's offset is the first's last answer
            answers, sent = patch_answers(len(wav), options.get("protocol", "tus-v1")), stopped["accepted"] // NODE_CHUNK
            assert stopped["requests"] == ["POST 201", *answers[:sent]] and resumed["requests"] == ["HEAD 200", *answers[sent:]]
        records = httpx.get(f"{second.url}/users/{user['user_id']}/records", headers=bearer(user)).json()["records"]
        uploads = httpx.get(f"{second.url}/users/{user['user_id']}/uploads", headers=bearer(user)).json()["uploads"]
        assert ([record["filename"] for record in records], uploads) == (["restarted.mp3"], [])
        assert live_record_mp3_sha256(second, user, resumed["url"]) == live_posted_mp3_sha256(second, wav)


@needs_tus_js_client
@pytest.mark.parametrize("then", ["start", "new-upload"])
def test_live_tus_js_client_aborted_goes_on_where_it_stopped(live: LiveServer, tmp_path: Path, then: str) -> None:
    """abort() halfway, then start() again (tus-js-client's pause and resume), or a new Upload that finds the URL
    in its FileUrlStorage (findPreviousUploads, resumeFromPreviousUpload): one upload, no byte sent twice."""
    user = live.new_user()
    wav, wav_file = node_wav(tmp_path)
    job = {"interrupt": {"afterBytes": len(wav) // 2, "then": then}, "urlStorage": str(tmp_path / "tus-urls.json")}
    outcome = tus_js_client(live, user, wav_file, f"aborted-{then}.wav", **job)
    assert outcome["ok"] and outcome["interrupted"], outcome["error"]
    half = math.ceil(len(wav) // 2 / NODE_CHUNK) * NODE_CHUNK  # the first offset past half: abort() comes between PATCHes
    assert outcome["requests"] == ["POST 201", *patches(0, half), "HEAD 200", *patches(half, len(wav))]
    assert live_record_mp3_sha256(live, user, outcome["url"]) == live_posted_mp3_sha256(live, wav)


@needs_tus_js_client
@pytest.mark.parametrize("metadata_for_parts", [False, True])
def test_live_tus_js_client_parallel_uploads_make_the_mp3_a_post_gives(live: LiveServer, tmp_path: Path, metadata_for_parts: bool) -> None:
    """parallelUploads (Uppy's too): the pieces as partial uploads, with or without their metadata, then the final
    upload; one record, the MP3 a POST gives. On e37ff88: 422 "needs a filename", or a piece taken for a file."""
    user = live.new_user()
    wav, wav_file = node_wav(tmp_path)
    options = {"parallelUploads": 3, "metadataForPartialUploads": {"filename": "part.wav"} if metadata_for_parts else None}
    outcome = tus_js_client(live, user, wav_file, "parallel.wav", options={key: value for key, value in options.items() if value is not None})
    assert outcome["ok"], outcome["error"]
    assert outcome["requests"].count("POST 201") == 4 and outcome["retries"] == 0, outcome["requests"]  # three pieces and the final
    record = httpx.get(outcome["url"], headers=bearer(user)).json()
    assert record["filename"] == "parallel.mp3"
    assert live_record_mp3_sha256(live, user, outcome["url"]) == live_posted_mp3_sha256(live, wav)


@needs_tus_js_client
@pytest.mark.parametrize("then", [None, "start", "new-upload"], ids=["whole", "aborted-then-start", "aborted-then-new-upload"])
@pytest.mark.parametrize("protocol", ["tus-v1", "ietf-draft-05"])
def test_live_tus_js_client_of_unknown_length_gives_the_length_at_the_end(live: LiveServer, tmp_path: Path, protocol: str, then: str | None) -> None:
    """uploadLengthDeferred (a recording uploaded while it is made): a creation with no length (tus-js-client sends tus's
    Upload-Defer-Length for the IETF draft too, which the draft does not know), the length with the last PATCH (the
    draft's with Upload-Complete: ?1). Aborted halfway, then start() again or a new Upload that finds the URL in its
    storage, it asks the offset (a HEAD) and sends only the rest. The MP3 a POST gives; on e37ff88 400."""
    user = live.new_user()
    recording, wav_file = node_recording(tmp_path)
    options = {"protocol": protocol, "uploadLengthDeferred": True}
    job: dict[str, Any] = {"input": "buffer", "urlStorage": str(tmp_path / "urls.json"), "options": options}
    if then:
        job["interrupt"] = {"afterBytes": len(recording) // 2, "then": then}
    outcome = tus_js_client(live, user, wav_file, "recording.wav", **job)
    assert outcome["ok"] and outcome["interrupted"] == bool(then), outcome["error"]
    answers = patch_answers(len(recording), protocol)
    if then:  # abort() comes between two PATCHes, at the first offset past half
        answers.insert(math.ceil(len(recording) // 2 / NODE_CHUNK), "HEAD 200")
    assert outcome["requests"] == ["POST 201", *answers] and outcome["retries"] == 0, outcome["requests"]
    assert live_record_mp3_sha256(live, user, outcome["url"]) == live_posted_mp3_sha256(live, recording)


@needs_tus_js_client
@pytest.mark.parametrize(
    "protocol, then, options",
    [
        ("ietf-draft-03", "start", {}),
        ("ietf-draft-05", "start", {}),
        ("ietf-draft-05", "new-upload", {"uploadDataDuringCreation": True}),
    ],
    ids=["03-start", "05-start", "05-new-upload-with-data-in-the-creation"],
)
def test_live_tus_js_client_speaking_the_ietf_draft_goes_on_where_it_stopped(
    live: LiveServer, tmp_path: Path, protocol: str, then: str, options: dict[str, Any]
) -> None:
    """tus-js-client's `protocol: 'ietf-draft-03'` and `'ietf-draft-05'` (Upload-Draft-Interop-Version 5 and 6), unchanged:
    the creation (Upload-Complete: ?0, its first piece in it or not), appends, abort() halfway, then start() again or a
    new Upload that finds the URL in its storage (a HEAD for the offset), and the last append (?1) answered with the
    record; one upload, no byte sent twice, the MP3 a POST gives. Both drafts answer an append that goes on 201."""
    user = live.new_user()
    wav, wav_file = node_wav(tmp_path)
    job = {
        "interrupt": {"afterBytes": len(wav) // 2, "then": then},
        "urlStorage": str(tmp_path / "urls.json"),
        "options": {"protocol": protocol, **options},
    }
    outcome = tus_js_client(live, user, wav_file, "draft.wav", **job)
    assert outcome["ok"] and outcome["interrupted"], outcome["error"]
    half = math.ceil(len(wav) // 2 / NODE_CHUNK) * NODE_CHUNK  # the first offset past half: abort() comes between appends
    first = NODE_CHUNK if "uploadDataDuringCreation" in options else 0  # the first piece in the creation
    appends = ["PATCH 201"] * (math.ceil((half - first) / NODE_CHUNK) + math.ceil((len(wav) - half) / NODE_CHUNK) - 1) + ["PATCH 200"]
    assert [r for r in outcome["requests"] if r != "HEAD 200"] == ["POST 201", *appends] and outcome["requests"].count("HEAD 200") == 1
    assert outcome["retries"] == 0 and httpx.get(outcome["url"], headers=bearer(user)).json()["filename"] == "draft.mp3"
    assert live_record_mp3_sha256(live, user, outcome["url"]) == live_posted_mp3_sha256(live, wav)


def client_snippet(language: str, live: LiveServer, user: dict[str, str]) -> str:
    """The `language` snippet of docs/API.md's "Clients", aimed at `live` and `user`."""
    section = (HERE / "docs" / "API.md").read_text().split("## Clients\n", 1)[1].split("\n## ", 1)[0]
    snippet = section.split(f"```{language}\n", 1)[1].split("```", 1)[0]
    return snippet.replace("http://127.0.0.1:8000", live.url).replace("USER_ID", user["user_id"]).replace("ACCESS_TOKEN", user["access_token"])


@pytest.mark.parametrize("language", ["js", "python"])
def test_the_client_snippets_of_the_api_reference_work_as_written(live: LiveServer, tmp_path: Path, language: str) -> None:
    if language == "js" and tus_js_client_missing():
        pytest.skip(tus_js_client_missing())
    user = live.new_user()
    wav, _ = node_wav(tmp_path)
    (tmp_path / "call.wav").write_bytes(wav)
    snippet = client_snippet(language, live, user)
    if language == "js":  # run where tests/node_modules resolves its import, reading the WAV from tmp_path
        command = ["node", "--input-type=module"]
        snippet = snippet.replace("'call.wav'", repr(str(tmp_path / "call.wav")), 1)
        cwd = HERE / "tests"
    else:
        command, cwd = [sys.executable, "-"], tmp_path
    done = subprocess.run(command, input=snippet, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip().splitlines()[-1]
    record = httpx.get(url, headers=bearer(user)).json()
    assert record["filename"] == "call.mp3"
    posted = httpx.post(live.url + "/users/wav", **upload_form(live.new_user(), wav, "call.wav", bitrate="192"), timeout=60).json()
    assert record["sha256"] == posted["sha256"]


@needs_tus_js_client
@pytest.mark.parametrize("options", [{"parallelUploads": 3}, {"addRequestId": True}], ids=["parallel", "request-id"])
def test_live_tus_js_client_options_go_on_after_an_interruption(live: LiveServer, tmp_path: Path, options: dict[str, Any]) -> None:
    """Aborted halfway, then a new Upload of the same file finds what it stored (findPreviousUploads: for parallel
    pieces, each piece's URL) and goes on: one record, the MP3 a POST gives."""
    user = live.new_user()
    wav, wav_file = node_wav(tmp_path)
    job = {"interrupt": {"afterBytes": len(wav) // 2, "then": "new-upload"}, "urlStorage": str(tmp_path / "tus-urls.json"), "options": options}
    outcome = tus_js_client(live, user, wav_file, "interrupted.wav", **job)
    assert outcome["ok"] and outcome["interrupted"], outcome["error"]
    assert outcome["retries"] == 0 and all(not answer.startswith(("POST 4", "PATCH 4")) for answer in outcome["requests"]), outcome["requests"]
    creations = 4 if "parallelUploads" in options else 1  # its pieces made once, then the final upload: resumed, not begun again
    assert outcome["requests"].count("POST 201") == creations and "HEAD 200" in outcome["requests"], outcome["requests"]
    assert live_record_mp3_sha256(live, user, outcome["url"]) == live_posted_mp3_sha256(live, wav)


@needs_tus_js_client
def test_live_tus_js_client_with_add_request_id_is_accepted(live: LiveServer, tmp_path: Path) -> None:
    """addRequestId (Uppy turns it on) sends a new X-Request-ID with every request: the service takes it."""
    user = live.new_user()
    wav, wav_file = node_wav(tmp_path)
    outcome = tus_js_client(live, user, wav_file, "request-id.wav", options={"addRequestId": True})
    assert outcome["ok"], outcome["error"]
    assert outcome["requests"] == ["POST 201", *patches(0, len(wav))]
    assert all(outcome["requestIds"]) and len(set(outcome["requestIds"])) == len(outcome["requests"])
    assert httpx.get(outcome["url"], headers=bearer(user)).json()["filename"] == "request-id.mp3"


@needs_tus_js_client
@pytest.mark.parametrize("holder", ["record", "unfinished upload"])
def test_live_tus_js_client_sees_a_taken_name_at_once_without_retrying(live: LiveServer, tmp_path: Path, holder: str) -> None:
    """A name taken is 422 at creation, not 409: tus-js-client retries a 409 four times (its default retryDelays)
    and shows its own message; here it sends the creation once and its error quotes the service's."""
    user = live.new_user()
    wav, wav_file = node_wav(tmp_path)
    interrupt = {"interrupt": {"afterBytes": NODE_CHUNK, "then": "stop"}} if holder == "unfinished upload" else {}
    first = tus_js_client(live, user, wav_file, "taken.wav", **interrupt)
    assert first["error"] is None and first["url"], first
    again = tus_js_client(live, user, wav_file, "taken.wav")
    assert (again["ok"], again["status"], again["requests"], again["retries"]) == (False, 422, ["POST 422"], 0)
    expected = "already has a record from a file named 'taken.wav'" if holder == "record" else "an unfinished upload of this user holds the name"
    assert expected in again["error"], again["error"]


@needs_tus_js_client
@pytest.mark.parametrize("protocol", ["tus-v1", "ietf-draft-05"])
def test_live_tus_js_client_sees_a_name_held_through_a_server_restart_at_once(tmp_path: Path, database_url: str, protocol: str) -> None:
    """An unfinished upload holds its name through a restart (the server stopped, a new one on the same database and
    port): another tus-js-client creation of the name is refused at once (422, sent once, the service's message), and
    the holder, run again, finds its upload in its URL storage and finishes it: one record, the MP3 a POST gives."""
    wav, wav_file = node_wav(tmp_path)
    holder = {"urlStorage": str(tmp_path / "holder-urls.json"), "options": {"protocol": protocol}}
    with LiveServer(tmp_path / "first", database_url) as first:
        user = first.new_user()
        stopped = tus_js_client(first, user, wav_file, "held.wav", interrupt={"afterBytes": NODE_CHUNK, "then": "stop"}, **holder)
    assert (stopped["interrupted"], stopped["error"]) == (True, None), stopped
    with LiveServer(tmp_path / "second", database_url, port=first.port) as second:
        again = tus_js_client(second, user, wav_file, "held.wav", options={"protocol": protocol})
        assert (again["ok"], again["status"], again["requests"], again["retries"]) == (False, 422, ["POST 422"], 0)
        assert "an unfinished upload of this user holds the name" in again["error"], again["error"]
        resumed = tus_js_client(second, user, wav_file, "held.wav", **holder)
        assert resumed["ok"] and resumed["url"] == stopped["url"], resumed
        assert resumed["requests"] == ["HEAD 200", *patch_answers(len(wav), protocol)[stopped["accepted"] // NODE_CHUNK :]]
        records = httpx.get(f"{second.url}/users/{user['user_id']}/records", headers=bearer(user)).json()["records"]
        assert [record["filename"] for record in records] == ["held.mp3"]
        assert live_record_mp3_sha256(second, user, resumed["url"]) == live_posted_mp3_sha256(second, wav)


# Uppy, unchanged, in a browser: tests/uppy.html runs one upload with Uppy's own bundle (tests/package.json pins it) in
# Chromium, from a page on another origin than the service, so that every request passes CORS as a site's would.

UPPY_PAGE = HERE / "tests" / "uppy.html"
UPPY_BUNDLE = HERE / "tests" / "node_modules" / "uppy" / "dist" / "uppy.min.mjs"


def uppy_missing() -> str:
    """Why Uppy's bundle cannot be served here, if it cannot (chromium: the `browser` fixture says)."""
    if not UPPY_BUNDLE.is_file():
        return "tests/node_modules missing: npm ci --prefix tests (.ci/run runs it)"
    return ""


needs_uppy = pytest.mark.skipif(bool(uppy_missing()), reason=uppy_missing())


@contextlib.contextmanager
def static_site(files: dict[str, tuple[str, bytes]]) -> Iterator[str]:
    """A web site of its own on a loopback port, another origin than any LiveServer's: GET of a path of `files`
    answers its (content type, body), anything else 404. Yields its origin."""

    class Site(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in files:
                self.send_error(404)
                return
            content_type, body = files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def uppy_upload(browser: webdriver.Chrome, origin: str, job: dict[str, Any]) -> dict[str, Any]:
    """tests/uppy.html's uploadWithUppy(job) in the page at `origin`; its outcome, once Uppy's upload() settles."""
    browser.get(origin + "/")
    browser.get_log("browser")  # only this upload's console
    browser.execute_script(
        "window.uppyOutcome = null;"
        "uploadWithUppy(arguments[0]).then((outcome) => { window.uppyOutcome = outcome },"
        " (error) => { window.uppyOutcome = { thrown: String(error) } })",
        job,
    )
    return page_wait(browser, lambda d: d.execute_script("return window.uppyOutcome"))  # type: ignore[no-any-return]


@needs_uppy
def test_live_uppy_in_chromium_from_another_origin_uploads_in_parallel_with_request_ids(
    browser: webdriver.Chrome, tmp_path: Path, database_url: str
) -> None:
    """Uppy (@uppy/tus with parallelUploads and addRequestId) in a page on another origin: every preflight (asking
    for Upload-Concat and X-Request-ID) is allowed, nothing is retried, Uppy calls the file uploaded, and the MP3
    is the one a POST gives."""
    wav, _ = node_wav(tmp_path)
    files = {
        "/": ("text/html; charset=utf-8", UPPY_PAGE.read_bytes()),
        "/uppy.min.mjs": ("text/javascript", UPPY_BUNDLE.read_bytes()),
        "/call.wav": ("audio/wav", wav),
    }
    with static_site(files) as origin, LiveServer(tmp_path, database_url, "--cors-origins", origin) as server:
        user = server.new_user()
        job = {
            "endpoint": f"{server.url}/users/{user['user_id']}/uploads",
            "token": user["access_token"],
            "wav": "/call.wav",
            "name": "uppy.wav",
            "tus": {"parallelUploads": 2, "addRequestId": True},
        }
        outcome = uppy_upload(browser, origin, job)
        preflights = re.findall(r'"(OPTIONS [^"]*)" (\d{3})', server.log.read_text())
        assert preflights and {status for _, status in preflights} == {"200"}, preflights  # Authorization: every request is preflighted
        assert (outcome.get("thrown"), outcome["errors"], outcome["failed"]) == (None, [], []), outcome
        url = outcome["successful"][0]["uploadURL"]
        assert url.startswith(f"{server.url}/users/{user['user_id']}/uploads/")
        assert outcome["successful"] == [{"name": "uppy.wav", "uploadURL": url, "error": None}]
        progress = {"uploadComplete": True, "bytesUploaded": len(wav), "bytesTotal": len(wav)}
        assert outcome["files"] == [{"name": "uppy.wav", "uploadURL": url, "error": None, **progress}]
        # two pieces, each created and sent whole (Uppy's chunkSize is Infinity), then the final upload
        assert sorted(outcome["requests"]) == ["PATCH 204"] * 2 + ["POST 201"] * 3 and outcome["retries"] == 0, outcome
        assert all(outcome["requestIds"]) and len(set(outcome["requestIds"])) == len(outcome["requests"])
        assert [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
        assert httpx.get(url, headers=bearer(user)).json()["filename"] == "uppy.mp3"
        assert live_record_mp3_sha256(server, user, url) == live_posted_mp3_sha256(server, wav)


@contextlib.contextmanager
def name_for(addresses: list[str]) -> Iterator[str]:
    """A host name that resolves to several addresses, as compose's `app` does for its replicas (in /etc/hosts, root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to name test replicas in /etc/hosts (CI runs as root)")
    name = f"replicas-{uuid.uuid4().hex[:8]}"
    hosts = Path("/etc/hosts")
    original = hosts.read_text()
    hosts.write_text(original + "".join(f"{address} {name}\n" for address in addresses))
    try:
        yield name
    finally:
        hosts.write_text("".join(line for line in hosts.read_text().splitlines(True) if not line.rstrip().endswith(f" {name}")))


@needs_nginx
def test_nginx_sends_an_uploads_requests_to_one_replica_and_the_rest_anywhere(tmp_path: Path) -> None:
    """deploy/nginx.conf in front of three replicas behind one name (compose's `app`): every request of one resumable
    upload reaches the same replica, other requests reach all of them. (`hash ... consistent` failed this.)"""
    port = free_port()
    replicas = [f"127.0.0.{n}" for n in (21, 22, 23)]

    class Replica(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(204)
            self.send_header("X-Replica", self.server.server_address[0])
            self.end_headers()

        do_GET = do_HEAD = do_PATCH = do_POST = answer

        def log_message(self, *_: Any) -> None:
            pass

    servers = [http.server.ThreadingHTTPServer((address, port), Replica) for address in replicas]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with name_for(replicas) as name, nginx_in_front(port, tmp_path, replicas=(f"server 127.0.0.1:{port}", f"server {name}:{port}")) as front:

            def replica(method: str, path: str) -> str:
                return httpx.request(method, f"http://127.0.0.1:{front}{path}", content=b"x" if method == "PATCH" else None).headers["x-replica"]

            for upload_id in (uuid.uuid4() for _ in range(6)):
                path = f"/users/{uuid.uuid4()}/uploads/{upload_id}"
                assert len({replica(method, path) for method in ("HEAD", "PATCH", "PATCH", "GET", "PATCH", "HEAD")}) == 1
            assert {replica("GET", "/health") for _ in range(60)} == set(replicas)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@needs_nginx
@pytest.mark.slow
def test_live_tus_through_nginx_with_a_cap_takes_three_times_the_cap_in_pieces_despite_a_cut(live: LiveServer, tmp_path: Path) -> None:
    """deploy/nginx.conf with a lower client_max_body_size (a CDN caps a request at 100m; here 10m, the same rule
    at a tenth of the bytes): a 30 MB POST cannot pass, the same WAV over tus in 5 MB PATCHes does, one
    connection killed mid-PATCH, and the MP3 is the one a direct POST makes."""
    seconds = 30e6 / (44100 * 4)
    wav = b"".join(long_wav(seconds))
    piece = 5 * 1000 * 1000
    with nginx_in_front(live.port, tmp_path, cap=("client_max_body_size 4100m;", "client_max_body_size 10m;")) as port:
        proxy = f"http://127.0.0.1:{port}"
        user = live.new_user()
        capped = httpx.post(proxy + "/users/wav", **upload_form(user, wav, "capped.wav"), timeout=600)
        assert capped.status_code == 413  # nginx's own refusal: the file cannot pass in one request
        created = httpx.post(
            f"{proxy}/users/{user['user_id']}/uploads",
            headers=tus(user, Upload_Length=str(len(wav)), Upload_Metadata=tus_metadata(filename="big.wav")),
        )
        url = created.headers["location"]
        assert url.startswith(proxy)
        sent = 0
        offset = 0
        for number, start in enumerate(range(0, len(wav), piece)):
            end = min(start + piece, len(wav))
            if number == 2:  # the third PATCH: its connection dies 2 MB in
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    head = raw_patch(live, user, url.replace(str(port), str(live.port)), offset, end - offset)
                    sock.sendall(head + wav[offset : offset + 2_000_000])
                    sent += 2_000_000
                    time.sleep(1.0)
                time.sleep(1.0)
                offset = int(httpx.head(url, headers=tus(user), timeout=60).headers["upload-offset"])
                assert start <= offset <= start + 2_000_000
            response = httpx.patch(url, content=wav[offset:end], headers=tus(user, Upload_Offset=str(offset), **OCTETS), timeout=600)
            assert response.status_code == 204, response.text
            sent += end - offset
            offset = end
        assert sent - len(wav) <= piece  # bytes sent twice: at most one PATCH
        record = httpx.get(url, headers=bearer(user), timeout=60).json()
    body, headers = streamed_upload(user, long_wav(seconds), "direct.wav")
    direct = httpx.post(live.url + "/users/wav", content=body, headers=headers, timeout=600).json()
    assert record["sha256"] == direct["sha256"]


# One client cannot starve everyone else (fair shares) ###########################
# Every shared pool has a bound per client address (per user once credentials are read) beside its global one.


def client_at(app: Any, address: str) -> httpx.AsyncClient:
    """A client of the in-process app that comes from `address`, as a socket from it would."""
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60)


async def test_user_creations_are_bounded_per_client_address_per_minute(database_url: str) -> None:
    """On e37ff88 one address made 27,590 users in 20 s. Behind a trusted proxy the forwarded address is the client;
    anyone else's X-Forwarded-For is ignored, and so are the hops a client wrote before the trusted proxy's."""
    app, lifespan = await start_app(database_url, user_creations_per_minute=3, trusted_proxies="127.0.0.4")
    try:
        async with client_at(app, "127.0.0.2") as one, client_at(app, "127.0.0.3") as neighbour, client_at(app, "127.0.0.4") as proxy:

            async def create(client: httpx.AsyncClient, **headers: str) -> httpx.Response:
                return await client.post("/users", json={"name": unique_name()}, headers=headers)

            assert [(await create(one)).status_code for _ in range(3)] == [201, 201, 201]
            before = await table_counts(database_url)
            refused = await create(one)
            assert refused.status_code == 429 and "USER_CREATIONS_PER_MINUTE is 3" in refused.json()["error"]
            assert 50 <= int(refused.headers["retry-after"]) <= 60
            assert await table_counts(database_url) == before
            assert (await create(neighbour)).status_code == 201
            assert (await create(one, **{"X-Forwarded-For": "10.2.2.2"})).status_code == 429  # not a trusted proxy: its header is ignored
            assert (await create(proxy, **{"X-Forwarded-For": "127.0.0.2"})).status_code == 429
            assert (await create(proxy, Forwarded='for="127.0.0.2:4711";proto=http')).status_code == 429
            assert (await create(proxy, **{"X-Forwarded-For": "127.0.0.2, 10.3.3.3"})).status_code == 201  # the client is the last hop
            assert (await create(proxy, **{"X-Forwarded-For": "10.1.1.1"})).status_code == 201
    finally:
        await lifespan.__aexit__(None, None, None)


async def test_unfinished_uploads_are_bounded_per_user_in_count_and_declared_bytes(client: httpx.AsyncClient, database_url: str) -> None:
    """On e37ff88 one user made 3,000 uploads of Upload-Length 4 GiB. Now: at most MAX_UNFINISHED_UPLOADS (100) of
    them, declaring at most MAX_UNFINISHED_MB (by default MAX_UPLOAD_MB: one largest upload) in all; refused
    before anything is stored, and a finished or deleted one makes room at once."""
    user = await new_user(client)

    async def create(length: int, name: str) -> httpx.Response:
        metadata = tus_metadata(filename=f"{name}.wav")
        return await client.post(f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Length=str(length), Upload_Metadata=metadata))

    largest = wav2mp3.Settings().max_upload_bytes
    assert (await create(largest, "huge-0")).status_code == 201
    before = await table_counts(database_url)
    flood = await create(largest, "huge-1")
    assert flood.status_code == 429 and "MAX_UNFINISHED_MB" in flood.json()["error"] and str(largest) in flood.json()["error"]
    assert await table_counts(database_url) == before
    assert (await create(1, "tiny")).status_code == 429  # one byte more than one largest upload
    [(huge,)] = await db_rows(database_url, "SELECT id FROM uploads WHERE user_id = $1", user["user_id"])
    assert (await client.delete(f"/users/{user['user_id']}/uploads/{huge}", headers=tus(user))).status_code == 204
    statuses = [(await create(1000, f"small-{n}")).status_code for n in range(101)]
    assert statuses == [201] * 100 + [429]
    refused = await create(1000, "one-more")
    assert refused.status_code == 429 and "MAX_UNFINISHED_UPLOADS" in refused.json()["error"]
    [(upload_id,)] = await db_rows(database_url, "SELECT id FROM uploads WHERE user_id = $1 AND filename = 'small-7.wav'", user["user_id"])
    assert (await client.delete(f"/users/{user['user_id']}/uploads/{upload_id}", headers=tus(user))).status_code == 204
    assert (await create(1000, "one-more")).status_code == 201
    assert (await create(1000, "and-another")).status_code == 429
    other = await new_user(client)  # a neighbour is not held up by this user's uploads
    assert (
        await client.post(
            f"/users/{other['user_id']}/uploads", headers=tus(other, Upload_Length="1000", Upload_Metadata=tus_metadata(filename="a.wav"))
        )
    ).status_code == 201


async def test_unfinished_uploads_of_everyone_are_bounded_by_unfinished_storage_mb(database_url: str) -> None:
    async with running_app(database_url):
        pass  # the schema
    now = wav2mp3.now()  # what other tests left unfinished in this database counts too, as the service counts it
    unfinished = f"SELECT COALESCE(SUM({wav2mp3.DECLARED}), 0) FROM uploads WHERE record_id IS NULL AND expires_at > $1"  # deferred: what it holds
    [(declared,)] = await db_rows(database_url, unfinished, now)
    budget_mb = int(declared) // wav2mp3.MIB + 2
    room = budget_mb * wav2mp3.MIB - int(declared)
    async with running_app(database_url, unfinished_storage_mb=budget_mb) as client:
        first, second = await new_user(client), await new_user(client)
        assert await tus_create(client, first, room - 100_000)
        refused = await client.post(
            f"/users/{second['user_id']}/uploads", headers=tus(second, Upload_Length="200000", Upload_Metadata=tus_metadata(filename="b.wav"))
        )
        assert refused.status_code == 503 and "UNFINISHED_STORAGE_MB" in refused.json()["error"] and refused.headers["retry-after"]
        assert await tus_create(client, second, 100_000)


async def test_upload_slots_are_shared_per_client_address_and_per_user(database_url: str) -> None:
    """On e37ff88 256 slow PATCHes from one address held every upload slot, and every bystander got 503. Now one
    address holds at most MAX_UPLOADS_PER_CLIENT of them, one user at most MAX_UPLOADS_PER_USER, whatever the route."""
    app, lifespan = await start_app(database_url, max_uploads_per_client=2, max_uploads_per_user=2)
    release = asyncio.Event()
    wav = make_wav(3.0, 44100, 2)

    async def held_body() -> AsyncIterator[bytes]:
        yield wav[:100_000]
        await release.wait()
        yield wav[100_000:]

    try:
        async with client_at(app, "127.0.0.2") as greedy, client_at(app, "127.0.0.3") as other, client_at(app, "127.0.0.5") as third:
            hog, bystander = await new_user(greedy), await new_user(other)
            urls = [await tus_create(greedy, hog, len(wav), f"hog-{n}.wav") for n in range(3)]
            held = [asyncio.create_task(greedy.patch(url, content=held_body(), headers=tus(hog, Upload_Offset="0", **OCTETS))) for url in urls[:2]]
            deadline = time.monotonic() + 20
            while metric((await other.get("/metrics")).text, "wav2mp3_uploads_in_progress") < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            refused = await tus_patch(greedy, bystander, await tus_create(greedy, bystander, len(wav), "b.wav"), 0, wav)
            assert refused.status_code == 503 and "MAX_UPLOADS_PER_CLIENT is 2" in refused.json()["error"] and refused.headers["retry-after"]
            by_user = await tus_patch(third, hog, urls[2], 0, wav)  # the same user from another address
            assert by_user.status_code == 503 and "MAX_UPLOADS_PER_USER is 2" in by_user.json()["error"]
            form = await third.post("/users/wav", **upload_form(hog, make_wav(1.0), "form.wav"))
            assert form.status_code == 503 and "MAX_UPLOADS_PER_USER" in form.json()["error"]
            assert (await upload(other, bystander, make_wav(1.0), "fair.wav")).status_code == 201  # a neighbour goes on
            release.set()
            assert [(await task).status_code for task in held] == [204, 204]
            assert (await tus_patch(greedy, hog, urls[2], 0, wav)).status_code == 204  # its slots came back
    finally:
        release.set()
        await lifespan.__aexit__(None, None, None)


async def test_encoder_threads_serve_users_in_turn(database_url: str) -> None:
    """One user's eight uploads at once wait behind each other for the encoder, not ahead of another user's one:
    a neighbour who starts the same conversion after them is answered before any of them. On e37ff88 (blocks in
    arrival order) it was answered last, with them; the same for a user's cold resumes (catch-ups), charged to it."""
    app, lifespan = await start_app(database_url, max_conversions=1)
    wav = make_wav(40.0, 44100, 2)  # 27 blocks: the hog's uploads are all under way long before any of them ends
    try:
        async with client_at(app, "127.0.0.2") as greedy, client_at(app, "127.0.0.3") as other:
            hog, bystander = await new_user(greedy), await new_user(other)
            answered: list[str] = []

            async def convert(client: httpx.AsyncClient, user: dict[str, str], name: str) -> None:
                body, headers = streamed_upload(user, (wav[start : start + 65536] for start in range(0, len(wav), 65536)), f"{name}.wav")

                async def network() -> AsyncIterator[bytes]:  # as a socket delivers it: 64 KiB at a time
                    for piece in body:
                        yield piece

                assert (await client.post("/users/wav", content=network(), headers=headers)).status_code == 201
                answered.append(name)

            hogging = [asyncio.create_task(convert(greedy, hog, f"hog-{n}")) for n in range(8)]
            deadline = time.monotonic() + 20
            while metric((await other.get("/metrics")).text, "wav2mp3_encoder_blocks_queued") < 6:  # the hog's backlog is there
                assert time.monotonic() < deadline and not answered
                await asyncio.sleep(0.01)
            await convert(other, bystander, "neighbour")
            await asyncio.gather(*hogging)
            assert answered[0] == "neighbour", answered
    finally:
        await lifespan.__aexit__(None, None, None)


def thread_niceness(native_id: int) -> int:
    """A thread's nice value, from /proc (field 19 of its stat; the name before it may hold spaces)."""
    return int(Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()[16])


async def test_one_owners_many_blocks_are_encoded_by_threads_that_yield_the_cpu(database_url: str) -> None:
    """Turns share the encoder threads, not the cores: an owner with several blocks in the pool at once (several
    uploads, catch-ups) has them encoded by threads of their own, of niceness BACKLOG_NICENESS, so that a
    neighbour's one upload neither waits for a thread they hold nor for the core (F3 of the benchmark); an owner's
    only block goes to a thread of the service's own priority. With one thread each (MAX_CONVERSIONS 1), both
    encode at once. On e78f94b every block went to the same threads; on 2fa5b33 both pools shared one bound."""

    async def encoder_metrics(client: httpx.AsyncClient) -> dict[str, float]:
        text = (await client.get("/metrics")).text
        counted = {priority: metric(text, "wav2mp3_encoder_blocks_total", priority=priority) for priority in ("first", "yielding")}
        return {**counted, "running": metric(text, "wav2mp3_encoder_blocks_running")}

    app, lifespan = await start_app(database_url, max_conversions=1)
    wav = make_wav(20.0, 44100, 2)  # 14 blocks: four at once have blocks in the pool together
    try:
        async with client_at(app, "127.0.0.2") as greedy, client_at(app, "127.0.0.3") as other:
            hog, bystander = await new_user(greedy), await new_user(other)
            before = await encoder_metrics(other)
            assert (await other.post("/users/wav", **upload_form(bystander, wav))).status_code == 201
            alone = await encoder_metrics(other)
            assert alone["first"] > before["first"] and alone["yielding"] == before["yielding"]  # one upload: one block at a time
            hogging = asyncio.gather(*(greedy.post("/users/wav", **upload_form(hog, wav, f"hog-{n}.wav")) for n in range(4)))
            while (await encoder_metrics(other))["yielding"] == alone["yielding"]:  # the hog's backlog is there
                await asyncio.sleep(0.005)
            neighbour = asyncio.ensure_future(other.post("/users/wav", **upload_form(bystander, wav, "beside.wav")))
            running = set()
            while not neighbour.done():
                running.add((await encoder_metrics(other))["running"])
                await asyncio.sleep(0.005)
            assert (await neighbour).status_code == 201 and not hogging.done(), "the neighbour waited for the hog"
            assert 2 in running, running  # one block of each pool at once, with MAX_CONVERSIONS 1
            assert [response.status_code for response in await hogging] == [201] * 4
            if sys.platform == "linux":
                base = thread_niceness(threading.main_thread().native_id or 0)
                encoders = [thread for thread in threading.enumerate() if thread.name.startswith("encode")]
                niceness = {thread.name.rsplit("_", 1)[0]: thread_niceness(thread.native_id or 0) - base for thread in encoders}
                assert niceness == {"encode": 0, "encode-yielding": wav2mp3.BACKLOG_NICENESS}
    finally:
        await lifespan.__aexit__(None, None, None)


async def test_a_checksummed_piece_is_bounded_on_the_temporary_disk(database_url: str) -> None:
    """A PATCH with Upload-Checksum waits on the temporary disk until it is checked: at most MAX_CHECKED_PIECE_MB
    of it, declared (Content-Length) or as it streams; past it 413 naming the bound, the piece dropped, the offset
    where it was. On e37ff88 one slow 64 MiB piece held a 64 MiB budget whole."""
    async with running_app(database_url, max_checked_piece_mb=1) as client:
        user = await new_user(client)
        wav = make_wav(20.0, 44100, 2)  # 3.5 MB
        url = await tus_create(client, user, len(wav))
        piece = wav[: 2 * wav2mp3.MIB]
        declared = await tus_patch(client, user, url, 0, piece, Upload_Checksum="sha1 " + sha1_b64(piece))
        assert declared.status_code == 413 and "MAX_CHECKED_PIECE_MB" in declared.json()["error"]

        async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: found as the bytes come
            for start in range(0, len(piece), 65536):
                yield piece[start : start + 65536]

        headers = tus(user, Upload_Offset="0", Upload_Checksum="sha1 " + sha1_b64(piece), **OCTETS)
        streaming = await client.patch(url, content=streamed(), headers=headers)
        assert streaming.status_code == 413 and "MAX_CHECKED_PIECE_MB" in streaming.json()["error"]
        assert (await client.head(url, headers=tus(user))).headers["upload-offset"] == "0"
        assert metric((await client.get("/metrics")).text, "wav2mp3_temp_disk_bytes") == 0
        for start in range(0, len(wav), wav2mp3.MIB):  # pieces within the bound go through
            part = wav[start : start + wav2mp3.MIB]
            assert (await tus_patch(client, user, url, start, part, Upload_Checksum="sha1 " + sha1_b64(part))).status_code == 204
        assert (await client.get(url, headers=bearer(user))).json()["filename"] == "call.mp3"


async def test_paused_uploads_give_their_temporary_disk_to_an_active_upload(database_url: str) -> None:
    """Paused resumable uploads keep their MP3 so far on the temporary disk. When an upload begins and more than half
    of TEMP_DISK_MB is taken, they give it back (and catch up from the database when they go on): on e37ff88 32
    paused uploads held the whole budget, and every bystander got 503 for minutes."""
    async with running_app(database_url, temp_disk_mb=1) as client:
        hoarder, bystander = await new_user(client), await new_user(client)
        wav = make_wav(8.0, 44100, 2)  # a first piece of 1 MB makes ~100 KB of MP3, spooled to the disk
        urls = [await tus_create(client, hoarder, len(wav), f"paused-{n}.wav") for n in range(10)]
        for url in urls:
            assert (await tus_patch(client, hoarder, url, 0, wav[:1_000_000])).status_code == 204
        # The paused sessions hold some of it, never more than about half: each upload that begins beyond half lets them go.
        assert 0 < metric((await client.get("/metrics")).text, "wav2mp3_temp_disk_bytes") < 0.75 * wav2mp3.MIB
        response = await upload(client, bystander, make_wav(30.0, 44100, 2), "bystander.wav")  # needs ~480 KB
        assert response.status_code == 201, response.text
        assert metric((await client.get("/metrics")).text, "wav2mp3_temp_disk_bytes") == 0
        # A paused upload goes on from the database: the same MP3 as a POST of the file.
        assert (await tus_patch(client, hoarder, urls[0], 1_000_000, wav[1_000_000:])).status_code == 204
        resumed = (await client.get(urls[0], headers=bearer(hoarder))).json()
        assert resumed["sha256"] == (await upload(client, bystander, wav, "paused-0.wav")).json()["sha256"]


async def test_head_and_empty_patches_of_a_cold_upload_never_re_encode_it(client: httpx.AsyncClient) -> None:
    """A cold upload (its live session let go: one of more than MAX_PAUSED_UPLOADS paused, or after a restart)
    re-encodes its stored bytes only for a PATCH that brings more. On e37ff88 an empty PATCH re-encoded the whole
    stored prefix (1.4 s of CPU for 16 MiB), and a HEAD started it ahead of time."""
    user = await new_user(client)
    wav = make_wav(3.0, 44100, 2)
    urls = [await tus_create(client, user, len(wav), f"cold-{n}.wav") for n in range(wav2mp3.MAX_PAUSED_UPLOADS + 1)]
    for url in urls:  # the first is the least recent paused one beyond MAX_PAUSED_UPLOADS: let go
        assert (await tus_patch(client, user, url, 0, wav[:300_000])).status_code == 204

    async def resumed() -> float:
        return metric((await client.get("/metrics")).text, "wav2mp3_resumable_uploads_total", event="resumed")

    before = await resumed()
    for _ in range(5):
        assert (await client.head(urls[0], headers=tus(user))).headers["upload-offset"] == "300000"
        empty = await tus_patch(client, user, urls[0], 300_000, b"")
        assert empty.status_code == 204 and empty.headers["upload-offset"] == "300000"
    await asyncio.sleep(0.2)  # a catch-up started in the background would have begun by now
    assert await resumed() == before
    assert (await tus_patch(client, user, urls[0], 300_000, wav[300_000:])).status_code == 204  # bytes: it catches up, once
    assert await resumed() == before + 1


@needs_nginx
def test_live_behind_nginx_each_client_has_its_own_share(tmp_path: Path) -> None:
    """deploy/nginx.conf in front, the app trusting it (TRUSTED_PROXIES, as compose sets it): the client nginx names
    in X-Forwarded-For is the one counted, not nginx, whose connections are not counted either."""
    args = ("--trusted-proxies", "127.0.0.1", "--user-creations-per-minute", "2", "--max-connections-per-client", "2")
    with LiveServer(tmp_path, f"sqlite:///{tmp_path / 'proxied.db'}", *args) as server, nginx_in_front(server.port, tmp_path) as port:

        def create(address: str) -> int:
            with httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30) as client:
                return client.post(f"http://127.0.0.1:{port}/users", json={"name": unique_name()}).status_code

        assert [create("127.0.0.2") for _ in range(3)] == [201, 201, 429]
        assert create("127.0.0.3") == 201
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # more connections from nginx than one client may hold
            assert set(pool.map(lambda n: httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code, range(40))) == {200}


def test_live_connections_are_shared_per_client_address(tmp_path: Path) -> None:
    """On e37ff88 2,100 connections from one address that never finished their headers took every connection, and a
    bystander's /health got 503. Now one address holds at most MAX_CONNECTIONS_PER_CLIENT; a trusted proxy's are
    not counted (it bounds its own clients)."""
    args = ("--max-connections-per-client", "5", "--trusted-proxies", "127.0.0.4")
    with LiveServer(tmp_path, f"sqlite:///{tmp_path / 'conns.db'}", *args) as server, contextlib.ExitStack() as stack:

        def connect(address: str) -> socket.socket:
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(address, 0)))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            return sock

        for _ in range(5):
            connect("127.0.0.2")
        refused = connect("127.0.0.2").recv(65536)
        assert refused.startswith(b"HTTP/1.1 503") and b"MAX_CONNECTIONS_PER_CLIENT is 5" in refused and b"retry-after" in refused.lower()
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3")) as neighbour:
            assert neighbour.get(server.url + "/health").status_code == 200
        proxied = [connect("127.0.0.4") for _ in range(8)]
        for sock in proxied:
            sock.sendall(b"\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert metric(httpx.get(server.url + "/metrics").text, "wav2mp3_overload_refusals_total", cap="connections_per_client") == 1


def test_live_connections_over_a_clients_share_are_answered_late(tmp_path: Path) -> None:
    """F5 of the benchmark: a client that connects again as soon as it is refused made the service answer 3,750
    refusals a second (fe7a1c5: each at once). Now a connection over its client's share is answered 503 after
    HELD_REFUSAL_SECONDS, reading nothing meanwhile (on uvloop too); held so, it takes no neighbour's place under MAX_CONNECTIONS,
    and beyond MAX_CONNECTIONS held at once the refusal is at once again."""
    args = ("--max-connections", "4", "--max-connections-per-client", "2")
    with LiveServer(tmp_path, f"sqlite:///{tmp_path / 'held.db'}", *args) as server, contextlib.ExitStack() as stack:

        def connect() -> socket.socket:
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=("127.0.0.2", 0)))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            return sock

        for _ in range(2):
            connect()  # its share
        began = time.monotonic()
        held = [connect() for _ in range(4)]  # MAX_CONNECTIONS of them held
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3")) as neighbour:
            assert neighbour.get(server.url + "/health").status_code == 200
        beyond = connect()
        assert beyond.recv(65536).startswith(b"HTTP/1.1 503")
        quiet_until = began + wav2mp3.HELD_REFUSAL_SECONDS / 2
        assert select.select(held, [], [], max(0.0, quiet_until - time.monotonic()))[0] == []  # not answered yet
        held[0].setblocking(False)  # and not read: what a held connection sends stops at the sockets' buffers
        sent, piece = 0, b"x" * 65536
        with contextlib.suppress(BlockingIOError):
            while sent < 256 * wav2mp3.MIB and time.monotonic() < began + wav2mp3.HELD_REFUSAL_SECONDS * 0.75:
                sent += held[0].send(piece)
        assert sent < 64 * wav2mp3.MIB, f"{sent} bytes read from a held connection"  # uvloop read 2.9 GB in 1.8 s (9ebecde)
        held[0].setblocking(True)
        for sock in held:
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 503") and b"MAX_CONNECTIONS_PER_CLIENT is 2" in answer, answer
        assert time.monotonic() - began >= wav2mp3.HELD_REFUSAL_SECONDS
        assert metric(httpx.get(server.url + "/metrics").text, "wav2mp3_overload_refusals_total", cap="connections_per_client") == 5


async def test_a_running_patch_stores_nothing_more_once_its_token_is_replaced(client: httpx.AsyncClient) -> None:
    """On e37ff88 the old token's PATCH stored all its bytes after a rotation. Now each store checks the token: the
    PATCH gets the 403 a new request with that token would, and what was stored before the rotation stays."""
    user = await new_user(client)
    wav = make_wav(6.0, 44100, 2)
    url = await tus_create(client, user, len(wav))
    rotated = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield wav[:300_000]  # past one store (FLUSH_BYTES)
        await rotated.wait()
        yield wav[300_000:]

    patching = asyncio.create_task(client.patch(url, content=body(), headers=tus(user, Upload_Offset="0", **OCTETS)))
    await asyncio.sleep(0.5)
    new = (await client.post(f"/users/{user['user_id']}/token", headers=bearer(user))).json()
    rotated.set()
    answer = await patching
    assert answer.status_code == 403 and answer.json() == {"error": wav2mp3.FORBIDDEN}
    head = await client.head(url, headers=tus(new))
    assert head.status_code == 200 and 0 < int(head.headers["upload-offset"]) <= 300_000


async def test_a_running_patch_past_its_uploads_expiry_stores_nothing_more(database_url: str) -> None:
    """On e37ff88 a slow PATCH that ran past its upload's expiry got 204 and its record was stored, while HEAD said 404."""
    async with running_app(database_url, upload_expiry_hours=2 / 3600) as client:
        user = await new_user(client)
        wav = make_wav(3.0, 44100, 2)
        url = await tus_create(client, user, len(wav))

        async def body() -> AsyncIterator[bytes]:
            yield wav[:100_000]
            await asyncio.sleep(2.5)  # the upload expires meanwhile
            yield wav[100_000:]

        answer = await client.patch(url, content=body(), headers=tus(user, Upload_Offset="0", **OCTETS))
        assert answer.status_code == 404 and answer.json() == {"error": wav2mp3.NO_SUCH_UPLOAD}
        assert (await client.head(url, headers=tus(user))).status_code == 404
        listing = await client.get(f"/users/{user['user_id']}/records", headers=bearer(user))
        assert listing.json()["records"] == []


# The page in a real browser ######################################################
# Debian's chromium, headless, driven through chromedriver by selenium; elements found as a person
# finds them, by their labels and their text.

Site = LiveServer | RemoteSite  # `site`: where the page is served
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAGE_WAIT = 90  # seconds: generous, for a slow CI machine; the waits end as soon as the page is there
SLOW_NETWORK = {"latency": 5, "download_throughput": 500 * 1024, "upload_throughput": 300 * 1024}


@contextlib.contextmanager
def chromium(profile: Path, language: str = "") -> Iterator[webdriver.Chrome]:
    """Debian's chromium, headless, driven by its chromedriver, with a fresh profile; in the browser's own
    language when given (`--lang` alone does not reach navigator.languages on Linux: the profile's
    `intl.accept_languages` does, as a person's choice in the settings would)."""
    if not CHROMEDRIVER.exists() or not CHROMIUM.exists():
        pytest.skip("the page's tests need chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *([f"--lang={language}"] if language else []),
    ):
        options.add_argument(argument)
    if language:
        options.add_experimental_option("prefs", {"intl.accept_languages": language})
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    driver.set_window_size(1280, 900)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """The browser of the module's page tests, in English (the language a browser has when nobody chose one)."""
    with chromium(tmp_path_factory.mktemp("chromium")) as driver:
        yield driver


@pytest.fixture
def russian_browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """A browser whose person reads Russian first, then English."""
    with chromium(tmp_path / "chromium", "ru,en") as driver:
        yield driver


def page_wait(browser: webdriver.Chrome, condition: Any, timeout: float = PAGE_WAIT) -> Any:
    """Wait until condition(browser) is truthy; elements not there yet, or redrawn meanwhile, are waited for too."""
    return WebDriverWait(browser, timeout, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(condition)


def page_field(browser: webdriver.Chrome, label: str) -> WebElement:
    """The form control that a <label> with this text names, as a person finds it."""
    found = browser.find_element(By.XPATH, f"//label[normalize-space()='{label}']")
    return browser.find_element(By.ID, found.get_attribute("for"))


def page_button(within: webdriver.Chrome | WebElement, text: str) -> WebElement:
    return within.find_element(By.XPATH, f".//button[normalize-space()='{text}']")


def page_network_normal(browser: webdriver.Chrome) -> None:
    with contextlib.suppress(WebDriverException):  # chromedriver refuses to delete conditions never set
        browser.delete_network_conditions()


def page_console_errors(browser: webdriver.Chrome) -> list[str]:
    """Console errors (script errors, CSP violations), leaving out the failed requests that a test provokes on
    purpose: Chrome logs every 4xx answer and dropped request as a "network" error."""
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE" and entry.get("source") != "network"]


def page_open(browser: webdriver.Chrome, site: Site) -> None:
    """The page, signed out, with nothing kept from an earlier test (credentials, resume fingerprints)."""
    page_network_normal(browser)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "light"}]})
    browser.get(site.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(site.url + "/")
    page_wait(browser, lambda d: page_field(d, "User ID").is_displayed())  # whatever the sign-up mode, once the page knows it
    browser.get_log("browser")  # start each test with an empty console


def page_sign_in(browser: webdriver.Chrome, site: Site, user: dict[str, str] | None = None) -> dict[str, str]:
    """A user (a new one unless given), signed in through the "Sign in" form."""
    user = user or site.new_user()
    page_open(browser, site)
    page_field(browser, "User ID").send_keys(user["user_id"])
    page_field(browser, "Access token").send_keys(user["access_token"])
    page_button(browser, "Sign in").click()
    page_wait(browser, lambda d: page_button(d, "Sign out").is_displayed())
    return user


def page_choose(browser: webdriver.Chrome, tmp_path: Path, files: dict[str, bytes], picker: str = "WAV files") -> None:
    """Write the files and choose them at once in the "WAV files" picker."""
    paths = []
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        paths.append(str(tmp_path / name))
    page_field(browser, picker).send_keys("\n".join(paths))


def page_upload_row(browser: webdriver.Chrome, filename: str) -> WebElement:
    """The row of a chosen file in the list the page calls "Uploads"."""
    return browser.find_element(By.XPATH, f"//ul[@aria-label='Uploads']/li[.//*[normalize-space()='{filename}']]")


def page_progress(browser: webdriver.Chrome, filename: str) -> float:
    return float(page_upload_row(browser, filename).find_element(By.TAG_NAME, "progress").get_attribute("value") or 0)


def page_finished(browser: webdriver.Chrome, filename: str) -> WebElement | None:
    """The "Download" link of a converted file's MP3 under "Your MP3s", once it is there (its row under
    "Uploads" has gone: a file is shown once)."""
    mp3 = Path(filename).stem + ".mp3"
    rows = browser.find_elements(By.XPATH, f"//h2[normalize-space()='Your MP3s']/ancestor::section[1]//ul/li[.//label[normalize-space()='{mp3}']]")
    links = rows[0].find_elements(By.XPATH, ".//a[normalize-space()='Download']") if rows else []
    return links[0] if links and links[0].is_displayed() else None


def page_records(browser: webdriver.Chrome) -> list[WebElement]:
    """The rows under the heading "Your MP3s", top to bottom."""
    return browser.find_elements(By.XPATH, "//h2[normalize-space()='Your MP3s']/ancestor::section[1]//ul/li")


def page_record_names(browser: webdriver.Chrome) -> list[str]:
    return [row.find_element(By.XPATH, "./div[1]/span[1]").text for row in page_records(browser)]


def page_record(browser: webdriver.Chrome, filename: str) -> WebElement:
    return browser.find_element(By.XPATH, f"//h2[normalize-space()='Your MP3s']/ancestor::section[1]//ul/li[.//*[normalize-space()='{filename}']]")


def page_listing(site: Site, user: dict[str, str]) -> list[dict[str, Any]]:
    response = httpx.get(f"{site.url}/users/{user['user_id']}/records", headers={"Authorization": f"Bearer {user['access_token']}"})
    assert response.status_code == 200
    return response.json()["records"]  # type: ignore[no-any-return]


def page_account(browser: webdriver.Chrome) -> str:
    """What the header says of the user signed in: "Signed in as <name>" and "used <bytes>[ of <quota>]"."""
    return browser.find_element(By.CLASS_NAME, "who").text


def page_usage(site: Site, user: dict[str, str]) -> dict[str, Any]:
    response = httpx.get(f"{site.url}/users/{user['user_id']}", headers={"Authorization": f"Bearer {user['access_token']}"})
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def page_create_user(browser: webdriver.Chrome, site: Site, name: str) -> dict[str, str] | None:
    """Create a user through the page's form: the credentials as the page shows them, or None when the name is taken."""
    page_open(browser, site)
    page_field(browser, "Name").send_keys(name)
    page_button(browser, "Create user").click()
    warning = "//p[contains(normalize-space(), 'only time your access token is shown')]"
    page_wait(browser, lambda d: "That name is taken" in d.find_element(By.TAG_NAME, "main").text or d.find_element(By.XPATH, warning).is_displayed())
    if not browser.find_element(By.XPATH, warning).is_displayed():
        return None

    def shown(label: str) -> str:
        return browser.find_element(By.XPATH, f"//*[@aria-labelledby=//*[normalize-space()='{label}']/@id]").text

    return {"user_id": shown("Your user ID"), "access_token": shown("Your access token")}


def test_page_creates_a_user_and_shows_its_token_once(browser: webdriver.Chrome, site: Site) -> None:
    name = unique_name("page")
    user = page_create_user(browser, site, name)
    assert user is not None
    assert page_listing(site, user) == []  # the id and token shown are the new user's, and they work
    assert len(browser.find_elements(By.XPATH, "//button[normalize-space()='Copy']")) == 2
    page_button(browser, "I have saved them").click()
    page_wait(browser, lambda d: user["access_token"] not in d.find_element(By.TAG_NAME, "body").text)
    browser.refresh()  # still signed in, and the token is not shown again
    page_wait(browser, lambda d: page_button(d, "Sign out").is_displayed())
    assert name in browser.find_element(By.TAG_NAME, "header").text
    assert user["access_token"] not in browser.find_element(By.TAG_NAME, "body").text
    page_button(browser, "Sign out").click()
    page_wait(browser, lambda d: page_field(d, "Name").is_displayed())
    assert browser.execute_script("return localStorage.length") == 0
    page_field(browser, "Name").send_keys(name)
    page_button(browser, "Create user").click()
    page_wait(browser, lambda d: "That name is taken" in d.find_element(By.TAG_NAME, "main").text)
    assert not page_console_errors(browser)


def test_page_sign_in_refuses_a_wrong_token(browser: webdriver.Chrome, site: Site) -> None:
    user = site.new_user()
    page_open(browser, site)
    page_field(browser, "User ID").send_keys(user["user_id"])
    page_field(browser, "Access token").send_keys(str(uuid.uuid4()))
    page_button(browser, "Sign in").click()
    page_wait(browser, lambda d: "Unknown user ID or wrong access token" in d.find_element(By.TAG_NAME, "main").text)
    assert page_field(browser, "Name").is_displayed()  # still signed out
    assert not page_console_errors(browser)


def page_batch(browser: webdriver.Chrome) -> str:
    """What the page says of all the files on their way together, under "Uploads" ("" when it says nothing)."""
    figures = browser.find_elements(By.XPATH, "//progress[@aria-label='All uploads']/following-sibling::p")
    return figures[0].text if figures and figures[0].is_displayed() else ""


def test_page_uploads_two_wavs_at_once_and_plays_both(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    user = page_sign_in(browser, site)
    files = {"morning.wav": make_wav(8.0, 44100, 2), "evening.wav": make_wav(8.0, 44100, 1)}  # 2.1 MB: 7 s at 300 KiB/s
    browser.set_network_conditions(offline=False, **SLOW_NETWORK)  # slow enough to see both on their way
    try:
        page_choose(browser, tmp_path, files)
        # Both upload at the same time: both have bytes up before either has all of them.
        page_wait(browser, lambda d: all(0 < page_progress(d, name) < len(files[name]) for name in files))
        # And together: files done of all, bytes, and the time left at the speed of the last seconds.
        together = r"0 of 2 files done · [\d.]+ (kB|MB) of 2\.1 MB · about \d+ seconds? left"
        assert page_wait(browser, lambda d: re.fullmatch(together, page_batch(d)))
    finally:
        page_network_normal(browser)
    for name in files:
        link = page_wait(browser, lambda d, name=name: page_finished(d, name))
        row = page_record(browser, name.replace(".wav", ".mp3"))  # moved to "Your MP3s", with its player
        player = row.find_element(By.TAG_NAME, "audio")
        assert player.is_displayed() and player.get_attribute("controls") is not None
        assert player.get_attribute("src") == link.get_attribute("href")
        assert "0:08" in row.text  # the duration
    page_wait(browser, lambda d: not d.find_elements(By.XPATH, "//ul[@aria-label='Uploads']/li"))  # shown once: no row left under "Uploads"
    assert page_batch(browser) == ""
    records = {record["filename"]: record for record in page_listing(site, user)}
    assert set(records) == {"morning.mp3", "evening.mp3"}
    for name in files:  # the link is the record's, and the MP3's size is shown
        record = records[name.replace(".wav", ".mp3")]
        link = page_finished(browser, name)
        assert link is not None and link.get_attribute("href") == record["url"]
        assert record["size_bytes"] > 10_000
    page_wait(browser, lambda d: set(page_record_names(d)) == {"morning.mp3", "evening.mp3"})  # and in "Your MP3s"
    assert not page_console_errors(browser)


def test_page_mp3_is_the_one_post_users_wav_makes(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    page_sign_in(browser, site)
    wav = make_wav(3.0, 48000, 2)
    page_choose(browser, tmp_path, {"same.wav": wav})
    link = page_wait(browser, lambda d: page_finished(d, "same.wav"))
    download = httpx.get(link.get_attribute("href"), timeout=60)
    assert download.status_code == 200 and download.headers["content-type"] == "audio/mpeg"
    direct = httpx.post(site.url + "/users/wav", **upload_form(site.new_user(), wav, "same.wav", bitrate="128"), timeout=60)
    assert direct.status_code == 201, direct.text
    direct_mp3 = httpx.get(site.url + record_path(direct.json()["url"]), timeout=60).content
    assert hashlib.sha256(download.content).hexdigest() == direct.json()["sha256"] == hashlib.sha256(direct_mp3).hexdigest()
    assert not page_console_errors(browser)


def test_page_lists_records_after_a_reload_and_deletes_one(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    user = page_sign_in(browser, site)
    for name in ("first.wav", "second.wav"):
        assert httpx.post(site.url + "/users/wav", **upload_form(user, make_wav(1.0), name), timeout=60).status_code == 201
    page_choose(browser, tmp_path, {"third.wav": make_wav(2.0)})
    page_wait(browser, lambda d: page_finished(d, "third.wav"))
    browser.refresh()
    page_wait(browser, lambda d: page_record_names(d) == ["third.mp3", "second.mp3", "first.mp3"])  # newest first
    for row in page_records(browser):
        assert str(row.find_element(By.TAG_NAME, "audio").get_attribute("src")).startswith(site.url + "/record?")
        assert row.find_element(By.XPATH, ".//a[normalize-space()='Download']").is_displayed()
    page_button(page_record(browser, "second.mp3"), "Delete").click()
    confirm = page_wait(browser, expected_conditions.alert_is_present())
    assert "second.mp3" in confirm.text
    confirm.accept()
    page_wait(browser, lambda d: page_record_names(d) == ["third.mp3", "first.mp3"])
    assert [record["filename"] for record in page_listing(site, user)] == ["third.mp3", "first.mp3"]
    page_button(page_record(browser, "first.mp3"), "Delete").click()
    page_wait(browser, expected_conditions.alert_is_present()).dismiss()  # "Cancel" in the confirmation keeps it
    browser.refresh()
    page_wait(browser, lambda d: page_record_names(d) == ["third.mp3", "first.mp3"])
    assert not page_console_errors(browser)


def test_page_shows_a_records_title_beside_its_name(browser: webdriver.Chrome, site: Site) -> None:
    user = page_sign_in(browser, site)
    titled = make_wav(1.0, before_data=info_list(INAM="Совещание 5 мая"))
    for wav, name in ((titled, "titled.wav"), (make_wav(1.0), "plain.wav")):
        assert httpx.post(site.url + "/users/wav", **upload_form(user, wav, name), timeout=60).status_code == 201
    browser.refresh()
    page_wait(browser, lambda d: page_record_names(d) == ["plain.mp3", "titled.mp3 — Совещание 5 мая"])
    assert not page_console_errors(browser)


def test_page_shows_records_twenty_at_a_time(browser: webdriver.Chrome, site: Site) -> None:
    user = page_sign_in(browser, site)
    wav = make_wav(0.2)
    for n in range(22):
        assert httpx.post(site.url + "/users/wav", **upload_form(user, wav, f"take-{n:02}.wav"), timeout=60).status_code == 201
    browser.refresh()
    page_wait(browser, lambda d: len(page_records(d)) == 20)
    assert page_record_names(browser)[0] == "take-21.mp3"
    page_button(browser, "More").click()
    page_wait(browser, lambda d: len(page_records(d)) == 22)
    assert page_record_names(browser) == [f"take-{n:02}.mp3" for n in range(21, -1, -1)]
    page_wait(browser, lambda d: not page_button(d, "More").is_displayed())
    assert not page_console_errors(browser)


def test_page_says_an_mp3_is_not_a_wav(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    user = page_sign_in(browser, site)
    page_choose(browser, tmp_path, {"song.mp3": b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(4096)})
    page_wait(browser, lambda d: "This is not a WAV file (it looks like MP3)" in page_upload_row(d, "song.mp3").text)
    row = page_upload_row(browser, "song.mp3")
    assert "{" not in row.text and "415" not in row.text  # words for people, never the raw answer
    assert not [button.text for button in row.find_elements(By.TAG_NAME, "button") if button.is_displayed()]  # nothing to pause or cancel
    assert page_listing(site, user) == []
    assert not page_console_errors(browser)


def test_page_explains_a_name_already_converted(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    user = page_sign_in(browser, site)
    assert httpx.post(site.url + "/users/wav", **upload_form(user, make_wav(0.5), "twice.wav"), timeout=60).status_code == 201
    page_choose(browser, tmp_path, {"twice.wav": make_wav(0.5)})
    page_wait(browser, lambda d: "A file with this name is already converted" in page_upload_row(d, "twice.wav").text)
    # Delete it below, then "Try again" converts the file.
    page_wait(browser, lambda d: page_record_names(d) == ["twice.mp3"])
    page_button(page_record(browser, "twice.mp3"), "Delete").click()
    page_wait(browser, expected_conditions.alert_is_present()).accept()
    page_wait(browser, lambda d: page_record_names(d) == [])
    page_button(page_upload_row(browser, "twice.wav"), "Try again").click()
    page_wait(browser, lambda d: page_finished(d, "twice.wav"))
    page_wait(browser, lambda d: page_record_names(d) == ["twice.mp3"])
    assert not page_console_errors(browser)


def test_page_shows_the_users_name_and_usage_after_signing_in_again(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    user = page_sign_in(browser, site)
    usage = page_usage(site, user)
    of_quota = "" if usage["quota_bytes"] is None else " of "  # the quota, when the site has one
    page_wait(browser, lambda d: page_account(d).startswith(f"Signed in as {usage['name']}\nused 0 bytes{of_quota}"))
    page_choose(browser, tmp_path, {"hello.wav": make_wav(2.0)})
    page_wait(browser, lambda d: page_finished(d, "hello.wav"))
    stored = page_usage(site, user)["bytes_stored"]
    assert 10_000 <= stored < 999_500  # the page says it in kB, rounded
    used = f"Signed in as {usage['name']}\nused {round(stored / 1000)} kB{of_quota}"
    page_wait(browser, lambda d: page_account(d).startswith(used))  # refreshed once the upload is done
    browser.refresh()  # signed in again with the credentials the page kept
    page_wait(browser, lambda d: page_account(d).startswith(used))
    # As a page before this one kept them, without the name: the header still names the user, not its ID.
    kept = {"user_id": user["user_id"], "access_token": user["access_token"]}
    browser.execute_script("localStorage.setItem('wav2mp3.auth', JSON.stringify(arguments[0]))", kept)
    browser.refresh()
    page_wait(browser, lambda d: page_account(d).startswith(used))
    assert user["user_id"] not in browser.find_element(By.TAG_NAME, "header").text
    page_button(page_record(browser, "hello.mp3"), "Delete").click()
    page_wait(browser, expected_conditions.alert_is_present()).accept()
    page_wait(browser, lambda d: page_account(d).startswith(f"Signed in as {usage['name']}\nused 0 bytes{of_quota}"))  # refreshed after a deletion
    assert not page_console_errors(browser)


@pytest.fixture(scope="module")
def operated(tmp_path_factory: pytest.TempPathFactory, postgresql_url: str) -> Iterator[LiveServer]:
    """A service run for a team: sign-up by invite, the operator's token, 1 MiB kept per user, MP3s kept 30 days."""
    directory = tmp_path_factory.mktemp("operated")
    settings = ["--signup", "invite", "--admin-token", ADMIN_TOKEN, "--user-quota-mb", "1", "--retention-days", "30"]
    with LiveServer(directory, postgresql_url or f"sqlite:///{directory / 'operated.db'}", *settings) as server:
        yield server


def page_invite_field(browser: webdriver.Chrome) -> WebElement | None:
    """The "Invite code" field of the create-user form, if the page shows it."""
    labels = browser.find_elements(By.XPATH, "//label[normalize-space()='Invite code']")
    return page_field(browser, "Invite code") if labels and page_field(browser, "Invite code").is_displayed() else None


def test_page_asks_for_an_invite_code_only_when_sign_up_needs_one(browser: webdriver.Chrome, site: Site, operated: LiveServer) -> None:
    page_open(browser, site)
    assert page_field(browser, "Name").is_displayed() and page_invite_field(browser) is None  # open sign-up: no code to give
    page_open(browser, operated)
    invite = page_wait(browser, page_invite_field)
    name = unique_name("invited")
    page_field(browser, "Name").send_keys(name)
    invite.send_keys("not-a-code")
    page_button(browser, "Create user").click()
    page_wait(browser, lambda d: "This invite code is unknown, used up or expired" in d.find_element(By.TAG_NAME, "main").text)  # the service's words
    code = httpx.post(operated.url + "/admin/invites", json={"uses": 1}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["invite"]
    invite.clear()
    invite.send_keys(code)
    page_button(browser, "Create user").click()
    page_wait(browser, lambda d: page_button(d, "I have saved them").is_displayed())
    page_wait(browser, lambda d: page_account(d) == f"Signed in as {name}\nused 0 bytes of 1.0 MB")  # 1 MiB
    assert "MP3s are kept 30 days, then deleted." in browser.find_element(By.TAG_NAME, "main").text
    assert not page_console_errors(browser)


def test_page_shows_a_quota_refusal_in_the_services_words(browser: webdriver.Chrome, operated: LiveServer, tmp_path: Path) -> None:
    made = httpx.post(operated.url + "/admin/users", json={"name": unique_name("full")}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert made.status_code == 201
    page_sign_in(browser, operated, made.json())
    page_choose(browser, tmp_path, {"too-long.wav": make_wav(70.0, 8000, 1)})  # 1.1 MB: more than the 1 MiB quota
    page_wait(browser, lambda d: "Not enough room left for this file" in page_upload_row(d, "too-long.wav").text)
    row = page_upload_row(browser, "too-long.wav")
    assert "would pass this user's quota: 0.00 MiB (0 bytes) of 1.00 MiB (1048576 bytes) used" in row.text
    assert page_button(row, "Try again").is_displayed()  # once MP3s are deleted it may fit
    assert not page_console_errors(browser)


def test_page_says_the_operator_creates_users_when_sign_up_is_closed(browser: webdriver.Chrome, tmp_path: Path, postgresql_url: str) -> None:
    with LiveServer(tmp_path, postgresql_url or f"sqlite:///{tmp_path / 'closed.db'}", "--signup", "closed", "--admin-token", ADMIN_TOKEN) as closed:
        name = unique_name("closed")
        made = httpx.post(closed.url + "/admin/users", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert made.status_code == 201
        page_open(browser, closed)
        assert "The operator of this service creates its users" in browser.find_element(By.TAG_NAME, "main").text
        assert not page_field(browser, "Name").is_displayed() and not page_button(browser, "Create user").is_displayed()
        page_sign_in(browser, closed, made.json())  # those the operator made sign in as ever
        page_wait(browser, lambda d: page_account(d) == f"Signed in as {name}\nused 0 bytes")
        assert not page_console_errors(browser)


@pytest.mark.slow
def test_page_upload_finishes_by_itself_after_the_network_drops(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    user = page_sign_in(browser, site)
    wav = make_wav(36.0, 44100, 2)  # ~6.3 MB: more than one 5 MiB PATCH, ~6 s at 1 MiB/s
    network = {**SLOW_NETWORK, "upload_throughput": 1024 * 1024}
    browser.set_network_conditions(offline=False, **network)
    try:
        page_choose(browser, tmp_path, {"long-take.wav": wav})
        page_wait(browser, lambda d: page_progress(d, "long-take.wav") > 1_000_000)
        browser.set_network_conditions(offline=True, **network)
        page_wait(browser, lambda d: any(words in page_upload_row(d, "long-take.wav").text for words in ("offline", "connection dropped")))
        time.sleep(3)  # a few seconds without a network, on purpose
        assert page_finished(browser, "long-take.wav") is None
        browser.set_network_conditions(offline=False, **network)
        link = page_wait(browser, lambda d: page_finished(d, "long-take.wav"), timeout=180)  # nobody clicks anything
    finally:
        page_network_normal(browser)
    [record] = page_listing(site, user)
    assert record["filename"] == "long-take.mp3" and abs(record["duration_seconds"] - 36.0) < 0.01
    assert link.get_attribute("href") == record["url"]
    assert hashlib.sha256(httpx.get(record["url"], timeout=60).content).hexdigest() == record["sha256"]
    direct = httpx.post(site.url + "/users/wav", **upload_form(site.new_user(), wav, "long-take.wav", bitrate="128"), timeout=120)
    assert direct.json()["sha256"] == record["sha256"]  # resumed mid-way, the MP3 is still the very same
    assert browser.execute_script("return Object.keys(localStorage).filter(k => k.includes('upload')).length") == 0  # fingerprint gone
    assert not page_console_errors(browser)


def page_unfinished_row(browser: webdriver.Chrome, filename: str) -> WebElement:
    """The row of an upload listed under "Unfinished uploads"."""
    section = "//h2[normalize-space()='Unfinished uploads']/ancestor::section[1]"
    return browser.find_element(By.XPATH, f"{section}//ul/li[.//*[normalize-space()='{filename}']]")


def page_unfinished_names(browser: webdriver.Chrome) -> list[str]:
    rows = browser.find_elements(By.XPATH, "//h2[normalize-space()='Unfinished uploads']/ancestor::section[1]//ul/li")
    return [row.find_element(By.CLASS_NAME, "name").text for row in rows if row.is_displayed()]


def page_unfinished_listing(site: Site, user: dict[str, str]) -> list[dict[str, Any]]:
    """GET /users/{id}/uploads: the user's unfinished uploads as the service lists them."""
    response = httpx.get(f"{site.url}/users/{user['user_id']}/uploads", headers={"Authorization": f"Bearer {user['access_token']}"})
    assert response.status_code == 200
    return response.json()["uploads"]  # type: ignore[no-any-return]


def page_begin_upload(site: Site, user: dict[str, str], wav: bytes, filename: str, sent: int, **options: str) -> str:
    """An upload begun elsewhere (another device, a script): created with its first `sent` bytes; its URL."""
    headers = tus(user, Upload_Length=str(len(wav)), Upload_Metadata=tus_metadata(filename=filename, **options), **OCTETS)
    created = httpx.post(f"{site.url}/users/{user['user_id']}/uploads", headers=headers, content=wav[:sent], timeout=60)
    assert created.status_code == 201 and int(created.headers["upload-offset"]) == sent, created.text
    return created.headers["location"]


def page_choose_to_continue(row: WebElement, path: Path) -> None:
    """Choose a file with a row's "Choose the file to continue" (the file input its label names)."""
    label = row.find_element(By.XPATH, ".//label[normalize-space()='Choose the file to continue']")
    row.find_element(By.ID, label.get_attribute("for")).send_keys(str(path))


def test_page_lists_an_upload_cut_by_a_reload_and_goes_on_with_it(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    user = page_sign_in(browser, site)
    wav = make_wav(36.0, 44100, 2)  # 6.4 MB: more than one PATCH of 5 MiB
    browser.set_network_conditions(offline=False, **SLOW_NETWORK)
    try:
        page_choose(browser, tmp_path, {"lecture.wav": wav})
        page_wait(browser, lambda d: page_progress(d, "lecture.wav") > 1_500_000)
        # What this browser kept of the upload is forgotten: as on another device, only the service knows it now.
        browser.execute_script("for (const key of Object.keys(localStorage)) if (key.startsWith('wav2mp3.upload:')) localStorage.removeItem(key)")
        browser.refresh()  # cuts the PATCH on its way
    finally:
        page_network_normal(browser)
    row = page_wait(browser, lambda d: page_unfinished_row(d, "lecture.wav"))
    [listed] = page_unfinished_listing(site, user)
    assert (listed["filename"], listed["length"]) == ("lecture.wav", len(wav)) and 0 < listed["offset"] < len(wav)
    head = httpx.head(listed["url"], headers=tus(user))
    assert head.status_code == 200 and int(head.headers["upload-offset"]) > 0  # the resume starts past the beginning
    assert re.search(r"[\d.]+ MB of 6\.4 MB uploaded \(\d+%\) · can be continued until ", row.text)
    assert not browser.find_elements(By.XPATH, "//ul[@aria-label='Uploads']/li")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "lecture.wav").write_bytes(wav[: len(wav) // 2])  # the same name, another file
    page_choose_to_continue(row, tmp_path / "other" / "lecture.wav")
    page_wait(browser, lambda d: "That is another file: choose “lecture.wav” of 6.4 MB." in page_unfinished_row(d, "lecture.wav").text)
    page_choose_to_continue(row, tmp_path / "lecture.wav")
    link = page_wait(browser, lambda d: page_finished(d, "lecture.wav"), timeout=180)
    assert page_unfinished_names(browser) == [] and page_unfinished_listing(site, user) == []
    finished = httpx.get(listed["url"], headers={"Authorization": f"Bearer {user['access_token']}"})  # the listed upload is the one completed
    assert finished.status_code == 200 and finished.json()["url"] == link.get_attribute("href")
    direct = httpx.post(site.url + "/users/wav", **upload_form(site.new_user(), wav, "lecture.wav", bitrate="128"), timeout=120)
    assert finished.json()["sha256"] == direct.json()["sha256"]  # the MP3 a POST of the file gives
    assert not page_console_errors(browser)


def test_page_goes_on_with_an_upload_begun_elsewhere_when_its_file_is_chosen(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    user = site.new_user()
    wav = make_wav(3.0, 44100, 2)
    begun = page_begin_upload(site, user, wav, "begun.wav", 200_000, bitrate="96")
    piece = httpx.post(f"{site.url}/users/{user['user_id']}/uploads", headers=tus(user, Upload_Length="1000", Upload_Concat="partial"))
    assert piece.status_code == 201  # a piece of a parallel upload: no name, nothing to go on with by hand
    page_sign_in(browser, site, user)
    row = page_wait(browser, lambda d: page_unfinished_row(d, "begun.wav"))
    assert "200 kB of 529 kB uploaded (38%)" in row.text
    assert page_unfinished_names(browser) == ["begun.wav"]
    page_choose(browser, tmp_path, {"begun.wav": wav})  # the usual picker: matched by name and size
    link = page_wait(browser, lambda d: page_finished(d, "begun.wav"))
    finished = httpx.get(begun, headers={"Authorization": f"Bearer {user['access_token']}"})
    assert finished.status_code == 200 and finished.json()["url"] == link.get_attribute("href")
    direct = httpx.post(site.url + "/users/wav", **upload_form(site.new_user(), wav, "begun.wav", bitrate="96"), timeout=60)
    assert finished.json()["sha256"] == direct.json()["sha256"]  # with the settings it was begun with, not the page's 128 kbps
    assert page_unfinished_names(browser) == []
    assert [upload["filename"] for upload in page_unfinished_listing(site, user)] == [None]
    assert not page_console_errors(browser)


def test_page_deletes_an_unfinished_upload(browser: webdriver.Chrome, site: Site) -> None:
    user = site.new_user()
    wav = make_wav(2.0)
    begun = page_begin_upload(site, user, wav, "draft.wav", 50_000)
    page_sign_in(browser, site, user)
    row = page_wait(browser, lambda d: page_unfinished_row(d, "draft.wav"))
    page_button(row, "Delete").click()
    page_wait(browser, expected_conditions.alert_is_present()).dismiss()  # "Cancel" keeps it
    assert page_unfinished_names(browser) == ["draft.wav"]
    page_button(row, "Delete").click()
    confirm = page_wait(browser, expected_conditions.alert_is_present())
    assert "draft.wav" in confirm.text
    confirm.accept()
    page_wait(browser, lambda d: page_unfinished_names(d) == [])
    assert page_unfinished_listing(site, user) == []
    assert httpx.head(begun, headers=tus(user)).status_code == 404  # terminated: its name is free
    assert not browser.find_element(By.XPATH, "//h2[normalize-space()='Unfinished uploads']").is_displayed()
    assert not page_console_errors(browser)


def test_page_downloads_the_chosen_mp3s_as_one_zip(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    user = site.new_user()
    for name, seconds in (("one.wav", 1.0), ("two.wav", 1.5), ("three.wav", 2.0)):
        assert httpx.post(site.url + "/users/wav", **upload_form(user, make_wav(seconds), name), timeout=60).status_code == 201
    records = {record["filename"]: record for record in page_listing(site, user)}
    page_sign_in(browser, site, user)
    page_wait(browser, lambda d: len(page_records(d)) == 3)
    assert page_button(browser, "Download all as ZIP").is_displayed()
    page_field(browser, "Select all").click()
    page_wait(browser, lambda d: page_button(d, "Download 3 selected as ZIP"))
    page_field(browser, "Select all").click()
    page_field(browser, "one.mp3").click()
    page_field(browser, "three.mp3").click()
    assert page_field(browser, "Select all").get_property("indeterminate")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        page_button(browser, "Download 2 selected as ZIP").click()
        [archive] = page_wait(browser, lambda d: [p for p in downloads.iterdir() if p.suffix == ".zip"])  # .crdownload until it is whole
    finally:
        browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "default"})
    assert "Your ZIP of 2 MP3s is downloading" in browser.find_element(By.TAG_NAME, "main").text
    with zipfile.ZipFile(archive) as opened:
        assert sorted(opened.namelist()) == ["one.mp3", "three.mp3"]
        for name in opened.namelist():
            assert opened.read(name) == httpx.get(records[name]["url"], timeout=60).content
    assert not page_console_errors(browser)


def test_page_copies_a_records_link_and_says_what_it_gives(browser: webdriver.Chrome, site: Site) -> None:
    user = site.new_user()
    assert httpx.post(site.url + "/users/wav", **upload_form(user, make_wav(1.0), "shared.wav"), timeout=60).status_code == 201
    [record] = page_listing(site, user)
    page_sign_in(browser, site, user)
    row = page_wait(browser, lambda d: page_record(d, "shared.mp3"))
    browser.execute_cdp_cmd("Browser.grantPermissions", {"origin": site.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    try:
        page_button(row, "Copy link").click()
        page_wait(browser, lambda d: "Link copied." in page_record(d, "shared.mp3").text)
        copied = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0], (error) => arguments[0](String(error)))")
    finally:
        browser.execute_cdp_cmd("Browser.resetPermissions", {})
    assert copied == record["url"]
    assert "Anyone with this link can download this MP3; delete the MP3 to revoke it." in row.text
    field = row.find_element(By.XPATH, ".//input[@aria-label='Link to shared.mp3']")
    assert field.get_property("value") == record["url"]
    # Without the clipboard (its permission refused), the link is selected whole, for the person to copy.
    browser.execute_script("arguments[0].setSelectionRange(0, 0)", field)
    browser.execute_cdp_cmd("Browser.setPermission", {"origin": site.url, "permission": {"name": "clipboard-write"}, "setting": "denied"})
    try:
        page_button(row, "Copy link").click()
        page_wait(browser, lambda d: field.get_property("selectionEnd") == len(record["url"]) and field.get_property("selectionStart") == 0)
    finally:
        browser.execute_cdp_cmd("Browser.resetPermissions", {})
    assert not page_console_errors(browser)


def page_overflowing(browser: webdriver.Chrome) -> list[str]:
    """What does not fit: a page wider than the window, a control out of it, or a choice its <select> cuts
    (a copy at its natural width, which fits its longest option, is wider than it)."""
    return browser.execute_script(
        """
        const found = [];
        if (document.documentElement.scrollWidth > innerWidth) found.push('page: ' + document.documentElement.scrollWidth + ' px');
        for (const element of document.querySelectorAll('button, a, input, select, label, progress, audio, h1, h2, p')) {
          const box = element.getBoundingClientRect();
          const input = element.matches('input[type=file]');  // drawn as its label
          if (!input && box.width && (box.left < 0 || box.right > innerWidth)) found.push(element.outerHTML.slice(0, 80));
        }
        for (const select of document.querySelectorAll('select')) {
          const natural = select.cloneNode(true);
          natural.style.cssText = 'width: auto; max-width: none; flex: none';
          select.after(natural);
          if (natural.getBoundingClientRect().width > select.getBoundingClientRect().width + 0.5) found.push('#' + select.id + ' cuts its choices');
          natural.remove();
        }
        return found;
        """
    )


def test_page_fits_every_width_down_to_320_pixels(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    user = site.new_user()
    assert httpx.post(site.url + "/users/wav", **upload_form(user, make_wav(1.0), "A rather long recording name.wav"), timeout=60).status_code == 201
    page_begin_upload(site, user, make_wav(2.0), "Interview, part two.wav", 100_000)
    page_sign_in(browser, site, user)
    page_choose(browser, tmp_path, {"not-a-wav.mp3": b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(4096)})  # a row under "Uploads"
    page_wait(browser, lambda d: "This is not a WAV file" in page_upload_row(d, "not-a-wav.mp3").text)
    page_wait(browser, lambda d: page_unfinished_row(d, "Interview, part two.wav") and page_records(d))
    browser.find_element(By.XPATH, "//summary[contains(., 'MP3 settings')]").click()
    page_field(browser, "Variable (VBR)").click()
    page_button(page_record(browser, "A rather long recording name.mp3"), "Copy link").click()
    try:
        for language in ("English", "Русский"):
            for width in (1280, 390, 320):
                metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": width < 1000}
                browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
                assert browser.execute_script("return innerWidth") == width
                assert page_overflowing(browser) == [], (language, width)
            if language == "English":
                browser.find_element(By.XPATH, "//button[normalize-space()='Русский']").click()
                page_wait(browser, lambda d: d.find_element(By.TAG_NAME, "html").get_attribute("lang") == "ru")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert not page_console_errors(browser)


def page_text(browser: webdriver.Chrome) -> str:
    return browser.find_element(By.TAG_NAME, "body").text


def test_page_speaks_russian_to_a_russian_browser_and_keeps_the_language_chosen(
    russian_browser: webdriver.Chrome, site: Site, tmp_path: Path
) -> None:
    browser = russian_browser
    user = site.new_user()
    assert httpx.post(site.url + "/users/wav", **upload_form(user, make_wav(2.0), "запись.wav"), timeout=60).status_code == 201
    browser.get(site.url + "/")
    page_wait(browser, lambda d: page_field(d, "ID пользователя").is_displayed())
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "ru"
    assert browser.title == "wav2mp3 — конвертация WAV-записей в MP3"
    for heading in ("Конвертируйте WAV-записи в MP3", "Впервые здесь?", "Уже были здесь?"):
        assert browser.find_element(By.XPATH, f"//*[self::h1 or self::h2][normalize-space()='{heading}']").is_displayed()
    assert page_button(browser, "Создать пользователя").is_displayed()
    page_field(browser, "ID пользователя").send_keys(user["user_id"])
    page_field(browser, "Ключ доступа").send_keys(user["access_token"])
    page_button(browser, "Войти").click()
    page_wait(browser, lambda d: page_button(d, "Выйти").is_displayed())
    row = page_wait(browser, lambda d: d.find_element(By.XPATH, "//h2[normalize-space()='Ваши MP3']/ancestor::section[1]//ul/li"))
    assert [page_button(row, text).is_displayed() for text in ("Копировать ссылку", "Удалить")] == [True, True]
    assert row.find_element(By.XPATH, ".//a[normalize-space()='Скачать']").is_displayed()
    assert re.search(r"0:02 · \d+(,\d)? кБ · \d{1,2} [а-я]{3,4}\. \d{4} г\., \d{1,2}:\d\d", row.text)  # Russian numbers and dates
    page_wait(browser, lambda d: re.fullmatch(r"Вы вошли как \S+\nзанято \d+(,\d)? кБ", page_account(d)))
    for heading in ("Конвертация WAV-файлов", "Ваши MP3"):
        assert browser.find_element(By.XPATH, f"//h1[normalize-space()='{heading}'] | //h2[normalize-space()='{heading}']").is_displayed()
    assert page_field(browser, "WAV-файлы").get_attribute("type") == "file"
    assert page_button(browser, "Скачать все ZIP-архивом").is_displayed()
    page_choose(browser, tmp_path, {"песня.mp3": b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(4096)}, "WAV-файлы")
    page_wait(browser, lambda d: "Это не WAV-файл (похоже на MP3)" in page_text(d))
    # The switch: English, and so it stays after a reload, whatever the browser prefers.
    page_button(browser, "English").click()
    page_wait(browser, lambda d: page_records(d) and page_button(d, "Sign out").is_displayed())
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
    assert "This is not a WAV file (it looks like MP3)" in page_text(browser)  # what was said, said again in English
    assert not re.search("[а-яё]", page_text(browser).replace("запись", "").replace("песня", "").replace("Русский", ""), re.IGNORECASE)
    browser.refresh()
    page_wait(browser, lambda d: page_records(d) and page_button(d, "Sign out").is_displayed())
    assert page_button(browser, "Русский").is_displayed() and browser.title == "wav2mp3 – convert WAV recordings to MP3"
    assert not page_console_errors(browser)


def test_page_strings_are_in_every_language_and_every_key_the_page_uses_is_there() -> None:
    tables = {language: json.loads((HERE / "static" / "i18n" / f"page.{language}.json").read_text(encoding="utf-8")) for language in ("en", "ru")}
    categories = {"en": {"one", "other"}, "ru": {"one", "few", "many", "other"}}  # Intl.PluralRules' for each

    def forms(language: str, key: str) -> dict[str, str]:
        text = tables[language][key]
        if isinstance(text, dict):
            assert set(text) == categories[language], (language, key)
            return text  # type: ignore[no-any-return]
        return {"": text}

    assert set(tables["en"]) == set(tables["ru"]), set(tables["en"]) ^ set(tables["ru"])
    for key in tables["en"]:
        holes = {language: {hole for text in forms(language, key).values() for hole in re.findall(r"\{(\w+)\}", text)} for language in tables}
        assert holes["en"] == holes["ru"], (key, holes)
    html = (HERE / "static" / "index.html").read_text(encoding="utf-8")
    script = (HERE / "static" / "app.js").read_text(encoding="utf-8")
    used = set(re.findall(r'data-t(?:-aria-label)?="([^"]+)"', html)) | set(re.findall(r"'((?:[a-z]+\.)?[a-z][A-Za-z]+(?:\.[A-Za-z]+)*)'", script))
    built = {f"upload.{action}File" for action in ("pause", "resume", "cancel", "retry", "restart")} if "`upload.${action}File`" in script else set()
    assert not set(tables["en"]) - used - built, "keys no page code uses"
    storage = (".auth", ".options", ".language")  # localStorage's keys, not the tables'
    assert not {key for key in used if "." in key and not key.endswith(storage)} - set(tables["en"]), "keys missing"


def test_page_weighs_at_most_100_kb() -> None:
    """Everything the page loads in its heavier language (Russian: two bytes a letter), before compression."""
    files = ["index.html", "style.css", "app.js", "icon.svg", "i18n/page.en.json", "i18n/page.ru.json"]
    sizes = {name: len((HERE / "static" / name).read_bytes()) for name in files}
    assert sum(sizes.values()) - min(sizes["i18n/page.en.json"], sizes["i18n/page.ru.json"]) <= 100_000, sizes


@pytest.mark.screenshot
def test_page_screenshot_for_the_docs(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    """docs/page.png: the page at 1280x900, light, signed in, with finished files and records."""
    user = page_create_user(browser, site, "Ada Lovelace") or page_create_user(browser, site, unique_name("Ada"))
    assert user is not None
    page_button(browser, "I have saved them").click()
    for name, seconds in (("Choir rehearsal.wav", 95.0), ("Interview with Grace.wav", 61.0)):
        response = httpx.post(site.url + "/users/wav", **upload_form(user, make_wav(seconds, 22050, 1), name), timeout=120)
        assert response.status_code == 201
    browser.refresh()
    page_wait(browser, lambda d: len(page_records(d)) == 2)
    page_choose(browser, tmp_path, {"Birdsong at dawn.wav": make_wav(12.0, 44100, 2, freq=880), "Voice memo.wav": make_wav(7.0, 44100, 1)})
    for name in ("Birdsong at dawn.wav", "Voice memo.wav"):
        page_wait(browser, lambda d, name=name: page_finished(d, name))
    page_wait(browser, lambda d: len(page_records(d)) == 4)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "light"}]})
    browser.set_window_size(1280, 900)
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    try:
        browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
        time.sleep(0.5)  # let the colours' transitions end
        png = browser.get_screenshot_as_png()
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1280, 900)
    (HERE / "docs" / "page.png").write_bytes(png)
    assert not page_console_errors(browser)


# Work-arounds of library internals, pinned ######################################


async def test_sqlite_connections_are_reused(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """databases 0.9 opens an SQLite connection (and a thread) per request; Store installs a pool over its private
    `_backend._pool`. If that stops taking effect, connections are opened again per request and this fails."""
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite only")
    opened = []
    real_connect = sqlite3.connect  # what databases' own pool (through aiosqlite.connect) and this one open connections with
    monkeypatch.setattr(sqlite3, "connect", lambda *args, **kwargs: opened.append(1) or real_connect(*args, **kwargs))
    async with running_app(database_url) as client:
        user = await new_user(client)
        body, _ = await uploaded(client, make_wav(0.5))
        for _ in range(20):
            assert (await client.get(record_path(body["url"]))).status_code == 200
            assert (await client.get("/health")).status_code == 200
        await upload(client, user, make_wav(0.3))
    assert 1 <= len(opened) <= 3, len(opened)


async def test_a_cancelled_read_leaves_no_old_snapshot_to_the_next_request(database_url: str) -> None:
    """Users made at once, each creating resumable uploads and completing one, with a DB_TIMEOUT so short that many
    calls pass it (503). A call cancelled while its statement ran in aiosqlite's thread left that statement open on its
    pooled connection: the next request there read in its old snapshot (a valid token was 403, its user made since;
    an upload 404), or wrote in its transaction (users answered 201 were never committed, and the write lock it held
    had every later write answered 503). The review saw one such 403; here the first rounds met them every time."""
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite only: its pool's connections keep a statement's snapshot; PostgreSQL's reads each see the latest")
    wav = make_wav(0.1, 8000, 1)
    caps = {"max_uploads": 1000, "max_uploads_per_client": 1000, "max_uploads_per_user": 1000, "user_creations_per_minute": 0}
    totals: collections.Counter[str] = collections.Counter()
    async with running_app(database_url, db_timeout=0.05, db_connections=3, **caps) as client:

        async def creation(user: dict[str, str], name: str, body: bytes = b"") -> httpx.Response:
            headers = tus(user, Upload_Length=str(len(wav)), Upload_Metadata=tus_metadata(filename=name), **(OCTETS if body else {}))
            return await client.post(f"/users/{user['user_id']}/uploads", content=body, headers=headers)

        async def one_user(answers: collections.Counter[str]) -> None:
            made = await client.post("/users", json={"name": unique_name()})
            answers[f"POST /users {made.status_code}"] += 1
            if made.status_code != 201:
                return
            user = made.json()
            first = await creation(user, "first.wav")
            answers[f"creation {first.status_code}"] += 1
            if first.status_code == 201:
                completing = await tus_patch(client, user, first.headers["location"], 0, wav)
                answers[f"PATCH {completing.status_code}"] += 1
            answers[f"creation {(await creation(user, 'second.wav', wav)).status_code}"] += 1

        for _ in range(10):
            answers: collections.Counter[str] = collections.Counter()
            await asyncio.gather(*(one_user(answers) for _ in range(300)))
            assert not [answer for answer in answers if answer.endswith((" 403", " 404"))], answers
            assert answers["POST /users 201"], answers  # writes go on
            totals += answers
    assert totals["creation 503"] and totals["creation 201"] and totals["PATCH 204"], totals  # calls past the timeout, and calls within it


def sqlite_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if getattr(thread, "_target", None) is aiosqlite.core._connection_worker_thread]


async def test_sqlite_connections_lent_at_shutdown_are_closed_with_the_app(database_url: str) -> None:
    """A connection still lent out when the app stops (a request finishing its last statement) is closed once it
    comes back, as idle ones are. One left open is stopped by the garbage collector later, from whatever loop
    is current then, and its thread raises "Event loop is closed" into another test (the suite's old warning)."""
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite only")
    before = set(sqlite_threads())
    app, lifespan = await start_app(database_url)
    pool = app.state.services.store.sqlite_pool
    held = await pool.acquire()

    async def give_back_soon() -> None:
        await asyncio.sleep(0.2)
        await pool.release(held)

    returning = asyncio.create_task(give_back_soon())
    await lifespan.__aexit__(None, None, None)
    await returning
    for thread in set(sqlite_threads()) - before:
        thread.join(5)
    left_open = held._connection is not None
    if left_open:
        await held.close()  # so that this test fails instead of the interpreter waiting for the thread at exit
    assert not left_open and not set(sqlite_threads()) - before  # closed, not left for the garbage collector


async def test_sqlite_connections_still_opening_at_shutdown_are_closed_with_the_app(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection whose opener was cancelled (the storage sweep, stopped with the app while it opened its first
    connection) goes on opening in its thread; the app waits for it and closes it. Left alone, it finished after the
    test's event loop had closed, and its thread raised "Event loop is closed" into the next test."""
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite only")
    app, lifespan = await start_app(database_url)
    pool = app.state.services.store.sqlite_pool
    while pool._idle:  # no idle connection: the next acquire opens one
        idle = pool._idle.pop()
        pool._opened.discard(idle)
        await idle.close()
    before = set(sqlite_threads())
    slow_open = wav2mp3._SQLiteConnection.__init__

    def opening_slowly(self: Any, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.3)  # a loaded machine: opening takes a while
        slow_open(self, *args, **kwargs)

    monkeypatch.setattr(wav2mp3._SQLiteConnection, "__init__", opening_slowly)
    opener = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.05)
    opener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await opener
    await lifespan.__aexit__(None, None, None)
    for thread in set(sqlite_threads()) - before:
        thread.join(0.1)
    left = set(sqlite_threads()) - before
    for thread in left:
        thread.join(5)  # so that this test fails instead of the next one
    assert not left


async def test_chunk_arguments_are_not_formatted(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    """databases formats every query's arguments for its debug log, debug on or off; a stored chunk must show
    as a short Blob, never as 256 KiB of bytes (the cost was 1.5 ms of event loop per chunk)."""
    with caplog.at_level(logging.DEBUG, logger="databases"):
        await uploaded(client, make_wav(20.0, 44100, 2))
    messages = [record.getMessage() for record in caplog.records if record.name == "databases" and "record_chunks" in record.getMessage()]
    assert messages, "databases no longer logs its queries: Blob may be unneeded"
    assert all(len(message) < 2000 for message in messages), max(map(len, messages))


# Error texts in Russian ##########################################################

REFUSALS = {"Refused", "BadWav", "UnsupportedWav", "BodyCut", "DiskFull", "RangeNotSatisfiable"}


def refusal_texts() -> set[str]:
    """Every refusal text the module writes out where it refuses, as static/i18n/errors.ru.json keys it: f-strings
    with their `{expression}`s (no conversion or format), constants by their value."""
    tree = ast.parse((HERE / "wav2mp3.py").read_text())
    constants = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant)
    }

    def text(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name) and isinstance(constants.get(node.id), str):
            return constants[node.id]  # type: ignore[no-any-return]
        if isinstance(node, ast.JoinedStr):
            return "".join(part.value if isinstance(part, ast.Constant) else "{" + ast.unparse(part.value) + "}" for part in node.values)  # type: ignore[attr-defined]
        if isinstance(node, ast.IfExp):
            return None
        return None

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in REFUSALS:
            for argument in node.args:
                if isinstance(argument, ast.IfExp):
                    found |= {t for t in (text(argument.body), text(argument.orelse)) if t}
                elif (written := text(argument)) and not written.isdigit():
                    found.add(written)
    return found - {"record", "upload"}  # NameTaken's holders, not texts


def test_every_refusal_text_has_its_russian() -> None:
    table = json.loads((HERE / "static" / "i18n" / "errors.ru.json").read_text(encoding="utf-8"))
    missing = sorted(text for text in refusal_texts() if text not in table)
    assert not missing, f"add them to static/i18n/errors.ru.json: {missing}"
    assert all(re.search("[а-яё]", russian) for russian in table.values())


async def test_errors_follow_accept_language_and_english_stays_the_default(client: httpx.AsyncClient) -> None:
    russian = {"Accept-Language": "ru-RU,ru;q=0.9,en;q=0.8"}
    user = await new_user(client)
    wrong = await client.get(f"/users/{user['user_id']}/records", headers={**russian, "Authorization": f"Bearer {uuid.uuid4()}"})
    assert wrong.status_code == 403 and wrong.json() == {"error": "неизвестный user_id или неверный access_token"}
    assert wrong.headers["content-language"] == "ru" and wrong.headers["vary"] == "Accept-Language"
    english = await client.get(f"/users/{user['user_id']}/records", headers={"Authorization": f"Bearer {uuid.uuid4()}"})
    assert english.json() == {"error": wav2mp3.FORBIDDEN} and "content-language" not in english.headers
    preferred = await client.get(f"/users/{user['user_id']}/records", headers={"Accept-Language": "en-GB, ru;q=0.8", **bearer({"access_token": "x"})})
    assert preferred.json() == {"error": wav2mp3.FORBIDDEN}
    filled = await client.post("/users/wav", **upload_form(user, make_wav(1.0), "dup.wav"), headers=russian)
    taken = await client.post("/users/wav", **upload_form(user, make_wav(1.0), "dup.wav"), headers=russian)
    assert filled.status_code == 201 and taken.status_code == 409
    assert taken.json()["error"] == "у этого пользователя уже есть запись из файла 'dup.wav': сначала удалите её или отправьте файл под другим именем"
    bad = await client.post("/users/wav", **upload_form(user, b"RIFF\x00\x00\x00\x00JUNK", "bad.wav"), headers=russian)
    assert bad.status_code == 415 and re.search("[а-яё]", bad.json()["error"])
    seed = await client.post("/users", json={"name": (await usage_of(client, user))["name"]}, headers=russian)
    assert seed.json() == {"error_name": "user with name already is"}  # the seed's answer never changes
    unknown = await client.get("/nope", headers=russian)
    assert unknown.json() == {"error": "Не найдено"}


@pytest.mark.parametrize(
    "accept_language, language",
    [
        ("ru;q=5, en;q=0.5", "en"),  # a weight is at most 1: this entry says nothing, and is ignored
        ("en;q=0.5, ru;q=0.9999", "en"),  # at most three decimals
        ("ru;q=inf, en;q=0.1", "en"),
        ("ru;q=1e0, en;q=0.1", "en"),
        ("ru;q=, en;q=0.1", "en"),
        ("ru;q=5", "en"),  # nothing left: English, the default
        ("en;q=0.5, ru;q=1.000", "ru"),
        ("en;q=0.001, ru;q=0.002", "ru"),
        ("en;q=0, ru;q=0.", "en"),
    ],
)
async def test_accept_language_weights_are_rfc_9110_qvalues(client: httpx.AsyncClient, accept_language: str, language: str) -> None:
    """RFC 9110 §12.4.2: a qvalue is 0 to 1 with at most three decimals; an entry with any other weight is ignored, not
    an error. ru;q=5 outranked en where it should not count at all."""
    answer = await client.get("/nope", headers={"Accept-Language": accept_language})
    assert answer.status_code == 404
    assert answer.json()["error"] == {"en": "Not Found", "ru": "Не найдено"}[language]


async def test_russian_refusals_say_in_russian_what_english_says_in_words(database_url: str) -> None:
    """Units, the words around allowed values and what the code fills in (not known, unknown encoding, request body)
    are Russian too; what a client sends or reads literally (option names, values, headers) stays as it is."""
    russian = {"Accept-Language": "ru"}
    async with running_app(database_url, user_quota_mb=1) as client:
        user = await new_user(client)
        creation = tus(user, Upload_Length=str(2 * wav2mp3.MIB), Upload_Metadata=tus_metadata(filename="a.wav"))
        too_large = await client.post(f"/users/{user['user_id']}/uploads", headers={**russian, **creation})
        assert too_large.status_code == 413 and too_large.json()["error"] == (
            "эта загрузка (Upload-Length): превышена квота пользователя: занято 0.00 МиБ (0 байт) из 1.00 МиБ (1048576 байт),"
            " нужно ещё 2.00 МиБ (2097152 байт) (удалите записи или незавершённые загрузки либо попросите у оператора больше)"
        )
        answers = {
            "bitrate": await client.post("/users/wav", **upload_form(user, make_wav(0.3), bitrate="33"), headers=russian),
            "vbr_quality": await client.post("/users/wav", **upload_form(user, make_wav(0.3), vbr_quality="12"), headers=russian),
            "encoding": await client.post("/users/wav", **upload_form(user, patch(make_wav(0.3), 20, struct.pack("<H", 0x1234))), headers=russian),
            "body": await client.post("/users", content=b"{", headers=russian),
        }
        assert {what: (answer.status_code, answer.json()["error"]) for what, answer in answers.items()} == {
            "bitrate": (422, "bitrate должно быть одним из: 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320"),
            "vbr_quality": (422, "vbr_quality должно быть целым числом от 0 до 9"),
            "encoding": (415, "неподдерживаемая кодировка WAV: неизвестная кодировка (тег формата 0x1234)"),
            "body": (422, "тело запроса: это не корректный JSON"),
        }
        deferred = tus(user, Upload_Defer_Length="1", Upload_Metadata=tus_metadata(filename="b.wav"))
        url = (await client.post(f"/users/{user['user_id']}/uploads", headers=deferred)).headers["location"]
        assert (await tus_patch(client, user, url, 0, make_wav(0.3)[:100])).status_code == 204
        shorter = await client.patch(url, content=b"", headers={**russian, **tus(user, Upload_Offset="100", Upload_Length="50", **OCTETS)})
        assert shorter.status_code == 400
        assert shorter.json()["error"] == "Upload-Length 50 — не длина этой загрузки: она не известна, получено 100 байт"


# Documents agree with the code ##################################################


def test_readme_configuration_table_is_the_settings() -> None:
    readme = (HERE / "README.md").read_text()
    assert wav2mp3.settings_table() in readme, "regenerate README's table: python -c 'import wav2mp3; print(wav2mp3.settings_table())'"


def test_api_reference_options_table_is_the_form_options() -> None:
    reference = (HERE / "docs" / "API.md").read_text()
    assert wav2mp3.form_options_table() in reference, "regenerate it: python -c 'import wav2mp3; print(wav2mp3.form_options_table())'"


def test_nginx_timeouts_and_limits_are_the_services() -> None:
    """deploy/nginx.conf repeats a few of the service's numbers, for the clients nginx serves: they must agree."""
    conf = (HERE / "deploy" / "nginx.conf").read_text()
    directives = dict(re.findall(r"^\s*(\w+)\s+([^;]+);", conf, re.MULTILINE))
    defaults = wav2mp3.Settings()
    assert directives["client_header_timeout"] == f"{defaults.header_timeout:g}s"
    assert directives["client_body_timeout"] == f"{defaults.upload_idle_timeout:g}s"
    assert directives["send_timeout"] == f"{wav2mp3.Settings().download_idle_timeout:g}s"
    assert directives["keepalive_timeout"] == f"{wav2mp3.KEEP_ALIVE_SECONDS:g}s"
    assert int(directives["client_max_body_size"].removesuffix("m")) >= defaults.max_upload_mb


def readme_walkthrough(base: str) -> str:
    """The shell blocks of README.md's "Try it" and its resumable upload by hand, aimed at `base`."""
    readme = (HERE / "README.md").read_text()
    blocks = [readme.split(title, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0] for title in ("## Try it", "## Large files")]
    return "".join(blocks).replace("http://127.0.0.1:8000", base)


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_readme_walkthrough_works_pasted_twice(live: LiveServer, tmp_path: Path) -> None:
    script = readme_walkthrough(live.url)
    for _ in range(2):
        done = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-5:] == ["tone.mp3", "204", "204", "204", "tone-tus.mp3"], done.stdout
        rate, channels, samples = decode((tmp_path / "tone.mp3").read_bytes())
        assert (rate, channels) == (44100, 1)
        assert_duration(len(samples), rate, 3.0)


def test_every_flag_sets_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = {}
    monkeypatch.setattr(wav2mp3.uvicorn, "run", lambda *args, **kwargs: ran.update(kwargs))
    monkeypatch.setattr(os, "environ", {})
    wav2mp3.main(["--db-startup-timeout", "5", "--port", "9001", "--mp3-bitrate", "64"])
    assert wav2mp3.Settings.from_env() == wav2mp3.Settings(db_startup_timeout=5.0, port=9001, mp3_bitrate=64)
    assert ran["port"] == 9001


def test_api_reference_documents_every_operation_and_status() -> None:
    reference = (HERE / "docs" / "API.md").read_text()
    for operation in wav2mp3.API.operations:
        heading = f"## {operation.method} {operation.path}\n" if operation.method != "HEAD" else f"{operation.method} {operation.path}"
        assert heading in reference, heading
        title = f"## {'GET' if operation.method == 'HEAD' and '/uploads/' not in operation.path else operation.method} {operation.path}\n"
        section = reference.split(title, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
        for status in operation.answers:
            assert f"**{status}**" in section, (operation.method, operation.path, status)
    assert "/openapi.json" in reference


def test_nothing_in_the_repository_points_outside_it() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        path = HERE / name
        if path.suffix in (".py", ".md", ".sql", ".toml", ".yml", ".conf", "") and path.is_file():
            assert ".." + "/shared" not in path.read_text(errors="replace"), name


# Benchmark ######################################################################


def bench_smoke(*mode: str) -> tuple[set[str], str]:
    """bench_wav2mp3.py's smoke run of a mode: the ids of the rows it printed, and its output."""
    result = subprocess.run(
        [sys.executable, str(HERE / "bench_wav2mp3.py"), *mode, "--smoke"], capture_output=True, text=True, timeout=600, cwd=HERE, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {line.split("|")[0].strip() for line in result.stdout.splitlines() if "|" in line}, result.stdout


@pytest.mark.xdist_group("machine")
@pytest.mark.slow
def test_benchmark_smoke_run_prints_every_figure() -> None:
    # Its values are for people to read: timing assertions do not belong in tests.
    figures, _ = bench_smoke()
    assert {"B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B11"} <= figures
    for name in ("PCM 8-bit", "PCM 16-bit", "PCM 24-bit", "PCM 32-bit", "float 32", "float 64", "A-law", "mu-law", "5.1 PCM 24-bit -> stereo"):
        assert name in figures
    assert {"B9", "B10", "T1", "T2", "T3", "T4", "T5", "T6"} <= figures


@pytest.mark.xdist_group("machine")
@pytest.mark.slow
def test_load_benchmark_smoke_run_goes_through_every_scenario() -> None:
    # The load scenarios' figures are for people too; what this checks is that every scenario ran to its end.
    assert {"L1", "L2", "L3", "L4", "L5", "L6"} <= bench_smoke("--load")[0]


@pytest.mark.xdist_group("machine")
@pytest.mark.slow
def test_fair_benchmark_smoke_run_goes_through_every_scenario() -> None:
    # The bystanders' figures are for people too: what this checks is that each attack ran beside the honest client.
    assert {"F1", "F2", "F3", "F4", "F5", "F6"} <= bench_smoke("--fair")[0]


# The operator: sign-up modes, invites, admin routes and command, quotas ############

ADMIN_TOKEN = "operator-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def invite_code(client: httpx.AsyncClient, uses: int = 1, hours: float = 1.0) -> str:
    response = await client.post("/admin/invites", json={"uses": uses, "expires_hours": hours}, headers=ADMIN)
    assert response.status_code == 201, response.text
    assert response.json()["uses"] == uses
    return response.json()["invite"]  # type: ignore[no-any-return]


async def usage_of(client: httpx.AsyncClient, user: dict[str, str]) -> dict[str, Any]:
    response = await client.get(f"/users/{user['user_id']}", headers=bearer(user))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_each_signup_mode_answers_post_users_as_it_says(database_url: str) -> None:
    """open: the seed's answers, an invite field or not; invite: 403 without a good code; closed: 403 whatever is sent."""
    async with running_app(database_url, admin_token=ADMIN_TOKEN) as client:
        created = await client.post("/users", json={"name": "open-1", "invite": "whatever"})
        assert created.status_code == 201 and set(created.json()) == {"user_id", "access_token"}
        taken = await client.post("/users", json={"name": "open-1"})
        assert taken.status_code == 200 and taken.json() == {"error_name": "user with name already is"}
        assert (await client.get("/service")).json() == {"signup": "open", "retention_days": None, "max_upload_bytes": 4096 * wav2mp3.MIB}
    async with running_app(database_url, signup="invite", admin_token=ADMIN_TOKEN, retention_days=30) as client:
        assert (await client.get("/service")).json()["signup"] == "invite" and (await client.get("/service")).json()["retention_days"] == 30
        missing = await client.post("/users", json={"name": "invited-1"})
        assert missing.status_code == 403 and "invite code" in missing.json()["error"]
        wrong = await client.post("/users", json={"name": "invited-1", "invite": "not-a-code"})
        assert wrong.status_code == 403 and "unknown, used up or expired" in wrong.json()["error"]
        code = await invite_code(client, uses=1)
        taken = await client.post("/users", json={"name": "open-1", "invite": code})  # the name is taken: the use is not spent
        assert taken.status_code == 200 and taken.json() == {"error_name": "user with name already is"}
        invited = await client.post("/users", json={"name": "invited-1", "invite": code})
        assert invited.status_code == 201
        assert (await upload(client, invited.json(), make_wav(1.0))).status_code == 201  # a user like any other
        spent = await client.post("/users", json={"name": "invited-2", "invite": code})
        assert spent.status_code == 403 and "used up" in spent.json()["error"]
        short = await invite_code(client, uses=5, hours=1 / 3600)
        await asyncio.sleep(1.5)
        expired = await client.post("/users", json={"name": "invited-3", "invite": short})
        assert expired.status_code == 403 and "expired" in expired.json()["error"]
        assert (await client.post("/users", json={"name": "invited-3", "invite": 5})).status_code == 403
        assert (await client.post("/users", content=b"{nope")).status_code == 422  # a bad body is still 422
    async with running_app(database_url, signup="closed", admin_token=ADMIN_TOKEN) as client:
        closed = await client.post("/users", json={"name": "closed-1"})
        assert closed.status_code == 403 and "operator creates users" in closed.json()["error"]
        made = await client.post("/admin/users", json={"name": "closed-1"}, headers=ADMIN)
        assert made.status_code == 201 and (await upload(client, made.json(), make_wav(1.0))).status_code == 201
        again = await client.post("/admin/users", json={"name": "closed-1"}, headers=ADMIN)
        assert again.status_code == 409 and "closed-1" in again.json()["error"]
    names = await db_rows(
        database_url, "SELECT name FROM users WHERE name IN ('open-1', 'invited-1', 'invited-2', 'invited-3', 'closed-1') ORDER BY name"
    )
    assert [row[0] for row in names] == ["closed-1", "invited-1", "open-1"]


async def test_an_invite_of_n_uses_makes_exactly_n_users_however_many_ask_at_once(database_url: str) -> None:
    async with running_app(database_url, signup="invite", admin_token=ADMIN_TOKEN, user_creations_per_minute=0) as client:
        code = await invite_code(client, uses=4)
        answers = await asyncio.gather(*(client.post("/users", json={"name": f"racer-{n}", "invite": code}) for n in range(9)))
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [201] * 4 + [403] * 5, statuses
        assert (await db_rows(database_url, "SELECT count(*) FROM users WHERE name LIKE 'racer-%'"))[0][0] == 4


async def test_admin_routes_are_absent_without_admin_token_and_refuse_a_wrong_one(database_url: str) -> None:
    routes = [
        ("POST", "/admin/invites"),
        ("GET", "/admin/users"),
        ("POST", "/admin/users"),
        ("GET", f"/admin/users/{uuid.uuid4()}"),
        ("DELETE", f"/admin/users/{uuid.uuid4()}"),
        ("PUT", f"/admin/users/{uuid.uuid4()}/quota"),
        ("DELETE", f"/admin/users/{uuid.uuid4()}/quota"),
        ("POST", f"/admin/users/{uuid.uuid4()}/token"),
    ]
    async with running_app(database_url) as client:
        for method, path in [*routes, ("PUT", "/admin/users"), ("GET", "/admin/invites"), ("PATCH", f"/admin/users/{uuid.uuid4()}/quota")]:
            absent = await client.request(method, path, headers=ADMIN, json={})
            assert absent.status_code == 404 and absent.json() == {"error": "Not Found"}, (method, path)
        assert (await client.get("/admin/users/", headers=ADMIN)).status_code == 404  # no redirect to the route either
        assert not [path for path in (await client.get("/openapi.json")).json()["paths"] if path.startswith("/admin/")]
    hashed = "sha256:" + hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
    async with running_app(database_url, admin_token=hashed) as client:
        user = await new_user(client)
        for method, path in routes:
            unsigned = await client.request(method, path, json={})
            assert unsigned.status_code == 401 and unsigned.headers["www-authenticate"] == "Bearer", (method, path)
            wrong = await client.request(method, path, json={}, headers={"Authorization": "Bearer not-it"})
            assert wrong.status_code == 403, (method, path)
            as_user = await client.request(method, path, json={}, headers=bearer(user))  # a user's token is not the operator's
            assert as_user.status_code == 403, (method, path)
        assert (await client.get("/admin/users", headers=ADMIN)).status_code == 200  # the hash of it is enough to know it


async def test_the_operator_sees_usage_sets_quotas_replaces_tokens_and_deletes_users(database_url: str) -> None:
    async with running_app(database_url, admin_token=ADMIN_TOKEN, user_quota_mb=50) as client:
        alice, bob = await new_user(client), await new_user(client)
        record = (await upload(client, alice, make_wav(3.0), "a.wav")).json()
        url = await tus_create(client, alice, 400_000, "unfinished.wav")
        assert (await tus_patch(client, alice, url, 0, make_wav(3.0)[:100_000])).status_code == 204
        mine = await usage_of(client, alice)
        assert mine == {
            "user_id": alice["user_id"],
            "name": mine["name"],
            "created": mine["created"],
            "records": 1,
            "bytes_stored": record["size_bytes"] + 100_000,
            "quota_bytes": 50 * wav2mp3.MIB,
            "unfinished_uploads": 1,
        }
        listed = (await client.get("/admin/users", headers=ADMIN)).json()
        by_id = {user["user_id"]: user for user in listed["users"]}
        assert by_id[alice["user_id"]] == {**mine, "own_quota": False} and listed["next_after"] is None
        assert by_id[bob["user_id"]]["records"] == 0 and by_id[bob["user_id"]]["bytes_stored"] == 0
        first = (await client.get("/admin/users?limit=1", headers=ADMIN)).json()
        rest = (await client.get(f"/admin/users?after={first['next_after']}", headers=ADMIN)).json()
        assert len(first["users"]) == 1 and [u["user_id"] for u in first["users"] + rest["users"]] == [u["user_id"] for u in listed["users"]]

        quota = await client.put(f"/admin/users/{bob['user_id']}/quota", json={"quota_mb": None}, headers=ADMIN)
        assert quota.status_code == 200 and quota.json()["quota_bytes"] is None and quota.json()["own_quota"] is True
        assert (await usage_of(client, bob))["quota_bytes"] is None
        cleared = await client.delete(f"/admin/users/{bob['user_id']}/quota", headers=ADMIN)
        assert cleared.json()["quota_bytes"] == 50 * wav2mp3.MIB and cleared.json()["own_quota"] is False
        for bad in ({}, {"quota_mb": -1}, {"quota_mb": "5"}, {"quota_mb": True}):
            assert (await client.put(f"/admin/users/{bob['user_id']}/quota", json=bad, headers=ADMIN)).status_code == 422, bad
        assert (await client.put(f"/admin/users/{uuid.uuid4()}/quota", json={"quota_mb": 1}, headers=ADMIN)).status_code == 404

        renewed = await client.post(f"/admin/users/{bob['user_id']}/token", headers=ADMIN)
        assert renewed.status_code == 201 and renewed.json()["user_id"] == bob["user_id"]
        assert (await client.get(f"/users/{bob['user_id']}", headers=bearer(bob))).status_code == 403  # the old token stopped at once
        assert (await usage_of(client, renewed.json()))["user_id"] == bob["user_id"]

        assert (await client.delete(f"/admin/users/{alice['user_id']}", headers=ADMIN)).status_code == 204
        assert (await client.get(record_path(record["url"]))).status_code == 404  # the link stopped working at once
        assert (await client.get(f"/users/{alice['user_id']}", headers=bearer(alice))).status_code == 403
        assert (await client.head(url, headers=tus(alice))).status_code in (403, 404)
        assert (await client.delete(f"/admin/users/{alice['user_id']}", headers=ADMIN)).status_code == 404
        assert (await client.get("/admin/users/not-a-uuid", headers=ADMIN)).status_code == 404
        bad_invites = [{"uses": 0}, {"uses": 1.5}, {"expires_hours": 0}, {"uses": "3"}]
        for bad in bad_invites:
            assert (await client.post("/admin/invites", json=bad, headers=ADMIN)).status_code == 422, bad
    for table in ("records", "uploads", "quotas"):
        assert (await db_rows(database_url, f"SELECT count(*) FROM {table} WHERE user_id = $1", alice["user_id"]))[0][0] == 0, table


async def test_user_usage_needs_the_users_own_token(client: httpx.AsyncClient) -> None:
    user, other = await new_user(client), await new_user(client)
    assert (await client.get(f"/users/{user['user_id']}")).status_code == 401
    assert (await client.get(f"/users/{user['user_id']}", headers=bearer(other))).status_code == 403
    assert (await client.get(f"/users/{uuid.uuid4()}", headers=bearer(user))).status_code == 403
    usage = await usage_of(client, user)
    assert usage["quota_bytes"] is None and usage["records"] == 0 and usage["name"].startswith("user")


async def test_a_quota_refuses_uploads_as_early_as_it_can_and_stores_nothing(database_url: str) -> None:
    """USER_QUOTA_MB over MP3s and unfinished uploads (at their declared length): a tus creation past it is 413 at
    once; a POST is 413 when nothing is left, when the WAV's header says a CBR MP3 will not fit, or when the MP3
    outgrows what is left (VBR). The 413 names usage and quota; nothing is stored; deleting records frees room at once."""
    async with running_app(database_url, user_quota_mb=0.5) as client:  # 524,288 bytes
        user = await new_user(client)
        small = (await upload(client, user, make_wav(10.0), "small.wav")).json()  # 160 KB of MP3
        before = await usage_of(client, user)
        assert before["bytes_stored"] == small["size_bytes"] and before["quota_bytes"] == 524_288

        cbr = await upload(client, user, make_wav(40.0), "long.wav")  # 640 KB at 128 kbps: known from the header
        assert cbr.status_code == 413 and "quota" in cbr.json()["error"] and "524288 bytes" in cbr.json()["error"]
        assert f"{small['size_bytes']} bytes" in cbr.json()["error"]
        vbr = await upload(client, user, make_wav(40.0), "long.wav", vbr_quality="0")  # ~1.2 MB: found as it grows
        assert vbr.status_code == 413 and "quota" in vbr.json()["error"]

        huge = await client.post(
            f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Length=str(4 * 2**30), Upload_Metadata=tus_metadata(filename="big.wav"))
        )
        assert huge.status_code == 413 and "quota" in huge.json()["error"]
        fits = await tus_create(client, user, 300_000, "fits.wav")
        over = await client.post(
            f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Length="100000", Upload_Metadata=tus_metadata(filename="more.wav"))
        )
        assert over.status_code == 413  # 160 KB of MP3 and 300 KB declared leave less than 100 KB
        assert (await client.delete(fits, headers=tus(user))).status_code == 204
        assert (await usage_of(client, user)) == before  # nothing of the refused ones stored

        names = await db_rows(database_url, "SELECT filename FROM records WHERE user_id = $1", user["user_id"])
        assert names == [("small.wav",)]
        assert (await client.delete(record_path(small["url"]), headers=bearer(user))).status_code == 204
        freed = await client.post(
            f"/users/{user['user_id']}/uploads", headers=tus(user, Upload_Length="400000", Upload_Metadata=tus_metadata(filename="more.wav"))
        )
        assert freed.status_code == 201  # deleting records frees the room at once


async def test_a_resumable_upload_whose_mp3_passes_the_quota_ends_at_its_last_patch(database_url: str) -> None:
    """The declared WAV fit, but its MP3 outweighs it (8-bit mono at 320 kbps): the last PATCH is 413 naming usage and
    quota, and the upload ends (a HEAD would otherwise encode it again and again), its room back at once."""
    async with running_app(database_url, user_quota_mb=0.14) as client:
        user = await new_user(client)
        wav = make_wav(4.0, 32000, 1, bits=8)  # 128 KB; its MP3 at 320 kbps: 164 KB
        url = await tus_create(client, user, len(wav), "loud.wav", bitrate="320")
        last = await tus_patch(client, user, url, 0, wav)
        assert last.status_code == 413 and "146800 bytes" in last.json()["error"]
        assert (await client.head(url, headers=tus(user))).status_code == 404
        usage = await usage_of(client, user)
        assert (usage["records"], usage["bytes_stored"], usage["unfinished_uploads"]) == (0, 0, 0)


async def test_a_quota_refuses_only_what_cannot_fit(database_url: str) -> None:
    """The early refusal of a POST is a lower bound of its MP3: LAME caps the bit rate at low sample rates (8 kHz:
    64 kbps, whatever was asked), and an option sent after the audio may make the MP3 smaller, so neither is
    refused early on a size it will not have (the review found both). What passes the quota still is 413."""
    async with running_app(database_url, user_quota_mb=1) as client:
        user = await new_user(client)
        low_rate = await upload(client, user, make_wav(30.0, 8000, 1), "phone.wav", bitrate="320")  # ~240 KB of MP3
        assert low_rate.status_code == 201, low_rate.text
        wav = make_wav(70.0, 44100, 1)
        boundary = "late-option"
        body = (
            b"".join(
                f"--{boundary}\r\n".encode() + part + b"\r\n"
                for part in (form_part("data", credentials(user)), form_part("audio_file", wav, "late.wav"), form_part("bitrate", b"32"))
            )
            + f"--{boundary}--\r\n".encode()
        )  # curl's order: -F data -F audio_file -F bitrate=32 (280 KB of MP3)
        late = await client.post("/users/wav", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert late.status_code == 201, late.text
        too_much = await upload(client, user, make_wav(70.0, 44100, 1), "loud.wav", bitrate="320")  # 2.8 MB
        assert too_much.status_code == 413 and "quota" in too_much.json()["error"]


async def test_a_creation_with_the_whole_file_whose_mp3_passes_the_quota_is_refused(database_url: str) -> None:
    """creation-with-upload of the whole file: the 201 would tell a tus client it is done. The review saw a 201 at
    the full offset and no record; now the creation is 413 and nothing is left."""
    async with running_app(database_url, user_quota_mb=0.9) as client:
        user = await new_user(client)
        wav = make_wav(55.0, 16000, 1, bits=8)  # 880 KB; its MP3 at 160 kbps, 1.1 MB
        created = await client.post(
            f"/users/{user['user_id']}/uploads",
            content=wav,
            headers=tus(user, Upload_Length=str(len(wav)), Upload_Metadata=tus_metadata(filename="whole.wav", bitrate="160"), **OCTETS),
        )
        assert created.status_code == 413 and "quota" in created.json()["error"], created.text
        usage = await usage_of(client, user)
        assert (usage["records"], usage["unfinished_uploads"], usage["bytes_stored"]) == (0, 0, 0)


async def test_operator_inputs_that_are_no_values_are_4xx(database_url: str) -> None:
    async with running_app(database_url, signup="invite", admin_token=ADMIN_TOKEN) as client:
        surrogate = await client.post("/users", content=b'{"name": "a1", "invite": "\\ud800"}')
        assert surrogate.status_code == 403
        user = (await client.post("/admin/users", json={"name": "quota-bound"}, headers=ADMIN)).json()
        assert (await client.get("/admin/users", headers=ADMIN)).headers["cache-control"] == "no-store"
        huge = await client.put(f"/admin/users/{user['user_id']}/quota", json={"quota_mb": 2**43}, headers=ADMIN)
        assert huge.status_code == 422 and "from 0 to" in huge.json()["error"]
        assert (await client.get("/admin/users", params={"after": "\x00"}, headers=ADMIN)).status_code == 422
        invite = await client.post("/admin/invites", json={"uses": 0}, headers=ADMIN)
        assert invite.json()["error"] == "uses must be an integer from 1 to 1000000"


async def test_a_users_declared_uploads_are_stopped_at_the_quota(database_url: str) -> None:
    """One user's flood of tus creations of Upload-Length 4 GiB (3,000 were all 201 on e37ff88) stops at the quota."""
    async with running_app(database_url, user_quota_mb=10_000, max_unfinished_mb=100_000) as client:
        user = await new_user(client)
        statuses = []
        for n in range(5):
            headers = tus(user, Upload_Length=str(4 * 2**30), Upload_Metadata=tus_metadata(filename=f"flood-{n}.wav"))
            statuses.append((await client.post(f"/users/{user['user_id']}/uploads", headers=headers)).status_code)
        assert statuses == [201, 201, 413, 413, 413]
        assert (await usage_of(client, user))["unfinished_uploads"] == 2


async def test_a_user_deleted_mid_upload_gets_no_record_later(database_url: str) -> None:
    async with running_app(database_url, admin_token=ADMIN_TOKEN) as client:
        user = await new_user(client)
        wav = make_wav(5.0, 44100, 2)
        url = await tus_create(client, user, len(wav))
        assert (await tus_patch(client, user, url, 0, wav[:200_000])).status_code == 204
        release = asyncio.Event()

        async def held_body() -> AsyncIterator[bytes]:
            yield wav[:300_000]
            await release.wait()
            yield wav[300_000:]

        boundary = "b0undary"
        head = f"--{boundary}\r\n".encode() + form_part("data", credentials(user)) + f"\r\n--{boundary}\r\n".encode()

        async def form_body() -> AsyncIterator[bytes]:
            yield head + form_part("audio_file", b"", "form.wav")
            async for piece in held_body():
                yield piece
            yield f"\r\n--{boundary}--\r\n".encode()

        posting = asyncio.create_task(
            client.post("/users/wav", content=form_body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        )
        patching = asyncio.create_task(client.patch(url, content=held_body(), headers=tus(user, Upload_Offset="200000", **OCTETS)))
        await asyncio.sleep(0.5)
        assert (await client.delete(f"/admin/users/{user['user_id']}", headers=ADMIN)).status_code == 204
        release.set()
        assert (await posting).status_code == 403
        assert (await patching).status_code in (403, 404)
    assert (await db_rows(database_url, "SELECT count(*) FROM records WHERE user_id = $1", user["user_id"]))[0][0] == 0


def admin_command(live: LiveServer, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DATABASE_URL": live.database_url}
    return subprocess.run([sys.executable, str(HERE / "wav2mp3.py"), "admin", *args], env=environment, capture_output=True, text=True, timeout=60)


def test_the_admin_command_works_on_the_database_of_a_running_service(live: LiveServer) -> None:
    """`python wav2mp3.py admin ...` beside the running service (on PostgreSQL when the suite runs there): what it
    does, the service sees at once."""
    made = admin_command(live, "create", unique_name("cli"), "--json")
    assert made.returncode == 0, made.stderr
    user = json.loads(made.stdout)
    assert httpx.get(f"{live.url}/users/{user['user_id']}", headers=bearer(user)).status_code == 200
    listed = admin_command(live, "users")
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].split()[:2] == ["name", "user_id"] and user["user_id"] in listed.stdout
    as_json = json.loads(admin_command(live, "users", "--json").stdout)
    assert any(entry["user_id"] == user["user_id"] and entry["quota_bytes"] is None for entry in as_json)
    quota = admin_command(live, "quota", user["user_id"], "2", "--json")
    assert quota.returncode == 0 and json.loads(quota.stdout)["quota_bytes"] == 2 * wav2mp3.MIB
    assert httpx.get(f"{live.url}/users/{user['user_id']}", headers=bearer(user)).json()["quota_bytes"] == 2 * wav2mp3.MIB
    renewed = admin_command(live, "token", user["user_id"], "--json")
    new = json.loads(renewed.stdout)
    assert httpx.get(f"{live.url}/users/{user['user_id']}", headers=bearer(user)).status_code == 403
    assert httpx.get(f"{live.url}/users/{user['user_id']}", headers=bearer(new)).status_code == 200
    invite = admin_command(live, "invite", "--uses", "2")
    assert invite.returncode == 0 and invite.stdout.startswith("invite: ")
    assert admin_command(live, "delete", user["user_id"]).returncode == 0
    assert httpx.get(f"{live.url}/users/{user['user_id']}", headers=bearer(new)).status_code == 403
    missing = admin_command(live, "delete", user["user_id"])
    assert missing.returncode == 1 and "no such user" in missing.stderr
    assert admin_command(live, "quota", str(uuid.uuid4()), "lots").returncode == 2
    assert admin_command(live, "nonsense").returncode == 2
    assert admin_command(live, "create", "bad\x01name").returncode == 2
    nowhere = subprocess.run(
        [sys.executable, str(HERE / "wav2mp3.py"), "admin", "users", "--database-url", "sqlite:////nonexistent/dir/x.db"],
        capture_output=True,
        text=True,
    )
    assert nowhere.returncode == 3 and "no database at" in nowhere.stderr and "Traceback" not in nowhere.stderr
    misconfigured = subprocess.run(
        [sys.executable, str(HERE / "wav2mp3.py"), "admin", "users"], env={**os.environ, "DATABASE_URL": live.database_url, "SIGNUP": "foo"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert misconfigured.returncode == 2 and "SIGNUP" in misconfigured.stderr and "Traceback" not in misconfigured.stderr
    assert "invite" in admin_command(live, "--help").stdout
