"""What the tests and the benchmark share, without pytest: WAVs built in code, multipart bodies, and
`python wav2mp3.py` run as a real server on loopback (LiveServer). conftest.py adds pytest's fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).parent


# WAV building ####################################################################

KSDATAFORMAT_SUFFIX = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
TAGS = {"pcm": 1, "float": 3, "alaw": 6, "mulaw": 7}


def sine(seconds: float, rate: int, channels: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    """(frames x channels) floats in [-1, 1]; channel k plays freq * (k + 1) so channels differ."""
    t = np.arange(round(seconds * rate)) / rate
    return np.stack([amplitude * np.sin(2 * np.pi * freq * (k + 1) * t) for k in range(channels)], axis=1)


def music(seconds: float, rate: int, channels: int) -> np.ndarray:
    """Music-like audio (two tones, a melody, a little noise, a swell) that makes VBR use several bitrates."""
    t = np.arange(round(seconds * rate)) / rate
    rng = np.random.default_rng(1)
    melody = np.sin(2 * np.pi * (330 + 110 * np.floor(t * 4 % 4)) * t)
    mono = 0.25 * np.sin(2 * np.pi * 220 * t) + 0.15 * np.sin(2 * np.pi * 1250 * t) + 0.2 * melody * (0.5 + 0.5 * np.sin(np.pi * t / 3))
    mono += 0.05 * rng.standard_normal(len(t))
    return np.stack([np.roll(mono, 37 * k) for k in range(channels)], axis=1)


def mulaw_encode(x: np.ndarray) -> np.ndarray:
    """ITU-T G.711 mu-law from 16-bit PCM (the classic Sun g711.c algorithm, vectorised)."""
    pcm = x.astype(np.int32)
    sign = np.where(pcm < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(pcm), 32635) + 0x84
    exponent = np.clip(np.floor(np.log2(magnitude)).astype(np.int32) - 7, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8)


def alaw_encode(x: np.ndarray) -> np.ndarray:
    """ITU-T G.711 A-law from 16-bit PCM (Sun g711.c: 13-bit magnitude, segment, 4-bit step)."""
    pcm = x.astype(np.int32) >> 3
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    magnitude = np.where(pcm >= 0, pcm, -pcm - 1)
    segment = np.clip(np.floor(np.log2(np.maximum(magnitude, 1))).astype(np.int32) - 4, 0, 7)
    segment = np.where(magnitude < 32, 0, segment)
    step = np.where(segment < 2, magnitude >> 1, magnitude >> segment) & 0x0F
    code = np.where(magnitude > 0xFFF, 0x7F, (segment << 4) | step)
    return ((code ^ mask) & 0xFF).astype(np.uint8)


def encode_samples(signal: np.ndarray, encoding: str, bits: int) -> bytes:
    """Interleave and encode (frames x channels) floats as a WAV data chunk would hold them."""
    x = signal.reshape(-1)
    if encoding == "float":
        return x.astype("<f4" if bits == 32 else "<f8").tobytes()
    pcm16 = np.round(x * 32767).astype(np.int16)
    if encoding == "alaw":
        return alaw_encode(pcm16).tobytes()
    if encoding == "mulaw":
        return mulaw_encode(pcm16).tobytes()
    if bits == 8:
        return (np.round(x * 127) + 128).astype(np.uint8).tobytes()
    if bits == 16:
        return pcm16.astype("<i2").tobytes()
    if bits == 24:
        wide = np.round(x * 8388607).astype("<i4")
        return wide.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    if bits == 64:
        return (np.round(x * 32767).astype("<i8") << 48).tobytes()
    return np.round(x * 2147483647).astype("<i4").tobytes()


def riff_chunk(name: bytes, payload: bytes, size: int | None = None) -> bytes:
    pad = b"\x00" if len(payload) % 2 else b""  # RIFF chunks are word-aligned
    return name + struct.pack("<L", len(payload) if size is None else size) + payload + pad


def fmt_chunk(tag: int, channels: int, rate: int, bits: int, extensible: bool = False, mask: int = 0, extra: bytes = b"") -> bytes:
    """`extra` follows the 16 common bytes, e.g. the cbSize=0 that scipy and libsndfile write for float."""
    block = channels * ((bits + 7) // 8)
    if extensible:
        payload = struct.pack("<HHLLHHHHL", 0xFFFE, channels, rate, rate * block, block, bits, 22, bits, mask)
        payload += struct.pack("<H", tag) + KSDATAFORMAT_SUFFIX
    else:
        payload = struct.pack("<HHLLHH", tag, channels, rate, rate * block, block, bits) + extra
    return riff_chunk(b"fmt ", payload)


def make_wav(
    seconds: float = 1.0,
    rate: int = 44100,
    channels: int = 1,
    encoding: str = "pcm",
    bits: int = 16,
    *,
    freq: float = 440.0,
    amplitude: float = 0.5,
    signal: np.ndarray | None = None,
    extensible: bool = False,
    mask: int = 0,
    fmt_extra: bytes = b"",
    before_data: bytes = b"",
    after_data: bytes = b"",
    data_size: int | None = None,
    riff_size: int | None = None,
) -> bytes:
    audio = sine(seconds, rate, channels, freq, amplitude) if signal is None else signal
    data = encode_samples(audio, encoding, bits)
    body = b"WAVE" + fmt_chunk(TAGS[encoding], channels, rate, bits, extensible, mask, fmt_extra) + before_data
    body += riff_chunk(b"data", data, data_size) + after_data
    return b"RIFF" + struct.pack("<L", len(body) if riff_size is None else riff_size) + body


def patch(wav: bytes, offset: int, replacement: bytes) -> bytes:
    """Overwrite bytes of a canonical 44-byte-header WAV (format tag at 20, channels at 22...)."""
    return wav[:offset] + replacement + wav[offset + len(replacement) :]


def wav_header(rate: int, channels: int, data_bytes: int) -> bytes:
    """The canonical 44 bytes before `data_bytes` of 16-bit PCM."""
    return b"RIFF" + struct.pack("<L", 36 + data_bytes) + b"WAVE" + fmt_chunk(1, channels, rate, 16) + b"data" + struct.pack("<L", data_bytes)


def pcm16(signal: np.ndarray) -> bytes:
    return (signal * 32767).astype("<i2").tobytes()


def long_wav(seconds: float, rate: int = 44100, channels: int = 2, piece_seconds: float = 1.0, signal: Any = sine) -> Iterator[bytes]:
    """A long 16-bit WAV produced piece by piece from one repeated second of audio: little memory either side."""
    data_bytes = int(seconds * rate) * channels * 2
    yield wav_header(rate, channels, data_bytes)
    block = pcm16(signal(piece_seconds, rate, channels))
    while data_bytes > 0:
        piece = block[: min(len(block), data_bytes)]
        data_bytes -= len(piece)
        yield piece


def rf64(wav: bytes, magic: bytes = b"RF64") -> bytes:
    """A canonical WAV rewritten as RF64/BW64: sizes 0xFFFFFFFF, the real ones in a ds64 chunk."""
    data_at = wav.index(b"data")
    data_size = struct.unpack("<L", wav[data_at + 4 : data_at + 8])[0]
    ds64 = riff_chunk(b"ds64", struct.pack("<QQQL", len(wav) - 8, data_size, data_size // 4, 0))
    return magic + b"\xff\xff\xff\xffWAVE" + ds64 + wav[12:data_at] + b"data\xff\xff\xff\xff" + wav[data_at + 8 :]


def rifx(seconds: float, rate: int, channels: int, bits: int = 16) -> bytes:
    """A big-endian RIFX WAVE: sizes, fmt fields and samples all big-endian."""
    width = bits // 8
    samples = np.round(sine(seconds, rate, channels).reshape(-1) * (2 ** (bits - 1) - 1)).astype(">i4")
    data = samples.view(np.uint8).reshape(-1, 4)[:, 4 - width :].tobytes()
    fmt = struct.pack(">HHLLHH", 1, channels, rate, rate * channels * width, channels * width, bits)
    body = b"WAVE" + b"fmt " + struct.pack(">L", len(fmt)) + fmt + b"data" + struct.pack(">L", len(data)) + data
    return b"RIFX" + struct.pack(">L", len(body)) + body


def info_list(**texts: str | bytes) -> bytes:
    """A LIST/INFO chunk: info_list(INAM="Title", IART=b"raw bytes")."""
    payload = b"INFO"
    for key, value in texts.items():
        raw = (value.encode() if isinstance(value, str) else value) + b"\x00"
        payload += key.encode() + struct.pack("<L", len(raw)) + raw + (b"\x00" if len(raw) % 2 else b"")
    return riff_chunk(b"LIST", payload)


# Multipart bodies ################################################################


def unique_name(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def credentials(user: dict[str, str]) -> bytes:
    """The upload's `data` part."""
    return json.dumps({"user_id": user["user_id"], "access_token": user["access_token"]}).encode()


def form_part(name: str, payload: bytes, filename: str | bytes | None = None, extra: str = "") -> bytes:
    """One multipart part, its file name sent as given (no escaping): for names, orders and damage httpx would not send."""
    disposition = f'form-data; name="{name}"'.encode()
    if filename is not None:
        disposition += b'; filename="' + (filename.encode() if isinstance(filename, str) else filename) + b'"'
    return b"Content-Disposition: " + disposition + extra.encode() + b"\r\n\r\n" + payload


def multipart(*parts: bytes, boundary: str = "bnd") -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body from form_part()s, in the order given, and its Content-Type."""
    body = b"".join(f"--{boundary}\r\n".encode() + part + b"\r\n" for part in parts)
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def streamed_upload(
    user: dict[str, str], wav_pieces: Iterator[bytes], filename: str = "stream.wav", data_first: bool = True
) -> tuple[Iterator[bytes], dict[str, str]]:
    """A multipart upload as a stream of pieces, for a client that sends while the server converts."""
    boundary = uuid.uuid4().hex
    data = f"--{boundary}\r\n".encode() + form_part("data", credentials(user)) + b"\r\n"
    audio = f"--{boundary}\r\n".encode() + form_part("audio_file", b"", filename)
    end = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        if data_first:
            yield data
        yield audio
        yield from wav_pieces
        if data_first:
            yield end
        else:
            yield b"\r\n" + data[:-2] + end

    return body(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


# A real server ###################################################################


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RemoteSite:
    """A service already running elsewhere (compose, behind nginx), for the page's tests: PAGE_URL=http://host:port."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def new_user(self) -> dict[str, str]:
        response = httpx.post(self.url + "/users", json={"name": unique_name()}, timeout=30)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]


class LiveServer:
    """`python wav2mp3.py` on a loopback port, with its own TMPDIR and a log file (tests and benchmark). `port` brings a
    server back where a stopped one listened, so that the URLs a client kept (and keyed its storage by) still lead to it."""

    def __init__(
        self,
        directory: Path,
        database_url: str,
        *args: str,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        tmp: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.directory = directory
        self.tmp = tmp or directory / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        # A stopped server's port binds again at once: uvicorn's socket (asyncio's create_server) sets SO_REUSEADDR,
        # so the old connections in TIME_WAIT do not hold it.
        self.port = port or free_port()
        self.log = directory / f"server-{self.port}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = database_url
        environment = {**os.environ, "TMPDIR": str(self.tmp), "PYTHONUNBUFFERED": "1", **(env or {})}
        command = [*(prefix or []), sys.executable, str(HERE / "wav2mp3.py"), "--port", str(self.port), "--database-url", database_url, *args]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=directory)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:  # exited: the port taken, a bad setting
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not start: " + self.log.read_text()[-2000:])

    def pids(self) -> list[int]:
        """The server and, with --workers, its worker processes."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [self.process.pid] + ([int(p) for p in children.read_text().split()] if children.exists() else [])

    def proc_status(self, field: str) -> int:
        """A /proc status field in KiB (VmHWM, VmRSS...), summed over the server's processes."""
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        return total

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_files(self) -> list[str]:
        found = []
        for fd in Path(f"/proc/{self.process.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                found.append(os.readlink(fd))
        return found

    def temp_files(self) -> list[str]:
        """Files the server holds open in its TMPDIR (spooled MP3s are unnamed: only /proc sees them)."""
        return [target for target in self.open_files() if target.startswith(str(self.tmp))]

    def wait_for_log(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log.read_text():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the server log")

    def reset_peak_memory(self) -> None:
        """Start VmHWM afresh (proc(5), clear_refs: 5), so that a test reads the peak of what follows."""
        for pid in self.pids():
            Path(f"/proc/{pid}/clear_refs").write_text("5")

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def new_user(self) -> dict[str, str]:
        response = httpx.post(self.url + "/users", json={"name": unique_name()})
        assert response.status_code == 201
        return response.json()  # type: ignore[no-any-return]
