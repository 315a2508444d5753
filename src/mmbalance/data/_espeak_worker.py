"""Synthesise a batch of utterances with eSpeak NG in a fresh process (run as a script).

eSpeak NG keeps internal state from one utterance to the next (its output for the same text
and voice changes with what it said before), so the same sequence of calls is reproducible
only from a fresh process. ``av_digits`` therefore synthesises fixed-size chunks of clips,
each in a new process running this file; it imports only numpy, ctypes and espeakng-loader so
it starts in a fraction of a second.

Protocol: stdin is a JSON list of ``[text, voice, rate, pitch, pitch_range]``; stdout is, per
item, a little-endian int32 sample count followed by that many int16 samples at the rate
written first (int32) in the stream.
"""
from __future__ import annotations

import ctypes
import json
import struct
import sys

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
POS_CHARACTER = 1
ESPEAK_RATE, ESPEAK_PITCH, ESPEAK_RANGE = 1, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class ESpeak:
    """Minimal in-process eSpeak NG (synchronous mode) over ctypes."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.libc = ctypes.CDLL(None)
        self.sample_rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                      espeakng_loader.get_data_path().encode(),
                                                      ESPEAK_INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak_Initialize failed")
        self._chunks: list[np.ndarray] = []

        def on_audio(wav, n, _events):  # noqa: ANN001
            if wav and n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._cb = _CALLBACK(on_audio)  # keep a reference: ctypes callbacks must outlive their use
        self.lib.espeak_SetSynthCallback(self._cb)

    def synth(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
        """Speak ``text`` with ``voice`` (e.g. ``en-us+m3``); returns int16 samples."""
        self._chunks = []
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"unknown espeak voice {voice!r}")
        self.lib.espeak_SetParameter(ESPEAK_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(ESPEAK_PITCH, int(pitch), 0)
        self.lib.espeak_SetParameter(ESPEAK_RANGE, int(pitch_range), 0)
        self.libc.srand(12345)  # eSpeak draws its noise sources from libc rand()
        data = text.encode() + b"\0"
        err = self.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, 0, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err})")
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)


def main() -> None:
    items = json.load(sys.stdin)
    es = ESpeak()
    out = sys.stdout.buffer
    out.write(struct.pack("<i", es.sample_rate))
    for text, voice, rate, pitch, pitch_range in items:
        wav = es.synth(text, voice, rate, pitch, pitch_range).astype("<i2")
        out.write(struct.pack("<i", len(wav)))
        out.write(wav.tobytes())
    out.flush()


if __name__ == "__main__":
    main()
