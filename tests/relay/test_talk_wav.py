"""Reading WAV files for ``relay talk`` and resampling them to what the API takes."""

from __future__ import annotations

import math
import struct
import wave
from pathlib import Path

import pytest

from relay.clients import wav
from relay.clients.talk import SAMPLE

FIXTURES = Path(__file__).parents[1] / "fixtures"


def tone(rate: int, freq: float, seconds: float, amplitude: int = 12000) -> list[int]:
    return [
        round(amplitude * math.sin(2 * math.pi * freq * n / rate))
        for n in range(int(rate * seconds))
    ]


def rms(samples: list[int]) -> float:
    return math.sqrt(sum(s * s for s in samples) / len(samples))


def frequency(samples: list[int], rate: int) -> float:
    """Zero-crossing estimate of a steady tone's frequency."""
    crossings = sum(1 for a, b in zip(samples, samples[1:], strict=False) if (a < 0) != (b < 0))
    return crossings / 2 / (len(samples) / rate)


def riff(
    tag: int, channels: int, rate: int, bits: int, data: bytes, *, extensible: bool = False
) -> bytes:
    """A WAV file built by hand, for encodings the wave module cannot write."""
    block = channels * bits // 8
    fmt = struct.pack(
        "<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block, block, bits
    )
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + guid_tail
    chunks = (
        b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def write_pcm16(path: Path, rate: int, channels: list[list[int]]) -> None:
    frames = [s for frame in zip(*channels, strict=True) for s in frame]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(len(channels))
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(struct.pack(f"<{len(frames)}h", *frames))


def test_stereo_48k_is_mixed_to_mono_and_halved(tmp_path: Path) -> None:
    left = tone(48000, 440, 1.0)
    write_pcm16(tmp_path / "s.wav", 48000, [left, [-s for s in left[:100]] + left[100:]])
    samples, fmt = wav.read_wav(tmp_path / "s.wav")
    assert (fmt.rate, fmt.channels, fmt.bits, fmt.encoding) == (48000, 2, 16, "pcm")
    assert samples[:100] == [0] * 100  # opposite channels cancel: they were averaged
    out = wav.resample(samples, 48000, 24000)
    assert len(out) == 24000
    assert frequency(out, 24000) == pytest.approx(440, rel=0.01)
    assert rms(out[1000:]) == pytest.approx(12000 / math.sqrt(2), rel=0.02)


def test_8k_input_is_upsampled_to_24k_keeping_pitch_and_level(tmp_path: Path) -> None:
    write_pcm16(tmp_path / "n.wav", 8000, [tone(8000, 440, 0.5)])
    pcm, fmt = wav.load_for_api(tmp_path / "n.wav")
    assert fmt.rate == 8000
    out = wav.pcm16_samples(pcm)
    assert len(out) == 12000  # 0.5 s at 24 kHz
    assert frequency(out, 24000) == pytest.approx(440, rel=0.01)
    assert rms(out) == pytest.approx(12000 / math.sqrt(2), rel=0.03)


def test_44k1_input_takes_the_non_integer_ratio_and_filters_what_24k_cannot_hold(
    tmp_path: Path,
) -> None:
    write_pcm16(tmp_path / "cd.wav", 44100, [tone(44100, 1000, 1.0)])
    pcm, _ = wav.load_for_api(tmp_path / "cd.wav")
    out = wav.pcm16_samples(pcm)
    assert len(out) == 24000
    assert frequency(out, 24000) == pytest.approx(1000, rel=0.01)
    assert rms(out) == pytest.approx(12000 / math.sqrt(2), rel=0.03)
    # 20 kHz does not exist at 24 kHz: it must be mostly filtered, not folded to 4 kHz.
    high = wav.resample(tone(44100, 20000, 1.0), 44100, 24000)
    assert rms(high) < 0.3 * 12000 / math.sqrt(2)


def test_the_mu_law_fixture_decodes_to_the_same_speech_as_the_pcm_one() -> None:
    pcm, fmt = wav.load_for_api(FIXTURES / "hello-ulaw8k.wav")
    assert (fmt.encoding, fmt.rate) == ("mu-law", 8000)
    reference, _ = wav.read_wav(SAMPLE)
    decoded = wav.pcm16_samples(pcm)
    n = min(len(reference), len(decoded))
    assert abs(len(reference) - len(decoded)) < 24  # same duration within 1 ms
    error = rms([reference[i] - decoded[i] for i in range(n)])
    assert error < 0.25 * rms(reference[:n])


def test_g711_tables_match_the_standard() -> None:
    assert (wav.MULAW_TO_PCM16[0xFF], wav.MULAW_TO_PCM16[0x80], wav.MULAW_TO_PCM16[0x00]) == (
        0,
        32124,
        -32124,
    )
    assert (wav.ALAW_TO_PCM16[0xD5], wav.ALAW_TO_PCM16[0x55], wav.ALAW_TO_PCM16[0xAA]) == (
        8,
        -8,
        32256,
    )


@pytest.mark.parametrize(
    ("tag", "bits", "data", "expected", "extensible"),
    [
        (1, 8, bytes([128, 255, 0]), [0, 127 << 8, -32768], False),
        (1, 24, b"\x00\x00\x40" + b"\x00\x00\xc0", [0x4000, -0x4000], False),
        (1, 32, struct.pack("<2i", 0x40000000, -0x40000000), [0x4000, -0x4000], False),
        (3, 32, struct.pack("<3f", 0.5, -1.0, 2.0), [16383, -32767, 32767], False),
        (6, 8, bytes([0xD5, 0x55]), [8, -8], False),
        (1, 16, struct.pack("<2h", 1000, -1000), [1000, -1000], True),
    ],
)
def test_every_supported_encoding_decodes(
    tag: int, bits: int, data: bytes, expected: list[int], extensible: bool
) -> None:
    samples, fmt = wav.parse_wav(riff(tag, 1, 16000, bits, data, extensible=extensible))
    assert samples == expected
    assert fmt.rate == 16000


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is not a WAV file"),
        (b"ID3\x03\x00" + bytes(100), "is not a WAV file"),
        (b"RIFF\x04\x00\x00\x00WAVE", "no 'fmt ' chunk"),
        (riff(1, 1, 8000, 16, b"")[:36], "no 'data' chunk"),
        (riff(1, 1, 8000, 16, b""), "holds no audio"),
        (riff(0x55, 1, 8000, 16, b"\x00\x00"), "0x0055 (MPEG Layer 3)"),
        (riff(2, 1, 8000, 4, b"\x00\x00"), "0x0002 (Microsoft ADPCM)"),
        (riff(1, 1, 8000, 12, b"\x00\x00"), "12-bit pcm audio is not supported"),
    ],
)
def test_unusable_files_get_a_one_line_reason(data: bytes, message: str) -> None:
    with pytest.raises(
        wav.WavError, match=message.replace("(", r"\(").replace(")", r"\)")
    ) as caught:
        wav.parse_wav(data, "in.wav")
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("in.wav")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(wav.WavError, match="no such file"):
        wav.read_wav(tmp_path / "absent.wav")
    with pytest.raises(wav.WavError, match="is a directory"):
        wav.read_wav(tmp_path)


def test_written_reply_is_a_24k_mono_pcm16_wav(tmp_path: Path) -> None:
    wav.write_wav(tmp_path / "r.wav", wav.pcm16_bytes([0, 1, -1, 32767]))
    with wave.open(str(tmp_path / "r.wav")) as r:
        assert (r.getframerate(), r.getnchannels(), r.getsampwidth(), r.getnframes()) == (
            24000,
            1,
            2,
            4,
        )
