"""Audio helpers: G.711 tables, the energy VAD and the synthetic voice."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mockrealtime import audio as au

from .helpers import chunks, wav_pcm16, wav_ulaw


@pytest.mark.parametrize(
    ("code", "value"),
    [(0xFF, 0), (0x7F, 0), (0x80, 32124), (0x00, -32124), (0xF0, 120), (0x70, -120)],
)
def test_ulaw_table_matches_g711(code: int, value: int) -> None:
    assert au.ULAW_TABLE[code] == value


@pytest.mark.parametrize(
    ("code", "value"),
    [(0xD5, 8), (0x55, -8), (0xAA, 32256), (0x2A, -32256), (0xC5, 264), (0xD4, 24)],
)
def test_alaw_table_matches_g711(code: int, value: int) -> None:
    assert au.ALAW_TABLE[code] == value


def test_decoders_give_little_endian_pcm16() -> None:
    assert au.ulaw_decode(bytes([0x80, 0xFF])) == (32124).to_bytes(2, "little") + b"\x00\x00"
    assert au.alaw_decode(bytes([0x55])) == (-8).to_bytes(2, "little", signed=True)


@given(st.integers(0, 255))
def test_every_ulaw_code_survives_decode_then_encode(code: int) -> None:
    expected = 0xFF if code == 0x7F else code  # the two zero codes collapse to +0
    assert au.ulaw_encode_sample(au.ULAW_TABLE[code]) == expected


@given(st.integers(0, 255))
def test_every_alaw_code_survives_decode_then_encode(code: int) -> None:
    assert au.alaw_encode_sample(au.ALAW_TABLE[code]) == code


@given(st.integers(-32768, 32767))
def test_g711_quantisation_error_is_bounded(sample: int) -> None:
    for encode, table in (
        (au.ulaw_encode_sample, au.ULAW_TABLE),
        (au.alaw_encode_sample, au.ALAW_TABLE),
    ):
        decoded = table[encode(sample)]
        assert abs(decoded - sample) <= max(16, abs(sample) // 16)


def test_base64_rejects_garbage_instead_of_dropping_it() -> None:
    assert au.b64decode(au.b64encode(b"\x00\x01")) == b"\x00\x01"
    with pytest.raises(ValueError, match="invalid base64"):
        au.b64decode("not base64!")


def feed(vad: au.EnergyVad, pcm: bytes) -> list[au.VadResult]:
    return [r for piece in chunks(pcm, 960) for r in vad.feed(piece)]


def test_vad_finds_the_one_utterance_in_the_fixture() -> None:
    results = feed(au.EnergyVad("pcm16"), wav_pcm16())
    assert [r.speech_started_ms is not None for r in results] == [True, False]
    # speech begins at 350 ms; 300 ms of padding → 50 ms
    assert results[0].speech_started_ms == 50
    # the last loud frame ends at 1850 ms; + 100 ms hangover + 200 ms silence
    assert results[1].speech_stopped_ms == 2150


def test_vad_options_move_the_offsets_and_the_threshold_gates_detection() -> None:
    results = feed(
        au.EnergyVad("pcm16", prefix_padding_ms=100, silence_duration_ms=500), wav_pcm16()
    )
    assert (results[0].speech_started_ms, results[1].speech_stopped_ms) == (250, 2450)
    assert feed(au.EnergyVad("pcm16", threshold=1.0), wav_pcm16()) == []


def test_vad_never_fires_on_silence_or_faint_noise() -> None:
    faint = au.samples_to_pcm16(au.array("h", [(-1) ** i * 20 for i in range(24000)]))
    assert feed(au.EnergyVad("pcm16"), faint + b"\x00" * 48000) == []


def test_vad_works_on_mulaw_input() -> None:
    vad = au.EnergyVad("g711_ulaw")
    results = [r for piece in chunks(wav_ulaw(), 160) for r in vad.feed(piece)]
    assert len(results) == 2 and results[0].speech_started_ms == 50


def test_synthetic_voice_is_deterministic_voiced_and_detected_as_speech() -> None:
    chunk = au.syllable_chunk(3, "pcm16")
    assert len(chunk) == 4800 and au.syllable_chunk(3, "pcm16") is chunk  # cached
    assert au.frame_rms(chunk) > au.threshold_to_rms(0.5)
    samples = au.pcm16_samples(chunk)
    assert max(samples) < 32767 and min(samples) > -32768  # no clipping
    speech = b"".join(au.syllable_chunk(v, "pcm16") for v in range(6))
    results = feed(au.EnergyVad("pcm16"), speech + au.silence_chunk("pcm16") * 5)
    assert len(results) == 2


def test_synthetic_voice_has_its_energy_at_voice_frequencies() -> None:
    samples = au.pcm16_samples(au.syllable_chunk(0, "pcm16"))

    def power(freq: float) -> float:
        re = sum(s * math.cos(2 * math.pi * freq * i / 24000) for i, s in enumerate(samples))
        im = sum(s * math.sin(2 * math.pi * freq * i / 24000) for i, s in enumerate(samples))
        return re * re + im * im

    assert power(118 * 6) > 100 * power(5000)  # harmonic near the first formant vs. hiss band


def test_g711_reply_chunks_are_100ms_at_8khz() -> None:
    for fmt in ("g711_ulaw", "g711_alaw"):
        assert len(au.syllable_chunk(1, fmt)) == 800  # type: ignore[arg-type]
        assert len(au.silence_chunk(fmt)) == 800  # type: ignore[arg-type]
    assert set(au.ulaw_decode(au.silence_chunk("g711_ulaw"))) == {0}


def test_voices_speak_at_different_pitches() -> None:
    low, high = au.voice_variants("echo"), au.voice_variants("alloy")
    assert set(low).isdisjoint(high)
    assert au.voice_variants({"id": "voice_custom"}) == high
    assert all(0 <= v < au.VARIANTS for v in low + high)


_segments = st.lists(st.tuples(st.booleans(), st.integers(1, 60)), min_size=1, max_size=12)


def _render(segments: list[tuple[bool, int]]) -> bytes:
    loud = au.syllable_chunk(0, "pcm16")[2400:2880]  # 10 ms from the middle of a syllable
    quiet = b"\x00" * 480
    return b"".join((loud if is_loud else quiet) * frames for is_loud, frames in segments)


@given(_segments, st.lists(st.integers(1, 5000), min_size=1, max_size=20))
def test_vad_results_do_not_depend_on_how_audio_is_chunked(
    segments: list[tuple[bool, int]], cuts: list[int]
) -> None:
    pcm = _render(segments)
    whole = au.EnergyVad("pcm16").feed(pcm)
    vad = au.EnergyVad("pcm16")
    pieces, pos = [], 0
    for cut in cuts:
        pieces.append(pcm[pos : pos + cut])
        pos += cut
    pieces.append(pcm[pos:])
    chunked = [r for piece in pieces for r in vad.feed(piece)]
    assert chunked == whole


@given(_segments)
def test_vad_alternates_start_and_stop_with_increasing_offsets(
    segments: list[tuple[bool, int]],
) -> None:
    results = au.EnergyVad("pcm16").feed(_render(segments))
    kinds = [r.speech_started_ms is not None for r in results]
    assert kinds == [i % 2 == 0 for i in range(len(kinds))]
    offsets = [
        r.speech_started_ms if r.speech_started_ms is not None else r.speech_stopped_ms
        for r in results
    ]
    assert offsets == sorted(offsets)
    if any(loud for loud, _ in segments):
        assert results and results[0].speech_started_ms is not None
