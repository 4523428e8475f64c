"""Monte-Carlo estimate of pi as a vcomp python job (spec: protocol/spec/domain.md).

Input (START):  {"points": N, "seed": S}   (optional "report_resume": true)
Output (RESULT): {"inside": k, "points": N}  (with "resumed_at": points already done
                 at the start, when asked and the job resumed from a checkpoint)

Checkpoints after every progress step (the points done, the hits so far and the
generator's state), so a resumed run ends with exactly the counts of an
uninterrupted one.

Uses numpy when the agent's interpreter has it, else pure Python; the two draw
different random streams, so counts differ between them (and from pi.c) for the
same seed, while each is reproducible.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from vcomp.guest import checkpoint, resume_state, run

Progress = Callable[[float], None]

PROGRESS_STEPS = 100
MAX_POINTS = 10**12

try:
    import numpy
except ImportError:  # numpy is optional
    numpy = None


def save(done: int, inside: int, generator: object) -> None:
    checkpoint(json.dumps({"done": done, "inside": inside, "generator": generator}).encode())


def restored(points: int) -> tuple[int, int, object] | None:
    """(done, inside, generator state) of the last checkpoint, if this run resumes."""
    state = resume_state()
    if state is None:
        return None
    saved = json.loads(state)
    done, inside = int(saved["done"]), int(saved["inside"])
    if not 0 <= inside <= done <= points:
        raise ValueError("checkpoint does not fit this input")
    return done, inside, saved["generator"]


def count_inside_pure(points: int, seed: int, progress: Progress) -> tuple[int, int]:
    generator = random.Random(seed)
    rand = generator.random
    inside = done = 0
    if (saved := restored(points)) is not None:
        done, inside, state = saved
        version, internal, gauss = state  # type: ignore[misc]
        generator.setstate((version, tuple(internal), gauss))
    started_at = done
    step = points // PROGRESS_STEPS + 1
    while done < points:
        chunk = min(step, points - done)
        # A generator inside sum() keeps the hot loop in C-implemented builtins.
        inside += sum(1 for _ in range(chunk) if rand() ** 2 + rand() ** 2 <= 1.0)
        done += chunk
        save(done, inside, generator.getstate())
        progress(done / points)
    return inside, started_at


def count_inside_numpy(points: int, seed: int, progress: Progress) -> tuple[int, int]:
    assert numpy is not None
    rng = numpy.random.default_rng(seed)
    inside = done = 0
    if (saved := restored(points)) is not None:
        done, inside, state = saved
        rng.bit_generator.state = state
    started_at = done
    # 1 Mi points a step: ~40 MiB of arrays, so the job fits the default 256 MiB limit
    # beside numpy's own address space (4 Mi points a step ran out of it).
    step = min(points // PROGRESS_STEPS + 1, 1 << 20)
    while done < points:
        chunk = min(step, points - done)
        xy = rng.random((2, chunk))
        inside += int(numpy.count_nonzero(xy[0] * xy[0] + xy[1] * xy[1] <= 1.0))
        done += chunk
        save(done, inside, rng.bit_generator.state)
        progress(done / points)
    return inside, started_at


def handler(data: bytes, progress: Progress) -> bytes:
    request = json.loads(data)
    points = int(request["points"])
    seed = int(request.get("seed", 0))
    if not 0 <= points <= MAX_POINTS:
        raise ValueError(f"points must be in [0, {MAX_POINTS}]")
    progress(0.0)
    started_at = 0
    if points == 0:
        inside = 0
    elif numpy is not None:
        inside, started_at = count_inside_numpy(points, seed, progress)
    else:
        inside, started_at = count_inside_pure(points, seed, progress)
    answer = {"inside": inside, "points": points}
    if request.get("report_resume") and started_at:
        answer["resumed_at"] = started_at
    return json.dumps(answer).encode()


if __name__ == "__main__":
    run(handler)
