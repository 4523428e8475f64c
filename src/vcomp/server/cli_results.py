"""``vcomp-server results``: a batch's results as JSON Lines, each output streamed from the
store a chunk at a time."""

from __future__ import annotations

import base64
import codecs
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import click

from vcomp.server.cli import config_option, main, open_store
from vcomp.server.store import RESULT_OK, ResultRecord, Store

OUTPUT_CHUNK = 3 << 18  # a multiple of 3, so base64 chunks concatenate cleanly


def _output_is_utf8(read: Callable[[int, int], bytes], size: int) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for offset in range(0, size, OUTPUT_CHUNK):
            decoder.decode(read(offset, OUTPUT_CHUNK))
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def write_result_line(out: BinaryIO, store: Store, rec: ResultRecord) -> None:
    """One JSON line per job; the output is streamed in chunks, never loaded whole."""
    r = rec.result
    head: dict[str, Any] = {
        "index": rec.index,
        "job_id": rec.job_id,
        "state": rec.state.value,
        "reason": rec.reason,
        "status": r.status if r else None,
        # A success has no error (real agents describe one as "ok", its outcome kind).
        "error": (r.error or None) if r and r.status != RESULT_OK else None,
        "agent_id": r.agent_id if r else None,
        "attempt": r.attempt if r else None,
        "output_size": r.output_size if r else None,
        "output_sha256": r.output_sha256.hex() if r else None,
        "cpu_ms": r.cpu_ms if r else None,
        "wall_ms": r.wall_ms if r else None,
    }
    text = json.dumps(head)
    if r is None:
        out.write(text.encode() + b"\n")
        return
    out.write(text[:-1].encode() + b', "output_b64": "')
    with store.open_output(r.job_id, r.attempt) as blob:
        size = blob.size
        for offset in range(0, size, OUTPUT_CHUNK):
            out.write(base64.b64encode(blob.read(offset, OUTPUT_CHUNK)))
        out.write(b'"')
        if _output_is_utf8(blob.read, size):
            out.write(b', "output": "')
            decoder = codecs.getincrementaldecoder("utf-8")()
            for offset in range(0, size, OUTPUT_CHUNK):
                part = decoder.decode(blob.read(offset, OUTPUT_CHUNK), final=False)
                out.write(json.dumps(part)[1:-1].encode())
            out.write(json.dumps(decoder.decode(b"", final=True))[1:-1].encode() + b'"')
    out.write(b"}\n")


@main.command()
@click.argument("batch_id", metavar="BATCH", type=int)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path))
@config_option
def results(batch_id: int, out_path: Path | None, config_path: Path) -> None:
    """Write BATCH's results as JSON Lines.

    One line per job, to stdout or --out FILE.

    Fields: index, job_id, state, reason, status, error, agent_id, attempt, output_size,
    output_sha256, cpu_ms, wall_ms, output_b64 (the output in base64) and, when the
    output is valid UTF-8, output (as text).
    """
    with open_store(config_path) as (_, store), contextlib.ExitStack() as stack:
        store.get_batch(batch_id)
        out = sys.stdout.buffer if out_path is None else stack.enter_context(out_path.open("wb"))
        count = 0
        for rec in store.iter_results(batch_id):
            write_result_line(out, store, rec)
            count += 1
        out.flush()
    if out_path is not None:
        click.echo(f"wrote {count} results to {out_path}", err=True)
