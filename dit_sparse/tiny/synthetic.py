"""Deterministic synthetic videos and prompts: one coloured shape moving on a dark background.

This is the training data of the project's own tiny text-to-video model (:mod:`dit_sparse.tiny.model`,
:mod:`dit_sparse.tiny.train`) and the yardstick for checking that its samples are recognisable. numpy + torch only.

Vocabulary (``prompt_of`` writes exactly this grammar, ``parse_prompt`` reads it back)::

    a <colour> <shape> <motion>
    colour: red | green | blue | yellow | white
    shape:  circle | square | triangle
    motion: moving left | moving right | moving up | moving down | bouncing

``bouncing`` is a ball bouncing on a floor: the object falls from the top, bounces once and rises again, with
little horizontal drift. The other motions travel about half the frame at constant speed.

    rng = numpy.random.default_rng(0)
    spec = random_spec(rng)                      # a ClipSpec with random colour/shape/motion and start position
    clip = make_clip(spec, 17, 64, 64)           # float32 torch tensor [F, H, W, 3] in [0, 1]
    prompt_of(spec)                              # 'a red circle moving right'
    parse_prompt("a red circle moving right")    # ClipSpec(colour='red', shape='circle', motion='right', ...)
    describe_clip(clip)                          # {'colour': 'red', 'shape': 'circle', 'motion': 'right', ...}

Everything is deterministic given the spec (and the spec given the ``numpy.random.Generator``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import torch

__all__ = [
    "COLOURS",
    "SHAPES",
    "MOTIONS",
    "BACKGROUND",
    "ClipSpec",
    "random_spec",
    "all_prompts",
    "prompt_of",
    "parse_prompt",
    "make_clip",
    "make_batch",
    "trajectory",
    "nearest_colour",
    "describe_clip",
    "matches_prompt",
]

#: RGB in [0, 1]; chosen far apart from each other and from the background
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.14),
    "green": (0.15, 0.82, 0.22),
    "blue": (0.18, 0.36, 0.98),
    "yellow": (0.96, 0.86, 0.12),
    "white": (0.96, 0.96, 0.96),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: motion keyword -> the words used in prompts
MOTIONS: dict[str, str] = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "bouncing": "bouncing",
}
#: dark background colour
BACKGROUND: tuple[float, float, float] = (0.05, 0.05, 0.07)

# geometry, in fractions of the frame's shorter side
_SIZE_RANGE = (0.13, 0.17)  # "radius": circle radius, half the square side, triangle circumradius-ish
_TRAVEL_RANGE = (0.40, 0.55)  # distance travelled by the linear motions over the clip
_BOUNCE_HEIGHT = (0.40, 0.55)  # bounce height


@dataclass(frozen=True)
class ClipSpec:
    """One clip: what (colour, shape), how (motion) and where (start point, size, travel), in frame fractions."""

    colour: str = "red"
    shape: str = "circle"
    motion: str = "right"
    #: centre at the first frame, as a fraction of width (x) and height (y); for ``bouncing`` y is the floor line
    x0: float = 0.25
    y0: float = 0.5
    size: float = 0.15
    #: travel distance (linear motions) or bounce height (bouncing), as a fraction of the shorter side
    travel: float = 0.5
    #: small horizontal drift for ``bouncing`` (fraction of the width over the clip)
    drift: float = 0.0

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {sorted(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {list(SHAPES)}")
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}; expected one of {list(MOTIONS)}")


def all_prompts() -> list[str]:
    """Every prompt of the vocabulary (5 colours x 3 shapes x 5 motions = 75), in a fixed order."""
    return [prompt_of(ClipSpec(c, s, m)) for c in COLOURS for s in SHAPES for m in MOTIONS]


def random_spec(rng: np.random.Generator, colour: str | None = None, shape: str | None = None,
                motion: str | None = None, spread: float = 1.0) -> ClipSpec:
    """A random clip spec; fixed fields may be given. The object stays fully inside the frame for the whole clip.

    ``spread`` in (0, 1] scales the placement randomness: 1 puts the start anywhere that keeps the object in frame;
    smaller values keep linear motions starting near the edge they leave from and centred across the motion,
    and bounces near the horizontal centre (the tiny model's training data use 0.4).
    """
    if not 0.0 < spread <= 1.0:
        raise ValueError(f"spread must be in (0, 1], got {spread}")
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    motion = motion or list(MOTIONS)[rng.integers(len(MOTIONS))]
    size = float(rng.uniform(*_SIZE_RANGE))
    margin = size + 0.03
    if motion == "bouncing":
        travel = float(rng.uniform(*_BOUNCE_HEIGHT))
        y0 = float(rng.uniform(max(1 - margin - 0.12, margin + travel), 1 - margin))  # the floor, low in the frame
        drift = float(rng.uniform(-0.12, 0.12)) * spread
        half = spread * (0.5 - margin - abs(drift))
        x0 = float(rng.uniform(0.5 - half, 0.5 + half))
        return ClipSpec(colour, shape, motion, x0, y0, size, travel, drift)
    travel = float(rng.uniform(*_TRAVEL_RANGE))
    lo, hi = margin, 1 - margin - travel  # start range along the motion axis for a positive direction
    along = float(rng.uniform(lo, lo + spread * (hi - lo)))
    half = spread * (0.5 - margin)
    across = float(rng.uniform(0.5 - half, 0.5 + half))
    if motion == "right":
        x0, y0 = along, across
    elif motion == "left":
        x0, y0 = 1 - along, across
    elif motion == "down":
        x0, y0 = across, along
    else:  # up
        x0, y0 = across, 1 - along
    return ClipSpec(colour, shape, motion, x0, y0, size, travel, 0.0)


def prompt_of(spec: ClipSpec) -> str:
    """``'a red circle moving right'``."""
    return f"a {spec.colour} {spec.shape} {MOTIONS[spec.motion]}"


_WORD = re.compile(r"[a-z]+")


def parse_prompt(prompt: str) -> ClipSpec:
    """The spec a prompt describes (colour, shape, motion; geometry defaults to a centred, typical clip).

    Tolerant: case, punctuation, extra words and word order do not matter, and ``bounce``/``bounces`` and
    ``moves``/``going`` are accepted. Raises ``ValueError`` when colour, shape or motion is missing or ambiguous.
    """
    words = _WORD.findall(prompt.lower())
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES or (w.endswith("s") and w[:-1] in SHAPES)]
    shapes = [w[:-1] if w not in SHAPES else w for w in shapes]
    motions = [w for w in words if w in ("left", "right", "up", "down")]
    if any(w.startswith("bounc") for w in words):
        motions.append("bouncing")
    missing = [name for name, found in (("colour", colours), ("shape", shapes), ("motion", motions)) if not found]
    if missing:
        raise ValueError(f"prompt {prompt!r} names no {', '.join(missing)}; vocabulary: colours {sorted(COLOURS)}, "
                         f"shapes {list(SHAPES)}, motions {list(MOTIONS.values())}")
    if len(set(colours)) > 1 or len(set(shapes)) > 1 or len(set(motions)) > 1:
        raise ValueError(f"prompt {prompt!r} is ambiguous (several colours, shapes or motions)")
    spec = ClipSpec(colours[0], shapes[0], motions[0])
    # a typical geometry for this motion (the middle of random_spec's ranges)
    size, travel = 0.15, 0.48
    if spec.motion == "bouncing":
        return replace(spec, x0=0.5, y0=0.8, size=size, travel=0.48, drift=0.0)
    start = {"right": (0.26, 0.5), "left": (0.74, 0.5), "down": (0.5, 0.26), "up": (0.5, 0.74)}[spec.motion]
    return replace(spec, x0=start[0], y0=start[1], size=size, travel=travel)


def trajectory(spec: ClipSpec, frames: int) -> np.ndarray:
    """Object centre per frame as ``[F, 2]`` (x, y) in frame fractions (y grows downwards)."""
    u = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    x = np.full(frames, spec.x0)
    y = np.full(frames, spec.y0)
    if spec.motion == "right":
        x = spec.x0 + spec.travel * u
    elif spec.motion == "left":
        x = spec.x0 - spec.travel * u
    elif spec.motion == "down":
        y = spec.y0 + spec.travel * u
    elif spec.motion == "up":
        y = spec.y0 - spec.travel * u
    else:  # bouncing: start at the top, hit the floor at the middle, back to the top
        y = spec.y0 - spec.travel * np.abs(np.cos(math.pi * u))
        x = spec.x0 + spec.drift * u
    return np.stack([x, y], axis=1)


def _alpha(shape: str, cx: np.ndarray, cy: np.ndarray, r: float, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage ``[F, H, W]`` from a signed distance (pixels), 1-pixel soft edge."""
    ys = np.arange(height, dtype=np.float32)[None, :, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, None, :] + 0.5
    dx = xs - cx[:, None, None]
    dy = ys - cy[:, None, None]
    if shape == "circle":
        d = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        qx, qy = np.abs(dx) - r, np.abs(dy) - r
        outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
        d = outside + np.minimum(np.maximum(qx, qy), 0)
    else:  # upward equilateral triangle, circumradius 1.3 r, centroid at the centre
        R = 1.3 * r
        # three edge half-planes: normals pointing outwards
        normals = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]
        inr = R / 2  # inradius of an equilateral triangle
        d = np.max(np.stack([nx * dx + ny * dy - inr for nx, ny in normals]), axis=0)
    return np.clip(0.5 - d, 0.0, 1.0).astype(np.float32)


def make_clip(spec: ClipSpec, frames: int, height: int, width: int) -> torch.Tensor:
    """Render ``spec``: float32 tensor ``[F, H, W, 3]`` in [0, 1] (dark background, one anti-aliased shape)."""
    if frames < 1 or height < 4 or width < 4:
        raise ValueError(f"make_clip needs frames >= 1 and height, width >= 4, got {(frames, height, width)}")
    track = trajectory(spec, frames)
    short = min(height, width)
    alpha = _alpha(spec.shape, track[:, 0] * width, track[:, 1] * height, spec.size * short, height, width)
    bg = np.asarray(BACKGROUND, dtype=np.float32)
    fg = np.asarray(COLOURS[spec.colour], dtype=np.float32)
    video = bg + alpha[..., None] * (fg - bg)
    return torch.from_numpy(np.ascontiguousarray(video, dtype=np.float32))


def make_batch(specs: list[ClipSpec], frames: int, height: int, width: int) -> torch.Tensor:
    """Clips in the VAE's layout: ``[B, 3, F, H, W]`` in [-1, 1]."""
    clips = torch.stack([make_clip(s, frames, height, width) for s in specs])
    return clips.permute(0, 4, 1, 2, 3).mul(2).sub(1).contiguous()


# ----------------------------------------------------------------------------------------------------- analysis


def nearest_colour(rgb) -> str:
    """Palette name nearest to an RGB triple in [0, 1] (chromaticity-weighted, so dim reds still read red)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    best, best_d = None, None
    for name, ref in COLOURS.items():
        ref = np.asarray(ref)
        # compare both absolute colour and brightness-normalised colour
        d = np.sum((rgb - ref) ** 2) + np.sum((rgb / (rgb.max() + 1e-6) - ref / ref.max()) ** 2)
        if best_d is None or d < best_d:
            best, best_d = name, d
    return best


def describe_clip(video, threshold: float = 0.25) -> dict:
    """What a clip shows: dominant colour, a shape guess, per-frame centroids and the motion they trace.

    ``video``: ``[F, H, W, 3]`` in [0, 1] (numpy or torch). Foreground = pixels farther than ``threshold`` (RGB
    distance) from the background colour. Returns ``colour``, ``shape``, ``motion``, ``centroids`` (``[F, 2]``
    x, y in frame fractions, NaN where a frame is empty), ``fg_fraction`` (mean foreground share per frame),
    ``visible_frames`` (frames with any foreground) and ``dx``, ``dy`` (net displacement, frame fractions).
    """
    v = video.detach().cpu().float().numpy() if torch.is_tensor(video) else np.asarray(video, dtype=np.float32)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"describe_clip expects [F, H, W, 3], got {v.shape}")
    f, h, w, _ = v.shape
    dist = np.linalg.norm(v - np.asarray(BACKGROUND, dtype=np.float32), axis=-1)
    mask = dist > threshold
    ys, xs = np.mgrid[0:h, 0:w]
    cents = np.full((f, 2), np.nan)
    for i in range(f):
        wts = dist[i] * mask[i]
        tot = wts.sum()
        if tot > 0:
            cents[i] = ((wts * (xs + 0.5)).sum() / tot / w, (wts * (ys + 0.5)).sum() / tot / h)
    visible = ~np.isnan(cents[:, 0])
    out = {"centroids": cents, "fg_fraction": float(mask.mean()), "visible_frames": int(visible.sum())}
    if not mask.any():
        out.update(colour=None, shape=None, motion=None, dx=0.0, dy=0.0)
        return out
    # colour: the median of the strongest foreground pixels
    strong = dist >= np.quantile(dist[mask], 0.5)
    out["colour"] = nearest_colour(np.median(v[strong & mask], axis=0))
    # shape: the upright circle / square / triangle of the same area at the same centroid that overlaps the mask
    # best (IoU), summed over frames; fill = mask share of its bounding box (for information)
    scores = {name: 0.0 for name in SHAPES}
    fills = []
    for i in range(f):
        m = mask[i]
        area = float(m.sum())
        if area < 6:
            continue
        yy, xx = np.nonzero(m)
        fills.append(area / ((yy.max() - yy.min() + 1) * (xx.max() - xx.min() + 1)))
        cx, cy = np.array([xx.mean() + 0.5]), np.array([yy.mean() + 0.5])
        radius = {"circle": math.sqrt(area / math.pi), "square": math.sqrt(area) / 2,
                  "triangle": math.sqrt(4 * area / (3 * math.sqrt(3))) / 1.3}
        for name in SHAPES:
            t = _alpha(name, cx, cy, radius[name], h, w)[0] > 0.5
            scores[name] += (t & m).sum() / max(1, (t | m).sum())
    out["fill"] = float(np.median(fills)) if fills else float("nan")
    out["shape_iou"] = {k: v / max(1, len(fills)) for k, v in scores.items()}
    out["shape"] = max(scores, key=scores.get) if fills else None
    # motion from the centroid track
    idx = np.nonzero(visible)[0]
    first, last = cents[idx[0]], cents[idx[-1]]
    dx, dy = float(last[0] - first[0]), float(last[1] - first[1])
    out["dx"], out["dy"] = dx, dy
    ytrack = cents[idx, 1]
    # bouncing: y goes down then comes back up (the lowest point, max y, in the middle)
    dip = float(np.nanmax(ytrack) - max(ytrack[0], ytrack[-1]))
    out["bounce_depth"] = dip
    if dip > 0.12 and dip > 1.5 * max(abs(dx), abs(dy)):
        motion = "bouncing"
    elif max(abs(dx), abs(dy)) < 0.08:
        motion = None  # (nearly) static
    elif abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    out["motion"] = motion
    return out


def matches_prompt(video, prompt: str) -> dict:
    """Check a clip against a prompt: ``{'colour': bool, 'shape': bool, 'motion': bool, 'described': {...}}``."""
    spec = parse_prompt(prompt)
    d = describe_clip(video)
    return {"colour": d["colour"] == spec.colour, "shape": d["shape"] == spec.shape,
            "motion": d["motion"] == spec.motion, "described": d}
