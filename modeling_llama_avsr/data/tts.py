"""Offline speech synthesis with exact phoneme and word timings: libespeak-ng through ctypes.

The library comes from the `espeakng-loader` wheel (libespeak-ng 1.52 plus its data). espeak-ng is GPL-3, so this
module is reachable only from the synthetic-corpus path and is never imported by the model or processor modules.

Timings come from the synthesis callback: with phoneme events enabled, every phoneme and word event carries the
sample index at which it starts in the very audio stream the callback delivers, so times are exact (not a forced
alignment). A phoneme ends where the next event starts; trailing silence belongs to no phoneme.

The library is initialised once per process (a second espeak_Initialize hung in an earlier test) and is not
thread-safe: use processes, not threads, for parallel synthesis. Each utterance is synthesised in a fork of the
freshly initialised engine with espeak-ng's random generator seeded from the utterance, which makes the samples a pure function of
(text, voice, rate, pitch).
"""

import ctypes
import logging
import os
import pickle
import zlib
from dataclasses import dataclass

import numpy as np
import soxr


__all__ = ["SAMPLE_RATE", "Utterance", "synthesize"]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000

# espeak_EVENT_TYPE values from speak_lib.h
_EVENT_LIST_TERMINATED, _EVENT_WORD, _EVENT_END, _EVENT_MSG_TERMINATED, _EVENT_PHONEME = 0, 1, 5, 6, 7
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character position in the input text
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # milliseconds (rounded); we use `sample` instead
        ("sample", ctypes.c_int),  # exact sample index in the output stream
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass
class Utterance:
    """Synthesised speech: 16 kHz mono float32 audio and timings in seconds."""

    text: str
    audio: np.ndarray
    phonemes: list[tuple[str, float, float]]  # espeak phoneme mnemonics, e.g. "p", "aI", "@"; pauses are "_"
    words: list[tuple[str, float, float]]
    voice: str
    rate: int
    pitch: int | None = None
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


class _Espeak:
    """The process-wide libespeak-ng handle. Created on first use; synthesis appends to the buffers below."""

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as e:
            raise ImportError(
                "Speech synthesis for the synthetic corpus needs espeak-ng: pip install 'llama-avsr[corpus]'"
            ) from e
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]
        data_path = espeakng_loader.get_data_path()
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {self.sample_rate}) with data at {data_path}")
        self.callback = _Callback(self._on_audio)  # keep a reference: ctypes does not
        lib.espeak_SetSynthCallback(self.callback)
        lib.espeak_SetVoiceByName(b"en-us")  # loads the English dictionary once here, not in every forked child
        self.lib = lib
        self.chunks: list[np.ndarray] = []
        self.events: list[tuple[int, int, int, int, str]] = []

    def _on_audio(self, wav, num_samples, events):
        if num_samples > 0 and wav:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            e = events[i]
            name = e.id.string.decode("utf-8", "replace") if e.type == _EVENT_PHONEME else ""
            self.events.append((e.type, e.sample, e.text_position, e.length, name))
            i += 1
        return 0

    def synth(self, text: str, voice: str, rate: int, pitch: int | None):
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        if pitch is not None:
            self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        self.chunks, self.events = [], []
        data = text.encode("utf-8") + b"\0"
        err = self.lib.espeak_Synth(data, len(data), 0, 0, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with error {err} on {text!r}")
        self.lib.espeak_Synchronize()
        audio = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        return audio, self.events

    def synth_isolated(self, text: str, voice: str, rate: int, pitch: int | None):
        """`synth` in a forked child, so that every utterance starts from the same just-initialised state.

        The waveform generator keeps function-static state (pitch-flutter position, glottal phase, gain control)
        from one utterance to the next and no API resets it: in one process the same text comes out different
        depending on what was spoken before. A corpus must not depend on the order in which a worker happened to
        build it, so each utterance is synthesised in a fork of this never-used engine (a few ms) and the child
        sends back the samples and events.
        """
        if not hasattr(os, "fork"):  # no fork (Windows): same speech, samples may depend on the history
            return self.synth(text, voice, rate, pitch)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: synthesise, send, and leave without running the parent's exit handlers
            try:
                os.close(read_fd)
                # Voice variants with breath noise (e.g. "+f2") draw from espeak-ng's own random generator, whose
                # state the child would inherit from whatever the parent did before: seed it from the utterance.
                self.lib.espeak_ng_SetRandSeed(ctypes.c_long(zlib.crc32(f"{voice}|{rate}|{pitch}|{text}".encode())))
                try:
                    payload = pickle.dumps(self.synth(text, voice, rate, pitch))
                except Exception as e:
                    payload = pickle.dumps(e)
                with os.fdopen(write_fd, "wb") as f:
                    f.write(payload)
            finally:
                os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as f:
            payload = f.read()
        os.waitpid(pid, 0)
        if not payload:
            raise RuntimeError(f"espeak-ng synthesis of {text!r} died without an answer")
        result = pickle.loads(payload)
        if isinstance(result, Exception):
            raise result
        return result


_engine: _Espeak | None = None


def _get_engine() -> _Espeak:
    global _engine  # one libespeak-ng per process, by the library's own constraint
    if _engine is None:
        _engine = _Espeak()
    return _engine


def synthesize(text: str, voice: str = "en-us", rate: int = 150, pitch: int | None = None) -> Utterance:
    """Speak `text` with an espeak-ng voice (e.g. "en-us", "en-gb+f3") at `rate` words per minute.

    Returns 16 kHz float32 audio with phoneme and word timings in seconds. When `pitch` (0-100) is None the voice's
    own pitch is kept (note: a pitch set earlier in this process persists until it is set again).
    """
    engine = _get_engine()
    raw, events = engine.synth_isolated(text, voice, rate, pitch)
    sr_in = engine.sample_rate
    audio = soxr.resample(raw.astype(np.float32) / 32768.0, sr_in, SAMPLE_RATE, quality="VHQ")
    scale = 1.0 / sr_in
    n_in = len(raw)

    # phoneme i spans from its event to the next phoneme/end event; ends are clipped to the audio
    boundaries = sorted({s for t, s, *_ in events if t in (_EVENT_END, _EVENT_MSG_TERMINATED)} | {n_in})
    phone_events = [(s, name) for t, s, _, _, name in events if t == _EVENT_PHONEME]
    phonemes = []
    for i, (start, name) in enumerate(phone_events):
        end = phone_events[i + 1][0] if i + 1 < len(phone_events) else next(b for b in boundaries if b >= start)
        end = min(end, n_in)
        if end > start:
            phonemes.append((name, start * scale, end * scale))

    # espeak emits a word event a little before the word's first phoneme (during the previous word's last one), so a
    # word owns the phonemes that start between its event and the next word's; its times are theirs, pauses excluded
    word_events = [(s, pos, length) for t, s, pos, length, _ in events if t == _EVENT_WORD]
    words = []
    for i, (start, pos, length) in enumerate(word_events):
        limit = word_events[i + 1][0] if i + 1 < len(word_events) else n_in + 1
        inside = [p for p in phonemes if start * scale <= p[1] < limit * scale and not p[0].startswith("_")]
        span = (inside[0][1], inside[-1][2]) if inside else (start * scale, start * scale)
        words.append((text[pos - 1 : pos - 1 + length], *span))
    return Utterance(text=text, audio=audio, phonemes=phonemes, words=words, voice=voice, rate=rate, pitch=pitch)
