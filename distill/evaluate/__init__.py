"""Evaluation: quality, memory and speed of every variant; the report and the frontier. The
names other stages may use, each imported from its module on first use
(:mod:`distill.exports`)."""

from distill.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "run": "stage",
        "finished": "stage",
        "FAILED_FILE": "frontier",
        "fidelity_lines": "fidelity_table",
        "draft_summary": "fidelity_table",
        "format_table": "report",
        "model_index": "tasks",
        "task_lines": "tasks",
        "check_tasks": "tasks",
    },
)
