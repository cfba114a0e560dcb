"""Exports: a TRAINED model version as one tar archive a client downloads.

An adapter export holds the PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`) and the `manifest.json` the worker uploaded with it
(base model, template, parameters, dataset version, metrics), in one folder named
like the archive. A merged export holds the base model with the adapter merged into
its weights (PEFT's `merge_and_unload`, safetensors) and the base model's tokenizer,
for engines that serve no LoRA.

The archive is built in a scratch folder on disk, then streamed, so memory stays
bounded by one chunk whatever the model's size, and its size and SHA-256 are known
before the first byte goes out. Merging loads a whole base model, so it runs in a
process of its own (`merge.py`), at most `max_merges` at once (later exports wait
their turn), killed when it runs past `merge_timeout_seconds` or when the client
goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.services.common.errors import (
    DataLoss,
    FailedPrecondition,
    LoraforgeError,
    NotFound,
    Unavailable,
)
from loraforge.services.common.model_access import ModelAccess
from loraforge.services.common.objectstore import ObjectStore
from loraforge.services.common.resources import parse_name
from loraforge.services.trainer import merge
from loraforge.services.trainer.checkpoints import ADAPTER_FILES as CHECKPOINT_FILES
from loraforge.services.trainer.checkpoints import (
    CheckpointInfo,
    get_checkpoint,
    is_checkpoint_name,
    parse_checkpoint,
)
from loraforge.services.trainer.runs import VERSION, Run, run_from_row
from loraforge.services.trainer.store import State, TrainerStore

log = logging.getLogger("loraforge.trainer.exports")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "manifest.json")
CHUNK = 1024 * 1024
DEFAULT_MERGE_TIMEOUT_SECONDS = 3600.0
LEFTOVER_SECONDS = 86400.0


@dataclass
class Archive:
    """A built archive in a scratch folder; `close` removes it."""

    path: Path
    file_name: str
    size_bytes: int
    sha256: str
    files: list[str]
    manifest: dict[str, Any]
    scratch: Path

    def chunks(self) -> Generator[bytes]:
        with self.path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


class Exports:
    def __init__(
        self,
        store: TrainerStore,
        objects: ObjectStore,
        models: ModelAccess,
        *,
        scratch_dir: Path | None = None,
        max_merges: int = 1,
        merge_timeout_seconds: float = DEFAULT_MERGE_TIMEOUT_SECONDS,
    ) -> None:
        self.store = store
        self.objects = objects
        self.models = models
        self.scratch_dir = scratch_dir
        self.merge_timeout_seconds = merge_timeout_seconds
        self._merges = asyncio.Semaphore(max_merges)
        if scratch_dir is not None:
            scratch_dir.mkdir(parents=True, exist_ok=True)
            # Archives a stopped trainer left behind; a day old, no export is still using one.
            for old in scratch_dir.glob("export-*"):
                with contextlib.suppress(OSError):
                    if time.time() - old.stat().st_mtime > LEFTOVER_SECONDS:
                        shutil.rmtree(old, ignore_errors=True)

    async def export(self, name: str, merged: bool) -> Archive:
        """Builds the archive of version or checkpoint `name`; the caller streams it and then
        closes it."""
        checkpoint: CheckpointInfo | None = None
        files: tuple[str, ...]
        if is_checkpoint_name(name):
            version = parse_checkpoint(name)[0]
            run = run_from_row(await asyncio.to_thread(self.store.get_version, version))
            checkpoint = await asyncio.to_thread(get_checkpoint, self.objects, name, "name", run)
            prefix, files = checkpoint.prefix, CHECKPOINT_FILES
        else:
            version = name
            parse_name(name, VERSION)
            run = run_from_row(await asyncio.to_thread(self.store.get_version, name))
            if run.state != State.TRAINED or not run.adapter_prefix:
                raise FailedPrecondition(
                    f"model version {name!r} is {run.state.value}, so it has no adapter to "
                    "export; export a TRAINED version, or one of its checkpoints "
                    "(ListCheckpoints)",
                    reason="VERSION_NOT_TRAINED",
                    metadata={"state": run.state.value},
                )
            prefix, files = run.adapter_prefix, ADAPTER_FILES
        if merged and run.params.quantization_config.quant_method == "gptq":
            raise FailedPrecondition(
                f"model version {name!r} was trained on the GPTQ-quantized base model "
                f"{run.base_model!r}, whose weights cannot take a merged adapter; export the "
                "adapter (merged false) and serve it with an engine that has LoRA",
                reason="MERGE_UNSUPPORTED",
            )
        scratch = Path(tempfile.mkdtemp(prefix="export-", dir=self.scratch_dir))
        try:
            adapter = scratch / "adapter"
            await asyncio.to_thread(self._download, run, prefix, files, adapter)
            if checkpoint is None:
                manifest = json.loads((adapter / "manifest.json").read_text(encoding="utf-8"))
            else:
                manifest = checkpoint_manifest(run, checkpoint)
            kind = "merged" if merged else "adapter"
            ids = parse_name(version, VERSION)
            step = f"-step{checkpoint.step}" if checkpoint is not None else ""
            folder_name = f"{ids['model']}-{ids['version']}{step}-{kind}"
            if merged:
                content = scratch / "merged"
                await self._merge(run, adapter, content)
                manifest = {
                    **manifest,
                    "merged": True,
                    "files": sorted(p.name for p in content.iterdir() if p.is_file()),
                }
                (content / "manifest.json").write_text(
                    json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8"
                )
            else:
                content = adapter
                manifest = {**manifest, "merged": False}
                (content / "manifest.json").write_text(
                    json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8"
                )
            archive = await asyncio.to_thread(
                _write_tar, content, scratch / f"{folder_name}.tar", folder_name
            )
            archive.manifest = manifest
            archive.scratch = scratch
            log.info(
                "exported %s (%s): %s, %d bytes", name, kind, archive.file_name, archive.size_bytes
            )
            return archive
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def _download(self, run: Run, prefix: str, files: tuple[str, ...], dest: Path) -> None:
        for file_name in files:
            try:
                self.objects.get_file(f"{prefix}/{file_name}", dest / file_name)
            except NotFound:
                raise DataLoss(
                    f"the adapter of {run.name!r} is incomplete in the object store "
                    f"({file_name} is missing under {prefix!r}); train the version again to "
                    "export it",
                    reason="ADAPTER_MISSING",
                ) from None

    def _base_model(self, run: Run) -> str:
        """What to merge into: the version's base model, if the trainer may still load it."""
        try:
            return self.models.resolve(run.base_model, "name")
        except LoraforgeError:
            raise FailedPrecondition(
                f"model version {run.name!r} was trained on {run.base_model!r}, which this "
                "trainer's model roots no longer include, so it cannot be merged here; export "
                "the adapter (merged false), or add the model's folder to the trainer's "
                "model_roots",
                reason="BASE_MODEL_NOT_AVAILABLE",
            ) from None

    async def _merge(self, run: Run, adapter: Path, out: Path) -> None:
        base = self._base_model(run)
        dtype = run.params.model_config.torch_dtype
        dtype = dtype if dtype in merge.DTYPES else "auto"
        async with self._merges:
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "loraforge.services.trainer.merge",
                *("--base-model", base, "--adapter", str(adapter), "--out", str(out)),
                *("--dtype", dtype),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                _, stderr = await asyncio.wait_for(
                    process.communicate(), self.merge_timeout_seconds
                )
            except TimeoutError:
                raise Unavailable(
                    f"merging {run.name!r} into {run.base_model!r} took longer than "
                    f"{self.merge_timeout_seconds:g} s (the trainer's merge_timeout_seconds) and "
                    "was stopped; export the adapter, or ask the operator for a longer limit",
                    reason="MERGE_TIMEOUT",
                ) from None
            finally:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
        text = stderr.decode(errors="replace").strip()
        if process.returncode == merge.REFUSED:
            raise FailedPrecondition(
                f"model version {run.name!r} cannot be merged: {text.splitlines()[-1]}",
                reason="MERGE_REFUSED",
            )
        if process.returncode != 0:
            log.error("merging %s failed (exit %s):\n%s", run.name, process.returncode, text)
            last = text.splitlines()[-1][:300] if text else f"exit status {process.returncode}"
            raise Unavailable(
                f"merging {run.name!r} into its base model failed ({last}); export the adapter "
                "instead, or try again (the trainer's log has the details)",
                reason="MERGE_FAILED",
            )
        log.info("merged %s in %.1f s", run.name, time.monotonic() - started)


def checkpoint_manifest(run: Run, checkpoint: CheckpointInfo) -> dict[str, Any]:
    """The manifest of a checkpoint's adapter: its version's, with the checkpoint's figures."""
    return {
        "format": "loraforge.adapter.v1",
        "model_version": run.name,
        "checkpoint": checkpoint.name,
        "base_model": run.base_model,
        "template": run.template,
        "dataset_version": run.dataset_version,
        "from_model_version": run.from_model_version,
        "params": run.params.to_dict(),
        "metrics": checkpoint.summary(),
        "global_step": checkpoint.step,
        "files": list(CHECKPOINT_FILES),
    }


def _write_tar(content: Path, path: Path, folder_name: str) -> Archive:
    files = sorted(p for p in content.iterdir() if p.is_file())
    digest = hashlib.sha256()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for file in files:
            info = tar.gettarinfo(str(file), arcname=f"{folder_name}/{file.name}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with file.open("rb") as fh:
                tar.addfile(info, fh)
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return Archive(
        path=path,
        file_name=path.name,
        size_bytes=path.stat().st_size,
        sha256=digest.hexdigest(),
        files=[f"{folder_name}/{file.name}" for file in files],
        manifest={},
        scratch=path.parent,
    )
