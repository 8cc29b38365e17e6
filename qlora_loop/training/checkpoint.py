"""What a run writes to disk: the best adapter (plain peft), and full training checkpoints to resume.

OUTPUT_DIR/checkpoints/step-NNNNNN/ holds everything needed to continue exactly: the adapter's
trainable weights (unresized, so AdaLoRA's masked ranks come back too), optimizer and scheduler
state, RNG states per rank, AdaLoRA's importance scores, the loop's position and early-stopping
state, the config and a hash of the data. It is written into a temporary folder beside it, fsynced,
renamed, and only then given its COMPLETE marker: a folder without one is ignored on resume.
Nothing is pickled, so loading runs no code: tensors in safetensors, everything else in JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from qlora_loop.errors import CheckpointError
from qlora_loop.files import replace_dir
from qlora_loop.manifest import FILE as MANIFEST, check_manifest, text_hash, write_manifest
from qlora_loop.model.adapter import adalora_of
from qlora_loop.model.init import convert_pissa, pissa_layers
from qlora_loop.training.disk import WRITE_ERRORS, describe

MARKER = "COMPLETE"
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)
FORMAT = 1


# --- the best adapter ---------------------------------------------------------------------------

def save_adapter(accelerator, model, tokenizer, directory: str | Path, *, manifest: dict | None = None) -> None:
    """Write only the adapter (never base weights, never pickle) and its manifest to `directory`,
    replacing any adapter there only once the new one is complete: a crash mid-save leaves the old
    one intact."""
    directory = Path(directory)
    accelerator.wait_for_everyone()
    peft_model = accelerator.unwrap_model(model)
    # Under FSDP / DeepSpeed each process holds a shard: gather the full weights first (a collective,
    # so every process takes part), as transformers' Trainer does; peft picks the adapter out of them.
    state_dict = accelerator.get_state_dict(model) if accelerator.distributed_type in SHARDED else None

    @accelerator.on_main_process
    def write():
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            peft_model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            if pissa_layers(peft_model):  # a LoRA of the unmodified base, as peft converts PiSSA
                convert_pissa(tmp, peft_model)
            tokenizer.save_pretrained(tmp)
            if manifest is not None:
                write_manifest(tmp, manifest)
            _fsync_tree(tmp)
            replace_dir(tmp, directory)
        except WRITE_ERRORS as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write the best adapter to {directory}: {describe(e, directory)}; "
                                  "the previous best adapter is untouched") from None

    write()
    accelerator.wait_for_everyone()


# --- full training checkpoints ------------------------------------------------------------------

def resume_identity(cfg, *, grad_accum: int, world_size: int, manifest: dict) -> dict:
    """What must not change between a save and a resume, or the resumed run is not the same run:
    the batch shapes, the world size, the order of rows and the data's content (the manifest's
    hashes of the data files, path-independent)."""
    d = cfg.data
    return {"batch_size": cfg.train.batch_size, "grad_accum": grad_accum, "max_length": d.max_length,
            "world_size": world_size, "data_hash": text_hash(" ".join(manifest["data"].values())),
            "batching": "packed" if d.packing else "grouped" if d.group_by_length else "shuffled"}


def find_resume(checkpoints: "Checkpoints", resume: str | None, *, warn=print) -> Path | None:
    """train.resume: None -> start afresh; auto -> the newest complete checkpoint, if any; else a path.
    Incomplete checkpoints (a run stopped while writing one) are named through `warn` and skipped."""
    for partial in checkpoints.incomplete():
        warn(f"[yellow]ignoring {partial}: incomplete (the run stopped while writing it)")
    if resume is None:
        return None
    if resume == "auto":
        return checkpoints.latest()
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint folder")
    return path


class Checkpoints:
    """The checkpoints of one run. `identity` holds what must not change between a save and a
    resume (see resume_identity)."""

    def __init__(self, accelerator, output_dir: str | Path, *, identity: dict, config: dict, keep_last: int = 2,
                 manifest: dict | None = None):
        self.accelerator, self.dir = accelerator, Path(output_dir) / "checkpoints"
        self.identity, self.config, self.keep_last, self.manifest = identity, config, keep_last, manifest

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (by step number, not by name)."""
        found = [p for p in self.dir.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and is_complete(p)]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def incomplete(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*step-*") if p.is_dir() and not is_complete(p))

    def latest(self) -> Path | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def save(self, runner, loop: dict) -> Path:
        """Write the state after `runner.step` optimizer steps; all processes must call it."""
        accelerator, peft_model = self.accelerator, accelerator_unwrap(runner)
        final = self.dir / f"step-{runner.step:06d}"
        tmp = self.dir / f".{final.name}.tmp"
        weights = {n: p.detach().cpu().contiguous() for n, p in peft_model.named_parameters() if p.requires_grad}
        if not all(torch.isfinite(w).all() for w in weights.values()):
            raise CheckpointError(f"refusing to write {final}: the adapter holds non-finite weights; "
                                  f"resume from {self.latest() or 'the start'}")
        adalora = adalora_of(peft_model)

        @accelerator.on_main_process
        def make_tmp():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        @accelerator.on_main_process
        def write_shared():  # one copy of what every rank holds alike
            _write(tmp / "adapter.safetensors", save_file, weights)
            _save_tree(tmp / "optimizer", runner.optimizer.state_dict())
            _save_tree(tmp / "scheduler", runner.scheduler.state_dict())
            if adalora is not None:
                _write(tmp / "adalora.safetensors", save_file, _allocator_state(adalora))
            state = {"format": FORMAT, "step": runner.step, "loop": loop, "identity": self.identity,
                     "config": self.config, "world_size": accelerator.num_processes,
                     "rank_pattern": adalora and adalora.peft_config[adalora.trainable_adapter_name].rank_pattern}
            _write(tmp / "state.json", _write_json, state)
            if self.manifest is not None:
                _write(tmp / MANIFEST, _write_json, self.manifest)

        @accelerator.on_main_process
        def publish():
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write(final / MARKER, _write_json, {"step": runner.step})  # last: the checkpoint is now complete
            _fsync_dir(self.dir)
            self._prune(final)

        try:
            make_tmp()
            accelerator.wait_for_everyone()
            _save_tree(tmp / f"rng-rank{accelerator.process_index}", _rng_state())  # each rank its own
            write_shared()
            accelerator.wait_for_everyone()
            publish()
        except WRITE_ERRORS as e:
            shutil.rmtree(tmp, ignore_errors=True)
            (final / MARKER).unlink(missing_ok=True)  # a save that failed never counts, even past the rename
            raise CheckpointError(f"cannot write checkpoint {final}: {describe(e, self.dir)}; the previous "
                                  f"checkpoint ({self.latest() or 'none'}) and the best adapter are untouched") from None
        accelerator.wait_for_everyone()
        return final

    def _prune(self, newest: Path) -> None:
        """Keep the newest `keep_last` complete checkpoints (0 keeps all); the best adapter is elsewhere."""
        if self.keep_last:
            for old in self.complete()[: -self.keep_last]:
                if old != newest:
                    shutil.rmtree(old)

    def restore(self, path: Path, runner, *, force: bool = False, tokenizer=None, base: str | None = None) -> dict:
        """Load `path` into the runner's model, optimizer, scheduler, RNG and AdaLoRA allocator;
        return the loop state. Refuses a checkpoint of a different run setup unless `force`; warns
        when its manifest records another base model or chat template."""
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker: the run was stopped "
                                  "while writing it); resume from an earlier one or with train.resume=auto")
        for warning in check_manifest(path, tokenizer, base):
            warnings.warn(warning, stacklevel=2)
        state = _read(path / "state.json", lambda f: json.loads(Path(f).read_text(encoding="utf-8")))
        if state.get("format") != FORMAT:
            raise CheckpointError(f"{path} is a checkpoint of format {state.get('format')!r}; this qlora_loop reads "
                                  f"format {FORMAT}; resume it with the qlora_loop that wrote it, or start afresh "
                                  "with --overwrite")
        saved = state["identity"]
        changed = {k: (saved.get(k), v) for k, v in self.identity.items() if saved.get(k) != v}
        if changed and not force:
            what = "; ".join(f"{k} was {old!r}, is now {new!r}" for k, (old, new) in changed.items())
            raise CheckpointError(f"cannot resume from {path}: {what}. Resuming would not continue the same run; "
                                  "restore the settings, or resume anyway with train.force_resume=true")
        peft_model = accelerator_unwrap(runner)
        weights = _read(path / "adapter.safetensors", load_file)
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        if set(weights) != set(params):
            raise CheckpointError(f"{path / 'adapter.safetensors'} does not match this model's adapter "
                                  f"({len(set(weights) ^ set(params))} tensors differ); check adapter.* settings")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name])
        runner.optimizer.load_state_dict(_load_tree(path / "optimizer"))
        runner.scheduler.load_state_dict(_load_tree(path / "scheduler"))
        adalora = adalora_of(peft_model)
        if adalora is not None:
            _restore_allocator(adalora, _read(path / "adalora.safetensors", load_file), state["rank_pattern"],
                               self.accelerator.device)
        rank = self.accelerator.process_index % state["world_size"]
        _set_rng_state(_load_tree(path / f"rng-rank{rank}"))
        runner.step = state["step"]
        return state["loop"]


def is_complete(path: Path) -> bool:
    """A checkpoint counts only once its marker is whole and names its step (a marker cut short by
    a full disk does not)."""
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8"))["step"] == int(path.name.split("-")[-1])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def accelerator_unwrap(runner):
    return runner.accelerator.unwrap_model(runner.model)


# --- pieces -------------------------------------------------------------------------------------

def _write(path: Path, writer, obj) -> None:
    writer(obj, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(obj, path: str) -> None:
    Path(path).write_text(json.dumps(obj, indent=1), encoding="utf-8")


def _read(path: Path, reader):
    try:
        return reader(str(path))
    except Exception as e:  # noqa: BLE001 — any failure here means the same thing to the user
        kind = "missing" if not path.exists() else "corrupt"
        raise CheckpointError(f"{path} is {kind} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              f"this checkpoint cannot be resumed, pick another with train.resume=PATH") from None


def _save_tree(stem: Path, tree) -> None:
    """A nested state (optimizer, scheduler, RNG) as stem.safetensors (its tensors) + stem.json
    (the rest, each tensor replaced by its key): no pickle, so loading can run no code."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj):
        if isinstance(obj, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = obj.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(obj, dict):  # keys keep their type (optimizer state is keyed by int)
            return {"__dict__": [[encode(k), encode(v)] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {"__tuple__" if isinstance(obj, tuple) else "__list__": [encode(v) for v in obj]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")

    structure = encode(tree)
    _write(stem.with_suffix(".safetensors"), save_file, tensors)
    _write(stem.with_suffix(".json"), _write_json, structure)


def _load_tree(stem: Path):
    tensors = _read(stem.with_suffix(".safetensors"), load_file)
    structure = _read(stem.with_suffix(".json"), lambda f: json.loads(Path(f).read_text(encoding="utf-8")))

    def decode(obj):
        if isinstance(obj, dict) and "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if isinstance(obj, dict) and "__dict__" in obj:
            return {decode(k): decode(v) for k, v in obj["__dict__"]}
        if isinstance(obj, dict) and ("__list__" in obj or "__tuple__" in obj):
            items = [decode(v) for v in obj.get("__list__", obj.get("__tuple__"))]
            return tuple(items) if "__tuple__" in obj else items
        return obj

    try:
        return decode(structure)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{stem.with_suffix('.json')} is corrupt ({type(e).__name__}: {e}); this checkpoint "
                              "cannot be resumed, pick another with train.resume=PATH") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _allocator_state(adalora) -> dict[str, torch.Tensor]:
    """AdaLoRA's smoothed importance scores, which decide the next rank allocation."""
    allocator = adalora.rankallocator
    return {f"{kind}/{name}": t.detach().cpu().contiguous()
            for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc") for name, t in getattr(allocator, kind).items()}


def _restore_allocator(adalora, tensors: dict, rank_pattern, device) -> None:
    allocator = adalora.rankallocator
    for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(allocator, kind, {k.split("/", 1)[1]: t.to(device) for k, t in tensors.items()
                                  if k.startswith(kind + "/")})
    adalora.peft_config[adalora.trainable_adapter_name].rank_pattern = rank_pattern
