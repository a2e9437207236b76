"""Append a benchmark table to bench/RESULTS.md with what is needed to reproduce and compare it:
the machine (CPU model, GPU name), the torch/triton/CUDA versions, the date and the command.
"""

import datetime
import os
import platform
import shlex
from pathlib import Path

RESULTS = Path(__file__).resolve().with_name("RESULTS.md")


def machine_description() -> str:
    """One line per fact: CPU, GPU, versions."""
    import torch

    from edm_fast.device import cpu_model

    lines = [f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores), {platform.platform()}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        lines.append(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"{props.multi_processor_count} SMs, compute capability "
                     f"{props.major}.{props.minor}")
    else:
        lines.append("- GPU: none")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines.append(f"- versions: python {platform.python_version()}, torch {torch.__version__} "
                 f"(CUDA {torch.version.cuda}), triton {triton_version}")
    return "\n".join(lines)


def command_line(run: str, env_prefixes: tuple[str, ...]) -> str:
    """``run`` preceded by the environment settings it was run with (the variables starting with
    one of ``env_prefixes`` that are set), so that the recorded command repeats the run: a
    default the script applies only when a variable is unset stays unset."""
    settings = [f"{key}={shlex.quote(value)}" for key, value in sorted(os.environ.items())
                if key.startswith(env_prefixes)]
    return " ".join([*settings, run])


def append_results(title: str, table_markdown: str, command: str, path: Path = RESULTS) -> Path:
    """Append a section `## title` (date, machine, command, then the table) to `path`."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## {title}\n\n- date: {now}\n{machine_description()}\n"
               f"- command: `{command}`\n\n{table_markdown.strip()}\n")
    path = Path(path)
    if not path.exists():
        section = "# Benchmark results\n\nAppended by bench/*.py; newest last.\n" + section
    with open(path, "a", encoding="utf-8") as f:
        f.write(section)
    return path
