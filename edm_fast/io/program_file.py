"""A sampling plan as a text file: what the standalone ``edm_fast_sample`` binary runs (--plan).

The binary computes no schedule and knows no solver: it reads the plan's program (program.py)
and its guidance weight from this file, written from Python once per set of sampling options:

    from edm_fast.plan import SamplingPlan
    from edm_fast.io.program_file import write_program_file
    write_program_file("plan.txt", SamplingPlan.build(solver="heun", num_steps=18))

Format (UTF-8 text, one item per line; blank lines and lines starting with '#' are ignored;
fields are separated by spaces; numbers are decimal, floats as Python's repr, which reads back
to the same float64):

    edm-fast-program 1            first line: the format and its version
    num_registers R               registers the program uses (R >= 1)
    output S                      the source holding the result
    num_noise K                   injected noise draws per sample (K >= 0)
    guidance W                    optional: classifier-free guidance weight (absent: none)
    info KEY VALUE...             optional, any number: a description of the plan (solver,
                                  sigmas, guidance_interval) for people and read_program_file;
                                  executors ignore these lines
    ops M                         then exactly M op lines, in order:
    lin DST SRC:COEF [SRC:COEF ...]     r_DST = sum COEF * SRC
    eval DST SRC SIGMA guided|unguided  r_DST = D(SRC; SIGMA), guidance applies if guided

A source SRC is a register (>= 0), the latents (-1) or the k-th noise draw (-2 - k). The header
keys come before ``ops``, each once. Noise per seed is drawn as ``edm_fast.noise.SeedNoise``
does: the latent first, then K draws.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .files import atomic_write
from ..plan import SamplingPlan
from ..program import EVAL, LIN, Op, Program

__all__ = ["write_program_file", "read_program_file", "format_program", "MAGIC", "VERSION"]

MAGIC, VERSION = "edm-fast-program", 1


def format_program(plan: SamplingPlan) -> str:
    """The file's text for ``plan`` (see the module docstring)."""
    program = plan.program.validate()
    lines = [f"{MAGIC} {VERSION}",
             f"# {plan.solver}: {plan.num_steps} steps, {program.num_evals} denoiser evaluations"
             f" per sample, {program.num_noise} noise draws",
             f"num_registers {program.num_registers}",
             f"output {program.output}",
             f"num_noise {program.num_noise}"]
    if plan.guidance is not None:
        lines.append(f"guidance {float(plan.guidance)!r}")
    lines.append(f"info solver {plan.solver}")
    lines.append("info sigmas " + " ".join(repr(float(s)) for s in plan.sigmas))
    if plan.guidance_interval is not None:
        lines.append("info guidance_interval "
                     + " ".join(repr(float(v)) for v in plan.guidance_interval))
    lines.append(f"ops {len(program.ops)}")
    for op in program.ops:
        if op.kind == LIN:
            terms = " ".join(f"{s}:{float(c)!r}" for s, c in zip(op.srcs, op.coefs))
            lines.append(f"lin {op.dst} {terms}")
        else:
            lines.append(f"eval {op.dst} {op.srcs[0]} {float(op.sigma)!r} "
                         f"{'guided' if op.guided else 'unguided'}")
    return "\n".join(lines) + "\n"


def write_program_file(path: str | os.PathLike, plan: SamplingPlan) -> str:
    """Write ``plan`` (its program and guidance weight) for ``edm_fast_sample --plan``; the file
    is replaced atomically. Returns the path."""
    path = os.fspath(path)
    text = format_program(plan)

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


class _Reader:
    def __init__(self, path: str):
        self.path = path

    def error(self, number: int, message: str) -> ValueError:
        return ValueError(f"{self.path}:{number}: {message}")

    def int(self, number: int, text: str, what: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise self.error(number, f"{what} must be an integer, got {text!r}") from None

    def float(self, number: int, text: str, what: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise self.error(number, f"{what} must be a finite number, got {text!r}")
        return value


def read_program_file(path: str | os.PathLike) -> SamplingPlan:
    """The plan in a file of ``write_program_file``: its program (validated), guidance weight,
    and the solver, sigmas and guidance interval of its ``info`` lines ('' and () if absent).
    Raises ValueError naming the file and line of anything malformed."""
    path = os.fspath(path)
    r = _Reader(path)
    with open(path, encoding="utf-8") as f:
        lines = [(n, line.split()) for n, line in enumerate(f, 1)]
    lines = [(n, fields) for n, fields in lines if fields and not fields[0].startswith("#")]
    if not lines or lines[0][1] != [MAGIC, str(VERSION)]:
        raise ValueError(f"{path} is not an edm-fast program file: its first line must be "
                         f"'{MAGIC} {VERSION}' (write it with write_program_file)")
    header: dict[str, tuple[int, str]] = {}  # key -> (line number, value)
    info: dict[str, list[str]] = {}
    ops: list[Op] = []
    count = None
    for n, fields in lines[1:]:
        key, values = fields[0], fields[1:]
        if count is None:
            if key == "info":
                if values:
                    info[values[0]] = values[1:]
                continue
            if key not in ("num_registers", "output", "num_noise", "guidance", "ops"):
                raise r.error(n, f"unknown key {key!r}")
            if key in header or len(values) != 1:
                raise r.error(n, f"{key} must appear once, with one value")
            header[key] = (n, values[0])
            if key == "ops":
                count = r.int(n, values[0], "ops")
            continue
        if len(ops) == count:
            raise r.error(n, f"more op lines than 'ops {count}'")
        if key == "lin" and len(values) >= 2:
            dst = r.int(n, values[0], "the destination")
            terms = [term.split(":") for term in values[1:]]
            if any(len(t) != 2 for t in terms):
                raise r.error(n, "a lin term must be SRC:COEF")
            ops.append(Op(LIN, dst, tuple(r.int(n, s, "a source") for s, _ in terms),
                          tuple(r.float(n, c, "a coefficient") for _, c in terms)))
        elif key == "eval" and len(values) == 4 and values[3] in ("guided", "unguided"):
            ops.append(Op(EVAL, r.int(n, values[0], "the destination"),
                          (r.int(n, values[1], "the source"),), (),
                          r.float(n, values[2], "sigma"), values[3] == "guided"))
        else:
            raise r.error(n, "an op line must be 'lin DST SRC:COEF ...' or "
                             "'eval DST SRC SIGMA guided|unguided'")
    missing = [k for k in ("num_registers", "output", "num_noise", "ops") if k not in header]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    if len(ops) != count:
        raise ValueError(f"{path}: 'ops {count}' but {len(ops)} op lines")
    num_registers, output, num_noise = (r.int(*header[k], k) for k in
                                        ("num_registers", "output", "num_noise"))
    program = Program(tuple(ops), num_registers, output, num_noise)
    try:
        program.validate()
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    guidance = r.float(*header["guidance"], "guidance") if "guidance" in header else None
    interval = info.get("guidance_interval")
    return SamplingPlan(
        solver=" ".join(info.get("solver", [])),
        sigmas=tuple(float(v) for v in info.get("sigmas", [])), program=program,
        guidance=guidance,
        guidance_interval=None if interval is None else tuple(float(v) for v in interval))
