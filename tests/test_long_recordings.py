"""Long recordings made of corpus clips: cut where the utterances meet, and transcribed about as well as the clips
one by one. The clips come from a corpus built here with another seed than the main job's (sentences and timings
the model did not train on)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import pipeline

from modeling_llama_avsr import LlamaAVSRForConditionalGeneration

from tiny import tiny_config, tiny_processor, tiny_tokenizer

pytest.importorskip("espeakng_loader")
pytest.importorskip("av")

TASK = "audio-visual-speech-recognition"
ROOT = Path(__file__).resolve().parents[1]
# A trained ASR model: the main job's (python examples/run_avsr.py), or the folder this variable names.
TRAINED = Path(os.environ.get("LLAMA_AVSR_ASR_MODEL", ROOT / "outputs" / "run_avsr" / "final"))
PAUSE_S = 0.3  # between utterances, as a speaker pauses between sentences


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from modeling_llama_avsr.data import load_synthetic, make_corpus, read_audio

    corpus = make_corpus(tmp_path_factory.mktemp("long") / "corpus", num_train=0, num_validation=0, num_test=30,
                         seed=11, progress=False)
    test = load_synthetic(corpus, "test")
    return [read_audio(path) for path in test["audio_path"]], list(test["text"])


def recording(audio, pause_s):
    silence = np.zeros(int(pause_s * 16000), np.float32)
    return np.concatenate([part for clip in audio for part in (clip, silence)][:-1])


def test_a_recording_is_cut_between_its_utterances(clips):
    audio, _ = clips
    tokenizer = tiny_tokenizer()
    model = LlamaAVSRForConditionalGeneration(tiny_config("asr", tokenizer=tokenizer)).eval()
    processor = tiny_processor("asr", tokenizer=tokenizer)
    lengths = [len(clip) / 16000 for clip in audio]
    processor.training_clip_seconds = [min(lengths), max(lengths)]  # as if trained on clips like these
    pipe = pipeline(TASK, model=model, processor=processor)
    long = recording(audio, PAUSE_S)
    assert len(long) / 16000 > 60
    pieces = list(pipe.preprocess(long))
    assert len(pieces) == len(audio)  # one utterance per piece
    ends = np.cumsum([len(clip) / 16000 + PAUSE_S for clip in audio])
    starts = np.concatenate([[0.0], ends[:-1]])
    for piece, clip, clip_start, clip_end in zip(pieces, audio, starts, ends):
        # The voiced span is its utterance ...
        assert clip_start - 0.04 <= piece["start"] and piece["end"] <= clip_end - PAUSE_S + 0.04
        # ... and the piece is trimmed to it, as the training clips were: about the clip itself (whose edges hold a
        # few voiceless frames), not the clip and half a pause on each side (+0.3 s).
        assert abs(len(piece["audio"]) - len(clip)) <= 0.1 * 16000
        offset = int(round(piece["start"] * 16000))
        np.testing.assert_array_equal(piece["audio"], long[offset : offset + len(piece["audio"])])


@pytest.fixture(scope="module")
def trained_model():
    """The main job's model: the one `python examples/run_avsr.py` saved, else trained here by that same command
    (about 13 minutes on 2 cores), so that the WER test runs on a fresh clone too and not only where someone ran the
    main job."""
    if not (TRAINED / "config.json").is_file():
        if "LLAMA_AVSR_ASR_MODEL" in os.environ:
            pytest.fail(f"LLAMA_AVSR_ASR_MODEL={TRAINED} holds no config.json")
        subprocess.run([sys.executable, str(ROOT / "examples" / "run_avsr.py")], cwd=ROOT, check=True)
    return TRAINED


@pytest.mark.slow
def test_long_recording_wer_is_close_to_one_by_one(clips, trained_model):
    from trainer.metrics import word_error_rate

    audio, texts = clips
    pipe = pipeline(TASK, model=str(trained_model))
    one_by_one = word_error_rate([r["text"] for r in pipe(audio, batch_size=8)], texts)
    reference = [" ".join(texts)]
    chunked = word_error_rate([pipe(recording(audio, PAUSE_S), batch_size=8)["text"]], reference)
    assert chunked <= one_by_one + 0.03, (chunked, one_by_one)
    # The old default, 30-s pieces, loses most of the words.
    assert word_error_rate([pipe(recording(audio, PAUSE_S), chunk_length_s=30)["text"]], reference) > 0.5
