"""Monte-Carlo estimate of pi as a vcomp python job (spec: protocol/spec/domain.md).

Input (START):  {"points": N, "seed": S}
Output (RESULT): {"inside": k, "points": N}

Uses numpy when the agent's interpreter has it, else pure Python; the two draw
different random streams, so counts differ between them (and from pi.c) for the
same seed, while each is reproducible.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from vcomp.guest import run

Progress = Callable[[float], None]

PROGRESS_STEPS = 100
MAX_POINTS = 10**12

try:
    import numpy
except ImportError:  # numpy is optional
    numpy = None


def count_inside_pure(points: int, seed: int, progress: Progress) -> int:
    rand = random.Random(seed).random
    inside = 0
    done = 0
    step = points // PROGRESS_STEPS + 1
    while done < points:
        chunk = min(step, points - done)
        # A generator inside sum() keeps the hot loop in C-implemented builtins.
        inside += sum(1 for _ in range(chunk) if rand() ** 2 + rand() ** 2 <= 1.0)
        done += chunk
        progress(done / points)
    return inside


def count_inside_numpy(points: int, seed: int, progress: Progress) -> int:
    assert numpy is not None
    rng = numpy.random.default_rng(seed)
    inside = 0
    done = 0
    step = min(points // PROGRESS_STEPS + 1, 1 << 22)
    while done < points:
        chunk = min(step, points - done)
        xy = rng.random((2, chunk))
        inside += int(numpy.count_nonzero(xy[0] * xy[0] + xy[1] * xy[1] <= 1.0))
        done += chunk
        progress(done / points)
    return inside


def handler(data: bytes, progress: Progress) -> bytes:
    request = json.loads(data)
    points = int(request["points"])
    seed = int(request.get("seed", 0))
    if not 0 <= points <= MAX_POINTS:
        raise ValueError(f"points must be in [0, {MAX_POINTS}]")
    progress(0.0)
    if points == 0:
        inside = 0
    elif numpy is not None:
        inside = count_inside_numpy(points, seed, progress)
    else:
        inside = count_inside_pure(points, seed, progress)
    return json.dumps({"inside": inside, "points": points}).encode()


if __name__ == "__main__":
    run(handler)
