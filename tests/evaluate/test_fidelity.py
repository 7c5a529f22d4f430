"""The fidelity sets of the evaluate stage: the teacher's own text, extra corpora, and the
teacher's NLL of each variant's greedy answers, on a microscopic word-level run."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch

import distill.sampling
import distill.teacher_text
from distill.caches import CacheMismatchError
from distill.config import (
    DataConfig,
    EvalConfig,
    PairConfig,
    PipelineConfig,
    QuantConfig,
    StudentConfig,
    TeacherConfig,
)
from distill.data import PackedSplits
from distill.evaluate import report as report_files
from distill.evaluate import stage as evaluate
from distill.evaluate.answers import TeacherJudge, pad_samples
from distill.evaluate.extra_corpora import FidelityError
from distill.models import Teacher
from distill.teacher_text import Sample
from tests.conftest import WORD_VOCAB, tiny_llama, tiny_tokenizer, word_llama

# A chat template over the word vocabulary: the user turn between w1 and w2, the answer
# after w3 (the instruction's English words are <unk>, which is fine for a test).
CHAT_TEMPLATE = (
    "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"
    "{% if add_generation_prompt %}w3{% endif %}"
)


def _words(rng: random.Random, n: int) -> str:
    # Short lines, so prompt windows start at line starts as make_prompts prefers.
    words = [f"w{rng.randrange(128)}" for _ in range(n)]
    return "\n".join(" ".join(words[i : i + 8]) for i in range(0, n, 8))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("words")
    rng = random.Random(0)
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(_words(rng, 120))
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text(_words(rng, 100))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """final/ holds the teacher's own weights (a variant identical to the teacher);
    student_init/ another model, untied (a tied random tiny model greedily repeats its last
    input token, whatever its weights, so two of them answer alike)."""
    root = tmp_path_factory.mktemp("run")
    tokenizer = tiny_tokenizer()
    other = tiny_llama(WORD_VOCAB, layers=1, seed=1, tie=False)
    for name, model in (("student_init", other), ("final", word_llama(0))):
        model.save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
    return root


def config(corpus: Path, cache: Path, **eval_overrides) -> PipelineConfig:
    return PipelineConfig(
        pair=PairConfig(
            name="tiny",
            teacher=TeacherConfig(name_or_path="unused-when-injected"),
            student=StudentConfig(num_layers=1),
        ),
        data=DataConfig(
            source="text_files", paths=[str(corpus / "*.txt")], block_size=16, val_fraction=0.34
        ),
        quant=QuantConfig(methods=[], gguf=[]),
        eval=EvalConfig(
            **{
                "max_blocks": 2,
                "batch_size": 2,
                "prompt_tokens": 4,
                "decode_tokens": 2,
                "prefill_tokens": 8,
                "repeats": 1,
                "decode_batch_size": 1,
                "measure_bandwidth": False,
                "teacher_text_prompts": 4,
                "teacher_text_tokens": 6,
                "teacher_text_batch_size": 3,
                "generation_prompts": 3,
                "generation_tokens": 5,
                "fidelity_prompt_tokens": 5,
                "generation_batch_size": 2,
                "general_prompts": 2,
                **eval_overrides,
            }
        ),
        cache_dir=str(cache),
    )


def _evaluate(cfg: PipelineConfig, run_dir: Path, teacher=None, tokenizer=None) -> dict:
    val = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    (run_dir / "report.json").unlink(missing_ok=True)  # each call evaluates again
    model = teacher if teacher is not None else word_llama(0)
    return evaluate.run(
        cfg,
        run_dir,
        teacher=Teacher.of(model, tokenizer or tiny_tokenizer()),
        splits=PackedSplits(train=val, val=val),
    )


def _teacher_nll(prompts: list[list[int]], answers: list[list[int]]) -> float:
    """The teacher's mean NLL (nats) of ``answers`` after ``prompts``, computed here token by
    token with a plain forward: the figure the generation set must report."""
    teacher = word_llama(0)
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers, strict=True):
            ids = torch.tensor([prompt + answer])
            log_probs = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), -1)
            for i, token in enumerate(answer):
                total -= float(log_probs[len(prompt) + i - 1, token])
                count += 1
    return total / count


def _greedy(model, prompts: list[list[int]], new_tokens: int, stop: int = 129) -> list[list[int]]:
    """Greedy answers by hand, one prompt at a time, up to and including ``stop``."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(new_tokens):
                token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(token)
                if token == stop:
                    break
            out.append(ids[len(prompt) :])
    return out


def test_pad_samples_masks_prompts_and_padding() -> None:
    samples = [Sample("chat", "a", (5, 6, 7), (8, 9)), Sample("continuation", "b", (1,), (2,))]
    tokens, mask = pad_samples(samples, pad_id=0)
    assert tokens.tolist() == [[5, 6, 7, 8, 9], [1, 2, 0, 0, 0]]
    assert mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 0, 0]]


def test_a_variant_identical_to_the_teacher_is_faithful_on_every_set(
    corpus: Path, run_dir: Path, tmp_path: Path
) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    cfg = config(
        corpus,
        tmp_path / "cache",
        extra_corpora=[str(corpus / "extra" / "notes.txt")],
        teacher_text_dir=str(tmp_path / "tt"),
        fidelity=["teacher_text", "generation"],  # general: the test below
    )
    start = time.perf_counter()
    report = _evaluate(cfg, run_dir, tokenizer=tokenizer)
    print(f"evaluate with fidelity sets: {time.perf_counter() - start:.1f} s")
    rows = {v["name"]: v for v in report["variants"]}
    assert list(rows) == ["teacher", "student_init", "student"]
    sets = ("teacher_text", "extra:notes.txt", "generation")
    assert list(report["fidelity"]) == list(sets)
    for row in rows.values():
        assert list(row["fidelity"]) == list(sets)

    # Only the teacher's completions are scored: their tokens, not the prompts'.
    samples = json.loads((tmp_path / "tt" / "samples.json").read_text())
    assert len(samples) == 4
    assert {s["kind"] for s in samples} == {"chat", "continuation"}  # half chat: a template
    completion_tokens = sum(len(s["completion"]) for s in samples)
    for row in rows.values():
        assert row["fidelity"]["teacher_text"]["scored_tokens"] == completion_tokens
    assert report["fidelity"]["teacher_text"]["scored_tokens"] == completion_tokens
    notes_blocks = report["fidelity"]["extra:notes.txt"]["rows"]
    assert 1 <= notes_blocks <= cfg.eval.extra_corpus_blocks
    assert rows["student"]["fidelity"]["extra:notes.txt"]["scored_tokens"] == notes_blocks * 15

    for name in ("teacher", "student"):  # the teacher, and a copy of its weights
        fid = rows[name]["fidelity"]
        for scored in ("teacher_text", "extra:notes.txt"):
            assert fid[scored]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5)
            assert fid[scored]["top1_agreement"] == 1.0
            assert math.isfinite(fid[scored]["perplexity"]) and fid[scored]["perplexity"] > 1
        assert fid["generation"]["teacher_nll_ratio"] == pytest.approx(1.0, rel=1e-6)
        assert fid["generation"]["teacher_nll"] == pytest.approx(
            report["fidelity"]["generation"]["teacher_nll"], rel=1e-6
        )
        assert fid["generation"]["prompts"] == 3
    other = rows["student_init"]["fidelity"]
    assert other["teacher_text"]["kl_to_teacher"] > 0.01
    assert other["extra:notes.txt"]["kl_to_teacher"] > 0.01
    # The generation set, recomputed here from scratch: the variant's own greedy answers, and
    # the *teacher's* NLL of them (a variant scoring its own answers, or the teacher answering
    # in its place, gives other numbers), over the teacher's NLL of its own answers.
    from distill.evaluate.fidelity import fidelity_inputs
    from distill.models import load_causal_lm

    prompts = [list(p.tokens) for p in fidelity_inputs(cfg, tokenizer).generation]
    variant = load_causal_lm(run_dir / "student_init").eval()
    want_nll = _teacher_nll(prompts, _greedy(variant, prompts, cfg.eval.generation_tokens))
    own_nll = _teacher_nll(prompts, _greedy(word_llama(0), prompts, cfg.eval.generation_tokens))
    assert other["generation"]["teacher_nll"] == pytest.approx(want_nll, rel=1e-4)
    assert report["fidelity"]["generation"]["teacher_nll"] == pytest.approx(own_nll, rel=1e-4)
    assert other["generation"]["teacher_nll_ratio"] == pytest.approx(want_nll / own_nll, rel=1e-4)
    assert abs(want_nll / own_nll - 1.0) > 0.05  # far enough from 1 to tell the two apart

    # report.md: the fidelity table right after the headline, one line per set.
    md = (run_dir / "report.md").read_text()
    table = report_files.format_fidelity_table(report)
    assert "## Fidelity to the teacher" in md and table in md
    assert md.index(report_files.format_table(report)) < md.index(table)
    assert md.index(table) < md.index("## Memory and the bandwidth bound")
    (student_line,) = [ln for ln in table.splitlines() if ln.startswith("| student |")]
    assert "0.0000" in student_line and "100.0%" in student_line and "1.00×" in student_line
    assert "- teacher_text: the teacher's own text: 4 completions" in md
    assert "- extra:notes.txt: " in md and "- generation: the teacher's mean NLL" in md
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["variants"][2]["fidelity"] == json.loads(json.dumps(rows["student"]["fidelity"]))


def test_the_general_set_asks_the_teachers_own_questions_and_the_teacher_judges(
    corpus: Path, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import distill.teacher_text as teacher_text
    from distill.models import load_causal_lm
    from distill.prompts import chat_tokens

    # The drafting is tested in tests/test_own_questions.py; here, what the set does with them.
    questions = ["w5 w6 w7 w8", "w9 w10 w11", "w12 w13 w14 w15"]
    monkeypatch.setattr(teacher_text, "general_questions", lambda *args: questions)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    # With the generation set on too: a variant answers both sets in one generate call, and
    # each set must get its own answers back.
    cfg = config(corpus, tmp_path / "cache", fidelity=["generation", "general"])
    report = _evaluate(cfg, run_dir, tokenizer=tokenizer)
    rows = {v["name"]: v for v in report["variants"]}
    assert list(report["fidelity"]) == ["generation", "general"]
    assert rows["teacher"]["fidelity"]["general"]["teacher_nll_ratio"] == 1.0
    prompts = [list(chat_tokens(tokenizer, q)) for q in questions]
    variant = load_causal_lm(run_dir / "student_init").eval()
    want = _teacher_nll(prompts, _greedy(variant, prompts, cfg.eval.generation_tokens))
    own = _teacher_nll(prompts, _greedy(word_llama(0), prompts, cfg.eval.generation_tokens))
    other = rows["student_init"]["fidelity"]["general"]
    assert other["prompts"] == 3
    assert other["teacher_nll"] == pytest.approx(want, rel=1e-4)
    assert other["teacher_nll_ratio"] == pytest.approx(want / own, rel=1e-4)
    for name in ("generation", "general"):  # the student is the teacher's copy
        assert rows["student"]["fidelity"][name]["teacher_nll_ratio"] == pytest.approx(1.0)
        assert rows["student"]["fidelity"][name]["draft"]["top1_on_teacher_answers"] == 1.0
    # As the teacher's draft model: student_init's greedy token after each prefix of the
    # teacher's own answers, by hand.
    teacher_answers = _greedy(word_llama(0), prompts, cfg.eval.generation_tokens)
    guessed = total = 0
    with torch.no_grad():
        for prompt, answer in zip(prompts, teacher_answers, strict=True):
            for i, token in enumerate(answer):
                ids = torch.tensor([prompt + answer[:i]])
                guessed += int(variant(input_ids=ids).logits[0, -1].argmax()) == token
                total += 1
    draft = other["draft"]
    assert draft["top1_on_teacher_answers"] == pytest.approx(guessed / total)
    assert 1.0 <= draft["by_draft_length"]["4"]["tokens_per_pass"] <= 5.0
    md = (run_dir / "report.md").read_text()
    assert "general answers: teacher NLL" in md and "- general: the teacher's mean NLL" in md


def test_without_a_chat_template_the_general_set_is_left_out_saying_why(
    corpus: Path, run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(corpus, tmp_path / "cache", fidelity=["generation", "general"])
    with caplog.at_level("INFO"):
        report = _evaluate(cfg, run_dir)  # the word tokenizer has no template
    assert list(report["fidelity"]) == ["generation"]
    assert "the general set is left out: the tokenizer has no chat template" in caplog.text


def test_teacher_text_is_cached_and_refused_for_another_teacher(
    corpus: Path, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(corpus, tmp_path / "cache", teacher_text_dir=str(tmp_path / "tt"))
    first = _evaluate(cfg, run_dir)
    cached = tmp_path / "tt" / "samples.json"
    stamp = cached.stat().st_mtime_ns
    manifest = json.loads((tmp_path / "tt" / "manifest.json").read_text())
    assert manifest["temperature"] == 1.0 and manifest["max_new_tokens"] == 6
    assert manifest["batch_size"] == 3  # eval.teacher_text_batch_size, not the answers' batch
    # No continuation prompts need a template: without one every prompt is a continuation.
    assert {s["kind"] for s in json.loads(cached.read_text())} == {"continuation"}

    real = distill.sampling.generate
    temperatures: list[float] = []

    def counting(model, prompts, **kwargs):
        temperatures.append(kwargs["temperature"])
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(distill.sampling, "generate", counting)
    monkeypatch.setattr(distill.teacher_text, "generate", counting)
    scored: list[int] = []
    real_nll = TeacherJudge.nll

    def counting_nll(self, answers):
        scored.append(1)
        return real_nll(self, answers)

    monkeypatch.setattr(TeacherJudge, "nll", counting_nll)
    second = _evaluate(cfg, run_dir)
    # The teacher's text and greedy answers come from the caches, and so does the teacher's
    # NLL of its own answers: only the two variants answer, and only their answers are scored.
    assert temperatures == [0.0, 0.0]
    assert len(scored) == 2
    assert cached.stat().st_mtime_ns == stamp
    for a, b in zip(first["variants"], second["variants"], strict=True):
        assert a["fidelity"]["teacher_text"] == pytest.approx(b["fidelity"]["teacher_text"])
    with pytest.raises(CacheMismatchError) as err:
        _evaluate(cfg, run_dir, teacher=word_llama(5))
    assert "teacher_weights" in err.value.mismatched


def test_sets_can_be_turned_off_and_a_missing_extra_corpus_fails_first(
    corpus: Path, run_dir: Path, tmp_path: Path
) -> None:
    report = _evaluate(config(corpus, tmp_path, fidelity=["generation"]), run_dir)
    assert list(report["fidelity"]) == ["generation"]
    assert all(list(v["fidelity"]) == ["generation"] for v in report["variants"])
    off = _evaluate(config(corpus, tmp_path, fidelity=[]), run_dir)
    assert off["fidelity"] == {} and all("fidelity" not in v for v in off["variants"])
    assert "Fidelity to the teacher" not in (run_dir / "report.md").read_text()

    def never(*args, **kwargs):
        raise AssertionError("the teacher was used before the extra corpora were checked")

    missing = config(corpus, tmp_path, extra_corpora=[str(tmp_path / "nope" / "*.txt")])
    teacher = word_llama(0)
    teacher.forward = never  # type: ignore[method-assign]
    with pytest.raises(FidelityError, match="matches no file"):
        _evaluate(missing, run_dir, teacher=teacher)
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    with pytest.raises(FidelityError, match="fewer tokens than one block"):
        _evaluate(config(corpus, tmp_path, extra_corpora=[str(short)]), run_dir, teacher=teacher)


def test_repeated_ngrams_show_a_loop() -> None:
    from distill.evaluate.answers import repeated_ngram_share

    assert repeated_ngram_share([(1, 2, 3, 4, 5, 6)]) == 0.0
    loop = (7, 8) * 6  # 12 tokens, 9 4-grams, only 2 distinct
    assert repeated_ngram_share([loop]) == pytest.approx(7 / 9)
    # Counted within each answer, pooled over answers; too-short answers add nothing.
    assert repeated_ngram_share([loop, (1, 2, 3, 4, 5, 6), (1, 2)]) == pytest.approx(7 / 12)
    assert math.isnan(repeated_ngram_share([(1, 2)]))


def test_a_quantized_table_dequantized_once_gives_the_same_answers() -> None:
    """embedding_table_once: an int8 model's greedy answers and logits are bit for bit what
    the model as loaded gives; a float model is left untouched."""
    from distill.evaluate.answers import embedding_table_once
    from distill.quantize.plan import quantize_model
    from distill.sampling import generate

    model = tiny_llama(WORD_VOCAB, layers=2, seed=4, tie=False).to(torch.bfloat16)
    quantize_model(model, "int8_weight_only", include_embeddings=True)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        want = generate(model, prompts, max_new_tokens=6, temperature=0.0, seed=0, batch_size=2)
        logits = model(input_ids=ids).logits
        with embedding_table_once(model) as swapped:
            assert swapped
            got = generate(model, prompts, max_new_tokens=6, temperature=0.0, seed=0, batch_size=2)
            assert torch.equal(model(input_ids=ids).logits, logits)
        assert "forward" not in model.get_input_embeddings().__dict__  # restored
    assert got == want
    with embedding_table_once(word_llama(0)) as swapped:
        assert not swapped
