"""Frame schedules of dynamic PET acquisitions.

Times are in seconds after injection, as PET-BIDS stores them (FrameTimesStart,
FrameDuration). The kinetic model works in minutes; the ``*_min`` properties convert.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Re-exported ("as"): the paper's schedule is read from kinpet.frames.
from kinpet.constants import PAPER_DURATIONS_S as PAPER_DURATIONS_S

# Rounding slack when checking that frames do not overlap: PET-BIDS sidecars often carry
# start times rounded to milliseconds, and tables in minutes with 7 significant digits
# (kinfitr's, PETPAL's) make neighbouring frames overlap by a few ms. An overlap up to 1 ms
# or 1 % of the shorter of the two frames is rounding; more is a wrong schedule.
OVERLAP_TOLERANCE_S = 1e-3
OVERLAP_TOLERANCE_REL = 1e-2


def overlap_tolerance_s(durations_s) -> np.ndarray:
    """The overlap allowed between each frame and the next (s), shape [n_frames - 1]."""
    d = np.asarray(durations_s, dtype=np.float64)
    return np.maximum(OVERLAP_TOLERANCE_S, OVERLAP_TOLERANCE_REL * np.minimum(d[:-1], d[1:]))


# A dynamic FDG scan lasts tens of minutes. One that ends within 5 min is almost always
# frame times written in minutes where seconds are expected (a 65-min scan read as 65 s):
# the fit would run and give wrong numbers. Beyond 4 h (more than two F-18 half-lives) a
# dynamic scan is merely implausible (seconds read as minutes?): a warning.
MIN_SCAN_S = 300.0
LONG_SCAN_S = 4 * 3600.0


class FrameScheduleError(ValueError):
    """A frame schedule is invalid; the message names the source when there is one."""


@dataclass(frozen=True, eq=False)
class FrameSchedule:
    """Start times and durations of the frames of a dynamic scan.

    Parameters
    ----------
    starts_s : array_like, shape (n_frames,)
        Frame start times in seconds after injection.
    durations_s : array_like, shape (n_frames,)
        Frame durations in seconds, all positive.
    source : str, optional
        Where the schedule came from (a file name); used in error messages.

    Raises
    ------
    FrameScheduleError
        If lengths differ, a value is not finite, a duration is not positive, a start is
        negative, or frames are out of order or overlap.
    """

    starts_s: np.ndarray
    durations_s: np.ndarray
    source: str | None = None

    def __post_init__(self):
        where = f"{self.source}: " if self.source else ""
        try:
            starts = np.array(self.starts_s, dtype=np.float64)
            durations = np.array(self.durations_s, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise FrameScheduleError(f"{where}frame times are not numbers ({err})") from None
        if starts.ndim != 1 or durations.ndim != 1:
            raise FrameScheduleError(f"{where}frame starts and durations must be 1-D lists")
        if starts.size == 0:
            raise FrameScheduleError(f"{where}the frame schedule is empty")
        if starts.size != durations.size:
            raise FrameScheduleError(
                f"{where}{starts.size} frame start times but {durations.size} frame durations"
            )
        if not (np.all(np.isfinite(starts)) and np.all(np.isfinite(durations))):
            raise FrameScheduleError(f"{where}frame times contain NaN or infinite values")
        if np.any(durations <= 0):
            bad = int(np.flatnonzero(durations <= 0)[0])
            raise FrameScheduleError(
                f"{where}frame {bad} has duration {durations[bad]} s; durations must be > 0"
            )
        if np.any(starts < 0):
            bad = int(np.flatnonzero(starts < 0)[0])
            raise FrameScheduleError(
                f"{where}frame {bad} starts before injection ({starts[bad]} s)"
            )
        ends = starts + durations
        tolerance = overlap_tolerance_s(durations)
        overlap = starts[1:] < ends[:-1] - tolerance
        if np.any(overlap):
            bad = int(np.flatnonzero(overlap)[0]) + 1
            by = ends[bad - 1] - starts[bad]
            raise FrameScheduleError(
                f"{where}frame {bad} starts at {starts[bad]:.6g} s, {by:.6g} s before frame "
                f"{bad - 1} ends at {ends[bad - 1]:.6g} s (allowed as rounding: "
                f"{tolerance[bad - 1]:.3g} s, the larger of {OVERLAP_TOLERANCE_S * 1e3:g} ms and "
                f"{OVERLAP_TOLERANCE_REL:.0%} of the shorter frame): frames must be ordered and "
                "must not overlap"
            )
        starts.setflags(write=False)
        durations.setflags(write=False)
        object.__setattr__(self, "starts_s", starts)
        object.__setattr__(self, "durations_s", durations)

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def from_durations(cls, durations_s, start_s: float = 0.0) -> FrameSchedule:
        """Contiguous frames of the given durations, the first starting at ``start_s``."""
        durations = np.asarray(durations_s, dtype=np.float64)
        starts = start_s + np.concatenate([[0.0], np.cumsum(durations)[:-1]])
        return cls(starts, durations)

    @classmethod
    def paper(cls) -> FrameSchedule:
        """The paper's 62-frame, 65-min schedule (De Benetti et al. 2023, Sec. 2.4)."""
        return cls.from_durations(PAPER_DURATIONS_S)

    @classmethod
    def from_bids_json(cls, path) -> FrameSchedule:
        """Read FrameTimesStart and FrameDuration (s) from a PET-BIDS ``_pet.json`` sidecar."""
        path = Path(path)
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FrameScheduleError(f"{path}: file not found") from None
        except UnicodeDecodeError as err:
            raise FrameScheduleError(f"{path}: not UTF-8 text ({err})") from None
        except json.JSONDecodeError as err:
            raise FrameScheduleError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(meta, dict):
            raise FrameScheduleError(f"{path}: expected a JSON object")
        missing = [k for k in ("FrameTimesStart", "FrameDuration") if k not in meta]
        if missing:
            raise FrameScheduleError(f"{path}: missing PET-BIDS field(s) {', '.join(missing)}")
        starts, durations = meta["FrameTimesStart"], meta["FrameDuration"]
        if not isinstance(starts, list) or not isinstance(durations, list):
            # A single frame may be written as a bare number.
            starts = starts if isinstance(starts, list) else [starts]
            durations = durations if isinstance(durations, list) else [durations]
        frames = cls(starts, durations, source=str(path))
        check_scan_length(frames, "PET-BIDS frame times are in seconds; are these minutes?")
        return frames

    # -- derived quantities ---------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.starts_s.size)

    def __eq__(self, other) -> bool:
        if not isinstance(other, FrameSchedule):
            return NotImplemented
        return np.array_equal(self.starts_s, other.starts_s) and np.array_equal(
            self.durations_s, other.durations_s
        )

    def __repr__(self) -> str:
        return f"FrameSchedule({len(self)} frames, {self.starts_s[0]:g}-{self.end_s:g} s)"

    @property
    def n_frames(self) -> int:
        return len(self)

    @property
    def ends_s(self) -> np.ndarray:
        return self.starts_s + self.durations_s

    @property
    def mids_s(self) -> np.ndarray:
        return self.starts_s + 0.5 * self.durations_s

    @property
    def end_s(self) -> float:
        """End of the last frame (s)."""
        return float(self.ends_s[-1])

    @property
    def starts_min(self) -> np.ndarray:
        return self.starts_s / 60.0

    @property
    def ends_min(self) -> np.ndarray:
        return self.ends_s / 60.0

    @property
    def mids_min(self) -> np.ndarray:
        return self.mids_s / 60.0

    @property
    def durations_min(self) -> np.ndarray:
        return self.durations_s / 60.0

    def to_bids(self) -> dict:
        """The two PET-BIDS fields, ready for a ``_pet.json`` sidecar."""
        return {
            "FrameTimesStart": [float(x) for x in self.starts_s],
            "FrameDuration": [float(x) for x in self.durations_s],
        }


def check_scan_length(frames: FrameSchedule, hint: str = "") -> None:
    """Refuse a scan that ends within :data:`MIN_SCAN_S`; warn beyond :data:`LONG_SCAN_S`.

    Parameters
    ----------
    frames : FrameSchedule
    hint : str
        What to tell the user (e.g. which option sets the time units), added to the message.

    Raises
    ------
    FrameScheduleError
        Naming the source and the end time.
    """
    import warnings

    where = f"{frames.source}: " if frames.source else ""
    end = frames.end_s
    if end < MIN_SCAN_S:
        raise FrameScheduleError(
            f"{where}the {len(frames)} frames end at {end:g} s, too short for a dynamic FDG "
            f"scan (at least {MIN_SCAN_S / 60:g} min){'; ' + hint if hint else ''}"
        )
    if end > LONG_SCAN_S:
        warnings.warn(
            f"{where}the {len(frames)} frames end at {end:g} s ({end / 3600:.3g} h), long for "
            f"a dynamic F-18 scan{'; ' + hint if hint else ''}",
            stacklevel=2,
        )
