"""Tell a mistyped local path from a Hugging Face Hub name before anything asks the Hub.

`from_pretrained("demo/teachr")` and `load_dataset("data/missing_dir")` treat a missing directory as a
Hub repository, retry the network for half a minute and then report that the Hub cannot be reached.
A name is local-looking when it starts with `/`, `.` or `~`, has more than one `/`, ends in a data
file suffix, or its first component is a directory here (`runs/...`, `demo/...`); `org/name` with no
such directory stays a Hub name.
"""

from __future__ import annotations

from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".safetensors", ".pt")


class MissingPath(FileNotFoundError):
    """A local-looking path that does not exist; the message names it and what it was for."""

    def __str__(self) -> str:
        return self.args[0]


def looks_local(name: str) -> bool:
    path = Path(name).expanduser()
    return (name.startswith(("/", ".", "~")) or path.exists() or name.count("/") > 1
            or name.lower().endswith(DATA_SUFFIXES) or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()))


def require_dir(name: str, what: str, hint: str = "") -> None:
    """Raise MissingPath when `name` looks local and is not a directory (Hub names pass untouched)."""
    if looks_local(name) and not Path(name).expanduser().is_dir():
        state = "is a file, not a directory" if Path(name).expanduser().exists() else "no such directory"
        raise MissingPath(f"{what} {name}: {state}{hint}")


def require_file(name: str, what: str, hint: str = "") -> None:
    if not Path(name).expanduser().is_file():
        state = "is a directory, not a file" if Path(name).expanduser().is_dir() else "no such file"
        raise MissingPath(f"{what} {name}: {state}{hint}")
