"""Benchmark wav2mp3 against the encoder it is built on, in one run.

    python bench_wav2mp3.py [--quick] [--database-url postgresql://...]

Starts the real service (`python wav2mp3.py`, uvicorn) on loopback ports with SQLite in a
temporary directory (and PostgreSQL for B6 when --database-url is given), generates its own
WAVs, and prints one table: each figure, its goal, and whether it is met. Every comparison
is a ratio of two things measured in this run, so a slower or busier machine moves both.
A second table gives the sample-conversion cost of each WAV format against the LAME encode.

The clients are raw sockets (threads for uploads, asyncio for the request-rate test): a
Python HTTP client library would cost more CPU than the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lameenc
import numpy as np

import wav2mp3
from conftest import LiveServer, credentials, form_part, music, pcm16, wav_header

HERE = Path(__file__).parent
RATE, CHANNELS = 44100, 2
BITRATE, QUALITY = 128, 3


# WAV generation ##################################################################


class Wav:
    """A WAV of `seconds` of music-like audio, produced piece by piece from one repeated block."""

    def __init__(self, seconds: float, rate: int = RATE, channels: int = CHANNELS) -> None:
        self.rate, self.channels = rate, channels
        self.block = pcm16(music(min(seconds, 10.0), rate, channels))
        self.data_bytes = int(seconds * rate) * channels * 2
        self.header = wav_header(rate, channels, self.data_bytes)
        self.size = len(self.header) + self.data_bytes

    def pieces(self, piece: int = 256 * 1024) -> Iterator[bytes | memoryview]:
        yield self.header
        remaining = self.data_bytes
        view = memoryview(self.block)
        offset = 0
        while remaining > 0:
            take = min(piece, remaining, len(view) - offset)
            yield view[offset : offset + take]
            remaining -= take
            offset = (offset + take) % len(view)

    def pcm_pieces(self, piece: int = wav2mp3.ENCODE_BLOCK_BYTES) -> Iterator[bytes | memoryview]:
        chunks = self.pieces(piece)
        next(chunks)
        return chunks


def bare_encode_seconds(wav: Wav) -> float:
    """LAME alone on the same PCM, same settings, same block size: the floor to compare with."""
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(BITRATE)
    encoder.set_in_sample_rate(wav.rate)
    encoder.set_channels(wav.channels)
    encoder.set_quality(QUALITY)
    pieces = [bytes(p) for p in wav.pcm_pieces()] if wav.data_bytes <= 200 * 1024 * 1024 else None
    started = time.perf_counter()
    for piece in pieces if pieces is not None else wav.pcm_pieces():
        encoder.encode(bytes(piece))
    encoder.flush()
    return time.perf_counter() - started


# The server and raw HTTP ########################################################


class Server(LiveServer):
    """The service on a loopback port (conftest's LiveServer), measured through /proc."""

    def status_kib(self, field: str) -> int:
        return self.proc_status(field)


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length body, from a keep-alive socket."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")), 0)
    body = bytearray(rest)
    while len(body) < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    buffer[:] = body[length:]
    return status, bytes(body[:length])


def request(port: int, method: str, path: str, body: bytes = b"", headers: str = "") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body)
        return read_response(sock, bytearray())


def new_user(port: int) -> dict[str, str]:
    status, body = request(port, "POST", "/users", json.dumps({"name": "bench-" + uuid.uuid4().hex}).encode())
    assert status == 201, body
    return json.loads(body)  # type: ignore[no-any-return]


@dataclass
class Upload:
    status: int
    body: dict[str, object]
    started: float
    last_byte_sent: float
    answered: float


def upload(port: int, user: dict[str, str], wav: Wav, pace_bytes_per_second: float | None = None) -> Upload:
    """POST /users/wav from a raw socket; optionally paced like a slow client."""
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\n".encode() + form_part("data", credentials(user)) + f"\r\n--{boundary}\r\n".encode()
    head += form_part("audio_file", b"", f"{uuid.uuid4().hex}.wav")
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + wav.size + len(tail)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.perf_counter()
        sock.sendall(
            f"POST /users/wav HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
            + head
        )
        sent = 0
        for piece in wav.pieces():
            sock.sendall(piece)
            sent += len(piece)
            if pace_bytes_per_second:
                ahead = sent / pace_bytes_per_second - (time.perf_counter() - started)
                if ahead > 0:
                    time.sleep(ahead)
        sock.sendall(tail)
        last_byte_sent = time.perf_counter()
        status, body = read_response(sock, bytearray())
        answered = time.perf_counter()
    return Upload(status, json.loads(body), started, last_byte_sent, answered)


# Figures ########################################################################


@dataclass
class Figure:
    id: str
    what: str
    value: str
    goal: str
    met: bool | None  # None: informational


def median_of(runs: int, measure: callable) -> float:  # type: ignore[valid-type]
    return statistics.median(measure() for _ in range(runs))


def b1_upload_vs_encode(server: Server, runs: int) -> Figure:
    wav = Wav(60.0)
    user = new_user(server.port)
    upload(server.port, user, wav)  # warm-up
    bares, serveds = [], []
    for _ in range(runs):  # interleaved, so a machine that slows down mid-run slows both
        bares.append(bare_encode_seconds(wav))
        result = upload(server.port, user, wav)
        serveds.append(result.answered - result.started)
    bare, served = statistics.median(bares), statistics.median(serveds)
    ratio = served / bare
    return Figure("B1", f"60 s stereo upload->link {served:.3f} s / bare encode {bare:.3f} s", f"{ratio:.3f}", "<= 1.10", ratio <= 1.10)


def b2_paced_tail(server: Server, seconds: float) -> Figure:
    wav = Wav(seconds)
    bare = bare_encode_seconds(wav)
    pace = 0.8 * wav.size / bare
    result = upload(server.port, new_user(server.port), wav, pace)
    assert result.status == 201, result.body
    tail = result.answered - result.last_byte_sent
    ratio = tail / bare
    what = f"{seconds / 60:g} min WAV paced at 80% encoder speed: last byte->answer {tail * 1000:.0f} ms / encode {bare:.2f} s"
    return Figure("B2", what, f"{ratio:.4f}", "<= 0.05", ratio <= 0.05)


def parallel_encode_ceiling(runs: int) -> float:
    """How two bare LAME encodes in two threads scale on this machine: the most B3 and B8 can show."""
    wav = Wav(60.0)

    def ratio() -> float:
        started = time.perf_counter()
        bare_encode_seconds(wav)
        one = time.perf_counter() - started
        threads = [threading.Thread(target=bare_encode_seconds, args=(wav,)) for _ in range(2)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return 2 * one / (time.perf_counter() - started)

    return median_of(runs, ratio)


def b3_b4_parallel(server: Server, rounds: int) -> tuple[Figure, Figure]:
    wav = Wav(60.0)
    users = [new_user(server.port) for _ in range(2)]
    upload(server.port, users[0], wav)  # warm-up
    latencies: list[float] = []
    probing = threading.Event()

    def probe() -> None:  # GET /health every 10 ms while two uploads run
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            buffer = bytearray()
            while probing.is_set():
                started = time.perf_counter()
                sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
                status, _ = read_response(sock, buffer)
                latencies.append(time.perf_counter() - started)
                assert status == 200
                time.sleep(0.01)

    def seconds_for(parallel: int) -> float:
        """`parallel` clients each uploading `rounds` times back to back: steady-state throughput."""
        threads = [threading.Thread(target=lambda user=users[i]: [upload(server.port, user, wav) for _ in range(rounds)]) for i in range(parallel)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    alone = together = 0.0
    for _ in range(2):  # alternated, so a machine that slows down mid-run slows both
        alone += seconds_for(1)
        probing.set()
        prober = threading.Thread(target=probe)
        prober.start()
        together += seconds_for(2)
        probing.clear()
        prober.join()
    one, two = 2 * rounds / alone, 4 * rounds / together
    ratio = two / one
    p99 = float(np.percentile(latencies, 99)) * 1000
    return (
        Figure("B3", f"two 60 s uploads at once vs one: {two:.2f} vs {one:.2f} uploads/s", f"{ratio:.2f}", ">= 1.8", ratio >= 1.8),
        Figure(
            "B4", f"GET /health p99 during B3 ({len(latencies)} probes, max {max(latencies) * 1000:.1f} ms)", f"{p99:.1f} ms", "<= 25 ms", p99 <= 25
        ),
    )


def b5_big_upload_rss(server: Server, gib: float) -> Figure:
    wav = Wav(gib * 1024**3 / (RATE * CHANNELS * 2))
    result = upload(server.port, new_user(server.port), wav)
    assert result.status == 201, result.body
    peak_mb = server.status_kib("VmHWM") * 1024 / 1e6
    what = f"{wav.size / 1024**3:.2f} GiB WAV upload ({result.answered - result.started:.1f} s): server peak RSS (VmHWM)"
    return Figure("B5", what, f"{peak_mb:.0f} MB", "<= 150 MB", peak_mb <= 150)


async def _post_users(port: int, total: int, clients: int) -> float:
    """`total` POST /users over `clients` keep-alive connections; requests per second."""
    counter = iter(range(total))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in counter:
            body = json.dumps({"name": "rate-" + uuid.uuid4().hex}).encode()
            writer.write(f"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 201"), head
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return total / (time.perf_counter() - started)


def b6_user_rate(directory: Path, label: str, database_url: str, total: int) -> Figure:
    server = Server(directory, database_url)
    try:
        asyncio.run(_post_users(server.port, 200, 8))  # warm-up
        rate = asyncio.run(_post_users(server.port, total, 8))
    finally:
        server.stop()
    return Figure("B6", f"POST /users on {label}: {total} requests, 8 keep-alive clients", f"{rate:.0f}/s", ">= 1500/s", rate >= 1500)


def b7_download(server: Server, minutes: float) -> Figure:
    wav = Wav(minutes * 60, rate=22050, channels=1)  # cheap to encode; 128 kbps MP3 all the same
    result = upload(server.port, new_user(server.port), wav)
    assert result.status == 201, result.body
    path = "/record" + str(result.body["url"]).split("/record", 1)[1]
    rss_before = server.status_kib("VmRSS")
    peak = [rss_before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], server.status_kib("VmRSS"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    status, mp3 = request(server.port, "GET", path)
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    assert status == 200 and len(mp3) == result.body["size_bytes"]
    rate = len(mp3) / elapsed / 1e6
    growth = (peak[0] - rss_before) * 1024 / 1e6
    what = f"download of a {minutes:g} min MP3 ({len(mp3) / 1e6:.1f} MB): MB/s, server RSS growth during it {growth:.1f} MB"
    return Figure("B7", what, f"{rate:.0f} MB/s", ">= 150 MB/s, RSS flat (< 16 MB)", rate >= 150 and growth < 16)


def b8_workers(directory: Path, uploads: int, extra: tuple[str, ...] = ()) -> tuple[float, float]:
    wav = Wav(60.0)
    rates = []
    for workers in (1, 2):
        server = Server(directory, f"sqlite:///{directory / f'workers-{workers}-{len(extra)}.db'}", "--workers", str(workers), *extra)
        try:
            users = [new_user(server.port) for _ in range(4)]
            upload(server.port, users[0], wav)  # warm-up
            counter = iter(range(uploads))
            started = time.perf_counter()
            threads = [
                threading.Thread(target=lambda u=u, port=server.port, uploads_left=counter: [upload(port, u, wav) for _ in uploads_left])
                for u in users
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            rates.append(uploads / (time.perf_counter() - started))
        finally:
            server.stop()
    return rates[0], rates[1]


def tag_cost(seconds: float) -> list[Figure]:
    """What the LAME tag costs: parsing every frame LAME returns (counts, TOC, music CRC) and building the tag frame,
    against the bare encode that produced those frames (CBR and VBR)."""
    figures = []
    pcm = [bytes(piece) for piece in Wav(seconds).pcm_pieces()]
    for label, options in (("CBR 128", wav2mp3.Mp3Options(BITRATE, quality=QUALITY)), ("VBR -V 2", wav2mp3.Mp3Options(None, 2, quality=QUALITY))):
        encoder = wav2mp3.Mp3Encoder(wav2mp3.WavFormat(wav2mp3.WAVE_FORMAT_PCM, CHANNELS, RATE, 2), options)
        lame = encoder._lame  # the same encoder, driven bare: the tag's own work is timed apart below
        started = time.perf_counter()
        outputs = [lame.encode(block) for block in pcm] + [lame.flush()]
        encoded = time.perf_counter() - started
        started = time.perf_counter()
        frames = wav2mp3.Mp3Frames()
        for output in outputs:
            frames.feed(output)
        tag = wav2mp3.lame_tag_frame(encoder.settings, frames, [len(block) // (2 * CHANNELS) for block in pcm])
        tagged = time.perf_counter() - started
        encoder.close()
        ratio = tagged / encoded
        what = f"LAME tag ({label}, {len(tag)} bytes) for {seconds:g} s: {tagged * 1000:.1f} ms / encode {encoded * 1000:.0f} ms"
        figures.append(Figure("B9", what, f"{ratio:.2%}", "<= 1%", ratio <= 0.01))
    return figures


# Sample conversion cost #########################################################

FORMATS = [
    ("PCM 8-bit", wav2mp3.WAVE_FORMAT_PCM, 1, 2, 0),
    ("PCM 16-bit", wav2mp3.WAVE_FORMAT_PCM, 2, 2, 0),
    ("PCM 24-bit", wav2mp3.WAVE_FORMAT_PCM, 3, 2, 0),
    ("PCM 32-bit", wav2mp3.WAVE_FORMAT_PCM, 4, 2, 0),
    ("float 32", wav2mp3.WAVE_FORMAT_IEEE_FLOAT, 4, 2, 0),
    ("float 64", wav2mp3.WAVE_FORMAT_IEEE_FLOAT, 8, 2, 0),
    ("A-law", wav2mp3.WAVE_FORMAT_ALAW, 1, 2, 0),
    ("mu-law", wav2mp3.WAVE_FORMAT_MULAW, 1, 2, 0),
    ("5.1 PCM 24-bit -> stereo", wav2mp3.WAVE_FORMAT_PCM, 3, 6, 0x3F),
    ("5.1 float 32 -> stereo", wav2mp3.WAVE_FORMAT_IEEE_FLOAT, 4, 6, 0x3F),
]


def conversion_costs(seconds: float) -> list[tuple[str, float, float]]:
    """(format, conversion s, encode s): to_pcm16 over the block sizes the service uses vs LAME."""
    rng = np.random.default_rng(2)
    rows = []
    for name, encoding, width, channels, mask in FORMATS:
        fmt = wav2mp3.WavFormat(encoding, channels, RATE, width, mask)
        frames = int(seconds * RATE)
        if encoding == wav2mp3.WAVE_FORMAT_IEEE_FLOAT:
            raw = (rng.uniform(-0.5, 0.5, frames * channels)).astype("<f4" if width == 4 else "<f8").tobytes()
        else:
            raw = rng.integers(0, 256, frames * channels * width, dtype=np.uint8).tobytes()
        step = max(1, wav2mp3.ENCODE_BLOCK_BYTES // fmt.frame_size) * fmt.frame_size
        started = time.perf_counter()
        pcm = [wav2mp3.to_pcm16(memoryview(raw)[i : i + step], fmt) for i in range(0, len(raw), step)]
        converted = time.perf_counter() - started
        encoder = lameenc.Encoder()
        encoder.set_bit_rate(BITRATE)
        encoder.set_in_sample_rate(RATE)
        encoder.set_channels(min(channels, 2))
        encoder.set_quality(QUALITY)
        started = time.perf_counter()
        for block in pcm:
            encoder.encode(block)
        encoder.flush()
        rows.append((name, converted, time.perf_counter() - started))
    return rows


# Main ###########################################################################


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller files and fewer runs: under a minute")
    parser.add_argument("--database-url", help="PostgreSQL URL: B6 is measured on it as well as on SQLite")
    args = parser.parse_args()
    quick = args.quick
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="wav2mp3-bench-") as tmp:
        directory = Path(tmp)
        figures.append(b6_user_rate(directory, "SQLite", f"sqlite:///{directory / 'users.db'}", 500 if quick else 2000))
        if args.database_url:
            figures.append(b6_user_rate(directory, "PostgreSQL", args.database_url, 500 if quick else 2000))
        server = Server(directory, f"sqlite:///{directory / 'bench.db'}")
        try:
            figures.append(b1_upload_vs_encode(server, 1 if quick else 5))
            figures.append(b2_paced_tail(server, 60.0 if quick else 600.0))
            figures.extend(b3_b4_parallel(server, 1 if quick else 3))
            figures.append(b7_download(server, 5.0 if quick else 60.0))
            figures.append(b5_big_upload_rss(server, 0.125 if quick else 1.0))
        finally:
            server.stop()
        figures.extend(tag_cost(10.0 if quick else 60.0))
        ceiling = parallel_encode_ceiling(1 if quick else 3)
        figures.append(Figure("B3c", "ceiling for B3/B8: two bare LAME encodes in two threads vs one", f"{ceiling:.2f}", "(machine)", None))
        one, two = b8_workers(directory, 4 if quick else 12)
        figures.append(Figure("B8", f"--workers 2 vs 1, 4 clients: {two:.2f} vs {one:.2f} uploads/s", f"{two / one:.2f}", ">= 1.8", two / one >= 1.8))
        one, two = b8_workers(directory, 4 if quick else 12, ("--max-conversions", "1"))
        figures.append(
            Figure("B8b", f"same, one conversion per worker: {two:.2f} vs {one:.2f} uploads/s", f"{two / one:.2f}", "process scaling", None)
        )

    print(f"wav2mp3 benchmark ({'quick' if quick else 'full'}) on {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"{'id':4} | {'value':>10} | {'goal':<32} | {'met':4} | what")
    print("-" * 120)
    for f in figures:
        met = "-" if f.met is None else ("yes" if f.met else "NO")
        print(f"{f.id:4} | {f.value:>10} | {f.goal:<32} | {met:4} | {f.what}")
    print()
    print("Sample conversion (numpy, worker thread) vs LAME encode of the same audio; goal < 10% each")
    print(f"{'format':26} | {'convert ms':>10} | {'encode ms':>9} | {'ratio':>6} | met")
    print("-" * 70)
    for name, converted, encoded in conversion_costs(10.0 if quick else 60.0):
        ratio = converted / encoded
        print(f"{name:26} | {converted * 1000:10.1f} | {encoded * 1000:9.0f} | {ratio:6.1%} | {'yes' if ratio < 0.10 else 'NO'}")


if __name__ == "__main__":
    main()
