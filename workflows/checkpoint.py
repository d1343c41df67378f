"""Training checkpoints as safetensors + JSON (no pickle), for any ZeRO stage, with or without offload.

A checkpoint directory (one per report; Ray Train merges the ranks' files)::

    model.safetensors          full weights of the engine's module (rank 0; gathered first under ZeRO-3): the
                               student and, with hidden-state matching, its projection heads; tied names in metadata
    optim_rank<r>.safetensors  rank r's AdamW state over its flat fp32 partition(s): exp_avg, exp_avg_sq, step
    data_rank<r>.json          rank r's data position (tasks.data.DataPosition)
    state.json                 step, zero_stage and whatever the loop adds (rank 0)

Resume: build the same model, :func:`load_weights` *before* ``deepspeed.initialize`` (ZeRO then derives its
fp32 partitions from exactly these weights), :func:`load_optimizer_tensors` after it. Needs the same
``num_workers`` and ``zero_stage`` (the partition shapes are checked). The projection heads are parameters of the
engine's module (``tasks.online.StudentWithHeads``), so they resume like the rest; :func:`export_student` writes
only ``.student``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raydistill.tasks.data import DataPosition
from raydistill.tasks.fileio import atomic_write_json, replace_dir
from raydistill.tasks.guard import refuse_pickle


def zero_flat_params(engine) -> list[torch.Tensor]:
    """The flat fp32 partitions this rank's AdamW updates (ZeRO-3 keeps them outside ``param_groups``)."""
    opt = engine.optimizer
    flat = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", None)
    if flat is None:
        raise RuntimeError(f"unsupported DeepSpeed optimizer wrapper {type(opt).__name__}")
    return list(flat)


def optimizer_tensors(engine) -> dict[str, torch.Tensor]:
    state = engine.optimizer.optimizer.state
    return {f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().to("cpu", copy=True).contiguous()
            for i, p in enumerate(zero_flat_params(engine)) for k, v in state.get(p, {}).items()}


def load_optimizer_tensors(engine, tensors: dict[str, torch.Tensor]) -> None:
    state = engine.optimizer.optimizer.state
    for i, p in enumerate(zero_flat_params(engine)):
        for name, value in tensors.items():
            idx, key = name.split(".", 1)
            if int(idx) != i:
                continue
            if key != "step" and value.shape != p.shape:
                raise RuntimeError(f"checkpoint optimizer state {name} has shape {tuple(value.shape)}, this run's "
                                   f"partition {tuple(p.shape)}: resume needs the same num_workers and zero_stage")
            state[p][key] = value.to(p.device, copy=True)


def save_weights(engine, zero_stage: int, rank: int, path: Path, module=None) -> None:
    """Full weights of ``module`` (default: the engine's whole module) to ``path`` (rank 0); under ZeRO-3 every
    rank takes part in gathering them (all of the engine's parameters: ``module`` may be a part of it).

    ZeRO flattens parameters into shared buffers, so tensors are copied out one by one; a tied weight is
    stored once and its other names are listed in the ``aliases`` metadata (see :func:`load_weights`).
    """
    import deepspeed

    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else \
        contextlib.nullcontext()
    with gather:
        if rank != 0:
            return
        tensors, aliases, seen = {}, {}, {}
        for name, t in (module if module is not None else engine.module).state_dict().items():
            ident = (t.data_ptr(), tuple(t.shape), t.stride())
            if ident in seen:
                aliases[name] = seen[ident]
                continue
            seen[ident] = name
            tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(model, path: Path) -> None:
    """Load what :func:`save_weights` wrote into a model of the same structure (strict)."""
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    tensors = load_file(str(path))
    tensors.update({alias: tensors[src] for alias, src in aliases.items()})
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # e.g. projection heads in the checkpoint and not in this run, or the reverse
        raise RuntimeError(f"{path} does not fit this run's model (resume needs the same student, "
                           f"train.hidden_loss and train.hidden_layer_map): {e}") from None


def write_checkpoint(engine, zero_stage: int, rank: int, step: int, position: DataPosition, extra: dict) -> str:
    """This rank's part of a checkpoint in a fresh temporary directory (the caller reports then removes it)."""
    d = Path(tempfile.mkdtemp(prefix="raydistill-ckpt-"))
    save_weights(engine, zero_stage, rank, d / "model.safetensors")
    save_file(optimizer_tensors(engine), str(d / f"optim_rank{rank}.safetensors"))
    (d / f"data_rank{rank}.json").write_text(json.dumps(position.to_dict()))
    if rank == 0:
        (d / "state.json").write_text(json.dumps({"step": step, "zero_stage": zero_stage, **extra}))
    return str(d)


def read_checkpoint(directory: str, model, rank: int, zero_stage: int) -> tuple[dict, dict, DataPosition]:
    """Load the weights into ``model``; return ``(state, this rank's optimizer tensors, data position)``."""
    d = refuse_pickle(directory)  # a resumed checkpoint is a model load too: safetensors + JSON only
    state = json.loads((d / "state.json").read_text())
    if state["zero_stage"] != zero_stage:
        raise RuntimeError(f"checkpoint {d} is ZeRO-{state['zero_stage']}, the config asks for ZeRO-{zero_stage}")
    if not (d / f"optim_rank{rank}.safetensors").exists():
        raise RuntimeError(f"checkpoint {d} has no state for rank {rank}: resume needs the same num_workers")
    load_weights(model, d / "model.safetensors")
    optim = load_file(str(d / f"optim_rank{rank}.safetensors"))
    position = DataPosition.from_dict(json.loads((d / f"data_rank{rank}.json").read_text()))
    return state, optim, position


def export_student(engine, zero_stage: int, rank: int, output_dir: str, fresh_model, tokenizer_dir: str,
                   metrics: dict) -> None:
    """Rank 0 writes ``<output_dir>/student`` (HF dir, safetensors, tokenizer) and ``metrics.json``.

    ``fresh_model()`` builds the student's structure (PEFT adapter included) to load the trained weights into;
    every rank takes part in gathering them (ZeRO-3). Only ``engine.module.student`` is written: the projection
    heads beside it are training-only.
    """
    from transformers import AutoTokenizer

    from raydistill.tasks.students import save_student

    tmp = Path(tempfile.mkdtemp(prefix="raydistill-export-"))
    save_weights(engine, zero_stage, rank, tmp / "model.safetensors", module=engine.module.student)
    if rank == 0:
        out = Path(output_dir)
        model = fresh_model()
        load_weights(model, tmp / "model.safetensors")
        with replace_dir(out / "student") as staging:
            save_student(model.eval(), AutoTokenizer.from_pretrained(tokenizer_dir), staging)
        atomic_write_json(out / "metrics.json", metrics)
    shutil.rmtree(tmp, ignore_errors=True)
