"""Kyutai's checkpoints on Hugging Face -> a converted bundle in the cache, made once.

    bundle_for_repo("kyutai/moshika-vis-pytorch-bf16", "8")
    # ~/.cache/moshivis-mlx/kyutai--moshika-vis-pytorch-bf16-q8

A bundle already in the cache is used as is. Otherwise the repository's files are
downloaded (or found in the Hugging Face cache) and converted; when that is impossible
(offline, unknown repository) the error names the files to fetch and what to do next.

Which files: as Kyutai's own loader (moshi.models.loaders) decides. The repository's
`config.json`, when it has one, names them (`moshi_name`, `mimi_name`, `tokenizer_name`,
`mimi_config_name`) and gives the model's settings; without one the released 7B files and
settings apply. A repository (or a folder) holding one of our bundles is converted as a
bundle. `resolve_repo` does this for `moshivis-convert --hf-repo` too, and returns the
conversion options (the files, and where they came from).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path

from moshivis_mlx.bundle import FORMAT_VERSION, read_config
from moshivis_mlx.errors import BundleError, one_line
from moshivis_mlx.fileio import Locked, fingerprint, sweep
from moshivis_mlx.paths import inside
from moshivis_mlx.quant import ALIASES, PRESETS, QuantSpec, preset_key

from .convert import ConvertOptions, Progress, convert
from .lm_layout import check_kyutai_types
from .safetensors_io import WeightsError, check_table, read_json
from .source import Source

LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
CONFIG_FILE = "config.json"
BUNDLE_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.model"]

Stage = Callable[[str], AbstractContextManager]
"""stage(description) wraps the download and the conversion (a progress display)."""


class HubError(WeightsError):
    """The model could not be obtained; the message says how to get it by hand."""


# -- the cache of converted bundles ---------------------------------------------------------

def cache_root() -> Path:
    """$MOSHIVIS_MLX_CACHE, else $XDG_CACHE_HOME/moshivis-mlx, else ~/.cache/moshivis-mlx."""
    env = os.environ.get("MOSHIVIS_MLX_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "moshivis-mlx"


def bundle_path(repo: str, quantize: str) -> Path:
    """Where `repo` converted at the preset `quantize` is cached."""
    return cache_root() / f"{repo.replace('/', '--')}-{preset_key(quantize)}"


def _is_complete(bundle: Path) -> bool:
    """A finished conversion (made in a temporary directory, renamed when complete) of
    the format this version reads."""
    if not (bundle / "tokenizer.model").exists():
        return False
    try:
        read_config(bundle)
    except BundleError:
        return False
    return True


# -- finding a repository's files ------------------------------------------------------------

def _hub():
    import huggingface_hub

    try:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:  # huggingface-hub < 0.24
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    return huggingface_hub, EntryNotFoundError, LocalEntryNotFoundError


class _NotReachable(Exception):
    """Offline, or the Hub cannot be reached, and the file is not cached."""


PROBE_SECONDS = 3.0
_online: bool | None = None


def hub_online() -> bool:
    """Whether the Hub can be reached, decided once per process: HF_HUB_OFFLINE, else a
    connection to its host within a few seconds (a name lookup that hangs counts as
    offline). Offline, every file comes from the Hugging Face cache or not at all, so a
    missing file is reported in seconds instead of after minutes of retries."""
    global _online
    if _online is None:
        from huggingface_hub import constants

        _online = not constants.HF_HUB_OFFLINE and _reachable(constants.ENDPOINT)
    return _online


def _reachable(endpoint: str, timeout: float = PROBE_SECONDS) -> bool:
    import socket
    import threading
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    if not url.hostname:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout + 0.5)  # getaddrinfo has no timeout of its own
    return bool(result and result[0])


def _why(e: Exception) -> str:
    """A download failure in a few words."""
    name = type(e).__name__
    if name == "GatedRepoError":
        return "the repository is gated: accept its terms on huggingface.co and log in"
    if name == "RepositoryNotFoundError":
        return "no such repository (or it needs a login: huggingface-cli login)"
    if name == "RevisionNotFoundError":
        return "no such revision"
    return f"{name}: {one_line(e, 160)}"


def _is_network_error(e: Exception) -> bool:
    name = type(e).__name__
    text = str(e).lower()
    return (isinstance(e, (ConnectionError, TimeoutError))
            or name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError",
                        "ConnectTimeout", "ReadTimeout", "ProxyError")
            or "offline" in text or "connect" in text)


def _fetch(repo: str, filename: str, optional: bool = False) -> Path | None:
    """A file of `repo`: from the HF cache or downloaded (HF's progress bar). None when the
    repository has no such file and it is `optional`."""
    hub, EntryNotFoundError, LocalEntryNotFoundError = _hub()
    try:
        return Path(hub.hf_hub_download(repo, filename, local_files_only=not hub_online()))
    except LocalEntryNotFoundError:
        cached = hub.try_to_load_from_cache(repo, filename)
        if cached is not None and not isinstance(cached, str) and optional:
            return None  # the cache remembers that the repository has no such file
        raise _NotReachable() from None
    except EntryNotFoundError:
        if optional:
            return None
        raise HubError(f"{repo} has no file {filename}") from None
    except Exception as e:  # HTTP errors, unknown repository, no connection
        if _is_network_error(e):
            raise _NotReachable() from None
        raise HubError(f"cannot download {filename} from {repo}: {_why(e)}") from None


def remote_header(repo: str, filename: str) -> Source:
    """The validated tensor table of a safetensors file of `repo`, reading only its header
    (an HTTP range request): what --dry-run needs, without the download."""
    hub, _, _ = _hub()
    label = f"hf://{repo}/{filename}"
    if not hub_online():
        raise _NotReachable()
    try:
        meta = hub.HfApi().parse_safetensors_file_metadata(repo, filename)
    except Exception as e:
        if _is_network_error(e):
            raise _NotReachable() from None
        raise HubError(f"cannot read the header of {label}: {_why(e)}") from None
    header = {name: {"dtype": t.dtype, "shape": list(t.shape),
                     "data_offsets": list(t.data_offsets)} for name, t in meta.tensors.items()}
    return Source.from_table(label, check_table(label, header, 1 << 62))


def _offline(repo: str, files: list[str]) -> HubError:
    """Offline: what to fetch by hand, every file the conversion needs (also those a dry
    run did not need itself)."""
    files = list(dict.fromkeys(files))
    return HubError(f"cannot download {repo}: offline, or huggingface.co cannot be reached, "
                    f"and the files are not in the Hugging Face cache; to do it by hand, "
                    f"fetch {', '.join(files)} from https://huggingface.co/{repo} into a folder "
                    f"F (config.json too if the repository has one), then run moshivis-convert "
                    f"--hf-repo F --out DIR (or moshivis-mlx --weights DIR)")


def _revision(path: Path) -> str | None:
    """The commit of a file in the HF cache (…/snapshots/<commit>/name)."""
    parts = Path(path).parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


def _get(repo: str, name: str, headers_only: bool, missing: list[str],
         label: str | None = None) -> Path | Source | None:
    """A repository file, downloaded unless cached; with `headers_only`, weights not in
    the cache are only read remotely up to their header. Unreachable: None, and the file
    is added to `missing`."""
    try:
        if headers_only and name.endswith(".safetensors"):
            cached = _hub()[0].try_to_load_from_cache(repo, name)
            return Path(cached) if isinstance(cached, str) else remote_header(repo, name)
        return _fetch(repo, name)
    except _NotReachable:
        missing.append(label or name)
        return None


def _option(value: str | Path, repo: str, local_dir: Path | None, missing: list[str],
            headers_only: bool = False) -> Path | Source | None:
    """A file option given with --hf-repo: a local path, `hf://owner/repo/file`, or the name
    of a file of the repository (as Kyutai's loader reads them)."""
    text = str(value)
    if not text.startswith("hf://"):
        if Path(text).exists():
            return Path(text)
        if local_dir is not None:
            return local_dir / text
        text = f"hf://{repo}/{text}"
    parts = text[len("hf://"):].split("/")
    if len(parts) < 3:
        raise HubError(f"{text}: expected hf://owner/repo/file")
    return _get("/".join(parts[:2]), "/".join(parts[2:]), headers_only, missing, text)


def resolve_repo(repo: str, moshi_weights: str | Path | None = None,
                 mimi_weights: str | Path | None = None, tokenizer: str | Path | None = None,
                 config: str | Path | None = None, mimi_config: str | Path | None = None,
                 prefer_lm: list[str] | None = None, headers_only: bool = False
                 ) -> ConvertOptions:
    """The conversion of `repo` (a Hugging Face repository, or a folder holding its files):
    its files, local (downloaded unless cached), and where they came from. The file
    options override the repository's choice of files.
    `prefer_lm`: language-model files to try before the configured one (e.g. Kyutai's
    `model.q8.safetensors` in its MLX repositories). `headers_only` (a dry run): weights
    not cached are not downloaded, only their headers are read, and the tokenizer is left
    out."""
    local_dir = Path(repo).expanduser() if Path(repo).expanduser().is_dir() else None
    opts = ConvertOptions(origin={"hf_repo": str(local_dir) if local_dir else repo})
    missing: list[str] = []
    cfg_path, raw = _repo_config(repo, local_dir, config, missing)
    if "format_version" in raw and any(k in raw for k in ("lm", "mimi", "vision")):
        return _bundle_repo(repo, local_dir, cfg_path, opts)
    opts.kyutai_config = cfg_path
    names = _kyutai_names(raw, cfg_path, repo, local_dir)

    def get(name: str) -> Path | Source | None:
        return local_dir / name if local_dir is not None else _get(repo, name, headers_only,
                                                                   missing)

    def given(value: str | Path, headers: bool = False) -> Path | Source | None:
        return _option(value, repo, local_dir, missing, headers and headers_only)

    if moshi_weights is not None:
        opts.moshi_weights = given(moshi_weights, headers=True)
    else:
        opts.moshi_weights = _preferred(repo, local_dir, prefer_lm or []) or get(names["lm"])
    opts.mimi_weights = (given(mimi_weights, headers=True) if mimi_weights is not None
                         else get(names["mimi"]))
    if tokenizer is not None:
        opts.tokenizer = given(tokenizer)
    elif not headers_only or local_dir is not None:
        opts.tokenizer = get(names["tokenizer"])
    else:
        opts.origin["tokenizer"] = names["tokenizer"]  # not fetched: a dry run cannot size it
    if mimi_config is not None:
        opts.mimi_config = given(mimi_config)
    elif names["mimi_config"]:
        opts.mimi_config = get(names["mimi_config"])
    if missing:
        needed = [n for n in names.values() if n]
        raise _offline(repo, needed + [n for n in missing if n not in needed and
                                       n != CONFIG_FILE])
    if local_dir is not None:
        absent = [p.name for p in (opts.moshi_weights, opts.mimi_weights, opts.tokenizer,
                                   opts.mimi_config) if p is not None and not p.exists()]
        if absent:
            raise HubError(f"{local_dir} has no {', '.join(absent)} (a folder given as "
                           f"--hf-repo holds the repository's files)")
    if isinstance(opts.moshi_weights, Path) and (revision := _revision(opts.moshi_weights)):
        opts.origin["revision"] = revision
    return opts


def _repo_config(repo: str, local_dir: Path | None, config: str | Path | None,
                 missing: list[str]) -> tuple[Path | None, dict]:
    """The repository's config.json (optional: Kyutai's loader assumes the 7B model
    without one), its path and its content, checked for types."""
    cfg_path = None
    if config is not None:
        cfg_path = _option(config, repo, local_dir, missing)
    elif local_dir is not None:
        cfg_path = local_dir / CONFIG_FILE if (local_dir / CONFIG_FILE).exists() else None
    else:
        try:
            cfg_path = _fetch(repo, CONFIG_FILE, optional=True)
        except _NotReachable:
            missing.append(CONFIG_FILE)
    try:
        raw = read_json(cfg_path) if cfg_path is not None else {}
        check_kyutai_types(raw, cfg_path)
    except WeightsError as e:
        raise HubError(str(e)) from None
    return cfg_path, raw


def _kyutai_names(raw: dict, cfg_path: Path | None, repo: str, local_dir: Path | None
                  ) -> dict[str, str]:
    """The file names Kyutai's loader (or kyuteye's) reads from a config, the released
    ones by default; each must name a file of the repository (not ../elsewhere)."""
    def named(*keys: str, default: str) -> str:
        for key in keys:
            if raw.get(key):
                inside(local_dir or Path(repo), raw[key], f"{cfg_path}: {key}")
                return raw[key]
        return default

    return {"lm": named("moshi_name", "model", default=LM_FILE),
            "mimi": named("mimi_name", "mimi_codec", default=MIMI_FILE),
            "tokenizer": named("tokenizer_name", "text_tokenizer", default=TOKENIZER_FILE),
            "mimi_config": named("mimi_config_name", default="")}


def _preferred(repo: str, local_dir: Path | None, names: list[str]) -> Path | None:
    """The first of `names` the repository has (skipped when it cannot be had)."""
    for name in names:
        if local_dir is not None:
            if (local_dir / name).exists():
                return local_dir / name
            continue
        try:
            found = _fetch(repo, name, optional=True)
        except (_NotReachable, HubError):
            continue
        if found is not None:
            return found
    return None


def _bundle_repo(repo: str, local_dir: Path | None, cfg_path: Path, opts: ConvertOptions
                 ) -> ConvertOptions:
    """A repository (or folder) holding one of our bundles."""
    if local_dir is not None:
        opts.bundle = local_dir
        return opts
    hub, _, _ = _hub()
    try:
        opts.bundle = Path(hub.snapshot_download(repo, allow_patterns=BUNDLE_PATTERNS,
                                                 local_files_only=not hub_online()))
    except Exception as e:
        if _is_network_error(e):
            raise _offline(repo, ["config.json", "*.safetensors", "tokenizer.model"]) from None
        raise HubError(f"cannot download {repo}: {_why(e)}") from None
    if revision := _revision(cfg_path):
        opts.origin["revision"] = revision
    return opts


# -- converted once, reused afterwards -------------------------------------------------------

def _prefer_quantized(repo: str, quant: QuantSpec | None) -> list[str] | None:
    """Kyutai's MLX repositories also hold the model quantized (q8: groups of 64, q4: groups
    of 32, as kyuteye_mlx loads them): when those are the quantization asked for, the
    quantized file is half (a quarter) of the download and is copied exactly."""
    if quant is None or "mlx" not in repo.rsplit("/", 1)[-1].lower():
        return None
    return [f"model.q{quant.bits}.safetensors"]


def _convert_once(opts: ConvertOptions, what: str, stage: Stage | None,
                  progress: Progress | None) -> Path:
    """Converts into the cache; any failure is a HubError saying what could not be."""
    try:
        with (stage or (lambda _: nullcontext()))(f"convert (once) to {opts.out.name}"):
            convert(opts, progress)
    except HubError:
        raise
    except Locked as e:  # another tool is converting the same model into the cache
        raise HubError(e.message, "wait for it to finish, then start again") from None
    except (WeightsError, OSError) as e:
        raise HubError(f"cannot convert {what}: {one_line(e)}") from None
    return opts.out


def find_bundle(weights: str | Path | None, repo: str, quantize: str | None = None,
                note: Callable[[str], None] | None = None, stage: Stage | None = None) -> Path:
    """The bundle a tool runs on (the app, moshivis-eval, moshivis-train): `weights` as
    given (a bundle made by moshivis-convert), else `repo` downloaded and converted once at
    `quantize` (None: 8). `note(line)` hears that -q does not apply to a given bundle."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise WeightsError(f"weights directory {path} {what}",
                               "give a bundle made by moshivis-convert with --weights DIR, "
                               "or leave --weights out to download Kyutai's model")
        if quantize is not None and note is not None:
            note(f"note: -q {quantize} is ignored: the bundle in {path} is used as it was "
                 f"converted")
        return path
    return bundle_for_repo(repo, quantize or "q8", stage=stage)


def bundle_for_repo(repo: str, quantize: str = "q8", progress: Progress | None = None,
                    stage: Stage | None = None) -> Path:
    """The converted bundle for `repo` at the preset `quantize` (q8, q4 or bf16), made if
    needed.

    `stage(description)`, if given, wraps the download and the conversion (a progress
    display); the download shows Hugging Face's own progress bars, the conversion calls
    `progress(what, done_bytes, total_bytes)`.
    """
    quant = PRESETS[preset_key(quantize)]
    sweep(cache_root())  # what killed conversions left behind
    out = bundle_path(repo, quantize)
    # A folder's conversion is redone when its files change (the cache knows them by
    # name, size, time and a sample of their content; a repository by its name).
    folder = Path(repo).expanduser()
    folder_id = fingerprint(folder, times=True) if folder.is_dir() else None
    if _is_complete(out) and folder_id == _folder_id(out):
        return out
    with (stage or (lambda _: nullcontext()))(f"download {repo}"):
        opts = resolve_repo(repo, prefer_lm=_prefer_quantized(repo, quant))
    if folder_id is not None:
        opts.origin["folder_id"] = folder_id
    return _convert_once(replace(opts, out=out, quantization=quant, force=True), repo, stage,
                         progress)


def _folder_id(bundle: Path) -> str | None:
    """The fingerprint of the folder a cached bundle was converted from (None: a
    repository's)."""
    source = read_config(bundle).get("source")
    return source.get("folder_id") if isinstance(source, dict) else None


def bundle_for_files(moshi_weights: str | Path, mimi_weights: str | Path,
                     tokenizer: str | Path, config: str | Path | None = None,
                     quantize: str = "q8", progress: Progress | None = None,
                     stage: Stage | None = None,
                     vision_weights: str | Path | None = None,
                     mimi_config: str | Path | None = None) -> Path:
    """The converted bundle for local Kyutai files, made once into the cache (keyed by the
    files' paths, sizes and modification times, and the quantization)."""
    quantize = preset_key(quantize)
    paths = [Path(p).expanduser() for p in (moshi_weights, mimi_weights, tokenizer)]
    extra = [Path(p).expanduser() for p in (config, vision_weights, mimi_config) if p is not None]
    # keyed by the preset's earlier spelling (8, 4, none): conversions cached before stay found
    old_name = {v: k for k, v in ALIASES.items()}[quantize]
    key = hashlib.sha256(f"format {FORMAT_VERSION} {old_name}".encode())
    for p in paths + extra:
        try:
            st = p.stat()
        except OSError:
            raise HubError(f"{p}: no such file") from None
        key.update(f"\n{p.resolve()} {st.st_size} {st.st_mtime_ns}".encode())
    quant = PRESETS[quantize]
    sweep(cache_root())
    out = cache_root() / f"local-{paths[0].stem}-{key.hexdigest()[:12]}-{quantize}"
    if _is_complete(out):
        return out
    opts = ConvertOptions(out=out, moshi_weights=paths[0], mimi_weights=paths[1],
                          tokenizer=paths[2], kyutai_config=Path(config) if config else None,
                          vision_weights=Path(vision_weights) if vision_weights else None,
                          mimi_config=Path(mimi_config) if mimi_config else None,
                          quantization=quant, force=True)
    return _convert_once(opts, str(paths[0]), stage, progress)
