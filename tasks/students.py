"""Build, save and load student models.

    python -m pytest tests/unit/test_students.py

``init: layers`` (DistilBERT-style): a model of the teacher's architecture with ``len(layers)`` decoder layers;
embeddings, final norm, lm_head (tied or not) and the listed decoder layers are copied from the teacher. The
student is constructed fresh from a config, so every attention module's ``layer_idx`` is its *new* position
(the KV cache indexes layers by it). ``overrides: {vocab_size: N}`` cuts the embedding rows to N or pads them
(new rows: the mean embedding). ``init: config``: a freshly initialised model of the teacher's
architecture with ``student.overrides`` applied; ``init: born_again``: the same with no overrides but
``vocab_size`` (the teacher's own architecture, every layer: born-again self-distillation). Either may be wrapped in a PEFT adapter.

Vocabulary: the student's tokenizer (``student.tokenizer``, default the teacher's) must agree with the teacher's
on every shared id; embedding rows past the tokenizer on either side are padding (:func:`check_vocab`).

Saved layout (an ordinary Hugging Face directory, safetensors only)::

    out_dir/config.json, model.safetensors, tokenizer files   full weights (LoRA / IA3 merged in)
    out_dir/adapter/                                          prefix / prompt tuning adapter (PEFT format)
    out_dir/lora/                                             a LoRA student's adapter too (PEFT format), for
                                                              ``load_student(unmerge_lora=True)`` (QLoRA export)
    out_dir/student.json                                      {"peft": method, "adapter": "adapter" | null,
                                                               "lora_adapter": "lora" | null}
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from raydistill.tasks.config import ConfigError, PeftConfig, StudentConfig, TeacherConfig

META_FILE = "student.json"
ADAPTER_DIR = "adapter"
LORA_DIR = "lora"


def resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    """Teacher layer indices with negatives resolved; errors on out-of-range, duplicate or empty lists."""
    if not layers:
        raise ConfigError("student.layers must list at least one teacher layer")
    out = []
    for i in layers:
        if not -num_layers <= i < num_layers:
            raise ConfigError(f"student.layers: teacher layer {i} does not exist (the teacher has {num_layers} "
                              f"layers: valid indices are {-num_layers}..{num_layers - 1})")
        out.append(i % num_layers)
    if len(set(out)) != len(out):
        raise ConfigError(f"student.layers {layers} name the same teacher layer twice ({out})")
    return out


def _student_config(teacher_config, num_layers: int, layer_ids: list[int] | None = None, overrides=None):
    """A copy of the teacher's HF config with ``num_layers`` layers (per-layer lists sliced) and overrides."""
    cfg = copy.deepcopy(teacher_config)
    if getattr(cfg, "quantization_config", None) is not None:  # e.g. a GGUF teacher: the student is plain fp32
        del cfg.quantization_config
    for key, value in (overrides or {}).items():
        if not hasattr(cfg, key):
            close = difflib.get_close_matches(key, list(cfg.to_dict()), n=3)
            raise ConfigError(f"student.overrides: {type(cfg).__name__} has no field {key!r}"
                              + (f"; did you mean {', '.join(close)}?" if close else ""))
        setattr(cfg, key, value)
    old_layers = teacher_config.num_hidden_layers
    num_layers = int((overrides or {}).get("num_hidden_layers", num_layers))
    cfg.num_hidden_layers = num_layers
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == old_layers:
        ids = layer_ids if layer_ids is not None else list(range(num_layers))
        cfg.layer_types = [teacher_config.layer_types[i % old_layers] for i in ids]
    cfg.dtype = torch.float32
    return cfg


def copy_layers(teacher: PreTrainedModel, layers: list[int], vocab_size: int | None = None) -> PreTrainedModel:
    """A student with the teacher's embeddings, final norm, lm_head and decoder ``layers`` (float32).

    ``vocab_size``: embedding/lm_head rows of the student (default: the teacher's); rows past the teacher's are
    initialised to the mean of the copied rows.
    """
    n_teacher = teacher.config.num_hidden_layers
    ids = resolve_layers(layers, n_teacher)
    overrides = {"vocab_size": vocab_size} if vocab_size else None
    student = AutoModelForCausalLM.from_config(_student_config(teacher.config, len(ids), ids, overrides),
                                               dtype=torch.float32)
    src = teacher.state_dict()
    state = {}
    for name, like in student.state_dict().items():
        parts = name.split(".")
        if "layers" in parts:  # model.layers.<new>.… ← model.layers.<old>.…
            at = parts.index("layers") + 1
            parts[at] = str(ids[int(parts[at])])
        t = src[".".join(parts)].detach().to(torch.float32)
        if t.shape != like.shape and t.dim() == 2 and t.shape[1] == like.shape[1]:  # embedding rows cut / padded
            rows = min(t.shape[0], like.shape[0])
            t = torch.cat([t[:rows], t[:rows].mean(0, keepdim=True).expand(like.shape[0] - rows, -1)])
        state[name] = t
    student.load_state_dict(state, strict=True)
    return student


def _derived_seed(purpose: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def build_student(student_cfg: StudentConfig, teacher_model: PreTrainedModel, *, seed: int = 0):
    """The student before training: ``init: layers`` or ``init: config``, then the PEFT adapter if any."""
    if student_cfg.init == "layers":
        other = sorted(set(student_cfg.overrides) - {"vocab_size"})
        if other:
            raise ConfigError(f"student.overrides {other}: with init: layers only vocab_size may be overridden "
                              "(the layers are the teacher's); use init: config for a new architecture")
        model = copy_layers(teacher_model, student_cfg.layers, student_cfg.overrides.get("vocab_size"))
    elif student_cfg.init in ("config", "born_again"):
        other = sorted(set(student_cfg.overrides) - {"vocab_size"})
        if student_cfg.init == "born_again" and other:
            raise ConfigError(f"student.overrides {other}: a born_again student has the teacher's own architecture "
                              "(only vocab_size may be overridden); use init: config for another one")
        n = teacher_model.config.num_hidden_layers
        # born-again: a seed of its own, so it never reproduces a teacher initialised with the same seed
        torch.manual_seed(seed if student_cfg.init == "config" else _derived_seed("born_again", seed))
        model = AutoModelForCausalLM.from_config(
            _student_config(teacher_model.config, n, overrides=student_cfg.overrides), dtype=torch.float32)
    else:
        raise ConfigError(f"student.init must be 'layers', 'config' or 'born_again', got {student_cfg.init!r}")
    return wrap_peft(model, student_cfg.peft)


def wrap_peft(model: PreTrainedModel, peft_cfg: PeftConfig):
    """Wrap ``model`` in a PEFT adapter (``peft.method``); ``none`` returns it unchanged."""
    if peft_cfg.method == "none":
        return model
    import peft

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in peft_cfg.target_modules if m not in names]
    if peft_cfg.method in ("lora", "ia3") and missing:
        raise ConfigError(f"student.peft.target_modules {missing} are not modules of this model "
                          f"(linear layers it has: {sorted(n for n in names if n.endswith('proj'))})")
    task = peft.TaskType.CAUSAL_LM
    if peft_cfg.method == "lora":
        pc = peft.LoraConfig(task_type=task, r=peft_cfg.r, lora_alpha=peft_cfg.lora_alpha,
                             target_modules=list(peft_cfg.target_modules), lora_dropout=0.0)
    elif peft_cfg.method == "ia3":
        ff = [m for m in peft_cfg.target_modules if m in ("down_proj", "fc2", "c_proj", "w2")]
        pc = peft.IA3Config(task_type=task, target_modules=list(peft_cfg.target_modules), feedforward_modules=ff)
    elif peft_cfg.method == "prefix":
        pc = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=peft_cfg.num_virtual_tokens)
    elif peft_cfg.method == "prompt":
        pc = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=peft_cfg.num_virtual_tokens)
    else:
        raise ConfigError(f"student.peft.method {peft_cfg.method!r} is not one of none, lora, ia3, prefix, prompt")
    return peft.get_peft_model(model, pc)


def peft_method(model) -> str:
    """``none`` for a plain model, else the PEFT type in lower case (``lora``, ``ia3``, ``prefix``, ``prompt``)."""
    pc = getattr(model, "peft_config", None)
    if not pc:
        return "none"
    kind = str(next(iter(pc.values())).peft_type.value).lower()
    return {"prefix_tuning": "prefix", "prompt_tuning": "prompt"}.get(kind, kind)


def load_student_tokenizer(student_cfg: StudentConfig, teacher_cfg: TeacherConfig):
    """``student.tokenizer`` (a directory or ``.gguf``), else the teacher's tokenizer."""
    from raydistill.tasks.teacher import load_tokenizer

    if student_cfg.tokenizer is None:
        return load_tokenizer(teacher_cfg)
    try:
        return load_tokenizer(dataclasses.replace(teacher_cfg, tokenizer=student_cfg.tokenizer))
    except ConfigError as e:
        raise ConfigError(str(e).replace("teacher.tokenizer", "student.tokenizer")) from None


def check_vocab(teacher_tok, student_tok, *, teacher_rows: int, student_rows: int,
                teacher_name: str = "teacher tokenizer", student_name: str = "student tokenizer") -> None:
    """Refuse a student whose tokenizer or embedding rows do not fit the teacher's data and targets.

    Passes when the tokenizers are identical (same :func:`tasks.teacher.tokenizer_hash`), or when the student's
    maps every id of the teacher's to the same token string, special tokens (roles included) too; rows past the
    tokenizers on either model are padding (masked in the loss). Raises :class:`ConfigError` naming both
    tokenizers otherwise, or when the student has fewer rows than the teacher's tokenizer has ids (the cached
    windows hold such ids).
    """
    from raydistill.tasks.teacher import tokenizer_hash

    n_t, n_s = len(teacher_tok), len(student_tok)
    if tokenizer_hash(teacher_tok) != tokenizer_hash(student_tok):
        shared = min(n_t, n_s)
        a = teacher_tok.convert_ids_to_tokens(list(range(shared)))
        b = student_tok.convert_ids_to_tokens(list(range(shared)))
        bad = [i for i in range(shared) if a[i] != b[i]]
        roles = [r for r in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")
                 if getattr(teacher_tok, r, None) is not None and getattr(student_tok, r, None) is not None
                 and getattr(teacher_tok, r) != getattr(student_tok, r)]
        if bad or roles or n_s < n_t:
            what = (f"id {bad[0]} is {a[bad[0]]!r} in the teacher's and {b[bad[0]]!r} in the student's "
                    f"({len(bad)} of {shared} shared ids differ)" if bad else
                    f"special token ids differ ({', '.join(roles)})" if roles else
                    f"the student's has {n_s} ids, the teacher's {n_t}")
            raise ConfigError(f"student tokenizer {student_name} does not match teacher tokenizer {teacher_name}: "
                              f"{what}; distillation needs the same ids (set student.tokenizer to a tokenizer "
                              "that extends the teacher's, or leave it null to use the teacher's)")
    if student_rows < n_t:
        raise ConfigError(f"the student has {student_rows} embedding rows but teacher tokenizer {teacher_name} has "
                          f"{n_t} ids (the training windows use them all); raise student.overrides.vocab_size")
    if teacher_rows < n_t:
        raise ConfigError(f"the teacher has {teacher_rows} output rows but its tokenizer {teacher_name} has {n_t} ids")


def _shape(model) -> dict:
    c = model.config
    return {"num_hidden_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "vocab_rows": model.get_output_embeddings().weight.shape[0]}


def write_init_student(teacher_cfg: TeacherConfig, student_cfg: StudentConfig, out_dir: str | Path, *,
                       seed: int = 0, init_from: str | Path | None = None) -> dict:
    """Build the student from the teacher, :func:`check_vocab` it, save it with its tokenizer to ``out_dir``.

    ``init_from``: a model directory whose weights replace the built ones (``tasks.warmstart``; same architecture).
    Returns ``{"teacher": shape, "student": shape, "copied": teacher layer ids | None}``, a shape being
    ``{num_hidden_layers, hidden_size, vocab_rows}`` (``copied``: ``init: layers`` only).
    """
    from raydistill.tasks.teacher import load_teacher, load_tokenizer
    from raydistill.tasks.warmstart import check_architecture, load_init_weights

    teacher, _ = load_teacher(teacher_cfg)
    student = build_student(student_cfg, teacher, seed=seed)
    if init_from is not None:
        loaded = load_init_weights(init_from)
        check_architecture(student, loaded, repr(str(init_from)))
        student = loaded
    info = {"teacher": _shape(teacher), "student": _shape(student), "copied": None}
    if student_cfg.init == "layers":
        info["copied"] = resolve_layers(student_cfg.layers, teacher.config.num_hidden_layers)
    student_tok = load_student_tokenizer(student_cfg, teacher_cfg)
    check_vocab(load_tokenizer(teacher_cfg), student_tok, teacher_rows=info["teacher"]["vocab_rows"],
                student_rows=info["student"]["vocab_rows"],
                teacher_name=repr(teacher_cfg.tokenizer or f"of teacher.source={teacher_cfg.source}"),
                student_name=repr(student_cfg.tokenizer or "(the teacher's)"))
    save_student(student, student_tok, out_dir)
    return info


def forward_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, L, V)`` for ``input_ids`` ``(B, L)``; drops the virtual-token positions prompt tuning prepends."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    return logits[:, -input_ids.shape[1]:]


def save_student(model, tokenizer, out_dir: str | Path) -> Path:
    """Write ``model`` (plain or PEFT) and ``tokenizer`` as a Hugging Face directory with safetensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = peft_method(model)
    adapter = lora = None
    if method in ("lora", "ia3"):
        base = copy.deepcopy(model).merge_and_unload()  # a copy: the caller's model keeps its adapter
        if method == "lora":  # kept beside the merged weights too: quantize.lora=adapter ships it unmerged
            model.save_pretrained(out / LORA_DIR, safe_serialization=True)
            lora = LORA_DIR
    elif method != "none":
        base = model.get_base_model()
        model.save_pretrained(out / ADAPTER_DIR, safe_serialization=True)
        adapter = ADAPTER_DIR
    else:
        base = model
    base.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / META_FILE).write_text(json.dumps({"peft": method, "adapter": adapter, "lora_adapter": lora}, indent=2))
    for stray in out.glob("*.bin"):
        raise RuntimeError(f"refusing a pickle weight file in a student directory: {stray}")
    return out


def load_student(path: str | Path, *, dtype: torch.dtype = torch.float32, unmerge_lora: bool = False):
    """Load what :func:`save_student` wrote (or any HF causal-LM dir); prefix/prompt adapters are re-attached.
    ``unmerge_lora``: a LoRA student comes back as a PEFT LoRA model (its adapter's update subtracted from the
    merged weights: the base up to float32 rounding), else merged as saved."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a student directory (no config.json)")
    from raydistill.tasks.guard import refuse_pickle

    model = AutoModelForCausalLM.from_pretrained(refuse_pickle(path), dtype=dtype, use_safetensors=True)
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
    if meta.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path / meta["adapter"], is_trainable=False)
    elif unmerge_lora and meta.get("lora_adapter"):
        model = _unmerged(model, path / meta["lora_adapter"])
    return model.eval()


def _unmerged(merged, adapter_dir: Path):
    """The merged model with its LoRA adapter attached and its update taken back out of the base weights."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(merged, adapter_dir, is_trainable=False)
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.merged_adapters = list(layer.active_adapters)  # as saved: merged in
            layer.unmerge()
    return model

