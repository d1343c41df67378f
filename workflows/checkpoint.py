"""Training checkpoints as safetensors + JSON (no pickle), for any ZeRO stage, with or without offload.

A checkpoint directory (one per report; Ray Train merges the ranks' files)::

    model.safetensors          full weights (rank 0; gathered first under ZeRO-3); tied names in metadata
    optim_rank<r>.safetensors  rank r's AdamW state over its flat fp32 partition(s): exp_avg, exp_avg_sq, step
    data_rank<r>.json          rank r's data position (tasks.data.DataPosition)
    heads.safetensors          hidden-state projections (online teacher) + their AdamW state (rank 0; replicated)
    state.json                 step, zero_stage and whatever the loop adds (rank 0)

Resume: build the same model, :func:`load_weights` *before* ``deepspeed.initialize`` (ZeRO then derives its
fp32 partitions from exactly these weights), :func:`load_optimizer_tensors` after it. Needs the same
``num_workers`` and ``zero_stage`` (the partition shapes are checked). The projections (training-only, never
exported) are restored by :func:`read_heads`.
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

HEADS_FILE = "heads.safetensors"


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


def save_weights(engine, zero_stage: int, rank: int, path: Path) -> None:
    """Full weights to ``path`` (rank 0); under ZeRO-3 every rank takes part in gathering them.

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
        for name, t in engine.module.state_dict().items():
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
    model.load_state_dict(tensors, strict=True)


def heads_tensors(heads: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Projection weights (``param.<i>``) and their AdamW state (``<key>.<i>``: exp_avg, exp_avg_sq, step)."""
    out = {}
    for i, p in enumerate(heads.parameters()):
        out[f"param.{i}"] = p.detach().to("cpu", copy=True).contiguous()
        for k, v in optimizer.state.get(p, {}).items():
            out[f"{k}.{i}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().to("cpu", copy=True)
    return out


def load_heads_tensors(heads: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict) -> None:
    """Inverse of :func:`heads_tensors` into projections of the same shapes (and their optimizer)."""
    params = list(heads.parameters())
    if sum(k.startswith("param.") for k in tensors) != len(params):
        raise RuntimeError(f"checkpoint has {sum(k.startswith('param.') for k in tensors)} projection tensors, this "
                           f"run {len(params)}: resume needs the same train.hidden_layer_map")
    with torch.no_grad():
        for i, p in enumerate(params):
            if tensors[f"param.{i}"].shape != p.shape:
                raise RuntimeError(f"checkpoint projection {i} is {tuple(tensors[f'param.{i}'].shape)}, this run's "
                                   f"{tuple(p.shape)}")
            p.copy_(tensors[f"param.{i}"])
            state = {k.rsplit(".", 1)[0]: v.to(p.device, copy=True) for k, v in tensors.items()
                     if not k.startswith("param.") and k.rsplit(".", 1)[1] == str(i)}
            if state:
                optimizer.state[p] = state


def write_checkpoint(engine, zero_stage: int, rank: int, step: int, position: DataPosition, extra: dict,
                     heads: tuple | None = None) -> str:
    """This rank's part of a checkpoint in a fresh temporary directory (the caller reports then removes it).

    ``heads``: ``(projections, their optimizer)`` of hidden-state matching, written by rank 0.
    """
    d = Path(tempfile.mkdtemp(prefix="raydistill-ckpt-"))
    save_weights(engine, zero_stage, rank, d / "model.safetensors")
    save_file(optimizer_tensors(engine), str(d / f"optim_rank{rank}.safetensors"))
    (d / f"data_rank{rank}.json").write_text(json.dumps(position.to_dict()))
    if rank == 0:
        (d / "state.json").write_text(json.dumps({"step": step, "zero_stage": zero_stage, **extra}))
        if heads is not None:
            save_file(heads_tensors(*heads), str(d / HEADS_FILE))
    return str(d)


def read_heads(directory: str, heads: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore the projections and their AdamW state from a checkpoint directory."""
    path = Path(directory) / HEADS_FILE
    if not path.exists():
        raise RuntimeError(f"checkpoint {directory} has no {HEADS_FILE}: it was written without hidden-state "
                           "matching (train.hidden_loss) and cannot resume a run with it")
    load_heads_tensors(heads, optimizer, load_file(str(path)))


def read_checkpoint(directory: str, model, rank: int, zero_stage: int) -> tuple[dict, dict, DataPosition]:
    """Load the weights into ``model``; return ``(state, this rank's optimizer tensors, data position)``."""
    d = Path(directory)
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
    every rank takes part in gathering them (ZeRO-3). Projection heads are not part of the student.
    """
    from transformers import AutoTokenizer

    from raydistill.tasks.students import save_student

    tmp = Path(tempfile.mkdtemp(prefix="raydistill-export-"))
    save_weights(engine, zero_stage, rank, tmp / "model.safetensors")
    if rank == 0:
        out = Path(output_dir)
        model = fresh_model()
        load_weights(model, tmp / "model.safetensors")
        with replace_dir(out / "student") as staging:
            save_student(model.eval(), AutoTokenizer.from_pretrained(tokenizer_dir), staging)
        atomic_write_json(out / "metrics.json", metrics)
    shutil.rmtree(tmp, ignore_errors=True)
