"""What a dataset is for, as an object: everything that differs between
classification and next-token language modelling lives here, as the numeric
modes live in pipeline.modes. ``of(name)`` is the one place a manifest's
``task`` string becomes a Task; nothing else compares task names.

- classification: labelled rows; an example is a row, its target the label;
  the test metric is accuracy.
- lm: one stream of token ids (the text formats); an example is a window of
  ``context`` tokens, its targets the same window shifted by one; the test
  metric is the mean cross-entropy per target token.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import UsageError

__all__ = ["Task", "CLASSIFICATION", "LM", "TASKS", "of", "task_of", "for_format"]


@dataclass(frozen=True)
class Task:
    name: str
    windows: bool          # examples are windows of a token stream (no labels)
    metric: str            # the test metric run.json records
    x_dtype: str           # the decoded inputs' NumPy dtype

    def input_shape(self, row_shape: tuple[int, ...], context: int) -> tuple[int, ...]:
        """One example's input shape, as a model factory receives it."""
        return (context,) if self.windows else tuple(row_shape)

    def targets_per_example(self, context: int) -> int:
        """How many targets one example contributes to the loss's mean."""
        return context if self.windows else 1

    def logits_shape(self, n: int, context: int, classes: int) -> tuple[int, ...]:
        """The logits a model must return for ``n`` examples."""
        return (n, context, classes) if self.windows else (n, classes)

    def context_problem(self, context: int, dataset: str) -> str | None:
        """``data.context`` checked against the task (None: it fits)."""
        if self.windows and context < 1:
            return (f"data.context: dataset {dataset!r} is for language modelling: expected "
                    f"the tokens per example (>= 1), found {context}")
        if not self.windows and context:
            return (f"data.context: dataset {dataset!r} is for classification: expected 0 "
                    f"(unset), found {context}")
        return None

    def counts(self, n_rows: int, n_train: int, context: int) -> tuple[int, int]:
        """(train examples, test-part examples) of a dataset of ``n_rows`` rows
        (tokens), the first ``n_train`` of them the train part."""
        if not self.windows:
            return n_train, n_rows - n_train
        return (n_train - 1) // context, max(n_rows - n_train - 1, 0) // context


CLASSIFICATION = Task("classification", windows=False, metric="test_accuracy",
                      x_dtype="float32")
LM = Task("lm", windows=True, metric="test_loss", x_dtype="int64")
_TASKS = {t.name: t for t in (CLASSIFICATION, LM)}
TASKS = tuple(_TASKS)
_TEXT_FORMATS = ("text",)  # the formats that decode to a token stream (pipeline.data.formats)


def of(name: str) -> Task:
    """The Task a manifest's dataset names."""
    try:
        return _TASKS[name]
    except KeyError:
        raise UsageError(f"task: expected one of {list(TASKS)}, found {name!r}") from None


def for_format(fmt: str) -> Task:
    """The task a part of this format serves: text is a token stream (lm), the
    rest labelled rows (classification)."""
    return LM if fmt in _TEXT_FORMATS else CLASSIFICATION


task_of = of  # the package's name for it (pipeline.data.task_of)
