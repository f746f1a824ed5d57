"""A rendered talking mouth whose shape follows the visemes of the phonemes being spoken.

The synthetic corpus needs video that carries real information about the speech, timed like the audio: each espeak
phoneme maps to one of 14 viseme classes; each viseme has a target mouth shape (opening, width, lip rounding, teeth
and tongue visibility); the shape at a video frame is interpolated between the targets at the phoneme centres (a
crude model of coarticulation); the frame is then drawn with soft-edged ellipses in one vectorised numpy pass over
all frames (no per-pixel Python).

Frames are 96x96 grayscale uint8, like auto_avsr's 96x96 mouth crops of LRS2/LRS3, so training can take a random
88x88 crop and evaluation a centre crop, exactly as on the real data. The mouth is centred with a small per-speaker
offset (at most 4 px) and per-frame head jitter (about 1 px), so any 88x88 crop keeps the whole mouth in view.

Frame f shows the mouth at time (f + 0.5) / fps; a clip of n audio samples at 16 kHz has ceil(n / 640) frames
(frames cover the audio; the last one may extend past it).
"""

from dataclasses import astuple, dataclass

import numpy as np

from ..configuration_llama_avsr import VIDEO_FPS

__all__ = [
    "FPS",
    "FRAME_SIZE",
    "VISEMES",
    "VISEME_SHAPES",
    "MouthShape",
    "Appearance",
    "viseme_of",
    "viseme_segments",
    "mouth_track",
    "render_mouth",
    "num_video_frames",
]

FPS = VIDEO_FPS
FRAME_SIZE = 96


@dataclass(frozen=True)
class MouthShape:
    opening: float  # 0 closed .. 1 jaw fully open
    width: float  # 0 narrow .. 1 spread (smile)
    rounding: float  # 0 neutral .. 1 protruded, rounded lips
    teeth: float  # visibility of the teeth inside the opening
    tongue: float  # visibility of the tongue tip / body


# 14 classes in the spirit of the MPEG-4 / Oculus viseme sets; shapes are hand-set articulatory targets
VISEME_SHAPES: dict[str, MouthShape] = {
    "sil": MouthShape(0.03, 0.45, 0.0, 0.0, 0.0),
    "PP": MouthShape(0.0, 0.40, 0.15, 0.0, 0.0),  # p b m: lips pressed together
    "FF": MouthShape(0.12, 0.50, 0.0, 1.0, 0.0),  # f v: upper teeth on the lower lip
    "TH": MouthShape(0.22, 0.50, 0.0, 0.6, 1.0),  # th: tongue between the teeth
    "DD": MouthShape(0.28, 0.55, 0.0, 0.6, 0.5),  # t d n l
    "kk": MouthShape(0.38, 0.50, 0.0, 0.3, 0.2),  # k g ng h
    "CH": MouthShape(0.25, 0.30, 0.7, 0.8, 0.0),  # ch j sh zh: rounded, teeth close
    "SS": MouthShape(0.14, 0.65, 0.0, 1.0, 0.0),  # s z: teeth together, spread
    "RR": MouthShape(0.25, 0.30, 0.55, 0.2, 0.2),  # r
    "aa": MouthShape(1.0, 0.60, 0.0, 0.3, 0.3),  # open vowels
    "E": MouthShape(0.55, 0.65, 0.0, 0.5, 0.2),  # mid vowels, schwa
    "ih": MouthShape(0.30, 0.85, 0.0, 0.7, 0.1),  # close front vowels, j
    "oh": MouthShape(0.70, 0.30, 0.8, 0.1, 0.1),  # back rounded vowels
    "ou": MouthShape(0.28, 0.18, 1.0, 0.0, 0.0),  # u, w
}
VISEMES = list(VISEME_SHAPES)

# espeak-ng English phoneme mnemonics -> viseme; tried longest prefix first after stress marks are removed
_PREFIX_VISEME = {
    "tS": "CH", "dZ": "CH", "S": "CH", "Z": "CH",
    "p": "PP", "b": "PP", "m": "PP",
    "f": "FF", "v": "FF",
    "T": "TH", "D": "TH",
    "t": "DD", "d": "DD", "n": "DD", "l": "DD", "?": "DD",
    "k": "kk", "g": "kk", "N": "kk", "h": "kk", "x": "kk",
    "s": "SS", "z": "SS",
    "r": "RR", "3": "RR",
    "j": "ih", "i": "ih", "I": "ih",
    "w": "ou", "u": "ou", "U": "ou",
    "a": "aa", "A": "aa", "&": "aa", "V": "aa",
    "e": "E", "E": "E", "@": "E",
    "o": "oh", "O": "oh", "0": "oh",
    "_": "sil",
}


def viseme_of(phoneme: str) -> str:
    """Viseme class of an espeak phoneme mnemonic such as "'aI", "t#", "@L" or "_:"."""
    symbol = phoneme.lstrip("'%,=")
    for n in (2, 1):
        if symbol[:n] in _PREFIX_VISEME:
            return _PREFIX_VISEME[symbol[:n]]
    return "E"  # an unknown symbol is a vowel-ish sound far more often than not


def viseme_segments(phonemes) -> list[tuple[str, float, float]]:
    """[(viseme, start, end)] with consecutive equal visemes merged."""
    segments = []
    for symbol, start, end in phonemes:
        v = viseme_of(symbol)
        if segments and segments[-1][0] == v and abs(segments[-1][2] - start) < 1e-9:
            segments[-1] = (v, segments[-1][1], end)
        else:
            segments.append((v, start, end))
    return segments


def num_video_frames(num_samples: int, sample_rate: int = 16000, fps: int = FPS) -> int:
    return -(-num_samples * fps // sample_rate)


def mouth_track(phonemes, num_frames: int, fps: int = FPS) -> np.ndarray:
    """(num_frames, 5) mouth shape per frame: the viseme targets at phoneme centres, linearly interpolated.

    The mouth rests (sil) before the first and after the last phoneme.
    """
    times = [0.0] + [(start + end) / 2 for _, start, end in phonemes] + [max([0.0] + [e for *_, e in phonemes])]
    targets = [VISEME_SHAPES["sil"]] + [VISEME_SHAPES[viseme_of(p)] for p, *_ in phonemes] + [VISEME_SHAPES["sil"]]
    targets = np.array([astuple(s) for s in targets])
    t = (np.arange(num_frames) + 0.5) / fps
    return np.stack([np.interp(t, times, targets[:, k]) for k in range(targets.shape[1])], axis=1)


@dataclass(frozen=True)
class Appearance:
    """What one synthetic speaker looks like; drawn once per speaker from its own seed."""

    skin: float  # gray level of the skin
    lip: float  # gray level of the lips
    cavity: float  # gray level inside the mouth
    teeth: float
    tongue: float
    lip_thickness: float  # px, upper lip; the lower lip is 1.3x thicker
    half_width: float  # px, mouth half-width at neutral
    offset: tuple[float, float]  # (dx, dy) px of the mouth centre from the frame centre
    shading: tuple[float, float]  # gray levels per px of a linear illumination gradient (x, y)
    texture_seed: int

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Appearance":
        skin = rng.uniform(95, 200)
        return cls(
            skin=skin,
            lip=skin - rng.uniform(25, 60),
            cavity=rng.uniform(10, 40),
            teeth=rng.uniform(185, 240),
            tongue=rng.uniform(70, 120),
            lip_thickness=rng.uniform(5.0, 8.0),
            half_width=rng.uniform(25.0, 31.0),
            offset=(rng.uniform(-4, 4), rng.uniform(-3, 3)),
            shading=(rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6)),
            texture_seed=int(rng.integers(2**31)),
        )


def _soft(inside: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in px (positive inside)."""
    return np.clip(inside + 0.5, 0.0, 1.0)


def _ellipse(x, y, a, b):
    """Approximate signed distance (px, positive inside) to an axis-aligned ellipse with half-axes a, b."""
    a, b = np.maximum(a, 1e-3), np.maximum(b, 1e-3)
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    return (1.0 - r) * np.minimum(a, b)


def _skin_texture(appearance: Appearance, size: int) -> np.ndarray:
    """Fixed smooth blotches and a philtrum/chin shadow so that speakers differ in more than a gray level."""
    rng = np.random.default_rng(appearance.texture_seed)
    noise = rng.normal(0, 1, (size // 8 + 2, size // 8 + 2))
    # bilinear upsampling of coarse noise gives smooth, cheap texture
    coords = np.linspace(0, noise.shape[0] - 1.001, size)
    i0 = coords.astype(int)
    w = coords - i0
    rows = noise[i0] * (1 - w)[:, None] + noise[i0 + 1] * w[:, None]
    smooth = rows[:, i0] * (1 - w)[None, :] + rows[:, i0 + 1] * w[None, :]
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    gradient = appearance.shading[0] * xx + appearance.shading[1] * yy
    return appearance.skin + gradient + 6.0 * smooth


def render_mouth(
    track: np.ndarray, appearance: Appearance, rng: np.random.Generator, size: int = FRAME_SIZE
) -> np.ndarray:
    """Draw (T, size, size) uint8 frames for a (T, 5) mouth track; `rng` draws the per-frame jitter and noise."""
    num_frames = len(track)
    track = np.asarray(track, dtype=np.float32)  # float32 throughout: half the memory traffic of float64
    opening, width, rounding, teeth, tongue = (track[:, k, None, None] for k in range(5))

    # head motion: a smoothed random walk of about a pixel, plus tiny scale changes and brightness flicker
    steps = rng.normal(0, 0.35, (num_frames, 3)).astype(np.float32)
    drift = np.cumsum(steps, axis=0) * 0.5
    drift -= drift.mean(axis=0)
    dx = (appearance.offset[0] + np.clip(drift[:, 0], -1.5, 1.5))[:, None, None]
    dy = (appearance.offset[1] + np.clip(drift[:, 1], -1.5, 1.5))[:, None, None]
    scale = (1.0 + 0.015 * np.tanh(drift[:, 2]))[:, None, None]
    brightness = rng.normal(0, 2.0, (num_frames, 1, 1)).astype(np.float32)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    x = (xx[None] - dx) / scale
    y = (yy[None] - dy) / scale

    # geometry in px: rounding narrows and thickens (protrudes) the lips; opening drops the jaw
    half_w = appearance.half_width * (0.72 + 0.45 * width - 0.22 * rounding)
    hole_h = appearance.half_width * 0.5 * opening
    hole_w = half_w * (0.92 - 0.25 * rounding) - 0.8
    t_up = appearance.lip_thickness * (1.0 + 0.4 * rounding)
    t_low = 1.3 * t_up
    y_centre = 0.25 * hole_h  # the lower lip and jaw move, the upper lip barely: the opening's centre drops

    yc = y - y_centre
    outer = _ellipse(x, yc, half_w, np.where(yc < 0, hole_h + t_up, hole_h + t_low))
    hole = _ellipse(x, yc, hole_w, hole_h)
    lips = _soft(outer)
    inside = _soft(hole) * np.clip(hole_h / 1.5, 0.0, 1.0)  # a sub-pixel opening shows as a seam, not a hole

    # teeth: upper teeth hang from the top of the opening, lower teeth stand at its bottom
    teeth_h = np.minimum(hole_h, 4.5) * teeth
    teeth_band = _soft(teeth_h * 0.6 - (yc + hole_h)) + 0.6 * _soft(teeth_h * 0.4 - (hole_h - yc))
    tongue_blob = _soft(_ellipse(x, yc - hole_h * 0.75, hole_w * 0.6, hole_h * 0.6 * tongue + 1e-3)) * tongue
    seam = np.exp(-((yc / 0.9) ** 2)) * _soft(hole_w - np.abs(x)) * (1.0 - np.clip(hole_h / 1.5, 0.0, 1.0))

    image = np.broadcast_to(_skin_texture(appearance, size), (num_frames, size, size)).astype(np.float32)
    # jaw shadow below the lower lip follows the opening
    chin = np.exp(-(((yc - hole_h - t_low - 6.0) / 5.0) ** 2)) * _soft(half_w * 0.9 - np.abs(x))
    image = image - 12.0 * chin
    image = image + (appearance.lip - image) * lips
    image = image + (appearance.cavity - image) * inside
    image = image + (appearance.teeth - image) * np.clip(teeth_band, 0, 1) * inside
    image = image + (appearance.tongue - image) * tongue_blob * inside
    image = image - 0.7 * (appearance.lip - appearance.cavity) * seam
    image = image + brightness + rng.standard_normal(image.shape, dtype=np.float32) * 2.0  # camera noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
