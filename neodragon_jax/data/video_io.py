"""Video files: mp4 through PyAV, gif and PNG contact sheets through Pillow, reading through PyAV.

Frames are uint8 ``[F, H, W, 3]`` arrays. Writes go to a temporary file in the target folder that is
renamed over the target, so an interrupted write never leaves a truncated video behind.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from neodragon_jax.fsutil import chmod_like_open


class VideoWriteError(OSError):
    """The output path cannot be written (missing permission, not a folder, ...)."""


def to_uint8_frames(video: np.ndarray) -> np.ndarray:
    """``[3, F, H, W]`` or ``[F, H, W, 3]`` floats in [-1, 1] -> uint8 ``[F, H, W, 3]``.

    Matches the official pipeline: ``x * 127.5 + 127.5``, clipped, cast by truncation (spec §1.3 step 8).
    """
    v = np.asarray(video, dtype=np.float32)
    if v.ndim != 4:
        raise ValueError(f"expected a 4-D video, got shape {v.shape}")
    if v.shape[0] == 3 and v.shape[-1] != 3:
        v = np.transpose(v, (1, 2, 3, 0))
    if v.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels first or last, got shape {v.shape}")
    return np.clip(v * 127.5 + 127.5, 0, 255).astype(np.uint8)


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before expensive work, if ``path`` cannot be created."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VideoWriteError(f"cannot create the output folder {str(parent)!r}: {e.strerror or e}") from e
    if path.is_dir():
        raise VideoWriteError(f"output path {str(path)!r} is a folder; give a file name such as video.mp4")
    if not os.access(parent, os.W_OK):
        raise VideoWriteError(f"output folder {str(parent)!r} is not writable")
    # os.access trusts the permission bits (and says yes to root everywhere): /proc, a read-only mount or a
    # full disk pass it, so create (and remove) a file the way the writers will.
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
    except OSError as e:
        raise VideoWriteError(f"cannot write files in the output folder {str(parent)!r}: {e.strerror or e}") from e
    os.close(fd)
    os.unlink(probe)
    return path


@contextmanager
def _atomic(path: Path):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    chmod_like_open(tmp)  # mkstemp makes 0600; the renamed file gets what open() would give it
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 24, crf: int = 18, *,
              lossless: bool = False) -> Path:
    """H.264 mp4: yuv420p (width and height padded to even sizes by edge replication) for viewing, or with
    ``lossless`` RGB H.264 (``libx264rgb``, qp 0) that decodes to the exact pixels: datasets of small frames
    use it, since 4:2:0 chroma at 32x32 blurs an object's colour into the background."""
    import av

    path = check_writable(path)
    frames = np.asarray(frames, dtype=np.uint8)
    f, h, w, _ = frames.shape
    ph, pw = (0, 0) if lossless else (h % 2, w % 2)
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    with _atomic(path) as tmp:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264rgb" if lossless else "libx264", rate=int(fps))
            stream.width, stream.height = w + pw, h + ph
            stream.pix_fmt = "rgb24" if lossless else "yuv420p"
            stream.options = {"qp": "0"} if lossless else {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def write_gif(frames: np.ndarray, path: str | os.PathLike, fps: int = 24) -> Path:
    from PIL import Image

    path = check_writable(path)
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    with _atomic(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(1, round(1000 / fps)), loop=0)
    return path


def contact_sheet(frames: np.ndarray, columns: int = 7, max_frames: int = 49) -> np.ndarray:
    """A grid of evenly spaced frames as one uint8 image ``[rows*H, columns*W, 3]``."""
    frames = np.asarray(frames, dtype=np.uint8)
    n = min(len(frames), max_frames)
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    chosen = frames[idx]
    columns = min(columns, n)
    rows = -(-n // columns)
    h, w = chosen.shape[1:3]
    sheet = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, f in enumerate(chosen):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = f
    return sheet


def write_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    from PIL import Image

    path = check_writable(path)
    with _atomic(path) as tmp:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format="PNG")
    return path


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """All frames of a video file as uint8 ``[F, H, W, 3]`` and its frame rate (mp4/webm/gif via PyAV)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path}: no decodable video frames")
    return np.stack(frames), fps
