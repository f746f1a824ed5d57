"""LlamaAVSRProcessor: Whisper log-mel features, normalised lip frames and the LLM token sequence with placeholders.

    [BOS] <audio> A * n </audio> <video> V * m </video> prompt [transcript EOS]

n and m are the numbers of compressed encoder tokens of each clip, computed with the same functions the model uses,
so the model can replace the placeholders one for one. Labels are -100 everywhere but the transcript and its EOS.
"""

import logging

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin, WhisperFeatureExtractor

from .configuration_llama_avsr import (
    DEFAULT_PROMPTS,
    LUMA_WEIGHTS,
    MAX_AUDIO_SECONDS,
    PARTIAL_WINDOWS,
    SAMPLING_RATE,
    VIDEO_MEAN,
    VIDEO_STD,
    compressed_length,
    resolve_component,
    whisper_encoder_length,
    whisper_trimmed_frames,
)
from .tokenization_llama_avsr import load_component_tokenizer, prepare_tokenizer

logger = logging.getLogger(__name__)


def as_float_audio(samples, what: str = "audio") -> np.ndarray:
    """Mono samples as float32, checked: what the processor and the pipeline accept as an audio array.

    Integer PCM is scaled by its type's range, as soundfile reads it (int16 / 32768; unsigned types such as 8-bit
    wav are offset binary, centred on 128); floats are taken as they are (Whisper expects [-1, 1]). Anything else,
    another rank, no samples, or NaN/infinite samples raise a ValueError that starts with `what` and says what was
    given."""
    array = np.asarray(samples)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{what} must be integer PCM or float samples, got an array of dtype {array.dtype}")
    if array.ndim != 1:
        hint = " (mix the channels down or pick one first)" if array.ndim == 2 and min(array.shape) <= 8 else ""
        raise ValueError(f"{what} must be mono 1-D samples, got an array of shape {array.shape}{hint}")
    if array.size == 0:
        raise ValueError(f"{what} is empty (no samples)")
    if array.dtype.kind == "u":
        middle = (int(np.iinfo(array.dtype).max) + 1) // 2
        array = (array.astype(np.float64) - middle) / middle
    elif array.dtype.kind == "i":
        array = array.astype(np.float64) / -float(np.iinfo(array.dtype).min)
    bad = int(array.size - np.isfinite(array).sum())
    if bad:
        raise ValueError(f"{what} contains {bad} NaN or infinite samples (of {array.size})")
    return array.astype(np.float32, copy=False)


def as_video_frames(video, what: str = "video", crop_size: int = 88) -> np.ndarray:
    """(T, H, W) or (T, H, W, C) frames with pixel values 0..255 (uint8, or any real type in that range), checked
    like `as_float_audio`: the wrong rank, no frames, frames smaller than the crop, non-finite or out-of-range
    values raise a ValueError that starts with `what`. Returns the array unchanged."""
    video = np.asarray(video)
    if video.dtype.kind not in "iuf":
        raise ValueError(f"{what} must hold pixel values (uint8), got an array of dtype {video.dtype}")
    if video.ndim not in (3, 4) or (video.ndim == 4 and video.shape[-1] not in (1, 3)):
        raise ValueError(f"{what} must be (T, H, W) or (T, H, W, C) frames with C 1 or 3, got shape {video.shape}")
    t, h, w = video.shape[:3]
    if t == 0:
        raise ValueError(f"{what} has no frames")
    if h < crop_size or w < crop_size:
        raise ValueError(f"{what} frames are {h}x{w}, smaller than the {crop_size}x{crop_size} lip crop")
    if video.dtype != np.uint8:
        if video.dtype.kind == "f" and not np.isfinite(video).all():
            raise ValueError(f"{what} contains NaN or infinite pixel values")
        low, high = video.min(), video.max()
        if low < 0 or high > 255:
            raise ValueError(f"{what} pixel values must lie in 0..255 (uint8 frames), got {low:g}..{high:g}")
        if video.dtype.kind == "f" and high <= 1.0:
            logger.warning("%s: float pixel values all in [0, 1]; frames are expected in 0..255", what)
    return video


class LlamaAVSRProcessor(ProcessorMixin):
    r"""
    Args:
        feature_extractor (`WhisperFeatureExtractor`): log-mel features for the audio encoder.
        tokenizer: the LLM tokenizer, with the markers and placeholders added (see `from_components`).
        modality (`"asr" | "vsr" | "avsr"`), prompt, audio_compression_rate, video_compression_rate, partial_window:
            as in the model's config; they decide the sequence layout and must match the model.
        video_crop_size, video_mean, video_std: lip frames are centre-cropped, scaled to [0, 1] and normalised.
        audio_window (`"full" | "trimmed"`): pad log-mel to Whisper's 30-s window (as pretrained, and as the reference
            does) or only as far as the batch's longest clip needs (much faster; the encoder then masks what
            each clip does not need, so its features do not depend on its batch; see `LlamaAVSRWhisperEncoder`).
        normalize_waveform (`bool`): zero-mean unit-variance audio before Whisper, as the reference code does. Off by
            default: Whisper was pretrained on raw amplitudes and its log-mel is not gain invariant.
        transcript_leading_space (`bool`): tokenise a target as `" " + transcript` (default: the transcript reads as
            the words that follow the prompt) or bare, as the original code does (its tokenizer call gets the bare
            transcript, so its first word is the no-space token). Checkpoints converted from the original set False.
        video_output (`"normalized" | "uint8"`): `pixel_values_videos` as normalised float32 frames, or as the cropped
            uint8 frames (a quarter of the bytes to move to the device), which the model normalises there, to the same
            values (its config's `video_mean` / `video_std` must equal this processor's).
        training_clip_seconds (`[shortest, longest]`, *optional*): the durations of the clips the model was trained
            on, recorded by `examples/run_avsr.py`; the pipeline cuts long recordings into pieces of at most the
            longest.
    """

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        modality: str = "avsr",
        prompt: str | None = None,
        audio_compression_rate: int = 4,
        video_compression_rate: int = 2,
        partial_window: str = "keep",
        video_crop_size: int = 88,
        video_mean: float = VIDEO_MEAN,
        video_std: float = VIDEO_STD,
        audio_window: str = "full",
        normalize_waveform: bool = False,
        transcript_leading_space: bool = True,
        video_output: str = "normalized",
        training_clip_seconds: list[float] | None = None,
        **kwargs,
    ):
        if training_clip_seconds is not None:
            training_clip_seconds = [float(x) for x in training_clip_seconds]
            if len(training_clip_seconds) != 2 or not 0 < training_clip_seconds[0] <= training_clip_seconds[1]:
                raise ValueError(f"training_clip_seconds must be [shortest, longest] seconds, got {training_clip_seconds}")
        self.training_clip_seconds = training_clip_seconds
        if audio_window not in ("full", "trimmed"):
            raise ValueError(f"audio_window must be 'full' or 'trimmed', got {audio_window!r}")
        if video_output not in ("normalized", "uint8"):
            raise ValueError(f"video_output must be 'normalized' or 'uint8', got {video_output!r}")
        self.video_output = video_output
        self.audio_window = audio_window
        if modality not in DEFAULT_PROMPTS:
            raise ValueError(f"modality must be one of {list(DEFAULT_PROMPTS)}, got {modality!r}")
        self.modality = modality
        self.prompt = prompt if prompt is not None else DEFAULT_PROMPTS[modality]
        self.audio_compression_rate = audio_compression_rate
        self.video_compression_rate = video_compression_rate
        if partial_window not in PARTIAL_WINDOWS:
            raise ValueError(f"partial_window must be one of {PARTIAL_WINDOWS}, got {partial_window!r}")
        self.partial_window = partial_window
        self.video_crop_size = video_crop_size
        self.video_mean = video_mean
        self.video_std = video_std
        self.normalize_waveform = normalize_waveform
        self.transcript_leading_space = transcript_leading_space
        super().__init__(feature_extractor, tokenizer, **kwargs)
        self.token_ids = prepare_tokenizer(self.tokenizer)

    @classmethod
    def from_components(cls, text_model: str, audio_encoder: str | None = None, video_encoder=None,
                        modality: str = "avsr", **kwargs) -> "LlamaAVSRProcessor":
        """The processor matching `LlamaAVSRForConditionalGeneration.from_components` with the same arguments."""
        tokenizer, _ = load_component_tokenizer(text_model)
        if audio_encoder is not None:
            feature_extractor = WhisperFeatureExtractor.from_pretrained(resolve_component(audio_encoder))
        else:  # VSR: never used, but a processor always carries one so that save/load stays uniform
            feature_extractor = WhisperFeatureExtractor()
        # Config keywords the model takes (lora_rank, projector sizes, ...) are not the processor's business.
        own = {k: v for k, v in kwargs.items() if k in cls.__init__.__code__.co_varnames}
        return cls(feature_extractor=feature_extractor, tokenizer=tokenizer, modality=modality, **own)

    @property
    def uses_audio(self):
        return self.modality in ("asr", "avsr")

    @property
    def uses_video(self):
        return self.modality in ("vsr", "avsr")

    # ---- media ---------------------------------------------------------------------------------------------------

    def _audio_features(self, audio, sampling_rate):
        if sampling_rate != SAMPLING_RATE:
            raise ValueError(f"audio must be sampled at {SAMPLING_RATE} Hz, got {sampling_rate} Hz; resample it first")
        clips = []
        for i, clip in enumerate(audio):
            clip = as_float_audio(clip, f"audio clip {i}")
            if clip.size > MAX_AUDIO_SECONDS * SAMPLING_RATE:
                raise ValueError(
                    f"audio clip {i} lasts {clip.size / SAMPLING_RATE:.1f} s; Whisper's window is "
                    f"{MAX_AUDIO_SECONDS:.0f} s. Split longer recordings first."
                )
            clips.append(clip)
        window = int(MAX_AUDIO_SECONDS * SAMPLING_RATE)
        if self.audio_window == "trimmed":
            # Long enough for every clip's own encoding window (whisper_trimmed_frames): its frames, one more (the
            # extractor drops the last STFT frame, which must be padding) and 0.5 s of silence. Never the full
            # 3000 frames, so the last 20 ms of a clip of 29.98 s or more are not heard.
            hop = self.feature_extractor.hop_length
            window = whisper_trimmed_frames(-(-max(len(c) for c in clips) // hop)) * hop
        features = self.feature_extractor(
            clips,
            sampling_rate=SAMPLING_RATE,
            return_attention_mask=True,
            padding="max_length",
            max_length=window,
            do_normalize=self.normalize_waveform,
            return_tensors="pt",
        )
        mel_frames = features["attention_mask"].sum(-1)
        encoder_frames = whisper_encoder_length(mel_frames).tolist()
        num_tokens = [self._num_tokens(n, self.audio_compression_rate, f"audio clip {i}")
                      for i, n in enumerate(encoder_frames)]
        return features["input_features"], features["attention_mask"], num_tokens

    def _video_frames(self, videos):
        frames, lengths = [], []
        size = self.video_crop_size
        for i, video in enumerate(videos):
            video = as_video_frames(video, f"video {i}", size)
            if video.ndim == 4:
                video = video[..., 0] if video.shape[-1] == 1 else video.astype(np.float32) @ np.asarray(LUMA_WEIGHTS, np.float32)
            t, h, w = video.shape
            top, left = (h - size) // 2, (w - size) // 2
            crop = video[:, top : top + size, left : left + size]
            if self.video_output == "uint8":
                if crop.dtype != np.uint8:  # e.g. RGB frames, whose grey levels are fractional
                    raise ValueError(f"video {i} frames are {crop.dtype} after conversion to grey; "
                                     "video_output='uint8' takes uint8 grey (T, H, W) frames, as read_video gives them")
                frames.append(torch.from_numpy(np.ascontiguousarray(crop)))
            else:
                crop = crop.astype(np.float32) / 255.0
                frames.append(torch.from_numpy((crop - self.video_mean) / self.video_std))
            lengths.append(t)
        longest = max(lengths)
        dtype = torch.uint8 if self.video_output == "uint8" else torch.float32
        pixels = torch.zeros(len(frames), longest, size, size, dtype=dtype)
        mask = torch.zeros(len(frames), longest, dtype=torch.long)
        for i, clip in enumerate(frames):
            pixels[i, : len(clip)] = clip
            mask[i, : len(clip)] = 1
        num_tokens = [self._num_tokens(t, self.video_compression_rate, f"video {i}") for i, t in enumerate(lengths)]
        return pixels, mask, num_tokens

    def _num_tokens(self, frames: int, rate: int, what: str) -> int:
        tokens = compressed_length(frames, rate, self.partial_window)
        if tokens == 0:  # only with "drop": the model would get an empty modality block
            raise ValueError(f"{what} gives {frames} encoder frames, fewer than the compression rate {rate}: with "
                             "partial_window='drop' it would give no token")
        return tokens

    # ---- text ----------------------------------------------------------------------------------------------------

    def _encode_text(self, text: str, what: str):
        if not text.strip():
            raise ValueError(f"{what} is empty")
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        unk = self.tokenizer.unk_token_id
        # Byte-level tokenizers never produce unknown tokens, but may still not round-trip (e.g. a normaliser drops
        # characters): either way the model would be trained on, or scored against, a different text.
        if (unk is not None and unk in ids) or self.tokenizer.decode(ids).strip() != " ".join(text.split()):
            raise ValueError(f"{what} {text!r} holds characters the tokenizer cannot encode exactly")
        return ids

    def _sequence(self, num_audio: int | None, num_video: int | None, prompt_ids: list[int],
                  target_ids: list[int] | None):
        ids = [self.tokenizer.bos_token_id]
        t = self.token_ids
        if num_audio is not None:
            ids += [t["audio_start_token_id"]] + [t["audio_token_id"]] * num_audio + [t["audio_end_token_id"]]
        if num_video is not None:
            ids += [t["video_start_token_id"]] + [t["video_token_id"]] * num_video + [t["video_end_token_id"]]
        ids += prompt_ids
        labels = [-100] * len(ids)
        if target_ids is not None:
            target_ids = target_ids + [self.tokenizer.eos_token_id]
            ids, labels = ids + target_ids, labels + target_ids
        return ids, labels

    def __call__(
        self,
        audio=None,
        videos=None,
        text=None,
        sampling_rate: int = SAMPLING_RATE,
        padding_side: str = "left",
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Args:
        audio: list of 1-D float arrays, 16 kHz mono (ASR, AVSR).
        videos: list of uint8 arrays (T, H, W[, C]) of mouth regions at 25 fps (VSR, AVSR).
        text: list of target transcripts for training, or None for generation.
        padding_side: "left" (default) suits both generate() and logits_to_keep in training.
        """
        if isinstance(text, str):
            text = [text]
        if audio is not None and not isinstance(audio, (list, tuple)):
            audio = [audio]
        if videos is not None and not isinstance(videos, (list, tuple)):
            videos = [videos]
        if self.uses_audio and audio is None:
            raise ValueError(f"modality {self.modality!r} needs audio")
        if self.uses_video and videos is None:
            raise ValueError(f"modality {self.modality!r} needs videos")
        sizes = {len(x) for x in (audio if self.uses_audio else None, videos if self.uses_video else None, text)
                 if x is not None}
        if len(sizes) != 1:
            raise ValueError(f"audio, videos and text must hold the same number of samples, got sizes {sorted(sizes)}")
        batch_size = sizes.pop()

        data = {}
        audio_tokens = video_tokens = [None] * batch_size
        if self.uses_audio:
            data["input_features"], data["feature_attention_mask"], audio_tokens = self._audio_features(
                audio, sampling_rate
            )
        if self.uses_video:
            data["pixel_values_videos"], data["video_attention_mask"], video_tokens = self._video_frames(videos)

        prompt_ids = self._encode_text(self.prompt, "prompt")  # once per batch: it is checked by a round trip
        sequences = []
        for i in range(batch_size):
            target = None
            if text is not None:
                transcript = text[i].strip()
                target = self._encode_text(" " + transcript if self.transcript_leading_space else transcript,
                                           f"transcript {i}")
            sequences.append(self._sequence(audio_tokens[i], video_tokens[i], prompt_ids, target))
        longest = max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((batch_size, longest), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch_size, longest, dtype=torch.long)
        labels = torch.full((batch_size, longest), -100, dtype=torch.long)
        for i, (ids, target) in enumerate(sequences):
            span = slice(longest - len(ids), longest) if padding_side == "left" else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids)
            attention_mask[i, span] = 1
            labels[i, span] = torch.tensor(target)
        data["input_ids"], data["attention_mask"] = input_ids, attention_mask
        if text is not None:
            data["labels"] = labels
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs):
        """Decode generated ids to stripped transcripts. Pass only the new tokens: `generated[:, input_len:]`."""
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        return [t.strip() for t in texts]

    @property
    def model_input_names(self):
        names = ["input_ids", "attention_mask"]
        if self.uses_audio:
            names += ["input_features", "feature_attention_mask"]
        if self.uses_video:
            names += ["pixel_values_videos", "video_attention_mask"]
        return names


__all__ = ["LlamaAVSRProcessor", "as_float_audio", "as_video_frames"]
