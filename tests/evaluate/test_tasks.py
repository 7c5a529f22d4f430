"""lm-evaluation-harness on every row: the GGUF wrapper scores what lm-eval's own HFLM scores,
results are read back as they are, and unknown tasks or sampling tasks are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import EvalConfig
from distill.evaluate.tasks import (
    TaskError,
    check_tasks,
    gguf_lm,
    main_metrics,
    model_index,
    task_lines,
    task_metrics,
    task_scores,
    tasks_for,
)
from tests.conftest import make_tokenizer, tiny_llama

TASKS = Path(__file__).parents[1] / "lm_eval_tasks"
TASK = "distill_python_mc"
# F16 rounding of weights and activations in llama.cpp against transformers' fp32: logits
# within 0.02 (tests/quantize/test_gguf_llama_cpp.py), so a continuation of a few tokens
# scores within a few hundredths of a nat.
MAX_LOGPROB_GAP = 0.1


def _cfg(**overrides) -> EvalConfig:
    base = dict(
        lm_eval_tasks=[TASK],
        lm_eval_include=[str(TASKS)],
        lm_eval_limit=6,
        lm_eval_max_length=256,
        lm_eval_batch_size=4,
    )
    return EvalConfig(**(base | overrides))


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def pair(request, tmp_path_factory):
    """A tiny llama, its tokenizer (byte-level BPE without BOS, or Gemma's kind, which
    prepends BOS), and its F16 GGUF open in llama.cpp."""
    from distill.models import open_gguf
    from distill.quantize.gguf import export_gguf
    from tests.quantize.gguf_models import sentencepiece_tokenizer

    tok = make_tokenizer(300) if request.param == "bpe" else sentencepiece_tokenizer(300)
    model = tiny_llama(len(tok), seed=5, tie=False).eval()
    path = tmp_path_factory.mktemp("tasks") / "m.gguf"
    export_gguf(model, tok, path, "f16")
    with open_gguf(path, n_ctx=256, threads=1) as runtime:
        yield model, tok, runtime


def _gguf(runtime, tok, max_length: int = 256):
    return gguf_lm(runtime, tok, max_length, len(tok), [tok.eos_token_id])


def _requests(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_the_gguf_wrapper_scores_what_hflm_scores(pair) -> None:
    from lm_eval.models.huggingface import HFLM

    model, tok, runtime = pair
    pairs = [
        ("Question: Which keyword defines a function?\nAnswer:", " def"),
        ("The quick brown fox", " jumps over the lazy dog."),
        ("", "A distilled student learns from its teacher."),  # empty context: prefix token
        # A context longer than the window: both keep its last max_length tokens.
        ("The quick brown fox jumps over the lazy dog. " * 20, " A distilled student"),
    ]
    for max_length in (256, 48):
        hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=max_length)
        gg = _gguf(runtime, tok, max_length)
        want = hf.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
        got = gg.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
        for (lp_hf, greedy_hf), (lp_gg, greedy_gg) in zip(want, got, strict=True):
            assert abs(lp_hf - lp_gg) < MAX_LOGPROB_GAP, (max_length, lp_hf, lp_gg)
            assert lp_gg < 0 and greedy_gg == greedy_hf
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=256)
    gg = _gguf(runtime, tok)
    text = [("The quick brown fox jumps over the lazy dog. " * 12,)]  # several 256-token windows
    (r_hf,) = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", text), disable_tqdm=True)
    (r_gg,) = gg.loglikelihood_rolling(_requests("loglikelihood_rolling", text), disable_tqdm=True)
    assert abs(r_hf - r_gg) < 5 * MAX_LOGPROB_GAP and r_gg < -10, (r_hf, r_gg)


def test_greedy_answers_stop_where_the_task_says_and_sampling_is_refused(pair) -> None:
    from lm_eval.models.huggingface import HFLM

    model, tok, runtime = pair
    gg = _gguf(runtime, tok)
    prompt = "The quick brown fox"
    (full,) = gg.generate_until(
        _requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 12})])
    )
    assert full
    # HFLM's own answer to the same request: the same text (greedy, F16 against fp32).
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=256)
    (want,) = hf.generate_until(
        _requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 12})])
    )
    assert full == want
    stop = full[len(full) // 2 :][:2]
    (cut,) = gg.generate_until(
        _requests("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 12})])
    )
    assert cut == full.split(stop)[0] and stop not in cut
    with pytest.raises(TaskError, match="sample"):
        gg.generate_until(
            _requests("generate_until", [(prompt, {"do_sample": True, "temperature": 1.0})])
        )
    with pytest.raises(TaskError, match="256-token context"):
        gg.generate_until(_requests("generate_until", [(prompt, {"max_gen_toks": 256})]))


def test_every_runtime_gets_the_same_task_settings_and_scores_close(pair) -> None:
    model, tok, runtime = pair
    tasks = tasks_for(_cfg(), tok, [tok.eos_token_id])
    torch_scores = tasks.score_model(model)[TASK]
    gguf_scores = tasks.score_gguf(runtime, model.config)[TASK]
    assert torch_scores["examples"] == gguf_scores["examples"] == 6
    assert torch_scores["num_fewshot"] == gguf_scores["num_fewshot"] == 2  # the task's own
    for metric in ("acc", "acc_norm"):
        assert 0.0 <= gguf_scores[metric] <= 1.0
        # 6 questions: an F16 near-tie may turn at most one answer.
        assert abs(torch_scores[metric] - gguf_scores[metric]) <= 1 / 6 + 1e-9, metric


def test_unknown_tasks_and_missing_folders_are_refused_before_any_model_loads(
    monkeypatch,
) -> None:
    import distill.evaluate.tasks as tasks_mod

    # A task the local folder lacks sends the check to lm-eval's own index (seconds to build,
    # its thousands of tasks never hold this name): the local index stands in for it here.
    local = tasks_mod._manager((str(TASKS),), False)
    monkeypatch.setattr(tasks_mod, "_manager", lambda include, defaults: local)
    with pytest.raises(TaskError, match="distill_no_such_task") as err:
        check_tasks(_cfg(lm_eval_tasks=[TASK, "distill_no_such_task"]))
    assert "eval.lm_eval_include" in str(err.value) and f"'{TASK}'" not in str(err.value)
    problems = _cfg(lm_eval_include=["/no/such/folder"], lm_eval_limit=0).problems()
    assert any("/no/such/folder" in p for p in problems)
    assert any("lm_eval_limit=0" in p for p in problems)
    assert tasks_for(EvalConfig(), make_tokenizer(300), []) is None  # none configured


def _results() -> dict:
    return {
        "results": {
            TASK: {
                "alias": TASK,
                "acc,none": 0.5,
                "acc_stderr,none": 0.2,
                "acc_norm,none": 0.25,
                "acc_norm_stderr,none": "N/A",
                "sample_len,none": 6,
            }
        },
        "n-samples": {TASK: {"original": 24, "effective": 6}},
        "n-shot": {TASK: 2},
    }


def test_results_are_read_back_as_lm_eval_wrote_them() -> None:
    scores = task_scores(_results())
    assert scores == {
        TASK: {"acc": 0.5, "acc_stderr": 0.2, "acc_norm": 0.25, "examples": 6, "num_fewshot": 2}
    }
    assert main_metrics(scores[TASK]) == ["acc", "acc_norm"]
    assert task_metrics(scores) == {f"lm_eval:{TASK}:acc": 0.5, f"lm_eval:{TASK}:acc_norm": 0.25}
    report = {
        "variants": [
            {"name": "teacher", "lm_eval": scores},
            {"name": "student", "lm_eval": scores},
        ],
        "lm_eval": {"version": "0.4.13", "max_length": 256, "seed": 1234},
    }
    report["variants"].append({"name": "student-gguf-q4_0", "lm_eval_error": "llama.cpp failed"})
    text = "\n".join(task_lines(report))
    assert "| teacher | 0.500 ± 0.200 | 0.250 |" in text
    assert "- Not scored: student-gguf-q4_0: llama.cpp failed" in text
    assert f"{TASK} 2-shot" in text and f"examples {TASK} 6" in text
    (entry,) = model_index(report, "my-student")
    assert entry["name"] == "my-student"
    metrics = entry["results"][0]["metrics"]
    assert [(m["type"], m["value"]) for m in metrics] == [("acc", 0.5), ("acc_norm", 0.25)]
    assert model_index({"variants": [{"name": "student"}]}, "x") == []


def test_the_shipped_task_is_offline_and_holds_out_its_few_shot_examples() -> None:
    from distill.evaluate.tasks import _task_manager

    task = _task_manager([str(TASKS)], [TASK]).load_task_or_group([TASK])[TASK]
    test, train = list(task.test_docs()), list(task.training_docs())
    assert len(test) >= 20 and len(train) >= 2
    assert not {d["question"] for d in test} & {d["question"] for d in train}
    assert all(0 <= d["answer"] < len(d["choices"]) for d in test + train)
